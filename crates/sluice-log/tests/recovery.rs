//! Crash recovery: torn tails are truncated, corruption in the middle is reported, never
//! truncated, and sealed-segment indexes are rebuilt when missing or wrong.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use common::*;
use proptest::prelude::*;
use sluice_log::{Log, LogConfig, LogError, StreamOptions};

/// Writes `n` synced batches of 5 records to stream "s" partition 0; returns the
/// active segment path.
fn write_batches(dir: &std::path::Path, config: LogConfig, n: usize) -> PathBuf {
    let log = Log::open(dir, config).unwrap();
    let p = log.create_stream("s", StreamOptions::default()).unwrap().partition(0).unwrap().clone();
    let rt = rt();
    for i in 0..n {
        let a = p.append(&batch(i * 5, 5)).unwrap();
        rt.block_on(p.sync(&a)).unwrap();
    }
    p.segments().last().unwrap().path.clone()
}

fn open_p(dir: &std::path::Path, config: LogConfig) -> (Log, std::sync::Arc<sluice_log::Partition>) {
    let log = Log::open(dir, config).unwrap();
    let p = log.stream("s").unwrap().partition(0).unwrap().clone();
    (log, p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn torn_tail_is_truncated(
        n in 2usize..8,
        cut_frac in 0.0f64..1.0,
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
        cut in any::<bool>(),
        small_segments in any::<bool>(),
    ) {
        prop_assume!(cut || !garbage.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(if small_segments { 700 } else { 1 << 20 });
        let seg = write_batches(dir.path(), config, n);
        let bounds = batch_bounds(&seg);
        let &(start, end, base, _) = bounds.last().unwrap();
        let mut keep_records = n as u64 * 5;
        if cut {
            let at = start + 1 + ((end - start - 2) as f64 * cut_frac) as usize;
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(at as u64).unwrap();
            keep_records = base;
        }
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&garbage).unwrap();
        drop(f);

        let (_log, p) = open_p(dir.path(), config);
        prop_assert_eq!(p.high_watermark(), keep_records);
        let got = read_all(&p, 0, 1000);
        prop_assert_eq!(got.len() as u64, keep_records);
        let expected = batch(0, keep_records as usize);
        for (w, g) in expected.iter().zip(&got) {
            prop_assert!(same(w, g));
        }
        // The file was truncated to the last whole batch.
        let len = std::fs::metadata(&seg).unwrap().len() as usize;
        prop_assert_eq!(len, if cut { start } else { end });
        // New appends continue at the right offset and survive another reopen.
        let a = p.append(&batch(keep_records as usize, 5)).unwrap();
        prop_assert_eq!(a.first_offset, keep_records);
        rt().block_on(p.sync(&a)).unwrap();
        drop(p);
        drop(_log);
        let (_log, p) = open_p(dir.path(), config);
        let got = read_all(&p, 0, usize::MAX);
        prop_assert_eq!(got.len() as u64, keep_records + 5);
        let expected = batch(0, keep_records as usize + 5);
        for (w, g) in expected.iter().zip(&got) {
            prop_assert!(same(w, g));
        }
    }
}

fn flip(path: &std::path::Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

#[test]
fn corrupt_middle_batch_in_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(1 << 20);
    let seg = write_batches(dir.path(), config, 5);
    let bounds = batch_bounds(&seg);
    let (start, end, base, _) = bounds[2];
    flip(&seg, (start + 42 + end) / 2); // inside the payload
    let (_log, p) = open_p(dir.path(), config);
    assert_eq!(p.high_watermark(), 25, "valid data after the bad batch is kept");
    assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, bounds[4].1, "nothing truncated");
    // Batches before it read fine; a read spanning it stops before it.
    let r = p.read(0, usize::MAX).unwrap();
    assert_eq!(r.len(), 10);
    assert!(r.iter().zip(batch(0, 10).iter()).all(|(g, w)| same(w, g)));
    // Reading the bad batch names the segment and the batch base offset.
    for from in [base, base + 2] {
        match p.read(from, usize::MAX) {
            Err(LogError::Corrupt { segment, offset }) => {
                assert_eq!(segment, seg);
                assert_eq!(offset, base);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    let msg = p.read(base, 1).unwrap_err().to_string();
    assert!(msg.contains(&seg.display().to_string()) && msg.contains(&base.to_string()), "{msg}");
    // Batches after it still read fine, and appends continue after the last batch.
    let r = p.read(15, usize::MAX).unwrap();
    assert_eq!(r.len(), 10);
    assert!(r.iter().zip(batch(15, 10).iter()).all(|(g, w)| same(w, g)));
    let a = p.append(&batch(25, 1)).unwrap();
    assert_eq!(a.first_offset, 25);
}

#[test]
fn corrupt_header_length_in_active_segment_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(1 << 20);
    let seg = write_batches(dir.path(), config, 5);
    let bounds = batch_bounds(&seg);
    let (start, _, base, _) = bounds[1];
    // Make the length field point far past the end of the file.
    let mut data = std::fs::read(&seg).unwrap();
    data[start + 4] = 0x0f;
    std::fs::write(&seg, data).unwrap();
    let (_log, p) = open_p(dir.path(), config);
    assert_eq!(p.high_watermark(), 25);
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 5);
    assert!(matches!(p.read(base, 10), Err(LogError::Corrupt { offset, .. }) if offset == base));
    assert_eq!(read_all(&p, 10, usize::MAX).len(), 15);
}

#[test]
fn corrupt_batch_in_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    // One batch per segment: every segment but the last is sealed.
    let config = cfg(1);
    write_batches(dir.path(), config, 5);
    let (log, p) = open_p(dir.path(), config);
    let segs = p.segments();
    assert_eq!(segs.len(), 5);
    let victim = segs[2].clone();
    assert!(!victim.active);
    assert!(victim.path.with_extension("idx").exists(), "sealed segments have an .idx");
    drop(p);
    drop(log);
    let len = std::fs::metadata(&victim.path).unwrap().len() as usize;
    flip(&victim.path, len - 3);
    let (_log, p) = open_p(dir.path(), config);
    assert_eq!(p.high_watermark(), 25);
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 10);
    match p.read(victim.base_offset, usize::MAX) {
        Err(LogError::Corrupt { segment, offset }) => {
            assert_eq!(segment, victim.path);
            assert_eq!(offset, victim.base_offset);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(read_all(&p, 15, usize::MAX).len(), 10);
}

#[test]
fn sealed_segment_cut_at_a_batch_boundary_is_corrupt_not_a_gap() {
    for drop_idx in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        // One batch per segment: emptying a sealed one loses a whole batch and leaves no
        // torn bytes behind.
        let config = cfg(1);
        write_batches(dir.path(), config, 5);
        let (log, p) = open_p(dir.path(), config);
        let victim = p.segments()[2].clone();
        drop(p);
        drop(log);
        OpenOptions::new().write(true).open(&victim.path).unwrap().set_len(0).unwrap();
        if drop_idx {
            std::fs::remove_file(victim.path.with_extension("idx")).unwrap();
        }
        let (_log, p) = open_p(dir.path(), config);
        assert_eq!(p.high_watermark(), 25);
        // The records before the loss come first; reading on reports the loss instead of
        // skipping from offset 9 to 15.
        let first = p.read(0, usize::MAX).unwrap();
        assert_eq!(first.iter().map(|r| r.offset).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        for from in 10..15 {
            match p.read(from, usize::MAX) {
                Err(LogError::Corrupt { segment, offset }) => {
                    assert_eq!(segment, victim.path, "drop_idx {drop_idx}");
                    assert_eq!(offset, 10, "drop_idx {drop_idx}");
                }
                other => panic!("drop_idx {drop_idx} from {from}: expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(read_all(&p, 15, usize::MAX).len(), 10);
    }
}

#[test]
fn garbage_at_end_of_sealed_segment_is_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(1);
    write_batches(dir.path(), config, 3);
    let (log, p) = open_p(dir.path(), config);
    let first = p.segments()[0].clone();
    drop(p);
    drop(log);
    let mut f = OpenOptions::new().append(true).open(&first.path).unwrap();
    f.write_all(&[0xB1, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    drop(f);
    let (_log, p) = open_p(dir.path(), config);
    assert_eq!(p.high_watermark(), 15);
    // The junk lies after the segment's last record and the next segment starts right
    // there: every record is still readable.
    assert_eq!(p.read(0, usize::MAX).unwrap().len(), 5);
    assert_eq!(read_all(&p, 0, usize::MAX).len(), 15);
    assert!(std::fs::metadata(&first.path).unwrap().len() > first.size_bytes, "nothing truncated");
}

#[test]
fn missing_or_bad_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cfg(300);
    config.index_interval_bytes = 1;
    write_batches(dir.path(), config, 12);
    let (log, p) = open_p(dir.path(), config);
    let segs = p.segments();
    assert!(segs.len() >= 4, "{}", segs.len());
    drop(p);
    drop(log);
    std::fs::remove_file(segs[0].path.with_extension("idx")).unwrap();
    std::fs::write(segs[1].path.with_extension("idx"), b"garbage").unwrap();
    let idx2 = segs[2].path.with_extension("idx");
    let mut data = std::fs::read(&idx2).unwrap();
    let n = data.len();
    data[n - 1] ^= 1; // entries CRC no longer matches
    std::fs::write(&idx2, data).unwrap();
    // An orphan index (its segment deleted) is removed.
    let orphan = dir.path().join("s/0/00000000000000999999.idx");
    std::fs::write(&orphan, b"x").unwrap();
    let (_log, p) = open_p(dir.path(), config);
    assert!(!orphan.exists());
    assert_eq!(p.segments(), segs);
    let got = read_all(&p, 0, 100);
    assert_eq!(got.len(), 60);
    for from in 0..60u64 {
        assert_eq!(p.read(from, 0).unwrap()[0].offset, from);
    }
    assert!(segs[0].path.with_extension("idx").exists(), "rebuilt index was written");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Arbitrary damage to segment files (byte flips, truncation, junk) never makes open
    /// or read panic: open succeeds and reads return records or errors.
    #[test]
    fn damaged_segments_never_panic(
        n in 1usize..10,
        small_segments in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()), 0..6),
        truncate in proptest::option::of((any::<prop::sample::Index>(), any::<prop::sample::Index>())),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
        drop_idx in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(if small_segments { 400 } else { 1 << 20 });
        write_batches(dir.path(), config, n);
        let pdir = dir.path().join("s/0");
        let mut segs: Vec<PathBuf> = std::fs::read_dir(&pdir).unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        for (s, at, x) in flips {
            let path = &segs[s.index(segs.len())];
            let mut data = std::fs::read(path).unwrap();
            if !data.is_empty() {
                let i = at.index(data.len());
                data[i] ^= x | 1;
                std::fs::write(path, data).unwrap();
            }
        }
        if let Some((s, at)) = truncate {
            let path = &segs[s.index(segs.len())];
            let len = std::fs::metadata(path).unwrap().len() as usize;
            OpenOptions::new().write(true).open(path).unwrap().set_len(at.index(len + 1) as u64).unwrap();
        }
        let last = segs.last().unwrap();
        OpenOptions::new().append(true).open(last).unwrap().write_all(&junk).unwrap();
        if drop_idx {
            for s in &segs {
                let _ = std::fs::remove_file(s.with_extension("idx"));
            }
        }
        let (_log, p) = open_p(dir.path(), config);
        let hw = p.high_watermark();
        for from in p.log_start_offset()..hw + 2 {
            match p.read(from, 100) {
                Ok(recs) => {
                    for (i, r) in recs.iter().enumerate() {
                        prop_assert!(r.offset >= from && r.offset < hw);
                        if i > 0 { prop_assert_eq!(r.offset, recs[i - 1].offset + 1); }
                    }
                }
                Err(LogError::Corrupt { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
        // The partition still accepts writes at its end.
        let a = p.append(&batch(0, 2)).unwrap();
        prop_assert_eq!(a.first_offset, p.next_offset() - 2);
        rt().block_on(p.sync(&a)).unwrap();
        prop_assert_eq!(p.read(a.first_offset, 100).unwrap().len(), 2);
    }
}
