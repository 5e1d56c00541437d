//! Change data capture from MariaDB (a server the test starts with the binlog in ROW format
//! and full row metadata; MySQL in one ignored test, see below) through the real binary: every DML kind and type into the
//! changelog and the mirror, schema changes, kill -9 during writes and during a snapshot
//! with the mirror equal to the source afterwards, the database going away and coming back,
//! and a purged binlog stopping the source with an error.

mod common;
#[path = "../../sluice-connect/tests/support/servers.rs"]
mod servers;
use common::*;
use mysql_async::prelude::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn source_cfg(db: &servers::MariaServer, extra: &str) -> String {
    format!("lake:\n  flush_interval: 100ms\nsources:\n  shop:\n    mysql:\n      url: {}\n      changelog: true\n{extra}", db.url())
}

async fn connect(db: &servers::MariaServer) -> mysql_async::Conn {
    mysql_async::Conn::new(mysql_async::Opts::from_url(&db.url()).unwrap()).await.unwrap()
}

async fn sources(s: &Server) -> Value {
    let r = s.client.get(s.url("/v1/sources")).send().await.unwrap();
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// Waits until the source reports `state` (panics with its status after 60 s).
async fn wait_state(s: &Server, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let src = sources(s).await["sources"][0].clone();
        if src["state"] == state {
            return src;
        }
        assert!(Instant::now() < deadline, "source never became {state}: {src}\n{}", s.server_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the changelog table of `stream` has `n` rows (a liveness bound, not a timing
/// test).
async fn wait_rows(s: &Server, stream: &str, n: usize) {
    let table = format!("{stream}__changelog");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if s.stream_info(stream).await.is_some() && s.lake().join(&table).join("_delta_log").is_dir() {
            let got = s.scalar(&format!("SELECT count(*) FROM {table}")).await as usize;
            if got >= n {
                s.wait_landed(stream).await;
                return;
            }
        }
        assert!(Instant::now() < deadline, "{table} did not reach {n} rows: {:?}\n{}", s.stream_info(stream).await, s.server_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dml_kind_and_type_lands_in_the_changelog_and_the_mirror() {
    let db = servers::MariaServer::start();
    db.sql(
        "CREATE TABLE items (
           id BIGINT PRIMARY KEY, name VARCHAR(50), price DECIMAL(20,4), at TIMESTAMP(6) NULL, day DATE, ts DATETIME(3),
           t TIME, y YEAR, doc JSON, data VARBINARY(10), blob_data BLOB, mood ENUM('happy','sad'), tags SET('a','b','c'),
           flag TINYINT(1), ratio DOUBLE, small SMALLINT UNSIGNED, big BIGINT UNSIGNED, bits BIT(12), note TEXT, med MEDIUMINT, tiny TINYINT);
         CREATE TABLE skipped (id INT PRIMARY KEY);
         CREATE TABLE logs (id INT PRIMARY KEY, msg VARCHAR(20));
         CREATE TABLE pre (id INT PRIMARY KEY, v VARCHAR(20), at TIMESTAMP NULL, mood ENUM('x','y'));
         CREATE TABLE pair (a INT, b VARCHAR(5), v INT, PRIMARY KEY (a, b));
         INSERT INTO pair VALUES (1, 'x', 1), (1, 'y', 2), (2, 'x', 3);",
    );
    let mut pre = String::from("INSERT INTO pre VALUES ");
    for i in 1..=2500 {
        pre.push_str(&format!("{}({i}, 'v{i}', '2026-01-05 10:00:00', 'y')", if i > 1 { "," } else { "" }));
    }
    db.sql(&pre);
    let s = Server::start(&source_cfg(&db, "      tables:\n        exclude: [shop.skipped]\n")).await;
    wait_state(&s, "streaming").await;
    // The rows that were there before: the initial snapshot reads them (3 chunks of 1024).
    wait_rows(&s, "shop_pre", 2500).await;
    wait_rows(&s, "shop_pair", 3).await;
    s.wait_landed("shop_pre").await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_pre").await, 2500.0);
    assert_eq!(s.scalar("SELECT count(*) FROM shop_pre__changelog WHERE op = 'read' AND source.snapshot").await, 2500.0);
    assert_eq!(s.scalar("SELECT count(*) FROM shop_pre WHERE v = 'v' || CAST(id AS VARCHAR) AND mood = 'y' AND at = '2026-01-05T10:00:00Z'").await, 2500.0);

    db.sql(
        "SET time_zone = '+02:00';
         INSERT INTO items VALUES (1, 'tea', 12345678901234.5600, '2026-01-05 10:00:00.123456', '2026-01-05', '2026-01-05 10:00:00.5',
            '-26:03:04', 2024, '{\"a\": {\"b\": [1, 2]}}', X'0aff', X'00', 'happy', 'a,c', 1, 0.5, 65535, 18446744073709551615, b'101', REPEAT('x', 5000), -8388608, -128);
         INSERT INTO items (id, name) VALUES (2, 'coffee');
         INSERT INTO skipped VALUES (1);
         BEGIN;
           UPDATE items SET flag = 0, name = 'green tea' WHERE id = 1;
           DELETE FROM items WHERE id = 2;
         COMMIT;
         INSERT INTO logs VALUES (1, 'a'), (2, 'b');
         TRUNCATE logs;
         UPDATE pair SET v = 20 WHERE a = 1 AND b = 'y';",
    );
    wait_rows(&s, "shop_items", 4).await;
    wait_rows(&s, "shop_logs", 3).await;

    let rows = s.query("SELECT op, key, before, after, source, transaction FROM shop_items__changelog ORDER BY _offset").await;
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "insert", "update", "delete"], "{rows:#?}");
    let a = &rows[0]["after"];
    assert_eq!(rows[0]["key"]["id"], 1);
    assert_eq!(a["name"], "tea");
    assert_eq!(a["price"], "12345678901234.5600", "decimal is exact text");
    assert_eq!(a["at"], "2026-01-05T08:00:00.123456Z", "timestamp is an instant in UTC");
    assert_eq!(a["day"], "2026-01-05");
    assert_eq!(a["ts"], "2026-01-05T10:00:00.5");
    assert_eq!(a["t"], "-26:03:04");
    assert_eq!(a["y"], 2024);
    assert_eq!(a["doc"], "{\"a\": {\"b\": [1, 2]}}", "MariaDB's JSON is text");
    assert_eq!(a["data"], "\\x0aff");
    assert_eq!(a["blob_data"], "\\x00");
    assert_eq!(a["mood"], "happy", "an enum is its member's name");
    assert_eq!(a["tags"], "a,c");
    assert_eq!(a["flag"], 1);
    assert_eq!(a["ratio"], 0.5);
    assert_eq!(a["small"], 65535);
    // Exact in the stream; the lake's JSON reader types a number past 2^63 - 1 as a double.
    assert_eq!(a["big"].as_f64(), Some(18446744073709551615u64 as f64));
    assert_eq!(a["bits"], 5);
    assert_eq!(a["note"].as_str().unwrap().len(), 5000);
    assert_eq!((a["med"].as_i64(), a["tiny"].as_i64()), (Some(-8388608), Some(-128)), "signed integers keep their sign");
    let src = &rows[0]["source"];
    assert_eq!((src["connector"].as_str(), src["db"].as_str(), src["table"].as_str()), (Some("mysql"), Some("shop"), Some("items")));
    assert_eq!(src["snapshot"], false);
    assert!(src["file"].as_str().unwrap().starts_with("binlog."), "{src}");
    assert!(src["gtid"].as_str().unwrap().starts_with("0-1-"), "a MariaDB GTID: {src}");
    // The update in one transaction with the delete: same transaction, in order.
    let (u, d) = (&rows[2], &rows[3]);
    assert_eq!(u["after"]["name"], "green tea");
    assert_eq!(u["before"]["name"], "tea", "an update carries the whole old row");
    assert_eq!(u["transaction"]["id"], d["transaction"]["id"]);
    assert_eq!(u["transaction"]["lsn"], d["transaction"]["lsn"]);
    assert_eq!(d["transaction"]["seq"].as_i64().unwrap(), u["transaction"]["seq"].as_i64().unwrap() + 1);
    assert_eq!(d["before"]["id"], 2, "a delete carries the old row");
    assert!(d["after"].is_null());

    let logs = s.query("SELECT op FROM shop_logs__changelog ORDER BY _offset").await;
    let ops: Vec<&str> = logs.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "insert", "truncate"]);
    assert!(s.stream_info("shop_skipped").await.is_none(), "an excluded table is not captured");

    // An update that moves a row to another key (see `check_moved_rows`).
    db.sql(MOVES_SQL);
    wait_rows(&s, "shop_moves", 5).await;
    check_moved_rows(&s, "shop_moves").await;
    let (status, body) = s.post("shop_items", "{\"x\":1}").await;
    assert_eq!(status, 409, "the stream belongs to the source: {body}");

    // Schema changes with no restart: an added column appears, a dropped one stops coming.
    db.sql("ALTER TABLE items ADD COLUMN color VARCHAR(10); INSERT INTO items (id, name, color) VALUES (3, 'mate', 'green'); ALTER TABLE items DROP COLUMN note; UPDATE items SET name = 'sencha' WHERE id = 1;");
    wait_rows(&s, "shop_items", 6).await;
    let r = s.query("SELECT after FROM shop_items__changelog WHERE op = 'insert' AND key.id = 3").await;
    assert_eq!(r[0]["after"]["color"], "green", "{r:?}");
    let r = s.query("SELECT after FROM shop_items__changelog WHERE op = 'update' ORDER BY _offset DESC LIMIT 1").await;
    // (The changelog table keeps the column, null from here on.)
    assert!(r[0]["after"].get("note").is_none_or(|v| v.is_null()), "{r:?}");
    assert_eq!(r[0]["after"]["name"], "sencha");

    // The mirror equals the source table; the composite-key table too.
    s.wait_landed("shop_items").await;
    let m = s.query("SELECT id, name, flag, price, color, at FROM shop_items ORDER BY id").await;
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!((m[0]["id"].as_i64(), m[0]["name"].as_str(), m[0]["flag"].as_i64()), (Some(1), Some("sencha"), Some(0)), "{m:?}");
    assert_eq!(m[0]["price"], "12345678901234.5600");
    assert_eq!((m[1]["id"].as_i64(), m[1]["color"].as_str()), (Some(3), Some("green")));
    wait_rows(&s, "shop_pair", 4).await;
    let p = s.query("SELECT a, b, v FROM shop_pair ORDER BY a, b").await;
    assert_eq!(p.iter().map(|r| r["v"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 20, 3], "{p:?}");

    // A snapshot of some keys on demand, with the CLI: `read` events equal to what the
    // binlog said about the same rows.
    let out = std::process::Command::new(BIN)
        .args(["snapshot", "shop", "--table", "items", "--key", "1", "--key", "3", "--quiet", "--url", &s.url("")])
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice snapshot: {}", String::from_utf8_lossy(&out.stderr));
    wait_rows(&s, "shop_items", 8).await;
    let reads = s.query("SELECT key.id AS id, after FROM shop_items__changelog WHERE op = 'read' ORDER BY key.id").await;
    assert_eq!(reads.len(), 2, "{reads:?}");
    let last = s.query("SELECT after FROM shop_items__changelog WHERE op = 'update' ORDER BY _offset DESC LIMIT 1").await;
    assert_eq!(reads[0]["after"], last[0]["after"], "a row read by a snapshot looks as the binlog showed it");
    let src = &sources(&s).await["sources"][0];
    assert_eq!(src["kind"], "mysql");
    assert_eq!(src["tables"]["shop.items"], "shop_items");
    assert!(src["snapshots"].as_array().unwrap().iter().any(|j| j["table"] == "shop.items" && j["state"] == "done" && j["rows"] == 2), "{src}");
    let r = s.client.post(s.url("/v1/sources/shop/snapshot")).body(r#"{"table": "skipped"}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not captured"));
    // A two-column primary key: each key a JSON object; a bare value is refused by name.
    let out = std::process::Command::new(BIN)
        .args(["snapshot", "shop", "--table", "pair", "--key", r#"{"a": 1, "b": "y"}"#, "--key", r#"{"b": "x", "a": "2"}"#, "--quiet", "--url", &s.url("")])
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice snapshot: {}", String::from_utf8_lossy(&out.stderr));
    wait_rows(&s, "shop_pair", 6).await;
    let reads = s.query("SELECT key.a AS a, key.b AS b, after.v AS v, count(*) AS n FROM shop_pair__changelog WHERE op = 'read' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").await;
    let reads: Vec<(i64, String, i64, i64)> =
        reads.iter().map(|r| (r["a"].as_i64().unwrap(), r["b"].as_str().unwrap().to_string(), r["v"].as_i64().unwrap(), r["n"].as_i64().unwrap())).collect();
    assert_eq!(
        reads,
        [(1, "x".into(), 1, 1), (1, "y".into(), 2, 1), (1, "y".into(), 20, 1), (2, "x".into(), 3, 2)],
        "the initial snapshot, then the two keys again as they are now"
    );
    let r = s.client.post(s.url("/v1/sources/shop/snapshot")).body(r#"{"table": "pair", "keys": ["1"]}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("primary key of 2 columns (a, b)") && text.contains("JSON object"), "{text}");

    // A retyped column (INT to DECIMAL: its values now come as exact text) becomes text in
    // the mirror and the changelog, the values it held their text; nothing is a dead letter.
    db.sql("ALTER TABLE pair MODIFY v DECIMAL(10,2); UPDATE pair SET v = 7.5 WHERE a = 2;");
    wait_rows(&s, "shop_pair", 7).await;
    s.wait_landed("shop_pair").await;
    let p = s.query("SELECT v FROM shop_pair ORDER BY a, b").await;
    assert_eq!(p.iter().map(|r| r["v"].as_str().unwrap()).collect::<Vec<_>>(), ["1", "20", "7.50"], "{p:?}");
    let c = s.query("SELECT after.v AS v FROM shop_pair__changelog ORDER BY _offset DESC LIMIT 1").await;
    assert_eq!(c[0]["v"], "7.50");
    for t in ["shop_pair__dlq", "shop_pair__changelog__dlq"] {
        assert!(!s.lake().join(t).exists(), "{t}: {:?}", s.query(&format!("SELECT reason FROM {t}")).await);
    }

    s.wait_landed("shop_logs").await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_logs").await, 0.0, "truncated");
}

/// kill -9 (and, every other round, SIGTERM) while the database takes writes, then the
/// database itself killed and restarted: afterwards the changelog holds every committed
/// insert exactly once and the mirror equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_writes_and_a_database_restart_lose_and_duplicate_nothing() {
    crash_loop(servers::MariaServer::start()).await;
}

/// MySQL (8.0 from Ubuntu 22.04 or 9.x from Debian unstable; CI has no MySQL): its encodings of the types MariaDB
/// encodes differently, a snapshot refused with the reason when the source has no watermark
/// table, the convergence test with one, then the crash loop with binlog rotations and a
/// database restart. Run with
/// `bash scripts/mysql-ubuntu.sh DIR` (or `scripts/mysql-sid.sh`) and `SLUICE_TEST_MYSQLD=DIR/mysqld cargo nextest run
/// --run-ignored only -E 'test(mysql_server)'`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a MySQL server: SLUICE_TEST_MYSQLD (scripts/mysql-ubuntu.sh or scripts/mysql-sid.sh)"]
async fn mysql_server_types_kill9_rotations_and_a_database_restart() {
    let mysqld = std::env::var("SLUICE_TEST_MYSQLD").expect("SLUICE_TEST_MYSQLD: a MySQL launcher (scripts/mysql-ubuntu.sh or scripts/mysql-sid.sh)");
    let db = servers::MariaServer::start_mysql(&mysqld);
    db.sql(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, price DECIMAL(20,4), at TIMESTAMP(6) NULL, t TIME, doc JSON, data VARBINARY(10),
           mood ENUM('happy','sad'), tags SET('a','b','c'), big BIGINT UNSIGNED, bits BIT(12))",
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::new_in(tmp.path(), &source_cfg(&db, ""));
    s.spawn().await;
    wait_state(&s, "streaming").await;
    let r = s.client.post(s.url("/v1/sources/shop/snapshot")).header("content-type", "application/json").body("{}").send().await.unwrap();
    let (status, body) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("need a watermark table"), "{body}");
    // MySQL's own encodings: binary JSON, TIMESTAMP2, enum and set members by metadata.
    db.sql(
        "SET time_zone = '+02:00'; INSERT INTO items VALUES (1, 12345678901234.5600, '2026-01-05 10:00:00.123456', '-26:03:04',
           '{\"a\": {\"b\": [1, 2]}, \"s\": \"x\"}', X'0aff', 'sad', 'a,c', 18446744073709551615, b'101')",
    );
    wait_rows(&s, "shop_items", 1).await;
    let a = &s.query("SELECT after FROM shop_items__changelog").await[0]["after"];
    assert_eq!(a["price"], "12345678901234.5600");
    assert_eq!(a["at"], "2026-01-05T08:00:00.123456Z");
    assert_eq!(a["t"], "-26:03:04");
    assert_eq!(a["doc"]["a"]["b"], serde_json::json!([1, 2]), "MySQL's JSON is JSON: {a}");
    assert_eq!(a["doc"]["s"], "x");
    assert_eq!((a["data"].as_str(), a["mood"].as_str(), a["tags"].as_str(), a["bits"].as_i64()), (Some("\\x0aff"), Some("sad"), Some("a,c"), Some(5)));
    assert_eq!(a["big"].as_f64(), Some(18446744073709551615u64 as f64));
    // An in-place JSON update logged as a partial JSON diff where the server allows it
    // (binlog_row_value_options = PARTIAL_JSON, for this session): the change still carries
    // the whole document.
    db.sql("SET SESSION binlog_row_value_options = 'PARTIAL_JSON'; UPDATE items SET doc = JSON_SET(doc, '$.s', 'y') WHERE id = 1");
    wait_rows(&s, "shop_items", 2).await;
    let a = &s.query("SELECT after FROM shop_items__changelog WHERE op = 'update'").await[0]["after"];
    assert_eq!((a["doc"]["s"].as_str(), &a["doc"]["a"]["b"]), (Some("y"), &serde_json::json!([1, 2])), "{a}");
    let m = &s.query("SELECT doc FROM shop_items WHERE id = 1").await[0]["doc"];
    assert_eq!((m["s"].as_str(), &m["a"]["b"]), (Some("y"), &serde_json::json!([1, 2])), "{m}");
    // A transaction the server compresses into one payload event (binlog_transaction_compression,
    // for this session): its changes arrive all the same.
    db.sql("SET SESSION binlog_transaction_compression = ON; INSERT INTO items (id, price) VALUES (2, 1.5), (3, 2.5); UPDATE items SET price = 3.5 WHERE id = 3");
    wait_rows(&s, "shop_items", 5).await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_items WHERE id IN (2, 3)").await, 2.0);
    assert_eq!(s.query("SELECT price FROM shop_items WHERE id = 3").await[0]["price"], "3.5000");
    // With gtid_mode = ON (SLUICE_TEST_MYSQLD_ARGS) each change names its GTID, uuid:n.
    // (A column that was only ever null is not in the lake: no GTIDs, no `gtid` field.)
    let gtid = s.query("SELECT source FROM shop_items__changelog").await[0]["source"]["gtid"].clone();
    if db.sql("SELECT @@gtid_mode").trim() == "ON" {
        assert!(gtid.as_str().is_some_and(|g| g.len() > 37 && g.as_bytes()[36] == b':'), "{gtid}");
    } else {
        assert!(gtid.is_null(), "{gtid}");
    }
    let _ = s.stop();
    // Snapshots between watermarks converge while the table changes, through a kill -9.
    converges(&db, "      watermark_table: sluice_watermark\n").await;
    crash_loop(db).await;
}

/// Writes transactions (rotating the binlog now and then) while Sluice is killed -9 or
/// stopped and restarted, then stops the database and starts it again: every change reaches
/// the changelog once and the mirror equals the source.
async fn crash_loop(mut db: servers::MariaServer) {
    let rounds: usize = std::env::var("SLUICE_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).min(8);
    db.sql("CREATE TABLE ev (id BIGINT PRIMARY KEY, v VARCHAR(10))");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::new_in(tmp.path(), &source_cfg(&db, "      partitions: 3\n"));
    s.spawn().await;
    wait_state(&s, "streaming").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut conn = connect(&db).await;
        tokio::spawn(async move {
            let mut next: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Transactions of 1-20 rows, each updating an earlier row (to a new value: the
                // binlog has no event for an update that changes nothing).
                let n = fastrand::i64(1..20);
                let values: Vec<String> = (next..next + n).map(|i| format!("({i}, 'x')")).collect();
                let sql = format!("BEGIN; INSERT INTO ev VALUES {}; UPDATE ev SET v = 'y{next}' WHERE id = {}; COMMIT;", values.join(","), next / 2);
                conn.query_drop(sql).await.unwrap();
                if fastrand::u32(0..40) == 0 {
                    // A new binlog file: positions go on in it, restarts must find it.
                    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
                }
                next += n;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            next
        })
    };
    for round in 0..rounds {
        if round > 0 {
            s.spawn().await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..900))).await;
        // Every other round a graceful stop: the writes in flight land before it exits.
        s.kill9_or_stop(round);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let inserted = writer.await.unwrap() as usize;
    s.spawn().await;
    wait_state(&s, "streaming").await;
    wait_rows(&s, "shop_ev", inserted).await;

    // The database goes away: the source says so and retries; it comes back and goes on.
    db.kill();
    let src = wait_state(&s, "retrying").await;
    assert!(src["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{src}");
    db.restart();
    wait_state(&s, "streaming").await;
    db.sql("INSERT INTO ev VALUES (-1, 'last')");
    s.wait_marker("shop_ev").await;

    let ins = s.scalar("SELECT count(*) FROM shop_ev__changelog WHERE op = 'insert' AND key.id >= 0").await as usize;
    let distinct = s.scalar("SELECT count(DISTINCT key.id) FROM shop_ev__changelog WHERE op = 'insert' AND key.id >= 0").await as usize;
    let dup = s
        .query("SELECT key.id AS id, count(*) AS n FROM shop_ev__changelog GROUP BY key.id, transaction.lsn, transaction.seq HAVING count(*) > 1 LIMIT 5")
        .await;
    assert!(dup.is_empty(), "changes delivered twice: {dup:?}");
    assert_eq!((ins, distinct), (inserted, inserted), "every committed insert exactly once");
    let ups = s.scalar("SELECT count(*) FROM shop_ev__changelog WHERE op = 'update'").await as usize;
    let txns = s.scalar("SELECT count(DISTINCT transaction.lsn) FROM shop_ev__changelog WHERE key.id >= 0").await as usize;
    assert_eq!(ups, txns, "one update per transaction");
    let want: Vec<(i64, String)> = db
        .sql("SELECT id, v FROM ev ORDER BY id")
        .lines()
        .map(|l| {
            let (a, b) = l.split_once('\t').unwrap();
            (a.parse().unwrap(), b.to_string())
        })
        .collect();
    let got: Vec<(i64, String)> =
        s.query("SELECT id, v FROM shop_ev ORDER BY id").await.iter().map(|r| (r["id"].as_i64().unwrap(), r["v"].as_str().unwrap().to_string())).collect();
    assert_eq!(got.len(), want.len(), "mirror rows vs source rows");
    assert!(got == want, "the mirror differs from the source: first difference {:?}", got.iter().zip(&want).find(|(a, b)| a != b));
    eprintln!("mysql cdc crash loop: {rounds} kills or stops and a database restart, {inserted} rows in {txns} transactions, each change once");
    let _ = s.stop();
}

/// The issue's convergence test for MariaDB, with chunks at the consistent read's binlog
/// position: a random INSERT/UPDATE/DELETE workload runs while an on-demand snapshot is
/// taken; Sluice is killed -9 mid-snapshot and restarted. Afterwards the mirror equals the
/// source, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_during_writes_and_kill9_converges_to_the_source() {
    converges(&servers::MariaServer::start(), "").await;
}

/// The same with chunks read between watermarks (`watermark_table`, as MySQL needs) on
/// MariaDB. The workload also moves rows to other keys; the watermark table is not captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_between_watermarks_during_writes_and_kill9_converges_to_the_source() {
    converges(&servers::MariaServer::start(), "      watermark_table: sluice_watermark\n").await;
}

/// A column added (with a default) while a snapshot reads its table. Rows read before the
/// ALTER cannot have it (no row event tells of their new value), but every chunk read after
/// it must (each chunk reads the table's columns anew; columns kept from before the ALTER
/// fail this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_during_a_snapshot_is_in_every_row_read_after_it() {
    let db = servers::MariaServer::start();
    db.sql("CREATE TABLE wide (id INT PRIMARY KEY, v VARCHAR(10)) ENGINE=InnoDB");
    let mut conn = connect(&db).await;
    for start in (0..20_000).step_by(2_000) {
        let values: Vec<String> = (start..start + 2_000).map(|n| format!("({n}, 'v')")).collect();
        conn.query_drop(format!("INSERT INTO wide VALUES {}", values.join(","))).await.unwrap();
    }
    drop(conn);
    let s = Server::start(&source_cfg(&db, "      snapshot: never\n      snapshot_chunk: 200\n")).await;
    wait_state(&s, "streaming").await;
    let r = s.client.post(s.url("/v1/sources/shop/snapshot")).body(r#"{"table": "shop.wide"}"#).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let progress = |src: &Value| src["snapshots"].as_array().and_then(|a| a.iter().find(|j| j["table"] == "shop.wide").cloned()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress(&sources(&s).await["sources"][0])["rows"].as_u64().unwrap_or(0) < 1_000 {
        assert!(Instant::now() < deadline, "the snapshot made no progress: {}\n{}", sources(&s).await, s.server_log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.sql("ALTER TABLE wide ADD COLUMN c INT NOT NULL DEFAULT 7");
    // Chunks landed by now were read before the ALTER, at the latest; a few more may have been.
    let after_alter = progress(&sources(&s).await["sources"][0]);
    assert_eq!(after_alter["state"], "running", "the ALTER came after the snapshot: {after_alter}");
    let landed = after_alter["rows"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while progress(&sources(&s).await["sources"][0])["state"] != "done" {
        assert!(Instant::now() < deadline, "the snapshot did not finish: {}\n{}", sources(&s).await, s.server_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.sql("INSERT INTO wide VALUES (-1, 'end', 7)");
    s.wait_marker("shop_wide").await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_wide").await, 20_001.0);
    // Ids are read in order, 200 per chunk: past what had landed plus the chunks read ahead
    // of it (one being read, one landing), every row was read after the ALTER.
    let later = landed + 3 * 200;
    let missing = s.scalar(&format!("SELECT count(*) FROM shop_wide WHERE id >= {later} AND (c IS NULL OR c <> 7)")).await;
    assert_eq!(missing, 0.0, "rows read after the ALTER without its column (ids from {later})\n{}", s.server_log());
    assert!(s.scalar(&format!("SELECT count(*) FROM shop_wide WHERE id >= {later}")).await > 0.0, "the snapshot had nearly finished before the ALTER");
}

/// The convergence test against `db`, the source configured with `extra`.
async fn converges(db: &servers::MariaServer, extra: &str) {
    db.sql("CREATE TABLE acct (id INT PRIMARY KEY, balance BIGINT NOT NULL, note VARCHAR(5)) ENGINE=InnoDB");
    let mut conn = connect(&db).await;
    for start in (0..20_000).step_by(2_000) {
        let values: Vec<String> = (start..start + 2_000).map(|n| format!("({n}, {}, 'n')", n * 10)).collect();
        conn.query_drop(format!("INSERT INTO acct VALUES {}", values.join(","))).await.unwrap();
    }
    drop(conn);
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::new_in(tmp.path(), &source_cfg(&db, &format!("      snapshot: never\n      snapshot_chunk: 500\n      partitions: 2\n{extra}")));
    s.spawn().await;
    wait_state(&s, "streaming").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seed = std::env::var("SLUICE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("snapshot convergence: seed {seed}");
    let writer = {
        let stop = stop.clone();
        let mut conn = connect(&db).await;
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = rng.i32(0..25_000);
                let sql = match rng.u8(0..7) {
                    0 | 1 => {
                        let v = rng.i64(0..1000);
                        format!("INSERT INTO acct VALUES ({id}, {v}, 'w') ON DUPLICATE KEY UPDATE balance = {v}, note = 'u'")
                    }
                    2 | 3 => format!("UPDATE acct SET balance = balance + 1, note = 'b' WHERE id = {id}"),
                    4 | 5 => format!("DELETE FROM acct WHERE id = {id}"),
                    // A row moves to another key (if that one is free).
                    _ => format!("UPDATE IGNORE acct SET id = {}, note = 'm' WHERE id = {id}", rng.i32(0..25_000)),
                };
                conn.query_drop(sql).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let r = s.client.post(s.url("/v1/sources/shop/snapshot")).body(r#"{"table": "shop.acct"}"#).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let src = &sources(&s).await["sources"][0];
        let rows = src["snapshots"].as_array().and_then(|a| a.first()).and_then(|j| j["rows"].as_u64()).unwrap_or(0);
        if rows >= 3000 {
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot made no progress: {src}\n{}", s.server_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.spawn().await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let src = &sources(&s).await["sources"][0];
        if src["snapshots"].as_array().is_some_and(|a| a.iter().any(|j| j["table"] == "shop.acct" && j["state"] == "done")) {
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot did not finish: {src}\n{}", s.server_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statements = writer.await.unwrap();
    db.sql("INSERT INTO acct VALUES (-1, 0, 'end')");
    s.wait_marker("shop_acct").await;
    let parse = |out: String| -> Vec<(i64, i64, String)> {
        out.lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].to_string())
            })
            .collect()
    };
    let want = parse(db.sql("SELECT id, balance, note FROM acct ORDER BY id"));
    let got: Vec<(i64, i64, String)> = s
        .query("SELECT id, balance, note FROM shop_acct ORDER BY id")
        .await
        .iter()
        .map(|r| (r["id"].as_i64().unwrap(), r["balance"].as_i64().unwrap(), r["note"].as_str().unwrap().to_string()))
        .collect();
    let want_set: std::collections::HashSet<_> = want.iter().collect();
    let got_set: std::collections::HashSet<_> = got.iter().collect();
    let source_except_mirror: Vec<_> = want.iter().filter(|r| !got_set.contains(r)).take(5).collect();
    let mirror_except_source: Vec<_> = got.iter().filter(|r| !want_set.contains(r)).take(5).collect();
    for (id, ..) in source_except_mirror.iter().chain(&mirror_except_source).take(3) {
        let h = s
            .query(&format!("SELECT op, transaction.lsn AS lsn, transaction.seq AS seq, _partition, _offset, after.balance AS balance FROM shop_acct__changelog WHERE key.id = {id} ORDER BY _offset"))
            .await;
        eprintln!("history of id {id}: {h:?}");
    }
    assert!(
        source_except_mirror.is_empty() && mirror_except_source.is_empty() && got.len() == want.len(),
        "mirror != source (seed {seed}): source EXCEPT mirror {source_except_mirror:?}, mirror EXCEPT source {mirror_except_source:?}, {} vs {} rows",
        want.len(),
        got.len()
    );
    let read = s.scalar("SELECT count(*) FROM shop_acct__changelog WHERE op = 'read'").await;
    assert!(read >= 15_000.0, "the snapshot wrote {read} rows");
    let tables = sources(&s).await["sources"][0]["tables"].clone();
    assert!(tables.as_object().is_some_and(|t| t.keys().all(|k| k == "shop.acct")), "only the captured table has a stream: {tables}");
    eprintln!("mysql snapshot convergence ok ({extra:?}): {} rows, {statements} concurrent statements, killed mid-snapshot", want.len());
    let _ = s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_binlog_stops_the_source_with_an_error_that_says_what_to_do() {
    let db = servers::MariaServer::start();
    db.sql("CREATE TABLE t (id INT PRIMARY KEY)");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::new_in(tmp.path(), &source_cfg(&db, ""));
    s.spawn().await;
    wait_state(&s, "streaming").await;
    db.sql("INSERT INTO t VALUES (1)");
    wait_rows(&s, "shop_t", 1).await;
    s.stop();
    db.sql("INSERT INTO t VALUES (2); FLUSH BINARY LOGS; FLUSH BINARY LOGS;");
    let current = db.sql("SHOW MASTER STATUS");
    let file = current.split('\t').next().unwrap().to_string();
    // The server keeps a file a replica is still reading: the dump thread of the stopped
    // Sluice may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.sql("SHOW BINARY LOGS").lines().count() > 1 {
        assert!(Instant::now() < deadline, "the server would not purge: {}", db.sql("SHOW BINARY LOGS"));
        db.sql(&format!("PURGE BINARY LOGS TO '{file}'"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.spawn().await;
    let src = wait_state(&s, "failed").await;
    let e = src["last_error"].as_str().unwrap();
    assert!(e.contains("purged") && e.contains("snapshot"), "{e}");
    let _ = s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_binlog_events_are_read_as_the_events_they_compress() {
    let db = servers::MariaServer::start();
    // Every event of 10 bytes or more compressed: rows, statements, the TRUNCATE too.
    db.sql(
        "SET GLOBAL log_bin_compress = ON; SET GLOBAL log_bin_compress_min_len = 10;
         CREATE TABLE t (id INT PRIMARY KEY, v TEXT);
         CREATE TABLE a_table_whose_truncate_is_compressed (id INT PRIMARY KEY);
         INSERT INTO t VALUES (1, 'before');",
    );
    let s = Server::start(&source_cfg(&db, "")).await;
    wait_state(&s, "streaming").await;
    // The initial snapshot of `t` (one row) done before the changes, so it reads only that row.
    wait_rows(&s, "shop_t", 1).await;
    let long = "x".repeat(5000);
    db.sql(&format!(
        "INSERT INTO t VALUES (2, '{long}'), (3, 'three'), (4, 'four');
         UPDATE t SET v = CONCAT(v, '!') WHERE id IN (1, 2);
         DELETE FROM t WHERE id = 3;
         ALTER TABLE t ADD COLUMN n INT NULL COMMENT 'a column added by a compressed statement';
         INSERT INTO t VALUES (5, 'five', 5);
         INSERT INTO a_table_whose_truncate_is_compressed VALUES (1), (2);
         TRUNCATE TABLE a_table_whose_truncate_is_compressed;
         INSERT INTO t VALUES (-1, 'last', 0);"
    ));
    // The test means something only if the server did compress them.
    let kinds = db.sql("SHOW BINLOG EVENTS");
    for kind in ["Write_rows_compressed_v1", "Update_rows_compressed_v1", "Delete_rows_compressed_v1", "Query_compressed"] {
        assert!(kinds.contains(kind), "no {kind} event in the binlog:\n{kinds}");
    }
    s.wait_marker("shop_t").await;
    let rows = s.query("SELECT id, v, n FROM shop_t ORDER BY id").await;
    let want = serde_json::json!([
        {"id": -1, "v": "last", "n": 0},
        {"id": 1, "v": "before!", "n": null},
        {"id": 2, "v": format!("{long}!"), "n": null},
        {"id": 4, "v": "four", "n": null},
        {"id": 5, "v": "five", "n": 5},
    ]);
    assert_eq!(Value::Array(rows), want);
    // The changelog lands on its own (`Server::wait_marker` waits for the mirror).
    wait_rows(&s, "shop_t", 9).await;
    let ops = s.query("SELECT op, count(*) AS n FROM shop_t__changelog GROUP BY op ORDER BY op").await;
    assert_eq!(Value::Array(ops), serde_json::json!([{"op": "delete", "n": 1}, {"op": "insert", "n": 5}, {"op": "read", "n": 1}, {"op": "update", "n": 2}]));
    wait_rows(&s, "shop_a_table_whose_truncate_is_compressed", 3).await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_a_table_whose_truncate_is_compressed__changelog WHERE op = 'truncate'").await, 1.0);
    assert_eq!(sources(&s).await["sources"][0]["state"], "streaming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_row_events_keep_their_changes_numbered_in_commit_order() {
    let db = servers::MariaServer::start();
    db.sql("CREATE TABLE big (id INT PRIMARY KEY, v INT)");
    let s = Server::start(&source_cfg(&db, "")).await;
    wait_state(&s, "streaming").await;
    // Row events of hundreds of rows each, then an update that moves every key: a delete and
    // an insert per row.
    db.sql(
        "INSERT INTO big SELECT seq, seq FROM seq_1_to_1000;
         UPDATE big SET id = id + 5000, v = v + 1 WHERE id <= 1000;
         INSERT INTO big VALUES (-1, 0);",
    );
    s.wait_marker("shop_big").await;
    assert_eq!(s.scalar("SELECT count(*) FROM shop_big").await, 1001.0);
    assert_eq!(s.scalar("SELECT count(*) FROM shop_big WHERE id > 5000 AND v = id - 4999").await, 1000.0);
    // Each transaction's changes in the log in the order of their `seq`, which runs 0, 1, 2 ...
    // (the changelog lands on its own: `Server::wait_marker` waits for the mirror).
    wait_rows(&s, "shop_big", 3001).await;
    let rows = s.query("SELECT transaction.lsn AS lsn, transaction.seq AS seq, op, key.id AS id FROM shop_big__changelog ORDER BY _offset").await;
    let mut by_txn: Vec<(String, Vec<(u64, String, i64)>)> = Vec::new();
    for r in &rows {
        let lsn = r["lsn"].as_str().unwrap().to_string();
        if by_txn.last().is_none_or(|(l, _)| *l != lsn) {
            by_txn.push((lsn, Vec::new()));
        }
        by_txn.last_mut().unwrap().1.push((r["seq"].as_u64().unwrap(), r["op"].as_str().unwrap().to_string(), r["id"].as_i64().unwrap()));
    }
    let ops: Vec<(usize, &str)> = by_txn.iter().map(|(_, c)| (c.len(), c[0].1.as_str())).collect();
    assert_eq!(ops, [(1000, "insert"), (2000, "delete"), (1, "insert")], "{by_txn:?}");
    for (lsn, changes) in &by_txn {
        let seqs: Vec<u64> = changes.iter().map(|c| c.0).collect();
        assert_eq!(seqs, (0..changes.len() as u64).collect::<Vec<_>>(), "transaction {lsn}");
    }
    // The moving update: row by row, the old key's delete then the new key's insert.
    for (i, pair) in by_txn[1].1.chunks(2).enumerate() {
        let id = i as i64 + 1;
        assert_eq!((pair[0].1.as_str(), pair[0].2, pair[1].1.as_str(), pair[1].2), ("delete", id, "insert", id + 5000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_full_row_metadata_is_refused_with_the_setting_to_change() {
    let db = servers::MariaServer::start();
    db.sql("SET GLOBAL binlog_row_metadata = MINIMAL");
    let s = Server::start(&source_cfg(&db, "")).await;
    let src = wait_state(&s, "failed").await;
    let e = src["last_error"].as_str().unwrap();
    assert!(e.contains("binlog_row_metadata") && e.contains("FULL"), "{e}");
}
