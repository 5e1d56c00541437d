//! Record parsing for ingest: one validating pass per record that also pulls out the
//! key and event-time fields without building a JSON tree.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// One record of a request: its JSON text as sent, its key and event time.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRecord<'a> {
    /// The record's JSON object, exactly as received.
    pub raw: &'a [u8],
    /// The key field's value (strings as their content, numbers/bools as JSON text).
    pub key: Option<Vec<u8>>,
    /// Event time in epoch milliseconds, if the record has the event-time field.
    pub time_ms: Option<i64>,
}

/// A record that could not be accepted, with where it is in the body (1-based).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct RecordError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses a body: a JSON array of objects, NDJSON, or one (possibly multi-line) object.
pub fn parse_events<'a>(
    body: &'a [u8],
    key_field: Option<&str>,
    time_field: Option<&str>,
) -> Result<Vec<ParsedRecord<'a>>, RecordError> {
    let probe = Probe { key_field, time_field };
    let start = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(body.len());
    if body.get(start) == Some(&b'[') {
        return parse_array(body, probe);
    }
    // Room for the lines of events of ~128 bytes or more (only what is used is touched):
    // growing the vector by doubling copied it ~twice and faulted in pages each time;
    // counting the newlines first cost more than that.
    let mut out = Vec::with_capacity(body.len() / 128 + 1);
    let mut line_no = 0;
    for line in lines(body) {
        line_no += 1;
        let trimmed = trim(line);
        if trimmed.is_empty() {
            continue;
        }
        match probe_one(probe, trimmed) {
            Ok((key, time_ms)) => out.push(ParsedRecord { raw: trimmed, key, time_ms }),
            Err(e) if out.is_empty() && e.is_eof() => {
                // The first value does not end on its line: a multi-line JSON value.
                return parse_multiline(body, probe);
            }
            Err(e) => {
                let col_offset = line.len() - line.trim_ascii_start().len();
                return Err(RecordError { line: line_no, column: e.column() + col_offset, message: clean(&e) });
            }
        }
    }
    Ok(out)
}

/// `body` split at every `\n` (like `split(|&b| b == b'\n')`, found with memchr: this
/// runs over every byte ingested).
fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', body)
        .chain(std::iter::once(body.len()))
        .map(move |end| {
            let line = &body[start..end];
            start = end + 1;
            line
        })
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

fn clean(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn line_col(body: &[u8], offset: usize) -> (usize, usize) {
    let before = &body[..offset.min(body.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = offset - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

fn offset_in(body: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - body.as_ptr() as usize
}

fn parse_array<'a>(body: &'a [u8], probe: Probe) -> Result<Vec<ParsedRecord<'a>>, RecordError> {
    let items: Vec<&'a RawValue> = serde_json::from_slice(body)
        .map_err(|e| RecordError { line: e.line(), column: e.column(), message: clean(&e) })?;
    items
        .into_iter()
        .map(|raw| {
            let bytes = raw.get().as_bytes();
            probe_one(probe, bytes)
                .map(|(key, time_ms)| ParsedRecord { raw: bytes, key, time_ms })
                .map_err(|e| located(body, bytes, e))
        })
        .collect()
}

fn parse_multiline<'a>(body: &'a [u8], probe: Probe) -> Result<Vec<ParsedRecord<'a>>, RecordError> {
    let mut out = Vec::new();
    for item in serde_json::Deserializer::from_slice(body).into_iter::<&'a RawValue>() {
        let raw = item.map_err(|e| RecordError { line: e.line(), column: e.column(), message: clean(&e) })?;
        let bytes = raw.get().as_bytes();
        let (key, time_ms) = probe_one(probe, bytes).map_err(|e| located(body, bytes, e))?;
        out.push(ParsedRecord { raw: bytes, key, time_ms });
    }
    Ok(out)
}

/// An error inside `part` (a slice of `body`), positioned in the whole body.
fn located(body: &[u8], part: &[u8], e: serde_json::Error) -> RecordError {
    let start = offset_in(body, part);
    let (line, col) = line_col(body, start);
    let (line, column) = if e.line() <= 1 { (line, col + e.column().saturating_sub(1)) } else { (line + e.line() - 1, e.column()) };
    RecordError { line, column, message: clean(&e) }
}

/// The key and event time of one record: the fast scan when it accepts the record and its
/// two fields read cleanly, else serde_json's pass, which words every error exactly.
fn probe_one(probe: Probe, bytes: &[u8]) -> Result<(Option<Vec<u8>>, Option<i64>), serde_json::Error> {
    let wanted = [probe.key_field.map(str::as_bytes), probe.time_field.map(str::as_bytes)];
    if let Some([key, time]) = sluice_core::json_scan::scan_object(bytes, wanted) {
        if let Some(fields) = probe.read_found(key, time) {
            return Ok(fields);
        }
    }
    probe_serde(probe, bytes)
}

fn probe_serde(probe: Probe, bytes: &[u8]) -> Result<(Option<Vec<u8>>, Option<i64>), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let found = probe.deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

#[derive(Clone, Copy)]
struct Probe<'f> {
    key_field: Option<&'f str>,
    time_field: Option<&'f str>,
}

impl Probe<'_> {
    /// The two fields the scan found, read as the serde pass reads them; `None` when either
    /// does not read cleanly (the serde pass then gives the error).
    fn read_found(self, key: Option<&[u8]>, time: Option<&[u8]>) -> Option<(Option<Vec<u8>>, Option<i64>)> {
        let key = match key {
            Some(raw) => serde_json::from_slice::<Scalar>(raw).ok()?.0,
            None => None,
        };
        let time = match time {
            // A plain string (no escapes) is read in place, without serde.
            Some([b'"', inner @ .., b'"']) if !inner.contains(&b'\\') => {
                Some(sluice_core::time::parse_time_str(std::str::from_utf8(inner).ok()?)?)
            }
            Some(raw) => self.time_value(serde_json::from_slice::<TimeValue>(raw).ok()?).ok()?,
            None => None,
        };
        Some((key, time))
    }

    /// The event time a time field's value gives, or why it gives none.
    fn time_value(self, v: TimeValue) -> Result<Option<i64>, String> {
        let field = self.time_field.unwrap_or_default();
        match v {
            TimeValue::Null => Ok(None),
            TimeValue::Str(s) => sluice_core::time::parse_time_str(&s).map(Some).ok_or_else(|| {
                format!("event-time field {field:?}: cannot read {s:?} as a time (use RFC 3339, e.g. 2026-01-01T12:00:00Z, or epoch seconds/milliseconds)")
            }),
            TimeValue::Num(n) => sluice_core::time::from_epoch_number(n)
                .map(Some)
                .ok_or_else(|| format!("event-time field {field:?}: {n} is out of range")),
            TimeValue::Other => Err(format!("event-time field {field:?} must be a string or a number")),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = (Option<Vec<u8>>, Option<i64>);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = (Option<Vec<u8>>, Option<i64>);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut key, mut time) = (None, None);
        while let Some(which) = map.next_key_seed(KeyMatch(self))? {
            match which {
                Field::Key => key = map.next_value::<Scalar>()?.0,
                Field::Time => time = self.time_value(map.next_value::<TimeValue>()?).map_err(de::Error::custom)?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((key, time))
    }
}

enum Field {
    Key,
    Time,
    Other,
}

struct KeyMatch<'f>(Probe<'f>);

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = Field;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(if self.0.key_field == Some(v) {
            Field::Key
        } else if self.0.time_field == Some(v) {
            Field::Time
        } else {
            Field::Other
        })
    }
}

/// The key field's value as bytes.
struct Scalar(Option<Vec<u8>>);

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.as_bytes().to_vec())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string().into_bytes())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string().into_bytes())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string().into_bytes())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string().into_bytes())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Scalar, A::Error> {
                Err(de::Error::custom("the key field must be a string, number or boolean, not an object"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Scalar, A::Error> {
                Err(de::Error::custom("the key field must be a string, number or boolean, not an array"))
            }
        }
        d.deserialize_any(V)
    }
}

enum TimeValue {
    Null,
    Str(String),
    Num(f64),
    Other,
}

impl<'de> de::Deserialize<'de> for TimeValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TimeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a time")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeValue, E> {
                Ok(TimeValue::Str(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TimeValue, E> {
                Ok(TimeValue::Num(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TimeValue, E> {
                Ok(TimeValue::Num(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TimeValue, E> {
                Ok(TimeValue::Num(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TimeValue, E> {
                Ok(TimeValue::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TimeValue, E> {
                Ok(TimeValue::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<TimeValue, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TimeValue::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<TimeValue, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TimeValue::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn parse(s: &str) -> Result<Vec<ParsedRecord<'_>>, RecordError> {
        parse_events(s.as_bytes(), Some("id"), Some("ts"))
    }

    #[test]
    fn ndjson() {
        let r = parse("{\"id\":\"a\",\"ts\":\"1970-01-01T00:00:01Z\",\"x\":{\"y\":[1,2]}}\n\n  {\"id\":7}\r\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].key.as_deref(), Some(&b"a"[..]));
        assert_eq!(r[0].time_ms, Some(1000));
        assert_eq!(r[1].raw, b"{\"id\":7}");
        assert_eq!(r[1].key.as_deref(), Some(&b"7"[..]));
        assert_eq!(r[1].time_ms, None);
    }

    #[test]
    fn array_and_single_object() {
        let r = parse("[{\"id\":1},\n {\"id\":2,\"ts\":1700000000}]").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].time_ms, Some(1_700_000_000_000));
        let r = parse("{\n  \"id\": \"x\",\n  \"nested\": {\"a\": 1}\n}\n").unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].key.as_deref(), Some(&b"x"[..]));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_line() {
        let e = parse("{\"id\":1}\n{\"id\":2}\n{\"id\":3,}\n{\"id\":4}\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse("{\"a\":1}\n[1,2]\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("object"), "{e}");
        let e = parse("{\"a\":1}\n42\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("[{\"id\":1},\n 3]").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("[{\"id\":1},\n {\"id\":2}").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("{\"a\":1}\n{\"ts\":\"not a time\"}\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not a time"), "{e}");
        let e = parse("{\"id\":{\"a\":1}}").unwrap_err();
        assert!(e.message.contains("key field"), "{e}");
        let e = parse("{\"a\":\"\\ud800\"} trailing").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = parse("{\n\"a\": 1\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }

    /// JSON objects as text: nested values, the probed field names (also escaped and
    /// repeated), times as strings and numbers, odd whitespace and unicode.
    fn json_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
            Just("1e400".to_string()),
            Just("-0.0e-5".to_string()),
            // Number- and literal-like text, valid or not (`01`, `1.`, `-`, `2e+`, `nul`).
            "-?[0-9]{0,3}(\\.[0-9]{0,2})?([eE][+-]?[0-9]{0,2})?",
            "(true|false|null|tru|nul|fals)[a-z]?",
            "\\PC{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just(r#""2026-01-01T12:00:00.5Z""#.to_string()),
            Just(r#""2026-02-30T12:00:00Z""#.to_string()),
            Just(r#""1970-01-01 00:00:02""#.to_string()),
            Just(r#""\u0032026-01-01T00:00:00Z""#.to_string()),
            Just(r#""\ud83d\ude00""#.to_string()),
        ];
        let value = leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..4)
                    .prop_map(|v| format!("{{{}}}", v.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","))),
            ]
        });
        let name = prop_oneof![Just("id"), Just("ts"), Just("i\\u0064"), Just("t\\u0073"), Just("x"), Just("é")];
        let ws = prop_oneof![Just(""), Just(" "), Just("\t"), Just("\r\n ")];
        proptest::collection::vec((name, value, ws.clone()), 0..6).prop_map(move |fields| {
            let body: Vec<String> = fields.iter().map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// The fast scan never changes an outcome: every record, valid or not, gets exactly
        /// what serde_json's pass alone gives (the same key and time, or the same error).
        #[test]
        fn fast_scan_agrees_with_serde(
            text in json_object(),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::prop_oneof![
                proptest::prelude::Just(None),
                proptest::prelude::any::<u8>().prop_map(Some),
                proptest::sample::select(b"{}[]\",:\\u0123456789.eE+-tfn \x01\x80\xff".to_vec()).prop_map(Some),
            ]), 0..3),
        ) {
            let mut b = text.into_bytes();
            for (at, edit) in edits {
                let i = at.index(b.len() + 1);
                match edit {
                    None if i < b.len() => { b.remove(i); }
                    None => {}
                    Some(c) => b.insert(i, c),
                }
            }
            let probe = Probe { key_field: Some("id"), time_field: Some("ts") };
            let fast = probe_one(probe, &b).map_err(|e| e.to_string());
            let slow = probe_serde(probe, &b).map_err(|e| e.to_string());
            proptest::prop_assert_eq!(fast, slow, "{}", String::from_utf8_lossy(&b));
        }

        #[test]
        fn lines_split_like_split(body in proptest::collection::vec(proptest::sample::select(b"ab\n\r ".to_vec()), 0..100)) {
            let ours: Vec<&[u8]> = lines(&body).collect();
            let std: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
            proptest::prop_assert_eq!(ours, std);
        }

        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_events(&body, Some("id"), Some("ts"));
        }

        #[test]
        fn ndjson_round_trip(vals in proptest::collection::vec((proptest::prelude::any::<i64>(), "[a-z]{0,8}"), 1..50)) {
            let body: String = vals.iter().map(|(n, s)| format!("{{\"id\":{n},\"s\":{s:?}}}\n")).collect();
            let r = parse_events(body.as_bytes(), Some("id"), None).unwrap();
            proptest::prop_assert_eq!(r.len(), vals.len());
            for (rec, (n, _)) in r.iter().zip(&vals) {
                proptest::prop_assert_eq!(rec.key.clone().unwrap(), n.to_string().into_bytes());
            }
        }
    }
}
