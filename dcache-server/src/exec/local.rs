//! The real executor: allow-listed compilers in private directories, fed as source
//! arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::{CompilerIdentity, JobDesc, JobResult, OutputFile};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::limits::{ExecLimits, ProcessTree, read_capped};
use super::{CompileFuture, CompilerId, ExecError, Executor, args, identity as probe};
use crate::sandbox::{Policy, Sandbox, toolchain};

/// Settings of a [`LocalExecutor`].
#[derive(Clone, Debug)]
pub struct LocalExecutorConfig {
    /// Compiler names offered to clients, found on [`path`](Self::path): plain or
    /// versioned (`gcc`, `gcc-12`, `x86_64-linux-gnu-gcc-11`, `clang-14`). Names only: a
    /// client can never choose a path. A job runs on the offered compiler whose identity
    /// equals the one it names (the one of its name first), never on another.
    pub allowed: Vec<String>,
    /// How long one compile may run before it is killed, counted from its start: the
    /// upload is included, since the compiler holds its slot and temp dir all along.
    pub time_limit: Duration,
    /// `PATH` for finding the compilers and for the compiler's own helpers (`as`, `cc1`).
    pub path: String,
    /// A directory searched for the offered compilers before [`path`](Self::path), and
    /// kept out of the `PATH` the compilers run with. The wrapper's embedded server runs
    /// the very compiler the user named (`/opt/gcc-13/bin/gcc`, or the script a
    /// masquerading `gcc` link resolved to), while that compiler's own children see the
    /// user's `PATH` unchanged: a script `gcc` that runs `gcc` must reach what it would
    /// reach without dcache, not itself again. `None` for a server.
    pub compiler_dir: Option<PathBuf>,
    /// Where compilers run. `None`, the default and the only choice for a server: a fresh
    /// private temporary directory per job, so a compile can touch nothing else. An
    /// in-process server compiling for the local user (the wrapper's embedded default) may
    /// name the user's own directory instead: the compiler can then read the files the
    /// preprocessed text names and quote their lines under a warning, exactly as a local
    /// compile does. Outputs still go to the private directory.
    pub workdir: Option<PathBuf>,
    /// Locale variables given to compilers (`LANG`, `LC_*`, `LANGUAGE`); empty means
    /// `LC_ALL=C`. They decide the language and quote characters of diagnostics, so they
    /// are part of each compiler's identity: results compiled under one locale are never
    /// served under another.
    pub locale: Vec<(String, String)>,
    /// A directory where compiler identities (the store binding and the identity jobs are
    /// matched on) are remembered, keyed by the binary's path, size, inode and change
    /// times: a process that starts for one compile (the wrapper's embedded server) then
    /// skips the compiler runs and the hashing. A replaced or touched binary changes the
    /// key. `None`: compute at every start.
    pub identity_cache: Option<PathBuf>,
    /// The kernel sandbox every compile runs in ([`Sandbox::probe`]). `None` runs the
    /// compiler unconfined: right only for a server compiling for its own user (the
    /// wrapper's embedded default); a server for other machines must have one (the
    /// `dcache-server` binary refuses to serve beyond loopback without it).
    pub sandbox: Option<Sandbox>,
    /// Files or directories every sandboxed compile may also read and execute, beyond the
    /// toolchain resolved for its compiler: a compiler installed with libraries of its
    /// own, or the interpreter of a compiler wrapper script.
    pub sandbox_paths: Vec<PathBuf>,
    /// Memory, CPU, file size and output bounds of each compile.
    pub limits: ExecLimits,
}

impl Default for LocalExecutorConfig {
    fn default() -> Self {
        Self {
            allowed: ["gcc", "g++", "cc", "c++", "clang", "clang++"]
                .map(String::from)
                .to_vec(),
            time_limit: Duration::from_secs(300),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            compiler_dir: None,
            workdir: None,
            locale: Vec::new(),
            identity_cache: None,
            sandbox: None,
            sandbox_paths: Vec::new(),
            limits: ExecLimits::default(),
        }
    }
}

#[derive(Clone, Debug)]
struct Compiler {
    path: PathBuf,
    id: CompilerId,
    /// What a job's identity must equal for this compiler to run it.
    identity: CompilerIdentity,
    /// What the sandbox lets this compiler read and execute (empty without a sandbox).
    toolchain: std::sync::Arc<[PathBuf]>,
}

/// Runs real compilers found on this server.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    config: LocalExecutorConfig,
    compilers: HashMap<String, Compiler>,
}

impl LocalExecutor {
    /// Resolves every allowed compiler on `PATH` and computes its identity once. Names
    /// not installed are left out (a job asking for them is refused).
    pub fn new(config: LocalExecutorConfig) -> Self {
        let mut compilers = HashMap::new();
        let lookup = match &config.compiler_dir {
            Some(dir) => format!("{}:{}", dir.display(), config.path),
            None => config.path.clone(),
        };
        for name in &config.allowed {
            if name.contains('/') {
                continue;
            }
            if let Some(path) = toolchain::find_on_path(name, &lookup) {
                let matched = match &config.identity_cache {
                    Some(dir) => probe::probe_cached(dir, &path, &config.path),
                    None => probe::probe(&path, &config.path),
                };
                let matched = match matched {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!("leaving {name} out: {e}");
                        None
                    }
                };
                if let Some(matched) = matched {
                    let id = store_binding(&path, &matched, &config.locale);
                    let toolchain = if config.sandbox.is_some() {
                        let mut files = toolchain::resolve(&path, &config.path);
                        files.extend(config.sandbox_paths.iter().cloned());
                        files.into()
                    } else {
                        Vec::new().into()
                    };
                    compilers.insert(
                        name.clone(),
                        Compiler {
                            path,
                            id,
                            identity: matched,
                            toolchain,
                        },
                    );
                }
            }
        }
        Self { config, compilers }
    }

    /// The identity of the allowed compiler `name`, if it is installed: what the store key
    /// binds so a compiler upgrade changes every key.
    pub fn identity(&self, name: &str) -> Option<CompilerId> {
        self.compilers.get(name).map(|c| c.id)
    }

    /// The identity a job must name to run on the allowed compiler `name`, if installed
    /// (the one the client computes of its own compiler: protocol §5.2.1).
    pub fn job_identity(&self, name: &str) -> Option<&CompilerIdentity> {
        self.compilers.get(name).map(|c| &c.identity)
    }

    /// The compiler names this executor will run.
    pub fn available(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.compilers.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Every compiler offered, by name, with the identity a job must name to run on it:
    /// for the server's start-up log and for refusals.
    pub fn offers(&self) -> Vec<(&str, &CompilerIdentity)> {
        let mut v: Vec<_> = self
            .compilers
            .iter()
            .map(|(n, c)| (n.as_str(), &c.identity))
            .collect();
        v.sort_unstable_by_key(|(n, _)| *n);
        v
    }

    /// The compiler that runs `desc`: the offered one whose identity equals the job's,
    /// the one of the requested name first (so a name that runs in another driver mode,
    /// `clang++`, keeps it when offered), else any (`cc` for `gcc`: one binary). The name
    /// alone never selects a compiler.
    fn select(&self, desc: &JobDesc) -> Result<&Compiler, ExecError> {
        if desc.compiler.contains('/') {
            // distcc's CVE-2004-2687: a client that picks a path picks the program.
            return Err(ExecError::CompilerPath(desc.compiler.clone()));
        }
        let wanted = desc.identity.as_ref().ok_or(ExecError::NoIdentity)?;
        if let Some(c) = self.compilers.get(&desc.compiler) {
            if &c.identity == wanted {
                return Ok(c);
            }
        }
        let offers = self.offers();
        if let Some((name, _)) = offers.iter().find(|(_, id)| *id == wanted) {
            if let Some(c) = self.compilers.get(*name) {
                return Ok(c);
            }
        }
        // Named in full for a person; bounded, so a server with many compilers still
        // sends a short ABORT.
        let mut offered: Vec<String> = offers
            .iter()
            .take(8)
            .map(|(n, id)| format!("{n} = {id}"))
            .collect();
        if offers.len() > 8 {
            offered.push(format!("and {} more", offers.len() - 8));
        }
        if offered.is_empty() {
            offered.push("no compiler".into());
        }
        Err(ExecError::NoMatchingCompiler {
            requested: desc.compiler.clone(),
            wanted: Box::new(wanted.clone()),
            offered: offered.join("; "),
        })
    }
}

/// Feeds the locale variables, length-prefixed so no two lists hash alike. An empty list
/// feeds nothing.
fn hash_locale(h: &mut blake3::Hasher, locale: &[(String, String)]) {
    for (k, v) in locale {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
}

/// The identity results are stored under: the compiler's path, the identity jobs are
/// matched on (its version line, target, and the digest of the driver, `cc1`, `cc1plus`
/// and `as`: any upgrade changes it), and the locale diagnostics are written in.
fn store_binding(
    path: &Path,
    identity: &CompilerIdentity,
    locale: &[(String, String)],
) -> CompilerId {
    let mut h = blake3::Hasher::new_derive_key("dcache 2026-12 compiler store binding v1");
    for part in [
        path.as_os_str().as_encoded_bytes(),
        identity.version.as_bytes(),
        identity.target.as_bytes(),
        &identity.digest,
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hash_locale(&mut h, locale);
    CompilerId(*h.finalize().as_bytes())
}

impl Executor for LocalExecutor {
    fn identity_of(&self, name: &str) -> Option<CompilerIdentity> {
        self.job_identity(name).cloned()
    }

    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError> {
        let compiler = self.select(desc)?;
        // Preprocessed C, C++ and assembler (`.S` after the client's preprocessor): none
        // has directives left that read the server's files but through the assembler's
        // `.incbin`/`.include`, which inline asm in C has too (the sandbox's to contain).
        if !matches!(
            desc.language.as_str(),
            "cpp-output" | "c++-cpp-output" | "assembler"
        ) {
            return Err(ExecError::Language(desc.language.clone()));
        }
        args::check(&desc.args).map_err(ExecError::OptionRefused)?;
        Ok(compiler.id)
    }

    fn compile(&self, desc: JobDesc, source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture {
        // The very compiler `check` names: selected again by the job's identity.
        let checked = self.check(&desc).and_then(|_| self.select(&desc).cloned());
        let config = self.config.clone();
        Box::pin(async move {
            let compiler = checked?;
            let limit = config.time_limit;
            tokio::time::timeout(limit, run(compiler, desc, source, config))
                .await
                .map_err(|_| ExecError::Timeout(limit))?
        })
    }
}

async fn run(
    compiler: Compiler,
    desc: JobDesc,
    mut source: mpsc::UnboundedReceiver<Bytes>,
    config: LocalExecutorConfig,
) -> Result<JobResult, ExecError> {
    let dir = tempfile::Builder::new().prefix("dcache-job-").tempdir()?;
    let assembly = desc.args.iter().any(|a| a == "-S");
    let out_name = if assembly { "out.s" } else { "out.o" };
    let out_path = dir.path().join(out_name);
    let mut argv: Vec<std::ffi::OsString> =
        args::compiler_args(&desc.args).map(Into::into).collect();
    argv.extend(["-x".into(), desc.language.clone().into(), "-".into()]);
    argv.extend(["-o".into(), out_path.clone().into_os_string()]);
    let limits = config.limits;
    let mut resources = limits.resources;
    // The CPU limit never exceeds the wall-clock one.
    resources.cpu_seconds = resources
        .cpu_seconds
        .min(config.time_limit.as_secs().max(1));
    let mut command = match &config.sandbox {
        Some(sandbox) => Command::from(sandbox.command(
            &compiler.path,
            &argv,
            &Policy {
                toolchain: &compiler.toolchain,
                job_dir: dir.path(),
                limits: resources,
            },
        )),
        None => {
            let mut c = Command::new(&compiler.path);
            c.args(&argv);
            c
        }
    };
    command
        .current_dir(config.workdir.as_deref().unwrap_or(dir.path()))
        .env_clear()
        .env("PATH", &config.path)
        .env("TMPDIR", dir.path());
    if config.locale.is_empty() {
        command.env("LC_ALL", "C");
    } else {
        command.envs(config.locale.iter().map(|(k, v)| (k, v)));
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: whatever the compiler starts is killed with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = super::busy::retry_async(|| command.spawn()).await?;
    let mut tree = ProcessTree::new(child.id());
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ExecError::Io(std::io::Error::other(
            "compiler pipes missing",
        )));
    };
    // Read both outputs while feeding stdin, so a chatty compiler cannot block on a full
    // pipe while we block on its full stdin; each is capped so a flood cannot pin memory.
    let out_task = tokio::spawn(read_capped(stdout, limits.max_stdout, "stdout"));
    let err_task = tokio::spawn(read_capped(stderr, limits.max_stderr, "stderr"));
    let status = {
        let feed = async {
            while let Some(chunk) = source.recv().await {
                if stdin.write_all(&chunk).await.is_err() {
                    // The compiler stopped reading: it exited before the end (it failed
                    // before parsing, or died; gcc and clang parse only after EOF).
                    return;
                }
            }
            let _ = stdin.shutdown().await;
            drop(stdin);
        };
        tokio::pin!(feed);
        let mut fed = false;
        loop {
            tokio::select! {
                status = child.wait() => break status?,
                () = &mut feed, if !fed => fed = true,
            }
        }
    };
    // Nothing of the compile outlives it, even a process that left its pipes open.
    tree.kill();
    let stdout = out_task.await.unwrap_or_default();
    let stderr = err_task.await.unwrap_or_default();
    let exit_code = super::super::exit_code(status);
    if config.sandbox.is_some() {
        if let Some(why) = crate::sandbox::setup_failure(exit_code, &stderr) {
            return Err(ExecError::Sandbox(why));
        }
    }
    let outputs = if exit_code == 0 {
        // The main output must be there; a compiler that exits 0 without it is broken.
        tokio::fs::metadata(&out_path).await?;
        collect_outputs(dir.path(), resources.file_size).await?
    } else {
        Vec::new()
    };
    Ok(JobResult {
        exit_code,
        stdout: Bytes::from(stdout),
        stderr: Bytes::from(stderr),
        outputs,
    })
}

/// The contents of the regular file `path` (not a link, not a device), or `None` if it
/// is something else; an error if it is larger than `max_size`.
async fn read_output(path: PathBuf, max_size: u64) -> Result<Option<Vec<u8>>, ExecError> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path);
        let file = match file {
            Ok(f) => f,
            // ELOOP: a symlink; not an output.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
                return Ok(None);
            }
            Err(e) => return Err(ExecError::Io(e)),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        if meta.len() > max_size {
            return Err(ExecError::OutputTooLarge {
                size: meta.len(),
                limit: max_size,
            });
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        // Read at most one byte past the limit: a file still growing cannot pin memory.
        file.take(max_size + 1).read_to_end(&mut data)?;
        if data.len() as u64 > max_size {
            return Err(ExecError::OutputTooLarge {
                size: data.len() as u64,
                limit: max_size,
            });
        }
        Ok(Some(data))
    })
    .await
    .map_err(|e| ExecError::Io(std::io::Error::other(e)))?
}

/// Every `out.*` file the compile left in its directory, named by extension (`.o` or `.s`,
/// and side outputs such as `.dwo` from `-gsplit-dwarf`), sorted so results are
/// deterministic. Names are labels, never paths: the client decides where they land.
async fn collect_outputs(dir: &Path, max_size: u64) -> Result<Vec<OutputFile>, ExecError> {
    let mut outputs = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(e) = entries.next_entry().await? {
        let name = e.file_name();
        let Some(ext) = name.to_str().and_then(|n| n.strip_prefix("out.")) else {
            continue;
        };
        if ext.is_empty() {
            continue;
        }
        // Opened without following a symlink and checked through the open file, so a
        // process that outlived the compile cannot swap in a link to a server file
        // between the check and the read.
        let Some(data) = read_output(e.path(), max_size).await? else {
            continue;
        };
        outputs.push(OutputFile {
            name: format!(".{ext}"),
            data: Bytes::from(data),
        });
    }
    outputs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(outputs)
}
