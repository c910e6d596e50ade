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
//! the bytes that were hashed.
//!
//! Only on filesystems this kernel keeps itself ([`LocalFilesystems`]): a network
//! filesystem's attributes may be cached for seconds after another machine changed the
//! file (NFS revalidates them when a file is opened, which this check avoids), and a FUSE
//! filesystem's are whatever its daemon says. Elsewhere every file is read and hashed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::statfs::{self, FsType};

/// Filesystems whose timestamps this kernel sets itself and reports as they are.
const LOCAL: &[FsType] = &[
    statfs::EXT4_SUPER_MAGIC, // also ext2 and ext3: one magic number
    statfs::XFS_SUPER_MAGIC,
    statfs::BTRFS_SUPER_MAGIC,
    statfs::TMPFS_MAGIC,
    statfs::OVERLAYFS_SUPER_MAGIC,
    statfs::F2FS_SUPER_MAGIC,
];

/// Which devices hold one of the filesystems this kernel keeps itself (ext2/3/4, xfs,
/// btrfs, tmpfs, overlayfs, f2fs), asked once per device.
#[derive(Debug, Default)]
pub struct LocalFilesystems {
    known: HashMap<u64, bool>,
}

impl LocalFilesystems {
    /// Whether `path`, on device `dev`, is on a local filesystem.
    pub(crate) fn holds(&mut self, dev: u64, path: &Path) -> bool {
        *self.known.entry(dev).or_insert_with(|| {
            statfs::statfs(path).is_ok_and(|s| LOCAL.contains(&s.filesystem_type()))
        })
    }
}

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
    /// compiler's open does) on a filesystem `local` vouches for.
    pub fn matches(&self, path: &Path, local: &mut LocalFilesystems) -> bool {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Self::of(&m))
            .is_some_and(|now| now == *self && local.holds(self.dev, path))
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
        let id_of = |p: &Path| std::fs::metadata(p).ok().and_then(|m| FileId::of(&m));
        std::fs::write(&p, "int a;\n").unwrap();
        let id = id_of(&p).unwrap();
        assert_eq!(id_of(&p), Some(id), "unchanged");
        assert_eq!(FileId::from_bytes(&id.to_bytes()), id);
        // Only on a filesystem on the list: whatever this machine's temporary one is.
        let local = LocalFilesystems::default().holds(id.dev, &p);
        assert_eq!(id.matches(&p, &mut LocalFilesystems::default()), local);
        // Same size: only the times (and for a new file the inode) tell. The sleeps let
        // the kernel's coarse clock move on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, "int b;\n").unwrap();
        assert_ne!(id_of(&p), Some(id), "rewritten");
        assert!(!id.matches(&p, &mut LocalFilesystems::default()));
        let id = id_of(&p).unwrap();
        let other = dir.path().join("new.h");
        std::fs::write(&other, "int b;\n").unwrap();
        std::fs::rename(&other, &p).unwrap();
        assert_ne!(id_of(&p), Some(id), "replaced by another file");
        let id = id_of(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_ne!(id_of(&p), Some(id), "chmod changes the status-change time");
        std::fs::remove_file(&p).unwrap();
        assert!(!id.matches(&p, &mut LocalFilesystems::default()), "gone");
        assert_eq!(id_of(dir.path()), None, "a directory");
    }

    #[test]
    fn ext4_and_tmpfs_are_local_and_proc_is_not() {
        let mut fs = LocalFilesystems::default();
        let dev = |p: &str| std::fs::metadata(p).unwrap().dev();
        assert!(!fs.holds(dev("/proc/self"), Path::new("/proc/self")));
        if std::fs::metadata("/dev/shm").is_ok() {
            assert!(fs.holds(dev("/dev/shm"), Path::new("/dev/shm")), "tmpfs");
        }
    }
}
