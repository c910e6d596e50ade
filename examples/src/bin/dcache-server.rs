//! `dcache-server`: the compile server.
//!
//! Listens on one or more addresses, answers cache hits at once, compiles misses with the
//! allow-listed compilers found on this machine, and keeps results in memory over a disk
//! cache. Stops gracefully on SIGINT or SIGTERM: no new connections, open jobs finish,
//! clients are told GOAWAY.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dcache_examples::util::{init_logging, parse_size, user_cache_dir};
use dcache_server::exec::{LocalExecutor, LocalExecutorConfig};
use dcache_server::store::{DiskStore, MemoryStore, Store, TieredStore};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TransportOptions, bind};

/// dcache-server: the dcache compile server. Answers cache hits at once, compiles misses
/// with the allowed compilers, keeps results in memory over a disk cache.
#[derive(Parser, Debug)]
#[command(version, long_about = None)]
struct Args {
    /// Address to listen on: tcp://HOST:PORT or unix:///path. Repeat for several.
    /// Loopback only unless told otherwise.
    #[arg(long = "listen", default_value = "tcp://127.0.0.1:3633")]
    listen: Vec<Address>,
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
    /// Compiler names clients may use, comma-separated. Names only: resolved on this
    /// server's PATH; a client can never choose a path.
    #[arg(
        long,
        value_delimiter = ',',
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
    /// File holding a shared token (any text; 32 random bytes, e.g. from
    /// `head -c 32 /dev/urandom | base64`, recommended). Clients must prove they hold it
    /// (DCACHE_TOKEN) by challenge-response before any job; it never crosses the wire.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// Log each job (repeat for more detail).
    #[arg(long, short, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    });
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
    let store: Arc<dyn Store> = Arc::new(TieredStore::new(MemoryStore::new(256 << 20), disk));
    let executor = LocalExecutor::new(LocalExecutorConfig {
        allowed: args.allow_compiler.clone(),
        path: args.compiler_path.clone(),
        ..LocalExecutorConfig::default()
    });
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
    if let Some(path) = &args.token_file {
        match read_token(path) {
            Ok(key) => config.protocol.auth = Some(key),
            Err(e) => {
                eprintln!("dcache-server: --token-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let service = Service::new(store, Arc::new(executor.clone()), config);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for addr in &args.listen {
        let listener = match bind(addr, &TransportOptions::default()).await {
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
    wait_for_signal().await;
    tracing::info!("shutting down: finishing open jobs");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    ExitCode::SUCCESS
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

/// Reads the token file: it must exist and hold something. A file others can read is
/// allowed (the operator may have reasons) but warned about, as ssh does for keys.
fn read_token(path: &std::path::Path) -> Result<dcache_proto::AuthKey, String> {
    use std::os::unix::fs::PermissionsExt;
    let token = std::fs::read(path).map_err(|e| e.to_string())?;
    if token.trim_ascii().is_empty() {
        return Err("the file is empty".into());
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "token file {} is readable by other users; chmod 600 it",
                path.display()
            );
        }
    }
    Ok(dcache_proto::AuthKey::from_token(&token))
}
