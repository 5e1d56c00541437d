//! The PostgreSQL sink against a cluster this test starts (initdb + pg_ctl) on a free
//! loopback port.

#[path = "support/batch.rs"]
mod batch;
#[path = "support/servers.rs"]
mod servers;
use batch::batch;
use servers::PgServer;
use sluice_connect::postgres_sink::PostgresSink;
use sluice_core::pipeline::PostgresSinkConfig;
use sluice_pipeline::ExternalSink;

async fn client(pg: &PgServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn cfg(pg: &PgServer, table: &str, key: &[&str]) -> PostgresSinkConfig {
    PostgresSinkConfig {
        url: pg.url(),
        table: table.into(),
        key: key.iter().map(|k| k.to_string()).collect(),
        delete_when: None,
        create: true,
        rate_limit: None,
    }
}

/// The table as sorted text lines `col=value,...` (NULLs shown as `-`).
async fn dump(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let rows = c.simple_query(sql).await.unwrap();
    let mut out: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len()).map(|i| format!("{}={}", r.columns()[i].name(), r.get(i).unwrap_or("-"))).collect::<Vec<_>>().join(","),
            ),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_and_deletes_by_key_survive_duplicates_and_reruns() {
    let pg = PgServer::start();
    let mut c = cfg(&pg, "accounts", &["id"]);
    c.delete_when = Some("op = 'delete'".into());
    let sink = PostgresSink::new(&c, "event_date").unwrap();
    let a = batch(
        &[
            r#"{"id":1,"name":"ann","balance":10,"tags":{"tier":"gold"}}"#,
            r#"{"id":2,"name":"bob","balance":5}"#,
            r#"{"id":1,"name":"ann","balance":12}"#,
            r#"{"id":3,"name":"cy","balance":1}"#,
        ],
        0,
    );
    // A tombstone (only the key), a delete by predicate, a new field, a fraction.
    let b = batch(
        &[
            r#"{"id":2}"#,
            r#"{"id":3,"op":"delete"}"#,
            r#"{"id":4,"name":"dee","balance":2.5,"email":"d@x"}"#,
            r#"{"id":2,"name":"bob","balance":7}"#,
        ],
        4,
    );
    assert_eq!(sink.write(&[a.clone()]).await.unwrap(), 4);
    assert_eq!(sink.write(&[b.clone()]).await.unwrap(), 4);
    let expected = vec![
        "id=1,name=ann,balance=12,tags=-,email=-,op=-".to_string(),
        "id=2,name=bob,balance=7,tags=-,email=-,op=-".to_string(),
        "id=4,name=dee,balance=2.5,tags=-,email=d@x,op=-".to_string(),
    ];
    let pgc = client(&pg).await;
    let q = "SELECT id, name, balance, tags, email, op FROM accounts";
    assert_eq!(dump(&pgc, q).await, expected);
    // A crash re-runs both flushes, each possibly more than once: the same final state.
    sink.write(&[a.clone()]).await.unwrap();
    sink.write(&[a.clone(), b.clone()]).await.unwrap();
    sink.write(&[b]).await.unwrap();
    assert_eq!(dump(&pgc, q).await, expected);
    // Types were created from the records and widened for the fraction.
    let types = dump(
        &pgc,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'accounts' AND column_name IN ('id','balance','tags')",
    )
    .await;
    assert_eq!(
        types,
        vec![
            "column_name=balance,data_type=double precision".to_string(),
            "column_name=id,data_type=bigint".to_string(),
            "column_name=tags,data_type=jsonb".to_string()
        ]
    );
    let pk = dump(&pgc, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'accounts'::regclass AND i.indisprimary").await;
    assert_eq!(pk, vec!["attname=id".to_string()]);
    let _ = a;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_with_a_compound_key_and_create_off() {
    let pg = PgServer::start();
    let pgc = client(&pg).await;
    pgc.batch_execute("CREATE SCHEMA app; CREATE TABLE app.positions (fleet text, vehicle int, lat float8, seen timestamptz, PRIMARY KEY (fleet, vehicle))")
        .await
        .unwrap();
    let mut c = cfg(&pg, "app.positions", &["fleet", "vehicle"]);
    c.create = false;
    let sink = PostgresSink::new(&c, "event_date").unwrap();
    sink.write(&[batch(
        &[
            r#"{"fleet":"b","vehicle":1,"lat":52.5,"seen":"2026-11-23T10:00:00Z","extra":"ignored"}"#,
            r#"{"fleet":"b","vehicle":2,"lat":48.1}"#,
            r#"{"fleet":"c","vehicle":1,"lat":1.5}"#,
            r#"{"fleet":"b","vehicle":2}"#,
        ],
        0,
    )])
    .await
    .unwrap();
    assert_eq!(
        dump(&pgc, "SELECT fleet, vehicle, lat, seen FROM app.positions").await,
        vec!["fleet=b,vehicle=1,lat=52.5,seen=2026-11-23 10:00:00+00".to_string(), "fleet=c,vehicle=1,lat=1.5,seen=-".to_string()]
    );
    let columns = dump(&pgc, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'positions'").await;
    assert_eq!(columns, vec!["count=4".to_string()], "create is off: no column is added");

    let missing = PostgresSink::new(&PostgresSinkConfig { table: "nope".into(), ..c.clone() }, "event_date").unwrap();
    let err = missing.write(&[batch(&[r#"{"fleet":"x","vehicle":1}"#], 0)]).await.unwrap_err();
    assert!(format!("{err:#}").contains("nope does not exist"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_its_key_fails_the_write_and_writes_nothing() {
    let pg = PgServer::start();
    let sink = PostgresSink::new(&cfg(&pg, "t", &["id"]), "event_date").unwrap();
    let err = sink.write(&[batch(&[r#"{"id":1,"v":1}"#, r#"{"v":2}"#], 0)]).await.unwrap_err();
    assert!(format!("{err:#}").contains("key field `id` is missing or NULL"), "{err:#}");
    let pgc = client(&pg).await;
    assert_eq!(dump(&pgc, "SELECT to_regclass('t') IS NULL AS missing").await, vec!["missing=t".to_string()]);
    // PostgreSQL down: an error, then the next write reconnects.
    drop(pg);
    assert!(sink.write(&[batch(&[r#"{"id":1}"#], 0)]).await.is_err());
}
