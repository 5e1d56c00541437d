//! QueryEngine over real Delta tables written with LakeTable.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray, StructArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use sluice_lake::delta::LakeTable;
use sluice_query::{render, OutputFormat, QueryEngine, QueryError, QueryResult};

fn events_schema() -> Schema {
    Schema::new(vec![
        Field::new("kind", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
    ])
}

/// Rows `(kind, n, region)` with offsets starting at `first_offset`.
fn events(rows: &[(&str, i64, &str)], first_offset: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(events_schema()),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from(vec![0; rows.len()])),
            Arc::new(Int64Array::from(
                (first_offset..first_offset + rows.len() as i64).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// `events` partitioned by region: 3 regions x 2 appends; `logs` unpartitioned: 3 appends
/// with disjoint `_offset` ranges (one file each).
async fn lake() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let mut t = LakeTable::create(&root, "events", &events_schema(), &["region".to_string()])
        .await
        .unwrap();
    t.append(
        vec![events(
            &[("click", 1, "eu"), ("view", 2, "us"), ("click", 3, "ap")],
            0,
        )],
        &[("q:events:0".into(), 2)],
    )
    .await
    .unwrap();
    t.append(
        vec![events(
            &[("click", 4, "eu"), ("view", 5, "us"), ("buy", 6, "ap")],
            3,
        )],
        &[("q:events:0".into(), 5)],
    )
    .await
    .unwrap();

    let mut logs = LakeTable::create(&root, "logs", &events_schema(), &[])
        .await
        .unwrap();
    for i in 0..3 {
        let rows: Vec<(&str, i64, &str)> = (0..10).map(|j| ("log", i * 10 + j, "eu")).collect();
        logs.append(vec![events(&rows, i * 10)], &[]).await.unwrap();
    }
    (dir, root)
}

fn i64_at(result: &QueryResult, col: usize, row: usize) -> i64 {
    let mut row = row;
    for b in &result.batches {
        if row < b.num_rows() {
            return b.column(col).as_primitive::<Int64Type>().value(row);
        }
        row -= b.num_rows();
    }
    panic!("no row {row}");
}

fn text(result: &QueryResult) -> String {
    String::from_utf8(render(result, OutputFormat::Table).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_and_group_by() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);

    let r = engine
        .sql("SELECT count(*) AS c, sum(n) AS s FROM events")
        .await
        .unwrap();
    assert_eq!((i64_at(&r, 0, 0), i64_at(&r, 1, 0)), (6, 21));

    let r = engine
        .sql("SELECT kind, count(*) AS c, sum(n) AS s FROM events GROUP BY kind ORDER BY kind")
        .await
        .unwrap();
    let table = text(&r);
    assert_eq!(r.num_rows(), 3, "{table}");
    let json: serde_json::Value =
        serde_json::from_slice(&render(&r, OutputFormat::Json).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"kind": "buy", "c": 1, "s": 6},
            {"kind": "click", "c": 3, "s": 8},
            {"kind": "view", "c": 2, "s": 7},
        ])
    );

    // WITH, joins across tables, information_schema.
    let r = engine
        .sql("WITH e AS (SELECT region, sum(n) AS s FROM events GROUP BY region) \
              SELECT e.region, e.s, count(l.n) AS logs FROM e LEFT JOIN logs l ON l.region = e.region \
              GROUP BY e.region, e.s ORDER BY e.region")
        .await
        .unwrap();
    assert_eq!(r.num_rows(), 3, "{}", text(&r));
    let r = engine.sql("SHOW TABLES").await.unwrap();
    let shown = text(&r);
    assert!(
        shown.contains("events") && shown.contains("logs"),
        "{shown}"
    );
    let r = engine.sql("DESCRIBE events").await.unwrap();
    let described = text(&r);
    assert!(
        described.contains("_offset") && described.contains("region"),
        "{described}"
    );
}

/// `count_files_scanned` of deltalake's scan node in an EXPLAIN ANALYZE.
fn files_scanned(explain: &str) -> usize {
    let key = "count_files_scanned=";
    let at = explain
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in:\n{explain}"));
    explain[at + key.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_statistics_pruning() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);

    let all = text(
        &engine
            .sql("EXPLAIN ANALYZE SELECT sum(n) FROM events WHERE n > 0")
            .await
            .unwrap(),
    );
    let eu = text(
        &engine
            .sql("EXPLAIN ANALYZE SELECT sum(n) FROM events WHERE region = 'eu'")
            .await
            .unwrap(),
    );
    assert_eq!(files_scanned(&all), 6, "{all}");
    assert_eq!(files_scanned(&eu), 2, "{eu}");
    let r = engine
        .sql("SELECT sum(n) FROM events WHERE region = 'eu'")
        .await
        .unwrap();
    assert_eq!(i64_at(&r, 0, 0), 5);

    // Min/max statistics of `_offset` in the Delta log skip the files of the first two appends.
    let stats = text(
        &engine
            .sql("EXPLAIN ANALYZE SELECT count(*) FROM logs WHERE _offset >= 25")
            .await
            .unwrap(),
    );
    assert_eq!(files_scanned(&stats), 1, "{stats}");
    let r = engine
        .sql("SELECT count(*) FROM logs WHERE _offset >= 25")
        .await
        .unwrap();
    assert_eq!(i64_at(&r, 0, 0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_formats() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);
    let r = engine
        .sql("SELECT kind, n, region, _offset FROM events WHERE region = 'us' ORDER BY n")
        .await
        .unwrap();
    assert_eq!(r.num_rows(), 2);

    let json: serde_json::Value =
        serde_json::from_slice(&render(&r, OutputFormat::Json).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"kind": "view", "n": 2, "region": "us", "_offset": 1},
            {"kind": "view", "n": 5, "region": "us", "_offset": 4},
        ])
    );

    let nd = String::from_utf8(render(&r, OutputFormat::NdJson).unwrap()).unwrap();
    let lines: Vec<serde_json::Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["n"], 5);

    let csv = String::from_utf8(render(&r, OutputFormat::Csv).unwrap()).unwrap();
    let csv_lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        csv_lines,
        vec!["kind,n,region,_offset", "view,2,us,1", "view,5,us,4"]
    );

    let ipc = render(&r, OutputFormat::ArrowIpc).unwrap();
    let reader =
        deltalake::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .unwrap();
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    assert_eq!(batches[0].schema().field(1).name(), "n");
    assert_eq!(batches[0].column(1).as_primitive::<Int64Type>().value(1), 5);

    let table = text(&r);
    assert!(
        table.contains("| kind") && table.contains("| view"),
        "{table}"
    );

    // Empty results still have a shape.
    let empty = engine
        .sql("SELECT kind, n FROM events WHERE n > 1000")
        .await
        .unwrap();
    assert_eq!(render(&empty, OutputFormat::Json).unwrap(), b"[]");
    assert_eq!(
        String::from_utf8(render(&empty, OutputFormat::Csv).unwrap()).unwrap(),
        "kind,n\n"
    );
    assert!(render(&empty, OutputFormat::NdJson).unwrap().is_empty());
    let reader = deltalake::arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(render(&empty, OutputFormat::ArrowIpc).unwrap()),
        None,
    )
    .unwrap();
    assert_eq!(reader.schema().fields().len(), 2);
    assert!(text(&empty).contains("kind"));

    // Nested values: JSON objects in JSON, JSON text in CSV.
    let r = engine
        .sql("SELECT named_struct('a', n, 'b', kind) AS s FROM events WHERE region = 'us' ORDER BY n")
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&render(&r, OutputFormat::Json).unwrap()).unwrap();
    assert_eq!(json[0]["s"], serde_json::json!({"a": 2, "b": "view"}));
    let csv = String::from_utf8(render(&r, OutputFormat::Csv).unwrap()).unwrap();
    assert_eq!(
        csv.lines().nth(1).unwrap(),
        r#""{""a"":2,""b"":""view""}""#,
        "{csv}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_is_a_user_error_naming_the_problem() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);

    let cases = [
        ("SELEC kind FROM events", "SELEC"),
        ("SELECT nope FROM events", "nope"),
        ("SELECT * FROM missing_table", "missing_table"),
        ("SELECT kind FROM events WHERE", "Expected"),
        ("SELECT 1; SELECT 2", "single SQL statement"),
    ];
    for (sql, needle) in cases {
        let err = engine.sql(sql).await.unwrap_err();
        assert!(err.is_user_error(), "{sql}: {err:?}");
        assert!(err.to_string().contains(needle), "{sql}: {err}");
    }
    // Quoted names cannot escape the lake root.
    let err = engine
        .sql(r#"SELECT * FROM "../events""#)
        .await
        .unwrap_err();
    assert!(err.is_user_error(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_read_only_statements_run() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);
    for sql in [
        "INSERT INTO events VALUES ('x', 1, 'eu', 0, 99)",
        "DELETE FROM events WHERE n = 1",
        "DROP TABLE events",
        "CREATE TABLE t AS SELECT 1",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/tmp/x.csv'",
        "COPY events TO '/tmp/sluice-copy-test.csv'",
        "SET datafusion.execution.batch_size = 1",
        "EXPLAIN ANALYZE INSERT INTO events VALUES ('x', 1, 'eu', 0, 99)",
        "SELECT 1 INTO newtable",
    ] {
        let err = engine.sql(sql).await.unwrap_err();
        assert!(matches!(err, QueryError::NotReadOnly(_)), "{sql}: {err:?}");
        assert!(err.is_user_error());
    }
    let r = engine.sql("SELECT count(*) FROM events").await.unwrap();
    assert_eq!(i64_at(&r, 0, 0), 6);
    assert!(!std::path::Path::new("/tmp/sluice-copy-test.csv").exists());
    let r = engine
        .sql("EXPLAIN SELECT count(*) FROM events")
        .await
        .unwrap();
    assert!(r.num_rows() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_an_append_is_visible_to_the_next_query() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);
    let count = |e: QueryEngine| async move {
        let r = e.sql("SELECT count(*) FROM events").await.unwrap();
        i64_at(&r, 0, 0)
    };
    assert_eq!(count(engine.clone()).await, 6);

    let mut writer = LakeTable::open(&root, "events").await.unwrap().unwrap();
    for i in 0..3 {
        writer
            .append(vec![events(&[("late", 100 + i, "eu")], 6 + i)], &[])
            .await
            .unwrap();
        assert_eq!(count(engine.clone()).await, 7 + i);
    }

    // A table created after the engine is queryable at once, and listed.
    let mut fresh = LakeTable::create(&root, "fresh", &events_schema(), &[])
        .await
        .unwrap();
    fresh
        .append(vec![events(&[("new", 1, "us")], 0)], &[])
        .await
        .unwrap();
    let r = engine.sql("SELECT kind FROM fresh").await.unwrap();
    assert_eq!(r.num_rows(), 1);

    // Schema evolution is visible too.
    let wider = Schema::new(vec![
        Field::new("kind", DataType::Utf8, true),
        Field::new(
            "meta",
            DataType::Struct(vec![Field::new("tag", DataType::Utf8, true)].into()),
            true,
        ),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(wider),
        vec![
            Arc::new(StringArray::from(vec!["tagged"])),
            Arc::new(StructArray::from(vec![(
                Arc::new(Field::new("tag", DataType::Utf8, true)),
                Arc::new(StringArray::from(vec!["t1"])) as ArrayRef,
            )])),
        ],
    )
    .unwrap();
    // `_partition`/`_offset` are non-nullable: a batch without them is rejected...
    let err = writer.append(vec![batch.clone()], &[]).await.unwrap_err();
    assert!(err.to_string().contains("`_partition`"), "{err}");
    // ...so add them.
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("_partition", DataType::Int32, false));
    fields.push(Field::new("_offset", DataType::Int64, false));
    fields.push(Field::new("region", DataType::Utf8, true));
    cols.push(Arc::new(Int32Array::from(vec![0])));
    cols.push(Arc::new(Int64Array::from(vec![99])));
    cols.push(Arc::new(StringArray::from(vec!["eu"])));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    writer.append(vec![batch], &[]).await.unwrap();
    let r = engine
        .sql("SELECT meta['tag'] AS tag FROM events WHERE kind = 'tagged'")
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&render(&r, OutputFormat::Json).unwrap()).unwrap();
    assert_eq!(json, serde_json::json!([{"tag": "t1"}]));
    assert_eq!(count(engine.clone()).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_reports_metadata_without_scanning() {
    let (_dir, root) = lake().await;
    let engine = QueryEngine::new(&root);
    let tables = engine.tables().await.unwrap();
    let names: Vec<_> = tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["events", "logs"]);
    let events = &tables[0];
    assert_eq!(events.version, 2);
    assert_eq!(events.num_rows, Some(6));
    assert_eq!(events.num_files, 6);
    assert!(events.size_bytes > 0);
    assert_eq!(events.partition_columns, vec!["region".to_string()]);
    let offset = events.columns.iter().find(|c| c.name == "_offset").unwrap();
    assert_eq!(offset.data_type, "Int64");
    assert!(!offset.nullable);
    let json = serde_json::to_value(&tables).unwrap();
    assert_eq!(json[1]["name"], "logs");
    assert_eq!(json[1]["num_rows"], 30);

    let empty = tempfile::tempdir().unwrap();
    let none = QueryEngine::new(empty.path().join("nothing-yet").to_str().unwrap());
    assert!(none.tables().await.unwrap().is_empty());
    let err = none.sql("SELECT * FROM events").await.unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("events"),
        "{err}"
    );
}

#[tokio::test]
async fn result_limit_rejects_large_results_as_user_errors() {
    let (_dir, root) = lake().await;
    let engine = sluice_query::QueryEngine::with_limits(
        &root,
        sluice_query::QueryLimits {
            memory_bytes: Some(64 << 20),
            result_bytes: Some(600),
        },
    );
    // A small result passes.
    let r = engine.sql("SELECT count(*) FROM events").await.unwrap();
    assert_eq!(r.num_rows(), 1);
    // A cross join of 6×6×6 rows of strings does not.
    let err = engine
        .sql("SELECT a.kind, b.kind, c.kind FROM events a, events b, events c")
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::ResultTooLarge { limit: 600 }), "{err}");
    assert!(err.is_user_error());
    assert!(err.to_string().contains("max_query_result_bytes"), "{err}");
}
