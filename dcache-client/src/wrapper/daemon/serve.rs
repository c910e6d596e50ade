//! The daemon's life: `dcache --daemon`, started detached by the first wrapper that
//! finds none ([`super::connect`]). It takes its lock (losing the race to another daemon
//! of the same configuration is a quiet exit), opens and indexes the store once, becomes
//! the local cache (no hosts) or the relay to the configured hosts ([`service_for`]), binds
//! its socket owner-only, replaces the daemons of other configurations of this
//! `DCACHE_DIR`, serves, and exits when idle, when its socket file is removed
//! (`dcache --stop-daemon`, a newer daemon, or the directory deleted) or on SIGTERM,
//! after the jobs in flight.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcache_server::relay::{RelayConfig, Upstreams};
use dcache_server::store::{DiskStore, MemoryStore, TieredStore};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, BoxedStream, Listener, Peer, TransportOptions, bind};

use super::executor::ByName;
use super::{Layout, Settings, try_lock};
use crate::wrapper::config::Config;

/// The memory tier in front of the disk store: the results a build reuses most.
const MEMORY_TIER: u64 = 128 << 20;

/// How often the daemon checks its socket file and its idle time.
const TICK: Duration = Duration::from_millis(100);

/// Why the daemon did not serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// `DCACHE_DIR/daemon` cannot be made private, or is not.
    #[error("daemon directory: {0}")]
    Dir(std::io::Error),
    /// The store cannot be opened.
    #[error("local cache: {0}")]
    Store(dcache_server::store::StoreError),
    /// The socket cannot be bound.
    #[error("socket: {0}")]
    Bind(String),
    /// No runtime.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Builds the daemon's service from the configuration, over memory in front of the disk
/// store of `DCACHE_DIR/cache` (opened with its index once for the daemon's whole life):
/// - no hosts: the local cache, running the compilers found by name on this process's
///   `PATH`;
/// - hosts: the relay to them ([`dcache_server::relay`]), over one persistent,
///   authenticated connection per host, with the wrapper's token, TLS settings,
///   compression rule and time-outs, so a compile through it pays no handshake, and a
///   result fetched once is served from this machine the next time. Its entries are
///   bound to the compiler identity each job names, a key space of their own beside the
///   local cache's.
pub fn service_for(config: &Config) -> Result<Arc<Service>, ServeError> {
    let limit = crate::cache_admin::Budget::for_limit(config.cache_size).results;
    let disk = DiskStore::open(&config.dir.join("cache"), limit).map_err(ServeError::Store)?;
    let memory = MemoryStore::new(MEMORY_TIER.min(limit));
    let store = Arc::new(TieredStore::new(memory, disk));
    let service_config = ServiceConfig {
        // Every connection comes from this user's processes through one socket.
        max_connections_per_address: ServiceConfig::default().max_connections,
        ..ServiceConfig::default()
    };
    if config.hosts.is_empty() {
        let path = std::env::var("PATH")
            .unwrap_or_else(|_| dcache_server::exec::LocalExecutorConfig::default().path);
        let executor = Arc::new(ByName::new(&config.dir, path));
        return Ok(Service::new(store, executor, service_config));
    }
    Ok(Service::relay(
        store,
        Upstreams::new(relay_config(config)),
        service_config,
    ))
}

/// The relay's settings from the wrapper's: what a direct connection would use.
fn relay_config(config: &Config) -> RelayConfig {
    let client = config.client_options();
    let mut relay = RelayConfig::new(client.hosts.clone());
    relay.compression = client
        .hosts
        .iter()
        .map(|h| client.compress.level_for(h))
        .collect();
    relay.transport = client.transport;
    relay.auth = client.auth;
    relay.connect_timeout = client.connect_timeout;
    relay.progress_timeout = client.progress_timeout;
    relay
}

/// Runs the daemon in this process until it is idle or stopped; returns the exit code.
/// Call it before any runtime or thread exists: it starts its own session first.
pub fn serve(config: &Config) -> i32 {
    // Our own session: no terminal, and no signal sent to the build's process group.
    let _ = nix::unistd::setsid();
    let settings = Settings::from_env();
    let layout = Layout::of(config);
    if let Err(e) = layout.ensure_private_dir() {
        tracing::error!("{e}");
        return 1;
    }
    // A wrapper checking whether a daemon runs holds the lock for a moment: retry
    // briefly before concluding that another daemon has it.
    let mut lock = None;
    for _ in 0..10 {
        lock = try_lock(&layout.lock());
        if lock.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    let Some(mut lock) = lock else {
        tracing::debug!("daemon {} already running", layout.fingerprint);
        return 0;
    };
    let _ = lock.set_len(0);
    let _ = writeln!(&mut *lock, "{}", std::process::id());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{}", ServeError::Runtime(e));
            return 1;
        }
    };
    let code = match runtime.block_on(run(config, &settings, &layout)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("daemon {}: {e}", layout.fingerprint);
            super::connect::mark_failed(&layout);
            1
        }
    };
    drop(runtime);
    drop(lock);
    code
}

async fn run(config: &Config, settings: &Settings, layout: &Layout) -> Result<(), ServeError> {
    let started = Instant::now();
    let service = service_for(config)?;
    let socket = layout.socket();
    let addr = Address::Unix(socket.clone());
    let listener = bind(&addr, &TransportOptions::default())
        .await
        .map_err(|e| ServeError::Bind(e.to_string()))?;
    // The directory is already closed to others; the socket is too.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServeError::Bind(e.to_string()))?;
    let ours = file_id(&socket);
    super::connect::clear_failed(layout);
    replace_others(layout);
    tracing::info!(
        "daemon {} (pid {}) serving {} (ready in {:?})",
        layout.fingerprint,
        std::process::id(),
        addr,
        started.elapsed()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let service = service.clone();
        let listener: Box<dyn Listener> = Box::new(OwnerOnly {
            inner: listener,
            uid: nix::unistd::getuid().as_raw(),
        });
        tokio::spawn(async move {
            service
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut idle_since = Instant::now();
    let why = loop {
        let tick = tokio::time::sleep(TICK);
        match term.as_mut() {
            Some(t) => {
                tokio::select! {
                    _ = tick => {}
                    _ = t.recv() => break "SIGTERM",
                }
            }
            None => tick.await,
        }
        if file_id(&socket) != ours {
            break "its socket was removed";
        }
        if service.open_connections() > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= settings.idle {
            break "idle";
        }
    };
    tracing::info!("daemon {} stopping: {why}", layout.fingerprint);
    let _ = stop.send(());
    let _ = server.await;
    service.flush().await;
    Ok(())
}

/// Device and inode of `path`, to tell our socket file from a newer one at that path.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A daemon of another configuration of this `DCACHE_DIR` is not reused: its socket is
/// removed, so it finishes its jobs and exits, and wrappers with its old settings start
/// theirs again if they still run.
fn replace_others(layout: &Layout) {
    let Ok(entries) = std::fs::read_dir(&layout.dir) else {
        return;
    };
    let mine = layout.socket();
    for e in entries.flatten() {
        let path = e.path();
        if path != mine && path.extension().is_some_and(|x| x == "sock") {
            tracing::info!("replacing the daemon at {}", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Accepts only processes of this user (the private directory already keeps others out;
/// this holds even if its mode were changed).
struct OwnerOnly {
    inner: Box<dyn Listener>,
    uid: u32,
}

#[async_trait::async_trait]
impl Listener for OwnerOnly {
    async fn accept(&self) -> std::io::Result<(BoxedStream, Peer)> {
        loop {
            let (stream, peer) = self.inner.accept().await?;
            match &peer {
                Peer::Unix { uid: Some(u), .. } if *u == self.uid => {
                    return Ok((stream, peer));
                }
                other => {
                    tracing::warn!("refused a connection from {other:?}: not this user");
                }
            }
        }
    }

    fn local_addr(&self) -> Address {
        self.inner.local_addr()
    }
}
