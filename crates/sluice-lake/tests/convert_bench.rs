//! Throughput of `convert` on the reference workload. Ignored by default (tests never
//! assert timings); run with
//! `cargo test --release -p sluice-lake --test convert_bench -- --ignored --nocapture`.
//! Uses `$SLUICE_EVENTS` (an NDJSON file) if set, else runs `../shared/bench/gen_events.py`.

use std::time::Instant;

use sluice_lake::convert::{convert, ConvertOptions, InputRecord};

fn events() -> Vec<u8> {
    if let Ok(path) = std::env::var("SLUICE_EVENTS") {
        return std::fs::read(path).expect("read $SLUICE_EVENTS");
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/bench/gen_events.py"
    );
    let out = std::process::Command::new("python3")
        .args([script, "--count", "100000"])
        .output()
        .expect("run gen_events.py");
    assert!(out.status.success(), "gen_events.py failed");
    out.stdout
}

/// The NDJSON lines as log records of 4 partitions, 1.7 s apart.
fn records(data: &[u8]) -> Vec<InputRecord<'_>> {
    data.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, v)| InputRecord {
            partition: (i % 4) as u32,
            offset: i as u64,
            timestamp_ms: 1_772_323_200_000 + i as i64 * 1700,
            value: v,
        })
        .collect()
}

/// CPU time of this thread in seconds (Linux), to report rates unaffected by other load.
fn thread_cpu() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

#[test]
#[ignore]
fn convert_throughput() {
    let data = events();
    let records = records(&data);
    let bytes: usize = records.iter().map(|r| r.value.len()).sum();
    let opts = ConvertOptions {
        partition_by: vec!["region".into()],
        ..Default::default()
    };

    // New table: the schema is inferred along the way.
    let (t, c0) = (Instant::now(), thread_cpu());
    let first = convert(None, &records, &opts);
    let cold = t.elapsed().as_secs_f64();
    let cold_cpu = thread_cpu().zip(c0).map(|(a, b)| a - b);
    assert!(first.rejects.is_empty(), "{:?}", &first.rejects[..1]);
    assert_eq!(first.num_rows(), records.len());

    // Steady state: the table schema is known; commits of 10k records.
    let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (t, c0) = (Instant::now(), thread_cpu());
        let mut rows = 0;
        for chunk in records.chunks(10_000) {
            let c = convert(Some(&first.schema), chunk, &opts);
            rows += c.num_rows();
        }
        assert_eq!(rows, records.len());
        best = best.min(t.elapsed().as_secs_f64());
        if let Some(c) = thread_cpu().zip(c0).map(|(a, b)| a - b) {
            best_cpu = best_cpu.min(c);
        }
    }
    let n = records.len() as f64;
    println!(
        "records: {} ({:.0} bytes avg)",
        records.len(),
        bytes as f64 / n
    );
    let mb = bytes as f64 / 1e6;
    println!("| case | records/s (wall) | MB/s (wall) | records/s per CPU-second |");
    println!("|---|---|---|---|");
    println!(
        "| new table, 1 call | {:.0} | {:.1} | {:.0} |",
        n / cold,
        mb / cold,
        n / cold_cpu.unwrap_or(f64::NAN)
    );
    println!(
        "| known schema, 10k/call | {:.0} | {:.1} | {:.0} |",
        n / best,
        mb / best,
        n / best_cpu
    );
}

/// What the Parquet settings cost on the converted reference workload, and what deltalake's
/// write path adds on top of plain Parquet encoding. Ignored by default; run with
/// `cargo test --workspace --test convert_bench -- --ignored --nocapture parquet`.
#[test]
#[ignore]
fn parquet_write_costs() {
    use deltalake::parquet::arrow::ArrowWriter;
    use deltalake::parquet::basic::{Compression, ZstdLevel};
    use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};

    let data = events();
    let records = records(&data);
    let opts = ConvertOptions::default();
    let converted = convert(None, &records, &opts);
    let n = records.len() as f64;
    println!("| parquet settings | records/s per CPU-second | bytes/record |");
    println!("|---|---|---|");
    // (zstd level or None for uncompressed, statistics, dictionary page limit or None for no
    // dictionary); parquet-rs' default dictionary page limit is 1 MiB.
    let cases: &[(Option<i32>, EnabledStatistics, Option<usize>)] = &[
        (Some(3), EnabledStatistics::Page, Some(1 << 20)),
        (Some(1), EnabledStatistics::Page, Some(1 << 20)),
        (Some(1), EnabledStatistics::Chunk, Some(1 << 20)),
        (Some(1), EnabledStatistics::Page, None),
        (Some(1), EnabledStatistics::Page, Some(64 << 10)),
        (Some(3), EnabledStatistics::Page, Some(64 << 10)),
        (Some(1), EnabledStatistics::Page, Some(16 << 10)),
        (Some(3), EnabledStatistics::Page, Some(16 << 10)),
        (Some(3), EnabledStatistics::Page, Some(4 << 10)),
        (None, EnabledStatistics::Page, Some(1 << 20)),
    ];
    let cases = cases.iter().map(|&(level, stats, dict)| {
        let compression = match level {
            Some(l) => Compression::ZSTD(ZstdLevel::try_new(l).unwrap()),
            None => Compression::UNCOMPRESSED,
        };
        let mut b = WriterProperties::builder()
            .set_compression(compression)
            .set_statistics_enabled(stats)
            .set_dictionary_enabled(dict.is_some());
        if let Some(limit) = dict {
            b = b.set_dictionary_page_size_limit(limit);
        }
        let name = format!(
            "{}, {stats:?} stats, {}",
            level.map_or("uncompressed".to_string(), |l| format!("zstd({l})")),
            dict.map_or("no dictionary".to_string(), |d| format!("dictionary pages up to {} KiB", d >> 10))
        );
        (name, b.build())
    });
    // Encodes `batches` with `props`: (records per CPU-second, bytes per record).
    let encode = |props: WriterProperties, batches: &[deltalake::arrow::record_batch::RecordBatch]| {
        let c0 = thread_cpu();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, converted.schema.clone(), Some(props)).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
        let cpu = thread_cpu().zip(c0).map(|(a, b)| a - b).unwrap_or(f64::NAN);
        (n / cpu, out.len() as f64 / n)
    };
    for (name, props) in cases {
        let (rate, size) = encode(props, &converted.batches);
        println!("| {name} | {rate:.0} | {size:.1} |");
    }

    // Sluice's settings (zstd(1), page statistics, 16 KiB dictionary pages) with other
    // fallback encodings.
    {
        use deltalake::parquet::basic::Encoding;
        use deltalake::parquet::file::properties::WriterVersion;
        use deltalake::parquet::schema::types::ColumnPath;
        let base = || {
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap()))
                .set_statistics_enabled(EnabledStatistics::Page)
                .set_dictionary_page_size_limit(16 << 10)
        };
        let cases = [
            ("sluice (v1 pages, PLAIN fallback)", base().build()),
            ("v2 (DELTA_BINARY_PACKED / DELTA_BYTE_ARRAY fallback)", base().set_writer_version(WriterVersion::PARQUET_2_0).build()),
            (
                "v1, _offset DELTA_BINARY_PACKED without dictionary",
                base()
                    .set_column_dictionary_enabled(ColumnPath::from("_offset"), false)
                    .set_column_encoding(ColumnPath::from("_offset"), Encoding::DELTA_BINARY_PACKED)
                    .build(),
            ),
        ];
        for (name, props) in cases {
            let (rate, size) = encode(props, &converted.batches);
            println!("| {name} | {rate:.0} | {size:.1} |");
        }
        // Rows grouped by kind (`type`) first: one sort + take, then the same settings.
        use deltalake::arrow::compute::{sort_to_indices, take_record_batch};
        let c0 = thread_cpu();
        let sorted: Vec<_> = converted
            .batches
            .iter()
            .map(|b| {
                let idx = sort_to_indices(b.column_by_name("type").unwrap(), None, None).unwrap();
                take_record_batch(b, &idx).unwrap()
            })
            .collect();
        let sort_cpu = thread_cpu().zip(c0).map(|(a, b)| a - b).unwrap_or(f64::NAN);
        let (rate, size) = encode(base().build(), &sorted);
        println!("| rows grouped by type, then sluice's settings (sort+take {:.0} records/CPU-s) | {rate:.0} | {size:.1} |", n / sort_cpu);
    }

    // The whole LakeTable::append (deltalake's write path: partitioning by date, Parquet,
    // statistics, commit), wall time on a multi-threaded runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    rt.block_on(async {
        let mut t = sluice_lake::delta::LakeTable::create(
            &root,
            "t",
            &converted.schema,
            &[opts.date_column.clone()],
        )
        .await
        .unwrap();
        for round in 0..3 {
            let start = Instant::now();
            t.append(converted.batches.clone(), &[("b:t:0".into(), round)])
                .await
                .unwrap();
            let s = start.elapsed().as_secs_f64();
            println!("LakeTable::append of {n} records: {:.3}s wall = {:.0} records/s", s, n / s);
        }
    });
}
