//! Snapshots of captured tables, in chunks by primary key, without locks, while the log keeps
//! streaming: watermark-based reconciliation as published for Netflix's DBLog.
//!
//! For each chunk the source writes a low watermark to the WAL (a non-transactional logical
//! message), waits until the transactions that had an id at that moment have finished (one
//! whose commit record precedes the watermark may not be visible yet), selects the chunk (`WHERE key
//! > last key ORDER BY key LIMIT n`, in its own statement, so it sees everything committed
//! before the low watermark), then writes a high watermark. In the replication stream, every change to the table between the two
//! watermarks removes its key from the chunk: the change is as new as the selected row or
//! newer. At the high watermark the remaining rows are written as `read` events, at the high
//! watermark's position (its end LSN - 1: the next commit record may start exactly at its end,
//! and positions must not collide): they are the rows' state there, and every later change
//! comes after them. A chunk is finished once its events are durable; the last finished key is kept in the
//! source's state, so a snapshot resumes from there after a crash.

use futures::StreamExt;
use tokio_postgres::types::ToSql;

/// Logical message prefix of the watermarks.
pub const WATERMARK_PREFIX: &str = "sluice-snapshot";

/// A table's columns as the snapshot reads them.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    /// (name, type oid, type as SQL, part of the primary key), in column order.
    pub columns: Vec<(String, u32, String, bool)>,
}

/// A chunk's rows: every value as the text PostgreSQL prints, in one buffer, or as read
/// in COPY's binary format (see [`binary`]), whose JSON is written from the bytes.
#[derive(Debug, Default)]
pub struct Rows {
    columns: usize,
    text: String,
    /// Per value, its range in `text` (or in `binary`'s output); NULL is `(usize::MAX, 0)`.
    values: Vec<(usize, usize)>,
    /// Binary COPY output and its columns' type oids: the values are still in it.
    binary: Option<(Vec<u8>, Vec<u32>)>,
}

impl Rows {
    pub fn new(columns: usize) -> Rows {
        Rows { columns: columns.max(1), ..Rows::default() }
    }

    pub fn len(&self) -> usize {
        self.values.len() / self.columns
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Row `row`'s value of column `col`; None: NULL. Rows read as text only (see
    /// [`Rows::text`]).
    pub fn get(&self, row: usize, col: usize) -> Option<&str> {
        debug_assert!(self.binary.is_none(), "binary rows have no text: Rows::text");
        let (start, end) = self.values[row * self.columns + col];
        (start != usize::MAX).then(|| &self.text[start..end])
    }

    /// Row `row`'s value of column `col` as the text PostgreSQL prints; None: NULL. Err: a
    /// binary value that is not one of its type.
    pub fn text(&self, row: usize, col: usize) -> Result<Option<std::borrow::Cow<'_, str>>, String> {
        let (start, end) = self.values[row * self.columns + col];
        match &self.binary {
            _ if start == usize::MAX => Ok(None),
            None => Ok(Some(self.text[start..end].into())),
            Some((data, types)) => {
                let mut text = String::new();
                binary::text(types[col], &data[start..end], &mut text)?;
                Ok(Some(text.into()))
            }
        }
    }

    /// Writes row `row`'s value of column `col` (of type `type_oid`) as JSON, as
    /// [`super::types::write_json`] writes its text (`scratch`: room for a value's text).
    /// Err: a binary value that is not one of its type.
    pub fn write_json(&self, row: usize, col: usize, type_oid: u32, out: &mut Vec<u8>, scratch: &mut String) -> Result<(), String> {
        let (start, end) = self.values[row * self.columns + col];
        match &self.binary {
            _ if start == usize::MAX => out.extend_from_slice(b"null"),
            None => super::types::write_json(type_oid, &self.text[start..end], out),
            Some((data, types)) => binary::json(types[col], &data[start..end], out, scratch)?,
        }
        Ok(())
    }

    fn push(&mut self, v: Option<&str>) {
        match v {
            Some(v) => {
                let start = self.text.len();
                self.text.push_str(v);
                self.values.push((start, self.text.len()));
            }
            None => self.values.push((usize::MAX, 0)),
        }
    }

    /// Appends the rows of `COPY ... TO STDOUT` text format (`\t` between values, `\n` after
    /// each row, `\N` for NULL, backslash escapes in values). Err: not that format.
    fn push_copy(&mut self, data: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(data).map_err(|e| format!("COPY output is not UTF-8: {e}"))?;
        let b = text.as_bytes();
        self.text.reserve(b.len());
        // One pass: each value runs to the next tab or newline (both ASCII, so every cut is
        // at a character boundary); a backslash in it means escapes to undo.
        let mut i = 0;
        while i < b.len() {
            let (row, before) = (i, self.values.len());
            loop {
                let (start, mut escaped) = (i, false);
                while i < b.len() && b[i] != b'\t' && b[i] != b'\n' {
                    escaped |= b[i] == b'\\';
                    i += 1;
                }
                let v = &text[start..i];
                if v == "\\N" {
                    self.push(None);
                } else if !escaped {
                    self.push(Some(v));
                } else {
                    self.push_escaped(v).map_err(|e| format!("{e}: {:?}", line(text, row)))?;
                }
                if i < b.len() && b[i] == b'\t' {
                    i += 1;
                } else {
                    break;
                }
            }
            let end = i;
            i += 1; // the newline (or past the end)
            if self.values.len() - before != self.columns {
                return Err(format!("COPY output row has {} values, not {}: {:?}", self.values.len() - before, self.columns, &text[row..end]));
            }
        }
        Ok(())
    }

    /// Appends the tuples of COPY's binary format (`body`: after its header), each value as
    /// the text PostgreSQL prints for it (see [`binary::text`]).
    fn push_binary(&mut self, types: &[u32], body: &[u8]) -> Result<(), String> {
        let text = &mut self.text;
        let values = &mut self.values;
        binary::tuples(body, types.len(), |col, v| {
            match v {
                None => values.push((usize::MAX, 0)),
                Some(v) => {
                    let start = text.len();
                    binary::text(types[col], v, text)?;
                    values.push((start, text.len()));
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// A value with backslash escapes, undone.
    fn push_escaped(&mut self, v: &str) -> Result<(), &'static str> {
        let start = self.text.len();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                self.text.push(c);
                continue;
            }
            self.text.push(match chars.next() {
                Some('b') => '\u{8}',
                Some('f') => '\u{c}',
                Some('n') => '\n',
                Some('r') => '\r',
                Some('t') => '\t',
                Some('v') => '\u{b}',
                Some(c) => c,
                None => return Err("COPY output ends in a backslash"),
            });
        }
        self.values.push((start, self.text.len()));
        Ok(())
    }
}

/// A chunk's rows as read: split already (a snapshot of some keys), or still the COPY output
/// of whole rows, split by [`Copied::rows`].
#[derive(Debug)]
pub struct Copied {
    rows: Rows,
    /// COPY output, whole rows: text, or binary (see [`binary`]) with these column types.
    data: Vec<u8>,
    binary: Option<Vec<u32>>,
    len: usize,
    /// Where the last row of `data` starts.
    last: usize,
}

impl Copied {
    /// `data`: COPY text, or with `binary` (the columns' type oids) COPY's binary format.
    /// Err: binary output that is not that format.
    pub fn new(rows: Rows, data: Vec<u8>, binary: Option<Vec<u32>>) -> Result<Copied, String> {
        let (n, last) = match &binary {
            // A newline ends each row: one inside a value is escaped (`\n`).
            None => (memchr::memchr_iter(b'\n', &data).count(), data.len().checked_sub(1).and_then(|end| memchr::memrchr(b'\n', &data[..end])).map_or(0, |i| i + 1)),
            Some(types) if !data.is_empty() => {
                let body = binary::body(&data)?;
                let (n, last) = binary::tuples(body, types.len(), |_, _| Ok(()))?;
                (n, data.len() - body.len() + last)
            }
            Some(_) => (0, 0),
        };
        Ok(Copied { len: rows.len() + n, rows, data, binary, last })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The last row's primary key values (see [`TableInfo::keys_of`]); None: no rows. Err:
    /// the COPY output is not that format.
    pub fn last_key(&self, info: &TableInfo) -> Result<Option<Vec<String>>, String> {
        if self.data.is_empty() || self.len == self.rows.len() {
            return Ok((!self.rows.is_empty()).then(|| info.keys_of(&self.rows, self.rows.len() - 1)));
        }
        let mut last = Rows::new(self.rows.columns);
        match &self.binary {
            None => last.push_copy(&self.data[self.last..])?,
            Some(types) => last.push_binary(types, &self.data[self.last..])?,
        }
        Ok(Some(info.keys_of(&last, 0)))
    }

    /// The rows, split (binary values are left where they are, their JSON written from
    /// them: see [`Rows::write_json`]). Err: the COPY output is not that format.
    pub fn rows(self) -> Result<Rows, String> {
        let Copied { mut rows, data, binary, len, .. } = self;
        if !data.is_empty() {
            rows.values.reserve(rows.columns * (len - rows.len()));
            match binary {
                None => rows.push_copy(&data)?,
                Some(types) if rows.is_empty() => {
                    // Each value's range in `data` (found from where its slice starts).
                    let base = data.as_ptr() as usize;
                    let values = &mut rows.values;
                    binary::tuples(binary::body(&data)?, types.len(), |_, v| {
                        values.push(v.map_or((usize::MAX, 0), |v| (v.as_ptr() as usize - base, v.as_ptr() as usize - base + v.len())));
                        Ok(())
                    })?;
                    rows.binary = Some((data, types));
                }
                Some(types) => {
                    rows.text.reserve(data.len());
                    rows.push_binary(&types, binary::body(&data)?)?;
                }
            }
        }
        Ok(rows)
    }
}

/// The line of `text` that starts at `at`.
fn line(text: &str, at: usize) -> &str {
    text[at..].split('\n').next().unwrap_or_default()
}

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl TableInfo {
    pub fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }

    pub fn keys(&self) -> impl Iterator<Item = &(String, u32, String, bool)> {
        self.columns.iter().filter(|c| c.3)
    }

    /// The primary key's column names.
    pub fn key_names(&self) -> Vec<&str> {
        self.keys().map(|k| k.0.as_str()).collect()
    }

    /// Row `row`'s primary key values as text (one per key column).
    pub fn keys_of(&self, rows: &Rows, row: usize) -> Vec<String> {
        self.columns.iter().enumerate().filter(|(_, c)| c.3).map(|(i, _)| rows.get(row, i).unwrap_or_default().to_string()).collect()
    }

    /// The columns' type oids when every one of them can be read in COPY's binary format
    /// and printed here as the server prints it (see [`binary::text`]): cheaper for the
    /// server than printing them itself. None: read as text.
    pub fn binary(&self) -> Option<Vec<u32>> {
        self.columns.iter().all(|c| binary::cast(c.1).is_some()).then(|| self.columns.iter().map(|c| c.1).collect())
    }

    /// The chunk read as `COPY (SELECT ...) TO STDOUT`: keys after `after` (given inline:
    /// COPY takes no parameters), in key order; in the binary format with `binary`; no rows
    /// unless SQL condition `guard` holds.
    pub fn chunk_copy(&self, after: Option<&[String]>, limit: usize, binary: bool, guard: Option<&str>) -> String {
        // In binary, each column cast to the type read (free when it still is): a column
        // retyped since then fails or converts, where its bytes would be taken for the old
        // type's.
        let cols = self
            .columns
            .iter()
            .map(|(n, t, ..)| match binary::cast(*t).filter(|_| binary) {
                Some(cast) => format!("t.{}::pg_catalog.{cast}", ident(n)),
                None => format!("t.{}", ident(n)),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let keys: Vec<&(String, u32, String, bool)> = self.keys().collect();
        let order = keys.iter().map(|k| format!("t.{}", ident(&k.0))).collect::<Vec<_>>().join(", ");
        let mut conds: Vec<String> = guard.map(str::to_string).into_iter().collect();
        if let Some(a) = after {
            let values = keys.iter().zip(a).map(|(k, v)| format!("{}::{}", literal(v), k.2)).collect::<Vec<_>>().join(", ");
            conds.insert(0, format!("({order}) > ({values})"));
        }
        let cond = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        let format = if binary { " (FORMAT binary)" } else { "" };
        format!("COPY (SELECT {cols} FROM {} t{cond} ORDER BY {order} LIMIT {limit}) TO STDOUT{format}", self.qualified())
    }

    /// The query of a snapshot of some keys: every column as text (`::text`), the rows whose
    /// primary key is in the parameters (one text array per key column), in key order.
    pub fn keys_sql(&self, limit: usize) -> String {
        // Output columns get their own names: ORDER BY must see the typed columns, not their
        // text (which would sort 10 before 9).
        let cols = self.columns.iter().enumerate().map(|(i, (n, ..))| format!("t.{}::text AS c{i}", ident(n))).collect::<Vec<_>>().join(", ");
        let keys: Vec<&(String, u32, String, bool)> = self.keys().collect();
        let order = keys.iter().map(|k| format!("t.{}", ident(&k.0))).collect::<Vec<_>>().join(", ");
        let cond = if keys.len() == 1 {
            format!("t.{} = ANY($1::text[]::{}[])", ident(&keys[0].0), keys[0].2)
        } else {
            // Zipped by unnest.
            let arrays = keys.iter().enumerate().map(|(i, k)| format!("${}::text[]::{}[]", i + 1, k.2)).collect::<Vec<_>>().join(", ");
            format!("({order}) IN (SELECT * FROM unnest({arrays}))")
        };
        format!("SELECT {cols} FROM {} t WHERE {cond} ORDER BY {order} LIMIT {limit}", self.qualified())
    }
}

/// Reads a table's columns and primary key from the catalog; None if it does not exist.
pub async fn table_info(client: &tokio_postgres::Client, schema: &str, name: &str) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod), coalesce(a.attnum = ANY(i.indkey::int2[]), false)
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let columns = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32, r.get::<_, String>(2), r.get::<_, bool>(3))).collect();
    Ok(Some(TableInfo { schema: schema.to_string(), name: name.to_string(), columns }))
}

/// Every ordinary or partitioned table of the database, as (schema, name).
pub async fn all_tables(client: &tokio_postgres::Client) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The low watermark of chunk `marker` and a new transaction id (see [`read_chunk`]) as SQL:
/// the id is taken after the watermark is written, in a transaction of its own.
/// (Simple queries with the values inline: one round trip each, where a prepared statement
/// takes two.)
fn low_watermark(marker: &str) -> String {
    format!("SELECT pg_logical_emit_message(false, {}, {})::text, pg_current_xact_id()::text", literal(WATERMARK_PREFIX), literal(&format!("low {marker}")))
}

/// A chunk's low watermark, written: its marker and the transaction id taken after it.
pub struct Low {
    pub marker: String,
    mark: String,
}

impl Low {
    /// Writes the low watermark of chunk `marker`.
    pub async fn write(client: &tokio_postgres::Client, marker: String) -> anyhow::Result<Low> {
        let mark = first_value(client, &low_watermark(&marker), 1).await?.ok_or_else(|| anyhow::anyhow!("no transaction id"))?;
        Ok(Low { marker, mark })
    }
}

/// After the chunk's low watermark (`low`), selects the chunk and writes its high watermark.
/// Returns the rows, each column as text (see [`TableInfo::chunk_copy`] and
/// [`TableInfo::keys_sql`]), the high watermark's LSN as the server returned it (the end of
/// its record, which is also the LSN the replication stream gives the message) and, when
/// the chunk is full and `next` names a next chunk, that chunk's low watermark, written in
/// the same round trip as this one's high watermark, after it.
pub async fn read_chunk(
    client: &tokio_postgres::Client,
    info: &TableInfo,
    low: Low,
    after: Option<&[String]>,
    keys: Option<&[Vec<String>]>,
    limit: usize,
    next: Option<&str>,
    flusher: Option<&Flusher>,
) -> anyhow::Result<(Copied, Option<u64>, Option<Low>)> {
    let Low { marker, mark } = low;
    // A transaction's commit record can precede the low watermark in the WAL while it is not
    // yet visible to new snapshots (PostgreSQL makes it visible just after). Its changes come
    // before the window, so the chunk must see them: wait until every transaction that had
    // an id when the watermark was written has finished. A new id taken now is above all of
    // theirs; once the oldest transaction still running is newer than it, they are done.
    // (The snapshot's list of running transactions is not enough: a transaction whose id is
    // at or above the snapshot's xmax is running but not listed, and with one busy writer
    // that is usually the one committing. Both found by the convergence test.) A chunk of
    // the whole table checks that in its COPY's own snapshot (a condition on no row, which
    // the server tests once) and reads as empty when it fails: then, as before a snapshot
    // of some keys, the source waits for a snapshot that passes and reads.
    let t = std::time::Instant::now();
    let done = format!("pg_snapshot_xmin(pg_current_snapshot()) > {}::xid8", literal(&mark));
    let wait = || async {
        while first_value(client, &format!("SELECT {done}"), 0).await?.as_deref() != Some("t") {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    if keys.is_some() {
        wait().await?;
    }
    let mut waited = t.elapsed();
    let t = std::time::Instant::now();
    let mut rows = Rows::new(info.columns.len());
    let mut text = Vec::new(); // COPY output
    let binary = info.binary().filter(|_| keys.is_none());
    match keys {
        Some(k) => {
            // Column-major: one array per key column.
            let sql = info.keys_sql(limit);
            let columns: Vec<Vec<&str>> = (0..info.keys().count()).map(|c| k.iter().map(|key| key[c].as_str()).collect()).collect();
            let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            for r in client.query(&sql, &params).await? {
                for i in 0..info.columns.len() {
                    rows.push(r.get::<_, Option<&str>>(i));
                }
            }
        }
        None => {
            // COPY: the server's cheapest way out, and no row objects here. The output is
            // only gathered here: the server sends each row as a message and waits whenever
            // this task falls behind, so splitting the rows (in `Copied::rows`) is left to
            // the caller, off the connection's path, while the next chunk is read.
            let binary = binary.is_some();
            text = copy_out(client, &info.chunk_copy(after, limit, binary, Some(&done)), limit).await?;
            if no_rows(&text, binary) {
                // The end of the table, or transactions older than the low watermark still
                // running when the COPY took its snapshot.
                let w = std::time::Instant::now();
                wait().await?;
                waited += w.elapsed();
                text = copy_out(client, &info.chunk_copy(after, limit, binary, None), limit).await?;
            }
        }
    }
    if binary.is_none() && !text.is_empty() && !text.ends_with(b"\n") {
        let from = memchr::memrchr(b'\n', &text).map_or(0, |i| i + 1);
        anyhow::bail!("snapshot of {}: COPY output ends inside a row: {:?}", info.qualified(), String::from_utf8_lossy(&text[from..]));
    }
    let rows = Copied::new(rows, text, binary).map_err(|e| anyhow::anyhow!("snapshot of {}: {e}", info.qualified()))?;
    let select = t.elapsed();
    // The high watermark, then a tiny synchronous commit, in one round trip. A
    // non-transactional message waits in the WAL buffers until something flushes them (the
    // WAL writer: up to wal_writer_delay later); the commit flushes them now, so the chunk
    // does not wait: without it a quiet database reads ~5 chunks a second. When the next
    // chunk follows, the flusher's connection commits instead, while that chunk is read.
    let mut high = format!("SELECT pg_logical_emit_message(false, {}, {})::text;", literal(WATERMARK_PREFIX), literal(&format!("high {marker}")));
    let next = next.filter(|_| rows.len() >= limit);
    let flusher = flusher.filter(|_| next.is_some());
    if flusher.is_none() {
        high.push(' ');
        high.push_str(FLUSH);
    }
    if let Some(n) = next {
        high.push(' ');
        high.push_str(&low_watermark(n));
    }
    let t = std::time::Instant::now();
    // Rows: the high watermark's, the flush's, then the next low watermark's.
    let answers: Vec<(Option<String>, Option<String>)> = client
        .simple_query(&high)
        .await?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((r.get(0).map(str::to_string), r.try_get(1).ok().flatten().map(str::to_string))),
            _ => None,
        })
        .collect();
    if let Some(f) = flusher {
        f.flush();
    }
    let lsn = answers.first().and_then(|(h, _)| h.as_deref()).and_then(|h| pgwire_replication::Lsn::parse(h).ok()).map(|l| l.0);
    let next = match next {
        Some(n) => Some(Low { marker: n.to_string(), mark: answers.last().and_then(|(_, id)| id.clone()).ok_or_else(|| anyhow::anyhow!("no transaction id"))? }),
        None => None,
    };
    tracing::debug!(waited = ?waited, select = ?select, high = ?t.elapsed(), rows = rows.len(), "snapshot chunk read");
    Ok((rows, lsn, next))
}

/// A tiny transaction committed synchronously: it flushes the WAL before it (the watermarks).
const FLUSH: &str = "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, 'sluice-flush', ''); COMMIT;";

/// Flushes the WAL on a connection of its own when asked (a chain of chunks' high
/// watermarks): the chunk reader goes on with the next chunk without waiting for the disk.
/// Requests made while a flush runs are served by one more.
pub struct Flusher {
    wake: std::sync::Arc<tokio::sync::Notify>,
    _task: super::AbortOnDrop,
}

impl Flusher {
    /// Flushes through `client` (its connection's task `conn`, stopped with the flusher).
    pub fn new(client: tokio_postgres::Client, conn: tokio::task::JoinHandle<()>) -> Flusher {
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let w = wake.clone();
        let task = tokio::spawn(async move {
            let _conn = super::AbortOnDrop(conn);
            loop {
                w.notified().await;
                if let Err(e) = client.batch_execute(FLUSH).await {
                    // The WAL writer still flushes the watermarks, only later.
                    tracing::warn!(error = %e, "snapshot WAL flush failed");
                    return;
                }
            }
        });
        Flusher { wake, _task: super::AbortOnDrop(task) }
    }

    /// Flushes what the WAL holds now, soon.
    pub fn flush(&self) {
        self.wake.notify_one();
    }
}

/// The output of COPY statement `sql` (of a chunk of up to `limit` rows).
async fn copy_out(client: &tokio_postgres::Client, sql: &str, limit: usize) -> Result<Vec<u8>, tokio_postgres::Error> {
    let copy = client.copy_out(sql).await?;
    futures::pin_mut!(copy);
    let mut out = Vec::new();
    while let Some(data) = copy.next().await {
        let data = data?;
        if out.is_empty() {
            // Room for a whole chunk of rows like the first (growing by doubling reallocated
            // and copied it ~twice per chunk); capped for very large chunks.
            out.reserve(data.len().saturating_mul(limit).min(32 << 20));
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// COPY output (text, or `binary`) without a row.
fn no_rows(data: &[u8], binary: bool) -> bool {
    match binary {
        true => binary::body(data).is_ok_and(|b| b == (-1i16).to_be_bytes()),
        false => data.is_empty(),
    }
}

/// Column `col` of the first row `sql` (simple queries, maybe several) returns.
async fn first_value(client: &tokio_postgres::Client, sql: &str, col: usize) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client.simple_query(sql).await?.into_iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(col).map(str::to_string)),
        _ => None,
    }).flatten())
}

/// COPY's binary format, for the types whose text Sluice prints exactly as PostgreSQL does
/// (with the session's `DateStyle = ISO`, `TimeZone = UTC`): printing timestamps is a good
/// part of the server's work in a text COPY.
pub mod binary {
    use super::super::types::oid;

    const BPCHAR: u32 = 1042;

    /// The types read in binary, each with its name without a modifier (a cast to it keeps
    /// the value).
    pub const TYPES: [(u32, &str); 11] = [
        (oid::BOOL, "bool"),
        (oid::INT2, "int2"),
        (oid::INT4, "int4"),
        (oid::INT8, "int8"),
        (oid::TEXT, "text"),
        (oid::VARCHAR, "varchar"),
        (BPCHAR, "bpchar"),
        (oid::UUID, "uuid"),
        (oid::DATE, "date"),
        (oid::TIMESTAMP, "timestamp"),
        (oid::TIMESTAMPTZ, "timestamptz"),
    ];

    /// The name of `type_oid` if it is read in binary (see [`TYPES`]).
    pub fn cast(type_oid: u32) -> Option<&'static str> {
        TYPES.iter().find(|t| t.0 == type_oid).map(|t| t.1)
    }

    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

    /// The tuples of a COPY's binary output: after its header (signature, flags, header
    /// extension). Err: no such header.
    pub fn body(data: &[u8]) -> Result<&[u8], String> {
        let bad = || "COPY output has no binary header".to_string();
        let rest = data.strip_prefix(SIGNATURE).ok_or_else(bad)?;
        let ext = rest.get(4..8).ok_or_else(bad)?;
        let ext = u32::from_be_bytes(ext.try_into().expect("4 bytes")) as usize;
        rest.get(8 + ext..).ok_or_else(bad)
    }

    /// Calls `value(column, bytes or None for NULL)` for each value of the tuples in `body`,
    /// which must end with the trailer. Returns the number of tuples and where the last
    /// one starts. Err: not that format, or what `value` returns.
    pub fn tuples(body: &[u8], columns: usize, mut value: impl FnMut(usize, Option<&[u8]>) -> Result<(), String>) -> Result<(usize, usize), String> {
        let (mut at, mut n, mut last) = (0, 0, 0);
        let take = |at: &mut usize, len: usize| -> Result<&[u8], String> {
            let v = body.get(*at..*at + len).ok_or_else(|| format!("binary COPY output ends inside a row (at byte {at})"))?;
            *at += len;
            Ok(v)
        };
        loop {
            let start = at;
            let count = i16::from_be_bytes(take(&mut at, 2)?.try_into().expect("2 bytes"));
            if count == -1 {
                return match at == body.len() {
                    true => Ok((n, last)),
                    false => Err(format!("binary COPY output goes on after its trailer ({} bytes)", body.len() - at)),
                };
            }
            if count as usize != columns {
                return Err(format!("binary COPY row has {count} values, not {columns}"));
            }
            for col in 0..columns {
                let len = i32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
                match len {
                    -1 => value(col, None)?,
                    len if len < 0 => return Err(format!("binary COPY value of length {len}")),
                    len => value(col, Some(take(&mut at, len as usize)?))?,
                }
            }
            (n, last) = (n + 1, start);
        }
    }

    /// Writes value `v` of type `type_oid` (one of [`TYPES`]) in the binary format as JSON:
    /// what [`super::super::types::write_json`] writes for its text ([`text`]), without the
    /// text for the common types (`scratch`: room for the others' text). Err: not a value
    /// of that type.
    pub fn json(type_oid: u32, v: &[u8], out: &mut Vec<u8>, scratch: &mut String) -> Result<(), String> {
        match type_oid {
            oid::BOOL => out.extend_from_slice(if boolean(type_oid, v)? { b"true" } else { b"false" }),
            oid::INT2 | oid::INT4 | oid::INT8 => out.extend_from_slice(itoa::Buffer::new().format(integer(type_oid, v)?).as_bytes()),
            oid::TEXT | oid::VARCHAR | BPCHAR => {
                if !crate::write_json_str(v, out) {
                    return Err(format!("COPY value is not UTF-8: {:?}", String::from_utf8_lossy(v)));
                }
            }
            oid::TIMESTAMPTZ if timestamptz_json(v, out) => {}
            _ => {
                scratch.clear();
                text(type_oid, v, scratch)?;
                super::super::types::write_json(type_oid, scratch, out);
            }
        }
        Ok(())
    }

    /// A `timestamptz` in years 1 to 9999 as JSON (`"2026-01-05T10:00:00.120Z"`: the
    /// fraction in 3 or 6 digits, as chrono's `AutoSi` and `types::write_json` write it).
    /// False, writing nothing, for anything else.
    fn timestamptz_json(v: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(v) = <[u8; 8]>::try_from(v) else { return false };
        let (days, secs, frac) = split_micros(i64::from_be_bytes(v));
        let (year, month, day) = civil(days);
        // (Also refuses ±infinity, i64::MAX and MIN: years past 290,000.)
        if !(1..=9999).contains(&year) {
            return false;
        }
        out.push(b'"');
        for (n, width, sep) in [(year, 4, b'-'), (month, 2, b'-'), (day, 2, b'T'), (secs / 3600, 2, b':'), (secs / 60 % 60, 2, b':'), (secs % 60, 2, b'.')] {
            push_digits(out, n, width);
            out.push(sep);
        }
        match frac {
            0 => {
                out.pop(); // the '.'
            }
            f if f % 1000 == 0 => push_digits(out, f / 1000, 3),
            f => push_digits(out, f, 6),
        }
        out.extend_from_slice(b"Z\"");
        true
    }

    /// `n` (0 to 10^width - 1) in `width` digits.
    fn push_digits(out: &mut Vec<u8>, n: i64, width: usize) {
        let at = out.len();
        out.resize(at + width, b'0');
        let mut n = n;
        for d in out[at..].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }

    /// Writes value `v` of type `type_oid` (one of [`TYPES`]) in the binary format as the
    /// text PostgreSQL prints for it. Err: not a value of that type.
    pub fn text(type_oid: u32, v: &[u8], out: &mut String) -> Result<(), String> {
        let bad = || wrong_size(type_oid, v);
        match type_oid {
            oid::BOOL => out.push(if boolean(type_oid, v)? { 't' } else { 'f' }),
            oid::INT2 | oid::INT4 | oid::INT8 => out.push_str(itoa::Buffer::new().format(integer(type_oid, v)?)),
            oid::TEXT | oid::VARCHAR | BPCHAR => out.push_str(std::str::from_utf8(v).map_err(|e| format!("COPY value is not UTF-8: {e}"))?),
            oid::UUID => {
                let v: &[u8; 16] = v.try_into().map_err(|_| bad())?;
                for (i, b) in v.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        out.push('-');
                    }
                    out.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
                    out.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
                }
            }
            oid::DATE => match i32::from_be_bytes(v.try_into().map_err(|_| bad())?) {
                i32::MAX => out.push_str("infinity"),
                i32::MIN => out.push_str("-infinity"),
                days => {
                    let year = date(days as i64, out);
                    bc(year, out);
                }
            },
            oid::TIMESTAMP | oid::TIMESTAMPTZ => match i64::from_be_bytes(v.try_into().map_err(|_| bad())?) {
                i64::MAX => out.push_str("infinity"),
                i64::MIN => out.push_str("-infinity"),
                us => {
                    let (days, secs, frac) = split_micros(us);
                    let year = date(days, out);
                    out.push(' ');
                    two(out, secs / 3600);
                    out.push(':');
                    two(out, secs / 60 % 60);
                    out.push(':');
                    two(out, secs % 60);
                    if frac != 0 {
                        // Six digits, the trailing zeros left out.
                        let (mut digits, mut f) = ([b'0'; 6], frac);
                        for d in digits.iter_mut().rev() {
                            *d = b'0' + (f % 10) as u8;
                            f /= 10;
                        }
                        let end = 6 - (0..6).take_while(|i| frac % 10i64.pow(i + 1) == 0).count();
                        out.push('.');
                        out.push_str(std::str::from_utf8(&digits[..end]).expect("digits"));
                    }
                    if type_oid == oid::TIMESTAMPTZ {
                        out.push_str("+00");
                    }
                    bc(year, out);
                }
            },
            _ => return Err(format!("type {type_oid} is not read in binary")),
        }
        Ok(())
    }

    /// Writes day `days` since 2000-01-01 (proleptic Gregorian) as `YYYY-MM-DD` (at least
    /// four digits of year; years before 1 as 1 BC, 2 BC, ...: the caller adds ` BC`).
    /// Returns the astronomical year (0 = 1 BC).
    fn date(days: i64, out: &mut String) -> i64 {
        let (year, month, day) = civil(days);
        let shown = if year > 0 { year } else { 1 - year };
        let mut num = itoa::Buffer::new();
        let shown = num.format(shown);
        for _ in shown.len()..4 {
            out.push('0');
        }
        out.push_str(shown);
        out.push('-');
        two(out, month);
        out.push('-');
        two(out, day);
        year
    }

    fn wrong_size(type_oid: u32, v: &[u8]) -> String {
        format!("binary COPY value of type {type_oid} is {} bytes", v.len())
    }

    /// A `bool` value. Err: not one byte.
    fn boolean(type_oid: u32, v: &[u8]) -> Result<bool, String> {
        match v {
            [b] => Ok(*b != 0),
            _ => Err(wrong_size(type_oid, v)),
        }
    }

    /// A value of integer type `type_oid` (int2, int4 or int8). Err: not of its width.
    fn integer(type_oid: u32, v: &[u8]) -> Result<i64, String> {
        let bad = |_| wrong_size(type_oid, v);
        Ok(match type_oid {
            oid::INT2 => i16::from_be_bytes(v.try_into().map_err(bad)?).into(),
            oid::INT4 => i32::from_be_bytes(v.try_into().map_err(bad)?).into(),
            _ => i64::from_be_bytes(v.try_into().map_err(bad)?),
        })
    }

    /// A timestamp's microseconds since 2000-01-01 00:00 (UTC for timestamptz) as (days since
    /// then, seconds into the day, microseconds into the second).
    fn split_micros(us: i64) -> (i64, i64, i64) {
        const DAY: i64 = 86_400_000_000;
        let (days, time) = (us.div_euclid(DAY), us.rem_euclid(DAY));
        (days, time / 1_000_000, time % 1_000_000)
    }

    /// Day `days` since 2000-01-01 (proleptic Gregorian) as (astronomical year, month, day).
    fn civil(days: i64) -> (i64, i64, i64) {
        // Howard Hinnant's days-to-civil, from 1970-01-01 (10,957 days before 2000-01-01).
        let z = days + 10_957 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        (yoe + era * 400 + i64::from(month <= 2), month, day)
    }

    /// `n` (0 to 99) as two digits.
    fn two(out: &mut String, n: i64) {
        out.push(char::from(b'0' + (n / 10) as u8));
        out.push(char::from(b'0' + (n % 10) as u8));
    }

    fn bc(year: i64, out: &mut String) {
        if year <= 0 {
            out.push_str(" BC");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_are_the_values() {
        let mut rows = Rows::new(3);
        rows.push_copy(b"1\ta\\tb\\\\c\\nd\t\\N\n2\t\t\\r\\b\\f\\v\\\\N\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows.get(0, 0), rows.get(0, 1), rows.get(0, 2)), (Some("1"), Some("a\tb\\c\nd"), None));
        assert_eq!((rows.get(1, 0), rows.get(1, 1), rows.get(1, 2)), (Some("2"), Some(""), Some("\r\u{8}\u{c}\u{b}\\N")));
        assert!(rows.push_copy(b"1\t2\n").unwrap_err().contains("2 values, not 3"));
        assert!(rows.push_copy(b"1\t2\t3\\\n").unwrap_err().contains("backslash"));
        assert!(rows.push_copy(b"1\t2\t\xff\n").unwrap_err().contains("UTF-8"));
    }

    /// Table `public.t` with these columns (name, type oid, type, part of the key).
    fn table(columns: &[(&str, u32, &str, bool)]) -> TableInfo {
        let columns = columns.iter().map(|&(n, oid, t, key)| (n.to_string(), oid, t.to_string(), key)).collect();
        TableInfo { schema: "public".into(), name: "t".into(), columns }
    }

    #[test]
    fn copied_text_is_split_when_asked() {
        let info = table(&[("note", 25, "text", false), ("id", 20, "bigint", true)]);
        let copied = Copied::new(Rows::new(2), b"a\\nb\t1\n\\N\t22\n".to_vec(), None).unwrap();
        assert_eq!(copied.len(), 2);
        assert_eq!(copied.last_key(&info).unwrap(), Some(vec!["22".to_string()]));
        let rows = copied.rows().unwrap();
        assert_eq!((rows.len(), rows.get(0, 0), rows.get(0, 1), rows.get(1, 0), rows.get(1, 1)), (2, Some("a\nb"), Some("1"), None, Some("22")));
        // Rows read as rows (a snapshot of some keys).
        let mut keyed = Rows::new(2);
        keyed.push(Some("x"));
        keyed.push(Some("7"));
        let copied = Copied::new(keyed, Vec::new(), None).unwrap();
        assert_eq!((copied.len(), copied.last_key(&info).unwrap()), (1, Some(vec!["7".to_string()])));
        let empty = Copied::new(Rows::new(2), Vec::new(), None).unwrap();
        assert!(empty.is_empty() && empty.last_key(&info).unwrap().is_none());
        // Not COPY text: found when split, not taken for rows.
        assert!(Copied::new(Rows::new(2), b"1\t2\t3\n".to_vec(), None).unwrap().rows().unwrap_err().contains("3 values, not 2"));
        assert!(Copied::new(Rows::new(2), b"1\t2\t3\n".to_vec(), None).unwrap().last_key(&info).is_err());
    }

    #[test]
    fn binary_copy_output_is_read_or_refused() {
        let info = table(&[("id", 20, "bigint", true), ("note", 25, "text", false)]);
        let types = info.binary().unwrap();
        let mut data = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\x02ab".to_vec(); // header, 2 bytes of extension
        for (id, note) in [(7i64, Some("x\ty")), (-1, None)] {
            data.extend_from_slice(&2i16.to_be_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&id.to_be_bytes());
            match note {
                Some(n) => {
                    data.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    data.extend_from_slice(n.as_bytes());
                }
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let copied = Copied::new(Rows::new(2), data.clone(), Some(types.clone())).unwrap();
        assert_eq!((copied.len(), copied.last_key(&info).unwrap()), (2, Some(vec!["-1".to_string()])));
        let rows = copied.rows().unwrap();
        let text = |r, c| rows.text(r, c).unwrap().map(|t| t.into_owned());
        assert_eq!((text(0, 0), text(0, 1), text(1, 0), text(1, 1)), (Some("7".into()), Some("x\ty".into()), Some("-1".into()), None));
        let mut json = Vec::new();
        for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            rows.write_json(r, c, types[c], &mut json, &mut String::new()).unwrap();
            json.push(b' ');
        }
        assert_eq!(String::from_utf8(json).unwrap(), "7 \"x\\ty\" -1 null ");
        // Cut short, gone on after the trailer, a row of another width, no header.
        assert!(Copied::new(Rows::new(2), data[..data.len() - 3].to_vec(), Some(types.clone())).unwrap_err().contains("ends inside a row"));
        assert!(Copied::new(Rows::new(2), [&data[..], b"x"].concat(), Some(types.clone())).unwrap_err().contains("after its trailer"));
        assert!(Copied::new(Rows::new(3), data.clone(), Some(vec![20, 25, 25])).unwrap_err().contains("2 values, not 3"));
        assert!(Copied::new(Rows::new(2), data[1..].to_vec(), Some(types.clone())).unwrap_err().contains("no binary header"));
        // A value of the wrong size for its type: refused when written.
        let rows = Copied::new(Rows::new(2), data, Some(vec![23, 25])).unwrap().rows().unwrap();
        assert!(rows.write_json(0, 0, 23, &mut Vec::new(), &mut String::new()).unwrap_err().contains("type 23 is 8 bytes"));
        assert!(rows.text(0, 0).unwrap_err().contains("type 23 is 8 bytes"));
    }

    proptest::proptest! {
        /// Binary COPY output: any bytes are read or refused, never a panic, and so is any
        /// value of any type read in binary.
        #[test]
        fn binary_copy_any_bytes(noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96), t in 0..binary::TYPES.len()) {
            let mut text = String::new();
            let _ = binary::text(binary::TYPES[t].0, &noise, &mut text);
            let with_header = [&b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"[..], &noise].concat();
            for data in [noise.clone(), with_header] {
                let types = vec![binary::TYPES[t].0, binary::TYPES[(t + 1) % binary::TYPES.len()].0];
                if let Ok(c) = Copied::new(Rows::new(2), data, Some(types.clone())) {
                    let _ = c.last_key(&table(&[("a", 0, "", true), ("b", 0, "", false)]));
                    if let Ok(rows) = c.rows() {
                        for r in 0..rows.len() {
                            for c in 0..2 {
                                let _ = rows.write_json(r, c, types[c], &mut Vec::new(), &mut String::new());
                                let _ = rows.text(r, c);
                            }
                        }
                    }
                }
            }
        }

        /// A binary value's JSON is what the JSON of its text would be (the events written
        /// from binary COPY are those written from text COPY), and refused alike.
        #[test]
        fn binary_json_is_the_json_of_the_text(t in 0..binary::TYPES.len(), n in proptest::prelude::any::<i64>(),
                                               near in -200_000i64 * 86_400_000_000..3_000_000 * 86_400_000_000,
                                               ms in proptest::prelude::any::<bool>(), s in "(?s).{0,8}", noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..17)) {
            let ty = binary::TYPES[t].0;
            // A timestamp within years ~1450 to ~10200 (some on whole milliseconds), or any.
            let near = if ms { near - near % 1000 } else { near };
            let values: Vec<Vec<u8>> = vec![n.to_be_bytes().to_vec(), near.to_be_bytes().to_vec(), (n as i32).to_be_bytes().to_vec(),
                                             (n as i16).to_be_bytes().to_vec(), vec![n as u8], s.clone().into_bytes(), noise.clone(),
                                             i64::MAX.to_be_bytes().to_vec(), i64::MIN.to_be_bytes().to_vec(), i32::MAX.to_be_bytes().to_vec()];
            for v in values {
                let mut text = String::new();
                let (mut json, mut scratch) = (Vec::new(), String::new());
                match binary::text(ty, &v, &mut text) {
                    Ok(()) => {
                        binary::json(ty, &v, &mut json, &mut scratch).unwrap();
                        let mut want = Vec::new();
                        super::super::types::write_json(ty, &text, &mut want);
                        proptest::prop_assert_eq!(String::from_utf8(json).unwrap(), String::from_utf8(want).unwrap(), "{} {:?}", ty, text);
                    }
                    Err(_) => proptest::prop_assert!(binary::json(ty, &v, &mut json, &mut scratch).is_err()),
                }
            }
        }

        /// Any values, written as COPY writes them, read back as they were; any bytes read
        /// as rows or refused, never a panic.
        #[test]
        fn copy_rows_round_trip(rows in proptest::collection::vec(proptest::collection::vec(proptest::option::of("(?s).{0,12}"), 2), 0..20),
                                noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut text = String::new();
            for r in &rows {
                let values: Vec<String> = r.iter().map(|v| match v {
                    None => "\\N".to_string(),
                    Some(v) => v.chars().map(|c| match c {
                        '\\' => "\\\\".to_string(), '\n' => "\\n".to_string(), '\r' => "\\r".to_string(), '\t' => "\\t".to_string(),
                        '\u{8}' => "\\b".to_string(), '\u{c}' => "\\f".to_string(), '\u{b}' => "\\v".to_string(), c => c.to_string(),
                    }).collect(),
                }).collect();
                text.push_str(&values.join("\t"));
                text.push('\n');
            }
            let mut read = Rows::new(2);
            read.push_copy(text.as_bytes()).unwrap();
            proptest::prop_assert_eq!(read.len(), rows.len());
            for (i, r) in rows.iter().enumerate() {
                for (j, v) in r.iter().enumerate() {
                    proptest::prop_assert_eq!(read.get(i, j), v.as_deref());
                }
            }
            let _ = Rows::new(2).push_copy(&noise);
        }
    }

    #[test]
    fn chunk_queries() {
        let t = TableInfo {
            schema: "public".into(),
            name: "Order Items".into(),
            columns: vec![
                ("order_id".into(), 20, "bigint".into(), true),
                ("line".into(), 23, "integer".into(), true),
                ("note".into(), 25, "text".into(), false),
            ],
        };
        assert_eq!(
            t.chunk_copy(Some(&["it's".into(), "a\\b".into()]), 100, false, None),
            "COPY (SELECT t.\"order_id\", t.\"line\", t.\"note\" FROM \"public\".\"Order Items\" t \
             WHERE (t.\"order_id\", t.\"line\") > (E'it''s'::bigint, E'a\\\\b'::integer) ORDER BY t.\"order_id\", t.\"line\" LIMIT 100) TO STDOUT"
        );
        assert!(t.chunk_copy(None, 5, false, Some("g")).ends_with("t WHERE g ORDER BY t.\"order_id\", t.\"line\" LIMIT 5) TO STDOUT"));
        assert!(t.chunk_copy(Some(&["1".into(), "2".into()]), 5, false, Some("g")).contains("(E'1'::bigint, E'2'::integer) AND g ORDER BY"));
        assert_eq!(
            t.chunk_copy(None, 5, true, None),
            "COPY (SELECT t.\"order_id\"::pg_catalog.int8, t.\"line\"::pg_catalog.int4, t.\"note\"::pg_catalog.text FROM \"public\".\"Order Items\" t \
             ORDER BY t.\"order_id\", t.\"line\" LIMIT 5) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(t.binary(), Some(vec![20, 23, 25]));
        assert_eq!(
            t.keys_sql(5),
            "SELECT t.\"order_id\"::text AS c0, t.\"line\"::text AS c1, t.\"note\"::text AS c2 FROM \"public\".\"Order Items\" t \
             WHERE (t.\"order_id\", t.\"line\") IN (SELECT * FROM unnest($1::text[]::bigint[], $2::text[]::integer[])) ORDER BY t.\"order_id\", t.\"line\" LIMIT 5"
        );
    }
}
