//! The service end to end: real connections, the fake compiler and real gcc.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::reference_compile;
use dcache_proto::{CacheKey, ClientConfig, ErrorCode, JobDesc, Strategy};
use dcache_server::exec::{Executor, FakeExecutor, LocalExecutor, LocalExecutorConfig};
use dcache_server::store::{DiskStore, MemoryStore, Store};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{
    Address, ClientHandle, JobError, TransportOptions, bind, connect, spawn_client,
};

const HANG: Duration = Duration::from_secs(300);

async fn start(
    service: &Arc<Service>,
    addr: &str,
) -> (
    Address,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
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
    (addr, stop, task)
}

async fn client(addr: &Address, strategy: Strategy) -> ClientHandle {
    let stream = connect(addr, &TransportOptions::default()).await.unwrap();
    spawn_client(
        stream,
        ClientConfig {
            strategy,
            ..ClientConfig::default()
        },
    )
}

fn stat(stats: &[dcache_proto::Stat], name: &str) -> u64 {
    stats.iter().find(|s| s.name == name).map_or(0, |s| s.value)
}

fn fake_service(compile_ms: u64) -> Arc<Service> {
    Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(FakeExecutor::new(Duration::from_millis(compile_ms))),
        ServiceConfig::default(),
    )
}

/// A job for `compiler`, naming the identity of the system's compiler of that name (as a
/// client of it would) when there is one.
fn desc(compiler: &str, args: &[&str], len: Option<usize>) -> JobDesc {
    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    let identity = (!compiler.contains('/'))
        .then(|| dcache_server::sandbox::toolchain::find_on_path(compiler, PATH))
        .flatten()
        .and_then(|p| dcache_server::exec::identity::probe(&p, PATH).ok());
    JobDesc {
        compiler: compiler.into(),
        language: "cpp-output".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        source_len: len.map(|l| l as u64),
        identity,
    }
}

#[tokio::test]
async fn two_concurrent_identical_jobs_compile_once() {
    let service = fake_service(300);
    let (addr, _stop, _task) = start(&service, "mem://svc-single-flight").await;
    let a = client(&addr, Strategy::Speculative).await;
    let b = client(&addr, Strategy::Speculative).await;
    let d = desc("gcc", &["-O2", "-c"], None);
    let src = Bytes::from(vec![3u8; 100_000]);
    let key = CacheKey::compute(&d, &src);
    let (ra, rb) = tokio::join!(
        a.submit(d.clone(), Some(key), src.clone()),
        b.submit(d.clone(), Some(key), src.clone())
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.result, reference_compile(&d, &src));
    assert_eq!(rb.result, ra.result);
    let stats = service.stats();
    assert_eq!(stat(&stats, "compiles"), 1, "{stats:?}");
    assert_eq!(stat(&stats, "single_flight_waits"), 1);
}

#[tokio::test]
async fn a_lying_hash_stores_nothing_and_an_honest_client_gets_the_right_object() {
    let service = fake_service(0);
    let (addr, _stop, _task) = start(&service, "mem://svc-poison").await;
    let attacker = client(&addr, Strategy::Speculative).await;
    let d = desc("gcc", &["-O2", "-c"], None);
    let honest_src = Bytes::from_static(b"int honest;\n");
    let evil_src = Bytes::from_static(b"int evil;\n");
    let honest_key = CacheKey::compute(&d, &honest_src);
    // The attacker claims the honest key but sends other source.
    let r = attacker.submit(d.clone(), Some(honest_key), evil_src).await;
    assert!(
        matches!(&r, Err(JobError::Failed { code, .. }) if *code == ErrorCode::HASH_MISMATCH),
        "{r:?}"
    );
    let victim = client(&addr, Strategy::Speculative).await;
    let o = victim
        .submit(d.clone(), Some(honest_key), honest_src.clone())
        .await
        .unwrap();
    assert!(
        !o.origin.is_early(),
        "nothing was stored under the honest key"
    );
    assert_eq!(o.result, reference_compile(&d, &honest_src));
    assert_eq!(stat(&service.stats(), "hash_mismatches"), 1);
}

#[tokio::test]
async fn refused_jobs_get_clear_errors() {
    let service = fake_service(0);
    let (addr, _stop, _task) = start(&service, "mem://svc-refuse").await;
    let c = client(&addr, Strategy::Speculative).await;
    let src = Bytes::from_static(b"int x;\n");
    let d = desc("gcc", &["-fplugin=/tmp/evil.so"], None);
    let r = c
        .submit(d.clone(), Some(CacheKey::compute(&d, &src)), src.clone())
        .await;
    match r {
        Err(JobError::Failed { code, message }) => {
            assert_eq!(code, ErrorCode::REFUSED);
            assert!(message.contains("-fplugin=/tmp/evil.so"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The connection lives on.
    let d = desc("gcc", &["-O1", "-c"], None);
    c.submit(d.clone(), None, src).await.unwrap();
}

fn gcc_e(dir: &Path, src: &str) -> Bytes {
    std::fs::write(dir.join("t.c"), src).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-E", "t.c"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    Bytes::from(out.stdout)
}

fn gcc_local(pre: &[u8], args: &[&str]) -> (i32, Vec<u8>, Option<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.i"), pre).unwrap();
    let out = std::process::Command::new("gcc")
        .args(args)
        .args(["-x", "cpp-output", "-c", "in.i", "-o", "out.o"])
        .current_dir(dir.path())
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let obj = std::fs::read(dir.path().join("out.o")).ok();
    (out.status.code().unwrap(), out.stderr, obj)
}

fn real_service(store: Arc<dyn Store>) -> Arc<Service> {
    let exec = LocalExecutor::new(LocalExecutorConfig::default());
    assert!(exec.available().contains(&"gcc"), "gcc must be installed");
    Service::new(
        store,
        Arc::new(exec) as Arc<dyn Executor>,
        ServiceConfig::default(),
    )
}

async fn real_gcc_scenarios(addr_spec: &str) {
    let cache_dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(cache_dir.path(), 1 << 30).unwrap());
    let service = real_service(store.clone());
    let (addr, stop, task) = start(&service, addr_spec).await;
    let c = client(&addr, Strategy::Speculative).await;
    let work = tempfile::tempdir().unwrap();

    // A large translation unit, so the hit's early answer is visible against the upload.
    let mut text = String::from("#include <stdio.h>\n");
    for i in 0..4_000 {
        text.push_str(&format!("int f{i}(int x) {{ return x * {i} + 1; }}\n"));
    }
    let pre = gcc_e(work.path(), &text);
    let d = desc("gcc", &["-O1", "-c"], Some(pre.len()));
    let key = CacheKey::compute(&d, &pre);

    let miss = c.submit(d.clone(), Some(key), pre.clone()).await.unwrap();
    assert!(!miss.origin.is_early());
    assert_eq!(
        miss.result.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&miss.result.stderr)
    );
    let (code, _, local_obj) = gcc_local(&pre, &["-O1"]);
    assert_eq!(code, 0);
    let remote_obj = &miss.result.outputs[0].data;
    assert!(
        local_obj.as_deref() == Some(&remote_obj[..]),
        "object differs from a local gcc -c"
    );

    let hit = c.submit(d.clone(), Some(key), pre.clone()).await.unwrap();
    // EARLY_RESULT means the server answered before it had the whole source. Whether the
    // client had already pushed its last byte depends on the link: on loopback and in
    // memory a megabyte goes out in less time than a disk lookup, so the saving itself is
    // pinned down by the simulated-link tests, not here.
    assert!(
        hit.origin.is_early(),
        "second identical job answered by EARLY_RESULT"
    );
    assert_eq!(
        hit.source_bytes_sent + hit.source_bytes_skipped,
        pre.len() as u64
    );
    assert!(hit.result.outputs[0].data == *remote_obj);

    // Compile errors come back with gcc's stderr and status, byte for byte.
    let bad = gcc_e(work.path(), "int main(void) { return nope; }\n");
    let d_bad = desc("gcc", &["-O1", "-c"], None);
    let o = c
        .submit(
            d_bad.clone(),
            Some(CacheKey::compute(&d_bad, &bad)),
            bad.clone(),
        )
        .await
        .unwrap();
    let (code, stderr, _) = gcc_local(&bad, &["-O1"]);
    assert_eq!(o.result.exit_code, code);
    assert!(o.result.exit_code != 0);
    assert_eq!(
        String::from_utf8_lossy(&o.result.stderr),
        String::from_utf8_lossy(&stderr)
    );
    assert!(o.result.outputs.is_empty());

    // Refusals.
    let r = c
        .submit(desc("/bin/sh", &[], None), None, pre.clone())
        .await;
    assert!(
        matches!(&r, Err(JobError::Failed { code, .. }) if *code == ErrorCode::REFUSED),
        "{r:?}"
    );
    let r = c
        .submit(desc("gcc", &["-B/tmp"], None), None, pre.clone())
        .await;
    assert!(
        matches!(&r, Err(JobError::Failed { message, .. }) if message.contains("-B/tmp")),
        "{r:?}"
    );

    // Corrupting the stored entry makes the next request a miss that recompiles.
    let compiles = stat(&service.stats(), "compiles");
    for f in walk(store.root()) {
        // Entries live in two-letter fan-out directories (not tmp/, not the secret).
        if f.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let mut b = std::fs::read(&f).unwrap();
            let n = b.len();
            b[n - 7] ^= 0xFF;
            std::fs::write(&f, b).unwrap();
        }
    }
    let again = c.submit(d.clone(), Some(key), pre.clone()).await.unwrap();
    assert!(!again.origin.is_early(), "a corrupt entry is never served");
    assert!(again.result.outputs[0].data == *remote_obj);
    assert_eq!(stat(&service.stats(), "compiles"), compiles + 1);
    assert!(stat(&service.stats(), "corrupt_entries_dropped") >= 1);

    // A restart keeps the cache.
    drop(c);
    let _ = stop.send(());
    tokio::time::timeout(HANG, task).await.unwrap().unwrap();
    let store = Arc::new(DiskStore::open(cache_dir.path(), 1 << 30).unwrap());
    let service = real_service(store);
    let (addr, _stop, _task) = start(&service, addr_spec).await;
    let c = client(&addr, Strategy::AskFirst).await;
    let after = c.submit(d.clone(), Some(key), pre.clone()).await.unwrap();
    assert!(after.origin.is_early());
    assert_eq!(after.source_bytes_sent, 0);
    assert_eq!(stat(&service.stats(), "compiles"), 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test]
async fn real_gcc_over_mem() {
    tokio::time::timeout(HANG, real_gcc_scenarios("mem://svc-real-gcc"))
        .await
        .unwrap();
}

#[tokio::test]
async fn real_gcc_over_tcp() {
    tokio::time::timeout(HANG, real_gcc_scenarios("tcp://127.0.0.1:0"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_compile_error_early_in_a_long_upload_stops_the_upload() {
    let service = fake_service(0);
    let (addr, _stop, _task) = start(&service, "mem://svc-early-error").await;
    let c = client(&addr, Strategy::SendAll).await;
    let mut src = b"#error early\n".to_vec();
    src.extend(std::iter::repeat_n(b' ', 8 << 20));
    let d = desc("gcc", &["-c"], Some(src.len()));
    // The fake compiler exits on `#error` at once; a speculative client must stop.
    let c2 = client(&addr, Strategy::Speculative).await;
    let key = CacheKey::compute(&d, &src);
    let o = c2
        .submit(d.clone(), Some(key), Bytes::from(src.clone()))
        .await
        .unwrap();
    assert_eq!(o.result.exit_code, 1);
    assert!(
        o.source_bytes_sent < src.len() as u64,
        "upload went on after the error"
    );
    drop(c);
}

#[tokio::test]
async fn addresses_outside_the_allow_list_are_refused_with_a_clear_error() {
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 20)),
        Arc::new(FakeExecutor::new(Duration::ZERO)),
        ServiceConfig {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            ..ServiceConfig::default()
        },
    );
    let (addr, _stop, _task) = start(&service, "tcp://127.0.0.1:0").await;
    let c = client(&addr, Strategy::Speculative).await;
    let d = desc("gcc", &["-O2", "-c"], None);
    let r = c.submit(d, None, Bytes::from_static(b"int x;")).await;
    match r {
        Err(JobError::Connection(e)) => {
            assert_eq!(e.code(), ErrorCode::UNAUTHORIZED, "{e}");
            assert!(e.to_string().contains("127.0.0.1"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        stat(&service.stats(), "connections"),
        0,
        "no service for a refused peer"
    );
    assert_eq!(stat(&service.stats(), "connections_refused"), 1);
}

/// A store whose disk is full: every write fails, nothing is ever found.
struct FullDisk;

#[async_trait::async_trait]
impl Store for FullDisk {
    async fn get(&self, _: &dcache_server::store::StoreKey) -> Option<dcache_proto::JobResult> {
        None
    }
    async fn put(
        &self,
        _: &dcache_server::store::StoreKey,
        _: &dcache_proto::JobResult,
    ) -> Result<(), dcache_server::store::StoreError> {
        Err(std::io::Error::from_raw_os_error(28).into()) // ENOSPC
    }
    async fn remove(
        &self,
        _: &dcache_server::store::StoreKey,
    ) -> Result<bool, dcache_server::store::StoreError> {
        Ok(false)
    }
    fn stats(&self) -> dcache_server::store::StoreStats {
        dcache_server::store::StoreStats::default()
    }
}

#[tokio::test]
async fn a_store_that_cannot_write_still_returns_every_result() {
    // A full disk (simulated through the store trait) and a real read-only directory.
    let ro = tempfile::tempdir().unwrap();
    let disk = DiskStore::open(ro.path(), 1 << 30).unwrap();
    let mut perms = std::fs::metadata(disk.root()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    for dir in [disk.root().to_owned(), disk.root().join("tmp")] {
        std::fs::set_permissions(&dir, perms.clone()).unwrap();
    }
    let running_as_root = std::fs::write(disk.root().join("probe"), b"").is_ok();
    let stores: Vec<(&str, Arc<dyn Store>)> = vec![
        ("full disk", Arc::new(FullDisk)),
        ("read-only directory", Arc::new(disk)),
    ];
    for (name, store) in stores {
        if name == "read-only directory" && running_as_root {
            // Root writes through mode bits; the simulated full disk covers this path.
            continue;
        }
        let service = Service::new(
            store,
            Arc::new(FakeExecutor::new(Duration::from_millis(0))),
            ServiceConfig::default(),
        );
        let (addr, _stop, _task) = start(&service, &format!("mem://svc-store-fails-{name}")).await;
        let c = client(&addr, Strategy::Speculative).await;
        let d = desc("gcc", &["-O2", "-c"], None);
        let src = Bytes::from_static(b"int stored_nowhere;\n");
        for round in 0..2 {
            let key = CacheKey::compute(&d, &src);
            let o = c.submit(d.clone(), Some(key), src.clone()).await.unwrap();
            assert_eq!(
                o.result,
                reference_compile(&d, &src),
                "{name}, round {round}"
            );
            assert!(
                !o.origin.is_early(),
                "{name}: nothing could have been stored"
            );
        }
        // Give the background store attempts time to report.
        let mut waited = 0;
        while stat(&service.stats(), "store_errors") < 2 && waited < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        let stats = service.stats();
        assert_eq!(stat(&stats, "compiles"), 2, "{name}: {stats:?}");
        assert_eq!(stat(&stats, "store_errors"), 2, "{name}: {stats:?}");
    }
}

/// A fake compiler that counts how many compiles were started.
struct Counting {
    inner: FakeExecutor,
    started: Arc<std::sync::atomic::AtomicUsize>,
}

impl Executor for Counting {
    fn check(
        &self,
        desc: &JobDesc,
    ) -> Result<dcache_server::exec::CompilerId, dcache_server::exec::ExecError> {
        self.inner.check(desc)
    }
    fn compile(
        &self,
        desc: JobDesc,
        source: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    ) -> dcache_server::exec::CompileFuture {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.compile(desc, source)
    }
}

#[tokio::test]
async fn a_lookup_that_misses_starts_no_compiler_and_a_hit_needs_no_source() {
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(Counting {
            inner: FakeExecutor::new(Duration::from_millis(0)),
            started: started.clone(),
        }),
        ServiceConfig::default(),
    );
    let (addr, _stop, _task) = start(&service, "mem://svc-lookup").await;
    let c = client(&addr, Strategy::Speculative).await;
    let d = desc("gcc", &["-O2", "-c"], None);
    let src = Bytes::from_static(b"int looked_up;\n");
    let key = CacheKey::compute(&d, &src);
    assert_eq!(c.lookup(d.clone(), key).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        started.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a client that stops at MISS costs no compiler"
    );
    assert_eq!(stat(&service.stats(), "misses"), 1);
    // An ask-first job that goes on after MISS is compiled as its source arrives.
    let o = c
        .submit_with(d.clone(), key, Strategy::AskFirst, src.clone())
        .await
        .unwrap();
    assert!(!o.origin.is_cached());
    assert_eq!(started.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Now the key is found without sending any source.
    let found = c.lookup(d.clone(), key).await.unwrap().expect("a hit");
    assert!(found.origin.is_cached() && found.origin.is_early());
    assert_eq!(found.source_bytes_sent, 0);
    assert_eq!(found.result, reference_compile(&d, &src));
    assert_eq!(stat(&service.stats(), "compiles"), 1);
}

/// A memory store whose writes take a while, like a slow disk.
struct SlowStore(MemoryStore);

#[async_trait::async_trait]
impl Store for SlowStore {
    async fn get(&self, k: &dcache_server::store::StoreKey) -> Option<dcache_proto::JobResult> {
        self.0.get(k).await
    }
    async fn put(
        &self,
        k: &dcache_server::store::StoreKey,
        v: &dcache_proto::JobResult,
    ) -> Result<(), dcache_server::store::StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.put(k, v).await
    }
    async fn remove(
        &self,
        k: &dcache_server::store::StoreKey,
    ) -> Result<bool, dcache_server::store::StoreError> {
        self.0.remove(k).await
    }
    fn stats(&self) -> dcache_server::store::StoreStats {
        self.0.stats()
    }
}

#[tokio::test]
async fn stopping_the_server_waits_for_results_being_stored() {
    let store = Arc::new(SlowStore(MemoryStore::new(1 << 20)));
    let service = Service::new(
        store.clone(),
        Arc::new(FakeExecutor::new(Duration::from_millis(0))),
        ServiceConfig::default(),
    );
    let (addr, stop, task) = start(&service, "mem://svc-flush").await;
    let c = client(&addr, Strategy::Speculative).await;
    let d = desc("gcc", &["-c"], None);
    let src = Bytes::from_static(b"int kept;\n");
    c.submit(d.clone(), Some(CacheKey::compute(&d, &src)), src)
        .await
        .unwrap();
    drop(c);
    // The answer is out; its store write takes 300 ms more. Stopping must wait for it, or
    // a process that exits right after (the embedded server) would lose it.
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(
        store.stats().entries,
        1,
        "the result was stored before serve returned"
    );
}

#[tokio::test]
async fn source_a_hit_spared_is_counted_once_the_connection_closes() {
    let service = fake_service(0);
    let (addr, _stop, _task) = start(&service, "mem://svc-saved").await;
    let src = Bytes::from(vec![b'x'; 10_000]);
    let d = desc("gcc", &["-O2", "-c"], Some(src.len()));
    let key = CacheKey::compute(&d, &src);
    let c = client(&addr, Strategy::AskFirst).await;
    let miss = c.submit(d.clone(), Some(key), src.clone()).await.unwrap();
    assert!(!miss.origin.is_cached());
    let hit = c.submit(d.clone(), Some(key), src.clone()).await.unwrap();
    assert!(hit.origin.is_early());
    assert_eq!(hit.source_bytes_sent, 0);
    drop(c);
    // Read only once the connection has settled: the count comes with its close.
    tokio::time::timeout(HANG, async {
        while service.open_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        stat(&service.stats(), "source_bytes_saved"),
        src.len() as u64
    );
}
