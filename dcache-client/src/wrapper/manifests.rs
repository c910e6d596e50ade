//! Where direct mode keeps its manifests: a directory of its own under `DCACHE_DIR`, one
//! file per [`DirectKey`], on the client's side whatever back end compiles.
//!
//! A manifest is the wrapper's own record (which files a compile read, and the cache key
//! its preprocessed source had), not a compile's result, so it is not kept in a result
//! store: it is the same whether jobs go to the embedded server or to remote ones, and
//! needs nothing from `dcache-server`.
//!
//! What the store promises, and how:
//! - **A reader sees a whole file or none.** Each write goes to a temporary file in the
//!   same directory, which is then renamed over the old one; concurrent writers of one
//!   key each rename a whole file, and the last one wins (the update it overwrote costs a
//!   preprocessor run later, never a wrong result).
//! - **What is read is trusted no further than its digest.** Every file carries a BLAKE3
//!   digest of its key and contents, checked on read; a truncated, corrupted, foreign or
//!   misplaced file (one copied under another key's name) is a miss, never an error and
//!   never another compile's key. What passes the check is still parsed by a bounded
//!   reader ([`Manifest::decode`]), and its entries are used only when every file they
//!   list hashes as recorded ([`Manifest::find_current`]).
//! - **It stays bounded.** About one write in [`SWEEP_ONE_IN`] (every write when the
//!   limit is under [`ALWAYS_SWEEP_BELOW`]) scans the directory and,
//!   when it holds more than [`ManifestLimits`] allows, removes the least recently used
//!   files (by modification time, which a hit refreshes) down to nine tenths of the
//!   limits; it also removes temporary files a crashed writer left behind.
//!
//! Manifests written by earlier versions into the embedded cache's disk store are not
//! read: they are a miss, and age out of that store like any unused entry.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::direct::{DirectKey, Manifest};

/// The first bytes of every manifest file: the format, so a later one can change it.
const MAGIC: &[u8; 8] = b"DCMANIF1";

/// Length of the header: [`MAGIC`], then the 32-byte digest.
const HEADER: usize = MAGIC.len() + 32;

/// Largest manifest file read or written. A manifest holds at most sixteen entries; even
/// with thousands of headers each it stays well under this, and a file over it is not
/// read into memory at all.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// About one write in this many sweeps the directory: often enough to keep it near its
/// limits, rarely enough that a write does not pay for a directory scan.
pub const SWEEP_ONE_IN: u8 = 32;

/// A store whose byte limit is at most this is swept on every write (at most a few
/// hundred files to list).
pub const ALWAYS_SWEEP_BELOW: u64 = 1 << 20;

/// Temporary files older than this are a crashed writer's leftovers, removed by a sweep.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Prefix of temporary files: never a manifest's name (those are 64 hex digits).
const TEMP_PREFIX: &str = ".tmp-";

/// How much the store may hold before a sweep removes the least recently used manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestLimits {
    /// Most manifest files kept.
    pub max_files: usize,
    /// Most bytes of manifest files kept.
    pub max_bytes: u64,
}

impl ManifestLimits {
    /// The limits beside a results cache of `cache_size` bytes (`DCACHE_CACHE_SIZE`):
    /// a tenth of it (at least 1 MiB), and 100 000 files. Manifests are small next to
    /// objects, so this keeps one for every compile of a large tree without letting
    /// them crowd the results they point at.
    pub fn for_cache_size(cache_size: u64) -> Self {
        Self {
            max_files: 100_000,
            max_bytes: (cache_size / 10).max(1 << 20),
        }
    }
}

/// Why a manifest was not stored. The wrapper only logs it: an unstored manifest costs
/// a preprocessor run next time.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestStoreError {
    /// The manifest is larger than [`MAX_FILE_BYTES`], so no reader would accept it.
    #[error("manifest of {len} bytes is over the {MAX_FILE_BYTES}-byte limit")]
    TooLarge {
        /// Its encoded length.
        len: u64,
    },
    /// The directory or file could not be created, written or renamed into place.
    #[error("writing manifest in {}: {source}", dir.display())]
    Write {
        /// The store's directory.
        dir: PathBuf,
        /// What the filesystem reported.
        source: std::io::Error,
    },
}

/// A directory of manifests keyed by [`DirectKey`]. Creating one touches nothing on disk:
/// the directory is made by the first write, and a missing directory is a miss.
#[derive(Clone, Debug)]
pub struct ManifestStore {
    dir: PathBuf,
    limits: ManifestLimits,
}

impl ManifestStore {
    /// The store in `dir` (the wrapper's is `DCACHE_DIR/manifests`), kept within `limits`.
    pub fn new(dir: PathBuf, limits: ManifestLimits) -> Self {
        Self { dir, limits }
    }

    /// The directory the store keeps its files in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `key`'s manifest.
    fn path(&self, key: &DirectKey) -> PathBuf {
        self.dir.join(hex(&key.0))
    }

    /// The manifest stored under `key`, or `None` when there is none usable: no file, or
    /// one that is unreadable, too large, truncated, corrupt, or written for another key.
    /// A hit marks the file as recently used, so sweeps remove it last.
    pub fn get(&self, key: &DirectKey) -> Option<Manifest> {
        let path = self.path(key);
        // Only a regular file of a plausible size is opened: opening a FIFO put here
        // would block, and an oversized file is not worth reading.
        let meta = std::fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
            return None;
        }
        let file = std::fs::File::open(&path).ok()?;
        let mut bytes = Vec::new();
        // Read one byte past the limit, so an oversized file is noticed without reading it.
        (&file)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        let manifest = decode_file(key, &bytes)?;
        // Best effort: a file whose time cannot be set is only evicted a little sooner.
        let _ = file.set_modified(SystemTime::now());
        Some(manifest)
    }

    /// Stores `manifest` under `key`, replacing what was there in one rename: a reader
    /// sees the old file or the new, never a mix. Now and then sweeps the directory.
    pub fn put(&self, key: &DirectKey, manifest: &Manifest) -> Result<(), ManifestStoreError> {
        let bytes = encode_file(key, manifest);
        let len = bytes.len() as u64;
        if len > MAX_FILE_BYTES {
            return Err(ManifestStoreError::TooLarge { len });
        }
        let write_error = |source| ManifestStoreError::Write {
            dir: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(write_error)?;
        let mut temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(write_error)?;
        // No fsync: after a crash the file may be empty or partly written, which its
        // digest turns into a miss.
        temp.write_all(&bytes).map_err(write_error)?;
        temp.persist(self.path(key))
            .map_err(|e| write_error(e.error))?;
        // The digest is as good as a random number for deciding when to sweep.
        // A small store (a small DCACHE_CACHE_SIZE) is swept on every write: listing it
        // is cheap, and 32 writes between sweeps would overshoot its limit many times.
        if bytes[MAGIC.len()] % SWEEP_ONE_IN == 0 || self.limits.max_bytes <= ALWAYS_SWEEP_BELOW {
            self.sweep();
        }
        Ok(())
    }

    /// Removes temporary files left by crashed writers and, when the store is over its
    /// limits, the least recently used manifests down to nine tenths of them. Best
    /// effort: a file that cannot be examined or removed is skipped.
    pub fn sweep(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut files = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            // Not followed: a link or directory placed here is not the store's to remove.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with(TEMP_PREFIX) {
                if now
                    .duration_since(modified)
                    .is_ok_and(|age| age > STALE_TEMP)
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            } else if is_manifest_name(name) {
                // What the file takes on disk, as the results cache counts (and du).
                let used = (std::os::unix::fs::MetadataExt::blocks(&meta) * 512).max(meta.len());
                files.push((modified, used, entry.path()));
            }
        }
        let mut count = files.len();
        let mut bytes: u64 = files.iter().map(|f| f.1).sum();
        if count <= self.limits.max_files && bytes <= self.limits.max_bytes {
            return;
        }
        let keep_files = self.limits.max_files / 10 * 9;
        let keep_bytes = self.limits.max_bytes / 10 * 9;
        files.sort_by_key(|f| f.0);
        for (_, len, path) in files {
            if count <= keep_files && bytes <= keep_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                count -= 1;
                bytes = bytes.saturating_sub(len);
            }
        }
    }
}

/// The digest a file for `key` with `payload` carries: over the key too, so a file
/// renamed or copied under another key's name does not check.
fn digest(key: &DirectKey, payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dcache 2026-12 direct-mode manifest file v1");
    h.update(&key.0);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// A manifest file: [`MAGIC`], the digest, the encoded manifest.
fn encode_file(key: &DirectKey, manifest: &Manifest) -> Vec<u8> {
    let payload = manifest.encode();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&digest(key, &payload));
    out.extend_from_slice(&payload);
    out
}

/// The manifest in a file read for `key`, if the file is whole, is `key`'s, and parses.
fn decode_file(key: &DirectKey, bytes: &[u8]) -> Option<Manifest> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return None;
    }
    let rest = bytes.strip_prefix(MAGIC)?;
    let (stored, payload) = rest.split_at_checked(32)?;
    if stored != digest(key, payload) {
        return None;
    }
    Manifest::decode(payload)
}

fn is_manifest_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrapper::direct::Entry;
    use dcache_proto::CacheKey;

    fn manifest(seed: u8, files: usize) -> Manifest {
        let mut m = Manifest::default();
        m.add(Entry {
            key: CacheKey::from_bytes([seed; 32]),
            dep_file: (seed % 2 == 0).then(|| b"x.o: x.c\n".to_vec()),
            files: (0..files)
                .map(|i| (PathBuf::from(format!("/inc/h{seed}_{i}.h")), [seed; 32]))
                .collect(),
            seen: vec![None; files],
            probes: Vec::new(),
            depend: false,
            stderr: None,
        });
        m
    }

    fn store(dir: &Path, max_files: usize) -> ManifestStore {
        ManifestStore::new(
            dir.join("manifests"),
            ManifestLimits {
                max_files,
                max_bytes: 1 << 30,
            },
        )
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_stored_manifest_is_read_back_and_a_missing_one_is_a_miss() {
        let dir = tempdir();
        let s = store(dir.path(), 100);
        let key = DirectKey([1; 32]);
        assert_eq!(s.get(&key), None, "no directory yet");
        let m = manifest(3, 5);
        s.put(&key, &m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.get(&key), Some(m));
        assert_eq!(s.get(&DirectKey([2; 32])), None);
    }

    #[test]
    fn a_truncated_corrupt_or_misplaced_file_is_a_miss() {
        let dir = tempdir();
        let s = store(dir.path(), 100);
        let key = DirectKey([1; 32]);
        s.put(&key, &manifest(4, 3))
            .unwrap_or_else(|e| panic!("{e}"));
        let path = s.path(&key);
        let good = std::fs::read(&path).unwrap_or_default();
        assert!(good.len() > HEADER);
        let mut cuts = vec![0, 1, MAGIC.len(), HEADER - 1, HEADER, good.len() - 1];
        cuts.extend((HEADER..good.len()).step_by(7));
        for cut in cuts {
            std::fs::write(&path, &good[..cut]).unwrap_or_default();
            assert_eq!(s.get(&key), None, "truncated at {cut}");
        }
        for at in [0, MAGIC.len(), HEADER, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap_or_default();
            assert_eq!(s.get(&key), None, "byte {at} flipped");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        std::fs::write(&path, &trailing).unwrap_or_default();
        assert_eq!(s.get(&key), None, "trailing byte");
        // A whole, valid file for one key, copied under another key's name.
        std::fs::write(&path, &good).unwrap_or_default();
        let other = DirectKey([9; 32]);
        std::fs::copy(&path, s.path(&other)).unwrap_or_default();
        assert_eq!(s.get(&other), None, "another key's manifest");
        assert!(s.get(&key).is_some(), "the original still reads");
        // A whole file with a good digest over contents that do not parse.
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&digest(&key, b"DCM1garbage"));
        forged.extend_from_slice(b"DCM1garbage");
        std::fs::write(&path, &forged).unwrap_or_default();
        assert_eq!(s.get(&key), None, "checks, but does not parse");
        // A file over the size limit is not read at all.
        let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        file.set_len(MAX_FILE_BYTES + 1).unwrap_or_default();
        assert_eq!(s.get(&key), None, "oversized");
        // A FIFO where the file should be: a miss, not a reader blocked forever.
        std::fs::remove_file(&path).unwrap_or_default();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        if made.is_ok_and(|s| s.success()) {
            assert_eq!(s.get(&key), None, "a FIFO");
            std::fs::remove_file(&path).unwrap_or_default();
        }
        // A directory where the file should be.
        std::fs::create_dir(&path).unwrap_or_default();
        assert_eq!(s.get(&key), None, "a directory");
    }

    #[test]
    fn concurrent_writers_of_one_key_never_tear_a_file() {
        let dir = tempdir();
        let s = store(dir.path(), 1000);
        let key = DirectKey([5; 32]);
        // Large enough that a write takes more than one system call.
        let written: Vec<Manifest> = (0..4).map(|i| manifest(i, 2000)).collect();
        std::thread::scope(|scope| {
            for m in &written {
                let s = &s;
                scope.spawn(move || {
                    for _ in 0..20 {
                        s.put(&key, m).unwrap_or_else(|e| panic!("{e}"));
                    }
                });
            }
            let s = &s;
            let written = &written;
            scope.spawn(move || {
                for _ in 0..200 {
                    if let Some(m) = s.get(&key) {
                        assert!(written.contains(&m), "a manifest nobody wrote");
                    }
                }
            });
        });
        let last = s.get(&key);
        assert!(last.is_some_and(|m| written.contains(&m)));
        let leftovers = std::fs::read_dir(s.dir())
            .map(|d| d.flatten().count())
            .unwrap_or_default();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }

    #[test]
    fn a_sweep_keeps_the_most_recently_used_and_removes_stale_temporaries() {
        let dir = tempdir();
        // Filled under generous limits, so no write sweeps before the test does.
        let s = store(dir.path(), 1000);
        let base = SystemTime::now() - Duration::from_secs(10_000);
        let keys: Vec<DirectKey> = (0..20u8).map(|i| DirectKey([i; 32])).collect();
        for (i, key) in keys.iter().enumerate() {
            s.put(key, &manifest(i as u8, 1))
                .unwrap_or_else(|e| panic!("{e}"));
            // Key i last used at base + i seconds.
            std::fs::File::options()
                .write(true)
                .open(s.path(key))
                .and_then(|f| f.set_modified(base + Duration::from_secs(i as u64)))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // A hit makes the oldest the most recently used.
        assert!(s.get(&keys[0]).is_some());
        let stale = s.dir().join(format!("{TEMP_PREFIX}crashed"));
        let fresh = s.dir().join(format!("{TEMP_PREFIX}writing"));
        std::fs::write(&stale, b"partial").unwrap_or_default();
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(base))
            .unwrap_or_default();
        std::fs::write(&fresh, b"partial").unwrap_or_default();
        let foreign = s.dir().join("README");
        std::fs::write(&foreign, b"not a manifest").unwrap_or_default();

        let s = store(dir.path(), 10);
        s.sweep();
        let kept: Vec<usize> = (0..20).filter(|&i| s.path(&keys[i]).exists()).collect();
        assert_eq!(
            kept,
            vec![0, 12, 13, 14, 15, 16, 17, 18, 19],
            "nine tenths of 10"
        );
        assert!(!stale.exists(), "a crashed writer's file is removed");
        assert!(fresh.exists(), "a writer's file in progress is not");
        assert!(foreign.exists(), "only the store's own files are removed");
        // Within the limits, a sweep removes nothing.
        s.sweep();
        assert_eq!((0..20).filter(|&i| s.path(&keys[i]).exists()).count(), 9);
    }

    #[test]
    fn writes_sweep_now_and_then_so_the_store_stays_bounded() {
        let dir = tempdir();
        let s = store(dir.path(), 10);
        for i in 0..=255u8 {
            s.put(&DirectKey([i; 32]), &manifest(i, 1))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let count = std::fs::read_dir(s.dir())
            .map(|d| d.flatten().count())
            .unwrap_or_default();
        // Each write sweeps with a chance of 1 in 32: 256 writes all escaping it would
        // take a chance of about 3 in 10^4.
        assert!(count < 256, "{count} files: never swept");
    }

    #[test]
    fn the_limits_follow_the_cache_size() {
        assert_eq!(
            ManifestLimits::for_cache_size(5 << 30).max_bytes,
            (5 << 30) / 10
        );
        assert_eq!(ManifestLimits::for_cache_size(0).max_bytes, 1 << 20);
    }
}
