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
//! `public`, or for MySQL outside the URL's database: `<source>_<schema>_<table>`), which
//! lands in the lake as the table's mirror (and, with `changelog: true`, also in
//! `<stream>__changelog`).
//!
//! ```yaml
//! sources:
//!   legacy:
//!     mysql:
//!       url: mysql://sluice:secret@127.0.0.1:3306/shop
//!       tables: { exclude: ["shop.sessions"] }
//! ```

use crate::units::Dur;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A change-data-capture source. Written as a one-key map: `{ postgres: { ... } }`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Postgres(PostgresSourceConfig),
    Mysql(MysqlSourceConfig),
}

impl SourceConfig {
    /// Partitions of each table's stream.
    pub fn partitions(&self) -> u32 {
        match self {
            SourceConfig::Postgres(c) => c.partitions,
            SourceConfig::Mysql(c) => c.partitions,
        }
    }

    /// Does each table also land in an append-only changelog table?
    pub fn changelog(&self) -> bool {
        match self {
            SourceConfig::Postgres(c) => c.changelog,
            SourceConfig::Mysql(c) => c.changelog,
        }
    }
}

use serde::de::{MapAccess, Visitor};
use serde::Deserializer;
crate::pipeline::one_key_enum!(SourceConfig, "source", "postgres" => Postgres(PostgresSourceConfig), "mysql" => Mysql(MysqlSourceConfig));

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

/// Binlog replication from MySQL 8 or MariaDB 10.5+ (`log_bin` on, `binlog_format = ROW`,
/// `binlog_row_image = FULL`, `binlog_row_metadata = FULL`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MysqlSourceConfig {
    /// `mysql://user[:password]@host[:port][/database]`. The user needs REPLICATION SLAVE,
    /// REPLICATION CLIENT and SELECT on the captured tables. Tables of `database` are named
    /// without it (`<source>_<table>`).
    pub url: String,
    /// The replica server id Sluice registers with (unique among the server's replicas).
    /// Default: derived from the source name.
    #[serde(default)]
    pub server_id: Option<u32>,
    /// `database.table` patterns. Default: every table of the URL's database (every
    /// database but the system ones when the URL names none).
    #[serde(default)]
    pub tables: TableFilter,
    /// Partitions of each table's stream.
    #[serde(default = "one")]
    pub partitions: u32,
    /// Also land every change in an append-only table `<stream>__changelog`.
    #[serde(default)]
    pub changelog: bool,
    /// `initial`: snapshot every captured table when the source first starts; `never`: only
    /// changes from then on (snapshots on demand still work).
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Rows per snapshot chunk.
    #[serde(default = "default_snapshot_chunk")]
    pub snapshot_chunk: usize,
    /// Pause between snapshot chunks.
    #[serde(default = "no_pause")]
    pub snapshot_throttle: Dur,
    /// `[database.]table` (in the URL's database when unqualified) where snapshots write
    /// their watermarks, DBLog's way: needed on MySQL, which does not report a consistent
    /// read's binlog position; used on any server when set. Created if missing (the user
    /// then needs CREATE on it, and INSERT and UPDATE always). Never captured itself.
    #[serde(default)]
    pub watermark_table: Option<String>,
}

impl MysqlSourceConfig {
    /// The watermark table as (database, table), if set.
    pub fn watermark(&self) -> Option<(String, String)> {
        let t = self.watermark_table.as_deref()?;
        Some(match t.split_once('.') {
            Some((db, name)) => (db.to_string(), name.to_string()),
            None => (self.home(), t.to_string()),
        })
    }

    /// The database named in the URL, if any.
    pub fn database(&self) -> Option<String> {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        let path = rest.split_once('/').map(|(_, p)| p)?;
        let db = path.split('?').next().unwrap_or("");
        (!db.is_empty()).then(|| db.to_string())
    }

    /// Tables are named without this database (`<source>_<table>`).
    pub fn home(&self) -> String {
        self.database().unwrap_or_default()
    }

    /// Is `db.table` captured? System databases and the watermark table never are.
    pub fn captures(&self, db: &str, table: &str) -> bool {
        if matches!(db, "mysql" | "sys" | "information_schema" | "performance_schema") {
            return false;
        }
        if self.watermark().is_some_and(|(d, t)| d == db && t == table) {
            return false;
        }
        let default = match self.database() {
            Some(d) => format!("{d}.*"),
            None => "*.*".into(),
        };
        self.tables.captures_or(&default, db, table)
    }

    /// The replica server id: configured, or derived from the source name.
    pub fn server_id(&self, source: &str) -> u32 {
        self.server_id.unwrap_or_else(|| {
            // FNV-1a: stable across versions, unlike std's hasher.
            let h = source.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
            0x5100_0000 | (h & 0x00ff_ffff)
        })
    }
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

/// Rows per snapshot chunk. Each chunk costs a few round trips and an fsync whatever its
/// size: 1M rows took 15.3 s in chunks of 1,024, 6.0 s in chunks of 8,192 and 5.4–6.4 s in
/// chunks of 16,384 (session 11, one run each on a loaded 2-core machine); 8,192 keeps a
/// chunk's rows and events to a few MB.
fn default_snapshot_chunk() -> usize {
    8192
}

fn default_heartbeat() -> Dur {
    Dur(Duration::from_secs(10))
}

/// Which tables a source captures: `schema.table` patterns where `*` matches any run of
/// characters. Excludes win. No include: the source's default (PostgreSQL: `public.*`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableFilter {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl TableFilter {
    /// Is `schema.table` captured (a PostgreSQL source's default: `public.*`)?
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        self.captures_or("public.*", schema, table)
    }

    /// Is `schema.table` captured, with `default` as the include when none is given?
    pub fn captures_or(&self, default: &str, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        let included = if self.include.is_empty() { glob(default, &name) } else { self.include.iter().any(|p| glob(p, &name)) };
        included && !self.exclude.iter().any(|p| glob(p, &name))
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
    table_stream_in(source, "public", schema, table)
}

/// [`table_stream`] with `home` as the schema whose tables are named without it.
pub fn table_stream_in(source: &str, home: &str, schema: &str, table: &str) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '_' }).collect::<String>();
    let name = if schema == home { format!("{source}_{}", clean(table)) } else { format!("{source}_{}_{}", clean(schema), clean(table)) };
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
            SourceConfig::Mysql(my) => {
                if !(my.url.starts_with("mysql://") || my.url.starts_with("mariadb://")) {
                    return Err((at(&["mysql", "url"]), "must start with mysql:// (or mariadb://)".into()));
                }
                if !(1..=1024).contains(&my.partitions) {
                    return Err((at(&["mysql", "partitions"]), "must be between 1 and 1024".into()));
                }
                for p in my.tables.include.iter().chain(&my.tables.exclude) {
                    if !p.contains('.') {
                        return Err((at(&["mysql", "tables"]), format!("{p:?}: patterns are database.table, e.g. shop.* or shop.orders")));
                    }
                }
                if !matches!(my.snapshot.as_str(), "initial" | "never") {
                    return Err((at(&["mysql", "snapshot"]), format!("{:?}: use initial or never", my.snapshot)));
                }
                if !(1..=1_000_000).contains(&my.snapshot_chunk) {
                    return Err((at(&["mysql", "snapshot_chunk"]), "must be between 1 and 1000000".into()));
                }
                if my.server_id == Some(0) {
                    return Err((at(&["mysql", "server_id"]), "must be more than 0".into()));
                }
                if let Some((db, table)) = my.watermark() {
                    if db.is_empty() || table.is_empty() || table.contains('.') {
                        return Err((at(&["mysql", "watermark_table"]), "database.table (or a table of the URL's database, when the URL names one)".into()));
                    }
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
        assert!(TableFilter::default().captures("public", "x") && !TableFilter::default().captures("other", "x"));
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXc") && glob("*", "") && glob("x", "x"));
    }

    #[test]
    fn stream_names() {
        assert_eq!(table_stream("shop", "public", "Orders"), "shop_orders");
        assert_eq!(table_stream("shop", "sales", "line items"), "shop_sales_line_items");
        assert_eq!(table_stream_in("legacy", "shop", "shop", "orders"), "legacy_orders");
        assert_eq!(table_stream_in("legacy", "shop", "crm", "users"), "legacy_crm_users");
    }

    #[test]
    fn mysql_defaults() {
        let c = |url: &str| MysqlSourceConfig {
            url: url.into(),
            server_id: None,
            tables: TableFilter::default(),
            partitions: 1,
            changelog: false,
            snapshot: "initial".into(),
            snapshot_chunk: 1024,
            snapshot_throttle: no_pause(),
            watermark_table: None,
        };
        let shop = c("mysql://u:p@h:3306/shop?x=1");
        assert_eq!(shop.database().as_deref(), Some("shop"));
        assert!(shop.captures("shop", "orders") && !shop.captures("crm", "users"));
        let all = c("mysql://u@h");
        assert_eq!(all.database(), None);
        assert!(all.captures("crm", "users") && !all.captures("mysql", "user"));
        assert_ne!(all.server_id("a"), all.server_id("b"));
        let marks = MysqlSourceConfig { watermark_table: Some("sluice_watermark".into()), ..shop.clone() };
        assert_eq!(marks.watermark(), Some(("shop".into(), "sluice_watermark".into())));
        assert!(!marks.captures("shop", "sluice_watermark") && marks.captures("shop", "orders"));
    }
}
