//! The wrapper's local daemon end to end: real `dcache` processes, real gcc, the real
//! Unix socket, each test in a `DCACHE_DIR` of its own (daemons found by that directory,
//! and stopped at the end of every test).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::DCACHE;

/// Generous: a daemon starts in milliseconds, but these tests run beside others on two
/// busy cores.
const PATIENCE: Duration = Duration::from_secs(60);

/// A project directory and a `DCACHE_DIR`, with the daemons of that directory stopped
/// when dropped.
struct Setup {
    work: tempfile::TempDir,
    cache: PathBuf,
    _cache_root: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().canonicalize().unwrap().join("cache");
        Self {
            work,
            cache,
            _cache_root: root,
        }
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// `dcache ARGS` in the project directory with this cache and `envs`.
    fn dcache(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(DCACHE);
        cmd.args(args)
            .current_dir(self.dir())
            .env_remove("DCACHE_HOSTS")
            .env_remove("DCACHE_DAEMON")
            .env_remove("DCACHE_LOG")
            .env("DCACHE_DIR", &self.cache)
            // Long enough never to expire during a test; stopped at the end.
            .env("DCACHE_DAEMON_IDLE", "600");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// Compiles `src` to `obj` through dcache and checks it succeeded.
    fn compile(&self, src: &str, obj: &str, envs: &[(&str, &str)]) -> Output {
        let out = self.dcache(&["gcc", "-O2", "-c", src, "-o", obj], envs);
        assert!(
            out.status.success(),
            "dcache gcc -c {src}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The object plain gcc makes of `src`.
    fn reference(&self, src: &str) -> Vec<u8> {
        let obj = self.dir().join(format!("{src}.ref.o"));
        let st = Command::new("gcc")
            .args(["-O2", "-c", src, "-o"])
            .arg(&obj)
            .current_dir(self.dir())
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(obj).unwrap()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir().join(name), text).unwrap();
    }

    fn daemon_dir(&self) -> PathBuf {
        self.cache.join("daemon")
    }

    fn sockets(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.daemon_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The daemon processes of this `DCACHE_DIR`.
    fn daemons(&self) -> Vec<u32> {
        daemons_of(&self.cache)
    }

    /// Compiles until one daemon runs (the first compile may have started it without
    /// waiting for it) and returns its pid.
    fn started_daemon(&self) -> u32 {
        self.write("start.c", "int start(void) { return 1; }\n");
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.compile("start.c", "start.o", &[]);
            let d = self.daemons();
            if d.len() == 1 && !self.sockets().is_empty() {
                return d[0];
            }
            assert!(Instant::now() < deadline, "no daemon started: {d:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new(DCACHE)
            .arg("--stop-daemon")
            .env("DCACHE_DIR", &self.cache)
            .output();
        for pid in self.daemons() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Processes running `dcache --daemon` with `DCACHE_DIR=dir` (the wrapper starts them
/// with the absolute directory).
fn daemons_of(dir: &Path) -> Vec<u32> {
    let wanted = format!("DCACHE_DIR={}", dir.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() < 2 || args[1] != b"--daemon" || !args[0].ends_with(b"dcache") {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A C file that takes gcc a noticeable moment at -O2.
fn heavy_source(seed: usize) -> String {
    let mut s = String::new();
    for i in 0..60 {
        s.push_str(&format!(
            "int f{seed}_{i}(int *a, int n) {{ int s = {i}; for (int j = 0; j < n; j++) \
             s += a[j] * (j ^ {i}) + (s >> 3); return s; }}\n"
        ));
    }
    s
}

#[test]
fn racing_starts_end_with_exactly_one_daemon() {
    let s = Setup::new();
    for i in 0..8 {
        s.write(
            &format!("r{i}.c"),
            &format!("int r{i}(int x) {{ return x + {i}; }}\n"),
        );
    }
    // Eight compiles at once, like the first wave of `make -j8`, none with a daemon yet.
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(DCACHE)
                .args([
                    "gcc",
                    "-O2",
                    "-c",
                    &format!("r{i}.c"),
                    "-o",
                    &format!("r{i}.o"),
                ])
                .current_dir(s.dir())
                .env_remove("DCACHE_HOSTS")
                .env_remove("DCACHE_DAEMON")
                .env("DCACHE_DIR", &s.cache)
                .env("DCACHE_DAEMON_IDLE", "600")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for i in 0..8 {
        let src = format!("r{i}.c");
        assert_eq!(
            std::fs::read(s.dir().join(format!("r{i}.o"))).unwrap(),
            s.reference(&src),
            "{src}"
        );
    }
    // Daemons that lost the race exit at once; exactly one stays.
    wait_for("one daemon", || s.daemons().len() == 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.daemons().len(), 1, "{:?}", s.daemons());
    assert_eq!(s.sockets().len(), 1);
}

#[test]
fn later_compiles_reuse_the_daemon_and_stats_show_it() {
    let s = Setup::new();
    let pid = s.started_daemon();
    s.write("a.c", "int a(int x) { return x * 3; }\n");
    let reference = s.reference("a.c");
    for i in 0..3 {
        // Direct mode off: every compile goes to the daemon with its preprocessed source.
        let out = s.compile(
            "a.c",
            &format!("a{i}.o"),
            &[("DCACHE_LOG", "debug"), ("DCACHE_DIRECT", "0")],
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("from unix://"), "{log}");
        assert_eq!(
            std::fs::read(s.dir().join(format!("a{i}.o"))).unwrap(),
            reference
        );
    }
    assert_eq!(s.daemons(), vec![pid]);
    let stats = s.dcache(&["--stats"], &[]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains(&format!("(pid {pid})")), "{text}");
    // The compiles were counted in the local cache's totals: two of the three hit.
    let json = String::from_utf8(s.dcache(&["--stats", "--json"], &[]).stdout).unwrap();
    assert!(common::stat(&json, "hits") >= 2, "{json}");
}

/// Found on bzip2 with Debian's flags (`bzip2.c` warns about `fchown`): through the daemon,
/// depend mode compiled a file with warnings here and recorded it without its
/// diagnostics, and the daemon does not vouch for them (it compiles elsewhere), so every
/// warm build compiled the file again. Now the entry keeps the local compile's exact
/// stderr, and the warm compile is a direct hit that prints gcc's very bytes.
#[test]
fn a_result_with_warnings_through_the_daemon_is_a_direct_hit_with_gccs_stderr() {
    let s = Setup::new();
    s.started_daemon();
    s.write("w.c", "int f(int a)\n{\n  int unused;\n  return a;\n}\n");
    // Past the freshness rule, so the first compile records a direct-mode entry.
    std::thread::sleep(Duration::from_millis(1100));
    let args = ["gcc", "-Wall", "-O2", "-c", "w.c", "-o", "w.o"];
    let gcc = Command::new("gcc")
        .args(&args[1..5])
        .args(["-o", "plain.o"])
        .current_dir(s.dir())
        .env_remove("COLUMNS")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gcc.stderr).contains("unused variable"),
        "gcc warns"
    );
    let cold = s.dcache(&args, &[("DCACHE_LOG", "dcache_client=debug")]);
    let log = String::from_utf8_lossy(&cold.stderr);
    assert!(log.contains("depend mode compiled and recorded"), "{log}");
    let warm = s.dcache(&args, &[("DCACHE_LOG", "dcache_client=debug")]);
    let log = String::from_utf8_lossy(&warm.stderr);
    assert!(log.contains("direct hit from unix://"), "{log}");
    assert!(!log.contains("depend mode compiled"), "{log}");
    let quiet = s.dcache(&args, &[]);
    assert!(quiet.status.success());
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        String::from_utf8_lossy(&gcc.stderr),
        "not gcc's stderr byte for byte"
    );
    assert_eq!(
        std::fs::read(s.dir().join("w.o")).unwrap(),
        std::fs::read(s.dir().join("plain.o")).unwrap()
    );
}

#[test]
fn an_idle_daemon_exits_by_itself() {
    let s = Setup::new();
    s.write("i.c", "int i(void) { return 7; }\n");
    let deadline = Instant::now() + PATIENCE;
    loop {
        s.compile("i.c", "i.o", &[("DCACHE_DAEMON_IDLE", "1")]);
        if !s.daemons().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no daemon started");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("the idle daemon to exit", || s.daemons().is_empty());
    wait_for("its socket to go", || s.sockets().is_empty());
}

#[test]
fn stop_daemon_stops_it() {
    let s = Setup::new();
    let pid = s.started_daemon();
    let out = s.dcache(&["--stop-daemon"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    wait_for("the daemon to exit", || s.daemons().is_empty());
    assert!(s.sockets().is_empty());
    let again = s.dcache(&["--stop-daemon"], &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("no daemon running"));
}

#[test]
fn a_stale_socket_after_kill_9_is_replaced() {
    let s = Setup::new();
    let pid = s.started_daemon();
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for("the killed daemon to go", || !s.daemons().contains(&pid));
    assert_eq!(s.sockets().len(), 1, "the socket file is left behind");
    s.write("k.c", "int k(int x) { return x - 1; }\n");
    let reference = s.reference("k.c");
    // Compiles go on at once (in process until the new daemon is up), then reach it.
    let new = s.started_daemon();
    assert_ne!(new, pid);
    let out = s.compile(
        "k.c",
        "k.o",
        &[("DCACHE_LOG", "debug"), ("DCACHE_DIRECT", "0")],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("from unix://"));
    assert_eq!(std::fs::read(s.dir().join("k.o")).unwrap(), reference);
}

#[test]
fn another_configuration_gets_its_own_daemon_and_replaces_the_old() {
    let s = Setup::new();
    let old = s.started_daemon();
    let old_socket = s.sockets();
    s.write("c.c", "int c(void) { return 3; }\n");
    // Another cache size: another fingerprint.
    let other = [("DCACHE_CACHE_SIZE", "100M")];
    let deadline = Instant::now() + PATIENCE;
    let new = loop {
        s.compile("c.c", "c.o", &other);
        let d = s.daemons();
        if let Some(n) = d.iter().find(|p| **p != old) {
            break *n;
        }
        assert!(Instant::now() < deadline, "no second daemon: {d:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for("the old daemon to be replaced", || s.daemons() == vec![new]);
    let sockets = s.sockets();
    assert_eq!(sockets.len(), 1);
    assert_ne!(sockets, old_socket);
    assert_eq!(
        std::fs::read(s.dir().join("c.o")).unwrap(),
        s.reference("c.c")
    );
}

#[test]
fn daemon_off_starts_none() {
    let s = Setup::new();
    s.write("o.c", "int o(void) { return 0; }\n");
    for i in 0..3 {
        s.compile("o.c", &format!("o{i}.o"), &[("DCACHE_DAEMON", "0")]);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.daemons().is_empty());
    assert!(s.sockets().is_empty());
    let json = String::from_utf8(
        s.dcache(&["--stats", "--json"], &[("DCACHE_DAEMON", "0")])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        common::stat(&json, "compiles") + common::stat(&json, "hits"),
        3
    );
}

#[test]
fn a_daemon_killed_mid_build_leaves_the_build_correct() {
    let s = Setup::new();
    let pid = s.started_daemon();
    let sources: Vec<String> = (0..8).map(|i| format!("h{i}.c")).collect();
    for (i, src) in sources.iter().enumerate() {
        s.write(src, &heavy_source(i));
    }
    // Four compiles at a time, as `make -j4` runs them; the daemon is killed once the
    // first has finished, with others in flight.
    let mut running: Vec<std::process::Child> = Vec::new();
    let mut killed = false;
    let mut done = 0;
    let mut next = sources.iter();
    loop {
        while running.len() < 4 {
            let Some(src) = next.next() else { break };
            running.push(
                Command::new(DCACHE)
                    .args(["gcc", "-O2", "-c", src, "-o", &format!("{src}.o")])
                    .current_dir(s.dir())
                    .env_remove("DCACHE_HOSTS")
                    .env_remove("DCACHE_DAEMON")
                    .env("DCACHE_DIR", &s.cache)
                    .env("DCACHE_DAEMON_IDLE", "600")
                    .env("DCACHE_LOG", "debug")
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
        }
        if running.is_empty() {
            break;
        }
        let out = running.remove(0).wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        done += 1;
        if done == 1 && !killed {
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
            killed = true;
        }
    }
    assert!(killed);
    for src in &sources {
        assert_eq!(
            std::fs::read(s.dir().join(format!("{src}.o"))).unwrap(),
            s.reference(src),
            "{src}"
        );
    }
}

#[test]
fn the_socket_and_its_directory_are_owner_only() {
    let s = Setup::new();
    let pid = s.started_daemon();
    let uid = std::fs::metadata(s.dir()).unwrap().uid();
    let dir = std::fs::metadata(s.daemon_dir()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    assert_eq!(dir.uid(), uid);
    let socket = s.sockets().pop().unwrap();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), uid);
    // A socket others could reach is not used: the compile runs in process, correctly.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    s.write("p.c", "int p(void) { return 5; }\n");
    let out = s.compile(
        "p.c",
        "p.o",
        &[("DCACHE_LOG", "debug"), ("DCACHE_DIRECT", "0")],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("daemon not used"), "{log}");
    assert!(!log.contains("from unix://"), "{log}");
    assert_eq!(
        std::fs::read(s.dir().join("p.o")).unwrap(),
        s.reference("p.c")
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Likewise a directory others can enter.
    std::fs::set_permissions(s.daemon_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = s.compile(
        "p.c",
        "p2.o",
        &[("DCACHE_LOG", "debug"), ("DCACHE_DIRECT", "0")],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("daemon not used"), "{log}");
    assert!(!log.contains("from unix://"), "{log}");
    std::fs::set_permissions(s.daemon_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(s.daemons(), vec![pid]);
}

/// What a server answers to `bytes`, read until it closes.
fn answer(mut stream: impl Read + Write, bytes: &[u8]) -> Vec<u8> {
    stream.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

#[test]
fn bad_bytes_to_the_daemon_get_what_any_dcache_server_gives() {
    let s = Setup::new();
    let pid = s.started_daemon();
    let socket = s.sockets().pop().unwrap();
    let server = common::server();
    let tcp_addr = server.addr.trim_start_matches("tcp://").to_owned();
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 64][..],
        &[0u8; 40][..],
    ] {
        let unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        unix.set_read_timeout(Some(PATIENCE)).unwrap();
        let tcp = std::net::TcpStream::connect(&tcp_addr).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let from_daemon = answer(unix, bad);
        let from_server = answer(tcp, bad);
        assert!(!from_daemon.is_empty(), "no answer to {bad:?}");
        assert_eq!(from_daemon, from_server, "{bad:?}");
    }
    // And it goes on serving.
    assert_eq!(s.daemons(), vec![pid]);
    s.write("b.c", "int b(void) { return 9; }\n");
    let out = s.compile(
        "b.c",
        "b.o",
        &[("DCACHE_LOG", "debug"), ("DCACHE_DIRECT", "0")],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("from unix://"));
}

impl Setup {
    /// Compiles `start.c` with `envs` until a compile goes through a daemon (the first
    /// may start it without waiting for it); returns how many did not.
    fn compile_until_through_daemon(&self, envs: &[(&str, &str)]) -> usize {
        self.write("start.c", "int start(void) { return 1; }\n");
        let deadline = Instant::now() + PATIENCE;
        let mut direct = 0;
        loop {
            let out = self.compile("start.c", "start.o", envs);
            if String::from_utf8_lossy(&out.stderr).contains("from unix://") {
                return direct;
            }
            direct += 1;
            assert!(
                Instant::now() < deadline,
                "no compile went through a daemon"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// With hosts configured the daemon is the relay to them: every compile of every process
/// reaches the server over the daemon's one authenticated connection (no handshake or
/// token exchange per compile), and a result fetched once is served by the daemon itself
/// the next time, byte-identical to gcc's object.
#[test]
fn with_hosts_the_daemon_relays_over_one_connection_and_serves_repeats_itself() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = common::private_file(
        secrets.path(),
        "token",
        "a token for the relay daemon test\n",
    );
    let cache = tempfile::tempdir().unwrap();
    let server = common::server_on(
        cache.path(),
        &["--token-file", token_file.to_str().unwrap()],
        &[],
    );
    let s = Setup::new();
    let envs = [
        ("DCACHE_HOSTS", server.addr.as_str()),
        ("DCACHE_TOKEN", "a token for the relay daemon test"),
        // Every compile sends its preprocessed source (no direct-mode shortcut).
        ("DCACHE_DIRECT", "0"),
        ("DCACHE_LOG", "debug"),
    ];
    let direct = s.compile_until_through_daemon(&envs);
    let sources: Vec<String> = (0..4)
        .map(|i| {
            let name = format!("r{i}.c");
            s.write(
                &name,
                &format!("int r{i}(int x) {{ return x * {}; }}\n", i + 3),
            );
            name
        })
        .collect();
    for round in 0..2 {
        for src in &sources {
            let obj = format!("{src}.{round}.o");
            let out = s.compile(src, &obj, &envs);
            let log = String::from_utf8_lossy(&out.stderr);
            let expected = if round == 0 {
                "compiled from unix://"
            } else {
                "hit from unix://"
            };
            assert!(log.contains(expected), "round {round}, {src}: {log}");
            assert_eq!(
                std::fs::read(s.dir().join(&obj)).unwrap(),
                s.reference(src),
                "{src}"
            );
        }
    }
    let on_server = common::stats_json(&envs[..2]);
    // start.c and the four sources, each compiled once; the repeats never reached it
    // (its only hits: start.c again, after a first compile that went direct).
    assert_eq!(common::stat(&on_server, "compiles"), 5, "{on_server}");
    assert_eq!(
        common::stat(&on_server, "hits"),
        direct as u64,
        "{on_server}"
    );
    // One connection for the daemon's nine jobs, one per compile that went direct
    // while it started, and this query's own.
    assert!(
        common::stat(&on_server, "connections") <= direct as u64 + 2,
        "{direct} direct compiles: {on_server}"
    );
    // `dcache --stats` shows the daemon's counters beside the server's.
    let json = String::from_utf8(s.dcache(&["--stats", "--json"], &envs).stdout).unwrap();
    assert_eq!(common::stat(&json, "daemon_hits"), 4, "{json}");
    assert_eq!(common::stat(&json, "daemon_upstream_jobs"), 5, "{json}");
    assert_eq!(common::stat(&json, "compiles"), 5, "{json}");
}

/// A relay daemon whose host is down answers at once, and the wrapper compiles locally,
/// correctly, with one warning naming the host.
#[test]
fn with_its_host_down_the_relay_daemon_lets_the_wrapper_compile_locally() {
    let addr = common::dead_address();
    let s = Setup::new();
    let envs = [("DCACHE_HOSTS", addr.as_str()), ("DCACHE_LOG", "debug")];
    s.write("d.c", "int d(int x) { return x - 9; }\n");
    wait_for("the relay daemon", || {
        s.compile("d.c", "d.o", &envs);
        s.daemons().len() == 1 && s.sockets().len() == 1
    });
    let out = s.compile("d.c", "d.o", &envs);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&addr), "the host is named: {log}");
    assert_eq!(
        std::fs::read(s.dir().join("d.o")).unwrap(),
        s.reference("d.c")
    );
}
