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
