//! HTTP ingest: turns one request body into validated records, or one precise error.
//!
//! A request is atomic: either every record in it parses, or the request is rejected
//! with the line (and column) of the first problem and nothing is stored.
//!
//! Accepted bodies: NDJSON (one object per line), a JSON array of objects, or a single
//! object (which may span lines). `Content-Encoding`: identity, gzip, zstd, br.

mod parse;

pub use parse::{parse_events, ParsedRecord, RecordError};

use std::io::Read;

/// A request body's content encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
    Brotli,
}

impl Encoding {
    /// Parses a `Content-Encoding` header value. One encoding only.
    pub fn from_header(value: Option<&str>) -> Result<Encoding, IngestError> {
        let v = value.map(|v| v.trim().to_ascii_lowercase()).unwrap_or_default();
        match v.as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "zstd" => Ok(Encoding::Zstd),
            "br" => Ok(Encoding::Brotli),
            other => Err(IngestError::UnsupportedEncoding(other.to_string())),
        }
    }
}

/// Why a request was rejected. `status()` gives the HTTP status.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IngestError {
    #[error("unsupported Content-Encoding {0:?}: use gzip, zstd, br or none")]
    UnsupportedEncoding(String),
    #[error("body is not valid {encoding}: {message}")]
    BadEncoding { encoding: &'static str, message: String },
    #[error("body too large: over {limit} bytes {what}")]
    TooLarge { limit: u64, what: &'static str },
    #[error("{0}")]
    BadRecord(RecordError),
    #[error("body holds no records")]
    Empty,
}

impl IngestError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            IngestError::UnsupportedEncoding(_) => 415,
            IngestError::TooLarge { .. } => 413,
            IngestError::BadEncoding { .. } | IngestError::BadRecord(_) | IngestError::Empty => 400,
        }
    }
}

/// Decompresses a body, refusing to produce more than `max_decoded` bytes (so a small
/// compressed bomb cannot exhaust memory).
pub fn decode_body(encoding: Encoding, body: &[u8], max_decoded: u64) -> Result<std::borrow::Cow<'_, [u8]>, IngestError> {
    let too_large = IngestError::TooLarge { limit: max_decoded, what: "after decompression" };
    let name = match encoding {
        Encoding::Identity => {
            if body.len() as u64 > max_decoded {
                return Err(too_large);
            }
            return Ok(std::borrow::Cow::Borrowed(body));
        }
        Encoding::Gzip => "gzip",
        Encoding::Zstd => "zstd",
        Encoding::Brotli => "br",
    };
    let reader: Box<dyn Read + '_> = match encoding {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Encoding::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(body)
                .map_err(|e| IngestError::BadEncoding { encoding: name, message: e.to_string() })?,
        ),
        Encoding::Brotli => Box::new(brotli::Decompressor::new(body, 64 * 1024)),
        Encoding::Identity => unreachable!("handled above"),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(max_decoded as usize));
    let n = reader
        .take(max_decoded + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::BadEncoding { encoding: name, message: e.to_string() })?;
    if n as u64 > max_decoded {
        return Err(too_large);
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Decompresses a zstd body compressed with a stream's dictionary (the client names it
/// in `Sluice-Dictionary-Id`), with the same limit as [`decode_body`].
pub fn decode_zstd_with_dictionary(
    body: &[u8],
    dict: &zstd::dict::DecoderDictionary<'_>,
    max_decoded: u64,
) -> Result<Vec<u8>, IngestError> {
    let bad = |e: std::io::Error| IngestError::BadEncoding { encoding: "zstd with the named dictionary", message: e.to_string() };
    let reader = zstd::stream::read::Decoder::with_prepared_dictionary(std::io::BufReader::new(body), dict).map_err(bad)?;
    let mut out = Vec::with_capacity((body.len() * 4).min(max_decoded as usize));
    let n = reader.take(max_decoded + 1).read_to_end(&mut out).map_err(bad)?;
    if n as u64 > max_decoded {
        return Err(IngestError::TooLarge { limit: max_decoded, what: "after decompression" });
    }
    Ok(out)
}

/// Picks the partition of a key: FNV-1a 64 of the key bytes modulo the partition count.
/// Stable across versions and machines (records with one key stay in one partition).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % partitions.max(1) as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn encodings() {
        assert_eq!(Encoding::from_header(None).unwrap(), Encoding::Identity);
        assert_eq!(Encoding::from_header(Some("GZIP")).unwrap(), Encoding::Gzip);
        let e = Encoding::from_header(Some("compress")).unwrap_err();
        assert_eq!(e.status(), 415);
    }

    #[test]
    fn decode_all() {
        let data = b"{\"a\":1}\n".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(&*decode_body(Encoding::Gzip, &gz, 1 << 20).unwrap(), &data[..]);
        let z = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(&*decode_body(Encoding::Zstd, &z, 1 << 20).unwrap(), &data[..]);
        let mut br = Vec::new();
        brotli::CompressorWriter::new(&mut br, 4096, 5, 22).write_all(&data).unwrap();
        assert_eq!(&*decode_body(Encoding::Brotli, &br, 1 << 20).unwrap(), &data[..]);
        // bomb: limit applies to the decoded size
        let e = decode_body(Encoding::Zstd, &z, 100).unwrap_err();
        assert_eq!(e.status(), 413);
        // garbage
        let e = decode_body(Encoding::Gzip, b"not gzip", 1 << 20).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        let e = decode_body(Encoding::Zstd, b"not zstd", 1 << 20).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
    }

    #[test]
    fn partitioner_is_stable() {
        assert_eq!(partition_for_key(b"WND-00001", 8), partition_for_key(b"WND-00001", 8));
        let mut seen = [0; 4];
        for i in 0..1000 {
            seen[partition_for_key(format!("k{i}").as_bytes(), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }
}
