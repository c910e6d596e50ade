//! `tls://` over real sockets, with certificates made at run time: mutual TLS accepted
//! and refused, and each usual mistake (wrong CA, expired or mismatched certificate,
//! plain client on a TLS port and the reverse, unusable key files) reported as what it
//! is. The protocol scenarios over TLS are in `transports.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::reference_compile;
use dcache_proto::{
    CacheKey, ClientConfig, JobDesc, JobResult, ResultOrigin, ServerConfig, ServerEvent,
};
use dcache_transport::{
    Address, JobError, Listener, ServerCommand, TlsClient, TlsConfigError, TlsFailure, TlsServer,
    TransportError, TransportOptions, bind, connect, spawn_client, spawn_server_connection,
};
use tokio::io::AsyncReadExt;

#[path = "pki/mod.rs"]
mod pki;
use pki::{Pki, Validity};

/// A guard against hangs only; no test asserts speed.
const HANG: Duration = Duration::from_secs(30);

/// Serves every connection `listener` accepts with `reference_compile` and a cache
/// shared by its connections (a hit is answered early) until dropped.
fn serve(listener: Box<dyn Listener>) -> tokio::task::JoinHandle<()> {
    let cache: Arc<Mutex<HashMap<CacheKey, JobResult>>> = Arc::default();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut conn = spawn_server_connection(stream, ServerConfig::default());
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut jobs: HashMap<_, (JobDesc, Vec<u8>)> = HashMap::new();
                while let Some(ev) = conn.events.recv().await {
                    let cmd = match ev {
                        ServerEvent::JobStarted { job, desc } => {
                            jobs.insert(job, (desc, Vec::new()));
                            continue;
                        }
                        ServerEvent::Lookup { job, key } => match cache.lock().unwrap().get(&key) {
                            Some(r) => ServerCommand::Result {
                                job,
                                result: r.clone(),
                                origin: ResultOrigin::Early,
                            },
                            None => ServerCommand::Miss(job),
                        },
                        ServerEvent::Source { job, data } => {
                            if let Some(j) = jobs.get_mut(&job) {
                                j.1.extend_from_slice(&data);
                            }
                            continue;
                        }
                        ServerEvent::SourceDone { job, key, .. } => {
                            let Some((d, s)) = jobs.remove(&job) else {
                                continue;
                            };
                            let result = reference_compile(&d, &s);
                            cache.lock().unwrap().insert(key, result.clone());
                            ServerCommand::Result {
                                job,
                                result,
                                origin: ResultOrigin::Compiled,
                            }
                        }
                        ServerEvent::Closed { .. } => break,
                        _ => continue,
                    };
                    let _ = conn.commands.send(cmd);
                }
            });
        }
    })
}

/// A `tls://` server on loopback with `tls`; returns its address.
async fn tls_server(tls: TlsServer) -> (Address, tokio::task::JoinHandle<()>) {
    let opts = TransportOptions::default().with_tls_server(tls);
    let l = bind(&"tls://127.0.0.1:0".parse().unwrap(), &opts)
        .await
        .unwrap();
    let addr = l.local_addr();
    (addr, serve(l))
}

fn job() -> (JobDesc, Bytes, CacheKey) {
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-c".into()],
        source_len: None,
        identity: None,
    };
    let src = Bytes::from_static(b"int over_tls;\n");
    let key = CacheKey::compute(&desc, &src);
    (desc, src, key)
}

/// Connects with `tls` and runs one job.
async fn compile_with(addr: &Address, tls: TlsClient) -> Result<(), String> {
    let opts = TransportOptions::default().with_tls_client(tls);
    let stream = connect(addr, &opts).await.map_err(|e| e.to_string())?;
    let client = spawn_client(stream, ClientConfig::default());
    let (desc, src, key) = job();
    let out = tokio::time::timeout(HANG, client.submit(desc.clone(), Some(key), src.clone()))
        .await
        .expect("no hang")
        .map_err(|e| e.to_string())?;
    assert_eq!(out.result, reference_compile(&desc, &src));
    Ok(())
}

async fn handshake_failure(addr: &Address, tls: TlsClient) -> TlsFailure {
    let opts = TransportOptions::default().with_tls_client(tls);
    match connect(addr, &opts).await {
        Err(TransportError::Tls { failure, addr: a }) => {
            assert_eq!(&a, addr);
            failure
        }
        Err(e) => panic!("not a TLS failure: {e}"),
        Ok(_) => panic!("the handshake succeeded"),
    }
}

#[tokio::test]
async fn a_job_runs_over_tls_with_a_private_ca() {
    let ca = Pki::new("private CA");
    let (addr, _server) = tls_server(ca.server()).await;
    assert!(addr.to_string().starts_with("tls://127.0.0.1:"), "{addr}");
    compile_with(&addr, ca.client()).await.unwrap();
    // The host name is checked as well as the IP: the certificate names both.
    let Address::Tls { port, .. } = addr else {
        unreachable!()
    };
    let by_name: Address = format!("tls://localhost:{port}").parse().unwrap();
    compile_with(&by_name, ca.client()).await.unwrap();
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_by_name() {
    let ours = Pki::new("our CA");
    let theirs = Pki::new("someone else's CA");
    let (addr, _server) = tls_server(theirs.server()).await;
    let failure = handshake_failure(&addr, ours.client()).await;
    assert_eq!(failure, TlsFailure::UnknownIssuer);
    assert!(failure.to_string().contains("DCACHE_TLS_CA"), "{failure}");
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_name() {
    let ca = Pki::new("CA");
    let (cert, key) = ca.server_files(&["127.0.0.1"], Validity::Expired);
    let (addr, _server) = tls_server(TlsServer::new(&cert, &key, None).unwrap()).await;
    let failure = handshake_failure(&addr, ca.client()).await;
    assert_eq!(failure, TlsFailure::Expired);
    assert!(failure.to_string().contains("expired"), "{failure}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_by_name() {
    let ca = Pki::new("CA");
    let (cert, key) = ca.server_files(&["build.example"], Validity::Current);
    let (addr, _server) = tls_server(TlsServer::new(&cert, &key, None).unwrap()).await;
    let failure = handshake_failure(&addr, ca.client()).await;
    assert_eq!(
        failure,
        TlsFailure::WrongName {
            host: "127.0.0.1".into()
        }
    );
    let e = TransportError::Tls {
        addr: addr.clone(),
        failure,
    };
    let msg = e.to_string();
    assert!(msg.starts_with(&addr.to_string()), "{msg}");
    assert!(msg.contains("not valid for \"127.0.0.1\""), "{msg}");
}

#[tokio::test]
async fn a_tls_client_on_a_plain_port_is_told_it_is_plain() {
    let ca = Pki::new("CA");
    let plain = bind(
        &"tcp://127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .await
    .unwrap();
    let Address::Tcp { host, port } = plain.local_addr() else {
        unreachable!()
    };
    let _server = serve(plain);
    let addr = Address::Tls { host, port };
    let failure = handshake_failure(&addr, ca.client()).await;
    let TlsFailure::PlainServer { said: Some(said) } = &failure else {
        panic!("not told the server is plain: {failure:?}");
    };
    // The plain server recognised the ClientHello and said so, in its own protocol.
    assert!(said.contains("TLS ClientHello"), "{said}");
    assert!(failure.to_string().contains("use tcp://"), "{failure}");
}

#[tokio::test]
async fn a_plain_client_on_a_tls_port_is_told_to_use_tls() {
    let ca = Pki::new("CA");
    let (addr, _server) = tls_server(ca.server()).await;
    let Address::Tls { host, port } = addr else {
        unreachable!()
    };
    let plain = Address::Tcp { host, port };
    let stream = connect(&plain, &TransportOptions::default()).await.unwrap();
    let client = spawn_client(stream, ClientConfig::default());
    let (desc, src, key) = job();
    let e = tokio::time::timeout(HANG, client.submit(desc, Some(key), src))
        .await
        .expect("no hang")
        .unwrap_err();
    let JobError::Connection(e) = &e else {
        panic!("{e:?}")
    };
    assert!(
        e.to_string()
            .contains("this port speaks TLS: connect with tls://"),
        "{e}"
    );
}

#[tokio::test]
async fn mutual_tls_serves_a_client_with_an_accepted_certificate_only() {
    let servers = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let strangers = Pki::new("stranger CA");
    let (cert, key) = servers.server_files(&["127.0.0.1"], Validity::Current);
    let tls = TlsServer::new(&cert, &key, Some(&clients.ca())).unwrap();
    let (addr, _server) = tls_server(tls).await;

    compile_with(&addr, clients.client_with_cert(&servers))
        .await
        .unwrap();

    // TLS 1.3: the client's handshake ends before the server has judged its
    // certificate, so the refusal comes with the first answer; the job fails with it.
    let none = compile_with(&addr, servers.client()).await.unwrap_err();
    assert!(
        none.contains("requires a client certificate"),
        "no certificate: {none}"
    );
    let wrong = compile_with(&addr, strangers.client_with_cert(&servers))
        .await
        .unwrap_err();
    assert!(
        wrong.contains("refused this client's certificate"),
        "a certificate of another CA: {wrong}"
    );
}

#[tokio::test]
async fn a_silent_peer_is_cut_at_the_tls_handshake_limit() {
    let ca = Pki::new("CA");
    let tls = ca
        .server()
        .with_handshake_timeout(Duration::from_millis(200));
    let (addr, _server) = tls_server(tls).await;
    let Address::Tls { port, .. } = addr else {
        unreachable!()
    };
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // Sends nothing; the server closes on it (an ERROR of the protocol above cannot go
    // out through a stream that never opened, so the close is all it gets).
    let mut rest = Vec::new();
    let n = tokio::time::timeout(HANG, silent.read_to_end(&mut rest))
        .await
        .expect("the silent peer was never cut");
    assert!(n.is_err() || rest.is_empty(), "{n:?} {rest:?}");
    // And the listener still serves.
    compile_with(&addr, ca.client()).await.unwrap();
}

#[tokio::test]
async fn unusable_certificate_files_are_named() {
    let ca = Pki::new("CA");
    let (cert, key) = ca.server_files(&["127.0.0.1"], Validity::Current);
    let missing = ca.dir.path().join("no-such-key.pem");
    let e = TlsServer::new(&cert, &missing, None).unwrap_err();
    assert!(
        matches!(
            e,
            TlsConfigError::Read {
                what: "private key",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("no-such-key.pem"), "{e}");

    // A key file without permission to read it (root reads anything, so only when the
    // test does not run as root does the mode say anything).
    use std::os::unix::fs::PermissionsExt;
    let locked = ca.dir.path().join("locked.pem");
    std::fs::copy(&key, &locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&locked).is_err() {
        let e = TlsServer::new(&cert, &locked, None).unwrap_err();
        assert!(matches!(e, TlsConfigError::Read { .. }), "{e:?}");
    }

    // A certificate given where the key belongs, and the reverse.
    let e = TlsServer::new(&cert, &cert, None).unwrap_err();
    assert!(matches!(e, TlsConfigError::NoKey { .. }), "{e:?}");
    let e = TlsServer::new(&key, &key, None).unwrap_err();
    assert!(matches!(e, TlsConfigError::NoCertificate { .. }), "{e:?}");
    // The key of another certificate.
    let (_, other_key) = ca.server_files(&["127.0.0.1"], Validity::Current);
    let e = TlsServer::new(&cert, &other_key, None).unwrap_err();
    assert!(matches!(e, TlsConfigError::BadIdentity { .. }), "{e:?}");
    // A CA file that holds no certificate.
    let e = TlsClient::new(Some(&key), None).unwrap_err();
    assert!(matches!(e, TlsConfigError::NoCertificate { .. }), "{e:?}");

    // A tls:// listener without a certificate at all.
    let e = bind(
        &"tls://127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .await
    .err()
    .expect("bound without a certificate");
    assert!(matches!(e, TransportError::TlsConfig { .. }), "{e:?}");
    assert!(e.to_string().contains("--tls-cert"), "{e}");
}

/// The early stop over TLS, measured beside plain TCP: a 32 MiB upload whose result is
/// cached is answered at its HASH, and the client stops. What it sent by then is what the
/// buffers between the two held (the kernel's send and receive buffers, and rustls's
/// [`TLS_BUFFER`](dcache_transport::TLS_BUFFER) of records): printed for the record
/// (`--nocapture`), and checked only to be a small part of the source, never timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_result_stops_a_tls_upload_as_it_stops_a_tcp_one() {
    const SOURCE: usize = 32 << 20;
    let ca = Pki::new("CA");
    let opts = TransportOptions::default()
        .with_tls_server(ca.server())
        .with_tls_client(ca.client());
    let src = Bytes::from((0..SOURCE).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let desc = JobDesc {
        source_len: Some(SOURCE as u64),
        ..job().0
    };
    let key = CacheKey::compute(&desc, &src);
    for scheme in ["tcp", "tls"] {
        let l = bind(&format!("{scheme}://127.0.0.1:0").parse().unwrap(), &opts)
            .await
            .unwrap();
        let addr = l.local_addr();
        let _server = serve(l);
        let client = spawn_client(
            connect(&addr, &opts).await.unwrap(),
            ClientConfig::default(),
        );
        let miss = client
            .submit(desc.clone(), Some(key), src.clone())
            .await
            .unwrap();
        assert!(!miss.origin.is_early());
        let mut sent = Vec::new();
        for _ in 0..5 {
            let hit = client
                .submit(desc.clone(), Some(key), src.clone())
                .await
                .unwrap();
            assert!(
                hit.origin.is_early(),
                "{scheme}: a cached job is answered early"
            );
            assert_eq!(hit.result, miss.result);
            sent.push(hit.source_bytes_sent);
        }
        println!(
            "{scheme}: source bytes sent before the early result stopped a {SOURCE}-byte upload: {sent:?}"
        );
        // How far an upload gets before the early result arrives is scheduling: on a
        // loaded machine one run can send everything first. That some run stops early is
        // what TLS's buffering could break; the figures themselves are printed above.
        let least = *sent.iter().min().unwrap();
        assert!(
            least < (SOURCE / 4) as u64,
            "{scheme}: the upload did not stop early: {sent:?} of {SOURCE}"
        );
    }
}
