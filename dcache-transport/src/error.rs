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
            | Self::Io { addr, .. } => addr,
        }
    }
}
