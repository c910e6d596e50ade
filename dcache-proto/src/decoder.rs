//! The stream decoder: bytes in, whole frames out.

use bytes::BytesMut;

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::header::{FrameHeader, HEADER_LEN};

/// How many frames that carry nothing a peer may send in a row before the connection is
/// refused (see [`Frame::is_empty_filler`]).
pub const MAX_CONSECUTIVE_FILLER: u32 = 64;

/// Buffers are grown at most this much at a time while a frame body arrives, so a peer's
/// claimed length is never by itself a reason to allocate.
const RESERVE_STEP: usize = 64 * 1024;

/// Turns a byte stream into frames.
///
/// Input may be split or merged at any byte. [`FrameDecoder::decode`] returns `Ok(None)`
/// when it needs more bytes, and then has consumed nothing that is not part of a frame it
/// returned. The header is validated, length limit included, before any of the body is
/// waited for. After an error the decoder stays failed.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: u32,
    filler_run: u32,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `max_payload` bytes (what this side announced
    /// in its HELLO).
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            filler_run: 0,
            failed: None,
        }
    }

    /// The payload limit in force.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Whether an earlier call failed; a failed decoder refuses all input.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Decodes the next frame from the front of `buf`, removing its bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(DecodeError::Failed(Box::new(e.clone())));
        }
        match self.decode_inner(buf) {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut head_bytes = [0u8; HEADER_LEN];
        head_bytes.copy_from_slice(head);
        let header = FrameHeader::parse(&head_bytes, self.max_payload)?;
        // Fits: the header check bounded `len` by a u32 limit.
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            buf.reserve((total - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let mut frame_bytes = buf.split_to(total).freeze();
        let payload = frame_bytes.split_off(HEADER_LEN);
        let frame = Frame::decode(&header, payload)?;
        if frame.is_empty_filler() {
            self.filler_run += 1;
            if self.filler_run > MAX_CONSECUTIVE_FILLER {
                return Err(DecodeError::Flood(self.filler_run));
            }
        } else {
            self.filler_run = 0;
        }
        Ok(Some(frame))
    }
}
