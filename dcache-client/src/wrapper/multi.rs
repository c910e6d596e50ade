//! Several sources in one command: `gcc -c a.c b.c c.c` (lz4's library build) becomes
//! one compile per source, run in parallel, each exactly as `gcc -c a.c` would be, so
//! each goes through the cache on its own.
//!
//! What gcc does, and so what this does (checked with gcc 12): every source is
//! compiled even when one fails; each object is named from its source's base name in
//! the current directory (`src/a.c` gives `a.o`), and `-MD` writes `a.d` beside it;
//! diagnostics come in source order; the exit status is non-zero when any compile
//! failed. gcc refuses `-o` with several sources, and a shared `-MF`/`-MT`/`-MQ`
//! would be written by every compile in turn, so such commands, and anything else this
//! cannot split exactly ([`split`] says why not), run locally, unchanged, and gcc
//! answers for itself.
//!
//! Each per-source compile runs as a child process of the wrapper binary (its own
//! backend, direct mode and statistics, as a `make -j` job would), with its output
//! captured and replayed in source order.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::args::{Plan, plan, takes_separate_value};

/// The per-source command lines of a command with several sources, in source order:
/// each is the original with the other sources removed. `None` when the command is not
/// one [`split`] can reproduce exactly (one source; `-o`, `-x`, `-MF`/`-MT`/`-MQ`, a
/// response file, stdin; two sources with one object name; a source that would run
/// locally anyway): run the original command instead.
pub fn split(compiler: &OsStr, args: &[OsString]) -> Option<Vec<Vec<OsString>>> {
    let strs: Vec<&str> = args.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
    let mut sources = Vec::new();
    let mut i = 0;
    while i < strs.len() {
        let a = strs[i];
        if a == "-"
            || a.starts_with('@')
            || a.starts_with("-o")
            || a.starts_with("-x")
            || a.starts_with("-MF")
            || a.starts_with("-MT")
            || a.starts_with("-MQ")
        {
            return None;
        }
        if takes_separate_value(a) {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            sources.push(i);
        }
        i += 1;
    }
    if sources.len() < 2 {
        return None;
    }
    let compiler = compiler.to_os_string();
    let mut jobs = Vec::with_capacity(sources.len());
    let mut outputs: Vec<PathBuf> = Vec::with_capacity(sources.len());
    for &own in &sources {
        let job: Vec<OsString> = args
            .iter()
            .enumerate()
            .filter(|(j, _)| *j == own || !sources.contains(j))
            .map(|(_, a)| a.clone())
            .collect();
        // Every piece must be a distributable compile of exactly that source.
        let Plan::Remote(p) = plan(&compiler, &job) else {
            return None;
        };
        if p.input != Path::new(&args[own]) || outputs.contains(&p.output) {
            return None;
        }
        outputs.push(p.output);
        jobs.push(job);
    }
    Some(jobs)
}

/// What one per-source compile did.
#[derive(Debug)]
struct Done {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `exe compiler JOB…` for every job of [`split`], at most `parallel` at once,
/// then prints each one's output in source order. Returns the exit code: the first
/// non-zero one in source order, as the compiler's is non-zero when any file failed;
/// `None` if a child could not be started at all (the caller then runs the original
/// command, which redoes every file correctly).
pub fn run_split(
    exe: &Path,
    compiler: &OsStr,
    jobs: &[Vec<OsString>],
    parallel: usize,
) -> Option<i32> {
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<std::io::Result<Done>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..parallel.clamp(1, jobs.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let done = Command::new(exe)
                        .arg(compiler)
                        .args(job)
                        .stdin(Stdio::null())
                        .output()
                        .map(|o| Done {
                            code: super::local::exit_code(o.status),
                            stdout: o.stdout,
                            stderr: o.stderr,
                        });
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(done);
                    }
                }
            });
        }
    });
    let mut done = Vec::with_capacity(jobs.len());
    for slot in results {
        match slot.into_inner().ok().flatten() {
            Some(Ok(d)) => done.push(d),
            Some(Err(e)) => {
                tracing::debug!("cannot start {}: {e}; compiling locally", exe.display());
                return None;
            }
            None => return None,
        }
    }
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut code = 0;
    for d in done {
        let _ = out.write_all(&d.stdout);
        let _ = out.flush();
        let _ = err.write_all(&d.stderr);
        if code == 0 {
            code = d.code;
        }
    }
    Some(code)
}

/// How many per-source compiles run at once: the machine's cores, as a compile server
/// defaults to.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(cmd: &str) -> Vec<OsString> {
        cmd.split_whitespace().map(OsString::from).collect()
    }

    fn split_str(cmd: &str) -> Option<Vec<String>> {
        split(OsStr::new("gcc"), &os(cmd)).map(|jobs| {
            jobs.iter()
                .map(|j| {
                    j.iter()
                        .map(|a| a.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        })
    }

    #[test]
    fn each_source_gets_the_command_without_the_others() {
        assert_eq!(
            split_str("-O2 -c src/a.c b.c -I inc -MD c.cpp -DX=1"),
            Some(vec![
                "-O2 -c src/a.c -I inc -MD -DX=1".into(),
                "-O2 -c b.c -I inc -MD -DX=1".into(),
                "-O2 -c -I inc -MD c.cpp -DX=1".into(),
            ])
        );
        // An option's separate value is not a source.
        assert_eq!(
            split_str("-c -include cfg.h a.c b.c").map(|j| j.len()),
            Some(2)
        );
    }

    #[test]
    fn what_cannot_be_split_exactly_is_left_whole() {
        for cmd in [
            "-c a.c",            // one source: the usual path
            "-c a.c b.c -o x.o", // gcc refuses; let it say so
            "-c a.c b.c -ox.o",
            "-c -x c a.inc b.inc",      // the language is positional
            "-c a.c b.c -MD -MF all.d", // one dependency file for all
            "-c a.c b.c -MMD -MTx",
            "-c a.c src/a.c",           // both would write a.o
            "-c a.c b.c -march=native", // runs locally anyway
            "-c a.c b.s",               // not every input is distributable
            "-c a.c b.c @more",         // a response file
            "-c a.c -",                 // stdin
            "a.c b.c -o prog",          // a link
            "-c a.c b.c x.o",           // an object among the inputs
        ] {
            assert_eq!(split_str(cmd), None, "{cmd:?} was split");
        }
    }
}
