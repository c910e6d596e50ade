//! A counts log that stays small: `stats.log` gains a line per `dcache` process, so
//! without a bound it grows by a line per compile forever. Past [`COMPACT_ABOVE`] bytes
//! the process that appended folds the file into one line per row width (the sums,
//! column by column), which is all a reader ever computes from it.
//!
//! Appends and the fold are serialised by a `flock` on a lock file beside the log:
//! appenders share it (so `make -j` processes still append at once), the fold holds it
//! alone, so no line is appended to a file that is being replaced and then lost.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A log longer than this is folded after the next append. A line is about 30 bytes,
/// so a fold comes every few hundred processes and reads two pages; the file never
/// takes more than three blocks of the cache directory's size limit.
pub const COMPACT_ABOVE: u64 = 8 * 1024;

fn lock_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    log.with_file_name(name)
}

/// Takes the log's lock, shared or alone. `None` when the lock file cannot be opened or
/// the file system has no `flock`: the caller then goes on unlocked (statistics are
/// best effort; an append never waits on a broken lock) but never folds.
fn lock(log: &Path, arg: FlockArg) -> Option<Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(log))
        .ok()?;
    Flock::lock(file, arg).ok()
}

/// Appends `line` (one whole line, with its newline) in a single write, then folds the
/// log if it has grown past [`COMPACT_ABOVE`]. Best effort: errors are dropped, as a
/// statistic must never fail a compile.
pub fn append(log: &Path, line: &[u8]) {
    let len = {
        let locked = lock(log, FlockArg::LockShared);
        let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        else {
            return;
        };
        if f.write_all(line).is_err() || locked.is_none() {
            return;
        }
        f.metadata().map_or(0, |m| m.len())
    };
    if len > COMPACT_ABOVE {
        let _ = compact(log);
    }
}

/// Folds the log into one line per row width, holding the lock alone. Returns whether
/// it rewrote the file (not when it is already short: another process folded it
/// first). Lines that are not all numbers (cut short by a crash) are dropped, as
/// readers skip them anyway.
pub fn compact(log: &Path) -> std::io::Result<bool> {
    let Some(_alone) = lock(log, FlockArg::LockExclusive) else {
        return Ok(false);
    };
    let file = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() <= COMPACT_ABOVE {
        return Ok(false);
    }
    let mut sums: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { continue };
        let row: Option<Vec<u64>> = line.split(' ').map(|x| x.parse().ok()).collect();
        let Some(row) = row.filter(|r| !r.is_empty()) else {
            continue;
        };
        let sum = sums.entry(row.len()).or_insert_with(|| vec![0; row.len()]);
        for (s, x) in sum.iter_mut().zip(row) {
            *s = s.saturating_add(x);
        }
    }
    let mut text = String::new();
    for row in sums.values() {
        let fields: Vec<String> = row.iter().map(u64::to_string).collect();
        text.push_str(&fields.join(" "));
        text.push('\n');
    }
    let dir = log.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".stats.log.")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.persist(log).map_err(|e| e.error)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_appenders_keep_every_count_and_the_log_stays_short() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("stats.log");
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let log = &log;
                s.spawn(move || {
                    for _ in 0..500 {
                        append(log, format!("1 {t} 3 4 5 6\n").as_bytes());
                    }
                });
            }
        });
        // A torn line and a row of another width survive a fold as they should.
        append(&log, b"7 7\n");
        append(&log, b"12 x\n");
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(u64::MAX);
        assert!(len <= COMPACT_ABOVE + 64, "{len} bytes after 4,000 appends");
        // Fold what is left, whatever its length, and read the sums.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut sums: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for line in text.lines() {
            let row: Option<Vec<u64>> = line.split(' ').map(|x| x.parse().ok()).collect();
            if let Some(row) = row {
                let sum = sums.entry(row.len()).or_insert_with(|| vec![0; row.len()]);
                for (s, x) in sum.iter_mut().zip(row) {
                    *s += x;
                }
            }
        }
        assert_eq!(
            sums[&6],
            [4000, 500 * (0..8).sum::<u64>(), 12000, 16000, 20000, 24000]
        );
        assert_eq!(sums[&2], [7, 7]);
    }

    #[test]
    fn a_short_log_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("stats.log");
        append(&log, b"1 2\n");
        append(&log, b"1 2\n");
        assert!(!compact(&log).unwrap_or(true));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap_or_default(),
            "1 2\n1 2\n"
        );
        assert!(!compact(&dir.path().join("absent.log")).unwrap_or(true));
    }
}
