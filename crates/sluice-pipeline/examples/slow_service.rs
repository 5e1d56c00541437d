//! A stand-in for a service to enrich from, for `bench/pipeline.sh`: answers every call after
//! a fixed latency, so the benchmark measures Sluice, not the service. The latency is waited
//! out on a thread (`std::thread::sleep`, precise to tens of microseconds), not on tokio's
//! timer, which has millisecond granularity and made a 5 ms answer take 6–7 ms. The sleep is
//! calibrated: what a wait costs beyond its sleep (the timer's wakeup, the handoffs to and
//! from the blocking thread; 0.3–0.4 ms on a 2-core VM) is measured as it runs, and each sleep
//! is that much shorter, so a handler's wait averages the latency asked for instead of
//! 5.4 ms for 5. The client still sees the loopback round trip on top (~0.1 ms).
//!
//! `slow_service PORT LATENCY_MS`
//! - `GET /users/{key}` → `{"key": key, "tier": "gold", "score": n}`
//! - `POST /users:batch` with a JSON array of `{"key": ...}` → an array of such answers
//! - `GET /stats` → `{"calls": calls answered, "answers": records answered, "first_us": .., "last_us": ..,
//!   "wait_us": ..}` (when the first and the last of those calls were answered, in µs since
//!   the service started; the mean time a handler waited, in µs)
//! - `POST /stats/reset` → zeroes those counters
//!
//! `slow_service --client PORT CONNECTIONS SECONDS`: the benchmark's reference client, the
//! least a caller can do (one keep-alive connection per call in flight, `GET /users/{key}`
//! in a loop, as wrk does). Prints `calls_per_second mean_ms p99_ms`: the service's real
//! latency under this concurrency and the rate it allows.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Svc {
    latency: Duration,
    served: AtomicU64,
    calls: AtomicU64,
    started: std::time::Instant,
    /// When the first / last call since the last reset was answered (µs since `started`;
    /// first: u64::MAX before any).
    first_us: AtomicU64,
    last_us: AtomicU64,
    /// What a wait takes beyond the sleep it asked for, a moving average in ns.
    overshoot_ns: AtomicU64,
    /// Handlers' waits since the last reset: their total in µs.
    waited_us: AtomicU64,
}

impl Svc {
    fn answered(&self) {
        let now = self.started.elapsed().as_micros() as u64;
        self.first_us.fetch_min(now, Ordering::Relaxed);
        self.last_us.fetch_max(now, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.served.store(0, Ordering::Relaxed);
        self.first_us.store(u64::MAX, Ordering::Relaxed);
        self.last_us.store(0, Ordering::Relaxed);
        self.waited_us.store(0, Ordering::Relaxed);
    }

    /// Waits out the latency: a sleep shortened by the measured overshoot, so that the wait
    /// as a whole averages `latency`.
    async fn wait(&self) {
        let start = std::time::Instant::now();
        let sleep = self.latency.saturating_sub(Duration::from_nanos(self.overshoot_ns.load(Ordering::Relaxed)));
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(sleep)).await;
        let took = start.elapsed();
        let over = took.saturating_sub(sleep).as_nanos() as u64;
        // A moving average over ~64 waits; concurrent updates may lose one, which is harmless.
        let old = self.overshoot_ns.load(Ordering::Relaxed);
        self.overshoot_ns.store(old - old / 64 + over / 64, Ordering::Relaxed);
        self.waited_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

fn answer(svc: &Svc, key: &str) -> serde_json::Value {
    let n = svc.served.fetch_add(1, Ordering::Relaxed);
    serde_json::json!({"key": key, "tier": "gold", "score": n % 1000})
}

/// One connection's calls for `seconds`; returns each call's latency.
async fn client_loop(port: u16, k: usize, seconds: f64) -> std::io::Result<Vec<Duration>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let (start, mut out, mut line, mut body) = (std::time::Instant::now(), Vec::new(), String::new(), Vec::new());
    while start.elapsed().as_secs_f64() < seconds {
        let t = std::time::Instant::now();
        w.write_all(format!("GET /users/ref{k}-{} HTTP/1.1\r\nhost: a\r\n\r\n", out.len()).as_bytes()).await?;
        let mut length = 0;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        body.resize(length, 0);
        r.read_exact(&mut body).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn client(port: u16, connections: usize, seconds: f64) {
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..connections).map(|k| tokio::spawn(client_loop(port, k, seconds))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task").expect("client call"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let mean = all.iter().map(|d| d.as_secs_f64()).sum::<f64>() / all.len().max(1) as f64;
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or_default();
    println!("{:.1} {:.3} {:.3}", all.len() as f64 / elapsed, mean * 1000.0, p99.as_secs_f64() * 1000.0);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        let n = |i: usize| args.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(port), Some(conns), Some(secs)) = (n(2), n(3), n(4)) else {
            eprintln!("usage: slow_service --client PORT CONNECTIONS SECONDS");
            std::process::exit(2);
        };
        return client(port as u16, conns as usize, secs).await;
    }
    let (Some(port), Some(ms)) = (args.get(1).and_then(|p| p.parse::<u16>().ok()), args.get(2).and_then(|l| l.parse::<u64>().ok())) else {
        eprintln!("usage: slow_service PORT LATENCY_MS");
        std::process::exit(2);
    };
    let svc = Arc::new(Svc {
        latency: Duration::from_millis(ms),
        served: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        started: std::time::Instant::now(),
        first_us: AtomicU64::new(u64::MAX),
        last_us: AtomicU64::new(0),
        overshoot_ns: AtomicU64::new(0),
        waited_us: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route(
            "/users/{key}",
            get(|State(s): State<Arc<Svc>>, Path(key): Path<String>| async move {
                s.wait().await;
                s.answered();
                answer(&s, &key).to_string()
            }),
        )
        .route(
            "/users:batch",
            post(|State(s): State<Arc<Svc>>, body: String| async move {
                s.wait().await;
                s.answered();
                let items: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
                let out: Vec<serde_json::Value> = items.iter().map(|i| answer(&s, i["key"].as_str().unwrap_or(""))).collect();
                serde_json::Value::Array(out).to_string()
            }),
        )
        .route("/stats", get(|State(s): State<Arc<Svc>>| async move {
                serde_json::json!({
                    "calls": s.calls.load(Ordering::Relaxed),
                    "answers": s.served.load(Ordering::Relaxed),
                    "first_us": s.first_us.load(Ordering::Relaxed),
                    "last_us": s.last_us.load(Ordering::Relaxed),
                    "wait_us": s.waited_us.load(Ordering::Relaxed) / s.calls.load(Ordering::Relaxed).max(1),
                })
                .to_string()
            }))
        .route("/stats/reset", post(|State(s): State<Arc<Svc>>| async move { s.reset() }))
        .with_state(svc);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
