//! The `dedup` step: drops a record whose key was first seen less than `window` ago.
//!
//! State survives restarts, and a flush that re-runs after a crash decides exactly as the first
//! run did: every key is remembered with the log position of the record that first carried it
//! (its *origin*). When that very record comes again (a re-run), it passes; any other record
//! with the key inside the window is a duplicate. New keys are appended to a journal and
//! fsync'd before the flush's results are written anywhere, so no sink can hold a record whose
//! key the state has forgotten.
//!
//! Journal (hand-written: it is part of the exactly-once protocol): fixed 40-byte entries —
//! key hash (FNV-1a 128, stable across versions), stream index (u32), partition (u32), offset
//! (u64), first-seen Unix ms (i64), little-endian. A torn last entry is ignored. When it holds
//! more than twice the live keys it is rewritten (temp file, fsync, rename).

use crate::expr::Map;
use deltalake::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use deltalake::arrow::compute::{cast, filter_record_batch};
use deltalake::arrow::datatypes::DataType;
use sluice_core::pipeline::DedupConfig;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;

const ENTRY: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Origin {
    stream: u32,
    partition: u32,
    offset: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    origin: Origin,
    at_ms: i64,
}

/// FNV-1a, 128 bits: stable across Rust versions (the hash is persisted).
fn fnv128(data: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in data {
        h ^= *b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

pub struct Deduper {
    cfg: DedupConfig,
    path: Option<PathBuf>,
    file: Option<File>,
    loaded: bool,
    map: HashMap<u128, Entry>,
    journal_entries: usize,
}

impl Deduper {
    pub fn new(cfg: &DedupConfig) -> Deduper {
        Deduper { cfg: cfg.clone(), path: None, file: None, loaded: false, map: HashMap::new(), journal_entries: 0 }
    }

    /// Where the journal lives; without one the state is in memory only (tests).
    pub fn set_path(&mut self, path: PathBuf) {
        if self.path.as_ref() != Some(&path) {
            self.path = Some(path);
            self.loaded = false;
        }
    }

    pub fn key_fields(&self) -> Vec<(String, String)> {
        vec![("k".into(), self.cfg.key.clone())]
    }

    fn load(&mut self) -> std::io::Result<()> {
        self.map.clear();
        self.journal_entries = 0;
        self.file = None;
        let Some(path) = &self.path else {
            self.loaded = true;
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut data = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let whole = data.len() / ENTRY * ENTRY;
        for e in data[..whole].chunks_exact(ENTRY) {
            let key = u128::from_le_bytes(e[0..16].try_into().expect("16 bytes"));
            let origin = Origin {
                stream: u32::from_le_bytes(e[16..20].try_into().expect("4 bytes")),
                partition: u32::from_le_bytes(e[20..24].try_into().expect("4 bytes")),
                offset: u64::from_le_bytes(e[24..32].try_into().expect("8 bytes")),
            };
            let at_ms = i64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
            self.map.entry(key).or_insert(Entry { origin, at_ms });
            self.journal_entries += 1;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if whole != data.len() {
            // A torn last entry (crash mid-write): cut it off.
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        self.file = Some(file);
        self.loaded = true;
        Ok(())
    }

    /// Keeps the first record of each key within the window. `keys` evaluates the key
    /// expression on `batch`; `positions` are the rows' (partition, offset) in source stream
    /// `stream`. Returns the kept rows and how many were dropped; an error means the state
    /// could not be made durable (nothing may be written downstream).
    pub fn apply(
        &mut self,
        keys: &Map,
        batch: &RecordBatch,
        stream: u32,
        positions: &[(u32, u64)],
    ) -> Result<(RecordBatch, usize), String> {
        if !self.loaded {
            self.load().map_err(|e| format!("dedup state: {e}"))?;
        }
        let k = keys.apply(batch).map_err(|e| e.to_string())?;
        let k = cast(k.column(0), &DataType::Utf8).map_err(|e| e.to_string())?;
        let k = k.as_string_opt::<i32>().ok_or("dedup key is not text")?;
        let now = sluice_core::time::now_ms();
        let window = self.cfg.window.as_millis() as i64;
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut journal = Vec::new();
        for (row, &(partition, offset)) in positions.iter().enumerate() {
            if k.is_null(row) {
                keep.push(true);
                continue;
            }
            let h = fnv128(k.value(row).as_bytes());
            let here = Origin { stream, partition, offset };
            match self.map.get(&h) {
                Some(e) if now - e.at_ms < window => keep.push(e.origin == here),
                _ => {
                    keep.push(true);
                    self.map.insert(h, Entry { origin: here, at_ms: now });
                    journal.extend_from_slice(&h.to_le_bytes());
                    journal.extend_from_slice(&stream.to_le_bytes());
                    journal.extend_from_slice(&partition.to_le_bytes());
                    journal.extend_from_slice(&offset.to_le_bytes());
                    journal.extend_from_slice(&now.to_le_bytes());
                }
            }
        }
        if !journal.is_empty() {
            if let Some(f) = self.file.as_mut() {
                let written = f.write_all(&journal).and_then(|_| f.sync_data());
                if let Err(e) = written {
                    self.loaded = false; // reload: memory may be ahead of the journal
                    return Err(format!("dedup state: {e}"));
                }
            }
            self.journal_entries += journal.len() / ENTRY;
        }
        self.forget(now, window);
        if let Err(e) = self.compact() {
            self.loaded = false;
            return Err(format!("dedup state: {e}"));
        }
        let dropped = keep.iter().filter(|k| !**k).count();
        let out = if dropped == 0 { batch.clone() } else { filter_record_batch(batch, &BooleanArray::from(keep)).map_err(|e| e.to_string())? };
        Ok((out, dropped))
    }

    /// Forgets expired keys once over `max_keys` (then the oldest, if still over).
    fn forget(&mut self, now: i64, window: i64) {
        if self.map.len() <= self.cfg.max_keys {
            return;
        }
        self.map.retain(|_, e| now - e.at_ms < window);
        if self.map.len() > self.cfg.max_keys {
            let mut times: Vec<i64> = self.map.values().map(|e| e.at_ms).collect();
            let cut = self.map.len() - self.cfg.max_keys;
            times.select_nth_unstable(cut);
            let cutoff = times[cut];
            self.map.retain(|_, e| e.at_ms >= cutoff);
        }
    }

    /// Rewrites the journal with the live keys when it is more than twice their number.
    fn compact(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        if self.journal_entries <= 2 * self.map.len() + 100_000 {
            return Ok(());
        }
        let tmp = path.with_extension("tmp");
        let mut buf = Vec::with_capacity(self.map.len() * ENTRY);
        for (h, e) in &self.map {
            buf.extend_from_slice(&h.to_le_bytes());
            buf.extend_from_slice(&e.origin.stream.to_le_bytes());
            buf.extend_from_slice(&e.origin.partition.to_le_bytes());
            buf.extend_from_slice(&e.origin.offset.to_le_bytes());
            buf.extend_from_slice(&e.at_ms.to_le_bytes());
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = Some(OpenOptions::new().append(true).open(&path)?);
        self.journal_entries = self.map.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        // Persisted: these values must never change.
        assert_eq!(fnv128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
