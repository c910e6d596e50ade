//! Error codes carried by ERROR (connection) and ABORT (job) frames.

use std::fmt;

/// A numeric error code as carried on the wire.
///
/// A newtype rather than an enum because a peer may send codes this version does not know;
/// those must survive decoding so they can be logged and passed on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame was malformed: bad header, bad payload, invalid UTF-8, bad flags.
    pub const PROTOCOL: Self = Self(0x0001);
    /// A frame's declared payload exceeded the receiver's announced limit.
    pub const FRAME_TOO_LARGE: Self = Self(0x0002);
    /// A frame type outside the ignorable range that the receiver does not know.
    pub const UNKNOWN_FRAME: Self = Self(0x0003);
    /// The peers share no protocol version.
    pub const VERSION_MISMATCH: Self = Self(0x0004);
    /// A well-formed frame arrived where the state machine does not allow it (SOURCE
    /// after FIN, HASH after SOURCE, a second HELLO, an unknown job id).
    pub const UNEXPECTED_FRAME: Self = Self(0x0005);
    /// The peer was too slow: handshake, idle or stalled upload.
    pub const TIMEOUT: Self = Self(0x0006);
    /// The peer exceeded a limit it was told about (jobs in flight).
    pub const LIMIT: Self = Self(0x0007);
    /// The sender failed internally; not the receiver's fault.
    pub const INTERNAL: Self = Self(0x0008);
    /// Too many consecutive frames that carry nothing (empty chunks, ignorable frames).
    pub const FLOOD: Self = Self(0x0009);
    /// The peer failed authentication or is not allowed to connect.
    pub const UNAUTHORIZED: Self = Self(0x000A);

    /// Job codes: the client cancelled the job or stopped its upload after a result.
    pub const CANCELLED: Self = Self(0x0100);
    /// The source the server received does not hash to the HASH the client sent.
    pub const HASH_MISMATCH: Self = Self(0x0101);
    /// The server refuses the job: compiler not allowed, option refused. The client should
    /// compile locally.
    pub const REFUSED: Self = Self(0x0102);
    /// The server is too busy to take the job now; another host may.
    pub const OVERLOADED: Self = Self(0x0103);
    /// The source exceeds the server's limit.
    pub const SOURCE_TOO_LARGE: Self = Self(0x0104);
    /// The compiler could not be run, or ran out of time (not a compile error: those come
    /// back as a RESULT with the compiler's exit status).
    pub const COMPILE_FAILED: Self = Self(0x0105);
    /// The server is shutting down and did not start this job.
    pub const SHUTTING_DOWN: Self = Self(0x0106);
    /// The source length differs from the length the JOB declared.
    pub const LENGTH_MISMATCH: Self = Self(0x0107);
    /// No compiler the server offers has the identity the JOB names (protocol version 2):
    /// another server may have it; otherwise the client compiles locally. The message
    /// names the client's compiler and the server's.
    pub const COMPILER_MISMATCH: Self = Self(0x0108);

    /// The protocol name of the code, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::PROTOCOL => "PROTOCOL",
            Self::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            Self::UNKNOWN_FRAME => "UNKNOWN_FRAME",
            Self::VERSION_MISMATCH => "VERSION_MISMATCH",
            Self::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
            Self::TIMEOUT => "TIMEOUT",
            Self::LIMIT => "LIMIT",
            Self::INTERNAL => "INTERNAL",
            Self::FLOOD => "FLOOD",
            Self::UNAUTHORIZED => "UNAUTHORIZED",
            Self::CANCELLED => "CANCELLED",
            Self::HASH_MISMATCH => "HASH_MISMATCH",
            Self::REFUSED => "REFUSED",
            Self::OVERLOADED => "OVERLOADED",
            Self::SOURCE_TOO_LARGE => "SOURCE_TOO_LARGE",
            Self::COMPILE_FAILED => "COMPILE_FAILED",
            Self::SHUTTING_DOWN => "SHUTTING_DOWN",
            Self::LENGTH_MISMATCH => "LENGTH_MISMATCH",
            Self::COMPILER_MISMATCH => "COMPILER_MISMATCH",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(0x{:04x})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
