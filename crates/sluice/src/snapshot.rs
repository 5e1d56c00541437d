//! `sluice snapshot SOURCE [--table T] [--key K ...]` and `POST /v1/sources/{name}/snapshot`:
//! re-read tables of a change-data-capture source (see `sluice_connect::postgres_cdc::snapshot`
//! for how a snapshot stays consistent with the changes streaming meanwhile).

use crate::server::{error_response, App};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_connect::postgres_cdc::SnapshotRequest;
use std::sync::Arc;
use std::time::Duration;

/// `POST /v1/sources/{name}/snapshot` with `{"table": "public.orders", "keys": ["7", "9"]}`
/// (both optional): queues the snapshots and answers with them (202).
pub async fn snapshot_endpoint(State(app): State<Arc<App>>, Path(name): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    match app.auth.token(&headers) {
        Err(d) => return app.denied(d),
        Ok(Some(t)) if !t.can_write_all() => return app.denied(crate::auth::Denied::Forbidden("snapshots need write scope '*'".into())),
        Ok(_) => {}
    }
    let req: SnapshotRequest = if body.is_empty() {
        SnapshotRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("snapshot request: {e}"), None),
        }
    };
    let Some((sender, status)) = app.source(&name) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no source {name:?}"), None);
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if sender.send((req, tx)).is_err() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("source {name:?} is stopped"), None);
    }
    // The source takes requests while it streams; a source that is reconnecting answers later.
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(v))) => (StatusCode::ACCEPTED, axum::Json(v)).into_response(),
        Ok(Ok(Err(m))) => error_response(StatusCode::BAD_REQUEST, &m, None),
        _ => {
            let st = status.to_json();
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("source {name:?} is not streaming (state {}, last error {}): the request stays queued", st["state"], st["last_error"]),
                Some(5),
            )
        }
    }
}

/// `sluice snapshot`: asks a running server for snapshots and shows their progress.
#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The source (its name under `sources:`).
    pub source: String,
    /// One table (`schema.table`, or `table` in `public` / the MySQL URL's database); default: every captured table.
    #[arg(long)]
    pub table: Option<String>,
    /// Only these primary key values: the value for a one-column key, or a JSON object of
    /// every key column (`{"order_id": 7, "line": 1}`). Repeat for more.
    #[arg(long = "key", requires = "table")]
    pub keys: Vec<String>,
    /// Do not wait for the snapshots to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    #[arg(long, default_value = "http://127.0.0.1:7878", env = "SLUICE_URL")]
    pub url: String,
    /// Bearer token (write scope '*').
    #[arg(long, env = "SLUICE_TOKEN")]
    pub token: Option<String>,
}

pub async fn run_cli(args: SnapshotArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let auth = |rb: reqwest::RequestBuilder| match &args.token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let req = SnapshotRequest { table: args.table.clone(), keys: args.keys.clone() };
    let resp = auth(client.post(format!("{base}/v1/sources/{}/snapshot", args.source)).body(serde_json::to_vec(&req)?))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(text);
        anyhow::bail!("snapshot refused ({status}): {msg}");
    }
    let queued: serde_json::Value = serde_json::from_str(&text)?;
    let ids: Vec<u64> = queued["snapshots"].as_array().map(|a| a.iter().filter_map(|s| s["id"].as_u64()).collect()).unwrap_or_default();
    if args.no_wait || ids.is_empty() {
        println!("{queued}");
        return Ok(());
    }
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(ids.len() as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tables, {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let r = auth(client.get(format!("{base}/v1/sources"))).send().await?;
        let v: serde_json::Value = serde_json::from_str(&r.text().await?)?;
        let src = v["sources"].as_array().and_then(|a| a.iter().find(|s| s["name"] == args.source.as_str())).cloned().unwrap_or_default();
        let ours: Vec<&serde_json::Value> = src["snapshots"].as_array().map(|a| a.iter().filter(|s| s["id"].as_u64().is_some_and(|i| ids.contains(&i))).collect()).unwrap_or_default();
        let done = ours.iter().filter(|s| s["state"] == "done").count();
        let rows: u64 = ours.iter().filter_map(|s| s["rows"].as_u64()).sum();
        bar.set_position(done as u64);
        bar.set_message(format!("{rows} rows read"));
        if done == ids.len() {
            break;
        }
        if let Some(e) = src["last_error"].as_str() {
            bar.set_message(format!("{rows} rows read; source error (it retries): {e}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish();
    println!("{queued}");
    Ok(())
}
