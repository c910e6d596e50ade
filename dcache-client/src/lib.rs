//! The dcache client: the [`Client`] library (jobs on a set of servers, chosen by
//! rendezvous hashing, with fall-through and back-off), the compiler wrapper
//! ([`wrapper`]) and the statistics `dcache --stats` shows ([`stats`]).
//!
//! Features:
//! - `embedded` (off by default): the wrapper's whole compile flow
//!   ([`wrapper::run`](crate::wrapper)) and its embedded back end, which runs the server
//!   library in this process, and the local cache's upkeep (`cache_admin`). It pulls in `dcache-server`, so a program that only talks
//!   to servers leaves it off.
#![forbid(unsafe_code)]

#[cfg(feature = "embedded")]
pub mod cache_admin;
mod client;
pub mod compression;
pub mod hosts;
pub mod stats;
pub mod wrapper;

pub use client::{Client, ClientError, ClientOptions, Outcome};
