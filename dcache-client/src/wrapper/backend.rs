//! Where the wrapper's jobs go: configured servers, or the embedded default (the server
//! library run in this process over `mem://`, with the shared disk cache). One per
//! `dcache` process, started before the first job and finished after the last, so a
//! direct-mode lookup and the compile that may follow share one server and connection.
//!
//! A program that embeds dcache (a build tool compiling many files) uses it the same way:
//! [`Backend::start`], then [`Backend::client`] for every job, then [`Backend::finish`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dcache_proto::{CacheKey, JobDesc, JobResult};
use dcache_server::exec::{Executor, LocalExecutor, LocalExecutorConfig, store_key};
use dcache_server::store::{DiskStore, StoreError};
use dcache_server::{Outcome, Service, ServiceConfig};
use dcache_transport::{Address, AddressError, TransportError, TransportOptions, bind};

use super::config::Config;
use crate::stats::local as stats_file;
use crate::{Client, ClientOptions};

/// The client jobs go through, and for the embedded default the server behind it.
#[derive(Debug)]
pub struct Backend {
    client: Client,
    embedded: Option<Embedded>,
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
            return Ok(Self {
                client: Client::new(config.client_options()),
                embedded: None,
            });
        }
        // Lazy: one compile per process, so no scan of the whole cache on every start.
        // The results' share of the limit, which covers all of DCACHE_DIR.
        let limit = crate::cache_admin::Budget::for_limit(config.cache_size).results;
        let store = DiskStore::open_lazy(&config.dir.join("cache"), limit).map_err(|source| {
            BackendError::Cache {
                dir: config.dir.clone(),
                source,
            }
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
        let mut dirs: Vec<std::path::PathBuf> = invoked
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .and_then(|d| d.canonicalize().ok())
            .into_iter()
            .collect();
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(dirs)
            .ok()
            .and_then(|p| p.into_string().ok())
            .unwrap_or_else(|| LocalExecutorConfig::default().path);
        let store = Arc::new(store);
        let executor = Arc::new(LocalExecutor::new(LocalExecutorConfig {
            allowed: vec![name],
            path,
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
        })
    }

    /// The client to send jobs with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether jobs go to configured servers rather than the embedded one.
    pub fn is_remote(&self) -> bool {
        self.embedded.is_none()
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
    }

    /// Ends the embedded server: waits for its results to be stored, and adds what it
    /// did to the cache's statistics.
    pub async fn finish(self, config: &Config) {
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

/// The locale variables that shape a compiler's diagnostics, as set here.
fn locale_env() -> Vec<(String, String)> {
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
