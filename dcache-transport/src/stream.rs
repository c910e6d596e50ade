//! One stream type and one connect / listen API over every transport.
//!
//! Streams are boxed trait objects rather than an enum: the driver and applications are
//! written once against [`BoxedStream`], and new kinds of stream (the simulated link, a
//! test double, TLS) fit without touching a closed list of variants. The cost, one
//! allocation per connection and a virtual call per read or write, is nothing next to a
//! system call.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::address::Address;
use crate::error::TransportError;
use crate::options::TransportOptions;

/// A bidirectional byte stream, whatever carries it. Implemented for every
/// `AsyncRead + AsyncWrite + Send + Unpin + 'static` type, so a TCP or Unix stream, an
/// in-memory pipe or a [`SimStream`](crate::sim::SimStream) all qualify.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A stream behind a box, so TCP, Unix, in-memory and simulated streams are one type to
/// the driver and to applications. It is `Unpin`, so `AsyncReadExt` / `AsyncWriteExt`
/// work on it directly.
pub type BoxedStream = Box<dyn Stream>;

/// Who is on the other end of an accepted stream.
///
/// Access control needs the IP of TCP peers (CIDR allow-lists); local transports are
/// already limited to this machine or this process, and Unix peers can be checked by user.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A TCP peer's address (with or without TLS): its IP is what access control checks.
    Tcp(SocketAddr),
    /// A process on this machine, through a Unix socket.
    #[non_exhaustive]
    Unix {
        /// The peer process's user id, when the system reports credentials.
        uid: Option<u32>,
        /// The peer process's id, when the system reports it (for logs).
        pid: Option<i32>,
    },
    /// A task in this process, through an in-memory pipe.
    #[non_exhaustive]
    Mem {
        /// This listener's connections numbered from 1, to tell them apart in logs.
        connection: u64,
    },
}

impl Peer {
    /// The peer's IP address, for TCP peers; `None` for local transports, which have none.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Tcp(sa) => Some(sa.ip()),
            Self::Unix { .. } | Self::Mem { .. } => None,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(sa) => write!(f, "tcp {sa}"),
            Self::Unix { uid, pid } => {
                f.write_str("unix")?;
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                Ok(())
            }
            Self::Mem { connection } => write!(f, "mem #{connection}"),
        }
    }
}

/// Accepts streams on one address. A trait object so a server runs the same accept loop
/// over every transport.
#[async_trait::async_trait]
pub trait Listener: Send + Sync {
    /// The next incoming stream and who sent it. A `tls://` stream is returned before its
    /// handshake, which runs on its first read, write or flush under its own time limit
    /// ([`TlsServer::with_handshake_timeout`](crate::TlsServer::with_handshake_timeout)),
    /// so one slow peer never holds up the next accept. An error concerns this accept only (the
    /// peer gave up, or descriptors ran out); the listener stays usable, except for a
    /// `mem://` listener, which never fails.
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)>;
    /// The address actually bound: with the real port when binding `tcp://HOST:0`, so
    /// tests and the embedded server can tell clients where to connect.
    fn local_addr(&self) -> Address;
}

/// Opens streams to addresses. A trait so that code which connects (the client, its host
/// list) can be handed another way to reach a server, such as a simulated link, in tests
/// and benchmarks. [`TransportOptions`] implements it with the real transports.
#[async_trait::async_trait]
pub trait Connector: Send + Sync {
    /// A stream to `addr`.
    async fn connect(&self, addr: &Address) -> Result<BoxedStream, TransportError>;
}

#[async_trait::async_trait]
impl Connector for TransportOptions {
    async fn connect(&self, addr: &Address) -> Result<BoxedStream, TransportError> {
        connect(addr, self).await
    }
}

/// Connects to `addr` over the transport its scheme names.
pub async fn connect(
    addr: &Address,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    match addr {
        Address::Tcp { host, port } => crate::tcp::connect(addr, host, *port, opts).await,
        Address::Tls { host, port } => crate::tls::connect(addr, host, *port, opts).await,
        Address::Unix(path) => crate::unix::connect(addr, path).await,
        Address::Mem(name) => crate::mem::connect(addr, name, opts),
    }
}

/// Listens on `addr` over the transport its scheme names.
pub async fn bind(
    addr: &Address,
    opts: &TransportOptions,
) -> Result<Box<dyn Listener>, TransportError> {
    match addr {
        Address::Tcp { host, port } => crate::tcp::bind(addr, host, *port, opts).await,
        Address::Tls { host, port } => crate::tls::bind(addr, host, *port, opts).await,
        Address::Unix(path) => crate::unix::bind(addr, path).await,
        Address::Mem(name) => crate::mem::bind(addr, name),
    }
}
