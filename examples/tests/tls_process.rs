//! `dcache-server` on a `tls://` listener as a process, and the `dcache` wrapper talking
//! to it with real gcc: a compile and a hit over TLS (with the shared token inside it),
//! mutual TLS accepted and refused, a wrong CA named in the wrapper's warning, and the
//! server refusing to start on unusable certificate flags. Certificates are made at run
//! time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;
#[path = "../../dcache-transport/tests/pki/mod.rs"]
mod pki;

use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, SERVER, server_at, stat, stats_json};
use pki::{Pki, Validity};

/// Runs `dcache gcc -c SRC -o OUT` in `dir` against `addr` with `envs`, with
/// `dir/.dcache` as its DCACHE_DIR (never the user's own cache).
fn compile(dir: &Path, src: &str, addr: &str, envs: &[(&str, &str)]) -> Output {
    let obj = Path::new(src).with_extension("o");
    let mut cmd = Command::new(DCACHE);
    cmd.args(["gcc", "-c", src, "-o"])
        .arg(&obj)
        .env("DCACHE_HOSTS", addr)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.join(".dcache"))
        .env("DCACHE_DIRECT", "0")
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .env_remove("DCACHE_TLS_CA")
        .env_remove("DCACHE_TLS_CERT")
        .env_remove("DCACHE_TLS_KEY")
        .current_dir(dir);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_compile_and_a_hit_over_tls_with_the_token_inside() {
    let ca = Pki::new("site CA");
    let (cert, key) = ca.server_files(&["127.0.0.1", "localhost"], Validity::Current);
    let token_file = common::private_file(ca.dir.path(), "token", "correct horse battery staple\n");
    let cache = tempfile::tempdir().unwrap();
    let s = server_at(
        "tls://127.0.0.1:0",
        cache.path(),
        &[
            "--tls-cert",
            path(&cert),
            "--tls-key",
            path(&key),
            "--token-file",
            path(&token_file),
        ],
        &[],
    );
    assert!(s.addr.starts_with("tls://127.0.0.1:"), "{}", s.addr);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.c"), "int over_tls(void) { return 7; }\n").unwrap();
    let ca_file = ca.ca();
    let envs = [
        ("DCACHE_TLS_CA", path(&ca_file)),
        ("DCACHE_TOKEN", "correct horse battery staple"),
        ("DCACHE_FALLBACK", "0"),
    ];
    for _ in 0..2 {
        let out = compile(dir.path(), "t.c", &s.addr, &envs);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stderr(&out), "", "compiled remotely, silently");
    }
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str()), envs[0], envs[1]]);
    assert_eq!(
        (stat(&json, "compiles"), stat(&json, "hits")),
        (1, 1),
        "one compile, then a hit, both over TLS: {json}"
    );
    // The object is gcc's own.
    let local = Command::new("gcc")
        .args(["-c", "t.c", "-o", "local.o"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(local.success());
    assert_eq!(
        std::fs::read(dir.path().join("t.o")).unwrap(),
        std::fs::read(dir.path().join("local.o")).unwrap()
    );

    // A client trusting another CA: refused by name, compiled locally with one warning.
    let other = Pki::new("another CA");
    let other_ca = other.ca();
    let out = compile(
        dir.path(),
        "t.c",
        &s.addr,
        &[
            ("DCACHE_TLS_CA", path(&other_ca)),
            ("DCACHE_TOKEN", "correct horse battery staple"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let warning = stderr(&out);
    assert!(warning.contains("compiling locally"), "{warning}");
    assert!(
        warning.contains("not issued by a CA this client trusts"),
        "{warning}"
    );
}

#[test]
fn mutual_tls_serves_only_clients_with_a_certificate_of_the_client_ca() {
    let servers = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let (cert, key) = servers.server_files(&["127.0.0.1"], Validity::Current);
    let client_ca = clients.ca();
    let cache = tempfile::tempdir().unwrap();
    let s = server_at(
        "tls://127.0.0.1:0",
        cache.path(),
        &[
            "--tls-cert",
            path(&cert),
            "--tls-key",
            path(&key),
            "--tls-client-ca",
            path(&client_ca),
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.c"), "int mutual(void) { return 2; }\n").unwrap();
    let server_ca = servers.ca();
    let (ccert, ckey) = clients.client_files();
    let with_cert = [
        ("DCACHE_TLS_CA", path(&server_ca)),
        ("DCACHE_TLS_CERT", path(&ccert)),
        ("DCACHE_TLS_KEY", path(&ckey)),
        ("DCACHE_FALLBACK", "0"),
    ];
    let out = compile(dir.path(), "m.c", &s.addr, &with_cert);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");

    // Without a certificate: no service, and the error says what is missing.
    let out = compile(
        dir.path(),
        "m.c",
        &s.addr,
        &[
            ("DCACHE_TLS_CA", path(&server_ca)),
            ("DCACHE_FALLBACK", "0"),
        ],
    );
    assert!(!out.status.success(), "served without a client certificate");
    assert!(
        stderr(&out).contains("requires a client certificate"),
        "{}",
        stderr(&out)
    );
    let json = stats_json(&[
        ("DCACHE_HOSTS", s.addr.as_str()),
        with_cert[0],
        with_cert[1],
        with_cert[2],
    ]);
    assert_eq!(
        (stat(&json, "compiles"), stat(&json, "hits")),
        (1, 0),
        "the refused client got nothing: {json}"
    );
}

#[test]
fn unusable_tls_flags_stop_the_server_at_start() {
    let ca = Pki::new("CA");
    let (cert, key) = ca.server_files(&["127.0.0.1"], Validity::Current);
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(SERVER)
            .args(["--cache-dir", path(cache.path()), "--insecure-no-sandbox"])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), stderr(&out))
    };
    let missing = ca.dir.path().join("missing-key.pem");
    let (ok, err) = run(&[
        "--listen",
        "tls://127.0.0.1:0",
        "--tls-cert",
        path(&cert),
        "--tls-key",
        path(&missing),
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read the private key file"), "{err}");
    assert!(err.contains("missing-key.pem"), "{err}");

    let (ok, err) = run(&["--listen", "tls://127.0.0.1:0"]);
    assert!(!ok);
    assert!(err.contains("--tls-cert"), "{err}");

    let (ok, err) = run(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--tls-cert",
        path(&cert),
        "--tls-key",
        path(&key),
    ]);
    assert!(
        !ok,
        "a certificate and no tls:// listener must not serve plain TCP"
    );
    assert!(err.contains("no --listen address is tls://"), "{err}");
}
