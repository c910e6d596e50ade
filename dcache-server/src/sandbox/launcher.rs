//! The launcher process: restricts itself, then becomes the compiler.
//!
//! Command line (built by [`encode`], never by hand):
//!
//! ```text
//! <program> __dcache-sandbox run|probe [--ns] [--stage2] --as N --cpu N --fsize N
//!           [--rx PATH]… [--rw DIR]… [--port N] [--deny PATH] -- PROGRAM ARGS…
//! ```
//!
//! With `--ns` the first process (stage 1) enters new user, PID and network namespaces and
//! starts itself again as stage 2, the first process of the new PID namespace; stage 2
//! sets the limits and Landlock rules and executes the compiler, which so becomes that
//! namespace's init: when it dies, the kernel kills everything it started. Without
//! namespaces one process does both. Every stage asks the kernel to kill it when its
//! parent dies (`PR_SET_PDEATHSIG`), so a killed server leaves no compiler behind.
//!
//! A launcher that cannot set up what it was asked for exits with [`SETUP_FAILED`] and a
//! line on stderr starting with [`SETUP_PREFIX`]; it never runs the compiler unconfined.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::sys::resource::{Resource, setrlimit};

use super::{Policy, ResourceLimits};

/// The first argument that turns a program into the launcher.
pub const LAUNCHER_ARG: &str = "__dcache-sandbox";

/// Exit code of a launcher that could not confine the compiler (as `env` and `timeout`
/// use 125 for their own failures).
pub(crate) const SETUP_FAILED: i32 = 125;

/// How the launcher's own error lines start on stderr.
pub(crate) const SETUP_PREFIX: &str = "dcache-sandbox: ";

/// The Landlock ABI whose rights are asked for; older kernels enforce what they can
/// (best effort), and the probe reports what that was.
const ABI_WANTED: ABI = ABI::V6;

/// Runs the launcher and exits if this process was started as one (first argument
/// [`LAUNCHER_ARG`]); returns otherwise. Call it first thing in `main` of any program
/// that gives itself to [`Sandbox::probe`](super::Sandbox::probe) as the launcher, before
/// starting threads or a runtime: namespaces can only be entered single-threaded.
pub fn run_launcher_if_requested() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(LAUNCHER_ARG)) {
        return;
    }
    let code = match main(args.collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{SETUP_PREFIX}{e}");
            SETUP_FAILED
        }
    };
    std::process::exit(code);
}

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Run,
    Probe,
}

#[derive(Debug)]
struct Spec {
    mode: Mode,
    ns: bool,
    stage2: bool,
    limits: ResourceLimits,
    rx: Vec<PathBuf>,
    rw: Vec<PathBuf>,
    port: u16,
    deny: Option<PathBuf>,
    program: Vec<OsString>,
}

/// The launcher's arguments (after [`LAUNCHER_ARG`]) for `program args…` under `policy`.
pub(crate) fn encode(
    program: &Path,
    args: &[OsString],
    policy: &Policy<'_>,
    ns: bool,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![LAUNCHER_ARG.into(), "run".into()];
    if ns {
        v.push("--ns".into());
    }
    push_limits(&mut v, &policy.limits);
    for p in policy.toolchain {
        v.push("--rx".into());
        v.push(p.into());
    }
    v.push("--rw".into());
    v.push(policy.job_dir.into());
    v.push("--".into());
    v.push(program.into());
    v.extend(args.iter().cloned());
    v
}

/// The launcher's arguments for a probe that must fail to open `deny` and to connect to
/// 127.0.0.1:`port`.
pub(crate) fn encode_probe(ns: bool, deny: &Path, port: u16) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![LAUNCHER_ARG.into(), "probe".into()];
    if ns {
        v.push("--ns".into());
    }
    push_limits(&mut v, &ResourceLimits::default());
    v.extend(["--deny".into(), deny.into()]);
    v.extend(["--port".into(), port.to_string().into()]);
    v
}

fn push_limits(v: &mut Vec<OsString>, l: &ResourceLimits) {
    for (flag, n) in [
        ("--as", l.address_space),
        ("--cpu", l.cpu_seconds),
        ("--fsize", l.file_size),
    ] {
        v.push(flag.into());
        v.push(n.to_string().into());
    }
}

fn parse(args: Vec<OsString>) -> Result<Spec, String> {
    let mut it = args.into_iter();
    let mode = match it.next().as_deref().and_then(OsStr::to_str) {
        Some("run") => Mode::Run,
        Some("probe") => Mode::Probe,
        other => return Err(format!("unknown mode {other:?}")),
    };
    let mut spec = Spec {
        mode,
        ns: false,
        stage2: false,
        limits: ResourceLimits::default(),
        rx: Vec::new(),
        rw: Vec::new(),
        port: 0,
        deny: None,
        program: Vec::new(),
    };
    let number = |v: Option<OsString>, flag: &str| -> Result<u64, String> {
        v.as_deref()
            .and_then(OsStr::to_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--ns") => spec.ns = true,
            Some("--stage2") => spec.stage2 = true,
            Some("--as") => spec.limits.address_space = number(it.next(), "--as")?,
            Some("--cpu") => spec.limits.cpu_seconds = number(it.next(), "--cpu")?,
            Some("--fsize") => spec.limits.file_size = number(it.next(), "--fsize")?,
            Some("--port") => {
                spec.port = u16::try_from(number(it.next(), "--port")?)
                    .map_err(|_| "--port out of range".to_string())?;
            }
            Some("--rx") => spec.rx.push(it.next().ok_or("--rx needs a path")?.into()),
            Some("--rw") => spec.rw.push(it.next().ok_or("--rw needs a path")?.into()),
            Some("--deny") => spec.deny = Some(it.next().ok_or("--deny needs a path")?.into()),
            Some("--") => {
                spec.program = it.collect();
                break;
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if spec.mode == Mode::Run && spec.program.is_empty() {
        return Err("no program to run".into());
    }
    Ok(spec)
}

fn main(args: Vec<OsString>) -> Result<i32, String> {
    let original = args.clone();
    let spec = parse(args)?;
    // Die with whoever started us: a server killed outright leaves no compile running.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if spec.ns && !spec.stage2 {
        return stage1(original);
    }
    let status = confine(&spec)?;
    match spec.mode {
        Mode::Probe => {
            println!("{}", probe_report(&spec, &status));
            Ok(0)
        }
        Mode::Run => {
            let (program, args) = spec.program.split_first().ok_or("no program to run")?;
            // Only returns on failure.
            let e = std::process::Command::new(program).args(args).exec();
            Err(format!(
                "cannot execute {}: {e}",
                Path::new(program).display()
            ))
        }
    }
}

/// Enters new user, PID and network namespaces and runs stage 2 as the new PID
/// namespace's first process; exits as it did.
fn stage1(original: Vec<OsString>) -> Result<i32, String> {
    use nix::sched::{CloneFlags, unshare};
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(user, pid, net namespaces): {e}"))?;
    // Map our own ids only: inside, the compiler is who it was outside, with no
    // capability over anything outside the new namespaces.
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(file, text).map_err(|e| format!("{file}: {e}"))?;
    }
    let mut args = vec![OsString::from(LAUNCHER_ARG)];
    let mut rest = original.into_iter();
    args.extend(rest.next());
    args.push("--stage2".into());
    args.extend(rest);
    let status = std::process::Command::new(exe)
        .args(args)
        .status()
        .map_err(|e| format!("cannot start stage 2: {e}"))?;
    Ok(crate::exit_code(status))
}

/// Limits, then Landlock. After this the process can reach only what `spec` names.
fn confine(spec: &Spec) -> Result<landlock::RestrictionStatus, String> {
    let l = &spec.limits;
    for (res, n) in [
        (Resource::RLIMIT_AS, l.address_space),
        (Resource::RLIMIT_FSIZE, l.file_size),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(res, n, n).map_err(|e| format!("setrlimit({res:?}): {e}"))?;
    }
    // The soft limit sends SIGXCPU, the hard limit a second later SIGKILL (which even a
    // namespace's init cannot ignore).
    setrlimit(Resource::RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 1)
        .map_err(|e| format!("setrlimit(RLIMIT_CPU): {e}"))?;
    let status = landlock_rules(spec).map_err(|e| format!("landlock: {e}"))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err("landlock is not enforced by this kernel".into());
    }
    if !status.no_new_privs {
        return Err("no_new_privs could not be set".into());
    }
    Ok(status)
}

fn landlock_rules(spec: &Spec) -> Result<landlock::RestrictionStatus, String> {
    let abi = ABI_WANTED;
    let err = |e: landlock::RulesetError| e.to_string();
    let mut rules = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp))
        .and_then(|r| r.scope(Scope::AbstractUnixSocket | Scope::Signal))
        .and_then(|r| r.create())
        .map_err(err)?;
    for p in &spec.rx {
        // A path that vanished since the server resolved it is simply not allowed.
        let Ok(fd) = PathFd::new(p) else { continue };
        let access = if p.is_dir() {
            AccessFs::from_read(abi)
        } else {
            AccessFs::ReadFile | AccessFs::Execute
        };
        rules = rules.add_rule(PathBeneath::new(fd, access)).map_err(err)?;
    }
    for p in &spec.rw {
        // The job directory must exist: without it the compile could write nowhere.
        let fd = PathFd::new(p).map_err(|e| format!("{}: {e}", p.display()))?;
        rules = rules
            .add_rule(PathBeneath::new(fd, AccessFs::from_all(abi)))
            .map_err(err)?;
    }
    if let Ok(fd) = PathFd::new("/dev/null") {
        let access = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
        rules = rules.add_rule(PathBeneath::new(fd, access)).map_err(err)?;
    }
    rules.restrict_self().map_err(err)
}

/// What a confined process can still do, tested rather than assumed: `key=value` pairs
/// for [`super::probe`].
fn probe_report(spec: &Spec, status: &landlock::RestrictionStatus) -> String {
    let read_denied = spec
        .deny
        .as_ref()
        .is_some_and(|p| std::fs::File::open(p).is_err());
    let connect = std::net::TcpStream::connect(("127.0.0.1", spec.port));
    let connect_denied = connect.is_err();
    let landlock_net =
        matches!(&connect, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied);
    let rlimits = nix::sys::resource::getrlimit(Resource::RLIMIT_AS)
        .is_ok_and(|(soft, _)| soft == spec.limits.address_space);
    let abi = match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        _ => 0,
    };
    let pid_ns = std::process::id() == 1;
    let b = |v: bool| u8::from(v);
    format!(
        "abi={abi} read_denied={} connect_denied={} landlock_net={} rlimits={} ns={} pidns={}",
        b(read_denied),
        b(connect_denied),
        b(landlock_net),
        b(rlimits),
        b(spec.ns),
        b(pid_ns),
    )
}

/// Whether `stderr` of a compile is the launcher's own setup failure, and its message.
pub(crate) fn setup_failure(exit_code: i32, stderr: &[u8]) -> Option<String> {
    if exit_code != SETUP_FAILED {
        return None;
    }
    let line = stderr.split(|&b| b == b'\n').next()?;
    let rest = line.strip_prefix(SETUP_PREFIX.as_bytes())?;
    Some(OsStr::from_bytes(rest).to_string_lossy().into_owned())
}
