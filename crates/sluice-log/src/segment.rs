//! One segment file (`<20-digit base offset>.log`) with its sparse offset index, its
//! `.idx` file, and the recovery scan.
//!
//! `.idx` file (hand-written like the segment format; little-endian):
//! ```text
//!  0  4 magic b"SLX1"
//!  4  8 base offset
//! 12  8 size of the segment file it describes
//! 20  8 next offset (one past the segment's last record)
//! 28  8 max record timestamp (i64::MIN when empty)
//! 36  4 entry count
//! 40  4 CRC32 of the entries
//! 44  4 CRC32 of bytes 0..44
//! 48  . entries: (offset u64, file position u64) each
//! ```
//! It is written (without fsync) when a segment is sealed, after the segment's data was
//! fsync'd. It is only trusted when its CRCs hold and its recorded size equals the
//! segment file's size; otherwise the segment is scanned and the index rebuilt.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::format::{self, BatchHeader, HEADER_LEN, MAGIC_V1};
use crate::{io_err, LogError};

const IDX_MAGIC: &[u8; 4] = b"SLX1";
const IDX_HEADER: usize = 48;
const SCAN_WINDOW: usize = 1 << 20;

/// One sparse index entry: the batch starting at `pos` has base offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub offset: u64,
    pub pos: u64,
}

pub(crate) struct Segment {
    pub base: u64,
    pub path: PathBuf,
    pub file: File,
    /// Bytes written.
    pub size: AtomicU64,
    /// Bytes known durable and complete; readers never read past it.
    pub readable_end: AtomicU64,
    /// One past the last record written.
    pub next_offset: AtomicU64,
    pub max_ts: AtomicI64,
    /// `None` for a sealed segment whose index has not been loaded yet.
    index: RwLock<Option<Vec<IndexEntry>>>,
    index_interval: u64,
    /// Tick of the last index lookup, to unload the least recently used sealed indexes.
    last_used: AtomicU64,
}

static TICK: AtomicU64 = AtomicU64::new(0);

pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Parses a `<20 digits>.log` file name.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Segment {
    pub fn idx_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }

    /// Creates a new, empty segment file (fails if a non-empty one exists).
    pub fn create(dir: &Path, base: u64, index_interval: u64) -> Result<Segment, LogError> {
        let path = dir.join(segment_file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_err("create segment", &path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat segment", &path, e))?.len();
        if len != 0 {
            return Err(io_err(
                "create segment",
                &path,
                io::Error::new(io::ErrorKind::AlreadyExists, "segment file already exists and is not empty"),
            ));
        }
        Ok(Segment {
            base,
            path,
            file,
            size: AtomicU64::new(0),
            readable_end: AtomicU64::new(0),
            next_offset: AtomicU64::new(base),
            max_ts: AtomicI64::new(i64::MIN),
            index: RwLock::new(Some(Vec::new())),
            index_interval,
            last_used: AtomicU64::new(0),
        })
    }

    fn open_file(path: &Path) -> Result<(File, u64), LogError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err("open segment", path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat segment", path, e))?.len();
        Ok((file, len))
    }

    /// Opens a sealed (non-active) segment: trusts its `.idx` when consistent, else scans it.
    /// Bytes that do not form valid batches are left in place and reported as corruption
    /// when a read reaches them (a sealed segment was fully fsync'd before the next one was
    /// created, so they cannot be a torn write).
    pub fn open_sealed(path: PathBuf, base: u64, index_interval: u64) -> Result<Segment, LogError> {
        let (file, len) = Self::open_file(&path)?;
        let mut seg = Segment {
            base,
            path,
            file,
            size: AtomicU64::new(len),
            readable_end: AtomicU64::new(len),
            next_offset: AtomicU64::new(base),
            max_ts: AtomicI64::new(i64::MIN),
            index: RwLock::new(None),
            index_interval,
            last_used: AtomicU64::new(0),
        };
        match seg.read_idx_header(len) {
            Some((next, max_ts)) => {
                seg.next_offset = AtomicU64::new(next);
                seg.max_ts = AtomicI64::new(max_ts);
            }
            None => {
                let scan = scan(&seg.file, &seg.path, base, len, index_interval)?;
                if let Some(at) = scan.torn_at {
                    tracing::warn!(
                        segment = %seg.path.display(), position = at, offset = scan.next_offset,
                        "sealed segment ends with bytes that are not a valid batch; reads reaching them fail as corrupt"
                    );
                }
                seg.next_offset = AtomicU64::new(scan.next_offset);
                seg.max_ts = AtomicI64::new(scan.max_ts);
                *seg.index.get_mut() = Some(scan.entries_with_tail());
                if let Err(e) = seg.write_idx() {
                    tracing::warn!(error = %e, "could not write segment index");
                }
            }
        }
        Ok(seg)
    }

    /// Opens the active (last) segment: scans every batch with CRC checks and truncates a
    /// torn tail. Returns the segment and the number of bytes truncated.
    /// Also returns how many of its batches are small enough for a dictionary.
    pub fn open_active(path: PathBuf, base: u64, index_interval: u64) -> Result<(Segment, u64, u64), LogError> {
        let (file, len) = Self::open_file(&path)?;
        let scan = scan(&file, &path, base, len, index_interval)?;
        let mut end = len;
        let mut truncated = 0;
        if let Some(at) = scan.torn_at {
            tracing::warn!(
                segment = %path.display(), position = at, bytes = len - at,
                "truncating torn tail of the active segment (never acknowledged)"
            );
            file.set_len(at).map_err(|e| io_err("truncate segment", &path, e))?;
            file.sync_all().map_err(|e| io_err("fsync segment", &path, e))?;
            end = at;
            truncated = len - at;
        }
        let _ = std::fs::remove_file(path.with_extension("idx"));
        Ok((
            Segment {
                base,
                path,
                file,
                size: AtomicU64::new(end),
                readable_end: AtomicU64::new(end),
                next_offset: AtomicU64::new(scan.next_offset),
                max_ts: AtomicI64::new(scan.max_ts),
                index: RwLock::new(Some(scan.entries)),
                index_interval,
                last_used: AtomicU64::new(0),
            },
            truncated,
            scan.small_batches,
        ))
    }

    /// Reads the `.idx` header; returns (next offset, max timestamp) when it is consistent.
    fn read_idx_header(&self, seg_len: u64) -> Option<(u64, i64)> {
        let f = File::open(self.idx_path()).ok()?;
        let mut h = [0u8; IDX_HEADER];
        f.read_exact_at(&mut h, 0).ok()?;
        if &h[0..4] != IDX_MAGIC || crc32fast::hash(&h[..44]) != le_u32(&h[44..48]) {
            return None;
        }
        if le_u64(&h[4..12]) != self.base || le_u64(&h[12..20]) != seg_len {
            return None;
        }
        let next = le_u64(&h[20..28]);
        if next < self.base {
            return None;
        }
        Some((next, le_u64(&h[28..36]) as i64))
    }

    fn load_idx_entries(&self) -> Option<Vec<IndexEntry>> {
        let data = std::fs::read(self.idx_path()).ok()?;
        if data.len() < IDX_HEADER {
            return None;
        }
        let h = &data[..IDX_HEADER];
        if &h[0..4] != IDX_MAGIC || crc32fast::hash(&h[..44]) != le_u32(&h[44..48]) {
            return None;
        }
        let size = self.size.load(Ordering::Acquire);
        if le_u64(&h[4..12]) != self.base || le_u64(&h[12..20]) != size {
            return None;
        }
        let count = le_u32(&h[36..40]) as usize;
        let body = &data[IDX_HEADER..];
        if body.len() != count.checked_mul(16)? || crc32fast::hash(body) != le_u32(&h[40..44]) {
            return None;
        }
        let entries: Vec<IndexEntry> = body
            .chunks_exact(16)
            .map(|c| IndexEntry { offset: le_u64(&c[..8]), pos: le_u64(&c[8..]) })
            .collect();
        // Entries must be strictly increasing and inside the file.
        let ok = entries.windows(2).all(|w| w[0].offset < w[1].offset && w[0].pos < w[1].pos)
            && entries.iter().all(|e| e.pos < size.max(1) && e.offset >= self.base);
        ok.then_some(entries)
    }

    /// Writes the `.idx` file from the in-memory index (segment must be sealed).
    pub fn write_idx(&self) -> Result<(), LogError> {
        let guard = self.index.read();
        let Some(entries) = guard.as_ref() else { return Ok(()) };
        let mut body = Vec::with_capacity(entries.len() * 16);
        for e in entries {
            body.extend_from_slice(&e.offset.to_le_bytes());
            body.extend_from_slice(&e.pos.to_le_bytes());
        }
        let mut h = Vec::with_capacity(IDX_HEADER + body.len());
        h.extend_from_slice(IDX_MAGIC);
        h.extend_from_slice(&self.base.to_le_bytes());
        h.extend_from_slice(&self.size.load(Ordering::Acquire).to_le_bytes());
        h.extend_from_slice(&self.next_offset.load(Ordering::Acquire).to_le_bytes());
        h.extend_from_slice(&self.max_ts.load(Ordering::Acquire).to_le_bytes());
        h.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&body);
        drop(guard);
        let path = self.idx_path();
        let tmp = path.with_extension("idx.tmp");
        let mut f = File::create(&tmp).map_err(|e| io_err("create index", &tmp, e))?;
        f.write_all(&h).map_err(|e| io_err("write index", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| io_err("rename index", &path, e))?;
        Ok(())
    }

    /// Adds an index entry for a batch just appended at `pos`.
    pub fn push_index(&self, offset: u64, pos: u64) {
        if let Some(v) = self.index.write().as_mut() {
            v.push(IndexEntry { offset, pos });
        }
    }

    /// The last index entry at or before `offset` (or the segment start), and whether the
    /// index had to be loaded from disk for it.
    pub fn lookup(&self, offset: u64) -> Result<(IndexEntry, bool), LogError> {
        self.last_used.store(TICK.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        {
            let g = self.index.read();
            if let Some(v) = g.as_ref() {
                return Ok((self.floor(v, offset), false));
            }
        }
        let entries = match self.load_idx_entries() {
            Some(e) => e,
            None => {
                let size = self.size.load(Ordering::Acquire);
                let s = scan(&self.file, &self.path, self.base, size, self.index_interval)?;
                s.entries_with_tail()
            }
        };
        let mut g = self.index.write();
        let v = g.get_or_insert(entries);
        Ok((self.floor(v, offset), true))
    }

    /// Whether the sparse index is in memory.
    pub fn index_loaded(&self) -> bool {
        self.index.read().is_some()
    }

    /// Drops the in-memory index of a sealed segment (reloaded from `.idx` on demand).
    pub fn unload_index(&self) {
        *self.index.write() = None;
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// The lookup without loading anything: `None` when the index is not in memory.
    pub fn lookup_cached(&self, offset: u64) -> Option<IndexEntry> {
        self.index.read().as_ref().map(|v| self.floor(v, offset))
    }

    fn floor(&self, v: &[IndexEntry], offset: u64) -> IndexEntry {
        let i = v.partition_point(|e| e.offset <= offset);
        if i == 0 {
            IndexEntry { offset: self.base, pos: 0 }
        } else {
            v[i - 1]
        }
    }

    pub fn index_interval(&self) -> u64 {
        self.index_interval
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A read-ahead window over a file, never reading at or past `limit`.
pub(crate) struct Window<'a> {
    file: &'a File,
    limit: u64,
    start: u64,
    buf: Vec<u8>,
    chunk: usize,
}

impl<'a> Window<'a> {
    pub fn new(file: &'a File, limit: u64, chunk: usize) -> Self {
        Window { file, limit, start: 0, buf: Vec::new(), chunk: chunk.max(HEADER_LEN) }
    }

    /// `n` bytes at `pos`, or `None` when they extend past the limit.
    pub fn get(&mut self, pos: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let Some(end) = pos.checked_add(n as u64) else { return Ok(None) };
        if end > self.limit {
            return Ok(None);
        }
        let have_end = self.start + self.buf.len() as u64;
        if pos < self.start || end > have_end {
            let want = (n as u64).max((self.chunk as u64).min(self.limit - pos)) as usize;
            self.buf.clear();
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, pos)?;
            self.start = pos;
        }
        let off = (pos - self.start) as usize;
        Ok(Some(&self.buf[off..off + n]))
    }
}

pub(crate) struct ScanResult {
    pub entries: Vec<IndexEntry>,
    pub next_offset: u64,
    pub max_ts: i64,
    /// Start of trailing bytes after which no valid batch follows.
    pub torn_at: Option<u64>,
    /// Batches small enough for a compression dictionary.
    pub small_batches: u64,
}

impl ScanResult {
    /// Entries plus one for the invalid tail, so reads reaching it report corruption
    /// at the right offset (used for sealed segments, whose tail is never truncated).
    fn entries_with_tail(mut self) -> Vec<IndexEntry> {
        if let Some(at) = self.torn_at {
            if self.entries.last().is_none_or(|e| e.offset < self.next_offset) {
                self.entries.push(IndexEntry { offset: self.next_offset, pos: at });
            }
        }
        self.entries
    }
}

/// Checks a whole valid batch at `pos`, with the CRC.
fn valid_batch_at(w: &mut Window<'_>, pos: u64) -> io::Result<Option<BatchHeader>> {
    let h = match w.get(pos, HEADER_LEN)? {
        None => return Ok(None),
        Some(b) => match format::parse_header(b) {
            Ok(h) => h,
            Err(_) => return Ok(None),
        },
    };
    match w.get(pos, h.total_len)? {
        None => Ok(None),
        Some(b) => Ok(format::verify_crc(&h, b).ok().map(|_| h)),
    }
}

/// Scans a segment batch by batch, verifying CRCs, building the sparse index.
/// A bad batch followed (anywhere later) by a valid one is mid-segment corruption: it is
/// indexed (so reads reaching it report it) and the scan resumes at the valid batch.
/// A bad region with no valid batch after it is reported as `torn_at`.
pub(crate) fn scan(file: &File, path: &Path, base: u64, len: u64, interval: u64) -> Result<ScanResult, LogError> {
    let mut w = Window::new(file, len, SCAN_WINDOW);
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let mut expected = base;
    let mut max_ts = i64::MIN;
    let mut since_index = u64::MAX;
    let mut torn_at = None;
    let mut small_batches = 0;
    let rd = |e| io_err("scan segment", path, e);
    while pos < len {
        match valid_batch_at(&mut w, pos).map_err(rd)? {
            Some(h) if h.base_offset == expected => {
                if since_index >= interval {
                    entries.push(IndexEntry { offset: expected, pos });
                    since_index = 0;
                }
                since_index += h.total_len as u64;
                expected = h.next_offset();
                max_ts = max_ts.max(h.max_timestamp);
                pos += h.total_len as u64;
                small_batches += u64::from(h.uncompressed_len as usize <= format::DICT_MAX_BATCH_BYTES);
            }
            _ => match resync(&mut w, pos + 1, len, expected).map_err(rd)? {
                Some((q, h)) => {
                    tracing::warn!(
                        segment = %path.display(), position = pos, offset = expected,
                        resumes_at = q, "corrupt batch in the middle of a segment; reads reaching it fail"
                    );
                    entries.push(IndexEntry { offset: expected, pos });
                    since_index = u64::MAX;
                    expected = h.base_offset;
                    pos = q;
                }
                None => {
                    torn_at = Some(pos);
                    break;
                }
            },
        }
    }
    Ok(ScanResult { entries, next_offset: expected, max_ts, torn_at, small_batches })
}

/// Finds the first valid batch at or after `from` whose base offset is after `expected`.
fn resync(w: &mut Window<'_>, mut from: u64, len: u64, expected: u64) -> io::Result<Option<(u64, BatchHeader)>> {
    while from + (HEADER_LEN as u64) <= len {
        let n = ((len - from) as usize).min(SCAN_WINDOW);
        let found = match w.get(from, n)? {
            None => return Ok(None),
            Some(chunk) => chunk.iter().position(|&b| b == MAGIC_V1),
        };
        let Some(i) = found else {
            from += n as u64;
            continue;
        };
        let p = from + i as u64;
        let plausible = match w.get(p, HEADER_LEN)? {
            Some(b) => match format::parse_header(b) {
                Ok(h) => {
                    h.base_offset > expected
                        && h.base_offset - expected < (1 << 40)
                        && p + h.total_len as u64 <= len
                }
                Err(_) => false,
            },
            None => false,
        };
        if plausible {
            if let Some(h) = valid_batch_at(w, p)? {
                return Ok(Some((p, h)));
            }
        }
        from = p + 1;
    }
    Ok(None)
}
