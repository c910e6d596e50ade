//! Stores: whole and verified, or absent.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use bytes::Bytes;
use dcache_proto::{JobResult, OutputFile};
use dcache_server::store::{
    Compression, DiskStore, MemoryStore, Store, StoreError, StoreKey, TieredStore,
};

/// A result whose object is `size` bytes that do not compress (so its size on disk is
/// the same with and without compression), different for each `n`.
fn result(n: u8, size: usize) -> JobResult {
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(&[n])
        .finalize_xof()
        .fill(&mut data);
    with_object(n, data)
}

/// A result whose object is `size` bytes of text-like data that compresses about as
/// object files do (several times), different for each `n`.
fn text_result(n: u8, size: usize) -> JobResult {
    let mut data = Vec::with_capacity(size + 64);
    let mut i = 0u32;
    while data.len() < size {
        data.extend_from_slice(format!("sym_{n}_{} = .L{} + {};\n", i % 97, i % 13, i).as_bytes());
        i += 1;
    }
    data.truncate(size);
    with_object(n, data)
}

fn with_object(n: u8, data: Vec<u8>) -> JobResult {
    JobResult {
        exit_code: 0,
        stdout: Bytes::new(),
        stderr: Bytes::from(format!("note {n}\n")),
        outputs: vec![OutputFile {
            name: ".o".into(),
            data: Bytes::from(data),
        }],
    }
}

/// What an entry of [`result`]`(n, 10_000)` takes on disk: the size limit counts
/// blocks, as du does (three of 4 KiB on ext4).
const ON_DISK_10K: u64 = 12_288;

fn key(n: u8) -> StoreKey {
    StoreKey([n; 32])
}

fn entry_path(store: &DiskStore, k: &StoreKey) -> std::path::PathBuf {
    let hex = k.to_hex();
    store.root().join(&hex[..2]).join(hex)
}

#[tokio::test]
async fn memory_store_evicts_least_recently_used() {
    let s = MemoryStore::new(3 * 1200);
    for n in 1..=3 {
        s.put(&key(n), &result(n, 1000)).await.unwrap();
    }
    assert!(s.get(&key(1)).await.is_some()); // 1 is now the most recent
    s.put(&key(4), &result(4, 1000)).await.unwrap();
    assert!(
        s.get(&key(2)).await.is_none(),
        "2 was the least recently used"
    );
    assert!(s.get(&key(1)).await.is_some());
    assert!(s.get(&key(3)).await.is_some());
    assert_eq!(s.stats().evictions, 1);
}

#[tokio::test]
async fn disk_store_round_trips_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
        s.put(&key(1), &result(1, 5000)).await.unwrap();
        assert_eq!(s.get(&key(1)).await, Some(result(1, 5000)));
    }
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(s.stats().entries, 1);
    assert_eq!(s.get(&key(1)).await, Some(result(1, 5000)));
}

#[tokio::test]
async fn corrupt_or_truncated_entries_are_removed_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    for (n, damage) in [(1u8, "flip"), (2, "truncate"), (3, "swap")] {
        s.put(&key(n), &result(n, 3000)).await.unwrap();
        let path = entry_path(&s, &key(n));
        let mut bytes = std::fs::read(&path).unwrap();
        match damage {
            "flip" => {
                let i = bytes.len() - 10;
                bytes[i] ^= 1;
            }
            "truncate" => bytes.truncate(bytes.len() / 2),
            _ => {
                // Another key's valid entry copied under this key's name.
                s.put(&key(9), &result(9, 3000)).await.unwrap();
                bytes = std::fs::read(entry_path(&s, &key(9))).unwrap();
            }
        }
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(s.get(&key(n)).await, None, "{damage}: damaged entry served");
        assert!(!path.exists(), "{damage}: damaged entry left on disk");
    }
    assert_eq!(s.stats().corrupt, 3);
}

#[tokio::test]
async fn disk_store_evicts_by_size_in_lru_order_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 3 * ON_DISK_10K).unwrap();
    for n in 1..=3 {
        s.put(&key(n), &result(n, 10_000)).await.unwrap();
        // mtime resolution: keep the order unambiguous for the restart below.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(s.get(&key(1)).await.is_some());
    drop(s);
    let s = DiskStore::open(dir.path(), 3 * ON_DISK_10K).unwrap();
    s.put(&key(4), &result(4, 10_000)).await.unwrap();
    assert!(s.get(&key(2)).await.is_none(), "2 was least recently used");
    assert!(
        s.get(&key(1)).await.is_some(),
        "the hit on 1 survived the restart"
    );
    assert!(s.stats().bytes <= 3 * ON_DISK_10K);
}

#[tokio::test]
async fn two_stores_share_one_directory() {
    let dir = tempfile::tempdir().unwrap();
    let a = DiskStore::open(dir.path(), 1 << 24).unwrap();
    let b = DiskStore::open(dir.path(), 1 << 24).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            // Both write the same keys at the same time.
            let k = key(i % 8);
            let r = result(i % 8, 20_000);
            a.put(&k, &r).await.unwrap();
            b.put(&k, &r).await.unwrap();
            assert_eq!(a.get(&k).await, Some(r.clone()));
            assert_eq!(b.get(&k).await, Some(r));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A store sees what the other wrote even without it in its own index.
    let c = DiskStore::open(dir.path(), 1 << 24).unwrap();
    assert_eq!(c.stats().entries, 8);
}

#[tokio::test]
async fn a_read_only_directory_fails_writes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    let tmp = s.root().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    assert!(s.put(&key(1), &result(1, 100)).await.is_err());
    assert_eq!(s.get(&key(1)).await, None);
    assert_eq!(s.stats().write_errors, 1);
}

#[tokio::test]
async fn tiered_store_promotes_disk_hits_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskStore::open(dir.path(), 1 << 20).unwrap();
    disk.put(&key(1), &result(1, 100)).await.unwrap();
    let t = TieredStore::new(MemoryStore::new(1 << 20), disk.clone());
    assert_eq!(t.get(&key(1)).await, Some(result(1, 100)));
    // Gone from disk, still served from memory.
    std::fs::remove_file(entry_path(&disk, &key(1))).unwrap();
    assert_eq!(t.get(&key(1)).await, Some(result(1, 100)));
}

#[tokio::test]
async fn remove_drops_entries_from_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskStore::open(dir.path(), 1 << 20).unwrap();
    let mem = MemoryStore::new(1 << 20);
    let t = TieredStore::new(MemoryStore::new(1 << 20), disk.clone());
    for s in [&disk as &dyn Store, &mem, &t] {
        s.put(&key(1), &result(1, 100)).await.unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.bytes() > 100);
        assert!(s.remove(&key(1)).await.unwrap());
        assert!(!s.remove(&key(1)).await.unwrap(), "absent is not an error");
        assert_eq!(s.get(&key(1)).await, None);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }
    assert!(!entry_path(&disk, &key(1)).exists());
}

#[tokio::test]
async fn tiered_store_writes_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let t = TieredStore::new(
        MemoryStore::new(1 << 20),
        DiskStore::open(dir.path(), 1 << 20).unwrap(),
    );
    t.put(&key(2), &result(2, 100)).await.unwrap();
    assert_eq!(t.front().get(&key(2)).await, Some(result(2, 100)));
    assert_eq!(t.back().get(&key(2)).await, Some(result(2, 100)));
    // Too big for the front, still stored behind it and served.
    let t = TieredStore::new(MemoryStore::new(500), t.back().clone());
    t.put(&key(3), &result(3, 5000)).await.unwrap();
    assert_eq!(t.get(&key(3)).await, Some(result(3, 5000)));
}

#[tokio::test]
async fn an_entry_vanishing_under_the_store_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let a = DiskStore::open(dir.path(), 1 << 20).unwrap();
    a.put(&key(1), &result(1, 100)).await.unwrap();
    // Another process evicts it.
    std::fs::remove_file(entry_path(&a, &key(1))).unwrap();
    assert_eq!(a.get(&key(1)).await, None);
    assert_eq!(a.stats().entries, 0, "the index forgets it");
    assert_eq!(a.stats().corrupt, 0, "gone is not corrupt");
    assert!(!a.remove(&key(1)).await.unwrap());
}

#[tokio::test]
async fn oversized_entries_are_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = DiskStore::open(dir.path(), 1000).unwrap();
    let m = MemoryStore::new(1000);
    for s in [&d as &dyn Store, &m] {
        let e = s.put(&key(1), &result(1, 5000)).await.unwrap_err();
        assert!(matches!(e, StoreError::TooLarge(_)), "{e:?}");
        assert!(s.is_empty());
    }
}

#[tokio::test]
async fn start_up_cleans_old_temp_files_shrinks_to_the_limit_and_ignores_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    for n in 1..=4 {
        s.put(&key(n), &result(n, 10_000)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let root = s.root().to_path_buf();
    drop(s);
    let tmp = root.join("tmp");
    let stale = tmp.join(".tmpcrashed");
    let fresh = tmp.join(".tmpwriting");
    std::fs::write(&stale, b"half an entry").unwrap();
    std::fs::write(&fresh, b"half an entry").unwrap();
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    std::fs::File::options()
        .append(true)
        .open(&stale)
        .unwrap()
        .set_modified(day_ago)
        .unwrap();
    // Not entries: a file with a key's name in the wrong fan-out directory, a non-hex
    // name, an upper-case one.
    let misplaced = root.join("00").join(key(7).to_hex());
    std::fs::create_dir_all(misplaced.parent().unwrap()).unwrap();
    std::fs::write(&misplaced, b"x").unwrap();
    std::fs::write(misplaced.with_file_name("notes.txt"), b"x").unwrap();
    let upper = root.join("AB").join(key(0xAB).to_hex().to_uppercase());
    std::fs::create_dir_all(upper.parent().unwrap()).unwrap();
    std::fs::write(&upper, b"x").unwrap();

    // A smaller limit this time: the two oldest go.
    let s = DiskStore::open(dir.path(), 2 * ON_DISK_10K).unwrap();
    assert!(
        !stale.exists(),
        "a crashed writer's old temp file is removed"
    );
    assert!(fresh.exists(), "a live writer's temp file is left alone");
    assert_eq!(s.stats().entries, 2);
    assert_eq!(s.stats().evictions, 2);
    assert!(s.get(&key(1)).await.is_none());
    assert!(s.get(&key(2)).await.is_none());
    assert!(s.get(&key(3)).await.is_some());
    assert!(s.get(&key(4)).await.is_some());
}

/// Index rebuild time for a large cache (about 130 ms on a 2-core machine, 240 ms when
/// pinned to one core with `taskset -c 0`). Run with
/// `cargo test --release -p dcache-server --test stores -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "benchmark: writes 100,000 entries"]
async fn rebuild_100k_entries() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), u64::MAX).unwrap();
    for i in 0..100_000u32 {
        // Uniformly spread keys, like real digests: ~390 per fan-out directory.
        let k = *blake3::hash(&i.to_le_bytes()).as_bytes();
        s.put(&StoreKey(k), &result(1, 64)).await.unwrap();
    }
    drop(s);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let s = DiskStore::open(dir.path(), u64::MAX).unwrap();
        times.push(t0.elapsed());
        assert_eq!(s.stats().entries, 100_000);
    }
    times.sort();
    println!(
        "rebuild of 100,000 entries: median {:?} (of {:?})",
        times[2], times
    );
    // What the wrapper's embedded server pays instead: a lazy open, one hit, one write.
    let mut lazy = Vec::new();
    for i in 0..5u32 {
        let t0 = std::time::Instant::now();
        let s = DiskStore::open_lazy(dir.path(), u64::MAX).unwrap();
        let hit = StoreKey(*blake3::hash(&i.to_le_bytes()).as_bytes());
        assert!(s.get(&hit).await.is_some());
        let new = StoreKey(*blake3::hash(&(1_000_000 + i).to_le_bytes()).as_bytes());
        s.put(&new, &result(1, 64)).await.unwrap();
        lazy.push(t0.elapsed());
    }
    lazy.sort();
    println!(
        "lazy open + hit + write with 100,000 entries: median {:?} (of {:?})",
        lazy[2], lazy
    );
}

#[tokio::test]
async fn a_lazy_store_reads_what_others_wrote_and_keeps_each_shard_within_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let full = DiskStore::open(dir.path(), 1 << 30).unwrap();
    full.put(&key(7), &result(7, 1000)).await.unwrap();
    // 256 shards of a 4 MiB limit: 16 KiB each on disk, the directory's own block
    // included (4 KiB on ext4), so three entries of one 4 KiB block each.
    let limit = 256 * 16_384;
    let lazy = DiskStore::open_lazy(dir.path(), limit).unwrap();
    assert_eq!(lazy.stats().entries, 0, "nothing scanned at open");
    assert_eq!(lazy.get(&key(7)).await, Some(result(7, 1000)));
    // Six entries of ~3 KB into one shard (same first key byte): only three fit.
    let shard_key = |n: u8| {
        let mut k = [n; 32];
        k[0] = 0x42;
        StoreKey(k)
    };
    for n in 0..6u8 {
        lazy.put(&shard_key(n), &result(n, 3000)).await.unwrap();
        // Distinct modification times, so "oldest" is well defined.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let shard = lazy.root().join("42");
    let sizes: Vec<u64> = std::fs::read_dir(&shard)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert!(sizes.iter().sum::<u64>() <= 12_288, "{sizes:?}");
    assert_eq!(sizes.len(), 3, "{sizes:?}");
    assert_eq!(lazy.stats().evictions, 3);
    // The oldest went first; the newest are whole and verified.
    assert_eq!(lazy.get(&shard_key(0)).await, None);
    assert_eq!(lazy.get(&shard_key(5)).await, Some(result(5, 3000)));
    // Other shards were not touched, and an indexed store sees the same entries.
    assert_eq!(lazy.get(&key(7)).await, Some(result(7, 1000)));
    assert_eq!(
        DiskStore::open(dir.path(), 1 << 30)
            .unwrap()
            .stats()
            .entries,
        4
    );
}

#[tokio::test]
async fn a_lazy_store_still_drops_damaged_entries() {
    let dir = tempfile::tempdir().unwrap();
    let lazy = DiskStore::open_lazy(dir.path(), 1 << 30).unwrap();
    lazy.put(&key(3), &result(3, 5000)).await.unwrap();
    let path = entry_path(&lazy, &key(3));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(lazy.get(&key(3)).await, None);
    assert!(!path.exists(), "the torn entry was removed");
    assert_eq!(lazy.stats().corrupt, 1);
}

#[tokio::test]
async fn an_entry_planted_in_the_cache_directory_is_never_served() {
    use dcache_server::store::{SealKey, entry};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    // Someone who can write the directory but not read the secret writes a well-formed
    // entry for a key an honest client will ask for, with a guessed secret.
    for (i, compression) in [Compression::None, Compression::default()]
        .into_iter()
        .enumerate()
    {
        let forged = entry::encode(
            &SealKey::from_bytes([0; 32]),
            &key(5),
            &text_result(66, 1000),
            compression,
        )
        .unwrap();
        let path = entry_path(&s, &key(5));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &forged).unwrap();
        assert_eq!(s.get(&key(5)).await, None, "a planted entry was served");
        assert_eq!(s.stats().corrupt, i as u64 + 1);
    }
    // What the server itself wrote still verifies, also for another store on the same
    // directory (a restart, or the next wrapper process).
    s.put(&key(6), &result(6, 100)).await.unwrap();
    let again = DiskStore::open_lazy(dir.path(), 1 << 20).unwrap();
    assert_eq!(again.get(&key(6)).await, Some(result(6, 100)));
    // The secret is the server user's alone; one others could read is refused at open.
    let secret = s.root().join("secret");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = DiskStore::open(dir.path(), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

/// What `du` counts under a directory: every file's and directory's blocks.
fn du(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).unwrap();
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            total += du(&e.unwrap().path());
        }
    }
    total
}

#[tokio::test]
async fn a_lazy_store_with_a_small_limit_stays_within_it_on_disk() {
    // 300 KiB over 256 fan-out directories is about one block each: each directory's
    // share cannot hold an entry, so the store must keep the limit as a whole, counting
    // blocks and directories as du does (the 300K limit that left 1.1 MB on disk).
    let dir = tempfile::tempdir().unwrap();
    let limit = 300 * 1024;
    let s = DiskStore::open_lazy(dir.path(), limit).unwrap();
    let mut last = key(0);
    for i in 0..200u32 {
        let k = StoreKey(*blake3::hash(&i.to_le_bytes()).as_bytes());
        s.put(&k, &result((i % 250) as u8, 3000)).await.unwrap();
        last = k;
    }
    let used = du(s.root());
    assert!(
        used <= limit,
        "{used} bytes on disk for a {limit}-byte limit"
    );
    // Kept full, not emptied: at least two thirds of the limit holds entries.
    assert!(used >= limit / 3 * 2, "only {used} bytes kept of {limit}");
    assert!(s.get(&last).await.is_some(), "the newest entry was evicted");
    let usage = DiskStore::usage(dir.path()).unwrap();
    assert_eq!(usage.bytes, used, "usage() counts what du counts");
    assert!(s.stats().evictions >= 100);
}

#[tokio::test]
async fn usage_counts_entries_and_clear_removes_them_but_keeps_the_store_usable() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        DiskStore::usage(dir.path()).unwrap().entries,
        0,
        "absent is empty"
    );
    let s = DiskStore::open_lazy(dir.path(), 1 << 30).unwrap();
    for n in 1..=5 {
        s.put(&key(n), &result(n, 2000)).await.unwrap();
    }
    // Not ours: left alone by clear.
    let stranger = s.root().join("README");
    std::fs::write(&stranger, b"keep me").unwrap();
    let usage = DiskStore::usage(dir.path()).unwrap();
    assert_eq!(usage.entries, 5);
    assert_eq!(usage.bytes, du(s.root()));
    assert_eq!(DiskStore::clear(dir.path()).unwrap(), 5);
    assert_eq!(DiskStore::usage(dir.path()).unwrap().entries, 0);
    assert!(stranger.exists());
    assert_eq!(s.get(&key(1)).await, None);
    // The same store, and a new one (same secret), write and read again.
    s.put(&key(9), &result(9, 100)).await.unwrap();
    let again = DiskStore::open_lazy(dir.path(), 1 << 30).unwrap();
    assert_eq!(again.get(&key(9)).await, Some(result(9, 100)));
}

// Compressed entries (issue 18): every format documented in `store::entry` is written
// here byte for byte, so these tests also pin the format down.

/// The seal of the store rooted at `root` (the server's own user may read it).
fn secret_of(store: &DiskStore) -> [u8; 32] {
    std::fs::read(store.root().join("secret"))
        .unwrap()
        .try_into()
        .unwrap()
}

fn version_of(path: &std::path::Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    u16::from_be_bytes([bytes[4], bytes[5]])
}

/// The body of an entry, as `store::entry` documents it.
fn body_bytes(r: &JobResult) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&r.exit_code.to_be_bytes());
    b.extend_from_slice(&(r.stdout.len() as u64).to_be_bytes());
    b.extend_from_slice(&r.stdout);
    b.extend_from_slice(&(r.stderr.len() as u64).to_be_bytes());
    b.extend_from_slice(&r.stderr);
    b.extend_from_slice(&(r.outputs.len() as u16).to_be_bytes());
    for o in &r.outputs {
        b.extend_from_slice(&(o.name.len() as u16).to_be_bytes());
        b.extend_from_slice(o.name.as_bytes());
        b.extend_from_slice(&(o.data.len() as u64).to_be_bytes());
        b.extend_from_slice(&o.data);
    }
    b
}

fn body_mac(secret: &[u8; 32], k: &StoreKey, body: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new_keyed(secret)
        .update(&k.0)
        .update(body)
        .finalize()
        .as_bytes()
}

/// A version-3 (compressed) entry, sealed with `secret`: `declared` is the body length
/// its header claims, `stored` the zstd payload, `mac` the body mac it carries.
fn packed_entry(
    secret: &[u8; 32],
    k: &StoreKey,
    declared: u64,
    mac: [u8; 32],
    stored: &[u8],
) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"DCE1");
    e.extend_from_slice(&3u16.to_be_bytes());
    e.extend_from_slice(&k.0);
    e.push(1); // zstd
    e.extend_from_slice(&declared.to_be_bytes());
    e.extend_from_slice(&(stored.len() as u64).to_be_bytes());
    e.extend_from_slice(&mac);
    let seal = blake3::Hasher::new_keyed(secret)
        .update(b"dcache entry v3 seal\0")
        .update(&e)
        .update(stored)
        .finalize();
    e.extend_from_slice(seal.as_bytes());
    e.extend_from_slice(stored);
    e
}

fn plant(store: &DiskStore, k: &StoreKey, bytes: &[u8]) -> std::path::PathBuf {
    let path = entry_path(store, k);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn compressed_entries_round_trip_take_less_disk_and_mix_with_plain_ones() {
    let (zdir, pdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let z = DiskStore::open(zdir.path(), 1 << 30).unwrap();
    let p = DiskStore::open_with(pdir.path(), 1 << 30, Compression::None).unwrap();
    assert_eq!(z.compression(), Compression::default());
    let r = text_result(1, 200_000);
    z.put(&key(1), &r).await.unwrap();
    p.put(&key(1), &r).await.unwrap();
    assert_eq!(z.get(&key(1)).await, Some(r.clone()));
    assert_eq!(p.get(&key(1)).await, Some(r.clone()));
    assert_eq!(version_of(&entry_path(&z, &key(1))), 3, "compressed");
    assert_eq!(version_of(&entry_path(&p, &key(1))), 2, "compression off");
    let (zs, ps) = (z.stats().bytes, p.stats().bytes);
    assert!(zs * 3 < ps, "compressed {zs} bytes on disk, plain {ps}");
    assert_eq!(
        z.tiers()[0].bytes_read,
        zs,
        "the disk tier counts what it read"
    );
    // Whatever a store writes, it reads the other form: the setting can change.
    let zp = DiskStore::open_lazy_with(zdir.path(), 1 << 30, Compression::None).unwrap();
    assert_eq!(zp.get(&key(1)).await, Some(r.clone()));
    let pz = DiskStore::open_lazy(pdir.path(), 1 << 30).unwrap();
    assert_eq!(pz.get(&key(1)).await, Some(r.clone()));
    // Incompressible data is stored as it is, not grown by a frame.
    z.put(&key(2), &result(2, 20_000)).await.unwrap();
    assert_eq!(version_of(&entry_path(&z, &key(2))), 2);
    assert_eq!(z.get(&key(2)).await, Some(result(2, 20_000)));
    // The memory tier over it keeps the result decompressed: its size is the result's.
    let t = TieredStore::new(MemoryStore::new(1 << 30), z.clone());
    assert_eq!(t.get(&key(1)).await, Some(r.clone()));
    assert!(t.front().stats().bytes >= r.body_len());
    assert_eq!(t.front().get(&key(1)).await, Some(r));
}

#[tokio::test]
async fn an_old_uncompressed_entry_written_byte_for_byte_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    let secret = secret_of(&s);
    let r = text_result(7, 5000);
    let body = body_bytes(&r);
    // Version 2, as every entry was written before compression.
    let mut old = Vec::new();
    old.extend_from_slice(b"DCE1");
    old.extend_from_slice(&2u16.to_be_bytes());
    old.extend_from_slice(&key(7).0);
    old.extend_from_slice(&(body.len() as u64).to_be_bytes());
    old.extend_from_slice(&body_mac(&secret, &key(7), &body));
    old.extend_from_slice(&body);
    let path = plant(&s, &key(7), &old);
    assert_eq!(s.get(&key(7)).await, Some(r.clone()));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        old,
        "read as it is, not rewritten"
    );
    // And after a restart (the index rebuilt from the files).
    let again = DiskStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(again.stats().entries, 1);
    assert_eq!(again.get(&key(7)).await, Some(r));
    assert_eq!(again.stats().corrupt, 0);
}

#[tokio::test]
async fn a_damaged_compressed_payload_is_a_miss_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 20).unwrap();
    let secret = secret_of(&s);
    let r = text_result(3, 50_000);
    let body = body_bytes(&r);
    s.put(&key(3), &r).await.unwrap();
    let good = std::fs::read(entry_path(&s, &key(3))).unwrap();
    assert_eq!(version_of(&entry_path(&s, &key(3))), 3);
    let header = 4 + 2 + 32 + 1 + 8 + 8 + 32 + 32;
    let stored = good[header..].to_vec();
    let mac = body_mac(&secret, &key(3), &body);
    // Re-sealed with the store's own secret, so each damage reaches the decompressor or
    // the check after it, not only the seal.
    let mut flipped = stored.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let mut other = body.clone();
    other[100] ^= 1;
    let other_frame = zstd::bulk::compress(&other, 1).unwrap();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("a bit flipped, not re-sealed", {
            let mut d = good.clone();
            let i = d.len() - 20;
            d[i] ^= 1;
            d
        }),
        (
            "a bit flipped in the frame",
            packed_entry(&secret, &key(3), body.len() as u64, mac, &flipped),
        ),
        (
            "the frame cut short",
            packed_entry(
                &secret,
                &key(3),
                body.len() as u64,
                mac,
                &stored[..stored.len() - 3],
            ),
        ),
        (
            "another body's frame (the mac after decompression)",
            packed_entry(&secret, &key(3), body.len() as u64, mac, &other_frame),
        ),
        (
            "garbage for a frame",
            packed_entry(&secret, &key(3), body.len() as u64, mac, &[0x55; 64]),
        ),
    ];
    assert_eq!(
        packed_entry(&secret, &key(3), body.len() as u64, mac, &stored),
        good,
        "the format as documented"
    );
    for (i, (what, bytes)) in damages.into_iter().enumerate() {
        let path = plant(&s, &key(3), &bytes);
        assert_eq!(s.get(&key(3)).await, None, "{what}: served");
        assert!(!path.exists(), "{what}: left on disk");
        assert_eq!(s.stats().corrupt, i as u64 + 1, "{what}");
    }
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// One zstd frame that inflates to `blocks` × 128 KiB of zeros (RLE blocks, four bytes
/// each) while its header declares `declared` bytes of content.
fn rle_bomb(declared: u64, blocks: usize) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
    f.push(0b1100_0000); // 8-byte content size, a window descriptor, no checksum
    f.push(7 << 3); // window 2^17 = 128 KiB
    f.extend_from_slice(&declared.to_le_bytes());
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let header = ((128u32 << 10) << 3) | (1 << 1) | last; // RLE block of 128 KiB
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

#[tokio::test]
async fn a_zip_bomb_is_a_miss_without_a_big_allocation() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), 1 << 30).unwrap();
    let secret = secret_of(&s);
    let mac = [0u8; 32];
    // 65,536 blocks: 8 GiB of zeros from 256 KiB. Proof that it is a real bomb: a plain
    // streaming decoder gives far more than any claim below.
    let blocks = 65_536;
    let bomb = rle_bomb(1 << 20, blocks);
    let mut probe = Vec::new();
    zstd::stream::read::Decoder::new(&bomb[..])
        .unwrap()
        .take(100 << 20)
        .read_to_end(&mut probe)
        .unwrap();
    assert_eq!(probe.len(), 100 << 20, "the bomb inflates past 100 MiB");
    drop(probe);
    let before = peak_rss();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // The entry and its frame both claim 1 MiB (within the one-pass ratio).
        (
            "claims 1 MiB, inflates to 8 GiB",
            packed_entry(&secret, &key(1), 1 << 20, mac, &bomb),
        ),
        // A claim far past the frame's size: the stepwise decoder, cut at the claim.
        (
            "claims 64 MiB, inflates to 8 GiB",
            packed_entry(&secret, &key(2), 64 << 20, mac, &rle_bomb(64 << 20, blocks)),
        ),
        // Past the limit on a body (1 GiB): refused unread.
        (
            "claims 1 TiB",
            packed_entry(&secret, &key(3), 1 << 40, mac, &rle_bomb(1 << 40, blocks)),
        ),
        // A frame that claims 8 GiB under an entry claiming 1 MiB.
        (
            "frame and entry disagree",
            packed_entry(&secret, &key(4), 1 << 20, mac, &rle_bomb(8 << 30, blocks)),
        ),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let k = key(i as u8 + 1);
        let path = plant(&s, &k, &bytes);
        assert_eq!(s.get(&k).await, None, "{what}: served");
        assert!(!path.exists(), "{what}: left on disk");
    }
    assert_eq!(s.stats().corrupt, 4);
    // The decompressed claims are held at most (64 MiB); the bombs' 8 GiB never are.
    let grew = peak_rss().saturating_sub(before);
    assert!(grew < 512 << 20, "peak memory grew by {grew} bytes");
}

#[tokio::test]
async fn the_size_limit_counts_compressed_bytes_and_evicts_by_them() {
    const RAW: usize = 200_000;
    // What one compressed entry of 200 KB of text takes on disk, measured here.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = DiskStore::open(probe_dir.path(), 1 << 30).unwrap();
    probe.put(&key(0), &text_result(0, RAW)).await.unwrap();
    let one = probe.stats().bytes;
    assert!(
        one * 4 < RAW as u64,
        "200 KB of text took {one} bytes on disk"
    );

    // Room for five such entries; their raw size is five times the limit and more.
    let limit = 5 * one + one / 2;
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), limit).unwrap();
    for n in 1..=8 {
        s.put(&key(n), &text_result(n, RAW)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let st = s.stats();
    assert_eq!(st.entries, 5, "{st:?}");
    assert_eq!(st.evictions, 3);
    assert!(st.bytes <= limit);
    for n in 1..=3 {
        assert_eq!(s.get(&key(n)).await, None, "{n} was among the oldest");
    }
    for n in 4..=8 {
        assert_eq!(s.get(&key(n)).await, Some(text_result(n, RAW)));
    }
    // Uncompressed, one entry alone is over that limit.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = DiskStore::open_with(plain_dir.path(), limit, Compression::None).unwrap();
    assert!(matches!(
        plain.put(&key(1), &text_result(1, RAW)).await,
        Err(StoreError::TooLarge(_))
    ));
    // The same holds for a lazy store (the wrapper's), which counts files on disk.
    let lazy_dir = tempfile::tempdir().unwrap();
    let lazy = DiskStore::open_lazy(lazy_dir.path(), 1 << 20).unwrap();
    lazy.put(&key(1), &text_result(1, RAW)).await.unwrap();
    assert_eq!(DiskStore::usage(lazy_dir.path()).unwrap().entries, 1);
    assert!(du(&entry_path(&lazy, &key(1))) * 4 < RAW as u64);
}

#[tokio::test]
async fn a_file_longer_than_any_entry_is_dropped_unread() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 << 10;
    let s = DiskStore::open(dir.path(), limit).unwrap();
    // Longer than the store's whole limit: not an entry this store wrote.
    let f = std::fs::File::create({
        let p = entry_path(&s, &key(1));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    })
    .unwrap();
    f.set_len(limit + 1).unwrap();
    drop(f);
    assert_eq!(s.get(&key(1)).await, None);
    assert!(!entry_path(&s, &key(1)).exists());
    assert_eq!(s.stats().corrupt, 1);
}
