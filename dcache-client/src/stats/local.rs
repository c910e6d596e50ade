//! Counters of the embedded cache, kept across processes.
//!
//! Every `dcache` process appends one line of counts to `DIR/stats.log` with a single
//! append write, which the kernel keeps whole even when many processes (make -j) write at
//! once; `dcache --stats` sums the lines and `--zero-stats` removes the file. The file
//! stays short: past a few KiB its lines are folded into their sums
//! ([`bounded_log`](super::bounded_log)).

use std::path::Path;

/// What one process adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Results served from the cache.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Results answered before the upload ended.
    pub early_results: u64,
    /// Compiler runs.
    pub compiles: u64,
    /// Source bytes received by the embedded server.
    pub source_bytes_received: u64,
    /// Source bytes an early result saved.
    pub source_bytes_saved: u64,
}

const FIELDS: [&str; 6] = [
    "hits",
    "misses",
    "early_results",
    "compiles",
    "source_bytes_received",
    "source_bytes_saved",
];

impl Delta {
    fn values(&self) -> [u64; 6] {
        [
            self.hits,
            self.misses,
            self.early_results,
            self.compiles,
            self.source_bytes_received,
            self.source_bytes_saved,
        ]
    }
}

/// Appends one process's counts (best effort: statistics never fail a compile).
pub fn record(dir: &Path, d: &Delta) {
    if *d == Delta::default() {
        return;
    }
    let line = d
        .values()
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ")
        + "\n";
    let _ = std::fs::create_dir_all(dir);
    // Folded into one line past a few KiB, so the log stays bounded.
    super::bounded_log::append(&dir.join("stats.log"), line.as_bytes());
}

/// The sums of every recorded line, as (name, value) pairs.
pub fn totals(dir: &Path) -> Vec<(&'static str, u64)> {
    let mut sums = [0u64; 6];
    if let Ok(text) = std::fs::read_to_string(dir.join("stats.log")) {
        for line in text.lines() {
            let v: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
            // A line cut short by a crash is skipped rather than miscounted.
            if v.len() == sums.len() {
                for (s, x) in sums.iter_mut().zip(v) {
                    *s = s.saturating_add(x);
                }
            }
        }
    }
    FIELDS.into_iter().zip(sums).collect()
}

/// Forgets every recorded count.
pub fn reset(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join("stats.log")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_add_up_a_torn_line_is_skipped_and_reset_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let d = Delta {
            hits: 1,
            compiles: 2,
            source_bytes_saved: 3,
            ..Delta::default()
        };
        record(dir.path(), &d);
        record(dir.path(), &d);
        record(dir.path(), &Delta::default()); // nothing to add: no line
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("stats.log"))
            .unwrap();
        f.write_all(b"7 7\n").unwrap();
        let get = |n: &str| {
            totals(dir.path())
                .into_iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v)
        };
        assert_eq!(get("hits"), Some(2));
        assert_eq!(get("compiles"), Some(4));
        assert_eq!(get("source_bytes_saved"), Some(6));
        assert_eq!(get("misses"), Some(0));
        reset(dir.path()).unwrap();
        reset(dir.path()).unwrap(); // already gone: fine
        assert_eq!(get("hits"), Some(0));
    }
}
