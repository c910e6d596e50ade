//! Least-recently-used bookkeeping shared by the stores: which key to evict next.

use std::collections::{BTreeMap, HashMap};

use super::StoreKey;

/// Sizes and recency of the keys of one store.
#[derive(Debug, Default)]
pub(crate) struct Lru {
    tick: u64,
    entries: HashMap<StoreKey, (u64, u64)>,
    order: BTreeMap<u64, StoreKey>,
    bytes: u64,
}

impl Lru {
    /// Records `key` of `size` bytes as the most recently used.
    pub(crate) fn insert(&mut self, key: StoreKey, size: u64) {
        self.remove(&key);
        self.tick += 1;
        self.entries.insert(key, (size, self.tick));
        self.order.insert(self.tick, key);
        self.bytes += size;
    }

    /// Records `key` with an explicit age (smaller is older), for rebuilding from disk.
    pub(crate) fn insert_aged(&mut self, key: StoreKey, size: u64, age: u64) {
        self.remove(&key);
        let tick = age.max(1);
        let tick = (tick..)
            .find(|t| !self.order.contains_key(t))
            .unwrap_or(tick);
        self.tick = self.tick.max(tick);
        self.entries.insert(key, (size, tick));
        self.order.insert(tick, key);
        self.bytes += size;
    }

    /// Marks `key` as just used.
    pub(crate) fn touch(&mut self, key: &StoreKey) {
        if let Some((size, _)) = self.entries.get(key).copied() {
            self.insert(*key, size);
        }
    }

    pub(crate) fn remove(&mut self, key: &StoreKey) -> Option<u64> {
        let (size, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= size;
        Some(size)
    }

    /// The least recently used key.
    pub(crate) fn oldest(&self) -> Option<StoreKey> {
        self.order.values().next().copied()
    }

    pub(crate) fn contains(&self, key: &StoreKey) -> bool {
        self.entries.contains_key(key)
    }

    pub(crate) fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}
