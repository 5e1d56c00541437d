//! Round trip: random batches across several segments, read back, reopen, read again.

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use sluice_log::{Codec, Log, Record, StreamOptions, Template};
use std::sync::Arc;

fn record() -> impl Strategy<Value = Record> {
    let key = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24));
    let value = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(Vec::new()),
        // large and compressible
        1 => (1usize..6000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        // large and incompressible
        1 => proptest::collection::vec(any::<u8>(), 1000..3000),
    ];
    let ts = prop_oneof![any::<i64>(), -5_000i64..5_000, Just(i64::MIN), Just(i64::MAX)];
    // Some records fill one of two templates with pieces of their value (runs of records
    // with one template are a batch each).
    (key, value, ts, 0..4usize).prop_map(|(k, v, ts, t)| match TEMPLATES.get(t) {
        Some(template) => {
            let mut fields = Vec::new();
            for i in 0..template.fields() {
                Template::field(&mut fields, |out| out.extend_from_slice(&v[v.len() * i / 2..v.len() * (i + 1) / 2]));
            }
            Record { key: k.map(Bytes::from), value: Bytes::from(fields), timestamp_ms: ts, template: Some(template.clone()) }
        }
        None => Record { key: k.map(Bytes::from), value: Bytes::from(v), timestamp_ms: ts, template: None },
    })
}

static TEMPLATES: std::sync::LazyLock<[Arc<Template>; 2]> = std::sync::LazyLock::new(|| {
    [
        Arc::new(Template::new(vec![Bytes::from_static(b"{\"a\":"), Bytes::from_static(b",\"b\":"), Bytes::from_static(b"}")])),
        Arc::new(Template::new(vec![Bytes::from(vec![b'x'; 200]), Bytes::new(), Bytes::from_static(b"!")])),
    ]
});

/// Batches one append writes: one per run of records with one template.
fn runs(b: &[Record]) -> usize {
    b.chunk_by(|x, y| x.template == y.template).count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn write_read_reopen_round_trip(
        batches in proptest::collection::vec(proptest::collection::vec(record(), 1..12), 1..25),
        segment_bytes in prop_oneof![Just(1u64), 300u64..3000],
        // The stream's codec changes between batches (as a reload would): reads decode all.
        codecs in proptest::collection::vec(prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1)), Just(Codec::Zstd(3)), Just(Codec::Zstd(-1))], 1..4),
        max_bytes in prop_oneof![Just(0usize), 1usize..5000, Just(usize::MAX)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(segment_bytes);
        let written: Vec<Record> = batches.iter().flatten().cloned().collect();
        let rt = rt();
        {
            let log = Log::open(dir.path(), config).unwrap();
            let s = log.create_stream("rt", StreamOptions { partitions: 2, ..Default::default() }).unwrap();
            let p = s.partition(1).unwrap();
            let mut next = 0u64;
            for (i, b) in batches.iter().enumerate() {
                let codec = codecs[i % codecs.len()];
                log.create_stream("rt", StreamOptions { partitions: 2, codec: Some(codec), ..Default::default() }).unwrap();
                prop_assert_eq!(s.options().codec, Some(codec));
                let a = p.append(b).unwrap();
                prop_assert_eq!(a.first_offset, next);
                prop_assert_eq!(a.last_offset, next + b.len() as u64 - 1);
                next = a.last_offset + 1;
                if i % 3 == 0 {
                    rt.block_on(p.sync(&a)).unwrap();
                }
            }
            rt.block_on(p.sync_all()).unwrap();
            prop_assert_eq!(p.high_watermark(), written.len() as u64);
            let got = read_all(p, 0, max_bytes);
            prop_assert_eq!(got.len(), written.len());
            for (w, g) in written.iter().zip(&got) {
                prop_assert!(same(w, g), "{:?} != {:?}", w, g);
            }
            if segment_bytes == 1 {
                prop_assert_eq!(p.segments().len(), batches.iter().map(|b| runs(b)).sum::<usize>());
            }
            // Partition 0 is untouched.
            prop_assert!(s.partition(0).unwrap().read(0, 100).unwrap().is_empty());
        }
        let log = Log::open(dir.path(), config).unwrap();
        let s = log.stream("rt").unwrap();
        let p = s.partition(1).unwrap();
        prop_assert_eq!(p.high_watermark(), written.len() as u64);
        let got = read_all(p, 0, max_bytes);
        prop_assert_eq!(got.len(), written.len());
        for (w, g) in written.iter().zip(&got) {
            prop_assert!(same(w, g), "{:?} != {:?}", w, g);
        }
        // Reading from the middle starts exactly there.
        let mid = written.len() as u64 / 2;
        let tail = read_all(p, mid, max_bytes);
        prop_assert_eq!(tail.len() as u64, written.len() as u64 - mid);
        // Appends continue at the right offset after reopen.
        let a = p.append(&batch(0, 3)).unwrap();
        prop_assert_eq!(a.first_offset, written.len() as u64);
        rt.block_on(p.sync(&a)).unwrap();
        prop_assert_eq!(read_all(p, 0, usize::MAX).len(), written.len() + 3);
    }
}

#[test]
fn reads_stop_near_max_bytes_and_return_at_least_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
    let p = log.create_stream("s", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
    let rt = rt();
    for i in 0..10 {
        let a = p.append(&batch(i * 10, 10)).unwrap();
        rt.block_on(p.sync(&a)).unwrap();
    }
    // max_bytes 0 still returns one whole batch.
    assert_eq!(p.read(0, 0).unwrap().len(), 10);
    // From the middle of a batch: the rest of that batch.
    let r = p.read(15, 0).unwrap();
    assert_eq!(r.first().unwrap().offset, 15);
    assert_eq!(r.len(), 5);
    // A small limit stops after a few batches, a big one returns everything.
    let r = p.read(0, 300).unwrap();
    assert!(r.len() < 100 && r.len().is_multiple_of(10), "{}", r.len());
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 100);
    assert!(p.read(100, usize::MAX).unwrap().is_empty());
    assert!(p.read(1000, usize::MAX).unwrap().is_empty());
    // bytes_after shrinks as the offset grows.
    let all = p.bytes_after(0);
    assert!(all > 0 && all <= p.size_bytes());
    assert!(p.bytes_after(50) < all);
    assert_eq!(p.bytes_after(100), 0);
}

#[test]
fn streams_are_listed_sorted_and_create_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
    for n in ["zeta", "alpha", "mid-1"] {
        log.create_stream(n, StreamOptions { partitions: 3, ..Default::default() }).unwrap();
    }
    let again = log.create_stream("alpha", StreamOptions { partitions: 7, retention_bytes: Some(10), retention_ms: None, codec: None, dictionary: None }).unwrap();
    assert_eq!(again.partitions().len(), 3);
    assert_eq!(again.options().retention_bytes, Some(10));
    assert!(matches!(log.create_stream("Bad.Name", StreamOptions::default()), Err(sluice_log::LogError::InvalidName(_))));
    assert!(log.create_stream("zero", StreamOptions { partitions: 0, ..Default::default() }).is_err());
    // A directory without meta.json is not a stream.
    std::fs::create_dir_all(dir.path().join("half").join("0")).unwrap();
    drop(log);
    let log = Log::open(dir.path(), cfg(1 << 20)).unwrap();
    let names: Vec<String> = log.streams().iter().map(|s| s.name().to_string()).collect();
    assert_eq!(names, ["alpha", "mid-1", "zeta"]);
    let alpha = log.stream("alpha").unwrap();
    assert_eq!(alpha.partitions().len(), 3);
    assert_eq!(alpha.options().retention_bytes, Some(10), "retention persisted in meta.json");
    assert_eq!(alpha.partition(2).unwrap().id(), 2);
    assert!(alpha.partition(3).is_none());
    assert!(log.stream("half").is_none());
    let k = alpha.partition_for_key(b"user-1");
    assert!(k < 3);
    assert_eq!(k, alpha.partition_for_key(b"user-1"));
    // The half-created stream can be created for real.
    let half = log.create_stream("half", StreamOptions { partitions: 2, ..Default::default() }).unwrap();
    assert_eq!(half.partitions().len(), 2);
}
