//! Writing results to the store in the background, after they have been answered, and
//! waiting for those writes to finish.

use std::sync::Arc;

use dcache_proto::JobResult;
use tokio::sync::watch;

use crate::counters::Counters;
use crate::error_log::ErrorLog;
use crate::flight::Lead;
use crate::store::{Store, StoreKey};

/// Stores results off the connection's path, and counts the writes still running so a
/// stop can [`flush`](Self::flush) them.
pub(crate) struct StoreWriter {
    store: Arc<dyn Store>,
    counters: Arc<Counters>,
    /// Where a failed write is reported, once per cause.
    errors: Arc<ErrorLog>,
    /// Writes started and not yet finished.
    pending: watch::Sender<usize>,
}

impl StoreWriter {
    /// A writer into `store`, counting its failures in `counters.store_errors` and
    /// logging them in `errors`, once per cause.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        counters: Arc<Counters>,
        errors: Arc<ErrorLog>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            counters,
            errors,
            pending: watch::Sender::new(0),
        })
    }

    /// Stores `result` under `key` in the background. `lead`, the single-flight group
    /// that published this result, is kept until the store has it (or failed to take
    /// it), so a job asking for the key meanwhile still gets the result.
    pub(crate) fn write(self: &Arc<Self>, key: StoreKey, result: JobResult, lead: Option<Lead>) {
        // Counted before the task starts, so a flush that follows waits for it.
        self.pending.send_modify(|n| *n += 1);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.store.put(&key, &result).await {
                Counters::bump(&me.counters.store_errors);
                let cause = match &e {
                    crate::store::StoreError::Io(io) => format!("store write: {:?}", io.kind()),
                    crate::store::StoreError::TooLarge(_) => "store write: too large".into(),
                    _ => "store write: unrepresentable".into(),
                };
                me.errors.report(
                    &cause,
                    &format_args!("cannot store a result in the cache: {e}"),
                );
            }
            // Joiners from now on find the result in the store.
            drop(lead);
            me.pending.send_modify(|n| *n -= 1);
        });
    }

    /// Waits until every write started so far has finished (stored or failed).
    pub(crate) async fn flush(&self) {
        let mut pending = self.pending.subscribe();
        let _ = pending.wait_for(|n| *n == 0).await;
    }
}
