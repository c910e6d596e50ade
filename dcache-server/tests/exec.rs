//! Compiler execution: real gcc through `LocalExecutor`, stand-in compiler scripts for
//! the streaming, early-exit, time-limit and refusal paths, and the fake executor.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::testing::reference_compile;
use dcache_proto::{CacheKey, CompilerIdentity, JobDesc};
use dcache_server::exec::{
    Compile, ExecError, Executor, FakeExecutor, FakeFailure, Fed, LocalExecutor,
    LocalExecutorConfig, store_key,
};

/// A guard against hangs only; nothing here asserts speed.
const HANG: Duration = Duration::from_secs(120);

fn desc(compiler: &str, args: &[&str]) -> JobDesc {
    JobDesc {
        compiler: compiler.into(),
        language: "cpp-output".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        source_len: None,
        identity: None,
    }
}

/// [`desc`] naming the identity `ex` offers under `compiler`: what a client of that very
/// compiler sends.
fn job(ex: &LocalExecutor, compiler: &str, args: &[&str]) -> JobDesc {
    JobDesc {
        identity: ex.job_identity(compiler).cloned(),
        ..desc(compiler, args)
    }
}

fn gcc() -> LocalExecutor {
    let ex = LocalExecutor::new(LocalExecutorConfig::default());
    assert!(ex.available().contains(&"gcc"), "gcc must be installed");
    ex
}

/// `gcc -E -g` of `text`, as a client would send it. With `-g` the preprocessor records
/// the client's directory in a line marker, and gcc takes `DW_AT_comp_dir` from it rather
/// than from wherever the compile runs; without it a remote `-g` object would name the
/// server's temporary directory.
fn preprocess(dir: &Path, text: &str) -> Bytes {
    let src = dir.join("unit.c");
    std::fs::write(&src, text).unwrap();
    let out = std::process::Command::new("gcc")
        .arg("-E")
        .arg("-g")
        .arg(&src)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    Bytes::from(out.stdout)
}

/// A local `gcc <args> -x cpp-output unit.i -o out.<ext>`: (status, stderr, output).
fn gcc_local(pre: &[u8], args: &[&str], ext: &str) -> (i32, Vec<u8>, Option<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("unit.i");
    let output = dir.path().join(format!("out.{ext}"));
    std::fs::write(&input, pre).unwrap();
    let out = std::process::Command::new("gcc")
        .args(args)
        .arg("-x")
        .arg("cpp-output")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stderr,
        std::fs::read(&output).ok(),
    )
}

const PROGRAM: &str = "#include <stdio.h>\n#include <string.h>\n\
    static int square(int x) { return x * x; }\n\
    int main(int argc, char **argv) {\n\
        printf(\"%d %zu\\n\", square(argc), strlen(argv[0]));\n\
        return 0;\n\
    }\n";

/// Feeds `source` in `chunk`-byte pieces, yielding between them so the compiler really
/// receives them one by one, then waits for the result.
async fn compile_in_chunks(
    ex: &dyn Executor,
    d: JobDesc,
    source: &Bytes,
    chunk: usize,
) -> Result<dcache_proto::JobResult, ExecError> {
    let mut c = Compile::start(ex, d);
    for piece in source.chunks(chunk) {
        assert_eq!(c.feed(source.slice_ref(piece)), Fed::Accepted);
        tokio::task::yield_now().await;
    }
    c.end_source();
    tokio::time::timeout(HANG, c.wait()).await.unwrap()
}

#[tokio::test]
async fn streamed_gcc_compile_matches_a_local_compile_byte_for_byte() {
    let work = tempfile::tempdir().unwrap();
    let pre = preprocess(work.path(), PROGRAM);
    assert!(pre.len() > 16 * 1024, "several pipe-fulls of source");
    let ex = gcc();
    let r = compile_in_chunks(&ex, job(&ex, "gcc", &["-O2", "-g", "-c"]), &pre, 1000)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, ".o");
    let (code, _, local) = gcc_local(&pre, &["-O2", "-g", "-c"], "o");
    assert_eq!(code, 0);
    assert!(
        local.as_deref() == Some(&r.outputs[0].data[..]),
        "the remote object differs from a local gcc -c"
    );
}

#[tokio::test]
async fn an_assembly_job_returns_the_s_file() {
    let work = tempfile::tempdir().unwrap();
    let pre = preprocess(work.path(), PROGRAM);
    let ex = gcc();
    let r = compile_in_chunks(&ex, job(&ex, "gcc", &["-O1", "-S"]), &pre, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    let (_, _, local) = gcc_local(&pre, &["-O1", "-S"], "s");
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, ".s");
    assert!(local.as_deref() == Some(&r.outputs[0].data[..]));
}

#[tokio::test]
async fn split_dwarf_returns_the_dwo_beside_the_object() {
    let work = tempfile::tempdir().unwrap();
    let pre = preprocess(work.path(), PROGRAM);
    let ex = gcc();
    let r = compile_in_chunks(
        &ex,
        job(&ex, "gcc", &["-g", "-gsplit-dwarf", "-c"]),
        &pre,
        8192,
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, [".dwo", ".o"]);
}

#[tokio::test]
async fn a_compile_error_returns_gccs_stderr_and_status() {
    let work = tempfile::tempdir().unwrap();
    let pre = preprocess(work.path(), "int main(void) { return nope; }\n");
    let ex = gcc();
    let r = compile_in_chunks(&ex, job(&ex, "gcc", &["-c"]), &pre, 100)
        .await
        .unwrap();
    let (code, stderr, _) = gcc_local(&pre, &["-c"], "o");
    assert_ne!(r.exit_code, 0);
    assert_eq!(r.exit_code, code);
    assert_eq!(
        String::from_utf8_lossy(&r.stderr),
        String::from_utf8_lossy(&stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("nope"));
    assert!(r.outputs.is_empty());
}

#[tokio::test]
async fn gcc_failing_before_the_upload_ends_is_noticed_at_once() {
    let work = tempfile::tempdir().unwrap();
    let pre = preprocess(work.path(), PROGRAM);
    // Passes the allow-list (a word for -std=) but gcc's driver rejects it before reading any
    // source.
    let ex = gcc();
    let mut c = Compile::start(&ex, job(&ex, "gcc", &["-std=no-such-std", "-c"]));
    assert_eq!(c.feed(pre.slice(..100)), Fed::Accepted);
    // The upload is still open: the result must come anyway.
    let r = tokio::time::timeout(HANG, c.wait()).await.unwrap().unwrap();
    assert_ne!(r.exit_code, 0);
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-such-std"));
    assert_eq!(c.feed(pre.slice(100..)), Fed::SourceEnded);
}

/// A directory holding an executable `cc` script, used as an allow-listed compiler.
/// What a stand-in compiler answers to the identity probe's other questions (its target,
/// its helper programs: none), as a real driver would.
const PROBE_ANSWERS: &str =
    "case \"$1\" in -dumpmachine) echo stand-in; exit 0;; -print-prog-name=*) exit 0;; esac\n";

struct Script {
    dir: tempfile::TempDir,
}

impl Script {
    fn new(body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Self { dir };
        s.write(body);
        s
    }

    fn write(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("cc");
        let text = format!(
            "#!/bin/sh\n{PROBE_ANSWERS}case \"$1\" in --version) echo 'stand-in cc 1.0'; exit 0;; esac\n{body}\n"
        );
        // Written beside and renamed, so a running copy is never modified in place.
        let tmp = self.dir.path().join("cc.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn executor(&self, time_limit: Duration) -> LocalExecutor {
        let ex = LocalExecutor::new(LocalExecutorConfig {
            allowed: vec!["cc".into(), "/bin/sh".into()],
            time_limit,
            path: format!("{}:/usr/bin:/bin", self.dir.path().display()),
            ..LocalExecutorConfig::default()
        });
        // A path in the allow-list itself is ignored too.
        assert_eq!(ex.available(), ["cc"]);
        ex
    }
}

#[tokio::test]
async fn the_compiler_reads_each_chunk_as_it_arrives() {
    // Reads exactly the first chunk, reports it, and exits: possible only if that chunk
    // reached its stdin while the upload was still open.
    let script = Script::new("head -c 6 >/dev/null; echo 'got the first chunk' >&2; exit 3");
    let ex = script.executor(HANG);
    let mut c = Compile::start(&ex, job(&ex, "cc", &["-c"]));
    assert_eq!(c.feed(Bytes::from_static(b"chunk1")), Fed::Accepted);
    let r = tokio::time::timeout(HANG, c.wait()).await.unwrap().unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(&r.stderr[..], b"got the first chunk\n");
    assert_eq!(c.feed(Bytes::from_static(b"chunk2")), Fed::SourceEnded);
}

#[tokio::test]
async fn feed_reports_a_compiler_that_already_exited() {
    let script = Script::new("exit 4");
    let ex = script.executor(HANG);
    let mut c = Compile::start(&ex, job(&ex, "cc", &["-c"]));
    tokio::time::timeout(HANG, async {
        while !c.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(c.feed(Bytes::from_static(b"late")), Fed::Finished);
    assert_eq!(c.wait().await.unwrap().exit_code, 4);
    assert!(matches!(c.wait().await, Err(ExecError::ResultTaken)));
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie has been killed and only waits to be reaped.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_compile_past_the_time_limit_is_killed_with_a_clear_error() {
    let script = Script::new("");
    let pidfile = script.marker("pid");
    script.write(&format!(
        "echo $$ > '{}'\nexec sleep 600",
        pidfile.display()
    ));
    let ex = script.executor(Duration::from_millis(500));
    let mut c = Compile::start(&ex, job(&ex, "cc", &["-c"]));
    c.end_source();
    let err = tokio::time::timeout(HANG, c.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ExecError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("time limit"), "{err}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::time::timeout(HANG, async {
        while !process_gone(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the compiler was not killed");
}

#[tokio::test]
async fn dropping_a_compile_kills_the_compiler() {
    let script = Script::new("");
    let pidfile = script.marker("pid");
    script.write(&format!(
        "echo $$ > '{}'\nexec sleep 600",
        pidfile.display()
    ));
    let ex = script.executor(HANG);
    let c = Compile::start(&ex, job(&ex, "cc", &["-c"]));
    let pid: u32 = tokio::time::timeout(HANG, async {
        loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    drop(c); // the client went away
    tokio::time::timeout(HANG, async {
        while !process_gone(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the compiler outlived its job");
}

#[tokio::test]
async fn refused_jobs_get_clear_errors_and_run_nothing() {
    let script = Script::new("");
    let ran = script.marker("ran");
    script.write(&format!("touch '{}'\ncat >/dev/null", ran.display()));
    let ex = script.executor(HANG);
    let cases: Vec<(JobDesc, &str)> = vec![
        (desc("/bin/sh", &["-c"]), "/bin/sh"),
        (desc("../cc", &["-c"]), "../cc"),
        // A name not offered, with an identity no compiler here has.
        (
            JobDesc {
                identity: Some(CompilerIdentity::new("GNU bash 5.2", "", [1; 32])),
                ..desc("bash", &["-c"])
            },
            "bash",
        ),
        // Any job without an identity: which compiler the client meant is unknown.
        (desc("cc", &["-c"]), "does not identify its compiler"),
        (job(&ex, "cc", &["-B/tmp/evil"]), "-B/tmp/evil"),
        (
            job(&ex, "cc", &["-fplugin=/tmp/evil.so"]),
            "-fplugin=/tmp/evil.so",
        ),
        (job(&ex, "cc", &["-specs=/tmp/evil"]), "-specs=/tmp/evil"),
        (job(&ex, "cc", &["@/etc/args"]), "@/etc/args"),
        (job(&ex, "cc", &["-o", "/etc/passwd"]), "-o"),
        (
            job(&ex, "cc", &["-DX=1\n-fplugin=/tmp/evil.so"]),
            "line break",
        ),
        (job(&ex, "cc", &["-DX=\0"]), "NUL"),
        (
            JobDesc {
                args: vec!["-O2".into(); 1001],
                ..job(&ex, "cc", &[])
            },
            "1001 arguments exceed",
        ),
        (
            JobDesc {
                args: vec![format!("-DX={}", "y".repeat(5000))],
                ..job(&ex, "cc", &[])
            },
            "exceeds the limit of 4096",
        ),
        (
            JobDesc {
                language: "c".into(),
                ..job(&ex, "cc", &["-c"])
            },
            "\"c\"",
        ),
    ];
    for (d, named) in cases {
        let e = ex.check(&d).unwrap_err();
        assert!(e.is_refusal(), "{e:?}");
        assert!(e.to_string().contains(named), "{named}: {e}");
        // compile() refuses on its own too, whether or not check() was called.
        let mut c = Compile::start(&ex, d);
        c.feed(Bytes::from_static(b"int x;\n"));
        c.end_source();
        let e = tokio::time::timeout(HANG, c.wait())
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains(named), "{named}: {e}");
    }
    assert!(!ran.exists(), "a refused job ran the compiler");
    // The control: an allowed job does run it.
    let r = compile_in_chunks(&ex, job(&ex, "cc", &["-c"]), &Bytes::from_static(b"x"), 1).await;
    assert!(r.is_err(), "the script writes no object: {r:?}");
    assert!(ran.exists());
}

#[tokio::test]
async fn a_remembered_identity_is_the_computed_one_and_follows_the_binary() {
    let script = Script::new("cat >/dev/null");
    let calls = script.marker("version-calls");
    // A stand-in whose --version run leaves a trace, so we see when it is computed.
    let body = format!(
        "#!/bin/sh\n{PROBE_ANSWERS}if [ \"$1\" = --version ]; then echo x >> '{}'; echo 'cc 2'; exit 0; fi\ncat >/dev/null\n",
        calls.display()
    );
    let write = |extra: &str| {
        use std::os::unix::fs::PermissionsExt;
        let tmp = script.marker("cc.new");
        std::fs::write(&tmp, format!("{body}{extra}")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, script.marker("cc")).unwrap();
    };
    write("");
    let cache = tempfile::tempdir().unwrap();
    let with_cache = || {
        LocalExecutor::new(LocalExecutorConfig {
            allowed: vec!["cc".into()],
            path: format!("{}:/usr/bin:/bin", script.dir.path().display()),
            identity_cache: Some(cache.path().to_owned()),
            ..LocalExecutorConfig::default()
        })
        .identity("cc")
    };
    let runs = || {
        std::fs::read_to_string(&calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let computed = script.executor(HANG).identity("cc");
    assert!(computed.is_some());
    let before = runs();
    assert_eq!(
        with_cache(),
        computed,
        "the first start computes and remembers"
    );
    assert_eq!(runs(), before + 1);
    assert_eq!(with_cache(), computed, "the next one remembers");
    assert_eq!(runs(), before + 1, "without running the compiler");
    // A new binary is a new identity, computed again.
    write("# upgraded\n");
    let upgraded = with_cache();
    assert_ne!(upgraded, computed);
    assert_eq!(upgraded, script.executor(HANG).identity("cc"));
}

#[tokio::test]
async fn the_compiler_identity_changes_with_the_binary() {
    let script = Script::new("cat >/dev/null");
    let before = script.executor(HANG).identity("cc").unwrap();
    assert_eq!(script.executor(HANG).identity("cc"), Some(before), "stable");
    script.write("cat >/dev/null # upgraded");
    let after = script.executor(HANG).identity("cc").unwrap();
    assert_ne!(before, after);
    let key = CacheKey::from_bytes([7; 32]);
    assert_ne!(store_key(&before, &key), store_key(&after, &key));
    // The identity is what check() hands out for the store key.
    let ex = script.executor(HANG);
    assert_eq!(ex.check(&job(&ex, "cc", &["-c"])).unwrap(), after);
    assert_eq!(gcc().identity("gcc"), gcc().identity("gcc"));
    assert_ne!(gcc().identity("gcc"), Some(after));
}

#[tokio::test(start_paused = true)]
async fn the_fake_compiles_deterministically_in_its_configured_time() {
    let fake = FakeExecutor::new(Duration::from_secs(3));
    let d = desc("gcc", &["-O2", "-c"]);
    let source = Bytes::from(vec![b'x'; 40_000]);
    let t0 = tokio::time::Instant::now();
    let r = compile_in_chunks(&fake, d.clone(), &source, 4096)
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert_eq!(r, reference_compile(&d, &source));
    assert_eq!(r.outputs[0].data.len(), 40_000 / 4 + 32);

    let small = fake.clone().with_output_divisor(100);
    let r2 = compile_in_chunks(&small, d.clone(), &source, 4096)
        .await
        .unwrap();
    assert_eq!(r2.outputs[0].data.len(), 40_000 / 100 + 32);
    assert_eq!(r2.outputs[0].data[..32], r.outputs[0].data[..32]);
    let other = compile_in_chunks(&fake, d, &Bytes::from(vec![b'y'; 40_000]), 4096)
        .await
        .unwrap();
    assert_ne!(other.outputs[0].data, r.outputs[0].data);
}

#[tokio::test(start_paused = true)]
async fn the_fake_fails_as_configured() {
    let d = desc("gcc", &["-c"]);
    let fake = FakeExecutor::new(Duration::from_secs(1));

    let failing = fake
        .clone()
        .with_failure(FakeFailure::CompileError { early: false });
    let r = compile_in_chunks(&failing, d.clone(), &Bytes::from_static(b"int x;"), 2)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(r.outputs.is_empty());

    // Early: the result arrives with the upload still open.
    let early = fake
        .clone()
        .with_failure(FakeFailure::CompileError { early: true });
    let mut c = Compile::start(&early, d.clone());
    c.feed(Bytes::from_static(b"int x;"));
    let r = tokio::time::timeout(HANG, c.wait()).await.unwrap().unwrap();
    assert_eq!(r.exit_code, 1);

    let crash = fake.clone().with_failure(FakeFailure::Crash);
    let e = compile_in_chunks(&crash, d.clone(), &Bytes::from_static(b"int x;"), 2)
        .await
        .unwrap_err();
    assert!(!e.is_refusal());

    let e = fake.check(&desc("gcc", &["-B/x"])).unwrap_err();
    assert!(e.to_string().contains("-B/x"));
    assert!(fake.check(&desc("/usr/bin/gcc", &[])).is_err());
}

#[tokio::test]
async fn an_output_that_is_a_symlink_is_never_read() {
    // A compiler (or a process it left behind) that puts a link to a server file where
    // an output would be: the link is not an output, and the file never comes back.
    let secret = tempfile::tempdir().unwrap();
    let secret_file = secret.path().join("key");
    std::fs::write(&secret_file, "SERVER-ONLY-SECRET").unwrap();
    let script = Script::new(&format!(
        "cat >/dev/null; for a; do last=$a; done; d=$(dirname \"$last\"); \
         echo object > \"$last\"; ln -s {} \"$d/out.dwo\"",
        secret_file.display()
    ));
    let ex = script.executor(HANG);
    let r = compile_in_chunks(
        &ex,
        job(&ex, "cc", &["-c"]),
        &Bytes::from_static(b"int x;\n"),
        64,
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, [".o"]);
    assert!(
        r.outputs
            .iter()
            .all(|o| !o.data.starts_with(b"SERVER-ONLY"))
    );
}
