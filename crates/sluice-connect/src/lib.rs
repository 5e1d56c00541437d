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
    use super::snapshot_keys;

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
