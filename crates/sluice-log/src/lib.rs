//! `sluice-log`: Sluice's embedded, segmented, durable log.
//!
//! A [`Log`] is a directory holding named [`Stream`]s; each stream has a fixed number of
//! [`Partition`]s; each partition is an append-only sequence of records with
//! consecutive offsets, stored in segment files of CRC-checked batches.
//!
//! The on-disk format is Sluice's own and hand-written by design: the log (its recovery
//! rules, group commit and the acknowledgement contract built on them) is part of the
//! product, not a dependency. See [`format`] for the batch layout.
//!
//! ```text
//! <dir>/<stream>/meta.json                          partitions + retention (written atomically)
//! <dir>/<stream>/dictionaries/                      trained zstd dictionaries (see [`dict`])
//! <dir>/<stream>/<partition>/<20-digit base>.log    segment: a sequence of batches
//! <dir>/<stream>/<partition>/<20-digit base>.idx    sparse offset index of a sealed segment
//! <dir>/<stream>/<partition>/consumers/<name>.offset  committed consumer offset (text)
//! ```
//!
//! Contract:
//! - [`Partition::append`] writes a batch (not durable, not visible);
//!   [`Partition::sync`] fsyncs (group commit: concurrent callers share one fdatasync)
//!   and then makes the records visible to readers. Acknowledge only after `sync`.
//! - [`Log::open`] recovers every stream: the active segment is scanned with CRC checks;
//!   a torn tail is truncated (it was never acknowledged); a bad batch followed by valid
//!   batches is kept in place and reported as [`LogError::Corrupt`] by reads reaching it.
//! - A segment is fsync'd when it is sealed (rolled), so sealed segments are complete.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_log::LogError> {
//! use sluice_log::{Log, LogConfig, Record, StreamOptions};
//! let log = Log::open(std::path::Path::new("/tmp/sluice-log"), LogConfig::default())?;
//! let events = log.create_stream("events", StreamOptions { partitions: 4, ..Default::default() })?;
//! let p = events.partition(0).unwrap();
//! let a = p.append(&[Record::new(bytes::Bytes::from_static(b"{\"a\":1}"), 0)])?;
//! p.sync(&a).await?; // durable: acknowledge now
//! let recs = p.read(0, 1 << 20)?;
//! assert_eq!(recs[0].offset, 0);
//! # Ok(()) }
//! ```

mod arrivals;
mod consume;
pub mod dict;
pub mod format;
mod maintain;
mod partition;
mod segment;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use consume::{collect, commit_while_reading, Collected, FlushPolicy};
pub use dict::{DictInfo, Dictionary};
pub use format::Codec;
pub use maintain::{DictionaryAction, DictionaryStats, RepackReport, StreamStats};
pub use partition::{Appended, Partition, SegmentInfo};
use partition::Retention;

/// Log-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls when appending a batch would take it past this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// One sparse index entry per about this many bytes of batches. Default 4096.
    pub index_interval_bytes: u32,
    /// Codec of new batches in streams that do not set their own. Default auto.
    pub codec: Codec,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { segment_bytes: 64 << 20, index_interval_bytes: 4096, codec: Codec::default() }
    }
}

/// Settings of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Number of partitions (>= 1). Fixed once the stream exists.
    pub partitions: u32,
    /// Per-partition size limit enforced by [`Partition::apply_retention`].
    pub retention_bytes: Option<u64>,
    /// Age limit (by record timestamp) enforced by [`Partition::apply_retention`].
    pub retention_ms: Option<u64>,
    /// Codec of new batches; `None` = the log's [`LogConfig::codec`]. Not persisted: each
    /// batch names its own codec, so it can change between runs.
    pub codec: Option<Codec>,
    /// Trained dictionaries; `None` = the defaults.
    pub dictionary: Option<DictionarySettings>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { partitions: 1, retention_bytes: None, retention_ms: None, codec: None, dictionary: None }
    }
}

/// When and how a stream trains its zstd dictionary (see [`dict`]). Used by batches
/// whose codec is zstd (`Zstd` always, `Auto` for small batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictionarySettings {
    /// Train and use dictionaries at all.
    pub enabled: bool,
    /// Train once the stream holds this many records, and retrain (after drift) only
    /// once this many more were written since the last training.
    pub train_after_records: u64,
    /// Train on (at most) this many of the newest records.
    pub sample_records: u32,
    /// Largest dictionary to train.
    pub max_bytes: u32,
    /// Retrain when recent records compress this many percent worse with the current
    /// dictionary than its held-out sample did when it was trained.
    pub retrain_drift_pct: u32,
}

impl Default for DictionarySettings {
    fn default() -> Self {
        DictionarySettings {
            enabled: true,
            train_after_records: 5_000,
            sample_records: 20_000,
            // Measured (bench/dictionaries.sh): 16 KiB stores single events and batches of
            // 16 smaller than 32, 64 or 110 KiB, and is the cheapest to use and to send.
            max_bytes: 16 << 10,
            retrain_drift_pct: 25,
        }
    }
}

/// A stream's compression state, shared by its partitions.
pub(crate) struct Compression {
    pub codec: RwLock<Codec>,
    pub settings: RwLock<DictionarySettings>,
    pub dicts: dict::Dictionaries,
    pub maint: Mutex<maintain::MaintState>,
    /// Batches small enough for the dictionary: those in the active segments at open,
    /// and those appended since (a stream that only gets big batches never trains one).
    pub small_batches: std::sync::atomic::AtomicU64,
}

impl Compression {
    /// The codec and dictionary of the next batch.
    pub fn plan(&self) -> (Codec, Option<Arc<Dictionary>>) {
        let codec = *self.codec.read();
        let dict = if codec.uses_zstd() && self.settings.read().enabled { self.dicts.current() } else { None };
        (codec, dict)
    }
}

/// One record as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Bytes>,
    /// The value; with a template, the record's fields (see [`Template`]).
    pub value: Bytes,
    pub timestamp_ms: i64,
    /// The template the value fills in: readers get the template's pieces with the fields
    /// between them. None: `value` is the value.
    pub template: Option<Arc<Template>>,
}

impl Record {
    /// A record without key.
    pub fn new(value: Bytes, timestamp_ms: i64) -> Record {
        Record { key: None, value, timestamp_ms, template: None }
    }
    /// A keyed record.
    pub fn with_key(key: Bytes, value: Bytes, timestamp_ms: i64) -> Record {
        Record { key: Some(key), value, timestamp_ms, template: None }
    }
    /// A keyed record whose value is `template` filled with `fields` (written with
    /// [`Template::field`]).
    pub fn templated(key: Bytes, fields: Bytes, timestamp_ms: i64, template: Arc<Template>) -> Record {
        Record { key: Some(key), value: fields, timestamp_ms, template: Some(template) }
    }
    /// Whether two records have the same template (or none): they can share a batch.
    pub fn same_template(&self, other: &Record) -> bool {
        match (&self.template, &other.template) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }

    /// The value readers get. Panics if the fields do not fit the template (a record made
    /// with [`Template::field`] for its template always does).
    pub fn full_value(&self) -> Bytes {
        match &self.template {
            None => self.value.clone(),
            Some(t) => {
                let mut out = Vec::new();
                t.expand(&self.value, &mut out).expect("fields written for their template");
                Bytes::from(out)
            }
        }
    }
}

/// What the values of many records share. A value is the template's pieces with the
/// record's fields between them: `piece 0, field 0, piece 1, ..., field n-1, piece n`.
/// A batch of records with one template stores the pieces once and only the fields per
/// record (a snapshot's JSON events: the column names, the source, the framing once per
/// batch, the values per row), which is less to write, compress and copy; readers see
/// whole values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Bytes>,
}

impl Template {
    /// A template of `pieces` (one more than the fields each record has). Panics without
    /// pieces.
    pub fn new(pieces: Vec<Bytes>) -> Template {
        assert!(!pieces.is_empty(), "a template has at least one piece");
        Template { pieces }
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Fields per record.
    pub fn fields(&self) -> usize {
        self.pieces.len() - 1
    }

    /// The pieces' total length: what a value has beyond its fields.
    pub fn pieces_len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// Appends one field to a record's fields: `write` appends the field's bytes to the
    /// vector it is given.
    pub fn field(fields: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        // The length goes first: one byte kept for it, more made room for when the field
        // is 128 bytes or longer.
        let at = fields.len();
        fields.push(0);
        write(fields);
        let len = fields.len() - at - 1;
        if len < 0x80 {
            fields[at] = len as u8;
        } else {
            let mut v = Vec::with_capacity(10);
            format::put_varint(&mut v, len as u64);
            fields.splice(at..at + 1, v);
        }
    }

    /// Appends the value of a record with these fields to `out`. Err: the fields are not
    /// this template's (their count, or a length past the end).
    pub fn expand(&self, fields: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        out.extend_from_slice(&self.pieces[0]);
        self.each_field(fields, |i, f| {
            out.extend_from_slice(f);
            out.extend_from_slice(&self.pieces[i + 1]);
        })
    }

    /// Checks that `fields` are this template's: as many as it has, each within the record.
    pub fn check(&self, fields: &[u8]) -> Result<(), &'static str> {
        self.each_field(fields, |_, _| {})
    }

    /// Calls `f` with each field of a record (its index, its bytes). Err (possibly after
    /// some calls): the fields are not this template's.
    pub fn each_field<'a>(&self, fields: &'a [u8], mut f: impl FnMut(usize, &'a [u8])) -> Result<(), &'static str> {
        let mut pos = 0;
        for i in 0..self.fields() {
            let len = format::get_varint(fields, &mut pos).map_err(|_| "bad field length")?;
            let end = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)).filter(|&e| e <= fields.len()).ok_or("field runs past the record")?;
            f(i, &fields[pos..end]);
            pos = end;
        }
        if pos != fields.len() {
            return Err("more fields than the template has");
        }
        Ok(())
    }
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub key: Option<Bytes>,
    /// The value; with a template, the record's fields (only from
    /// [`Partition::read_fields`]).
    pub value: Bytes,
    pub timestamp_ms: i64,
    /// The template `value`'s fields fill in (checked to fit it when read).
    pub template: Option<Arc<Template>>,
}

impl StoredRecord {
    /// The value's length as readers of whole values get it (for templated records a bound:
    /// the fields' length prefixes count too).
    pub fn value_len(&self) -> usize {
        self.value.len() + self.template.as_ref().map_or(0, |t| t.pieces_len())
    }

    /// The whole value (the template filled in, when there is one).
    pub fn full_value(&self) -> Bytes {
        match &self.template {
            None => self.value.clone(),
            Some(t) => {
                let mut out = Vec::with_capacity(self.value_len());
                t.expand(&self.value, &mut out).expect("fields checked against their template when read");
                Bytes::from(out)
            }
        }
    }
}

/// Errors of the log. Messages name the stream, partition or file concerned.
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt batch at offset {offset} in segment {}", segment.display())]
    Corrupt { segment: PathBuf, offset: u64 },
    #[error("offset {offset} is out of range for stream {stream:?} partition {partition}: the log starts at offset {log_start}")]
    OffsetOutOfRange { stream: String, partition: u32, offset: u64, log_start: u64 },
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("stream {stream:?} partition {partition}: {message}")]
    InvalidArgument { stream: String, partition: u32, message: String },
    #[error("stream {stream:?} partition {partition}: batch of {bytes} bytes exceeds the limit of {limit} bytes")]
    BatchTooLarge { stream: String, partition: u32, bytes: u64, limit: u64 },
    #[error("stream {stream:?} partition {partition} stopped accepting writes after an fsync failure; restart to recover")]
    Failed { stream: String, partition: u32 },
    #[error("bad stream metadata {}: {message}", path.display())]
    Metadata { path: PathBuf, message: String },
    #[error("stream {stream:?}: dictionary {id} {message}")]
    Dictionary { stream: String, id: u32, message: String },
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> LogError {
    LogError::Io { op, path: path.to_path_buf(), source }
}

/// fsync a directory so that entries created/renamed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("fsync directory", dir, e))
}

/// Writes a file atomically and durably: tmp file + fsync + rename + fsync dir.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), LogError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    f.write_all(data).map_err(|e| io_err("write", &tmp, e))?;
    f.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err("rename to", path, e))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Checks a stream name against `^[a-z0-9_][a-z0-9_-]{0,99}$`.
pub fn validate_stream_name(name: &str) -> Result<(), LogError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 100
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidName(format!(
            "stream name {name:?} must match ^[a-z0-9_][a-z0-9_-]{{0,99}}$"
        )))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    partitions: u32,
    retention_bytes: Option<u64>,
    retention_ms: Option<u64>,
}

/// The embedded log: a directory of streams. Share it as `Arc<Log>`.
pub struct Log {
    dir: PathBuf,
    cfg: LogConfig,
    streams: RwLock<BTreeMap<String, Arc<Stream>>>,
    create_lock: Mutex<()>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("dir", &self.dir).field("cfg", &self.cfg).finish()
    }
}

impl Log {
    /// Opens the log in `dir` (creating it), recovering every stream found under it.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create log directory", dir, e))?;
        let mut streams = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err("list log directory", dir, e))? {
            let entry = entry.map_err(|e| io_err("list log directory", dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if validate_stream_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let meta_path = entry.path().join("meta.json");
            if !meta_path.exists() {
                tracing::warn!(dir = %entry.path().display(), "directory without meta.json ignored (incomplete stream creation?)");
                continue;
            }
            let stream = Stream::open(&entry.path(), &name, cfg, None)?;
            streams.insert(name, Arc::new(stream));
        }
        Ok(Log { dir: dir.to_path_buf(), cfg, streams: RwLock::new(streams), create_lock: Mutex::new(()) })
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's configuration.
    pub fn config(&self) -> LogConfig {
        self.cfg
    }

    /// Creates a stream, or returns the existing one of that name. An existing stream keeps
    /// its partition count; its retention settings are updated to `opts` (and persisted).
    pub fn create_stream(&self, name: &str, opts: StreamOptions) -> Result<Arc<Stream>, LogError> {
        validate_stream_name(name)?;
        if opts.partitions == 0 {
            return Err(LogError::InvalidArgument {
                stream: name.to_string(),
                partition: 0,
                message: "a stream needs at least one partition".into(),
            });
        }
        let _g = self.create_lock.lock();
        if let Some(s) = self.streams.read().get(name).cloned() {
            s.set_retention(opts.retention_bytes, opts.retention_ms)?;
            s.set_codec(opts.codec.unwrap_or(self.cfg.codec));
            s.set_dictionary(opts.dictionary.unwrap_or_default());
            return Ok(s);
        }
        let sdir = self.dir.join(name);
        let stream = Stream::open(&sdir, name, self.cfg, Some(opts))?;
        fsync_dir(&self.dir)?;
        let stream = Arc::new(stream);
        self.streams.write().insert(name.to_string(), stream.clone());
        Ok(stream)
    }

    /// The stream of that name.
    pub fn stream(&self, name: &str) -> Option<Arc<Stream>> {
        self.streams.read().get(name).cloned()
    }

    /// All streams, sorted by name.
    pub fn streams(&self) -> Vec<Arc<Stream>> {
        self.streams.read().values().cloned().collect()
    }
}

/// A named, partitioned stream.
pub struct Stream {
    name: String,
    dir: PathBuf,
    partitions: Vec<Arc<Partition>>,
    retention: Arc<RwLock<Retention>>,
    comp: Arc<Compression>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("name", &self.name).field("partitions", &self.partitions.len()).finish()
    }
}

impl Stream {
    /// Opens the stream in `dir`. With `create`, a missing meta.json is written (after the
    /// partitions exist); otherwise meta.json must exist.
    fn open(dir: &Path, name: &str, cfg: LogConfig, create: Option<StreamOptions>) -> Result<Stream, LogError> {
        let meta_path = dir.join("meta.json");
        let meta = match fs::read(&meta_path) {
            Ok(data) => {
                let m: Meta = serde_json::from_slice(&data)
                    .map_err(|e| LogError::Metadata { path: meta_path.clone(), message: e.to_string() })?;
                if m.partitions == 0 {
                    return Err(LogError::Metadata { path: meta_path, message: "partitions must be >= 1".into() });
                }
                Some(m)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &meta_path, e)),
        };
        let (meta, write_meta) = match (meta, create) {
            (Some(m), Some(o)) => {
                let changed = m.retention_bytes != o.retention_bytes || m.retention_ms != o.retention_ms;
                let m = Meta { retention_bytes: o.retention_bytes, retention_ms: o.retention_ms, ..m };
                (m, changed)
            }
            (Some(m), None) => (m, false),
            (None, Some(o)) => (
                Meta {
                    format_version: 1,
                    partitions: o.partitions,
                    retention_bytes: o.retention_bytes,
                    retention_ms: o.retention_ms,
                },
                true,
            ),
            (None, None) => {
                return Err(LogError::Metadata { path: meta_path, message: "missing".into() });
            }
        };
        fs::create_dir_all(dir).map_err(|e| io_err("create stream directory", dir, e))?;
        let retention = Arc::new(RwLock::new(Retention { bytes: meta.retention_bytes, ms: meta.retention_ms }));
        let comp = Arc::new(Compression {
            codec: RwLock::new(create.and_then(|o| o.codec).unwrap_or(cfg.codec)),
            settings: RwLock::new(create.and_then(|o| o.dictionary).unwrap_or_default()),
            dicts: dict::Dictionaries::open(dir, name)?,
            maint: Mutex::new(maintain::MaintState::default()),
            small_batches: std::sync::atomic::AtomicU64::new(0),
        });
        let mut partitions = Vec::with_capacity(meta.partitions as usize);
        for p in 0..meta.partitions {
            let pdir = dir.join(p.to_string());
            partitions.push(Arc::new(Partition::open(pdir, p, name, cfg, retention.clone(), comp.clone())?));
        }
        if write_meta {
            write_meta_file(&meta_path, &meta)?;
        }
        Ok(Stream { name: name.to_string(), dir: dir.to_path_buf(), partitions, retention, comp })
    }

    fn set_retention(&self, bytes: Option<u64>, ms: Option<u64>) -> Result<(), LogError> {
        let new = Retention { bytes, ms };
        if *self.retention.read() == new {
            return Ok(());
        }
        let meta = Meta {
            format_version: 1,
            partitions: self.partitions.len() as u32,
            retention_bytes: bytes,
            retention_ms: ms,
        };
        write_meta_file(&self.dir.join("meta.json"), &meta)?;
        *self.retention.write() = new;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compresses the next batches with `codec`; batches written before keep theirs.
    pub fn set_codec(&self, codec: Codec) {
        *self.comp.codec.write() = codec;
    }

    /// Changes when and how the stream trains dictionaries (off: new batches use none;
    /// old ones still decode).
    pub fn set_dictionary(&self, settings: DictionarySettings) {
        *self.comp.settings.write() = settings;
    }

    /// The dictionary new batches use, if any.
    pub fn current_dictionary(&self) -> Option<Arc<Dictionary>> {
        self.comp.plan().1
    }

    /// The dictionary with this id, or why there is none usable.
    pub fn dictionary(&self, id: u32) -> Result<Arc<Dictionary>, LogError> {
        self.comp.dicts.get(id).map_err(|message| LogError::Dictionary { stream: self.name.clone(), id, message })
    }

    /// Whether a client may compress a request body with dictionary `id`: the current
    /// one and the one it replaced are accepted. The error says why not, naming the id.
    pub fn dictionary_for_wire(&self, id: u32) -> Result<Arc<Dictionary>, String> {
        let (current, previous) = self.comp.dicts.accepted_on_wire();
        let hint = match current {
            Some(c) => format!("the current one is {c}: GET /v1/streams/{}/dictionary", self.name),
            None => "the stream has no dictionary now".to_string(),
        };
        if Some(id) != current && Some(id) != previous {
            let what = if id < self.comp.dicts.next_id() { "is retired" } else { "is unknown" };
            return Err(format!("dictionary {id} of stream {:?} {what}; {hint}", self.name));
        }
        self.comp.dicts.get(id).map_err(|why| format!("dictionary {id} of stream {:?} {why}; {hint}", self.name))
    }

    /// The stream's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stream's current options.
    pub fn options(&self) -> StreamOptions {
        let r = *self.retention.read();
        StreamOptions {
            partitions: self.partitions.len() as u32,
            retention_bytes: r.bytes,
            retention_ms: r.ms,
            codec: Some(*self.comp.codec.read()),
            dictionary: Some(*self.comp.settings.read()),
        }
    }

    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    pub fn partition(&self, p: u32) -> Option<&Arc<Partition>> {
        self.partitions.get(p as usize)
    }

    /// The partition records with this key go to (stable across restarts and versions:
    /// CRC32 of the key modulo the partition count).
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        if self.partitions.len() <= 1 {
            return 0;
        }
        crc32fast::hash(key) % (self.partitions.len() as u32)
    }

    /// Applies retention to every partition; returns the bytes deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<u64, LogError> {
        let mut total = 0;
        for p in &self.partitions {
            total += p.apply_retention(now_ms)?;
        }
        Ok(total)
    }
}

fn write_meta_file(path: &Path, meta: &Meta) -> Result<(), LogError> {
    let mut data = serde_json::to_vec_pretty(meta)
        .map_err(|e| LogError::Metadata { path: path.to_path_buf(), message: e.to_string() })?;
    data.push(b'\n');
    write_atomic(path, &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        for ok in ["a", "events", "_x", "0abc", "a-b_c", &"a".repeat(100)] {
            assert!(validate_stream_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a.b", "a/b", "..", "é", &"a".repeat(101), "a b"] {
            assert!(matches!(validate_stream_name(bad), Err(LogError::InvalidName(_))), "{bad}");
        }
    }

    #[test]
    fn log_is_send_sync() {
        fn is<T: Send + Sync>() {}
        is::<Log>();
        is::<Stream>();
        is::<Partition>();
    }
}
