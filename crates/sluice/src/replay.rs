//! `sluice replay` and `POST /v1/pipelines/{name}/replay`: run records through a pipeline
//! again.
//!
//! - `--stream S --from OFFSET|TIMESTAMP`: rewinds the pipeline's position in stream S (it
//!   never moves forward, which would skip records). The pipeline is halted after its
//!   current checkpoint, its consumer offsets are set, and it starts again. Stream and
//!   external sinks get the records again; lake tables keep exactly-once: rows a table
//!   already holds (by its transaction ids) are not written twice.
//! - `--dlq`: the pipeline's dead letters that were not replayed yet, as their original
//!   records; `--from-table T`: the rows of lake table T. Both are appended to the pipeline's
//!   replay stream `<pipeline>__replay`, which every pipeline reads as an extra source, so
//!   they flow through today's steps into today's sinks like new records (and fail into the
//!   dead letters again if they still fail).
//!
//! A table is read as a stream of batches and appended in chunks as it is read, so it may be
//! larger than a query result may be (`limits.max_query_result_bytes`) or than memory; a
//! table replay interrupted by a crash is not resumed (run it again: what was appended is
//! processed, and the rest with the second run). Dead letters are read as one query result.
//!
//! Dead letters are replayed once: `<data_dir>/pipelines/<name>/dlq-replayed.json` keeps, per
//! source stream and partition, the highest offset replayed. The cursor moves with the copy
//! through a write-ahead intent (cursor + the replay stream's end before the append): after a
//! crash, the copy happened iff the replay stream grew past that end, so a dead letter is
//! neither lost nor replayed twice.

use crate::server::{error_response, App};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sluice_log::Record;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What to replay (exactly one of `dlq`, `table`, `stream` + `from`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    pub dlq: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// SQL condition on the dead letters or table rows.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What a replay started: the pipeline is done with it once its position in `stream` reaches
/// `until` in every partition.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayStarted {
    pub pipeline: String,
    pub stream: String,
    pub records: u64,
    pub from: Vec<u64>,
    pub until: Vec<u64>,
}

type Cursor = BTreeMap<String, i64>;

#[derive(Serialize, Deserialize)]
struct Intent {
    cursor: Cursor,
    replay_end_before: u64,
}

fn write_durably(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    Ok(sluice_core::fs::write_durably(path, data)?)
}

/// Parses `--from`: an offset, an RFC 3339 time, or a date (midnight UTC).
fn parse_from(s: &str) -> anyhow::Result<Result<u64, i64>> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Ok(n));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Err(t.timestamp_millis()));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Err(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_millis()));
    }
    anyhow::bail!("--from {s:?}: use an offset, an RFC 3339 time (2026-11-23T10:00:00Z) or a date (2026-11-23)")
}

/// An error of the request (400) or of the server (500).
enum Failure {
    Bad(String),
    NotFound(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Internal(e)
    }
}

async fn replay(app: &Arc<App>, pipeline: &str, req: ReplayRequest) -> Result<ReplayStarted, Failure> {
    let cfg = app.cfg();
    let Some(pcfg) = cfg.pipelines.get(pipeline) else {
        return Err(Failure::NotFound(format!("no pipeline {pipeline:?}")));
    };
    let chosen = [req.dlq, req.table.is_some(), req.stream.is_some()].iter().filter(|b| **b).count();
    if chosen != 1 {
        return Err(Failure::Bad("replay one of: the dead letters (dlq), a lake table (table), or a stream from a position (stream + from)".into()));
    }
    if let Some(stream) = &req.stream {
        if !pcfg.from.contains(stream) {
            return Err(Failure::Bad(format!("pipeline {pipeline:?} does not read stream {stream:?} (from: {})", pcfg.from.join(", "))));
        }
        let from = parse_from(req.from.as_deref().ok_or_else(|| Failure::Bad("stream needs from (an offset or a time)".into()))?)
            .map_err(|e| Failure::Bad(e.to_string()))?;
        return rewind(app, pipeline, stream, from).await.map_err(Failure::Internal);
    }
    let replay_name = sluice_core::replay_stream(pipeline);
    let replay = app.log.stream(&replay_name).ok_or_else(|| anyhow::anyhow!("replay stream {replay_name} is not open"))?;
    let part = replay.partitions()[0].clone();
    let state = cfg.data_dir.join("pipelines").join(pipeline);
    let _one = app.reloading.lock().await;
    let before = part.next_offset();
    if let Some(table) = &req.table {
        sluice_core::validate_stream_name(table).or_else(|e| if table.ends_with(sluice_core::DLQ_SUFFIX) { Ok(()) } else { Err(e) }).map_err(Failure::Bad)?;
        let cond = req.filter.as_deref().map(|w| format!(" WHERE {w}")).unwrap_or_default();
        // Streamed: a table can be far larger than a query result may be, or than memory.
        let mut rows = match app.query.sql_stream(&format!("SELECT * FROM {table}{cond}")).await {
            Ok((_, rows)) => rows,
            Err(e) if e.is_user_error() || e.to_string().contains("not found") => return Err(Failure::Bad(format!("{e}"))),
            Err(e) => return Err(Failure::Internal(e.into())),
        };
        let now = sluice_core::time::now_ms();
        let mut n = 0u64;
        let mut chunk = Vec::new();
        while let Some(b) = futures::StreamExt::next(&mut rows).await {
            let b = b.map_err(|e| Failure::Internal(anyhow::anyhow!("read {table}: {e}")))?;
            for line in sluice_pipeline::rows_to_json(&b, &cfg.lake.date_column)? {
                chunk.push(Record::new(line, now));
            }
            if chunk.len() >= REPLAY_CHUNK {
                append_durably(&part, &chunk).await?;
                n += chunk.len() as u64;
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            append_durably(&part, &chunk).await?;
            n += chunk.len() as u64;
        }
        tracing::info!(pipeline, records = n, table, "replay: records appended to {replay_name}");
        return Ok(ReplayStarted { pipeline: pipeline.to_string(), stream: replay_name, records: n, from: vec![before], until: vec![part.next_offset()] });
    }
    let cursor_path = state.join("dlq-replayed.json");
    let intent_path = state.join("dlq-replay.intent");
    let mut cursor = settle_intent(&cursor_path, &intent_path, before)?;
    let dlq = format!("{pipeline}{}", sluice_core::DLQ_SUFFIX);
    let cond = req.filter.as_deref().map(|w| format!(" WHERE {w}")).unwrap_or_default();
    let sql = format!("SELECT stream, _partition, _offset, raw FROM {dlq}{cond} ORDER BY stream, _partition, _offset");
    let rows = match app.query.sql(&sql).await {
        Ok(r) => r,
        Err(e) if e.to_string().contains("not found") => return Err(Failure::Bad(format!("pipeline {pipeline:?} has no dead letters ({dlq}): {e}"))),
        Err(e) if e.is_user_error() => return Err(Failure::Bad(format!("{e}"))),
        Err(e) => return Err(Failure::Internal(e.into())),
    };
    let mut records = Vec::new();
    let now = sluice_core::time::now_ms();
    for b in &rows.batches {
        use deltalake::arrow::array::{Array, AsArray};
        use deltalake::arrow::compute::cast;
        use deltalake::arrow::datatypes::{DataType, Int64Type};
        // The engine may answer strings as views and integers narrower: normalise.
        let col = |i: usize, t: DataType| cast(b.column(i), &t).map_err(|e| Failure::Internal(e.into()));
        let (s, p, o, raw) = (col(0, DataType::Utf8)?, col(1, DataType::Int64)?, col(2, DataType::Int64)?, col(3, DataType::Utf8)?);
        let (s, p, o, raw) = (s.as_string::<i32>(), p.as_primitive::<Int64Type>(), o.as_primitive::<Int64Type>(), raw.as_string::<i32>());
        for i in 0..b.num_rows() {
            if s.is_null(i) || p.is_null(i) || o.is_null(i) || raw.is_null(i) {
                continue;
            }
            let key = format!("{}/{}", s.value(i), p.value(i));
            if cursor.get(&key).is_some_and(|c| *c >= o.value(i)) {
                continue;
            }
            cursor.insert(key, o.value(i));
            records.push(Record::new(bytes::Bytes::copy_from_slice(raw.value(i).as_bytes()), now));
        }
    }
    let n = records.len() as u64;
    // The cursor after this replay is noted first: a crash part way through is finished (or
    // dropped) by the next replay (see `settle_intent`).
    let data = serde_json::to_vec(&Intent { cursor: cursor.clone(), replay_end_before: before }).map_err(|e| Failure::Internal(e.into()))?;
    write_durably(&intent_path, &data)?;
    for chunk in records.chunks(REPLAY_CHUNK) {
        append_durably(&part, chunk).await?;
    }
    write_durably(&cursor_path, &serde_json::to_vec(&cursor).map_err(|e| Failure::Internal(e.into()))?)?;
    let _ = std::fs::remove_file(&intent_path);
    tracing::info!(pipeline, records = n, "replay: dead letters appended to {replay_name}");
    Ok(ReplayStarted { pipeline: pipeline.to_string(), stream: replay_name, records: n, from: vec![before], until: vec![part.next_offset()] })
}

/// Records per append of a replay.
const REPLAY_CHUNK: usize = 10_000;

/// One append: one log batch, whole or absent after a crash.
async fn append_durably(part: &sluice_log::Partition, records: &[Record]) -> Result<(), Failure> {
    let a = part.append(records).map_err(|e| Failure::Internal(e.into()))?;
    part.sync(&a).await.map_err(|e| Failure::Internal(e.into()))
}

/// The dead-letter cursor, after finishing or dropping an interrupted copy.
fn settle_intent(cursor_path: &std::path::Path, intent_path: &std::path::Path, replay_end: u64) -> anyhow::Result<Cursor> {
    let read = |p: &std::path::Path| -> anyhow::Result<Option<Vec<u8>>> {
        match std::fs::read(p) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("read {}: {e}", p.display())),
        }
    };
    let mut cursor: Cursor = match read(cursor_path)? {
        Some(d) => serde_json::from_slice(&d).map_err(|e| anyhow::anyhow!("{}: {e}", cursor_path.display()))?,
        None => Cursor::new(),
    };
    if let Some(d) = read(intent_path)? {
        let intent: Intent = serde_json::from_slice(&d).map_err(|e| anyhow::anyhow!("{}: {e}", intent_path.display()))?;
        if replay_end > intent.replay_end_before {
            // The copy reached the log before the crash: its cursor holds.
            cursor = intent.cursor;
            write_durably(cursor_path, &serde_json::to_vec(&cursor)?)?;
        }
        std::fs::remove_file(intent_path)?;
    }
    Ok(cursor)
}

/// Moves the pipeline's position in `stream` back to `from` (never forward).
async fn rewind(app: &Arc<App>, pipeline: &str, stream: &str, from: Result<u64, i64>) -> anyhow::Result<ReplayStarted> {
    let _one = app.reloading.lock().await;
    let s = app.log.stream(stream).ok_or_else(|| anyhow::anyhow!("stream {stream:?} is not open"))?;
    let running = {
        let mut ps = app.pipelines.lock();
        let i = ps.iter().position(|r| r.name == pipeline).ok_or_else(|| anyhow::anyhow!("pipeline {pipeline:?} is not running"))?;
        ps.remove(i)
    };
    let _ = running.halt.send(true);
    let _ = running.task.await;
    let consumer = sluice_pipeline::runtime::consumer_name(pipeline);
    let mut offsets = Vec::new();
    let mut until = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for p in s.partitions() {
            let target = match from {
                Ok(off) => off,
                Err(ts) => p.offset_for_timestamp(ts)?,
            };
            let current = p.committed_offset(&consumer).unwrap_or(0);
            let to = target.max(p.log_start_offset()).min(current);
            p.commit_offset(&consumer, to)?;
            offsets.push(to);
            until.push(p.high_watermark());
        }
        Ok(())
    })();
    // Whatever happened, the pipeline runs again.
    app.start_pipeline(&app.cfg(), pipeline)?;
    result?;
    let records = until.iter().zip(&offsets).map(|(u, f)| u.saturating_sub(*f)).sum();
    tracing::info!(pipeline, stream, ?offsets, "replay: pipeline rewound");
    Ok(ReplayStarted { pipeline: pipeline.to_string(), stream: stream.to_string(), records, from: offsets, until })
}

/// `POST /v1/pipelines/{name}/replay` (with tokens on: write scope '*').
pub async fn replay_endpoint(State(app): State<Arc<App>>, Path(name): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    match app.auth.token(&headers) {
        Err(d) => return app.denied(d),
        Ok(Some(t)) if !t.can_write_all() => return app.denied(crate::auth::Denied::Forbidden("replay needs write scope '*'".into())),
        Ok(_) => {}
    }
    let req: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("replay request: {e}"), None),
    };
    match replay(&app, &name, req).await {
        Ok(started) => axum::Json(started).into_response(),
        Err(Failure::Bad(m)) => error_response(StatusCode::BAD_REQUEST, &m, None),
        Err(Failure::NotFound(m)) => error_response(StatusCode::NOT_FOUND, &m, None),
        Err(Failure::Internal(e)) => app.internal(format!("{e:#}")),
    }
}

/// `sluice replay`: starts a replay on a running server and shows its progress until the
/// pipeline has processed it.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The pipeline to run the records through.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Replay the dead letters of this pipeline (not yet replayed ones).
    #[arg(long, value_name = "PIPELINE", conflicts_with_all = ["from_table", "stream"])]
    pub dlq: Option<String>,
    /// Re-read this lake table into the pipeline.
    #[arg(long, value_name = "TABLE", conflicts_with = "stream")]
    pub from_table: Option<String>,
    /// Reprocess this stream's retained records ...
    #[arg(long, requires = "from")]
    pub stream: Option<String>,
    /// ... from this offset, RFC 3339 time or date.
    #[arg(long)]
    pub from: Option<String>,
    /// Only dead letters / table rows matching this SQL condition.
    #[arg(long = "where")]
    pub filter: Option<String>,
    /// Do not wait for the pipeline to process the records.
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

pub async fn run_cli(args: ReplayArgs) -> anyhow::Result<()> {
    let pipeline = args
        .dlq
        .clone()
        .or(args.pipeline.clone())
        .ok_or_else(|| anyhow::anyhow!("name the pipeline: --pipeline P (or --dlq P)"))?;
    let req = ReplayRequest { dlq: args.dlq.is_some(), table: args.from_table.clone(), filter: args.filter.clone(), stream: args.stream.clone(), from: args.from.clone() };
    if args.dlq.is_none() && args.from_table.is_none() && args.stream.is_none() {
        anyhow::bail!("say what to replay: --dlq P, --from-table T or --stream S --from OFFSET|TIME");
    }
    let base = args.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let auth = |rb: reqwest::RequestBuilder| match &args.token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let resp = auth(client.post(format!("{base}/v1/pipelines/{pipeline}/replay")).body(serde_json::to_vec(&req)?))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(text);
        anyhow::bail!("replay refused ({status}): {msg}");
    }
    let started: ReplayStarted = serde_json::from_str(&text)?;
    if !args.quiet {
        eprintln!("replaying {} records of {} through pipeline {}", started.records, started.stream, started.pipeline);
    }
    if args.no_wait || started.records == 0 {
        println!("{}", serde_json::to_string(&started)?);
        return Ok(());
    }
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(started.records) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let r = auth(client.get(format!("{base}/v1/pipelines"))).send().await?;
        let v: serde_json::Value = serde_json::from_str(&r.text().await?)?;
        let p = v["pipelines"].as_array().and_then(|a| a.iter().find(|p| p["name"] == pipeline.as_str())).cloned();
        let next: Option<Vec<u64>> = p.as_ref().and_then(|p| {
            p["positions"].as_array()?.iter().find(|s| s["stream"] == started.stream.as_str()).map(|s| {
                s["next_offsets"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default()
            })
        });
        if let Some(next) = next {
            let done: u64 = next.iter().zip(&started.from).zip(&started.until).map(|((n, f), u)| n.min(u).saturating_sub(*f)).sum();
            bar.set_position(done);
            if done >= started.records {
                break;
            }
        }
        if let Some(err) = p.as_ref().and_then(|p| p["error"].as_str()) {
            bar.println(format!("pipeline error (it retries): {err}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bar.finish();
    println!("{}", serde_json::to_string(&started)?);
    Ok(())
}
