//! What the bundled binaries share beyond the library crates: the `--demo` build and
//! logging set-up. The binaries live in `src/bin/` (thin mains over `dcache-client` and
//! `dcache-server`), the embedding example in `examples/`; the benchmark runner is the
//! `dcache-bench` package in `examples/bench/`.
#![forbid(unsafe_code)]

pub mod demo;
pub mod util;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
