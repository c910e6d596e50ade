//! Typed errors of the wire layer and of connections.

use crate::error_code::ErrorCode;
use crate::frame_type::FrameType;

/// Why one frame could not be decoded or encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The payload ended inside a field.
    #[error("frame payload truncated in {0}")]
    Truncated(&'static str),
    /// Bytes were left after the last field of a fixed-layout payload.
    #[error("unexpected trailing bytes after {0}")]
    TrailingBytes(&'static str),
    /// A string field was not UTF-8.
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A field is longer than its length prefix or the protocol allows.
    #[error("{0} is too long")]
    FieldTooLong(&'static str),
    /// A field holds a value the protocol forbids.
    #[error("invalid {field}: {why}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The header's reserved bytes were not zero.
    #[error("reserved header bits are set")]
    ReservedBits,
    /// The header sets flag bits its frame type does not define.
    #[error("{ty} frame with undefined flags 0x{flags:02x}")]
    BadFlags {
        /// The frame type.
        ty: FrameType,
        /// The flags byte as received.
        flags: u8,
    },
    /// A connection-level frame with a job id, or a job frame without one.
    #[error("{ty} frame with job id {job}")]
    BadJobId {
        /// The frame type.
        ty: FrameType,
        /// The job id as received.
        job: u32,
    },
    /// A frame type outside the ignorable range that this version does not define.
    #[error("unknown mandatory frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The stream began with a TLS handshake record (`16 03`, a ClientHello) where a
    /// dcache HELLO belongs: a TLS client reached a plain dcache endpoint. Its own variant
    /// so the peer is told what happened rather than "unknown frame type 0x16"; the code
    /// is the one §3 gives type 0x16 anyway.
    #[error(
        "a TLS ClientHello arrived where a dcache HELLO was expected: this endpoint speaks \
         plain dcache, not TLS (connect with tcp://, or listen with tls://)"
    )]
    TlsHandshake,
    /// The declared payload length exceeds the limit the receiver announced.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// A compressed payload declares more content than the receiver's announced frame
    /// limit: refused before anything is allocated or inflated.
    #[error("compressed payload declares {len} bytes, over the limit of {max}")]
    InflatesTooLarge {
        /// Declared uncompressed length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
}

impl FrameError {
    /// The wire code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownType(_) | Self::TlsHandshake => ErrorCode::UNKNOWN_FRAME,
            Self::TooLarge { .. } | Self::InflatesTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            _ => ErrorCode::PROTOCOL,
        }
    }
}

/// Why a byte stream could not be decoded into frames. Once returned, the decoder that
/// returned it refuses all further input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A frame was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Too many consecutive frames carried nothing; a peer doing this is wasting our time.
    #[error("{0} consecutive empty or ignorable frames")]
    Flood(u32),
    /// The decoder failed earlier and accepts no more input.
    #[error("decoder already failed: {0}")]
    Failed(Box<DecodeError>),
}

impl DecodeError {
    /// The wire code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Frame(e) => e.code(),
            Self::Flood(_) => ErrorCode::FLOOD,
            Self::Failed(e) => e.code(),
        }
    }
}

/// Why a connection ended other than by a clean close.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The peer broke the protocol; we sent it an ERROR frame with `code`.
    #[error("peer violated the protocol ({code}): {reason}")]
    Protocol {
        /// The code we sent.
        code: ErrorCode,
        /// What exactly was wrong.
        reason: String,
    },
    /// The peer reported an error and closed.
    #[error("peer closed the connection with {code}: {message}")]
    PeerError {
        /// The code it sent.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// No version both sides speak.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, peer {peer_min}..={peer_max}"
    )]
    VersionMismatch {
        /// Lowest version we speak.
        ours_min: u16,
        /// Highest version we speak.
        ours_max: u16,
        /// Lowest version the peer speaks.
        peer_min: u16,
        /// Highest version the peer speaks.
        peer_max: u16,
    },
    /// A timer ran out (`what` says which).
    #[error("{what} timed out")]
    Timeout {
        /// The timer: handshake, idle or upload stall.
        what: &'static str,
    },
    /// The byte stream ended while jobs or the handshake were still open.
    #[error("connection closed by peer with work outstanding")]
    UnexpectedEof,
    /// Shared-token authentication failed or was not possible; the reason says which
    /// side lacks or mismatches the token, so the fix is clear (`DCACHE_TOKEN`,
    /// `--token-file`).
    #[error("authentication failed: {reason}")]
    Unauthorized {
        /// What was wrong.
        reason: String,
    },
    /// We closed the connection on request of our owner.
    #[error("connection closed locally ({code}): {reason}")]
    LocallyClosed {
        /// The code we sent.
        code: ErrorCode,
        /// The reason we gave.
        reason: String,
    },
}

impl ConnectionError {
    /// The code that describes this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Protocol { code, .. }
            | Self::PeerError { code, .. }
            | Self::LocallyClosed { code, .. } => *code,
            Self::VersionMismatch { .. } => ErrorCode::VERSION_MISMATCH,
            Self::Timeout { .. } => ErrorCode::TIMEOUT,
            Self::UnexpectedEof => ErrorCode::PROTOCOL,
            Self::Unauthorized { .. } => ErrorCode::UNAUTHORIZED,
        }
    }
}

/// Why a command given to a connection was refused. These are caller mistakes or states
/// the caller must handle, never peer input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The connection is closed or closing.
    #[error("connection is closed")]
    Closed,
    /// The server sent GOAWAY; start the job on another connection.
    #[error("server is going away; use another connection")]
    GoingAway,
    /// No such job, or it already ended.
    #[error("no open job {0}")]
    UnknownJob(u32),
    /// The job's source was already finished.
    #[error("source of job {0} already finished")]
    SourceFinished(u32),
    /// The job cannot be encoded (a field too long, too many outputs).
    #[error("cannot encode: {0}")]
    Encode(#[from] FrameError),
    /// The call does not fit the job's state (a second result, a verdict after the result).
    #[error("job {job}: {why}")]
    WrongState {
        /// The job.
        job: u32,
        /// What was wrong.
        why: &'static str,
    },
}
