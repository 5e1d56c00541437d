//! kill -9 at random moments during sustained concurrent ingest; after every round the
//! server restarts on the same data. At the end the lake must hold every acknowledged
//! record exactly once, and nothing that was never sent. A request whose reply was lost
//! in the crash may be in the lake or not, but whole or not at all.

mod common;
use common::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Ledger {
    acked: HashSet<usize>,
    /// Requests whose outcome is unknown (connection died): their id ranges.
    unknown: Vec<(usize, usize)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_lake_holds_exactly_the_acknowledged_records() {
    let rounds: usize = std::env::var("SLUICE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    // Small segments and an early dictionary: restarts train and rotate dictionaries and
    // re-pack sealed segments (both run at start), so kills land in those too.
    let mut s = Server::new_in(
        tmp.path(),
        "lake:\n  flush_interval: 30ms\nstreams:\n  crash:\n    partitions: 3\n    dictionary:\n      train_after_records: 1000\n      sample_records: 6000\nlog:\n  segment_bytes: 256KiB\n",
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next_id = Arc::new(AtomicUsize::new(0));
    let seed = std::env::var("SLUICE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash loop: {rounds} rounds, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    for round in 0..rounds {
        s.spawn().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut senders = Vec::new();
        for _ in 0..4 {
            let (client, url, ledger, next_id, stop) = (s.client.clone(), s.url("/v1/streams/crash/events"), ledger.clone(), next_id.clone(), stop.clone());
            let n = rng.usize(1..200);
            senders.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let start = next_id.fetch_add(n, Ordering::Relaxed);
                    let body = events(start, n);
                    match client.post(&url).body(body).send().await {
                        Ok(r) if r.status() == 200 => {
                            let mut l = ledger.lock().unwrap();
                            l.acked.extend(start..start + n);
                        }
                        Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => {
                            ledger.lock().unwrap().unknown.push((start, start + n));
                            return;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(50..700))).await;
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in senders {
            t.await.unwrap();
        }
        eprintln!("round {round}: {} acknowledged so far", ledger.lock().unwrap().acked.len());
    }

    // Final start: everything durable lands.
    s.spawn().await;
    s.wait_landed("crash").await;
    let st: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/streams/crash/stats")).send().await.unwrap().text().await.unwrap()).unwrap();
    eprintln!("log: {} records, {} batches, dictionaries {}", st["records"], st["batches"], st["dictionaries"]);
    let rows = s.query("SELECT event_id FROM crash").await;
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for r in &rows {
        let id: usize = r["event_id"].as_str().unwrap()[1..].parse().unwrap();
        *seen.entry(id).or_default() += 1;
    }
    let l = ledger.lock().unwrap();
    let dups: Vec<_> = seen.iter().filter(|(_, &c)| c > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicates in the lake: {dups:?}");
    let missing: Vec<_> = l.acked.iter().filter(|id| !seen.contains_key(id)).take(5).collect();
    assert!(missing.is_empty(), "acknowledged records missing from the lake (seed {seed}): {missing:?}");
    let in_unknown = |id: usize| l.unknown.iter().any(|(a, b)| (*a..*b).contains(&id));
    let extra: Vec<_> = seen.keys().filter(|id| !l.acked.contains(id) && !in_unknown(**id)).take(5).collect();
    assert!(extra.is_empty(), "records in the lake that were never acknowledged nor in flight: {extra:?}");
    for (a, b) in &l.unknown {
        let present = (*a..*b).filter(|id| seen.contains_key(id)).count();
        assert!(present == 0 || present == b - a, "request {a}..{b} is partly in the lake ({present} of {})", b - a);
    }
    assert!(l.acked.len() > 0, "the loop acknowledged nothing");
    eprintln!("crash loop ok: {} acknowledged, {} rows, {} requests in flight at kills", l.acked.len(), rows.len(), l.unknown.len());
    let _ = s.stop();
}
