//! Event time: reading a record's timestamp from a JSON field.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Parses an event-time string: RFC 3339 (`2026-01-01T12:00:00.123Z`, with any offset),
/// `YYYY-MM-DD HH:MM:SS[.fff]` or `YYYY-MM-DDTHH:MM:SS[.fff]` (taken as UTC), or a bare date.
pub fn parse_time_str(s: &str) -> Option<i64> {
    if let Some(ms) = parse_utc_fast(s.as_bytes()) {
        return Some(ms);
    }
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

/// `YYYY-MM-DDTHH:MM:SS[.f]Z` (1 to 9 fraction digits), the common form, read without
/// chrono: ingest reads one per record and chrono's general parser costs ~10x more. Anything
/// else (offsets, leap seconds, other separators) is `None` and left to chrono.
fn parse_utc_fast(s: &[u8]) -> Option<i64> {
    if s.len() < 20 || s.len() > 30 || s[s.len() - 1] != b'Z' {
        return None;
    }
    if s[4] != b'-' || s[7] != b'-' || s[10] != b'T' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    let (year, month, day) = (two_at(s, 0)? * 100 + two_at(s, 2)?, two_at(s, 5)?, two_at(s, 8)?);
    let (hour, minute, second) = (two_at(s, 11)?, two_at(s, 14)?, two_at(s, 17)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut millis = 0;
    match s.len() {
        20 => {}
        n if s[19] == b'.' && n >= 22 => {
            for (k, i) in (20..n - 1).enumerate() {
                let d = digit_at(s, i)?;
                if k < 3 {
                    millis = millis * 10 + d;
                }
            }
            for _ in (n - 21)..3 {
                millis *= 10;
            }
        }
        _ => return None,
    }
    // Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000 + millis)
}

/// The digit at `s[i]` (callers check the length first). Functions, not closures: as
/// closures they stayed a call per digit, ~40% of reading a timestamp.
#[inline(always)]
fn digit_at(s: &[u8], i: usize) -> Option<i64> {
    let d = s[i].wrapping_sub(b'0');
    (d < 10).then_some(i64::from(d))
}

/// The two digits at `s[i..i + 2]` as a number.
#[inline(always)]
fn two_at(s: &[u8], i: usize) -> Option<i64> {
    Some(digit_at(s, i)? * 10 + digit_at(s, i + 1)?)
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
        assert_eq!(parse_time_str("2024-02-29T23:59:59.9Z"), Some(1_709_251_199_900));
        assert_eq!(parse_time_str("0001-01-01T00:00:00Z"), Some(-62_135_596_800_000));
        // Not the fast form, still read (by chrono): offsets, lower-case, leap second.
        assert_eq!(parse_time_str("1970-01-01t00:00:01Z"), Some(1000));
        assert_eq!(parse_utc_fast(b"2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_time_str("2023-02-29T00:00:00Z"), None);
    }

    proptest::proptest! {
        /// The fast form agrees with chrono wherever it answers, and answers for every
        /// valid `YYYY-MM-DDTHH:MM:SS[.f]Z`.
        #[test]
        fn fast_form_equals_chrono(
            y in 0i32..10000, mo in 1u32..13, d in 1u32..32, h in 0u32..24, mi in 0u32..60, sec in 0u32..61,
            frac in proptest::option::of("[0-9]{1,10}"),
        ) {
            let s = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}{}Z", frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default());
            let chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_millis());
            let fast = parse_utc_fast(s.as_bytes());
            if fast.is_some() {
                proptest::prop_assert_eq!(fast, chrono, "{}", s);
            }
            let plain = sec < 60 && frac.as_ref().is_none_or(|f| f.len() <= 9);
            if plain && chrono.is_some() {
                proptest::prop_assert!(fast.is_some(), "{} not read by the fast form", s);
            }
        }

        #[test]
        fn fast_form_never_disagrees(s in "[0-9T:.Z-]{18,31}") {
            if let Some(ms) = parse_utc_fast(s.as_bytes()) {
                let chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_millis());
                proptest::prop_assert_eq!(Some(ms), chrono, "{}", s);
            }
        }
    }
}
