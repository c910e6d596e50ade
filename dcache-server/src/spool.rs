//! Where the source of a job waiting for a compile slot waits: in memory up to a
//! server-wide budget, in an anonymous temporary file beyond it.
//!
//! Without this, a thousand clients uploading at once to a server with a few compile slots
//! would hold a thousand sources in memory. With it, memory holds at most the budget and
//! the rest waits on disk, where it costs page cache the kernel can reclaim.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Read size when replaying a spilled source into a compiler.
const REPLAY_CHUNK: usize = 64 * 1024;

/// The server-wide allowances of source bytes held by waiting jobs: in memory, and in
/// temporary files once memory is spent. Past both, a job's upload is refused (the
/// service answers OVERLOADED) rather than filling the disk.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
    disk_used: AtomicUsize,
    disk_limit: usize,
}

fn try_take(counter: &AtomicUsize, limit: usize, n: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            (u.saturating_add(n) <= limit).then_some(u + n)
        })
        .is_ok()
}

impl Budget {
    pub(crate) fn new(limit: usize, disk_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            disk_used: AtomicUsize::new(0),
            disk_limit,
        })
    }

    fn try_take(&self, n: usize) -> bool {
        try_take(&self.used, self.limit, n)
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes waiting in temporary files now.
    pub(crate) fn disk_used(&self) -> usize {
        self.disk_used.load(Ordering::Acquire)
    }

    /// Bytes held in memory now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `n` bytes of the memory allowance for as long as the returned share lives,
    /// if that many are free: for a source held whole in memory outside a spool (a distcc
    /// upload, which must be read to its end before anything is answered).
    pub(crate) fn share(self: &Arc<Self>, n: usize) -> Option<MemoryShare> {
        self.try_take(n).then(|| MemoryShare {
            budget: self.clone(),
            n,
        })
    }
}

/// Part of the memory allowance, given back when dropped.
#[derive(Debug)]
pub(crate) struct MemoryShare {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for MemoryShare {
    fn drop(&mut self) {
        self.budget.give_back(self.n);
    }
}

/// The source received so far for one job.
#[derive(Debug)]
pub(crate) struct Spool {
    budget: Arc<Budget>,
    chunks: Vec<Bytes>,
    in_memory: usize,
    file: Option<File>,
    disk: DiskShare,
}

/// Bytes of the disk allowance one spilled source holds, given back when dropped (after
/// its replay, or with the job).
#[derive(Debug)]
struct DiskShare {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for DiskShare {
    fn drop(&mut self) {
        self.budget
            .disk_used
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Spool {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Self {
            disk: DiskShare {
                budget: budget.clone(),
                bytes: 0,
            },
            budget,
            chunks: Vec::new(),
            in_memory: 0,
            file: None,
        }
    }

    /// Keeps `data`: in memory while the budget allows and nothing was spilled yet (the
    /// order of the bytes must survive), on disk otherwise.
    pub(crate) fn push(&mut self, data: Bytes) -> std::io::Result<()> {
        if self.file.is_none() && self.budget.try_take(data.len()) {
            self.in_memory += data.len();
            // A received chunk is a slice of a larger receive buffer; keeping the slice
            // would keep the whole buffer alive and break the budget's arithmetic. Waiting
            // jobs pay one copy so the budget counts what memory really holds.
            self.chunks.push(Bytes::copy_from_slice(&data));
            return Ok(());
        }
        if !try_take(&self.budget.disk_used, self.budget.disk_limit, data.len()) {
            return Err(std::io::Error::other(format!(
                "the {} bytes of disk for waiting uploads are in use",
                self.budget.disk_limit
            )));
        }
        self.disk.bytes += data.len();
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(tempfile::tempfile()?),
        };
        file.write_all(&data)
    }

    /// Whether nothing has been kept yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.file.is_none()
    }

    /// Whether part of the source is on disk: such a job is compiled only once its source
    /// is complete, so the replay cannot interleave with bytes still arriving.
    pub(crate) fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Sends everything kept, in order, into a compile's input. Memory chunks go at once;
    /// a spilled file is replayed from a blocking task. `then` stays open for more chunks
    /// (streaming) or is dropped by the caller to end the source.
    pub(crate) fn drain_into(mut self, tx: &mpsc::UnboundedSender<Bytes>) {
        for chunk in std::mem::take(&mut self.chunks) {
            let _ = tx.send(chunk);
        }
        self.budget.give_back(std::mem::take(&mut self.in_memory));
        if let Some(mut file) = self.file.take() {
            let tx = tx.clone();
            let disk = std::mem::replace(
                &mut self.disk,
                DiskShare {
                    budget: self.budget.clone(),
                    bytes: 0,
                },
            );
            tokio::task::spawn_blocking(move || {
                let _disk = disk;
                if file.seek(SeekFrom::Start(0)).is_err() {
                    return;
                }
                loop {
                    let mut buf = vec![0u8; REPLAY_CHUNK];
                    match file.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.send(Bytes::from(buf)).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.budget.give_back(self.in_memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spills_past_the_budget_and_replays_in_order() {
        let budget = Budget::new(100, 1 << 20);
        let mut a = Spool::new(budget.clone());
        let mut b = Spool::new(budget.clone());
        a.push(Bytes::from(vec![1u8; 60])).unwrap();
        b.push(Bytes::from(vec![2u8; 30])).unwrap();
        assert_eq!(budget.used(), 90);
        // Over the budget: this and everything after it goes to disk, in order.
        a.push(Bytes::from(vec![3u8; 50])).unwrap();
        a.push(Bytes::from(vec![4u8; 5])).unwrap();
        assert!(a.spilled() && !b.spilled());
        assert_eq!(budget.used(), 90, "spilled bytes are not held in memory");
        let (tx, mut rx) = mpsc::unbounded_channel();
        a.drain_into(&tx);
        drop(tx);
        let mut got = Vec::new();
        while let Some(c) = rx.recv().await {
            got.extend_from_slice(&c);
        }
        let mut want = vec![1u8; 60];
        want.extend([3u8; 50]);
        want.extend([4u8; 5]);
        assert_eq!(got, want);
        assert_eq!(budget.used(), 30, "drained memory is given back");
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped spool gives its memory back");
    }

    #[tokio::test]
    async fn the_disk_budget_refuses_past_its_limit_and_is_given_back() {
        // No memory to speak of, 100 bytes of disk.
        let budget = Budget::new(0, 100);
        let mut a = Spool::new(budget.clone());
        let mut b = Spool::new(budget.clone());
        a.push(Bytes::from(vec![1u8; 70])).unwrap();
        let err = b.push(Bytes::from(vec![2u8; 40])).unwrap_err();
        assert!(err.to_string().contains("100 bytes of disk"), "{err}");
        b.push(Bytes::from(vec![2u8; 30])).unwrap();
        assert_eq!(budget.disk_used(), 100);
        // A replayed spool gives its disk back once the replay is done.
        let (tx, mut rx) = mpsc::unbounded_channel();
        a.drain_into(&tx);
        drop(tx);
        let mut got = 0;
        while let Some(c) = rx.recv().await {
            got += c.len();
        }
        assert_eq!(got, 70);
        for _ in 0..1000 {
            if budget.disk_used() == 30 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.disk_used(), 30);
        drop(b);
        assert_eq!(budget.disk_used(), 0, "a dropped spool gives its disk back");
    }
}
