//! Host health shared by every process of a user: one small file per failing host in a
//! directory (`DCACHE_DIR/hosts` for the wrapper), as distcc keeps its back-off files.
//!
//! Each `dcache` process lives for one compile, so health kept in memory alone would
//! make every compile of a `make -j8` rediscover a dead server for itself, paying the
//! connect timeout each time. A process that sees a host fail writes the host's file; the
//! others read it before choosing a host and skip the host until the time it names,
//! quoting the failure it records, so the first message a user sees names the real
//! cause.
//!
//! Race-free by construction: a file is written whole to a temporary name and renamed
//! into place, so a reader sees the old file, the new one or none, never half of one;
//! concurrent writers each rename a whole file and the last one wins, which is as right as
//! any. A recovery removes the file. Nothing here can fail a compile: an unreadable or
//! malformed file counts as no record, and a write that fails is forgotten.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// First line of every record: the format, so a future change is read as no record.
const MAGIC: &str = "dcache-backoff v1";
/// The most of a record that is read: a record is small; a bigger file is not one.
const MAX_RECORD: u64 = 4096;
/// The most of a failure's text that is kept.
const MAX_REASON: usize = 512;
/// The longest back-off a record may claim from when it was written (its modification
/// time), whatever it says: a date far in the future (a clock that jumped back, a hand
/// edit) must not disable a host for good.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A host's recorded failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Until when the host is skipped.
    pub until: SystemTime,
    /// Why, as the process that saw it fail described it.
    pub reason: String,
}

/// The directory of back-off records.
#[derive(Clone, Debug)]
pub struct BackoffDir {
    dir: PathBuf,
}

impl BackoffDir {
    /// Records in `dir` (created on the first failure).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The file of `host`: named by a hash of the address, so any address string makes a
    /// plain file name.
    fn path(&self, host: &str) -> PathBuf {
        let digest = blake3::hash(host.as_bytes());
        self.dir.join(&digest.to_hex()[..32])
    }

    /// `host`'s back-off at `now`, if one is recorded and not yet over.
    pub fn get(&self, host: &str, now: SystemTime) -> Option<Backoff> {
        let mut text = String::new();
        let file = std::fs::File::open(self.path(host)).ok()?;
        let written = file.metadata().and_then(|m| m.modified()).ok()?;
        file.take(MAX_RECORD).read_to_string(&mut text).ok()?;
        let mut lines = text.splitn(4, '\n');
        if lines.next()? != MAGIC {
            return None;
        }
        let until_ms: u64 = lines.next()?.parse().ok()?;
        // The file names its host: a hash collision or a file copied from elsewhere is no
        // record of this host.
        if lines.next()? != host {
            return None;
        }
        let reason = lines.next().unwrap_or("").trim_end().to_owned();
        let until = SystemTime::UNIX_EPOCH + Duration::from_millis(until_ms);
        let until = until.min(written + MAX_BACKOFF);
        (now < until).then_some(Backoff { until, reason })
    }

    /// `host` failed with `reason`: every process skips it until `until`.
    pub fn mark_down(&self, host: &str, until: SystemTime, reason: &str) {
        let until_ms = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut reason: String = reason.replace('\n', " ");
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let text = format!("{MAGIC}\n{until_ms}\n{host}\n{reason}\n");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".backoff-")
                .tempfile_in(&self.dir)?;
            tmp.write_all(text.as_bytes())?;
            tmp.persist(self.path(host)).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::debug!(
                "cannot record {host}'s back-off in {}: {e}",
                self.dir.display()
            );
        }
    }

    /// `host` worked: no process skips it any more.
    pub fn mark_up(&self, host: &str) {
        let _ = std::fs::remove_file(self.path(host));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_shared_expires_and_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let a = BackoffDir::new(dir.path().join("hosts"));
        let b = BackoffDir::new(dir.path().join("hosts")); // another process
        let now = SystemTime::now();
        assert_eq!(a.get("tcp://h:1", now), None);
        a.mark_down(
            "tcp://h:1",
            now + Duration::from_secs(60),
            "connection refused",
        );
        let seen = b.get("tcp://h:1", now).unwrap();
        assert_eq!(seen.reason, "connection refused");
        assert_eq!(b.get("tcp://other:1", now), None, "only that host");
        assert_eq!(
            b.get("tcp://h:1", now + Duration::from_secs(61)),
            None,
            "over"
        );
        b.mark_up("tcp://h:1");
        assert_eq!(a.get("tcp://h:1", now), None);
        b.mark_up("tcp://h:1"); // nothing to clear: fine
    }

    #[test]
    fn malformed_foreign_or_far_future_records_do_not_disable_a_host_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let d = BackoffDir::new(dir.path().to_owned());
        let now = SystemTime::now();
        let host = "tcp://h:1";
        for junk in [
            "",
            "garbage",
            "dcache-backoff v1\nnot a number\ntcp://h:1\n",
        ] {
            std::fs::write(d.path(host), junk).unwrap();
            assert_eq!(d.get(host, now), None, "{junk:?}");
        }
        // A record copied from another host's file.
        d.mark_down("tcp://g:1", now + Duration::from_secs(60), "x");
        std::fs::copy(d.path("tcp://g:1"), d.path(host)).unwrap();
        assert_eq!(d.get(host, now), None);
        // A year ahead counts as an hour at most.
        d.mark_down(host, now + Duration::from_secs(365 * 86400), "clock");
        assert!(
            d.get(host, now + MAX_BACKOFF + Duration::from_secs(1))
                .is_none()
        );
        // A huge reason is cut, and its newlines cannot forge fields.
        d.mark_down(host, now + Duration::from_secs(60), &"é\n".repeat(1000));
        assert!(d.get(host, now).unwrap().reason.len() <= MAX_REASON);
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_half_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = BackoffDir::new(dir.path().to_owned());
        let now = SystemTime::now();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        d.mark_down("tcp://h:1", now + Duration::from_secs(60), &format!("w{i}"));
                    }
                })
            })
            .collect();
        for _ in 0..400 {
            if let Some(b) = d.get("tcp://h:1", now) {
                assert!(b.reason.starts_with('w'), "{b:?}");
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        assert!(d.get("tcp://h:1", now).is_some());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    }
}
