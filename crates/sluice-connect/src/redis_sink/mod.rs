//! The Redis sink: the serving store of a pipeline. Per record, the latest value under a key
//! computed by a SQL expression — the record as a JSON string (`SET`) or as a hash (`HSET`,
//! nested values as JSON text) — with an optional TTL, and optionally its position in a
//! geo set (`GEOADD`) for "where is each vehicle now" queries.
//!
//! Writes are idempotent by key and applied in log order (one pipelined round trip per
//! batch), so a flush that re-runs after a crash leaves the same final state. A record whose
//! key is NULL fails the flush (filter such records out before the sink): nothing is dropped
//! silently.

use deltalake::arrow::array::{Array, RecordBatch};
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use sluice_core::pipeline::RedisSinkConfig;
use sluice_pipeline::{rows_to_json, ExternalSink};
use tokio::sync::Mutex;

pub struct RedisSink {
    cfg: RedisSinkConfig,
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    date_column: String,
}

impl RedisSink {
    pub fn new(cfg: &RedisSinkConfig, date_column: &str) -> anyhow::Result<RedisSink> {
        Ok(RedisSink { client: redis::Client::open(cfg.url.as_str())?, cfg: cfg.clone(), conn: Mutex::new(None), date_column: date_column.to_string() })
    }

    fn commands(&self, b: &RecordBatch, pipe: &mut redis::Pipeline) -> anyhow::Result<usize> {
        let mut exprs = vec![("k".to_string(), self.cfg.key.clone())];
        if let Some(g) = &self.cfg.geo {
            exprs.extend([("lat".to_string(), g.lat.clone()), ("lng".to_string(), g.lng.clone()), ("m".to_string(), g.member.clone())]);
        }
        let cols = crate::texts(&exprs, b)?;
        let rows = rows_to_json(b, &self.date_column)?;
        for (row, json) in rows.iter().enumerate() {
            if cols[0].is_null(row) {
                anyhow::bail!("redis key `{}` is NULL for a record ({})", self.cfg.key, String::from_utf8_lossy(json));
            }
            let key = cols[0].value(row);
            if self.cfg.value == "hash" {
                let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)?;
                pipe.cmd("DEL").arg(key).ignore();
                if !obj.is_empty() {
                    let mut cmd = redis::cmd("HSET");
                    cmd.arg(key);
                    for (f, v) in &obj {
                        cmd.arg(f);
                        match v {
                            serde_json::Value::String(s) => cmd.arg(s),
                            other => cmd.arg(other.to_string()),
                        };
                    }
                    pipe.add_command(cmd).ignore();
                }
                if let Some(ttl) = self.cfg.ttl {
                    pipe.cmd("PEXPIRE").arg(key).arg(ttl.as_millis() as u64).ignore();
                }
            } else {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(json.as_ref());
                if let Some(ttl) = self.cfg.ttl {
                    cmd.arg("PX").arg(ttl.as_millis() as u64);
                }
                pipe.add_command(cmd).ignore();
            }
            if let Some(g) = &self.cfg.geo {
                let (lat, lng, m) = (&cols[1], &cols[2], &cols[3]);
                if lat.is_valid(row) && lng.is_valid(row) && m.is_valid(row) {
                    let (Ok(la), Ok(ln)) = (lat.value(row).parse::<f64>(), lng.value(row).parse::<f64>()) else {
                        anyhow::bail!("geo position of {} is not numeric", m.value(row));
                    };
                    pipe.cmd("GEOADD").arg(&g.key).arg(ln).arg(la).arg(m.value(row)).ignore();
                }
            }
        }
        Ok(rows.len())
    }
}

impl ExternalSink for RedisSink {
    fn write<'a>(&'a self, batches: &'a [RecordBatch]) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            let mut n = 0;
            for b in batches {
                n += self.commands(b, &mut pipe)?;
            }
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.client.get_multiplexed_async_connection().await?);
            }
            let conn = guard.as_mut().expect("connected above");
            if let Err(e) = pipe.query_async::<()>(conn).await {
                // Reconnect on the next write (the flush is retried from its checkpoint).
                *guard = None;
                return Err(anyhow::anyhow!("redis {}: {e}", self.cfg.url));
            }
            Ok(n)
        })
    }
}

/// The `lookup` source for Redis: `MGET` of `<prefix><key>` for the keys a batch needs; each
/// value a JSON object (as the Redis sink's `json` mode writes them).
pub struct RedisLookup {
    cfg: sluice_core::pipeline::RedisLookup,
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl RedisLookup {
    pub fn new(cfg: &sluice_core::pipeline::RedisLookup) -> anyhow::Result<RedisLookup> {
        Ok(RedisLookup { client: redis::Client::open(cfg.url.as_str())?, cfg: cfg.clone(), conn: Mutex::new(None) })
    }
}

impl sluice_pipeline::LookupSource for RedisLookup {
    fn get<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, anyhow::Result<std::collections::HashMap<String, bytes::Bytes>>> {
        Box::pin(async move {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.client.get_multiplexed_async_connection().await.map_err(|e| anyhow::anyhow!("redis {}: {e}", self.cfg.url))?);
            }
            let conn = guard.as_mut().expect("connected above");
            let mut cmd = redis::cmd("MGET");
            for k in keys {
                cmd.arg(format!("{}{k}", self.cfg.prefix));
            }
            let values: Vec<Option<Vec<u8>>> = match cmd.query_async(conn).await {
                Ok(v) => v,
                Err(e) => {
                    *guard = None;
                    return Err(anyhow::anyhow!("redis {}: {e}", self.cfg.url));
                }
            };
            Ok(keys.iter().zip(values).filter_map(|(k, v)| Some((k.clone(), bytes::Bytes::from(v?)))).collect())
        })
    }
}
