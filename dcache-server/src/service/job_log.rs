//! The one log line each job gets where it ends (at debug level: `dcache-server -v`):
//! its outcome, key prefix, compiler, sizes, durations and peer, as structured fields so
//! a JSON log (`--log-format json`) carries them as keys.

use std::time::Duration;

use dcache_proto::{JobDesc, JobResult};
use tokio::time::Instant;

use crate::store::StoreKey;

/// The log target of the per-job lines, so a filter can select them alone
/// (`dcache_server::job=debug`).
pub(crate) const TARGET: &str = "dcache_server::job";

/// How a job ended. The names are the `outcome` field's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Answered from the cache while the client was still uploading (EARLY_RESULT).
    Early,
    /// Answered from the cache after the whole upload (a HASH-less job).
    Hit,
    /// Compiled, successfully.
    Miss,
    /// Compiled; the compiler reported an error (its diagnostics went back).
    Failed,
    /// Refused before any work: compiler, option or identity not accepted here.
    Refused,
    /// The compile could not run or finish (an executor error).
    Error,
    /// The client cancelled it.
    Cancelled,
    /// Its source did not match its HASH.
    HashMismatch,
    /// Its upload stalled while it held a compile slot.
    Timeout,
    /// No room to keep its source until a slot frees.
    Overloaded,
    /// Its connection closed before it ended.
    Disconnected,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Early => "early",
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::HashMismatch => "hash_mismatch",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::Disconnected => "disconnected",
        }
    }
}

/// When a job started, and its compile if one ran: the durations of its line.
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    started: Instant,
    compile_started: Option<Instant>,
    compile: Option<Duration>,
}

impl Clock {
    /// A job starting now.
    pub(super) fn start() -> Self {
        Self {
            started: Instant::now(),
            compile_started: None,
            compile: None,
        }
    }

    /// Its compile starts now.
    pub(super) fn compile_starts(&mut self) {
        self.compile_started = Some(Instant::now());
    }

    /// Its compile ended now.
    pub(super) fn compile_ends(&mut self) {
        self.compile = self.compile_started.map(|s| s.elapsed());
    }
}

/// What the line says about one job.
pub(super) struct Line<'a> {
    pub(super) outcome: Outcome,
    pub(super) peer: &'a str,
    pub(super) desc: &'a JobDesc,
    pub(super) key: Option<&'a StoreKey>,
    pub(super) source_bytes: u64,
    pub(super) result: Option<&'a JobResult>,
    pub(super) clock: Option<&'a Clock>,
    /// Why it ended, for the outcomes that are not answers.
    pub(super) detail: Option<&'a str>,
}

impl Line<'_> {
    /// Emits the line (a no-op unless the job target is enabled at debug).
    pub(super) fn emit(&self) {
        if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
            return;
        }
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let key = self
            .key
            .map(|k| k.to_hex()[..16].to_owned())
            .unwrap_or_default();
        let output_bytes = self.result.map_or(0, |r| {
            r.outputs.iter().map(|o| o.data.len() as u64).sum::<u64>()
        });
        let exit_code = self.result.map(|r| r.exit_code);
        let total_ms = self.clock.map(|c| ms(c.started.elapsed()));
        let compile_ms = self.clock.and_then(|c| c.compile).map(ms);
        tracing::debug!(
            target: TARGET,
            outcome = self.outcome.as_str(),
            key = %key,
            compiler = %self.desc.compiler,
            peer = %self.peer,
            source_bytes = self.source_bytes,
            source_len = self.desc.source_len,
            output_bytes,
            exit_code,
            total_ms,
            compile_ms,
            detail = self.detail,
            "job {}",
            self.outcome.as_str()
        );
    }
}
