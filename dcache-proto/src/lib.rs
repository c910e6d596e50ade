//! The dcache wire protocol, without IO.
//!
//! This crate holds the frames, their codec, the cache key and the client and server
//! connection state machines. It never touches a socket, a clock, a thread or a runtime:
//! bytes come in through `handle_*` methods, time comes in as a `now: Instant` argument,
//! and bytes, events and timers go out through `poll_*` methods. That is what lets the test
//! suite run a 40 ms link in microseconds and lets the fuzzer reach every state.
//!
//! The normative description of the bytes is `docs/PROTOCOL.md` in the repository.
//!
//! # The run loop
//!
//! [`ClientConnection`] and [`ServerConnection`] are both driven through the
//! [`Connection`] trait, by one loop with one order. After the connection is made, and
//! again after anything happens (bytes read, the read side ending, a timer, a command
//! from the owner), the driver does, until a full turn changes nothing:
//!
//! 1. **Input.** Bytes read go to [`handle_input`](Connection::handle_input), the end of
//!    the read side to [`handle_eof`](Connection::handle_eof). If
//!    [`has_paused_input`](Connection::has_paused_input) is true, it calls
//!    `handle_input(now, &[])` so frames that waited are decoded.
//! 2. **Events.** [`poll_event`](Connection::poll_event) until `None`, acting on each;
//!    commands the owner issues in answer (an early result, a MISS, a cancel) are queued
//!    at once.
//! 3. **Transmit.** [`poll_transmit`](Connection::poll_transmit) until `None`, or until
//!    the transport has no room; it is called again when room comes. Events come before
//!    transmit so that the answers of step 2 leave in the same write, and bytes are taken
//!    only when the transport can take them: whatever has not been handed out can still
//!    be stopped (an early result ends an upload the socket has not taken).
//! 4. **Timers.** [`poll_timeout`](Connection::poll_timeout) gives the next deadline;
//!    when it has passed, [`handle_timeout`](Connection::handle_timeout), then back to
//!    step 2.
//!
//! The connection is over when [`is_closed`](Connection::is_closed) is true: everything
//! it had to say has been handed out, and the transport can be shut down.
//!
//! ## Backpressure
//!
//! A server stops decoding when the output it has queued for a client reaches
//! [`ServerConfig::max_queued_output`], or when too many STATS answers are owed: a client
//! that sends requests and never reads cannot make it queue without bound. While paused,
//! [`wants_input`](Connection::wants_input) is false, and the driver stops reading from the
//! transport (a frame's worth of buffered input also makes it false). Bytes already read
//! wait, decoded or not, in the connection. Once the output drains (step 3) or the owner
//! answers, [`has_paused_input`](Connection::has_paused_input) turns true, and nothing else
//! will wake the connection: the driver must resume it itself in step 1, or it stalls with
//! frames in its buffer and no input coming. Read again once `wants_input` is true.
//!
//! The transport driver (`dcache-transport`), the fuzzing entry points and
//! [`testing::Pair::step`] all run this loop.
#![forbid(unsafe_code)]

mod auth;
mod compress;
mod decoder;
mod error;
mod error_code;
mod fields;
mod frame;
mod frame_type;
mod header;
mod identity;
mod job;
mod key;
pub mod rendezvous;

pub use auth::{AUTH_LEN, AuthKey, FEATURE_AUTH, Nonce};
pub use compress::{
    COMPRESSED_PREFIX_LEN, DEFAULT_LEVEL, FEATURE_ZSTD, compress_payload, decompress_payload,
};
pub use decoder::{FrameDecoder, MAX_CONSECUTIVE_FILLER};
pub use error::{CommandError, ConnectionError, DecodeError, FrameError};
pub use error_code::ErrorCode;
pub use frame::{
    EncodedFrame, Frame, HELLO_MAGIC, Hello, JobId, Limits, MAX_ARGS, MAX_OUTPUT_NAME, MAX_OUTPUTS,
    MAX_STATS, OutputMeta, ResultHead, ResultOrigin, Stat,
};
pub use frame_type::{Flags, FrameType};
pub use header::{FrameHeader, HEADER_LEN};
pub use identity::{CompilerIdentity, IdentityDigest, MAX_IDENTITY_FIELD};
pub use job::{JobDesc, JobResult, OutputFile};
pub use key::{CacheKey, KeyHasher};

/// The lowest protocol version this implementation's server speaks: a version-1 client
/// still connects and is told, job by job, why it is refused (its JOB cannot carry the
/// compiler identity).
pub const VERSION_MIN: u16 = 1;
/// The highest protocol version this implementation speaks. Version 2 adds the compiler
/// identity to JOB (flag `IDENTITY`).
pub const VERSION_MAX: u16 = 2;
/// The lowest version this implementation's client speaks: a version-1 server cannot be
/// told which compiler a job needs and would run whichever it has under that name, so a
/// client never negotiates below 2 (such a server answers `VERSION_MISMATCH`, and the
/// client compiles elsewhere).
pub const CLIENT_VERSION_MIN: u16 = 2;

mod client;
mod conn;
mod handshake;
mod outbox;
mod server;

pub use client::{
    ClientConfig, ClientConnection, ClientEvent, JobOutcome, MIN_COMPRESSED_SOURCE, Strategy,
    UnknownStrategy,
};
pub use conn::{Connection, MAX_TIMEOUT};
pub use server::{ConnStats, ServerConfig, ServerConnection, ServerEvent};

pub mod testing;

// Built for this crate's own tests too, so the fuzz regression tests and the seed-corpus
// check run under a plain `cargo test`.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
