//! Running compilers for clients: the trait, the real executor and a test double.
//!
//! Nothing a client sends can run a program other than an allow-listed compiler, pass it an
//! option outside the allow-list, or make it write outside the job's private directory.

pub mod args;
mod busy;
mod fake;
mod handle;
pub mod identity;
mod limits;
mod local;
mod options;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use dcache_proto::{CacheKey, CompilerIdentity, ErrorCode, JobDesc, JobResult};
use tokio::sync::mpsc;

use crate::store::StoreKey;

pub use fake::{FakeExecutor, FakeFailure};
pub use handle::{Compile, Fed};
pub use limits::ExecLimits;
pub use local::{LocalExecutor, LocalExecutorConfig};

/// Identifies one compiler binary and version on this server: a digest of its resolved
/// path, its `--version` output and its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompilerId(pub [u8; 32]);

/// blake3 context binding a protocol key to a compiler identity.
const STORE_KEY_CONTEXT: &str = "dcache 2026-11 store key v1";

/// The key a result is stored under: the client's job key bound to the compiler that
/// produced it, so upgrading the compiler can never serve a stale object.
pub fn store_key(compiler: &CompilerId, key: &CacheKey) -> StoreKey {
    let mut h = blake3::Hasher::new_derive_key(STORE_KEY_CONTEXT);
    h.update(&compiler.0);
    h.update(key.as_bytes());
    StoreKey(*h.finalize().as_bytes())
}

/// Why a job could not be compiled. A compile *error* is not one of these: it is a
/// result with the compiler's exit status and stderr.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The compiler is not on this server's allow-list.
    #[error("compiler {0:?} is not allowed on this server")]
    CompilerNotAllowed(String),
    /// The job names no compiler identity (a protocol-version-1 client, or one that could
    /// not identify its compiler): which compiler it meant is unknown, so none runs.
    #[error(
        "the job does not identify its compiler (a dcache client older than protocol version 2?): \
         this server runs a compiler only for a client that names its identity; upgrade the client"
    )]
    NoIdentity,
    /// No compiler offered here has the identity the job names: running one of them would
    /// give another compiler's object.
    #[error(
        "no compiler here matches the client's {requested:?}, {wanted}; this server offers {offered}"
    )]
    NoMatchingCompiler {
        /// The compiler name the client asked for.
        requested: String,
        /// The identity the job names.
        wanted: Box<CompilerIdentity>,
        /// The compilers offered, each as `name = identity`, for the message.
        offered: String,
    },
    /// The client named a compiler by path; only bare allow-listed names are run.
    #[error("compiler {0:?} refused: a path, not a name (the server picks its own binaries)")]
    CompilerPath(String),
    /// An argument is refused; the message names it.
    #[error("{0}")]
    OptionRefused(String),
    /// The language is not one this server compiles.
    #[error("language {0:?} is not accepted (expected cpp-output, c++-cpp-output or assembler)")]
    Language(String),
    /// The compiler could not be started or its output read.
    #[error("cannot run the compiler: {0}")]
    Io(#[from] std::io::Error),
    /// [`Compile::wait`] was called again after it had returned the result.
    #[error("the compile's result was already taken")]
    ResultTaken,
    /// The compiler ran past the time limit and was killed.
    #[error("compile exceeded the time limit of {0:?}")]
    Timeout(std::time::Duration),
    /// The sandbox could not confine the compile, so it did not run.
    #[error("the compile sandbox failed: {0}")]
    Sandbox(String),
    /// An output file exceeded the size limit.
    #[error("an output of {size} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl ExecError {
    /// Whether the client's request itself is refused (compile locally), as opposed to a
    /// failure of this server.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::CompilerNotAllowed(_)
                | Self::CompilerPath(_)
                | Self::OptionRefused(_)
                | Self::Language(_)
                | Self::NoIdentity
                | Self::NoMatchingCompiler { .. }
        )
    }

    /// The protocol error code a job refused or failed this way is ended with:
    /// `COMPILER_MISMATCH` when no compiler here has the job's identity (another server
    /// may have one), `REFUSED` for the other refusals, `COMPILE_FAILED` otherwise.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::NoMatchingCompiler { .. } => ErrorCode::COMPILER_MISMATCH,
            e if e.is_refusal() => ErrorCode::REFUSED,
            _ => ErrorCode::COMPILE_FAILED,
        }
    }
}

/// A compile in progress: resolves to the result once the compiler exits.
pub type CompileFuture = Pin<Box<dyn Future<Output = Result<JobResult, ExecError>> + Send>>;

/// Runs compilers.
pub trait Executor: Send + Sync + 'static {
    /// Checks a job before any source arrives and names the compiler that would run it.
    /// Refusals happen here, so nothing is started for a job that cannot run.
    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError>;

    /// The identity a job must carry to run on the offered compiler `name`, for front ends
    /// whose clients cannot say which compiler they have (a stock distcc client names only
    /// `gcc`): such a job is taken to ask for this server's own compiler of that name,
    /// which is exactly what distccd would run. `None`: no such compiler, or an executor
    /// that does not select by identity.
    fn identity_of(&self, name: &str) -> Option<CompilerIdentity> {
        let _ = name;
        None
    }

    /// Compiles `desc`, reading source chunks from `source` as they arrive; the channel's
    /// end is the end of the source. If the compiler exits before the source ends, the
    /// future resolves at once with that result. A real gcc or clang does that only when
    /// it fails before reading (a refused option, a crash, a limit): both read the whole
    /// of stdin before they parse, so a syntax error, even on the first line, is reported
    /// only after the end of the source. Streaming hides the compiler's start-up behind
    /// the upload, not its compile time.
    fn compile(&self, desc: JobDesc, source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture;
}
