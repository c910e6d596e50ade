//! The `dcache` compiler wrapper: behave exactly like the compiler, compile remotely when
//! possible, and locally whenever anything goes wrong.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dcache_client::wrapper::args::{Plan, plan};
use dcache_client::wrapper::base_dir::relativize_line_markers;
use dcache_client::wrapper::local::{preprocess, run_locally, write_atomically};
use dcache_client::{Client, ClientOptions};
use dcache_proto::{AuthKey, JobDesc, Strategy};
use dcache_server::cache::DiskStore;
use dcache_server::compiler::{LocalExecutor, LocalExecutorConfig};
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TransportOptions, bind};

use crate::stats_file;

/// Configuration read from the environment (see `dcache --help`).
#[derive(Clone, Debug)]
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
}

impl Config {
    /// Reads the environment; errors name the variable and what was wrong.
    pub fn from_env() -> Result<Self, String> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let hosts = match var("DCACHE_HOSTS") {
            Some(h) => h
                .split([' ', ',', '\t', '\n'])
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<Address>()
                        .map_err(|e| format!("DCACHE_HOSTS: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let strategy = match var("DCACHE_STRATEGY") {
            Some(s) => s.parse().map_err(|e| format!("DCACHE_STRATEGY: {e}"))?,
            None => Strategy::Speculative,
        };
        let fallback = !matches!(
            var("DCACHE_FALLBACK").as_deref(),
            Some("0" | "false" | "no" | "off")
        );
        let dir = var("DCACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::util::user_cache_dir().join("dcache"));
        let cache_size = match var("DCACHE_CACHE_SIZE") {
            Some(s) => {
                crate::util::parse_size(&s).map_err(|e| format!("DCACHE_CACHE_SIZE: {e}"))?
            }
            None => 5 << 30,
        };
        let token = match (var("DCACHE_TOKEN"), var("DCACHE_TOKEN_FILE")) {
            (Some(t), _) => Some(AuthKey::from_token(t.as_bytes())),
            (None, Some(path)) => {
                let t = std::fs::read(&path)
                    .map_err(|e| format!("DCACHE_TOKEN_FILE: cannot read {path}: {e}"))?;
                if t.trim_ascii().is_empty() {
                    return Err(format!("DCACHE_TOKEN_FILE: {path} is empty"));
                }
                Some(AuthKey::from_token(&t))
            }
            (None, None) => None,
        };
        let base_dir = match var("DCACHE_BASEDIR") {
            Some(b) if !Path::new(&b).is_absolute() => {
                return Err(format!("DCACHE_BASEDIR: {b} is not an absolute path"));
            }
            b => b.map(PathBuf::from),
        };
        Ok(Self {
            hosts,
            strategy,
            fallback,
            dir,
            cache_size,
            token,
            base_dir,
        })
    }

    /// Client options for the configured servers.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            strategy: self.strategy,
            auth: self.token.clone(),
            ..ClientOptions::new(self.hosts.clone())
        }
    }
}

/// The help text: usage and every variable.
pub const HELP: &str = "\
dcache: distributed compilation with a server-side result cache

usage: dcache COMPILER [ARGS...]   compile as COMPILER would (e.g. make CC=\"dcache gcc\")
       dcache --stats [--json]    show each server's counters (or the local cache's)
       dcache --zero-stats        reset the counters --stats shows (for servers: from now on,
                                  for this user; the servers' own counters are shared)
       dcache --demo              build a bundled C program cold, then warm
       dcache --help

A call with -c or -S and one C or C++ source is preprocessed here, hashed, and sent;
anything else (linking, -E, several sources, -march=native, ...) runs the compiler
locally, unchanged. If a server fails or refuses, the compile runs locally with a
one-line warning.

environment:
  DCACHE_HOSTS       servers, separated by spaces or commas: tcp://HOST:PORT,
                     unix:///path. Unset: an embedded server with a local disk cache,
                     so dcache works as a local compiler cache out of the box.
  DCACHE_STRATEGY    speculative (default), ask-first or send-all
  DCACHE_FALLBACK    0 turns the local fallback into an error
  DCACHE_DIR         the embedded cache's directory (default: ~/.cache/dcache)
  DCACHE_CACHE_SIZE  the embedded cache's size limit (default: 5G)
  DCACHE_BASEDIR     absolute directory (e.g. your home): paths inside it are made
                     relative in the preprocessed source, so checkouts in different
                     places share cache entries (file names in objects become relative)
  DCACHE_TOKEN       shared token for servers started with --token-file; proved by
                     challenge-response, never sent (DCACHE_TOKEN_FILE: read it from a file)
  DCACHE_LOG         log filter, e.g. debug (default: warn)
";

/// Runs the wrapper for `compiler args…`; returns the exit code.
pub async fn run(config: &Config, compiler: OsString, args: Vec<OsString>) -> i32 {
    let args = match expand_response_files(args) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("{e}; compiling locally");
            return local(&compiler, &[]).unwrap_or(1);
        }
    };
    let plan = match plan(&compiler, &args) {
        Plan::Remote(p) => p,
        Plan::Local(reason) => {
            tracing::debug!("running locally: {reason}");
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    let mut pre = match preprocess(&plan) {
        Ok(p) => p,
        Err(e) => {
            // The compiler reproduces the preprocessor's exact errors itself.
            tracing::debug!("{e}; compiling locally");
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    // With a base directory, absolute paths under it become relative, so another checkout
    // of the same project has the same key. The compiler then sees other file names than
    // a local compile would, which only shows in what it prints (handled below).
    let rewritten = match (&config.base_dir, std::env::current_dir()) {
        (Some(base), Ok(cwd)) => match relativize_line_markers(&pre.source, base, &cwd) {
            Some(new) => {
                pre.source = new;
                true
            }
            None => false,
        },
        _ => false,
    };
    let compiler_name = PathBuf::from(&compiler)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut compile_args = plan.compile_args.clone();
    if std::io::stderr().is_terminal()
        && !compile_args.iter().any(|a| a.contains("diagnostics-color"))
    {
        // The server's compiler writes to a pipe; ask for the colours a terminal would get.
        compile_args.insert(0, "-fdiagnostics-color=always".into());
    }
    let desc = JobDesc {
        compiler: compiler_name,
        language: plan.language.preprocessed().into(),
        args: compile_args,
        source_len: Some(pre.source.len() as u64),
    };
    let source = Bytes::from(pre.source);
    let outcome = if config.hosts.is_empty() {
        embedded(config, desc, source).await
    } else {
        let client = Client::new(config.client_options());
        client
            .compile(desc, source)
            .await
            .map_err(|e| e.to_string())
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            if !config.fallback {
                eprintln!("dcache: {e} (DCACHE_FALLBACK=0: not compiling locally)");
                return 1;
            }
            eprintln!("dcache: {e}; compiling locally");
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    tracing::debug!(
        "{}: {} from {} in {:?} ({} bytes sent, {} skipped)",
        plan.input.display(),
        match (outcome.job.cached, outcome.job.early) {
            (true, true) => "early hit",
            (true, false) => "hit",
            _ => "compiled",
        },
        outcome.host,
        outcome.elapsed,
        outcome.job.source_bytes_sent,
        outcome.job.source_bytes_skipped
    );
    let result = outcome.job.result;
    let remote = !config.hosts.is_empty();
    if result.exit_code != 0 || ((remote || rewritten) && !result.stderr.is_empty()) {
        // A remote server cannot quote the source lines gcc shows under a diagnostic (it
        // has only the preprocessed text, not the files it names) and writes in its own
        // locale, so a compile that printed anything runs again here for the exact
        // output, as a failed one does. Failures are quick and never cached; clean
        // compiles, the common case, are untouched. (The embedded server compiles in this
        // directory and locale, so its diagnostics are already exact, unless the file names
        // were rewritten for DCACHE_BASEDIR.)
        tracing::debug!(
            "compile exited {} with {} bytes of diagnostics; rerunning locally for the exact output",
            result.exit_code,
            result.stderr.len()
        );
        return local(&compiler, &args).unwrap_or(1);
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&pre.stderr);
    let _ = err.write_all(&result.stderr);
    let _ = std::io::stdout().lock().write_all(&result.stdout);
    let Some(object) = result.outputs.first() else {
        eprintln!("dcache: the server returned no output file; compiling locally");
        return local(&compiler, &args).unwrap_or(1);
    };
    if let Err(e) = write_atomically(&plan.output, &object.data) {
        eprintln!("dcache: cannot write {}: {e}", plan.output.display());
        return 1;
    }
    0
}

fn local(compiler: &OsString, args: &[OsString]) -> Result<i32, ()> {
    run_locally(compiler, args).map_err(|e| {
        eprintln!("dcache: cannot run {}: {e}", compiler.to_string_lossy());
    })
}

/// Expands `@file` arguments (gcc's response files) so the plan sees every option.
fn expand_response_files(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str().and_then(|s| s.strip_prefix('@')) {
            Some(path) if !path.is_empty() => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("@{path}: {e}"))?;
                out.extend(split_response(&text).into_iter().map(OsString::from));
            }
            _ => out.push(a),
        }
    }
    Ok(out)
}

/// gcc's response-file syntax: whitespace-separated, with quotes and backslash escapes.
fn split_response(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut any = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    any = true;
                }
            }
            ('"' | '\'', None) => {
                quote = Some(c);
                any = true;
            }
            (c, Some(q)) if c == q => quote = None,
            (c, None) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (c, _) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The embedded default: this process runs the server library over `mem://` with the
/// shared disk cache, and counts what happened in the cache's stats file.
async fn embedded(
    config: &Config,
    desc: JobDesc,
    source: Bytes,
) -> Result<dcache_client::Outcome, String> {
    // Lazy: one compile per process, so no scan of the whole cache on every start.
    let store = DiskStore::open_lazy(&config.dir.join("cache"), config.cache_size)
        .map_err(|e| format!("local cache in {}: {e}", config.dir.display()))?;
    // Compiling for the user on the user's machine: in the user's directory and locale, so
    // warnings quote source lines and use the quote characters a local compile would.
    let executor = LocalExecutor::new(LocalExecutorConfig {
        workdir: std::env::current_dir().ok(),
        locale: locale_env(),
        ..LocalExecutorConfig::default()
    });
    let service = Service::new(
        Arc::new(store),
        Arc::new(executor),
        ServiceConfig::default(),
    );
    let addr: Address = format!("mem://dcache-embedded-{}", std::process::id())
        .parse()
        .map_err(|e| format!("{e}"))?;
    let listener = bind(&addr, &TransportOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let service = service.clone();
        tokio::spawn(async move {
            service
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await;
        })
    };
    let client = Client::new(ClientOptions::new(vec![addr]));
    let outcome = client
        .compile(desc, source)
        .await
        .map_err(|e| e.to_string());
    drop(client);
    let _ = stop_tx.send(());
    // Waits for the result to be stored before the process exits.
    let _ = server.await;
    let c = service.counters();
    stats_file::record(
        &config.dir,
        &stats_file::Delta {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            early_results: c.early_results.load(Ordering::Relaxed),
            compiles: c.compiles.load(Ordering::Relaxed),
            source_bytes_received: c.source_bytes_received.load(Ordering::Relaxed),
            source_bytes_saved: c.source_bytes_saved.load(Ordering::Relaxed),
        },
    );
    outcome
}

/// The locale variables that shape a compiler's diagnostics, as set here.
fn locale_env() -> Vec<(String, String)> {
    ["LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"]
        .into_iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_owned(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_files_split_like_gcc() {
        assert_eq!(
            split_response("-c  a.c\n-DX=\"a b\" 'c d' e\\ f \"\""),
            ["-c", "a.c", "-DX=a b", "c d", "e f", ""]
        );
    }
}
