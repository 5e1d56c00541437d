//! Test harness: runs the real `sluice` binary on a free loopback port in a temp dir.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A sluice process over a data directory that outlives restarts.
pub struct Server {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub client: reqwest::Client,
    pub token: Option<String>,
    /// Extra environment of the process (e.g. fault injection).
    pub env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Writes `sluice.yaml` = listen + data_dir + `extra` and starts the server.
    pub async fn start(extra: &str) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Server::new_in(&dir, extra);
        s._tmp = Some(tmp);
        s.spawn().await;
        s
    }

    pub fn new_in(dir: &Path, extra: &str) -> Server {
        let port = free_port();
        let config = dir.join("sluice.yaml");
        std::fs::write(&config, format!("listen: 127.0.0.1:{port}\ndata_dir: {}\n{extra}", dir.join("data").display())).unwrap();
        Server {
            dir: dir.to_path_buf(),
            config,
            port,
            child: None,
            client: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
            token: None,
            env: Vec::new(),
            _tmp: None,
        }
    }

    pub fn lake(&self) -> PathBuf {
        self.dir.join("data").join("lake")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Starts the process and waits until /healthz answers.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).unwrap();
        let child = Command::new(BIN)
            .args(["up", "-c"])
            .arg(&self.config)
            // Sluice's own info lines; the Delta kernel's would fill the log tail that
            // failures print.
            .env("SLUICE_LOG", "info,buoyant_kernel=warn,delta_kernel=warn,deltalake_core=warn,datafusion=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // An injected fault may fire while the server starts: start it again.
                if self.env.iter().any(|(k, _)| k.starts_with("SLUICE_FAULT")) {
                    return Box::pin(self.spawn()).await;
                }
                panic!("sluice exited at start with {status}: {}", self.server_log());
            }
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "sluice did not come up: {}", self.server_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn server_log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        s.chars().rev().take(4000).collect::<String>().chars().rev().collect()
    }

    /// Ends round `round` of a crash loop: kill -9, or every other round SIGTERM, which must
    /// exit 0 (with what was in flight landed).
    pub fn kill9_or_stop(&mut self, round: usize) {
        if round % 2 == 1 {
            assert_eq!(self.stop(), Some(0), "SIGTERM exits 0");
            eprintln!("round {round}: stopped");
        } else {
            self.kill9();
            eprintln!("round {round}: killed");
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("sluice did not stop within 60s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// POST events; returns (status, JSON body).
    pub async fn post(&self, stream: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        self.post_with(stream, body, &[]).await
    }

    pub async fn post_with(&self, stream: &str, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut rb = self.auth(self.client.post(self.url(&format!("/v1/streams/{stream}/events"))).body(body));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// SQL over HTTP, JSON rows.
    pub async fn query(&self, sql: &str) -> Vec<Value> {
        let r = self.auth(self.client.post(self.url("/v1/query")).body(sql.to_string())).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "query {sql:?} failed: {status} {text}");
        serde_json::from_str::<Vec<Value>>(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// The single number a `SELECT <aggregate>` returns (0 when the table does not exist yet).
    pub async fn scalar(&self, sql: &str) -> f64 {
        let rows = self.query(sql).await;
        let v = rows[0].as_object().unwrap().values().next().unwrap().clone();
        v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0)
    }

    pub async fn streams(&self) -> Value {
        let r = self.auth(self.client.get(self.url("/v1/streams"))).send().await.unwrap();
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    }

    pub async fn stream_info(&self, name: &str) -> Option<Value> {
        let s = self.streams().await;
        s["streams"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned()
    }

    /// Waits until the mirror table of `stream` has a row with `id = -1`: the change data
    /// capture tests' last change, so everything before it is in the mirror too.
    pub async fn wait_marker(&self, stream: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.lake().join(stream).join("_delta_log").is_dir() {
                self.wait_landed(stream).await;
                if self.scalar(&format!("SELECT count(*) FROM {stream} WHERE id = -1")).await == 1.0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the last change never reached {stream}\n{}", self.server_log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until everything durable in the stream's log is in the lake.
    pub async fn wait_landed(&self, stream: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(info) = self.stream_info(stream).await {
                if info["lag"] == 0 && info["log_end_offset"].as_u64().unwrap_or(0) > 0 {
                    return;
                }
                assert!(info["lake_error"].is_null() || Instant::now() < deadline, "lake error: {}", info["lake_error"]);
            }
            assert!(Instant::now() < deadline, "stream {stream} did not land in 120s: {:?}\n{}", self.stream_info(stream).await, self.server_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// Events shaped like the reference workload: `n` records with ids `start..start+n`.
pub fn events(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| {
            format!(
                "{{\"event_id\":\"e{i}\",\"ts\":\"2026-01-{:02}T10:00:00.000Z\",\"region\":\"{}\",\"amount\":{},\"account\":{{\"id\":{},\"tier\":\"gold\"}},\"tags\":[\"a\",\"b\"]}}\n",
                1 + i % 3,
                ["madrid", "berlin", "paris"][i % 3],
                i,
                i % 100
            )
        })
        .collect()
}

/// Runs the sluice CLI with args; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The statements [`check_moved_rows`] expects in a source database: a table `moves` whose
/// row 1 moves to key 3 (and row 2 is updated in place).
pub const MOVES_SQL: &str =
    "CREATE TABLE moves (id INT PRIMARY KEY, v INT); INSERT INTO moves VALUES (1, 10), (2, 20); UPDATE moves SET id = 3 WHERE id = 1; UPDATE moves SET v = 21 WHERE id = 2;";

/// After [`MOVES_SQL`] has landed in `stream` (5 changelog rows): the update that moved a
/// row to another key is a delete of the old key and an insert of the new one, and the
/// mirror holds the new key only.
pub async fn check_moved_rows(s: &Server, stream: &str) {
    let moves = s.query(&format!("SELECT op, key.id AS id FROM {stream}__changelog ORDER BY _offset")).await;
    let ops: Vec<(&str, i64)> = moves.iter().map(|r| (r["op"].as_str().unwrap(), r["id"].as_i64().unwrap())).collect();
    assert_eq!(ops, [("insert", 1), ("insert", 2), ("delete", 1), ("insert", 3), ("update", 2)]);
    let mirror: Vec<(i64, i64)> =
        s.query(&format!("SELECT id, v FROM {stream} ORDER BY id")).await.iter().map(|r| (r["id"].as_i64().unwrap(), r["v"].as_i64().unwrap())).collect();
    assert_eq!(mirror, [(2, 21), (3, 10)]);
}
