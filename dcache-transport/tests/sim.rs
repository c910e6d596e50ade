//! The simulated link reproduces hand-computed timings exactly under paused time.
//!
//! Exactness of the model is checked by stepping the clock with `tokio::time::advance` and
//! polling without waiting: bytes must be unreadable one nanosecond before their computed
//! arrival and readable at it. Tests that wait instead see arrivals at tokio's millisecond
//! timer ticks, which is also deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::ErrorKind;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dcache_transport::BoxedStream;
use dcache_transport::sim::{LinkConfig, SimStream, link, symmetric};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// 100 Mbit/s.
const MBIT100: u64 = 12_500_000;
/// A guard against hangs only; under paused time it costs nothing.
const HANG: Duration = Duration::from_secs(3600);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ns(n: u64) -> Duration {
    Duration::from_nanos(n)
}

/// What a non-waiting read sees now.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    bytes: usize,
    eof: bool,
}

/// Reads everything readable at this instant, without letting time pass.
fn drain(s: &mut SimStream) -> Seen {
    let mut cx = Context::from_waker(Waker::noop());
    let mut bytes = 0;
    let mut storage = vec![0u8; 64 * KIB];
    loop {
        let mut buf = ReadBuf::new(&mut storage);
        match Pin::new(&mut *s).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Seen { bytes, eof: true },
            Poll::Ready(Ok(())) => bytes += buf.filled().len(),
            Poll::Ready(Err(e)) => panic!("read failed: {e}"),
            Poll::Pending => return Seen { bytes, eof: false },
        }
    }
}

fn bytes(n: usize) -> Seen {
    Seen {
        bytes: n,
        eof: false,
    }
}

/// How many bytes one non-waiting write accepts (0 if it would wait).
fn try_write(s: &mut SimStream, data: &[u8]) -> Poll<std::io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(s).poll_write(&mut cx, data)
}

/// Moves the paused clock to exactly `t`.
async fn step_to(t: Instant) {
    let now = Instant::now();
    assert!(t >= now, "cannot step back in time");
    tokio::time::advance(t - now).await;
    assert_eq!(Instant::now(), t);
}

#[tokio::test(start_paused = true)]
async fn a_1mib_write_arrives_exactly_when_computed() {
    // 20 ms one way, 100 Mbit/s = 12.5 MB/s, 16 KiB segments. Serializing 16 KiB takes
    // 1.310720 ms and 1 MiB takes 83.886080 ms, so the first segment lands at 21.310720 ms
    // and the last byte at 20 ms + 83.886080 ms = 103.886080 ms.
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(20), MBIT100).with_buffer(2 * MIB));
    let t0 = Instant::now();
    a.write_all(&vec![7u8; MIB]).await.unwrap();
    assert_eq!(Instant::now(), t0, "the buffer takes the write at once");

    step_to(t0 + ms(20)).await;
    assert_eq!(drain(&mut b), bytes(0), "nothing before the latency");
    step_to(t0 + Duration::from_nanos(21_310_719)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + Duration::from_nanos(21_310_720)).await;
    assert_eq!(
        drain(&mut b),
        bytes(16 * KIB),
        "first segment, to the nanosecond"
    );

    step_to(t0 + Duration::from_nanos(103_886_079)).await;
    assert_eq!(
        drain(&mut b),
        bytes(MIB - 2 * 16 * KIB),
        "all but the last segment"
    );
    step_to(t0 + Duration::from_nanos(103_886_080)).await;
    assert_eq!(
        drain(&mut b),
        bytes(16 * KIB),
        "the last byte, to the nanosecond"
    );
    assert_eq!(drain(&mut b), bytes(0));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_reader_sees_arrivals_at_the_next_millisecond_tick() {
    // The same transfer, read by a task that waits: tokio's timer fires on whole
    // milliseconds, so 21.310720 ms is seen at 22 ms and 103.886080 ms at 104 ms.
    let (first, last) = transfer_1mib(LinkConfig::new(ms(20), MBIT100).with_buffer(2 * MIB)).await;
    assert_eq!(first, ms(22));
    assert_eq!(last, ms(104));
}

#[tokio::test(start_paused = true)]
async fn dilated_time_gives_microsecond_precision_to_waiting_code() {
    // Latency x1000 and bandwidth /1000: one virtual millisecond is one microsecond of the
    // scenario above, so waiting code measures it to the microsecond (rounded up).
    let (first, last) =
        transfer_1mib(LinkConfig::new(Duration::from_secs(20), 12_500).with_buffer(2 * MIB)).await;
    assert_eq!(first, ms(21_311));
    assert_eq!(last, ms(103_887));
}

/// Writes 1 MiB at once and returns when the first and the last byte were read.
async fn transfer_1mib(c: LinkConfig) -> (Duration, Duration) {
    let (mut a, mut b) = symmetric(c);
    let t0 = Instant::now();
    a.write_all(&vec![7u8; MIB]).await.unwrap();
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
async fn a_one_byte_ping_pong_takes_two_latencies_plus_two_byte_times() {
    // One byte at 12.5 MB/s serializes in 80 ns: the round trip is 2 x 20.000080 ms.
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(20), MBIT100));
    let t0 = Instant::now();
    a.write_all(b"p").await.unwrap();
    step_to(t0 + ms(20) + ns(79)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + ms(20) + ns(80)).await;
    assert_eq!(drain(&mut b), bytes(1));
    b.write_all(b"q").await.unwrap();
    step_to(t0 + ms(40) + ns(159)).await;
    assert_eq!(drain(&mut a), bytes(0));
    step_to(t0 + ms(40) + ns(160)).await;
    assert_eq!(drain(&mut a), bytes(1), "pong at exactly 40.000160 ms");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_ping_pong_costs_exactly_one_round_trip() {
    // Whole-millisecond latency and no serialization: waiting code sees it exactly.
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(20), 0));
    let t0 = Instant::now();
    a.write_all(b"p").await.unwrap();
    let mut one = [0u8; 1];
    b.read_exact(&mut one).await.unwrap();
    assert_eq!(Instant::now() - t0, ms(20));
    b.write_all(b"q").await.unwrap();
    a.read_exact(&mut one).await.unwrap();
    assert_eq!(Instant::now() - t0, ms(40));
}

#[tokio::test(start_paused = true)]
async fn bytes_queue_behind_earlier_ones_and_an_idle_link_starts_afresh() {
    // 1 MB/s: 1000 bytes take 1 ms. Latency 5 ms.
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(5), 1_000_000));
    let t0 = Instant::now();
    a.write_all(&[1; 1000]).await.unwrap(); // serializes 0..1 ms, arrives at 6 ms
    step_to(t0 + Duration::from_micros(500)).await;
    a.write_all(&[2; 1000]).await.unwrap(); // waits for the link: 1..2 ms, arrives at 7 ms
    step_to(t0 + ms(6) - ns(1)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + ms(6)).await;
    assert_eq!(drain(&mut b), bytes(1000));
    step_to(t0 + ms(7) - ns(1)).await;
    assert_eq!(
        drain(&mut b),
        bytes(0),
        "queued behind the first write, not sent at 0.5 ms"
    );
    step_to(t0 + ms(7)).await;
    assert_eq!(drain(&mut b), bytes(1000));
    // Idle since 2 ms: a write at 10 ms serializes 10..11 ms and arrives at 16 ms.
    step_to(t0 + ms(10)).await;
    a.write_all(&[3; 1000]).await.unwrap();
    step_to(t0 + ms(16) - ns(1)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + ms(16)).await;
    assert_eq!(drain(&mut b), bytes(1000));
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_makes_the_writer_wait_and_memory_stays_bounded() {
    let (mut a, mut b) = symmetric(
        LinkConfig::new(ms(10), 1_000_000)
            .with_buffer(64 * KIB)
            .with_segment(16 * KIB),
    );
    let big = vec![1u8; MIB];
    // A writer cannot dump a megabyte: the link takes exactly its buffer, then waits.
    assert!(matches!(try_write(&mut a, &big), Poll::Ready(Ok(n)) if n == 64 * KIB));
    assert!(try_write(&mut a, &big).is_pending());
    // Everything arrives but nobody reads: the writer still waits.
    step_to(Instant::now() + Duration::from_secs(10)).await;
    assert!(try_write(&mut a, &big).is_pending());
    // The reader takes one segment: exactly that much room opens.
    let mut seg = vec![0u8; 16 * KIB];
    b.read_exact(&mut seg).await.unwrap();
    assert!(matches!(try_write(&mut a, &big), Poll::Ready(Ok(n)) if n == 16 * KIB));
    assert!(try_write(&mut a, &big).is_pending());
}

#[tokio::test(start_paused = true)]
async fn a_blocked_writer_is_woken_by_the_reader() {
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(10), 10_000_000).with_buffer(64 * KIB));
    let writer = tokio::spawn(async move {
        a.write_all(&vec![5u8; MIB]).await.unwrap();
        a.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(HANG, b.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, vec![5u8; MIB]);
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn eof_follows_the_last_byte() {
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(5), 1_000_000));
    let t0 = Instant::now();
    a.write_all(&[1u8; 1000]).await.unwrap();
    a.shutdown().await.unwrap();
    let err = a.write_all(b"x").await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::BrokenPipe,
        "no writes after shutdown"
    );
    step_to(t0 + ms(6) - ns(1)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + ms(6)).await;
    assert_eq!(
        drain(&mut b),
        Seen {
            bytes: 1000,
            eof: true
        },
        "every byte, then end of stream"
    );
    // On an idle link the end of stream itself takes the latency.
    b.shutdown().await.unwrap();
    let t1 = Instant::now();
    step_to(t1 + ms(5) - ns(1)).await;
    assert_eq!(drain(&mut a), bytes(0));
    step_to(t1 + ms(5)).await;
    assert_eq!(
        drain(&mut a),
        Seen {
            bytes: 0,
            eof: true
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_end_gives_broken_pipe_and_eof_not_a_hang() {
    // Dropping the reader: writes fail at once, reads end after the latency.
    let (mut a, b) = symmetric(LinkConfig::new(ms(3), 0));
    drop(b);
    let err = a.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    let t0 = Instant::now();
    let mut buf = Vec::new();
    assert_eq!(a.read_to_end(&mut buf).await.unwrap(), 0);
    assert_eq!(Instant::now() - t0, ms(3));

    // Dropping a writer with bytes in flight: they still arrive, then EOF.
    let (mut a, mut b) = symmetric(LinkConfig::new(ms(3), 1_000_000));
    a.write_all(&[9u8; 5000]).await.unwrap();
    drop(a);
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, vec![9u8; 5000]);

    // A writer waiting on a full buffer is woken with an error when the reader goes.
    let (mut a, b) = symmetric(LinkConfig::new(ms(3), 1_000_000).with_buffer(16 * KIB));
    let writer = tokio::spawn(async move { a.write_all(&vec![0u8; MIB]).await });
    tokio::time::sleep(ms(50)).await;
    drop(b);
    let r = tokio::time::timeout(HANG, writer).await.unwrap().unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::BrokenPipe);
}

#[tokio::test(start_paused = true)]
async fn the_two_directions_are_independent() {
    // a -> b is a slow uplink saturated by a large upload; b -> a stays fast and idle.
    let up = LinkConfig::new(ms(10), 1_000_000).with_buffer(2 * MIB);
    let down = LinkConfig::new(ms(10), MBIT100);
    let (mut a, mut b) = link(up, down);
    let t0 = Instant::now();
    a.write_all(&vec![1u8; MIB]).await.unwrap(); // takes over a second to serialize
    b.write_all(b"r").await.unwrap(); // 80 ns on the fast side
    step_to(t0 + ms(10) + ns(79)).await;
    assert_eq!(drain(&mut a), bytes(0));
    step_to(t0 + ms(10) + ns(80)).await;
    assert_eq!(
        drain(&mut a),
        bytes(1),
        "the reply does not queue behind the upload"
    );
    // The upload's first 16 KiB segment: 16.384 ms to serialize, plus the latency.
    step_to(t0 + ms(10) + Duration::from_micros(16_384) - ns(1)).await;
    assert_eq!(drain(&mut b), bytes(0));
    step_to(t0 + ms(10) + Duration::from_micros(16_384)).await;
    assert_eq!(drain(&mut b), bytes(16 * KIB));
}

#[tokio::test(start_paused = true)]
async fn a_sim_stream_works_wherever_a_socket_does() {
    // A 40 ms round trip at 100 Mbit/s: a 2 MiB echo through boxed, split streams finishes
    // in virtual time; it cannot beat the physical limit of two serializations plus the
    // round trip.
    let (a, b) = symmetric(LinkConfig::new(ms(20), MBIT100));
    let (mut a, b): (BoxedStream, BoxedStream) = (Box::new(a), Box::new(b));
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(b);
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let t0 = Instant::now();
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let (mut r, mut w) = tokio::io::split(&mut a);
    let send = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, n) = tokio::time::timeout(HANG, async { tokio::join!(send, recv) })
        .await
        .unwrap();
    assert_eq!(n.unwrap(), 2 * MIB);
    assert_eq!(back, data);
    // Serialization pipelines through the echo: the limit is one transfer plus a round trip.
    let limit = ms(40) + LinkConfig::new(ms(20), MBIT100).serialization(2 * MIB as u64);
    assert!(Instant::now() - t0 >= limit, "{:?}", Instant::now() - t0);
    echo.await.unwrap();
}

/// A server whose application compiles with `reference_compile`, caches by the verified
/// key and answers HASH from the cache.
async fn reference_server(mut h: dcache_transport::ServerConnHandle) {
    use dcache_proto::{ResultOrigin, ServerEvent};
    use dcache_transport::ServerCommand;
    let mut cache = std::collections::HashMap::new();
    let mut jobs = std::collections::HashMap::new();
    while let Some(ev) = h.events.recv().await {
        match ev {
            ServerEvent::JobStarted { job, desc } => {
                jobs.insert(job, (desc, Vec::new()));
            }
            ServerEvent::Lookup { job, key } => {
                let cmd = match cache.get(&key) {
                    Some(r) => ServerCommand::Result {
                        job,
                        result: dcache_proto::JobResult::clone(r),
                        origin: ResultOrigin::Early,
                    },
                    None => ServerCommand::Miss(job),
                };
                let _ = h.commands.send(cmd);
            }
            ServerEvent::Source { job, data } => {
                if let Some(j) = jobs.get_mut(&job) {
                    j.1.extend_from_slice(&data);
                }
            }
            ServerEvent::SourceDone { job, key, .. } => {
                if let Some((d, s)) = jobs.remove(&job) {
                    // A HASH-less upload is looked up by the key of what arrived.
                    let (result, origin) = match cache.get(&key) {
                        Some(r) => (dcache_proto::JobResult::clone(r), ResultOrigin::Cache),
                        None => {
                            let r = dcache_proto::testing::reference_compile(&d, &s);
                            cache.insert(key, r.clone());
                            (r, ResultOrigin::Compiled)
                        }
                    };
                    let _ = h.commands.send(ServerCommand::Result {
                        job,
                        result,
                        origin,
                    });
                }
            }
            ServerEvent::Closed { .. } => return,
            _ => {}
        }
    }
}

/// Text shaped like preprocessed C, so compression has something to find.
fn c_like(len: usize) -> bytes::Bytes {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("static int v{i} = {};\n", i * 7).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out.into()
}

#[tokio::test(start_paused = true)]
async fn jobs_complete_with_compression_on_every_link_of_the_matrix() {
    use dcache_proto::testing::reference_compile;
    use dcache_proto::{CacheKey, ClientConfig, DEFAULT_LEVEL, JobDesc, ServerConfig, Strategy};
    for (rtt_us, bandwidth) in [(200u64, MBIT100), (4_000, MBIT100 * 10), (40_000, MBIT100)] {
        for strategy in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll] {
            let link = LinkConfig::new(Duration::from_micros(rtt_us) / 2, bandwidth)
                .with_buffer(256 * KIB);
            let (c, s) = symmetric(link);
            tokio::spawn(reference_server(dcache_transport::spawn_server_connection(
                s,
                ServerConfig::default(),
            )));
            let client = dcache_transport::spawn_client(
                c,
                ClientConfig {
                    strategy,
                    compression: Some(DEFAULT_LEVEL),
                    ..ClientConfig::default()
                },
            );
            for (n, len) in [10 * KIB, 2 * MIB].into_iter().enumerate() {
                let src = c_like(len);
                let d = JobDesc {
                    compiler: "gcc".into(),
                    language: "cpp-output".into(),
                    args: vec!["-c".into(), format!("-DN={n}")],
                    source_len: Some(len as u64),
                    identity: None,
                };
                let key = CacheKey::compute(&d, &src);
                let want = reference_compile(&d, &src);
                let miss =
                    tokio::time::timeout(HANG, client.submit(d.clone(), Some(key), src.clone()))
                        .await
                        .unwrap()
                        .unwrap();
                assert!(!miss.origin.is_cached(), "{strategy:?} {rtt_us}us {len}");
                assert_eq!(miss.result, want);
                let hit = tokio::time::timeout(HANG, client.submit(d, Some(key), src))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(hit.origin.is_cached(), "{strategy:?} {rtt_us}us {len}");
                assert_eq!(hit.result, want);
            }
        }
    }
}
