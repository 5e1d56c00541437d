//! `sluice query "SQL"`: runs SQL over the lake directly (no server needed).

use sluice_query::{render, OutputFormat, QueryEngine};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct QueryArgs {
    /// The SQL statement (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE).
    sql: String,
    /// Output: table, json, ndjson, csv or arrow.
    #[arg(short, long, default_value = "table")]
    format: OutputFormat,
    /// Config file whose lake_root to read.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Lake root (overrides the config).
    #[arg(long)]
    lake: Option<String>,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let root = match (&args.lake, &args.config) {
        (Some(l), _) => l.clone(),
        (None, Some(c)) => sluice_core::config::load(c).map_err(|e| anyhow::anyhow!("{e}"))?.lake_root(),
        (None, None) => sluice_core::Config::default().lake_root(),
    };
    let engine = QueryEngine::new(&root);
    let result = engine.sql(&args.sql).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes = render(&result, args.format).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}
