//! The distcc front end in process, over real TCP sockets, with the test-double compiler:
//! one entry shared with a dcache client, single-flight across distcc connections, limits
//! checked before anything is buffered, and slow or silent clients dropped. (The stock
//! client against the real binary and real compilers is in examples/tests/distcc.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::testing::reference_compile;
use dcache_proto::{CacheKey, ClientConfig, JobDesc, ServerConfig};
use dcache_server::distcc::DistccConfig;
use dcache_server::distcc::wire::{Protocol, encode_request};
use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TransportOptions, bind, connect, spawn_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_millis(800);
/// A bound no healthy run comes near, even with both cores busy.
const WIDE: Duration = Duration::from_secs(30);

struct Harness {
    service: Arc<Service>,
    dcache: Address,
    distcc: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start(config: ServiceConfig, compile_time: Duration) -> Harness {
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(FakeExecutor::new(compile_time)),
        config,
    );
    let opts = TransportOptions::default();
    let any: Address = "tcp://127.0.0.1:0".parse().unwrap();
    let dcache_listener = bind(&any, &opts).await.unwrap();
    let distcc_listener = bind(&any, &opts).await.unwrap();
    let dcache = dcache_listener.local_addr();
    let distcc = distcc_listener
        .local_addr()
        .to_string()
        .trim_start_matches("tcp://")
        .to_owned();
    // Compiler names resolve on this machine's real path (gcc is installed wherever the
    // tests run); the fake executor then "compiles" for that name.
    let names = Arc::new(DistccConfig::new(
        &["gcc".to_owned(), "g++".to_owned()],
        "/usr/local/bin:/usr/bin:/bin",
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    for (listener, distcc) in [(dcache_listener, None), (distcc_listener, Some(names))] {
        let s = service.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            match distcc {
                Some(d) => s.serve_distcc(listener, d, shutdown).await,
                None => s.serve(listener, shutdown).await,
            }
        });
    }
    Harness {
        service,
        dcache,
        distcc,
        _stop: stop,
    }
}

fn short_timeouts() -> ServiceConfig {
    ServiceConfig {
        protocol: ServerConfig {
            handshake_timeout: TIMEOUT,
            stall_timeout: TIMEOUT,
            ..ServerConfig::default()
        },
        ..ServiceConfig::default()
    }
}

/// Sends `bytes` on a new connection and reads until the server closes it.
async fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(bytes).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(WIDE, c.read_to_end(&mut reply))
        .await
        .expect("the server neither replied nor closed");
    reply
}

fn stat(h: &Harness, name: &str) -> u64 {
    h.service
        .stats()
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.value)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// The object in a successful plain-protocol reply, after checking every item's token.
fn object_of(reply: &[u8]) -> &[u8] {
    let text = || String::from_utf8_lossy(reply).into_owned();
    let mut at = 0;
    let mut item = |token: &[u8], body: bool| {
        assert_eq!(reply.get(at..at + 4), Some(token), "{}", text());
        let hex = std::str::from_utf8(&reply[at + 4..at + 12]).unwrap();
        let value = usize::from_str_radix(hex, 16).unwrap();
        at += 12;
        let start = at;
        if body {
            at += value;
        }
        (value, &reply[start..at])
    };
    assert_eq!(item(b"DONE", false).0, 1);
    assert_eq!(item(b"STAT", false).0, 0, "a failed compile");
    item(b"SERR", true);
    item(b"SOUT", true);
    let (_, object) = item(b"DOTO", true);
    assert_eq!(at, reply.len(), "bytes after the reply");
    object
}

#[tokio::test]
async fn a_distcc_request_and_a_dcache_job_share_one_entry() {
    let h = start(ServiceConfig::default(), Duration::from_millis(1)).await;
    let source = Bytes::from_static(b"# 0 \"x.c\"\nint x = 42;\n");
    // What a dcache client sends for `gcc -O2 -c x.c -o x.o`.
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into()],
        source_len: None,
        identity: None,
    };
    let expected = reference_compile(&desc, &source);
    let client = spawn_client(
        connect(&h.dcache, &TransportOptions::default())
            .await
            .unwrap(),
        ClientConfig::default(),
    );
    let key = CacheKey::compute(&desc, &source);
    let outcome = client
        .submit(desc, Some(key), source.clone())
        .await
        .unwrap();
    assert_eq!(outcome.result, expected);
    h.service.flush().await;

    // The stock client's spelling of the same compile, in both protocols.
    for protocol in [Protocol::Plain, Protocol::Lzo] {
        let argv = ["x86_64-linux-gnu-gcc", "-O2", "-c", "x.c", "-o", "x.o"];
        let argv = if std::path::Path::new("/usr/bin/x86_64-linux-gnu-gcc").exists() {
            &argv[..]
        } else {
            &["gcc", "-O2", "-c", "x.c", "-o", "x.o"][..]
        };
        let reply = exchange(&h.distcc, &encode_request(protocol, argv, &source)).await;
        if protocol == Protocol::Plain {
            assert_eq!(object_of(&reply), &expected.outputs[0].data[..]);
        } else {
            assert!(reply.starts_with(b"DONE00000002STAT00000000"));
        }
    }
    assert_eq!(stat(&h, "compiles"), 1);
    assert_eq!(stat(&h, "distcc_hits"), 2);
    assert_eq!(stat(&h, "distcc_compiles"), 0);
}

#[tokio::test]
async fn identical_distcc_requests_in_flight_compile_once() {
    let h = start(ServiceConfig::default(), Duration::from_millis(300)).await;
    let source = b"int shared(void) { return 1; }\n".repeat(100);
    let request = encode_request(Protocol::Plain, &["gcc", "-c", "s.c"], &source);
    let replies = futures::future::join_all((0..4).map(|_| exchange(&h.distcc, &request))).await;
    for r in &replies {
        assert_eq!(r, &replies[0]);
        object_of(r);
    }
    assert_eq!(stat(&h, "compiles"), 1);
    assert_eq!(stat(&h, "distcc_jobs"), 4);
    assert_eq!(stat(&h, "distcc_compiles") + stat(&h, "distcc_hits"), 4);
    // Each request's in-process connection to the service ends with it.
    let started = Instant::now();
    while h.service.open_connections() > 0 {
        assert!(started.elapsed() < WIDE, "in-process connections leaked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lengths_are_refused_before_the_body_is_buffered() {
    let mut config = short_timeouts();
    config.protocol.limits.max_source_len = 4096;
    config.memory_budget = 2048;
    let h = start(config, Duration::from_millis(1)).await;
    let head = b"DIST00000001ARGC00000003ARGV00000003gccARGV00000002-cARGV00000003a.c";
    // Over the source limit: refused on the DOTI header alone (no body is ever sent).
    let started = Instant::now();
    let mut over = head.to_vec();
    over.extend_from_slice(b"DOTI00002000");
    assert_eq!(exchange(&h.distcc, &over).await, b"");
    assert!(started.elapsed() < WIDE);
    // Within the limit but over the memory for uploads: refused, the client compiles
    // locally.
    let mut big = head.to_vec();
    big.extend_from_slice(b"DOTI00000c00");
    assert_eq!(exchange(&h.distcc, &big).await, b"");
    // An LZO body that inflates past the source limit.
    let bomb = encode_request(Protocol::Lzo, &["gcc", "-c", "a.c"], &[0u8; 8192]);
    assert!(bomb.len() < 1024);
    assert_eq!(exchange(&h.distcc, &bomb).await, b"");
    // Too many arguments, and one too long.
    assert_eq!(exchange(&h.distcc, b"DIST00000001ARGC00100000").await, b"");
    assert_eq!(
        exchange(&h.distcc, b"DIST00000001ARGC00000001ARGV00100000").await,
        b""
    );
    assert_eq!(stat(&h, "distcc_refused"), 1);
    assert_eq!(stat(&h, "distcc_errors"), 4);
    assert_eq!(stat(&h, "waiting_source_bytes_in_memory"), 0);
    // The server still serves.
    let ok = encode_request(Protocol::Plain, &["gcc", "-c", "a.c"], b"int a;\n");
    object_of(&exchange(&h.distcc, &ok).await);
}

#[tokio::test]
async fn silent_and_stalled_clients_are_dropped_after_their_timeouts() {
    let h = start(short_timeouts(), Duration::from_millis(1)).await;
    // Silent: nothing after connecting.
    let started = Instant::now();
    assert_eq!(exchange(&h.distcc, b"").await, b"");
    // Stalled: half a source, then nothing (the connection stays open on our side).
    let mut c = TcpStream::connect(&h.distcc).await.unwrap();
    c.write_all(
        b"DIST00000001ARGC00000003ARGV00000003gccARGV00000002-cARGV00000003a.cDOTI00000100int",
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WIDE, c.read_to_end(&mut rest))
        .await
        .expect("a stalled upload was kept")
        .ok();
    assert!(rest.is_empty());
    assert!(started.elapsed() >= TIMEOUT);
    assert_eq!(stat(&h, "distcc_errors"), 2);
    assert_eq!(stat(&h, "compiles"), 0);
}
