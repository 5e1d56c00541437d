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
        // Functions DataFusion only runs after rewriting them (coalesce, nvl -> CASE).
        ("fare_or_zero", "coalesce(fare, 0)"),
        ("city_or", "nvl(city, 'none')"),
    ]);
    let m = Map::compile(&fields, &b.schema()).unwrap();
    let out = m.apply(&b).unwrap();
    let schema = out.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["rider_id", "fare_eur", "kind", "fare_text", "gold", "fare_or_zero", "city_or"]);
    assert_eq!(out.column(5).as_primitive::<Int64Type>().values().to_vec(), vec![1250, 300, 0, 4000, 0]);
    let city = deltalake::arrow::compute::cast(out.column(6), &DataType::Utf8).unwrap();
    assert_eq!(city.as_string::<i32>().value(1), "none");
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

proptest! {
    /// A filter that keeps one kind of record (where the other kinds' columns are all NULL and
    /// are made fresh rather than copied) gives exactly what Arrow's own filter gives.
    #[test]
    fn filter_by_kind_equals_arrows_filter(kinds in prop::collection::vec(0u8..3, 1..80), pick in 0u8..4) {
        let lines: Vec<String> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| match k {
                0 => format!(r#"{{"kind":"a","n":{i},"tags":["x","y"]}}"#),
                1 => format!(r#"{{"kind":"b","amount":{{"value":{i}.5,"cur":"EUR"}},"checks":[{{"ok":true}}]}}"#),
                _ => format!(r#"{{"kind":"c","n":null,"s":"t{i}"}}"#),
            })
            .collect();
        let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        let b = batch(&refs);
        let want = ["a", "b", "c", "z"][pick as usize];
        let f = Filter::compile(&format!("kind = '{want}'"), &b.schema()).unwrap();
        let got = f.apply(&b).unwrap();
        let kind = b.column_by_name("kind").unwrap().as_string::<i32>();
        let mask: deltalake::arrow::array::BooleanArray = kind.iter().map(|k| Some(k == Some(want))).collect();
        let expected = deltalake::arrow::compute::filter_record_batch(&b, &mask).unwrap();
        prop_assert_eq!(got, expected);
    }
}

// ---- steps as the runtime runs them (sluice_pipeline::step) ----

use sluice_core::pipeline::{Fields, RouteConfig, StepConfig};
use sluice_pipeline::step::{Output, Step};

fn rows(out: Option<Output>) -> RecordBatch {
    match out {
        Some(Output::Rows(b)) => b,
        _ => panic!("expected rows"),
    }
}

fn names(b: &RecordBatch) -> Vec<String> {
    b.schema().fields().iter().map(|f| f.name().clone()).collect()
}

#[test]
fn a_failing_row_is_isolated_and_the_rest_goes_on() {
    let b = batch(&[
        r#"{"n":"1"}"#,
        r#"{"n":"x"}"#,
        r#"{"n":"3"}"#,
        r#"{"n":"y"}"#,
    ]);
    let cfg = StepConfig::Map(Fields(pairs(&[("v", "CAST(n AS INT) * 2")])));
    let mut step = Step::new(1, &cfg, &[], "event_date");
    let (out, failures) = step.apply(b);
    let out = rows(out);
    assert_eq!(offsets(&out), vec![0, 2]);
    assert_eq!(failures.iter().map(|f| f.row).collect::<Vec<_>>(), vec![1, 3]);
    assert!(failures[0].error.contains("map"), "{}", failures[0].error);
    assert_eq!(step.label, "1:map");
    assert_eq!(step.stats.failed.load(std::sync::atomic::Ordering::Relaxed), 2);
    let v = out.column_by_name("v").unwrap();
    assert_eq!(v.as_primitive::<Int64Type>().values().to_vec(), vec![2, 6]);
}

#[test]
fn a_field_no_record_has_yet_reads_null() {
    let b = rides();
    let mut f = Step::new(0, &StepConfig::Filter("coupon IS NULL AND kind = 'ride'".into()), &[], "event_date");
    let (out, failures) = f.apply(b.clone());
    assert!(failures.is_empty());
    assert_eq!(offsets(&rows(out)), vec![0, 1, 3, 4]);
    let mut m = Step::new(0, &StepConfig::Map(Fields(pairs(&[("c", "coupon")]))), &[], "event_date");
    let (out, failures) = m.apply(b);
    assert!(failures.is_empty());
    // The NULL-typed placeholder column is not passed on as data.
    let out = rows(out);
    assert_eq!(out.column_by_name("c").unwrap().data_type(), &DataType::Null);
    assert!(!names(&out).contains(&"coupon".to_string()));
}

#[test]
fn map_select_drop_keep_the_system_columns() {
    let b = rides();
    let map = StepConfig::Map(Fields(pairs(&[("fare", "fare / 100.0"), ("tier", "rider.tier")])));
    let out = rows(Step::new(0, &map, &[], "event_date").apply(b.clone()).0);
    assert_eq!(names(&out), ["kind", "fare", "rider", "city", "tier", "_partition", "_offset", "event_date"]);
    assert_eq!(out.column_by_name("fare").unwrap().data_type(), &DataType::Float64);
    let select = StepConfig::Select(Fields(pairs(&[("who", "rider.id")])));
    let out = rows(Step::new(0, &select, &[], "event_date").apply(b.clone()).0);
    assert_eq!(names(&out), ["who", "_partition", "_offset", "event_date"]);
    let drop = StepConfig::Drop(vec!["rider".into(), "city".into(), "_offset".into()]);
    let out = rows(Step::new(0, &drop, &[], "event_date").apply(b).0);
    assert_eq!(names(&out), ["kind", "fare", "_partition", "_offset", "event_date"]);
}

#[test]
fn route_sends_each_row_to_every_matching_sink() {
    let b = rides();
    let cfg = StepConfig::Route(vec![
        RouteConfig { to: "gold".into(), when: Some("rider.tier = 'gold'".into()) },
        RouteConfig { to: "big".into(), when: Some("fare > 1000".into()) },
        RouteConfig { to: "none".into(), when: Some("fare > 1000000".into()) },
    ]);
    let sinks = ["all".to_string(), "big".into(), "gold".into(), "none".into()];
    let mut step = Step::new(0, &cfg, &sinks, "event_date");
    let (out, failures) = step.apply(b);
    assert!(failures.is_empty());
    let Some(Output::Routed { sinks: r, taken }) = out else { panic!("expected routed rows") };
    // r0 went to two sinks and counts once.
    assert_eq!(taken, 3);
    let got: Vec<(usize, Vec<i64>)> = r.iter().map(|(s, b)| (*s, offsets(b))).collect();
    assert_eq!(got, vec![(2, vec![0, 3, 4]), (1, vec![0, 3])]);
    // r2 (basic, 300) and r3 (no tier) went nowhere.
    assert_eq!(step.stats.filtered.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(step.stats.records_out.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn a_route_that_fails_on_some_rows_counts_the_rest_once() {
    let b = batch(&[
        r#"{"n":"5"}"#,
        r#"{"n":"x"}"#,
        r#"{"n":"1"}"#,
        r#"{"n":"7"}"#,
    ]);
    let cfg = StepConfig::Route(vec![
        RouteConfig { to: "big".into(), when: Some("CAST(n AS INT) > 2".into()) },
        RouteConfig { to: "odd".into(), when: Some("CAST(n AS INT) % 2 = 1".into()) },
    ]);
    let sinks = ["big".to_string(), "odd".into()];
    let mut step = Step::new(0, &cfg, &sinks, "event_date");
    let (out, failures) = step.apply(b);
    assert_eq!(failures.iter().map(|f| f.row).collect::<Vec<_>>(), vec![1]);
    let Some(Output::Routed { sinks: r, taken }) = out else { panic!("expected routed rows") };
    let got: Vec<(usize, Vec<i64>)> = r.iter().map(|(s, b)| (*s, offsets(b))).collect();
    assert_eq!(got, vec![(0, vec![0, 3]), (1, vec![0, 2, 3])]);
    assert_eq!(taken, 3);
    let stat = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((stat(&step.stats.records_out), stat(&step.stats.failed), stat(&step.stats.filtered)), (3, 1, 0));
}

#[test]
fn a_step_that_cannot_compile_fails_every_row() {
    let b = rides();
    let mut f = Step::new(0, &StepConfig::Filter("rider.nope = 1".into()), &[], "event_date");
    let (out, failures) = f.apply(b);
    assert!(out.is_none());
    assert_eq!(failures.len(), 5);
    assert!(failures[0].error.contains("nope"), "{}", failures[0].error);
}

#[test]
fn syntax_and_referenced_fields() {
    use sluice_pipeline::check::{parse_expr, referenced_fields};
    assert!(parse_expr("a = 1 AND").is_err());
    let e = parse_expr("a 1").unwrap_err();
    assert!(e.contains("unexpected"), "{e}");
    let e = parse_expr(r#"Kind = 'x' AND rider.tier = 'g' AND "Big" > 1 AND lower(c['d']) = 'e'"#).unwrap();
    assert_eq!(referenced_fields(&e), ["kind", "rider", "Big", "c"]);
}

#[test]
fn dedup_keeps_first_sightings_across_restarts_and_reruns() {
    use sluice_core::pipeline::DedupConfig;
    let dir = tempfile::tempdir().unwrap();
    let cfg = StepConfig::Dedup(DedupConfig { key: "id".into(), window: std::time::Duration::from_secs(3600), max_keys: 1000 });
    let step = |dir: &std::path::Path| {
        let mut s = Step::new(1, &cfg, &[], "event_date");
        s.set_state_dir(dir);
        s
    };
    let b = batch(&[r#"{"id":"a"}"#, r#"{"id":"b"}"#, r#"{"id":"a"}"#, r#"{"x":1}"#, r#"{"id":"c"}"#, r#"{"id":"b"}"#]);
    let mut s1 = step(dir.path());
    let (out, failures) = s1.apply(b.clone());
    assert!(failures.is_empty() && s1.take_fatal().is_none());
    // The first a, b, c pass; the record without an id passes.
    assert_eq!(offsets(&rows(out)), vec![0, 1, 3, 4]);
    assert_eq!(s1.stats.filtered.load(std::sync::atomic::Ordering::Relaxed), 2);
    // A restart (new step, same state) re-running the same flush decides the same way.
    let mut s2 = step(dir.path());
    assert_eq!(offsets(&rows(s2.apply(b.clone()).0)), vec![0, 1, 3, 4]);
    // Other records (other offsets) with those ids are duplicates; new ids pass.
    let later = batch(&[r#"{"id":"x0"}"#, r#"{"id":"x1"}"#, r#"{"id":"x2"}"#, r#"{"id":"x3"}"#, r#"{"id":"x4"}"#, r#"{"id":"x5"}"#, r#"{"id":"a"}"#, r#"{"id":"d"}"#]);
    assert_eq!(offsets(&rows(s2.apply(later).0)), vec![0, 1, 2, 3, 4, 5, 7]);
    // The same records from another source stream are other records.
    s2.set_source(1);
    assert_eq!(offsets(&rows(s2.apply(b).0)), vec![3]);
    // A torn journal tail is cut off, not misread.
    let journal = dir.path().join("dedup-1.journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    assert_eq!(len % 40, 0);
    std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&journal).unwrap(), &[7u8; 13]).unwrap();
    let mut s3 = step(dir.path());
    assert_eq!(offsets(&rows(s3.apply(batch(&[r#"{"id":"d"}"#, r#"{"id":"e"}"#])).0)), vec![1]);
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), len + 40);
}

#[test]
fn dedup_window_expires_keys() {
    use sluice_core::pipeline::DedupConfig;
    // A window long enough that the first two applies always fall inside it, even on a slow
    // machine; the sleep is longer than the window, so the last apply is always outside it.
    let cfg = StepConfig::Dedup(DedupConfig { key: "lower(id)".into(), window: std::time::Duration::from_millis(800), max_keys: 1000 });
    let mut s = Step::new(0, &cfg, &[], "event_date");
    let b = batch(&[r#"{"id":"A"}"#, r#"{"id":"a"}"#]);
    assert_eq!(offsets(&rows(s.apply(b).0)), vec![0]);
    let b2 = batch(&[r#"{"id":"x"}"#, r#"{"id":"a"}"#]);
    assert_eq!(offsets(&rows(s.apply(b2.clone()).0)), vec![0]);
    std::thread::sleep(std::time::Duration::from_millis(900));
    // Past the window "a" is new again.
    assert_eq!(offsets(&rows(s.apply(b2).0)), vec![0, 1]);
}

#[test]
fn validate_checks_a_declared_schema_and_names_path_rule_and_value() {
    use sluice_core::pipeline::{FieldRule, Scalar, ValidateConfig};
    let b = batch(&[
        r#"{"id":"a1","amount":5,"currency":"EUR","email":"x@y.z","user":{"age":30},"tags":["a"]}"#,
        r#"{"amount":5,"currency":"EUR"}"#,
        r#"{"id":"a3","amount":-5,"currency":"EUR"}"#,
        r#"{"id":"a4","amount":5,"currency":"GBP"}"#,
        r#"{"id":"a5","amount":5,"currency":"EUR","email":"nope"}"#,
        r#"{"id":"a6","amount":5,"currency":"EUR","user":{"age":300}}"#,
        r#"{"id":"a7","amount":5,"currency":"EUR","tags":["a","b","c"]}"#,
        r#"{"id":"a8"}"#,
    ]);
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("amount".into(), FieldRule { kind: Some("number".into()), minimum: Some(0.0), ..Default::default() });
    fields.insert("currency".into(), FieldRule { one_of: Some(vec![Scalar::Text("EUR".into()), Scalar::Text("USD".into())]), ..Default::default() });
    fields.insert("email".into(), FieldRule { kind: Some("string".into()), pattern: Some("^[^@]+@[^@]+$".into()), ..Default::default() });
    fields.insert("user.age".into(), FieldRule { kind: Some("integer".into()), maximum: Some(150.0), ..Default::default() });
    fields.insert("tags".into(), FieldRule { kind: Some("array".into()), max_length: Some(2), ..Default::default() });
    fields.insert("id".into(), FieldRule { kind: Some("integer".into()), ..Default::default() });
    let cfg = StepConfig::Validate(ValidateConfig { required: vec!["id".into(), "amount".into()], fields: fields.clone(), json_schema: None });
    let mut s = Step::new(0, &cfg, &[], "event_date");
    let (out, failures) = s.apply(b.clone());
    // `id` is a string in these records, so "type integer" fails every record that has one.
    let errors: Vec<(usize, String)> = failures.iter().map(|f| (f.row, f.error.clone())).collect();
    assert_eq!(errors[0], (0, "id: must be integer, the records have Utf8 (got a1)".to_string()), "{errors:?}");
    // Row 1 has no id (required); every other row has a string id.
    assert_eq!(errors[1], (1, "id: is required".to_string()), "{errors:?}");
    assert_eq!(errors.len(), 8, "{errors:?}");
    assert_eq!(rows(out).num_rows(), 0);

    fields.insert("id".into(), FieldRule { kind: Some("string".into()), min_length: Some(2), ..Default::default() });
    let cfg = StepConfig::Validate(ValidateConfig { required: vec!["id".into(), "amount".into()], fields, json_schema: None });
    let mut s = Step::new(0, &cfg, &[], "event_date");
    let (out, failures) = s.apply(b.clone());
    assert_eq!(offsets(&rows(out)), vec![0]);
    let errors: Vec<(usize, String)> = failures.iter().map(|f| (f.row, f.error.clone())).collect();
    assert_eq!(
        errors,
        vec![
            (1, "id: is required".to_string()),
            (2, "amount: must be >= 0 (got -5)".to_string()),
            (3, "currency: must be one of EUR, USD (got GBP)".to_string()),
            (4, "email: must match ^[^@]+@[^@]+$ (got nope)".to_string()),
            (5, "user.age: must be <= 150 (got 300)".to_string()),
            (6, "tags: must have length <= 2 (got [a, b, c])".to_string()),
            (7, "amount: is required".to_string()),
        ]
    );
    assert_eq!(s.stats.failed.load(std::sync::atomic::Ordering::Relaxed), 7);

    // The same rules as a JSON Schema give the same verdicts.
    let schema: serde_json::Value = serde_json::from_str(
        r#"{
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["id", "amount"],
            "properties": {
                "id": {"type": "string", "minLength": 2},
                "amount": {"type": "number", "minimum": 0},
                "currency": {"enum": ["EUR", "USD"]},
                "email": {"type": ["string", "null"], "pattern": "^[^@]+@[^@]+$", "format": "email"},
                "user": {"type": "object", "properties": {"age": {"type": "integer", "maximum": 150}}},
                "tags": {"type": "array", "maxItems": 2}
            }
        }"#,
    )
    .unwrap();
    let cfg = StepConfig::Validate(ValidateConfig { required: Vec::new(), fields: Default::default(), json_schema: Some(schema) });
    let mut s = Step::new(0, &cfg, &[], "event_date");
    let (out, failures) = s.apply(b);
    assert_eq!(offsets(&rows(out)), vec![0]);
    let from_schema: Vec<(usize, String)> = failures.iter().map(|f| (f.row, f.error.clone())).collect();
    assert_eq!(from_schema, errors);
}

#[test]
fn json_schema_keywords_that_cannot_be_checked_are_refused_by_name() {
    use sluice_core::pipeline::ValidateConfig;
    for (schema, words) in [
        (r#"{"properties": {"a": {"exclusiveMinimum": 0}}}"#, "`a`: JSON Schema keyword `exclusiveMinimum` is not supported"),
        (r#"{"additionalProperties": false, "properties": {}}"#, "keyword `additionalProperties`"),
        (r#"{"properties": {"a": {"type": ["string", "integer"]}}}"#, "`a`: type"),
        (r#"{"required": "a"}"#, "required must be a list"),
    ] {
        let v = ValidateConfig { required: Vec::new(), fields: Default::default(), json_schema: Some(serde_json::from_str(schema).unwrap()) };
        let err = v.merged().unwrap_err();
        assert!(err.contains(words), "{schema}: {err}");
    }
    // Nested `required` applies only under a required parent.
    let v = ValidateConfig {
        required: Vec::new(),
        fields: Default::default(),
        json_schema: Some(
            serde_json::from_str(r#"{"required": ["a"], "properties": {"a": {"required": ["x"]}, "b": {"required": ["y"]}}}"#).unwrap(),
        ),
    };
    assert_eq!(v.merged().unwrap().required, vec!["a".to_string(), "a.x".to_string()]);
}
