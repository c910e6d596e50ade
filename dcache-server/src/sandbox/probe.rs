//! Finding out what the kernel enforces, by trying it.

use std::fmt;
use std::path::Path;

use super::SandboxError;
use super::launcher::encode_probe;

/// What the sandbox enforces on this machine, as measured by a probe: a launcher that
/// confined itself and then tried to read a file outside its rules and to open a TCP
/// connection to a listening port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Protections {
    /// The Landlock ABI in effect (0: none).
    pub landlock_abi: i32,
    /// A file outside the allowed paths could not be opened.
    pub filesystem: bool,
    /// A TCP connection was refused by Landlock.
    pub landlock_tcp: bool,
    /// The compile runs in new user, PID and network namespaces.
    pub namespaces: bool,
    /// The compile is the first process of its own PID namespace (its tree dies with it).
    pub pid_namespace: bool,
    /// No TCP connection could be made at all (by Landlock or for want of a network).
    pub network: bool,
    /// The resource limits were in force.
    pub rlimits: bool,
}

impl Protections {
    /// The protections a server requires to serve beyond loopback that are missing.
    pub fn missing_required(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.filesystem {
            missing.push("Landlock filesystem rules");
        }
        if !self.network {
            missing.push("network isolation (Landlock TCP rules or a network namespace)");
        }
        if !self.rlimits {
            missing.push("resource limits");
        }
        missing
    }

    fn parse(line: &str, ns: bool) -> Result<Self, SandboxError> {
        let mut p = Protections {
            namespaces: ns,
            ..Protections::default()
        };
        for pair in line.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| SandboxError::Probe(format!("unexpected report {line:?}")))?;
            let flag = v == "1";
            match k {
                "abi" => p.landlock_abi = v.parse().unwrap_or(0),
                "read_denied" => p.filesystem = flag,
                "connect_denied" => p.network = flag,
                "landlock_net" => p.landlock_tcp = flag,
                "rlimits" => p.rlimits = flag,
                "pidns" => p.pid_namespace = flag,
                _ => {}
            }
        }
        Ok(p)
    }
}

impl fmt::Display for Protections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        write!(
            f,
            "landlock ABI {}; filesystem confined: {}; TCP blocked by landlock: {}; \
             user+pid+net namespaces: {}; network unreachable: {}; resource limits: {}; \
             no_new_privs: yes; process-group kill: yes",
            self.landlock_abi,
            yes(self.filesystem),
            yes(self.landlock_tcp),
            yes(self.namespaces && self.pid_namespace),
            yes(self.network),
            yes(self.rlimits),
        )
    }
}

/// Probes with namespaces, and without them when the kernel refuses (no unprivileged user
/// namespaces): the stronger configuration that works.
pub(super) fn run(launcher: &Path) -> Result<Protections, SandboxError> {
    match run_once(launcher, true) {
        Ok(p) => Ok(p),
        Err(with_ns) => run_once(launcher, false).map_err(|without| {
            SandboxError::Probe(format!("with namespaces: {with_ns}; without: {without}"))
        }),
    }
}

fn run_once(launcher: &Path, ns: bool) -> Result<Protections, SandboxError> {
    // A port that is certainly listening, so a refused connection means the sandbox.
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| {
        SandboxError::Probe(format!("cannot listen on loopback for the probe: {e}"))
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| SandboxError::Probe(e.to_string()))?
        .port();
    let out = std::process::Command::new(launcher)
        .args(encode_probe(ns, launcher, port))
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| SandboxError::Launcher {
            path: launcher.to_path_buf(),
            source,
        })?;
    drop(listener);
    if !out.status.success() {
        return Err(SandboxError::Probe(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .ok_or_else(|| SandboxError::Probe("empty probe report".into()))?;
    Protections::parse(line, ns)
}
