//! Change data capture from MySQL and MariaDB: the binlog in ROW format into Sluice's log,
//! one stream per captured table, with the same change events as [`crate::postgres_cdc`].
//!
//! How it keeps its promises (hand-written: this is the product's exactly-once edge):
//! - **Positions.** A binlog position is a file and an offset; Sluice writes it as one
//!   number, the file's sequence number in the high 32 bits and the offset in the low ones,
//!   shown as `transaction.lsn` = `<file number>/<offset>` in hex, like a PostgreSQL LSN, so
//!   that the mirror's newer-wins rule and the log's de-duplication work alike. A
//!   transaction's position is where it starts in the binlog (its GTID or BEGIN event).
//! - **Nothing lost.** The source keeps its own position (the server keeps none for a
//!   replica): the end of the last transaction whose changes are durable in the log, saved
//!   (fsynced) after them. A restart asks the server for the binlog from there.
//! - **Nothing duplicated.** As for PostgreSQL: at start the source reads the last record
//!   of each partition it writes, and drops re-sent changes at or before its position.
//! - **Schema changes need no restart.** Every row event comes with its table map, which
//!   (with `binlog_row_metadata = FULL`) names the columns as they are now.
//! - **Faults are explicit.** A binlog purged past the saved position stops the source with
//!   an error saying a snapshot is needed; connection errors are retried with backoff.

pub mod compressed;
pub mod snapshot;
pub mod types;

use crate::postgres_cdc::{
    run_sessions, Session, AppendFence, Writes, MAX_INFLIGHT,
    held_position, rfc3339, OpenStream, Pending, Position, SnapshotReceiver, SnapshotRequest, SnapshotSender, SnapshotTask, SourceStatus, Stop, GROUP_RECORDS,
};
use futures::StreamExt;
use mysql_async::binlog::events::{EventData, OptionalMetaExtractor, OptionalMetadataField, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_common::io::ParseBuf;
use mysql_async::prelude::*;
use mysql_async::{BinlogStreamRequest, Conn, Opts};
use serde_json::{json, Map, Value as Json};
use crate::state_file::StateFile;
use sluice_core::source::{table_stream_in, MysqlSourceConfig};
use sluice_log::{Record, Stream};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use types::Kind;

/// MariaDB's GTID event (it replaces BEGIN when the replica says it understands GTIDs).
const MARIADB_GTID_EVENT: u8 = 162;
/// The server's error for a binlog position it no longer has (purged, or never existed).
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

/// A binlog position as one number: the file's sequence number, then the offset.
pub fn position(file_no: u32, offset: u64) -> u64 {
    ((file_no as u64) << 32) | (offset & 0xffff_ffff)
}

/// `mysql-bin.000042` → 42.
fn file_number(name: &str) -> Option<u32> {
    name.rsplit('.').next()?.parse().ok()
}

/// Whether an event read before the format description (whose body then still holds any
/// checksum) ends in the CRC32 of its header and the rest of its body.
fn ends_in_checksum(ev: &mysql_async::binlog::events::Event) -> bool {
    let h = ev.header();
    ends_in_crc(&header_bytes(&h, h.event_type_raw(), h.event_size()), ev.data())
}

/// An event's 19-byte header as the binlog holds it, with `event_type` and `size` in place
/// of its own.
fn header_bytes(h: &mysql_async::binlog::events::BinlogEventHeader, event_type: u8, size: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(19);
    header.extend_from_slice(&h.timestamp().to_le_bytes());
    header.push(event_type);
    for v in [h.server_id(), size, h.log_pos()] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    header.extend_from_slice(&h.flags_raw().to_le_bytes());
    header
}

/// Whether the body's last 4 bytes are the CRC32 of the event's header and the rest of it.
fn ends_in_crc(header: &[u8], body: &[u8]) -> bool {
    let Some(split) = body.len().checked_sub(4) else { return false };
    let mut c = crc32fast::Hasher::new();
    c.update(header);
    c.update(&body[..split]);
    c.finalize().to_le_bytes() == body[split..]
}

fn lsn_text(p: u64) -> String {
    format!("{:X}/{:X}", p >> 32, p & 0xffff_ffff)
}

/// Where each binlog event is: (start, end). MySQL's compressed transactions
/// (`binlog_transaction_compression`) complicate it: mysql_async hands out a
/// Transaction_payload_event's events right after it, with no positions of their own (log_pos
/// 0), so they take the payload's. When it cannot decompress a payload it drops the error and
/// hands out none, which would lose the transaction without a word: a payload not followed by
/// any of its events is an error (`Err` with the payload's position).
#[derive(Default)]
struct Positions {
    payload: Option<(u64, u64)>,
    inner: usize,
}

impl Positions {
    fn of(&mut self, log_pos: u32, size: u32) -> Result<(u64, u64), (u64, u64)> {
        match (log_pos, self.payload) {
            (0, Some(at)) => {
                self.inner += 1;
                Ok(at)
            }
            (end, at) => {
                if let Some(at) = at.filter(|_| self.inner == 0) {
                    return Err(at);
                }
                self.payload = None;
                Ok((u64::from(end).saturating_sub(u64::from(size)), u64::from(end)))
            }
        }
    }

    /// A Transaction_payload_event at `at`: its events come next.
    fn payload(&mut self, at: (u64, u64)) {
        self.payload = Some(at);
        self.inner = 0;
    }
}

impl From<mysql_async::Error> for Stop {
    fn from(e: mysql_async::Error) -> Stop {
        Stop::Retry(e.into())
    }
}

/// What the source remembers between runs (`<state_dir>/state.json`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// The binlog file and offset to read from: everything before is durable in the log.
    binlog_file: Option<String>,
    #[serde(default)]
    binlog_pos: u64,
    /// Streams this source has written, by `database.table`.
    tables: BTreeMap<String, String>,
    #[serde(default)]
    snapshots: Vec<SnapshotTask>,
    #[serde(default)]
    next_snapshot: u64,
}

/// A table as its table map describes it.
struct Shape {
    db: String,
    table: String,
    names: Vec<String>,
    kinds: Vec<Kind>,
    keys: Vec<usize>,
    /// Column indexes in the order JSON objects list them (by name, as serde_json sorts).
    order: Vec<usize>,
    /// Each column's name as JSON text followed by `:`.
    name_json: Vec<Vec<u8>>,
    /// How to read each column from a row event's bytes: its binlog type, type metadata and
    /// sign, from the table map (empty for a shape made without one).
    codecs: Vec<(ColumnType, Vec<u8>, bool)>,
}

/// The bytes of an integer column's value in a row event (mysql_common's reader, which
/// [`read_int`] follows, takes a generic path per value).
fn int_width(ty: ColumnType) -> Option<usize> {
    use ColumnType::*;
    match ty {
        MYSQL_TYPE_TINY => Some(1),
        MYSQL_TYPE_SHORT => Some(2),
        MYSQL_TYPE_INT24 => Some(3),
        MYSQL_TYPE_LONG => Some(4),
        MYSQL_TYPE_LONGLONG => Some(8),
        _ => None,
    }
}

/// A little-endian integer of 1 to 8 bytes as mysql_common reads it from a row event: `Int`,
/// but `UInt` for an unsigned BIGINT above `i64::MAX`.
fn read_int(b: &[u8], unsigned: bool) -> mysql_async::Value {
    let bits = b.len() as u32 * 8;
    let raw = b.iter().rev().fold(0u64, |n, &x| n << 8 | x as u64);
    if unsigned {
        i64::try_from(raw).map_or(mysql_async::Value::UInt(raw), mysql_async::Value::Int)
    } else {
        // Sign-extended from the value's width.
        let shift = 64 - bits;
        mysql_async::Value::Int(((raw << shift) as i64) >> shift)
    }
}

/// Gives signed MEDIUMINT values of a row mysql_common read their sign: it reads the three
/// bytes without extending it (-1 as 16777215).
fn signed_int24(r: &mut BinlogRow) {
    for i in 0..r.len() {
        let c = &r.columns_ref()[i];
        let signed = c.column_type() == ColumnType::MYSQL_TYPE_INT24 && !c.flags().contains(mysql_async::consts::ColumnFlags::UNSIGNED_FLAG);
        if let (true, Some(BinlogValue::Value(mysql_async::Value::Int(x)))) = (signed, r.as_ref(i)) {
            if *x >= 1 << 23 {
                let v = *x - (1 << 24);
                r.place(i, BinlogValue::Value(mysql_async::Value::Int(v)));
            }
        }
    }
}

/// A row image: writes the value of each column as JSON (`null` for a column the image
/// leaves out, as for a NULL).
trait Image {
    fn write(&self, column: usize, kind: &Kind, out: &mut Vec<u8>);
}

impl Image for BinlogRow {
    fn write(&self, column: usize, kind: &Kind, out: &mut Vec<u8>) {
        match self.as_ref(column) {
            Some(v) => types::write_binlog(kind, v, out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// One column of a row image read by [`Shape::read_image`]: the value as mysql_common
/// decodes it, or a text column's bytes where they are in the event (not copied).
enum Cell<'d> {
    Value(BinlogValue<'d>),
    Text(&'d [u8]),
}

impl Image for [Cell<'_>] {
    fn write(&self, column: usize, kind: &Kind, out: &mut Vec<u8>) {
        match self.get(column) {
            Some(Cell::Value(v)) => types::write_binlog(kind, v, out),
            Some(Cell::Text(b)) => types::write_text(kind, b, out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

impl Shape {
    fn of(t: &TableMapEvent<'_>) -> Result<Shape, String> {
        let meta = OptionalMetaExtractor::new(t.iter_optional_meta()).map_err(|e| format!("table map: {e}"))?;
        let names: Vec<String> = meta.iter_column_name().map(|n| n.map(|n| n.name().into_owned())).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let n = t.columns_count() as usize;
        if names.len() != n {
            return Err(format!(
                "the binlog does not name the columns of {}.{}: set binlog_row_metadata = FULL on the server",
                t.database_name(),
                t.table_name()
            ));
        }
        let mut enums = Vec::new();
        let mut sets = Vec::new();
        for f in t.iter_optional_meta() {
            match f.map_err(|e| e.to_string())? {
                OptionalMetadataField::EnumStrValue(v) => {
                    for e in v.iter_values() {
                        enums.push(e.map_err(|e| e.to_string())?.values().iter().map(|s| s.value().into_owned()).collect::<Vec<_>>());
                    }
                }
                OptionalMetadataField::SetStrValue(v) => {
                    for e in v.iter_values() {
                        sets.push(e.map_err(|e| e.to_string())?.values().iter().map(|s| s.value().into_owned()).collect::<Vec<_>>());
                    }
                }
                _ => {}
            }
        }
        let (mut enums, mut sets) = (enums.into_iter(), sets.into_iter());
        let mut charsets = meta.iter_charset();
        let mut kinds = Vec::with_capacity(n);
        for i in 0..n {
            let ty = t.get_column_type(i).map_err(|e| e.to_string())?.ok_or("no column type")?;
            let charset = if ty.is_character_type() { charsets.next().transpose().map_err(|e| e.to_string())?.unwrap_or(0) } else { 0 };
            let e = ty.is_enum_type().then(|| enums.next()).flatten();
            let s = ty.is_set_type().then(|| sets.next()).flatten();
            kinds.push(Kind::of_binlog(ty, charset, e, s));
        }
        let keys = meta.iter_primary_key().collect::<Result<Vec<u64>, _>>().map_err(|e| e.to_string())?.into_iter().map(|k| k as usize).collect();
        let mut shape = Shape::new(t.database_name().into_owned(), t.table_name().into_owned(), names, kinds, keys);
        // As mysql_common reads rows: numeric columns take their sign from the optional
        // metadata, in order.
        let mut signs = meta.iter_signedness();
        for i in 0..n {
            let ty = t.get_column_type(i).map_err(|e| e.to_string())?.ok_or("no column type")?;
            let unsigned = ty.is_numeric_type().then(|| signs.next()).flatten().unwrap_or_default();
            shape.codecs.push((ty, t.get_column_metadata(i).unwrap_or(&[]).to_vec(), unsigned));
        }
        Ok(shape)
    }

    fn new(db: String, table: String, names: Vec<String>, kinds: Vec<Kind>, keys: Vec<usize>) -> Shape {
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        let name_json = names
            .iter()
            .map(|n| {
                let mut b = serde_json::to_vec(n).expect("a string as JSON");
                b.push(b':');
                b
            })
            .collect();
        Shape { db, table, names, kinds, keys, order, name_json, codecs: Vec::new() }
    }

    /// Whether a row event's row has this shape's columns, in order (it does with
    /// `binlog_row_image = FULL`): then [`Shape::write_event`] can write it.
    fn fits(&self, r: &BinlogRow) -> bool {
        r.len() == self.names.len() && r.columns_ref().iter().zip(&self.names).all(|(c, n)| c.name_ref() == n.as_bytes())
    }

    /// Whether [`Shape::read_image`] can read this event's rows: every image holds every
    /// column of the table map (`binlog_row_image = FULL`) and no JSON column is partially
    /// updated. Otherwise mysql_common's row reader, which handles every case, is used.
    fn reads_directly(&self, r: &RowsEventData<'_>) -> bool {
        !self.codecs.is_empty()
            && r.num_columns() == self.codecs.len() as u64
            && !matches!(r, RowsEventData::PartialUpdateRowsEvent(_))
            && r.columns_before_image().is_none_or(|b| b.all())
            && r.columns_after_image().is_none_or(|b| b.all())
    }

    /// Reads one full row image (a NULL bitmap, then each non-NULL column's value) from a
    /// row event's bytes into `out`, by column. Text columns (VARCHAR, TEXT) are length and
    /// bytes, kept where they are; other values are decoded by mysql_common, as its row
    /// reader does, without building a column description per value.
    fn read_image<'d>(&'d self, buf: &mut ParseBuf<'d>, out: &mut Vec<Cell<'d>>) -> std::io::Result<()> {
        use ColumnType::*;
        out.clear();
        let nulls: &[u8] = buf.parse(self.codecs.len().div_ceil(8))?;
        for (i, (ty, meta, unsigned)) in self.codecs.iter().enumerate() {
            if nulls[i / 8] >> (i % 8) & 1 == 1 {
                out.push(Cell::Value(BinlogValue::Value(mysql_async::Value::NULL)));
                continue;
            }
            // The length's size, as mysql_common reads these types.
            let text_length = match (ty, meta.as_slice()) {
                _ if !matches!(self.kinds[i], Kind::Text) => None,
                (MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING, [lo, hi, ..]) => Some(if u16::from_le_bytes([*lo, *hi]) < 256 { 1 } else { 2 }),
                (MYSQL_TYPE_TINY_BLOB | MYSQL_TYPE_MEDIUM_BLOB | MYSQL_TYPE_LONG_BLOB | MYSQL_TYPE_BLOB, [n @ 1..=4, ..]) => Some(*n as usize),
                _ => None,
            };
            out.push(match (text_length, int_width(*ty)) {
                (Some(size), _) => {
                    let len: &[u8] = buf.parse(size)?;
                    let len = len.iter().rev().fold(0usize, |n, &b| n << 8 | b as usize);
                    Cell::Text(buf.parse(len)?)
                }
                (None, Some(width)) => Cell::Value(BinlogValue::Value(read_int(buf.parse(width)?, *unsigned))),
                (None, None) => Cell::Value(buf.parse((*ty, meta.as_slice(), *unsigned, false))?),
            });
        }
        Ok(())
    }

    /// A row as a JSON object (its columns in name order; only the key's with `key_only`)
    /// into `out`.
    fn write_row<R: Image + ?Sized>(&self, r: &R, key_only: bool, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        for &i in &self.order {
            if key_only && !self.keys.contains(&i) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&self.name_json[i]);
            r.write(i, &self.kinds[i], out);
        }
        out.push(b'}');
    }

    /// Whether an update's images have different primary keys (`scratch` holds each key
    /// column's two values as JSON text).
    fn key_moved<R: Image + ?Sized>(&self, before: &R, after: &R, (b, a): &mut (Vec<u8>, Vec<u8>)) -> bool {
        self.keys.iter().any(|&i| {
            (b.clear(), a.clear());
            before.write(i, &self.kinds[i], b);
            after.write(i, &self.kinds[i], a);
            a != b
        })
    }

    /// The change event of one row as JSON text: the bytes [`MysqlSource::event`] gives
    /// (keys in serde_json's order) for rows that [`Shape::fits`], with `tail` from
    /// [`Shape::tail`] for the row's event and transaction, after what `e` holds. Returns
    /// where in `e` the key's text is.
    fn write_event<R: Image + ?Sized>(&self, before: Option<&R>, after: Option<&R>, tail: &[u8], seq: u64, ts_ms: i64, e: &mut Vec<u8>) -> Option<std::ops::Range<usize>> {
        e.extend_from_slice(b"{\"after\":");
        match after {
            Some(r) => self.write_row(r, false, e),
            None => e.extend_from_slice(b"null"),
        }
        e.extend_from_slice(b",\"before\":");
        match before {
            Some(r) => self.write_row(r, false, e),
            None => e.extend_from_slice(b"null"),
        }
        e.extend_from_slice(b",\"key\":");
        let key = match after.or(before) {
            Some(r) if !self.keys.is_empty() => {
                let start = e.len();
                self.write_row(r, true, e);
                Some(start..e.len())
            }
            _ => {
                e.extend_from_slice(b"null");
                None
            }
        };
        e.extend_from_slice(tail);
        e.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        e.extend_from_slice(b"},\"ts_ms\":");
        e.extend_from_slice(itoa::Buffer::new().format(ts_ms).as_bytes());
        e.push(b'}');
        key
    }

    /// What every change event of one row event has in common, as JSON text: from `op`
    /// through the source to the transaction's `"seq":`.
    fn tail(&self, source: &str, op: &str, t: &Txn, file: &str, pos: u64) -> Vec<u8> {
        let mut e = Vec::with_capacity(256);
        let str = |s: &str, e: &mut Vec<u8>| serde_json::to_writer(e, s).expect("JSON to memory");
        e.extend_from_slice(b",\"op\":");
        str(op, &mut e);
        e.extend_from_slice(b",\"source\":{\"commit_time\":");
        str(&rfc3339(t.commit_time_ms), &mut e);
        e.extend_from_slice(b",\"connector\":\"mysql\",\"db\":");
        str(&self.db, &mut e);
        e.extend_from_slice(b",\"file\":");
        str(file, &mut e);
        e.extend_from_slice(b",\"gtid\":");
        let gtid = |e: &mut Vec<u8>| match &t.gtid {
            Some(g) => str(g, e),
            None => e.extend_from_slice(b"null"),
        };
        gtid(&mut e);
        e.extend_from_slice(b",\"name\":");
        str(source, &mut e);
        e.extend_from_slice(b",\"pos\":");
        e.extend_from_slice(itoa::Buffer::new().format(pos).as_bytes());
        e.extend_from_slice(b",\"schema\":");
        str(&self.db, &mut e);
        e.extend_from_slice(b",\"snapshot\":false,\"table\":");
        str(&self.table, &mut e);
        e.extend_from_slice(b"},\"transaction\":{\"id\":");
        gtid(&mut e);
        e.extend_from_slice(b",\"lsn\":");
        str(&lsn_text(t.pos), &mut e);
        e.extend_from_slice(b",\"seq\":");
        e
    }

    fn row(&self, r: &BinlogRow) -> Json {
        let mut obj = Map::new();
        // A row holds the columns the event's image has, in table order (all of them: the
        // source needs binlog_row_image = FULL).
        for (i, c) in r.columns_ref().iter().enumerate() {
            let name = c.name_str().into_owned();
            let idx = self.names.iter().position(|n| *n == name).unwrap_or(i);
            let v = r.as_ref(i).map_or(Json::Null, |v| types::binlog_to_json(self.kinds.get(idx).unwrap_or(&Kind::Text), v));
            obj.insert(name, v);
        }
        Json::Object(obj)
    }

    fn key(&self, row: &Json) -> Json {
        key_of(self.keys.iter().map(|&i| self.names[i].as_str()), row)
    }
}

/// Queues one change event of a transaction (by key, or to every partition for a table
/// without a key) and counts it in the transaction.
fn push_change(pending: &mut Pending, stream: &Arc<Stream>, t: &mut Txn, value: bytes::Bytes, key: Option<String>) {
    if let Some(k) = key {
        let p = stream.partition_for_key(k.as_bytes());
        pending.push(stream, p, (t.pos, t.seq), Record::with_key(bytes::Bytes::from(k), value, t.commit_time_ms));
    } else {
        for p in 0..stream.partitions().len() as u32 {
            pending.push(stream, p, (t.pos, t.seq), Record::new(value.clone(), t.commit_time_ms));
        }
    }
    t.seq += 1;
}

/// Replaces the partial JSON updates in an update's new image (MySQL's
/// `binlog_row_value_options = PARTIAL_JSON`) with the whole documents they make of the old
/// image's: a change event carries whole values. A diff that does not apply to the old
/// document is an error: the row cannot be known, and a wrong one must not reach the mirror.
fn whole_json_documents(shape: &Shape, before: Option<&BinlogRow>, after: &mut BinlogRow) -> Result<(), String> {
    for i in 0..after.len() {
        if let Some(BinlogValue::JsonDiff(diffs)) = after.as_ref(i) {
            let name = shape.names.get(i).map_or("?", String::as_str);
            let old = before.and_then(|b| b.as_ref(i)).map_or(Json::Null, |v| types::binlog_to_json(&Kind::Json, v));
            let doc = types::apply_json_diffs(old, diffs).map_err(|e| {
                format!("a partial JSON update of {}.{}.{name}: {e}; set binlog_row_value_options = '' on the server and take a snapshot of the table", shape.db, shape.table)
            })?;
            after.place(i, BinlogValue::Value(mysql_async::Value::Bytes(doc.to_string().into_bytes())));
        }
    }
    Ok(())
}

/// The JSON text every change event of one row event shares after its row images (see
/// [`Shape::tail`]); for an update, also a delete's and an insert's, for rows that move
/// to another key.
struct Tails {
    op: Vec<u8>,
    moved: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tails {
    fn new(shape: &Shape, source: &str, op: &str, t: &Txn, file: &str, pos: u64) -> Tails {
        let moved = (op == "update" && !shape.keys.is_empty()).then(|| (shape.tail(source, "delete", t, file, pos), shape.tail(source, "insert", t, file, pos)));
        Tails { op: shape.tail(source, op, t, file, pos), moved }
    }
}

/// Where one row event's change events go.
struct Out<'a> {
    shape: &'a Shape,
    tails: &'a Tails,
    now: i64,
    stream: &'a Arc<Stream>,
    pending: &'a mut Pending,
    /// A snapshot chunk's window the table's changes fall in: their keys leave the chunk.
    window: Option<&'a mut Window>,
    /// Scratch for comparing an update's old and new keys.
    keys: (Vec<u8>, Vec<u8>),
    /// Change events written and not yet queued, one after the other: queued together as
    /// slices of one buffer (see [`Out::flush`]), not a buffer (and a key) each.
    text: Vec<u8>,
    /// Per event in `text`: its sequence number, its key's range and its own.
    written: Vec<(u64, Option<std::ops::Range<usize>>, std::ops::Range<usize>)>,
    /// The most text written between two flushes.
    room: usize,
}

impl Out<'_> {
    /// Queues the change event of one row: an update that moves the row to another key is a
    /// delete of the old key and an insert of the new, as other CDC tools do, so that each key's
    /// events stay in its partition and the mirror drops the old row.
    fn row<R: Image + ?Sized>(&mut self, t: &mut Txn, before: Option<&R>, after: Option<&R>) {
        match (before, after, &self.tails.moved) {
            (Some(b), Some(a), Some((delete, insert))) if self.shape.key_moved(b, a, &mut self.keys) => {
                self.one(t, Some(b), None, delete);
                self.one(t, None, Some(a), insert);
            }
            _ => self.one(t, before, after, &self.tails.op),
        }
    }

    fn one<R: Image + ?Sized>(&mut self, t: &mut Txn, before: Option<&R>, after: Option<&R>, tail: &[u8]) {
        if self.text.capacity() == 0 {
            // After a flush in the middle of the row event (see `push`).
            self.text.reserve(self.room);
        }
        let start = self.text.len();
        let key = self.shape.write_event(before, after, tail, t.seq, self.now, &mut self.text);
        if let (Some(w), Some(k)) = (self.window.as_mut(), &key) {
            w.changed.insert(String::from_utf8(self.text[k.clone()].to_vec()).expect("JSON text is UTF-8"));
        }
        self.written.push((t.seq, key, start..self.text.len()));
        t.seq += 1;
    }

    /// Queues the events written (in order): call at the end of the row event. Returns the
    /// most text written between two flushes (a row event's are alike: the next one's room).
    fn flush(&mut self, t: &Txn) -> usize {
        if self.written.is_empty() {
            return self.room;
        }
        let room = self.text.len();
        self.room = self.room.max(room);
        let text = bytes::Bytes::from(std::mem::take(&mut self.text));
        for (seq, key, event) in self.written.drain(..) {
            let value = text.slice(event);
            match key {
                Some(k) => {
                    let k = text.slice(k);
                    let p = self.stream.partition_for_key(&k);
                    self.pending.push(self.stream, p, (t.pos, seq), Record::with_key(k, value, t.commit_time_ms));
                }
                None => {
                    for p in 0..self.stream.partitions().len() as u32 {
                        self.pending.push(self.stream, p, (t.pos, seq), Record::new(value.clone(), t.commit_time_ms));
                    }
                }
            }
        }
        self.room
    }

    /// Queues one change event built on its own (after those written: order is kept; its key
    /// leaves a snapshot chunk whose window it falls in).
    fn push(&mut self, t: &mut Txn, event: bytes::Bytes, key: Option<String>) {
        self.flush(t);
        if let (Some(w), Some(k)) = (self.window.as_mut(), &key) {
            w.changed.insert(k.clone());
        }
        push_change(self.pending, self.stream, t, event, key);
    }
}

/// The key columns' values, or null for a table without a key.
fn key_of<'a>(names: impl Iterator<Item = &'a str>, row: &Json) -> Json {
    let mut k = Map::new();
    for n in names {
        k.insert(n.to_string(), row.get(n).cloned().unwrap_or(Json::Null));
    }
    if k.is_empty() {
        Json::Null
    } else {
        Json::Object(k)
    }
}

/// A change event as a JSON value (truncates, and rows whose shape the text writer does not
/// know; [`Shape::write_event`] writes the same bytes for the others).
#[allow(clippy::too_many_arguments)]
fn event(source_name: &str, db: &str, table: &str, op: &str, before: Option<Json>, after: Option<Json>, key: Json, t: &Txn, file: &str, pos: u64, ts_ms: i64) -> Json {
    let mut source = Map::new();
    source.insert("connector".into(), "mysql".into());
    source.insert("name".into(), source_name.into());
    source.insert("db".into(), db.into());
    source.insert("schema".into(), db.into());
    source.insert("table".into(), table.into());
    source.insert("file".into(), file.into());
    source.insert("pos".into(), pos.into());
    source.insert("gtid".into(), t.gtid.clone().map_or(Json::Null, Json::String));
    source.insert("commit_time".into(), rfc3339(t.commit_time_ms).into());
    source.insert("snapshot".into(), false.into());
    let mut e = Map::new();
    e.insert("op".into(), op.into());
    e.insert("before".into(), before.unwrap_or(Json::Null));
    e.insert("after".into(), after.unwrap_or(Json::Null));
    e.insert("key".into(), key);
    e.insert("source".into(), Json::Object(source));
    e.insert("transaction".into(), json!({"id": t.gtid, "lsn": lsn_text(t.pos), "seq": t.seq}));
    e.insert("ts_ms".into(), ts_ms.into());
    Json::Object(e)
}

/// The transaction being received.
struct Txn {
    /// Where it starts in the binlog.
    pos: u64,
    /// Its GTID, if the server uses them.
    gtid: Option<String>,
    commit_time_ms: i64,
    seq: u64,
    /// Begun by a BEGIN (or a MariaDB GTID event that is not standalone): ends at XID/COMMIT.
    explicit: bool,
}

/// A snapshot chunk read, waiting for the stream to pass `place`, the position its events
/// take: just before the binlog position of MariaDB's consistent read (see [`read_ahead`]),
/// or the high watermark's transaction (see [`Window`]). Sequence numbers start at `base`.
struct Chunk {
    task: u64,
    place: u64,
    limit: usize,
    base: u64,
    /// How many rows it read, and the last one's key (one text per key column).
    len: usize,
    last_key: Option<Vec<String>>,
    /// The rows as events, written on a blocking thread: the next chunk is read meanwhile.
    built: tokio::task::JoinHandle<Built>,
    /// Keys changed between the chunk's watermarks (read with `watermark_table`): their rows
    /// are not written, the changes are as new or newer.
    changed: HashSet<String>,
}

/// A chunk's rows, and as keyed `read` events at its place, sequence numbers from its base.
struct Built {
    info: snapshot::TableInfo,
    rows: Vec<Vec<mysql_async::Value>>,
    records: Vec<Record>,
}

impl Chunk {
    /// Chunk `task`'s rows, their events written at `place` from `base` on a blocking thread.
    fn build(source: &str, task: u64, info: snapshot::TableInfo, rows: Vec<Vec<mysql_async::Value>>, (place, base): (u64, u64), limit: usize) -> Chunk {
        let (len, last_key) = (rows.len(), last_key(&info, &rows));
        let source = source.to_string();
        let built = tokio::task::spawn_blocking(move || {
            let records = read_events(&source, &info, &rows, place, base);
            Built { info, rows, records }
        });
        Chunk { task, place, limit, base, len, last_key, built, changed: HashSet::new() }
    }
}

/// A chunk read between watermarks (with `watermark_table`; see [`snapshot`]) while the
/// binlog streams on.
struct Window {
    marker: String,
    task: u64,
    db: String,
    table: String,
    /// The low watermark has passed: changes to the table add their keys to `changed`.
    open: bool,
    /// A truncate of the table passed in the window: the rows read may be gone, the chunk is
    /// read again.
    stale: bool,
    changed: HashSet<String>,
    /// The high watermark's transaction, once it has passed: the chunk's events take its
    /// position.
    high: Option<u64>,
    read: tokio::task::JoinHandle<Result<Option<Windowed>, Stop>>,
    /// What the read gave, once it has finished.
    done: Option<Windowed>,
    started: std::time::Instant,
}

/// A chunk read between watermarks.
struct Windowed {
    info: snapshot::TableInfo,
    rows: Vec<Vec<mysql_async::Value>>,
    limit: usize,
}

impl Window {
    /// Whether a transaction's change of `db.table` falls in the window.
    fn covers(&self, db: &str, table: &str) -> bool {
        self.open && self.high.is_none() && self.db == db && self.table == table
    }

    /// A watermark row of the source's has passed in the binlog (at transaction `pos`).
    fn mark(&mut self, mark: &str, pos: u64) {
        match mark.split_once(' ') {
            Some(("low", m)) if m == self.marker => self.open = true,
            Some(("high", m)) if m == self.marker && self.open => self.high = Some(pos),
            _ => {}
        }
    }

    /// Past its high watermark, read and between transactions: the chunk to land, with its
    /// events at the high watermark's position; None if a truncate made it stale.
    fn into_chunk(self, source: &str) -> Option<Chunk> {
        let (Some(place), Some(Windowed { info, rows, limit })) = (self.high, self.done) else { unreachable!("checked by the caller") };
        if self.stale {
            tracing::debug!(source, table = self.table, "snapshot chunk read again: the table was truncated between its watermarks");
            return None;
        }
        Some(Chunk { changed: self.changed, ..Chunk::build(source, self.task, info, rows, (place, 0), limit) })
    }
}

/// A chunk being read on its own task. None: the table is gone (or its key changed).
type Reading = tokio::task::JoinHandle<Result<Option<Chunk>, Stop>>;

/// What a chunk read needs from the source (the task runs on its own).
#[derive(Clone)]
struct ReadAhead {
    source: String,
    home: String,
    chunk_rows: usize,
    conn: Arc<tokio::sync::Mutex<Conn>>,
}

impl ReadAhead {
    /// Starts reading the next chunk of the first queued snapshot on its own task: after the
    /// task's last key, or `after` when given (the last key of a chunk read but not landed yet).
    fn start(&self, state: &State, prev: Option<(u64, u64)>, after: Option<Vec<String>>) -> Reading {
        let mut task = state.snapshots[0].clone();
        if after.is_some() {
            task.after = after;
        }
        tokio::spawn(read_ahead(self.clone(), task, prev))
    }

    /// Starts reading the next chunk of the first queued snapshot between watermarks in
    /// `watermarks`, on its own task: after the task's last key, or `after` when given (the
    /// last key of a chunk read but not landed yet).
    fn start_window(&self, state: &State, watermarks: &(String, String), after: Option<Vec<String>>) -> Window {
        let mut task = state.snapshots[0].clone();
        if after.is_some() {
            task.after = after;
        }
        let (db, table) = task.table.split_once('.').map_or((self.home.clone(), task.table.clone()), |(d, t)| (d.to_string(), t.to_string()));
        let marker = format!("{}:{}:{:016x}", task.id, task.chunks, fastrand::u64(..));
        let (r, m, w, d, t) = (self.clone(), marker.clone(), watermarks.clone(), db.clone(), table.clone());
        let id = task.id;
        let read = tokio::spawn(async move {
            let mut conn = r.conn.lock().await;
            let Some(info) = snapshot::table_info(&mut conn, &d, &t).await? else { return Ok(None) };
            let Some((limit, keys)) = task.chunk_plan(&r.source, &info.key_names(), r.chunk_rows) else { return Ok(None) };
            let (low, high) = (format!("low {m}"), format!("high {m}"));
            let rows = snapshot::read_between_watermarks(&mut conn, &w, &r.source, (&low, &high), &info, task.after.as_deref(), keys.as_deref(), limit).await?;
            Ok(Some(Windowed { info, rows, limit }))
        });
        Window { marker, task: id, db, table, open: false, stale: false, changed: HashSet::new(), high: None, read, done: None, started: std::time::Instant::now() }
    }
}

/// Reads the next chunk of snapshot `task` (after its last key) and writes its rows as
/// events. `prev` is the last chunk's position and the sequence number after its rows: a
/// chunk read with no binlog event since the last one shares its position, and its sequence
/// numbers go on from there (checked again when it lands).
async fn read_ahead(r: ReadAhead, task: SnapshotTask, prev: Option<(u64, u64)>) -> Result<Option<Chunk>, Stop> {
    let mut conn = r.conn.lock().await;
    let (db, name) = task.table.split_once('.').unwrap_or((r.home.as_str(), task.table.as_str()));
    let t = std::time::Instant::now();
    let Some(info) = snapshot::table_info(&mut conn, db, name).await? else {
        return Ok(None);
    };
    tracing::debug!(took = ?t.elapsed(), "snapshot table columns read");
    let Some((limit, keys)) = task.chunk_plan(&r.source, &info.key_names(), r.chunk_rows) else { return Ok(None) };
    let read = snapshot::read_chunk(&mut conn, &info, task.after.as_deref(), keys.as_deref(), limit).await.map_err(|e| {
        if e.to_string().contains("binlog_snapshot_file") {
            Stop::Fatal(format!("source {}: {e:#}", r.source))
        } else {
            Stop::Retry(e)
        }
    })?;
    drop(conn);
    let file_no = file_number(&read.file).ok_or_else(|| anyhow::anyhow!("binlog file name {:?} has no sequence number", read.file))?;
    // Just before the position: after every transaction before it (which starts earlier and
    // ends at it at the latest), before every one after it.
    let place = position(file_no, read.pos).saturating_sub(1);
    let base = prev.filter(|(p, _)| *p == place).map_or(0, |(_, next)| next);
    Ok(Some(Chunk::build(&r.source, task.id, info, read.rows, (place, base), limit)))
}

/// The key of a chunk's last row, as a snapshot task keeps it (one text per key column).
fn last_key(info: &snapshot::TableInfo, rows: &[Vec<mysql_async::Value>]) -> Option<Vec<String>> {
    let values = rows.last()?;
    Some(
        info.keys
            .iter()
            .map(|&i| match types::value_to_json(&info.columns[i].1, &values[i], false) {
                Json::String(s) => s,
                v => v.to_string(),
            })
            .collect(),
    )
}

/// A chunk's rows as keyed `read` events at position `at`, with sequence numbers from `base`.
fn read_events(source: &str, info: &snapshot::TableInfo, rows: &[Vec<mysql_async::Value>], at: u64, base: u64) -> Vec<Record> {
    let now = sluice_core::time::now_ms();
    let source = json!({"connector": "mysql", "name": source, "db": info.db, "schema": info.db, "table": info.name,
                        "file": null, "pos": null, "gtid": null, "commit_time": null, "snapshot": true});
    let keys: Vec<bool> = (0..info.columns.len()).map(|i| info.keys.contains(&i)).collect();
    let events = crate::ReadEvents::new(info.columns.iter().zip(&keys).map(|((n, _), k)| (n.as_str(), *k)), &source, &lsn_text(at), now);
    events.records(rows.len(), base, now, |row, col, out| types::write_value(&info.columns[col].1, &rows[row][col], out))
}

/// One MySQL/MariaDB source. Run it with [`MysqlSource::run`] on its own task.
pub struct MysqlSource {
    name: String,
    cfg: MysqlSourceConfig,
    state: StateFile,
    open_stream: OpenStream,
    status: Arc<SourceStatus>,
    requests: tokio::sync::Mutex<SnapshotReceiver>,
    request_sender: SnapshotSender,
    /// Orders the log writes of one session after those of the sessions before it.
    fence: Arc<AppendFence>,
}

/// What a durable write lets the source record: the end of the last whole transaction
/// written and the binlog file and position after it.
struct Landed {
    confirm: Option<u64>,
    at: Option<(String, u64)>,
}

impl MysqlSource {
    pub fn new(name: &str, cfg: &MysqlSourceConfig, state_dir: PathBuf, open_stream: OpenStream) -> MysqlSource {
        let status = Arc::new(SourceStatus { name: name.to_string(), kind: "mysql", ..Default::default() });
        status.set_state("starting");
        let (request_sender, requests) = tokio::sync::mpsc::unbounded_channel();
        let source = MysqlSource {
            name: name.to_string(),
            cfg: cfg.clone(),
            state: StateFile::new(&state_dir),
            open_stream,
            status,
            requests: tokio::sync::Mutex::new(requests),
            request_sender,
            fence: Default::default(),
        };
        if let Ok(state) = source.load_state() {
            source.status.show_snapshots(&state.snapshots);
            *source.status.tables.lock() = state.tables;
        }
        source
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    pub fn snapshots(&self) -> SnapshotSender {
        self.request_sender.clone()
    }

    /// Captures changes until `shutdown` turns true, reconnecting after errors with backoff
    /// (up to 30 s); stops for good on a fault that needs the user.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        run_sessions(&self, &self.name, &self.status, shutdown).await;
        if let Err(e) = self.state.flush() {
            tracing::warn!(source = self.name, error = %e, "source state not saved at shutdown");
        }
    }

    fn load_state(&self) -> anyhow::Result<State> {
        self.state.load()
    }

    fn save_state(&self, s: &State) -> anyhow::Result<()> {
        self.state.save(s)
    }

    /// Checks the server's binlog settings: anything else loses or garbles changes.
    async fn check_server(&self, conn: &mut Conn) -> Result<(), Stop> {
        let vars: Vec<(String, String)> =
            conn.query("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin', 'binlog_format', 'binlog_row_image', 'binlog_row_metadata')").await?;
        let get = |k: &str| vars.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.to_ascii_uppercase());
        let want = [("log_bin", "ON"), ("binlog_format", "ROW"), ("binlog_row_image", "FULL"), ("binlog_row_metadata", "FULL")];
        for (k, v) in want {
            let got = get(k).unwrap_or_else(|| "(not supported by this server)".into());
            if got != v {
                return Err(Stop::Fatal(format!(
                    "source {}: the server has {k} = {got}; change data capture needs {k} = {v} (set it in the server's configuration; MySQL 8 or MariaDB 10.5 and later)",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// Why a MySQL server cannot be snapshotted without a watermark table.
    fn no_snapshots(&self) -> String {
        format!(
            "source {}: snapshots on MySQL need a watermark table: MySQL does not report the binlog position of a consistent read, \
             which MariaDB 10.5+ and Percona Server do. Set watermark_table (e.g. sluice_watermark) on the source; until then it \
             streams changes only",
            self.name
        )
    }

    /// Makes sure snapshots can use the watermark table: None if so, else why not (the
    /// source streams on without snapshots).
    async fn watermarks_refused(&self, conn: &mut Conn, w: &(String, String)) -> Result<Option<String>, Stop> {
        if let Err(e) = snapshot::ensure_watermark_table(conn, w).await {
            return Ok(Some(format!("source {}: no snapshots: {e:#}", self.name)));
        }
        // MySQL can be told to commit a group's transactions to InnoDB out of binlog order:
        // then a low watermark's commit does not show the transactions before it.
        let order: Vec<(String, String)> = conn.query("SHOW GLOBAL VARIABLES LIKE 'binlog_order_commits'").await?;
        if order.first().is_some_and(|(_, v)| v.eq_ignore_ascii_case("OFF")) {
            return Ok(Some(format!(
                "source {}: no snapshots: the server has binlog_order_commits = OFF; snapshots with watermarks need it ON (the default)",
                self.name
            )));
        }
        Ok(None)
    }

    /// Drops the first queued snapshot: its table is gone (or its key changed).
    fn skip_snapshot(&self, state: &mut State) -> Result<(), Stop> {
        let t = state.snapshots.remove(0);
        tracing::warn!(source = self.name, table = t.table, "snapshot skipped: the table does not exist (any more), or its primary key changed");
        self.save_state(state)?;
        self.status.show_snapshots(&state.snapshots);
        Ok(())
    }

    /// The server's current binlog file and offset.
    async fn current_position(&self, conn: &mut Conn) -> Result<(String, u64), Stop> {
        // MySQL 8.4 renamed the statement.
        let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
            Ok(r) => r,
            Err(_) => conn.query_first("SHOW BINARY LOG STATUS").await?,
        };
        let row = row.ok_or_else(|| Stop::Fatal(format!("source {}: the server reports no binlog position (is log_bin on?)", self.name)))?;
        let file: String = row.get(0).ok_or_else(|| anyhow::anyhow!("SHOW MASTER STATUS: no file"))?;
        let pos: u64 = row.get(1).ok_or_else(|| anyhow::anyhow!("SHOW MASTER STATUS: no position"))?;
        Ok((file, pos))
    }

    /// Queues snapshots of the tables a request names (all captured tables with a primary
    /// key when it names none).
    async fn queue_snapshots(&self, conn: &mut Conn, state: &mut State, req: &SnapshotRequest) -> Result<Json, String> {
        let home = self.cfg.home();
        let tables: Vec<(String, String)> = match &req.table {
            Some(t) => {
                let (db, name) = t.split_once('.').unwrap_or((home.as_str(), t.as_str()));
                if !self.cfg.captures(db, name) {
                    return Err(format!("table {db}.{name} is not captured by source {} (see its tables: include/exclude)", self.name));
                }
                vec![(db.to_string(), name.to_string())]
            }
            None => snapshot::all_tables(conn).await.map_err(|e| e.to_string())?.into_iter().filter(|(d, t)| self.cfg.captures(d, t)).collect(),
        };
        let mut queued = Vec::new();
        for (db, name) in tables {
            let info = snapshot::table_info(conn, &db, &name).await.map_err(|e| e.to_string())?;
            let Some(info) = info else {
                return Err(format!("table {db}.{name} does not exist"));
            };
            if info.keys.is_empty() {
                if req.table.is_some() {
                    return Err(format!("table {db}.{name} has no primary key: it cannot be snapshotted in chunks (or mirrored)"));
                }
                tracing::warn!(source = self.name, "table {db}.{name} has no primary key: not snapshotted");
                continue;
            }
            if !req.keys.is_empty() {
                crate::snapshot_keys(&format!("{db}.{name}"), &info.key_names(), &req.keys)?;
            }
            state.next_snapshot += 1;
            let task = SnapshotTask {
                id: state.next_snapshot,
                table: format!("{db}.{name}"),
                keys: (!req.keys.is_empty()).then(|| req.keys.clone()),
                after: None,
                cursor: None,
                rows: 0,
                chunks: 0,
                started_ms: sluice_core::time::now_ms(),
            };
            queued.push(task.to_json("queued"));
            state.snapshots.push(task);
        }
        self.save_state(state).map_err(|e| format!("{e:#}"))?;
        self.status.show_snapshots(&state.snapshots);
        tracing::info!(source = self.name, snapshots = queued.len(), "snapshots queued");
        Ok(json!({"source": self.name, "snapshots": queued}))
    }
}

impl Session for MysqlSource {
    /// One connection's life: check the server, then stream the binlog from the saved
    /// position.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Stop> {
        let url = self.cfg.url.replacen("mariadb://", "mysql://", 1);
        let opts = Opts::from_url(&url).map_err(|e| Stop::Fatal(format!("source {}: url: {e}", self.name)))?;
        let mut conn = Conn::new(opts.clone()).await?;
        self.check_server(&mut conn).await?;
        // Snapshot reads print TIMESTAMPs in UTC (see `types`) and see one consistent state.
        conn.query_drop("SET time_zone = '+00:00'").await?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ").await?;
        let mut state = self.load_state()?;
        // Chunks are read between watermarks when the source has a watermark table, else at
        // the consistent read's binlog position that MariaDB (and Percona Server) report;
        // MySQL does not.
        let watermarks = self.cfg.watermark();
        let refusal = match &watermarks {
            Some(w) => self.watermarks_refused(&mut conn, w).await?,
            None => {
                let reported: Vec<(String, String)> = conn.query("SHOW GLOBAL STATUS LIKE 'binlog_snapshot_file'").await?;
                reported.is_empty().then(|| self.no_snapshots())
            }
        };
        if let Some(why) = &refusal {
            tracing::warn!(source = self.name, "{why}");
        }
        if refusal.is_some() && !state.snapshots.is_empty() {
            let tables: Vec<String> = state.snapshots.drain(..).map(|t| t.table).collect();
            tracing::warn!(source = self.name, ?tables, "dropped the queued snapshots (see above)");
            self.save_state(&state)?;
            self.status.show_snapshots(&state.snapshots);
        }
        match &state.binlog_file {
            None => {
                let (file, pos) = self.current_position(&mut conn).await?;
                tracing::info!(source = self.name, file, pos, "first start: capturing from the current binlog position");
                state.binlog_file = Some(file);
                state.binlog_pos = pos;
                self.save_state(&state)?;
                if self.cfg.snapshot == "initial" {
                    if refusal.is_none() {
                        self.queue_snapshots(&mut conn, &mut state, &SnapshotRequest::default())
                            .await
                            .map_err(|e| Stop::Retry(anyhow::anyhow!("initial snapshot: {e}")))?;
                    } else {
                        tracing::warn!(source = self.name, "no initial snapshot (see above)");
                    }
                }
            }
            Some(file) => {
                let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await?;
                let names: Vec<String> = logs.iter().filter_map(|r| r.get::<String, _>(0)).collect();
                if !names.contains(file) {
                    return Err(self.purged(file));
                }
            }
        }

        // From here on, writes of an earlier session are refused: the log's positions read
        // next stay true.
        let mut writes: Writes<Landed> = Writes::new(&self.fence);
        // What the log already holds, per partition.
        let mut streams: HashMap<String, Arc<Stream>> = HashMap::new();
        let mut written: HashMap<(String, u32), Position> = HashMap::new();
        for (table, stream) in &state.tables {
            let s = (self.open_stream)(stream, self.cfg.partitions)?;
            for p in s.partitions() {
                if let Some(pos) = held_position(p).await? {
                    written.insert((stream.clone(), p.id()), pos);
                }
            }
            self.status.tables.lock().insert(table.clone(), stream.clone());
            streams.insert(stream.clone(), s);
        }

        let mut cur_file = state.binlog_file.clone().unwrap_or_default();
        let mut file_no = file_number(&cur_file).ok_or_else(|| Stop::Fatal(format!("binlog file name {cur_file:?} has no sequence number")))?;
        let mut cur_pos = state.binlog_pos;
        let checksum: Option<String> = conn.query_first("SELECT @@GLOBAL.binlog_checksum").await.unwrap_or(None);
        let checksums = checksum.is_some_and(|c| !c.eq_ignore_ascii_case("NONE"));
        let mut bconn = Conn::new(opts.clone()).await?;
        // Real GTID events instead of BEGIN (MariaDB; a plain user variable elsewhere).
        bconn.query_drop("SET @mariadb_slave_capability = 4").await?;
        let request = BinlogStreamRequest::new(self.cfg.server_id(&self.name)).with_filename(cur_file.as_bytes()).with_pos(cur_pos);
        let mut binlog = bconn.get_binlog_stream(request).await.map_err(|e| self.binlog_error(e, &cur_file))?;
        self.status.set_state("streaming");
        self.status.set_error(None);
        self.status.confirmed_lsn.store(position(file_no, cur_pos), Ordering::Relaxed);
        tracing::info!(source = self.name, file = cur_file, pos = cur_pos, "streaming changes");

        let mut shapes: HashMap<u64, Arc<Shape>> = HashMap::new();
        let mut warned: std::collections::HashSet<(String, String)> = Default::default();
        let mut txn: Option<Txn> = None;
        // Room for one row event's change events: as much as the last took (see `Out::flush`).
        let mut event_room = 0usize;
        let mut pending = Pending::default();
        let mut last_commit: Option<(String, u64)> = None;
        let mut chunk: Option<Chunk> = None;
        let mut last_chunk = std::time::Instant::now() - self.cfg.snapshot_throttle.0;
        let mut requests = self.requests.lock().await;
        let conn = Arc::new(tokio::sync::Mutex::new(conn));
        let reader = ReadAhead { source: self.name.clone(), home: self.cfg.home(), chunk_rows: self.cfg.snapshot_chunk, conn: conn.clone() };
        let mut reading: Option<Reading> = None;
        let mut window: Option<Window> = None;
        // The last chunk's position and the sequence number after its rows.
        let mut last_read: Option<(u64, u64)> = None;
        let mut mariadb_gtid_pending: Option<String> = None;
        let mut seen_fde = false;
        // Timers made once, not per event (re-arming one per event costs more than the event).
        let gather = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(gather);
        let mut gathering = false;
        let mut positions = Positions::default();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(60), Duration::from_secs(60));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A chunk read between watermarks lands after its high watermark's transaction.
            if txn.is_none() && window.as_ref().is_some_and(|w| w.high.is_some() && w.done.is_some()) {
                let w = window.take().expect("checked");
                // Unless it is the last, the next chunk's watermarks and read start now, while
                // this one's events are built and written (its low watermark is past this
                // one's high watermark in the binlog).
                let next = watermarks.as_ref().zip(w.done.as_ref()).filter(|(_, d)| {
                    !w.stale && self.cfg.snapshot_throttle.0.is_zero() && state.snapshots[0].keys.is_none() && d.rows.len() >= d.limit
                });
                if let Some((wm, d)) = next {
                    window = Some(reader.start_window(&state, wm, last_key(&d.info, &d.rows)));
                }
                chunk = w.into_chunk(&self.name);
            }
            // A chunk lands when the stream passes its place, between transactions.
            if txn.is_none() && chunk.as_ref().is_some_and(|c| position(file_no, cur_pos) > c.place) {
                // The writes before it land first: the chunk's progress (in `state` from
                // here) is saved only once its rows are durable.
                self.drain(&mut writes, &mut state).await?;
                let mut c = chunk.take().expect("checked");
                let place = c.place;
                let finished = c.len < c.limit || state.snapshots[0].keys.is_some();
                // (The next snapshot's chunks go to another stream: their numbers start at 0.)
                last_read = (!finished).then_some((place, c.base + c.len as u64));
                if !finished && self.cfg.snapshot_throttle.0.is_zero() && watermarks.is_none() {
                    // The next chunk is read while this one's events are finished and written
                    // (a chunk between watermarks started the next at its high watermark, above).
                    reading = Some(reader.start(&state, last_read, c.last_key.clone()));
                }
                let built = (&mut c.built).await.map_err(|e| anyhow::anyhow!("snapshot chunk: {e}"))?;
                let next_seq = self.land_chunk(c, built, &mut state, &mut streams, &written, &mut pending)?;
                last_read = last_read.map(|(place, _)| (place, next_seq));
                self.write(&mut pending, &mut written, &mut writes, &mut state, &last_commit).await?;
                self.drain(&mut writes, &mut state).await?;
                self.chunk_done(&mut state, finished)?;
                last_chunk = std::time::Instant::now();
            }
            if chunk.is_none() && reading.is_none() && window.is_none() && txn.is_none() && !state.snapshots.is_empty() && last_chunk.elapsed() >= self.cfg.snapshot_throttle.0 {
                match &watermarks {
                    Some(w) => window = Some(reader.start_window(&state, w, None)),
                    None => reading = Some(reader.start(&state, last_read, None)),
                }
            }
            let throttled = chunk.is_none() && reading.is_none() && window.is_none() && !state.snapshots.is_empty();
            // Past a high watermark, between transactions: the stream waits for the chunk's rows.
            let awaiting_rows = txn.is_none() && window.as_ref().is_some_and(|w| w.high.is_some());
            // With changes pending, gather what arrives with them into one write, for at most
            // 5 ms; the rest waits until they are written.
            let idle = pending.is_empty();
            if idle {
                gathering = false;
            } else if !gathering {
                gather.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(5));
                gathering = true;
            }
            let ev = tokio::select! {
                // Not while a chunk is read: the stream must not pass the chunk's position
                // before its rows are in place (the read's position is at or after the
                // stream's when the read starts).
                ev = binlog.next(), if reading.is_none() && !awaiting_rows => ev,
                read = async { reading.as_mut().expect("checked").await }, if reading.is_some() => {
                    reading = None;
                    match read.map_err(|e| anyhow::anyhow!("snapshot read: {e}"))?? {
                        Some(c) => chunk = Some(c),
                        None => self.skip_snapshot(&mut state)?,
                    }
                    continue;
                }
                read = async { (&mut window.as_mut().expect("checked").read).await }, if window.as_ref().is_some_and(|w| w.done.is_none()) => {
                    match read.map_err(|e| anyhow::anyhow!("snapshot read: {e}"))?? {
                        Some(r) => window.as_mut().expect("checked").done = Some(r),
                        None => {
                            window = None;
                            self.skip_snapshot(&mut state)?;
                        }
                    }
                    continue;
                }
                Some(l) = writes.next(), if !writes.is_empty() => {
                    self.landed(l?, &mut state)?;
                    continue;
                }
                _ = &mut gather, if gathering => {
                    self.write(&mut pending, &mut written, &mut writes, &mut state, &last_commit).await?;
                    continue;
                }
                Some((req, reply)) = requests.recv(), if idle => {
                    let queued = match &refusal {
                        None => self.queue_snapshots(&mut *conn.lock().await, &mut state, &req).await,
                        Some(why) => Err(why.clone()),
                    };
                    let _ = reply.send(queued);
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)), if idle && throttled => continue,
                // Keeps the query connection alive through long quiet spells.
                _ = ping.tick(), if idle => {
                    if let Some(w) = window.as_ref().filter(|w| w.done.is_some() && w.high.is_none()) {
                        tracing::warn!(
                            source = self.name,
                            "a snapshot chunk's high watermark has not come through the binlog for {:?}: is the watermark table's database left out of the binlog (binlog_do_db, binlog_ignore_db)?",
                            w.started.elapsed()
                        );
                    }
                    conn.lock().await.ping().await?;
                    continue;
                }
                _ = shutdown.changed(), if idle => {
                    if let Some(w) = window.take() {
                        w.read.abort();
                    }
                    self.drain(&mut writes, &mut state).await?;
                    return Ok(());
                }
            };
            let ev = match ev {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => return Err(self.binlog_error(e, &cur_file)),
                None => return Err(Stop::Retry(anyhow::anyhow!("the server ended the binlog stream"))),
            };
            let hdr = ev.header();
            let (start, end) = positions.of(hdr.log_pos(), hdr.event_size()).map_err(|(start, _)| {
                Stop::Fatal(format!(
                    "source {}: the compressed transaction at {cur_file}:{start} came without its changes (the client library could not decompress it); stopped rather than lose them",
                    self.name
                ))
            })?;
            // MariaDB's compressed events (log_bin_compress = ON) are read as the events they compress.
            let inflated;
            let ev = if compressed::is_compressed(hdr.event_type_raw()) {
                inflated = compressed::inflate(&ev).map_err(|e| Stop::Fatal(format!("source {}: binlog event at {cur_file}:{start}: {e}", self.name)))?;
                &inflated
            } else {
                &ev
            };
            let data = ev.read_data().map_err(|e| anyhow::anyhow!("binlog event at {cur_file}:{start}: {e}"))?;
            let mut commit = false;
            match data {
                Some(EventData::RotateEvent(r)) => {
                    // The rotate the server sends first comes before the format description,
                    // so the reader does not know yet to cut off a checksum: MariaDB sends
                    // one, MySQL does not (its first rotate is made before it reads the file).
                    let raw = r.name_raw();
                    let raw = if !seen_fde && checksums && ends_in_checksum(ev) { &raw[..raw.len().saturating_sub(4)] } else { raw };
                    cur_file = String::from_utf8_lossy(raw).into_owned();
                    file_no = file_number(&cur_file).ok_or_else(|| Stop::Fatal(format!("binlog file name {cur_file:?} has no sequence number")))?;
                    cur_pos = r.position();
                    continue;
                }
                Some(EventData::GtidEvent(g)) => {
                    let sid = g.sid();
                    let uuid = sid.iter().map(|b| format!("{b:02x}")).collect::<String>();
                    let u = format!("{}-{}-{}-{}-{}", &uuid[..8], &uuid[8..12], &uuid[12..16], &uuid[16..20], &uuid[20..]);
                    mariadb_gtid_pending = Some(format!("{u}:{}", g.gno()));
                }
                None if hdr.event_type_raw() == MARIADB_GTID_EVENT => {
                    let d = ev.data();
                    if d.len() >= 13 {
                        let seq = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
                        let domain = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
                        let standalone = d[12] & 1 != 0;
                        let gtid = format!("{domain}-{}-{seq}", hdr.server_id());
                        txn = Some(Txn {
                            pos: position(file_no, start),
                            gtid: Some(gtid),
                            commit_time_ms: hdr.timestamp() as i64 * 1000,
                            seq: 0,
                            explicit: !standalone,
                        });
                    }
                }
                Some(EventData::QueryEvent(q)) => {
                    let sql = q.query();
                    let word = first_word(&sql);
                    if word == "BEGIN" {
                        if txn.is_none() {
                            txn = Some(Txn {
                                pos: position(file_no, start),
                                gtid: mariadb_gtid_pending.take(),
                                commit_time_ms: hdr.timestamp() as i64 * 1000,
                                seq: 0,
                                explicit: true,
                            });
                        }
                    } else if word == "COMMIT" || word == "ROLLBACK" {
                        commit = true;
                    } else {
                        // A statement logged as such: DDL. Its own transaction unless inside one.
                        let t = txn.get_or_insert_with(|| Txn {
                            pos: position(file_no, start),
                            gtid: mariadb_gtid_pending.take(),
                            commit_time_ms: hdr.timestamp() as i64 * 1000,
                            seq: 0,
                            explicit: false,
                        });
                        if let Some((db, table)) = truncated_table(&sql, &q.schema()) {
                            if let Some(w) = window.as_mut().filter(|w| w.covers(&db, &table)) {
                                w.stale = true;
                            }
                            if self.cfg.captures(&db, &table) {
                                let stream = self.stream_for(&db, &table, &mut streams, &mut state)?;
                                let event = self.event(&db, &table, "truncate", None, None, Json::Null, t, &cur_file, start);
                                let value = bytes::Bytes::from(event.to_string());
                                for p in 0..stream.partitions().len() as u32 {
                                    pending.push(&stream, p, (t.pos, t.seq), Record::new(value.clone(), t.commit_time_ms));
                                }
                                t.seq += 1;
                                self.status.changes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        commit = !t.explicit;
                    }
                }
                Some(EventData::TransactionPayloadEvent(_)) => {
                    positions.payload((start, end));
                    continue;
                }
                Some(EventData::TableMapEvent(t)) => {
                    let shape = Shape::of(&t).map_err(|m| Stop::Fatal(format!("source {}: {m}", self.name)))?;
                    for (name, kind) in shape.names.iter().zip(&shape.kinds) {
                        if let Kind::Unsupported(ty) = kind {
                            if warned.insert((format!("{}.{}", shape.db, shape.table), name.clone())) {
                                tracing::warn!(
                                    source = self.name,
                                    "column {}.{}.{name} has type {ty}, which Sluice does not map: its values are kept as \\x… text",
                                    shape.db,
                                    shape.table
                                );
                            }
                        }
                    }
                    shapes.insert(t.table_id(), Arc::new(shape));
                }
                Some(EventData::RowsEvent(r)) => {
                    let shape =
                        shapes.get(&r.table_id()).cloned().ok_or_else(|| anyhow::anyhow!("a row event for table id {} before its table map", r.table_id()))?;
                    if watermarks.as_ref().is_some_and(|(d, t)| *d == shape.db && *t == shape.table) {
                        // A watermark: opens or closes the window of the chunk being read.
                        if let Some(w) = window.as_mut() {
                            let tme = binlog.get_tme(r.table_id()).ok_or_else(|| anyhow::anyhow!("no table map for table id {}", r.table_id()))?;
                            let pos = txn.as_ref().map_or(position(file_no, start), |t| t.pos);
                            let col = shape.names.iter().position(|n| n == "mark");
                            for row in r.rows(tme) {
                                let (_, after) = row.map_err(|e| anyhow::anyhow!("watermark row: {e}"))?;
                                if let Some(BinlogValue::Value(mysql_async::Value::Bytes(b))) = after.as_ref().zip(col).and_then(|(a, c)| a.as_ref(c)) {
                                    w.mark(&String::from_utf8_lossy(b), pos);
                                }
                            }
                        }
                    } else if self.cfg.captures(&shape.db, &shape.table) {
                        let tme = binlog.get_tme(r.table_id()).ok_or_else(|| anyhow::anyhow!("no table map for table id {}", r.table_id()))?;
                        // Changes in a snapshot chunk's window: their keys leave the chunk.
                        let mut window = window.as_mut().filter(|w| w.covers(&shape.db, &shape.table));
                        let op = match &r {
                            RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => "insert",
                            RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => "delete",
                            _ => "update",
                        };
                        let t = txn.get_or_insert_with(|| Txn {
                            pos: position(file_no, start),
                            gtid: mariadb_gtid_pending.take(),
                            commit_time_ms: hdr.timestamp() as i64 * 1000,
                            seq: 0,
                            explicit: true,
                        });
                        let stream = self.stream_for(&shape.db, &shape.table, &mut streams, &mut state)?;
                        let bad_row = |e: std::io::Error| anyhow::anyhow!("row event of {}.{}: {e}", shape.db, shape.table);
                        // Shared by this row event's change events.
                        let now = sluice_core::time::now_ms();
                        let tails = Tails::new(&shape, &self.name, op, t, &cur_file, start);
                        let mut out = Out { shape: &shape, tails: &tails, now, stream: &stream, pending: &mut pending, window: window.as_deref_mut(), keys: Default::default(), text: Vec::with_capacity(event_room), written: Vec::new(), room: 0 };
                        if shape.reads_directly(&r) {
                            let (has_before, has_after) = (r.columns_before_image().is_some(), r.columns_after_image().is_some());
                            let data: &[u8] = r.rows_data();
                            let mut buf = ParseBuf(data);
                            let (mut before, mut after) = (Vec::new(), Vec::new());
                            while !buf.is_empty() {
                                if has_before {
                                    shape.read_image(&mut buf, &mut before).map_err(bad_row)?;
                                }
                                if has_after {
                                    shape.read_image(&mut buf, &mut after).map_err(bad_row)?;
                                }
                                out.row(t, has_before.then_some(&before[..]), has_after.then_some(&after[..]));
                                self.status.changes.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            let partial = matches!(r, RowsEventData::PartialUpdateRowsEvent(_));
                            for row in r.rows(tme) {
                                let (mut before, mut after) = row.map_err(bad_row)?;
                                before.iter_mut().chain(after.iter_mut()).for_each(signed_int24);
                                if let Some(a) = after.as_mut().filter(|_| partial) {
                                    whole_json_documents(&shape, before.as_ref(), a).map_err(|e| Stop::Fatal(format!("source {}: {e}", self.name)))?;
                                }
                                if before.iter().chain(&after).all(|r| shape.fits(r)) {
                                    out.row(t, before.as_ref(), after.as_ref());
                                } else {
                                    let before = before.map(|b| shape.row(&b));
                                    let after = after.map(|a| shape.row(&a));
                                    let (bk, ak) = (before.as_ref().map(|b| shape.key(b)), after.as_ref().map(|a| shape.key(a)));
                                    let emit = |op: &str, before: Option<Json>, after: Option<Json>, key: Json, t: &mut Txn, out: &mut Out<'_>| {
                                        let event = self.event(&shape.db, &shape.table, op, before, after, key.clone(), t, &cur_file, start);
                                        out.push(t, bytes::Bytes::from(event.to_string()), (!key.is_null()).then(|| key.to_string()));
                                    };
                                    match (bk, ak) {
                                        // A row moved to another key: a delete of the old, an insert of the new.
                                        (Some(bk), Some(ak)) if !bk.is_null() && bk != ak => {
                                            emit("delete", before, None, bk, t, &mut out);
                                            emit("insert", None, after, ak, t, &mut out);
                                        }
                                        (bk, ak) => emit(op, before, after, ak.or(bk).unwrap_or(Json::Null), t, &mut out),
                                    }
                                }
                                self.status.changes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        event_room = out.flush(t).max(event_room / 2);
                        if pending.records >= GROUP_RECORDS {
                            self.write(&mut pending, &mut written, &mut writes, &mut state, &last_commit).await?;
                        }
                    }
                }
                Some(EventData::XidEvent(_)) => commit = true,
                Some(EventData::FormatDescriptionEvent(_)) => seen_fde = true,
                _ => {}
            }
            if end != 0 {
                cur_pos = end;
            }
            if commit {
                txn = None;
                mariadb_gtid_pending = None;
                let at = position(file_no, cur_pos);
                pending.commit_end = Some(at);
                last_commit = Some((cur_file.clone(), cur_pos));
                self.status.transactions.fetch_add(1, Ordering::Relaxed);
                self.status.received_lsn.fetch_max(at, Ordering::Relaxed);
                if pending.records >= GROUP_RECORDS {
                    self.write(&mut pending, &mut written, &mut writes, &mut state, &last_commit).await?;
                }
            }
        }
    }
}

impl MysqlSource {
    /// The error for a binlog position the server no longer has, else a retry.
    fn binlog_error(&self, e: mysql_async::Error, file: &str) -> Stop {
        if let mysql_async::Error::Server(s) = &e {
            if s.code == ER_MASTER_FATAL_ERROR_READING_BINLOG {
                return self.purged(&format!("{file} ({})", s.message));
            }
        }
        Stop::Retry(anyhow::anyhow!("binlog stream: {e}"))
    }

    fn purged(&self, file: &str) -> Stop {
        Stop::Fatal(format!(
            "source {}: the server no longer has the binlog Sluice needs next ({file}): it was purged (see binlog_expire_logs_seconds / expire_logs_days), and the changes in it are lost to Sluice. \
             Remove {} to start over from the current position, then take a snapshot (sluice snapshot {})",
            self.name,
            self.state.path().display(),
            self.name
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn event(&self, db: &str, table: &str, op: &str, before: Option<Json>, after: Option<Json>, key: Json, t: &Txn, file: &str, pos: u64) -> Json {
        event(&self.name, db, table, op, before, after, key, t, file, pos, sluice_core::time::now_ms())
    }


    /// Starts writing the pending changes (skipping what the log already holds) while the
    /// binlog is read on; once they are durable, [`MysqlSource::landed`] saves the position
    /// after the last whole transaction among them. At most [`MAX_INFLIGHT`] writes run.
    async fn write(
        &self,
        pending: &mut Pending,
        written: &mut HashMap<(String, u32), Position>,
        writes: &mut Writes<Landed>,
        state: &mut State,
        last_commit: &Option<(String, u64)>,
    ) -> Result<(), Stop> {
        let at = last_commit.clone();
        writes.push(&self.name, pending, written, move |confirm| Landed { confirm, at })?;
        while writes.len() > MAX_INFLIGHT {
            let Some(l) = writes.next().await else { break };
            self.landed(l?, state)?;
        }
        Ok(())
    }

    /// Waits for every write in flight to be durable.
    async fn drain(&self, writes: &mut Writes<Landed>, state: &mut State) -> Result<(), Stop> {
        while let Some(l) = writes.next().await {
            self.landed(l?, state)?;
        }
        Ok(())
    }

    /// A write is durable: the binlog position after it is saved and confirmed.
    fn landed(&self, l: Landed, state: &mut State) -> Result<(), Stop> {
        if let (Some(end), Some((file, pos))) = (l.confirm, l.at) {
            state.binlog_file = Some(file);
            state.binlog_pos = pos;
            // A restart before this is on disk reads the binlog from an earlier position
            // and the log drops what it already holds (see `state_file`).
            self.state.save_later(state)?;
            self.status.confirmed_lsn.store(end, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The stream of a table, opened (and remembered in the state) on its first change.
    fn stream_for(&self, db: &str, table_name: &str, streams: &mut HashMap<String, Arc<Stream>>, state: &mut State) -> anyhow::Result<Arc<Stream>> {
        let table = format!("{db}.{table_name}");
        let name = table_stream_in(&self.name, &self.cfg.home(), db, table_name);
        if let Some(s) = streams.get(&name) {
            return Ok(s.clone());
        }
        if state.tables.get(&table) != Some(&name) {
            state.tables.insert(table.clone(), name.clone());
            self.save_state(state)?;
        }
        self.status.tables.lock().insert(table, name.clone());
        let s = (self.open_stream)(&name, self.cfg.partitions)?;
        streams.insert(name, s.clone());
        Ok(s)
    }

    /// The chunk's rows as `read` events at its place (after every transaction before the
    /// position its rows are as of, before every one after it), but for keys changed
    /// between its watermarks. Returns the sequence number after its rows.
    fn land_chunk(
        &self,
        c: Chunk,
        Built { info, rows, records }: Built,
        state: &mut State,
        streams: &mut HashMap<String, Arc<Stream>>,
        written: &HashMap<(String, u32), Position>,
        pending: &mut Pending,
    ) -> Result<u64, Stop> {
        let stream = self.stream_for(&info.db, &info.name, streams, state)?;
        let at = c.place;
        // Chunks read with no binlog event in between share their position: their sequence
        // numbers go on from the last chunk's, so the log's de-duplication keeps them apart.
        let base = written.iter().filter(|((s, _), (pos, _))| s == stream.name() && *pos == at).map(|(_, (_, seq))| seq + 1).max().unwrap_or(0);
        let records = if base == c.base {
            records
        } else {
            tracing::debug!(source = self.name, base, read_with = c.base, "snapshot events written again with other sequence numbers");
            read_events(&self.name, &info, &rows, c.place, base)
        };
        for (i, r) in records.into_iter().enumerate() {
            let k = r.key.as_deref().expect("read events are keyed");
            if !c.changed.is_empty() && c.changed.contains(std::str::from_utf8(k).expect("JSON text is UTF-8")) {
                // Changed between the watermarks: the change event is as new or newer.
                continue;
            }
            let p = stream.partition_for_key(k);
            pending.push(&stream, p, (at, base + i as u64), r);
        }
        let task = &mut state.snapshots[0];
        debug_assert_eq!(task.id, c.task);
        task.rows += rows.len() as u64;
        task.chunks += 1;
        if let Some(k) = c.last_key {
            task.after = Some(k);
        }
        Ok(base + rows.len() as u64)
    }

    fn chunk_done(&self, state: &mut State, finished: bool) -> Result<(), Stop> {
        if finished {
            let t = state.snapshots.remove(0);
            self.save_state(state)?;
            tracing::info!(source = self.name, table = t.table, rows = t.rows, "snapshot finished");
            self.status.snapshot_finished(&t);
        } else {
            self.state.save_later(state)?;
        }
        self.status.show_snapshots(&state.snapshots);
        Ok(())
    }
}

/// The first word of a statement, upper case, after comments.
fn first_word(sql: &str) -> String {
    let mut s = sql.trim_start();
    loop {
        if let Some(r) = s.strip_prefix("/*") {
            s = r.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else if s.starts_with("--") || s.starts_with('#') {
            s = s.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    s.split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("").to_ascii_uppercase()
}

/// `TRUNCATE [TABLE] [db.]t`: the table, with `default_db` when unqualified.
fn truncated_table(sql: &str, default_db: &str) -> Option<(String, String)> {
    if first_word(sql) != "TRUNCATE" {
        return None;
    }
    let rest = sql.trim_start();
    let rest = rest[rest.to_ascii_uppercase().find("TRUNCATE")? + 8..].trim_start();
    let rest = if rest.len() >= 5 && rest[..5].eq_ignore_ascii_case("TABLE") && rest[5..].starts_with(|c: char| c.is_whitespace()) {
        rest[5..].trim_start()
    } else {
        rest
    };
    let name = rest.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let parts: Vec<String> = split_ident(name);
    match parts.as_slice() {
        [t] => Some((default_db.to_string(), t.clone())),
        [d, t] => Some((d.clone(), t.clone())),
        _ => None,
    }
}

/// `a`.`b` or a.b → [a, b].
fn split_ident(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '`' if quoted && chars.peek() == Some(&'`') => {
                chars.next();
                cur.push('`');
            }
            '`' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c if !quoted && c.is_whitespace() => break,
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's first rotate event names the file with a checksum after it (MariaDB) or
    /// without (MySQL): only a real CRC32 is cut off, whatever the name's last bytes are.
    #[test]
    fn a_rotate_name_loses_only_a_real_checksum() {
        // timestamp 0, type 4 (rotate), server 1, size, log_pos 0, flags 0x20.
        let header = |size: u32| [&[0, 0, 0, 0, 4][..], &1u32.to_le_bytes(), &size.to_le_bytes(), &[0, 0, 0, 0, 0x20, 0]].concat();
        for name in ["binlog.000001", "mysql-bin.000042", "b.1234"] {
            let mut body = 4u64.to_le_bytes().to_vec();
            body.extend_from_slice(name.as_bytes());
            let size = 19 + body.len() as u32;
            // MySQL: no checksum; the name's last 4 bytes are not taken for one.
            assert!(!ends_in_crc(&header(size), &body), "{name}");
            // MariaDB: the CRC32 of header and body follows.
            let mut with = body.clone();
            with.extend_from_slice(&crc32fast::hash(&[header(size + 4), body.clone()].concat()).to_le_bytes());
            assert!(ends_in_crc(&header(size + 4), &with), "{name}");
            // A header that differs (another event size) does not match.
            assert!(!ends_in_crc(&header(size), &with), "{name}");
        }
    }

    #[test]
    fn written_events_are_the_values_text() {
        use mysql_async::binlog::value::BinlogValue;
        use mysql_async::consts::ColumnType;
        use mysql_async::{Column, Value};
        let names = ["zeta", "id", "Line \"2\"", "a"];
        let kinds = vec![Kind::Text, Kind::Int, Kind::Int, Kind::Decimal];
        let shape = Shape::new("shop".into(), "t \"q\"".into(), names.iter().map(|n| n.to_string()).collect(), kinds, vec![2, 1]);
        let columns: Arc<[Column]> = names.iter().map(|n| Column::new(ColumnType::MYSQL_TYPE_STRING).with_name(n.as_bytes())).collect();
        let row = |id: i64, z: &str| {
            let values = vec![Value::Bytes(z.as_bytes().to_vec()), Value::Int(id), Value::UInt(u64::MAX), Value::NULL];
            BinlogRow::new(values.into_iter().map(|v| Some(BinlogValue::Value(v))).collect(), columns.clone())
        };
        let (b, a) = (row(1, "z\n"), row(2, "é"));
        // The key is (Line "2", id): b and a differ in id, so an update from b to a moves the row.
        let mut scratch = Default::default();
        assert!(shape.key_moved(&b, &a, &mut scratch) && !shape.key_moved(&a, &row(2, "other"), &mut scratch));
        for gtid in [None, Some("0-1-7".to_string())] {
            let t = Txn { pos: position(3, 500), gtid, commit_time_ms: 1_767_607_200_123, seq: 4, explicit: true };
            for (op, before, after) in [("insert", None, Some(&a)), ("update", Some(&b), Some(&a)), ("delete", Some(&b), None)] {
                assert!(before.iter().chain(after.iter()).all(|r| shape.fits(r)));
                let mut text = Vec::new();
                let key = shape.write_event(before, after, &shape.tail("src", op, &t, "mysql-bin.000003", 500), t.seq, 99, &mut text);
                let (bj, aj) = (before.map(|r| shape.row(r)), after.map(|r| shape.row(r)));
                let kj = shape.key(aj.as_ref().or(bj.as_ref()).unwrap());
                let want = event("src", "shop", "t \"q\"", op, bj, aj, kj.clone(), &t, "mysql-bin.000003", 500, 99);
                assert_eq!(key.map(|k| String::from_utf8(text[k].to_vec()).unwrap()), Some(kj.to_string()));
                assert_eq!(String::from_utf8(text).unwrap(), want.to_string(), "{op}");
            }
        }
        // A row of other columns (not a FULL row image) takes the value path.
        let other: Arc<[Column]> = names[..3].iter().map(|n| Column::new(ColumnType::MYSQL_TYPE_STRING).with_name(n.as_bytes())).collect();
        assert!(!shape.fits(&BinlogRow::new(vec![None, None, None], other)));
    }

    #[test]
    fn rows_read_from_the_event_bytes_are_the_values_mysql_common_reads() {
        use mysql_async::{Column, Value};
        let names = ["id", "n", "s", "d", "b", "w"];
        let kinds = vec![Kind::Int, Kind::Int, Kind::Text, Kind::Float, Kind::Text, Kind::Text];
        let mut shape = Shape::new("shop".into(), "t".into(), names.iter().map(|n| n.to_string()).collect(), kinds, vec![0]);
        shape.codecs = vec![
            (ColumnType::MYSQL_TYPE_LONG, vec![], false),
            (ColumnType::MYSQL_TYPE_LONGLONG, vec![], true),
            (ColumnType::MYSQL_TYPE_VARCHAR, vec![100, 0], false),
            (ColumnType::MYSQL_TYPE_DOUBLE, vec![8], false),
            (ColumnType::MYSQL_TYPE_BLOB, vec![2], false),
            (ColumnType::MYSQL_TYPE_VARCHAR, vec![0x2c, 0x01], false),
        ];
        // Two images as an update row event holds them: NULL bitmap, then the non-NULL values
        // (a TEXT with a 2-byte length that is not UTF-8, a VARCHAR(300) with a 2-byte length).
        let mut bytes = vec![0b1000u8];
        bytes.extend((-5i32).to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        bytes.extend([3, 0xc3, 0xa9, b'"']);
        bytes.extend([2, 0, 0xff, b'a']);
        bytes.extend([4, 0, b'w', b'i', b'd', b'e']);
        bytes.push(0);
        bytes.extend(7i32.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.push(0);
        bytes.extend(1.5f64.to_le_bytes());
        bytes.extend([1, 0, b'x']);
        bytes.extend([0, 0]);
        let mut buf = ParseBuf(&bytes);
        let (mut before, mut after) = (Vec::new(), Vec::new());
        shape.read_image(&mut buf, &mut before).unwrap();
        shape.read_image(&mut buf, &mut after).unwrap();
        assert!(buf.is_empty());
        let values = |image: &[Cell<'_>]| image.iter().map(|v| match v {
            Cell::Value(BinlogValue::Value(v)) => v.clone(),
            Cell::Text(b) => Value::Bytes(b.to_vec()),
            Cell::Value(other) => panic!("{other:?}"),
        }).collect::<Vec<_>>();
        let text = |b: &[u8]| Value::Bytes(b.to_vec());
        assert_eq!(values(&before), vec![Value::Int(-5), Value::UInt(u64::MAX), text("é\"".as_bytes()), Value::NULL, text(&[0xff, b'a']), text(b"wide")]);
        assert_eq!(values(&after), vec![Value::Int(7), Value::Int(1), text(b""), Value::Double(1.5), text(b"x"), text(b"")]);
        // mysql_common reads the same values from these bytes.
        let mut again = ParseBuf(&bytes);
        for image in [&before, &after] {
            let nulls: &[u8] = again.parse(1).unwrap();
            for (i, (ty, meta, unsigned)) in shape.codecs.iter().enumerate() {
                let v: BinlogValue<'_> = if nulls[0] >> i & 1 == 1 { BinlogValue::Value(Value::NULL) } else { again.parse((*ty, meta.as_slice(), *unsigned, false)).unwrap() };
                assert_eq!(BinlogValue::Value(values(image)[i].clone()), v, "column {i}");
            }
        }
        assert!(again.is_empty());
        // The same event text as from mysql_common's rows of these values.
        let columns: Arc<[Column]> = names.iter().map(|n| Column::new(ColumnType::MYSQL_TYPE_STRING).with_name(n.as_bytes())).collect();
        let row = |image: &[Cell<'_>]| BinlogRow::new(values(image).into_iter().map(|v| Some(BinlogValue::Value(v))).collect(), columns.clone());
        let t = Txn { pos: position(3, 500), gtid: None, commit_time_ms: 1_767_607_200_123, seq: 0, explicit: true };
        let (mut direct, mut via_rows) = (Vec::new(), Vec::new());
        let tail = shape.tail("src", "update", &t, "f.000003", 500);
        let k1 = shape.write_event(Some(&before[..]), Some(&after[..]), &tail, t.seq, 9, &mut direct);
        let k2 = shape.write_event(Some(&row(&before)), Some(&row(&after)), &tail, t.seq, 9, &mut via_rows);
        let key = |k: Option<std::ops::Range<usize>>, text: &[u8]| k.map(|k| String::from_utf8(text[k].to_vec()).unwrap());
        assert_eq!((key(k1, &direct), key(k2, &via_rows)), (Some(r#"{"id":7}"#.to_string()), Some(r#"{"id":7}"#.to_string())));
        assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via_rows).unwrap());
        // A truncated image is an error, not a short row.
        let mut short = ParseBuf(&bytes[..7]);
        assert!(shape.read_image(&mut short, &mut before).is_err());
    }

    proptest::proptest! {
        /// Integers read from a row event's bytes are the values mysql_common reads, for every
        /// width and sign (a signed MEDIUMINT with its sign, which mysql_common drops).
        #[test]
        fn integers_are_read_as_mysql_common_reads_them(bytes in proptest::array::uniform8(proptest::prelude::any::<u8>()), unsigned: bool) {
            use ColumnType::*;
            for ty in [MYSQL_TYPE_TINY, MYSQL_TYPE_SHORT, MYSQL_TYPE_INT24, MYSQL_TYPE_LONG, MYSQL_TYPE_LONGLONG] {
                let width = int_width(ty).unwrap();
                let mut theirs: BinlogValue<'_> = ParseBuf(&bytes[..width]).parse((ty, &[][..], unsigned, false)).unwrap();
                if let (MYSQL_TYPE_INT24, false, BinlogValue::Value(mysql_async::Value::Int(x))) = (ty, unsigned, &mut theirs) {
                    // mysql_common leaves out the sign of a MEDIUMINT (`signed_int24`).
                    if *x >= 1 << 23 {
                        *x -= 1 << 24;
                    }
                }
                proptest::prop_assert_eq!(BinlogValue::Value(read_int(&bytes[..width], unsigned)), theirs, "{:?} unsigned={}", ty, unsigned);
            }
        }
    }

    #[test]
    fn signed_mediumints_read_by_mysql_common_get_their_sign() {
        use mysql_async::consts::ColumnFlags;
        use mysql_async::{Column, Value};
        let columns: Arc<[Column]> = vec![
            Column::new(ColumnType::MYSQL_TYPE_INT24),
            Column::new(ColumnType::MYSQL_TYPE_INT24).with_flags(ColumnFlags::UNSIGNED_FLAG),
            Column::new(ColumnType::MYSQL_TYPE_LONG),
            Column::new(ColumnType::MYSQL_TYPE_INT24),
        ]
        .into();
        let values = [Value::Int(16_777_215), Value::Int(16_777_215), Value::Int(16_777_215), Value::Int(8_388_607)];
        let mut row = BinlogRow::new(values.into_iter().map(|v| Some(BinlogValue::Value(v))).collect(), columns);
        signed_int24(&mut row);
        let got: Vec<_> = (0..4).map(|i| row.as_ref(i).cloned()).collect();
        let want = [-1, 16_777_215, 16_777_215, 8_388_607].map(|v| Some(BinlogValue::Value(Value::Int(v))));
        assert_eq!(got, want);
    }

    #[test]
    fn a_compressed_transactions_events_take_its_position_and_must_come() {
        let mut p = Positions::default();
        assert_eq!(p.of(500, 100), Ok((400, 500)));
        p.payload((500, 900));
        assert_eq!((p.of(0, 60), p.of(0, 80)), (Ok((500, 900)), Ok((500, 900))));
        assert_eq!(p.of(1000, 100), Ok((900, 1000)));
        // A payload whose events mysql_async dropped (it could not decompress it).
        p.payload((1000, 1400));
        assert_eq!(p.of(1500, 100), Err((1000, 1400)));
    }

    #[test]
    fn positions_order_across_files() {
        assert!(position(2, 4) > position(1, 4_000_000_000));
        assert_eq!(lsn_text(position(3, 0x1f4)), "3/1F4");
        assert_eq!(pgwire_replication::Lsn::parse("3/1F4").map(|l| l.as_u64()).ok(), Some(position(3, 0x1f4)));
        assert_eq!(file_number("mysql-bin.000042"), Some(42));
    }

    #[test]
    fn statements() {
        assert_eq!(first_word("/* x */ BEGIN"), "BEGIN");
        assert_eq!(first_word("truncate table t"), "TRUNCATE");
        assert_eq!(truncated_table("TRUNCATE TABLE `shop`.`orders`", "x"), Some(("shop".into(), "orders".into())));
        assert_eq!(truncated_table("truncate orders;", "shop"), Some(("shop".into(), "orders".into())));
        assert_eq!(truncated_table("ALTER TABLE t ADD c INT", "shop"), None);
    }
}
