//! A tier shared by a fleet of servers: sealed entries in a remote key-value store.
//!
//! [`SharedStore`] holds everything that does not depend on which remote store it is:
//! sealing with the fleet's shared key and verifying every read, chunking large entries
//! ([`layout`]), the lookup deadline, a bound on the memory of reads in progress, TTLs,
//! per-tier counters and logging an outage once. A [`Backend`] only moves named byte
//! values: [`RedisBackend`] does it for one Redis or a Redis Cluster, and an object store
//! (S3-compatible) would be another implementation of the same five methods.
//!
//! Entries are compressed as the local ones are ([`SharedConfig::compression`]): the
//! network and the remote store's memory carry the compressed bytes, `max_value` counts
//! them, and a read reserves its share of the read budget for the decompressed body
//! before inflating it (within `max_body`).
//!
//! Trust: a value is served only if it verifies under the shared key *and* names the
//! store key it was read for (see [`SealKey::for_shared_tier`]); anything else is dropped
//! and counted. Whoever can write to the remote store without the key can delete or
//! damage entries (a miss, then a compile) but never make a server serve their bytes.

mod health;
pub mod layout;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::JobResult;
use tokio::sync::Semaphore;

use super::codec::Compression;
use super::{SealKey, Store, StoreError, StoreKey, StoreStats, TierStats, entry};
use health::Health;
pub use redis::{RedisBackend, RedisUrlError};

/// Why a backend operation failed: never bad data (that is the caller's to judge), only
/// the remote store being unreachable, refusing, or slow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No connection, or the connection broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The store answered with an error.
    #[error("refused: {0}")]
    Refused(String),
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A remote store of named byte values: what [`SharedStore`] needs from Redis, or from an
/// object store. Names are short ASCII; values of one entry share its hash tag, so a
/// sharded backend keeps them together.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The store as named in logs (never with credentials).
    fn describe(&self) -> String;
    /// The value under `name`, if any.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, BackendError>;
    /// The values under `names`, in order (`None` where absent).
    async fn get_many(&self, names: &[String]) -> Result<Vec<Option<Bytes>>, BackendError>;
    /// Stores each value under its name, expiring after `ttl`, in the order given: the
    /// caller puts an entry's head last, so a reader that sees it finds its chunks.
    async fn put_many(&self, values: &[(String, Bytes)], ttl: Duration)
    -> Result<(), BackendError>;
    /// Restarts the expiry of `names` (a hit keeps an entry alive).
    async fn touch(&self, names: &[String], ttl: Duration) -> Result<(), BackendError>;
    /// Removes `names`; absent ones are not an error.
    async fn delete(&self, names: &[String]) -> Result<(), BackendError>;
}

/// Settings of a [`SharedStore`].
#[derive(Clone, Debug)]
pub struct SharedConfig {
    /// How long an entry lives after it was last written or hit.
    pub ttl: Duration,
    /// Largest sealed entry written or read, as stored (compressed); larger results stay
    /// in the local tiers, and a head declaring more is refused before anything is
    /// fetched.
    pub max_value: u64,
    /// Largest result body (decompressed) written or read; a read reserves this much of
    /// the read budget before it inflates a body, so keep `max_value + max_body` below
    /// `read_budget`.
    pub max_body: u64,
    /// How entries are written (every server reads both forms, so a fleet may mix).
    pub compression: Compression,
    /// How long a lookup waits for the first answer before it counts as a miss (and an
    /// error): a slow remote store costs a miss at most this much.
    pub deadline: Duration,
    /// How long a write, or the rest of a chunked read, may take.
    pub transfer_timeout: Duration,
    /// Bytes per stored value (the last chunk may be shorter).
    pub chunk_len: u32,
    /// Bytes that reads in progress may hold together; a lookup that cannot get its share
    /// within the deadline is a miss (so an entry larger than this is never read: keep
    /// `max_value` below it).
    pub read_budget: u64,
    /// Prefix of every name, so several fleets (or a test) can share one store.
    pub prefix: String,
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 24 * 3600),
            max_value: 64 << 20,
            max_body: 128 << 20,
            compression: Compression::default(),
            deadline: Duration::from_millis(250),
            transfer_timeout: Duration::from_secs(10),
            chunk_len: 4 << 20,
            read_budget: 256 << 20,
            prefix: "dcache:v2:".into(),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Sealed entries in a shared remote store, behind the [`Store`] trait. Cheap to clone
/// (one shared state), so its background work (TTL refresh, dropping a refused entry)
/// runs on its own tasks.
pub struct SharedStore<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for SharedStore<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B> {
    backend: B,
    seal: SealKey,
    config: SharedConfig,
    counts: Counts,
    health: Health,
    /// Read budget in KiB permits (a semaphore counts in u32-sized units).
    reads: Semaphore,
}

impl<B: Backend> std::fmt::Debug for SharedStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("backend", &self.inner.backend.describe())
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Entries up to this size are (de)compressed and verified on the task that asked; larger
/// ones on the blocking pool, so a 64 MiB entry never stalls a runtime thread.
const INLINE: usize = 256 << 10;

/// `f()`, run off the runtime's threads when `size` says it is long work; `None` if it
/// panicked there.
async fn off_runtime<T: Send + 'static>(
    size: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if size <= INLINE {
        return Some(f());
    }
    tokio::task::spawn_blocking(f).await.ok()
}

/// KiB permits for `bytes`, rounded up, at least one.
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl<B: Backend> SharedStore<B> {
    /// A shared tier over `backend`, sealing and verifying with `seal` (the fleet's key,
    /// from [`SealKey::for_shared_tier`]).
    pub fn new(backend: B, seal: SealKey, config: SharedConfig) -> Self {
        // At least one head's worth, or no lookup could ever start.
        let budget = kib(config.read_budget)
            .max(kib(u64::from(config.chunk_len) + layout::HEAD_FIELDS as u64));
        Self {
            inner: Arc::new(Inner {
                health: Health::new(backend.describe()),
                backend,
                seal,
                reads: Semaphore::new(budget as usize),
                config,
                counts: Counts::default(),
            }),
        }
    }

    /// The backend, for tests and diagnostics.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// The names an entry of `chunks` values is kept under, head first (tests use them
    /// to damage what is stored).
    pub fn names(&self, key: &StoreKey, chunks: u32) -> Vec<String> {
        layout::names(&self.inner.config.prefix, key, chunks)
    }
}

impl<B: Backend> Inner<B> {
    /// Runs `op` within `limit`, counting and logging a failure.
    async fn within<T>(
        &self,
        limit: Duration,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Option<T> {
        let r = match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(limit)),
        };
        match r {
            Ok(v) => {
                self.health.ok();
                Some(v)
            }
            Err(e) => {
                bump(&self.counts.errors, 1);
                self.health.failed(&e);
                None
            }
        }
    }

    /// A lookup; `None` on a miss, a failure or a refused value (each counted).
    async fn get(self: &Arc<Self>, key: &StoreKey) -> Option<JobResult> {
        let head_name = layout::names(&self.config.prefix, key, 1).remove(0);
        let deadline = self.config.deadline;
        // The head may carry a whole chunk: its memory is reserved before it is read.
        let head_cost = kib(u64::from(self.config.chunk_len) + layout::HEAD_FIELDS as u64);
        let Ok(Ok(mut permit)) =
            tokio::time::timeout(deadline, self.reads.acquire_many(head_cost)).await
        else {
            bump(&self.counts.misses, 1);
            return None;
        };
        let Some(found) = self.within(deadline, self.backend.get(&head_name)).await else {
            bump(&self.counts.misses, 1);
            return None;
        };
        let Some(head) = found else {
            bump(&self.counts.misses, 1);
            return None;
        };
        let head = match layout::parse_head(head, self.config.max_value) {
            Ok(h) => h,
            Err(layout::LayoutError::TooLarge(n)) => {
                // Another server's larger limit, not damage: left for it.
                tracing::debug!("shared entry {key:?} of {n} bytes is over this server's limit");
                bump(&self.counts.misses, 1);
                return None;
            }
            Err(e) => return self.refuse(key, 1, &e),
        };
        let names = layout::names(&self.config.prefix, key, head.count);
        let entry = if head.count > 1 {
            let more = kib(head.total).saturating_sub(head_cost);
            match tokio::time::timeout(deadline, self.reads.acquire_many(more)).await {
                Ok(Ok(p)) => permit.merge(p),
                _ => {
                    bump(&self.counts.misses, 1);
                    return None;
                }
            }
            let rest = self
                .within(
                    self.config.transfer_timeout,
                    self.backend.get_many(&names[1..]),
                )
                .await;
            let Some(rest) = rest else {
                bump(&self.counts.misses, 1);
                return None;
            };
            match layout::assemble(head, rest) {
                Ok(e) => e,
                Err(e) => return self.refuse(key, names.len() as u32, &e),
            }
        } else {
            head.first
        };
        let size = entry.len() as u64;
        if let Some(body) = entry::declared_body_len(&entry) {
            // The decompressed body is held too, beside the entry: its memory is
            // reserved first (a claim past `max_body` is refused by `decode` unread).
            if body <= self.config.max_body {
                match tokio::time::timeout(deadline, self.reads.acquire_many(kib(body))).await {
                    Ok(Ok(p)) => permit.merge(p),
                    _ => {
                        bump(&self.counts.misses, 1);
                        return None;
                    }
                }
            }
        }
        let (seal, k, max) = (self.seal.clone(), *key, self.config.max_body);
        let decoded = off_runtime(entry.len(), move || entry::decode(&seal, &k, entry, max)).await;
        let result = match decoded.unwrap_or(Err(entry::EntryError::Malformed)) {
            Ok(r) => r,
            Err(entry::EntryError::TooLarge(n)) => {
                // Another server's larger limit, not damage: left for it.
                tracing::debug!(
                    "shared entry {key:?} of a {n}-byte body is over this server's limit"
                );
                bump(&self.counts.misses, 1);
                return None;
            }
            Err(e) => return self.refuse(key, names.len() as u32, &e),
        };
        drop(permit);
        bump(&self.counts.hits, 1);
        bump(&self.counts.bytes_read, size);
        // A hit keeps the entry alive; off the lookup's path.
        let me = self.clone();
        tokio::spawn(async move {
            let ttl = me.config.ttl;
            me.within(me.config.transfer_timeout, me.backend.touch(&names, ttl))
                .await;
        });
        Some(result)
    }

    /// Counts a value that failed verification, drops it (in the background) and misses.
    fn refuse(
        self: &Arc<Self>,
        key: &StoreKey,
        count: u32,
        why: &dyn std::fmt::Display,
    ) -> Option<JobResult> {
        tracing::warn!("shared cache: refused the entry for {key:?}: {why}");
        bump(&self.counts.refused, 1);
        bump(&self.counts.misses, 1);
        let names = layout::names(&self.config.prefix, key, count);
        let me = self.clone();
        tokio::spawn(async move {
            me.within(me.config.transfer_timeout, me.backend.delete(&names))
                .await;
        });
        None
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        if value.body_len() > self.config.max_body {
            return Err(StoreError::TooLarge(value.body_len()));
        }
        let (seal, k, v, c) = (
            self.seal.clone(),
            *key,
            value.clone(),
            self.config.compression,
        );
        let size = usize::try_from(value.body_len()).unwrap_or(usize::MAX);
        let sealed = off_runtime(size, move || entry::encode(&seal, &k, &v, c))
            .await
            .ok_or_else(|| StoreError::Io(std::io::Error::other("encoding the entry failed")))??;
        let size = sealed.len() as u64;
        if size > self.config.max_value {
            return Err(StoreError::TooLarge(size));
        }
        let values = layout::split(&sealed, self.config.chunk_len);
        let names = layout::names(&self.config.prefix, key, values.len() as u32);
        // Chunks first, head last: a reader that finds the head finds its chunks.
        let mut items: Vec<(String, Bytes)> = names.into_iter().zip(values).collect();
        items.rotate_left(1);
        match self
            .within(
                self.config.transfer_timeout,
                self.backend.put_many(&items, self.config.ttl),
            )
            .await
        {
            Some(()) => {
                bump(&self.counts.bytes_written, size);
                Ok(())
            }
            None => Err(StoreError::Io(std::io::Error::other(format!(
                "shared cache {} did not take the entry",
                self.backend.describe()
            )))),
        }
    }
}

#[async_trait::async_trait]
impl<B: Backend> Store for SharedStore<B> {
    async fn get(&self, key: &StoreKey) -> Option<JobResult> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        self.inner.put(key, value).await
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let head = layout::names(&self.inner.config.prefix, key, 1).remove(0);
        let inner = &self.inner;
        let found = inner
            .within(inner.config.deadline, inner.backend.get(&head))
            .await
            .ok_or_else(|| StoreError::Io(std::io::Error::other("shared cache unreachable")))?;
        let Some(head) = found else {
            return Ok(false);
        };
        // A head that does not parse still goes, with whatever chunks it may have had.
        let count = layout::parse_head(head, u64::MAX).map_or(1, |h| h.count);
        let names = layout::names(&inner.config.prefix, key, count);
        inner
            .within(inner.config.transfer_timeout, inner.backend.delete(&names))
            .await
            .ok_or_else(|| StoreError::Io(std::io::Error::other("shared cache unreachable")))?;
        Ok(true)
    }

    /// Reads a name no entry has, within the transfer timeout: an answer, even "absent",
    /// proves the remote store reachable. Not counted in the tier's errors (a probe is
    /// not a lookup) and not logged (the outage is logged by the lookups).
    async fn ready(&self) -> Result<(), String> {
        let inner = &self.inner;
        let name = format!("{}ready-probe", inner.config.prefix);
        let limit = inner.config.transfer_timeout;
        match tokio::time::timeout(limit, inner.backend.get(&name)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("shared tier {}: {e}", inner.backend.describe())),
            Err(_) => Err(format!(
                "shared tier {}: no answer within {limit:?}",
                inner.backend.describe()
            )),
        }
    }

    /// The remote store's size and eviction belong to it (maxmemory and its policy);
    /// only what this server refused is counted here.
    fn stats(&self) -> StoreStats {
        StoreStats {
            corrupt: self.inner.counts.refused.load(Ordering::Relaxed),
            write_errors: 0,
            ..StoreStats::default()
        }
    }

    fn tiers(&self) -> Vec<TierStats> {
        let c = &self.inner.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![TierStats {
            name: "shared",
            hits: get(&c.hits),
            misses: get(&c.misses),
            errors: get(&c.errors),
            refused: get(&c.refused),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            ..TierStats::default()
        }]
    }
}
