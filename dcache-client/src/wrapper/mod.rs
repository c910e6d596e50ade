//! The compiler wrapper: `dcache COMPILER ARGS...` behaves like the compiler, compiling
//! remotely (or through the embedded cache) when it can and locally when it cannot.
//!
//! The building blocks work without a server in the build:
//! - [`config`]: [`Config`] from `DCACHE_*` variables, and the [`HELP`] text;
//! - [`config_file`]: the settings `dcache --max-size` persists in `DCACHE_DIR/dcache.toml`;
//! - [`response`]: `@file` arguments, expanded before anything is decided;
//! - [`args`]: whether a call can be distributed, and the [`CompilePlan`](args::CompilePlan);
//! - [`local`]: the local preprocessor run, the local compile, atomic output writes, and
//!   the rule for when a returned result must be redone locally;
//! - [`base_dir`]: `DCACHE_BASEDIR`'s rewrite of line markers;
//! - [`direct`]: direct mode's keys and manifests;
//! - [`masquerade`]: dcache invoked through a link named after a compiler, and the real
//!   compiler further on `PATH`;
//! - [`multi`]: a command with several sources split into one compile per source;
//! - [`include_dirs`]: the directories the preprocessor searches, as the compiler reports
//!   them; [`lookups`]: the header lookups a manifest records, so a header appearing on
//!   the search path invalidates it;
//! - [`manifests`]: the directory under `DCACHE_DIR` the manifests are kept in, on the
//!   client's side whatever the back end.
//!
//! With the `embedded` feature, the product itself: `Backend` (configured servers, the
//! local `daemon`, or the in-process server over `mem://`), `identity` (the compiler identity every job carries,
//! computed by the server library's code) and `run`, the whole compile flow `dcache` runs. The
//! feature is for the embedded back end alone: direct mode needs nothing from the server.

pub mod args;
#[cfg(feature = "embedded")]
pub mod backend;
pub mod base_dir;
pub mod config;
pub mod config_file;
#[cfg(feature = "embedded")]
pub mod daemon;
#[cfg(feature = "embedded")]
pub mod depend;
pub mod direct;
pub mod file_id;
#[cfg(feature = "embedded")]
pub mod flow;
#[cfg(feature = "embedded")]
pub mod identity;
pub mod include_dirs;
pub mod local;
pub mod lookups;
pub mod manifests;
pub mod masquerade;
pub mod multi;
pub mod response;

#[cfg(feature = "embedded")]
pub use backend::{Backend, BackendError};
pub use config::{Config, ConfigError, HELP};
#[cfg(feature = "embedded")]
pub use flow::run;
