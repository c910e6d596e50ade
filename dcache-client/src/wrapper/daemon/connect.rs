//! The wrapper's side: find this configuration's daemon, or start it, within a few
//! milliseconds; otherwise say so, and the wrapper runs the embedded server in its own
//! process exactly as it does with `DCACHE_DAEMON=0`.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dcache_transport::Address;

use super::{DAEMON_OPTION, Layout, Settings, check_private, running, try_lock};
use crate::wrapper::config::Config;

/// How long the wrapper that starts a daemon waits for its socket before compiling
/// without it.
pub const START_WAIT: Duration = Duration::from_millis(10);

/// After a daemon failed to start, how long wrappers leave it be (so a daemon that cannot
/// start does not cost every compile a process).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// The log is started afresh beyond this size.
const LOG_LIMIT: u64 = 1 << 20;

/// The address of the daemon that serves `config` for `compiler`, starting it if none
/// runs; `None` when there is none to use right now (turned off, a compiler the local
/// cache daemon would not find by name, a socket or directory that is not this user's
/// alone, or a daemon still starting). With hosts configured the daemon is the relay to
/// them, which runs no compiler, so any compiler goes through it.
pub fn reach(config: &Config, compiler: &OsStr) -> Option<Address> {
    let settings = Settings::from_env();
    if !settings.enabled {
        return None;
    }
    if config.hosts.is_empty() && !found_by_name(compiler) {
        tracing::debug!(
            "daemon: {} is not the {} on PATH; using the embedded server",
            compiler.to_string_lossy(),
            Path::new(compiler).file_name()?.to_string_lossy()
        );
        return None;
    }
    let layout = Layout::of(config);
    if let Err(e) = layout.ensure_private_dir() {
        tracing::warn!("daemon not used: {e}");
        return None;
    }
    let socket = layout.socket();
    if running(&layout) {
        return match check_private(&socket, false) {
            Ok(()) => Some(Address::Unix(socket)),
            Err(e) => {
                if std::fs::symlink_metadata(&socket).is_ok() {
                    tracing::warn!("daemon not used: {e}");
                }
                None
            }
        };
    }
    let before = file_id(&socket);
    start(&layout, config)?;
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
        let now = file_id(&socket);
        if now.is_some() && now != before && check_private(&socket, false).is_ok() {
            return Some(Address::Unix(socket));
        }
    }
    None
}

/// The address of this configuration's daemon if one runs now, never starting one (for
/// `dcache --stats`).
pub fn running_daemon(config: &Config) -> Option<Address> {
    let layout = Layout::of(config);
    let socket = layout.socket();
    (running(&layout) && check_private(&socket, false).is_ok()).then_some(Address::Unix(socket))
}

/// Starts the daemon detached, unless another wrapper is starting it or it failed to
/// start a moment ago. `None` when no daemon was started.
fn start(layout: &Layout, config: &Config) -> Option<()> {
    let _starting = try_lock(&layout.spawn_lock())?;
    if running(layout) {
        // Started by another wrapper between our check and our lock.
        return None;
    }
    if recently_failed(layout) {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let log = open_log(&layout.log())?;
    let dir = config.dir.canonicalize().ok()?;
    let child = Command::new(exe)
        .arg(DAEMON_OPTION)
        .env("DCACHE_DIR", &dir)
        // Not the build's directory: the daemon outlives it and must not keep it busy.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn();
    match child {
        Ok(child) => {
            tracing::debug!("daemon {} started (pid {})", layout.fingerprint, child.id());
            Some(())
        }
        Err(e) => {
            tracing::debug!("daemon not started: {e}");
            mark_failed(layout);
            None
        }
    }
}

/// Whether the invoked compiler is the one its name finds on `PATH`: the daemon runs
/// compilers by name on that `PATH`, so for any other (a path into another toolchain,
/// or the real compiler behind a masquerading link) the embedded server is used.
fn found_by_name(compiler: &OsStr) -> bool {
    let given = Path::new(compiler);
    let Some(name) = given.file_name() else {
        return false;
    };
    if given.components().count() == 1 {
        return true;
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    let found = std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    match (
        found.and_then(|f| f.canonicalize().ok()),
        given.canonicalize(),
    ) {
        (Some(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn failure_marker(layout: &Layout) -> PathBuf {
    layout.dir.join(format!("{}.failed", layout.fingerprint))
}

fn recently_failed(layout: &Layout) -> bool {
    std::fs::metadata(failure_marker(layout))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < RETRY_AFTER_FAILURE)
}

/// Records that this configuration's daemon could not start (the daemon does too when
/// it fails after starting), so wrappers leave it be for a while.
pub fn mark_failed(layout: &Layout) {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = std::fs::write(failure_marker(layout), format!("{stamp}\n"));
}

/// Forgets an earlier failure (a daemon that started).
pub fn clear_failed(layout: &Layout) {
    let _ = std::fs::remove_file(failure_marker(layout));
}

/// The daemons' log, appended to, started afresh when large.
fn open_log(path: &Path) -> Option<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let _ = std::fs::rename(path, path.with_extension("log.old"));
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .ok()
}
