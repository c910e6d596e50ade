//! The one address syntax used everywhere: library, command lines, configuration.
//!
//! `tcp://HOST:PORT` (IPv4, `[IPv6]` or a host name), `unix:///absolute/path.sock`,
//! `mem://NAME` (an in-process listener, used by the embedded default).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where to connect or listen.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Address {
    /// A TCP host and port.
    Tcp {
        /// Host name or IP literal (IPv6 without brackets).
        host: String,
        /// Port; 0 when binding asks the system for one.
        port: u16,
    },
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// An in-process listener name.
    Mem(String),
}

/// Why a string is not an [`Address`]. Each message quotes the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// No `scheme://`.
    #[error("{0:?} has no scheme: expected tcp://HOST:PORT, unix:///path or mem://NAME")]
    NoScheme(String),
    /// A scheme other than tcp, unix or mem.
    #[error("{0:?} has an unknown scheme: expected tcp://, unix:// or mem://")]
    UnknownScheme(String),
    /// `tcp://` without `:PORT`.
    #[error("{0:?} has no port")]
    NoPort(String),
    /// A port that is not a number from 0 to 65535.
    #[error("{0:?} has an invalid port")]
    BadPort(String),
    /// `tcp://:PORT`.
    #[error("{0:?} has no host")]
    NoHost(String),
    /// A `[` without its `]`, or text after it other than `:PORT`.
    #[error("{0:?} has a malformed IPv6 literal")]
    BadIpv6(String),
    /// `unix://` with a relative path.
    #[error("{0:?} is not an absolute socket path (use unix:///absolute/path)")]
    RelativeUnixPath(String),
    /// `mem://` with an empty name.
    #[error("{0:?} has an empty name")]
    EmptyName(String),
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| AddressError::NoScheme(s.into()))?;
        match scheme {
            "tcp" => parse_tcp(s, rest),
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(AddressError::RelativeUnixPath(s.into()));
                }
                Ok(Self::Unix(PathBuf::from(rest)))
            }
            "mem" => {
                if rest.is_empty() {
                    return Err(AddressError::EmptyName(s.into()));
                }
                Ok(Self::Mem(rest.into()))
            }
            _ => Err(AddressError::UnknownScheme(s.into())),
        }
    }
}

fn parse_tcp(whole: &str, rest: &str) -> Result<Address, AddressError> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| AddressError::BadIpv6(whole.into()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p,
            None if after.is_empty() => return Err(AddressError::NoPort(whole.into())),
            None => return Err(AddressError::BadIpv6(whole.into())),
        };
        (host, port)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| AddressError::NoPort(whole.into()))?
    };
    if host.is_empty() {
        return Err(AddressError::NoHost(whole.into()));
    }
    if port.is_empty() {
        return Err(AddressError::NoPort(whole.into()));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| AddressError::BadPort(whole.into()))?;
    Ok(Address::Tcp {
        host: host.into(),
        port,
    })
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Mem(n) => write!(f, "mem://{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_round_trip() {
        for s in [
            "tcp://127.0.0.1:3633",
            "tcp://build-host.example:1",
            "tcp://[::1]:3633",
            "unix:///run/dcache.sock",
            "mem://embedded",
        ] {
            let a: Address = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "tcp://[::1]:9".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "::1".into(),
                port: 9
            }
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Address>().unwrap_err().to_string();
        assert_eq!(err("tcp://x"), "\"tcp://x\" has no port");
        assert_eq!(
            err("tcp://x:"),
            "\"tcp://x\" has no port".replace("x\"", "x:\"")
        );
        assert!(err("tcp://x:99999").contains("invalid port"));
        assert!(err("tcp://:80").contains("no host"));
        assert!(err("tcp://[::1").contains("IPv6"));
        assert!(err("tcp://[::1]").contains("no port"));
        assert!(err("unix://rel/x.sock").contains("absolute"));
        assert!(err("mem://").contains("empty name"));
        assert!(err("udp://x:1").contains("unknown scheme"));
        assert!(err("localhost:3633").contains("no scheme"));
    }
}
