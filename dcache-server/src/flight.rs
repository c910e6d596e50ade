//! Single-flight: identical compiles in flight run once, and every job that asked for the
//! same key while one ran gets its result.
//!
//! [`Flights::lead_or_join`] decides, atomically, whether a job leads the compile of a key
//! or joins the one already in flight. The [`Lead`] is the group: while it lives, jobs
//! asking for its key join it; it [publishes](Lead::publish) a result, and dropping it is
//! the one and only place an entry leaves the map (publishing [`Published::Failed`] first
//! if nothing was published, so no joiner waits for ever).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dcache_proto::JobResult;
use tokio::sync::watch;

use crate::lock;
use crate::store::StoreKey;

/// What the leader of a group tells the jobs that joined it.
#[derive(Clone, Debug)]
pub(crate) enum Published {
    /// The result, good to serve under the group's key.
    Result(JobResult),
    /// No result is coming (the compile failed, was cancelled or was not verified):
    /// each joiner compiles for itself.
    Failed,
}

/// A group's channel: `None` until the leader publishes.
type Slot = watch::Receiver<Option<Published>>;

/// The groups in flight, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    groups: Mutex<HashMap<StoreKey, Slot>>,
}

/// A job's place in single-flight: it leads the group of its key, or joined it.
#[derive(Debug)]
pub(crate) enum Flight {
    /// No identical compile was in flight: this job's compile is the group's.
    Lead(Lead),
    /// An identical compile is in flight: wait for what it publishes.
    Join(Join),
}

impl Flights {
    /// Leads the group of `key` if there is none, else joins it. Decided under one lock,
    /// so two jobs racing on one key cannot both lead.
    pub(crate) fn lead_or_join(self: &Arc<Self>, key: StoreKey) -> Flight {
        let mut groups = lock(&self.groups);
        if let Some(rx) = groups.get(&key) {
            return Flight::Join(Join(rx.clone()));
        }
        let (tx, rx) = watch::channel(None);
        groups.insert(key, rx);
        Flight::Lead(Lead {
            flights: self.clone(),
            key,
            tx,
        })
    }

    /// Groups in flight right now.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.groups).len()
    }
}

/// The leader of a group. Jobs asking for its key join it for as long as it lives.
#[derive(Debug)]
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: StoreKey,
    tx: watch::Sender<Option<Published>>,
}

impl Lead {
    /// Gives `result` to every joiner, those to come included: keeping the lead after
    /// publishing keeps answering with the result (until the store has it, say).
    pub(crate) fn publish(&self, result: JobResult) {
        self.tx.send_replace(Some(Published::Result(result)));
    }
}

impl Drop for Lead {
    /// The one place a group ends: it leaves the map, and if it published nothing its
    /// joiners hear [`Published::Failed`].
    fn drop(&mut self) {
        {
            let mut groups = lock(&self.flights.groups);
            // Only ever this lead's own entry: a key has one group at a time, and a new
            // one can only be made after this one is gone.
            if groups
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
            {
                groups.remove(&self.key);
            }
        }
        self.tx.send_if_modified(|p| {
            if p.is_some() {
                return false;
            }
            *p = Some(Published::Failed);
            true
        });
    }
}

/// A job that joined a group.
#[derive(Debug)]
pub(crate) struct Join(Slot);

impl Join {
    /// What the leader publishes; [`Published::Failed`] if it is gone without a word.
    pub(crate) async fn wait(mut self) -> Published {
        match self.0.wait_for(Option::is_some).await {
            Ok(p) => p.clone().unwrap_or(Published::Failed),
            Err(_) => Published::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> StoreKey {
        StoreKey([n; 32])
    }

    fn result(exit_code: i32) -> JobResult {
        JobResult {
            exit_code,
            ..JobResult::default()
        }
    }

    fn lead(f: &Arc<Flights>, k: StoreKey) -> Lead {
        match f.lead_or_join(k) {
            Flight::Lead(l) => l,
            Flight::Join(_) => panic!("expected to lead"),
        }
    }

    fn join(f: &Arc<Flights>, k: StoreKey) -> Join {
        match f.lead_or_join(k) {
            Flight::Join(j) => j,
            Flight::Lead(_) => panic!("expected to join"),
        }
    }

    #[tokio::test]
    async fn one_leads_the_others_join_and_get_the_result() {
        let f = Arc::new(Flights::default());
        let l = lead(&f, key(1));
        let a = join(&f, key(1));
        // Another key is another group.
        drop(lead(&f, key(2)));
        l.publish(result(7));
        // Joining after the result, while the lead lives, still gets it.
        let b = join(&f, key(1));
        for j in [a, b] {
            assert!(matches!(j.wait().await, Published::Result(r) if r.exit_code == 7));
        }
        drop(l);
        assert_eq!(f.len(), 0);
        drop(lead(&f, key(1)));
    }

    #[tokio::test]
    async fn a_lead_dropped_without_a_result_fails_its_joiners_and_ends_the_group() {
        let f = Arc::new(Flights::default());
        let l = lead(&f, key(1));
        let j = join(&f, key(1));
        drop(l);
        assert!(matches!(j.wait().await, Published::Failed));
        assert_eq!(f.len(), 0);
        drop(lead(&f, key(1)));
    }
}
