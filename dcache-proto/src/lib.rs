//! The dcache wire protocol, without IO.
//!
//! This crate holds the frames, their codec, the cache key and the client and server
//! connection state machines. It never touches a socket, a clock, a thread or a runtime:
//! bytes come in through `handle_*` methods, time comes in as a `now: Instant` argument,
//! and bytes, events and timers go out through `poll_*` methods. That is what lets the test
//! suite run a 40 ms link in microseconds and lets the fuzzer reach every state.
//!
//! The normative description of the bytes is `docs/PROTOCOL.md` in the repository.
#![forbid(unsafe_code)]

mod auth;
mod codec;
mod decoder;
mod error;
mod error_code;
mod frame;
mod frame_type;
mod header;
mod job;
mod key;

pub use auth::{AUTH_LEN, AuthKey, FEATURE_AUTH, Nonce};
pub use decoder::{FrameDecoder, MAX_CONSECUTIVE_FILLER};
pub use error::{CommandError, ConnectionError, DecodeError, FrameError};
pub use error_code::ErrorCode;
pub use frame::{
    EncodedFrame, Frame, HELLO_MAGIC, Hello, JobId, Limits, MAX_ARGS, MAX_OUTPUT_NAME, MAX_OUTPUTS,
    MAX_STATS, OutputMeta, ResultHead, ResultOrigin, Stat,
};
pub use frame_type::{Flags, FrameType};
pub use header::{FrameHeader, HEADER_LEN};
pub use job::{JobDesc, JobResult, OutputFile};
pub use key::{CacheKey, KeyHasher};

/// The protocol versions this implementation speaks.
pub const VERSION_MIN: u16 = 1;
/// The highest protocol version this implementation speaks.
pub const VERSION_MAX: u16 = 1;

mod client;
mod conn;
mod handshake;
mod outbox;
mod server;

pub use client::{ClientConfig, ClientConnection, ClientEvent, JobOutcome, Strategy};
pub use conn::Connection;
pub use server::{ConnStats, ServerConfig, ServerConnection, ServerEvent};

pub mod testing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
