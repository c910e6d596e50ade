//! The dcache client: the [`Client`] library (jobs on a set of servers, chosen by
//! rendezvous hashing, with fall-through and back-off), and the compiler wrapper's
//! building blocks ([`wrapper`]).
#![forbid(unsafe_code)]

mod client;
pub mod hosts;
pub mod stats;
pub mod wrapper;

pub use client::{Client, ClientError, ClientOptions, Outcome};
