//! `dcache --zero-stats` for remote servers: the servers' counters are shared by every
//! client, so one user must not be able to wipe them for everyone. Instead the client
//! records what each server showed at the reset, in `DIR/remote-baseline`, and
//! `dcache --stats` shows the difference: each user's own "since I last zeroed" view, as
//! ccache users expect from `-z`.
//!
//! A server that restarted since the reset (a counter below its baseline) is shown whole:
//! its counters started over by themselves.

use std::io::Write;
use std::path::Path;

/// Counters that say how much there is now rather than how often something happened:
/// shown as they are, never subtracted.
const GAUGES: [&str; 4] = [
    "stored_entries",
    "stored_bytes",
    "waiting_source_bytes_in_memory",
    "connections_open",
];

const FILE: &str = "remote-baseline";

/// Records `stats` of every host as the new zero, replacing the previous baseline.
pub fn save(dir: &Path, hosts: &[(String, Vec<(String, u64)>)]) -> std::io::Result<()> {
    let mut text = String::new();
    for (host, stats) in hosts {
        for (name, value) in stats {
            text.push_str(&format!("{host} {name} {value}\n"));
        }
    }
    std::fs::create_dir_all(dir)?;
    // Whole or not at all: a reader never sees half a baseline.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.persist(dir.join(FILE)).map_err(|e| e.error)?;
    Ok(())
}

/// `stats` of `host` minus its baseline, if there is a valid one.
pub fn since_zero(dir: &Path, host: &str, stats: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(dir.join(FILE)).unwrap_or_default();
    let base: Vec<(&str, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let (h, n, v) = (parts.next()?, parts.next()?, parts.next()?);
            (h == host).then_some((n, v.parse().ok()?))
        })
        .collect();
    let baseline = |name: &str| base.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v);
    let restarted = stats
        .iter()
        .any(|(n, v)| !GAUGES.contains(&n.as_str()) && *v < baseline(n));
    if restarted {
        return stats;
    }
    stats
        .into_iter()
        .map(|(n, v)| {
            let shown = if GAUGES.contains(&n.as_str()) {
                v
            } else {
                v - baseline(&n)
            };
            (n, shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
    }

    #[test]
    fn counters_count_from_the_reset_and_gauges_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let host = "tcp://h:1".to_owned();
        save(
            dir.path(),
            &[(host.clone(), stats(&[("hits", 10), ("stored_entries", 5)]))],
        )
        .unwrap();
        assert_eq!(
            since_zero(
                dir.path(),
                &host,
                stats(&[("hits", 13), ("stored_entries", 7)])
            ),
            stats(&[("hits", 3), ("stored_entries", 7)])
        );
        // Another host has no baseline.
        assert_eq!(
            since_zero(dir.path(), "tcp://other:1", stats(&[("hits", 4)])),
            stats(&[("hits", 4)])
        );
    }

    #[test]
    fn a_restarted_server_is_shown_whole() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            &[("h".into(), stats(&[("hits", 10), ("misses", 2)]))],
        )
        .unwrap();
        assert_eq!(
            since_zero(dir.path(), "h", stats(&[("hits", 1), ("misses", 5)])),
            stats(&[("hits", 1), ("misses", 5)])
        );
    }
}
