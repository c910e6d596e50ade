//! A bounded in-memory store, least recently used out first.

use std::collections::HashMap;
use std::sync::Mutex;

use dcache_proto::JobResult;

use super::lru::Lru;
use super::{Store, StoreError, StoreKey, StoreStats, TierStats};

/// Results in memory, up to a byte limit.
#[derive(Debug)]
pub struct MemoryStore {
    limit: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    lru: Lru,
    values: HashMap<StoreKey, JobResult>,
    evictions: u64,
    hits: u64,
    misses: u64,
    bytes_read: u64,
    bytes_written: u64,
}

fn cost(r: &JobResult) -> u64 {
    // The bytes held plus a fixed overhead per entry, so many empty results still count.
    r.body_len() + 128
}

impl MemoryStore {
    /// A store holding at most `limit` bytes of results.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section is a few map operations that cannot panic halfway, so a
        // poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &StoreKey) -> Option<JobResult> {
        let mut inner = self.lock();
        let Some(value) = inner.values.get(key).cloned() else {
            inner.misses += 1;
            return None;
        };
        inner.lru.touch(key);
        inner.hits += 1;
        inner.bytes_read += value.body_len();
        Some(value)
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        let size = cost(value);
        if size > self.limit {
            return Err(StoreError::TooLarge(size));
        }
        let mut inner = self.lock();
        inner.lru.insert(*key, size);
        inner.values.insert(*key, value.clone());
        inner.bytes_written += value.body_len();
        while inner.lru.bytes() > self.limit {
            let Some(old) = inner.lru.oldest() else { break };
            inner.lru.remove(&old);
            inner.values.remove(&old);
            inner.evictions += 1;
        }
        Ok(())
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        inner.lru.remove(key);
        Ok(inner.values.remove(key).is_some())
    }

    fn stats(&self) -> StoreStats {
        let inner = self.lock();
        StoreStats {
            entries: inner.lru.len(),
            bytes: inner.lru.bytes(),
            evictions: inner.evictions,
            ..StoreStats::default()
        }
    }

    fn tiers(&self) -> Vec<TierStats> {
        let inner = self.lock();
        vec![TierStats {
            name: "memory",
            hits: inner.hits,
            misses: inner.misses,
            bytes_read: inner.bytes_read,
            bytes_written: inner.bytes_written,
            entries: inner.lru.len(),
            bytes: inner.lru.bytes(),
            limit: self.limit,
            evictions: inner.evictions,
            ..TierStats::default()
        }]
    }
}
