//! The command lines' edges, end to end with the real binaries and gcc: names and
//! versions, bad options and variables, output modes, host health shared by processes,
//! and the counts of what ran without the cache. Every run has its own DCACHE_DIR.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, SERVER, stat};

/// `dcache ARGS…` in `dir` with DCACHE_DIR `cache`, no servers unless `envs` names some.
fn dcache(dir: &Path, cache: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(DCACHE);
    cmd.args(args)
        .current_dir(dir)
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .env_remove("DCACHE_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn source_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.c"), "int a(int x) { return x * 7; }\n").unwrap();
    // Past the freshness rule: a source this new is compiled the preprocessor's
    // way and not recorded, and whether the next compile still sees it as new would
    // depend on the machine's load (a cold compile then a depend-mode miss, not a hit).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dir
}

#[test]
fn output_into_a_closed_pipe_is_dropped_without_a_panic() {
    // `dcache --stats | head -1`: the reader is gone before the writer writes. The read
    // end is closed before the process starts, so every write meets EPIPE.
    let dir = tempfile::tempdir().unwrap();
    for (bin, args) in [
        (DCACHE, &["--stats"][..]),
        (DCACHE, &["--help"][..]),
        (DCACHE, &["--version"][..]),
        (SERVER, &["--print-config"][..]),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin)
            .args(args)
            .env("DCACHE_DIR", dir.path().join("cache"))
            .env_remove("DCACHE_HOSTS")
            .stdout(writer)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{bin} {args:?}: {err}");
        assert!(out.status.success(), "{bin} {args:?}: {err}");
    }
}

#[test]
fn versions_and_help_name_the_binary_itself() {
    let v = Command::new(DCACHE).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8(v.stdout).unwrap(),
        format!("dcache {}\n", env!("CARGO_PKG_VERSION"))
    );
    let v = Command::new(SERVER).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(v.stdout).unwrap(),
        format!("dcache-server {}\n", env!("CARGO_PKG_VERSION"))
    );
    let h = Command::new(SERVER).arg("--help").output().unwrap();
    let help = String::from_utf8(h.stdout).unwrap();
    assert!(
        help.starts_with("dcache-server: the dcache compile server"),
        "{help}"
    );
    assert!(help.contains("Usage: dcache-server"), "{help}");
    assert!(
        !help.contains("examples"),
        "the package's name leaked: {help}"
    );
    // --allow-compiler takes names, resolved in --compiler-path (not PATH).
    let allow = help.split("--allow-compiler").nth(1).unwrap();
    let allow = allow.split("--compiler-path <").next().unwrap();
    assert!(
        allow.contains("<NAMES>") && allow.contains("--compiler-path"),
        "{allow}"
    );
}

#[test]
fn unknown_options_and_bad_values_are_errors_that_name_them() {
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    let o = dcache(dir.path(), cache.path(), &["--frobnicate"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "dcache: unknown option --frobnicate (dcache --help lists them)\n"
    );
    let compile = ["gcc", "-c", "a.c"];
    for (var, value) in [
        ("DCACHE_DIRECT", "banana"),
        ("DCACHE_FALLBACK", "maybe"),
        ("DCACHE_LOG", "nonsense"),
        ("DCACHE_CONNECT_TIMEOUT", "soon"),
    ] {
        let o = dcache(dir.path(), cache.path(), &compile, &[(var, value)]);
        assert_eq!(o.status.code(), Some(2), "{var}={value}");
        let e = stderr(&o);
        assert!(
            e.starts_with(&format!("dcache: {var}: \"{value}\"")),
            "{var}={value}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    assert!(!dir.path().join("a.o").exists());
}

#[test]
fn a_typo_in_dcache_hosts_warns_and_compiles_locally() {
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    let plain = Command::new("gcc")
        .args(["-c", "a.c", "-o", "plain.o"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(plain.success());
    let o = dcache(
        dir.path(),
        cache.path(),
        &["gcc", "-c", "a.c"],
        &[("DCACHE_HOSTS", "tpc://127.0.0.1:3633")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("DCACHE_HOSTS: \"tpc://127.0.0.1:3633\" has an unknown scheme"),
        "{e}"
    );
    assert!(e.contains("compiling locally"), "{e}");
    assert_eq!(
        std::fs::read(dir.path().join("a.o")).unwrap(),
        std::fs::read(dir.path().join("plain.o")).unwrap()
    );
    // The embedded cache was not used instead: the user asked for servers.
    let s = dcache(dir.path(), cache.path(), &["--stats", "--json"], &[]);
    let json = String::from_utf8(s.stdout).unwrap();
    assert_eq!(stat(&json, "compiles"), 0, "{json}");
    // With DCACHE_FALLBACK=0 that is an error, and nothing is compiled.
    std::fs::remove_file(dir.path().join("a.o")).unwrap();
    let o = dcache(
        dir.path(),
        cache.path(),
        &["gcc", "-c", "a.c"],
        &[("DCACHE_HOSTS", "nope"), ("DCACHE_FALLBACK", "0")],
    );
    assert!(!o.status.success());
    assert!(!dir.path().join("a.o").exists());
}

#[test]
fn logs_on_a_redirected_stderr_carry_no_colour_codes() {
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    let o = dcache(
        dir.path(),
        cache.path(),
        &["gcc", "-c", "a.c"],
        &[("DCACHE_LOG", "debug")],
    );
    assert!(o.status.success());
    let e = stderr(&o);
    assert!(e.contains("DEBUG"), "debug logs are shown: {e}");
    assert!(
        !e.contains('\u{1b}'),
        "escape codes in a redirected log: {e:?}"
    );
}

/// Runs `script` with `sh -c` under umask 027 in `dir`.
fn under_umask(dir: &Path, cache: &Path, script: &str) {
    let o = Command::new("sh")
        .args(["-c", &format!("umask 027 && {script}")])
        .current_dir(dir)
        .env("DCACHE_DIR", cache)
        .env("DCACHE", DCACHE)
        .env_remove("DCACHE_HOSTS")
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", stderr(&o));
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn outputs_get_the_mode_gcc_gives_them_under_the_umask() {
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    under_umask(dir.path(), cache.path(), "gcc -MD -c a.c -o plain.o");
    assert_eq!(mode(&dir.path().join("plain.o")), 0o640, "gcc's own");
    // Cold (compiled), then warm (a direct-mode hit: the wrapper writes the object and
    // the dependency file itself).
    for round in ["cold", "warm"] {
        for f in ["via.o", "via.d"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        under_umask(
            dir.path(),
            cache.path(),
            "\"$DCACHE\" gcc -MD -c a.c -o via.o",
        );
        for f in ["via.o", "via.d"] {
            assert_eq!(
                format!("{:o}", mode(&dir.path().join(f))),
                format!("{:o}", mode(&dir.path().join(f.replace("via", "plain")))),
                "{round} {f}"
            );
        }
    }
    let s = dcache(dir.path(), cache.path(), &["--stats", "--json"], &[]);
    let json = String::from_utf8(s.stdout).unwrap();
    assert_eq!(stat(&json, "hits"), 1, "the warm round was a hit: {json}");
}

/// A TCP listener that accepts connections and never answers: a hung server. Counts the
/// connections it accepted.
fn hung_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s); // kept open, never read or written
        }
    });
    (addr, accepted)
}

#[test]
fn a_hung_server_is_named_once_and_skipped_by_every_later_process() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = hung_server();
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("DCACHE_HOSTS", addr.as_str()),
        ("DCACHE_CONNECT_TIMEOUT", "0.5"),
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        ("DCACHE_DAEMON", "0"),
    ];
    let first = dcache(dir.path(), cache.path(), &["gcc", "-c", "a.c"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    let e = stderr(&first);
    // The real cause, the address once.
    assert_eq!(
        e,
        format!(
            "dcache: no server reachable: {addr}: connection lost: handshake timed out; compiling locally\n"
        )
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        let later = dcache(dir.path(), cache.path(), &["gcc", "-c", "a.c"], &env);
        assert!(later.status.success());
        let e = stderr(&later);
        assert!(e.contains("handshake timed out (skipped for"), "{e}");
        assert_eq!(e.matches(&addr).count(), 1, "{e}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a later process connected to the host another one found hung"
    );
}

#[test]
fn parallel_processes_share_one_record_of_a_dead_host() {
    let dead = common::dead_address();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for i in 0..8 {
        std::fs::write(dir.path().join(format!("f{i}.c")), format!("int f{i};\n")).unwrap();
    }
    // As make -j8 starts them: all at once.
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(DCACHE)
                .args(["gcc", "-c", &format!("f{i}.c")])
                .current_dir(dir.path())
                .env("DCACHE_DIR", cache.path())
                .env("DCACHE_HOSTS", &dead)
                // Straight to the server: the relay daemon has its own tests (daemon.rs).
                .env("DCACHE_DAEMON", "0")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&format!("{dead}: connection refused")), "{e}");
        assert_eq!(e.matches(&dead).count(), 1, "{e}");
    }
    for i in 0..8 {
        assert!(dir.path().join(format!("f{i}.o")).exists());
    }
    let records: Vec<_> = std::fs::read_dir(cache.path().join("hosts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        records.len(),
        1,
        "one record, no temporary files: {records:?}"
    );
}

#[test]
fn what_runs_without_the_cache_is_counted_by_reason_and_said_once_per_build() {
    let dir = source_dir();
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let o = dcache(dir.path(), cache.path(), args, envs);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stderr(&o)
    };
    // Cached: two compiles.
    assert_eq!(run(&["gcc", "-c", "a.c"], &[]), "");
    assert_eq!(run(&["gcc", "-c", "a.c"], &[]), "");
    // A link and a preprocessor run: counted, but they are not compiles and never make
    // a build "mostly uncached".
    run(&["gcc", "a.o", "-shared", "-o", "liba.so"], &[]);
    run(&["gcc", "-E", "a.c", "-o", "a.i"], &[]);
    // Compiles that must run locally: after enough of them to outnumber the cached ones
    // (and at least five), one of these processes says so; the others stay quiet.
    let mut said = Vec::new();
    for _ in 0..8 {
        let e = run(&["gcc", "-march=native", "-c", "a.c"], &[]);
        if !e.is_empty() {
            said.push(e);
        }
    }
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].starts_with("dcache: 5 of 7 compiles so far in this build ran without the cache (5 of them: unsupported option -march=native)"),
        "{}",
        said[0]
    );
    assert_eq!(said[0].lines().count(), 1);
    let s = dcache(dir.path(), cache.path(), &["--stats", "--json"], &[]);
    let json = String::from_utf8(s.stdout).unwrap();
    assert_eq!(stat(&json, "cacheable_calls"), 2, "{json}");
    assert_eq!(stat(&json, "uncacheable_calls"), 10, "{json}");
    assert_eq!(
        stat(&json, "uncacheable: unsupported option -march=native"),
        8,
        "{json}"
    );
    assert_eq!(
        stat(&json, "uncacheable: no -c or -S (linking)"),
        1,
        "{json}"
    );
    assert_eq!(
        stat(&json, "uncacheable: preprocessor output requested"),
        1,
        "{json}"
    );
    let text = dcache(dir.path(), cache.path(), &["--stats"], &[]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("uncacheable: unsupported option -march=native"),
        "{text}"
    );
    // --zero-stats forgets the counts.
    assert!(
        dcache(dir.path(), cache.path(), &["--zero-stats"], &[])
            .status
            .success()
    );
    let s = dcache(dir.path(), cache.path(), &["--stats", "--json"], &[]);
    let json = String::from_utf8(s.stdout).unwrap();
    assert_eq!(stat(&json, "uncacheable_calls"), 0, "{json}");
    // Below the default level, silence: a fresh cache directory, a build all uncached.
    let quiet = tempfile::tempdir().unwrap();
    for _ in 0..8 {
        let o = dcache(
            dir.path(),
            quiet.path(),
            &["gcc", "-march=native", "-c", "a.c"],
            &[("DCACHE_LOG", "error")],
        );
        assert_eq!(stderr(&o), "");
    }
}
