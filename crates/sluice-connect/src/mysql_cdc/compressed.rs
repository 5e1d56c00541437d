//! MariaDB's compressed binlog events (`log_bin_compress = ON`), read as the events they
//! compress.
//!
//! MariaDB compresses the statement of a QUERY_COMPRESSED_EVENT and the rows of the six
//! compressed row events (those larger than `log_bin_compress_min_len`); everything before
//! them (post-header, status variables and database name; table id, flags, width and column
//! bitmaps) is as in the uncompressed kind. The compressed part is a header byte
//! (`0x80 | algorithm << 4 | n`, algorithm 0 = zlib), the uncompressed length in `n`
//! big-endian bytes, then a zlib stream. [`inflate`] rebuilds the uncompressed event, which
//! the usual reader then parses: one path for both.

use mysql_async::binlog::events::{BinlogEventFooter, Event};
use mysql_async::binlog::{BinlogChecksumAlg, EventType};
use std::io::Read;

/// `max_allowed_packet`'s largest value.
const MAX_EVENT_BYTES: usize = 1 << 30;

/// The uncompressed kind of a compressed event type (QUERY_COMPRESSED_EVENT, 165, to
/// DELETE_ROWS_COMPRESSED_EVENT, 171): QUERY_EVENT, the three V1 row events (what MariaDB
/// writes), the three V2 ones. None: not a compressed event.
fn plain_type(compressed: u8) -> Option<EventType> {
    Some(match compressed {
        165 => EventType::QUERY_EVENT,
        166 => EventType::WRITE_ROWS_EVENT_V1,
        167 => EventType::UPDATE_ROWS_EVENT_V1,
        168 => EventType::DELETE_ROWS_EVENT_V1,
        169 => EventType::WRITE_ROWS_EVENT,
        170 => EventType::UPDATE_ROWS_EVENT,
        171 => EventType::DELETE_ROWS_EVENT,
        _ => return None,
    })
}

/// Whether an event type is one of MariaDB's compressed events.
pub fn is_compressed(event_type: u8) -> bool {
    plain_type(event_type).is_some()
}

/// The event a compressed event compresses, with the same header (but its type and size).
/// Err: not a compressed event, or its compressed part is not what MariaDB writes (the
/// message says what).
pub fn inflate(ev: &Event) -> Result<Event, String> {
    let h = ev.header();
    let raw = h.event_type_raw();
    let plain = plain_type(raw).ok_or_else(|| format!("event type {raw} is not a compressed event"))?;
    let data = ev.data();
    let fde = ev.fde();
    // Post-header lengths are per type (index type - 1); a compressed type's is its plain one's.
    let post = usize::from(fde.event_type_header_lengths().get(usize::from(raw) - 1).copied().unwrap_or_else(|| fde.get_event_type_header_length(plain)));
    let update = matches!(plain, EventType::UPDATE_ROWS_EVENT_V1 | EventType::UPDATE_ROWS_EVENT);
    let at = if plain == EventType::QUERY_EVENT { query_text_at(data, post) } else { rows_at(data, post, update) }
        .ok_or_else(|| format!("compressed event of type {raw} is cut short ({} bytes)", data.len()))?;
    let body = uncompress(&data[at..]).map_err(|e| format!("compressed event of type {raw}: {e}"))?;

    let footer = fde.footer();
    let checksummed = footer.get_checksum_enabled() && !matches!(footer.get_checksum_alg(), Ok(None) | Ok(Some(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_OFF)));
    let size = 19 + at + body.len() + if checksummed { BinlogEventFooter::BINLOG_CHECKSUM_LEN } else { 0 };
    let size = u32::try_from(size).map_err(|_| format!("compressed event of type {raw} inflates to {size} bytes"))?;
    let mut bytes = super::header_bytes(&h, plain as u8, size);
    bytes.reserve(size as usize - bytes.len());
    bytes.extend_from_slice(&data[..at]);
    bytes.extend_from_slice(&body);
    if checksummed {
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
    }
    Event::read(fde, &bytes[..]).map_err(|e| format!("compressed event of type {raw}, inflated: {e}"))
}

/// Where a query event's statement starts: after the post-header (status variables' length
/// at 11, database name's at 8), the status variables, and the database name and its NUL.
fn query_text_at(data: &[u8], post: usize) -> Option<usize> {
    let db_len = usize::from(*data.get(8)?);
    let status_len = usize::from(u16::from_le_bytes(data.get(11..13)?.try_into().ok()?));
    let at = post + status_len + db_len + 1;
    (at <= data.len()).then_some(at)
}

/// Where a rows event's rows start: after the post-header (table id, flags, and for the V2
/// events the length of the extra data that follows it, counting its own 2 bytes), the
/// column count (a length-encoded integer) and one column bitmap, two for updates.
fn rows_at(data: &[u8], post: usize, update: bool) -> Option<usize> {
    let mut at = post;
    if post == 10 {
        let extra = usize::from(u16::from_le_bytes(data.get(8..10)?.try_into().ok()?));
        at += extra.checked_sub(2)?;
    }
    let (width, n) = match *data.get(at)? {
        b @ 0..=0xfa => (u64::from(b), 1),
        0xfc => (u64::from(u16::from_le_bytes(data.get(at + 1..at + 3)?.try_into().ok()?)), 3),
        0xfd => {
            let b = data.get(at + 1..at + 4)?;
            (u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16, 4)
        }
        0xfe => (u64::from_le_bytes(data.get(at + 1..at + 9)?.try_into().ok()?), 9),
        _ => return None,
    };
    let bitmap = usize::try_from(width.div_ceil(8)).ok()?;
    at = at.checked_add(n)?.checked_add(bitmap.checked_mul(if update { 2 } else { 1 })?)?;
    (at <= data.len()).then_some(at)
}

/// The compressed part's bytes, uncompressed.
fn uncompress(b: &[u8]) -> Result<Vec<u8>, String> {
    let &first = b.first().ok_or("no compressed data")?;
    if first & 0x80 == 0 {
        return Err(format!("compressed data starts with {first:#04x}, not 0x80 or more"));
    }
    let algorithm = (first >> 4) & 0x07;
    if algorithm != 0 {
        return Err(format!("compression algorithm {algorithm} (only 0, zlib, is known)"));
    }
    let n = usize::from(first & 0x07);
    if !(1..=4).contains(&n) {
        return Err(format!("the uncompressed length takes {n} bytes, not 1 to 4"));
    }
    let len = b.get(1..1 + n).ok_or("the uncompressed length is cut short")?.iter().fold(0usize, |l, &x| l << 8 | usize::from(x));
    // No event is larger than the server's packet limit (at most 1 GiB); a garbled length
    // must not make a huge allocation.
    if len > MAX_EVENT_BYTES {
        return Err(format!("the uncompressed length {len} is over the largest event a server sends ({MAX_EVENT_BYTES})"));
    }
    let mut out = Vec::with_capacity(len.min(b.len().saturating_mul(8)));
    // One byte more than promised is read, to tell a longer stream from an exact one.
    flate2::read::ZlibDecoder::new(&b[1 + n..]).take(len as u64 + 1).read_to_end(&mut out).map_err(|e| format!("zlib: {e}"))?;
    if out.len() != len {
        return Err(format!("inflates to {} bytes, not the {len} its header says", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql_async::binlog::events::{EventData, FormatDescriptionEvent, RowsEventData};
    use mysql_async::binlog::BinlogVersion;
    use std::io::Write;

    /// MariaDB's way: header byte, big-endian length in as few bytes as it needs, zlib.
    fn compress(plain: &[u8]) -> Vec<u8> {
        let n = match plain.len() {
            0..=0xff => 1,
            0x100..=0xffff => 2,
            0x1_0000..=0xff_ffff => 3,
            _ => 4,
        };
        let mut out = vec![0x80 | n as u8];
        out.extend_from_slice(&(plain.len() as u32).to_be_bytes()[4 - n..]);
        let mut z = flate2::write::ZlibEncoder::new(out, flate2::Compression::default());
        z.write_all(plain).unwrap();
        z.finish().unwrap()
    }

    fn fde(checksum: bool) -> FormatDescriptionEvent<'static> {
        let alg = if checksum { BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_CRC32 } else { BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_OFF };
        FormatDescriptionEvent::new(BinlogVersion::Version4).with_footer(BinlogEventFooter::new(alg))
    }

    /// An event of `kind` with body `data`, as the stream hands it out.
    fn event(fde: &FormatDescriptionEvent<'_>, kind: u8, data: &[u8], checksum: bool) -> Event {
        let size = (19 + data.len() + if checksum { 4 } else { 0 }) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        b.push(kind);
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&4242u32.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(data);
        if checksum {
            b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        }
        Event::read(fde, &b[..]).unwrap()
    }

    /// A V1 rows event's body before its rows: table id 42 (6 bytes), flags, 2 columns, bitmaps.
    fn rows_head(update: bool) -> Vec<u8> {
        let mut d = vec![42, 0, 0, 0, 0, 0, 1, 0, 2, 0b11];
        if update {
            d.push(0b11);
        }
        d
    }

    #[test]
    fn compressed_rows_and_statements_read_as_their_plain_events() {
        for checksum in [false, true] {
            let fde = fde(checksum);
            // A rows body that is not what a table map describes is fine here: only the
            // framing is checked; the source parses rows as it always does.
            let rows: Vec<u8> = (0..300u32).flat_map(|i| [0u8, (i % 250) as u8, 1]).collect();
            for (compressed, plain, update) in [(166u8, 23u8, false), (167, 24, true), (168, 25, false)] {
                let mut body = rows_head(update);
                let want = event(&fde, plain, &[body.clone(), rows.clone()].concat(), checksum);
                body.extend_from_slice(&compress(&rows));
                let got = inflate(&event(&fde, compressed, &body, checksum)).unwrap();
                assert_eq!((got.header(), got.data()), (want.header(), want.data()), "type {compressed}, checksum {checksum}");
                assert!(matches!(got.read_data().unwrap(), Some(EventData::RowsEvent(_))));
            }
            // V2: the extra data's length (2 + 3 bytes of it) before the width.
            let mut head = vec![42, 0, 0, 0, 0, 0, 1, 0, 5, 0, 1, 2, 3, 2, 0b11];
            let want = event(&fde, 30, &[head.clone(), rows.clone()].concat(), checksum);
            head.extend_from_slice(&compress(&rows));
            let got = inflate(&event(&fde, 169, &head, checksum)).unwrap();
            assert_eq!((got.header(), got.data()), (want.header(), want.data()));
            assert!(matches!(got.read_data().unwrap(), Some(EventData::RowsEvent(RowsEventData::WriteRowsEvent(_)))));

            // A statement: thread id, time, db length 4, error code, status length 3, status, db, NUL.
            let sql = format!("ALTER TABLE t ADD COLUMN c INT COMMENT '{}'", "x".repeat(400));
            let mut q = vec![1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 3, 0, 9, 9, 9];
            q.extend_from_slice(b"test\0");
            let want = event(&fde, 2, &[q.clone(), sql.clone().into_bytes()].concat(), checksum);
            q.extend_from_slice(&compress(sql.as_bytes()));
            let got = inflate(&event(&fde, 165, &q, checksum)).unwrap();
            assert_eq!((got.header(), got.data()), (want.header(), want.data()));
            match got.read_data().unwrap() {
                Some(EventData::QueryEvent(e)) => assert_eq!(e.query(), sql),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_compressed_data_is_an_error_saying_what() {
        let fde = fde(false);
        let rows = vec![7u8; 100];
        let body = |c: Vec<u8>| [rows_head(false), c].concat();
        let err = |c: Vec<u8>| inflate(&event(&fde, 166, &body(c), false)).unwrap_err();
        assert!(err(vec![]).contains("no compressed data"));
        assert!(err(vec![0x01, 0x00]).contains("not 0x80"));
        assert!(err(vec![0x91, 100]).contains("algorithm 1"));
        assert!(err(vec![0x85, 0, 0, 0, 0, 100]).contains("5 bytes"));
        assert!(err(vec![0x84, 0xff, 0xff, 0xff, 0xff, 0x78]).contains("over the largest event"));
        let mut short = compress(&rows);
        short[1] = 99;
        assert!(err(short).contains("inflates to 100 bytes, not the 99"));
        let mut long = compress(&rows);
        long[1] = 101;
        assert!(err(long).contains("not the 101"));
        let mut garbled = compress(&rows);
        garbled.truncate(8);
        assert!(err(garbled).contains("zlib"));
        assert!(inflate(&event(&fde, 166, &[42, 0, 0], false)).unwrap_err().contains("cut short"));
        assert!(inflate(&event(&fde, 23, &body(compress(&rows)), false)).unwrap_err().contains("not a compressed event"));
    }

    proptest::proptest! {
        /// Any body of any compressed type inflates or is refused, never a panic; rows
        /// compressed as MariaDB does come back as they were.
        #[test]
        fn any_body_inflates_or_is_refused(kind in 165u8..=171, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
                                           rows in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let fde = fde(false);
            let _ = inflate(&event(&fde, kind, &body, false));
            let head = rows_head(kind == 167);
            if matches!(kind, 166..=168) {
                let got = inflate(&event(&fde, kind, &[head.clone(), compress(&rows)].concat(), false)).unwrap();
                proptest::prop_assert_eq!(got.data(), &[head, rows].concat()[..]);
            }
        }
    }
}
