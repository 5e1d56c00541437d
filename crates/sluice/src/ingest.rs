//! `POST /v1/streams/{stream}/events`: parse, partition, append, group-commit, reply.

use crate::server::{error_response, App};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_connect::http::{decode_body, decode_zstd_with_dictionary, parse_events, partition_for_key, Encoding, IngestError};
use sluice_log::Record;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

#[derive(Serialize)]
struct PartitionAck {
    partition: u32,
    first_offset: u64,
    last_offset: u64,
    records: usize,
}

#[derive(Serialize)]
struct Ack {
    stream: String,
    records: usize,
    partitions: Vec<PartitionAck>,
}

pub async fn post_events(State(app): State<Arc<App>>, Path(stream): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let res = handle(&app, &stream, &headers, body).await;
    let status = match &res {
        Ok(_) => 200,
        Err(r) => r.status().as_u16(),
    };
    metrics::counter!("sluice_ingest_requests_total", "stream" => stream.clone(), "status" => status.to_string()).increment(1);
    match res {
        Ok(r) => r,
        Err(r) => r,
    }
}

async fn handle(app: &App, stream: &str, headers: &HeaderMap, body: Bytes) -> Result<Response, Response> {
    app.auth.check_write(headers, stream).map_err(|d| app.denied(d))?;
    if app.shutting_down.load(Ordering::Acquire) {
        return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down", Some(5)));
    }
    let encoding = Encoding::from_header(headers.get("content-encoding").and_then(|v| v.to_str().ok()))
        .map_err(|e| ingest_error(&e))?;
    let cfg = app.cfg();
    let limits = &cfg.limits;
    if body.len() as u64 > limits.max_body_bytes {
        return Err(ingest_error(&IngestError::TooLarge { limit: limits.max_body_bytes, what: "in the request body" }));
    }
    let log_stream = app.stream_for_write(stream)?;
    app.check_backpressure(&log_stream)?;
    // A body compressed with the stream's trained dictionary names it.
    let dict = match headers.get("sluice-dictionary-id") {
        None => None,
        Some(v) => {
            let bad = |m: String| error_response(StatusCode::BAD_REQUEST, &m, None);
            if encoding != Encoding::Zstd {
                return Err(bad("Sluice-Dictionary-Id needs Content-Encoding: zstd".into()));
            }
            let id = v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or_else(|| bad(format!("Sluice-Dictionary-Id {v:?} is not a dictionary id")))?;
            Some(log_stream.dictionary_for_wire(id).map_err(bad)?)
        }
    };

    // Memory bound: at most max_inflight_bytes of decoded bodies are being handled at once.
    let reserve = match encoding {
        Encoding::Identity => body.len() as u64,
        _ => limits.max_decoded_bytes.min((body.len() as u64).saturating_mul(20)),
    }
    .max(1)
    .min(u32::MAX as u64) as u32;
    let _permit = app.inflight.clone().try_acquire_many_owned(reserve).map_err(|_| {
        error_response(StatusCode::TOO_MANY_REQUESTS, "too many bytes in flight: retry shortly", Some(1))
    })?;

    let decoded: Bytes = match &dict {
        Some(d) => decode_zstd_with_dictionary(&body, d.decoder_dictionary(), limits.max_decoded_bytes)
            .map_err(|e| ingest_error(&e))?
            .into(),
        None => match decode_body(encoding, &body, limits.max_decoded_bytes).map_err(|e| ingest_error(&e))? {
            std::borrow::Cow::Borrowed(_) => body.clone(),
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        },
    };
    let cfg = app.cfg();
    let settings = cfg.stream(stream);
    let parsed = parse_events(&decoded, settings.key_field.as_deref(), settings.event_time_field.as_deref())
        .map_err(|e| ingest_error(&IngestError::BadRecord(e)))?;
    if parsed.is_empty() {
        return Err(ingest_error(&IngestError::Empty));
    }

    // Partition: by key hash when a key field is configured, else the whole request goes to
    // the next partition in turn (one fsync per request).
    let n = log_stream.partitions().len() as u32;
    let now = sluice_core::time::now_ms();
    let rr = (app.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64) as u32;
    // Sized up front (all in one group without a key; about even by hash with one).
    let room = |p: u32| match settings.key_field {
        Some(_) => parsed.len() / n as usize + parsed.len() / (8 * n as usize) + 1,
        None if p == rr => parsed.len(),
        None => 0,
    };
    let mut groups: Vec<Vec<Record>> = (0..n).map(|p| Vec::with_capacity(room(p))).collect();
    for r in &parsed {
        let p = match &r.key {
            Some(k) => partition_for_key(k, n),
            None => rr,
        };
        groups[p as usize].push(Record {
            key: r.key.as_ref().map(|k| Bytes::copy_from_slice(k)),
            value: decoded.slice_ref(r.raw),
            timestamp_ms: r.time_ms.unwrap_or(now),
            template: None,
        });
    }
    let records = parsed.len();
    drop(parsed);

    let started = Instant::now();
    let mut appended = Vec::new();
    for (p, recs) in groups.iter().enumerate() {
        if recs.is_empty() {
            continue;
        }
        let part = &log_stream.partitions()[p];
        let a = part.append(recs).map_err(|e| app.internal(format!("append to {stream}/{p}: {e}")))?;
        appended.push((part.clone(), a, recs.len()));
    }
    let syncs = appended.iter().map(|(part, a, _)| part.sync(a));
    for r in futures::future::join_all(syncs).await {
        r.map_err(|e| app.internal(format!("sync {stream}: {e}")))?;
    }
    metrics::histogram!("sluice_log_sync_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("sluice_ingest_records_total", "stream" => stream.to_string()).increment(records as u64);
    metrics::counter!("sluice_ingest_bytes_total", "stream" => stream.to_string()).increment(decoded.len() as u64);

    let ack = Ack {
        stream: stream.to_string(),
        records,
        partitions: appended
            .iter()
            .map(|(part, a, count)| PartitionAck { partition: part.id(), first_offset: a.first_offset, last_offset: a.last_offset, records: *count })
            .collect(),
    };
    Ok((StatusCode::OK, axum::Json(ack)).into_response())
}

fn ingest_error(e: &IngestError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error_response(status, &e.to_string(), None)
}
