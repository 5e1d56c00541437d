//! Delta Lake tables of the lake: one table per landed stream / pipeline output, under a lake
//! root.
//!
//! Everything table-format related is delegated to `deltalake` (delta-rs): Parquet writing with
//! statistics, the `_delta_log` commit protocol (put-if-absent of the next version's JSON, so a
//! commit is atomic: a process killed at any instant leaves either the whole commit — data files
//! + txn actions — visible or nothing), checkpoints and log cleanup. This module adds what Sluice
//! needs on top:
//!
//! * exactly-once bookkeeping: every append carries `SetTransaction` (txn) actions
//!   `(app_id, version)` in the same commit, and [`LakeTable::txn_version`] reads them back;
//! * schema evolution of appended batches (new columns and new nested struct fields) — see
//!   the `conform` submodule for why batches are conformed before deltalake sees them;
//! * checkpoints every `delta.checkpointInterval` commits (100) written after the commit, never
//!   failing it, and expired-log cleanup only when a checkpoint was written (deltalake's
//!   post-commit hook would otherwise list the whole `_delta_log` on every commit).
//!
//! A lake root is a local directory path or a URL (`file://…`, later `s3://…`): everything below
//! goes through deltalake's URL-based log stores, so another object store is a configuration
//! change (registering its deltalake storage handler), not a code change.

mod conform;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{DataType, Schema, SchemaRef};
use deltalake::datafusion::common::ScalarValue;
use deltalake::datafusion::logical_expr::{
    cast, ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use deltalake::datafusion::prelude::{ident, lit, SessionContext};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{StructType, Transaction};
use deltalake::logstore::object_store::path::Path as ObjectPath;
use deltalake::logstore::object_store::ObjectStore as _;
use deltalake::logstore::{LogStore as _, LogStoreRef};
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

/// Table properties every Sluice table is created with.
///
/// * `delta.checkpointInterval`: a checkpoint every 100 commits, so opening a table replays at
///   most ~100 JSON commits after the newest checkpoint (the Delta default, made explicit).
/// * `delta.logRetentionDuration`: commit JSONs older than this (and older than a checkpoint) are
///   deleted when a checkpoint is written. Time travel is not a Sluice feature, and the default
///   30 days would leave ~2.6 million files in `_delta_log` at one commit per second — listing
///   them (which every open/refresh/query does on a local file system) would dominate.
pub const TABLE_PROPERTIES: &[(&str, &str)] = &[
    ("delta.checkpointInterval", "100"),
    ("delta.logRetentionDuration", "interval 1 days"),
];

/// Errors of lake tables; every message names the table (or the lake root).
#[derive(thiserror::Error, Debug)]
pub enum LakeError {
    /// The table name cannot be used as a directory name under the lake root.
    #[error("invalid lake table name `{0}`: use letters, digits, `_`, `-` and `.` (not first)")]
    InvalidName(String),
    /// The lake root or table location cannot be used.
    #[error("lake table `{table}`: invalid location `{location}`: {message}")]
    InvalidLocation {
        table: String,
        location: String,
        message: String,
    },
    /// The lake root cannot be listed.
    #[error("lake root `{root}`: {message}")]
    Root { root: String, message: String },
    /// A batch cannot be stored in the table (type conflict with an existing column, a value
    /// that does not fit, a null in a non-nullable column). Nothing was written.
    #[error("lake table `{table}`: {message}")]
    Schema { table: String, message: String },
    /// An argument is inconsistent with the table (e.g. unknown partition column).
    #[error("lake table `{table}`: {message}")]
    Invalid { table: String, message: String },
    /// deltalake (storage, log, Parquet) failed.
    #[error("lake table `{table}`: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
}

impl LakeError {
    fn delta(table: &str) -> impl FnOnce(DeltaTableError) -> LakeError + '_ {
        move |source| LakeError::Delta {
            table: table.to_string(),
            source,
        }
    }
}

/// Whether `name` can be a table (directory) name under a lake root: 1-255 of `[A-Za-z0-9_.-]`,
/// not starting with `.`. Rejects anything that could escape the root (`/`, `..`).
pub fn is_valid_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A lake root: a local directory or an object-store URL.
#[derive(Debug, Clone)]
enum Root {
    Local(PathBuf),
    Url(Url),
}

impl Root {
    fn parse(root: &str) -> Result<Root, LakeError> {
        // Every table access starts here: make local tables power-loss safe first.
        crate::durable_store::install();
        match Url::parse(root) {
            // One-letter "schemes" are Windows drive letters (C:\lake).
            Ok(url) if url.scheme().len() > 1 => {
                if url.scheme() == "file" {
                    let path = url.to_file_path().map_err(|_| LakeError::Root {
                        root: root.to_string(),
                        message: "not a local file path".into(),
                    })?;
                    Ok(Root::Local(path))
                } else {
                    Ok(Root::Url(url))
                }
            }
            _ => Ok(Root::Local(PathBuf::from(root))),
        }
    }

    /// The table's location as a string deltalake accepts (local path or URL).
    fn table_location(&self, name: &str) -> String {
        match self {
            Root::Local(dir) => dir.join(name).to_string_lossy().into_owned(),
            Root::Url(url) => format!("{}/{}", url.as_str().trim_end_matches('/'), name),
        }
    }
}

fn check_name(name: &str) -> Result<(), LakeError> {
    if is_valid_table_name(name) {
        Ok(())
    } else {
        Err(LakeError::InvalidName(name.to_string()))
    }
}

/// Where `<root>/<name>` lives, if it may be a Delta table: `(location, url)`. For local roots
/// `None` unless `<root>/<name>/_delta_log` is a directory; for object stores the caller finds
/// out when loading (deltalake's `NotATable`).
async fn locate(root: &str, name: &str) -> Result<Option<(String, Url)>, LakeError> {
    let root = Root::parse(root)?;
    let location = root.table_location(name);
    if let Root::Local(dir) = &root {
        // Cheap negative answer without building a log store (which insists the path exists).
        let log_dir = dir.join(name).join("_delta_log");
        match tokio::fs::metadata(&log_dir).await {
            Ok(meta) if meta.is_dir() => {}
            _ => return Ok(None),
        }
    }
    let url = deltalake::ensure_table_uri(&location).map_err(|e| LakeError::InvalidLocation {
        table: name.to_string(),
        location: location.clone(),
        message: e.to_string(),
    })?;
    Ok(Some((location, url)))
}

/// The deltalake log store of `<root>/<name>`, for readers that load their own snapshots (the
/// query engine). `None` if the name is not a valid table name or (local roots) there is no
/// `_delta_log`; for object-store roots, loading a snapshot reports `NotATable` instead.
pub async fn table_log_store(root: &str, name: &str) -> Result<Option<LogStoreRef>, LakeError> {
    if !is_valid_table_name(name) {
        return Ok(None);
    }
    let Some((_, url)) = locate(root, name).await? else {
        return Ok(None);
    };
    let store = DeltaTableBuilder::from_url(url)
        .and_then(|b| b.build_storage())
        .map_err(LakeError::delta(name))?;
    Ok(Some(store))
}

/// Per-table file statistics from the Delta log (no data is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableFileStats {
    /// Sum of `numRecords` of the files' statistics; `None` if a file has no statistics.
    pub num_rows: Option<u64>,
    /// Number of active data files.
    pub num_files: u64,
    /// Total size of the active data files in bytes.
    pub size_bytes: u64,
}

/// One Delta table of the lake, loaded at some version. Not shared: one writer owns it.
pub struct LakeTable {
    name: String,
    location: String,
    table: DeltaTable,
    /// Latest txn version per app id at the loaded version (see [`LakeTable::txn_version`]).
    txns: HashMap<String, i64>,
}

impl std::fmt::Debug for LakeTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeTable")
            .field("name", &self.name)
            .field("location", &self.location)
            .field("version", &self.version())
            .finish()
    }
}

impl LakeTable {
    /// Opens `<root>/<name>` if it is a Delta table, else `None`.
    pub async fn open(root: &str, name: &str) -> Result<Option<LakeTable>, LakeError> {
        check_name(name)?;
        let Some((location, url)) = locate(root, name).await? else {
            return Ok(None);
        };
        let mut table = DeltaTableBuilder::from_url(url)
            .map_err(LakeError::delta(name))?
            .build()
            .map_err(LakeError::delta(name))?;
        match table.load().await {
            Ok(()) => {}
            // An empty or missing _delta_log (e.g. creation interrupted before version 0).
            Err(DeltaTableError::NotATable(_)) => return Ok(None),
            Err(e) => return Err(LakeError::delta(name)(e)),
        }
        let txns = read_txns(&table).await.map_err(LakeError::delta(name))?;
        Ok(Some(LakeTable {
            name: name.to_string(),
            location,
            table,
            txns,
        }))
    }

    /// Creates the table with this Arrow schema and partition columns (or opens it if it
    /// exists; then `schema` and `partition_columns` are not checked against it).
    pub async fn create(
        root: &str,
        name: &str,
        schema: &Schema,
        partition_columns: &[String],
    ) -> Result<LakeTable, LakeError> {
        if let Some(table) = Self::open(root, name).await? {
            return Ok(table);
        }
        let (location, url, struct_type) = new_table(root, name, schema, partition_columns)?;
        match create_version_zero(name, url, &struct_type, partition_columns, Vec::new(), &[]).await {
            Ok(table) => Ok(LakeTable {
                name: name.to_string(),
                location,
                table,
                txns: HashMap::new(),
            }),
            Err(e) => {
                // Lost a race with another creator (version 0 is put-if-absent): use its table.
                if let Some(table) = Self::open(root, name).await? {
                    return Ok(table);
                }
                Err(LakeError::delta(name)(e))
            }
        }
    }

    /// Creates the table with its first rows: version 0 holds the schema, the rows' files
    /// and `txns`, one commit (creating it empty and then appending took two commits and two
    /// loads of the new table, ~0.15 s of a new stream's first flush). Its schema is `schema`
    /// with the batches' other columns merged in, as an append would; batches that do not
    /// fit it are a [`LakeError::Schema`] and nothing is created. If the table exists, or
    /// another creator wins the race for version 0, the rows are appended to it instead.
    pub async fn create_with_rows(
        root: &str,
        name: &str,
        schema: &Schema,
        partition_columns: &[String],
        batches: Vec<RecordBatch>,
        txns: &[(String, i64)],
    ) -> Result<LakeTable, LakeError> {
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let existing = Self::open(root, name).await?;
        if batches.is_empty() || existing.is_some() {
            let mut table = match existing {
                Some(t) => t,
                None => Self::create(root, name, schema, partition_columns).await?,
            };
            table.append(batches, txns).await?;
            return Ok(table);
        }
        // The schema with every batch's new columns, as an append to an existing table merges them.
        let (merged, batches) = conform_all(name, schema, &batches)?;
        let (location, url, struct_type) = new_table(root, name, &merged, partition_columns)?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let (adds, _) = write_files(url.as_str(), batches.clone(), partition_columns, parallel_writers(rows))
            .await
            .map_err(LakeError::delta(name))?;
        let adds = adds.into_iter().map(deltalake::kernel::Action::Add).collect();
        match create_version_zero(name, url, &struct_type, partition_columns, adds, txns).await {
            Ok(table) => Ok(LakeTable { name: name.to_string(), location, table, txns: txns.iter().cloned().collect() }),
            Err(e) => match Self::open(root, name).await? {
                // Lost the race: the files written stay unreferenced, as after a failed append.
                Some(mut table) => {
                    table.append(batches, txns).await?;
                    Ok(table)
                }
                None => Err(LakeError::delta(name)(e)),
            },
        }
    }

    /// The table name (its directory under the lake root).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loaded table version.
    pub fn version(&self) -> i64 {
        self.table.version().map(|v| v as i64).unwrap_or(-1)
    }

    /// The table's current schema (data + partition columns, in table order) as Arrow.
    pub fn arrow_schema(&self) -> SchemaRef {
        match self.table.snapshot() {
            Ok(state) => state.snapshot().arrow_schema(),
            Err(_) => Arc::new(Schema::empty()),
        }
    }

    /// The table's partition columns.
    pub fn partition_columns(&self) -> Vec<String> {
        match self.table.snapshot() {
            Ok(state) => state.metadata().partition_columns().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// The Delta transaction identifier version (txn action / SetTransaction) recorded for this
    /// app id at the loaded version; `None` if never written.
    ///
    /// Txn actions never expire in Sluice tables (`delta.setTransactionRetentionDuration` is not
    /// set), and they survive overwrites and checkpoints.
    pub fn txn_version(&self, app_id: &str) -> Option<i64> {
        self.txns.get(app_id).copied()
    }

    /// All txn versions at the loaded version, by app id.
    pub fn txn_versions(&self) -> &HashMap<String, i64> {
        &self.txns
    }

    /// Row/file/byte counts from the add actions of the loaded version (no data is read).
    pub fn file_stats(&self) -> TableFileStats {
        let Ok(state) = self.table.snapshot() else {
            return TableFileStats::default();
        };
        let mut stats = TableFileStats {
            num_rows: Some(0),
            ..Default::default()
        };
        for file in state.log_data().iter() {
            stats.num_files += 1;
            stats.size_bytes += file.size().max(0) as u64;
            stats.num_rows = match (stats.num_rows, file.num_records()) {
                (Some(total), Some(n)) => Some(total + n as u64),
                _ => None,
            };
        }
        stats
    }

    /// The underlying deltalake table (for operations this module does not wrap).
    pub fn delta_table(&self) -> &DeltaTable {
        &self.table
    }

    /// Appends `batches` in ONE Delta commit together with a SetTransaction action
    /// `(app_id, version)` for every entry of `txns`; returns the new table version.
    ///
    /// Batches may differ in schema from the table and from each other: new columns and new
    /// nested struct fields are added to the table schema (nullable; existing rows read null)
    /// in the same commit; columns the batch lacks are written as null; values are cast to the
    /// table's column types where that is lossless (Int32 -> Int64, Int64 -> Float64, ...). A
    /// type that cannot be stored (e.g. Float64 into an Int64 column — see
    /// [`LakeTable::rewrite_with_schema`]) fails with [`LakeError::Schema`] naming the column,
    /// and nothing is written.
    ///
    /// With no rows but some txns, a commit with only the txn actions is made. Parquet files are
    /// zstd(1)-compressed with page-level statistics; Delta file statistics (min/max/nulls/
    /// numRecords) are recorded for pruning.
    ///
    /// If the commit's outcome is unknown (an error after the commit file may have been
    /// written), the table is reloaded and, if all `txns` are recorded, the append counts as
    /// committed.
    pub async fn append(
        &mut self,
        batches: Vec<RecordBatch>,
        txns: &[(String, i64)],
    ) -> Result<i64, LakeError> {
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        if batches.is_empty() && txns.is_empty() {
            return Ok(self.version());
        }
        let batches = self.conform(batches)?;
        let before = self.version();

        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let writers = parallel_writers(rows);
        let result = if batches.is_empty() {
            self.commit_txns_only(txns).await
        } else if writers > 1 {
            self.write_parallel(batches, txns, writers).await
        } else {
            self.table
                .clone()
                .write(batches)
                .with_save_mode(SaveMode::Append)
                .with_schema_mode(SchemaMode::Merge)
                .with_writer_properties(writer_properties())
                .with_commit_properties(commit_properties(txns))
                .await
        };
        self.finish_commit(result, before, txns).await
    }

    /// Applies change rows to the table by key in ONE commit (MERGE) together with `txns`:
    /// used for mirror tables of change data capture (see `crate::mirror`). `batch` has the
    /// key columns, `_lsn` (the commit position of the row's last change), `__op` (`upsert` or
    /// `delete`), optionally `__unchanged` (a list of columns the change did not carry, which
    /// keep their value) and the row's other columns. A change applies only if its `_lsn` is
    /// not older than the row's, so replays and stragglers never move a row back in time.
    /// New columns are added to the table schema. A merge that changes nothing still commits
    /// `txns`.
    pub async fn merge_by_key(&mut self, batch: RecordBatch, keys: &[String], txns: &[(String, i64)]) -> Result<i64, LakeError> {
        use deltalake::datafusion::prelude::SessionContext;
        let before = self.version();
        if batch.num_rows() == 0 {
            return self.finish_commit(self.commit_txns_only(txns).await, before, txns).await;
        }
        let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
        let schema = batch.schema();
        let has_unchanged = schema.field_with_name("__unchanged").is_ok_and(|f| matches!(f.data_type(), DataType::List(_) | DataType::LargeList(_)));
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|c| c != "__op" && c != "__unchanged" && c != "__seq")
            .collect();
        // Conform types to the table (lossless casts) but do not add the table's other columns:
        // an update sets only the columns it carries.
        let batch = {
            let table_schema = self.arrow_schema();
            let target = conform::merge_schema(&table_schema, &schema).map_err(|e| LakeError::Schema { table: self.name.clone(), message: e.to_string() })?;
            let wanted: Vec<_> = schema.fields().iter().map(|f| target.field_with_name(f.name()).cloned().unwrap_or_else(|_| f.as_ref().clone())).collect();
            let target = Arc::new(Schema::new(wanted));
            conform::conform_batch(&batch, &target).map_err(|e| LakeError::Schema { table: self.name.clone(), message: e.to_string() })?
        };
        let ctx = SessionContext::new();
        let source = ctx.read_batch(batch).map_err(|e| LakeError::delta(&self.name)(e.into()))?;
        let on = keys.iter().map(|k| format!("target.{0} = source.{0}", q(k))).collect::<Vec<_>>().join(" AND ");
        let newer = "source.\"_lsn\" >= target.\"_lsn\" OR target.\"_lsn\" IS NULL";
        let value = |c: &str| {
            if has_unchanged && !keys.iter().any(|k| k == c) && !c.starts_with('_') {
                format!("CASE WHEN array_has(source.\"__unchanged\", '{}') THEN target.{1} ELSE source.{1} END", c.replace('\'', "''"), q(c))
            } else {
                format!("source.{}", q(c))
            }
        };
        let result = async {
            self.table
                .clone()
                .merge(source, on.as_str())
                .with_source_alias("source")
                .with_target_alias("target")
                .with_merge_schema(true)
                .with_writer_properties(writer_properties())
                .with_commit_properties(commit_properties(txns))
                .when_matched_delete(|d| d.predicate(format!("source.\"__op\" = 'delete' AND ({newer})")))?
                .when_matched_update(|mut u| {
                    u = u.predicate(format!("source.\"__op\" = 'upsert' AND ({newer})"));
                    for c in columns.iter().filter(|c| !keys.contains(c)) {
                        u = u.update(q(c), value(c));
                    }
                    u
                })?
                .when_not_matched_insert(|mut i| {
                    i = i.predicate("source.\"__op\" = 'upsert'");
                    for c in &columns {
                        i = i.set(q(c), format!("source.{}", q(c)));
                    }
                    i
                })?
                .await
        }
        .await;
        self.finish_maybe_empty(result.map(|(t, _)| t), before, txns).await
    }

    /// Like `finish_commit`, for operations that skip the commit when they change nothing
    /// (MERGE, DELETE): then the txns are committed by themselves.
    async fn finish_maybe_empty(&mut self, result: Result<DeltaTable, DeltaTableError>, before: i64, txns: &[(String, i64)]) -> Result<i64, LakeError> {
        match result {
            Ok(table) if table.version().map(|v| v as i64) == Some(before) => {
                self.table = table;
                self.finish_commit(self.commit_txns_only(txns).await, before, txns).await
            }
            other => self.finish_commit(other, before, txns).await,
        }
    }

    /// Deletes the rows matching a SQL predicate in ONE commit together with `txns`.
    pub async fn delete_where(&mut self, predicate: &str, txns: &[(String, i64)]) -> Result<i64, LakeError> {
        let before = self.version();
        let result = self
            .table
            .clone()
            .delete()
            .with_predicate(predicate)
            .with_writer_properties(writer_properties())
            .with_commit_properties(commit_properties(txns))
            .await;
        self.finish_maybe_empty(result.map(|(t, _)| t), before, txns).await
    }

    /// Rewrites the whole table with `new_schema` (used to widen Int64 columns to Float64,
    /// or scalar columns to Utf8, possibly nested): all rows are read, converted to `new_schema` (by column name; columns
    /// missing from the table become null, table columns missing from `new_schema` are dropped)
    /// and written back in one overwrite commit that also carries `txns`. Existing txn versions
    /// survive (txn actions are table-level state, not tied to files). Rows are streamed, not
    /// collected in memory. Partitioning is kept.
    pub async fn rewrite_with_schema(
        &mut self,
        new_schema: SchemaRef,
        txns: &[(String, i64)],
    ) -> Result<i64, LakeError> {
        let name = self.name.clone();
        let partition_columns = self.partition_columns();
        for pc in &partition_columns {
            if new_schema.field_with_name(pc).is_err() {
                return Err(LakeError::Invalid {
                    table: name,
                    message: format!("rewrite schema lacks partition column `{pc}`"),
                });
            }
        }
        let ctx = SessionContext::new();
        self.table
            .update_datafusion_session(&ctx.state())
            .map_err(LakeError::delta(&name))?;
        let provider = self
            .table
            .table_provider()
            .await
            .map_err(|e| LakeError::delta(&name)(e.into()))?;
        let df = ctx
            .read_table(provider)
            .map_err(|e| LakeError::delta(&name)(e.into()))?;
        let current = df.schema().as_arrow().clone();
        let mut exprs: Vec<Expr> = Vec::with_capacity(new_schema.fields().len());
        for field in new_schema.fields() {
            let expr = match current.field_with_name(field.name()) {
                Ok(f) if f.data_type() == field.data_type() => ident(field.name()),
                Ok(_) => Expr::ScalarFunction(
                    deltalake::datafusion::logical_expr::expr::ScalarFunction::new_udf(
                        Arc::new(ScalarUDF::new_from_impl(ConformUdf::new(
                            field.data_type().clone(),
                            field.name(),
                        ))),
                        vec![ident(field.name())],
                    ),
                ),
                Err(_) => cast(lit(ScalarValue::Null), field.data_type().clone()),
            };
            exprs.push(expr.alias(field.name()));
        }
        let plan = df
            .select(exprs)
            .map_err(|e| LakeError::delta(&name)(e.into()))?
            .into_unoptimized_plan();

        let before = self.version();
        let result = self
            .table
            .clone()
            .write(Vec::new())
            .with_input_plan(plan)
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite)
            .with_partition_columns(partition_columns)
            .with_writer_properties(writer_properties())
            .with_commit_properties(commit_properties(txns))
            .await;
        self.finish_commit(result, before, txns).await
    }

    /// Every row of the table at its current version (for small tables: lookups).
    pub async fn read_all(&self) -> Result<Vec<RecordBatch>, LakeError> {
        let name = self.name.clone();
        let ctx = SessionContext::new();
        self.table.update_datafusion_session(&ctx.state()).map_err(LakeError::delta(&name))?;
        let provider = self.table.table_provider().await.map_err(|e| LakeError::delta(&name)(e.into()))?;
        let df = ctx.read_table(provider).map_err(|e| LakeError::delta(&name)(e.into()))?;
        df.collect().await.map_err(|e| LakeError::delta(&name)(e.into()))
    }

    /// Reloads the latest version from storage.
    pub async fn refresh(&mut self) -> Result<(), LakeError> {
        let before = self.version();
        self.table
            .update_incremental(None)
            .await
            .map_err(LakeError::delta(&self.name))?;
        if self.version() != before {
            self.txns = read_txns(&self.table)
                .await
                .map_err(LakeError::delta(&self.name))?;
        }
        Ok(())
    }

    /// Conforms `batches` to one schema: the table schema merged with theirs.
    fn conform(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, LakeError> {
        conform_all(&self.name, &self.arrow_schema(), &batches).map(|(_, b)| b)
    }

    /// Writes `batches` (conformed to one schema) as Parquet files from `writers` tasks at
    /// once and commits them as one append with `txns`.
    ///
    /// deltalake's write operation hash-partitions its input by the partition columns, so all
    /// rows of one date are encoded by one task, and a bulk load (a few dates) by one core.
    /// Here each task gets a contiguous share of the rows and writes its own file per
    /// partition value through deltalake's `RecordBatchWriter` (the same Parquet writer,
    /// statistics and durable object store); the commit is one Delta transaction of all their
    /// add actions, the txns and, if the batches brought new columns, the merged schema.
    /// Files of a failed attempt are left unreferenced, as with the write operation.
    async fn write_parallel(
        &self,
        batches: Vec<RecordBatch>,
        txns: &[(String, i64)],
        writers: usize,
    ) -> Result<DeltaTable, DeltaTableError> {
        use deltalake::kernel::{Action, MetadataExt as _};

        let state = self.table.snapshot()?;
        let partition_columns = state.metadata().partition_columns().to_vec();
        let (adds, schema) = write_files(self.table.table_url().as_str(), batches, &partition_columns, writers).await?;
        let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
        let new_schema: StructType = schema.as_ref().try_into_kernel()?;
        if &new_schema != state.schema().as_ref() {
            actions.push(Action::Metadata(state.metadata().clone().with_schema(&new_schema)?));
        }
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
            predicate: None,
        };
        let finalized = CommitBuilder::from(commit_properties(txns))
            .with_actions(actions)
            .build(Some(state), self.table.log_store(), operation)
            .await?;
        let mut table = self.table.clone();
        table.update_incremental(Some(finalized.version())).await?;
        Ok(table)
    }

    /// A commit with only txn actions (the batches had no rows).
    async fn commit_txns_only(
        &self,
        txns: &[(String, i64)],
    ) -> Result<DeltaTable, DeltaTableError> {
        let state = self.table.snapshot()?;
        let partition_columns = state.metadata().partition_columns().to_vec();
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
            predicate: None,
        };
        let finalized = CommitBuilder::from(commit_properties(txns))
            .with_actions(Vec::new())
            .build(Some(state), self.table.log_store(), operation)
            .await?;
        let mut table = self.table.clone();
        table.update_incremental(Some(finalized.version())).await?;
        Ok(table)
    }

    /// Installs the result of a commit attempt; on error, checks whether the commit landed.
    async fn finish_commit(
        &mut self,
        result: Result<DeltaTable, DeltaTableError>,
        before: i64,
        txns: &[(String, i64)],
    ) -> Result<i64, LakeError> {
        match result {
            Ok(table) => {
                self.table = table;
                let version = self.version();
                if version == before + 1 {
                    for (app_id, v) in txns {
                        self.txns.insert(app_id.clone(), *v);
                    }
                } else {
                    // Other writers committed in between (deltalake resolved the conflict).
                    self.txns = read_txns(&self.table)
                        .await
                        .map_err(LakeError::delta(&self.name))?;
                }
                self.after_commit().await;
                Ok(version)
            }
            Err(err) => {
                if !txns.is_empty() && self.refresh().await.is_ok() && self.version() > before {
                    let landed = txns
                        .iter()
                        .all(|(app_id, v)| self.txn_version(app_id) == Some(*v));
                    if landed {
                        tracing::warn!(table = %self.name, version = self.version(), error = %err,
                            "commit reported an error but its txn actions are in the table; treating it as committed");
                        self.after_commit().await;
                        return Ok(self.version());
                    }
                }
                Err(LakeError::delta(&self.name)(err))
            }
        }
    }

    /// Writes a checkpoint when the new version completes a checkpoint interval, then cleans up
    /// expired log files. Failures are logged, never returned: the commit already succeeded and
    /// the next interval retries.
    async fn after_commit(&mut self) {
        let Ok(state) = self.table.snapshot() else {
            return;
        };
        let version = state.version();
        let interval = state.table_config().checkpoint_interval().get();
        let cleanup = state.table_config().enable_expired_log_cleanup();
        if (version + 1) % interval != 0 {
            return;
        }
        if let Err(e) = deltalake::checkpoints::create_checkpoint(&self.table, None).await {
            tracing::warn!(table = %self.name, version, error = %e, "writing Delta checkpoint failed");
            return;
        }
        if cleanup {
            if let Err(e) = deltalake::checkpoints::cleanup_metadata(&self.table, None).await {
                tracing::warn!(table = %self.name, version, error = %e, "cleaning up expired Delta log files failed");
            }
        }
    }
}

/// Rows an append must have before it is written by several tasks at once.
const PARALLEL_WRITE_ROWS: usize = 65_536;

/// How many tasks write an append of `rows` rows: one per core, each with at least half of
/// [`PARALLEL_WRITE_ROWS`] (small appends stay one file per partition value).
fn parallel_writers(rows: usize) -> usize {
    if rows < PARALLEL_WRITE_ROWS {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(rows / (PARALLEL_WRITE_ROWS / 2)).max(1)
}

/// `schema` merged with the schemas of `batches` (new columns added, types kept; see
/// [`conform::merge_schema`]), and the batches conformed to it. Err: a batch does not fit.
fn conform_all(table: &str, schema: &Schema, batches: &[RecordBatch]) -> Result<(Schema, Vec<RecordBatch>), LakeError> {
    let schema_err = |e: conform::ConformError| LakeError::Schema { table: table.to_string(), message: e.to_string() };
    let mut merged = schema.clone();
    for b in batches {
        if b.schema().as_ref() != &merged {
            merged = conform::merge_schema(&merged, &b.schema()).map_err(schema_err)?;
        }
    }
    let target = Arc::new(merged.clone());
    let conformed = batches.iter().map(|b| conform::conform_batch(b, &target)).collect::<Result<Vec<_>, _>>().map_err(schema_err)?;
    Ok((merged, conformed))
}

/// Where a new table goes and its Delta schema: checks that the partition columns are in
/// `schema` and makes the directory of a local table.
fn new_table(root: &str, name: &str, schema: &Schema, partition_columns: &[String]) -> Result<(String, Url, StructType), LakeError> {
    for pc in partition_columns {
        if schema.field_with_name(pc).is_err() {
            return Err(LakeError::Invalid {
                table: name.to_string(),
                message: format!("partition column `{pc}` is not in the schema"),
            });
        }
    }
    let location = Root::parse(root)?.table_location(name);
    // Creates the directory for local paths.
    let url =
        deltalake::ensure_table_uri(&location).map_err(|e| LakeError::InvalidLocation {
            table: name.to_string(),
            location: location.clone(),
            message: e.to_string(),
        })?;
    let struct_type: StructType = schema.try_into_kernel().map_err(|e| LakeError::Schema {
        table: name.to_string(),
        message: format!("schema cannot be stored in Delta: {e}"),
    })?;
    Ok((location, url, struct_type))
}

/// Commits version 0 of a new table at `url` (put-if-absent: fails if another creator got
/// there first): its schema, partition columns and properties, with `actions` (the first
/// rows' files, if any) and `txns`.
async fn create_version_zero(
    name: &str,
    url: Url,
    schema: &StructType,
    partition_columns: &[String],
    actions: Vec<deltalake::kernel::Action>,
    txns: &[(String, i64)],
) -> Result<DeltaTable, DeltaTableError> {
    DeltaTableBuilder::from_url(url)?
        .build()?
        .create()
        .with_table_name(name)
        .with_columns(schema.fields().cloned())
        .with_partition_columns(partition_columns.iter().cloned())
        .with_configuration(TABLE_PROPERTIES.iter().map(|(k, v)| (*k, Some(*v))))
        .with_save_mode(SaveMode::ErrorIfExists)
        .with_actions(actions)
        .with_commit_properties(commit_properties(txns))
        .await
}

/// Writes `batches` (of one schema) as Parquet files under the table at `url` from `writers`
/// tasks at once (see [`LakeTable::write_parallel`]); returns their add actions and the
/// batches' schema. Nothing is committed.
async fn write_files(
    url: &str,
    batches: Vec<RecordBatch>,
    partition_columns: &[String],
    writers: usize,
) -> Result<(Vec<deltalake::kernel::Add>, SchemaRef), DeltaTableError> {
    use deltalake::writer::{DeltaWriter as _, RecordBatchWriter, WriteMode};

    let batches = batches
        .into_iter()
        .map(|b| plain_partition_values(b, partition_columns))
        .collect::<Result<Vec<_>, _>>()?;
    let schema = batches[0].schema();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let share = total.div_ceil(writers);

    let mut groups: Vec<Vec<RecordBatch>> = vec![Vec::new()];
    let mut in_group = 0;
    for b in batches {
        if in_group >= share {
            groups.push(Vec::new());
            in_group = 0;
        }
        in_group += b.num_rows();
        groups.last_mut().expect("one group").push(b);
    }
    let handle = tokio::runtime::Handle::current();
    let tasks: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let mut writer = RecordBatchWriter::try_new(url, schema.clone(), Some(partition_columns.to_vec()), None)
                .map(|w| w.with_writer_properties(writer_properties()));
            let handle = handle.clone();
            let partition_columns = partition_columns.to_vec();
            // Parquet encoding is CPU work: on blocking threads, off the async workers
            // that serve ingest.
            tokio::task::spawn_blocking(move || {
                handle.block_on(async move {
                    let w = writer.as_mut().map_err(|e| DeltaTableError::Generic(e.to_string()))?;
                    for b in group {
                        // A batch of one partition (the usual case: one date) goes to its
                        // file as it is; `write` would first split it, copying every
                        // column, to find that out.
                        match single_partition(&b, &partition_columns) {
                            Some(values) => {
                                w.write_partition(b, &values, WriteMode::Default).await?;
                            }
                            None => w.write(b).await?,
                        }
                    }
                    w.flush().await
                })
            })
        })
        .collect();
    let mut adds = Vec::new();
    for task in tasks {
        adds.extend(task.await.map_err(|e| DeltaTableError::Generic(format!("parquet writer task: {e}")))??);
    }
    Ok((adds, schema))
}

/// The partition values of `batch` if every row has the same ones, all text (the date, and
/// columns like `region`); `None` otherwise, or without partition columns.
fn single_partition(batch: &RecordBatch, partition_columns: &[String]) -> Option<indexmap::IndexMap<String, delta_kernel::expressions::Scalar>> {
    if partition_columns.is_empty() || batch.num_rows() == 0 {
        return None;
    }
    let mut values = indexmap::IndexMap::with_capacity(partition_columns.len());
    for name in partition_columns {
        let col = batch.column_by_name(name)?.as_string_opt::<i32>().filter(|c| c.null_count() == 0)?;
        let first = col.value(0);
        if !col.iter().all(|v| v == Some(first)) {
            return None;
        }
        values.insert(name.clone(), delta_kernel::expressions::Scalar::String(first.to_string()));
    }
    Some(values)
}

/// `batch` with dictionary-encoded partition columns (as deltalake reports them in a table's
/// Arrow schema) cast to their value type, as the writer expects partition values.
fn plain_partition_values(batch: RecordBatch, partition_columns: &[String]) -> Result<RecordBatch, DeltaTableError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| matches!(f.data_type(), DataType::Dictionary(..)) && partition_columns.contains(f.name())) {
        return Ok(batch);
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        match f.data_type() {
            DataType::Dictionary(_, value) if partition_columns.contains(f.name()) => {
                columns.push(deltalake::arrow::compute::cast(c, value)?);
                fields.push(f.as_ref().clone().with_data_type(value.as_ref().clone()));
            }
            _ => {
                columns.push(c.clone());
                fields.push(f.as_ref().clone());
            }
        }
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Parquet settings of every data file Sluice writes.
///
/// Measured on the reference workload (`parquet_write_costs` in tests/convert_bench.rs):
/// parquet-rs' default 1 MiB dictionary page limit makes every high-cardinality column (ids,
/// timestamps, free text) build a large dictionary before falling back to plain encoding;
/// a 16 KiB limit keeps dictionaries for the low-cardinality columns (kinds, regions, status)
/// and gives up early elsewhere: 2.3x faster to encode *and* 14% smaller files than the
/// defaults. zstd level 1 instead of 3 costs < 1% in size here and saves a third of the time.
/// The log offset column, unique and rising within a partition, is delta-encoded instead of
/// trying a dictionary first: one byte less per row (3% of the file), at the same speed.
fn writer_properties() -> WriterProperties {
    let offset = ColumnPath::from(crate::convert::OFFSET_COLUMN);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        .set_dictionary_page_size_limit(16 << 10)
        .set_column_dictionary_enabled(offset.clone(), false)
        .set_column_encoding(offset, Encoding::DELTA_BINARY_PACKED)
        // Page statistics include the column-chunk statistics deltalake turns into the add
        // action's min/max/nullCount, plus the page index DataFusion prunes pages with.
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_created_by(format!("sluice {} (delta-rs)", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Commit properties: the txn actions; checkpoint and log cleanup are done by
/// [`LakeTable::after_commit`] instead of deltalake's post-commit hook (whose failure would fail
/// an already-landed commit, and whose log cleanup lists `_delta_log` on every commit).
fn commit_properties(txns: &[(String, i64)]) -> CommitProperties {
    CommitProperties::default()
        .with_application_transactions(
            txns.iter()
                .map(|(app_id, version)| Transaction::new(app_id, *version))
                .collect(),
        )
        .with_create_checkpoint(false)
        .with_cleanup_expired_logs(Some(false))
}

/// Reads the latest txn version of every app id at the table's loaded version.
///
/// deltalake only offers a per-app-id lookup (`transaction_version`, async, a log replay each
/// call), and the kernel's "all app ids" scanner is crate-private, so this replays the txn
/// column of the log segment (checkpoint + later commits) once through the kernel's
/// internal-api log reader. Commits are read newest first, then the checkpoint, so the first
/// txn seen per app id is the latest.
async fn read_txns(table: &DeltaTable) -> Result<HashMap<String, i64>, DeltaTableError> {
    let version = table.version().ok_or(DeltaTableError::NotInitialized)?;
    let log_store: LogStoreRef = table.log_store();
    let engine = log_store.engine(None);
    let mut root = log_store.config().location().clone();
    if !root.path().ends_with('/') {
        root.set_path(&format!("{}/", root.path()));
    }
    let scan = move || -> Result<HashMap<String, i64>, delta_kernel::Error> {
        let snapshot = delta_kernel::Snapshot::builder_for(root)
            .at_version(version)
            .build(engine.as_ref())?;
        let mut txns: HashMap<String, i64> = HashMap::new();
        let batches = snapshot.log_segment().read_actions(
            engine.as_ref(),
            delta_kernel::actions::LOG_TXN_SCHEMA.clone(),
        )?;
        for batch in batches {
            let data = delta_kernel::engine::arrow_data::ArrowEngineData::try_from_engine_data(
                batch?.actions,
            )?;
            let rb = data.record_batch();
            let Some(txn) = rb.column_by_name("txn") else {
                continue;
            };
            let txn = txn.as_struct();
            let (Some(app_ids), Some(versions)) =
                (txn.column_by_name("appId"), txn.column_by_name("version"))
            else {
                continue;
            };
            let versions = versions.as_primitive::<deltalake::arrow::datatypes::Int64Type>();
            let app_id_at = |i: usize| -> Option<String> {
                match app_ids.data_type() {
                    DataType::Utf8 => Some(app_ids.as_string::<i32>().value(i).to_string()),
                    DataType::LargeUtf8 => Some(app_ids.as_string::<i64>().value(i).to_string()),
                    DataType::Utf8View => Some(app_ids.as_string_view().value(i).to_string()),
                    _ => None,
                }
            };
            for i in 0..txn.len() {
                if txn.is_null(i) || app_ids.is_null(i) || versions.is_null(i) {
                    continue;
                }
                if let Some(app_id) = app_id_at(i) {
                    txns.entry(app_id).or_insert(versions.value(i));
                }
            }
        }
        Ok(txns)
    };
    tokio::task::spawn_blocking(scan)
        .await
        .map_err(|e| DeltaTableError::Generic(format!("reading txn actions: {e}")))?
        .map_err(|e| DeltaTableError::Generic(format!("reading txn actions: {e}")))
}

/// Names of the Delta tables directly under `root` (directories with a `_delta_log`), sorted.
/// A root that does not exist yet has no tables.
pub async fn list_tables(root: &str) -> Result<Vec<String>, LakeError> {
    let root_err = |message: String| LakeError::Root {
        root: root.to_string(),
        message,
    };
    let mut names = Vec::new();
    match Root::parse(root)? {
        Root::Local(dir) => {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(e) => return Err(root_err(e.to_string())),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| root_err(e.to_string()))?
            {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !is_valid_table_name(&name) {
                    continue;
                }
                if tokio::fs::metadata(entry.path().join("_delta_log"))
                    .await
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                {
                    names.push(name);
                }
            }
        }
        Root::Url(url) => {
            let store = DeltaTableBuilder::from_url(url)
                .and_then(|b| b.build_storage())
                .map_err(|e| root_err(e.to_string()))?
                .object_store(None);
            let listing = store
                .list_with_delimiter(None)
                .await
                .map_err(|e| root_err(e.to_string()))?;
            for prefix in listing.common_prefixes {
                let Some(name) = prefix.filename().map(str::to_string) else {
                    continue;
                };
                if !is_valid_table_name(&name) {
                    continue;
                }
                let log = ObjectPath::from(format!("{name}/_delta_log"));
                let entries = store
                    .list_with_delimiter(Some(&log))
                    .await
                    .map_err(|e| root_err(e.to_string()))?;
                if !entries.objects.is_empty() {
                    names.push(name);
                }
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `sluice_conform(column)`: converts a column to a target type with the same rules as appends
/// (by field name, nested; missing fields null; lossless casts such as Int64 -> Float64), and
/// numbers or booleans to text where the new schema widened a column so. Used
/// by [`LakeTable::rewrite_with_schema`], where Arrow's cast cannot add struct fields.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ConformUdf {
    target: DataType,
    column: String,
    signature: Signature,
}

impl ConformUdf {
    fn new(target: DataType, column: &str) -> Self {
        ConformUdf {
            target,
            column: column.to_string(),
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ConformUdf {
    fn name(&self) -> &str {
        "sluice_conform"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(
        &self,
        _arg_types: &[DataType],
    ) -> deltalake::datafusion::common::Result<DataType> {
        Ok(self.target.clone())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> deltalake::datafusion::common::Result<ColumnarValue> {
        let rows = args.number_rows;
        let Some(arg) = args.args.into_iter().next() else {
            return Err(deltalake::datafusion::error::DataFusionError::Plan(
                "sluice_conform takes one argument".into(),
            ));
        };
        let array = arg.into_array(rows)?;
        let out = conform::rewrite_array(&array, &self.target, &self.column)
            .map_err(|e| deltalake::datafusion::error::DataFusionError::Execution(e.to_string()))?;
        Ok(ColumnarValue::Array(out))
    }
}
