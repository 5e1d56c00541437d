//! The `enrich` step: one HTTP call per distinct request in a batch, the JSON answer merged
//! under a field as a struct column.
//!
//! - `${SQL}` placeholders in the URL and body are evaluated on the whole batch (one vectorized
//!   expression each); a record with a NULL placeholder gets NULL and no call.
//! - Records that render the same request share one call, and answers are cached (TTL and
//!   entry bound), so a hot key costs one call per TTL.
//! - With `batch_size` above 1, the misses that render the same URL go in POSTs of up to
//!   `batch_size` bodies as one JSON array; the service answers a JSON array in the same order.
//! - Calls run `concurrency` at a time; each has a timeout and is retried on connection
//!   errors, timeouts, 429 and 5xx with exponential backoff and jitter. 404 means "nothing
//!   known": NULL, not an error. A failure after the retries follows `on_error`.
//! - The step runs inside the pipeline's processing of one flush, so a slow service slows the
//!   pipeline (its lag grows, the log holds the records) and memory stays bounded by one flush.
//!   The flush's batches overlap: the next batch's calls start before the current one is
//!   finished ([`Enricher::start`] / [`Enricher::finish`]), within the same `concurrency`.
//! - Answers are converted to Arrow like stream records (inferred types, evolving), so nested
//!   answers are queryable as `into.field.sub`.

use crate::expr::{Map, StepError};
use crate::step::{Failure, StepStats};
use bytes::Bytes;
use deltalake::arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch, StructArray, UInt32Array};
use deltalake::arrow::buffer::NullBuffer;
use deltalake::arrow::compute::{cast, concat_batches, filter_record_batch, take};
use deltalake::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use futures::StreamExt;
use sluice_core::pipeline::{EnrichConfig, OnError};
use sluice_lake::convert::{self, ConvertOptions, InputRecord};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest answer accepted (bytes).
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

enum Piece {
    Lit(String),
    /// Index into the step's placeholder expressions.
    Expr(usize),
}

fn template(t: &str, first: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = t;
    let mut n = first;
    while let Some(i) = rest.find("${") {
        pieces.push(Piece::Lit(rest[..i].to_string()));
        let after = &rest[i + 2..];
        let end = after.find('}').unwrap_or(after.len());
        pieces.push(Piece::Expr(n));
        n += 1;
        rest = after.get(end + 1..).unwrap_or("");
    }
    pieces.push(Piece::Lit(rest.to_string()));
    pieces
}

/// A request as rendered for one record: the cache key too.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Request {
    url: String,
    body: Option<String>,
}

/// Cached answers: `None` = 404.
struct Cache {
    ttl: Duration,
    max: usize,
    map: HashMap<Request, (Instant, Option<Bytes>)>,
    order: VecDeque<(Instant, Request)>,
}

impl Cache {
    fn get(&self, r: &Request) -> Option<Option<Bytes>> {
        let (at, v) = self.map.get(r)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    fn put(&mut self, r: Request, v: Option<Bytes>) {
        if self.ttl.is_zero() || self.max == 0 {
            return;
        }
        let now = Instant::now();
        self.map.insert(r.clone(), (now, v));
        self.order.push_back((now, r));
        while self.map.len() > self.max || self.order.front().is_some_and(|(t, _)| t.elapsed() >= self.ttl) {
            let Some((t, old)) = self.order.pop_front() else { break };
            // Only drop the entry if it was not refreshed after this insertion.
            if self.map.get(&old).is_some_and(|(at, _)| *at == t) {
                self.map.remove(&old);
            }
        }
    }
}

/// The running state of one `enrich` step.
pub struct Enricher {
    cfg: EnrichConfig,
    client: reqwest::Client,
    url: Vec<Piece>,
    body: Option<Vec<Piece>>,
    /// All `${...}` expressions: the URL's, then the body's.
    exprs: Vec<String>,
    cache: Cache,
    /// The answers' inferred schema so far.
    answers: Option<SchemaRef>,
    /// Calls in flight, over every batch being enriched at once: `concurrency` permits.
    permits: Arc<tokio::sync::Semaphore>,
    /// The calls of the last batch started (in flight until it is finished): a later batch
    /// of the same run that renders one of them waits for that call instead of repeating it.
    in_flight: std::collections::HashSet<Request>,
    /// The answers of the last batch finished, for the requests a later batch shares with it.
    last_answers: HashMap<Request, Result<Option<Bytes>, String>>,
}

/// One batch whose calls are under way (see [`Enricher::start`]).
pub struct Started {
    /// Per row: its request (None: a NULL placeholder, no call).
    requests: Vec<Option<Request>>,
    /// Answers known when the batch started (the cache).
    answers: HashMap<Request, Result<Option<Bytes>, String>>,
    /// Requests another batch's calls answer.
    shared: Vec<Request>,
    calls: Calls,
}

enum Calls {
    Running(tokio::runtime::Handle, tokio::task::JoinHandle<Vec<(Request, Result<Option<Bytes>, String>)>>),
    Done(Vec<(Request, Result<Option<Bytes>, String>)>),
}

/// The HTTP client of enrich steps and webhook sinks: `http://` and `https://` (rustls, the
/// system's roots), plus the CA certificates of `ca_file` (PEM) when given.
pub fn http_client(timeout: std::time::Duration, concurrency: usize, ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder().timeout(timeout).pool_max_idle_per_host(concurrency);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| format!("HTTP client: {e}"))
}

impl Enricher {
    pub fn new(cfg: &EnrichConfig) -> Enricher {
        let url_exprs = EnrichConfig::placeholders(&cfg.url).unwrap_or_default();
        let body_exprs = cfg.body.as_deref().map(|b| EnrichConfig::placeholders(b).unwrap_or_default()).unwrap_or_default();
        let url = template(&cfg.url, 0);
        let body = cfg.body.as_deref().map(|b| template(b, url_exprs.len()));
        let mut exprs = url_exprs;
        exprs.extend(body_exprs);
        // The config check built this client already; should the CA file have changed
        // since, the calls fail (and follow `on_error`) with the error logged here.
        let client = http_client(cfg.timeout, cfg.concurrency, cfg.ca_file.as_deref()).unwrap_or_else(|e| {
            tracing::error!(url = %cfg.url, error = %e, "enrich: HTTP client without the configured CA file");
            reqwest::Client::builder().timeout(cfg.timeout).build().unwrap_or_default()
        });
        Enricher {
            cache: Cache { ttl: cfg.cache_ttl, max: cfg.cache_entries, map: HashMap::new(), order: VecDeque::new() },
            cfg: cfg.clone(),
            client,
            url,
            body,
            exprs,
            answers: None,
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1))),
            in_flight: Default::default(),
            last_answers: HashMap::new(),
        }
    }

    /// The `(name, SQL)` list that evaluates every placeholder as text.
    pub fn placeholder_fields(&self) -> Vec<(String, String)> {
        self.exprs.iter().enumerate().map(|(i, e)| (format!("p{i}"), format!("CAST(({e}) AS VARCHAR)"))).collect()
    }

    /// The SQL expressions the step reads.
    pub fn expressions(&self) -> &[String] {
        &self.exprs
    }

    /// Enriches `batch` (placeholders compiled as `values`); failing rows are left out of the
    /// result and returned as failures.
    pub fn apply(&mut self, values: &Map, batch: &RecordBatch, stats: &StepStats) -> Result<(RecordBatch, Vec<Failure>), StepError> {
        let started = self.start(values, batch, stats)?;
        let out = self.finish(started, batch);
        self.end_run();
        out
    }

    /// Starts enriching `batch`: renders its requests, answers what the cache knows and sets
    /// its calls going (on the runtime this step runs under, `concurrency` at a time over all
    /// started batches). [`Enricher::finish`] waits for them; batches are finished in the
    /// order they were started, and a run of them ends with [`Enricher::end_run`]. Starting
    /// the next batch before finishing this one keeps the calls going while this thread
    /// renders and converts.
    pub fn start(&mut self, values: &Map, batch: &RecordBatch, stats: &StepStats) -> Result<Started, StepError> {
        let rows = batch.num_rows();
        let v = values.apply(batch)?;
        // As text (the SQL casts may give Utf8View or Utf8, depending on the expression).
        let cols = v
            .columns()
            .iter()
            .map(|c| {
                let c = cast(c, &DataType::Utf8).map_err(|e| eval_err(e.to_string()))?;
                c.as_string_opt::<i32>().cloned().ok_or_else(|| eval_err("placeholder is not text".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let render = |pieces: &[Piece], row: usize, json: bool| -> Option<String> {
            let mut s = String::new();
            for p in pieces {
                match p {
                    Piece::Lit(l) => s.push_str(l),
                    Piece::Expr(i) => {
                        let c = &cols[*i];
                        if c.is_null(row) {
                            return None;
                        }
                        let value = c.value(row);
                        if json {
                            let quoted = serde_json_escape(value);
                            s.push_str(&quoted);
                        } else {
                            s.push_str(&url_encode(value));
                        }
                    }
                }
            }
            Some(s)
        };
        let requests: Vec<Option<Request>> = (0..rows)
            .map(|row| {
                let url = render(&self.url, row, false)?;
                let body = match &self.body {
                    Some(b) => Some(render(b, row, true)?),
                    None => None,
                };
                Some(Request { url, body })
            })
            .collect();

        // Distinct requests neither in the cache nor in flight for the batch before are fetched.
        let mut answers: HashMap<Request, Result<Option<Bytes>, String>> = HashMap::new();
        let mut misses: Vec<Request> = Vec::new();
        let mut missed: std::collections::HashSet<Request> = std::collections::HashSet::new();
        let mut shared: std::collections::HashSet<Request> = std::collections::HashSet::new();
        for r in requests.iter().flatten() {
            if answers.contains_key(r) || missed.contains(r) || shared.contains(r) {
                continue;
            }
            if self.in_flight.contains(r) {
                shared.insert(r.clone());
                continue;
            }
            match self.cache.get(r) {
                Some(v) => {
                    stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    answers.insert(r.clone(), Ok(v));
                }
                None => {
                    missed.insert(r.clone());
                    misses.push(r.clone());
                }
            }
        }
        // Rows sharing a request (in this batch or with the one before) count as hits.
        let distinct = answers.len() + misses.len();
        stats.cache_hits.fetch_add(requests.iter().flatten().count().saturating_sub(distinct) as u64, Ordering::Relaxed);
        stats.cache_misses.fetch_add(misses.len() as u64, Ordering::Relaxed);
        self.in_flight = missed;
        let calls = self.call(misses);
        Ok(Started { requests, answers, shared: shared.into_iter().collect(), calls })
    }

    /// Forgets the calls of the batches of a run (see [`Enricher::start`]): a later run
    /// shares answers only through the cache.
    pub fn end_run(&mut self) {
        self.in_flight.clear();
        self.last_answers.clear();
    }

    /// Waits for a started batch's calls and builds its output: `batch` (the one given to
    /// `start`) with the answers under the step's field, failing rows left out.
    pub fn finish(&mut self, started: Started, batch: &RecordBatch) -> Result<(RecordBatch, Vec<Failure>), StepError> {
        let Started { requests, mut answers, shared, calls } = started;
        let rows = batch.num_rows();
        let fetched = match calls {
            Calls::Done(v) => v,
            Calls::Running(h, task) => match tokio::task::block_in_place(|| h.block_on(task)) {
                Ok(v) => v,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => vec![(Request { url: String::new(), body: None }, Err(format!("enrich calls stopped: {e}")))],
            },
        };
        for r in shared {
            let a = self.last_answers.get(&r).cloned().or_else(|| self.cache.get(&r).map(Ok));
            answers.insert(r, a.unwrap_or_else(|| Err("enrich call of an earlier batch stopped".into())));
        }
        let fetched: HashMap<_, _> = fetched.into_iter().collect();
        for (r, res) in &fetched {
            if let Ok(v) = res {
                self.cache.put(r.clone(), v.clone());
            }
            answers.insert(r.clone(), res.clone());
        }
        self.last_answers = fetched;

        // One JSON object per row that has an answer.
        let mut failures = Vec::new();
        let mut bodies: Vec<(usize, Bytes)> = Vec::new();
        for (row, r) in requests.iter().enumerate() {
            let Some(r) = r else { continue };
            match answers.get(r) {
                Some(Ok(Some(b))) => bodies.push((row, b.clone())),
                Some(Ok(None)) | None => {}
                Some(Err(e)) => match self.cfg.on_error {
                    OnError::Null => {}
                    _ => failures.push(Failure { row, error: format!("enrich {}: {e}", r.url) }),
                },
            }
        }
        let inputs: Vec<InputRecord> = bodies
            .iter()
            .map(|(row, b)| InputRecord { partition: 0, offset: *row as u64, timestamp_ms: 0, value: b })
            .collect();
        let converted = convert::convert(self.answers.as_deref(), &inputs, &ConvertOptions::default());
        for r in &converted.rejects {
            let error = format!("enrich answer does not fit: {}", r.reason);
            match self.cfg.on_error {
                OnError::Null => {}
                _ => failures.push(Failure { row: r.offset as usize, error }),
            }
        }
        self.answers = Some(converted.schema.clone());
        let column = struct_column(&converted, rows)?;
        failures.sort_by_key(|f| f.row);

        let keep: Vec<bool> = {
            let mut k = vec![true; rows];
            for f in &failures {
                k[f.row] = false;
            }
            k
        };
        let out = with_column(batch, &self.cfg.into, column)?;
        let out = if failures.is_empty() {
            out
        } else {
            filter_record_batch(&out, &keep.into()).map_err(|e| eval_err(e.to_string()))?
        };
        Ok((out, failures))
    }

    /// Sets the calls for `requests` going: one call per request, or per group of up to
    /// `batch_size` requests to one URL, each holding one of the step's `concurrency`
    /// permits while it runs. They run as one task of the runtime this step runs under
    /// (woken where its I/O is polled); without a runtime, here and now.
    fn call(&self, requests: Vec<Request>) -> Calls {
        if requests.is_empty() {
            return Calls::Done(Vec::new());
        }
        let caller = Caller { client: self.client.clone(), cfg: self.cfg.clone(), permits: self.permits.clone() };
        let work = async move {
            let caller = &caller;
            let concurrency = caller.cfg.concurrency.max(1);
            if caller.cfg.batch_size > 1 {
                futures::stream::iter(group_by_url(requests, caller.cfg.batch_size).into_iter().map(|g| async move {
                    let _permit = caller.permits.acquire().await;
                    caller.fetch_batch(g).await
                }))
                .buffer_unordered(concurrency)
                .flat_map(futures::stream::iter)
                .collect::<Vec<_>>()
                .await
            } else {
                futures::stream::iter(requests.into_iter().map(|r| async move {
                    let _permit = caller.permits.acquire().await;
                    let res = caller.fetch(&r.url, r.body.as_deref()).await;
                    (r, res)
                }))
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>()
                .await
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => Calls::Running(h.clone(), h.spawn(work)),
            Err(_) => Calls::Done(match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(work),
                Err(e) => Vec::from_iter(std::iter::once((Request { url: String::new(), body: None }, Err(e.to_string())))),
            }),
        }
    }
}

/// What the calls of one batch need, owned by the task that makes them.
struct Caller {
    client: reqwest::Client,
    cfg: EnrichConfig,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Caller {
    /// One call for a group of requests to the same URL: their bodies as a JSON array; the
    /// answer is a JSON array of as many answers (`null`: nothing known). A failed call fails
    /// every request of the group.
    async fn fetch_batch(&self, group: Vec<Request>) -> Vec<(Request, Result<Option<Bytes>, String>)> {
        let Some(url) = group.first().map(|r| r.url.clone()) else { return Vec::new() };
        let mut body = String::from("[");
        for (i, r) in group.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(r.body.as_deref().unwrap_or("null"));
        }
        body.push(']');
        let answers: Result<Vec<Option<Bytes>>, String> = match self.fetch(&url, Some(&body)).await {
            Ok(Some(b)) => match serde_json::from_slice::<Vec<serde_json::Value>>(&b) {
                Ok(items) if items.len() == group.len() => {
                    Ok(items.into_iter().map(|v| (!v.is_null()).then(|| Bytes::from(v.to_string()))).collect())
                }
                Ok(items) => Err(format!("batch of {} got {} answers", group.len(), items.len())),
                Err(e) => Err(format!("batch answer is not a JSON array: {e}")),
            },
            Ok(None) => Ok(vec![None; group.len()]),
            Err(e) => Err(e),
        };
        match answers {
            Ok(a) => group.into_iter().zip(a).map(|(r, a)| (r, Ok(a))).collect(),
            Err(e) => group.into_iter().map(|r| (r, Err(e.clone()))).collect(),
        }
    }

    async fn fetch(&self, url: &str, body: Option<&str>) -> Result<Option<Bytes>, String> {
        let mut attempt: u32 = 0;
        loop {
            let mut req = match body {
                Some(b) => self.client.post(url).header("content-type", "application/json").body(b.to_string()),
                None if self.cfg.method == "POST" => self.client.post(url),
                None => self.client.get(url),
            };
            for (k, v) in &self.cfg.headers {
                req = req.header(k, v);
            }
            let error = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.as_u16() == 404 {
                        return Ok(None);
                    }
                    if status.is_success() {
                        match read_body(resp).await {
                            Ok(b) => return Ok(Some(b)),
                            Err(e) => e,
                        }
                    } else {
                        let text = resp.text().await.unwrap_or_default();
                        let msg = format!("HTTP {status}: {}", text.chars().take(200).collect::<String>());
                        if !(status.as_u16() == 429 || status.is_server_error()) {
                            return Err(msg);
                        }
                        msg
                    }
                }
                Err(e) => describe(&e),
            };
            attempt += 1;
            if self.cfg.on_error != OnError::Retry && attempt > self.cfg.retries {
                return Err(format!("{error} (after {attempt} attempts)"));
            }
            let exp = self.cfg.backoff.saturating_mul(1u32 << (attempt - 1).min(16)).min(MAX_BACKOFF);
            // Full jitter between half and all of the delay, so retries of many records spread out.
            tokio::time::sleep(exp.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        }
    }
}

/// Requests in groups of at most `size` with the same URL, in first-seen order.
fn group_by_url(requests: Vec<Request>, size: usize) -> Vec<Vec<Request>> {
    let mut groups: Vec<Vec<Request>> = Vec::new();
    let mut open: HashMap<String, usize> = HashMap::new();
    for r in requests {
        match open.get(&r.url) {
            Some(&g) if groups[g].len() < size => groups[g].push(r),
            _ => {
                open.insert(r.url.clone(), groups.len());
                groups.push(vec![r]);
            }
        }
    }
    groups
}

async fn read_body(mut resp: reqwest::Response) -> Result<Bytes, String> {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > MAX_RESPONSE_BYTES {
                    return Err(format!("answer larger than {MAX_RESPONSE_BYTES} bytes"));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(Bytes::from(out)),
            Err(e) => return Err(describe(&e)),
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn eval_err(message: String) -> StepError {
    StepError::Eval { step: "enrich", expr: String::new(), message }
}

/// The answers as one struct column of `rows` rows (NULL where there is none), or a NULL
/// column when no answer had any field.
pub(crate) fn struct_column(c: &convert::Converted, rows: usize) -> Result<ArrayRef, StepError> {
    let data: Vec<usize> = c
        .schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.name().starts_with('_') && f.name() != convert::DEFAULT_DATE_COLUMN)
        .map(|(i, _)| i)
        .collect();
    if data.is_empty() {
        return Ok(new_null_array(&DataType::Null, rows));
    }
    let all = concat_batches(&c.schema, &c.batches).map_err(|e| eval_err(e.to_string()))?;
    let offsets = all.column_by_name(convert::OFFSET_COLUMN).map(|o| o.as_primitive::<deltalake::arrow::datatypes::Int64Type>().clone());
    let mut index: Vec<Option<u32>> = vec![None; rows];
    if let Some(o) = offsets {
        for (i, row) in o.values().iter().enumerate() {
            if let Some(slot) = index.get_mut(*row as usize) {
                *slot = Some(i as u32);
            }
        }
    }
    let indices = UInt32Array::from(index.clone());
    let fields: Vec<Field> = data.iter().map(|i| c.schema.field(*i).clone()).collect();
    let columns: Vec<ArrayRef> = data
        .iter()
        .map(|i| take(all.column(*i).as_ref(), &indices, None))
        .collect::<Result<_, _>>()
        .map_err(|e| eval_err(e.to_string()))?;
    let nulls = NullBuffer::from(index.iter().map(|i| i.is_some()).collect::<Vec<bool>>());
    let s = StructArray::try_new(Fields::from(fields), columns, Some(nulls)).map_err(|e| eval_err(e.to_string()))?;
    Ok(Arc::new(s))
}

/// `batch` with `column` as field `name`: replacing a field of that name, else before the
/// system columns.
pub(crate) fn with_column(batch: &RecordBatch, name: &str, column: ArrayRef) -> Result<RecordBatch, StepError> {
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    let field = Field::new(name, column.data_type().clone(), true);
    match schema.index_of(name) {
        Ok(i) => {
            fields[i] = field;
            cols[i] = column;
        }
        Err(_) => {
            let at = fields.iter().position(|f| f.name().starts_with('_')).unwrap_or(fields.len());
            fields.insert(at, field);
            cols.insert(at, column);
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())), cols).map_err(|e| eval_err(e.to_string()))
}

/// `s` JSON-escaped, without the surrounding quotes.
fn serde_json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a path segment or a
/// query value.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_escaping() {
        let t = template("http://h/u/${id}?q=${a.b}", 0);
        assert_eq!(t.len(), 5);
        assert!(matches!(&t[0], Piece::Lit(l) if l == "http://h/u/"));
        assert!(matches!(t[1], Piece::Expr(0)));
        assert!(matches!(t[3], Piece::Expr(1)));
        assert_eq!(url_encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(serde_json_escape("a\"b\\\n"), "a\\\"b\\\\\\n");
    }

    #[test]
    fn cache_expires_and_is_bounded() {
        let mut c = Cache { ttl: Duration::from_secs(60), max: 2, map: HashMap::new(), order: VecDeque::new() };
        let r = |u: &str| Request { url: u.into(), body: None };
        c.put(r("a"), Some(Bytes::from_static(b"1")));
        c.put(r("b"), None);
        assert_eq!(c.get(&r("a")), Some(Some(Bytes::from_static(b"1"))));
        assert_eq!(c.get(&r("b")), Some(None));
        c.put(r("c"), None);
        assert_eq!(c.get(&r("a")), None, "oldest dropped");
        assert_eq!(c.map.len(), 2);
        let mut c = Cache { ttl: Duration::ZERO, max: 10, map: HashMap::new(), order: VecDeque::new() };
        c.put(r("a"), None);
        assert_eq!(c.get(&r("a")), None);
    }
}
