//! Rough throughput check of the embedded log (not a benchmark with a reference; see
//! bench/ for those): `cargo run --release -p sluice-log --example log_throughput [dir]`.
//! Appends ~300-byte JSON events in batches of 1000 to one partition per thread, syncing
//! every batch, then reads everything back.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sluice_log::{Log, LogConfig, Record, StreamOptions};

fn event(i: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"event_id\":\"evt-{i:012}\",\"kind\":\"scooter_telemetry\",\"scooter_id\":\"sc-{:05}\",\"ts\":\"2024-05-01T12:{:02}:{:02}.{:03}Z\",\"lat\":52.{:06},\"lon\":13.{:06},\"battery_pct\":{},\"speed_kmh\":{}.{},\"status\":\"{}\",\"firmware\":\"v3.{}.{}\",\"trip_id\":\"trip-{:08}\"}}",
        i % 20000, (i / 60) % 60, i % 60, i % 1000, (i * 7919) % 1_000_000, (i * 104_729) % 1_000_000,
        i % 101, i % 35, i % 10, ["riding", "parked", "charging"][(i % 3) as usize], i % 7, i % 13, i / 17
    ))
}

fn main() {
    let dir = std::env::args().nth(1).map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let batches_per_thread = 400u64;
    let batch_size = 1000u64;
    let log = Arc::new(Log::open(&dir, LogConfig::default()).unwrap());
    let s = log.create_stream("bench", StreamOptions { partitions: threads as u32, ..Default::default() }).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let value_bytes: usize = (0..batch_size).map(|i| event(i).len()).sum();

    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let p = s.partition(th as u32).unwrap().clone();
            let h = rt.handle().clone();
            std::thread::spawn(move || {
                let records: Vec<Record> = (0..batch_size).map(|i| Record::new(event(i), i as i64)).collect();
                for _ in 0..batches_per_thread {
                    let a = p.append(&records).unwrap();
                    h.block_on(p.sync(&a)).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let n = threads as u64 * batches_per_thread * batch_size;
    let bytes = threads as f64 * batches_per_thread as f64 * value_bytes as f64;
    let disk: u64 = s.partitions().iter().map(|p| p.size_bytes()).sum();
    println!(
        "append+sync: {n} records in {secs:.2}s = {:.2} M records/s, {:.0} MB/s of values, {:.2}x compression, {} fsyncs",
        n as f64 / secs / 1e6,
        bytes / secs / 1e6,
        bytes / disk as f64,
        s.partitions().iter().map(|p| p.fsync_count()).sum::<u64>()
    );

    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let p = s.partition(th as u32).unwrap().clone();
            std::thread::spawn(move || {
                let mut next = 0;
                let mut count = 0u64;
                loop {
                    let r = p.read(next, 1 << 20).unwrap();
                    let Some(last) = r.last() else { break };
                    next = last.offset + 1;
                    count += r.len() as u64;
                }
                count
            })
        })
        .collect();
    let read: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(read, n);
    println!("read: {read} records in {secs:.2}s = {:.2} M records/s", read as f64 / secs / 1e6);
}
