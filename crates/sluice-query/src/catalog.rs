//! The lake as a DataFusion schema: tables are looked up when a statement references them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use deltalake::datafusion::catalog::{SchemaProvider, TableProvider};
use deltalake::datafusion::error::{DataFusionError, Result as DFResult};
use deltalake::datafusion::logical_expr::TableType;
use deltalake::delta_datafusion::TableProviderBuilder;
use deltalake::kernel::Snapshot;
use deltalake::logstore::{LogStore as _, LogStoreRef};
use deltalake::DeltaTableError;
use sluice_lake::delta::{list_tables, table_log_store, LakeError};

/// A DataFusion schema whose tables are the Delta tables directly under the lake root.
///
/// `table(name)` — called by the SQL planner only for the tables a statement references — loads
/// the table's LATEST version every time (so a commit that landed a millisecond ago is visible)
/// and returns deltalake's table provider, which prunes files by partition values and by the
/// file statistics in the Delta log, and lets the Parquet reader prune row groups / pages.
///
/// Loading is incremental: the log store and last snapshot of each table are kept, and a new
/// query only reads the commits since (one `_delta_log` listing when nothing changed). Only the
/// protocol/metadata are loaded here; the file list is read from the log when the scan is
/// planned, with the query's filters applied.
#[derive(Debug)]
pub(crate) struct LakeSchema {
    root: String,
    /// Table names for `table_names()` (information_schema, SHOW TABLES); refreshed by
    /// [`LakeSchema::refresh_names`] before statements that need it.
    names: RwLock<Vec<String>>,
    cache: Mutex<HashMap<String, Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    log_store: LogStoreRef,
    snapshot: Option<Arc<Snapshot>>,
}

impl LakeSchema {
    pub(crate) fn new(root: &str) -> LakeSchema {
        LakeSchema {
            root: root.to_string(),
            names: RwLock::new(Vec::new()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn root(&self) -> &str {
        &self.root
    }

    /// Re-lists the tables under the root.
    pub(crate) async fn refresh_names(&self) -> Result<Vec<String>, LakeError> {
        let names = list_tables(&self.root).await?;
        if let Ok(mut guard) = self.names.write() {
            *guard = names.clone();
        }
        Ok(names)
    }

    fn forget(&self, name: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(name);
        }
    }

    /// The latest snapshot of `name`, or `None` if there is no such Delta table.
    async fn latest(
        &self,
        name: &str,
    ) -> Result<Option<(LogStoreRef, Arc<Snapshot>)>, DeltaTableError> {
        let cached = self.cache.lock().ok().and_then(|c| c.get(name).cloned());
        let cached = match cached {
            Some(c) => c,
            None => {
                let log_store = match table_log_store(&self.root, name).await {
                    Ok(Some(store)) => store,
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(DeltaTableError::Generic(e.to_string())),
                };
                Cached {
                    log_store,
                    snapshot: None,
                }
            }
        };
        let updated = match &cached.snapshot {
            Some(prev) => prev
                .clone()
                .update(cached.log_store.engine(None), None)
                .await
                .map(Some)
                // E.g. the table was deleted and re-created: load from scratch.
                .or_else(|_| Ok::<_, DeltaTableError>(None))?,
            None => None,
        };
        let snapshot = match updated {
            Some(s) => s,
            None => match Snapshot::try_new(cached.log_store.as_ref(), None).await {
                Ok(s) => Arc::new(s),
                Err(DeltaTableError::NotATable(_)) => {
                    self.forget(name);
                    return Ok(None);
                }
                Err(e) => {
                    self.forget(name);
                    return Err(e);
                }
            },
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(
                name.to_string(),
                Cached {
                    log_store: cached.log_store.clone(),
                    snapshot: Some(snapshot.clone()),
                },
            );
        }
        Ok(Some((cached.log_store, snapshot)))
    }
}

#[async_trait]
impl SchemaProvider for LakeSchema {
    fn table_names(&self) -> Vec<String> {
        self.names.read().map(|n| n.clone()).unwrap_or_default()
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        let Some((log_store, snapshot)) = self.latest(name).await.map_err(|e| {
            DataFusionError::External(Box::new(LakeError::Delta {
                table: name.to_string(),
                source: e,
            }))
        })?
        else {
            return Ok(None);
        };
        let provider = TableProviderBuilder::default()
            .with_log_store(log_store)
            .with_snapshot(snapshot)
            .await?;
        Ok(Some(provider))
    }

    async fn table_type(&self, name: &str) -> DFResult<Option<TableType>> {
        // information_schema.tables asks this for every table; no need to load snapshots.
        Ok(self.table_exist(name).then_some(TableType::Base))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.names
            .read()
            .map(|n| n.iter().any(|t| t == name))
            .unwrap_or(false)
    }
}
