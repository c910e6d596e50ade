//! The wrapper's local daemon: one long-lived `dcache --daemon` per user, per
//! `DCACHE_DIR` and per configuration, over a Unix socket. With no hosts it serves the
//! embedded default, so the store is opened and indexed once, the memory tier is shared
//! by every process of a `make -j`, and compiler identities are probed once, not once per
//! compile. With hosts it is the relay to them: one warm, authenticated connection per
//! host instead of a handshake (and a token exchange) per compile, and a cache tier of
//! its own in front of them.
//!
//! Everything lives in `DCACHE_DIR/daemon/`, a directory only its owner may enter:
//! - `FINGERPRINT.sock`: the socket (mode 0600), named by a hash of the configuration
//!   ([`Layout::fingerprint`]), so a wrapper with other settings never reaches a daemon
//!   started with different ones;
//! - `FINGERPRINT.lock`: held (flock) by the running daemon for its whole life: exactly
//!   one daemon per fingerprint however many start at once, and a crashed one (kill -9)
//!   releases it, so its socket file is known to be stale;
//! - `FINGERPRINT.spawn`: held by the one wrapper that is starting a daemon, so the others
//!   of a `make -j8` do not all start one;
//! - `daemon.log`: what the daemons log (`DCACHE_LOG` sets the level).
//!
//! The parts: [`connect`] (the wrapper's side: reach the daemon, or start it and go on
//! without it), [`serve`](mod@serve) (the daemon's life: lock, bind, serve, idle exit),
//! [`executor`] (the compilers it runs, found by name on the configured `PATH`).
//!
//! Never on the critical path of a build: a daemon that is not there, is starting, has
//! another owner or dies mid-job leaves the wrapper doing exactly what it does without
//! one (the hosts directly, the embedded server in process, or a local compile).

pub mod connect;
pub mod executor;
pub mod serve;

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use super::config::Config;

pub use connect::reach;
pub use serve::serve;

/// The hidden command-line option that runs `dcache` as the daemon.
pub const DAEMON_OPTION: &str = "--daemon";

/// How long a daemon waits with no connection open before it exits, unless
/// `DCACHE_DAEMON_IDLE` says otherwise.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// The daemon's settings, from `DCACHE_DAEMON` and `DCACHE_DAEMON_IDLE`.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `DCACHE_DAEMON` (default on): `0`/`off`/`no`/`false` turns the daemon off, and
    /// every `dcache` runs the embedded server in its own process as before.
    pub enabled: bool,
    /// `DCACHE_DAEMON_IDLE`: seconds (fractions allowed) without a connection after which
    /// the daemon exits.
    pub idle: Duration,
}

impl Settings {
    /// Reads the settings from the environment. A value that does not parse keeps the
    /// default: the daemon is an optimisation, and a typo must not fail a build.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let enabled = !get("DCACHE_DAEMON").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "off" | "no" | "false"
            )
        });
        let idle = get("DCACHE_DAEMON_IDLE")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 7.0 * 86400.0)
            .map_or(DEFAULT_IDLE, Duration::from_secs_f64);
        Self { enabled, idle }
    }
}

/// Where one configuration's daemon keeps its files.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `DCACHE_DIR/daemon`.
    pub dir: PathBuf,
    /// The configuration's fingerprint: 16 hex digits.
    pub fingerprint: String,
}

impl Layout {
    /// The layout for `config` as this process sees it (its `PATH`, locale and binary
    /// included: they decide which compilers run and what they print).
    pub fn of(config: &Config) -> Self {
        Self {
            dir: config.dir.join("daemon"),
            fingerprint: Self::fingerprint(config),
        }
    }

    /// A hash of everything a daemon's answers depend on: the user, the cache directory
    /// and its size limit, hosts, token, strategy and the link settings (for the relay it
    /// is with hosts), `PATH` and the locale (which compilers run, in which language they
    /// speak), and this very binary (an upgraded `dcache` replaces the old daemon).
    pub fn fingerprint(config: &Config) -> String {
        let mut h = blake3::Hasher::new_derive_key("dcache 2026 daemon configuration v1");
        let mut field = |name: &str, value: &[u8]| {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&(value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("uid", &nix::unistd::getuid().as_raw().to_le_bytes());
        let dir = config
            .dir
            .canonicalize()
            .unwrap_or_else(|_| config.dir.clone());
        field("dir", dir.as_os_str().as_encoded_bytes());
        field("cache_size", &config.cache_size.to_le_bytes());
        let hosts: Vec<String> = config.hosts.iter().map(ToString::to_string).collect();
        field("hosts", hosts.join(" ").as_bytes());
        field("strategy", format!("{:?}", config.strategy).as_bytes());
        // The relay's link to the hosts: token, TLS, compression and time-outs.
        for var in [
            "DCACHE_TOKEN",
            "DCACHE_TOKEN_FILE",
            "DCACHE_TLS_CA",
            "DCACHE_TLS_CERT",
            "DCACHE_TLS_KEY",
            "DCACHE_COMPRESS",
            "DCACHE_LINK_SPEED",
            "DCACHE_TIMEOUT",
            "DCACHE_CONNECT_TIMEOUT",
            "PATH",
            "LANG",
            "LANGUAGE",
            "LC_ALL",
            "LC_CTYPE",
            "LC_MESSAGES",
        ] {
            field(
                var,
                std::env::var_os(var).unwrap_or_default().as_encoded_bytes(),
            );
        }
        if let Ok(exe) = std::env::current_exe() {
            field("exe", exe.as_os_str().as_encoded_bytes());
            if let Ok(m) = std::fs::metadata(&exe) {
                let stamp = [m.len(), m.ino(), m.mtime() as u64, m.mtime_nsec() as u64];
                for v in stamp {
                    field("exe_stamp", &v.to_le_bytes());
                }
            }
        }
        h.finalize().to_hex()[..16].to_owned()
    }

    /// The socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.fingerprint))
    }

    /// The lock the running daemon holds.
    pub fn lock(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.fingerprint))
    }

    /// The lock a starting wrapper holds.
    pub fn spawn_lock(&self) -> PathBuf {
        self.dir.join(format!("{}.spawn", self.fingerprint))
    }

    /// The daemons' log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Creates the directory owner-only if it is missing, and checks that it is ours and
    /// closed to others: another user who could enter it could replace our socket.
    pub fn ensure_private_dir(&self) -> std::io::Result<()> {
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(self.dir.parent().unwrap_or(Path::new("/")))?;
                std::fs::DirBuilder::new().mode(0o700).create(&self.dir)?;
            }
            Err(e) => return Err(e),
        }
        check_private(&self.dir, true)
    }
}

/// Fails unless `path` (not followed if a link) is owned by this user, of the expected
/// kind, and neither readable nor writable by anyone else.
pub fn check_private(path: &Path, dir: bool) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let uid = nix::unistd::getuid().as_raw();
    let kind_ok = if dir {
        meta.is_dir()
    } else {
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
    };
    if !kind_ok || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private {} of this user (owner {}, mode {:o})",
                path.display(),
                if dir { "directory" } else { "socket" },
                meta.uid(),
                meta.permissions().mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Takes the exclusive lock on `path` without waiting: `None` when another process
/// holds it (or the file cannot be opened).
pub fn try_lock(path: &Path) -> Option<Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode_private()
        .open(path)
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

/// Whether the daemon of `layout` is running (holds its lock).
pub fn running(layout: &Layout) -> bool {
    layout.lock().exists() && try_lock(&layout.lock()).is_none()
}

trait PrivateOpen {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateOpen for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A daemon found by [`stop_all`] or [`status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its fingerprint.
    pub fingerprint: String,
    /// Its process id, as it wrote it in its lock file.
    pub pid: Option<u32>,
}

/// Every daemon running for this `DCACHE_DIR`, whatever its configuration.
pub fn status(config: &Config) -> Vec<Running> {
    let dir = config.dir.join("daemon");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "lock") {
            continue;
        }
        let Some(fingerprint) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if try_lock(&path).is_some() {
            continue;
        }
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        found.push(Running {
            fingerprint: fingerprint.to_owned(),
            pid,
        });
    }
    found.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
    found
}

/// `dcache --stop-daemon`: stops every daemon of this `DCACHE_DIR` by removing its socket
/// (a daemon exits within a moment of losing it, after the jobs in flight), then waits
/// up to `wait` for their locks to be released. Returns the daemons that were running
/// and whether all of them are gone.
pub fn stop_all(config: &Config, wait: Duration) -> (Vec<Running>, bool) {
    let before = status(config);
    let dir = config.dir.join("daemon");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "sock") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        if status(config).is_empty() {
            return (before, true);
        }
        if std::time::Instant::now() >= deadline {
            return (before, false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_on_and_parse_idle() {
        let none = Settings::from_vars(|_| None);
        assert!(none.enabled);
        assert_eq!(none.idle, DEFAULT_IDLE);
        let off = Settings::from_vars(|k| (k == "DCACHE_DAEMON").then(|| "Off".to_owned()));
        assert!(!off.enabled);
        let short = Settings::from_vars(|k| (k == "DCACHE_DAEMON_IDLE").then(|| "0.5".into()));
        assert_eq!(short.idle, Duration::from_millis(500));
        for bad in ["-1", "x", "NaN", "0", "1e30"] {
            let s = Settings::from_vars(|k| (k == "DCACHE_DAEMON_IDLE").then(|| bad.into()));
            assert_eq!(s.idle, DEFAULT_IDLE, "{bad}");
        }
    }

    #[test]
    fn the_fingerprint_follows_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let a = Config::new(dir.path().to_owned());
        let mut b = a.clone();
        assert_eq!(Layout::fingerprint(&a), Layout::fingerprint(&b));
        b.cache_size += 1;
        assert_ne!(Layout::fingerprint(&a), Layout::fingerprint(&b));
        let other = tempfile::tempdir().unwrap();
        let c = Config::new(other.path().to_owned());
        assert_ne!(Layout::fingerprint(&a), Layout::fingerprint(&c));
    }

    #[test]
    fn a_private_dir_is_created_and_an_open_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            dir: dir.path().join("daemon"),
            fingerprint: "0".repeat(16),
        };
        layout.ensure_private_dir().unwrap();
        let mode = std::fs::metadata(&layout.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(layout.ensure_private_dir().is_err());
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = try_lock(&path).unwrap();
        assert!(try_lock(&path).is_none());
        drop(held);
        assert!(try_lock(&path).is_some());
    }
}
