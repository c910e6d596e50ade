//! Choosing a server for a job: rendezvous hashing of the job's key over the configured
//! hosts, with failing hosts skipped for a while.
//!
//! The rule itself ([`rank`], [`score`], [`HostHealth`]) lives in
//! [`dcache_proto::rendezvous`], so that a relay (`dcache-server --upstream`) sends a job
//! to the very server this client would; it is re-exported here unchanged. [`shared`]
//! keeps the same back-off on disk so that every process of the user skips a host one of
//! them saw fail.

pub mod shared;

pub use dcache_proto::rendezvous::{DEFAULT_BACKOFF, HostHealth, rank, score};
