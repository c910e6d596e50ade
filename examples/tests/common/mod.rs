//! Helpers shared by the process-level tests: starting `dcache-server` processes and
//! reading `dcache --stats --json`.
#![allow(dead_code, unreachable_pub)] // each test binary uses its own subset; shared by `mod common`

pub mod redis;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub const DCACHE: &str = env!("CARGO_BIN_EXE_dcache");
pub const SERVER: &str = env!("CARGO_BIN_EXE_dcache-server");

/// Writes `text` to `dir/name` readable by its owner only (mode 600), as dcache wants a
/// token or a shared key file; returns the path.
pub fn private_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A loopback address nothing listens on (a port bound, noted and closed again): a dead
/// host.
pub fn dead_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("tcp://127.0.0.1:{port}")
}

/// A server process, killed when dropped.
pub struct Server {
    pub child: Child,
    /// The address it bound, as `tcp://127.0.0.1:PORT` (or `tls://...`).
    pub addr: String,
    /// What it logged after it started listening.
    log: Arc<Mutex<String>>,
    _cache: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Kills the process with SIGKILL (no cleanup of any kind) and reaps it.
    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Everything it logged since it started listening.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// A server on a fresh cache directory of its own.
pub fn server() -> Server {
    let cache = tempfile::tempdir().unwrap();
    let mut s = server_on(cache.path(), &[], &[]);
    s._cache = Some(cache);
    s
}

/// A server on `cache` (which outlives it, so a restart finds the same cache), with extra
/// arguments and environment.
pub fn server_on(cache: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    server_at("tcp://127.0.0.1:0", cache, extra, envs)
}

/// A server listening on `listen` (e.g. `tls://127.0.0.1:0`, with the certificate flags
/// in `extra`), on `cache`.
pub fn server_at(listen: &str, cache: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(SERVER);
    cmd.args(["--listen", listen, "--cache-size", "1G", "--cache-dir"])
        .arg(cache)
        .args(extra)
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // The server logs the address it actually bound.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    Server {
        child,
        addr,
        log,
        _cache: None,
    }
}

/// `dcache --stats --json` with the given environment.
pub fn stats_json(envs: &[(&str, &str)]) -> String {
    // A DCACHE_DIR of its own: no zero point recorded by an earlier --zero-stats, and
    // never the user's cache.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(DCACHE);
    cmd.args(["--stats", "--json"])
        .env_remove("DCACHE_HOSTS")
        .env("DCACHE_DIR", dir.path());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// One counter from [`stats_json`]'s output.
pub fn stat(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\": ");
    let rest = &json[json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {json}"))
        + key.len()..];
    rest.split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
