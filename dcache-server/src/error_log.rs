//! Server errors logged once per cause, not once per job: when the store cannot be
//! written or a compiler cannot be started, every job hits the same wall, and a log that
//! repeats it a thousand times a minute hides everything else (and fills the journal).
//!
//! The first failure of a cause is logged at once; repeats within [`WINDOW`] are only
//! counted; the first one after it is logged again with the number suppressed since the
//! last line, so an operator sees both that it goes on and how often.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long repeats of one cause are counted rather than logged.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Causes remembered at once. Causes are named by the server (a tier and an error kind, a
/// compiler and an error kind), so there are few; the bound only keeps a bug from
/// growing the map without end.
const MAX_CAUSES: usize = 256;

/// One cause's state.
struct Seen {
    /// When it was last logged.
    logged: Instant,
    /// Repeats since then, not logged.
    suppressed: u64,
}

/// What [`ErrorLog::decide`] says about one occurrence.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Log it, saying how many repeats went unlogged before it.
    Log {
        /// Repeats suppressed since the cause was last logged.
        suppressed: u64,
    },
    /// Count it only.
    Suppress,
}

/// The per-cause record of errors logged, shared by a service's connections.
#[derive(Default)]
pub(crate) struct ErrorLog {
    seen: Mutex<HashMap<String, Seen>>,
}

impl ErrorLog {
    /// Logs `message` as a warning if its `cause` was not logged within [`WINDOW`].
    pub(crate) fn report(&self, cause: &str, message: &dyn std::fmt::Display) {
        match self.decide(cause, Instant::now()) {
            Decision::Log { suppressed: 0 } => tracing::warn!(cause, "{message}"),
            Decision::Log { suppressed } => tracing::warn!(
                cause,
                suppressed,
                "{message} (and {suppressed} more like it since the last report)"
            ),
            Decision::Suppress => {}
        }
    }

    /// Whether an occurrence of `cause` at `now` is logged.
    pub(crate) fn decide(&self, cause: &str, now: Instant) -> Decision {
        let mut seen = crate::lock(&self.seen);
        if let Some(s) = seen.get_mut(cause) {
            if now.saturating_duration_since(s.logged) < WINDOW {
                s.suppressed += 1;
                return Decision::Suppress;
            }
            let suppressed = std::mem::take(&mut s.suppressed);
            s.logged = now;
            return Decision::Log { suppressed };
        }
        if seen.len() >= MAX_CAUSES {
            seen.retain(|_, s| now.saturating_duration_since(s.logged) < WINDOW);
            if seen.len() >= MAX_CAUSES {
                seen.clear();
            }
        }
        seen.insert(
            cause.to_owned(),
            Seen {
                logged: now,
                suppressed: 0,
            },
        );
        Decision::Log { suppressed: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_logged_once_per_window_with_the_count_of_repeats() {
        let log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.decide("store", t0), Decision::Log { suppressed: 0 });
        for i in 1..=99 {
            let at = t0 + Duration::from_millis(i * 100);
            assert_eq!(log.decide("store", at), Decision::Suppress);
        }
        // Another cause is not held back by the first.
        assert_eq!(
            log.decide("exec gcc", t0 + Duration::from_secs(1)),
            Decision::Log { suppressed: 0 }
        );
        let later = t0 + WINDOW + Duration::from_secs(1);
        assert_eq!(log.decide("store", later), Decision::Log { suppressed: 99 });
        assert_eq!(log.decide("store", later), Decision::Suppress);
        assert_eq!(
            log.decide("store", later + WINDOW),
            Decision::Log { suppressed: 1 }
        );
    }

    #[test]
    fn the_number_of_causes_remembered_is_bounded() {
        let log = ErrorLog::default();
        let t0 = Instant::now();
        for i in 0..(MAX_CAUSES * 3) {
            assert_eq!(
                log.decide(&format!("cause {i}"), t0),
                Decision::Log { suppressed: 0 }
            );
        }
        assert!(crate::lock(&log.seen).len() <= MAX_CAUSES);
    }
}
