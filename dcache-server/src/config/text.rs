//! Serde for values that have a text form of their own (`FromStr` + `Display`), such as
//! addresses and address ranges: written in the file exactly as on the command line, and
//! refused with the type's own message when malformed.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

/// A list of such values, as a TOML array of strings: `#[serde(with = "text::list")]`.
pub mod list {
    use super::*;

    /// Writes each value in its text form.
    pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    /// Reads an array of strings, each parsed by `T::from_str`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| s.parse().map_err(D::Error::custom))
            .collect()
    }
}

/// An optional such value, as a string or absent: `#[serde(default, with = "text::opt",
/// skip_serializing_if = "Option::is_none")]`.
pub mod opt {
    use super::*;

    /// Writes the value in its text form (absent values are skipped by the field).
    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Reads a string parsed by `T::from_str`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map(Some).map_err(D::Error::custom)
    }
}

/// One such value, as a string: `#[serde(with = "text::one")]`.
pub mod one {
    use super::*;

    /// Writes the value in its text form.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a string parsed by `T::from_str`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}
