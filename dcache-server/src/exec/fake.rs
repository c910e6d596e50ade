//! A stand-in compiler for tests and simulations: a configurable compile time, an output
//! derived from the source (so the right object is checkable), configurable failures, no
//! processes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dcache_proto::testing::reference_compile;
use dcache_proto::{JobDesc, JobResult, OutputFile};
use tokio::sync::mpsc;

use super::{CompileFuture, CompilerId, ExecError, Executor};

/// How a [`FakeExecutor`] fails, to exercise the paths around a compile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FakeFailure {
    /// Compile normally.
    #[default]
    None,
    /// Every compile is a compile error: exit 1, a message on stderr, no output. With
    /// `early`, it happens on the first chunk, like a compiler rejecting its options
    /// before reading the source, so the result comes while the upload is still going.
    CompileError {
        /// Fail on the first chunk instead of after the whole source and the compile time.
        early: bool,
    },
    /// The compiler cannot be run at all: an [`ExecError::Io`] after the source.
    Crash,
}

/// Compiles after `compile_time` (tokio time, so paused test time applies), counted from
/// the end of the source. The object is the source's blake3 digest repeated to
/// `source_len / output_divisor + 32` bytes: deterministic, checkable, and sized like a
/// real object relative to its preprocessed source. With the default divisor of 4 the
/// result is exactly [`reference_compile`]'s, which the protocol tests also use.
///
/// A source starting with `#error` fails at once, before the rest arrives, as in
/// [`reference_compile`] (so tests can reach the server's early-failure path; a real gcc
/// or clang reports even a first-line error only after the end of its stdin).
#[derive(Clone, Debug)]
pub struct FakeExecutor {
    /// How long each compile takes after its source is complete.
    pub compile_time: Duration,
    /// The identity reported for every compiler; change it to simulate an upgrade.
    pub id: CompilerId,
    /// The object is `source_len / output_divisor + 32` bytes (0 is treated as 1).
    pub output_divisor: usize,
    /// Whether and how every compile fails.
    pub failure: FakeFailure,
}

impl FakeExecutor {
    /// A fake compiler taking `compile_time`, producing [`reference_compile`]'s output.
    pub fn new(compile_time: Duration) -> Self {
        Self {
            compile_time,
            id: CompilerId([0xFA; 32]),
            output_divisor: 4,
            failure: FakeFailure::None,
        }
    }

    /// The same fake with objects `source_len / divisor + 32` bytes long.
    pub fn with_output_divisor(mut self, divisor: usize) -> Self {
        self.output_divisor = divisor;
        self
    }

    /// The same fake failing as `failure` says.
    pub fn with_failure(mut self, failure: FakeFailure) -> Self {
        self.failure = failure;
        self
    }

    fn output(&self, desc: &JobDesc, source: &[u8]) -> JobResult {
        let mut result = reference_compile(desc, source);
        if self.output_divisor != 4 && result.exit_code == 0 {
            let len = source.len() / self.output_divisor.max(1) + 32;
            let digest = blake3::hash(source);
            let object: Vec<u8> = digest
                .as_bytes()
                .iter()
                .copied()
                .cycle()
                .take(len)
                .collect();
            result.outputs = vec![OutputFile {
                name: ".o".into(),
                data: Bytes::from(object),
            }];
        }
        result
    }
}

fn compile_error(desc: &JobDesc) -> JobResult {
    JobResult {
        exit_code: 1,
        stdout: Bytes::new(),
        stderr: Bytes::from(format!("{}: error: fake compile error\n", desc.compiler)),
        outputs: Vec::new(),
    }
}

impl Executor for FakeExecutor {
    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError> {
        if desc.compiler.contains('/') {
            return Err(ExecError::CompilerPath(desc.compiler.clone()));
        }
        super::args::check(&desc.args).map_err(ExecError::OptionRefused)?;
        Ok(self.id)
    }

    fn compile(&self, desc: JobDesc, mut source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture {
        let me = self.clone();
        Box::pin(async move {
            me.check(&desc)?;
            let mut all = BytesMut::new();
            while let Some(chunk) = source.recv().await {
                all.extend_from_slice(&chunk);
                if me.failure == (FakeFailure::CompileError { early: true }) {
                    return Ok(compile_error(&desc));
                }
                // Exit before the end, as a compiler that fails before parsing does
                // (gcc and clang report even a first-line syntax error only at EOF).
                if all.starts_with(b"#error") {
                    return Ok(reference_compile(&desc, &all));
                }
            }
            tokio::time::sleep(me.compile_time).await;
            match me.failure {
                FakeFailure::CompileError { .. } => Ok(compile_error(&desc)),
                FakeFailure::Crash => Err(ExecError::Io(std::io::Error::other(
                    "fake compiler crashed",
                ))),
                FakeFailure::None => Ok(me.output(&desc, &all)),
            }
        })
    }
}
