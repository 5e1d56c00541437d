//! The `validate` step: a declared schema compiled, per input schema, into SQL predicates that
//! run on whole batches. A record failing any of them goes to the dead-letter table with the
//! field path, the rule and its value: `amount: must be >= 0 (got -5)`.

use crate::expr::{Map, StepError};
use crate::step::Failure;
use deltalake::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::datatypes::{DataType, Schema};
use deltalake::arrow::util::display::array_value_to_string;
use sluice_core::pipeline::{FieldRule, Scalar, ValidateConfig};

/// One compiled check: a predicate (true = passes) and, for field rules, the value shown.
pub struct Check {
    path: String,
    message: String,
    shows_value: bool,
}

pub struct Validator {
    cfg: ValidateConfig,
}

/// `a.b.c` as SQL: `"a"['b']['c']`.
fn sql_path(path: &str) -> String {
    let mut parts = path.split('.');
    let mut out = format!("\"{}\"", parts.next().unwrap_or("").replace('"', "\"\""));
    for p in parts {
        out.push_str(&format!("['{}']", p.replace('\'', "''")));
    }
    out
}

/// The type of the field at `path`, if the schema has it.
fn resolve(schema: &Schema, path: &str) -> Option<DataType> {
    let mut parts = path.split('.');
    let mut t = schema.field_with_name(parts.next()?).ok()?.data_type().clone();
    for p in parts {
        t = match t {
            DataType::Struct(fields) => fields.iter().find(|f| f.name() == p)?.data_type().clone(),
            _ => return None,
        };
    }
    Some(t)
}

fn type_fits(kind: &str, t: &DataType) -> bool {
    use DataType::*;
    match kind {
        "string" => matches!(t, Utf8 | LargeUtf8 | Utf8View),
        "integer" => t.is_integer(),
        "number" => t.is_integer() || t.is_floating(),
        "boolean" => matches!(t, Boolean),
        "object" => matches!(t, Struct(_)),
        "array" => matches!(t, List(_) | LargeList(_) | ListView(_) | FixedSizeList(_, _)),
        _ => false,
    }
}

fn literal(s: &Scalar) -> String {
    match s {
        Scalar::Bool(b) => b.to_string(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Text(t) => format!("'{}'", t.replace('\'', "''")),
    }
}

fn shown(s: &Scalar) -> String {
    match s {
        Scalar::Text(t) => t.clone(),
        other => literal(other),
    }
}

impl Validator {
    pub fn new(cfg: &ValidateConfig) -> Validator {
        // The config was checked before start, so the JSON Schema translates.
        Validator { cfg: cfg.merged().unwrap_or_else(|_| cfg.clone()) }
    }

    /// Top-level fields the rules read.
    pub fn reads(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in self.cfg.required.iter().chain(self.cfg.fields.keys()) {
            let top = p.split('.').next().unwrap_or("").to_string();
            if !out.contains(&top) {
                out.push(top);
            }
        }
        out
    }

    /// The predicates (`c<i>`) and shown values (`v<i>`) for batches of `schema`.
    pub fn compile(&self, schema: &Schema) -> Result<(Map, Vec<Check>), StepError> {
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut checks = Vec::new();
        let mut add = |pred: String, value: Option<String>, path: &str, message: String| {
            let i = checks.len();
            fields.push((format!("c{i}"), pred));
            fields.push((format!("v{i}"), value.clone().unwrap_or_else(|| "NULL".into())));
            checks.push(Check { path: path.to_string(), message, shows_value: value.is_some() });
        };
        for path in &self.cfg.required {
            let pred = match resolve(schema, path) {
                Some(_) => format!("{} IS NOT NULL", sql_path(path)),
                None => "false".into(),
            };
            add(pred, None, path, "is required".into());
        }
        for (path, rule) in &self.cfg.fields {
            let Some(t) = resolve(schema, path) else { continue };
            if t == DataType::Null {
                continue;
            }
            let e = sql_path(path);
            let FieldRule { kind, minimum, maximum, min_length, max_length, one_of, pattern } = rule;
            if let Some(k) = kind {
                if !type_fits(k, &t) {
                    add(format!("{e} IS NULL"), Some(e.clone()), path, format!("must be {k}, the records have {t}"));
                    continue;
                }
            }
            let numeric = t.is_integer() || t.is_floating();
            let text = matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
            let list = matches!(t, DataType::List(_) | DataType::LargeList(_));
            if numeric {
                if let Some(m) = minimum {
                    add(format!("{e} IS NULL OR {e} >= {m}"), Some(e.clone()), path, format!("must be >= {m}"));
                }
                if let Some(m) = maximum {
                    add(format!("{e} IS NULL OR {e} <= {m}"), Some(e.clone()), path, format!("must be <= {m}"));
                }
            }
            let len = if text { Some(format!("character_length({e})")) } else if list { Some(format!("cardinality({e})")) } else { None };
            if let Some(len) = len {
                if let Some(m) = min_length {
                    add(format!("{e} IS NULL OR {len} >= {m}"), Some(e.clone()), path, format!("must have length >= {m}"));
                }
                if let Some(m) = max_length {
                    add(format!("{e} IS NULL OR {len} <= {m}"), Some(e.clone()), path, format!("must have length <= {m}"));
                }
            }
            if let Some(values) = one_of {
                let list: Vec<String> = values.iter().map(literal).collect();
                let names: Vec<String> = values.iter().map(shown).collect();
                add(format!("{e} IS NULL OR {e} IN ({})", list.join(", ")), Some(e.clone()), path, format!("must be one of {}", names.join(", ")));
            }
            if let (Some(p), true) = (pattern, text) {
                add(
                    format!("{e} IS NULL OR regexp_like({e}, '{}')", p.replace('\'', "''")),
                    Some(e.clone()),
                    path,
                    format!("must match {p}"),
                );
            }
        }
        // Never empty (a map needs a field); this one always passes.
        add("true".into(), None, "", String::new());
        Ok((Map::compile(&fields, schema)?, checks))
    }

    /// The rows that pass every check, and a failure (the first failed check) for the others.
    pub fn apply(map: &Map, checks: &[Check], batch: &RecordBatch) -> Result<(RecordBatch, Vec<Failure>), StepError> {
        let out = map.apply(batch)?;
        let mut keep = vec![true; batch.num_rows()];
        let mut failures = Vec::new();
        for (i, c) in checks.iter().enumerate() {
            let pass = out.column(2 * i);
            let Some(pass) = pass.as_boolean_opt() else { continue };
            let value = out.column(2 * i + 1);
            for row in 0..batch.num_rows() {
                if keep[row] && pass.is_valid(row) && !pass.value(row) {
                    keep[row] = false;
                    let mut error = format!("{}: {}", c.path, c.message);
                    if c.shows_value && value.is_valid(row) {
                        let v = array_value_to_string(value, row).unwrap_or_default();
                        error.push_str(&format!(" (got {})", v.chars().take(100).collect::<String>()));
                    }
                    failures.push(Failure { row, error });
                }
            }
        }
        failures.sort_by_key(|f| f.row);
        let kept = if failures.is_empty() {
            batch.clone()
        } else {
            filter_record_batch(batch, &BooleanArray::from(keep)).map_err(|e| StepError::Eval { step: "validate", expr: String::new(), message: e.to_string() })?
        };
        Ok((kept, failures))
    }
}
