//! What a file was when direct mode hashed it, so a later lookup can tell it is unchanged
//! without reading it again (the idea of ccache's `inode_cache`).
//!
//! Why this is sound: the kernel sets a file's status-change time on every change to its
//! contents (and to its metadata), from its own clock; nothing in user space can set it.
//! A file is recorded only when its latest possible change, its newest timestamp plus the
//! margin its granularity needs (a clock tick for nanosecond timestamps, two seconds for
//! whole-second ones), is before the compile started ([`super::direct`]'s freshness
//! rule, checked after the file was read). Any later change happens after that, so it
//! stamps a status-change time past the recorded one even at the coarsest granularity;
//! a file whose device, inode, size and both times are all as recorded therefore holds
//! the bytes that were hashed. A filesystem that did not keep status-change times would
//! break this, as it breaks `make`'s own view of what changed.

use std::os::unix::fs::MetadataExt;

/// A file's identity and timestamps, as `stat` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

/// The stored size of a [`FileId`].
pub const ENCODED_LEN: usize = 56;

impl FileId {
    /// What `meta` says, or `None` for something that is not a regular file.
    pub fn of(meta: &std::fs::Metadata) -> Option<Self> {
        let id = Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        };
        meta.is_file().then_some(id)
    }

    /// Whether the file at `path` is still what this says (following symlinks, as the
    /// compiler's open does).
    pub fn matches(&self, path: &std::path::Path) -> bool {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Self::of(&m))
            .is_some_and(|now| now == *self)
    }

    /// The stored form.
    pub fn to_bytes(self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        let fields = [
            self.dev,
            self.ino,
            self.size,
            self.modified.0 as u64,
            self.modified.1 as u64,
            self.changed.0 as u64,
            self.changed.1 as u64,
        ];
        for (slot, v) in out.chunks_exact_mut(8).zip(fields) {
            slot.copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// From the stored form.
    pub fn from_bytes(b: &[u8; ENCODED_LEN]) -> Self {
        let mut f = b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
        let mut next = || f.next().unwrap_or(0);
        Self {
            dev: next(),
            ino: next(),
            size: next(),
            modified: (next() as i64, next() as i64),
            changed: (next() as i64, next() as i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_matches_until_it_is_written_renamed_over_or_touched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.h");
        std::fs::write(&p, "int a;\n").unwrap();
        let id = FileId::of(&std::fs::metadata(&p).unwrap()).unwrap();
        assert!(id.matches(&p));
        assert_eq!(FileId::from_bytes(&id.to_bytes()), id);
        // Same size, same contents length: only the times (and for a new file the inode)
        // tell. The sleep lets the coarse clock move on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, "int b;\n").unwrap();
        assert!(!id.matches(&p), "rewritten");
        let id = FileId::of(&std::fs::metadata(&p).unwrap()).unwrap();
        let other = dir.path().join("new.h");
        std::fs::write(&other, "int b;\n").unwrap();
        std::fs::rename(&other, &p).unwrap();
        assert!(!id.matches(&p), "replaced by another file");
        let id = FileId::of(&std::fs::metadata(&p).unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(!id.matches(&p), "chmod changes the status-change time");
        std::fs::remove_file(&p).unwrap();
        assert!(!id.matches(&p), "gone");
        assert_eq!(
            FileId::of(&std::fs::metadata(dir.path()).unwrap()),
            None,
            "a directory"
        );
    }
}
