//! The protocol's end-to-end scenarios through the driver over every transport. (The raw
//! byte-moving tests are in `streams.rs` and `sim.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::reference_compile;
use dcache_proto::{
    CacheKey, ClientConfig, ErrorCode, JobDesc, JobResult, ResultOrigin, ServerConfig, ServerEvent,
};
use dcache_transport::sim::{LinkConfig, symmetric};
use dcache_transport::{
    Address, BoxedStream, JobError, Listener, ServerCommand, ServerConnHandle, TransportOptions,
    bind, connect, spawn_client, spawn_server_connection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "pki/mod.rs"]
mod pki;

/// A guard against hangs only; no test asserts speed.
const HANG: Duration = Duration::from_secs(30);

enum Kind {
    Tcp,
    Tls,
    Unix,
    Mem,
}

/// Options whose TLS settings fit each other: a server certificate for 127.0.0.1 from a
/// fresh CA, and a client trusting that CA.
fn tls_options() -> TransportOptions {
    let ca = pki::Pki::new("transports test CA");
    TransportOptions::default()
        .with_tls_server(ca.server())
        .with_tls_client(ca.client())
}

async fn listen(
    kind: Kind,
    tag: &str,
    opts: &TransportOptions,
) -> (Box<dyn Listener>, Address, Option<tempfile::TempDir>) {
    let (addr, dir) = match kind {
        Kind::Tcp => ("tcp://127.0.0.1:0".parse().unwrap(), None),
        Kind::Tls => ("tls://127.0.0.1:0".parse().unwrap(), None),
        Kind::Unix => {
            let dir = tempfile::tempdir().unwrap();
            let a = Address::Unix(dir.path().join("s.sock"));
            (a, Some(dir))
        }
        Kind::Mem => (format!("mem://test-{tag}").parse().unwrap(), None),
    };
    let l = bind(&addr, opts).await.unwrap();
    let real = l.local_addr();
    (l, real, dir)
}

async fn pair(kind: Kind, tag: &str) -> (BoxedStream, BoxedStream, Option<tempfile::TempDir>) {
    let opts = match kind {
        Kind::Tls => tls_options(),
        _ => TransportOptions::default(),
    };
    let (l, addr, dir) = listen(kind, tag, &opts).await;
    // A TLS server stream handshakes when first used: flushing it makes it do so while
    // the client's connect waits for the handshake.
    let accept = async {
        let (mut s, _) = l.accept().await?;
        s.flush().await?;
        Ok::<_, std::io::Error>(s)
    };
    let (c, s) = tokio::join!(connect(&addr, &opts), accept);
    (c.unwrap(), s.unwrap(), dir)
}

/// The reference server application, asynchronously: a cache and `reference_compile`.
async fn reference_app(mut h: ServerConnHandle) -> Option<dcache_proto::ConnectionError> {
    let mut cache: HashMap<CacheKey, JobResult> = HashMap::new();
    let mut jobs: HashMap<_, (JobDesc, Vec<u8>)> = HashMap::new();
    while let Some(ev) = h.events.recv().await {
        match ev {
            ServerEvent::JobStarted { job, desc } => {
                jobs.insert(job, (desc, Vec::new()));
            }
            ServerEvent::Lookup { job, key } => {
                let cmd = match cache.get(&key) {
                    Some(r) => ServerCommand::Result {
                        job,
                        result: r.clone(),
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
                    let r = reference_compile(&d, &s);
                    cache.insert(key, r.clone());
                    let _ = h.commands.send(ServerCommand::Result {
                        job,
                        result: r,
                        origin: ResultOrigin::Compiled,
                    });
                }
            }
            ServerEvent::StatsRequested => {
                let stats = vec![dcache_proto::Stat {
                    name: "entries".into(),
                    value: cache.len() as u64,
                }];
                let _ = h.commands.send(ServerCommand::Stats(stats));
            }
            ServerEvent::Closed { error } => return error,
            _ => {}
        }
    }
    None
}

fn desc(n: usize, len: Option<usize>) -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-c".into(), format!("-DN={n}")],
        source_len: len.map(|l| l as u64),
        identity: None,
    }
}

/// Miss, then a hit answered early while the large upload is still going, then cancel,
/// then many concurrent jobs: over one client and server connected by `c` and `s`.
async fn scenarios(c: BoxedStream, s: BoxedStream) {
    scenarios_with(c, s, ClientConfig::default()).await;
}

/// [`scenarios`] with a client configuration of the test's choosing.
async fn scenarios_with(c: BoxedStream, s: BoxedStream, config: ClientConfig) {
    let config_compresses = config.compression.is_some();
    let server = tokio::spawn(reference_app(spawn_server_connection(
        s,
        ServerConfig::default(),
    )));
    let client = spawn_client(c, config);
    let src = Bytes::from((0..(8 << 20)).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let d = desc(0, Some(src.len()));
    let key = CacheKey::compute(&d, &src);

    let miss = client
        .submit(d.clone(), Some(key), src.clone())
        .await
        .unwrap();
    assert!(!miss.origin.is_early());
    assert_eq!(miss.result, reference_compile(&d, &src));

    let hit = client
        .submit(d.clone(), Some(key), src.clone())
        .await
        .unwrap();
    assert!(
        hit.origin.is_early(),
        "an identical job must be answered by EARLY_RESULT"
    );
    assert_eq!(hit.result, miss.result);
    // Compressed, this source (a 253-byte period) shrinks a thousandfold, so the whole of
    // it may be on its way before the answer: the early stop is checked uncompressed.
    assert!(
        config_compresses || hit.source_bytes_sent < (src.len() / 2) as u64,
        "client stopped early: sent {} of {}",
        hit.source_bytes_sent,
        src.len()
    );

    // Cancel: drop the future of a job mid-upload; the connection lives on.
    let d2 = desc(1, None);
    let slow = client.submit(d2.clone(), None, src.clone());
    let _ = tokio::time::timeout(Duration::from_millis(1), slow).await;

    let mut set = tokio::task::JoinSet::new();
    for n in 2..66 {
        let c = client.clone();
        set.spawn(async move {
            let d = desc(n, None);
            let s = Bytes::from(vec![n as u8; 1000 + n * 997]);
            let k = CacheKey::compute(&d, &s);
            let o = c.submit(d.clone(), Some(k), s.clone()).await.unwrap();
            assert_eq!(o.result, reference_compile(&d, &s));
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats[0].name, "entries");
    // The cancelled job's 8 MiB compress so well that its whole upload may be out before
    // the 1 ms cancel: then it compiles, and is a 66th entry.
    let cancelled_finished = u64::from(config_compresses && stats[0].value == 66);
    assert_eq!(
        stats[0].value - cancelled_finished,
        65,
        "one entry per distinct successful job"
    );
    drop(client);
    let end = tokio::time::timeout(HANG, server)
        .await
        .expect("server ended")
        .unwrap();
    assert_eq!(end, None, "clean close after the client left");
}

#[tokio::test]
async fn protocol_scenarios_over_tcp() {
    let (c, s, _d) = pair(Kind::Tcp, "").await;
    tokio::time::timeout(HANG, scenarios(c, s)).await.unwrap();
}

/// The early stop survives TLS: the scenarios' hit, answered while an 8 MiB upload is
/// under way, must leave most of the source unsent here too.
#[tokio::test]
async fn protocol_scenarios_over_tls() {
    let (c, s, _d) = pair(Kind::Tls, "").await;
    tokio::time::timeout(HANG, scenarios(c, s)).await.unwrap();
}

/// The same scenarios with zstd on the wire (the client offers it, the server answers),
/// over real sockets, plain and inside TLS.
#[tokio::test]
async fn protocol_scenarios_compressed_over_tcp_and_tls() {
    for kind in [Kind::Tcp, Kind::Tls] {
        let (c, s, _d) = pair(kind, "").await;
        let config = ClientConfig {
            compression: Some(dcache_proto::DEFAULT_LEVEL),
            ..ClientConfig::default()
        };
        tokio::time::timeout(HANG, scenarios_with(c, s, config))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn protocol_scenarios_over_unix() {
    let (c, s, _d) = pair(Kind::Unix, "").await;
    tokio::time::timeout(HANG, scenarios(c, s)).await.unwrap();
}

#[tokio::test]
async fn protocol_scenarios_over_mem() {
    let (c, s, _d) = pair(Kind::Mem, "scenarios").await;
    tokio::time::timeout(HANG, scenarios(c, s)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn protocol_scenarios_over_a_simulated_40ms_link() {
    let (c, s) =
        symmetric(LinkConfig::new(Duration::from_millis(20), 12_500_000).with_buffer(256 * 1024));
    tokio::time::timeout(HANG * 100, scenarios(Box::new(c), Box::new(s)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dropped_server_fails_jobs_instead_of_hanging() {
    let (c, s, _d) = pair(Kind::Tcp, "").await;
    let client = spawn_client(c, ClientConfig::default());
    let d = desc(0, None);
    let src = Bytes::from(vec![1u8; 4 << 20]);
    let job = client.submit(d, None, src);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
    });
    let r = tokio::time::timeout(HANG, job).await.expect("no hang");
    assert!(matches!(r, Err(JobError::Connection(_))), "{r:?}");
}

#[tokio::test]
async fn garbage_from_a_peer_ends_only_that_connection_with_an_error() {
    let (mut c, s, _d) = pair(Kind::Mem, "garbage").await;
    let server = tokio::spawn(reference_app(spawn_server_connection(
        s,
        ServerConfig::default(),
    )));
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(HANG, c.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    // The reply is one ERROR frame: type 0x0A, job 0.
    assert_eq!(reply.first(), Some(&0x0A));
    let err = tokio::time::timeout(HANG, server).await.unwrap().unwrap();
    assert!(
        matches!(err, Some(e) if e.code() == ErrorCode::UNKNOWN_FRAME || e.code() == ErrorCode::PROTOCOL)
    );
}
