//! The relay back end: a dcache server whose back end is other dcache servers.
//!
//! A relay terminates its clients' connections and passes each job on to an upstream
//! dcache server over one persistent, authenticated, multiplexed connection per upstream,
//! chosen by the rendezvous rule a direct client uses ([`dcache_proto::rendezvous`]), so a
//! source meets the same upstream cache whichever way it comes. In front of the upstreams
//! it keeps a cache tier of its own (the service's store, memory over disk): a result
//! fetched once is served from here the next time.
//!
//! Per job (`connection.rs`, `forward.rs`): the client's HASH is looked up in the local tier
//! and, on a miss, goes up at once with the job description unchanged (the compiler
//! identity included, so the upstream checks the client's compiler); source chunks follow
//! as they arrive; an upstream MISS, EARLY_RESULT, RESULT or ABORT is passed down at once,
//! and a client's ABORT goes up. An upstream that is down, overloaded or lacks the compiler
//! passes the job to the next in rendezvous order (the source received so far is replayed;
//! it is held for that within the service's memory budget). When none is left the client
//! gets `OVERLOADED` (or `COMPILER_MISMATCH`), on which a dcache client compiles locally.
//!
//! Trust: the local tier's key binds the job's compiler identity (see
//! [`identity_compiler`]), so one compiler's object is never served for another. A result
//! the upstream answered from its cache is stored under the key the relay asked it for:
//! the upstream stores only under keys it verified, so a client lying in its HASH can at
//! most fetch the upstream's genuine entry for that key, never plant one. A result the
//! upstream compiled is stored only when the relay's own hash of the source it received
//! equals the HASH, as in any dcache server.

mod connection;
mod forward;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::rendezvous::HostHealth;
use dcache_proto::{AuthKey, CacheKey, ClientConfig, CompilerIdentity, JobDesc, Strategy};
use dcache_transport::{
    Address, ClientHandle, TransportError, TransportOptions, connect, spawn_client,
};
use tokio::sync::mpsc;

use crate::exec::{CompileFuture, CompilerId, ExecError, Executor};
use crate::lock;

pub(crate) use connection::run;

/// Settings of a relay's upstreams.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The upstream dcache servers, in any order (rendezvous hashing orders them per job).
    pub upstreams: Vec<Address>,
    /// Transport settings for reaching them (TLS client configuration for `tls://`).
    pub transport: TransportOptions,
    /// The upstreams' shared token, for servers started with `--token-file`; the relay
    /// then insists the upstream proves it holds the token too.
    pub auth: Option<AuthKey>,
    /// How long connecting to an upstream may take, handshake included, before it counts
    /// as down.
    pub connect_timeout: Duration,
    /// How long an upstream that failed is skipped before it is tried again. Shorter than a
    /// client's 60 s: a relay is one long-lived process, and a restarted upstream should be
    /// used again soon.
    pub backoff: Duration,
    /// How long a job may hear nothing from its upstream before it is given up (and
    /// passed to the next upstream when its source can be replayed).
    pub progress_timeout: Duration,
    /// The zstd level each upstream's connection offers (see
    /// [`ClientConfig::compression`]), by its index in [`upstreams`](Self::upstreams); an
    /// upstream with no entry, or `None`, gets no compression. Per upstream because it
    /// pays only across a network: a relay in front of a loopback server and a remote
    /// farm compresses for the farm alone.
    pub compression: Vec<Option<i32>>,
}

impl RelayConfig {
    /// Settings for `upstreams` with the defaults: 2 s connect timeout, 10 s back-off, the
    /// protocol's default progress timeout.
    pub fn new(upstreams: Vec<Address>) -> Self {
        Self {
            upstreams,
            transport: TransportOptions::default(),
            auth: None,
            connect_timeout: Duration::from_secs(2),
            backoff: Duration::from_secs(10),
            progress_timeout: ClientConfig::default().progress_timeout,
            compression: Vec::new(),
        }
    }
}

/// The upstream servers of a relay: one persistent connection each, opened on first use
/// and again after it closed (an upstream restart), and their health.
#[derive(Debug)]
pub struct Upstreams {
    config: RelayConfig,
    names: Vec<String>,
    connections: tokio::sync::Mutex<Vec<Option<ClientHandle>>>,
    health: Mutex<HostHealth>,
}

impl Upstreams {
    /// The upstreams `config` names. Nothing is connected until a job needs it.
    pub fn new(config: RelayConfig) -> Arc<Self> {
        let n = config.upstreams.len();
        Arc::new(Self {
            names: config.upstreams.iter().map(ToString::to_string).collect(),
            connections: tokio::sync::Mutex::new(vec![None; n]),
            health: Mutex::new(HostHealth::new(n, config.backoff)),
            config,
        })
    }

    /// The upstreams' addresses.
    pub fn addresses(&self) -> &[Address] {
        &self.config.upstreams
    }

    /// The upstreams to try for `key`, best first: rendezvous order, less those backing
    /// off. Each is tried at most once per job, so a job's fall-through ends.
    pub(crate) fn candidates(&self, key: &CacheKey) -> Vec<usize> {
        lock(&self.health).candidates(key, &self.names, Instant::now())
    }

    /// The address of upstream `i`, for messages.
    pub(crate) fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or("?", String::as_str)
    }

    pub(crate) fn mark_down(&self, i: usize, why: &str) {
        tracing::warn!("upstream {} failed: {why}", self.name(i));
        lock(&self.health).mark_down(i, Instant::now(), why);
    }

    pub(crate) fn mark_up(&self, i: usize) {
        lock(&self.health).mark_up(i);
    }

    /// Upstream `i`'s connection, opened (or reopened, when the last one closed) now if
    /// need be. The lock is held while connecting, so jobs racing for a cold upstream open
    /// one connection between them, not one each.
    pub(crate) async fn connection(&self, i: usize) -> Result<ClientHandle, String> {
        let mut conns = self.connections.lock().await;
        let slot = conns.get_mut(i).ok_or("no such upstream")?;
        if let Some(h) = slot.as_ref().filter(|h| !h.is_closed()) {
            return Ok(h.clone());
        }
        let addr = &self.config.upstreams[i];
        let timeout = self.config.connect_timeout;
        let stream = tokio::time::timeout(timeout, connect(addr, &self.config.transport))
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| connect_failure(&e))?;
        let handle = spawn_client(
            stream,
            ClientConfig {
                strategy: Strategy::Speculative,
                handshake_timeout: timeout,
                auth: self.config.auth.clone(),
                progress_timeout: self.config.progress_timeout,
                compression: self.config.compression.get(i).copied().flatten(),
                ..ClientConfig::default()
            },
        );
        *slot = Some(handle.clone());
        Ok(handle)
    }

    /// Forgets upstream `i`'s connection after it failed under a job, so the next job
    /// opens a new one.
    pub(crate) async fn drop_connection(&self, i: usize) {
        if let Some(slot) = self.connections.lock().await.get_mut(i) {
            *slot = None;
        }
    }

    /// Upstream connections open now.
    pub(crate) fn open_connections(&self) -> u64 {
        self.connections
            .try_lock()
            .map(|c| c.iter().flatten().filter(|h| !h.is_closed()).count() as u64)
            .unwrap_or(0)
    }
}

/// Why connecting failed, without the address (the messages name it once, beside the
/// reason; the transport's own messages start with it).
fn connect_failure(e: &TransportError) -> String {
    match e {
        TransportError::Refused { .. } => "connection refused".into(),
        TransportError::Unresolved { .. } => "host name did not resolve".into(),
        TransportError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// blake3 context deriving a relay's compiler id from a job's compiler identity.
const IDENTITY_CONTEXT: &str = "dcache 2026-12 relay compiler identity v1";

/// The compiler id a relay binds its local tier's keys to: a digest of the job's compiler
/// identity (version line, target, digest of its programs), each field length-prefixed.
/// Two jobs share an entry only when they name the same compiler, whatever it is called.
pub fn identity_compiler(identity: &CompilerIdentity) -> CompilerId {
    let mut h = blake3::Hasher::new_derive_key(IDENTITY_CONTEXT);
    for field in [identity.version.as_bytes(), identity.target.as_bytes()] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field);
    }
    h.update(&identity.digest);
    CompilerId(*h.finalize().as_bytes())
}

/// The executor of a relay's service: it runs nothing (compiles happen upstream). It
/// checks only that a job names its compiler identity, which the relay's keys bind; the
/// distcc front end, whose clients cannot name one, is refused through it.
#[derive(Debug, Default)]
pub(crate) struct NoCompiler;

impl Executor for NoCompiler {
    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError> {
        desc.identity
            .as_ref()
            .map(identity_compiler)
            .ok_or(ExecError::NoIdentity)
    }

    fn compile(&self, desc: JobDesc, _source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture {
        Box::pin(async move { Err(ExecError::CompilerNotAllowed(desc.compiler)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differing_in_any_field_give_different_ids() {
        let a = CompilerIdentity::new("gcc 12.2.0", "x86_64-linux-gnu", [1; 32]);
        let ids = [
            identity_compiler(&a),
            identity_compiler(&CompilerIdentity::new(
                "gcc 12.3.0",
                "x86_64-linux-gnu",
                [1; 32],
            )),
            identity_compiler(&CompilerIdentity::new(
                "gcc 12.2.0",
                "aarch64-linux-gnu",
                [1; 32],
            )),
            identity_compiler(&CompilerIdentity::new(
                "gcc 12.2.0",
                "x86_64-linux-gnu",
                [2; 32],
            )),
            // Field boundaries are part of the digest.
            identity_compiler(&CompilerIdentity::new(
                "gcc 12.2.0x",
                "86_64-linux-gnu",
                [1; 32],
            )),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "{i} and {j}");
            }
        }
        assert_eq!(ids[0], identity_compiler(&a.clone()));
    }

    #[test]
    fn no_compiler_refuses_jobs_without_identity() {
        let desc = JobDesc {
            compiler: "gcc".into(),
            language: "cpp-output".into(),
            args: vec!["-c".into()],
            source_len: None,
            identity: None,
        };
        assert!(matches!(
            NoCompiler.check(&desc),
            Err(ExecError::NoIdentity)
        ));
    }
}
