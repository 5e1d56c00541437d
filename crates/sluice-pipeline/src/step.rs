//! Steps as they run: compiled per input schema, applied to whole batches, with a row-by-row
//! fallback that isolates the records an expression fails on (they become dead letters).

use crate::check::{parse_expr, referenced_fields};
use crate::dedup::Deduper;
use crate::enrich::Enricher;
use crate::lookup::{Lookup, LookupSource};
use crate::validate::Validator;
use crate::expr::{Filter, Map, StepError};
use deltalake::arrow::array::{new_null_array, ArrayRef, RecordBatch};
use deltalake::arrow::buffer::BooleanBuffer;
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sluice_core::pipeline::StepConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of one step, shared with `/v1/pipelines` and `/metrics`.
#[derive(Debug, Default)]
pub struct StepStats {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Records the step dropped on purpose (a filter said false, no route took them).
    pub filtered: AtomicU64,
    /// Records the step failed on (sent to the dead-letter table).
    pub failed: AtomicU64,
    /// Total time spent in the step, in microseconds.
    pub micros: AtomicU64,
    /// `enrich`: records answered from the cache (or by another record's call in the batch).
    pub cache_hits: AtomicU64,
    /// `enrich`: distinct calls made.
    pub cache_misses: AtomicU64,
}

/// What a step produced from one batch.
pub enum Output {
    /// The batch for the next step.
    Rows(RecordBatch),
    /// Per sink (index into the pipeline's sinks): the rows routed there; `taken` counts the
    /// input rows routed anywhere (a row sent to several sinks counts once).
    Routed { sinks: Vec<(usize, RecordBatch)>, taken: usize },
}

/// A row the step failed on: its index in the input batch and the error.
pub struct Failure {
    pub row: usize,
    pub error: String,
}

/// `batch` with a NULL column for each of `fields` it lacks: records without a field read
/// NULL there, as in SQL (a field nobody has sent yet is not an error).
pub fn with_null_fields(batch: RecordBatch, fields: &[String]) -> RecordBatch {
    let schema = batch.schema();
    let missing: Vec<&String> = fields.iter().filter(|f| schema.field_with_name(f).is_err()).collect();
    if missing.is_empty() {
        return batch;
    }
    let mut all: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    for m in missing {
        all.push(Field::new(m.as_str(), DataType::Null, true));
        cols.push(new_null_array(&DataType::Null, batch.num_rows()));
    }
    let schema = Arc::new(Schema::new_with_metadata(all, schema.metadata().clone()));
    RecordBatch::try_new(schema, cols).unwrap_or(batch)
}

/// Columns every step passes through untouched: the log position and the date partition.
pub fn is_system_column(name: &str, date_column: &str) -> bool {
    name.starts_with('_') || name == date_column
}

enum Kind {
    Filter(String),
    /// map/select/drop: how to build the output fields from an input schema.
    Project(StepConfig),
    /// (sink index, predicate)
    Route(Vec<(usize, Option<String>)>),
    Enrich(Box<Enricher>),
    Dedup(Box<Deduper>),
    Validate(Box<Validator>),
    Lookup(Box<Lookup>),
}

enum Compiled {
    Filter(Filter),
    Project(Map),
    Route(Vec<(usize, Option<Filter>)>),
    /// The enrich step's placeholders, evaluated as text.
    Enrich(Map),
    /// The dedup step's key.
    Dedup(Map),
    /// The validate step's predicates.
    Validate(Map, Vec<crate::validate::Check>),
    /// The lookup step's key.
    Lookup(Map),
}

/// One step of a running pipeline.
pub struct Step {
    /// `<index>:<kind>`, e.g. `0:filter`: how metrics and dead letters name the step.
    pub label: String,
    kind: Kind,
    date_column: String,
    /// Fields the step's expressions read; absent ones are supplied as NULL.
    reads: Vec<String>,
    cache: Option<(SchemaRef, Result<Compiled, String>)>,
    pub stats: Arc<StepStats>,
    /// Index of the source stream the next batch comes from.
    source: u32,
    /// An error that must stop the flush (state that could not be made durable).
    fatal: Option<String>,
}

impl Step {
    /// `sinks` maps a route's sink name to its index.
    pub fn new(index: usize, cfg: &StepConfig, sinks: &[String], date_column: &str) -> Step {
        let mut sqls: Vec<String> = Vec::new();
        let kind = match cfg {
            StepConfig::Filter(sql) => {
                sqls.push(sql.clone());
                Kind::Filter(sql.clone())
            }
            StepConfig::Map(f) | StepConfig::Select(f) => {
                sqls.extend(f.0.iter().map(|(_, s)| s.clone()));
                Kind::Project(cfg.clone())
            }
            StepConfig::Drop(_) => Kind::Project(cfg.clone()),
            StepConfig::Validate(v) => Kind::Validate(Box::new(Validator::new(v))),
            StepConfig::Dedup(d) => {
                sqls.push(d.key.clone());
                Kind::Dedup(Box::new(Deduper::new(d)))
            }
            StepConfig::Enrich(e) => {
                let en = Enricher::new(e);
                sqls.extend(en.expressions().iter().cloned());
                Kind::Enrich(Box::new(en))
            }
            StepConfig::Lookup(l) => {
                sqls.push(l.key.clone());
                Kind::Lookup(Box::new(Lookup::new(l)))
            }
            StepConfig::Route(routes) => {
                sqls.extend(routes.iter().filter_map(|r| r.when.clone()));
                Kind::Route(
                    routes
                        .iter()
                        .map(|r| (sinks.iter().position(|s| *s == r.to).unwrap_or(usize::MAX), r.when.clone()))
                        .collect(),
                )
            }
        };
        let mut reads = match &kind {
            Kind::Validate(v) => v.reads(),
            _ => Vec::new(),
        };
        for sql in sqls {
            if let Ok(e) = parse_expr(&sql) {
                for f in referenced_fields(&e) {
                    if !reads.contains(&f) {
                        reads.push(f);
                    }
                }
            }
        }
        Step {
            label: format!("{index}:{}", cfg.kind()),
            kind,
            date_column: date_column.to_string(),
            reads,
            cache: None,
            stats: Arc::default(),
            source: 0,
            fatal: None,
        }
    }

    /// Keeps the step's durable state (dedup keys) under `dir`.
    pub fn set_state_dir(&mut self, dir: &std::path::Path) {
        let file = format!("dedup-{}.journal", self.label.split(':').next().unwrap_or("0"));
        if let Kind::Dedup(d) = &mut self.kind {
            d.set_path(dir.join(file));
        }
    }

    /// Where a `lookup` step finds its rows.
    pub fn set_lookup_source(&mut self, source: Arc<dyn LookupSource>) {
        if let Kind::Lookup(l) = &mut self.kind {
            l.set_source(source);
        }
    }

    /// The source stream (index in the pipeline's `from`) of the batches applied next.
    pub fn set_source(&mut self, stream: u32) {
        self.source = stream;
    }

    /// An error that must fail the whole flush, if the last batch hit one.
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// Applies the step to `batch`. Rows an expression fails on are returned as failures
    /// (the rest go on); if the step cannot be compiled for this batch's fields, every row
    /// fails with that error.
    pub fn apply(&mut self, batch: RecordBatch) -> (Option<Output>, Vec<Failure>) {
        let started = std::time::Instant::now();
        let rows = batch.num_rows();
        self.stats.records_in.fetch_add(rows as u64, Ordering::Relaxed);
        let batch = self.with_missing_fields(batch);
        let stats = self.stats.clone();
        let (out, failures) = match self.compiled(batch.schema()) {
            Err(e) => (None, (0..rows).map(|row| Failure { row, error: e.clone() }).collect()),
            Ok(Compiled::Validate(map, checks)) => match Validator::apply(map, checks, &batch) {
                Ok((b, failures)) => (Some(Output::Rows(b)), failures),
                Err(e) => (None, (0..rows).map(|row| Failure { row, error: e.to_string() }).collect()),
            },
            Ok(Compiled::Dedup(keys)) => {
                let keys = keys.clone();
                let Kind::Dedup(d) = &mut self.kind else { unreachable!("dedup step compiled as dedup") };
                let result = crate::runtime::positions(&batch).map_err(|e| e.to_string()).and_then(|pos| d.apply(&keys, &batch, self.source, &pos));
                match result {
                    Ok((b, _dropped)) => (Some(Output::Rows(b)), Vec::new()),
                    Err(e) => {
                        self.fatal = Some(format!("step {}: {e}", self.label));
                        (None, Vec::new())
                    }
                }
            }
            Ok(Compiled::Lookup(keys)) => {
                let keys = keys.clone();
                let Kind::Lookup(l) = &mut self.kind else { unreachable!("lookup step compiled as lookup") };
                match l.apply(&keys, &batch, &stats) {
                    Ok(Ok((b, failures))) => (Some(Output::Rows(b)), failures),
                    Ok(Err(e)) => (None, (0..rows).map(|row| Failure { row, error: e.to_string() }).collect()),
                    Err(fatal) => {
                        self.fatal = Some(format!("step {}: {fatal}", self.label));
                        (None, Vec::new())
                    }
                }
            }
            Ok(Compiled::Enrich(values)) => {
                let values = values.clone();
                let Kind::Enrich(en) = &mut self.kind else { unreachable!("enrich step compiled as enrich") };
                match en.apply(&values, &batch, &stats) {
                    Ok((b, failures)) => (Some(Output::Rows(b)), failures),
                    Err(e) => (None, (0..rows).map(|row| Failure { row, error: e.to_string() }).collect()),
                }
            }
            Ok(c) => c.run(&batch),
        };
        self.count(rows, &out, failures.len());
        self.stats.micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        (out, failures)
    }

    /// Whether the step is a function of each batch alone (filter, map/select/drop, route),
    /// so that it can run on several batches at once: see [`Step::apply_compiled`].
    pub fn is_pure(&self) -> bool {
        matches!(self.kind, Kind::Filter(_) | Kind::Project(_) | Kind::Route(_))
    }

    /// [`Step::apply`] through a shared reference, for a pure step already compiled for the
    /// batch's fields (by an `apply` to a batch of the same schema, which may be empty).
    /// `None` (and nothing counted) otherwise.
    pub fn apply_compiled(&self, batch: RecordBatch) -> Option<(Option<Output>, Vec<Failure>)> {
        if !self.is_pure() {
            return None;
        }
        let started = std::time::Instant::now();
        let rows = batch.num_rows();
        let batch = self.with_missing_fields(batch);
        let Some((schema, Ok(c))) = &self.cache else { return None };
        if *schema != batch.schema() {
            return None;
        }
        self.stats.records_in.fetch_add(rows as u64, Ordering::Relaxed);
        let (out, failures) = c.run(&batch);
        self.count(rows, &out, failures.len());
        self.stats.micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Some((out, failures))
    }

    /// Applies the step to each of `batches` (in order), with the time each took. An `enrich`
    /// step starts the next batch's calls before it finishes the current one, so its calls
    /// keep going while it renders requests and converts answers; a batch's time then runs
    /// from its start to its finish. After a fatal error the remaining batches are skipped.
    pub fn apply_all(&mut self, batches: Vec<RecordBatch>) -> Vec<(Option<Output>, Vec<Failure>, std::time::Duration)> {
        if !matches!(self.kind, Kind::Enrich(_)) || batches.len() < 2 {
            let mut out = Vec::with_capacity(batches.len());
            for b in batches {
                if self.fatal.is_some() {
                    out.push((None, Vec::new(), std::time::Duration::ZERO));
                    continue;
                }
                let started = std::time::Instant::now();
                let (o, f) = self.apply(b);
                out.push((o, f, started.elapsed()));
            }
            return out;
        }
        let run = std::time::Instant::now();
        let stats = self.stats.clone();
        let mut out: Vec<(Option<Output>, Vec<Failure>, std::time::Duration)> = Vec::with_capacity(batches.len());
        // The batch started but not finished: (its index in `out`, the batch, its calls, when it started).
        let mut pending: Option<(usize, RecordBatch, crate::enrich::Started, std::time::Instant)> = None;
        for b in batches {
            let started = std::time::Instant::now();
            let rows = b.num_rows();
            self.stats.records_in.fetch_add(rows as u64, Ordering::Relaxed);
            let b = self.with_missing_fields(b);
            let values = match self.compiled(b.schema()) {
                Ok(Compiled::Enrich(values)) => Ok(values.clone()),
                Ok(_) => Err("enrich step compiled as another kind".to_string()),
                Err(e) => Err(e),
            };
            let Kind::Enrich(en) = &mut self.kind else { unreachable!("checked above") };
            let begun = values.and_then(|v| en.start(&v, &b, &stats).map_err(|e| e.to_string()));
            if let Some((i, pb, ps, at)) = pending.take() {
                out[i] = Self::finished(en, ps, &pb, at);
            }
            match begun {
                Ok(s) => {
                    pending = Some((out.len(), b, s, started));
                    out.push((None, Vec::new(), std::time::Duration::ZERO));
                }
                Err(e) => out.push((None, (0..rows).map(|row| Failure { row, error: e.clone() }).collect(), started.elapsed())),
            }
        }
        let Kind::Enrich(en) = &mut self.kind else { unreachable!("checked above") };
        if let Some((i, pb, ps, at)) = pending.take() {
            out[i] = Self::finished(en, ps, &pb, at);
        }
        en.end_run();
        for (o, f, _) in &out {
            self.count(0, o, f.len()); // (enrich drops no row on purpose: no input count needed)
        }
        self.stats.micros.fetch_add(run.elapsed().as_micros() as u64, Ordering::Relaxed);
        out
    }

    /// Finishes a started enrich batch: its output or, if that fails, every row failed; and
    /// the time since it started.
    fn finished(en: &mut Enricher, s: crate::enrich::Started, batch: &RecordBatch, at: std::time::Instant) -> (Option<Output>, Vec<Failure>, std::time::Duration) {
        let rows = batch.num_rows();
        let (o, f) = match en.finish(s, batch) {
            Ok((b, failures)) => (Some(Output::Rows(b)), failures),
            Err(e) => (None, (0..rows).map(|row| Failure { row, error: e.to_string() }).collect()),
        };
        (o, f, at.elapsed())
    }

    /// Counts a batch of `rows` input rows that gave `out` and `failed` failures.
    fn count(&self, rows: usize, out: &Option<Output>, failed: usize) {
        let out_rows = match out {
            Some(Output::Rows(b)) => b.num_rows(),
            Some(Output::Routed { taken, .. }) => *taken,
            None => 0,
        };
        self.stats.failed.fetch_add(failed as u64, Ordering::Relaxed);
        self.stats.records_out.fetch_add(out_rows as u64, Ordering::Relaxed);
        if matches!(self.kind, Kind::Filter(_) | Kind::Route(_) | Kind::Dedup(_)) {
            self.stats.filtered.fetch_add(rows.saturating_sub(out_rows + failed) as u64, Ordering::Relaxed);
        }
    }

    /// Adds a NULL column for every field the step reads that the batch lacks: records
    /// without a field read NULL there, as in SQL (a field nobody has sent yet is not an error).
    fn with_missing_fields(&self, batch: RecordBatch) -> RecordBatch {
        with_null_fields(batch, &self.reads)
    }

    fn compiled(&mut self, schema: SchemaRef) -> Result<&Compiled, String> {
        let fresh = !matches!(&self.cache, Some((s, _)) if *s == schema);
        if fresh {
            let c = self.compile(&schema).map_err(|e| e.to_string());
            self.cache = Some((schema, c));
        }
        match &self.cache {
            Some((_, Ok(c))) => Ok(c),
            Some((_, Err(e))) => Err(e.clone()),
            None => Err("not compiled".into()),
        }
    }

    fn compile(&self, schema: &Schema) -> Result<Compiled, StepError> {
        Ok(match &self.kind {
            Kind::Filter(sql) => Compiled::Filter(Filter::compile(sql, schema)?),
            Kind::Project(cfg) => Compiled::Project(Map::compile(&project_fields(cfg, schema, &self.date_column), schema)?),
            Kind::Enrich(en) => Compiled::Enrich(Map::compile(&en.placeholder_fields(), schema)?),
            Kind::Dedup(d) => Compiled::Dedup(Map::compile(&d.key_fields(), schema)?),
            Kind::Lookup(l) => Compiled::Lookup(Map::compile(&l.key_fields(), schema)?),
            Kind::Validate(v) => {
                let (map, checks) = v.compile(schema)?;
                Compiled::Validate(map, checks)
            }
            Kind::Route(routes) => Compiled::Route(
                routes
                    .iter()
                    .map(|(sink, when)| Ok((*sink, when.as_deref().map(|w| Filter::compile(w, schema)).transpose()?)))
                    .collect::<Result<_, StepError>>()?,
            ),
        })
    }
}

impl Compiled {
    /// Applies a filter, projection or route; if that fails, isolates the rows it fails on.
    fn run(&self, batch: &RecordBatch) -> (Option<Output>, Vec<Failure>) {
        match self.apply(batch) {
            Ok(out) => (Some(out), Vec::new()),
            Err(e) => row_by_row(self, batch, e.to_string()),
        }
    }

    fn apply(&self, batch: &RecordBatch) -> Result<Output, StepError> {
        Ok(match self {
            Compiled::Filter(f) => Output::Rows(f.apply(batch)?),
            Compiled::Project(m) => Output::Rows(m.apply(batch)?),
            Compiled::Enrich(_) | Compiled::Dedup(_) | Compiled::Validate(..) | Compiled::Lookup(_) => return Err(StepError::Eval { step: "enrich", expr: String::new(), message: "enrich runs through its step".into() }),
            Compiled::Route(routes) => {
                let mut out = Vec::with_capacity(routes.len());
                // Which rows some route took so far (None: every row).
                let mut taken = Some(BooleanBuffer::new_unset(batch.num_rows()));
                for (sink, when) in routes {
                    let rows = match when {
                        Some(f) => {
                            let (rows, passed) = f.apply_with_mask(batch)?;
                            taken = taken.map(|t| &t | &passed);
                            rows
                        }
                        None => {
                            taken = None;
                            batch.clone()
                        }
                    };
                    if rows.num_rows() > 0 {
                        out.push((*sink, rows));
                    }
                }
                let taken = taken.map_or(batch.num_rows(), |t| t.count_set_bits());
                Output::Routed { sinks: out, taken }
            }
        })
    }
}

/// Applies a step to a batch it failed on, isolating the rows that fail: the batch is split
/// in halves until each failing part is one row (a few failing rows in a batch of 8192 cost
/// tens of evaluations, not thousands). The rows that pass go on, in order.
fn row_by_row(c: &Compiled, batch: &RecordBatch, error: String) -> (Option<Output>, Vec<Failure>) {
    let mut failures = Vec::new();
    let mut rows: Vec<RecordBatch> = Vec::new();
    let mut routed: Vec<(usize, Vec<RecordBatch>)> = Vec::new();
    let mut taken = 0;
    // Parts still to try, in order: (first row, rows); the error when already known to fail.
    let mut todo: Vec<(usize, usize, Option<String>)> = vec![(0, batch.num_rows(), Some(error))];
    while let Some((start, len, known)) = todo.pop() {
        let result = match known {
            Some(e) => Err(e),
            None => c.apply(&batch.slice(start, len)).map_err(|e| e.to_string()),
        };
        match result {
            Ok(Output::Rows(b)) => rows.push(b),
            Ok(Output::Routed { sinks, taken: t }) => {
                taken += t;
                for (sink, b) in sinks {
                    match routed.iter_mut().find(|(s, _)| *s == sink) {
                        Some((_, v)) => v.push(b),
                        None => routed.push((sink, vec![b])),
                    }
                }
            }
            Err(_) if len == 0 => {}
            Err(error) if len == 1 => failures.push(Failure { row: start, error }),
            Err(_) => {
                let half = len / 2;
                // Pushed in reverse so the first half is tried first and rows stay in order.
                todo.push((start + half, len - half, None));
                todo.push((start, half, None));
            }
        }
    }
    let concat = |parts: Vec<RecordBatch>| -> Option<RecordBatch> {
        let schema = parts.first()?.schema();
        concat_batches(&schema, &parts).ok()
    };
    let out = match c {
        Compiled::Route(_) => Output::Routed {
            sinks: routed.into_iter().filter_map(|(s, parts)| Some((s, concat(parts)?))).collect(),
            taken,
        },
        _ => match concat(rows) {
            Some(b) => Output::Rows(b),
            None => return (None, failures),
        },
    };
    (Some(out), failures)
}

/// The `(output name, SQL)` list a map/select/drop step compiles to for `schema`. System
/// columns (`_partition`, `_offset`, the date column) always pass through, last.
fn project_fields(cfg: &StepConfig, schema: &Schema, date_column: &str) -> Vec<(String, String)> {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let data: Vec<&str> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| !is_system_column(n, date_column))
        .filter(|n| *schema.field_with_name(n).map(|f| f.data_type()).unwrap_or(&DataType::Null) != DataType::Null)
        .collect();
    let mut out: Vec<(String, String)> = match cfg {
        StepConfig::Map(f) => {
            let mut out: Vec<(String, String)> = data
                .iter()
                .map(|n| match f.0.iter().find(|(name, _)| name == n) {
                    Some((name, sql)) => (name.clone(), sql.clone()),
                    None => (n.to_string(), quote(n)),
                })
                .collect();
            for (name, sql) in &f.0 {
                if !out.iter().any(|(n, _)| n == name) {
                    out.push((name.clone(), sql.clone()));
                }
            }
            out
        }
        StepConfig::Select(f) => f.0.clone(),
        StepConfig::Drop(drop) => data.iter().filter(|n| !drop.iter().any(|d| d == *n)).map(|n| (n.to_string(), quote(n))).collect(),
        _ => Vec::new(),
    };
    for f in schema.fields() {
        if is_system_column(f.name(), date_column) && !out.iter().any(|(n, _)| n == f.name()) {
            out.push((f.name().clone(), quote(f.name())));
        }
    }
    out
}
