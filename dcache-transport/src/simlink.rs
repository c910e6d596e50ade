//! A simulated network link: two connected streams with latency, bandwidth and a bounded
//! buffer in each direction, running on tokio's clock.
//!
//! Under `tokio::time::pause()` time is virtual: a 40 ms × 2 MiB transfer completes in
//! microseconds of real time, with exact and repeatable timings. The model, per direction:
//!
//! - bytes are serialized in order at `bandwidth` bytes per second: a write starts
//!   serializing when the previous bytes have finished or when it is made, whichever is
//!   later, so a byte cannot arrive before `latency + bytes_before_it / bandwidth` after
//!   the link went busy;
//! - each byte then takes `latency` to arrive;
//! - at most `buffer` bytes may be written and not yet read; a writer beyond that waits.
//!   This plays the part of the socket buffers: bytes inside it are committed and will be
//!   delivered, which is exactly what an early result can no longer stop.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Writes are cut into segments of at most this size, so arrival is progressive: the first
/// bytes of a large write arrive before its last ones, as on a real link.
const SEGMENT: usize = 16 * 1024;

/// The shape of one direction of a simulated link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// One-way latency.
    pub latency: Duration,
    /// Bytes per second; 0 means unlimited.
    pub bandwidth: u64,
    /// Bytes written and not yet read before the writer must wait.
    pub buffer: usize,
}

impl LinkConfig {
    /// Time to serialize `n` bytes.
    pub fn serialization(&self, n: usize) -> Duration {
        if self.bandwidth == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((n as u128 * 1_000_000_000 / u128::from(self.bandwidth)) as u64)
    }
}

#[derive(Debug, Default)]
struct Direction {
    segments: VecDeque<(Instant, Bytes)>,
    free_at: Option<Instant>,
    unread: usize,
    write_closed: bool,
    read_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

fn lock(d: &Mutex<Direction>) -> std::sync::MutexGuard<'_, Direction> {
    // Every critical section leaves the state consistent before any call that could
    // panic, so a poisoned lock is still usable.
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end of a simulated link.
#[derive(Debug)]
pub struct SimStream {
    config: LinkConfig,
    outgoing: Arc<Mutex<Direction>>,
    incoming: Arc<Mutex<Direction>>,
    sleep: Option<(Instant, Pin<Box<Sleep>>)>,
}

/// Two connected ends: what `a` writes, `b` reads after the simulated delay, and back.
/// `a_to_b` shapes the direction from `a` to `b`, `b_to_a` the other one.
pub fn link(a_to_b: LinkConfig, b_to_a: LinkConfig) -> (SimStream, SimStream) {
    let ab = Arc::new(Mutex::new(Direction::default()));
    let ba = Arc::new(Mutex::new(Direction::default()));
    (
        SimStream {
            config: a_to_b,
            outgoing: ab.clone(),
            incoming: ba.clone(),
            sleep: None,
        },
        SimStream {
            config: b_to_a,
            outgoing: ba,
            incoming: ab,
            sleep: None,
        },
    )
}

/// A link with the same shape both ways.
pub fn symmetric(config: LinkConfig) -> (SimStream, SimStream) {
    link(config, config)
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let wait_until = {
                let mut guard = lock(&self.incoming);
                let d = &mut *guard;
                match d.segments.front_mut() {
                    Some((arrival, data)) if *arrival <= Instant::now() => {
                        let n = data.len().min(buf.remaining());
                        buf.put_slice(&data.split_to(n));
                        if data.is_empty() {
                            d.segments.pop_front();
                        }
                        d.unread -= n;
                        if let Some(w) = d.writer.take() {
                            w.wake();
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Some((arrival, _)) => *arrival,
                    None if d.write_closed => return Poll::Ready(Ok(())),
                    None => {
                        d.reader = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            };
            // The next bytes are on the wire: sleep until they land.
            let this = &mut *self;
            match &mut this.sleep {
                Some((at, sleep)) if *at == wait_until => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.sleep = None;
                }
                _ => {
                    this.sleep = Some((wait_until, Box::pin(tokio::time::sleep_until(wait_until))));
                }
            }
        }
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut d = lock(&self.outgoing);
        if d.read_closed || d.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "simulated link closed",
            )));
        }
        let room = self.config.buffer.saturating_sub(d.unread);
        if room == 0 {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(room).min(SEGMENT);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let now = Instant::now();
        let start = d.free_at.map_or(now, |f| f.max(now));
        let done = start + self.config.serialization(n);
        d.free_at = Some(done);
        d.unread += n;
        d.segments.push_back((
            done + self.config.latency,
            Bytes::copy_from_slice(&buf[..n]),
        ));
        if let Some(w) = d.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut d = lock(&self.outgoing);
        d.write_closed = true;
        if let Some(w) = d.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        {
            let mut d = lock(&self.outgoing);
            d.write_closed = true;
            if let Some(w) = d.reader.take() {
                w.wake();
            }
        }
        let mut d = lock(&self.incoming);
        d.read_closed = true;
        d.segments.clear();
        if let Some(w) = d.writer.take() {
            w.wake();
        }
    }
}
