//! The kernel sandbox around server-side compiles, attacked the way a hostile client
//! would: through the source (which no option check can stop) and through a program that
//! stands for a command smuggled past the option check. Real gcc, real files, real
//! sockets; every attack is also shown to succeed *without* the sandbox, so these tests
//! cannot pass for want of an attack that works.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::{JobDesc, JobResult};
use dcache_server::exec::{
    Compile, ExecError, ExecLimits, Executor, Fed, LocalExecutor, LocalExecutorConfig, identity,
};
use dcache_server::sandbox::{Policy, ResourceLimits, Sandbox, toolchain};

/// A guard against hangs only; nothing here asserts speed.
const HANG: Duration = Duration::from_secs(120);

fn sandbox() -> Sandbox {
    Sandbox::probe(Path::new(env!("CARGO_BIN_EXE_dcache-sandbox")))
        .expect("this kernel has Landlock: the sandbox must work here")
}

fn executor(sandboxed: bool, limits: ExecLimits) -> LocalExecutor {
    executor_with(sandboxed, limits, SYSTEM_PATH, Vec::new())
}

fn executor_with(
    sandboxed: bool,
    limits: ExecLimits,
    path: &str,
    extra: Vec<PathBuf>,
) -> LocalExecutor {
    let ex = LocalExecutor::new(LocalExecutorConfig {
        sandbox: sandboxed.then(sandbox),
        sandbox_paths: extra,
        limits,
        path: path.into(),
        time_limit: HANG,
        ..LocalExecutorConfig::default()
    });
    assert!(!ex.available().is_empty());
    ex
}

/// Where the system compilers are found.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A job for the system's `compiler`, naming its identity as a client of it would.
fn desc(compiler: &str, args: &[&str]) -> JobDesc {
    identified(desc_unidentified(compiler, args), SYSTEM_PATH)
}

/// A job naming no compiler identity (to be [`identified`] on another path).
fn desc_unidentified(compiler: &str, args: &[&str]) -> JobDesc {
    JobDesc {
        compiler: compiler.into(),
        language: "cpp-output".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        source_len: None,
        identity: None,
    }
}

/// `d` naming the identity of its compiler as found on `path`.
fn identified(d: JobDesc, path: &str) -> JobDesc {
    let program = toolchain::find_on_path(&d.compiler, path).expect("the compiler is installed");
    JobDesc {
        identity: Some(identity::probe(&program, path).unwrap()),
        ..d
    }
}

async fn compile(ex: &dyn Executor, d: JobDesc, source: &[u8]) -> Result<JobResult, ExecError> {
    let mut c = Compile::start(ex, d);
    assert_eq!(c.feed(Bytes::copy_from_slice(source)), Fed::Accepted);
    c.end_source();
    tokio::time::timeout(HANG, c.wait()).await.unwrap()
}

/// `d` compiled unconfined and confined, both with the default limits.
async fn both(d: JobDesc, source: &[u8]) -> (JobResult, JobResult) {
    let (unconfined, confined) = (
        executor(false, ExecLimits::default()),
        executor(true, ExecLimits::default()),
    );
    let (free, boxed) = tokio::join!(
        compile(&unconfined, d.clone(), source),
        compile(&confined, d, source)
    );
    (free.unwrap(), boxed.unwrap())
}

/// The confined compile succeeded with exactly the unconfined one's object.
fn same_object(free: &JobResult, boxed: &JobResult) {
    assert_eq!(
        boxed.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&boxed.stderr)
    );
    assert!(free.outputs == boxed.outputs, "the objects differ");
}

/// Source whose inline asm pulls `path` into the object.
fn incbin(path: &Path) -> String {
    format!(
        "__asm__(\".section .rodata\\n.incbin \\\"{}\\\"\\n.text\");\nint x;\n",
        path.display()
    )
}

/// A file only the server can read, with a recognisable line in it.
struct Secret {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const SECRET: &str = "TOP-SECRET-7f3a9c";

impl Secret {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{SECRET} line one\n{SECRET} line two\n")).unwrap();
        Self { _dir: dir, path }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn leaked(r: &JobResult) -> bool {
    contains(&r.stderr, SECRET)
        || contains(&r.stdout, SECRET)
        || r.outputs.iter().any(|o| contains(&o.data, SECRET))
}

#[test]
fn the_probe_finds_every_protection_this_kernel_has() {
    let p = sandbox().protections().clone();
    assert!(p.filesystem, "{p}");
    assert!(p.network, "{p}");
    assert!(p.rlimits, "{p}");
    assert!(p.landlock_abi >= 1, "{p}");
    assert!(p.missing_required().is_empty(), "{p}");
}

#[tokio::test]
async fn a_sandboxed_compile_is_the_same_object_as_an_unconfined_one() {
    let source = b"int square(int x) { return x * x; }\nint main(void) { return square(3); }\n";
    // No -g: the object would name each compile's own temporary directory.
    let (free, boxed) = both(desc("gcc", &["-O2", "-c"]), source).await;
    same_object(&free, &boxed);
    // g++ and -S as well: cc1plus and the assembly path.
    let cxx = b"template <class T> T twice(T x) { return x + x; }\nint f() { return twice(21); }\n";
    let d = JobDesc {
        language: "c++-cpp-output".into(),
        ..desc("g++", &["-O1", "-S"])
    };
    let (_, r) = both(d, cxx).await;
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert!(contains(&r.outputs[0].data, "_Z1fv"));
}

#[tokio::test]
async fn clang_runs_confined_too() {
    // clang runs itself as its compiler proper and assembles in-process: a different
    // toolchain shape than gcc's, resolved the same way. (.ci/run installs clang.)
    let source = b"int square(int x) { return x * x; }\n";
    let (free, boxed) = both(desc("clang", &["-O2", "-c"]), source).await;
    same_object(&free, &boxed);
    // And .incbin through clang's integrated assembler is contained as well.
    let secret = Secret::new();
    let (free, boxed) = both(desc("clang", &["-c"]), incbin(&secret.path).as_bytes()).await;
    assert!(
        !leaked(&boxed),
        "{}",
        String::from_utf8_lossy(&boxed.stderr)
    );
    assert!(leaked(&free), "the attack works with clang unconfined");
}

#[tokio::test]
async fn incbin_of_a_server_file_never_comes_back() {
    let secret = Secret::new();
    let (free, boxed) = both(desc("gcc", &["-c"]), incbin(&secret.path).as_bytes()).await;
    assert!(leaked(&free), "the attack works without the sandbox");
    assert_ne!(boxed.exit_code, 0);
    assert!(
        !leaked(&boxed),
        "{}",
        String::from_utf8_lossy(&boxed.stderr)
    );
    assert!(boxed.outputs.is_empty());
}

#[tokio::test]
async fn diagnostics_cannot_quote_a_server_file_or_proc() {
    let secret = Secret::new();
    // A line marker naming the file, then an error on its "line 2": gcc opens the named
    // file to quote that line under the error.
    for named in [
        secret.path.display().to_string(),
        "/proc/self/environ".to_string(),
        format!("/proc/{}/cmdline", std::process::id()),
    ] {
        let source = format!("# 2 \"{named}\"\nint x = ;\n");
        let (free, boxed) = both(desc("gcc", &["-c"]), source.as_bytes()).await;
        assert_ne!(boxed.exit_code, 0);
        let stderr = String::from_utf8_lossy(&boxed.stderr);
        assert!(!stderr.contains(SECRET), "{named}: {stderr}");
        // Only the error line itself, no quoted source line with a caret under it.
        assert!(!stderr.contains(" | "), "{named}: {stderr}");
        if named == secret.path.display().to_string() {
            assert!(leaked(&free), "the attack works without the sandbox");
        }
    }
}

#[tokio::test]
async fn pch_preprocess_pragma_cannot_probe_server_files() {
    let secret = Secret::new();
    let source = format!(
        "#pragma GCC pch_preprocess \"{}\"\nint x;\n",
        secret.path.display()
    );
    let boxed = compile(
        &executor(true, ExecLimits::default()),
        desc("gcc", &["-c"]),
        source.as_bytes(),
    )
    .await
    .unwrap();
    assert!(!leaked(&boxed));
}

/// Runs `program args` in the sandbox exactly as a compile runs, as if a client had
/// smuggled that command line past the option check.
fn smuggled(program: &str, args: &[&str], extra: &[&str]) -> std::process::Output {
    let sandbox = sandbox();
    let job = tempfile::tempdir().unwrap();
    let program = toolchain::find_on_path(program, "/usr/bin:/bin").unwrap();
    let mut files = toolchain::resolve(&program, "/usr/bin:/bin");
    files.extend(extra.iter().map(PathBuf::from));
    let argv: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    sandbox
        .command(
            &program,
            &argv,
            &Policy {
                toolchain: &files,
                job_dir: job.path(),
                limits: ResourceLimits::default(),
            },
        )
        .current_dir(job.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap()
}

#[test]
fn a_smuggled_command_cannot_write_outside_the_job_or_open_a_socket() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("pwned");
    // A shell that tries: write outside, read a server file, run another program.
    let script = format!(
        "echo x > {t}; cat /etc/hostname; ls /; echo inside > ./ok && echo wrote-inside",
        t = target.display()
    );
    let out = smuggled("sh", &["-c", &script], &[]);
    assert!(!target.exists(), "wrote outside the job directory");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote-inside"), "{stdout}");
    // cat and ls are not part of the toolchain: they cannot even be started.
    assert!(!stdout.contains('/'), "{stdout}");
    // A network client: python, with its standard library allowed, tries TCP to a port
    // that is listening on this machine.
    let Some(python) = toolchain::find_on_path("python3", "/usr/bin:/bin") else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let lib = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("python3")
        })
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>();
    let extra: Vec<&str> = lib.iter().map(String::as_str).collect();
    let code = format!(
        "import socket,sys\n\
         try:\n    socket.create_connection(('127.0.0.1',{port}),timeout=5); print('connected')\n\
         except OSError as e: print('refused', e)\n\
         try:\n    open('{t}','w').write('x'); print('wrote')\n\
         except OSError as e: print('denied', e)\n",
        t = target.display()
    );
    let out = smuggled(&python.display().to_string(), &["-c", &code], &extra);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("refused"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("denied"), "{stdout}");
    assert!(!target.exists());
    // Unconfined, the same program connects: the port really was listening.
    let free = std::process::Command::new(&python)
        .args([
            "-c",
            &code.replace(&target.display().to_string(), "/dev/null"),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&free.stdout).contains("connected"));
}

#[tokio::test]
async fn a_memory_bomb_ends_as_a_job_error() {
    // A few thousand functions is an ordinary unit; with 64 MiB of address space cc1
    // cannot even start.
    let source: String = (0..3000)
        .map(|i| {
            format!(
                "int f{i}(int x) {{ return x * {i} + f{}(x); }}\n",
                i.max(1) - 1
            )
        })
        .collect();
    let tight = ExecLimits {
        resources: ResourceLimits {
            address_space: 64 << 20,
            ..ResourceLimits::default()
        },
        ..ExecLimits::default()
    };
    let honest = executor(true, ExecLimits::default());
    let bomb = executor(true, tight);
    let (bombed, fine) = tokio::join!(
        compile(&bomb, desc("gcc", &["-O2", "-c"]), source.as_bytes()),
        compile(&honest, desc("gcc", &["-O2", "-c"]), source.as_bytes()),
    );
    let bombed = bombed.unwrap();
    assert_ne!(bombed.exit_code, 0);
    assert!(bombed.outputs.is_empty());
    assert_eq!(
        fine.unwrap().exit_code,
        0,
        "the honest job beside it completes"
    );
}

#[tokio::test]
async fn a_huge_object_ends_as_a_job_error() {
    // `.skip` makes the assembler write 64 MiB of zeros; the limit is 16 MiB.
    let source = b"__asm__(\".section .data\\n.skip 67108864\\n.text\");\nint x;\n";
    let small = ExecLimits {
        resources: ResourceLimits {
            file_size: 16 << 20,
            ..ResourceLimits::default()
        },
        ..ExecLimits::default()
    };
    let r = compile(&executor(true, small), desc("gcc", &["-c"]), source).await;
    match r {
        Ok(r) => {
            assert_ne!(r.exit_code, 0);
            assert!(r.outputs.is_empty());
        }
        Err(e) => assert!(matches!(e, ExecError::OutputTooLarge { .. }), "{e}"),
    }
    // Unconfined the same source is a 64 MiB object: the limit, not the source, stopped it.
    let r = compile(
        &executor(false, ExecLimits::default()),
        desc("gcc", &["-c"]),
        source,
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(r.outputs[0].data.len() > 64 << 20);
}

#[tokio::test]
async fn a_stderr_flood_is_cut_with_a_note() {
    // 20,000 warnings with their quoted lines: megabytes of stderr.
    let source: String = (0..20_000)
        .map(|i| format!("int a{i} = 1 / 0;\n"))
        .collect();
    let limits = ExecLimits {
        max_stderr: 64 << 10,
        ..ExecLimits::default()
    };
    let r = compile(
        &executor(true, limits),
        desc("gcc", &["-c"]),
        source.as_bytes(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.stderr.len() < (64 << 10) + 200, "{}", r.stderr.len());
    assert!(
        stderr.contains("[dcache: stderr cut at 65536 bytes;"),
        "{stderr}"
    );
}

/// A sandboxed service on loopback whose `cc` is [`forking_compiler`] (never finishing)
/// and whose `gcc` is the real one, and a `-c` job for that `cc`.
async fn forking_service(marker: &str) -> (tempfile::TempDir, dcache_transport::Address, JobDesc) {
    use dcache_server::store::MemoryStore;
    use dcache_server::{Service, ServiceConfig};
    use dcache_transport::{TransportOptions, bind};
    let (dir, path) = forking_compiler(marker);
    let cc = identified(desc_unidentified("cc", &["-c"]), &path);
    let extra = forking_compiler_needs();
    let ex = LocalExecutor::new(LocalExecutorConfig {
        allowed: vec!["cc".into(), "gcc".into()],
        sandbox: Some(sandbox()),
        sandbox_paths: extra,
        path,
        time_limit: HANG,
        ..LocalExecutorConfig::default()
    });
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 20)),
        Arc::new(ex),
        ServiceConfig::default(),
    );
    let listener = bind(
        &"tcp://127.0.0.1:0".parse().unwrap(),
        &TransportOptions::default(),
    )
    .await
    .unwrap();
    let addr = listener.local_addr();
    tokio::spawn(async move { service.serve(listener, std::future::pending()).await });
    (dir, addr, cc)
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| contains(&c, needle))
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| !s.contains(") Z "))
        })
        .collect()
}

/// Waits (bounded) until no process has `needle` in its command line.
async fn all_gone(needle: &str) -> Vec<u32> {
    for _ in 0..200 {
        if processes_with(needle).is_empty() {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    processes_with(needle)
}

/// A stand-in compiler that starts two long-lived children (one of them in a session of
/// its own where the shell allows) and then waits: `sleep <marker>` identifies them.
fn forking_compiler(marker: &str) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cc = dir.path().join("cc");
    std::fs::write(
        &cc,
        format!(
            "#!/bin/sh\ncase \"$1\" in --version) echo 'forking cc 1.0'; exit 0;; -print-*) exit 0;; \
             -dumpmachine) echo stand-in; exit 0;; esac\n\
             sleep {marker} & sleep {marker} & echo started >&2; sleep {marker}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    (dir, path)
}

/// What the forking stand-in compiler runs besides itself: the sandbox must allow it.
fn forking_compiler_needs() -> Vec<PathBuf> {
    ["/usr/bin/sleep", "/bin/sh", "/usr/bin/dash"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}

/// Waits (bounded) until the forking compiler's three processes run.
async fn tree_started(marker: &str) {
    for _ in 0..400 {
        if processes_with(marker).len() >= 3 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the compile's process tree never started");
}

async fn no_process_outlives(sandboxed: bool, marker: &str, end: &str) {
    let (_dir, path) = forking_compiler(marker);
    let cc = identified(desc_unidentified("cc", &["-c"]), &path);
    let extra = forking_compiler_needs();
    let ex = LocalExecutor::new(LocalExecutorConfig {
        allowed: vec!["cc".into()],
        sandbox: sandboxed.then(sandbox),
        sandbox_paths: extra,
        path,
        time_limit: if end == "timeout" {
            Duration::from_secs(2)
        } else {
            HANG
        },
        ..LocalExecutorConfig::default()
    });
    let mut c = Compile::start(&ex, cc);
    assert_eq!(c.feed(Bytes::from_static(b"int x;\n")), Fed::Accepted);
    // All three sleeps running.
    tree_started(marker).await;
    match end {
        "abort" => drop(c),
        "timeout" => {
            let r = tokio::time::timeout(HANG, c.wait()).await.unwrap();
            assert!(matches!(r, Err(ExecError::Timeout(_))), "{r:?}");
        }
        _ => unreachable!(),
    }
    assert_eq!(
        all_gone(marker).await,
        Vec::<u32>::new(),
        "{end}: left behind"
    );
}

#[tokio::test]
async fn no_compiler_process_outlives_an_aborted_job() {
    no_process_outlives(false, "301.25", "abort").await;
    no_process_outlives(true, "302.25", "abort").await;
}

#[tokio::test]
async fn no_compiler_process_outlives_a_timed_out_job() {
    no_process_outlives(false, "303.25", "timeout").await;
    no_process_outlives(true, "304.25", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_compiler_process_outlives_a_client_that_disconnects() {
    use dcache_proto::{CacheKey, Frame, JobId};
    let marker = "305.25";
    let (_dir, addr, cc) = forking_service(marker).await;
    // A client that sends a whole job and then disappears: its socket closes.
    let port: u16 = addr
        .to_string()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let d = cc;
    let src = Bytes::from_static(b"int x;\n");
    let mut bytes = Vec::new();
    for f in [
        dcache_proto::testing::hello(),
        Frame::Job {
            job: JobId(1),
            desc: d.clone(),
        },
        Frame::Hash {
            job: JobId(1),
            key: CacheKey::compute(&d, &src),
        },
        Frame::Source {
            job: JobId(1),
            data: src,
            fin: true,
            zstd: false,
        },
    ] {
        bytes.extend_from_slice(&f.to_bytes(1 << 20).unwrap());
    }
    tokio::io::AsyncWriteExt::write_all(&mut socket, &bytes)
        .await
        .unwrap();
    tree_started(marker).await;
    drop(socket);
    assert_eq!(all_gone(marker).await, Vec::<u32>::new(), "left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_running_compile_can_be_cancelled_and_the_connection_goes_on() {
    use dcache_proto::{CacheKey, ClientConfig};
    use dcache_transport::{TransportOptions, connect, spawn_client};
    let marker = "306.25";
    let (_dir, addr, cc) = forking_service(marker).await;
    let client = spawn_client(
        connect(&addr, &TransportOptions::default()).await.unwrap(),
        ClientConfig::default(),
    );
    // The whole source goes up; the compile (a forking stand-in) never ends by itself.
    let d = cc;
    let src = Bytes::from_static(b"int x;\n");
    let key = CacheKey::compute(&d, &src);
    let c = client.clone();
    let running = tokio::spawn(async move { c.submit(d, Some(key), src).await });
    tree_started(marker).await;
    // Cancelling that one job (dropping its future) kills its whole tree...
    running.abort();
    let _ = running.await;
    assert_eq!(all_gone(marker).await, Vec::<u32>::new(), "left behind");
    // ...while the connection and its other jobs go on.
    let g = desc("gcc", &["-O2", "-c"]);
    let src = Bytes::from_static(b"int twice(int x) { return 2 * x; }\n");
    let out = tokio::time::timeout(
        HANG,
        client.submit(g.clone(), Some(CacheKey::compute(&g, &src)), src.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.result.exit_code, 0);
    assert!(!client.is_closed());
}
