//! A running pipeline: reads its source streams in flushes, converts each flush to Arrow,
//! applies the steps to whole batches and hands the result to its sinks; then checkpoints.
//!
//! The checkpoint protocol (hand-written: it is the exactly-once guarantee):
//! - The pipeline's position in each source partition is the log consumer offset
//!   `pipeline.<name>`, committed only after every sink has durably accepted the flush.
//! - Every commit to a lake sink's table (and to `<name>__dlq`) carries, for each source
//!   partition of the flush, the Delta transaction identifier `sluice:<name>:<stream>:<p>`
//!   with the last offset included. After a crash the pipeline restarts from its consumer
//!   offsets; rows at or below a table's identifier are already in that table and are skipped.
//!   So the lake (and the dead-letter table) get each record exactly once.
//! - Dead letters also go to the stream `<name>__dlq`, exactly once as well: each carries its
//!   source stream, partition and offset, and a re-run appends only those past the highest
//!   offset per source partition that the stream already holds (found by reading it at start).
//! - Stream sinks are at-least-once: records of a flush re-run after a crash are appended
//!   again.
//! - The source schema the converter inferred is persisted before any commit of the flush
//!   that evolved it, so a re-run converts (accepts, rejects) exactly as the first run did.
//! - Besides its `from` streams, a pipeline reads its replay stream `<name>__replay` (what
//!   `sluice replay` feeds it), under the same protocol.
//! - A pipeline halted for a reload stops only between checkpoints, so its successor resumes
//!   exactly where it stopped.

use crate::step::{is_system_column, Output, Step, StepStats};
use deltalake::arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef};
use deltalake::arrow::ipc::{reader::StreamReader, writer::StreamWriter};
use deltalake::arrow::json::writer::LineDelimitedWriter;
use sluice_core::pipeline::{PipelineConfig, SinkConfig};
use sluice_lake::convert::{self, ConvertOptions, InputRecord, OFFSET_COLUMN, PARTITION_COLUMN};
use sluice_lake::delta::{LakeError, LakeTable};
use sluice_log::{Collected, FlushPolicy, Record, Stream};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The log consumer name of a pipeline.
pub fn consumer_name(pipeline: &str) -> String {
    format!("pipeline.{pipeline}")
}

/// The Delta transaction identifier of one source partition of a pipeline.
pub fn app_id(pipeline: &str, stream: &str, partition: u32) -> String {
    format!("sluice:{pipeline}:{stream}:{partition}")
}

/// A sink outside Sluice's log and lake (webhook, PostgreSQL, Redis), built by a connector in
/// `sluice-connect`. At-least-once: a flush that re-runs after a crash is written
/// again, so writes should be idempotent by key where the destination allows.
pub trait ExternalSink: Send + Sync {
    /// Writes the rows (system columns included; see [`rows_to_json`]) and returns once the
    /// destination has accepted them durably. An error fails the flush, which is retried.
    fn write<'a>(&'a self, batches: &'a [RecordBatch]) -> futures::future::BoxFuture<'a, anyhow::Result<usize>>;
}

/// Each row as a JSON object without the system columns (`_partition`, `_offset`, the date
/// column) and without NULL fields.
pub fn rows_to_json(b: &RecordBatch, date_column: &str) -> anyhow::Result<Vec<bytes::Bytes>> {
    let keep: Vec<usize> = (0..b.num_columns())
        .filter(|i| {
            let f = b.schema_ref().field(*i).clone();
            !is_system_column(f.name(), date_column) && f.data_type() != &DataType::Null
        })
        .collect();
    let data = b.project(&keep)?;
    let mut buf = Vec::with_capacity(data.get_array_memory_size());
    {
        let mut w = LineDelimitedWriter::new(&mut buf);
        w.write(&data)?;
        w.finish()?;
    }
    let buf = bytes::Bytes::from(buf);
    let mut out = Vec::with_capacity(b.num_rows());
    let mut start = 0;
    for (i, c) in buf.iter().enumerate() {
        if *c == b'\n' {
            out.push(buf.slice(start..i));
            start = i + 1;
        }
    }
    Ok(out)
}

/// Everything needed to run one pipeline.
pub struct PipelineSpec {
    pub name: String,
    pub cfg: PipelineConfig,
    /// The `from` streams, in order.
    pub sources: Vec<Arc<Stream>>,
    /// Target streams of stream sinks, by stream name.
    pub outputs: HashMap<String, Arc<Stream>>,
    /// The dead-letter stream `<name>__dlq`.
    pub dlq: Arc<Stream>,
    /// External sinks (webhook, ...), by sink name.
    pub externals: HashMap<String, Arc<dyn ExternalSink>>,
    /// Per `lookup` step (index into `cfg.steps`), where it finds rows.
    pub lookups: HashMap<usize, Arc<dyn crate::LookupSource>>,
    pub lake_root: String,
    /// Where the pipeline keeps its state (the inferred source schemas).
    pub state_dir: PathBuf,
    pub flush: FlushPolicy,
    pub date_column: String,
}

/// Live state of a pipeline, for `/v1/pipelines` and `/metrics`.
#[derive(Debug)]
pub struct PipelineStatus {
    pub name: String,
    /// Per source stream: (name, per partition the next offset to process).
    pub positions: Vec<(String, Vec<AtomicU64>)>,
    pub steps: Vec<(String, Arc<StepStats>)>,
    /// Per sink: (name, records written).
    pub sinks: Vec<(String, AtomicU64)>,
    pub records_in: AtomicU64,
    pub dead_letters: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Unix milliseconds of the last checkpoint (0: none yet).
    pub last_checkpoint_ms: AtomicI64,
    pub last_error: parking_lot::Mutex<Option<String>>,
    /// Live views for `sluice tap`.
    pub taps: Taps,
}

/// Where a tap looks: the records as read from the sources (before any step) or the output
/// of step `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapPoint {
    Input,
    Step(usize),
}

/// Live views of what passes a point of the pipeline (`sluice tap`). Best effort: records are
/// offered to each subscriber's bounded channel and dropped when it is full, so a slow or
/// stuck viewer never slows the pipeline. Costs nothing while nobody watches.
#[derive(Debug, Default)]
pub struct Taps {
    active: std::sync::atomic::AtomicBool,
    subscribers: parking_lot::Mutex<Vec<(TapPoint, tokio::sync::mpsc::Sender<bytes::Bytes>)>>,
}

impl Taps {
    /// Records passing `at`, each a JSON line (system columns left out).
    pub fn subscribe(&self, at: TapPoint, capacity: usize) -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let mut subs = self.subscribers.lock();
        subs.push((at, tx));
        self.active.store(true, Ordering::Release);
        rx
    }

    fn publish(&self, at: TapPoint, b: &RecordBatch, date_column: &str) {
        if !self.active.load(Ordering::Acquire) || b.num_rows() == 0 {
            return;
        }
        let mut subs = self.subscribers.lock();
        subs.retain(|(_, tx)| !tx.is_closed());
        self.active.store(!subs.is_empty(), Ordering::Release);
        if !subs.iter().any(|(p, _)| *p == at) {
            return;
        }
        let Ok(lines) = rows_to_json(b, date_column) else { return };
        for (_, tx) in subs.iter().filter(|(p, _)| *p == at) {
            for l in &lines {
                let mut line = Vec::with_capacity(l.len() + 1);
                line.extend_from_slice(l);
                line.push(b'\n');
                if tx.try_send(bytes::Bytes::from(line)).is_err() {
                    break;
                }
            }
        }
    }
}

/// A record that failed: it goes to `<pipeline>__dlq` with the step and the error.
struct DeadLetter {
    stream: usize,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    step: String,
    error: String,
    raw: String,
}

/// What one sink gets from a flush.
enum SinkData {
    /// (source stream, rows)
    Lake(Vec<(usize, RecordBatch)>),
    /// Per target partition, records in order.
    Stream(Vec<Vec<Record>>),
    External(Vec<RecordBatch>),
}

/// One flush, processed and ready to write.
struct Prepared {
    sinks: Vec<SinkData>,
    dead: Vec<DeadLetter>,
    /// Per source stream and partition: (first, last) offset in this flush.
    range: Vec<Vec<Option<(u64, u64)>>>,
    /// Records read, and how long converting them and running the steps took.
    records: usize,
    prepare_time: std::time::Duration,
}

/// What preparing a flush needs and changes: the inferred schemas and the steps' caches.
struct Prep {
    schemas: Vec<Option<SchemaRef>>,
    steps: Vec<Step>,
}

/// A lake sink's table and what it already holds.
struct LakeOut {
    table_name: String,
    partition_by: Vec<String>,
    table: Option<LakeTable>,
    /// Per source stream and partition: the last offset the table holds (-1: none).
    done: Vec<Vec<i64>>,
}

enum SinkRt {
    Lake(LakeOut),
    Stream(Arc<Stream>),
    External(Arc<dyn ExternalSink>, Option<RateLimit>),
}

/// Paces writes to at most `per_second` records per second, averaged over a second: a write
/// of n records takes n / per_second seconds of the budget, and waits while the budget is
/// spent. The pipeline writes in chunks of a second's worth, so a large flush is spread out.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    next_free: tokio::time::Instant,
}

impl RateLimit {
    pub fn new(per_second: f64) -> RateLimit {
        RateLimit { per_second, next_free: tokio::time::Instant::now() }
    }

    /// Records per chunk.
    pub fn chunk(&self) -> usize {
        (self.per_second.ceil() as usize).max(1)
    }

    /// Waits until `n` more records may go.
    pub async fn acquire(&mut self, n: usize) {
        let start = self.reserve(tokio::time::Instant::now(), n);
        tokio::time::sleep_until(start).await;
    }

    /// When `n` records asked for at `now` may go; books their share of the budget.
    fn reserve(&mut self, now: tokio::time::Instant, n: usize) -> tokio::time::Instant {
        let start = self.next_free.max(now);
        self.next_free = start + Duration::from_secs_f64(n as f64 / self.per_second);
        start
    }
}

/// `batches` cut into groups of at most `rows` rows, in order.
fn chunks_of(batches: Vec<RecordBatch>, rows: usize) -> Vec<Vec<RecordBatch>> {
    let mut out: Vec<Vec<RecordBatch>> = Vec::new();
    let mut current: Vec<RecordBatch> = Vec::new();
    let mut n = 0;
    for b in batches {
        let mut start = 0;
        while start < b.num_rows() {
            let take = (rows - n).min(b.num_rows() - start);
            current.push(b.slice(start, take));
            start += take;
            n += take;
            if n == rows {
                out.push(std::mem::take(&mut current));
                n = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// What the commit stage owns.
struct Writers {
    sinks: Vec<SinkRt>,
    dlq: LakeOut,
    /// Per source stream and partition: the last offset whose dead letter the dead-letter
    /// stream holds (-1: none).
    dlq_stream_done: Vec<Vec<i64>>,
}

/// Runs one pipeline. Start it with [`Pipeline::run`] on its own task.
pub struct Pipeline {
    spec: PipelineSpec,
    sink_names: Vec<String>,
    status: Arc<PipelineStatus>,
    step_stats: Vec<Arc<StepStats>>,
}

impl Pipeline {
    pub fn new(spec: PipelineSpec) -> Pipeline {
        let sink_names: Vec<String> = spec.cfg.to.keys().cloned().collect();
        let steps = new_steps(&spec, &sink_names);
        let step_stats: Vec<Arc<StepStats>> = steps.iter().map(|s| s.stats.clone()).collect();
        let status = Arc::new(PipelineStatus {
            name: spec.name.clone(),
            positions: spec
                .sources
                .iter()
                .map(|s| (s.name().to_string(), s.partitions().iter().map(|_| AtomicU64::new(0)).collect()))
                .collect(),
            steps: steps.iter().map(|s| (s.label.clone(), s.stats.clone())).collect(),
            sinks: sink_names.iter().map(|n| (n.clone(), AtomicU64::new(0))).collect(),
            records_in: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            last_checkpoint_ms: AtomicI64::new(0),
            last_error: parking_lot::Mutex::new(None),
            taps: Taps::default(),
        });
        Pipeline { spec, sink_names, status, step_stats }
    }

    pub fn status(&self) -> Arc<PipelineStatus> {
        self.status.clone()
    }

    fn dlq_name(&self) -> String {
        format!("{}{}", self.spec.name, sluice_core::DLQ_SUFFIX)
    }

    /// Processes records until `shutdown` turns true; then everything durable at that
    /// moment, and returns. Like the lake sink, writing one flush overlaps with reading and
    /// processing the next; any error drops both and restarts from the checkpoint.
    ///
    /// When `halt` turns true (a reload replaces or removes the pipeline), returns as soon
    /// as the flush being written is checkpointed, without waiting for the log to drain; what
    /// was read ahead is dropped and read again by whatever runs next from the checkpoint.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, mut halt: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut state: Option<(Vec<Vec<u64>>, Writers)> = None;
        let mut prep: Option<Prep> = None;
        let mut pending: Option<Prepared> = None;
        loop {
            if *halt.borrow() {
                return;
            }
            let stopping = *shutdown.borrow();
            if state.is_none() {
                match self.init().await {
                    Ok((st, p)) => {
                        state = Some(st);
                        prep = Some(p);
                        pending = None;
                    }
                    Err(e) => {
                        self.fail(&e);
                        if stopping {
                            return;
                        }
                        pause(backoff, &mut halt).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            let Some((next, writers)) = state.as_mut() else { continue };
            let result: anyhow::Result<bool> = match pending.take() {
                None => match tokio::select! {
                    r = self.read_and_prepare(next, &mut prep, &mut shutdown) => r,
                    Ok(_) = halt.wait_for(|h| *h) => return,
                } {
                    Ok(Some(p)) => {
                        pending = Some(p);
                        Ok(true)
                    }
                    Ok(None) => Ok(!stopping),
                    Err(e) => Err(e),
                },
                Some(p) => {
                    // Reading ahead gives up when halted (the commit always finishes).
                    let ahead = async {
                        tokio::select! {
                            r = self.read_and_prepare(next, &mut prep, &mut shutdown) => Some(r),
                            Ok(_) = halt.wait_for(|h| *h) => None,
                        }
                    };
                    let (committed, ahead) = sluice_log::commit_while_reading(self.commit(writers, p), ahead).await;
                    match (committed, ahead) {
                        (Ok(()), Some(Some(Ok(p2)))) => {
                            let more = p2.is_some();
                            pending = p2;
                            Ok(more || !stopping)
                        }
                        (Ok(()), Some(None)) => return,
                        (Err(e), _) | (_, Some(Some(Err(e)))) => Err(e),
                        (Ok(()), None) => Err(anyhow::anyhow!("reading ahead stopped")),
                    }
                }
            };
            match result {
                Ok(true) => {
                    backoff = Duration::from_millis(100);
                    *self.status.last_error.lock() = None;
                }
                Ok(false) => return,
                Err(e) => {
                    self.fail(&e);
                    state = None;
                    pending = None;
                    if stopping && backoff > Duration::from_secs(5) {
                        return;
                    }
                    pause(backoff, &mut halt).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn fail(&self, e: &anyhow::Error) {
        tracing::error!(pipeline = self.spec.name, error = format!("{e:#}"), "pipeline");
        metrics::counter!("sluice_pipeline_errors_total", "pipeline" => self.spec.name.clone()).increment(1);
        *self.status.last_error.lock() = Some(format!("{e:#}"));
    }

    /// Reads positions (consumer offsets) and what each table holds; loads the schemas.
    async fn init(&self) -> anyhow::Result<((Vec<Vec<u64>>, Writers), Prep)> {
        let consumer = consumer_name(&self.spec.name);
        let mut next = Vec::new();
        for (s, stream) in self.spec.sources.iter().enumerate() {
            let mut v = Vec::new();
            for p in stream.partitions() {
                let n = p.committed_offset(&consumer).unwrap_or(0).max(p.log_start_offset()).min(p.next_offset());
                // Commit at once so retention keeps what this pipeline has not processed.
                p.commit_offset(&consumer, n)?;
                self.status.positions[s].1[p.id() as usize].store(n, Ordering::Release);
                v.push(n);
            }
            next.push(v);
        }
        let mut sinks = Vec::new();
        for (name, cfg) in &self.spec.cfg.to {
            sinks.push(match cfg {
                SinkConfig::Lake(l) => SinkRt::Lake(
                    self.open_lake(l.table.clone().unwrap_or_else(|| name.clone()), l.partition_by.clone()).await?,
                ),
                SinkConfig::Stream(s) => SinkRt::Stream(
                    self.spec
                        .outputs
                        .get(&s.stream)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("sink {name}: stream {:?} is not open", s.stream))?,
                ),
                _ => SinkRt::External(
                    self.spec.externals.get(name).cloned().ok_or_else(|| anyhow::anyhow!("sink {name} has no connector"))?,
                    cfg.rate_limit().map(RateLimit::new),
                ),
            });
        }
        let dlq = self.open_lake(self.dlq_name(), Vec::new()).await?;
        let dlq_stream_done = self.dead_letters_in_stream()?;
        let mut schemas = Vec::new();
        for s in &self.spec.sources {
            schemas.push(load_schema(&self.schema_path(s.name()))?);
        }
        let prep = Prep { schemas, steps: new_steps(&self.spec, &self.sink_names) };
        // Counters continue across restarts of the task: reuse the status's step stats.
        let prep = Prep {
            steps: prep
                .steps
                .into_iter()
                .zip(&self.step_stats)
                .map(|(mut s, st)| {
                    s.stats = st.clone();
                    s
                })
                .collect(),
            ..prep
        };
        Ok(((next, Writers { sinks, dlq, dlq_stream_done }), prep))
    }

    async fn open_lake(&self, table_name: String, partition_by: Vec<String>) -> anyhow::Result<LakeOut> {
        let table = LakeTable::open(&self.spec.lake_root, &table_name).await?;
        let done = self
            .spec
            .sources
            .iter()
            .map(|s| {
                s.partitions()
                    .iter()
                    .map(|p| {
                        let app = app_id(&self.spec.name, s.name(), p.id());
                        table.as_ref().and_then(|t| t.txn_version(&app)).unwrap_or(-1)
                    })
                    .collect()
            })
            .collect();
        Ok(LakeOut { table_name, partition_by, table, done })
    }

    /// Reads the dead-letter stream: per source stream and partition, the highest offset it
    /// holds a dead letter of (-1: none). Dead letters are rare, so reading it all is cheap.
    fn dead_letters_in_stream(&self) -> anyhow::Result<Vec<Vec<i64>>> {
        let mut done: Vec<Vec<i64>> = self.spec.sources.iter().map(|s| vec![-1; s.partitions().len()]).collect();
        for p in self.spec.dlq.partitions() {
            let mut from = p.log_start_offset();
            while from < p.high_watermark() {
                let records = p.read(from, 4 << 20)?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                for r in &records {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.value) else { continue };
                    let (Some(pipeline), Some(stream), Some(partition), Some(offset)) =
                        (v["pipeline"].as_str(), v["stream"].as_str(), v["partition"].as_u64(), v["offset"].as_u64())
                    else {
                        continue;
                    };
                    let Some(s) = self.spec.sources.iter().position(|s| s.name() == stream) else { continue };
                    if pipeline == self.spec.name && (partition as usize) < done[s].len() {
                        let d = &mut done[s][partition as usize];
                        *d = (*d).max(offset as i64);
                    }
                }
            }
        }
        Ok(done)
    }

    fn schema_path(&self, stream: &str) -> PathBuf {
        self.spec.state_dir.join(format!("{stream}.schema"))
    }

    async fn read_and_prepare(
        &self,
        next: &mut [Vec<u64>],
        prep: &mut Option<Prep>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Prepared>> {
        let records = sluice_log::collect(&self.spec.sources, next, self.spec.flush, shutdown).await;
        let records = records?;
        if records.is_empty() {
            return Ok(None);
        }
        self.status.records_in.fetch_add(records.len() as u64, Ordering::Relaxed);
        let mut p = prep.take().ok_or_else(|| anyhow::anyhow!("pipeline state lost after an earlier error"))?;
        let ctx = PrepareCtx {
            pipeline: self.spec.name.clone(),
            status: self.status.clone(),
            sources: self.spec.sources.iter().map(|s| s.name().to_string()).collect(),
            schema_paths: self.spec.sources.iter().map(|s| self.schema_path(s.name())).collect(),
            sinks: self
                .spec
                .cfg
                .to
                .values()
                .map(|c| match c {
                    SinkConfig::Lake(_) => SinkKind::Lake,
                    SinkConfig::Stream(s) => SinkKind::Stream(self.spec.outputs.get(&s.stream).map_or(1, |t| t.partitions().len())),
                    _ => SinkKind::External,
                })
                .collect(),
            date_column: self.spec.date_column.clone(),
        };
        let (p, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = prepare(&ctx, &mut p, &records);
            (p, prepared)
        })
        .await?;
        *prep = Some(p);
        prepared.map(Some)
    }

    /// Writes one flush: lake sinks, stream sinks, dead letters; then the checkpoint.
    async fn commit(&self, w: &mut Writers, p: Prepared) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let Prepared { sinks, mut dead, range, records, prepare_time } = p;
        let txns = self.txns(&range);
        let mut refused = Vec::new();
        // Lake tables first, all at once: each is its own Delta transaction, so they commit
        // independently, and a route's tables then share the cores instead of taking turns.
        let mut lakes = Vec::new();
        let mut others = Vec::new();
        for (i, (rt, data)) in w.sinks.iter_mut().zip(sinks).enumerate() {
            match (rt, data) {
                (SinkRt::Lake(out), SinkData::Lake(batches)) => lakes.push((i, out, batches)),
                other => others.push((i, other)),
            }
        }
        let date = self.spec.date_column.as_str();
        let lake_results = futures::future::join_all(lakes.into_iter().map(|(i, out, batches)| {
            let txns = &txns;
            async move {
                let mut dead = Vec::new();
                let written = self.write_lake(out, batches, txns, date, &mut dead).await;
                (i, written, dead)
            }
        }))
        .await;
        for (i, written, d) in lake_results {
            dead.extend(d);
            let written = written?.unwrap_or_else(|| {
                refused.push(i);
                0
            });
            fault_point();
            self.status.sinks[i].1.fetch_add(written as u64, Ordering::Relaxed);
            metrics::counter!("sluice_pipeline_sink_records_total", "pipeline" => self.spec.name.clone(), "sink" => self.sink_names[i].clone())
                .increment(written as u64);
        }
        for (i, (rt, data)) in others {
            let written = match (rt, data) {
                (SinkRt::Stream(stream), SinkData::Stream(parts)) => write_stream(stream, parts).await?,
                (SinkRt::External(sink, limit), SinkData::External(batches)) => {
                    let name = &self.sink_names[i];
                    match limit {
                        _ if batches.is_empty() => 0,
                        None => sink.write(&batches).await.map_err(|e| e.context(format!("sink {name}")))?,
                        Some(limit) => {
                            let mut n = 0;
                            for chunk in chunks_of(batches, limit.chunk()) {
                                limit.acquire(chunk.iter().map(|b| b.num_rows()).sum()).await;
                                n += sink.write(&chunk).await.map_err(|e| e.context(format!("sink {name}")))?;
                            }
                            n
                        }
                    }
                }
                _ => anyhow::bail!("sink {} got data of another kind", self.sink_names[i]),
            };
            fault_point();
            self.status.sinks[i].1.fetch_add(written as u64, Ordering::Relaxed);
            metrics::counter!("sluice_pipeline_sink_records_total", "pipeline" => self.spec.name.clone(), "sink" => self.sink_names[i].clone())
                .increment(written as u64);
        }
        if !dead.is_empty() {
            let n = self.write_dead_letters(w, dead, &txns).await?;
            self.status.dead_letters.fetch_add(n as u64, Ordering::Relaxed);
            metrics::counter!("sluice_pipeline_dlq_records_total", "pipeline" => self.spec.name.clone()).increment(n as u64);
        }
        fault_point();
        // A table that refused the flush records it as handled now that its dead letters
        // are committed.
        for i in refused {
            if let SinkRt::Lake(out) = &mut w.sinks[i] {
                if let Some(t) = out.table.as_mut() {
                    t.append(Vec::new(), &txns).await?;
                    mark_done(out, &txns, &self.spec.sources, &self.spec.name);
                }
            }
        }
        let consumer = consumer_name(&self.spec.name);
        for (s, stream) in self.spec.sources.iter().enumerate() {
            for (pi, r) in range[s].iter().enumerate() {
                if let Some((_, last)) = r {
                    stream.partitions()[pi].commit_offset(&consumer, last + 1)?;
                    self.status.positions[s].1[pi].store(last + 1, Ordering::Release);
                }
            }
        }
        self.status.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.status.last_checkpoint_ms.store(sluice_core::time::now_ms(), Ordering::Relaxed);
        tracing::debug!(
            pipeline = self.spec.name,
            records,
            prepare_ms = prepare_time.as_millis() as u64,
            commit_ms = started.elapsed().as_millis() as u64,
            "checkpoint"
        );
        Ok(())
    }

    fn txns(&self, range: &[Vec<Option<(u64, u64)>>]) -> Vec<(String, i64)> {
        let mut txns = Vec::new();
        for (s, stream) in self.spec.sources.iter().enumerate() {
            for (p, r) in range[s].iter().enumerate() {
                if let Some((_, last)) = r {
                    txns.push((app_id(&self.spec.name, stream.name(), p as u32), *last as i64));
                }
            }
        }
        txns
    }

    /// Appends rows to a lake sink's table, skipping rows it already holds. Returns the rows
    /// written, or None when the table cannot store them (a type that does not fit): then
    /// they are added to `dead` and nothing is written.
    async fn write_lake(
        &self,
        out: &mut LakeOut,
        batches: Vec<(usize, RecordBatch)>,
        txns: &[(String, i64)],
        date_column: &str,
        dead: &mut Vec<DeadLetter>,
    ) -> anyhow::Result<Option<usize>> {
        let mut fresh: Vec<(usize, RecordBatch)> = Vec::new();
        for (s, b) in batches {
            let b = without_null_columns(&skip_done(&b, &out.done[s])?);
            if b.num_rows() > 0 {
                fresh.push((s, b));
            }
        }
        if fresh.is_empty() {
            return Ok(Some(0));
        }
        let rows: usize = fresh.iter().map(|(_, b)| b.num_rows()).sum();
        if out.table.is_none() {
            let first = with_partition_columns(&fresh[0].1, &out.partition_by);
            let mut cols = vec![date_column.to_string()];
            cols.extend(out.partition_by.iter().cloned());
            // A new table takes these rows in the commit that creates it. Rows that do not fit
            // one schema take the path below (created from the first, widened, appended; what
            // still does not fit becomes dead letters).
            let plain: Vec<RecordBatch> = fresh.iter().map(|(_, b)| with_partition_columns(b, &out.partition_by)).collect();
            match LakeTable::create_with_rows(&self.spec.lake_root, &out.table_name, &first.schema(), &cols, plain, txns).await {
                Ok(table) => {
                    out.table = Some(table);
                    mark_done(out, txns, &self.spec.sources, &self.spec.name);
                    return Ok(Some(rows));
                }
                Err(LakeError::Schema { .. }) => {
                    out.table = Some(LakeTable::create(&self.spec.lake_root, &out.table_name, &first.schema(), &cols).await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let table = out.table.as_mut().expect("created above");
        widen_if_needed(table, &fresh).await?;
        let plain: Vec<RecordBatch> = fresh.iter().map(|(_, b)| with_partition_columns(b, &out.partition_by)).collect();
        match table.append(plain, txns).await {
            Ok(_) => {}
            Err(LakeError::Schema { message, .. }) => {
                // Nothing was written: these rows cannot go to this table as they are. They
                // become dead letters; the caller records the flush in this table only after
                // the dead letters are committed.
                for (s, b) in &fresh {
                    for (partition, offset) in positions(b)? {
                        dead.push(DeadLetter {
                            stream: *s,
                            partition,
                            offset,
                            timestamp_ms: 0,
                            step: format!("sink {}", out.table_name),
                            error: message.clone(),
                            raw: String::new(),
                        });
                    }
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        mark_done(out, txns, &self.spec.sources, &self.spec.name);
        Ok(Some(rows))
    }

    /// Writes dead letters to the dead-letter table and stream, skipping those either already
    /// holds. Returns how many are new to the table.
    async fn write_dead_letters(&self, w: &mut Writers, mut dead: Vec<DeadLetter>, txns: &[(String, i64)]) -> anyhow::Result<usize> {
        let (dlq, in_stream) = (&mut w.dlq, &mut w.dlq_stream_done);
        dead.retain(|d| {
            let (s, p, o) = (d.stream, d.partition as usize, d.offset as i64);
            o > dlq.done[s][p] || o > in_stream[s][p]
        });
        // Dead letters found at a sink carry no raw text yet: fill it from the log.
        for d in dead.iter_mut().filter(|d| d.raw.is_empty()) {
            let p = &self.spec.sources[d.stream].partitions()[d.partition as usize];
            if let Some(r) = p.read(d.offset, 1)?.into_iter().find(|r| r.offset == d.offset) {
                d.raw = String::from_utf8_lossy(&r.value).into_owned();
                d.timestamp_ms = r.timestamp_ms;
            }
        }
        let for_table: Vec<&DeadLetter> = dead.iter().filter(|d| d.offset as i64 > dlq.done[d.stream][d.partition as usize]).collect();
        let n = for_table.len();
        if n > 0 {
            let batch = dead_letter_batch(&for_table, &self.spec.sources, &self.spec.date_column)?;
            if dlq.table.is_none() {
                dlq.table = Some(LakeTable::create(&self.spec.lake_root, &dlq.table_name, &batch.schema(), &[self.spec.date_column.clone()]).await?);
            }
            dlq.table.as_mut().expect("created above").append(vec![batch], txns).await?;
            mark_done(dlq, txns, &self.spec.sources, &self.spec.name);
        }
        fault_point();
        let now = sluice_core::time::now_ms();
        let records: Vec<Record> = dead
            .iter()
            .filter(|d| d.offset as i64 > in_stream[d.stream][d.partition as usize])
            .map(|d| dead_letter_record(d, &self.spec.name, self.spec.sources[d.stream].name(), now))
            .collect();
        if !records.is_empty() {
            write_stream(&self.spec.dlq, vec![records]).await?;
            for d in &dead {
                let done = &mut in_stream[d.stream][d.partition as usize];
                *done = (*done).max(d.offset as i64);
            }
        }
        Ok(n)
    }
}

/// Sleeps, or less if `halt` turns true.
async fn pause(d: Duration, halt: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        Ok(_) = halt.wait_for(|h| *h) => {}
    }
}

/// Crash tests set `SLUICE_FAULT_CRASH_PIPELINE` to a probability: the process aborts at that
/// rate after each sink write and before the checkpoint — the moments where a crash must
/// neither lose nor duplicate records, and which a kill from outside rarely hits.
fn fault_point() {
    static RATE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let rate = *RATE.get_or_init(|| std::env::var("SLUICE_FAULT_CRASH_PIPELINE").ok().and_then(|v| v.parse().ok()).unwrap_or(0.0));
    if rate > 0.0 && fastrand::f64() < rate {
        eprintln!("SLUICE_FAULT_CRASH_PIPELINE: aborting");
        std::process::abort();
    }
}

fn new_steps(spec: &PipelineSpec, sink_names: &[String]) -> Vec<Step> {
    spec.cfg
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut step = Step::new(i, s, sink_names, &spec.date_column);
            step.set_state_dir(&spec.state_dir);
            if let Some(source) = spec.lookups.get(&i) {
                step.set_lookup_source(source.clone());
            }
            step
        })
        .collect()
}

/// Records that a table now holds the flush whose txns these are.
fn mark_done(out: &mut LakeOut, txns: &[(String, i64)], sources: &[Arc<Stream>], pipeline: &str) {
    for (s, stream) in sources.iter().enumerate() {
        for p in stream.partitions() {
            let app = app_id(pipeline, stream.name(), p.id());
            if let Some((_, v)) = txns.iter().find(|(a, _)| *a == app) {
                out.done[s][p.id() as usize] = *v;
            }
        }
    }
}

enum SinkKind {
    Lake,
    /// With the target stream's partition count.
    Stream(usize),
    External,
}

struct PrepareCtx {
    pipeline: String,
    status: Arc<PipelineStatus>,
    sources: Vec<String>,
    schema_paths: Vec<PathBuf>,
    sinks: Vec<SinkKind>,
    date_column: String,
}

/// Converts, runs the steps, and lays out what each sink gets (CPU work, off the runtime).
fn prepare(ctx: &PrepareCtx, prep: &mut Prep, records: &[Collected]) -> anyhow::Result<Prepared> {
    let started = std::time::Instant::now();
    let mut range: Vec<Vec<Option<(u64, u64)>>> = Vec::new();
    let mut by_stream: Vec<Vec<InputRecord>> = vec![Vec::new(); ctx.sources.len()];
    for c in records {
        let r = &mut by_stream[c.stream];
        r.push(InputRecord { partition: c.partition, offset: c.record.offset, timestamp_ms: c.record.timestamp_ms, value: &c.record.value });
    }
    for inputs in &by_stream {
        let parts = inputs.iter().map(|r| r.partition as usize + 1).max().unwrap_or(0);
        let mut v: Vec<Option<(u64, u64)>> = vec![None; parts];
        for r in inputs {
            let e = &mut v[r.partition as usize];
            *e = Some(e.map_or((r.offset, r.offset), |(f, _)| (f, r.offset)));
        }
        range.push(v);
    }
    let mut sinks: Vec<Vec<(usize, RecordBatch)>> = vec![Vec::new(); ctx.sinks.len()];
    let mut dead = Vec::new();
    let copts = ConvertOptions { date_column: ctx.date_column.clone(), ..Default::default() };
    for (s, inputs) in by_stream.iter().enumerate() {
        if inputs.is_empty() {
            continue;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(inputs.len() / 16_384).max(1);
        let converted = convert::convert_parallel(prep.schemas[s].as_deref(), inputs, &copts, threads);
        if prep.schemas[s].as_ref() != Some(&converted.schema) {
            save_schema(&ctx.schema_paths[s], &converted.schema)?;
            prep.schemas[s] = Some(converted.schema.clone());
        }
        for r in converted.rejects {
            dead.push(DeadLetter {
                stream: s,
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                step: "decode".into(),
                error: r.reason,
                raw: r.raw,
            });
        }
        let mut lookup: Option<HashMap<(u32, u64), usize>> = None;
        let mut dead_letter = |step: &Step, partition: u32, offset: u64, error: String| {
            let idx = lookup
                .get_or_insert_with(|| inputs.iter().enumerate().map(|(i, r)| ((r.partition, r.offset), i)).collect())
                .get(&(partition, offset))
                .copied();
            let rec = idx.map(|i| &inputs[i]);
            DeadLetter {
                stream: s,
                partition,
                offset,
                timestamp_ms: rec.map_or(0, |r| r.timestamp_ms),
                step: step.label.clone(),
                error,
                raw: rec.map(|r| String::from_utf8_lossy(r.value).into_owned()).unwrap_or_default(),
            }
        };
        for b in &converted.batches {
            ctx.status.taps.publish(TapPoint::Input, b, &ctx.date_column);
        }
        // The leading pure steps run on every core; the rest one step at a time, each taking
        // every batch of the flush in turn (an enrich step keeps its calls going from one
        // batch to the next). Per batch: the rows for the next step, or what a route sent to
        // each sink.
        let tapped = ctx.status.taps.active.load(Ordering::Acquire);
        let (fused, mut flow) = run_pure_steps(&mut prep.steps, converted.batches, threads, tapped)?;
        for (si, took) in fused.took {
            metrics::histogram!("sluice_pipeline_step_seconds", "pipeline" => ctx.pipeline.clone(), "step" => prep.steps[si].label.clone())
                .record(took.as_secs_f64());
        }
        for (si, partition, offset, error) in fused.failed {
            dead.push(dead_letter(&prep.steps[si], partition, offset, error));
        }
        for (si, step) in prep.steps.iter_mut().enumerate().skip(fused.steps) {
            let live: Vec<usize> = (0..flow.len()).filter(|&i| flow[i].0.is_some()).collect();
            if live.is_empty() {
                break;
            }
            let batches: Vec<RecordBatch> = live.iter().filter_map(|&i| flow[i].0.take()).collect();
            let input_positions = batches.iter().map(positions).collect::<anyhow::Result<Vec<_>>>()?;
            step.set_source(s as u32);
            let results = step.apply_all(batches);
            if let Some(e) = step.take_fatal() {
                anyhow::bail!(e);
            }
            for ((i, (out, failures, took)), input_positions) in live.into_iter().zip(results).zip(input_positions) {
                metrics::histogram!("sluice_pipeline_step_seconds", "pipeline" => ctx.pipeline.clone(), "step" => step.label.clone())
                    .record(took.as_secs_f64());
                for f in failures {
                    let (partition, offset) = input_positions[f.row];
                    dead.push(dead_letter(step, partition, offset, f.error));
                }
                match out {
                    Some(Output::Rows(b)) => {
                        ctx.status.taps.publish(TapPoint::Step(si), &b, &ctx.date_column);
                        flow[i].0 = Some(b);
                    }
                    Some(Output::Routed { sinks: r, .. }) => {
                        for (_, b) in &r {
                            ctx.status.taps.publish(TapPoint::Step(si), b, &ctx.date_column);
                        }
                        flow[i].1 = Some(r);
                    }
                    None => {}
                }
            }
        }
        for (current, routed) in flow {
            let outs: Vec<(usize, RecordBatch)> = match (current, routed) {
                (_, Some(r)) => r,
                (Some(b), None) => (0..ctx.sinks.len()).map(|i| (i, b.clone())).collect(),
                (None, None) => Vec::new(),
            };
            for (i, b) in outs {
                if b.num_rows() > 0 {
                    if let Some(v) = sinks.get_mut(i) {
                        v.push((s, b));
                    }
                }
            }
        }
    }
    let mut data = Vec::with_capacity(sinks.len());
    for (i, batches) in sinks.into_iter().enumerate() {
        data.push(match ctx.sinks[i] {
            SinkKind::Lake => SinkData::Lake(batches),
            SinkKind::Stream(parts) => SinkData::Stream(to_records(&batches, records, parts, &ctx.date_column)?),
            SinkKind::External => SinkData::External(batches.into_iter().map(|(_, b)| b).collect()),
        });
    }
    Ok(Prepared { sinks: data, dead, range, records: records.len(), prepare_time: started.elapsed() })
}

/// A batch on its way through the steps: the rows for the next step, or what a route sent
/// to each sink.
type Flow = (Option<RecordBatch>, Option<Vec<(usize, RecordBatch)>>);

/// What [`run_pure_steps`] ran: how many leading steps, how long each took on each batch, and
/// the rows they failed (step, partition, offset, error).
#[derive(Default)]
struct Fused {
    steps: usize,
    took: Vec<(usize, Duration)>,
    failed: Vec<(usize, u32, u64, String)>,
}

/// Runs the leading pure steps (filter, map/select/drop, route: [`Step::is_pure`]) of a flush
/// on up to `threads` threads at once, each thread taking a contiguous run of batches through
/// all of them, so that they do not hold up the flush on one core. The steps are compiled
/// first, on an empty batch of the flush's fields. Runs none while someone taps (taps see a
/// step's batches in order), for fewer than two batches, or when the batches' fields differ.
/// Returns what it ran and each batch's flow for the remaining steps.
fn run_pure_steps(steps: &mut [Step], batches: Vec<RecordBatch>, threads: usize, tapped: bool) -> anyhow::Result<(Fused, Vec<Flow>)> {
    let mut fused = Fused::default();
    let unfused = |fused, batches: Vec<RecordBatch>| Ok((fused, batches.into_iter().map(|b| (Some(b), None)).collect()));
    let first = batches.first().map(|b| b.schema());
    let fusable = steps.iter().take_while(|s| s.is_pure()).count();
    if fusable == 0 || threads < 2 || batches.len() < 2 || tapped || batches.iter().any(|b| Some(b.schema()) != first) {
        return unfused(fused, batches);
    }
    let mut b = RecordBatch::new_empty(first.expect("two batches or more"));
    for step in steps[..fusable].iter_mut() {
        match step.apply(b) {
            (Some(Output::Rows(out)), _) => {
                fused.steps += 1;
                b = out;
            }
            (Some(Output::Routed { .. }), _) => {
                fused.steps += 1;
                break;
            }
            // Does not compile for these fields (every row fails): the one-at-a-time path.
            (None, _) => break,
        }
    }
    let steps = &steps[..fused.steps];
    if steps.is_empty() {
        return unfused(fused, batches);
    }
    let per = batches.len().div_ceil(threads);
    let runs: Vec<Vec<Option<(Flow, Fused)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = batches
            .chunks(per)
            .map(|run| scope.spawn(move || run.iter().map(|b| run_pure_chain(steps, b.clone())).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut flow = Vec::with_capacity(batches.len());
    for r in runs.into_iter().flatten() {
        let (f, done) = r.ok_or_else(|| anyhow::anyhow!("a pipeline step was not compiled for its batch"))?;
        flow.push(f);
        fused.took.extend(done.took);
        fused.failed.extend(done.failed);
    }
    Ok((fused, flow))
}

/// One batch through `steps`, all compiled for its fields; `None` if one was not.
fn run_pure_chain(steps: &[Step], batch: RecordBatch) -> Option<(Flow, Fused)> {
    let mut done = Fused::default();
    let mut b = batch;
    for (si, step) in steps.iter().enumerate() {
        let started = std::time::Instant::now();
        let input = b.clone();
        let (out, failures) = step.apply_compiled(b)?;
        done.took.push((si, started.elapsed()));
        if !failures.is_empty() {
            let pos = positions(&input).ok()?;
            done.failed.extend(failures.into_iter().map(|f| (si, pos[f.row].0, pos[f.row].1, f.error)));
        }
        match out {
            Some(Output::Rows(next)) => b = next,
            Some(Output::Routed { sinks, .. }) => return Some(((None, Some(sinks)), done)),
            None => return Some(((None, None), done)),
        }
    }
    Some(((Some(b), None), done))
}

/// (partition, offset) of every row.
pub(crate) fn positions(b: &RecordBatch) -> anyhow::Result<Vec<(u32, u64)>> {
    let p = b
        .column_by_name(PARTITION_COLUMN)
        .and_then(|c| c.as_primitive_opt::<Int32Type>())
        .ok_or_else(|| anyhow::anyhow!("batch lacks {PARTITION_COLUMN}"))?;
    let o = b
        .column_by_name(OFFSET_COLUMN)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| anyhow::anyhow!("batch lacks {OFFSET_COLUMN}"))?;
    Ok(p.values().iter().zip(o.values().iter()).map(|(p, o)| (*p as u32, *o as u64)).collect())
}

/// Rows whose offset is above what the table holds for their partition.
fn skip_done(b: &RecordBatch, done: &[i64]) -> anyhow::Result<RecordBatch> {
    if done.iter().all(|d| *d < 0) {
        return Ok(b.clone());
    }
    let pos = positions(b)?;
    if pos.iter().all(|(p, o)| *o as i64 > done.get(*p as usize).copied().unwrap_or(-1)) {
        return Ok(b.clone());
    }
    let mask: BooleanArray = pos.iter().map(|(p, o)| Some(*o as i64 > done.get(*p as usize).copied().unwrap_or(-1))).collect();
    let kept = filter_record_batch(b, &mask)?;
    tracing::info!(rows = b.num_rows() - kept.num_rows(), "re-run after a restart: skipping rows the table already holds");
    Ok(kept)
}

/// Drops columns of type Null (a field no record had, or an expression of only NULLs):
/// Delta cannot store them, and they hold nothing.
fn without_null_columns(b: &RecordBatch) -> RecordBatch {
    let schema = b.schema();
    if !schema.fields().iter().any(|f| f.data_type() == &DataType::Null) {
        return b.clone();
    }
    let keep: Vec<usize> = (0..schema.fields().len()).filter(|i| schema.field(*i).data_type() != &DataType::Null).collect();
    b.project(&keep).unwrap_or_else(|_| b.clone())
}

/// A sink's partition columns must exist; a missing one is a column of NULL strings.
fn with_partition_columns(b: &RecordBatch, partition_by: &[String]) -> RecordBatch {
    let schema = b.schema();
    let missing: Vec<&String> = partition_by.iter().filter(|c| schema.field_with_name(c).is_err()).collect();
    if missing.is_empty() {
        return b.clone();
    }
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols: Vec<ArrayRef> = b.columns().to_vec();
    for m in missing {
        fields.push(Field::new(m.as_str(), DataType::Utf8, true));
        cols.push(deltalake::arrow::array::new_null_array(&DataType::Utf8, b.num_rows()));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap_or_else(|_| b.clone())
}

/// A table column that is an integer but now receives a wider integer or a double is widened
/// (the table rewritten), as the plain lake sink does for Int64 -> Float64.
async fn widen_if_needed(table: &mut LakeTable, batches: &[(usize, RecordBatch)]) -> anyhow::Result<()> {
    let current = table.arrow_schema();
    let mut widened: Option<Vec<Field>> = None;
    // Integers widen to wider integers (a changed step may compute Int64 where it computed
    // Int32) and to doubles.
    let rank = |t: &DataType| match t {
        DataType::Int8 => Some(1),
        DataType::Int16 => Some(2),
        DataType::Int32 => Some(3),
        DataType::Int64 => Some(4),
        DataType::Float64 => Some(5),
        _ => None,
    };
    for (_, b) in batches {
        for f in b.schema().fields() {
            let Some(new_rank) = rank(f.data_type()) else { continue };
            let Ok(i) = current.index_of(f.name()) else { continue };
            let fields = widened.get_or_insert_with(|| current.fields().iter().map(|f| f.as_ref().clone()).collect());
            if rank(fields[i].data_type()).is_some_and(|r| r < new_rank) {
                fields[i] = fields[i].clone().with_data_type(f.data_type().clone());
            }
        }
    }
    if widened.as_ref().is_some_and(|w| w.iter().zip(current.fields()).all(|(a, b)| a.data_type() == b.data_type())) {
        widened = None;
    }
    if let Some(fields) = widened {
        tracing::info!(table = table.name(), "widening columns: rewriting table");
        let fields: Vec<Field> = fields
            .into_iter()
            .map(|f| match f.data_type() {
                DataType::Dictionary(_, v) => f.clone().with_data_type(v.as_ref().clone()),
                _ => f,
            })
            .collect();
        table.rewrite_with_schema(Arc::new(Schema::new_with_metadata(fields, current.metadata().clone())), &[]).await?;
    }
    Ok(())
}

/// Rows as JSON records for a stream sink (system columns left out), each in target
/// partition `source partition % partitions` so one source partition's order is kept.
fn to_records(batches: &[(usize, RecordBatch)], records: &[Collected], partitions: usize, date_column: &str) -> anyhow::Result<Vec<Vec<Record>>> {
    let mut out: Vec<Vec<Record>> = vec![Vec::new(); partitions.max(1)];
    let mut ts: HashMap<(usize, u32, u64), i64> = HashMap::new();
    if !batches.is_empty() {
        ts = records.iter().map(|c| ((c.stream, c.partition, c.record.offset), c.record.timestamp_ms)).collect();
    }
    for (s, b) in batches {
        let pos = positions(b)?;
        for ((p, o), line) in pos.iter().zip(rows_to_json(b, date_column)?) {
            let t = ts.get(&(*s, *p, *o)).copied().unwrap_or_else(sluice_core::time::now_ms);
            let n = out.len();
            out[*p as usize % n].push(Record::new(line, t));
        }
    }
    Ok(out)
}

async fn write_stream(stream: &Stream, parts: Vec<Vec<Record>>) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut appended = Vec::new();
    for (p, recs) in parts.iter().enumerate() {
        if recs.is_empty() {
            continue;
        }
        let part = &stream.partitions()[p];
        appended.push((part.clone(), part.append(recs)?));
        n += recs.len();
    }
    for (part, a) in &appended {
        part.sync(a).await?;
    }
    Ok(n)
}

/// A record of the dead-letter stream: a JSON object with the pipeline, the source stream,
/// partition and offset, the step, the error, the original record (as JSON when it is, else as
/// a string), the record's log time and when it failed.
fn dead_letter_record(d: &DeadLetter, pipeline: &str, stream: &str, now_ms: i64) -> Record {
    let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let record = serde_json::from_str::<serde_json::Value>(&d.raw).unwrap_or_else(|_| serde_json::Value::String(d.raw.clone()));
    let v = serde_json::json!({
        "pipeline": pipeline,
        "stream": stream,
        "partition": d.partition,
        "offset": d.offset,
        "step": d.step,
        "error": d.error,
        "record": record,
        "timestamp": time(d.timestamp_ms),
        "failed_at": time(now_ms),
    });
    Record::new(bytes::Bytes::from(v.to_string()), now_ms)
}

/// Rows of `<pipeline>__dlq`: the source stream, partition, offset, event time, the step, the
/// error and the original record.
fn dead_letter_batch(dead: &[&DeadLetter], sources: &[Arc<Stream>], date_column: &str) -> anyhow::Result<RecordBatch> {
    use deltalake::arrow::array::{Int32Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use deltalake::arrow::datatypes::TimeUnit;
    let schema = Arc::new(Schema::new(vec![
        Field::new("stream", DataType::Utf8, true),
        Field::new("step", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, true),
        Field::new(PARTITION_COLUMN, DataType::Int32, true),
        Field::new(OFFSET_COLUMN, DataType::Int64, true),
        Field::new("timestamp", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new(date_column, DataType::Utf8, true),
    ]));
    let date = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d").to_string());
    let cols: Vec<ArrayRef> = vec![
        Arc::new(dead.iter().map(|d| Some(sources[d.stream].name())).collect::<StringArray>()),
        Arc::new(dead.iter().map(|d| Some(d.step.as_str())).collect::<StringArray>()),
        Arc::new(dead.iter().map(|d| Some(d.error.as_str())).collect::<StringArray>()),
        Arc::new(dead.iter().map(|d| Some(d.raw.as_str())).collect::<StringArray>()),
        Arc::new(dead.iter().map(|d| i32::try_from(d.partition).ok()).collect::<Int32Array>()),
        Arc::new(dead.iter().map(|d| i64::try_from(d.offset).ok()).collect::<Int64Array>()),
        Arc::new(
            TimestampMicrosecondArray::from(dead.iter().map(|d| d.timestamp_ms.checked_mul(1000)).collect::<Vec<_>>()).with_timezone("UTC"),
        ),
        Arc::new(dead.iter().map(|d| date(d.timestamp_ms)).collect::<StringArray>()),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

fn load_schema(path: &std::path::Path) -> anyhow::Result<Option<SchemaRef>> {
    match std::fs::read(path) {
        Ok(data) => {
            let reader = StreamReader::try_new(std::io::Cursor::new(data), None)
                .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
            Ok(Some(reader.schema()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("read {}: {e}", path.display())),
    }
}

/// Writes the schema durably (temp file, fsync, rename, fsync of the directory).
fn save_schema(path: &std::path::Path, schema: &Schema) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut buf, schema)?;
        w.finish()?;
    }
    Ok(sluice_core::fs::write_durably(path, &buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::Int64Array;

    fn b(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    /// Pure steps run on several threads (`run_pure_steps`) give what one step at a time
    /// gives: the same rows to the same sinks, and the same failed rows.
    #[test]
    fn pure_steps_on_threads_equal_one_at_a_time() {
        use sluice_core::pipeline::{Fields, RouteConfig, StepConfig};
        let lines: Vec<String> = (0..600)
            .map(|i| match i % 7 {
                0 => format!(r#"{{"kind":"skip","s":"{i}"}}"#),
                3 => format!(r#"{{"kind":"k","s":"x{i}"}}"#),
                _ => format!(r#"{{"kind":"k","s":"{}","n":{{"m":{i}}}}}"#, i % 13),
            })
            .collect();
        let inputs: Vec<InputRecord> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| InputRecord { partition: (i % 3) as u32, offset: i as u64, timestamp_ms: 0, value: l.as_bytes() })
            .collect();
        let opts = ConvertOptions::default();
        let schema = convert::convert(None, &inputs, &opts).schema;
        let batches: Vec<RecordBatch> =
            inputs.chunks(70).flat_map(|c| convert::convert(Some(&schema), c, &opts).batches).collect();
        assert!(batches.len() > 4);
        let steps = || {
            let cfgs = [
                StepConfig::Filter("kind <> 'skip'".into()),
                StepConfig::Map(Fields(vec![("v".into(), "CAST(s AS BIGINT) * 2".into()), ("m".into(), "n.m".into())])),
                StepConfig::Route(vec![
                    RouteConfig { to: "a".into(), when: Some("v > 10".into()) },
                    RouteConfig { to: "b".into(), when: Some("v <= 10 OR m IS NULL".into()) },
                ]),
            ];
            let sinks = ["a".to_string(), "b".to_string()];
            cfgs.iter().enumerate().map(|(i, c)| Step::new(i, c, &sinks, "event_date")).collect::<Vec<_>>()
        };
        type Routed = Vec<Vec<(usize, RecordBatch)>>;
        // One step at a time, as `prepare` runs steps that are not pure.
        let mut one = steps();
        let (mut routed, mut failed): (Routed, Vec<(usize, u32, u64, String)>) = (Vec::new(), Vec::new());
        for b in batches.clone() {
            let mut b = Some(b);
            for (si, step) in one.iter_mut().enumerate() {
                let Some(input) = b.take() else { break };
                let pos = positions(&input).unwrap();
                let (out, failures) = step.apply(input);
                failed.extend(failures.into_iter().map(|f| (si, pos[f.row].0, pos[f.row].1, f.error)));
                match out {
                    Some(Output::Rows(next)) => b = Some(next),
                    Some(Output::Routed { sinks, .. }) => routed.push(sinks),
                    None => {}
                }
            }
        }
        assert!(!failed.is_empty() && routed.iter().flatten().any(|(s, _)| *s == 1));

        let mut many = steps();
        let (fused, flow) = run_pure_steps(&mut many, batches.clone(), 2, false).unwrap();
        assert_eq!(fused.steps, 3);
        let fused_routed: Routed = flow.into_iter().filter_map(|(rows, r)| {
            assert!(rows.is_none());
            r
        }).collect();
        assert_eq!(fused_routed, routed);
        assert_eq!(fused.failed, failed);
        let counted = |steps: &[Step]| steps.iter().map(|s| (s.stats.records_in.load(Ordering::Relaxed), s.stats.records_out.load(Ordering::Relaxed))).collect::<Vec<_>>();
        assert_eq!(counted(&many), counted(&one));

        // Not while tapped, nor on one thread.
        for (threads, tapped) in [(1, false), (2, true)] {
            let (fused, flow) = run_pure_steps(&mut steps(), batches.clone(), threads, tapped).unwrap();
            assert_eq!(fused.steps, 0);
            assert_eq!(flow.len(), batches.len());
        }
    }

    #[test]
    fn chunks_keep_rows_in_order_and_never_exceed_the_size() {
        let chunks = chunks_of(vec![b(5), b(0), b(7), b(1)], 4);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.iter().map(|b| b.num_rows()).sum()).collect();
        assert_eq!(sizes, vec![4, 4, 4, 1]);
        let values: Vec<i64> = chunks
            .iter()
            .flatten()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        assert_eq!(values, [(0..5).collect::<Vec<_>>(), (0..7).collect(), vec![0]].concat());
    }

    // The schedule is computed from given instants: no clock, no timing in the test.
    #[test]
    fn rate_limit_spreads_records_over_time() {
        let t0 = tokio::time::Instant::now();
        let mut limit = RateLimit { per_second: 200.0, next_free: t0 };
        assert_eq!(limit.chunk(), 200);
        let secs = |t: tokio::time::Instant| (t - t0).as_secs_f64();
        // Three chunks asked for at once go at 0 s, 1 s and 2 s; then 100 records at 3 s.
        let starts: Vec<f64> = (0..3).map(|_| secs(limit.reserve(t0, 200))).collect();
        assert_eq!(starts, vec![0.0, 1.0, 2.0]);
        assert_eq!(secs(limit.reserve(t0, 100)), 3.0);
        // Idle time is not saved up: after a pause, the budget starts from the present.
        let later = t0 + Duration::from_secs(20);
        assert_eq!(secs(limit.reserve(later, 200)), 20.0);
        assert_eq!(secs(limit.reserve(later, 1)), 21.0);
    }
}
