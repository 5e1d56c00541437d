//! Change data capture from PostgreSQL: logical replication with `pgoutput` into Sluice's
//! log, one stream per captured table.
//!
//! How it keeps its promises (hand-written: this is the product's exactly-once edge):
//! - **Nothing lost.** The slot's confirmed position moves only to the end of transactions
//!   whose changes are durable (fsynced) in the log. After a crash or a lost connection the
//!   server sends again everything after it.
//! - **Nothing duplicated.** Every change carries its transaction's commit LSN and its
//!   sequence number in the transaction. At start the source reads the last record of each
//!   partition it writes, and drops re-sent changes at or below it. A transaction's changes
//!   to one partition are appended in commit order, so that position is exact.
//! - **Bounded memory.** Changes are written in groups of at most [`GROUP_RECORDS`], even in
//!   the middle of a large transaction; only the acknowledgement waits for the commit.
//! - **Idle slots do not hold WAL.** Between transactions, with nothing unwritten, the
//!   server's keepalive position is confirmed; every `heartbeat` an idle source also writes
//!   a logical message to the WAL, so its position moves even when its tables do not.
//! - **Faults are explicit.** A dropped or invalidated slot stops the source with an error
//!   saying the changes in between are lost and a snapshot is needed; it never starts over
//!   silently. Connection errors are retried with backoff, visible in the status.

mod events;
pub mod pgoutput;
pub mod snapshot;
pub mod types;

use pgoutput::{Message, Relation};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::{json, Value as Json};
use sluice_core::source::{table_stream, PostgresSourceConfig};
use sluice_log::{Record, Stream};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use crate::state_file::StateFile;

/// Changes written to the log at most per group (and so held in memory).
pub const GROUP_RECORDS: usize = 10_000;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Opens (creating if needed) the stream of a captured table with this many partitions,
/// and sets it up to land in the lake. Given by the binary.
pub type OpenStream = Arc<dyn Fn(&str, u32) -> anyhow::Result<Arc<Stream>> + Send + Sync>;

/// Live state of a source, for `GET /v1/sources` and `/metrics`.
#[derive(Debug, Default)]
pub struct SourceStatus {
    pub name: String,
    /// `postgres` or `mysql`.
    pub kind: &'static str,
    /// `starting`, `streaming`, `retrying`, `stopped` or `failed`.
    pub state: Mutex<String>,
    pub last_error: Mutex<Option<String>>,
    /// The position confirmed to the server: everything before it is durable in the log.
    pub confirmed_lsn: AtomicU64,
    /// The end of the last transaction received.
    pub received_lsn: AtomicU64,
    pub changes: AtomicU64,
    pub transactions: AtomicU64,
    /// Captured tables (`schema.table`) and their streams.
    pub tables: Mutex<BTreeMap<String, String>>,
    /// Snapshots: queued and running ones, then the last finished ones.
    pub snapshots: Mutex<Vec<Json>>,
}

impl SourceStatus {
    pub(crate) fn set_state(&self, s: &str) {
        *self.state.lock() = s.to_string();
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *self.last_error.lock() = e;
    }

    /// A failing state and its error: the error first, so that whoever sees the state sees
    /// its error too ([`SourceStatus::to_json`] reads the state first).
    pub(crate) fn set_failing(&self, state: &str, e: String) {
        self.set_error(Some(e));
        self.set_state(state);
    }

    /// As JSON for the API.
    pub fn to_json(&self) -> Json {
        let lsn = |a: &AtomicU64| {
            let v = a.load(Ordering::Relaxed);
            // A MySQL position is binlog file number and offset (see `mysql_cdc`).
            if self.kind == "mysql" { format!("{:06}:{}", v >> 32, v & 0xffff_ffff) } else { Lsn(v).to_string() }
        };
        json!({
            "name": self.name,
            "kind": self.kind,
            // Before the error (see `set_failing`).
            "state": *self.state.lock(),
            "last_error": *self.last_error.lock(),
            "confirmed_lsn": lsn(&self.confirmed_lsn),
            "received_lsn": lsn(&self.received_lsn),
            "changes": self.changes.load(Ordering::Relaxed),
            "transactions": self.transactions.load(Ordering::Relaxed),
            "tables": *self.tables.lock(),
            "snapshots": *self.snapshots.lock(),
        })
    }

    /// Shows the queued and running snapshots (finished ones stay listed, the last 100).
    pub(crate) fn show_snapshots(&self, tasks: &[SnapshotTask]) {
        let mut list = self.snapshots.lock();
        let active: Vec<Json> = tasks.iter().enumerate().map(|(i, t)| t.to_json(if i == 0 { "running" } else { "queued" })).collect();
        list.retain(|j| j["state"] == "done" && !active.iter().any(|a| a["id"] == j["id"]));
        let keep = list.len().saturating_sub(100);
        list.drain(..keep);
        list.extend(active);
    }

    /// Lists a snapshot as done.
    pub(crate) fn snapshot_finished(&self, t: &SnapshotTask) {
        let mut list = self.snapshots.lock();
        list.retain(|j| j["id"] != t.id);
        let mut j = t.to_json("done");
        j["finished"] = rfc3339(sluice_core::time::now_ms()).into();
        list.push(j);
    }
}

/// Why a session ended.
pub(crate) enum Stop {
    /// Retry after a pause (connection lost, server restarting, ...).
    Retry(anyhow::Error),
    /// Do not retry: the source cannot go on without the user.
    Fatal(String),
}

macro_rules! retry_on {
    ($($t:ty),*) => {$(
        impl From<$t> for Stop {
            fn from(e: $t) -> Stop {
                Stop::Retry(e.into())
            }
        }
    )*};
}
retry_on!(anyhow::Error, tokio_postgres::Error, sluice_log::LogError, std::io::Error);

/// What the source remembers between runs (`<state_dir>/state.json`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// The slot this source created and reads.
    slot: Option<String>,
    /// Where the slot started.
    slot_created_lsn: Option<String>,
    /// Streams this source has written, by `schema.table`.
    tables: BTreeMap<String, String>,
    /// Snapshots not finished yet, in order.
    #[serde(default)]
    snapshots: Vec<SnapshotTask>,
    #[serde(default)]
    next_snapshot: u64,
}

/// A snapshot of one table (all of it, or some keys), and how far it got.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotTask {
    pub(crate) id: u64,
    /// `schema.table`.
    pub(crate) table: String,
    /// Only these primary key values (see [`crate::snapshot_keys`]), else the whole table.
    #[serde(default)]
    pub(crate) keys: Option<Vec<String>>,
    /// The key of the last row of the last finished chunk (as text, one per key column).
    #[serde(default)]
    pub(crate) after: Option<Vec<String>>,
    /// Where the next chunk starts when chunks read are still being written (ahead of
    /// `after`, which only durable chunks move); None: at `after`.
    #[serde(skip)]
    pub(crate) cursor: Option<Vec<String>>,
    pub(crate) rows: u64,
    pub(crate) chunks: u64,
    pub(crate) started_ms: i64,
}

impl SnapshotTask {
    /// What the next chunk reads: at most this many rows and, for a snapshot of some keys,
    /// those keys' values (one text per key column). None: the table's primary key changed
    /// since the request was queued (warned).
    pub(crate) fn chunk_plan(&self, source: &str, key_names: &[&str], chunk_rows: usize) -> Option<(usize, Option<Vec<Vec<String>>>)> {
        let Some(keys) = &self.keys else { return Some((chunk_rows, None)) };
        match crate::snapshot_keys(&self.table, key_names, keys) {
            Ok(k) => Some((keys.len().max(1), Some(k))),
            Err(e) => {
                tracing::warn!(source, "snapshot of {}: {e}", self.table);
                None
            }
        }
    }

    pub(crate) fn to_json(&self, state: &str) -> Json {
        json!({"id": self.id, "table": self.table, "keys": self.keys, "rows": self.rows, "chunks": self.chunks, "state": state,
               "started": rfc3339(self.started_ms)})
    }
}

/// What to snapshot: one table (`schema.table` or `table` in `public`) or all captured
/// tables; optionally only some primary key values.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRequest {
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub keys: Vec<String>,
}

/// Sends snapshot requests to a running source; the answer lists the snapshots queued.
pub type SnapshotSender = tokio::sync::mpsc::UnboundedSender<(SnapshotRequest, tokio::sync::oneshot::Sender<Result<Json, String>>)>;
pub(crate) type SnapshotReceiver = tokio::sync::mpsc::UnboundedReceiver<(SnapshotRequest, tokio::sync::oneshot::Sender<Result<Json, String>>)>;

/// The chunk of a snapshot between its watermarks.
struct Chunk {
    marker: String,
    task: u64,
    info: snapshot::TableInfo,
    /// The low watermark has passed: changes to the table remove their keys from the chunk.
    open: bool,
    changed: HashSet<String>,
    head: tokio::sync::oneshot::Receiver<Head>,
    rows: tokio::task::JoinHandle<anyhow::Result<ReadChunk>>,
    limit: usize,
    started: std::time::Instant,
    /// The chain's connection, when it has its own: closed once no chunk holds it.
    read: Option<Arc<ReadConn>>,
}

/// What a chunk's reading task tells the loop once the high watermark is written.
struct Head {
    /// The key of the chunk's last row (as text, one per key column).
    last_key: Option<Vec<String>>,
    /// How many rows it read.
    read: usize,
    /// The next chunk, already started by the reading task right after this one's high
    /// watermark (so its low watermark comes after it in the WAL).
    next: Option<Reader>,
}

/// A chunk read on its own task (see [`spawn_read`]).
struct Reader {
    marker: String,
    head: tokio::sync::oneshot::Receiver<Head>,
    rows: tokio::task::JoinHandle<anyhow::Result<ReadChunk>>,
    started: std::time::Instant,
    /// The chain of chunks it belongs to: closed, no more of them are read.
    chain: Arc<tokio::sync::Semaphore>,
}

/// Chunks read ahead of the one whose window the replication stream is in: the database
/// reads on while the stream catches up with their watermarks, and their rows take room.
/// (3 held the reader back whenever the loop fell behind for a moment: 6 took a snapshot
/// from 0.77 to 0.66 s in alternating rounds.)
const READ_AHEAD: usize = 6;

/// What reading the chunks of one snapshot needs.
#[derive(Clone)]
struct ReadSpec {
    client: Arc<tokio_postgres::Client>,
    /// Where the reading tasks run (with `client`'s connection, see [`ReadConn`]); None:
    /// on the source's runtime.
    rt: Option<tokio::runtime::Handle>,
    info: snapshot::TableInfo,
    source: String,
    database: String,
    task: u64,
    limit: usize,
    /// Read the next chunk as soon as one is done (no throttle, whole table).
    chain: bool,
    /// One permit per chunk read and not yet finished ([`READ_AHEAD`]); closed when the loop
    /// drops the chain.
    ahead: Arc<tokio::sync::Semaphore>,
    /// A chain's high watermarks are flushed on this connection (None: each with its
    /// chunk's read).
    flusher: Option<Arc<snapshot::Flusher>>,
}

/// Reads a chunk (after key `after`, or the rows with `keys`) between its watermarks on its
/// own task and writes its rows as events (see [`ReadChunk`]). Unless it was the last (fewer
/// rows than the limit) the task goes on with the next chunk when `spec.chain`, right after
/// this one's high watermark, up to [`READ_AHEAD`] chunks ahead of the loop: the loop takes
/// the next over at this chunk's high watermark, or drops the chain (closing `spec.ahead`).
fn spawn_read(spec: ReadSpec, after: Option<Vec<String>>, keys: Option<Vec<Vec<String>>>, low: Option<snapshot::Low>) -> Reader {
    let marker = match &low {
        Some(l) => l.marker.clone(),
        None => chunk_marker(&spec),
    };
    let (head_tx, head) = tokio::sync::oneshot::channel();
    let m = marker.clone();
    let chain = spec.ahead.clone();
    let rt = spec.rt.clone();
    let read = async move {
        // Held until the loop is done with the chunk (it drops the ReadChunk).
        let permit = spec.ahead.clone().acquire_owned().await.map_err(|_| anyhow::anyhow!("snapshot chunk dropped"))?;
        // A full chunk of a chain writes the next one's low watermark with its high one (a
        // round trip less per chunk).
        let next_marker = (spec.chain && keys.is_none()).then(|| chunk_marker(&spec));
        let low = match low {
            Some(l) => l,
            None => snapshot::Low::write(&spec.client, m).await?,
        };
        let (read, high, next_low) = snapshot::read_chunk(&spec.client, &spec.info, low, after.as_deref(), keys.as_deref(), spec.limit, next_marker.as_deref(), spec.flusher.as_deref()).await?;
        let fail = |e: String| anyhow::anyhow!("snapshot of {}: {e}", spec.info.qualified());
        let last_key = read.last_key(&spec.info).map_err(fail)?;
        let more = spec.chain && keys.is_none() && read.len() >= spec.limit && high.is_some() && !spec.ahead.is_closed();
        // (A low watermark written for a chunk then not read is no chunk's: the loop ignores it.)
        let next = more.then(|| spawn_read(spec.clone(), last_key.clone(), None, next_low));
        let _ = head_tx.send(Head { last_key, read: read.len(), next });
        // The rows split and written as events on a thread of their own: this task's part
        // is done, the next chunk is on its way.
        let at = high.map(|h| h.saturating_sub(1));
        let (records, rows) = tokio::task::spawn_blocking(move || {
            let fail = |e: String| anyhow::anyhow!("snapshot of {}: {e}", spec.info.qualified());
            let rows = read.rows().map_err(fail)?;
            let records = at.map(|at| read_events(&spec.source, &spec.database, &spec.info, &rows, at)).transpose().map_err(fail)?;
            anyhow::Ok((records.unwrap_or_default(), rows))
        })
        .await??;
        Ok(ReadChunk { at, records, rows, _permit: permit })
    };
    let rows = match rt {
        Some(rt) => rt.spawn(read),
        None => tokio::spawn(read),
    };
    Reader { marker, head, rows, started: std::time::Instant::now(), chain }
}

/// A connection of its own for a chain of chunks, driven together with the chain's reading
/// tasks by a single-threaded runtime on a thread of its own (`sluice-cdc-snap`).
/// tokio-postgres hands a COPY's rows from its connection's task to the reading task ~8 KiB
/// at a time, through a channel of one; on the source's runtime those two tasks ran on two
/// threads, each hand-off a wake-up of the other, while the server waited for the client to
/// read on. On an idle machine that costs nothing (`examples/copy_probe.rs`, a snapshot's 62
/// chunk COPYs of 16,384 rows: 0.35 s either way, psql 0.37 s); with the cores busy, as in a
/// snapshot, it does (0.47–0.50 s on two threads, 0.40–0.42 s on one, with another process
/// taking a fifth of the CPU), and snapshots took 0.56 instead of 0.63 s (bench/RESULTS.md,
/// session 36). Closed when dropped: once the last chunk holding it is done, or the session
/// ends.
struct ReadConn {
    client: Arc<tokio_postgres::Client>,
    rt: tokio::runtime::Handle,
    stop: tokio::task::AbortHandle,
}

impl ReadConn {
    async fn open(url: &str, settings: String) -> anyhow::Result<ReadConn> {
        let url = crate::pg_tls::parse(url)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("sluice-cdc-snap".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(e.into()))),
            };
            rt.block_on(async move {
                let connected = async {
                    let (client, conn) = url.connect("snapshot read").await?;
                    client.batch_execute(&settings).await?;
                    anyhow::Ok((client, conn))
                };
                match connected.await {
                    Ok((client, conn)) => {
                        let stop = conn.abort_handle();
                        if tx.send(Ok((client, tokio::runtime::Handle::current(), stop))).is_ok() {
                            // Until the client is dropped everywhere, or the connection stopped.
                            let _ = conn.await;
                        }
                    }
                    Err(e) => drop(tx.send(Err(e))),
                }
            });
            // Dropping the runtime ends what is left of the chain's tasks.
        })?;
        let (client, rt, stop) = rx.await.map_err(|_| anyhow::anyhow!("the snapshot reading thread ended"))??;
        Ok(ReadConn { client: Arc::new(client), rt, stop })
    }
}

impl Drop for ReadConn {
    fn drop(&mut self) {
        self.stop.abort();
    }
}

/// A new chunk's marker: its watermarks' text after `low ` / `high `.
fn chunk_marker(spec: &ReadSpec) -> String {
    format!("{}:{}:{}", spec.source, spec.task, fastrand::u64(..))
}

impl Chunk {
    fn new(r: Reader, task: u64, info: snapshot::TableInfo, limit: usize, read: Option<Arc<ReadConn>>) -> Chunk {
        Chunk { marker: r.marker, task, info, open: false, changed: HashSet::new(), head: r.head, rows: r.rows, limit, started: r.started, read }
    }
}

impl Reader {
    /// Drops this chunk and every one read after it.
    fn drop_chain(self) {
        self.chain.close();
        self.rows.abort();
    }
}

/// A chunk as read, its rows already written as `read` events (off the replication loop,
/// while the high watermark travels through the WAL) at the position the high watermark
/// will have: its LSN as the server returned it, minus one.
struct ReadChunk {
    /// The events' position; None: the watermark's LSN was not known, build them at the
    /// high watermark.
    at: Option<u64>,
    /// One keyed `read` event per row, in key order.
    records: Vec<Record>,
    /// The rows themselves, for when the events must be written again at another position.
    rows: snapshot::Rows,
    /// Its place among the chunks read ahead.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The snapshot rows of a chunk as keyed `read` events at position `at`. Err: a value read
/// in binary that is not one of its type.
fn read_events(source_name: &str, database: &str, info: &snapshot::TableInfo, rows: &snapshot::Rows, at: u64) -> Result<Vec<Record>, String> {
    let now = sluice_core::time::now_ms();
    let lsn = Lsn(at).to_string();
    let source = json!({"connector": "postgres", "name": source_name, "db": database, "schema": info.schema, "table": info.name,
                        "lsn": lsn, "txid": null, "commit_time": null, "snapshot": true});
    let events = crate::ReadEvents::new(info.columns.iter().map(|col| (col.0.as_str(), col.3)), &source, &lsn, now);
    let oids: Vec<u32> = info.columns.iter().map(|col| col.1).collect();
    let (mut scratch, mut bad) = (String::new(), None);
    let records = events.records(rows.len(), 0, now, |row, i, out| {
        if let Err(e) = rows.write_json(row, i, oids[i], out, &mut scratch) {
            bad.get_or_insert(e);
        }
    });
    bad.map_or(Ok(records), Err)
}

/// The writes in flight while the stream is read on ([`Writes`]); each, once durable,
/// confirms its position and records its snapshot chunk.
struct Inflight {
    writes: Writes<Landed>,
    /// Snapshot chunks among them.
    chunks: usize,
}

/// What a durable write lets the source record.
struct Landed {
    /// The end of the last whole transaction written.
    confirm: Option<u64>,
    chunk: Option<ChunkDone>,
}

/// A snapshot chunk whose events are written.
struct ChunkDone {
    task: u64,
    rows: u64,
    /// Its last key (None: nothing read, or read again).
    after: Option<Vec<String>>,
    /// The last chunk of its snapshot.
    finished: bool,
}

impl Inflight {
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    async fn next(&mut self) -> Option<Result<Landed, Stop>> {
        let l = self.writes.next().await;
        if let Some(Ok(Landed { chunk: Some(_), .. })) = &l {
            self.chunks -= 1;
        }
        l
    }
}

/// A position in the log of changes: (commit LSN, sequence in the transaction).
pub(crate) type Position = (u64, u64);

/// One PostgreSQL source. Run it with [`PostgresSource::run`] on its own task.
pub struct PostgresSource {
    name: String,
    cfg: PostgresSourceConfig,
    state: StateFile,
    open_stream: OpenStream,
    status: Arc<SourceStatus>,
    requests: tokio::sync::Mutex<SnapshotReceiver>,
    request_sender: SnapshotSender,
    fence: Arc<AppendFence>,
}

/// The transaction being received.
struct Txn {
    /// Its commit LSN (known from Begin).
    lsn: u64,
    commit_time_ms: i64,
    seq: u64,
    /// What its change events share.
    text: events::TxnText,
}

/// Changes waiting to be written, per (stream, partition), in order: their positions and,
/// apart, the records (handed to the log as they are, without a copy to drop positions).
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) groups: Vec<(Arc<Stream>, u32, Vec<Position>, Vec<Record>)>,
    pub(crate) records: usize,
    /// The end LSN of the last whole transaction in the group: confirmed once written.
    pub(crate) commit_end: Option<u64>,
    /// Records per group in the last write: a new group's room (a backlog's groups are
    /// alike, and growing one by doubling copied every change once more).
    pub(crate) hint: usize,
}

impl Pending {
    pub(crate) fn push(&mut self, stream: &Arc<Stream>, partition: u32, pos: Position, r: Record) {
        // Few groups (streams × partitions written together): a scan beats hashing a name.
        let i = match self.groups.iter().position(|(s, p, ..)| *p == partition && Arc::ptr_eq(s, stream)) {
            Some(i) => i,
            None => {
                let room = self.hint + self.hint / 8;
                self.groups.push((stream.clone(), partition, Vec::with_capacity(room), Vec::with_capacity(room)));
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[i];
        g.2.push(pos);
        g.3.push(r);
        self.records += 1;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records == 0 && self.commit_end.is_none()
    }
}

impl PostgresSource {
    pub fn new(name: &str, cfg: &PostgresSourceConfig, state_dir: PathBuf, open_stream: OpenStream) -> PostgresSource {
        let status = Arc::new(SourceStatus { name: name.to_string(), kind: "postgres", ..Default::default() });
        status.set_state("starting");
        let (request_sender, requests) = tokio::sync::mpsc::unbounded_channel();
        let source = PostgresSource {
            name: name.to_string(),
            cfg: cfg.clone(),
            state: StateFile::new(&state_dir),
            open_stream,
            status,
            requests: tokio::sync::Mutex::new(requests),
            request_sender,
            fence: Default::default(),
        };
        // The streams it wrote before are known at once (they land as mirrors).
        if let Ok(state) = source.load_state() {
            source.show_snapshots(&state);
            *source.status.tables.lock() = state.tables;
        }
        source
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    /// Where to send snapshot requests (`sluice snapshot`, `POST /v1/sources/{name}/snapshot`).
    pub fn snapshots(&self) -> SnapshotSender {
        self.request_sender.clone()
    }

    fn show_snapshots(&self, state: &State) {
        self.status.show_snapshots(&state.snapshots);
    }

    /// Queues snapshots of the tables a request names (all captured tables with a primary
    /// key when it names none).
    async fn queue_snapshots(&self, client: &tokio_postgres::Client, state: &mut State, req: &SnapshotRequest) -> Result<Json, String> {
        let tables: Vec<(String, String)> = match &req.table {
            Some(t) => {
                let (schema, name) = t.split_once('.').unwrap_or(("public", t.as_str()));
                if !self.cfg.tables.captures(schema, name) {
                    return Err(format!("table {schema}.{name} is not captured by source {} (see its tables: include/exclude)", self.name));
                }
                vec![(schema.to_string(), name.to_string())]
            }
            None => snapshot::all_tables(client).await.map_err(|e| e.to_string())?.into_iter().filter(|(s, t)| self.cfg.tables.captures(s, t)).collect(),
        };
        let mut queued = Vec::new();
        for (schema, name) in tables {
            let info = snapshot::table_info(client, &schema, &name).await.map_err(|e| e.to_string())?;
            let Some(info) = info else { return Err(format!("table {schema}.{name} does not exist")) };
            let nkeys = info.keys().count();
            if nkeys == 0 {
                if req.table.is_some() {
                    return Err(format!("table {schema}.{name} has no primary key: it cannot be snapshotted in chunks (or mirrored)"));
                }
                tracing::warn!(source = self.name, "table {schema}.{name} has no primary key: not snapshotted");
                continue;
            }
            if !req.keys.is_empty() {
                crate::snapshot_keys(&format!("{schema}.{name}"), &info.key_names(), &req.keys)?;
            }
            state.next_snapshot += 1;
            let task = SnapshotTask {
                id: state.next_snapshot,
                table: format!("{schema}.{name}"),
                keys: (!req.keys.is_empty()).then(|| req.keys.clone()),
                after: None,
                cursor: None,
                rows: 0,
                chunks: 0,
                started_ms: sluice_core::time::now_ms(),
            };
            queued.push(task.to_json("queued"));
            state.snapshots.push(task);
        }
        self.save_state(state).map_err(|e| format!("{e:#}"))?;
        self.show_snapshots(state);
        tracing::info!(source = self.name, snapshots = queued.len(), "snapshots queued");
        Ok(json!({"source": self.name, "snapshots": queued}))
    }

    /// Captures changes until `shutdown` turns true, reconnecting after errors with backoff
    /// (up to 30 s); stops for good on a fault that needs the user (see the module docs).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        run_sessions(&self, &self.name, &self.status, shutdown).await;
        if let Err(e) = self.state.flush() {
            tracing::warn!(source = self.name, error = %e, "source state not saved at shutdown");
        }
    }

    fn load_state(&self) -> anyhow::Result<State> {
        self.state.load()
    }

    fn save_state(&self, s: &State) -> anyhow::Result<()> {
        self.state.save(s)
    }
}

impl Session for PostgresSource {
    /// One connection's life: set up the publication and slot, then stream.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Stop> {
        let url = crate::pg_tls::parse(&self.cfg.url).map_err(|e| Stop::Fatal(format!("source {}: {e}", self.name)))?;
        let pg = url.config.clone();
        let (client, conn) = url.connect("change data capture").await?;
        let _stop_conn = AbortOnDrop(conn);
        client.batch_execute(&self.snapshot_settings()).await?;
        let client = Arc::new(client);
        let slot = self.cfg.slot_name(&self.name);
        let publication = self.cfg.publication_name(&self.name);

        let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal_level != "logical" {
            return Err(Stop::Fatal(format!(
                "source {}: the server has wal_level = {wal_level}; logical replication needs wal_level = logical (set it in postgresql.conf and restart PostgreSQL)",
                self.name
            )));
        }
        if client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication]).await?.is_none() {
            client
                .batch_execute(&format!("CREATE PUBLICATION {publication} FOR ALL TABLES"))
                .await
                .map_err(|e| anyhow::anyhow!("create publication {publication} (or create it yourself, e.g. FOR TABLE ...): {e}"))?;
            tracing::info!(source = self.name, publication, "created publication");
        }
        let mut state = self.load_state()?;
        let row = client
            .query_opt("SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?;
        match row {
            None if state.slot.as_deref() == Some(slot.as_str()) => {
                return Err(Stop::Fatal(format!(
                    "source {}: replication slot {slot} no longer exists (was it dropped?): the changes made since Sluice last read it are lost to it. \
                     Take a snapshot to re-sync (sluice snapshot {}); to start over with a new slot, remove {}",
                    self.name,
                    self.name,
                    self.state.path().display()
                )));
            }
            None => {
                let lsn: String = client
                    .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
                    .await
                    .map_err(|e| anyhow::anyhow!("create replication slot {slot}: {e}"))?
                    .get(0);
                tracing::info!(source = self.name, slot, lsn, "created replication slot");
                state.slot = Some(slot.clone());
                state.slot_created_lsn = Some(lsn);
                self.save_state(&state)?;
                self.initial_snapshot(&client, &mut state).await?;
            }
            Some(r) => {
                let wal_status: Option<String> = r.get(1);
                if wal_status.as_deref() == Some("lost") {
                    return Err(Stop::Fatal(format!(
                        "source {}: replication slot {slot} is invalidated (the server removed WAL it still needed, see max_slot_wal_keep_size): changes are lost to it. \
                         Drop the slot and remove {} to start over, then take a snapshot",
                        self.name,
                        self.state.path().display()
                    )));
                }
                if state.slot.is_none() {
                    // Created by an earlier run that stopped before noting it: this is still
                    // the first capture.
                    state.slot = Some(slot.clone());
                    self.save_state(&state)?;
                    self.initial_snapshot(&client, &mut state).await?;
                }
            }
        }

        // What the log already holds, per partition.
        let mut streams: HashMap<String, Arc<Stream>> = HashMap::new();
        let mut written: HashMap<(String, u32), Position> = HashMap::new();
        let writes = Writes::new(&self.fence);
        for (table, stream) in &state.tables {
            let s = (self.open_stream)(stream, self.cfg.partitions)?;
            for p in s.partitions() {
                if let Some(pos) = held_position(p).await? {
                    written.insert((stream.clone(), p.id()), pos);
                }
            }
            self.status.tables.lock().insert(table.clone(), stream.clone());
            streams.insert(stream.clone(), s);
        }

        let (host, port) = match (pg.get_hosts().first(), pg.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(h)), p) => (h.clone(), p.copied().unwrap_or(5432)),
            #[cfg(unix)]
            (Some(tokio_postgres::config::Host::Unix(d)), p) => (d.display().to_string(), p.copied().unwrap_or(5432)),
            _ => ("127.0.0.1".to_string(), 5432),
        };
        let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let user = pg.get_user().unwrap_or("postgres").to_string();
        let database = pg.get_dbname().unwrap_or(&user).to_string();
        let rcfg = ReplicationConfig::new(host, user, password, database.clone(), slot.clone(), publication.as_str())
            .with_port(port)
            // Text output as the type mapping expects it (see `types`).
            .with_options("-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=iso_8601")
            .with_application_name(format!("sluice-{}", self.name))
            .with_status_interval(Duration::from_secs(1))
            .with_tls(url.replication_tls());
        let mut repl = ReplicationClient::connect(rcfg).await.map_err(|e| anyhow::anyhow!("replication connection: {e}"))?;
        tokio::select! {
            r = repl.wait_started() => r.map_err(|e| anyhow::anyhow!("start replication from slot {slot}: {e}"))?,
            _ = shutdown.changed() => return Ok(()),
        }
        self.status.set_state("streaming");
        self.status.set_error(None);
        tracing::info!(source = self.name, slot, publication, "streaming changes");

        let mut relations: HashMap<u32, (events::RelText, Relation)> = HashMap::new();
        let mut by_oid: HashMap<u32, Arc<Stream>> = HashMap::new();
        let mut type_names: HashMap<u32, String> = HashMap::new();
        let mut warned: HashSet<(u32, String)> = HashSet::new();
        let mut txn: Option<Txn> = None;
        let mut pending = Pending::default();
        let mut inflight = Inflight { writes, chunks: 0 };
        let gather = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(gather);
        let mut gathering = false;
        let mut chunk: Option<Chunk> = None;
        let mut last_chunk = std::time::Instant::now() - self.cfg.snapshot_throttle.0;
        let mut requests = self.requests.lock().await;
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat.0);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if chunk.is_none() && txn.is_none() && inflight.chunks == 0 && !state.snapshots.is_empty() && last_chunk.elapsed() >= self.cfg.snapshot_throttle.0 {
                chunk = self.start_chunk(&client, &state, &database).await?;
                if chunk.is_none() {
                    // The table is gone: nothing to read.
                    let t = state.snapshots.remove(0);
                    tracing::warn!(source = self.name, table = t.table, "snapshot skipped: the table does not exist (any more), or its primary key changed");
                    self.save_state(&state)?;
                    self.show_snapshots(&state);
                    continue;
                }
            }
            let throttled = chunk.is_none() && !state.snapshots.is_empty();
            // With changes pending, gather what arrives with them into one write, for at most
            // 5 ms (one timer per write: a timer per event costs more than the event); the
            // rest waits until they are written.
            let idle = pending.is_empty();
            if idle {
                gathering = false;
            } else if !gathering {
                gather.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(5));
                gathering = true;
            }
            let ev = tokio::select! {
                ev = repl.recv() => ev,
                Some(l) = inflight.next(), if !inflight.is_empty() => {
                    self.landed(l?, &mut state, &repl)?;
                    continue;
                }
                _ = &mut gather, if gathering => {
                    self.write(&mut pending, &mut written, &mut inflight, None, &mut state, &repl).await?;
                    continue;
                }
                Some((req, reply)) = requests.recv(), if idle => {
                    let _ = reply.send(self.queue_snapshots(&client, &mut state, &req).await);
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)), if idle && throttled => continue,
                _ = heartbeat.tick(), if idle => {
                    if txn.is_none() {
                        // A tiny WAL record of our own: it comes back as a Message whose
                        // position is then confirmed (see below).
                        if let Err(e) = client.execute("SELECT pg_logical_emit_message(false, 'sluice-heartbeat', '')", &[]).await {
                            tracing::warn!(source = self.name, "heartbeat: {e} (keepalives still confirm the position when the server sends them)");
                        }
                    }
                    continue;
                }
                _ = shutdown.changed(), if idle => {
                    while let Some(l) = inflight.next().await {
                        self.landed(l?, &mut state, &repl)?;
                    }
                    repl.stop();
                    return Ok(());
                }
            };
            let ev = match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(Stop::Retry(anyhow::anyhow!("the server ended replication"))),
                Err(e) => return Err(Stop::Retry(anyhow::anyhow!("replication: {e}"))),
            };
            match ev {
                ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                    let commit_time_ms = (commit_time_micros + PG_EPOCH_MICROS) / 1000;
                    let text = events::TxnText::new(xid, &final_lsn.to_string(), &rfc3339(commit_time_ms), &database);
                    txn = Some(Txn { lsn: final_lsn.as_u64(), commit_time_ms, seq: 0, text });
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let m = pgoutput::decode(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
                    let Some(m) = m else { continue };
                    match m {
                        Message::Relation(r) => {
                            for c in &r.columns {
                                if !types::is_known(c.type_oid) && warned.insert((r.oid, c.name.clone())) {
                                    let ty = type_names.get(&c.type_oid).cloned().unwrap_or_else(|| format!("oid {}", c.type_oid));
                                    tracing::info!(source = self.name, "column {}.{}.{} has type {ty}: its values are kept as text", r.namespace, r.name, c.name);
                                }
                            }
                            by_oid.remove(&r.oid);
                            relations.insert(r.oid, (events::RelText::new(&self.name, &r), r));
                        }
                        Message::Type { oid, namespace, name } => {
                            type_names.insert(oid, format!("{namespace}.{name}"));
                        }
                        Message::Origin { .. } => {}
                        change => {
                            let Some(t) = txn.as_mut() else {
                                return Err(Stop::Retry(anyhow::anyhow!("a change outside a transaction")));
                            };
                            let changes = events::events(
                                |oid| relations.get(&oid).map(|(text, r)| (r, text)),
                                |r| self.cfg.tables.captures(&r.namespace, &r.name),
                                &change,
                                &t.text,
                                &mut t.seq,
                                sluice_core::time::now_ms(),
                            )
                            .map_err(|oid| Stop::Retry(anyhow::anyhow!("a change to relation {oid} before its description")))?;
                            for events::Change { oid, key, seq, event } in changes {
                                let rel = &relations[&oid].1;
                                // The stream of a relation, looked up once per relation description.
                                let stream = match by_oid.get(&oid) {
                                    Some(s) => s.clone(),
                                    None => {
                                        let s = self.stream_for(&rel.namespace, &rel.name, &mut streams, &mut state)?;
                                        by_oid.insert(oid, s.clone());
                                        s
                                    }
                                };
                                if let Some(c) = chunk.as_mut().filter(|c| c.open && c.info.schema == rel.namespace && c.info.name == rel.name) {
                                    match &key {
                                        Some(k) => {
                                            c.changed.insert(k.clone());
                                        }
                                        // A truncate in the window: the rows read are stale.
                                        None => c.open = false,
                                    }
                                }
                                let value = bytes::Bytes::from(event);
                                match key {
                                    Some(k) => {
                                        let p = stream.partition_for_key(k.as_bytes());
                                        pending.push(&stream, p, (t.lsn, seq), Record::with_key(bytes::Bytes::from(k), value, t.commit_time_ms));
                                    }
                                    // No key (a truncate, or a table without one): to every
                                    // partition, so each sees it in order.
                                    None => {
                                        for p in 0..stream.partitions().len() as u32 {
                                            pending.push(&stream, p, (t.lsn, seq), Record::new(value.clone(), t.commit_time_ms));
                                        }
                                    }
                                }
                                self.status.changes.fetch_add(1, Ordering::Relaxed);
                            }
                            if pending.records >= GROUP_RECORDS {
                                self.write(&mut pending, &mut written, &mut inflight, None, &mut state, &repl).await?;
                            }
                        }
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    txn = None;
                    pending.commit_end = Some(end_lsn.as_u64());
                    self.status.transactions.fetch_add(1, Ordering::Relaxed);
                    self.status.received_lsn.fetch_max(end_lsn.as_u64(), Ordering::Relaxed);
                    if pending.records >= GROUP_RECORDS {
                        self.write(&mut pending, &mut written, &mut inflight, None, &mut state, &repl).await?;
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    // Between transactions with everything written, all before the server's
                    // position is ours: confirm it, so an idle slot does not hold WAL.
                    if txn.is_none() && pending.is_empty() && inflight.is_empty() {
                        self.confirm(&repl, wal_end.as_u64());
                    }
                }
                ReplicationEvent::Message { lsn, prefix, content, .. } => {
                    if prefix == snapshot::WATERMARK_PREFIX {
                        let text = String::from_utf8_lossy(&content).into_owned();
                        if let Some(c) = chunk.as_mut() {
                            if text == format!("low {}", c.marker) {
                                c.open = true;
                            } else if text == format!("high {}", c.marker) {
                                if let Some(mut c) = chunk.take() {
                                    // A message's LSN is where its record ends, and the next
                                    // commit record may start right there: the rows take the
                                    // position just before it, which no commit can share.
                                    let at = lsn.as_u64().saturating_sub(1);
                                    let t0 = std::time::Instant::now();
                                    let waited = c.started.elapsed();
                                    let (last_key, finished, next) = self.chunk_head(&mut c, &mut state).await?;
                                    if !finished && self.cfg.snapshot_throttle.0.is_zero() {
                                        // The next chunk is read while this one's events are
                                        // finished and written: they are pending before its low
                                        // watermark comes. Usually its reading task started it
                                        // already, right after this one's high watermark.
                                        chunk = match next {
                                            Some(r) => Some(Chunk::new(r, c.task, c.info.clone(), c.limit, c.read.clone())),
                                            None => self.start_chunk(&client, &state, &database).await?,
                                        };
                                    } else if let Some(n) = next {
                                        n.drop_chain();
                                    }
                                    let done = self.finish_chunk(c, at, last_key, finished, &database, &mut state, &mut streams, &mut pending).await?;
                                    let built = t0.elapsed();
                                    self.write(&mut pending, &mut written, &mut inflight, Some(done), &mut state, &repl).await?;
                                    tracing::debug!(source = self.name, ?waited, ?built, appended = ?t0.elapsed(), "snapshot chunk");
                                    last_chunk = std::time::Instant::now();
                                }
                            }
                        }
                    }
                    if txn.is_none() && pending.is_empty() && inflight.is_empty() {
                        self.confirm(&repl, lsn.as_u64());
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(()),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
    }
}

impl PostgresSource {
    fn confirm(&self, repl: &ReplicationClient, lsn: u64) {
        if lsn > self.status.confirmed_lsn.load(Ordering::Relaxed) {
            repl.update_applied_lsn(Lsn(lsn));
            self.status.confirmed_lsn.store(lsn, Ordering::Relaxed);
            self.status.received_lsn.fetch_max(lsn, Ordering::Relaxed);
        }
    }

    /// Appends the pending changes (skipping what the log already holds) and puts their
    /// fsync in flight; once durable, the last whole transaction among them is confirmed and
    /// `chunk` recorded (see [`PostgresSource::landed`]). With too many in flight, waits
    /// for the oldest.
    async fn write(
        &self,
        pending: &mut Pending,
        written: &mut HashMap<(String, u32), Position>,
        inflight: &mut Inflight,
        chunk: Option<ChunkDone>,
        state: &mut State,
        repl: &ReplicationClient,
    ) -> Result<(), Stop> {
        inflight.chunks += chunk.is_some() as usize;
        inflight.writes.push(&self.name, pending, written, move |confirm| Landed { confirm, chunk })?;
        while inflight.writes.len() > MAX_INFLIGHT {
            let Some(l) = inflight.next().await else { break };
            self.landed(l?, state, repl)?;
        }
        Ok(())
    }

    /// A write is durable: confirms its position, records its snapshot chunk (a restart
    /// resumes after it; the last one finishes its snapshot).
    fn landed(&self, l: Landed, state: &mut State, repl: &ReplicationClient) -> Result<(), Stop> {
        if let Some(end) = l.confirm {
            self.confirm(repl, end);
        }
        let Some(c) = l.chunk else { return Ok(()) };
        let Some(i) = state.snapshots.iter().position(|t| t.id == c.task) else { return Ok(()) };
        let task = &mut state.snapshots[i];
        task.rows += c.rows;
        task.chunks += 1;
        if let Some(k) = c.after {
            task.after = Some(k);
        }
        if c.finished {
            let t = state.snapshots.remove(i);
            self.save_state(state)?;
            tracing::info!(source = self.name, table = t.table, rows = t.rows, "snapshot finished");
            self.status.snapshot_finished(&t);
        } else {
            // A restart before this is on disk reads the chunk again (see `state_file`).
            self.state.save_later(state)?;
        }
        self.show_snapshots(state);
        Ok(())
    }

    /// The stream of a table, opened (and remembered in the state) on its first change.
    fn stream_for(&self, schema: &str, table_name: &str, streams: &mut HashMap<String, Arc<Stream>>, state: &mut State) -> anyhow::Result<Arc<Stream>> {
        let table = format!("{schema}.{table_name}");
        let name = table_stream(&self.name, schema, table_name);
        if let Some(s) = streams.get(&name) {
            return Ok(s.clone());
        }
        // Known as ours before it is opened, so that it lands as a mirror.
        if state.tables.get(&table) != Some(&name) {
            state.tables.insert(table.clone(), name.clone());
            self.save_state(state)?;
        }
        self.status.tables.lock().insert(table, name.clone());
        let s = (self.open_stream)(&name, self.cfg.partitions)?;
        streams.insert(name, s.clone());
        Ok(s)
    }

    /// Queues a snapshot of every captured table: the first capture of a database.
    async fn initial_snapshot(&self, client: &tokio_postgres::Client, state: &mut State) -> Result<(), Stop> {
        if self.cfg.snapshot != "initial" {
            return Ok(());
        }
        self.queue_snapshots(client, state, &SnapshotRequest::default()).await.map_err(|e| Stop::Retry(anyhow::anyhow!("initial snapshot: {e}")))?;
        Ok(())
    }

    /// The settings of a connection snapshots read on: values printed like the replication
    /// session's (see `types`).
    fn snapshot_settings(&self) -> String {
        format!(
            "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET IntervalStyle = iso_8601; SET application_name = 'sluice-{}-snapshot'",
            self.name
        )
    }

    /// Starts the next chunk of the first queued snapshot: watermarks and the read run on
    /// their own task while the replication stream is processed. None: the table is gone.
    async fn start_chunk(&self, client: &Arc<tokio_postgres::Client>, state: &State, database: &str) -> Result<Option<Chunk>, Stop> {
        let task = state.snapshots[0].clone();
        let (schema, name) = task.table.split_once('.').unwrap_or(("public", task.table.as_str()));
        let Some(info) = snapshot::table_info(client, schema, name).await? else { return Ok(None) };
        let Some((limit, keys)) = task.chunk_plan(&self.name, &info.key_names(), self.cfg.snapshot_chunk) else { return Ok(None) };
        let after = task.cursor.clone().or(task.after.clone());
        let chain = self.cfg.snapshot_throttle.0.is_zero();
        // A chain of chunks flushes its watermarks on a connection of its own and reads on
        // another, both opened at once.
        let (flusher, read) = if chain && keys.is_none() {
            let (flusher, read) = tokio::join!(
                async { crate::pg_tls::parse(&self.cfg.url)?.connect("snapshot WAL flush").await },
                ReadConn::open(&self.cfg.url, self.snapshot_settings())
            );
            let flusher = flusher
                .map(|(client, conn)| Arc::new(snapshot::Flusher::new(client, conn)))
                .inspect_err(|e| tracing::warn!(source = self.name, error = %e, "snapshot: no second connection to flush the WAL on; each chunk flushes it itself"));
            let read = read
                .map(Arc::new)
                .inspect_err(|e| tracing::warn!(source = self.name, error = %e, "snapshot: no connection of its own to read on; reading on the source's"));
            (flusher.ok(), read.ok())
        } else {
            (None, None)
        };
        let spec = ReadSpec {
            client: read.as_ref().map_or_else(|| client.clone(), |r| r.client.clone()),
            rt: read.as_ref().map(|r| r.rt.clone()),
            info: info.clone(),
            source: self.name.clone(),
            database: database.to_string(),
            task: task.id,
            limit,
            chain,
            ahead: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD)),
            flusher,
        };
        Ok(Some(Chunk::new(spawn_read(spec, after, keys, None), task.id, info, limit, read)))
    }

    /// At the high watermark, before the chunk's events are ready: the key of its last row
    /// (the next chunk starts after it), whether it is the snapshot's last chunk, and the
    /// next chunk if the reading task started it. A chunk whose window saw a truncate is
    /// read again (no key, and a next chunk started is dropped).
    async fn chunk_head(&self, c: &mut Chunk, state: &mut State) -> Result<(Option<Vec<String>>, bool, Option<Reader>), Stop> {
        let Head { last_key, read, next } = match (&mut c.head).await {
            Ok(h) => h,
            // The read failed: its error.
            Err(_) => return Err((&mut c.rows).await.map_err(|e| anyhow::anyhow!("snapshot read: {e}"))?.err().unwrap_or_else(|| anyhow::anyhow!("snapshot read ended")).into()),
        };
        if !c.open {
            if let Some(n) = next {
                n.drop_chain();
            }
            return Ok((None, false, None));
        }
        let task = &mut state.snapshots[0];
        debug_assert_eq!(task.id, c.task);
        if last_key.is_some() {
            task.cursor = last_key.clone();
        }
        Ok((last_key, read < c.limit || task.keys.is_some(), next))
    }

    /// At the high watermark: the chunk's rows that no change in the window touched become
    /// `read` events at position `lsn` (just before the watermark's end: after every commit
    /// before the watermark, before every commit after it). The snapshot's progress moves
    /// once its events are durable (see `landed`).
    #[allow(clippy::too_many_arguments)]
    async fn finish_chunk(
        &self,
        c: Chunk,
        lsn: u64,
        last_key: Option<Vec<String>>,
        finished: bool,
        database: &str,
        state: &mut State,
        streams: &mut HashMap<String, Arc<Stream>>,
        pending: &mut Pending,
    ) -> Result<ChunkDone, Stop> {
        let read = c.rows.await.map_err(|e| anyhow::anyhow!("snapshot read: {e}"))??;
        if !c.open {
            // A truncate between the watermarks: the rows read may be gone. Read the chunk again.
            return Ok(ChunkDone { task: c.task, rows: 0, after: None, finished: false });
        }
        let stream = self.stream_for(&c.info.schema, &c.info.name, streams, state)?;
        let records = match read.at {
            Some(at) if at == lsn => read.records,
            ahead => {
                tracing::debug!(source = self.name, ?ahead, lsn, "snapshot events written again: the high watermark's LSN is not the one its insert returned");
                read_events(&self.name, database, &c.info, &read.rows, lsn).map_err(|e| anyhow::anyhow!("snapshot of {}: {e}", c.info.qualified()))?
            }
        };
        let mut emitted = 0u64;
        for (seq, r) in records.into_iter().enumerate() {
            let k = r.key.as_deref().expect("read events are keyed");
            if !c.changed.is_empty() && c.changed.contains(std::str::from_utf8(k).expect("JSON text is UTF-8")) {
                // Changed between the watermarks: the change event is as new or newer.
                continue;
            }
            let p = stream.partition_for_key(k);
            pending.push(&stream, p, (lsn, seq as u64), r);
            emitted += 1;
        }
        Ok(ChunkDone { task: c.task, rows: emitted, after: last_key, finished })
    }

}

// What the PostgreSQL and MySQL sources share.

/// One connection's life of a source: Ok when asked to stop.
pub(crate) trait Session {
    fn session(&self, shutdown: &mut watch::Receiver<bool>) -> impl std::future::Future<Output = Result<(), Stop>> + Send;
}

/// Runs sessions until `shutdown` turns true, reconnecting after errors with backoff (up to
/// 30 s); stops for good on a fault that needs the user.
pub(crate) async fn run_sessions(source: &impl Session, name: &str, status: &SourceStatus, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            status.set_state("stopped");
            return;
        }
        match source.session(&mut shutdown).await {
            Ok(()) => {
                status.set_state("stopped");
                return;
            }
            Err(Stop::Fatal(m)) => {
                tracing::error!(source = name, "{m}");
                status.set_failing("failed", m);
                return;
            }
            Err(Stop::Retry(e)) => {
                let m = format!("{e:#}");
                tracing::warn!(source = name, error = m, "source: retrying in {backoff:?}");
                metrics::counter!("sluice_source_errors_total", "source" => name.to_string()).increment(1);
                status.set_failing("retrying", m);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// At most this many writes in flight: the stream waits for the oldest beyond it.
pub(crate) const MAX_INFLIGHT: usize = 8;

/// Writes of changes to the log running while a source reads on: each appends its records
/// (on a blocking thread, after the write before it, so the log keeps the changes' order)
/// and then fsyncs them. They finish in order, each giving back what its source records
/// once the changes are durable (`T`).
pub(crate) struct Writes<T> {
    writes: futures::stream::FuturesOrdered<futures::future::BoxFuture<'static, Result<T, Stop>>>,
    /// Resolves once the last write's records are appended.
    appended: Option<tokio::sync::oneshot::Receiver<()>>,
    fence: Arc<AppendFence>,
    /// This session's generation in `fence`.
    generation: u64,
}

/// Orders a source's appends across its sessions. A session that ends with writes in flight
/// drops them, but an append already handed to a blocking thread still runs; the next
/// session must not read the log's positions before it, nor see it land after. Appends run
/// under this lock and only while their session's generation is current; a new session
/// takes a new generation (waiting for an append running now), so a dropped session's
/// later appends are refused.
#[derive(Default)]
pub(crate) struct AppendFence(parking_lot::Mutex<u64>);

impl<T: Send + 'static> Writes<T> {
    /// A new session's writes: from here on, appends of earlier sessions are refused.
    pub(crate) fn new(fence: &Arc<AppendFence>) -> Writes<T> {
        let generation = {
            let mut g = fence.0.lock();
            *g += 1;
            *g
        };
        Writes { writes: Default::default(), appended: None, fence: fence.clone(), generation }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.writes.len()
    }

    /// Starts writing the pending changes the log does not hold yet (`written` then counts
    /// them as held); [`Writes::next`] gives back `landed(end of the last whole transaction
    /// among them)` once they are durable.
    pub(crate) fn push(
        &mut self,
        source: &str,
        pending: &mut Pending,
        written: &mut HashMap<(String, u32), Position>,
        landed: impl FnOnce(Option<u64>) -> T + Send + 'static,
    ) -> Result<(), Stop> {
        let (batches, end) = fresh_batches(source, pending, written)?;
        let (fence, generation) = (self.fence.clone(), self.generation);
        let before = self.appended.take();
        let (done, appended) = tokio::sync::oneshot::channel();
        self.appended = Some(appended);
        self.writes.push_back(Box::pin(async move {
            if let Some(before) = before {
                // Dropped unsent: the earlier append failed, and this one must not overtake it.
                before.await.map_err(|_| Stop::Retry(anyhow::anyhow!("an earlier write to the log failed")))?;
            }
            let appended = tokio::task::spawn_blocking(move || {
                let current = fence.0.lock();
                if *current != generation {
                    return Ok(Err(Stop::Retry(anyhow::anyhow!("a write of an ended session"))));
                }
                batches.into_iter().map(|(part, records)| part.append(&records).map(|a| (part, a))).collect::<Result<Vec<_>, _>>().map(Ok)
            })
            .await
            .map_err(|e| Stop::Retry(anyhow::anyhow!("appending to the log: {e}")))???;
            let _ = done.send(());
            for (part, a) in &appended {
                part.sync(a).await?;
            }
            Ok(landed(end))
        }));
        Ok(())
    }

    /// The oldest write, once durable.
    pub(crate) async fn next(&mut self) -> Option<Result<T, Stop>> {
        use futures::StreamExt;
        self.writes.next().await
    }
}

/// The pending changes the log does not hold yet, per partition, taken from `pending`
/// (`written` then counts them as held), and the end of their last whole transaction.
#[allow(clippy::type_complexity)]
fn fresh_batches(
    source: &str,
    pending: &mut Pending,
    written: &mut HashMap<(String, u32), Position>,
) -> Result<(Vec<(Arc<sluice_log::Partition>, Vec<Record>)>, Option<u64>), Stop> {
    let p = std::mem::take(pending);
    pending.hint = if p.groups.is_empty() { p.hint } else { p.records / p.groups.len() };
    let mut batches = Vec::new();
    for (stream, partition, positions, mut records) in p.groups {
        let k = (stream.name().to_string(), partition);
        let done = written.get(&k).copied();
        let fresh = |pos: &Position| done.is_none_or(|d| *pos > d);
        let n = records.len();
        // Usually every one is fresh (re-sent changes follow a reconnect): nothing moves then.
        let mut at = positions.iter();
        records.retain(|_| at.next().is_some_and(fresh));
        if records.len() < n {
            tracing::info!(source, stream = stream.name(), partition, "dropped {} re-sent changes the log already holds", n - records.len());
        }
        let Some(&last) = positions.iter().rev().find(|pos| fresh(pos)) else { continue };
        let part = stream.partition(partition).ok_or_else(|| anyhow::anyhow!("stream {} has no partition {partition}", stream.name()))?.clone();
        batches.push((part, records));
        written.insert(k, last);
    }
    Ok((batches, p.commit_end))
}

pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)).unwrap_or_default()
}

/// The position of a partition's last record, after making every record appended to it
/// durable (an earlier session may have left appends whose fsync it did not wait for; they
/// count as written, and are durable before any position after them is confirmed).
pub(crate) async fn held_position(p: &sluice_log::Partition) -> Result<Option<Position>, Stop> {
    p.sync_all().await?;
    Ok(last_position(p)?)
}

/// The position of a partition's last record (commit LSN, sequence), if it has one.
pub(crate) fn last_position(p: &sluice_log::Partition) -> anyhow::Result<Option<Position>> {
    let hw = p.high_watermark();
    if hw == 0 || hw <= p.log_start_offset() {
        return Ok(None);
    }
    let records = p.read(hw - 1, 1 << 20)?;
    let Some(r) = records.iter().find(|r| r.offset == hw - 1) else { return Ok(None) };
    let v: Json = serde_json::from_slice(&r.value).map_err(|e| anyhow::anyhow!("{} partition {}: last record is not a change event: {e}", p.stream_name(), p.id()))?;
    let lsn = v["transaction"]["lsn"].as_str().and_then(|s| Lsn::parse(s).ok());
    let seq = v["transaction"]["seq"].as_u64();
    Ok(lsn.zip(seq).map(|(l, s)| (l.as_u64(), s)))
}

/// Aborts a task when dropped (the session's plain connection).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(lsn: u64, seq: u64) -> Record {
        let v = json!({"op": "insert", "key": {"id": seq}, "transaction": {"lsn": Lsn(lsn).to_string(), "seq": seq}});
        Record::with_key(bytes::Bytes::from("k"), bytes::Bytes::from(v.to_string()), 0)
    }

    #[tokio::test]
    async fn a_new_session_holds_what_the_last_one_appended_and_refuses_its_late_appends() {
        let dir = tempfile::tempdir().unwrap();
        let log = sluice_log::Log::open(dir.path(), Default::default()).unwrap();
        let stream = log.create_stream("src_t", sluice_log::StreamOptions { partitions: 1, ..Default::default() }).unwrap();
        let part = stream.partition(0).unwrap().clone();
        let fence = Arc::new(AppendFence::default());

        // A session appends, and ends before its fsync: the next one counts those changes as
        // written (and makes them durable) instead of writing them again.
        let mut first: Writes<Option<u64>> = Writes::new(&fence);
        let mut written = HashMap::new();
        let mut pending = Pending::default();
        pending.push(&stream, 0, (0x10, 0), change(0x10, 0));
        pending.push(&stream, 0, (0x10, 1), change(0x10, 1));
        pending.commit_end = Some(0x20);
        assert!(first.push("src", &mut pending, &mut written, |end| end).is_ok());
        assert!(matches!(first.next().await, Some(Ok(Some(0x20)))));
        part.append(&[change(0x30, 0)]).unwrap();
        assert_eq!(part.high_watermark(), 2, "the last append is not durable");
        let second: Writes<Option<u64>> = Writes::new(&fence);
        assert!(matches!(held_position(&part).await, Ok(Some((0x30, 0)))));
        assert_eq!(part.high_watermark(), 3);

        // A write of the first session that had not appended yet is refused, not appended
        // after the second session read the positions.
        let mut pending = Pending::default();
        pending.push(&stream, 0, (0x40, 0), change(0x40, 0));
        assert!(first.push("src", &mut pending, &mut written, |end| end).is_ok());
        assert!(matches!(first.next().await, Some(Err(_))));
        assert_eq!(part.next_offset(), 3);
        drop(second);
    }

    #[test]
    fn changes_at_or_below_what_the_log_holds_are_dropped_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = sluice_log::Log::open(dir.path(), Default::default()).unwrap();
        let stream = log.create_stream("src_t", sluice_log::StreamOptions { partitions: 2, ..Default::default() }).unwrap();
        let mut written = HashMap::from([(("src_t".to_string(), 0), (0x20, 1))]);
        let mut pending = Pending::default();
        for (p, lsn, seq) in [(0, 0x20, 0), (1, 0x20, 0), (0, 0x20, 1), (0, 0x20, 2), (1, 0x30, 0), (0, 0x30, 0)] {
            pending.push(&stream, p, (lsn, seq), change(lsn, seq));
        }
        pending.commit_end = Some(0x40);
        let (batches, end) = fresh_batches("src", &mut pending, &mut written).unwrap_or_else(|_| panic!("fresh batches"));
        let seen: Vec<(u32, Vec<String>)> = batches
            .iter()
            .map(|(part, records)| (part.id(), records.iter().map(|r| serde_json::from_slice::<Json>(&r.value).unwrap()["transaction"].to_string()).collect()))
            .collect();
        let t = |lsn: u64, seq: u64| json!({"lsn": Lsn(lsn).to_string(), "seq": seq}).to_string();
        // Partition 0 holds (0x20, 1): its first two changes are dropped; partition 1 holds nothing.
        assert_eq!(seen, vec![(0, vec![t(0x20, 2), t(0x30, 0)]), (1, vec![t(0x20, 0), t(0x30, 0)])]);
        assert_eq!((end, written[&("src_t".to_string(), 0)], written[&("src_t".to_string(), 1)]), (Some(0x40), (0x30, 0), (0x30, 0)));
        assert!(pending.is_empty());
        // All of a partition's changes already held: no batch for it, its position unchanged.
        pending.push(&stream, 0, (0x30, 0), change(0x30, 0));
        let (batches, _) = fresh_batches("src", &mut pending, &mut written).unwrap_or_else(|_| panic!("fresh batches"));
        assert!(batches.is_empty() && written[&("src_t".to_string(), 0)] == (0x30, 0));
    }
}
