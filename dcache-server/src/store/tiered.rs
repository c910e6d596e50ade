//! Memory over disk: hot results answered from memory, everything kept on disk.

use dcache_proto::JobResult;

use super::{Store, StoreError, StoreKey, StoreStats, TierStats};

/// A fast store in front of a large one. Reads try the front first and promote what the
/// back had; writes go to both.
#[derive(Debug)]
pub struct TieredStore<F, B> {
    front: F,
    back: B,
}

impl<F: Store, B: Store> TieredStore<F, B> {
    /// Stacks `front` (memory) over `back` (disk).
    pub fn new(front: F, back: B) -> Self {
        Self { front, back }
    }

    /// The front store, for its own counters (the tiered counters are the back's).
    pub fn front(&self) -> &F {
        &self.front
    }

    /// The back store.
    pub fn back(&self) -> &B {
        &self.back
    }
}

#[async_trait::async_trait]
impl<F: Store, B: Store> Store for TieredStore<F, B> {
    async fn get(&self, key: &StoreKey) -> Option<JobResult> {
        if let Some(v) = self.front.get(key).await {
            return Some(v);
        }
        let v = self.back.get(key).await?;
        // A result too large for the front is still served from the back.
        let _ = self.front.put(key, &v).await;
        Some(v)
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        let front = self.front.put(key, value).await;
        self.back.put(key, value).await?;
        front.or(Ok(()))
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let front = self.front.remove(key).await;
        let back = self.back.remove(key).await?;
        Ok(front.unwrap_or(false) || back)
    }

    /// The back store's counters: it holds everything the front does and more.
    fn stats(&self) -> StoreStats {
        self.back.stats()
    }

    async fn ready(&self) -> Result<(), String> {
        self.front.ready().await?;
        self.back.ready().await
    }

    fn tiers(&self) -> Vec<TierStats> {
        let mut tiers = self.front.tiers();
        tiers.extend(self.back.tiers());
        tiers
    }
}
