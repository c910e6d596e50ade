//! The compilers the daemon runs: whichever one a job names, found on the `PATH` the
//! daemon was started with (part of its fingerprint, so the same `PATH` every wrapper
//! reaching it has), identified once and remembered for the daemon's life.
//!
//! The embedded server of one process is built for the one compiler it was invoked for;
//! a daemon serves every compiler of a build (`cc`, `c++`, `gcc-12`…), so it keeps one
//! [`LocalExecutor`] per name, made on the first job that names it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dcache_proto::{CompilerIdentity, JobDesc};
use dcache_server::exec::{
    CompileFuture, CompilerId, ExecError, Executor, LocalExecutor, LocalExecutorConfig,
};
use tokio::sync::mpsc;

/// At most this many compiler names are remembered; a job naming yet another is still
/// served, by an executor made for it alone (its identity comes from the disk cache of
/// identities, so that costs a few `stat` calls).
const MAX_NAMES: usize = 64;

/// The settings of the executor for the compiler `name`, as both the daemon and a
/// wrapper storing a result for it (depend mode) build them: the same compiler on the
/// same `PATH` in the same locale gives the same store binding, so what one stores the
/// other finds.
pub fn config_for(name: &str, dcache_dir: &Path, path: String) -> LocalExecutorConfig {
    LocalExecutorConfig {
        allowed: vec![name.to_owned()],
        path,
        identity_cache: Some(dcache_dir.join("compilers")),
        // Each compile in a private directory: the daemon serves jobs from any working
        // directory, so it cannot run them in the user's. The wrapper redoes locally any
        // compile that printed diagnostics, so what the user sees stays exact.
        workdir: None,
        locale: super::super::backend::locale_env(),
        ..LocalExecutorConfig::default()
    }
}

/// One [`LocalExecutor`] per compiler name, made on demand.
#[derive(Debug)]
pub struct ByName {
    dcache_dir: std::path::PathBuf,
    path: String,
    executors: Mutex<HashMap<String, Arc<LocalExecutor>>>,
}

impl ByName {
    /// Compilers found on `path`, their identities remembered under `dcache_dir`.
    pub fn new(dcache_dir: &Path, path: String) -> Self {
        Self {
            dcache_dir: dcache_dir.to_owned(),
            path,
            executors: Mutex::new(HashMap::new()),
        }
    }

    fn for_name(&self, name: &str) -> Arc<LocalExecutor> {
        let mut map = self
            .executors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = map.get(name) {
            return e.clone();
        }
        let made = Arc::new(LocalExecutor::new(config_for(
            name,
            &self.dcache_dir,
            self.path.clone(),
        )));
        if map.len() < MAX_NAMES {
            map.insert(name.to_owned(), made.clone());
        }
        made
    }
}

impl Executor for ByName {
    fn check(&self, desc: &JobDesc) -> Result<CompilerId, ExecError> {
        self.for_name(&desc.compiler).check(desc)
    }

    fn identity_of(&self, name: &str) -> Option<CompilerIdentity> {
        self.for_name(name).identity_of(name)
    }

    fn compile(&self, desc: JobDesc, source: mpsc::UnboundedReceiver<Bytes>) -> CompileFuture {
        self.for_name(&desc.compiler).compile(desc, source)
    }
}
