//! Server-wide counters, exposed to clients through STATS.

use std::sync::atomic::{AtomicU64, Ordering};

use dcache_proto::Stat;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Counters of one server, shared by all its connections.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter as a (name, value) list, in a fixed order.
            pub fn snapshot(&self) -> Vec<Stat> {
                vec![$(Stat { name: stringify!($name).into(), value: self.$name.load(Ordering::Relaxed) },)*]
            }

            /// Sets every counter to zero.
            pub fn reset(&self) {
                $(self.$name.store(0, Ordering::Relaxed);)*
            }
        }
    };
}

counters! {
    /// Results served from the cache (early, or after a HASH-less upload).
    hits,
    /// Lookups that found nothing.
    misses,
    /// EARLY_RESULT answers sent while the client was still uploading.
    early_results,
    /// Compiler runs.
    compiles,
    /// Compiler runs that exited non-zero.
    compile_failures,
    /// Jobs that waited for an identical compile in flight instead of compiling.
    single_flight_waits,
    /// Jobs ended because their upload stalled while they held a compile slot.
    slow_uploads_ended,
    /// Source bytes received.
    source_bytes_received,
    /// Declared source bytes clients never had to send because the result came first.
    source_bytes_saved,
    /// Jobs refused (compiler or option not allowed).
    jobs_refused,
    /// Jobs whose HASH did not match their source.
    hash_mismatches,
    /// Results that could not be stored (the compile result was still returned).
    store_errors,
    /// Connections accepted.
    connections,
    /// Connections refused at once: address not allowed, per-address cap reached, or the
    /// handshake pool full.
    connections_refused,
    /// Connections ended by a protocol error, a timeout, or the peer going away mid-job.
    connection_errors,
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
