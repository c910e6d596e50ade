//! Byte sizes as operators write them: `10G`, `500M`, `16K`, or a plain number of bytes.

use std::fmt;
use std::str::FromStr;

/// A number of bytes, read from and printed as `10G`, `500M`, `16K` or `1536`: powers of
/// 1024, an optional `B`/`iB` after the unit, any case. The same forms on the command
/// line (`--cache-size 10G`) and in the configuration file (`cache_size = "10G"`; an
/// integer is taken as bytes), and printed back in the largest unit that is exact, so
/// `--print-config` shows what an operator would have written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// Why a string is not a [`Size`]. Each message quotes the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// No number where one was expected, e.g. `G` or `ten`.
    #[error("{0:?} is not a size (examples: 10G, 500M, 16K, 4096)")]
    NotASize(String),
    /// A unit other than K, M, G or T.
    #[error("{0:?} has an unknown unit (use K, M, G or T, powers of 1024)")]
    UnknownUnit(String),
    /// More bytes than 64 bits count.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.to_owned()))?;
        let unit = unit.trim().to_ascii_uppercase();
        let unit = unit.trim_end_matches("IB").trim_end_matches('B');
        let shift = match unit {
            "" => 0,
            u => UNITS
                .iter()
                .find(|(name, _)| *name == u)
                .map(|(_, shift)| *shift)
                .ok_or_else(|| SizeError::UnknownUnit(s.to_owned()))?,
        };
        n.checked_mul(1 << shift)
            .map(Size)
            .ok_or_else(|| SizeError::TooLarge(s.to_owned()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 != 0 && self.0 % unit == 0 {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10G\", \"500M\", \"16K\", or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024_and_print_back_exactly() {
        for (text, bytes) in [
            ("4096", 4096),
            ("16K", 16 << 10),
            ("16k", 16 << 10),
            ("500M", 500 << 20),
            ("500MiB", 500 << 20),
            ("10G", 10 << 30),
            ("10 GB", 10 << 30),
            ("2T", 2 << 40),
            ("0", 0),
        ] {
            let size: Size = text.parse().unwrap();
            assert_eq!(size, Size(bytes), "{text}");
            assert_eq!(size.to_string().parse::<Size>().unwrap(), size, "{text}");
        }
        assert_eq!(Size(10 << 30).to_string(), "10G");
        assert_eq!(Size(1536).to_string(), "1536");
        assert_eq!(Size(1 << 10).to_string(), "1K");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_input_quoted() {
        assert!(matches!("G".parse::<Size>(), Err(SizeError::NotASize(s)) if s == "G"));
        assert!(matches!("ten".parse::<Size>(), Err(SizeError::NotASize(_))));
        assert!(matches!("5X".parse::<Size>(), Err(SizeError::UnknownUnit(s)) if s == "5X"));
        assert!(matches!(
            "99999999999T".parse::<Size>(),
            Err(SizeError::TooLarge(_))
        ));
        assert!("-1".parse::<Size>().is_err());
    }
}
