//! A fleet of `dcache-server` processes sharing a cache tier on a real Redis (one server,
//! or a three-master Redis Cluster), with real gcc and the `dcache` wrapper: what one
//! server compiled another serves as a hit; values altered in Redis or sealed with
//! another key are refused; an outage, a restart and a slow Redis cost nothing but misses.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::{Cluster, Redis, eventually};
use common::{DCACHE, Server, private_file, server_on, stat, stats_json};

/// A server with a cache directory of its own over the shared tier at `url`.
struct Member {
    server: Server,
    _cache: tempfile::TempDir,
}

fn member(url: &str, key: &Path, extra: &[&str]) -> Member {
    member_with(url, key, extra, &[])
}

fn member_with(url: &str, key: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Member {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        &["--shared", url, "--shared-key-file", key.to_str().unwrap()],
        extra,
    ]
    .concat();
    Member {
        server: server_on(cache.path(), &args, envs),
        _cache: cache,
    }
}

impl Member {
    fn addr(&self) -> &str {
        &self.server.addr
    }

    fn stat(&self, name: &str) -> u64 {
        stat(&stats_json(&[("DCACHE_HOSTS", self.addr())]), name)
    }

    /// Waits (bounded) until this server has written `n` entries' bytes to the shared
    /// tier: the write-through runs after the reply.
    fn wait_written(&self, at_least: u64) {
        assert!(
            eventually(Duration::from_secs(60), || self
                .stat("shared_bytes_written")
                >= at_least),
            "{}: shared writes never reached {at_least} bytes",
            self.addr()
        );
    }
}

/// Compiles `src` (written into a fresh directory) with `gcc -c` through `dcache`
/// against `addr` only, and returns the object.
fn compile(src: &str, addr: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.c"), src).unwrap();
    let out = Command::new(DCACHE)
        .args(["gcc", "-c", "t.c", "-o", "t.o"])
        .env("DCACHE_HOSTS", addr)
        .env("DCACHE_DIR", dir.path().join(".dcache"))
        .env("DCACHE_FALLBACK", "0")
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.path().join("t.o")).unwrap()
}

fn source(i: usize) -> String {
    format!("int f{i}(int x) {{ return x * {i} + 1; }}\n")
}

#[test]
fn a_second_server_serves_the_first_ones_compile_from_redis() {
    let redis = Redis::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    let a = member(&redis.url(), &key, &[]);
    let b = member(&redis.url(), &key, &[]);

    let from_a = compile(&source(1), a.addr());
    a.wait_written(1);
    assert_eq!(
        redis.keys().len(),
        1,
        "one entry, one value: {:?}",
        redis.keys()
    );
    let from_b = compile(&source(1), b.addr());
    assert_eq!(from_a, from_b, "byte-identical object");
    let json = stats_json(&[("DCACHE_HOSTS", b.addr())]);
    assert_eq!(
        (
            stat(&json, "compiles"),
            stat(&json, "hits"),
            stat(&json, "shared_hits"),
            stat(&json, "disk_hits"),
        ),
        (0, 1, 1, 0),
        "B ran no compiler: {json}"
    );
    // The hit was written back to B's local tiers: with Redis gone, B still has it.
    assert!(eventually(Duration::from_secs(60), || b
        .stat("disk_bytes_written")
        > 0));
    drop(redis);
    assert_eq!(compile(&source(1), b.addr()), from_a);
    assert_eq!(b.stat("compiles"), 0);
}

#[test]
fn values_altered_in_redis_or_sealed_with_another_key_are_refused_and_recompiled() {
    let redis = Redis::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    let other = private_file(secrets.path(), "other", "another fleet's key 0123\n");
    let a = member(&redis.url(), &key, &[]);
    let b = member(&redis.url(), &key, &[]);
    let stranger = member(&redis.url(), &other, &[]);

    // One byte of A's entry changed in Redis, past the headers (in the object).
    let from_a = compile(&source(2), a.addr());
    a.wait_written(1);
    let name = redis.keys().pop().unwrap();
    let len: usize = redis.cli(&["STRLEN", &name]).parse().unwrap();
    assert_eq!(
        redis.cli(&["SETRANGE", &name, &(len - 10).to_string(), "Z"]),
        len.to_string()
    );
    assert_eq!(compile(&source(2), b.addr()), from_a, "recompiled, correct");
    assert_eq!(
        (b.stat("compiles"), b.stat("shared_refused"), b.stat("hits")),
        (1, 1, 0)
    );

    // An entry a server with another key wrote: well formed, but not ours.
    let from_stranger = compile(&source(3), stranger.addr());
    stranger.wait_written(1);
    assert_eq!(compile(&source(3), b.addr()), from_stranger);
    assert_eq!(
        (b.stat("compiles"), b.stat("shared_refused"), b.stat("hits")),
        (2, 2, 0)
    );
}

#[test]
fn a_redis_cluster_spreads_entries_over_its_nodes_and_serves_the_fleet() {
    let cluster = Cluster::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    // Entries as they are, so the 6 MiB object below is stored in chunks (see the
    // large-object test).
    let plain = ["--store-compression", "none"];
    let a = member(&cluster.url(), &key, &plain);
    let b = member(&cluster.url(), &key, &plain);
    // Twelve entries: all on one of three nodes by chance has odds of 3^-11.
    let objects: Vec<Vec<u8>> = (0..12)
        .map(|i| compile(&source(100 + i), a.addr()))
        .collect();
    assert!(
        eventually(Duration::from_secs(60), || cluster
            .keys_per_node()
            .iter()
            .sum::<usize>()
            == 12),
        "{:?}",
        cluster.keys_per_node()
    );
    let spread = cluster.keys_per_node();
    assert!(
        spread.iter().filter(|&&n| n > 0).count() >= 2,
        "keys on different nodes: {spread:?}"
    );
    for (i, object) in objects.iter().enumerate() {
        assert_eq!(&compile(&source(100 + i), b.addr()), object);
    }
    assert_eq!((b.stat("compiles"), b.stat("shared_hits")), (0, 12));
    // A chunked entry: its values share a hash tag, so one node holds them all.
    let src = "const unsigned char mid[6 << 20] = { 9 };\nint m(void) { return mid[1]; }\n";
    let object = compile(src, a.addr());
    assert!(eventually(Duration::from_secs(60), || cluster
        .keys_per_node()
        .iter()
        .sum::<usize>()
        == 14));
    assert!(
        compile(src, b.addr()) == object,
        "the chunked object arrived intact"
    );
    assert_eq!((b.stat("compiles"), b.stat("shared_hits")), (0, 13));
}

#[test]
fn redis_stopped_mid_build_costs_misses_only_and_writes_resume_after_its_restart() {
    let mut redis = Redis::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    let a = member(&redis.url(), &key, &[]);
    let first = compile(&source(10), a.addr());
    a.wait_written(1);

    redis.stop();
    // Every job still succeeds: local hits, and compiles for the rest.
    assert_eq!(compile(&source(10), a.addr()), first);
    for i in 11..15 {
        compile(&source(i), a.addr());
    }
    assert_eq!((a.stat("hits"), a.stat("compiles")), (1, 5));
    assert!(a.stat("shared_errors") >= 4, "each failure counted");
    let log = a.server.log();
    assert_eq!(
        log.matches("unavailable").count(),
        1,
        "the outage is logged once: {log}"
    );

    redis.restart();
    // The reconnect is tried at most once a second: new results reach Redis again soon.
    let mut i = 20;
    assert!(
        eventually(Duration::from_secs(60), || {
            i += 1;
            compile(&source(i), a.addr());
            std::thread::sleep(Duration::from_millis(300));
            !redis.keys().is_empty()
        }),
        "writes never resumed"
    );
    assert!(
        a.server.log().contains("reachable again"),
        "{}",
        a.server.log()
    );
}

#[test]
fn a_large_object_crosses_redis_in_chunks_intact() {
    let redis = Redis::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    // Entries as they are: zstd would shrink this zero-filled object to a few KiB, one
    // value, and the chunking under test would not happen.
    let plain = ["--store-compression", "none"];
    let a = member(&redis.url(), &key, &plain);
    let b = member(&redis.url(), &key, &plain);
    // About 20 MiB of initialised data: an object of that size, five 4 MiB chunks.
    let src = "const unsigned char big[20 << 20] = { 1, 2, 3 };\nint g(void) { return big[7]; }\n";
    let from_a = compile(src, a.addr());
    assert!(from_a.len() > 20 << 20);
    a.wait_written(20 << 20);
    assert!(redis.keys().len() >= 6, "{:?}", redis.keys());
    let from_b = compile(src, b.addr());
    assert!(from_a == from_b, "the large object arrived byte-identical");
    assert_eq!((b.stat("compiles"), b.stat("shared_hits")), (0, 1));
    assert!(b.stat("shared_bytes_read") > 20 << 20);
}

#[test]
fn a_slow_redis_does_not_delay_local_hits_and_bounds_misses() {
    let redis = Redis::start();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    let a = member(&redis.url(), &key, &["--shared-deadline", "200"]);
    let first = compile(&source(30), a.addr());
    a.wait_written(1);

    // Redis stops answering for 20 s (DEBUG SLEEP blocks the whole server).
    let mut sleeper = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "20"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // A local hit never asks Redis; a miss waits the deadline at most, then compiles.
    // Both finish long before Redis wakes up (margins wide for a loaded machine).
    assert_eq!(compile(&source(30), a.addr()), first);
    compile(&source(31), a.addr());
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "a sleeping Redis held jobs for {took:?}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!((a.stat("hits"), a.stat("compiles")), (1, 2));
    assert!(a.stat("shared_errors") >= 1);
}

#[test]
fn rediss_carries_the_fleet_over_tls() {
    let redis = Redis::start_tls();
    let secrets = tempfile::tempdir().unwrap();
    let key = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    // rustls trusts the system's roots, or the file SSL_CERT_FILE names.
    let cert = redis.cert();
    let trust = [("SSL_CERT_FILE", cert.to_str().unwrap())];
    let a = member_with(&redis.url(), &key, &[], &trust);
    let b = member_with(&redis.url(), &key, &[], &trust);
    let object = compile(&source(40), a.addr());
    a.wait_written(1);
    assert_eq!(redis.keys().len(), 1);
    assert_eq!(compile(&source(40), b.addr()), object);
    assert_eq!((b.stat("compiles"), b.stat("shared_hits")), (0, 1));
}

#[test]
fn the_shared_tier_needs_a_private_key_file() {
    let secrets = tempfile::tempdir().unwrap();
    let exposed = private_file(secrets.path(), "k", "fleet key 0123456789abcdef\n");
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short = private_file(secrets.path(), "short", "hunter2\n");
    let cache = tempfile::tempdir().unwrap();
    for (extra, hint) in [
        (vec![], "--shared-key-file"),
        (
            vec!["--shared-key-file", exposed.to_str().unwrap()],
            "chmod 600",
        ),
        (
            vec!["--shared-key-file", short.to_str().unwrap()],
            "fewer than 16",
        ),
    ] {
        let out = Command::new(common::SERVER)
            .args(["--listen", "tcp://127.0.0.1:0", "--cache-dir"])
            .arg(cache.path())
            .args(["--shared", "redis://127.0.0.1:1"])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {extra:?}");
        assert!(err.contains(hint), "{extra:?}: {err}");
    }
}
