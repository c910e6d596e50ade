//! Shared code of the dcache binaries; the binaries live in `src/bin/`.
#![forbid(unsafe_code)]

pub mod sim;
