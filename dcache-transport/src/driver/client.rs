//! The client side of the driver: a cloneable handle that submits jobs to one connection.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use dcache_proto::{
    CacheKey, ClientConfig, ClientConnection, ClientEvent, ConnectionError, ErrorCode, JobDesc,
    JobId, JobOutcome, Stat, Strategy,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::{Owner, drive};

/// Why a job submitted through a [`ClientHandle`] produced no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The server ended the job without a result. `REFUSED`, `OVERLOADED` and
    /// `SHUTTING_DOWN` mean "compile it locally or elsewhere"; `HASH_MISMATCH` means the
    /// key sent did not match the source.
    #[error("server ended the job with {code}: {message}")]
    Failed {
        /// The server's code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The connection failed or closed before the job ended; retry on another connection.
    #[error("connection lost: {0}")]
    Connection(ConnectionError),
    /// The connection is closed; open a new one.
    #[error("connection closed")]
    Closed,
    /// The job could not be started (for example a field too long to encode).
    #[error("job refused locally: {0}")]
    Rejected(String),
    /// The server sent nothing for the job for the connection's
    /// [`ClientConfig::progress_timeout`]: compile elsewhere or locally.
    #[error("no answer from the server for {after:?}")]
    TimedOut {
        /// How long the job went without a frame.
        after: std::time::Duration,
    },
    /// A [`ClientHandle::lookup`] found nothing: the server answered MISS.
    #[error("not in the server's cache")]
    NotCached,
}

/// A job handed to the driver.
struct Submission {
    token: u64,
    desc: JobDesc,
    key: Option<CacheKey>,
    strategy: Option<Strategy>,
    source: Bytes,
    how: Submit,
    reply: Reply,
    /// Told when the server answers the job's HASH with MISS (an [`OpenJob`] only).
    verdict: Option<oneshot::Sender<()>>,
}

enum Command {
    /// Boxed: a job description (with its compiler identity) is far larger than the
    /// other commands, which are sent per source chunk.
    Submit(Box<Submission>),
    /// More source for a job submitted without `fin`.
    Push {
        token: u64,
        data: Bytes,
        fin: bool,
    },
    Cancel {
        token: u64,
    },
    Stats {
        reply: oneshot::Sender<Result<Vec<Stat>, JobError>>,
    },
}

/// Submits jobs to one driven client connection. Cheap to clone; all clones share the
/// connection. The connection closes when every clone is dropped and its jobs are done.
#[derive(Clone, Debug)]
pub struct ClientHandle {
    commands: mpsc::UnboundedSender<Command>,
    tokens: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Sends a cancel for a job whose caller stopped waiting.
struct CancelOnDrop<'a> {
    handle: &'a ClientHandle,
    token: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self
                .handle
                .commands
                .send(Command::Cancel { token: self.token });
        }
    }
}

impl ClientHandle {
    /// Submits a job whose whole source is at hand. With a `key`, the connection's
    /// configured strategy applies; without, the source is sent whole with no HASH.
    /// Dropping the returned future cancels the job.
    pub async fn submit(
        &self,
        desc: JobDesc,
        key: Option<CacheKey>,
        source: Bytes,
    ) -> Result<JobOutcome, JobError> {
        self.submit_inner(desc, key, None, source).await
    }

    /// Like [`submit`](Self::submit) with an explicit strategy for this job.
    pub async fn submit_with(
        &self,
        desc: JobDesc,
        key: CacheKey,
        strategy: Strategy,
        source: Bytes,
    ) -> Result<JobOutcome, JobError> {
        self.submit_inner(desc, Some(key), Some(strategy), source)
            .await
    }

    /// Submits a job whose source arrives as a stream of chunks (a preprocessor's output as
    /// it is written, say): each chunk is sent as soon as the connection has room, so the
    /// server's compiler starts on the first bytes. The key of a stream is known only at
    /// its end, so the job goes without HASH; the server still answers from its cache,
    /// by the key it computes, once the source is complete. The source ends when the
    /// sender is dropped. Chunks wait in memory until sent. Dropping the returned future
    /// cancels the job.
    pub async fn submit_stream(
        &self,
        desc: JobDesc,
        mut source: mpsc::Receiver<Bytes>,
    ) -> Result<JobOutcome, JobError> {
        let (token, mut rx) = self.send_submit(desc, None, None, Bytes::new(), Submit::Streamed)?;
        let mut guard = CancelOnDrop {
            handle: self,
            token,
            armed: true,
        };
        let mut source_done = false;
        let result = loop {
            tokio::select! {
                biased;
                r = &mut rx => break r.unwrap_or(Err(JobError::Closed)),
                chunk = source.recv(), if !source_done => {
                    let (data, fin) = match chunk {
                        Some(data) => (data, false),
                        None => {
                            source_done = true;
                            (Bytes::new(), true)
                        }
                    };
                    // A closed connection answers the reply with an error: wait for it.
                    let _ = self.commands.send(Command::Push { token, data, fin });
                }
            }
        };
        guard.armed = false;
        result
    }

    /// Asks whether the server has the result for `key` without having the source at
    /// hand (a key remembered from an earlier compile): a [`Strategy::Lookup`] job, which
    /// the connection ends itself on MISS; one round trip and no source. `Ok(None)` is a
    /// miss.
    pub async fn lookup(
        &self,
        desc: JobDesc,
        key: CacheKey,
    ) -> Result<Option<JobOutcome>, JobError> {
        let submitted = self.send_submit(
            desc,
            Some(key),
            Some(Strategy::Lookup),
            Bytes::new(),
            Submit::NoSource,
        )?;
        match self.outcome(submitted).await {
            Ok(outcome) => Ok(Some(outcome)),
            Err(JobError::NotCached) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a speculative job with HASH `key` whose source the caller pushes chunk by
    /// chunk ([`OpenJob::push`]) and whose MISS verdict it is told of
    /// (its `missed` flag): what a relay needs to pass a client's job on as it arrives,
    /// HASH first, and to pass the server's verdict and result back at once. Dropping the
    /// [`OpenJob`] before its outcome cancels the job (ABORT goes to the server).
    ///
    /// `key` must be the key of the source that will be pushed: a server answers a HASH
    /// from its cache before it has the source to check it against.
    pub fn open_job(&self, desc: JobDesc, key: CacheKey) -> Result<OpenJob, JobError> {
        let (verdict, missed) = oneshot::channel();
        let (token, outcome) = self.send_submission(
            desc,
            Some(key),
            Some(Strategy::Speculative),
            Bytes::new(),
            Submit::Streamed,
            Some(verdict),
        )?;
        Ok(OpenJob {
            handle: self.clone(),
            token,
            outcome,
            missed: Some(missed),
            ended: false,
        })
    }

    /// Hands a job to the driver; returns its token and where its outcome will come.
    fn send_submit(
        &self,
        desc: JobDesc,
        key: Option<CacheKey>,
        strategy: Option<Strategy>,
        source: Bytes,
        how: Submit,
    ) -> Result<(u64, OutcomeReceiver), JobError> {
        self.send_submission(desc, key, strategy, source, how, None)
    }

    /// [`send_submit`](Self::send_submit), with `verdict` told of a MISS.
    fn send_submission(
        &self,
        desc: JobDesc,
        key: Option<CacheKey>,
        strategy: Option<Strategy>,
        source: Bytes,
        how: Submit,
        verdict: Option<oneshot::Sender<()>>,
    ) -> Result<(u64, OutcomeReceiver), JobError> {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let submission = Submission {
            token,
            desc,
            key,
            strategy,
            source,
            how,
            reply,
            verdict,
        };
        self.commands
            .send(Command::Submit(Box::new(submission)))
            .map_err(|_| JobError::Closed)?;
        Ok((token, rx))
    }

    /// Waits for a submitted job's outcome; dropping this future cancels the job.
    async fn outcome(&self, (token, rx): (u64, OutcomeReceiver)) -> Result<JobOutcome, JobError> {
        let mut guard = CancelOnDrop {
            handle: self,
            token,
            armed: true,
        };
        let result = rx.await.unwrap_or(Err(JobError::Closed));
        guard.armed = false;
        result
    }

    async fn submit_inner(
        &self,
        desc: JobDesc,
        key: Option<CacheKey>,
        strategy: Option<Strategy>,
        source: Bytes,
    ) -> Result<JobOutcome, JobError> {
        let submitted = self.send_submit(desc, key, strategy, source, Submit::Whole)?;
        self.outcome(submitted).await
    }

    /// The server's counters.
    pub async fn stats(&self) -> Result<Vec<Stat>, JobError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .map_err(|_| JobError::Closed)?;
        rx.await.unwrap_or(Err(JobError::Closed))
    }

    /// Whether the connection behind this handle has ended.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }
}

/// A job opened with [`ClientHandle::open_job`]: source pushed as it comes, the MISS
/// verdict and the outcome awaited separately. Dropping it before the outcome cancels the
/// job.
#[derive(Debug)]
pub struct OpenJob {
    handle: ClientHandle,
    token: u64,
    outcome: OutcomeReceiver,
    missed: Option<oneshot::Receiver<()>>,
    ended: bool,
}

impl OpenJob {
    /// Queues `data` (and, with `fin`, the end of the source) for the server. Ignored
    /// once the job has its answer: a result needs no more source.
    pub fn push(&self, data: Bytes, fin: bool) {
        let _ = self.handle.commands.send(Command::Push {
            token: self.token,
            data,
            fin,
        });
    }

    /// The next thing the server says about the job: its MISS verdict (at most once), or
    /// its outcome (last). Cancel-safe, so it can be one branch of a `select!` in a loop.
    pub async fn next(&mut self) -> JobUpdate {
        if let Some(missed) = &mut self.missed {
            tokio::select! {
                biased;
                r = &mut self.outcome => {
                    self.missed = None;
                    self.ended = true;
                    return JobUpdate::Outcome(r.unwrap_or(Err(JobError::Closed)));
                }
                r = missed => {
                    self.missed = None;
                    if r.is_ok() {
                        return JobUpdate::Miss;
                    }
                }
            }
        }
        let r = (&mut self.outcome).await.unwrap_or(Err(JobError::Closed));
        self.ended = true;
        JobUpdate::Outcome(r)
    }
}

/// What [`OpenJob::next`] reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum JobUpdate {
    /// The server answered the HASH with MISS: the upload goes on.
    Miss,
    /// The job has ended, with this result or error. Nothing follows it.
    Outcome(Result<JobOutcome, JobError>),
}

impl Drop for OpenJob {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self
                .handle
                .commands
                .send(Command::Cancel { token: self.token });
        }
    }
}

/// Starts a task driving a client connection over `stream` and returns its handle.
/// Must be called within a tokio runtime.
pub fn spawn_client<S>(stream: S, config: ClientConfig) -> ClientHandle
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let now = super::now();
    let nonce = config.auth.as_ref().and_then(|_| super::fresh_nonce());
    let machine = match nonce {
        Some(nonce) => ClientConnection::with_nonce(config, now, nonce),
        None => ClientConnection::new(config, now),
    };
    let owner = ClientOwner {
        commands: rx,
        pending: HashMap::new(),
        stats: VecDeque::new(),
        closed: false,
    };
    tokio::spawn(drive(machine, stream, owner));
    ClientHandle {
        commands: tx,
        tokens: Arc::new(AtomicU64::new(1)),
    }
}

type Reply = oneshot::Sender<Result<JobOutcome, JobError>>;

/// How a job's source comes with its submission.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Submit {
    /// All of it, at once.
    Whole,
    /// In `Push` commands that follow.
    Streamed,
    /// None at all: a lookup.
    NoSource,
}
type OutcomeReceiver = oneshot::Receiver<Result<JobOutcome, JobError>>;

struct ClientOwner {
    commands: mpsc::UnboundedReceiver<Command>,
    /// Open jobs by id: the one map, so nothing is kept in sync by hand. Events (the hot
    /// path) find their job directly; the rarer commands that name a handle's token
    /// (more source, cancel) scan it.
    pending: HashMap<JobId, Pending>,
    stats: VecDeque<oneshot::Sender<Result<Vec<Stat>, JobError>>>,
    closed: bool,
}

/// A job a handle waits for.
struct Pending {
    /// The handle's name for the job, given before the job had an id.
    token: u64,
    reply: Reply,
    /// Told of a MISS verdict, for an owner that passes verdicts on (a relay).
    verdict: Option<oneshot::Sender<()>>,
}

impl ClientOwner {
    fn job_of(&self, token: u64) -> Option<JobId> {
        self.pending
            .iter()
            .find_map(|(&job, p)| (p.token == token).then_some(job))
    }

    fn finish(&mut self, job: JobId, result: Result<JobOutcome, JobError>) {
        if let Some(p) = self.pending.remove(&job) {
            let _ = p.reply.send(result);
        }
    }
}

impl ClientOwner {
    /// Starts a submitted job; a job the machine refuses is answered at once.
    fn start(&mut self, machine: &mut ClientConnection, s: Submission, now: Instant) {
        if self.closed {
            let _ = s.reply.send(Err(JobError::Closed));
            return;
        }
        let started = match s.strategy {
            Some(strategy) => machine.start_job_with(now, s.desc, s.key, strategy),
            None => machine.start_job(now, s.desc, s.key),
        };
        match started {
            Ok(job) => {
                // Cannot fail: the job was just started and has no source yet.
                if s.how == Submit::Whole {
                    let _ = machine.push_source(job, s.source, true);
                }
                let pending = Pending {
                    token: s.token,
                    reply: s.reply,
                    verdict: s.verdict,
                };
                self.pending.insert(job, pending);
            }
            Err(e) => {
                let _ = s.reply.send(Err(JobError::Rejected(e.to_string())));
            }
        }
    }
}

impl Owner<ClientConnection> for ClientOwner {
    type Command = Command;

    async fn on_event(&mut self, _machine: &mut ClientConnection, event: ClientEvent) {
        match event {
            ClientEvent::NotCached { job } => self.finish(job, Err(JobError::NotCached)),
            ClientEvent::Miss { job } => {
                if let Some(tx) = self.pending.get_mut(&job).and_then(|p| p.verdict.take()) {
                    let _ = tx.send(());
                }
            }
            ClientEvent::TimedOut { job, after } => {
                self.finish(job, Err(JobError::TimedOut { after }));
            }
            ClientEvent::Done { job, outcome } => self.finish(job, Ok(outcome)),
            ClientEvent::Failed { job, code, message } => {
                self.finish(job, Err(JobError::Failed { code, message }));
            }
            ClientEvent::Stats(stats) => {
                if let Some(reply) = self.stats.pop_front() {
                    let _ = reply.send(Ok(stats));
                }
            }
            ClientEvent::Closed { error } => {
                self.closed = true;
                let err = error.map_or(JobError::Closed, JobError::Connection);
                for (_, p) in self.pending.drain() {
                    let _ = p.reply.send(Err(err.clone()));
                }
                for reply in self.stats.drain(..) {
                    let _ = reply.send(Err(err.clone()));
                }
                // Refuse further commands: handles see the channel closed.
                self.commands.close();
            }
            _ => {}
        }
    }

    async fn next_command(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    fn apply(&mut self, machine: &mut ClientConnection, command: Command, now: Instant) {
        match command {
            Command::Submit(s) => self.start(machine, *s, now),
            Command::Push { token, data, fin } => {
                if let Some(job) = self.job_of(token) {
                    // Refused only when the job already has its answer (a result needs no
                    // more source) or is gone: nothing to do either way.
                    let _ = machine.push_source(job, data, fin);
                }
            }
            Command::Cancel { token } => {
                if let Some(job) = self.job_of(token) {
                    self.pending.remove(&job);
                    let _ = machine.cancel(job);
                }
            }
            Command::Stats { reply } => match machine.request_stats() {
                Ok(()) => self.stats.push_back(reply),
                Err(_) => {
                    let _ = reply.send(Err(JobError::Closed));
                }
            },
        }
    }

    fn on_owner_gone(&mut self, machine: &mut ClientConnection) {
        // Every handle is gone, so nobody waits for the open jobs: cancel them, and close
        // cleanly once the server has acknowledged.
        for (job, _) in self.pending.drain() {
            let _ = machine.cancel(job);
        }
        machine.shutdown();
    }
}
