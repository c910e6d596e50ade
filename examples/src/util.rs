//! Small helpers shared by the binaries: logging, and the size and directory helpers of
//! the wrapper's configuration (the server takes the same forms).

pub use dcache_client::wrapper::config::{parse_size, user_cache_dir};

/// Sets up `tracing` output on stderr, filtered by `filter` (an `EnvFilter` string).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
