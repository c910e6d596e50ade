//! Load: 64 concurrent clients × 2,000 jobs over TCP against one server, hits and misses
//! mixed, some jobs cancelled mid-flight; every result checked against the expected object;
//! memory bounded throughout. Bounded in count (128,000 jobs) and time, loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::{Rng, reference_compile};
use dcache_proto::{CacheKey, ClientConfig, JobDesc};
use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{TransportOptions, bind, connect, spawn_client};

const CLIENTS: usize = 64;
const JOBS_PER_CLIENT: usize = 2_000;
const DISTINCT: u64 = 400;

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn job(n: u64) -> (JobDesc, Bytes) {
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into(), format!("-DUNIT={n}")],
        source_len: None,
        identity: None,
    };
    // 1 to 64 KiB, so some jobs span several frames.
    let len = 1024 * (1 + (n as usize * 7) % 64);
    (desc, Bytes::from(vec![(n % 251) as u8; len]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_two_thousand_jobs_each() {
    let service = Service::new(
        Arc::new(MemoryStore::new(256 << 20)),
        Arc::new(FakeExecutor::new(Duration::from_millis(1))),
        ServiceConfig::default(),
    );
    let listener = bind(
        &"tcp://127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .await
    .unwrap();
    let addr = listener.local_addr();
    let server = service.clone();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    let done = Arc::new(AtomicU64::new(0));
    let cancelled = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let addr = addr.clone();
        let (done, cancelled) = (done.clone(), cancelled.clone());
        clients.spawn(async move {
            let stream = connect(&addr, &TransportOptions::default()).await.unwrap();
            let client = spawn_client(stream, ClientConfig::default());
            let mut rng = Rng::new(c as u64 + 1);
            // Eight jobs in flight per client.
            let mut inflight = tokio::task::JoinSet::new();
            for _ in 0..JOBS_PER_CLIENT {
                if inflight.len() >= 8 {
                    inflight.join_next().await.unwrap().unwrap();
                }
                let n = rng.below(DISTINCT);
                let cancel = rng.below(100) < 3;
                let client = client.clone();
                let (done, cancelled) = (done.clone(), cancelled.clone());
                inflight.spawn(async move {
                    let (desc, src) = job(n);
                    let key = CacheKey::compute(&desc, &src);
                    let submit = client.submit(desc.clone(), Some(key), src.clone());
                    if cancel {
                        // Dropping the future mid-flight cancels the job.
                        let _ = tokio::time::timeout(Duration::from_micros(200), submit).await;
                        cancelled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let outcome = submit.await.expect("job failed");
                    assert!(
                        outcome.result == reference_compile(&desc, &src),
                        "wrong object for unit {n}"
                    );
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
            while let Some(r) = inflight.join_next().await {
                r.unwrap();
            }
        });
    }
    let mut peak = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        tokio::select! {
            r = clients.join_next() => match r {
                Some(r) => r.unwrap(),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                peak = peak.max(peak_rss_mib());
                assert!(tokio::time::Instant::now() < deadline, "load test ran past its time bound");
            }
        }
    }
    peak = peak.max(peak_rss_mib());
    let done = done.load(Ordering::Relaxed);
    let cancelled = cancelled.load(Ordering::Relaxed);
    assert_eq!(done + cancelled, (CLIENTS * JOBS_PER_CLIENT) as u64);
    let stats = service.stats();
    let get = |n: &str| stats.iter().find(|s| s.name == n).unwrap().value;
    // Every distinct unit compiled at least once, and the cache answered the rest.
    assert!(get("compiles") >= DISTINCT.min(done));
    assert!(get("hits") > done / 2, "{stats:?}");
    // Clients, server and cache share this process; 128,000 jobs must not grow it.
    assert!(peak < 1024, "peak RSS {peak} MiB");
    println!(
        "{done} jobs checked, {cancelled} cancelled, {} compiles, {} hits, peak RSS {peak} MiB",
        get("compiles"),
        get("hits")
    );
}
