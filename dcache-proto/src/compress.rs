//! zstd-compressed SOURCE and DATA payloads (the `ZSTD` feature, docs/PROTOCOL.md §5.13).
//!
//! Pure functions on buffers: no IO, no clock, no thread. A compressed payload is
//! `u32 content_len ‖ one zstd frame` whose content is exactly `content_len` bytes. The
//! receiver checks `content_len` against its own announced frame limit *before* it
//! allocates anything, then decompresses into a buffer of exactly that size, so a frame
//! that would inflate past what it declared (a "zip bomb") fails the moment the buffer is
//! full: no byte beyond the limit is ever written or allocated.
//!
//! Compression never changes what is hashed, cached or verified: the cache key and HASH
//! are over the uncompressed bytes, and the state machines decompress before anything
//! else looks at a frame.

use bytes::{BufMut, Bytes, BytesMut};
use zstd::zstd_safe;

use crate::error::FrameError;

/// HELLO feature bit 1: the sender accepts zstd-compressed SOURCE and DATA frames
/// (flag [`Flags::ZSTD`](crate::Flags::ZSTD)). Compression is in use on a connection
/// only when both HELLOs carry it; a server sets it only in answer to a client that did,
/// so a client without it sees exactly the bytes it always did.
pub const FEATURE_ZSTD: u64 = 1 << 1;

/// Bytes of the `content_len` prefix of a compressed payload.
pub const COMPRESSED_PREFIX_LEN: usize = 4;

/// The zstd level dcache uses by default: level 1 compresses preprocessed C at hundreds
/// of MB/s, so on the links where compression pays at all it costs far less than it
/// saves; higher levels buy a few percent of size for several times the time.
pub const DEFAULT_LEVEL: i32 = 1;

/// Reusable zstd contexts for one connection: allocating a compression context per frame
/// would cost more than compressing a 64 KiB chunk.
pub(crate) struct Codec {
    level: i32,
    cctx: zstd_safe::CCtx<'static>,
    dctx: zstd_safe::DCtx<'static>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("level", &self.level).finish()
    }
}

impl Codec {
    pub(crate) fn new(level: i32) -> Self {
        Self {
            level,
            cctx: zstd_safe::CCtx::create(),
            dctx: zstd_safe::DCtx::create(),
        }
    }

    /// The wire payload for `data` if compressing makes it smaller, `None` otherwise (the
    /// frame then goes out as it is).
    pub(crate) fn compress_if_smaller(&mut self, data: &[u8]) -> Option<Bytes> {
        compress_with(&mut self.cctx, self.level, data).filter(|c| c.len() < data.len())
    }

    /// See [`decompress_payload`].
    pub(crate) fn decompress(&mut self, payload: &[u8], limit: u32) -> Result<Bytes, FrameError> {
        decompress_with(&mut self.dctx, payload, limit)
    }
}

/// Compresses `data` into a compressed payload (`u32 content_len ‖ zstd frame`) at zstd
/// `level`. `None` for empty data (a compressed frame always carries at least one byte,
/// so it can never pass for filler) or data longer than a u32 can describe.
pub fn compress_payload(data: &[u8], level: i32) -> Option<Bytes> {
    compress_with(&mut zstd_safe::CCtx::create(), level, data)
}

fn compress_with(cctx: &mut zstd_safe::CCtx<'static>, level: i32, data: &[u8]) -> Option<Bytes> {
    let content_len = u32::try_from(data.len()).ok().filter(|&n| n > 0)?;
    let bound = zstd_safe::compress_bound(data.len());
    let mut out = Vec::with_capacity(COMPRESSED_PREFIX_LEN + bound);
    out.put_u32(content_len);
    let mut frame = Vec::with_capacity(bound);
    // The bound is zstd's own worst case, so this only fails on a zstd bug.
    cctx.compress(&mut frame, data, level).ok()?;
    out.extend_from_slice(&frame);
    Some(Bytes::from(out))
}

/// Decompresses a compressed payload, refusing one whose declared content is larger than
/// `limit` (the receiver's own `max_frame_payload`) *before* allocating, and one whose
/// zstd frame inflates to anything but exactly the declared length. Malformed input of
/// any kind is an error, never a panic.
pub fn decompress_payload(payload: &[u8], limit: u32) -> Result<Bytes, FrameError> {
    decompress_with(&mut zstd_safe::DCtx::create(), payload, limit)
}

fn decompress_with(
    dctx: &mut zstd_safe::DCtx<'static>,
    payload: &[u8],
    limit: u32,
) -> Result<Bytes, FrameError> {
    let bad = |why| {
        Err(FrameError::InvalidField {
            field: "compressed payload",
            why,
        })
    };
    let Some((prefix, frame)) = payload.split_first_chunk::<COMPRESSED_PREFIX_LEN>() else {
        return Err(FrameError::Truncated("compressed payload length"));
    };
    let content_len = u32::from_be_bytes(*prefix);
    if content_len == 0 {
        return bad("declares no content");
    }
    let max = limit.min(crate::Limits::MAX_FRAME_PAYLOAD);
    if content_len > max {
        return Err(FrameError::InflatesTooLarge {
            len: content_len,
            max,
        });
    }
    // Exactly one zstd frame, nothing after it (zstd would otherwise decode a sequence
    // of frames, and skippable frames could hide bytes).
    match zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => {}
        Ok(_) => return bad("bytes after the zstd frame"),
        Err(_) => return bad("not a zstd frame"),
    }
    // A frame that states its content size must state the one declared: checked before
    // the buffer is allocated.
    match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n != u64::from(content_len) => {
            return bad("zstd frame content size differs from the declared length");
        }
        Ok(_) => {}
        Err(_) => return bad("not a zstd frame"),
    }
    // The buffer holds exactly what was declared (at most our own limit); zstd stops with
    // an error the moment the output would not fit.
    let mut out = BytesMut::zeroed(content_len as usize);
    match dctx.decompress(&mut out[..], frame) {
        Ok(n) if n == out.len() => Ok(out.freeze()),
        Ok(_) => bad("inflates to fewer bytes than declared"),
        Err(_) => bad("corrupt, or inflates past the declared length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_shrinks_text() {
        let text = b"int x = 42;\n".repeat(1000);
        let c = compress_payload(&text, DEFAULT_LEVEL).expect("compress");
        assert!(c.len() < text.len() / 10, "{} bytes", c.len());
        assert_eq!(&c[..4], &(text.len() as u32).to_be_bytes());
        let d = decompress_payload(&c, 1 << 20).expect("decompress");
        assert_eq!(&d[..], &text[..]);
    }

    #[test]
    fn empty_data_is_not_compressed() {
        assert_eq!(compress_payload(b"", 1), None);
    }

    #[test]
    fn a_declared_length_over_the_limit_fails_before_decompressing() {
        let c = compress_payload(&[0u8; 70_000], 1).expect("compress");
        assert_eq!(
            decompress_payload(&c, 65_536),
            Err(FrameError::InflatesTooLarge {
                len: 70_000,
                max: 65_536
            })
        );
    }

    #[test]
    fn a_bomb_that_lies_about_its_length_fails_at_the_declared_length() {
        // 16 MiB of zeros compress to a few hundred bytes; declare 1 KiB.
        let real = compress_payload(&vec![0u8; 16 << 20], 1).expect("compress");
        assert!(real.len() < 4096);
        let mut lie = BytesMut::new();
        lie.put_u32(1024);
        lie.extend_from_slice(&real[4..]);
        assert!(matches!(
            decompress_payload(&lie, 16 << 20),
            Err(FrameError::InvalidField { .. })
        ));
    }

    #[test]
    fn a_frame_without_a_content_size_that_inflates_too_far_is_stopped() {
        // A streamed frame does not state its content size, so only the capped buffer
        // stands in the way.
        let mut enc = zstd_safe::CCtx::create();
        enc.set_parameter(zstd_safe::CParameter::ContentSizeFlag(false))
            .expect("param");
        let mut frame = Vec::with_capacity(1 << 16);
        enc.compress2(&mut frame, &vec![7u8; 1 << 20])
            .expect("compress");
        assert!(matches!(
            zstd_safe::get_frame_content_size(&frame),
            Ok(None)
        ));
        let mut lie = BytesMut::new();
        lie.put_u32(4096);
        lie.extend_from_slice(&frame);
        assert!(decompress_payload(&lie, 1 << 24).is_err());
    }

    #[test]
    fn garbage_trailing_bytes_and_short_frames_are_refused() {
        let c = compress_payload(b"hello hello hello hello", 1).expect("compress");
        for bad in [
            &b""[..],
            &b"\0\0\0"[..],
            &b"\0\0\0\x05abcde"[..],
            &c[..c.len() - 1],
        ] {
            assert!(decompress_payload(bad, 1 << 20).is_err(), "{bad:?}");
        }
        let mut trailing = c.to_vec();
        trailing.push(0);
        assert!(decompress_payload(&trailing, 1 << 20).is_err());
        let mut zero = c.to_vec();
        zero[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(decompress_payload(&zero, 1 << 20).is_err());
    }
}
