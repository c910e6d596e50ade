//! Field-level encoding: a bounded reader over a payload and the matching writers.
//!
//! Every read checks the bytes remaining first, so a malformed payload yields an error,
//! never a panic or an out-of-bounds slice.

use bytes::{BufMut, Bytes};

use crate::error::FrameError;

/// Reads fields from one frame payload, never past its end.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes `n` bytes without copying.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated(what));
        }
        Ok(self.buf.split_to(n))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, FrameError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn bytes32(&mut self, what: &'static str) -> Result<[u8; 32], FrameError> {
        self.array(what)
    }

    /// A string with a u16 length prefix; must be UTF-8.
    pub(crate) fn str16(&mut self, what: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16(what)?);
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::InvalidUtf8(what))
    }

    /// The unread rest, without copying.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Fails when bytes are left over: every v1 payload has an exact length, which keeps
    /// encodings canonical (decode then encode gives the same bytes).
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes(what))
        }
    }
}

/// Writes a string with a u16 length prefix. The caller has checked the length fits.
pub(crate) fn put_str16(out: &mut impl BufMut, s: &str) {
    // Callers validate with `check_str16` first; truncating here would corrupt the frame,
    // so the cast is only reached with lengths that fit.
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// Checks that a string fits a u16 length prefix.
pub(crate) fn check_str16(s: &str, what: &'static str) -> Result<(), FrameError> {
    if s.len() > usize::from(u16::MAX) {
        return Err(FrameError::FieldTooLong(what));
    }
    Ok(())
}
