//! A `tokio_util::codec` adapter, for tools that want frames rather than a connection
//! state machine (traffic inspection, custom peers, tests).

use bytes::BytesMut;
use dcache_proto::{DecodeError, Frame, FrameDecoder, FrameError};

/// Why the codec failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The byte stream is not valid dcache frames.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame could not be encoded (too large for the limit, a field too long).
    #[error(transparent)]
    Encode(#[from] FrameError),
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Frames over a byte stream, with one payload limit for both directions.
#[derive(Debug)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec accepting and producing payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            decoder: FrameDecoder::new(max_payload),
        }
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let encoded = item.encode(self.decoder.max_payload())?;
        dst.extend_from_slice(&encoded.head);
        dst.extend_from_slice(&encoded.tail);
        Ok(())
    }
}
