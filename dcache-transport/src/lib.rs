//! Binds the sans-IO `dcache-proto` state machines to tokio.
//!
//! - [`Address`]: one syntax everywhere — `tcp://HOST:PORT`, `tls://HOST:PORT`,
//!   `unix:///path`, `mem://NAME`.
//! - [`connect`] and [`bind`] (and the [`Connector`] / [`Listener`] traits): one stream
//!   type ([`BoxedStream`]) over TCP (no Nagle, a small send buffer so an early result can
//!   still stop an upload), TLS over it (rustls; [`TlsClient`] and [`TlsServer`] load the
//!   certificates), Unix sockets and in-process `mem://` pipes; accepted streams come
//!   with a [`Peer`] (the IP for TCP and TLS, for access control).
//! - [`sim`]: a simulated link with latency, bandwidth, serialization delay and a bounded
//!   buffer on tokio's clock, exact under paused time.
//! - [`spawn_client`] and [`spawn_server_connection`]: the driver, one task per connection
//!   running a state machine over any stream.
//! - [`FrameCodec`]: frames as a `tokio_util` codec.
//!
//! # Example: a client and a server over `mem://`
//!
//! ```
//! use bytes::Bytes;
//! use dcache_proto::{CacheKey, ClientConfig, JobDesc, JobResult, ResultOrigin};
//! use dcache_proto::{ServerConfig, ServerEvent};
//! use dcache_transport::{Address, ServerCommand, TransportOptions, bind, connect};
//! use dcache_transport::{spawn_client, spawn_server_connection};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let addr: Address = "mem://doc-example".parse()?;
//! let opts = TransportOptions::default();
//! let listener = bind(&addr, &opts).await?;
//! tokio::spawn(async move {
//!     let (stream, _peer) = listener.accept().await?;
//!     let mut conn = spawn_server_connection(stream, ServerConfig::default());
//!     while let Some(event) = conn.events.recv().await {
//!         match event {
//!             ServerEvent::Lookup { job, .. } => { let _ = conn.commands.send(ServerCommand::Miss(job)); }
//!             ServerEvent::SourceDone { job, .. } => {
//!                 let result = JobResult { exit_code: 0, ..JobResult::default() };
//!                 let origin = ResultOrigin::Compiled;
//!                 let _ = conn.commands.send(ServerCommand::Result { job, result, origin });
//!             }
//!             _ => {}
//!         }
//!     }
//!     Ok::<_, std::io::Error>(())
//! });
//! let client = spawn_client(connect(&addr, &opts).await?, ClientConfig::default());
//! let desc = JobDesc { compiler: "gcc".into(), language: "cpp-output".into(), args: vec![], source_len: None, identity: None };
//! let source = Bytes::from_static(b"int x;\n");
//! let key = CacheKey::compute(&desc, &source);
//! let outcome = client.submit(desc, Some(key), source).await?;
//! assert_eq!(outcome.result.exit_code, 0);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod address;
mod codec;
mod driver;
mod error;
mod mem;
mod options;
pub mod sim;
mod stream;
mod tcp;
mod tls;
mod tls_config;
pub mod token;
mod unix;

pub use address::{Address, AddressError};
pub use codec::{CodecError, FrameCodec};
pub use driver::{
    ClientHandle, JobError, JobUpdate, OpenJob, ServerCommand, ServerConnHandle, spawn_client,
    spawn_server_connection,
};
pub use error::{TlsFailure, TransportError};
pub use options::TransportOptions;
pub use stream::{BoxedStream, Connector, Listener, Peer, Stream, bind, connect};
pub use tls::TLS_BUFFER;
pub use tls_config::{TlsClient, TlsConfigError, TlsServer};
