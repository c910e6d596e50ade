//! The client end of a connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, AuthKey, FEATURE_AUTH, Nonce};
use crate::compress::FEATURE_ZSTD;
use crate::conn::{
    self, Connection, Core, CoreJob, Endpoint, MAX_TIMEOUT, internal, protocol, unexpected,
};
use crate::error::{CommandError, ConnectionError};
use crate::error_code::ErrorCode;
use crate::frame::{Frame, Hello, JobId, Limits, ResultHead, ResultOrigin, Stat};
use crate::handshake::{check_peer_limits, clamp_own_limits, negotiate};
use crate::job::{JobDesc, JobResult, OutputFile};
use crate::key::CacheKey;
use crate::outbox::Segments;
use crate::{CLIENT_VERSION_MIN, VERSION_MAX};

/// How a client uses HASH. All three run on the same code so they can be compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// HASH, then the source at once without waiting: a hit costs one round trip and a miss
    /// costs nothing extra. The default.
    Speculative,
    /// HASH, then wait for the verdict before sending any source: no byte is wasted on a
    /// hit, a miss pays one extra round trip.
    AskFirst,
    /// No HASH: the server compiles (or finds the result by the key it computes itself
    /// once it has the whole source). How an old or simple client talks.
    SendAll,
    /// HASH, then wait for the verdict, with no source at hand (a key remembered from an
    /// earlier compile, say): a hit comes back as a result like any other, and a MISS ends
    /// the job at once with [`ClientEvent::NotCached`] (the client cancels it; the server
    /// compiles nothing). One round trip and no source either way. Chosen per job with
    /// [`ClientConnection::start_job_with`]; such a job takes no
    /// [`push_source`](ClientConnection::push_source).
    Lookup,
}

impl Strategy {
    /// The name used in configuration (`speculative`, `ask-first`, `send-all`) and in
    /// reports (`lookup`, which is chosen per job, not configured: it takes no source).
    pub fn name(self) -> &'static str {
        match self {
            Self::Speculative => "speculative",
            Self::AskFirst => "ask-first",
            Self::SendAll => "send-all",
            Self::Lookup => "lookup",
        }
    }
}

/// A strategy name that is not one of the configurable three.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?}: expected speculative, ask-first or send-all")]
pub struct UnknownStrategy(pub String);

impl std::str::FromStr for Strategy {
    type Err = UnknownStrategy;

    /// Parses a configuration name. `lookup` is not one: it is chosen per job, for a job
    /// with no source at hand.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "speculative" => Ok(Self::Speculative),
            "ask-first" => Ok(Self::AskFirst),
            "send-all" => Ok(Self::SendAll),
            other => Err(UnknownStrategy(other.to_owned())),
        }
    }
}

/// A job whose declared source is shorter than this sends it uncompressed even on a
/// connection that compresses: a few hundred bytes rarely shrink, and never by much.
pub const MIN_COMPRESSED_SOURCE: u64 = 1024;

/// Settings of a [`ClientConnection`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// What we accept from the server; only `max_frame_payload` matters on this side.
    pub limits: Limits,
    /// Largest SOURCE chunk we send. Smaller chunks interleave concurrent jobs more finely
    /// and let an early result stop the upload sooner; larger ones cost fewer headers.
    pub chunk_size: u32,
    /// The default strategy for jobs started with a key ([`ClientConnection::start_job`]).
    pub strategy: Strategy,
    /// How long the server may take to answer HELLO (at most [`MAX_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// How long a job the server owes an answer (a verdict to its HASH, or a result once
    /// its whole source has been pushed) may go without a frame from the server before it
    /// fails with [`ClientEvent::TimedOut`]; the owner then compiles elsewhere or locally.
    /// Counted from when the answer became owed and again from each frame for the job.
    /// The server sends nothing while it compiles, so this must exceed the longest
    /// compile worth waiting for, plus the upload: a job that outlives it is given up, not
    /// lost, since the owner falls back. Default 330 s: a little more than a server's
    /// default compile time limit (300 s), so a compile the server would still finish is
    /// waited for. At most [`MAX_TIMEOUT`].
    pub progress_timeout: Duration,
    /// Largest result body we accept (stdout + stderr + outputs).
    pub max_result_len: u64,
    /// Authenticate with this shared token's key (see [`AuthKey`]), and insist that the
    /// server proves it holds the key too before any job is sent. Needs a connection made
    /// with [`ClientConnection::with_nonce`]. Jobs then wait for the handshake instead of
    /// being pipelined behind HELLO: one round trip per connection, not per job.
    pub auth: Option<AuthKey>,
    /// Announce the `ZSTD` feature and, when the server announces it too, send SOURCE
    /// compressed at this zstd level (a chunk that does not shrink goes out as it is) and
    /// accept compressed result data. `None` (the default) announces nothing: every byte
    /// is as without the feature. Whether it pays depends on the link: the owner decides
    /// (dcache-client's rule), and may still turn it off per job with
    /// [`ClientConnection::set_job_compression`]. Source that would be pipelined before the server's
    /// HELLO waits for it (the server's support is not known yet, and uncompressed
    /// chunks pipelined into a socket buffer would defeat the point): JOB and HASH are
    /// still pipelined, so a hit costs the same, and a miss on a fresh connection waits
    /// at most one round trip, once per connection.
    pub compression: Option<i32>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            chunk_size: 64 * 1024,
            strategy: Strategy::Speculative,
            handshake_timeout: Duration::from_secs(10),
            progress_timeout: Duration::from_secs(330),
            max_result_len: 1024 * 1024 * 1024,
            auth: None,
            compression: None,
        }
    }
}

/// What a finished job produced and what it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOutcome {
    /// The compiler's output.
    pub result: JobResult,
    /// Where the result came from: compiled for this job (a miss), found in the cache
    /// after a HASH-less upload, or found in answer to HASH before the upload finished
    /// (EARLY_RESULT). See [`ResultOrigin::is_cached`] and [`ResultOrigin::is_early`].
    pub origin: ResultOrigin,
    /// The cache key the job was sent with (its HASH), if it had one: what a caller
    /// remembers to look the result up again later.
    pub key: Option<CacheKey>,
    /// The strategy the job ran with.
    pub strategy: Strategy,
    /// Source bytes put on the wire for this job.
    pub source_bytes_sent: u64,
    /// Source bytes that never had to be sent because the result came first.
    pub source_bytes_skipped: u64,
}

/// Something the owner of a [`ClientConnection`] must know.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The server's HELLO arrived and a version was agreed.
    Connected {
        /// The agreed version.
        version: u16,
        /// The server's HELLO (its limits in particular).
        server: Hello,
    },
    /// The server does not have the result; the upload goes on (or starts, for ask-first).
    Miss {
        /// The job.
        job: JobId,
    },
    /// A [`Strategy::Lookup`] job found nothing: the server answered MISS, and the job has
    /// ended without a result (nothing more is reported for it).
    NotCached {
        /// The job.
        job: JobId,
    },
    /// A job finished with a result (which may be a failed compile: see its exit code).
    Done {
        /// The job.
        job: JobId,
        /// Its result and costs.
        outcome: JobOutcome,
    },
    /// The server ended a job without a result (refused, overloaded, hash mismatch...).
    Failed {
        /// The job.
        job: JobId,
        /// Why.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// A job heard nothing from the server for [`ClientConfig::progress_timeout`]: it has
    /// ended here (the server is told with ABORT) and nothing more is reported for it.
    TimedOut {
        /// The job.
        job: JobId,
        /// How long it went without a frame.
        after: Duration,
    },
    /// The server's counters, in answer to [`ClientConnection::request_stats`].
    Stats(Vec<Stat>),
    /// The server will take no new jobs on this connection; open jobs still finish.
    GoAway,
    /// The connection is over; `error` is `None` for a clean close. Jobs not reported
    /// `Done` or `Failed` are lost and may be retried elsewhere.
    Closed {
        /// Why, when it was not clean.
        error: Option<ConnectionError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking { deadline: Instant },
    Open,
    GoingAway,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// Ask-first: waiting for the verdict before sending source.
    Blocked,
    /// Source may be sent.
    Open,
    /// FIN or ABORT sent; nothing more goes out for this job.
    Closed,
}

#[derive(Debug)]
enum Download {
    /// Nothing (or only MISS) received yet.
    Waiting,
    /// A result head arrived; the body is being assembled.
    Receiving {
        head: ResultHead,
        origin: ResultOrigin,
        body: BytesMut,
        total: u64,
    },
    /// Result complete or ABORT received.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Job {
    desc: JobDesc,
    key: Option<CacheKey>,
    strategy: Strategy,
    announced: bool,
    upload: Upload,
    source: Segments,
    source_fin: bool,
    pushed: u64,
    sent: u64,
    in_ready: bool,
    verdict: bool,
    download: Download,
    cancelled: bool,
    /// When the job last heard from the server (or started): its entry in `silent`.
    heard: Instant,
    /// Whether its source may go out compressed (the connection permitting).
    compress: bool,
    /// Source waits for the server's HELLO: with compression configured, chunks
    /// pipelined before it would go out uncompressed, and a socket buffer takes far more
    /// than one round trip's worth. JOB and HASH still go at once, so a hit is as fast.
    held: bool,
}

impl Job {
    /// Whether the server owes this job an answer, so its silence counts: a verdict to
    /// a HASH, or a result once the owner has given the whole source. Not while the
    /// owner is still producing source after the verdict (the wait is then the owner's).
    fn owed(&self) -> bool {
        !self.cancelled
            && !matches!(self.download, Download::Closed)
            && (self.source_fin || (self.key.is_some() && !self.verdict))
    }

    fn sendable(&self) -> bool {
        self.announced
            && !self.held
            && self.upload == Upload::Open
            && (!self.source.is_empty() || self.source_fin)
    }

    fn total_len(&self) -> u64 {
        self.desc.source_len.unwrap_or(self.pushed).max(self.pushed)
    }
}

/// The client end of a dcache connection, without IO.
///
/// # Driving it
/// Through [`Connection`], in the order of the crate's run loop (see the crate
/// documentation). Commands: [`start_job`](Self::start_job),
/// [`push_source`](Self::push_source), [`cancel`](Self::cancel),
/// [`request_stats`](Self::request_stats), [`shutdown`](Self::shutdown),
/// [`Connection::close`].
///
/// The HELLO is queued at construction and the first jobs may be started at once: their
/// frames follow the HELLO without waiting for the server's answer, within the protocol's
/// baseline limits.
#[derive(Debug)]
pub struct ClientConnection {
    config: ClientConfig,
    state: State,
    core: Core<Job, ClientEvent>,
    next_job: u32,
    announced: usize,
    waiting: VecDeque<u32>,
    stats_pending: u32,
    /// GOAWAY's `last_job`, once received: jobs above it were not accepted, and an ABORT
    /// the server sent for one of them may still arrive after we have dropped it.
    goaway_last_job: Option<u32>,
    /// Our authentication challenge, when the owner supplied one.
    nonce: Option<Nonce>,
    /// Stats requests made before authentication completed, not yet sent.
    stats_held: u32,
    /// Jobs owed an answer, by when they last heard from the server: the first entry is
    /// the next to time out.
    silent: BTreeSet<(Instant, u32)>,
    /// Jobs whose owner finished the source in a command that has no `now`: their timer
    /// starts at the next call that has one.
    unclocked: Vec<u32>,
}

impl ClientConnection {
    /// A new connection that has queued its HELLO.
    ///
    /// For [`ClientConfig::auth`] use [`with_nonce`](Self::with_nonce) instead: this crate
    /// has no randomness of its own.
    pub fn new(config: ClientConfig, now: Instant) -> Self {
        Self::build(config, now, None)
    }

    /// A new connection whose authentication challenge is `nonce`: 32 bytes from a
    /// cryptographic random source, never reused.
    pub fn with_nonce(config: ClientConfig, now: Instant, nonce: Nonce) -> Self {
        Self::build(config, now, Some(nonce))
    }

    fn build(mut config: ClientConfig, now: Instant, nonce: Option<Nonce>) -> Self {
        config.limits = clamp_own_limits(config.limits);
        config.handshake_timeout = config.handshake_timeout.min(MAX_TIMEOUT);
        config.progress_timeout = config.progress_timeout.min(MAX_TIMEOUT);
        config.chunk_size = config.chunk_size.max(1);
        let mut core = Core::new(config.limits.max_frame_payload);
        let (features, extensions) = match (&config.auth, nonce) {
            (Some(_), Some(n)) => (FEATURE_AUTH, Bytes::copy_from_slice(&n)),
            _ => (0, Bytes::new()),
        };
        let features = features
            | if config.compression.is_some() {
                FEATURE_ZSTD
            } else {
                0
            };
        let hello = Frame::Hello(Hello {
            min_version: CLIENT_VERSION_MIN,
            max_version: VERSION_MAX,
            limits: config.limits,
            features,
            extensions,
        });
        core.outbox.control(&hello);
        Self {
            core,
            state: State::Handshaking {
                deadline: now + config.handshake_timeout,
            },
            config,
            next_job: 1,
            announced: 0,
            waiting: VecDeque::new(),
            stats_pending: 0,
            goaway_last_job: None,
            nonce,
            stats_held: 0,
            silent: BTreeSet::new(),
            unclocked: Vec::new(),
        }
    }

    // ----- getters -----

    /// Whether the handshake has completed.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Open | State::GoingAway)
    }

    /// Whether new jobs may still be started.
    pub fn accepts_jobs(&self) -> bool {
        matches!(self.state, State::Handshaking { .. } | State::Open)
    }

    /// Jobs started and not yet finished (including those waiting for a slot).
    pub fn jobs_open(&self) -> usize {
        self.core.jobs.len()
    }

    /// The limits in force for what we send: the server's, or the baseline before its HELLO.
    pub fn peer_limits(&self) -> Limits {
        self.core.peer
    }

    /// Source bytes sent so far for `job`, if it is open.
    pub fn source_bytes_sent(&self, job: JobId) -> Option<u64> {
        self.core.jobs.get(&job.0).map(|j| j.sent)
    }

    // ----- commands -----

    /// Starts a job. With a `key` the job uses the configured strategy (speculative or
    /// ask-first); without one it is sent whole with no HASH.
    pub fn start_job(
        &mut self,
        now: Instant,
        desc: JobDesc,
        key: Option<CacheKey>,
    ) -> Result<JobId, CommandError> {
        let strategy = match key {
            Some(_) => self.config.strategy,
            None => Strategy::SendAll,
        };
        self.start_job_with(now, desc, key, strategy)
    }

    /// Starts a job with an explicit strategy. `SendAll` ignores the key; the other
    /// strategies need one.
    pub fn start_job_with(
        &mut self,
        now: Instant,
        desc: JobDesc,
        key: Option<CacheKey>,
        strategy: Strategy,
    ) -> Result<JobId, CommandError> {
        match self.state {
            State::Closed => return Err(CommandError::Closed),
            State::GoingAway => return Err(CommandError::GoingAway),
            _ => {}
        }
        let key = match strategy {
            Strategy::SendAll => None,
            _ => Some(key.ok_or(CommandError::WrongState {
                job: self.next_job,
                why: "speculative, ask-first and lookup jobs need a cache key",
            })?),
        };
        // Refuse what the server would refuse, before it costs a frame.
        Frame::Job {
            job: JobId(self.next_job),
            desc: desc.clone(),
        }
        .encode(Limits::BASELINE.max_frame_payload)?;
        let id = self.next_job;
        let desc_len = desc.source_len;
        // The id space is 2^32 jobs per connection; the owner opens a new connection long
        // before, but refuse rather than wrap if it does not.
        self.next_job = self.next_job.checked_add(1).ok_or(CommandError::Closed)?;
        self.core.jobs.insert(
            id,
            Job {
                desc,
                key,
                strategy,
                announced: false,
                upload: Upload::Blocked,
                source: Segments::default(),
                source_fin: false,
                pushed: 0,
                sent: 0,
                in_ready: false,
                verdict: false,
                download: Download::Waiting,
                cancelled: false,
                heard: now,
                // A source known to be tiny gains nothing worth a frame's CPU.
                compress: desc_len.is_none_or(|n| n >= MIN_COMPRESSED_SOURCE),
                held: self.config.compression.is_some()
                    && matches!(self.state, State::Handshaking { .. }),
            },
        );
        self.waiting.push_back(id);
        self.retime(id, now);
        self.announce_waiting();
        Ok(JobId(id))
    }

    /// Adds source bytes to a job; `fin` marks the end. The bytes are shared, not copied,
    /// and go out in chunks as the transport takes them. After the job's result arrived
    /// they are dropped silently: the server no longer wants them.
    pub fn push_source(&mut self, job: JobId, data: Bytes, fin: bool) -> Result<(), CommandError> {
        let j = self
            .core
            .jobs
            .get_mut(&job.0)
            .ok_or(CommandError::UnknownJob(job.0))?;
        if j.source_fin {
            return Err(CommandError::SourceFinished(job.0));
        }
        if j.strategy == Strategy::Lookup {
            return Err(CommandError::WrongState {
                job: job.0,
                why: "a lookup takes no source",
            });
        }
        j.pushed += data.len() as u64;
        j.source_fin = fin;
        if j.upload != Upload::Closed {
            j.source.push(data);
        }
        if fin {
            self.unclocked.push(job.0);
        }
        self.mark_ready(job.0);
        Ok(())
    }

    /// Lets a job's source go out compressed, or not, from its next chunk on (default:
    /// on, when [`ClientConfig::compression`] is set and the server agreed). The owner's
    /// per-job say: a source too small to gain, or already compressed.
    pub fn set_job_compression(&mut self, job: JobId, on: bool) -> Result<(), CommandError> {
        let j = self
            .core
            .jobs
            .get_mut(&job.0)
            .ok_or(CommandError::UnknownJob(job.0))?;
        j.compress = on;
        Ok(())
    }

    /// Whether both HELLOs announced `ZSTD`, so this connection compresses.
    pub fn compression_negotiated(&self) -> bool {
        self.core.compresses()
    }

    /// Source and result-body bytes handed out so far, as (before compression, on the
    /// wire): what compression saved on this connection's uploads.
    pub fn bulk_bytes_sent(&self) -> (u64, u64) {
        (self.core.bulk_plain_bytes, self.core.bulk_wire_bytes)
    }

    /// Cancels a job. No event is reported for it afterwards. A job that has ended (or was
    /// cancelled already) is unknown, even while the connection still drains its frames.
    pub fn cancel(&mut self, job: JobId) -> Result<(), CommandError> {
        let j = self
            .core
            .jobs
            .get_mut(&job.0)
            .filter(|j| !j.cancelled)
            .ok_or(CommandError::UnknownJob(job.0))?;
        j.cancelled = true;
        self.silent.remove(&(j.heard, job.0));
        if !j.announced {
            self.waiting.retain(|&id| id != job.0);
            self.remove_job(job.0);
            return Ok(());
        }
        if j.upload != Upload::Closed || matches!(j.download, Download::Waiting) {
            // While uploading, and also after the final SOURCE while no answer has
            // begun (the server is compiling): ABORT ends just this job, and the server
            // answers it. A result already arriving is let finish.
            j.upload = Upload::Closed;
            j.source.clear();
            self.core
                .outbox
                .abort(job, ErrorCode::CANCELLED, "cancelled");
        }
        self.maybe_forget(job.0);
        Ok(())
    }

    /// Asks the server for its counters; the answer comes as [`ClientEvent::Stats`].
    pub fn request_stats(&mut self) -> Result<(), CommandError> {
        if self.state == State::Closed {
            return Err(CommandError::Closed);
        }
        self.stats_pending += 1;
        if self.auth_pending() {
            // Nothing but HELLO and AUTH may precede the proof; sent once it is out.
            self.stats_held += 1;
        } else {
            self.core.outbox.control(&Frame::StatsRequest);
        }
        Ok(())
    }

    /// Whether a token is configured and the server has not yet proved itself.
    fn auth_pending(&self) -> bool {
        self.config.auth.is_some() && matches!(self.state, State::Handshaking { .. })
    }

    /// Ends the connection gracefully: no new jobs; waiting jobs (not yet sent) are dropped,
    /// and once the jobs already sent have ended the connection closes cleanly, with no
    /// ERROR frame, so the server sees a plain end of stream.
    pub fn shutdown(&mut self) {
        if matches!(self.state, State::Closed) {
            return;
        }
        for id in std::mem::take(&mut self.waiting) {
            self.remove_job(id);
        }
        self.state = State::GoingAway;
        if self.core.jobs.is_empty() {
            self.close_cleanly();
        }
    }

    // ----- internals -----

    fn on_frame(&mut self, now: Instant, frame: Frame) -> Result<(), ConnectionError> {
        if let State::Handshaking { .. } = self.state {
            match frame {
                Frame::Hello(_) | Frame::Error { .. } => {}
                other => {
                    return Err(unexpected(format!(
                        "{} before the server's HELLO",
                        other.frame_type()
                    )));
                }
            }
        }
        match frame {
            Frame::Hello(hello) => {
                if !matches!(self.state, State::Handshaking { .. }) {
                    return Err(unexpected("second HELLO".into()));
                }
                let version = negotiate(CLIENT_VERSION_MIN, VERSION_MAX, &hello)?;
                check_peer_limits(&hello.limits)?;
                self.core.set_peer(hello.limits);
                self.authenticate(&hello)?;
                if let Some(level) = self.config.compression {
                    if hello.features & FEATURE_ZSTD != 0 {
                        self.core.enable_zstd(level, true);
                    }
                    let held: Vec<u32> = self
                        .core
                        .jobs
                        .iter_mut()
                        .filter_map(|(&id, j)| std::mem::take(&mut j.held).then_some(id))
                        .collect();
                    for id in held {
                        self.mark_ready(id);
                    }
                }
                self.state = State::Open;
                for _ in 0..std::mem::take(&mut self.stats_held) {
                    self.core.outbox.control(&Frame::StatsRequest);
                }
                self.core.events.push_back(ClientEvent::Connected {
                    version,
                    server: hello,
                });
                self.announce_waiting();
            }
            Frame::Error { code, message } => {
                self.fail_with(ConnectionError::PeerError { code, message }, false);
            }
            Frame::GoAway { last_job } => {
                self.state = State::GoingAway;
                self.goaway_last_job = Some(last_job);
                self.core.events.push_back(ClientEvent::GoAway);
                // JOBs that crossed the GOAWAY on the wire were not accepted. The server
                // answers them with ABORT if it is still open, or has closed already; either
                // way they end here, and our ABORT lets a server still draining them let go.
                let refused: Vec<u32> = self
                    .core
                    .jobs
                    .range(last_job.saturating_add(1)..)
                    .map(|(&id, _)| id)
                    .collect();
                for id in refused {
                    let Some(job) = self.core.jobs.get(&id) else {
                        continue;
                    };
                    if !job.announced {
                        continue;
                    }
                    if job.upload != Upload::Closed {
                        self.core.outbox.abort(
                            JobId(id),
                            ErrorCode::CANCELLED,
                            "server is going away",
                        );
                    }
                    if !job.cancelled {
                        self.core.events.push_back(ClientEvent::Failed {
                            job: JobId(id),
                            code: ErrorCode::SHUTTING_DOWN,
                            message: "server is going away; job was not accepted".into(),
                        });
                    }
                    self.remove_job(id);
                    self.announced -= 1;
                }
                for id in std::mem::take(&mut self.waiting) {
                    if let Some(job) = self.remove_job(id) {
                        if !job.cancelled {
                            self.core.events.push_back(ClientEvent::Failed {
                                job: JobId(id),
                                code: ErrorCode::SHUTTING_DOWN,
                                message: "server is going away; job was not sent".into(),
                            });
                        }
                    }
                }
                if self.core.jobs.is_empty() {
                    self.close_cleanly();
                }
            }
            Frame::Stats(stats) => {
                if self.stats_pending == 0 {
                    return Err(unexpected("STATS without a request".into()));
                }
                self.stats_pending -= 1;
                self.core.events.push_back(ClientEvent::Stats(stats));
            }
            Frame::Ignorable { .. } => {}
            Frame::Miss { job } => {
                self.retime(job.0, now);
                self.on_miss(job)?;
            }
            Frame::Result {
                job,
                origin,
                head,
                body,
                fin,
            } => {
                self.retime(job.0, now);
                self.on_result(job, origin, head, body, fin)?;
            }
            Frame::Data { job, data, fin, .. } => {
                self.retime(job.0, now);
                self.on_data(job, data, fin)?;
            }
            Frame::Abort { job, code, message } => self.on_abort(job, code, message)?,
            other => {
                return Err(unexpected(format!(
                    "{} is not sent by servers",
                    other.frame_type()
                )));
            }
        }
        Ok(())
    }

    /// With a token configured: checks the server's proof and answers with ours. A server
    /// that does not authenticate is refused, or an impostor could collect our source by
    /// simply not asking.
    fn authenticate(&mut self, hello: &Hello) -> Result<(), ConnectionError> {
        let Some(key) = &self.config.auth else {
            return Ok(());
        };
        let Some(client_nonce) = self.nonce else {
            return Err(internal(
                "a token is configured but the connection has no challenge nonce".into(),
            ));
        };
        let Some([server_nonce, proof]) = auth::read_fields::<2>(&hello.extensions)
            .filter(|_| hello.features & FEATURE_AUTH != 0)
        else {
            return Err(ConnectionError::Unauthorized {
                reason: "the server does not authenticate (it has no --token-file), but we \
                         have a token; refusing to send it anything"
                    .into(),
            });
        };
        if !auth::proof_matches(key.server_proof(&client_nonce, &server_nonce), &proof) {
            return Err(ConnectionError::Unauthorized {
                reason: "the server's proof does not match: its --token-file differs from \
                         DCACHE_TOKEN"
                    .into(),
            });
        }
        let answer = Frame::Auth {
            proof: *key.client_proof(&server_nonce, &client_nonce).as_bytes(),
        };
        self.core.outbox.control(&answer);
        Ok(())
    }

    fn open_job<'a>(
        jobs: &'a mut BTreeMap<u32, Job>,
        job: JobId,
        what: &str,
    ) -> Result<&'a mut Job, ConnectionError> {
        match jobs.get_mut(&job.0) {
            Some(j) if j.announced => Ok(j),
            _ => Err(unexpected(format!("{what} for {job}, which is not open"))),
        }
    }

    fn on_miss(&mut self, job: JobId) -> Result<(), ConnectionError> {
        let j = Self::open_job(&mut self.core.jobs, job, "MISS")?;
        if j.key.is_none() || j.verdict || !matches!(j.download, Download::Waiting) {
            return Err(unexpected(format!(
                "MISS for {job} that asked for no verdict"
            )));
        }
        j.verdict = true;
        if j.strategy == Strategy::Lookup {
            // Not cached: end the job here. It stays known, marked cancelled, until the
            // server's answer to our ABORT, so frames still in flight for it are drained.
            let reported = j.cancelled;
            j.cancelled = true;
            // A lookup cancelled before its verdict has already said ABORT.
            if j.upload != Upload::Closed {
                j.upload = Upload::Closed;
                self.core
                    .outbox
                    .abort(job, ErrorCode::CANCELLED, "not cached");
            }
            if !reported {
                self.core.events.push_back(ClientEvent::NotCached { job });
            }
            return Ok(());
        }
        if j.upload == Upload::Blocked {
            j.upload = Upload::Open;
        }
        let cancelled = j.cancelled;
        self.mark_ready(job.0);
        if !cancelled {
            self.core.events.push_back(ClientEvent::Miss { job });
        }
        Ok(())
    }

    fn on_result(
        &mut self,
        job: JobId,
        origin: ResultOrigin,
        head: ResultHead,
        body: Bytes,
        fin: bool,
    ) -> Result<(), ConnectionError> {
        let max = self.config.max_result_len;
        let j = Self::open_job(&mut self.core.jobs, job, "RESULT")?;
        if !matches!(j.download, Download::Waiting) {
            return Err(unexpected(format!("second result for {job}")));
        }
        if origin.is_early() && (j.key.is_none() || j.verdict) {
            return Err(unexpected(format!(
                "EARLY_RESULT for {job} that sent no HASH or already had its verdict"
            )));
        }
        // The decoder checked that the lengths add up without overflow.
        let total = head.body_len().unwrap_or(u64::MAX);
        if total > max {
            return Err(ConnectionError::Protocol {
                code: ErrorCode::LIMIT,
                reason: format!("result of {total} bytes for {job} exceeds our limit of {max}"),
            });
        }
        j.verdict = true;
        // Any result means the server wants no more source: stop now and say so.
        if j.upload != Upload::Closed {
            j.upload = Upload::Closed;
            j.source.clear();
            self.core
                .outbox
                .abort(job, ErrorCode::CANCELLED, "result received");
        }
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&body);
        j.download = Download::Receiving {
            head,
            origin,
            body: buf,
            total,
        };
        if fin {
            self.complete(job);
        }
        Ok(())
    }

    fn on_data(&mut self, job: JobId, data: Bytes, fin: bool) -> Result<(), ConnectionError> {
        let j = Self::open_job(&mut self.core.jobs, job, "DATA")?;
        let Download::Receiving { body, total, .. } = &mut j.download else {
            return Err(unexpected(format!("DATA for {job} without a result head")));
        };
        let have = body.len() as u64 + data.len() as u64;
        if have > *total || (fin && have != *total) {
            return Err(protocol(
                ErrorCode::PROTOCOL,
                format!("result body of {job} disagrees with its declared length {total}"),
            ));
        }
        body.extend_from_slice(&data);
        if fin {
            self.complete(job);
        }
        Ok(())
    }

    fn on_abort(
        &mut self,
        job: JobId,
        code: ErrorCode,
        message: String,
    ) -> Result<(), ConnectionError> {
        if !self.core.jobs.contains_key(&job.0)
            && self.goaway_last_job.is_some_and(|last| job.0 > last)
        {
            // The server's answer to a JOB that crossed its GOAWAY; already ended here.
            return Ok(());
        }
        let j = Self::open_job(&mut self.core.jobs, job, "ABORT")?;
        if matches!(j.download, Download::Closed) {
            return Err(unexpected(format!("ABORT for {job} after its result")));
        }
        j.download = Download::Closed;
        if j.upload != Upload::Closed {
            j.upload = Upload::Closed;
            j.source.clear();
            self.core
                .outbox
                .abort(job, ErrorCode::CANCELLED, "aborted by server");
        }
        if !j.cancelled {
            self.core
                .events
                .push_back(ClientEvent::Failed { job, code, message });
        }
        self.maybe_forget(job.0);
        Ok(())
    }

    fn complete(&mut self, job: JobId) {
        let Some(j) = self.core.jobs.get_mut(&job.0) else {
            return;
        };
        let Download::Receiving {
            head, origin, body, ..
        } = std::mem::replace(&mut j.download, Download::Closed)
        else {
            return;
        };
        let mut body = body.freeze();
        // Lengths were checked against the body as it arrived, so these splits are in range.
        let stdout = body.split_to(head.stdout_len as usize);
        let stderr = body.split_to(head.stderr_len as usize);
        let outputs = head
            .outputs
            .into_iter()
            .map(|o| OutputFile {
                name: o.name,
                data: body.split_to(o.len as usize),
            })
            .collect();
        if !j.cancelled {
            let outcome = JobOutcome {
                result: JobResult {
                    exit_code: head.exit_code,
                    stdout,
                    stderr,
                    outputs,
                },
                origin,
                key: j.key,
                strategy: j.strategy,
                source_bytes_sent: j.sent,
                source_bytes_skipped: j.total_len().saturating_sub(j.sent),
            };
            self.core
                .events
                .push_back(ClientEvent::Done { job, outcome });
        }
        self.maybe_forget(job.0);
    }

    fn announce_waiting(&mut self) {
        let max_jobs = self.core.peer.max_jobs as usize;
        // With a token, nothing goes out before the server has proved itself.
        let held = self.auth_pending();
        while !held && self.announced < max_jobs && self.state != State::Closed {
            let Some(id) = self.waiting.pop_front() else {
                return;
            };
            let Some(job) = self.core.jobs.get_mut(&id) else {
                continue;
            };
            job.announced = true;
            self.announced += 1;
            let frame = Frame::Job {
                job: JobId(id),
                desc: job.desc.clone(),
            };
            // Checked by start_job against the baseline limit, which every peer accepts.
            self.core.outbox.control(&frame);
            match (job.strategy, job.key) {
                (Strategy::SendAll, _) | (_, None) => job.upload = Upload::Open,
                (strategy, Some(key)) => {
                    self.core.outbox.control(&Frame::Hash {
                        job: JobId(id),
                        key,
                    });
                    job.upload = if matches!(strategy, Strategy::AskFirst | Strategy::Lookup) {
                        Upload::Blocked
                    } else {
                        Upload::Open
                    };
                }
            }
            self.mark_ready(id);
        }
    }

    fn mark_ready(&mut self, id: u32) {
        self.core.mark_ready(id);
    }

    /// Removes a job and its timer.
    fn remove_job(&mut self, id: u32) -> Option<Job> {
        let job = self.core.jobs.remove(&id)?;
        self.silent.remove(&(job.heard, id));
        Some(job)
    }

    /// Something happened to job `id` at `now` (it started, the server said something,
    /// its owner finished its source): its progress timer starts again if the server owes
    /// it an answer, and stops if not.
    fn retime(&mut self, id: u32, now: Instant) {
        if let Some(j) = self.core.jobs.get_mut(&id) {
            self.silent.remove(&(j.heard, id));
            if j.owed() {
                j.heard = now;
                self.silent.insert((now, id));
            }
        }
    }

    /// Starts the progress timers of jobs whose owner finished their source since.
    fn start_clocks(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.unclocked) {
            self.retime(id, now);
        }
    }

    /// Fails every job that has heard nothing for the progress timeout by `now`.
    fn time_out_jobs(&mut self, now: Instant) {
        let timeout = self.config.progress_timeout;
        while let Some(&(heard, id)) = self.silent.first() {
            if heard.checked_add(timeout).is_none_or(|due| now < due) {
                return;
            }
            self.silent.pop_first();
            // A job its owner no longer waits for (cancelled, or ended by NotCached) is
            // only draining: nothing to report.
            let Some(j) = self.core.jobs.get_mut(&id).filter(|j| !j.cancelled) else {
                continue;
            };
            j.cancelled = true;
            self.core.events.push_back(ClientEvent::TimedOut {
                job: JobId(id),
                after: now.saturating_duration_since(heard),
            });
            if !j.announced {
                self.waiting.retain(|&w| w != id);
                self.remove_job(id);
                continue;
            }
            // Like a cancel: the job stays known until the server's answer to ABORT, so
            // its frames still in flight are drained.
            if j.upload != Upload::Closed || matches!(j.download, Download::Waiting) {
                j.upload = Upload::Closed;
                j.source.clear();
                self.core
                    .outbox
                    .abort(JobId(id), ErrorCode::CANCELLED, "no progress");
            }
            self.maybe_forget(id);
        }
    }

    fn maybe_forget(&mut self, id: u32) {
        let heard = self.core.jobs.get(&id).map(|j| j.heard);
        if self.core.forget_if_done(id) {
            if let Some(heard) = heard {
                self.silent.remove(&(heard, id));
            }
            self.announced -= 1;
            self.announce_waiting();
            if self.state == State::GoingAway && self.core.jobs.is_empty() {
                self.close_cleanly();
            }
        }
    }

    fn close_cleanly(&mut self) {
        self.state = State::Closed;
        self.core.clear_jobs();
        self.silent.clear();
        self.waiting.clear();
        self.core
            .events
            .push_back(ClientEvent::Closed { error: None });
    }
}

impl Endpoint for ClientConnection {
    type Job = Job;
    type Event = ClientEvent;

    fn core(&mut self) -> &mut Core<Job, ClientEvent> {
        &mut self.core
    }

    fn is_over(&self) -> bool {
        self.state == State::Closed
    }

    fn on_frame(&mut self, now: Instant, frame: Frame) -> Result<(), ConnectionError> {
        ClientConnection::on_frame(self, now, frame)
    }

    fn fail_with(&mut self, error: ConnectionError, send: bool) {
        if self.state == State::Closed {
            return;
        }
        self.core.fail(&error, send);
        self.waiting.clear();
        self.silent.clear();
        self.state = State::Closed;
        self.core
            .events
            .push_back(ClientEvent::Closed { error: Some(error) });
    }

    fn chunk_size(&self) -> usize {
        self.config.chunk_size.min(self.core.peer.max_frame_payload) as usize
    }

    fn after_last_frame(&mut self, id: u32) {
        self.maybe_forget(id);
    }
}

impl Connection for ClientConnection {
    type Event = ClientEvent;

    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        conn::handle_input(self, now, data);
    }

    fn handle_eof(&mut self, _now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.core.jobs.is_empty() && !self.core.has_buffered_input() && self.is_connected() {
            self.close_cleanly();
        } else {
            self.fail_with(ConnectionError::UnexpectedEof, false);
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let State::Handshaking { deadline } = self.state {
            if now >= deadline {
                self.fail_with(ConnectionError::Timeout { what: "handshake" }, true);
                return;
            }
        }
        if self.state != State::Closed {
            self.start_clocks(now);
            self.time_out_jobs(now);
        }
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        self.start_clocks(now);
        conn::poll_transmit(self)
    }

    fn poll_event(&mut self) -> Option<ClientEvent> {
        self.core.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let handshake = match self.state {
            State::Handshaking { deadline } => Some(deadline),
            State::Closed => return None,
            _ => None,
        };
        let progress = self
            .silent
            .first()
            .and_then(|&(heard, _)| heard.checked_add(self.config.progress_timeout));
        [handshake, progress].into_iter().flatten().min()
    }

    fn is_closed(&self) -> bool {
        self.state == State::Closed && self.core.outbox.is_empty()
    }

    /// Always true but for a frame's worth of buffered input: the client never pauses
    /// decoding (what it receives is bounded by the jobs it started).
    fn wants_input(&self) -> bool {
        self.core
            .wants_input(false, self.config.limits.max_frame_payload)
    }

    fn has_paused_input(&self) -> bool {
        self.core.has_paused_input(false)
    }

    fn close(&mut self, code: ErrorCode, reason: &str) {
        self.fail_with(
            ConnectionError::LocallyClosed {
                code,
                reason: reason.to_owned(),
            },
            true,
        );
    }
}

impl CoreJob for Job {
    fn has_data(&self) -> bool {
        self.sendable()
    }

    fn next_frame(&mut self, id: u32, chunk: usize) -> Option<(Frame, bool)> {
        if !self.sendable() {
            return None;
        }
        let data = self.source.take(chunk);
        let fin = self.source_fin && self.source.is_empty();
        self.sent += data.len() as u64;
        if fin {
            self.upload = Upload::Closed;
        }
        let frame = Frame::Source {
            job: JobId(id),
            data,
            fin,
            zstd: false,
        };
        Some((frame, fin))
    }

    fn is_done(&self) -> bool {
        self.upload == Upload::Closed && matches!(self.download, Download::Closed)
    }

    fn in_ready(&mut self) -> &mut bool {
        &mut self.in_ready
    }

    fn compress(&self) -> bool {
        self.compress
    }
}
