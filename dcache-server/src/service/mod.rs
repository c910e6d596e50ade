//! Serving connections: one actor task per connection, reacting to protocol events and to
//! the completion of its lookups and compiles.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dcache_proto::{
    CacheKey, ErrorCode, JobDesc, JobId, JobResult, ResultOrigin, ServerConfig, ServerEvent, Stat,
};
use dcache_transport::{BoxedStream, Listener, ServerCommand, spawn_server_connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Duration;

use crate::access::Cidr;
use crate::counters::Counters;
use crate::exec::{CompilerId, ExecError, Executor, store_key};
use crate::slots::{ConnId, FairSlots, SlotPermit};
use crate::spool::{Budget, Spool};
use crate::store::{Store, StoreKey};

/// Settings of a [`Service`].
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Protocol settings of every connection (limits, timeouts).
    pub protocol: ServerConfig,
    /// Compiles running at once; more wait for a slot. Default: the number of cores.
    pub compile_slots: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Source bytes that jobs waiting for a compile slot may hold in memory, all
    /// connections together; beyond it their source waits in temporary files.
    pub memory_budget: usize,
    /// Address ranges TCP clients may connect from (default: loopback only). Unix-socket
    /// and in-process clients are local and always allowed.
    pub allow: Vec<Cidr>,
    /// Source bytes that waiting jobs may keep in temporary files, all connections
    /// together; past it a job's upload is refused with OVERLOADED.
    pub spool_disk_budget: usize,
    /// Connections that may be in their handshake at once (a small pool of their own, so
    /// silent or slow sockets cannot take the places of clients that authenticated; each
    /// is bounded by the protocol's handshake timeout). More are refused at once.
    pub max_handshaking: usize,
    /// Connections one IP address may hold open at once; more are refused at once.
    pub max_connections_per_address: usize,
    /// Once a job holds a compile slot while its source still arrives, the slowest upload
    /// it may keep: fewer bytes than this per second over a whole
    /// [`upload_check_interval`](Self::upload_check_interval) ends the job (the client
    /// compiles locally) and gives the slot back.
    pub min_upload_rate: u64,
    /// How often the upload rate of a job holding a slot is checked.
    pub upload_check_interval: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            protocol: ServerConfig::default(),
            compile_slots: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_connections: 1024,
            memory_budget: 256 << 20,
            allow: Cidr::loopback(),
            spool_disk_budget: 4 << 30,
            max_handshaking: 256,
            max_connections_per_address: 64,
            min_upload_rate: 16 << 10,
            upload_check_interval: Duration::from_secs(10),
        }
    }
}

/// What an identical compile in flight will publish: its result, or `None` if it failed
/// (the waiters then compile for themselves).
type Flight = watch::Receiver<Option<Option<JobResult>>>;

/// A compile server: stores, an executor, limits and counters, shared by all connections.
pub struct Service {
    store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    config: ServiceConfig,
    slots: Arc<FairSlots>,
    connections: Arc<Semaphore>,
    handshaking: Arc<Semaphore>,
    per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    next_conn: std::sync::atomic::AtomicU64,
    counters: Counters,
    in_flight: Mutex<HashMap<StoreKey, Flight>>,
    budget: Arc<Budget>,
    /// Connections inside `handle_connection` right now.
    open: std::sync::atomic::AtomicUsize,
    /// Results being written to the store in the background.
    storing: watch::Sender<usize>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config)
            .finish()
    }
}

impl Service {
    /// A service over `store` and `executor`.
    pub fn new(
        store: Arc<dyn Store>,
        executor: Arc<dyn Executor>,
        config: ServiceConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: FairSlots::new(config.compile_slots.max(1)),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            handshaking: Arc::new(Semaphore::new(config.max_handshaking.max(1))),
            per_address: Mutex::new(HashMap::new()),
            next_conn: std::sync::atomic::AtomicU64::new(0),
            store,
            executor,
            counters: Counters::default(),
            in_flight: Mutex::new(HashMap::new()),
            budget: Budget::new(config.memory_budget, config.spool_disk_budget),
            open: std::sync::atomic::AtomicUsize::new(0),
            storing: watch::Sender::new(0),
            config,
        })
    }

    /// The server's counters, the store's included, as sent in STATS.
    pub fn stats(&self) -> Vec<Stat> {
        let mut stats = self.counters.snapshot();
        let s = self.store.stats();
        for (name, value) in [
            ("stored_entries", s.entries),
            ("stored_bytes", s.bytes),
            ("evictions", s.evictions),
            ("corrupt_entries_dropped", s.corrupt),
            ("waiting_source_bytes_in_memory", self.budget.used() as u64),
            (
                "waiting_source_bytes_on_disk",
                self.budget.disk_used() as u64,
            ),
            ("connections_open", self.open_connections() as u64),
        ] {
            stats.push(Stat {
                name: name.into(),
                value,
            });
        }
        stats
    }

    /// Connections being served right now. Every connection, however it ends, gives its
    /// slot back: this returning to zero is how tests see that nothing leaked.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The live counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Accepts connections on `listener` until `shutdown` resolves, then stops accepting,
    /// tells every connection GOAWAY and waits for their jobs to finish.
    pub async fn serve(
        self: &Arc<Self>,
        listener: Box<dyn Listener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = self.connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(ip) = peer.ip() {
                        if !self.config.allow.iter().any(|c| c.contains(ip)) {
                            Counters::bump(&self.counters.connections_refused);
                            tracing::info!("refused {peer}: not in the allowed address ranges");
                            tasks.spawn(refuse(
                                stream,
                                ErrorCode::UNAUTHORIZED,
                                format!(
                                    "{ip} is not allowed to use this server (see \
                                     dcache-server --allow)"
                                ),
                            ));
                            drop(permit);
                            continue;
                        }
                    }
                    let address = match peer.ip() {
                        Some(ip) => match AddressShare::take(self, ip) {
                            Some(share) => Some(share),
                            None => {
                                Counters::bump(&self.counters.connections_refused);
                                tasks.spawn(refuse(
                                    stream,
                                    ErrorCode::OVERLOADED,
                                    format!(
                                        "{ip} already has {} connections open",
                                        self.config.max_connections_per_address
                                    ),
                                ));
                                drop(permit);
                                continue;
                            }
                        },
                        None => None,
                    };
                    let Ok(handshake) = self.handshaking.clone().try_acquire_owned() else {
                        Counters::bump(&self.counters.connections_refused);
                        tasks.spawn(refuse(
                            stream,
                            ErrorCode::OVERLOADED,
                            "too many connections are in their handshake; try again".into(),
                        ));
                        drop(permit);
                        continue;
                    };
                    let me = self.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        me.serve_connection(stream, stop, Some(handshake)).await;
                        drop(address);
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        // Results are stored after they are answered; a stop must not lose them (the
        // embedded server stops when its process is about to exit).
        self.flush().await;
    }

    /// Waits until every result being stored in the background has been stored (or
    /// failed to be).
    pub async fn flush(&self) {
        let mut storing = self.storing.subscribe();
        let _ = storing.wait_for(|n| *n == 0).await;
    }

    /// Serves one connection until it closes. `stop` turning true asks for a graceful end.
    pub async fn handle_connection(
        self: &Arc<Self>,
        stream: BoxedStream,
        stop: watch::Receiver<bool>,
    ) {
        self.serve_connection(stream, stop, None).await;
    }

    /// [`handle_connection`](Self::handle_connection), holding `handshake` (a place in
    /// the handshake pool) until the peer has completed its handshake.
    async fn serve_connection(
        self: &Arc<Self>,
        stream: BoxedStream,
        mut stop: watch::Receiver<bool>,
        mut handshake: Option<OwnedSemaphorePermit>,
    ) {
        Counters::bump(&self.counters.connections);
        let _open = OpenGuard::new(&self.open);
        let mut conn = spawn_server_connection(stream, self.config.protocol.clone());
        let (internal_tx, mut internal) = mpsc::unbounded_channel();
        let mut actor = Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            service: self.clone(),
            commands: conn.commands.clone(),
            internal: internal_tx,
            jobs: HashMap::new(),
        };
        let mut stopping = *stop.borrow();
        if stopping {
            let _ = conn.commands.send(ServerCommand::GoAway);
        }
        loop {
            tokio::select! {
                ev = conn.events.recv() => match ev {
                    Some(ServerEvent::Closed { error }) => {
                        if error.is_some() {
                            Counters::bump(&self.counters.connection_errors);
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
        let stats = *conn.stats.borrow();
        self.counters
            .source_bytes_saved
            .fetch_add(stats.source_bytes_saved, Ordering::Relaxed);
        actor.abort_all();
    }
}

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
    },
}

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
    /// This job leads a single-flight group under `claimed`.
    leader: Option<watch::Sender<Option<Option<JobResult>>>>,
    task: Option<AbortHandle>,
    done: bool,
    /// Source bytes received so far, and at the last upload-rate check.
    received: u64,
    received_at_check: u64,
    /// The ticker of upload-rate checks while the job streams into a compile slot.
    watchdog: Option<AbortHandle>,
}

struct Connection {
    id: ConnId,
    service: Arc<Service>,
    commands: mpsc::UnboundedSender<ServerCommand>,
    internal: mpsc::UnboundedSender<Internal>,
    jobs: HashMap<JobId, Job>,
}

impl Connection {
    fn send(&self, cmd: ServerCommand) {
        send(&self.commands, cmd);
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
                        },
                    );
                }
                Err(e) => {
                    Counters::bump(&counters.jobs_refused);
                    self.send(ServerCommand::Abort {
                        job,
                        code: ErrorCode::REFUSED,
                        message: e.to_string(),
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
                            if let Some(j) = self.jobs.remove(&job) {
                                finish_job(&self.service, j, None);
                            }
                            self.send(ServerCommand::Abort {
                                job,
                                code: ErrorCode::OVERLOADED,
                                message: format!(
                                    "cannot keep the source until a compile slot frees: {e}"
                                ),
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
                if code == ErrorCode::HASH_MISMATCH {
                    Counters::bump(&counters.hash_mismatches);
                }
                if let Some(j) = self.jobs.remove(&job) {
                    finish_job(&self.service, j, None);
                }
            }
            ServerEvent::StatsRequested => self.send(ServerCommand::Stats(self.service.stats())),
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
        let service = self.service.clone();
        let internal = self.internal.clone();
        // Join an identical compile in flight, or lead one: decided now, synchronously, so
        // two jobs racing on one key cannot both lead.
        let flight = {
            let mut map = lock(&service.in_flight);
            match map.get(&sk) {
                Some(rx) => Some(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(sk, rx);
                    j.leader = Some(tx);
                    None
                }
            }
        };
        let leading = j.leader.is_some();
        let handle = tokio::spawn(async move {
            let cached = service.store.get(&sk).await;
            let result = match (cached, flight) {
                (Some(r), _) => Some(r),
                (None, Some(mut rx)) => {
                    Counters::bump(&service.counters.single_flight_waits);
                    let published = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|v| v.clone());
                    published.flatten()
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
                        Counters::bump(&counters.hits);
                        // The answer to a HASH is EARLY_RESULT even when the upload
                        // happened to finish first; a HASH-less upload gets RESULT.
                        let early = j.claimed.is_some();
                        if early {
                            Counters::bump(&counters.early_results);
                        }
                        if let Some(j) = self.jobs.remove(&job) {
                            finish_job(&self.service, j, Some(&result));
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
                        Counters::bump(&counters.misses);
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
            Internal::Compiled { job, result } => {
                let Some(mut j) = self.jobs.remove(&job) else {
                    return;
                };
                match result {
                    Ok(result) => {
                        Counters::bump(&counters.compiles);
                        if result.exit_code != 0 {
                            Counters::bump(&counters.compile_failures);
                        }
                        let publish = j.verified.is_some()
                            && j.verified == j.claimed
                            && result.exit_code == 0;
                        // Store only under the verified key, only successes, and only when
                        // the compile saw the whole source.
                        if let (Some(vk), 0) = (j.verified, result.exit_code) {
                            let service = self.service.clone();
                            let stored = result.clone();
                            // The single-flight entry keeps answering lookups with this
                            // result until the store has it, so a job arriving meanwhile
                            // is still a hit.
                            let flight = if publish {
                                j.leader.take().zip(j.claimed)
                            } else {
                                None
                            };
                            if let Some((tx, _)) = &flight {
                                let _ = tx.send(Some(Some(result.clone())));
                            }
                            service.storing.send_modify(|n| *n += 1);
                            tokio::spawn(async move {
                                if service.store.put(&vk, &stored).await.is_err() {
                                    Counters::bump(&service.counters.store_errors);
                                }
                                if let Some((_tx, key)) = flight {
                                    lock(&service.in_flight).remove(&key);
                                }
                                service.storing.send_modify(|n| *n -= 1);
                            });
                        }
                        j.done = true;
                        finish_job(&self.service, j, publish.then_some(&result));
                        self.send(ServerCommand::Result {
                            job,
                            result,
                            origin: ResultOrigin::Compiled,
                        });
                    }
                    Err(e) => {
                        j.done = true;
                        finish_job(&self.service, j, None);
                        let code = if e.is_refusal() {
                            ErrorCode::REFUSED
                        } else {
                            ErrorCode::COMPILE_FAILED
                        };
                        self.send(ServerCommand::Abort {
                            job,
                            code,
                            message: e.to_string(),
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
        let handle = tokio::spawn(async move {
            let _permit = permit;
            let result = service.executor.compile(desc, rx).await;
            let _ = internal.send(Internal::Compiled { job, result });
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
        if let Some(j) = self.jobs.remove(&job) {
            finish_job(&self.service, j, None);
        }
        self.send(ServerCommand::Abort {
            job,
            code: ErrorCode::TIMEOUT,
            message: format!(
                "the upload slowed below {rate} bytes/s while holding a compile slot \
                 ({got} bytes in {:?}); the slot was given to another job",
                config.upload_check_interval
            ),
        });
    }

    fn abort_all(&mut self) {
        for (_, j) in self.jobs.drain() {
            finish_job(&self.service, j, None);
        }
    }
}

/// Ends a job's local state: stops its task and, if it led a single-flight group,
/// publishes its result (or failure) and removes the group.
fn finish_job(service: &Service, j: Job, published: Option<&JobResult>) {
    if let Some(w) = &j.watchdog {
        w.abort();
    }
    if let Some(task) = &j.task {
        if !j.done {
            task.abort();
        }
    }
    if let (Some(tx), Some(key)) = (j.leader, j.claimed) {
        lock(&service.in_flight).remove(&key);
        let _ = tx.send(Some(published.cloned()));
    }
}

/// Tells a refused peer why, in an ERROR frame, and closes. Best effort, bounded in time:
/// a refused peer gets no more of the server than this.
async fn refuse(mut stream: dcache_transport::BoxedStream, code: ErrorCode, message: String) {
    use tokio::io::AsyncWriteExt;
    let frame = dcache_proto::Frame::Error { code, message };
    if let Ok(bytes) = frame.to_bytes(dcache_proto::Limits::BASELINE.max_frame_payload) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// Sends a command to the connection. A failed send means the connection is already
/// gone, which the event loop sees as its Closed event.
fn send(commands: &mpsc::UnboundedSender<ServerCommand>, cmd: ServerCommand) {
    let _ = commands.send(cmd);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single map operations; poisoning cannot leave them torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's place in its address's count, given back when dropped.
struct AddressShare {
    service: Arc<Service>,
    ip: std::net::IpAddr,
}

impl AddressShare {
    /// A place for one more connection from `ip`, if it has fewer than the limit.
    fn take(service: &Arc<Service>, ip: std::net::IpAddr) -> Option<Self> {
        let mut map = lock(&service.per_address);
        let n = map.entry(ip).or_insert(0);
        if *n >= service.config.max_connections_per_address.max(1) {
            return None;
        }
        *n += 1;
        Some(Self {
            service: service.clone(),
            ip,
        })
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut map = lock(&self.service.per_address);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Counts a connection as open for as long as it lives, however its handler ends.
struct OpenGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> OpenGuard<'a> {
    fn new(gauge: &'a std::sync::atomic::AtomicUsize) -> Self {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
