//! The identity of the compiler this wrapper would run locally, sent with every job so a
//! server runs only that same compiler (protocol §5.2.1). Computed by the same code as
//! the server's ([`dcache_server::exec::identity`]), remembered under
//! `DCACHE_DIR/compilers`, so a warm compile costs a few `stat` calls.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use dcache_proto::CompilerIdentity;
use dcache_server::exec::identity::probe_cached_with_env;

use super::config::Config;

/// The identity of `compiler` as a local compile would find it (the path as given, or the
/// first executable of that name on `PATH`, as `execvp` does), or `None` when it cannot be
/// found or identified: the wrapper then compiles locally, since no server could be told
/// which compiler to run.
pub fn of(config: &Config, compiler: &OsStr) -> Option<CompilerIdentity> {
    let path = resolve(compiler)?;
    let search = std::env::var("PATH").unwrap_or_default();
    // A compiler script that calls `gcc` again reaches a masquerading dcache: the depth
    // bounds that, in the probe as in every other command the wrapper starts.
    let env: Vec<_> = super::masquerade::depth_env().into_iter().collect();
    match probe_cached_with_env(&config.dir.join("compilers"), &path, &search, &env) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::debug!("{e}; compiling locally");
            None
        }
    }
}

/// Where a local compile finds `compiler`.
fn resolve(compiler: &OsStr) -> Option<PathBuf> {
    let given = Path::new(compiler);
    if given.components().count() > 1 {
        return Some(given.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(given))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
