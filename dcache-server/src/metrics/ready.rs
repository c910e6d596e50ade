//! Readiness: whether this server can serve compiles as configured, with the reason
//! when not.

use std::sync::Arc;

use crate::Service;

/// How compiles are confined, as decided at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxState {
    /// Every compile runs in the sandbox; the text names the protections.
    Active(String),
    /// The operator turned the sandbox off (`--insecure-no-sandbox`): ready, as
    /// configured.
    Disabled,
    /// The sandbox was wanted but the kernel cannot enforce it: compiles run unconfined
    /// (loopback only), so the server is not ready in the configuration asked for.
    Unavailable(String),
}

/// What `/readyz` checks beyond the service itself.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// The sandbox as decided at start-up.
    pub sandbox: SandboxState,
}

impl Readiness {
    /// Runs every check: `Ok` with one line per check when all pass, `Err` with the
    /// same lines (the failing ones first) when one does not.
    pub async fn check(&self, service: &Arc<Service>) -> Result<String, String> {
        let mut failed = Vec::new();
        let mut passed = Vec::new();
        match &self.sandbox {
            SandboxState::Active(p) => passed.push(format!("sandbox: active ({p})")),
            SandboxState::Disabled => {
                passed.push("sandbox: off (--insecure-no-sandbox)".to_owned());
            }
            SandboxState::Unavailable(why) => failed.push(format!("sandbox: not available: {why}")),
        }
        match service.ready().await {
            Ok(()) => passed.push("store: writable, every tier reachable".to_owned()),
            Err(why) => failed.push(format!("store: {why}")),
        }
        let ok = failed.is_empty();
        let mut lines = failed;
        lines.extend(passed);
        let body = lines.join("\n") + "\n";
        if ok { Ok(body) } else { Err(body) }
    }
}
