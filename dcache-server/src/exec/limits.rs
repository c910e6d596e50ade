//! Hard bounds on one compile, and the process-tree guard that enforces its end.

use crate::sandbox::ResourceLimits;

/// What one compile may consume. Every bound has a safe default and ends the job with a
/// clear error (or, for the text streams, a note) when reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecLimits {
    /// Memory, CPU time and file size of every process of the compile (enforced by the
    /// kernel inside the sandbox; file size also checked on the outputs without it).
    pub resources: ResourceLimits,
    /// Bytes of stdout kept; beyond it the text is cut with a note (the compiler keeps
    /// running, its further output is read and dropped).
    pub max_stdout: usize,
    /// Bytes of stderr kept, likewise: a diagnostic flood cannot pin server memory.
    pub max_stderr: usize,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            resources: ResourceLimits::default(),
            max_stdout: 1 << 20,
            max_stderr: 1 << 20,
        }
    }
}

/// The process group of one compile: every process the compiler starts stays in it (and,
/// in the sandbox, in its PID namespace), so killing the group ends the whole tree. Killed
/// when dropped, so an aborted, timed-out, disconnected or shut-down job never leaves a
/// compiler behind with its slot already given back.
#[derive(Debug)]
pub(crate) struct ProcessTree {
    group: Option<nix::unistd::Pid>,
}

impl ProcessTree {
    /// Guards the group led by the process `pid` (started with `process_group(0)`).
    pub(crate) fn new(pid: Option<u32>) -> Self {
        Self {
            group: pid
                .and_then(|p| i32::try_from(p).ok())
                .map(nix::unistd::Pid::from_raw),
        }
    }

    /// Kills every process left in the group.
    pub(crate) fn kill(&mut self) {
        if let Some(group) = self.group.take() {
            // ESRCH (nothing left) is the normal case after a clean exit.
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for ProcessTree {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a stream to its end, keeping at most `max` bytes; beyond that the rest is read
/// and dropped (so the writer never blocks on a full pipe) and a note is appended.
pub(crate) async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    max: usize,
    what: &str,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut dropped = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = max.saturating_sub(kept.len());
        let take = room.min(n);
        kept.extend_from_slice(&buf[..take]);
        dropped += (n - take) as u64;
    }
    if dropped > 0 {
        kept.extend_from_slice(
            format!("\n[dcache: {what} cut at {max} bytes; {dropped} more bytes dropped]\n")
                .as_bytes(),
        );
    }
    kept
}
