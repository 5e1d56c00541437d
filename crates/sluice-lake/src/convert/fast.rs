//! Fast path: check, in one streaming pass and without building a JSON tree, that a record
//! fits the current schema *exactly* — every value has the JSON type its column stores
//! without any conversion (integers in range for integer columns, any number for Float64,
//! strings only for string columns, ...), no unknown field carries a typed value, no key is
//! repeated, required fields are present. Only records that pass are handed to arrow-json,
//! whose decoder would otherwise coerce silently (it parses `1.5` into an Int64 column as 1
//! and `"12"` into numeric columns).
//!
//! Anything else is reported as [`Outcome::Mismatch`] (the slow path then decides between
//! evolution and reject with a precise reason), or as invalid JSON / not an object.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::tree::{Kind, Node, StructNode};
use super::valid_name;

pub(crate) enum Outcome {
    Fits,
    Mismatch,
    NotObject(&'static str),
    Invalid(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fail {
    None,
    Mismatch,
    NotObject(&'static str),
}

/// Why a pass stopped, beside serde_json's own error (shared with [`super::decode`]).
pub(crate) struct Ctx<'p> {
    fail: Cell<Fail>,
    pub(crate) partition_by: &'p [String],
}

impl<'p> Ctx<'p> {
    pub(crate) fn new(partition_by: &'p [String]) -> Self {
        Ctx {
            fail: Cell::new(Fail::None),
            partition_by,
        }
    }

    #[cold]
    pub(crate) fn mismatch<E: de::Error>(&self) -> Result<(), E> {
        self.fail.set(Fail::Mismatch);
        Err(E::custom("record does not fit the schema"))
    }

    #[cold]
    pub(crate) fn not_object<E: de::Error>(&self, kind: &'static str) -> Result<(), E> {
        self.fail.set(Fail::NotObject(kind));
        Err(E::custom("not an object"))
    }

    /// The outcome of a pass that ended with `res`.
    pub(crate) fn outcome(&self, res: Result<(), serde_json::Error>) -> Outcome {
        match (res, self.fail.get()) {
            (Ok(()), _) => Outcome::Fits,
            (Err(_), Fail::Mismatch) => Outcome::Mismatch,
            (Err(_), Fail::NotObject(kind)) => Outcome::NotObject(kind),
            (Err(e), Fail::None) => Outcome::Invalid(e.to_string()),
        }
    }
}

pub(crate) fn check(root: &StructNode, partition_by: &[String], bytes: &[u8]) -> Outcome {
    let ctx = Ctx::new(partition_by);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let res = RootSeed { root, ctx: &ctx }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    ctx.outcome(res)
}

struct RootSeed<'a> {
    root: &'a StructNode,
    ctx: &'a Ctx<'a>,
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl RootSeed<'_> {
    fn not_object<E: de::Error>(&self, kind: &'static str) -> Result<(), E> {
        self.ctx.not_object(kind)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        visit_struct(self.root, map, self.ctx, true)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object("null")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_object("boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_object("number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_object("number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_object("number")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_object("string")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_object("array")
    }
}

/// Tracks which fields of a struct were seen (duplicates, required fields).
pub(crate) enum Seen {
    Small(u128),
    Large(Vec<bool>),
}

impl Seen {
    pub(crate) fn new(n: usize) -> Seen {
        if n <= 128 {
            Seen::Small(0)
        } else {
            Seen::Large(vec![false; n])
        }
    }
    /// Marks `i`; returns false if it was already marked.
    #[inline]
    pub(crate) fn insert(&mut self, i: usize) -> bool {
        match self {
            Seen::Small(bits) => {
                let m = 1u128 << i;
                let fresh = *bits & m == 0;
                *bits |= m;
                fresh
            }
            Seen::Large(v) => !std::mem::replace(&mut v[i], true),
        }
    }
    pub(crate) fn contains(&self, i: usize) -> bool {
        match self {
            Seen::Small(bits) => *bits & (1u128 << i) != 0,
            Seen::Large(v) => v[i],
        }
    }
}

fn visit_struct<'de, A: MapAccess<'de>>(
    s: &StructNode,
    mut map: A,
    ctx: &Ctx<'_>,
    top: bool,
) -> Result<(), A::Error> {
    let n = s.fields.len();
    let mut seen = Seen::new(n);
    let mut hint = 0usize;
    // Unknown keys seen so far (to catch repeats); a set once there are many of them.
    let mut unknown: Vec<Cow<'de, str>> = Vec::new();
    let mut unknown_set: HashSet<Cow<'de, str>> = HashSet::new();
    while let Some(key) = map.next_key_seed(KeySeed)? {
        // Records of one stream mostly repeat the key order of the schema: try the field
        // after the previous match before hashing.
        let idx = match s.fields.get(hint) {
            Some(f) if f.name == *key => Some(hint),
            _ => s.get(&key),
        };
        match idx {
            Some(i) => {
                let f = &s.fields[i];
                if f.reserved || !seen.insert(i) {
                    return ctx.mismatch();
                }
                hint = i + 1;
                map.next_value_seed(ValueSeed { node: f, ctx })?;
            }
            None => {
                let partition = top && ctx.partition_by.iter().any(|p| *p == *key);
                if !valid_name(&key) || unknown.contains(&key) || unknown_set.contains(&key) {
                    return ctx.mismatch();
                }
                map.next_value_seed(UntypedSeed { ctx, partition })?;
                if unknown.len() < 16 {
                    unknown.push(key);
                } else {
                    unknown_set.insert(key);
                }
            }
        }
    }
    if s.required.iter().any(|&i| !seen.contains(i)) {
        return ctx.mismatch();
    }
    Ok(())
}

pub(crate) struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// A value whose column exists: it must fit the column's type exactly.
struct ValueSeed<'a> {
    node: &'a Node,
    ctx: &'a Ctx<'a>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if self.node.nullable {
            Ok(())
        } else {
            self.ctx.mismatch()
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        match self.node.kind {
            Kind::Bool => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match self.node.kind {
            Kind::Int(t) if t.fits_i64(v) => Ok(()),
            Kind::Float64 => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match self.node.kind {
            Kind::Int(t) if t.fits_u64(v) => Ok(()),
            Kind::Float64 => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        match self.node.kind {
            Kind::Float64 => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        match self.node.kind {
            Kind::Str(_) => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.node.partition {
            return self.ctx.mismatch();
        }
        match &self.node.kind {
            Kind::List { item, .. } => {
                while seq
                    .next_element_seed(ValueSeed {
                        node: item,
                        ctx: self.ctx,
                    })?
                    .is_some()
                {}
                Ok(())
            }
            // An array without any typed value carries no type: null in other columns.
            _ if self.node.nullable => {
                let ctx = self.ctx;
                while seq
                    .next_element_seed(UntypedSeed {
                        ctx,
                        partition: false,
                    })?
                    .is_some()
                {}
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.node.partition {
            return self.ctx.mismatch();
        }
        match &self.node.kind {
            Kind::Struct(s) => visit_struct(s, map, self.ctx, false),
            // `{}` carries no type: null in other columns (non-empty objects: slow path).
            _ if self.node.nullable && map.next_key::<IgnoredAny>()?.is_none() => Ok(()),
            _ => self.ctx.mismatch(),
        }
    }
}

/// A value of a field the schema does not have: fine only if it carries no type
/// information (null, `[]`, `{}`); anything else needs the slow path (new column).
pub(crate) struct UntypedSeed<'a> {
    ctx: &'a Ctx<'a>,
    partition: bool,
}

impl<'a> UntypedSeed<'a> {
    pub(crate) fn new(ctx: &'a Ctx<'a>, partition: bool) -> Self {
        UntypedSeed { ctx, partition }
    }
}

impl<'de> DeserializeSeed<'de> for UntypedSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UntypedSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.partition || seq.next_element::<IgnoredAny>()?.is_some() {
            return self.ctx.mismatch();
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.partition || map.next_key::<IgnoredAny>()?.is_some() {
            return self.ctx.mismatch();
        }
        Ok(())
    }
}
