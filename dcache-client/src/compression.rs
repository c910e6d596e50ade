//! Whether compressing a connection's source (and its results) pays: `DCACHE_COMPRESS`
//! and `DCACHE_LINK_SPEED`.
//!
//! zstd level 1 costs a few nanoseconds per byte to compress and inflate (see
//! docs/BENCHMARKS.md, "Compression on the wire"), and saves `(1 - 1/ratio) / bandwidth`
//! per byte: on a 100 Mbit/s link that is ~70 ns, on 1 Gbit/s ~7 ns, both well above the
//! cost; on 10 Gbit/s and on loopback it is below it, and compressing only adds time. So
//! the rule is by link speed: compress on links up to [`AUTO_MAX_LINK_SPEED`], not above.
//! The speed is what `DCACHE_LINK_SPEED` says, else what the address tells: loopback
//! hosts, Unix sockets and in-process servers are fast, and any other host is taken to be
//! across a network no faster than the threshold.

use std::str::FromStr;

use dcache_transport::Address;

/// Fastest link (bits per second) on which `auto` compresses: the bench's break-even
/// with preprocessed C lies between 2 and 10 Gbit/s, so 2 Gbit/s keeps a margin on both
/// sides (1 Gbit/s gains, 10 Gbit/s would lose).
pub const AUTO_MAX_LINK_SPEED: u64 = 2_000_000_000;

/// `DCACHE_COMPRESS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CompressMode {
    /// Compress when the link is slow enough for it to pay (the default).
    #[default]
    Auto,
    /// Always offer compression, whatever the link.
    Always,
    /// Never offer it: every byte as without the feature.
    Never,
}

/// A `DCACHE_COMPRESS` value that is not `auto`, `always` or `never`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not auto, always or never")]
pub struct UnknownCompressMode(pub String);

impl FromStr for CompressMode {
    type Err = UnknownCompressMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "always" | "on" | "1" | "yes" => Ok(Self::Always),
            "never" | "off" | "0" | "no" => Ok(Self::Never),
            _ => Err(UnknownCompressMode(s.to_owned())),
        }
    }
}

/// A `DCACHE_LINK_SPEED` value that is not a speed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a link speed (bits per second, e.g. 100M, 1G, 10G, 250Mbit)")]
pub struct BadLinkSpeed(pub String);

/// Parses a link speed in bits per second: a number with an optional `k`, `M` or `G`
/// (decimal, as links are sold) and an optional `bit`, `bit/s` or `bps` after it.
pub fn parse_link_speed(s: &str) -> Result<u64, BadLinkSpeed> {
    let bad = || BadLinkSpeed(s.to_owned());
    let t = s.trim().to_ascii_lowercase();
    let t = ["bit/s", "bits", "bit", "bps", "b/s"]
        .iter()
        .find_map(|suffix| t.strip_suffix(suffix))
        .unwrap_or(&t)
        .trim_end();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1e3),
        Some((i, 'm')) => (&t[..i], 1e6),
        Some((i, 'g')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    let bps = n * mult;
    if !bps.is_finite() || !(1.0..=1e15).contains(&bps) {
        return Err(bad());
    }
    Ok(bps as u64)
}

/// The client's compression rule: the mode and, when configured, the link's speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CompressPolicy {
    /// `DCACHE_COMPRESS`.
    pub mode: CompressMode,
    /// `DCACHE_LINK_SPEED` in bits per second, if set: it overrides what the address
    /// suggests, for every host.
    pub link_speed: Option<u64>,
}

impl CompressPolicy {
    /// Whether a connection to `addr` should offer compression: `always`; `auto` when the
    /// configured speed is at most [`AUTO_MAX_LINK_SPEED`], or, unset, when `addr` is a
    /// network host (not loopback, not a Unix socket, not in-process).
    pub fn pays(&self, addr: &Address) -> bool {
        match self.mode {
            CompressMode::Always => true,
            CompressMode::Never => false,
            CompressMode::Auto => match self.link_speed {
                Some(bps) => bps <= AUTO_MAX_LINK_SPEED,
                None => !addr.is_on_this_machine(),
            },
        }
    }

    /// The zstd level a connection to `addr` offers, or `None` to offer nothing (what
    /// [`ClientConfig::compression`](dcache_proto::ClientConfig::compression) takes).
    pub fn level_for(&self, addr: &Address) -> Option<i32> {
        self.pays(addr).then_some(dcache_proto::DEFAULT_LEVEL)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().unwrap()
    }

    #[test]
    fn auto_declines_on_this_machine_and_accepts_across_a_network() {
        let auto = CompressPolicy::default();
        for local in [
            "tcp://127.0.0.1:1",
            "tcp://[::1]:1",
            "tls://localhost:1",
            "unix:///tmp/s",
            "mem://x",
        ] {
            assert!(!auto.pays(&addr(local)), "{local}");
        }
        assert!(auto.pays(&addr("tcp://build1.example:3632")));
        assert!(auto.pays(&addr("tls://10.0.0.7:3632")));
    }

    #[test]
    fn a_configured_speed_overrides_the_address_and_modes_override_both() {
        let slow = CompressPolicy {
            mode: CompressMode::Auto,
            link_speed: Some(100_000_000),
        };
        assert!(slow.pays(&addr("tcp://127.0.0.1:1")));
        let fast = CompressPolicy {
            link_speed: Some(10_000_000_000),
            ..slow
        };
        assert!(!fast.pays(&addr("tcp://build1.example:1")));
        let always = CompressPolicy {
            mode: CompressMode::Always,
            ..fast
        };
        assert!(always.pays(&addr("unix:///s")));
        let never = CompressPolicy {
            mode: CompressMode::Never,
            ..slow
        };
        assert_eq!(never.level_for(&addr("tcp://far:1")), None);
    }

    #[test]
    fn speeds_and_modes_parse() {
        assert_eq!(parse_link_speed("100M"), Ok(100_000_000));
        assert_eq!(parse_link_speed("1G"), Ok(1_000_000_000));
        assert_eq!(parse_link_speed("2.5 Gbit/s"), Ok(2_500_000_000));
        assert_eq!(parse_link_speed("250mbit"), Ok(250_000_000));
        assert_eq!(parse_link_speed("56000"), Ok(56_000));
        for bad in ["", "fast", "-1G", "0", "1e30", "G"] {
            assert!(parse_link_speed(bad).is_err(), "{bad}");
        }
        assert_eq!("never".parse(), Ok(CompressMode::Never));
        assert_eq!("AUTO".parse(), Ok(CompressMode::Auto));
        assert!("sometimes".parse::<CompressMode>().is_err());
    }
}
