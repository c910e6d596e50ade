//! Frame types and flags as they appear on the wire.
//!
//! A frame type is a newtype over the wire byte rather than a closed enum: a peer may send
//! any byte, and the decoder must be able to name what it got in an error, or skip it when
//! it is in the ignorable range, without a lossy conversion.

use std::fmt;

/// The type byte of a frame header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Opens a connection in each direction: versions, limits, features.
    pub const HELLO: Self = Self(0x01);
    /// Describes a compile job (client to server).
    pub const JOB: Self = Self(0x02);
    /// The job's cache key, sent just before the first SOURCE chunk (client to server).
    pub const HASH: Self = Self(0x03);
    /// A chunk of preprocessed source; the last one carries [`Flags::FIN`].
    pub const SOURCE: Self = Self(0x04);
    /// Verdict on a HASH: the server does not have the result (server to client).
    pub const MISS: Self = Self(0x05);
    /// A cached result sent in answer to HASH, while the source may still be in flight.
    pub const EARLY_RESULT: Self = Self(0x06);
    /// A result after the server has the whole source (compiled, or found by the key it
    /// computed itself).
    pub const RESULT: Self = Self(0x07);
    /// Continuation of a result body that did not fit in the RESULT frame.
    pub const DATA: Self = Self(0x08);
    /// Ends one direction of one job early; the connection lives on.
    pub const ABORT: Self = Self(0x09);
    /// A connection-level failure; the sender closes after it.
    pub const ERROR: Self = Self(0x0A);
    /// Graceful shutdown: no new jobs on this connection.
    pub const GOAWAY: Self = Self(0x0B);
    /// Asks the server for its counters.
    pub const STATS_REQUEST: Self = Self(0x0C);
    /// The server's counters, in answer to STATS_REQUEST.
    pub const STATS: Self = Self(0x0D);
    /// The client's answer to the server's authentication challenge (client to server).
    pub const AUTH: Self = Self(0x0E);

    /// First type of the range a receiver skips when it does not know the type, so optional
    /// frames can be added without a version bump.
    pub const FIRST_IGNORABLE: u8 = 0x80;

    /// Whether an unknown frame of this type may be skipped rather than treated as an error.
    pub fn is_ignorable(self) -> bool {
        self.0 >= Self::FIRST_IGNORABLE
    }

    /// Whether protocol version 1 defines this type.
    pub fn is_known(self) -> bool {
        (Self::HELLO.0..=Self::AUTH.0).contains(&self.0)
    }

    /// Whether frames of this type belong to the connection (job id 0) rather than a job.
    pub fn is_connection_level(self) -> bool {
        matches!(
            self,
            Self::HELLO
                | Self::ERROR
                | Self::GOAWAY
                | Self::STATS_REQUEST
                | Self::STATS
                | Self::AUTH
        )
    }

    /// Flag bits this type may carry; any other set bit is a protocol error, which keeps
    /// every frame's encoding canonical and leaves the bits free for later versions.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Self::RESULT => Flags::FIN | Flags::CACHED,
            Self::SOURCE | Self::DATA => Flags::FIN | Flags::ZSTD,
            Self::EARLY_RESULT => Flags::FIN,
            Self::JOB => Flags::SOURCE_LEN | Flags::IDENTITY,
            t if t.is_ignorable() => 0xFF,
            _ => 0,
        }
    }

    /// The protocol name of the type, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::HELLO => "HELLO",
            Self::JOB => "JOB",
            Self::HASH => "HASH",
            Self::SOURCE => "SOURCE",
            Self::MISS => "MISS",
            Self::EARLY_RESULT => "EARLY_RESULT",
            Self::RESULT => "RESULT",
            Self::DATA => "DATA",
            Self::ABORT => "ABORT",
            Self::ERROR => "ERROR",
            Self::GOAWAY => "GOAWAY",
            Self::STATS_REQUEST => "STATS_REQUEST",
            Self::STATS => "STATS",
            Self::AUTH => "AUTH",
            t if t.is_ignorable() => "ignorable",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(0x{:02x})", self.name(), self.0)
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Flag bits of a frame header. Their meaning depends on the frame type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags;

impl Flags {
    /// On SOURCE: the last chunk of the source. On RESULT, EARLY_RESULT and DATA: the last
    /// frame of the result body.
    pub const FIN: u8 = 0x01;
    /// On JOB: the payload ends with the total source length.
    pub const SOURCE_LEN: u8 = 0x01;
    /// On RESULT: the server found the result in its cache by the key of the source it
    /// received, rather than compiling it for this job. (EARLY_RESULT is always from the
    /// cache and does not carry the flag.)
    pub const CACHED: u8 = 0x02;
    /// On JOB (protocol version 2): the payload ends with the client's compiler identity,
    /// after the source length if that is present.
    pub const IDENTITY: u8 = 0x02;
    /// On SOURCE and DATA: the payload is compressed (`u32 content_len ‖ zstd frame`,
    /// see [`FEATURE_ZSTD`](crate::FEATURE_ZSTD)). Sent only on a connection where both
    /// HELLOs announced the feature; anywhere else the receiver refuses it (`PROTOCOL`).
    pub const ZSTD: u8 = 0x02;
}
