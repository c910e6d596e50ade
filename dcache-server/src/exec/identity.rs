//! Finding a compiler's [`CompilerIdentity`]: what the client sends in JOB and what the
//! server compares it with, computed the same way at both ends.
//!
//! The identity is the compiler's `--version` line and `-dumpmachine` target, and a digest
//! of the bytes of the driver and of the programs it names with `-print-prog-name=` for
//! `cc1`, `cc1plus` and `as` (protocol §5.2.1). Nothing depends on the path the compiler
//! was reached by: the driver is run and read under its canonical path, so `/usr/bin/gcc`,
//! `/usr/bin/cc` and `/usr/bin/x86_64-linux-gnu-gcc-12` have one identity, and a shell
//! script named `gcc` has its own.
//!
//! Cost (`cargo run --profile test -p dcache-examples --example identity_cost`, figures in
//! docs/BENCHMARKS.md): the compiler runs cost milliseconds for gcc and tens to hundreds
//! for clang, hashing gcc's `cc1` and `cc1plus` (66 MB) hundreds more on a loaded machine.
//! [`probe_cached`] remembers the result in a directory, keyed by the driver's path, size,
//! inode and times and by `PATH`, and checks
//! the other programs' metadata on every use, so a warm compile pays a few `stat` calls.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use dcache_proto::{CompilerIdentity, IdentityDigest};

use crate::sandbox::toolchain;

/// The programs besides the driver that turn preprocessed source into an object, as the
/// driver names them with `-print-prog-name=`. Each is a role in the digest.
const HELPERS: [&str; 3] = ["cc1", "cc1plus", "as"];

/// Largest output read from a probe run: a `--version` is a few hundred bytes.
const MAX_PROBE_OUTPUT: u64 = 64 * 1024;

/// How long the probe runs of one compiler may take together: gcc answers in a few
/// milliseconds, clang in tens; the bound only stops a compiler that never answers.
const PROBE_TIME_LIMIT: Duration = Duration::from_secs(20);

/// Why a compiler's identity could not be found. The caller then does not distribute (the
/// client compiles locally; the server leaves the compiler out).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The compiler could not be found, run or read.
    #[error("cannot probe the compiler {}: {source}", path.display())]
    Io {
        /// The compiler.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The compiler ran but printed no version: not a compiler we know how to identify.
    #[error("{} printed no {what}: not a compiler dcache can identify", path.display())]
    NoAnswer {
        /// The compiler.
        path: PathBuf,
        /// The query it did not answer (`--version`).
        what: &'static str,
    },
}

/// The variable a masquerading dcache reads its nesting depth from (the client's
/// `wrapper::masquerade::DEPTH_VAR`, spelled here because this crate cannot name it).
/// Set in every probe, so a dcache the probed compiler reaches only runs the compiler.
const NESTED_VAR: &str = "DCACHE_MASQUERADE_DEPTH";

/// Computes the identity of the compiler at `compiler` (a path to it; resolve a bare name
/// on `PATH` first), running it with `search_path` as its `PATH`.
pub fn probe(compiler: &Path, search_path: &str) -> Result<CompilerIdentity, IdentityError> {
    probe_files(compiler, search_path, &[]).map(|(id, _)| id)
}

/// The identity, and the files its digest covers (the driver first). `extra_env` is set
/// in the queries' otherwise cleared environment: a wrapper invoked as `gcc` passes its
/// nesting depth, so a compiler script that calls `gcc` again cannot recurse through it
/// without bound.
fn probe_files(
    compiler: &Path,
    search_path: &str,
    extra_env: &[(&str, String)],
) -> Result<(CompilerIdentity, Vec<PathBuf>), IdentityError> {
    let io = |source| IdentityError::Io {
        path: compiler.to_path_buf(),
        source,
    };
    let driver = compiler.canonicalize().map_err(io)?;
    // All five runs at once: clang takes tens of milliseconds to start.
    let mut queries = vec!["--version".to_owned(), "-dumpmachine".to_owned()];
    queries.extend(HELPERS.iter().map(|h| format!("-print-prog-name={h}")));
    let children: Vec<_> = queries
        .iter()
        .map(|q| {
            let mut command = Command::new(&driver);
            command
                .arg(q)
                .env_clear()
                .env("PATH", search_path)
                .env("LC_ALL", "C")
                // A compiler script that calls `gcc` may reach a dcache masquerading as
                // gcc: marked as nested, it only runs the compiler, never probes again
                // (five queries a level would multiply without bound).
                .env(NESTED_VAR, "1")
                .envs(extra_env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                // Its own group, so whatever it leaves behind is killed with it.
                .process_group(0);
            super::busy::retry_blocking(|| command.spawn())
        })
        .collect();
    let deadline = Instant::now() + PROBE_TIME_LIMIT;
    let mut answers = Vec::new();
    for child in children {
        answers.push(first_line(child.map_err(io)?, deadline).map_err(io)?);
    }
    let path = driver.clone();
    let (version, target) = (&answers[0], &answers[1]);
    // A target is not required: the digest decides. A version line is: it is what a
    // person is shown when two compilers differ.
    if version.is_empty() {
        return Err(IdentityError::NoAnswer {
            path,
            what: "--version",
        });
    }
    let mut digest = IdentityDigest::new();
    let mut files = vec![driver.clone()];
    add_file(&mut digest, "driver", &driver).map_err(io)?;
    for (role, named) in HELPERS.iter().zip(&answers[2..]) {
        let Some(file) = helper_file(named, search_path) else {
            continue;
        };
        add_file(&mut digest, role, &file).map_err(io)?;
        files.push(file);
    }
    Ok((
        CompilerIdentity::new(version, target, digest.finish()),
        files,
    ))
}

/// The first line of what a probe run printed, bounded, whatever its exit status (a
/// `-print-prog-name` of an unknown program still prints the name). A run still going at
/// `deadline` is killed with its process group: a broken compiler, or a script that reads
/// its stdin, must not hang a server's start or a compile.
fn first_line(mut child: Child, deadline: Instant) -> std::io::Result<String> {
    let group = Pid::from_raw(child.id() as i32);
    loop {
        if child.try_wait()?.is_some() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Also what it started and left holding the pipe, so the read below ends.
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.kill();
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout.take(MAX_PROBE_OUTPUT).read_to_end(&mut out)?;
    }
    child.wait()?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// The file a driver's `-print-prog-name=` answer names, when it is a regular file: an
/// absolute path as it is, a bare name on `search_path` (where the driver finds it).
fn helper_file(named: &str, search_path: &str) -> Option<PathBuf> {
    if named.is_empty() {
        return None;
    }
    if named.contains('/') {
        let p = Path::new(named);
        return (p.is_absolute() && p.is_file())
            .then(|| p.canonicalize().ok())
            .flatten();
    }
    toolchain::find_on_path(named, search_path)
}

/// Streams one file into the digest, never holding it whole in memory.
fn add_file(digest: &mut IdentityDigest, role: &str, path: &Path) -> std::io::Result<()> {
    let mut hasher = blake3::Hasher::new();
    let len = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    digest.add_file_digest(role, len, hasher.finalize().as_bytes());
    Ok(())
}

/// What changes when a file is replaced or modified in place: size, inode, device,
/// modification and change times.
fn signature(path: &Path) -> Option<[u64; 7]> {
    let m = std::fs::metadata(path).ok()?;
    Some([
        m.len(),
        m.ino(),
        m.dev(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ])
}

/// [`probe`], remembered in `dir`. The entry's name derives from the compiler's path, its
/// metadata (size, inode, device, modification and change times) and `search_path`; the
/// entry lists every file the digest covers with its metadata, and is used only while all
/// of them still match. Best effort: an unreadable or unwritable directory just probes.
pub fn probe_cached(
    dir: &Path,
    compiler: &Path,
    search_path: &str,
) -> Result<CompilerIdentity, IdentityError> {
    probe_cached_with_env(dir, compiler, search_path, &[])
}

/// [`probe_cached`], with `extra_env` set in the compiler's queries' environment (as for
/// a masquerade depth); it does not change the identity, so it is not part of the entry.
pub fn probe_cached_with_env(
    dir: &Path,
    compiler: &Path,
    search_path: &str,
    extra_env: &[(&str, String)],
) -> Result<CompilerIdentity, IdentityError> {
    let Some(sig) = signature(compiler) else {
        return probe_files(compiler, search_path, extra_env).map(|(id, _)| id);
    };
    let mut h = blake3::Hasher::new_derive_key("dcache 2026-12 client compiler identity cache v1");
    let path_bytes = compiler.as_os_str().as_encoded_bytes();
    h.update(&(path_bytes.len() as u64).to_be_bytes());
    h.update(path_bytes);
    for n in sig {
        h.update(&n.to_be_bytes());
    }
    h.update(search_path.as_bytes());
    let file = dir.join(format!("id-{}", h.finalize().to_hex()));
    if let Some(id) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| parse_entry(&t))
    {
        return Ok(id);
    }
    let (id, files) = probe_files(compiler, search_path, extra_env)?;
    if let Some(text) = format_entry(&id, &files) {
        let _ = std::fs::create_dir_all(dir).and_then(|()| {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut tmp, text.as_bytes())?;
            tmp.persist(&file).map(|_| ()).map_err(|e| e.error)
        });
    }
    Ok(id)
}

/// An entry: version, target and digest (hex), then one line per file covered:
/// its signature numbers and its path. `None` when a field cannot be written on one line.
fn format_entry(id: &CompilerIdentity, files: &[PathBuf]) -> Option<String> {
    let mut text = format!("{}\n{}\n{}\n", id.version, id.target, id.digest_hex());
    for f in files {
        let path = f.to_str().filter(|p| !p.contains('\n'))?;
        let sig = signature(f)?;
        let nums: Vec<String> = sig.iter().map(u64::to_string).collect();
        text.push_str(&format!("{} {path}\n", nums.join(" ")));
    }
    Some(text)
}

/// Reads an entry back; `None` if it is malformed or any file it covers has changed.
fn parse_entry(text: &str) -> Option<CompilerIdentity> {
    let mut lines = text.lines();
    let version = lines.next()?;
    let target = lines.next()?;
    let hex = lines.next()?;
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let mut covered = 0;
    for line in lines {
        let mut parts = line.splitn(8, ' ');
        let mut sig = [0u64; 7];
        for n in &mut sig {
            *n = parts.next()?.parse().ok()?;
        }
        let path = parts.next()?;
        if signature(Path::new(path))? != sig {
            return None;
        }
        covered += 1;
    }
    // At least the driver: an entry listing no file would never go stale.
    (covered > 0).then(|| CompilerIdentity::new(version, target, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_goes_stale_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        std::fs::write(&prog, b"one").unwrap();
        let id = CompilerIdentity::new("v 1", "t", [9; 32]);
        let text = format_entry(&id, std::slice::from_ref(&prog)).unwrap();
        assert_eq!(parse_entry(&text), Some(id));
        std::fs::write(&prog, b"other bytes").unwrap();
        assert_eq!(parse_entry(&text), None);
        assert_eq!(parse_entry("v\nt\nnot hex\n"), None);
    }
}
