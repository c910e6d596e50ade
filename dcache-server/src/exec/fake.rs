//! A stand-in compiler for tests and simulations: a fixed compile time, an output derived
//! from the source (so the right object is checkable), no processes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dcache_proto::JobDesc;
use dcache_proto::testing::reference_compile;
use tokio::sync::mpsc;

use super::{CompileFuture, CompilerId, ExecError, Executor};

/// Compiles by [`reference_compile`] after `compile_time` (tokio time, so paused test
/// time applies), counted from the end of the source.
#[derive(Clone, Debug)]
pub struct FakeExecutor {
    /// How long each compile takes after its source is complete.
    pub compile_time: Duration,
    /// The identity reported for every compiler; change it to simulate an upgrade.
    pub id: CompilerId,
}

impl FakeExecutor {
    /// A fake compiler taking `compile_time`.
    pub fn new(compile_time: Duration) -> Self {
        Self {
            compile_time,
            id: CompilerId([0xFA; 32]),
        }
    }
}

impl Executor for FakeExecutor {
    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError> {
        super::args::check(&desc.args).map_err(ExecError::OptionRefused)?;
        Ok(self.id)
    }

    fn compile(&self, desc: JobDesc, mut source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture {
        let time = self.compile_time;
        Box::pin(async move {
            let mut all = BytesMut::new();
            while let Some(chunk) = source.recv().await {
                all.extend_from_slice(&chunk);
                // Like a real compiler hitting an error early: exit before the end.
                if all.starts_with(b"#error") {
                    return Ok(reference_compile(&desc, &all));
                }
            }
            tokio::time::sleep(time).await;
            Ok(reference_compile(&desc, &all))
        })
    }
}
