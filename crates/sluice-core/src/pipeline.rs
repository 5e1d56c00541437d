//! `pipelines:` in sluice.yaml: records of `from` streams pass `steps` in order and land in
//! the `to` sinks.
//!
//! ```yaml
//! pipelines:
//!   rides:
//!     from: [events]
//!     steps:
//!       - filter: "kind = 'ride'"
//!       - map: { fare_eur: "fare_cents / 100.0", rider: "user.id" }
//!       - drop: [fare_cents, user]
//!       - route:
//!           - { to: big_rides, when: "fare_eur > 100" }
//!           - { to: rides }
//!     to:
//!       rides: { lake: { partition_by: [region] } }
//!       big_rides: { stream: { stream: big_rides } }
//! ```
//!
//! This module checks what needs no SQL engine (names, references, the stream graph);
//! `sluice-pipeline` checks the SQL itself.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, BTreeSet};

/// One pipeline.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Source streams (one name or a list). Each must be declared under `streams:`.
    #[serde(deserialize_with = "one_or_many")]
    pub from: Vec<String>,
    /// Steps, applied in order. A `route` step, if any, is the last.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Sinks by name. Without a `route` step every record goes to every sink.
    pub to: BTreeMap<String, SinkConfig>,
}

/// A step. Written as a one-key map: `- filter: "..."`.
#[derive(Debug, Clone, PartialEq)]
pub enum StepConfig {
    /// Keep records for which this SQL boolean expression is true.
    Filter(String),
    /// Add or replace fields, each a SQL expression of the record's fields; other fields stay.
    Map(Fields),
    /// Keep exactly these fields, each a SQL expression (`name: name` keeps one as is).
    Select(Fields),
    /// Remove these top-level fields.
    Drop(Vec<String>),
    /// Call an HTTP service per record and put its JSON answer under a field.
    Enrich(Box<EnrichConfig>),
    /// Drop a record whose key was already seen within a time window.
    Dedup(DedupConfig),
    /// Check records against a declared schema; failures go to the dead-letter table.
    Validate(ValidateConfig),
    /// Send each record to every route whose `when` is true (a route without `when` takes
    /// every record). Records no route takes are counted as filtered.
    Route(Vec<RouteConfig>),
    /// Join each record to a row of a lake table, a PostgreSQL table or Redis.
    Lookup(Box<LookupConfig>),
}

/// A `validate` step: a declared schema. Rules other than `required` apply to values that
/// are present.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// Fields (dotted paths for nested ones) that must be present and not null.
    #[serde(default)]
    pub required: Vec<String>,
    /// Rules by field path.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
    /// A JSON Schema (written inline, as YAML or JSON), translated to the same rules: see
    /// [`ValidateConfig::merged`] for the keywords supported.
    #[serde(default)]
    pub json_schema: Option<serde_json::Value>,
}

impl ValidateConfig {
    /// `required` and `fields` with the JSON Schema's rules added. Supported keywords:
    /// `type` (one type, or one type and "null"), `properties` (nested objects become dotted
    /// paths), `required`, `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`,
    /// `maxItems`, `enum`, `const`, `pattern`; annotations (`$schema`, `$id`, `title`,
    /// `description`, `examples`, `default`, `$comment`, `format`) are ignored. Any other
    /// keyword is an error naming it, rather than a rule silently not checked. A nested
    /// `required` applies where its parent object is itself required.
    pub fn merged(&self) -> Result<ValidateConfig, String> {
        let mut out = ValidateConfig { json_schema: None, ..self.clone() };
        if let Some(schema) = &self.json_schema {
            json_schema_rules(schema, "", true, &mut out)?;
        }
        Ok(out)
    }
}

fn json_schema_rules(s: &serde_json::Value, path: &str, parent_required: bool, out: &mut ValidateConfig) -> Result<(), String> {
    use serde_json::Value;
    let at = if path.is_empty() { "the schema".to_string() } else { format!("`{path}`") };
    let obj = s.as_object().ok_or_else(|| format!("{at}: a JSON Schema must be an object"))?;
    let mut rule = FieldRule::default();
    let num = |k: &str, v: &Value| v.as_f64().ok_or_else(|| format!("{at}: {k} must be a number"));
    let count = |k: &str, v: &Value| v.as_u64().ok_or_else(|| format!("{at}: {k} must be a non-negative integer"));
    let scalar = |v: &Value| -> Result<Scalar, String> {
        Ok(match v {
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) if n.is_i64() => Scalar::Int(n.as_i64().unwrap_or_default()),
            Value::Number(n) => Scalar::Float(n.as_f64().unwrap_or_default()),
            Value::String(t) => Scalar::Text(t.clone()),
            _ => return Err(format!("{at}: enum and const values must be strings, numbers or booleans")),
        })
    };
    for (k, v) in obj {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "examples" | "default" | "$comment" | "format" => {}
            "type" => {
                let types: Vec<&str> = match v {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().filter_map(|t| t.as_str()).collect(),
                    _ => return Err(format!("{at}: type must be a string or a list")),
                };
                let real: Vec<&str> = types.into_iter().filter(|t| *t != "null").collect();
                match real.as_slice() {
                    [t] if FIELD_TYPES.contains(t) => rule.kind = Some(t.to_string()),
                    [] => {}
                    _ => return Err(format!("{at}: type {v}: one of {} (optionally with \"null\")", FIELD_TYPES.join(", "))),
                }
            }
            "minimum" => rule.minimum = Some(num(k, v)?),
            "maximum" => rule.maximum = Some(num(k, v)?),
            "minLength" | "minItems" => rule.min_length = Some(count(k, v)?),
            "maxLength" | "maxItems" => rule.max_length = Some(count(k, v)?),
            "pattern" => rule.pattern = Some(v.as_str().ok_or_else(|| format!("{at}: pattern must be a string"))?.to_string()),
            "enum" => {
                let a = v.as_array().ok_or_else(|| format!("{at}: enum must be a list"))?;
                rule.one_of = Some(a.iter().map(scalar).collect::<Result<_, _>>()?);
            }
            "const" => rule.one_of = Some(vec![scalar(v)?]),
            "properties" | "required" => {}
            other => return Err(format!("{at}: JSON Schema keyword `{other}` is not supported (supported: type, properties, required, minimum, maximum, minLength, maxLength, minItems, maxItems, enum, const, pattern)")),
        }
    }
    if !path.is_empty() && rule != FieldRule::default() {
        out.fields.insert(path.to_string(), rule);
    }
    let required: Vec<String> = match obj.get("required") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(|r| r.as_str().map(String::from).ok_or_else(|| format!("{at}: required must list field names"))).collect::<Result<_, _>>()?,
        Some(_) => return Err(format!("{at}: required must be a list")),
    };
    let join = |name: &str| if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
    if parent_required {
        for r in &required {
            let p = join(r);
            if !out.required.contains(&p) {
                out.required.push(p);
            }
        }
    }
    if let Some(props) = obj.get("properties") {
        let props = props.as_object().ok_or_else(|| format!("{at}: properties must be an object"))?;
        for (name, sub) in props {
            json_schema_rules(sub, &join(name), parent_required && required.contains(name), out)?;
        }
    }
    Ok(())
}

/// Rules for one field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// string, integer, number, boolean, object or array.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub minimum: Option<f64>,
    #[serde(default)]
    pub maximum: Option<f64>,
    /// Length of a string (characters) or an array.
    #[serde(default)]
    pub min_length: Option<u64>,
    #[serde(default)]
    pub max_length: Option<u64>,
    /// Allowed values.
    #[serde(default, rename = "enum")]
    pub one_of: Option<Vec<Scalar>>,
    /// A regular expression a string must match (anywhere; anchor with ^ and $).
    #[serde(default)]
    pub pattern: Option<String>,
}

/// A YAML scalar as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// Types a `validate` rule can ask for.
pub const FIELD_TYPES: &[&str] = &["string", "integer", "number", "boolean", "object", "array"];

/// A `dedup` step.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// SQL expression of the record's fields; records with a NULL key always pass.
    pub key: String,
    /// A key seen less than this long ago (wall-clock time of its first sighting) is a duplicate.
    #[serde(deserialize_with = "crate::config::de_dur")]
    pub window: std::time::Duration,
    /// Most keys remembered; over it the oldest are forgotten first.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    10_000_000
}

/// What an `enrich` step does when a call fails after its retries.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The record goes to the dead-letter table with the error.
    #[default]
    DeadLetter,
    /// The record goes on with NULL under `into`.
    Null,
    /// Keep retrying (backoff up to 10 s): the pipeline waits for the service.
    Retry,
}

/// An `enrich` step: `${SQL}` in `url` and `body` is replaced by the expression's value for
/// the record (URL-encoded in the URL, JSON-escaped in the body).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// `http://` or `https://` URL template, e.g. `http://users:8080/v1/users/${user_id}`.
    pub url: String,
    /// With `https://`: a PEM file of CA certificates to trust besides the system's (a
    /// private CA, or a self-signed service).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// GET (default) or POST.
    #[serde(default = "default_method")]
    pub method: String,
    /// Request body template (POST), e.g. `{"id": "${user_id}"}`.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The field the JSON answer goes under (replaced if it exists).
    pub into: String,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per request.
    #[serde(default = "default_timeout", deserialize_with = "crate::config::de_dur")]
    pub timeout: std::time::Duration,
    /// Retries after the first attempt (connection errors, timeouts, 429 and 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay; doubles each retry, with jitter, up to 10 s.
    #[serde(default = "default_backoff", deserialize_with = "crate::config::de_dur")]
    pub backoff: std::time::Duration,
    /// How long an answer is reused for the same request (0s: no cache).
    #[serde(default = "default_cache_ttl", deserialize_with = "crate::config::de_dur")]
    pub cache_ttl: std::time::Duration,
    /// Most answers kept (oldest dropped first).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    #[serde(default)]
    pub on_error: OnError,
    /// Records per request (1: one request per record). Above 1, records that render the
    /// same URL are sent together as one POST whose body is a JSON array of their `body`
    /// renderings; the answer must be a JSON array of as many answers, in order (`null`:
    /// nothing known, like a 404).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    1
}

/// Checks an enrich or webhook URL and its `ca_file` (readable, holding PEM certificates;
/// the HTTP client parses them when the pipeline starts). Errors: (key, message).
fn check_http_url(url: &str, ca_file: Option<&std::path::Path>) -> Result<(), (&'static str, String)> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(("url", "must start with http:// or https://".into()));
    }
    let Some(path) = ca_file else { return Ok(()) };
    if !url.starts_with("https://") {
        return Err(("ca_file", "only applies to https:// URLs".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ("ca_file", format!("cannot read {}: {e}", path.display())))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(("ca_file", format!("{} holds no PEM certificate", path.display())));
    }
    Ok(())
}

fn default_method() -> String {
    "GET".into()
}
fn default_concurrency() -> usize {
    32
}
fn default_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> std::time::Duration {
    std::time::Duration::from_millis(100)
}
fn default_cache_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
fn default_cache_entries() -> usize {
    100_000
}

impl EnrichConfig {
    /// The `${...}` expressions of a template, in order; an error names an unclosed one.
    pub fn placeholders(template: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut rest = template;
        while let Some(i) = rest.find("${") {
            let after = &rest[i + 2..];
            let end = after.find('}').ok_or_else(|| format!("`${{` without a closing `}}` in {template:?}"))?;
            let expr = after[..end].trim();
            if expr.is_empty() {
                return Err(format!("empty `${{}}` in {template:?}"));
            }
            out.push(expr.to_string());
            rest = &after[end + 1..];
        }
        Ok(out)
    }
}

impl StepConfig {
    /// The step's kind, as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            StepConfig::Filter(_) => "filter",
            StepConfig::Map(_) => "map",
            StepConfig::Select(_) => "select",
            StepConfig::Drop(_) => "drop",
            StepConfig::Enrich(_) => "enrich",
            StepConfig::Dedup(_) => "dedup",
            StepConfig::Validate(_) => "validate",
            StepConfig::Route(_) => "route",
            StepConfig::Lookup(_) => "lookup",
        }
    }
}

/// A `lookup` step: joins each record to the row whose `column` equals the record's `key`,
/// in a lake table, a PostgreSQL table or Redis; the row goes under field `into` (a struct,
/// NULL when there is none). Rows are cached and fetched again after `refresh`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// SQL expression over the record: the value to look up (compared as text).
    pub key: String,
    /// Field the matched row goes under.
    pub into: String,
    /// Where the rows are.
    pub from: LookupFrom,
    /// How long a looked-up row (or a lake table snapshot) is used before it is read again.
    #[serde(default = "default_refresh", deserialize_with = "crate::config::de_dur")]
    pub refresh: std::time::Duration,
    /// Most rows cached by the step.
    #[serde(default = "default_cache_entries")]
    pub max_entries: usize,
    /// A record whose key has no row: `null` (goes on with NULL under `into`, the default)
    /// or `dead_letter`.
    #[serde(default)]
    pub on_missing: OnMissing,
}

fn default_refresh() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// What a `lookup` does with a record whose key has no row.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    #[default]
    Null,
    DeadLetter,
}

/// The source of a `lookup`. Written as a one-key map: `{ lake: { ... } }`.
#[derive(Debug, Clone, PartialEq)]
pub enum LookupFrom {
    /// A lake table, read whole and kept in memory (small dimension tables).
    Lake(LakeLookup),
    /// A PostgreSQL table, queried for the keys a batch needs.
    Postgres(PostgresLookup),
    /// Redis: `GET <prefix><key>`, a JSON object.
    Redis(RedisLookup),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LakeLookup {
    pub table: String,
    /// The column matched against the key.
    pub column: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresLookup {
    pub url: String,
    /// `name` or `schema.name`.
    pub table: String,
    pub column: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisLookup {
    pub url: String,
    /// Prepended to the key, e.g. `account:`.
    #[serde(default)]
    pub prefix: String,
}

/// One route of a `route` step.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name of a sink under the pipeline's `to`.
    pub to: String,
    /// SQL boolean expression; without it the route takes every record.
    #[serde(default)]
    pub when: Option<String>,
}

/// A sink. Written as a one-key map: `{ lake: { ... } }`.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkConfig {
    /// A Delta table in the lake, exactly-once.
    Lake(LakeSinkConfig),
    /// Another stream of the log (pipelines chain), at-least-once.
    Stream(StreamSinkConfig),
    /// An HTTP endpoint: records POSTed as JSON arrays, at-least-once.
    Webhook(WebhookSinkConfig),
    /// Redis: the latest record per key (JSON string or hash), optionally positions (GEOADD).
    Redis(RedisSinkConfig),
    /// A PostgreSQL table: upsert by key, delete on tombstones.
    Postgres(PostgresSinkConfig),
}

impl SinkConfig {
    /// The sink's `rate_limit` (records per second), for sinks that have one.
    pub fn rate_limit(&self) -> Option<f64> {
        match self {
            SinkConfig::Webhook(w) => w.rate_limit,
            SinkConfig::Redis(r) => r.rate_limit,
            SinkConfig::Postgres(p) => p.rate_limit,
            SinkConfig::Lake(_) | SinkConfig::Stream(_) => None,
        }
    }
}

/// Options of a PostgreSQL sink.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// `postgres://user[:password]@host:port/database` (or `host=... port=... user=...`).
    pub url: String,
    /// The table, optionally `schema.table`.
    pub table: String,
    /// Top-level fields forming the primary key (one name or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub key: Vec<String>,
    /// SQL boolean: a record matching it deletes its key's row (e.g. `op = 'delete'`).
    /// A record with no field besides its key is a tombstone and deletes too.
    #[serde(default)]
    pub delete_when: Option<String>,
    /// Create the table from the first records, and add a column when a new field appears
    /// (default true). Off: the table must exist; fields it lacks are not written.
    #[serde(default = "default_true")]
    pub create: bool,    /// At most this many records per second (averaged over a second); records wait in the log.
    #[serde(default)]
    pub rate_limit: Option<f64>,
}

fn default_true() -> bool {
    true
}

/// Options of a Redis sink.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// SQL expression giving the Redis key of a record, e.g. `'vehicle:' || vehicle_id`.
    pub key: String,
    /// `json` (SET key <record as JSON>) or `hash` (HSET key field value ...).
    #[serde(default = "default_redis_value")]
    pub value: String,
    /// Expire keys this long after their last write.
    #[serde(default, deserialize_with = "crate::config::de_opt_dur")]
    pub ttl: Option<std::time::Duration>,
    /// Also GEOADD each record's position to a sorted set.
    #[serde(default)]
    pub geo: Option<GeoConfig>,    /// At most this many records per second (averaged over a second); records wait in the log.
    #[serde(default)]
    pub rate_limit: Option<f64>,
}

/// `GEOADD key lng lat member` per record with a position.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// The sorted set, e.g. `vehicles:live`.
    pub key: String,
    /// SQL expressions.
    pub lat: String,
    pub lng: String,
    pub member: String,
}

fn default_redis_value() -> String {
    "json".into()
}

/// Options of a webhook sink.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// `http://` or `https://` URL the records are POSTed to.
    pub url: String,
    /// With `https://`: a PEM file of CA certificates to trust besides the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Records per request (a JSON array).
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Requests in flight at once.
    #[serde(default = "default_webhook_concurrency")]
    pub concurrency: usize,
    /// Per request.
    #[serde(default = "default_webhook_timeout", deserialize_with = "crate::config::de_dur")]
    pub timeout: std::time::Duration,
    /// Retries of a request after the first attempt (connection errors, timeouts, 429, 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// At most this many records per second (averaged over a second); records wait in the log.
    #[serde(default)]
    pub rate_limit: Option<f64>,
}

fn default_batch_records() -> usize {
    500
}
fn default_webhook_concurrency() -> usize {
    4
}
fn default_webhook_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// Options of a lake sink.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LakeSinkConfig {
    /// Table name; default: the sink's name.
    #[serde(default)]
    pub table: Option<String>,
    /// Partition columns after the date column (top-level output fields).
    #[serde(default)]
    pub partition_by: Vec<String>,
}

/// Options of a stream sink.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamSinkConfig {
    /// Target stream; must be declared under `streams:`.
    pub stream: String,
}

// Steps and sinks are one-key maps (`- filter: ...`); serde's externally tagged enums
// would want YAML tags (`!filter`) from serde_yaml_ng, so these are read by hand.
macro_rules! one_key_enum {
    ($ty:ident, $what:literal, $($key:literal => $variant:ident($inner:ty)),+ $(,)?) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        write!(f, "a {} written as a one-key map ({})", $what, [$($key),+].join(", "))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<$ty, A::Error> {
                        let Some(key) = m.next_key::<String>()? else {
                            return Err(serde::de::Error::custom(format!("an empty map is not a {}", $what)));
                        };
                        let value = match key.as_str() {
                            $($key => $ty::$variant(m.next_value::<$inner>()?),)+
                            other => {
                                return Err(serde::de::Error::custom(format!(
                                    "unknown {} `{other}`, expected one of {}", $what, [$($key),+].join(", ")
                                )))
                            }
                        };
                        if let Some(extra) = m.next_key::<String>()? {
                            return Err(serde::de::Error::custom(format!(
                                "one {} per list item: `{key}` and `{extra}` are in the same item", $what
                            )));
                        }
                        Ok(value)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

pub(crate) use one_key_enum;

one_key_enum!(StepConfig, "step",
    "filter" => Filter(String),
    "map" => Map(Fields),
    "select" => Select(Fields),
    "drop" => Drop(Vec<String>),
    "enrich" => Enrich(Box<EnrichConfig>),
    "dedup" => Dedup(DedupConfig),
    "validate" => Validate(ValidateConfig),
    "route" => Route(Vec<RouteConfig>),
    "lookup" => Lookup(Box<LookupConfig>),
);
one_key_enum!(LookupFrom, "lookup source",
    "lake" => Lake(LakeLookup),
    "postgres" => Postgres(PostgresLookup),
    "redis" => Redis(RedisLookup),
);
one_key_enum!(SinkConfig, "sink",
    "lake" => Lake(LakeSinkConfig),
    "stream" => Stream(StreamSinkConfig),
    "webhook" => Webhook(WebhookSinkConfig),
    "redis" => Redis(RedisSinkConfig),
    "postgres" => Postgres(PostgresSinkConfig),
);

/// Output fields in the order written: `name: SQL expression`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of output field name to SQL expression")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, ExprText>()? {
                    if out.iter().any(|(n, _)| *n == k) {
                        return Err(serde::de::Error::custom(format!("field `{k}` is defined twice")));
                    }
                    out.push((k, v.0));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A SQL expression; YAML numbers and booleans are taken as their text (`x: 1`).
struct ExprText(String);

impl<'de> Deserialize<'de> for ExprText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum T {
            S(String),
            I(i64),
            F(f64),
            B(bool),
        }
        Ok(ExprText(match T::deserialize(d)? {
            T::S(s) => s,
            T::I(i) => i.to_string(),
            T::F(f) => f.to_string(),
            T::B(b) => b.to_string(),
        }))
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        One(String),
        Many(Vec<String>),
    }
    Ok(match T::deserialize(d)? {
        T::One(s) => vec![s],
        T::Many(v) => v,
    })
}

impl PipelineConfig {
    /// The lake table of each lake sink: (sink name, table name, options).
    pub fn lake_sinks(&self) -> impl Iterator<Item = (&str, &str, &LakeSinkConfig)> {
        self.to.iter().filter_map(|(name, s)| match s {
            SinkConfig::Lake(l) => Some((name.as_str(), l.table.as_deref().unwrap_or(name), l)),
            _ => None,
        })
    }

    /// Streams this pipeline writes to.
    pub fn output_streams(&self) -> impl Iterator<Item = &str> {
        self.to.values().filter_map(|s| match s {
            SinkConfig::Stream(s) => Some(s.stream.as_str()),
            _ => None,
        })
    }
}

/// A config key path and a message.
pub(crate) type Invalid = (Vec<String>, String);

/// Checks names and references of all pipelines (not their SQL).
pub(crate) fn validate(
    pipelines: &BTreeMap<String, PipelineConfig>,
    streams: &BTreeMap<String, crate::StreamConfig>,
    sources: &BTreeMap<String, crate::source::SourceConfig>,
    date_column: &str,
) -> Result<(), Invalid> {
    let at = |name: &str, rest: &[&str]| {
        let mut p = vec!["pipelines".to_string(), name.to_string()];
        p.extend(rest.iter().map(|s| s.to_string()));
        p
    };
    let mut tables: BTreeMap<String, String> = BTreeMap::new(); // table -> pipeline
    for (name, p) in pipelines {
        crate::validate_stream_name(name)
            .map_err(|m| (at(name, &[]), m.replace("stream name", "pipeline name")))?;
        if p.from.is_empty() {
            return Err((at(name, &["from"]), "needs at least one stream".into()));
        }
        for s in &p.from {
            let dead_letters_of = s.strip_suffix(crate::DLQ_SUFFIX).filter(|q| pipelines.contains_key(*q));
            // A table's change stream of a source (`<source>_<table>`): it exists once the
            // source sees the table.
            let changes_of = crate::source::source_of_stream(sources, s);
            if !streams.contains_key(s) && dead_letters_of.is_none() && changes_of.is_none() {
                return Err((at(name, &["from"]), format!("unknown stream {s:?}: declare it under `streams:` (or name a source's table stream, <source>_<table>)")));
            }
        }
        if p.to.is_empty() {
            return Err((at(name, &["to"]), "needs at least one sink".into()));
        }
        for (i, step) in p.steps.iter().enumerate() {
            let i_s = i.to_string();
            let key = at(name, &["steps", &i_s]);
            match step {
                StepConfig::Filter(sql) if sql.trim().is_empty() => {
                    return Err((key, "filter: the expression is empty".into()))
                }
                StepConfig::Map(f) | StepConfig::Select(f) => {
                    if f.0.is_empty() {
                        return Err((key, format!("{}: needs at least one field", step.kind())));
                    }
                    for (field, _) in &f.0 {
                        if !is_field_name(field) {
                            return Err((key, format!("{}: {field:?} is not a valid output field name", step.kind())));
                        }
                    }
                }
                StepConfig::Drop(f) if f.is_empty() => return Err((key, "drop: needs at least one field".into())),
                StepConfig::Validate(v) => {
                    let mut k = key.clone();
                    k.push("validate".into());
                    let v = &v.merged().map_err(|m| {
                        let mut k = k.clone();
                        k.push("json_schema".into());
                        (k, m)
                    })?;
                    if v.required.is_empty() && v.fields.is_empty() {
                        return Err((k, "needs `required`, `fields` or `json_schema`".into()));
                    }
                    for (field, rule) in &v.fields {
                        let mut k = k.clone();
                        k.extend(["fields".to_string(), field.clone()]);
                        if let Some(t) = &rule.kind {
                            if !FIELD_TYPES.contains(&t.as_str()) {
                                return Err((k, format!("type {t:?} is not one of {}", FIELD_TYPES.join(", "))));
                            }
                        }
                        if rule.pattern.as_deref().is_some_and(str::is_empty) {
                            return Err((k, "pattern is empty".into()));
                        }
                    }
                    for f in v.required.iter().chain(v.fields.keys()) {
                        if f.is_empty() || f.split('.').any(str::is_empty) {
                            return Err((k, format!("{f:?} is not a field path")));
                        }
                    }
                }
                StepConfig::Dedup(d) => {
                    let mut k = key.clone();
                    k.push("dedup".into());
                    if d.key.trim().is_empty() {
                        return Err((k, "key: the expression is empty".into()));
                    }
                    if d.window.is_zero() || d.max_keys == 0 {
                        return Err((k, "window and max_keys must be more than 0".into()));
                    }
                }
                StepConfig::Lookup(l) => {
                    let k = |sub: &str| {
                        let mut k = key.clone();
                        k.extend(["lookup".to_string(), sub.to_string()]);
                        k
                    };
                    if l.into.is_empty() || l.key.trim().is_empty() {
                        return Err((key.clone(), "lookup: key and into are required".into()));
                    }
                    if l.refresh.is_zero() || l.max_entries == 0 {
                        return Err((k("refresh"), "refresh and max_entries must be more than 0".into()));
                    }
                    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    match &l.from {
                        LookupFrom::Lake(t) => {
                            if !ident(&t.table) || !ident(&t.column) {
                                return Err((k("from"), "lake: table and column of letters, digits and _".into()));
                            }
                        }
                        LookupFrom::Postgres(pg) => {
                            if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://") || pg.url.contains('=')) {
                                return Err((k("from"), "postgres: url must be postgres://user@host:port/database".into()));
                            }
                            if !pg.table.split('.').all(ident) || pg.table.split('.').count() > 2 || !ident(&pg.column) {
                                return Err((k("from"), "postgres: table (name or schema.name) and column of letters, digits and _".into()));
                            }
                        }
                        LookupFrom::Redis(r) => {
                            if !r.url.starts_with("redis://") {
                                return Err((k("from"), "redis: url must start with redis://".into()));
                            }
                        }
                    }
                }
                StepConfig::Enrich(e) => {
                    let k = |sub: &str| {
                        let mut k = key.clone();
                        k.extend(["enrich".to_string(), sub.to_string()]);
                        k
                    };
                    check_http_url(&e.url, e.ca_file.as_deref()).map_err(|(f, m)| (k(f), m))?;
                    EnrichConfig::placeholders(&e.url).map_err(|m| (k("url"), m))?;
                    if let Some(b) = &e.body {
                        EnrichConfig::placeholders(b).map_err(|m| (k("body"), m))?;
                    }
                    if !matches!(e.method.as_str(), "GET" | "POST") {
                        return Err((k("method"), "must be GET or POST".into()));
                    }
                    if !is_field_name(&e.into) {
                        return Err((k("into"), format!("{:?} is not a valid field name", e.into)));
                    }
                    if !(1..=1024).contains(&e.concurrency) {
                        return Err((k("concurrency"), "must be between 1 and 1024".into()));
                    }
                    if e.timeout.is_zero() {
                        return Err((k("timeout"), "must be more than 0".into()));
                    }
                    if !(1..=10_000).contains(&e.batch_size) {
                        return Err((k("batch_size"), "must be between 1 and 10000".into()));
                    }
                    if e.batch_size > 1 && (e.body.is_none() || e.method != "POST") {
                        return Err((k("batch_size"), "batching sends a JSON array of bodies: set method: POST and a body template".into()));
                    }
                }
                StepConfig::Route(routes) => {
                    if i + 1 != p.steps.len() {
                        return Err((key, "route must be the last step".into()));
                    }
                    if routes.is_empty() {
                        return Err((key, "route: needs at least one route".into()));
                    }
                    for r in routes {
                        if !p.to.contains_key(&r.to) {
                            return Err((key, format!("route to unknown sink {:?} (sinks: {})", r.to, names(p.to.keys()))));
                        }
                    }
                }
                _ => {}
            }
        }
        for (sink, cfg) in &p.to {
            let key = at(name, &["to", sink]);
            if cfg.rate_limit().is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                return Err((key, "rate_limit: records per second, more than 0".into()));
            }
            crate::validate_stream_name(sink).map_err(|m| (key.clone(), m.replace("stream name", "sink name")))?;
            match cfg {
                SinkConfig::Lake(l) => {
                    let table = l.table.as_deref().unwrap_or(sink);
                    crate::validate_stream_name(table).map_err(|m| (key.clone(), m.replace("stream name", "table name")))?;
                    if streams.contains_key(table) && !pipelines.values().any(|q| q.from.iter().any(|f| f == table)) {
                        return Err((key, format!("table {table:?} is where stream {table:?} lands; choose another table name")));
                    }
                    if let Some(other) = tables.insert(table.to_string(), name.clone()) {
                        return Err((key, format!("table {table:?} is already written by pipeline {other:?}")));
                    }
                    for c in &l.partition_by {
                        if !crate::config::is_column_name(c) || c == date_column {
                            return Err((key, format!("partition_by {c:?} must be a top-level field name of a-z, 0-9, _ (not the date column)")));
                        }
                    }
                }
                SinkConfig::Stream(s) => {
                    if !streams.contains_key(&s.stream) {
                        return Err((key, format!("unknown stream {:?}: declare it under `streams:`", s.stream)));
                    }
                }
                SinkConfig::Redis(r) => {
                    if !r.url.starts_with("redis://") {
                        return Err((key, "url must start with redis://".into()));
                    }
                    if !matches!(r.value.as_str(), "json" | "hash") {
                        return Err((key, format!("value {:?}: use json or hash", r.value)));
                    }
                    if r.key.trim().is_empty() {
                        return Err((key, "key: the expression is empty".into()));
                    }
                }
                SinkConfig::Postgres(pg) => {
                    if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://") || pg.url.contains('=')) {
                        return Err((key, "url must be postgres://user@host:port/database or host=... key=value pairs".into()));
                    }
                    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !s.starts_with(|c: char| c.is_ascii_digit());
                    if pg.table.split('.').count() > 2 || !pg.table.split('.').all(ident) {
                        return Err((key, format!("table {:?}: use name or schema.name of letters, digits and _", pg.table)));
                    }
                    if pg.key.is_empty() || !pg.key.iter().all(|k| ident(k)) {
                        return Err((key, "key: one or more top-level field names of letters, digits and _".into()));
                    }
                }
                SinkConfig::Webhook(w) => {
                    if let Err((f, m)) = check_http_url(&w.url, w.ca_file.as_deref()) {
                        return Err((key, format!("{f}: {m}")));
                    }
                    if w.batch_records == 0 || !(1..=256).contains(&w.concurrency) || w.timeout.is_zero() {
                        return Err((key, "batch_records, concurrency (1-256) and timeout must be more than 0".into()));
                    }
                }
            }
        }
    }
    check_cycles(pipelines)
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn is_field_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('_') && !s.contains([' ', ',', ';', '{', '}', '(', ')', '\n', '\t', '=', '.'])
}

/// Streams → pipelines → streams must not loop (a record would circle forever).
fn check_cycles(pipelines: &BTreeMap<String, PipelineConfig>) -> Result<(), Invalid> {
    // Edges stream -> stream through a pipeline.
    // Every pipeline also writes its dead-letter stream.
    let dlqs: BTreeMap<&str, String> = pipelines.keys().map(|n| (n.as_str(), crate::dlq_stream(n))).collect();
    let mut edges: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (name, p) in pipelines {
        for f in &p.from {
            for out in p.output_streams().chain(std::iter::once(dlqs[name.as_str()].as_str())) {
                edges.entry(f.as_str()).or_default().push((out, name.as_str()));
            }
        }
    }
    // Depth-first search from every stream; `path` holds the pipelines taken.
    fn visit<'a>(
        s: &'a str,
        edges: &BTreeMap<&'a str, Vec<(&'a str, &'a str)>>,
        on_path: &mut Vec<&'a str>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if on_path.contains(&s) {
            return Some(path.clone());
        }
        if !done.insert(s) {
            return None;
        }
        on_path.push(s);
        for (next, via) in edges.get(s).into_iter().flatten() {
            path.push(via);
            if let Some(cycle) = visit(next, edges, on_path, path, done) {
                return Some(cycle);
            }
            path.pop();
        }
        on_path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for s in edges.keys() {
        let (mut on_path, mut path) = (Vec::new(), Vec::new());
        if let Some(cycle) = visit(s, &edges, &mut on_path, &mut path, &mut done) {
            let first = cycle.last().copied().unwrap_or_default();
            return Err((
                vec!["pipelines".into(), first.into(), "to".into()],
                format!("pipelines form a cycle through streams ({}): a record would circle forever", cycle.join(" -> ")),
            ));
        }
    }
    Ok(())
}
