//! The dcache compile server: result stores, compiler execution and the async service.
//!
//! - [`store`]: the [`Store`](store::Store) trait with a bounded memory LRU, a verified
//!   disk store and the two stacked.
//! - [`exec`]: the [`Executor`](exec::Executor) trait, the real allow-listed executor
//!   that feeds source to the compiler as it arrives (so the compiler's start-up overlaps
//!   the upload; gcc and clang parse only after the end of stdin), the option allow-list
//!   and a test double.
//! - [`sandbox`]: the kernel sandbox (Landlock, namespaces, limits) every server-side
//!   compile runs in, its launcher and its probe.
//! - [`Service`]: serves connections: answers HASH lookups at once (EARLY_RESULT or MISS),
//!   compiles misses with bounded concurrency and single-flight, verifies every received
//!   source against its HASH before storing anything, and counts what happens.
//! - [`config`]: every setting of `dcache-server`, read from a strict TOML file and
//!   printed back.
//! - [`relay`]: the relay back end, a service whose back end is other dcache servers
//!   ([`Service::relay`]): jobs passed on to them over persistent connections, with a
//!   local cache tier in front.
//! - [`metrics`]: the Prometheus and health endpoint, reading the same counters as
//!   STATS.
//! - [`distcc`]: the distcc front end, so stock distcc clients reach the same service
//!   ([`Service::serve_distcc`]).
#![forbid(unsafe_code)]

pub mod access;
pub mod config;
mod counters;
pub mod distcc;
mod error_log;
pub mod exec;
mod flight;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod relay;
pub mod sandbox;
mod service;
mod slots;
mod spool;
pub mod store;
mod store_writer;

pub use counters::{
    BUCKETS, ConnectionErrors, Counters, ErrorKind, Front, Histogram, HistogramSnapshot, JobCounts,
    Outcome, SandboxLimit, SandboxLimits,
};
pub use service::{Service, ServiceConfig, SlotUsage};

/// The exit code a shell would report (128 + signal when the process was killed).
pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

/// Locks `m`, recovering from poisoning: every critical section here is a single map
/// operation, which a panic elsewhere cannot leave half done.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
