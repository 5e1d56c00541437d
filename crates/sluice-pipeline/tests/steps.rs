//! `filter` and `map` on batches made by the lake converter from JSON records: nested fields,
//! nulls and missing fields, type errors at compile time, evaluation errors.

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::{DataType, Float64Type, Int64Type};
use proptest::prelude::*;
use sluice_lake::convert::{convert, ConvertOptions, InputRecord};
use sluice_pipeline::{Filter, Map, StepError};

fn batch(lines: &[&str]) -> RecordBatch {
    let inputs: Vec<InputRecord> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| InputRecord {
            partition: 0,
            offset: i as u64,
            timestamp_ms: 0,
            value: l.as_bytes(),
        })
        .collect();
    let c = convert(None, &inputs, &ConvertOptions::default());
    assert!(c.rejects.is_empty(), "{:?}", c.rejects);
    concat_batches(&c.schema, &c.batches).unwrap()
}

fn rides() -> RecordBatch {
    batch(&[
        r#"{"kind":"ride","fare":1250,"rider":{"id":"r1","tier":"gold"},"city":"Oslo"}"#,
        r#"{"kind":"ride","fare":300,"rider":{"id":"r2","tier":"basic"}}"#,
        r#"{"kind":"stop","rider":{"id":"r3"}}"#,
        r#"{"kind":"ride","fare":4000,"rider":{"id":"r4","tier":"gold"},"city":"Bergen"}"#,
        r#"{"kind":"ride","fare":null,"rider":{"id":"r5","tier":"gold"}}"#,
    ])
}

fn offsets(b: &RecordBatch) -> Vec<i64> {
    b.column_by_name("_offset")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn filter_keeps_true_rows_and_drops_false_and_null() {
    let b = rides();
    let f = Filter::compile(
        "kind = 'ride' AND rider.tier = 'gold' AND fare > 1000",
        &b.schema(),
    )
    .unwrap();
    // r5 has fare null: NULL > 1000 is NULL, so the row is dropped as in SQL WHERE.
    assert_eq!(offsets(&f.apply(&b).unwrap()), vec![0, 3]);
    let f = Filter::compile("city IS NULL", &b.schema()).unwrap();
    assert_eq!(offsets(&f.apply(&b).unwrap()), vec![1, 2, 4]);
    let f = Filter::compile("rider['tier'] IS DISTINCT FROM 'gold'", &b.schema()).unwrap();
    assert_eq!(offsets(&f.apply(&b).unwrap()), vec![1, 2]);
    let f = Filter::compile("NULL", &b.schema()).unwrap();
    let out = f.apply(&b).unwrap();
    assert_eq!(out.num_rows(), 0);
    // The output keeps the input schema.
    assert_eq!(out.schema(), b.schema());
}

#[test]
fn filter_compile_errors_name_the_problem() {
    let b = rides();
    let err = |sql: &str| match Filter::compile(sql, &b.schema()) {
        Err(StepError::Invalid { message, .. }) => message,
        Err(e) => panic!("{sql}: unexpected {e}"),
        Ok(_) => panic!("{sql}: compiled"),
    };
    let m = err("fare + 1");
    assert!(m.contains("must be a boolean expression, but it is Int64"), "{m}");
    let m = err("distance > 3");
    assert!(m.contains("distance"), "{m}");
    let m = err("rider.age > 3");
    assert!(m.contains("age"), "{m}");
    let m = err("kind = = 'x'");
    assert!(!m.is_empty());
    let m = err("no_such_fn(kind)");
    assert!(m.contains("no_such_fn"), "{m}");
    // The error's Display names the step and the expression.
    let e = Filter::compile("distance > 3", &b.schema())
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("filter `distance > 3`: "), "{e}");
}

#[test]
fn map_renames_computes_casts_and_drops() {
    let b = rides();
    let fields = pairs(&[
        ("rider_id", "rider.id"),
        ("fare_eur", "fare / 100.0"),
        ("kind", "upper(kind)"),
        ("fare_text", "CAST(fare AS VARCHAR)"),
        ("gold", "rider.tier = 'gold'"),
    ]);
    let m = Map::compile(&fields, &b.schema()).unwrap();
    let out = m.apply(&b).unwrap();
    let schema = out.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["rider_id", "fare_eur", "kind", "fare_text", "gold"]);
    assert_eq!(out.schema(), *m.output_schema());
    assert_eq!(out.num_rows(), 5);
    let ids = deltalake::arrow::compute::cast(out.column(0), &DataType::Utf8).unwrap();
    let ids: Vec<&str> = ids.as_string::<i32>().iter().map(|v| v.unwrap()).collect();
    assert_eq!(ids, ["r1", "r2", "r3", "r4", "r5"]);
    assert_eq!(out.schema().field(1).data_type(), &DataType::Float64);
    let fare = out.column(1).as_primitive::<Float64Type>();
    assert_eq!(fare.value(0), 12.5);
    assert!(fare.is_null(2) && fare.is_null(4));
    let kind = deltalake::arrow::compute::cast(out.column(2), &DataType::Utf8).unwrap();
    assert_eq!(kind.as_string::<i32>().value(1), "RIDE");
    let text = deltalake::arrow::compute::cast(out.column(3), &DataType::Utf8).unwrap();
    assert_eq!(text.as_string::<i32>().value(3), "4000");
    let gold = out.column(4).as_boolean();
    assert!(gold.value(0) && !gold.value(1) && gold.is_null(2));
}

#[test]
fn map_errors() {
    let b = rides();
    let e = Map::compile(&pairs(&[("a", "kind"), ("a", "fare")]), &b.schema())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("output field `a` is defined twice"),
        "{e}"
    );
    let e = Map::compile(&pairs(&[("a", "nope")]), &b.schema())
        .err()
        .unwrap();
    assert!(matches!(e, StepError::Invalid { step: "map", .. }), "{e}");
    // A value that does not convert fails the batch at evaluation, naming the expression.
    let m = Map::compile(&pairs(&[("n", "CAST(kind AS BIGINT)")]), &b.schema()).unwrap();
    let e = m.apply(&b).unwrap_err();
    assert!(
        matches!(&e, StepError::Eval { expr, .. } if expr == "CAST(kind AS BIGINT)"),
        "{e}"
    );
}

proptest! {
    #[test]
    fn filter_matches_a_row_by_row_count(
        values in prop::collection::vec(prop::option::of(-50i64..50), 1..60),
        k in -50i64..50,
    ) {
        let lines: Vec<String> = values
            .iter()
            .map(|v| match v {
                Some(n) => format!(r#"{{"n":{n},"s":"x"}}"#),
                None => r#"{"s":"x"}"#.to_string(),
            })
            .collect();
        let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        let b = batch(&refs);
        prop_assume!(b.schema().field_with_name("n").is_ok());
        let f = Filter::compile(&format!("n > {k}"), &b.schema()).unwrap();
        let out = f.apply(&b).unwrap();
        let expected: Vec<i64> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some_and(|n| n > k))
            .map(|(i, _)| i as i64)
            .collect();
        prop_assert_eq!(offsets(&out), expected);
    }
}
