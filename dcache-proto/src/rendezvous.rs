//! Choosing a server for a job: rendezvous hashing of the job's key over the configured
//! hosts, with failing hosts skipped for a while.
//!
//! Rendezvous (highest-random-weight) hashing gives every (key, host) pair a score and
//! picks the highest. The same source always meets the same server, so its cache entry is
//! found; adding or removing a host moves only the keys that host wins or held, not
//! everyone's. The order of the remaining scores is the fall-through order when a host is
//! down.
//!
//! [`HostHealth`] is one process's view, with time an argument (this crate reads no
//! clock). It lives here, not in the client, so that a relay (a dcache server forwarding
//! to other dcache servers) picks the very server a direct client would, by the same code.

use std::time::{Duration, Instant};

use crate::CacheKey;

/// blake3 context for host scores, separate from the cache key's.
const SCORE_CONTEXT: &str = "dcache 2026-11 rendezvous score v1";

/// How long a host that failed is skipped before it is tried again (distcc's habit).
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(60);

/// The score of `host` for `key`: higher wins.
pub fn score(key: &CacheKey, host: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key(SCORE_CONTEXT);
    h.update(key.as_bytes());
    h.update(host.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// Indices of `hosts` in the order a job with `key` should try them.
pub fn rank<S: AsRef<str>>(key: &CacheKey, hosts: &[S]) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (score(key, h.as_ref()), i))
        .collect();
    // Ties (vanishingly rare) break by position, so the order is total and stable.
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

/// Remembers which hosts failed recently, and why.
#[derive(Clone, Debug)]
pub struct HostHealth {
    backoff: Duration,
    down_until: Vec<Option<(Instant, String)>>,
}

impl HostHealth {
    /// Health for `n` hosts, all presumed up.
    pub fn new(n: usize, backoff: Duration) -> Self {
        Self {
            backoff,
            down_until: vec![None; n],
        }
    }

    /// Whether host `i` may be tried at `now`.
    pub fn is_up(&self, i: usize, now: Instant) -> bool {
        self.skipped(i, now).is_none()
    }

    /// Why host `i` is being skipped at `now` (the failure that started its back-off), or
    /// `None` when it may be tried.
    pub fn skipped(&self, i: usize, now: Instant) -> Option<&str> {
        match self.down_until.get(i) {
            Some(Some((until, why))) if now < *until => Some(why),
            _ => None,
        }
    }

    /// Host `i` failed at `now` because of `reason`: skip it for the back-off period.
    pub fn mark_down(&mut self, i: usize, now: Instant, reason: &str) {
        if let Some(slot) = self.down_until.get_mut(i) {
            *slot = Some((now + self.backoff, reason.to_owned()));
        }
    }

    /// Host `i` worked.
    pub fn mark_up(&mut self, i: usize) {
        if let Some(slot) = self.down_until.get_mut(i) {
            *slot = None;
        }
    }

    /// The hosts to try for `key` at `now`, best first: those up in rendezvous order. When
    /// every host is marked down the list is empty and the caller compiles locally; the
    /// list is finite, so no retry loop built on it can spin forever.
    pub fn candidates<S: AsRef<str>>(
        &self,
        key: &CacheKey,
        hosts: &[S],
        now: Instant,
    ) -> Vec<usize> {
        rank(key, hosts)
            .into_iter()
            .filter(|&i| self.is_up(i, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        CacheKey::from_bytes(*blake3::hash(&n.to_be_bytes()).as_bytes())
    }

    #[test]
    fn keys_spread_over_hosts_and_stay_put() {
        let hosts = ["tcp://a:1", "tcp://b:1", "tcp://c:1"];
        let mut counts = [0; 3];
        for n in 0..3000 {
            let first = rank(&key(n), &hosts)[0];
            assert_eq!(first, rank(&key(n), &hosts)[0], "stable");
            counts[first] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn removing_a_host_moves_only_its_keys() {
        let three = ["tcp://a:1", "tcp://b:1", "tcp://c:1"];
        let two = ["tcp://a:1", "tcp://b:1"];
        for n in 0..2000 {
            let before = three[rank(&key(n), &three)[0]];
            let after = two[rank(&key(n), &two)[0]];
            if before != "tcp://c:1" {
                assert_eq!(before, after, "key {n} moved though its host stayed");
            }
        }
    }

    #[test]
    fn a_failed_host_is_skipped_then_retried() {
        let hosts = ["tcp://a:1", "tcp://b:1"];
        let t0 = Instant::now();
        let mut health = HostHealth::new(2, DEFAULT_BACKOFF);
        let k = key(7);
        let first = rank(&k, &hosts)[0];
        health.mark_down(first, t0, "connection refused");
        assert_eq!(health.candidates(&k, &hosts, t0), vec![1 - first]);
        assert_eq!(health.skipped(first, t0), Some("connection refused"));
        assert_eq!(
            health.candidates(&k, &hosts, t0 + DEFAULT_BACKOFF)[0],
            first,
            "back after the back-off"
        );
        health.mark_down(1 - first, t0, "timed out");
        assert!(health.candidates(&k, &hosts, t0).is_empty());
    }
}
