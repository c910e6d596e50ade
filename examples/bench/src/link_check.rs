//! `dcache-bench link-check`: the link emulator's own resolution and accuracy.
//!
//! Three measurements, each against what the model says it should be: the overshoot of the
//! sleep a segment waits in (the emulator's timer resolution), ping-pong round trips of one
//! byte on an open connection (first one included, which pays the modelled handshake), and
//! a bulk upload of a known size acknowledged by the server (`2 RTT + S × 8 / B`: the
//! handshake, the upload's serialization, the last byte's one-way trip, the ack's).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::link::{Link, LinkConfig};

/// A TCP server on loopback that echoes every byte back until EOF; one thread per
/// connection, for as long as the process lives.
pub fn echo_server() -> io::Result<SocketAddr> {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// A TCP server on loopback that reads to EOF, then answers with the byte count as eight
/// little-endian bytes and closes.
pub fn sink_server() -> io::Result<SocketAddr> {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return,
            }
        }
        let _ = s.write_all(&total.to_le_bytes());
    })
}

fn serve(handler: fn(TcpStream)) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("link-check-server".into())
        .spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = s.set_nodelay(true);
                let _ = std::thread::Builder::new().spawn(move || handler(s));
            }
        })?;
    Ok(addr)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Median and 99th percentile of `v` (sorted in place).
pub fn p50_p99(v: &mut [Duration]) -> (Duration, Duration) {
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99))
}

/// How much later than asked `std::thread::sleep(request)` returns: p50 and p99 of
/// `samples` sleeps.
pub fn sleep_overshoot(request: Duration, samples: usize) -> (Duration, Duration) {
    let mut over: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            std::thread::sleep(request);
            t.elapsed().saturating_sub(request)
        })
        .collect();
    p50_p99(&mut over)
}

/// Ping-pong through a fresh link: the first round trip (handshake included) and the
/// following `n` one-byte round trips on the same connection.
pub fn ping_pong(config: LinkConfig, n: usize) -> io::Result<(Duration, Vec<Duration>)> {
    let link = Link::start(loopback(), echo_server()?, config)?;
    let t = Instant::now();
    let mut s = TcpStream::connect(link.local_addr())?;
    s.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    s.write_all(b"p")?;
    s.read_exact(&mut byte)?;
    let first = t.elapsed();
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(b"p")?;
        s.read_exact(&mut byte)?;
        rtts.push(t.elapsed());
    }
    s.shutdown(Shutdown::Write)?;
    Ok((first, rtts))
}

/// Uploads `bytes` through a fresh link to a server that acknowledges at EOF; the time
/// from `connect()` to the ack.
pub fn upload(config: LinkConfig, bytes: usize) -> io::Result<Duration> {
    let link = Link::start(loopback(), sink_server()?, config)?;
    let data = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(link.local_addr())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(data.len());
        s.write_all(&data[..n])?;
        left -= n;
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let took = t.elapsed();
    if u64::from_le_bytes(ack) != bytes as u64 {
        return Err(io::Error::other(format!(
            "the server received {} bytes of {bytes}",
            u64::from_le_bytes(ack)
        )));
    }
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs every check and returns the report.
pub fn run() -> io::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "timer: overshoot of std::thread::sleep (1,000 sleeps each)\n{:>10} {:>9} {:>9}",
        "sleep_us", "p50_us", "p99_us"
    );
    for us in [50u64, 100, 1000] {
        let (p50, p99) = sleep_overshoot(Duration::from_micros(us), 1000);
        let _ = writeln!(
            out,
            "{us:>10} {:>9.1} {:>9.1}",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    let mbit100 = Some(100_000_000);
    let gbit = Some(1_000_000_000);
    let _ = writeln!(
        out,
        "\nping-pong, 1 byte, 200 round trips on one connection\n{:>7} {:>6} {:>11} {:>11} {:>8} {:>8} {:>8}",
        "rtt_ms", "rate", "first_exp", "first_ms", "rtt_exp", "p50_ms", "p99_ms"
    );
    for (rtt_us, rate) in [(200u64, mbit100), (4000, mbit100), (40_000, mbit100)] {
        let config = LinkConfig {
            rtt: Duration::from_micros(rtt_us),
            rate_bps: rate,
        };
        let (first, mut rtts) = ping_pong(config, 200)?;
        let (p50, p99) = p50_p99(&mut rtts);
        let _ = writeln!(
            out,
            "{:>7.1} {:>6} {:>11.3} {:>11.3} {:>8.3} {:>8.3} {:>8.3}",
            ms(config.rtt),
            rate_name(rate),
            ms(config.rtt * 2 + config.serialization(1) * 2),
            ms(first),
            ms(config.rtt + config.serialization(1) * 2),
            ms(p50),
            ms(p99)
        );
    }
    let size = 8usize << 20;
    let _ = writeln!(
        out,
        "\nupload of 8 MiB, acknowledged at EOF (expected 2 RTT + S*8/B), median of 3\n{:>7} {:>6} {:>11} {:>11} {:>7}",
        "rtt_ms", "rate", "expected_ms", "measured_ms", "ratio"
    );
    for (rtt_ms, rate) in [(4u64, mbit100), (40, mbit100), (4, gbit), (40, gbit)] {
        let config = LinkConfig {
            rtt: Duration::from_millis(rtt_ms),
            rate_bps: rate,
        };
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(upload(config, size)?);
        }
        let (took, _) = p50_p99(&mut runs);
        let expected = config.rtt * 2 + config.serialization(size) + config.serialization(8);
        let _ = writeln!(
            out,
            "{:>7} {:>6} {:>11.3} {:>11.3} {:>7.3}",
            rtt_ms,
            rate_name(rate),
            ms(expected),
            ms(took),
            took.as_secs_f64() / expected.as_secs_f64()
        );
    }
    Ok(out)
}

fn rate_name(rate: Option<u64>) -> String {
    match rate {
        None => "none".into(),
        Some(r) if r % 1_000_000_000 == 0 => format!("{}G", r / 1_000_000_000),
        Some(r) => format!("{}M", r / 1_000_000),
    }
}
