#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use sluice_log::format::{parse_header, HEADER_LEN};
use sluice_log::{Codec, LogConfig, Partition, Record, StoredRecord};

pub fn cfg(segment_bytes: u64) -> LogConfig {
    LogConfig { segment_bytes, index_interval_bytes: 64, codec: Codec::Zstd(1) }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub fn rec(key: Option<&str>, value: &str, ts: i64) -> Record {
    Record { key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())), value: Bytes::copy_from_slice(value.as_bytes()), timestamp_ms: ts, template: None }
}

/// A batch of `n` JSON-ish records numbered from `start`.
pub fn batch(start: usize, n: usize) -> Vec<Record> {
    (start..start + n)
        .map(|i| rec(Some(&format!("k{i}")), &format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 40)), i as i64))
        .collect()
}

/// Reads everything from `from` to the high watermark in reads of `max_bytes`, checking
/// that offsets are consecutive.
pub fn read_all(p: &Partition, from: u64, max_bytes: usize) -> Vec<StoredRecord> {
    let mut out: Vec<StoredRecord> = Vec::new();
    let mut next = from;
    loop {
        let got = p.read(next, max_bytes).unwrap();
        if got.is_empty() {
            break;
        }
        for r in &got {
            assert_eq!(r.offset, next, "offsets must be consecutive");
            next += 1;
        }
        out.extend(got);
    }
    assert_eq!(next, p.high_watermark().max(from));
    out
}

/// (start, end, base offset, record count) of every batch in a segment file.
pub fn batch_bounds(path: &Path) -> Vec<(usize, usize, u64, u32)> {
    let data = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    while pos + HEADER_LEN <= data.len() {
        let h = parse_header(&data[pos..]).unwrap();
        out.push((pos, pos + h.total_len, h.base_offset, h.record_count));
        pos += h.total_len;
    }
    assert_eq!(pos, data.len(), "segment {} does not end at a batch boundary", path.display());
    out
}

pub fn same(a: &Record, b: &StoredRecord) -> bool {
    a.key == b.key && a.full_value() == b.value && a.timestamp_ms == b.timestamp_ms
}
