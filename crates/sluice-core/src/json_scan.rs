//! A fast validating scan of one JSON object that also finds the raw text of some of its
//! top-level fields: the hot path of ingest (an event's key and event time) and of the lake's
//! mirror tables (a change event's `op`, `key`, `after`, ...).
//!
//! Hand-written because it is the hot path of ingest: serde_json's validating pass with a
//! field probe costs ~1 µs per 293-byte reference event, more than compressing, writing and
//! fsyncing it together (`sluice-connect/examples/ingest_costs.rs`). This scan only ever
//! *accepts* or *declines*: whatever it declines (invalid JSON, and valid JSON it does not
//! handle: keys with escapes, `\u` surrogates, non-UTF-8 or very deep nesting, a repeated
//! wanted field) the caller parses again with serde_json, which decides and words the error.
//! So the rule it must keep is one-sided: it accepts only JSON objects that serde_json
//! accepts, and then finds the same fields. Property tests check exactly that against
//! serde_json (`sluice-connect`'s ingest parsing, `sluice-lake`'s mirror).

/// Deeper nesting is declined (serde_json allows 128 levels; the slow path decides).
const MAX_DEPTH: usize = 64;

/// Scans `b`, which must be exactly one JSON object with no surrounding whitespace, and
/// returns the raw text of the value of each of `fields` (`None`: not wanted, or absent).
/// `None` declines: the caller parses `b` with serde_json instead.
pub fn scan_object<'a, const N: usize>(b: &'a [u8], fields: [Option<&[u8]>; N]) -> Option<[Option<&'a [u8]>; N]> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut s = Scanner { b, i: 0, non_ascii: false };
    let found = s.top_object(&fields)?;
    if s.i != b.len() || (s.non_ascii && std::str::from_utf8(b).is_err()) {
        return None;
    }
    Some(found)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// A string held a byte >= 0x80: the whole text is checked as UTF-8 at the end.
    non_ascii: bool,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// The top-level object, noting where the wanted fields' values are.
    fn top_object<const N: usize>(&mut self, fields: &[Option<&[u8]>; N]) -> Option<[Option<&'a [u8]>; N]> {
        let mut found = [None; N];
        self.i += 1; // '{'
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Some(found);
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return None;
            }
            let (name, escaped) = self.string()?;
            if escaped {
                // An escaped name may spell a wanted field: let serde_json unescape it.
                return None;
            }
            self.ws();
            if self.peek() != Some(b':') {
                return None;
            }
            self.i += 1;
            self.ws();
            let start = self.i;
            self.value(1)?;
            let raw = &self.b[start..self.i];
            for (field, slot) in fields.iter().zip(found.iter_mut()) {
                if *field == Some(name) {
                    if slot.is_some() {
                        return None;
                    }
                    *slot = Some(raw);
                }
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(found);
                }
                _ => return None,
            }
        }
    }

    /// Any value at nesting `depth` (1 = inside the top-level object).
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.container(depth, b'}', true),
            b'[' => self.container(depth, b']', false),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// An object (`keyed`) or an array below the top level.
    fn container(&mut self, depth: usize, close: u8, keyed: bool) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            if keyed {
                if self.peek() != Some(b'"') {
                    return None;
                }
                self.string()?;
                self.ws();
                if self.peek() != Some(b':') {
                    return None;
                }
                self.i += 1;
                self.ws();
            }
            self.value(depth + 1)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                c if c == close => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string starting at its opening quote: its content and whether it had escapes.
    #[inline]
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let b = self.b;
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            // Eight bytes at a time while none of them is '"', '\\', a control character or
            // non-ASCII (the usual case: short ASCII text), then straight to the first that is.
            while let Some(chunk) = b.get(self.i..self.i + 8) {
                let special = special_bytes(u64::from_le_bytes(chunk.try_into().ok()?));
                if special != 0 {
                    self.i += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                self.i += 8;
            }
            let c = *b.get(self.i)?;
            match c {
                b'"' => {
                    let s = &b[start..self.i];
                    self.i += 1;
                    return Some((s, escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.escape()?;
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

    /// One escape after its backslash: `\" \\ \/ \b \f \n \r \t` or `\uXXXX` outside the
    /// surrogate range (pairs are left to serde_json).
    fn escape(&mut self) -> Option<()> {
        let c = *self.b.get(self.i + 1)?;
        match c {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                self.i += 2;
                Some(())
            }
            b'u' => {
                let hex = self.b.get(self.i + 2..self.i + 6)?;
                let mut v: u32 = 0;
                for &h in hex {
                    v = v * 16 + (h as char).to_digit(16)?;
                }
                if (0xD800..=0xDFFF).contains(&v) {
                    return None;
                }
                self.i += 6;
                Some(())
            }
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        // A number runs into no other token character ("01", "1.5.2", "2x" are declined).
        match self.peek() {
            None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\t' | b'\r') => Some(()),
            _ => None,
        }
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

/// The bytes of `w` (little-endian: the first byte lowest) that are '"', '\\', below 0x20,
/// or 0x80 and above, as their high bits. Nonzero iff there is one, and the lowest set bit
/// is exact (the borrows of the subtractions only run upwards, so bits above the first such
/// byte may be false), which is all the scan uses: `trailing_zeros() / 8` is its index.
/// Also the string loop of the lake's direct JSON decoder.
#[inline]
pub fn special_bytes(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let quote = has_zero(w ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    quote | backslash | control | (w & HIGH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(s: &str) -> Option<[Option<&[u8]>; 2]> {
        scan_object(s.as_bytes(), [Some(b"id"), Some(b"ts")])
    }

    #[test]
    fn finds_the_fields() {
        let [key, time] = scan(r#"{"a":[1,{"id":2}],"id":"x\"y","ts":12.5e3, "n":null}"#).unwrap();
        assert_eq!(key, Some(&br#""x\"y""#[..]));
        assert_eq!(time, Some(&b"12.5e3"[..]));
        assert_eq!(scan("{}").unwrap(), [None, None]);
        assert_eq!(scan(r#"{ "ts" : { "a" : [ ] } }"#).unwrap()[1], Some(&br#"{ "a" : [ ] }"#[..]));
    }

    #[test]
    fn declines() {
        for bad in [
            "", "[]", "{", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "{\"a\":01}", "{\"a\":1.}", "{\"a\":-}",
            "{\"a\":1e}", "{\"a\":tru}", "{\"a\":\"\\x\"}", "{\"a\":\"\u{1}\"}", "{\"a\":1} ", "{\"a\":[1,]}",
            "{\"a\":\"\\ud800\"}", "{\"i\\u0064\":1}", "{\"id\":1,\"id\":2}", "{\"a\":1 2}", "{\"a\":\"x}",
        ] {
            assert_eq!(scan(bad), None, "{bad:?}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(scan(&deep), None);
        assert_eq!(scan_object(b"{\"a\":\"\xff\"}", [None]), None);
        assert!(scan("{\"a\":\"caf\u{e9}\"}").is_some());
    }

    #[test]
    fn special_bytes_finds_the_first() {
        assert_eq!(special_bytes(u64::from_le_bytes(*b"abcdefgh")), 0);
        let specials = [b'"', b'\\', 0u8, 0x1f, 0x80, 0xff];
        for c in specials {
            for at in 0..8 {
                let mut w = *b"a !~#]/g";
                w[at] = c;
                // Any bytes after the first special one, special or not.
                for (k, later) in (at + 1..8).zip(specials.iter().chain(b"\x01 ").cycle().skip(at)) {
                    w[k] = *later;
                }
                let found = special_bytes(u64::from_le_bytes(w));
                assert_eq!(found.trailing_zeros() / 8, at as u32, "{c:#x} at {at} in {w:?}");
            }
        }
        // Every byte value, alone among plain ones.
        for c in 0..=255u8 {
            let mut w = *b"abcdefgh";
            w[5] = c;
            let special = c == b'"' || c == b'\\' || c < 0x20 || c >= 0x80;
            let found = special_bytes(u64::from_le_bytes(w));
            assert_eq!(found != 0, special, "{c:#x}");
            if special {
                assert_eq!(found.trailing_zeros() / 8, 5);
            }
        }
    }
}
