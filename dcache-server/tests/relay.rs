//! The relay end to end over real TCP sockets: a relay service in front of real upstream
//! services (the fake compiler, and real gcc for the identity checks), clients on the
//! real driver.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dcache_proto::testing::reference_compile;
use dcache_proto::{
    AuthKey, CacheKey, ClientConfig, CompilerIdentity, ErrorCode, Frame, FrameDecoder, JobDesc,
    Limits, ResultOrigin, Stat, Strategy,
};
use dcache_server::exec::{Executor, FakeExecutor, LocalExecutor, LocalExecutorConfig};
use dcache_server::relay::{RelayConfig, Upstreams};
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, ClientHandle, JobError, TransportOptions, bind, connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server serving on a TCP port of its own until dropped.
struct Running {
    service: Arc<Service>,
    addr: Address,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn start(service: Arc<Service>, addr: &str) -> Self {
        let listener = bind(&addr.parse().unwrap(), &TransportOptions::default())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = service.clone();
        let task = tokio::spawn(async move {
            s.serve(listener, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            service,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops gracefully and waits until the port is closed.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    fn stat(&self, name: &str) -> u64 {
        stat(&self.service.stats(), name)
    }

    fn port(&self) -> u16 {
        match &self.addr {
            Address::Tcp { port, .. } => *port,
            other => panic!("not TCP: {other}"),
        }
    }
}

fn stat(stats: &[Stat], name: &str) -> u64 {
    stats.iter().find(|s| s.name == name).map_or(0, |s| s.value)
}

fn fake_upstream(compile: Duration, auth: Option<AuthKey>) -> Arc<Service> {
    let mut config = ServiceConfig::default();
    config.protocol.auth = auth;
    config.compile_slots = 1;
    Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(FakeExecutor::new(compile)),
        config,
    )
}

fn relay_config(upstreams: &[&Running]) -> RelayConfig {
    let mut c = RelayConfig::new(upstreams.iter().map(|u| u.addr.clone()).collect());
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn relay(config: RelayConfig) -> Running {
    let service = Service::relay(
        Arc::new(MemoryStore::new(1 << 30)),
        Upstreams::new(config),
        ServiceConfig::default(),
    );
    Running::start(service, "tcp://127.0.0.1:0").await
}

async fn client(addr: &Address, strategy: Strategy) -> ClientHandle {
    let stream = connect(addr, &TransportOptions::default()).await.unwrap();
    dcache_transport::spawn_client(
        stream,
        ClientConfig {
            strategy,
            ..ClientConfig::default()
        },
    )
}

fn fake_identity() -> CompilerIdentity {
    CompilerIdentity::new("fakecc 1.0", "x86_64-test", [7; 32])
}

fn desc(args: &[&str], identity: Option<CompilerIdentity>) -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        source_len: None,
        identity,
    }
}

fn src(n: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<_>>(),
    )
}

async fn submit(
    c: &ClientHandle,
    d: &JobDesc,
    source: &Bytes,
) -> Result<dcache_proto::JobOutcome, JobError> {
    let key = CacheKey::compute(d, source);
    c.submit(d.clone(), Some(key), source.clone()).await
}

fn failed_with(r: &Result<dcache_proto::JobOutcome, JobError>, want: ErrorCode) -> bool {
    matches!(r, Err(JobError::Failed { code, .. }) if *code == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_compiles_upstream_and_the_next_time_is_a_local_hit() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let d = desc(&["-O2", "-c"], Some(fake_identity()));
    let s = src(50_000, 1);

    let first = submit(&c, &d, &s).await.unwrap();
    assert_eq!(first.origin, ResultOrigin::Compiled);
    assert_eq!(first.result, reference_compile(&d, &s));
    r.service.flush().await;

    let second = submit(&c, &d, &s).await.unwrap();
    assert_eq!(second.origin, ResultOrigin::Early);
    assert_eq!(second.result, first.result);
    assert_eq!(up.stat("compiles"), 1);
    assert_eq!(
        up.stat("hits"),
        0,
        "the second answer came from the relay's own tier"
    );
    assert_eq!(r.stat("hits"), 1);
    assert_eq!(r.stat("upstream_jobs"), 1);

    // A second relay in front of the same upstream: a hit there, passed through early.
    let r2 = relay(relay_config(&[&up])).await;
    let c2 = client(&r2.addr, Strategy::AskFirst).await;
    let third = submit(&c2, &d, &s).await.unwrap();
    assert_eq!(third.origin, ResultOrigin::Early);
    assert_eq!(third.result, first.result);
    assert_eq!(third.source_bytes_sent, 0, "ask-first: no source for a hit");
    assert_eq!(up.stat("hits"), 1);
    assert_eq!(r2.stat("upstream_hits"), 1);

    // A miss through an ask-first client: the upstream's MISS comes down, then the source.
    let s2 = src(20_000, 2);
    let o = submit(&c2, &d, &s2).await.unwrap();
    assert_eq!(o.origin, ResultOrigin::Compiled);
    assert_eq!(o.result, reference_compile(&d, &s2));
    assert_eq!(o.source_bytes_sent, s2.len() as u64);

    // A client without HASH: the relay hashes the source itself and asks for that key.
    let c3 = client(&r2.addr, Strategy::SendAll).await;
    let o = submit(&c3, &d, &s).await.unwrap();
    assert_eq!(o.origin, ResultOrigin::Cache);
    assert_eq!(o.result, first.result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_early_result_stops_the_upload_through_the_relay() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let d = desc(&["-c"], Some(fake_identity()));
    let big = src(48 << 20, 3);
    // The upstream has the result (a client fed it directly).
    let direct = client(&up.addr, Strategy::Speculative).await;
    submit(&direct, &d, &big).await.unwrap();
    up.service.flush().await;
    let received_before = up.stat("source_bytes_received");
    assert_eq!(received_before, big.len() as u64);

    // How far an upload gets before the reply is scheduling on a loaded machine: some of
    // a few tries must stop well short of the source.
    let mut upstream_got = Vec::new();
    for _ in 0..3 {
        let r = relay(relay_config(&[&up])).await;
        let c = client(&r.addr, Strategy::Speculative).await;
        let before = up.stat("source_bytes_received");
        let o = submit(&c, &d, &big).await.unwrap();
        assert_eq!(o.origin, ResultOrigin::Early);
        assert_eq!(o.result, reference_compile(&d, &big));
        // Let in-flight bytes land before reading the counter.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = up.stat("source_bytes_received") - before;
        upstream_got.push(got);
        eprintln!("upstream received {got} of {} bytes", big.len());
        if got < big.len() as u64 / 4 {
            break;
        }
    }
    assert!(
        upstream_got.iter().any(|&g| g < big.len() as u64 / 4),
        "the upstream received {upstream_got:?} of {} bytes",
        big.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_abort_reaches_the_upstream() {
    // One compile slot upstream, and compiles that take a minute: a second job gets the
    // slot only if the first one's ABORT went up.
    let up = Running::start(
        fake_upstream(Duration::from_secs(60), None),
        "tcp://127.0.0.1:0",
    )
    .await;
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let d = desc(&["-c"], Some(fake_identity()));
    let slow = src(1000, 4);
    let cancelled = tokio::time::timeout(Duration::from_millis(1500), submit(&c, &d, &slow)).await;
    assert!(cancelled.is_err(), "the first job is still compiling");
    // A source starting with #error fails at once, once it holds the slot.
    let failing = Bytes::from_static(b"#error stop\nint x;\n");
    let o = tokio::time::timeout(Duration::from_secs(30), submit(&c, &d, &failing))
        .await
        .expect("the aborted compile still holds the upstream's only slot")
        .unwrap();
    assert_ne!(o.result.exit_code, 0);
    assert_eq!(up.stat("compiles"), 1, "the aborted compile never finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_abort_reaches_the_client() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    // The upstream refuses the option (the relay itself compiles nothing and passes it on).
    let d = desc(&["-c", "-fplugin=/tmp/evil.so"], Some(fake_identity()));
    let res = submit(&c, &d, &src(4 << 20, 5)).await;
    assert!(failed_with(&res, ErrorCode::REFUSED), "{res:?}");
    assert_eq!(up.stat("jobs_refused"), 1);
    // The connection lives on.
    let d = desc(&["-c"], Some(fake_identity()));
    assert!(submit(&c, &d, &src(100, 5)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_falls_through_then_the_client_is_told_to_compile_locally() {
    let a = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let b = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let mut config = relay_config(&[&a, &b]);
    config.backoff = Duration::from_secs(600);
    let r = relay(config).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let d = desc(&["-c"], Some(fake_identity()));
    let b_addr = b.addr.clone();
    b.stop().await;
    // Enough jobs that rendezvous hashing sends some to the dead upstream first.
    let hosts = [a.addr.to_string(), b_addr.to_string()];
    let mut to_dead = 0;
    for n in 0..16u8 {
        let s = src(3000, 100 + n);
        let key = CacheKey::compute(&d, &s);
        if dcache_proto::rendezvous::rank(&key, &hosts)[0] == 1 {
            to_dead += 1;
        }
        let o = submit(&c, &d, &s).await.unwrap();
        assert_eq!(o.result, reference_compile(&d, &s));
    }
    assert!(to_dead > 0, "no job ranked the dead upstream first");
    assert_eq!(
        a.stat("compiles"),
        16,
        "every job compiled on the live upstream"
    );
    assert!(r.stat("upstream_fallthroughs") >= 1);

    // Both down: the client gets OVERLOADED, on which a dcache client compiles locally.
    a.stop().await;
    let s = src(3000, 200);
    let res = submit(&c, &d, &s).await;
    assert!(failed_with(&res, ErrorCode::OVERLOADED), "{res:?}");
    let Err(JobError::Failed { message, .. }) = res else {
        unreachable!()
    };
    assert!(message.contains("no upstream reachable"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_upstream_is_reconnected() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let port = up.port();
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let d = desc(&["-c"], Some(fake_identity()));
    submit(&c, &d, &src(1000, 6)).await.unwrap();
    up.stop().await;
    let up = Running::start(
        fake_upstream(Duration::ZERO, None),
        &format!("tcp://127.0.0.1:{port}"),
    )
    .await;
    let s = src(1000, 7);
    let o = submit(&c, &d, &s).await.unwrap();
    assert_eq!(o.result, reference_compile(&d, &s));
    assert_eq!(up.stat("compiles"), 1, "the new upstream compiled it");
    assert_eq!(up.stat("connections"), 1, "over one new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_upstream_needs_the_token() {
    let key = AuthKey::from_token(b"the relay test's shared token");
    let up = Running::start(
        fake_upstream(Duration::ZERO, Some(key.clone())),
        "tcp://127.0.0.1:0",
    )
    .await;
    let d = desc(&["-c"], Some(fake_identity()));

    let mut with = relay_config(&[&up]);
    with.auth = Some(key);
    let r = relay(with).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let s = src(1000, 8);
    assert_eq!(
        submit(&c, &d, &s).await.unwrap().result,
        reference_compile(&d, &s)
    );
    // Many jobs, one authenticated upstream connection.
    for n in 0..5 {
        submit(&c, &d, &src(500, 20 + n)).await.unwrap();
    }
    assert_eq!(up.stat("connections"), 1);

    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let res = submit(&c, &d, &src(1000, 9)).await;
    assert!(failed_with(&res, ErrorCode::OVERLOADED), "{res:?}");
}

fn gcc_identity() -> Option<(LocalExecutor, CompilerIdentity)> {
    let exec = LocalExecutor::new(LocalExecutorConfig {
        allowed: vec!["gcc".into()],
        ..LocalExecutorConfig::default()
    });
    let identity = exec.identity_of("gcc")?;
    Some((exec, identity))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gcc_through_the_relay_and_identity_mismatch_still_refused() {
    let Some((exec, identity)) = gcc_identity() else {
        panic!("gcc is required for this test");
    };
    let up = Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(exec),
        ServiceConfig::default(),
    );
    let up = Running::start(up, "tcp://127.0.0.1:0").await;
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let s = Bytes::from_static(b"int add(int a, int b) { return a + b; }\n");
    let d = desc(&["-O2", "-c"], Some(identity.clone()));
    let o = submit(&c, &d, &s).await.unwrap();
    assert_eq!(o.result.exit_code, 0, "{:?}", o.result.stderr);
    let obj = &o.result.outputs[0].data;
    assert_eq!(&obj[..4], b"\x7fELF");
    r.service.flush().await;
    let again = submit(&c, &d, &s).await.unwrap();
    assert!(again.origin.is_early());
    assert_eq!(&again.result.outputs[0].data, obj);

    // Another compiler (same name and version line, other bytes): not served from the
    // relay's tier, and refused upstream, passed down as COMPILER_MISMATCH.
    let other = CompilerIdentity::new(&identity.version, &identity.target, [0x55; 32]);
    let d2 = desc(&["-O2", "-c"], Some(other));
    let res = submit(&c, &d2, &s).await;
    assert!(failed_with(&res, ErrorCode::COMPILER_MISMATCH), "{res:?}");
    assert_eq!(r.stat("hits"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_never_serves_one_compilers_object_for_another() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let r = relay(relay_config(&[&up])).await;
    let c = client(&r.addr, Strategy::Speculative).await;
    let s = src(2000, 10);
    let d1 = desc(&["-c"], Some(fake_identity()));
    let d2 = desc(
        &["-c"],
        Some(CompilerIdentity::new("fakecc 2.0", "x86_64-test", [8; 32])),
    );
    submit(&c, &d1, &s).await.unwrap();
    r.service.flush().await;
    let o = submit(&c, &d2, &s).await.unwrap();
    assert_eq!(r.stat("hits"), 0, "another identity is another key");
    assert_eq!(o.origin, ResultOrigin::Compiled);
    assert_eq!(up.stat("compiles"), 2);
}

/// Reads what the relay sends on a raw connection until it closes (10 s at most).
async fn frames_to_close(stream: &mut dcache_transport::BoxedStream) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = stream.read_buf(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the relay did not close the connection");
    let mut dec = FrameDecoder::new(Limits::MAX_FRAME_PAYLOAD);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        frames.push(f);
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_a_relay_gets_what_any_server_gives() {
    let up = Running::start(fake_upstream(Duration::ZERO, None), "tcp://127.0.0.1:0").await;
    let r = relay(relay_config(&[&up])).await;
    let opts = TransportOptions::default();

    // Garbage instead of HELLO: an ERROR frame, then the connection closes.
    let mut s = connect(&r.addr, &opts).await.unwrap();
    let _ = s.write_all(&[0xFF; 64]).await;
    let frames = frames_to_close(&mut s).await;
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Error { .. })),
        "{frames:?}"
    );

    // A header claiming a payload past every limit: refused before it is buffered.
    let mut s = connect(&r.addr, &opts).await.unwrap();
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(
        &Frame::Hello(dcache_proto::Hello {
            min_version: 1,
            max_version: 2,
            limits: Limits::default(),
            features: 0,
            extensions: Bytes::new(),
        })
        .to_bytes(1 << 20)
        .unwrap(),
    );
    bytes.extend_from_slice(&[0x03, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]);
    let _ = s.write_all(&bytes).await;
    let frames = frames_to_close(&mut s).await;
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Error { .. })),
        "{frames:?}"
    );

    let c = client(&r.addr, Strategy::Speculative).await;
    // A job that does not name its compiler: refused, as by any dcache server.
    let res = submit(&c, &desc(&["-c"], None), &src(100, 11)).await;
    assert!(failed_with(&res, ErrorCode::REFUSED), "{res:?}");
    // A lying HASH: the relay's own check fails it, and nothing is stored under it.
    let d = desc(&["-c"], Some(fake_identity()));
    let honest = src(3000, 12);
    let key = CacheKey::compute(&d, &honest);
    let res = c.submit(d.clone(), Some(key), src(3000, 13)).await;
    assert!(failed_with(&res, ErrorCode::HASH_MISMATCH), "{res:?}");
    r.service.flush().await;
    let o = submit(&c, &d, &honest).await.unwrap();
    assert_eq!(o.result, reference_compile(&d, &honest));
    assert_eq!(r.stat("hits"), 0);
    assert!(r.stat("hash_mismatches") + up.stat("hash_mismatches") >= 1);

    // Nothing leaked: every client connection's slot comes back.
    drop(c);
    for _ in 0..100 {
        if r.service.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(r.service.open_connections(), 0);
}
