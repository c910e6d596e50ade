//! A content-addressed store on disk.
//!
//! Layout: `DIR/v1/ab/abcdef…` (the key in hex, fanned out by its first byte), temporary
//! files in `DIR/v1/tmp/`. A write goes to a temporary file that is renamed into place, so
//! a reader never sees half an entry; every read verifies the entry's digest, so a torn or
//! damaged file (a crash, a full disk, bit rot) is removed and counts as a miss. Several
//! server processes may share one directory: renames are atomic, and a file another process
//! evicted is simply a miss.
//!
//! Entries are compressed with zstd unless told otherwise ([`Compression`]; a store reads
//! compressed and uncompressed entries alike, whatever it writes), and a read inflates no
//! body past [`entry::DEFAULT_MAX_BODY`] and reads no file longer than an entry can be.
//!
//! Sizes are what the files take on disk (their blocks, as `du` counts), not their
//! lengths: with 4 KiB blocks a 1.7 KiB object costs 4 KiB, and a limit counted in lengths
//! would let a cache of small objects take twice its limit or more.
//!
//! The LRU index lives in memory and is rebuilt on start from the files' sizes and
//! modification times (a hit refreshes the time, so the order survives restarts). The
//! rebuild reads directory listings and one `stat` per entry, never the entries themselves
//! (they are verified when read), spread over the cores: 100,000 entries take about 130 ms
//! on two cores (`rebuild_100k_entries` in `tests/stores.rs`).
//!
//! Entries are not `fsync`ed: after a power cut a renamed file may be empty or torn, which
//! the digest check turns into a miss. Durability is not worth a sync per compile for a
//! cache whose every entry can be rebuilt.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dcache_proto::JobResult;

use super::codec::Compression;
use super::lru::Lru;
use super::seal::SealKey;
use super::{Store, StoreError, StoreKey, StoreStats, TierStats, entry};

/// Temporary files older than this at start-up were left by a crashed writer.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Results as files in a directory, up to a byte limit.
#[derive(Debug, Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The secret every entry of this directory is sealed with.
    seal: SealKey,
    root: PathBuf,
    limit: u64,
    /// How entries are written.
    compression: Compression,
    /// Largest body (decompressed) written or read.
    max_body: u64,
    /// Opened with [`DiskStore::open_lazy`]: no index of the whole directory; the size
    /// limit is kept one fan-out directory at a time.
    lazy: bool,
    state: Mutex<State>,
}

/// Fan-out directories: one per first byte of the key.
const SHARDS: u64 = 256;

#[derive(Debug, Default)]
struct State {
    lru: Lru,
    evictions: u64,
    corrupt: u64,
    write_errors: u64,
    hits: u64,
    misses: u64,
    bytes_read: u64,
    bytes_written: u64,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections are map updates that cannot panic halfway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &StoreKey) -> PathBuf {
        let hex = key.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The file's bytes, if it is there and no longer than an entry of this store can be
    /// (`Err(true)`: longer, so not ours to read).
    fn read(&self, path: &Path) -> Result<Vec<u8>, bool> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|_| false)?;
        let len = f.metadata().map_err(|_| false)?.len();
        if len > self.limit.min(entry::max_entry_len(self.max_body)) {
            return Err(true);
        }
        let mut data = Vec::with_capacity(usize::try_from(len).map_err(|_| true)?);
        // One byte more than it had: a file growing meanwhile is refused, not read on.
        f.take(len + 1).read_to_end(&mut data).map_err(|_| false)?;
        Ok(data)
    }

    fn get(&self, key: &StoreKey) -> Option<JobResult> {
        let path = self.path(key);
        let decoded = match self.read(&path) {
            Ok(data) => {
                let len = data.len() as u64;
                entry::decode(&self.seal, key, Bytes::from(data), self.max_body).map(|r| (r, len))
            }
            Err(true) => Err(entry::EntryError::Truncated),
            Err(false) => {
                // Gone (evicted by another process, or never there).
                let mut st = self.lock();
                st.lru.remove(key);
                st.misses += 1;
                return None;
            }
        };
        match decoded {
            Ok((result, len)) => {
                // Refresh the time so the LRU order survives a restart; best effort.
                let mut size = len;
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                    size = f.metadata().map_or(len, |m| disk_usage(&m));
                }
                let mut st = self.lock();
                st.hits += 1;
                st.bytes_read += size;
                if st.lru.contains(key) {
                    st.lru.touch(key);
                } else {
                    st.lru.insert(*key, size);
                }
                Some(result)
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                let mut st = self.lock();
                st.lru.remove(key);
                st.corrupt += 1;
                st.misses += 1;
                None
            }
        }
    }

    fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        if value.body_len() > self.max_body {
            // Could not be read back.
            return Err(StoreError::TooLarge(value.body_len()));
        }
        let data = entry::encode(&self.seal, key, value, self.compression)?;
        let len = data.len() as u64;
        if len > self.limit {
            return Err(StoreError::TooLarge(len));
        }
        let path = self.path(key);
        let write = || -> std::io::Result<u64> {
            let parent = path.parent().unwrap_or(&self.root);
            std::fs::create_dir_all(parent)?;
            let mut tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())?;
            tmp.write_all(&data)?;
            let size = tmp.as_file().metadata().map_or(len, |m| disk_usage(&m));
            if let Err(e) = tmp.persist(&path) {
                // Another process's eviction may have removed the emptied fan-out
                // directory between our mkdir and the rename: make it again, once.
                if e.error.kind() != std::io::ErrorKind::NotFound {
                    return Err(e.error);
                }
                std::fs::create_dir_all(parent)?;
                e.file.persist(&path).map_err(|e| e.error)?;
            }
            Ok(size)
        };
        let size = match write() {
            Ok(size) => size,
            Err(e) => {
                self.lock().write_errors += 1;
                return Err(e.into());
            }
        };
        self.lock().bytes_written += size;
        if self.lazy {
            self.lock().lru.insert(*key, size);
            if !self.evict_shard(key) {
                // The entry alone is larger than its directory's share (a small limit,
                // or a huge object): only a look at the whole store keeps the limit.
                self.evict_global(Some(key));
            }
            // A lazy store never scans at start, so one write in 256 sweeps up after
            // crashed writers instead.
            if key.0[0] == 0 {
                let _ = self.sweep_stale_tmp();
            }
            return Ok(());
        }
        let victims = {
            let mut st = self.lock();
            st.lru.insert(*key, size);
            let mut victims = Vec::new();
            while st.lru.bytes() > self.limit {
                let Some(old) = st.lru.oldest() else { break };
                st.lru.remove(&old);
                st.evictions += 1;
                victims.push(old);
            }
            victims
        };
        for old in victims {
            let _ = std::fs::remove_file(self.path(&old));
        }
        Ok(())
    }
}

impl Inner {
    /// Keeps the fan-out directory `key` went into within its share of the limit, oldest
    /// (least recently used) entries first; never the entry just written. Keys are uniform
    /// hashes, so the directories fill evenly and the total stays near the limit, while a
    /// write costs a listing of 1/256 of the store instead of all of it. The share counts
    /// what the directory takes on disk: its files' blocks and its own. Returns whether
    /// the directory is within its share afterwards (false when the new entry alone
    /// exceeds it).
    fn evict_shard(&self, key: &StoreKey) -> bool {
        let hex = key.to_hex();
        let Some(prefix) = hex.get(..2) else {
            return true;
        };
        let dir = self.root.join(prefix);
        let mut found = scan(&[(prefix.to_owned(), dir.clone())]);
        found.sort_unstable_by_key(|(t, k, _)| (*t, *k));
        let budget = (self.limit / SHARDS).max(1);
        let mut total: u64 = found.iter().map(|(_, _, size)| size).sum::<u64>() + dir_usage(&dir);
        for (_, old, size) in found {
            if total <= budget {
                break;
            }
            if old == *key {
                continue;
            }
            self.evict(&old);
            total -= size;
        }
        total <= budget
    }

    /// Keeps the whole store within the limit, counting everything under its root as it
    /// sits on disk (entries, the fan-out directories, the temporary directory, the
    /// secret): the least recently used entries go first, never `keep`, and fan-out
    /// directories left empty are removed (each costs a block of its own). Costs a
    /// listing of every directory, so it runs only when one directory's share cannot
    /// hold the entry just written: with a small limit, where the store is small too.
    fn evict_global(&self, keep: Option<&StoreKey>) {
        let (dirs, overhead) = fanout_dirs(&self.root);
        let mut found = scan(&dirs);
        found.sort_unstable_by_key(|(t, k, _)| (*t, *k));
        // Entries left in each fan-out directory: the last one out takes the
        // directory's own block with it.
        let mut left: std::collections::HashMap<u8, (usize, u64)> = dirs
            .iter()
            .filter_map(|(name, d)| Some((u8::from_str_radix(name, 16).ok()?, (0, dir_usage(d)))))
            .collect();
        for (_, k, _) in &found {
            if let Some((n, _)) = left.get_mut(&k.0[0]) {
                *n += 1;
            }
        }
        let dir_size: u64 = left.values().map(|(_, size)| size).sum();
        let mut total = found.iter().map(|(_, _, size)| size).sum::<u64>() + dir_size + overhead;
        for (_, old, size) in found {
            if total <= self.limit {
                break;
            }
            if Some(&old) == keep {
                continue;
            }
            self.evict(&old);
            total -= size;
            if let Some((n, dir)) = left.get_mut(&old.0[0]) {
                *n -= 1;
                // Fails, harmlessly, if another process has just written into it.
                if *n == 0 && std::fs::remove_dir(self.root.join(&old.to_hex()[..2])).is_ok() {
                    total = total.saturating_sub(*dir);
                }
            }
        }
    }

    /// Removes one entry to make room, counting it.
    fn evict(&self, old: &StoreKey) {
        if std::fs::remove_file(self.path(old)).is_ok() {
            let mut st = self.lock();
            st.lru.remove(old);
            st.evictions += 1;
        }
    }

    fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.lock().lru.remove(key);
        match std::fs::remove_file(self.path(key)) {
            Ok(()) => Ok(true),
            // Already gone (never there, or another process evicted it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl DiskStore {
    /// Opens (creating if needed) a store in `dir` holding at most `limit` bytes, and
    /// rebuilds its index from the files there. Writes entries compressed at the default
    /// level.
    pub fn open(dir: &Path, limit: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, limit, Compression::default())
    }

    /// [`open`](Self::open), writing entries as `compression` says. `limit` counts what
    /// the (compressed) files take on disk.
    pub fn open_with(dir: &Path, limit: u64, compression: Compression) -> Result<Self, StoreError> {
        let root = dir.join("v1");
        std::fs::create_dir_all(root.join("tmp"))?;
        let inner = Inner {
            seal: SealKey::load_or_create(&root)?,
            root,
            limit,
            compression,
            max_body: entry::DEFAULT_MAX_BODY,
            lazy: false,
            state: Mutex::new(State::default()),
        };
        inner.rebuild()?;
        let store = Self {
            inner: Arc::new(inner),
        };
        // A directory that was over the limit (a smaller limit this time) shrinks now.
        store.inner.evict_to_limit();
        Ok(store)
    }

    /// Opens (creating if needed) a store in `dir` without reading what is there: for a
    /// short-lived process that serves a compile or two (the wrapper's embedded server),
    /// where a scan of the whole directory on every start would cost more than the
    /// compile. Reads find entries by name as always; each write scans only the fan-out
    /// directory it went into and keeps that within 1/256 of `limit` (the directory's
    /// own block included); when the entry alone is larger than that share (a small
    /// limit), the write evicts over the whole store instead, which then is small, and
    /// removes fan-out directories it empties. Its counters cover
    /// only what this process saw. Shares a directory safely with [`open`](Self::open).
    /// Writes entries compressed at the default level.
    pub fn open_lazy(dir: &Path, limit: u64) -> Result<Self, StoreError> {
        Self::open_lazy_with(dir, limit, Compression::default())
    }

    /// [`open_lazy`](Self::open_lazy), writing entries as `compression` says.
    pub fn open_lazy_with(
        dir: &Path,
        limit: u64,
        compression: Compression,
    ) -> Result<Self, StoreError> {
        let root = dir.join("v1");
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                seal: SealKey::load_or_create(&root)?,
                root,
                limit,
                compression,
                max_body: entry::DEFAULT_MAX_BODY,
                lazy: true,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The directory entries live in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// How this store writes entries.
    pub fn compression(&self) -> Compression {
        self.inner.compression
    }

    /// What the store in `dir` (the directory given to [`open`](Self::open)) holds, as
    /// `du` would count it, without opening it (no secret is created, nothing is
    /// indexed): for a cache's owner asking how full it is. An absent store is empty.
    pub fn usage(dir: &Path) -> std::io::Result<DiskUsage> {
        let root = dir.join("v1");
        if !root.try_exists()? {
            return Ok(DiskUsage::default());
        }
        let (dirs, overhead) = fanout_dirs(&root);
        let found = scan(&dirs);
        let dir_size: u64 = dirs.iter().map(|(_, d)| dir_usage(d)).sum();
        Ok(DiskUsage {
            entries: found.len() as u64,
            bytes: found.iter().map(|(_, _, size)| size).sum::<u64>() + dir_size + overhead,
        })
    }

    /// Shrinks the store in `dir` to `limit` bytes on disk now, least recently used
    /// entries first, as a write would (for a limit just lowered: `dcache --max-size`).
    /// Returns how many entries went.
    pub fn trim(dir: &Path, limit: u64) -> Result<u64, StoreError> {
        let store = Self::open_lazy(dir, limit)?;
        store.inner.evict_global(None);
        Ok(store.inner.lock().evictions)
    }

    /// Removes every entry of the store in `dir` and the fan-out directories that held
    /// them; keeps the secret, so stores open on the directory meanwhile go on working
    /// (what they had indexed is then simply missing). Returns how many entries went.
    /// Only names the store itself writes are removed: anything else found there stays.
    pub fn clear(dir: &Path) -> std::io::Result<u64> {
        let root = dir.join("v1");
        if !root.try_exists()? {
            return Ok(0);
        }
        let (dirs, _) = fanout_dirs(&root);
        let mut removed = 0;
        for hex in scan(&dirs).into_iter().map(|(_, k, _)| k.to_hex()) {
            match std::fs::remove_file(root.join(&hex[..2]).join(&hex)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for (_, d) in dirs {
            let _ = std::fs::remove_dir(d);
        }
        Ok(removed)
    }
}

/// What a store directory takes on disk (see [`DiskStore::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes on disk: the entries' blocks, the directories', the secret's.
    pub bytes: u64,
}

impl Inner {
    /// Removes temporary files a crashed writer left (old enough that no live writer
    /// can still own them).
    fn sweep_stale_tmp(&self) -> std::io::Result<()> {
        let now = SystemTime::now();
        for tmp in std::fs::read_dir(self.tmp_dir())?.flatten() {
            let old = tmp
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TMP);
            if old {
                let _ = std::fs::remove_file(tmp.path());
            }
        }
        Ok(())
    }

    fn rebuild(&self) -> std::io::Result<()> {
        self.sweep_stale_tmp()?;
        let (fanout, _) = fanout_dirs(&self.root);
        // One stat per entry dominates; spread the fan-out directories over the cores.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let per = fanout.len().div_ceil(threads).max(1);
        let mut found: Vec<(Duration, StoreKey, u64)> = std::thread::scope(|scope| {
            let workers: Vec<_> = fanout
                .chunks(per)
                .map(|dirs| scope.spawn(move || scan(dirs)))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        found.sort_unstable_by_key(|(t, k, _)| (*t, *k));
        let mut st = self.lock();
        for (age, (_, key, size)) in found.into_iter().enumerate() {
            st.lru.insert_aged(key, size, age as u64 + 1);
        }
        Ok(())
    }

    fn evict_to_limit(&self) {
        let mut victims = Vec::new();
        {
            let mut st = self.lock();
            while st.lru.bytes() > self.limit {
                let Some(old) = st.lru.oldest() else { break };
                st.lru.remove(&old);
                st.evictions += 1;
                victims.push(old);
            }
        }
        for old in victims {
            let _ = std::fs::remove_file(self.path(&old));
        }
    }
}

/// The entries in some fan-out directories: (modification time, key, size). A directory
/// or file that vanishes meanwhile (another process evicting) is skipped; a file whose name
/// is not a key, or that sits in the wrong fan-out directory, is not ours and is ignored.
fn scan(dirs: &[(String, PathBuf)]) -> Vec<(Duration, StoreKey, u64)> {
    let mut found = Vec::new();
    for (prefix, dir) in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for f in entries.flatten() {
            let name = f.file_name();
            let Some(key) = name
                .to_str()
                .filter(|n| n.starts_with(prefix.as_str()))
                .and_then(parse_hex_key)
            else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or_default();
            found.push((mtime, key, disk_usage(&meta)));
        }
    }
    found
}

/// What a file or directory takes on disk: its allocated blocks (what `du` counts),
/// at least its length (a file system that reports no blocks still pays for the bytes).
fn disk_usage(meta: &std::fs::Metadata) -> u64 {
    (meta.blocks() * 512).max(meta.len())
}

fn dir_usage(dir: &Path) -> u64 {
    std::fs::symlink_metadata(dir).map_or(0, |m| disk_usage(&m))
}

/// The fan-out directories under `root` (name, path), and what everything else under
/// it takes on disk (the root itself, the temporary directory and its files, the
/// secret), not following links.
fn fanout_dirs(root: &Path) -> (Vec<(String, PathBuf)>, u64) {
    let mut fanout = Vec::new();
    let mut overhead = dir_usage(root);
    let Ok(entries) = std::fs::read_dir(root) else {
        return (fanout, overhead);
    };
    for sub in entries.flatten() {
        let name = sub.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(meta) = sub.metadata() else { continue };
        if name.len() == 2 && meta.is_dir() {
            fanout.push((name.to_owned(), sub.path()));
            continue;
        }
        overhead += disk_usage(&meta);
        if meta.is_dir() {
            if let Ok(files) = std::fs::read_dir(sub.path()) {
                overhead += files
                    .flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| disk_usage(&m))
                    .sum::<u64>();
            }
        }
    }
    (fanout, overhead)
}

fn parse_hex_key(name: &str) -> Option<StoreKey> {
    // Exactly what `to_hex` writes, so the key maps back to this very file.
    if name.len() != 64 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(StoreKey(key))
}

#[async_trait::async_trait]
impl Store for DiskStore {
    async fn get(&self, key: &StoreKey) -> Option<JobResult> {
        let inner = self.inner.clone();
        let key = *key;
        tokio::task::spawn_blocking(move || inner.get(&key))
            .await
            .ok()
            .flatten()
    }

    async fn put(&self, key: &StoreKey, value: &JobResult) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let key = *key;
        let value = value.clone();
        tokio::task::spawn_blocking(move || inner.put(&key, &value))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let key = *key;
        tokio::task::spawn_blocking(move || inner.remove(&key))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Writes and removes a small file where entries are written first, so a directory
    /// that is gone, read-only, full or replaced by a file reports not ready (a check
    /// of permission bits alone would pass as root).
    async fn ready(&self) -> Result<(), String> {
        let tmp = self.inner.root.join("tmp");
        let probe = tmp.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = tempfile::Builder::new()
                .prefix(".ready")
                .tempfile_in(&probe)?;
            f.write_all(b"ready")?;
            f.as_file().sync_data()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        written.map_err(|e| format!("disk cache {} is not writable: {e}", tmp.display()))
    }

    fn stats(&self) -> StoreStats {
        let st = self.inner.lock();
        StoreStats {
            entries: st.lru.len(),
            bytes: st.lru.bytes(),
            evictions: st.evictions,
            corrupt: st.corrupt,
            write_errors: st.write_errors,
        }
    }

    fn tiers(&self) -> Vec<TierStats> {
        let st = self.inner.lock();
        vec![TierStats {
            name: "disk",
            hits: st.hits,
            misses: st.misses,
            errors: st.write_errors,
            refused: st.corrupt,
            bytes_read: st.bytes_read,
            bytes_written: st.bytes_written,
            entries: st.lru.len(),
            bytes: st.lru.bytes(),
            limit: self.inner.limit,
            evictions: st.evictions,
        }]
    }
}
