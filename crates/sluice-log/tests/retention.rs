//! Consumer offsets and retention.

mod common;

use common::*;
use sluice_log::{Log, LogError, StreamOptions};

fn fill(p: &sluice_log::Partition, batches: usize, ts_of: impl Fn(usize) -> i64) {
    let rt = rt();
    for i in 0..batches {
        let mut b = batch(i * 5, 5);
        for r in &mut b {
            r.timestamp_ms = ts_of(i);
        }
        let a = p.append(&b).unwrap();
        rt.block_on(p.sync(&a)).unwrap();
    }
}

#[test]
fn consumer_offsets_persist_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
        let s = log.create_stream("c", StreamOptions { partitions: 2, ..Default::default() }).unwrap();
        let p = s.partition(1).unwrap();
        assert_eq!(p.committed_offset("lake"), None);
        p.commit_offset("lake", 5).unwrap();
        p.commit_offset("lake", 17).unwrap();
        p.commit_offset("pipeline.enrich-2", 3).unwrap();
        assert_eq!(p.committed_offset("lake"), Some(17));
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(matches!(p.commit_offset(bad, 1), Err(LogError::InvalidName(_))), "{bad}");
        }
    }
    let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
    let s = log.stream("c").unwrap();
    let p = s.partition(1).unwrap();
    assert_eq!(p.committed_offset("lake"), Some(17));
    assert_eq!(p.committed_offset("pipeline.enrich-2"), Some(3));
    assert_eq!(p.committed_offset("other"), None);
    assert_eq!(s.partition(0).unwrap().committed_offset("lake"), None);
    assert_eq!(p.consumers().len(), 2);
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("c/1/consumers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".offset"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn retention_by_bytes_deletes_oldest_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1)).unwrap(); // one batch per segment
    let s = log.create_stream("r", StreamOptions { partitions: 1, retention_bytes: Some(1), retention_ms: None, codec: None, dictionary: None }).unwrap();
    let p = s.partition(0).unwrap();
    fill(p, 10, |_| 0);
    let before = p.size_bytes();
    let segs = p.segments();
    assert_eq!(segs.len(), 10);
    let deleted = p.apply_retention(0).unwrap();
    // Everything but the active segment goes.
    assert_eq!(deleted, before - segs[9].size_bytes);
    assert_eq!(p.size_bytes(), segs[9].size_bytes);
    assert_eq!(p.log_start_offset(), 45);
    assert!(!segs[0].path.exists() && !segs[0].path.with_extension("idx").exists());
    assert!(matches!(p.read(0, 100), Err(LogError::OffsetOutOfRange { offset: 0, log_start: 45, .. })));
    assert_eq!(p.read(45, usize::MAX).unwrap().len(), 5);
    assert_eq!(p.apply_retention(0).unwrap(), 0);
    // The new log start survives a reopen, and appends continue.
    drop(log);
    let log = Log::open(dir.path(), cfg(1)).unwrap();
    let p = log.stream("r").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.log_start_offset(), 45);
    assert_eq!(p.high_watermark(), 50);
    assert_eq!(p.append(&batch(0, 1)).unwrap().first_offset, 50);
}

#[test]
fn retention_by_bytes_keeps_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1)).unwrap();
    let s = log.create_stream("r", StreamOptions::default()).unwrap();
    let p = s.partition(0).unwrap();
    fill(p, 10, |_| 0);
    let segs = p.segments();
    let limit: u64 = segs[6..].iter().map(|s| s.size_bytes).sum();
    // Retention is configured later through create_stream (it updates retention).
    log.create_stream("r", StreamOptions { partitions: 1, retention_bytes: Some(limit), retention_ms: None, codec: None, dictionary: None }).unwrap();
    p.apply_retention(0).unwrap();
    assert_eq!(p.log_start_offset(), segs[6].base_offset);
    assert!(p.size_bytes() <= limit);
}

#[test]
fn retention_never_passes_the_min_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1)).unwrap();
    let s = log.create_stream("r", StreamOptions { partitions: 1, retention_bytes: Some(1), retention_ms: Some(1), codec: None, dictionary: None }).unwrap();
    let p = s.partition(0).unwrap();
    fill(p, 10, |_| 0);
    p.commit_offset("fast", 40).unwrap();
    p.commit_offset("slow", 12).unwrap();
    p.apply_retention(i64::MAX).unwrap();
    // Segment [10, 15) holds offset 12: it and everything after stay.
    assert_eq!(p.log_start_offset(), 10);
    assert_eq!(p.read(12, 0).unwrap()[0].offset, 12);
    // The consumer at exactly a segment boundary allows that segment's predecessors only.
    p.commit_offset("slow", 30).unwrap();
    p.apply_retention(i64::MAX).unwrap();
    assert_eq!(p.log_start_offset(), 30);
    // Min over consumers, also after reopen.
    drop(log);
    let log = Log::open(dir.path(), cfg(1)).unwrap();
    let p = log.stream("r").unwrap().partition(0).unwrap().clone();
    p.commit_offset("fast", 31).unwrap();
    p.apply_retention(i64::MAX).unwrap();
    assert_eq!(p.log_start_offset(), 30);
    p.commit_offset("slow", 1000).unwrap();
    p.apply_retention(i64::MAX).unwrap();
    assert_eq!(p.log_start_offset(), 30, "fast at 31 holds segment [30,35)");
    // Once every consumer is past them, all sealed segments can go.
    p.commit_offset("fast", 1000).unwrap();
    p.apply_retention(i64::MAX).unwrap();
    assert_eq!(p.log_start_offset(), 45, "the active segment is never deleted");
}

#[test]
fn retention_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1)).unwrap();
    let s = log.create_stream("t", StreamOptions { partitions: 1, retention_bytes: None, retention_ms: Some(1000), codec: None, dictionary: None }).unwrap();
    let p = s.partition(0).unwrap();
    // Batch i has timestamp i * 1000; batch 3 is "late" (newest).
    fill(p, 8, |i| if i == 3 { 100_000 } else { i as i64 * 1000 });
    // now = 3500: cutoff 2500, so segments with max ts 0, 1000, 2000 go; 3 stops it.
    let deleted = p.apply_retention(3500).unwrap();
    assert!(deleted > 0);
    assert_eq!(p.log_start_offset(), 15);
    // Batch 3 blocks later ones until it expires too (deletion is oldest-first only).
    p.apply_retention(50_000).unwrap();
    assert_eq!(p.log_start_offset(), 15);
    p.apply_retention(200_000).unwrap();
    assert_eq!(p.log_start_offset(), 35, "all sealed segments expired");
    // Without retention settings nothing is deleted.
    let log2 = tempfile::tempdir().unwrap();
    let log2 = Log::open(log2.path(), cfg(1)).unwrap();
    let q = log2.create_stream("n", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
    fill(&q, 4, |_| 0);
    assert_eq!(q.apply_retention(i64::MAX).unwrap(), 0);
    assert_eq!(q.log_start_offset(), 0);
}
