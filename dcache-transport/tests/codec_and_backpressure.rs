//! The tokio-util codec, and a server's memory with a client that never reads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::hello;
use dcache_proto::{Frame, JobId, ServerConfig, ServerEvent, Stat};
use dcache_transport::{FrameCodec, ServerCommand, spawn_server_connection};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

#[tokio::test]
async fn frames_cross_a_stream_through_the_codec() {
    let (a, b) = tokio::io::duplex(1024);
    let mut tx = Framed::new(a, FrameCodec::new(1 << 20));
    let mut rx = Framed::new(b, FrameCodec::new(1 << 20));
    let frames = vec![
        hello(),
        Frame::Source {
            job: JobId(1),
            data: Bytes::from(vec![7u8; 5000]),
            fin: true,
            zstd: false,
        },
        Frame::StatsRequest,
    ];
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        for f in sent {
            tx.send(f).await.unwrap();
        }
    });
    for f in frames {
        assert_eq!(rx.next().await.unwrap().unwrap(), f);
    }
    writer.await.unwrap();
    // Garbage is an error, not a panic, and the stream ends there.
    let (mut a, b) = tokio::io::duplex(1024);
    a.write_all(&[0x42; 12]).await.unwrap();
    let mut rx = Framed::new(b, FrameCodec::new(1 << 20));
    assert!(rx.next().await.unwrap().is_err());
}

// Paused time: the 500 ms without progress below pass only once every task is idle, so
// "the writer is blocked" is a fact about the pipe, not a guess on a wall clock.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_cannot_grow_the_servers_memory() {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let mut conn = spawn_server_connection(server, ServerConfig::default());
    // The owner answers every stats request with a large answer, and counts them.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        let big: Vec<Stat> = (0..1000)
            .map(|i| Stat {
                name: format!("counter-{i:04}-{}", "x".repeat(40)),
                value: i,
            })
            .collect();
        while let Some(ev) = conn.events.recv().await {
            if let ServerEvent::StatsRequested = ev {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = conn.commands.send(ServerCommand::Stats(big.clone()));
            }
        }
    });
    let (_read_half, mut write_half) = tokio::io::split(client);
    let mut bytes = hello().to_bytes(1 << 20).unwrap().to_vec();
    let request = Frame::StatsRequest.to_bytes(1 << 20).unwrap();
    for _ in 0..100 {
        bytes.extend_from_slice(&request);
    }
    write_half.write_all(&bytes).await.unwrap();
    // Each request costs the server ~60 KB of answer. A server that kept decoding would
    // queue answers without bound; this one stops decoding (and reading) once about a
    // megabyte is queued, so the requests back up into the pipe and the writer blocks.
    let mut sent = 0usize;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(500), write_half.write_all(&request)).await
        {
            Ok(r) => {
                r.unwrap();
                sent += 1;
                assert!(sent < 100_000, "the server never stopped reading");
            }
            Err(_) => break true,
        }
    };
    assert!(blocked);
    // What got through is what fits in the pipe's 64 KiB; what was answered is bounded by
    // the server's 1 MiB output limit plus what the event queue already held.
    assert!(sent < 64 * 1024 / 12 + 200, "{sent} requests accepted");
    let answers = answered.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        answers < 100,
        "{answers} large answers queued for a client that never reads"
    );
}

/// A server that reads the job and never answers: the job fails with `TimedOut` after
/// the client's progress timeout (virtual time), so the caller can compile locally.
#[tokio::test(start_paused = true)]
async fn a_job_the_server_never_answers_times_out() {
    let (client, server) = tokio::io::duplex(64 * 1024);
    // The silent peer: answers HELLO, then reads everything and says nothing.
    tokio::spawn(async move {
        let mut framed = Framed::new(server, FrameCodec::new(1 << 20));
        framed.send(hello()).await.unwrap();
        while let Some(Ok(_)) = framed.next().await {}
    });
    let handle = dcache_transport::spawn_client(
        client,
        dcache_proto::ClientConfig {
            progress_timeout: Duration::from_secs(5),
            ..dcache_proto::ClientConfig::default()
        },
    );
    let desc = dcache_proto::JobDesc {
        compiler: "cc".into(),
        language: "cpp-output".into(),
        args: vec![],
        source_len: None,
        identity: None,
    };
    let started = tokio::time::Instant::now();
    let r = handle
        .submit(desc, None, Bytes::from_static(b"int x;\n"))
        .await;
    assert!(
        matches!(r, Err(dcache_transport::JobError::TimedOut { after }) if after >= Duration::from_secs(5)),
        "{r:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
}
