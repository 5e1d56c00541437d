//! `sluice reload`, `POST /v1/reload` and SIGHUP: apply an edited sluice.yaml without a
//! restart.
//!
//! What a reload applies: pipelines (added, removed, changed), newly declared streams,
//! `limits`, `auto_create_streams`, stream settings read per request (key and event-time
//! fields) and stream codecs (the next batch written uses the new one). Everything else (listen, data_dir, lake, log, sources, tokens, partition counts) is
//! reported as needing a restart and keeps its running value.
//!
//! Why nothing is lost or duplicated: a pipeline that is changed or removed is halted after
//! the flush it is writing is checkpointed (see `Pipeline::run`); its replacement starts from
//! that checkpoint under the same consumer name and the same Delta transaction ids, so lake
//! tables skip nothing and repeat nothing. Records ingested meanwhile wait in the log. A
//! removed pipeline's consumer offsets are deleted so it no longer holds back retention;
//! re-adding it later resumes from the start of the retained log, and its tables' transaction
//! ids still skip what they hold.

use crate::server::{error_response, App};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_core::Config;
use std::sync::Arc;

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub streams_created: Vec<String>,
    /// Settings that differ from the running ones but take effect only at the next start.
    pub restart_needed: Vec<String>,
}

/// The settings that cannot change while running: the new config keeps the running values,
/// and their names are reported.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
    let mut names = Vec::new();
    if old.listen != new.listen {
        names.push("listen".to_string());
        new.listen = old.listen.clone();
    }
    if old.data_dir != new.data_dir || old.lake_root != new.lake_root {
        names.push("data_dir/lake_root".to_string());
        new.data_dir = old.data_dir.clone();
        new.lake_root = old.lake_root.clone();
    }
    if old.lake != new.lake {
        names.push("lake".to_string());
        new.lake = old.lake.clone();
    }
    if old.log != new.log {
        names.push("log".to_string());
        new.log = old.log.clone();
    }
    if old.sources != new.sources {
        names.push("sources".to_string());
        new.sources = old.sources.clone();
    }
    if old.tokens != new.tokens {
        names.push("tokens".to_string());
        new.tokens = old.tokens.clone();
    }
    for (name, sc) in &old.streams {
        if let Some(n) = new.streams.get_mut(name) {
            if n.partitions != sc.partitions || n.retention != sc.retention || n.partition_by != sc.partition_by {
                names.push(format!("streams.{name} (partitions, retention, partition_by)"));
                n.partitions = sc.partitions;
                n.retention = sc.retention.clone();
                n.partition_by = sc.partition_by.clone();
            }
        }
    }
    names
}

/// Re-reads the config file and applies it. The new file is checked in full first: an error
/// changes nothing.
pub async fn reload(app: &Arc<App>) -> anyhow::Result<ReloadReport> {
    let _one = app.reloading.lock().await;
    let path = app.config_path.clone().ok_or_else(|| anyhow::anyhow!("sluice was started without -c: there is no config file to reload"))?;
    let mut new = tokio::task::spawn_blocking(move || crate::load_config(&path)).await??;
    let old = app.cfg();
    let mut report = ReloadReport { restart_needed: keep_restart_only(&old, &mut new), ..Default::default() };
    for (name, p) in &new.pipelines {
        match old.pipelines.get(name) {
            None => report.added.push(name.clone()),
            Some(o) if o != p => report.changed.push(name.clone()),
            Some(_) => report.unchanged.push(name.clone()),
        }
    }
    report.removed = old.pipelines.keys().filter(|n| !new.pipelines.contains_key(*n)).cloned().collect();

    // 1. Halt what goes away or changes; each returns after its current checkpoint.
    let halting: Vec<_> = {
        let mut running = app.pipelines.lock();
        let (go, stay): (Vec<_>, Vec<_>) =
            running.drain(..).partition(|r| report.removed.contains(&r.name) || report.changed.contains(&r.name));
        *running = stay;
        go
    };
    for r in &halting {
        let _ = r.halt.send(true);
    }
    for r in halting {
        if let Err(e) = r.task.await {
            tracing::warn!(pipeline = r.name, error = %e, "pipeline task ended abnormally while halting");
        }
    }
    for name in &report.removed {
        let consumer = sluice_pipeline::runtime::consumer_name(name);
        for s in &old.pipelines[name].from {
            if let Some(stream) = app.log.stream(s) {
                for p in stream.partitions() {
                    p.remove_consumer(&consumer)?;
                }
            }
        }
    }
    // 2. A stream that becomes a pipeline source stops landing by itself. Its lake sink is
    // cancelled; what it had committed is in its table with transaction ids, as after a crash.
    for s in app.log.streams() {
        if new.is_pipeline_source(s.name()) && !old.is_pipeline_source(s.name()) {
            let task = app.sinks.lock().remove(s.name());
            if let Some(t) = task {
                t.task.abort();
                let _ = t.task.await;
            }
        }
    }
    // 3. The new config takes effect: declared streams open, streams no pipeline reads any
    // more land by themselves again, and new and changed pipelines start.
    app.set_cfg(new);
    let cfg = app.cfg();
    for name in cfg.streams.keys() {
        if app.log.stream(name).is_none() {
            app.open_stream(name)?;
            report.streams_created.push(name.clone());
        }
    }
    for s in app.log.streams() {
        s.set_codec(crate::server::codec_of(cfg.stream(s.name())));
        s.set_dictionary(crate::server::dictionary_of(cfg.stream(s.name())));
        app.ensure_sink(&s);
    }
    // One pipeline that cannot start (its connector refuses its options) does not keep the
    // others from starting; the error names it, and the rest of the reload stands.
    let mut failed = Vec::new();
    for name in report.added.iter().chain(&report.changed) {
        if let Err(e) = app.start_pipeline(&cfg, name) {
            failed.push(format!("pipeline {name}: {e:#}"));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("reload applied, but these did not start: {}", failed.join("; "));
    }
    tracing::info!(
        added = ?report.added, removed = ?report.removed, changed = ?report.changed,
        restart_needed = ?report.restart_needed, "config reloaded"
    );
    Ok(report)
}

/// `POST /v1/reload` (with tokens on: a token with write scope '*').
pub async fn reload_endpoint(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match app.auth.token(&headers) {
        Err(d) => return app.denied(d),
        Ok(Some(t)) if !t.can_write_all() => {
            return app.denied(crate::auth::Denied::Forbidden("reload needs write scope '*'".into()));
        }
        Ok(_) => {}
    }
    match reload(&app).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error_response(StatusCode::BAD_REQUEST, &format!("{e:#}"), None),
    }
}

/// Reloads on every SIGHUP.
pub async fn on_sighup(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        match reload(&app).await {
            Ok(_) => {}
            Err(e) => tracing::error!(error = format!("{e:#}"), "reload on SIGHUP failed; the running config stays"),
        }
    }
}

/// `sluice reload`: asks a running server to re-read its config file.
#[derive(clap::Args)]
pub struct ReloadArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:7878", env = "SLUICE_URL")]
    pub url: String,
    /// Bearer token (write scope '*').
    #[arg(long, env = "SLUICE_TOKEN")]
    pub token: Option<String>,
}

pub async fn run_cli(args: ReloadArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut req = client.post(format!("{}/v1/reload", args.url.trim_end_matches('/')));
    if let Some(t) = &args.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| anyhow::anyhow!("{}: {e}", args.url))?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        anyhow::bail!("reload refused ({status}): {}", body.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given"));
    }
    let list = |k: &str| body.get(k).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    println!("reloaded: added [{}], changed [{}], removed [{}], unchanged [{}]", list("added"), list("changed"), list("removed"), list("unchanged"));
    let created = list("streams_created");
    if !created.is_empty() {
        println!("streams created: {created}");
    }
    let restart = list("restart_needed");
    if !restart.is_empty() {
        println!("take effect at the next restart: {restart}");
    }
    Ok(())
}
