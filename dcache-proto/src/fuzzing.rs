//! Entry points for the cargo-fuzz targets (see `fuzz/` in the repository). Each target is
//! a one-line call into a function here, so the logic is compiled, linted and tested with
//! the crate.
