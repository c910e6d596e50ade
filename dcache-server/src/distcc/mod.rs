//! The distcc front end: stock distcc clients (protocol 1, and protocol 2 with LZO) served
//! by the same [`Service`](crate::Service) as dcache clients.
//!
//! A distcc user points `DISTCC_HOSTS` at a `dcache-server --listen-distcc` address and
//! gets the server-side cache, the sandbox and the access control with no change on the
//! client. Each request is read whole (the stock client writes all of its source before
//! it reads anything, so only the compile can be saved, not the upload), mapped onto the
//! job description a dcache client would send for the same compile ([`argv`]), and
//! submitted to the service over an in-process dcache connection: the store, compile
//! slots, single-flight, limits and counters are the service's own, and the cache key is
//! the one a dcache client computes, so both kinds of client share entries.
//!
//! - [`wire`]: the request decoder and the reply encoder, sans IO.
//! - [`lzo`]: LZO1X blocks, as protocol 2 carries its bodies.
//! - [`names`]: which allowed compiler a client's compiler name means.
//! - [`argv`]: a distcc command line as a job description.
//!
//! Anything refused (address, compiler, option, pump mode's protocol 3) and anything
//! malformed ends the connection without a reply: that is how distccd refuses too, and
//! the stock client then compiles locally ("failed to distribute … running locally
//! instead"). docs/DISTCC.md has the details.

pub mod argv;
mod connection;
pub mod lzo;
pub mod names;
pub mod wire;

pub(crate) use connection::serve_connection;

use names::CompilerNames;
use wire::RequestLimits;

/// Settings of the distcc front end.
#[derive(Clone, Debug)]
pub struct DistccConfig {
    /// The allowed compilers as this server finds them, for mapping client names: build
    /// it from the executor's allowed names and compiler path.
    pub names: CompilerNames,
    /// Request limits. The source limit is further cut to the service's own
    /// `max_source_len`.
    pub limits: RequestLimits,
}

impl DistccConfig {
    /// The front end for a server allowing `allowed` compiler names found on `path` (the
    /// executor's settings), with default limits.
    pub fn new(allowed: &[String], path: &str) -> Self {
        Self {
            names: CompilerNames::resolve(allowed, path),
            limits: RequestLimits::default(),
        }
    }
}
