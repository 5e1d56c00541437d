//! Schema merging and batch conforming for appends to Delta tables.
//!
//! deltalake's `SchemaMode::Merge` merges top-level columns, but it builds its input from the
//! *first* batch's schema (all batches of one write must share a schema) and relies on a plain
//! Arrow cast for existing columns, which cannot add a field to a struct. So before handing
//! batches to deltalake we compute one target schema (table schema + new columns / new nested
//! fields, all nullable) and conform every batch to it: columns reordered by name, missing
//! (nested) fields filled with nulls, values cast to the table's type where that is lossless.
//! deltalake then sees a single schema that is a superset of the table's and only has to add
//! the new fields to the table metadata in the same commit.

use std::sync::Arc;

use deltalake::arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, LargeListArray, ListArray, RecordBatch,
    RecordBatchOptions, StructArray,
};
use deltalake::arrow::compute::{cast_with_options, CastOptions};
use deltalake::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::engine::arrow_conversion::{TryFromArrow, TryFromKernel};
use deltalake::kernel::StructField;

/// Why a batch cannot be stored in the table. `column` is a dotted path (`payload.speed`,
/// `items[].sku`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ConformError {
    /// The batch has a value type that cannot be stored losslessly in the table's column type.
    TypeConflict {
        column: String,
        table_type: DataType,
        batch_type: DataType,
    },
    /// Arrow failed while converting values (e.g. a UInt64 above i64::MAX, a null in a
    /// non-nullable column).
    Arrow { column: String, message: String },
}

impl std::fmt::Display for ConformError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConformError::TypeConflict {
                column,
                table_type,
                batch_type,
            } => write!(
                f,
                "column `{column}` has type {table_type} in the table but {batch_type} in the new data"
            ),
            ConformError::Arrow { column, message } => {
                write!(f, "column `{column}`: {message}")
            }
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// The type a new column gets in the table: the Delta type of `field`, as Arrow (e.g. UInt64 ->
/// Int64, Utf8View -> Utf8, Timestamp(ms, UTC) -> Timestamp(us, UTC)), always nullable because
/// the rows already in the table have no value for it.
fn canonical_new_field(field: &Field, path: &str) -> Result<Field, ConformError> {
    let conv = |e: ArrowError| ConformError::Arrow {
        column: join(path, field.name()),
        message: format!("type {} cannot be stored in Delta: {e}", field.data_type()),
    };
    let kernel = StructField::try_from_arrow(field).map_err(conv)?;
    let arrow = Field::try_from_kernel(&kernel).map_err(conv)?;
    Ok(make_nullable(&arrow))
}

/// `field` with itself and every nested field nullable.
fn make_nullable(field: &Field) -> Field {
    let dt = match field.data_type() {
        DataType::Struct(fields) => DataType::Struct(
            fields
                .iter()
                .map(|f| Arc::new(make_nullable(f)))
                .collect::<Fields>(),
        ),
        DataType::List(inner) => DataType::List(Arc::new(make_nullable(inner))),
        DataType::LargeList(inner) => DataType::LargeList(Arc::new(make_nullable(inner))),
        other => other.clone(),
    };
    field.clone().with_data_type(dt).with_nullable(true)
}

fn is_null_only(dt: &DataType) -> bool {
    match dt {
        DataType::Null => true,
        DataType::Struct(fields) => fields.iter().all(|f| is_null_only(f.data_type())),
        _ => false,
    }
}

/// Whether values of `from` can be stored in a column of type `to` without losing information
/// (or with the usual, expected loss: int -> float).
fn implicit_cast_ok(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to || matches!(from, Null) {
        return true;
    }
    // Partition columns are read back dictionary-encoded; their values are the value type.
    if let Dictionary(_, value) = from {
        return implicit_cast_ok(value, to);
    }
    let string = |t: &DataType| matches!(t, Utf8 | LargeUtf8 | Utf8View);
    let binary = |t: &DataType| matches!(t, Binary | LargeBinary | BinaryView);
    let int_rank = |t: &DataType| match t {
        Int8 => Some((true, 1)),
        Int16 => Some((true, 2)),
        Int32 => Some((true, 4)),
        Int64 => Some((true, 8)),
        UInt8 => Some((false, 1)),
        UInt16 => Some((false, 2)),
        UInt32 => Some((false, 4)),
        UInt64 => Some((false, 8)),
        _ => None,
    };
    match (from, to) {
        _ if string(from) && string(to) => true,
        _ if binary(from) && binary(to) => true,
        // Unsigned to a signed type of the same width is allowed: Delta has no unsigned types,
        // so a new UInt64 column becomes Int64; out-of-range values fail the cast (not wrap).
        _ if int_rank(from).is_some() && int_rank(to).is_some() => {
            let (fs, fw) = int_rank(from).unwrap();
            let (ts, tw) = int_rank(to).unwrap();
            // never signed -> unsigned (negative values)
            tw >= fw && (ts || !fs)
        }
        _ if int_rank(from).is_some() => matches!(to, Float32 | Float64 | Decimal128(..)),
        (Float16 | Float32, Float32 | Float64) => true,
        (Timestamp(..) | Date32 | Date64, Timestamp(..)) => true,
        (Date64, Date32) | (Date32, Date64) => true,
        (Decimal128(..), Decimal128(..) | Float64) => true,
        _ => false,
    }
}

/// Merges the schema of new data into the table schema. Table fields keep their position, type
/// and nullability; new fields are appended (also inside structs and list elements), nullable,
/// with their Delta type. Fields of the new data that are null-only (`DataType::Null`) and
/// unknown to the table are not added: they carry no value and Delta has no type for them.
pub(crate) fn merge_schema(table: &Schema, incoming: &Schema) -> Result<Schema, ConformError> {
    let fields = merge_fields(table.fields(), incoming.fields(), "")?;
    Ok(Schema::new_with_metadata(fields, table.metadata().clone()))
}

fn merge_fields(table: &Fields, incoming: &Fields, path: &str) -> Result<Fields, ConformError> {
    let mut out: Vec<FieldRef> = Vec::with_capacity(table.len());
    for tf in table.iter() {
        match incoming.find(tf.name()) {
            Some((_, inf)) => out.push(Arc::new(merge_field(tf, inf, path)?)),
            None => out.push(tf.clone()),
        }
    }
    for inf in incoming.iter() {
        if table.find(inf.name()).is_none() && !is_null_only(inf.data_type()) {
            out.push(Arc::new(canonical_new_field(inf, path)?));
        }
    }
    Ok(out.into())
}

fn merge_field(table: &Field, incoming: &Field, path: &str) -> Result<Field, ConformError> {
    let here = join(path, table.name());
    let dt = match (table.data_type(), incoming.data_type()) {
        (t, i) if t == i => return Ok(table.clone()),
        (_, DataType::Null) => return Ok(table.clone()),
        (DataType::Struct(tf), DataType::Struct(inf)) => {
            DataType::Struct(merge_fields(tf, inf, &here)?)
        }
        (DataType::List(te), DataType::List(ie) | DataType::LargeList(ie)) => {
            DataType::List(Arc::new(merge_field(te, ie, &format!("{here}[]"))?))
        }
        (DataType::LargeList(te), DataType::List(ie) | DataType::LargeList(ie)) => {
            DataType::LargeList(Arc::new(merge_field(te, ie, &format!("{here}[]"))?))
        }
        (t, i) if implicit_cast_ok(i, t) => return Ok(table.clone()),
        (t, i) => {
            return Err(ConformError::TypeConflict {
                column: here,
                table_type: t.clone(),
                batch_type: i.clone(),
            })
        }
    };
    Ok(table.clone().with_data_type(dt))
}

/// Converts `batch` to exactly `target` (see [`merge_schema`]): columns by name, missing ones
/// null, values cast to the target types.
pub(crate) fn conform_batch(
    batch: &RecordBatch,
    target: &SchemaRef,
) -> Result<RecordBatch, ConformError> {
    if batch.schema().as_ref() == target.as_ref() {
        return Ok(batch.clone());
    }
    let rows = batch.num_rows();
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(col) => conform_array(col, f.data_type(), f.name()),
            None if !f.is_nullable() => Err(ConformError::Arrow {
                column: f.name().clone(),
                message: "the column is not nullable but missing from the new data".into(),
            }),
            None => Ok(new_null_array(f.data_type(), rows)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Errors here name the field themselves ("Column 'x' is declared as non-nullable but
    // contains null values").
    RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| ConformError::Arrow {
        column: "*".into(),
        message: e.to_string(),
    })
}

/// Converts one array to `target` type; `path` names it in errors.
pub(crate) fn conform_array(
    array: &ArrayRef,
    target: &DataType,
    path: &str,
) -> Result<ArrayRef, ConformError> {
    conform(array, target, path, false)
}

/// [`conform_array`] for a table rewrite, which may also turn scalar columns (numbers,
/// booleans) into text: the converter widens a change-data-capture table's retyped columns
/// so (`ConvertOptions::widen_to_text`). An append never does.
pub(crate) fn rewrite_array(
    array: &ArrayRef,
    target: &DataType,
    path: &str,
) -> Result<ArrayRef, ConformError> {
    conform(array, target, path, true)
}

fn conform(
    array: &ArrayRef,
    target: &DataType,
    path: &str,
    to_text: bool,
) -> Result<ArrayRef, ConformError> {
    let from = array.data_type();
    if from == target {
        return Ok(array.clone());
    }
    let arrow_err = |e: ArrowError| ConformError::Arrow {
        column: path.to_string(),
        message: e.to_string(),
    };
    match (from, target) {
        (DataType::Null, _) => Ok(new_null_array(target, array.len())),
        (DataType::Struct(_), DataType::Struct(to_fields)) => {
            let sa = array.as_struct();
            let children = to_fields
                .iter()
                .map(|tf| match sa.column_by_name(tf.name()) {
                    Some(child) => conform(child, tf.data_type(), &join(path, tf.name()), to_text),
                    None => Ok(new_null_array(tf.data_type(), sa.len())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = StructArray::try_new_with_length(
                to_fields.clone(),
                children,
                sa.nulls().cloned(),
                sa.len(),
            )
            .map_err(arrow_err)?;
            Ok(Arc::new(out))
        }
        (DataType::List(_), DataType::List(to_elem)) => {
            let la = array.as_list::<i32>();
            let values = conform(la.values(), to_elem.data_type(), &format!("{path}[]"), to_text)?;
            let out = ListArray::try_new(
                to_elem.clone(),
                la.offsets().clone(),
                values,
                la.nulls().cloned(),
            )
            .map_err(arrow_err)?;
            Ok(Arc::new(out))
        }
        (DataType::LargeList(_), DataType::LargeList(to_elem)) => {
            let la = array.as_list::<i64>();
            let values = conform(la.values(), to_elem.data_type(), &format!("{path}[]"), to_text)?;
            let out = LargeListArray::try_new(
                to_elem.clone(),
                la.offsets().clone(),
                values,
                la.nulls().cloned(),
            )
            .map_err(arrow_err)?;
            Ok(Arc::new(out))
        }
        (DataType::List(from_elem), DataType::LargeList(_))
        | (DataType::LargeList(from_elem), DataType::List(_)) => {
            // Change the offset width first, then conform the elements.
            let as_target_kind = match target {
                DataType::List(_) => DataType::List(from_elem.clone()),
                _ => DataType::LargeList(from_elem.clone()),
            };
            let recast = cast_with_options(array, &as_target_kind, &strict()).map_err(arrow_err)?;
            conform(&recast, target, path, to_text)
        }
        (from, to) if implicit_cast_ok(from, to) => {
            cast_with_options(array, to, &strict()).map_err(arrow_err)
        }
        (from, DataType::Utf8)
            if to_text && (from.is_numeric() || matches!(from, DataType::Boolean)) =>
        {
            cast_with_options(array, target, &strict()).map_err(arrow_err)
        }
        (from, to) => Err(ConformError::TypeConflict {
            column: path.to_string(),
            table_type: to.clone(),
            batch_type: from.clone(),
        }),
    }
}

/// Casts that fail instead of producing nulls (a value that does not fit is an error, never a
/// silently dropped value).
fn strict() -> CastOptions<'static> {
    CastOptions {
        safe: false,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Float64Array, Int64Array, StringArray};

    fn st(fields: Vec<Field>) -> DataType {
        DataType::Struct(fields.into())
    }

    #[test]
    fn merge_adds_new_nested_field_nullable_at_end() {
        let table = Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("s", st(vec![Field::new("x", DataType::Int64, true)]), true),
        ]);
        let incoming = Schema::new(vec![
            Field::new(
                "s",
                st(vec![
                    Field::new("y", DataType::Utf8View, false),
                    Field::new("x", DataType::Int32, false),
                ]),
                false,
            ),
            Field::new("b", DataType::UInt64, false),
            Field::new("n", DataType::Null, true),
        ]);
        let merged = merge_schema(&table, &incoming).unwrap();
        let names: Vec<_> = merged.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["a", "s", "b"]);
        assert_eq!(merged.field(0), table.field(0));
        assert_eq!(
            merged.field(1).data_type(),
            &st(vec![
                Field::new("x", DataType::Int64, true),
                Field::new("y", DataType::Utf8, true)
            ])
        );
        assert_eq!(merged.field(2), &Field::new("b", DataType::Int64, true));
    }

    #[test]
    fn merge_rejects_float_into_int_and_names_column() {
        let table = Schema::new(vec![Field::new(
            "s",
            st(vec![Field::new("v", DataType::Int64, true)]),
            true,
        )]);
        let incoming = Schema::new(vec![Field::new(
            "s",
            st(vec![Field::new("v", DataType::Float64, true)]),
            true,
        )]);
        let err = merge_schema(&table, &incoming).unwrap_err();
        assert!(err.to_string().contains("`s.v`"), "{err}");
    }

    #[test]
    fn conform_fills_missing_nested_and_casts() {
        let target: SchemaRef = Arc::new(Schema::new(vec![
            Field::new(
                "s",
                st(vec![
                    Field::new("x", DataType::Float64, true),
                    Field::new("y", DataType::Utf8, true),
                ]),
                true,
            ),
            Field::new("z", DataType::Int64, true),
        ]));
        let s = StructArray::from(vec![(
            Arc::new(Field::new("x", DataType::Int64, true)),
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        )]);
        let batch = RecordBatch::try_from_iter(vec![("s", Arc::new(s) as ArrayRef)]).unwrap();
        let out = conform_batch(&batch, &target).unwrap();
        assert_eq!(out.schema(), target);
        let s = out.column(0).as_struct();
        let x = s.column(0).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(x.values(), &[1.0, 2.0]);
        assert_eq!(s.column(1).null_count(), 2);
        assert!(s.column(1).as_any().downcast_ref::<StringArray>().is_some());
        assert_eq!(out.column(1).null_count(), 2);
    }
}
