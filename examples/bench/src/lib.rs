//! The benchmark runner behind `dcache-bench`: the strategy simulation on simulated links
//! under a virtual clock ([`sim`], [`sim_driver`]), with compression ([`sim_zstd`]), its figures ([`plot`]), and the
//! loopback throughput measurement ([`loopback`]), and the hit latency of each store tier,
//! Redis included ([`tiers`]). See docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

pub mod loopback;
pub mod plot;
pub mod sim;
pub mod sim_driver;
pub mod sim_zstd;
pub mod tiers;
