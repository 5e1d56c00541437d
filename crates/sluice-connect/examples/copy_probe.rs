//! How fast tokio-postgres receives a snapshot's chunk COPYs (binary, gathered like
//! `postgres_cdc::snapshot::copy_out`) on each kind of runtime: `mt` two worker threads (the
//! source's), `mt1` one worker, `ct` a current-thread runtime (a snapshot's reading thread).
//! Against the table of bench/cdc_bench.py's (b) (`snap_table`):
//!
//!     copy_probe 'host=127.0.0.1 port=5432 user=postgres dbname=postgres' 1000000 16384 ct 3
use futures::StreamExt;
use std::time::Instant;

async fn run(url: String, rows: usize, chunk: usize, rounds: usize) {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..rounds {
        let t = Instant::now();
        let mut total = 0usize;
        let mut msgs = 0usize;
        for k in (0..rows).step_by(chunk) {
            let sql = format!("COPY (SELECT t.id::pg_catalog.int8, t.v::pg_catalog.text, t.n::pg_catalog.int4, t.at::pg_catalog.timestamptz FROM public.snap t WHERE (t.id) > ({k}) ORDER BY t.id LIMIT {chunk}) TO STDOUT (FORMAT binary)");
            let copy = client.copy_out(sql.as_str()).await.unwrap();
            futures::pin_mut!(copy);
            let mut out: Vec<u8> = Vec::new();
            while let Some(d) = copy.next().await {
                let d = d.unwrap();
                if out.is_empty() {
                    out.reserve(d.len().saturating_mul(chunk).min(32 << 20));
                }
                out.extend_from_slice(&d);
                msgs += 1;
            }
            total += out.len();
        }
        println!("{:.3} s, {total} bytes, {msgs} messages", t.elapsed().as_secs_f64());
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (url, rows, chunk, mode, rounds) = (a[1].clone(), a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].as_str(), a[5].parse().unwrap());
    let rt = match mode {
        "ct" => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        "mt1" => tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap(),
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(),
    };
    rt.block_on(run(url, rows, chunk, rounds));
}
