//! What the client's integration tests share: a real service over `mem://`, with a fake
//! compiler and an in-memory cache, and a way to read its counters.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // not every test uses all

use std::sync::Arc;
use std::time::Duration;

use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{Address, TransportOptions, bind};

/// A service listening on `mem://{name}`; it stops when the sender is dropped.
pub(crate) async fn serve(name: &str) -> (Arc<Service>, Address, tokio::sync::oneshot::Sender<()>) {
    let service = Service::new(
        Arc::new(MemoryStore::new(1 << 30)),
        Arc::new(FakeExecutor::new(Duration::from_millis(1))),
        ServiceConfig::default(),
    );
    let addr: Address = format!("mem://{name}").parse().unwrap();
    let listener = bind(&addr, &TransportOptions::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = service.clone();
    tokio::spawn(async move {
        s.serve(listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    (service, addr, stop)
}

/// The service's counter `name` (0 if it has none).
pub(crate) fn stat(service: &Service, name: &str) -> u64 {
    service
        .stats()
        .iter()
        .find(|s| s.name == name)
        .map_or(0, |s| s.value)
}
