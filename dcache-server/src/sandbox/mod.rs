//! The kernel sandbox every server-side compile runs in.
//!
//! The argument allow-list ([`crate::exec::args`]) stops a client from *asking* the compiler
//! to do something dangerous; it cannot stop the source itself from doing so: inline asm
//! can `.incbin` any file, a line marker makes gcc quote a line of any file in a
//! diagnostic, `#pragma` reaches the file system. So the compiler's whole process tree runs
//! confined, whatever it was asked:
//!
//! - **Landlock** (filesystem): read and execute only the toolchain the server resolved for
//!   this compiler (its binary, `cc1`/`cc1plus`, the assembler, their shared libraries and
//!   the dynamic loader), read-write only the job's private directory (and `/dev/null`);
//!   nothing else can be opened, listed or executed. Landlock (TCP, ABI 4+): no bind or
//!   connect. Landlock scopes (ABI 6+): no abstract Unix sockets or signals outside.
//! - **Namespaces** (when unprivileged user namespaces work): a new user, PID and network
//!   namespace, so the tree has no network interface at all and dies as one when its first
//!   process does.
//! - **no_new_privs**, and **resource limits** (address space, CPU time, file size, no
//!   core dumps) inherited by every process of the tree.
//! - **Its own process group**, killed as a whole when the job ends for any reason (see
//!   [`crate::exec`]).
//!
//! `#![forbid(unsafe_code)]` holds: the restrictions are applied by a small launcher
//! process — this very code, run as `<program> __dcache-sandbox …` — that restricts itself
//! and then executes the compiler. A program that serves compiles calls
//! [`run_launcher_if_requested`] first thing in `main`; the crate also ships a
//! `dcache-sandbox` binary that does only that.
//!
//! [`Sandbox::probe`] starts the launcher once and *tests* what it enforces (a read outside
//! the allowed paths must fail, a TCP connection must fail), so the report says what the
//! kernel actually does, not what was asked for.

mod launcher;
mod probe;
pub mod toolchain;

use std::path::{Path, PathBuf};

pub(crate) use launcher::setup_failure;
pub use launcher::{LAUNCHER_ARG, run_launcher_if_requested};
pub use probe::Protections;

/// Why the sandbox cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The launcher could not be started.
    #[error("cannot start the sandbox launcher {path}: {source}")]
    Launcher {
        /// The launcher program.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The launcher ran but its report could not be read.
    #[error("the sandbox probe failed: {0}")]
    Probe(String),
    /// The kernel does not enforce a protection the server requires.
    #[error("the kernel does not enforce {missing} (active: {active})")]
    NotEnforced {
        /// The protections missing.
        missing: String,
        /// What is active, for the log.
        active: Protections,
    },
}

/// Resource limits applied to every process of a compile (`setrlimit`, inherited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Address space of each process, in bytes (`RLIMIT_AS`): a memory bomb fails to
    /// allocate instead of taking the machine.
    pub address_space: u64,
    /// CPU seconds of each process (`RLIMIT_CPU`; the hard limit one second later kills).
    pub cpu_seconds: u64,
    /// Largest file a process may write, in bytes (`RLIMIT_FSIZE`): bounds the object, the
    /// assembler's temporary file and anything else written in the job directory.
    pub file_size: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            address_space: 4 << 30,
            cpu_seconds: 300,
            file_size: 256 << 20,
        }
    }
}

/// A working sandbox: the launcher program and what it was found to enforce.
#[derive(Clone, Debug)]
pub struct Sandbox {
    launcher: PathBuf,
    protections: Protections,
}

/// What one compile may touch: given to the launcher for each job.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    /// Files (and directories) the compiler may read and execute.
    pub toolchain: &'a [PathBuf],
    /// The job's private directory: the only place it may write.
    pub job_dir: &'a Path,
    /// Limits of every process in the tree.
    pub limits: ResourceLimits,
}

impl Sandbox {
    /// Starts `launcher` once in probe mode and records what the kernel enforces. Fails
    /// when Landlock's filesystem rules are not enforced: without them the sandbox would
    /// only pretend to contain anything.
    pub fn probe(launcher: &Path) -> Result<Self, SandboxError> {
        let protections = probe::run(launcher)?;
        let missing = protections.missing_required();
        if !missing.is_empty() {
            return Err(SandboxError::NotEnforced {
                missing: missing.join(", "),
                active: protections,
            });
        }
        Ok(Self {
            launcher: launcher.to_path_buf(),
            protections,
        })
    }

    /// What this sandbox enforces.
    pub fn protections(&self) -> &Protections {
        &self.protections
    }

    /// The command that runs `program args…` confined by `policy`: the launcher with its
    /// arguments, ready for the caller to add pipes, a working directory and environment.
    pub fn command(
        &self,
        program: &Path,
        args: &[std::ffi::OsString],
        policy: &Policy<'_>,
    ) -> std::process::Command {
        let mut c = std::process::Command::new(&self.launcher);
        c.args(launcher::encode(
            program,
            args,
            policy,
            self.protections.namespaces,
        ));
        c
    }
}
