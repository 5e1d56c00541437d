//! The working schema: a mutable tree mirroring the Arrow schema, with what the fast
//! validator and the evolution (merge) step need precomputed: a name index per struct,
//! required (non-nullable) fields, and flags for partition and metadata columns.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Fields};

/// Integer column types JSON integers can be stored in exactly (when in range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntType {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
}

impl IntType {
    fn range(self) -> (i128, i128) {
        match self {
            IntType::I8 => (i8::MIN as i128, i8::MAX as i128),
            IntType::I16 => (i16::MIN as i128, i16::MAX as i128),
            IntType::I32 => (i32::MIN as i128, i32::MAX as i128),
            IntType::I64 => (i64::MIN as i128, i64::MAX as i128),
            IntType::U8 => (0, u8::MAX as i128),
            IntType::U16 => (0, u16::MAX as i128),
            IntType::U32 => (0, u32::MAX as i128),
            IntType::U64 => (0, u64::MAX as i128),
        }
    }

    #[inline]
    pub(crate) fn fits_i64(self, v: i64) -> bool {
        if self == IntType::I64 {
            return true;
        }
        let (lo, hi) = self.range();
        (lo..=hi).contains(&(v as i128))
    }

    #[inline]
    pub(crate) fn fits_u64(self, v: u64) -> bool {
        let (lo, hi) = self.range();
        (lo..=hi).contains(&(v as i128))
    }

    fn data_type(self) -> DataType {
        match self {
            IntType::I8 => DataType::Int8,
            IntType::I16 => DataType::Int16,
            IntType::I32 => DataType::Int32,
            IntType::I64 => DataType::Int64,
            IntType::U8 => DataType::UInt8,
            IntType::U16 => DataType::UInt16,
            IntType::U32 => DataType::UInt32,
            IntType::U64 => DataType::UInt64,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Bool,
    Int(IntType),
    Float64,
    /// Utf8, LargeUtf8 or Utf8View (kept as the table has it).
    Str(DataType),
    Struct(StructNode),
    /// List or LargeList.
    List {
        large: bool,
        item: Box<Node>,
    },
    /// A table column type JSON values are not converted into (Timestamp, Decimal,
    /// Float32, Map, Binary, ...): only null / absent is accepted there, so that no
    /// value is ever silently parsed or cast.
    Other(DataType),
}

impl Kind {
    pub(crate) fn data_type(&self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int(t) => t.data_type(),
            Kind::Float64 => DataType::Float64,
            Kind::Str(dt) => dt.clone(),
            Kind::Struct(s) => DataType::Struct(s.to_fields()),
            Kind::List { large: false, item } => DataType::List(Arc::new(item.to_field())),
            Kind::List { large: true, item } => DataType::LargeList(Arc::new(item.to_field())),
            Kind::Other(dt) => dt.clone(),
        }
    }

    fn from_data_type(dt: &DataType) -> Kind {
        match dt {
            DataType::Boolean => Kind::Bool,
            DataType::Int8 => Kind::Int(IntType::I8),
            DataType::Int16 => Kind::Int(IntType::I16),
            DataType::Int32 => Kind::Int(IntType::I32),
            DataType::Int64 => Kind::Int(IntType::I64),
            DataType::UInt8 => Kind::Int(IntType::U8),
            DataType::UInt16 => Kind::Int(IntType::U16),
            DataType::UInt32 => Kind::Int(IntType::U32),
            DataType::UInt64 => Kind::Int(IntType::U64),
            DataType::Float64 => Kind::Float64,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::Str(dt.clone()),
            DataType::Struct(fields) => Kind::Struct(StructNode::from_fields(fields)),
            DataType::List(f) => Kind::List {
                large: false,
                item: Box::new(Node::from_field(f)),
            },
            DataType::LargeList(f) => Kind::List {
                large: true,
                item: Box::new(Node::from_field(f)),
            },
            other => Kind::Other(other.clone()),
        }
    }
}

/// Short, readable type names for reject reasons: `Int64`, `List(Struct)`, ...
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Struct(_) => f.write_str("Struct"),
            Kind::List { large, item } => {
                let l = if *large { "LargeList" } else { "List" };
                write!(f, "{l}({})", item.kind)
            }
            other => write!(f, "{}", other.data_type()),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub name: String,
    pub kind: Kind,
    pub nullable: bool,
    pub metadata: HashMap<String, String>,
    /// The node comes from the table schema (as opposed to inferred in this call).
    pub existing: bool,
    /// Top-level column named in `partition_by`.
    pub partition: bool,
    /// Top-level metadata column (`_partition`, `_offset`, date column): records may not
    /// carry a field of that name.
    pub reserved: bool,
}

impl Node {
    pub(crate) fn new(name: impl Into<String>, kind: Kind) -> Node {
        Node {
            name: name.into(),
            kind,
            nullable: true,
            metadata: HashMap::new(),
            existing: false,
            partition: false,
            reserved: false,
        }
    }

    pub(crate) fn from_field(f: &Field) -> Node {
        Node {
            name: f.name().clone(),
            kind: Kind::from_data_type(f.data_type()),
            nullable: f.is_nullable(),
            metadata: f.metadata().clone(),
            existing: true,
            partition: false,
            reserved: false,
        }
    }

    pub(crate) fn to_field(&self) -> Field {
        Field::new(self.name.clone(), self.kind.data_type(), self.nullable)
            .with_metadata(self.metadata.clone())
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct StructNode {
    pub fields: Vec<Node>,
    /// Field name -> index (foldhash: SipHash showed in the landing profile, ~1% of it).
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Indexes of non-nullable, non-reserved fields: a present object must give them a value.
    pub required: Vec<usize>,
}

impl StructNode {
    /// Marks every node (nested ones too) as inferred rather than from the table: a schema
    /// inferred from earlier records of the same flush, converted further in parallel.
    pub(crate) fn mark_inferred(&mut self) {
        fn mark(node: &mut Node) {
            node.existing = false;
            match &mut node.kind {
                Kind::Struct(s) => s.mark_inferred(),
                Kind::List { item, .. } => mark(item),
                _ => {}
            }
        }
        self.fields.iter_mut().for_each(mark);
    }

    pub(crate) fn from_fields(fields: &Fields) -> StructNode {
        let mut s = StructNode {
            fields: fields.iter().map(|f| Node::from_field(f)).collect(),
            ..Default::default()
        };
        s.reindex();
        s
    }

    pub(crate) fn reindex(&mut self) {
        self.index.clear();
        self.required.clear();
        for (i, f) in self.fields.iter().enumerate() {
            // On duplicate names (only possible in a malformed table schema) the first wins.
            self.index.entry(f.name.clone()).or_insert(i);
            if !f.nullable && !f.reserved {
                self.required.push(i);
            }
        }
    }

    #[inline]
    pub(crate) fn get(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// [`StructNode::get`] by the name's bytes: a scan of the names for structs of up to 32
    /// fields (cheaper than UTF-8 checking and hashing the key), the index beyond.
    #[inline]
    pub(crate) fn find(&self, name: &[u8]) -> Option<usize> {
        if self.fields.len() <= 32 {
            self.fields.iter().position(|f| same(f.name.as_bytes(), name))
        } else {
            self.get(std::str::from_utf8(name).ok()?)
        }
    }

    /// Index where a new data column goes: before the first metadata column, if any.
    pub(crate) fn insert_position(&self) -> usize {
        self.fields
            .iter()
            .position(|f| f.reserved)
            .unwrap_or(self.fields.len())
    }

    /// Inserts a new field at `pos`; only the fields after it (at the top level: the few
    /// metadata columns) are re-indexed.
    pub(crate) fn insert(&mut self, pos: usize, node: Node) {
        let pos = pos.min(self.fields.len());
        let required = !node.nullable && !node.reserved;
        self.fields.insert(pos, node);
        for r in &mut self.required {
            if *r >= pos {
                *r += 1;
            }
        }
        if required {
            self.required.push(pos);
            self.required.sort_unstable();
        }
        for i in pos..self.fields.len() {
            let name = &self.fields[i].name;
            match self.index.get_mut(name.as_str()) {
                // Keep the first of duplicate names (malformed table schema).
                Some(j) if *j < pos => {}
                Some(j) => *j = i,
                None => {
                    self.index.insert(name.clone(), i);
                }
            }
        }
    }

    pub(crate) fn to_fields(&self) -> Fields {
        self.fields
            .iter()
            .map(|n| Arc::new(n.to_field()) as FieldRef)
            .collect()
    }
}

/// `a == b` without a call to memcmp for short slices (field names, compared once or more
/// per key): overlapping word loads from both ends.
#[inline]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}
