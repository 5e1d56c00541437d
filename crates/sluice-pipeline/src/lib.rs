//! Declarative pipelines: records of source streams pass steps (filter, map, select, drop,
//! validate, dedup, enrich, lookup, route) and land in sinks (lake tables, other streams, and
//! external sinks built in `sluice-connect`), exactly-once into the lake.
//!
//! - [`check`]: what `sluice check` verifies of a pipeline's SQL.
//! - [`Filter`] and [`Map`]: SQL expressions compiled by DataFusion for an Arrow schema and
//!   applied to whole record batches (vectorized).
//! - [`step`]: steps as they run (compiled per schema, row-by-row fallback on errors).
//! - [`lookup`]: the `lookup` step and its [`LookupSource`]s.
//! - [`runtime`]: the running pipeline, its checkpoints, dead letters and taps.

pub mod check;
mod dedup;
mod enrich;
mod expr;
pub mod lookup;
pub mod runtime;
pub mod step;
mod validate;

pub use enrich::http_client;
pub use expr::{Filter, Map, StepError};
pub use lookup::LookupSource;
pub use runtime::{rows_to_json, ExternalSink, Pipeline, PipelineSpec, PipelineStatus, TapPoint};
