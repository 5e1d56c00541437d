//! `sluice up`: the HTTP server and the tasks behind it (lake sinks, retention, gauges).

use crate::auth::{Auth, Denied};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::compression::Predicate;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use sluice_core::pipeline::SinkConfig;
use sluice_core::Config;
use sluice_lake::sink::{LakeSink, SinkOptions, SinkStatus};
use sluice_log::{Codec, FlushPolicy, Log, LogConfig, Stream, StreamOptions};
use sluice_pipeline::{Pipeline, PipelineSpec, PipelineStatus};
use sluice_query::{render, OutputFormat, QueryEngine, QueryLimits};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// Everything a request handler needs.
pub struct App {
    /// The config in effect; `sluice reload` replaces it (see [`crate::reload`]).
    cfg: parking_lot::RwLock<Arc<Config>>,
    /// The file it was read from (None: started without one, nothing to reload).
    pub config_path: Option<std::path::PathBuf>,
    pub auth: Auth,
    pub log: Arc<Log>,
    pub query: QueryEngine,
    pub inflight: Arc<Semaphore>,
    pub round_robin: AtomicU64,
    pub shutting_down: AtomicBool,
    pub(crate) sinks: parking_lot::Mutex<HashMap<String, LakeTask>>,
    pub(crate) pipelines: parking_lot::Mutex<Vec<RunningPipeline>>,
    /// Change-data-capture sources, running.
    pub(crate) sources: parking_lot::Mutex<Vec<RunningSource>>,
    stop_sinks: watch::Sender<bool>,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    metrics: PrometheusHandle,
}

/// A stream's lake sink task.
pub(crate) struct LakeTask {
    pub status: Arc<SinkStatus>,
    pub task: JoinHandle<()>,
}

/// A pipeline task and what stops it.
pub(crate) struct RunningPipeline {
    pub name: String,
    pub cfg: sluice_core::pipeline::PipelineConfig,
    pub status: Arc<PipelineStatus>,
    pub halt: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

/// A change-data-capture source task.
pub(crate) struct RunningSource {
    pub status: Arc<sluice_connect::postgres_cdc::SourceStatus>,
    pub snapshots: sluice_connect::postgres_cdc::SnapshotSender,
    pub task: JoinHandle<()>,
}

/// A JSON error body `{"error": "..."}` with an optional Retry-After (seconds).
pub fn error_response(status: StatusCode, message: &str, retry_after: Option<u64>) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if let Some(s) = retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

impl App {
    /// The config in effect.
    pub fn cfg(&self) -> Arc<Config> {
        self.cfg.read().clone()
    }

    pub(crate) fn set_cfg(&self, cfg: Config) {
        *self.cfg.write() = Arc::new(cfg);
    }

    pub fn denied(&self, d: Denied) -> Response {
        match d {
            Denied::Unauthenticated(m) => {
                let mut r = error_response(StatusCode::UNAUTHORIZED, m, None);
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Denied::Forbidden(m) => error_response(StatusCode::FORBIDDEN, &m, None),
        }
    }

    /// Ok when tokens are off or the request's token has read scope `'*'`; else the 401/403
    /// to send (`what` says what needed it).
    pub fn require_read_all(&self, headers: &HeaderMap, what: &str) -> Result<(), Response> {
        match self.auth.token(headers) {
            Err(d) => Err(self.denied(d)),
            Ok(Some(t)) if !t.can_read_all() => Err(self.denied(Denied::Forbidden(format!("{what} needs read scope '*'")))),
            Ok(_) => Ok(()),
        }
    }

    /// Ok when tokens are off or the request's token may read `stream`.
    pub fn require_read(&self, headers: &HeaderMap, stream: &str) -> Result<(), Response> {
        match self.auth.token(headers) {
            Err(d) => Err(self.denied(d)),
            Ok(Some(t)) if !t.can_read(stream) => Err(self.denied(Denied::Forbidden(format!("reading stream {stream:?} needs read scope for it")))),
            Ok(_) => Ok(()),
        }
    }

    pub fn internal(&self, message: String) -> Response {
        tracing::error!(error = message, "internal error");
        error_response(StatusCode::INTERNAL_SERVER_ERROR, &message, None)
    }

    /// The log stream to write to, created (with its lake sink) on first write when allowed.
    pub fn stream_for_write(&self, name: &str) -> Result<Arc<Stream>, Response> {
        // The name test first: it keeps the sources' locks off the ingest path.
        if let Some(source) = self.cfg().cdc_source_of(name).and_then(|_| self.source_of_stream(name)) {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!("stream {name:?} holds the changes source {source:?} captures; it takes no other writes"),
                None,
            ));
        }
        if let Some(s) = self.log.stream(name) {
            return Ok(s);
        }
        let cfg = self.cfg();
        if !cfg.auto_create_streams && !cfg.streams.contains_key(name) {
            return Err(error_response(StatusCode::NOT_FOUND, &format!("unknown stream {name:?} (auto_create_streams is off)"), None));
        }
        if let Some(p) = cfg.pipeline_of_table(name) {
            return Err(error_response(
                StatusCode::CONFLICT,
                &format!("{name:?} is a table of pipeline {p:?}; a stream of that name would land in it (declare the stream or choose another name)"),
                None,
            ));
        }
        sluice_core::validate_stream_name(name).map_err(|m| error_response(StatusCode::BAD_REQUEST, &m, None))?;
        let s = self.open_stream(name).map_err(|e| self.internal(format!("create stream {name}: {e:#}")))?;
        Ok(s)
    }

    pub(crate) fn open_stream(&self, name: &str) -> anyhow::Result<Arc<Stream>> {
        let cfg = self.cfg();
        let sc = cfg.stream(name);
        let stream = self.log.create_stream(
            name,
            stream_options(sc, sc.partitions),
        )?;
        self.ensure_sink(&stream);
        Ok(stream)
    }

    pub(crate) fn ensure_sink(&self, stream: &Arc<Stream>) {
        let cfg = self.cfg();
        // A pipeline's source lands where its pipelines send it; a replay stream is only
        // ever a pipeline's source; a pipeline writes its dead-letter table itself.
        let name = stream.name();
        // A table's change stream keeps its mirror even when pipelines read it.
        let pipeline_only = cfg.is_pipeline_source(name) && self.source_of_stream(name).is_none();
        if !cfg.lake.enabled || pipeline_only || name.ends_with(sluice_core::REPLAY_SUFFIX) || name.ends_with(sluice_core::DLQ_SUFFIX) {
            return;
        }
        let mut sinks = self.sinks.lock();
        if sinks.contains_key(stream.name()) {
            return;
        }
        let sc = cfg.stream(stream.name());
        let source = self.source_of_stream(stream.name());
        let opts = |partition_by: Vec<String>, mirror: bool, table: Option<String>| SinkOptions {
            lake_root: cfg.lake_root(),
            flush_interval: cfg.lake.flush_interval,
            flush_bytes: cfg.lake.flush_bytes,
            date_column: cfg.lake.date_column.clone(),
            partition_by,
            mirror,
            table,
            // A source table's columns can be retyped (int to numeric, say): such a
            // column becomes text in its mirror and changelog instead of a conflict.
            widen_to_text: source.is_some(),
        };
        let mut spawn = |key: String, opts: SinkOptions| {
            let sink = LakeSink::new(stream.clone(), opts);
            let status = sink.status();
            // A source's tables land at a lower CPU priority than the capture (see
            // `cdc_landing`); other streams' sinks run with ingest.
            let run = sink.run(self.stop_sinks.subscribe());
            let task = if source.is_some() { cdc_landing().spawn(run) } else { tokio::spawn(run) };
            sinks.insert(key, LakeTask { status, task });
        };
        // A table's change stream lands as the table's mirror (and, when asked, also as an
        // append-only changelog).
        if let Some(src) = &source {
            let changelog = cfg.sources.get(src).is_some_and(|s| s.changelog());
            if changelog {
                let table = format!("{}{}", stream.name(), sluice_core::CHANGELOG_SUFFIX);
                spawn(table.clone(), opts(Vec::new(), false, Some(table)));
            }
        }
        spawn(stream.name().to_string(), opts(sc.partition_by.clone(), source.is_some(), None));
    }

    fn sink_status(&self, stream: &str) -> Option<Arc<SinkStatus>> {
        self.sinks.lock().get(stream).map(|t| t.status.clone())
    }

    /// Starts every configured change-data-capture source. Each opens the streams of the
    /// tables it captures as their first changes arrive (they land in the lake like any
    /// stream).
    fn start_sources(self: &Arc<Self>) {
        let cfg = self.cfg();
        for (name, sc) in &cfg.sources {
            let app = Arc::downgrade(self);
            let open: sluice_connect::postgres_cdc::OpenStream = Arc::new(move |stream: &str, partitions: u32| {
                let app = app.upgrade().ok_or_else(|| anyhow::anyhow!("shutting down"))?;
                let cfg = app.cfg();
                let sc = cfg.stream(stream);
                let s = app.log.create_stream(
                    stream,
                    stream_options(sc, partitions),
                )?;
                app.ensure_sink(&s);
                Ok(s)
            });
            let dir = cfg.data_dir.join("sources").join(name);
            let stop = self.stop_sinks.subscribe();
            // Registered before its task can open a stream: `ensure_sink` asks
            // `source_of_stream`, and a stream not yet known as a source's would get a plain
            // sink that appends raw change events to the mirror table (a kill -9 test under
            // load found that).
            let mut sources = self.sources.lock();
            let (status, snapshots, task) = match sc {
                sluice_core::source::SourceConfig::Postgres(pg) => {
                    let source = sluice_connect::postgres_cdc::PostgresSource::new(name, pg, dir, open);
                    (source.status(), source.snapshots(), tokio::spawn(source.run(stop)))
                }
                sluice_core::source::SourceConfig::Mysql(my) => {
                    let source = sluice_connect::mysql_cdc::MysqlSource::new(name, my, dir, open);
                    (source.status(), source.snapshots(), tokio::spawn(source.run(stop)))
                }
            };
            sources.push(RunningSource { status, snapshots, task });
        }
    }

    /// A source's snapshot request channel and status.
    pub(crate) fn source(&self, name: &str) -> Option<(sluice_connect::postgres_cdc::SnapshotSender, Arc<sluice_connect::postgres_cdc::SourceStatus>)> {
        self.sources.lock().iter().find(|s| s.status.name == name).map(|s| (s.snapshots.clone(), s.status.clone()))
    }

    /// Is `stream` written by a change-data-capture source (and so not open to ingest)?
    pub fn source_of_stream(&self, stream: &str) -> Option<String> {
        self.sources.lock().iter().find_map(|s| {
            let tables = s.status.tables.lock();
            tables.values().any(|t| t == stream).then(|| s.status.name.clone())
        })
    }

    /// Starts every configured pipeline (its streams are open by now).
    fn start_pipelines(&self) -> anyhow::Result<()> {
        let cfg = self.cfg();
        for name in cfg.pipelines.keys() {
            self.start_pipeline(&cfg, name)?;
        }
        Ok(())
    }

    /// Starts pipeline `name` of `cfg` on its own task.
    pub(crate) fn start_pipeline(&self, cfg: &Config, name: &str) -> anyhow::Result<()> {
        let p = cfg.pipelines.get(name).ok_or_else(|| anyhow::anyhow!("no pipeline {name:?}"))?;
        // The replay stream (see `crate::replay`) and the dead-letter streams: one partition,
        // kept a week past processing.
        let week = Some(7 * 24 * 3600 * 1000);
        let system = |s: &str| self.log.create_stream(s, StreamOptions { partitions: 1, retention_ms: week, codec: Some(codec_of(cfg.stream(s))), dictionary: Some(dictionary_of(cfg.stream(s))), ..Default::default() });
        let open = |s: &str| match self.log.stream(s) {
            Some(stream) => Ok(stream),
            None if s.ends_with(sluice_core::DLQ_SUFFIX) => Ok(system(s)?),
            // A table's change stream, before its source has seen the table: made as the source
            // will make it.
            None => match cfg.cdc_source_of(s) {
                Some((_, src)) => {
                    let sc = cfg.stream(s);
                    Ok(self.log.create_stream(
                        s,
                        stream_options(sc, src.partitions()),
                    )?)
                }
                None => Err(anyhow::anyhow!("pipeline {name}: stream {s:?} is not open")),
            },
        };
        let mut sources = p.from.iter().map(|s| open(s)).collect::<anyhow::Result<Vec<_>>>()?;
        sources.push(system(&sluice_core::replay_stream(name))?);
        let dlq = open(&sluice_core::dlq_stream(name))?;
        let mut outputs = HashMap::new();
        for s in p.output_streams() {
            outputs.insert(s.to_string(), open(s)?);
        }
        let mut externals: HashMap<String, Arc<dyn sluice_pipeline::ExternalSink>> = HashMap::new();
        for (sink, sc) in &p.to {
            let date = &cfg.lake.date_column;
            let external: Arc<dyn sluice_pipeline::ExternalSink> = match sc {
                SinkConfig::Webhook(w) => Arc::new(sluice_connect::webhook::WebhookSink::new(w, date)?),
                SinkConfig::Redis(r) => Arc::new(sluice_connect::redis_sink::RedisSink::new(r, date)?),
                SinkConfig::Postgres(pg) => Arc::new(sluice_connect::postgres_sink::PostgresSink::new(pg, date)?),
                SinkConfig::Lake(_) | SinkConfig::Stream(_) => continue,
            };
            externals.insert(sink.clone(), external);
        }
        let mut lookups: HashMap<usize, Arc<dyn sluice_pipeline::LookupSource>> = HashMap::new();
        for (i, step) in p.steps.iter().enumerate() {
            use sluice_core::pipeline::{LookupFrom, StepConfig};
            let StepConfig::Lookup(l) = step else { continue };
            let source: Arc<dyn sluice_pipeline::LookupSource> = match &l.from {
                LookupFrom::Lake(t) => Arc::new(sluice_pipeline::lookup::LakeLookupSource::new(
                    &cfg.lake_root(),
                    &t.table,
                    &t.column,
                    &cfg.lake.date_column,
                    l.refresh,
                )),
                LookupFrom::Postgres(pg) => Arc::new(sluice_connect::postgres_sink::PostgresLookup::new(pg)?),
                LookupFrom::Redis(r) => Arc::new(sluice_connect::redis_sink::RedisLookup::new(r)?),
            };
            lookups.insert(i, source);
        }
        let pipeline = Pipeline::new(PipelineSpec {
            name: name.to_string(),
            cfg: p.clone(),
            sources,
            outputs,
            dlq,
            externals,
            lookups,
            lake_root: cfg.lake_root(),
            state_dir: cfg.data_dir.join("pipelines").join(name),
            flush: FlushPolicy { bytes: cfg.lake.flush_bytes, interval: cfg.lake.flush_interval, fields: false },
            date_column: cfg.lake.date_column.clone(),
        });
        let status = pipeline.status();
        let (halt, halted) = watch::channel(false);
        let task = tokio::spawn(pipeline.run(self.stop_sinks.subscribe(), halted));
        self.pipelines.lock().push(RunningPipeline { name: name.to_string(), cfg: p.clone(), status, halt, task });
        Ok(())
    }

    /// The next offset of a partition not yet processed by whatever consumes the stream: its
    /// lake sink, or the slowest pipeline reading it (and a change stream's mirror). (Log end
    /// when nothing consumes it.)
    fn processed(&self, stream: &Stream, partition: u32) -> u64 {
        let cfg = self.cfg();
        if cfg.is_pipeline_source(stream.name()) {
            let pipelines = self.pipelines.lock();
            let mut min: Option<u64> = None;
            for st in pipelines.iter().map(|r| &r.status) {
                for (name, pos) in &st.positions {
                    if name == stream.name() {
                        let v = pos.get(partition as usize).map_or(0, |a| a.load(Ordering::Acquire));
                        min = Some(min.map_or(v, |m| m.min(v)));
                    }
                }
            }
            let min = min.unwrap_or(0);
            // A table's change stream also has its mirror (and changelog) to land.
            return match self.sinks_landed(stream.name(), partition) {
                Some(l) => min.min(l),
                None => min,
            };
        }
        if !cfg.lake.enabled {
            return stream.partition(partition).map_or(0, |p| p.high_watermark());
        }
        self.sinks_landed(stream.name(), partition).unwrap_or(0)
    }

    /// How far the lake sinks of `stream` have all landed `partition`: its table's, and for a
    /// table's change stream also its changelog's. None: no sink.
    fn sinks_landed(&self, stream: &str, partition: u32) -> Option<u64> {
        let changelog = format!("{stream}{}", sluice_core::CHANGELOG_SUFFIX);
        [self.sink_status(stream), self.sink_status(&changelog)].into_iter().flatten().map(|s| s.landed(partition as usize)).min()
    }

    /// 429 when a partition's log is over its size limit; 503 when the lake is too far behind.
    pub fn check_backpressure(&self, stream: &Stream) -> Result<(), Response> {
        let cfg = self.cfg();
        let limits = &cfg.limits;
        let mut behind = 0u64;
        for p in stream.partitions() {
            if p.size_bytes() > limits.max_log_bytes {
                return Err(error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("log of stream {:?} partition {} is over limits.max_log_bytes ({} bytes)", stream.name(), p.id(), limits.max_log_bytes),
                    Some(5),
                ));
            }
            behind += p.bytes_after(self.processed(stream, p.id()));
        }
        if cfg.lake.enabled && behind > limits.max_lake_lag_bytes {
            return Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the lake is {behind} bytes behind stream {:?} (limits.max_lake_lag_bytes = {})", stream.name(), limits.max_lake_lag_bytes),
                Some(2),
            ));
        }
        Ok(())
    }
}

pub async fn run(cfg: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    init_tracing();
    let metrics = crate::metrics_setup::install()?;
    let auth = Auth::new(&cfg.tokens)?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let lock = std::fs::File::create(cfg.data_dir.join("sluice.lock"))?;
    lock.try_lock().map_err(|_| anyhow::anyhow!("{} is in use by another sluice process", cfg.data_dir.display()))?;
    let lake_root = cfg.lake_root();
    if !lake_root.contains("://") {
        std::fs::create_dir_all(&lake_root)?;
    }
    let log = Arc::new(Log::open(&cfg.data_dir.join("log"), LogConfig { segment_bytes: cfg.log.segment_bytes, ..LogConfig::default() })?);
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let (stop_sinks, _) = watch::channel(false);
    let app = Arc::new(App {
        query: QueryEngine::with_limits(
            &lake_root,
            QueryLimits {
                memory_bytes: Some(cfg.limits.max_query_memory_bytes as usize),
                result_bytes: Some(cfg.limits.max_query_result_bytes as usize),
            },
        ),
        inflight: Arc::new(Semaphore::new(cfg.limits.max_inflight_bytes.min(u32::MAX as u64) as usize)),
        round_robin: AtomicU64::new(0),
        shutting_down: AtomicBool::new(false),
        sinks: Default::default(),
        pipelines: Default::default(),
        sources: Default::default(),
        stop_sinks,
        reloading: Default::default(),
        metrics,
        auth,
        log,
        cfg: parking_lot::RwLock::new(Arc::new(cfg)),
        config_path,
    });
    for name in app.cfg().streams.keys() {
        app.open_stream(name)?;
    }
    // Sources first: they know which streams are theirs (those land as mirrors).
    app.start_sources();
    for s in app.log.streams() {
        app.ensure_sink(&s);
    }
    app.start_pipelines()?;
    let housekeeping = tokio::spawn(housekeeping(app.clone()));

    let router = Router::new()
        .route("/v1/streams/{stream}/events", post(crate::ingest::post_events))
        .route("/v1/streams", get(list_streams))
        .route("/v1/tables", get(list_tables))
        .route("/v1/pipelines", get(list_pipelines))
        .route("/v1/sources", get(list_sources))
        .route("/v1/sources/{name}/snapshot", post(crate::snapshot::snapshot_endpoint))
        .route("/v1/reload", post(crate::reload::reload_endpoint))
        .route("/v1/pipelines/{name}/replay", post(crate::replay::replay_endpoint))
        .route("/v1/streams/{stream}/dictionary", get(get_dictionary).post(train_dictionary))
        .route("/v1/streams/{stream}/stats", get(stream_stats))
        .route("/v1/query", post(query))
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        // Responses over 1 KiB are compressed as the client's Accept-Encoding asks (gzip,
        // br, zstd); acks stay plain, and the tap below streams uncompressed.
        .layer(tower_http::compression::CompressionLayer::new().compress_when(
            tower_http::compression::predicate::SizeAbove::new(1024)
                .and(tower_http::compression::predicate::NotForContentType::GRPC)
                .and(tower_http::compression::predicate::NotForContentType::IMAGES),
        ))
        .route("/v1/pipelines/{name}/tap", get(crate::tap::tap_endpoint))
        .layer(DefaultBodyLimit::max(app.cfg().limits.max_body_bytes as usize))
        .with_state(app.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %app.cfg().data_dir.display(), lake_root = %app.cfg().lake_root(), "sluice is up");
    let reloader = tokio::spawn(crate::reload::on_sighup(app.clone()));
    println!("sluice listening on http://{addr}");

    let app2 = app.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new requests; landing what is acknowledged");
            app2.shutting_down.store(true, Ordering::Release);
        })
        .await?;

    // Everything acknowledged is durable in the log; land it before exiting.
    housekeeping.abort();
    reloader.abort();
    let _reload = app.reloading.lock().await;
    let _ = app.stop_sinks.send(true);
    let mut tasks: Vec<JoinHandle<()>> = app.sinks.lock().drain().map(|(_, t)| t.task).collect();
    tasks.extend(app.pipelines.lock().drain(..).map(|p| p.task));
    tasks.extend(app.sources.lock().drain(..).map(|s| s.task));
    if tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await.is_err() {
        tracing::warn!("lake sinks and pipelines did not finish in 30s; the rest lands at the next start");
    }
    tracing::info!("stopped");
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // delta-rs's MERGE warns on every mirror commit that a metric it derives is missing:
    // noise to an operator (its failures come back as errors, which Sluice logs).
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,buoyant_kernel=warn,delta_kernel=warn,deltalake_core=warn,deltalake_core::operations::merge=error,datafusion=warn")
    });
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Log and lag gauges, computed when /metrics is read.
fn update_gauges(app: &App) {
    for s in app.log.streams() {
        let (mut end, mut lag, mut bytes) = (0u64, 0u64, 0u64);
        for p in s.partitions() {
            let hw = p.high_watermark();
            end += hw;
            lag += hw.saturating_sub(app.processed(&s, p.id()));
            bytes += p.size_bytes();
        }
        let name = s.name().to_string();
        metrics::gauge!("sluice_log_end_offset", "stream" => name.clone()).set(end as f64);
        metrics::gauge!("sluice_lake_lag_records", "stream" => name.clone()).set(lag as f64);
        metrics::gauge!("sluice_log_bytes", "stream" => name).set(bytes as f64);
    }
    for st in app.pipelines.lock().iter().map(|r| &r.status) {
        let lag = pipeline_lag(app, st);
        metrics::gauge!("sluice_pipeline_lag_records", "pipeline" => st.name.clone()).set(lag as f64);
        for (step, stats) in &st.steps {
            for (outcome, v) in [
                ("in", &stats.records_in),
                ("out", &stats.records_out),
                ("filtered", &stats.filtered),
                ("failed", &stats.failed),
                ("cache_hit", &stats.cache_hits),
                ("cache_miss", &stats.cache_misses),
            ] {
                metrics::gauge!("sluice_pipeline_step_records", "pipeline" => st.name.clone(), "step" => step.clone(), "outcome" => outcome)
                    .set(v.load(Ordering::Relaxed) as f64);
            }
        }
    }
}

/// Records in the pipeline's sources it has not processed yet.
fn pipeline_lag(app: &App, st: &PipelineStatus) -> u64 {
    let mut lag = 0;
    for (name, pos) in &st.positions {
        if let Some(stream) = app.log.stream(name) {
            for (p, a) in stream.partitions().iter().zip(pos) {
                lag += p.high_watermark().saturating_sub(a.load(Ordering::Acquire));
            }
        }
    }
    lag
}

/// `GET /v1/sources`: each change-data-capture source's state, confirmed and received
/// positions, counters, captured tables and last error.
async fn list_sources(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = app.require_read_all(&headers, "listing sources") {
        return r;
    }
    let out: Vec<serde_json::Value> = app.sources.lock().iter().map(|s| s.status.to_json()).collect();
    axum::Json(serde_json::json!({ "sources": out })).into_response()
}

/// `GET /v1/pipelines`: each pipeline's sources, position and lag, per-step counters, sinks,
/// dead letters and last checkpoint.
async fn list_pipelines(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = app.require_read_all(&headers, "listing pipelines") {
        return r;
    }
    let now = sluice_core::time::now_ms();
    let out: Vec<serde_json::Value> = app
        .pipelines
        .lock()
        .iter()
        .map(|r| {
            let st = &r.status;
            let cfg = Some(&r.cfg);
            let last = st.last_checkpoint_ms.load(Ordering::Relaxed);
            serde_json::json!({
                "name": st.name,
                "from": cfg.map(|c| c.from.clone()),
                "records_in": st.records_in.load(Ordering::Relaxed),
                "lag": pipeline_lag(&app, st),
                "dead_letters": st.dead_letters.load(Ordering::Relaxed),
                "checkpoints": st.checkpoints.load(Ordering::Relaxed),
                "checkpoint_age_ms": (last > 0).then(|| now.saturating_sub(last)),
                "positions": st.positions.iter().map(|(s, pos)| serde_json::json!({
                    "stream": s,
                    "next_offsets": pos.iter().map(|a| a.load(Ordering::Acquire)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "steps": st.steps.iter().map(|(label, s)| serde_json::json!({
                    "step": label,
                    "records_in": s.records_in.load(Ordering::Relaxed),
                    "records_out": s.records_out.load(Ordering::Relaxed),
                    "filtered": s.filtered.load(Ordering::Relaxed),
                    "failed": s.failed.load(Ordering::Relaxed),
                    "time_ms": s.micros.load(Ordering::Relaxed) / 1000,
                    "cache_hits": s.cache_hits.load(Ordering::Relaxed),
                    "cache_misses": s.cache_misses.load(Ordering::Relaxed),
                })).collect::<Vec<_>>(),
                "sinks": st.sinks.iter().map(|(n, c)| serde_json::json!({ "sink": n, "records": c.load(Ordering::Relaxed) })).collect::<Vec<_>>(),
                "error": st.last_error.lock().clone(),
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "pipelines": out })).into_response()
}

/// Dictionary training every 5 s; retention and re-packing of sealed segments every 30 s.
async fn housekeeping(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    for round in 0u64.. {
        tick.tick().await;
        for s in app.log.streams() {
            let s2 = s.clone();
            match tokio::task::spawn_blocking(move || s2.maintain_dictionary()).await {
                Ok(Ok(sluice_log::DictionaryAction::Trained { info, reason })) => tracing::info!(
                    stream = s.name(), id = info.id, reason, size = info.size_bytes, holdout_ratio = info.holdout_ratio,
                    "trained a compression dictionary"
                ),
                Ok(Ok(sluice_log::DictionaryAction::NotYet(why))) => tracing::debug!(stream = s.name(), %why, "dictionary not trained yet"),
                Ok(Err(e)) => tracing::warn!(stream = s.name(), error = %e, "dictionary"),
                _ => {}
            }
            if round % 6 != 0 {
                continue;
            }
            let s2 = s.clone();
            let res = tokio::task::spawn_blocking(move || s2.apply_retention(sluice_core::time::now_ms())).await;
            match res {
                Ok(Ok(freed)) if freed > 0 => tracing::info!(stream = s.name(), freed, "retention"),
                Ok(Err(e)) => tracing::warn!(stream = s.name(), error = %e, "retention"),
                _ => {}
            }
            if app.cfg().stream(s.name()).repack {
                let s2 = s.clone();
                match tokio::task::spawn_blocking(move || s2.repack(REPACK_BATCH_BYTES)).await {
                    Ok(Ok(r)) if r.segments > 0 => tracing::info!(
                        stream = s.name(), segments = r.segments, records = r.records, batches_before = r.batches_before,
                        batches_after = r.batches_after, bytes_before = r.bytes_before, bytes_after = r.bytes_after,
                        "re-packed small batches of sealed segments"
                    ),
                    Ok(Err(e)) => tracing::warn!(stream = s.name(), error = %e, "re-pack"),
                    _ => {}
                }
            }
        }
    }
}

/// Records per re-packed batch: about this many bytes (big batches compress like files).
pub(crate) const REPACK_BATCH_BYTES: usize = 1 << 20;

/// `GET /v1/streams/{stream}/dictionary`: the current zstd dictionary, its id in
/// `Sluice-Dictionary-Id` (send that header with bodies compressed with it).
async fn get_dictionary(State(app): State<Arc<App>>, axum::extract::Path(stream): axum::extract::Path<String>, headers: HeaderMap) -> Response {
    if let Err(d) = app.auth.check_write(&headers, &stream) {
        return app.denied(d);
    }
    let Some(s) = app.log.stream(&stream) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no stream {stream:?}"), None);
    };
    match s.current_dictionary() {
        None => error_response(StatusCode::NOT_FOUND, &format!("stream {stream:?} has no dictionary yet (it trains one once it holds enough records)"), None),
        Some(d) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
                (header::HeaderName::from_static("sluice-dictionary-id"), HeaderValue::from(d.id())),
                (header::ETAG, HeaderValue::from_str(&format!("\"{}\"", d.id())).unwrap_or(HeaderValue::from_static("\"\""))),
            ],
            d.content().clone(),
        )
            .into_response(),
    }
}

/// `POST /v1/streams/{stream}/dictionary`: train a new dictionary from the newest records
/// now and make it current (normally Sluice does this by itself).
async fn train_dictionary(State(app): State<Arc<App>>, axum::extract::Path(stream): axum::extract::Path<String>, headers: HeaderMap) -> Response {
    if let Err(d) = app.auth.check_write(&headers, &stream) {
        return app.denied(d);
    }
    let Some(s) = app.log.stream(&stream) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no stream {stream:?}"), None);
    };
    match tokio::task::spawn_blocking(move || s.train_dictionary()).await {
        Ok(Ok(Ok(info))) => axum::Json(info).into_response(),
        Ok(Ok(Err(why))) => error_response(StatusCode::CONFLICT, &format!("stream {stream:?}: no new dictionary: {why}"), None),
        Ok(Err(e)) => app.internal(e.to_string()),
        Err(e) => app.internal(e.to_string()),
    }
}

/// `GET /v1/streams/{stream}/stats`: raw vs stored bytes of the retained log.
async fn stream_stats(State(app): State<Arc<App>>, axum::extract::Path(stream): axum::extract::Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = app.require_read(&headers, &stream) {
        return r;
    }
    let Some(s) = app.log.stream(&stream) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no stream {stream:?}"), None);
    };
    match tokio::task::spawn_blocking(move || s.stats()).await {
        Ok(Ok(st)) => axum::Json(st).into_response(),
        Ok(Err(e)) => app.internal(e.to_string()),
        Err(e) => app.internal(e.to_string()),
    }
}

#[derive(Serialize)]
struct PartitionInfo {
    partition: u32,
    log_start_offset: u64,
    log_end_offset: u64,
    landed_offset: u64,
    lag: u64,
    size_bytes: u64,
}

#[derive(Serialize)]
struct StreamInfo {
    name: String,
    partitions: Vec<PartitionInfo>,
    log_end_offset: u64,
    landed_offset: u64,
    lag: u64,
    size_bytes: u64,
    key_field: Option<String>,
    event_time_field: Option<String>,
    partition_by: Vec<String>,
    /// Codec of new log batches: `auto`, `none`, `lz4` or `zstd (level N)`.
    codec: String,
    /// Id of the zstd dictionary new batches use (see `GET .../dictionary`).
    dictionary: Option<u32>,
    lake_rows_written: u64,
    dead_letters: u64,
    lake_error: Option<String>,
}

async fn list_streams(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let token = match app.auth.token(&headers) {
        Ok(t) => t,
        Err(d) => return app.denied(d),
    };
    let mut out = Vec::new();
    for s in app.log.streams() {
        if token.is_some_and(|t| !t.can_read(s.name())) {
            continue;
        }
        let status = app.sink_status(s.name());
        let partitions: Vec<PartitionInfo> = s
            .partitions()
            .iter()
            .map(|p| {
                let end = p.high_watermark();
                let landed = app.processed(&s, p.id());
                PartitionInfo { partition: p.id(), log_start_offset: p.log_start_offset(), log_end_offset: end, landed_offset: landed, lag: end.saturating_sub(landed), size_bytes: p.size_bytes() }
            })
            .collect();
        let cfg = app.cfg();
        let sc = cfg.stream(s.name());
        out.push(StreamInfo {
            name: s.name().to_string(),
            log_end_offset: partitions.iter().map(|p| p.log_end_offset).sum(),
            landed_offset: partitions.iter().map(|p| p.landed_offset).sum(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            size_bytes: partitions.iter().map(|p| p.size_bytes).sum(),
            partitions,
            key_field: sc.key_field.clone(),
            event_time_field: sc.event_time_field.clone(),
            partition_by: sc.partition_by.clone(),
            codec: s.options().codec.map(|c| c.to_string()).unwrap_or_default(),
            dictionary: s.current_dictionary().map(|d| d.id()),
            lake_rows_written: status.as_ref().map_or(0, |s| s.rows.load(Ordering::Relaxed)),
            dead_letters: status.as_ref().map_or(0, |s| s.dead_letters.load(Ordering::Relaxed)),
            lake_error: status.as_ref().and_then(|s| s.last_error.lock().clone()),
        });
    }
    axum::Json(serde_json::json!({ "streams": out })).into_response()
}

async fn list_tables(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let token = match app.auth.token(&headers) {
        Ok(t) => t,
        Err(d) => return app.denied(d),
    };
    match app.query.tables().await {
        Ok(tables) => {
            let tables: Vec<_> = tables.into_iter().filter(|t| token.is_none_or(|tok| tok.can_read(&t.name))).collect();
            axum::Json(serde_json::json!({ "tables": tables })).into_response()
        }
        Err(e) => app.internal(e.to_string()),
    }
}

/// `POST /v1/query`: the SQL as the body (text), or JSON `{"sql": "..."}`. The result format
/// follows `Accept`: JSON array of rows (default), CSV, NDJSON or Arrow IPC stream.
async fn query(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let token = match app.auth.token(&headers) {
        Ok(t) => t,
        Err(d) => return app.denied(d),
    };
    let text = String::from_utf8_lossy(&body);
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    let sql = if is_json {
        match serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.get("sql").and_then(|s| s.as_str()).map(String::from)) {
            Some(s) => s,
            None => return error_response(StatusCode::BAD_REQUEST, "expected a JSON body {\"sql\": \"...\"}", None),
        }
    } else {
        text.into_owned()
    };
    if let Some(tok) = token {
        match app.query.referenced_tables(&sql) {
            Ok(tables) => {
                // information_schema (SHOW TABLES, SHOW COLUMNS, ...) lists every table, so only a
                // token that may read everything may query it.
                if tables.iter().any(|t| t == "information_schema") && !tok.can_read_all() {
                    return app.denied(Denied::Forbidden("the catalog (information_schema, SHOW) needs read scope '*'".into()));
                }
                if let Some(t) = tables.iter().find(|t| *t != "information_schema" && !tok.can_read(t)) {
                    return app.denied(Denied::Forbidden(format!("token may not read {t:?}")));
                }
            }
            Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string(), None),
        }
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let fmt = if accept.contains("text/csv") {
        OutputFormat::Csv
    } else if accept.contains("application/vnd.apache.arrow.stream") {
        OutputFormat::ArrowIpc
    } else if accept.contains("application/x-ndjson") {
        OutputFormat::NdJson
    } else {
        OutputFormat::Json
    };
    match app.query.sql(&sql).await {
        Ok(result) => match render(&result, fmt) {
            Ok(bytes) => ([(header::CONTENT_TYPE, fmt.content_type())], bytes).into_response(),
            Err(e) => app.internal(e.to_string()),
        },
        Err(e) if e.is_user_error() => error_response(StatusCode::BAD_REQUEST, &e.to_string(), None),
        Err(e) => app.internal(e.to_string()),
    }
}

async fn metrics_endpoint(State(app): State<Arc<App>>) -> Response {
    update_gauges(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// The runtime the lake sinks of change-data-capture tables run on: as many threads as
/// cores, each running only on CPU time no other thread wants (Linux's SCHED_IDLE; where
/// that is refused, at nice +10). When the cores are busy (a snapshot, a backlog of changes),
/// the capture into the log runs first, so the database's WAL or binlog is released sooner,
/// and the mirror lands from the log with what is left. Nice +10 alone (session 22: snapshots
/// and a MariaDB catch-up 12–39% faster than at the same priority) still left a core busy
/// with landing looking taken to the scheduler, which then queued a waking capture thread
/// behind the database's work on the other core; a core running only SCHED_IDLE threads
/// counts as idle: snapshots another ~10% faster (bench/RESULTS.md, session 30). With cores
/// to spare, landing runs as soon as it is due. HTTP streams' sinks stay on the main
/// runtime: their bulk landing measured ~5% slower this way.
fn cdc_landing() -> &'static tokio::runtime::Runtime {
    static CDC_LANDING: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    CDC_LANDING.get_or_init(|| {
        // The server's nice value, read on the thread that first asks (one of the server's):
        // the landing runtime's threads, started by each other too, are set from it.
        // SAFETY: getpriority reads no memory of ours.
        #[cfg(target_os = "linux")]
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("sluice-cdc-lake")
            .on_thread_start(move || {
                // Linux: the calling thread (pid 0) at SCHED_IDLE, or at a nice value 10 above
                // the server's.
                // SAFETY: sched_setscheduler reads the parameter we pass; setpriority reads no
                // memory of ours.
                #[cfg(target_os = "linux")]
                unsafe {
                    let idle = libc::sched_param { sched_priority: 0 };
                    if libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) != 0 {
                        libc::setpriority(libc::PRIO_PROCESS, 0, (own + 10).min(19));
                    }
                }
            })
            .enable_all()
            .build()
            .expect("the landing runtime")
    })
}

/// The log options of a configured stream.
fn stream_options(sc: &sluice_core::config::StreamConfig, partitions: u32) -> StreamOptions {
    let retention_ms = sc.retention.time.map(|d| d.as_millis() as u64);
    StreamOptions { partitions, retention_bytes: sc.retention.bytes, retention_ms, codec: Some(codec_of(sc)), dictionary: Some(dictionary_of(sc)) }
}

/// The dictionary settings of a configured stream.
pub(crate) fn dictionary_of(sc: &sluice_core::config::StreamConfig) -> sluice_log::DictionarySettings {
    let d = &sc.dictionary;
    sluice_log::DictionarySettings {
        enabled: d.enabled,
        train_after_records: d.train_after_records,
        sample_records: d.sample_records,
        max_bytes: d.max_size.min(u64::from(u32::MAX)) as u32,
        retrain_drift_pct: d.retrain_drift_percent,
    }
}

/// The log codec a stream's settings ask for.
pub(crate) fn codec_of(sc: &sluice_core::config::StreamConfig) -> Codec {
    use sluice_core::config::Codec as C;
    match sc.codec {
        C::Auto => Codec::Auto,
        C::None => Codec::None,
        C::Lz4 => Codec::Lz4,
        C::Zstd => Codec::Zstd(sc.zstd_level),
    }
}
