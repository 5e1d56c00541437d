//! `sources:` in sluice.yaml: change data capture from databases.
//!
//! ```yaml
//! sources:
//!   shop:
//!     postgres:
//!       url: postgres://sluice@127.0.0.1:5432/shop
//!       tables:
//!         include: ["public.*"]
//!         exclude: ["public.audit_*"]
//! ```
//!
//! Each captured table's changes go to the stream `<source>_<table>` (tables outside
//! `public`: `<source>_<schema>_<table>`), which lands in the lake as the table's mirror
//! (and, with `changelog: true`, also in `<stream>__changelog`).

use crate::units::Dur;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A change-data-capture source. Written as a one-key map: `{ postgres: { ... } }`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Postgres(PostgresSourceConfig),
}

use serde::de::{MapAccess, Visitor};
use serde::Deserializer;
crate::pipeline::one_key_enum!(SourceConfig, "source", "postgres" => Postgres(PostgresSourceConfig));

/// Logical replication from PostgreSQL (13 or later, `wal_level = logical`) with `pgoutput`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// `postgres://user[:password]@host[:port]/database`. The user needs the REPLICATION
    /// attribute (and to create the publication: superuser, or create it yourself).
    pub url: String,
    /// Replication slot; created when missing. Default `sluice_<source>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication; created `FOR ALL TABLES` when missing. Default `sluice_<source>`.
    #[serde(default)]
    pub publication: Option<String>,
    #[serde(default)]
    pub tables: TableFilter,
    /// Partitions of each table's stream (rows are spread by primary key, so one row's
    /// changes stay in order).
    #[serde(default = "one")]
    pub partitions: u32,
    /// Also land every change in an append-only table `<stream>__changelog` (the stream's
    /// own table is the mirror of the source table).
    #[serde(default)]
    pub changelog: bool,
    /// `initial`: snapshot every captured table when the source first starts (its slot is
    /// created); `never`: only changes from then on (snapshots on demand still work).
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Rows per snapshot chunk.
    #[serde(default = "default_snapshot_chunk")]
    pub snapshot_chunk: usize,
    /// Pause between snapshot chunks (to spare a busy database).
    #[serde(default = "no_pause")]
    pub snapshot_throttle: Dur,
    /// How often an idle source writes a heartbeat to the WAL and confirms its position, so
    /// that an idle slot does not hold WAL back.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Dur,
}

fn one() -> u32 {
    1
}

fn no_pause() -> Dur {
    Dur(Duration::ZERO)
}

fn default_snapshot() -> String {
    "initial".into()
}

fn default_snapshot_chunk() -> usize {
    1024
}

fn default_heartbeat() -> Dur {
    Dur(Duration::from_secs(10))
}

/// Which tables a source captures: `schema.table` patterns where `*` matches any run of
/// characters. Excludes win.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableFilter {
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Default for TableFilter {
    fn default() -> Self {
        TableFilter { include: default_include(), exclude: Vec::new() }
    }
}

fn default_include() -> Vec<String> {
    vec!["public.*".into()]
}

impl TableFilter {
    /// Is `schema.table` captured?
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        self.include.iter().any(|p| glob(p, &name)) && !self.exclude.iter().any(|p| glob(p, &name))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl PostgresSourceConfig {
    pub fn slot_name(&self, source: &str) -> String {
        self.slot.clone().unwrap_or_else(|| format!("sluice_{}", source.replace('-', "_")))
    }

    pub fn publication_name(&self, source: &str) -> String {
        self.publication.clone().unwrap_or_else(|| format!("sluice_{}", source.replace('-', "_")))
    }
}

/// The stream a captured table's changes go to: `<source>_<table>`, or
/// `<source>_<schema>_<table>` outside `public`; lower case, other characters as `_`.
pub fn table_stream(source: &str, schema: &str, table: &str) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '_' }).collect::<String>();
    let name = if schema == "public" { format!("{source}_{}", clean(table)) } else { format!("{source}_{}_{}", clean(schema), clean(table)) };
    name.chars().take(100).collect()
}

/// The source whose table streams are named like `stream` (`<source>_...`), if any: the
/// longest source name that prefixes it.
pub fn source_of_stream<'a>(sources: &'a BTreeMap<String, SourceConfig>, stream: &str) -> Option<(&'a str, &'a SourceConfig)> {
    sources
        .iter()
        .filter(|(name, _)| stream.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('_') && rest.len() > 1))
        .max_by_key(|(name, _)| name.len())
        .map(|(n, c)| (n.as_str(), c))
}

/// Checks sources: names, URLs, slot and publication names, partitions.
pub(crate) fn validate(sources: &BTreeMap<String, SourceConfig>) -> Result<(), (Vec<String>, String)> {
    for (name, s) in sources {
        let at = |k: &[&str]| {
            let mut p = vec!["sources".to_string(), name.clone()];
            p.extend(k.iter().map(|s| s.to_string()));
            p
        };
        crate::validate_stream_name(name).map_err(|m| (at(&[]), m.replace("stream name", "source name")))?;
        match s {
            SourceConfig::Postgres(pg) => {
                if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
                    return Err((at(&["postgres", "url"]), "must start with postgres:// or postgresql://".into()));
                }
                let ident = |v: &str| !v.is_empty() && v.len() <= 63 && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !ident(&pg.slot_name(name)) {
                    return Err((at(&["postgres", "slot"]), "a slot name is 1-63 characters of a-z, 0-9 and _".into()));
                }
                if !ident(&pg.publication_name(name)) {
                    return Err((at(&["postgres", "publication"]), "a publication name is 1-63 characters of a-z, 0-9 and _".into()));
                }
                if !(1..=1024).contains(&pg.partitions) {
                    return Err((at(&["postgres", "partitions"]), "must be between 1 and 1024".into()));
                }
                if pg.tables.include.is_empty() {
                    return Err((at(&["postgres", "tables", "include"]), "captures nothing: give at least one pattern".into()));
                }
                for p in pg.tables.include.iter().chain(&pg.tables.exclude) {
                    if !p.contains('.') {
                        return Err((at(&["postgres", "tables"]), format!("{p:?}: patterns are schema.table, e.g. public.* or public.orders")));
                    }
                }
                if !matches!(pg.snapshot.as_str(), "initial" | "never") {
                    return Err((at(&["postgres", "snapshot"]), format!("{:?}: use initial or never", pg.snapshot)));
                }
                if !(1..=1_000_000).contains(&pg.snapshot_chunk) {
                    return Err((at(&["postgres", "snapshot_chunk"]), "must be between 1 and 1000000".into()));
                }
                if pg.heartbeat.0.is_zero() {
                    return Err((at(&["postgres", "heartbeat"]), "must be more than 0".into()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_patterns() {
        let f = TableFilter { include: vec!["public.*".into(), "sales.order*".into()], exclude: vec!["public.audit_*".into()] };
        assert!(f.captures("public", "users"));
        assert!(!f.captures("public", "audit_log"));
        assert!(f.captures("sales", "orders"));
        assert!(!f.captures("sales", "items"));
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXc") && glob("*", "") && glob("x", "x"));
    }

    #[test]
    fn stream_names() {
        assert_eq!(table_stream("shop", "public", "Orders"), "shop_orders");
        assert_eq!(table_stream("shop", "sales", "line items"), "shop_sales_line_items");
    }
}
