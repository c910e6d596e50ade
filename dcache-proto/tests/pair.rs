//! End-to-end scenarios: a real client and server state machine on simulated links, with
//! deliveries split and merged at random points and a virtual clock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::Connection;
use dcache_proto::testing::{Pair, reference_compile};
use dcache_proto::{
    CacheKey, ClientConfig, ClientEvent, ConnectionError, ErrorCode, Frame, JobDesc, JobId, Limits,
    ServerConfig, ServerEvent, Strategy,
};

fn desc(n: usize) -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), format!("-DN={n}")],
        source_len: None,
        identity: None,
    }
}

fn source(len: usize, salt: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ salt)
            .collect::<Vec<u8>>(),
    )
}

fn with_len(mut d: JobDesc, len: usize) -> JobDesc {
    d.source_len = Some(len as u64);
    d
}

fn pair(strategy: Strategy, latency_ms: u64, bandwidth: u64, seed: u64) -> Pair {
    Pair::new(
        ClientConfig {
            strategy,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
        Duration::from_millis(latency_ms),
        bandwidth,
        seed,
        Instant::now(),
    )
}

fn outcome(p: &Pair, job: JobId) -> dcache_proto::JobOutcome {
    match p.job_end(job) {
        Some(ClientEvent::Done { outcome, .. }) => outcome,
        other => panic!("{job} did not finish with a result: {other:?}"),
    }
}

/// Runs one miss so the server caches the result, on a fresh pair.
fn warm(p: &mut Pair, d: &JobDesc, src: &Bytes) {
    let job = p.submit(d.clone(), src.clone()).expect("submit");
    p.run_until_job_ends(job, 100_000)
        .expect("warm-up job ended");
    assert!(!outcome(p, job).origin.is_early());
}

#[test]
fn miss_then_hit_with_early_result_stops_a_large_upload() {
    for seed in 1..=5 {
        // 4 ms round trip, 100 Mbit/s: a 2 MiB source takes ~168 ms to send.
        let mut p = pair(Strategy::Speculative, 2, 12_500_000, seed);
        let src = source(2 << 20, 7);
        let d = with_len(desc(1), src.len());
        warm(&mut p, &d, &src);
        assert_eq!(p.app.compiles, 1);

        let before = p.c2s.bytes_sent;
        let t0 = p.now;
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run_until_job_ends(job, 100_000).unwrap();
        let o = outcome(&p, job);
        assert!(
            o.origin.is_early(),
            "second identical job must be answered by EARLY_RESULT"
        );
        assert_eq!(o.result, reference_compile(&d, &src));
        // The client stopped well before the end: at most a window plus a round trip's
        // worth of bytes went out, far from 2 MiB.
        let uploaded = p.c2s.bytes_sent - before;
        assert!(
            uploaded < 512 * 1024,
            "uploaded {uploaded} bytes of a {} byte source on a hit",
            src.len()
        );
        assert_eq!(
            o.source_bytes_sent + o.source_bytes_skipped,
            src.len() as u64
        );
        assert!(o.source_bytes_skipped > 1 << 20);
        // One round trip plus the result's own transfer (R + O/B), within 5%: nowhere near
        // the 168 ms the upload alone would take.
        let took = p.now - t0;
        let limit = Duration::from_millis(4)
            + Duration::from_secs_f64(o.result.body_len() as f64 / 12_500_000.0);
        assert!(
            took.as_secs_f64() <= limit.as_secs_f64() * 1.05,
            "hit took {took:?}, limit {limit:?}"
        );
        assert_eq!(p.app.compiles, 1, "a hit must not compile");
        // Let the drain finish: both ends forget the job.
        p.run(100_000);
        assert_eq!(p.client.jobs_open(), 0);
        assert_eq!(p.server.jobs_open(), 0);
        assert!(p.server.stats().source_bytes_saved > 1 << 20);
    }
}

#[test]
fn miss_compiles_and_returns_the_result() {
    for strategy in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll] {
        let mut p = pair(strategy, 5, 0, 42);
        let src = source(300_000, 3);
        let d = desc(2);
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run_until_job_ends(job, 100_000).unwrap();
        let o = outcome(&p, job);
        assert!(!o.origin.is_early());
        assert!(!o.origin.is_cached(), "a miss is not from the cache");
        assert_eq!(o.strategy, strategy);
        assert_eq!(o.result, reference_compile(&d, &src));
        assert_eq!(o.source_bytes_sent, src.len() as u64);
        let misses = p
            .client_events
            .iter()
            .filter(|(_, e)| matches!(e, ClientEvent::Miss { .. }))
            .count();
        assert_eq!(misses, usize::from(strategy != Strategy::SendAll));
    }
}

#[test]
fn every_strategy_knows_a_hit_from_a_miss() {
    for strategy in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll] {
        let mut p = pair(strategy, 5, 0, 43);
        let src = source(50_000, 9);
        let d = desc(3);
        warm(&mut p, &d, &src);
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run_until_job_ends(job, 100_000).unwrap();
        let o = outcome(&p, job);
        assert!(
            o.origin.is_cached(),
            "{strategy:?}: the second run is a hit"
        );
        // Only a job that sent HASH can be answered before its upload ends.
        assert_eq!(
            o.origin.is_early(),
            strategy != Strategy::SendAll,
            "{strategy:?}"
        );
        assert_eq!(o.result, reference_compile(&d, &src));
    }
}

#[test]
fn ask_first_waits_for_the_verdict_and_sends_nothing_on_a_hit() {
    let mut p = pair(Strategy::AskFirst, 10, 0, 9);
    let src = source(1 << 20, 1);
    let d = desc(3);
    warm(&mut p, &d, &src);
    let before = p.c2s.bytes_sent;
    let job = p.submit(d.clone(), src.clone()).unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    let o = outcome(&p, job);
    assert!(o.origin.is_early());
    assert_eq!(o.source_bytes_sent, 0);
    // JOB, HASH and the closing ABORT only.
    assert!(p.c2s.bytes_sent - before < 200);
}

#[test]
fn ask_first_miss_costs_one_more_round_trip_than_speculative() {
    let src = source(10 * 1024, 5);
    let d = desc(4);
    let mut times = Vec::new();
    for strategy in [Strategy::Speculative, Strategy::AskFirst] {
        let mut p = pair(strategy, 20, 0, 3);
        p.chop = false;
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run_until_job_ends(job, 100_000).unwrap();
        times.push(p.elapsed());
    }
    // Exact under virtual time: a 40 ms round trip more, nothing else.
    assert_eq!(times[1] - times[0], Duration::from_millis(40));
}

#[test]
fn many_jobs_interleave_fairly_on_one_connection() {
    let mut p = pair(Strategy::Speculative, 1, 50_000_000, 11);
    let mut jobs = Vec::new();
    for n in 0..40 {
        let src = source(64 * 1024 * (1 + n % 4), n as u8);
        let d = desc(100 + n);
        jobs.push((p.submit(d.clone(), src.clone()).unwrap(), d, src));
    }
    assert!(p.run(1_000_000));
    for (job, d, src) in &jobs {
        assert_eq!(outcome(&p, *job).result, reference_compile(d, src));
    }
    // Fairness: SOURCE chunks go round-robin. A job never gets two chunks in a row while
    // another job that already started still has chunks to come.
    let order: Vec<JobId> = p
        .server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Source { job, .. } => Some(*job),
            _ => None,
        })
        .collect();
    let span = |job: JobId| {
        let first = order.iter().position(|j| *j == job).unwrap();
        let last = order.iter().rposition(|j| *j == job).unwrap();
        (first, last)
    };
    for i in 0..order.len() - 1 {
        if order[i] == order[i + 1] {
            for (job, ..) in &jobs {
                let (first, last) = span(*job);
                assert!(
                    *job == order[i] || !(first < i && last > i + 1),
                    "{} sent twice in a row at {i} while {job} was waiting",
                    order[i]
                );
            }
        }
    }
}

#[test]
fn jobs_beyond_the_servers_limit_wait_on_the_client() {
    let server = ServerConfig {
        limits: Limits {
            max_jobs: 16,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let mut p = Pair::new(
        ClientConfig::default(),
        server,
        Duration::from_millis(1),
        0,
        5,
        Instant::now(),
    );
    let jobs: Vec<_> = (0..50)
        .map(|n| {
            let d = desc(n);
            let s = source(1000 + n, n as u8);
            (p.submit(d.clone(), s.clone()).unwrap(), d, s)
        })
        .collect();
    assert!(p.run(1_000_000));
    for (job, d, s) in &jobs {
        assert_eq!(outcome(&p, *job).result, reference_compile(d, s));
    }
}

#[test]
fn client_cancel_mid_upload_is_acknowledged_and_forgotten() {
    let mut p = pair(Strategy::Speculative, 2, 10_000_000, 17);
    let src = source(4 << 20, 9);
    let job = p.submit(desc(5), src).unwrap();
    p.advance(Duration::from_millis(20));
    p.client.cancel(job).unwrap();
    assert!(p.run(100_000));
    assert!(p.job_end(job).is_none(), "no event after cancel");
    assert_eq!(p.client.jobs_open(), 0);
    assert_eq!(p.server.jobs_open(), 0);
    assert!(p.server_events.iter().any(|(_, e)| matches!(
        e,
        ServerEvent::JobCancelled { job: j, code: ErrorCode::CANCELLED, .. } if *j == job
    )));
    // The connection lives on.
    let d = desc(6);
    let s = source(5000, 2);
    let job2 = p.submit(d.clone(), s.clone()).unwrap();
    p.run_until_job_ends(job2, 100_000).unwrap();
    assert_eq!(outcome(&p, job2).result, reference_compile(&d, &s));
}

#[test]
fn server_abort_fails_the_job_and_stops_the_upload() {
    let mut p = pair(Strategy::Speculative, 2, 10_000_000, 23);
    let src = source(4 << 20, 4);
    let job = p.submit(desc(7), src.clone()).unwrap();
    p.advance(Duration::from_millis(10));
    p.server
        .abort_job(job, ErrorCode::OVERLOADED, "too busy")
        .unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    match p.job_end(job) {
        Some(ClientEvent::Failed { code, message, .. }) => {
            assert_eq!(code, ErrorCode::OVERLOADED);
            assert_eq!(message, "too busy");
        }
        other => panic!("expected failure, got {other:?}"),
    }
    assert!(p.run(100_000));
    assert!(p.c2s.bytes_sent < 1 << 20, "upload stopped after ABORT");
    assert_eq!(p.client.jobs_open(), 0);
    assert_eq!(p.server.jobs_open(), 0);
}

// The hook takes a Vec so other tamperers can drop or insert bytes.
#[allow(clippy::ptr_arg)]
fn flip_last_source_byte(bytes: &mut Vec<u8>) {
    // Flip the final byte of every delivery: lands in SOURCE payloads for this test's
    // single large job (deliveries end at frame boundaries only by chance).
    if let Some(b) = bytes.last_mut() {
        *b ^= 0x01;
    }
}

#[test]
fn hash_mismatch_fails_the_job_and_stores_nothing() {
    // A client that lies: its HASH is for other bytes than it sends.
    let mut p = pair(Strategy::Speculative, 1, 0, 31);
    p.chop = false;
    let d = desc(8);
    let honest = source(100_000, 1);
    let lie_key = CacheKey::compute(&d, b"something else entirely");
    let job = p.client.start_job(p.now, d.clone(), Some(lie_key)).unwrap();
    p.client.push_source(job, honest.clone(), true).unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    match p.job_end(job) {
        Some(ClientEvent::Failed { code, .. }) => assert_eq!(code, ErrorCode::HASH_MISMATCH),
        other => panic!("expected HASH_MISMATCH, got {other:?}"),
    }
    assert!(p.app.cache.is_empty(), "nothing stored under a lying key");
    assert_eq!(p.app.compiles, 0);
    // An honest client then gets the right object.
    let job = p.submit(d.clone(), honest.clone()).unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    assert_eq!(outcome(&p, job).result, reference_compile(&d, &honest));
}

#[test]
fn bytes_altered_in_flight_never_yield_a_wrong_result() {
    for seed in 0..20 {
        let mut p = pair(Strategy::Speculative, 1, 0, seed);
        p.alter_c2s = Some(flip_last_source_byte);
        let d = desc(9);
        let src = source(50_000, seed as u8);
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run(100_000);
        // Whatever broke (a job, or the connection), a result is only ever the right one.
        if let Some(ClientEvent::Done { outcome, .. }) = p.job_end(job) {
            assert_eq!(outcome.result, reference_compile(&d, &src));
        }
        assert!(
            p.app
                .cache
                .values()
                .all(|r| *r == reference_compile(&d, &src)),
            "nothing wrong stored"
        );
    }
}

#[test]
fn a_compile_error_comes_back_with_its_status_and_is_not_cached() {
    let mut p = pair(Strategy::Speculative, 1, 0, 2);
    let d = desc(10);
    let src = Bytes::from_static(b"#error nope\n");
    for _ in 0..2 {
        let job = p.submit(d.clone(), src.clone()).unwrap();
        p.run_until_job_ends(job, 100_000).unwrap();
        let o = outcome(&p, job);
        assert_eq!(o.result.exit_code, 1);
        assert!(!o.origin.is_early());
    }
    assert_eq!(p.app.compiles, 2);
}

/// A version-1 server cannot be told which compiler a job needs: the client refuses it at
/// the handshake rather than let it run whatever compiler has the name.
#[test]
fn a_client_refuses_a_version_1_server() {
    let mut p = pair(Strategy::Speculative, 1, 0, 1);
    let hello = Frame::Hello(dcache_proto::Hello {
        min_version: 1,
        max_version: 1,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    });
    let bytes = hello.to_bytes(1 << 20).unwrap();
    p.client.handle_input(p.now, &bytes);
    let mut closed = None;
    while let Some(e) = p.client.poll_event() {
        if let ClientEvent::Closed { error } = e {
            closed = error;
        }
    }
    assert!(
        matches!(
            closed,
            Some(ConnectionError::VersionMismatch {
                ours_min: 2,
                peer_max: 1,
                ..
            })
        ),
        "{closed:?}"
    );
}

#[test]
fn version_mismatch_is_a_clear_error_on_both_ends() {
    let mut p = pair(Strategy::Speculative, 1, 0, 1);
    // A future client that speaks only version 3, written by hand.
    let hello = Frame::Hello(dcache_proto::Hello {
        min_version: 3,
        max_version: 3,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    });
    let bytes = hello.to_bytes(1 << 20).unwrap();
    p.server.handle_input(p.now, &bytes);
    let mut closed = None;
    while let Some(e) = p.server.poll_event() {
        if let ServerEvent::Closed { error } = e {
            closed = error;
        }
    }
    assert!(matches!(
        closed,
        Some(ConnectionError::VersionMismatch { peer_min: 3, .. })
    ));
    let out = p.server.poll_transmit(p.now).unwrap();
    let mut buf = bytes::BytesMut::from(&out[..]);
    let frame = dcache_proto::FrameDecoder::new(1 << 20)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    assert!(matches!(
        frame,
        Frame::Error {
            code: ErrorCode::VERSION_MISMATCH,
            ..
        }
    ));
    assert!(p.server.is_closed());
}

#[test]
fn handshake_timeout_closes_a_silent_peer() {
    let mut p = pair(Strategy::Speculative, 1, 0, 1);
    // The client never gets to speak: its bytes are never delivered.
    let t0 = p.now;
    p.server.handle_timeout(t0 + Duration::from_secs(11));
    let mut closed = None;
    while let Some(e) = p.server.poll_event() {
        if let ServerEvent::Closed { error } = e {
            closed = error;
        }
    }
    assert_eq!(closed, Some(ConnectionError::Timeout { what: "handshake" }));
}

#[test]
fn stalled_upload_and_idle_connection_time_out() {
    let mut p = pair(Strategy::Speculative, 1, 0, 1);
    let d = desc(11);
    let job = p.client.start_job(p.now, d, None).unwrap();
    p.client.push_source(job, source(1000, 1), false).unwrap();
    p.run(10_000);
    // The client never finishes the source: the server gives up after the stall timeout.
    p.advance(Duration::from_secs(61));
    assert!(p.server_events.iter().any(|(_, e)| matches!(
        e,
        ServerEvent::Closed {
            error: Some(ConnectionError::Timeout { what: "upload" })
        }
    )));
    assert!(p.client_events.iter().any(|(_, e)| matches!(
        e,
        ClientEvent::Closed {
            error: Some(ConnectionError::PeerError {
                code: ErrorCode::TIMEOUT,
                ..
            })
        }
    )));

    // Idle: no jobs at all; the server says GOAWAY and both close cleanly.
    let mut p = pair(Strategy::Speculative, 1, 0, 1);
    p.run(100);
    p.advance(Duration::from_secs(301));
    assert!(
        p.client_events
            .iter()
            .any(|(_, e)| *e == ClientEvent::GoAway)
    );
    assert!(p.client.is_closed());
    assert!(p.server.is_closed());
}

#[test]
fn goaway_lets_open_jobs_finish_and_refuses_new_ones() {
    let mut p = pair(Strategy::Speculative, 1, 0, 8);
    let d = desc(12);
    let s = source(200_000, 3);
    let job = p.submit(d.clone(), s.clone()).unwrap();
    p.advance(Duration::from_millis(1));
    p.server.goaway();
    p.run(100_000);
    assert_eq!(outcome(&p, job).result, reference_compile(&d, &s));
    assert!(p.client.start_job(p.now, desc(13), None).is_err());
    assert!(p.client.is_closed());
    assert!(p.server.is_closed());
}

#[test]
fn stats_request_round_trip() {
    let mut p = pair(Strategy::Speculative, 1, 0, 8);
    let d = desc(14);
    let s = source(1000, 3);
    warm(&mut p, &d, &s);
    p.client.request_stats().unwrap();
    p.run(1000);
    let stats = p
        .client_events
        .iter()
        .find_map(|(_, e)| match e {
            ClientEvent::Stats(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let get = |n: &str| stats.iter().find(|s| s.name == n).map(|s| s.value);
    assert_eq!(get("misses"), Some(1));
    assert_eq!(get("compiles"), Some(1));
}

#[test]
fn declared_length_lies_are_caught() {
    let mut p = pair(Strategy::Speculative, 1, 0, 4);
    p.chop = false;
    let src = source(5000, 1);
    let d = with_len(desc(15), 4000);
    let job = p.submit(d, src).unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    assert!(matches!(
        p.job_end(job),
        Some(ClientEvent::Failed {
            code: ErrorCode::LENGTH_MISMATCH,
            ..
        })
    ));
    assert!(p.app.cache.is_empty());
}

#[test]
fn oversized_source_is_refused_before_upload() {
    let server = ServerConfig {
        limits: Limits {
            max_source_len: 100_000,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let mut p = Pair::new(
        ClientConfig::default(),
        server,
        Duration::from_millis(5),
        10_000_000,
        3,
        Instant::now(),
    );
    let src = source(3 << 20, 1);
    let job = p.submit(with_len(desc(16), src.len()), src).unwrap();
    p.run_until_job_ends(job, 100_000).unwrap();
    assert!(matches!(
        p.job_end(job),
        Some(ClientEvent::Failed {
            code: ErrorCode::SOURCE_TOO_LARGE,
            ..
        })
    ));
    assert!(p.run(100_000));
    assert!(p.c2s.bytes_sent < 1 << 20);
    assert_eq!(p.server.jobs_open(), 0);
}

/// A verdict is owed only to a job that sent HASH: after a HASH-less upload has ended the
/// server refuses both MISS and an early result instead of sending the client a frame it
/// must treat as a protocol error.
#[test]
fn verdicts_are_refused_for_a_job_without_hash() {
    let mut p = pair(Strategy::SendAll, 1, 0, 9);
    // Hold the compile so the job stays open after its upload has ended.
    p.app.compile_time = Duration::from_secs(1);
    let src = source(100, 3);
    let job = p.client.start_job(p.now, desc(1), None).unwrap();
    p.client.push_source(job, src, true).unwrap();
    let mut ended = false;
    for _ in 0..100 {
        p.run(1);
        ended |= p
            .server_events
            .iter()
            .any(|(_, e)| matches!(e, ServerEvent::SourceDone { .. }));
        if ended {
            break;
        }
    }
    assert!(ended, "the upload never ended");
    assert!(
        p.server.send_miss(job).is_err(),
        "MISS for a job without HASH"
    );
    let r = reference_compile(&desc(1), b"x");
    assert!(
        p.server
            .send_result(job, &r, dcache_proto::ResultOrigin::Early)
            .is_err(),
        "early result for a job without HASH"
    );
    p.advance(Duration::from_secs(2));
    let o = outcome(&p, job);
    assert_eq!(o.origin, dcache_proto::ResultOrigin::Compiled);
}

/// The server pauses decoding while too many STATS answers are owed; the run loop must
/// resume the paused input once they are answered, or the requests behind the pause wait
/// for input that never comes.
#[test]
fn paused_input_is_resumed_by_the_run_loop() {
    let mut p = pair(Strategy::Speculative, 1, 0, 4);
    for _ in 0..20 {
        p.client.request_stats().unwrap();
    }
    assert!(p.run(1000));
    let answered = p
        .client_events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Stats(_)))
        .count();
    assert_eq!(answered, 20, "requests behind the pause were never decoded");
}

/// A lookup costs one round trip and no source: a hit comes back early with its key, a
/// miss ends the job with `NotCached` and the server compiles nothing.
#[test]
fn lookup_hits_early_and_ends_on_a_miss_without_source() {
    let mut p = pair(Strategy::Speculative, 5, 0, 11);
    let d = with_len(desc(1), 3000);
    let src = source(3000, 7);
    let job = p.lookup(d.clone(), &src).unwrap();
    assert!(p.run(1000));
    assert!(
        p.client_events
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::NotCached { job: j } if *j == job)),
        "{:?}",
        p.client_events
    );
    assert!(p.client.cancel(job).is_err(), "the job has ended");
    assert_eq!(p.app.compiles, 0);
    assert_eq!(p.client.jobs_open(), 0);
    assert_eq!(p.server.jobs_open(), 0);
    assert!(
        !p.client_events
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::Miss { .. })),
        "a lookup's MISS is reported as NotCached only"
    );

    warm(&mut p, &d, &src);
    let before = p.c2s.bytes_sent;
    let start = p.now;
    let job = p.lookup(d.clone(), &src).unwrap();
    let o = match p.run_until_job_ends(job, 1000) {
        Some(ClientEvent::Done { outcome, .. }) => outcome,
        other => panic!("{other:?}"),
    };
    assert_eq!(o.origin, dcache_proto::ResultOrigin::Early);
    assert_eq!(o.strategy, Strategy::Lookup);
    assert_eq!(o.key, Some(CacheKey::compute(&d, &src)));
    assert_eq!(o.result, reference_compile(&d, &src));
    assert_eq!(o.source_bytes_sent, 0);
    assert!(p.c2s.bytes_sent - before < 200, "no source went out");
    let done_at = p
        .client_events
        .iter()
        .find_map(|(t, e)| matches!(e, ClientEvent::Done { job: j, .. } if *j == job).then_some(*t))
        .unwrap();
    assert!(
        done_at - start <= Duration::from_millis(11),
        "one round trip"
    );
    assert!(p.client.push_source(job, src, true).is_err());
}

/// A job the server owes an answer fails with `TimedOut` once it has heard nothing for the
/// progress timeout, so the owner can compile elsewhere; a compile that answers in time,
/// and a job whose owner is still producing source, do not time out.
#[test]
fn a_job_without_progress_times_out_on_virtual_time() {
    let config = ClientConfig {
        progress_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let server = ServerConfig {
        stall_timeout: Duration::from_secs(600),
        ..ServerConfig::default()
    };
    let mut p = Pair::new(
        config.clone(),
        server.clone(),
        Duration::from_millis(1),
        0,
        3,
        Instant::now(),
    );
    // The server takes two minutes to compile: the job gives up after one.
    p.app.compile_time = Duration::from_secs(120);
    let start = p.now;
    let job = p.submit(desc(1), source(500, 1)).unwrap();
    p.advance(Duration::from_secs(59));
    assert!(p.job_end(job).is_none(), "timed out early");
    p.advance(Duration::from_secs(2));
    let at = p
        .client_events
        .iter()
        .find_map(|(t, e)| {
            matches!(e, ClientEvent::TimedOut { job: j, .. } if *j == job).then_some(*t)
        })
        .expect("the job timed out");
    // Counted from the MISS, one round trip after the start.
    assert!(at - start >= Duration::from_secs(60) && at - start <= Duration::from_millis(60_010));
    p.advance(Duration::from_secs(120));
    assert_eq!(
        p.job_end(job)
            .map(|e| matches!(e, ClientEvent::TimedOut { .. })),
        Some(true)
    );
    assert_eq!(
        p.client.jobs_open(),
        0,
        "the server's answer to ABORT let it go"
    );
    assert_eq!(p.server.jobs_open(), 0);

    // A compile of 50 s answers in time.
    let mut p = Pair::new(
        config.clone(),
        server.clone(),
        Duration::from_millis(1),
        0,
        3,
        Instant::now(),
    );
    p.app.compile_time = Duration::from_secs(50);
    let job = p.submit(desc(2), source(500, 2)).unwrap();
    p.advance(Duration::from_secs(120));
    assert!(matches!(p.job_end(job), Some(ClientEvent::Done { .. })));

    // The owner streams its source slowly: that wait is not the server's.
    let mut p = Pair::new(
        config,
        server,
        Duration::from_millis(1),
        0,
        3,
        Instant::now(),
    );
    let job = p.client.start_job(p.now, desc(3), None).unwrap();
    p.client.push_source(job, source(100, 3), false).unwrap();
    p.advance(Duration::from_secs(120));
    assert!(p.job_end(job).is_none());
    p.client.push_source(job, Bytes::new(), true).unwrap();
    p.advance(Duration::from_secs(1));
    assert!(matches!(p.job_end(job), Some(ClientEvent::Done { .. })));
}

/// Timeouts set to "forever" are cut to MAX_TIMEOUT instead of overflowing the clock
/// (adding `Duration::MAX` to an `Instant` panics).
#[test]
fn huge_timeouts_do_not_overflow_the_clock() {
    let forever = Duration::MAX;
    let mut p = Pair::new(
        ClientConfig {
            handshake_timeout: forever,
            progress_timeout: forever,
            ..ClientConfig::default()
        },
        ServerConfig {
            handshake_timeout: forever,
            idle_timeout: forever,
            stall_timeout: forever,
            ..ServerConfig::default()
        },
        Duration::from_millis(1),
        0,
        2,
        Instant::now(),
    );
    let job = p.submit(desc(1), source(100, 1)).unwrap();
    assert!(matches!(
        p.run_until_job_ends(job, 1000),
        Some(ClientEvent::Done { .. })
    ));
    assert!(
        p.client
            .poll_timeout()
            .is_none_or(|t| t <= p.now + dcache_proto::MAX_TIMEOUT)
    );
    assert!(
        p.server
            .poll_timeout()
            .is_none_or(|t| t <= p.now + dcache_proto::MAX_TIMEOUT)
    );
}

/// How many uploads the server has seen complete.
fn source_done(p: &Pair) -> usize {
    p.server_events
        .iter()
        .filter(|(_, e)| matches!(e, ServerEvent::SourceDone { .. }))
        .count()
}

/// Moves the pair on (time included) until `done` holds.
fn until(p: &mut Pair, done: impl Fn(&Pair) -> bool) {
    for _ in 0..100_000 {
        if done(p) {
            return;
        }
        p.run(1);
    }
    panic!("the condition never held");
}

#[test]
fn a_running_compile_can_be_cancelled_after_the_final_source() {
    for seed in 1..=5 {
        let mut p = pair(Strategy::Speculative, 2, 0, seed);
        // Compiles take a virtual second: the cancel arrives while the first one runs.
        p.app.compile_time = Duration::from_secs(1);
        let (d1, s1) = (desc(1), source(5000, 1));
        let (d2, s2) = (desc(2), source(5000, 2));
        let first = p.submit(d1, s1).unwrap();
        let second = p.submit(d2.clone(), s2.clone()).unwrap();
        // Both uploads complete (the server saw both SourceDone).
        until(&mut p, |p| source_done(p) == 2);
        p.client.cancel(first).unwrap();
        p.run_until_job_ends(second, 100_000).unwrap();
        p.run(100_000);
        // The server was told, stopped that compile, and the connection lives on.
        assert!(
            p.server_events
                .iter()
                .any(|(_, e)| matches!(e, ServerEvent::JobCancelled { job, .. } if *job == first))
        );
        assert_eq!(p.app.cancelled, 1);
        assert_eq!(outcome(&p, second).result, reference_compile(&d2, &s2));
        assert!(!p.client.is_closed() && !p.server.is_closed());
        assert!(
            !p.client_events
                .iter()
                .any(|(_, e)| matches!(e, ClientEvent::Done { job, .. } if *job == first)),
            "a cancelled job reports nothing"
        );
        // Both ends let the job go: a third job on the same connection still runs.
        let (d3, s3) = (desc(3), source(100, 3));
        let third = p.submit(d3.clone(), s3.clone()).unwrap();
        p.run_until_job_ends(third, 100_000).unwrap();
        assert_eq!(outcome(&p, third).result, reference_compile(&d3, &s3));
    }
}

#[test]
fn a_cancel_crossing_the_result_is_harmless() {
    for seed in 1..=5 {
        // Instant compiles on a 10 ms link: the RESULT is on its way when the ABORT leaves.
        let mut p = pair(Strategy::SendAll, 10, 0, seed);
        let (d1, s1) = (desc(1), source(3000, 1));
        let first = p.submit(d1, s1).unwrap();
        // The server has answered (instantly); the answer is still on the wire.
        until(&mut p, |p| source_done(p) == 1);
        p.client.cancel(first).unwrap();
        p.run(100_000);
        assert!(
            !p.client.is_closed() && !p.server.is_closed(),
            "no protocol error"
        );
        let (d2, s2) = (desc(2), source(100, 2));
        let second = p.submit(d2.clone(), s2.clone()).unwrap();
        p.run_until_job_ends(second, 100_000).unwrap();
        assert_eq!(outcome(&p, second).result, reference_compile(&d2, &s2));
    }
}
