//! Hostile input against a running server over real TCP sockets, and again through TLS
//! (`over_tcp_and_tls!`): each attack gets a clear error on its own connection, and an honest client keeps compiling throughout (asserted,
//! not assumed). Timeouts are shortened to keep the suite fast; the rules are the same.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dcache_proto::testing::reference_compile;
use dcache_proto::{
    CacheKey, ClientConfig, ErrorCode, Frame, FrameDecoder, Hello, JobDesc, JobId, Limits,
    ServerConfig, Strategy,
};
use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, BoxedStream, TransportOptions, bind, connect, spawn_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../../dcache-transport/tests/pki/mod.rs"]
mod pki;

const TIMEOUT: Duration = Duration::from_millis(800);

/// What the cases run over. Each case listed in `over_tcp_and_tls!` runs over both: the
/// same hostile bytes, sent through a TLS connection, must meet the same limits behind
/// rustls as on plain TCP.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Tls,
}

/// Each case runs twice, as `CASE::tcp` and `CASE::tls`.
macro_rules! over_tcp_and_tls {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$case(super::Transport::Tcp).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls() {
                super::$case(super::Transport::Tls).await
            }
        }
    )*};
}

over_tcp_and_tls!(
    malformed_and_out_of_order_frames_cost_only_their_connection,
    silent_and_trickling_clients_are_timed_out,
    lying_sizes_and_finished_jobs,
    a_client_killed_mid_upload_leaves_nothing_behind,
    a_stalled_upload_gives_its_compile_slot_back,
    a_lying_hash_for_a_cached_key_is_never_counted_as_a_hit,
    a_client_half_closing_mid_upload_is_told_why,
    bytes_saved_by_an_early_answer_are_counted_while_the_connection_lives,
);

struct Harness {
    service: Arc<Service>,
    addr: Address,
    port: u16,
    /// What clients connect with: for TLS, trusting the harness's own CA.
    opts: TransportOptions,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    /// A fresh connection to the server, through TLS when the harness serves TLS: what
    /// an attacker writes its bytes into.
    async fn raw(&self) -> BoxedStream {
        connect(&self.addr, &self.opts).await.unwrap()
    }
}

async fn start(t: Transport) -> Harness {
    start_with(
        t,
        ServiceConfig {
            protocol: ServerConfig {
                handshake_timeout: TIMEOUT,
                stall_timeout: TIMEOUT,
                ..ServerConfig::default()
            },
            ..ServiceConfig::default()
        },
    )
    .await
}

async fn start_with(t: Transport, config: ServiceConfig) -> Harness {
    let handshake_timeout = config.protocol.handshake_timeout;
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(FakeExecutor::new(Duration::from_millis(1))),
        config,
    );
    let (listen, opts) = match t {
        Transport::Tcp => ("tcp://127.0.0.1:0", TransportOptions::default()),
        Transport::Tls => {
            let ca = pki::Pki::new("hostile test CA");
            // The TLS opening has the protocol handshake's limit, as dcache-server sets it.
            let server = ca.server().with_handshake_timeout(handshake_timeout);
            let opts = TransportOptions::default()
                .with_tls_server(server)
                .with_tls_client(ca.client());
            ("tls://127.0.0.1:0", opts)
        }
    };
    let listener = bind(&listen.parse().unwrap(), &opts).await.unwrap();
    let addr = listener.local_addr();
    let port = addr
        .to_string()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = service.clone();
    tokio::spawn(async move {
        s.serve(listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    Harness {
        service,
        addr,
        port,
        opts,
        _stop: stop,
    }
}

/// An honest client compiling in a loop (new sources and repeats, so misses and hits)
/// until stopped; every result is checked. Returns how many jobs it completed.
struct Honest {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Honest {
    async fn start(h: &Harness) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let stream = h.raw().await;
        let client = spawn_client(
            stream,
            ClientConfig {
                strategy: Strategy::Speculative,
                ..ClientConfig::default()
            },
        );
        let (s, d) = (stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let desc = JobDesc {
                    compiler: "gcc".into(),
                    language: "cpp-output".into(),
                    args: vec!["-O2".into(), "-c".into()],
                    source_len: None,
                    identity: None,
                };
                let src = Bytes::from(format!("int honest_{};\n", n % 8).repeat(200));
                let key = CacheKey::compute(&desc, &src);
                let out = client
                    .submit(desc.clone(), Some(key), src.clone())
                    .await
                    .map_err(|e| format!("honest job {n} failed: {e}"))?;
                if out.result != reference_compile(&desc, &src) {
                    return Err(format!("honest job {n} got a wrong result"));
                }
                d.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        Self { stop, done, task }
    }

    /// Waits until the loop has completed `n` more jobs (it must not stall).
    async fn progress(&self, n: u64) {
        let target = self.done() + n;
        let t = Instant::now();
        while self.done() < target {
            assert!(
                !self.task.is_finished(),
                "honest client stopped: {:?}",
                self.task
            );
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "honest client stalled"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Asserts it keeps completing jobs after the attack, then stops it; any failed or
    /// wrong honest job fails the test.
    async fn finish(self) {
        self.progress(3).await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap().unwrap();
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&f.to_bytes(1 << 20).unwrap());
    }
    out
}

/// HELLO, then job 1 of `desc` with HASH `key` and its first SOURCE chunk (`data`, no FIN):
/// how a client opens a hashed upload.
fn hashed_upload(desc: &JobDesc, key: CacheKey, data: Bytes) -> Vec<u8> {
    encode(&[
        hello(),
        Frame::Job {
            job: JobId(1),
            desc: desc.clone(),
        },
        Frame::Hash { job: JobId(1), key },
        Frame::Source {
            job: JobId(1),
            data,
            fin: false,
            zstd: false,
        },
    ])
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    })
}

/// A `gcc -c` job of preprocessed C, declaring `len` source bytes if given.
fn gcc_c(source_len: Option<u64>) -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-c".into()],
        source_len,
        identity: None,
    }
}

fn job(id: u32, len: Option<u64>) -> Frame {
    Frame::Job {
        job: JobId(id),
        desc: gcc_c(len),
    }
}

fn source(id: u32, data: &'static [u8], fin: bool) -> Frame {
    Frame::Source {
        job: JobId(id),
        data: Bytes::from_static(data),
        fin,
        zstd: false,
    }
}

/// Reads what the server sends until it closes (or `limit` passes: a failure).
async fn read_to_close(stream: &mut BoxedStream, limit: Duration) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("the server did not close the connection");
    let mut dec = FrameDecoder::new(Limits::MAX_FRAME_PAYLOAD);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        frames.push(f);
    }
    frames
}

/// Frames read from a live connection, kept across calls.
#[derive(Default)]
struct FrameReader {
    buf: BytesMut,
    dec: Option<FrameDecoder>,
}

impl FrameReader {
    /// Reads into `got` until a frame matching `done` has arrived (10 s at most).
    async fn until(&mut self, s: &mut BoxedStream, got: &mut Vec<Frame>, done: fn(&Frame) -> bool) {
        let dec = self
            .dec
            .get_or_insert_with(|| FrameDecoder::new(Limits::MAX_FRAME_PAYLOAD));
        while !got.iter().any(done) {
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| panic!("no answer within 10 s; so far: {got:?}"))
                .unwrap();
            assert!(
                read > 0,
                "the server closed the connection; so far: {got:?}"
            );
            while let Ok(Some(f)) = dec.decode(&mut self.buf) {
                got.push(f);
            }
        }
    }
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

/// Sends `bytes` on a fresh connection, reads until the server closes, and returns the
/// ERROR code it sent; an honest client runs throughout.
async fn attack(h: &Harness, bytes: Vec<u8>) -> Option<ErrorCode> {
    let honest = Honest::start(h).await;
    let mut s = h.raw().await;
    // The attacker is connected (and accepted) while the honest client works...
    honest.progress(3).await;
    // ...then attacks. The write may fail if the server closes first; what it sent back
    // is what counts.
    let _ = s.write_all(&bytes).await;
    let frames = read_to_close(&mut s, Duration::from_secs(10)).await;
    honest.finish().await;
    error_code(&frames)
}

async fn malformed_and_out_of_order_frames_cost_only_their_connection(t: Transport) {
    let h = start(t).await;
    let with_hello = |rest: Vec<Frame>| {
        let mut v = vec![hello()];
        v.extend(rest);
        encode(&v)
    };
    let mut unknown = encode(&[hello()]);
    // Type 0x40: not defined, not in the ignorable range.
    unknown.extend_from_slice(&[0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut oversize = encode(&[hello()]);
    // A SOURCE header claiming 1 GiB: refused on the header, before any body arrives.
    oversize.extend_from_slice(&[0x04, 0, 0, 0, 0, 0, 0, 1, 0x40, 0, 0, 0]);
    let mut bad_version = encode(&[Frame::Hello(Hello {
        min_version: 9,
        max_version: 9,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    })]);
    bad_version.truncate(bad_version.len());
    let flood_empty: Vec<Frame> = std::iter::once(job(1, None))
        .chain((0..100).map(|_| source(1, b"", false)))
        .collect();
    let flood_ignorable: Vec<Frame> = (0..100)
        .map(|_| Frame::Ignorable {
            ty: dcache_proto::FrameType(0x80),
            flags: 0,
            job: 0,
            payload: Bytes::new(),
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("unknown mandatory type", unknown, ErrorCode::UNKNOWN_FRAME),
        (
            "length over the limit",
            oversize,
            ErrorCode::FRAME_TOO_LARGE,
        ),
        ("version mismatch", bad_version, ErrorCode::VERSION_MISMATCH),
        (
            "missing HELLO",
            encode(&[job(1, None)]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "HELLO twice",
            encode(&[hello(), hello()]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "HASH for an unknown job",
            with_hello(vec![Frame::Hash {
                job: JobId(5),
                key: CacheKey::from_bytes([1; 32]),
            }]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "SOURCE for an unknown job",
            with_hello(vec![source(9, b"x", true)]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "duplicate job id",
            with_hello(vec![job(1, None), job(1, None)]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "SOURCE after the final chunk",
            with_hello(vec![
                job(1, None),
                source(1, b"int a;", true),
                source(1, b"int b;", true),
            ]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "HASH after SOURCE",
            with_hello(vec![
                job(1, None),
                source(1, b"int a;", false),
                Frame::Hash {
                    job: JobId(1),
                    key: CacheKey::from_bytes([1; 32]),
                },
            ]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "a server-only frame",
            with_hello(vec![Frame::GoAway { last_job: 0 }]),
            ErrorCode::UNEXPECTED_FRAME,
        ),
        (
            "flood of empty SOURCE frames",
            with_hello(flood_empty),
            ErrorCode::FLOOD,
        ),
        (
            "flood of ignorable frames",
            with_hello(flood_ignorable),
            ErrorCode::FLOOD,
        ),
        (
            "truncated frame, then silence",
            {
                let mut b = encode(&[hello(), job(1, None)]);
                b.truncate(b.len() - 3);
                b
            },
            ErrorCode::TIMEOUT,
        ),
    ];
    let count = cases.len() as u64;
    for (name, bytes, want) in cases {
        let got = attack(&h, bytes).await;
        assert_eq!(got, Some(want), "{name}");
    }
    // The attacker saw its ERROR before the server's handler of that connection ended
    // and counted it: read the counter only once every connection is let go.
    settle(&h).await;
    assert_eq!(
        h.service.counters().connection_errors.total(),
        count,
        "each attack failed its own connection, and only that"
    );
    settle(&h).await;
}

/// Waits until every connection has been let go.
async fn settle(h: &Harness) {
    settle_to(h, 0).await;
}

/// Waits until only `n` connections are left open.
async fn settle_to(h: &Harness, n: usize) {
    let t = Instant::now();
    while h.service.open_connections() != n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} connections still open",
            h.service.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects, sends `prefix` at once and then `slow` one byte every 100 ms, and returns
/// the ERROR code the server closed with and how long after the prefix that came.
async fn trickle(h: &Harness, prefix: Vec<u8>, slow: Vec<u8>) -> (Option<ErrorCode>, Duration) {
    let mut s = h.raw().await;
    s.write_all(&prefix).await.unwrap();
    let t = Instant::now();
    for b in &slow {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let frames = read_to_close(&mut s, Duration::from_secs(10)).await;
    (error_code(&frames), t.elapsed())
}

async fn silent_and_trickling_clients_are_timed_out(t: Transport) {
    let h = start(t).await;
    let honest = Honest::start(&h).await;
    let hello_bytes = encode(&[hello()]);
    // Silent: connects and sends nothing.
    // Silent: connects and sends nothing.
    let silent = trickle(&h, Vec::new(), Vec::new());
    // One byte every 100 ms of a HELLO: bytes keep coming, the handshake never completes.
    let trickle_hello = trickle(&h, Vec::new(), hello_bytes);
    // A job whose SOURCE frame arrives one byte every 100 ms: each byte is input, but no
    // frame completes within the stall timeout.
    let trickle_source = trickle(
        &h,
        encode(&[hello(), job(1, None)]),
        encode(&[source(1, b"int trickled_in_slowly_over_a_long_time;", true)]),
    );
    let (a, b, c) = tokio::join!(silent, trickle_hello, trickle_source);
    for (name, (code, took)) in [("silent", a), ("trickled HELLO", b), ("trickled SOURCE", c)] {
        assert_eq!(code, Some(ErrorCode::TIMEOUT), "{name}");
        assert!(
            took < TIMEOUT * 3,
            "{name}: timed out only after {took:?} (timeout {TIMEOUT:?})"
        );
    }
    honest.finish().await;
    settle(&h).await;
}

async fn lying_sizes_and_finished_jobs(t: Transport) {
    let h = start(t).await;
    let honest = Honest::start(&h).await;
    let mut s = h.raw().await;
    // Declared 10 bytes, sent 20; declared 100, finished after 6. Each job is failed on
    // its own with LENGTH_MISMATCH; the connection lives on and answers STATS.
    s.write_all(&encode(&[
        hello(),
        job(1, Some(10)),
        source(1, b"0123456789abcdefghij", true),
        job(2, Some(100)),
        source(2, b"int a;", true),
        Frame::StatsRequest,
    ]))
    .await
    .unwrap();
    let mut reader = FrameReader::default();
    let mut got = Vec::new();
    reader
        .until(&mut s, &mut got, |f| matches!(f, Frame::Stats(_)))
        .await;
    for id in [1, 2] {
        assert!(
            got.iter()
                .any(|f| matches!(f, Frame::Abort { job, code, .. }
                if *job == JobId(id) && *code == ErrorCode::LENGTH_MISMATCH)),
            "job {id}: {got:?}"
        );
    }
    assert_eq!(error_code(&got), None, "{got:?}");
    // A complete job gets its result; SOURCE for it afterwards is a connection error.
    s.write_all(&encode(&[job(3, None), source(3, b"int ok;", true)]))
        .await
        .unwrap();
    reader
        .until(
            &mut s,
            &mut got,
            |f| matches!(f, Frame::Result { job, .. } if *job == JobId(3)),
        )
        .await;
    s.write_all(&encode(&[source(3, b"more", true)]))
        .await
        .unwrap();
    let rest = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert_eq!(
        error_code(&rest),
        Some(ErrorCode::UNEXPECTED_FRAME),
        "{rest:?}"
    );
    honest.finish().await;
    settle(&h).await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Over TCP, then over TLS, one after the other: the descriptor count is the process's,
/// so the two must not churn at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_opened_and_dropped() {
    for t in [Transport::Tcp, Transport::Tls] {
        ten_thousand_connections_opened_and_dropped_over(t).await;
    }
}

async fn ten_thousand_connections_opened_and_dropped_over(t: Transport) {
    let h = start(t).await;
    let honest = Honest::start(&h).await;
    honest.progress(3).await;
    let fds_before = open_fds();
    let hello_bytes = encode(&[hello()]);
    let t = Instant::now();
    // 100 rounds of 100 concurrent connections: a third close at once, a third send half
    // a HELLO and close, a third complete the handshake and close. Plain TCP sockets on
    // either listener: on a TLS one they are the plain peers it must tell off and let go
    // (the ERROR that says "speaks TLS", then the close).
    for round in 0..100 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..100usize {
            let (port, hello_bytes) = (h.port, hello_bytes.clone());
            batch.spawn(async move {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return false;
                };
                match (round + i) % 3 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(&hello_bytes[..hello_bytes.len() / 2]).await;
                    }
                    _ => {
                        let _ = s.write_all(&hello_bytes).await;
                        let mut b = [0u8; 64];
                        let _ = s.read(&mut b).await;
                    }
                }
                true
            });
        }
        while let Some(ok) = batch.join_next().await {
            assert!(ok.unwrap(), "a connection attempt failed");
        }
    }
    let churn = t.elapsed();
    honest.finish().await;
    settle(&h).await;
    // Served, or turned away at once past the per-address cap (100 at a time from one
    // address is more than it allows): either way each one was handled and let go.
    let counters = h.service.counters();
    let accepted = counters.connections.load(Ordering::Relaxed);
    let refused = counters.connections_refused.load(Ordering::Relaxed);
    assert!(accepted + refused >= 10_000, "{accepted} + {refused}");
    // Every socket was let go: no descriptor leaked (a little slack for the runtime).
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_before + 4,
        "descriptors: {fds_before} before, {fds_after} after"
    );
    eprintln!("10,000 connections churned in {churn:?} ({t:?})");
}

async fn a_client_killed_mid_upload_leaves_nothing_behind(t: Transport) {
    let h = start(t).await;
    let honest = Honest::start(&h).await;
    let desc = gcc_c(Some(200_000));
    let full = Bytes::from(vec![b'x'; 200_000]);
    let key = CacheKey::compute(&desc, &full);
    for _ in 0..5 {
        let mut s = h.raw().await;
        s.write_all(&hashed_upload(&desc, key, full.slice(..100_000)))
            .await
            .unwrap();
        honest.progress(2).await;
        drop(s); // the process dies: the socket closes mid-upload
    }
    settle_to(&h, 1).await; // the honest client's connection is all that is left
    assert_eq!(
        h.service.counters().connection_errors.total(),
        5,
        "each cut-off upload failed its own connection"
    );
    // The whole source, sent honestly, compiles (nothing half-received was kept or stored).
    let stream = connect(&h.addr, &h.opts).await.unwrap();
    let c = spawn_client(stream, ClientConfig::default());
    let o = c
        .submit(desc.clone(), Some(key), full.clone())
        .await
        .unwrap();
    assert!(
        !o.origin.is_early(),
        "nothing was stored for the cut-off uploads"
    );
    assert_eq!(o.result, reference_compile(&desc, &full));
    honest.finish().await;
}

/// A client connected from `local` (any 127.x address is loopback), holding `token`.
async fn client_from(local: &str, port: u16, token: &[u8]) -> dcache_transport::ClientHandle {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    spawn_client(
        stream,
        ClientConfig {
            auth: Some(dcache_proto::AuthKey::from_token(token)),
            ..ClientConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flooding_does_not_lock_out_an_authenticated_client() {
    const TOKEN: &[u8] = b"a shared token of some length";
    // Handshakes may take 30 s here: without the handshake pool and the per-address cap,
    // 2,100 silent sockets would hold every connection place for that long.
    let h = start_with(
        Transport::Tcp,
        ServiceConfig {
            protocol: ServerConfig {
                handshake_timeout: Duration::from_secs(30),
                auth: Some(dcache_proto::AuthKey::from_token(TOKEN)),
                ..ServerConfig::default()
            },
            ..ServiceConfig::default()
        },
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..21 {
        let batch = (0..100).map(|_| TcpStream::connect(("127.0.0.1", h.port)));
        for s in futures::future::join_all(batch).await {
            silent.extend(s.ok());
        }
    }
    assert!(silent.len() > 2000, "{} connected", silent.len());
    // An authenticated client from another address compiles at once, the flood still
    // connected. (Well inside the 30 s the flood could otherwise hold the server.)
    let honest = client_from("127.0.0.2", h.port, TOKEN).await;
    let desc = gcc_c(None);
    let src = Bytes::from_static(b"int flood_survivor;\n");
    let t = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        honest.submit(
            desc.clone(),
            Some(CacheKey::compute(&desc, &src)),
            src.clone(),
        ),
    )
    .await
    .expect("the honest client was locked out")
    .unwrap();
    assert_eq!(out.result, reference_compile(&desc, &src));
    assert!(t.elapsed() < Duration::from_secs(15));
    // One address got at most its cap of connections; the rest were turned away at once.
    let cap = ServiceConfig::default().max_connections_per_address;
    assert!(h.service.open_connections() <= cap + 1);
    let refused = h
        .service
        .counters()
        .connections_refused
        .load(Ordering::Relaxed);
    assert!(refused as usize >= silent.len() - cap, "{refused} refused");
    drop(silent);
    drop(honest);
    settle(&h).await;
}

async fn a_stalled_upload_gives_its_compile_slot_back(t: Transport) {
    // One slot. A client takes it (HASH, miss, first chunk: its compile streams) and then
    // sends nothing more; another client's job must still be compiled.
    let h = start_with(
        t,
        ServiceConfig {
            compile_slots: 1,
            min_upload_rate: 1024,
            upload_check_interval: Duration::from_millis(500),
            ..ServiceConfig::default()
        },
    )
    .await;
    let desc = gcc_c(Some(1 << 20));
    let full = Bytes::from(vec![b'x'; 1 << 20]);
    let mut staller = h.raw().await;
    staller
        .write_all(&hashed_upload(
            &desc,
            CacheKey::compute(&desc, &full),
            full.slice(..100),
        ))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut reader = FrameReader::default();
    reader
        .until(&mut staller, &mut got, |f| matches!(f, Frame::Miss { .. }))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.service.compile_slots().busy == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the staller never took the slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The honest job, on its own connection, waits for the only slot.
    let honest = spawn_client(
        connect(&h.addr, &h.opts).await.unwrap(),
        ClientConfig::default(),
    );
    let d2 = gcc_c(None);
    let src = Bytes::from_static(b"int waits_for_the_slot;\n");
    // Without the rule the stall would hold the slot for the 60 s stall timeout.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        honest.submit(d2.clone(), Some(CacheKey::compute(&d2, &src)), src.clone()),
    )
    .await
    .expect("the stalled upload kept the slot")
    .unwrap();
    assert_eq!(out.result, reference_compile(&d2, &src));
    reader
        .until(&mut staller, &mut got, |f| matches!(f, Frame::Abort { .. }))
        .await;
    let abort = got.iter().find_map(|f| match f {
        Frame::Abort { code, message, .. } => Some((*code, message.clone())),
        _ => None,
    });
    let (code, message) = abort.unwrap();
    assert_eq!(code, ErrorCode::TIMEOUT);
    assert!(message.contains("compile slot"), "{message}");
    assert_eq!(
        h.service
            .counters()
            .slow_uploads_ended
            .load(Ordering::Relaxed),
        1
    );
}

async fn a_lying_hash_for_a_cached_key_is_never_counted_as_a_hit(t: Transport) {
    let h = start(t).await;
    // The honest job's result is cached under its key.
    let desc = gcc_c(None);
    let honest_src = Bytes::from_static(b"int the_honest_one;\n");
    let key = CacheKey::compute(&desc, &honest_src);
    let c = spawn_client(
        connect(&h.addr, &h.opts).await.unwrap(),
        ClientConfig::default(),
    );
    c.submit(desc.clone(), Some(key), honest_src).await.unwrap();
    drop(c);
    settle(&h).await;
    let counters = h.service.counters();
    let hits = counters.jobs.total(dcache_server::Outcome::Hit);
    let early = counters.jobs.total(dcache_server::Outcome::Early);
    // 40 liars: that key, another source, all in one write.
    for _ in 0..40 {
        let mut s = h.raw().await;
        s.write_all(&encode(&[
            hello(),
            Frame::Job {
                job: JobId(1),
                desc: desc.clone(),
            },
            Frame::Hash { job: JobId(1), key },
            source(1, b"int a_lie;\n", true),
        ]))
        .await
        .unwrap();
        let mut got = Vec::new();
        FrameReader::default()
            .until(&mut s, &mut got, |f| {
                matches!(f, Frame::Abort { .. } | Frame::Result { .. })
            })
            .await;
        assert!(
            got.iter().any(
                |f| matches!(f, Frame::Abort { code, .. } if *code == ErrorCode::HASH_MISMATCH)
            ),
            "{got:?}"
        );
    }
    settle(&h).await;
    assert_eq!(
        counters.jobs.total(dcache_server::Outcome::Hit),
        hits,
        "a liar counted as a hit"
    );
    assert_eq!(counters.jobs.total(dcache_server::Outcome::Early), early);
    assert_eq!(counters.hash_mismatches.load(Ordering::Relaxed), 40);
}

async fn a_client_half_closing_mid_upload_is_told_why(t: Transport) {
    let h = start(t).await;
    let mut s = h.raw().await;
    s.write_all(&encode(&[
        hello(),
        job(1, None),
        source(1, b"int x", false),
    ]))
    .await
    .unwrap();
    // Half-close: no more bytes from the client, but it still reads.
    s.shutdown().await.unwrap();
    let frames = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert_eq!(error_code(&frames), Some(ErrorCode::PROTOCOL), "{frames:?}");
}

async fn bytes_saved_by_an_early_answer_are_counted_while_the_connection_lives(t: Transport) {
    let h = start(t).await;
    let desc = gcc_c(Some(100_000));
    let full = Bytes::from(vec![b'y'; 100_000]);
    let key = CacheKey::compute(&desc, &full);
    let c = spawn_client(
        connect(&h.addr, &h.opts).await.unwrap(),
        ClientConfig::default(),
    );
    c.submit(desc.clone(), Some(key), full.clone())
        .await
        .unwrap();
    // The same job again, by hand: HASH and the first 1,000 bytes, then wait for the
    // early answer and stop, as a client does.
    let mut s = h.raw().await;
    s.write_all(&hashed_upload(&desc, key, full.slice(..1000)))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut reader = FrameReader::default();
    reader
        .until(&mut s, &mut got, |f| matches!(f, Frame::Result { .. }))
        .await;
    s.write_all(&encode(&[Frame::Abort {
        job: JobId(1),
        code: ErrorCode::CANCELLED,
        message: "result received".into(),
    }]))
    .await
    .unwrap();
    // Both connections still open: the saving shows in STATS already.
    let t = Instant::now();
    loop {
        let stats = c.stats().await.unwrap();
        let saved = stats
            .iter()
            .find(|st| st.name == "source_bytes_saved")
            .map_or(0, |st| st.value);
        if saved > 0 {
            assert_eq!(saved, 99_000);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never counted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(s);
}
