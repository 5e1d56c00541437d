//! Declarative pipelines (filter, map, validate, dedup, enrich, route) compiled to a DAG.
//!
//! Built so far: the vectorized expression steps — [`Filter`] and [`Map`] — compiled from SQL
//! against an Arrow schema and applied to whole record batches (issue 3). The spec, the DAG,
//! the other steps and the runtime are not built yet: streams land in the lake directly (see
//! `sluice_lake::sink`).

mod expr;

pub use expr::{Filter, Map, StepError};
