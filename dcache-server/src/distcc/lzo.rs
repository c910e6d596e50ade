//! LZO1X blocks, as distcc's protocol 2 carries its bulk bodies (`DOTI`, `SERR`, `SOUT`,
//! `DOTO`): a raw block with no size header, ended by the format's end-of-stream marker.
//!
//! Written here because the maintained Rust LZO crates are GPL (this project is MIT or
//! Apache-2.0) and the permissive ones decompress only; distcc needs both directions.
//!
//! [`decompress`] accepts anything `lzo1x_decompress_safe` accepts (blocks from
//! `lzo1x_1_compress`, which the stock client uses, and from the better-ratio compressors),
//! refuses to produce more than a caller's limit, and returns an error, never a panic or
//! a read outside its input, on any other input. [`compress`] is a single-pass LZO1X-1
//! style compressor (a hash table of 4-byte sequences, greedy matches): its output is a
//! valid LZO1X block that the stock client's `lzo1x_decompress_safe` reads.
//!
//! # The format, as far as this code needs it
//! A block is a sequence of instructions, each starting with a byte `t`. How `t` reads
//! depends on `state`, the number of literals the previous instruction copied (0, 1–3, or
//! "4 or more"):
//! - `t` ≥ 64: a match of `(t >> 5) + 1` bytes (3–8) at distance
//!   `((t >> 2) & 7) + (next << 3) + 1` (up to 2 KiB).
//! - 32 ≤ `t` < 64: a match of `(t & 31) + 2` bytes (0 means an extended length) at distance
//!   `(le16 >> 2) + 1` (up to 16 KiB).
//! - 16 ≤ `t` < 32: a match of `(t & 7) + 2` bytes at distance
//!   `16 KiB + ((t & 8) << 11) + (le16 >> 2)` (up to 48 KiB); distance exactly 16 KiB is
//!   the end of the block (`0x11 0x00 0x00`).
//! - `t` < 16 with state 0: a run of `t + 3` literals (0 means an extended length).
//! - `t` < 16 with state 1–3: a 2-byte match at distance `(t >> 2) + (next << 2) + 1`;
//!   with state "4 or more": a 3-byte match at distance `(t >> 2) + (next << 2) + 2049`.
//!
//! The low two bits of a match's `t` (the short form) or of its `le16` say how many
//! literals (0–3) follow it directly. An extended length is a run of zero bytes, each
//! worth 255, and one non-zero byte added to the base. The first byte of a block is
//! special: above 17, it is a run of `t - 17` literals.

use thiserror::Error;

/// Why a block could not be decompressed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LzoError {
    /// The block ends in the middle of an instruction or before its end marker.
    #[error("the LZO block is truncated")]
    Truncated,
    /// A match reaches back before the start of the output.
    #[error("an LZO match points before the start of the output")]
    BadDistance,
    /// The output would exceed the caller's limit.
    #[error("the LZO block decompresses to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Bytes follow the end marker, or the end marker is malformed.
    #[error("the LZO block has bytes after its end, or a malformed end")]
    Trailing,
}

/// A cursor over the compressed input that never reads past its end.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Result<u8, LzoError> {
        let b = *self.data.get(self.pos).ok_or(LzoError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn le16(&mut self) -> Result<usize, LzoError> {
        let lo = self.byte()? as usize;
        let hi = self.byte()? as usize;
        Ok(lo | (hi << 8))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], LzoError> {
        let end = self.pos.checked_add(n).ok_or(LzoError::Truncated)?;
        let s = self.data.get(self.pos..end).ok_or(LzoError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// An extended length: zero bytes worth 255 each, then a non-zero byte, on top of
    /// `base`. Bounded by the input's length, so it cannot overflow.
    fn extended(&mut self, base: usize) -> Result<usize, LzoError> {
        let mut n = base;
        loop {
            match self.byte()? {
                0 => n += 255,
                b => return Ok(n + b as usize),
            }
        }
    }
}

/// Decompresses one LZO1X block, producing at most `limit` bytes.
///
/// The output grows as it is produced, never by what the input claims, so a short block
/// cannot make this allocate more than `limit`.
pub fn decompress(block: &[u8], limit: usize) -> Result<Vec<u8>, LzoError> {
    let mut input = Input {
        data: block,
        pos: 0,
    };
    let mut out: Vec<u8> = Vec::with_capacity(block.len().saturating_mul(2).min(limit));
    let literals = |out: &mut Vec<u8>, input: &mut Input<'_>, n: usize| {
        if out.len() + n > limit {
            return Err(LzoError::TooLarge { limit });
        }
        out.extend_from_slice(input.take(n)?);
        Ok(())
    };
    let copy_match = |out: &mut Vec<u8>, distance: usize, len: usize| {
        if distance == 0 || distance > out.len() {
            return Err(LzoError::BadDistance);
        }
        if out.len() + len > limit {
            return Err(LzoError::TooLarge { limit });
        }
        let start = out.len() - distance;
        // Byte by byte: a match may overlap the bytes it produces (a run).
        for i in 0..len {
            let b = out[start + i];
            out.push(b);
        }
        Ok(())
    };
    // Literals copied by the previous instruction: 0, 1–3, or 4 for "4 or more".
    let mut state: usize = 0;
    if let Some(&first) = block.first() {
        if first > 17 {
            input.pos = 1;
            let n = (first - 17) as usize;
            literals(&mut out, &mut input, n)?;
            state = if n < 4 { n } else { 4 };
        }
    }
    loop {
        let t = input.byte()? as usize;
        let (distance, len, after);
        if t < 16 {
            match state {
                0 => {
                    let n = if t == 0 { input.extended(15)? } else { t } + 3;
                    literals(&mut out, &mut input, n)?;
                    state = 4;
                    continue;
                }
                1..=3 => {
                    distance = (t >> 2) + ((input.byte()? as usize) << 2) + 1;
                    len = 2;
                }
                _ => {
                    distance = (t >> 2) + ((input.byte()? as usize) << 2) + 2049;
                    len = 3;
                }
            }
            after = t & 3;
        } else if t >= 64 {
            distance = ((t >> 2) & 7) + ((input.byte()? as usize) << 3) + 1;
            len = (t >> 5) + 1;
            after = t & 3;
        } else if t >= 32 {
            let n = t & 31;
            len = if n == 0 { input.extended(31)? } else { n } + 2;
            let d = input.le16()?;
            distance = (d >> 2) + 1;
            after = d & 3;
        } else {
            let n = t & 7;
            len = if n == 0 { input.extended(7)? } else { n } + 2;
            let d = input.le16()?;
            let far = ((t & 8) << 11) + (d >> 2);
            if far == 0 {
                // The end marker: exactly `0x11 0x00 0x00`, and nothing after it.
                if len != 3 || input.pos != block.len() {
                    return Err(LzoError::Trailing);
                }
                return Ok(out);
            }
            distance = far + 0x4000;
            after = d & 3;
        }
        copy_match(&mut out, distance, len)?;
        literals(&mut out, &mut input, after)?;
        state = after;
    }
}

/// Longest distance a match may have (the M4 form's reach).
const MAX_DISTANCE: usize = 0xBFFF;
/// Bits of the match finder's hash table.
const HASH_BITS: u32 = 14;

/// Compresses `data` into one LZO1X block (see the module documentation).
///
/// Empty input gives the bare end marker; distcc itself sends an empty body as zero bytes
/// instead, which is the caller's choice.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 64);
    let mut table = vec![0u32; 1 << HASH_BITS];
    // Start of the literals not yet written.
    let mut lit_start = 0;
    // Where the last match keeps the count of the literals that follow it.
    let mut state_at = None;
    let mut pos = 0;
    while pos + 4 <= data.len() {
        let word = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        let slot = (word.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize;
        // Positions are stored plus one, so zero means empty.
        let candidate = table[slot] as usize;
        table[slot] = (pos + 1) as u32;
        if candidate == 0 {
            pos += 1;
            continue;
        }
        let cand = candidate - 1;
        let distance = pos - cand;
        if distance > MAX_DISTANCE || data[cand..cand + 4] != data[pos..pos + 4] {
            pos += 1;
            continue;
        }
        let mut len = 4;
        while pos + len < data.len() && data[cand + len] == data[pos + len] {
            len += 1;
        }
        write_literals(&mut out, state_at, &data[lit_start..pos]);
        state_at = Some(write_match(&mut out, distance, len));
        pos += len;
        lit_start = pos;
    }
    write_literals(&mut out, state_at, &data[lit_start..]);
    out.extend_from_slice(&[0x11, 0x00, 0x00]);
    out
}

/// Writes a run of literals. One to three after a match ride in that match's byte at
/// `state_at`; at the very start of a block, up to 238 fit in the first byte; otherwise a
/// literal instruction (which carries four or more) comes first.
fn write_literals(out: &mut Vec<u8>, state_at: Option<usize>, lits: &[u8]) {
    let n = lits.len();
    if n == 0 {
        return;
    }
    if out.is_empty() && n <= 238 {
        out.push((n + 17) as u8);
    } else if let (true, Some(at)) = (n <= 3, state_at) {
        // After a match (nothing else precedes literals once the block has begun).
        out[at] |= n as u8;
    } else if n <= 18 {
        out.push((n - 3) as u8);
    } else {
        out.push(0);
        write_extension(out, n - 18);
    }
    out.extend_from_slice(lits);
}

/// The zero bytes and final byte of an extended length `rest` (at least 1).
fn write_extension(out: &mut Vec<u8>, mut rest: usize) {
    while rest > 255 {
        out.push(0);
        rest -= 255;
    }
    out.push(rest as u8);
}

/// Writes a match of `len` (at least 3) bytes at `distance` (1 to [`MAX_DISTANCE`]), in
/// the shortest form that reaches it. Returns the index of the byte whose low two bits,
/// left zero, [`write_literals`] sets to the count of literals that follow.
fn write_match(out: &mut Vec<u8>, distance: usize, len: usize) -> usize {
    if len <= 8 && distance <= 0x0800 {
        let d = distance - 1;
        out.push((((len - 1) << 5) | ((d & 7) << 2)) as u8);
        out.push((d >> 3) as u8);
        return out.len() - 2;
    }
    let (d, base, marker, high) = if distance <= 0x4000 {
        (distance - 1, 31, 32, 0)
    } else {
        let d = distance - 0x4000;
        (d & 0x3FFF, 7, 16, (d >> 11) & 8)
    };
    if len - 2 <= base {
        out.push((marker | high | (len - 2)) as u8);
    } else {
        out.push((marker | high) as u8);
        write_extension(out, len - 2 - base);
    }
    out.push(((d << 2) & 0xFF) as u8);
    out.push((d >> 6) as u8);
    out.len() - 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The block liblzo2's `lzo1x_1_compress` makes of "hello, lzo world!" (seventeen
    /// literals in the first byte, then the end marker): what a stock client sends.
    #[test]
    fn decodes_a_literal_only_block_from_liblzo() {
        let mut block = vec![17 + 17];
        block.extend_from_slice(b"hello, lzo world!");
        block.extend_from_slice(&[0x11, 0, 0]);
        assert_eq!(decompress(&block, 100).unwrap(), b"hello, lzo world!");
    }

    #[test]
    fn every_match_form_round_trips() {
        // Short, middle and far distances; short and extended lengths; runs.
        let mut data = Vec::new();
        let phrase = b"int main(void) { return 0; }\n";
        data.extend_from_slice(phrase);
        data.extend_from_slice(phrase);
        data.extend(std::iter::repeat_n(b'a', 1000));
        let noise: Vec<u8> = (0..40_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        data.extend_from_slice(&noise[..3000]);
        data.extend_from_slice(phrase);
        data.extend_from_slice(&noise);
        data.extend_from_slice(&noise[..5000]);
        data.extend_from_slice(b"xyz");
        let block = compress(&data);
        assert!(block.len() < data.len());
        assert_eq!(decompress(&block, data.len()).unwrap(), data);
    }

    #[test]
    fn limits_and_malformed_blocks_are_errors() {
        let data = vec![0u8; 10_000];
        let block = compress(&data);
        assert_eq!(
            decompress(&block, 9_999),
            Err(LzoError::TooLarge { limit: 9_999 })
        );
        assert_eq!(decompress(&[], 10), Err(LzoError::Truncated));
        assert_eq!(
            decompress(&block[..block.len() - 1], 10_000),
            Err(LzoError::Truncated)
        );
        let mut trailing = block.clone();
        trailing.push(0);
        assert_eq!(decompress(&trailing, 10_000), Err(LzoError::Trailing));
        // A match before any output.
        assert_eq!(
            decompress(&[18, b'a', 0x40, 0x10], 10),
            Err(LzoError::BadDistance)
        );
        assert_eq!(compress(&[]), [0x11, 0, 0]);
        assert_eq!(decompress(&[0x11, 0, 0], 0).unwrap(), b"");
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(
            prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..20_000)) {
            let block = compress(&data);
            prop_assert_eq!(decompress(&block, data.len()).unwrap(), data);
        }

        #[test]
        fn repetitive_round_trip(unit in proptest::collection::vec(any::<u8>(), 1..40),
                                 times in 1usize..3000) {
            let data: Vec<u8> = unit.iter().copied().cycle().take(unit.len() * times).collect();
            let block = compress(&data);
            prop_assert_eq!(decompress(&block, data.len()).unwrap(), data);
        }

        #[test]
        fn arbitrary_blocks_never_panic_or_exceed_the_limit(
            block in proptest::collection::vec(any::<u8>(), 0..2000), limit in 0usize..5000) {
            if let Ok(out) = decompress(&block, limit) {
                prop_assert!(out.len() <= limit);
            }
        }
    }
}
