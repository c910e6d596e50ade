//! One stream type and one connect / listen API over every transport.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::addr::Address;

/// A bidirectional byte stream, whatever carries it.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A stream behind a box, so TCP, Unix, in-memory and simulated streams are one type to
/// the driver and to applications.
pub type BoxedStream = Box<dyn Stream>;

/// Who is on the other end of an accepted stream. Access control (CIDR allow-lists) needs
/// the IP of TCP peers; local transports are trusted as the local user.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A TCP peer and its address.
    Tcp(SocketAddr),
    /// A process on this machine, through a Unix socket.
    Unix,
    /// This process, through an in-memory pipe.
    Mem,
}

/// Settings shared by every transport.
#[derive(Clone, Copy, Debug)]
pub struct TransportOptions {
    /// Kernel send buffer for TCP sockets. Small on purpose: bytes handed to the kernel can
    /// no longer be recalled, so a large buffer would let megabytes of source be committed
    /// before an early result arrives and make the client's stop pointless. 256 KiB still
    /// fills a 1 Gbit/s link at a 2 ms round trip; the kernel's autotuning of the receive
    /// side is left alone.
    pub tcp_send_buffer: usize,
    /// Capacity of each direction of an in-memory pipe.
    pub mem_buffer: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            tcp_send_buffer: 256 * 1024,
            mem_buffer: 256 * 1024,
        }
    }
}

/// Why a connect or bind failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Nothing listens there (TCP refused, no socket file, no in-process listener).
    #[error("{addr}: connection refused{}", detail(.source))]
    Refused {
        /// The address.
        addr: Address,
        /// The system's error, when there was one.
        source: Option<io::Error>,
    },
    /// The address is taken by another listener.
    #[error("{addr}: address already in use")]
    InUse {
        /// The address.
        addr: Address,
    },
    /// A host name resolved to nothing.
    #[error("{addr}: host name did not resolve")]
    Unresolved {
        /// The address.
        addr: Address,
    },
    /// Any other system error.
    #[error("{addr}: {source}")]
    Io {
        /// The address.
        addr: Address,
        /// The system's error.
        source: io::Error,
    },
}

fn detail(e: &Option<io::Error>) -> String {
    e.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
}

impl TransportError {
    pub(crate) fn io(addr: &Address, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => Self::Refused {
                addr: addr.clone(),
                source: Some(source),
            },
            io::ErrorKind::AddrInUse => Self::InUse { addr: addr.clone() },
            _ => Self::Io {
                addr: addr.clone(),
                source,
            },
        }
    }
}

/// Accepts streams on one address.
#[async_trait::async_trait]
pub trait Listener: Send + Sync {
    /// The next incoming stream and who sent it.
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)>;
    /// The address actually bound (with the real port when binding port 0).
    fn local_addr(&self) -> Address;
}

/// Connects to `addr`.
pub async fn connect(
    addr: &Address,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    match addr {
        Address::Tcp { host, port } => crate::net::connect_tcp(addr, host, *port, opts).await,
        Address::Unix(path) => crate::net::connect_unix(addr, path).await,
        Address::Mem(name) => crate::memory::connect(addr, name, opts),
    }
}

/// Listens on `addr`.
pub async fn bind(
    addr: &Address,
    opts: &TransportOptions,
) -> Result<Box<dyn Listener>, TransportError> {
    match addr {
        Address::Tcp { host, port } => crate::net::bind_tcp(addr, host, *port, opts).await,
        Address::Unix(path) => crate::net::bind_unix(addr, path).await,
        Address::Mem(name) => crate::memory::bind(addr, name),
    }
}
