//! The dcache client: host selection, and the compiler-wrapper front end's command-line
//! planning.
#![forbid(unsafe_code)]

pub mod hosts;
pub mod wrapper;
