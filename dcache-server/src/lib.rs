//! The dcache compile server: cache stores, compiler execution and the async server.
#![forbid(unsafe_code)]
