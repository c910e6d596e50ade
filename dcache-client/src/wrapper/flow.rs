//! The `dcache` compiler wrapper's flow: behave exactly like the compiler, compile
//! remotely when possible, and locally whenever anything goes wrong.
//!
//! [`run`] is the whole of `dcache COMPILER ARGS...`: expand response files, plan, start
//! the [`Backend`], try direct mode, preprocess, send, and deliver the result or fall back
//! to the local compiler. It needs the `embedded` feature because the embedded default is
//! the server library; direct mode's manifests are the client's own
//! ([`ManifestStore`]).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;
use dcache_proto::{CacheKey, JobDesc};

use super::args::{CompilePlan, Language, LocalReason, Plan, plan};
use super::backend::Backend;
use super::base_dir::relativize_line_markers;
use super::config::Config;
use super::depend;
use super::direct::{self, DirectKey, Invocation};
use super::local::{
    assembler_reads_files, needs_local_rerun, preprocess, run_locally, run_locally_teeing_stderr,
    write_atomically,
};
use super::manifests::ManifestStore;
use super::response::expand_response_files;
use crate::stats::calls;

/// Runs the wrapper for `compiler args…` as `dcache` does, printing what the compiler
/// would print; returns the exit code to exit with. Never fails on its own account: any
/// failure of the wrapper, the cache or a server becomes a local compile (or, with
/// [`Config::fallback`] off, exit code 1 and one line on stderr).
pub async fn run(config: &Config, compiler: OsString, args: Vec<OsString>) -> i32 {
    let args = match expand_response_files(args.clone()) {
        Ok(a) => a,
        Err(e) => {
            // The compiler reads (or reports) its response files itself.
            tracing::debug!("{e}; compiling locally");
            let reason = LocalReason::ResponseFile(e.to_string());
            count_uncacheable(config, &calls::reason_label(&reason), true);
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    let plan = match plan(&compiler, &args) {
        Plan::Remote(p) => p,
        Plan::Local(reason) => {
            tracing::debug!("running locally: {reason}");
            let compile = !matches!(
                reason,
                LocalReason::NotACompile | LocalReason::PreprocessOnly
            );
            count_uncacheable(config, &calls::reason_label(&reason), compile);
            return local(&compiler, &args).unwrap_or(1);
        }
    };
    // A typo in a host list must not fail the build: each bad entry is named, the rest
    // are used, and with none left the compile runs locally (not in the embedded cache:
    // the user asked for servers).
    for e in &config.host_errors {
        let then = if config.hosts_unusable() {
            ""
        } else {
            "; skipping it"
        };
        eprintln!("dcache: DCACHE_HOSTS: {e}{then}");
    }
    if config.hosts_unusable() {
        count_uncacheable(config, "no usable server in DCACHE_HOSTS", true);
        return fail_over(
            config,
            &"DCACHE_HOSTS names no usable server",
            &compiler,
            &args,
        );
    }
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
fn fail_over(
    config: &Config,
    e: &dyn std::fmt::Display,
    compiler: &OsString,
    args: &[OsString],
) -> i32 {
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
    // Which compiler a server must run: the one a local compile would. Unknown, nothing
    // can be served for it.
    let Some(identity) = super::identity::of(config, compiler) else {
        return local(compiler, args).unwrap_or(1);
    };
    let mut desc = JobDesc {
        compiler: compiler_name(compiler),
        language: plan.language.preprocessed().into(),
        args: compile_args,
        source_len: None,
        identity: Some(identity),
    };
    let direct = if config.direct {
        direct_key(config, compiler, args, &desc.args, plan)
    } else {
        None
    };
    if let Some(dk) = direct {
        if let Some(code) = try_direct(config, backend, compiler, args, plan, &desc, dk).await {
            calls::record_cacheable(&config.dir);
            return code;
        }
        // Assembler goes the preprocessor's way, where its text is checked for files the
        // assembler reads itself, which no dependency file lists.
        if depend::applies(config, backend, args)
            && plan.language != Language::Asm
            && !super::direct::too_new_to_record(&plan.input, started)
        {
            calls::record_cacheable(&config.dir);
            return depend::compile(config, backend, compiler, args, plan, &desc, dk, started)
                .await;
        }
    }
    let mut pre = match preprocess(plan) {
        Ok(p) => p,
        Err(e) => {
            // The compiler reproduces the preprocessor's exact errors itself.
            tracing::debug!("{e}; compiling locally");
            count_uncacheable(config, calls::PREPROCESSOR_ERROR, true);
            return local(compiler, args).unwrap_or(1);
        }
    };
    if plan.language == Language::Asm && assembler_reads_files(&pre.source) {
        tracing::debug!("running locally: the assembler source reads files itself");
        count_uncacheable(config, calls::ASSEMBLER_READS_FILES, true);
        return local(compiler, args).unwrap_or(1);
    }
    calls::record_cacheable(&config.dir);
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
    // Hashed once: the client sends this key, and direct mode records it below.
    let key = CacheKey::compute(&desc, &source);
    let outcome = match backend.compile_keyed(desc, key, source.clone()).await {
        Ok(o) => o,
        Err(e) if backend.is_daemon() => {
            // The daemon went away (stopped, replaced, killed): not the user's server,
            // so no warning and no DCACHE_FALLBACK, just the compile it would have run.
            tracing::debug!("daemon: {e}; compiling locally");
            return local(compiler, args).unwrap_or(1);
        }
        Err(e) => return fail_over(config, &e, compiler, args),
    };
    log_outcome(plan, &outcome);
    let result = &outcome.job.result;
    if needs_local_rerun(result, !backend.exact_diagnostics(), rewritten) {
        tracing::debug!(
            "compile exited {} with {} bytes of diagnostics; rerunning locally for the exact output",
            result.exit_code,
            result.stderr.len()
        );
        let replayable = result.exit_code == 0;
        return rerun_and_record(
            config,
            compiler,
            args,
            plan,
            direct.filter(|_| replayable),
            key,
            &source,
            started,
        );
    }
    let code = deliver(&pre.stderr, result, plan, compiler, args);
    if let (0, Some(dk), true) = (code, direct, pre.stderr.is_empty()) {
        // Next time, this compile's key can be found without preprocessing.
        let dep = plan.dep_file.as_ref().and_then(|d| std::fs::read(d).ok());
        if plan.dep_file.is_none() || dep.is_some() {
            if let Some(entry) =
                depend::record_preprocessed(config, plan, key, dep, &source, started)
            {
                record_manifest(config, dk, entry);
            }
        }
    }
    code
}

/// Compiles here, as given, for the compiler's exact output; a result whose diagnostics
/// were not exact (a remote server's) was clean otherwise. With a direct key (`dk`), a
/// successful compile whose stderr could be kept records the manifest entry with that
/// stderr, so the next identical compile is a direct hit that replays gcc's very bytes
/// instead of another local compile. Returns the exit code.
#[allow(clippy::too_many_arguments)] // the compile's whole context, passed once
fn rerun_and_record(
    config: &Config,
    compiler: &OsString,
    args: &[OsString],
    plan: &CompilePlan,
    dk: Option<DirectKey>,
    key: CacheKey,
    source: &[u8],
    started: SystemTime,
) -> i32 {
    // A terminal gets colours and links a pipe would not: nothing kept to replay there.
    let Some(dk) = dk.filter(|_| !std::io::stderr().is_terminal()) else {
        return local(compiler, args).unwrap_or(1);
    };
    let (code, kept) = match run_locally_teeing_stderr(compiler, args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dcache: cannot run {}: {e}", compiler.to_string_lossy());
            return 1;
        }
    };
    let Some(stderr) = kept.filter(|_| code == 0) else {
        return code;
    };
    let dep = plan.dep_file.as_ref().and_then(|d| std::fs::read(d).ok());
    if plan.dep_file.is_some() && dep.is_none() {
        return code;
    }
    if let Some(mut entry) = depend::record_preprocessed(config, plan, key, dep, source, started) {
        tracing::debug!(
            "{}: recorded with its {} bytes of diagnostics for replay",
            plan.input.display(),
            stderr.len()
        );
        entry.stderr = Some(stderr);
        record_manifest(config, dk, entry);
    }
    code
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

fn log_outcome(plan: &CompilePlan, outcome: &crate::Outcome) {
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

/// The store manifests live in: `DCACHE_DIR/manifests`, bounded beside the results cache.
fn manifest_store(config: &Config) -> ManifestStore {
    // Their share of the limit, which covers all of DCACHE_DIR.
    let budget = crate::cache_admin::Budget::for_limit(config.cache_size);
    ManifestStore::new(
        config.dir.join("manifests"),
        budget.manifest_limits(config.cache_size),
    )
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
    let manifest = manifest_store(config).get(&dk)?;
    let checking = std::time::Instant::now();
    let entry = manifest.find_current(!backend.is_remote())?;
    // What a hit costs in file reads and lookups (docs/BENCHMARKS.md quotes it).
    tracing::debug!(
        "{}: manifest entry current: {} files and {} lookups checked in {:?}",
        plan.input.display(),
        entry.files.len(),
        entry.probes.len(),
        checking.elapsed()
    );
    if plan.dep_file.is_some() != entry.dep_file.is_some() {
        return None;
    }
    let outcome = backend
        .lookup(desc.clone(), entry.key)
        .await
        .ok()
        .flatten()?;
    let mut result = outcome.job.result;
    match &entry.stderr {
        // The diagnostics this very compile printed here, kept because the result's own
        // are not exact; a terminal would have had colours, so it goes the usual way.
        Some(exact) if result.exit_code == 0 && !std::io::stderr().is_terminal() => {
            result.stderr = Bytes::from(exact.clone());
        }
        Some(_) => return None,
        // Not what a clean compile gives; let the usual path deal with it.
        None if needs_local_rerun(&result, !backend.exact_diagnostics(), false) => return None,
        None => {}
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
    Some(deliver(&[], &result, plan, compiler, args))
}

/// Adds `entry` to the manifest under `dk` (best effort: a lost update costs one
/// preprocessor run later, never a wrong result).
pub(super) fn record_manifest(config: &Config, dk: DirectKey, entry: direct::Entry) {
    let store = manifest_store(config);
    let mut manifest = store.get(&dk).unwrap_or_default();
    manifest.add(entry);
    if let Err(e) = store.put(&dk, &manifest) {
        tracing::debug!("direct mode: {e}");
    }
}

/// Counts a call that runs without the cache (see [`calls`]), and prints the warning
/// when this call makes most of the build uncached: once per build, across processes, at
/// the default log level (`DCACHE_LOG=error` silences it).
fn count_uncacheable(config: &Config, label: &str, compile: bool) {
    if let Some(warning) = calls::record_uncacheable(&config.dir, label, compile) {
        if tracing::enabled!(tracing::Level::WARN) {
            eprintln!("dcache: {warning}");
        }
    }
}

fn local(compiler: &OsString, args: &[OsString]) -> Result<i32, ()> {
    run_locally(compiler, args).map_err(|e| {
        eprintln!("dcache: cannot run {}: {e}", compiler.to_string_lossy());
    })
}
