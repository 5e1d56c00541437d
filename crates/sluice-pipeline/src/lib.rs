//! Declarative pipelines (filter, map, validate, dedup, enrich, route) compiled to a DAG.
//! Not built yet: streams land in the lake directly (see `sluice-lake::sink`).
