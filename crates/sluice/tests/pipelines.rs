//! Pipelines in the real binary: filter, map, drop and route into a lake table and another
//! stream; failing records in `<pipeline>__dlq`; exactly-once across kill -9.

mod common;
use common::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RIDES: &str = r#"lake:
  flush_interval: 100ms
streams:
  events:
    partitions: 2
  big: {}
pipelines:
  rides:
    from: events
    steps:
      - filter: "region <> 'paris'"
      - map:
          amount_eur: amount / 100.0
          tier: account.tier
          note_n: CAST(note AS INT)
      - drop: [tags, account]
      - route:
          - to: big_rides
            when: amount >= 900
          - to: rides
    to:
      rides:
        lake:
          partition_by: [region]
      big_rides:
        stream:
          stream: big
"#;

fn notes(n: usize, note: &str) -> String {
    (0..n)
        .map(|k| format!("{{\"event_id\":\"n{note}{k}\",\"ts\":\"2026-01-05T10:00:00Z\",\"region\":\"madrid\",\"amount\":5,\"note\":\"{note}\"}}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_map_route_into_lake_and_stream_with_dead_letters() {
    let s = Server::start(RIDES).await;
    assert_eq!(s.post("events", events(0, 1000)).await.0, 200);
    // `note` does not exist in the first records: the map reads NULL there. "x" does not cast.
    assert_eq!(s.post("events", notes(10, "x")).await.0, 200);
    assert_eq!(s.post("events", notes(5, "12")).await.0, 200);
    s.wait_landed("events").await;
    s.wait_landed("big").await;

    // events 0..1000 cycle madrid, berlin, paris: 667 are not in paris; 67 of them have amount >= 900.
    assert_eq!(s.scalar("SELECT count(*) FROM rides").await, 672.0);
    assert_eq!(s.scalar("SELECT count(*) FROM rides WHERE region = 'paris'").await, 0.0);
    let kept: usize = (0..1000).filter(|i| i % 3 != 2).sum::<usize>() + 5 * 5;
    assert_eq!(s.scalar("SELECT sum(amount) FROM rides").await, kept as f64);
    assert_eq!(s.scalar("SELECT count(*) FROM rides WHERE tier = 'gold'").await, 667.0);
    assert_eq!(s.scalar("SELECT sum(note_n) FROM rides").await, 60.0);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM rides").await, 672.0);
    let row = &s.query("SELECT * FROM rides WHERE event_id = 'e3'").await[0];
    assert_eq!(row["amount_eur"], 0.03);
    assert!(row.get("tags").is_none() && row.get("account").is_none(), "{row}");
    assert!(row.get("_offset").is_some() && row.get("event_date").is_some(), "{row}");
    assert!(s.lake().join("rides").join("event_date=2026-01-01").join("region=madrid").is_dir());

    // The stream sink: records are JSON again, landed in the `big` stream's own table.
    assert_eq!(s.scalar("SELECT count(*) FROM big").await, 67.0);
    assert_eq!(s.scalar("SELECT min(amount) FROM big").await, 900.0);
    assert_eq!(s.scalar("SELECT count(*) FROM big WHERE amount_eur >= 9").await, 67.0);

    // Dead letters: the original record, the step and the error.
    assert_eq!(s.scalar("SELECT count(*) FROM rides__dlq").await, 10.0);
    let dl = &s.query("SELECT * FROM rides__dlq ORDER BY _offset LIMIT 1").await[0];
    assert_eq!(dl["step"], "1:map");
    assert_eq!(dl["stream"], "events");
    assert!(dl["error"].as_str().unwrap().to_lowercase().contains("cast"), "{dl}");
    assert!(dl["raw"].as_str().unwrap().contains("\"note\":\"x\""), "{dl}");

    // The source stream does not land by itself; the pipeline reports its counters.
    assert!(!s.lake().join("events").exists());
    let p: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/pipelines")).send().await.unwrap().text().await.unwrap()).unwrap();
    let p = &p["pipelines"][0];
    assert_eq!(p["name"], "rides");
    assert_eq!(p["records_in"], 1015);
    assert_eq!(p["lag"], 0);
    assert_eq!(p["dead_letters"], 10);
    assert_eq!(p["steps"][0]["records_in"], 1015);
    assert_eq!(p["steps"][0]["filtered"], 333);
    assert_eq!(p["steps"][1]["failed"], 10);
    assert_eq!(p["sinks"].as_array().unwrap().iter().map(|s| s["records"].as_u64().unwrap()).sum::<u64>(), 672 + 67);
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sluice_pipeline_lag_records{pipeline=\"rides\"} 0"), "{metrics}");
}

#[test]
fn check_rejects_bad_pipelines_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (RIDES.replace("region <> 'paris'", "region <> 'paris' AND"), "steps.0", "filter"),
        (RIDES.replace("amount / 100.0", "amount / / 100.0"), "steps.1.map.amount_eur", "map"),
        (RIDES.replace("when: amount >= 900", "when: amount >= 900 900"), "steps.3.route.0", "route"),
        (RIDES.replace("from: events", "from: nowhere"), "from", "unknown stream"),
        (RIDES.replace("stream: big\n", "stream: events\n"), "to", "cycle"),
    ];
    for (i, (yaml, key, words)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let (code, out, err) = cli(&["check", "-c", path.to_str().unwrap()]);
        assert_ne!(code, 0, "case {i} passed: {out}");
        assert!(err.contains(&format!("c{i}.yaml:")), "case {i}: {err}");
        assert!(err.contains(&format!("pipelines.rides.{key}")), "case {i}: {err}");
        assert!(err.contains(words), "case {i}: {err}");
    }
    let path = dir.path().join("ok.yaml");
    std::fs::write(&path, RIDES).unwrap();
    let (code, out, err) = cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// kill -9 at random moments while events flow through a pipeline with a filter, a dedup
/// (every request is sent twice), a map that fails on some records, and a lake sink. At the end the pipeline's table holds every
/// acknowledged record that passes the filter exactly once, and its dead-letter table holds
/// exactly the acknowledged records the map fails on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_pipeline_lands_exactly_once() {
    let rounds: usize = std::env::var("SLUICE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = "lake:\n  flush_interval: 30ms\nstreams:\n  crash:\n    partitions: 3\npipelines:\n  p:\n    from: crash\n    steps:\n      - filter: amount % 2 = 0\n      - dedup:\n          key: event_id\n          window: 1h\n      - map:\n          bad: CAST(CASE WHEN amount % 7 = 0 THEN 'x' ELSE '1' END AS INT)\n    to:\n      even:\n        lake: {}\n";
    let mut s = Server::new_in(tmp.path(), cfg);
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let unknown = Arc::new(Mutex::new(Vec::new()));
    let next_id = Arc::new(AtomicUsize::new(0));
    let seed = std::env::var("SLUICE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("pipeline crash loop: {rounds} rounds, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 0..rounds {
        // Every other round the server also aborts itself at random between a sink's
        // commit and the checkpoint (a window a kill from outside rarely hits).
        s.env = if round % 2 == 1 { vec![("SLUICE_FAULT_CRASH_PIPELINE".into(), "0.1".into())] } else { Vec::new() };
        s.spawn().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut senders = Vec::new();
        for _ in 0..3 {
            let (client, url, acked, unknown, next_id, stop) =
                (s.client.clone(), s.url("/v1/streams/crash/events"), acked.clone(), unknown.clone(), next_id.clone(), stop.clone());
            let n = rng.usize(1..150);
            senders.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let start = next_id.fetch_add(n, Ordering::Relaxed);
                    match client.post(&url).body(events(start, n)).send().await {
                        Ok(r) if r.status() == 200 => {
                            acked.lock().unwrap().extend(start..start + n);
                            // Sent again (a client retrying): the dedup step keeps one copy.
                            let _ = client.post(&url).body(events(start, n)).send().await;
                            // A steady flow the pipeline keeps up with, so kills and faults
                            // land in the middle of its commits.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Ok(r) if matches!(r.status().as_u16(), 429 | 503) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => {
                            unknown.lock().unwrap().push((start, start + n));
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
        eprintln!("round {round}: {} acknowledged", acked.lock().unwrap().len());
    }
    s.env.clear();
    s.spawn().await;
    s.wait_landed("crash").await;

    // events(): amount = id, so the filter keeps even ids and the map fails on multiples of 7.
    let count = |rows: Vec<serde_json::Value>, col: &str| {
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for r in rows {
            let raw = r[col].as_str().unwrap().to_string();
            let id: usize = if col == "raw" {
                let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
                v["event_id"].as_str().unwrap()[1..].parse().unwrap()
            } else {
                raw[1..].parse().unwrap()
            };
            *seen.entry(id).or_default() += 1;
        }
        seen
    };
    let lake = count(s.query("SELECT event_id FROM even").await, "event_id");
    let dlq = count(s.query("SELECT raw FROM p__dlq").await, "raw");
    let acked = acked.lock().unwrap();
    let unknown = unknown.lock().unwrap();
    let in_unknown = |id: usize| unknown.iter().any(|(a, b)| (*a..*b).contains(&id));
    for (name, seen, want) in [("lake", &lake, (|id: usize| id % 2 == 0 && id % 7 != 0) as fn(usize) -> bool), ("dlq", &dlq, |id| id % 14 == 0)] {
        let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(dups.is_empty(), "{name}: duplicates (seed {seed}): {dups:?}");
        let missing: Vec<_> = acked.iter().filter(|id| want(**id) && !seen.contains_key(id)).take(5).collect();
        assert!(missing.is_empty(), "{name}: acknowledged records missing (seed {seed}): {missing:?}");
        let wrong: Vec<_> = seen.keys().filter(|id| !want(**id) || (!acked.contains(id) && !in_unknown(**id))).take(5).collect();
        assert!(wrong.is_empty(), "{name}: records that do not belong (seed {seed}): {wrong:?}");
    }
    assert!(!acked.is_empty());
    let log = std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default();
    eprintln!(
        "pipeline crash loop ok: {} acknowledged, {} in the lake, {} dead letters; {} injected aborts, {} re-runs skipped rows",
        acked.len(),
        lake.len(),
        dlq.len(),
        log.matches("SLUICE_FAULT_CRASH_PIPELINE: aborting").count(),
        log.matches("skipping rows the table already holds").count()
    );
    let _ = s.stop();
}

/// An enrichment service on loopback: `/accounts/{id}` answers `{"id": id, "name": "acct-<id>"}`,
/// except id 13, which fails (500) every time.
async fn accounts_service() -> String {
    use axum::extract::Path;
    let app = axum::Router::new().route(
        "/accounts/{id}",
        axum::routing::get(|Path(id): Path<i64>| async move {
            if id == 13 {
                return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down".to_string());
            }
            (axum::http::StatusCode::OK, format!(r#"{{"id":{id},"name":"acct-{id}","limits":{{"daily":{}}}}}"#, id * 10))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_from_an_http_service_into_the_lake() {
    let base = accounts_service().await;
    let cfg = format!(
        "lake:\n  flush_interval: 100ms\nstreams:\n  events: {{}}\npipelines:\n  enriched:\n    from: events\n    steps:\n      - enrich:\n          url: \"{base}/accounts/${{account.id}}\"\n          into: acct\n          retries: 1\n          backoff: 10ms\n      - drop: [account, tags]\n    to:\n      accounts:\n        lake: {{}}\n"
    );
    let s = Server::start(&cfg).await;
    // events(): account.id = i % 100, so ids 0..99, and 10 records have id 13.
    assert_eq!(s.post("events", events(0, 1000)).await.0, 200);
    s.wait_landed("events").await;
    assert_eq!(s.scalar("SELECT count(*) FROM accounts").await, 990.0);
    assert_eq!(s.scalar("SELECT count(*) FROM accounts WHERE acct.name = 'acct-' || CAST(acct.id AS VARCHAR)").await, 990.0);
    assert_eq!(s.scalar("SELECT sum(acct.limits.daily) FROM accounts WHERE acct.id = 7").await, 700.0);
    assert_eq!(s.scalar("SELECT count(*) FROM enriched__dlq WHERE step = '0:enrich' AND error LIKE '%HTTP 500%'").await, 10.0);
    let p: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/pipelines")).send().await.unwrap().text().await.unwrap()).unwrap();
    // 100 distinct accounts: one call each (13 twice: a retry), every other record from the cache.
    let hits = p["pipelines"][0]["steps"][0]["cache_hits"].as_u64().unwrap();
    let misses = p["pipelines"][0]["steps"][0]["cache_misses"].as_u64().unwrap();
    assert_eq!(misses, 100, "{p}");
    assert_eq!(hits + misses, 1000, "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sink_posts_batches_retries_and_holds_on_refusal() {
    use std::sync::atomic::AtomicU8;
    // 0: accept; 1: refuse with 400 (the pipeline must hold the records, not drop them);
    // every third request is answered 503 first (retried).
    #[derive(Default)]
    struct Hook {
        mode: AtomicU8,
        requests: AtomicUsize,
        ids: Mutex<Vec<String>>,
        largest: AtomicUsize,
    }
    let hook = Arc::new(Hook::default());
    hook.mode.store(1, Ordering::SeqCst);
    let h = hook.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let h = h.clone();
            async move {
                let n = h.requests.fetch_add(1, Ordering::SeqCst);
                if h.mode.load(Ordering::SeqCst) == 1 {
                    return (axum::http::StatusCode::BAD_REQUEST, "not now".to_string());
                }
                if n % 3 == 0 {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy".to_string());
                }
                let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
                h.largest.fetch_max(v.len(), Ordering::SeqCst);
                let mut ids = h.ids.lock().unwrap();
                ids.extend(v.iter().map(|r| r["event_id"].as_str().unwrap().to_string()));
                assert!(v.iter().all(|r| r.get("_offset").is_none() && r.get("event_date").is_none()));
                (axum::http::StatusCode::OK, "ok".to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cfg = format!(
        "lake:\n  flush_interval: 100ms\nstreams:\n  events: {{}}\npipelines:\n  hooks:\n    from: events\n    steps:\n      - filter: amount < 250\n    to:\n      out:\n        webhook:\n          url: http://{addr}/hook\n          batch_records: 100\n          retries: 2\n"
    );
    let s = Server::start(&cfg).await;
    assert_eq!(s.post("events", events(0, 500)).await.0, 200);
    // Refused: the pipeline reports the error and keeps the records in its lag.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/pipelines")).send().await.unwrap().text().await.unwrap()).unwrap();
        let p = &p["pipelines"][0];
        if p["error"].as_str().is_some_and(|e| e.contains("HTTP 400")) {
            assert_eq!(p["lag"], 500, "{p}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no error reported: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook.mode.store(0, Ordering::SeqCst);
    s.wait_landed("events").await;
    let mut ids = hook.ids.lock().unwrap().clone();
    ids.sort();
    ids.dedup();
    let mut want: Vec<String> = (0..250).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    assert!(hook.largest.load(Ordering::SeqCst) <= 100);
}
