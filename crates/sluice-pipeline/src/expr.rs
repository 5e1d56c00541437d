//! `filter` and `map` steps: SQL expressions over a record's fields, evaluated by DataFusion on
//! whole Arrow batches (vectorized; no per-record interpretation).
//!
//! A step is compiled against one input schema. Schemas evolve (new nullable columns), so a
//! runtime keeps the compiled step per schema and compiles again when the schema changes;
//! compiling is cheap next to a batch. Field names follow SQL: unquoted identifiers are
//! lower-cased, so fields with capitals or `-` are written in double quotes; nested fields
//! are reached with `parent.child` or `parent['child']`.

use std::sync::Arc;

use deltalake::arrow::array::{new_null_array, Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use deltalake::arrow::buffer::BooleanBuffer;
use deltalake::arrow::compute::FilterBuilder;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatchOptions;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::common::DFSchema;
use deltalake::datafusion::logical_expr::simplify::SimplifyContext;
use deltalake::datafusion::logical_expr::ExprSchemable;
use deltalake::datafusion::optimizer::simplify_expressions::ExprSimplifier;
use deltalake::datafusion::physical_plan::PhysicalExpr;
use deltalake::datafusion::prelude::SessionContext;

/// Why a step cannot be compiled or applied. Messages name the step's expression and, for
/// unknown fields, the fields that exist.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    /// The expression is not valid SQL, names an unknown field or function, or has the wrong
    /// type for the step.
    #[error("{step} `{expr}`: {message}")]
    Invalid {
        step: &'static str,
        expr: String,
        message: String,
    },
    /// Evaluating the expression failed on a batch (e.g. a cast of a value that does not
    /// convert). The batch is not changed.
    #[error("{step} `{expr}` failed: {message}")]
    Eval {
        step: &'static str,
        expr: String,
        message: String,
    },
}

#[derive(Clone)]
struct Compiled {
    sql: String,
    expr: Arc<dyn PhysicalExpr>,
    data_type: DataType,
    nullable: bool,
}

fn compile(step: &'static str, ctx: &SessionContext, schema: &DFSchema, sql: &str) -> Result<Compiled, StepError> {
    let invalid = |message: String| StepError::Invalid {
        step,
        expr: sql.to_string(),
        message,
    };
    let expr = ctx
        .parse_sql_expr(sql, schema)
        .map_err(|e| invalid(e.strip_backtrace()))?;
    // DataFusion evaluates only simplified expressions: some functions (coalesce, nvl, ...)
    // exist to be rewritten (to CASE) and fail when invoked as they are.
    let simplifier = ExprSimplifier::new(
        SimplifyContext::builder()
            .with_schema(Arc::new(schema.clone()))
            .build(),
    );
    let expr = simplifier
        .coerce(expr, schema)
        .and_then(|e| simplifier.simplify(e))
        .map_err(|e| invalid(e.strip_backtrace()))?;
    let (_, field) = expr
        .to_field(schema)
        .map_err(|e| invalid(e.strip_backtrace()))?;
    let (data_type, nullable) = (field.data_type().clone(), field.is_nullable());
    let physical = ctx
        .create_physical_expr(expr, schema)
        .map_err(|e| invalid(e.strip_backtrace()))?;
    Ok(Compiled {
        sql: sql.to_string(),
        expr: physical,
        data_type,
        nullable,
    })
}

impl Compiled {
    fn evaluate(&self, step: &'static str, batch: &RecordBatch) -> Result<ArrayRef, StepError> {
        self.expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| StepError::Eval {
                step,
                expr: self.sql.clone(),
                message: e.strip_backtrace(),
            })
    }
}

fn df_schema(schema: &Schema) -> DFSchema {
    // A schema with unique field names (every Arrow schema Sluice builds) always converts.
    DFSchema::try_from(schema.clone()).unwrap_or_else(|_| DFSchema::empty())
}

/// `filter`: keeps the rows for which a boolean SQL expression is true (false and NULL drop
/// the row, as in a SQL `WHERE`).
pub struct Filter {
    compiled: Compiled,
}

impl Filter {
    /// Compiles `sql` (e.g. `kind = 'ride' AND rider.tier IN ('gold', 'silver')`) for batches
    /// of `schema`. It must be boolean.
    pub fn compile(sql: &str, schema: &Schema) -> Result<Filter, StepError> {
        let ctx = SessionContext::new();
        let compiled = compile("filter", &ctx, &df_schema(schema), sql)?;
        if !matches!(compiled.data_type, DataType::Boolean | DataType::Null) {
            return Err(StepError::Invalid {
                step: "filter",
                expr: sql.to_string(),
                message: format!("must be a boolean expression, but it is {}", compiled.data_type),
            });
        }
        Ok(Filter { compiled })
    }

    /// The rows of `batch` that pass, in order.
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch, StepError> {
        Ok(self.apply_with_mask(batch)?.0)
    }

    /// The rows of `batch` that pass, and which rows those are: bit `i` is set when row `i`
    /// passed (false and NULL are unset).
    pub fn apply_with_mask(&self, batch: &RecordBatch) -> Result<(RecordBatch, BooleanBuffer), StepError> {
        let mask = self.compiled.evaluate("filter", batch)?;
        if mask.data_type() == &DataType::Null {
            return Ok((batch.slice(0, 0), BooleanBuffer::new_unset(batch.num_rows())));
        }
        let mask = mask.as_boolean();
        let passed = match mask.nulls() {
            Some(nulls) => mask.values() & nulls.inner(),
            None => mask.values().clone(),
        };
        let rows = filter_rows(batch, mask, &passed).map_err(|e| StepError::Eval {
            step: "filter",
            expr: self.compiled.sql.clone(),
            message: e.to_string(),
        })?;
        Ok((rows, passed))
    }
}

/// The rows of `batch` where `mask` is true (`passed`: its true and non-NULL bits), like
/// `filter_record_batch`. A column without a value in those rows becomes a new all-NULL column
/// instead of a filtered copy: after a route by kind of record, most columns of each part
/// are another kind's fields, NULL in every row there.
fn filter_rows(batch: &RecordBatch, mask: &BooleanArray, passed: &BooleanBuffer) -> Result<RecordBatch, ArrowError> {
    let rows = passed.count_set_bits();
    if rows == batch.num_rows() {
        return Ok(batch.clone());
    }
    if rows == 0 {
        return Ok(batch.slice(0, 0));
    }
    let predicate = FilterBuilder::new(mask).optimize().build();
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.logical_nulls() {
            Some(nulls) if (nulls.inner() & passed).count_set_bits() == 0 => Ok(new_null_array(c.data_type(), rows)),
            _ => predicate.filter(c.as_ref()),
        })
        .collect::<Result<Vec<ArrayRef>, ArrowError>>()?;
    RecordBatch::try_new_with_options(batch.schema(), columns, &RecordBatchOptions::new().with_row_count(Some(rows)))
}

/// `map` / `select`: output fields computed as SQL expressions of the input fields (rename,
/// cast, compute); input fields not listed are dropped.
#[derive(Clone)]
pub struct Map {
    fields: Vec<Compiled>,
    schema: SchemaRef,
}

impl Map {
    /// Compiles `(output name, SQL expression)` pairs, e.g. `("fare_eur", "fare_cents / 100.0")`,
    /// for batches of `schema`. Output names must be unique.
    pub fn compile(fields: &[(String, String)], schema: &Schema) -> Result<Map, StepError> {
        let ctx = SessionContext::new();
        let input = df_schema(schema);
        let mut compiled = Vec::with_capacity(fields.len());
        let mut out = Vec::with_capacity(fields.len());
        for (name, sql) in fields {
            if out.iter().any(|f: &Field| f.name() == name) {
                return Err(StepError::Invalid {
                    step: "map",
                    expr: sql.clone(),
                    message: format!("output field `{name}` is defined twice"),
                });
            }
            let c = compile("map", &ctx, &input, sql)?;
            out.push(Field::new(name, c.data_type.clone(), c.nullable));
            compiled.push(c);
        }
        Ok(Map {
            fields: compiled,
            schema: Arc::new(Schema::new(out)),
        })
    }

    /// The schema of the batches [`Map::apply`] returns.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// One output row per input row.
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch, StepError> {
        let columns = self
            .fields
            .iter()
            .map(|c| c.evaluate("map", batch))
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| StepError::Eval {
            step: "map",
            expr: self.fields.iter().map(|c| c.sql.as_str()).collect::<Vec<_>>().join(", "),
            message: e.to_string(),
        })
    }
}
