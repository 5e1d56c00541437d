//! Compression on the wire and in the log: the stream's trained dictionary over HTTP,
//! request bodies compressed with it, stale ids rejected by name, responses compressed
//! per Accept-Encoding, and `sluice stream stats`.

mod common;

use common::*;
use serde_json::Value;
use std::io::Read;
use std::time::{Duration, Instant};

const CONFIG: &str = "streams:\n  ev:\n    dictionary:\n      train_after_records: 300\n      sample_records: 2000\n      max_size: 16KiB\n";

async fn get(s: &Server, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = s.client.get(s.url(path));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

/// Waits for the server to train the stream's first dictionary; returns (id, content).
async fn wait_dictionary(s: &Server) -> (u32, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = get(s, "/v1/streams/ev/dictionary", &[]).await;
        if r.status() == 200 {
            let id = r.headers()["sluice-dictionary-id"].to_str().unwrap().parse().unwrap();
            return (id, r.bytes().await.unwrap().to_vec());
        }
        assert_eq!(r.status(), 404);
        assert!(Instant::now() < deadline, "no dictionary trained in 90 s:\n{}", s.server_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn compress_with(dict: &[u8], body: &str) -> Vec<u8> {
    zstd::bulk::Compressor::with_dictionary(3, dict).unwrap().compress(body.as_bytes()).unwrap()
}

async fn train(s: &Server) -> (u32, Vec<u8>) {
    let r = s.client.post(s.url("/v1/streams/ev/dictionary")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let r = get(s, "/v1/streams/ev/dictionary", &[]).await;
    let id: u32 = r.headers()["sluice-dictionary-id"].to_str().unwrap().parse().unwrap();
    assert_eq!(u64::from(id), info["id"].as_u64().unwrap());
    (id, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dictionary_on_the_wire_and_in_the_log() {
    let s = Server::start(CONFIG).await;
    // One event per request, like a mobile SDK.
    for i in 0..400 {
        let (st, _) = s.post("ev", events(i, 1)).await;
        assert_eq!(st, 200);
    }
    let (id1, dict1) = wait_dictionary(&s).await;
    assert_eq!(id1, 1);
    assert_eq!(s.stream_info("ev").await.unwrap()["dictionary"], 1);

    // A single event compressed with the dictionary is far smaller than without it.
    let one = events(1000, 1);
    let with = compress_with(&dict1, &one);
    let without = zstd::bulk::compress(one.as_bytes(), 3).unwrap();
    assert!(with.len() * 2 < without.len(), "{} vs {}", with.len(), without.len());
    let (st, ack) = s.post_with("ev", with, &[("content-encoding", "zstd"), ("sluice-dictionary-id", "1")]).await;
    assert_eq!(st, 200, "{ack}");

    // Rotations: the current and the previous dictionary are accepted, older ones are not.
    let (id2, dict2) = train(&s).await;
    for i in 0..100 {
        let (st, _) = s.post("ev", events(3000 + i, 1)).await;
        assert_eq!(st, 200);
    }
    let (id3, dict3) = train(&s).await;
    assert_ne!(dict2, dict3);
    assert_eq!((id2, id3), (2, 3));
    for (id, dict, n) in [(3, &dict3, 1001), (2, &dict2, 1002)] {
        let (st, ack) = s.post_with("ev", compress_with(dict, &events(n, 3)), &[("content-encoding", "zstd"), ("sluice-dictionary-id", &id.to_string())]).await;
        assert_eq!(st, 200, "dictionary {id}: {ack}");
    }
    let (st, err) = s.post_with("ev", compress_with(&dict1, &events(2000, 1)), &[("content-encoding", "zstd"), ("sluice-dictionary-id", "1")]).await;
    assert_eq!(st, 400);
    let msg = err["error"].as_str().unwrap();
    assert!(msg.contains("dictionary 1") && msg.contains("retired") && msg.contains("current one is 3"), "{msg}");
    let (st, err) = s.post_with("ev", compress_with(&dict3, &events(2000, 1)), &[("content-encoding", "zstd"), ("sluice-dictionary-id", "77")]).await;
    assert_eq!(st, 400);
    assert!(err["error"].as_str().unwrap().contains("dictionary 77") && err["error"].as_str().unwrap().contains("unknown"), "{err}");
    // The header without zstd, a bad id, or a body compressed with another dictionary.
    let (st, err) = s.post_with("ev", events(2000, 1), &[("sluice-dictionary-id", "3")]).await;
    assert_eq!(st, 400, "{err}");
    let (st, _) = s.post_with("ev", compress_with(&dict3, &events(2000, 1)), &[("content-encoding", "zstd"), ("sluice-dictionary-id", "three")]).await;
    assert_eq!(st, 400);
    let (st, err) = s.post_with("ev", compress_with(&dict2, &events(2000, 1)), &[("content-encoding", "zstd"), ("sluice-dictionary-id", "3")]).await;
    assert_eq!(st, 400, "{err}");

    // Everything acknowledged landed, rejected requests stored nothing.
    s.wait_landed("ev").await;
    assert_eq!(s.scalar("SELECT count(*) FROM ev").await, 400.0 + 1.0 + 100.0 + 3.0 + 3.0);

    // Stats: raw vs stored bytes, by codec and by dictionary version.
    let st: Value = serde_json::from_str(&get(&s, "/v1/streams/ev/stats", &[]).await.text().await.unwrap()).unwrap();
    assert_eq!(st["records"], 507);
    let ids: Vec<u64> = st["dictionaries"].as_array().unwrap().iter().map(|d| d["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(st["dictionaries"][2]["current"], true);
    assert!(st["by_codec"]["zstd+dict"]["batches"].as_u64().unwrap() >= 3, "{st}");
    // Single events with the dictionary are stored in well under their raw size, batch
    // header included (without it they are not: see bench/RESULTS.md).
    let zd = &st["by_codec"]["zstd+dict"];
    assert!(zd["stored_bytes"].as_f64().unwrap() < 0.7 * zd["raw_bytes"].as_f64().unwrap(), "{zd}");

    let (code, out, err) = cli(&["stream", "stats", "ev", "--url", &s.url("")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ev") && out.contains("zstd+dict") && out.contains("dictionaries") && out.contains("current"), "{out}");
    let (code, out, _) = cli(&["stream", "stats", "--json", "--url", &s.url("")]);
    assert_eq!(code, 0);
    let all: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all[0]["stream"], "ev");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_the_client_accepts() {
    let s = Server::start("").await;
    let (st, _) = s.post("ev", events(0, 200)).await;
    assert_eq!(st, 200);
    s.wait_landed("ev").await;
    let sql = "SELECT * FROM ev ORDER BY event_id";
    let plain = s.query(sql).await;
    for enc in ["gzip", "br", "zstd"] {
        let r = s.client.post(s.url("/v1/query")).header("accept-encoding", enc).body(sql).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers().get("content-encoding").and_then(|v| v.to_str().ok()), Some(enc));
        let body = r.bytes().await.unwrap();
        let mut out = Vec::new();
        match enc {
            "gzip" => flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out).unwrap(),
            "br" => brotli::Decompressor::new(&body[..], 4096).read_to_end(&mut out).unwrap(),
            _ => zstd::stream::read::Decoder::new(&body[..]).unwrap().read_to_end(&mut out).unwrap(),
        };
        assert!(body.len() * 3 < out.len(), "{enc}: {} -> {}", body.len(), out.len());
        let rows: Vec<Value> = serde_json::from_slice(&out).unwrap();
        assert_eq!(rows, plain);
    }
    // Without Accept-Encoding, and for small acks, nothing is compressed.
    let r = s.client.post(s.url("/v1/query")).body(sql).send().await.unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    let r = s.client.post(s.url("/v1/streams/ev/events")).header("accept-encoding", "gzip").body(events(500, 1)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
}
