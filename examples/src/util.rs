//! Small helpers shared by the binaries: logging, and the size and directory helpers of
//! the wrapper's configuration (the server takes the same forms).

pub use dcache_client::wrapper::config::{parse_size, user_cache_dir};

/// Sets up `tracing` output on stderr, filtered by `filter` (an `EnvFilter` string). The
/// wrapper's logs go where the compiler's diagnostics go, interleaved with them in a
/// build's output; colours only on a terminal, so a redirected log (`make 2> log`, a CI
/// job) holds no escape codes.
pub fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
