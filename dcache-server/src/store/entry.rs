//! The stored form of a result: a verified, versioned binary encoding.
//!
//! ```text
//! version 2 (uncompressed; written with compression off, or when zstd would not shrink):
//!   magic "DCE1" | version u16 = 2 | key [32] | body length u64 | body mac [32] | body
//! version 3 (compressed):
//!   magic "DCE1" | version u16 = 3 | key [32] | codec u8 = 1 (zstd) | body length u64
//!   | stored length u64 | body mac [32] | seal [32] | stored (one zstd frame of the body)
//! body mac: keyed blake3 under the cache's [`SealKey`] of key | body
//! seal:     keyed blake3 under the same key of "dcache entry v3 seal\0"
//!           | every header byte before the seal | stored
//! body: exit i32 | stdout len u64, bytes | stderr len u64, bytes
//!       | output count u16 | per output: name len u16, name, data len u64, data
//! ```
//!
//! Every read checks the magic, version, key and lengths first. A compressed entry is
//! checked twice: its seal before the decompressor sees a byte (a planted or damaged
//! entry never reaches zstd), then, after a decompression bounded by the declared body
//! length and the reader's limit (`store/codec.rs`), the body mac over what came out, as
//! an uncompressed entry's is. The parser then checks every length against the bytes
//! present: a torn, truncated, tampered or planted entry (one not written by a holder of
//! the cache's secret) is refused, never served. Version 1 entries (an unkeyed digest)
//! are refused as of another version; version 2 entries, from before compression, read.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use dcache_proto::{JobResult, OutputFile};

use super::StoreKey;
use super::codec::{self, Compression, DecompressError};
use super::seal::SealKey;

const MAGIC: &[u8; 4] = b"DCE1";
/// Uncompressed entries.
const PLAIN: u16 = 2;
/// Compressed entries.
const PACKED: u16 = 3;
/// The only codec of version 3 so far.
const ZSTD: u8 = 1;
/// Header of a version-2 entry.
const HEADER: usize = 4 + 2 + 32 + 8 + 32;
/// Header of a version-3 entry up to its seal, and whole.
const SEALED_HEADER: usize = 4 + 2 + 32 + 1 + 8 + 8 + 32;
const PACKED_HEADER: usize = SEALED_HEADER + 32;
/// Domain of the seal, so no body mac verifies as a seal.
const SEAL_DOMAIN: &[u8] = b"dcache entry v3 seal\0";

/// The largest body (decompressed) a store reads by default: the largest result a client
/// takes by default, so nothing larger could be of use.
pub const DEFAULT_MAX_BODY: u64 = 1 << 30;

/// Why bytes are not a valid entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// Shorter than the header, or than the length it declares.
    #[error("entry truncated")]
    Truncated,
    /// Not an entry, or from an incompatible version.
    #[error("not a dcache entry of version 2 or 3")]
    BadMagic,
    /// Stored under another key (a misplaced or swapped file).
    #[error("entry belongs to another key")]
    WrongKey,
    /// The MAC does not match: corrupted on disk, or not written by this cache.
    #[error("entry MAC mismatch")]
    Corrupt,
    /// The body's fields do not add up.
    #[error("malformed entry body")]
    Malformed,
    /// The body (decompressed) is larger than this reader takes: refused before any of
    /// it is allocated.
    #[error("entry body of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// The compressed body is not one zstd frame inflating to exactly its declared length.
    #[error("compressed entry body damaged: {0}")]
    Inflate(&'static str),
    /// A result the format cannot hold (more than 65,535 outputs, or an output name
    /// longer than 65,535 bytes); refused when writing rather than stored torn.
    #[error("result cannot be encoded: {0}")]
    Unrepresentable(&'static str),
}

impl From<DecompressError> for EntryError {
    fn from(e: DecompressError) -> Self {
        match e {
            DecompressError::TooLarge(n) => Self::TooLarge(n),
            DecompressError::Damaged(why) => Self::Inflate(why),
        }
    }
}

fn mac(seal: &SealKey, key: &StoreKey, body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&seal.0);
    h.update(&key.0);
    h.update(body);
    h.finalize()
}

fn outer_seal(seal: &SealKey, header: &[u8], stored: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&seal.0);
    h.update(SEAL_DOMAIN);
    h.update(header);
    h.update(stored);
    h.finalize()
}

/// The body of `r` in the format above.
fn body_of(r: &JobResult) -> Result<BytesMut, EntryError> {
    let count = u16::try_from(r.outputs.len())
        .map_err(|_| EntryError::Unrepresentable("more than 65,535 output files"))?;
    if r.outputs
        .iter()
        .any(|o| o.name.len() > usize::from(u16::MAX))
    {
        return Err(EntryError::Unrepresentable(
            "an output name over 65,535 bytes",
        ));
    }
    let mut body = BytesMut::with_capacity(64 + r.body_len() as usize);
    body.put_i32(r.exit_code);
    body.put_u64(r.stdout.len() as u64);
    body.put_slice(&r.stdout);
    body.put_u64(r.stderr.len() as u64);
    body.put_slice(&r.stderr);
    body.put_u16(count);
    for o in &r.outputs {
        body.put_u16(o.name.len() as u16);
        body.put_slice(o.name.as_bytes());
        body.put_u64(o.data.len() as u64);
        body.put_slice(&o.data);
    }
    Ok(body)
}

/// Encodes a result for storage under `key`, sealed with `seal`, compressed as
/// `compression` says (when that shrinks it; otherwise as version 2).
pub fn encode(
    seal: &SealKey,
    key: &StoreKey,
    r: &JobResult,
    compression: Compression,
) -> Result<Bytes, EntryError> {
    let body = body_of(r)?;
    let body_mac = mac(seal, key, &body);
    let stored = match compression {
        Compression::Zstd { level } => codec::compress(&body, level),
        Compression::None => None,
    };
    let Some(stored) = stored else {
        let mut out = BytesMut::with_capacity(HEADER + body.len());
        out.put_slice(MAGIC);
        out.put_u16(PLAIN);
        out.put_slice(&key.0);
        out.put_u64(body.len() as u64);
        out.put_slice(body_mac.as_bytes());
        out.put_slice(&body);
        return Ok(out.freeze());
    };
    let mut out = BytesMut::with_capacity(PACKED_HEADER + stored.len());
    out.put_slice(MAGIC);
    out.put_u16(PACKED);
    out.put_slice(&key.0);
    out.put_u8(ZSTD);
    out.put_u64(body.len() as u64);
    out.put_u64(stored.len() as u64);
    out.put_slice(body_mac.as_bytes());
    let sealed = outer_seal(seal, &out, &stored);
    out.put_slice(sealed.as_bytes());
    out.put_slice(&stored);
    Ok(out.freeze())
}

/// The largest entry, as stored, whose body is at most `max_body` bytes: a compressed
/// body is stored only when it is smaller than the body. Anything longer is refused
/// unread.
pub fn max_entry_len(max_body: u64) -> u64 {
    max_body.saturating_add(PACKED_HEADER as u64)
}

/// The decompressed body length a compressed entry declares (unverified: for reserving
/// memory before [`decode`], which checks it); `None` for an uncompressed entry, whose
/// body is already all there, or for bytes that are no entry.
pub fn declared_body_len(data: &[u8]) -> Option<u64> {
    if data.len() < PACKED_HEADER || &data[..4] != MAGIC || data[4..6] != PACKED.to_be_bytes() {
        return None;
    }
    let at = 4 + 2 + 32 + 1;
    Some(u64::from_be_bytes(data[at..at + 8].try_into().ok()?))
}

/// Decodes and verifies an entry read for `key`, sealed with `seal`, whose body is at
/// most `max_body` bytes once decompressed.
pub fn decode(
    seal: &SealKey,
    key: &StoreKey,
    data: Bytes,
    max_body: u64,
) -> Result<JobResult, EntryError> {
    if data.len() < 6 || &data[..4] != MAGIC {
        return Err(EntryError::BadMagic);
    }
    match u16::from_be_bytes([data[4], data[5]]) {
        PLAIN => decode_plain(seal, key, data, max_body),
        PACKED => decode_packed(seal, key, data, max_body),
        _ => Err(EntryError::BadMagic),
    }
}

fn decode_plain(
    seal: &SealKey,
    key: &StoreKey,
    mut data: Bytes,
    max_body: u64,
) -> Result<JobResult, EntryError> {
    if data.len() < HEADER {
        return Err(EntryError::Truncated);
    }
    if data[6..38] != key.0 {
        return Err(EntryError::WrongKey);
    }
    data.advance(38);
    let len = data.get_u64();
    let mut digest = [0u8; 32];
    data.copy_to_slice(&mut digest);
    if data.len() as u64 != len {
        return Err(EntryError::Truncated);
    }
    if len > max_body {
        return Err(EntryError::TooLarge(len));
    }
    // Constant-time comparison (blake3::Hash's equality).
    if mac(seal, key, &data) != blake3::Hash::from_bytes(digest) {
        return Err(EntryError::Corrupt);
    }
    parse_body(data).ok_or(EntryError::Malformed)
}

fn decode_packed(
    seal: &SealKey,
    key: &StoreKey,
    data: Bytes,
    max_body: u64,
) -> Result<JobResult, EntryError> {
    if data.len() < PACKED_HEADER {
        return Err(EntryError::Truncated);
    }
    if data[6..38] != key.0 {
        return Err(EntryError::WrongKey);
    }
    let mut fields = &data[38..PACKED_HEADER];
    let codec = fields.get_u8();
    let body_len = fields.get_u64();
    let stored_len = fields.get_u64();
    let mut body_mac = [0u8; 32];
    fields.copy_to_slice(&mut body_mac);
    let mut sealed = [0u8; 32];
    fields.copy_to_slice(&mut sealed);
    if codec != ZSTD {
        return Err(EntryError::BadMagic);
    }
    let stored = &data[PACKED_HEADER..];
    if stored.len() as u64 != stored_len {
        return Err(EntryError::Truncated);
    }
    // Before the decompressor sees a byte: only this cache's own writes get that far.
    if outer_seal(seal, &data[..SEALED_HEADER], stored) != blake3::Hash::from_bytes(sealed) {
        return Err(EntryError::Corrupt);
    }
    let body = Bytes::from(codec::decompress(stored, body_len, max_body)?);
    // And after it: the result is the very body that was sealed.
    if mac(seal, key, &body) != blake3::Hash::from_bytes(body_mac) {
        return Err(EntryError::Corrupt);
    }
    parse_body(body).ok_or(EntryError::Malformed)
}

fn parse_body(mut b: Bytes) -> Option<JobResult> {
    fn take(b: &mut Bytes, n: u64) -> Option<Bytes> {
        let n = usize::try_from(n).ok()?;
        (b.len() >= n).then(|| b.split_to(n))
    }
    fn u64_of(b: &mut Bytes) -> Option<u64> {
        (b.len() >= 8).then(|| b.get_u64())
    }
    if b.len() < 4 {
        return None;
    }
    let exit_code = b.get_i32();
    let n = u64_of(&mut b)?;
    let stdout = take(&mut b, n)?;
    let n = u64_of(&mut b)?;
    let stderr = take(&mut b, n)?;
    if b.len() < 2 {
        return None;
    }
    let count = b.get_u16();
    let mut outputs = Vec::new();
    for _ in 0..count {
        if b.len() < 2 {
            return None;
        }
        let n = u64::from(b.get_u16());
        let name = String::from_utf8(take(&mut b, n)?.to_vec()).ok()?;
        let n = u64_of(&mut b)?;
        let data = take(&mut b, n)?;
        outputs.push(OutputFile { name, data });
    }
    b.is_empty().then_some(JobResult {
        exit_code,
        stdout,
        stderr,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEAL: SealKey = SealKey([7; 32]);
    const MAX: u64 = DEFAULT_MAX_BODY;
    const ZSTD1: Compression = Compression::Zstd { level: 1 };

    fn sample() -> JobResult {
        JobResult {
            exit_code: 0,
            stdout: Bytes::from_static(b"out"),
            stderr: Bytes::from_static(b"warning: x\n"),
            outputs: vec![OutputFile {
                name: ".o".into(),
                data: Bytes::from(vec![0x7f; 1000]),
            }],
        }
    }

    #[test]
    fn both_formats_round_trip_and_refuse_every_damage() {
        let key = StoreKey([3; 32]);
        for (compression, version, header) in [
            (Compression::None, PLAIN, HEADER),
            (ZSTD1, PACKED, PACKED_HEADER),
        ] {
            let bytes = encode(&SEAL, &key, &sample(), compression).unwrap();
            assert_eq!(u16::from_be_bytes([bytes[4], bytes[5]]), version);
            assert_eq!(decode(&SEAL, &key, bytes.clone(), MAX), Ok(sample()));
            assert_eq!(
                decode(&SEAL, &StoreKey([4; 32]), bytes.clone(), MAX),
                Err(EntryError::WrongKey)
            );
            assert_eq!(
                decode(&SEAL, &key, bytes.slice(..bytes.len() - 1), MAX),
                Err(EntryError::Truncated)
            );
            // Every field of the header, and the body's first and last bytes.
            for i in (0..header).chain([header, bytes.len() - 1]) {
                if (6..38).contains(&i) {
                    continue; // the key: WrongKey, above
                }
                let mut damaged = bytes.to_vec();
                damaged[i] ^= 0x40;
                assert!(
                    decode(&SEAL, &key, Bytes::from(damaged), MAX).is_err(),
                    "{compression}: flip at {i} accepted"
                );
            }
            assert!(decode(&SEAL, &key, Bytes::new(), MAX).is_err());
        }
    }

    #[test]
    fn compression_shrinks_and_declines_what_would_not_shrink() {
        let key = StoreKey([3; 32]);
        let plain = encode(&SEAL, &key, &sample(), Compression::None).unwrap();
        let packed = encode(&SEAL, &key, &sample(), ZSTD1).unwrap();
        assert!(
            packed.len() < plain.len() / 4,
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(
            declared_body_len(&packed),
            Some(plain.len() as u64 - HEADER as u64)
        );
        assert_eq!(declared_body_len(&plain), None);
        let mut noise = sample();
        let mut data = vec![0u8; 5000];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        noise.outputs[0].data = Bytes::from(data);
        let stored = encode(&SEAL, &key, &noise, ZSTD1).unwrap();
        assert_eq!(u16::from_be_bytes([stored[4], stored[5]]), PLAIN);
        assert_eq!(decode(&SEAL, &key, stored, MAX), Ok(noise));
    }

    #[test]
    fn an_entry_sealed_with_another_secret_is_refused() {
        let key = StoreKey([3; 32]);
        for compression in [Compression::None, ZSTD1] {
            let forged = encode(&SealKey([8; 32]), &key, &sample(), compression).unwrap();
            assert_eq!(decode(&SEAL, &key, forged, MAX), Err(EntryError::Corrupt));
        }
    }

    #[test]
    fn bodies_past_the_reader_limit_are_refused() {
        let key = StoreKey([3; 32]);
        for compression in [Compression::None, ZSTD1] {
            let bytes = encode(&SEAL, &key, &sample(), compression).unwrap();
            let len = sample().body_len();
            assert!(matches!(
                decode(&SEAL, &key, bytes, len),
                Err(EntryError::TooLarge(n)) if n > len
            ));
        }
    }

    /// A compressed entry is sealed by a holder of the key but its frame lies: one that
    /// inflates past the declared length, one concatenated with more frames. Both are
    /// refused (the seal checks out, the inflation does not).
    #[test]
    fn sealed_frames_that_lie_are_refused() {
        let key = StoreKey([3; 32]);
        let body = body_of(&sample()).unwrap();
        let forge = |declared: u64, stored: Vec<u8>| {
            let mut out = BytesMut::new();
            out.put_slice(MAGIC);
            out.put_u16(PACKED);
            out.put_slice(&key.0);
            out.put_u8(ZSTD);
            out.put_u64(declared);
            out.put_u64(stored.len() as u64);
            out.put_slice(mac(&SEAL, &key, &body).as_bytes());
            let sealed = outer_seal(&SEAL, &out, &stored);
            out.put_slice(sealed.as_bytes());
            out.put_slice(&stored);
            out.freeze()
        };
        let frame = codec::compress(&body, 1).unwrap();
        let len = body.len() as u64;
        assert_eq!(
            decode(&SEAL, &key, forge(len, frame.clone()), MAX),
            Ok(sample())
        );
        assert!(matches!(
            decode(&SEAL, &key, forge(len - 1, frame.clone()), MAX),
            Err(EntryError::Inflate(_))
        ));
        let mut twice = frame.clone();
        twice.extend_from_slice(&frame);
        assert!(matches!(
            decode(&SEAL, &key, forge(len, twice), MAX),
            Err(EntryError::Inflate(_))
        ));
        assert!(matches!(
            decode(&SEAL, &key, forge(1 << 40, frame), MAX),
            Err(EntryError::TooLarge(_))
        ));
    }

    #[test]
    fn unrepresentable_results_are_refused_not_truncated() {
        let mut r = sample();
        r.outputs[0].name = "x".repeat(70_000);
        assert!(matches!(
            encode(&SEAL, &StoreKey([1; 32]), &r, ZSTD1),
            Err(EntryError::Unrepresentable(_))
        ));
    }
}
