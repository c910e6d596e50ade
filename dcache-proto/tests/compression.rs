//! The `ZSTD` feature end to end on the real state machines: negotiation, compressed
//! uploads and results, the old bytes for a peer without the feature, and the bounds a
//! hostile compressed frame runs into.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use dcache_proto::testing::{Pair, reference_compile};
use dcache_proto::{
    CacheKey, ClientConfig, ClientEvent, Connection, ConnectionError, DEFAULT_LEVEL, ErrorCode,
    FEATURE_ZSTD, Frame, FrameDecoder, Hello, JobDesc, JobId, Limits, ResultOrigin, ServerConfig,
    ServerConnection, ServerEvent, Strategy, compress_payload,
};

fn desc(len: usize) -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into()],
        source_len: Some(len as u64),
        identity: None,
    }
}

/// Text shaped like preprocessed C: compresses several times over, as the real thing does.
fn c_like(len: usize) -> Bytes {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "static int v{i} = {};\nextern void f{}(int);\n",
                i * 7,
                i % 97
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    Bytes::from(out)
}

fn pair(client_level: Option<i32>, server: ServerConfig, strategy: Strategy, seed: u64) -> Pair {
    Pair::new(
        ClientConfig {
            strategy,
            compression: client_level,
            ..ClientConfig::default()
        },
        server,
        Duration::from_millis(2),
        12_500_000,
        seed,
        Instant::now(),
    )
}

fn done(p: &Pair, job: JobId) -> dcache_proto::JobOutcome {
    match p.job_end(job) {
        Some(ClientEvent::Done { outcome, .. }) => outcome,
        other => panic!("{job} did not finish with a result: {other:?}"),
    }
}

#[test]
fn a_compressed_miss_and_hit_give_the_same_result_for_fewer_bytes() {
    for strategy in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll] {
        for seed in 1..=3 {
            let src = c_like(600 * 1024);
            let d = desc(src.len());
            let mut plain = pair(None, ServerConfig::default(), strategy, seed);
            let mut zstd = pair(Some(DEFAULT_LEVEL), ServerConfig::default(), strategy, seed);
            let mut results = Vec::new();
            for p in [&mut plain, &mut zstd] {
                let job = p.submit(d.clone(), src.clone()).unwrap();
                p.run_until_job_ends(job, 1_000_000).expect("miss ended");
                let miss = done(p, job);
                assert!(!miss.origin.is_cached());
                assert_eq!(miss.result, reference_compile(&d, &src));
                let job = p.submit(d.clone(), src.clone()).unwrap();
                p.run_until_job_ends(job, 1_000_000).expect("hit ended");
                let hit = done(p, job);
                assert!(hit.origin.is_cached(), "{strategy:?}");
                assert_eq!(hit.result, miss.result);
                // One compile, one verified entry, under the key of the plain source.
                assert_eq!(p.app.compiles, 1);
                assert!(p.app.cache.contains_key(&CacheKey::compute(&d, &src)));
                results.push((p.c2s.bytes_sent, p.s2c.bytes_sent));
            }
            assert!(!plain.client.compression_negotiated());
            assert!(zstd.client.compression_negotiated());
            let ((plain_up, plain_down), (zstd_up, zstd_down)) = (results[0], results[1]);
            assert!(
                zstd_up * 3 < plain_up,
                "{strategy:?}: upload {zstd_up} compressed vs {plain_up} plain"
            );
            assert!(
                zstd_down * 2 < plain_down,
                "{strategy:?}: download {zstd_down} compressed vs {plain_down} plain"
            );
        }
    }
}

#[test]
fn an_incompressible_source_goes_out_as_it_is() {
    let mut x = 0x1234_5678_9abc_def0u64;
    let src: Bytes = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into();
    let d = desc(src.len());
    let mut p = pair(
        Some(DEFAULT_LEVEL),
        ServerConfig::default(),
        Strategy::SendAll,
        1,
    );
    let job = p.submit(d.clone(), src.clone()).unwrap();
    p.run_until_job_ends(job, 1_000_000).expect("ended");
    assert_eq!(done(&p, job).result, reference_compile(&d, &src));
    let (plain, wire) = p.client.bulk_bytes_sent();
    assert_eq!(plain, src.len() as u64);
    assert_eq!(wire, plain, "no chunk may grow");
}

#[test]
fn a_job_can_decline_compression() {
    let src = c_like(200 * 1024);
    let d = desc(src.len());
    let mut p = pair(
        Some(DEFAULT_LEVEL),
        ServerConfig::default(),
        Strategy::SendAll,
        2,
    );
    // Let the handshake finish so the job's chunks could be compressed.
    p.run(1000);
    assert!(p.client.compression_negotiated());
    let job = p.client.start_job(p.now, d.clone(), None).unwrap();
    p.client.set_job_compression(job, false).unwrap();
    p.client.push_source(job, src.clone(), true).unwrap();
    p.run_until_job_ends(job, 1_000_000).expect("ended");
    assert_eq!(done(&p, job).result, reference_compile(&d, &src));
    let (plain, wire) = p.client.bulk_bytes_sent();
    assert_eq!((plain, wire), (src.len() as u64, src.len() as u64));
}

/// Every byte both ways of one session, for a client without the feature.
fn transcript(server: ServerConfig) -> (Vec<u8>, Vec<u8>) {
    let now = Instant::now();
    let mut client = dcache_proto::ClientConnection::new(ClientConfig::default(), now);
    let mut server = ServerConnection::new(server, now);
    let src = c_like(100 * 1024);
    let d = desc(src.len());
    let job = client
        .start_job(now, d.clone(), Some(CacheKey::compute(&d, &src)))
        .unwrap();
    client.push_source(job, src.clone(), true).unwrap();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let mut moved = false;
        while let Some(b) = client.poll_transmit(now) {
            up.extend_from_slice(&b);
            server.handle_input(now, &b);
            moved = true;
        }
        while let Some(e) = server.poll_event() {
            if let ServerEvent::SourceDone { job, .. } = e {
                server
                    .send_result(job, &reference_compile(&d, &src), ResultOrigin::Compiled)
                    .unwrap();
            }
            moved = true;
        }
        while let Some(b) = server.poll_transmit(now) {
            down.extend_from_slice(&b);
            client.handle_input(now, &b);
            moved = true;
        }
        while client.poll_event().is_some() {
            moved = true;
        }
        if !moved {
            break;
        }
    }
    (up, down)
}

#[test]
fn a_client_without_the_feature_sees_the_bytes_it_always_did() {
    let with = transcript(ServerConfig::default());
    let without = transcript(ServerConfig {
        compression: None,
        ..ServerConfig::default()
    });
    assert_eq!(with, without);
    // And its server's HELLO announces nothing.
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::from(&with.1[..]);
    let Some(Frame::Hello(h)) = dec.decode(&mut buf).unwrap() else {
        panic!("server did not start with HELLO");
    };
    assert_eq!(h.features, 0);
}

#[test]
fn a_server_without_the_feature_gets_plain_frames_from_a_client_that_offers_it() {
    let src = c_like(300 * 1024);
    let d = desc(src.len());
    let mut p = pair(
        Some(DEFAULT_LEVEL),
        ServerConfig {
            compression: None,
            ..ServerConfig::default()
        },
        Strategy::Speculative,
        3,
    );
    let job = p.submit(d.clone(), src.clone()).unwrap();
    p.run_until_job_ends(job, 1_000_000).expect("ended");
    assert_eq!(done(&p, job).result, reference_compile(&d, &src));
    assert!(!p.client.compression_negotiated());
    let (plain, wire) = p.client.bulk_bytes_sent();
    assert_eq!(plain, wire);
}

/// A server that answered a client announcing `ZSTD`, with a job open, ready for a
/// hand-made SOURCE.
fn server_with_job(features: u64) -> (ServerConnection, Instant) {
    let now = Instant::now();
    let mut s = ServerConnection::new(ServerConfig::default(), now);
    let hello = Frame::Hello(Hello {
        min_version: 2,
        max_version: 2,
        limits: Limits::default(),
        features,
        extensions: Bytes::new(),
    });
    let job = Frame::Job {
        job: JobId(1),
        desc: JobDesc {
            identity: Some(dcache_proto::CompilerIdentity::new(
                "gcc 12",
                "x86_64-linux-gnu",
                [1; 32],
            )),
            ..desc(100)
        },
    };
    for f in [hello, job] {
        s.handle_input(now, &f.to_bytes(1 << 20).unwrap());
    }
    while s.poll_transmit(now).is_some() {}
    while s.poll_event().is_some() {}
    (s, now)
}

fn closed_with(s: &mut ServerConnection) -> Option<ErrorCode> {
    std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        ServerEvent::Closed {
            error: Some(ConnectionError::Protocol { code, .. }),
        } => Some(code),
        _ => None,
    })
}

fn compressed_source(payload: Bytes) -> Vec<u8> {
    Frame::Source {
        job: JobId(1),
        data: payload,
        fin: true,
        zstd: true,
    }
    .to_bytes(1 << 20)
    .unwrap()
    .to_vec()
}

#[test]
fn a_zip_bomb_is_a_protocol_error_before_its_memory_is_spent() {
    // 256 MiB of zeros compress to a few KiB; the frame tells the truth about its length,
    // which is over the server's 1 MiB limit: refused from the prefix alone.
    let zeros = vec![0u8; 256 << 20];
    let honest = compress_payload(&zeros, 1).unwrap();
    drop(zeros);
    assert!(honest.len() < 64 * 1024);
    let (mut s, now) = server_with_job(FEATURE_ZSTD);
    s.handle_input(now, &compressed_source(honest.clone()));
    assert_eq!(closed_with(&mut s), Some(ErrorCode::FRAME_TOO_LARGE));

    // The same frame claiming 1 KiB: inflating stops when the 1 KiB buffer is full.
    let mut liar = BytesMut::new();
    liar.put_u32(1024);
    liar.extend_from_slice(&honest[4..]);
    let (mut s, now) = server_with_job(FEATURE_ZSTD);
    s.handle_input(now, &compressed_source(liar.freeze()));
    assert_eq!(closed_with(&mut s), Some(ErrorCode::PROTOCOL));
}

#[test]
fn a_compressed_frame_without_the_feature_is_refused() {
    let (mut s, now) = server_with_job(0);
    let payload = compress_payload(&c_like(100), 1).unwrap();
    s.handle_input(now, &compressed_source(payload));
    assert_eq!(closed_with(&mut s), Some(ErrorCode::PROTOCOL));
}

#[test]
fn the_key_of_a_compressed_source_is_the_key_of_its_content() {
    let src = c_like(100);
    let (mut s, now) = server_with_job(FEATURE_ZSTD);
    s.handle_input(now, &compressed_source(compress_payload(&src, 1).unwrap()));
    // No HASH was sent, so the server reports the key of what it received: the plain
    // bytes, whatever the wire carried.
    let key = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        ServerEvent::SourceDone { key, .. } => Some(key),
        _ => None,
    });
    let d = JobDesc {
        identity: Some(dcache_proto::CompilerIdentity::new(
            "gcc 12",
            "x86_64-linux-gnu",
            [1; 32],
        )),
        ..desc(100)
    };
    assert_eq!(key, Some(CacheKey::compute(&d, &src)));
}
