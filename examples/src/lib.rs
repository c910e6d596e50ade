//! Shared code of the dcache binaries; the binaries live in `src/bin/`.
#![forbid(unsafe_code)]

pub mod demo;
pub mod util;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
