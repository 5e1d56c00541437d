//! Encoding query results: text table, JSON array, NDJSON, CSV, Arrow IPC stream.

use std::str::FromStr;
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::json::writer::{
    JsonArray, LineDelimited, WriterBuilder as JsonWriterBuilder,
};
use deltalake::arrow::json::LineDelimitedWriter;

use crate::{QueryError, QueryResult};

/// Output formats of [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Human-readable text table (with header), newline-terminated.
    Table,
    /// One JSON array of objects, one object per row; nulls are explicit.
    Json,
    /// One JSON object per line (nulls omitted).
    NdJson,
    /// CSV with a header row; nested values (structs, lists, maps) as JSON text.
    Csv,
    /// Arrow IPC stream format (schema, then record batches).
    ArrowIpc,
}

impl OutputFormat {
    /// Short name (as accepted by `FromStr`).
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Table => "table",
            OutputFormat::Json => "json",
            OutputFormat::NdJson => "ndjson",
            OutputFormat::Csv => "csv",
            OutputFormat::ArrowIpc => "arrow",
        }
    }

    /// HTTP content type of the rendered bytes.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Table => "text/plain; charset=utf-8",
            OutputFormat::Json => "application/json",
            OutputFormat::NdJson => "application/x-ndjson",
            OutputFormat::Csv => "text/csv; charset=utf-8",
            OutputFormat::ArrowIpc => "application/vnd.apache.arrow.stream",
        }
    }
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "table" | "text" => Ok(OutputFormat::Table),
            "json" => Ok(OutputFormat::Json),
            "ndjson" | "jsonl" | "jsonlines" => Ok(OutputFormat::NdJson),
            "csv" => Ok(OutputFormat::Csv),
            "arrow" | "arrow-ipc" | "ipc" => Ok(OutputFormat::ArrowIpc),
            other => Err(format!(
                "unknown output format `{other}` (expected table, json, ndjson, csv or arrow)"
            )),
        }
    }
}

/// Encodes a query result.
pub fn render(result: &QueryResult, fmt: OutputFormat) -> Result<Vec<u8>, QueryError> {
    let err = |e: ArrowError| QueryError::Render {
        format: fmt.name(),
        message: e.to_string(),
    };
    match fmt {
        OutputFormat::Table => {
            let table = deltalake::arrow::util::pretty::pretty_format_batches_with_schema(
                result.schema.clone(),
                &result.batches,
            )
            .map_err(err)?;
            Ok(format!("{table}\n").into_bytes())
        }
        OutputFormat::Json => {
            let mut writer = JsonWriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, JsonArray>(Vec::new());
            for batch in &result.batches {
                writer.write(batch).map_err(err)?;
            }
            writer.finish().map_err(err)?;
            Ok(writer.into_inner())
        }
        OutputFormat::NdJson => {
            let mut writer = JsonWriterBuilder::new().build::<_, LineDelimited>(Vec::new());
            for batch in &result.batches {
                writer.write(batch).map_err(err)?;
            }
            writer.finish().map_err(err)?;
            Ok(writer.into_inner())
        }
        OutputFormat::Csv => {
            let schema = csv_schema(&result.schema);
            let mut writer = deltalake::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            if result.batches.is_empty() {
                // The header is written with the first batch.
                writer
                    .write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(err)?;
            }
            for batch in &result.batches {
                writer
                    .write(&csv_batch(batch, &schema).map_err(err)?)
                    .map_err(err)?;
            }
            Ok(writer.into_inner())
        }
        OutputFormat::ArrowIpc => {
            let schema = result
                .batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| result.schema.clone());
            let mut writer =
                deltalake::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema)
                    .map_err(err)?;
            for batch in &result.batches {
                writer.write(batch).map_err(err)?;
            }
            writer.finish().map_err(err)?;
            writer.into_inner().map_err(err)
        }
    }
}

fn is_nested(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Struct(_)
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
            | DataType::FixedSizeList(..)
            | DataType::Map(..)
            | DataType::Union(..)
    )
}

/// The result schema with nested columns as text (the CSV writer only writes flat columns).
fn csv_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| is_nested(f.data_type())) {
        return schema.clone();
    }
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if is_nested(f.data_type()) {
                    Arc::new(Field::new(f.name(), DataType::Utf8, true))
                } else {
                    f.clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

fn csv_batch(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema().as_ref() == schema.as_ref() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| {
            if is_nested(c.data_type()) {
                nested_to_json(c)
            } else {
                Ok(c.clone())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// Each value of a nested column as JSON text (null stays null), via arrow-json: a one-column
/// batch written as NDJSON gives one `{"v":<value>}` line per row.
fn nested_to_json(column: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "v",
            column.data_type().clone(),
            true,
        )])),
        vec![column.clone()],
    )?;
    let mut writer = LineDelimitedWriter::new(Vec::new());
    writer.write(&batch)?;
    writer.finish()?;
    let text = String::from_utf8(writer.into_inner())
        .map_err(|e| ArrowError::ComputeError(e.to_string()))?;
    let mut out = StringBuilder::with_capacity(column.len(), text.len());
    let mut lines = text.lines();
    for i in 0..column.len() {
        let line = lines.next().unwrap_or("{}");
        if column.is_null(i) {
            out.append_null();
            continue;
        }
        match line
            .strip_prefix("{\"v\":")
            .and_then(|l| l.strip_suffix('}'))
        {
            Some(value) => out.append_value(value),
            None => out.append_null(),
        }
    }
    Ok(Arc::new(out.finish()))
}
