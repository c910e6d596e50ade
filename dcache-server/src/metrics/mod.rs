//! The operator's window: an HTTP endpoint serving `/metrics` (Prometheus), `/healthz`
//! (the process is alive) and `/readyz` (it can serve: store writable, sandbox as
//! configured, every tier reachable).
//!
//! It is a listener of its own, never one of the compile listeners, so an address a
//! compile client may reach does not expose it, and its own admission is strict: peers
//! only from its allowed ranges (loopback by default), a few connections at once (more
//! are closed at once), a deadline for the request head, a small head, and a deadline
//! for the whole connection. A scraper that stalls, floods or never reads costs one of
//! those few places until its deadline, never a compile slot or a task the compile
//! connections need.
//!
//! Every figure comes from the service's own counters ([`crate::Counters`]), the ones
//! STATS reads: `/metrics` is another encoding of the same numbers, not a second tally.
//!
//! - `encode`: the Prometheus text ([`render`], via `prometheus-client`).
//! - `ready`: the readiness checks ([`Readiness`]).
//! - `http`: the bounded HTTP/1 server ([`serve`], via `hyper`).

mod encode;
mod http;
mod ready;

use std::time::Duration;

pub use encode::{render, render_classic};
pub use http::serve;
pub use ready::{Readiness, SandboxState};

use crate::access::Cidr;

/// Limits of the metrics endpoint.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Address ranges scrapers may connect from (default: loopback only). Others are
    /// closed at once.
    pub allow: Vec<Cidr>,
    /// Connections served at once; more are closed at once (a Prometheus server needs
    /// one; a few spare ones cover a person with curl and a health checker).
    pub max_connections: usize,
    /// Time a connection may take to send a request head, first or next.
    pub header_timeout: Duration,
    /// Time a connection may live, however busy: a scraper that never reads its
    /// response, or trickles requests, gives its place back after this.
    pub connection_timeout: Duration,
    /// Largest request head, in bytes (hyper's smallest read buffer is 8 KiB).
    pub max_request_bytes: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            allow: Cidr::loopback(),
            max_connections: 8,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_request_bytes: 8192,
        }
    }
}

/// Why the metrics endpoint cannot listen where it was asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Not a `tcp://HOST:PORT` address.
    #[error("the metrics endpoint listens on tcp://HOST:PORT only (plain HTTP), not {0}")]
    NotTcp(String),
    /// The host did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    /// A non-loopback address without a non-loopback range allowed to scrape it.
    #[error(
        "{0} is not a loopback address: the metrics endpoint serves beyond loopback only \
         with --metrics-allow naming the ranges that may scrape it"
    )]
    NotLoopback(std::net::SocketAddr),
    /// The socket could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
}

/// Binds the endpoint's listener on `address`, failing closed: an address beyond
/// loopback is refused unless `allow` names a range beyond loopback (the operator said
/// who may scrape), so a typo in a host name never publishes the endpoint.
pub async fn bind(
    address: &dcache_transport::Address,
    allow: &[Cidr],
) -> Result<tokio::net::TcpListener, MetricsError> {
    let dcache_transport::Address::Tcp { host, port } = address else {
        return Err(MetricsError::NotTcp(address.to_string()));
    };
    let target = (host.as_str(), *port);
    let resolved: Vec<_> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| MetricsError::Resolve(address.to_string(), e))?
        .collect();
    let Some(first) = resolved.first().copied() else {
        return Err(MetricsError::Resolve(
            address.to_string(),
            std::io::Error::other("no address"),
        ));
    };
    let beyond_loopback_allowed = allow.iter().any(|c| !c.is_loopback());
    if !first.ip().is_loopback() && !beyond_loopback_allowed {
        return Err(MetricsError::NotLoopback(first));
    }
    tokio::net::TcpListener::bind(first)
        .await
        .map_err(|e| MetricsError::Bind(first, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tcp(s: &str) -> dcache_transport::Address {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn loopback_binds_and_anything_else_needs_a_wider_allow() {
        let l = bind(&tcp("tcp://127.0.0.1:0"), &Cidr::loopback())
            .await
            .unwrap();
        assert!(l.local_addr().unwrap().ip().is_loopback());
        let e = bind(&tcp("tcp://0.0.0.0:0"), &Cidr::loopback())
            .await
            .unwrap_err();
        assert!(matches!(e, MetricsError::NotLoopback(_)), "{e}");
        let wide: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(bind(&tcp("tcp://0.0.0.0:0"), &wide).await.is_ok());
        let e = bind(&tcp("unix:///tmp/x"), &wide).await.unwrap_err();
        assert!(matches!(e, MetricsError::NotTcp(_)), "{e}");
    }
}
