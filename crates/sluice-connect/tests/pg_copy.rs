//! Snapshot chunks read in COPY's binary format print every value exactly as the server's
//! text COPY does (which is also what `pgoutput` streams), against a cluster this test
//! starts: edge values of every type read in binary, and many random ones.

#[path = "support/servers.rs"]
mod servers;
use futures::StreamExt;
use servers::PgServer;
use sluice_connect::postgres_cdc::snapshot::{self, Copied, Rows};

async fn try_copy(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<u8>, tokio_postgres::Error> {
    let stream = c.copy_out(sql).await?;
    futures::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(d) = stream.next().await {
        data.extend_from_slice(&d?);
    }
    Ok(data)
}

async fn copy(c: &tokio_postgres::Client, sql: &str) -> Vec<u8> {
    try_copy(c, sql).await.unwrap()
}

#[tokio::test]
async fn binary_copy_prints_every_value_as_the_server_does() {
    let pg = PgServer::start();
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // The snapshot session's settings (see postgres_cdc), under another server time zone.
    c.batch_execute(
        "SET TimeZone = 'Asia/Kolkata';
         CREATE TABLE t (id bigint PRIMARY KEY, b bool, s smallint, i int, tx text, vc varchar(20), c char(5), u uuid,
                         d date, ts timestamp, tz timestamptz);
         INSERT INTO t VALUES
           (1, true, -32768, -2147483648, '', '', '', '00000000-0000-0000-0000-000000000000', 'infinity', 'infinity', 'infinity'),
           (2, false, 32767, 2147483647, E'tab\\there\\nnew line \\\\ back\\\\slash \"quoted\" ü €', 'x', 'ab', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
            '-infinity', '-infinity', '-infinity'),
           (-9223372036854775808, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
           (9223372036854775807, true, 0, 0, '\\N', 'é', 'abcde', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '4713-01-01 BC', '4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC'),
           (3, true, 1, 1, 'x', 'y', 'z', NULL, '0001-01-01 BC', '0001-12-31 23:59:59.999999 BC', '0001-01-01 00:00:00.5 BC'),
           (4, true, 1, 1, 'x', 'y', 'z', NULL, '0001-01-01', '0001-01-01 00:00:00', '0001-01-01 00:00:00.000001+00'),
           (5, true, 1, 1, 'x', 'y', 'z', NULL, '1999-12-31', '1999-12-31 23:59:59.5', '1999-12-31 23:59:59.999999+00'),
           (6, true, 1, 1, 'x', 'y', 'z', NULL, '2000-01-01', '2000-01-01 00:00:00', '2000-01-01 00:00:00+00'),
           (7, true, 1, 1, 'x', 'y', 'z', NULL, '2000-02-29', '2000-02-29 12:00:00.000001', '2020-06-01 12:00:00.12+05:30'),
           (8, true, 1, 1, 'x', 'y', 'z', NULL, '1970-01-01', '1970-01-01 00:00:00.12', '1969-12-31 23:59:59.9+00'),
           (9, true, 1, 1, 'x', 'y', 'z', NULL, '9999-12-31', '9999-12-31 23:59:59.99', '9999-12-31 23:59:59.999+00'),
           (10, true, 1, 1, 'x', 'y', 'z', NULL, '10000-01-01', '10000-01-01 00:00:00', '10000-01-01 00:00:00+00'),
           (11, true, 1, 1, 'x', 'y', 'z', NULL, '5874897-12-31', '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00'),
           (12, true, 1, 1, 'x', 'y', 'z', NULL, '1900-03-01', '1900-02-28 23:59:59', '2100-03-01 00:00:00.000010+00');
         INSERT INTO t SELECT 1000 + g, g % 2 = 0, (g % 65536 - 32768), (random() * 4e9 - 2e9)::int, md5(g::text) || chr(9 + g % 200),
                              left(md5(g::text), g % 20), left(md5(g::text), g % 6), gen_random_uuid(),
                              date '4713-01-01 BC' + (random() * 2147483000)::int,
                              timestamp '4713-01-01 00:00 BC' + make_interval(secs => random() * 9.2e12),
                              timestamptz '1900-01-01 00:00+00' + random() * interval '200 years'
                       FROM generate_series(1, 20000) g;
         SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET IntervalStyle = iso_8601;",
    )
    .await
    .unwrap();
    let info = snapshot::table_info(&c, "public", "t").await.unwrap().unwrap();
    let types = info.binary().expect("every column is read in binary");
    let text = Copied::new(Rows::new(types.len()), copy(&c, &info.chunk_copy(None, 100_000, false, None)).await, None).unwrap();
    let binary = Copied::new(Rows::new(types.len()), copy(&c, &info.chunk_copy(None, 100_000, true, None)).await, Some(types.clone())).unwrap();
    assert_eq!((text.len(), binary.len()), (20_014, 20_014));
    assert_eq!(text.last_key(&info).unwrap(), binary.last_key(&info).unwrap());
    assert_eq!(binary.last_key(&info).unwrap(), Some(vec!["9223372036854775807".to_string()]));
    let (text, binary) = (text.rows().unwrap(), binary.rows().unwrap());
    for row in 0..text.len() {
        for col in 0..types.len() {
            let what = || format!("row {row} column {} ({})", info.columns[col].0, info.columns[col].2);
            assert_eq!(binary.text(row, col).unwrap().as_deref(), text.get(row, col), "{}", what());
            // And the JSON the events carry, written from the bytes, is the text's.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            binary.write_json(row, col, types[col], &mut a, &mut String::new()).unwrap();
            text.write_json(row, col, types[col], &mut b, &mut String::new()).unwrap();
            assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap(), "{}", what());
        }
    }
    // Spot checks of the text itself (the server's, so also the binary reading's).
    assert_eq!((text.get(0, 10), text.get(1, 10), text.get(2, 10)), (None, Some("infinity"), Some("-infinity")));
    let all: Vec<Option<&str>> = (0..text.len()).map(|r| text.get(r, 10)).collect();
    assert!(all.contains(&Some("4713-01-01 00:00:00+00 BC")) && all.contains(&Some("2020-06-01 06:30:00.12+00")), "{:?}", &all[..16]);
}

#[tokio::test]
async fn a_column_retyped_after_its_type_was_read_is_not_misread() {
    let pg = PgServer::start();
    let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE r (id int PRIMARY KEY, n int, s varchar(3)); INSERT INTO r VALUES (1, 5, 'abc')").await.unwrap();
    let info = snapshot::table_info(&c, "public", "r").await.unwrap().unwrap();
    let types = info.binary().unwrap();
    // Four bytes of text where four bytes of int4 were: without the casts they would read as
    // the number 1633837924.
    c.batch_execute("ALTER TABLE r ALTER n TYPE text; UPDATE r SET n = 'abcd'").await.unwrap();
    let e = try_copy(&c, &info.chunk_copy(None, 10, true, None)).await.unwrap_err();
    assert!(e.as_db_error().is_some_and(|e| e.message().contains("invalid input syntax for type integer")), "{e:?}");
    // A value the old type can hold converts; a longer varchar stays whole.
    c.batch_execute("UPDATE r SET n = '42'; ALTER TABLE r ALTER s TYPE varchar(10); UPDATE r SET s = 'abcdefgh'").await.unwrap();
    let rows = Copied::new(Rows::new(3), copy(&c, &info.chunk_copy(None, 10, true, None)).await, Some(types)).unwrap().rows().unwrap();
    assert_eq!((rows.text(0, 1).unwrap().as_deref(), rows.text(0, 2).unwrap().as_deref()), (Some("42"), Some("abcdefgh")));
}

#[tokio::test]
async fn a_chunk_waits_for_transactions_older_than_its_low_watermark_and_sees_them() {
    let pg = PgServer::start();
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    };
    let (a, b) = (connect().await, connect().await);
    a.batch_execute("CREATE TABLE w (id bigint PRIMARY KEY, v text); INSERT INTO w SELECT g, 'v' FROM generate_series(1, 10) g").await.unwrap();
    let info = snapshot::table_info(&a, "public", "w").await.unwrap().unwrap();
    // A transaction with an id, open when the low watermark is written.
    b.batch_execute("BEGIN; INSERT INTO w VALUES (11, 'older')").await.unwrap();
    let low = snapshot::Low::write(&a, "m".into()).await.unwrap();
    let read = tokio::spawn(async move { snapshot::read_chunk(&a, &info, low, None, None, 100, None, None).await.map(|(rows, ..)| rows.rows().unwrap()) });
    // The chunk's COPY runs while it is open, finds the condition false, and waits: seen as
    // the reader's check in pg_stat_activity (unless the read ends without waiting).
    let c = connect().await;
    while !read.is_finished() {
        let waiting: i64 = c
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE 'SELECT pg_snapshot_xmin%'", &[])
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(!read.is_finished(), "the chunk was read while a transaction older than its low watermark was running");
    b.batch_execute("COMMIT").await.unwrap();
    let rows = read.await.unwrap().unwrap();
    assert_eq!((rows.len(), rows.text(10, 0).unwrap().as_deref(), rows.text(10, 1).unwrap().as_deref()), (11, Some("11"), Some("older")));
}
