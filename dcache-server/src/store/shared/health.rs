//! Whether the shared store is reachable, so an outage is logged once when it starts and
//! once when it ends, however many jobs run into it meanwhile (each failure is still
//! counted).

use std::sync::atomic::{AtomicBool, Ordering};

/// The last known state of one shared store.
#[derive(Debug)]
pub(crate) struct Health {
    /// The store as it is named in logs (no credentials).
    what: String,
    down: AtomicBool,
}

impl Health {
    pub(crate) fn new(what: String) -> Self {
        Self {
            what,
            down: AtomicBool::new(false),
        }
    }

    /// An operation failed for the environment: logs it if the store was up until now.
    pub(crate) fn failed(&self, why: &dyn std::fmt::Display) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "shared cache {} unavailable ({why}); serving from the local tiers and \
                 compiling until it is back",
                self.what
            );
        }
    }

    /// An operation succeeded: logs the end of an outage, if there was one.
    pub(crate) fn ok(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("shared cache {} reachable again", self.what);
        }
    }
}
