//! Local lake roots that survive power loss.
//!
//! object_store's `LocalFileSystem` writes each object to a temporary file and renames it into
//! place, which is atomic against a crash of the process, but it never calls `fsync`: after a
//! power cut the kernel may have persisted a Delta commit JSON but not the Parquet files it
//! adds, or neither, while Sluice already advanced its log consumer offset (and retention may
//! have deleted the log data). Guarantee 5 (a crash or power loss at any instant loses nothing)
//! therefore needs every object durable before the put that created it returns.
//!
//! [`DurableLocalStore`] wraps `LocalFileSystem` and, after every successful put (single or
//! multipart), fsyncs the file and its directory, and every ancestor directory not yet known to
//! be durable (a new `date=2026-11-22/` partition directory must itself be recorded in its
//! parent). Because deltalake writes data files before the commit that references them, and
//! each of those writes returns only once durable, a commit can never be durable without its
//! files. Reads, lists and deletes pass through unchanged (a delete that is lost in a power cut
//! only brings back a file nobody references).
//!
//! [`install`] registers it as deltalake's object store factory for `file://` URLs, so every
//! table Sluice opens (the lake sink and the query engine alike) uses it. This is hand-written
//! because neither object_store nor deltalake offers a syncing local store.

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use async_trait::async_trait;
use deltalake::logstore::object_store::local::LocalFileSystem;
use deltalake::logstore::object_store::path::Path;
use deltalake::logstore::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    UploadPart,
};
use deltalake::logstore::{
    object_store_factories, DeltaIOStorageBackend, ObjectStoreFactory, ObjectStoreRef,
    StorageConfig,
};
use deltalake::{DeltaResult, DeltaTableError};
use futures::stream::BoxStream;
use parking_lot::Mutex;
use url::Url;

static FSYNCS: AtomicU64 = AtomicU64::new(0);

/// Number of `fsync` calls made by durable local stores in this process (files and
/// directories). For tests and metrics.
pub fn fsync_count() -> u64 {
    FSYNCS.load(Ordering::Relaxed)
}

/// Makes deltalake use [`DurableLocalStore`] for every `file://` table location. Idempotent;
/// called before any table is opened or created.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let url = Url::parse("file://").expect("static URL");
        object_store_factories().insert(url, Arc::new(DurableLocalFactory));
    });
}

struct DurableLocalFactory;

impl ObjectStoreFactory for DurableLocalFactory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, Path)> {
        // What deltalake's default factory does for file URLs (object_store::parse_url_opts →
        // LocalFileSystem rooted at `/`, the URL path as the location), plus the fsyncs.
        let path = Path::from_url_path(url.path()).map_err(|e| {
            DeltaTableError::InvalidTableLocation(format!("{url}: {e}"))
        })?;
        let mut store: ObjectStoreRef = Arc::new(DurableLocalStore::new());
        if let Some(runtime) = &config.runtime {
            store = Arc::new(DeltaIOStorageBackend::new(store, runtime.clone()));
        }
        Ok((store, path))
    }
}

/// `LocalFileSystem` whose puts return only once the object and its directory entries are on
/// stable storage. See the module documentation. Clones share the inner store and the set of
/// durable directories.
#[derive(Debug, Clone)]
pub struct DurableLocalStore {
    inner: Arc<LocalFileSystem>,
    /// Directories whose own entry in their parent has been fsynced by this process.
    durable_dirs: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Default for DurableLocalStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for DurableLocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DurableLocalStore({})", self.inner)
    }
}

impl DurableLocalStore {
    /// A store rooted at `/`, like `LocalFileSystem::new()`.
    pub fn new() -> Self {
        DurableLocalStore {
            inner: Arc::new(LocalFileSystem::new()),
            durable_dirs: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Fsyncs the object at `location`, its directory and any ancestor directory not yet known
    /// to be durable.
    async fn sync(&self, location: &Path) -> object_store::Result<()> {
        let file = self.inner.path_to_filesystem(location)?;
        let dirs = self.durable_dirs.clone();
        let result = tokio::task::spawn_blocking(move || sync_path(&file, &dirs))
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "DurableLocalStore",
                source: Box::new(e),
            })?;
        result.map_err(|(path, source)| object_store::Error::Generic {
            store: "DurableLocalStore",
            source: format!("fsync {}: {source}", path.display()).into(),
        })
    }
}

fn fsync(path: &FsPath) -> Result<(), (PathBuf, std::io::Error)> {
    let err = |e| (path.to_path_buf(), e);
    std::fs::File::open(path).map_err(err)?.sync_all().map_err(err)?;
    FSYNCS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn sync_path(
    file: &FsPath,
    durable_dirs: &Mutex<HashSet<PathBuf>>,
) -> Result<(), (PathBuf, std::io::Error)> {
    fsync(file)?;
    let Some(mut dir) = file.parent() else {
        return Ok(());
    };
    // The file's entry lives in its directory.
    fsync(dir)?;
    // Then each directory's own entry lives in its parent: walk up until a directory whose
    // entry this process already made durable (new partition directories, a new table).
    while !durable_dirs.lock().contains(dir) {
        let Some(parent) = dir.parent() else { break };
        fsync(parent)?;
        durable_dirs.lock().insert(dir.to_path_buf());
        dir = parent;
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for DurableLocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.sync(location).await?;
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(DurableUpload {
            upload,
            store: self.clone(),
            location: location.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.sync(to).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await?;
        self.sync(to).await
    }
}

/// A multipart upload that fsyncs the object once `complete` has moved it into place.
#[derive(Debug)]
struct DurableUpload {
    upload: Box<dyn MultipartUpload>,
    store: DurableLocalStore,
    location: Path,
}

#[async_trait]
impl MultipartUpload for DurableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.upload.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let result = self.upload.complete().await?;
        self.store.sync(&self.location).await?;
        Ok(result)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.upload.abort().await
    }
}
