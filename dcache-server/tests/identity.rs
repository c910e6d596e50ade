//! Compiler identity with really different compilers installed (Debian's gcc-12, gcc-11
//! when present, clang, and a `gcc` wrapper script): one compiler by any path, another
//! by its bytes, and a job runs only on the compiler of its identity, whatever its name.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::{CompilerIdentity, JobDesc, JobResult};
use dcache_server::exec::identity::{probe, probe_cached};
use dcache_server::exec::{Compile, ExecError, Executor, LocalExecutor, LocalExecutorConfig};

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
const HANG: Duration = Duration::from_secs(120);

fn id_of(program: &str) -> CompilerIdentity {
    probe(Path::new(program), PATH).unwrap()
}

/// gcc-11 when this machine has it (`.ci/run` installs it).
fn gcc11() -> Option<&'static str> {
    Path::new("/usr/bin/gcc-11")
        .exists()
        .then_some("/usr/bin/gcc-11")
}

/// A script named `gcc` that is not the system's gcc: it adds `-O3`.
fn wrapper_script() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let gcc = dir.path().join("gcc");
    std::fs::write(&gcc, "#!/bin/sh\nexec /usr/bin/gcc -O3 \"$@\"\n").unwrap();
    std::fs::set_permissions(&gcc, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, gcc)
}

#[test]
fn one_compiler_whatever_the_path_another_by_its_bytes() {
    let gcc = id_of("/usr/bin/gcc");
    // Links and names of one binary are one compiler.
    assert_eq!(id_of("/usr/bin/x86_64-linux-gnu-gcc-12"), gcc);
    assert_eq!(id_of("/usr/bin/cc"), gcc);
    assert!(gcc.version.contains("12."), "{gcc}");
    assert_eq!(gcc.target, "x86_64-linux-gnu");
    // Other drivers, other compilers.
    assert_ne!(id_of("/usr/bin/g++"), gcc);
    let clang = id_of("/usr/bin/clang");
    assert_ne!(clang, gcc);
    assert!(clang.version.contains("clang"), "{clang}");
    if let Some(g11) = gcc11() {
        let g11 = id_of(g11);
        assert_ne!(g11, gcc);
        assert!(g11.version.contains("11."), "{g11}");
    }
    // A wrapper says what gcc says (under the name it runs gcc by), but it is not gcc:
    // the digest tells them apart.
    let (_dir, script) = wrapper_script();
    let fake = probe(&script, PATH).unwrap();
    let release = |v: &str| v.split_once(' ').unwrap().1.to_owned();
    assert_eq!(release(&fake.version), release(&gcc.version));
    assert_eq!(fake.target, gcc.target);
    assert_ne!(fake.digest, gcc.digest);
}

fn offering(names: &[&str]) -> LocalExecutor {
    LocalExecutor::new(LocalExecutorConfig {
        allowed: names.iter().map(|s| s.to_string()).collect(),
        ..LocalExecutorConfig::default()
    })
}

/// Preprocessed C, as a client sends it.
const SOURCE: &[u8] = b"int twice(int x) { return 2 * x; }\nint k = 42;\n";

/// The job a client of `identity` sends when it invokes its compiler as `name`.
fn job(name: &str, identity: &CompilerIdentity) -> JobDesc {
    JobDesc {
        compiler: name.into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into()],
        source_len: None,
        identity: Some(identity.clone()),
    }
}

async fn run(ex: &LocalExecutor, d: JobDesc) -> Result<JobResult, ExecError> {
    let mut c = Compile::start(ex, d);
    c.feed(Bytes::from_static(SOURCE));
    c.end_source();
    tokio::time::timeout(HANG, c.wait()).await.unwrap()
}

/// What `program -O2 -c` makes of [`SOURCE`] here, read from stdin as the server does
/// (the object names its input).
fn local_object(program: &str) -> Vec<u8> {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let obj = dir.path().join("u.o");
    let mut child = std::process::Command::new(program)
        .args(["-O2", "-c", "-x", "cpp-output", "-", "-o"])
        .arg(&obj)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(SOURCE).unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read(obj).unwrap()
}

#[tokio::test]
async fn a_job_runs_only_on_the_compiler_of_its_identity() {
    let mut names = vec!["gcc", "clang"];
    if gcc11().is_some() {
        names.push("gcc-11");
    }
    let ex = offering(&names);
    assert_eq!(ex.available().len(), names.len());
    let gcc_obj = local_object("gcc");
    // The client's compiler is named `gcc` in every case: the identity decides.
    let mut cases = vec![("/usr/bin/gcc", "gcc"), ("/usr/bin/clang", "clang")];
    if let Some(g11) = gcc11() {
        cases.push((g11, "gcc-11"));
    }
    for (program, offered_as) in cases {
        let id = id_of(program);
        assert_eq!(ex.job_identity(offered_as), Some(&id));
        let r = run(&ex, job("gcc", &id)).await.unwrap();
        assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        let local = local_object(program);
        assert!(r.outputs[0].data == local, "{program}: not its own object");
        if program != "/usr/bin/gcc" {
            assert!(
                local != gcc_obj,
                "{program} must differ from gcc for this test"
            );
        }
        // Its own store binding: never the same entry as another compiler's.
        let bound = ex.check(&job("gcc", &id)).unwrap();
        assert_eq!(Some(bound), ex.identity(offered_as));
    }
    // A client whose `gcc` is a wrapper script: nothing here is that compiler.
    let (_dir, script) = wrapper_script();
    let fake = probe(&script, PATH).unwrap();
    let e = run(&ex, job("gcc", &fake)).await.unwrap_err();
    assert!(matches!(e, ExecError::NoMatchingCompiler { .. }), "{e:?}");
    assert_eq!(e.error_code(), dcache_proto::ErrorCode::COMPILER_MISMATCH);
    let message = e.to_string();
    let real = id_of("/usr/bin/gcc");
    // Both named: the client's (the script's digest) and the server's.
    assert!(message.contains(&fake.to_string()), "{message}");
    assert!(message.contains(&format!("gcc = {real}")), "{message}");
    // A server offering only gcc-12 refuses gcc-11's jobs, naming both versions.
    if let Some(g11) = gcc11() {
        let only12 = offering(&["gcc"]);
        let e = only12.check(&job("gcc", &id_of(g11))).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("11.3") && m.contains("12.2"), "{m}");
    }
}

/// A stand-in driver whose `cc1` is a file beside it, and which counts its `--version`
/// runs: the remembered identity must follow the helper, not only the driver.
#[test]
fn a_remembered_identity_follows_the_helpers_and_skips_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (cc, cc1, runs) = (
        dir.path().join("cc"),
        dir.path().join("cc1"),
        dir.path().join("runs"),
    );
    std::fs::write(
        &cc,
        format!(
            "#!/bin/sh\ncase \"$1\" in --version) echo x >> '{}'; echo 'stand-in 1';; \
             -dumpmachine) echo stand-in;; -print-prog-name=cc1) echo '{}';; \
             -print-prog-name=*) echo \"${{1#-print-prog-name=}}\";; esac\n",
            runs.display(),
            cc1.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cc, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&cc1, "compiler proper, version 1").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let count = || std::fs::read_to_string(&runs).unwrap().lines().count();
    let first = probe_cached(cache.path(), &cc, PATH).unwrap();
    assert_eq!(first, probe(&cc, PATH).unwrap());
    let runs_so_far = count();
    assert_eq!(probe_cached(cache.path(), &cc, PATH).unwrap(), first);
    assert_eq!(count(), runs_so_far, "a warm probe runs nothing");
    // A new cc1 under the same driver is another compiler.
    std::fs::write(&cc1, "compiler proper, version 2").unwrap();
    let second = probe_cached(cache.path(), &cc, PATH).unwrap();
    assert_ne!(second, first);
    assert_eq!(second, probe(&cc, PATH).unwrap());
}
