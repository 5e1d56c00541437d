//! Declarative pipelines: records of source streams pass steps (filter, map, select, drop,
//! route) and land in sinks (lake tables, other streams), exactly-once into the lake.
//!
//! - [`check`]: what `sluice check` verifies of a pipeline's SQL.
//! - [`Filter`] and [`Map`]: SQL expressions compiled by DataFusion for an Arrow schema and
//!   applied to whole record batches (vectorized).
//! - [`step`]: steps as they run (compiled per schema, row-by-row fallback on errors).
//! - [`runtime`]: the running pipeline, its checkpoints and dead letters.

pub mod check;
mod dedup;
mod enrich;
mod expr;
pub mod runtime;
pub mod step;
mod validate;

pub use expr::{Filter, Map, StepError};
pub use runtime::{rows_to_json, ExternalSink, Pipeline, PipelineSpec, PipelineStatus};
