//! The steady state's decoder: one hand-written pass over a record's bytes that checks it
//! against the schema and appends its values to the column builders, without serde's
//! per-value dispatch, `RawValue` floats and UTF-8 re-validation of every string.
//!
//! One-sided, like `sluice_core::json_scan`: it accepts a record only where the serde-based
//! path of [`super::Decoder`] accepts it, and then appends exactly what that path would.
//! Anything else it declines, the caller cuts the builders back, and the serde path decides
//! (and words the error). Declined besides invalid JSON and values that do not fit: escaped
//! keys, `\u` surrogate escapes, integers of 19 or more digits or `-0` in integer columns,
//! nesting deeper than [`MAX_DEPTH`]. Unit and property tests below hold the two paths
//! together; `one_pass_equals_two_pass` (tests/convert_proptest.rs) holds both to arrow-json.

use sluice_core::json_scan::special_bytes;

use super::super::fast::Seen;
use super::super::tree::{same, Kind, Node, StructNode};
use super::super::valid_name;
use super::Col;

/// Deeper nesting is declined (serde_json allows 128 levels).
const MAX_DEPTH: usize = 64;

/// Checks `b` against `root` and appends it as row `row` of `columns` (`column_of` maps a
/// root field to its column). A column the record has no value for is left short (see
/// [`Col::fill_to`]). `false` declines; the builders may then hold part of the record,
/// which the caller truncates.
pub(super) fn decode(
    root: &StructNode,
    column_of: &[Option<usize>],
    columns: &mut [Col],
    partition_by: &[String],
    row: usize,
    b: &[u8],
) -> bool {
    let mut p = Parser { b, i: 0, non_ascii: false, partition_by, row };
    p.ws();
    if p.peek() != Some(b'{') || p.object(root, Some(column_of), columns, true, 0).is_none() {
        return false;
    }
    p.ws();
    // String boundaries are ASCII quotes, so a valid whole means every copied string is valid.
    p.i == b.len() && !(p.non_ascii && std::str::from_utf8(b).is_err())
}

/// 10^0 ..= 10^22, the powers of ten an f64 holds exactly.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// A string held a byte >= 0x80: the whole record is checked as UTF-8 at the end.
    non_ascii: bool,
    partition_by: &'a [String],
    /// The row this record becomes.
    row: usize,
}

/// `None` declines.
type Step = Option<()>;

impl<'a> Parser<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Step {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// The object at `self.i` into the columns of `s` (`column_of` as in [`decode`]; `None`:
    /// one column per field, in order). Fields it lacks become null.
    fn object(
        &mut self,
        s: &StructNode,
        column_of: Option<&[Option<usize>]>,
        columns: &mut [Col],
        top: bool,
        depth: usize,
    ) -> Step {
        if depth >= MAX_DEPTH {
            return None;
        }
        let column = |i: usize| match column_of {
            Some(map) => map[i],
            None => Some(i),
        };
        self.i += 1; // '{'
        let mut seen = Seen::new(s.fields.len());
        let mut hint = 0usize;
        let mut unknown: Vec<&'a [u8]> = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                if self.peek() != Some(b'"') {
                    return None;
                }
                let key = self.key()?;
                self.ws();
                if self.peek() != Some(b':') {
                    return None;
                }
                self.i += 1;
                self.ws();
                // Records mostly repeat the schema's key order: try the next field first.
                let idx = match s.fields.get(hint) {
                    Some(f) if same(f.name.as_bytes(), key) => Some(hint),
                    _ => s.find(key),
                };
                match idx {
                    Some(i) => {
                        let f = &s.fields[i];
                        let c = column(i).filter(|_| !f.reserved)?;
                        if !seen.insert(i) {
                            return None;
                        }
                        hint = i + 1;
                        if top {
                            columns[c].fill_to(self.row);
                        }
                        self.value(f, &mut columns[c], depth + 1)?;
                    }
                    None => {
                        let partition = top && self.partition_by.iter().any(|p| p.as_bytes() == key);
                        if !valid_name(std::str::from_utf8(key).ok()?) || unknown.contains(&key) {
                            return None;
                        }
                        self.untyped(partition)?;
                        unknown.push(key);
                    }
                }
                self.ws();
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        // Nested columns get their nulls now; top-level ones when next filled.
        if !top {
            for i in 0..s.fields.len() {
                if !seen.contains(i) {
                    if let Some(c) = column(i) {
                        columns[c].append_null();
                    }
                }
            }
        }
        Some(())
    }

    /// A value of an existing column: it must fit the column's type exactly.
    fn value(&mut self, node: &Node, col: &mut Col, depth: usize) -> Step {
        match (self.peek()?, col) {
            (b'n', col) => {
                self.literal(b"null")?;
                col.append_null();
            }
            (b't', Col::Bool { values, valid }) => {
                self.literal(b"true")?;
                values.append(true);
                valid.append(true);
            }
            (b'f', Col::Bool { values, valid }) => {
                self.literal(b"false")?;
                values.append(false);
                valid.append(true);
            }
            (b'"', Col::Str { offsets, data, valid }) => {
                self.string_into(data)?;
                offsets.push(i32::try_from(data.len()).ok()?);
                valid.append(true);
            }
            (b'-' | b'0'..=b'9', Col::I64 { values, valid }) => {
                values.push(self.int()?);
                valid.append(true);
            }
            (b'-' | b'0'..=b'9', Col::F64 { values, valid }) => {
                values.push(self.float()?);
                valid.append(true);
            }
            // The serde path reads a Float64 column's value whole: containers do not fit.
            (b'[' | b'{', Col::F64 { .. }) => return None,
            (b'[', _) if node.partition => return None,
            (b'[', Col::List { offsets, child, valid, .. }) => {
                let Kind::List { item, .. } = &node.kind else { return None };
                self.array(depth, |p| p.value(item, child, depth + 1))?;
                offsets.push(i32::try_from(child.len()).ok()?);
                valid.append(true);
            }
            // An array without any typed value carries no type: null in other columns.
            (b'[', col) => {
                self.array(depth, |p| p.untyped(false))?;
                col.append_null();
            }
            (b'{', _) if node.partition => return None,
            (b'{', Col::Struct { children, valid, .. }) => {
                let Kind::Struct(s) = &node.kind else { return None };
                self.object(s, None, children, false, depth)?;
                valid.append(true);
            }
            // `{}` carries no type: null in other columns.
            (b'{', col) => {
                self.empty(b'}')?;
                col.append_null();
            }
            _ => return None,
        }
        Some(())
    }

    /// A value of a field the schema does not have: only null, `[]` or `{}` (those two not
    /// for a partition column) carry no type.
    fn untyped(&mut self, partition: bool) -> Step {
        match self.peek()? {
            b'n' => self.literal(b"null"),
            b'[' if !partition => self.empty(b']'),
            b'{' if !partition => self.empty(b'}'),
            _ => None,
        }
    }

    /// `[]` or `{}` (whitespace inside allowed), at its opening bracket.
    fn empty(&mut self, close: u8) -> Step {
        self.i += 1;
        self.ws();
        (self.peek() == Some(close)).then(|| self.i += 1)
    }

    /// An array at its opening bracket, each item read by `item`.
    fn array(&mut self, depth: usize, mut item: impl FnMut(&mut Self) -> Step) -> Step {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Advances to the next '"', '\\', control or non-ASCII byte of a string (or near the end).
    #[inline]
    fn skip_plain(&mut self) {
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let special = special_bytes(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
            if special != 0 {
                self.i += (special.trailing_zeros() / 8) as usize;
                return;
            }
            self.i += 8;
        }
    }

    /// An object key at its opening quote, as its raw bytes; escaped keys are declined.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.i += 1;
        let start = self.i;
        loop {
            self.skip_plain();
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(&self.b[start..self.i - 1]);
                }
                b'\\' | 0..=0x1f => return None,
                0x80.. => self.non_ascii = true,
                _ => {}
            }
            self.i += 1;
        }
    }

    /// A string at its opening quote, unescaped onto `out`.
    fn string_into(&mut self, out: &mut Vec<u8>) -> Step {
        self.i += 1;
        let mut run = self.i;
        loop {
            self.skip_plain();
            match *self.b.get(self.i)? {
                b'"' => {
                    out.extend_from_slice(&self.b[run..self.i]);
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    out.extend_from_slice(&self.b[run..self.i]);
                    self.unescape(out)?;
                    run = self.i;
                }
                0..=0x1f => return None,
                0x80.. => {
                    self.non_ascii = true;
                    self.i += 1;
                }
                _ => self.i += 1,
            }
        }
    }

    /// One escape at its backslash onto `out`; `\u` surrogates (pairs) are declined.
    fn unescape(&mut self, out: &mut Vec<u8>) -> Step {
        let byte = match *self.b.get(self.i + 1)? {
            c @ (b'"' | b'\\' | b'/') => c,
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = self.b.get(self.i + 2..self.i + 6)?;
                let mut v = 0u32;
                for &h in hex {
                    v = v * 16 + char::from(h).to_digit(16)?;
                }
                let ch = char::from_u32(v)?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                self.i += 6;
                return Some(());
            }
            _ => return None,
        };
        out.push(byte);
        self.i += 2;
        Some(())
    }

    /// The sign and integer part of a number: whether it is negative, its value (wrapping
    /// past 19 digits) and its number of digits.
    fn integer_part(&mut self) -> Option<(bool, u64, usize)> {
        let neg = self.peek() == Some(b'-');
        self.i += usize::from(neg);
        let start = self.i;
        let mut v: u64 = 0;
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    v = v.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                    self.i += 1;
                }
            }
            _ => return None,
        }
        Some((neg, v, self.i - start))
    }

    /// An integer for an Int64 column: serde_json's i64/u64 range, read only up to 18 digits
    /// (larger ones, and `-0`, which serde_json reads as a float, are declined).
    fn int(&mut self) -> Option<i64> {
        let (neg, v, digits) = self.integer_part()?;
        if digits > 18 || (neg && v == 0) {
            return None;
        }
        // A fraction or exponent makes it a float for serde_json: not an Int64 value.
        self.end_of_number()?;
        let v = v as i64;
        Some(if neg { -v } else { v })
    }

    /// A number for a Float64 column, read from its text (correctly rounded, as the serde
    /// path does); out of range is declined.
    fn float(&mut self) -> Option<f64> {
        let start = self.i;
        let (neg, int, int_digits) = self.integer_part()?;
        let mut plain = true;
        // The digits as one integer and how many of them are fraction digits, while the
        // integer is exact (up to 19 digits).
        let (mut mantissa, mut exact, mut fraction) = (int, int_digits <= 19, 0usize);
        if self.peek() == Some(b'.') {
            plain = false;
            self.i += 1;
            let from = self.i;
            self.digits()?;
            let digits = &self.b[from..self.i];
            fraction = digits.len();
            exact &= int_digits + fraction <= 19;
            if exact {
                mantissa = digits.iter().fold(mantissa, |m, d| m * 10 + u64::from(d - b'0'));
            }
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.peek() {
            (plain, exponent) = (false, true);
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        self.end_of_number()?;
        if plain && int_digits <= 19 {
            // Exact in a u64, and `as` rounds to nearest like parsing the text (`-0` too).
            let v = int as f64;
            return Some(if neg { -v } else { v });
        }
        if exact && !exponent && mantissa <= 1 << 53 && fraction < POWERS_OF_TEN.len() {
            // Both exact in an f64, so one division rounds correctly, as parsing does
            // (Clinger's fast path): 42.938702 is 42938702 / 10^6.
            let v = mantissa as f64 / POWERS_OF_TEN[fraction];
            return Some(if neg { -v } else { v });
        }
        // ASCII by construction.
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        text.parse::<f64>().ok().filter(|v| v.is_finite())
    }

    /// One or more digits.
    fn digits(&mut self) -> Step {
        if !self.peek()?.is_ascii_digit() {
            return None;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        Some(())
    }

    /// A number runs into no other token character ("01", "1.5.2", "2x" are declined).
    fn end_of_number(&self) -> Step {
        match self.peek() {
            None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\t' | b'\r') => Some(()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::RecordBatch;
    use arrow_schema::{DataType, Field, FieldRef, Fields, Schema};
    use proptest::prelude::*;
    use serde_json::Value;

    use super::super::super::fast::Outcome;
    use super::super::super::{initial_tree, ConvertOptions};
    use super::super::Decoder;
    use super::{same, StructNode};

    /// A table with every column type the decoder builds; `region` partitions.
    fn table() -> Schema {
        let list = |dt: DataType| DataType::List(Arc::new(Field::new("item", dt, true)));
        let st = Fields::from(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("y", DataType::Utf8, true),
            Field::new("z", list(DataType::Float64), true),
        ]);
        Schema::new(vec![
            Field::new("b", DataType::Boolean, true),
            Field::new("i", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("st", DataType::Struct(st), true),
            Field::new("l", list(DataType::Utf8), true),
            Field::new("ls", list(DataType::Struct(Fields::from(vec![Field::new("n", DataType::Int64, true)]))), true),
            Field::new("region", DataType::Utf8, true),
        ])
    }

    fn opts() -> ConvertOptions {
        ConvertOptions { partition_by: vec!["region".into()], ..Default::default() }
    }

    /// Decoders for `table()`, one per path.
    fn setup() -> (StructNode, Decoder, Decoder) {
        let (root, fatal) = initial_tree(Some(&table()), &opts());
        assert!(fatal.is_none());
        let data: Vec<FieldRef> =
            root.fields.iter().filter(|f| !f.reserved).map(|f| Arc::new(f.to_field())).collect();
        let data = Arc::new(Schema::new(data));
        let a = Decoder::new(&root, data.clone()).expect("decoder builds every type of the table");
        let b = Decoder::new(&root, data).unwrap();
        (root, a, b)
    }

    /// Runs each record through the direct pass (`direct`) and serde alone (`serde`). Every
    /// record the direct pass takes, serde must take too; rows only serde takes are dropped
    /// again, so both batches hold the same records. Returns how many the direct pass took.
    fn both(records: &[Vec<u8>]) -> Result<(usize, RecordBatch, RecordBatch), String> {
        let (root, mut direct, mut serde) = setup();
        let partition_by = opts().partition_by;
        let mut taken = 0;
        for r in records {
            let ok = super::decode(&root, &direct.column_of, &mut direct.columns, &partition_by, direct.rows, r);
            let rows = serde.rows;
            let fits = matches!(serde.decode_serde(&root, &partition_by, r), Outcome::Fits);
            if ok {
                if !fits {
                    return Err(format!("direct took what serde does not: {}", String::from_utf8_lossy(r)));
                }
                direct.rows += 1;
                taken += 1;
            } else {
                direct.cut();
                if fits {
                    serde.rows = rows;
                    serde.columns.iter_mut().for_each(|c| c.truncate(rows));
                }
            }
        }
        Ok((taken, direct.finish()?, serde.finish()?))
    }

    fn assert_same(records: &[&str]) -> usize {
        let bytes: Vec<Vec<u8>> = records.iter().map(|r| r.as_bytes().to_vec()).collect();
        let (taken, a, b) = both(&bytes).unwrap();
        assert_eq!(a, b, "{records:?}");
        taken
    }

    #[test]
    fn floats_read_as_parsing_reads_them() {
        let read = |text: &str| {
            let mut p = super::Parser { b: text.as_bytes(), i: 0, non_ascii: false, partition_by: &[], row: 0 };
            let v = p.float();
            assert_eq!(p.i, text.len(), "{text}");
            v
        };
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let digits = 1 + (x >> 59) as usize % 20;
            let mantissa = (x >> 3) % 10u64.pow(digits.min(19) as u32);
            let text = format!("{mantissa:0digits$}");
            let point = (x as usize >> 1) % (digits + 1);
            let (int, fraction) = text.split_at(point.max(1));
            let int = match int.trim_start_matches('0') {
                "" => "0",
                int => int,
            };
            let sign = if x & 1 == 1 { "-" } else { "" };
            let text = if fraction.is_empty() { format!("{sign}{int}") } else { format!("{sign}{int}.{fraction}") };
            let want: f64 = text.parse().unwrap();
            assert_eq!(read(&text).map(f64::to_bits), Some(want.to_bits()), "{text}");
        }
        for text in ["0.1", "-0.0", "9007199254740993.0", "0.30000000000000004", "123456789012345678.9", "1.5e3", "2.2250738585072014e-308"] {
            assert_eq!(read(text).map(f64::to_bits), Some(text.parse::<f64>().unwrap().to_bits()), "{text}");
        }
    }

    #[test]
    fn same_is_slice_equality() {
        for n in 0..24usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i).collect();
            assert!(same(&a, &a.clone()));
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same(&a, &b), "{n} bytes, differing at {at}");
            }
            assert!(!same(&a, &a[..n.saturating_sub(1)]) || n == 0);
        }
    }

    #[test]
    fn takes_typical_records_as_serde_does() {
        let records = [
            r#"{"b":true,"i":-42,"f":41.123456,"s":"plain","region":"wien"}"#,
            r#"{"s":"caf\u00e9 \"q\" \\ \/ \b\f\n\r\t \u00E9 \u20ac","i":0,"f":-0}"#,
            "{\"s\":\"caf\u{e9} \u{1F600} \u{7f}\",\"f\":1e-7,\"x\":null,\"y\":[],\"z\":{}}",
            r#" { "st" : { "x" : 999999999999999999 , "y" : null , "z" : [ 1 , 2.5 , -0.0 , 1E+2 , null ] } , "b" : false } "#,
            r#"{"l":["a",null,""],"ls":[{"n":1},{},null,{"n":-1}],"st":{},"i":null,"f":null}"#,
            r#"{"f":12345678901234567890,"l":[],"ls":[],"b":null,"region":null}"#,
            r#"{"i":[],"f":null,"s":{},"b":[null,[],{}],"st":[],"l":{}}"#,
            r#"{"f":0.1,"s":"","unknown":{ },"other":[ ]}"#,
            r#"{"f":1.7976931348623157e308,"i":-999999999999999999}"#,
            r#"{"f":99999999999999999999}"#,
            r#"{"f":-9007199254740993}"#,
            "{}",
        ];
        // Every one of them goes the direct way (the test would pass vacuously otherwise).
        assert_eq!(assert_same(&records), records.len());
    }

    #[test]
    fn declines_what_serde_decides() {
        let records = [
            // Not JSON, or not one object.
            "", "[]", "null", "{", r#"{"i":1"#, r#"{"i":1,}"#, r#"{"i":01}"#, r#"{"f":1.}"#, r#"{"f":-}"#,
            r#"{"f":1e}"#, r#"{"b":tru}"#, r#"{"s":"\x"}"#, "{\"s\":\"\u{1}\"}", r#"{"i":1 2}"#,
            r#"{"s":"x}"#, r#"{"i":1}x"#, r#"{"b":truex}"#, r#"{"i":1}{"#,
            // Valid, but not taken here: serde decides.
            r#"{"s":"\ud83d\ude00"}"#, r#"{"s":"\ud800"}"#, r#"{"\u0069":1}"#, r#"{"i":-0}"#,
            r#"{"i":9223372036854775807}"#, r#"{"i":-9223372036854775808}"#, r#"{"i":18446744073709551616}"#,
            // Values that do not fit (the slow path evolves or rejects).
            r#"{"i":1.5}"#, r#"{"i":1e2}"#, r#"{"i":"1"}"#, r#"{"i":true}"#, r#"{"f":"1"}"#, r#"{"f":[]}"#,
            r#"{"f":{}}"#, r#"{"f":1e400}"#, r#"{"s":1}"#, r#"{"b":0}"#, r#"{"st":{"x":"a"}}"#, r#"{"st":1}"#,
            r#"{"l":[1]}"#, r#"{"l":"a"}"#, r#"{"s":[1]}"#, r#"{"s":{"a":1}}"#, r#"{"new":1}"#,
            r#"{"new":[null]}"#, r#"{"i":1,"i":2}"#, r#"{"new":null,"new":null}"#, r#"{"bad name":null}"#,
            r#"{"_offset":1}"#, r#"{"region":[]}"#, r#"{"region":{}}"#, r#"{"st":{"x":1,"x":1}}"#,
        ];
        for r in records {
            assert_eq!(assert_same(&[r]), 0, "{r}");
        }
        let deep = format!("{{\"l\":{}{}}}", "[".repeat(80), "]".repeat(80));
        assert_eq!(assert_same(&[&deep]), 0);
        let (taken, _, _) = both(&[b"{\"s\":\"\xff\"}".to_vec(), b"{\"\xc3\":null}".to_vec()]).unwrap();
        assert_eq!(taken, 0);
    }

    // ---------- property test: random records in random spellings ----------

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::Bool),
            2 => any::<i64>().prop_map(Value::from),
            1 => (-2000i64..2000).prop_map(Value::from),
            2 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            1 => (-1000i32..1000).prop_map(|i| Value::from(i as f64 / 8.0)),
            3 => "[a-z\"\\\\/\u{0}-\u{1f}\u{e9}\u{20ac}\u{1F600}]{0,6}".prop_map(Value::String),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["b", "i", "f", "s", "st", "l", "ls", "region", "x", "y", "z", "n", "new", "_offset"])
            .prop_map(String::from)
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((name(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Records whose values mostly fit `table()` (so the direct pass takes many).
    fn fitting() -> impl Strategy<Value = Value> {
        let field = |k: &'static str| -> BoxedStrategy<(String, Value)> {
            let v: BoxedStrategy<Value> = match k {
                "b" => any::<bool>().prop_map(Value::Bool).boxed(),
                "i" => any::<i64>().prop_map(Value::from).boxed(),
                "f" => prop_oneof![any::<i32>().prop_map(Value::from), leaf()].boxed(),
                "st" => (any::<i64>(), "\\PC{0,4}").prop_map(|(x, y)| serde_json::json!({"x": x, "y": y, "z": [1.5, x]})).boxed(),
                "l" => prop::collection::vec("\\PC{0,4}".prop_map(Value::String), 0..3).prop_map(Value::Array).boxed(),
                "ls" => prop::collection::vec(any::<i64>().prop_map(|n| serde_json::json!({"n": n})), 0..3).prop_map(Value::Array).boxed(),
                _ => leaf().boxed(),
            };
            v.prop_map(move |v| (k.to_string(), v)).boxed()
        };
        prop::sample::subsequence(vec!["b", "i", "f", "s", "st", "l", "ls", "region"], 0..=8)
            .prop_flat_map(move |keys| keys.into_iter().map(field).collect::<Vec<_>>())
            .prop_map(|kv| Value::Object(kv.into_iter().collect()))
    }

    /// Writes `v` as JSON, with choices from `pick` (cycled): whitespace, `\u` escapes,
    /// numbers with exponents or trailing zeros.
    fn spell(v: &Value, pick: &mut impl Iterator<Item = u8>, out: &mut String) {
        let ws = |out: &mut String, p: u8| {
            if p % 5 == 0 {
                out.push_str([" ", "\n", "\t ", "\r\n"][usize::from(p / 5 % 4)]);
            }
        };
        match v {
            Value::Null | Value::Bool(_) => out.push_str(&v.to_string()),
            Value::Number(n) => match (pick.next().unwrap_or(0) % 6, n.as_i64(), n.as_f64()) {
                (0, Some(i), _) => out.push_str(&format!("{i}.0")),
                (1, Some(i), _) => out.push_str(&format!("{i}e0")),
                (2, _, Some(f)) => out.push_str(&format!("{f:e}")),
                (3, _, Some(f)) if f.fract() != 0.0 => out.push_str(&format!("{f}00")),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => {
                out.push('"');
                for c in s.chars() {
                    let p = pick.next().unwrap_or(0);
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '/' if p % 2 == 0 => out.push_str("\\/"),
                        c if (c as u32) < 0x20 || p % 3 == 0 => {
                            let mut units = [0u16; 2];
                            for u in c.encode_utf16(&mut units) {
                                out.push_str(&if p % 2 == 0 { format!("\\u{u:04x}") } else { format!("\\u{u:04X}") });
                            }
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Value::Array(items) => {
                out.push('[');
                for (k, item) in items.iter().enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(out, pick.next().unwrap_or(1));
                    spell(item, pick, out);
                }
                ws(out, pick.next().unwrap_or(1));
                out.push(']');
            }
            Value::Object(map) => {
                out.push('{');
                for (k, (key, item)) in map.iter().enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(out, pick.next().unwrap_or(1));
                    out.push_str(&Value::String(key.clone()).to_string());
                    ws(out, pick.next().unwrap_or(1));
                    out.push(':');
                    ws(out, pick.next().unwrap_or(1));
                    spell(item, pick, out);
                }
                ws(out, pick.next().unwrap_or(1));
                out.push('}');
            }
        }
    }

    fn record() -> impl Strategy<Value = Vec<u8>> {
        let any_record = prop::collection::vec((name(), value()), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect()));
        (
            prop_oneof![2 => fitting(), 1 => any_record],
            prop::collection::vec(any::<u8>(), 1..64),
            prop::option::weighted(0.15, (any::<prop::sample::Index>(), any::<u8>())),
        )
            .prop_map(|(v, picks, cut)| {
                let mut s = String::new();
                spell(&v, &mut picks.into_iter().cycle(), &mut s);
                let mut b = s.into_bytes();
                if let Some((at, byte)) = cut {
                    let chars = b"{}[],:\"\\ 0e-.nu\xff";
                    let i = at.index(b.len());
                    b[i] = chars[usize::from(byte) % chars.len()];
                }
                b
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn direct_agrees_with_serde(records in prop::collection::vec(record(), 1..12)) {
            let (_, a, b) = both(&records).map_err(TestCaseError::fail)?;
            prop_assert_eq!(a, b);
        }
    }
}
