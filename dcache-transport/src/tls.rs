//! TLS over TCP (`tls://`): the same sockets as `tcp://` (small send buffer, no Nagle)
//! with rustls between them and the frames.
//!
//! Three things here are not plain rustls:
//! - **The server handshakes lazily**, inside the accepted stream's first read or write,
//!   under its own deadline. `accept` returns at once, so one silent peer never holds up
//!   the accept loop, the server's address checks run before any handshake work is spent
//!   on a peer, and the handshake counts against the server's handshake pool and timeout
//!   like the rest of the opening.
//! - **The wrong protocol is named, not read as garbage.** A TLS listener peeks at the
//!   first byte: a dcache HELLO gets a plain dcache ERROR saying the port speaks TLS. A
//!   client whose handshake fails looks at what it received: plain dcache frames mean a
//!   `tcp://` server, and the ERROR it sent (a plain dcache server names a TLS
//!   ClientHello as such) is quoted.
//! - **The send buffer stays small.** rustls holds up to 64 KiB of records by default on
//!   top of the kernel's send buffer; an early result can only stop what has not been
//!   committed yet, so the limit is lowered to [`TLS_BUFFER`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use dcache_proto::{ErrorCode, Frame, FrameDecoder, Limits, ServerConnection};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::address::Address;
use crate::error::{TlsFailure, TransportError};
use crate::options::TransportOptions;
use crate::stream::{BoxedStream, Listener, Peer};
use crate::tls_config::{TlsClient, TlsServer};

/// Most TLS records rustls may hold unsent, per direction, once the handshake is done:
/// two full records. Enough to keep the socket busy, small next to the kernel's send
/// buffer, so TLS adds little to what an early result cannot recall any more.
pub const TLS_BUFFER: usize = 2 * 16 * 1024 + 2 * 64;

/// The first byte of a TLS handshake record (a ClientHello starts with it).
const TLS_HANDSHAKE: u8 = 0x16;
/// TLS record content types run from change_cipher_spec (0x14) to application_data
/// (0x17); a first byte outside them is not TLS.
const TLS_CONTENT_TYPES: std::ops::RangeInclusive<u8> = 0x14..=0x17;
/// The first byte of a dcache HELLO frame (its type).
const DCACHE_HELLO: u8 = 0x01;
/// Bytes of the server's first answer a client keeps, to tell a plain dcache server
/// (and quote its ERROR, at most 1 KiB of message) from a TLS one.
const RECORDED: usize = 2048;
/// Bytes a TLS listener reads and discards from a plain dcache client after telling it
/// so, waiting for it to close: closing on unread bytes would reset the connection and
/// could destroy the explanation before the client read it.
const REFUSAL_DRAIN: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

pub(crate) async fn connect(
    addr: &Address,
    host: &str,
    port: u16,
    opts: &TransportOptions,
) -> Result<BoxedStream, TransportError> {
    let tls = match &opts.tls_client {
        Some(tls) => tls.clone(),
        None => TlsClient::system_default().map_err(|reason| TransportError::TlsConfig {
            addr: addr.clone(),
            reason,
        })?,
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TransportError::Tls {
        addr: addr.clone(),
        failure: TlsFailure::BadServerName { host: host.into() },
    })?;
    let tcp = crate::tcp::connect_stream(addr, host, port, opts).await?;
    let handshake = TlsConnector::from(tls.config)
        .connect(name, Recording::new(tcp))
        .into_fallible();
    match handshake.await {
        Ok(mut stream) => {
            let (io, conn) = stream.get_mut();
            io.stop();
            conn.set_buffer_limit(Some(TLS_BUFFER));
            Ok(Box::new(ClientTls {
                inner: stream,
                stash: BytesMut::new(),
            }))
        }
        Err((e, io)) => Err(TransportError::Tls {
            addr: addr.clone(),
            failure: client_failure(&e, &io.seen, host),
        }),
    }
}

/// Why a client's handshake failed, from the error and the first bytes the server sent.
fn client_failure(e: &io::Error, seen: &[u8], host: &str) -> TlsFailure {
    if seen.first().is_some_and(|b| !TLS_CONTENT_TYPES.contains(b)) {
        return TlsFailure::PlainServer {
            said: dcache_error_message(seen),
        };
    }
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => TlsFailure::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName { host: host.into() }
            }
            other => TlsFailure::Other(format!("the server's certificate is invalid: {other:?}")),
        },
        Some(rustls::Error::AlertReceived(alert)) => TlsFailure::Refused {
            alert: format!("{alert:?}"),
        },
        Some(other) => TlsFailure::Other(other.to_string()),
        None if seen.is_empty()
            && matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            TlsFailure::Closed
        }
        None => TlsFailure::Other(e.to_string()),
    }
}

/// The message of the dcache ERROR frame `bytes` begin with, if they do.
fn dcache_error_message(bytes: &[u8]) -> Option<String> {
    let mut buf = BytesMut::from(bytes);
    match FrameDecoder::new(Limits::BASELINE.max_frame_payload).decode(&mut buf) {
        Ok(Some(Frame::Error { code, message })) => Some(format!("{code}: {message}")),
        _ => None,
    }
}

/// A stream that keeps a copy of the first [`RECORDED`] bytes read from it until told to
/// stop: after a failed handshake they tell what kind of server answered.
struct Recording<S> {
    inner: S,
    seen: Vec<u8>,
    on: bool,
}

impl<S> Recording<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            seen: Vec::new(),
            on: true,
        }
    }

    /// The handshake is done: nothing more to keep.
    fn stop(&mut self) {
        self.on = false;
        self.seen = Vec::new();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.on && this.seen.len() < RECORDED {
            let new = &buf.filled()[before..];
            let take = new.len().min(RECORDED - this.seen.len());
            this.seen.extend_from_slice(&new[..take]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client's TLS stream, which explains a server's refusal of its certificate.
///
/// In TLS 1.3 the client's side of the handshake is finished before the server has
/// checked the client's certificate, so a refusal arrives as an alert on the first read;
/// it is turned into a `PermissionDenied` error that says what to fix.
struct ClientTls {
    inner: tokio_rustls::client::TlsStream<Recording<TcpStream>>,
    /// Bytes read while looking for the reason of a failed write, delivered by the next
    /// reads: the server's last frames (an ERROR, say) must not be lost to the search.
    stash: BytesMut,
}

/// The explanation for an alert that refuses this client's certificate, if `e` is one.
fn certificate_refusal(e: io::Error) -> io::Error {
    let alert = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => *alert,
        _ => return e,
    };
    let message = match alert {
        AlertDescription::CertificateRequired => {
            "the server requires a client certificate and this client presented none \
             (DCACHE_TLS_CERT and DCACHE_TLS_KEY for the dcache wrapper)"
        }
        AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::AccessDenied => {
            "the server refused this client's certificate: it must be current and issued \
             by the CA the server trusts for clients (dcache-server --tls-client-ca)"
        }
        _ => return e,
    };
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{message} (TLS alert {alert:?})"),
    )
}

impl AsyncRead for ClientTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.stash.is_empty() {
            let n = this.stash.len().min(buf.remaining());
            buf.put_slice(&this.stash.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner)
            .poll_read(cx, buf)
            .map_err(certificate_refusal)
    }
}

impl ClientTls {
    /// A write failed (the server closed after refusing us, say): the reason, if the
    /// server sent one and it has arrived, is a better error than the broken pipe.
    fn why_closed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        let mut chunk = [0u8; 4096];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
            Poll::Ready(Err(alert)) => match certificate_refusal(alert) {
                explained if explained.kind() == io::ErrorKind::PermissionDenied => explained,
                _ => e,
            },
            Poll::Ready(Ok(())) => {
                self.stash.extend_from_slice(buf.filled());
                e
            }
            Poll::Pending => e,
        }
    }
}

impl AsyncWrite for ClientTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.why_closed(cx, e))),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.why_closed(cx, e))),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// A bound `tls://` listener.
struct Tls {
    listener: TcpListener,
    local: Address,
    tls: TlsServer,
}

#[async_trait::async_trait]
impl Listener for Tls {
    async fn accept(&self) -> io::Result<(BoxedStream, Peer)> {
        let (stream, peer) = self.listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok((
            Box::new(ServerTls::new(stream, peer, &self.tls)),
            Peer::Tcp(peer),
        ))
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
    let Some(tls) = opts.tls_server.clone() else {
        return Err(TransportError::TlsConfig {
            addr: addr.clone(),
            reason: "a tls:// listener needs a certificate and its key (dcache-server \
                     --tls-cert and --tls-key)"
                .into(),
        });
    };
    let (listener, bound) = crate::tcp::bind_listener(addr, host, port, opts).await?;
    Ok(Box::new(Tls {
        listener,
        local: Address::Tls {
            host: bound.ip().to_string(),
            port: bound.port(),
        },
        tls,
    }))
}

/// Where an accepted TLS stream is in its opening.
enum State {
    /// Waiting for the first byte, to tell a TLS client from a plain dcache one.
    Sniffing(TcpStream, TlsAcceptor),
    /// Turning a peer away: writing `reply` (a plain dcache ERROR for a plain client;
    /// nothing after a failed handshake, whose alert rustls has written), then closing
    /// and reading until the peer closes too, so the explanation is not destroyed by a
    /// reset. The stream then fails with `failure`.
    Refusing {
        tcp: TcpStream,
        reply: Bytes,
        shut: bool,
        drained: usize,
        failure: (io::ErrorKind, String),
    },
    /// The TLS handshake (boxed: rustls's connection state is large, and the stream
    /// spends almost all its life in `Ready`).
    Handshaking(Box<tokio_rustls::FallibleAccept<TcpStream>>),
    /// Open: reads and writes go through TLS.
    Ready(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The opening failed; every read and write reports why.
    Failed(io::ErrorKind, String),
}

/// An accepted TLS stream that performs its opening (peek, handshake) on the first read,
/// write or flush.
struct ServerTls {
    state: State,
    /// The end of the opening's time; dropped once open.
    deadline: Option<Pin<Box<Sleep>>>,
    limit: Duration,
    peer: SocketAddr,
}

impl ServerTls {
    fn new(tcp: TcpStream, peer: SocketAddr, tls: &TlsServer) -> Self {
        Self {
            state: State::Sniffing(tcp, TlsAcceptor::from(tls.config.clone())),
            deadline: Some(Box::pin(tokio::time::sleep(tls.handshake_timeout))),
            limit: tls.handshake_timeout,
            peer,
        }
    }

    fn fail(&mut self, kind: io::ErrorKind, message: String) {
        if kind == io::ErrorKind::UnexpectedEof {
            // Port scanners and health checks connect and close: not worth a line each.
            tracing::debug!("TLS connection from {}: {message}", self.peer);
        } else {
            tracing::info!("TLS connection from {} refused: {message}", self.peer);
        }
        self.state = State::Failed(kind, message);
        self.deadline = None;
    }

    /// Drives the opening until the stream is open or has failed.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &self.state {
                State::Ready(_) => return Poll::Ready(Ok(())),
                State::Failed(kind, message) => {
                    return Poll::Ready(Err(io::Error::new(*kind, message.clone())));
                }
                _ => {}
            }
            if let Some(deadline) = &mut self.deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    let limit = self.limit;
                    self.fail(
                        io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {limit:?}"),
                    );
                    continue;
                }
            }
            // A placeholder while the state is taken apart; every arm puts one back.
            let placeholder = State::Failed(io::ErrorKind::Other, "opening interrupted".into());
            match std::mem::replace(&mut self.state, placeholder) {
                State::Sniffing(tcp, acceptor) => {
                    let mut first = [0u8; 1];
                    let mut buf = ReadBuf::new(&mut first);
                    match tcp.poll_peek(cx, &mut buf) {
                        Poll::Pending => {
                            self.state = State::Sniffing(tcp, acceptor);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            self.fail(e.kind(), format!("before its handshake: {e}"))
                        }
                        Poll::Ready(Ok(0)) => self.fail(
                            io::ErrorKind::UnexpectedEof,
                            "closed the connection before its TLS handshake".into(),
                        ),
                        Poll::Ready(Ok(_)) => match first[0] {
                            TLS_HANDSHAKE => {
                                self.state = State::Handshaking(Box::new(
                                    acceptor.accept(tcp).into_fallible(),
                                ));
                            }
                            DCACHE_HELLO => {
                                self.state = State::Refusing {
                                    tcp,
                                    reply: ServerConnection::refusal(
                                        ErrorCode::PROTOCOL,
                                        "this port speaks TLS: connect with tls://HOST:PORT",
                                    ),
                                    shut: false,
                                    drained: 0,
                                    failure: (
                                        io::ErrorKind::InvalidData,
                                        "a plain dcache client connected to this TLS port; it \
                                         was told to use tls://"
                                            .into(),
                                    ),
                                };
                            }
                            other => self.fail(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "first byte 0x{other:02x} begins neither a TLS ClientHello \
                                     nor a dcache HELLO"
                                ),
                            ),
                        },
                    }
                }
                State::Refusing {
                    tcp,
                    reply,
                    shut,
                    drained,
                    failure,
                } => return self.poll_refusal(cx, tcp, reply, shut, drained, failure),
                State::Handshaking(mut accept) => match Pin::new(&mut *accept).poll(cx) {
                    Poll::Pending => {
                        self.state = State::Handshaking(accept);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(mut stream)) => {
                        stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
                        self.state = State::Ready(Box::new(stream));
                        self.deadline = None;
                    }
                    Poll::Ready(Err((e, tcp))) => {
                        self.state = State::Refusing {
                            tcp,
                            reply: Bytes::new(),
                            shut: false,
                            drained: 0,
                            failure: (e.kind(), server_failure(&e)),
                        };
                    }
                },
                done @ (State::Ready(_) | State::Failed(..)) => self.state = done,
            }
        }
    }

    /// Writes `reply`, closes the sending side, then reads (a bounded amount) until the
    /// peer closes too; the stream has then failed with `failure`.
    fn poll_refusal(
        &mut self,
        cx: &mut Context<'_>,
        mut tcp: TcpStream,
        mut reply: Bytes,
        mut shut: bool,
        mut drained: usize,
        failure: (io::ErrorKind, String),
    ) -> Poll<io::Result<()>> {
        let pending = loop {
            if !reply.is_empty() {
                match Pin::new(&mut tcp).poll_write(cx, &reply) {
                    Poll::Pending => break true,
                    Poll::Ready(Ok(n)) if n > 0 => reply.advance(n),
                    Poll::Ready(_) => break false,
                }
            } else if !shut {
                match Pin::new(&mut tcp).poll_shutdown(cx) {
                    Poll::Pending => break true,
                    Poll::Ready(_) => shut = true,
                }
            } else {
                let mut sink = [0u8; 4096];
                let mut buf = ReadBuf::new(&mut sink);
                match Pin::new(&mut tcp).poll_read(cx, &mut buf) {
                    Poll::Pending => break true,
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                        drained += buf.filled().len();
                        if drained >= REFUSAL_DRAIN {
                            break false;
                        }
                    }
                    Poll::Ready(_) => break false,
                }
            }
        };
        if pending {
            self.state = State::Refusing {
                tcp,
                reply,
                shut,
                drained,
                failure,
            };
            return Poll::Pending;
        }
        self.fail(failure.0, failure.1);
        self.poll_open(cx)
    }

    fn open(&mut self) -> Option<&mut tokio_rustls::server::TlsStream<TcpStream>> {
        match &mut self.state {
            State::Ready(stream) => Some(stream),
            _ => None,
        }
    }
}

/// Why a server's handshake with a client failed, in the operator's terms.
fn server_failure(e: &io::Error) -> String {
    let what = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client presented no certificate and this listener requires one".into()
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the client's certificate is not issued by the client CA (--tls-client-ca)".into()
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "the client's certificate has expired".into(),
        Some(other) => other.to_string(),
        None => e.to_string(),
    };
    format!("TLS handshake failed: {what}")
}

impl AsyncRead for ServerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_open(cx))?;
        match this.open() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_open(cx))?;
        match this.open() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Flushing finishes the opening too, so a caller that wants the handshake done
        // before it reads or writes anything (a test, a proxy) can have it.
        let this = self.get_mut();
        ready!(this.poll_open(cx))?;
        match this.open() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A stream that never opened has nothing to close politely: dropping it closes
        // the socket.
        match self.get_mut().open() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}
