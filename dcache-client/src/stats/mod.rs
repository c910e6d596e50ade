//! The statistics `dcache --stats` shows, and `dcache --zero-stats`.
//!
//! - [`local`]: the embedded cache's counters, kept across processes in the cache
//!   directory (each `dcache` process is short-lived; the counts must outlive it).
//! - [`calls`]: the calls that ran without the cache, by reason, and the warning a build
//!   gets once when most of it did.
//! - [`baseline`]: a per-user zero for shared servers' counters, so `--zero-stats` never
//!   wipes what other users see.
//! - [`gather`] and [`zero`]: both, chosen by the configuration (the local cache when no
//!   servers are configured, else every server, each counted from this user's zero).

use dcache_transport::Address;

use crate::Client;
use crate::wrapper::Config;

pub mod baseline;
pub mod bounded_log;
pub mod calls;
pub mod local;

/// One named set of counters: a server's, or the local cache's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSet {
    /// The server's address, or `local cache DIR`.
    pub name: String,
    /// The counters, in the order the server (or the log) gives them.
    pub counters: Vec<(String, u64)>,
}

/// What [`gather`] found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// A set per reachable server, or the local cache's one.
    pub sets: Vec<CounterSet>,
    /// The servers that did not answer, and why; reported, not fatal.
    pub unreachable: Vec<(Address, String)>,
}

impl Report {
    /// The sum of every set, counter by counter, in first-seen order.
    pub fn totals(&self) -> Vec<(String, u64)> {
        let mut total: Vec<(String, u64)> = Vec::new();
        for set in &self.sets {
            for (k, v) in &set.counters {
                match total.iter_mut().find(|(n, _)| n == k) {
                    Some((_, t)) => *t += v,
                    None => total.push((k.clone(), *v)),
                }
            }
        }
        total
    }

    /// [`totals`](Self::totals) as one JSON object (`{"hits": 3, ...}`), for scripts.
    pub fn to_json(&self) -> String {
        let fields: Vec<String> = self
            .totals()
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!("{{{}}}", fields.join(", "))
    }

    /// Every set, its name on a line and an indented line per counter, for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for set in &self.sets {
            out.push_str(&set.name);
            out.push('\n');
            // Values in one column, however long the names (reasons can be).
            let width = set
                .counters
                .iter()
                .map(|(k, _)| k.len())
                .max()
                .unwrap_or(0)
                .max(26);
            for (k, v) in &set.counters {
                out.push_str(&format!("  {k:<width$} {v}\n"));
            }
        }
        out
    }
}

/// Why [`zero`] did not reset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZeroError {
    /// Some servers did not answer: a baseline without them would show their whole
    /// counters later, so nothing is recorded.
    #[error("not every server answered; statistics not reset")]
    Unanswered(Vec<(Address, String)>),
    /// The statistics file could not be written or removed.
    #[error("cannot reset statistics: {0}")]
    Io(#[from] std::io::Error),
}

/// The counters `dcache --stats` shows: with no servers configured, the local cache's
/// totals; else every server's, each since this user's last [`zero`]. Either way, the
/// calls this machine made through the cache and without it ([`calls`]) come last.
pub async fn gather(config: &Config) -> Report {
    let calls = CounterSet {
        name: format!("calls on this machine ({})", config.dir.display()),
        counters: calls::totals(&config.dir),
    };
    if config.hosts.is_empty() {
        let mut counters: Vec<(String, u64)> = local::totals(&config.dir)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        counters.extend(calls.counters);
        return Report {
            sets: vec![CounterSet {
                name: format!("local cache {}", config.dir.display()),
                counters,
            }],
            unreachable: Vec::new(),
        };
    }
    let daemon = running_daemon(config);
    let mut report = remote(config, daemon.as_ref()).await;
    let daemon = daemon.map(|a| a.to_string());
    for set in &mut report.sets {
        let counters = std::mem::take(&mut set.counters);
        set.counters = baseline::since_zero(&config.dir, &set.name, counters);
        if daemon.as_ref() == Some(&set.name) {
            // The relay daemon's own counters (jobs it served from its tier, passed up,
            // or let fall through) beside the hosts': named apart, so the totals of
            // `--json` count each compile once.
            for (name, _) in &mut set.counters {
                name.insert_str(0, "daemon_");
            }
        }
    }
    report.sets.push(calls);
    report
}

/// `dcache --zero-stats`: forgets the local cache's counts, or, with servers, records
/// their counters now as this user's zero (the servers' own counters are shared by every
/// client and stay as they are).
pub async fn zero(config: &Config) -> Result<(), ZeroError> {
    if config.hosts.is_empty() {
        calls::reset(&config.dir)?;
        return Ok(local::reset(&config.dir)?);
    }
    let daemon = running_daemon(config);
    let report = remote(config, daemon.as_ref()).await;
    if !report.unreachable.is_empty() {
        return Err(ZeroError::Unanswered(report.unreachable));
    }
    let sets: Vec<(String, Vec<(String, u64)>)> = report
        .sets
        .into_iter()
        .map(|s| (s.name, s.counters))
        .collect();
    baseline::save(&config.dir, &sets)?;
    Ok(calls::reset(&config.dir)?)
}

/// This configuration's relay daemon, when one runs (never in a build without the
/// `embedded` feature, which the daemon is part of).
fn running_daemon(config: &Config) -> Option<Address> {
    #[cfg(feature = "embedded")]
    {
        crate::wrapper::daemon::connect::running_daemon(config)
    }
    #[cfg(not(feature = "embedded"))]
    {
        let _ = config;
        None
    }
}

/// Each configured server's counters as it reports them, after those of the relay daemon
/// at `daemon` (this configuration's, when one runs).
async fn remote(config: &Config, daemon: Option<&Address>) -> Report {
    let mut report = Report::default();
    if let Some(addr) = daemon {
        let daemon = Client::new(crate::ClientOptions::new(vec![addr.clone()]));
        if let Some((_, Ok(stats))) = daemon.stats().await.into_iter().next() {
            report.sets.push(CounterSet {
                name: addr.to_string(),
                counters: stats.into_iter().map(|s| (s.name, s.value)).collect(),
            });
        }
    }
    let client = Client::new(config.client_options());
    for (host, r) in client.stats().await {
        match r {
            Ok(stats) => report.sets.push(CounterSet {
                name: host.to_string(),
                counters: stats.into_iter().map(|s| (s.name, s.value)).collect(),
            }),
            Err(e) => report.unreachable.push((host, e)),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_sum_and_render_as_before() {
        let set = |name: &str, c: &[(&str, u64)]| CounterSet {
            name: name.into(),
            counters: c.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        };
        let r = Report {
            sets: vec![
                set("a", &[("hits", 1), ("misses", 2)]),
                set("b", &[("misses", 3), ("compiles", 4)]),
            ],
            unreachable: Vec::new(),
        };
        assert_eq!(r.to_json(), r#"{"hits": 1, "misses": 5, "compiles": 4}"#);
        assert_eq!(
            r.to_text(),
            format!(
                "a\n  {:<26} 1\n  {:<26} 2\nb\n  {:<26} 3\n  {:<26} 4\n",
                "hits", "misses", "misses", "compiles"
            )
        );
    }

    #[tokio::test]
    async fn the_local_cache_is_gathered_and_zeroed_without_servers() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::new(dir.path().to_owned());
        local::record(
            dir.path(),
            &local::Delta {
                hits: 2,
                ..local::Delta::default()
            },
        );
        let r = gather(&config).await;
        assert_eq!(r.sets.len(), 1);
        assert!(r.sets[0].name.starts_with("local cache "));
        assert!(r.totals().contains(&("hits".to_owned(), 2)));
        zero(&config).await.unwrap();
        assert!(
            gather(&config)
                .await
                .totals()
                .contains(&("hits".to_owned(), 0))
        );
    }
}
