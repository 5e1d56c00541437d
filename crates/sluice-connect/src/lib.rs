//! Sources and sinks, one module each.
//!
//! - [`http`]: the HTTP ingest source's request handling (body decoding, record
//!   parsing, key and event-time extraction). The axum wiring lives in the binary.
//! - [`redis_sink`]: the Redis sink of pipelines (latest value per key, positions).
//! - [`webhook`]: the webhook sink of pipelines (records POSTed as JSON arrays).

pub mod http;
pub mod redis_sink;
pub mod webhook;
