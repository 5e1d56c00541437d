//! Tests of `sluice_lake::convert`: inference, evolution, widening, rejects, metadata columns.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use serde_json::{json, Value};
use sluice_lake::convert::{
    convert, dlq_schema, rejects_to_batch, ConvertOptions, Converted, InputRecord, MAX_BATCH_ROWS,
};

// ---------- helpers ----------

fn records<'a>(values: &'a [&'a str]) -> Vec<InputRecord<'a>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| InputRecord {
            partition: 3,
            offset: 100 + i as u64,
            timestamp_ms: 1_772_323_200_000 + i as i64, // 2026-03-01T00:00:00Z
            value: v.as_bytes(),
        })
        .collect()
}

fn run(table: Option<&Schema>, values: &[&str]) -> Converted {
    run_opts(table, values, &ConvertOptions::default())
}

fn run_opts(table: Option<&Schema>, values: &[&str], opts: &ConvertOptions) -> Converted {
    let recs = records(values);
    let c = convert(table, &recs, opts);
    check_invariants(&c, recs.len());
    c
}

/// Invariants every result must satisfy.
fn check_invariants(c: &Converted, n_in: usize) {
    assert_eq!(
        c.num_rows() + c.rejects.len(),
        n_in,
        "every record is a row or a reject"
    );
    for b in &c.batches {
        assert_eq!(b.schema(), c.schema, "batches follow the returned schema");
        assert!(b.num_rows() <= MAX_BATCH_ROWS);
        assert!(b.num_rows() > 0);
    }
    let names: Vec<&str> = c
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let n = names.len();
    assert!(n >= 3);
    assert_eq!(&names[n - 3..n - 1], &["_partition", "_offset"]);
}

/// Rows as JSON objects (null fields omitted), metadata columns dropped.
fn rows(c: &Converted) -> Vec<Value> {
    all_rows(c)
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("_partition");
            o.remove("_offset");
            o.remove("event_date");
            v
        })
        .collect()
}

fn all_rows(c: &Converted) -> Vec<Value> {
    let mut out = Vec::new();
    for b in &c.batches {
        let mut w = arrow_json::LineDelimitedWriter::new(Vec::new());
        w.write(b).unwrap();
        w.finish().unwrap();
        let text = String::from_utf8(w.into_inner()).unwrap();
        out.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    out
}

fn dtype(c: &Converted, name: &str) -> DataType {
    c.schema.field_with_name(name).unwrap().data_type().clone()
}

fn names(c: &Converted) -> Vec<String> {
    c.schema.fields().iter().map(|f| f.name().clone()).collect()
}

fn reasons(c: &Converted) -> Vec<String> {
    c.rejects.iter().map(|r| r.reason.clone()).collect()
}

fn list(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

fn strukt(fields: Vec<(&str, DataType)>) -> DataType {
    DataType::Struct(Fields::from(
        fields
            .into_iter()
            .map(|(n, t)| Field::new(n, t, true))
            .collect::<Vec<_>>(),
    ))
}

fn table(fields: Vec<(&str, DataType)>) -> Schema {
    Schema::new(
        fields
            .into_iter()
            .map(|(n, t)| Field::new(n, t, true))
            .collect::<Vec<_>>(),
    )
}

fn with_meta(fields: Vec<(&str, DataType)>) -> Schema {
    let mut f = fields;
    f.push(("_partition", DataType::Int32));
    f.push(("_offset", DataType::Int64));
    f.push(("event_date", DataType::Utf8));
    table(f)
}

// ---------- inference ----------

#[test]
fn infers_every_type() {
    let c = run(
        None,
        &[
            r#"{"b":true,"i":-7,"f":1.5,"e":2e3,"big":18446744073709551615,"s":"hé\"\n","o":{"x":1,"y":{"z":"deep"}},"li":[1,2,3],"ls":[{"n":"a","p":true},{"n":"b","q":0.5}],"ll":[[1],[2,3]],"lf":[1,2.5]}"#,
        ],
    );
    assert!(c.rejects.is_empty(), "{:?}", c.rejects);
    assert_eq!(dtype(&c, "b"), DataType::Boolean);
    assert_eq!(dtype(&c, "i"), DataType::Int64);
    assert_eq!(dtype(&c, "f"), DataType::Float64);
    assert_eq!(dtype(&c, "e"), DataType::Float64, "exponent means float");
    assert_eq!(
        dtype(&c, "big"),
        DataType::Float64,
        "beyond i64 means float"
    );
    assert_eq!(dtype(&c, "s"), DataType::Utf8);
    assert_eq!(
        dtype(&c, "o"),
        strukt(vec![
            ("x", DataType::Int64),
            ("y", strukt(vec![("z", DataType::Utf8)]))
        ])
    );
    assert_eq!(dtype(&c, "li"), list(DataType::Int64));
    assert_eq!(
        dtype(&c, "ls"),
        list(strukt(vec![
            ("n", DataType::Utf8),
            ("p", DataType::Boolean),
            ("q", DataType::Float64)
        ]))
    );
    assert_eq!(dtype(&c, "ll"), list(list(DataType::Int64)));
    assert_eq!(dtype(&c, "lf"), list(DataType::Float64));
    for f in c.schema.fields() {
        assert!(f.is_nullable(), "{} nullable", f.name());
    }
    assert_eq!(
        names(&c),
        [
            "b",
            "i",
            "f",
            "e",
            "big",
            "s",
            "o",
            "li",
            "ls",
            "ll",
            "lf",
            "_partition",
            "_offset",
            "event_date"
        ]
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"b":true,"i":-7,"f":1.5,"e":2000.0,"big":18446744073709551615.0,"s":"hé\"\n",
            "o":{"x":1,"y":{"z":"deep"}},"li":[1,2,3],"ls":[{"n":"a","p":true},{"n":"b","q":0.5}],
            "ll":[[1],[2,3]],"lf":[1.0,2.5]})
        ]
    );
}

#[test]
fn nested_fields_keep_first_appearance_order_across_records() {
    let c = run(
        None,
        &[
            r#"{"z":1,"o":{"b":1}}"#,
            r#"{"a":"x","o":{"c":true,"b":2},"z":2}"#,
            r#"{"o":{"a":[1]}}"#,
        ],
    );
    assert!(c.rejects.is_empty());
    assert_eq!(names(&c)[..3], ["z", "o", "a"]);
    assert_eq!(
        dtype(&c, "o"),
        strukt(vec![
            ("b", DataType::Int64),
            ("c", DataType::Boolean),
            ("a", list(DataType::Int64))
        ])
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"z":1,"o":{"b":1}}),
            json!({"z":2,"a":"x","o":{"b":2,"c":true}}),
            json!({"o":{"a":[1]}}),
        ]
    );
}

#[test]
fn extreme_integers_are_exact() {
    let c = run(
        None,
        &[
            r#"{"n":-9223372036854775808}"#,
            r#"{"n":9223372036854775807}"#,
            r#"{"n":0}"#,
        ],
    );
    assert_eq!(dtype(&c, "n"), DataType::Int64);
    let col = c.batches[0].column(0).as_primitive::<Int64Type>();
    assert_eq!(col.values(), &[i64::MIN, i64::MAX, 0]);
    // serde_json reads -0 as a float (keeping the sign): so does the conversion.
    let c = run(None, &[r#"{"z":-0}"#]);
    assert_eq!(dtype(&c, "z"), DataType::Float64);
    let z = c.batches[0]
        .column(0)
        .as_primitive::<arrow_array::types::Float64Type>()
        .value(0);
    assert!(z == 0.0 && z.is_sign_negative());
}

// ---------- evolution ----------

#[test]
fn new_field_mid_batch() {
    let c = run(
        None,
        &[
            r#"{"a":1}"#,
            r#"{"a":2}"#,
            r#"{"a":3,"x":"new"}"#,
            r#"{"a":4}"#,
        ],
    );
    assert_eq!(names(&c), ["a", "x", "_partition", "_offset", "event_date"]);
    assert_eq!(
        rows(&c),
        vec![
            json!({"a":1}),
            json!({"a":2}),
            json!({"a":3,"x":"new"}),
            json!({"a":4})
        ]
    );
    let x = c.batches[0].column(1);
    assert_eq!(x.null_count(), 3);
}

#[test]
fn new_fields_against_table_schema_go_before_metadata_columns() {
    let t = with_meta(vec![
        ("id", DataType::Utf8),
        ("user", strukt(vec![("name", DataType::Utf8)])),
    ]);
    let c = run(
        Some(&t),
        &[
            r#"{"id":"a","user":{"name":"n"}}"#,
            r#"{"id":"b","user":{"name":"m","age":30},"score":1.5}"#,
        ],
    );
    assert!(c.rejects.is_empty(), "{:?}", c.rejects);
    assert!(c.widened.is_empty());
    assert_eq!(
        names(&c),
        ["id", "user", "score", "_partition", "_offset", "event_date"]
    );
    assert_eq!(
        dtype(&c, "user"),
        strukt(vec![("name", DataType::Utf8), ("age", DataType::Int64)])
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"id":"a","user":{"name":"n"}}),
            json!({"id":"b","user":{"name":"m","age":30},"score":1.5}),
        ]
    );
}

#[test]
fn table_without_metadata_columns_gets_them_appended() {
    let t = table(vec![("id", DataType::Utf8)]);
    let c = run(Some(&t), &[r#"{"id":"a","n":1}"#]);
    assert_eq!(
        names(&c),
        ["id", "n", "_partition", "_offset", "event_date"]
    );
}

#[test]
fn existing_column_order_is_kept_and_field_metadata_preserved() {
    let mut md = std::collections::HashMap::new();
    md.insert("comment".to_string(), "kept".to_string());
    let t = Schema::new(vec![
        Field::new("b", DataType::Int64, true).with_metadata(md.clone()),
        Field::new("a", DataType::Utf8, true),
        Field::new("_partition", DataType::Int32, true),
        Field::new("_offset", DataType::Int64, true),
        Field::new("event_date", DataType::Utf8, true),
    ]);
    let c = run(Some(&t), &[r#"{"a":"x","c":true,"b":1}"#]);
    assert_eq!(
        names(&c),
        ["b", "a", "c", "_partition", "_offset", "event_date"]
    );
    assert_eq!(c.schema.field(0).metadata(), &md);
    assert_eq!(rows(&c), vec![json!({"a":"x","b":1,"c":true})]);
}

#[test]
fn new_field_in_a_later_batch() {
    let first = run(None, &[r#"{"a":1}"#]);
    let second = run(Some(&first.schema), &[r#"{"a":2,"b":{"c":[true]}}"#]);
    assert_eq!(
        names(&second),
        ["a", "b", "_partition", "_offset", "event_date"]
    );
    assert_eq!(rows(&second), vec![json!({"a":2,"b":{"c":[true]}})]);
    assert!(second.widened.is_empty());
}

// ---------- int -> float ----------

#[test]
fn int_then_float_within_batch_is_float64_not_widened() {
    let c = run(
        None,
        &[
            r#"{"n":1}"#,
            r#"{"n":2.5}"#,
            r#"{"n":3}"#,
            r#"{"l":[1]}"#,
            r#"{"l":[2.5]}"#,
        ],
    );
    assert!(c.rejects.is_empty());
    assert!(
        c.widened.is_empty(),
        "new columns are not 'widened': {:?}",
        c.widened
    );
    assert_eq!(dtype(&c, "n"), DataType::Float64);
    assert_eq!(dtype(&c, "l"), list(DataType::Float64));
    assert_eq!(
        rows(&c),
        vec![
            json!({"n":1.0}),
            json!({"n":2.5}),
            json!({"n":3.0}),
            json!({"l":[1.0]}),
            json!({"l":[2.5]})
        ]
    );
}

#[test]
fn float_into_existing_int64_column_widens() {
    let t = with_meta(vec![
        ("n", DataType::Int64),
        ("m", DataType::Int64),
        (
            "checks",
            list(strukt(vec![
                ("score", DataType::Int64),
                ("k", DataType::Int64),
            ])),
        ),
        ("ints", list(DataType::Int64)),
    ]);
    let c = run(
        Some(&t),
        &[
            r#"{"n":1,"m":1,"checks":[{"score":1,"k":1}],"ints":[1]}"#,
            r#"{"n":1.25,"m":2,"checks":[{"score":0.5,"k":2}],"ints":[2,1e2]}"#,
            r#"{"n":9223372036854775808}"#,
            r#"{"n":4.5}"#,
        ],
    );
    assert!(c.rejects.is_empty(), "{:?}", c.rejects);
    assert_eq!(c.widened, ["n", "checks.score", "ints"]);
    assert_eq!(dtype(&c, "n"), DataType::Float64);
    assert_eq!(dtype(&c, "m"), DataType::Int64);
    assert_eq!(
        dtype(&c, "checks"),
        list(strukt(vec![
            ("score", DataType::Float64),
            ("k", DataType::Int64)
        ]))
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"n":1.0,"m":1,"checks":[{"score":1.0,"k":1}],"ints":[1.0]}),
            json!({"n":1.25,"m":2,"checks":[{"score":0.5,"k":2}],"ints":[2.0,100.0]}),
            json!({"n":9223372036854775808.0}),
            json!({"n":4.5}),
        ]
    );
}

#[test]
fn integer_into_float64_column_is_stored_as_float() {
    let t = with_meta(vec![("x", DataType::Float64)]);
    let c = run(Some(&t), &[r#"{"x":3}"#, r#"{"x":-1}"#, r#"{"x":0.25}"#]);
    assert!(c.rejects.is_empty() && c.widened.is_empty());
    assert_eq!(
        rows(&c),
        vec![json!({"x":3.0}), json!({"x":-1.0}), json!({"x":0.25})]
    );
}

#[test]
fn scalar_conflicts_widen_to_text_when_asked() {
    // A change-data-capture table whose source column was retyped: int -> numeric sends
    // strings, text -> int sends numbers, bool -> text sends strings.
    let t = with_meta(vec![
        ("n", DataType::Int64),
        ("f", DataType::Float64),
        ("b", DataType::Boolean),
        ("s", DataType::Utf8),
        ("after", strukt(vec![("price", DataType::Int64), ("k", DataType::Int64)])),
        ("o", strukt(vec![("x", DataType::Int64)])),
    ]);
    let values = [
        r#"{"n":1,"f":0.5,"b":true,"s":"a","after":{"price":7,"k":1}}"#,
        r#"{"n":"12.50","f":"x","b":"maybe","s":1.50,"after":{"price":"7.25","k":2}}"#,
        r#"{"n":3,"s":true}"#,
        r#"{"n":{"deep":1}}"#,
        r#"{"o":"text for a struct"}"#,
    ];
    let opts = ConvertOptions { widen_to_text: true, ..Default::default() };
    let c = run_opts(Some(&t), &values, &opts);
    assert_eq!(c.widened, ["n", "f", "b", "after.price"]);
    for col in ["n", "f", "b", "s"] {
        assert_eq!(dtype(&c, col), DataType::Utf8, "{col}");
    }
    assert_eq!(dtype(&c, "after"), strukt(vec![("price", DataType::Utf8), ("k", DataType::Int64)]));
    assert_eq!(
        rows(&c),
        vec![
            json!({"n":"1","f":"0.5","b":"true","s":"a","after":{"price":"7","k":1}}),
            json!({"n":"12.50","f":"x","b":"maybe","s":"1.50","after":{"price":"7.25","k":2}}),
            json!({"n":"3","s":"true"}),
        ],
        "numbers keep their JSON text"
    );
    // Objects and arrays still conflict with scalar columns, and scalars with structs.
    assert_eq!(
        reasons(&c),
        [
            r#"field "n": table has Utf8, record has Struct ({"deep":1})"#,
            r#"field "o": table has Struct, record has Utf8 ("text for a struct")"#,
        ]
    );
    // Without the option the same records are conflicts, as for any stream.
    let c = run(Some(&t), &values[..2]);
    assert_eq!(c.rejects.len(), 1);
    assert!(c.widened.is_empty());
    // Within one flush of a new table: the column inferred as Int64 ends as Utf8.
    let c = run_opts(None, &[r#"{"n":1}"#, r#"{"n":"x"}"#, r#"{"n":2.5}"#], &opts);
    assert!(c.rejects.is_empty() && c.widened.is_empty(), "{:?}", c.rejects);
    assert_eq!(rows(&c), vec![json!({"n":"1"}), json!({"n":"x"}), json!({"n":"2.5"})]);
}

// ---------- conflicts ----------

#[test]
fn conflicts_reject_only_the_record_with_precise_reasons() {
    let t = with_meta(vec![
        ("id", DataType::Int64),
        ("name", DataType::Utf8),
        ("ok", DataType::Boolean),
        ("user", strukt(vec![("age", DataType::Int64)])),
        ("tags", list(DataType::Utf8)),
        ("score", DataType::Float64),
    ]);
    let inputs = [
        r#"{"id":1,"name":"a","ok":true,"user":{"age":30},"tags":["x"],"score":1.5}"#,
        r#"{"id":2,"user":{"age":"abc"}}"#,
        r#"{"id":"3"}"#,
        r#"{"id":4,"name":5}"#,
        r#"{"id":5,"ok":1}"#,
        r#"{"id":6,"score":true}"#,
        r#"{"id":7,"user":5}"#,
        r#"{"id":8,"name":{"a":1}}"#,
        r#"{"id":9,"tags":"x"}"#,
        r#"{"id":10,"name":["x"]}"#,
        r#"{"id":11,"tags":["a",1]}"#,
        r#"{"id":12,"ok":null,"name":"kept"}"#,
        r#"{"id":13,"user":{"age":[1]}}"#,
        r#"{"id":14,"score":"1.5"}"#,
        r#"{"id":15,"name":true}"#,
    ];
    let c = run(Some(&t), &inputs);
    assert_eq!(
        reasons(&c),
        [
            r#"field "user.age": table has Int64, record has Utf8 ("abc")"#,
            r#"field "id": table has Int64, record has Utf8 ("3")"#,
            r#"field "name": table has Utf8, record has Int64 (5)"#,
            r#"field "ok": table has Boolean, record has Int64 (1)"#,
            r#"field "score": table has Float64, record has Boolean (true)"#,
            r#"field "user": table has Struct, record has Int64 (5)"#,
            r#"field "name": table has Utf8, record has Struct ({"a":1})"#,
            r#"field "tags": table has List(Utf8), record has Utf8 ("x")"#,
            r#"field "name": table has Utf8, record has List (["x"])"#,
            r#"field "tags[]": table has Utf8, record has Int64 (1)"#,
            r#"field "user.age": table has Int64, record has List ([1])"#,
            r#"field "score": table has Float64, record has Utf8 ("1.5")"#,
            r#"field "name": table has Utf8, record has Boolean (true)"#,
        ]
    );
    let rejected: Vec<&str> = c.rejects.iter().map(|r| r.raw.as_str()).collect();
    assert_eq!(rejected[0], inputs[1], "raw is the original text");
    assert_eq!(c.rejects[0].offset, 101);
    assert_eq!(c.rejects[0].partition, 3);
    assert_eq!(
        rows(&c),
        vec![
            json!({"id":1,"name":"a","ok":true,"user":{"age":30},"tags":["x"],"score":1.5}),
            json!({"id":12,"name":"kept"}),
        ]
    );
    assert_eq!(
        c.schema.fields().len(),
        t.fields().len(),
        "no schema change"
    );
    assert!(c.widened.is_empty());
    let offsets: Vec<i64> = c.batches[0]
        .column_by_name("_offset")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(offsets, [100, 111]);
}

#[test]
fn conflicts_within_a_batch_against_inferred_columns() {
    let c = run(
        None,
        &[
            r#"{"a":1,"o":{"x":"s"}}"#,
            r#"{"a":"one"}"#,
            r#"{"o":{"x":2}}"#,
            r#"{"a":2,"l":[1,"x"]}"#,
            r#"{"a":3}"#,
        ],
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "a": column inferred as Int64 from earlier values, record has Utf8 ("one")"#,
            r#"field "o.x": column inferred as Utf8 from earlier values, record has Int64 (2)"#,
            r#"field "l[]": column inferred as Int64 from earlier values, record has Utf8 ("x")"#,
        ]
    );
    assert_eq!(rows(&c), vec![json!({"a":1,"o":{"x":"s"}}), json!({"a":3})]);
    assert_eq!(
        names(&c),
        ["a", "o", "_partition", "_offset", "event_date"],
        "rejected record added no column"
    );
}

#[test]
fn arrow_json_coercions_never_happen() {
    // Each of these would be silently coerced by arrow-json's decoder.
    let t = with_meta(vec![
        ("i", DataType::Int64),
        ("s", DataType::Utf8),
        ("small", DataType::Int32),
        ("u", DataType::UInt8),
        ("f", DataType::Float64),
        ("ts", DataType::Timestamp(TimeUnit::Microsecond, None)),
        ("f32", DataType::Float32),
    ]);
    let c = run(
        Some(&t),
        &[
            r#"{"i":"12"}"#,
            r#"{"s":12}"#,
            r#"{"s":1.5}"#,
            r#"{"s":false}"#,
            r#"{"small":2147483648}"#,
            r#"{"small":1.5}"#,
            r#"{"u":-1}"#,
            r#"{"f":"2.5"}"#,
            r#"{"ts":"2026-01-01T00:00:00Z"}"#,
            r#"{"f32":0.1}"#,
            r#"{"small":-2147483648,"u":255,"ts":null,"f32":null}"#,
        ],
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "i": table has Int64, record has Utf8 ("12")"#,
            r#"field "s": table has Utf8, record has Int64 (12)"#,
            r#"field "s": table has Utf8, record has Float64 (1.5)"#,
            r#"field "s": table has Utf8, record has Boolean (false)"#,
            r#"field "small": table has Int32, record has Int64 (2147483648)"#,
            r#"field "small": table has Int32, record has Float64 (1.5)"#,
            r#"field "u": table has UInt8, record has Int64 (-1)"#,
            r#"field "f": table has Float64, record has Utf8 ("2.5")"#,
            r#"field "ts": table has Timestamp(µs), which Sluice only fills with null from JSON, record has Utf8 ("2026-01-01T00:00:00Z")"#,
            r#"field "f32": table has Float32, which Sluice only fills with null from JSON, record has Float64 (0.1)"#,
        ]
    );
    assert!(c.widened.is_empty());
    assert_eq!(rows(&c), vec![json!({"small":-2147483648,"u":255})]);
}

#[test]
fn non_nullable_table_columns_must_have_values() {
    let t = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "o",
            DataType::Struct(Fields::from(vec![Field::new("k", DataType::Utf8, false)])),
            true,
        ),
    ]);
    let c = run(
        Some(&t),
        &[
            r#"{"id":1}"#,
            r#"{"x":1}"#,
            r#"{"id":null}"#,
            r#"{"id":2,"o":{}}"#,
            r#"{"id":3,"o":null}"#,
            r#"{"id":4,"o":{"k":"v"}}"#,
        ],
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "id": table column is not nullable, record has no value"#,
            r#"field "id": table column is not nullable, record has null"#,
            r#"field "o.k": table column is not nullable, record has no value"#,
        ]
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"id":1}),
            json!({"id":3}),
            json!({"id":4,"o":{"k":"v"}})
        ]
    );
    assert_eq!(
        names(&c),
        ["id", "o", "_partition", "_offset", "event_date"],
        "rejected record added no column"
    );
    assert!(
        !c.schema.field_with_name("id").unwrap().is_nullable(),
        "table nullability kept"
    );
}

// ---------- nulls, empty arrays and objects ----------

#[test]
fn untyped_values_create_no_columns() {
    let c = run(
        None,
        &[r#"{"a":1,"n":null,"l":[],"o":{},"on":{"x":null},"ll":[[]],"lo":[{}],"ln":[null]}"#],
    );
    assert!(c.rejects.is_empty());
    assert_eq!(names(&c), ["a", "_partition", "_offset", "event_date"]);
    assert_eq!(rows(&c), vec![json!({"a":1})]);
}

#[test]
fn untyped_values_before_and_after_a_typed_one() {
    let c = run(
        None,
        &[
            r#"{"l":[],"o":{},"n":null}"#,
            r#"{"l":[1,null],"o":{"x":null,"y":"s"},"n":2}"#,
            r#"{"l":[],"o":{},"n":null}"#,
            r#"{"l":null,"o":null}"#,
        ],
    );
    assert!(c.rejects.is_empty());
    assert_eq!(
        names(&c),
        ["l", "o", "n", "_partition", "_offset", "event_date"]
    );
    assert_eq!(dtype(&c, "o"), strukt(vec![("y", DataType::Utf8)]));
    // [] is an empty list and {} a struct of nulls where the column exists; null is null.
    assert_eq!(
        rows(&c),
        vec![
            json!({"l":[],"o":{}}),
            json!({"l":[1,null],"o":{"y":"s"},"n":2}),
            json!({"l":[],"o":{}}),
            json!({}),
        ]
    );
    let b = &c.batches[0];
    let l = b.column_by_name("l").unwrap().as_list::<i32>();
    assert!(!l.is_null(0) && l.value(0).is_empty());
    assert!(l.is_null(3));
    let o = b.column_by_name("o").unwrap().as_struct();
    assert!(!o.is_null(0) && o.column(0).is_null(0));
    assert!(o.is_null(3));
}

// ---------- invalid input ----------

#[test]
fn invalid_json_and_non_objects_are_rejected() {
    let bad: Vec<(&[u8], &str)> = vec![
        (
            b"",
            "invalid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            b"{\"a\":1",
            "invalid JSON: EOF while parsing an object at line 1 column 6",
        ),
        (
            b"{\"a\":1} x",
            "invalid JSON: trailing characters at line 1 column 9",
        ),
        (
            b"{\"a\":1}{\"a\":2}",
            "invalid JSON: trailing characters at line 1 column 8",
        ),
        (
            b"{\"a\":NaN}",
            "invalid JSON: expected value at line 1 column 6",
        ),
        (
            b"{a:1}",
            "invalid JSON: key must be a string at line 1 column 2",
        ),
        (
            b"{\"a\":1e400}",
            "invalid JSON: number out of range at line 1 column 10",
        ),
        (
            b"{\"a\":\"\xff\"}",
            "invalid JSON: invalid unicode code point at line 1 column 7",
        ),
        (
            b"{\"a\":\"\\ud800\"}",
            "invalid JSON: unexpected end of hex escape at line 1 column 13",
        ),
        (
            b"{\"a\":01}",
            "invalid JSON: invalid number at line 1 column 7",
        ),
        (b"[1,2]", "not a JSON object: the value is array"),
        (b"\"s\"", "not a JSON object: the value is string"),
        (b"42", "not a JSON object: the value is number"),
        (b"null", "not a JSON object: the value is null"),
        (b"true", "not a JSON object: the value is boolean"),
    ];
    let mut recs: Vec<InputRecord> = bad
        .iter()
        .enumerate()
        .map(|(i, (v, _))| InputRecord {
            partition: 0,
            offset: i as u64,
            timestamp_ms: 0,
            value: v,
        })
        .collect();
    recs.push(InputRecord {
        partition: 0,
        offset: 99,
        timestamp_ms: 0,
        value: b" {\"ok\":1}\n",
    });
    let c = convert(None, &recs, &ConvertOptions::default());
    check_invariants(&c, recs.len());
    let got: Vec<&str> = c.rejects.iter().map(|r| r.reason.as_str()).collect();
    let want: Vec<&str> = bad.iter().map(|(_, r)| *r).collect();
    assert_eq!(got, want);
    assert_eq!(
        c.rejects[7].raw, "{\"a\":\"\u{fffd}\"}",
        "invalid UTF-8 replaced in raw"
    );
    assert_eq!(rows(&c), vec![json!({"ok":1})]);
}

#[test]
fn invalid_after_schema_mismatch_is_still_invalid() {
    // The fast check stops at the first mismatch; the slow path must still see bad JSON.
    let t = with_meta(vec![("a", DataType::Int64)]);
    let c = run(Some(&t), &[r#"{"a":"x", "b": }"#, r#"{"new":1, "b"}"#]);
    assert_eq!(c.rejects.len(), 2);
    assert!(
        c.rejects
            .iter()
            .all(|r| r.reason.starts_with("invalid JSON: ")),
        "{:?}",
        reasons(&c)
    );
    assert_eq!(names(&c), ["a", "_partition", "_offset", "event_date"]);
}

#[test]
fn bad_field_names_duplicates_and_reserved_names() {
    let t = with_meta(vec![("userId", DataType::Int64)]);
    let c = run(
        Some(&t),
        &[
            r#"{"a b":1}"#,
            r#"{"o":{"x=y":1}}"#,
            r#"{"a,b":null}"#,
            r#"{"":1}"#,
            r#"{"t\tab":1}"#,
            r#"{"f(x)":1}"#,
            r#"{"userId":1,"userId":2}"#,
            r#"{"k":1,"k":1}"#,
            r#"{"o":{"k":1,"k":"x"}}"#,
            r#"{"userid":1}"#,
            r#"{"_offset":1}"#,
            r#"{"event_date":"2020-01-01"}"#,
            r#"{"Event_Date":"2020-01-01"}"#,
            r#"{"_partition":null}"#,
            r#"{"userId":7,"userid":null,"ok;":null}"#,
            r#"{"userId":8}"#,
        ],
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "a b": name contains ' ', which Delta column names cannot hold (without column mapping)"#,
            r#"field "o.x=y": name contains '=', which Delta column names cannot hold (without column mapping)"#,
            r#"field "a,b": name contains ',', which Delta column names cannot hold (without column mapping)"#,
            r#"field "": empty field name"#,
            r#"field "t	ab": name contains '\t', which Delta column names cannot hold (without column mapping)"#,
            r#"field "f(x)": name contains '(', which Delta column names cannot hold (without column mapping)"#,
            r#"field "userId": key appears more than once in the object"#,
            r#"field "k": key appears more than once in the object"#,
            r#"field "o.k": key appears more than once in the object"#,
            r#"field "userid": differs only in case from column "userId" (Delta column names are case-insensitive)"#,
            r#"field "_offset": name is reserved for a metadata column Sluice adds to every row"#,
            r#"field "event_date": name is reserved for a metadata column Sluice adds to every row"#,
            r#"field "Event_Date": differs only in case from metadata column "event_date" (Delta column names are case-insensitive)"#,
            r#"field "_partition": name is reserved for a metadata column Sluice adds to every row"#,
            r#"field "ok;": name contains ';', which Delta column names cannot hold (without column mapping)"#,
        ]
    );
    assert_eq!(rows(&c), vec![json!({"userId":8})]);
}

// ---------- metadata and date columns ----------

#[test]
fn metadata_and_date_columns() {
    let values = [
        r#"{"a":1}"#,
        r#"{"a":2}"#,
        r#"{"a":3}"#,
        r#"{"a":4}"#,
        r#"{"a":5}"#,
    ];
    let ts = [0i64, -1, 1_772_409_599_999, 1_772_409_600_000, -86_400_001];
    let recs: Vec<InputRecord> = values
        .iter()
        .zip(ts)
        .enumerate()
        .map(|(i, (v, t))| InputRecord {
            partition: i as u32 * 7,
            offset: 1 << (40 + i),
            timestamp_ms: t,
            value: v.as_bytes(),
        })
        .collect();
    let opts = ConvertOptions {
        date_column: "day".into(),
        partition_by: vec![],
        ..Default::default()
    };
    let c = convert(None, &recs, &opts);
    assert!(c.rejects.is_empty());
    assert_eq!(names(&c), ["a", "_partition", "_offset", "day"]);
    assert_eq!(dtype(&c, "_partition"), DataType::Int32);
    assert_eq!(dtype(&c, "_offset"), DataType::Int64);
    assert_eq!(dtype(&c, "day"), DataType::Utf8);
    let b = &c.batches[0];
    let p = b.column(1).as_primitive::<Int32Type>();
    assert_eq!(p.values(), &[0, 7, 14, 21, 28]);
    let o = b.column(2).as_primitive::<Int64Type>();
    assert_eq!(o.values(), &[1 << 40, 1 << 41, 1 << 42, 1 << 43, 1 << 44]);
    let d = b.column(3).as_string::<i32>();
    let days: Vec<&str> = d.iter().map(|x| x.unwrap()).collect();
    assert_eq!(
        days,
        [
            "1970-01-01",
            "1969-12-31",
            "2026-03-01",
            "2026-03-02",
            "1969-12-30"
        ]
    );
}

#[test]
fn out_of_range_envelope_values_are_rejected() {
    let recs = [
        InputRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: i64::MAX,
            value: b"{\"a\":1}",
        },
        InputRecord {
            partition: 0,
            offset: 1,
            timestamp_ms: i64::MIN,
            value: b"{\"a\":1}",
        },
        InputRecord {
            partition: u32::MAX,
            offset: 2,
            timestamp_ms: 0,
            value: b"{\"a\":1}",
        },
        InputRecord {
            partition: 0,
            offset: u64::MAX,
            timestamp_ms: 0,
            value: b"{\"a\":1}",
        },
        InputRecord {
            partition: 0,
            offset: 4,
            timestamp_ms: 0,
            value: b"{\"a\":1}",
        },
    ];
    let c = convert(None, &recs, &ConvertOptions::default());
    check_invariants(&c, recs.len());
    assert_eq!(
        reasons(&c),
        [
            "timestamp_ms 9223372036854775807 is out of range for a date",
            "timestamp_ms -9223372036854775808 is out of range for a date",
            "log partition 4294967295 does not fit Int32",
            "log offset 18446744073709551615 does not fit Int64",
        ]
    );
    assert_eq!(c.num_rows(), 1);
}

#[test]
fn record_fields_cannot_collide_with_a_custom_date_column() {
    let opts = ConvertOptions {
        date_column: "day".into(),
        partition_by: vec![],
        ..Default::default()
    };
    let c = run_opts(None, &[r#"{"day":"x"}"#, r#"{"event_date":"kept"}"#], &opts);
    assert_eq!(
        reasons(&c),
        [r#"field "day": name is reserved for a metadata column Sluice adds to every row"#]
    );
    assert_eq!(names(&c), ["event_date", "_partition", "_offset", "day"]);
}

#[test]
fn bad_date_column_name_rejects_everything() {
    let opts = ConvertOptions {
        date_column: "_offset".into(),
        partition_by: vec![],
        ..Default::default()
    };
    let c = convert(None, &records(&[r#"{"a":1}"#]), &opts);
    assert_eq!(c.num_rows(), 0);
    assert_eq!(
        reasons(&c),
        [r#"configuration: date column name "_offset" collides with a metadata column"#]
    );
}

#[test]
fn table_metadata_columns_of_other_types_are_cast_or_refused() {
    // LargeUtf8 date column: values are cast.
    let t = Schema::new(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("_partition", DataType::Int64, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new("event_date", DataType::LargeUtf8, true),
    ]);
    let c = run(Some(&t), &[r#"{"a":1}"#]);
    assert!(c.rejects.is_empty());
    assert_eq!(c.batches[0].column(1).data_type(), &DataType::Int64);
    assert_eq!(c.batches[0].column(3).data_type(), &DataType::LargeUtf8);
    // A struct there cannot be written: every record goes to the dead-letter table.
    let t = Schema::new(vec![Field::new(
        "_partition",
        strukt(vec![("x", DataType::Int64)]),
        true,
    )]);
    let c = convert(
        Some(&t),
        &records(&[r#"{"a":1}"#]),
        &ConvertOptions::default(),
    );
    assert_eq!(c.num_rows(), 0);
    assert_eq!(
        reasons(&c),
        [r#"table column "_partition" has type Struct("x": Int64), Sluice writes Int32 there"#]
    );
}

// ---------- partition_by ----------

#[test]
fn partition_by_values() {
    let opts = ConvertOptions {
        date_column: "event_date".into(),
        partition_by: vec!["region".into(), "tier".into()],
        ..Default::default()
    };
    let c = run_opts(
        None,
        &[
            r#"{"region":"berlin","tier":1}"#,
            r#"{"region":{"city":"x"}}"#,
            r#"{"region":["x"]}"#,
            r#"{"region":[]}"#,
            r#"{"region":{}}"#,
            r#"{"tier":1.5}"#,
            r#"{"region":null,"tier":2}"#,
            r#"{"tier":"3"}"#,
            r#"{"region":"paris"}"#,
        ],
        &opts,
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "region": partition column must hold a string, integer or boolean, record has Struct ({"city":"x"})"#,
            r#"field "region": partition column must hold a string, integer or boolean, record has List (["x"])"#,
            r#"field "region": partition column must hold a string, integer or boolean, record has List ([])"#,
            r#"field "region": partition column must hold a string, integer or boolean, record has Struct ({})"#,
            r#"field "tier": partition column must hold a string, integer or boolean, record has Float64 (1.5)"#,
            r#"field "tier": column inferred as Int64 from earlier values, record has Utf8 ("3")"#,
        ]
    );
    assert_eq!(
        rows(&c),
        vec![
            json!({"region":"berlin","tier":1}),
            json!({"tier":2}),
            json!({"region":"paris"})
        ]
    );
    assert!(c.widened.is_empty());
}

#[test]
fn partition_column_in_table_is_checked_and_never_widened() {
    let opts = ConvertOptions {
        date_column: "event_date".into(),
        partition_by: vec!["tier".into()],
        ..Default::default()
    };
    let t = with_meta(vec![("tier", DataType::Int64), ("other", DataType::Int64)]);
    let c = run_opts(
        Some(&t),
        &[
            r#"{"tier":2.5}"#,
            r#"{"tier":{"a":1}}"#,
            r#"{"tier":3,"other":0.5}"#,
        ],
        &opts,
    );
    assert_eq!(c.rejects.len(), 2);
    assert!(
        c.rejects[0].reason.contains("partition column"),
        "{}",
        c.rejects[0].reason
    );
    assert_eq!(c.widened, ["other"]);
}

// ---------- batching and dead letters ----------

#[test]
fn large_inputs_are_chunked_in_order() {
    let texts: Vec<String> = (0..20_000)
        .map(|i| {
            if i == 15_000 {
                format!(r#"{{"i":{i},"late":"field"}}"#)
            } else if i % 5000 == 1 {
                format!(r#"{{"i":"bad{i}"}}"#)
            } else {
                format!(r#"{{"i":{i}}}"#)
            }
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let c = run(None, &refs);
    let sizes: Vec<usize> = c.batches.iter().map(RecordBatch::num_rows).collect();
    assert_eq!(sizes, [8192, 8192, 3612]);
    assert_eq!(c.rejects.len(), 4);
    let mut expect = 0i64;
    for b in &c.batches {
        let col = b.column(0).as_primitive::<Int64Type>();
        for v in col.values() {
            while expect % 5000 == 1 {
                expect += 1;
            }
            assert_eq!(*v, expect);
            expect += 1;
        }
    }
    assert_eq!(
        c.batches[0].column_by_name("late").unwrap().null_count(),
        8192
    );
    assert_eq!(
        c.batches[1].column_by_name("late").unwrap().null_count(),
        8191
    );
}

#[test]
fn dead_letter_batch() {
    let c = run(None, &[r#"{"a":1}"#, r#"{"a":"x"}"#, "nope"]);
    let mut rejects = c.rejects.clone();
    rejects.push(sluice_lake::convert::Reject {
        partition: 1,
        offset: 2,
        timestamp_ms: i64::MAX,
        raw: "{}".into(),
        reason: "r".into(),
    });
    let b = rejects_to_batch(&rejects, "event_date");
    assert_eq!(b.schema(), dlq_schema());
    assert_eq!(b.num_rows(), 3);
    let raw = b.column(0).as_string::<i32>();
    assert_eq!(raw.value(0), r#"{"a":"x"}"#);
    assert_eq!(raw.value(1), "nope");
    let reason = b.column(1).as_string::<i32>();
    assert!(reason.value(1).starts_with("invalid JSON"));
    assert_eq!(b.column(2).as_primitive::<Int32Type>().value(0), 3);
    assert_eq!(b.column(3).as_primitive::<Int64Type>().value(0), 101);
    let ts = b.column(4).as_primitive::<TimestampMicrosecondType>();
    assert_eq!(ts.value(0), 1_772_323_200_001_000);
    assert!(ts.is_null(2));
    let d = b.column(5).as_string::<i32>();
    assert_eq!(d.value(0), "2026-03-01");
    assert!(d.is_null(2));
    assert_eq!(
        b.schema().field(4).data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    let b2 = rejects_to_batch(&[], "day");
    assert_eq!(b2.num_rows(), 0);
    assert_eq!(b2.schema().field(5).name(), "day");
}

#[test]
fn empty_input() {
    let c = run(None, &[]);
    assert!(c.batches.is_empty() && c.rejects.is_empty());
    assert_eq!(names(&c), ["_partition", "_offset", "event_date"]);
    let c = run(None, &["{}", "{}"]);
    assert_eq!(c.num_rows(), 2);
    assert_eq!(c.batches[0].num_columns(), 3);
}

#[test]
fn untyped_values_fit_any_column_as_null() {
    let c = run(
        None,
        &[
            r#"{"a":[],"b":{},"c":[[]]}"#,
            r#"{"a":true,"b":[1],"c":[true]}"#,
            r#"{"a":[],"b":{},"c":[[],null,{}]}"#,
            r#"{"a":{"x":[]},"b":[[{}]]}"#,
            r#"{"a":{"bad name":null}}"#,
            r#"{"b":[{"k":null,"k":null}]}"#,
        ],
    );
    assert_eq!(
        reasons(&c),
        [
            r#"field "a.bad name": name contains ' ', which Delta column names cannot hold (without column mapping)"#,
            r#"field "b[].k": key appears more than once in the object"#,
        ]
    );
    assert_eq!(dtype(&c, "a"), DataType::Boolean);
    assert_eq!(dtype(&c, "b"), list(DataType::Int64));
    assert_eq!(dtype(&c, "c"), list(DataType::Boolean));
    // The first record was accepted before the columns had a type: same result as after.
    assert_eq!(
        rows(&c),
        vec![
            json!({"c":[null]}),
            json!({"a":true,"b":[1],"c":[true]}),
            json!({"c":[null,null,null]}),
            json!({"b":[null]}),
        ]
    );
    let a = c.batches[0].column_by_name("a").unwrap();
    assert!(a.is_null(0) && a.is_null(2) && a.is_null(3));
}

#[test]
fn untyped_value_in_non_nullable_column_is_rejected() {
    let t = Schema::new(vec![Field::new("a", DataType::Boolean, false)]);
    let c = run(Some(&t), &[r#"{"a":[]}"#, r#"{"a":true}"#]);
    assert_eq!(
        reasons(&c),
        [r#"field "a": table column is not nullable, record has List without values ([])"#]
    );
}

#[test]
fn deep_nesting_is_accepted_up_to_the_parser_limit_and_rejected_beyond() {
    let deep = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
    let ok = deep(100);
    let too_deep = deep(200);
    let arrays = format!(r#"{{"l":{}1{}}}"#, "[".repeat(300), "]".repeat(300));
    let c = run(None, &[&ok, &too_deep, &arrays]);
    assert_eq!(c.num_rows(), 1);
    assert_eq!(c.rejects.len(), 2);
    for r in &c.rejects {
        assert!(
            r.reason
                .starts_with("invalid JSON: recursion limit exceeded"),
            "{}",
            r.reason
        );
    }
    let mut t = c.schema.field_with_name("a").unwrap().data_type().clone();
    let mut depth = 1;
    while let DataType::Struct(f) = t {
        t = f[0].data_type().clone();
        depth += 1;
    }
    assert_eq!((depth, t), (100, DataType::Int64));
}

#[test]
fn wide_records() {
    let n = 20_000;
    let wide: String = format!(
        "{{{}}}",
        (0..n)
            .map(|i| format!(r#""k{i}":{i}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let untyped: String = format!(
        "{{{}}}",
        (0..n)
            .map(|i| format!(r#""u{i}":null"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let dup: String = format!("{},\"u{}\":null}}", &untyped[..untyped.len() - 1], n - 1);
    let c = run(None, &[&wide, &untyped, &dup, &wide]);
    assert_eq!(
        reasons(&c),
        [format!(
            r#"field "u{}": key appears more than once in the object"#,
            n - 1
        )]
    );
    assert_eq!(c.schema.fields().len(), n + 3);
    assert_eq!(c.schema.field(n - 1).name(), &format!("k{}", n - 1));
    let col = c.batches[0].column(n - 1).as_primitive::<Int64Type>();
    assert_eq!(
        (col.value(0), col.is_null(1), col.value(2)),
        ((n - 1) as i64, true, (n - 1) as i64)
    );
}

#[test]
fn metadata_values_that_do_not_fit_the_table_type_are_rejected_not_nulled() {
    let t = Schema::new(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("_partition", DataType::Int32, true),
        Field::new("_offset", DataType::Int16, true),
        Field::new("event_date", DataType::Utf8, true),
    ]);
    let recs = [
        InputRecord {
            partition: 0,
            offset: 5,
            timestamp_ms: 0,
            value: b"{\"a\":1}",
        },
        InputRecord {
            partition: 0,
            offset: 70_000,
            timestamp_ms: 0,
            value: b"{\"a\":2}",
        },
    ];
    let c = convert(Some(&t), &recs, &ConvertOptions::default());
    check_invariants(&c, 2);
    assert_eq!(c.num_rows(), 1);
    assert_eq!(
        c.batches[0]
            .column(2)
            .as_primitive::<arrow_array::types::Int16Type>()
            .values(),
        &[5]
    );
    assert_eq!(c.rejects.len(), 1);
    assert_eq!(c.rejects[0].offset, 70_000);
    assert!(
        c.rejects[0]
            .reason
            .starts_with("could not convert into the table schema: "),
        "{}",
        c.rejects[0].reason
    );
}
