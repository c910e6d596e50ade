//! The client library: compile jobs on a set of servers.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dcache_proto::{
    AuthKey, CacheKey, ClientConfig, ErrorCode, JobDesc, JobOutcome, Stat, Strategy,
};
use dcache_transport::{
    Address, ClientHandle, JobError, TransportError, TransportOptions, connect, spawn_client,
};

use crate::compression::CompressPolicy;
use crate::hosts::shared::BackoffDir;
use crate::hosts::{DEFAULT_BACKOFF, HostHealth};

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The servers, in any order: each job goes to the one rendezvous hashing picks for
    /// its key, so the same source always meets the same cache.
    pub hosts: Vec<Address>,
    /// How jobs use HASH. Handed to each connection, which applies it to every job: the
    /// one place it is decided (a [`Client`] always gives the connection the key).
    pub strategy: Strategy,
    /// Transport settings.
    pub transport: TransportOptions,
    /// How long connecting may take, the handshake included, before the host counts as
    /// down. Well below the protocol's own 10 s handshake limit: a server that accepts and
    /// then hangs must not cost every compile that long.
    pub connect_timeout: Duration,
    /// How long a failed host is skipped.
    pub backoff: Duration,
    /// A directory where failing hosts are recorded for every process that names the same
    /// one (see [`crate::hosts::shared`]); `None` keeps host health in this client only.
    pub health_dir: Option<PathBuf>,
    /// The shared token's key, for servers started with `--token-file`: the client proves
    /// it holds the token and insists the server proves it too (see [`AuthKey`]). With a
    /// key set, a server that does not authenticate is treated as failing.
    pub auth: Option<AuthKey>,
    /// How long a job may hear nothing from its server before it is given up (and, in
    /// the wrapper, compiled locally): a stuck server never hangs a build.
    pub progress_timeout: Duration,
    /// Whether each connection offers zstd compression (decided per host by its link:
    /// see [`crate::compression`]). Default `auto`: across a network yes, on this
    /// machine no.
    pub compress: CompressPolicy,
}

impl ClientOptions {
    /// Options for `hosts` with the defaults: speculative, 2 s connect timeout, 60 s
    /// back-off.
    pub fn new(hosts: Vec<Address>) -> Self {
        Self {
            hosts,
            strategy: Strategy::Speculative,
            transport: TransportOptions::default(),
            connect_timeout: Duration::from_secs(2),
            backoff: DEFAULT_BACKOFF,
            health_dir: None,
            auth: None,
            progress_timeout: ClientConfig::default().progress_timeout,
            compress: CompressPolicy::default(),
        }
    }
}

/// What a compile produced, and where and how.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The result and its costs (hit or miss, early or not, bytes sent and skipped).
    pub job: JobOutcome,
    /// The server that answered.
    pub host: Address,
    /// Time from submitting to holding the result.
    pub elapsed: Duration,
}

/// Why a job produced no result. Every variant means "compile it locally" to a wrapper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No servers are configured.
    #[error("no servers configured")]
    NoHosts,
    /// Every server is down or was skipped after a recent failure.
    #[error("no server reachable: {}", describe(.0))]
    Unreachable(Vec<(Address, String)>),
    /// A server refused the job (compiler or option not allowed there, or no compiler
    /// there has the job's identity and no other server had one either); another server
    /// with the same configuration would refuse it too.
    #[error("{host} refused the job: {message}")]
    Refused {
        /// The server.
        host: Address,
        /// Its explanation.
        message: String,
    },
    /// A server ended the job for a reason another server would not cure (a hash or length
    /// mismatch: the client's own input is inconsistent).
    #[error("{host} failed the job ({code}): {message}")]
    Failed {
        /// The server.
        host: Address,
        /// The code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
}

/// Why no server gave a result: a server that lacked the client's compiler (its message
/// names both compilers, and compiling locally is the answer), else every failure.
fn no_server(mismatch: Option<(Address, String)>, failures: Vec<(Address, String)>) -> ClientError {
    match mismatch {
        Some((host, message)) => ClientError::Refused { host, message },
        None => ClientError::Unreachable(failures),
    }
}

fn describe(failures: &[(Address, String)]) -> String {
    if failures.is_empty() {
        return "every server failed recently and is being skipped".into();
    }
    failures
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compiles jobs on a set of servers, one multiplexed connection per server.
#[derive(Debug)]
pub struct Client {
    options: ClientOptions,
    names: Vec<String>,
    connections: Mutex<Vec<Option<ClientHandle>>>,
    health: Mutex<HostHealth>,
    shared: Option<BackoffDir>,
}

impl Client {
    /// A client for `options.hosts`. Connections open on first use.
    pub fn new(options: ClientOptions) -> Self {
        let n = options.hosts.len();
        Self {
            names: options.hosts.iter().map(ToString::to_string).collect(),
            connections: Mutex::new(vec![None; n]),
            health: Mutex::new(HostHealth::new(n, options.backoff)),
            shared: options.health_dir.clone().map(BackoffDir::new),
            options,
        }
    }

    /// Compiles one job whose whole source is at hand.
    pub async fn compile(&self, desc: JobDesc, source: Bytes) -> Result<Outcome, ClientError> {
        let key = CacheKey::compute(&desc, &source);
        self.compile_keyed(desc, key, source).await
    }

    /// Like [`compile`](Self::compile), for the wrapper, which needs the job's key itself
    /// (it records it for direct mode): the source is hashed once, not once there and
    /// once here. `key` must be `CacheKey::compute(&desc, &source)`: it picks the server
    /// and goes out as the job's HASH, and a server answers a HASH it has from its cache
    /// before it has the source to check it against, so a wrong key could bring back
    /// another source's result. That is why this is not public.
    pub(crate) async fn compile_keyed(
        &self,
        desc: JobDesc,
        key: CacheKey,
        source: Bytes,
    ) -> Result<Outcome, ClientError> {
        let mut failures = Vec::new();
        let mut mismatch = None;
        // Each host is tried at most once per job: the list is finite, so this loop ends.
        for i in self.candidates(&key, &mut failures)? {
            let host = self.options.hosts[i].clone();
            let Some(handle) = self.connect_to(i, &mut failures).await else {
                continue;
            };
            let start = Instant::now();
            // The key always goes along: the connection, configured with
            // `options.strategy`, is the one place that decides whether it becomes a HASH
            // (send-all drops it).
            match handle.submit(desc.clone(), Some(key), source.clone()).await {
                Ok(job) => {
                    self.mark_up(i);
                    return Ok(Outcome {
                        job,
                        host,
                        elapsed: start.elapsed(),
                    });
                }
                Err(JobError::Failed { code, message }) => match code {
                    ErrorCode::REFUSED => return Err(ClientError::Refused { host, message }),
                    // This server lacks the client's compiler; another may have it.
                    ErrorCode::COMPILER_MISMATCH => mismatch = Some((host, message)),
                    ErrorCode::HASH_MISMATCH | ErrorCode::LENGTH_MISMATCH => {
                        return Err(ClientError::Failed {
                            host,
                            code,
                            message,
                        });
                    }
                    // Overloaded, shutting down, too large, compiler trouble: another
                    // server may do better.
                    _ => failures.push((host, format!("{code}: {message}"))),
                },
                Err(e) => self.connection_failed(i, &e, &mut failures),
            }
        }
        Err(no_server(mismatch, failures))
    }

    /// Asks the server that owns `key` (by rendezvous hashing, like [`compile`]) for a
    /// result without sending any source: for a key remembered from an earlier compile
    /// (the wrapper's direct mode). `Ok(None)` is a miss; the caller then compiles as
    /// usual. Costs one round trip.
    ///
    /// [`compile`]: Self::compile
    pub async fn lookup(
        &self,
        desc: JobDesc,
        key: CacheKey,
    ) -> Result<Option<Outcome>, ClientError> {
        let mut failures = Vec::new();
        let mut mismatch = None;
        // Each host is tried at most once per job: the list is finite, so this loop ends.
        for i in self.candidates(&key, &mut failures)? {
            let host = self.options.hosts[i].clone();
            let Some(handle) = self.connect_to(i, &mut failures).await else {
                continue;
            };
            let start = Instant::now();
            match handle.lookup(desc.clone(), key).await {
                Ok(found) => {
                    self.mark_up(i);
                    return Ok(found.map(|job| Outcome {
                        job,
                        host,
                        elapsed: start.elapsed(),
                    }));
                }
                Err(JobError::Failed { code, message }) if code == ErrorCode::REFUSED => {
                    return Err(ClientError::Refused { host, message });
                }
                Err(JobError::Failed { code, message }) if code == ErrorCode::COMPILER_MISMATCH => {
                    mismatch = Some((host, message));
                }
                // The job, not the connection, failed (overloaded, shutting down, not
                // encodable): a miss, and the compile that follows tries as usual.
                Err(JobError::Failed { .. } | JobError::Rejected(_)) => return Ok(None),
                Err(e) => self.connection_failed(i, &e, &mut failures),
            }
        }
        Err(no_server(mismatch, failures))
    }

    /// Compiles one job whose source arrives as a stream of chunks (the sender's end of
    /// `source`; dropping it ends the source). Each chunk goes out as soon as the
    /// connection has room, so the server's compiler is fed while the source is still
    /// being produced.
    ///
    /// A stream's key is known only at its end, so the host is chosen by rendezvous
    /// hashing of the job description alone, the job is sent without HASH (the server
    /// still answers from its cache, by the key it computes, once the source is whole),
    /// and only connecting falls through to other hosts: once chunks have been sent they
    /// cannot be replayed, so a failure after that is returned for the caller to compile
    /// locally.
    pub async fn compile_stream(
        &self,
        desc: JobDesc,
        source: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<Outcome, ClientError> {
        let key = CacheKey::compute(&desc, b"");
        let mut failures = Vec::new();
        // Each host is tried at most once per job: the list is finite, so this loop ends.
        for i in self.candidates(&key, &mut failures)? {
            let host = self.options.hosts[i].clone();
            let Some(handle) = self.connect_to(i, &mut failures).await else {
                continue;
            };
            let start = Instant::now();
            return match handle.submit_stream(desc, source).await {
                Ok(job) => {
                    self.mark_up(i);
                    Ok(Outcome {
                        job,
                        host,
                        elapsed: start.elapsed(),
                    })
                }
                // The source is consumed: no other server can be tried.
                Err(JobError::Failed { code, message })
                    if code == ErrorCode::REFUSED || code == ErrorCode::COMPILER_MISMATCH =>
                {
                    Err(ClientError::Refused { host, message })
                }
                Err(JobError::Failed { code, message }) => Err(ClientError::Failed {
                    host,
                    code,
                    message,
                }),
                Err(e) => {
                    let mut failures = Vec::new();
                    self.connection_failed(i, &e, &mut failures);
                    Err(ClientError::Unreachable(failures))
                }
            };
        }
        Err(ClientError::Unreachable(failures))
    }

    /// The counters of every server (or why they could not be read).
    pub async fn stats(&self) -> Vec<(Address, Result<Vec<Stat>, String>)> {
        let mut out = Vec::new();
        for i in 0..self.options.hosts.len() {
            let host = self.options.hosts[i].clone();
            let r = match self.connection(i).await {
                Ok(h) => h.stats().await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            out.push((host, r));
        }
        out
    }

    /// The hosts to try for `key`, in rendezvous order, less those backing off (here or,
    /// recorded on disk, in another process); each host skipped joins `failures` with the
    /// failure that started its back-off, so the message names the real cause.
    fn candidates(
        &self,
        key: &CacheKey,
        failures: &mut Vec<(Address, String)>,
    ) -> Result<Vec<usize>, ClientError> {
        if self.options.hosts.is_empty() {
            return Err(ClientError::NoHosts);
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let health = lock(&self.health);
        let mut up = Vec::new();
        for i in crate::hosts::rank(key, &self.names) {
            let recorded = self
                .shared
                .as_ref()
                .and_then(|d| d.get(&self.names[i], wall));
            match (health.skipped(i, now), recorded) {
                (Some(why), _) => failures.push((self.options.hosts[i].clone(), why.to_owned())),
                (None, Some(b)) => {
                    let left = b.until.duration_since(wall).unwrap_or_default().as_secs() + 1;
                    failures.push((
                        self.options.hosts[i].clone(),
                        format!("{} (skipped for {left} s more)", b.reason),
                    ));
                }
                (None, None) => up.push(i),
            }
        }
        Ok(up)
    }

    /// Host `i` failed because of `why`: this client and every process sharing the
    /// health directory skip it for the back-off period.
    fn mark_down(&self, i: usize, why: &str) {
        lock(&self.health).mark_down(i, Instant::now(), why);
        if let Some(d) = &self.shared {
            d.mark_down(
                &self.names[i],
                SystemTime::now() + self.options.backoff,
                why,
            );
        }
    }

    /// Host `i` answered: no longer skipped, here or elsewhere.
    fn mark_up(&self, i: usize) {
        let mut health = lock(&self.health);
        health.mark_up(i);
        drop(health);
        if let Some(d) = &self.shared {
            d.mark_up(&self.names[i]);
        }
    }

    /// The connection to host `i`; if it cannot be had, the host backs off and the
    /// reason joins `failures`.
    async fn connect_to(
        &self,
        i: usize,
        failures: &mut Vec<(Address, String)>,
    ) -> Option<ClientHandle> {
        match self.connection(i).await {
            Ok(h) => Some(h),
            Err(e) => {
                self.mark_down(i, &e);
                failures.push((self.options.hosts[i].clone(), e));
                None
            }
        }
    }

    /// Host `i`'s connection failed under a job: the host backs off, the connection is
    /// dropped (the next job opens a new one), and the reason joins `failures`.
    fn connection_failed(&self, i: usize, e: &JobError, failures: &mut Vec<(Address, String)>) {
        let why = e.to_string();
        self.mark_down(i, &why);
        lock(&self.connections)[i] = None;
        failures.push((self.options.hosts[i].clone(), why));
    }

    async fn connection(&self, i: usize) -> Result<ClientHandle, String> {
        if let Some(h) = lock(&self.connections)[i]
            .as_ref()
            .filter(|h| !h.is_closed())
        {
            return Ok(h.clone());
        }
        let addr = &self.options.hosts[i];
        let stream = tokio::time::timeout(
            self.options.connect_timeout,
            connect(addr, &self.options.transport),
        )
        .await
        .map_err(|_| format!("connect timed out after {:?}", self.options.connect_timeout))?
        .map_err(|e| connect_failure(&e))?;
        let handle = spawn_client(
            stream,
            ClientConfig {
                strategy: self.options.strategy,
                handshake_timeout: self.options.connect_timeout,
                auth: self.options.auth.clone(),
                progress_timeout: self.options.progress_timeout,
                compression: self.options.compress.level_for(addr),
                ..ClientConfig::default()
            },
        );
        lock(&self.connections)[i] = Some(handle.clone());
        Ok(handle)
    }
}

/// Why connecting failed, without the address: the messages this client gives list the
/// address once, beside the reason (the transport's own messages start with it).
fn connect_failure(e: &TransportError) -> String {
    match e {
        TransportError::Refused { .. } => "connection refused".into(),
        TransportError::Unresolved { .. } => "host name did not resolve".into(),
        TransportError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single assignments or lookups; a poisoned lock is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
