//! Compile slots shared fairly between connections.
//!
//! A plain FIFO semaphore lets one connection that queues a thousand jobs take every slot
//! for as long as its queue lasts, while a newcomer with one job waits behind all of them.
//! Here waiters queue per connection and freed slots go round-robin to the connections
//! that are waiting, so each connection with work gets its turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Identifies a connection for fairness.
pub(crate) type ConnId = u64;

#[derive(Debug, Default)]
struct Inner {
    free: usize,
    /// Connections with waiters, in the order they get the next slot.
    turn: VecDeque<ConnId>,
    waiters: HashMap<ConnId, VecDeque<oneshot::Sender<SlotPermit>>>,
}

/// The pool of compile slots.
#[derive(Debug)]
pub(crate) struct FairSlots {
    inner: Mutex<Inner>,
    /// Slots in all, busy or free.
    total: usize,
}

/// One compile slot; given back (to the next connection in turn) when dropped.
#[derive(Debug)]
pub(crate) struct SlotPermit {
    slots: Arc<FairSlots>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.slots.release();
    }
}

impl FairSlots {
    pub(crate) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                free: n,
                ..Inner::default()
            }),
            total: n,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section is a few queue operations; poisoning cannot tear them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot now, if one is free and nobody is waiting for one (no barging past the
    /// queue).
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<SlotPermit> {
        let mut inner = self.lock();
        if inner.free > 0 && inner.turn.is_empty() {
            inner.free -= 1;
            return Some(SlotPermit {
                slots: self.clone(),
            });
        }
        None
    }

    /// Queues for a slot on behalf of `conn`; the receiver resolves when it is this
    /// waiter's turn. Dropping the receiver leaves the queue.
    pub(crate) fn acquire(self: &Arc<Self>, conn: ConnId) -> oneshot::Receiver<SlotPermit> {
        let (tx, rx) = oneshot::channel();
        if let Some(permit) = self.try_acquire() {
            let _ = tx.send(permit);
            return rx;
        }
        let mut inner = self.lock();
        let queue = inner.waiters.entry(conn).or_default();
        queue.push_back(tx);
        if queue.len() == 1 {
            inner.turn.push_back(conn);
        }
        rx
    }

    /// Gives a slot to the first live waiter of the next connection in turn, or back to
    /// the pool.
    fn release(self: &Arc<Self>) {
        // A permit whose waiter vanished between the check and the send comes back here;
        // it is dropped (and so released again) only after the lock is let go.
        let mut bounced = Vec::new();
        {
            let mut inner = self.lock();
            let mut granted = false;
            while let Some(conn) = inner.turn.pop_front() {
                let Some(queue) = inner.waiters.get_mut(&conn) else {
                    continue;
                };
                while let Some(tx) = queue.pop_front() {
                    if tx.is_closed() {
                        continue;
                    }
                    let permit = SlotPermit {
                        slots: self.clone(),
                    };
                    if let Err(p) = tx.send(permit) {
                        bounced.push(p);
                        continue;
                    }
                    granted = true;
                    break;
                }
                if queue.is_empty() {
                    inner.waiters.remove(&conn);
                } else {
                    inner.turn.push_back(conn);
                }
                if granted || !bounced.is_empty() {
                    break;
                }
            }
            if !granted && bounced.is_empty() {
                inner.free += 1;
            }
        }
        drop(bounced);
    }

    /// Slots in use now, and jobs queued for one (waiters that left are not counted).
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        let waiting = inner
            .waiters
            .values()
            .map(|q| q.iter().filter(|tx| !tx.is_closed()).count())
            .sum();
        (self.total.saturating_sub(inner.free), waiting)
    }

    /// Slots free now.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().free
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn freed_slots_go_round_robin_between_waiting_connections() {
        let slots = FairSlots::new(1);
        let first = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        // Connection 1 queues three jobs, then connection 2 one.
        let mut a: Vec<_> = (0..3).map(|_| slots.acquire(1)).collect();
        let mut b = slots.acquire(2);
        drop(first);
        let p1 = a.remove(0).await.unwrap();
        drop(p1);
        // Connection 2's single job is next, ahead of connection 1's second.
        let p2 = (&mut b).await.unwrap();
        assert!(a[0].try_recv().is_err());
        drop(p2);
        let p3 = a.remove(0).await.unwrap();
        drop(p3);
        let p4 = a.remove(0).await.unwrap();
        drop(p4);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_left_does_not_keep_a_slot() {
        let slots = FairSlots::new(1);
        let first = slots.try_acquire().unwrap();
        let gone = slots.acquire(1);
        let mut stays = slots.acquire(2);
        drop(gone);
        drop(first);
        let p = (&mut stays).await.unwrap();
        drop(p);
        assert_eq!(slots.free(), 1);
        assert!(slots.try_acquire().is_some());
    }
}
