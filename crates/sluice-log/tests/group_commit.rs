//! Group commit and visibility: concurrent appenders share fsyncs; nothing is visible
//! to readers before it is durable.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice_log::{Appended, Log, StreamOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), cfg(16 << 10)).unwrap());
    let p = log.create_stream("gc", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
    const TASKS: usize = 16;
    const ROUNDS: usize = 20;

    // Phase 1: every round, all tasks append, then all sync at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let p = p.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut mine: Vec<(Appended, usize)> = Vec::new();
            for r in 0..ROUNDS {
                let n = 1 + (t + r) % 3;
                let a = p.append(&batch(t * 1000 + r * 10, n)).unwrap();
                barrier.wait().await;
                p.sync(&a).await.unwrap();
                assert!(p.high_watermark() > a.last_offset);
                mine.push((a, t * 1000 + r * 10));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let appends_phase1 = all.len() as u64;
    let fsyncs_phase1 = p.fsync_count();
    assert!(
        fsyncs_phase1 < appends_phase1 / 2,
        "group commit should share fsyncs: {fsyncs_phase1} fsyncs for {appends_phase1} appends"
    );

    // Phase 2: free-running appenders.
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let p = p.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for r in 0..ROUNDS {
                let start = 100_000 + t * 1000 + r * 10;
                let a = p.append(&batch(start, 2)).unwrap();
                p.sync(&a).await.unwrap();
                mine.push((a, start));
            }
            mine
        }));
    }
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let appends = all.len() as u64;
    eprintln!("phase 1: {fsyncs_phase1} fsyncs / {appends_phase1} appends; total: {} fsyncs / {appends} appends", p.fsync_count());
    assert!(p.fsync_count() < appends, "{} fsyncs for {appends} appends", p.fsync_count());

    // Offsets are unique and consecutive, and every record reads back as written.
    all.sort_by_key(|(a, _)| a.first_offset);
    let mut next = 0;
    for (a, _) in &all {
        assert_eq!(a.first_offset, next);
        next = a.last_offset + 1;
    }
    assert_eq!(p.high_watermark(), next);
    let got = read_all(&p, 0, 4096);
    assert_eq!(got.len() as u64, next);
    for (a, start) in &all {
        let n = (a.last_offset - a.first_offset + 1) as usize;
        let want = batch(*start, n);
        for (i, w) in want.iter().enumerate() {
            assert!(same(w, &got[a.first_offset as usize + i]));
        }
    }
    assert!(p.segments().len() > 1, "the test should cross segment rolls");
}

#[tokio::test]
async fn unsynced_data_is_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
    let p = log.create_stream("hw", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
    let a = p.append(&batch(0, 4)).unwrap();
    assert_eq!((a.first_offset, a.last_offset), (0, 3));
    assert_eq!(p.high_watermark(), 0);
    assert_eq!(p.next_offset(), 4);
    assert!(p.read(0, usize::MAX).unwrap().is_empty());
    assert_eq!(p.bytes_after(0), 0);

    // wait_for times out while nothing is durable.
    let t = Instant::now();
    p.wait_for(0, Duration::from_millis(50)).await;
    assert!(t.elapsed() >= Duration::from_millis(45));
    assert_eq!(p.high_watermark(), 0);

    p.sync(&a).await.unwrap();
    assert_eq!(p.high_watermark(), 4);
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 4);

    // A second batch: appended but not synced, it stays invisible behind the first.
    let b = p.append(&batch(4, 3)).unwrap();
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 4);
    assert!(p.read(4, usize::MAX).unwrap().is_empty());

    // A waiter wakes up when another task syncs.
    let waiter = {
        let p = p.clone();
        tokio::spawn(async move {
            p.wait_for(4, Duration::from_secs(30)).await;
            p.high_watermark()
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = Instant::now();
    p.sync(&b).await.unwrap();
    assert_eq!(waiter.await.unwrap(), 7);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(p.read(4, usize::MAX).unwrap().len(), 3);
    // Syncing again (or an older token) is a no-op.
    let before = p.fsync_count();
    p.sync(&a).await.unwrap();
    p.sync(&b).await.unwrap();
    assert_eq!(p.fsync_count(), before);
    // Empty batches are refused.
    assert!(p.append(&[]).is_err());
}
