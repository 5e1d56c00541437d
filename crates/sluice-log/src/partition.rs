//! One partition of a stream: its segments, the append path, group commit, reads,
//! consumer offsets and retention.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::format::{self, DictLookup, Plan, HEADER_LEN};
use crate::segment::{parse_segment_name, Segment, Window};
use crate::{fsync_dir, io_err, write_atomic, LogConfig, LogError, Record, StoredRecord};

/// Retention settings shared by the partitions of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Retention {
    pub bytes: Option<u64>,
    pub ms: Option<u64>,
}

/// What [`Partition::append`] wrote: the batch's offsets. Pass it to [`Partition::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_offset: u64,
    pub last_offset: u64,
}

/// Facts about one segment file (for tools, metrics and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub base_offset: u64,
    /// One past the last record written to it.
    pub next_offset: u64,
    pub size_bytes: u64,
    pub max_timestamp_ms: i64,
    pub active: bool,
}

/// Sealed-segment indexes kept in memory per partition (least recently used are dropped).
const MAX_LOADED_SEALED_INDEXES: usize = 8;

struct Writer {
    active: Arc<Segment>,
    next_offset: u64,
    size: u64,
    since_index: u64,
    /// A segment file was created since the directory was last fsync'd.
    dir_dirty: bool,
}

/// One partition: an ordered, durable sequence of records. See the crate docs.
pub struct Partition {
    id: u32,
    stream: String,
    dir: PathBuf,
    cfg: LogConfig,
    retention: Arc<RwLock<Retention>>,
    /// The stream's codec and dictionaries (shared by its partitions).
    comp: Arc<crate::Compression>,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    sync_lock: tokio::sync::Mutex<()>,
    hw: AtomicU64,
    hw_tx: watch::Sender<u64>,
    /// When offsets became durable (for consumers' flush intervals).
    arrivals: Mutex<crate::arrivals::Arrivals>,
    fsyncs: AtomicU64,
    failed: AtomicBool,
    /// Committed consumer offsets; `None` = an offset file that could not be read.
    consumers: Mutex<BTreeMap<String, Option<u64>>>,
    /// Held by retention and re-packing, which both replace sealed segments.
    maint_lock: Mutex<()>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("stream", &self.stream)
            .field("id", &self.id)
            .field("high_watermark", &self.high_watermark())
            .finish()
    }
}

fn valid_consumer_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 200
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

impl Partition {
    /// Opens (creating when missing) the partition directory and recovers its segments.
    pub(crate) fn open(
        dir: PathBuf,
        id: u32,
        stream: &str,
        cfg: LogConfig,
        retention: Arc<RwLock<Retention>>,
        comp: Arc<crate::Compression>,
    ) -> Result<Partition, LogError> {
        let created = !dir.exists();
        fs::create_dir_all(&dir).map_err(|e| io_err("create partition directory", &dir, e))?;
        let cdir = dir.join("consumers");
        if !cdir.exists() {
            fs::create_dir_all(&cdir).map_err(|e| io_err("create consumers directory", &cdir, e))?;
            fsync_dir(&dir)?;
        }
        if created {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        let interval = u64::from(cfg.index_interval_bytes.max(1));

        let mut bases = Vec::new();
        let mut idx_files = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err("list partition directory", &dir, e))? {
            let entry = entry.map_err(|e| io_err("list partition directory", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = parse_segment_name(name) {
                bases.push(base);
            } else if name.ends_with(".idx") || name.ends_with(".idx.tmp") {
                idx_files.push(entry.path());
            } else if name.ends_with(".repack") {
                // A re-pack that did not finish: the original segment is intact.
                let _ = fs::remove_file(entry.path());
            }
        }
        bases.sort_unstable();
        // Remove index files whose segment is gone (e.g. a crash during retention).
        for p in idx_files {
            let keep = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".idx"))
                .and_then(|stem| parse_segment_name(&format!("{stem}.log")))
                .is_some_and(|b| bases.binary_search(&b).is_ok());
            if !keep {
                let _ = fs::remove_file(&p);
            }
        }

        let mut segments = Vec::with_capacity(bases.len().max(1));
        if bases.is_empty() {
            segments.push(Arc::new(Segment::create(&dir, 0, interval)?));
            fsync_dir(&dir)?;
        } else {
            let last = bases.len() - 1;
            for (i, &base) in bases.iter().enumerate() {
                let path = dir.join(crate::segment::segment_file_name(base));
                if i < last {
                    segments.push(Arc::new(Segment::open_sealed(path, base, interval)?));
                } else {
                    let (seg, _truncated, small) = Segment::open_active(path, base, interval)?;
                    // Recent small batches: the stream is worth a dictionary.
                    comp.small_batches.fetch_add(small, Ordering::Relaxed);
                    segments.push(Arc::new(seg));
                }
            }
            for w in segments.windows(2) {
                let end = w[0].next_offset.load(Ordering::Acquire);
                if end > w[1].base {
                    tracing::warn!(
                        segment = %w[0].path.display(), next = %w[1].path.display(),
                        "segment holds offsets beyond the next segment's base offset"
                    );
                } else if end < w[1].base {
                    tracing::warn!(
                        segment = %w[0].path.display(), missing_from = end, missing_to = w[1].base,
                        "segment ends before the next segment's base offset; reads reaching the missing offsets fail as corrupt"
                    );
                }
            }
        }
        let active = segments.last().cloned().expect("at least one segment");
        let next_offset = active.next_offset.load(Ordering::Acquire);
        let size = active.size.load(Ordering::Acquire);

        let consumers = load_consumers(&cdir)?;
        let (hw_tx, _) = watch::channel(next_offset);
        Ok(Partition {
            id,
            stream: stream.to_string(),
            dir,
            cfg,
            retention,
            comp,
            segments: RwLock::new(segments),
            writer: Mutex::new(Writer {
                active,
                next_offset,
                size,
                since_index: if size == 0 { u64::MAX } else { 0 },
                dir_dirty: true,
            }),
            sync_lock: tokio::sync::Mutex::new(()),
            hw: AtomicU64::new(next_offset),
            hw_tx,
            arrivals: Mutex::new(crate::arrivals::Arrivals::new(next_offset)),
            fsyncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            consumers: Mutex::new(consumers),
            maint_lock: Mutex::new(()),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Name of the stream this partition belongs to.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_failed(&self) -> Result<(), LogError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(LogError::Failed { stream: self.stream.clone(), partition: self.id });
        }
        Ok(())
    }

    /// Writes the records to the active segment, in order: one batch, or one per run of
    /// records that share a template (each batch's records get consecutive offsets).
    /// Not yet durable nor visible to readers: call [`Partition::sync`].
    pub fn append(&self, records: &[Record]) -> Result<Appended, LogError> {
        let mut runs = records.chunk_by(Record::same_template);
        // (No records: the batch writer refuses them.)
        let first = self.append_batch(runs.next().unwrap_or(records))?;
        let mut last = first.last_offset;
        for run in runs {
            last = self.append_batch(run)?.last_offset;
        }
        Ok(Appended { first_offset: first.first_offset, last_offset: last })
    }

    /// Writes one batch (all records get consecutive offsets) to the active segment.
    fn append_batch(&self, records: &[Record]) -> Result<Appended, LogError> {
        self.check_failed()?;
        if records.is_empty() {
            return Err(LogError::InvalidArgument {
                stream: self.stream.clone(),
                partition: self.id,
                message: "cannot append an empty batch".into(),
            });
        }
        let (codec, dict) = self.comp.plan();
        let plan = Plan { codec, dict: dict.as_deref() };
        let res = format::with_encoded(records, plan, |pending, out| -> Result<Appended, LogError> {
            let total = out.len() as u64;
            let mut w = self.writer.lock();
            self.check_failed()?;
            if w.size > 0 && w.size + total > self.cfg.segment_bytes {
                self.roll(&mut w)?;
            }
            let base = w.next_offset;
            format::finish_batch(pending, out, base);
            let seg = w.active.clone();
            if let Err(e) = (&seg.file).write_all(out) {
                // Do not leave a partial batch in front of the next one.
                if seg.file.set_len(w.size).is_err() {
                    self.failed.store(true, Ordering::Release);
                }
                return Err(io_err("append to segment", &seg.path, e));
            }
            let pos = w.size;
            if w.since_index >= u64::from(self.cfg.index_interval_bytes.max(1)) {
                seg.push_index(base, pos);
                w.since_index = 0;
            }
            w.since_index = w.since_index.saturating_add(total);
            w.size += total;
            w.next_offset = base + u64::from(pending.record_count);
            seg.size.store(w.size, Ordering::Release);
            seg.next_offset.store(w.next_offset, Ordering::Release);
            seg.max_ts.fetch_max(pending.max_timestamp, Ordering::AcqRel);
            if pending.raw_len <= format::DICT_MAX_BATCH_BYTES {
                self.comp.small_batches.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Appended { first_offset: base, last_offset: w.next_offset - 1 })
        });
        match res {
            Ok(r) => r,
            Err(format::FormatError::TooLarge(bytes)) => Err(LogError::BatchTooLarge {
                stream: self.stream.clone(),
                partition: self.id,
                bytes,
                limit: format::MAX_BATCH_BYTES as u64,
            }),
            Err(e) => Err(LogError::InvalidArgument {
                stream: self.stream.clone(),
                partition: self.id,
                message: e.to_string(),
            }),
        }
    }

    /// Seals the active segment (fsync'ing it, so a sealed segment is always complete on
    /// disk) and starts a new one. Called with the writer lock held.
    fn roll(&self, w: &mut Writer) -> Result<(), LogError> {
        let old = w.active.clone();
        // Always fsync the directory too: a concurrent sync may have taken `dir_dirty`
        // without having finished its own directory fsync yet.
        let synced = old
            .file
            .sync_data()
            .map_err(|e| io_err("fsync segment", &old.path, e))
            .and_then(|_| fsync_dir(&self.dir));
        if let Err(e) = synced {
            self.failed.store(true, Ordering::Release);
            return Err(e);
        }
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        old.readable_end.fetch_max(w.size, Ordering::AcqRel);
        self.advance_hw(w.next_offset);
        if let Err(e) = old.write_idx() {
            tracing::warn!(error = %e, "could not write segment index; it will be rebuilt on open");
        }
        let seg = Arc::new(Segment::create(&self.dir, w.next_offset, old.index_interval())?);
        self.segments.write().push(seg.clone());
        self.trim_indexes();
        w.active = seg;
        w.size = 0;
        w.since_index = u64::MAX;
        w.dir_dirty = true;
        Ok(())
    }

    fn advance_hw(&self, to: u64) {
        let before = self.hw.fetch_max(to, Ordering::AcqRel);
        if to > before {
            self.arrivals.lock().record(before, std::time::Instant::now());
        }
        self.hw_tx.send_if_modified(|v| {
            if to > *v {
                *v = to;
                true
            } else {
                false
            }
        });
    }

    /// Group commit: returns once everything up to and including `a` is fsync'd; the
    /// records are then visible to readers. Concurrent callers share one fdatasync.
    pub async fn sync(&self, a: &Appended) -> Result<(), LogError> {
        self.sync_to(a.last_offset.saturating_add(1)).await
    }

    /// Makes everything appended so far durable and visible.
    pub async fn sync_all(&self) -> Result<(), LogError> {
        let target = self.writer.lock().next_offset;
        self.sync_to(target).await
    }

    async fn sync_to(&self, target: u64) -> Result<(), LogError> {
        if self.hw.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.check_failed()?;
        let _turn = self.sync_lock.lock().await;
        if self.hw.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.check_failed()?;
        let (seg, end_pos, end_offset, dir_dirty) = {
            let mut w = self.writer.lock();
            (w.active.clone(), w.size, w.next_offset, std::mem::take(&mut w.dir_dirty))
        };
        let dir = self.dir.clone();
        let seg2 = seg.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(), LogError> {
            seg2.file.sync_data().map_err(|e| io_err("fsync segment", &seg2.path, e))?;
            if dir_dirty {
                fsync_dir(&dir)?;
            }
            Ok(())
        })
        .await;
        let res = match res {
            Ok(r) => r,
            Err(e) => Err(io_err("fsync segment", &seg.path, io::Error::other(e.to_string()))),
        };
        if let Err(e) = res {
            // After a failed fsync the page cache may have dropped the data: never
            // acknowledge anything from this partition again in this process.
            self.failed.store(true, Ordering::Release);
            tracing::error!(stream = %self.stream, partition = self.id, error = %e, "fsync failed; partition stops accepting writes");
            return Err(e);
        }
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        seg.readable_end.fetch_max(end_pos, Ordering::AcqRel);
        self.advance_hw(end_offset);
        if end_offset < target {
            return Err(LogError::InvalidArgument {
                stream: self.stream.clone(),
                partition: self.id,
                message: format!("sync of offset {} that was never appended (next offset {end_offset})", target - 1),
            });
        }
        Ok(())
    }

    /// Number of fsyncs of segment data done by this partition since it was opened.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// When the record at `offset` became durable, at the latest (coarsely, to ~10 ms);
    /// `None` if it was already in the log when the partition was opened.
    pub fn arrived(&self, offset: u64) -> Option<std::time::Instant> {
        self.arrivals.lock().arrived(offset)
    }

    /// Offset one past the last durable record. Readers never see records at or beyond it.
    pub fn high_watermark(&self) -> u64 {
        self.hw.load(Ordering::Acquire)
    }

    /// Offset the next appended record will get (durable or not).
    pub fn next_offset(&self) -> u64 {
        self.writer.lock().next_offset
    }

    /// First retained offset.
    pub fn log_start_offset(&self) -> u64 {
        self.segments.read().first().map_or(0, |s| s.base)
    }

    /// Reads durable records with offset >= `from`, whole batches at a time, stopping once
    /// about `max_bytes` of values have been returned (at least one batch when any is
    /// available). Every batch read is CRC-checked: a bad batch gives
    /// [`LogError::Corrupt`] (when records before it were collected, those are returned
    /// first and the next read, starting at the bad batch, gets the error).
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.read_with(from, max_bytes, true)
    }

    /// [`Partition::read`], templated records as their fields and template (see
    /// [`StoredRecord::template`]): for readers that use the fields themselves.
    pub fn read_fields(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.read_with(from, max_bytes, false)
    }

    fn read_with(&self, from: u64, max_bytes: usize, expand: bool) -> Result<Vec<StoredRecord>, LogError> {
        let hw = self.hw.load(Ordering::Acquire);
        let segs: Vec<Arc<Segment>> = {
            let segs = self.segments.read();
            let start = segs.first().map_or(0, |s| s.base);
            if from < start {
                return Err(LogError::OffsetOutOfRange {
                    stream: self.stream.clone(),
                    partition: self.id,
                    offset: from,
                    log_start: start,
                });
            }
            if from >= hw {
                return Ok(Vec::new());
            }
            let i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
            segs[i..].to_vec()
        };
        let mut ctx = ReadCtx {
            from,
            hw,
            max_bytes,
            chunk: (max_bytes / 2).clamp(64 << 10, 4 << 20),
            out: Vec::new(),
            value_bytes: 0,
            expand,
            loaded: false,
        };
        let res = self.read_segments(&segs, &mut ctx);
        if ctx.loaded {
            self.trim_indexes();
        }
        res.map(|()| ctx.out)
    }

    fn read_segments(&self, segs: &[Arc<Segment>], ctx: &mut ReadCtx) -> Result<(), LogError> {
        for (i, seg) in segs.iter().enumerate() {
            if seg.base >= ctx.hw {
                break;
            }
            let next_base = segs.get(i + 1).map(|s| s.base);
            match read_segment(seg, next_base, ctx, &self.comp.dicts).map_err(|e| self.dictionary_error(e)) {
                Ok(true) => break,
                Ok(false) => {}
                // Hand out the good records before the bad batch; the next read starting
                // at the bad batch reports it.
                Err(LogError::Corrupt { .. } | LogError::Dictionary { .. }) if !ctx.out.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn dictionary_error(&self, e: ReadError) -> LogError {
        match e {
            ReadError::Log(e) => e,
            ReadError::Dictionary { id, reason } => LogError::Dictionary { stream: self.stream.clone(), id, message: reason },
        }
    }

    /// Keeps at most [`MAX_LOADED_SEALED_INDEXES`] sealed-segment indexes in memory, so
    /// memory stays bounded however much log is retained or replayed.
    fn trim_indexes(&self) {
        let segs = self.segments.read();
        let sealed = &segs[..segs.len().saturating_sub(1)];
        let mut loaded: Vec<&Arc<Segment>> = sealed.iter().filter(|s| s.index_loaded()).collect();
        if loaded.len() <= MAX_LOADED_SEALED_INDEXES {
            return;
        }
        loaded.sort_by_key(|s| std::cmp::Reverse(s.last_used()));
        for s in &loaded[MAX_LOADED_SEALED_INDEXES..] {
            s.unload_index();
        }
    }

    /// Resolves when `high_watermark() > offset` or the timeout passes.
    pub async fn wait_for(&self, offset: u64, timeout: Duration) {
        if self.high_watermark() > offset {
            return;
        }
        let mut rx = self.hw_tx.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            let _ = rx.wait_for(|hw| *hw > offset).await;
        })
        .await;
    }

    /// Durably records that `consumer` will next read offset `next`
    /// (tmp file + fsync + rename + fsync of the directory).
    pub fn commit_offset(&self, consumer: &str, next: u64) -> Result<(), LogError> {
        if !valid_consumer_name(consumer) {
            return Err(LogError::InvalidName(format!(
                "consumer name {consumer:?} (stream {:?} partition {}): use 1-200 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                self.stream, self.id
            )));
        }
        let mut map = self.consumers.lock();
        let path = self.dir.join("consumers").join(format!("{consumer}.offset"));
        write_atomic(&path, format!("{next}\n").as_bytes())?;
        map.insert(consumer.to_string(), Some(next));
        Ok(())
    }

    /// The first retained offset whose record's timestamp is at or after `ts_ms` (the high
    /// watermark when there is none). Timestamps are ingestion times, so they only grow.
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64, LogError> {
        let start = self.log_start_offset();
        let Some(seg) = self.segments().into_iter().find(|s| s.max_timestamp_ms >= ts_ms && s.next_offset > start) else {
            return Ok(self.high_watermark());
        };
        let mut next = seg.base_offset.max(start);
        loop {
            let recs = self.read(next, 1 << 20)?;
            let Some(last) = recs.last().map(|r| r.offset) else { return Ok(self.high_watermark()) };
            if let Some(r) = recs.iter().find(|r| r.offset >= next && r.timestamp_ms >= ts_ms) {
                return Ok(r.offset);
            }
            next = last + 1;
        }
    }

    /// Forgets `consumer` (a removed pipeline), so it no longer holds back retention.
    pub fn remove_consumer(&self, consumer: &str) -> Result<(), LogError> {
        let mut map = self.consumers.lock();
        if valid_consumer_name(consumer) {
            let dir = self.dir.join("consumers");
            remove_if_exists(&dir.join(format!("{consumer}.offset")))?;
            fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync consumers directory", &dir, e))?;
        }
        map.remove(consumer);
        Ok(())
    }

    /// The offset `consumer` last committed, if any.
    pub fn committed_offset(&self, consumer: &str) -> Option<u64> {
        self.consumers.lock().get(consumer).copied().flatten()
    }

    /// All consumers that have committed, with their offsets (`None` = unreadable file).
    pub fn consumers(&self) -> Vec<(String, Option<u64>)> {
        self.consumers.lock().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Deletes whole sealed segments that are over the stream's retention (bytes: oldest
    /// first while the partition is over the limit; time: newest record older than
    /// `now_ms - retention_ms`), never one holding an offset >= the minimum committed
    /// consumer offset. Returns the bytes deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<u64, LogError> {
        let ret = *self.retention.read();
        if ret.bytes.is_none() && ret.ms.is_none() {
            return Ok(0);
        }
        let _m = self.maint_lock.lock();
        let min_committed = self.consumers.lock().values().map(|v| v.unwrap_or(0)).min();
        let cutoff = ret.ms.map(|ms| now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
        let removed: Vec<Arc<Segment>> = {
            let mut segs = self.segments.write();
            let mut remaining: u64 = segs.iter().map(|s| s.size.load(Ordering::Acquire)).sum();
            let mut n = 0;
            for seg in segs.iter().take(segs.len().saturating_sub(1)) {
                let next = seg.next_offset.load(Ordering::Acquire);
                if min_committed.is_some_and(|mc| next > mc) {
                    break;
                }
                let size = seg.size.load(Ordering::Acquire);
                let by_size = ret.bytes.is_some_and(|b| remaining > b);
                let by_time = cutoff.is_some_and(|c| seg.max_ts.load(Ordering::Acquire) < c);
                if !(by_size || by_time) {
                    break;
                }
                remaining -= size;
                n += 1;
            }
            segs.drain(..n).collect()
        };
        let mut deleted = 0;
        for seg in removed {
            deleted += seg.size.load(Ordering::Acquire);
            tracing::debug!(segment = %seg.path.display(), "retention deletes segment");
            remove_if_exists(&seg.path)?;
            remove_if_exists(&seg.idx_path())?;
        }
        Ok(deleted)
    }

    /// Bytes on disk of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.read().iter().map(|s| s.size.load(Ordering::Acquire)).sum()
    }

    /// Approximate bytes of durable data at offsets >= `offset` (batch granularity where
    /// the index is in memory, segment granularity otherwise).
    pub fn bytes_after(&self, offset: u64) -> u64 {
        let segs = self.segments.read();
        let mut total = 0u64;
        for seg in segs.iter() {
            let end = seg.readable_end.load(Ordering::Acquire);
            let next = seg.next_offset.load(Ordering::Acquire);
            if next <= offset {
                continue;
            }
            if offset <= seg.base {
                total += end;
                continue;
            }
            let pos = match seg.lookup_cached(offset) {
                Some(e) => e.pos,
                None => {
                    // Proportional estimate without touching the disk.
                    let span = (next - seg.base).max(1) as u128;
                    ((end as u128 * (offset - seg.base) as u128) / span) as u64
                }
            };
            total += end.saturating_sub(pos);
        }
        total
    }

    /// The sealed segments, oldest first.
    pub(crate) fn sealed_segments(&self) -> Vec<Arc<Segment>> {
        self.segment_handles().0
    }

    /// The sealed segments and the active one.
    pub(crate) fn segment_handles(&self) -> (Vec<Arc<Segment>>, Option<Arc<Segment>>) {
        let segs = self.segments.read();
        let n = segs.len().saturating_sub(1);
        (segs[..n].to_vec(), segs.last().cloned())
    }

    /// Rewrites a sealed segment with its records in batches of about `batch_bytes`
    /// (see [`crate::Stream::repack`]). `None` when the segment is gone or cannot be
    /// re-packed safely (a bad batch: it is left exactly as it is).
    pub(crate) fn repack_segment(
        &self,
        seg: &Arc<Segment>,
        plan: Plan<'_>,
        batch_bytes: usize,
        dicts: &dyn DictLookup,
    ) -> Result<Option<crate::RepackReport>, LogError> {
        let _m = self.maint_lock.lock();
        if !self.sealed_segments().iter().any(|s| Arc::ptr_eq(s, seg)) {
            return Ok(None);
        }
        let end = seg.readable_end.load(Ordering::Acquire);
        let next_offset = seg.next_offset.load(Ordering::Acquire);
        let tmp = seg.path.with_extension("repack");
        let result = self.write_repacked(seg, &tmp, end, next_offset, plan, batch_bytes, dicts);
        let report = match result {
            Ok(Some(r)) => r,
            other => {
                let _ = fs::remove_file(&tmp);
                return other;
            }
        };
        remove_if_exists(&seg.idx_path())?;
        fs::rename(&tmp, &seg.path).map_err(|e| io_err("replace segment with its re-packed copy", &seg.path, e))?;
        fsync_dir(&self.dir)?;
        let interval = u64::from(self.cfg.index_interval_bytes.max(1));
        let new = Arc::new(Segment::open_sealed(seg.path.clone(), seg.base, interval)?);
        let mut segs = self.segments.write();
        if let Some(i) = segs.iter().position(|s| Arc::ptr_eq(s, seg)) {
            segs[i] = new;
        }
        tracing::debug!(segment = %seg.path.display(), ?report, "re-packed segment");
        Ok(Some(report))
    }

    #[allow(clippy::too_many_arguments)]
    fn write_repacked(
        &self,
        seg: &Segment,
        tmp: &Path,
        end: u64,
        next_offset: u64,
        plan: Plan<'_>,
        batch_bytes: usize,
        dicts: &dyn DictLookup,
    ) -> Result<Option<crate::RepackReport>, LogError> {
        let skip = |why: &str| {
            tracing::warn!(segment = %seg.path.display(), reason = why, "segment not re-packed");
            Ok(None)
        };
        let mut out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| io_err("create", tmp, e))?;
        let mut rep = crate::RepackReport { segments: 1, bytes_before: end, ..Default::default() };
        let mut w = Window::new(&seg.file, end, 1 << 20);
        let (mut pos, mut expected) = (0u64, seg.base);
        let mut group: Vec<StoredRecord> = Vec::new();
        let mut group_bytes = 0usize;
        let rd = |e| io_err("read segment", &seg.path, e);
        while pos < end {
            let Some(h) = w.get(pos, HEADER_LEN).map_err(rd)?.and_then(|b| format::parse_header(b).ok()) else {
                return skip("bad batch header");
            };
            if h.base_offset != expected {
                return skip("batch out of sequence");
            }
            let Some(batch) = w.get(pos, h.total_len).map_err(rd)? else { return skip("truncated batch") };
            if format::verify_crc(&h, batch).is_err() {
                return skip("CRC mismatch");
            }
            let mut recs = Vec::with_capacity(h.record_count as usize);
            if let Err(e) = format::decode_payload(&h, &batch[HEADER_LEN..], None, 0, &mut recs, dicts, true) {
                return skip(&e.to_string());
            }
            for r in recs {
                group_bytes += r.value.len() + r.key.as_ref().map_or(0, |k| k.len()) + 8;
                group.push(r);
                if group_bytes >= batch_bytes {
                    self.write_group(&mut group, plan, dicts, &mut out, tmp, &mut rep)?;
                    group_bytes = 0;
                }
            }
            rep.batches_before += 1;
            pos += h.total_len as u64;
            expected = h.next_offset();
        }
        if expected != next_offset {
            return skip("records missing at the end");
        }
        self.write_group(&mut group, plan, dicts, &mut out, tmp, &mut rep)?;
        out.sync_all().map_err(|e| io_err("fsync", tmp, e))?;
        // The whole new file, CRC-checked as recovery would read it.
        let len = out.metadata().map_err(|e| io_err("stat", tmp, e))?.len();
        let scan = crate::segment::scan(&out, tmp, seg.base, len, u64::MAX)?;
        if scan.torn_at.is_some() || scan.next_offset != next_offset {
            return Err(LogError::InvalidArgument {
                stream: self.stream.clone(),
                partition: self.id,
                message: format!("re-packed copy of {} does not read back whole", seg.path.display()),
            });
        }
        Ok(Some(rep))
    }

    /// Encodes `group` as one batch, checks that it decodes to exactly those records, and
    /// appends it to `out`.
    fn write_group(
        &self,
        group: &mut Vec<StoredRecord>,
        plan: Plan<'_>,
        dicts: &dyn DictLookup,
        out: &mut File,
        tmp: &Path,
        rep: &mut crate::RepackReport,
    ) -> Result<(), LogError> {
        let Some(first) = group.first().map(|r| r.offset) else { return Ok(()) };
        let records: Vec<Record> = group
            .iter()
            .map(|r| Record { key: r.key.clone(), value: r.value.clone(), timestamp_ms: r.timestamp_ms, template: None })
            .collect();
        let bad = |message: String| LogError::InvalidArgument { stream: self.stream.clone(), partition: self.id, message };
        let bytes = format::encode_batch_with(&records, first, plan).map_err(|e| bad(format!("re-pack: {e}")))?;
        let (_, back) = format::decode_batch_with(&bytes, dicts).map_err(|e| bad(format!("re-packed batch does not decode: {e}")))?;
        if back != *group {
            return Err(bad(format!("re-packed batch at offset {first} does not decode to the same records")));
        }
        out.write_all(&bytes).map_err(|e| io_err("write", tmp, e))?;
        rep.records += group.len() as u64;
        rep.batches_after += 1;
        rep.bytes_after += bytes.len() as u64;
        group.clear();
        Ok(())
    }

    /// The segment files, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let segs = self.segments.read();
        let n = segs.len();
        segs.iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                path: s.path.clone(),
                base_offset: s.base,
                next_offset: s.next_offset.load(Ordering::Acquire),
                size_bytes: s.size.load(Ordering::Acquire),
                max_timestamp_ms: s.max_ts.load(Ordering::Acquire),
                active: i + 1 == n,
            })
            .collect()
    }
}

fn remove_if_exists(p: &Path) -> Result<(), LogError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("delete segment", p, e)),
    }
}

/// State of one [`Partition::read`] call.
struct ReadCtx {
    from: u64,
    hw: u64,
    max_bytes: usize,
    /// Read-ahead window size.
    chunk: usize,
    out: Vec<StoredRecord>,
    value_bytes: usize,
    /// Templated records' values filled in (else they keep fields and template).
    expand: bool,
    /// Some segment index was loaded from disk.
    loaded: bool,
}

/// Why reading a segment failed: a log error, or a batch whose dictionary is unusable
/// (named with the stream by the caller).
enum ReadError {
    Log(LogError),
    Dictionary { id: u32, reason: String },
}

impl From<LogError> for ReadError {
    fn from(e: LogError) -> Self {
        ReadError::Log(e)
    }
}

/// Reads batches of one segment into `ctx.out`. Returns true when the read is complete.
/// A segment that ends before `next_base` (the next segment's first offset) lost records
/// (segments are written back to back): reaching its end is corruption, not a skip.
fn read_segment(seg: &Segment, next_base: Option<u64>, ctx: &mut ReadCtx, dicts: &dyn DictLookup) -> Result<bool, ReadError> {
    let (from, hw) = (ctx.from, ctx.hw);
    let (entry, loaded) = seg.lookup(from)?;
    ctx.loaded |= loaded;
    let end = seg.readable_end.load(Ordering::Acquire);
    let mut expected = entry.offset;
    let mut pos = entry.pos;
    let mut w = Window::new(&seg.file, end, ctx.chunk);
    let corrupt = |offset: u64| LogError::Corrupt { segment: seg.path.clone(), offset };
    let rd = |e| io_err("read segment", &seg.path, e);
    while pos < end {
        if expected >= hw {
            return Ok(true);
        }
        let h = match w.get(pos, HEADER_LEN).map_err(rd)? {
            Some(b) => format::parse_header(b).map_err(|_| corrupt(expected))?,
            None => return Err(corrupt(expected).into()),
        };
        if h.base_offset != expected {
            return Err(corrupt(expected).into());
        }
        let next = h.next_offset();
        if next <= from {
            pos += h.total_len as u64;
            expected = next;
            continue;
        }
        let batch = w.get(pos, h.total_len).map_err(rd)?.ok_or_else(|| corrupt(expected))?;
        format::verify_crc(&h, batch).map_err(|_| corrupt(expected))?;
        let payload = &batch[HEADER_LEN..];
        let owned = (h.codec == format::CODEC_NONE).then(|| Bytes::copy_from_slice(payload));
        ctx.value_bytes += format::decode_payload(&h, payload, owned, from, &mut ctx.out, dicts, ctx.expand).map_err(|e| match e {
            format::FormatError::Dictionary { id, reason } => ReadError::Dictionary { id, reason },
            _ => ReadError::Log(corrupt(expected)),
        })?;
        pos += h.total_len as u64;
        expected = next;
        if ctx.value_bytes >= ctx.max_bytes {
            return Ok(true);
        }
    }
    if next_base.is_some_and(|b| expected < b) && expected < hw {
        return Err(corrupt(expected).into());
    }
    Ok(false)
}

fn load_consumers(cdir: &Path) -> Result<BTreeMap<String, Option<u64>>, LogError> {
    let mut map = BTreeMap::new();
    for entry in fs::read_dir(cdir).map_err(|e| io_err("list consumers directory", cdir, e))? {
        let entry = entry.map_err(|e| io_err("list consumers directory", cdir, e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let Some(consumer) = name.strip_suffix(".offset") else { continue };
        let parsed = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u64>().ok());
        if parsed.is_none() {
            tracing::warn!(file = %path.display(), "unreadable consumer offset file; retention treats it as offset 0");
        }
        map.insert(consumer.to_string(), parsed);
    }
    Ok(map)
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Partition>();
    is::<File>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Log, StreamOptions};

    #[test]
    fn sealed_indexes_in_memory_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig { segment_bytes: 1, index_interval_bytes: 1, codec: crate::Codec::Zstd(1) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        {
            let log = Log::open(dir.path(), cfg).unwrap();
            let p = log.create_stream("s", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
            for i in 0..30 {
                let a = p.append(&[Record::new(Bytes::from(format!("v{i}")), i)]).unwrap();
                rt.block_on(p.sync(&a)).unwrap();
            }
            let loaded = p.segments.read().iter().filter(|s| s.index_loaded()).count();
            assert!(loaded <= MAX_LOADED_SEALED_INDEXES + 1, "{loaded}");
        }
        let log = Log::open(dir.path(), cfg).unwrap();
        let p = log.stream("s").unwrap().partition(0).unwrap().clone();
        let loaded = p.segments.read().iter().filter(|s| s.index_loaded()).count();
        assert_eq!(loaded, 1, "only the active segment's index is loaded at open");
        for round in 0..2 {
            for from in 0..30u64 {
                let r = p.read(from, 0).unwrap();
                assert_eq!(r[0].offset, from, "round {round}");
                assert_eq!(r[0].value, Bytes::from(format!("v{from}")));
            }
            let segs = p.segments.read();
            let loaded = segs[..segs.len() - 1].iter().filter(|s| s.index_loaded()).count();
            assert!(loaded <= MAX_LOADED_SEALED_INDEXES, "{loaded}");
        }
    }
}
