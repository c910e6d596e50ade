//! The compiler wrapper's building blocks: reading a command line and splitting a compile
//! into a local preprocessor run and a remote compile.

pub mod args;
#[cfg(feature = "embedded")]
pub mod backend;
pub mod base_dir;
pub mod config;
pub mod direct;
#[cfg(feature = "embedded")]
pub mod flow;
pub mod local;
