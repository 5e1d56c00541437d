//! Trained zstd dictionaries of a stream.
//!
//! Small batches (one event per request) compress badly on their own because zstd has
//! nothing to refer back to. A dictionary trained on the stream's own records gives it
//! that history, so a single record compresses almost like a big batch. Each stream
//! keeps its dictionaries versioned in its directory; a batch compressed with one names
//! its id (see [`crate::format`]), so readers decode any batch whatever the current
//! version is.
//!
//! ```text
//! <stream>/dictionaries/<10-digit id>.dict   one dictionary (written atomically)
//! <stream>/dictionaries/state.json           current id, the one before, retired ones
//! ```
//!
//! A `.dict` file (little-endian):
//! ```text
//!  0  8 magic b"SLDICT01"
//!  8  4 id
//! 12  4 length of the JSON metadata
//! 16  4 CRC32 over everything after this field
//! 20  . JSON metadata ([`DictInfo`]), then the zstd dictionary itself
//! ```
//!
//! Rotation is crash-safe by ordering: the new file is written and fsync'd, then
//! `state.json` names it current, and only then do appends use it. A crash before the
//! state switch leaves an unused file (removed on open); after it, the new dictionary
//! is simply current. A file whose CRC fails is reported and never used: batches that
//! need it fail to read with [`crate::LogError::Dictionary`], and a new dictionary is
//! trained in its place.
//!
//! An old dictionary is *retired* once nothing can still be encoding with it; its
//! retirement records each partition's next offset at that moment, and its file is
//! deleted once retention has removed every segment below those offsets.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use zstd::dict::DecoderDictionary;
use zstd::zstd_safe::{CDict, DDict};

use crate::{fsync_dir, io_err, write_atomic, LogError};

const MAGIC: &[u8; 8] = b"SLDICT01";
const FILE_HEADER: usize = 20;
/// Largest dictionary accepted from a file (zstd's own dictionaries stay far below).
pub const MAX_DICT_BYTES: usize = 8 << 20;

/// Facts about one dictionary, stored with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DictInfo {
    pub id: u32,
    /// When it was trained (ms since the epoch).
    pub created_ms: i64,
    /// Records it was trained on, and their framed bytes.
    pub sample_records: u64,
    pub sample_bytes: u64,
    /// Size of the zstd dictionary.
    pub size_bytes: u64,
    /// Stored/raw ratio of held-out sample records compressed one at a time with it,
    /// at the level it was trained for: the reference that drift is measured against.
    pub holdout_ratio: f64,
    /// The zstd level the holdout ratio was measured at.
    pub level: i32,
}

/// One loaded dictionary.
pub struct Dictionary {
    info: DictInfo,
    content: Bytes,
    ddict: DecoderDictionary<'static>,
    /// Prepared for compression at one level (rebuilt when the level changes).
    cdict: Mutex<Option<(i32, Arc<CDict<'static>>)>>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary").field("info", &self.info).finish()
    }
}

impl Dictionary {
    /// Loads a dictionary from its zstd content (fails on content zstd cannot use).
    pub fn new(info: DictInfo, content: Bytes) -> Result<Dictionary, String> {
        if content.is_empty() || content.len() > MAX_DICT_BYTES {
            return Err(format!("dictionary of {} bytes", content.len()));
        }
        // Fails (instead of panicking, as DecoderDictionary::copy would) on content zstd
        // cannot load.
        DDict::try_create(&content).ok_or("zstd cannot load it")?;
        let ddict = DecoderDictionary::copy(&content);
        Ok(Dictionary {
            info,
            content,
            ddict,
            cdict: Mutex::new(None),
        })
    }

    pub fn id(&self) -> u32 {
        self.info.id
    }

    pub fn info(&self) -> &DictInfo {
        &self.info
    }

    /// Records how well it compressed the held-out sample (measured with it after training).
    pub(crate) fn set_holdout_ratio(&mut self, ratio: f64) {
        self.info.holdout_ratio = ratio;
    }

    /// The zstd dictionary itself (what `GET /v1/streams/{s}/dictionary` serves).
    pub fn content(&self) -> &Bytes {
        &self.content
    }

    pub(crate) fn ddict(&self) -> &DDict<'static> {
        self.ddict.as_ddict()
    }

    /// The dictionary prepared for decompressing (request bodies compressed with it).
    pub fn decoder_dictionary(&self) -> &DecoderDictionary<'static> {
        &self.ddict
    }

    /// The dictionary prepared for compressing at `level`.
    pub(crate) fn cdict(&self, level: i32) -> Option<Arc<CDict<'static>>> {
        let mut c = self.cdict.lock();
        if let Some((l, d)) = c.as_ref() {
            if *l == level {
                return Some(d.clone());
            }
        }
        let d = Arc::new(CDict::try_create(&self.content, level)?);
        *c = Some((level, d.clone()));
        Some(d)
    }

    /// Compresses `data` on its own with this dictionary (training and drift checks).
    pub(crate) fn compressed_len(&self, data: &[u8], level: i32, cctx: &mut zstd::zstd_safe::CCtx<'static>, buf: &mut Vec<u8>) -> usize {
        let Some(cd) = self.cdict(level) else { return data.len() };
        buf.clear();
        buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
        match cctx.compress_using_cdict(buf, data, &cd) {
            Ok(n) => n.min(data.len()),
            Err(_) => data.len(),
        }
    }
}

/// Encodes a dictionary file.
pub fn encode_file(info: &DictInfo, content: &[u8]) -> Vec<u8> {
    let meta = serde_json::to_vec(info).unwrap_or_default();
    let mut out = Vec::with_capacity(FILE_HEADER + meta.len() + content.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&info.id.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&meta);
    out.extend_from_slice(content);
    let crc = crc32fast::hash(&out[FILE_HEADER..]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks a dictionary file. Never panics; the error says what is wrong.
pub fn decode_file(b: &[u8]) -> Result<(DictInfo, Bytes), String> {
    if b.len() < FILE_HEADER {
        return Err(format!("truncated: {} bytes", b.len()));
    }
    if &b[..8] != MAGIC {
        return Err("not a Sluice dictionary file (bad magic)".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let id = u32_at(8);
    let meta_len = u32_at(12) as usize;
    let crc = u32_at(16);
    let computed = crc32fast::hash(&b[FILE_HEADER..]);
    if crc != computed {
        return Err(format!("CRC mismatch: stored {crc:#010x}, computed {computed:#010x}"));
    }
    let rest = &b[FILE_HEADER..];
    if meta_len > rest.len() {
        return Err("metadata runs past the end".into());
    }
    let info: DictInfo = serde_json::from_slice(&rest[..meta_len]).map_err(|e| format!("metadata: {e}"))?;
    if info.id != id {
        return Err(format!("header names id {id}, metadata {}", info.id));
    }
    Ok((info, Bytes::copy_from_slice(&rest[meta_len..])))
}

/// Persisted dictionary state of a stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// The dictionary new batches use.
    current: Option<u32>,
    /// The one before it (still accepted on the wire).
    previous: Option<u32>,
    /// Retired dictionaries: each partition's next offset when it was retired.
    #[serde(default)]
    retired: BTreeMap<u32, Vec<u64>>,
}

/// The dictionaries of one stream (shared by its partitions).
pub(crate) struct Dictionaries {
    dir: PathBuf,
    stream: String,
    all: RwLock<BTreeMap<u32, Arc<Dictionary>>>,
    /// Files that could not be used, with the reason.
    broken: RwLock<BTreeMap<u32, String>>,
    current: RwLock<Option<Arc<Dictionary>>>,
    state: Mutex<State>,
    /// Held while a dictionary is being trained or rotated.
    pub(crate) training: Mutex<()>,
}

fn dict_file(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.dict"))
}

impl Dictionaries {
    /// Loads the stream's dictionaries (a missing directory = none yet).
    pub fn open(stream_dir: &Path, stream: &str) -> Result<Dictionaries, LogError> {
        let dir = stream_dir.join("dictionaries");
        let d = Dictionaries {
            dir: dir.clone(),
            stream: stream.to_string(),
            all: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            current: RwLock::new(None),
            state: Mutex::new(State::default()),
            training: Mutex::new(()),
        };
        if !dir.exists() {
            return Ok(d);
        }
        let state_path = dir.join("state.json");
        let state: State = match fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| LogError::Metadata { path: state_path.clone(), message: e.to_string() })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err("read", &state_path, e)),
        };
        let mut all = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err("list dictionaries", &dir, e))? {
            let entry = entry.map_err(|e| io_err("list dictionaries", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(id) = name.strip_suffix(".dict").and_then(|s| s.parse::<u32>().ok()) else { continue };
            if state.current.is_none_or(|c| id > c) {
                // Written, but the switch to it never happened: no batch uses it.
                tracing::info!(stream, id, "removing a dictionary that never became current");
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let loaded = fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|b| decode_file(&b))
                .and_then(|(info, content)| {
                    if info.id != id {
                        return Err(format!("file named {id} holds dictionary {}", info.id));
                    }
                    Dictionary::new(info, content)
                });
            match loaded {
                Ok(dict) => {
                    all.insert(id, Arc::new(dict));
                }
                Err(why) => {
                    tracing::error!(stream, id, file = %entry.path().display(), reason = %why, "dictionary file is unusable; batches that need it cannot be read");
                    broken.insert(id, format!("is unusable ({why}; file {})", entry.path().display()));
                }
            }
        }
        let current = state.current.and_then(|c| all.get(&c).cloned());
        *d.all.write() = all;
        *d.broken.write() = broken;
        *d.current.write() = current;
        *d.state.lock() = state;
        Ok(d)
    }

    /// The dictionary new batches should use, if any.
    pub fn current(&self) -> Option<Arc<Dictionary>> {
        self.current.read().clone()
    }

    /// The dictionary with this id, or why it cannot be had.
    pub fn get(&self, id: u32) -> Result<Arc<Dictionary>, String> {
        if let Some(d) = self.all.read().get(&id) {
            return Ok(d.clone());
        }
        if let Some(why) = self.broken.read().get(&id) {
            return Err(why.clone());
        }
        Err("is unknown (its file is missing)".into())
    }

    /// Ids a client may compress request bodies with: the current one and the one it
    /// replaced (so a rotation does not fail requests already compressed).
    pub fn accepted_on_wire(&self) -> (Option<u32>, Option<u32>) {
        let s = self.state.lock();
        (s.current.filter(|c| self.all.read().contains_key(c)), s.previous)
    }

    /// All loaded dictionaries, oldest first, and the unusable ones with their reasons.
    pub fn list(&self) -> (Vec<Arc<Dictionary>>, Vec<(u32, String)>) {
        let all = self.all.read().values().cloned().collect();
        let broken = self.broken.read().iter().map(|(k, v)| (*k, v.clone())).collect();
        (all, broken)
    }

    /// The id the next trained dictionary gets.
    pub fn next_id(&self) -> u32 {
        let a = self.all.read().keys().next_back().copied().unwrap_or(0);
        let b = self.broken.read().keys().next_back().copied().unwrap_or(0);
        let c = self.state.lock().current.unwrap_or(0);
        a.max(b).max(c) + 1
    }

    /// Stores `dict` durably and makes it the current one.
    pub fn install(&self, dict: Dictionary) -> Result<Arc<Dictionary>, LogError> {
        let id = dict.id();
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir).map_err(|e| io_err("create dictionaries directory", &self.dir, e))?;
            if let Some(parent) = self.dir.parent() {
                fsync_dir(parent)?;
            }
        }
        write_atomic(&dict_file(&self.dir, id), &encode_file(dict.info(), dict.content()))?;
        let dict = Arc::new(dict);
        let mut state = self.state.lock();
        let mut next = state.clone();
        next.previous = next.current.filter(|c| *c != id);
        next.current = Some(id);
        write_state(&self.dir, &next)?;
        *state = next;
        self.all.write().insert(id, dict.clone());
        *self.current.write() = Some(dict.clone());
        tracing::info!(stream = %self.stream, id, size = dict.info().size_bytes, "new dictionary is current");
        Ok(dict)
    }

    /// Retires old dictionaries nobody can be encoding with any more (given each
    /// partition's next offset, read under `next_offsets`), and deletes retired ones that
    /// no retained segment can refer to (given each partition's first retained offset).
    pub fn retire_and_delete(
        &self,
        next_offsets: impl Fn() -> Vec<u64>,
        log_starts: &[u64],
    ) -> Result<Vec<u32>, LogError> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        let current = next.current;
        for (id, dict) in self.all.read().iter() {
            if Some(*id) == current || next.retired.contains_key(id) {
                continue;
            }
            // Only this map holds it: no append is compressing with it, and none can
            // start (it is not current), so every batch using it is below these offsets.
            if Arc::strong_count(dict) == 1 {
                next.retired.insert(*id, next_offsets());
            }
        }
        let mut deleted = Vec::new();
        for (id, offs) in next.retired.iter() {
            let gone = offs.len() == log_starts.len() && offs.iter().zip(log_starts).all(|(o, s)| s >= o);
            if gone {
                deleted.push(*id);
            }
        }
        for id in &deleted {
            next.retired.remove(id);
        }
        if next != *state {
            write_state(&self.dir, &next)?;
            *state = next;
        }
        drop(state);
        for id in &deleted {
            let p = dict_file(&self.dir, *id);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete dictionary", &p, e)),
            }
            // Kept in memory: a reader may still be finishing a segment retention removed.
            tracing::info!(stream = %self.stream, id, "deleted a dictionary no retained batch uses");
        }
        if !deleted.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    /// Retired dictionaries and their retirement offsets (for stats and tests).
    pub fn retired(&self) -> BTreeMap<u32, Vec<u64>> {
        self.state.lock().retired.clone()
    }
}

fn write_state(dir: &Path, s: &State) -> Result<(), LogError> {
    let mut data = serde_json::to_vec_pretty(s)
        .map_err(|e| LogError::Metadata { path: dir.join("state.json"), message: e.to_string() })?;
    data.push(b'\n');
    write_atomic(&dir.join("state.json"), &data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(id: u32) -> DictInfo {
        DictInfo { id, created_ms: 1, sample_records: 2, sample_bytes: 3, size_bytes: 4, holdout_ratio: 0.5, level: 3 }
    }

    #[test]
    fn file_round_trip_and_every_flip_detected() {
        let b = encode_file(&info(7), b"dictionary bytes");
        let (i, c) = decode_file(&b).unwrap();
        assert_eq!(i, info(7));
        assert_eq!(&c[..], b"dictionary bytes");
        for at in 0..b.len() {
            let mut x = b.clone();
            x[at] ^= 0x10;
            assert!(decode_file(&x).is_err(), "flip at {at} not detected");
        }
        for cut in 0..b.len() {
            assert!(decode_file(&b[..cut]).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_files_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), fix in any::<bool>()) {
            let mut b = bytes;
            if fix && b.len() >= FILE_HEADER {
                b[..8].copy_from_slice(MAGIC);
                let crc = crc32fast::hash(&b[FILE_HEADER..]);
                b[16..20].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = decode_file(&b);
        }
    }
}

impl crate::format::DictLookup for Dictionaries {
    fn dictionary(&self, id: u32) -> Result<Arc<Dictionary>, String> {
        self.get(id)
    }
}
