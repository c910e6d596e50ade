//! How an entry's body is compressed in the tiers that keep bytes (disk, shared), and the
//! bounded decompression that reads it back.
//!
//! zstd, as ccache and bazel-remote use for their caches: object files shrink about 3× at
//! the fastest levels (docs/BENCHMARKS.md, "Compressed store entries"), and decompression
//! runs at memory-copy speeds. The memory tier keeps results decompressed: it is the hot
//! path, and its limit is memory actually held.
//!
//! Decompression never trusts the bytes it is given further than the limits: the body's
//! declared length must be within the reader's limit before anything is allocated, the
//! payload must be exactly one zstd frame that declares that very length, and the output
//! can never exceed it (a frame that inflates past it is an error, not an allocation). The
//! output buffer is allocated whole only up to a bounded multiple of the compressed size;
//! beyond that (a highly repetitive body, or a frame that lies) it grows with what the
//! frame really produces.

use std::cell::RefCell;
use std::io::Read;

/// The fastest zstd level that still shrinks object files well: ccache's default too.
/// Level 3 (zstd's own default) saves a few percent more at about twice the write cost.
pub const DEFAULT_LEVEL: i32 = 1;

/// Highest level accepted: the levels past 19 ("ultra") need windows of up to 128 MiB
/// on the reading side, which this reader refuses to allocate.
pub const MAX_LEVEL: i32 = 19;

/// Window a reader accepts (2^23 = 8 MiB): what level 19 uses at most. A frame asking
/// for more is refused before its window is allocated.
const WINDOW_LOG_MAX: u32 = 23;

/// Up to this many times the compressed size, the output buffer is allocated at once
/// and filled in one pass (object files compress 2–5×); past it, it grows in steps.
const ONE_PASS_RATIO: u64 = 64;

/// How a store writes entries. Readers take every format whatever this says, so the
/// setting can change between runs of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Bodies stored as they are (the version-2 entry format).
    None,
    /// Bodies compressed with zstd at this level (1..=19); an entry that would not shrink
    /// is stored as it is.
    Zstd {
        /// zstd's compression level.
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Self::Zstd {
            level: DEFAULT_LEVEL,
        }
    }
}

/// Why a compression setting was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressionParseError {
    /// Neither `none`, `zstd` nor `zstd:LEVEL`.
    #[error("{0:?}: expected none, zstd or zstd:LEVEL")]
    Syntax(String),
    /// A level outside 1..=19.
    #[error("zstd level {0} is outside 1..={MAX_LEVEL}")]
    Level(String),
}

impl std::str::FromStr for Compression {
    type Err = CompressionParseError;

    /// `none`, `zstd` (the default level) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "none" => Ok(Self::None),
            None if s == "zstd" => Ok(Self::default()),
            Some(("zstd", level)) => match level.parse::<i32>() {
                Ok(l) if (1..=MAX_LEVEL).contains(&l) => Ok(Self::Zstd { level: l }),
                _ => Err(CompressionParseError::Level(level.to_owned())),
            },
            _ => Err(CompressionParseError::Syntax(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// Why a compressed body was not decompressed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The declared body is larger than the reader takes.
    #[error("declared body of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// Not exactly one zstd frame of the declared content size, or it does not inflate
    /// to exactly that size.
    #[error("compressed body damaged: {0}")]
    Damaged(&'static str),
}

thread_local! {
    /// One compression context per thread and level: creating one costs more than
    /// compressing a small object.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// One decompression context per thread, for the same reason.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// `body` compressed as one zstd frame (with its content size) at `level`, or `None` when
/// that would not make it smaller (or zstd failed: the body is then stored as it is).
pub(crate) fn compress(body: &[u8], level: i32) -> Option<Vec<u8>> {
    let level = level.clamp(1, MAX_LEVEL);
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = cell.as_mut()?;
        let out = c.compress(body).ok()?;
        (out.len() < body.len()).then_some(out)
    })
}

/// The body of `len` bytes that `stored` (one zstd frame) holds, if `len` is at most
/// `max` and the frame is whole, declares `len` and inflates to exactly `len` bytes.
pub(crate) fn decompress(stored: &[u8], len: u64, max: u64) -> Result<Vec<u8>, DecompressError> {
    use zstd::zstd_safe;
    if len > max {
        return Err(DecompressError::TooLarge(len));
    }
    let len_usize = usize::try_from(len).map_err(|_| DecompressError::TooLarge(len))?;
    match zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n == len => {}
        _ => return Err(DecompressError::Damaged("frame header")),
    }
    // Exactly one frame, nothing after it (the one-pass decoder would go on to the next).
    if zstd_safe::find_frame_compressed_size(stored).ok() != Some(stored.len()) {
        return Err(DecompressError::Damaged("frame length"));
    }
    let out = if len <= (stored.len() as u64).saturating_mul(ONE_PASS_RATIO) {
        one_pass(stored, len_usize)?
    } else {
        stepwise(stored, len)?
    };
    if out.len() != len_usize {
        return Err(DecompressError::Damaged("inflated to another length"));
    }
    Ok(out)
}

/// Decompresses into a buffer of exactly `len` bytes: zstd stops with an error rather
/// than write past it.
fn one_pass(stored: &[u8], len: usize) -> Result<Vec<u8>, DecompressError> {
    let damaged = || DecompressError::Damaged("zstd refused the frame");
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new().map_err(|_| damaged())?);
        }
        let d = cell.as_mut().ok_or_else(damaged)?;
        let mut out = Vec::with_capacity(len);
        d.decompress_to_buffer(stored, &mut out)
            .map_err(|_| damaged())?;
        Ok(out)
    })
}

/// Decompresses with a buffer that grows with the output, stopping one byte past `len`
/// (which is then an error), within an 8 MiB window at most.
fn stepwise(stored: &[u8], len: u64) -> Result<Vec<u8>, DecompressError> {
    let damaged = |_| DecompressError::Damaged("zstd refused the frame");
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)
        .map_err(damaged)?
        .single_frame();
    decoder.window_log_max(WINDOW_LOG_MAX).map_err(damaged)?;
    let mut out = Vec::new();
    decoder
        .take(len.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(damaged)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn settings_parse_and_print() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("zstd".parse(), Ok(Compression::default()));
        assert_eq!("zstd:7".parse(), Ok(Compression::Zstd { level: 7 }));
        for bad in ["zstd:0", "zstd:20", "zstd:-1", "zstd:x"] {
            assert!(matches!(
                bad.parse::<Compression>(),
                Err(CompressionParseError::Level(_))
            ));
        }
        assert!(matches!(
            "lz4".parse::<Compression>(),
            Err(CompressionParseError::Syntax(_))
        ));
        assert_eq!(Compression::Zstd { level: 3 }.to_string(), "zstd:3");
        assert_eq!(Compression::None.to_string(), "none");
    }

    #[test]
    fn round_trips_by_both_paths_and_declines_what_does_not_shrink() {
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 1000).to_le_bytes())
            .collect();
        let packed = compress(&text, 1).unwrap();
        assert!(packed.len() < text.len() / 2);
        assert_eq!(
            decompress(&packed, text.len() as u64, u64::MAX).unwrap(),
            text
        );
        // Zeros compress far past the one-pass ratio: the stepwise path.
        let zeros = vec![0u8; 4 << 20];
        let packed = compress(&zeros, 3).unwrap();
        assert!((zeros.len() as u64) > packed.len() as u64 * ONE_PASS_RATIO);
        assert_eq!(
            decompress(&packed, zeros.len() as u64, u64::MAX).unwrap(),
            zeros
        );
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        assert_eq!(compress(&noise, 1), None);
    }

    #[test]
    fn lies_about_the_length_are_refused() {
        let body = vec![5u8; 10_000];
        let packed = compress(&body, 1).unwrap();
        assert_eq!(
            decompress(&packed, 10_000, 9_999),
            Err(DecompressError::TooLarge(10_000))
        );
        // The frame declares 10,000: any other claim is refused before inflating.
        for claim in [9_999, 10_001, 1 << 40] {
            assert!(matches!(
                decompress(&packed, claim, u64::MAX),
                Err(DecompressError::Damaged(_))
            ));
        }
        let mut twice = packed.clone();
        twice.extend_from_slice(&packed);
        assert!(decompress(&twice, 10_000, u64::MAX).is_err(), "two frames");
        assert!(decompress(&packed[..packed.len() - 1], 10_000, u64::MAX).is_err());
        assert!(decompress(b"", 0, u64::MAX).is_err());
    }
}
