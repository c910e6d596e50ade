//! Binds the sans-IO `dcache-proto` state machines to tokio: TCP, Unix sockets,
//! in-memory pipes and a simulated link, plus the async driver.
//!
//! Filled in by the transport work; see `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]
