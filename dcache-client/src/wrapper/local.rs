//! What the wrapper does on this machine: run the preprocessor, run the compiler unchanged
//! (fallback and non-distributable calls), and write outputs atomically.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use super::args::CompilePlan;

/// Whether preprocessed assembler names a file the assembler reads itself (`.include`,
/// `.incbin`; gas directives are case-insensitive): the preprocessor never saw it, so no
/// key or manifest covers it, and the compile runs locally. Matched anywhere, comments
/// too: a false alarm only costs a local compile.
pub fn assembler_reads_files(text: &[u8]) -> bool {
    const DIRECTIVES: [&[u8]; 2] = [b".include", b".incbin"];
    DIRECTIVES
        .iter()
        .any(|d| text.windows(d.len()).any(|w| w.eq_ignore_ascii_case(d)))
}

/// The preprocessor's output for a plan.
#[derive(Debug)]
pub struct Preprocessed {
    /// The preprocessed source, as sent to the server.
    pub source: Vec<u8>,
    /// What the preprocessor printed on stderr (`#warning` and the like): part of what the
    /// compiler would have printed, so the wrapper prints it too.
    pub stderr: Vec<u8>,
}

/// Why preprocessing did not produce a source to send.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreprocessError {
    /// The preprocessor could not be started.
    #[error("cannot run the preprocessor {compiler:?}: {source}")]
    Spawn {
        /// The compiler.
        compiler: OsString,
        /// Why.
        source: std::io::Error,
    },
    /// The preprocessor failed (a missing header, a syntax error in a directive). The
    /// compile would fail the same way; running it locally reproduces the exact output.
    #[error("preprocessor exited with {status}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
    },
}

/// A command running `compiler` the way every compiler run of the wrapper must: with the
/// masquerade depth in its environment, so a compiler script that calls `gcc` and comes
/// back through a masquerading dcache is counted and stopped, never looped.
pub(super) fn compiler_command(compiler: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(compiler);
    cmd.envs(super::masquerade::depth_env());
    cmd
}

/// Runs `compiler -E` for a plan, writing dependency files as the compiler would.
pub fn preprocess(plan: &CompilePlan) -> Result<Preprocessed, PreprocessError> {
    let lang = plan.language.source();
    let out = compiler_command(&plan.compiler)
        .arg("-E")
        .args(&plan.preprocess_args)
        .arg("-x")
        .arg(lang)
        .arg(&plan.input)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PreprocessError::Spawn {
            compiler: plan.compiler.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(PreprocessError::Failed { status: out.status });
    }
    Ok(Preprocessed {
        source: out.stdout,
        stderr: out.stderr,
    })
}

/// Runs the compiler with the original arguments and this process's stdio, as if the
/// wrapper were not there. Returns the exit code to exit with.
pub fn run_locally(compiler: &OsString, args: &[OsString]) -> std::io::Result<i32> {
    let status = compiler_command(compiler).args(args).status()?;
    Ok(exit_code(status))
}

/// Largest diagnostics text kept for replay ([`run_locally_teeing_stderr`]); longer
/// output is still printed whole, only not kept.
pub const MAX_KEPT_STDERR: usize = 64 << 10;

/// Runs the compiler as [`run_locally`] does, but with its stderr through a pipe: each
/// chunk is printed as it comes and kept, so the exact diagnostics a local compile prints
/// can be replayed on a later hit. Returns the exit code and what it printed on stderr,
/// `None` when that exceeded [`MAX_KEPT_STDERR`] (or could not be read whole).
///
/// Only for a stderr that is not a terminal: gcc writes to a pipe exactly what it writes
/// to a file, but colours and links a terminal.
pub fn run_locally_teeing_stderr(
    compiler: &OsString,
    args: &[OsString],
) -> std::io::Result<(i32, Option<Vec<u8>>)> {
    use std::io::Read;
    let mut child = Command::new(compiler)
        .envs(super::masquerade::depth_env())
        .args(args)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut kept = Some(Vec::new());
    if let Some(mut pipe) = child.stderr.take() {
        let mut buf = [0u8; 8192];
        let mut err = std::io::stderr();
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = err.write_all(&buf[..n]);
                    if let Some(k) = &mut kept {
                        if k.len() + n > MAX_KEPT_STDERR {
                            kept = None;
                        } else {
                            k.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The rest is lost to us but not to the compiler, which gets EPIPE
                    // only if it writes on: nothing is kept for replay.
                    kept = None;
                    break;
                }
            }
        }
    }
    let status = child.wait()?;
    Ok((exit_code(status), kept))
}

/// The exit code a shell would report for `status` (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, renamed
/// into place once the old file is removed, so a reader (or a crash of this process)
/// never sees half an object.
///
/// Not synced to disk, as gcc and ccache do not sync their outputs either: after a power
/// loss the object may be missing or empty, never a mix of two, and the build redoes it
/// as it would a compiler's. A sync cost a warm hit 0.6 ms (5.1 against 4.5 ms for one
/// `lapi.c` hit), a sixth of ccache's whole hit. For the same reason the old file is
/// removed before the rename rather than renamed over: ext4 (`auto_da_alloc`) writes a
/// file renamed over another out at once, 0.27 ms for a 150 KB object against 0.085 ms
/// (measured on this machine's ext4), twice per compile with a `.d` file. Between the two
/// steps the path is briefly absent, as it is while gcc writes it.
///
/// The file gets the mode the compiler would give it: created with 0666, which the
/// kernel narrows by the process's umask (0644 under the usual 022), not the 0600 of a
/// private temporary file, so build trees shared by a group work as they do with gcc.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
        // A device (`-o /dev/null`, as configure scripts do), a FIFO or a symlink: the
        // compiler writes through the path, and so must we. Renaming over it would need
        // write access to /dev, and as root would replace the device with a file.
        return std::fs::write(path, data);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o666)
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".dcache-out-");
    // Passed to open(2) as its mode, so the umask applies as it does to gcc's output.
    #[cfg(unix)]
    builder.permissions(mode);
    let mut tmp = builder.tempfile_in(dir)?;
    tmp.write_all(data)?;
    // A failure to remove shows again, with its cause, as the rename's.
    let _ = std::fs::remove_file(path);
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Whether `result` must be redone here to be exactly what the compiler gives: a failure
/// (quick, and never cached), or diagnostics from a compile that did not see the user's
/// files and locale. A remote server cannot quote the source lines gcc shows under a
/// diagnostic (it has only the preprocessed text, not the files it names) and writes in
/// its own locale; the embedded server compiles in this directory and locale, so its
/// output is exact unless the file names were `rewritten` for DCACHE_BASEDIR. Clean
/// compiles, the common case, are never redone.
pub fn needs_local_rerun(result: &dcache_proto::JobResult, remote: bool, rewritten: bool) -> bool {
    result.exit_code != 0 || ((remote || rewritten) && !result.stderr.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn only_failures_and_inexact_diagnostics_are_redone_locally() {
        let result = |exit_code, stderr: &'static [u8]| dcache_proto::JobResult {
            exit_code,
            stdout: bytes::Bytes::new(),
            stderr: bytes::Bytes::from_static(stderr),
            outputs: Vec::new(),
        };
        let clean = result(0, b"");
        let warned = result(0, b"warning: x");
        let failed = result(1, b"");
        // (remote, rewritten)
        for (remote, rewritten) in [(false, false), (true, false), (false, true)] {
            assert!(!needs_local_rerun(&clean, remote, rewritten));
            assert!(needs_local_rerun(&failed, remote, rewritten));
        }
        // The embedded server compiles here, in this locale: its warnings are exact...
        assert!(!needs_local_rerun(&warned, false, false));
        // ...unless the file names were rewritten; a remote server's never are.
        assert!(needs_local_rerun(&warned, false, true));
        assert!(needs_local_rerun(&warned, true, false));
    }

    #[test]
    fn devices_and_symlinks_are_written_through_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(Path::new("/dev/null"), b"discarded").unwrap();
        assert!(
            std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
        let target = dir.path().join("real.o");
        let link = dir.path().join("link.o");
        std::fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    #[cfg(unix)]
    fn outputs_get_the_mode_a_file_the_compiler_creates_gets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // What this process's umask makes of 0666, as gcc's own fopen gets.
        let reference = dir.path().join("reference");
        std::fs::File::create(&reference).unwrap();
        let want = std::fs::metadata(&reference).unwrap().permissions().mode() & 0o777;
        let p = dir.path().join("x.o");
        write_atomically(&p, b"obj").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(format!("{mode:o}"), format!("{want:o}"));
        assert_ne!(mode, 0o600, "not a private temporary file's mode");
    }

    #[test]
    fn atomic_write_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.o");
        std::fs::write(&p, b"old contents, longer").unwrap();
        write_atomically(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }
}
