//! In-process transport: `mem://NAME` listeners in a process-wide registry, connected by
//! bounded `tokio::io::duplex` pipes.
//!
//! The embedded default runs its server this way, and tests use it to exercise the real
//! stream code paths without sockets. The pipes are bounded
//! ([`TransportOptions::mem_buffer`]) so a writer whose reader stalls waits, exactly as on
//! a socket, instead of growing memory without limit.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::io::DuplexStream;
use tokio::sync::{Mutex as AsyncMutex, mpsc};

use crate::address::Address;
use crate::error::TransportError;
use crate::options::TransportOptions;
use crate::stream::{BoxedStream, Listener, Peer};

/// How many connections may wait for `accept` on one in-memory listener; beyond that a
/// connect is refused, like a full TCP backlog, rather than queued without bound.
const BACKLOG: usize = 1024;

/// Name to (listener id, accept queue). The id tells a listener's own entry from one a
/// later listener registered under the same name.
type Registry = HashMap<String, (u64, mpsc::Sender<DuplexStream>)>;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding this lock cannot leave the map inconsistent (every operation
    // is a single insert, remove or lookup), so a poisoned lock is still usable.
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn connect(
    addr: &Address,
    name: &str,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    let sender = lock().get(name).map(|(_, s)| s.clone());
    let refused = || TransportError::Refused {
        addr: addr.clone(),
        source: None,
    };
    let sender = sender.ok_or_else(refused)?;
    let (ours, theirs) = tokio::io::duplex(opts.mem_buffer.max(1));
    // Fails when the listener went away since the look-up, or its queue is full.
    sender.try_send(theirs).map_err(|_| refused())?;
    Ok(Box::new(ours))
}

/// A registered in-memory listener; dropping it frees the name.
struct Mem {
    name: String,
    id: u64,
    accepted: AtomicU64,
    incoming: AsyncMutex<mpsc::Receiver<DuplexStream>>,
    local: Address,
}

impl Drop for Mem {
    fn drop(&mut self) {
        let mut map = lock();
        // Only free the name if it is still ours.
        if map.get(&self.name).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.name);
        }
    }
}

#[async_trait::async_trait]
impl Listener for Mem {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let stream = self.incoming.lock().await.recv().await.ok_or_else(|| {
            // The listener holds the registry's sender only through the registry, and
            // keeps its entry until dropped; kept as an error rather than a panic anyway.
            io::Error::new(io::ErrorKind::BrokenPipe, "in-memory listener closed")
        })?;
        let connection = self.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((Box::new(stream), Peer::Mem { connection }))
    }

    fn local_addr(&self) -> Address {
        self.local.clone()
    }
}

pub(crate) fn bind(addr: &Address, name: &str) -> Result<Box<dyn Listener>, TransportError> {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(BACKLOG);
    let mut map = lock();
    if map.contains_key(name) {
        return Err(TransportError::InUse { addr: addr.clone() });
    }
    map.insert(name.to_owned(), (id, tx));
    Ok(Box::new(Mem {
        name: name.to_owned(),
        id,
        accepted: AtomicU64::new(0),
        incoming: AsyncMutex::new(rx),
        local: addr.clone(),
    }))
}
