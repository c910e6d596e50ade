//! Small helpers shared by the binaries: logging, and the size and directory helpers of
//! the wrapper's configuration (the server takes the same forms).

pub use dcache_client::wrapper::config::{parse_size, user_cache_dir};
use dcache_server::config::LogFormat;

/// Sets up `tracing` output on stderr, filtered by `filter` (an `EnvFilter` string). The
/// wrapper's logs go where the compiler's diagnostics go, interleaved with them in a
/// build's output; colours only on a terminal, so a redirected log (`make 2> log`, a CI
/// job) holds no escape codes.
pub fn init_logging(filter: &str) {
    init_logging_as(filter, LogFormat::Text);
}

/// Sets up the server's logging: `verbose` 0 logs the service's events (listening, the
/// sandbox, errors), 1 also one line per job, 2 everything; `format` text or JSON lines.
pub fn init_server_logging(verbose: u8, format: LogFormat) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    init_logging_as(level, format);
}

/// [`init_logging`] in either format. JSON lines carry no colours at all; text has them
/// only on a terminal.
pub fn init_logging_as(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .try_init(),
        _ => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Writes `text` to stdout, dropping it when stdout is closed (`dcache --stats | head`):
/// what could not be written is lost, as with other tools' output, where `print!` would
/// panic.
pub fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// `println!` through [`out`]: no panic when stdout is closed.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::util::out(&format!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` through [`out`].
#[macro_export]
macro_rules! outp {
    ($($t:tt)*) => {
        $crate::util::out(&format!($($t)*))
    };
}
