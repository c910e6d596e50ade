//! The dcache client: the async client, host selection and the compiler-wrapper front end.
#![forbid(unsafe_code)]
