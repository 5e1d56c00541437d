//! Shared vocabulary of Sluice: the configuration model and its validation, units
//! (sizes, durations), event-time parsing and stream-name rules.
//!
//! Every crate of the workspace depends on this one and on nothing else from the
//! workspace above it.

pub mod config;
pub mod fs;
pub mod json_scan;
pub mod pipeline;
pub mod source;
pub mod time;
pub mod units;

pub use config::{Config, ConfigError, StreamConfig, TokenConfig};

/// Suffix of the dead-letter table of a stream or pipeline.
pub const DLQ_SUFFIX: &str = "__dlq";

/// Suffix of the stream through which `sluice replay` feeds records back into a pipeline
/// (dead letters, rows of a lake table). Every pipeline reads its own as an extra source.
pub const REPLAY_SUFFIX: &str = "__replay";

/// Suffix of the append-only changelog table of a change-data-capture stream (whose own
/// table is the mirror of the source table).
pub const CHANGELOG_SUFFIX: &str = "__changelog";

/// The replay stream of pipeline `pipeline`.
pub fn replay_stream(pipeline: &str) -> String {
    format!("{pipeline}{REPLAY_SUFFIX}")
}

/// The dead-letter stream (and lake table) of pipeline `pipeline`. Other pipelines may read
/// it (`from: [orders__dlq]`), to alert or repair.
pub fn dlq_stream(pipeline: &str) -> String {
    format!("{pipeline}{DLQ_SUFFIX}")
}

/// Checks a stream name: `^[a-z0-9_][a-z0-9_-]{0,99}$` and not ending in `__dlq`, `__changelog` or
/// `__replay`.
///
/// Names are lower case so they can be used unquoted in SQL.
pub fn validate_stream_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 100;
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !(ok_len && first_ok && rest_ok) {
        return Err(format!(
            "invalid stream name {name:?}: use 1-100 characters of a-z, 0-9, '_' and '-' (not starting with '-')"
        ));
    }
    if name.ends_with(DLQ_SUFFIX) {
        return Err(format!("invalid stream name {name:?}: the suffix {DLQ_SUFFIX} is reserved for dead letters"));
    }
    if name.ends_with(CHANGELOG_SUFFIX) {
        return Err(format!("invalid stream name {name:?}: the suffix {CHANGELOG_SUFFIX} is reserved for changelog tables"));
    }
    if name.ends_with(REPLAY_SUFFIX) {
        return Err(format!("invalid stream name {name:?}: the suffix {REPLAY_SUFFIX} is reserved for replays"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        for ok in ["events", "a", "scooter_telemetry", "app-events", "_x", "9"] {
            assert!(validate_stream_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Events", "-x", "a b", "a/b", "x__dlq", &"a".repeat(101), "é"] {
            assert!(validate_stream_name(bad).is_err(), "{bad}");
        }
    }
}
