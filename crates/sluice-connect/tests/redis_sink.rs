//! The Redis sink against a redis-server this test starts on a free loopback port.

use sluice_connect::redis_sink::RedisSink;
use sluice_core::pipeline::{GeoConfig, RedisSinkConfig};
use sluice_pipeline::ExternalSink;

#[path = "support/batch.rs"]
mod batch;
#[path = "support/servers.rs"]
mod servers;
use batch::batch;
use servers::RedisServer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_value_per_key_and_positions_survive_reruns() {
    let server = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let cfg = RedisSinkConfig {
        url: url.clone(),
        key: "'vehicle:' || vehicle_id".into(),
        value: "json".into(),
        ttl: None,
        geo: Some(GeoConfig { key: "vehicles:live".into(), lat: "lat".into(), lng: "lng".into(), member: "vehicle_id".into() }),
        rate_limit: None,
    };
    let sink = RedisSink::new(&cfg, "event_date").unwrap();
    let a = batch(
        &[
            r#"{"vehicle_id":"v1","lat":52.5,"lng":13.4,"battery":90}"#,
            r#"{"vehicle_id":"v2","lat":48.1,"lng":11.6,"battery":50}"#,
            r#"{"vehicle_id":"v1","lat":52.6,"lng":13.5,"battery":80}"#,
        ],
        0,
    );
    let b = batch(&[r#"{"vehicle_id":"v1","lat":52.7,"lng":13.6,"battery":70}"#, r#"{"vehicle_id":"v3","battery":10}"#], 3);
    assert_eq!(sink.write(&[a.clone()]).await.unwrap(), 3);
    assert_eq!(sink.write(&[b.clone()]).await.unwrap(), 2);
    // A crash re-runs both flushes (duplicates, and older values after newer ones): the final
    // state is the same.
    sink.write(&[a]).await.unwrap();
    sink.write(&[b]).await.unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let v1: String = redis::cmd("GET").arg("vehicle:v1").query_async(&mut c).await.unwrap();
    let v1: serde_json::Value = serde_json::from_str(&v1).unwrap();
    assert_eq!(v1["battery"], 70);
    assert!(v1.get("_offset").is_none());
    let v3: String = redis::cmd("GET").arg("vehicle:v3").query_async(&mut c).await.unwrap();
    assert!(v3.contains("\"battery\":10"));
    let pos: Vec<Option<(f64, f64)>> = redis::cmd("GEOPOS").arg("vehicles:live").arg("v1").arg("v3").query_async(&mut c).await.unwrap();
    let (lng, lat) = pos[0].unwrap();
    assert!((lng - 13.6).abs() < 1e-4 && (lat - 52.7).abs() < 1e-4, "{lng} {lat}");
    assert!(pos[1].is_none(), "v3 has no position");
    let n: usize = redis::cmd("ZCARD").arg("vehicles:live").query_async(&mut c).await.unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_values_ttl_and_null_keys() {
    let server = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let cfg = RedisSinkConfig {
        url: url.clone(),
        key: "'cust:' || customer.id".into(),
        value: "hash".into(),
        ttl: Some(Duration::from_secs(3600)),
        geo: None,
        rate_limit: None,
    };
    let sink = RedisSink::new(&cfg, "event_date").unwrap();
    let b = batch(&[r#"{"customer":{"id":"c1","tier":"gold"},"limit":500,"note":"a"}"#, r#"{"customer":{"id":"c1","tier":"gold"},"limit":700}"#], 0);
    sink.write(&[b]).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL").arg("cust:c1").query_async(&mut c).await.unwrap();
    // The latest record replaces the hash (no stale `note`); nested values are JSON text.
    assert_eq!(h.get("limit").map(String::as_str), Some("700"));
    assert!(h.get("note").is_none(), "{h:?}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&h["customer"]).unwrap()["tier"], "gold");
    let ttl: i64 = redis::cmd("PTTL").arg("cust:c1").query_async(&mut c).await.unwrap();
    assert!(ttl > 3_500_000, "{ttl}");
    // A record without a key fails the write, naming the record.
    let err = sink.write(&[batch(&[r#"{"limit":1}"#], 5)]).await.unwrap_err();
    assert!(err.to_string().contains("NULL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_is_down_is_an_error_then_reconnects() {
    let server = RedisServer::start();
    let port = server.port;
    let cfg = RedisSinkConfig { url: format!("redis://127.0.0.1:{port}/0"), key: "id".into(), value: "json".into(), ttl: None, geo: None, rate_limit: None };
    let sink = RedisSink::new(&cfg, "event_date").unwrap();
    sink.write(&[batch(&[r#"{"id":"a"}"#], 0)]).await.unwrap();
    drop(server);
    assert!(sink.write(&[batch(&[r#"{"id":"b"}"#], 1)]).await.is_err());
}
