//! The PostgreSQL sink: keeps a table equal to the latest record per key.
//!
//! Each record replaces its key's row (upsert; columns the record lacks become NULL), or
//! deletes it when it is a tombstone: a record with no field besides its key, or one matching
//! `delete_when`. A write reduces its records to the last one per key in log order, then runs
//! one transaction: `DELETE` of the tombstoned keys and one `INSERT ... ON CONFLICT DO UPDATE`
//! of the rest, both reading the rows as one JSON parameter through
//! `json_populate_recordset`, so PostgreSQL converts every value to its column's type.
//!
//! Idempotent: a flush re-run after a crash writes the same final values again, so the table
//! ends as if each record had been applied once (effectively-once by key).
//!
//! With `create` (the default) the table is created from the first records (the key as
//! primary key), a column is added when a new field appears, and a `bigint` column widens to
//! `double precision` when a fraction arrives, as the lake does.

use deltalake::arrow::array::{Array, RecordBatch};
use deltalake::arrow::datatypes::DataType;
use futures::future::BoxFuture;
use serde_json::{Map as JsonMap, Value};
use sluice_core::pipeline::PostgresSinkConfig;
use sluice_pipeline::{rows_to_json, ExternalSink};
use std::collections::HashMap;
use tokio::sync::Mutex;

pub struct PostgresSink {
    cfg: PostgresSinkConfig,
    date_column: String,
    /// The table name as SQL (`"schema"."name"`).
    table_sql: String,
    conn: Mutex<Option<Conn>>,
}

struct Conn {
    client: tokio_postgres::Client,
    /// The table's columns and their types (empty: the table does not exist).
    columns: Vec<(String, String)>,
}

/// What a write does to one key.
struct Change {
    /// Position of the record in the write (the last one per key wins).
    seq: usize,
    /// The key fields.
    key: JsonMap<String, Value>,
    /// None: delete.
    row: Option<JsonMap<String, Value>>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The PostgreSQL type for a column created from an Arrow field.
fn pg_type(t: &DataType) -> &'static str {
    match t {
        DataType::Boolean => "boolean",
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
            "bigint"
        }
        DataType::UInt64 | DataType::Decimal128(..) | DataType::Decimal256(..) => "numeric",
        DataType::Float16 | DataType::Float32 | DataType::Float64 => "double precision",
        DataType::Timestamp(..) => "timestamptz",
        DataType::Date32 | DataType::Date64 => "date",
        DataType::Struct(_) | DataType::List(_) | DataType::LargeList(_) | DataType::Map(..) => "jsonb",
        DataType::Dictionary(_, v) => pg_type(v),
        _ => "text",
    }
}

impl PostgresSink {
    pub fn new(cfg: &PostgresSinkConfig, date_column: &str) -> anyhow::Result<PostgresSink> {
        crate::pg_tls::parse(&cfg.url)?.tls()?;
        let table_sql = cfg.table.split('.').map(quote).collect::<Vec<_>>().join(".");
        Ok(PostgresSink { cfg: cfg.clone(), date_column: date_column.to_string(), table_sql, conn: Mutex::new(None) })
    }

    /// The last change per key, in log order of those last records; and the Arrow type of
    /// every field seen (for creating columns).
    fn changes(&self, batches: &[RecordBatch]) -> anyhow::Result<(Vec<Change>, Vec<(String, DataType)>)> {
        let mut by_key: HashMap<String, Change> = HashMap::new();
        let mut fields: Vec<(String, DataType)> = Vec::new();
        let mut seq = 0;
        for b in batches {
            let deletes = match &self.cfg.delete_when {
                Some(sql) => Some(crate::texts(&[("d".to_string(), sql.clone())], b)?.remove(0)),
                None => None,
            };
            for f in b.schema().fields() {
                if !rows_to_json_keeps(f.name(), f.data_type(), &self.date_column) {
                    continue;
                }
                match fields.iter_mut().find(|(n, _)| n == f.name()) {
                    None => fields.push((f.name().clone(), f.data_type().clone())),
                    // A fraction in any batch makes the column a double.
                    Some((_, t)) if f.data_type().is_floating() => *t = f.data_type().clone(),
                    Some(_) => {}
                }
            }
            for (row, json) in rows_to_json(b, &self.date_column)?.iter().enumerate() {
                let obj: JsonMap<String, Value> = serde_json::from_slice(json)?;
                let mut key = JsonMap::new();
                for k in &self.cfg.key {
                    match obj.get(k) {
                        Some(v) if !v.is_null() => {
                            key.insert(k.clone(), v.clone());
                        }
                        _ => anyhow::bail!(
                            "postgres sink {}: key field `{k}` is missing or NULL in a record ({})",
                            self.cfg.table,
                            String::from_utf8_lossy(json)
                        ),
                    }
                }
                let id = serde_json::to_string(&key)?;
                let tombstone = obj.keys().all(|f| self.cfg.key.contains(f))
                    || deletes.as_ref().is_some_and(|d| d.is_valid(row) && d.value(row) == "true");
                by_key.insert(id, Change { seq, key, row: if tombstone { None } else { Some(obj) } });
                seq += 1;
            }
        }
        let mut changes: Vec<Change> = by_key.into_values().collect();
        changes.sort_by_key(|c| c.seq);
        Ok((changes, fields))
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let (client, _task) = crate::pg_tls::parse(&self.cfg.url)?.connect("postgres sink").await?;
        let mut conn = Conn { client, columns: Vec::new() };
        self.load_columns(&mut conn).await?;
        Ok(conn)
    }

    async fn load_columns(&self, conn: &mut Conn) -> anyhow::Result<()> {
        let rows = conn
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&self.table_sql],
            )
            .await?;
        conn.columns = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect();
        Ok(())
    }

    /// Creates the table or adds and widens columns so every field fits (with `create`).
    async fn ensure_columns(&self, conn: &mut Conn, fields: &[(String, DataType)]) -> anyhow::Result<()> {
        if !self.cfg.create {
            if conn.columns.is_empty() {
                anyhow::bail!("postgres table {} does not exist (create is off)", self.cfg.table);
            }
            return Ok(());
        }
        let mut ddl = Vec::new();
        if conn.columns.is_empty() {
            let mut cols = Vec::new();
            for k in &self.cfg.key {
                let t = fields.iter().find(|(n, _)| n == k).map_or("text", |(_, t)| pg_type(t));
                cols.push(format!("{} {t} NOT NULL", quote(k)));
            }
            for (n, t) in fields.iter().filter(|(n, _)| !self.cfg.key.contains(n)) {
                cols.push(format!("{} {}", quote(n), pg_type(t)));
            }
            let key = self.cfg.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
            ddl.push(format!("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({key}))", self.table_sql, cols.join(", ")));
        } else {
            for (n, t) in fields {
                match conn.columns.iter().find(|(c, _)| c == n) {
                    None => ddl.push(format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}", self.table_sql, quote(n), pg_type(t))),
                    Some((_, have)) if have == "bigint" && pg_type(t) == "double precision" => {
                        ddl.push(format!("ALTER TABLE {} ALTER COLUMN {} TYPE double precision", self.table_sql, quote(n)))
                    }
                    Some(_) => {}
                }
            }
        }
        if !ddl.is_empty() {
            conn.client.batch_execute(&ddl.join("; ")).await?;
            self.load_columns(conn).await?;
        }
        Ok(())
    }

    async fn apply(&self, conn: &mut Conn, changes: &[Change]) -> anyhow::Result<()> {
        let cols: Vec<&str> = conn.columns.iter().map(|(c, _)| c.as_str()).collect();
        for k in &self.cfg.key {
            if !cols.contains(&k.as_str()) {
                anyhow::bail!("postgres table {} has no column for key field `{k}`", self.cfg.table);
            }
        }
        let t = &self.table_sql;
        let keys = self.cfg.key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let deletes: Vec<&JsonMap<String, Value>> = changes.iter().filter(|c| c.row.is_none()).map(|c| &c.key).collect();
        let upserts: Vec<&JsonMap<String, Value>> = changes.iter().filter_map(|c| c.row.as_ref()).collect();
        let tx = conn.client.transaction().await?;
        if !deletes.is_empty() {
            let json = serde_json::to_string(&deletes)?;
            let sql = format!("DELETE FROM {t} WHERE ({keys}) IN (SELECT {keys} FROM json_populate_recordset(NULL::{t}, $1::text::json))");
            tx.execute(&sql, &[&json]).await?;
        }
        if !upserts.is_empty() {
            let json = serde_json::to_string(&upserts)?;
            let all = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
            let set: Vec<String> = cols.iter().filter(|c| !self.cfg.key.iter().any(|k| k == *c)).map(|c| format!("{0} = EXCLUDED.{0}", quote(c))).collect();
            let on_conflict = if set.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", set.join(", ")) };
            let sql = format!(
                "INSERT INTO {t} ({all}) SELECT {all} FROM json_populate_recordset(NULL::{t}, $1::text::json) ON CONFLICT ({keys}) {on_conflict}"
            );
            tx.execute(&sql, &[&json]).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Whether [`rows_to_json`] writes this column (system columns and NULL-typed ones are left out).
fn rows_to_json_keeps(name: &str, t: &DataType, date_column: &str) -> bool {
    !sluice_pipeline::step::is_system_column(name, date_column) && t != &DataType::Null
}

impl ExternalSink for PostgresSink {
    fn write<'a>(&'a self, batches: &'a [RecordBatch]) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move {
            let n: usize = batches.iter().map(|b| b.num_rows()).sum();
            let (changes, fields) = self.changes(batches)?;
            if changes.is_empty() {
                return Ok(n);
            }
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await.map_err(|e| anyhow::anyhow!("postgres {}: {e:#}", self.cfg.table))?);
            }
            let conn = guard.as_mut().expect("connected above");
            let result = async {
                self.ensure_columns(conn, &fields).await?;
                self.apply(conn, &changes).await
            }
            .await;
            if let Err(e) = result {
                // Reconnect (and re-read the columns) on the next write; the flush is retried.
                *guard = None;
                return Err(anyhow::anyhow!("postgres {}: {e:#}", self.cfg.table));
            }
            Ok(n)
        })
    }
}

/// The `lookup` source for a PostgreSQL table: one query per batch for the keys it needs,
/// `row_to_json` of each matching row. The keys are cast to the key column's type, so an index
/// on the column answers; a key that is no value of that type (`abc` for an integer column)
/// falls back, for that batch, to comparing the column as text.
pub struct PostgresLookup {
    cfg: sluice_core::pipeline::PostgresLookup,
    table: String,
    column: String,
    /// The connection and the typed query (the column's type is read on connect).
    client: Mutex<Option<(tokio_postgres::Client, String)>>,
}

impl PostgresLookup {
    pub fn new(cfg: &sluice_core::pipeline::PostgresLookup) -> anyhow::Result<PostgresLookup> {
        crate::pg_tls::parse(&cfg.url)?.tls()?;
        let table = cfg.table.split('.').map(quote).collect::<Vec<_>>().join(".");
        Ok(PostgresLookup { cfg: cfg.clone(), table, column: quote(&cfg.column), client: Mutex::new(None) })
    }

    fn sql(&self, condition: &str) -> String {
        format!("SELECT t.{c}::text, row_to_json(t)::text FROM {} t WHERE {condition}", self.table, c = self.column)
    }

    async fn connect(&self) -> anyhow::Result<(tokio_postgres::Client, String)> {
        let (client, _task) = crate::pg_tls::parse(&self.cfg.url)?.connect("postgres lookup").await?;
        let ty: Option<String> = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = to_regclass($1::text) AND a.attname = $2 AND NOT a.attisdropped",
                &[&self.table, &self.cfg.column],
            )
            .await?
            .map(|r| r.get(0));
        let ty = ty.ok_or_else(|| anyhow::anyhow!("table {} has no column {:?}", self.cfg.table, self.cfg.column))?;
        let typed = self.sql(&format!("t.{} = ANY($1::text[]::{ty}[])", self.column));
        Ok((client, typed))
    }
}

/// A key that is no value of the column's type (class 22: data exception).
fn bad_value(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

impl sluice_pipeline::LookupSource for PostgresLookup {
    fn get<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, anyhow::Result<HashMap<String, bytes::Bytes>>> {
        Box::pin(async move {
            let mut guard = self.client.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await.map_err(|e| anyhow::anyhow!("postgres {}: {e:#}", self.cfg.table))?);
            }
            let (client, typed) = guard.as_ref().expect("connected above");
            let result = match client.query(typed, &[&keys]).await {
                Err(e) if bad_value(&e) => client.query(&self.sql(&format!("t.{}::text = ANY($1)", self.column)), &[&keys]).await,
                r => r,
            };
            match result {
                Ok(rows) => Ok(rows
                    .iter()
                    .filter_map(|r| Some((r.get::<_, Option<String>>(0)?, bytes::Bytes::from(r.get::<_, String>(1)))))
                    .collect()),
                Err(e) => {
                    *guard = None;
                    Err(anyhow::anyhow!("postgres {}: {e}", self.cfg.table))
                }
            }
        })
    }
}
