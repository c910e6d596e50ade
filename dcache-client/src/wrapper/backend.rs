//! Where the wrapper's jobs go: configured servers, this user's local daemon
//! ([`super::daemon`]: the embedded default run once for every process), or the embedded
//! default in this process (the server library over `mem://`, with the shared disk cache)
//! when there is no daemon to use. One per
//! `dcache` process, started before the first job and finished after the last, so a
//! direct-mode lookup and the compile that may follow share one server and connection.
//!
//! A program that embeds dcache (a build tool compiling many files) uses it the same way:
//! [`Backend::start`], then [`Backend::client`] for every job, then [`Backend::finish`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dcache_proto::{CacheKey, JobDesc, JobResult};
use dcache_server::exec::{Executor, LocalExecutor, LocalExecutorConfig, store_key};
use dcache_server::store::{Compression, DiskStore, StoreError};
use dcache_server::{Outcome, Service, ServiceConfig};
use dcache_transport::{Address, AddressError, TransportError, TransportOptions, bind};

use super::config::Config;
use crate::stats::local as stats_file;
use crate::{Client, ClientOptions};

/// How much longer than a host may, a job through the relay daemon may go without news:
/// the daemon gives up on a silent host after the configured time-out and answers (so
/// the wrapper compiles locally), and that answer must arrive before the wrapper's own
/// time-out says less.
const RELAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The client jobs go through, and for the embedded default the server behind it.
#[derive(Debug)]
pub struct Backend {
    client: Client,
    embedded: Option<Embedded>,
    daemon: Option<DaemonSide>,
}

/// The wrapper's side of a daemon back end: what this process did, for the cache's
/// statistics (the daemon serves every process of a build, so its own counters cannot
/// say which part was this one's, and the statistics must be current when the process
/// exits), and the name of the compiler its jobs run on.
#[derive(Debug)]
struct DaemonSide {
    /// [`Config::dir`], where results compiled here are stored beside the daemon.
    dir: std::path::PathBuf,
    /// [`Config::cache_size`], the limit that store keeps.
    cache_size: u64,
    delta: std::sync::Mutex<stats_file::Delta>,
}

#[derive(Debug)]
struct Embedded {
    service: Arc<Service>,
    /// The service's store and executor, for results compiled outside it (depend mode).
    store: Arc<DiskStore>,
    executor: Arc<LocalExecutor>,
    /// Compiles run by the wrapper itself and stored through [`Backend::store_local`].
    local_compiles: AtomicU64,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

/// Why the embedded server did not start. The wrapper then compiles locally, with one
/// warning line (or fails, with `DCACHE_FALLBACK=0`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The local cache directory cannot be opened (not writable, not a directory).
    #[error("local cache in {}: {source}", dir.display())]
    Cache {
        /// [`Config::dir`].
        dir: std::path::PathBuf,
        /// What the disk store reported.
        source: StoreError,
    },
    /// The in-process address was refused (it names this process's id, so never in
    /// practice; kept typed rather than unwrapped).
    #[error("{0}")]
    Address(AddressError),
    /// The in-process listener could not be bound.
    #[error("{0}")]
    Listen(TransportError),
    /// A result compiled here was not stored: configured servers keep only what they
    /// compiled themselves.
    #[error("results compiled here are kept only by the local cache")]
    NotLocal,
    /// The embedded server would not run this job, so it cannot serve its result either.
    #[error("the local cache refuses this job: {0}")]
    Refused(String),
    /// The local cache could not store the result.
    #[error("local cache: {0}")]
    Store(StoreError),
}

impl Backend {
    /// Connects lazily to the configured servers, or starts the embedded one for
    /// `compiler` as invoked (`gcc`, `/opt/gcc-13/bin/gcc`): the job names it by its file
    /// name, which the embedded server resolves first in the directory it was invoked
    /// from, then on this process's `PATH`, so it runs the very compiler a local compile
    /// would.
    pub async fn start(config: &Config, compiler: &std::ffi::OsStr) -> Result<Self, BackendError> {
        if !config.hosts.is_empty() {
            // The relay daemon holds warm connections to the hosts; without one, they are
            // reached directly, as before it existed.
            let direct = config.client_options();
            let client = match super::daemon::reach(config, compiler) {
                Some(addr) => Client::new(ClientOptions {
                    // The wrapper's way of using HASH, on this hop too.
                    strategy: direct.strategy,
                    // Its time-outs are the hosts', so it reports them before ours.
                    progress_timeout: direct.progress_timeout + RELAY_GRACE,
                    // A Unix socket: no token, no TLS, no compression, and no shared
                    // back-off record (a daemon that failed one job is not skipped by
                    // the next process, which starts a new one if need be).
                    ..ClientOptions::new(vec![addr])
                }),
                None => Client::new(direct),
            };
            return Ok(Self {
                client,
                embedded: None,
                daemon: None,
            });
        }
        if let Some(addr) = super::daemon::reach(config, compiler) {
            return Ok(Self {
                client: Client::new(ClientOptions::new(vec![addr])),
                embedded: None,
                daemon: Some(DaemonSide {
                    dir: config.dir.clone(),
                    cache_size: config.cache_size,
                    delta: std::sync::Mutex::default(),
                }),
            });
        }
        // Lazy: one compile per process, so no scan of the whole cache on every start.
        // The results' share of the limit, which covers all of DCACHE_DIR, counted in
        // compressed bytes: entries are written as a server writes them by default
        // (`--store-compression zstd`), and either kind is read.
        let limit = crate::cache_admin::Budget::for_limit(config.cache_size).results;
        let store =
            DiskStore::open_lazy_with(&config.dir.join("cache"), limit, Compression::default())
                .map_err(|source| BackendError::Cache {
                    dir: config.dir.clone(),
                    source,
                })?;
        // Compiling for the user on the user's machine: in the user's directory and
        // locale, so warnings quote source lines and use the quotes a local compile would.
        // Only the compiler this process runs, and its identity remembered across
        // processes: computing one costs a `--version` run and a hash of the binary.
        let invoked = std::path::Path::new(compiler);
        let name = invoked
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Found in the directory it was invoked from, but run with the user's PATH as it
        // is: a compiler script that calls `gcc` reaches what it would without dcache.
        let compiler_dir = invoked
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .and_then(|d| d.canonicalize().ok());
        let path = std::env::var("PATH").unwrap_or_else(|_| LocalExecutorConfig::default().path);
        let store = Arc::new(store);
        let executor = Arc::new(LocalExecutor::new(LocalExecutorConfig {
            allowed: vec![name],
            path,
            compiler_dir,
            identity_cache: Some(config.dir.join("compilers")),
            workdir: std::env::current_dir().ok(),
            locale: locale_env(),
            ..LocalExecutorConfig::default()
        }));
        let service = Service::new(store.clone(), executor.clone(), ServiceConfig::default());
        let addr: Address = format!("mem://dcache-embedded-{}", std::process::id())
            .parse()
            .map_err(BackendError::Address)?;
        let listener = bind(&addr, &TransportOptions::default())
            .await
            .map_err(BackendError::Listen)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await;
            })
        };
        Ok(Self {
            client: Client::new(ClientOptions::new(vec![addr])),
            embedded: Some(Embedded {
                service,
                store,
                executor,
                local_compiles: AtomicU64::new(0),
                stop,
                server,
            }),
            daemon: None,
        })
    }

    /// The client to send jobs with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether jobs go to configured servers rather than the local cache (the embedded
    /// server or the daemon).
    pub fn is_remote(&self) -> bool {
        self.embedded.is_none() && self.daemon.is_none()
    }

    /// Whether jobs go to the local daemon.
    pub fn is_daemon(&self) -> bool {
        self.daemon.is_some()
    }

    /// Whether a result's diagnostics are exactly what a local compile prints: only the
    /// embedded server in this process compiles in this directory (the daemon and remote
    /// servers compile in private directories, so gcc cannot quote source lines).
    pub fn exact_diagnostics(&self) -> bool {
        self.embedded.is_some()
    }

    /// Sends a compile with its key (`Client::compile_keyed`), counting it for the
    /// statistics when the daemon serves it.
    pub async fn compile_keyed(
        &self,
        desc: JobDesc,
        key: CacheKey,
        source: bytes::Bytes,
    ) -> Result<crate::Outcome, crate::ClientError> {
        let outcome = self.client.compile_keyed(desc, key, source).await?;
        self.count(|d| {
            let job = &outcome.job;
            if job.origin.is_cached() {
                d.hits += 1;
            } else {
                d.misses += 1;
                d.compiles += 1;
            }
            if job.origin.is_early() {
                d.early_results += 1;
            }
            d.source_bytes_received += job.source_bytes_sent;
            d.source_bytes_saved += job.source_bytes_skipped;
        });
        Ok(outcome)
    }

    /// Asks for a remembered key ([`Client::lookup`]), counting the answer for the
    /// statistics when the daemon serves it.
    pub async fn lookup(
        &self,
        desc: JobDesc,
        key: CacheKey,
    ) -> Result<Option<crate::Outcome>, crate::ClientError> {
        let found = self.client.lookup(desc, key).await?;
        self.count(|d| match &found {
            Some(o) => {
                d.hits += 1;
                if o.job.origin.is_early() {
                    d.early_results += 1;
                }
            }
            None => d.misses += 1,
        });
        Ok(found)
    }

    fn count(&self, f: impl FnOnce(&mut stats_file::Delta)) {
        if let Some(d) = &self.daemon {
            f(&mut d
                .delta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner));
        }
    }

    /// Stores `result`, compiled by the wrapper itself from the original source (depend
    /// mode), in the local cache under `key`, where a lookup of `desc` with that key
    /// finds it: bound, like every entry, to the identity of the compiler `desc` names.
    /// Counted as a miss and a compile.
    pub async fn store_local(
        &self,
        desc: &JobDesc,
        key: CacheKey,
        result: &JobResult,
    ) -> Result<(), BackendError> {
        if let Some(d) = &self.daemon {
            self.count(|c| {
                c.misses += 1;
                c.compiles += 1;
            });
            return store_beside_daemon(&d.dir, d.cache_size, desc, key, result).await;
        }
        let e = self.embedded.as_ref().ok_or(BackendError::NotLocal)?;
        e.local_compiles.fetch_add(1, Ordering::Relaxed);
        let id = e
            .executor
            .check(desc)
            .map_err(|err| BackendError::Refused(err.to_string()))?;
        dcache_server::store::Store::put(&*e.store, &store_key(&id, &key), result)
            .await
            .map_err(BackendError::Store)
    }

    /// Counts a compile the wrapper ran itself whose result was not stored.
    pub fn count_local_compile(&self) {
        if let Some(e) = &self.embedded {
            e.local_compiles.fetch_add(1, Ordering::Relaxed);
        }
        self.count(|c| {
            c.misses += 1;
            c.compiles += 1;
        });
    }

    /// Ends the embedded server: waits for its results to be stored, and adds what it
    /// did to the cache's statistics.
    pub async fn finish(self, config: &Config) {
        if let Some(d) = self.daemon {
            drop(self.client);
            let delta = d
                .delta
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if delta != stats_file::Delta::default() {
                stats_file::record(&config.dir, &delta);
            }
            return;
        }
        let Some(e) = self.embedded else {
            return;
        };
        drop(self.client);
        let _ = e.stop.send(());
        let _ = e.server.await;
        let c = e.service.counters();
        let local = e.local_compiles.load(Ordering::Relaxed);
        stats_file::record(
            &config.dir,
            &stats_file::Delta {
                hits: c.jobs.total(Outcome::Hit),
                misses: c.jobs.total(Outcome::Miss) + local,
                early_results: c.jobs.total(Outcome::Early),
                compiles: c.compiles.load(Ordering::Relaxed) + local,
                source_bytes_received: c.source_bytes_received.load(Ordering::Relaxed),
                source_bytes_saved: c.source_bytes_saved.load(Ordering::Relaxed),
            },
        );
    }
}

/// Stores a result the wrapper compiled itself (depend mode) in the disk store the daemon
/// reads, from this process: the disk store is safe to share between processes, the
/// result is already here, and the protocol has no "store this" request (a server
/// stores only what it compiled and verified itself). The key binds the compiler as the
/// daemon binds it (same name, `PATH` and locale: [`super::daemon::executor::config_for`]),
/// so the daemon's next lookup finds it (its memory tier misses, its disk tier hits).
async fn store_beside_daemon(
    dir: &std::path::Path,
    cache_size: u64,
    desc: &JobDesc,
    key: CacheKey,
    result: &JobResult,
) -> Result<(), BackendError> {
    let path = std::env::var("PATH").unwrap_or_else(|_| LocalExecutorConfig::default().path);
    let executor = LocalExecutor::new(super::daemon::executor::config_for(
        &desc.compiler,
        dir,
        path,
    ));
    let id = executor
        .check(desc)
        .map_err(|err| BackendError::Refused(err.to_string()))?;
    let limit = crate::cache_admin::Budget::for_limit(cache_size).results;
    let store =
        DiskStore::open_lazy(&dir.join("cache"), limit).map_err(|source| BackendError::Cache {
            dir: dir.to_owned(),
            source,
        })?;
    dcache_server::store::Store::put(&store, &store_key(&id, &key), result)
        .await
        .map_err(BackendError::Store)
}

/// The locale variables that shape a compiler's diagnostics, as set here.
pub(super) fn locale_env() -> Vec<(String, String)> {
    ["LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"]
        .into_iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_owned(), v))
        })
        .collect()
}
