//! The simulated link reproduces hand-computed timings exactly under paused time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use dcache_transport::simlink::{LinkConfig, symmetric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const MIB: usize = 1 << 20;

fn cfg(latency_ms: u64, bandwidth: u64, buffer: usize) -> LinkConfig {
    LinkConfig {
        latency: Duration::from_millis(latency_ms),
        bandwidth,
        buffer,
    }
}

/// Writes 1 MiB at once and returns when the first and the last byte were read.
async fn transfer_1mib(c: LinkConfig) -> (Duration, Duration) {
    let (mut a, mut b) = symmetric(c);
    let t0 = Instant::now();
    a.write_all(&vec![7u8; MIB]).await.unwrap();
    assert_eq!(Instant::now(), t0, "the buffer takes the write at once");
    let mut got = vec![0u8; MIB];
    let mut first = None;
    let mut n = 0;
    while n < MIB {
        let k = b.read(&mut got[n..]).await.unwrap();
        first.get_or_insert(Instant::now() - t0);
        n += k;
    }
    (first.unwrap(), Instant::now() - t0)
}

#[tokio::test(start_paused = true)]
async fn last_byte_arrives_at_latency_plus_serialization() {
    // 20 ms one way, 100 Mbit/s = 12.5 MB/s: 1 MiB takes 83.886080 ms to serialize, so the
    // last byte lands at 103.886080 ms and the first 16 KiB segment at 21.310720 ms.
    // tokio's timer wheel wakes on whole milliseconds, so the reader sees each arrival at
    // the next millisecond tick: exactly, and the same on every run.
    let (first, last) = transfer_1mib(cfg(20, 12_500_000, 2 * MIB)).await;
    assert_eq!(first, Duration::from_millis(22));
    assert_eq!(last, Duration::from_millis(104));
}

#[tokio::test(start_paused = true)]
async fn dilated_time_gives_microsecond_precision() {
    // The same link with time stretched a thousandfold (latency x1000, bandwidth /1000):
    // one virtual millisecond is one microsecond of the real scenario, so the 1 ms timer
    // resolution becomes 1 us. This is how the benchmarks measure sub-millisecond cells.
    let (first, last) = transfer_1mib(LinkConfig {
        latency: Duration::from_secs(20),
        bandwidth: 12_500,
        buffer: 2 * MIB,
    })
    .await;
    // 21.310720 ms and 103.886080 ms, to the microsecond (rounded up).
    assert_eq!(first, Duration::from_millis(21_311));
    assert_eq!(last, Duration::from_millis(103_887));
}

#[tokio::test(start_paused = true)]
async fn a_ping_pong_costs_one_round_trip() {
    let (mut a, mut b) = symmetric(cfg(2, 0, MIB));
    let t0 = Instant::now();
    a.write_all(b"p").await.unwrap();
    let mut one = [0u8; 1];
    b.read_exact(&mut one).await.unwrap();
    b.write_all(b"q").await.unwrap();
    a.read_exact(&mut one).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_millis(4));
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_makes_the_writer_wait() {
    let (mut a, mut b) = symmetric(cfg(10, 1_000_000, 64 * 1024));
    let t0 = Instant::now();
    a.write_all(&vec![1u8; 64 * 1024]).await.unwrap();
    assert_eq!(Instant::now(), t0);
    // No room: a further write waits until the reader takes bytes.
    let blocked = tokio::time::timeout(Duration::from_secs(5), a.write_all(&[2u8; 1])).await;
    assert!(blocked.is_err(), "writer must wait while nobody reads");
    let mut buf = vec![0u8; 64 * 1024];
    b.read_exact(&mut buf).await.unwrap();
    a.write_all(&[2u8; 1]).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn directions_are_independent_and_eof_follows_the_last_byte() {
    let (mut a, mut b) = symmetric(cfg(5, 1_000_000, MIB));
    a.write_all(&[1u8; 1000]).await.unwrap();
    b.write_all(&[2u8; 1000]).await.unwrap();
    a.shutdown().await.unwrap();
    let t0 = Instant::now();
    let mut from_a = Vec::new();
    b.read_to_end(&mut from_a).await.unwrap();
    assert_eq!(from_a, vec![1u8; 1000]);
    // 1000 bytes at 1 MB/s = 1 ms, plus 5 ms latency.
    assert_eq!(Instant::now() - t0, Duration::from_millis(6));
    let mut from_b = vec![0u8; 1000];
    a.read_exact(&mut from_b).await.unwrap();
    assert_eq!(from_b, vec![2u8; 1000]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_end_gives_eof_and_broken_pipe_not_a_hang() {
    let (mut a, b) = symmetric(cfg(1, 0, MIB));
    drop(b);
    let err = a.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    let mut buf = Vec::new();
    assert_eq!(a.read_to_end(&mut buf).await.unwrap(), 0);
}
