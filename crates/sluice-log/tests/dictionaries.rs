//! Trained dictionaries: round trips across versions and rotations, retention keeping
//! what old segments need, crashes during training, rotation and re-packing, corrupt
//! dictionary files, drift, and re-packing small batches.

mod common;

use bytes::Bytes;
use common::*;
use sluice_log::{Codec, DictionaryAction, DictionarySettings, Log, LogConfig, LogError, Record, Stream, StreamOptions, StoredRecord};
use std::sync::Arc;

/// Scooter-telemetry-like records (shape A) or credit-decision-like ones (shape B).
fn event(i: usize, shape_b: bool) -> Record {
    let v = if shape_b {
        format!(
            "{{\"decision_id\":\"cd-{i:08}\",\"applicant\":{{\"age\":{},\"income_band\":\"{}\",\"country\":\"{}\"}},\"score\":{}.{},\"approved\":{},\"limit_eur\":{},\"model\":\"risk-v{}\"}}",
            18 + i % 60,
            ["low", "mid", "high"][i % 3],
            ["DE", "SE", "NL", "FR"][i % 4],
            300 + i % 550,
            i % 100,
            i % 3 != 0,
            (i % 20) * 500,
            1 + i % 4
        )
    } else {
        format!(
            "{{\"event_id\":\"ev-{i:08}\",\"type\":\"{}\",\"scooter_id\":\"sc-{:05}\",\"lat\":52.{:04},\"lon\":13.{:04},\"battery\":{},\"region\":\"{}\",\"speed_kmh\":{}.{}}}",
            ["ride_start", "ride_end", "telemetry", "low_battery"][i % 4],
            i % 3000,
            (i * 7919) % 10000,
            (i * 104729) % 10000,
            i % 101,
            ["berlin", "paris", "madrid"][i % 3],
            i % 25,
            i % 10
        )
    };
    Record { key: Some(Bytes::from(format!("k{}", i % 97))), value: Bytes::from(v), timestamp_ms: 1_700_000_000_000 + i as i64, template: None }
}

fn settings(train_after: u64) -> DictionarySettings {
    DictionarySettings { enabled: true, train_after_records: train_after, sample_records: 2000, max_bytes: 16 << 10, retrain_drift_pct: 25 }
}

fn open(dir: &std::path::Path, segment_bytes: u64) -> Log {
    Log::open(dir, LogConfig { segment_bytes, index_interval_bytes: 256, codec: Codec::Auto }).unwrap()
}

fn stream(log: &Log, retention_bytes: Option<u64>) -> Arc<Stream> {
    log.create_stream(
        "ev",
        StreamOptions { partitions: 2, retention_bytes, dictionary: Some(settings(500)), codec: Some(Codec::Auto), ..Default::default() },
    )
    .unwrap()
}

/// Appends records `from..to` one per batch (like one event per request), durably.
fn write_singles(s: &Stream, from: usize, to: usize, shape_b: bool) -> Vec<(u32, Record)> {
    let rt = rt();
    let mut out = Vec::new();
    for i in from..to {
        let r = event(i, shape_b);
        let p = s.partition((i % 2) as u32).unwrap();
        let a = p.append(std::slice::from_ref(&r)).unwrap();
        rt.block_on(p.sync(&a)).unwrap();
        out.push((p.id(), r));
    }
    out
}

fn all_records(s: &Stream) -> Vec<Vec<StoredRecord>> {
    s.partitions().iter().map(|p| read_all(p, p.log_start_offset(), 64 << 10)).collect()
}

fn check_equal(s: &Stream, written: &[(u32, Record)]) {
    let got = all_records(s);
    for p in 0..2u32 {
        let want: Vec<&Record> = written.iter().filter(|(q, _)| *q == p).map(|(_, r)| r).collect();
        let have = &got[p as usize];
        let skip = want.len() - have.len(); // retention may have removed the oldest
        for (w, h) in want[skip..].iter().zip(have) {
            assert_eq!((&w.key, &w.value, w.timestamp_ms), (&h.key, &h.value, h.timestamp_ms));
        }
    }
}

fn dict_batches(s: &Stream) -> Vec<(u32, u64)> {
    s.stats().unwrap().dictionaries.iter().map(|d| (d.id, d.batches)).collect()
}

#[test]
fn round_trip_across_dictionary_versions_and_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    {
        let log = open(dir.path(), 64 << 10);
        let s = stream(&log, None);
        written.extend(write_singles(&s, 0, 400, false));
        // Not enough records yet for the settings: nothing is trained.
        assert_eq!(s.maintain_dictionary().unwrap(), DictionaryAction::Nothing);
        assert!(s.current_dictionary().is_none());
        written.extend(write_singles(&s, 400, 800, false));
        let DictionaryAction::Trained { info, reason } = s.maintain_dictionary().unwrap() else { panic!("not trained") };
        assert_eq!((info.id, reason), (1, "first"));
        assert!(info.holdout_ratio < 0.6, "a dictionary should compress single records well: {info:?}");
        written.extend(write_singles(&s, 800, 1200, false));
        assert_eq!(s.train_dictionary().unwrap().unwrap().id, 2);
        written.extend(write_singles(&s, 1200, 1600, false));
        assert_eq!(s.train_dictionary().unwrap().unwrap().id, 3);
        // Nothing new: the same dictionary would come out, so none is made.
        assert!(s.train_dictionary().unwrap().unwrap_err().contains("current dictionary again"));
        written.extend(write_singles(&s, 1600, 1700, false));
        check_equal(&s, &written);
        let used = dict_batches(&s);
        assert_eq!(used, vec![(1, 400), (2, 400), (3, 100)], "batches by dictionary");
        let st = s.stats().unwrap();
        assert_eq!(st.records, 1700);
        // Singles with a dictionary store far below their raw size.
        let d1 = &st.dictionaries[0];
        assert!(d1.ratio.unwrap() < 0.6, "{d1:?}");
    }
    // After a restart every version is loaded again and everything decodes.
    let log = open(dir.path(), 64 << 10);
    let s = log.stream("ev").unwrap();
    assert_eq!(s.current_dictionary().unwrap().id(), 3);
    check_equal(&s, &written);
    // A batch decoded without its dictionary fails with an error naming it.
    let d = s.current_dictionary().unwrap();
    let plan = sluice_log::format::Plan { codec: Codec::Auto, dict: Some(&d) };
    let b = sluice_log::format::encode_batch_with(&[event(1, false)], 0, plan).unwrap();
    let e = sluice_log::format::decode_batch(&b).unwrap_err();
    assert!(e.to_string().contains("dictionary 3"), "{e}");
}

#[test]
fn retention_keeps_the_dictionaries_old_segments_need() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 4 << 10);
    let s = stream(&log, None);
    let mut written = write_singles(&s, 0, 600, false);
    assert_eq!(s.train_dictionary().unwrap().unwrap().id, 1);
    written.extend(write_singles(&s, 600, 1200, false));
    assert_eq!(s.train_dictionary().unwrap().unwrap().id, 2);
    // Dictionary 1 is retired (nobody can be using it) but its batches are retained.
    s.maintain_dictionary().unwrap();
    written.extend(write_singles(&s, 1200, 1800, false));
    let dfile = |id: u32| dir.path().join(format!("ev/dictionaries/{id:010}.dict"));
    assert!(dfile(1).exists() && dfile(2).exists());
    let st = s.stats().unwrap();
    assert!(st.dictionaries.iter().any(|d| d.id == 1 && d.retired && d.batches > 0), "{:?}", st.dictionaries);
    // Keep only the newest ~2 KiB per partition: the segments using dictionary 1 go, and
    // then so does its file; dictionary 2's batches are partly retained, and it stays.
    drop(s);
    drop(log);
    let log = open(dir.path(), 4 << 10);
    let s = stream(&log, Some(8 << 10));
    s.apply_retention(0).unwrap();
    let deleted = s.maintain_dictionary();
    assert!(deleted.is_ok());
    assert!(!dfile(1).exists(), "dictionary 1 is needed by no retained batch");
    assert!(dfile(2).exists());
    check_equal(&s, &written);
    drop(s);
    drop(log);
    // And after a restart the retained batches still decode.
    let log = open(dir.path(), 4 << 10);
    let s = log.stream("ev").unwrap();
    check_equal(&s, &written);
    assert!(dict_batches(&s).iter().all(|(id, n)| *id != 1 || *n == 0));
}

/// 600 records, dictionary 1 trained on them, 100 more written with it; the log closed.
fn trained_and_closed(dir: &std::path::Path) -> Vec<(u32, Record)> {
    let log = open(dir, 64 << 10);
    let s = stream(&log, None);
    let mut w = write_singles(&s, 0, 600, false);
    s.train_dictionary().unwrap().unwrap();
    w.extend(write_singles(&s, 600, 700, false));
    w
}

#[test]
fn a_crash_during_training_or_rotation_leaves_the_log_readable() {
    let dir = tempfile::tempdir().unwrap();
    let written = trained_and_closed(dir.path());
    let ddir = dir.path().join("ev/dictionaries");
    // A crash while writing the next dictionary file (the tmp file of write_atomic) ...
    std::fs::write(ddir.join("0000000002.dict.tmp"), b"half a dictio").unwrap();
    // ... or after it was written but before state.json named it current.
    let one = std::fs::read(ddir.join("0000000001.dict")).unwrap();
    let (mut info, content) = sluice_log::dict::decode_file(&one).unwrap();
    info.id = 3;
    std::fs::write(ddir.join("0000000003.dict"), sluice_log::dict::encode_file(&info, &content)).unwrap();
    // ... or while writing state.json.
    std::fs::write(ddir.join("state.json.tmp"), b"{\"curr").unwrap();
    let log = open(dir.path(), 64 << 10);
    let s = log.stream("ev").unwrap();
    assert_eq!(s.current_dictionary().unwrap().id(), 1, "the switch never happened");
    check_equal(&s, &written);
    let mut left: Vec<String> = std::fs::read_dir(&ddir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, vec!["0000000001.dict", "state.json"]);
    // The next dictionary gets a fresh id and works.
    assert_eq!(s.train_dictionary().unwrap().unwrap().id, 2);
    let mut w = written.clone();
    w.extend(write_singles(&s, 700, 800, false));
    check_equal(&s, &w);
}

#[test]
fn a_corrupt_dictionary_file_is_reported_and_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let written = trained_and_closed(dir.path());
    let f = dir.path().join("ev/dictionaries/0000000001.dict");
    let mut b = std::fs::read(&f).unwrap();
    let at = b.len() - 100;
    b[at] ^= 0x55;
    std::fs::write(&f, b).unwrap();

    let log = open(dir.path(), 64 << 10);
    let s = log.stream("ev").unwrap();
    assert!(s.current_dictionary().is_none(), "a corrupt dictionary must not be used");
    // Batches written without it still read; the first batch that needs it fails with
    // an error naming the stream, the dictionary and the file.
    let p = s.partition(0).unwrap();
    let before = p.read(0, 1 << 20).unwrap();
    assert_eq!(before.len(), 300, "the 300 batches before the dictionary read");
    let e = p.read(300, 1 << 20).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, LogError::Dictionary { id: 1, .. }), "{msg}");
    assert!(msg.contains("\"ev\"") && msg.contains("CRC mismatch") && msg.contains("0000000001.dict"), "{msg}");
    let st = s.stats().unwrap();
    assert!(st.dictionaries[0].unusable.is_some(), "{:?}", st.dictionaries);
    // New batches go without it, and a new dictionary takes a new id.
    let more = write_singles(&s, 700, 710, false);
    assert!(dict_batches(&s).iter().all(|(id, _)| *id == 1));
    assert_eq!(s.train_dictionary().unwrap().unwrap().id, 2);
    let p1 = s.partition(1).unwrap();
    assert_eq!(p1.read(0, 1 << 20).unwrap().len(), 300);
    let _ = (written, more);
}

#[test]
fn drift_retrains_and_steady_data_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 64 << 10);
    let s = stream(&log, None);
    write_singles(&s, 0, 600, false);
    assert!(matches!(s.maintain_dictionary().unwrap(), DictionaryAction::Trained { reason: "first", .. }));
    // More of the same shape: checked, no retraining.
    write_singles(&s, 600, 1800, false);
    assert_eq!(s.maintain_dictionary().unwrap(), DictionaryAction::Nothing);
    assert_eq!(s.current_dictionary().unwrap().id(), 1);
    // Another shape: it drifted, so a new dictionary is trained.
    write_singles(&s, 1800, 3000, true);
    let DictionaryAction::Trained { info, reason } = s.maintain_dictionary().unwrap() else { panic!("no retraining") };
    assert_eq!((info.id, reason), (2, "drift"));
}

#[test]
fn repacking_small_batches_keeps_every_record_and_shrinks_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let written;
    let (before, after);
    {
        let log = open(dir.path(), 16 << 10);
        let s = stream(&log, None);
        let mut w = write_singles(&s, 0, 600, false);
        s.train_dictionary().unwrap().unwrap();
        w.extend(write_singles(&s, 600, 2000, false));
        written = w;
        before = s.stats().unwrap();
        let r = s.repack(1 << 20).unwrap();
        assert!(r.segments > 0 && r.batches_after < r.batches_before / 10, "{r:?}");
        assert!(r.bytes_after < r.bytes_before, "{r:?}");
        check_equal(&s, &written);
        after = s.stats().unwrap();
        // A second pass finds nothing left to do.
        assert_eq!(s.repack(1 << 20).unwrap().segments, 0);
        // Offsets, timestamps and lookups by time are unchanged.
        let p = s.partition(0).unwrap();
        assert_eq!(p.offset_for_timestamp(1_700_000_000_000 + 1000).unwrap(), 500);
    }
    assert_eq!(before.records, after.records);
    assert!(after.stored_bytes < before.stored_bytes * 2 / 3, "{} -> {}", before.stored_bytes, after.stored_bytes);
    let log = open(dir.path(), 16 << 10);
    let s = log.stream("ev").unwrap();
    check_equal(&s, &written);
}

#[test]
fn a_crash_during_repacking_leaves_the_segment_intact() {
    let dir = tempfile::tempdir().unwrap();
    let written;
    let seg;
    {
        let log = open(dir.path(), 16 << 10);
        let s = stream(&log, None);
        written = write_singles(&s, 0, 800, false);
        seg = s.partition(0).unwrap().segments()[0].path.clone();
    }
    // A half-written re-packed copy next to its segment (the crash came before the rename).
    let tmp = seg.with_extension("repack");
    std::fs::write(&tmp, &std::fs::read(&seg).unwrap()[..100]).unwrap();
    let log = open(dir.path(), 16 << 10);
    let s = log.stream("ev").unwrap();
    assert!(!tmp.exists());
    check_equal(&s, &written);
}
