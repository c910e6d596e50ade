//! The dcache wire protocol, without IO.
//!
//! This crate holds the frames, their codec, the cache key and the client and server
//! connection state machines. It never touches a socket, a clock, a thread or a runtime:
//! bytes come in through `handle_*` methods, time comes in as a `now: Instant` argument,
//! and bytes, events and timers go out through `poll_*` methods. That is what lets the test
//! suite run a 40 ms link in microseconds and lets the fuzzer reach every state.
#![forbid(unsafe_code)]

mod job;

pub use job::{JobDesc, JobResult, OutputFile};
