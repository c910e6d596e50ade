//! The stream decoder: bytes in, whole frames out.

use bytes::BytesMut;

use crate::error::{DecodeError, FrameError};
use crate::frame::Frame;
use crate::header::{FrameHeader, HEADER_LEN};

/// How many frames that carry nothing a peer may send in a row before the connection is
/// refused (see [`Frame::is_empty_filler`]).
pub const MAX_CONSECUTIVE_FILLER: u32 = 64;

/// Buffers are grown at most this much at a time while a frame body arrives, so a peer's
/// claimed length is never by itself a reason to allocate.
const RESERVE_STEP: usize = 64 * 1024;

/// The first two bytes of a TLS handshake record (content type 22, major version 3): how
/// every ClientHello begins.
const TLS_RECORD_START: [u8; 2] = [0x16, 0x03];

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
    /// Whether a frame has been decoded: only the stream's first bytes can be a
    /// ClientHello sent by mistake.
    started: bool,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `max_payload` bytes (what this side announced
    /// in its HELLO).
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            filler_run: 0,
            started: false,
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
        let header = match FrameHeader::parse(&head_bytes, self.max_payload) {
            Ok(header) => header,
            Err(FrameError::UnknownType(_))
                if !self.started && head_bytes[..2] == TLS_RECORD_START =>
            {
                return Err(FrameError::TlsHandshake.into());
            }
            Err(e) => return Err(e.into()),
        };
        // Fits: the header check bounded `len` by a u32 limit.
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            buf.reserve((total - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let mut frame_bytes = buf.split_to(total).freeze();
        let payload = frame_bytes.split_off(HEADER_LEN);
        let frame = Frame::decode(&header, payload)?;
        self.started = true;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::frame::{Hello, Limits};
    use bytes::Bytes;

    /// The first bytes of a real TLS 1.3 ClientHello record: handshake (0x16), legacy
    /// version 3.1, length, then the handshake message.
    const CLIENT_HELLO: [u8; 16] = [
        0x16, 0x03, 0x01, 0x00, 0xf8, 0x01, 0x00, 0x00, 0xf4, 0x03, 0x03, 0x5a, 0x1e, 0x00, 0x00,
        0x00,
    ];

    #[test]
    fn a_client_hello_first_is_named_as_tls() {
        let mut d = FrameDecoder::new(65_536);
        let e = d
            .decode(&mut BytesMut::from(&CLIENT_HELLO[..]))
            .unwrap_err();
        assert_eq!(e, DecodeError::Frame(FrameError::TlsHandshake));
        assert_eq!(e.code(), crate::ErrorCode::UNKNOWN_FRAME);
        assert!(e.to_string().contains("TLS ClientHello"), "{e}");
    }

    #[test]
    fn the_same_bytes_after_a_frame_are_an_unknown_type() {
        let hello = Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            limits: Limits::default(),
            features: 0,
            extensions: Bytes::new(),
        })
        .to_bytes(65_536)
        .unwrap();
        let mut buf = BytesMut::from(&hello[..]);
        buf.extend_from_slice(&CLIENT_HELLO);
        let mut d = FrameDecoder::new(65_536);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Frame::Hello(_)))));
        assert_eq!(
            d.decode(&mut buf).unwrap_err(),
            DecodeError::Frame(FrameError::UnknownType(0x16))
        );
        // Type 0x16 without the TLS version byte is an ordinary unknown type, first or not.
        let mut other = BytesMut::from(&CLIENT_HELLO[..]);
        other[1] = 0x00;
        assert_eq!(
            FrameDecoder::new(65_536).decode(&mut other).unwrap_err(),
            DecodeError::Frame(FrameError::UnknownType(0x16))
        );
    }
}
