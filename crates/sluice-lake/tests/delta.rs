//! LakeTable against real Delta tables in a temp directory.

use std::path::Path;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, AsArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, StructArray,
};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::{
    DataType, Field, Fields, Float64Type, Int64Type, Schema, SchemaRef,
};
use deltalake::datafusion::prelude::SessionContext;
use sluice_lake::delta::{list_tables, LakeError, LakeTable};

fn root(dir: &tempfile::TempDir) -> String {
    dir.path().to_str().unwrap().to_string()
}

/// All rows of the table at its loaded version, ordered by `order_by`.
async fn read_all(table: &LakeTable, order_by: &str) -> RecordBatch {
    let ctx = SessionContext::new();
    let delta = table.delta_table();
    delta.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", delta.table_provider().await.unwrap())
        .unwrap();
    let df = ctx
        .sql(&format!("SELECT * FROM t ORDER BY \"{order_by}\""))
        .await
        .unwrap();
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.unwrap();
    concat_batches(&schema, &batches).unwrap()
}

fn i64s(batch: &RecordBatch, col: &str) -> Vec<Option<i64>> {
    batch
        .column_by_name(col)
        .unwrap()
        .as_primitive::<Int64Type>()
        .iter()
        .collect()
}

fn strings(array: &ArrayRef) -> Vec<Option<String>> {
    let array = deltalake::arrow::compute::cast(array, &DataType::Utf8).unwrap();
    array
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn base_schema() -> Schema {
    Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
    ])
}

fn base_batch(ids: &[i64], partition: i32) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(base_schema()),
        vec![
            Arc::new(Int64Array::from(ids.to_vec())),
            Arc::new(StringArray::from(
                ids.iter().map(|i| format!("n{i}")).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from(vec![partition; ids.len()])),
            Arc::new(Int64Array::from(ids.to_vec())),
        ],
    )
    .unwrap()
}

fn log_file(table_dir: &Path, version: i64) -> String {
    std::fs::read_to_string(table_dir.join(format!("_delta_log/{version:020}.json"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_append_reopen_reads_txns_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);

    assert!(LakeTable::open(&root, "events").await.unwrap().is_none());
    assert!(matches!(
        LakeTable::open(&root, "../escape").await,
        Err(LakeError::InvalidName(_))
    ));

    let mut table = LakeTable::create(&root, "events", &base_schema(), &[])
        .await
        .unwrap();
    assert_eq!(table.version(), 0);
    assert_eq!(table.txn_version("sluice:events:0"), None);
    assert_eq!(table.arrow_schema().fields().len(), 4);

    let v1 = table
        .append(
            vec![base_batch(&[1, 2, 3], 0)],
            &[("sluice:events:0".into(), 2), ("sluice:events:1".into(), 5)],
        )
        .await
        .unwrap();
    assert_eq!(v1, 1);
    let v2 = table
        .append(
            vec![base_batch(&[4, 5], 0)],
            &[("sluice:events:0".into(), 4)],
        )
        .await
        .unwrap();
    assert_eq!(v2, 2);
    assert_eq!(table.txn_version("sluice:events:0"), Some(4));
    assert_eq!(table.txn_version("sluice:events:1"), Some(5));

    // The txn actions are in the same commit file as the data.
    let commit1 = log_file(&dir.path().join("events"), 1);
    assert!(
        commit1.contains(r#""txn":{"appId":"sluice:events:0","version":2"#),
        "{commit1}"
    );
    assert!(commit1.contains(r#""add":"#), "{commit1}");

    // A commit with no rows still records the txns.
    let v3 = table
        .append(vec![base_batch(&[], 0)], &[("sluice:events:1".into(), 9)])
        .await
        .unwrap();
    assert_eq!(v3, 3);
    // Nothing to do: no commit.
    assert_eq!(table.append(vec![], &[]).await.unwrap(), 3);

    // Creating again opens the existing table.
    let again = LakeTable::create(&root, "events", &base_schema(), &[])
        .await
        .unwrap();
    assert_eq!(again.version(), 3);

    let reopened = LakeTable::open(&root, "events").await.unwrap().unwrap();
    assert_eq!(reopened.version(), 3);
    assert_eq!(reopened.txn_version("sluice:events:0"), Some(4));
    assert_eq!(reopened.txn_version("sluice:events:1"), Some(9));
    assert_eq!(reopened.txn_version("other"), None);
    let stats = reopened.file_stats();
    assert_eq!(stats.num_rows, Some(5));
    assert_eq!(stats.num_files, 2);
    assert!(stats.size_bytes > 0);
    let rows = read_all(&reopened, "id").await;
    assert_eq!(i64s(&rows, "id"), (1..=5).map(Some).collect::<Vec<_>>());

    // Parquet files are zstd-compressed and carry column statistics.
    let file = reopened
        .delta_table()
        .get_file_uris()
        .unwrap()
        .next()
        .unwrap();
    let path = url::Url::parse(&file)
        .ok()
        .and_then(|u| u.to_file_path().ok())
        .unwrap_or_else(|| file.clone().into());
    let reader = deltalake::parquet::file::reader::SerializedFileReader::new(
        std::fs::File::open(&path).unwrap(),
    )
    .unwrap();
    use deltalake::parquet::file::reader::FileReader as _;
    let column = reader.metadata().row_group(0).column(0);
    assert!(
        matches!(
            column.compression(),
            deltalake::parquet::basic::Compression::ZSTD(_)
        ),
        "{:?}",
        column.compression()
    );
    assert!(column.statistics().is_some());
    // Delta file statistics for pruning.
    assert!(
        commit1.contains(r#"\"minValues\""#) || commit1.contains("minValues"),
        "{commit1}"
    );

    // Another process appending is seen after refresh.
    let mut writer2 = LakeTable::open(&root, "events").await.unwrap().unwrap();
    writer2
        .append(vec![base_batch(&[6], 1)], &[("sluice:events:1".into(), 10)])
        .await
        .unwrap();
    let mut table = reopened;
    table.refresh().await.unwrap();
    assert_eq!(table.version(), 4);
    assert_eq!(table.txn_version("sluice:events:1"), Some(10));

    std::fs::create_dir_all(dir.path().join("not_a_table")).unwrap();
    LakeTable::create(&root, "b_table", &base_schema(), &[])
        .await
        .unwrap();
    assert_eq!(list_tables(&root).await.unwrap(), vec!["b_table", "events"]);
    assert!(list_tables(dir.path().join("missing").to_str().unwrap())
        .await
        .unwrap()
        .is_empty());
}

fn payload_type(with_b: bool) -> DataType {
    let mut fields = vec![Field::new("a", DataType::Int64, true)];
    if with_b {
        fields.push(Field::new("b", DataType::Utf8, true));
    }
    DataType::Struct(Fields::from(fields))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_merge_adds_column_and_nested_field() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("payload", payload_type(false), true),
    ]);
    let mut table = LakeTable::create(&root, "evolve", &schema, &[])
        .await
        .unwrap();

    let old = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(Int64Array::from(vec![1, 2])),
            Arc::new(StructArray::from(vec![(
                Arc::new(Field::new("a", DataType::Int64, true)),
                Arc::new(Int64Array::from(vec![10, 20])) as ArrayRef,
            )])),
        ],
    )
    .unwrap();
    table.append(vec![old], &[("app".into(), 1)]).await.unwrap();

    // New top-level column `extra` (first!) and new nested field `payload.b`; id as Int32.
    let new_schema = Arc::new(Schema::new(vec![
        Field::new("extra", DataType::Utf8, false),
        Field::new("payload", payload_type(true), true),
        Field::new("id", DataType::Int32, false),
    ]));
    let new = RecordBatch::try_new(
        new_schema,
        vec![
            Arc::new(StringArray::from(vec!["x3"])),
            Arc::new(StructArray::from(vec![
                (
                    Arc::new(Field::new("a", DataType::Int64, true)),
                    Arc::new(Int64Array::from(vec![30])) as ArrayRef,
                ),
                (
                    Arc::new(Field::new("b", DataType::Utf8, true)),
                    Arc::new(StringArray::from(vec!["b3"])) as ArrayRef,
                ),
            ])),
            Arc::new(Int32Array::from(vec![3])),
        ],
    )
    .unwrap();
    // A batch of the old shape in the same append.
    let old_shape = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(Int64Array::from(vec![4])),
            Arc::new(StructArray::from(vec![(
                Arc::new(Field::new("a", DataType::Int64, true)),
                Arc::new(Int64Array::from(vec![40])) as ArrayRef,
            )])),
        ],
    )
    .unwrap();
    let v = table
        .append(vec![new, old_shape], &[("app".into(), 2)])
        .await
        .unwrap();
    assert_eq!(v, 2);

    let merged = table.arrow_schema();
    let names: Vec<_> = merged.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "payload", "extra"]);
    assert_eq!(merged.field(1).data_type(), &payload_type(true));
    assert!(merged.field(2).is_nullable());

    let reopened = LakeTable::open(&root, "evolve").await.unwrap().unwrap();
    assert_eq!(reopened.arrow_schema(), merged);
    let rows = read_all(&reopened, "id").await;
    assert_eq!(i64s(&rows, "id"), vec![Some(1), Some(2), Some(3), Some(4)]);
    assert_eq!(
        strings(rows.column_by_name("extra").unwrap()),
        vec![None, None, Some("x3".into()), None]
    );
    let payload = rows.column_by_name("payload").unwrap().as_struct();
    assert_eq!(
        strings(payload.column_by_name("b").unwrap()),
        vec![None, None, Some("b3".into()), None]
    );
    assert_eq!(
        payload
            .column_by_name("a")
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec(),
        vec![10, 20, 30, 40]
    );

    // A type that cannot be stored: nothing is written, the error names table and column.
    let bad = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "payload",
                DataType::Struct(Fields::from(vec![Field::new("a", DataType::Utf8, true)])),
                true,
            ),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![5])),
            Arc::new(StructArray::from(vec![(
                Arc::new(Field::new("a", DataType::Utf8, true)),
                Arc::new(StringArray::from(vec!["oops"])) as ArrayRef,
            )])),
        ],
    )
    .unwrap();
    let mut table = reopened;
    let err = table
        .append(vec![bad], &[("app".into(), 3)])
        .await
        .unwrap_err();
    assert!(matches!(err, LakeError::Schema { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("evolve") && msg.contains("payload.a"), "{msg}");
    assert_eq!(table.version(), 2);
    assert_eq!(table.txn_version("app"), Some(2));
    assert_eq!(
        LakeTable::open(&root, "evolve")
            .await
            .unwrap()
            .unwrap()
            .version(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_writes_hive_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let schema = Schema::new(vec![
        Field::new("region", DataType::Utf8, true),
        Field::new("v", DataType::Int64, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
    ]);
    let mut table = LakeTable::create(&root, "parted", &schema, &["region".to_string()])
        .await
        .unwrap();
    let batch = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(StringArray::from(vec!["eu", "us", "eu"])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(Int32Array::from(vec![0, 0, 0])),
            Arc::new(Int64Array::from(vec![0, 1, 2])),
        ],
    )
    .unwrap();
    table.append(vec![batch], &[]).await.unwrap();

    let table_dir = dir.path().join("parted");
    for region in ["eu", "us"] {
        let part = table_dir.join(format!("region={region}"));
        let files: Vec<_> = std::fs::read_dir(&part)
            .unwrap_or_else(|e| panic!("{}: {e}", part.display()))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
            .collect();
        assert_eq!(files.len(), 1, "{}", part.display());
    }
    assert_eq!(table.file_stats().num_files, 2);

    // Schema evolution on a partitioned table.
    let wider = Schema::new(vec![
        Field::new("region", DataType::Utf8, true),
        Field::new("v", DataType::Int64, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("note", DataType::Utf8, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(wider),
        vec![
            Arc::new(StringArray::from(vec!["ap"])),
            Arc::new(Int64Array::from(vec![4])),
            Arc::new(Int32Array::from(vec![1])),
            Arc::new(Int64Array::from(vec![0])),
            Arc::new(StringArray::from(vec!["hi"])),
        ],
    )
    .unwrap();
    table.append(vec![batch], &[("p".into(), 1)]).await.unwrap();
    assert!(table_dir.join("region=ap").is_dir());

    let reopened = LakeTable::open(&root, "parted").await.unwrap().unwrap();
    assert_eq!(reopened.partition_columns(), vec!["region".to_string()]);
    assert!(reopened.arrow_schema().field_with_name("note").is_ok());
    let rows = read_all(&reopened, "v").await;
    assert_eq!(
        strings(rows.column_by_name("region").unwrap()),
        vec![
            Some("eu".into()),
            Some("us".into()),
            Some("eu".into()),
            Some("ap".into())
        ]
    );
    assert_eq!(
        strings(rows.column_by_name("note").unwrap()),
        vec![None, None, None, Some("hi".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_with_schema_widens_int_to_float_keeping_values_and_txns() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let nested = |t: DataType| {
        DataType::Struct(Fields::from(vec![
            Field::new("x", t, true),
            Field::new("y", DataType::Utf8, true),
        ]))
    };
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Int64, true),
        Field::new("s", nested(DataType::Int64), true),
        Field::new("_partition", DataType::Int32, false),
    ]);
    let mut table = LakeTable::create(&root, "widen", &schema, &["_partition".to_string()])
        .await
        .unwrap();
    let batch = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(Int64Array::from(vec![Some(10), None, Some(30)])),
            Arc::new(StructArray::from(vec![
                (
                    Arc::new(Field::new("x", DataType::Int64, true)),
                    Arc::new(Int64Array::from(vec![Some(7), Some(8), None])) as ArrayRef,
                ),
                (
                    Arc::new(Field::new("y", DataType::Utf8, true)),
                    Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
                ),
            ])),
            Arc::new(Int32Array::from(vec![0, 1, 0])),
        ],
    )
    .unwrap();
    table
        .append(vec![batch], &[("app:0".into(), 3), ("app:1".into(), 1)])
        .await
        .unwrap();

    // A float into the int column is refused until the table is widened.
    let float_schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Float64, true),
        Field::new("_partition", DataType::Int32, false),
    ]));
    let float_batch = RecordBatch::try_new(
        float_schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![4])),
            Arc::new(Float64Array::from(vec![4.5])),
            Arc::new(Int32Array::from(vec![1])),
        ],
    )
    .unwrap();
    let err = table
        .append(vec![float_batch.clone()], &[("app:1".into(), 2)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`v`"), "{err}");

    let widened = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Float64, true),
        Field::new("s", nested(DataType::Float64), true),
        Field::new("_partition", DataType::Int32, false),
    ]));
    let v = table
        .rewrite_with_schema(widened.clone(), &[("rewrite".into(), 1)])
        .await
        .unwrap();
    assert_eq!(v, 2);
    let schema = table.arrow_schema();
    assert_eq!(
        schema.field_with_name("v").unwrap().data_type(),
        &DataType::Float64
    );
    assert_eq!(
        schema.field_with_name("s").unwrap().data_type(),
        &nested(DataType::Float64)
    );
    assert_eq!(table.partition_columns(), vec!["_partition".to_string()]);

    table
        .append(vec![float_batch], &[("app:1".into(), 2)])
        .await
        .unwrap();

    let reopened = LakeTable::open(&root, "widen").await.unwrap().unwrap();
    assert_eq!(reopened.txn_version("app:0"), Some(3));
    assert_eq!(reopened.txn_version("app:1"), Some(2));
    assert_eq!(reopened.txn_version("rewrite"), Some(1));
    assert_eq!(reopened.file_stats().num_rows, Some(4));
    let rows = read_all(&reopened, "id").await;
    let v: Vec<Option<f64>> = rows
        .column_by_name("v")
        .unwrap()
        .as_primitive::<Float64Type>()
        .iter()
        .collect();
    assert_eq!(v, vec![Some(10.0), None, Some(30.0), Some(4.5)]);
    let s = rows.column_by_name("s").unwrap().as_struct();
    let x: Vec<Option<f64>> = s
        .column_by_name("x")
        .unwrap()
        .as_primitive::<Float64Type>()
        .iter()
        .collect();
    assert_eq!(x, vec![Some(7.0), Some(8.0), None, None]);
    assert_eq!(
        strings(s.column_by_name("y").unwrap()),
        vec![Some("a".into()), Some("b".into()), Some("c".into()), None]
    );
    assert_eq!(
        rows.column_by_name("_partition")
            .unwrap()
            .as_primitive::<deltalake::arrow::datatypes::Int32Type>()
            .values()
            .to_vec(),
        vec![0, 1, 0, 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_appends_write_checkpoints_and_reopen_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let mut table = LakeTable::create(&root, "busy", &base_schema(), &[])
        .await
        .unwrap();
    for i in 0..105i64 {
        let mut txns = vec![("busy:0".to_string(), i)];
        if i == 3 {
            txns.push(("early".to_string(), 42));
        }
        let v = table
            .append(vec![base_batch(&[i], 0)], &txns)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    let log = dir.path().join("busy/_delta_log");
    assert!(
        log.join(format!("{:020}.checkpoint.parquet", 99)).is_file(),
        "no checkpoint at version 99: {:?}",
        std::fs::read_dir(&log)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".json"))
            .collect::<Vec<_>>()
    );
    assert!(log.join("_last_checkpoint").is_file());

    let reopened = LakeTable::open(&root, "busy").await.unwrap().unwrap();
    assert_eq!(reopened.version(), 105);
    assert_eq!(reopened.txn_version("busy:0"), Some(104));
    // Only in commit 4, i.e. only reachable through the checkpoint.
    assert_eq!(reopened.txn_version("early"), Some(42));
    assert_eq!(reopened.file_stats().num_rows, Some(105));
    let rows = read_all(&reopened, "id").await;
    assert_eq!(rows.num_rows(), 105);

    // Without the commit files covered by the checkpoint, the table still opens the same.
    for v in 0..99 {
        std::fs::remove_file(log.join(format!("{v:020}.json"))).unwrap();
    }
    let reopened = LakeTable::open(&root, "busy").await.unwrap().unwrap();
    assert_eq!(reopened.version(), 105);
    assert_eq!(reopened.txn_version("early"), Some(42));
    assert_eq!(reopened.file_stats().num_rows, Some(105));
}

#[tokio::test]
async fn works_on_a_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let mut table = LakeTable::create(&root, "ct", &base_schema(), &[])
        .await
        .unwrap();
    table
        .append(vec![base_batch(&[1], 0)], &[("ct".into(), 1)])
        .await
        .unwrap();
    let reopened = LakeTable::open(&root, "ct").await.unwrap().unwrap();
    assert_eq!(reopened.txn_version("ct"), Some(1));
}

/// A large append is written by several tasks at once (one file per task and partition
/// value) and still lands as one commit with its txns, its new column and exact rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_append_is_written_in_parallel_as_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let schema = Schema::new(vec![
        Field::new("v", DataType::Int64, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("day", DataType::Utf8, true),
    ]);
    let mut table = LakeTable::create(&root, "bulk", &schema, &["day".to_string()])
        .await
        .unwrap();
    // A small append first: one file, the ordinary path.
    let small = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![
            Arc::new(Int64Array::from(vec![-1])),
            Arc::new(Int32Array::from(vec![0])),
            Arc::new(Int64Array::from(vec![0])),
            Arc::new(StringArray::from(vec!["d0"])),
        ],
    )
    .unwrap();
    table.append(vec![small], &[("bulk:0".into(), 0)]).await.unwrap();
    let before = table.version();

    // 160,000 rows over two days, in batches of 8192, bringing a new column.
    let wider = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Int64, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("day", DataType::Utf8, true),
        Field::new("note", DataType::Utf8, true),
    ]));
    let n: i64 = 160_000;
    let batches: Vec<RecordBatch> = (0..n)
        .step_by(8192)
        .map(|start| {
            let ids: Vec<i64> = (start..(start + 8192).min(n)).collect();
            RecordBatch::try_new(
                wider.clone(),
                vec![
                    Arc::new(Int64Array::from(ids.clone())),
                    Arc::new(Int32Array::from(vec![0; ids.len()])),
                    Arc::new(Int64Array::from(ids.iter().map(|i| i + 1).collect::<Vec<_>>())),
                    Arc::new(StringArray::from(ids.iter().map(|i| if *i < n / 2 { "d1" } else { "d2" }).collect::<Vec<_>>())),
                    Arc::new(StringArray::from(ids.iter().map(|i| format!("n{i}")).collect::<Vec<_>>())),
                ],
            )
            .unwrap()
        })
        .collect();
    let version = table.append(batches, &[("bulk:0".into(), n)]).await.unwrap();
    assert_eq!(version, before + 1, "one commit");

    let reopened = LakeTable::open(&root, "bulk").await.unwrap().unwrap();
    assert_eq!(reopened.txn_version("bulk:0"), Some(n));
    assert_eq!(reopened.file_stats().num_rows, Some(n as u64 + 1));
    assert!(reopened.arrow_schema().field_with_name("note").is_ok());
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let files = |day: &str| {
        std::fs::read_dir(dir.path().join("bulk").join(format!("day={day}")))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
            .count()
    };
    if cores > 1 {
        // The first writer's share ends inside d2: d1 has one file, d2 one per writer.
        assert_eq!(files("d2"), 2, "each writer writes its share of the day");
    }
    let rows = read_all(&reopened, "v").await;
    let vs = i64s(&rows, "v");
    assert_eq!(vs.len(), n as usize + 1);
    assert_eq!(vs, std::iter::once(-1).chain(0..n).map(Some).collect::<Vec<_>>());
    let notes = strings(rows.column_by_name("note").unwrap());
    assert_eq!(notes[0], None);
    assert_eq!(notes[1 + 12_345], Some("n12345".into()));
    let days = strings(rows.column_by_name("day").unwrap());
    assert_eq!(days.iter().filter(|d| d.as_deref() == Some("d1")).count(), n as usize / 2);
}

/// A new table created with its first rows: version 0 holds the schema, the files and the
/// txns in one commit; reopened, the rows and offsets are there; a second call for the same
/// table (it exists now) appends; a partitioned one gets its directories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_rows_is_one_commit_and_appends_once_the_table_exists() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let txns = [("sluice:events:0".to_string(), 2), ("sluice:events:1".to_string(), 7)];
    let table = LakeTable::create_with_rows(&root, "events", &base_schema(), &[], vec![base_batch(&[1, 2, 3], 0)], &txns)
        .await
        .unwrap();
    assert_eq!(table.version(), 0);
    assert_eq!(table.txn_version("sluice:events:1"), Some(7));
    let commit0 = log_file(&dir.path().join("events"), 0);
    for action in ["\"metaData\":", "\"protocol\":", "\"add\":", r#""txn":{"appId":"sluice:events:0","version":2"#] {
        assert!(commit0.contains(action), "{action} missing: {commit0}");
    }
    assert!(!dir.path().join("events/_delta_log/00000000000000000001.json").exists());

    let reopened = LakeTable::open(&root, "events").await.unwrap().unwrap();
    assert_eq!(reopened.txn_version("sluice:events:0"), Some(2));
    assert_eq!(i64s(&read_all(&reopened, "id").await, "id"), vec![Some(1), Some(2), Some(3)]);

    // The table exists: the rows are appended as version 1.
    let table = LakeTable::create_with_rows(&root, "events", &base_schema(), &[], vec![base_batch(&[4], 1)], &[("sluice:events:1".into(), 8)])
        .await
        .unwrap();
    assert_eq!(table.version(), 1);
    assert_eq!(table.txn_version("sluice:events:0"), Some(2));
    assert_eq!(table.txn_version("sluice:events:1"), Some(8));
    assert_eq!(i64s(&read_all(&table, "id").await, "id"), vec![Some(1), Some(2), Some(3), Some(4)]);

    // Partitioned, and a partition column that is not in the schema is refused.
    let schema = Schema::new(vec![
        Field::new("region", DataType::Utf8, true),
        Field::new("v", DataType::Int64, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema.clone()),
        vec![Arc::new(StringArray::from(vec!["eu", "us", "eu"])), Arc::new(Int64Array::from(vec![1, 2, 3]))],
    )
    .unwrap();
    let parted = LakeTable::create_with_rows(&root, "parted", &schema, &["region".to_string()], vec![batch.clone()], &[])
        .await
        .unwrap();
    assert_eq!((parted.version(), parted.file_stats().num_files), (0, 2));
    assert!(dir.path().join("parted/region=us").is_dir());
    let err = LakeTable::create_with_rows(&root, "other", &schema, &["day".to_string()], vec![batch.clone()], &[]).await.err().unwrap();
    assert!(err.to_string().contains("partition column `day`"), "{err}");

    // Batches with more columns widen the new table's schema; batches that disagree on a
    // column's type are a schema error and create nothing.
    let wider = Schema::new(vec![
        Field::new("region", DataType::Utf8, true),
        Field::new("v", DataType::Int64, true),
        Field::new("note", DataType::Utf8, true),
    ]);
    let noted = RecordBatch::try_new(
        Arc::new(wider),
        vec![Arc::new(StringArray::from(vec!["ap"])), Arc::new(Int64Array::from(vec![4])), Arc::new(StringArray::from(vec!["hi"]))],
    )
    .unwrap();
    let t = LakeTable::create_with_rows(&root, "merged", &schema, &[], vec![batch.clone(), noted], &[]).await.unwrap();
    assert!(t.arrow_schema().field_with_name("note").is_ok());
    assert_eq!(i64s(&read_all(&t, "v").await, "v"), vec![Some(1), Some(2), Some(3), Some(4)]);
    let texts = Schema::new(vec![Field::new("region", DataType::Utf8, true), Field::new("v", DataType::Utf8, true)]);
    let conflicting =
        RecordBatch::try_new(Arc::new(texts), vec![Arc::new(StringArray::from(vec!["eu"])), Arc::new(StringArray::from(vec!["x"]))]).unwrap();
    let err = LakeTable::create_with_rows(&root, "conflict", &schema, &[], vec![batch, conflicting], &[]).await.err().unwrap();
    assert!(matches!(err, LakeError::Schema { .. }), "{err}");
    assert!(LakeTable::open(&root, "conflict").await.unwrap().is_none());
}
