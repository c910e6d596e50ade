//! The stored form of a result: a verified, versioned binary encoding.
//!
//! ```text
//! magic "DCE1" | version u16 | key [32] | body length u64 | mac [32] | body
//! mac:  keyed blake3 under the cache's [`SealKey`] of key | body
//! body: exit i32 | stdout len u64, bytes | stderr len u64, bytes
//!       | output count u16 | per output: name len u16, name, data len u64, data
//! ```
//!
//! Every read checks the magic, version, key, length and MAC before parsing, and the
//! parser checks every length against the bytes present: a torn, truncated, tampered or
//! planted entry (one not written by a holder of the cache's secret) is refused, never
//! served. Version 1 entries (an unkeyed digest) are refused as of another version.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use dcache_proto::{JobResult, OutputFile};

use super::StoreKey;
use super::seal::SealKey;

const MAGIC: &[u8; 4] = b"DCE1";
const VERSION: u16 = 2;
const HEADER: usize = 4 + 2 + 32 + 8 + 32;

/// Why bytes are not a valid entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// Shorter than the header, or than the length it declares.
    #[error("entry truncated")]
    Truncated,
    /// Not an entry, or from an incompatible version.
    #[error("not a version-2 dcache entry")]
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
    /// A result the format cannot hold (more than 65,535 outputs, or an output name
    /// longer than 65,535 bytes); refused when writing rather than stored torn.
    #[error("result cannot be encoded: {0}")]
    Unrepresentable(&'static str),
}

fn mac(seal: &SealKey, key: &StoreKey, body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&seal.0);
    h.update(&key.0);
    h.update(body);
    h.finalize()
}

/// Encodes a result for storage under `key`, sealed with `seal`.
pub fn encode(seal: &SealKey, key: &StoreKey, r: &JobResult) -> Result<Bytes, EntryError> {
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
    let mut out = BytesMut::with_capacity(HEADER + body.len());
    out.put_slice(MAGIC);
    out.put_u16(VERSION);
    out.put_slice(&key.0);
    out.put_u64(body.len() as u64);
    out.put_slice(mac(seal, key, &body).as_bytes());
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Decodes and verifies an entry read for `key`, sealed with `seal`.
pub fn decode(seal: &SealKey, key: &StoreKey, mut data: Bytes) -> Result<JobResult, EntryError> {
    if data.len() < HEADER {
        return Err(EntryError::Truncated);
    }
    if &data[..4] != MAGIC || u16::from_be_bytes([data[4], data[5]]) != VERSION {
        return Err(EntryError::BadMagic);
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
    // Constant-time comparison (blake3::Hash's equality).
    if mac(seal, key, &data) != blake3::Hash::from_bytes(digest) {
        return Err(EntryError::Corrupt);
    }
    parse_body(data).ok_or(EntryError::Malformed)
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
    fn round_trips_and_refuses_every_damage() {
        let key = StoreKey([3; 32]);
        let bytes = encode(&SEAL, &key, &sample()).unwrap();
        assert_eq!(decode(&SEAL, &key, bytes.clone()), Ok(sample()));
        assert_eq!(
            decode(&SEAL, &StoreKey([4; 32]), bytes.clone()),
            Err(EntryError::WrongKey)
        );
        assert_eq!(
            decode(&SEAL, &key, bytes.slice(..bytes.len() - 1)),
            Err(EntryError::Truncated)
        );
        for i in [0, 5, 50, HEADER + 3, bytes.len() - 1] {
            let mut damaged = bytes.to_vec();
            damaged[i] ^= 0x40;
            assert!(
                decode(&SEAL, &key, Bytes::from(damaged)).is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(decode(&SEAL, &key, Bytes::new()).is_err());
    }

    #[test]
    fn an_entry_sealed_with_another_secret_is_refused() {
        let key = StoreKey([3; 32]);
        let forged = encode(&SealKey([8; 32]), &key, &sample()).unwrap();
        assert_eq!(decode(&SEAL, &key, forged), Err(EntryError::Corrupt));
    }

    #[test]
    fn unrepresentable_results_are_refused_not_truncated() {
        let mut r = sample();
        r.outputs[0].name = "x".repeat(70_000);
        assert!(matches!(
            encode(&SEAL, &StoreKey([1; 32]), &r),
            Err(EntryError::Unrepresentable(_))
        ));
    }
}
