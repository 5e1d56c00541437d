//! Property tests of request-body decoding: every encoding round-trips, the decoded-size
//! limit always holds, arbitrary bytes never panic, and a truncated or corrupted body is
//! rejected rather than accepted as a shorter body (that would store part of a request).

use std::io::Write;

use proptest::prelude::*;
use sluice_connect::http::{decode_body, Encoding};

fn compress(encoding: Encoding, data: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Identity => data.to_vec(),
        Encoding::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(data).unwrap();
            gz.finish().unwrap()
        }
        Encoding::Zstd => zstd::encode_all(data, 1).unwrap(),
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 22);
                w.write_all(data).unwrap();
            }
            out
        }
    }
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::Identity),
        Just(Encoding::Gzip),
        Just(Encoding::Zstd),
        Just(Encoding::Brotli),
    ]
}

/// Body-like data: NDJSON-ish text with repetition (compressible) or random bytes.
fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2000),
        ("[a-z0-9\":,{} ]{0,60}", 1..200usize)
            .prop_map(|(line, n)| format!("{line}\n").repeat(n).into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_and_limit(enc in encoding(), data in data(), slack in 0u64..3) {
        let body = compress(enc, &data);
        let got = decode_body(enc, &body, 1 << 20).unwrap();
        prop_assert_eq!(&*got, &data[..]);
        // Exactly at the limit passes; one byte under fails with 413.
        let limit = data.len() as u64;
        prop_assert_eq!(&*decode_body(enc, &body, limit + slack).unwrap(), &data[..]);
        if limit > 0 {
            let err = decode_body(enc, &body, limit - 1).unwrap_err();
            prop_assert_eq!(err.status(), 413, "{}", err);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_respect_the_limit(
        enc in encoding(),
        body in prop::collection::vec(any::<u8>(), 0..600),
        limit in 0u64..5000,
    ) {
        match decode_body(enc, &body, limit) {
            Ok(out) => prop_assert!(out.len() as u64 <= limit),
            Err(e) => prop_assert!(matches!(e.status(), 400 | 413), "{}", e),
        }
    }

    #[test]
    fn truncated_or_corrupted_bodies_are_never_a_shorter_body(
        enc in prop_oneof![Just(Encoding::Gzip), Just(Encoding::Zstd), Just(Encoding::Brotli)],
        data in data(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in 1u8..=255,
    ) {
        prop_assume!(!data.is_empty());
        let body = compress(enc, &data);
        // Truncated anywhere: an error, never a prefix of the data passed off as the whole.
        let at = cut.index(body.len());
        if let Ok(out) = decode_body(enc, &body[..at], 1 << 20) {
            prop_assert_eq!(&*out, &data[..], "truncated at {} of {} decoded to {} bytes", at, body.len(), out.len());
        }
        // One corrupted byte: an error, or (where the format has no checksum over that byte)
        // some output — but never a panic and never over the limit.
        let mut bad = body.clone();
        let i = flip.index(bad.len());
        bad[i] ^= byte;
        if let Ok(out) = decode_body(enc, &bad, 1 << 20) {
            prop_assert!(out.len() <= 1 << 20);
        }
    }
}
