//! `enrich` against a real HTTP server on loopback that answers, fails with 500s and 400s,
//! times out, says 404, answers non-JSON, or drops the connection.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::Int64Type;
use sluice_core::pipeline::{EnrichConfig, OnError, StepConfig};
use sluice_lake::convert::{convert, ConvertOptions, InputRecord};
use sluice_pipeline::step::{Failure, Output, Step};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Service {
    calls: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    latency_ms: AtomicUsize,
}

async fn user(State(s): State<Arc<Service>>, Path(id): Path<String>) -> axum::response::Response {
    let n = {
        let mut c = s.calls.lock().unwrap();
        let n = c.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let latency = s.latency_ms.load(Ordering::Relaxed) as u64;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let r = match id.as_str() {
        "missing" => (StatusCode::NOT_FOUND, "no such user").into_response(),
        "bad" => (StatusCode::BAD_REQUEST, "bad id").into_response(),
        "notjson" => "hello".into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "{}".into_response()
        }
        f if f.starts_with("flaky") && n <= 2 => (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response(),
        _ => {
            let num: i64 = id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
            format!(r#"{{"name":"user-{id}","score":{num},"flags":{{"vip":{}}}}}"#, num % 2 == 0).into_response()
        }
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    r
}

async fn start() -> (String, Arc<Service>) {
    let svc = Arc::new(Service::default());
    let app = axum::Router::new().route("/users/{id}", get(user)).with_state(svc.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), svc)
}

/// A server that accepts connections, reads a little and closes them without answering.
async fn start_resetting() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 64];
                let _ = sock.read(&mut buf).await;
                drop(sock);
            });
        }
    });
    (format!("http://{addr}"), accepted)
}

fn cfg(url: String) -> EnrichConfig {
    EnrichConfig {
        url,
        ca_file: None,
        method: "GET".into(),
        body: None,
        headers: Default::default(),
        into: "user".into(),
        concurrency: 8,
        timeout: Duration::from_millis(300),
        retries: 3,
        backoff: Duration::from_millis(5),
        cache_ttl: Duration::from_secs(60),
        cache_entries: 1000,
        on_error: OnError::DeadLetter,
        batch_size: 1,
    }
}

fn batch(ids: &[Option<&str>]) -> RecordBatch {
    let lines: Vec<String> = ids
        .iter()
        .map(|id| match id {
            Some(id) => format!(r#"{{"user_id":"{id}","n":1}}"#),
            None => r#"{"n":1}"#.to_string(),
        })
        .collect();
    let inputs: Vec<InputRecord> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| InputRecord { partition: 0, offset: i as u64, timestamp_ms: 0, value: l.as_bytes() })
        .collect();
    let c = convert(None, &inputs, &ConvertOptions::default());
    concat_batches(&c.schema, &c.batches).unwrap()
}

/// Runs the step where the pipeline runs it: on a blocking thread of the runtime.
async fn apply(step: Step, b: RecordBatch) -> (Step, Option<RecordBatch>, Vec<Failure>) {
    tokio::task::spawn_blocking(move || {
        let mut step = step;
        let (out, failures) = step.apply(b);
        let out = out.map(|o| match o {
            Output::Rows(b) => b,
            Output::Routed { .. } => panic!("enrich does not route"),
        });
        (step, out, failures)
    })
    .await
    .unwrap()
}

fn calls(s: &Service, id: &str) -> usize {
    s.calls.lock().unwrap().get(id).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_merged_as_a_struct_and_cached() {
    let (base, svc) = start().await;
    let step = Step::new(0, &StepConfig::Enrich(Box::new(cfg(format!("{base}/users/${{user_id}}")))), &[], "event_date");
    let (step, out, failures) = apply(step, batch(&[Some("u1"), Some("u2"), Some("u1"), None, Some("u3")])).await;
    assert!(failures.is_empty(), "{:?}", failures.iter().map(|f| &f.error).collect::<Vec<_>>());
    let out = out.unwrap();
    assert_eq!(out.num_rows(), 5);
    let user = out.column_by_name("user").unwrap().as_struct();
    assert!(user.is_valid(0) && user.is_valid(2) && user.is_null(3));
    let name = user.column_by_name("name").unwrap().as_string::<i32>();
    assert_eq!(name.value(1), "user-u2");
    assert_eq!(user.column_by_name("score").unwrap().as_primitive::<Int64Type>().value(4), 3);
    let vip = user.column_by_name("flags").unwrap().as_struct().column_by_name("vip").unwrap().as_boolean().clone();
    assert!(vip.value(1) && !vip.value(0));
    // The system columns stay last.
    let names: Vec<String> = out.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["user_id", "n", "user", "_partition", "_offset", "event_date"]);
    // One call per distinct request; the repeat in the batch and the next batch hit the cache.
    assert_eq!((calls(&svc, "u1"), calls(&svc, "u2"), calls(&svc, "u3")), (1, 1, 1));
    let (step, _, _) = apply(step, batch(&[Some("u1"), Some("u2"), Some("u4")])).await;
    assert_eq!((calls(&svc, "u1"), calls(&svc, "u4")), (1, 1));
    assert_eq!(step.stats.cache_misses.load(Ordering::Relaxed), 4);
    assert_eq!(step.stats.cache_hits.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_and_errors_end_as_dead_letters() {
    let (base, svc) = start().await;
    let step = Step::new(2, &StepConfig::Enrich(Box::new(cfg(format!("{base}/users/${{user_id}}")))), &[], "event_date");
    let ids = [Some("flaky1"), Some("bad"), Some("slow"), Some("missing"), Some("notjson"), Some("u7")];
    let (_, out, failures) = apply(step, batch(&ids)).await;
    let out = out.unwrap();
    // flaky1 answered on its third call, missing is NULL (404), u7 answered.
    let offsets: Vec<i64> = out.column_by_name("_offset").unwrap().as_primitive::<Int64Type>().values().to_vec();
    assert_eq!(offsets, vec![0, 3, 5]);
    assert_eq!(calls(&svc, "flaky1"), 3);
    let user = out.column_by_name("user").unwrap().as_struct();
    assert!(user.is_valid(0) && user.is_null(1) && user.is_valid(2));
    let by_row: HashMap<usize, &str> = failures.iter().map(|f| (f.row, f.error.as_str())).collect();
    assert_eq!(by_row.len(), 3, "{by_row:?}");
    assert!(by_row[&1].contains("HTTP 400"), "{}", by_row[&1]);
    assert_eq!(calls(&svc, "bad"), 1, "a 400 is not retried");
    assert!(by_row[&2].contains("timed out") && by_row[&2].contains("after 4 attempts"), "{}", by_row[&2]);
    assert!(by_row[&4].contains("does not fit"), "{}", by_row[&4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_null_keeps_the_record() {
    let (base, _svc) = start().await;
    let mut c = cfg(format!("{base}/users/${{user_id}}"));
    c.on_error = OnError::Null;
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c)), &[], "event_date");
    let (_, out, failures) = apply(step, batch(&[Some("bad"), Some("u2")])).await;
    assert!(failures.is_empty());
    let out = out.unwrap();
    let user = out.column_by_name("user").unwrap().as_struct();
    assert!(user.is_null(0) && user.is_valid(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let (base, svc) = start().await;
    svc.latency_ms.store(30, Ordering::Relaxed);
    let mut c = cfg(format!("{base}/users/${{user_id}}"));
    c.concurrency = 4;
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c)), &[], "event_date");
    let ids: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let ids: Vec<Option<&str>> = ids.iter().map(|s| Some(s.as_str())).collect();
    let (_, out, failures) = apply(step, batch(&ids)).await;
    assert!(failures.is_empty());
    assert_eq!(out.unwrap().num_rows(), 40);
    let max = svc.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=4).contains(&max), "max in flight {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_then_dead_lettered() {
    let (base, accepted) = start_resetting().await;
    let step = Step::new(0, &StepConfig::Enrich(Box::new(cfg(format!("{base}/users/${{user_id}}")))), &[], "event_date");
    let (_, out, failures) = apply(step, batch(&[Some("u1")])).await;
    assert_eq!(out.map_or(0, |b| b.num_rows()), 0);
    assert_eq!(failures.len(), 1);
    assert!(failures[0].error.contains("after 4 attempts"), "{}", failures[0].error);
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_body_is_templated_with_json_escaping() {
    // An echo service: answers with the body it got.
    let app = axum::Router::new().route("/echo", axum::routing::post(|body: String| async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut c = cfg(format!("http://{addr}/echo"));
    c.method = "POST".into();
    c.body = Some(r#"{"id": "${user_id}", "n": ${n + 1}}"#.into());
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c)), &[], "event_date");
    let (_, out, failures) = apply(step, batch(&[Some(r#"a\"b"#)])).await;
    assert!(failures.is_empty(), "{:?}", failures.iter().map(|f| &f.error).collect::<Vec<_>>());
    let out = out.unwrap();
    let user = out.column_by_name("user").unwrap().as_struct();
    assert_eq!(user.column_by_name("id").unwrap().as_string::<i32>().value(0), "a\"b");
    assert_eq!(user.column_by_name("n").unwrap().as_primitive::<Int64Type>().value(0), 2);
}

/// A batch service: a POST of a JSON array of `{"id": ...}` answers an array of users in the
/// same order (`null` for id "missing"); id "short" makes it answer one item too few.
async fn start_batch_service() -> (String, Arc<Mutex<Vec<usize>>>) {
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen = sizes.clone();
    let app = axum::Router::new().route(
        "/users:batch",
        axum::routing::post(move |body: String| {
            let seen = seen.clone();
            async move {
                let items: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
                seen.lock().unwrap().push(items.len());
                let mut out: Vec<serde_json::Value> = items
                    .iter()
                    .map(|i| match i["id"].as_str().unwrap() {
                        "missing" => serde_json::Value::Null,
                        id => serde_json::json!({"name": format!("user-{id}")}),
                    })
                    .collect();
                if items.iter().any(|i| i["id"] == "short") {
                    out.pop();
                }
                serde_json::Value::Array(out).to_string()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), sizes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_carry_many_records_and_answers_map_back_in_order() {
    let (base, sizes) = start_batch_service().await;
    let mut c = cfg(format!("{base}/users:batch"));
    c.method = "POST".into();
    c.body = Some(r#"{"id": "${user_id}"}"#.into());
    c.batch_size = 4;
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c.clone())), &[], "event_date");
    let ids: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let mut rows: Vec<Option<&str>> = ids.iter().map(|s| Some(s.as_str())).collect();
    rows.push(Some("missing"));
    rows.push(Some("u3")); // the same request as row 3: shares its answer
    rows.push(None); // no request at all
    let (step, out, failures) = apply(step, batch(&rows)).await;
    assert!(failures.is_empty(), "{:?}", failures.iter().map(|f| &f.error).collect::<Vec<_>>());
    let out = out.unwrap();
    let user = out.column_by_name("user").unwrap().as_struct();
    let names = user.column_by_name("name").unwrap().as_string::<i32>();
    for i in 0..10 {
        assert_eq!(names.value(i), format!("user-u{i}"));
    }
    assert!(user.is_null(10), "null answer: nothing known");
    assert_eq!(names.value(11), "user-u3");
    assert!(user.is_null(12));
    // 11 distinct requests in groups of at most 4.
    let mut got = sizes.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec![3, 4, 4]);
    // Answers are cached per record: a second batch makes no call.
    let (_, _, failures) = apply(step, batch(&[Some("u1"), Some("u2")])).await;
    assert!(failures.is_empty());
    assert_eq!(sizes.lock().unwrap().len(), 3);

    // An answer of the wrong length fails every record of that call, naming the mismatch.
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c)), &[], "event_date");
    let (_, out, failures) = apply(step, batch(&[Some("a"), Some("short"), Some("b")])).await;
    assert_eq!(failures.len(), 3, "{:?}", failures.iter().map(|f| &f.error).collect::<Vec<_>>());
    assert!(failures[0].error.contains("batch of 3 got 2 answers"), "{}", failures[0].error);
    assert_eq!(out.map_or(0, |b| b.num_rows()), 0);
}

/// The batches of one flush: the calls of the next batch start before the current one is
/// finished (so the service is kept busy while answers are converted), yet no more than
/// `concurrency` run at once over all of them, and a request that the batch before also
/// made is answered by that call, not made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_batches_overlap_their_calls_within_the_bound_and_share_them() {
    let (base, svc) = start().await;
    svc.latency_ms.store(100, Ordering::Relaxed);
    let mut c = cfg(format!("{base}/users/${{user_id}}"));
    c.concurrency = 4;
    c.cache_entries = 0; // answers shared only by the calls in flight
    let step = Step::new(0, &StepConfig::Enrich(Box::new(c)), &[], "event_date");
    // Two or three new ids per batch (fewer than `concurrency` alone, more than it for two
    // batches at once), and the last id of the batch before.
    let mut next = 0;
    let ids: Vec<Vec<String>> = (0..6)
        .map(|k| {
            let fresh = 2 + k % 2;
            let mut v: Vec<String> = (next..next + fresh).map(|i| format!("o{i}")).collect();
            if k > 0 {
                v.push(format!("o{}", next - 1));
            }
            if k == 3 {
                v.push("bad".into());
            }
            next += fresh;
            v
        })
        .collect();
    let batches: Vec<RecordBatch> = ids.iter().map(|b| batch(&b.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>())).collect();
    let (step, results) = tokio::task::spawn_blocking(move || {
        let mut step = step;
        let r = step.apply_all(batches);
        (step, r)
    })
    .await
    .unwrap();
    assert_eq!(results.len(), 6);
    for (k, (out, failures, _)) in results.into_iter().enumerate() {
        let out = match out {
            Some(Output::Rows(b)) => b,
            _ => panic!("batch {k}: no rows"),
        };
        let expected: Vec<&String> = ids[k].iter().filter(|id| *id != "bad").collect();
        assert_eq!(out.num_rows(), expected.len(), "batch {k}");
        let user = out.column_by_name("user").unwrap().as_struct();
        let names = user.column_by_name("name").unwrap().as_string::<i32>();
        for (row, id) in expected.iter().enumerate() {
            assert_eq!(names.value(row), format!("user-{id}"), "batch {k} row {row}");
        }
        if k == 3 {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].row, 4);
        } else {
            assert!(failures.is_empty(), "batch {k}");
        }
    }
    for i in 0..next {
        assert_eq!(calls(&svc, &format!("o{i}")), 1, "o{i} called once");
    }
    // One batch alone has at most 3 calls; two at once would have 5 without the bound.
    let max = svc.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(max, 4, "the next batch's calls overlap the current one's, within `concurrency`");
    assert_eq!(step.stats.cache_misses.load(Ordering::Relaxed), next as u64 + 1);
}
