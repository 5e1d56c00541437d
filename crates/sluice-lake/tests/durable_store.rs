//! The fsyncing local store: objects written through it are complete and were fsynced, and
//! local lake tables use it. (Power loss itself cannot be simulated here; these tests check
//! that every write path goes through the fsync.)

use std::sync::Arc;

use deltalake::arrow::array::{Int64Array, RecordBatch};
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::logstore::object_store::path::Path;
use deltalake::logstore::object_store::{ObjectStoreExt as _, PutPayload};
use sluice_lake::delta::LakeTable;
use sluice_lake::durable_store::{fsync_count, DurableLocalStore};

fn object_path(file: &std::path::Path) -> Path {
    Path::from_absolute_path(file).unwrap()
}

#[tokio::test]
async fn put_fsyncs_file_and_new_directories() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableLocalStore::new();
    let file = dir.path().join("a/b/c.txt");
    let before = fsync_count();
    store
        .put(&object_path(&file), PutPayload::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");
    // The file, its directory `b`, then `a` (holds `b`) and the temp dir (holds `a`), ...
    let first = fsync_count() - before;
    assert!(first >= 4, "only {first} fsyncs for a file in two new directories");

    // A second file in the same (now durable) directory: the file and its directory only.
    let before = fsync_count();
    store
        .put(&object_path(&dir.path().join("a/b/d.txt")), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(fsync_count() - before, 2);
}

#[tokio::test]
async fn multipart_upload_fsyncs_on_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableLocalStore::new();
    let file = dir.path().join("part.bin");
    let mut upload = store.put_multipart(&object_path(&file)).await.unwrap();
    upload.put_part(PutPayload::from(vec![1u8; 1000])).await.unwrap();
    upload.put_part(PutPayload::from(vec![2u8; 10])).await.unwrap();
    let before = fsync_count();
    upload.complete().await.unwrap();
    assert!(fsync_count() - before >= 2);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 1010);
    assert_eq!(bytes[999], 1);
    assert_eq!(bytes[1000], 2);
    // Reads pass through.
    let got = store.get(&object_path(&file)).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), 1010);
}

#[tokio::test]
async fn lake_commits_go_through_the_fsyncing_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("day", DataType::Int64, false),
    ]));
    let mut table = LakeTable::create(&root, "t", &schema, &["day".to_string()])
        .await
        .unwrap();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(Int64Array::from(vec![10, 10, 11])),
        ],
    )
    .unwrap();
    let before = fsync_count();
    table
        .append(vec![batch], &[("sluice:t:0".to_string(), 2)])
        .await
        .unwrap();
    // Two Parquet files (one per `day`), each with its new partition directory, and the
    // commit JSON: at least 2×(file + dir + parent) + commit + _delta_log.
    let synced = fsync_count() - before;
    assert!(synced >= 8, "an append made only {synced} fsyncs");
    assert_eq!(table.file_stats().num_rows, Some(3));
    let reopened = LakeTable::open(&root, "t").await.unwrap().unwrap();
    assert_eq!(reopened.txn_version("sluice:t:0"), Some(2));
}
