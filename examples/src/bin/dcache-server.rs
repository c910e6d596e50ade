//! `dcache-server`: the compile server.
//!
//! Listens on one or more addresses, answers cache hits at once, compiles misses with the
//! allow-listed compilers found on this machine, and keeps results in memory over a disk
//! cache. `--listen-distcc` serves stock distcc clients from the same service. Stops
//! gracefully on SIGINT or SIGTERM: no new connections, open jobs finish, clients are told
//! GOAWAY.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dcache_examples::util::{init_logging, parse_size, user_cache_dir};
use dcache_server::distcc::DistccConfig;
use dcache_server::exec::ExecLimits;
use dcache_server::exec::{LocalExecutor, LocalExecutorConfig};
use dcache_server::metrics::{MetricsConfig, Readiness, SandboxState};
use dcache_server::sandbox::{ResourceLimits, Sandbox};
use dcache_server::store::shared::{Backend, RedisBackend, SharedConfig, SharedStore};
use dcache_server::store::{
    DiskStore, MemoryStore, SealKey, SharedTieredStore, Store, TieredStore,
};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TlsServer, TransportOptions, bind};

/// dcache-server: the dcache compile server. Answers cache hits at once, compiles misses
/// with the allowed compilers, keeps results in memory over a disk cache.
#[derive(Parser, Debug)]
// The name given, not the package's: this binary ships in the `dcache-examples` package,
// whose name and description clap would otherwise print for --help and --version.
#[command(name = "dcache-server", version, long_about = None)]
struct Args {
    /// Address to listen on: tcp://HOST:PORT, tls://HOST:PORT (with --tls-cert and
    /// --tls-key) or unix:///path. Repeat for several. Loopback only unless told
    /// otherwise.
    #[arg(long = "listen", default_value = "tcp://127.0.0.1:3633")]
    listen: Vec<Address>,
    /// Address to serve stock distcc clients on (DISTCC_HOSTS=HOST:PORT, or HOST:PORT,lzo):
    /// tcp://HOST:PORT, distcc's port being 3632. Repeat for several. Same cache, slots,
    /// limits and --allow as the dcache listeners.
    #[arg(long = "listen-distcc", value_name = "ADDR")]
    listen_distcc: Vec<Address>,
    /// Where cached results are kept on disk (default: the user's cache directory,
    /// dcache/server).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
    /// Largest size of the disk cache, e.g. 10G or 500M; least recently used results are
    /// evicted beyond it.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    cache_size: u64,
    /// Compiles run at once (default: the number of cores); more wait in a queue.
    #[arg(long)]
    jobs: Option<usize>,
    /// Compiler names offered to clients, comma-separated: plain or versioned (gcc-12,
    /// x86_64-linux-gnu-gcc-11, clang-14), found in --compiler-path; a client can never
    /// choose a path. A job runs only on the offered compiler whose identity (version,
    /// target, digest of its programs) equals that of the client's own compiler.
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        value_parser = compiler_name,
        default_value = "gcc,g++,cc,c++,clang,clang++"
    )]
    allow_compiler: Vec<String>,
    /// Directories searched for the allowed compilers and their helpers (as, cc1), in
    /// order. A fixed list rather than the server's own PATH, so what runs does not depend
    /// on how the server was started.
    #[arg(
        long,
        value_name = "DIRS",
        default_value = "/usr/local/bin:/usr/bin:/bin"
    )]
    compiler_path: String,
    /// Address range TCP clients may connect from, e.g. 10.1.0.0/16 (repeatable).
    /// Default: loopback only. Unix-socket clients are always allowed.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<dcache_server::access::Cidr>,
    /// File holding a shared token of at least 16 bytes, readable by its owner only
    /// (`head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE`). Clients must prove
    /// they hold it (DCACHE_TOKEN) by challenge-response before any job; it never crosses
    /// the wire.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// PEM file with this server's certificate (then any intermediates), for tls://
    /// listeners. Clients check it against the host name they connect to.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM file of the CA whose client certificates tls:// listeners require (mutual
    /// TLS): a client without a certificate it issued completes no handshake.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Print which sandbox protections this kernel enforces for compiles, and exit
    /// (status 0 when all that a server beyond loopback requires are active).
    #[arg(long)]
    check_sandbox: bool,
    /// Run compiles unconfined, even beyond loopback and even where the kernel could
    /// sandbox them. Any client that may connect can then read every file this user can
    /// read. Only for a compiler that cannot run confined, on a trusted network.
    #[arg(long)]
    insecure_no_sandbox: bool,
    /// A file or directory every sandboxed compile may also read and execute (repeatable):
    /// a compiler installed with libraries of its own, or a wrapper script's interpreter.
    #[arg(long = "sandbox-path", value_name = "PATH")]
    sandbox_paths: Vec<std::path::PathBuf>,
    /// The program that confines each compile (default: this binary itself).
    #[arg(long, value_name = "PATH", hide = true)]
    sandbox_launcher: Option<std::path::PathBuf>,
    /// Address space of each compiler process, e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    limit_memory: u64,
    /// Largest file a compile may write (object, assembly, temporary files), e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    limit_output: u64,
    /// Seconds one compile may take, upload included (wall clock, and CPU time of each
    /// process).
    #[arg(long, default_value_t = 300)]
    limit_time: u64,
    /// Bytes of stderr (and of stdout) kept per compile; the rest is cut with a note.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    limit_stderr: u64,
    /// Disk that uploads waiting for a compile slot may fill, all clients together;
    /// beyond it a job is refused with OVERLOADED (the client compiles locally).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    limit_spool: u64,
    /// Slowest upload (bytes per second, over 10 s) a job may keep while it holds a
    /// compile slot; slower, it ends and the slot goes to the next job.
    #[arg(long, default_value = "16K", value_parser = parse_size)]
    min_upload_rate: u64,
    /// Seconds a new connection may take to complete its handshake (HELLO, token proof).
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Seconds an upload may go without a whole frame arriving.
    #[arg(long, default_value_t = 60)]
    stall_timeout: u64,
    /// Seconds a connection with no open job may stay silent before GOAWAY.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Connections in their handshake at once; more are refused at once.
    #[arg(long, default_value_t = 256)]
    max_handshaking: usize,
    /// Connections one IP address may hold open; more are refused at once.
    #[arg(long, default_value_t = 64)]
    max_connections_per_address: usize,
    /// A cache tier shared by a fleet of servers, under the local ones: redis://HOST:PORT[/DB],
    /// rediss://… (TLS), redis+unix:///PATH, or a Redis Cluster as
    /// redis+cluster://H1:P1,H2:P2,… (seed nodes). Needs --shared-key-file.
    #[arg(long, value_name = "URL", requires = "shared_key_file")]
    shared: Option<String>,
    /// File holding the fleet's shared key (same rules as --token-file: at least 16
    /// bytes, readable by its owner only). Every server signs what it writes to the shared
    /// tier with it and refuses what does not verify.
    #[arg(long, value_name = "PATH", requires = "shared")]
    shared_key_file: Option<std::path::PathBuf>,
    /// Seconds a shared entry lives after it was last written or hit.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    shared_ttl: u64,
    /// Largest entry written to or read from the shared tier, e.g. 64M (larger results
    /// stay local; large entries are stored in chunks of 4 MiB).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    shared_max_value: u64,
    /// Milliseconds a lookup waits for the shared tier before counting a miss.
    #[arg(long, default_value_t = 250)]
    shared_deadline: u64,
    /// Serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) over
    /// plain HTTP on tcp://HOST:PORT, a listener of its own. Off by default; loopback
    /// only unless --metrics-allow names the ranges that may scrape it.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<Address>,
    /// Address range that may scrape --metrics, e.g. 10.1.0.0/16 (repeatable; default:
    /// loopback only). Required to bind --metrics beyond loopback.
    #[arg(long = "metrics-allow", value_name = "CIDR", requires = "metrics")]
    metrics_allow: Vec<dcache_server::access::Cidr>,
    /// Log each job (repeat for more detail).
    #[arg(long, short, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    // Each compile runs through this very binary as its sandbox launcher: that mode must
    // start before any thread (namespaces can only be entered single-threaded).
    dcache_server::sandbox::run_launcher_if_requested();
    let args = Args::parse();
    init_logging(match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    });
    let sandbox = match probe_sandbox(&args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let sandbox_state = match &sandbox {
        Some(s) => SandboxState::Active(s.protections().to_string()),
        None if args.insecure_no_sandbox => SandboxState::Disabled,
        None => SandboxState::Unavailable("the kernel cannot enforce it (see the log)".into()),
    };
    if args.check_sandbox {
        return ExitCode::SUCCESS;
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(serve(args, sandbox, sandbox_state)),
        Err(e) => {
            eprintln!("dcache-server: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Finds out what the kernel enforces and decides, failing closed: a server that lets any
/// non-loopback client in never compiles unconfined unless told `--insecure-no-sandbox`.
fn probe_sandbox(args: &Args) -> Result<Option<Sandbox>, ExitCode> {
    let launcher = match &args.sandbox_launcher {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| {
            eprintln!("dcache-server: cannot find its own executable for the sandbox: {e}");
            ExitCode::FAILURE
        })?,
    };
    let beyond_loopback = args.allow.iter().any(|c| !c.is_loopback());
    if args.insecure_no_sandbox && !args.check_sandbox {
        tracing::warn!(
            "compiles are NOT sandboxed (--insecure-no-sandbox): clients can read this \
             user's files"
        );
        return Ok(None);
    }
    match Sandbox::probe(&launcher) {
        Ok(sandbox) => {
            if args.check_sandbox {
                println!("sandbox: {}", sandbox.protections());
            }
            tracing::info!("compiles are sandboxed: {}", sandbox.protections());
            Ok(Some(sandbox))
        }
        Err(e) if args.check_sandbox => {
            println!("sandbox: NOT AVAILABLE: {e}");
            Err(ExitCode::FAILURE)
        }
        Err(e) if beyond_loopback => {
            eprintln!(
                "dcache-server: refusing to serve beyond loopback without a compile sandbox: \
                 {e}\n(--insecure-no-sandbox overrides this; every client could then read \
                 this user's files)"
            );
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            tracing::warn!("compiles are NOT sandboxed ({e}); serving loopback only");
            Ok(None)
        }
    }
}

async fn serve(args: Args, sandbox: Option<Sandbox>, sandbox_state: SandboxState) -> ExitCode {
    let dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| user_cache_dir().join("dcache").join("server"));
    let disk = match DiskStore::open(&dir, args.cache_size) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "dcache-server: cannot open the cache in {}: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut store: Arc<dyn Store> = Arc::new(TieredStore::new(MemoryStore::new(256 << 20), disk));
    if let Some(url) = &args.shared {
        match shared_tier(&args, url) {
            Ok(shared) => store = Arc::new(SharedTieredStore::new(store, shared)),
            Err(e) => {
                eprintln!("dcache-server: --shared: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let stderr_cap = usize::try_from(args.limit_stderr).unwrap_or(usize::MAX);
    let executor = LocalExecutor::new(LocalExecutorConfig {
        allowed: args.allow_compiler.clone(),
        path: args.compiler_path.clone(),
        time_limit: std::time::Duration::from_secs(args.limit_time.max(1)),
        sandbox,
        sandbox_paths: args.sandbox_paths.clone(),
        limits: ExecLimits {
            resources: ResourceLimits {
                address_space: args.limit_memory,
                cpu_seconds: args.limit_time.max(1),
                file_size: args.limit_output,
            },
            max_stdout: stderr_cap,
            max_stderr: stderr_cap,
        },
        ..LocalExecutorConfig::default()
    });
    for (name, id) in executor.offers() {
        tracing::info!("offering {name}: {id}");
    }
    if executor.available().is_empty() {
        eprintln!(
            "dcache-server: none of the allowed compilers ({}) was found in {}",
            args.allow_compiler.join(", "),
            args.compiler_path
        );
        return ExitCode::FAILURE;
    }
    let mut config = ServiceConfig::default();
    if let Some(j) = args.jobs {
        config.compile_slots = j.max(1);
    }
    if !args.allow.is_empty() {
        config.allow = args.allow.clone();
    }
    config.spool_disk_budget = usize::try_from(args.limit_spool).unwrap_or(usize::MAX);
    let secs = |n: u64| std::time::Duration::from_secs(n.max(1));
    config.protocol.handshake_timeout = secs(args.handshake_timeout);
    config.protocol.stall_timeout = secs(args.stall_timeout);
    config.protocol.idle_timeout = secs(args.idle_timeout);
    config.min_upload_rate = args.min_upload_rate;
    config.max_handshaking = args.max_handshaking.max(1);
    config.max_connections_per_address = args.max_connections_per_address.max(1);
    if let Some(path) = &args.token_file {
        match dcache_transport::token::read_token_file(path) {
            Ok(key) => config.protocol.auth = Some(key),
            Err(e) => {
                eprintln!("dcache-server: --token-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let transport = match tls_options(&args) {
        Ok(t) => t,
        Err(message) => {
            eprintln!("dcache-server: {message}");
            return ExitCode::FAILURE;
        }
    };
    let service = Service::new(store, Arc::new(executor.clone()), config);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for addr in &args.listen {
        let listener = match bind(addr, &transport).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dcache-server: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            "listening on {} (cache {} up to {} bytes, compilers: {})",
            listener.local_addr(),
            dir.display(),
            args.cache_size,
            executor.available().join(", ")
        );
        let service = service.clone();
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            service
                .serve(listener, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    let distcc = Arc::new(DistccConfig::new(&args.allow_compiler, &args.compiler_path));
    for addr in &args.listen_distcc {
        let listener = match bind(addr, &TransportOptions::default()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dcache-server: cannot listen for distcc on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!("serving distcc clients on {}", listener.local_addr());
        let (service, distcc) = (service.clone(), distcc.clone());
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            service
                .serve_distcc(listener, distcc, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    if let Some(addr) = &args.metrics {
        let mut config = MetricsConfig::default();
        if !args.metrics_allow.is_empty() {
            config.allow = args.metrics_allow.clone();
        }
        let listener = match dcache_server::metrics::bind(addr, &config.allow).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dcache-server: --metrics: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Ok(local) = listener.local_addr() {
            tracing::info!("metrics endpoint on http://{local}/metrics (/healthz, /readyz)");
        }
        let readiness = Readiness {
            sandbox: sandbox_state,
        };
        let service = service.clone();
        let mut stop = stop_rx.clone();
        // Not among `servers`: it stops with the listeners, and open jobs do not wait for it.
        tokio::spawn(async move {
            dcache_server::metrics::serve(listener, service, readiness, config, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    wait_for_signal().await;
    tracing::info!("shutting down: finishing open jobs");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    ExitCode::SUCCESS
}

/// The shared tier `--shared URL` names, sealed with the key of `--shared-key-file`.
fn shared_tier(args: &Args, url: &str) -> Result<Arc<dyn Store>, String> {
    let Some(path) = &args.shared_key_file else {
        return Err("--shared-key-file is required".into());
    };
    let secret = dcache_transport::token::read_secret_file(path)
        .map_err(|e| format!("--shared-key-file {}: {e}", path.display()))?;
    let config = SharedConfig {
        ttl: std::time::Duration::from_secs(args.shared_ttl.max(1)),
        max_value: args.shared_max_value,
        deadline: std::time::Duration::from_millis(args.shared_deadline.max(1)),
        ..SharedConfig::default()
    };
    let backend = RedisBackend::new(url, config.transfer_timeout).map_err(|e| e.to_string())?;
    tracing::info!(
        "shared cache tier: {} (entries up to {} bytes, lookups within {:?})",
        backend.describe(),
        config.max_value,
        config.deadline
    );
    Ok(Arc::new(SharedStore::new(
        backend,
        SealKey::for_shared_tier(&secret),
        config,
    )))
}

/// The transport options with the certificate `--tls-cert` and `--tls-key` name, loaded
/// once. A certificate without any tls:// listener is refused: a server started with one
/// is meant to encrypt, and serving plain TCP instead would hide the mistake.
fn tls_options(args: &Args) -> Result<TransportOptions, String> {
    let wants_tls = args.listen.iter().any(|a| matches!(a, Address::Tls { .. }));
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        // A tls:// listener without them fails to bind, with the flags to add.
        return Ok(TransportOptions::default());
    };
    if !wants_tls {
        return Err("--tls-cert is given but no --listen address is tls://HOST:PORT".into());
    }
    let tls = TlsServer::new(cert, key, args.tls_client_ca.as_deref())
        .map_err(|e| format!("TLS: {e}"))?
        .with_handshake_timeout(std::time::Duration::from_secs(
            args.handshake_timeout.max(1),
        ));
    Ok(TransportOptions::default().with_tls_server(tls))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An `--allow-compiler` entry: a bare program name, since a path would let the list
/// decide which directory runs (that is `--compiler-path`'s job).
fn compiler_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') || s.starts_with('-') || s == "." || s == ".." {
        return Err(format!(
            "{s:?} is not a compiler name (a name such as gcc or gcc-12; \
             --compiler-path says where to find it)"
        ));
    }
    Ok(s.to_owned())
}
