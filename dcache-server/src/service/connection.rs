//! The per-connection actor: one task per connection, reacting to protocol events and to
//! the completion of its lookups and compiles.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dcache_proto::{CacheKey, ErrorCode, JobDesc, JobId, JobResult, ResultOrigin, ServerEvent};
use dcache_transport::{BoxedStream, ServerCommand, spawn_server_connection};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::task::AbortHandle;

use super::Service;
use super::job_log::{self, Clock, Outcome};
use crate::counters::{Counters, Front, Outcome as Tally, SandboxLimit};
use crate::exec::{CompilerId, ExecError, store_key};
use crate::flight::{Flight, Lead, Published};
use crate::slots::{ConnId, SlotPermit};
use crate::spool::Spool;
use crate::store::StoreKey;

/// Serves one connection over `stream` until it closes, holding `handshake` (a place in
/// the handshake pool, if it took one) until the peer has completed its handshake.
/// `stop` turning true asks for a graceful end (GOAWAY).
pub(super) async fn run(
    service: Arc<Service>,
    stream: BoxedStream,
    mut stop: watch::Receiver<bool>,
    mut handshake: Option<OwnedSemaphorePermit>,
    peer: Arc<str>,
    front: Front,
) {
    Counters::bump(&service.counters.connections);
    let _open = OpenGuard::new(&service.open);
    let mut conn = spawn_server_connection(stream, service.config.protocol.clone());
    let (internal_tx, mut internal) = mpsc::unbounded_channel();
    let mut actor = Connection {
        id: service.next_conn.fetch_add(1, Ordering::Relaxed),
        service: service.clone(),
        commands: conn.commands.clone(),
        internal: internal_tx,
        jobs: HashMap::new(),
        peer,
        front,
    };
    let mut stopping = *stop.borrow();
    if stopping {
        let _ = conn.commands.send(ServerCommand::GoAway);
    }
    loop {
        tokio::select! {
            // Protocol events first: a job the connection has already ended (a HASH that
            // the whole source, arrived in the same read, proved a lie) is gone before a
            // lookup's answer for it is handled, so nothing is counted or sent for it.
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
                        // Authenticated and agreed: its place in the handshake pool
                        // goes to the next newcomer.
                        drop(handshake.take());
                    }
                    actor.on_event(ev);
                }
                None => break,
            },
            Some(msg) = internal.recv() => actor.on_internal(msg),
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    let _ = conn.commands.send(ServerCommand::GoAway);
                }
            }
        }
    }
    actor.abort_all();
}

/// What the actor's own tasks (lookups, slot waits, compiles, upload checks) report
/// back to it.
enum Internal {
    /// A lookup finished: `Some` is a result to send early, `None` a miss.
    Looked {
        job: JobId,
        result: Option<JobResult>,
    },
    /// A job whose whole source waited got a compile slot.
    Slot { job: JobId, permit: SlotPermit },
    /// Time to check that a job holding a slot still receives its source fast enough.
    CheckUpload { job: JobId },
    /// A compile finished.
    Compiled {
        job: JobId,
        result: Result<JobResult, ExecError>,
        took: std::time::Duration,
    },
}

/// Where a job's arriving source goes.
#[derive(Default)]
enum Feed {
    /// No compile yet; source is kept until one starts.
    #[default]
    Buffering,
    /// A compile is reading the source as it arrives.
    Streaming(mpsc::UnboundedSender<Bytes>),
    /// The compile has all the source, or no compile will run.
    Closed,
}

/// One job of the connection, from JOB until its answer or cancellation.
struct Job {
    desc: JobDesc,
    compiler: CompilerId,
    /// The client's HASH bound to our compiler; lookups only, never storage.
    claimed: Option<StoreKey>,
    /// Set by SourceDone: the key of what was actually received.
    verified: Option<StoreKey>,
    spool: Option<Spool>,
    feed: Feed,
    /// Waiting for the verdict of a lookup: do not start compiling yet.
    lookup_pending: bool,
    /// This job leads the single-flight group of `claimed`.
    leader: Option<Lead>,
    task: Option<AbortHandle>,
    done: bool,
    /// Source bytes received so far, and at the last upload-rate check.
    received: u64,
    received_at_check: u64,
    /// The ticker of upload-rate checks while the job streams into a compile slot.
    watchdog: Option<AbortHandle>,
    /// When it started, and its compile: the durations its log line reports.
    clock: Clock,
    /// When its latest lookup started, for the hit latency.
    looked_up_at: Option<tokio::time::Instant>,
}

/// The actor's state: the connection's jobs and the ways to reach the driver and itself.
struct Connection {
    id: ConnId,
    service: Arc<Service>,
    commands: mpsc::UnboundedSender<ServerCommand>,
    internal: mpsc::UnboundedSender<Internal>,
    jobs: HashMap<JobId, Job>,
    /// Who is on the other end, for the log.
    peer: Arc<str>,
    /// The front end this connection serves (distcc requests come through in-process
    /// connections of their own).
    front: Front,
}

impl Connection {
    fn send(&self, cmd: ServerCommand) {
        send(&self.commands, cmd);
    }

    /// The job's one log line, where it ends.
    fn log_end(&self, j: &Job, outcome: Outcome, result: Option<&JobResult>, detail: Option<&str>) {
        job_log::Line {
            outcome,
            peer: &self.peer,
            desc: &j.desc,
            key: j.verified.as_ref().or(j.claimed.as_ref()),
            source_bytes: j.received,
            result,
            clock: Some(&j.clock),
            detail,
        }
        .emit();
    }

    fn on_event(&mut self, ev: ServerEvent) {
        let counters = &self.service.counters;
        match ev {
            ServerEvent::JobStarted { job, desc } => match self.service.executor.check(&desc) {
                Ok(compiler) => {
                    self.jobs.insert(
                        job,
                        Job {
                            desc,
                            compiler,
                            claimed: None,
                            verified: None,
                            spool: Some(Spool::new(self.service.budget.clone())),
                            feed: Feed::Buffering,
                            lookup_pending: false,
                            leader: None,
                            task: None,
                            done: false,
                            received: 0,
                            received_at_check: 0,
                            watchdog: None,
                            clock: Clock::start(),
                            looked_up_at: None,
                        },
                    );
                }
                Err(e) => {
                    counters.jobs.bump(self.front, Tally::Refused);
                    let message = e.to_string();
                    job_log::Line {
                        outcome: Outcome::Refused,
                        peer: &self.peer,
                        desc: &desc,
                        key: None,
                        source_bytes: 0,
                        result: None,
                        clock: None,
                        detail: Some(&message),
                    }
                    .emit();
                    self.send(ServerCommand::Abort {
                        job,
                        code: e.error_code(),
                        message,
                    });
                }
            },
            ServerEvent::Lookup { job, key } => self.lookup(job, key),
            ServerEvent::Source { job, data } => {
                counters
                    .source_bytes_received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                j.received += data.len() as u64;
                match &j.feed {
                    Feed::Streaming(tx) => {
                        let _ = tx.send(data);
                    }
                    Feed::Buffering => {
                        let kept = j.spool.as_mut().map(|s| s.push(data));
                        if let Some(Err(e)) = kept {
                            // No room on disk either: this job cannot wait; the others can.
                            let message =
                                format!("cannot keep the source until a compile slot frees: {e}");
                            if let Some(j) = self.jobs.remove(&job) {
                                self.log_end(&j, Outcome::Overloaded, None, Some(&message));
                                j.finish(None);
                            }
                            self.send(ServerCommand::Abort {
                                job,
                                code: ErrorCode::OVERLOADED,
                                message,
                            });
                            return;
                        }
                        self.maybe_start(job, false);
                    }
                    Feed::Closed => {}
                }
            }
            ServerEvent::SourceDone { job, key, .. } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                let verified = store_key(&j.compiler, &key);
                j.verified = Some(verified);
                match std::mem::replace(&mut j.feed, Feed::Closed) {
                    // Dropping the sender ends the compiler's stdin.
                    Feed::Streaming(_) | Feed::Closed => {}
                    Feed::Buffering => {
                        j.feed = Feed::Buffering;
                        if j.claimed.is_none() {
                            // A HASH-less upload: the verified key may still be cached.
                            self.lookup_verified(job, verified);
                        } else {
                            self.maybe_start(job, true);
                        }
                    }
                }
            }
            ServerEvent::JobCancelled { job, code, .. } => {
                let outcome = if code == ErrorCode::HASH_MISMATCH {
                    Counters::bump(&counters.hash_mismatches);
                    Outcome::HashMismatch
                } else {
                    Outcome::Cancelled
                };
                if let Some(j) = self.jobs.remove(&job) {
                    self.log_end(&j, outcome, None, None);
                    j.finish(None);
                }
            }
            ServerEvent::StatsRequested => self.send(ServerCommand::Stats(self.service.stats())),
            // Counted as it happens, so STATS is current while the connection lives on.
            ServerEvent::SourceSkipped { bytes, .. } => {
                counters
                    .source_bytes_saved
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn lookup(&mut self, job: JobId, key: CacheKey) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let sk = store_key(&j.compiler, &key);
        j.claimed = Some(sk);
        j.lookup_pending = true;
        j.looked_up_at = Some(tokio::time::Instant::now());
        let service = self.service.clone();
        let internal = self.internal.clone();
        // Join an identical compile in flight, or lead one: decided now, synchronously, so
        // two jobs racing on one key cannot both lead.
        let joined = match service.flights.lead_or_join(sk) {
            Flight::Lead(lead) => {
                j.leader = Some(lead);
                None
            }
            Flight::Join(join) => Some(join),
        };
        let leading = joined.is_none();
        let handle = tokio::spawn(async move {
            let cached = service.store.get(&sk).await;
            let result = match (cached, joined) {
                (Some(r), _) => Some(r),
                (None, Some(join)) => {
                    Counters::bump(&service.counters.single_flight_waits);
                    match join.wait().await {
                        Published::Result(r) => Some(r),
                        Published::Failed => None,
                    }
                }
                (None, None) => None,
            };
            let _ = internal.send(Internal::Looked { job, result });
        });
        if !leading {
            j.task = Some(handle.abort_handle());
        }
    }

    fn lookup_verified(&mut self, job: JobId, sk: StoreKey) {
        let service = self.service.clone();
        let internal = self.internal.clone();
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.lookup_pending = true;
        j.looked_up_at = Some(tokio::time::Instant::now());
        tokio::spawn(async move {
            let result = service.store.get(&sk).await;
            let _ = internal.send(Internal::Looked { job, result });
        });
    }

    fn on_internal(&mut self, msg: Internal) {
        let counters = &self.service.counters;
        match msg {
            Internal::Looked { job, result } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                j.lookup_pending = false;
                j.task = None;
                match result {
                    Some(result) => {
                        counters.jobs.bump(self.front, Tally::Hit);
                        if let Some(at) = j.looked_up_at {
                            counters.hit_latency.observe(at.elapsed());
                        }
                        // The answer to a HASH is EARLY_RESULT even when the upload
                        // happened to finish first; a HASH-less upload gets RESULT.
                        let early = j.claimed.is_some();
                        if early {
                            counters.jobs.bump(self.front, Tally::Early);
                        }
                        if let Some(j) = self.jobs.remove(&job) {
                            let outcome = if early { Outcome::Early } else { Outcome::Hit };
                            self.log_end(&j, outcome, Some(&result), None);
                            j.finish(Some(&result));
                        }
                        let origin = if early {
                            ResultOrigin::Early
                        } else {
                            ResultOrigin::Cache
                        };
                        self.send(ServerCommand::Result {
                            job,
                            result,
                            origin,
                        });
                    }
                    None => {
                        counters.jobs.bump(self.front, Tally::Miss);
                        let verdict = j.claimed.is_some() && j.verified.is_none();
                        let complete = j.verified.is_some();
                        if verdict {
                            self.send(ServerCommand::Miss(job));
                        }
                        // With no source yet (an ask-first job, or a client only asking
                        // whether a remembered key is cached), the compiler starts with
                        // the first chunk: a client that stops at MISS costs no process.
                        let started_sending = self
                            .jobs
                            .get(&job)
                            .and_then(|j| j.spool.as_ref())
                            .is_some_and(|s| !s.is_empty());
                        if complete || started_sending {
                            self.maybe_start(job, complete);
                        }
                    }
                }
            }
            Internal::Slot { job, permit } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.task = None;
                    self.start_compile(job, permit, true);
                }
            }
            Internal::CheckUpload { job } => self.check_upload(job),
            Internal::Compiled { job, result, took } => {
                counters.compile_duration.observe(took);
                if let Some(limit) = limit_hit(&result) {
                    counters.sandbox_limits.bump(limit);
                }
                let Some(mut j) = self.jobs.remove(&job) else {
                    return;
                };
                j.clock.compile_ends();
                match result {
                    Ok(result) => {
                        Counters::bump(&counters.compiles);
                        if result.exit_code != 0 {
                            counters.jobs.bump(self.front, Tally::Failed);
                        }
                        let publish = j.verified.is_some()
                            && j.verified == j.claimed
                            && result.exit_code == 0;
                        // Store only under the verified key, only successes, and only when
                        // the compile saw the whole source.
                        if let (Some(vk), 0) = (j.verified, result.exit_code) {
                            // The single-flight group keeps answering lookups with this
                            // result until the store has it, so a job arriving meanwhile
                            // is still a hit.
                            let lead = if publish { j.leader.take() } else { None };
                            if let Some(lead) = &lead {
                                lead.publish(result.clone());
                            }
                            self.service.store_writer.write(vk, result.clone(), lead);
                        }
                        j.done = true;
                        let outcome = if result.exit_code == 0 {
                            Outcome::Miss
                        } else {
                            Outcome::Failed
                        };
                        self.log_end(&j, outcome, Some(&result), None);
                        j.finish(publish.then_some(&result));
                        self.send(ServerCommand::Result {
                            job,
                            result,
                            origin: ResultOrigin::Compiled,
                        });
                    }
                    Err(e) => {
                        j.done = true;
                        let message = e.to_string();
                        self.log_end(&j, Outcome::Error, None, Some(&message));
                        if let Some(cause) = server_fault(&j.desc, &e) {
                            self.service.errors.report(&cause, &message);
                        }
                        j.finish(None);
                        self.send(ServerCommand::Abort {
                            job,
                            code: e.error_code(),
                            message,
                        });
                    }
                }
            }
        }
    }

    /// Starts the compile of `job` when it may: not while a lookup is pending, and only
    /// with a compile slot. With a slot free now, the compile streams the source as it
    /// arrives; otherwise the source stays in the job's spool (counted against the memory
    /// budget, or on disk) until the source is complete and a slot frees.
    fn maybe_start(&mut self, job: JobId, complete: bool) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.lookup_pending || j.task.is_some() || !matches!(j.feed, Feed::Buffering) {
            return;
        }
        let complete = complete || j.verified.is_some();
        // A HASH-less job is looked up by its verified key before compiling; a spilled
        // one is replayed only whole.
        if !complete && (j.claimed.is_none() || j.spool.as_ref().is_some_and(Spool::spilled)) {
            return;
        }
        match self.service.slots.try_acquire() {
            Some(permit) => self.start_compile(job, permit, complete),
            None if complete => {
                // Queue for a slot, in this connection's turn; the source stays in the
                // spool until one is granted.
                let waiting = self.service.slots.acquire(self.id);
                let internal = self.internal.clone();
                let handle = tokio::spawn(async move {
                    if let Ok(permit) = waiting.await {
                        let _ = internal.send(Internal::Slot { job, permit });
                    }
                });
                j.task = Some(handle.abort_handle());
            }
            // No slot yet and more source to come: keep spooling.
            None => {}
        }
    }

    /// Runs the compile of `job` in a slot, fed from its spool and then, unless the source
    /// is `complete`, from the chunks still arriving.
    fn start_compile(&mut self, job: JobId, permit: SlotPermit, complete: bool) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(spool) = j.spool.take() {
            spool.drain_into(&tx);
        }
        j.feed = if complete {
            Feed::Closed
        } else {
            // The slot is held while the rest of the source arrives: watch that it does.
            let interval = self.service.config.upload_check_interval;
            let internal = self.internal.clone();
            j.received_at_check = j.received;
            let ticker = tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                loop {
                    tick.tick().await;
                    if internal.send(Internal::CheckUpload { job }).is_err() {
                        return;
                    }
                }
            });
            j.watchdog = Some(ticker.abort_handle());
            Feed::Streaming(tx)
        };
        let service = self.service.clone();
        let internal = self.internal.clone();
        let desc = j.desc.clone();
        j.clock.compile_starts();
        let handle = tokio::spawn(async move {
            let _permit = permit;
            let started = tokio::time::Instant::now();
            let result = service.executor.compile(desc, rx).await;
            let took = started.elapsed();
            let _ = internal.send(Internal::Compiled { job, result, took });
        });
        j.task = Some(handle.abort_handle());
    }

    /// Ends a job whose upload, while it holds a compile slot, fell below the minimum
    /// rate: the slot goes to someone else, the client compiles locally.
    fn check_upload(&mut self, job: JobId) {
        let config = &self.service.config;
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if !matches!(j.feed, Feed::Streaming(_)) {
            if let Some(w) = j.watchdog.take() {
                w.abort();
            }
            return;
        }
        let want = config
            .min_upload_rate
            .saturating_mul(config.upload_check_interval.as_millis() as u64)
            / 1000;
        let got = j.received - j.received_at_check;
        j.received_at_check = j.received;
        if got >= want {
            return;
        }
        Counters::bump(&self.service.counters.slow_uploads_ended);
        let rate = config.min_upload_rate;
        let message = format!(
            "the upload slowed below {rate} bytes/s while holding a compile slot \
             ({got} bytes in {:?}); the slot was given to another job",
            config.upload_check_interval
        );
        if let Some(j) = self.jobs.remove(&job) {
            self.log_end(&j, Outcome::Timeout, None, Some(&message));
            j.finish(None);
        }
        self.send(ServerCommand::Abort {
            job,
            code: ErrorCode::TIMEOUT,
            message,
        });
    }

    fn abort_all(&mut self) {
        for (_, j) in std::mem::take(&mut self.jobs) {
            self.log_end(&j, Outcome::Disconnected, None, None);
            j.finish(None);
        }
    }
}

impl Job {
    /// Ends the job's local state: stops its task and, if it led a single-flight group,
    /// publishes `published` and ends the group (which tells the joiners it failed if
    /// nothing was published).
    fn finish(self, published: Option<&JobResult>) {
        if let Some(w) = &self.watchdog {
            w.abort();
        }
        if let Some(task) = &self.task {
            if !self.done {
                task.abort();
            }
        }
        if let (Some(lead), Some(result)) = (&self.leader, published) {
            lead.publish(result.clone());
        }
        // Dropping `self` drops its lead, if any: that ends the group.
    }
}

/// The cause under which a failed compile is logged, if the failure is this server's
/// (every job would meet it: a compiler that cannot be started, a sandbox that cannot be
/// set up) rather than the job's own (its time or output limit).
fn server_fault(desc: &JobDesc, e: &ExecError) -> Option<String> {
    match e {
        ExecError::Io(io) => Some(format!("exec {}: {:?}", desc.compiler, io.kind())),
        ExecError::Sandbox(_) => Some(format!("sandbox {}", desc.compiler)),
        _ => None,
    }
}

/// The sandbox limit that stopped a compile, when the result shows one: the time limit
/// or an output over the limit (the executor says so), or the kernel's signal for CPU
/// time (SIGXCPU) or file size (SIGXFSZ) as the exit status of a killed compiler.
fn limit_hit(result: &Result<JobResult, ExecError>) -> Option<SandboxLimit> {
    const KILLED_BY_SIGXCPU: i32 = 128 + 24;
    const KILLED_BY_SIGXFSZ: i32 = 128 + 25;
    match result {
        Err(ExecError::Timeout(_)) => Some(SandboxLimit::Time),
        Err(ExecError::OutputTooLarge { .. }) => Some(SandboxLimit::Output),
        Ok(r) if r.exit_code == KILLED_BY_SIGXCPU => Some(SandboxLimit::Cpu),
        Ok(r) if r.exit_code == KILLED_BY_SIGXFSZ => Some(SandboxLimit::Output),
        _ => None,
    }
}

/// Sends a command to the connection. A failed send means the connection is already
/// gone, which the event loop sees as its Closed event.
fn send(commands: &mpsc::UnboundedSender<ServerCommand>, cmd: ServerCommand) {
    let _ = commands.send(cmd);
}

/// Counts a connection as open for as long as it lives, however its handler ends.
pub(crate) struct OpenGuard<'a>(&'a AtomicUsize);

impl<'a> OpenGuard<'a> {
    pub(crate) fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
