//! SQL over the lake: DataFusion with deltalake's table provider.
//!
//! Every Delta table directly under the lake root is a table named after its directory
//! (`SELECT count(*) FROM events`). Each statement sees the latest committed version of the
//! tables it references at the time it is planned, and only those tables are loaded. Filters
//! prune files by partition values and by the min/max statistics in the Delta log, and the
//! Parquet reader prunes row groups and pages.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_query::QueryError> {
//! use sluice_query::{render, OutputFormat, QueryEngine};
//! let engine = QueryEngine::new("/var/lib/sluice/lake");
//! let result = engine.sql("SELECT kind, count(*) FROM events GROUP BY kind").await?;
//! let json = render(&result, OutputFormat::Json)?;
//! # Ok(()) }
//! ```

mod catalog;
mod error;
mod render;

use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::datafusion::execution::context::SQLOptions;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::datafusion::sql::parser::Statement as DFStatement;
use deltalake::datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::StreamExt as _;
use serde::Serialize;
use sluice_lake::delta::{list_tables, LakeTable};

pub use error::QueryError;
pub use render::{render, OutputFormat};

use catalog::LakeSchema;

/// The result of one statement.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// Total number of rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnInfo {
    pub name: String,
    /// Arrow type as DataFusion shows it (`Int64`, `Utf8`, `Struct(...)`, ...).
    pub data_type: String,
    pub nullable: bool,
}

/// Metadata of one lake table, from the Delta log only (no data is read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableInfo {
    pub name: String,
    pub version: i64,
    pub columns: Vec<ColumnInfo>,
    pub partition_columns: Vec<String>,
    /// Sum of the files' `numRecords` statistics; `None` if a file has no statistics.
    pub num_rows: Option<u64>,
    pub num_files: u64,
    pub size_bytes: u64,
}

/// SQL over all tables of one lake root. Cheap to clone (shared state).
#[derive(Clone)]
pub struct QueryEngine {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: SessionContext,
    schema: Arc<LakeSchema>,
    limits: QueryLimits,
}

/// Bounds on what one query may use. The default is unbounded (the CLI); the server sets both.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryLimits {
    /// Memory for operators (sorts, joins, aggregates), shared by the engine's running queries
    /// (they spill where they can); a query needing more fails
    /// with a "resources exhausted" error (a user error) instead of growing the process.
    pub memory_bytes: Option<usize>,
    /// Largest result [`QueryEngine::sql`] collects (Arrow in-memory size), else
    /// [`QueryError::ResultTooLarge`].
    pub result_bytes: Option<usize>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("lake_root", &self.inner.schema.root())
            .finish()
    }
}

impl QueryEngine {
    /// An engine over the Delta tables under `lake_root` (a local directory or URL). Nothing is
    /// read until a query runs.
    pub fn new(lake_root: &str) -> QueryEngine {
        Self::with_limits(lake_root, QueryLimits::default())
    }

    /// An engine whose queries are bounded by `limits`.
    pub fn with_limits(lake_root: &str, limits: QueryLimits) -> QueryEngine {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("lake", "public");
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(bytes) = limits.memory_bytes {
            runtime = runtime.with_memory_limit(bytes, 1.0);
        }
        let ctx = match runtime.build_arc() {
            Ok(runtime) => SessionContext::new_with_config_rt(config, runtime),
            Err(_) => SessionContext::new_with_config(config),
        };
        let schema = Arc::new(LakeSchema::new(lake_root));
        let catalog = Arc::new(deltalake::datafusion::catalog::MemoryCatalogProvider::new());
        // Registering into a fresh in-memory catalog cannot fail.
        let _ = deltalake::datafusion::catalog::CatalogProvider::register_schema(
            catalog.as_ref(),
            "public",
            schema.clone(),
        );
        ctx.register_catalog("lake", catalog);
        QueryEngine {
            inner: Arc::new(Inner { ctx, schema, limits }),
        }
    }

    /// The lake tables a statement reads (CTE names excluded), for read-scope checks.
    /// `information_schema` views count as the table `information_schema`.
    pub fn referenced_tables(&self, sql: &str) -> Result<Vec<String>, QueryError> {
        let state = self.inner.ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        let references = state.resolve_table_references(&statement)?;
        let mut names: Vec<String> = references
            .iter()
            .map(|r| match r.schema() {
                Some("information_schema") => "information_schema".to_string(),
                _ => r.table().to_string(),
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Runs one SQL statement. Only read-only statements (SELECT / WITH / EXPLAIN / SHOW /
    /// DESCRIBE) are accepted; tables are referenced by their directory name and read at their
    /// latest version. The whole result is held in memory, up to the configured limit.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let (df_schema, mut stream) = self.sql_stream(sql).await?;
        let mut batches = Vec::new();
        let mut bytes = 0usize;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            bytes += result_size(&batch);
            if let Some(limit) = self.inner.limits.result_bytes {
                if bytes > limit {
                    return Err(QueryError::ResultTooLarge { limit });
                }
            }
            batches.push(batch);
        }
        let schema = batches.first().map(|b| b.schema()).unwrap_or(df_schema);
        Ok(QueryResult { schema, batches })
    }

    /// Like [`QueryEngine::sql`], but the result arrives batch by batch, with no limit on its
    /// total size: for readers that pass rows on as they come (a backfill of a whole table).
    pub async fn sql_stream(
        &self,
        sql: &str,
    ) -> Result<(SchemaRef, deltalake::datafusion::execution::SendableRecordBatchStream), QueryError> {
        let ctx = &self.inner.ctx;
        let state = ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect)?;
        check_read_only(&statement)?;

        // information_schema (SHOW TABLES, SHOW COLUMNS, ...) enumerates the tables.
        let references = state.resolve_table_references(&statement)?;
        if references
            .iter()
            .any(|r| r.schema() == Some("information_schema"))
        {
            self.inner.schema.refresh_names().await?;
        }

        let plan = state.statement_to_plan(statement).await?;
        // Second line of defence: whatever the statement, the plan must not write anything.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| QueryError::NotReadOnly(e.to_string()))?;
        let df = ctx.execute_logical_plan(plan).await?;
        let df_schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        Ok((df_schema, df.execute_stream().await?))
    }

    /// Metadata of every table under the lake root, sorted by name: version, schema,
    /// partition columns, row count (from the files' statistics), file count and bytes.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, QueryError> {
        let root = self.inner.schema.root().to_string();
        let names = self.inner.schema.refresh_names().await?;
        let infos: Vec<Result<Option<TableInfo>, QueryError>> = futures::stream::iter(names)
            .map(|name| {
                let root = root.clone();
                async move {
                    let Some(table) = LakeTable::open(&root, &name).await? else {
                        // Deleted since listed.
                        return Ok(None);
                    };
                    let stats = table.file_stats();
                    let schema = table.arrow_schema();
                    Ok(Some(TableInfo {
                        name,
                        version: table.version(),
                        columns: schema
                            .fields()
                            .iter()
                            .map(|f| ColumnInfo {
                                name: f.name().clone(),
                                data_type: f.data_type().to_string(),
                                nullable: f.is_nullable(),
                            })
                            .collect(),
                        partition_columns: table.partition_columns(),
                        num_rows: stats.num_rows,
                        num_files: stats.num_files,
                        size_bytes: stats.size_bytes,
                    }))
                }
            })
            .buffered(4)
            .collect()
            .await;
        let mut out = Vec::new();
        for info in infos {
            if let Some(info) = info? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// The lake root this engine reads.
    pub fn lake_root(&self) -> &str {
        self.inner.schema.root()
    }
}

/// Names of the tables under the lake root (convenience for callers without an engine).
pub async fn table_names(lake_root: &str) -> Result<Vec<String>, QueryError> {
    Ok(list_tables(lake_root).await?)
}

/// Accepts SELECT / WITH (queries), EXPLAIN of those, SHOW and DESCRIBE.
fn check_read_only(statement: &DFStatement) -> Result<(), QueryError> {
    match statement {
        DFStatement::Statement(s) => check_sql_statement(s),
        DFStatement::Explain(explain) => check_read_only(&explain.statement),
        DFStatement::CreateExternalTable(_) => {
            Err(QueryError::NotReadOnly("CREATE EXTERNAL TABLE".into()))
        }
        DFStatement::CopyTo(_) => Err(QueryError::NotReadOnly("COPY".into())),
        DFStatement::Reset(_) => Err(QueryError::NotReadOnly("RESET".into())),
    }
}

fn check_sql_statement(statement: &SqlStatement) -> Result<(), QueryError> {
    match statement {
        SqlStatement::Query(_)
        | SqlStatement::ExplainTable { .. }
        | SqlStatement::ShowTables { .. }
        | SqlStatement::ShowColumns { .. }
        | SqlStatement::ShowFunctions { .. }
        | SqlStatement::ShowVariable { .. }
        | SqlStatement::ShowVariables { .. }
        | SqlStatement::ShowStatus { .. }
        | SqlStatement::ShowCreate { .. }
        | SqlStatement::ShowSchemas { .. }
        | SqlStatement::ShowDatabases { .. }
        | SqlStatement::ShowCatalogs { .. }
        | SqlStatement::ShowViews { .. } => Ok(()),
        SqlStatement::Explain { statement, .. } => check_sql_statement(statement),
        other => {
            // Name the statement by its leading keywords ("INSERT INTO", "DROP TABLE", ...).
            let text = other.to_string();
            let kind: Vec<&str> = text.split_whitespace().take(2).collect();
            Err(QueryError::NotReadOnly(kind.join(" ")))
        }
    }
}

/// The bytes a result batch holds: the part of each buffer its rows use. (Arrays sliced out of
/// a larger read, as the Parquet reader hands them out, would count the whole buffer, many
/// times over, with `get_array_memory_size`.)
fn result_size(batch: &deltalake::arrow::array::RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or_else(|_| c.get_array_memory_size()))
        .sum()
}
