//! How one sealed entry is laid out as values in a shared store: a head value and, for a
//! large entry, further chunks, so no single value exceeds what the store handles well
//! (Redis's default limit on one value is 512 MiB, and one multi-MiB reply blocks its
//! connection for every other request).
//!
//! ```text
//! names: head  PREFIX{hex}        chunk i (1 ≤ i < count)  PREFIX{hex}:i
//! head:  magic "DCS1" | total u64 | chunk_len u32 | count u32 | the entry's first bytes
//! chunk: the entry's bytes [i × chunk_len, min((i+1) × chunk_len, total))
//! ```
//!
//! The braces are Redis Cluster's hash tag: every value of one entry lands on the same
//! node (one MGET reads them all), while different entries spread over the nodes. The
//! head's fields are not covered by the entry's MAC; they are checked against each other
//! and against the configured limits before anything is allocated, and the reassembled
//! entry is then verified whole, so a lie in them is at worst a miss.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::StoreKey;

const MAGIC: &[u8; 4] = b"DCS1";
/// Bytes before the entry's first chunk in the head value.
pub(crate) const HEAD_FIELDS: usize = 4 + 8 + 4 + 4;
/// The largest chunk any writer may declare: a reader never takes a bigger one.
pub(crate) const MAX_CHUNK: u32 = 64 << 20;

/// The names of an entry's values, head first.
pub(crate) fn names(prefix: &str, key: &StoreKey, count: u32) -> Vec<String> {
    let head = format!("{prefix}{{{}}}", key.to_hex());
    let mut names = Vec::with_capacity(count.max(1) as usize);
    for i in 1..count {
        names.push(format!("{head}:{i}"));
    }
    names.insert(0, head);
    names
}

/// An entry's bytes split into the values to store, head first.
pub(crate) fn split(entry: &Bytes, chunk_len: u32) -> Vec<Bytes> {
    let chunk = chunk_len.clamp(1, MAX_CHUNK) as usize;
    let count = entry.len().div_ceil(chunk).max(1);
    let first = entry.len().min(chunk);
    let mut head = BytesMut::with_capacity(HEAD_FIELDS + first);
    head.put_slice(MAGIC);
    head.put_u64(entry.len() as u64);
    head.put_u32(chunk as u32);
    head.put_u32(count as u32);
    head.put_slice(&entry[..first]);
    let mut values = vec![head.freeze()];
    let mut at = first;
    while at < entry.len() {
        let end = (at + chunk).min(entry.len());
        values.push(entry.slice(at..end));
        at = end;
    }
    values
}

/// What a head value declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    /// Bytes of the whole entry.
    pub(crate) total: u64,
    /// Bytes of every chunk but the last.
    pub(crate) chunk_len: u32,
    /// Values of the entry, the head included.
    pub(crate) count: u32,
    /// The entry's first bytes, carried by the head.
    pub(crate) first: Bytes,
}

/// Why a stored value is not part of a valid entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// Not a head value of this layout.
    #[error("not a dcache shared-store head value")]
    BadMagic,
    /// The declared fields contradict each other or the bytes present.
    #[error("inconsistent head or chunk lengths")]
    Inconsistent,
    /// The entry is larger than this server takes.
    #[error("entry of {0} bytes exceeds the configured maximum")]
    TooLarge(u64),
    /// A chunk is absent (evicted or expired apart from its head).
    #[error("chunk {0} missing")]
    Missing(u32),
}

/// Parses and checks a head value, refusing an entry larger than `max_total`.
pub(crate) fn parse_head(mut v: Bytes, max_total: u64) -> Result<Head, LayoutError> {
    if v.len() < HEAD_FIELDS || &v[..4] != MAGIC {
        return Err(LayoutError::BadMagic);
    }
    v.advance(4);
    let total = v.get_u64();
    let chunk_len = v.get_u32();
    let count = v.get_u32();
    if total > max_total {
        return Err(LayoutError::TooLarge(total));
    }
    if chunk_len == 0 || chunk_len > MAX_CHUNK {
        return Err(LayoutError::Inconsistent);
    }
    let expected = total.div_ceil(u64::from(chunk_len)).max(1);
    let first = total.min(u64::from(chunk_len));
    if u64::from(count) != expected || v.len() as u64 != first {
        return Err(LayoutError::Inconsistent);
    }
    Ok(Head {
        total,
        chunk_len,
        count,
        first: v,
    })
}

/// The whole entry from its head and the other chunks, in order (`None`: absent). Every
/// chunk must have exactly the length the head implies.
pub(crate) fn assemble(head: Head, rest: Vec<Option<Bytes>>) -> Result<Bytes, LayoutError> {
    if rest.len() as u64 + 1 != u64::from(head.count) {
        return Err(LayoutError::Inconsistent);
    }
    if rest.is_empty() {
        return Ok(head.first);
    }
    // `total` was checked against the configured maximum before this allocation.
    let total = usize::try_from(head.total).map_err(|_| LayoutError::Inconsistent)?;
    let mut out = BytesMut::with_capacity(total);
    out.put_slice(&head.first);
    for (i, chunk) in rest.into_iter().enumerate() {
        let index = i as u32 + 1;
        let chunk = chunk.ok_or(LayoutError::Missing(index))?;
        let want = (head.total - out.len() as u64).min(u64::from(head.chunk_len));
        if chunk.len() as u64 != want {
            return Err(LayoutError::Inconsistent);
        }
        out.put_slice(&chunk);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| (i * 7) as u8).collect::<Vec<_>>())
    }

    fn round_trip(n: usize, chunk: u32) -> Bytes {
        let values = split(&entry(n), chunk);
        let head = parse_head(values[0].clone(), u64::MAX).unwrap();
        assert_eq!(head.count as usize, values.len());
        assemble(head, values[1..].iter().cloned().map(Some).collect()).unwrap()
    }

    #[test]
    fn entries_of_every_size_round_trip() {
        for (n, chunk) in [(0, 4), (1, 4), (4, 4), (5, 4), (9, 4), (1000, 7), (10, 100)] {
            assert_eq!(
                round_trip(n, chunk),
                entry(n),
                "{n} bytes in chunks of {chunk}"
            );
        }
        assert_eq!(split(&entry(9), 4).len(), 3);
        assert_eq!(
            names("p:", &StoreKey([0xab; 32]), 3),
            vec![
                format!("p:{{{}}}", "ab".repeat(32)),
                format!("p:{{{}}}:1", "ab".repeat(32)),
                format!("p:{{{}}}:2", "ab".repeat(32)),
            ]
        );
    }

    #[test]
    fn heads_that_lie_are_refused_before_any_allocation() {
        let good = split(&entry(9), 4);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut h = good[0].to_vec();
            f(&mut h);
            parse_head(Bytes::from(h), 1 << 20)
        };
        assert_eq!(with(&|h| h[0] = b'X'), Err(LayoutError::BadMagic));
        assert_eq!(with(&|h| h.truncate(10)), Err(LayoutError::BadMagic));
        // A declared size past the limit: refused without reading a chunk.
        assert_eq!(
            with(&|h| h[4..12].copy_from_slice(&u64::MAX.to_be_bytes())),
            Err(LayoutError::TooLarge(u64::MAX))
        );
        let damages: [fn(&mut Vec<u8>); 5] = [
            |h| h[12..16].copy_from_slice(&0u32.to_be_bytes()),
            |h| h[12..16].copy_from_slice(&u32::MAX.to_be_bytes()),
            |h| h[16..20].copy_from_slice(&9u32.to_be_bytes()),
            |h| h.push(0),
            |h| {
                h.pop();
            },
        ];
        for damage in damages {
            assert_eq!(with(&damage), Err(LayoutError::Inconsistent));
        }
    }

    #[test]
    fn missing_or_resized_chunks_are_refused() {
        let values = split(&entry(9), 4);
        let head = || parse_head(values[0].clone(), u64::MAX).unwrap();
        let rest = |v: &[Option<Bytes>]| v.to_vec();
        assert_eq!(
            assemble(head(), rest(&[Some(values[1].clone()), None])),
            Err(LayoutError::Missing(2))
        );
        assert_eq!(
            assemble(head(), rest(&[Some(values[1].clone())])),
            Err(LayoutError::Inconsistent)
        );
        assert_eq!(
            assemble(
                head(),
                rest(&[Some(values[2].clone()), Some(values[1].clone())])
            ),
            Err(LayoutError::Inconsistent),
            "chunks swapped: lengths differ"
        );
    }
}
