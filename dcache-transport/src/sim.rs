//! A simulated network link: two connected streams with latency, bandwidth and a bounded
//! buffer in each direction, running on tokio's clock.
//!
//! Benchmarks compare the protocol's strategies against the physical limit of a link
//! (round trip, bandwidth, bytes in flight); real networks are too noisy and too slow to
//! sweep, so this link reproduces their arithmetic instead. [`SimStream`] implements
//! `AsyncRead + AsyncWrite`, so it goes anywhere a socket goes (it is a
//! [`Stream`](crate::Stream)).
//!
//! # The model, per direction
//!
//! - **Serialization.** Bytes leave in order at [`LinkConfig::bandwidth`] bytes per
//!   second. A byte starts serializing when the previous byte has finished or when it is
//!   written, whichever is later; the link is busy from the first write until the last
//!   byte has left. Serialization ends are computed from the byte count of the whole busy
//!   period (`busy_start + bytes / bandwidth`, rounded up to the nanosecond), so rounding
//!   never accumulates across segments.
//! - **Latency.** A byte arrives [`LinkConfig::latency`] after it finished serializing:
//!   no byte can arrive before `written + latency + (bytes queued before it, itself
//!   included) / bandwidth`.
//! - **Segments.** A write is cut into segments of at most [`LinkConfig::segment`] bytes;
//!   a segment arrives whole when its last byte does, like a packet, so a large write
//!   arrives progressively.
//! - **Buffer.** At most [`LinkConfig::buffer`] bytes may be written and not yet read by
//!   the peer: queued, on the wire, or arrived but unread. A writer beyond that waits
//!   (`poll_write` is pending) until the reader takes bytes. With a reader that keeps up
//!   this is the send buffer (bytes queued plus in flight); with a reader that stops, it is
//!   also what bounds memory. Bytes inside it are committed and will be delivered, which
//!   is exactly the part of an upload that an early result can no longer stop.
//! - **End of stream.** `shutdown` (or dropping the writing end) sends an end of stream
//!   that arrives `latency` after the last byte has left, so the reader sees every byte,
//!   then EOF. Dropping an end makes the other end's writes fail at once with
//!   `BrokenPipe` (a real peer would answer with a reset one round trip later; failing at
//!   once is simpler and never hangs).
//!
//! # Time
//!
//! Everything runs on [`tokio::time`]. Under `tokio::time::pause()` (or
//! `#[tokio::test(start_paused = true)]`) time is virtual: a 2 MiB transfer over a 40 ms
//! round trip completes in well under a millisecond of real time, with the same result on
//! every run.
//!
//! The model itself is exact to the nanosecond: stepping the clock with
//! `tokio::time::advance`, bytes become readable at exactly their computed instant (the
//! tests check this). A reader that *waits* for bytes, however, sleeps on tokio's timer,
//! which fires on whole milliseconds, so with auto-advancing paused time it observes an
//! arrival at the next millisecond tick (deterministically). To measure sub-millisecond
//! effects through waiting code, dilate time: multiply every latency by k and divide every
//! bandwidth by k, and one millisecond of virtual time is 1/k ms of the scenario.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The shape of one direction of a simulated link.
///
/// `#[non_exhaustive]` so the model can grow (loss, jitter) without breaking callers: build
/// one with [`LinkConfig::new`] and the `with_` methods, or change fields of an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkConfig {
    /// One-way latency: the time from a byte leaving the sender to its arrival.
    pub latency: Duration,
    /// Bytes per second (100 Mbit/s is 12 500 000); 0 means unlimited, for tests that are
    /// about latency alone.
    pub bandwidth: u64,
    /// Bytes written and not yet read before the writer must wait: the link's send buffer
    /// (see the module documentation). At least one byte is always accepted.
    pub buffer: usize,
    /// Largest segment, in bytes: the granularity at which a large write arrives.
    pub segment: usize,
}

impl LinkConfig {
    /// A link with this one-way latency and bandwidth (bytes per second, 0 for unlimited),
    /// a 256 KiB buffer (what the TCP transport asks the kernel for) and 16 KiB segments.
    pub fn new(latency: Duration, bandwidth: u64) -> Self {
        Self {
            latency,
            bandwidth,
            buffer: 256 * 1024,
            segment: 16 * 1024,
        }
    }

    /// This link with another buffer size.
    pub fn with_buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }

    /// This link with another segment size.
    pub fn with_segment(mut self, bytes: usize) -> Self {
        self.segment = bytes;
        self
    }

    /// Time to serialize `bytes` bytes at this bandwidth, rounded up to the nanosecond (a
    /// byte never arrives early).
    pub fn serialization(&self, bytes: u64) -> Duration {
        if self.bandwidth == 0 {
            return Duration::ZERO;
        }
        let nanos = (u128::from(bytes) * 1_000_000_000).div_ceil(u128::from(self.bandwidth));
        // Beyond u64 nanoseconds (584 years) the link is effectively stalled.
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// A segment on its way: when it arrives and what it carries.
#[derive(Debug)]
struct Segment {
    arrival: Instant,
    data: Bytes,
}

/// One direction of the link, shared by its writing end and its reading end.
#[derive(Debug)]
struct Direction {
    config: LinkConfig,
    /// Written and not yet fully read, in order of arrival.
    segments: VecDeque<Segment>,
    /// Start of the link's current busy period and the bytes serialized in it.
    busy_start: Instant,
    busy_bytes: u64,
    /// When the last byte written finishes serializing.
    free_at: Instant,
    /// Bytes written and not yet read: what [`LinkConfig::buffer`] limits.
    unread: usize,
    /// When the end of stream reaches the reader, once the writer has shut down.
    eof_at: Option<Instant>,
    /// The reading end is gone: writes fail.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Direction {
    fn new(config: LinkConfig) -> Self {
        let now = Instant::now();
        Self {
            config,
            segments: VecDeque::new(),
            busy_start: now,
            busy_bytes: 0,
            free_at: now,
            unread: 0,
            eof_at: None,
            reader_gone: false,
            reader: None,
            writer: None,
        }
    }

    /// Puts `data` on the link at `now`.
    fn send(&mut self, now: Instant, data: &[u8]) {
        if now >= self.free_at {
            // The link was idle: a new busy period starts now.
            self.busy_start = now;
            self.busy_bytes = 0;
        }
        for chunk in data.chunks(self.config.segment.max(1)) {
            self.busy_bytes += chunk.len() as u64;
            self.free_at = self.busy_start + self.config.serialization(self.busy_bytes);
            self.segments.push_back(Segment {
                arrival: self.free_at + self.config.latency,
                data: Bytes::copy_from_slice(chunk),
            });
        }
        self.unread += data.len();
        wake(&mut self.reader);
    }

    /// The writer is done: end of stream follows the last byte.
    fn close_write(&mut self, now: Instant) {
        if self.eof_at.is_none() {
            self.eof_at = Some(self.free_at.max(now) + self.config.latency);
            wake(&mut self.reader);
        }
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

fn lock(d: &Mutex<Direction>) -> MutexGuard<'_, Direction> {
    // No critical section can panic half-way through an update (they are arithmetic and
    // queue operations on owned data), so a poisoned lock still holds consistent state.
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end of a simulated link: reads what the other end wrote, after the modelled delay.
/// Dropping it closes both directions (see the module documentation).
#[derive(Debug)]
pub struct SimStream {
    outgoing: Arc<Mutex<Direction>>,
    incoming: Arc<Mutex<Direction>>,
    /// The timer a reader waits on for the next arrival; kept so a re-poll for the same
    /// instant reuses it.
    sleep: Option<Pin<Box<Sleep>>>,
}

/// Two connected ends: what `a` writes, `b` reads after the simulated delay, and back.
/// `a_to_b` shapes the direction from `a` to `b`, `b_to_a` the other one, so asymmetric
/// links (a slow uplink) can be modelled.
pub fn link(a_to_b: LinkConfig, b_to_a: LinkConfig) -> (SimStream, SimStream) {
    let ab = Arc::new(Mutex::new(Direction::new(a_to_b)));
    let ba = Arc::new(Mutex::new(Direction::new(b_to_a)));
    (
        SimStream {
            outgoing: ab.clone(),
            incoming: ba.clone(),
            sleep: None,
        },
        SimStream {
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

impl SimStream {
    /// Waits (registering the timer) until `at`; ready if it has passed.
    fn poll_sleep_until(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != at {
                    s.as_mut().reset(at);
                }
                s
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        sleep.as_mut().poll(cx)
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let wait_until = {
                let mut guard = lock(&this.incoming);
                let d = &mut *guard;
                let now = Instant::now();
                let mut taken = 0;
                while buf.remaining() > 0 {
                    let Some(seg) = d.segments.front_mut() else {
                        break;
                    };
                    if seg.arrival > now {
                        break;
                    }
                    let n = seg.data.len().min(buf.remaining());
                    buf.put_slice(&seg.data.split_to(n));
                    taken += n;
                    if seg.data.is_empty() {
                        d.segments.pop_front();
                    }
                }
                if taken > 0 || buf.remaining() == 0 {
                    d.unread -= taken;
                    wake(&mut d.writer);
                    return Poll::Ready(Ok(()));
                }
                match (d.segments.front(), d.eof_at) {
                    (Some(seg), _) => seg.arrival,
                    (None, Some(eof)) if eof <= now => return Poll::Ready(Ok(())),
                    (None, Some(eof)) => eof,
                    (None, None) => {
                        // Nothing on the way: the writer wakes us when it sends.
                        d.reader = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            };
            // The next bytes (or the end of stream) are on the wire: sleep until they land.
            // Nothing that arrives later can overtake them, so no other wake-up is needed.
            if this.poll_sleep_until(cx, wait_until).is_pending() {
                return Poll::Pending;
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
        if d.reader_gone {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "simulated link: the peer is gone",
            )));
        }
        if d.eof_at.is_some() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "simulated link: write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = d.config.buffer.max(1).saturating_sub(d.unread);
        if room == 0 {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(room);
        d.send(Instant::now(), &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already committed to the link, as with a socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.outgoing).close_write(Instant::now());
        Poll::Ready(Ok(()))
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        let now = Instant::now();
        // What we sent still arrives, then end of stream, as after a close.
        lock(&self.outgoing).close_write(now);
        let mut d = lock(&self.incoming);
        d.reader_gone = true;
        d.segments.clear();
        d.unread = 0;
        wake(&mut d.writer);
    }
}
