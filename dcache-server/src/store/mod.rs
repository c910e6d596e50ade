//! Result stores: where compiled results are kept, behind one trait.
//!
//! A stored entry is always whole and verified, or absent: the disk store writes to a
//! temporary file and renames it into place, and checks a digest on every read; a corrupt
//! entry is removed and reported as a miss. The tiers that keep bytes (disk, shared)
//! compress entries with zstd ([`Compression`]) and count their size limits in the
//! compressed bytes; the memory tier keeps results decompressed (the hot path).

mod codec;
mod disk;
pub mod entry;
mod lru;
mod memory;
mod seal;
pub mod shared;
mod shared_tier;
mod tiered;

use dcache_proto::JobResult;

pub use codec::{Compression, CompressionParseError, DEFAULT_LEVEL, MAX_LEVEL};
pub use disk::{DiskStore, DiskUsage};
pub use memory::MemoryStore;
pub use seal::SealKey;
pub use shared_tier::SharedTieredStore;
pub use tiered::TieredStore;

/// The key a result is stored under: the protocol's cache key bound to the server's
/// compiler identity (see [`crate::exec::store_key`]), so a compiler upgrade can never
/// serve an object built by the old one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(pub [u8; 32]);

impl StoreKey {
    /// Lower-case hex, used as the entry's file name.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreKey({})", self.to_hex())
    }
}

/// Why a store operation failed. Reads never fail on bad data (that is a miss); these are
/// environmental failures the caller reports and works around.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The filesystem refused (read-only, full, permissions).
    #[error("cache store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The entry is larger than the whole store.
    #[error("entry of {0} bytes exceeds the store's size limit")]
    TooLarge(u64),
    /// The result does not fit the stored format.
    #[error("cannot store this result: {0}")]
    Unrepresentable(#[from] entry::EntryError),
}

/// Counters of a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Entries removed to stay under the size limit.
    pub evictions: u64,
    /// Entries found damaged (bad digest, truncated, wrong key or version) and removed.
    pub corrupt: u64,
    /// Writes that failed.
    pub write_errors: u64,
}

/// What one tier of a stack of stores saw, for STATS (`{name}_hits`, …): the lookups it
/// answered and missed, its failures, and the bytes it moved. Each tier counts only the
/// lookups that reached it, so a disk miss is a lookup that memory missed too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// The tier's name in STATS: `memory`, `disk`, `shared`.
    pub name: &'static str,
    /// Lookups answered with a verified result.
    pub hits: u64,
    /// Lookups that found nothing usable (absent, or refused as damaged).
    pub misses: u64,
    /// Operations that failed for the environment (I/O, unreachable, past the deadline).
    pub errors: u64,
    /// Entries refused by verification (bad MAC, wrong key, truncated) and dropped.
    pub refused: u64,
    /// Bytes of verified entries read.
    pub bytes_read: u64,
    /// Bytes of entries written.
    pub bytes_written: u64,
    /// Entries the tier holds now (0 where it cannot know: a shared tier).
    pub entries: u64,
    /// Bytes the tier holds now, counted the way its limit counts them.
    pub bytes: u64,
    /// The tier's size limit in bytes (0 where it has none of its own: a shared tier
    /// expires entries by TTL and leaves space to the remote store).
    pub limit: u64,
    /// Entries removed to stay under the limit.
    pub evictions: u64,
}

/// A place to keep results. Implementations are safe to share between tasks.
///
/// The methods that may touch a disk are `async` (through `async-trait`, so the trait
/// stays object-safe behind `Arc<dyn Store>`): the disk store runs its file work on
/// tokio's blocking pool, so a slow or stalled disk never blocks the tasks serving
/// connections. Counters are plain reads of in-memory state, hence synchronous.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The result stored under `key`, if a whole and verified one is there. Never an
    /// error: anything unreadable or damaged is a miss (and a damaged entry is dropped),
    /// because the caller's answer to a miss, compiling, is always correct.
    async fn get(&self, key: &StoreKey) -> Option<JobResult>;
    /// Stores `value` under `key`, evicting old entries to stay under the size limit.
    /// An error means only that the result is not cached; the caller still has it and
    /// should still return it to the client.
    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError>;
    /// Removes the entry under `key` (an operator purging a bad result, a test). Returns
    /// whether there was one; removing an absent key is not an error.
    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError>;
    /// Current counters.
    fn stats(&self) -> StoreStats;
    /// Per-tier counters, front tier first: one for a plain store, one per tier for a
    /// stack. Empty for a store that does not count its lookups.
    fn tiers(&self) -> Vec<TierStats> {
        Vec::new()
    }
    /// Whether the store can serve and keep results now: `Err` names the tier and why
    /// not (a cache directory that cannot be written, a shared tier that does not
    /// answer). For a readiness probe; it costs a small write or a round trip, so it is
    /// not for the hot path. The default, for stores that cannot fail this way: ready.
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// Entries held (as far as this store knows: other processes sharing a disk cache
    /// add entries it only learns about when it reads them or restarts).
    fn len(&self) -> u64 {
        self.stats().entries
    }
    /// Whether the store holds nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes held, counted the way the size limit counts them.
    fn bytes(&self) -> u64 {
        self.stats().bytes
    }
}
