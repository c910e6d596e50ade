//! The server end of a connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, AUTH_LEN, AuthKey, FEATURE_AUTH, Nonce};
use crate::compress::{DEFAULT_LEVEL, FEATURE_ZSTD};
use crate::conn::{
    self, Connection, Core, CoreJob, Endpoint, MAX_TIMEOUT, internal, protocol, unexpected,
};
use crate::error::{CommandError, ConnectionError};
use crate::error_code::ErrorCode;
use crate::frame::{Frame, Hello, JobId, Limits, OutputMeta, ResultHead, ResultOrigin, Stat};
use crate::handshake::{check_peer_limits, clamp_own_limits, negotiate};
use crate::job::{JobDesc, JobResult};
use crate::key::{CacheKey, KeyHasher};
use crate::outbox::Segments;
use crate::{VERSION_MAX, VERSION_MIN};

/// Settings of a [`ServerConnection`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What we accept and announce: frame payload, source length, jobs per connection.
    pub limits: Limits,
    /// Largest result frame we send; smaller interleaves concurrent results more finely.
    pub chunk_size: u32,
    /// How long a client may take to send its HELLO. This and the other timeouts are cut
    /// to [`MAX_TIMEOUT`](crate::MAX_TIMEOUT).
    pub handshake_timeout: Duration,
    /// How long a connection with no open job may sit silent before we close it.
    pub idle_timeout: Duration,
    /// How long an upload may make no progress while we wait for source.
    pub stall_timeout: Duration,
    /// Output bytes queued for a client beyond which we stop decoding its input until
    /// the client reads: a client that sends requests and never reads the answers cannot
    /// make us queue without bound.
    pub max_queued_output: usize,
    /// Require clients to prove they hold this shared token's key before any job (see
    /// [`AuthKey`]). Needs a connection made with
    /// [`ServerConnection::with_nonce`]; without a nonce every client is refused.
    pub auth: Option<AuthKey>,
    /// zstd level for the `ZSTD` feature, announced to clients that announce it (they
    /// then may compress their source, which we inflate within our frame limit); `None`
    /// never announces it, and every connection stays uncompressed.
    pub compression: Option<i32>,
    /// With the feature negotiated, also compress result bodies (DATA frames). A client
    /// announces the feature only when its link makes compression pay, so its
    /// announcement is the hint; turn this off to spend no server CPU on it.
    pub compress_results: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            chunk_size: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            stall_timeout: Duration::from_secs(60),
            max_queued_output: 1024 * 1024,
            auth: None,
            compression: Some(DEFAULT_LEVEL),
            compress_results: true,
        }
    }
}

/// A result body at most this long stays inline in RESULT even when the body is
/// compressed: a compile error's few lines are not worth a DATA frame.
const MAX_INLINE_WHEN_COMPRESSING: u64 = 1024;

/// Per-connection counters kept by the state machine itself, so they stay true whatever
/// the owner does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Jobs the client started.
    pub jobs: u64,
    /// SOURCE payload bytes received, drained ones included.
    pub source_bytes_received: u64,
    /// Source bytes received after we stopped wanting them (already in flight).
    pub source_bytes_drained: u64,
    /// Declared source bytes the client never had to send because the job ended first.
    pub source_bytes_saved: u64,
    /// EARLY_RESULT frames sent.
    pub early_results: u64,
    /// MISS verdicts sent.
    pub misses: u64,
}

/// Something the owner of a [`ServerConnection`] must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// The client's HELLO arrived and a version was agreed.
    Connected {
        /// The agreed version.
        version: u16,
        /// The client's HELLO.
        client: Hello,
    },
    /// A job started. Source follows as [`ServerEvent::Source`].
    JobStarted {
        /// The job.
        job: JobId,
        /// What to compile.
        desc: JobDesc,
    },
    /// The client sent HASH: look the key up and answer with
    /// [`ServerConnection::send_result`] (early) or [`ServerConnection::send_miss`] at once.
    /// The key is the client's claim; nothing may be stored under it.
    Lookup {
        /// The job.
        job: JobId,
        /// The client's key.
        key: CacheKey,
    },
    /// Source bytes, in order; feed them to the compiler as they come.
    Source {
        /// The job.
        job: JobId,
        /// The bytes.
        data: Bytes,
    },
    /// The whole source arrived. `key` is computed over what was actually received; when
    /// the client sent HASH it has been checked equal. Only this key may be used to store
    /// the job's result.
    SourceDone {
        /// The job.
        job: JobId,
        /// The verified key.
        key: CacheKey,
        /// Total source length.
        len: u64,
    },
    /// The job ended without a result from us: the client cancelled, or the protocol
    /// failed it (hash or length mismatch, too large). Stop working on it; nothing of it
    /// may be stored.
    JobCancelled {
        /// The job.
        job: JobId,
        /// Why.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The client asked for counters; answer with [`ServerConnection::send_stats`].
    StatsRequested,
    /// The client stopped the upload of `job` (after an early result, or cancelling)
    /// with `bytes` of its declared source never sent: what the early answer saved,
    /// reported as it happens (also summed in [`ConnStats`]).
    SourceSkipped {
        /// The job.
        job: JobId,
        /// Declared source bytes that were never sent.
        bytes: u64,
    },
    /// The connection is over; `error` is `None` for a clean close.
    Closed {
        /// Why, when it was not clean.
        error: Option<ConnectionError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking,
    /// Our HELLO with the challenge is out; the client's AUTH must come next.
    Authenticating {
        client_nonce: Nonce,
    },
    Open,
    GoingAway {
        last_job: u32,
    },
    Closed,
}

#[derive(Debug)]
enum Upload {
    /// Source is wanted and hashed as it arrives.
    Receiving {
        hasher: Box<KeyHasher>,
        claimed: Option<CacheKey>,
        started: bool,
    },
    /// We no longer want source; frames in flight are ignored until FIN or ABORT.
    Draining,
    /// FIN or ABORT received.
    Closed,
}

#[derive(Debug)]
enum Download {
    /// We owe the client a result (or ABORT).
    Open { verdict_sent: bool },
    /// A result is going out.
    Sending {
        head: Option<(ResultHead, ResultOrigin)>,
        body: Segments,
        /// The body goes out compressed: it all goes in DATA frames (RESULT's inline
        /// body is never compressed), unless it is small enough not to matter.
        compress: bool,
    },
    /// Result sent or ABORT sent.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Job {
    /// Whether the client sent HASH for this job: only then is a verdict (MISS or an early
    /// result) owed. Kept apart from the upload state, which forgets the claim once the
    /// upload ends.
    hashed: bool,
    upload: Upload,
    download: Download,
    declared: Option<u64>,
    received: u64,
    in_ready: bool,
    /// Whether the owner has this job: it heard `JobStarted` and no `JobCancelled` since.
    /// Events about the upload go to the owner only while it has the job; a job refused
    /// at JOB, or failed by the protocol, is the state machine's alone.
    owned: bool,
}

/// The server end of a dcache connection, without IO.
///
/// # Driving it
/// Through [`Connection`], in the order of the crate's run loop, backpressure included
/// (see the crate documentation). Commands: [`send_miss`](Self::send_miss),
/// [`send_result`](Self::send_result), [`abort_job`](Self::abort_job),
/// [`send_stats`](Self::send_stats), [`goaway`](Self::goaway), [`Connection::close`].
///
/// Trust: the state machine hashes every source byte it receives and reports the job's key
/// only in [`ServerEvent::SourceDone`], after checking it against the client's HASH. A
/// mismatch fails the job; the claimed key from [`ServerEvent::Lookup`] is for lookups only.
#[derive(Debug)]
pub struct ServerConnection {
    config: ServerConfig,
    state: State,
    core: Core<Job, ServerEvent>,
    highest_job: u32,
    handshake_deadline: Instant,
    last_input: Instant,
    read_closed: bool,
    stats: ConnStats,
    /// STATS_REQUESTs reported to the owner and not yet answered.
    stats_pending: u32,
    /// Our challenge, when the owner supplied one.
    nonce: Option<Nonce>,
    /// The version agreed in the handshake, reported once authentication is done.
    pending_connect: Option<(u16, Hello)>,
}

/// Unanswered STATS_REQUESTs beyond which decoding pauses: requests cost the peer 12 bytes
/// and us a whole answer, so their number in flight is bounded like everything else.
const MAX_PENDING_STATS: u32 = 8;

impl ServerConnection {
    /// A new connection, waiting for the client's HELLO. For [`ServerConfig::auth`] use
    /// [`with_nonce`](Self::with_nonce) instead: this crate has no randomness of its own.
    pub fn new(config: ServerConfig, now: Instant) -> Self {
        Self::build(config, now, None)
    }

    /// A new connection whose authentication challenge is `nonce`: 32 bytes from a
    /// cryptographic random source, never reused (a reused challenge lets a recorded
    /// answer be replayed).
    pub fn with_nonce(config: ServerConfig, now: Instant, nonce: Nonce) -> Self {
        Self::build(config, now, Some(nonce))
    }

    /// The bytes that tell a connection it is refused before it is served at all (an
    /// address not allowed, a limit on connections reached): one ERROR frame carrying
    /// `code` and `message`, encoded under the baseline limits every peer accepts before
    /// a handshake. Write them, then close; no state machine is needed. The client
    /// reports the refusal as the server's error. Like every ERROR message this crate
    /// sends, `message` is cut to 1024 bytes.
    pub fn refusal(code: ErrorCode, message: &str) -> Bytes {
        let frame = Frame::Error {
            code,
            message: crate::outbox::truncate_message(message),
        };
        // Cannot fail: a message of at most 1024 bytes fits the baseline payload limit.
        frame
            .to_bytes(Limits::BASELINE.max_frame_payload)
            .unwrap_or_default()
    }

    fn build(mut config: ServerConfig, now: Instant, nonce: Option<Nonce>) -> Self {
        config.limits = clamp_own_limits(config.limits);
        config.chunk_size = config.chunk_size.max(1024);
        for t in [
            &mut config.handshake_timeout,
            &mut config.idle_timeout,
            &mut config.stall_timeout,
        ] {
            *t = (*t).min(MAX_TIMEOUT);
        }
        Self {
            core: Core::new(config.limits.max_frame_payload),
            handshake_deadline: now + config.handshake_timeout,
            config,
            state: State::Handshaking,
            highest_job: 0,
            last_input: now,
            read_closed: false,
            stats: ConnStats::default(),
            stats_pending: 0,
            nonce,
            pending_connect: None,
        }
    }

    // ----- getters -----

    /// Jobs open on this connection.
    pub fn jobs_open(&self) -> usize {
        self.core.jobs.len()
    }

    /// This connection's counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// Bytes of whole control frames waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.core.outbox.queued_bytes()
    }

    fn decoding_paused(&self) -> bool {
        self.core.outbox.queued_bytes() >= self.config.max_queued_output
            || self.stats_pending >= MAX_PENDING_STATS
    }

    // ----- commands -----

    /// Answers a [`ServerEvent::Lookup`] with a miss: the client keeps (or starts) sending.
    pub fn send_miss(&mut self, job: JobId) -> Result<(), CommandError> {
        let j = self.job_mut(job)?;
        let hashed = j.hashed;
        match &mut j.download {
            Download::Open { verdict_sent } if !*verdict_sent && hashed => {
                *verdict_sent = true;
            }
            Download::Closed => return Ok(()),
            _ => {
                return Err(CommandError::WrongState {
                    job: job.0,
                    why: "MISS needs a HASH and no verdict yet",
                });
            }
        }
        self.stats.misses += 1;
        self.core.outbox.control(&Frame::Miss { job });
        Ok(())
    }

    /// Sends a job's result; `origin` says whether it was compiled or found in the cache,
    /// early (in answer to HASH) or after the source. Either way the client stops sending
    /// source. A job the client already cancelled is ignored.
    pub fn send_result(
        &mut self,
        job: JobId,
        result: &JobResult,
        origin: ResultOrigin,
    ) -> Result<(), CommandError> {
        let early = origin == ResultOrigin::Early;
        if result.outputs.len() > crate::MAX_OUTPUTS {
            return Err(CommandError::Encode(crate::FrameError::FieldTooLong(
                "RESULT outputs",
            )));
        }
        let compress = self.core.compresses();
        let j = self.job_mut(job)?;
        match j.download {
            Download::Closed => return Ok(()),
            Download::Sending { .. } => {
                return Err(CommandError::WrongState {
                    job: job.0,
                    why: "result already sent",
                });
            }
            Download::Open { verdict_sent } => {
                if early && (verdict_sent || !j.hashed) {
                    return Err(CommandError::WrongState {
                        job: job.0,
                        why: "an early result needs a HASH and no verdict yet",
                    });
                }
            }
        }
        let head = ResultHead {
            exit_code: result.exit_code,
            stdout_len: result.stdout.len() as u64,
            stderr_len: result.stderr.len() as u64,
            outputs: result
                .outputs
                .iter()
                .map(|o| OutputMeta {
                    name: o.name.clone(),
                    len: o.data.len() as u64,
                })
                .collect(),
        };
        // Validate names and sizes now, so the command fails rather than the connection.
        Frame::Result {
            job,
            origin,
            head: head.clone(),
            body: Bytes::new(),
            fin: result.body_len() == 0,
        }
        .encode(Limits::BASELINE.max_frame_payload)?;
        let mut body = Segments::default();
        body.push(result.stdout.clone());
        body.push(result.stderr.clone());
        for o in &result.outputs {
            body.push(o.data.clone());
        }
        j.download = Download::Sending {
            head: Some((head, origin)),
            body,
            compress,
        };
        if early {
            self.stats.early_results += 1;
        }
        self.stop_upload(job);
        self.mark_ready(job.0);
        Ok(())
    }

    /// Ends a job without a result (refused, overloaded, compiler could not run). The
    /// client is told why and stops sending.
    pub fn abort_job(
        &mut self,
        job: JobId,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), CommandError> {
        let j = self.job_mut(job)?;
        if matches!(j.download, Download::Closed) {
            return Ok(());
        }
        j.download = Download::Closed;
        self.core.outbox.abort(job, code, message);
        self.stop_upload(job);
        self.maybe_forget(job.0);
        Ok(())
    }

    /// Answers [`ServerEvent::StatsRequested`].
    pub fn send_stats(&mut self, stats: Vec<Stat>) -> Result<(), CommandError> {
        if self.state == State::Closed {
            return Err(CommandError::Closed);
        }
        let frame = Frame::Stats(stats);
        let bytes = frame.to_bytes(self.core.peer.max_frame_payload)?;
        self.stats_pending = self.stats_pending.saturating_sub(1);
        self.core.outbox.push(bytes);
        Ok(())
    }

    /// Graceful shutdown: tells the client to start no new jobs, lets open jobs finish,
    /// then closes.
    pub fn goaway(&mut self) {
        if matches!(self.state, State::Closed | State::GoingAway { .. }) {
            return;
        }
        let last_job = self.highest_job;
        self.state = State::GoingAway { last_job };
        self.core.outbox.control(&Frame::GoAway { last_job });
        self.close_if_done();
    }

    // ----- internals -----

    fn on_frame(&mut self, frame: Frame) -> Result<(), ConnectionError> {
        if self.state == State::Handshaking {
            let Frame::Hello(hello) = frame else {
                return Err(unexpected(format!(
                    "{} before the client's HELLO",
                    frame.frame_type()
                )));
            };
            let version = negotiate(VERSION_MIN, VERSION_MAX, &hello)?;
            check_peer_limits(&hello.limits)?;
            self.core.set_peer(hello.limits);
            // ZSTD is announced only to a client that announced it, so a client without
            // it gets the HELLO it always did.
            let zstd = match self.config.compression {
                Some(level) if hello.features & FEATURE_ZSTD != 0 => {
                    self.core.enable_zstd(level, self.config.compress_results);
                    FEATURE_ZSTD
                }
                _ => 0,
            };
            let Some(key) = self.config.auth.clone() else {
                self.send_hello(zstd, Bytes::new());
                self.state = State::Open;
                self.core.events.push_back(ServerEvent::Connected {
                    version,
                    client: hello,
                });
                return Ok(());
            };
            let Some(server_nonce) = self.nonce else {
                return Err(internal(
                    "server requires a token but its connection has no challenge nonce".into(),
                ));
            };
            let client_nonce = match auth::read_fields::<1>(&hello.extensions) {
                Some([n]) if hello.features & FEATURE_AUTH != 0 => n,
                _ => {
                    return Err(ConnectionError::Unauthorized {
                        reason: "this server requires a shared token; set DCACHE_TOKEN \
                                 (the server's --token-file)"
                            .into(),
                    });
                }
            };
            let mut ext = BytesMut::with_capacity(2 * AUTH_LEN);
            ext.extend_from_slice(&server_nonce);
            ext.extend_from_slice(key.server_proof(&client_nonce, &server_nonce).as_bytes());
            self.send_hello(FEATURE_AUTH | zstd, ext.freeze());
            self.state = State::Authenticating { client_nonce };
            self.pending_connect = Some((version, hello));
            return Ok(());
        }
        if let State::Authenticating { client_nonce } = self.state {
            return self.on_auth(frame, client_nonce);
        }
        match frame {
            Frame::Hello(_) => Err(unexpected("second HELLO".into())),
            Frame::Job { job, desc } => self.on_job(job, desc),
            Frame::Hash { job, key } => self.on_hash(job, key),
            Frame::Source { job, data, fin, .. } => self.on_source(job, data, fin),
            Frame::Abort { job, code, message } => self.on_abort(job, code, message),
            Frame::Error { code, message } => {
                self.fail_with(ConnectionError::PeerError { code, message }, false);
                Ok(())
            }
            Frame::StatsRequest => {
                self.stats_pending += 1;
                self.core.events.push_back(ServerEvent::StatsRequested);
                Ok(())
            }
            Frame::Ignorable { .. } => Ok(()),
            Frame::Auth { .. } => Err(unexpected(
                "AUTH when no authentication is under way".into(),
            )),
            other => Err(unexpected(format!(
                "{} is not sent by clients",
                other.frame_type()
            ))),
        }
    }

    fn is_handshaking(&self) -> bool {
        matches!(
            self.state,
            State::Handshaking | State::Authenticating { .. }
        )
    }

    fn send_hello(&mut self, features: u64, extensions: Bytes) {
        let ours = Frame::Hello(Hello {
            min_version: VERSION_MIN,
            max_version: VERSION_MAX,
            limits: self.config.limits,
            features,
            extensions,
        });
        self.core.outbox.control(&ours);
    }

    /// The one frame accepted while authenticating. Anything else, or a wrong proof, ends
    /// the connection before the client has been able to start a job.
    fn on_auth(&mut self, frame: Frame, client_nonce: Nonce) -> Result<(), ConnectionError> {
        if let Frame::Error { code, message } = frame {
            self.fail_with(ConnectionError::PeerError { code, message }, false);
            return Ok(());
        }
        let Frame::Auth { proof } = frame else {
            return Err(ConnectionError::Unauthorized {
                reason: format!("{} before AUTH", frame.frame_type()),
            });
        };
        // Both are set whenever the state is Authenticating.
        let (Some(key), Some(server_nonce)) = (self.config.auth.as_ref(), self.nonce) else {
            return Err(internal("authenticating without a key".into()));
        };
        if !auth::proof_matches(key.client_proof(&server_nonce, &client_nonce), &proof) {
            return Err(ConnectionError::Unauthorized {
                reason: "wrong token (the client's DCACHE_TOKEN differs from the server's \
                         --token-file)"
                    .into(),
            });
        }
        self.state = State::Open;
        if let Some((version, client)) = self.pending_connect.take() {
            self.core
                .events
                .push_back(ServerEvent::Connected { version, client });
        }
        Ok(())
    }

    fn on_job(&mut self, job: JobId, desc: JobDesc) -> Result<(), ConnectionError> {
        if job.0 <= self.highest_job {
            return Err(unexpected(format!(
                "{job} is not above the previous job id {}",
                self.highest_job
            )));
        }
        self.highest_job = job.0;
        if self.core.jobs.len() >= self.config.limits.max_jobs as usize {
            return Err(protocol(
                ErrorCode::LIMIT,
                format!(
                    "more than {} jobs open on one connection",
                    self.config.limits.max_jobs
                ),
            ));
        }
        self.stats.jobs += 1;
        let refuse = if matches!(self.state, State::GoingAway { .. }) {
            Some((ErrorCode::SHUTTING_DOWN, "server is going away".to_owned()))
        } else {
            desc.source_len
                .filter(|&len| len > self.config.limits.max_source_len)
                .map(|len| {
                    (
                        ErrorCode::SOURCE_TOO_LARGE,
                        format!(
                            "source of {len} bytes exceeds the server's limit of {}",
                            self.config.limits.max_source_len
                        ),
                    )
                })
        };
        if let Some((code, message)) = refuse {
            self.core.jobs.insert(
                job.0,
                Job {
                    hashed: false,
                    upload: Upload::Draining,
                    download: Download::Closed,
                    declared: desc.source_len,
                    received: 0,
                    in_ready: false,
                    owned: false,
                },
            );
            self.core.outbox.abort(job, code, &message);
            return Ok(());
        }
        self.core.jobs.insert(
            job.0,
            Job {
                hashed: false,
                upload: Upload::Receiving {
                    hasher: Box::new(KeyHasher::new(&desc)),
                    claimed: None,
                    started: false,
                },
                download: Download::Open {
                    verdict_sent: false,
                },
                declared: desc.source_len,
                received: 0,
                in_ready: false,
                owned: true,
            },
        );
        self.core
            .events
            .push_back(ServerEvent::JobStarted { job, desc });
        Ok(())
    }

    fn known_job<'a>(
        jobs: &'a mut BTreeMap<u32, Job>,
        job: JobId,
        what: &str,
    ) -> Result<&'a mut Job, ConnectionError> {
        match jobs.get_mut(&job.0) {
            Some(j) if !matches!(j.upload, Upload::Closed) => Ok(j),
            _ => Err(unexpected(format!(
                "{what} for {job}, whose upload is not open"
            ))),
        }
    }

    fn on_hash(&mut self, job: JobId, key: CacheKey) -> Result<(), ConnectionError> {
        let j = Self::known_job(&mut self.core.jobs, job, "HASH")?;
        // A job refused at JOB time is draining; its HASH was already in flight.
        if let Upload::Receiving {
            claimed, started, ..
        } = &mut j.upload
        {
            if claimed.is_some() || *started {
                return Err(unexpected(format!(
                    "HASH for {job} after its HASH or its first SOURCE"
                )));
            }
            *claimed = Some(key);
            j.hashed = true;
            self.core.events.push_back(ServerEvent::Lookup { job, key });
        }
        Ok(())
    }

    fn on_source(&mut self, job: JobId, data: Bytes, fin: bool) -> Result<(), ConnectionError> {
        let max_source = self.config.limits.max_source_len;
        let len = data.len() as u64;
        self.stats.source_bytes_received += len;
        let j = Self::known_job(&mut self.core.jobs, job, "SOURCE")?;
        j.received += len;
        let received = j.received;
        let declared = j.declared;
        match &mut j.upload {
            Upload::Draining => {
                self.stats.source_bytes_drained += len;
                if fin {
                    j.upload = Upload::Closed;
                    self.maybe_forget(job.0);
                }
                return Ok(());
            }
            Upload::Receiving {
                hasher, started, ..
            } => {
                *started = true;
                hasher.update(&data);
            }
            Upload::Closed => return Ok(()),
        }
        let too_long = declared.is_some_and(|d| received > d)
            || (fin && declared.is_some_and(|d| received != d));
        if received > max_source {
            self.fail_job(
                job,
                ErrorCode::SOURCE_TOO_LARGE,
                format!("source exceeds the server's limit of {max_source} bytes"),
            );
        } else if too_long {
            self.fail_job(
                job,
                ErrorCode::LENGTH_MISMATCH,
                format!(
                    "received {received} source bytes, the job declared {}",
                    declared.unwrap_or_default()
                ),
            );
        } else {
            if !data.is_empty() {
                self.core
                    .events
                    .push_back(ServerEvent::Source { job, data });
            }
            if fin {
                self.finish_upload(job);
            }
        }
        if fin {
            if let Some(j) = self.core.jobs.get_mut(&job.0) {
                j.upload = Upload::Closed;
            }
            self.maybe_forget(job.0);
        }
        Ok(())
    }

    /// The last chunk arrived while we still wanted the source: verify and report.
    fn finish_upload(&mut self, job: JobId) {
        let Some(j) = self.core.jobs.get_mut(&job.0) else {
            return;
        };
        let Upload::Receiving {
            hasher, claimed, ..
        } = std::mem::replace(&mut j.upload, Upload::Closed)
        else {
            return;
        };
        let key = hasher.finalize();
        let len = hasher.source_len();
        if claimed.is_some_and(|c| c != key) {
            self.fail_job(
                job,
                ErrorCode::HASH_MISMATCH,
                "the source does not match the HASH sent for it".into(),
            );
            return;
        }
        self.core
            .events
            .push_back(ServerEvent::SourceDone { job, key, len });
    }

    /// Fails a job on our side: tell the owner, tell the client, want no more source.
    fn fail_job(&mut self, job: JobId, code: ErrorCode, message: String) {
        self.core.events.push_back(ServerEvent::JobCancelled {
            job,
            code,
            message: message.clone(),
        });
        if let Some(j) = self.core.jobs.get_mut(&job.0) {
            j.owned = false;
            if !matches!(j.download, Download::Closed) {
                j.download = Download::Closed;
                self.core.outbox.abort(job, code, &message);
            }
        }
        self.stop_upload(job);
    }

    fn on_abort(
        &mut self,
        job: JobId,
        code: ErrorCode,
        message: String,
    ) -> Result<(), ConnectionError> {
        let Some(j) = self.core.jobs.get_mut(&job.0) else {
            // An ABORT crossing the job's last answer (the client cancelled just as the
            // RESULT or ABORT went out): the job has already ended here.
            if job.0 != 0 && job.0 <= self.highest_job {
                return Ok(());
            }
            return Err(unexpected(format!(
                "ABORT for {job}, which was never opened"
            )));
        };
        let was_uploading = !matches!(j.upload, Upload::Closed);
        let was_receiving = matches!(j.upload, Upload::Receiving { .. });
        j.upload = Upload::Closed;
        if was_uploading && j.owned {
            let skipped = j.declared.map_or(0, |d| d.saturating_sub(j.received));
            if skipped > 0 {
                self.stats.source_bytes_saved += skipped;
                self.core.events.push_back(ServerEvent::SourceSkipped {
                    job,
                    bytes: skipped,
                });
            }
        }
        // No answer has started: the job ends now, the owner stops its compile (also
        // after the final SOURCE: cancelling one running compile keeps the connection),
        // and ABORT CANCELLED answers the client so it can let the job go. A result
        // already streaming is finished, not cut: the client's ABORT then answers that
        // result ("no more source"), and cutting it would lose the result.
        if matches!(j.download, Download::Open { .. }) {
            j.download = Download::Closed;
            j.owned = false;
            self.core
                .outbox
                .abort(job, ErrorCode::CANCELLED, "cancelled by client");
            self.core
                .events
                .push_back(ServerEvent::JobCancelled { job, code, message });
        } else if was_receiving {
            j.owned = false;
            self.core
                .events
                .push_back(ServerEvent::JobCancelled { job, code, message });
        }
        self.maybe_forget(job.0);
        Ok(())
    }

    fn stop_upload(&mut self, job: JobId) {
        if let Some(j) = self.core.jobs.get_mut(&job.0) {
            if matches!(j.upload, Upload::Receiving { .. }) {
                j.upload = Upload::Draining;
            }
        }
    }

    fn job_mut(&mut self, job: JobId) -> Result<&mut Job, CommandError> {
        if self.state == State::Closed {
            return Err(CommandError::Closed);
        }
        self.core
            .jobs
            .get_mut(&job.0)
            .ok_or(CommandError::UnknownJob(job.0))
    }

    /// Whether the client owes us input: a job still uploading, or part of a frame sitting
    /// in the buffer. Either way the upload-stall timer runs, so neither an unfinished
    /// upload nor a half-sent frame can hold the connection open.
    fn awaiting_input(&self) -> bool {
        self.core.has_buffered_input()
            || self
                .core
                .jobs
                .values()
                .any(|j| !matches!(j.upload, Upload::Closed))
    }

    fn mark_ready(&mut self, id: u32) {
        self.core.mark_ready(id);
    }

    fn maybe_forget(&mut self, id: u32) {
        if self.core.forget_if_done(id) {
            self.close_if_done();
        }
    }

    fn close_if_done(&mut self) {
        if matches!(self.state, State::GoingAway { .. }) && self.core.jobs.is_empty() {
            self.state = State::Closed;
            self.core.clear_jobs();
            self.core
                .events
                .push_back(ServerEvent::Closed { error: None });
        }
    }
}

impl Endpoint for ServerConnection {
    type Job = Job;
    type Event = ServerEvent;

    fn core(&mut self) -> &mut Core<Job, ServerEvent> {
        &mut self.core
    }

    fn is_over(&self) -> bool {
        self.state == State::Closed
    }

    fn on_frame(&mut self, _now: Instant, frame: Frame) -> Result<(), ConnectionError> {
        ServerConnection::on_frame(self, frame)
    }

    fn fail_with(&mut self, error: ConnectionError, send: bool) {
        if self.state == State::Closed {
            return;
        }
        self.core.fail(&error, send);
        self.state = State::Closed;
        self.core
            .events
            .push_back(ServerEvent::Closed { error: Some(error) });
    }

    fn decoding_paused(&self) -> bool {
        ServerConnection::decoding_paused(self)
    }

    fn on_progress(&mut self, now: Instant) {
        self.last_input = now;
    }

    fn chunk_size(&self) -> usize {
        self.config.chunk_size.min(self.core.peer.max_frame_payload) as usize
    }

    fn after_last_frame(&mut self, id: u32) {
        self.maybe_forget(id);
    }
}

impl Connection for ServerConnection {
    type Event = ServerEvent;

    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        conn::handle_input(self, now, data);
    }

    /// Jobs whose source is complete still get their results; a job cut off mid-upload
    /// fails the connection.
    fn handle_eof(&mut self, _now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.read_closed = true;
        // A client keeps its sending side open until its last answer has arrived, so an
        // end of stream with any job open means the client is gone: its jobs end now (the
        // owner stops their compiles) rather than run for nobody while holding slots.
        // ERROR says why to a client that only half-closed (it may still read).
        let open_jobs = !self.core.jobs.is_empty();
        if self.is_handshaking() || open_jobs || self.core.has_buffered_input() {
            self.fail_with(ConnectionError::UnexpectedEof, true);
            return;
        }
        // Nobody will read a GOAWAY; finish what is open and close.
        if let State::Open = self.state {
            self.state = State::GoingAway {
                last_job: self.highest_job,
            };
        }
        self.close_if_done();
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Handshaking | State::Authenticating { .. } if now >= self.handshake_deadline => {
                self.fail_with(ConnectionError::Timeout { what: "handshake" }, true);
            }
            State::Open | State::GoingAway { .. } => {
                if self.awaiting_input() {
                    if now >= self.last_input + self.config.stall_timeout {
                        self.fail_with(ConnectionError::Timeout { what: "upload" }, true);
                    }
                } else if self.core.jobs.is_empty()
                    && now >= self.last_input + self.config.idle_timeout
                {
                    self.goaway();
                }
            }
            _ => {}
        }
    }

    fn poll_transmit(&mut self, _now: Instant) -> Option<Bytes> {
        conn::poll_transmit(self)
    }

    fn poll_event(&mut self) -> Option<ServerEvent> {
        self.core.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshaking | State::Authenticating { .. } => Some(self.handshake_deadline),
            State::Open | State::GoingAway { .. } if !self.read_closed => {
                if self.awaiting_input() {
                    Some(self.last_input + self.config.stall_timeout)
                } else if self.core.jobs.is_empty() && self.state == State::Open {
                    Some(self.last_input + self.config.idle_timeout)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn is_closed(&self) -> bool {
        self.state == State::Closed && self.core.outbox.is_empty()
    }

    /// False while output for this client is backed up (decoding is paused then) or a
    /// frame's worth of input already waits.
    fn wants_input(&self) -> bool {
        self.core
            .wants_input(self.decoding_paused(), self.config.limits.max_frame_payload)
    }

    fn has_paused_input(&self) -> bool {
        self.state != State::Closed && self.core.has_paused_input(self.decoding_paused())
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

/// The first frame of a result leaves room for the head: its fixed fields (exit code,
/// stdout and stderr lengths, output count: [`ResultHead::FIXED_LEN`] bytes) plus, per
/// output, a length-prefixed name and a length.
fn result_head_len(head: &ResultHead) -> usize {
    ResultHead::FIXED_LEN
        + head
            .outputs
            .iter()
            .map(|o| ResultHead::OUTPUT_FIXED_LEN + o.name.len())
            .sum::<usize>()
}

impl CoreJob for Job {
    fn has_data(&self) -> bool {
        matches!(self.download, Download::Sending { .. })
    }

    fn next_frame(&mut self, id: u32, chunk: usize) -> Option<(Frame, bool)> {
        let Download::Sending {
            head,
            body,
            compress,
        } = &mut self.download
        else {
            return None;
        };
        let frame = match head.take() {
            Some((head, origin)) => {
                let room = if *compress && body.len() > MAX_INLINE_WHEN_COMPRESSING {
                    0
                } else {
                    chunk.saturating_sub(result_head_len(&head))
                };
                let first = body.take(room);
                Frame::Result {
                    job: JobId(id),
                    origin,
                    head,
                    body: first,
                    fin: body.is_empty(),
                }
            }
            None => Frame::Data {
                job: JobId(id),
                data: body.take(chunk),
                fin: body.is_empty(),
                zstd: false,
            },
        };
        let last = body.is_empty();
        if last {
            self.download = Download::Closed;
        }
        Some((frame, last))
    }

    fn is_done(&self) -> bool {
        matches!(self.upload, Upload::Closed) && matches!(self.download, Download::Closed)
    }

    fn compress(&self) -> bool {
        matches!(self.download, Download::Sending { compress: true, .. })
    }

    fn in_ready(&mut self) -> &mut bool {
        &mut self.in_ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_one_error_frame_under_the_baseline_limits() {
        let bytes = ServerConnection::refusal(ErrorCode::OVERLOADED, "busy");
        let frame = Frame::Error {
            code: ErrorCode::OVERLOADED,
            message: "busy".into(),
        };
        assert_eq!(
            bytes,
            frame.to_bytes(Limits::BASELINE.max_frame_payload).unwrap()
        );
        let long = ServerConnection::refusal(ErrorCode::UNAUTHORIZED, &"x".repeat(100_000));
        let mut decoder = crate::FrameDecoder::new(Limits::BASELINE.max_frame_payload);
        let mut buf = BytesMut::from(&long[..]);
        match decoder.decode(&mut buf) {
            Ok(Some(Frame::Error { code, message })) => {
                assert_eq!(code, ErrorCode::UNAUTHORIZED);
                assert_eq!(message.len(), 1024);
            }
            other => panic!("not one ERROR frame: {other:?}"),
        }
        assert!(buf.is_empty(), "nothing after the frame");
    }
}
