//! Chunked snapshots of MySQL/MariaDB tables, each chunk at an exact binlog position.
//!
//! A chunk is read in its own `START TRANSACTION WITH CONSISTENT SNAPSHOT`, whose binlog
//! position MariaDB reports (`binlog_snapshot_file`, `binlog_snapshot_pos`): the rows read
//! are the table as of that position, every transaction before it and none after. The
//! source puts the chunk's rows into the change streams exactly there, between the last
//! transaction before the position and the first after it, so a row's events stay in the
//! order the database applied them and the mirror converges, whatever was written during
//! the read. This is DBLog's watermark reconciliation with the window shrunk to one point:
//! the database names the point, so no watermark table (and no write to the source) is
//! needed. InnoDB's consistent read takes no locks beyond a plain SELECT's.
//!
//! MySQL reports no such position: there, with the `watermark_table` option, chunks are read
//! between watermarks instead (see [`read_between_watermarks`]).

use super::types::Kind;
use mysql_async::prelude::*;
use mysql_async::{Conn, Value};

/// A table's columns as the snapshot reads them.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub db: String,
    pub name: String,
    pub columns: Vec<(String, Kind)>,
    /// The primary key's columns (indexes into `columns`), in key order.
    pub keys: Vec<usize>,
}

/// A read chunk: the binlog position it is as of, and its rows.
pub struct ChunkRows {
    pub file: String,
    pub pos: u64,
    pub rows: Vec<Vec<Value>>,
}

impl TableInfo {
    /// The primary key's column names, in key order.
    pub fn key_names(&self) -> Vec<&str> {
        self.keys.iter().map(|&i| self.columns[i].0.as_str()).collect()
    }
}

fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// The table's columns and primary key; None if it does not exist.
pub async fn table_info(conn: &mut Conn, db: &str, table: &str) -> mysql_async::Result<Option<TableInfo>> {
    // The columns (`c`, in order) and the primary key's (`k`, in key order) in one round trip
    // (a snapshot reads them for every chunk).
    let rows: Vec<(String, String, String, String)> = conn
        .exec(
            "SELECT * FROM (SELECT 'c' AS what, ORDINAL_POSITION AS n, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             UNION ALL SELECT 'k', SEQ_IN_INDEX, COLUMN_NAME, '', '' FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY') t ORDER BY what, n",
            (db, table, db, table),
        )
        .await?
        .into_iter()
        .map(|(what, _n, name, dt, ct): (String, u64, String, String, String)| (what, name, dt, ct))
        .collect();
    let columns: Vec<(String, Kind)> = rows.iter().filter(|r| r.0 == "c").map(|(_, n, dt, ct)| (n.clone(), Kind::of_schema(dt, ct))).collect();
    if columns.is_empty() {
        return Ok(None);
    }
    let keys = rows.iter().filter(|r| r.0 == "k").filter_map(|(_, k, ..)| columns.iter().position(|(n, _)| n == k)).collect();
    Ok(Some(TableInfo { db: db.to_string(), name: table.to_string(), columns, keys }))
}

/// Every base table outside the system databases.
pub async fn all_tables(conn: &mut Conn) -> mysql_async::Result<Vec<(String, String)>> {
    conn.query(
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' \
         AND TABLE_SCHEMA NOT IN ('mysql', 'sys', 'information_schema', 'performance_schema') ORDER BY 1, 2",
    )
    .await
}

/// A key value as stored in a snapshot task (text) back to a query parameter.
fn key_param(kind: &Kind, text: &str) -> Value {
    match kind {
        Kind::Binary => {
            let h = text.trim_start_matches("\\x");
            Value::Bytes((0..h.len() / 2).filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()).collect())
        }
        Kind::Timestamp | Kind::DateTime => Value::Bytes(text.trim_end_matches('Z').replace('T', " ").into_bytes()),
        _ => Value::Bytes(text.as_bytes().to_vec()),
    }
}

/// The chunk after key `after` (or the rows with primary key in `keys`), up to `limit` rows
/// in key order: the statement and its parameters.
fn chunk_query(info: &TableInfo, after: Option<&[String]>, keys: Option<&[Vec<String>]>, limit: usize) -> (String, Vec<Value>) {
    let cols = info.columns.iter().map(|(n, _)| quote(n)).collect::<Vec<_>>().join(", ");
    let key_cols: Vec<String> = info.keys.iter().map(|&i| quote(&info.columns[i].0)).collect();
    let mut params: Vec<Value> = Vec::new();
    let filter = match (keys, after) {
        (Some(keys), _) => {
            for key in keys {
                params.extend(info.keys.iter().zip(key).map(|(&k, v)| key_param(&info.columns[k].1, v)));
            }
            let one = format!("({})", vec!["?"; key_cols.len()].join(", "));
            format!("WHERE ({}) IN ({})", key_cols.join(", "), vec![one; keys.len()].join(", "))
        }
        (None, Some(after)) => {
            // (k1, k2, ...) > (a1, a2, ...), spelled out so that every server uses the key's index.
            let mut ors = Vec::new();
            for i in 0..key_cols.len() {
                let mut ands = Vec::new();
                for j in 0..i {
                    ands.push(format!("{} = ?", key_cols[j]));
                    params.push(key_param(&info.columns[info.keys[j]].1, &after[j]));
                }
                ands.push(format!("{} > ?", key_cols[i]));
                params.push(key_param(&info.columns[info.keys[i]].1, &after[i]));
                ors.push(format!("({})", ands.join(" AND ")));
            }
            format!("WHERE {}", ors.join(" OR "))
        }
        (None, None) => String::new(),
    };
    let sql = format!("SELECT {cols} FROM {}.{} {filter} ORDER BY {} LIMIT {limit}", quote(&info.db), quote(&info.name), key_cols.join(", "));
    (sql, params)
}

/// Reads the chunk after key `after` (or the rows with primary key in `keys`), up to
/// `limit` rows in key order, with the binlog position it is as of (MariaDB's consistent
/// read position).
pub async fn read_chunk(conn: &mut Conn, info: &TableInfo, after: Option<&[String]>, keys: Option<&[Vec<String>]>, limit: usize) -> anyhow::Result<ChunkRows> {
    let (sql, params) = chunk_query(info, after, keys, limit);
    let t0 = std::time::Instant::now();
    // The transaction and its binlog position in one round trip.
    let mut begun = conn.query_iter("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY; SHOW SESSION STATUS LIKE 'binlog_snapshot_%'").await?;
    let _: Vec<mysql_async::Row> = begun.collect().await?;
    let status: mysql_async::Result<Vec<(String, String)>> = begun.collect().await;
    begun.drop_result().await?;
    let mut select = std::time::Duration::ZERO;
    let result = async {
        let status = status?;
        let get = |k: &str| status.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        let (Some(file), Some(pos)) = (get("binlog_snapshot_file"), get("binlog_snapshot_position")) else {
            anyhow::bail!("the server does not report a consistent snapshot's binlog position (binlog_snapshot_file): snapshots need MariaDB 10.5 or later");
        };
        let t = std::time::Instant::now();
        let rows: Vec<mysql_async::Row> = conn.exec(sql.as_str(), params).await?;
        select = t.elapsed();
        Ok(ChunkRows { file, pos: pos.parse()?, rows: rows.into_iter().map(|r| r.unwrap()).collect() })
    }
    .await;
    // Read only: a commit ends it either way.
    conn.query_drop("COMMIT").await?;
    tracing::debug!(took = ?t0.elapsed(), ?select, "snapshot chunk read");
    result
}

// Watermarks (the `watermark_table` option), for servers that do not report a consistent
// read's position (MySQL): DBLog's method as published. For each chunk the source commits a
// low watermark (a row update of the watermark table), selects the chunk in a statement of
// its own, and commits a high watermark. The server commits transactions to InnoDB in
// binlog order (MariaDB always, MySQL with binlog_order_commits = ON, its default) and
// answers a commit only after that, so the SELECT sees every transaction before the low
// watermark in the binlog; everything it sees was in the binlog before the high
// watermark. In the binlog stream the source drops from the chunk every key the table's
// changes touch between the two watermarks (the change is as new as the row read, or
// newer) and writes the rest as `read` events at the high watermark.

/// Creates the watermark table if it is missing. Err: it is missing and cannot be created.
pub async fn ensure_watermark_table(conn: &mut Conn, (db, table): &(String, String)) -> anyhow::Result<()> {
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (source VARCHAR(191) NOT NULL PRIMARY KEY, mark VARCHAR(255) NOT NULL) ENGINE=InnoDB",
        quote(db),
        quote(table)
    );
    if let Err(e) = conn.query_drop(create.as_str()).await {
        if table_info(conn, db, table).await?.is_none() {
            anyhow::bail!("the watermark table {db}.{table} does not exist and could not be created ({e}): create it with `{create}`");
        }
    }
    Ok(())
}

/// Commits a watermark: `mark` in the source's row of the watermark table.
pub async fn write_watermark(conn: &mut Conn, (db, table): &(String, String), source: &str, mark: &str) -> anyhow::Result<()> {
    let sql = format!("INSERT INTO {}.{} (source, mark) VALUES (?, ?) ON DUPLICATE KEY UPDATE mark = ?", quote(db), quote(table));
    conn.exec_drop(sql, (source, mark, mark)).await.map_err(|e| anyhow::anyhow!("snapshot watermark in {db}.{table}: {e}"))
}

/// Reads the chunk after key `after` (or the rows with primary key in `keys`), up to
/// `limit` rows in key order, in one statement between committed watermarks `low` and
/// `high`.
#[allow(clippy::too_many_arguments)]
pub async fn read_between_watermarks(
    conn: &mut Conn,
    watermarks: &(String, String),
    source: &str,
    (low, high): (&str, &str),
    info: &TableInfo,
    after: Option<&[String]>,
    keys: Option<&[Vec<String>]>,
    limit: usize,
) -> anyhow::Result<Vec<Vec<Value>>> {
    let (sql, params) = chunk_query(info, after, keys, limit);
    write_watermark(conn, watermarks, source, low).await?;
    let rows: Vec<mysql_async::Row> = conn.exec(sql.as_str(), params).await?;
    write_watermark(conn, watermarks, source, high).await?;
    Ok(rows.into_iter().map(|r| r.unwrap()).collect())
}
