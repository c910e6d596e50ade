//! The server's settings: every option of `dcache-server`, read from a TOML file
//! (`--config PATH`), overridden by the flags given, and printed back (`--print-config`)
//! in a form that reads in again.
//!
//! One key per flag, named as the flag with `_` for `-` (`--cache-size 10G` is
//! `cache_size = "10G"`), with the same value forms: sizes as `"10G"` (or an integer of
//! bytes), times as integers in the flag's unit, addresses and address ranges as strings,
//! repeatable flags as arrays. A file is strict, because a typo in a limit must not
//! silently leave the default in force: an unknown key, a value of the wrong type, or a
//! malformed value is an error naming the file, the line and the key (and for a wrong
//! type, what was expected).
//!
//! Adding an option is one field here (with its default in [`Settings::default`]; an
//! optional address is `#[serde(default, with = "text::opt", skip_serializing_if =
//! "Option::is_none")] pub metrics: Option<Address>`), and in the binary one flag of the
//! same name plus that name in its `from_flags!` list.

mod size;
pub mod text;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use dcache_transport::Address;
use serde::{Deserialize, Serialize};

pub use size::{Size, SizeError};

use crate::ServiceConfig;
use crate::access::Cidr;
use crate::exec::ExecLimits;
use crate::sandbox::ResourceLimits;
use crate::store::Compression;
use crate::store::shared::SharedConfig;

/// Largest configuration file read: settings take a few dozen lines, and a reader bounds
/// what it reads.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// How log lines are written on standard error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// One human-readable line per event, `key=value` fields after the message.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, message and fields), for a log
    /// collector that parses rather than greps.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("{s:?} is not a log format (text or json)")),
        }
    }
}

/// Whether a relay's connections to its upstreams offer zstd compression
/// (`upstream_compress`), as the `dcache` client's `DCACHE_COMPRESS` decides for its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UpstreamCompress {
    /// To upstreams across a network, not to one on this machine (loopback, a Unix
    /// socket), where compressing costs more than the bytes it saves.
    #[default]
    Auto,
    /// To every upstream.
    Always,
    /// To none.
    Never,
}

impl UpstreamCompress {
    /// The zstd level a connection to `upstream` offers, `None` for none (what
    /// `RelayConfig::compression` holds per upstream).
    pub fn level_for(self, upstream: &Address) -> Option<i32> {
        let offer = match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => !upstream.is_on_this_machine(),
        };
        offer.then_some(dcache_proto::DEFAULT_LEVEL)
    }
}

impl FromStr for UpstreamCompress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?} is not auto, always or never")),
        }
    }
}

/// Every setting of `dcache-server`. Field names are the file's keys; the flag of each is
/// `--` and the name with `-` for `_`. Optional settings absent from the file are `None`;
/// their meaning when absent is on the field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Addresses of the dcache listeners (`tcp://`, `tls://`, `unix://`).
    #[serde(with = "text::list")]
    pub listen: Vec<Address>,
    /// Addresses serving stock distcc clients.
    #[serde(with = "text::list")]
    pub listen_distcc: Vec<Address>,
    /// The disk cache's directory; absent: the user's cache directory, `dcache/server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Largest size of the disk cache.
    pub cache_size: Size,
    /// How results are stored on disk and in the shared tier: zstd at a level, or as
    /// they are. Entries of either kind are read whatever this says.
    #[serde(with = "text::one")]
    pub store_compression: Compression,
    /// Compiles at once; absent: the number of cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
    /// Compiler names offered to clients (names, never paths).
    pub allow_compiler: Vec<String>,
    /// Directories searched for the allowed compilers, `:`-separated.
    pub compiler_path: String,
    /// Address ranges TCP clients may connect from.
    #[serde(with = "text::list")]
    pub allow: Vec<Cidr>,
    /// The shared token's file, if clients must prove they hold it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate of `tls://` listeners (with [`tls_key`](Self::tls_key)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of [`tls_cert`](Self::tls_cert).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates `tls://` listeners require (mutual TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Compile unconfined even where the kernel could sandbox, and beyond loopback.
    pub insecure_no_sandbox: bool,
    /// Files or directories every sandboxed compile may also read and execute.
    pub sandbox_path: Vec<PathBuf>,
    /// The program that confines each compile; absent: the server's own binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_launcher: Option<PathBuf>,
    /// Address space of each compiler process.
    pub limit_memory: Size,
    /// Largest file a compile may write.
    pub limit_output: Size,
    /// Seconds one compile may take (wall clock, and CPU time of each process).
    pub limit_time: u64,
    /// Bytes of stderr (and of stdout) kept per compile.
    pub limit_stderr: Size,
    /// Disk that uploads waiting for a slot may fill, all clients together.
    pub limit_spool: Size,
    /// Slowest upload (bytes per second) a job may keep while it holds a compile slot.
    pub min_upload_rate: Size,
    /// Seconds a new connection may take to complete its handshake.
    pub handshake_timeout: u64,
    /// Seconds an upload may go without a whole frame arriving.
    pub stall_timeout: u64,
    /// Seconds a connection with no open job may stay silent.
    pub idle_timeout: u64,
    /// Connections in their handshake at once.
    pub max_handshaking: usize,
    /// Connections one IP address may hold open.
    pub max_connections_per_address: usize,
    /// The fleet's shared tier (`redis://…`, `rediss://…`, `redis+unix://…`,
    /// `redis+cluster://…`), with [`shared_key_file`](Self::shared_key_file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<String>,
    /// The fleet key's file, with [`shared`](Self::shared).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_key_file: Option<PathBuf>,
    /// Seconds a shared entry lives after it was last written or hit.
    pub shared_ttl: u64,
    /// Largest entry written to or read from the shared tier.
    pub shared_max_value: Size,
    /// Milliseconds a lookup waits for the shared tier before counting a miss.
    pub shared_deadline: u64,
    /// A relay's upstream dcache servers: every job is passed on to them (spread by
    /// rendezvous hashing, as a client spreads its jobs) and nothing is compiled here.
    /// Empty: an ordinary server.
    #[serde(with = "text::list")]
    pub upstream: Vec<Address>,
    /// The upstreams' token file (same rules as [`token_file`](Self::token_file)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_token_file: Option<PathBuf>,
    /// Seconds an upstream that failed is skipped before it is tried again.
    pub upstream_backoff: u64,
    /// Whether the connections to the upstreams offer compression.
    pub upstream_compress: UpstreamCompress,
    /// The Prometheus and health endpoint's address (`tcp://HOST:PORT`); absent: none.
    #[serde(default, with = "text::opt", skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Address>,
    /// Address ranges that may scrape [`metrics`](Self::metrics); empty: loopback only.
    #[serde(with = "text::list")]
    pub metrics_allow: Vec<Cidr>,
    /// Log detail: 0 the service's events, 1 (`-v`) also one line per job, 2 (`-vv`)
    /// everything.
    pub verbose: u8,
    /// How log lines are written.
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: vec![Address::Tcp {
                host: "127.0.0.1".into(),
                port: 3633,
            }],
            listen_distcc: Vec::new(),
            cache_dir: None,
            cache_size: Size(10 << 30),
            store_compression: Compression::default(),
            jobs: None,
            allow_compiler: ["gcc", "g++", "cc", "c++", "clang", "clang++"]
                .map(String::from)
                .to_vec(),
            compiler_path: "/usr/local/bin:/usr/bin:/bin".into(),
            allow: Cidr::loopback(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure_no_sandbox: false,
            sandbox_path: Vec::new(),
            sandbox_launcher: None,
            limit_memory: Size(4 << 30),
            limit_output: Size(256 << 20),
            limit_time: 300,
            limit_stderr: Size(1 << 20),
            limit_spool: Size(4 << 30),
            min_upload_rate: Size(16 << 10),
            handshake_timeout: 10,
            stall_timeout: 60,
            idle_timeout: 300,
            max_handshaking: 256,
            max_connections_per_address: 64,
            shared: None,
            shared_key_file: None,
            shared_ttl: 7 * 24 * 3600,
            shared_max_value: Size(64 << 20),
            shared_deadline: 250,
            upstream: Vec::new(),
            upstream_token_file: None,
            upstream_backoff: 10,
            upstream_compress: UpstreamCompress::Auto,
            metrics: None,
            metrics_allow: Vec::new(),
            verbose: 0,
            log_format: LogFormat::Text,
        }
    }
}

/// Why a configuration cannot be used. Every message about a file starts with its path
/// (and the line, where there is one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Longer than [`MAX_FILE_BYTES`].
    #[error("{}: larger than a configuration file can be ({MAX_FILE_BYTES} bytes)", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML at all.
    #[error("{}:{line}: not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A key `dcache-server` does not know (a typo, or an option of another version).
    #[error("{}:{line}: unknown key `{key}` ({known})", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The key as written.
        key: String,
        /// The keys there are, as serde lists them ("expected one of …").
        known: String,
    },
    /// A value of the wrong type, or a malformed one; the message says what was expected.
    #[error("{}:{line}: key `{key}`: {message}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// Settings that cannot go together (from the file and the flags combined).
    #[error("{0}")]
    Conflict(String),
}

impl Settings {
    /// Reads the file at `path` (strictly: see the module documentation). Keys it does
    /// not hold keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::from_toml(&text, path)
    }

    /// Reads settings from TOML `text`; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let line_of = |span: Option<std::ops::Range<usize>>| {
            let at = span.map_or(0, |s| s.start.min(text.len()));
            text.as_bytes()[..at]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: line_of(e.span()),
            message: e.message().trim().to_owned(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = line_of(inner.span());
            let message = inner.message().trim().to_owned();
            match unknown_field(&message) {
                Some((key, known)) => ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    line,
                    key: key.to_owned(),
                    known: known.trim_start_matches([',', ' ']).to_owned(),
                },
                None => ConfigError::Value {
                    path: path.to_path_buf(),
                    line,
                    key,
                    message,
                },
            }
        })
    }

    /// The settings as a TOML document that [`from_toml`](Self::from_toml) reads back to
    /// the same settings.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| e.to_string())
    }

    /// Checks the settings that only make sense together, once the file and the flags
    /// are combined.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pairs = [
            (
                self.tls_cert.is_some(),
                self.tls_key.is_some(),
                "tls_cert (--tls-cert)",
                "tls_key (--tls-key)",
            ),
            (
                self.tls_key.is_some(),
                self.tls_cert.is_some(),
                "tls_key (--tls-key)",
                "tls_cert (--tls-cert)",
            ),
            (
                self.tls_client_ca.is_some(),
                self.tls_cert.is_some(),
                "tls_client_ca (--tls-client-ca)",
                "tls_cert (--tls-cert)",
            ),
            (
                self.shared.is_some(),
                self.shared_key_file.is_some(),
                "shared (--shared)",
                "shared_key_file (--shared-key-file)",
            ),
            (
                self.shared_key_file.is_some(),
                self.shared.is_some(),
                "shared_key_file (--shared-key-file)",
                "shared (--shared)",
            ),
        ];
        for (given, needed, what, needs) in pairs {
            if given && !needed {
                return Err(ConfigError::Conflict(format!("{what} needs {needs}")));
            }
        }
        if self.listen.is_empty() && self.listen_distcc.is_empty() {
            return Err(ConfigError::Conflict(
                "no listener: listen (--listen) and listen_distcc (--listen-distcc) are both empty"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether any allowed address range reaches beyond loopback (then compiles must be
    /// sandboxed unless [`insecure_no_sandbox`](Self::insecure_no_sandbox)).
    pub fn beyond_loopback(&self) -> bool {
        self.allow.iter().any(|c| !c.is_loopback())
    }

    /// The service settings these give (the token, which needs its file read, aside).
    pub fn service_config(&self) -> ServiceConfig {
        let mut config = ServiceConfig::default();
        if let Some(j) = self.jobs {
            config.compile_slots = j.max(1);
        }
        config.allow = self.allow.clone();
        config.spool_disk_budget = usize::try_from(self.limit_spool.0).unwrap_or(usize::MAX);
        config.protocol.handshake_timeout = secs(self.handshake_timeout);
        config.protocol.stall_timeout = secs(self.stall_timeout);
        config.protocol.idle_timeout = secs(self.idle_timeout);
        config.min_upload_rate = self.min_upload_rate.0;
        config.max_handshaking = self.max_handshaking.max(1);
        config.max_connections_per_address = self.max_connections_per_address.max(1);
        config
    }

    /// The hard limits of one compile.
    pub fn exec_limits(&self) -> ExecLimits {
        let cap = usize::try_from(self.limit_stderr.0).unwrap_or(usize::MAX);
        ExecLimits {
            resources: ResourceLimits {
                address_space: self.limit_memory.0,
                cpu_seconds: self.limit_time.max(1),
                file_size: self.limit_output.0,
            },
            max_stdout: cap,
            max_stderr: cap,
        }
    }

    /// The wall-clock limit of one compile.
    pub fn time_limit(&self) -> Duration {
        secs(self.limit_time)
    }

    /// The shared tier's settings.
    pub fn shared_config(&self) -> SharedConfig {
        SharedConfig {
            ttl: secs(self.shared_ttl),
            max_value: self.shared_max_value.0,
            deadline: Duration::from_millis(self.shared_deadline.max(1)),
            compression: self.store_compression,
            ..SharedConfig::default()
        }
    }
}

/// A time setting in seconds; zero would disable a timeout by accident, so it is one.
fn secs(n: u64) -> Duration {
    Duration::from_secs(n.max(1))
}

/// The key serde's "unknown field `KEY`, expected one of …" message names, and the rest
/// of the message (the known keys).
fn unknown_field(message: &str) -> Option<(&str, &str)> {
    message.strip_prefix("unknown field `")?.split_once('`')
}

#[cfg(test)]
mod tests;
