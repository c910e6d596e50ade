//! A test harness: a client and a server connection joined by simulated links, on a
//! virtual clock, with a reference server application.
//!
//! It lives in the library, not under `tests/`, because three users need it: this crate's
//! tests, the fuzz targets, and downstream crates that want to exercise the real state
//! machines without IO. Nothing here touches a clock or a socket: time is an `Instant` the
//! harness advances itself, straight to the next delivery or timer, so a 40 ms link costs
//! no real time at all.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{ClientConfig, ClientConnection, ClientEvent, Strategy};
use crate::conn::Connection;
use crate::frame::ResultOrigin;
use crate::frame::{Frame, Hello, JobId, Limits, Stat};
use crate::job::{JobDesc, JobResult, OutputFile};
use crate::key::CacheKey;
use crate::server::{ServerConfig, ServerConnection, ServerEvent};

/// A small deterministic generator (xorshift64*), so runs are reproducible from a seed
/// without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// One direction of a simulated link: latency, bandwidth and a window of bytes in flight.
///
/// A byte written at `t` starts serializing when the link is free, takes `1/bandwidth`,
/// and arrives `latency` later. The window bounds bytes written but not yet delivered, the
/// way a socket buffer does: the sender stops asking its connection for bytes when it is
/// full, which is what lets an early result stop an upload.
#[derive(Debug)]
pub struct Link {
    /// One-way latency.
    pub latency: Duration,
    /// Bytes per second; 0 means unlimited.
    pub bandwidth: u64,
    /// Most bytes in flight before the sender must wait.
    pub window: usize,
    free_at: Option<Instant>,
    queue: VecDeque<(Instant, Bytes)>,
    in_flight: usize,
    /// Total bytes ever written into this link.
    pub bytes_sent: u64,
}

impl Link {
    /// A link with the given one-way latency, bandwidth (bytes/s, 0 = unlimited) and window.
    pub fn new(latency: Duration, bandwidth: u64, window: usize) -> Self {
        Self {
            latency,
            bandwidth,
            window,
            free_at: None,
            queue: VecDeque::new(),
            in_flight: 0,
            bytes_sent: 0,
        }
    }

    fn has_room(&self) -> bool {
        self.in_flight < self.window
    }

    fn send(&mut self, now: Instant, bytes: Bytes) {
        let start = self.free_at.map_or(now, |f| f.max(now));
        let serialize = if self.bandwidth == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(
                (bytes.len() as u128 * 1_000_000_000 / u128::from(self.bandwidth)) as u64,
            )
        };
        let done = start + serialize;
        self.free_at = Some(done);
        self.in_flight += bytes.len();
        self.bytes_sent += bytes.len() as u64;
        self.queue.push_back((done + self.latency, bytes));
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    fn take_due(&mut self, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.queue.front() {
            if *t > now {
                break;
            }
            if let Some((_, b)) = self.queue.pop_front() {
                self.in_flight -= b.len();
                out.extend_from_slice(&b);
            }
        }
        out
    }
}

/// A plain HELLO as either side would send it (versions this crate speaks, default
/// limits, no features): for tests that play one end by hand.
pub fn hello() -> Frame {
    Frame::Hello(Hello {
        min_version: crate::VERSION_MIN,
        max_version: crate::VERSION_MAX,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    })
}

/// What the reference server does with a job's source: a deterministic stand-in for a
/// compiler, so tests can check that the right "object" came back for the right source.
pub fn reference_compile(desc: &JobDesc, source: &[u8]) -> JobResult {
    if source.starts_with(b"#error") {
        return JobResult {
            exit_code: 1,
            stdout: Bytes::new(),
            stderr: Bytes::from(format!("{}: error: #error\n", desc.compiler)),
            outputs: Vec::new(),
        };
    }
    let digest = blake3::hash(source);
    // An object a quarter the size of the source, made of the source's digest.
    let len = source.len() / 4 + 32;
    let object: Vec<u8> = digest
        .as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect();
    JobResult {
        exit_code: 0,
        stdout: Bytes::new(),
        stderr: Bytes::from_static(b"warning: reference compile\n"),
        outputs: vec![OutputFile {
            name: ".o".into(),
            data: Bytes::from(object),
        }],
    }
}

/// The reference server application: a cache and [`reference_compile`].
#[derive(Debug, Default)]
pub struct ReferenceServer {
    /// Results by verified key.
    pub cache: HashMap<CacheKey, JobResult>,
    jobs: HashMap<JobId, (JobDesc, Vec<u8>)>,
    /// Compiles run.
    pub compiles: u64,
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Jobs cancelled (by the client or the protocol).
    pub cancelled: u64,
    /// How long a compile takes, counted from the last source byte (a compiler can parse
    /// as bytes arrive but finishes only after the end). Zero answers at once.
    pub compile_time: Duration,
    /// Results waiting for their compile time to pass: (ready at, job, result).
    pending: Vec<(Instant, JobId, JobResult, ResultOrigin)>,
    /// Bytes the stand-in object is cut from instead of the source's digest (which
    /// compresses like nothing real): benchmarks put a real object file here, so what
    /// compression does to results is what it does to real objects. The object keeps its
    /// length (a quarter of the source plus 32 bytes).
    pub object_bytes: Option<Bytes>,
}

impl ReferenceServer {
    /// Reacts to one server event by calling server commands, with compiles that take no
    /// time.
    pub fn handle(&mut self, conn: &mut ServerConnection, event: ServerEvent) {
        let compile_time = std::mem::take(&mut self.compile_time);
        // Any instant works: with no compile time nothing is scheduled.
        self.handle_at(conn, event, None);
        self.compile_time = compile_time;
    }

    /// When the next compile finishes, if one is running.
    pub fn next_ready(&self) -> Option<Instant> {
        self.pending.iter().map(|(t, ..)| *t).min()
    }

    /// Sends the results of compiles finished by `now`.
    pub fn release(&mut self, conn: &mut ServerConnection, now: Instant) {
        let (ready, waiting) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, ..)| *t <= now);
        self.pending = waiting;
        for (_, job, result, origin) in ready {
            let _ = conn.send_result(job, &result, origin);
        }
    }

    /// Reacts to one server event at `now` (`None`: compiles are instant).
    pub fn handle_at(
        &mut self,
        conn: &mut ServerConnection,
        event: ServerEvent,
        now: Option<Instant>,
    ) {
        match event {
            ServerEvent::JobStarted { job, desc } => {
                self.jobs.insert(job, (desc, Vec::new()));
            }
            ServerEvent::Lookup { job, key } => match self.cache.get(&key) {
                Some(result) => {
                    self.hits += 1;
                    self.jobs.remove(&job);
                    let _ = conn.send_result(job, result, ResultOrigin::Early);
                }
                None => {
                    self.misses += 1;
                    let _ = conn.send_miss(job);
                }
            },
            ServerEvent::Source { job, data } => {
                if let Some((_, src)) = self.jobs.get_mut(&job) {
                    src.extend_from_slice(&data);
                }
            }
            ServerEvent::SourceDone { job, key, .. } => {
                if let Some((desc, src)) = self.jobs.remove(&job) {
                    let (result, origin) = match self.cache.get(&key) {
                        Some(r) => (r.clone(), ResultOrigin::Cache),
                        None => {
                            self.compiles += 1;
                            let mut r = reference_compile(&desc, &src);
                            if let (Some(bytes), Some(out)) =
                                (&self.object_bytes, r.outputs.first_mut())
                            {
                                out.data = bytes
                                    .iter()
                                    .copied()
                                    .cycle()
                                    .take(out.data.len())
                                    .collect::<Vec<u8>>()
                                    .into();
                            }
                            if r.exit_code == 0 {
                                self.cache.insert(key, r.clone());
                            }
                            (r, ResultOrigin::Compiled)
                        }
                    };
                    match now {
                        Some(now) if !self.compile_time.is_zero() => {
                            self.pending
                                .push((now + self.compile_time, job, result, origin));
                        }
                        _ => {
                            let _ = conn.send_result(job, &result, origin);
                        }
                    }
                }
            }
            ServerEvent::JobCancelled { job, .. } => {
                self.cancelled += 1;
                self.jobs.remove(&job);
                self.pending.retain(|(_, j, ..)| *j != job);
            }
            ServerEvent::StatsRequested => {
                let stats = vec![
                    Stat {
                        name: "hits".into(),
                        value: self.hits,
                    },
                    Stat {
                        name: "misses".into(),
                        value: self.misses,
                    },
                    Stat {
                        name: "compiles".into(),
                        value: self.compiles,
                    },
                ];
                let _ = conn.send_stats(stats);
            }
            _ => {}
        }
    }
}

/// A client and a server on two simulated links and a virtual clock.
#[derive(Debug)]
pub struct Pair {
    /// The client end.
    pub client: ClientConnection,
    /// The server end.
    pub server: ServerConnection,
    /// The server application.
    pub app: ReferenceServer,
    /// Client to server.
    pub c2s: Link,
    /// Server to client.
    pub s2c: Link,
    /// The virtual clock.
    pub now: Instant,
    /// When the pair was made.
    pub start: Instant,
    /// Events the client reported, in order.
    pub client_events: Vec<(Instant, ClientEvent)>,
    /// Events the server reported (before the application handled them).
    pub server_events: Vec<(Instant, ServerEvent)>,
    rng: Rng,
    /// Whether deliveries are split and merged at random points.
    pub chop: bool,
    /// A hook that may alter bytes on their way from client to server (tampering tests).
    pub alter_c2s: Option<fn(&mut Vec<u8>)>,
}

impl Pair {
    /// A pair on a link of the given one-way latency and bandwidth (bytes/s, 0 = unlimited),
    /// with a window each way of 256 KiB or the bandwidth-delay product plus 64 KiB,
    /// whichever is larger (a socket buffer that never limits throughput); `seed` drives the splitting of deliveries. `origin`
    /// is the virtual clock's start: any instant will do (the crate never reads a clock, so
    /// the caller supplies one), because only differences from it are used.
    pub fn new(
        client: ClientConfig,
        server: ServerConfig,
        latency: Duration,
        bandwidth: u64,
        seed: u64,
        origin: Instant,
    ) -> Self {
        let now = origin;
        let bdp = (bandwidth as u128 * 2 * latency.as_nanos() / 1_000_000_000) as usize;
        let window = (bdp + 64 * 1024).max(256 * 1024);
        Self {
            client: ClientConnection::new(client, now),
            server: ServerConnection::new(server, now),
            app: ReferenceServer::default(),
            c2s: Link::new(latency, bandwidth, window),
            s2c: Link::new(latency, bandwidth, window),
            now,
            start: now,
            client_events: Vec::new(),
            server_events: Vec::new(),
            rng: Rng::new(seed),
            chop: true,
            alter_c2s: None,
        }
    }

    /// A pair with default configurations on a 1 ms, unlimited-bandwidth link.
    pub fn default_with_seed(seed: u64, origin: Instant) -> Self {
        Self::new(
            ClientConfig::default(),
            ServerConfig::default(),
            Duration::from_millis(1),
            0,
            seed,
            origin,
        )
    }

    /// Virtual time elapsed since the pair was made.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Starts a job with the whole source at hand: computes the key, starts the job with
    /// the client's configured strategy, pushes the source with FIN.
    pub fn submit(&mut self, desc: JobDesc, source: Bytes) -> Option<JobId> {
        let key = CacheKey::compute(&desc, &source);
        let job = self.client.start_job(self.now, desc, Some(key)).ok()?;
        self.client.push_source(job, source, true).ok()?;
        Some(job)
    }

    /// One turn of the crate's run loop for both ends at the current virtual time, in the
    /// order the crate documentation prescribes: input (bytes due on the links, then input
    /// either end paused), events (the reference application reacts to the server's),
    /// transmit (while the links have room), timers that are due. Returns whether anything
    /// happened; time does not move.
    pub fn step(&mut self) -> bool {
        let mut progress = self.deliver();
        progress |= self.resume_paused_input();
        progress |= self.handle_events();
        progress |= self.transmit();
        progress |= self.fire_timers();
        progress
    }

    /// The next instant something is due: a delivery, a compile, a timer.
    fn next_due(&self) -> Option<Instant> {
        [
            self.c2s.next_arrival(),
            self.s2c.next_arrival(),
            self.app.next_ready(),
            self.client.poll_timeout(),
            self.server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Starts a [`Strategy::Lookup`] job for the key of `desc` and `source`: the source
    /// itself is never sent.
    pub fn lookup(&mut self, desc: JobDesc, source: &[u8]) -> Option<JobId> {
        let key = CacheKey::compute(&desc, source);
        self.client
            .start_job_with(self.now, desc, Some(key), Strategy::Lookup)
            .ok()
    }

    /// Moves bytes and events until nothing more happens or `max_steps` deliveries passed.
    /// Returns whether the pair went quiet.
    pub fn run(&mut self, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            self.pump();
            let Some(next) = self.next_due() else {
                return true;
            };
            // With nothing in flight and no compile running, only timers are left: stop
            // rather than jump ahead to an idle timeout, unless the caller asks for it with
            // `advance`.
            if self.c2s.next_arrival().is_none()
                && self.s2c.next_arrival().is_none()
                && self.app.next_ready().is_none()
            {
                return true;
            }
            self.now = self.now.max(next);
        }
        false
    }

    /// Runs until the client has reported the end of `job`: `Done`, `Failed`,
    /// `NotCached` or `TimedOut`.
    pub fn run_until_job_ends(&mut self, job: JobId, max_steps: usize) -> Option<ClientEvent> {
        for _ in 0..max_steps {
            if let Some(e) = self.job_end(job) {
                return Some(e);
            }
            if self.run(1) && self.job_end(job).is_none() {
                return None;
            }
        }
        self.job_end(job)
    }

    /// The event that ended `job`, if one came.
    pub fn job_end(&self, job: JobId) -> Option<ClientEvent> {
        self.client_events.iter().find_map(|(_, e)| match e {
            ClientEvent::Done { job: j, .. }
            | ClientEvent::Failed { job: j, .. }
            | ClientEvent::NotCached { job: j }
            | ClientEvent::TimedOut { job: j, .. }
                if *j == job =>
            {
                Some(e.clone())
            }
            _ => None,
        })
    }

    /// Moves the clock forward by `d`, delivering and firing timers on the way.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.pump();
            match self.next_due().filter(|t| *t <= end) {
                Some(next) => self.now = self.now.max(next),
                None => {
                    self.now = end;
                    self.pump();
                    return;
                }
            }
        }
    }

    /// Steps until neither end has anything to do at the current time.
    pub fn pump(&mut self) {
        while self.step() {}
    }

    /// Timers due by now; whether one fired.
    fn fire_timers(&mut self) -> bool {
        let mut fired = false;
        if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
            self.client.handle_timeout(self.now);
            fired = true;
        }
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            self.server.handle_timeout(self.now);
            fired = true;
        }
        fired
    }

    /// Bytes due on both links, fed to their ends; whether any arrived.
    fn deliver(&mut self) -> bool {
        let now = self.now;
        let mut up = self.c2s.take_due(now);
        if let Some(alter) = self.alter_c2s {
            if !up.is_empty() {
                alter(&mut up);
            }
        }
        let down = self.s2c.take_due(now);
        self.feed(true, &up);
        self.feed(false, &down);
        !up.is_empty() || !down.is_empty()
    }

    /// Input either end paused while its output was backed up, decoded once it may be.
    fn resume_paused_input(&mut self) -> bool {
        let mut resumed = false;
        if self.server.has_paused_input() {
            self.server.handle_input(self.now, &[]);
            resumed = true;
        }
        if self.client.has_paused_input() {
            self.client.handle_input(self.now, &[]);
            resumed = true;
        }
        resumed
    }

    fn feed(&mut self, to_server: bool, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = if self.chop {
                1 + self.rng.below(rest.len() as u64) as usize
            } else {
                rest.len()
            };
            let (now_part, later) = rest.split_at(n);
            if to_server {
                self.server.handle_input(self.now, now_part);
            } else {
                self.client.handle_input(self.now, now_part);
            }
            rest = later;
        }
    }

    /// Every event of both ends; the reference application answers the server's, and
    /// compiles that have finished by now are released.
    fn handle_events(&mut self) -> bool {
        let mut progress = false;
        while let Some(e) = self.server.poll_event() {
            self.server_events.push((self.now, e.clone()));
            self.app.handle_at(&mut self.server, e, Some(self.now));
            progress = true;
        }
        if self.app.next_ready().is_some_and(|t| t <= self.now) {
            self.app.release(&mut self.server, self.now);
            progress = true;
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push((self.now, e));
            progress = true;
        }
        progress
    }

    /// What both ends have to write, while the links have room.
    fn transmit(&mut self) -> bool {
        let mut progress = false;
        while self.c2s.has_room() {
            let Some(b) = self.client.poll_transmit(self.now) else {
                break;
            };
            self.c2s.send(self.now, b);
            progress = true;
        }
        while self.s2c.has_room() {
            let Some(b) = self.server.poll_transmit(self.now) else {
                break;
            };
            self.s2c.send(self.now, b);
            progress = true;
        }
        progress
    }
}
