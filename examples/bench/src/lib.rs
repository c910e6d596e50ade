//! The benchmark runner behind `dcache-bench`: the strategy simulation on simulated links
//! under a virtual clock ([`sim`], [`sim_driver`]), with compression ([`sim_zstd`]), its figures ([`plot`]), and the
//! loopback throughput measurement ([`loopback`]), and the hit latency of each store tier,
//! Redis included ([`tiers`]); a link emulator over real TCP ([`link`], checked by
//! [`link_check`]) and the per-hit latency of the `dcache` wrapper through it
//! ([`hit_latency`]). See docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

pub mod hit_latency;
pub mod link;
pub mod link_check;
pub mod loopback;
pub mod plot;
pub mod sim;
pub mod sim_driver;
pub mod sim_zstd;
pub mod tiers;
