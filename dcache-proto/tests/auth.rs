//! Shared-token authentication between the state machines: who proves what, what a peer
//! without the token or with the wrong one gets, and that no job starts before the proof.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dcache_proto::Connection;
use dcache_proto::testing::{Pair, reference_compile};
use dcache_proto::{
    AuthKey, ClientConfig, ClientConnection, ClientEvent, ConnectionError, ErrorCode, FEATURE_AUTH,
    Frame, FrameDecoder, Hello, JobDesc, JobId, Limits, ServerConfig, ServerConnection,
    ServerEvent,
};

fn desc() -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into()],
        source_len: None,
        identity: None,
    }
}

/// A pair whose ends hold the given tokens (None: no token), with distinct nonces.
fn pair(client_token: Option<&[u8]>, server_token: Option<&[u8]>, seed: u8) -> Pair {
    let origin = Instant::now();
    let client = ClientConfig {
        auth: client_token.map(AuthKey::from_token),
        ..ClientConfig::default()
    };
    let server = ServerConfig {
        auth: server_token.map(AuthKey::from_token),
        ..ServerConfig::default()
    };
    let mut p = Pair::new(
        client.clone(),
        server.clone(),
        Duration::from_millis(5),
        0,
        u64::from(seed),
        origin,
    );
    p.client = ClientConnection::with_nonce(client, origin, [seed; 32]);
    p.server = ServerConnection::with_nonce(server, origin, [seed ^ 0xFF; 32]);
    p
}

fn client_error(p: &Pair) -> Option<ConnectionError> {
    p.client_events.iter().find_map(|(_, e)| match e {
        ClientEvent::Closed { error } => error.clone(),
        _ => None,
    })
}

fn server_error(p: &Pair) -> Option<ConnectionError> {
    p.server_events.iter().find_map(|(_, e)| match e {
        ServerEvent::Closed { error } => error.clone(),
        _ => None,
    })
}

fn server_started_anything(p: &Pair) -> bool {
    p.server_events.iter().any(|(_, e)| {
        matches!(
            e,
            ServerEvent::Connected { .. } | ServerEvent::JobStarted { .. }
        )
    })
}

#[test]
fn same_token_compiles_and_costs_one_extra_round_trip_per_connection() {
    let mut p = pair(Some(b"s3cret"), Some(b"s3cret\n"), 1);
    let src = Bytes::from_static(b"int main(void) { return 0; }");
    let job = p.submit(desc(), src.clone()).unwrap();
    let end = p.run_until_job_ends(job, 10_000).unwrap();
    let ClientEvent::Done { outcome, .. } = end else {
        panic!("job did not complete: {end:?}");
    };
    assert_eq!(outcome.result, reference_compile(&desc(), &src));
    // HELLO out and back, AUTH+JOB out and the result back: two round trips of 10 ms,
    // where an unauthenticated connection pipelines and needs one.
    assert!(
        p.elapsed() >= Duration::from_millis(20),
        "{:?}",
        p.elapsed()
    );
    // Later jobs on the connection pay nothing more.
    let t0 = p.now;
    let second = p.submit(desc(), Bytes::from_static(b"int x;")).unwrap();
    assert!(matches!(
        p.run_until_job_ends(second, 10_000),
        Some(ClientEvent::Done { .. })
    ));
    assert!(p.now - t0 < Duration::from_millis(15));
}

#[test]
fn stats_asked_for_before_the_handshake_wait_for_the_proof() {
    let mut p = pair(Some(b"s3cret"), Some(b"s3cret"), 6);
    p.client.request_stats().unwrap();
    p.run(10_000);
    assert!(
        p.client_events
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::Stats(_))),
        "{:?}",
        p.client_events
    );
    assert_eq!(server_error(&p), None);
}

#[test]
fn wrong_token_is_caught_by_the_client_before_it_sends_a_job() {
    let mut p = pair(Some(b"mine"), Some(b"theirs"), 2);
    let job = p.submit(desc(), Bytes::from_static(b"int a;")).unwrap();
    p.run(10_000);
    let err = client_error(&p).expect("client closed with an error");
    assert!(
        matches!(err, ConnectionError::Unauthorized { ref reason } if reason.contains("DCACHE_TOKEN")),
        "{err}"
    );
    assert!(matches!(
        p.job_end(job),
        Some(ClientEvent::Failed { .. }) | None
    ));
    assert!(!server_started_anything(&p));
    let err = server_error(&p);
    assert!(
        matches!(
            err,
            Some(ConnectionError::PeerError {
                code: ErrorCode::UNAUTHORIZED,
                ..
            })
        ),
        "{err:?} {:?}",
        p.server_events
    );
}

#[test]
fn a_client_without_token_is_refused_even_though_it_pipelined_a_job() {
    let mut p = pair(None, Some(b"s3cret"), 3);
    p.submit(desc(), Bytes::from_static(b"int a;")).unwrap();
    p.run(10_000);
    assert!(!server_started_anything(&p));
    assert!(matches!(
        server_error(&p),
        Some(ConnectionError::Unauthorized { .. })
    ));
    let err = client_error(&p).expect("client told why");
    assert!(
        matches!(err, ConnectionError::PeerError { code: ErrorCode::UNAUTHORIZED, ref message } if message.contains("DCACHE_TOKEN")),
        "{err}"
    );
}

#[test]
fn a_client_with_a_token_refuses_a_server_that_does_not_authenticate() {
    let mut p = pair(Some(b"s3cret"), None, 4);
    p.submit(desc(), Bytes::from_static(b"int a;")).unwrap();
    p.run(10_000);
    assert!(matches!(
        client_error(&p),
        Some(ConnectionError::Unauthorized { .. })
    ));
    assert!(
        !p.server_events
            .iter()
            .any(|(_, e)| matches!(e, ServerEvent::JobStarted { .. })),
        "the impostor got a job"
    );
}

#[test]
fn a_server_with_a_key_but_no_nonce_refuses_rather_than_run_open() {
    let mut p = pair(Some(b"t"), Some(b"t"), 5);
    p.server = ServerConnection::new(
        ServerConfig {
            auth: Some(AuthKey::from_token(b"t")),
            ..ServerConfig::default()
        },
        p.now,
    );
    p.submit(desc(), Bytes::from_static(b"int a;")).unwrap();
    p.run(10_000);
    assert!(!server_started_anything(&p));
    assert_eq!(
        server_error(&p).map(|e| e.code()),
        Some(ErrorCode::INTERNAL)
    );
}

// ----- a hand-written attacker speaking raw frames -----

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&f.to_bytes(65_536).unwrap());
    }
    out
}

fn client_hello(nonce: [u8; 32]) -> Frame {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        limits: Limits::default(),
        features: FEATURE_AUTH,
        extensions: Bytes::copy_from_slice(&nonce),
    })
}

/// Feeds `input` to a token-protected server and returns what it sent and its events.
fn attack(server_nonce: [u8; 32], input: &[u8]) -> (Vec<Frame>, Vec<ServerEvent>) {
    let now = Instant::now();
    let mut s = ServerConnection::with_nonce(
        ServerConfig {
            auth: Some(AuthKey::from_token(b"s3cret")),
            ..ServerConfig::default()
        },
        now,
        server_nonce,
    );
    s.handle_input(now, input);
    let mut out = BytesMut::new();
    while let Some(b) = s.poll_transmit(now) {
        out.extend_from_slice(&b);
    }
    let mut dec = FrameDecoder::new(1 << 20);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.decode(&mut out) {
        frames.push(f);
    }
    let mut events = Vec::new();
    while let Some(e) = s.poll_event() {
        events.push(e);
    }
    (frames, events)
}

fn refused(frames: &[Frame], events: &[ServerEvent]) -> bool {
    frames
        .iter()
        .any(|f| matches!(f, Frame::Error { code, .. } if *code == ErrorCode::UNAUTHORIZED))
        && !events.iter().any(|e| {
            matches!(
                e,
                ServerEvent::Connected { .. } | ServerEvent::JobStarted { .. }
            )
        })
}

#[test]
fn a_job_before_auth_is_refused() {
    let job = Frame::Job {
        job: JobId(1),
        desc: desc(),
    };
    let (frames, events) = attack([9; 32], &encode(&[client_hello([1; 32]), job]));
    assert!(refused(&frames, &events), "{frames:?} {events:?}");
}

#[test]
fn a_recorded_auth_does_not_replay_against_a_new_challenge() {
    let key = AuthKey::from_token(b"s3cret");
    // An honest exchange, recorded: the server's HELLO gives its nonce, the client's AUTH
    // answers it.
    let mut honest = ClientConnection::with_nonce(
        ClientConfig {
            auth: Some(key.clone()),
            ..ClientConfig::default()
        },
        Instant::now(),
        [1; 32],
    );
    let now = Instant::now();
    let (server_frames, _) = attack([9; 32], &encode(&[client_hello([1; 32])]));
    let server_bytes = encode(&server_frames);
    while honest.poll_transmit(now).is_some() {}
    honest.handle_input(now, &server_bytes);
    let mut recorded = BytesMut::new();
    while let Some(b) = honest.poll_transmit(now) {
        recorded.extend_from_slice(&b);
    }
    let mut dec = FrameDecoder::new(1 << 20);
    let auth = dec.decode(&mut recorded).unwrap().unwrap();
    assert!(matches!(auth, Frame::Auth { .. }), "{auth:?}");
    // Accepted against the challenge it answered...
    let (frames, events) = attack([9; 32], &encode(&[client_hello([1; 32]), auth.clone()]));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ServerEvent::Connected { .. })),
        "{frames:?}"
    );
    // ...and refused against any other.
    let (frames, events) = attack([10; 32], &encode(&[client_hello([1; 32]), auth]));
    assert!(refused(&frames, &events), "{frames:?} {events:?}");
}

#[test]
fn a_hello_without_the_auth_fields_is_refused() {
    let bare = Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        limits: Limits::default(),
        features: FEATURE_AUTH,
        extensions: Bytes::from_static(b"short"),
    });
    let (frames, events) = attack([9; 32], &encode(&[bare]));
    assert!(refused(&frames, &events), "{frames:?}");
}

#[test]
fn auth_outside_the_handshake_is_a_protocol_error() {
    let now = Instant::now();
    let mut s = ServerConnection::new(ServerConfig::default(), now);
    s.handle_input(
        now,
        &encode(&[client_hello([1; 32]), Frame::Auth { proof: [0; 32] }]),
    );
    let closed = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        ServerEvent::Closed { error } => error,
        _ => None,
    });
    assert_eq!(closed.map(|e| e.code()), Some(ErrorCode::UNEXPECTED_FRAME));
}
