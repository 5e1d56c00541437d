//! Every bad request gets its status and a precise message, and stores nothing.

mod common;
use common::*;

/// Total records in the stream's log (0 if it does not exist).
async fn log_end(s: &Server, stream: &str) -> u64 {
    s.stream_info(stream).await.map_or(0, |i| i["log_end_offset"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_store_nothing() {
    let s = Server::start("limits:\n  max_body_bytes: 64KiB\n  max_decoded_bytes: 128KiB\nlake:\n  flush_interval: 50ms\n").await;
    assert_eq!(s.post("ev", events(0, 3)).await.0, 200);

    // malformed line 3 of 4: 400 naming the line, nothing of the request stored
    let body = "{\"a\":1}\n{\"a\":2}\n{\"a\":3,,}\n{\"a\":4}\n";
    let (st, err) = s.post("ev", body).await;
    assert_eq!(st, 400);
    assert!(err["error"].as_str().unwrap().contains("line 3"), "{err}");
    // a value that is not an object
    let (st, err) = s.post("ev", "{\"a\":1}\n[1,2]\n").await;
    assert_eq!(st, 400);
    assert!(err["error"].as_str().unwrap().contains("line 2"), "{err}");
    // a bad event time
    let (st, err) = s.post("ev", "{\"ts\":\"last tuesday\"}\n").await;
    assert_eq!(st, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("last tuesday"), "{err}");
    // empty body
    assert_eq!(s.post("ev", "\n\n").await.0, 400);
    // too large, as sent
    let (st, _) = s.post("ev", events(0, 1000)).await;
    assert_eq!(st, 413);
    // too large after decompression (a small zstd bomb)
    let bomb = zstd::encode_all(events(0, 2000).as_bytes(), 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let (st, err) = s.post_with("ev", bomb, &[("content-encoding", "zstd")]).await;
    assert_eq!(st, 413, "{err}");
    // unsupported and invalid encodings
    let (st, err) = s.post_with("ev", "x", &[("content-encoding", "compress")]).await;
    assert_eq!(st, 415, "{err}");
    let (st, _) = s.post_with("ev", "not gzip at all", &[("content-encoding", "gzip")]).await;
    assert_eq!(st, 400);
    // invalid stream name
    let (st, _) = s.post("Bad%20Name", events(0, 1)).await;
    assert_eq!(st, 400);
    let (st, _) = s.post("x__dlq", events(0, 1)).await;
    assert_eq!(st, 400);

    assert_eq!(log_end(&s, "ev").await, 3, "a rejected request stored something");
    s.wait_landed("ev").await;
    assert_eq!(s.scalar("SELECT count(*) FROM ev").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stream_without_auto_create_is_404() {
    let s = Server::start("auto_create_streams: false\nstreams:\n  known:\n    partitions: 2\n").await;
    let (st, err) = s.post("unknown", events(0, 1)).await;
    assert_eq!(st, 404, "{err}");
    assert!(s.stream_info("unknown").await.is_none());
    assert_eq!(s.post("known", events(0, 1)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_enforce_write_and_read_scopes() {
    let cfg = "tokens:\n  - name: writer\n    token: writer-secret-1\n    write: [app-*]\n  - name: reader\n    token_env: TEST_READER_TOKEN_UNSET_OK\n    read: [app-events]\n  - token: admin-secret-1\n    write: ['*']\n    read: ['*']\nlake:\n  flush_interval: 50ms\n";
    // token_env must be set or the server refuses to start: use inline tokens for the reader
    let cfg = cfg.replace("token_env: TEST_READER_TOKEN_UNSET_OK", "token: reader-secret-1");
    let mut s = Server::start(&cfg).await;
    let (st, _) = s.post("app-events", events(0, 5)).await;
    assert_eq!(st, 401, "no token");
    s.token = Some("wrong-token-123".into());
    assert_eq!(s.post("app-events", events(0, 5)).await.0, 401);
    s.token = Some("writer-secret-1".into());
    assert_eq!(s.post("app-events", events(0, 5)).await.0, 200);
    assert_eq!(s.post("other", events(0, 5)).await.0, 403);
    // the writer may not query
    let r = s.client.post(s.url("/v1/query")).bearer_auth("writer-secret-1").body("SELECT 1").send().await.unwrap();
    assert_eq!(r.status(), 200, "a query touching no table needs no read scope");
    let r = s.client.post(s.url("/v1/query")).bearer_auth("writer-secret-1").body("SELECT count(*) FROM \"app-events\"").send().await.unwrap();
    assert_eq!(r.status(), 403);
    s.token = Some("reader-secret-1".into());
    assert_eq!(s.post("app-events", events(0, 5)).await.0, 403, "reader may not write");
    s.token = Some("admin-secret-1".into());
    s.wait_landed("app-events").await;
    s.token = Some("reader-secret-1".into());
    assert_eq!(s.scalar("SELECT count(*) FROM \"app-events\"").await, 5.0);
    // The catalog lists every table: only a token that may read everything sees it.
    for sql in ["SHOW TABLES", "SELECT table_name FROM information_schema.tables", "SHOW COLUMNS FROM \"app-events\""] {
        let r = s.client.post(s.url("/v1/query")).bearer_auth("reader-secret-1").body(sql).send().await.unwrap();
        assert_eq!(r.status(), 403, "{sql}: {}", r.text().await.unwrap());
        let r = s.client.post(s.url("/v1/query")).bearer_auth("admin-secret-1").body(sql).send().await.unwrap();
        assert_eq!(r.status(), 200, "{sql}: {}", r.text().await.unwrap());
    }
    let r = s.client.get(s.url("/v1/streams")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let st: serde_json::Value = serde_json::from_str(&s.client.get(s.url("/v1/streams")).bearer_auth("reader-secret-1").send().await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(st["streams"].as_array().unwrap().len(), 1);
    let _ = s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_far_behind_is_503_and_full_log_is_429() {
    // The lake never flushes on its own here (1h, huge flush size), so the backlog only grows.
    let s = Server::start("lake:\n  flush_interval: 1h\n  flush_bytes: 1GiB\nlimits:\n  max_lake_lag_bytes: 1MiB\n").await;
    let mut status = 200;
    let mut sent = 0;
    while status == 200 && sent < 200 {
        let (st, _) = s.post("slow", noisy_events(sent * 1000, 1000)).await;
        status = st;
        sent += 1;
    }
    assert_eq!(status, 503, "expected 503 once the lake is over 1MiB behind");
    let r = s.client.post(s.url("/v1/streams/slow/events")).body(events(0, 1)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let end = s.stream_info("slow").await.unwrap()["log_end_offset"].as_u64().unwrap();
    assert_eq!(end, (sent as u64 - 1) * 1000, "the rejected request stored nothing");

    let s = Server::start("lake:\n  flush_interval: 1h\n  flush_bytes: 1GiB\nlimits:\n  max_log_bytes: 1MiB\n").await;
    let mut status = 200;
    let mut sent = 0;
    while status == 200 && sent < 400 {
        status = s.post("full", noisy_events(sent * 1000, 1000)).await.0;
        sent += 1;
    }
    assert_eq!(status, 429, "expected 429 once the log is over 1MiB");
}

#[test]
fn config_errors_name_file_line_key_and_stop_before_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, "listen: 127.0.0.1:0\nstreams:\n  scooters:\n    partitions: 0\n").unwrap();
    let (code, _, err) = cli(&["check", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("sluice.yaml:4:") && err.contains("streams.scooters.partitions"), "{err}");
    let (code, _, err2) = cli(&["up", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err2.contains("sluice.yaml:4:"), "{err2}");
    std::fs::write(&path, "streams:\n  a:\n    key_feild: x\n").unwrap();
    let (code, _, err) = cli(&["check", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("sluice.yaml:3:") && err.contains("key_feild"), "{err}");
    std::fs::write(&path, "streams:\n  a:\n    key_field: x\n").unwrap();
    let (code, out, _) = cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"));
}

/// Events with 64 random hex characters each, so the log cannot compress them away.
fn noisy_events(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| {
            let noise: String = (0..64).map(|_| fastrand::alphanumeric()).collect();
            format!("{{\"event_id\":\"e{i}\",\"noise\":\"{noise}\"}}\n")
        })
        .collect()
}
