//! Jobs whose source arrives as a stream of chunks, against a real service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use bytes::Bytes;
use dcache_client::{Client, ClientOptions};
use dcache_proto::JobDesc;
use dcache_proto::testing::reference_compile;

use common::{serve, stat};

/// Sends `chunks` one at a time with a pause between, as a slow producer would.
fn producer(chunks: Vec<Bytes>) -> tokio::sync::mpsc::Receiver<Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        for c in chunks {
            tx.send(c).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    rx
}

#[tokio::test]
async fn a_streamed_source_compiles_and_a_second_stream_is_answered_from_the_cache() {
    let (service, addr, _stop) = serve("client-stream").await;
    let client = Client::new(ClientOptions::new(vec![addr]));
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into()],
        source_len: None,
        identity: None,
    };
    let chunks: Vec<Bytes> = (0..20)
        .map(|i| Bytes::from(format!("int part_{i} = {i};\n").repeat(500)))
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let expected = reference_compile(&desc, &whole);

    let first = client
        .compile_stream(desc.clone(), producer(chunks.clone()))
        .await
        .unwrap();
    assert_eq!(first.job.result, expected);
    assert_eq!(first.job.source_bytes_sent, whole.len() as u64);
    assert_eq!(stat(&service, "compiles"), 1);

    let second = client
        .compile_stream(desc.clone(), producer(chunks))
        .await
        .unwrap();
    assert_eq!(second.job.result, expected);
    assert_eq!(stat(&service, "compiles"), 1, "the second was a cache hit");
    assert_eq!(stat(&service, "hits"), 1);
}

#[tokio::test]
async fn an_empty_stream_is_an_empty_source() {
    let (_service, addr, _stop) = serve("client-stream-empty").await;
    let client = Client::new(ClientOptions::new(vec![addr]));
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-c".into()],
        source_len: None,
        identity: None,
    };
    let o = client
        .compile_stream(desc.clone(), producer(vec![]))
        .await
        .unwrap();
    assert_eq!(o.job.result, reference_compile(&desc, b""));
}
