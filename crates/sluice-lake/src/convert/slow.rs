//! Slow path, for records the fast check could not accept as they are: parse the record into
//! an order-preserving JSON tree and merge it into a copy of the schema. The merge either
//! succeeds (new columns / nested fields, Int64 -> Float64 widening, scalar -> Utf8 widening
//! when asked) or names the first
//! conflict; the copy is only kept when the record is accepted, so a rejected record never
//! leaves a trace in the schema.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::tree::{IntType, Kind, Node, StructNode};
use super::valid_name;

/// A parsed JSON value that keeps key order and repeated keys (serde_json's `Value` sorts
/// keys unless its `preserve_order` feature is on, and drops repeated keys).
#[derive(Debug)]
pub(crate) enum JVal {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above i64::MAX (and at most u64::MAX).
    UInt(u64),
    Float(f64),
    Str(String),
    Arr(Vec<JVal>),
    Obj(Vec<(String, JVal)>),
}

impl<'de> Deserialize<'de> for JVal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JVal, D::Error> {
        d.deserialize_any(JValVisitor)
    }
}

struct JValVisitor;

impl<'de> Visitor<'de> for JValVisitor {
    type Value = JVal;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<JVal, E> {
        Ok(JVal::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<JVal, E> {
        Ok(JVal::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<JVal, E> {
        Ok(JVal::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<JVal, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => JVal::Int(i),
            Err(_) => JVal::UInt(v),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<JVal, E> {
        Ok(JVal::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<JVal, E> {
        Ok(JVal::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<JVal, E> {
        Ok(JVal::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JVal, A::Error> {
        let mut v = Vec::new();
        while let Some(e) = seq.next_element()? {
            v.push(e);
        }
        Ok(JVal::Arr(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JVal, A::Error> {
        let mut v = Vec::new();
        while let Some((k, e)) = map.next_entry::<String, JVal>()? {
            v.push((k, e));
        }
        Ok(JVal::Obj(v))
    }
}

impl JVal {
    /// The Arrow type this value would be inferred as.
    fn type_name(&self) -> &'static str {
        match self {
            JVal::Null => "null",
            JVal::Bool(_) => "Boolean",
            JVal::Int(_) => "Int64",
            JVal::UInt(_) | JVal::Float(_) => "Float64",
            JVal::Str(_) => "Utf8",
            JVal::Arr(_) => "List",
            JVal::Obj(_) => "Struct",
        }
    }

    /// JSON text of the value, cut after about `SNIPPET` characters.
    fn snippet(&self) -> String {
        const SNIPPET: usize = 60;
        let mut out = String::new();
        self.write_json(&mut out, SNIPPET);
        if out.len() > SNIPPET {
            let mut cut = SNIPPET;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
        }
        out
    }

    fn write_json(&self, out: &mut String, limit: usize) {
        if out.len() > limit {
            return;
        }
        match self {
            JVal::Null => out.push_str("null"),
            JVal::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            JVal::Int(i) => {
                let _ = write!(out, "{i}");
            }
            JVal::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            JVal::Float(f) => {
                let _ = write!(out, "{f:?}");
            }
            JVal::Str(s) => out.push_str(&json_string(s)),
            JVal::Arr(items) => {
                out.push('[');
                for (i, e) in items.iter().enumerate() {
                    if out.len() > limit {
                        break;
                    }
                    if i > 0 {
                        out.push(',');
                    }
                    e.write_json(out, limit);
                }
                out.push(']');
            }
            JVal::Obj(entries) => {
                out.push('{');
                for (i, (k, e)) in entries.iter().enumerate() {
                    if out.len() > limit {
                        break;
                    }
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&json_string(k));
                    out.push(':');
                    e.write_json(out, limit);
                }
                out.push('}');
            }
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Item,
}

/// Settings of one merge plus what it found.
pub(crate) struct Merge<'a> {
    pub partition_by: &'a [String],
    /// Scalar columns whose values change type become Utf8 (see `ConvertOptions`).
    widen_to_text: bool,
    /// Dotted paths (list levels omitted) of table columns this record widened.
    pub widened: Vec<String>,
    pub changed: bool,
    path: Vec<Seg<'a>>,
}

impl<'a> Merge<'a> {
    pub(crate) fn new(partition_by: &'a [String], widen_to_text: bool) -> Self {
        Merge {
            partition_by,
            widen_to_text,
            widened: Vec::new(),
            changed: false,
            path: Vec::new(),
        }
    }

    /// Path for reasons: `user.tags[]`, `checks[].score`.
    fn display_path(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Item => s.push_str("[]"),
            }
        }
        s
    }

    /// Path for `widened`: names joined by dots, list levels left out (`checks.score`).
    fn dotted_path(&self) -> String {
        let mut parts = Vec::new();
        for seg in &self.path {
            if let Seg::Key(k) = seg {
                parts.push(*k);
            }
        }
        parts.join(".")
    }

    fn field_err(&self, what: impl fmt::Display) -> String {
        format!("field \"{}\": {what}", self.display_path())
    }

    fn conflict(&self, node: &Node, v: &JVal) -> String {
        let origin = if node.existing {
            format!("table has {}", node.kind)
        } else {
            format!("column inferred as {} from earlier values", node.kind)
        };
        self.field_err(format_args!(
            "{origin}, record has {} ({})",
            v.type_name(),
            v.snippet()
        ))
    }

    /// Merges a top-level record object into `root`.
    pub(crate) fn merge_record(
        &mut self,
        root: &mut StructNode,
        entries: &'a [(String, JVal)],
    ) -> Result<(), String> {
        self.merge_object(root, entries, true)
    }

    fn merge_object(
        &mut self,
        s: &mut StructNode,
        entries: &'a [(String, JVal)],
        top: bool,
    ) -> Result<(), String> {
        // Keys seen so far, and lower-cased column names (built on the first new column):
        // sets, so that objects with many keys stay linear.
        let mut seen: HashSet<&str> = HashSet::with_capacity(entries.len());
        let mut lower_names: Option<HashMap<String, (String, bool)>> = None;
        for (k, v) in entries {
            self.path.push(Seg::Key(k));
            if let Some(bad) = invalid_name_reason(k) {
                return Err(self.field_err(bad));
            }
            if !seen.insert(k.as_str()) {
                return Err(self.field_err("key appears more than once in the object"));
            }
            let partition = top && self.partition_by.iter().any(|p| p == k);
            if partition {
                self.check_partition_value(s.get(k).map(|i| &s.fields[i]), v)?;
            }
            match s.get(k) {
                Some(idx) => {
                    if s.fields[idx].reserved {
                        return Err(self.field_err(
                            "name is reserved for a metadata column Sluice adds to every row",
                        ));
                    }
                    self.merge_value(&mut s.fields[idx], v)?;
                }
                None => {
                    if let Some(kind) = self.infer(v)? {
                        let lower = k.to_lowercase();
                        let lower_names = lower_names.get_or_insert_with(|| {
                            let mut m = HashMap::with_capacity(s.fields.len());
                            for f in &s.fields {
                                m.entry(f.name.to_lowercase())
                                    .or_insert_with(|| (f.name.clone(), f.reserved));
                            }
                            m
                        });
                        if let Some((other, reserved)) = lower_names.get(&lower) {
                            let what = if *reserved {
                                "metadata column"
                            } else {
                                "column"
                            };
                            return Err(self.field_err(format_args!(
                                "differs only in case from {what} \"{other}\" (Delta column names are case-insensitive)"
                            )));
                        }
                        let mut node = Node::new(k.clone(), kind);
                        node.partition = partition;
                        let pos = if top {
                            s.insert_position()
                        } else {
                            s.fields.len()
                        };
                        s.insert(pos, node);
                        lower_names.insert(lower, (k.clone(), false));
                        self.changed = true;
                    }
                }
            }
            self.path.pop();
        }
        // Required (non-nullable) fields of the table must be given a value.
        for &ri in &s.required {
            let f = &s.fields[ri];
            if !seen.contains(f.name.as_str()) {
                let mut path = self.display_path();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&f.name);
                return Err(format!(
                    "field \"{path}\": table column is not nullable, record has no value"
                ));
            }
        }
        Ok(())
    }

    /// Partition columns hold a string, integer or boolean (or, if the table already has a
    /// Float64 column there, a number): never an object or array, and never widened.
    fn check_partition_value(&self, node: Option<&Node>, v: &JVal) -> Result<(), String> {
        let ok = match (v, node.map(|n| &n.kind)) {
            (JVal::Arr(_) | JVal::Obj(_), _) => false,
            (JVal::Float(_) | JVal::UInt(_), Some(Kind::Float64)) => true,
            (JVal::Float(_) | JVal::UInt(_), _) => false,
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(self.field_err(format_args!(
                "partition column must hold a string, integer or boolean, record has {} ({})",
                v.type_name(),
                v.snippet()
            )))
        }
    }

    /// Infers the kind of a value for a new column; `None` if it carries no type (null,
    /// empty array/object, or only such values inside).
    fn infer(&mut self, v: &'a JVal) -> Result<Option<Kind>, String> {
        Ok(match v {
            JVal::Null => None,
            JVal::Bool(_) => Some(Kind::Bool),
            JVal::Int(_) => Some(Kind::Int(IntType::I64)),
            JVal::UInt(_) | JVal::Float(_) => Some(Kind::Float64),
            JVal::Str(_) => Some(Kind::Str(arrow_schema::DataType::Utf8)),
            JVal::Arr(items) => {
                self.path.push(Seg::Item);
                let mut item: Option<Node> = None;
                for e in items {
                    match &mut item {
                        Some(node) => self.merge_value(node, e)?,
                        None => item = self.infer(e)?.map(|k| Node::new("item", k)),
                    }
                }
                self.path.pop();
                item.map(|item| Kind::List {
                    large: false,
                    item: Box::new(item),
                })
            }
            JVal::Obj(entries) => {
                let mut s = StructNode::default();
                self.merge_object(&mut s, entries, false)?;
                if s.fields.is_empty() {
                    None
                } else {
                    Some(Kind::Struct(s))
                }
            }
        })
    }

    fn merge_value(&mut self, node: &mut Node, v: &'a JVal) -> Result<(), String> {
        match (v, &mut node.kind) {
            (JVal::Null, _) => {
                if node.nullable {
                    Ok(())
                } else {
                    Err(self.field_err("table column is not nullable, record has null"))
                }
            }
            (JVal::Bool(_), Kind::Bool) => Ok(()),
            (JVal::Int(i), Kind::Int(t)) if t.fits_i64(*i) => Ok(()),
            (JVal::UInt(u), Kind::Int(t)) if t.fits_u64(*u) => Ok(()),
            (JVal::Int(_) | JVal::UInt(_) | JVal::Float(_), Kind::Float64) => Ok(()),
            (JVal::Float(_) | JVal::UInt(_), Kind::Int(IntType::I64)) if !node.partition => {
                // Safe widening: every Int64 value already stored is representable as a
                // Float64 (the rule accepts precision loss beyond 2^53).
                node.kind = Kind::Float64;
                self.changed = true;
                if node.existing {
                    self.widened.push(self.dotted_path());
                }
                Ok(())
            }
            (JVal::Str(_), Kind::Str(_)) => Ok(()),
            // A number or boolean in a text column is stored as its JSON text.
            (JVal::Int(_) | JVal::UInt(_) | JVal::Float(_) | JVal::Bool(_), Kind::Str(_))
                if self.widen_to_text =>
            {
                Ok(())
            }
            // Any other scalar conflict makes the column text; the values it holds become
            // their text when the table is rewritten.
            (
                JVal::Int(_) | JVal::UInt(_) | JVal::Float(_) | JVal::Bool(_) | JVal::Str(_),
                Kind::Int(_) | Kind::Float64 | Kind::Bool,
            ) if self.widen_to_text && !node.partition => {
                node.kind = Kind::Str(arrow_schema::DataType::Utf8);
                self.changed = true;
                if node.existing {
                    self.widened.push(self.dotted_path());
                }
                Ok(())
            }
            (JVal::Arr(items), Kind::List { item, .. }) => {
                self.path.push(Seg::Item);
                for e in items {
                    self.merge_value(item, e)?;
                }
                self.path.pop();
                Ok(())
            }
            (JVal::Obj(entries), Kind::Struct(s)) => {
                // `node.partition` is only set on top-level columns; merge_object rejects
                // objects in partition columns before getting here.
                self.merge_object(s, entries, false)
            }
            (JVal::Arr(_) | JVal::Obj(_), _) if !typed(v) => {
                // No type information: stored as null in a column of another kind.
                if !node.nullable {
                    return Err(self.field_err(format_args!(
                        "table column is not nullable, record has {} without values ({})",
                        v.type_name(),
                        v.snippet()
                    )));
                }
                self.check_untyped(v)
            }
            (_, Kind::Other(dt)) => Err(self.field_err(format_args!(
                "table has {dt}, which Sluice only fills with null from JSON, record has {} ({})",
                v.type_name(),
                v.snippet()
            ))),
            _ => Err(self.conflict(node, v)),
        }
    }
}

/// True if the value holds a non-null scalar somewhere (so it has a type).
fn typed(v: &JVal) -> bool {
    match v {
        JVal::Null => false,
        JVal::Arr(items) => items.iter().any(typed),
        JVal::Obj(entries) => entries.iter().any(|(_, e)| typed(e)),
        _ => true,
    }
}

impl<'a> Merge<'a> {
    /// Field names inside an untyped value obey the same rules as everywhere else.
    fn check_untyped(&mut self, v: &'a JVal) -> Result<(), String> {
        match v {
            JVal::Arr(items) => {
                self.path.push(Seg::Item);
                for e in items {
                    self.check_untyped(e)?;
                }
                self.path.pop();
                Ok(())
            }
            JVal::Obj(entries) => {
                let mut scratch = StructNode::default();
                self.merge_object(&mut scratch, entries, false)
            }
            _ => Ok(()),
        }
    }
}

/// Why a field name cannot be a Delta column name (without column mapping), if it can't.
pub(crate) fn invalid_name_reason(name: &str) -> Option<String> {
    if valid_name(name) {
        return None;
    }
    if name.is_empty() {
        return Some("empty field name".into());
    }
    let c = name
        .chars()
        .find(|c| super::INVALID_NAME_CHARS.contains(c))
        .unwrap_or(' ');
    Some(format!(
        "name contains {c:?}, which Delta column names cannot hold (without column mapping)"
    ))
}
