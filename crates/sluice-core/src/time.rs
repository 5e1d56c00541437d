//! Event time: reading a record's timestamp from a JSON field.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Parses an event-time string: RFC 3339 (`2026-01-01T12:00:00.123Z`, with any offset),
/// `YYYY-MM-DD HH:MM:SS[.fff]` or `YYYY-MM-DDTHH:MM:SS[.fff]` (taken as UTC), or a bare date.
pub fn parse_time_str(s: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// Interprets a numeric event time as epoch seconds, milliseconds or microseconds by
/// magnitude (|n| < 1e11 → seconds, < 1e14 → milliseconds, else microseconds).
pub fn from_epoch_number(n: f64) -> Option<i64> {
    if !n.is_finite() {
        return None;
    }
    let a = n.abs();
    let ms = if a < 1e11 {
        n * 1000.0
    } else if a < 1e14 {
        n
    } else {
        n / 1000.0
    };
    if ms.abs() > 8.0e15 {
        return None;
    }
    Some(ms as i64)
}

/// The UTC calendar date (`YYYY-MM-DD`) of an epoch-milliseconds timestamp.
pub fn date_of_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_time_str("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(parse_time_str("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_time_str("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_time_str("1970-01-01 00:00:02"), Some(2000));
        assert_eq!(parse_time_str("yesterday"), None);
        assert_eq!(from_epoch_number(1.0), Some(1000));
        assert_eq!(from_epoch_number(1_700_000_000_000.0), Some(1_700_000_000_000));
        assert_eq!(from_epoch_number(1_700_000_000_000_000.0), Some(1_700_000_000_000));
        assert_eq!(date_of_ms(0), "1970-01-01");
        assert_eq!(date_of_ms(-1), "1969-12-31");
    }
}
