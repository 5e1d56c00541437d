//! Pipelines in the real binary: filter, map, drop and route into a lake table and another
//! stream; failing records in `<pipeline>__dlq`; exactly-once across kill -9.

mod common;
#[path = "../../sluice-connect/tests/support/servers.rs"]
mod servers;
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
    // ... and the same in the dead-letter stream, for other pipelines to read.
    let dlq_stream = s.stream_info("rides__dlq").await.expect("the dead-letter stream exists");
    assert_eq!(dlq_stream["log_end_offset"], 10, "{dlq_stream}");

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
        (
            RIDES.replace("        stream:\n          stream: big\n", "        postgres:\n          url: postgres://x@127.0.0.1/db\n          table: a.b.c\n          key: id\n"),
            "to.big_rides",
            "schema.name",
        ),
        (
            RIDES.replace("        stream:\n          stream: big\n", "        postgres:\n          url: postgres://x@127.0.0.1/db\n          table: t\n          key: id\n          delete_when: \"op = \"\n"),
            "to.big_rides",
            "postgres delete_when",
        ),
        (
            RIDES.replace("      - drop: [tags, account]\n", "      - lookup:\n          key: \"account.id +\"\n          into: acct\n          from: { lake: { table: accounts, column: id } }\n"),
            "steps.2.lookup.key",
            "lookup",
        ),
        (
            RIDES.replace("      - drop: [tags, account]\n", "      - lookup:\n          key: id\n          into: acct\n          from: { mysql: { table: accounts } }\n"),
            "steps[2].lookup.from",
            "unknown lookup source `mysql`",
        ),
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
/// Records for the crash loop: like [`events`] (amount = id) with a top-level `acct` (id % 50)
/// that partitions the stream, so each account's records keep their order.
fn crash_events(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("{{\"event_id\":\"e{i}\",\"acct\":{},\"amount\":{i},\"region\":\"{}\"}}\n", i % 50, ["madrid", "berlin"][i % 2]))
        .collect()
}

/// The issue's crash loop: enrichment and three sinks (lake, PostgreSQL, Redis) in the path,
/// kill -9 at random moments and injected aborts between a sink's write and the checkpoint.
/// Afterwards the lake holds exactly the acknowledged records that pass, the dead-letter
/// table exactly the failures, and PostgreSQL and Redis the latest record per account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_pipeline_lands_exactly_once() {
    let rounds: usize = std::env::var("SLUICE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    let pg = servers::PgServer::start();
    let redis = servers::RedisServer::start();
    // Account 14 fails at the service (HTTP 500) every time.
    let base = accounts_service(14).await;
    let cfg = format!(
        r#"lake:
  flush_interval: 30ms
streams:
  crash:
    partitions: 3
    key_field: acct
pipelines:
  p:
    from: crash
    steps:
      - filter: amount % 2 = 0
      - dedup:
          key: event_id
          window: 1h
      - enrich:
          url: "{base}/accounts/${{acct}}"
          into: info
          retries: 0
      - map:
          bad: CAST(CASE WHEN amount % 7 = 0 THEN 'x' ELSE '1' END AS INT)
          name: info.name
      - drop: [info]
    to:
      even:
        lake: {{}}
      latest:
        postgres:
          url: {pg}
          table: latest
          key: acct
      serving:
        redis:
          url: {redis}
          key: "'acct:' || CAST(acct AS VARCHAR)"
  failures:
    from: p__dlq
    steps:
      - map:
          id: record.event_id
    to:
      dlq_copy:
        lake: {{}}
"#,
        pg = pg.url(),
        redis = redis.url()
    );
    let mut s = Server::new_in(tmp.path(), &cfg);
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
                    match client.post(&url).body(crash_events(start, n)).send().await {
                        Ok(r) if r.status() == 200 => {
                            acked.lock().unwrap().extend(start..start + n);
                            // Sent again (a client retrying): the dedup step keeps one copy.
                            let _ = client.post(&url).body(crash_events(start, n)).send().await;
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
    s.wait_landed("p__dlq").await;

    let count = |rows: &[serde_json::Value], col: &str| {
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
    // amount = id: the filter keeps even ids, the service fails account 14, the map fails on
    // multiples of 7.
    let lake_rows = s.query("SELECT event_id, acct, name, _partition, _offset FROM even").await;
    let lake = count(&lake_rows, "event_id");
    let dlq = count(&s.query("SELECT raw FROM p__dlq").await, "raw");
    // The dead-letter stream, as read by another pipeline.
    let dlq_stream = count(&s.query("SELECT id FROM dlq_copy").await, "id");
    let acked = acked.lock().unwrap();
    let unknown = unknown.lock().unwrap();
    let in_unknown = |id: usize| unknown.iter().any(|(a, b)| (*a..*b).contains(&id));
    let passes = |id: usize| id % 2 == 0 && id % 50 != 14 && id % 7 != 0;
    let fails = |id: usize| id % 2 == 0 && (id % 50 == 14 || id % 7 == 0);
    for (name, seen, want) in [("lake", &lake, &passes as &dyn Fn(usize) -> bool), ("dlq", &dlq, &fails), ("dlq stream", &dlq_stream, &fails)] {
        let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(dups.is_empty(), "{name}: duplicates (seed {seed}): {dups:?}");
        let missing: Vec<_> = acked.iter().filter(|id| want(**id) && !seen.contains_key(id)).take(5).collect();
        assert!(missing.is_empty(), "{name}: acknowledged records missing (seed {seed}): {missing:?}");
        let wrong: Vec<_> = seen.keys().filter(|id| !want(**id) || (!acked.contains(id) && !in_unknown(**id))).take(5).collect();
        assert!(wrong.is_empty(), "{name}: records that do not belong (seed {seed}): {wrong:?}");
    }
    assert!(lake_rows.iter().all(|r| r["name"] == format!("acct-{}", r["acct"])), "enriched names");
    assert!(!acked.is_empty());

    // PostgreSQL and Redis: per account, the lake row latest in its partition's log order.
    let mut latest: HashMap<i64, (i64, String)> = HashMap::new();
    for r in &lake_rows {
        let (acct, off) = (r["acct"].as_i64().unwrap(), r["_offset"].as_i64().unwrap());
        if latest.get(&acct).is_none_or(|(o, _)| *o < off) {
            latest.insert(acct, (off, r["event_id"].as_str().unwrap().to_string()));
        }
    }
    let want: HashMap<i64, String> = latest.into_iter().map(|(a, (_, e))| (a, e)).collect();
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client.query("SELECT acct, event_id, name FROM latest", &[]).await.unwrap();
    let in_pg: HashMap<i64, String> = rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))).collect();
    assert_eq!(in_pg, want, "PostgreSQL holds the latest record per account (seed {seed})");
    let mut rc = redis::Client::open(redis.url().as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for (acct, event) in &want {
        let v: String = redis::cmd("GET").arg(format!("acct:{acct}")).query_async(&mut rc).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["event_id"], event.as_str(), "Redis acct:{acct} (seed {seed})");
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("acct:*").query_async(&mut rc).await.unwrap();
    assert_eq!(keys.len(), want.len(), "Redis holds no account the lake does not");

    let log = std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default();
    eprintln!(
        "pipeline crash loop ok: {} acknowledged, {} in the lake, {} dead letters, {} accounts; {} injected aborts, {} re-runs skipped rows",
        acked.len(),
        lake.len(),
        dlq.len(),
        want.len(),
        log.matches("SLUICE_FAULT_CRASH_PIPELINE: aborting").count(),
        log.matches("skipping rows the table already holds").count()
    );
    let _ = s.stop();
}

/// An enrichment service on loopback: `/accounts/{id}` answers `{"id": id, "name": "acct-<id>"}`,
/// except id `fail`, which fails (500) every time.
async fn accounts_service(fail: i64) -> String {
    use axum::extract::Path;
    let app = axum::Router::new().route(
        "/accounts/{id}",
        axum::routing::get(move |Path(id): Path<i64>| async move {
            if id == fail {
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
    let base = accounts_service(13).await;
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

/// A new lake table whose first flush fits no one schema: two streams into one table, `v` an
/// integer in one and a double in the other. Their records were written before the pipeline
/// existed, so its first flush takes both; the commit that would create the table with them
/// is refused, so the table is created from the first stream's schema, widened to double, and
/// takes every record: none lost, none a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_flush_of_two_schemas_widens_the_new_table_and_loses_nothing() {
    let base = "lake:\n  flush_interval: 100ms\nstreams:\n  ints: {}\n  doubles: {}\n";
    let s = Server::start(base).await;
    let rows = |prefix: &str, v: &dyn Fn(usize) -> String| -> String {
        (0..50).map(|k| format!("{{\"event_id\":\"{prefix}{k}\",\"ts\":\"2026-01-05T10:00:00Z\",\"v\":{}}}\n", v(k))).collect()
    };
    assert_eq!(s.post("ints", rows("i", &|k| k.to_string())).await.0, 200);
    assert_eq!(s.post("doubles", rows("d", &|k| format!("{k}.5"))).await.0, 200);
    let pipeline = "pipelines:\n  both:\n    from: [ints, doubles]\n    to:\n      mixed:\n        lake: {}\n";
    std::fs::write(&s.config, format!("listen: 127.0.0.1:{}\ndata_dir: {}\n{base}{pipeline}", s.port, s.dir.join("data").display())).unwrap();
    let (code, out, err) = cli(&["reload", "--url", &s.url("")]);
    assert_eq!(code, 0, "{out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p = pipelines_json(&s).await;
        let p = &p["pipelines"][0];
        if p["records_in"] == 100 && p["lag"] == 0 && p["sinks"][0]["records"] == 100 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pipeline did not land both streams: {p}\n{}", s.server_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.scalar("SELECT count(*) FROM mixed").await, 100.0);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM mixed").await, 100.0);
    // 0..49 twice, and 50 halves.
    assert_eq!(s.scalar("SELECT sum(v) FROM mixed").await, 2.0 * 1225.0 + 25.0);
    assert_eq!(s.query("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'mixed__dlq'").await[0]["n"], 0);
    // The fallback, not a first flush of one stream and a second of the other: the table's
    // first version was made empty (the first flush would have created it with its rows),
    // and widened after.
    let v0 = std::fs::read_to_string(s.lake().join("mixed").join("_delta_log").join("00000000000000000000.json")).unwrap();
    assert!(!v0.contains("\"add\""), "{v0}");
    assert!(s.server_log().contains("widening columns"), "{}", s.server_log());
}

fn pipelines_json(s: &Server) -> impl std::future::Future<Output = serde_json::Value> + '_ {
    async move { serde_json::from_str(&s.client.get(s.url("/v1/pipelines")).send().await.unwrap().text().await.unwrap()).unwrap() }
}

/// `sluice reload` and SIGHUP while records keep arriving: a pipeline is changed, one added,
/// removed and added again; a broken edit is refused. Every table ends with each acknowledged
/// record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_during_sustained_ingest_loses_and_duplicates_nothing() {
    let base = "lake:\n  flush_interval: 50ms\nstreams:\n  events:\n    partitions: 2\npipelines:\n  a:\n    from: events\n    steps:\n      - filter: amount % 2 = 0\n";
    let a_v1 = format!("{base}      - map:\n          v: 1\n    to:\n      a_even:\n        lake: {{}}\n");
    let a_v2 = format!("{base}      - map:\n          v: 2\n    to:\n      a_even:\n        lake: {{}}\n");
    let b = "  b:\n    from: events\n    to:\n      b_all:\n        lake: {}\n";
    let mut s = Server::start(&a_v1).await;
    let write_cfg = |s: &Server, body: &str| {
        std::fs::write(&s.config, format!("listen: 127.0.0.1:{}\ndata_dir: {}\n{body}", s.port, s.dir.join("data").display())).unwrap()
    };
    let url = s.url("");
    let reload = |url: &str| cli(&["reload", "--url", url]);

    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (client, post, acked, stop) = (s.client.clone(), s.url("/v1/streams/events/events"), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&post).body(events(next, 50)).send().await.unwrap();
                assert_eq!(r.status(), 200);
                acked.lock().unwrap().extend(next..next + 50);
                next += 50;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let pause = || tokio::time::sleep(Duration::from_millis(400));
    // The first definition has landed records before it is changed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.query("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'a_even'").await[0]["n"] == 0
        || s.scalar("SELECT count(*) FROM a_even").await == 0.0
    {
        assert!(std::time::Instant::now() < deadline, "nothing landed under the first definition: {}", s.server_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Change a, add b: with the CLI.
    write_cfg(&s, &format!("{a_v2}{b}"));
    let (code, out, err) = reload(&url);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("added [b], changed [a]"), "{out}");
    pause().await;
    // A broken edit changes nothing and says where it is broken.
    let b_broken = "  b:\n    from: events\n    steps:\n      - filter: \"amount >\"\n    to:\n      b_all:\n        lake: {}\n";
    write_cfg(&s, &format!("{a_v2}{b_broken}"));
    let (code, _, err) = reload(&url);
    assert_ne!(code, 0);
    assert!(err.contains("sluice.yaml:") && err.contains("filter"), "{err}");
    // Remove b: with SIGHUP.
    write_cfg(&s, &a_v2);
    let pid = s.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pipelines_json(&s).await["pipelines"].as_array().unwrap().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not remove b: {}", s.server_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pause().await;
    // Add b again: it resumes from the start of the log; its table skips what it holds.
    write_cfg(&s, &format!("{a_v2}{b}"));
    let (code, out, err) = reload(&url);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("added [b]") && out.contains("unchanged [a]"), "{out}");
    pause().await;
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    s.wait_landed("events").await;

    let acked = acked.lock().unwrap().clone();
    for (table, want) in [("a_even", acked.iter().filter(|i| *i % 2 == 0).copied().collect::<Vec<_>>()), ("b_all", acked.clone())] {
        let rows = s.query(&format!("SELECT event_id FROM {table}")).await;
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for r in &rows {
            *seen.entry(r["event_id"].as_str().unwrap()[1..].parse().unwrap()).or_default() += 1;
        }
        let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(dups.is_empty(), "{table}: duplicates {dups:?}");
        let missing: Vec<_> = want.iter().filter(|i| !seen.contains_key(i)).take(5).collect();
        assert!(missing.is_empty(), "{table}: missing {missing:?} of {}", want.len());
        assert_eq!(seen.len(), want.len(), "{table}: records that were never sent");
    }
    // The change took effect mid-stream: early records have v = 1, later ones v = 2.
    assert!(s.scalar("SELECT count(*) FROM a_even WHERE v = 1").await > 0.0);
    assert!(s.scalar("SELECT count(*) FROM a_even WHERE v = 2").await > 0.0);
    eprintln!("reload under ingest ok: {} records acknowledged", acked.len());
    let _ = s.stop();
}

/// Dead letters replayed after a fix (once only), a lake table re-read into another pipeline,
/// and a stream reprocessed from a time: `sluice replay` in its three forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_dead_letters_tables_and_streams() {
    let head = "lake:\n  flush_interval: 50ms\nstreams:\n  events: {}\n  copies: {}\n  other: {}\npipelines:\n  q:\n    from: other\n    to:\n      archive_copy:\n        lake: {}\n  p:\n    from: events\n    steps:\n      - map:\n";
    let tail = "    to:\n      t:\n        lake: {}\n      c:\n        stream:\n          stream: copies\n";
    let v1 = format!("{head}          n: CAST(note AS INT)\n{tail}");
    let v2 = format!("{head}          n: COALESCE(TRY_CAST(note AS INT), -1)\n{tail}");
    let s = Server::start(&v1).await;
    let url = s.url("");
    let body: String = (0..20).map(|i| format!("{{\"event_id\":\"e{i}\",\"note\":\"{}\"}}\n", if i % 2 == 0 { "x" } else { "1" })).collect();
    assert_eq!(s.post("events", body).await.0, 200);
    s.wait_landed("events").await;
    assert_eq!(s.scalar("SELECT count(*) FROM t").await, 10.0);
    assert_eq!(s.scalar("SELECT count(*) FROM p__dlq").await, 10.0);

    // Fix the step, then replay the dead letters through it.
    std::fs::write(&s.config, format!("listen: 127.0.0.1:{}\ndata_dir: {}\n{v2}", s.port, s.dir.join("data").display())).unwrap();
    let (code, out, err) = cli(&["reload", "--url", &url]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["replay", "--dlq", "p", "--url", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("replaying 10 records of p__replay"), "{err}");
    s.wait_landed("events").await;
    assert_eq!(s.scalar("SELECT count(*) FROM t").await, 20.0);
    assert_eq!(s.scalar("SELECT count(*) FROM t WHERE n = -1").await, 10.0);
    // Replayed once only.
    let (code, out, err) = cli(&["replay", "--dlq", "p", "--url", &url, "--quiet"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"records\":0"), "{out}");

    // Backfill: the rows of t (the archive) into pipeline q, with a condition.
    let (code, out, err) = cli(&["replay", "--pipeline", "q", "--from-table", "t", "--where", "n = -1", "--url", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(s.scalar("SELECT count(*) FROM archive_copy").await, 10.0);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM archive_copy WHERE n = -1").await, 10.0);

    // Reprocess the stream from a time before everything: the stream sink gets every record
    // again; table t keeps exactly one copy of each.
    s.wait_landed("copies").await;
    let before = s.scalar("SELECT count(*) FROM copies").await;
    assert_eq!(before, 20.0);
    let (code, out, err) = cli(&["replay", "--pipeline", "p", "--stream", "events", "--from", "2020-01-01", "--url", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"from\":[0,0,0,0]"), "every partition rewound to its start: {out}");
    s.wait_landed("copies").await;
    // 20 so far (10 that passed, 10 replayed dead letters); now all 20 of events pass.
    assert_eq!(s.scalar("SELECT count(*) FROM copies").await, 40.0, "every record of events sent again");
    assert_eq!(s.scalar("SELECT count(*) FROM t").await, 20.0);

    // Refusals name the problem.
    let (code, _, err) = cli(&["replay", "--pipeline", "p", "--stream", "events", "--from", "yesterday", "--url", &url]);
    assert_ne!(code, 0);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = cli(&["replay", "--pipeline", "nope", "--from-table", "t", "--url", &url]);
    assert_ne!(code, 0);
    assert!(err.contains("no pipeline \"nope\""), "{err}");
}

/// `--from-table` streams the table: it may be far larger than one query result may be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_table_larger_than_a_query_result() {
    let cfg = "lake:\n  flush_interval: 50ms\nlimits:\n  max_query_result_bytes: 1024\nstreams:\n  events: {}\npipelines:\n  q:\n    from: events\n    to:\n      archive:\n        lake: {}\n";
    let mut s = Server::start(cfg).await;
    let url = s.url("");
    let body: String = (0..3000).map(|i| format!("{{\"event_id\":\"e{i}\",\"note\":\"some text to make the rows wide {i}\"}}\n")).collect();
    assert_eq!(s.post("events", body).await.0, 200);
    s.wait_landed("events").await;
    assert_eq!(s.scalar("SELECT count(*) FROM archive").await, 3000.0);
    // The table is over the result limit as one query...
    let r = s.client.post(s.url("/v1/query")).body("SELECT * FROM archive").send().await.unwrap();
    let (status, text) = (r.status(), r.text().await.unwrap());
    assert!(!status.is_success() && text.contains("max_query_result_bytes"), "{status} {text}");
    // ...and replays whole (into itself: the pipeline archives it again).
    let (code, out, err) = cli(&["replay", "--pipeline", "q", "--from-table", "archive", "--url", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("replaying 3000 records"), "{err}");
    s.wait_landed("events").await;
    assert_eq!(s.scalar("SELECT count(*) FROM archive").await, 6000.0);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM archive").await, 3000.0);
    let _ = s.stop();
}

/// `sluice tap` prints live records after a step; an unknown step is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_prints_live_records_passing_a_step() {
    let s = Server::start(RIDES).await;
    let url = s.url("");
    let child = std::process::Command::new(BIN)
        .args(["tap", "rides", "0:filter", "--limit", "5", "--url", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    // Keep sending until the tap has seen its five records (it sees only what passes after
    // it subscribed).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    while !waiter.is_finished() {
        assert!(std::time::Instant::now() < deadline, "tap printed nothing in 60s");
        assert_eq!(s.post("events", events(next, 30)).await.0, 200);
        next += 30;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = waiter.join().unwrap();
    assert!(out.status.success(), "tap (pid {pid}): {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    // After the filter: no paris, and the map has not run yet.
    assert!(lines.iter().all(|l| l["region"] != "paris" && l.get("amount_eur").is_none()), "{lines:?}");

    let (code, _, err) = cli(&["tap", "rides", "validate", "--url", &url]);
    assert_ne!(code, 0);
    assert!(err.contains("no step \"validate\"") && err.contains("1:map"), "{err}");
}

/// `lookup` against a lake table, Redis and PostgreSQL (servers the test starts): rows joined
/// under a field, refreshed on schedule, a missing row sent to the dead letters on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_joins_rows_from_lake_redis_and_postgres() {
    let pg = servers::PgServer::start();
    let redis = servers::RedisServer::start();
    let (pgc, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    pgc.batch_execute(
        "CREATE TABLE regions (code text PRIMARY KEY, name text, vat int); INSERT INTO regions VALUES ('de', 'Germany', 19), ('fr', 'France', 20);
         CREATE TABLE customers (id int PRIMARY KEY, name text); INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 20000) g; ANALYZE customers",
    )
    .await
    .unwrap();
    let scans = "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'customers'";
    // The setup's own scans (ANALYZE reads the table) are counted before the baseline.
    pgc.batch_execute("SELECT pg_stat_force_next_flush()").await.unwrap();
    pgc.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
    let r = pgc.query_one(scans, &[]).await.unwrap();
    let (seq0, idx0): (i64, i64) = (r.get(0), r.get(1));
    let mut rc = redis::Client::open(redis.url().as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for (k, v) in [("acct:1", r#"{"tier":"gold","limit":100}"#), ("acct:2", r#"{"tier":"basic","limit":5}"#)] {
        let _: () = redis::cmd("SET").arg(k).arg(v).query_async(&mut rc).await.unwrap();
    }
    let cfg = format!(
        r#"lake:
  flush_interval: 50ms
streams:
  events: {{}}
  plans: {{}}
pipelines:
  p:
    from: events
    steps:
      - lookup:
          key: plan_id
          into: plan
          from: {{ lake: {{ table: plans, column: id }} }}
          refresh: 50ms
      - lookup:
          key: acct
          into: account
          from: {{ redis: {{ url: "{redis}", prefix: "acct:" }} }}
      - lookup:
          key: region
          into: reg
          from: {{ postgres: {{ url: "{pg}", table: regions, column: code }} }}
          refresh: 50ms
          on_missing: dead_letter
      - lookup:
          key: cust
          into: customer
          from: {{ postgres: {{ url: "{pg}", table: customers, column: id }} }}
    to:
      out:
        lake: {{}}
"#,
        redis = redis.url(),
        pg = pg.url()
    );
    let s = Server::start(&cfg).await;
    assert_eq!(s.post("plans", "{\"id\":10,\"name\":\"pro\"}\n{\"id\":11,\"name\":\"free\"}\n").await.0, 200);
    s.wait_landed("plans").await;
    let body = "{\"event_id\":\"a\",\"plan_id\":10,\"acct\":1,\"region\":\"de\",\"cust\":\"7\"}\n\
                {\"event_id\":\"b\",\"plan_id\":11,\"acct\":2,\"region\":\"fr\",\"cust\":\"19999\"}\n\
                {\"event_id\":\"c\",\"plan_id\":12,\"acct\":3,\"region\":\"de\",\"cust\":\"30000\"}\n\
                {\"event_id\":\"d\",\"plan_id\":10,\"acct\":1,\"region\":\"xx\",\"cust\":\"7\"}\n";
    assert_eq!(s.post("events", body).await.0, 200);
    s.wait_landed("events").await;
    let rows = s.query("SELECT event_id, plan.name AS plan, account.tier AS tier, reg.name AS region, reg.vat AS vat, customer.name AS cust FROM out ORDER BY event_id").await;
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"event_id":"a","plan":"pro","tier":"gold","region":"Germany","vat":19,"cust":"c7"}),
            serde_json::json!({"event_id":"b","plan":"free","tier":"basic","region":"France","vat":20,"cust":"c19999"}),
            // No plan 12, no account 3, no customer 30000: NULL (on_missing: null).
            serde_json::json!({"event_id":"c","plan":null,"tier":null,"region":"Germany","vat":19,"cust":null}),
        ]
    );
    // The integer key column was compared as an integer: its primary key index answered, and
    // the table was never scanned whole. (Statistics reach pg_stat_user_tables with a delay.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = pgc.query_one(scans, &[]).await.unwrap();
        let (seq, idx): (i64, i64) = (r.get::<_, i64>(0) - seq0, r.get::<_, i64>(1) - idx0);
        if idx > 0 || std::time::Instant::now() > deadline {
            assert!(idx > 0 && seq == 0, "customers: {seq} sequential scans, {idx} index scans");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dl = s.query("SELECT step, error FROM p__dlq").await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0]["step"], "2:lookup");
    assert!(dl[0]["error"].as_str().unwrap().contains("no row for key xx"), "{dl:?}");

    // Sources change; after `refresh` the step sees the new rows.
    pgc.batch_execute("UPDATE regions SET vat = 21 WHERE code = 'de'").await.unwrap();
    assert_eq!(s.post("plans", "{\"id\":12,\"name\":\"team\"}\n").await.0, 200);
    s.wait_landed("plans").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.post("events", "{\"event_id\":\"e\",\"plan_id\":12,\"acct\":2,\"region\":\"de\"}\n").await.0, 200);
    s.wait_landed("events").await;
    let e = s.query("SELECT plan.name AS plan, reg.vat AS vat FROM out WHERE event_id = 'e'").await;
    assert_eq!(e, vec![serde_json::json!({"plan":"team","vat":21})]);
    // A key that is no integer finds no customer (and is no error).
    assert_eq!(s.post("events", "{\"event_id\":\"f\",\"plan_id\":12,\"acct\":2,\"region\":\"de\",\"cust\":\"abc\"}\n").await.0, 200);
    s.wait_landed("events").await;
    let f = s.query("SELECT customer.name AS cust FROM out WHERE event_id = 'f'").await;
    assert_eq!(f, vec![serde_json::json!({"cust":null})]);
    let p = pipelines_json(&s).await;
    assert!(p["pipelines"][0]["steps"][1]["cache_hits"].as_u64().unwrap() >= 1, "{p}");
}

/// A real HTTPS service (Python's http.server behind ssl): `GET /accounts/{id}` answers
/// `{"id", "name"}`; `POST /hook` adds the JSON array's length to the number in `counter`.
struct HttpsService {
    child: std::process::Child,
    port: u16,
}

impl Drop for HttpsService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn https_service(cert: &std::path::Path, key: &std::path::Path, counter: &std::path::Path) -> HttpsService {
    const SCRIPT: &str = r#"
import http.server, json, ssl, sys
total = 0
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, body):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        i = int(self.path.rsplit("/", 1)[1])
        self.reply(json.dumps({"id": i, "name": "acct-%d" % i}).encode())
    def do_POST(self):
        global total
        n = int(self.headers.get("content-length", 0))
        total += len(json.loads(self.rfile.read(n)))
        open(sys.argv[3], "w").write(str(total))
        self.reply(b"{}")
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
srv = S(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args([cert, key, counter])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    HttpsService { port: line.trim().parse().unwrap_or_else(|_| panic!("https service did not start: {line:?}")), child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_enrichment_and_webhook_trust_a_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = servers::private_ca(tmp.path());
    let counter = tmp.path().join("hook-count");
    let svc = https_service(&cert, &key, &counter);
    let base = format!("https://localhost:{}", svc.port);
    let ca = ca.display();
    let cfg = format!(
        "lake:\n  flush_interval: 100ms\nstreams:\n  events: {{}}\npipelines:\n  enriched:\n    from: events\n    steps:\n      - enrich:\n          url: \"{base}/accounts/${{account.id}}\"\n          ca_file: {ca}\n          into: acct\n          retries: 2\n          backoff: 50ms\n      - drop: [account, tags]\n    to:\n      accounts:\n        lake: {{}}\n      hook:\n        webhook:\n          url: {base}/hook\n          ca_file: {ca}\n          batch_records: 100\n  untrusted:\n    from: events\n    steps:\n      - enrich:\n          url: \"{base}/accounts/${{account.id}}\"\n          into: acct\n          retries: 0\n    to:\n      plain:\n        lake: {{}}\n"
    );
    let s = Server::start(&cfg).await;
    assert_eq!(s.post("events", events(0, 300)).await.0, 200);
    s.wait_landed("events").await;
    // Trusting the private CA: every record enriched over https, and all of them POSTed.
    assert_eq!(s.scalar("SELECT count(*) FROM accounts WHERE acct.name = 'acct-' || CAST(acct.id AS VARCHAR)").await, 300.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&counter).unwrap_or_default() != "300" {
        assert!(std::time::Instant::now() < deadline, "webhook got {:?} records\n{}", std::fs::read_to_string(&counter), s.server_log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Without it, the service's certificate is not trusted: every call fails, and the records
    // go to the dead letters with the reason.
    assert_eq!(s.scalar("SELECT count(*) FROM untrusted__dlq WHERE step = '0:enrich'").await, 300.0, "{:?}", s.query("SELECT error FROM untrusted__dlq LIMIT 1").await);

    // A CA file that is missing is a config error naming the key and line.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, cfg.replace(&format!("ca_file: {ca}\n          into"), "ca_file: /nonexistent/ca.pem\n          into")).unwrap();
    let (code, _, err) = cli(&["check", "-c", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("enrich.ca_file") && err.contains("/nonexistent/ca.pem"), "{err}");
}
