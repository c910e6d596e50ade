//! Hit latency of each store tier on its own: memory, the disk store, and the shared tier
//! on a real Redis (`dcache-bench tiers redis://…`, a server the operator started). Each
//! cell is the median of repeated lookups of one entry of that size, through the same
//! `Store::get` a server calls; the network protocol in front of it is not included.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::{JobResult, OutputFile};
use dcache_server::store::shared::{RedisBackend, SharedConfig, SharedStore};
use dcache_server::store::{DiskStore, MemoryStore, SealKey, Store, StoreKey};

/// Object sizes measured: a small object, a typical one, a large one (chunked in Redis).
const SIZES: [usize; 3] = [10 << 10, 1 << 20, 16 << 20];

fn result(len: usize) -> JobResult {
    JobResult {
        exit_code: 0,
        stdout: Bytes::new(),
        stderr: Bytes::new(),
        outputs: vec![OutputFile {
            name: ".o".into(),
            data: Bytes::from((0..len).map(|i| (i % 253) as u8).collect::<Vec<_>>()),
        }],
    }
}

/// The median time of `rounds` hits of `key` in `store`; an error if one missed.
async fn median_hit(store: &dyn Store, key: &StoreKey, rounds: usize) -> Result<Duration, String> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        if store.get(key).await.is_none() {
            return Err(format!("{key:?} missed"));
        }
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

/// Measures every tier at every size against the Redis at `url`; a table for people.
pub async fn run(url: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let memory = MemoryStore::new(1 << 30);
    let disk = DiskStore::open(dir.path(), 1 << 30).map_err(|e| e.to_string())?;
    let config = SharedConfig {
        prefix: "dcache-bench:".into(),
        deadline: Duration::from_secs(5),
        ..SharedConfig::default()
    };
    let backend = RedisBackend::new(url, config.transfer_timeout).map_err(|e| e.to_string())?;
    let shared = SharedStore::new(
        backend,
        SealKey::for_shared_tier(b"dcache-bench key"),
        config,
    );
    let mut out = format!(
        "hit latency per tier, median of the rounds ({url}; Store::get, no protocol)\n{:>10} {:>12} {:>12} {:>12}\n",
        "object", "memory", "disk", "redis"
    );
    for (i, size) in SIZES.into_iter().enumerate() {
        let key = StoreKey([i as u8 + 1; 32]);
        let value = result(size);
        let rounds = if size > 4 << 20 { 21 } else { 201 };
        let mut cells = Vec::new();
        for store in [&memory as &dyn Store, &disk, &shared] {
            store.put(&key, &value).await.map_err(|e| e.to_string())?;
            // One warm-up read (page cache, connection).
            let _ = store.get(&key).await;
            cells.push(median_hit(store, &key, rounds).await?);
        }
        let _ = shared.remove(&key).await;
        out.push_str(&format!(
            "{:>10} {:>12?} {:>12?} {:>12?}\n",
            format!("{} KiB", size >> 10),
            cells[0],
            cells[1],
            cells[2]
        ));
    }
    Ok(out)
}
