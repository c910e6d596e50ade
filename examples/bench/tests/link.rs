//! The link emulator over real sockets: it delays at all (lower bounds the model guarantees,
//! since a sleep never returns early), and it neither loses nor reorders bytes. Upper
//! bounds are only there to prove it terminates: the machine may be loaded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dcache_bench::link::{Link, LinkConfig};
use dcache_bench::link_check::{echo_server, ping_pong, upload};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

const RTT: Duration = Duration::from_millis(20);
const RATE: u64 = 100_000_000;

fn config() -> LinkConfig {
    LinkConfig {
        rtt: RTT,
        rate_bps: Some(RATE),
    }
}

/// A byte pattern with no short period, so a lost, repeated or swapped segment shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn echoes_every_byte_in_order_and_no_sooner_than_the_model() {
    let link = Link::start(loopback(), echo_server().expect("echo"), config()).expect("link");
    let data = pattern(3 << 20);
    let t = Instant::now();
    let mut s = TcpStream::connect(link.local_addr()).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        // Odd write sizes, so segment boundaries fall anywhere.
        for piece in sent.chunks(7919) {
            w.write_all(piece).expect("write");
        }
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read");
    let took = t.elapsed();
    writer.join().expect("writer");
    assert_eq!(back.len(), data.len(), "bytes lost or added");
    assert!(back == data, "bytes reordered or changed");
    // Handshake, then the upload serialized, then both one-way trips: the echo's last
    // byte cannot be back sooner.
    let floor = RTT * 2 + config().serialization(data.len());
    assert!(
        took >= floor,
        "{took:?} < {floor:?}: the link did not delay"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    let stats = link.settle(Duration::from_secs(30));
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.closed, 1, "{stats:?}");
    assert_eq!(stats.bytes_up, data.len() as u64);
    assert_eq!(stats.bytes_down, data.len() as u64);
    assert!(stats.turns >= 1, "{stats:?}");
}

#[test]
fn a_round_trip_costs_at_least_the_rtt_and_the_first_one_the_handshake_too() {
    let (first, rtts) = ping_pong(config(), 20).expect("ping-pong");
    assert!(first >= RTT * 2, "first round trip {first:?}");
    for r in &rtts {
        assert!(*r >= RTT, "round trip {r:?} < {RTT:?}");
    }
    assert!(first < Duration::from_secs(30));
}

#[test]
fn turns_count_request_reply_changes() {
    let link = Link::start(loopback(), echo_server().expect("echo"), config()).expect("link");
    let mut s = TcpStream::connect(link.local_addr()).expect("connect");
    let mut buf = [0u8; 3];
    for _ in 0..5 {
        s.write_all(b"abc").expect("write");
        s.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"abc");
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("eof");
    let stats = link.settle(Duration::from_secs(30));
    assert_eq!(stats.closed, 1, "{stats:?}");
    // The echo may split a reply in two reads, never into a second turn.
    assert_eq!(stats.turns, 5, "{stats:?}");
    assert_eq!(stats.round_trips(), 6);
}

#[test]
fn bandwidth_is_capped() {
    // 4 MiB at 100 Mbit/s serialize in 335.5 ms; no model delay may shorten that.
    let took = upload(config(), 4 << 20).expect("upload");
    let floor = RTT * 2 + config().serialization(4 << 20);
    assert!(took >= floor, "{took:?} < {floor:?}");
}

#[test]
fn an_unreachable_target_closes_the_client() {
    let dead = {
        let l = TcpListener::bind(loopback()).expect("bind");
        l.local_addr().expect("addr")
    }; // closed again: nothing listens there now
    let link = Link::start(loopback(), dead, config()).expect("link");
    let mut s = TcpStream::connect(link.local_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the client was left hanging"
    );
    let stats = link.settle(Duration::from_secs(30));
    assert_eq!(stats.accepted, stats.closed);
}
