//! A stand-in for a service to enrich from, for `bench/pipeline.sh`: answers every call after
//! a fixed latency, so the benchmark measures Sluice, not the service. The latency is waited
//! out on a thread (`std::thread::sleep`, precise to tens of microseconds), not on tokio's
//! timer, which has millisecond granularity and made a 5 ms answer take 6–7 ms.
//!
//! `slow_service PORT LATENCY_MS`
//! - `GET /users/{key}` → `{"key": key, "tier": "gold", "score": n}`
//! - `POST /users:batch` with a JSON array of `{"key": ...}` → an array of such answers
//! - `GET /stats` → `{"calls": calls answered, "answers": records answered}`

use axum::extract::{Path, State};
use axum::routing::{get, post};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Svc {
    latency: Duration,
    served: AtomicU64,
    calls: AtomicU64,
}

async fn wait(latency: Duration) {
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(latency)).await;
}

fn answer(svc: &Svc, key: &str) -> serde_json::Value {
    let n = svc.served.fetch_add(1, Ordering::Relaxed);
    serde_json::json!({"key": key, "tier": "gold", "score": n % 1000})
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(ms)) = (args.get(1).and_then(|p| p.parse::<u16>().ok()), args.get(2).and_then(|l| l.parse::<u64>().ok())) else {
        eprintln!("usage: slow_service PORT LATENCY_MS");
        std::process::exit(2);
    };
    let svc = Arc::new(Svc { latency: Duration::from_millis(ms), served: AtomicU64::new(0), calls: AtomicU64::new(0) });
    let app = axum::Router::new()
        .route(
            "/users/{key}",
            get(|State(s): State<Arc<Svc>>, Path(key): Path<String>| async move {
                wait(s.latency).await;
                s.calls.fetch_add(1, Ordering::Relaxed);
                answer(&s, &key).to_string()
            }),
        )
        .route(
            "/users:batch",
            post(|State(s): State<Arc<Svc>>, body: String| async move {
                wait(s.latency).await;
                s.calls.fetch_add(1, Ordering::Relaxed);
                let items: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
                let out: Vec<serde_json::Value> = items.iter().map(|i| answer(&s, i["key"].as_str().unwrap_or(""))).collect();
                serde_json::Value::Array(out).to_string()
            }),
        )
        .route("/stats", get(|State(s): State<Arc<Svc>>| async move {
                serde_json::json!({"calls": s.calls.load(Ordering::Relaxed), "answers": s.served.load(Ordering::Relaxed)}).to_string()
            }))
        .with_state(svc);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
