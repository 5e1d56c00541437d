//! Property tests of `sluice_lake::convert`: for random flat and nested objects, every
//! accepted record reads back from the Arrow arrays exactly as its JSON (ints as floats where
//! the column is Float64), every record is either a row or a reject, and nothing panics.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use sluice_lake::convert::{convert, convert_parallel, convert_two_pass, group_by_kind, ConvertOptions, Converted, InputRecord, MAX_KINDS};

// ---------- generators ----------

fn key() -> impl Strategy<Value = String> {
    // Few names, so that fields collide across records (and sometimes in letter case).
    prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "c", "d", "e", "ü", "x_1"]).prop_map(String::from),
        1 => prop::sample::select(vec!["A", "with space", "é\"q"]).prop_map(String::from),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        (-1000i32..1000).prop_map(|i| i as f64 / 8.0),
        Just(-0.0),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        2 => any::<bool>().prop_map(Value::Bool),
        3 => any::<i64>().prop_map(Value::from),
        1 => (i64::MAX as u64..=u64::MAX).prop_map(Value::from),
        3 => float().prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        3 => "[a-z\\\\\"\\n\u{e9}\u{1F600}]{0,6}".prop_map(Value::String),
    ]
}

/// Any JSON value: types vary freely, so many records conflict.
fn any_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Values whose type is decided by the key (with nulls, missing fields, empty containers
/// and int/float mixing): most records are accepted, the schema evolves.
fn typed_value(k: &str) -> BoxedStrategy<Value> {
    let null = Just(Value::Null);
    match k {
        "a" => prop_oneof![1 => null, 4 => any::<i64>().prop_map(Value::from)].boxed(),
        "b" => prop_oneof![
            1 => null,
            2 => any::<i64>().prop_map(Value::from),
            2 => float().prop_map(|f| Value::Number(Number::from_f64(f).unwrap()))
        ]
        .boxed(),
        "c" => prop_oneof![1 => null, 4 => "\\PC{0,8}".prop_map(Value::String)].boxed(),
        "d" => prop::collection::vec(
            prop_oneof![
                Just(("x".to_string(), Value::Null)),
                any::<bool>().prop_map(|b| ("x".to_string(), Value::Bool(b))),
                "[a-z]{0,3}".prop_map(|s| ("y".to_string(), Value::String(s))),
                prop::collection::vec(any::<i32>().prop_map(Value::from), 0..3)
                    .prop_map(|v| ("z".to_string(), Value::Array(v))),
            ],
            0..3,
        )
        .prop_map(|kv| {
            let mut m = Map::new();
            for (k, v) in kv {
                m.entry(k).or_insert(v);
            }
            Value::Object(m)
        })
        .boxed(),
        _ => prop_oneof![
            1 => null,
            3 => prop::collection::vec(
                prop_oneof![
                    Just(Value::Null),
                    (any::<i32>(), prop::option::of(any::<bool>())).prop_map(|(i, b)| {
                        let mut m = Map::new();
                        m.insert("n".into(), Value::from(i));
                        if let Some(b) = b {
                            m.insert("p".into(), Value::Bool(b));
                        }
                        Value::Object(m)
                    }),
                ],
                0..3
            )
            .prop_map(Value::Array)
        ]
        .boxed(),
    }
}

fn typed_record() -> impl Strategy<Value = Value> {
    prop::sample::subsequence(vec!["a", "b", "c", "d", "e"], 0..=5)
        .prop_flat_map(|keys| {
            keys.into_iter()
                .map(|k| typed_value(k).prop_map(move |v| (k.to_string(), v)))
                .collect::<Vec<_>>()
        })
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

fn any_record() -> impl Strategy<Value = Value> {
    prop::collection::vec((key(), any_value()), 0..6)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

// ---------- oracle ----------

/// True if the value carries a type (a non-null leaf somewhere), i.e. would create a column.
fn typed(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Array(a) => a.iter().any(typed),
        Value::Object(o) => o.values().any(typed),
        _ => true,
    }
}

/// Checks that `arr[row]` holds exactly `v` (missing == null).
fn matches(arr: &ArrayRef, row: usize, v: Option<&Value>, path: &str) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{path}: {what} (json {v:?})"));
    let v = match v {
        None | Some(Value::Null) => {
            return if arr.is_null(row) {
                Ok(())
            } else {
                fail("expected null")
            };
        }
        Some(v) => v,
    };
    // Values without type information fit any column: null where the kind differs.
    let kind_differs = match v {
        Value::Array(_) => !matches!(arr.data_type(), DataType::List(_)),
        Value::Object(_) => !matches!(arr.data_type(), DataType::Struct(_)),
        _ => false,
    };
    if !typed(v) && kind_differs {
        return if arr.is_null(row) {
            Ok(())
        } else {
            fail("expected null for an untyped value")
        };
    }
    if arr.is_null(row) {
        return fail("unexpected null");
    }
    match (arr.data_type(), v) {
        (DataType::Boolean, Value::Bool(b)) => {
            if arr.as_boolean().value(row) == *b {
                Ok(())
            } else {
                fail("bool differs")
            }
        }
        (DataType::Int64, Value::Number(n)) => match n.as_i64() {
            Some(i) if n.is_i64() && arr.as_primitive::<Int64Type>().value(row) == i => Ok(()),
            _ => fail("int differs"),
        },
        (DataType::Float64, Value::Number(n)) => {
            let want = n.as_f64().unwrap();
            let got = arr.as_primitive::<Float64Type>().value(row);
            if got.to_bits() == want.to_bits() || (got == want && !n.is_f64()) {
                Ok(())
            } else {
                fail(&format!("float differs: got {got:?}"))
            }
        }
        (DataType::Utf8, Value::String(s)) => {
            if arr.as_string::<i32>().value(row) == s {
                Ok(())
            } else {
                fail("string differs")
            }
        }
        (DataType::List(_), Value::Array(items)) => {
            let l = arr.as_list::<i32>();
            let vals = l.value(row);
            if vals.len() != items.len() {
                return fail("list length differs");
            }
            for (i, item) in items.iter().enumerate() {
                matches(&vals, i, Some(item), &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (DataType::Struct(fields), Value::Object(o)) => {
            let s = arr.as_struct();
            for (k, val) in o {
                if typed(val) && fields.find(k).is_none() {
                    return fail(&format!("field {k} lost"));
                }
            }
            for (i, f) in fields.iter().enumerate() {
                matches(
                    s.column(i),
                    row,
                    o.get(f.name()),
                    &format!("{path}.{}", f.name()),
                )?;
            }
            Ok(())
        }
        (dt, _) => fail(&format!("column type {dt} does not hold this value")),
    }
}

fn check_row(batch: &RecordBatch, row: usize, rec: &Value) -> Result<(), String> {
    let o = rec.as_object().unwrap();
    let schema = batch.schema();
    for (k, v) in o {
        if typed(v) && schema.field_with_name(k).is_err() {
            return Err(format!("field {k} lost"));
        }
    }
    for (i, f) in schema.fields().iter().enumerate() {
        if ["_partition", "_offset", "event_date"].contains(&f.name().as_str()) {
            continue;
        }
        matches(batch.column(i), row, o.get(f.name()), f.name())?;
    }
    Ok(())
}

/// All rows of a conversion as one batch (`None` without rows).
fn all_rows(c: &Converted) -> Option<RecordBatch> {
    if c.batches.is_empty() {
        None
    } else {
        Some(deltalake::arrow::compute::concat_batches(&c.schema, &c.batches).unwrap())
    }
}

fn run(
    records: &[Value],
    table: Option<&arrow_schema::Schema>,
) -> Result<Converted, TestCaseError> {
    let texts: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let inputs: Vec<InputRecord> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| InputRecord {
            partition: 0,
            offset: i as u64,
            timestamp_ms: 0,
            value: t.as_bytes(),
        })
        .collect();
    let c = convert(table, &inputs, &ConvertOptions::default());
    prop_assert_eq!(c.num_rows() + c.rejects.len(), records.len());
    // Accepted records, in order, are the ones not rejected; each row matches its record.
    let rejected: Vec<u64> = c.rejects.iter().map(|r| r.offset).collect();
    for r in &c.rejects {
        prop_assert_eq!(&r.raw, &texts[r.offset as usize]);
        prop_assert!(r.reason.starts_with("field \""), "reason: {}", r.reason);
    }
    let mut accepted = (0..records.len()).filter(|i| !rejected.contains(&(*i as u64)));
    for b in &c.batches {
        prop_assert_eq!(b.schema(), c.schema.clone());
        let offsets = b
            .column_by_name("_offset")
            .unwrap()
            .as_primitive::<Int64Type>();
        for row in 0..b.num_rows() {
            let i = accepted.next().unwrap();
            prop_assert_eq!(offsets.value(row), i as i64);
            if let Err(e) = check_row(b, row, &records[i]) {
                return Err(TestCaseError::fail(format!("record {}: {e}", texts[i])));
            }
        }
    }
    prop_assert!(accepted.next().is_none());
    Ok(c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_records_round_trip(records in prop::collection::vec(any_record(), 1..12)) {
        run(&records, None)?;
    }

    #[test]
    fn typed_records_round_trip_and_evolve(
        first in prop::collection::vec(typed_record(), 1..10),
        second in prop::collection::vec(typed_record(), 1..10),
    ) {
        let c1 = run(&first, None)?;
        // Typed records never conflict: all are accepted, alone and against the first schema.
        prop_assert!(c1.rejects.is_empty(), "{:?}", c1.rejects);
        let c2 = run(&second, Some(&c1.schema))?;
        prop_assert!(c2.rejects.is_empty(), "{:?}", c2.rejects);
        // Existing columns keep their place; only "b" can be widened.
        let n1 = c1.schema.fields().len() - 3;
        for (f1, f2) in c1.schema.fields()[..n1].iter().zip(c2.schema.fields().iter()) {
            prop_assert_eq!(f1.name(), f2.name());
        }
        for w in &c2.widened {
            prop_assert_eq!(w.as_str(), "b");
            prop_assert_eq!(c1.schema.field_with_name("b").unwrap().data_type(), &DataType::Int64);
        }
    }

    #[test]
    fn parallel_conversion_equals_sequential(
        first in prop::collection::vec(typed_record(), 1..10),
        second in prop::collection::vec(any_record(), 1..16),
        threads in 2usize..4,
        widen_to_text in any::<bool>(),
    ) {
        let opts = ConvertOptions { widen_to_text, ..Default::default() };
        // Against no table and against a known one; records that fit the table (chunks
        // merged), typed and arbitrary records (chunks evolve differently: the fallback).
        let c1 = run(&first, None)?;
        let cases = [
            (&first, Some(c1.schema.as_ref())),
            (&first, None),
            (&second, None),
            (&second, Some(c1.schema.as_ref())),
        ];
        for (records, table) in cases {
            let texts: Vec<String> = records.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
            let inputs: Vec<InputRecord> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: t.as_bytes() })
                .collect();
            let seq = convert(table, &inputs, &opts);
            let par = convert_parallel(table, &inputs, &opts, threads);
            prop_assert_eq!(&par.schema, &seq.schema);
            prop_assert_eq!(&par.rejects, &seq.rejects);
            let mut w1 = par.widened.clone();
            let mut w2 = seq.widened.clone();
            w1.sort();
            w2.sort();
            prop_assert_eq!(w1, w2);
            prop_assert_eq!(all_rows(&par), all_rows(&seq));
        }
    }

    #[test]
    fn one_pass_equals_two_pass(
        first in prop::collection::vec(typed_record(), 1..12),
        second in prop::collection::vec(any_record(), 1..12),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        widen_to_text in any::<bool>(),
    ) {
        let opts = ConvertOptions { widen_to_text, ..Default::default() };
        // The one-pass decoder runs where records fit the schema they start from (a known
        // table, typed records); elsewhere `convert` falls back. Either way it must equal
        // the two-pass path, rejects (mangled records) included.
        let c1 = run(&first, None)?;
        let mut texts: Vec<Vec<u8>> = first.iter().chain(&second).map(|r| serde_json::to_vec(r).unwrap()).collect();
        for (t, (at, byte)) in texts.iter_mut().zip(cuts) {
            let i = at.index(t.len());
            let chars = b"{}[],:\"\\ 0e-.n";
            t[i] = chars[byte as usize % chars.len()];
        }
        let sets: [&[Vec<u8>]; 2] = [&texts[..first.len()], &texts];
        for records in sets {
            for table in [Some(c1.schema.as_ref()), None] {
                let inputs: Vec<InputRecord> = records
                    .iter()
                    .enumerate()
                    .map(|(i, t)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: t })
                    .collect();
                let one = convert(table, &inputs, &opts);
                let two = convert_two_pass(table, &inputs, &opts);
                prop_assert_eq!(&one.schema, &two.schema);
                prop_assert_eq!(&one.rejects, &two.rejects);
                prop_assert_eq!(&one.widened, &two.widened);
                prop_assert_eq!(all_rows(&one), all_rows(&two));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8)) {
        let inputs: Vec<InputRecord> = values
            .iter()
            .enumerate()
            .map(|(i, v)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: v })
            .collect();
        let c = convert(None, &inputs, &ConvertOptions::default());
        prop_assert_eq!(c.num_rows() + c.rejects.len(), values.len());
    }

    #[test]
    fn mangled_json_never_panics(
        records in prop::collection::vec(any_record(), 1..6),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let mut texts: Vec<Vec<u8>> = records.iter().map(|r| serde_json::to_vec(r).unwrap()).collect();
        for (t, (at, byte)) in texts.iter_mut().zip(cuts) {
            let i = at.index(t.len());
            let chars = b"{}[],:\"\\ 0e-.n";
            t[i] = chars[byte as usize % chars.len()];
        }
        let inputs: Vec<InputRecord> = texts
            .iter()
            .enumerate()
            .map(|(i, v)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: v })
            .collect();
        let c = convert(None, &inputs, &ConvertOptions::default());
        prop_assert_eq!(c.num_rows() + c.rejects.len(), texts.len());
    }

    /// Grouping is a stable permutation: every record once, each kind's records adjacent
    /// and in their old order; with more than MAX_KINDS kinds nothing moves.
    #[test]
    fn grouping_by_kind_is_a_stable_permutation(
        picks in prop::collection::vec((0usize..24, prop::sample::select(vec!["", " ", r"\\", r#"x\"y"#])), 0..60),
        kinds in 1usize..24,
    ) {
        let texts: Vec<String> = picks
            .iter()
            .map(|(k, odd)| match k % 4 {
                0 => format!("{{\"n\":{}}}", k % kinds),
                1 => format!("{{\"t\":\"k{}{odd}\",\"x\":1}}", k % kinds),
                _ => format!("{{\"t\":\"k{}\"}}", k % kinds),
            })
            .collect();
        let inputs: Vec<InputRecord> = texts
            .iter()
            .enumerate()
            .map(|(i, v)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: v.as_bytes() })
            .collect();
        let mut grouped = inputs.clone();
        group_by_kind(&mut grouped);
        let kind = |r: &InputRecord| {
            let v: serde_json::Value = serde_json::from_slice(r.value).unwrap();
            match v.get("t") {
                Some(t) if !t.as_str().unwrap().contains(['\\', '"']) => Some(t.as_str().unwrap().to_string()),
                _ => None,
            }
        };
        let mut offsets: Vec<u64> = grouped.iter().map(|r| r.offset).collect();
        offsets.sort();
        prop_assert_eq!(offsets, (0..inputs.len() as u64).collect::<Vec<_>>());
        let mut distinct: Vec<Option<String>> = inputs.iter().map(kind).collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > MAX_KINDS {
            prop_assert!(grouped.iter().zip(&inputs).all(|(a, b)| a.offset == b.offset));
        } else {
            // Kinds are contiguous runs, in order of first appearance, records in log order.
            let mut runs: Vec<Option<String>> = Vec::new();
            for (i, r) in grouped.iter().enumerate() {
                let k = kind(r);
                if i == 0 || kind(&grouped[i - 1]) != k {
                    prop_assert!(!runs.contains(&k), "kind {:?} split", k);
                    runs.push(k);
                } else {
                    prop_assert!(grouped[i - 1].offset < r.offset);
                }
            }
            let mut first: Vec<Option<String>> = Vec::new();
            for r in &inputs {
                if !first.contains(&kind(r)) {
                    first.push(kind(r));
                }
            }
            prop_assert_eq!(runs, first);
        }
    }
}
