//! The dcache compile server: result stores, compiler execution and the async service.
//!
//! - [`store`]: the [`Store`](store::Store) trait with a bounded memory LRU, a verified
//!   disk store and the two stacked.
//! - [`exec`]: the [`Executor`](exec::Executor) trait, the real allow-listed executor
//!   that feeds source to the compiler as it arrives, the option allow-list and a test
//!   double.
//! - [`Service`]: serves connections: answers HASH lookups at once (EARLY_RESULT or MISS),
//!   compiles misses with bounded concurrency and single-flight, verifies every received
//!   source against its HASH before storing anything, and counts what happens.
#![forbid(unsafe_code)]

pub mod access;
pub mod exec;
pub mod sandbox;
pub mod store;

/// The stores under their first name; kept so code written against it still builds.
/// New code says [`store`].
pub use store as cache;

/// The executors under their first name; kept so code written against it still builds.
/// New code says [`exec`].
pub use exec as compiler;
mod counters;
mod service;
mod spool;

pub use counters::Counters;
pub use service::{Service, ServiceConfig};

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
