//! The one address syntax used everywhere: library, command lines, configuration.
//!
//! `tcp://HOST:PORT` (IPv4, `[IPv6]` or a host name), `tls://HOST:PORT` (the same inside
//! TLS; the host is also the name the server's certificate must carry),
//! `unix:///absolute/path.sock`, `mem://NAME` (an in-process listener, used by the
//! embedded default).

use std::fmt;
use std::net::Ipv6Addr;
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
    /// A TCP host and port, with TLS over it. A separate scheme rather than a setting, so
    /// an address says by itself whether the bytes to it are encrypted.
    Tls {
        /// Host name or IP literal (IPv6 without brackets); a client checks the server's
        /// certificate against it.
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
    #[error(
        "{0:?} has no scheme: expected tcp://HOST:PORT, tls://HOST:PORT, unix:///path or \
         mem://NAME"
    )]
    NoScheme(String),
    /// A scheme other than tcp, tls, unix or mem.
    #[error("{0:?} has an unknown scheme: expected tcp://, tls://, unix:// or mem://")]
    UnknownScheme(String),
    /// `tcp://` or `tls://` without `:PORT`.
    #[error("{0:?} has no port")]
    NoPort(String),
    /// A port that is not a number from 0 to 65535.
    #[error("{0:?} has an invalid port")]
    BadPort(String),
    /// `tcp://:PORT` (or `tls://:PORT`).
    #[error("{0:?} has no host")]
    NoHost(String),
    /// A `[` without its `]`, brackets around something that is not an IPv6 address, text
    /// after `]` other than `:PORT`, or an IPv6 literal without brackets (where the port
    /// would start is then a guess).
    #[error("{0:?} has a malformed IPv6 literal (write tcp://[::1]:PORT)")]
    BadIpv6(String),
    /// A host name with characters no host name has (spaces, slashes, ...): almost always a
    /// typo or a URL pasted whole, better caught here than as a failed DNS look-up.
    #[error("{0:?} has an invalid host name")]
    BadHost(String),
    /// `unix://` with a relative path.
    #[error("{0:?} is not an absolute socket path (use unix:///absolute/path)")]
    RelativeUnixPath(String),
    /// `mem://` with an empty name.
    #[error("{0:?} has an empty name")]
    EmptyName(String),
}

impl Address {
    /// Whether the peer is on this machine, where bytes move at memory speed: a Unix
    /// socket, an in-process listener, or TCP to `localhost` or a loopback address. What
    /// decides, for instance, whether compressing the bytes to it can pay.
    pub fn is_on_this_machine(&self) -> bool {
        match self {
            Self::Unix(_) | Self::Mem(_) => true,
            Self::Tcp { host, .. } | Self::Tls { host, .. } => {
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| AddressError::NoScheme(s.into()))?;
        match scheme {
            "tcp" => parse_tcp(s, rest).map(|(host, port)| Self::Tcp { host, port }),
            "tls" => parse_tcp(s, rest).map(|(host, port)| Self::Tls { host, port }),
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

/// The `HOST:PORT` of a `tcp://` or `tls://` address.
fn parse_tcp(whole: &str, rest: &str) -> Result<(String, u16), AddressError> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| AddressError::BadIpv6(whole.into()))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(AddressError::BadIpv6(whole.into()));
        }
        let port = match after.strip_prefix(':') {
            Some(p) => p,
            None if after.is_empty() => return Err(AddressError::NoPort(whole.into())),
            None => return Err(AddressError::BadIpv6(whole.into())),
        };
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| AddressError::NoPort(whole.into()))?;
        if host.contains(':') {
            // `tcp://::1:80` is ambiguous to a reader; brackets say where the port starts.
            return Err(AddressError::BadIpv6(whole.into()));
        }
        if host.is_empty() {
            return Err(AddressError::NoHost(whole.into()));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(AddressError::BadHost(whole.into()));
        }
        (host, port)
    };
    if port.is_empty() {
        return Err(AddressError::NoPort(whole.into()));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::BadPort(whole.into()));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| AddressError::BadPort(whole.into()))?;
    Ok((host.into(), port))
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Self::Tls { host, port } if host.contains(':') => write!(f, "tls://[{host}]:{port}"),
            Self::Tls { host, port } => write!(f, "tls://{host}:{port}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Mem(n) => write!(f, "mem://{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Address {
        s.parse().unwrap()
    }

    fn err(s: &str) -> AddressError {
        s.parse::<Address>().unwrap_err()
    }

    #[test]
    fn loopback_unix_and_in_process_peers_are_on_this_machine() {
        for local in [
            "tcp://127.0.0.1:1",
            "tcp://localhost:1",
            "tls://LOCALHOST:1",
            "tcp://[::1]:1",
            "tcp://127.9.0.1:1",
            "unix:///run/x.sock",
            "mem://a",
        ] {
            assert!(parse(local).is_on_this_machine(), "{local}");
        }
        for remote in [
            "tcp://10.0.0.1:1",
            "tls://build.example:1",
            "tcp://[2001:db8::1]:1",
        ] {
            assert!(!parse(remote).is_on_this_machine(), "{remote}");
        }
    }

    #[test]
    fn every_form_parses_and_round_trips() {
        let cases = [
            (
                "tcp://127.0.0.1:3633",
                Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 3633,
                },
            ),
            (
                "tcp://build-host.example:1",
                Address::Tcp {
                    host: "build-host.example".into(),
                    port: 1,
                },
            ),
            (
                "tcp://localhost:0",
                Address::Tcp {
                    host: "localhost".into(),
                    port: 0,
                },
            ),
            (
                "tcp://[::1]:65535",
                Address::Tcp {
                    host: "::1".into(),
                    port: 65535,
                },
            ),
            (
                "tcp://[fe80::1:2]:9",
                Address::Tcp {
                    host: "fe80::1:2".into(),
                    port: 9,
                },
            ),
            (
                "tls://build-host.example:3634",
                Address::Tls {
                    host: "build-host.example".into(),
                    port: 3634,
                },
            ),
            (
                "tls://[::1]:0",
                Address::Tls {
                    host: "::1".into(),
                    port: 0,
                },
            ),
            (
                "unix:///run/dcache.sock",
                Address::Unix(PathBuf::from("/run/dcache.sock")),
            ),
            ("mem://embedded", Address::Mem("embedded".into())),
            (
                "mem://with spaces/and:colons",
                Address::Mem("with spaces/and:colons".into()),
            ),
        ];
        for (text, want) in cases {
            let got = parse(text);
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text, "display of {text}");
            assert_eq!(parse(&got.to_string()), got, "round trip of {text}");
        }
    }

    /// An `AddressError` variant, as a constructor.
    type Variant = fn(String) -> AddressError;

    #[test]
    fn every_error_is_typed_and_quotes_the_input() {
        let cases: [(&str, Variant); 21] = [
            ("localhost:3633", AddressError::NoScheme),
            ("", AddressError::NoScheme),
            ("udp://x:1", AddressError::UnknownScheme),
            ("TCP://x:1", AddressError::UnknownScheme),
            ("tcp://x", AddressError::NoPort),
            ("tcp://x:", AddressError::NoPort),
            ("tcp://[::1]", AddressError::NoPort),
            ("tcp://x:99999", AddressError::BadPort),
            ("tcp://x:+80", AddressError::BadPort),
            ("tcp://x:80/path", AddressError::BadPort),
            ("tcp://:80", AddressError::NoHost),
            ("tcp://[::1", AddressError::BadIpv6),
            ("tcp://[::1]x", AddressError::BadIpv6),
            ("tcp://[not-v6]:80", AddressError::BadIpv6),
            ("tcp://::1:80", AddressError::BadIpv6),
            ("tcp://a b:80", AddressError::BadHost),
            ("unix://rel/x.sock", AddressError::RelativeUnixPath),
            ("tls://x", AddressError::NoPort),
            ("tls://:80", AddressError::NoHost),
            ("tls://::1:80", AddressError::BadIpv6),
            ("TLS://x:1", AddressError::UnknownScheme),
        ];
        for (text, make) in cases {
            assert_eq!(err(text), make(text.into()), "{text}");
            assert!(
                err(text).to_string().contains(&format!("{text:?}")),
                "{text}"
            );
        }
        assert_eq!(
            err("unix://"),
            AddressError::RelativeUnixPath("unix://".into())
        );
        assert_eq!(err("mem://"), AddressError::EmptyName("mem://".into()));
    }

    #[test]
    fn messages_say_what_is_wrong() {
        let msg = |s: &str| err(s).to_string();
        assert_eq!(msg("tcp://x"), r#""tcp://x" has no port"#);
        assert!(msg("tcp://x:99999").contains("invalid port"));
        assert!(msg("tcp://:80").contains("no host"));
        assert!(msg("tcp://::1:80").contains("tcp://[::1]:PORT"));
        assert!(msg("unix://rel/x.sock").contains("absolute"));
        assert!(msg("mem://").contains("empty name"));
        assert!(msg("udp://x:1").contains("unknown scheme"));
        assert!(msg("localhost:3633").contains("no scheme"));
        assert!(msg("localhost:3633").contains("tls://HOST:PORT"));
        assert!(msg("https://x:1").contains("tls://"));
    }
}
