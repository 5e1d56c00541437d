//! CPU cost per event of the ingest path's stages, one core, no I/O (not a benchmark with a
//! reference; see bench/ for those):
//!
//! ```text
//! python3 ../shared/bench/gen_events.py --count 200000 > /tmp/ev.ndjson
//! cargo run -p sluice-connect --example ingest_costs -- /tmp/ev.ndjson [records-per-request]
//! ```
//!
//! Prints ns/event for parsing a request (validation + key/event-time probe), for encoding
//! its log batch under each codec and decoding it again, and the stored bytes/event.

use std::time::Instant;

use bytes::Bytes;
use sluice_connect::http::parse_events;
use sluice_log::format::{decode_batch, encode_batch};
use sluice_log::{Codec, Record};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: ingest_costs FILE.ndjson [records-per-request]");
    let per_request: usize = args.next().map_or(10_000, |s| s.parse().expect("a number"));
    let data = std::fs::read(&path).expect("read input");
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let bodies: Vec<Vec<u8>> = lines.chunks(per_request).map(|c| c.join(&b'\n')).collect();
    let n = lines.len() as f64;
    println!("{} events, {:.1} bytes/event, {} per request", lines.len(), data.len() as f64 / n, per_request);

    let t = Instant::now();
    let mut parsed = 0;
    for b in &bodies {
        parsed += parse_events(b, None, Some("ts")).expect("valid input").len();
    }
    println!("{:<28} {:>7.0} ns/event", "parse (probe ts)", t.elapsed().as_nanos() as f64 / parsed as f64);

    let requests: Vec<Vec<Record>> = bodies
        .iter()
        .map(|b| {
            let body = Bytes::copy_from_slice(b);
            parse_events(&body, None, Some("ts"))
                .expect("valid input")
                .iter()
                .map(|r| Record::new(body.slice_ref(r.raw), r.time_ms.unwrap_or(0)))
                .collect()
        })
        .collect();
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd(-3), Codec::Zstd(-1), Codec::Zstd(1), Codec::Zstd(3)] {
        let t = Instant::now();
        let batches: Vec<Vec<u8>> = requests.iter().map(|r| encode_batch(r, 0, codec).expect("encode")).collect();
        let encode = t.elapsed().as_nanos() as f64 / n;
        let t = Instant::now();
        for b in &batches {
            decode_batch(b).expect("decode");
        }
        let decode = t.elapsed().as_nanos() as f64 / n;
        let stored: usize = batches.iter().map(Vec::len).sum();
        println!(
            "{:<28} {encode:>7.0} ns/event, decode {decode:>5.0} ns/event, {:>6.1} bytes/event",
            format!("encode {codec}"),
            stored as f64 / n
        );
    }
}
