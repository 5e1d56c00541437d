//! Change events of the replication stream, written as JSON text directly: the bytes
//! serializing the event as a `serde_json::Value` gives (keys in its sorted order), without
//! building one per column and per event. Held to that construction by a property test.
//!
//! `{"after":ROW,"before":ROW,"key":KEY,"op":OP,"source":SOURCE,"transaction":{"id":XID,"lsn":LSN,"seq":SEQ},"ts_ms":TS[,"unchanged":[NAMES]]}`

use super::pgoutput::{Message, OldKind, Relation, Tuple, Value};
use super::types;

/// What a relation's events share, written once per relation description.
pub(crate) struct RelText {
    /// Column indexes in the order JSON objects list them (by name, as serde_json sorts).
    order: Vec<usize>,
    /// Each column's name as JSON text followed by `:`.
    names: Vec<Vec<u8>>,
    /// The source object's fields after its `lsn`: `"name":…,"schema":…,"snapshot":false,"table":…,"txid":`.
    source: Vec<u8>,
}

impl RelText {
    pub(crate) fn new(source_name: &str, r: &Relation) -> RelText {
        let mut order: Vec<usize> = (0..r.columns.len()).collect();
        order.sort_by(|&a, &b| r.columns[a].name.cmp(&r.columns[b].name));
        let names = r
            .columns
            .iter()
            .map(|c| {
                let mut b = Vec::with_capacity(c.name.len() + 3);
                types::write_str(&c.name, &mut b);
                b.push(b':');
                b
            })
            .collect();
        let mut source = b",\"name\":".to_vec();
        types::write_str(source_name, &mut source);
        source.extend_from_slice(b",\"schema\":");
        types::write_str(&r.namespace, &mut source);
        source.extend_from_slice(b",\"snapshot\":false,\"table\":");
        types::write_str(&r.name, &mut source);
        source.extend_from_slice(b",\"txid\":");
        RelText { order, names, source }
    }
}

/// What a transaction's events share.
pub(crate) struct TxnText {
    xid: Vec<u8>,
    /// `"<commit LSN>"` as JSON.
    lsn: Vec<u8>,
    /// `{"commit_time":…,"connector":"postgres","db":…,"lsn":…`: the source object up to
    /// the relation's part.
    source: Vec<u8>,
}

impl TxnText {
    pub(crate) fn new(xid: u32, lsn: &str, commit_time: &str, database: &str) -> TxnText {
        let mut l = Vec::with_capacity(lsn.len() + 2);
        types::write_str(lsn, &mut l);
        let mut source = b"{\"commit_time\":".to_vec();
        types::write_str(commit_time, &mut source);
        source.extend_from_slice(b",\"connector\":\"postgres\",\"db\":");
        types::write_str(database, &mut source);
        source.extend_from_slice(b",\"lsn\":");
        source.extend_from_slice(&l);
        TxnText { xid: itoa::Buffer::new().format(xid).as_bytes().to_vec(), lsn: l, source }
    }
}

/// One change event: its table, key (the JSON text of the key object; `None` for a
/// truncate or a table without a key), sequence number in the transaction, and text.
pub(crate) struct Change {
    pub oid: u32,
    pub key: Option<String>,
    pub seq: u64,
    pub event: Vec<u8>,
}

/// A relation with its text.
pub(crate) type Rel<'a> = (&'a Relation, &'a RelText);

/// The change events of one message: one per captured table it touches (`captured` says
/// which), numbered from `*seq` on.
pub(crate) fn events<'a>(
    rel: impl Fn(u32) -> Option<Rel<'a>>,
    captured: impl Fn(&Relation) -> bool,
    m: &Message,
    txn: &TxnText,
    seq: &mut u64,
    ts_ms: i64,
) -> Result<Vec<Change>, u32> {
    let get = |oid: u32| rel(oid).ok_or(oid);
    let mut out = Vec::new();
    let mut push = |(r, text): Rel, op: &str, before: Option<(&Tuple, bool)>, after: Option<&Tuple>, key: Option<&Tuple>| {
        let mut e = Vec::with_capacity(256);
        e.extend_from_slice(b"{\"after\":");
        let mut unchanged: Vec<&str> = Vec::new();
        match after {
            Some(t) => row(r, text, t, Cols::All, &mut e, Some(&mut unchanged)),
            None => e.extend_from_slice(b"null"),
        }
        e.extend_from_slice(b",\"before\":");
        match before {
            Some((t, only_key)) => row(r, text, t, if only_key { Cols::Key } else { Cols::All }, &mut e, None),
            None => e.extend_from_slice(b"null"),
        }
        e.extend_from_slice(b",\"key\":");
        let key = key.filter(|_| r.columns.iter().any(|c| c.key)).map(|t| {
            let start = e.len();
            row(r, text, t, Cols::KeyObject, &mut e, None);
            // The key's text as the snapshot writes it (DBLog reconciliation compares them).
            String::from_utf8(e[start..].to_vec()).expect("JSON text is UTF-8")
        });
        if key.is_none() {
            e.extend_from_slice(b"null");
        }
        e.extend_from_slice(b",\"op\":\"");
        e.extend_from_slice(op.as_bytes());
        e.extend_from_slice(b"\",\"source\":");
        e.extend_from_slice(&txn.source);
        e.extend_from_slice(&text.source);
        e.extend_from_slice(&txn.xid);
        e.extend_from_slice(b"},\"transaction\":{\"id\":");
        e.extend_from_slice(&txn.xid);
        e.extend_from_slice(b",\"lsn\":");
        e.extend_from_slice(&txn.lsn);
        e.extend_from_slice(b",\"seq\":");
        e.extend_from_slice(itoa::Buffer::new().format(*seq).as_bytes());
        e.extend_from_slice(b"},\"ts_ms\":");
        e.extend_from_slice(itoa::Buffer::new().format(ts_ms).as_bytes());
        if !unchanged.is_empty() {
            e.extend_from_slice(b",\"unchanged\":[");
            for (i, n) in unchanged.iter().enumerate() {
                if i > 0 {
                    e.push(b',');
                }
                types::write_str(n, &mut e);
            }
            e.push(b']');
        }
        e.push(b'}');
        out.push(Change { oid: r.oid, key, seq: *seq, event: e });
        *seq += 1;
    };
    match m {
        Message::Insert { relation, new } => {
            let r = get(*relation)?;
            if captured(r.0) {
                push(r, "insert", None, Some(new), Some(new));
            }
        }
        Message::Update { relation, old, new } => {
            let r = get(*relation)?;
            if captured(r.0) {
                // (A key value not sent again, TOASTed and unchanged, has not moved.)
                let moved = |old: &Tuple| {
                    r.0.columns.iter().enumerate().any(|(i, c)| c.key && !matches!(new.get(i), Some(Value::UnchangedToast)) && old.get(i) != new.get(i))
                };
                match old {
                    // The row moved to another key: a delete of the old key and an insert of
                    // the new, as other CDC tools do, so that each key's events stay in its
                    // partition and the mirror drops the old row.
                    Some((kind, t)) if moved(t) => {
                        push(r, "delete", Some((t, *kind == OldKind::Key)), None, Some(t));
                        push(r, "insert", None, Some(new), Some(new));
                    }
                    _ => push(r, "update", old.as_ref().map(|(kind, t)| (t, *kind == OldKind::Key)), Some(new), Some(new)),
                }
            }
        }
        Message::Delete { relation, old: (kind, t) } => {
            let r = get(*relation)?;
            if captured(r.0) {
                push(r, "delete", Some((t, *kind == OldKind::Key)), None, Some(t));
            }
        }
        Message::Truncate { relations, .. } => {
            for oid in relations {
                let r = get(*oid)?;
                if captured(r.0) {
                    push(r, "truncate", None, None, None);
                }
            }
        }
        Message::Relation(_) | Message::Type { .. } | Message::Origin { .. } => {}
    }
    Ok(out)
}

/// Which columns of a tuple an object holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cols {
    /// Every column the tuple has a value for.
    All,
    /// The key columns the tuple has a value for (an old row sent as its key).
    Key,
    /// Every key column, null where the tuple has no value (the event's `key`).
    KeyObject,
}

/// A tuple as a JSON object of its columns `cols`, leaving out unchanged TOASTed values,
/// whose names go to `unchanged` (in column order).
fn row<'r>(r: &'r Relation, text: &RelText, t: &Tuple, cols: Cols, out: &mut Vec<u8>, mut unchanged: Option<&mut Vec<&'r str>>) {
    if let Some(u) = unchanged.as_deref_mut() {
        for (c, v) in r.columns.iter().zip(t) {
            if matches!(v, Value::UnchangedToast) {
                u.push(&c.name);
            }
        }
    }
    out.push(b'{');
    let mut first = true;
    for &i in &text.order {
        let c = &r.columns[i];
        if cols != Cols::All && !c.key {
            continue;
        }
        let v = match t.get(i) {
            Some(Value::UnchangedToast) | None if cols == Cols::KeyObject => &Value::Null,
            Some(Value::UnchangedToast) | None => continue,
            Some(v) => v,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&text.names[i]);
        match v {
            Value::Null | Value::UnchangedToast => out.extend_from_slice(b"null"),
            Value::Text(s) => types::write_json(c.type_oid, s, out),
            Value::Binary(b) => {
                out.extend_from_slice(b"\"\\\\x");
                for x in b {
                    out.extend_from_slice(format!("{x:02x}").as_bytes());
                }
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::Column;
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value as Json};

    /// The events as `serde_json::Value`s, as the source built them before they were written
    /// as text: the reference the text must equal byte for byte.
    fn reference(r: &Relation, m: &Message, xid: u32, lsn: &str, commit: &str, db: &str, name: &str, seq: &mut u64, ts: i64) -> Vec<(Option<String>, String)> {
        fn obj(r: &Relation, t: &Tuple) -> (Json, Vec<String>) {
            let mut o = Map::new();
            let mut unchanged = Vec::new();
            for (c, v) in r.columns.iter().zip(t) {
                match v {
                    Value::Null => {
                        o.insert(c.name.clone(), Json::Null);
                    }
                    Value::UnchangedToast => unchanged.push(c.name.clone()),
                    Value::Text(s) => {
                        o.insert(c.name.clone(), types::to_json(c.type_oid, s));
                    }
                    Value::Binary(b) => {
                        o.insert(c.name.clone(), Json::String(b.iter().fold(String::from("\\x"), |mut s, x| {
                            s.push_str(&format!("{x:02x}"));
                            s
                        })));
                    }
                }
            }
            (Json::Object(o), unchanged)
        }
        let old_obj = |kind: OldKind, t: &Tuple| {
            let (mut o, _) = obj(r, t);
            if kind == OldKind::Key {
                if let Json::Object(m) = &mut o {
                    m.retain(|k, _| r.columns.iter().any(|c| c.key && &c.name == k));
                }
            }
            o
        };
        let key_of = |row: &Json| {
            let mut k = Map::new();
            for c in r.columns.iter().filter(|c| c.key) {
                k.insert(c.name.clone(), row.get(&c.name).cloned().unwrap_or(Json::Null));
            }
            if k.is_empty() {
                Json::Null
            } else {
                Json::Object(k)
            }
        };
        let (op, before, after, unchanged, key) = match m {
            Message::Insert { new, .. } => {
                let (a, u) = obj(r, new);
                let k = key_of(&a);
                ("insert", Json::Null, a, u, k)
            }
            Message::Update { old, new, .. } => {
                let (a, u) = obj(r, new);
                let k = key_of(&a);
                ("update", old.as_ref().map_or(Json::Null, |(kind, t)| old_obj(*kind, t)), a, u, k)
            }
            Message::Delete { old: (kind, t), .. } => {
                let b = old_obj(*kind, t);
                let k = key_of(&b);
                ("delete", b, Json::Null, Vec::new(), k)
            }
            _ => ("truncate", Json::Null, Json::Null, Vec::new(), Json::Null),
        };
        let mut e = Map::new();
        e.insert("op".into(), op.into());
        e.insert("before".into(), before);
        e.insert("after".into(), after);
        let key_text = (!key.is_null()).then(|| key.to_string());
        e.insert("key".into(), key);
        if !unchanged.is_empty() {
            e.insert("unchanged".into(), unchanged.into());
        }
        e.insert(
            "source".into(),
            json!({"connector": "postgres", "name": name, "db": db, "schema": r.namespace, "table": r.name,
                   "lsn": lsn, "txid": xid, "commit_time": commit, "snapshot": false}),
        );
        e.insert("transaction".into(), json!({"id": xid, "lsn": lsn, "seq": *seq}));
        e.insert("ts_ms".into(), ts.into());
        *seq += 1;
        vec![(key_text, Json::Object(e).to_string())]
    }

    fn value() -> impl Strategy<Value = (u32, Value)> {
        // (type, value): texts each type's output function could give, and some it could not.
        let typed = prop_oneof![
            (Just(types::oid::INT4), prop_oneof![any::<i32>().prop_map(|n| n.to_string()), Just("x".to_string())]),
            (Just(types::oid::INT8), any::<i64>().prop_map(|n| n.to_string())),
            (Just(types::oid::BOOL), prop_oneof![Just("t".to_string()), Just("f".to_string())]),
            (Just(types::oid::TEXT), any::<String>()),
            (Just(types::oid::NUMERIC), Just("12345678901234.5678".to_string())),
            (Just(types::oid::FLOAT8), prop_oneof![Just("0.5".to_string()), Just("NaN".to_string()), Just("-1e300".to_string())]),
            (Just(types::oid::JSONB), Just("{\"b\": [1, 2], \"a\": null}".to_string())),
            (Just(types::oid::TIMESTAMPTZ), Just("2026-01-05 10:00:00.123456+02".to_string())),
            (Just(1007u32), Just("{1,NULL,3}".to_string())),
        ];
        prop_oneof![
            6 => typed.prop_map(|(t, s)| (t, Value::Text(s))),
            1 => Just((types::oid::TEXT, Value::Null)),
            1 => Just((types::oid::TEXT, Value::UnchangedToast)),
            1 => proptest::collection::vec(any::<u8>(), 0..4).prop_map(|b| (types::oid::BYTEA, Value::Binary(b))),
        ]
    }

    fn case() -> impl Strategy<Value = (Relation, Message)> {
        proptest::collection::vec(("[a-zA-Z_\"é ]{1,6}", any::<bool>(), value()), 1..7).prop_flat_map(|cols| {
            let mut seen = std::collections::HashSet::new();
            let cols: Vec<_> = cols.into_iter().filter(|(n, _, _)| seen.insert(n.clone())).collect();
            let r = Relation {
                oid: 7,
                namespace: "public".into(),
                name: "t \"q\"".into(),
                replica_identity: b'd',
                columns: cols.iter().map(|(n, k, (t, _))| Column { key: *k, name: n.clone(), type_oid: *t, type_modifier: -1 }).collect(),
            };
            let tuple: Tuple = cols.iter().map(|(_, _, (_, v))| v.clone()).collect();
            let m = prop_oneof![
                Just(Message::Insert { relation: 7, new: tuple.clone() }),
                Just(Message::Update { relation: 7, old: None, new: tuple.clone() }),
                Just(Message::Update { relation: 7, old: Some((OldKind::Key, tuple.clone())), new: tuple.clone() }),
                Just(Message::Update { relation: 7, old: Some((OldKind::Full, tuple.clone())), new: tuple.clone() }),
                Just(Message::Delete { relation: 7, old: (OldKind::Key, tuple.clone()) }),
                Just(Message::Delete { relation: 7, old: (OldKind::Full, tuple.clone()) }),
                Just(Message::Truncate { relations: vec![7], cascade: false, restart_identity: false }),
            ];
            (Just(r), m)
        })
    }

    proptest! {
        #[test]
        fn events_are_the_values_text((r, m) in case(), xid in any::<u32>(), seq in 0u64..1_000_000) {
            let (lsn, commit, db, name) = ("0/16B3F00", "2026-01-05T08:00:00.123000Z", "shop \"db\"", "src");
            let text = RelText::new(name, &r);
            let txn = TxnText::new(xid, lsn, commit, db);
            let (mut s1, mut s2) = (seq, seq);
            let got = events(|oid| (oid == 7).then_some((&r, &text)), |_| true, &m, &txn, &mut s1, 1234).unwrap();
            let want = reference(&r, &m, xid, lsn, commit, db, name, &mut s2, 1234);
            let got: Vec<(Option<String>, String)> = got.into_iter().map(|c| (c.key, String::from_utf8(c.event).unwrap())).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(s1, s2);
        }
    }

    #[test]
    fn an_update_that_moves_a_row_to_another_key_is_a_delete_and_an_insert() {
        let col = |name: &str, key| Column { key, name: name.into(), type_oid: types::oid::INT4, type_modifier: -1 };
        let r = Relation { oid: 7, namespace: "public".into(), name: "t".into(), replica_identity: b'd', columns: vec![col("id", true), col("v", false)] };
        let text = RelText::new("src", &r);
        let txn = TxnText::new(1, "0/1", "2026-01-05T08:00:00.000000Z", "db");
        let v = |s: &str| Value::Text(s.into());
        let update = |old: Tuple, new: Tuple| {
            let m = Message::Update { relation: 7, old: Some((OldKind::Key, old)), new };
            let changes = events(|oid| (oid == 7).then_some((&r, &text)), |_| true, &m, &txn, &mut 0, 0).unwrap();
            changes.into_iter().map(|c| {
                let e: Json = serde_json::from_slice(&c.event).unwrap();
                (e["op"].as_str().unwrap().to_string(), c.key.unwrap(), c.seq)
            }).collect::<Vec<_>>()
        };
        let moved = update(vec![v("1"), Value::Null], vec![v("2"), v("9")]);
        assert_eq!(moved, [("delete".into(), r#"{"id":1}"#.into(), 0), ("insert".into(), r#"{"id":2}"#.into(), 1)]);
        let kept = update(vec![v("1"), Value::Null], vec![v("1"), v("9")]);
        assert_eq!(kept, [("update".into(), r#"{"id":1}"#.into(), 0)]);
    }

    #[test]
    fn an_unknown_relation_and_an_uncaptured_one() {
        let r = Relation { oid: 7, namespace: "public".into(), name: "t".into(), replica_identity: b'd', columns: Vec::new() };
        let text = RelText::new("src", &r);
        let txn = TxnText::new(1, "0/1", "2026-01-05T08:00:00.000000Z", "db");
        let m = Message::Insert { relation: 8, new: Vec::new() };
        assert_eq!(events(|oid| (oid == 7).then_some((&r, &text)), |_| true, &m, &txn, &mut 0, 0).err(), Some(8));
        let m = Message::Insert { relation: 7, new: Vec::new() };
        assert!(events(|oid| (oid == 7).then_some((&r, &text)), |_| false, &m, &txn, &mut 0, 0).unwrap().is_empty());
    }
}
