//! Masquerade: `dcache` installed as a link named after a compiler (`gcc`, `cc`, `g++`,
//! `clang`, `x86_64-linux-gnu-gcc-12`) placed early on `PATH`, so that a build which
//! runs `gcc` goes through the cache without being told (as ccache and distcc users set
//! it up). Invoked that way, dcache finds the real compiler further on `PATH`, skipping
//! every entry that is dcache itself, and compiles through it.
//!
//! "Is dcache itself" is decided on canonical paths: an entry is skipped when it
//! resolves to the same file as the running executable (hard or symbolic links alike,
//! through any chain of links), or when it cannot be resolved at all (a dangling link,
//! a loop of links). A `PATH` whose only `gcc` is the link is an error that says so,
//! never a loop. A compiler that is a script calling `gcc` through `PATH` would come
//! back to the link; [`DEPTH_VAR`] bounds that.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Carried to the compiler's environment: how many masquerading dcache processes are
/// running one inside the other. A real compiler never starts another; a wrapper
/// script that calls `gcc` through `PATH` does, and past [`MAX_DEPTH`] that is a loop.
pub const DEPTH_VAR: &str = "DCACHE_MASQUERADE_DEPTH";

/// Nested masquerading invocations allowed before giving up.
pub const MAX_DEPTH: u32 = 8;

/// Why no compiler to run was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasqueradeError {
    /// Every `name` on `PATH` is dcache itself (or cannot be resolved).
    #[error("{}", not_found(.name, .skipped))]
    NotFound {
        /// The compiler name dcache was invoked as.
        name: String,
        /// The entries skipped, with why.
        skipped: Vec<(PathBuf, &'static str)>,
    },
    /// The running executable's own path cannot be resolved (needed to skip it).
    #[error("cannot tell where dcache itself is: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// Masquerading invocations nested past [`MAX_DEPTH`]: a compiler on `PATH` calls
    /// the name it was invoked as, which comes back here.
    #[error(
        "{name}: {depth} nested invocations through dcache; a {name} further on PATH seems to call {name} again"
    )]
    Loop {
        /// The compiler name.
        name: String,
        /// The depth reached.
        depth: u32,
    },
}

fn not_found(name: &str, skipped: &[(PathBuf, &'static str)]) -> String {
    if skipped.is_empty() {
        return format!("{name}: no {name} on PATH");
    }
    let list: Vec<String> = skipped
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect();
    format!(
        "{name}: no {name} on PATH other than dcache itself; skipped {}",
        list.join(", ")
    )
}

/// The compiler name dcache was invoked as, if it was invoked under a name that is not
/// its own: `Some("gcc")` for `argv[0]` = `/home/me/bin/gcc`, `None` for `dcache` or
/// `/usr/local/bin/dcache` (any name beginning with `dcache` is dcache's own).
pub fn invoked_as(argv0: &OsStr) -> Option<String> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    if name.is_empty() || name.starts_with("dcache") {
        return None;
    }
    Some(name.to_owned())
}

/// Finds the compiler `name` on `path` (a `PATH` value), skipping every entry that
/// resolves to `me` (the running executable, canonical) or does not resolve. Returns
/// the first other executable file, as found on `PATH` (not canonicalised: a
/// `gcc -> gcc-12` link keeps its name, which the compiler may look at).
pub fn find_compiler(name: &str, path: &OsStr, me: &Path) -> Result<PathBuf, MasqueradeError> {
    let mut skipped = Vec::new();
    for dir in std::env::split_paths(path) {
        // An empty entry means the current directory, as for a shell.
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(name);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            if std::fs::symlink_metadata(&candidate).is_ok() {
                skipped.push((candidate, "a link that does not resolve"));
            }
            continue;
        };
        if !meta.is_file() || !is_executable(&meta) {
            continue;
        }
        match candidate.canonicalize() {
            Ok(real) if real == me => skipped.push((candidate, "dcache itself")),
            Ok(_) => return Ok(candidate),
            Err(_) => skipped.push((candidate, "a link that does not resolve")),
        }
    }
    Err(MasqueradeError::NotFound {
        name: name.to_owned(),
        skipped,
    })
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// The running executable, canonical.
pub fn current_exe() -> Result<PathBuf, MasqueradeError> {
    std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(MasqueradeError::CurrentExe)
}

/// For a masquerading invocation as `name`: the real compiler on this process's `PATH`,
/// after checking the nesting depth and raising it for the compiler's children.
pub fn resolve(name: &str) -> Result<PathBuf, MasqueradeError> {
    let depth: u32 = std::env::var(DEPTH_VAR)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    if depth >= MAX_DEPTH {
        return Err(MasqueradeError::Loop {
            name: name.to_owned(),
            depth,
        });
    }
    let me = current_exe()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = find_compiler(name, &path, &me)?;
    DEPTH.store(depth + 1, std::sync::atomic::Ordering::Relaxed);
    Ok(found)
}

/// `dcache gcc …` when the `gcc` first on `PATH` is a masquerading link to dcache: the
/// compiler further on, so the compile does not go through dcache twice. Any other
/// compiler (a path, or a name whose first hit is not dcache) is returned unchanged.
pub fn skip_self(compiler: OsString) -> OsString {
    let Some(name) = compiler.to_str().filter(|c| !c.contains('/')) else {
        return compiler;
    };
    let Ok(me) = current_exe() else {
        return compiler;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let first = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file() && is_executable(&m)));
    match first.and_then(|f| f.canonicalize().ok()) {
        Some(real) if real == me => find_compiler(name, &path, &me)
            .map(PathBuf::into_os_string)
            .unwrap_or(compiler),
        _ => compiler,
    }
}

/// This process's masquerade depth ([`resolve`] sets it). Changing the process's own
/// environment is `unsafe` in this edition and the crate forbids unsafe code, so the
/// depth reaches the compiler through the environment of the commands the wrapper
/// starts ([`depth_env`]).
static DEPTH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether this masquerading dcache runs inside a compile another one started (a compiler
/// script calling `gcc` again). Such a call only runs the compiler: the outer dcache
/// already caches the whole command, and probing or caching here again would multiply
/// the processes at every level (each identity probe runs the compiler five times).
pub fn nested() -> bool {
    DEPTH.load(std::sync::atomic::Ordering::Relaxed) > 1
}

/// The variable to set in a locally run compiler's environment: the nesting depth of
/// this masquerading dcache, if it is one.
pub fn depth_env() -> Option<(&'static str, String)> {
    match DEPTH.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        d => Some((DEPTH_VAR, d.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn names_other_than_dcache_are_masquerades() {
        assert_eq!(
            invoked_as(OsStr::new("/home/me/bin/gcc")),
            Some("gcc".into())
        );
        assert_eq!(
            invoked_as(OsStr::new("x86_64-linux-gnu-gcc-12")),
            Some("x86_64-linux-gnu-gcc-12".into())
        );
        assert_eq!(invoked_as(OsStr::new("/usr/local/bin/dcache")), None);
        assert_eq!(invoked_as(OsStr::new("dcache")), None);
        assert_eq!(invoked_as(OsStr::new("")), None);
    }

    #[test]
    fn links_to_dcache_loops_and_dangling_links_are_skipped() {
        let t = tempdir();
        let me_file = t.path().join("dcache");
        std::fs::write(&me_file, "#!/bin/sh\n").unwrap_or_default();
        let exe = std::fs::Permissions::from_mode(0o755);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&me_file, exe.clone()).unwrap_or_default();
        let me = me_file.canonicalize().unwrap_or_default();
        let dirs: Vec<PathBuf> = (0..5).map(|i| t.path().join(format!("d{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap_or_default();
        }
        // d0: a link to dcache; d1: a link to that link; d2: a loop; d3: dangling;
        // d4: the real one (a file of its own).
        symlink(&me_file, dirs[0].join("cc")).unwrap_or_default();
        symlink(dirs[0].join("cc"), dirs[1].join("cc")).unwrap_or_default();
        symlink(dirs[2].join("cc"), dirs[2].join("cc")).unwrap_or_default();
        symlink(t.path().join("nowhere"), dirs[3].join("cc")).unwrap_or_default();
        std::fs::write(dirs[4].join("cc"), "#!/bin/sh\n").unwrap_or_default();
        std::fs::set_permissions(dirs[4].join("cc"), exe).unwrap_or_default();
        let path = std::env::join_paths(&dirs).unwrap_or_default();
        let found = find_compiler("cc", &path, &me).map_err(|e| e.to_string());
        assert_eq!(found, Ok(dirs[4].join("cc")));
        // Without the real one: an error naming what was skipped and why.
        let path = std::env::join_paths(&dirs[..4]).unwrap_or_default();
        let err = find_compiler("cc", &path, &me)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let expected = format!(
            "cc: no cc on PATH other than dcache itself; skipped {} (dcache itself), {} \
             (dcache itself), {} (a link that does not resolve), {} (a link that does not \
             resolve)",
            dirs[0].join("cc").display(),
            dirs[1].join("cc").display(),
            dirs[2].join("cc").display(),
            dirs[3].join("cc").display()
        );
        assert_eq!(err, Err(expected));
        // A name found nowhere at all.
        let err = find_compiler("nosuchcc", &path, &me)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(err, Err("nosuchcc: no nosuchcc on PATH".into()));
    }
}
