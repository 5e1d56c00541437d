//! Decoder of PostgreSQL's `pgoutput` logical replication messages, protocol version 1
//! ("Logical Replication Message Formats" in the PostgreSQL manual).
//!
//! Hand-written because the replication client (`pgwire-replication`) hands these messages
//! over as bytes: it decodes only Begin, Commit and Message itself. Every read is bounds
//! checked; malformed input is an error naming what was being read, never a panic.

use std::fmt;

/// One decoded message (Begin, Commit and Message come decoded from the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    Type { oid: u32, namespace: String, name: String },
    Insert { relation: u32, new: Tuple },
    /// `old` is the replica identity key (`K`) or the whole old row (`O`, REPLICA IDENTITY
    /// FULL) when the server sends one.
    Update { relation: u32, old: Option<(OldKind, Tuple)>, new: Tuple },
    Delete { relation: u32, old: (OldKind, Tuple) },
    Truncate { relations: Vec<u32>, cascade: bool, restart_identity: bool },
    Origin { lsn: u64, name: String },
}

/// Which old tuple an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity (key) columns; the others are null.
    Key,
    /// The whole old row.
    Full,
}

/// A table as the server describes it before its first change, and again after its schema
/// changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change: the server does not send it.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(String),
    /// The value in the type's binary format (only with `binary 'true'`, not requested).
    Binary(Vec<u8>),
}

pub type Tuple = Vec<Value>;

/// What went wrong decoding a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgoutput: {}", self.message)
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(message: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError { message: message.into() })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return err(format!("message ends inside {what} (at byte {}, {} more needed)", self.pos, n));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(n) = rest.iter().position(|b| *b == 0) else {
            return err(format!("{what} is not NUL-terminated"));
        };
        let s = std::str::from_utf8(&rest[..n]).map_err(|e| DecodeError { message: format!("{what} is not UTF-8: {e}") })?;
        self.pos += n + 1;
        Ok(s.to_string())
    }

    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.i16(what)?;
        usize::try_from(n).or_else(|_| err(format!("negative {what} {n}")))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count("column count")?;
        let mut out = Vec::with_capacity(n.min(self.buf.len()));
        for i in 0..n {
            let v = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len).or_else(|_| err(format!("column {i}: negative length {len}")))?;
                    let data = self.take(len, "a column value")?;
                    if kind == b't' {
                        let s = std::str::from_utf8(data).map_err(|e| DecodeError { message: format!("column {i}: text value is not UTF-8: {e}") })?;
                        Value::Text(s.to_string())
                    } else {
                        Value::Binary(data.to_vec())
                    }
                }
                k => return err(format!("column {i}: unknown kind {:?}", k as char)),
            };
            out.push(v);
        }
        Ok(out)
    }

    fn end(&self, what: &str) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return err(format!("{} bytes left after {what}", self.buf.len() - self.pos));
        }
        Ok(())
    }
}

/// Decodes one message (the payload of an XLogData frame). Messages the client decodes
/// itself (Begin, Commit, logical decoding Message) are not expected here: `Ok(None)` for
/// those and for kinds of later protocol versions, which are never requested.
pub fn decode(buf: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("message tag")?;
    let m = match tag {
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.count("column count")?;
            let mut columns = Vec::with_capacity(n.min(buf.len()));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.string("column name")?;
                let type_oid = r.u32("column type")?;
                let type_modifier = r.i32("column type modifier")?;
                columns.push(Column { key: flags & 1 == 1, name, type_oid, type_modifier });
            }
            Message::Relation(Relation {
                // pg_catalog is sent as an empty namespace.
                namespace: if namespace.is_empty() { "pg_catalog".into() } else { namespace },
                oid,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => {
            let oid = r.u32("type oid")?;
            let namespace = r.string("type namespace")?;
            let name = r.string("type name")?;
            Message::Type { oid, namespace, name }
        }
        b'I' => {
            let relation = r.u32("relation oid")?;
            if r.u8("tuple marker")? != b'N' {
                return err("insert without a new tuple");
            }
            Message::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' { OldKind::Key } else { OldKind::Full };
                old = Some((kind, r.tuple()?));
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return err(format!("update: unexpected tuple marker {:?}", marker as char));
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let kind = match r.u8("tuple marker")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                m => return err(format!("delete: unexpected tuple marker {:?}", m as char)),
            };
            Message::Delete { relation, old: (kind, r.tuple()?) }
        }
        b'T' => {
            let n = r.i32("relation count")?;
            let n = usize::try_from(n).or_else(|_| err(format!("negative relation count {n}")))?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.min(buf.len()));
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate { relations, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'O' => {
            let lsn = r.u64("origin lsn")?;
            let name = r.string("origin name")?;
            Message::Origin { lsn, name }
        }
        b'B' | b'C' | b'M' | b'S' | b'E' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p' => return Ok(None),
        t => return err(format!("unknown message tag {:?}", t as char)),
    };
    r.end("the message")?;
    Ok(Some(m))
}

/// Encodes a message as the server would: for tests of the decoder and of what consumes it.
pub fn encode(m: &Message) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for v in t {
            match v {
                Value::Null => out.push(b'n'),
                Value::UnchangedToast => out.push(b'u'),
                Value::Text(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Value::Binary(b) => {
                    out.push(b'b');
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }
    let mut out = Vec::new();
    match m {
        Message::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.oid.to_be_bytes());
            string(&mut out, if r.namespace == "pg_catalog" { "" } else { &r.namespace });
            string(&mut out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
            for c in &r.columns {
                out.push(c.key as u8);
                string(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type { oid, namespace, name } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            string(&mut out, namespace);
            string(&mut out, name);
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Update { relation, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            if let Some((kind, t)) = old {
                out.push(if *kind == OldKind::Key { b'K' } else { b'O' });
                tuple(&mut out, t);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Delete { relation, old: (kind, t) } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(if *kind == OldKind::Key { b'K' } else { b'O' });
            tuple(&mut out, t);
        }
        Message::Truncate { relations, cascade, restart_identity } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
            out.push(*cascade as u8 | (*restart_identity as u8) << 1);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::Origin { lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&lsn.to_be_bytes());
            string(&mut out, name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::UnchangedToast),
            ".{0,20}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Binary),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(value(), 0..6)
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_ ]{0,12}"
    }

    fn message() -> impl Strategy<Value = Message> {
        let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(|(key, name, type_oid, type_modifier)| Column { key, name, type_oid, type_modifier });
        let old = prop_oneof![Just(OldKind::Key), Just(OldKind::Full)];
        prop_oneof![
            (any::<u32>(), name(), name(), prop_oneof![Just(b'd'), Just(b'f'), Just(b'n'), Just(b'i')], proptest::collection::vec(column, 0..5))
                .prop_map(|(oid, namespace, name, replica_identity, columns)| Message::Relation(Relation {
                    oid,
                    namespace: if namespace.is_empty() { "pg_catalog".into() } else { namespace },
                    name,
                    replica_identity,
                    columns
                })),
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type { oid, namespace, name }),
            (any::<u32>(), tuple()).prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), proptest::option::of((old.clone(), tuple())), tuple()).prop_map(|(relation, old, new)| Message::Update { relation, old, new }),
            (any::<u32>(), old, tuple()).prop_map(|(relation, kind, t)| Message::Delete { relation, old: (kind, t) }),
            (proptest::collection::vec(any::<u32>(), 0..4), any::<bool>(), any::<bool>())
                .prop_map(|(relations, cascade, restart_identity)| Message::Truncate { relations, cascade, restart_identity }),
            (any::<u64>(), name()).prop_map(|(lsn, name)| Message::Origin { lsn, name }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in message()) {
            prop_assert_eq!(decode(&encode(&m)).unwrap(), Some(m));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
        }

        #[test]
        fn every_truncation_of_a_message_is_an_error(m in message()) {
            let b = encode(&m);
            for n in 0..b.len() {
                prop_assert!(decode(&b[..n]).is_err(), "prefix of {} bytes decoded", n);
            }
        }
    }

    #[test]
    fn errors_name_what_was_read() {
        let e = decode(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0, 0, 0, 9, b'a']).unwrap_err();
        assert!(e.to_string().contains("inside a column value"), "{e}");
        let e = decode(&[b'Z']).unwrap_err();
        assert!(e.to_string().contains("unknown message tag 'Z'"), "{e}");
        assert_eq!(decode(&[b'B', 1, 2]).unwrap(), None);
    }
}
