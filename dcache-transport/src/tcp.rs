//! TCP: no Nagle, a deliberately small send buffer, and the real bound address.
//!
//! Why the send buffer is small: see [`TransportOptions::tcp_send_buffer`]. In short, an
//! early result can only stop the bytes the client still holds, never the ones already in
//! the kernel, so the kernel must not be allowed to swallow megabytes at once.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::address::Address;
use crate::error::TransportError;
use crate::options::TransportOptions;
use crate::stream::{BoxedStream, Listener, Peer};

/// Queue of connections the kernel completes before `accept` takes them.
const BACKLOG: u32 = 1024;

/// A socket of the right family with the configured send buffer.
fn socket(sa: SocketAddr, opts: &TransportOptions) -> io::Result<TcpSocket> {
    let socket = if sa.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    // Sizes beyond u32 are not meaningful to any kernel: clamp rather than wrap.
    let size = u32::try_from(opts.tcp_send_buffer).unwrap_or(u32::MAX);
    // Best effort: a kernel that refuses the size keeps its default, which only costs the
    // early stop some precision; it is no reason to fail the connection.
    let _ = socket.set_send_buffer_size(size);
    Ok(socket)
}

pub(crate) async fn connect(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    Ok(Box::new(connect_stream(addr, host, port, opts).await?))
}

/// A connected socket with the configured send buffer and no Nagle: what `tcp://` uses
/// as it is and `tls://` wraps.
pub(crate) async fn connect_stream(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<TcpStream, TransportError> {
    let resolved: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TransportError::io(addr, e))?
        .collect();
    // Try every address the name resolves to (IPv6 and IPv4, say) before giving up, and
    // report the last failure.
    let mut last = None;
    for sa in resolved {
        let attempt = async {
            let stream = socket(sa, opts)?.connect(sa).await?;
            // Frames are whole when written; Nagle would only delay the small ones (HASH,
            // ABORT) that the protocol's latency depends on.
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(stream)
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => TransportError::io(addr, e),
        None => TransportError::Unresolved { addr: addr.clone() },
    })
}

/// A bound TCP listener.
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

pub(crate) async fn bind(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<Box<dyn Listener>, TransportError> {
    let (listener, bound) = bind_listener(addr, host, port, opts).await?;
    Ok(Box::new(Tcp {
        listener,
        local: Address::Tcp {
            host: bound.ip().to_string(),
            port: bound.port(),
        },
    }))
}

/// A listening socket whose accepted sockets get the configured send buffer, and the
/// address it really bound: what `tcp://` uses as it is and `tls://` wraps.
pub(crate) async fn bind_listener(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<(TcpListener, SocketAddr), TransportError> {
    let sa = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TransportError::bind_io(addr, e))?
        .next()
        .ok_or_else(|| TransportError::Unresolved { addr: addr.clone() })?;
    let listener = (|| {
        // Accepted sockets inherit the listening socket's send buffer on Linux and the
        // BSDs, so setting it here covers the server's side of every connection.
        let socket = socket(sa, opts)?;
        // A restarted server can take its port back while old connections sit in
        // TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(sa)?;
        socket.listen(BACKLOG)
    })()
    .map_err(|e| TransportError::bind_io(addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| TransportError::bind_io(addr, e))?;
    Ok((listener, bound))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_send_buffer_is_the_configured_one_not_the_autotuned_default() {
        let opts = TransportOptions::default().with_tcp_send_buffer(64 * 1024);
        let s = socket("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        // Linux doubles the request for its bookkeeping; any other value means the
        // setting was lost.
        assert_eq!(s.send_buffer_size().unwrap(), 2 * 64 * 1024);
    }
}
