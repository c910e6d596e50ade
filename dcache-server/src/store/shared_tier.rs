//! The local tiers over a shared one: memory → disk → (Redis, or later an object store).
//!
//! A lookup tries the local tiers first, so a local hit never waits for the network; on a
//! local miss it asks the shared tier (within that tier's deadline), and a shared hit is
//! written back to the local tiers in the background, after the reply. A write goes to
//! the local tiers and then to the shared one; it runs in the service's background
//! writer already, so neither is on the path of a reply. The shared tier's failures are
//! counted in its own STATS counters and never turn into a store error: the result is in
//! the local tiers whatever Redis does.

use std::sync::Arc;

use dcache_proto::JobResult;

use super::{Store, StoreError, StoreKey, StoreStats, TierStats};

/// Local tiers stacked over a shared tier.
pub struct SharedTieredStore {
    local: Arc<dyn Store>,
    shared: Arc<dyn Store>,
}

impl std::fmt::Debug for SharedTieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTieredStore")
            .field("tiers", &self.tiers())
            .finish()
    }
}

impl SharedTieredStore {
    /// `local` (memory over disk) over `shared`.
    pub fn new(local: Arc<dyn Store>, shared: Arc<dyn Store>) -> Self {
        Self { local, shared }
    }
}

#[async_trait::async_trait]
impl Store for SharedTieredStore {
    async fn get(&self, key: &StoreKey) -> Option<JobResult> {
        if let Some(v) = self.local.get(key).await {
            return Some(v);
        }
        let v = self.shared.get(key).await?;
        let local = self.local.clone();
        let (key, copy) = (*key, v.clone());
        tokio::spawn(async move {
            // Best effort: a result too large for the local tiers is served all the same.
            let _ = local.put(&key, &copy).await;
        });
        Some(v)
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        let local = self.local.put(key, value).await;
        // Counted by the shared tier itself (errors, or too large for it).
        let _ = self.shared.put(key, value).await;
        local
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let local = self.local.remove(key).await;
        let shared = self.shared.remove(key).await;
        Ok(local? | shared?)
    }

    /// The local tiers' counters (size and evictions of the shared tier belong to it),
    /// with the entries the shared tier refused added to the corrupt ones.
    fn stats(&self) -> StoreStats {
        let mut s = self.local.stats();
        s.corrupt += self.shared.stats().corrupt;
        s
    }

    async fn ready(&self) -> Result<(), String> {
        self.local.ready().await?;
        self.shared.ready().await
    }

    fn tiers(&self) -> Vec<TierStats> {
        let mut tiers = self.local.tiers();
        tiers.extend(self.shared.tiers());
        tiers
    }
}
