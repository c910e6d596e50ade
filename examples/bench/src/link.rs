//! A link emulator over real TCP: `dcache-bench link`, and [`Link::start`] in process.
//!
//! The kernel of the development machine has no netem, so the delay lives in userspace: a
//! relay that accepts a connection, opens one to the real server, and copies bytes each way
//! through a modelled link — a one-way delay of half the round trip and a bandwidth cap,
//! per direction, and the TCP handshake as one round trip before the first byte moves.
//!
//! **Timing model.** Every chunk read from one side is split into segments of at most half
//! a millisecond of serialization (clamped to 1,460 B – 64 KiB), and each segment gets a
//! timestamp when it is read: it starts to leave when the link in its direction is free
//! (`start = max(now, free_at)`), takes `len × 8 / rate` to serialize (`free_at` moves on by
//! that), and is due at the far end one one-way delay later. A writer thread per direction
//! sleeps until each segment's due time and writes it. Delays are therefore computed from
//! timestamps, never accumulated from sleeps: a late wake-up delays one segment, not the
//! ones behind it.
//!
//! **Handshake.** A `connect()` to the emulator returns at once (the kernel completes it),
//! so the emulator charges the round trip itself: the client → server direction is not free
//! before one RTT after the accept (the moment a real client's `connect()` would return),
//! so its first byte reaches the server at 1.5 RTT, as over a real link; the server →
//! client direction is not free before 1.5 RTT (when a real server's `accept()` would
//! return), so a server that speaks first is heard at 2 RTT.
//!
//! **Round trips.** The emulator counts *turns* per connection: the flow changes from
//! client → server to server → client (in the order the emulator reads the bytes). A
//! request answered by a reply is one turn; a handshake before it is one more round trip,
//! counted as a connection. An upload still streaming when a reply arrives, and then more
//! upload and more reply, counts one turn per change; the figures say so where it matters.
//!
//! **Resolution.** A segment is written when its writer thread wakes; `std::thread::sleep`
//! (nanosleep) overshoots by the kernel's timer slack plus scheduling delay. `dcache-bench
//! link-check` measures that overshoot and the emulator's accuracy on known transfers
//! (docs/BENCHMARKS.md, "The link emulator").

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Segments queued per direction before the reader stops reading (backpressure to the
/// sender through its socket): at most 512 × 64 KiB = 32 MiB, well above the
/// bandwidth-delay product of 1 Gbit/s over 40 ms (5 MB), so the queue never caps a
/// transfer the link itself would allow.
const QUEUE_SEGMENTS: usize = 512;
/// The smallest and largest segment: an Ethernet MSS, and the read buffer.
const MIN_SEGMENT: usize = 1460;
const MAX_SEGMENT: usize = 64 << 10;
/// Serialization time a segment may span: the bandwidth model's own granularity.
const SEGMENT_TIME: Duration = Duration::from_micros(500);

/// What the emulated link does to the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// The round trip: each direction delays by half of it.
    pub rtt: Duration,
    /// The bandwidth of each direction in bits per second; `None` for no cap.
    pub rate_bps: Option<u64>,
}

impl LinkConfig {
    /// The delay of one direction.
    pub fn one_way(&self) -> Duration {
        self.rtt / 2
    }

    /// How long `bytes` take to serialize onto the link (zero without a cap).
    pub fn serialization(&self, bytes: usize) -> Duration {
        match self.rate_bps {
            Some(rate) if rate > 0 => {
                Duration::from_nanos((bytes as u128 * 8 * 1_000_000_000 / rate as u128) as u64)
            }
            _ => Duration::ZERO,
        }
    }

    /// The segment size: half a millisecond of serialization, clamped.
    fn segment(&self) -> usize {
        match self.rate_bps {
            Some(rate) if rate > 0 => {
                let bytes = rate as u128 * SEGMENT_TIME.as_nanos() / 8 / 1_000_000_000;
                (bytes as usize).clamp(MIN_SEGMENT, MAX_SEGMENT)
            }
            _ => MAX_SEGMENT,
        }
    }
}

/// A duration or a rate on the command line that does not parse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not a number followed by `s`, `ms` or `us`.
    #[error("{0:?} is not a duration (e.g. 4ms, 0.2ms, 200us, 1s)")]
    Duration(String),
    /// Not a number followed by `kbit`, `mbit` or `gbit` (or `none`).
    #[error("{0:?} is not a rate (e.g. 100mbit, 1gbit, none)")]
    Rate(String),
}

/// Parses `4ms`, `0.2ms`, `200us`, `1s` (a plain number is milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let bad = || ParseError::Duration(s.to_string());
    let (num, unit) = split_unit(s);
    let scale = match unit {
        "s" => 1.0,
        "ms" | "" => 1e-3,
        "us" => 1e-6,
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || !(0.0..=60.0).contains(&(v * scale)) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `100mbit`, `1gbit`, `500kbit` into bits per second; `none` (or `0`) is no cap.
pub fn parse_rate(s: &str) -> Result<Option<u64>, ParseError> {
    let bad = || ParseError::Rate(s.to_string());
    if s == "none" || s == "0" {
        return Ok(None);
    }
    let (num, unit) = split_unit(s);
    let scale = match unit {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bps = v * scale;
    if !bps.is_finite() || !(1e3..=1e11).contains(&bps) {
        return Err(bad());
    }
    Ok(Some(bps as u64))
}

fn split_unit(s: &str) -> (&str, &str) {
    let i = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..i], &s[i..])
}

/// Counters of a running link, read with [`Link::stats`].
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    closed: AtomicU64,
    turns: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A snapshot of a link's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Connections accepted (each one paid a modelled handshake).
    pub accepted: u64,
    /// Connections whose four relay threads have all finished.
    pub closed: u64,
    /// Changes of flow from client → server to server → client, over all connections.
    pub turns: u64,
    /// Bytes delivered to the server.
    pub bytes_up: u64,
    /// Bytes delivered to the client.
    pub bytes_down: u64,
}

impl LinkStats {
    /// Round trips spent: one handshake per connection plus one per turn.
    pub fn round_trips(&self) -> u64 {
        self.accepted + self.turns
    }

    /// The counters gained since `earlier`.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            accepted: self.accepted - earlier.accepted,
            closed: self.closed - earlier.closed,
            turns: self.turns - earlier.turns,
            bytes_up: self.bytes_up - earlier.bytes_up,
            bytes_down: self.bytes_down - earlier.bytes_down,
        }
    }
}

/// A running link emulator: accepts on [`Link::local_addr`], relays to its target through
/// the modelled link. Dropping it stops accepting; connections already open run to their
/// end.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Link {
    /// Listens on `listen` (port 0 for any) and relays every connection to `to`.
    pub fn start(listen: SocketAddr, to: SocketAddr, config: LinkConfig) -> io::Result<Link> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (counters, stop) = (counters.clone(), stop.clone());
            std::thread::Builder::new()
                .name("link-accept".into())
                .spawn(move || accept_loop(listener, to, config, counters, stop))?
        };
        Ok(Link {
            addr,
            counters,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            accepted: c.accepted.load(Ordering::SeqCst),
            closed: c.closed.load(Ordering::SeqCst),
            turns: c.turns.load(Ordering::SeqCst),
            bytes_up: c.bytes_up.load(Ordering::SeqCst),
            bytes_down: c.bytes_down.load(Ordering::SeqCst),
        }
    }

    /// Waits (up to `limit`) until every accepted connection has closed, so counters read
    /// afterwards are final; returns the stats then, settled or not.
    pub fn settle(&self, limit: Duration) -> LinkStats {
        self.settle_keeping(0, limit)
    }

    /// [`settle`](Self::settle) for a client that keeps `open` connections for good (a
    /// relay daemon's one to its server): waits until no more than those are open.
    pub fn settle_keeping(&self, open: u64, limit: Duration) -> LinkStats {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.stats();
            if s.accepted.saturating_sub(s.closed) <= open || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    to: SocketAddr,
    config: LinkConfig,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            // EMFILE and the like: back off a little rather than spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let t0 = Instant::now();
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let counters = counters.clone();
        let spawned = std::thread::Builder::new()
            .name("link-conn".into())
            .spawn(move || {
                let guard = Arc::new(CloseGuard(counters.clone()));
                if let Err(e) = relay(client, to, config, t0, &counters, &guard) {
                    eprintln!("link: connection to {to}: {e}");
                }
            });
        if spawned.is_err() {
            eprintln!("link: cannot start a relay thread");
        }
    }
}

/// Counts a connection closed when the last of its threads lets go of it.
struct CloseGuard(Arc<Counters>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// Which way the bytes flowed last on one connection, for counting turns.
struct Flow {
    last: Mutex<Option<Dir>>,
}

impl Flow {
    fn saw(&self, dir: Dir, counters: &Counters) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if dir == Dir::Down && *last == Some(Dir::Up) {
            counters.turns.fetch_add(1, Ordering::SeqCst);
        }
        *last = Some(dir);
    }
}

fn relay(
    client: TcpStream,
    to: SocketAddr,
    config: LinkConfig,
    t0: Instant,
    counters: &Arc<Counters>,
    guard: &Arc<CloseGuard>,
) -> io::Result<()> {
    let server = match TcpStream::connect(to) {
        Ok(s) => s,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let flow = Arc::new(Flow {
        last: Mutex::new(None),
    });
    // The handshake: a real client sends at 1 RTT, a real server at 1.5 RTT.
    let up_free = t0 + config.rtt;
    let down_free = t0 + config.rtt + config.one_way();
    direction(
        client.try_clone()?,
        server.try_clone()?,
        Dir::Up,
        up_free,
        config,
        &flow,
        counters,
        guard,
    )?;
    direction(
        server,
        client,
        Dir::Down,
        down_free,
        config,
        &flow,
        counters,
        guard,
    )
}

/// Starts the reader and writer threads of one direction.
#[allow(clippy::too_many_arguments)]
fn direction(
    src: TcpStream,
    dst: TcpStream,
    dir: Dir,
    free_at: Instant,
    config: LinkConfig,
    flow: &Arc<Flow>,
    counters: &Arc<Counters>,
    guard: &Arc<CloseGuard>,
) -> io::Result<()> {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE_SEGMENTS);
    let src_for_writer = src.try_clone()?;
    {
        let (flow, counters, guard) = (flow.clone(), counters.clone(), guard.clone());
        std::thread::Builder::new()
            .name("link-read".into())
            .spawn(move || {
                read_side(src, tx, dir, free_at, config, &flow, &counters);
                drop(guard);
            })?;
    }
    {
        let (counters, guard) = (counters.clone(), guard.clone());
        std::thread::Builder::new()
            .name("link-write".into())
            .spawn(move || {
                write_side(dst, src_for_writer, rx, dir, &counters);
                drop(guard);
            })?;
    }
    Ok(())
}

/// Reads one side, stamps each segment with its due time, queues it for the writer.
fn read_side(
    mut src: TcpStream,
    tx: SyncSender<(Instant, Vec<u8>)>,
    dir: Dir,
    mut free_at: Instant,
    config: LinkConfig,
    flow: &Flow,
    counters: &Counters,
) {
    let segment = config.segment();
    let mut buf = vec![0u8; MAX_SEGMENT];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return, // EOF or reset: dropping `tx` passes it on
            Ok(n) => n,
        };
        let now = Instant::now();
        flow.saw(dir, counters);
        for piece in buf[..n].chunks(segment) {
            let start = free_at.max(now);
            free_at = start + config.serialization(piece.len());
            let due = free_at + config.one_way();
            if tx.send((due, piece.to_vec())).is_err() {
                return; // the writer failed: the far side is gone
            }
        }
    }
}

/// Writes each queued segment at its due time; passes EOF on as a half close.
fn write_side(
    mut dst: TcpStream,
    src: TcpStream,
    rx: Receiver<(Instant, Vec<u8>)>,
    dir: Dir,
    counters: &Counters,
) {
    let delivered = match dir {
        Dir::Up => &counters.bytes_up,
        Dir::Down => &counters.bytes_down,
    };
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if dst.write_all(&bytes).is_err() {
            // The far side is gone: stop the reader of this direction too.
            let _ = src.shutdown(Shutdown::Read);
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        delivered.fetch_add(bytes.len() as u64, Ordering::SeqCst);
    }
    let _ = dst.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse() {
        assert_eq!(parse_duration("4ms").ok(), Some(Duration::from_millis(4)));
        assert_eq!(
            parse_duration("0.2ms").ok(),
            Some(Duration::from_micros(200))
        );
        assert_eq!(
            parse_duration("200us").ok(),
            Some(Duration::from_micros(200))
        );
        assert_eq!(parse_duration("1s").ok(), Some(Duration::from_secs(1)));
        assert!(parse_duration("4 ms").is_err());
        assert!(parse_duration("-1ms").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_rate("100mbit").ok(), Some(Some(100_000_000)));
        assert_eq!(parse_rate("1gbit").ok(), Some(Some(1_000_000_000)));
        assert_eq!(parse_rate("none").ok(), Some(None));
        assert!(parse_rate("100mb").is_err());
        assert!(parse_rate("1e400mbit").is_err());
    }

    #[test]
    fn segments_and_serialization() {
        let c = LinkConfig {
            rtt: Duration::from_millis(4),
            rate_bps: Some(100_000_000),
        };
        assert_eq!(c.one_way(), Duration::from_millis(2));
        assert_eq!(c.serialization(12_500_000), Duration::from_secs(1));
        assert_eq!(c.segment(), 6250);
        let fast = LinkConfig {
            rate_bps: Some(100_000_000_000),
            ..c
        };
        assert_eq!(fast.segment(), MAX_SEGMENT);
        let slow = LinkConfig {
            rate_bps: Some(1_000_000),
            ..c
        };
        assert_eq!(slow.segment(), MIN_SEGMENT);
        let none = LinkConfig {
            rate_bps: None,
            ..c
        };
        assert_eq!(none.serialization(1 << 30), Duration::ZERO);
    }
}
