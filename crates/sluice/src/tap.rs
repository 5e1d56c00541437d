//! `sluice tap PIPELINE [STEP]` and `GET /v1/pipelines/{name}/tap`: live records passing a
//! point of a pipeline, as NDJSON, for as long as the client reads. Best effort: a viewer
//! that reads too slowly misses records; the pipeline never waits for it.

use crate::server::{error_response, App};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_pipeline::TapPoint;
use std::sync::Arc;

#[derive(serde::Deserialize)]
pub struct TapQuery {
    /// `input`, a step index (0-based), a step label (`1:map`) or kind (`map`, when only one
    /// step has it). Default: the output of the last step (the records going to the sinks).
    step: Option<String>,
}

/// Resolves a step name against a pipeline's steps.
fn tap_point(steps: &[sluice_core::pipeline::StepConfig], step: Option<&str>) -> Result<TapPoint, String> {
    let Some(step) = step else {
        return Ok(if steps.is_empty() { TapPoint::Input } else { TapPoint::Step(steps.len() - 1) });
    };
    if step == "input" {
        return Ok(TapPoint::Input);
    }
    if let Ok(i) = step.parse::<usize>() {
        return if i < steps.len() { Ok(TapPoint::Step(i)) } else { Err(format!("step {i}: the pipeline has {} steps (0-based)", steps.len())) };
    }
    let labels: Vec<String> = steps.iter().enumerate().map(|(i, s)| format!("{i}:{}", s.kind())).collect();
    if let Some(i) = labels.iter().position(|l| l == step) {
        return Ok(TapPoint::Step(i));
    }
    let of_kind: Vec<usize> = steps.iter().enumerate().filter(|(_, s)| s.kind() == step).map(|(i, _)| i).collect();
    match of_kind.as_slice() {
        [i] => Ok(TapPoint::Step(*i)),
        [] => Err(format!("no step {step:?} (steps: input, {})", labels.join(", "))),
        _ => Err(format!("{} steps are {step:?}: name one by index or label ({})", of_kind.len(), labels.join(", "))),
    }
}

pub async fn tap_endpoint(State(app): State<Arc<App>>, Path(name): Path<String>, Query(q): Query<TapQuery>, headers: HeaderMap) -> Response {
    if let Err(r) = app.require_read_all(&headers, "tap") {
        return r;
    }
    let found = app.pipelines.lock().iter().find(|r| r.name == name).map(|r| (r.cfg.steps.clone(), r.status.clone()));
    let Some((steps, status)) = found else {
        return error_response(StatusCode::NOT_FOUND, &format!("no running pipeline {name:?}"), None);
    };
    let at = match tap_point(&steps, q.step.as_deref()) {
        Ok(at) => at,
        Err(m) => return error_response(StatusCode::NOT_FOUND, &m, None),
    };
    let rx = status.taps.subscribe(at, 10_000);
    // Ends when the pipeline goes away (reload) or the server shuts down, which waits for
    // open connections.
    let body = futures::stream::unfold((rx, app), |(mut rx, app)| async move {
        loop {
            if app.shutting_down.load(std::sync::atomic::Ordering::Acquire) {
                return None;
            }
            match tokio::time::timeout(std::time::Duration::from_millis(250), rx.recv()).await {
                Ok(Some(line)) => return Some((Ok::<_, std::convert::Infallible>(line), (rx, app))),
                Ok(None) => return None,
                Err(_) => continue,
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(body)).into_response()
}

#[derive(clap::Args)]
pub struct TapArgs {
    pub pipeline: String,
    /// `input`, a step index, label (`1:map`) or kind; default: the last step's output.
    pub step: Option<String>,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    pub limit: Option<u64>,
    #[arg(long, default_value = "http://127.0.0.1:7878", env = "SLUICE_URL")]
    pub url: String,
    /// Bearer token (read scope '*').
    #[arg(long, env = "SLUICE_TOKEN")]
    pub token: Option<String>,
}

pub async fn run_cli(args: TapArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut url = format!("{}/v1/pipelines/{}/tap", args.url.trim_end_matches('/'), args.pipeline);
    if let Some(step) = &args.step {
        if !step.chars().all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_') {
            anyhow::bail!("step {step:?}: use input, an index, a label like 1:map, or a kind");
        }
        url.push_str(&format!("?step={step}"));
    }
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = &args.token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await.map_err(|e| anyhow::anyhow!("{}: {e}", args.url))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(text);
        anyhow::bail!("tap refused ({status}): {msg}");
    }
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    let mut partial = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        partial.extend_from_slice(&chunk);
        while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=nl).collect();
            out.write_all(&line)?;
            seen += 1;
            if args.limit.is_some_and(|n| seen >= n) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
    }
    Ok(())
}
