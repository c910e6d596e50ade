//! Depend mode, for the local cache (as ccache's): a miss compiles the original source
//! here, as the user's command line says, and records the direct-mode entry from the
//! compiler's own dependency output, instead of preprocessing first and compiling the
//! preprocessed text.
//!
//! Why: no second preprocessor run on a miss, and the object is the one plain gcc makes,
//! byte for byte, even with `-g` (compiling preprocessed text shifts the DWARF column
//! numbers of code that came from macro expansions). It applies with the embedded back
//! end only (a server compiles preprocessed text, and a remote cache must not hold what
//! it cannot verify) and without `DCACHE_BASEDIR` (the object names this checkout's
//! paths, so it is not for another checkout: those compiles take the preprocessor path,
//! whose rewritten text can be shared).
//!
//! What the entry records, for soundness:
//! - every file the compile read, hashed: the dependency file lists them. With `-MD` (or
//!   no dependency option: then the wrapper adds `-MD -MF TEMP`) the list is complete.
//!   With `-MMD`, the user's file (written by gcc, untouched) leaves out system headers,
//!   so the list is completed by following every literal header name from the listed
//!   files to the file each lookup finds, transitively, in branches not taken too: a
//!   superset of what was read (a computed `#include MACRO` on the way cannot be
//!   followed, and is not recorded);
//! - every header lookup's candidates ([`super::lookups`]), as in direct mode;
//! - the result's key binds the direct key and all of the above
//!   ([`Entry::depend_key`]), and the store binds the compiler's identity.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use bytes::Bytes;
use dcache_proto::{CacheKey, JobDesc, JobResult, OutputFile};

use super::args::{CompilePlan, Mode};
use super::backend::Backend;
use super::config::Config;
use super::direct::{DirectKey, Entry, Sources, included_files};
use super::include_dirs::{SearchDirs, search_dirs};
use super::local::exit_code;
use super::lookups::{self, Probe, forced_includes};

/// Largest object kept in the cache; anything larger is only the user's.
const MAX_OBJECT_BYTES: u64 = 512 << 20;

/// Most files a `-MMD` closure may reach before the entry is not recorded.
const MAX_CLOSURE: usize = 20_000;

/// What the command line asks for in dependency output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deps {
    /// Nothing: the wrapper asks for a complete list in a temporary file.
    None,
    /// `-MD`: the user's file lists every file read.
    Full,
    /// `-MMD`: the user's file leaves out system headers.
    User,
}

impl Deps {
    /// `None` for command lines depend mode leaves to the preprocessor path (`-M`/`-MM`
    /// next to `-MD`, whose combined output is not worth reasoning about).
    fn of(args: &[OsString]) -> Option<Self> {
        let has = |f: &str| args.iter().any(|a| a == f);
        if has("-M") || has("-MM") {
            return None;
        }
        Some(if has("-MMD") {
            Self::User
        } else if has("-MD") {
            Self::Full
        } else {
            Self::None
        })
    }
}

/// Whether a miss takes depend mode: the embedded back end, no base directory, and a
/// command line whose dependency options it handles.
pub fn applies(config: &Config, backend: &Backend, args: &[OsString]) -> bool {
    !backend.is_remote() && config.base_dir.is_none() && Deps::of(args).is_some()
}

/// The search directories of `plan`'s compile (cached in `DCACHE_DIR/include-dirs`).
fn dirs_for(config: &Config, plan: &CompilePlan) -> Option<SearchDirs> {
    let cwd = std::env::current_dir().ok()?;
    search_dirs(
        &config.dir.join("include-dirs"),
        &plan.compiler,
        plan.language,
        &plan.preprocess_args,
        &cwd,
    )
}

/// The entry for a compile that went the preprocessor way: the files its line markers
/// name, and its lookups.
pub fn record_preprocessed(
    config: &Config,
    plan: &CompilePlan,
    key: CacheKey,
    dep_file: Option<Vec<u8>>,
    preprocessed: &[u8],
    started: SystemTime,
) -> Option<Entry> {
    let files = included_files(preprocessed)?;
    let dirs = dirs_for(config, plan)?;
    let forced = forced_includes(&plan.preprocess_args);
    Entry::record(
        key,
        dep_file,
        Sources {
            main: &plan.input,
            files,
            dirs: &dirs,
            forced: &forced,
            started,
        },
        false,
    )
}

/// Compiles `compiler args` here, as given (plus a temporary dependency file when the
/// command line asks for none), prints what the compiler printed, and on success stores
/// the result and records the entry under `dk` (best effort: a compile that cannot be
/// recorded is still the user's compile). Returns the exit code.
#[allow(clippy::too_many_arguments)] // the compile's whole context, passed once
pub async fn compile(
    config: &Config,
    backend: &Backend,
    compiler: &OsString,
    args: &[OsString],
    plan: &CompilePlan,
    desc: &JobDesc,
    dk: DirectKey,
    started: SystemTime,
) -> i32 {
    let deps = Deps::of(args).unwrap_or(Deps::None);
    let temp = match deps {
        Deps::None => match tempfile::Builder::new()
            .prefix("dcache-deps-")
            .suffix(".d")
            .tempfile()
        {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!("depend mode: no temporary file: {e}");
                None
            }
        },
        Deps::Full | Deps::User => None,
    };
    let mut cmd = super::local::compiler_command(compiler);
    cmd.args(args);
    if std::io::stderr().is_terminal()
        && !args
            .iter()
            .any(|a| a.to_string_lossy().contains("diagnostics-color"))
    {
        // Its stderr is a pipe here; the colours a terminal gets, as a direct compile.
        cmd.arg("-fdiagnostics-color=always");
    }
    if let Some(t) = &temp {
        cmd.arg("-MD").arg("-MF").arg(t.path());
    }
    let out = match cmd.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dcache: cannot run {}: {e}", compiler.to_string_lossy());
            return 1;
        }
    };
    let _ = std::io::stdout().lock().write_all(&out.stdout);
    let _ = std::io::stderr().lock().write_all(&out.stderr);
    let code = exit_code(out.status);
    if code != 0 {
        backend.count_local_compile();
        return code;
    }
    let dep_path = match &temp {
        Some(t) => Some(t.path().to_path_buf()),
        None => plan.dep_file.clone(),
    };
    let recorded = match dep_path {
        Some(p) => record(config, plan, deps, &p, dk, started),
        None => None,
    };
    let Some(mut entry) = recorded else {
        tracing::debug!(
            "{}: depend mode compiled, not recorded",
            plan.input.display()
        );
        backend.count_local_compile();
        return 0;
    };
    let Some(object) = read_output(&plan.output) else {
        backend.count_local_compile();
        return 0;
    };
    // This compile ran here, in the user's directory: its diagnostics are exact. Kept in
    // the entry, they are what the next identical compile replays; without them, a result
    // with warnings is one no backend vouches for, and every warm build would compile the
    // file again (bzip2.c with Debian's flags did). Not when a terminal got colours.
    if !out.stderr.is_empty() && !std::io::stderr().is_terminal() {
        entry.stderr = Some(out.stderr.clone());
    }
    let result = JobResult {
        exit_code: 0,
        stdout: Bytes::from(out.stdout),
        stderr: Bytes::from(out.stderr),
        outputs: vec![OutputFile {
            name: match plan.mode {
                Mode::Assembly => ".s".into(),
                _ => ".o".into(),
            },
            data: Bytes::from(object),
        }],
    };
    match backend.store_local(desc, entry.key, &result).await {
        Ok(()) => {
            tracing::debug!(
                "{}: depend mode compiled and recorded ({} files, {} lookups)",
                plan.input.display(),
                entry.files.len(),
                entry.probes.len()
            );
            super::flow::record_manifest(config, dk, entry);
        }
        Err(e) => tracing::debug!("depend mode: {e}"),
    }
    0
}

/// The compiled output, if it is a regular file (not `/dev/null`) of a plausible size.
fn read_output(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_OBJECT_BYTES {
        return None;
    }
    std::fs::read(path).ok()
}

/// The entry for a depend-mode compile, its key computed from what it records.
fn record(
    config: &Config,
    plan: &CompilePlan,
    deps: Deps,
    dep_path: &Path,
    dk: DirectKey,
    started: SystemTime,
) -> Option<Entry> {
    let dep_text = std::fs::read(dep_path).ok()?;
    let listed = prerequisites(&dep_text)?;
    let dirs = dirs_for(config, plan)?;
    let forced = forced_includes(&plan.preprocess_args);
    let files = match deps {
        // A header on the way computes a name (glibc's <limits.h> does): the list the
        // compiler itself gives, from one preprocessor run, only then.
        Deps::User => match closure(listed, &dirs, &forced) {
            Some(files) => files,
            None => full_list(plan)?,
        },
        Deps::None | Deps::Full => listed,
    };
    let user_dep = match deps {
        Deps::None => None,
        Deps::Full | Deps::User => Some(dep_text),
    };
    let mut entry = Entry::record(
        CacheKey::from_bytes([0; 32]),
        user_dep,
        Sources {
            main: &plan.input,
            files,
            dirs: &dirs,
            forced: &forced,
            started,
        },
        true,
    )?;
    entry.key = Entry::depend_key(&dk, &entry.files, &entry.probes);
    Some(entry)
}

/// Every file `plan`'s compile reads, from a `-M` run of the preprocessor with the
/// command line's own dependency options left out: the complete list an `-MMD` file
/// lacks, when its closure cannot be followed. `None` if that run fails.
fn full_list(plan: &CompilePlan) -> Option<Vec<PathBuf>> {
    let mut args: Vec<&OsString> = Vec::new();
    let mut skip = false;
    for a in &plan.preprocess_args {
        if std::mem::take(&mut skip) {
            continue;
        }
        let s = a.to_str()?;
        match s {
            "-MD" | "-MMD" | "-MP" | "-MG" => {}
            "-MF" | "-MT" | "-MQ" => skip = true,
            _ if s.starts_with("-MF") || s.starts_with("-MT") || s.starts_with("-MQ") => {}
            _ => args.push(a),
        }
    }
    let out = Command::new(&plan.compiler)
        .envs(super::masquerade::depth_env())
        .args(args)
        .arg("-M")
        .arg("-x")
        .arg(plan.language.source())
        .arg(&plan.input)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    prerequisites(&out.stdout)
}

/// The prerequisites of the first rule of a dependency file as gcc writes it (`\ ` for a
/// space, `\#`, `$$`, backslash-newline between names). `None` for anything else (a
/// backslash it does not escape makes names ambiguous) or no rule.
pub fn prerequisites(text: &[u8]) -> Option<Vec<PathBuf>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut tokens: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut rule_done = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') => {
                    if !cur.is_empty() {
                        tokens.push(std::mem::take(&mut cur));
                    }
                }
                Some(' ') => cur.push(' '),
                Some('#') => cur.push('#'),
                _ => return None,
            },
            '$' if chars.peek() == Some(&'$') => {
                chars.next();
                cur.push('$');
            }
            ' ' | '\t' => {
                if !cur.is_empty() {
                    tokens.push(std::mem::take(&mut cur));
                }
            }
            '\n' => {
                rule_done = true;
                break;
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    if !rule_done && tokens.is_empty() {
        return None;
    }
    let colon = tokens.iter().position(|t| t.ends_with(':'))?;
    let files: Vec<PathBuf> = tokens[colon + 1..].iter().map(PathBuf::from).collect();
    (!files.is_empty()).then_some(files)
}

/// The files `listed` (an `-MMD` list) may have read: the listed ones, and every regular
/// file at a candidate of a lookup in any of them, transitively. `None` when a file on
/// the way names a header through a macro, or has a lookup that cannot be known.
fn closure(listed: Vec<PathBuf>, dirs: &SearchDirs, forced: &[String]) -> Option<Vec<PathBuf>> {
    let mut seen: HashSet<PathBuf> = listed.iter().cloned().collect();
    let mut files = listed;
    let mut queue: Vec<PathBuf> = files.clone();
    let mut candidates: BTreeSet<PathBuf> = BTreeSet::new();
    if !forced.is_empty() {
        // Forced includes are looked up like `#include "..."` from the working directory.
        let names = lookups::Names {
            names: forced
                .iter()
                .map(|f| lookups::Name {
                    quoted: true,
                    next: false,
                    name: f.clone(),
                })
                .collect(),
            computed_include: false,
        };
        candidates.extend(lookups::file_candidates(Path::new("forced"), &names, dirs));
    }
    loop {
        for path in std::mem::take(&mut queue) {
            let text = std::fs::read(&path).ok()?;
            let names = lookups::scan(&text)?;
            if names.computed_include {
                tracing::debug!("depend mode: {} computes a header name", path.display());
                return None;
            }
            candidates.extend(lookups::file_candidates(&path, &names, dirs));
        }
        for c in std::mem::take(&mut candidates) {
            if !seen.contains(&c) && Probe::at(&c) == Probe::File {
                seen.insert(c.clone());
                files.push(c.clone());
                queue.push(c);
            }
        }
        if files.len() > MAX_CLOSURE {
            return None;
        }
        if queue.is_empty() {
            return Some(files);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prerequisites_are_read_as_gcc_writes_them() {
        let d = b"x.o: x.c /usr/include/stdio.h \\\n inc/a\\ b.h inc/c\\#.h \\\n inc/$$d.h\nx.c:\n";
        assert_eq!(
            prerequisites(d),
            Some(
                [
                    "x.c",
                    "/usr/include/stdio.h",
                    "inc/a b.h",
                    "inc/c#.h",
                    "inc/$d.h"
                ]
                .map(PathBuf::from)
                .to_vec()
            )
        );
        assert_eq!(prerequisites(b"x.o: x.c w\\eird.h\n"), None);
        assert_eq!(prerequisites(b""), None);
        assert_eq!(prerequisites(b"no rule here\n"), None);
    }

    #[test]
    fn dependency_styles() {
        let of = |a: &[&str]| Deps::of(&a.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(of(&["-c", "x.c"]), Some(Deps::None));
        assert_eq!(of(&["-MD", "-c", "x.c"]), Some(Deps::Full));
        assert_eq!(of(&["-MMD", "-c", "x.c"]), Some(Deps::User));
        assert_eq!(of(&["-MD", "-MMD", "-c", "x.c"]), Some(Deps::User));
        assert_eq!(of(&["-M", "-MD", "-c", "x.c"]), None);
    }
}
