//! A relay's per-connection actor: one task per client connection, reacting to protocol
//! events, to its local-tier lookups and to the reports of its jobs' forwarding tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dcache_proto::{CacheKey, ErrorCode, JobDesc, JobId, JobResult, ResultOrigin, ServerEvent};
use dcache_transport::{BoxedStream, ServerCommand, spawn_server_connection};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::task::AbortHandle;

use super::Upstreams;
use super::forward::{Chunk, Report, Shared, forward};
use crate::counters::{Counters, Front, Outcome};
use crate::exec::{CompilerId, store_key};
use crate::service::{OpenGuard, Service};
use crate::store::StoreKey;

/// Serves one client connection of a relay over `stream` until it closes (see
/// [`crate::service`]'s own `connection::run`, whose admission, handshake pool and
/// graceful stop this shares).
pub(crate) async fn run(
    service: Arc<Service>,
    upstreams: Arc<Upstreams>,
    stream: BoxedStream,
    mut stop: watch::Receiver<bool>,
    mut handshake: Option<OwnedSemaphorePermit>,
) {
    Counters::bump(&service.counters.connections);
    let _open = OpenGuard::new(&service.open);
    let mut conn = spawn_server_connection(stream, service.config.protocol.clone());
    let (looked_tx, mut looked) = mpsc::unbounded_channel();
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let mut actor = Relay {
        service: service.clone(),
        upstreams,
        commands: conn.commands.clone(),
        looked: looked_tx,
        reports: report_tx,
        jobs: HashMap::new(),
    };
    let mut stopping = *stop.borrow();
    if stopping {
        let _ = conn.commands.send(ServerCommand::GoAway);
    }
    loop {
        tokio::select! {
            // Protocol events first, as in the server's own actor: a job the client has
            // ended is gone before a late answer for it is handled.
            biased;
            ev = conn.events.recv() => match ev {
                Some(ServerEvent::Closed { error }) => {
                    if let Some(e) = &error {
                        service.counters.connection_errors.bump(e);
                    }
                    break;
                }
                Some(ev) => {
                    if matches!(ev, ServerEvent::Connected { .. }) {
                        drop(handshake.take());
                    }
                    actor.on_event(ev);
                }
                None => break,
            },
            Some((job, result)) = looked.recv() => actor.on_looked(job, result),
            Some(report) = reports.recv() => actor.on_report(report),
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    let _ = conn.commands.send(ServerCommand::GoAway);
                }
            }
        }
    }
    // Dropping the jobs aborts their tasks: ABORT goes upstream for each.
    for (_, j) in actor.jobs.drain() {
        j.end();
    }
}

/// Where a job is.
enum Stage {
    /// Waiting for HASH, the local lookup, or (without HASH) the whole source; the source
    /// received so far is kept here.
    Local { held: Vec<Bytes>, fin: bool },
    /// Passed on: the source goes to the forwarding task.
    Forwarded(mpsc::UnboundedSender<Chunk>),
}

/// One client job.
struct Job {
    desc: JobDesc,
    compiler: CompilerId,
    /// The client's HASH, if it sent one.
    key: Option<CacheKey>,
    /// The key of the source actually received, once it is whole.
    verified: Option<CacheKey>,
    stage: Stage,
    /// Its local lookup or forwarding task.
    task: Option<AbortHandle>,
}

impl Job {
    fn end(self) {
        if let Some(t) = self.task {
            t.abort();
        }
    }
}

struct Relay {
    service: Arc<Service>,
    upstreams: Arc<Upstreams>,
    commands: mpsc::UnboundedSender<ServerCommand>,
    looked: mpsc::UnboundedSender<(JobId, Option<JobResult>)>,
    reports: mpsc::UnboundedSender<Report>,
    jobs: HashMap<JobId, Job>,
}

/// Looks `sk` up in the local tier; the answer comes back on `looked` as `(job, result)`.
fn look_up(
    service: &Arc<Service>,
    looked: &mpsc::UnboundedSender<(JobId, Option<JobResult>)>,
    job: JobId,
    sk: StoreKey,
) -> AbortHandle {
    let service = service.clone();
    let looked = looked.clone();
    tokio::spawn(async move {
        let result = service.store.get(&sk).await;
        let _ = looked.send((job, result));
    })
    .abort_handle()
}

impl Relay {
    fn send(&self, cmd: ServerCommand) {
        // A failed send means the connection is gone, which the loop sees as Closed.
        let _ = self.commands.send(cmd);
    }

    fn abort(&mut self, job: JobId, code: ErrorCode, message: String) {
        if let Some(j) = self.jobs.remove(&job) {
            j.end();
        }
        self.send(ServerCommand::Abort { job, code, message });
    }

    fn on_event(&mut self, ev: ServerEvent) {
        let counters = &self.service.counters;
        match ev {
            ServerEvent::JobStarted { job, desc } => match self.service.check_job(&desc) {
                Ok(compiler) => {
                    self.jobs.insert(
                        job,
                        Job {
                            desc,
                            compiler,
                            key: None,
                            verified: None,
                            stage: Stage::Local {
                                held: Vec::new(),
                                fin: false,
                            },
                            task: None,
                        },
                    );
                }
                Err(e) => {
                    counters.jobs.bump(Front::Dcache, Outcome::Refused);
                    self.send(ServerCommand::Abort {
                        job,
                        code: e.error_code(),
                        message: e.to_string(),
                    });
                }
            },
            ServerEvent::Lookup { job, key } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                j.key = Some(key);
                let sk = store_key(&j.compiler, &key);
                j.task = Some(look_up(&self.service, &self.looked, job, sk));
            }
            ServerEvent::Source { job, data } => {
                counters
                    .source_bytes_received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                match &mut j.stage {
                    // The protocol bounds one job's source (max_source), so this is too.
                    Stage::Local { held, .. } => held.push(data),
                    Stage::Forwarded(tx) => {
                        let _ = tx.send(Chunk { data, fin: false });
                    }
                }
            }
            ServerEvent::SourceDone { job, key, .. } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                j.verified = Some(key);
                match &mut j.stage {
                    Stage::Forwarded(tx) => {
                        let _ = tx.send(Chunk {
                            data: Bytes::new(),
                            fin: true,
                        });
                    }
                    Stage::Local { fin, .. } => {
                        *fin = true;
                        if j.key.is_none() {
                            // A HASH-less upload: the verified key may be cached here.
                            let sk = store_key(&j.compiler, &key);
                            j.task = Some(look_up(&self.service, &self.looked, job, sk));
                        }
                    }
                }
            }
            ServerEvent::JobCancelled { job, code, .. } => {
                if code == ErrorCode::HASH_MISMATCH {
                    Counters::bump(&counters.hash_mismatches);
                }
                // Dropping the job aborts its task, and with it the upstream job.
                if let Some(j) = self.jobs.remove(&job) {
                    j.end();
                }
            }
            ServerEvent::StatsRequested => self.send(ServerCommand::Stats(self.service.stats())),
            ServerEvent::SourceSkipped { bytes, .. } => {
                counters
                    .source_bytes_saved
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn on_looked(&mut self, job: JobId, result: Option<JobResult>) {
        let counters = self.service.counters.clone();
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.task = None;
        if let Some(result) = result {
            counters.jobs.bump(Front::Dcache, Outcome::Hit);
            let origin = if j.key.is_some() {
                counters.jobs.bump(Front::Dcache, Outcome::Early);
                ResultOrigin::Early
            } else {
                ResultOrigin::Cache
            };
            if let Some(j) = self.jobs.remove(&job) {
                j.end();
            }
            self.send(ServerCommand::Result {
                job,
                result,
                origin,
            });
            return;
        }
        counters.jobs.bump(Front::Dcache, Outcome::Miss);
        // Not here: pass it on, HASH first (the client's, or the key of the whole source
        // this relay received and hashed itself), then what source there is.
        let Some(key) = j.key.or(j.verified) else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Stage::Local { held, fin } = std::mem::replace(&mut j.stage, Stage::Forwarded(tx)) {
            if let Stage::Forwarded(tx) = &j.stage {
                for data in held {
                    let _ = tx.send(Chunk { data, fin: false });
                }
                if fin {
                    let _ = tx.send(Chunk {
                        data: Bytes::new(),
                        fin: true,
                    });
                }
            }
        }
        let shared = Shared {
            upstreams: self.upstreams.clone(),
            budget: self.service.budget().clone(),
            counters,
        };
        let task = tokio::spawn(forward(
            shared,
            job,
            j.desc.clone(),
            key,
            rx,
            self.reports.clone(),
        ));
        j.task = Some(task.abort_handle());
    }

    fn on_report(&mut self, report: Report) {
        let counters = self.service.counters.clone();
        match report {
            Report::Miss(job) => {
                // Only a job that sent HASH gets a verdict, and only while it uploads.
                if self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.key.is_some() && j.verified.is_none())
                {
                    self.send(ServerCommand::Miss(job));
                }
            }
            Report::Done(job, outcome) => {
                let Some(j) = self.jobs.remove(&job) else {
                    return;
                };
                let result = outcome.result;
                let cached = outcome.origin.is_cached();
                if cached {
                    Counters::bump(&counters.upstream_hits);
                }
                if result.exit_code == 0 {
                    // Keep it here too, under a key this relay can vouch for: the key it
                    // asked the upstream for (a cached answer: the upstream stores only
                    // what it verified), or, for a compile, the key of what this relay
                    // received, when that is the key it asked for.
                    let key = match (cached, outcome.key) {
                        (true, Some(asked)) => Some(asked),
                        (false, Some(asked)) if j.verified == Some(asked) => Some(asked),
                        _ => None,
                    };
                    if let Some(key) = key {
                        let sk = store_key(&j.compiler, &key);
                        self.service.store_writer.write(sk, result.clone(), None);
                    }
                }
                let origin = match (cached, j.key.is_some()) {
                    (true, true) => ResultOrigin::Early,
                    (true, false) => ResultOrigin::Cache,
                    (false, _) => ResultOrigin::Compiled,
                };
                if origin == ResultOrigin::Early {
                    counters.jobs.bump(Front::Dcache, Outcome::Early);
                }
                j.end();
                self.send(ServerCommand::Result {
                    job,
                    result,
                    origin,
                });
            }
            Report::Failed { job, code, message } => {
                if self.jobs.contains_key(&job) {
                    self.abort(job, code, message);
                }
            }
        }
    }
}
