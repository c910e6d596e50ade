//! The wrapper's configuration, read from `DCACHE_*` environment variables (the way a
//! compiler wrapper is configured: a build system passes `CC="dcache gcc"` and nothing
//! else), and its help text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dcache_proto::{AuthKey, Strategy};
use dcache_transport::token::{TokenError, read_token_file, token_key};
use dcache_transport::{Address, AddressError, TlsClient, TlsConfigError};

use crate::ClientOptions;
use crate::compression::{
    BadLinkSpeed, CompressMode, CompressPolicy, UnknownCompressMode, parse_link_speed,
};

/// The embedded cache's size limit when `DCACHE_CACHE_SIZE` is unset: 5 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 5 << 30;

/// Configuration read from the environment (see [`HELP`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// `DCACHE_HOSTS`: servers; empty means the embedded default.
    pub hosts: Vec<Address>,
    /// `DCACHE_STRATEGY`.
    pub strategy: Strategy,
    /// `DCACHE_FALLBACK` (default on): compile locally when the server fails.
    pub fallback: bool,
    /// `DCACHE_DIR`: the embedded cache's directory.
    pub dir: PathBuf,
    /// `DCACHE_CACHE_SIZE`: the embedded cache's size limit.
    pub cache_size: u64,
    /// `DCACHE_TOKEN` (or the contents of the file `DCACHE_TOKEN_FILE` names): the shared
    /// token for servers started with `--token-file`.
    pub token: Option<AuthKey>,
    /// `DCACHE_BASEDIR`: absolute paths inside it are rewritten relative to the working
    /// directory in the preprocessed source, so checkouts in different places share keys.
    pub base_dir: Option<PathBuf>,
    /// `DCACHE_DIRECT` (default on): find a compile's key from a manifest of the files it
    /// read last time, without running the preprocessor.
    pub direct: bool,
    /// `DCACHE_TIMEOUT`: seconds a remote job may go without an answer before it is
    /// compiled locally (`None`: the client's default).
    pub timeout: Option<std::time::Duration>,
    /// `DCACHE_CONNECT_TIMEOUT`: how long connecting to a server, handshake included, may
    /// take before the server counts as down (`None`: the client's default, 2 s).
    pub connect_timeout: Option<Duration>,
    /// Entries of `DCACHE_HOSTS` that are not addresses. Not an error: a typo in a host
    /// list must not fail a build, so the wrapper warns about each and uses the rest, or
    /// compiles locally when none is left ([`Config::hosts_unusable`]).
    pub host_errors: Vec<AddressError>,
    /// `DCACHE_LOG`: the log filter (default `warn`), checked when read so that a typo is
    /// an error rather than silence.
    pub log: String,
    /// `DCACHE_TLS_CA` (trusted instead of the system roots), `DCACHE_TLS_CERT` and
    /// `DCACHE_TLS_KEY` (a client certificate, for servers started with
    /// `--tls-client-ca`), loaded: what `tls://` hosts are checked with. `None`: the
    /// system roots, no client certificate.
    pub tls: Option<TlsClient>,
    /// `DCACHE_COMPRESS` (`auto`, `always`, `never`) and `DCACHE_LINK_SPEED`: whether
    /// connections to servers offer zstd compression (see [`crate::compression`]).
    pub compress: CompressPolicy,
}

/// Why the environment does not make a [`Config`]; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A switch (`DCACHE_FALLBACK`, `DCACHE_DIRECT`) is neither on nor off.
    #[error("{var}: {value:?} is not a switch (use 1 or 0, on or off, yes or no, true or false)")]
    Switch {
        /// The variable.
        var: &'static str,
        /// What it holds.
        value: String,
    },
    /// `DCACHE_CONNECT_TIMEOUT` is not a number of seconds between 0 and 60.
    #[error(
        "DCACHE_CONNECT_TIMEOUT: {0:?} is not a number of seconds above 0 and at most 60 (e.g. 0.5)"
    )]
    ConnectTimeout(String),
    /// `DCACHE_LOG` is not a log filter.
    #[error("DCACHE_LOG: {0}")]
    Log(#[from] LogFilterError),
    /// `DCACHE_STRATEGY` names no strategy.
    #[error("DCACHE_STRATEGY: {0}")]
    Strategy(#[source] dcache_proto::UnknownStrategy),
    /// `DCACHE_CACHE_SIZE` is not a size.
    #[error("DCACHE_CACHE_SIZE: {0}")]
    CacheSize(#[from] SizeError),
    /// `DCACHE_DIR/dcache.toml` cannot be read or holds a mistake (the message names
    /// the file, the line and the key).
    #[error("{0}")]
    File(#[from] super::config_file::FileError),
    /// `DCACHE_TOKEN` is too weak to use (see [`dcache_transport::token`]).
    #[error("DCACHE_TOKEN: {0}")]
    Token(#[source] TokenError),
    /// The file `DCACHE_TOKEN_FILE` names cannot be read, is readable by others, or holds
    /// too short a token.
    #[error("DCACHE_TOKEN_FILE: {0}")]
    TokenFile(#[source] TokenError),
    /// `DCACHE_TIMEOUT` is not a number of seconds.
    #[error("DCACHE_TIMEOUT: {0:?} is not a number of seconds")]
    Timeout(String),
    /// `DCACHE_BASEDIR` is relative: it is compared with the absolute paths in line
    /// markers, so a relative one would match nothing or the wrong place.
    #[error("DCACHE_BASEDIR: {0} is not an absolute path")]
    BaseDirNotAbsolute(String),
    /// A file `DCACHE_TLS_CA`, `DCACHE_TLS_CERT` or `DCACHE_TLS_KEY` names cannot be read
    /// or used.
    #[error("DCACHE_TLS_CA/DCACHE_TLS_CERT/DCACHE_TLS_KEY: {0}")]
    Tls(#[source] TlsConfigError),
    /// Only one of `DCACHE_TLS_CERT` and `DCACHE_TLS_KEY` is set.
    #[error("DCACHE_TLS_CERT and DCACHE_TLS_KEY go together: set both (PEM files) or neither")]
    TlsHalfIdentity,
    /// `DCACHE_COMPRESS` is not `auto`, `always` or `never`.
    #[error("DCACHE_COMPRESS: {0}")]
    Compress(#[source] UnknownCompressMode),
    /// `DCACHE_LINK_SPEED` is not a speed.
    #[error("DCACHE_LINK_SPEED: {0}")]
    LinkSpeed(#[source] BadLinkSpeed),
}

/// Why a `DCACHE_LOG` value is not a log filter (see [`check_log_filter`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogFilterError {
    /// A directive names no level where one is needed.
    #[error("{0:?} is not a log level (off, error, warn, info, debug, trace) nor TARGET=LEVEL")]
    NotALevel(String),
}

/// Why a string is not a size (see [`parse_size`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// No number in front.
    #[error("{0:?} is not a size (examples: 10G, 512M, 1048576)")]
    NotASize(String),
    /// A unit other than K, M, G or T (with or without `B` or `iB`).
    #[error("{0:?} has an unknown unit (use K, M, G or T)")]
    UnknownUnit(String),
    /// More bytes than a `u64` holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

impl Config {
    /// The defaults with the cache in `dir`: the embedded server (no hosts), speculative,
    /// local fallback and direct mode on, a 5 GiB cache, no token, no base directory. What
    /// an embedding program starts from; [`from_env`](Self::from_env) starts from it too.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            hosts: Vec::new(),
            strategy: Strategy::Speculative,
            fallback: true,
            dir,
            cache_size: DEFAULT_CACHE_SIZE,
            token: None,
            base_dir: None,
            direct: true,
            timeout: None,
            connect_timeout: None,
            host_errors: Vec::new(),
            log: DEFAULT_LOG.to_owned(),
            tls: None,
            compress: CompressPolicy::default(),
        }
    }

    /// Whether `DCACHE_HOSTS` was set but named no usable server: the wrapper then
    /// compiles locally (the user asked for servers, so not the embedded cache).
    pub fn hosts_unusable(&self) -> bool {
        self.hosts.is_empty() && !self.host_errors.is_empty()
    }

    /// Reads the process environment; errors name the variable and what was wrong.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|n| std::env::var(n).ok())
    }

    /// Reads the variables from `get` instead of the environment (what
    /// [`from_env`](Self::from_env) does with `std::env::var`), so a program or a test can
    /// configure the wrapper without touching its process's environment. A variable that
    /// is unset or blank means its default.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |n: &str| get(n).filter(|v| !v.trim().is_empty());
        let mut hosts = Vec::new();
        let mut host_errors = Vec::new();
        for h in var("DCACHE_HOSTS")
            .unwrap_or_default()
            .split([' ', ',', '\t', '\n'])
            .filter(|s| !s.is_empty())
        {
            match h.parse::<Address>() {
                Ok(a) => hosts.push(a),
                Err(e) => host_errors.push(e),
            }
        }
        let strategy = match var("DCACHE_STRATEGY") {
            Some(s) => s.parse().map_err(ConfigError::Strategy)?,
            None => Strategy::Speculative,
        };
        let fallback = switch("DCACHE_FALLBACK", var("DCACHE_FALLBACK"))?;
        let dir = var("DCACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| user_cache_dir().join("dcache"));
        let cache_size = match var("DCACHE_CACHE_SIZE") {
            Some(s) => parse_size(&s)?,
            // The limit `dcache --max-size` persisted, if any (the variable overrides it).
            None => super::config_file::load(&dir)?
                .max_size
                .unwrap_or(DEFAULT_CACHE_SIZE),
        };
        let token = match (var("DCACHE_TOKEN"), var("DCACHE_TOKEN_FILE")) {
            (Some(t), _) => Some(token_key(t.as_bytes()).map_err(ConfigError::Token)?),
            (None, Some(path)) => {
                Some(read_token_file(Path::new(&path)).map_err(ConfigError::TokenFile)?)
            }
            (None, None) => None,
        };
        let base_dir = match var("DCACHE_BASEDIR") {
            Some(b) if !Path::new(&b).is_absolute() => {
                return Err(ConfigError::BaseDirNotAbsolute(b));
            }
            b => b.map(PathBuf::from),
        };
        let direct = switch("DCACHE_DIRECT", var("DCACHE_DIRECT"))?;
        let timeout = match var("DCACHE_TIMEOUT") {
            Some(t) => match t.parse::<u64>() {
                Ok(secs) if secs > 0 => Some(std::time::Duration::from_secs(secs)),
                _ => return Err(ConfigError::Timeout(t)),
            },
            None => None,
        };
        let connect_timeout = match var("DCACHE_CONNECT_TIMEOUT") {
            Some(t) => match t.trim().parse::<f64>() {
                Ok(secs) if secs > 0.0 && secs <= 60.0 => Some(Duration::from_secs_f64(secs)),
                _ => return Err(ConfigError::ConnectTimeout(t)),
            },
            None => None,
        };
        let log = match var("DCACHE_LOG") {
            Some(l) => {
                check_log_filter(&l)?;
                l.trim().to_owned()
            }
            None => DEFAULT_LOG.to_owned(),
        };
        let tls = tls_client(
            var("DCACHE_TLS_CA"),
            var("DCACHE_TLS_CERT"),
            var("DCACHE_TLS_KEY"),
        )?;
        let compress = CompressPolicy {
            mode: match var("DCACHE_COMPRESS") {
                Some(m) => m.parse().map_err(ConfigError::Compress)?,
                None => CompressMode::Auto,
            },
            link_speed: var("DCACHE_LINK_SPEED")
                .map(|s| parse_link_speed(&s))
                .transpose()
                .map_err(ConfigError::LinkSpeed)?,
        };
        Ok(Self {
            compress,
            hosts,
            strategy,
            fallback,
            dir,
            cache_size,
            token,
            base_dir,
            direct,
            timeout,
            connect_timeout,
            host_errors,
            log,
            tls,
        })
    }

    /// Client options for the configured servers.
    pub fn client_options(&self) -> ClientOptions {
        let defaults = ClientOptions::new(self.hosts.clone());
        let transport = match &self.tls {
            Some(tls) => defaults.transport.clone().with_tls_client(tls.clone()),
            None => defaults.transport.clone(),
        };
        ClientOptions {
            transport,
            strategy: self.strategy,
            compress: self.compress,
            auth: self.token.clone(),
            progress_timeout: self.timeout.unwrap_or(defaults.progress_timeout),
            connect_timeout: self.connect_timeout.unwrap_or(defaults.connect_timeout),
            // Shared by every dcache process of this user: a host one of them found dead
            // is skipped by all, not rediscovered by each compile of a `make -j`.
            health_dir: Some(self.dir.join("hosts")),
            ..defaults
        }
    }
}

/// The log filter when `DCACHE_LOG` is unset: warnings and errors only.
pub const DEFAULT_LOG: &str = "warn";

/// A switch variable's value (default on): `1`/`on`/`yes`/`true` or `0`/`off`/`no`/`false`,
/// in any case; anything else is an error naming the variable, not a silent default.
fn switch(var: &'static str, v: Option<String>) -> Result<bool, ConfigError> {
    let Some(value) = v else { return Ok(true) };
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err(ConfigError::Switch { var, value }),
    }
}

/// Checks a `DCACHE_LOG` value: comma-separated directives, each a level (`debug`) or
/// `TARGET=LEVEL` (`dcache_client=debug`). A bare word that is not a level would be taken
/// by `tracing`'s filter for a target name and silently show nothing, so it is refused.
pub fn check_log_filter(filter: &str) -> Result<(), LogFilterError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match d.rsplit_once('=') {
            Some((_, level)) => level,
            // A span filter (`target[span]`) names no level of its own.
            None if d.contains('[') => continue,
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(LogFilterError::NotALevel(d.to_owned()));
        }
    }
    Ok(())
}

/// The TLS settings the `DCACHE_TLS_*` variables name, loaded now so a bad file is
/// reported at start-up rather than as a failing server; `None` when none is set.
fn tls_client(
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<TlsClient>, ConfigError> {
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((Path::new(c), Path::new(k))),
        (None, None) => None,
        _ => return Err(ConfigError::TlsHalfIdentity),
    };
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    TlsClient::new(ca.as_deref().map(Path::new), identity)
        .map(Some)
        .map_err(ConfigError::Tls)
}

/// The help text of `dcache`: usage and every variable [`Config::from_env`] reads.
pub const HELP: &str = "\
dcache: distributed compilation with a server-side result cache

usage: dcache COMPILER [ARGS...]   compile as COMPILER would (e.g. make CC=\"dcache gcc\")
       dcache --stats [--json]    show each server's counters (or the local cache's)
       dcache --zero-stats        reset the counters --stats shows (for servers: from now on,
                                  for this user; the servers' own counters are shared)
       dcache --show-stats [--json]  (-s) the counters, and the local cache's size,
                                  entries and limit
       dcache --clear             (-C) empty the local cache (results and manifests)
       dcache --max-size SIZE     (-M) set the local cache's limit (e.g. 10G, 500M), kept
                                  in DCACHE_DIR/dcache.toml, and shrink the cache to it
       dcache --show-config       (-p) every setting, and where its value comes from
       dcache --stop-daemon       stop this DCACHE_DIR's local daemon (it also stops by
                                  itself when idle)
       dcache --demo              build a bundled C program cold, then warm
       dcache --version
       dcache --help

A call with -c or -S and one C or C++ source is preprocessed here, hashed, and sent;
anything else (linking, -E, several sources, -march=native, ...) runs the compiler
locally, unchanged. If a server fails or refuses, the compile runs locally with a
one-line warning.

environment:
  DCACHE_HOSTS       servers, separated by spaces or commas: tcp://HOST:PORT,
                     tls://HOST:PORT, unix:///path. Unset: an embedded server with a local disk cache,
                     so dcache works as a local compiler cache out of the box: a
                     per-user daemon (dcache --daemon, socket and log in DCACHE_DIR/daemon)
                     started by the first compile and shared by all later ones.
                     An entry that is not an address is skipped with a warning.
  DCACHE_STRATEGY    speculative (default), ask-first or send-all
  DCACHE_COMPRESS    auto (default), always or never: zstd on the wire. auto compresses
                     across a network and not to this machine (loopback, unix://)
  DCACHE_LINK_SPEED  the link's speed, e.g. 100M or 10G (bits/s): auto then compresses
                     up to 2G and not above, whatever the address
  DCACHE_FALLBACK    0 turns the local fallback into an error
  DCACHE_CONNECT_TIMEOUT  seconds connecting to a server (handshake included) may
                     take, e.g. 0.5 (default 2); a server that fails is skipped by
                     every dcache process for 60 s (state in DCACHE_DIR/hosts)
  DCACHE_TIMEOUT     seconds a remote job may go without any answer before it is
                     compiled locally (default 330: past the server's compile limit)
  DCACHE_DIR         local directory: the embedded cache, direct-mode manifests and
                     statistics (default: ~/.cache/dcache)
  DCACHE_CACHE_SIZE  the embedded cache's size limit (default: what dcache --max-size
                     set in DCACHE_DIR/dcache.toml, else 5G)
  DCACHE_DAEMON      0 turns the local daemon off: each dcache then runs the embedded
                     server in its own process
  DCACHE_DAEMON_IDLE seconds without a compile after which the daemon exits (default 300)
  DCACHE_BASEDIR     absolute directory (e.g. your home): paths inside it are made
                     relative in the preprocessed source, so checkouts in different
                     places share cache entries (file names in objects become relative)
  DCACHE_DIRECT      0 turns direct mode off (default on: a compile whose source and
                     headers are unchanged since last time skips the preprocessor)
  DCACHE_TOKEN       shared token for servers started with --token-file; proved by
                     challenge-response, never sent (DCACHE_TOKEN_FILE: read it from a file)
  DCACHE_TLS_CA      PEM file of the CA that signed the servers' certificates, trusted for
                     tls:// hosts instead of the system's CAs
  DCACHE_TLS_CERT    PEM certificate (and DCACHE_TLS_KEY its key) this client presents
                     to servers started with --tls-client-ca
  DCACHE_LOG         log level: off, error, warn (default), info, debug (each
                     job's route), trace; or TARGET=LEVEL, comma-separated
";

/// Parses a size like `10G`, `512M`, `64k` or `1048576` (binary units), the form
/// `DCACHE_CACHE_SIZE` and `dcache-server --cache-size` take.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.to_owned()))?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(SizeError::UnknownUnit(s.to_owned())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_owned()))
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `$HOME/.cache`, else `/tmp`; the
/// wrapper's default [`Config::dir`] is `dcache` inside it.
pub fn user_cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return d.into();
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return std::path::PathBuf::from(h).join(".cache");
    }
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(
            parse_size("10X").map_err(|e| e.to_string()),
            Err("\"10X\" has an unknown unit (use K, M, G or T)".to_owned())
        );
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |n| {
            pairs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn unset_and_blank_variables_mean_the_defaults() {
        let c = Config::from_vars(vars(&[("DCACHE_DIR", "/c"), ("DCACHE_HOSTS", "  ")])).unwrap();
        let d = Config::new("/c".into());
        assert!(c.hosts.is_empty() && d.hosts.is_empty());
        assert_eq!((c.fallback, c.direct, c.cache_size), (true, true, 5 << 30));
        assert_eq!((d.fallback, d.direct, d.cache_size), (true, true, 5 << 30));
        assert_eq!(c.dir, d.dir);
        assert!(c.token.is_none() && c.base_dir.is_none());
    }

    #[test]
    fn variables_are_read_and_bad_ones_named() {
        let c = Config::from_vars(vars(&[
            ("DCACHE_HOSTS", "tcp://a:1, unix:///s"),
            ("DCACHE_STRATEGY", "ask-first"),
            ("DCACHE_FALLBACK", "off"),
            ("DCACHE_DIRECT", "0"),
            ("DCACHE_CACHE_SIZE", "1M"),
            ("DCACHE_BASEDIR", "/home"),
        ]))
        .unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.strategy, Strategy::AskFirst);
        assert_eq!(
            (c.fallback, c.direct, c.cache_size),
            (false, false, 1 << 20)
        );
        assert_eq!(c.client_options().hosts.len(), 2);
        assert!(c.host_errors.is_empty() && !c.hosts_unusable());
        // Good values of the checked variables.
        let c = Config::from_vars(vars(&[
            ("DCACHE_DIRECT", "Yes"),
            ("DCACHE_LOG", "info,dcache_client=debug"),
            ("DCACHE_CONNECT_TIMEOUT", "0.25"),
        ]))
        .unwrap();
        assert!(c.direct);
        assert_eq!(c.log, "info,dcache_client=debug");
        assert_eq!(
            c.client_options().connect_timeout,
            Duration::from_millis(250)
        );
        // A typo in the host list is not an error: the good entries are kept, the bad
        // ones reported, and with none good the wrapper compiles locally.
        let c = Config::from_vars(vars(&[("DCACHE_HOSTS", "tcp://a:1 tcpp://b:1")])).unwrap();
        assert_eq!((c.hosts.len(), c.host_errors.len()), (1, 1));
        assert!(!c.hosts_unusable());
        assert!(c.host_errors[0].to_string().contains("tcpp://b:1"));
        let c = Config::from_vars(vars(&[("DCACHE_HOSTS", "nope")])).unwrap();
        assert!(c.hosts_unusable());
        let err = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(
            err(&[("DCACHE_DIRECT", "banana")])
                .starts_with("DCACHE_DIRECT: \"banana\" is not a switch")
        );
        assert!(err(&[("DCACHE_FALLBACK", "2")]).starts_with("DCACHE_FALLBACK: "));
        assert!(
            err(&[("DCACHE_LOG", "nonsense")])
                .starts_with("DCACHE_LOG: \"nonsense\" is not a log level")
        );
        assert!(err(&[("DCACHE_LOG", "dcache_client=loud")]).starts_with("DCACHE_LOG: "));
        assert!(err(&[("DCACHE_CONNECT_TIMEOUT", "0")]).starts_with("DCACHE_CONNECT_TIMEOUT: "));
        assert!(err(&[("DCACHE_CONNECT_TIMEOUT", "soon")]).starts_with("DCACHE_CONNECT_TIMEOUT: "));
        assert!(err(&[("DCACHE_TIMEOUT", "-1")]).starts_with("DCACHE_TIMEOUT: "));
        assert!(err(&[("DCACHE_STRATEGY", "x")]).starts_with("DCACHE_STRATEGY: "));
        assert!(err(&[("DCACHE_CACHE_SIZE", "9Q")]).starts_with("DCACHE_CACHE_SIZE: "));
        assert_eq!(
            err(&[("DCACHE_BASEDIR", "rel")]),
            "DCACHE_BASEDIR: rel is not an absolute path"
        );
        assert!(
            err(&[("DCACHE_TOKEN_FILE", "/nonexistent/t")])
                .starts_with("DCACHE_TOKEN_FILE: cannot read /nonexistent/t: ")
        );
        assert!(
            err(&[("DCACHE_TOKEN", "hunter2")]).starts_with("DCACHE_TOKEN: the token has 7 bytes")
        );
    }

    #[test]
    fn tls_files_are_checked_at_start_and_named() {
        let err = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap_err();
        assert!(matches!(
            err(&[("DCACHE_TLS_CERT", "/c.pem")]),
            ConfigError::TlsHalfIdentity
        ));
        assert!(matches!(
            err(&[("DCACHE_TLS_KEY", "/k.pem")]),
            ConfigError::TlsHalfIdentity
        ));
        let e = err(&[("DCACHE_TLS_CA", "/nonexistent/ca.pem")]).to_string();
        assert!(e.starts_with("DCACHE_TLS_CA"), "{e}");
        assert!(
            e.contains("cannot read the CA file /nonexistent/ca.pem"),
            "{e}"
        );
        let c = Config::from_vars(vars(&[("DCACHE_HOSTS", "tls://a:1")])).unwrap();
        assert!(
            c.tls.is_none(),
            "no variable: the system roots, loaded on first use"
        );
        assert_eq!(c.client_options().transport.tls_client, None);
    }
}
