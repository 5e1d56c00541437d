//! Mirror tables of change data capture: a stream of change events (the envelope of
//! `sluice-connect::postgres_cdc`) kept as a table equal to the source table, by primary key.
//!
//! How a flush is applied (by [`crate::sink::LakeSink`] with `mirror: true`):
//! - Its events are reduced to the last one per key (a key's changes are in one partition, in
//!   commit order). An update that did not carry some TOASTed columns takes them from an
//!   earlier event of the same flush when there is one; otherwise they are listed in
//!   `__unchanged` and keep the table's value.
//! - Every row carries `_lsn`, the commit position of its last change. A change applies only
//!   if it is not older than the row (`LakeTable::merge_by_key`), so applying a flush again
//!   after a crash, or a late change, never moves a row back in time.
//! - A truncate at position T = (commit LSN, sequence in its transaction) deletes the rows
//!   older than T and is remembered as the txns `sluice:truncate:<stream>` (the LSN) and
//!   `sluice:truncate-seq:<stream>` (the sequence); changes not newer than T arriving later
//!   (from other partitions) are dropped. So truncates need no ordering across partitions.
//!   The changes after a truncate in its own transaction (`TRUNCATE; INSERT ...` reloading a
//!   table) share its LSN and are kept: each row carries its change's sequence (`__seq`)
//!   until the merge.
//! - Events of tables without a primary key cannot be mirrored; they are counted and skipped
//!   (the changelog, when enabled, still has them).
//! - Snapshot events are stored as template fields (`sluice_log::Template`); the mirror reads
//!   them that way and makes their rows from the fields by a [`RowPlan`] found once per
//!   template, without scanning each event's JSON.

use arrow_array::{cast::AsArray, types::Int64Type, Array, BooleanArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::compute::{cast, concat_batches, filter_record_batch};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The column with the commit position of a row's last change.
pub const LSN_COLUMN: &str = "_lsn";

/// The txn app id that remembers a mirror table's last truncate.
pub fn truncate_app_id(stream: &str) -> String {
    format!("sluice:truncate:{stream}")
}

/// The txn app id that remembers the sequence of a mirror table's last truncate in its
/// transaction (tables whose truncate predates it: every change of that transaction is older).
pub fn truncate_seq_app_id(stream: &str) -> String {
    format!("sluice:truncate-seq:{stream}")
}

/// One flush of change events, reduced.
#[derive(Debug, Default)]
pub struct Reduced {
    /// Per key, in first-seen order: (partition, offset, log time, the row as JSON with
    /// `_lsn`, `__op` and maybe `__unchanged`).
    pub rows: Vec<(u32, u64, i64, Vec<u8>)>,
    /// The key columns (from the events' `key`).
    pub keys: Vec<String>,
    /// The newest truncate in the flush: (commit LSN, sequence).
    pub truncate: Option<(i64, i64)>,
    /// Events without a key, skipped.
    pub keyless: usize,
    /// Records that are not change events, skipped (with the first reason).
    pub invalid: Vec<(u32, u64, String)>,
}

/// `X/Y` (hex) as a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

/// The fields of a change event the mirror reads; the rest (`source`, `before`, ...) is
/// skipped, and `after` and `key` stay text.
#[derive(serde::Deserialize)]
struct Event<'a> {
    op: Option<&'a str>,
    #[serde(borrow)]
    after: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    key: Option<&'a serde_json::value::RawValue>,
    unchanged: Option<Vec<String>>,
    #[serde(borrow)]
    transaction: Option<Transaction<'a>>,
}

#[derive(serde::Deserialize)]
struct Transaction<'a> {
    lsn: Option<&'a str>,
    seq: Option<i64>,
}

/// What the mirror reads of one change event.
#[derive(Debug, PartialEq)]
struct Change<'a> {
    op: Option<&'a str>,
    /// `after` and `key` as JSON text.
    after: Option<&'a str>,
    key: Option<&'a str>,
    unchanged: Option<Vec<String>>,
    /// `transaction.lsn`
    lsn: Option<&'a str>,
    /// `transaction.seq` (0 when absent).
    seq: i64,
}

/// Reads a change event: by scanning its top level ([`scan_change`]), or, for an event that
/// scan does not take, with serde, which says what is wrong.
fn read_change(value: &[u8]) -> Result<Change<'_>, String> {
    match scan_change(value) {
        Some(c) => Ok(c),
        None => parse_change(value),
    }
}

/// Reads a change event with serde.
fn parse_change(value: &[u8]) -> Result<Change<'_>, String> {
    match serde_json::from_slice::<Event>(value) {
        Ok(ev) => Ok(Change {
            op: ev.op,
            after: ev.after.map(|a| a.get()),
            key: ev.key.map(|k| k.get()),
            unchanged: ev.unchanged,
            lsn: ev.transaction.as_ref().and_then(|t| t.lsn),
            seq: ev.transaction.and_then(|t| t.seq).unwrap_or(0),
        }),
        Err(e) if serde_json::from_slice::<serde::de::IgnoredAny>(value).is_err() => Err(format!("not JSON: {e}")),
        Err(e) => Err(format!("not a change event: {e}")),
    }
}

/// The fields the mirror reads, found by the validating scan ingest uses
/// ([`sluice_core::json_scan`]) instead of serde, whose pass over `after`, `before` and
/// `source` to skip them was the mirror's largest cost. `None` for what the scan declines and
/// for escapes or non-string values in `op` or `lsn`; [`read_change`] then hands the event to
/// serde.
fn scan_change(v: &[u8]) -> Option<Change<'_>> {
    use sluice_core::json_scan::scan_object;
    let [op, after, key, unchanged, transaction] =
        scan_object(v, [Some(b"op"), Some(b"after"), Some(b"key"), Some(b"unchanged"), Some(b"transaction")])?;
    let (lsn, seq) = match transaction {
        None | Some(b"null") => (None, 0),
        Some(t) => {
            let [lsn, seq] = scan_object(t, [Some(b"lsn"), Some(b"seq")])?;
            let seq = match seq {
                None | Some(b"null") => 0,
                Some(n) => std::str::from_utf8(n).ok()?.parse().ok()?,
            };
            (lsn, seq)
        }
    };
    let unchanged = match unchanged {
        None | Some(b"null") => None,
        Some(u) => Some(serde_json::from_slice::<Vec<String>>(u).ok()?),
    };
    Some(Change { op: plain_string(op)?, after: json_text(after)?, key: json_text(key)?, unchanged, lsn: plain_string(lsn)?, seq })
}

/// A JSON value as its text; absent or `null` is `Some(None)`.
fn json_text(v: Option<&[u8]>) -> Option<Option<&str>> {
    match v {
        None | Some(b"null") => Some(None),
        Some(v) => std::str::from_utf8(v).ok().map(Some),
    }
}

/// A string value without escapes, as its text; absent or `null` is `Some(None)`.
fn plain_string(v: Option<&[u8]>) -> Option<Option<&str>> {
    match v {
        None | Some(b"null") => Some(None),
        Some([b'"', s @ .., b'"']) if !s.contains(&b'\\') => std::str::from_utf8(s).ok().map(Some),
        Some(_) => None,
    }
}

/// A change event as the mirror gets it: its JSON text, or the fields of a templated record
/// (a snapshot's `read` events, see [`sluice_log::Template`]) with the plan for its row.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Whole(&'a [u8]),
    Fields(&'a [u8], &'a RowPlan),
}

impl<'a> From<&'a [u8]> for Input<'a> {
    fn from(v: &'a [u8]) -> Self {
        Input::Whole(v)
    }
}

/// How the mirror makes the row of an event from a template's fields without reading the
/// event's JSON (whose scan was most of landing a snapshot): found once per template, by
/// filling every field with a one-byte placeholder and seeing where they land. The event's
/// `op`, `transaction.lsn` and `unchanged` must be in the template, its key one field and its
/// `after` an object (the fields in it are spliced into the row as they are: the capture
/// writes each field as one JSON value); [`RowPlan::new`] declines other templates and the
/// mirror reads their events whole.
#[derive(Debug)]
pub struct RowPlan {
    template: Arc<sluice_log::Template>,
    op: String,
    lsn: i64,
    /// `transaction.seq`: a constant, or a field.
    seq: Result<i64, usize>,
    /// The key object's field.
    key: usize,
    /// `after` without its closing brace.
    after: Vec<Part>,
    /// `after` has no members.
    after_empty: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(Vec<u8>),
    Field(usize),
}

impl RowPlan {
    pub fn new(template: &Arc<sluice_log::Template>) -> Option<RowPlan> {
        use sluice_core::json_scan::scan_object;
        let mut filled = Vec::new();
        let mut at = Vec::with_capacity(template.fields());
        for (i, piece) in template.pieces().iter().enumerate() {
            if i > 0 {
                at.push(filled.len());
                filled.push(b'0');
            }
            filled.extend_from_slice(piece);
        }
        let filled = filled.as_slice();
        let offset = |v: &[u8]| v.as_ptr() as usize - filled.as_ptr() as usize;
        // Which field a value is (exactly a placeholder), and whether it holds any.
        let field = |v: &[u8]| (v.len() == 1).then(|| at.binary_search(&offset(v)).ok()).flatten();
        let has_field = |v: &[u8]| at.iter().any(|&a| (offset(v)..offset(v) + v.len()).contains(&a));
        let [op, after, key, unchanged, transaction] =
            scan_object(filled, [Some(b"op"), Some(b"after"), Some(b"key"), Some(b"unchanged"), Some(b"transaction")])?;
        let [lsn, seq] = scan_object(transaction?, [Some(b"lsn"), Some(b"seq")])?;
        if op.is_some_and(has_field) || lsn.is_some_and(has_field) || !matches!(unchanged, None | Some(b"null")) {
            return None;
        }
        let op = plain_string(op)??;
        if matches!(op, "delete" | "truncate") {
            return None;
        }
        let lsn = parse_lsn(plain_string(lsn)??)? as i64;
        let seq = match seq {
            None | Some(b"null") => Ok(0),
            Some(s) => match field(s) {
                Some(i) => Err(i),
                None if !has_field(s) => Ok(std::str::from_utf8(s).ok()?.parse::<i64>().ok()?),
                None => return None,
            },
        };
        let key = field(key?)?;
        let after = after.filter(|a| a.len() >= 2 && a[0] == b'{' && a[a.len() - 1] == b'}')?;
        let (start, end) = (offset(after), offset(after) + after.len() - 1);
        let mut parts = Vec::new();
        let mut pos = start;
        for (i, &a) in at.iter().enumerate().filter(|(_, &a)| (start..end).contains(&a)) {
            if a > pos {
                parts.push(Part::Text(filled[pos..a].to_vec()));
            }
            parts.push(Part::Field(i));
            pos = a + 1;
        }
        if end > pos {
            parts.push(Part::Text(filled[pos..end].to_vec()));
        }
        Some(RowPlan {
            template: template.clone(),
            op: op.to_string(),
            lsn,
            seq,
            key,
            after: parts,
            after_empty: !filled[start..end].iter().any(|b| !b.is_ascii_whitespace() && *b != b'{'),
        })
    }
}

/// The row plans of a flush's templates (one per snapshot chunk). Records of one batch
/// share their template by pointer, so a record's plan is found by pointer, newest first
/// (records come in runs of a batch); templates are compared by content only when a new
/// pointer is seen.
#[derive(Default)]
pub struct Plans {
    /// Every template seen, by pointer, with the index of its plan.
    seen: Vec<(Arc<sluice_log::Template>, usize)>,
    plans: Vec<Option<RowPlan>>,
}

impl Plans {
    /// The plan for `t` (made on first use); None: its events are read whole.
    pub fn plan(&mut self, t: &Arc<sluice_log::Template>) -> Option<&RowPlan> {
        let i = match self.seen.iter().rev().find(|(u, _)| Arc::ptr_eq(u, t)) {
            Some((_, i)) => *i,
            None => {
                let i = match self.seen.iter().find(|(u, _)| u == t) {
                    Some((_, i)) => *i,
                    None => {
                        self.plans.push(RowPlan::new(t));
                        self.plans.len() - 1
                    }
                };
                self.seen.push((t.clone(), i));
                i
            }
        };
        self.plans[i].as_ref()
    }

    /// The plan made for `t` by [`Plans::plan`].
    pub fn get(&self, t: &Arc<sluice_log::Template>) -> Option<&RowPlan> {
        self.seen.iter().rev().find(|(u, _)| Arc::ptr_eq(u, t)).and_then(|(_, i)| self.plans[*i].as_ref())
    }
}

/// What the mirror takes from one event, whole or planned.
struct Taken<'a> {
    op: &'a str,
    lsn: i64,
    seq: i64,
    key: Option<&'a str>,
    unchanged: Option<Vec<String>>,
    /// `after` as JSON text (whole events).
    after: Option<&'a str>,
}

/// Reduces a flush: `records` are (partition, offset, log time, event) in log order per
/// partition.
pub fn reduce<'a, E: Into<Input<'a>>>(records: impl IntoIterator<Item = (u32, u64, i64, E)>) -> Reduced {
    let mut out = Reduced::default();
    let records = records.into_iter();
    // key text -> index in rows (foldhash: SipHash showed in snapshot profiles, and the keys
    // come from the flush itself, hashed with a random seed all the same)
    let mut last: HashMap<&'a str, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(records.size_hint().0, foldhash::fast::RandomState::default());
    // A planned event's fields.
    let mut fields: Vec<&'a [u8]> = Vec::new();
    for (partition, offset, time, event) in records {
        let event = event.into();
        let ev = match event {
            Input::Whole(value) => {
                let ev = match read_change(value) {
                    Ok(c) => c,
                    Err(why) => {
                        out.invalid.push((partition, offset, why));
                        continue;
                    }
                };
                let (Some(op), Some(lsn)) = (ev.op, ev.lsn.and_then(parse_lsn)) else {
                    out.invalid.push((partition, offset, "not a change event (no op or transaction.lsn)".into()));
                    continue;
                };
                Taken { op, lsn: lsn as i64, seq: ev.seq, key: ev.key, unchanged: ev.unchanged, after: ev.after }
            }
            Input::Fields(value, plan) => {
                fields.clear();
                let seq = match plan.template.each_field(value, |_, f| fields.push(f)) {
                    Err(why) => Err(why.to_string()),
                    Ok(()) => match plan.seq {
                        Ok(seq) => Ok(seq),
                        Err(i) => std::str::from_utf8(fields[i]).ok().and_then(|t| t.parse().ok()).ok_or_else(|| "transaction.seq is not a number".to_string()),
                    },
                };
                let seq = match seq {
                    Ok(s) => s,
                    Err(why) => {
                        out.invalid.push((partition, offset, why));
                        continue;
                    }
                };
                Taken { op: &plan.op, lsn: plan.lsn, seq, key: std::str::from_utf8(fields[plan.key]).ok(), unchanged: None, after: None }
            }
        };
        let (op, lsn, seq) = (ev.op, ev.lsn, ev.seq);
        if op == "truncate" {
            out.truncate = Some(out.truncate.map_or((lsn, seq), |t| t.max((lsn, seq))));
            continue;
        }
        // The key object's text is the row's identity within the flush: the sources write
        // keys one way (compact, columns in name order), which DBLog reconciliation relies on
        // as well. Its column names are read once per flush.
        let Some(key) = ev.key.map(str::trim).filter(|k| k.starts_with('{') && *k != "{}") else {
            out.keyless += 1;
            continue;
        };
        if out.keys.is_empty() {
            match serde_json::from_str::<Map<String, Value>>(key) {
                Ok(k) if !k.is_empty() => out.keys = k.keys().cloned().collect(),
                _ => {
                    out.keyless += 1;
                    continue;
                }
            }
        }
        // The row as JSON text: the columns (the key's for a delete, else `after`'s) and the
        // mirror's own fields, spliced in as text: the values are not parsed here.
        let unchanged = ev.unchanged.filter(|u| !u.is_empty());
        let mut row;
        let has_columns = match (event, op) {
            (Input::Fields(_, plan), _) => {
                let len: usize = plan.after.iter().map(|p| if let Part::Text(t) = p { t.len() } else { 0 }).sum();
                row = Vec::with_capacity(len + fields.iter().map(|f| f.len()).sum::<usize>() + 64);
                for p in &plan.after {
                    match p {
                        Part::Text(t) => row.extend_from_slice(t),
                        Part::Field(i) => row.extend_from_slice(fields[*i]),
                    }
                }
                !plan.after_empty
            }
            (Input::Whole(_), "delete") => {
                row = Vec::with_capacity(key.len() + 64);
                row.extend_from_slice(key.as_bytes());
                row.pop(); // the closing brace
                true
            }
            (Input::Whole(_), _) => match ev.after.map(str::trim).filter(|a| a.starts_with('{')) {
                Some(after) => {
                    row = Vec::with_capacity(after.len() + 64);
                    row.extend_from_slice(after.as_bytes());
                    row.pop(); // the closing brace
                    row.iter().any(|b| !b.is_ascii_whitespace() && *b != b'{')
                }
                None => {
                    out.invalid.push((partition, offset, format!("{op} without `after`")));
                    continue;
                }
            },
        };
        if has_columns {
            row.push(b',');
        }
        row.extend_from_slice(if op == "delete" { br#""__op":"delete","# } else { br#""__op":"upsert","# });
        if let (Some(u), true) = (&unchanged, op != "delete") {
            row.extend_from_slice(br#""__unchanged":"#);
            serde_json::to_writer(&mut row, u).expect("JSON to memory");
            row.push(b',');
        }
        row.extend_from_slice(br#""__seq":"#);
        row.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        row.extend_from_slice(br#","_lsn":"#);
        row.extend_from_slice(itoa::Buffer::new().format(lsn).as_bytes());
        row.push(b'}');
        match last.get(key) {
            Some(&i) => {
                if unchanged.is_some() && op != "delete" {
                    row = take_unsent_columns(&out.rows[i].3, &row);
                }
                out.rows[i] = (partition, offset, time, row);
            }
            None => {
                last.insert(key, out.rows.len());
                out.rows.push((partition, offset, time, row));
            }
        }
    }
    out
}

/// An update that did not carry some (TOASTed) columns takes them from the key's earlier
/// event in the same flush, when that one had them.
fn take_unsent_columns(prev: &[u8], row: &[u8]) -> Vec<u8> {
    let (Ok(prev), Ok(mut row)) = (serde_json::from_slice::<Map<String, Value>>(prev), serde_json::from_slice::<Map<String, Value>>(row)) else {
        return row.to_vec();
    };
    if let Some(Value::Array(unchanged)) = row.remove("__unchanged") {
        let still: Vec<Value> = unchanged
            .into_iter()
            .filter(|c| {
                let Some(name) = c.as_str() else { return false };
                match prev.get(name) {
                    Some(v) if prev.get("__op").and_then(|o| o.as_str()) == Some("upsert") && !prev_unchanged(&prev, name) => {
                        row.insert(name.to_string(), v.clone());
                        false
                    }
                    _ => true,
                }
            })
            .collect();
        if !still.is_empty() {
            row.insert("__unchanged".into(), Value::Array(still));
        }
    }
    Value::Object(row).to_string().into_bytes()
}

/// A mirror table's schema from converted change rows: without `__op`, `__unchanged`, `__seq`
/// and the date column.
pub fn table_schema(schema: &Schema, date_column: &str) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .filter(|f| !matches!(f.name().as_str(), "__op" | "__unchanged" | "__seq") && f.name() != date_column)
        .map(|f| f.as_ref().clone())
        .collect();
    Arc::new(Schema::new(fields))
}

/// The converted change rows as one batch for `LakeTable::merge_by_key`: without the date
/// column and `__seq`, and without changes at or before the last truncate (a position:
/// commit LSN, sequence).
pub fn changes_batch(schema: &SchemaRef, batches: &[RecordBatch], date_column: &str, truncated_at: Option<(i64, i64)>) -> anyhow::Result<RecordBatch> {
    let all = concat_batches(schema, batches)?;
    let newer = match (truncated_at, all.column_by_name(LSN_COLUMN)) {
        (Some((t, t_seq)), Some(lsn)) => {
            let lsn = cast(lsn, &DataType::Int64)?;
            let seq = all.column_by_name("__seq").map(|s| cast(s, &DataType::Int64)).transpose()?;
            let seq = seq.as_ref().map(|s| s.as_primitive::<Int64Type>());
            let newer: BooleanArray = lsn
                .as_primitive::<Int64Type>()
                .iter()
                .enumerate()
                .map(|(i, v)| Some(v.is_some_and(|v| v > t || (v == t && seq.is_some_and(|s| !s.is_null(i) && s.value(i) > t_seq)))))
                .collect();
            Some(newer)
        }
        _ => None,
    };
    let keep: Vec<usize> = (0..all.num_columns()).filter(|i| ![date_column, "__seq"].contains(&schema.field(*i).name().as_str())).collect();
    let all = all.project(&keep)?;
    Ok(match newer {
        Some(newer) => filter_record_batch(&all, &newer)?,
        None => all,
    })
}

fn prev_unchanged(prev: &Map<String, Value>, name: &str) -> bool {
    prev.get("__unchanged").and_then(|u| u.as_array()).is_some_and(|u| u.iter().any(|c| c.as_str() == Some(name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ev(op: &str, id: i64, lsn: &str, after: Value, unchanged: &[&str]) -> Vec<u8> {
        let mut e = json!({"op": op, "key": {"id": id}, "after": after, "transaction": {"lsn": lsn, "seq": 0}});
        if !unchanged.is_empty() {
            e["unchanged"] = json!(unchanged);
        }
        e.to_string().into_bytes()
    }

    fn rows(r: &Reduced) -> Vec<Value> {
        r.rows.iter().map(|(_, _, _, b)| serde_json::from_slice(b).unwrap()).collect()
    }

    #[test]
    fn last_change_per_key_wins_and_keeps_unsent_columns() {
        let evs = [
            ev("insert", 1, "0/10", json!({"id": 1, "a": "x", "big": "B"}), &[]),
            ev("insert", 2, "0/10", json!({"id": 2, "a": "y"}), &[]),
            ev("update", 1, "0/20", json!({"id": 1, "a": "z"}), &["big"]),
            ev("delete", 2, "0/30", Value::Null, &[]),
            ev("update", 3, "0/30", json!({"id": 3, "a": "w"}), &["big"]),
        ];
        let r = reduce(evs.iter().enumerate().map(|(i, e)| (0, i as u64, 0, e.as_slice())));
        assert_eq!(r.keys, ["id"]);
        let got = rows(&r);
        assert_eq!(got[0], json!({"id": 1, "a": "z", "big": "B", "__op": "upsert", "__seq": 0, "_lsn": 0x20}));
        assert_eq!(got[1], json!({"id": 2, "__op": "delete", "__seq": 0, "_lsn": 0x30}));
        assert_eq!(got[2], json!({"id": 3, "a": "w", "__op": "upsert", "__unchanged": ["big"], "__seq": 0, "_lsn": 0x30}));
        assert_eq!(r.rows[0].1, 2, "the row's position is its last change's");
    }

    /// `TRUNCATE; INSERT ...` in one transaction: the inserts share the truncate's LSN and
    /// come after it; changes before it (same LSN, lower sequence, or older LSN) do not.
    #[test]
    fn changes_after_a_truncate_in_its_own_transaction_are_newer() {
        let ev = |op: &str, id: i64, lsn: &str, seq: i64| json!({"op": op, "key": {"id": id}, "after": {"id": id}, "transaction": {"lsn": lsn, "seq": seq}}).to_string().into_bytes();
        let evs = [ev("insert", 1, "0/10", 0), ev("insert", 2, "0/20", 0), ev("truncate", 0, "0/20", 1), ev("insert", 3, "0/20", 2)];
        let r = reduce(evs.iter().enumerate().map(|(i, e)| (0, i as u64, 0, e.as_slice())));
        assert_eq!(r.truncate, Some((0x20, 1)));
        assert_eq!(rows(&r)[2], json!({"id": 3, "__op": "upsert", "__seq": 2, "_lsn": 0x20}));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("__seq", DataType::Int64, true),
            Field::new("_lsn", DataType::Int64, true),
            Field::new("day", DataType::Utf8, true),
        ]));
        let int = |v: Vec<i64>| Arc::new(arrow_array::Int64Array::from(v)) as arrow_array::ArrayRef;
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![int(vec![1, 2, 3, 4]), int(vec![0, 0, 2, 1]), int(vec![0x10, 0x20, 0x20, 0x30]), Arc::new(arrow_array::StringArray::from(vec!["d"; 4]))],
        )
        .unwrap();
        let kept = |t| {
            let out = changes_batch(&schema, &[b.clone()], "day", t).unwrap();
            assert_eq!(out.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), ["id", "_lsn"]);
            out.column(0).as_primitive::<Int64Type>().values().to_vec()
        };
        assert_eq!(kept(Some((0x20, 1))), [3, 4]);
        assert_eq!(kept(Some((0x20, i64::MAX))), [4], "a truncate remembered without its sequence: all of its transaction is older");
        assert_eq!(kept(None), [1, 2, 3, 4]);
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\],: é\u{1F600}\n]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_\"]{1,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Scanning a change event reads what serde reads, and takes every event without
        /// escapes in `op` and `lsn`.
        #[test]
        fn scanning_reads_what_serde_reads(
            op in prop_oneof![Just(json!("insert")), Just(json!("delete")), Just(json!("in\"sert")), Just(Value::Null)],
            after in any_json(),
            key in any_json(),
            unchanged in prop_oneof![Just(Value::Null), Just(json!(["a", "b\\c"]))],
            lsn in prop_oneof![Just(json!("0/1A")), Just(json!("0/\\1")), Just(Value::Null)],
            source in any_json(),
            pretty in any::<bool>(),
        ) {
            let ev = json!({"op": op, "after": after, "key": key, "unchanged": unchanged, "source": source,
                "transaction": {"id": source, "lsn": lsn}, "before": after});
            let text = if pretty { serde_json::to_string_pretty(&ev).unwrap() } else { ev.to_string() };
            let serde = parse_change(text.as_bytes()).ok();
            match scan_change(text.as_bytes()) {
                Some(scanned) => prop_assert_eq!(Some(scanned), serde),
                None => prop_assert!(text.contains(r#"in\"sert"#) || text.contains(r#"0/\\1"#)),
            }
        }
    }

    /// A snapshot-like event as a template and its records' fields: `after`'s columns (those
    /// marked true are fields, the rest part of the template), the key and `transaction.seq`.
    fn templated_events(op: &str, columns: &[(String, Value, bool)], source: &Value, rows: &[(i64, i64)]) -> (Arc<sluice_log::Template>, Vec<Vec<u8>>) {
        let mut pieces = Vec::new();
        let mut piece = b"{\"after\":{".to_vec();
        for (i, (name, v, field)) in columns.iter().enumerate() {
            if i > 0 {
                piece.push(b',');
            }
            piece.extend_from_slice(serde_json::to_string(name).unwrap().as_bytes());
            piece.push(b':');
            if *field {
                pieces.push(bytes::Bytes::from(std::mem::take(&mut piece)));
            } else {
                piece.extend_from_slice(v.to_string().as_bytes());
            }
        }
        piece.extend_from_slice(b"},\"before\":null,\"key\":");
        pieces.push(bytes::Bytes::from(piece));
        pieces.push(bytes::Bytes::from(format!(",\"op\":{},\"source\":{source},\"transaction\":{{\"id\":null,\"lsn\":\"0/1A\",\"seq\":", json!(op))));
        pieces.push(bytes::Bytes::from_static(b"},\"ts_ms\":1}"));
        let t = Arc::new(sluice_log::Template::new(pieces));
        let records = rows
            .iter()
            .map(|(id, seq)| {
                let mut f = Vec::new();
                for (_, v, field) in columns {
                    if *field {
                        sluice_log::Template::field(&mut f, |o| o.extend_from_slice(v.to_string().as_bytes()));
                    }
                }
                sluice_log::Template::field(&mut f, |o| o.extend_from_slice(json!({"id": id}).to_string().as_bytes()));
                sluice_log::Template::field(&mut f, |o| o.extend_from_slice(seq.to_string().as_bytes()));
                f
            })
            .collect();
        (t, records)
    }

    proptest! {
        /// Rows made from a template's fields are the rows of the whole events.
        #[test]
        fn planned_rows_are_the_whole_events_rows(
            columns in prop::collection::vec(("[a-z_\"]{1,6}", any_json(), any::<bool>()), 0..5),
            source in any_json(),
            op in prop_oneof![Just("read"), Just("insert")],
            rows in prop::collection::vec((0i64..4, 0i64..1000), 1..6),
        ) {
            let mut seen = std::collections::HashSet::new();
            let columns: Vec<_> = columns.into_iter().filter(|(n, _, _)| seen.insert(n.clone())).collect();
            let (t, fields) = templated_events(op, &columns, &source, &rows);
            let plan = RowPlan::new(&t).expect("a plan for a snapshot-like template");
            let whole: Vec<Vec<u8>> = fields.iter().map(|f| { let mut v = Vec::new(); t.expand(f, &mut v).unwrap(); v }).collect();
            let a = reduce(whole.iter().enumerate().map(|(i, e)| (0, i as u64, 0, e.as_slice())));
            let b = reduce(fields.iter().enumerate().map(|(i, f)| (0, i as u64, 0, Input::Fields(f, &plan))));
            prop_assert_eq!(&a.keys, &b.keys);
            prop_assert_eq!(a.rows.len(), b.rows.len());
            for (x, y) in a.rows.iter().zip(&b.rows) {
                prop_assert_eq!(&x.3, &y.3, "{} vs {}", String::from_utf8_lossy(&x.3), String::from_utf8_lossy(&y.3));
                prop_assert_eq!(x.1, y.1);
            }
            prop_assert!(a.invalid.is_empty() && b.invalid.is_empty());
        }
    }

    #[test]
    fn plans_are_made_once_per_template_content() {
        let (a, _) = templated_events("read", &[("x".into(), json!(1), true)], &json!({}), &[]);
        let (no, _) = templated_events("delete", &[], &json!({}), &[]);
        let a2 = Arc::new((*a).clone());
        let mut plans = Plans::default();
        assert!(plans.plan(&a).is_some());
        assert!(plans.plan(&no).is_none());
        assert!(plans.plan(&a2).is_some(), "an equal template by content");
        assert_eq!((plans.seen.len(), plans.plans.len()), (3, 2));
        assert!(plans.get(&a2).is_some() && plans.get(&a).is_some() && plans.get(&no).is_none());
        let unseen = Arc::new((*a).clone());
        assert!(plans.get(&unseen).is_none(), "get finds only templates planned");
    }

    #[test]
    fn templates_without_a_plan_and_bad_fields() {
        let piece = |s: &str| bytes::Bytes::from(s.to_string());
        let t = |p: &[&str]| Arc::new(sluice_log::Template::new(p.iter().map(|s| piece(s)).collect()));
        let ok = t(&[r#"{"after":{"a":"#, r#"},"key":"#, r#","op":"read","transaction":{"lsn":"0/1","seq":"#, "}}"]);
        assert!(RowPlan::new(&ok).is_some());
        for bad in [
            // op, lsn or unchanged in a field; a key that is not exactly a field; deletes
            t(&[r#"{"after":{"a":1},"key":"#, r#","op":"#, r#","transaction":{"lsn":"0/1"}}"#]),
            t(&[r#"{"after":{"a":1},"key":"#, r#","op":"read","transaction":{"lsn":"#, "}}"]),
            t(&[r#"{"after":{"a":1},"key":"#, r#","op":"read","unchanged":"#, r#","transaction":{"lsn":"0/1"}}"#]),
            t(&[r#"{"after":{"a":1},"key":{"id":"#, r#"},"op":"read","transaction":{"lsn":"0/1"}}"#]),
            t(&[r#"{"after":{"a":1},"key":"#, r#","op":"delete","transaction":{"lsn":"0/1"}}"#]),
            t(&[r#"{"after":"#, r#","key":{"id":1},"op":"read","transaction":{"lsn":"0/1"}}"#]),
            t(&[r#"{"after":[1],"key":"#, r#","op":"read","transaction":{"lsn":"0/1"}}"#]),
            t(&["not json", ""]),
        ] {
            assert!(RowPlan::new(&bad).is_none(), "{:?}", bad.pieces());
        }
        // Fields that do not fit the template, or a sequence that is not a number: skipped
        // as invalid, not a panic.
        let plan = RowPlan::new(&ok).unwrap();
        let mut good = Vec::new();
        for f in ["1", r#"{"id":1}"#, "7"] {
            sluice_log::Template::field(&mut good, |o| o.extend_from_slice(f.as_bytes()));
        }
        let mut nan = Vec::new();
        for f in ["1", r#"{"id":2}"#, "x"] {
            sluice_log::Template::field(&mut nan, |o| o.extend_from_slice(f.as_bytes()));
        }
        let r = reduce([(0, 0, 0, Input::Fields(&good, &plan)), (0, 1, 0, Input::Fields(&good[..3], &plan)), (0, 2, 0, Input::Fields(&nan, &plan))]);
        assert_eq!(rows(&r), [json!({"a": 1, "__op": "upsert", "__seq": 7, "_lsn": 1})]);
        assert_eq!(r.invalid.iter().map(|i| i.1).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn scanning_stops_at_text_that_is_not_one_object() {
        for bad in [&b"nope"[..], b"{\"op\":\"insert\"", b"{\"op\":\"insert\"} x", b"[1]", b"{\"after\":{\"a\":\"x}}", b""] {
            assert_eq!(scan_change(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn truncates_keyless_and_invalid() {
        let t = json!({"op": "truncate", "key": null, "transaction": {"lsn": "1/0", "seq": 0}}).to_string().into_bytes();
        let keyless = json!({"op": "insert", "key": null, "after": {"a": 1}, "transaction": {"lsn": "0/5", "seq": 0}}).to_string().into_bytes();
        let r = reduce([(0, 0, 0, t.as_slice()), (0, 1, 0, keyless.as_slice()), (0, 2, 0, b"nope".as_slice())]);
        assert_eq!(r.truncate, Some((1 << 32, 0)));
        assert_eq!(r.keyless, 1);
        assert_eq!(r.invalid.len(), 1);
        assert!(r.rows.is_empty());
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("x"), None);
    }
}
