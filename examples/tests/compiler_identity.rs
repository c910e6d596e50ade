//! No cross-serving, end to end: a real `dcache-server` offering several compilers and
//! the `dcache` wrapper asking for each, for one the server lacks, and through a `gcc`
//! wrapper script on its PATH. Every object is compared with what that very compiler
//! makes locally.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, Server, server_on, stat, stats_json};

/// Source whose object depends on the compiler and on -O3 (a loop gcc vectorizes).
const SOURCE: &str = "int sum(const int *a) { int s = 0; for (int i = 0; i < 1024; i++) s += a[i] * 3; return s; }\n";

/// `dcache COMPILER -c u.c -o OUT` in `dir` against `server`, with `PATH` set to `path`
/// and a DCACHE_DIR of its own under `dir`.
fn dcache(dir: &Path, server: &Server, compiler: &str, out: &str, path: &str) -> Output {
    Command::new(DCACHE)
        .args([compiler, "-c", "u.c", "-o", out])
        .env("DCACHE_HOSTS", &server.addr)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.join(".dcache"))
        .env("PATH", path)
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .current_dir(dir)
        .output()
        .unwrap()
}

/// What `compiler -c u.c` gives in `dir`, run directly.
fn plain(dir: &Path, compiler: &str, path: &str) -> Vec<u8> {
    let st = Command::new(compiler)
        .args(["-c", "u.c", "-o", "plain.o"])
        .env("PATH", path)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(dir.join("plain.o")).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gcc11() -> bool {
    Path::new("/usr/bin/gcc-11").exists()
}

fn serving(cache: &Path, compilers: &str) -> Server {
    server_on(cache, &["--allow-compiler", compilers], &[])
}

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[test]
fn each_compiler_gets_its_own_objects_and_entries() {
    let cache = tempfile::tempdir().unwrap();
    let mut offered = vec!["gcc", "clang"];
    if gcc11() {
        offered.push("gcc-11");
    }
    let s = serving(cache.path(), &offered.join(","));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("u.c"), SOURCE).unwrap();
    let mut objects = Vec::new();
    for round in 0..2 {
        for c in &offered {
            let out = dcache(dir.path(), &s, c, "u.o", PATH);
            assert!(out.status.success(), "{c}: {}", stderr(&out));
            assert_eq!(stderr(&out), "", "{c}: served silently");
            let got = std::fs::read(dir.path().join("u.o")).unwrap();
            assert!(
                got == plain(dir.path(), c, PATH),
                "round {round}: {c} got another compiler's object"
            );
            if round == 0 {
                objects.push(got);
            }
        }
        let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
        // Round 0: each compiled once (no entry shared); round 1: each its own hit.
        assert_eq!(stat(&json, "compiles"), offered.len() as u64, "{json}");
        assert_eq!(
            stat(&json, "hits"),
            if round == 0 { 0 } else { offered.len() as u64 },
            "{json}"
        );
    }
    for (i, a) in objects.iter().enumerate() {
        for b in &objects[i + 1..] {
            assert!(
                a != b,
                "two compilers made one object: the test proves nothing"
            );
        }
    }
}

#[test]
fn a_compiler_the_server_lacks_is_refused_and_compiled_locally_with_one_warning() {
    let cache = tempfile::tempdir().unwrap();
    let s = serving(cache.path(), "gcc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("u.c"), SOURCE).unwrap();
    let mut wanted = vec![("clang", "clang version")];
    if gcc11() {
        wanted.push(("gcc-11", "11.3"));
    }
    for (c, version) in &wanted {
        let out = dcache(dir.path(), &s, c, "u.o", PATH);
        assert!(out.status.success(), "{c}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{c}: one warning line: {err}");
        assert!(
            err.contains(version) && err.contains("12.2") && err.contains("compiling locally"),
            "{c}: the warning names both compilers: {err}"
        );
        assert!(std::fs::read(dir.path().join("u.o")).unwrap() == plain(dir.path(), c, PATH));
    }
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
    assert_eq!(stat(&json, "compiles"), 0, "{json}");
    assert_eq!(stat(&json, "jobs_refused"), wanted.len() as u64, "{json}");
}

#[test]
fn a_gcc_wrapper_script_on_the_path_is_not_served_the_servers_gcc() {
    let cache = tempfile::tempdir().unwrap();
    let s = serving(cache.path(), "gcc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("u.c"), SOURCE).unwrap();
    let bin = tempfile::tempdir().unwrap();
    let script = bin.path().join("gcc");
    std::fs::write(&script, "#!/bin/sh\nexec /usr/bin/gcc -O3 \"$@\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{PATH}", bin.path().display());

    // The server's gcc is cached first, so a wrong answer would be a hit.
    let real = dcache(dir.path(), &s, "gcc", "real.o", PATH);
    assert!(real.status.success(), "{}", stderr(&real));
    let out = dcache(dir.path(), &s, "gcc", "u.o", &path);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no compiler here matches"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let got = std::fs::read(dir.path().join("u.o")).unwrap();
    assert!(
        got == plain(dir.path(), "gcc", &path),
        "not the script's object"
    );
    assert!(
        got != std::fs::read(dir.path().join("real.o")).unwrap(),
        "-O3 must change the object for this test to mean anything"
    );
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
    assert_eq!(
        (stat(&json, "compiles"), stat(&json, "jobs_refused")),
        (1, 1),
        "{json}"
    );
}
