//! The server side of the driver: events out through a bounded channel, commands in.

use std::time::Instant;

use dcache_proto::{
    ConnStats, ErrorCode, JobId, JobResult, ResultOrigin, ServerConfig, ServerConnection,
    ServerEvent, Stat,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::{Owner, drive};

/// How many events may wait for the owner. When full, the driver stops reading the socket:
/// a slow owner slows the client down instead of growing memory.
const EVENT_QUEUE: usize = 64;

/// A command for a driven server connection (see the methods of
/// [`dcache_proto::ServerConnection`] of the same names).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ServerCommand {
    /// Answer a lookup with MISS.
    Miss(JobId),
    /// Send a result.
    Result {
        /// The job.
        job: JobId,
        /// The result.
        result: JobResult,
        /// Compiled, or from the cache (early in answer to HASH, or after the upload).
        origin: ResultOrigin,
    },
    /// End a job without a result.
    Abort {
        /// The job.
        job: JobId,
        /// Why.
        code: ErrorCode,
        /// For the client's user.
        message: String,
    },
    /// Answer a stats request.
    Stats(Vec<Stat>),
    /// Graceful shutdown of this connection.
    GoAway,
}

/// The owner's side of a driven server connection.
#[derive(Debug)]
pub struct ServerConnHandle {
    /// Events from the connection, in order; ends after [`ServerEvent::Closed`].
    pub events: mpsc::Receiver<ServerEvent>,
    /// Commands to the connection. Sending never blocks (results for open jobs are
    /// bounded by the jobs limit), so an owner can never deadlock against the driver.
    pub commands: mpsc::UnboundedSender<ServerCommand>,
    /// The connection's counters as they stand when it closes, sent once, just before
    /// [`ServerEvent::Closed`] (so they are ready when that event is seen). The sender is
    /// dropped without a value only if the driver ends without a Closed event.
    pub stats: oneshot::Receiver<ConnStats>,
}

/// Starts a task driving a server connection over `stream`.
/// Must be called within a tokio runtime.
pub fn spawn_server_connection<S>(stream: S, config: ServerConfig) -> ServerConnHandle
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (stats_tx, stats) = oneshot::channel();
    let now = super::now();
    let nonce = config.auth.as_ref().and_then(|_| super::fresh_nonce());
    let machine = match nonce {
        Some(nonce) => ServerConnection::with_nonce(config, now, nonce),
        None => ServerConnection::new(config, now),
    };
    let owner = ServerOwner {
        events: event_tx,
        commands: command_rx,
        stats: Some(stats_tx),
    };
    tokio::spawn(drive(machine, stream, owner));
    ServerConnHandle {
        events,
        commands,
        stats,
    }
}

struct ServerOwner {
    events: mpsc::Sender<ServerEvent>,
    commands: mpsc::UnboundedReceiver<ServerCommand>,
    /// Taken when the final counters are sent.
    stats: Option<oneshot::Sender<ConnStats>>,
}

impl Owner<ServerConnection> for ServerOwner {
    type Command = ServerCommand;

    async fn on_event(&mut self, machine: &mut ServerConnection, event: ServerEvent) {
        if matches!(event, ServerEvent::Closed { .. }) {
            if let Some(stats) = self.stats.take() {
                let _ = stats.send(machine.stats());
            }
        }
        // An owner that dropped its receiver no longer cares; the connection goes on
        // until the client is done or a timer ends it.
        let _ = self.events.send(event).await;
    }

    async fn next_command(&mut self) -> Option<ServerCommand> {
        self.commands.recv().await
    }

    fn apply(&mut self, machine: &mut ServerConnection, command: ServerCommand, _now: Instant) {
        // Commands for jobs that ended meanwhile are refused by the machine; that is the
        // normal race between a compile finishing and a client cancelling, not an error.
        let _ = match command {
            ServerCommand::Miss(job) => machine.send_miss(job),
            ServerCommand::Result {
                job,
                result,
                origin,
            } => machine.send_result(job, &result, origin),
            ServerCommand::Abort { job, code, message } => machine.abort_job(job, code, &message),
            ServerCommand::Stats(stats) => machine.send_stats(stats),
            ServerCommand::GoAway => {
                machine.goaway();
                Ok(())
            }
        };
    }

    fn on_owner_gone(&mut self, machine: &mut ServerConnection) {
        // Nobody can answer jobs any more: finish politely.
        machine.goaway();
    }
}
