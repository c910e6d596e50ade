//! A relay as processes: `dcache` → `dcache-server --upstream` → a token-protected
//! `dcache-server`, with real gcc; then the upstream killed, and the build still done.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, server_on, stat, stats_json};

/// `dcache gcc -O2 -c SRC -o OUT` in `dir` against `addr`, its DCACHE_DIR in `dir`.
fn compile(dir: &Path, src: &str, out: &str, addr: &str) -> Output {
    Command::new(DCACHE)
        .args(["gcc", "-O2", "-c", src, "-o", out])
        .env("DCACHE_HOSTS", addr)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.join(".dcache"))
        .env("DCACHE_DIRECT", "0")
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .current_dir(dir)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_relay_in_front_of_a_token_server_caches_and_falls_back() {
    let secrets = tempfile::tempdir().unwrap();
    let token = common::private_file(
        secrets.path(),
        "farm-token",
        "the farm's shared secret token\n",
    );
    let up_cache = tempfile::tempdir().unwrap();
    let mut upstream = server_on(
        up_cache.path(),
        &["--token-file", token.to_str().unwrap()],
        &[],
    );
    let relay_cache = tempfile::tempdir().unwrap();
    let relay = server_on(
        relay_cache.path(),
        &[
            "--upstream",
            &upstream.addr,
            "--upstream-token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.c"),
        "int triple(int x) { return 3 * x; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.c"),
        "int twice(int x) { return 2 * x; }\n",
    )
    .unwrap();
    let plain = Command::new("gcc")
        .args(["-O2", "-c", "a.c", "-o", "plain.o"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(plain.success());

    let first = compile(dir.path(), "a.c", "a1.o", &relay.addr);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(stderr(&first), "", "compiled upstream, silently");
    let second = compile(dir.path(), "a.c", "a2.o", &relay.addr);
    assert!(second.status.success(), "{}", stderr(&second));
    let plain_obj = std::fs::read(dir.path().join("plain.o")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("a1.o")).unwrap(), plain_obj);
    assert_eq!(std::fs::read(dir.path().join("a2.o")).unwrap(), plain_obj);

    let relay_stats = stats_json(&[("DCACHE_HOSTS", relay.addr.as_str())]);
    assert_eq!(stat(&relay_stats, "hits"), 1, "{relay_stats}");
    assert_eq!(stat(&relay_stats, "upstream_jobs"), 1, "{relay_stats}");
    let up_stats = stats_json(&[
        ("DCACHE_HOSTS", upstream.addr.as_str()),
        ("DCACHE_TOKEN_FILE", token.to_str().unwrap()),
    ]);
    assert_eq!(stat(&up_stats, "compiles"), 1, "{up_stats}");

    // The farm is gone: a cached file is still a hit at the relay, a new one compiles
    // locally with one warning, and the build goes on.
    upstream.kill9();
    let third = compile(dir.path(), "a.c", "a3.o", &relay.addr);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(std::fs::read(dir.path().join("a3.o")).unwrap(), plain_obj);
    let new = compile(dir.path(), "b.c", "b.o", &relay.addr);
    assert!(new.status.success(), "{}", stderr(&new));
    assert!(
        stderr(&new).contains("no upstream reachable"),
        "{}",
        stderr(&new)
    );
    assert!(dir.path().join("b.o").exists());
}

#[test]
fn a_relay_compressing_to_its_upstream_serves_gccs_object() {
    let up_cache = tempfile::tempdir().unwrap();
    let upstream = server_on(up_cache.path(), &[], &[]);
    let relay_cache = tempfile::tempdir().unwrap();
    // The upstream is on loopback, where `auto` would not compress: `always` makes both
    // directions go through zstd frames.
    let relay = server_on(
        relay_cache.path(),
        &[
            "--upstream",
            &upstream.addr,
            "--upstream-compress",
            "always",
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    // Large and repetitive, so compressed frames are what crosses.
    let body: String = (0..2000)
        .map(|i| format!("int f{i}(int x) {{ return x * {i} + 1; }}\n"))
        .collect();
    std::fs::write(dir.path().join("big.c"), &body).unwrap();
    let plain = Command::new("gcc")
        .args(["-O2", "-c", "big.c", "-o", "plain.o"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(plain.success());
    let out = compile(dir.path(), "big.c", "big.o", &relay.addr);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "compiled upstream, silently");
    assert_eq!(
        std::fs::read(dir.path().join("big.o")).unwrap(),
        std::fs::read(dir.path().join("plain.o")).unwrap()
    );
    let up_stats = stats_json(&[("DCACHE_HOSTS", upstream.addr.as_str())]);
    assert_eq!(stat(&up_stats, "compiles"), 1, "{up_stats}");
}
