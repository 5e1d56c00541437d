//! PostgreSQL values (text output format, as `pgoutput` sends them) to JSON, faithfully:
//!
//! | PostgreSQL | JSON |
//! |---|---|
//! | boolean | true / false |
//! | smallint, integer, bigint, oid | number (exact: JSON numbers are not rounded here) |
//! | real, double precision | number; `NaN` and `±Infinity` as strings |
//! | numeric | string with every digit (`"1234.5600"`): exact, never rounded through a float |
//! | timestamptz | RFC 3339 in UTC (`2026-01-05T10:00:00.123456Z`) |
//! | timestamp, date, time, timetz, interval | the text PostgreSQL prints, `T` between date and time |
//! | json, jsonb | the JSON value itself |
//! | arrays of any of these | JSON arrays (nested for multi-dimensional), elements mapped alike |
//! | bytea | string `\x0a0b…` (PostgreSQL's hex format) |
//! | uuid, text, varchar, char, enums, anything else | string |
//!
//! The replication session runs with `DateStyle=ISO` and `TimeZone=UTC`, so these formats are
//! what the server prints.

use serde_json::Value as Json;

/// Built-in type OIDs (pg_type.dat).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of a built-in array type, if `array_oid` is one.
pub fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1009 => oid::TEXT,
        1015 => oid::VARCHAR,
        1014 => 1042, // bpchar
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => oid::NUMERIC,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        2951 => oid::UUID,
        199 => oid::JSON,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// Is this a type whose values map to something other than a string?
pub fn is_known(type_oid: u32) -> bool {
    matches!(
        type_oid,
        oid::BOOL
            | oid::BYTEA
            | oid::INT2
            | oid::INT4
            | oid::INT8
            | oid::OID
            | oid::TEXT
            | oid::VARCHAR
            | 1042
            | 19 // name
            | oid::FLOAT4
            | oid::FLOAT8
            | oid::NUMERIC
            | oid::DATE
            | oid::TIME
            | 1266 // timetz
            | 1186 // interval
            | oid::TIMESTAMP
            | oid::TIMESTAMPTZ
            | oid::UUID
            | oid::JSON
            | oid::JSONB
    ) || array_element(type_oid).is_some()
}

/// A value of type `type_oid` from its text form. Never fails: a value that does not parse
/// as its type says it should stays a string.
pub fn to_json(type_oid: u32, text: &str) -> Json {
    if let Some(elem) = array_element(type_oid) {
        return match parse_array(text) {
            Some(a) => array_to_json(elem, &a),
            None => Json::String(text.to_string()),
        };
    }
    let s = || Json::String(text.to_string());
    match type_oid {
        oid::BOOL => match text {
            "t" | "true" => Json::Bool(true),
            "f" | "false" => Json::Bool(false),
            _ => s(),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text.parse::<i64>().map(Json::from).unwrap_or_else(|_| s()),
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f).map(Json::Number).unwrap_or_else(s),
            _ => s(),
        },
        oid::JSON | oid::JSONB => serde_json::from_str(text).unwrap_or_else(|_| s()),
        oid::TIMESTAMPTZ => Json::String(timestamptz(text).unwrap_or_else(|| text.to_string())),
        oid::TIMESTAMP => Json::String(text.replacen(' ', "T", 1)),
        _ => s(),
    }
}

/// Writes `to_json(type_oid, text)` as JSON text to `out`, the same bytes as serializing it,
/// without building the value for the common types (snapshots write millions of them).
pub fn write_json(type_oid: u32, text: &str, out: &mut Vec<u8>) {
    match type_oid {
        oid::BOOL if text == "t" => out.extend_from_slice(b"true"),
        oid::BOOL if text == "f" => out.extend_from_slice(b"false"),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            Err(_) => write_str(text, out),
        },
        oid::TEXT | oid::VARCHAR | 1042 | 19 | oid::NUMERIC | oid::UUID | oid::BYTEA | oid::DATE | oid::TIME | 1266 | 1186 => write_str(text, out),
        oid::TIMESTAMPTZ => {
            if !timestamptz_utc(text, out) {
                write_str(&timestamptz(text).unwrap_or_else(|| text.to_string()), out)
            }
        }
        _ => serde_json::to_writer(out, &to_json(type_oid, text)).expect("writing JSON to memory"),
    }
}

/// A string as JSON text.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    crate::write_json_str(s.as_bytes(), out);
}

/// The fast path of [`timestamptz`] for what a UTC session prints (`2026-01-05
/// 10:00:00.12+00`): written as JSON (`"2026-01-05T10:00:00.120Z"`, fractions padded to 3
/// or 6 digits as chrono's `AutoSi` does). False, writing nothing, for anything else.
fn timestamptz_utc(text: &str, out: &mut Vec<u8>) -> bool {
    let b = text.as_bytes();
    let Some(body) = text.strip_suffix("+00") else { return false };
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shape = body.len() >= 19
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b' '
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let frac = &body[19..];
    let frac = match frac.strip_prefix('.') {
        Some(f) if (1..=6).contains(&f.len()) && f.bytes().all(|c| c.is_ascii_digit()) => f,
        None if frac.is_empty() => "",
        _ => return false,
    };
    // Let chrono judge the calendar (Feb 30, leap seconds, hour 24): only plain values here.
    let num = |r: std::ops::Range<usize>| body[r].parse::<u32>().unwrap_or(99);
    if !(1..=12).contains(&num(5..7)) || !(1..=28).contains(&num(8..10)) || num(11..13) > 23 || num(14..16) > 59 || num(17..19) > 59 || num(0..4) == 0 {
        return false;
    }
    out.push(b'"');
    out.extend_from_slice(&b[..10]);
    out.push(b'T');
    out.extend_from_slice(&b[11..19]);
    if frac.bytes().any(|c| c != b'0') {
        let trimmed = frac.trim_end_matches('0');
        let width = if trimmed.len() <= 3 { 3 } else { 6 };
        out.push(b'.');
        out.extend_from_slice(trimmed.as_bytes());
        out.resize(out.len() + width - trimmed.len(), b'0');
    }
    out.extend_from_slice(b"Z\"");
    true
}

/// `2026-01-05 10:00:00.123456+00` (ISO style, UTC session) as
/// `2026-01-05T10:00:00.123456Z`; other offsets are converted to UTC.
fn timestamptz(text: &str) -> Option<String> {
    if matches!(text, "infinity" | "-infinity") {
        return None;
    }
    // The offset is `+HH`, `+HH:MM` or `+HH:MM:SS`; chrono wants `+HH:MM`.
    let at = text.rfind(['+', '-']).filter(|i| *i > 10)?;
    let (dt, off) = text.split_at(at);
    let off = match off.len() {
        3 => format!("{off}:00"),
        6 => off.to_string(),
        9 => off.get(..6)?.to_string(),
        _ => return None,
    };
    let t = chrono::DateTime::parse_from_str(&format!("{dt}{off}"), "%Y-%m-%d %H:%M:%S%.f%:z").ok()?;
    Some(t.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// A parsed array literal: elements (`None` = NULL) or nested arrays.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayItem {
    Null,
    Text(String),
    Array(Vec<ArrayItem>),
}

/// Parses PostgreSQL's array output (`{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b","c\"d"}`), with
/// an optional dimension prefix (`[0:1]={1,2}`). None when it is not one.
pub fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let text = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let chars: Vec<char> = text.chars().collect();
    let mut pos = 0;
    let out = parse_level(&chars, &mut pos)?;
    (pos == chars.len()).then_some(out)
}

fn parse_level(c: &[char], pos: &mut usize) -> Option<Vec<ArrayItem>> {
    if c.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if c.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match c.get(*pos)? {
            '{' => items.push(ArrayItem::Array(parse_level(c, pos)?)),
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    match c.get(*pos)? {
                        '\\' => {
                            s.push(*c.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        ch => {
                            s.push(*ch);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Text(s));
            }
            _ => {
                let start = *pos;
                while !matches!(c.get(*pos)?, ',' | '}') {
                    *pos += 1;
                }
                let s: String = c[start..*pos].iter().collect();
                items.push(if s == "NULL" { ArrayItem::Null } else { ArrayItem::Text(s) });
            }
        }
        match c.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

fn array_to_json(elem: u32, items: &[ArrayItem]) -> Json {
    Json::Array(
        items
            .iter()
            .map(|i| match i {
                ArrayItem::Null => Json::Null,
                ArrayItem::Text(t) => to_json(elem, t),
                ArrayItem::Array(a) => array_to_json(elem, a),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(to_json(oid::BOOL, "t"), json!(true));
        assert_eq!(to_json(oid::INT8, "9007199254740993"), json!(9007199254740993i64));
        assert_eq!(to_json(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(to_json(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(to_json(oid::NUMERIC, "12345678901234567890.0100"), json!("12345678901234567890.0100"));
        assert_eq!(to_json(oid::JSONB, r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(to_json(oid::TIMESTAMPTZ, "2026-01-05 10:00:00.123456+00"), json!("2026-01-05T10:00:00.123456Z"));
        assert_eq!(to_json(oid::TIMESTAMPTZ, "2026-01-05 10:00:00+05:30"), json!("2026-01-05T04:30:00Z"));
        assert_eq!(to_json(oid::TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(to_json(oid::TIMESTAMP, "2026-01-05 10:00:00"), json!("2026-01-05T10:00:00"));
        assert_eq!(to_json(oid::BYTEA, "\\x0aff"), json!("\\x0aff"));
        assert_eq!(to_json(99999, "happy"), json!("happy"));
    }

    #[test]
    fn arrays() {
        assert_eq!(to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1009, r#"{"a b","c\"d",NULL,"NULL",x}"#), json!(["a b", "c\"d", null, "NULL", "x"]));
        assert_eq!(to_json(1009, "{}"), json!([]));
        assert_eq!(to_json(1007, "[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(to_json(1007, "{1,2"), json!("{1,2"), "not an array literal: kept as text");
    }

    fn written(t: u32, s: &str) -> String {
        let mut out = Vec::new();
        write_json(t, s, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn written_like_the_values() {
        for (t, s) in [
            (oid::BOOL, "t"),
            (oid::BOOL, "f"),
            (oid::BOOL, "maybe"),
            (oid::INT4, "-42"),
            (oid::INT8, "x"),
            (oid::TEXT, "a \"quoted\"\n\u{1}é"),
            (oid::NUMERIC, "1.50"),
            (oid::TIMESTAMPTZ, "2026-01-05 10:00:00+00"),
            (oid::TIMESTAMPTZ, "2026-01-05 10:00:00.1+00"),
            (oid::TIMESTAMPTZ, "2026-01-05 10:00:00.000100+00"),
            (oid::TIMESTAMPTZ, "2026-01-05 10:00:00.1234+00"),
            (oid::TIMESTAMPTZ, "2024-02-29 23:59:59.999999+00"),
            (oid::TIMESTAMPTZ, "2026-01-05 10:00:00+05:30"),
            (oid::TIMESTAMPTZ, "infinity"),
            (oid::TIMESTAMPTZ, "12026-01-05 10:00:00+00"),
            (oid::TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
            (oid::TIMESTAMP, "2026-01-05 10:00:00"),
            (oid::JSONB, r#"{"b": 1, "a": [true]}"#),
            (oid::FLOAT8, "1e300"),
            (1007, "{1,NULL}"),
            (99999, "happy"),
        ] {
            assert_eq!(written(t, s), to_json(t, s).to_string(), "{t} {s}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(t in any::<u32>(), s in ".{0,30}") {
            let _ = to_json(t % 4000, &s);
            let _ = parse_array(&s);
        }

        #[test]
        fn written_timestamps_match_chrono(y in 1u32..10000, mo in 1u32..13, d in 1u32..29, h in 0u32..24, mi in 0u32..60, sec in 0u32..60, frac in proptest::option::of("[0-9]{1,6}")) {
            let t = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{sec:02}{}+00", frac.map(|f| format!(".{f}")).unwrap_or_default());
            prop_assert_eq!(written(oid::TIMESTAMPTZ, &t), to_json(oid::TIMESTAMPTZ, &t).to_string());
        }

        #[test]
        fn written_like_the_values_any(t in prop_oneof![Just(16u32), Just(20), Just(23), Just(25), Just(1184), Just(1700), Just(3802), Just(1009)], s in ".{0,30}") {
            prop_assert_eq!(written(t, &s), to_json(t, &s).to_string());
        }

        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of("[^\u{0}]{0,8}"), 0..6)) {
            let lit = format!("{{{}}}", items.iter().map(|i| match i {
                None => "NULL".to_string(),
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            }).collect::<Vec<_>>().join(","));
            let want: Vec<Json> = items.iter().map(|i| i.clone().map_or(Json::Null, Json::String)).collect();
            prop_assert_eq!(to_json(1009, &lit), Json::Array(want));
        }
    }
}
