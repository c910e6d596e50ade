//! Who may connect: address ranges (CIDR) checked when a connection is accepted.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address range such as `10.0.0.0/8` or `fd00::/8`; a bare address means just it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address range (examples: 192.168.1.0/24, 10.0.0.7, ::1/128)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(err)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` lies in this range. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a
    /// dual-stack listener reports IPv4 peers) are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Whether the whole range is loopback (within 127.0.0.0/8 or exactly ::1): a
    /// server allowing only such ranges serves only this machine.
    pub fn is_loopback(&self) -> bool {
        Self::loopback()
            .iter()
            .any(|l| l.prefix <= self.prefix && l.contains(self.addr))
    }

    /// The default allow-list: loopback only, like distccd's default.
    pub fn loopback() -> Vec<Self> {
        vec![
            Self {
                addr: IpAddr::from([127, 0, 0, 0]),
                prefix: 8,
            },
            Self {
                addr: IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                prefix: 128,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ranges_are_told_apart() {
        for (range, lo) in [
            ("127.0.0.1", true),
            ("127.0.0.0/8", true),
            ("127.0.0.0/7", false),
            ("::1", true),
            ("10.0.0.0/8", false),
            ("0.0.0.0/0", false),
            ("::/0", false),
        ] {
            assert_eq!(range.parse::<Cidr>().unwrap().is_loopback(), lo, "{range}");
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    #[test]
    fn ranges_parse_and_match() {
        let net: Cidr = "192.168.1.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(net.contains(ip("192.168.1.77")));
        assert!(!net.contains(ip("192.168.2.1")));
        assert!(net.contains(ip("::ffff:192.168.1.5")), "mapped IPv4");
        let one: Cidr = "10.0.0.7".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(one.contains(ip("10.0.0.7")) && !one.contains(ip("10.0.0.8")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "::/129", "host/8", "", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let lo = Cidr::loopback();
        assert!(lo.iter().any(|c| c.contains(ip("127.0.0.1"))));
        assert!(lo.iter().any(|c| c.contains(ip("::1"))));
        assert!(!lo.iter().any(|c| c.contains(ip("192.168.0.1"))));
    }
}
