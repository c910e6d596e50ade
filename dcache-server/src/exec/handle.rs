//! A compile driven chunk by chunk: for callers that receive the source piecewise and
//! want a plain "feed this; are you still reading?" interface rather than a channel and a
//! future to select on.

use bytes::Bytes;
use dcache_proto::{JobDesc, JobResult};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ExecError, Executor};

/// What happened to a chunk given to [`Compile::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fed {
    /// The compiler is running and will read the chunk.
    Accepted,
    /// The compiler has already exited (typically an error before the end of the source):
    /// the chunk was dropped. Stop the upload and collect the result with
    /// [`Compile::wait`].
    Finished,
    /// [`Compile::end_source`] was already called; the chunk was dropped.
    SourceEnded,
}

/// One compile in progress, running on its own task.
///
/// Dropping it cancels the compile (and so kills the compiler process).
#[derive(Debug)]
pub struct Compile {
    source: Option<mpsc::UnboundedSender<Bytes>>,
    task: Option<JoinHandle<Result<JobResult, ExecError>>>,
}

impl Compile {
    /// Starts compiling `desc` on `executor`. Must be called inside a tokio runtime.
    /// Refusals (compiler, options) come back from [`wait`](Self::wait); call
    /// [`Executor::check`] first to refuse before accepting any source.
    pub fn start(executor: &dyn Executor, desc: JobDesc) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(executor.compile(desc, rx));
        Self {
            source: Some(tx),
            task: Some(task),
        }
    }

    /// Hands the compiler the next chunk of source. Never waits: the chunk is queued for
    /// the compiler's stdin. [`Fed::Finished`] tells the caller at once that the compiler
    /// no longer wants source.
    pub fn feed(&mut self, chunk: Bytes) -> Fed {
        let Some(tx) = &self.source else {
            return Fed::SourceEnded;
        };
        if self.is_finished() || tx.send(chunk).is_err() {
            // The compile's receiver is gone only when the compile itself is.
            return Fed::Finished;
        }
        Fed::Accepted
    }

    /// Marks the end of the source: the compiler's stdin is closed once it has read what
    /// was fed.
    pub fn end_source(&mut self) {
        self.source = None;
    }

    /// Whether the compiler has exited (the result is ready for [`wait`](Self::wait)).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the result. Cancel-safe, so it can sit in a `select!` next to the loop
    /// receiving source: it resolves as soon as the compiler exits, even mid-upload. After
    /// it has returned once, further calls report [`ExecError::ResultTaken`].
    pub async fn wait(&mut self) -> Result<JobResult, ExecError> {
        let Some(task) = self.task.as_mut() else {
            return Err(ExecError::ResultTaken);
        };
        let joined = task.await;
        self.task = None;
        self.source = None;
        joined.map_err(|e| ExecError::Io(std::io::Error::other(e)))?
    }
}

impl Drop for Compile {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
