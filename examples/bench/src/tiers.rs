//! Hit latency of each store tier on its own: memory, the disk store and the shared tier
//! on a real Redis (`dcache-bench tiers redis://…`, a server the operator started), the
//! byte tiers both with entries stored as they are and compressed (zstd at the default
//! level), side by side in one run. Each cell is the median of repeated lookups of one
//! entry of that size, through the same `Store::get` a server calls; the network protocol
//! in front of it is not included. The objects are real machine code (slices of this
//! very executable), so the compression ratio is an object file's, not random bytes'
//! (which would not compress) nor a pattern's (which would vanish).

use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::{JobResult, OutputFile};
use dcache_server::store::shared::{RedisBackend, SharedConfig, SharedStore};
use dcache_server::store::{Compression, DiskStore, MemoryStore, SealKey, Store, StoreKey};

/// Object sizes measured: a small object, a typical one, a large one (chunked in Redis).
const SIZES: [usize; 3] = [10 << 10, 1 << 20, 16 << 20];

/// An object of `len` bytes of real code: this executable from its middle (its text),
/// repeated if it is shorter.
fn result(code: &[u8], len: usize) -> JobResult {
    let start = code.len() / 3;
    let data: Vec<u8> = code[start..]
        .iter()
        .chain(code.iter())
        .cycle()
        .take(len)
        .copied()
        .collect();
    JobResult {
        exit_code: 0,
        stdout: Bytes::new(),
        stderr: Bytes::new(),
        outputs: vec![OutputFile {
            name: ".o".into(),
            data: Bytes::from(data),
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

/// The median time of `rounds` writes of `value` under `key`.
async fn median_put(
    store: &dyn Store,
    key: &StoreKey,
    value: &JobResult,
    rounds: usize,
) -> Result<Duration, String> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        store.put(key, value).await.map_err(|e| e.to_string())?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

fn shared(
    url: &str,
    prefix: &str,
    compression: Compression,
) -> Result<SharedStore<RedisBackend>, String> {
    let config = SharedConfig {
        prefix: prefix.into(),
        deadline: Duration::from_secs(5),
        compression,
        ..SharedConfig::default()
    };
    let backend = RedisBackend::new(url, config.transfer_timeout).map_err(|e| e.to_string())?;
    Ok(SharedStore::new(
        backend,
        SealKey::for_shared_tier(b"dcache-bench key"),
        config,
    ))
}

/// Measures every tier at every size against the Redis at `url`; tables for people.
pub async fn run(url: &str) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let code = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    let zstd = Compression::default();
    let (plain_dir, zstd_dir) = (
        tempfile::tempdir().map_err(|e| e.to_string())?,
        tempfile::tempdir().map_err(|e| e.to_string())?,
    );
    let memory = MemoryStore::new(1 << 30);
    let disk = DiskStore::open_with(plain_dir.path(), 1 << 30, Compression::None)
        .map_err(|e| e.to_string())?;
    let disk_z = DiskStore::open_with(zstd_dir.path(), 1 << 30, zstd).map_err(|e| e.to_string())?;
    let redis = shared(url, "dcache-bench:plain:", Compression::None)?;
    let redis_z = shared(url, "dcache-bench:zstd:", zstd)?;
    let stores: [&dyn Store; 5] = [&memory, &disk, &disk_z, &redis, &redis_z];
    let mut hits = format!(
        "hit latency per tier, median of the rounds ({url}; Store::get, no protocol; {zstd})\n\
         {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>7}\n",
        "object", "memory", "disk", "disk zstd", "redis", "redis zstd", "stored"
    );
    let mut puts = format!(
        "\nwrite latency (Store::put, median)\n{:>10} {:>12} {:>12} {:>12} {:>12}\n",
        "object", "disk", "disk zstd", "redis", "redis zstd"
    );
    for (i, size) in SIZES.into_iter().enumerate() {
        let key = StoreKey([i as u8 + 1; 32]);
        let value = result(&code, size);
        let big = size > 4 << 20;
        let rounds = if big { 21 } else { 201 };
        let mut cells = Vec::new();
        let mut put_cells = Vec::new();
        for (n, store) in stores.iter().enumerate() {
            if n > 0 {
                put_cells.push(median_put(*store, &key, &value, if big { 5 } else { 21 }).await?);
            } else {
                store.put(&key, &value).await.map_err(|e| e.to_string())?;
            }
            // One warm-up read (page cache, connection).
            let _ = store.get(&key).await;
            cells.push(median_hit(*store, &key, rounds).await?);
        }
        // What the compressed entry takes against the plain one, on disk.
        let ratio = disk.stats().bytes as f64 / disk_z.stats().bytes.max(1) as f64;
        for s in [&redis, &redis_z] {
            let _ = s.remove(&key).await;
        }
        let _ = disk.remove(&key).await;
        let _ = disk_z.remove(&key).await;
        hits.push_str(&format!(
            "{:>10} {:>12?} {:>12?} {:>12?} {:>12?} {:>12?} {:>6.2}x\n",
            format!("{} KiB", size >> 10),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            ratio
        ));
        puts.push_str(&format!(
            "{:>10} {:>12?} {:>12?} {:>12?} {:>12?}\n",
            format!("{} KiB", size >> 10),
            put_cells[0],
            put_cells[1],
            put_cells[2],
            put_cells[3]
        ));
    }
    hits.push_str(&puts);
    Ok(hits)
}
