//! `dcache-server`: the compile server.
//!
//! Listens on one or more addresses, answers cache hits at once, compiles misses with the
//! allow-listed compilers found on this machine, and keeps results in memory over a disk
//! cache. `--listen-distcc` serves stock distcc clients from the same service. Stops
//! gracefully on SIGINT or SIGTERM: no new connections, open jobs finish, clients are told
//! GOAWAY.

use std::process::ExitCode;
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use dcache_examples::util::{init_server_logging, user_cache_dir};
use dcache_examples::{outln, outp};
use dcache_server::config::{LogFormat, Settings, Size, UpstreamCompress};
use dcache_server::distcc::DistccConfig;
use dcache_server::exec::{LocalExecutor, LocalExecutorConfig};
use dcache_server::metrics::{MetricsConfig, Readiness, SandboxState};
use dcache_server::relay::{RelayConfig, Upstreams};
use dcache_server::sandbox::Sandbox;
use dcache_server::store::shared::{Backend, RedisBackend, SharedStore};
use dcache_server::store::{
    Compression, DiskStore, MemoryStore, SealKey, SharedTieredStore, Store, TieredStore,
};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TlsClient, TlsServer, TransportOptions, bind};

/// dcache-server: the dcache compile server. Answers cache hits at once, compiles misses
/// with the allowed compilers, keeps results in memory over a disk cache.
///
/// Every option but --config, --print-config and --check-sandbox can also be set in the
/// --config file, as a key named like the flag with `_` for `-` (`cache_size = "10G"`);
/// flags given override the file. Field names equal `Settings`' so `from_flags!` can copy
/// them by name.
#[derive(Parser, Debug)]
// The name given, not the package's: this binary ships in the `dcache-examples` package,
// whose name and description clap would otherwise print for --help and --version.
#[command(name = "dcache-server", version, long_about = None)]
struct Args {
    /// A TOML file holding any of these options (`dcache-server --print-config` writes
    /// one); flags given on the command line override it. An unknown key, or a value of
    /// the wrong type, is an error naming the file, the line and the key.
    #[arg(long, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    /// Print the effective configuration (defaults, then --config, then the flags) as
    /// TOML that --config reads back, and exit.
    #[arg(long)]
    print_config: bool,
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
    #[arg(long, default_value = "10G", value_parser = size)]
    cache_size: Size,
    /// How results are stored on disk and in the shared tier: zstd (level 1), zstd:LEVEL
    /// (1 to 19: smaller, slower to write) or none. The size limits count the stored
    /// bytes. Entries of either kind are read whatever this says.
    #[arg(long, value_name = "zstd[:LEVEL]|none", default_value = "zstd")]
    store_compression: Compression,
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
    #[arg(long = "allow", value_name = "CIDR", default_values = ["127.0.0.0/8", "::1/128"])]
    allow: Vec<dcache_server::access::Cidr>,
    /// File holding a shared token of at least 16 bytes, readable by its owner only
    /// (`head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE`). Clients must prove
    /// they hold it (DCACHE_TOKEN) by challenge-response before any job; it never crosses
    /// the wire.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// PEM file with this server's certificate (then any intermediates), for tls://
    /// listeners. Clients check it against the host name they connect to.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM file of the CA whose client certificates tls:// listeners require (mutual
    /// TLS): a client without a certificate it issued completes no handshake.
    #[arg(long, value_name = "PATH")]
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
    sandbox_path: Vec<std::path::PathBuf>,
    /// The program that confines each compile (default: this binary itself).
    #[arg(long, value_name = "PATH", hide = true)]
    sandbox_launcher: Option<std::path::PathBuf>,
    /// Address space of each compiler process, e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = size)]
    limit_memory: Size,
    /// Largest file a compile may write (object, assembly, temporary files), e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = size)]
    limit_output: Size,
    /// Seconds one compile may take, upload included (wall clock, and CPU time of each
    /// process).
    #[arg(long, default_value_t = 300)]
    limit_time: u64,
    /// Bytes of stderr (and of stdout) kept per compile; the rest is cut with a note.
    #[arg(long, default_value = "1M", value_parser = size)]
    limit_stderr: Size,
    /// Disk that uploads waiting for a compile slot may fill, all clients together;
    /// beyond it a job is refused with OVERLOADED (the client compiles locally).
    #[arg(long, default_value = "4G", value_parser = size)]
    limit_spool: Size,
    /// Slowest upload (bytes per second, over 10 s) a job may keep while it holds a
    /// compile slot; slower, it ends and the slot goes to the next job.
    #[arg(long, default_value = "16K", value_parser = size)]
    min_upload_rate: Size,
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
    #[arg(long, value_name = "URL")]
    shared: Option<String>,
    /// File holding the fleet's shared key (same rules as --token-file: at least 16
    /// bytes, readable by its owner only). Every server signs what it writes to the shared
    /// tier with it and refuses what does not verify.
    #[arg(long, value_name = "PATH")]
    shared_key_file: Option<std::path::PathBuf>,
    /// Seconds a shared entry lives after it was last written or hit.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    shared_ttl: u64,
    /// Largest entry written to or read from the shared tier, e.g. 64M (larger results
    /// stay local; large entries are stored in chunks of 4 MiB).
    #[arg(long, default_value = "64M", value_parser = size)]
    shared_max_value: Size,
    /// Milliseconds a lookup waits for the shared tier before counting a miss.
    #[arg(long, default_value_t = 250)]
    shared_deadline: u64,
    /// Run as a relay: pass every job on to this upstream dcache server (tcp://HOST:PORT,
    /// tls://HOST:PORT or unix:///path; repeat for several, jobs are spread by rendezvous
    /// hashing as a client spreads them), keeping a cache tier of its own in --cache-dir.
    /// Nothing is compiled here. TLS upstreams use DCACHE_TLS_CA, DCACHE_TLS_CERT and
    /// DCACHE_TLS_KEY, as the `dcache` client does.
    #[arg(long = "upstream", value_name = "ADDR")]
    upstream: Vec<Address>,
    /// The upstreams' token file (same rules as --token-file), for upstreams started
    /// with --token-file.
    #[arg(long, value_name = "PATH")]
    upstream_token_file: Option<std::path::PathBuf>,
    /// Seconds an upstream that failed is skipped before it is tried again.
    #[arg(long, default_value_t = 10)]
    upstream_backoff: u64,
    /// Whether the connections to the upstreams offer zstd compression: auto (to
    /// upstreams across a network, not to one on this machine), always or never.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    upstream_compress: UpstreamCompress,
    /// Serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) over
    /// plain HTTP on tcp://HOST:PORT, a listener of its own. Off by default; loopback
    /// only unless --metrics-allow names the ranges that may scrape it.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<Address>,
    /// Address range that may scrape --metrics, e.g. 10.1.0.0/16 (repeatable; default:
    /// loopback only). Required to bind --metrics beyond loopback.
    #[arg(long = "metrics-allow", value_name = "CIDR")]
    metrics_allow: Vec<dcache_server::access::Cidr>,
    /// Log one line per job (outcome, key prefix, sizes, durations, peer); twice for
    /// every detail.
    #[arg(long, short, action = clap::ArgAction::Count)]
    verbose: u8,
    /// How log lines are written on stderr: text, or one JSON object per line.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// Copies into `settings` each named option that was given on the command line (not
/// merely defaulted by clap), so flags override the file and absent flags do not.
macro_rules! from_flags {
    ($given:expr, $args:expr, $settings:expr; $($field:ident),* $(,)?) => {
        $(if $given(stringify!($field)) {
            $settings.$field = $args.$field.clone();
        })*
    };
}

/// The settings: defaults, then the --config file, then the flags given.
fn settings(args: &Args, given: impl Fn(&str) -> bool) -> Result<Settings, String> {
    let mut s = match &args.config {
        Some(path) => Settings::from_file(path).map_err(|e| e.to_string())?,
        None => Settings::default(),
    };
    from_flags!(given, args, s;
        listen, listen_distcc, cache_dir, cache_size, store_compression, jobs, allow_compiler, compiler_path,
        allow, token_file, tls_cert, tls_key, tls_client_ca, insecure_no_sandbox,
        sandbox_path, sandbox_launcher, limit_memory, limit_output, limit_time,
        limit_stderr, limit_spool, min_upload_rate, handshake_timeout, stall_timeout,
        idle_timeout, max_handshaking, max_connections_per_address, shared,
        shared_key_file, shared_ttl, shared_max_value, shared_deadline, upstream,
        upstream_token_file, upstream_backoff, upstream_compress, metrics, metrics_allow, verbose,
        log_format,
    );
    // What an absent option means, made explicit: --print-config shows what will be used.
    if s.cache_dir.is_none() {
        s.cache_dir = Some(user_cache_dir().join("dcache").join("server"));
    }
    if s.jobs.is_none() {
        s.jobs = Some(std::thread::available_parallelism().map_or(2, |n| n.get()));
    }
    s.validate().map_err(|e| e.to_string())?;
    Ok(s)
}

/// Whether the option `id` was given on the command line.
fn on_command_line(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

fn main() -> ExitCode {
    // Each compile runs through this very binary as its sandbox launcher: that mode must
    // start before any thread (namespaces can only be entered single-threaded).
    dcache_server::sandbox::run_launcher_if_requested();
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let settings = match settings(&args, |id| on_command_line(&matches, id)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dcache-server: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        return match settings.to_toml() {
            Ok(text) => {
                outp!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dcache-server: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_server_logging(settings.verbose, settings.log_format);
    // A relay compiles nothing: it needs no sandbox.
    let relay = !settings.upstream.is_empty() && !args.check_sandbox;
    let sandbox = if relay {
        None
    } else {
        match probe_sandbox(&settings, args.check_sandbox) {
            Ok(s) => s,
            Err(code) => return code,
        }
    };
    let sandbox_state = match &sandbox {
        Some(s) => SandboxState::Active(s.protections().to_string()),
        None if settings.insecure_no_sandbox => SandboxState::Disabled,
        // A relay compiles nothing, so it has nothing to confine.
        None if relay => SandboxState::Disabled,
        None => SandboxState::Unavailable("the kernel cannot enforce it (see the log)".into()),
    };
    if args.check_sandbox {
        return ExitCode::SUCCESS;
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(serve(settings, sandbox, sandbox_state)),
        Err(e) => {
            eprintln!("dcache-server: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Finds out what the kernel enforces and decides, failing closed: a server that lets any
/// non-loopback client in never compiles unconfined unless told `--insecure-no-sandbox`.
fn probe_sandbox(args: &Settings, check_sandbox: bool) -> Result<Option<Sandbox>, ExitCode> {
    let launcher = match &args.sandbox_launcher {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| {
            eprintln!("dcache-server: cannot find its own executable for the sandbox: {e}");
            ExitCode::FAILURE
        })?,
    };
    let beyond_loopback = args.beyond_loopback();
    if args.insecure_no_sandbox && !check_sandbox {
        tracing::warn!(
            "compiles are NOT sandboxed (--insecure-no-sandbox): clients can read this \
             user's files"
        );
        return Ok(None);
    }
    match Sandbox::probe(&launcher) {
        Ok(sandbox) => {
            if check_sandbox {
                outln!("sandbox: {}", sandbox.protections());
            }
            tracing::info!("compiles are sandboxed: {}", sandbox.protections());
            Ok(Some(sandbox))
        }
        Err(e) if check_sandbox => {
            outln!("sandbox: NOT AVAILABLE: {e}");
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

async fn serve(args: Settings, sandbox: Option<Sandbox>, sandbox_state: SandboxState) -> ExitCode {
    let dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| user_cache_dir().join("dcache").join("server"));
    let disk = match DiskStore::open_with(&dir, args.cache_size.0, args.store_compression) {
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
    if !args.upstream.is_empty() {
        return relay(args, store, dir, sandbox_state).await;
    }
    let executor = LocalExecutor::new(LocalExecutorConfig {
        allowed: args.allow_compiler.clone(),
        path: args.compiler_path.clone(),
        time_limit: args.time_limit(),
        sandbox,
        sandbox_paths: args.sandbox_path.clone(),
        limits: args.exec_limits(),
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
    let (config, transport) = match service_and_transport(&args) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let service = Service::new(store, Arc::new(executor.clone()), config);
    let what = format!("compilers: {}", executor.available().join(", "));
    let distcc = Arc::new(DistccConfig::new(&args.allow_compiler, &args.compiler_path));
    let readiness = Readiness {
        sandbox: sandbox_state,
    };
    run_service(
        &args,
        service,
        &transport,
        &dir,
        &what,
        Some(distcc),
        readiness,
    )
    .await
}

/// What every service takes from the settings, a compile server's and a relay's alike:
/// its configuration (with the clients' token) and its listeners' transport (TLS).
fn service_and_transport(args: &Settings) -> Result<(ServiceConfig, TransportOptions), ExitCode> {
    let config = service_config(args)?;
    let transport = tls_options(args).map_err(|message| {
        eprintln!("dcache-server: {message}");
        ExitCode::FAILURE
    })?;
    Ok((config, transport))
}

/// The service settings, with the clients' token read from --token-file.
fn service_config(args: &Settings) -> Result<ServiceConfig, ExitCode> {
    let mut config: ServiceConfig = args.service_config();
    if let Some(path) = &args.token_file {
        match dcache_transport::token::read_token_file(path) {
            Ok(key) => config.protocol.auth = Some(key),
            Err(e) => {
                eprintln!("dcache-server: --token-file {}: {e}", path.display());
                return Err(ExitCode::FAILURE);
            }
        }
    }
    Ok(config)
}

/// `--upstream`: a relay in front of other dcache servers, its own cache tier `store`.
async fn relay(
    args: Settings,
    store: Arc<dyn Store>,
    dir: std::path::PathBuf,
    sandbox_state: SandboxState,
) -> ExitCode {
    if !args.listen_distcc.is_empty() {
        eprintln!(
            "dcache-server: a relay (--upstream) serves dcache clients only, not --listen-distcc"
        );
        return ExitCode::FAILURE;
    }
    let (config, transport) = match service_and_transport(&args) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let mut relay = RelayConfig::new(args.upstream.clone());
    relay.backoff = std::time::Duration::from_secs(args.upstream_backoff.max(1));
    relay.compression = args
        .upstream
        .iter()
        .map(|u| args.upstream_compress.level_for(u))
        .collect();
    match upstream_tls() {
        Ok(Some(tls)) => relay.transport = relay.transport.with_tls_client(tls),
        Ok(None) => {}
        Err(message) => {
            eprintln!("dcache-server: {message}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.upstream_token_file {
        match dcache_transport::token::read_token_file(path) {
            Ok(key) => relay.auth = Some(key),
            Err(e) => {
                eprintln!(
                    "dcache-server: --upstream-token-file {}: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let what = format!(
        "relay to {}",
        args.upstream
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let service = Service::relay(store, Upstreams::new(relay), config);
    let readiness = Readiness {
        sandbox: sandbox_state,
    };
    run_service(&args, service, &transport, &dir, &what, None, readiness).await
}

/// The TLS client settings for upstreams from `DCACHE_TLS_CA`, `DCACHE_TLS_CERT` and
/// `DCACHE_TLS_KEY` (the `dcache` client's variables); `None` when none is set.
fn upstream_tls() -> Result<Option<TlsClient>, String> {
    let var = |name: &str| std::env::var_os(name).map(std::path::PathBuf::from);
    let (ca, cert, key) = (
        var("DCACHE_TLS_CA"),
        var("DCACHE_TLS_CERT"),
        var("DCACHE_TLS_KEY"),
    );
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => return Err("DCACHE_TLS_CERT and DCACHE_TLS_KEY go together".into()),
    };
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    TlsClient::new(ca.as_deref(), identity)
        .map(Some)
        .map_err(|e| format!("DCACHE_TLS_*: {e}"))
}

/// Serves `service` on every `--listen` address (and `--listen-distcc`, with `distcc`)
/// until SIGINT or SIGTERM, then stops gracefully.
async fn run_service(
    args: &Settings,
    service: Arc<Service>,
    transport: &TransportOptions,
    dir: &std::path::Path,
    what: &str,
    distcc: Option<Arc<DistccConfig>>,
    readiness: Readiness,
) -> ExitCode {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for addr in &args.listen {
        let listener = match bind(addr, transport).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dcache-server: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            "listening on {} (cache {} up to {} bytes, {}, {what})",
            listener.local_addr(),
            dir.display(),
            args.cache_size.0,
            args.store_compression,
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
    for (addr, distcc) in args
        .listen_distcc
        .iter()
        .filter_map(|a| Some((a, distcc.clone()?)))
    {
        let listener = match bind(addr, &TransportOptions::default()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dcache-server: cannot listen for distcc on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!("serving distcc clients on {}", listener.local_addr());
        let service = service.clone();
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
fn shared_tier(args: &Settings, url: &str) -> Result<Arc<dyn Store>, String> {
    let Some(path) = &args.shared_key_file else {
        return Err("--shared-key-file is required".into());
    };
    let secret = dcache_transport::token::read_secret_file(path)
        .map_err(|e| format!("--shared-key-file {}: {e}", path.display()))?;
    let config = args.shared_config();
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
fn tls_options(args: &Settings) -> Result<TransportOptions, String> {
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

/// A size flag: `10G`, `500M`, `16K`, or bytes (the file takes the same forms).
fn size(s: &str) -> Result<Size, String> {
    s.parse()
        .map_err(|e: dcache_server::config::SizeError| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's defaults (shown by --help) and the library's must be the same settings, or
    /// a server started with no flags would differ from one started with an empty file.
    #[test]
    fn the_flags_defaults_are_the_settings_defaults() {
        let args = Args::try_parse_from(["dcache-server"]).unwrap();
        let from_flags = settings(&args, |_| true).unwrap();
        let mut defaults = Settings::default();
        // The two that settings() resolves when absent.
        defaults.cache_dir = from_flags.cache_dir.clone();
        defaults.jobs = from_flags.jobs;
        assert_eq!(from_flags, defaults);
    }
}
