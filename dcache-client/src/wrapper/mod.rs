//! The compiler wrapper's building blocks: reading a command line and splitting a compile
//! into a local preprocessor run and a remote compile.

pub mod args;
pub mod base_dir;
pub mod direct;
pub mod local;
