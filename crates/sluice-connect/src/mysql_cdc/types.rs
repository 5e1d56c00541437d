//! MySQL/MariaDB values to JSON, the same whether they come from the binlog (row events) or
//! from a snapshot read (the binary protocol), so that a row read and a row changed look
//! alike in the mirror:
//!
//! | MySQL | JSON |
//! |---|---|
//! | TINYINT … BIGINT (signed or unsigned), YEAR | number (exact) |
//! | FLOAT, DOUBLE | number |
//! | DECIMAL | string with every digit (`"1234.50"`): exact, never rounded through a float |
//! | TIMESTAMP (an instant) | RFC 3339 in UTC (`2026-01-05T10:00:00.123Z`) |
//! | DATETIME, DATE, TIME | `2026-01-05T10:00:00.123`, `2026-01-05`, `-838:59:59` |
//! | JSON (MySQL) | the JSON value itself (MariaDB's JSON is LONGTEXT: a string) |
//! | ENUM, SET | the member's name; a SET's names joined with `,` |
//! | BIT | number |
//! | BINARY, VARBINARY, BLOB | string `\x0a0b…` (as PostgreSQL's bytea) |
//! | CHAR, VARCHAR, TEXT | string |
//! | GEOMETRY, VECTOR, anything else | unsupported: the bytes as `\x…`, with a warning naming the column |

use mysql_async::binlog::jsondiff::{JsonDiff, JsonDiffOperation};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::Value;
use serde_json::Value as Json;

/// The character set number of binary strings.
pub const BINARY_CHARSET: u16 = 63;

/// How a column's values map to JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Int,
    Float,
    Decimal,
    Timestamp,
    DateTime,
    Date,
    Time,
    Year,
    Bit,
    Json,
    Enum(Vec<String>),
    Set(Vec<String>),
    Text,
    Binary,
    /// Kept as `\x…` text; the name of the type for the warning.
    Unsupported(String),
}

impl Kind {
    /// From a binlog table map's column type (the real type) and character set.
    pub fn of_binlog(t: ColumnType, charset: u16, enum_values: Option<Vec<String>>, set_values: Option<Vec<String>>) -> Kind {
        use ColumnType::*;
        match t {
            MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG | MYSQL_TYPE_LONGLONG => Kind::Int,
            MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => Kind::Float,
            MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => Kind::Decimal,
            MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => Kind::Timestamp,
            MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => Kind::DateTime,
            MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => Kind::Date,
            MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => Kind::Time,
            MYSQL_TYPE_YEAR => Kind::Year,
            MYSQL_TYPE_BIT => Kind::Bit,
            MYSQL_TYPE_JSON => Kind::Json,
            MYSQL_TYPE_ENUM => Kind::Enum(enum_values.unwrap_or_default()),
            MYSQL_TYPE_SET => Kind::Set(set_values.unwrap_or_default()),
            MYSQL_TYPE_STRING
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB => {
                if charset == BINARY_CHARSET {
                    Kind::Binary
                } else {
                    Kind::Text
                }
            }
            other => Kind::Unsupported(format!("{other:?}").trim_start_matches("MYSQL_TYPE_").to_lowercase()),
        }
    }

    /// From `information_schema.COLUMNS`: `DATA_TYPE` and `COLUMN_TYPE` (which lists an
    /// enum's or set's members).
    pub fn of_schema(data_type: &str, column_type: &str) -> Kind {
        match data_type.to_ascii_lowercase().as_str() {
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => Kind::Int,
            "float" | "double" | "real" => Kind::Float,
            "decimal" | "numeric" => Kind::Decimal,
            "timestamp" => Kind::Timestamp,
            "datetime" => Kind::DateTime,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "year" => Kind::Year,
            "bit" => Kind::Bit,
            "json" => Kind::Json,
            "enum" => Kind::Enum(members(column_type)),
            "set" => Kind::Set(members(column_type)),
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => Kind::Text,
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => Kind::Binary,
            other => Kind::Unsupported(other.to_string()),
        }
    }
}

/// The members of `enum('a','b''c')` or `set(...)`.
fn members(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type.split_once('(').and_then(|(_, r)| r.strip_suffix(')')) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('\'', false) => quoted = true,
            ('\'', true) if chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            ('\'', true) => {
                quoted = false;
                out.push(std::mem::take(&mut cur));
            }
            ('\\', true) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (c, true) => cur.push(c),
            _ => {}
        }
    }
    out
}

/// A value from the binlog as JSON.
pub fn binlog_to_json(kind: &Kind, v: &BinlogValue<'_>) -> Json {
    match v {
        BinlogValue::Value(v) => value_to_json(kind, v, true),
        BinlogValue::Jsonb(j) => serde_json::Value::try_from(j.clone()).unwrap_or_else(|e| Json::String(format!("unreadable JSON value: {e}"))),
        // Only with binlog_row_value_options = PARTIAL_JSON (MySQL); the source applies the
        // diffs to the old document before rows are written (`apply_json_diffs`).
        BinlogValue::JsonDiff(_) => Json::Null,
    }
}

/// The document a partial JSON update (MySQL with `binlog_row_value_options = PARTIAL_JSON`
/// logs `JSON_SET`, `JSON_REPLACE` and `JSON_REMOVE` as diffs, even with full row images)
/// makes of `doc`, the column's old value; or why the diffs do not apply.
pub fn apply_json_diffs(mut doc: Json, diffs: &[JsonDiff<'_>]) -> Result<Json, String> {
    for d in diffs {
        let path = d.path_str();
        let value = match d.value() {
            Some(v) => Some(Json::try_from(v.clone()).map_err(|e| format!("unreadable JSON value at {path}: {e}"))?),
            None => None,
        };
        apply_json_diff(&mut doc, d.operation(), &path, value)?;
    }
    Ok(doc)
}

/// One diff of [`apply_json_diffs`]: `op` at `path` with `value` (none for a removal).
fn apply_json_diff(doc: &mut Json, op: JsonDiffOperation, path: &str, value: Option<Json>) -> Result<(), String> {
    let legs = json_path(path).ok_or_else(|| format!("unreadable JSON path {path:?}"))?;
    let Some((last, parents)) = legs.split_last() else {
        // The whole document.
        return match (op, value) {
            (JsonDiffOperation::REPLACE, Some(v)) => {
                *doc = v;
                Ok(())
            }
            _ => Err(format!("cannot {op:?} the whole document")),
        };
    };
    let mut at = doc;
    for leg in parents {
        at = match (leg, at) {
            (Leg::Member(m), Json::Object(o)) => o.get_mut(m.as_str()),
            (Leg::Index(i), Json::Array(a)) => a.get_mut(*i),
            _ => None,
        }
        .ok_or_else(|| format!("JSON path {path} is not in the old document"))?;
    }
    let done = match (op, last, at, value) {
        (JsonDiffOperation::REPLACE | JsonDiffOperation::INSERT, Leg::Member(m), Json::Object(o), Some(v)) => {
            o.insert(m.clone(), v);
            true
        }
        (JsonDiffOperation::REPLACE, Leg::Index(i), Json::Array(a), Some(v)) if *i < a.len() => {
            a[*i] = v;
            true
        }
        (JsonDiffOperation::INSERT, Leg::Index(i), Json::Array(a), Some(v)) => {
            a.insert((*i).min(a.len()), v);
            true
        }
        (JsonDiffOperation::REMOVE, Leg::Member(m), Json::Object(o), None) => o.remove(m.as_str()).is_some(),
        (JsonDiffOperation::REMOVE, Leg::Index(i), Json::Array(a), None) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    };
    if done {
        Ok(())
    } else {
        Err(format!("cannot {op:?} at JSON path {path} of the old document"))
    }
}

/// One step of a JSON path.
#[derive(Debug, PartialEq)]
enum Leg {
    Member(String),
    Index(usize),
}

/// A JSON path as MySQL writes one in a partial update: `$`, then `.name`, `."quoted name"`
/// or `[n]` steps (no wildcards or ranges).
fn json_path(p: &str) -> Option<Vec<Leg>> {
    let mut rest = p.trim().strip_prefix('$')?.trim_start();
    let mut legs = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let r = r.trim_start();
            if r.starts_with('"') {
                // A JSON string: find its end, then unescape it as JSON does.
                let mut end = None;
                let mut escaped = false;
                for (i, c) in r.char_indices().skip(1) {
                    match (c, escaped) {
                        ('\\', false) => escaped = true,
                        ('"', false) => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end?;
                legs.push(Leg::Member(serde_json::from_str(&r[..=end]).ok()?));
                rest = &r[end + 1..];
            } else {
                let end = r.find(['.', '[', ' ']).unwrap_or(r.len());
                if end == 0 || r[..end].contains('*') {
                    return None;
                }
                legs.push(Leg::Member(r[..end].to_string()));
                rest = &r[end..];
            }
        } else if let Some(r) = rest.strip_prefix('[') {
            let (n, r) = r.split_once(']')?;
            legs.push(Leg::Index(n.trim().parse().ok()?));
            rest = r;
        } else {
            return None;
        }
        rest = rest.trim_start();
    }
    Some(legs)
}

/// A value as JSON. `binlog`: it came from a row event (whose TIMESTAMP is seconds since the
/// epoch, ENUM a member's number and SET a bit mask), else from a query's result.
pub fn value_to_json(kind: &Kind, v: &Value, binlog: bool) -> Json {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match (kind, v) {
        (_, Value::NULL) => Json::Null,
        (Kind::Int | Kind::Year, Value::Int(i)) => (*i).into(),
        (Kind::Int | Kind::Year, Value::UInt(i)) => (*i).into(),
        // YEAR 0000: the binlog decoder reads it as 1900 (not a valid YEAR otherwise).
        (Kind::Year, Value::Bytes(b)) if binlog && b.as_slice() == b"1900" => 0.into(),
        (Kind::Int | Kind::Year, Value::Bytes(b)) => {
            let s = text(b);
            s.parse::<i64>().map(Json::from).or_else(|_| s.parse::<u64>().map(Json::from)).unwrap_or(Json::String(s))
        }
        (Kind::Float, Value::Float(f)) => serde_json::Number::from_f64(*f as f64).map_or(Json::Null, Json::Number),
        (Kind::Float, Value::Double(f)) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        (Kind::Float, Value::Bytes(b)) => text(b).parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Json::Null, Json::Number),
        (Kind::Decimal, Value::Bytes(b)) => Json::String(text(b)),
        (Kind::Timestamp, Value::Int(secs)) if binlog => Json::String(instant(*secs, 0)),
        (Kind::Timestamp, Value::Bytes(b)) if binlog => {
            // `secs` or `secs.micros` (TIMESTAMP2).
            let s = text(b);
            let (secs, frac) = s.split_once('.').unwrap_or((&s, "0"));
            Json::String(instant(secs.parse().unwrap_or(0), format!("{frac:0<6}").get(..6).and_then(|f| f.parse().ok()).unwrap_or(0)))
        }
        // Read in a session with time_zone = '+00:00'.
        (Kind::Timestamp, Value::Date(y, mo, d, h, mi, s, us)) => {
            if *y == 0 {
                // The zero timestamp (0000-00-00 00:00:00): no instant.
                Json::String(datetime(*y, *mo, *d, *h, *mi, *s, *us))
            } else {
                Json::String(format!("{}Z", datetime(*y, *mo, *d, *h, *mi, *s, *us)))
            }
        }
        (Kind::DateTime, Value::Date(y, mo, d, h, mi, s, us)) => Json::String(datetime(*y, *mo, *d, *h, *mi, *s, *us)),
        (Kind::Date, Value::Date(y, mo, d, ..)) => Json::String(format!("{y:04}-{mo:02}-{d:02}")),
        (Kind::Time, Value::Time(neg, days, h, mi, s, us)) => {
            let hours = *days as u64 * 24 + *h as u64;
            Json::String(format!("{}{hours:02}:{mi:02}:{s:02}{}", if *neg { "-" } else { "" }, micros(*us)))
        }
        (Kind::Bit, Value::Bytes(b)) => b.iter().fold(0u64, |acc, x| (acc << 8) | *x as u64).into(),
        (Kind::Bit, Value::Int(i)) => (*i).into(),
        (Kind::Bit, Value::UInt(i)) => (*i).into(),
        (Kind::Json, Value::Bytes(b)) => serde_json::from_slice(b).unwrap_or_else(|_| Json::String(text(b))),
        (Kind::Enum(names), Value::Int(i)) if binlog => {
            match names.get((*i as usize).wrapping_sub(1)) {
                Some(n) => Json::String(n.clone()),
                // 0: the empty string MySQL stores for an invalid member.
                None => Json::String(String::new()),
            }
        }
        (Kind::Set(names), Value::Bytes(b)) if binlog => {
            let mask = b.iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64);
            let on: Vec<&str> = names.iter().enumerate().filter(|(i, _)| *i < 64 && mask & (1 << i) != 0).map(|(_, n)| n.as_str()).collect();
            Json::String(on.join(","))
        }
        (Kind::Text | Kind::Enum(_) | Kind::Set(_), Value::Bytes(b)) => Json::String(text(b)),
        (_, Value::Bytes(b)) => Json::String(hex(b)),
        // A shape not expected for the kind: its text, never dropped.
        (_, other) => Json::String(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

/// Writes `value_to_json(kind, v, false)` as JSON text to `out`, the same bytes as
/// serializing it, without building the value for the common kinds (snapshot rows).
pub fn write_value(kind: &Kind, v: &Value, out: &mut Vec<u8>) {
    match (kind, v) {
        (_, Value::NULL) => out.extend_from_slice(b"null"),
        (Kind::Int | Kind::Year, Value::Int(i)) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        (Kind::Int | Kind::Year, Value::UInt(i)) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        (Kind::Text | Kind::Enum(_) | Kind::Set(_) | Kind::Decimal, Value::Bytes(b)) => {
            if !crate::write_json_str(b, out) {
                serde_json::to_writer(out, &value_to_json(kind, v, false)).expect("JSON to memory")
            }
        }
        // Dates and times as `datetime` prints them, without formatting machinery (snapshots
        // write millions); values out of the usual ranges take the general path.
        (Kind::Timestamp | Kind::DateTime | Kind::Date, &Value::Date(y, mo, d, h, mi, s, us)) if y <= 9999 && mo < 100 && d < 100 && h < 100 && mi < 100 && s < 100 && us < 1_000_000 => {
            out.push(b'"');
            out.extend_from_slice(&[b'0' + (y / 1000) as u8, b'0' + (y / 100 % 10) as u8, b'0' + (y / 10 % 10) as u8, b'0' + (y % 10) as u8]);
            let two = |out: &mut Vec<u8>, sep: u8, n: u8| out.extend_from_slice(&[sep, b'0' + n / 10, b'0' + n % 10]);
            two(out, b'-', mo);
            two(out, b'-', d);
            if !matches!(kind, Kind::Date) {
                two(out, b'T', h);
                two(out, b':', mi);
                two(out, b':', s);
                if us > 0 {
                    let digits = [100_000, 10_000, 1_000, 100, 10, 1].map(|p| b'0' + (us / p % 10) as u8);
                    let n = 6 - digits.iter().rev().take_while(|&&c| c == b'0').count();
                    out.push(b'.');
                    out.extend_from_slice(&digits[..n]);
                }
                if matches!(kind, Kind::Timestamp) && y != 0 {
                    out.push(b'Z');
                }
            }
            out.push(b'"');
        }
        _ => serde_json::to_writer(out, &value_to_json(kind, v, false)).expect("JSON to memory"),
    }
}

/// Writes `binlog_to_json(kind, v)` as JSON text to `out`, the same bytes as serializing it,
/// without building the value for the common kinds (the streamed row events).
pub fn write_binlog(kind: &Kind, v: &BinlogValue<'_>, out: &mut Vec<u8>) {
    match (kind, v) {
        (_, BinlogValue::Value(Value::NULL)) => out.extend_from_slice(b"null"),
        (Kind::Int | Kind::Year, BinlogValue::Value(Value::Int(i))) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        (Kind::Int | Kind::Year, BinlogValue::Value(Value::UInt(i))) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        (Kind::Text | Kind::Decimal, BinlogValue::Value(Value::Bytes(b))) => {
            // Not UTF-8: written as binlog_to_json gives it (hex text).
            if !crate::write_json_str(b, out) {
                serde_json::to_writer(out, &binlog_to_json(kind, v)).expect("JSON to memory")
            }
        }
        _ => serde_json::to_writer(out, &binlog_to_json(kind, v)).expect("JSON to memory"),
    }
}

/// A text column's bytes as [`write_binlog`] writes them.
pub fn write_text(kind: &Kind, b: &[u8], out: &mut Vec<u8>) {
    if !(matches!(kind, Kind::Text | Kind::Decimal) && crate::write_json_str(b, out)) {
        write_binlog(kind, &BinlogValue::Value(Value::Bytes(b.to_vec())), out)
    }
}

fn micros(us: u32) -> String {
    if us == 0 {
        String::new()
    } else {
        format!(".{us:06}").trim_end_matches('0').to_string()
    }
}

fn datetime(y: u16, mo: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> String {
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}", micros(us))
}

fn instant(secs: i64, us: u32) -> String {
    match chrono::DateTime::from_timestamp(secs, us * 1000) {
        Some(t) if secs > 0 => {
            let n = t.naive_utc();
            use chrono::{Datelike, Timelike};
            format!("{}Z", datetime(n.year() as u16, n.month() as u8, n.day() as u8, n.hour() as u8, n.minute() as u8, n.second() as u8, us))
        }
        _ => datetime(0, 0, 0, 0, 0, 0, 0),
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("\\x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;

    proptest::proptest! {
        /// Paths written as MySQL writes them read back as their steps; any text is read or
        /// refused without panicking.
        #[test]
        fn json_paths_read_back(steps in proptest::collection::vec(proptest::prop_oneof![
            "[a-z_][a-z0-9_]{0,5}".prop_map(|m| (format!(".{m}"), Leg::Member(m))),
            "(?s).{0,6}".prop_map(|m| (format!(".{}", serde_json::to_string(&m).unwrap()), Leg::Member(m))),
            (0usize..1000).prop_map(|i| (format!("[{i}]"), Leg::Index(i))),
        ], 0..5), junk in "(?s).{0,12}") {
            let text: String = std::iter::once("$".to_string()).chain(steps.iter().map(|(t, _)| t.clone())).collect();
            let want: Vec<Leg> = steps.into_iter().map(|(_, l)| l).collect();
            proptest::prop_assert_eq!(json_path(&text), Some(want));
            let _ = json_path(&junk);
            let _ = apply_json_diff(&mut serde_json::json!({"a": [1]}), JsonDiffOperation::REPLACE, &junk, Some(Json::Null));
        }
    }

    #[test]
    fn json_diffs_apply_to_the_old_document() {
        use serde_json::json;
        use JsonDiffOperation::*;
        let mut doc = json!({"a": {"b": [1, 2]}, "s": "x", "k y": {"z\"": 0}});
        for (op, path, v) in [
            (REPLACE, "$.s", Some(json!("y"))),
            (INSERT, "$.a.c", Some(json!({"d": null}))),
            (INSERT, "$.a.b[1]", Some(json!(9))),
            (INSERT, "$.a.b[7]", Some(json!(3))),
            (REPLACE, "$.a.b[0]", Some(json!(0))),
            (REMOVE, "$.a.b[2]", None),
            (REPLACE, r#"$."k y"."z\"""#, Some(json!(1))),
        ] {
            apply_json_diff(&mut doc, op, path, v).unwrap();
        }
        assert_eq!(doc, json!({"a": {"b": [0, 9, 3], "c": {"d": null}}, "s": "y", "k y": {"z\"": 1}}));
        for (op, path, v) in [
            (REPLACE, "$.nope.x", Some(json!(1))),
            (REPLACE, "$.a.b[5]", Some(json!(1))),
            (REMOVE, "$.gone", None),
            (REMOVE, "$", None),
            (REPLACE, "$.a.*", Some(json!(1))),
            (REPLACE, "a", Some(json!(1))),
            (REPLACE, "$.s[", Some(json!(1))),
        ] {
            assert!(apply_json_diff(&mut doc.clone(), op, path, v).is_err(), "{path}");
        }
        apply_json_diff(&mut doc, REPLACE, "$", Some(json!([1]))).unwrap();
        assert_eq!(doc, json!([1]));
    }

    #[test]
    fn written_values_are_the_values_text() {
        let cases = [
            (Kind::Int, Value::Int(-5)),
            (Kind::Int, Value::UInt(u64::MAX)),
            (Kind::Int, Value::Bytes(b"12".to_vec())),
            (Kind::Year, Value::Int(2026)),
            (Kind::Text, Value::Bytes("a \"q\"\n é".as_bytes().to_vec())),
            (Kind::Text, Value::Bytes(vec![0xff, b'a'])),
            (Kind::Decimal, Value::Bytes(b"1.50".to_vec())),
            (Kind::Enum(vec!["a".into()]), Value::Bytes(b"a".to_vec())),
            (Kind::Float, Value::Double(1.5)),
            (Kind::DateTime, Value::Date(2026, 1, 5, 10, 0, 0, 120_000)),
            (Kind::Timestamp, Value::Date(2026, 12, 31, 23, 59, 58, 1)),
            (Kind::Timestamp, Value::Date(0, 0, 0, 0, 0, 0, 0)),
            (Kind::Timestamp, Value::Date(10000, 1, 1, 0, 0, 0, 0)),
            (Kind::DateTime, Value::Date(1, 2, 3, 4, 5, 6, 999_999)),
            (Kind::DateTime, Value::Date(2026, 1, 5, 10, 0, 0, 1_000_000)),
            (Kind::Date, Value::Date(2026, 7, 9, 0, 0, 0, 0)),
            (Kind::Binary, Value::Bytes(vec![0, 10])),
            (Kind::Json, Value::Bytes(br#"{"b":1,"a":2}"#.to_vec())),
            (Kind::Text, Value::NULL),
        ];
        for (kind, v) in cases {
            let mut out = Vec::new();
            write_value(&kind, &v, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), value_to_json(&kind, &v, false).to_string(), "{kind:?} {v:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn written_dates_are_the_values_text(kind in 0..3usize, y in proptest::prop_oneof![0u16..10_100, proptest::sample::select(vec![0u16, 9999, 10_000])], mo in 0u8..13, d in 0u8..32, h in 0u8..24, mi in 0u8..60, s in 0u8..60,
                                             us in proptest::prop_oneof![0u32..1_000_000, proptest::sample::select(vec![0u32, 10, 500_000, 999_999, 1_000_000])]) {
            let kind = [Kind::Timestamp, Kind::DateTime, Kind::Date][kind].clone();
            let v = Value::Date(y, mo, d, h, mi, s, us);
            let mut out = Vec::new();
            write_value(&kind, &v, &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), value_to_json(&kind, &v, false).to_string());
        }
    }

    #[test]
    fn enum_members() {
        assert_eq!(members("enum('a','b''c','d,e')"), vec!["a", "b'c", "d,e"]);
        assert_eq!(Kind::of_schema("set", "set('x','y')"), Kind::Set(vec!["x".into(), "y".into()]));
    }

    #[test]
    fn written_binlog_values_are_the_values_text() {
        let cases = [
            (Kind::Int, Value::Int(-5)),
            (Kind::Int, Value::UInt(u64::MAX)),
            (Kind::Year, Value::Bytes(b"1900".to_vec())),
            (Kind::Year, Value::Int(2026)),
            (Kind::Text, Value::Bytes("a \"q\"\n é".as_bytes().to_vec())),
            (Kind::Text, Value::Bytes(vec![0xff, b'a'])),
            (Kind::Decimal, Value::Bytes(b"-1.50".to_vec())),
            (Kind::Enum(vec!["a".into(), "b".into()]), Value::Int(2)),
            (Kind::Set(vec!["a".into(), "b".into()]), Value::Bytes(vec![3])),
            (Kind::Timestamp, Value::Bytes(b"1767607200.123".to_vec())),
            (Kind::Float, Value::Double(1.5)),
            (Kind::Binary, Value::Bytes(vec![0, 10])),
            (Kind::Text, Value::NULL),
        ];
        for (kind, v) in cases {
            let v = BinlogValue::Value(v);
            let mut out = Vec::new();
            write_binlog(&kind, &v, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), binlog_to_json(&kind, &v).to_string(), "{kind:?} {v:?}");
        }
    }

    #[test]
    fn binlog_and_query_values_agree() {
        // A TIMESTAMP: seconds in the binlog, a UTC date-time from a query.
        let b = value_to_json(&Kind::Timestamp, &Value::Bytes(b"1767607200.123".to_vec()), true);
        let q = value_to_json(&Kind::Timestamp, &Value::Date(2026, 1, 5, 10, 0, 0, 123000), false);
        assert_eq!(b, q);
        assert_eq!(b, Json::String("2026-01-05T10:00:00.123Z".into()));
        // ENUM and SET: numbers in the binlog, names from a query.
        let e = Kind::Enum(vec!["small".into(), "large".into()]);
        assert_eq!(value_to_json(&e, &Value::Int(2), true), value_to_json(&e, &Value::Bytes(b"large".to_vec()), false));
        let s = Kind::Set(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(value_to_json(&s, &Value::Bytes(vec![0b101]), true), Json::String("a,c".into()));
        assert_eq!(value_to_json(&Kind::Time, &Value::Time(true, 1, 2, 3, 4, 500000), false), Json::String("-26:03:04.5".into()));
        assert_eq!(value_to_json(&Kind::Binary, &Value::Bytes(vec![0, 255]), true), Json::String("\\x00ff".into()));
        assert_eq!(value_to_json(&Kind::Int, &Value::UInt(u64::MAX), true), Json::from(u64::MAX));
        assert_eq!(value_to_json(&Kind::Bit, &Value::Bytes(vec![1, 2]), true), Json::from(258));
    }
}
