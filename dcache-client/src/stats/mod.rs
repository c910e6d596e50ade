//! The statistics `dcache --stats` shows.
//!
//! - [`local`]: the embedded cache's counters, kept across processes in the cache
//!   directory (each `dcache` process is short-lived; the counts must outlive it).
//! - [`baseline`]: a per-user zero for shared servers' counters, so `--zero-stats` never
//!   wipes what other users see.

pub mod baseline;
pub mod local;
