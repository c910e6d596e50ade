//! The `dcache` compiler wrapper: behave exactly like the compiler, compile remotely when
//! possible, and locally whenever anything goes wrong.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use dcache_client::ClientOptions;
use dcache_client::wrapper::args::{CompilePlan, Plan, plan};
use dcache_client::wrapper::base_dir::relativize_line_markers;
use dcache_client::wrapper::direct::{self, DirectKey, Invocation, Manifest};
use dcache_client::wrapper::local::{preprocess, run_locally, write_atomically};
use dcache_proto::{AuthKey, CacheKey, JobDesc, Strategy};
use dcache_server::cache::{DiskStore, Store, StoreKey};
use dcache_transport::Address;

use crate::backend::Backend;

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
    /// `DCACHE_DIRECT` (default on): find a compile's key from a manifest of the files it
    /// read last time, without running the preprocessor.
    pub direct: bool,
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
        let direct = !matches!(
            var("DCACHE_DIRECT").as_deref(),
            Some("0" | "false" | "no" | "off")
        );
        Ok(Self {
            hosts,
            strategy,
            fallback,
            dir,
            cache_size,
            token,
            base_dir,
            direct,
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
  DCACHE_DIR         local directory: the embedded cache, direct-mode manifests and
                     statistics (default: ~/.cache/dcache)
  DCACHE_CACHE_SIZE  the embedded cache's size limit (default: 5G)
  DCACHE_BASEDIR     absolute directory (e.g. your home): paths inside it are made
                     relative in the preprocessed source, so checkouts in different
                     places share cache entries (file names in objects become relative)
  DCACHE_DIRECT      0 turns direct mode off (default on: a compile whose source and
                     headers are unchanged since last time skips the preprocessor)
  DCACHE_TOKEN       shared token for servers started with --token-file; proved by
                     challenge-response, never sent (DCACHE_TOKEN_FILE: read it from a file)
  DCACHE_LOG         log filter, e.g. debug (default: warn)
";

/// Runs the wrapper for `compiler args…`; returns the exit code.
pub async fn run(config: &Config, compiler: OsString, args: Vec<OsString>) -> i32 {
    let args = match expand_response_files(args.clone()) {
        Ok(a) => a,
        Err(e) => {
            // The compiler reads (or reports) its response files itself.
            tracing::debug!("{e}; compiling locally");
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    let plan = match plan(&compiler, &args) {
        Plan::Remote(p) => p,
        Plan::Local(reason) => {
            tracing::debug!("running locally: {reason}");
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    let backend = match Backend::start(config, &compiler).await {
        Ok(b) => b,
        Err(e) => return fail_over(config, &e, &compiler, &args),
    };
    let code = compile(config, &backend, &compiler, &args, &plan).await;
    backend.finish(config).await;
    code
}

/// The name a compile job carries: the compiler as invoked, without its directory (the
/// server resolves names on its own path; a client never chooses a path).
fn compiler_name(compiler: &OsString) -> String {
    PathBuf::from(compiler)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A server or the cache failed: compile locally with one warning line, or stop there
/// when the user asked for no fallback.
fn fail_over(config: &Config, e: &str, compiler: &OsString, args: &[OsString]) -> i32 {
    if !config.fallback {
        eprintln!("dcache: {e} (DCACHE_FALLBACK=0: not compiling locally)");
        return 1;
    }
    eprintln!("dcache: {e}; compiling locally");
    local(compiler, args).unwrap_or(1)
}

/// One distributable compile: direct-mode lookup, else preprocess and send.
async fn compile(
    config: &Config,
    backend: &Backend,
    compiler: &OsString,
    args: &[OsString],
    plan: &CompilePlan,
) -> i32 {
    let started = SystemTime::now();
    let mut compile_args = plan.compile_args.clone();
    if std::io::stderr().is_terminal()
        && !compile_args.iter().any(|a| a.contains("diagnostics-color"))
    {
        // The server's compiler writes to a pipe; ask for the colours a terminal would get.
        compile_args.insert(0, "-fdiagnostics-color=always".into());
    }
    let mut desc = JobDesc {
        compiler: compiler_name(compiler),
        language: plan.language.preprocessed().into(),
        args: compile_args,
        source_len: None,
    };
    let direct = if config.direct {
        direct_key(config, compiler, args, &desc.args, plan)
    } else {
        None
    };
    if let Some(dk) = direct {
        if let Some(code) = try_direct(config, backend, compiler, args, plan, &desc, dk).await {
            return code;
        }
    }
    let mut pre = match preprocess(plan) {
        Ok(p) => p,
        Err(e) => {
            // The compiler reproduces the preprocessor's exact errors itself.
            tracing::debug!("{e}; compiling locally");
            return local(compiler, args).unwrap_or(1);
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
    desc.source_len = Some(pre.source.len() as u64);
    let source = Bytes::from(pre.source);
    let outcome = match backend.client().compile(desc.clone(), source.clone()).await {
        Ok(o) => o,
        Err(e) => return fail_over(config, &e.to_string(), compiler, args),
    };
    log_outcome(plan, &outcome);
    let result = &outcome.job.result;
    if needs_local_rerun(result, backend.is_remote(), rewritten) {
        tracing::debug!(
            "compile exited {} with {} bytes of diagnostics; rerunning locally for the exact output",
            result.exit_code,
            result.stderr.len()
        );
        return local(compiler, args).unwrap_or(1);
    }
    let code = deliver(&pre.stderr, result, plan, compiler, args);
    if let (0, Some(dk), true) = (code, direct, pre.stderr.is_empty()) {
        // Next time, this compile's key can be found without preprocessing.
        let key = CacheKey::compute(&desc, &source);
        let dep = plan.dep_file.as_ref().and_then(|d| std::fs::read(d).ok());
        if plan.dep_file.is_none() || dep.is_some() {
            if let Some(entry) = direct::Entry::record(key, dep, &source, started) {
                record_manifest(config, dk, entry).await;
            }
        }
    }
    code
}

/// Whether `result` must be redone here to be exactly what the compiler gives: a failure
/// (quick, and never cached), or diagnostics from a compile that did not see the user's
/// files and locale. A remote server cannot quote the source lines gcc shows under a
/// diagnostic (it has only the preprocessed text, not the files it names) and writes in
/// its own locale; the embedded server compiles in this directory and locale, so its
/// output is exact unless the file names were `rewritten` for DCACHE_BASEDIR. Clean
/// compiles, the common case, are never redone.
fn needs_local_rerun(result: &dcache_proto::JobResult, remote: bool, rewritten: bool) -> bool {
    result.exit_code != 0 || ((remote || rewritten) && !result.stderr.is_empty())
}

/// Prints what the compiler printed and writes its output, as the compiler would.
fn deliver(
    pre_stderr: &[u8],
    result: &dcache_proto::JobResult,
    plan: &CompilePlan,
    compiler: &OsString,
    args: &[OsString],
) -> i32 {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(pre_stderr);
    let _ = err.write_all(&result.stderr);
    let _ = std::io::stdout().lock().write_all(&result.stdout);
    let Some(object) = result.outputs.first() else {
        eprintln!("dcache: the server returned no output file; compiling locally");
        return local(compiler, args).unwrap_or(1);
    };
    if let Err(e) = write_atomically(&plan.output, &object.data) {
        eprintln!("dcache: cannot write {}: {e}", plan.output.display());
        return 1;
    }
    0
}

fn log_outcome(plan: &CompilePlan, outcome: &dcache_client::Outcome) {
    tracing::debug!(
        "{}: {} from {} in {:?} ({} bytes sent, {} skipped)",
        plan.input.display(),
        match outcome.job.origin {
            dcache_proto::ResultOrigin::Early => "early hit",
            dcache_proto::ResultOrigin::Cache => "hit",
            _ => "compiled",
        },
        outcome.host,
        outcome.elapsed,
        outcome.job.source_bytes_sent,
        outcome.job.source_bytes_skipped
    );
}

/// The direct-mode key of this compile, if it may use direct mode.
fn direct_key(
    config: &Config,
    compiler: &OsString,
    args: &[OsString],
    compile_args: &[String],
    plan: &CompilePlan,
) -> Option<DirectKey> {
    let cwd = std::env::current_dir().ok()?;
    let source = std::fs::read(&plan.input).ok()?;
    DirectKey::compute(&Invocation {
        compiler,
        args,
        compile_args,
        cwd: &cwd,
        source: &source,
        base_dir: config.base_dir.as_deref(),
    })
}

/// The store manifests live in: the local cache directory, beside the embedded cache's
/// results, under keys of their own derivation context.
fn manifest_store(config: &Config) -> Option<DiskStore> {
    DiskStore::open_lazy(&config.dir.join("cache"), config.cache_size).ok()
}

/// Direct mode: if a manifest says which key this compile's preprocessed source has, ask
/// for that key without preprocessing. `None`: go the usual way (no manifest, files
/// changed, or the server no longer has the result).
async fn try_direct(
    config: &Config,
    backend: &Backend,
    compiler: &OsString,
    args: &[OsString],
    plan: &CompilePlan,
    desc: &JobDesc,
    dk: DirectKey,
) -> Option<i32> {
    let store = manifest_store(config)?;
    let stored = store.get(&StoreKey(dk.0)).await?;
    let manifest = Manifest::decode(&stored.stdout)?;
    let entry = manifest.find_current()?;
    if plan.dep_file.is_some() != entry.dep_file.is_some() {
        return None;
    }
    let outcome = backend
        .client()
        .lookup(desc.clone(), entry.key)
        .await
        .ok()
        .flatten()?;
    let result = &outcome.job.result;
    if needs_local_rerun(result, backend.is_remote(), false) {
        // Not what a clean compile gives; let the usual path deal with it.
        return None;
    }
    tracing::debug!(
        "{}: direct hit from {} in {:?}",
        plan.input.display(),
        outcome.host,
        outcome.elapsed
    );
    if let (Some(path), Some(dep)) = (&plan.dep_file, &entry.dep_file) {
        if let Err(e) = write_atomically(path, dep) {
            eprintln!("dcache: cannot write {}: {e}", path.display());
            return Some(1);
        }
    }
    Some(deliver(&[], result, plan, compiler, args))
}

/// Adds `entry` to the manifest under `dk` (best effort: a lost update costs one
/// preprocessor run later, never a wrong result).
async fn record_manifest(config: &Config, dk: DirectKey, entry: direct::Entry) {
    let Some(store) = manifest_store(config) else {
        return;
    };
    let key = StoreKey(dk.0);
    let mut manifest = match store.get(&key).await {
        Some(r) => Manifest::decode(&r.stdout).unwrap_or_default(),
        None => Manifest::default(),
    };
    manifest.add(entry);
    let value = dcache_proto::JobResult {
        exit_code: 0,
        stdout: Bytes::from(manifest.encode()),
        stderr: Bytes::new(),
        outputs: Vec::new(),
    };
    let _ = store.put(&key, &value).await;
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
