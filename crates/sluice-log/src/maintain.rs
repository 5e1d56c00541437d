//! Background work on a stream's stored bytes: training and rotating its dictionary,
//! retiring dictionaries no batch needs, re-packing the small batches of sealed segments
//! into big ones, and the numbers behind `sluice stream stats`.
//!
//! The server calls [`Stream::maintain_dictionary`] and [`Stream::repack`] from its
//! housekeeping task; both are safe to call at any time and from any thread (they take
//! the stream's training lock and each partition's maintenance lock).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use crate::dict::{DictInfo, Dictionary};
use crate::format::{self, Codec, Plan, HEADER_LEN};
use crate::segment::Window;
use crate::{LogError, Record, Stream};

/// Records sampled from the newest data to check a dictionary for drift.
const DRIFT_SAMPLE: usize = 256;
/// At most this many records are held out of training to measure the dictionary.
const MAX_HOLDOUT: usize = 1000;
/// Fewest records worth training on.
const MIN_TRAINING_RECORDS: usize = 64;

/// In-memory maintenance state of a stream.
#[derive(Default)]
pub(crate) struct MaintState {
    /// Records written to the stream (sum of high watermarks) when the current
    /// dictionary was trained (or when this process first saw it).
    trained_at: Option<u64>,
    /// Records written at the last drift check.
    checked_at: u64,
    /// Small batches written at the last drift check.
    small_at_check: u64,
    /// Batch statistics of sealed segments (immutable until re-packed), by file and size.
    sealed: HashMap<(PathBuf, u64), SegStats>,
}

/// What [`Stream::maintain_dictionary`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum DictionaryAction {
    /// Nothing was due.
    Nothing,
    /// A dictionary was trained and is now current.
    Trained { info: DictInfo, reason: &'static str },
    /// Training was due but not possible yet (too little or unsuitable data).
    NotYet(String),
}

/// What one [`Stream::repack`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepackReport {
    pub segments: u64,
    pub records: u64,
    pub batches_before: u64,
    pub batches_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Stored bytes of one dictionary version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DictionaryStats {
    pub id: u32,
    pub current: bool,
    /// Retired: no new batch uses it; deleted once retention removed every batch that does.
    pub retired: bool,
    /// The file could not be used (the reason), so batches needing it cannot be read.
    pub unusable: Option<String>,
    pub created_ms: Option<i64>,
    pub size_bytes: Option<u64>,
    pub sample_records: Option<u64>,
    /// Held-out sample records compressed one at a time: stored / raw.
    pub holdout_ratio: Option<f64>,
    /// Retained batches compressed with it.
    pub batches: u64,
    pub records: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// stored / raw over those batches.
    pub ratio: Option<f64>,
}

/// Raw vs stored bytes of a stream's retained log (`sluice stream stats`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamStats {
    pub stream: String,
    pub codec: String,
    pub records: u64,
    pub batches: u64,
    /// Records as framed in batches (key, timestamp, value), uncompressed.
    pub raw_bytes: u64,
    /// Bytes on disk: batch headers and (compressed) payloads.
    pub stored_bytes: u64,
    pub raw_bytes_per_record: Option<f64>,
    pub stored_bytes_per_record: Option<f64>,
    /// Batches and stored bytes by how they are compressed (`none`, `lz4`, `zstd`,
    /// `zstd+dict`).
    pub by_codec: BTreeMap<String, CodecStats>,
    pub dictionaries: Vec<DictionaryStats>,
}

/// Totals of the batches of one codec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CodecStats {
    pub batches: u64,
    pub records: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// Totals of one segment's batches, overall and by codec byte (and dictionary id for
/// codec 3).
#[derive(Debug, Clone, Default)]
pub(crate) struct SegStats {
    pub all: CodecStats,
    pub by: BTreeMap<(u8, u32), CodecStats>,
}

impl SegStats {
    fn add(&mut self, o: &SegStats) {
        self.all.add(&o.all);
        for (k, v) in &o.by {
            self.by.entry(*k).or_default().add(v);
        }
    }
}

impl CodecStats {
    fn add(&mut self, o: &CodecStats) {
        self.batches += o.batches;
        self.records += o.records;
        self.raw_bytes += o.raw_bytes;
        self.stored_bytes += o.stored_bytes;
    }
}

/// Totals of the batch headers of `file` up to `end` (stops at the first bad header).
pub(crate) fn scan_stats(file: &std::fs::File, end: u64) -> Result<SegStats, std::io::Error> {
    let mut st = SegStats::default();
    let mut w = Window::new(file, end, 64 << 10);
    let mut pos = 0u64;
    while pos < end {
        let Some(b) = w.get(pos, HEADER_LEN)? else { break };
        let Ok(h) = format::parse_header(b) else { break };
        let dict = if h.codec == format::CODEC_ZSTD_DICT {
            match w.get(pos + HEADER_LEN as u64, 4)? {
                Some(d) => u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
                None => break,
            }
        } else {
            0
        };
        let batch = CodecStats {
            batches: 1,
            records: u64::from(h.record_count),
            raw_bytes: u64::from(h.uncompressed_len),
            stored_bytes: h.total_len as u64,
        };
        st.all.add(&batch);
        st.by.entry((h.codec, dict)).or_default().add(&batch);
        pos += h.total_len as u64;
    }
    Ok(st)
}

fn ratio(stored: u64, raw: u64) -> Option<f64> {
    (raw > 0).then(|| stored as f64 / raw as f64)
}

impl Stream {
    /// Records written to the stream so far (sum of the partitions' high watermarks).
    fn written(&self) -> u64 {
        self.partitions.iter().map(|p| p.high_watermark()).sum()
    }

    /// Records retained (durable, not yet removed by retention).
    fn retained(&self) -> u64 {
        self.partitions.iter().map(|p| p.high_watermark().saturating_sub(p.log_start_offset())).sum()
    }

    /// Up to `n` of the newest durable records, spread over the partitions, each framed
    /// as in a batch of its own.
    fn sample(&self, n: usize) -> Result<Vec<Vec<u8>>, LogError> {
        let parts = self.partitions.len().max(1);
        let per = n.div_ceil(parts);
        let mut out = Vec::with_capacity(n);
        for p in &self.partitions {
            let hw = p.high_watermark();
            let mut next = hw.saturating_sub(per as u64).max(p.log_start_offset());
            let mut unreadable = 0;
            while next < hw {
                let recs = match p.read(next, 4 << 20) {
                    Ok(r) => r,
                    // Retention moved the start meanwhile: sample what is left.
                    Err(LogError::OffsetOutOfRange { log_start, .. }) => {
                        next = log_start;
                        continue;
                    }
                    // A batch that cannot be read (its dictionary is unusable, or it is
                    // corrupt) is left out of the sample; its error is reported by reads.
                    Err(LogError::Dictionary { .. } | LogError::Corrupt { .. }) if unreadable < per => {
                        unreadable += 1;
                        next += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(last) = recs.last().map(|r| r.offset) else { break };
                for r in recs.into_iter().filter(|r| r.offset >= next && r.offset < hw) {
                    let mut buf = Vec::with_capacity(r.value.len() + 16);
                    let rec = Record { key: r.key, value: r.value, timestamp_ms: r.timestamp_ms, template: None };
                    format::frame_record(&mut buf, &rec, rec.timestamp_ms);
                    out.push(buf);
                }
                next = last + 1;
            }
        }
        Ok(out)
    }

    /// Trains a dictionary on the newest records now and makes it current, whatever the
    /// settings say (tools and tests). The inner error says why none was trained (too
    /// little data, or the same dictionary as the current one).
    pub fn train_dictionary(&self) -> Result<Result<DictInfo, String>, LogError> {
        let _g = self.comp.dicts.training.lock();
        match self.train_locked("requested")? {
            DictionaryAction::Trained { info, .. } => Ok(Ok(info)),
            DictionaryAction::NotYet(why) => Ok(Err(why)),
            DictionaryAction::Nothing => Ok(Err("nothing to do".into())),
        }
    }

    fn train_locked(&self, reason: &'static str) -> Result<DictionaryAction, LogError> {
        let settings = *self.comp.settings.read();
        let level = self.comp.codec.read().zstd_level();
        let written = self.written();
        let samples = self.sample(settings.sample_records as usize)?;
        if samples.len() < MIN_TRAINING_RECORDS {
            return Ok(DictionaryAction::NotYet(format!("{} records to train on; need {MIN_TRAINING_RECORDS}", samples.len())));
        }
        // Every 10th record is held out to measure the dictionary on data it did not see.
        let (mut train, mut holdout) = (Vec::new(), Vec::new());
        for (i, s) in samples.iter().enumerate() {
            if i % 10 == 9 && holdout.len() < MAX_HOLDOUT {
                holdout.push(s.as_slice());
            } else {
                train.push(s.as_slice());
            }
        }
        let content = match zstd::dict::from_samples(&train, settings.max_bytes.max(256) as usize) {
            Ok(c) => c,
            Err(e) => return Ok(DictionaryAction::NotYet(format!("zstd could not train a dictionary: {e}"))),
        };
        if self.comp.dicts.current().is_some_and(|c| c.content()[..] == content[..]) {
            return Ok(DictionaryAction::NotYet("the newest records give the current dictionary again".into()));
        }
        let id = self.comp.dicts.next_id();
        let info = DictInfo {
            id,
            created_ms: now_ms(),
            sample_records: train.len() as u64,
            sample_bytes: train.iter().map(|s| s.len() as u64).sum(),
            size_bytes: content.len() as u64,
            holdout_ratio: 1.0,
            level,
        };
        let mut dict = Dictionary::new(info, content.into())
            .map_err(|message| LogError::Dictionary { stream: self.name.clone(), id, message })?;
        let ratio = one_at_a_time_ratio(&dict, &holdout, level).unwrap_or(1.0);
        dict.set_holdout_ratio(ratio);
        let info = dict.info().clone();
        self.comp.dicts.install(dict)?;
        let mut m = self.comp.maint.lock();
        m.trained_at = Some(written);
        m.checked_at = written;
        Ok(DictionaryAction::Trained { info, reason })
    }

    /// Trains the first dictionary once enough records exist, retrains when the newest
    /// records compress markedly worse with the current one than its held-out sample
    /// did (the data drifted) or once a full sample exists when the first saw less than
    /// half of one, and retires and deletes dictionaries no retained batch needs. Cheap when nothing is due; training takes a second or so (run it on a
    /// blocking thread).
    pub fn maintain_dictionary(&self) -> Result<DictionaryAction, LogError> {
        let Some(_g) = self.comp.dicts.training.try_lock() else { return Ok(DictionaryAction::Nothing) };
        let starts: Vec<u64> = self.partitions.iter().map(|p| p.log_start_offset()).collect();
        self.comp
            .dicts
            .retire_and_delete(|| self.partitions.iter().map(|p| p.next_offset()).collect(), &starts)?;
        let settings = *self.comp.settings.read();
        let codec = *self.comp.codec.read();
        if !settings.enabled || !codec.uses_zstd() {
            return Ok(DictionaryAction::Nothing);
        }
        let written = self.written();
        let every = settings.train_after_records.max(1);
        // Only batches up to DICT_MAX_BATCH_BYTES use a dictionary: while none are being
        // written (bulk loads), training and drift checks would be wasted CPU.
        let small = self.comp.small_batches.load(std::sync::atomic::Ordering::Relaxed);
        let Some(current) = self.comp.dicts.current() else {
            if small == 0 {
                return Ok(DictionaryAction::Nothing);
            }
            if self.retained() < every {
                return Ok(DictionaryAction::Nothing);
            }
            return self.train_locked("first");
        };
        {
            let mut m = self.comp.maint.lock();
            let trained_at = *m.trained_at.get_or_insert(written);
            // Retrain at most once per `train_after_records` records, and look for
            // drift about four times in that span.
            if written.saturating_sub(trained_at) < every
                || written.saturating_sub(m.checked_at) < (every / 4).max(1)
                || small == m.small_at_check
            {
                return Ok(DictionaryAction::Nothing);
            }
            m.checked_at = written;
            m.small_at_check = small;
        }
        let recent = self.sample(DRIFT_SAMPLE)?;
        let recent: Vec<&[u8]> = recent.iter().map(Vec::as_slice).collect();
        let Some(now) = one_at_a_time_ratio(&current, &recent, current.info().level) else {
            return Ok(DictionaryAction::Nothing);
        };
        let limit = current.info().holdout_ratio * (1.0 + f64::from(settings.retrain_drift_pct) / 100.0);
        if now > limit {
            tracing::info!(
                stream = %self.name, id = current.id(), ratio = now, trained = current.info().holdout_ratio,
                "newest records compress worse with the dictionary than when it was trained; retraining"
            );
            return self.train_locked("drift");
        }
        // The first dictionary of a young stream saw few records: train once more when a
        // full sample exists.
        if current.info().sample_records * 2 <= u64::from(settings.sample_records)
            && self.retained() >= u64::from(settings.sample_records)
        {
            return self.train_locked("full sample");
        }
        Ok(DictionaryAction::Nothing)
    }

    /// Re-packs sealed segments whose batches are small (under
    /// [`format::AUTO_SMALL_BATCH_BYTES`] on average) into batches of about
    /// `batch_bytes` of records, compressed with zstd (lz4 or none when that is the
    /// stream's codec; batches that big gain nothing from the dictionary). Offsets, keys, values and timestamps stay
    /// exactly the same; each new batch is decoded and compared with the records it
    /// replaces before it is written, and the new file is fsync'd and CRC-checked before
    /// it replaces the old one.
    pub fn repack(&self, batch_bytes: usize) -> Result<RepackReport, LogError> {
        let mut report = RepackReport::default();
        let codec = match *self.comp.codec.read() {
            Codec::Auto => Codec::Zstd(format::AUTO_ZSTD_LEVEL),
            c => c,
        };
        for p in &self.partitions {
            for seg in p.sealed_segments() {
                let st = self.segment_stats(&seg)?;
                if st.all.batches < 2 || st.all.raw_bytes / st.all.batches >= format::AUTO_SMALL_BATCH_BYTES as u64 {
                    continue;
                }
                let dict = if codec.uses_zstd() && self.comp.settings.read().enabled { self.comp.dicts.current() } else { None };
                let plan = Plan { codec, dict: dict.as_deref() };
                if let Some(r) = p.repack_segment(&seg, plan, batch_bytes, &self.comp.dicts)? {
                    report.segments += 1;
                    report.records += r.records;
                    report.batches_before += r.batches_before;
                    report.batches_after += r.batches_after;
                    report.bytes_before += r.bytes_before;
                    report.bytes_after += r.bytes_after;
                }
            }
        }
        Ok(report)
    }

    fn segment_stats(&self, seg: &crate::segment::Segment) -> Result<SegStats, LogError> {
        let end = seg.readable_end.load(std::sync::atomic::Ordering::Acquire);
        let key = (seg.path.clone(), end);
        if let Some(s) = self.comp.maint.lock().sealed.get(&key) {
            return Ok(s.clone());
        }
        let st = scan_stats(&seg.file, end).map_err(|e| crate::io_err("read segment", &seg.path, e))?;
        self.comp.maint.lock().sealed.insert(key, st.clone());
        Ok(st)
    }

    /// Raw vs stored bytes of the retained log, by codec and by dictionary version.
    pub fn stats(&self) -> Result<StreamStats, LogError> {
        let mut total = SegStats::default();
        let mut live = std::collections::HashSet::new();
        for p in &self.partitions {
            let (sealed, active) = p.segment_handles();
            for seg in &sealed {
                total.add(&self.segment_stats(seg)?);
                live.insert((seg.path.clone(), seg.readable_end.load(std::sync::atomic::Ordering::Acquire)));
            }
            if let Some(a) = active {
                let end = a.readable_end.load(std::sync::atomic::Ordering::Acquire);
                total.add(&scan_stats(&a.file, end).map_err(|e| crate::io_err("read segment", &a.path, e))?);
            }
        }
        // Forget segments retention or re-packing replaced.
        self.comp.maint.lock().sealed.retain(|k, _| live.contains(k));

        let mut by_codec: BTreeMap<String, CodecStats> = BTreeMap::new();
        let mut per_dict: BTreeMap<u32, CodecStats> = BTreeMap::new();
        for ((c, d), v) in &total.by {
            let name = match *c {
                format::CODEC_NONE => "none",
                format::CODEC_LZ4 => "lz4",
                format::CODEC_ZSTD => "zstd",
                _ => "zstd+dict",
            };
            by_codec.entry(name.to_string()).or_default().add(v);
            if *c == format::CODEC_ZSTD_DICT {
                per_dict.entry(*d).or_default().add(v);
            }
        }
        let (loaded, broken) = self.comp.dicts.list();
        let current = self.comp.dicts.current().map(|d| d.id());
        let retired = self.comp.dicts.retired();
        let mut ids: Vec<u32> = loaded.iter().map(|d| d.id()).chain(broken.iter().map(|b| b.0)).chain(per_dict.keys().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        let dictionaries = ids
            .into_iter()
            .map(|id| {
                let d = loaded.iter().find(|d| d.id() == id);
                let u = per_dict.get(&id).cloned().unwrap_or_default();
                DictionaryStats {
                    id,
                    current: current == Some(id),
                    retired: retired.contains_key(&id),
                    unusable: broken.iter().find(|b| b.0 == id).map(|b| b.1.clone()),
                    created_ms: d.map(|d| d.info().created_ms),
                    size_bytes: d.map(|d| d.info().size_bytes),
                    sample_records: d.map(|d| d.info().sample_records),
                    holdout_ratio: d.map(|d| d.info().holdout_ratio),
                    batches: u.batches,
                    records: u.records,
                    raw_bytes: u.raw_bytes,
                    stored_bytes: u.stored_bytes,
                    ratio: ratio(u.stored_bytes, u.raw_bytes),
                }
            })
            .collect();
        let t = &total.all;
        let per = |b: u64| (t.records > 0).then(|| b as f64 / t.records as f64);
        Ok(StreamStats {
            stream: self.name.clone(),
            codec: self.comp.codec.read().to_string(),
            records: t.records,
            batches: t.batches,
            raw_bytes: t.raw_bytes,
            stored_bytes: t.stored_bytes,
            raw_bytes_per_record: per(t.raw_bytes),
            stored_bytes_per_record: per(t.stored_bytes),
            by_codec,
            dictionaries,
        })
    }
}

/// stored/raw of `samples` compressed one at a time with `dict` (None without samples).
fn one_at_a_time_ratio(dict: &Dictionary, samples: &[&[u8]], level: i32) -> Option<f64> {
    let mut cctx = zstd::zstd_safe::CCtx::create();
    let mut buf = Vec::new();
    let (mut raw, mut stored) = (0u64, 0u64);
    for s in samples {
        raw += s.len() as u64;
        stored += dict.compressed_len(s, level, &mut cctx, &mut buf) as u64;
    }
    ratio(stored, raw)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
