//! The real binary, end to end: ingest over HTTP, land in the lake, query back.

mod common;
use common::*;
use std::io::Write;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_land_query_exact_counts_and_sums() {
    let s = Server::start("lake:\n  flush_interval: 100ms\n").await;
    // NDJSON, a JSON array, and a single pretty object.
    let (st, ack) = s.post("events", events(0, 1000)).await;
    assert_eq!(st, 200, "{ack}");
    assert_eq!(ack["records"], 1000);
    let offsets: u64 = ack["partitions"].as_array().unwrap().iter().map(|p| p["last_offset"].as_u64().unwrap() - p["first_offset"].as_u64().unwrap() + 1).sum();
    assert_eq!(offsets, 1000);
    let array = format!("[{}]", events(1000, 10).trim_end().replace('\n', ","));
    assert_eq!(s.post("events", array).await.0, 200);
    let pretty = "{\n  \"event_id\": \"e1010\",\n  \"amount\": 1010,\n  \"region\": \"paris\"\n}\n";
    assert_eq!(s.post("events", pretty).await.0, 200);
    s.wait_landed("events").await;

    assert_eq!(s.scalar("SELECT count(*) AS n FROM events").await, 1011.0);
    let expected_sum: usize = (0..1011).sum();
    assert_eq!(s.scalar("SELECT sum(amount) AS s FROM events").await, expected_sum as f64);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) AS n FROM events").await, 1011.0);
    // nested fields are structs, event dates partition the table
    assert_eq!(s.scalar("SELECT count(*) AS n FROM events WHERE account.tier = 'gold'").await, 1010.0);
    assert_eq!(s.scalar("SELECT count(*) AS n FROM events WHERE event_date = '2026-01-02'").await, 337.0);
    assert!(s.lake().join("events").join("event_date=2026-01-02").is_dir());

    // CSV and Arrow by Accept
    let r = s.client.post(s.url("/v1/query")).header("accept", "text/csv").body("SELECT count(*) AS n FROM events").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "n\n1011");
    let r = s.client.post(s.url("/v1/query")).header("accept", "application/vnd.apache.arrow.stream").body("SELECT 1 AS x").send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/vnd.apache.arrow.stream");
    assert!(r.bytes().await.unwrap().len() > 8);
    // JSON body form
    let r = s.client.post(s.url("/v1/query")).header("content-type", "application/json").body(r#"{"sql":"SELECT count(*) AS n FROM events"}"#).send().await.unwrap();
    assert_eq!(r.text().await.unwrap().parse::<serde_json::Value>().unwrap()[0]["n"], 1011);
    // bad SQL is a 400 that names the problem
    let r = s.client.post(s.url("/v1/query")).body("SELECT nope FROM events").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("nope"));

    // tables and streams APIs
    let t: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/tables")).send().await.unwrap().text().await.unwrap()).unwrap();
    let ev = t["tables"].as_array().unwrap().iter().find(|t| t["name"] == "events").unwrap();
    assert_eq!(ev["num_rows"], 1011);
    let info = s.stream_info("events").await.unwrap();
    assert_eq!(info["log_end_offset"], 1011);
    assert_eq!(info["landed_offset"], 1011);
    assert_eq!(info["lag"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_send_and_query() {
    let s = Server::start("lake:\n  flush_interval: 100ms\n").await;
    let file = s.dir.join("in.ndjson");
    std::fs::write(&file, events(0, 2500)).unwrap();
    let (code, _, err) = cli(&["send", "clicks", file.to_str().unwrap(), "--url", &s.url(""), "--batch", "700", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    s.wait_landed("clicks").await;
    let lake = s.lake();
    let (code, out, err) = cli(&["query", "SELECT count(*) AS n, sum(amount) AS s FROM clicks", "--lake", lake.to_str().unwrap(), "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    let expected: usize = (0..2500).sum();
    assert_eq!(out.trim(), format!("n,s\n2500,{expected}"));
    let (code, out, _) = cli(&["query", "SELECT count(*) AS n FROM clicks", "--lake", lake.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["n"], 2500);
    let (code, out, _) = cli(&["query", "SELECT count(*) AS n FROM clicks", "--lake", lake.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("2500"), "{out}");
    let (code, _, err) = cli(&["query", "SELEC 1", "--lake", lake.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(!err.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies() {
    let s = Server::start("lake:\n  flush_interval: 100ms\n").await;
    let body = events(0, 300);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let (st, ack) = s.post_with("z", gz.finish().unwrap(), &[("content-encoding", "gzip")]).await;
    assert_eq!(st, 200, "{ack}");
    let (st, _) = s.post_with("z", zstd::encode_all(events(300, 300).as_bytes(), 3).unwrap(), &[("content-encoding", "zstd")]).await;
    assert_eq!(st, 200);
    let mut br = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
        w.write_all(events(600, 300).as_bytes()).unwrap();
    }
    let (st, _) = s.post_with("z", br, &[("content-encoding", "br")]).await;
    assert_eq!(st, 200);
    s.wait_landed("z").await;
    assert_eq!(s.scalar("SELECT count(*) FROM z").await, 900.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_evolution_and_dead_letters() {
    let s = Server::start("lake:\n  flush_interval: 50ms\n").await;
    assert_eq!(s.post("evo", "{\"id\":1,\"n\":1}\n{\"id\":2,\"n\":2}\n").await.0, 200);
    s.wait_landed("evo").await;
    // a new field, a nested new field, int -> float widening within a new column
    assert_eq!(s.post("evo", "{\"id\":3,\"n\":3,\"extra\":\"x\",\"obj\":{\"a\":1}}\n{\"id\":4,\"obj\":{\"a\":2.5,\"b\":true}}\n").await.0, 200);
    s.wait_landed("evo").await;
    // an unresolvable conflict: n is a number column, this n is a string
    assert_eq!(s.post("evo", "{\"id\":5,\"n\":\"five\"}\n{\"id\":6,\"n\":6}\n").await.0, 200);
    s.wait_landed("evo").await;
    assert_eq!(s.scalar("SELECT count(*) FROM evo").await, 5.0);
    assert_eq!(s.scalar("SELECT sum(n) FROM evo").await, 12.0);
    assert_eq!(s.scalar("SELECT count(extra) FROM evo").await, 1.0);
    assert_eq!(s.scalar("SELECT sum(obj.a) FROM evo").await, 3.5);
    let dlq = s.query("SELECT raw, reason FROM evo__dlq").await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert!(dlq[0]["raw"].as_str().unwrap().contains("five"));
    assert!(dlq[0]["reason"].as_str().unwrap().contains("\"n\""), "{}", dlq[0]["reason"]);
    // int -> float widening of an existing column
    assert_eq!(s.post("evo", "{\"id\":7,\"n\":0.5}\n").await.0, 200);
    s.wait_landed("evo").await;
    assert_eq!(s.scalar("SELECT sum(n) FROM evo").await, 12.5);
    assert_eq!(s.scalar("SELECT count(*) FROM evo").await, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_and_sigterm_lands_acknowledged() {
    // A long flush interval: only the shutdown flush can land the data.
    let mut s = Server::start("lake:\n  flush_interval: 1h\n").await;
    for i in 0..5 {
        assert_eq!(s.post("keep", events(i * 100, 100)).await.0, 200);
    }
    assert_eq!(s.stop(), Some(0), "SIGTERM must exit 0");
    s.spawn().await;
    // landed at shutdown, before the restart could land anything (flush is 1h)
    assert_eq!(s.scalar("SELECT count(*) FROM keep").await, 500.0);
    assert_eq!(s.post("keep", events(500, 100)).await.0, 200);
    s.kill9();
    std::fs::write(&s.config, std::fs::read_to_string(&s.config).unwrap().replace("1h", "50ms")).unwrap();
    s.spawn().await;
    s.wait_landed("keep").await;
    assert_eq!(s.scalar("SELECT count(*) FROM keep").await, 600.0);
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM keep").await, 600.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints() {
    let s = Server::start("lake:\n  flush_interval: 50ms\n").await;
    assert_eq!(s.post("m", events(0, 10)).await.0, 200);
    s.wait_landed("m").await;
    let r = s.client.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in ["sluice_ingest_records_total", "sluice_ingest_bytes_total", "sluice_log_sync_seconds", "sluice_lake_commit_seconds", "sluice_lake_rows_total", "sluice_lake_lag_records"] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
    assert!(m.contains("sluice_ingest_records_total{stream=\"m\"} 10"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_deltalake_reads_the_same_table() {
    let s = Server::start("lake:\n  flush_interval: 50ms\nstreams:\n  scooters:\n    partition_by: [region]\n").await;
    assert_eq!(s.post("scooters", events(0, 3000)).await.0, 200);
    s.wait_landed("scooters").await;
    let ours = (s.scalar("SELECT count(*) FROM scooters").await, s.scalar("SELECT sum(amount) FROM scooters").await);
    // os._exit: python deltalake 1.6 with pyarrow 26 sometimes aborts during interpreter
    // teardown ("terminate called without an active exception"), after the work is done.
    let script = r#"
import os, sys
try:
    from deltalake import DeltaTable
    import pyarrow.compute as pc
except ImportError as e:
    sys.exit(f"python deltalake/pyarrow missing ({e}): run scripts/test.sh, which installs them")
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
print(t.num_rows, pc.sum(t.column("amount")).as_py())
sys.stdout.flush()
os._exit(0)
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(s.lake().join("scooters")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!((nums[0], nums[1]), ours);
    assert_eq!(ours.0, 3000.0);
    assert!(s.lake().join("scooters").join("event_date=2026-01-01").join("region=madrid").is_dir());
}

/// A stream's log codec changes by `sluice reload` (zstd, then none, then lz4): each batch
/// keeps the codec it was written with, and every one of them is read back into the lake,
/// also after a kill -9 and restart (the sink re-reads what it had not landed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_changes_by_reload_keep_every_batch_readable() {
    let mut s = Server::start("lake:\n  flush_interval: 1h\nstreams:\n  c:\n    partitions: 1\n    codec: zstd\n    zstd_level: 3\n").await;
    let url = s.url("");
    for (i, (yaml, shown)) in [("codec: zstd\n    zstd_level: 3\n", "zstd (level 3)"), ("codec: none\n", "none"), ("codec: lz4\n", "lz4")].iter().enumerate() {
        let cfg = std::fs::read_to_string(&s.config).unwrap();
        let head = cfg.split("    codec:").next().unwrap().to_string();
        std::fs::write(&s.config, format!("{head}    {yaml}")).unwrap();
        let (code, _, err) = cli(&["reload", "--url", &url]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(s.stream_info("c").await.unwrap()["codec"], *shown);
        assert_eq!(s.post("c", events(i * 100, 100)).await.0, 200);
    }
    // Nothing landed yet (1h flush): after kill -9 the restarted sink reads all three kinds.
    s.kill9();
    std::fs::write(&s.config, std::fs::read_to_string(&s.config).unwrap().replace("1h", "50ms")).unwrap();
    s.spawn().await;
    s.wait_landed("c").await;
    assert_eq!(s.scalar("SELECT count(DISTINCT event_id) FROM c").await, 300.0);
    assert_eq!(s.scalar("SELECT count(*) FROM c").await, 300.0);
}
