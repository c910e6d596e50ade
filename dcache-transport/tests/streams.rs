//! Every real transport moves bytes: echo, peer information, refusals, exclusive names,
//! dropped peers (EOF or an error, never a hang) and peers that stop reading (the writer
//! waits: bounded memory). Loopback and in-process only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dcache_transport::{
    Address, BoxedStream, Connector, Listener, Peer, TransportError, TransportOptions, bind,
    connect,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A guard against hangs only; no test asserts speed.
const HANG: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    Unix,
    Mem,
}

const ALL: [Kind; 3] = [Kind::Tcp, Kind::Unix, Kind::Mem];

/// A listener of `kind`, its real address, and the directory holding a Unix socket.
async fn listen(kind: Kind, tag: &str) -> (Box<dyn Listener>, Address, Option<tempfile::TempDir>) {
    let (addr, dir) = match kind {
        Kind::Tcp => ("tcp://127.0.0.1:0".parse().unwrap(), None),
        Kind::Unix => {
            let dir = tempfile::tempdir().unwrap();
            (Address::Unix(dir.path().join("s.sock")), Some(dir))
        }
        Kind::Mem => (format!("mem://streams-{tag}").parse().unwrap(), None),
    };
    let l = bind(&addr, &TransportOptions::default()).await.unwrap();
    let real = l.local_addr();
    (l, real, dir)
}

/// A connected (client, server) pair and the server's peer information.
async fn pair(
    kind: Kind,
    tag: &str,
) -> (BoxedStream, BoxedStream, Peer, Option<tempfile::TempDir>) {
    let (l, addr, dir) = listen(kind, tag).await;
    let opts = TransportOptions::default();
    let (c, s) = tokio::join!(connect(&addr, &opts), l.accept());
    let (s, peer) = s.unwrap();
    (c.unwrap(), s, peer, dir)
}

#[tokio::test]
async fn echo_over_every_transport() {
    for kind in ALL {
        let (mut c, mut s, _, _dir) = pair(kind, "echo").await;
        let data: Vec<u8> = (0..300_000).map(|i| (i % 241) as u8).collect();
        let sent = data.clone();
        let client = tokio::spawn(async move {
            c.write_all(&sent).await.unwrap();
            c.shutdown().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back
        });
        let server = async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.shutdown().await.unwrap();
        };
        tokio::time::timeout(HANG, server).await.unwrap();
        let back = tokio::time::timeout(HANG, client).await.unwrap().unwrap();
        assert!(back == data, "{kind:?}: echo differs");
    }
}

#[tokio::test]
async fn tcp_exposes_the_bound_port_and_the_peer_ip() {
    let (l, addr, _) = listen(Kind::Tcp, "").await;
    let Address::Tcp { host, port } = &addr else {
        panic!("{addr}")
    };
    assert_eq!(host, "127.0.0.1");
    assert_ne!(*port, 0, "the real port, not 0");
    assert_eq!(addr.to_string().parse::<Address>().unwrap(), addr);
    let opts = TransportOptions::default();
    let (c, s) = tokio::join!(connect(&addr, &opts), l.accept());
    let (_s, peer) = s.unwrap();
    drop(c);
    assert_eq!(peer.ip(), Some("127.0.0.1".parse().unwrap()));
    assert!(matches!(peer, Peer::Tcp(sa) if sa.port() != 0));
    assert!(peer.to_string().starts_with("tcp 127.0.0.1:"), "{peer}");
}

#[tokio::test]
async fn tcp_over_ipv6_loopback_when_the_machine_has_it() {
    let opts = TransportOptions::default();
    let Ok(l) = bind(&"tcp://[::1]:0".parse().unwrap(), &opts).await else {
        return; // no IPv6 here: nothing to test
    };
    let addr = l.local_addr();
    assert!(addr.to_string().starts_with("tcp://[::1]:"), "{addr}");
    let (c, s) = tokio::join!(connect(&addr, &opts), l.accept());
    let (mut s, peer) = s.unwrap();
    assert_eq!(peer.ip(), Some("::1".parse().unwrap()));
    c.unwrap().write_all(b"v6").await.unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"v6");
}

#[tokio::test]
async fn unix_and_mem_peers_say_who_they_are() {
    let (_c, _s, peer, dir) = pair(Kind::Unix, "").await;
    let me = std::fs::metadata(dir.unwrap().path()).unwrap().uid();
    assert!(
        matches!(peer, Peer::Unix { uid, pid, .. }
            if uid == Some(me) && pid == Some(std::process::id() as i32)),
        "{peer:?}"
    );
    assert_eq!(peer.ip(), None);

    let (l, addr, _) = listen(Kind::Mem, "numbered").await;
    let opts = TransportOptions::default();
    for n in 1..=2 {
        let (c, s) = tokio::join!(connect(&addr, &opts), l.accept());
        c.unwrap();
        let (_, peer) = s.unwrap();
        assert_eq!(peer.to_string(), format!("mem #{n}"));
        assert_eq!(peer.ip(), None);
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_refused_clearly() {
    let opts = TransportOptions::default();
    let refused = |r: Result<BoxedStream, TransportError>| {
        let e = r.err().expect("must fail");
        assert!(matches!(e, TransportError::Refused { .. }), "{e:?}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        e
    };
    let e = refused(connect(&"mem://nobody-here".parse().unwrap(), &opts).await);
    assert_eq!(e.to_string(), "mem://nobody-here: connection refused");

    let dir = tempfile::tempdir().unwrap();
    refused(connect(&Address::Unix(dir.path().join("none.sock")), &opts).await);

    // A port that was just free: bind one, note it, close it.
    let (l, addr, _) = listen(Kind::Tcp, "").await;
    drop(l);
    refused(connect(&addr, &opts).await);
    // Through the Connector trait, as a client holding `dyn Connector` would.
    let connector: &dyn Connector = &opts;
    refused(connector.connect(&addr).await);
}

#[tokio::test]
async fn mem_names_are_exclusive_and_freed_on_drop() {
    let opts = TransportOptions::default();
    let a: Address = "mem://exclusive".parse().unwrap();
    let l = bind(&a, &opts).await.unwrap();
    let e = bind(&a, &opts).await.err().unwrap();
    assert!(matches!(e, TransportError::InUse { .. }), "{e:?}");
    // A connection still waiting in the queue when the listener goes gets EOF.
    let mut waiting = connect(&a, &opts).await.unwrap();
    drop(l);
    let mut buf = Vec::new();
    let n = tokio::time::timeout(HANG, waiting.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    assert!(
        connect(&a, &opts).await.is_err(),
        "the name is free: refused"
    );
    let _again = bind(&a, &opts).await.unwrap();
}

#[tokio::test]
async fn unix_sockets_replace_only_stale_files_and_clean_up() {
    let opts = TransportOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.sock");
    let u = Address::Unix(path.clone());

    let l = bind(&u, &opts).await.unwrap();
    let e = bind(&u, &opts).await.err().unwrap();
    assert!(
        matches!(e, TransportError::InUse { .. }),
        "a live socket is not stolen: {e:?}"
    );
    drop(l);
    assert!(
        !path.exists(),
        "dropping the listener removes its socket file"
    );

    // A stale socket file (its listener died without cleaning up) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = bind(&u, &opts).await.unwrap();
    connect(&u, &opts).await.unwrap();

    // A listener whose file was replaced by another's leaves the newer file alone.
    std::fs::remove_file(&path).unwrap();
    let newer = bind(&u, &opts).await.unwrap();
    drop(l);
    assert!(path.exists(), "the newer listener's file survives");
    connect(&u, &opts).await.unwrap();
    drop(newer);
    assert!(!path.exists());

    // A file that is not a socket is never deleted.
    std::fs::write(&path, b"precious").unwrap();
    let e = bind(&u, &opts).await.err().unwrap();
    assert!(matches!(e, TransportError::NotASocket { .. }), "{e:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    // A missing directory is a bind error, not a refusal.
    let e = bind(&Address::Unix(dir.path().join("no/such/dir.sock")), &opts)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, TransportError::Io { .. }), "{e:?}");
}

#[tokio::test]
async fn a_dropped_peer_gives_eof_then_errors_not_a_hang() {
    for kind in ALL {
        let (mut c, s, _, _dir) = pair(kind, "dropped").await;
        drop(s);
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(HANG, c.read(&mut buf)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{kind:?}: {r:?}");
        // Writing to a peer that is gone fails, promptly on an in-process pipe and at the
        // latest after the peer's reset on a socket.
        let fails = async {
            loop {
                if c.write_all(&[0u8; 4096]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(HANG, fails)
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: writes to a dropped peer never failed"));
    }
}

/// How many bytes a writer gets rid of, without waiting, before it must wait.
fn accepted_without_waiting(s: &mut BoxedStream) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let chunk = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match Pin::new(&mut *s).poll_write(&mut cx, &chunk) {
            Poll::Ready(Ok(n)) => total += n,
            Poll::Ready(Err(e)) => panic!("write failed: {e}"),
            Poll::Pending => return total,
        }
        assert!(
            total < 256 << 20,
            "writer never blocked: unbounded buffering"
        );
    }
}

#[tokio::test]
async fn a_peer_that_stops_reading_blocks_the_writer() {
    // In memory: exactly the configured pipe capacity.
    let opts = TransportOptions::default().with_mem_buffer(100_000);
    let a: Address = "mem://streams-stall".parse().unwrap();
    let l = bind(&a, &opts).await.unwrap();
    let (c, s) = tokio::join!(connect(&a, &opts), l.accept());
    let (mut c, _s) = (c.unwrap(), s.unwrap());
    assert_eq!(accepted_without_waiting(&mut c), 100_000);

    // Sockets: the kernel's buffers, bounded. A write that makes no progress for a while
    // counts as blocked; the assertion is only the upper bound on bytes taken.
    for kind in [Kind::Tcp, Kind::Unix] {
        let (mut c, _s, _, _dir) = pair(kind, "").await;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(300), c.write_all(&chunk)).await
        {
            r.unwrap();
            written += chunk.len();
            assert!(written < 64 << 20, "{kind:?}: writer never blocked");
        }
    }
}

#[tokio::test]
async fn a_blocked_writer_resumes_when_the_reader_reads() {
    for kind in ALL {
        let (mut c, mut s, _, _dir) = pair(kind, "resume").await;
        let writer = tokio::spawn(async move {
            c.write_all(&vec![3u8; 8 << 20]).await.unwrap();
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(HANG, s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 8 << 20, "{kind:?}");
        writer.await.unwrap();
    }
}

#[tokio::test]
async fn a_dropped_reader_fails_a_blocked_writer() {
    for kind in ALL {
        let (mut c, s, _, _dir) = pair(kind, "fail-blocked").await;
        let writer = tokio::spawn(async move { c.write_all(&vec![0u8; 64 << 20]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
        let r = tokio::time::timeout(HANG, writer).await.unwrap().unwrap();
        let e = r.unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ),
            "{kind:?}: {e}"
        );
    }
}
