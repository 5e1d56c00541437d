//! The `lookup` step: joins each record to a row found by key in a lake table, a PostgreSQL
//! table or Redis, cached for `refresh`. The row (a JSON object) goes under field `into` as
//! a struct column, built the way `enrich` builds its answers.
//!
//! Sources implement [`LookupSource`]: the lake one lives here (it reads the whole table and
//! keeps it in memory: dimension tables); PostgreSQL and Redis ones are connectors in
//! `sluice-connect`. A source that fails (unreachable) fails the flush, which is retried from
//! the checkpoint: a record is never joined against "nothing" because a database was down.

use crate::enrich::{struct_column, with_column};
use crate::expr::{Map, StepError};
use crate::step::{Failure, StepStats};
use bytes::Bytes;
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::{cast, filter_record_batch};
use deltalake::arrow::datatypes::DataType;
use futures::future::BoxFuture;
use sluice_core::pipeline::{LookupConfig, OnMissing};
use deltalake::arrow::datatypes::SchemaRef;
use sluice_lake::convert::{self, ConvertOptions, InputRecord};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a `lookup` finds rows.
pub trait LookupSource: Send + Sync {
    /// The rows whose key column equals each of `keys` (as text), as JSON objects. Keys
    /// without a row are absent from the answer.
    fn get<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, anyhow::Result<HashMap<String, Bytes>>>;
}

/// A lake table read whole into memory, read again when older than `refresh`.
pub struct LakeLookupSource {
    root: String,
    table: String,
    column: String,
    date_column: String,
    refresh: Duration,
    snapshot: tokio::sync::Mutex<Option<(Instant, Arc<HashMap<String, Bytes>>)>>,
}

impl LakeLookupSource {
    pub fn new(root: &str, table: &str, column: &str, date_column: &str, refresh: Duration) -> LakeLookupSource {
        LakeLookupSource {
            root: root.into(),
            table: table.into(),
            column: column.into(),
            date_column: date_column.into(),
            refresh,
            snapshot: Default::default(),
        }
    }

    async fn load(&self) -> anyhow::Result<HashMap<String, Bytes>> {
        let Some(t) = sluice_lake::delta::LakeTable::open(&self.root, &self.table).await? else {
            anyhow::bail!("lookup table {:?} does not exist", self.table);
        };
        let mut rows = HashMap::new();
        for b in t.read_all().await? {
            let Some(col) = b.column_by_name(&self.column) else {
                anyhow::bail!("lookup table {:?} has no column {:?}", self.table, self.column);
            };
            let keys = cast(col, &DataType::Utf8)?;
            let keys = keys.as_string::<i32>();
            let json = crate::rows_to_json(&b, &self.date_column)?;
            for (i, j) in json.into_iter().enumerate() {
                if keys.is_valid(i) {
                    rows.insert(keys.value(i).to_string(), j);
                }
            }
        }
        Ok(rows)
    }
}

impl LookupSource for LakeLookupSource {
    fn get<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, anyhow::Result<HashMap<String, Bytes>>> {
        Box::pin(async move {
            let mut snap = self.snapshot.lock().await;
            if snap.as_ref().is_none_or(|(at, _)| at.elapsed() >= self.refresh) {
                *snap = Some((Instant::now(), Arc::new(self.load().await?)));
            }
            let rows = &snap.as_ref().expect("loaded above").1;
            Ok(keys.iter().filter_map(|k| rows.get(k).map(|v| (k.clone(), v.clone()))).collect())
        })
    }
}

pub struct Lookup {
    cfg: LookupConfig,
    source: Option<Arc<dyn LookupSource>>,
    /// key -> (when read, the row or None for "no row").
    cache: HashMap<String, (Instant, Option<Bytes>)>,
    /// The rows' inferred schema so far.
    answers: Option<SchemaRef>,
}

impl Lookup {
    pub fn new(cfg: &LookupConfig) -> Lookup {
        Lookup { cfg: cfg.clone(), source: None, cache: HashMap::new(), answers: None }
    }

    pub fn set_source(&mut self, source: Arc<dyn LookupSource>) {
        self.source = Some(source);
    }

    /// The `(name, SQL)` list that evaluates the key as text.
    pub fn key_fields(&self) -> Vec<(String, String)> {
        vec![("k".to_string(), format!("CAST(({}) AS VARCHAR)", self.cfg.key))]
    }

    /// Joins `batch`; rows without a match fail when `on_missing: dead_letter`. An error of
    /// the source is returned as `Err` and must fail the flush.
    pub fn apply(&mut self, keys: &Map, batch: &RecordBatch, stats: &StepStats) -> Result<Result<(RecordBatch, Vec<Failure>), StepError>, String> {
        let rows = batch.num_rows();
        let k = match keys.apply(batch).and_then(|v| cast(v.column(0), &DataType::Utf8).map_err(|e| eval_err(e.to_string()))) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let k = k.as_string::<i32>();
        let mut wanted: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..rows {
            if k.is_valid(i) && seen.insert(k.value(i)) {
                let fresh = self.cache.get(k.value(i)).is_some_and(|(at, _)| at.elapsed() < self.cfg.refresh);
                if fresh {
                    stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    wanted.push(k.value(i).to_string());
                }
            }
        }
        if !wanted.is_empty() {
            stats.cache_misses.fetch_add(wanted.len() as u64, Ordering::Relaxed);
            let source = self.source.clone().ok_or_else(|| format!("lookup {:?}: no source connected", self.cfg.into))?;
            let found = block_on(source.get(&wanted)).map_err(|e| format!("lookup {}: {e:#}", self.cfg.into))?;
            if self.cache.len() + wanted.len() > self.cfg.max_entries {
                self.cache.clear();
            }
            let now = Instant::now();
            for w in wanted {
                let v = found.get(&w).cloned();
                self.cache.insert(w, (now, v));
            }
        }
        let mut failures = Vec::new();
        let mut bodies: Vec<(usize, Bytes)> = Vec::new();
        for i in 0..rows {
            let row = if k.is_valid(i) { self.cache.get(k.value(i)).and_then(|(_, v)| v.clone()) } else { None };
            match row {
                Some(b) => bodies.push((i, b)),
                None if self.cfg.on_missing == OnMissing::DeadLetter => failures.push(Failure {
                    row: i,
                    error: format!("lookup {}: no row for key {}", self.cfg.into, if k.is_valid(i) { k.value(i) } else { "NULL" }),
                }),
                None => {}
            }
        }
        let inputs: Vec<InputRecord> = bodies.iter().map(|(row, b)| InputRecord { partition: 0, offset: *row as u64, timestamp_ms: 0, value: b }).collect();
        let converted = convert::convert(self.answers.as_deref(), &inputs, &ConvertOptions::default());
        for r in &converted.rejects {
            failures.push(Failure { row: r.offset as usize, error: format!("lookup {}: row does not fit: {}", self.cfg.into, r.reason) });
        }
        self.answers = Some(converted.schema.clone());
        let result = (|| {
            let column = struct_column(&converted, rows)?;
            let out = with_column(batch, &self.cfg.into, column)?;
            if failures.is_empty() {
                return Ok((out, Vec::new()));
            }
            failures.sort_by_key(|f| f.row);
            let mut keep = vec![true; rows];
            for f in &failures {
                keep[f.row] = false;
            }
            let out = filter_record_batch(&out, &keep.into()).map_err(|e| eval_err(e.to_string()))?;
            Ok((out, std::mem::take(&mut failures)))
        })();
        Ok(result)
    }
}

fn eval_err(message: String) -> StepError {
    StepError::Eval { step: "lookup", expr: String::new(), message }
}

/// Runs a source's future from the step (which runs on a blocking thread of the runtime).
fn block_on<T>(f: BoxFuture<'_, anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => tokio::task::block_in_place(|| h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f),
    }
}
