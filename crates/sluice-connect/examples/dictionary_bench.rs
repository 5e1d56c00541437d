//! Stored bytes and CPU per event of log batches by codec and batch size, with and
//! without a trained dictionary, and what re-packing sealed segments makes of small
//! batches. Run by `bench/dictionaries.sh`, which writes the table to bench/RESULTS.md:
//!
//! ```text
//! python3 ../shared/bench/gen_events.py --count 200000 > /tmp/ev.ndjson
//! dictionary_bench /tmp/ev.ndjson
//! ```
//!
//! Part 1 encodes the events in batches of 1, 16, 100 and 1000 exactly as the log stores
//! them (42-byte header + framed records, compressed), one thread, no I/O, and times the
//! encoding (CPU per event) and decoding. gzip and brotli are not log codecs: their rows
//! compress the same framed payload and add the same header, for comparison. The
//! dictionary is trained like the log trains it (20,000 of the first events, zstd's
//! trainer, the default size); every codec is measured on the events after those.
//!
//! Part 2 writes the same events through the real log (one batch per request, as HTTP
//! ingest does), with the dictionary trained by `maintain_dictionary` as the server's
//! housekeeping would, then re-packs the sealed segments and reports stored bytes/event
//! before and after, and the CPU time of each phase.

use std::io::Write;
use std::time::Instant;

use bytes::Bytes;
use sluice_log::dict::{DictInfo, Dictionary};
use sluice_log::format::{decode_batch_with, encode_batch_with, DictLookup, Plan, HEADER_LEN};
use sluice_log::{Codec, DictionarySettings, Log, LogConfig, Record, StreamOptions};

struct One(std::sync::Arc<Dictionary>);
impl DictLookup for One {
    fn dictionary(&self, _id: u32) -> Result<std::sync::Arc<Dictionary>, String> {
        Ok(self.0.clone())
    }
}

/// CPU time of this thread, in ns.
fn cpu_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// CPU time of the whole process, in ns (part 2 uses blocking threads too).
fn process_cpu_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

#[derive(Clone, Copy)]
enum Kind {
    Log(Codec, bool),
    Gzip(u32),
    Brotli(u32),
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: dictionary_bench EVENTS.ndjson");
    let data = std::fs::read(&path).expect("read input");
    let records: Vec<Record> = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| Record::new(Bytes::copy_from_slice(l), 1_767_225_600_000 + i as i64))
        .collect();
    let train_n = 20_000.min(records.len() / 4);
    let (train, measure) = records.split_at(train_n);
    let raw_per_event = measure.iter().map(|r| r.value.len()).sum::<usize>() as f64 / measure.len() as f64;

    // The dictionary, trained as the log does: each sample framed as a batch of its own.
    let samples: Vec<Vec<u8>> = train
        .iter()
        .map(|r| {
            let b = encode_batch_with(std::slice::from_ref(r), 0, Plan::plain(Codec::None)).unwrap();
            b[HEADER_LEN..].to_vec()
        })
        .collect();
    let t = Instant::now();
    let content = zstd::dict::from_samples(&samples, DictionarySettings::default().max_bytes as usize).expect("train");
    let train_ms = t.elapsed().as_millis();
    let info = DictInfo { id: 1, created_ms: 0, sample_records: train_n as u64, sample_bytes: 0, size_bytes: content.len() as u64, holdout_ratio: 0.0, level: 3 };
    let dict = One(std::sync::Arc::new(Dictionary::new(info, Bytes::from(content)).unwrap()));

    let mut out = String::new();
    let mut say = |s: String| {
        println!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    say(format!(
        "{} events ({raw_per_event:.1} bytes/event raw), measured on the {} after the first {train_n}; dictionary {} KiB trained on those {train_n} in {train_ms} ms.\n",
        records.len(),
        measure.len(),
        dict.0.content().len() / 1024
    ));
    say("### Part 1: stored bytes/event and CPU ns/event (encode / decode), one thread\n".into());
    say("| codec | batch 1 | batch 16 | batch 100 | batch 1000 |".into());
    say("|---|---|---|---|---|".into());
    let kinds = [
        ("none", Kind::Log(Codec::None, false)),
        ("lz4", Kind::Log(Codec::Lz4, false)),
        ("zstd-3", Kind::Log(Codec::Zstd(3), false)),
        ("zstd-3 + dictionary", Kind::Log(Codec::Zstd(3), true)),
        ("auto (default)", Kind::Log(Codec::Auto, true)),
        ("gzip-6", Kind::Gzip(6)),
        ("brotli-5", Kind::Brotli(5)),
        ("brotli-9", Kind::Brotli(9)),
    ];
    let mut zstd1000 = 0.0;
    let mut figures = Vec::new();
    for (name, kind) in kinds {
        let mut row = format!("| {name} |");
        for bs in [1usize, 16, 100, 1000] {
            let (bytes, enc, dec) = measure_one(measure, bs, kind, &dict);
            let n = measure.len() as f64;
            if name == "zstd-3" && bs == 1000 {
                zstd1000 = bytes as f64 / n;
            }
            figures.push((name, bs, bytes as f64 / n, enc as f64 / n));
            row.push_str(&format!(" {:.1} B · {:.0} / {:.0} ns |", bytes as f64 / n, enc as f64 / n, dec as f64 / n));
        }
        say(row);
    }
    say(String::new());
    let get = |name: &str, bs: usize| figures.iter().find(|f| f.0 == name && f.1 == bs).map(|f| (f.2, f.3)).unwrap();
    for bs in [1, 16] {
        let (b, c) = get("zstd-3 + dictionary", bs);
        let (_, c0) = get("zstd-3", bs);
        say(format!(
            "- batch {bs} with dictionary, as written: {b:.1} B/event = {:.2}x zstd-3 at batch 1000 ({zstd1000:.1}); encode CPU {:+.1}% vs zstd-3 without dictionary",
            b / zstd1000,
            (c / c0 - 1.0) * 100.0
        ));
    }
    say(String::new());

    // Dictionary sizes and sample sizes (the default: 16 KiB trained on 20,000 records).
    say("### Dictionary size and training sample (zstd-3 + dictionary)\n".into());
    say("| dictionary | trained on | training CPU | batch 1 | batch 16 |".into());
    say("|---|---|---|---|---|".into());
    for (size_kib, n) in [(16usize, 5_000usize), (16, 20_000), (32, 20_000), (64, 20_000), (110, 20_000)] {
        let n = n.min(samples.len());
        let t = cpu_ns();
        let Ok(content) = zstd::dict::from_samples(&samples[samples.len() - n..], size_kib << 10) else { continue };
        let train_ms = (cpu_ns() - t) / 1_000_000;
        let info = DictInfo { id: 1, created_ms: 0, sample_records: n as u64, sample_bytes: 0, size_bytes: content.len() as u64, holdout_ratio: 0.0, level: 3 };
        let d = One(std::sync::Arc::new(Dictionary::new(info, Bytes::from(content)).unwrap()));
        let mut row = format!("| {size_kib} KiB | {n} records | {train_ms} ms |");
        for bs in [1usize, 16] {
            let (bytes, enc, _) = measure_one(measure, bs, Kind::Log(Codec::Zstd(3), true), &d);
            let n = measure.len() as f64;
            row.push_str(&format!(" {:.1} B · {:.0} ns |", bytes as f64 / n, enc as f64 / n));
        }
        say(row);
    }
    say(String::new());

    say("### Part 2: through the log (one batch per request), then re-packed\n".into());
    say("| batch size | codec | as written B/event | write CPU ns/event (appends + fsyncs) | dictionaries trained · CPU | re-packed B/event | re-pack CPU ns/event |".into());
    say("|---|---|---|---|---|---|---|".into());
    for bs in [1usize, 16] {
        for (name, codec, dict_on) in [("zstd-3", Codec::Zstd(3), false), ("zstd-3 + dictionary", Codec::Zstd(3), true), ("auto (default)", Codec::Auto, true)] {
            say(through_log(&records, bs, name, codec, dict_on, zstd1000));
        }
    }
    if let Ok(p) = std::env::var("DICT_BENCH_OUT") {
        std::fs::File::create(p).and_then(|mut f| f.write_all(out.as_bytes())).expect("write output");
    }
}

/// (stored bytes, encode ns, decode ns) of `recs` in batches of `bs`.
fn measure_one(recs: &[Record], bs: usize, kind: Kind, dict: &One) -> (usize, u128, u128) {
    let batches: Vec<&[Record]> = recs.chunks(bs).collect();
    let mut stored = 0usize;
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(batches.len());
    let t = cpu_ns();
    for b in &batches {
        let e = match kind {
            Kind::Log(codec, with_dict) => {
                let plan = Plan { codec, dict: with_dict.then_some(&*dict.0) };
                encode_batch_with(b, 0, plan).unwrap()
            }
            Kind::Gzip(level) => {
                let raw = encode_batch_with(b, 0, Plan::plain(Codec::None)).unwrap();
                let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
                z.write_all(&raw[HEADER_LEN..]).unwrap();
                let mut c = raw[..HEADER_LEN].to_vec();
                c.extend(z.finish().unwrap());
                c
            }
            Kind::Brotli(q) => {
                let raw = encode_batch_with(b, 0, Plan::plain(Codec::None)).unwrap();
                let mut c = raw[..HEADER_LEN].to_vec();
                {
                    let mut w = brotli::CompressorWriter::new(&mut c, 4096, q, 22);
                    w.write_all(&raw[HEADER_LEN..]).unwrap();
                }
                c
            }
        };
        stored += e.len();
        encoded.push(e);
    }
    let enc = cpu_ns() - t;
    let t = cpu_ns();
    for e in &encoded {
        match kind {
            Kind::Log(..) => {
                decode_batch_with(e, dict).unwrap();
            }
            Kind::Gzip(_) => {
                let mut o = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&e[HEADER_LEN..]), &mut o).unwrap();
            }
            Kind::Brotli(_) => {
                let mut o = Vec::new();
                std::io::Read::read_to_end(&mut brotli::Decompressor::new(&e[HEADER_LEN..], 4096), &mut o).unwrap();
            }
        }
    }
    (stored, enc, cpu_ns() - t)
}

/// Writes `recs` through a real log in batches of `bs`, training as the server would,
/// then re-packs; one table row.
fn through_log(recs: &[Record], bs: usize, name: &str, codec: Codec, dict_on: bool, zstd1000: f64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig { segment_bytes: 1 << 20, index_interval_bytes: 4096, codec }).unwrap();
    let settings = DictionarySettings { enabled: dict_on, ..Default::default() };
    let s = log.create_stream("ev", StreamOptions { partitions: 1, codec: Some(codec), dictionary: Some(settings), ..Default::default() }).unwrap();
    let p = s.partition(0).unwrap().clone();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let t = process_cpu_ns();
    let mut since = 0;
    let mut training = 0;
    for (i, b) in recs.chunks(bs).enumerate() {
        p.append(b).unwrap();
        since += b.len();
        if i % 64 == 63 {
            rt.block_on(p.sync_all()).unwrap();
        }
        // The server's housekeeping runs every few seconds; here every 5,000 records.
        if since >= 5_000 {
            rt.block_on(p.sync_all()).unwrap();
            let t = process_cpu_ns();
            s.maintain_dictionary().unwrap();
            training += process_cpu_ns() - t;
            since = 0;
        }
    }
    rt.block_on(p.sync_all()).unwrap();
    let write = process_cpu_ns() - t - training;
    let before = s.stats().unwrap();
    let t = process_cpu_ns();
    let r = s.repack(1 << 20).unwrap();
    let repack = process_cpu_ns() - t;
    let after = s.stats().unwrap();
    let n = recs.len() as f64;
    let b_after = after.stored_bytes as f64 / n;
    format!(
        "| {bs} | {name} | {:.1} | {:.0} | {} · {} ms | {b_after:.1} ({:.2}x zstd-3 batch 1000) | {:.0} ({} segments) |",
        before.stored_bytes as f64 / n,
        write as f64 / n,
        after.dictionaries.len(),
        training / 1_000_000,
        b_after / zstd1000,
        repack as f64 / n,
        r.segments,
    )
}
