//! `dcache-server` as a process: the shared token, and crash safety under SIGKILL in the
//! middle of a compile and in the middle of writing a cache entry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{DCACHE, server_on, stat, stats_json};

/// Runs `dcache cc -c SRC -o OUT` in `dir` against `addr`, with `dir/.dcache` as its
/// DCACHE_DIR (never the user's own cache).
fn compile(dir: &Path, compiler: &str, src: &str, addr: &str, envs: &[(&str, &str)]) -> Output {
    let obj = Path::new(src).with_extension("o");
    let mut cmd = Command::new(DCACHE);
    cmd.args([compiler, "-c", src, "-o"])
        .arg(&obj)
        .env("DCACHE_HOSTS", addr)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.join(".dcache"))
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .current_dir(dir);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_token_protected_server_serves_only_clients_holding_the_token() {
    let cache = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let token_file =
        common::private_file(secrets.path(), "token", "correct horse battery staple\n");
    let s = server_on(
        cache.path(),
        &["--token-file", token_file.to_str().unwrap()],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.c"), "int ok(void) { return 1; }\n").unwrap();
    let good = [("DCACHE_TOKEN", "correct horse battery staple")];
    let stats = || stats_json(&[("DCACHE_HOSTS", s.addr.as_str()), good[0]]);

    let out = compile(dir.path(), "gcc", "ok.c", &s.addr, &good);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "a good token compiles remotely, silently");
    let json = stats();
    assert_eq!(
        (stat(&json, "compiles"), stat(&json, "hits")),
        (1, 0),
        "{json}"
    );

    // The same token read from a file (trailing newline and all) is a hit.
    let file = [("DCACHE_TOKEN_FILE", token_file.to_str().unwrap())];
    let out = compile(dir.path(), "gcc", "ok.c", &s.addr, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stat(&stats(), "hits"), 1);

    // Without the token, or with another one: refused, compiled locally, one warning
    // line that says what to fix; the server served nothing.
    for (envs, hint) in [
        (vec![], "DCACHE_TOKEN"),
        (
            vec![("DCACHE_TOKEN", "a wrong guess, long enough")],
            "DCACHE_TOKEN",
        ),
    ] {
        std::fs::remove_file(dir.path().join("ok.o")).unwrap();
        let out = compile(dir.path(), "gcc", "ok.c", &s.addr, &envs);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(dir.path().join("ok.o").exists(), "compiled locally");
        let warning = stderr(&out);
        assert_eq!(warning.lines().count(), 1, "{warning}");
        assert!(warning.contains("compiling locally"), "{warning}");
        assert!(warning.contains(hint), "{warning}");

        let out = compile(
            dir.path(),
            "gcc",
            "ok.c",
            &s.addr,
            &[envs.as_slice(), &[("DCACHE_FALLBACK", "0")]].concat(),
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains("authentication"), "{}", stderr(&out));
    }
    let json = stats();
    assert_eq!(
        (
            stat(&json, "compiles"),
            stat(&json, "hits"),
            stat(&json, "misses")
        ),
        (1, 1, 1),
        "refused clients got no service: {json}"
    );
}

/// `dcache-server` with `args` that must refuse to start: its exit status and stderr.
fn refused(args: &[&str]) -> (bool, String) {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(common::SERVER)
        .args(["--listen", "tcp://127.0.0.1:0", "--cache-dir"])
        .arg(cache.path())
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), stderr(&out))
}

#[test]
fn weak_or_exposed_tokens_are_refused_at_start() {
    let secrets = tempfile::tempdir().unwrap();
    let short = common::private_file(secrets.path(), "short", "hunter2\n");
    let (ok, err) = refused(&["--token-file", short.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("fewer than 16"), "{err}");
    assert!(err.contains("/dev/urandom"), "says how to make one: {err}");
    let open = secrets.path().join("open");
    std::fs::write(&open, "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = refused(&["--token-file", open.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");
    // The client refuses a short token too, rather than sending a guessable proof.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.c"), "int t;\n").unwrap();
    let out = compile(
        dir.path(),
        "gcc",
        "t.c",
        "tcp://127.0.0.1:9",
        &[("DCACHE_TOKEN", "hunter2")],
    );
    assert!(stderr(&out).contains("fewer than 16"), "{}", stderr(&out));
}

#[test]
fn without_a_sandbox_a_server_beyond_loopback_refuses_to_start() {
    // A launcher that cannot confine anything stands for a kernel without Landlock.
    let no_sandbox = ["--sandbox-launcher", "/bin/false"];
    let (ok, err) = refused(&[&no_sandbox[..], &["--allow", "10.0.0.0/8"]].concat());
    assert!(!ok);
    assert!(err.contains("refusing to serve beyond loopback"), "{err}");
    assert!(err.contains("--insecure-no-sandbox"), "{err}");
    // --check-sandbox says so and fails; with the real launcher it lists what is active.
    let out = Command::new(common::SERVER)
        .args(["--check-sandbox", "--sandbox-launcher", "/bin/false"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT AVAILABLE"));
    let out = Command::new(common::SERVER)
        .arg("--check-sandbox")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report} {}", stderr(&out));
    assert!(report.contains("filesystem confined: yes"), "{report}");
    assert!(report.contains("network unreachable: yes"), "{report}");
    // Loopback only, the server starts (with a warning) even without a sandbox.
    let cache = tempfile::tempdir().unwrap();
    let s = server_on(cache.path(), &no_sandbox, &[]);
    assert!(s.addr.starts_with("tcp://127.0.0.1:"));
}

/// A compiler named `cc` that runs gcc, and tells the test when it starts and ends. The
/// file `delay` next to it holds seconds to sleep before compiling from stdin (as the
/// server runs it: a local compile of the client's file does not wait). The server clears
/// the environment of compilers, so everything it needs is found next to it. Clients
/// invoke it by its path ([`stand_in`]): only a client of this very compiler is served by
/// it.
fn slow_compiler() -> tempfile::TempDir {
    let bin = tempfile::tempdir().unwrap();
    let script = bin.path().join("cc");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         d=$(dirname \"$0\")\n\
         case \"$1\" in --version|-dumpmachine|-print-prog-name=*) exec gcc \"$1\";; esac\n\
         case \" $* \" in *' - '*) touch \"$d/started\"; sleep \"$(cat \"$d/delay\")\";; esac\n\
         exec gcc \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(bin.path().join("delay"), "0").unwrap();
    bin
}

/// The slow compiler's path, as its clients invoke it.
fn stand_in(bin: &tempfile::TempDir) -> String {
    bin.path().join("cc").to_str().unwrap().to_owned()
}

fn server_with(cache: &Path, bin: &Path) -> common::Server {
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());
    // Unconfined: the stand-in compiler signals the test through files beside itself,
    // outside any job directory, which the sandbox (rightly) forbids.
    server_on(
        cache,
        &[
            "--allow-compiler",
            "cc",
            "--compiler-path",
            &path,
            "--insecure-no-sandbox",
            // Entries as they are: the kill test needs its 32 MiB entry (zeros, which zstd
            // shrinks to a few KiB) to take long enough to write that the kill lands
            // inside the write.
            "--store-compression",
            "none",
        ],
        &[],
    )
}

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What plain gcc makes of `src`, for comparison.
fn reference_object(dir: &Path, src: &str) -> Vec<u8> {
    let out = dir.join("reference.o");
    let status = Command::new("gcc")
        .args(["-c", src, "-o"])
        .arg(&out)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

#[test]
fn a_server_killed_mid_compile_restarts_with_a_working_cache() {
    let cache = tempfile::tempdir().unwrap();
    let bin = slow_compiler();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.c"),
        "int f(int x) { return x * 3 + 1; }\n",
    )
    .unwrap();
    let expected = reference_object(dir.path(), "f.c");
    let strict = [("DCACHE_FALLBACK", "0")];

    let mut s = server_with(cache.path(), bin.path());
    std::fs::write(bin.path().join("delay"), "5").unwrap();
    let client = {
        let (dir, addr, cc) = (dir.path().to_owned(), s.addr.clone(), stand_in(&bin));
        std::thread::spawn(move || compile(&dir, &cc, "f.c", &addr, &strict))
    };
    wait_for(&bin.path().join("started"), Duration::from_secs(20));
    s.kill9();
    let out = client.join().unwrap();
    assert!(!out.status.success(), "the compile died with the server");
    assert!(
        !dir.path().join("f.o").exists(),
        "nothing written on failure"
    );

    std::fs::write(bin.path().join("delay"), "0").unwrap();
    let s = server_with(cache.path(), bin.path());
    let out = compile(dir.path(), &stand_in(&bin), "f.c", &s.addr, &strict);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("f.o")).unwrap(), expected);
    let out = compile(dir.path(), &stand_in(&bin), "f.c", &s.addr, &strict);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("f.o")).unwrap(), expected);
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
    assert_eq!(
        (stat(&json, "compiles"), stat(&json, "hits")),
        (1, 1),
        "{json}"
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_server_killed_while_writing_an_entry_never_serves_it_torn() {
    let cache = tempfile::tempdir().unwrap();
    let bin = slow_compiler();
    let dir = tempfile::tempdir().unwrap();
    // A 32 MiB object: its entry takes long enough to write that the kill lands inside.
    std::fs::write(
        dir.path().join("big.c"),
        "char big[32 << 20] = {1};\nint get(int i) { return big[i]; }\n",
    )
    .unwrap();
    let expected = reference_object(dir.path(), "big.c");
    let strict = [("DCACHE_FALLBACK", "0")];
    let tmp = cache.path().join("v1").join("tmp");

    let mut caught = 0;
    for attempt in 0..5 {
        let mut s = server_with(cache.path(), bin.path());
        let leftovers: Vec<PathBuf> = files_in(&tmp);
        let client = {
            let (dir, addr, cc) = (dir.path().to_owned(), s.addr.clone(), stand_in(&bin));
            std::thread::spawn(move || compile(&dir, &cc, "big.c", &addr, &strict))
        };
        // Kill the moment a new temporary entry file appears: mid-write.
        let start = Instant::now();
        let mut killed_mid_write = false;
        while start.elapsed() < Duration::from_secs(30) {
            if files_in(&tmp).iter().any(|f| !leftovers.contains(f)) {
                let _ = s.child.kill(); // SIGKILL
                let _ = s.child.wait();
                killed_mid_write = true;
                break;
            }
            if client.is_finished() {
                break;
            }
        }
        let _ = client.join().unwrap();
        drop(s);
        // A write that was really cut off leaves its temporary file behind.
        if killed_mid_write && files_in(&tmp).iter().any(|f| !leftovers.contains(f)) {
            caught += 1;
        }
        // Restarted on the same directory, the server answers with the right object,
        // whether the entry made it to disk whole or not at all.
        let s = server_with(cache.path(), bin.path());
        for _ in 0..2 {
            std::fs::remove_file(dir.path().join("big.o")).ok();
            let out = compile(dir.path(), &stand_in(&bin), "big.c", &s.addr, &strict);
            assert!(out.status.success(), "attempt {attempt}: {}", stderr(&out));
            assert!(
                std::fs::read(dir.path().join("big.o")).unwrap() == expected,
                "attempt {attempt}: a wrong object was served"
            );
        }
        let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
        // The entry made it whole (two hits) or not at all (a compile, then a hit).
        let (hits, compiles) = (stat(&json, "hits"), stat(&json, "compiles"));
        assert!(
            hits >= 1 && hits + compiles == 2,
            "the second request hits: {json}"
        );
        drop(s);
        // Start over with an empty cache, so the next attempt writes the entry again.
        for sub in files_in(&cache.path().join("v1")) {
            if sub != tmp {
                std::fs::remove_dir_all(&sub).ok();
            }
        }
        if caught >= 2 {
            break;
        }
    }
    eprintln!("kills that landed mid-write: {caught}");
    assert!(caught >= 1, "no kill landed mid-write in 5 attempts");
}

#[test]
fn two_servers_share_one_disk_cache() {
    let cache = tempfile::tempdir().unwrap();
    let a = server_on(cache.path(), &[], &[]);
    let b = server_on(cache.path(), &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.c"), "int s(int x) { return x << 2; }\n").unwrap();
    let strict = [("DCACHE_FALLBACK", "0")];
    let out = compile(dir.path(), "gcc", "s.c", &a.addr, &strict);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read(dir.path().join("s.o")).unwrap();
    // A stores in the background after answering: wait until it has.
    let wait = Instant::now();
    while stat(
        &stats_json(&[("DCACHE_HOSTS", a.addr.as_str())]),
        "stored_entries",
    ) == 0
    {
        assert!(wait.elapsed() < Duration::from_secs(10), "A never stored");
        std::thread::sleep(Duration::from_millis(20));
    }
    // B started before A wrote the entry; it finds it on the shared disk.
    std::fs::remove_file(dir.path().join("s.o")).unwrap();
    let out = compile(dir.path(), "gcc", "s.c", &b.addr, &strict);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("s.o")).unwrap(), first);
    let json = stats_json(&[("DCACHE_HOSTS", b.addr.as_str())]);
    assert_eq!(
        (stat(&json, "hits"), stat(&json, "compiles")),
        (1, 0),
        "{json}"
    );
}

#[test]
fn a_stuck_server_costs_a_bounded_wait_then_a_local_compile() {
    // The server accepts the job and never answers it (its compiler sleeps for an hour).
    let cache = tempfile::tempdir().unwrap();
    let bin = slow_compiler();
    std::fs::write(bin.path().join("delay"), "3600").unwrap();
    let s = server_with(cache.path(), bin.path());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.c"), "int g(int x) { return x - 7; }\n").unwrap();
    let expected = reference_object(dir.path(), "g.c");
    let started = Instant::now();
    let out = compile(
        dir.path(),
        &stand_in(&bin),
        "g.c",
        &s.addr,
        &[("DCACHE_TIMEOUT", "2")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("g.o")).unwrap(), expected);
    let warning = stderr(&out);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(warning.contains("compiling locally"), "{warning}");
    // Well under the hour the compile would take (and under the server's 300 s limit).
    assert!(started.elapsed() < Duration::from_secs(120));
    // With fallback off, the timeout is an error, not a hang.
    let out = compile(
        dir.path(),
        &stand_in(&bin),
        "g.c",
        &s.addr,
        &[("DCACHE_TIMEOUT", "2"), ("DCACHE_FALLBACK", "0")],
    );
    assert!(!out.status.success());
}
