//! `sluice.yaml`: the configuration model, its defaults and its validation.
//!
//! Every error names the file, the line and column, and the key it is about, e.g.
//! `sluice.yaml:7:5: streams.scooters.partitions: must be between 1 and 1024`.
//! Type errors come from the YAML deserializer (which knows where it was);
//! semantic checks find their key's line with [`locate`].

use crate::units::{ByteSize, Dur};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error, printed as `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}{sep}{message}", sep = if key.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the key, e.g. `streams.scooters.partitions` (empty when unknown).
    pub key: String,
    pub message: String,
}

/// The whole configuration. Everything has a default: an empty file is valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory of the durable log and Sluice's own state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Root of the lake (a directory; one Delta table per stream). Default `<data_dir>/lake`.
    #[serde(default)]
    pub lake_root: Option<String>,
    /// Create a stream on its first write (else unknown streams get 404).
    #[serde(default = "yes")]
    pub auto_create_streams: bool,
    /// Settings for streams that are not listed under `streams` (auto-created ones).
    #[serde(default)]
    pub stream_defaults: StreamConfig,
    /// Streams by name.
    #[serde(default)]
    pub streams: BTreeMap<String, StreamConfig>,
    /// Bearer tokens. With none, the API is open (bind to loopback!).
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub lake: LakeConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogSettings,
    /// Pipelines by name (see [`crate::pipeline`]). A stream that is the source of a
    /// pipeline lands where its pipelines send it; every other stream lands in the lake
    /// table of its name.
    #[serde(default)]
    pub pipelines: BTreeMap<String, crate::pipeline::PipelineConfig>,
    /// Change-data-capture sources by name (see [`crate::source`]).
    #[serde(default)]
    pub sources: BTreeMap<String, crate::source::SourceConfig>,
    /// The file and text this config was read from, for errors found after loading.
    #[serde(skip)]
    pub source: Option<(String, String)>,
}

/// Settings of one stream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Number of log partitions (fixed once the stream exists).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Top-level field whose value picks the partition (records with one key stay in
    /// order). Without it, each request goes to the next partition in turn.
    #[serde(default)]
    pub key_field: Option<String>,
    /// Top-level field holding the event time (RFC 3339 string or epoch number).
    /// Records without it get the ingestion time.
    #[serde(default = "default_time_field")]
    pub event_time_field: Option<String>,
    /// Extra lake partition columns after the date, e.g. `[region]`.
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub retention: Retention,
    /// How new log batches are compressed: `auto` (zstd level 3 with the stream's
    /// trained dictionary for batches under 64 KiB, lz4 for bigger ones), `lz4`
    /// (fastest), `zstd` (smaller, more CPU; with the dictionary) or `none`. Old batches
    /// keep theirs, so this can change at any time.
    #[serde(default)]
    pub codec: Codec,
    /// zstd level when `codec: zstd` (negative = zstd's fast modes, 19 = small).
    #[serde(default = "default_zstd")]
    pub zstd_level: i32,
    /// Trained zstd dictionaries for small batches.
    #[serde(default)]
    pub dictionary: DictionaryConfig,
    /// Re-pack the small batches of sealed log segments into big ones in the background
    /// (same offsets and records; stored like big batches).
    #[serde(default = "yes")]
    pub repack: bool,
}

/// Log batch compression of a stream.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    #[default]
    Auto,
    None,
    Lz4,
    Zstd,
}

/// When a stream trains its compression dictionary.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DictionaryConfig {
    /// Train and use a dictionary (for zstd batches: `codec: zstd`, or `auto`'s small ones).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Train once the stream holds this many records; retrain after drift at most once
    /// per this many new records.
    #[serde(default = "default_train_after")]
    pub train_after_records: u64,
    /// Train on this many of the newest records.
    #[serde(default = "default_sample_records")]
    pub sample_records: u32,
    /// Largest dictionary (it is kept in memory and sent to clients that ask).
    #[serde(default = "default_dict_size", deserialize_with = "de_size")]
    pub max_size: u64,
    /// Retrain when the newest records compress this many percent worse than the
    /// dictionary's held-out sample did when it was trained.
    #[serde(default = "default_retrain_drift")]
    pub retrain_drift_percent: u32,
}

/// How long the log keeps records. Never deletes what the lake has not committed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep at most this many bytes per partition.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub bytes: Option<u64>,
    /// Drop segments whose newest record is older than this.
    #[serde(default = "default_retention_time", deserialize_with = "de_opt_dur")]
    pub time: Option<Duration>,
}

/// A bearer token and what it may do.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// The secret, inline ...
    #[serde(default)]
    pub token: Option<String>,
    /// ... or read from this environment variable at start.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Streams this token may write: names, or patterns ending in `*` (`*` = all).
    #[serde(default)]
    pub write: Vec<String>,
    /// Streams/tables this token may read (query, list).
    #[serde(default)]
    pub read: Vec<String>,
}

/// Landing in the lake.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// Land streams in the lake at all (false: log only, e.g. to measure ingest alone).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A record waits at most this long after it became durable before its flush starts.
    #[serde(default = "default_flush_interval", deserialize_with = "de_dur")]
    pub flush_interval: Duration,
    /// ... or as soon as this many bytes of records are waiting.
    #[serde(default = "default_flush_bytes", deserialize_with = "de_size")]
    pub flush_bytes: u64,
    /// Name of the date partition column (UTC date of the event time).
    #[serde(default = "default_date_column")]
    pub date_column: String,
}

/// Limits that keep memory and disk bounded.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, compressed as sent (413 above).
    #[serde(default = "default_max_body", deserialize_with = "de_size")]
    pub max_body_bytes: u64,
    /// Largest request body after decompression (413 above).
    #[serde(default = "default_max_decoded", deserialize_with = "de_size")]
    pub max_decoded_bytes: u64,
    /// Request bytes being parsed and written at once, over all requests (429 above).
    #[serde(default = "default_inflight", deserialize_with = "de_size")]
    pub max_inflight_bytes: u64,
    /// Bytes on disk per stream partition (429 above, until retention frees space).
    #[serde(default = "default_max_log", deserialize_with = "de_size")]
    pub max_log_bytes: u64,
    /// Log bytes per stream not yet landed in the lake (503 above).
    #[serde(default = "default_max_lag", deserialize_with = "de_size")]
    pub max_lake_lag_bytes: u64,
    /// Memory the running queries may use together for their operators (sorts, joins,
    /// aggregates); they spill to temporary files where they can, and a query that still
    /// needs more fails with an error instead of growing the process.
    #[serde(default = "default_query_memory", deserialize_with = "de_size")]
    pub max_query_memory_bytes: u64,
    /// Largest result `POST /v1/query` returns (Arrow in-memory size; 400 above, add a
    /// LIMIT or aggregate).
    #[serde(default = "default_query_result", deserialize_with = "de_size")]
    pub max_query_result_bytes: u64,
}

/// The embedded log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Roll to a new segment file after this many bytes.
    #[serde(default = "default_segment", deserialize_with = "de_size")]
    pub segment_bytes: u64,
}

fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:7878".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./sluice-data")
}
fn default_partitions() -> u32 {
    4
}
fn default_time_field() -> Option<String> {
    Some("ts".into())
}
fn default_retention_time() -> Option<Duration> {
    Some(Duration::from_secs(7 * 86400))
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_flush_bytes() -> u64 {
    64 << 20
}
fn default_date_column() -> String {
    "event_date".into()
}
fn default_max_body() -> u64 {
    16 << 20
}
fn default_max_decoded() -> u64 {
    64 << 20
}
fn default_inflight() -> u64 {
    256 << 20
}
fn default_max_log() -> u64 {
    64 << 30
}
fn default_max_lag() -> u64 {
    4 << 30
}
fn default_query_memory() -> u64 {
    256 << 20
}
fn default_query_result() -> u64 {
    64 << 20
}
fn default_segment() -> u64 {
    128 << 20
}
fn default_zstd() -> i32 {
    1
}
fn default_train_after() -> u64 {
    5_000
}
fn default_sample_records() -> u32 {
    20_000
}
fn default_dict_size() -> u64 {
    16 << 10
}
fn default_retrain_drift() -> u32 {
    25
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_yaml_ng::from_str("{}").expect("defaults deserialize")
            }
        }
    )*};
}
default_from_serde!(Config, StreamConfig, Retention, LakeConfig, Limits, LogSettings, DictionaryConfig);

// Durations and sizes are written with units in YAML (`1s`, `64MiB`); these adapters
// keep the public structs in std types.
pub(crate) fn de_dur<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Dur::deserialize(d).map(|d| d.0)
}
pub(crate) fn de_opt_dur<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<Dur>::deserialize(d).map(|d| d.map(|d| d.0))
}
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(d).map(|b| b.0)
}
fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<ByteSize>::deserialize(d).map(|b| b.map(|b| b.0))
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&file, &text)
}

/// Parses and validates config text; `file` is used in error messages.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let cfg: Config = if text.trim().is_empty() {
        Config::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| yaml_error(file, text, e))?
    };
    let mut cfg = cfg;
    cfg.source = Some((file.to_string(), text.to_string()));
    validate(&cfg).map_err(|(path, message)| cfg.error_at(&path, message))?;
    Ok(cfg)
}

fn yaml_error(file: &str, text: &str, e: serde_yaml_ng::Error) -> ConfigError {
    let loc = e.location();
    let mut message = e.to_string();
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    // serde_yaml_ng prefixes the path of the key ("streams.x: unknown field ...").
    let (key, message) = match message.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), message),
    };
    let (line, column) = match loc {
        Some(l) => (l.line(), l.column()),
        None => {
            let path: Vec<String> = key.split('.').map(String::from).collect();
            locate(text, &path).unwrap_or((1, 1))
        }
    };
    ConfigError { file: file.into(), line, column, key, message }
}

type Invalid = (Vec<String>, String);

fn validate(cfg: &Config) -> Result<(), Invalid> {
    let p = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if cfg.listen.parse::<SocketAddr>().is_err() {
        return Err((p(&["listen"]), format!("{:?} is not an address like 127.0.0.1:7878", cfg.listen)));
    }
    validate_stream(&cfg.stream_defaults).map_err(|(k, m)| {
        let mut path = p(&["stream_defaults"]);
        path.extend(k);
        (path, m)
    })?;
    for (name, s) in &cfg.streams {
        crate::validate_stream_name(name).map_err(|m| (p(&["streams", name]), m))?;
        validate_stream(s).map_err(|(k, m)| {
            let mut path = p(&["streams", name]);
            path.extend(k);
            (path, m)
        })?;
    }
    for (i, t) in cfg.tokens.iter().enumerate() {
        let at = |k: &str| vec!["tokens".to_string(), i.to_string(), k.to_string()];
        match (&t.token, &t.token_env) {
            (None, None) => return Err((at("token"), "a token needs `token` or `token_env`".into())),
            (Some(_), Some(_)) => return Err((at("token_env"), "give `token` or `token_env`, not both".into())),
            (Some(s), None) if s.len() < 8 => {
                return Err((at("token"), "tokens must be at least 8 characters".into()))
            }
            _ => {}
        }
        if t.write.is_empty() && t.read.is_empty() {
            return Err((at("write"), "a token needs at least one `write` or `read` scope".into()));
        }
        for (k, pats) in [("write", &t.write), ("read", &t.read)] {
            for pat in pats.iter() {
                let stem = pat.strip_suffix('*').unwrap_or(pat);
                if stem.contains('*') || (stem.is_empty() && pat.is_empty()) {
                    return Err((at(k), format!("{pat:?}: a scope is a stream name or a prefix ending in *")));
                }
            }
        }
    }
    if cfg.lake.flush_interval < Duration::from_millis(10) {
        return Err((p(&["lake", "flush_interval"]), "must be at least 10ms".into()));
    }
    if cfg.lake.flush_bytes < 1024 {
        return Err((p(&["lake", "flush_bytes"]), "must be at least 1KiB".into()));
    }
    if !is_column_name(&cfg.lake.date_column) {
        return Err((p(&["lake", "date_column"]), "must be a plain column name (a-z, 0-9, _)".into()));
    }
    let l = &cfg.limits;
    for (k, v, min) in [
        ("max_body_bytes", l.max_body_bytes, 1024),
        ("max_decoded_bytes", l.max_decoded_bytes, 1024),
        ("max_inflight_bytes", l.max_inflight_bytes, 1024),
        ("max_log_bytes", l.max_log_bytes, 1 << 20),
        ("max_lake_lag_bytes", l.max_lake_lag_bytes, 1 << 20),
        ("max_query_memory_bytes", l.max_query_memory_bytes, 1 << 20),
        ("max_query_result_bytes", l.max_query_result_bytes, 1024),
    ] {
        if v < min {
            return Err((p(&["limits", k]), format!("must be at least {min} bytes")));
        }
    }
    if l.max_decoded_bytes < l.max_body_bytes {
        return Err((p(&["limits", "max_decoded_bytes"]), "must be at least max_body_bytes".into()));
    }
    if l.max_inflight_bytes < l.max_decoded_bytes {
        return Err((p(&["limits", "max_inflight_bytes"]), "must be at least max_decoded_bytes".into()));
    }
    if cfg.log.segment_bytes < 4096 {
        return Err((p(&["log", "segment_bytes"]), "must be at least 4KiB".into()));
    }
    crate::source::validate(&cfg.sources)?;
    crate::pipeline::validate(&cfg.pipelines, &cfg.streams, &cfg.sources, &cfg.lake.date_column)
}

pub(crate) fn is_column_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn validate_stream(s: &StreamConfig) -> Result<(), Invalid> {
    let k = |s: &str| vec![s.to_string()];
    if !(1..=1024).contains(&s.partitions) {
        return Err((k("partitions"), "must be between 1 and 1024".into()));
    }
    for (key, f) in [("key_field", &s.key_field), ("event_time_field", &s.event_time_field)] {
        if let Some(f) = f {
            if f.is_empty() {
                return Err((k(key), "must not be empty".into()));
            }
        }
    }
    for c in &s.partition_by {
        if !is_column_name(c) {
            return Err((k("partition_by"), format!("{c:?} must be a top-level field name of a-z, 0-9, _")));
        }
        if c.starts_with('_') {
            return Err((k("partition_by"), format!("{c:?}: names starting with _ are reserved")));
        }
    }
    if s.retention.bytes == Some(0) {
        return Err((vec!["retention".into(), "bytes".into()], "must be more than 0".into()));
    }
    if !(-7..=22).contains(&s.zstd_level) {
        return Err((k("zstd_level"), "must be between -7 and 22".into()));
    }
    let d = |f: &str| vec!["dictionary".to_string(), f.to_string()];
    if !(1024..=(1 << 20)).contains(&s.dictionary.max_size) {
        return Err((d("max_size"), "must be between 1KiB and 1MiB".into()));
    }
    if !(100..=1_000_000).contains(&s.dictionary.sample_records) {
        return Err((d("sample_records"), "must be between 100 and 1000000".into()));
    }
    if s.dictionary.train_after_records == 0 {
        return Err((d("train_after_records"), "must be more than 0".into()));
    }
    Ok(())
}

impl Config {
    /// An error about the key at `path` (e.g. `["pipelines", "rides", "steps", "0"]`), with the
    /// file and line it was written on when the config came from a file.
    pub fn error_at(&self, path: &[String], message: String) -> ConfigError {
        let (file, text) = self.source.as_ref().map_or(("<default config>", ""), |(f, t)| (f.as_str(), t.as_str()));
        let (line, column) = locate(text, path).unwrap_or((1, 1));
        ConfigError { file: file.into(), line, column, key: path.join("."), message }
    }

    /// The change-data-capture source whose streams are named like `stream`
    /// (`<source>_<table>`), if any.
    pub fn cdc_source_of(&self, stream: &str) -> Option<(&str, &crate::source::SourceConfig)> {
        crate::source::source_of_stream(&self.sources, stream)
    }

    /// Is this stream the source of a pipeline (and so not landed in its own table)?
    pub fn is_pipeline_source(&self, stream: &str) -> bool {
        self.pipelines.iter().any(|(name, p)| p.from.iter().any(|f| f == stream) || stream == crate::replay_stream(name))
    }

    /// The pipeline that writes lake table `table`, if any.
    pub fn pipeline_of_table(&self, table: &str) -> Option<&str> {
        self.pipelines.iter().find_map(|(name, p)| {
            let dlq = format!("{name}{}", crate::DLQ_SUFFIX);
            (p.lake_sinks().any(|(_, t, _)| t == table) || table == dlq).then_some(name.as_str())
        })
    }

    /// The lake root, defaulting to `<data_dir>/lake`.
    pub fn lake_root(&self) -> String {
        self.lake_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("lake").display().to_string())
    }

    /// Settings for a stream: its own entry or the defaults.
    pub fn stream(&self, name: &str) -> &StreamConfig {
        self.streams.get(name).unwrap_or(&self.stream_defaults)
    }
}

impl TokenConfig {
    /// The secret, reading `token_env` if set.
    pub fn secret(&self) -> Result<String, String> {
        match (&self.token, &self.token_env) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(var)) => std::env::var(var).map_err(|_| format!("environment variable {var} is not set")),
            (None, None) => Err("no token".into()),
        }
    }

    fn allows(patterns: &[String], stream: &str) -> bool {
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => stream.starts_with(prefix),
            None => p == stream,
        })
    }

    /// May this token write to `stream`?
    pub fn can_write(&self, stream: &str) -> bool {
        Self::allows(&self.write, stream)
    }

    /// May this token write every stream (write scope `*`): what administration needs?
    pub fn can_write_all(&self) -> bool {
        self.write.iter().any(|p| p == "*")
    }

    /// May this token read every table (read scope `*`)?
    pub fn can_read_all(&self) -> bool {
        self.read.iter().any(|p| p == "*")
    }

    /// May this token read `table` (a stream's table or its `__dlq`)?
    pub fn can_read(&self, table: &str) -> bool {
        let base = table.strip_suffix(crate::DLQ_SUFFIX).unwrap_or(table);
        Self::allows(&self.read, base) || Self::allows(&self.read, table)
    }
}

/// Finds the line and column of a key path in block-style YAML (`a.b.c`; numeric parts
/// index sequence items). Falls back to the deepest written ancestor of the key.
pub fn locate(text: &str, path: &[String]) -> Option<(usize, usize)> {
    // Open keys around the current line: (indent, key or item index, line).
    let mut stack: Vec<(usize, String, usize)> = Vec::new();
    let mut counters: std::collections::HashMap<String, usize> = Default::default();
    let mut best: Option<(usize, (usize, usize))> = None; // (matched depth, position)
    for (ln, raw) in text.lines().enumerate() {
        let content = raw.split(" #").next().unwrap_or("");
        let mut rest = content.trim_start();
        if rest.is_empty() || rest.starts_with('#') || rest.starts_with("---") {
            continue;
        }
        let mut indent = content.len() - rest.len();
        if rest == "-" || rest.starts_with("- ") {
            // A sequence item closes deeper keys and the previous item at this indent.
            while stack.last().is_some_and(|(i, k, _)| *i > indent || (*i == indent && k.parse::<usize>().is_ok())) {
                stack.pop();
            }
            let parent: Vec<&str> = stack.iter().map(|(_, k, _)| k.as_str()).collect();
            let c = counters.entry(parent.join(".")).or_insert(0);
            stack.push((indent, c.to_string(), ln + 1));
            *c += 1;
            rest = rest[1..].trim_start();
            indent = content.len() - rest.len();
        } else {
            while stack.last().is_some_and(|(i, _, _)| *i >= indent) {
                stack.pop();
            }
        }
        if let Some((k, _)) = rest.split_once(':') {
            let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
            if !k.is_empty() && !k.contains([' ', '[', '{']) {
                stack.push((indent, k.to_string(), ln + 1));
            }
        }
        let depth = stack.iter().zip(path).take_while(|((_, k, _), p)| k == *p).count();
        if depth > best.map_or(0, |b| b.0) {
            let (i, _, l) = &stack[depth - 1];
            best = Some((depth, (*l, i + 1)));
            if depth == path.len() {
                break;
            }
        }
    }
    best.map(|b| b.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse("sluice.yaml", text).unwrap_err()
    }

    #[test]
    fn empty_is_defaults() {
        let c = parse("x", "").unwrap();
        assert_eq!(c.listen, "127.0.0.1:7878");
        assert_eq!(c.lake_root(), "./sluice-data/lake");
        assert!(c.auto_create_streams);
        assert_eq!(c.lake.flush_interval, Duration::from_secs(1));
        assert_eq!(c.lake.flush_bytes, 64 << 20);
        assert_eq!(c.stream("x").partitions, 4);
        assert_eq!(c.stream("x").event_time_field.as_deref(), Some("ts"));
    }

    #[test]
    fn full_config() {
        let c = parse(
            "x",
            "listen: 0.0.0.0:9000\ndata_dir: /tmp/d\nlake_root: /tmp/lake\nauto_create_streams: false\n\
             streams:\n  scooters:\n    partitions: 8\n    key_field: vehicle_id\n    partition_by: [region]\n    retention:\n      bytes: 1GiB\n      time: 2d\n\
             tokens:\n  - name: app\n    token: abcdefghij\n    write: [scooters]\n    read: ['*']\n\
             lake:\n  flush_interval: 250ms\n  flush_bytes: 8MiB\nlimits:\n  max_body_bytes: 1MiB\n",
        )
        .unwrap();
        let s = &c.streams["scooters"];
        assert_eq!(s.partitions, 8);
        assert_eq!(s.retention.bytes, Some(1 << 30));
        assert_eq!(s.retention.time, Some(Duration::from_secs(2 * 86400)));
        assert_eq!(c.lake.flush_interval, Duration::from_millis(250));
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert!(c.tokens[0].can_write("scooters"));
        assert!(!c.tokens[0].can_write("other"));
        assert!(c.tokens[0].can_read("anything__dlq"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("listen: 127.0.0.1:1\nstreams:\n  scooters:\n    partitons: 3\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("sluice.yaml:4:"), "{e}");
        assert!(e.to_string().contains("partitons"), "{e}");
    }

    #[test]
    fn type_error_names_line() {
        let e = err("streams:\n  a:\n    partitions: many\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.key.contains("partitions"), "{e}");
    }

    #[test]
    fn semantic_errors_name_line_and_key() {
        let e = err("# comment\nstreams:\n  a:\n    key_field: id\n  b:\n    partitions: 0\n");
        assert_eq!((e.line, e.key.as_str()), (6, "streams.b.partitions"), "{e}");
        let e = err("listen: nowhere\n");
        assert_eq!((e.line, e.key.as_str()), (1, "listen"), "{e}");
        let e = err("streams:\n  Bad:\n    partitions: 1\n");
        assert_eq!((e.line, e.key.as_str()), (2, "streams.Bad"), "{e}");
        let e = err("tokens:\n  - token: abcdefghij\n    write: [a]\n  - name: x\n    write: [b]\n");
        assert_eq!((e.line, e.key.as_str()), (4, "tokens.1.token"), "{e}");
        let e = err("streams:\n  s:\n    zstd_level: 40\n");
        assert_eq!((e.line, e.key.as_str()), (3, "streams.s.zstd_level"), "{e}");
        let e = err("stream_defaults:\n  codec: snappy\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("lz4"), "{e}");
        let e = err("lake:\n  flush_interval: 1 fortnight\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn bad_yaml_names_line() {
        let e = err("streams:\n  a: [unclosed\n");
        assert!(e.line >= 2, "{e}");
    }

    const PIPE: &str = "streams:\n  events: {}\n  big: {}\npipelines:\n  rides:\n    from: events\n    steps:\n      - filter: \"kind = 'ride'\"\n      - map:\n          fare_eur: fare_cents / 100.0\n          n: 1\n      - drop: [fare_cents]\n      - route:\n          - to: big_rides\n            when: fare_eur > 100\n          - to: rides\n    to:\n      rides:\n        lake:\n          partition_by: [region]\n      big_rides:\n        stream:\n          stream: big\n";

    #[test]
    fn pipeline_parses() {
        use crate::pipeline::*;
        let c = parse("x", PIPE).unwrap();
        let p = &c.pipelines["rides"];
        assert_eq!(p.from, vec!["events"]);
        assert_eq!(p.steps[0], StepConfig::Filter("kind = 'ride'".into()));
        assert_eq!(
            p.steps[1],
            StepConfig::Map(Fields(vec![("fare_eur".into(), "fare_cents / 100.0".into()), ("n".into(), "1".into())]))
        );
        assert_eq!(p.steps[3], StepConfig::Route(vec![
            RouteConfig { to: "big_rides".into(), when: Some("fare_eur > 100".into()) },
            RouteConfig { to: "rides".into(), when: None },
        ]));
        assert_eq!(p.lake_sinks().map(|(s, t, _)| (s, t)).collect::<Vec<_>>(), vec![("rides", "rides")]);
        assert_eq!(p.output_streams().collect::<Vec<_>>(), vec!["big"]);
        assert!(c.is_pipeline_source("events"));
        assert!(!c.is_pipeline_source("big"));
        assert_eq!(c.pipeline_of_table("rides"), Some("rides"));
        assert_eq!(c.pipeline_of_table("rides__dlq"), Some("rides"));
        assert_eq!(c.pipeline_of_table("events"), None);
    }

    #[test]
    fn pipeline_errors_name_line_and_key() {
        let e = err(&PIPE.replace("from: events", "from: nope"));
        assert_eq!((e.line, e.key.as_str()), (6, "pipelines.rides.from"), "{e}");
        assert!(e.message.contains("unknown stream \"nope\""), "{e}");
        let e = err(&PIPE.replace("- to: rides", "- to: ridez"));
        assert_eq!((e.line, e.key.as_str()), (13, "pipelines.rides.steps.3"), "{e}");
        assert!(e.message.contains("unknown sink \"ridez\""), "{e}");
        let e = err(&PIPE.replace("      - drop: [fare_cents]\n", "").replace("    to:\n", "      - drop: [x]\n    to:\n"));
        assert!(e.message.contains("route must be the last step"), "{e}");
        let e = err(&PIPE.replace("stream: big\n", "stream: nope\n"));
        assert_eq!((e.line, e.key.as_str()), (21, "pipelines.rides.to.big_rides"), "{e}");
        let e = err(&PIPE.replace("- filter:", "- filtr:"));
        assert_eq!(e.line, 8, "{e}");
        let e = err(&PIPE.replace("          n: 1\n", "          fare_eur: 2\n"));
        assert!(e.to_string().contains("defined twice"), "{e}");
        let e = err(&PIPE.replace("partition_by: [region]", "partition_by: [Region]"));
        assert_eq!(e.key, "pipelines.rides.to.rides", "{e}");
    }

    #[test]
    fn pipeline_cycles_and_table_clashes_are_rejected() {
        let cyc = "streams:\n  a: {}\n  b: {}\npipelines:\n  p1:\n    from: a\n    to:\n      out: { stream: { stream: b } }\n  p2:\n    from: b\n    to:\n      back: { stream: { stream: a } }\n";
        let e = err(cyc);
        assert!(e.message.contains("cycle"), "{e}");
        let self_loop = "streams:\n  a: {}\npipelines:\n  p:\n    from: a\n    to:\n      out: { stream: { stream: a } }\n";
        assert!(err(self_loop).message.contains("cycle"));
        // A lake sink may not write the table a plain stream lands in.
        let clash = "streams:\n  a: {}\n  b: {}\npipelines:\n  p:\n    from: a\n    to:\n      b: { lake: {} }\n";
        let e = err(clash);
        assert!(e.message.contains("where stream \"b\" lands"), "{e}");
        // ... but may reuse its own source's name (that stream no longer lands by itself).
        parse("x", "streams:\n  a: {}\npipelines:\n  p:\n    from: a\n    to:\n      a: { lake: {} }\n").unwrap();
        let two = "streams:\n  a: {}\npipelines:\n  p:\n    from: a\n    to:\n      t: { lake: {} }\n  q:\n    from: a\n    to:\n      u: { lake: { table: t } }\n";
        assert!(err(two).message.contains("already written by pipeline \"p\""));
    }

    #[test]
    fn a_pipeline_may_read_a_sources_table_streams() {
        let cfg = "sources:\n  shop:\n    postgres:\n      url: postgres://u@h/db\npipelines:\n  p:\n    from: shop_orders\n    to:\n      t: { lake: {} }\n";
        let c = parse("x", cfg).unwrap();
        assert_eq!(c.cdc_source_of("shop_orders").map(|(n, _)| n), Some("shop"));
        assert_eq!(c.cdc_source_of("shopping"), None);
        let e = err(&cfg.replace("from: shop_orders", "from: shopx_orders"));
        assert!(e.message.contains("unknown stream \"shopx_orders\""), "{e}");
        let e = err(&cfg.replace("url: postgres://u@h/db", "url: mysql://h"));
        assert_eq!(e.key, "sources.shop.postgres.url", "{e}");
    }

    #[test]
    fn a_pipeline_may_read_another_pipelines_dead_letters_but_not_its_own() {
        let ok = "streams:\n  a: {}\npipelines:\n  p:\n    from: a\n    to:\n      t: { lake: {} }\n  alerts:\n    from: p__dlq\n    to:\n      u: { lake: {} }\n";
        let c = parse("x", ok).unwrap();
        assert!(c.is_pipeline_source("p__dlq"));
        let unknown = ok.replace("from: p__dlq", "from: nope__dlq");
        assert!(err(&unknown).message.contains("unknown stream \"nope__dlq\""), "{}", err(&unknown));
        let own = "streams:\n  a: {}\npipelines:\n  p:\n    from: [a, p__dlq]\n    to:\n      t: { lake: {} }\n";
        assert!(err(own).message.contains("cycle"), "{}", err(own));
    }
}
