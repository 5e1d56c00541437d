//! The batch format of Sluice's segment files.
//!
//! This format is hand-written on purpose: the durable log is part of the product's
//! novelty (CRC-checked batches with group commit, recovery rules tied to Sluice's
//! acknowledgement contract), so there is no library to delegate it to. It follows the
//! shape of Kafka's record batches, much simplified.
//!
//! A segment file is a plain sequence of batches. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    1 magic / version          (MAGIC_V1 = 0xB1)
//!      1    4 length of the rest       (bytes after this field: CRC + header rest + payload)
//!      5    4 CRC32 (crc32fast)        over every byte after this field
//!      9    8 base offset              (offset of the first record)
//!     17    4 record count             (>= 1)
//!     21    8 min timestamp (ms)
//!     29    8 max timestamp (ms)
//!     37    1 codec                    (0 = none, 1 = zstd, 2 = lz4 block, 3 = zstd with a
//!                                       trained dictionary; + 0x80: templated payload)
//!     38    4 uncompressed payload length
//!     42    . payload                  (compressed unless codec = 0; with codec 3 it
//!                                       starts with the dictionary id, u32)
//! ```
//!
//! The uncompressed payload is the records, one after another, each framed as
//! `varint(key_len + 1, or 0 when there is no key) key-bytes
//!  zigzag-varint(timestamp - min timestamp) varint(value_len) value-bytes`.
//! Varints are unsigned LEB128; record offsets are implicit (base offset + index).
//!
//! A templated payload (codec byte + [`TEMPLATED`]) starts with the records' shared
//! [`crate::Template`]: `varint(piece count) (varint(len) piece-bytes)*`; each record's
//! value-bytes are then its fields, `(varint(len) field-bytes)*`, one fewer than the
//! pieces, and the value readers get is the pieces with the fields between them.
//!
//! Decoding never panics on any input: every problem is a [`FormatError`].

use bytes::Bytes;
use std::cell::RefCell;
use std::sync::Arc;

use crate::dict::Dictionary;
use crate::{Record, StoredRecord};

/// Magic/version byte of a version-1 batch.
pub const MAGIC_V1: u8 = 0xB1;
/// Size of the fixed batch header.
pub const HEADER_LEN: usize = 42;
/// Largest encoded batch, and largest uncompressed payload, accepted.
pub const MAX_BATCH_BYTES: usize = 256 << 20;
/// Codec byte: payload stored as is.
pub const CODEC_NONE: u8 = 0;
/// Codec byte: payload compressed with zstd.
pub const CODEC_ZSTD: u8 = 1;
/// Codec byte: payload compressed as one LZ4 block (lz4_flex).
pub const CODEC_LZ4: u8 = 2;
/// Codec byte: payload = dictionary id (u32) + a zstd frame compressed with that
/// stream dictionary (see [`crate::dict`]).
pub const CODEC_ZSTD_DICT: u8 = 3;
/// Added to the codec byte: the payload is templated (see the module documentation).
pub const TEMPLATED: u8 = 0x80;
/// Under [`Codec::Auto`], batches with less than this many bytes of records are
/// compressed with zstd (and the stream's dictionary), larger ones with lz4.
pub const AUTO_SMALL_BATCH_BYTES: usize = 64 << 10;
/// The zstd level of [`Codec::Auto`]'s small batches.
pub const AUTO_ZSTD_LEVEL: i32 = 3;
/// Batches with up to this many bytes of records use the stream's dictionary. zstd
/// attaches a prepared dictionary to inputs this small; above it, it copies the
/// dictionary's tables for every batch, which costs more CPU than the dictionary saves
/// bytes (measured: at 100 events a batch, 1,179 vs 626 ns/event for 6% fewer bytes).
pub const DICT_MAX_BATCH_BYTES: usize = 8 << 10;

/// How new batch payloads are compressed. Every batch records its codec, so a stream's
/// codec can change at any time and readers decode old and new batches alike. A batch
/// that the codec does not shrink is stored uncompressed.
///
/// Measured on the reference workload in 10,000-event batches, one core
/// (`examples/ingest_costs.rs` of sluice-connect): lz4 adds ~240 ns per event over storing
/// as is and keeps 79 bytes/event; zstd level 1 adds ~400 ns and keeps 49. lz4 is the default
/// because ingest and landing are CPU-bound on the hot path; zstd trades CPU for disk.
///
/// `Auto` (the default) picks per batch: small batches (one event per request, a few
/// credit decisions) get zstd level 3, with the stream's trained dictionary up to
/// [`DICT_MAX_BATCH_BYTES`]; big batches get lz4, whose speed matters there and whose
/// ratio is fine at that size. The numbers are in `bench/RESULTS.md` (issue 5 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Stored as is.
    None,
    /// LZ4 block compression.
    Lz4,
    /// zstd at this level (negative levels are zstd's fast modes), with the stream's
    /// dictionary when it has one (for batches up to [`DICT_MAX_BATCH_BYTES`]).
    Zstd(i32),
    /// zstd (+ dictionary) below [`AUTO_SMALL_BATCH_BYTES`], lz4 above.
    #[default]
    Auto,
}

impl Codec {
    /// Whether batches of this codec can use a trained dictionary.
    pub fn uses_zstd(self) -> bool {
        matches!(self, Codec::Zstd(_) | Codec::Auto)
    }

    /// The zstd level this codec compresses small batches at.
    pub fn zstd_level(self) -> i32 {
        match self {
            Codec::Zstd(l) => l,
            _ => AUTO_ZSTD_LEVEL,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::None => f.write_str("none"),
            Codec::Lz4 => f.write_str("lz4"),
            Codec::Zstd(l) => write!(f, "zstd (level {l})"),
            Codec::Auto => f.write_str("auto"),
        }
    }
}

/// How to compress the next batch: the stream's codec and its current dictionary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan<'a> {
    pub codec: Codec,
    pub dict: Option<&'a Dictionary>,
}

impl Plan<'_> {
    /// A plan without dictionary.
    pub fn plain(codec: Codec) -> Plan<'static> {
        Plan { codec, dict: None }
    }
}

/// Finds the dictionary a batch names.
pub trait DictLookup {
    /// The dictionary with this id, or why it cannot be used.
    fn dictionary(&self, id: u32) -> Result<Arc<Dictionary>, String>;
}

/// No dictionaries at all (batches that need one fail to decode).
pub struct NoDictionaries;

impl DictLookup for NoDictionaries {
    fn dictionary(&self, _id: u32) -> Result<Arc<Dictionary>, String> {
        Err("is unknown (no dictionaries available)".into())
    }
}

const LEN_AT: usize = 1;
const CRC_AT: usize = 5;
const BASE_AT: usize = 9;
const COUNT_AT: usize = 17;
const MIN_TS_AT: usize = 21;
const MAX_TS_AT: usize = 29;
const CODEC_AT: usize = 37;
const ULEN_AT: usize = 38;

/// Why some bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated { needed: u64, available: u64 },
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    #[error("bad batch length {0}")]
    BadLength(u64),
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("batch has no records")]
    Empty,
    #[error("batch too large: {0} bytes")]
    TooLarge(u64),
    #[error("bad payload: {0}")]
    Payload(&'static str),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("dictionary {id} {reason}")]
    Dictionary { id: u32, reason: String },
}

/// The parsed fixed header of a batch (not yet CRC-verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub crc: u32,
    pub base_offset: u64,
    pub record_count: u32,
    pub min_timestamp: i64,
    pub max_timestamp: i64,
    /// The codec (without [`TEMPLATED`]).
    pub codec: u8,
    /// Whether the payload is templated.
    pub templated: bool,
    pub uncompressed_len: u32,
    /// Whole batch size in bytes (header + payload).
    pub total_len: usize,
}

impl BatchHeader {
    /// One past the last offset of the batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset.saturating_add(u64::from(self.record_count))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and sanity-checks the fixed header at the start of `buf`
/// (needs at least [`HEADER_LEN`] bytes; does not check the CRC).
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, FormatError> {
    if buf.len() < HEADER_LEN {
        return Err(FormatError::Truncated { needed: HEADER_LEN as u64, available: buf.len() as u64 });
    }
    if buf[0] != MAGIC_V1 {
        return Err(FormatError::BadMagic(buf[0]));
    }
    let rest = u64::from(u32_at(buf, LEN_AT));
    let total = rest + 5;
    if total < HEADER_LEN as u64 || total > MAX_BATCH_BYTES as u64 {
        return Err(FormatError::BadLength(rest));
    }
    let h = BatchHeader {
        crc: u32_at(buf, CRC_AT),
        base_offset: u64_at(buf, BASE_AT),
        record_count: u32_at(buf, COUNT_AT),
        min_timestamp: u64_at(buf, MIN_TS_AT) as i64,
        max_timestamp: u64_at(buf, MAX_TS_AT) as i64,
        codec: buf[CODEC_AT] & !TEMPLATED,
        templated: buf[CODEC_AT] & TEMPLATED != 0,
        uncompressed_len: u32_at(buf, ULEN_AT),
        total_len: total as usize,
    };
    if !matches!(h.codec, CODEC_NONE | CODEC_ZSTD | CODEC_LZ4 | CODEC_ZSTD_DICT) {
        return Err(FormatError::UnknownCodec(buf[CODEC_AT]));
    }
    if h.record_count == 0 {
        return Err(FormatError::Empty);
    }
    if h.uncompressed_len as usize > MAX_BATCH_BYTES {
        return Err(FormatError::TooLarge(u64::from(h.uncompressed_len)));
    }
    if h.base_offset.checked_add(u64::from(h.record_count)).is_none() {
        return Err(FormatError::Payload("offsets overflow"));
    }
    Ok(h)
}

/// Checks the CRC of a whole batch (`batch.len()` must be `h.total_len`).
pub fn verify_crc(h: &BatchHeader, batch: &[u8]) -> Result<(), FormatError> {
    if batch.len() != h.total_len {
        return Err(FormatError::Truncated { needed: h.total_len as u64, available: batch.len() as u64 });
    }
    let computed = crc32fast::hash(&batch[BASE_AT..]);
    if computed != h.crc {
        return Err(FormatError::CrcMismatch { stored: h.crc, computed });
    }
    Ok(())
}

/// Decodes one whole batch at the start of `buf`: header, CRC, payload.
/// Returns the header and all its records. This is the entry point fuzzed by the tests.
pub fn decode_batch(buf: &[u8]) -> Result<(BatchHeader, Vec<StoredRecord>), FormatError> {
    decode_batch_with(buf, &NoDictionaries)
}

/// [`decode_batch`] with the dictionaries a batch may name.
pub fn decode_batch_with(buf: &[u8], dicts: &dyn DictLookup) -> Result<(BatchHeader, Vec<StoredRecord>), FormatError> {
    let h = parse_header(buf)?;
    if buf.len() < h.total_len {
        return Err(FormatError::Truncated { needed: h.total_len as u64, available: buf.len() as u64 });
    }
    let batch = &buf[..h.total_len];
    verify_crc(&h, batch)?;
    let mut out = Vec::with_capacity((h.record_count as usize).min(4096));
    let payload = &batch[HEADER_LEN..];
    decode_payload(&h, payload, None, 0, &mut out, dicts, true)?;
    Ok((h, out))
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decodes the records of a CRC-verified batch, appending those with offset >= `from`
/// to `out`. `owned` may carry the same payload bytes as a `Bytes` (for an uncompressed
/// payload it lets values share that buffer instead of being copied).
/// With `expand` false, the records of a templated batch keep their fields and template
/// (see [`StoredRecord::template`]). Returns the sum of the returned values' lengths (as
/// expanded).
pub(crate) fn decode_payload(
    h: &BatchHeader,
    payload: &[u8],
    owned: Option<Bytes>,
    from: u64,
    out: &mut Vec<StoredRecord>,
    dicts: &dyn DictLookup,
    expand: bool,
) -> Result<usize, FormatError> {
    let data: Bytes = match h.codec {
        CODEC_NONE => {
            if payload.len() != h.uncompressed_len as usize {
                return Err(FormatError::Payload("uncompressed length mismatch"));
            }
            match owned {
                Some(b) if b.len() == payload.len() => b,
                _ => Bytes::copy_from_slice(payload),
            }
        }
        CODEC_ZSTD_DICT => {
            if payload.len() < 4 {
                return Err(FormatError::Payload("dictionary id missing"));
            }
            let id = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
            let frame = &payload[4..];
            let ulen = check_frame_size(frame, h.uncompressed_len as usize)?;
            let dict = dicts.dictionary(id).map_err(|reason| FormatError::Dictionary { id, reason })?;
            let mut buf: Vec<u8> = Vec::with_capacity(ulen);
            DCTX.with(|d| -> Result<(), FormatError> {
                let mut d = d.borrow_mut();
                let dctx = d.get_or_insert_with(zstd::zstd_safe::DCtx::create);
                dctx.decompress_using_ddict(&mut buf, frame, dict.ddict())
                    .map_err(|e| FormatError::Decompress(zstd::zstd_safe::get_error_name(e).to_string()))?;
                Ok(())
            })?;
            if buf.len() != ulen {
                return Err(FormatError::Payload("uncompressed length mismatch"));
            }
            Bytes::from(buf)
        }
        CODEC_ZSTD => {
            let ulen = check_frame_size(payload, h.uncompressed_len as usize)?;
            let mut buf: Vec<u8> = Vec::with_capacity(ulen);
            DECOMPRESSOR.with(|d| -> Result<(), FormatError> {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(
                        zstd::bulk::Decompressor::new().map_err(|e| FormatError::Decompress(e.to_string()))?,
                    );
                }
                let dec = d.as_mut().ok_or(FormatError::Payload("no decompressor"))?;
                dec.decompress_to_buffer(payload, &mut buf)
                    .map_err(|e| FormatError::Decompress(e.to_string()))?;
                Ok(())
            })?;
            if buf.len() != ulen {
                return Err(FormatError::Payload("uncompressed length mismatch"));
            }
            Bytes::from(buf)
        }
        CODEC_LZ4 => {
            let ulen = h.uncompressed_len as usize;
            // An LZ4 block expands at most ~255x: refuse before allocating for a bad length.
            if ulen > payload.len().saturating_mul(255).saturating_add(16) {
                return Err(FormatError::Payload("lz4 block too small for the uncompressed length"));
            }
            let mut buf = vec![0u8; ulen];
            let n = lz4_flex::block::decompress_into(payload, &mut buf).map_err(|e| FormatError::Decompress(e.to_string()))?;
            if n != ulen {
                return Err(FormatError::Payload("uncompressed length mismatch"));
            }
            Bytes::from(buf)
        }
        c => return Err(FormatError::UnknownCodec(c)),
    };
    parse_records(h, &data, from, out, expand)
}

/// Refuses a zstd frame before allocating when it announces another size than the header.
fn check_frame_size(frame: &[u8], ulen: usize) -> Result<usize, FormatError> {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n == ulen as u64 => Ok(ulen),
        Ok(None) => Ok(ulen),
        Ok(Some(_)) => Err(FormatError::Payload("zstd frame size mismatch")),
        Err(_) => Err(FormatError::Decompress("not a zstd frame".into())),
    }
}

fn parse_records(h: &BatchHeader, data: &Bytes, from: u64, out: &mut Vec<StoredRecord>, expand: bool) -> Result<usize, FormatError> {
    let start_len = out.len();
    let r = if h.templated { parse_templated(h, data, from, out, expand) } else { parse_records_inner(h, data, 0, from, out) };
    if r.is_err() {
        out.truncate(start_len);
    }
    r
}

/// The records of a templated payload, their values filled in (one buffer for them all),
/// or, without `expand`, as their checked fields with the template.
fn parse_templated(h: &BatchHeader, data: &Bytes, from: u64, out: &mut Vec<StoredRecord>, expand: bool) -> Result<usize, FormatError> {
    let buf: &[u8] = data;
    let mut pos = 0usize;
    let count = get_varint(buf, &mut pos)?;
    // Every piece takes at least a byte.
    if count == 0 || count > (buf.len() - pos) as u64 {
        return Err(FormatError::Payload("bad template piece count"));
    }
    let mut pieces = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = usize::try_from(get_varint(buf, &mut pos)?).map_err(|_| FormatError::Payload("piece length"))?;
        let (a, b) = take(buf, &mut pos, len)?;
        pieces.push(data.slice(a..b));
    }
    let template = crate::Template::new(pieces);
    let first = out.len();
    parse_records_inner(h, data, pos, from, out)?;
    // The values' total size, known before anything is allocated for them (a small payload
    // must not make a huge one).
    let shared = template.pieces_len();
    let mut total = 0usize;
    for r in &out[first..] {
        total = total.saturating_add(r.value.len()).saturating_add(shared);
    }
    if total > MAX_BATCH_BYTES {
        return Err(FormatError::Payload("templated values too large"));
    }
    if !expand {
        let template = std::sync::Arc::new(template);
        for r in &mut out[first..] {
            template.check(&r.value).map_err(FormatError::Payload)?;
            r.template = Some(template.clone());
        }
        return Ok(total);
    }
    let mut values = Vec::with_capacity(total);
    let mut ends = Vec::with_capacity(out.len() - first);
    for r in &out[first..] {
        template.expand(&r.value, &mut values).map_err(FormatError::Payload)?;
        ends.push(values.len());
    }
    let values = Bytes::from(values);
    let mut start = 0;
    for (r, end) in out[first..].iter_mut().zip(ends) {
        r.value = values.slice(start..end);
        start = end;
    }
    Ok(values.len())
}

/// The records of an uncompressed payload from byte `pos` on.
fn parse_records_inner(
    h: &BatchHeader,
    data: &Bytes,
    mut pos: usize,
    from: u64,
    out: &mut Vec<StoredRecord>,
) -> Result<usize, FormatError> {
    let buf: &[u8] = data;
    let mut value_bytes = 0usize;
    // Every record takes at least 3 bytes, which bounds what a bad count can reserve.
    out.reserve((h.record_count as usize).min(buf.len() / 3));
    for i in 0..h.record_count {
        let offset = h.base_offset + u64::from(i);
        let key_tag = get_varint(buf, &mut pos)?;
        let key = if key_tag == 0 {
            None
        } else {
            let len = usize::try_from(key_tag - 1).map_err(|_| FormatError::Payload("key length"))?;
            Some(take(buf, &mut pos, len)?)
        };
        let delta = unzigzag(get_varint(buf, &mut pos)?);
        let timestamp_ms = h.min_timestamp.wrapping_add(delta);
        let vlen = usize::try_from(get_varint(buf, &mut pos)?).map_err(|_| FormatError::Payload("value length"))?;
        let value = take(buf, &mut pos, vlen)?;
        if offset >= from {
            value_bytes += value.1 - value.0;
            out.push(StoredRecord {
                offset,
                key: key.map(|(a, b)| data.slice(a..b)),
                value: data.slice(value.0..value.1),
                timestamp_ms,
                template: None,
            });
        }
    }
    if pos != buf.len() {
        return Err(FormatError::Payload("trailing bytes after the last record"));
    }
    Ok(value_bytes)
}

fn take(buf: &[u8], pos: &mut usize, len: usize) -> Result<(usize, usize), FormatError> {
    let end = pos.checked_add(len).ok_or(FormatError::Payload("length overflow"))?;
    if end > buf.len() {
        return Err(FormatError::Payload("record runs past the payload"));
    }
    let r = (*pos, end);
    *pos = end;
    Ok(r)
}

#[inline]
pub(crate) fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, FormatError> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(FormatError::Payload("varint runs past the payload"))?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err(FormatError::Payload("varint overflows u64"));
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
        if shift > 63 {
            return Err(FormatError::Payload("varint too long"));
        }
    }
}

#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}
#[inline]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[derive(Default)]
struct EncodeScratch {
    raw: Vec<u8>,
    out: Vec<u8>,
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    cctx: Option<zstd::zstd_safe::CCtx<'static>>,
}

/// A batch encoded everywhere but its base offset (and so its CRC), which are only
/// known under the partition's append lock.
pub(crate) struct PendingBatch {
    pub record_count: u32,
    pub max_timestamp: i64,
    /// Bytes of the framed records before compression.
    pub raw_len: usize,
    /// Bytes of the batch (header and payload) at the start of the scratch buffer.
    pub len: usize,
    payload_crc: crc32fast::Hasher,
}

/// Encoding buffers, shared by the threads that append: a blocking thread appending for the
/// first time takes warm ones instead of faulting in its own (a snapshot's batches are
/// megabytes: per-thread buffers faulted in ~40k pages per million-row snapshot).
static SCRATCH: parking_lot::Mutex<Vec<EncodeScratch>> = parking_lot::Mutex::new(Vec::new());

/// Encodes `records` into a pooled buffer and calls `f` with the pending batch and the
/// buffer (header + payload); `f` must call [`finish_batch`] before writing it.
pub(crate) fn with_encoded<R>(
    records: &[Record],
    plan: Plan<'_>,
    f: impl FnOnce(&PendingBatch, &mut [u8]) -> R,
) -> Result<R, FormatError> {
    let mut s = SCRATCH.lock().pop().unwrap_or_default();
    let r = encode_into(records, plan, &mut s).map(|pending| f(&pending, &mut s.out[..pending.len]));
    // Do not keep huge buffers alive after one big batch, nor more than the encoders that
    // run at once on a small machine.
    const KEEP: usize = 8 << 20;
    const POOLED: usize = 4;
    if s.out.capacity() > KEEP {
        s.out = Vec::new();
    }
    if s.raw.capacity() > KEEP {
        s.raw = Vec::new();
    }
    let mut pool = SCRATCH.lock();
    if pool.len() < POOLED {
        pool.push(s);
    }
    r
}

/// Appends one record in the payload framing (timestamp relative to `min_ts`).
pub(crate) fn frame_record(raw: &mut Vec<u8>, r: &Record, min_ts: i64) {
    match &r.key {
        None => raw.push(0),
        Some(k) => {
            put_varint(raw, k.len() as u64 + 1);
            raw.extend_from_slice(k);
        }
    }
    put_varint(raw, zigzag(r.timestamp_ms.wrapping_sub(min_ts)));
    put_varint(raw, r.value.len() as u64);
    raw.extend_from_slice(&r.value);
}

fn encode_into(records: &[Record], plan: Plan<'_>, s: &mut EncodeScratch) -> Result<PendingBatch, FormatError> {
    if records.is_empty() {
        return Err(FormatError::Empty);
    }
    let count = u32::try_from(records.len()).map_err(|_| FormatError::TooLarge(records.len() as u64))?;
    let template = records[0].template.as_deref();
    if !records.iter().all(|r| r.same_template(&records[0])) {
        return Err(FormatError::Payload("the records of a batch have different templates"));
    }
    let mut min_ts = i64::MAX;
    let mut max_ts = i64::MIN;
    let mut data_bytes = 0usize;
    for r in records {
        min_ts = min_ts.min(r.timestamp_ms);
        max_ts = max_ts.max(r.timestamp_ms);
        data_bytes = data_bytes.saturating_add(r.value.len()).saturating_add(r.key.as_ref().map_or(0, |k| k.len()));
    }
    // The values as readers get them are what the limit is about.
    let value_bytes = data_bytes.saturating_add(template.map_or(0, |t| t.pieces_len().saturating_mul(records.len())));
    if value_bytes > MAX_BATCH_BYTES {
        return Err(FormatError::TooLarge(value_bytes as u64));
    }
    let approx = data_bytes.saturating_add(records.len().saturating_mul(12));
    let raw = &mut s.raw;
    raw.clear();
    raw.reserve(approx);
    if let Some(t) = template {
        put_varint(raw, t.pieces().len() as u64);
        for p in t.pieces() {
            put_varint(raw, p.len() as u64);
            raw.extend_from_slice(p);
        }
    }
    for r in records {
        frame_record(raw, r, min_ts);
    }
    if raw.len() > MAX_BATCH_BYTES {
        return Err(FormatError::TooLarge(raw.len() as u64));
    }
    // The batch is built at the start of `out`, which only grows: zeroing the compressor's
    // worst case (a batch's size) for every batch cost ~2.5% of a change stream's capture.
    let out = &mut s.out;
    let codec = match plan.codec {
        Codec::Auto if raw.len() < AUTO_SMALL_BATCH_BYTES => Codec::Zstd(AUTO_ZSTD_LEVEL),
        Codec::Auto => Codec::Lz4,
        c => c,
    };
    let cdict = match (codec, plan.dict) {
        (Codec::Zstd(level), Some(d)) if raw.len() <= DICT_MAX_BATCH_BYTES => d.cdict(level).map(|c| (d.id(), c)),
        _ => None,
    };
    let compressed = match (codec, cdict) {
        (Codec::None | Codec::Auto, _) => None,
        (Codec::Zstd(_), Some((id, cd))) => {
            let end = HEADER_LEN + 4 + zstd::zstd_safe::compress_bound(raw.len());
            grow_zeroed(out, end);
            out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&id.to_le_bytes());
            let cctx = s.cctx.get_or_insert_with(zstd::zstd_safe::CCtx::create);
            cctx.compress_using_cdict(&mut out[HEADER_LEN + 4..end], raw.as_slice(), &cd)
                .ok()
                .map(|n| (n + 4, CODEC_ZSTD_DICT))
        }
        (Codec::Zstd(level), None) => {
            let end = HEADER_LEN + zstd::zstd_safe::compress_bound(raw.len());
            grow_zeroed(out, end);
            let reuse = matches!(&s.compressor, Some((l, _)) if *l == level);
            if !reuse {
                s.compressor = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
            }
            match &mut s.compressor {
                Some((_, c)) => c.compress_to_buffer(raw.as_slice(), &mut out[HEADER_LEN..end]).ok().map(|n| (n, CODEC_ZSTD)),
                None => None,
            }
        }
        (Codec::Lz4, _) => {
            let end = HEADER_LEN + lz4_flex::block::get_maximum_output_size(raw.len());
            grow_zeroed(out, end);
            lz4_flex::block::compress_into(raw, &mut out[HEADER_LEN..end]).ok().map(|n| (n, CODEC_LZ4))
        }
    };
    let (codec, len) = match compressed {
        Some((n, c)) if n < raw.len() => (c, HEADER_LEN + n),
        _ => {
            grow_zeroed(out, HEADER_LEN + raw.len());
            out[HEADER_LEN..HEADER_LEN + raw.len()].copy_from_slice(raw);
            (CODEC_NONE, HEADER_LEN + raw.len())
        }
    };
    if len > MAX_BATCH_BYTES {
        return Err(FormatError::TooLarge(len as u64));
    }
    let rest = (len - 5) as u32;
    out[0] = MAGIC_V1;
    out[LEN_AT..LEN_AT + 4].copy_from_slice(&rest.to_le_bytes());
    out[COUNT_AT..COUNT_AT + 4].copy_from_slice(&count.to_le_bytes());
    out[MIN_TS_AT..MIN_TS_AT + 8].copy_from_slice(&min_ts.to_le_bytes());
    out[MAX_TS_AT..MAX_TS_AT + 8].copy_from_slice(&max_ts.to_le_bytes());
    out[CODEC_AT] = codec | if template.is_some() { TEMPLATED } else { 0 };
    out[ULEN_AT..ULEN_AT + 4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    let mut payload_crc = crc32fast::Hasher::new();
    payload_crc.update(&out[HEADER_LEN..len]);
    Ok(PendingBatch { record_count: count, max_timestamp: max_ts, raw_len: raw.len(), len, payload_crc })
}

/// Makes `buf` at least `len` long, zeroing only what it adds.
fn grow_zeroed(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Stamps the base offset into an encoded batch and completes its CRC.
pub(crate) fn finish_batch(p: &PendingBatch, out: &mut [u8], base_offset: u64) {
    out[BASE_AT..BASE_AT + 8].copy_from_slice(&base_offset.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[BASE_AT..HEADER_LEN]);
    h.combine(&p.payload_crc);
    let crc = h.finalize();
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes one complete batch into a new vector (convenience for tools and tests).
pub fn encode_batch(records: &[Record], base_offset: u64, codec: Codec) -> Result<Vec<u8>, FormatError> {
    encode_batch_with(records, base_offset, Plan::plain(codec))
}

/// [`encode_batch`] with a dictionary.
pub fn encode_batch_with(records: &[Record], base_offset: u64, plan: Plan<'_>) -> Result<Vec<u8>, FormatError> {
    with_encoded(records, plan, |p, out| {
        finish_batch(p, out, base_offset);
        out.to_vec()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(key: Option<&[u8]>, value: &[u8], ts: i64) -> Record {
        Record { key: key.map(Bytes::copy_from_slice), value: Bytes::copy_from_slice(value), timestamp_ms: ts, template: None }
    }

    #[test]
    fn varint_round_trip_edges() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        // 11-byte varint and overflow in the 10th byte are errors, not panics.
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos).is_err());
        let mut pos = 0;
        assert!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], &mut pos).is_err());
    }

    #[test]
    fn encode_decode_every_codec() {
        let recs = vec![
            rec(Some(b"k1"), b"{\"a\":1}", 5),
            rec(None, b"", i64::MIN),
            rec(Some(b""), &[7u8; 1000], i64::MAX),
        ];
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3), Codec::Zstd(-3)] {
            let b = encode_batch(&recs, 42, codec).unwrap();
            let (h, out) = decode_batch(&b).unwrap();
            assert_eq!(h.base_offset, 42);
            assert_eq!(h.record_count, 3);
            assert_eq!(h.total_len, b.len());
            assert_eq!(out.len(), 3);
            for (i, (r, s)) in recs.iter().zip(&out).enumerate() {
                assert_eq!(s.offset, 42 + i as u64);
                assert_eq!(s.key, r.key);
                assert_eq!(s.value, r.value);
                assert_eq!(s.timestamp_ms, r.timestamp_ms);
            }
        }
        // Compressible data is stored compressed, incompressible tiny data as is.
        for (codec, byte) in [(Codec::Zstd(1), CODEC_ZSTD), (Codec::Lz4, CODEC_LZ4), (Codec::None, CODEC_NONE)] {
            let b = encode_batch(&recs, 0, codec).unwrap();
            assert_eq!(b[CODEC_AT], byte, "{codec}");
            let b = encode_batch(&[rec(None, b"x", 0)], 0, codec).unwrap();
            assert_eq!(b[CODEC_AT], CODEC_NONE, "{codec}");
        }
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let recs = vec![rec(Some(b"key"), b"value value value", 1), rec(None, b"v2", 2)];
        for codec in [Codec::Zstd(1), Codec::Lz4, Codec::None] {
            let b = encode_batch(&recs, 7, codec).unwrap();
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x40;
                assert!(decode_batch(&c).is_err(), "{codec}: flip at byte {i} not detected");
            }
            for cut in 0..b.len() {
                assert!(decode_batch(&b[..cut]).is_err());
            }
        }
    }

    /// A batch's records as [`crate::Partition::read_fields`] reads them.
    fn decode_fields(b: &[u8]) -> Result<Vec<StoredRecord>, FormatError> {
        let h = parse_header(b)?;
        let batch = b.get(..h.total_len).ok_or(FormatError::Payload("short"))?;
        verify_crc(&h, batch)?;
        let mut out = Vec::new();
        decode_payload(&h, &batch[HEADER_LEN..], None, 0, &mut out, &NoDictionaries, false)?;
        Ok(out)
    }

    /// Records of `template` with `fields` each (key `k<i>`).
    fn templated(template: &Arc<crate::Template>, rows: &[Vec<Vec<u8>>]) -> Vec<Record> {
        rows.iter()
            .enumerate()
            .map(|(i, fields)| {
                let mut f = Vec::new();
                for v in fields {
                    crate::Template::field(&mut f, |out| out.extend_from_slice(v));
                }
                Record::templated(Bytes::from(format!("k{i}")), Bytes::from(f), i as i64, template.clone())
            })
            .collect()
    }

    #[test]
    fn templated_batches_give_whole_values() {
        let t = Arc::new(crate::Template::new(vec![Bytes::from_static(b"{\"a\":"), Bytes::from_static(b",\"b\":"), Bytes::from_static(b"}")]));
        let long = vec![b'x'; 300];
        let rows = vec![vec![b"1".to_vec(), b"\"x\"".to_vec()], vec![b"".to_vec(), long.clone()], vec![b"3".to_vec(), b"null".to_vec()]];
        let recs = templated(&t, &rows);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Auto] {
            let b = encode_batch(&recs, 10, codec).unwrap();
            assert_eq!(b[CODEC_AT] & TEMPLATED, TEMPLATED, "{codec}");
            let (h, out) = decode_batch(&b).unwrap();
            assert!(h.templated);
            assert_eq!(out.len(), 3);
            assert_eq!(&out[0].value[..], b"{\"a\":1,\"b\":\"x\"}");
            assert_eq!(out[1].value, [b"{\"a\":,\"b\":".as_slice(), &long, b"}"].concat());
            assert_eq!(&out[2].value[..], b"{\"a\":3,\"b\":null}");
            for (i, (o, r)) in out.iter().zip(&recs).enumerate() {
                assert_eq!((o.offset, &o.key, o.timestamp_ms), (10 + i as u64, &r.key, r.timestamp_ms));
                assert_eq!(o.value, r.full_value());
            }
            // Reading from inside the batch.
            let mut from = Vec::new();
            decode_payload(&h, &b[HEADER_LEN..], None, 12, &mut from, &NoDictionaries, true).unwrap();
            assert_eq!(from.len(), 1);
            assert_eq!(from[0].value, out[2].value);
        }
        // Per record, the pieces (11 bytes) are not stored; two lengths are.
        let many: Vec<Vec<Vec<u8>>> = (0..1000).map(|i| vec![i.to_string().into_bytes(), b"1".to_vec()]).collect();
        let plain: Vec<Record> = templated(&t, &many).iter().map(|r| Record::with_key(r.key.clone().unwrap(), r.full_value(), r.timestamp_ms)).collect();
        let (a, b) = (encode_batch(&templated(&t, &many), 0, Codec::None).unwrap(), encode_batch(&plain, 0, Codec::None).unwrap());
        assert!(a.len() + 1000 * 8 < b.len(), "{} vs {}", a.len(), b.len());
        assert_eq!(decode_batch(&a).unwrap().1, decode_batch(&b).unwrap().1);
    }

    #[test]
    fn a_batch_has_one_template_and_fields_that_fit_it() {
        let t = Arc::new(crate::Template::new(vec![Bytes::from_static(b"<"), Bytes::from_static(b">")]));
        let other = Arc::new(crate::Template::new(vec![Bytes::from_static(b"["), Bytes::from_static(b"]")]));
        let mut recs = templated(&t, &[vec![b"1".to_vec()]]);
        recs.extend(templated(&other, &[vec![b"2".to_vec()]]));
        assert!(matches!(encode_batch(&recs, 0, Codec::None), Err(FormatError::Payload(_))));
        recs.truncate(1);
        recs.push(rec(Some(b"k"), b"plain", 0));
        assert!(matches!(encode_batch(&recs, 0, Codec::None), Err(FormatError::Payload(_))));
        // An equal template in another allocation is the same template.
        let same = Arc::new(crate::Template::new(t.pieces().to_vec()));
        let mut recs = templated(&t, &[vec![b"1".to_vec()]]);
        recs.extend(templated(&same, &[vec![b"2".to_vec()]]));
        assert_eq!(decode_batch(&encode_batch(&recs, 0, Codec::None).unwrap()).unwrap().1[1].value, Bytes::from_static(b"<2>"));
        // Fields that are not the template's: too many, too few.
        for fields in [vec![b"1".to_vec(), b"2".to_vec()], vec![]] {
            let b = encode_batch(&templated(&t, &[fields]), 0, Codec::Lz4).unwrap();
            assert!(matches!(decode_batch(&b), Err(FormatError::Payload(_))));
        }
    }

    #[test]
    fn templated_values_are_held_to_the_batch_limit() {
        // Small fields, a big template: the values readers would get are too large.
        let t = Arc::new(crate::Template::new(vec![Bytes::from(vec![b' '; 1 << 20]), Bytes::new()]));
        let recs = templated(&t, &vec![vec![b"1".to_vec()]; 300]);
        assert!(matches!(encode_batch(&recs, 0, Codec::Lz4), Err(FormatError::TooLarge(_))));
        // The same written by hand is refused before its values are built.
        let ok = encode_batch(&recs[..200], 0, Codec::Lz4).unwrap();
        let (h, _) = decode_batch(&ok).unwrap();
        let mut raw = Vec::new();
        put_varint(&mut raw, 2);
        for p in t.pieces() {
            put_varint(&mut raw, p.len() as u64);
            raw.extend_from_slice(p);
        }
        for r in &recs {
            frame_record(&mut raw, r, 0);
        }
        let h = BatchHeader { record_count: 300, uncompressed_len: raw.len() as u32, codec: CODEC_NONE, ..h };
        let e = decode_payload(&h, &raw, None, 0, &mut Vec::new(), &NoDictionaries, true).unwrap_err();
        assert_eq!(e, FormatError::Payload("templated values too large"));
    }

    #[test]
    fn empty_batch_is_rejected() {
        assert_eq!(encode_batch(&[], 0, Codec::None).unwrap_err(), FormatError::Empty);
    }

    /// Rebuilds a valid CRC over arbitrary header fields and payload so that the fuzzer
    /// reaches the payload decoder, not just the CRC check.
    fn with_valid_crc(mut b: Vec<u8>) -> Vec<u8> {
        if b.len() >= HEADER_LEN {
            b[0] = MAGIC_V1;
            let rest = (b.len() - 5) as u32;
            b[LEN_AT..LEN_AT + 4].copy_from_slice(&rest.to_le_bytes());
            let crc = crc32fast::hash(&b[BASE_AT..]);
            b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        }
        b
    }

    /// A dictionary of raw content (zstd takes any bytes as one) under id 9.
    struct OneDict(Arc<Dictionary>);

    impl DictLookup for OneDict {
        fn dictionary(&self, id: u32) -> Result<Arc<Dictionary>, String> {
            if id == self.0.id() {
                Ok(self.0.clone())
            } else {
                Err("is unknown".into())
            }
        }
    }

    fn one_dict() -> OneDict {
        let info = crate::dict::DictInfo { id: 9, created_ms: 0, sample_records: 0, sample_bytes: 0, size_bytes: 0, holdout_ratio: 1.0, level: 3 };
        let content = b"{\"type\":\"ride_start\",\"scooter_id\":\"sc-00042\",\"battery\":87}".repeat(20);
        OneDict(Arc::new(Dictionary::new(info, Bytes::from(content)).unwrap()))
    }

    #[test]
    fn dictionary_batches_round_trip_and_name_a_missing_dictionary() {
        let d = one_dict();
        let recs = vec![rec(Some(b"k"), b"{\"type\":\"ride_start\",\"scooter_id\":\"sc-00043\",\"battery\":86}", 5)];
        for codec in [Codec::Auto, Codec::Zstd(3), Codec::Zstd(-1)] {
            let b = encode_batch_with(&recs, 4, Plan { codec, dict: Some(&d.0) }).unwrap();
            assert_eq!(b[CODEC_AT], CODEC_ZSTD_DICT, "{codec}");
            let (_, out) = decode_batch_with(&b, &d).unwrap();
            assert_eq!((out[0].offset, &out[0].value), (4, &recs[0].value));
            let e = decode_batch(&b).unwrap_err();
            assert!(matches!(e, FormatError::Dictionary { id: 9, .. }), "{e}");
            // The dictionary shrinks a single record well below plain zstd.
            let plain = encode_batch(&recs, 4, codec).unwrap();
            assert!(b.len() + 10 < plain.len(), "{codec}: {} vs {}", b.len(), plain.len());
        }
        // lz4, none and Auto's big batches do not use it.
        let big: Vec<Record> = (0..10_000).map(|i| rec(None, format!("{{\"n\":{i}}}").as_bytes(), i)).collect();
        for (codec, byte) in [(Codec::Lz4, CODEC_LZ4), (Codec::None, CODEC_NONE)] {
            assert_eq!(encode_batch_with(&big, 0, Plan { codec, dict: Some(&d.0) }).unwrap()[CODEC_AT], byte);
        }
        let b = encode_batch_with(&big, 0, Plan { codec: Codec::Auto, dict: Some(&d.0) }).unwrap();
        assert_eq!(b[CODEC_AT], CODEC_LZ4);
        // Between DICT_MAX_BATCH_BYTES and AUTO_SMALL_BATCH_BYTES: zstd without it.
        let mid = &big[..1000];
        let b = encode_batch_with(mid, 0, Plan { codec: Codec::Auto, dict: Some(&d.0) }).unwrap();
        assert_eq!(b[CODEC_AT], CODEC_ZSTD);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn mutated_dictionary_batches_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..6),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            fix_crc in any::<bool>(),
        ) {
            let d = one_dict();
            let recs: Vec<Record> = values.iter().enumerate().map(|(i, v)| rec(None, v, i as i64)).collect();
            let mut b = encode_batch_with(&recs, 0, Plan { codec: Codec::Zstd(3), dict: Some(&d.0) }).unwrap();
            if flips.is_empty() {
                let (_, out) = decode_batch_with(&b, &d).unwrap();
                prop_assert_eq!(out.len(), recs.len());
                for (o, r) in out.iter().zip(&recs) {
                    prop_assert_eq!(&o.value, &r.value);
                }
            }
            for (idx, x) in flips {
                let i = idx.index(b.len());
                b[i] ^= x | 1;
            }
            if fix_crc { b = with_valid_crc(b); }
            let _ = decode_batch_with(&b, &d);
        }

        /// Any fields of any template read back as the values they make; flipped bytes
        /// (with a valid CRC or not) are an error or some records, never a panic.
        #[test]
        fn templated_batches_round_trip_and_never_panic(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..5),
            rows in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 4), 1..8),
            codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1))],
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            fix_crc in any::<bool>(),
        ) {
            let t = Arc::new(crate::Template::new(pieces.into_iter().map(Bytes::from).collect()));
            let rows: Vec<Vec<Vec<u8>>> = rows.into_iter().map(|r| r.into_iter().take(t.fields()).collect()).collect();
            let recs = templated(&t, &rows);
            let mut b = encode_batch(&recs, 5, codec).unwrap();
            let (_, out) = decode_batch(&b).unwrap();
            prop_assert_eq!(out.len(), rows.len());
            for (o, fields) in out.iter().zip(&rows) {
                let mut want = t.pieces()[0].to_vec();
                for (f, p) in fields.iter().zip(&t.pieces()[1..]) {
                    want.extend_from_slice(f);
                    want.extend_from_slice(p);
                }
                prop_assert_eq!(&o.value[..], &want[..]);
            }
            // Read as fields: the same values once filled in.
            let fields = decode_fields(&b).unwrap();
            prop_assert_eq!(fields.len(), out.len());
            for (f, o) in fields.iter().zip(&out) {
                prop_assert!(f.template.as_ref().is_some_and(|u| **u == *t));
                prop_assert!((o.value.len()..=o.value.len() + f.value.len()).contains(&f.value_len()));
                prop_assert_eq!(f.full_value(), o.value.clone());
            }
            for (idx, x) in &flips {
                let i = idx.index(b.len());
                b[i] ^= x | 1;
            }
            if fix_crc { b = with_valid_crc(b); }
            let r = decode_batch(&b);
            if !flips.is_empty() && !fix_crc {
                prop_assert!(r.is_err());
            }
            // Whatever is read as fields fits its template.
            if let Ok(recs) = decode_fields(&b) {
                for f in recs {
                    let _ = f.full_value();
                }
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_batch(&bytes);
            let _ = parse_header(&bytes);
        }

        #[test]
        fn decoding_arbitrary_payload_with_valid_crc_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN..400),
            codec in prop_oneof![0u8..5, 0x80u8..0x85],
            count in 0u32..20,
            ulen in prop_oneof![Just(None), (0u32..1000).prop_map(Some)],
        ) {
            let mut b = bytes;
            b[CODEC_AT] = codec;
            b[COUNT_AT..COUNT_AT + 4].copy_from_slice(&count.to_le_bytes());
            let ulen = ulen.unwrap_or((b.len() - HEADER_LEN) as u32);
            b[ULEN_AT..ULEN_AT + 4].copy_from_slice(&ulen.to_le_bytes());
            let b = with_valid_crc(b);
            let _ = decode_batch(&b);
        }

        #[test]
        fn mutated_valid_batches_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 1..10),
            codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1))],
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            fix_crc in any::<bool>(),
        ) {
            let recs: Vec<Record> = values.iter().enumerate()
                .map(|(i, v)| rec(if i % 2 == 0 { Some(b"kk") } else { None }, v, i as i64 * 1000 - 5000))
                .collect();
            let mut b = encode_batch(&recs, 3, codec).unwrap();
            for (idx, x) in flips {
                let i = idx.index(b.len());
                b[i] ^= x | 1;
            }
            if fix_crc { b = with_valid_crc(b); }
            let _ = decode_batch(&b);
        }
    }
}
