//! One-pass decoding: check that a record fits the schema exactly (the rules of
//! [`super::fast`], which this mirrors visitor for visitor) *while* appending its values to
//! column builders, so the steady state parses each record once instead of twice (the
//! check, then arrow-json's decode).
//!
//! Hand-written because it is where the lake sink spends most of its time: arrow-json's
//! decoder coerces silently and so can only run after a separate exact check.
//!
//! The builders take a record whole or not at all: every record starts at a mark, and a
//! record that does not fit is truncated away. [`Decoder::new`] declines schemas it does
//! not build (integer types other than Int64, string types other than Utf8, large lists,
//! types JSON is not converted into, non-nullable columns), and the caller declines to
//! use it for a flush whose schema evolves; both cases take the two-pass path, whose
//! results this one equals (a property test holds them together).

use std::fmt;
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::{BooleanBufferBuilder, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, FieldRef, Fields, SchemaRef};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as _;
use serde_json::value::RawValue;

use super::fast::{Ctx, KeySeed, Outcome, Seen, UntypedSeed};
use super::tree::{IntType, Kind, Node, StructNode};
use super::valid_name;

mod direct;

/// Validity bits plus values of one column.
enum Col {
    Bool { values: BooleanBufferBuilder, valid: BooleanBufferBuilder },
    I64 { values: Vec<i64>, valid: BooleanBufferBuilder },
    F64 { values: Vec<f64>, valid: BooleanBufferBuilder },
    Str { offsets: Vec<i32>, data: Vec<u8>, valid: BooleanBufferBuilder },
    Struct { fields: Fields, children: Vec<Col>, valid: BooleanBufferBuilder },
    List { field: FieldRef, offsets: Vec<i32>, child: Box<Col>, valid: BooleanBufferBuilder },
}

fn bits() -> BooleanBufferBuilder {
    BooleanBufferBuilder::new(1024)
}

fn nulls(valid: &mut BooleanBufferBuilder) -> Option<NullBuffer> {
    let n = NullBuffer::new(valid.finish());
    (n.null_count() > 0).then_some(n)
}

impl Col {
    /// A builder for `node`, or `None` where this decoder does not build the type.
    fn new(node: &Node) -> Option<Col> {
        if !node.nullable {
            return None;
        }
        Some(match &node.kind {
            Kind::Bool => Col::Bool { values: bits(), valid: bits() },
            Kind::Int(IntType::I64) => Col::I64 { values: Vec::new(), valid: bits() },
            Kind::Float64 => Col::F64 { values: Vec::new(), valid: bits() },
            Kind::Str(DataType::Utf8) => Col::Str { offsets: vec![0], data: Vec::new(), valid: bits() },
            Kind::Struct(s) => Col::Struct {
                fields: s.to_fields(),
                children: s.fields.iter().map(Col::new).collect::<Option<_>>()?,
                valid: bits(),
            },
            Kind::List { large: false, item } => Col::List {
                field: Arc::new(item.to_field()),
                offsets: vec![0],
                child: Box::new(Col::new(item)?),
                valid: bits(),
            },
            _ => return None,
        })
    }

    fn valid(&mut self) -> &mut BooleanBufferBuilder {
        match self {
            Col::Bool { valid, .. }
            | Col::I64 { valid, .. }
            | Col::F64 { valid, .. }
            | Col::Str { valid, .. }
            | Col::Struct { valid, .. }
            | Col::List { valid, .. } => valid,
        }
    }

    fn len(&self) -> usize {
        match self {
            Col::Bool { valid, .. }
            | Col::I64 { valid, .. }
            | Col::F64 { valid, .. }
            | Col::Str { valid, .. }
            | Col::Struct { valid, .. }
            | Col::List { valid, .. } => valid.len(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Col::Bool { values, .. } => values.append(false),
            Col::I64 { values, .. } => values.push(0),
            Col::F64 { values, .. } => values.push(0.0),
            Col::Str { offsets, data, .. } => offsets.push(data.len() as i32),
            Col::Struct { children, .. } => children.iter_mut().for_each(Col::append_null),
            Col::List { offsets, child, .. } => offsets.push(child.len() as i32),
        }
        self.valid().append(false);
    }

    /// Appends `n` nulls at once.
    fn append_nulls(&mut self, n: usize) {
        match self {
            Col::Bool { values, .. } => values.append_n(n, false),
            Col::I64 { values, .. } => values.resize(values.len() + n, 0),
            Col::F64 { values, .. } => values.resize(values.len() + n, 0.0),
            Col::Str { offsets, data, .. } => offsets.resize(offsets.len() + n, data.len() as i32),
            Col::Struct { children, .. } => children.iter_mut().for_each(|c| c.append_nulls(n)),
            Col::List { offsets, child, .. } => offsets.resize(offsets.len() + n, child.len() as i32),
        }
        self.valid().append_n(n, false);
    }

    /// Nulls up to `rows` values: top-level columns are filled only when a record has a
    /// value for them (or at the end), so a record costs nothing for the columns of other
    /// kinds and a run of records without the column costs one call.
    #[inline]
    fn fill_to(&mut self, rows: usize) {
        let len = self.len();
        if len < rows {
            self.append_nulls(rows - len);
        }
    }

    /// Drops everything after the first `len` values (a record that did not fit). Children
    /// are cut too even where this column itself holds only `len` values: a record can fail
    /// inside a list or struct, after some of its items were appended.
    fn truncate(&mut self, len: usize) {
        match self {
            Col::Bool { values, .. } => values.truncate(len),
            Col::I64 { values, .. } => values.truncate(len),
            Col::F64 { values, .. } => values.truncate(len),
            Col::Str { offsets, data, .. } => {
                offsets.truncate(len + 1);
                data.truncate(offsets[len] as usize);
            }
            Col::Struct { children, .. } => children.iter_mut().for_each(|c| c.truncate(len)),
            Col::List { offsets, child, .. } => {
                offsets.truncate(len + 1);
                child.truncate(offsets[len] as usize);
            }
        }
        self.valid().truncate(len);
    }

    /// The values so far as an array; the builder starts empty again.
    fn finish(&mut self) -> Result<ArrayRef, String> {
        let err = |e: arrow_schema::ArrowError| e.to_string();
        Ok(match self {
            Col::Bool { values, valid } => Arc::new(BooleanArray::new(values.finish(), nulls(valid))),
            Col::I64 { values, valid } => Arc::new(Int64Array::new(ScalarBuffer::from(refill(values)), nulls(valid))),
            Col::F64 { values, valid } => Arc::new(Float64Array::new(ScalarBuffer::from(refill(values)), nulls(valid))),
            Col::Str { offsets, data, valid } => {
                if data.len() > i32::MAX as usize {
                    return Err("string data of one batch exceeds 2 GiB".into());
                }
                let offsets = OffsetBuffer::new(ScalarBuffer::from(refill_offsets(offsets)));
                let data = refill(data);
                // SAFETY: every appended value is valid UTF-8 (a `&str` from serde, or the
                // unescaped text of a record the direct pass checked whole) and offsets only
                // ever mark their boundaries.
                Arc::new(unsafe { StringArray::new_unchecked(offsets, data.into(), nulls(valid)) })
            }
            Col::Struct { fields, children, valid } => {
                let arrays = children.iter_mut().map(Col::finish).collect::<Result<Vec<_>, _>>()?;
                let n = valid.len();
                let nulls = nulls(valid);
                if fields.is_empty() {
                    Arc::new(StructArray::new_empty_fields(n, nulls))
                } else {
                    Arc::new(StructArray::try_new(fields.clone(), arrays, nulls).map_err(err)?)
                }
            }
            Col::List { field, offsets, child, valid } => {
                if *offsets.last().unwrap_or(&0) < 0 {
                    return Err("list items of one batch exceed i32".into());
                }
                let offsets = OffsetBuffer::new(ScalarBuffer::from(refill_offsets(offsets)));
                Arc::new(ListArray::try_new(field.clone(), offsets, child.finish()?, nulls(valid)).map_err(err)?)
            }
        })
    }
}

/// Takes `v`'s items, leaving it empty with room for about as many: a flush's batches are
/// mostly the same size, so the next one neither grows its builders by doubling (copying as
/// it goes) nor hands arrays up to twice the memory they use.
fn refill<T>(v: &mut Vec<T>) -> Vec<T> {
    let n = v.len();
    std::mem::replace(v, Vec::with_capacity(n + n / 16))
}

/// [`refill`] for offsets, which start at 0.
fn refill_offsets(v: &mut Vec<i32>) -> Vec<i32> {
    let out = refill(v);
    v.push(0);
    out
}

/// Decodes records into the data columns of a schema (the root's fields that are not
/// metadata columns), one record at a time.
pub(crate) struct Decoder {
    /// For each root field: its data column, `None` for metadata columns.
    column_of: Vec<Option<usize>>,
    columns: Vec<Col>,
    data_schema: SchemaRef,
    rows: usize,
}

impl Decoder {
    /// `None` if some data column has a type this decoder does not build.
    pub(crate) fn new(root: &StructNode, data_schema: SchemaRef) -> Option<Decoder> {
        let mut column_of = Vec::with_capacity(root.fields.len());
        let mut columns = Vec::new();
        for f in &root.fields {
            if f.reserved {
                column_of.push(None);
            } else {
                column_of.push(Some(columns.len()));
                columns.push(Col::new(f)?);
            }
        }
        if columns.len() != data_schema.fields().len() {
            return None;
        }
        Some(Decoder { column_of, columns, data_schema, rows: 0 })
    }

    /// Rows decoded since the last [`Decoder::finish`].
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Checks `bytes` against `root` and, if it fits, appends it as one row. Anything but
    /// [`Outcome::Fits`] leaves the builders as they were. The hand-written [`direct`] pass
    /// takes what it can; what it declines goes through serde.
    pub(crate) fn decode(&mut self, root: &StructNode, partition_by: &[String], bytes: &[u8]) -> Outcome {
        if direct::decode(root, &self.column_of, &mut self.columns, partition_by, self.rows, bytes) {
            self.rows += 1;
            return Outcome::Fits;
        }
        self.cut();
        self.decode_serde(root, partition_by, bytes)
    }

    /// Drops what a record that did not fit appended. The direct pass fills a column up to
    /// the record's row before appending to it, so a column still shorter was not touched.
    fn cut(&mut self) {
        let rows = self.rows;
        self.columns.iter_mut().filter(|c| c.len() >= rows).for_each(|c| c.truncate(rows));
    }

    /// [`Decoder::decode`] by serde alone.
    fn decode_serde(&mut self, root: &StructNode, partition_by: &[String], bytes: &[u8]) -> Outcome {
        // serde appends to every column of the row: the columns must be aligned first.
        let rows = self.rows;
        self.columns.iter_mut().for_each(|c| c.fill_to(rows));
        let ctx = Ctx::new(partition_by);
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let res = RootSeed { root, dec: self, ctx: &ctx }.deserialize(&mut de).and_then(|()| de.end());
        let outcome = ctx.outcome(res);
        if matches!(outcome, Outcome::Fits) {
            self.rows += 1;
        } else {
            let rows = self.rows;
            self.columns.iter_mut().for_each(|c| c.truncate(rows));
        }
        outcome
    }

    /// The rows so far as a batch of the data schema; the decoder starts empty again.
    pub(crate) fn finish(&mut self) -> Result<RecordBatch, String> {
        let rows = self.rows;
        self.columns.iter_mut().for_each(|c| c.fill_to(rows));
        let arrays = self.columns.iter_mut().map(Col::finish).collect::<Result<Vec<_>, _>>()?;
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        self.rows = 0;
        RecordBatch::try_new_with_options(self.data_schema.clone(), arrays, &options).map_err(|e| e.to_string())
    }
}

struct RootSeed<'a> {
    root: &'a StructNode,
    dec: &'a mut Decoder,
    ctx: &'a Ctx<'a>,
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let Decoder { column_of, columns, .. } = self.dec;
        decode_struct(self.root, Some(column_of), columns, map, self.ctx, true)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.ctx.not_object("null")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.ctx.not_object("boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.ctx.not_object("number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.ctx.not_object("number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.ctx.not_object("number")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.ctx.not_object("string")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.ctx.not_object("array")
    }
}

/// The fields of one object into `columns` (`column_of` maps a field to its column; `None`
/// means one column per field, in order). Fields the object lacks become null.
fn decode_struct<'de, A: MapAccess<'de>>(
    s: &StructNode,
    column_of: Option<&[Option<usize>]>,
    columns: &mut [Col],
    mut map: A,
    ctx: &Ctx<'_>,
    top: bool,
) -> Result<(), A::Error> {
    let column = |i: usize| match column_of {
        Some(map) => map[i],
        None => Some(i),
    };
    let mut seen = Seen::new(s.fields.len());
    let mut hint = 0usize;
    let mut unknown: Vec<std::borrow::Cow<'de, str>> = Vec::new();
    while let Some(key) = map.next_key_seed(KeySeed)? {
        let idx = match s.fields.get(hint) {
            Some(f) if f.name == *key => Some(hint),
            _ => s.get(&key),
        };
        match idx {
            Some(i) => {
                let f = &s.fields[i];
                let Some(c) = column(i).filter(|_| !f.reserved) else {
                    return ctx.mismatch();
                };
                if !seen.insert(i) {
                    return ctx.mismatch();
                }
                hint = i + 1;
                map.next_value_seed(ValueSeed { node: f, col: &mut columns[c], ctx })?;
            }
            None => {
                let partition = top && ctx.partition_by.iter().any(|p| *p == *key);
                // The two-pass check keeps a set past 16 unknown keys; a linear scan is
                // fine for the few untyped extras a record carries.
                if !valid_name(&key) || unknown.contains(&key) {
                    return ctx.mismatch();
                }
                map.next_value_seed(UntypedSeed::new(ctx, partition))?;
                unknown.push(key);
            }
        }
    }
    for i in 0..s.fields.len() {
        if !seen.contains(i) {
            if let Some(c) = column(i) {
                columns[c].append_null();
            }
        }
    }
    Ok(())
}

/// A value of an existing column: it must fit the column's type exactly.
struct ValueSeed<'a> {
    node: &'a Node,
    col: &'a mut Col,
    ctx: &'a Ctx<'a>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if let Col::F64 { values, valid } = self.col {
            // Floats are parsed from their text (correctly rounded, as arrow-json does):
            // serde_json's default float parsing is best-effort in the last bit.
            let raw = <&RawValue>::deserialize(d)?;
            let text = raw.get();
            return match text.as_bytes().first() {
                Some(b'n') => {
                    values.push(0.0);
                    valid.append(false);
                    Ok(())
                }
                Some(b'-' | b'0'..=b'9') => match text.parse::<f64>() {
                    // Out of range: the two-pass path reports serde_json's error.
                    Ok(v) if v.is_finite() => {
                        values.push(v);
                        valid.append(true);
                        Ok(())
                    }
                    _ => self.ctx.mismatch(),
                },
                // Strings, booleans, and containers (untyped ones are rare here): the other path.
                _ => self.ctx.mismatch(),
            };
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.col.append_null();
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.col {
            Col::Bool { values, valid } => {
                values.append(v);
                valid.append(true);
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match self.col {
            Col::I64 { values, valid } => {
                values.push(v);
                valid.append(true);
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match (self.col, i64::try_from(v)) {
            (Col::I64 { values, valid }, Ok(v)) => {
                values.push(v);
                valid.append(true);
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.ctx.mismatch()
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.col {
            Col::Str { offsets, data, valid } => {
                data.extend_from_slice(v.as_bytes());
                match i32::try_from(data.len()) {
                    Ok(end) => offsets.push(end),
                    Err(_) => return self.ctx.mismatch(),
                }
                valid.append(true);
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.node.partition {
            return self.ctx.mismatch();
        }
        match (&self.node.kind, self.col) {
            (Kind::List { item, .. }, Col::List { offsets, child, valid, .. }) => {
                while seq.next_element_seed(ValueSeed { node: item, col: &mut **child, ctx: self.ctx })?.is_some() {}
                match i32::try_from(child.len()) {
                    Ok(end) => offsets.push(end),
                    Err(_) => return self.ctx.mismatch(),
                }
                valid.append(true);
                Ok(())
            }
            // An array without any typed value carries no type: null in other columns.
            (_, col) => {
                while seq.next_element_seed(UntypedSeed::new(self.ctx, false))?.is_some() {}
                col.append_null();
                Ok(())
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.node.partition {
            return self.ctx.mismatch();
        }
        match (&self.node.kind, self.col) {
            (Kind::Struct(s), Col::Struct { children, valid, .. }) => {
                decode_struct(s, None, children, map, self.ctx, false)?;
                valid.append(true);
                Ok(())
            }
            // `{}` carries no type: null in other columns (non-empty objects: slow path).
            (_, col) if map.next_key::<IgnoredAny>()?.is_none() => {
                col.append_null();
                Ok(())
            }
            _ => self.ctx.mismatch(),
        }
    }
}
