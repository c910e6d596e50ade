//! The service: what all connections share (stores, executor, slots, limits, counters),
//! accepting connections and refusing the ones over a limit. Each accepted connection is
//! served by its own actor ([`connection`]).

mod connection;
pub(crate) mod job_log;

pub(crate) use connection::OpenGuard;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dcache_proto::{ErrorCode, ServerConfig, ServerConnection, Stat};
use dcache_transport::{BoxedStream, Listener, Peer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Duration;

use crate::access::Cidr;
use crate::counters::Counters;
use crate::distcc::DistccConfig;
use crate::error_log::ErrorLog;
use crate::exec::Executor;
use crate::flight::Flights;
use crate::lock;
use crate::relay::Upstreams;
use crate::slots::FairSlots;
use crate::spool::Budget;
use crate::store::Store;
use crate::store_writer::StoreWriter;

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

/// A compile server: stores, an executor, limits and counters, shared by all connections.
pub struct Service {
    pub(crate) store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    pub(crate) config: ServiceConfig,
    slots: Arc<FairSlots>,
    connections: Arc<Semaphore>,
    handshaking: Arc<Semaphore>,
    per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    next_conn: std::sync::atomic::AtomicU64,
    pub(crate) counters: Arc<Counters>,
    /// Identical compiles in flight, run once.
    flights: Arc<Flights>,
    budget: Arc<Budget>,
    /// Connections inside `handle_connection` right now.
    pub(crate) open: std::sync::atomic::AtomicUsize,
    /// Results being written to the store in the background.
    pub(crate) store_writer: Arc<StoreWriter>,
    /// Server errors (store, compiler start-up, sandbox), logged once per cause.
    errors: Arc<ErrorLog>,
    /// A relay's upstreams: jobs are passed on to them instead of compiled here.
    relay: Option<Arc<Upstreams>>,
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
        Self::build(store, executor, None, config)
    }

    /// A relay: a service whose back end is the dcache servers of `upstreams` (see
    /// [`crate::relay`]). `store` is its own cache tier in front of them (memory over
    /// disk, typically); results are never compiled here.
    pub fn relay(
        store: Arc<dyn Store>,
        upstreams: Arc<Upstreams>,
        config: ServiceConfig,
    ) -> Arc<Self> {
        Self::build(
            store,
            Arc::new(crate::relay::NoCompiler),
            Some(upstreams),
            config,
        )
    }

    fn build(
        store: Arc<dyn Store>,
        executor: Arc<dyn Executor>,
        relay: Option<Arc<Upstreams>>,
        config: ServiceConfig,
    ) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        let errors = Arc::new(ErrorLog::default());
        Arc::new(Self {
            relay,
            store_writer: StoreWriter::new(store.clone(), counters.clone(), errors.clone()),
            errors,
            counters,
            slots: FairSlots::new(config.compile_slots.max(1)),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            handshaking: Arc::new(Semaphore::new(config.max_handshaking.max(1))),
            per_address: Mutex::new(HashMap::new()),
            next_conn: std::sync::atomic::AtomicU64::new(0),
            store,
            executor,
            flights: Arc::default(),
            budget: Budget::new(config.memory_budget, config.spool_disk_budget),
            open: std::sync::atomic::AtomicUsize::new(0),
            config,
        })
    }

    /// The server's counters, the store's included, as sent in STATS.
    pub fn stats(&self) -> Vec<Stat> {
        let mut stats = self.counters.snapshot();
        let s = self.store.stats();
        let slots = self.compile_slots();
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
            (
                "upstream_connections_open",
                self.relay.as_ref().map_or(0, |u| u.open_connections()),
            ),
            ("compile_slots_busy", slots.busy as u64),
            ("compile_queue_depth", slots.queued as u64),
        ] {
            stats.push(Stat {
                name: name.into(),
                value,
            });
        }
        for t in self.store.tiers() {
            for (what, value) in [
                ("hits", t.hits),
                ("misses", t.misses),
                ("errors", t.errors),
                ("refused", t.refused),
                ("bytes_read", t.bytes_read),
                ("bytes_written", t.bytes_written),
                ("entries", t.entries),
                ("bytes", t.bytes),
                ("limit", t.limit),
                ("evictions", t.evictions),
            ] {
                stats.push(Stat {
                    name: format!("{}_{what}", t.name),
                    value,
                });
            }
        }
        stats
    }

    /// The compile slots: how many, how many in use, how many jobs wait for one.
    pub fn compile_slots(&self) -> SlotUsage {
        let (busy, queued) = self.slots.usage();
        SlotUsage {
            total: self.config.compile_slots.max(1),
            busy,
            queued,
        }
    }

    /// Per-tier counters of the store, front tier first (as in STATS).
    pub fn tier_stats(&self) -> Vec<crate::store::TierStats> {
        self.store.tiers()
    }

    /// Source bytes of jobs waiting for a compile slot: held in memory, and spooled to
    /// temporary files.
    pub fn waiting_source_bytes(&self) -> (u64, u64) {
        (self.budget.used() as u64, self.budget.disk_used() as u64)
    }

    /// Whether the store can keep results now (each tier writable or reachable), with
    /// the reason when not; see [`Store::ready`].
    pub async fn ready(&self) -> Result<(), String> {
        self.store.ready().await
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
        self.serve_front(listener, shutdown, Front::Dcache).await;
    }

    /// Accepts stock distcc clients on `listener` until `shutdown` resolves, serving each
    /// request with this service's store, compile slots, single-flight, limits, address
    /// ranges and counters (see [`crate::distcc`]). A refused address is closed at once,
    /// which a distcc client answers by compiling locally.
    pub async fn serve_distcc(
        self: &Arc<Self>,
        listener: Box<dyn Listener>,
        distcc: Arc<DistccConfig>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        self.serve_front(listener, shutdown, Front::Distcc(distcc))
            .await;
    }

    /// The accept loop every front end shares: admission (address ranges, per-address
    /// cap, handshake pool), the connection cap, and a graceful stop.
    async fn serve_front(
        self: &Arc<Self>,
        listener: Box<dyn Listener>,
        shutdown: impl std::future::Future<Output = ()>,
        front: Front,
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
                Ok((stream, peer)) => match self.admit(&peer) {
                    Ok(admitted) => {
                        let me = self.clone();
                        let stop = stop_rx.clone();
                        let front = front.clone();
                        tasks.spawn(async move {
                            let handshake = admitted.handshake;
                            match front {
                                Front::Dcache => {
                                    let peer = peer.to_string().into();
                                    me.run_connection(
                                        stream,
                                        stop,
                                        Some(handshake),
                                        peer,
                                        crate::counters::Front::Dcache,
                                    )
                                    .await;
                                }
                                Front::Distcc(config) => {
                                    crate::distcc::serve_connection(
                                        me, stream, peer, config, stop, handshake,
                                    )
                                    .await;
                                }
                            }
                            drop(admitted.address);
                            drop(permit);
                        });
                    }
                    Err((code, message)) => {
                        Counters::bump(&self.counters.connections_refused);
                        match front {
                            Front::Dcache => {
                                tasks.spawn(refuse(stream, code, message));
                            }
                            // distcc has no refusal message: the closed connection is the
                            // answer, and the client compiles locally.
                            Front::Distcc(_) => {
                                Counters::bump(&self.counters.distcc_refused);
                                drop(stream);
                            }
                        }
                        drop(permit);
                    }
                },
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

    /// Whether a connection just accepted from `peer` is served: its address must be
    /// allowed and under its cap, and the handshake pool must have room. Otherwise the
    /// code and message of its refusal.
    fn admit(self: &Arc<Self>, peer: &Peer) -> Result<Admitted, (ErrorCode, String)> {
        let address = match peer.ip() {
            Some(ip) if !self.config.allow.iter().any(|c| c.contains(ip)) => {
                tracing::info!("refused {peer}: not in the allowed address ranges");
                return Err((
                    ErrorCode::UNAUTHORIZED,
                    format!("{ip} is not allowed to use this server (see dcache-server --allow)"),
                ));
            }
            Some(ip) => match AddressShare::take(self, ip) {
                Some(share) => Some(share),
                None => {
                    return Err((
                        ErrorCode::OVERLOADED,
                        format!(
                            "{ip} already has {} connections open",
                            self.config.max_connections_per_address
                        ),
                    ));
                }
            },
            None => None,
        };
        let Ok(handshake) = self.handshaking.clone().try_acquire_owned() else {
            return Err((
                ErrorCode::OVERLOADED,
                "too many connections are in their handshake; try again".into(),
            ));
        };
        Ok(Admitted { address, handshake })
    }

    /// Waits until every result being stored in the background has been stored (or
    /// failed to be).
    pub async fn flush(&self) {
        self.store_writer.flush().await;
    }

    /// Checks a job against the executor's allow-list before any source is read (the
    /// distcc front end refuses early, so a refused client stops uploading).
    pub(crate) fn check_job(
        &self,
        desc: &dcache_proto::JobDesc,
    ) -> Result<crate::exec::CompilerId, crate::exec::ExecError> {
        self.executor.check(desc)
    }

    /// The identity a job naming compiler `name` is given when its client cannot say
    /// (see [`crate::exec::Executor::identity_of`]).
    pub(crate) fn identity_of(&self, name: &str) -> Option<dcache_proto::CompilerIdentity> {
        self.executor.identity_of(name)
    }

    /// The protocol settings every connection uses.
    pub(crate) fn protocol(&self) -> &ServerConfig {
        &self.config.protocol
    }

    /// The memory allowance for sources held outside a spool.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Serves one connection until it closes. `stop` turning true asks for a graceful end.
    pub async fn handle_connection(
        self: &Arc<Self>,
        stream: BoxedStream,
        stop: watch::Receiver<bool>,
    ) {
        self.run_connection(
            stream,
            stop,
            None,
            "in-process".into(),
            crate::counters::Front::Dcache,
        )
        .await;
    }

    /// Serves one dcache-protocol connection from `peer`, arrived through `front`, with
    /// this service's back end: compiled here, or passed on upstream by a relay.
    async fn run_connection(
        self: &Arc<Self>,
        stream: BoxedStream,
        stop: watch::Receiver<bool>,
        handshake: Option<OwnedSemaphorePermit>,
        peer: Arc<str>,
        front: crate::counters::Front,
    ) {
        match &self.relay {
            Some(up) => crate::relay::run(self.clone(), up.clone(), stream, stop, handshake).await,
            None => connection::run(self.clone(), stream, stop, handshake, peer, front).await,
        }
    }

    /// Serves the in-process connection a distcc request from `peer` is submitted
    /// through, counting its jobs under the distcc front end and naming the real client
    /// in their log lines.
    pub(crate) async fn handle_distcc_connection(
        self: &Arc<Self>,
        stream: BoxedStream,
        stop: watch::Receiver<bool>,
        peer: Arc<str>,
    ) {
        self.run_connection(stream, stop, None, peer, crate::counters::Front::Distcc)
            .await;
    }
}

/// The state of the compile slots at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotUsage {
    /// Slots in all.
    pub total: usize,
    /// Slots running a compile.
    pub busy: usize,
    /// Jobs with their whole source waiting for a slot.
    pub queued: usize,
}

/// Which protocol an accept loop serves.
#[derive(Clone)]
enum Front {
    Dcache,
    Distcc(Arc<DistccConfig>),
}

/// Tells a refused peer why, in an ERROR frame, and closes. Best effort, bounded in time:
/// a refused peer gets no more of the server than this.
async fn refuse(mut stream: BoxedStream, code: ErrorCode, message: String) {
    use tokio::io::AsyncWriteExt;
    let bytes = ServerConnection::refusal(code, &message);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// What an admitted connection holds while it is served.
struct Admitted {
    /// Its place in its address's count (TCP peers only).
    address: Option<AddressShare>,
    /// Its place in the handshake pool, given back once its handshake is done.
    handshake: OwnedSemaphorePermit,
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
