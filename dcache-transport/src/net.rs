//! TCP and Unix-socket transports.

use std::io;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpSocket, UnixListener, UnixStream};

use crate::addr::Address;
use crate::stream::{BoxedStream, Listener, Peer, TransportError, TransportOptions};

pub(crate) async fn connect_tcp(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    let resolved: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TransportError::io(addr, e))?
        .collect();
    let mut last = None;
    for sa in resolved {
        let socket = if sa.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| TransportError::io(addr, e))?;
        // Best effort: a kernel that refuses the size keeps its default.
        let _ = socket.set_send_buffer_size(opts.tcp_send_buffer as u32);
        match socket.connect(sa).await {
            Ok(stream) => {
                // Frames are whole when written; Nagle would only delay the small ones
                // (HASH, ABORT) that the protocol's latency depends on.
                stream
                    .set_nodelay(true)
                    .map_err(|e| TransportError::io(addr, e))?;
                return Ok(Box::new(stream));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => TransportError::io(addr, e),
        None => TransportError::Unresolved { addr: addr.clone() },
    })
}

struct Tcp {
    listener: TcpListener,
    local: Address,
}

#[async_trait::async_trait]
impl Listener for Tcp {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let (stream, peer) = self.listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok((Box::new(stream), Peer::Tcp(peer)))
    }

    fn local_addr(&self) -> Address {
        self.local.clone()
    }
}

pub(crate) async fn bind_tcp(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<Box<dyn Listener>, TransportError> {
    let sa = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TransportError::io(addr, e))?
        .next()
        .ok_or_else(|| TransportError::Unresolved { addr: addr.clone() })?;
    let socket = if sa.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| TransportError::io(addr, e))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| TransportError::io(addr, e))?;
    // Accepted sockets inherit the listening socket's send buffer on Linux and the BSDs.
    let _ = socket.set_send_buffer_size(opts.tcp_send_buffer as u32);
    socket.bind(sa).map_err(|e| TransportError::io(addr, e))?;
    let listener = socket
        .listen(1024)
        .map_err(|e| TransportError::io(addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| TransportError::io(addr, e))?;
    Ok(Box::new(Tcp {
        listener,
        local: Address::Tcp {
            host: bound.ip().to_string(),
            port: bound.port(),
        },
    }))
}

pub(crate) async fn connect_unix(
    addr: &Address,
    path: &Path,
) -> Result<BoxedStream, TransportError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| TransportError::io(addr, e))?;
    Ok(Box::new(stream))
}

/// A Unix listener that removes its socket file when dropped.
struct Unix {
    listener: UnixListener,
    path: PathBuf,
    local: Address,
}

impl Drop for Unix {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait::async_trait]
impl Listener for Unix {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((Box::new(stream), Peer::Unix))
    }

    fn local_addr(&self) -> Address {
        self.local.clone()
    }
}

pub(crate) async fn bind_unix(
    addr: &Address,
    path: &Path,
) -> Result<Box<dyn Listener>, TransportError> {
    if path.exists() {
        // A socket file left by a crashed server is removed; one with a live listener is
        // not: that would steal another server's address.
        if UnixStream::connect(path).await.is_ok() {
            return Err(TransportError::InUse { addr: addr.clone() });
        }
        std::fs::remove_file(path).map_err(|e| TransportError::io(addr, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| TransportError::io(addr, e))?;
    Ok(Box::new(Unix {
        listener,
        path: path.to_owned(),
        local: addr.clone(),
    }))
}
