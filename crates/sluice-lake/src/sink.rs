//! The lake sink: lands one stream of the log in its Delta table, exactly once.
//!
//! The protocol (hand-written: it is the product's exactly-once guarantee):
//! - Every commit to the stream's table carries, for each log partition it covers, a
//!   Delta transaction identifier `sluice:<stream>:<partition>` whose version is the last
//!   log offset included. Data and offsets become visible in one atomic commit.
//! - On start the sink reads those versions and resumes each partition right after its
//!   version: a crash before a commit re-lands the same records, a crash after it skips
//!   them. Nothing is lost, nothing is landed twice.
//! - Records that cannot be stored (a type conflict, say) go to `<stream>__dlq` first, in
//!   a commit carrying the same identifiers. If the process dies between the dead-letter
//!   commit and the main commit, the restart re-reads from the main table's versions and
//!   skips dead letters at or below the dead-letter table's versions.
//! - Only durable (fsync'd) log records are read, so a recovered log never re-uses an
//!   offset that the lake has seen.
//! - After a commit the sink commits the log consumer offset `lake`, which lets retention
//!   delete what is landed and only that.

use crate::convert::{self, ConvertOptions, InputRecord};
use crate::delta::LakeTable;
use arrow_array::{new_null_array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use sluice_log::{Collected, FlushPolicy, Partition, Stream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The log consumer name of the lake sink.
pub const CONSUMER: &str = "lake";

/// How a stream lands.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub lake_root: String,
    pub flush_interval: Duration,
    pub flush_bytes: u64,
    pub date_column: String,
    pub partition_by: Vec<String>,
    /// Keep the table equal to the source table of a change-data-capture stream (MERGE by
    /// key, see [`crate::mirror`]) instead of appending every record.
    pub mirror: bool,
    /// The table (default: the stream's name). Another name lands under its own consumer,
    /// `lake.<table>`, so one stream can land in two tables (a mirror and its changelog).
    pub table: Option<String>,
    /// A column whose values change JSON type becomes text instead of sending records to
    /// the dead-letter table ([`ConvertOptions::widen_to_text`]): for the tables of a change
    /// stream, whose source columns can be retyped.
    pub widen_to_text: bool,
}

/// Live state of a sink, shared with the HTTP API and metrics.
#[derive(Debug)]
pub struct SinkStatus {
    /// Per log partition: the next offset to land (everything before it is in the lake).
    pub landed: Vec<AtomicU64>,
    pub rows: AtomicU64,
    pub dead_letters: AtomicU64,
    pub commits: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

impl SinkStatus {
    pub fn new(partitions: usize) -> SinkStatus {
        SinkStatus {
            landed: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            rows: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            last_error: parking_lot::Mutex::new(None),
        }
    }

    pub fn landed(&self, partition: usize) -> u64 {
        self.landed.get(partition).map_or(0, |a| a.load(Ordering::Acquire))
    }
}

/// The transaction identifier of one log partition of a stream.
pub fn app_id(stream: &str, partition: u32) -> String {
    format!("sluice:{stream}:{partition}")
}

/// Lands one stream. Run with [`LakeSink::run`] on its own task.
pub struct LakeSink {
    stream: Arc<Stream>,
    opts: SinkOptions,
    status: Arc<SinkStatus>,
}

/// What the commit stage owns.
struct Writer {
    main: Option<LakeTable>,
    dlq: Option<LakeTable>,
    /// Dead letters at or below these offsets are already in the dead-letter table.
    dlq_done: Vec<i64>,
    /// Mirror tables: the last truncate applied, (commit LSN, sequence) (changes not newer
    /// than it are dropped).
    truncated_at: Option<(i64, i64)>,
}

/// One flush, converted and ready to commit.
struct Prepared {
    converted: convert::Converted,
    /// Mirror tables: the key columns and the flush's newest truncate.
    mirror: Option<(Vec<String>, Option<(i64, i64)>)>,
    /// Per partition, the last offset in this flush.
    last: Vec<Option<u64>>,
    records: usize,
    started: Instant,
    /// Wall time of the conversion itself.
    convert_time: Duration,
}

impl LakeSink {
    pub fn new(stream: Arc<Stream>, opts: SinkOptions) -> LakeSink {
        let status = Arc::new(SinkStatus::new(stream.partitions().len()));
        LakeSink { stream, opts, status }
    }

    pub fn status(&self) -> Arc<SinkStatus> {
        self.status.clone()
    }

    fn table_name(&self) -> &str {
        self.opts.table.as_deref().unwrap_or(self.stream.name())
    }

    /// The log consumer whose offsets say what this sink has landed.
    fn consumer(&self) -> String {
        match &self.opts.table {
            Some(t) if t != self.stream.name() => format!("{CONSUMER}.{t}"),
            _ => CONSUMER.to_string(),
        }
    }

    fn dlq_name(&self) -> String {
        format!("{}{}", self.table_name(), sluice_core::DLQ_SUFFIX)
    }

    fn partition_columns(&self) -> Vec<String> {
        if self.opts.mirror {
            // A row's date means nothing once it is updated: mirrors are not partitioned.
            return Vec::new();
        }
        let mut cols = vec![self.opts.date_column.clone()];
        cols.extend(self.opts.partition_by.iter().cloned());
        cols
    }

    /// Lands records until `shutdown` turns true; then lands everything durable in the
    /// log at that moment and returns.
    ///
    /// Two stages overlap: while one flush is committed, the next is read and converted
    /// (against the schema the table will have after that commit). Any error drops both
    /// and restarts from the positions recorded in the lake.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut state: Option<(Vec<u64>, Writer)> = None;
        let mut pending: Option<Prepared> = None;
        loop {
            let stopping = *shutdown.borrow();
            let (next, writer) = match state.as_mut() {
                Some((n, w)) => (n, w),
                None => match self.init().await {
                    Ok(st) => {
                        pending = None;
                        let (n, w) = state.insert(st);
                        (n, w)
                    }
                    Err(e) => {
                        self.fail(&e);
                        if stopping {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                },
            };
            let result: anyhow::Result<bool> = match pending.take() {
                None => {
                    // Nothing in flight: read and convert one flush.
                    match self.collect(next, &mut shutdown).await {
                        Ok(recs) if recs.is_empty() => Ok(!stopping),
                        Ok(recs) => {
                            let schema = writer.main.as_ref().map(|t| logical_schema(&t.arrow_schema()));
                            self.prepare(recs, schema).await.map(|p| {
                                pending = Some(p);
                                true
                            })
                        }
                        Err(e) => Err(e),
                    }
                }
                Some(p) => {
                    let schema_after = p.converted.schema.clone();
                    let (me, shutdown) = (&self, &mut shutdown);
                    let ahead = async move {
                        let recs = me.collect(next, shutdown).await?;
                        if recs.is_empty() {
                            return Ok(None);
                        }
                        me.prepare(recs, Some(schema_after)).await.map(Some)
                    };
                    // A failed commit returns at once (the read ahead is dropped): it is retried
                    // from the lake's positions without waiting for more records.
                    let (committed, ahead) = sluice_log::commit_while_reading(self.commit(writer, p), ahead).await;
                    match (committed, ahead) {
                        (Ok(()), Some(Ok(p2))) => {
                            let more = p2.is_some();
                            pending = p2;
                            Ok(more || !stopping)
                        }
                        (Err(e), _) | (_, Some(Err(e))) => Err(e),
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
                    // Re-read positions from the lake: what committed stays, the rest is read again.
                    state = None;
                    pending = None;
                    if stopping && backoff > Duration::from_secs(5) {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn fail(&self, e: &anyhow::Error) {
        tracing::error!(stream = self.stream.name(), error = format!("{e:#}"), "lake sink");
        metrics::counter!("sluice_lake_errors_total", "stream" => self.stream.name().to_string()).increment(1);
        *self.status.last_error.lock() = Some(format!("{e:#}"));
    }

    async fn init(&self) -> anyhow::Result<(Vec<u64>, Writer)> {
        let root = &self.opts.lake_root;
        let main = LakeTable::open(root, self.table_name()).await?;
        let dlq = LakeTable::open(root, &self.dlq_name()).await?;
        let mut next = Vec::new();
        let mut dlq_done = Vec::new();
        for p in self.stream.partitions() {
            let app = app_id(self.stream.name(), p.id());
            let landed = main.as_ref().and_then(|t| t.txn_version(&app));
            let mut n = landed.map_or(p.log_start_offset(), |v| v as u64 + 1);
            if n < p.log_start_offset() {
                tracing::warn!(stream = self.stream.name(), partition = p.id(), "log starts after the lake's position");
                n = p.log_start_offset();
            }
            if n > p.next_offset() {
                anyhow::bail!(
                    "table {} has landed partition {} up to offset {} but the log ends at {}: the log directory does not belong to this lake",
                    self.table_name(),
                    p.id(),
                    n - 1,
                    p.next_offset()
                );
            }
            p.commit_offset(&self.consumer(), n)?;
            self.status.landed[p.id() as usize].store(n, Ordering::Release);
            next.push(n);
            dlq_done.push(dlq.as_ref().and_then(|t| t.txn_version(&app)).unwrap_or(-1));
        }
        // A truncate remembered before its sequence was: all of its transaction is older.
        let truncated_at = main.as_ref().and_then(|t| {
            let lsn = t.txn_version(&crate::mirror::truncate_app_id(self.stream.name()))?;
            Some((lsn, t.txn_version(&crate::mirror::truncate_seq_app_id(self.stream.name())).unwrap_or(i64::MAX)))
        });
        Ok((next, Writer { main, dlq, dlq_done, truncated_at }))
    }

    /// Reads durable records until flush_bytes are buffered or flush_interval has passed
    /// since the first one arrived (or, when stopping, until the log is drained).
    async fn collect(&self, next: &mut Vec<u64>, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<Vec<Collected>> {
        let policy = FlushPolicy { bytes: self.opts.flush_bytes, interval: self.opts.flush_interval, fields: self.opts.mirror };
        let mut positions = [std::mem::take(next)];
        let got = sluice_log::collect(std::slice::from_ref(&self.stream), &mut positions, policy, shutdown).await;
        *next = std::mem::take(&mut positions[0]);
        let out = got?;
        tracing::trace!(table = self.table_name(), records = out.len(), "collected");
        Ok(out)
    }

    /// Converts one flush (CPU work, on the blocking pool, split over the cores).
    async fn prepare(&self, mut records: Vec<Collected>, table_schema: Option<SchemaRef>) -> anyhow::Result<Prepared> {
        let started = Instant::now();
        let mut last: Vec<Option<u64>> = vec![None; self.stream.partitions().len()];
        for c in &records {
            last[c.partition as usize] = Some(c.record.offset);
        }
        let copts = ConvertOptions {
            date_column: self.opts.date_column.clone(),
            partition_by: self.opts.partition_by.clone(),
            widen_to_text: self.opts.widen_to_text,
        };
        let count = records.len();
        let mirror = self.opts.mirror;
        let stream = self.stream.name().to_string();
        let (mut converted, plan) = tokio::task::spawn_blocking(move || {
            if mirror {
                // Snapshot events come as template fields; those of a template the mirror
                // cannot plan are read whole.
                let mut plans = crate::mirror::Plans::default();
                for c in records.iter_mut() {
                    if let Some(t) = &c.record.template {
                        if plans.plan(t).is_none() {
                            c.record.value = c.record.full_value();
                            c.record.template = None;
                        }
                    }
                }
                let reduced = crate::mirror::reduce(records.iter().map(|c| {
                    let input = match &c.record.template {
                        Some(t) => crate::mirror::Input::Fields(&c.record.value, plans.get(t).expect("planned above")),
                        None => crate::mirror::Input::Whole(&c.record.value),
                    };
                    (c.partition, c.record.offset, c.record.timestamp_ms, input)
                }));
                if reduced.keyless > 0 {
                    tracing::warn!(stream, events = reduced.keyless, "changes of a table without a primary key cannot be mirrored: skipped");
                }
                for (p, o, why) in reduced.invalid.iter().take(3) {
                    tracing::warn!(stream, partition = p, offset = o, "not mirrored: {why}");
                }
                let inputs: Vec<InputRecord> =
                    reduced.rows.iter().map(|(p, o, t, v)| InputRecord { partition: *p, offset: *o, timestamp_ms: *t, value: v }).collect();
                let c = convert::convert_parallel(table_schema.as_deref(), &inputs, &copts, convert_threads(inputs.len()));
                (c, Some((reduced.keys, reduced.truncate)))
            } else {
                let mut inputs: Vec<InputRecord> = records
                    .iter()
                    .map(|c| InputRecord { partition: c.partition, offset: c.record.offset, timestamp_ms: c.record.timestamp_ms, value: &c.record.value })
                    .collect();
                // Not for a new table: its schema is inferred from the flush's first records,
                // which should be a mix of kinds.
                if table_schema.is_some() {
                    convert::group_by_kind(&mut inputs);
                }
                (convert::convert_parallel(table_schema.as_deref(), &inputs, &copts, convert_threads(inputs.len())), None)
            }
        })
        .await?;
        if !mirror {
            add_missing_partition_columns(&mut converted, &self.opts.partition_by)?;
        }
        Ok(Prepared { converted, mirror: plan, last, records: count, started, convert_time: started.elapsed() })
    }

    /// Commits one converted flush: dead letters first, then the rows, each commit
    /// carrying the flush's offsets; then the log consumer offset.
    async fn commit(&self, w: &mut Writer, p: Prepared) -> anyhow::Result<()> {
        let commit_started = Instant::now();
        let Prepared { converted, mirror, last, records: count, started, convert_time } = p;
        let txns: Vec<(String, i64)> = last
            .iter()
            .enumerate()
            .filter_map(|(p, o)| o.map(|o| (app_id(self.stream.name(), p as u32), o as i64)))
            .collect();

        let rejects: Vec<_> = converted
            .rejects
            .into_iter()
            .filter(|r| r.offset as i64 > w.dlq_done[r.partition as usize])
            .collect();
        if !rejects.is_empty() {
            let batch = convert::rejects_to_batch(&rejects, &self.opts.date_column);
            let dlq = match w.dlq.as_mut() {
                Some(t) => t,
                None => {
                    let t = LakeTable::create(&self.opts.lake_root, &self.dlq_name(), &batch.schema(), &[self.opts.date_column.clone()]).await?;
                    w.dlq.insert(t)
                }
            };
            dlq.append(vec![batch], &txns).await?;
            for (p, o) in last.iter().enumerate() {
                if let Some(o) = o {
                    w.dlq_done[p] = *o as i64;
                }
            }
            self.status.dead_letters.fetch_add(rejects.len() as u64, Ordering::Relaxed);
            metrics::counter!("sluice_dlq_records_total", "stream" => self.stream.name().to_string()).increment(rejects.len() as u64);
        }

        let rows: usize = converted.batches.iter().map(|b| b.num_rows()).sum();
        if w.main.is_none() && mirror.is_none() {
            // A new table of appends: created with this flush's rows in one commit.
            let t = LakeTable::create_with_rows(
                &self.opts.lake_root,
                self.table_name(),
                &converted.schema,
                &self.partition_columns(),
                converted.batches,
                &txns,
            )
            .await?;
            w.main = Some(t);
            return self.committed(&last, count, rows, started, convert_time, commit_started);
        }
        let main = match w.main.as_mut() {
            Some(t) => {
                if !converted.widened.is_empty() {
                    tracing::info!(table = self.table_name(), columns = ?converted.widened, "widening columns (to double, or to text): rewriting table");
                    let schema = match mirror {
                        Some(_) => crate::mirror::table_schema(&converted.schema, &self.opts.date_column),
                        None => converted.schema.clone(),
                    };
                    t.rewrite_with_schema(schema, &[]).await?;
                }
                t
            }
            None => {
                // A new mirror table (a new append table was created with its rows above).
                let schema = crate::mirror::table_schema(&converted.schema, &self.opts.date_column);
                let t = LakeTable::create(&self.opts.lake_root, self.table_name(), &schema, &self.partition_columns()).await?;
                w.main.insert(t)
            }
        };
        match mirror {
            None => {
                main.append(converted.batches, &txns).await?;
            }
            Some((keys, truncate)) => {
                let stream = self.stream.name();
                if let Some((t, seq)) = truncate.filter(|t| w.truncated_at.is_none_or(|done| *t > done)) {
                    // The rows of the truncate's own transaction in the table are older than
                    // it: a change after it in its partition comes after the truncate there, so
                    // the flush that brought it brought (and applied) the truncate too.
                    let remember = [(crate::mirror::truncate_app_id(stream), t), (crate::mirror::truncate_seq_app_id(stream), seq)];
                    main.delete_where(&format!("{} <= {t}", crate::mirror::LSN_COLUMN), &remember).await?;
                    w.truncated_at = Some((t, seq));
                }
                let batch = crate::mirror::changes_batch(&converted.schema, &converted.batches, &self.opts.date_column, w.truncated_at)?;
                if batch.num_rows() > 0 && keys.is_empty() {
                    anyhow::bail!("mirror {}: change events without key columns", self.table_name());
                }
                main.merge_by_key(batch, &keys, &txns).await?;
            }
        }
        self.committed(&last, count, rows, started, convert_time, commit_started)
    }

    /// After a flush's commit: the log consumer offset, status, metrics.
    fn committed(&self, last: &[Option<u64>], count: usize, rows: usize, started: Instant, convert_time: Duration, commit_started: Instant) -> anyhow::Result<()> {
        let consumer = self.consumer();
        for (p, o) in last.iter().enumerate() {
            if let Some(o) = o {
                let partition: &Arc<Partition> = &self.stream.partitions()[p];
                partition.commit_offset(&consumer, o + 1)?;
                self.status.landed[p].store(o + 1, Ordering::Release);
            }
        }
        self.status.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.status.commits.fetch_add(1, Ordering::Relaxed);
        let name = self.stream.name().to_string();
        metrics::counter!("sluice_lake_rows_total", "table" => name.clone()).increment(rows as u64);
        metrics::counter!("sluice_lake_commits_total", "table" => name.clone()).increment(1);
        metrics::histogram!("sluice_lake_commit_seconds", "table" => name).record(commit_started.elapsed().as_secs_f64());
        tracing::debug!(
            table = self.table_name(),
            records = count,
            rows,
            convert_ms = convert_time.as_millis() as u64,
            waited_ms = (commit_started - started).saturating_sub(convert_time).as_millis() as u64,
            commit_ms = commit_started.elapsed().as_millis() as u64,
            "landed"
        );
        Ok(())
    }
}

/// Threads to convert one flush on: one per core, each with at least 16k records (below
/// that, starting threads costs more than it saves).
fn convert_threads(records: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(records / 16_384).max(1)
}

/// The table schema as the converter should produce it: deltalake reports partition
/// columns dictionary-encoded, the data we write carries their plain value type.
fn logical_schema(schema: &Schema) -> Arc<Schema> {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Dictionary(_, value) => f.as_ref().clone().with_data_type(value.as_ref().clone()),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// A table's partition columns must exist from its first commit; a `partition_by` field no
/// record has carried yet becomes a nullable string column.
fn add_missing_partition_columns(c: &mut convert::Converted, partition_by: &[String]) -> anyhow::Result<()> {
    let missing: Vec<&String> = partition_by.iter().filter(|f| c.schema.field_with_name(f).is_err()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut fields: Vec<Field> = c.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for m in &missing {
        fields.push(Field::new(m.as_str(), DataType::Utf8, true));
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, c.schema.metadata().clone()));
    let mut batches = Vec::with_capacity(c.batches.len());
    for b in &c.batches {
        let mut cols = b.columns().to_vec();
        for _ in &missing {
            cols.push(new_null_array(&DataType::Utf8, b.num_rows()));
        }
        batches.push(RecordBatch::try_new(schema.clone(), cols)?);
    }
    c.schema = schema;
    c.batches = batches;
    Ok(())
}
