//! Server-wide counters: the one tally behind both STATS (sent to clients) and the
//! Prometheus endpoint ([`crate::metrics`]). Each event is counted once, here; STATS
//! figures that are sums (`hits` over both front ends, `connection_errors` over every
//! code) are computed from the finer counters when read, never kept twice.

mod histogram;

use std::sync::atomic::{AtomicU64, Ordering};

use dcache_proto::{ConnectionError, ErrorCode, Stat};

pub use histogram::{BUCKETS, Histogram, HistogramSnapshot};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Counters of one server, shared by all its connections.
        #[derive(Debug, Default)]
        pub struct Counters {
            /// Jobs by front end and outcome (`hits`, `misses`, … in STATS).
            pub jobs: JobCounts,
            /// Connections ended by an error, by its code (`connection_errors` in STATS).
            pub connection_errors: ConnectionErrors,
            /// Compiles stopped by a sandbox limit, by limit.
            pub sandbox_limits: SandboxLimits,
            /// Time from a lookup's start to its hit being answered.
            pub hit_latency: Histogram,
            /// Time a compile took, from its start (source streaming in) to its result.
            pub compile_duration: Histogram,
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter as a (name, value) list, in a fixed order.
            pub fn snapshot(&self) -> Vec<Stat> {
                let stat = |name: &str, value| Stat { name: name.into(), value };
                let mut stats = vec![
                    stat("hits", self.jobs.total(Outcome::Hit)),
                    stat("misses", self.jobs.total(Outcome::Miss)),
                    stat("early_results", self.jobs.total(Outcome::Early)),
                    stat("compile_failures", self.jobs.total(Outcome::Failed)),
                    stat("jobs_refused", self.jobs.total(Outcome::Refused)),
                    stat("connection_errors", self.connection_errors.total()),
                    stat("hit_time_us", self.hit_latency.sum_micros()),
                    stat("compile_time_us", self.compile_duration.sum_micros()),
                ];
                $(stats.push(stat(stringify!($name), self.$name.load(Ordering::Relaxed)));)*
                for l in SandboxLimit::ALL {
                    stats.push(Stat {
                        name: format!("sandbox_limit_{}", l.label()),
                        value: self.sandbox_limits.get(l),
                    });
                }
                stats
            }

            /// Sets every counter to zero.
            pub fn reset(&self) {
                self.jobs.reset();
                self.connection_errors.reset();
                self.sandbox_limits.reset();
                self.hit_latency.reset();
                self.compile_duration.reset();
                $(self.$name.store(0, Ordering::Relaxed);)*
            }
        }
    };
}

counters! {
    /// Compiler runs.
    compiles,
    /// Jobs that waited for an identical compile in flight instead of compiling.
    single_flight_waits,
    /// Jobs ended because their upload stalled while they held a compile slot.
    slow_uploads_ended,
    /// Source bytes received.
    source_bytes_received,
    /// Declared source bytes clients never had to send because the result came first.
    source_bytes_saved,
    /// Jobs whose HASH did not match their source.
    hash_mismatches,
    /// Results that could not be stored (the compile result was still returned).
    store_errors,
    /// Connections accepted.
    connections,
    /// Connections refused at once: address not allowed, per-address cap reached, or the
    /// handshake pool full.
    connections_refused,
    /// Connections accepted from distcc clients. Each request they carry is served through
    /// an in-process dcache connection, which `connections` counts as well.
    distcc_connections,
    /// distcc requests received whole and answered with a result.
    distcc_jobs,
    /// distcc requests answered from the cache (also in `hits`).
    distcc_hits,
    /// distcc requests answered by compiling (also in `compiles`).
    distcc_compiles,
    /// distcc requests closed unanswered so that the client compiles locally: address,
    /// compiler, option or protocol version (pump mode) refused, or the server overloaded.
    distcc_refused,
    /// Jobs a relay passed on to an upstream (each attempt counts once).
    upstream_jobs,
    /// Results a relay's upstreams answered from their caches.
    upstream_hits,
    /// Jobs a relay passed to the next upstream after one failed, was busy or lacked the
    /// compiler.
    upstream_fallthroughs,
    /// Upstream connections that failed under a job (the upstream then backs off).
    upstream_failures,
    /// distcc connections ended by a malformed, oversized, truncated or stalled request.
    distcc_errors,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The front end a job came in through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Front {
    /// A dcache protocol client (TCP, TLS, Unix socket, in-process).
    Dcache,
    /// A stock distcc client, served through an in-process dcache connection.
    Distcc,
}

impl Front {
    /// Every front end, in label order.
    pub const ALL: [Front; 2] = [Front::Dcache, Front::Distcc];

    /// The value of the `front` label.
    pub fn label(self) -> &'static str {
        match self {
            Front::Dcache => "dcache",
            Front::Distcc => "distcc",
        }
    }
}

/// What became of a job, as counted. `Early` is also a `Hit` (an early answer is a hit
/// answered while the upload went on), and `Failed` is also a `Miss` (the compile ran
/// and exited non-zero); the others exclude each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Answered from the cache.
    Hit,
    /// Looked up and not found.
    Miss,
    /// Answered with EARLY_RESULT while the client was still uploading.
    Early,
    /// Compiled, and the compiler exited non-zero.
    Failed,
    /// Refused before any lookup: compiler or option not allowed.
    Refused,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Early,
        Outcome::Failed,
        Outcome::Refused,
    ];

    /// The value of the `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Early => "early",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

/// Jobs by front end and outcome.
#[derive(Debug, Default)]
pub struct JobCounts([[AtomicU64; Outcome::ALL.len()]; Front::ALL.len()]);

impl JobCounts {
    /// Counts one job of `front` with `outcome`.
    pub fn bump(&self, front: Front, outcome: Outcome) {
        self.0[front as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs of `front` with `outcome`.
    pub fn get(&self, front: Front, outcome: Outcome) -> u64 {
        self.0[front as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Jobs with `outcome`, both front ends together.
    pub fn total(&self, outcome: Outcome) -> u64 {
        Front::ALL.iter().map(|f| self.get(*f, outcome)).sum()
    }

    fn reset(&self) {
        for row in &self.0 {
            for c in row {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The codes connection errors are counted by: the protocol's connection-level codes,
/// the peer vanishing mid-job, and the rest together (a peer's ERROR frame can carry
/// any number: counting each would let a peer mint label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A malformed frame.
    Protocol,
    /// A frame over the announced limit.
    FrameTooLarge,
    /// An unknown mandatory frame type.
    UnknownFrame,
    /// No common protocol version.
    VersionMismatch,
    /// A frame where the protocol does not allow it.
    UnexpectedFrame,
    /// A handshake, idle or stall timer ran out.
    Timeout,
    /// A limit the peer was told about was exceeded.
    Limit,
    /// Too many frames carrying nothing.
    Flood,
    /// Authentication failed.
    Unauthorized,
    /// The peer closed with jobs or the handshake still open.
    Eof,
    /// Any other code (internal failures, a peer's own ERROR).
    Other,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Protocol,
        ErrorKind::FrameTooLarge,
        ErrorKind::UnknownFrame,
        ErrorKind::VersionMismatch,
        ErrorKind::UnexpectedFrame,
        ErrorKind::Timeout,
        ErrorKind::Limit,
        ErrorKind::Flood,
        ErrorKind::Unauthorized,
        ErrorKind::Eof,
        ErrorKind::Other,
    ];

    /// The kind of a connection's end.
    pub fn of(e: &ConnectionError) -> Self {
        if matches!(e, ConnectionError::UnexpectedEof) {
            return ErrorKind::Eof;
        }
        match e.code() {
            ErrorCode::PROTOCOL => ErrorKind::Protocol,
            ErrorCode::FRAME_TOO_LARGE => ErrorKind::FrameTooLarge,
            ErrorCode::UNKNOWN_FRAME => ErrorKind::UnknownFrame,
            ErrorCode::VERSION_MISMATCH => ErrorKind::VersionMismatch,
            ErrorCode::UNEXPECTED_FRAME => ErrorKind::UnexpectedFrame,
            ErrorCode::TIMEOUT => ErrorKind::Timeout,
            ErrorCode::LIMIT => ErrorKind::Limit,
            ErrorCode::FLOOD => ErrorKind::Flood,
            ErrorCode::UNAUTHORIZED => ErrorKind::Unauthorized,
            _ => ErrorKind::Other,
        }
    }

    /// The value of the `code` label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::UnknownFrame => "unknown_frame",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::UnexpectedFrame => "unexpected_frame",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Limit => "limit",
            ErrorKind::Flood => "flood",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Eof => "eof",
            ErrorKind::Other => "other",
        }
    }
}

/// Connections ended by an error, by [`ErrorKind`].
#[derive(Debug, Default)]
pub struct ConnectionErrors([AtomicU64; ErrorKind::ALL.len()]);

impl ConnectionErrors {
    /// Counts one connection ended by `e`.
    pub fn bump(&self, e: &ConnectionError) {
        self.0[ErrorKind::of(e) as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections ended by errors of `kind`.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    /// Connections ended by any error.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn reset(&self) {
        for c in &self.0 {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The sandbox limits a compile can be stopped by, as far as the server can tell which:
/// its wall-clock time, its CPU time (SIGXCPU), the size of a file it writes (SIGXFSZ,
/// or an output over the limit). A compile that runs out of address space usually just
/// fails with the compiler's own message, and counts as a failed compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxLimit {
    /// The wall-clock time limit.
    Time,
    /// The CPU time limit.
    Cpu,
    /// The output size limit.
    Output,
}

impl SandboxLimit {
    /// Every limit, in label order.
    pub const ALL: [SandboxLimit; 3] =
        [SandboxLimit::Time, SandboxLimit::Cpu, SandboxLimit::Output];

    /// The value of the `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            SandboxLimit::Time => "time",
            SandboxLimit::Cpu => "cpu",
            SandboxLimit::Output => "output",
        }
    }
}

/// Compiles stopped by a sandbox limit, by [`SandboxLimit`].
#[derive(Debug, Default)]
pub struct SandboxLimits([AtomicU64; SandboxLimit::ALL.len()]);

impl SandboxLimits {
    /// Counts one compile stopped by `limit`.
    pub fn bump(&self, limit: SandboxLimit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Compiles stopped by `limit`.
    pub fn get(&self, limit: SandboxLimit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }

    fn reset(&self) {
        for c in &self.0 {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(c: &Counters, name: &str) -> u64 {
        c.snapshot()
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no {name} in STATS"))
    }

    #[test]
    fn stats_sums_are_the_sums_of_the_fine_counters() {
        let c = Counters::default();
        c.jobs.bump(Front::Dcache, Outcome::Hit);
        c.jobs.bump(Front::Distcc, Outcome::Hit);
        c.jobs.bump(Front::Distcc, Outcome::Refused);
        c.connection_errors.bump(&ConnectionError::UnexpectedEof);
        c.connection_errors
            .bump(&ConnectionError::Timeout { what: "handshake" });
        assert_eq!(stat(&c, "hits"), 2);
        assert_eq!(stat(&c, "jobs_refused"), 1);
        assert_eq!(stat(&c, "misses"), 0);
        assert_eq!(stat(&c, "connection_errors"), 2);
        assert_eq!(c.connection_errors.get(ErrorKind::Eof), 1);
        assert_eq!(c.connection_errors.get(ErrorKind::Timeout), 1);
        c.reset();
        assert_eq!(stat(&c, "hits"), 0);
        assert_eq!(stat(&c, "connection_errors"), 0);
    }

    #[test]
    fn a_peer_chosen_code_is_other() {
        let e = ConnectionError::PeerError {
            code: ErrorCode(0x7777),
            message: String::new(),
        };
        assert_eq!(ErrorKind::of(&e), ErrorKind::Other);
    }
}
