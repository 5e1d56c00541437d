//! Sources and sinks, one module each.
//!
//! - [`http`]: the HTTP ingest source's request handling (body decoding, record
//!   parsing, key and event-time extraction). The axum wiring lives in the binary.
//! - [`postgres_cdc`]: change data capture from PostgreSQL (logical replication, pgoutput).
//! - [`mysql_cdc`]: change data capture from MySQL and MariaDB (the binlog in ROW format).
//! - [`postgres_sink`]: the PostgreSQL sink of pipelines (upsert by key, delete on tombstones).
//! - [`redis_sink`]: the Redis sink of pipelines (latest value per key, positions).
//! - [`webhook`]: the webhook sink of pipelines (records POSTed as JSON arrays).

pub mod http;
pub mod mysql_cdc;
pub mod pg_tls;
pub mod postgres_cdc;
pub mod postgres_sink;
pub mod redis_sink;
mod state_file;
pub mod webhook;

use deltalake::arrow::array::{AsArray, RecordBatch, StringArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;

/// Evaluates SQL expressions on a batch as text columns (NULL stays NULL; a field no record
/// of the batch has reads NULL, as in the steps). Sinks use it for keys and predicates.
pub(crate) fn texts(fields: &[(String, String)], b: &RecordBatch) -> anyhow::Result<Vec<StringArray>> {
    let mut reads: Vec<String> = Vec::new();
    for (_, sql) in fields {
        if let Ok(e) = sluice_pipeline::check::parse_expr(sql) {
            reads.extend(sluice_pipeline::check::referenced_fields(&e));
        }
    }
    let b = sluice_pipeline::step::with_null_fields(b.clone(), &reads);
    let map = sluice_pipeline::Map::compile(fields, &b.schema())?;
    let out = map.apply(&b)?;
    out.columns().iter().map(|c| Ok(cast(c, &DataType::Utf8)?.as_string::<i32>().clone())).collect()
}

/// Writes UTF-8 text `b` as a JSON string, the bytes `serde_json` writes for it. Text that
/// needs no escape (printable ASCII other than `"` and `\`: most values) is copied as it
/// is, without the validation and escaping pass. False, writing nothing, if `b` is not UTF-8.
pub(crate) fn write_json_str(b: &[u8], out: &mut Vec<u8>) -> bool {
    if b.iter().all(|&c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\') {
        out.reserve(b.len() + 2);
        out.push(b'"');
        out.extend_from_slice(b);
        out.push(b'"');
        return true;
    }
    match std::str::from_utf8(b) {
        Ok(s) => {
            serde_json::to_writer(out, s).expect("JSON to memory");
            true
        }
        Err(_) => false,
    }
}

/// Snapshot rows as `read` change events, written as JSON text directly: the bytes
/// serializing the event as a `serde_json::Value` gives (keys in the same order), without
/// building one. Snapshots write millions of rows; the values were most of their cost.
///
/// `{"after":ROW,"before":null,"key":KEY,"op":"read","source":SOURCE,"transaction":{"id":null,"lsn":LSN,"seq":SEQ},"ts_ms":TS}`
pub(crate) struct ReadEvents {
    /// Column indexes in the order JSON objects list their fields (serde_json sorts them).
    order: Vec<usize>,
    /// The key columns' indexes, in that order.
    key_order: Vec<usize>,
    /// Each column's name as JSON text followed by `:`.
    names: Vec<Vec<u8>>,
    /// The event around its fields (the values in `order`, the key, the sequence number),
    /// as the log stores it: a snapshot's records carry only their fields.
    template: std::sync::Arc<sluice_log::Template>,
}

impl ReadEvents {
    /// For a table's columns (`is_key` marks the primary key's), with the event's `source`
    /// object and position.
    pub(crate) fn new<'a>(columns: impl IntoIterator<Item = (&'a str, bool)>, source: &serde_json::Value, lsn: &str, ts_ms: i64) -> ReadEvents {
        let columns: Vec<(&str, bool)> = columns.into_iter().collect();
        let sorted: serde_json::Map<String, serde_json::Value> = columns.iter().enumerate().map(|(i, (n, _))| (n.to_string(), i.into())).collect();
        let order: Vec<usize> = sorted.values().filter_map(|v| v.as_u64()).map(|i| i as usize).collect();
        let key_order = order.iter().copied().filter(|&i| columns[i].1).collect();
        let names: Vec<Vec<u8>> = columns
            .iter()
            .map(|(n, _)| {
                let mut b = serde_json::to_vec(n).expect("a string as JSON");
                b.push(b':');
                b
            })
            .collect();
        let mut middle = b",\"op\":\"read\",\"source\":".to_vec();
        serde_json::to_writer(&mut middle, source).expect("JSON to memory");
        middle.extend_from_slice(b",\"transaction\":{\"id\":null,\"lsn\":");
        serde_json::to_writer(&mut middle, lsn).expect("JSON to memory");
        middle.extend_from_slice(b",\"seq\":");
        // The event's text between its fields.
        let mut pieces = Vec::with_capacity(order.len() + 3);
        let mut piece = b"{\"after\":{".to_vec();
        for (n, &i) in order.iter().enumerate() {
            if n > 0 {
                piece.push(b',');
            }
            piece.extend_from_slice(&names[i]);
            pieces.push(bytes::Bytes::from(std::mem::take(&mut piece)));
        }
        piece.extend_from_slice(b"},\"before\":null,\"key\":");
        pieces.push(bytes::Bytes::from(piece));
        pieces.push(bytes::Bytes::from(middle));
        pieces.push(bytes::Bytes::from(format!("}},\"ts_ms\":{ts_ms}}}")));
        let template = std::sync::Arc::new(sluice_log::Template::new(pieces));
        ReadEvents { order, key_order, names, template }
    }

    /// `rows` rows as keyed records, sequence numbers from `first_seq`. `value(row, i, out)`
    /// writes column `i` of row `row` as JSON. The records fill the events' template (the
    /// log stores the fields only); every record's fields go into one buffer, every key
    /// into another, and the records are slices of them: no allocation (and free) per record.
    pub(crate) fn records(&self, rows: usize, first_seq: u64, ts_ms: i64, mut value: impl FnMut(usize, usize, &mut Vec<u8>)) -> Vec<sluice_log::Record> {
        let (mut keys, mut fields) = (Vec::new(), Vec::new());
        let mut ends = Vec::with_capacity(rows);
        let mut seq = itoa::Buffer::new();
        for row in 0..rows {
            let key_start = keys.len();
            self.object(&self.key_order, &mut keys, &mut |i, out| value(row, i, out));
            for &i in &self.order {
                sluice_log::Template::field(&mut fields, |out| value(row, i, out));
            }
            sluice_log::Template::field(&mut fields, |out| out.extend_from_slice(&keys[key_start..]));
            sluice_log::Template::field(&mut fields, |out| out.extend_from_slice(seq.format(first_seq + row as u64).as_bytes()));
            ends.push((keys.len(), fields.len()));
            if row == 0 {
                // Room for all rows like the first (growing by doubling copies them again).
                fields.reserve(fields.len().saturating_mul(rows + rows / 8).min(256 << 20));
                keys.reserve(keys.len().saturating_mul(rows));
            }
        }
        let (keys, fields) = (bytes::Bytes::from(keys), bytes::Bytes::from(fields));
        let mut start = (0, 0);
        ends.into_iter()
            .map(|end| {
                let r = sluice_log::Record::templated(keys.slice(start.0..end.0), fields.slice(start.1..end.1), ts_ms, self.template.clone());
                start = end;
                r
            })
            .collect()
    }

    /// The object of columns `cols` (names and values) into `out`.
    fn object(&self, cols: &[usize], out: &mut Vec<u8>, value: &mut impl FnMut(usize, &mut Vec<u8>)) {
        out.push(b'{');
        for (n, &i) in cols.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.names[i]);
            value(i, out);
        }
        out.push(b'}');
    }
}

/// The primary key values a snapshot request names (`--key`), each as one text per key
/// column, in `columns`' order. A value is the key itself for a one-column key, or a JSON
/// object naming every key column (`{"order_id": 7, "line": 1}`), whatever the key's width
/// (a one-column key that is no such object is taken as it is).
pub(crate) fn snapshot_keys(table: &str, columns: &[&str], keys: &[String]) -> Result<Vec<Vec<String>>, String> {
    keys.iter()
        .map(|k| {
            let object = k.trim_start().starts_with('{').then(|| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(k));
            match object {
                Some(Ok(o)) => {
                    if let Some(extra) = o.keys().find(|c| !columns.contains(&c.as_str())) {
                        return Err(format!("key {k}: {extra:?} is not a primary key column of {table} ({})", columns.join(", ")));
                    }
                    columns
                        .iter()
                        .map(|c| match o.get(*c) {
                            Some(serde_json::Value::String(s)) => Ok(s.clone()),
                            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Ok(v.to_string()),
                            Some(_) => Err(format!("key {k}: column {c:?} needs a string or number")),
                            None => Err(format!("key {k}: no value for primary key column {c:?} of {table}")),
                        })
                        .collect()
                }
                // A one-column key may itself start with `{`.
                Some(Err(_)) | None if columns.len() == 1 => Ok(vec![k.clone()]),
                Some(Err(e)) => Err(format!("key {k}: not a JSON object: {e}")),
                None => Err(format!(
                    "table {table} has a primary key of {} columns ({}): give each --key as a JSON object, e.g. {{{}}}",
                    columns.len(),
                    columns.join(", "),
                    columns.iter().map(|c| format!("\"{c}\": …")).collect::<Vec<_>>().join(", ")
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{snapshot_keys, ReadEvents};
    use bytes::Bytes;
    use serde_json::{json, Map, Value};

    proptest::proptest! {
        /// Any bytes: the JSON serde_json writes for them when they are UTF-8, else nothing.
        #[test]
        fn json_strings_are_serde_json_s(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24), ascii in "[ -~]{0,24}") {
            for b in [b.as_slice(), ascii.as_bytes()] {
                let mut out = b"x".to_vec();
                let ok = super::write_json_str(b, &mut out);
                match std::str::from_utf8(b) {
                    Ok(s) => proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), format!("x{}", serde_json::to_string(s).unwrap())),
                    Err(_) => proptest::prop_assert!(!ok && out == b"x"),
                }
            }
        }
    }

    #[test]
    fn read_events_are_the_values_text() {
        // Columns out of name order, a composite key, a name that needs escaping.
        let columns = [("zeta", false), ("id", true), ("Line \"2\"", true), ("a", false)];
        let values = [json!("z\n"), json!(7), json!(2), Value::Null];
        let source = json!({"connector": "postgres", "table": "t", "snapshot": true, "txid": null});
        let w = ReadEvents::new(columns.iter().map(|(n, k)| (*n, *k)), &source, "0/16B3", 1234);
        let one = w.records(1, 5, 1234, |_, i, out| serde_json::to_writer(out, &values[i]).unwrap());
        let (key, event) = (one[0].key.clone().unwrap(), one[0].full_value());
        let row: Map<String, Value> = columns.iter().zip(&values).map(|((n, _), v)| (n.to_string(), v.clone())).collect();
        let k: Map<String, Value> = columns.iter().zip(&values).filter(|((_, k), _)| *k).map(|((n, _), v)| (n.to_string(), v.clone())).collect();
        let want = json!({
            "op": "read", "before": null, "after": row, "key": k, "source": source,
            "transaction": {"id": null, "lsn": "0/16B3", "seq": 5}, "ts_ms": 1234,
        });
        assert_eq!(String::from_utf8(event.to_vec()).unwrap(), want.to_string());
        assert_eq!(String::from_utf8(key.to_vec()).unwrap(), Value::Object(k).to_string());

        // Many rows: each its own event and key, numbered from the first; long values too
        // (a field's length takes more than a byte from 128 bytes on).
        let long = "x".repeat(300);
        let rows = [values.clone(), [json!("y"), json!(8), json!(1), json!([1])], [json!(long), json!(9), json!(3), json!({"a": long})]];
        let records = w.records(rows.len(), 4, 99, |r, i, out| serde_json::to_writer(out, &rows[r][i]).unwrap());
        assert_eq!(records.len(), 3);
        for (r, rec) in records.iter().enumerate() {
            let row: Map<String, Value> = columns.iter().zip(&rows[r]).map(|((n, _), v)| (n.to_string(), v.clone())).collect();
            let k: Map<String, Value> = columns.iter().zip(&rows[r]).filter(|((_, k), _)| *k).map(|((n, _), v)| (n.to_string(), v.clone())).collect();
            let want = json!({
                "op": "read", "before": null, "after": row, "key": k, "source": source,
                "transaction": {"id": null, "lsn": "0/16B3", "seq": 4 + r}, "ts_ms": 1234,
            });
            assert_eq!(String::from_utf8(rec.full_value().to_vec()).unwrap(), want.to_string());
            assert_eq!((rec.key.clone().unwrap(), rec.timestamp_ms), (Bytes::from(Value::Object(k).to_string()), 99));
        }
        // In the log, as a batch: the values readers get are the events.
        let batch = sluice_log::format::encode_batch(&records, 0, sluice_log::Codec::Lz4).unwrap();
        let (_, read) = sluice_log::format::decode_batch(&batch).unwrap();
        assert_eq!(read.iter().map(|r| r.value.clone()).collect::<Vec<_>>(), records.iter().map(|r| r.full_value()).collect::<Vec<_>>());
        assert!(w.records(0, 0, 0, |_, _, _| unreachable!()).is_empty());
    }

    #[test]
    fn snapshot_keys_by_value_or_object() {
        let one = snapshot_keys("t", &["id"], &["7".into(), "{\"id\": 9}".into()]).unwrap();
        assert_eq!(one, vec![vec!["7".to_string()], vec!["9".to_string()]]);
        let two = snapshot_keys("t", &["order_id", "line"], &["{\"line\": 1, \"order_id\": \"a,b\"}".into()]).unwrap();
        assert_eq!(two, vec![vec!["a,b".to_string(), "1".to_string()]]);
        let e = snapshot_keys("t", &["order_id", "line"], &["7".into()]).unwrap_err();
        assert!(e.contains("2 columns (order_id, line)") && e.contains("JSON object"), "{e}");
        assert!(snapshot_keys("t", &["a", "b"], &["{\"a\": 1}".into()]).unwrap_err().contains("no value for primary key column \"b\""));
        assert!(snapshot_keys("t", &["a"], &["{\"b\": 1}".into()]).unwrap_err().contains("\"b\" is not a primary key column"));
        assert!(snapshot_keys("t", &["a"], &["{\"a\": null}".into()]).unwrap_err().contains("string or number"));
        assert_eq!(snapshot_keys("t", &["a"], &["{oops".into()]).unwrap(), vec![vec!["{oops".to_string()]]);
        assert!(snapshot_keys("t", &["a", "b"], &["{oops".into()]).unwrap_err().contains("not a JSON object"));
    }
}
