//! Why connecting or binding failed, typed so callers can react (a client falls through to
//! the next host on [`TransportError::Refused`]; a server reports
//! [`TransportError::InUse`] as a configuration problem).

use std::io;

use crate::address::Address;

/// Why a connect or bind failed. Every message starts with the address.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Nothing listens there: TCP refused, no socket file or a stale one, no in-process
    /// listener of that name (or its accept queue is full).
    #[error("{addr}: connection refused{}", detail(.source))]
    Refused {
        /// The address.
        addr: Address,
        /// The system's error, when there was one (none for `mem://`).
        source: Option<io::Error>,
    },
    /// The address is taken by another live listener.
    #[error("{addr}: address already in use")]
    InUse {
        /// The address.
        addr: Address,
    },
    /// A Unix socket path names a file that is not a socket. It is left alone: deleting
    /// whatever sits at a mistyped path would be far worse than refusing to start.
    #[error("{addr}: the path exists and is not a socket; not removing it")]
    NotASocket {
        /// The address.
        addr: Address,
    },
    /// A host name resolved to no address.
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
    /// The TLS handshake failed; the failure names the usual mistake behind it.
    #[error("{addr}: TLS handshake failed: {failure}")]
    Tls {
        /// The address.
        addr: Address,
        /// Why.
        failure: TlsFailure,
    },
    /// A `tls://` address cannot be used with the TLS settings at hand: a listener without
    /// a certificate, or a client whose system trust store is unusable.
    #[error("{addr}: {reason}")]
    TlsConfig {
        /// The address.
        addr: Address,
        /// What is missing or wrong.
        reason: String,
    },
}

/// Why a TLS handshake failed, sorted into the mistakes people make, each with what to
/// check. Anything else keeps the TLS library's own words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate is not issued by a CA this client trusts.
    #[error(
        "the server's certificate is not issued by a CA this client trusts (give the client \
         the CA that signed it: DCACHE_TLS_CA for the dcache wrapper)"
    )]
    UnknownIssuer,
    /// The server's certificate has expired.
    #[error("the server's certificate has expired: renew it")]
    Expired,
    /// The server's certificate is not valid yet (or one of the two clocks is wrong).
    #[error("the server's certificate is not valid yet: check both machines' clocks")]
    NotYetValid,
    /// The server's certificate does not name the host the address gives.
    #[error(
        "the server's certificate is not valid for {host:?}: connect with a name (or IP) \
         the certificate lists"
    )]
    WrongName {
        /// The host of the address.
        host: String,
    },
    /// The address's host is not something a certificate can be checked against.
    #[error("{host:?} is not a valid TLS server name")]
    BadServerName {
        /// The host of the address.
        host: String,
    },
    /// The server answered in plain dcache: its listener is `tcp://`, not `tls://`.
    #[error(
        "the server speaks plain dcache on this port, not TLS (use tcp:// for it, or start it \
         with a tls:// listener){}",
        said.as_ref().map(|m| format!("; it said: {m}")).unwrap_or_default()
    )]
    PlainServer {
        /// The message of the ERROR frame it sent, if it sent one.
        said: Option<String>,
    },
    /// The server sent a fatal TLS alert during the handshake.
    #[error("the server refused the handshake ({alert})")]
    Refused {
        /// The alert, as the TLS library names it.
        alert: String,
    },
    /// The connection closed before the handshake finished, without a word.
    #[error(
        "the server closed the connection during the handshake (is this port a tls:// \
         listener? does it allow this client's address?)"
    )]
    Closed,
    /// Anything else, in the TLS library's words.
    #[error("{0}")]
    Other(String),
}

fn detail(e: &Option<io::Error>) -> String {
    e.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
}

impl TransportError {
    /// Classifies a system error: refused and in-use get their own variants so callers can
    /// match on them without inspecting `io::ErrorKind`.
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

    /// Classifies a system error from binding: only "in use" gets its own variant (a
    /// missing directory is not a refusal).
    pub(crate) fn bind_io(addr: &Address, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::AddrInUse => Self::InUse { addr: addr.clone() },
            _ => Self::Io {
                addr: addr.clone(),
                source,
            },
        }
    }

    /// The address the failed operation was for.
    pub fn addr(&self) -> &Address {
        match self {
            Self::Refused { addr, .. }
            | Self::InUse { addr }
            | Self::NotASocket { addr }
            | Self::Unresolved { addr }
            | Self::Io { addr, .. }
            | Self::Tls { addr, .. }
            | Self::TlsConfig { addr, .. } => addr,
        }
    }
}
