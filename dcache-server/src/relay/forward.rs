//! One job passed on upstream: its task tries the upstreams in rendezvous order, pushes
//! the source as the client sends it, and reports verdict and outcome to the connection's
//! actor. Aborting the task drops the upstream job, which sends ABORT upstream.

use std::sync::Arc;

use bytes::Bytes;
use dcache_proto::{CacheKey, ErrorCode, JobDesc, JobId, JobOutcome};
use dcache_transport::{JobError, JobUpdate};
use tokio::sync::mpsc;

use super::Upstreams;
use crate::Counters;
use crate::spool::{Budget, MemoryShare};

/// A piece of the client's source, passed on to the forwarding task.
pub(super) struct Chunk {
    pub(super) data: Bytes,
    pub(super) fin: bool,
}

/// What a forwarding task reports to its connection's actor.
pub(super) enum Report {
    /// The upstream answered the HASH with MISS.
    Miss(JobId),
    /// The upstream gave a result.
    Done(JobId, JobOutcome),
    /// The job ends without a result: the code and message the client gets.
    Failed {
        job: JobId,
        code: ErrorCode,
        message: String,
    },
}

/// The source a job has sent so far, kept to replay to the next upstream if the one
/// working on it fails. Held within the service's memory budget: when the budget has no
/// room, the copy is dropped and the job can no longer fall through once it has sent
/// source (it still runs on its upstream).
struct Replay {
    chunks: Vec<Bytes>,
    shares: Vec<MemoryShare>,
    fin: bool,
    /// False once a chunk could not be kept.
    whole: bool,
}

impl Replay {
    fn new() -> Self {
        Self {
            chunks: Vec::new(),
            shares: Vec::new(),
            fin: false,
            whole: true,
        }
    }

    fn keep(&mut self, budget: &Arc<Budget>, chunk: &Chunk) {
        self.fin |= chunk.fin;
        if !self.whole || chunk.data.is_empty() {
            return;
        }
        match budget.share(chunk.data.len()) {
            Some(share) => {
                self.shares.push(share);
                self.chunks.push(chunk.data.clone());
            }
            None => {
                self.whole = false;
                self.chunks.clear();
                self.shares.clear();
            }
        }
    }

    /// Whether another upstream can be given this job from its start.
    fn replayable(&self) -> bool {
        self.whole
    }
}

/// What every forwarding task of a relay shares.
pub(super) struct Shared {
    /// The upstreams and their connections.
    pub(super) upstreams: Arc<Upstreams>,
    /// The memory allowance replay copies are held within.
    pub(super) budget: Arc<Budget>,
    /// The relay's counters.
    pub(super) counters: Arc<Counters>,
}

/// Passes job `job` (`desc`, HASH `key`) upstream: tries each candidate upstream once, in
/// rendezvous order, replaying the source held so far; reports to `report`. `source`
/// ends (its sender dropped) when the actor no longer wants the job.
pub(super) async fn forward(
    shared: Shared,
    job: JobId,
    desc: JobDesc,
    key: CacheKey,
    mut source: mpsc::UnboundedReceiver<Chunk>,
    report: mpsc::UnboundedSender<Report>,
) {
    let Shared {
        upstreams,
        budget,
        counters,
    } = shared;
    let mut replay = Replay::new();
    let mut failures: Vec<String> = Vec::new();
    let mut mismatch: Option<String> = None;
    let mut first = true;
    // Each upstream is tried once, or twice when its connection turned out to be closing
    // (a restarted upstream): the list is finite, so this loop ends.
    let mut order: std::collections::VecDeque<(usize, bool)> = upstreams
        .candidates(&key)
        .into_iter()
        .map(|i| (i, false))
        .collect();
    while let Some((i, retry)) = order.pop_front() {
        if !first {
            if !replay.replayable() {
                failures.push("(the source could not be kept for another upstream)".into());
                break;
            }
            if !retry {
                Counters::bump(&counters.upstream_fallthroughs);
            }
        }
        first = false;
        let name = upstreams.name(i).to_owned();
        let handle = match upstreams.connection(i).await {
            Ok(h) => h,
            Err(e) => {
                upstreams.mark_down(i, &e);
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut up = match handle.open_job(desc.clone(), key) {
            Ok(up) => up,
            Err(e) => {
                upstreams.mark_down(i, &e.to_string());
                upstreams.drop_connection(i).await;
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        Counters::bump(&counters.upstream_jobs);
        for data in &replay.chunks {
            up.push(data.clone(), false);
        }
        if replay.fin {
            up.push(Bytes::new(), true);
        }
        let outcome = loop {
            tokio::select! {
                biased;
                update = up.next() => match update {
                    JobUpdate::Outcome(r) => break r,
                    JobUpdate::Miss => {
                        let _ = report.send(Report::Miss(job));
                    }
                    _ => {}
                },
                chunk = source.recv(), if !replay.fin => match chunk {
                    Some(chunk) => {
                        replay.keep(&budget, &chunk);
                        up.push(chunk.data, chunk.fin);
                    }
                    // The client's job is over (cancelled): dropping `up` aborts it upstream.
                    None => return,
                },
            }
        };
        match outcome {
            Ok(outcome) => {
                upstreams.mark_up(i);
                let _ = report.send(Report::Done(job, outcome));
                return;
            }
            Err(JobError::Failed { code, message }) => {
                upstreams.mark_up(i);
                match code {
                    // This upstream lacks the client's compiler; another may have it.
                    ErrorCode::COMPILER_MISMATCH => mismatch = Some(message),
                    // Busy or stopping: another upstream may do better.
                    ErrorCode::OVERLOADED | ErrorCode::SHUTTING_DOWN | ErrorCode::TIMEOUT => {
                        failures.push(format!("{name}: {code}: {message}"));
                    }
                    // Refused, a lying hash, too large, a failed compile: the same job
                    // would fare the same elsewhere. The client hears it as is.
                    _ => {
                        let _ = report.send(Report::Failed { job, code, message });
                        return;
                    }
                }
            }
            // The connection would take no new job (it is going away): once more on a
            // fresh one.
            Err(JobError::Rejected(_) | JobError::Closed) if !retry => {
                upstreams.drop_connection(i).await;
                order.push_front((i, true));
            }
            Err(e @ JobError::Rejected(_)) => {
                let _ = report.send(Report::Failed {
                    job,
                    code: ErrorCode::REFUSED,
                    message: format!("the relay cannot pass this job on: {e}"),
                });
                return;
            }
            // The connection failed or the upstream went silent: skip it for a while.
            Err(e) => {
                Counters::bump(&counters.upstream_failures);
                upstreams.mark_down(i, &e.to_string());
                upstreams.drop_connection(i).await;
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    let (code, message) = match mismatch {
        Some(message) => (ErrorCode::COMPILER_MISMATCH, message),
        None => (
            ErrorCode::OVERLOADED,
            if failures.is_empty() {
                let names: Vec<String> = upstreams
                    .addresses()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                format!(
                    "no upstream reachable: every upstream ({}) failed recently and is being \
                     skipped",
                    names.join(", ")
                )
            } else {
                format!("no upstream reachable: {}", failures.join("; "))
            },
        ),
    };
    let _ = report.send(Report::Failed { job, code, message });
}
