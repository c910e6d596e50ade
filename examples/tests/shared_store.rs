//! The shared tier's store on a real `redis-server`, through the library: what is
//! verified on every read (a value replayed under another key, a chunk missing or
//! swapped, a head that lies about its size), compressed entries, and a Redis that is down
//! at start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::redis::Redis;
use dcache_proto::{JobResult, OutputFile};
use dcache_server::store::shared::{Backend, RedisBackend, SharedConfig, SharedStore};
use dcache_server::store::{Compression, SealKey, Store, StoreKey};

/// A result whose object does not compress, so it is stored at its own size (chunks).
fn result(object_len: usize) -> JobResult {
    let mut data = vec![0u8; object_len];
    blake3::Hasher::new().finalize_xof().fill(&mut data);
    with_object(data)
}

/// A result whose object is text-like and compresses several times, as objects do.
fn text_result(object_len: usize) -> JobResult {
    let mut data = Vec::with_capacity(object_len + 64);
    let mut i = 0u32;
    while data.len() < object_len {
        data.extend_from_slice(format!("sym_{} = .L{} + {};\n", i % 97, i % 13, i).as_bytes());
        i += 1;
    }
    data.truncate(object_len);
    with_object(data)
}

fn with_object(data: Vec<u8>) -> JobResult {
    JobResult {
        exit_code: 0,
        stdout: Bytes::new(),
        stderr: Bytes::from_static(b"warning: something\n"),
        outputs: vec![OutputFile {
            name: ".o".into(),
            data: Bytes::from(data),
        }],
    }
}

fn store(url: &str, key: &[u8]) -> SharedStore<RedisBackend> {
    store_with(url, key, SharedConfig::default())
}

fn store_with(url: &str, key: &[u8], base: SharedConfig) -> SharedStore<RedisBackend> {
    let config = SharedConfig {
        chunk_len: 64 << 10,
        deadline: Duration::from_secs(2),
        ..base
    };
    let backend = RedisBackend::new(url, config.transfer_timeout).unwrap();
    SharedStore::new(backend, SealKey::for_shared_tier(key), config)
}

fn tier(s: &SharedStore<RedisBackend>) -> dcache_server::store::TierStats {
    s.tiers()[0]
}

const KEY: &[u8] = b"fleet key 0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_round_trip_in_chunks_and_every_damage_is_refused() {
    let redis = Redis::start();
    let s = store(&redis.url(), KEY);
    let (k1, k2) = (StoreKey([1; 32]), StoreKey([2; 32]));
    // About 300 KiB: a head and four more chunks of 64 KiB.
    let big = result(300_000);
    s.put(&k1, &big).await.unwrap();
    let names = s.names(&k1, 5);
    assert_eq!(redis.keys().len(), 5, "{:?}", redis.keys());
    assert_eq!(s.get(&k1).await, Some(big.clone()));
    assert_eq!(tier(&s).hits, 1);

    // The very values of k1 stored under k2's names: they name k1, so k2 refuses them.
    let b = s.backend();
    let mut copied = Vec::new();
    for (from, to) in names.iter().zip(s.names(&k2, 5)) {
        copied.push((to, b.get(from).await.unwrap().unwrap()));
    }
    b.put_many(&copied, Duration::from_secs(60)).await.unwrap();
    assert_eq!(s.get(&k2).await, None, "replayed under another key");
    assert_eq!(tier(&s).refused, 1);

    // Two chunks swapped (same lengths): the MAC over the whole entry catches it.
    let (c1, c2) = (
        b.get(&names[1]).await.unwrap().unwrap(),
        b.get(&names[2]).await.unwrap().unwrap(),
    );
    b.put_many(
        &[(names[1].clone(), c2), (names[2].clone(), c1)],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(s.get(&k1).await, None, "chunks swapped");
    assert_eq!(tier(&s).refused, 2);
    // A refused entry is dropped from Redis (in the background).
    assert!(common::redis::eventually(Duration::from_secs(30), || redis
        .cli(&["EXISTS", &names[0]])
        == "0"));

    // A chunk gone (evicted on its own): a miss, never a partial result.
    s.put(&k1, &big).await.unwrap();
    redis.cli(&["DEL", &names[3]]);
    assert_eq!(s.get(&k1).await, None);
    assert_eq!(tier(&s).refused, 3);
    let gone = || {
        common::redis::eventually(Duration::from_secs(30), || {
            redis.cli(&["EXISTS", &names[0]]) == "0"
        })
    };
    assert!(gone());

    // A head declaring 2^60 bytes: refused before any chunk is read or memory reserved.
    let mut head = vec![];
    head.extend_from_slice(b"DCS1");
    head.extend_from_slice(&(1u64 << 60).to_be_bytes());
    head.extend_from_slice(&(64u32 << 10).to_be_bytes());
    head.extend_from_slice(&1u32.to_be_bytes());
    b.put_many(
        &[(names[0].clone(), Bytes::from(head))],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(s.get(&k1).await, None);
    assert_eq!(
        tier(&s).refused,
        3,
        "too large for this server is not damage"
    );

    // Sealed with another fleet's key: well formed, refused.
    let stranger = store(&redis.url(), b"another fleet's key 0123");
    let k3 = StoreKey([3; 32]);
    stranger.put(&k3, &result(100)).await.unwrap();
    assert_eq!(stranger.get(&k3).await, Some(result(100)));
    assert_eq!(s.get(&k3).await, None);
    assert_eq!(tier(&s).refused, 4);

    // Entries carry the TTL. A key of its own: k3's refused value may still be being
    // dropped in the background, which would race a new write under the same name.
    let k4 = StoreKey([4; 32]);
    s.put(&k4, &result(100)).await.unwrap();
    let ttl: i64 = redis.cli(&["PTTL", &s.names(&k4, 1)[0]]).parse().unwrap();
    assert!(ttl > 0, "a TTL is set: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_down_at_start_is_a_miss_and_is_used_once_it_is_up() {
    let mut redis = Redis::start();
    redis.stop();
    let s = store(&redis.url(), KEY);
    let k = StoreKey([9; 32]);
    assert_eq!(s.get(&k).await, None);
    assert!(s.put(&k, &result(10)).await.is_err());
    assert!(tier(&s).errors >= 2);
    redis.restart();
    // Reconnects are tried at most once a second.
    let mut stored = false;
    for _ in 0..100 {
        if s.put(&k, &result(10)).await.is_ok() {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "never reconnected");
    assert_eq!(s.get(&k).await, Some(result(10)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_entries_round_trip_and_every_server_reads_both_forms() {
    let redis = Redis::start();
    let z = store(&redis.url(), KEY);
    let plain = SharedConfig {
        compression: Compression::None,
        ..SharedConfig::default()
    };
    let p = store_with(&redis.url(), KEY, plain);
    let (k1, k2) = (StoreKey([1; 32]), StoreKey([2; 32]));
    // 1 MiB of text: compressed, a few chunks of 64 KiB instead of seventeen.
    let text = text_result(1 << 20);
    z.put(&k1, &text).await.unwrap();
    let written = tier(&z).bytes_written;
    assert!(written * 3 < text.body_len(), "{written} bytes stored");
    let head = z.backend().get(&z.names(&k1, 1)[0]).await.unwrap().unwrap();
    // The head's 20 bytes of layout, then the entry: "DCE1", version 3 (compressed).
    assert_eq!(&head[20..24], b"DCE1");
    assert_eq!(u16::from_be_bytes([head[24], head[25]]), 3);
    assert!(redis.keys().len() < 17, "{:?}", redis.keys());
    assert_eq!(z.get(&k1).await, Some(text.clone()));
    // A server writing plain entries reads compressed ones, and the other way round.
    assert_eq!(p.get(&k1).await, Some(text.clone()));
    p.put(&k2, &text).await.unwrap();
    let head = p.backend().get(&p.names(&k2, 1)[0]).await.unwrap().unwrap();
    assert_eq!(u16::from_be_bytes([head[24], head[25]]), 2);
    assert_eq!(z.get(&k2).await, Some(text.clone()));
    assert_eq!(tier(&z).refused, 0);

    // A server whose limit on a body is smaller: a miss, not damage, left in place.
    let small = SharedConfig {
        max_body: 512 << 10,
        ..SharedConfig::default()
    };
    let s = store_with(&redis.url(), KEY, small);
    assert_eq!(s.get(&k1).await, None);
    assert_eq!(
        tier(&s).refused,
        0,
        "another server's larger limit is not damage"
    );
    assert!(
        s.put(&k1, &text).await.is_err(),
        "too large for it to write"
    );
    assert_eq!(z.get(&k1).await, Some(text.clone()), "still there");

    // A byte of the compressed payload flipped (in its last chunk): refused and dropped.
    let count = {
        let mut n = 1;
        while redis.cli(&["EXISTS", &z.names(&k1, n + 1)[n as usize]]) == "1" {
            n += 1;
        }
        n
    };
    let names = z.names(&k1, count);
    let last = names.last().unwrap().clone();
    let mut chunk = z.backend().get(&last).await.unwrap().unwrap().to_vec();
    let mid = chunk.len() / 2;
    chunk[mid] ^= 0x20;
    z.backend()
        .put_many(&[(last, Bytes::from(chunk))], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        z.get(&k1).await,
        None,
        "a damaged compressed entry was served"
    );
    assert_eq!(tier(&z).refused, 1);
    assert!(common::redis::eventually(Duration::from_secs(30), || redis
        .cli(&["EXISTS", &names[0]])
        == "0"));
}
