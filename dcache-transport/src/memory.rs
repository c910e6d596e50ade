//! In-process transport: `mem://NAME` listeners in a process-wide registry, connected by
//! bounded in-memory pipes. The embedded default runs its server this way.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::io::DuplexStream;
use tokio::sync::{Mutex as AsyncMutex, mpsc};

use crate::addr::Address;
use crate::stream::{BoxedStream, Listener, Peer, TransportError, TransportOptions};

/// How many connections may wait for `accept` on one in-memory listener.
const BACKLOG: usize = 1024;

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
    sender.try_send(theirs).map_err(|_| refused())?;
    Ok(Box::new(ours))
}

struct Mem {
    name: String,
    id: u64,
    incoming: AsyncMutex<mpsc::Receiver<DuplexStream>>,
    local: Address,
}

impl Drop for Mem {
    fn drop(&mut self) {
        let mut map = lock();
        // Only free the name if it is still ours (not rebound after a race).
        if map.get(&self.name).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.name);
        }
    }
}

#[async_trait::async_trait]
impl Listener for Mem {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let stream = self
            .incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "listener closed"))?;
        Ok((Box::new(stream), Peer::Mem))
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
    if map.get(name).is_some_and(|(_, s)| !s.is_closed()) {
        return Err(TransportError::InUse { addr: addr.clone() });
    }
    map.insert(name.to_owned(), (id, tx));
    Ok(Box::new(Mem {
        name: name.to_owned(),
        id,
        incoming: AsyncMutex::new(rx),
        local: addr.clone(),
    }))
}
