//! The secret that seals a cache's entries.
//!
//! Every entry's digest is a keyed BLAKE3 MAC under a 32-byte secret kept in the cache
//! directory, readable by the server's user only. So a result enters the cache only
//! through the server's own verified write path: a file planted in the cache directory by
//! anyone who cannot read the secret (another user with write access to the directory, a
//! compromised tool) does not verify and is dropped, never served.

use std::io::Write;
use std::path::Path;

/// The MAC key of one cache directory. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// File name of the secret inside a store's root.
const SECRET: &str = "secret";

impl SealKey {
    /// A key from raw bytes (tests, and tiers that share a fleet key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key that seals a fleet's shared tier, derived from the shared secret an
    /// operator gave every server (`--shared-key-file`). The derivation's context string
    /// is a domain separator: the same file used for something else (a client token, by
    /// mistake) yields an unrelated MAC key, and no MAC computed for another purpose
    /// verifies as an entry. The entry MAC itself binds the store key and the whole
    /// entry, so a valid value cannot be replayed under another key.
    pub fn for_shared_tier(secret: &[u8]) -> Self {
        Self(blake3::derive_key(
            "dcache 2026-12 shared cache tier entry MAC v2",
            secret,
        ))
    }

    /// Reads the secret of the store rooted at `root`, creating it (random, mode 600)
    /// if there is none. Processes racing to create it agree on one: the first link wins
    /// and the others read it. A secret owned by another user, or readable by group or
    /// others, is refused: whoever else can read or replace it could forge entries.
    pub fn load_or_create(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let path = root.join(SECRET);
        if !path.exists() {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
            let tmp = root.join(format!("{SECRET}.{}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&secret)?;
            f.sync_all()?;
            // A hard link fails if the name exists: exactly one creator wins.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let meta = std::fs::symlink_metadata(&path)?;
        let refuse = |why: String| {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{}: {why}", path.display()),
            ))
        };
        if !meta.is_file() {
            return refuse("not a regular file".into());
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return refuse(format!(
                "owned by uid {}, not by this server's user",
                meta.uid()
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return refuse("readable or writable by other users; chmod 600 it".into());
        }
        let bytes = std::fs::read(&path)?;
        match <[u8; 32]>::try_from(bytes.as_slice()) {
            Ok(b) => Ok(Self(b)),
            Err(_) => refuse(format!("{} bytes, not 32", bytes.len())),
        }
    }
}
