//! The wrapper's persistent settings: `DCACHE_DIR/dcache.toml`, written by
//! `dcache --max-size` and read by every `dcache` process (an environment variable
//! overrides what the file says, as with ccache's `ccache.conf`).
//!
//! The file is TOML, restricted to what the settings need: `key = value` lines, where a
//! value is a basic string (`"300K"`, no escapes) or an integer, with `#` comments and
//! blank lines. Anything else (tables, arrays, a repeated key, an unknown key) is an
//! error naming the file, the line and the key, never ignored: a typo in a size limit
//! must not silently leave the cache at its default.

use std::path::{Path, PathBuf};

use super::config::{SizeError, parse_size};

/// The file's name inside `DCACHE_DIR`.
pub const FILE_NAME: &str = "dcache.toml";

/// Longest file accepted: settings take a few lines, and a reader bounds what it reads.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The keys the file may hold.
pub const KEYS: &[&str] = &["max_size"];

/// What the file sets; `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileConfig {
    /// `max_size`: the embedded cache's size limit in bytes (`DCACHE_CACHE_SIZE`
    /// overrides it).
    pub max_size: Option<u64>,
}

/// Why the file cannot be used. Every message starts with the file's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// It exists but cannot be read, or cannot be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Longer than [`MAX_FILE_BYTES`].
    #[error("{}: {len} bytes, more than a settings file can be ({MAX_FILE_BYTES})", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A line that is not `key = value` in the accepted subset of TOML.
    #[error("{}:{line}: {what}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A key dcache does not know.
    #[error("{}:{line}: unknown key {key:?} (known keys: {})", path.display(), KEYS.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The key as written.
        key: String,
    },
    /// `max_size` is not a size.
    #[error("{}:{line}: max_size: {source}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why the value is not a size.
        source: SizeError,
    },
}

/// The settings file of the cache directory `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads `dir`'s settings file; an absent file sets nothing.
pub fn load(dir: &Path) -> Result<FileConfig, FileError> {
    let path = path(dir);
    match read_bounded(&path)? {
        Some(text) => parse(&path, &text),
        None => Ok(FileConfig::default()),
    }
}

/// Sets `max_size` in `dir`'s settings file to `value` (a size as `DCACHE_CACHE_SIZE`
/// takes it, kept as written), creating the directory and the file if needed and
/// keeping the file's other lines. The file is replaced atomically, so a concurrent
/// reader sees the old or the new one. Returns the limit in bytes.
pub fn set_max_size(dir: &Path, value: &str) -> Result<u64, FileError> {
    let path = path(dir);
    let bytes = parse_size(value).map_err(|source| FileError::Size {
        path: path.clone(),
        line: 0,
        source,
    })?;
    let old = read_bounded(&path)?.unwrap_or_default();
    // Refuse to rewrite a file that is already wrong: its author should see why.
    parse(&path, &old)?;
    let setting = format!("max_size = \"{}\"", value.trim());
    let mut lines: Vec<String> = Vec::new();
    let mut replaced = false;
    for line in old.lines() {
        if key_of(line) == Some("max_size") {
            lines.push(setting.clone());
            replaced = true;
        } else {
            lines.push(line.to_owned());
        }
    }
    if !replaced {
        if lines.is_empty() {
            lines.push(
                "# dcache settings (dcache --show-config; environment variables override)".into(),
            );
        }
        lines.push(setting);
    }
    let io = |source| FileError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".dcache.toml.")
        .tempfile_in(dir)
        .map_err(io)?;
    std::io::Write::write_all(&mut tmp, (lines.join("\n") + "\n").as_bytes()).map_err(io)?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    Ok(bytes)
}

fn read_bounded(path: &Path) -> Result<Option<String>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE_BYTES), &mut text)
        .map_err(io)?;
    Ok(Some(text))
}

/// The key a line sets, if it is a `key = …` line (for rewriting).
fn key_of(line: &str) -> Option<&str> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    is_bare_key(k).then_some(k)
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A value in the accepted subset.
enum Value<'a> {
    Str(&'a str),
    Int(u64),
}

fn parse(path: &Path, text: &str) -> Result<FileConfig, FileError> {
    let mut config = FileConfig::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let syntax = |what: &str| FileError::Syntax {
            path: path.to_owned(),
            line,
            what: what.to_owned(),
        };
        let body = raw.trim();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if body.starts_with('[') {
            return Err(syntax("tables are not used in this file"));
        }
        let Some((key, rest)) = body.split_once('=') else {
            return Err(syntax("expected key = value"));
        };
        let key = key.trim();
        if !is_bare_key(key) {
            return Err(syntax(&format!("{key:?} is not a bare key")));
        }
        let value = parse_value(rest.trim()).map_err(|w| syntax(&format!("{key}: {w}")))?;
        match key {
            "max_size" => {
                if config.max_size.is_some() {
                    return Err(syntax("max_size is set twice"));
                }
                let bytes = match value {
                    Value::Int(n) => n,
                    Value::Str(s) => parse_size(s).map_err(|source| FileError::Size {
                        path: path.to_owned(),
                        line,
                        source,
                    })?,
                };
                config.max_size = Some(bytes);
            }
            _ => {
                return Err(FileError::UnknownKey {
                    path: path.to_owned(),
                    line,
                    key: key.to_owned(),
                });
            }
        }
    }
    Ok(config)
}

/// A basic string without escapes, or a decimal integer, then optionally a comment.
fn parse_value(v: &str) -> Result<Value<'_>, &'static str> {
    if let Some(rest) = v.strip_prefix('"') {
        let end = rest.find('"').ok_or("unterminated string")?;
        let (s, after) = (&rest[..end], rest[end + 1..].trim());
        if s.contains('\\') {
            return Err("escapes are not used in this file");
        }
        if !(after.is_empty() || after.starts_with('#')) {
            return Err("text after the value");
        }
        return Ok(Value::Str(s));
    }
    let num = v.split_once('#').map_or(v, |(n, _)| n);
    let num = num.trim().replace('_', "");
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a \"string\" or an integer");
    }
    num.parse().map(Value::Int).map_err(|_| "integer too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    fn parsed(text: &str) -> Result<FileConfig, String> {
        parse(Path::new("/d/dcache.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_as_strings_or_integers_with_comments() {
        assert_eq!(parsed("").unwrap().max_size, None);
        let c = parsed("# mine\n\nmax_size = \"300K\"  # small\n").unwrap();
        assert_eq!(c.max_size, Some(300 << 10));
        assert_eq!(
            parsed("max_size=1_048_576").unwrap().max_size,
            Some(1 << 20)
        );
    }

    #[test]
    fn mistakes_name_the_file_the_line_and_the_key() {
        assert_eq!(
            parsed("max_size = \"1G\"\ncache_sise = \"2G\"\n").unwrap_err(),
            "/d/dcache.toml:2: unknown key \"cache_sise\" (known keys: max_size)"
        );
        assert_eq!(
            parsed("max_size = \"12Q\"").unwrap_err(),
            "/d/dcache.toml:1: max_size: \"12Q\" has an unknown unit (use K, M, G or T)"
        );
        for (text, what) in [
            ("[cache]", "tables are not used in this file"),
            ("max_size", "expected key = value"),
            ("max_size = \"1G", "max_size: unterminated string"),
            (
                "max_size = 1G",
                "max_size: expected a \"string\" or an integer",
            ),
            ("max_size = \"1G\" x", "max_size: text after the value"),
            ("max_size = 1\nmax_size = 2", "max_size is set twice"),
            ("\"max size\" = 1", "\"\\\"max size\\\"\" is not a bare key"),
        ] {
            let e = parsed(text).unwrap_err();
            assert!(e.ends_with(what), "{text:?}: {e}");
            assert!(e.starts_with("/d/dcache.toml:"), "{e}");
        }
    }

    #[test]
    fn set_max_size_writes_replaces_and_keeps_other_lines() {
        let d = dir();
        assert_eq!(load(d.path()).unwrap(), FileConfig::default());
        assert_eq!(set_max_size(d.path(), "300K").unwrap(), 300 << 10);
        assert_eq!(load(d.path()).unwrap().max_size, Some(300 << 10));
        let p = path(d.path());
        let with_note = std::fs::read_to_string(&p).unwrap() + "# my note\n";
        std::fs::write(&p, with_note).unwrap();
        set_max_size(d.path(), "2G").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.matches("max_size").count(), 1, "{text}");
        assert!(
            text.contains("max_size = \"2G\"") && text.contains("# my note"),
            "{text}"
        );
        assert_eq!(load(d.path()).unwrap().max_size, Some(2 << 30));
        // A bad value writes nothing; a broken file is not rewritten.
        assert!(set_max_size(d.path(), "lots").is_err());
        assert_eq!(load(d.path()).unwrap().max_size, Some(2 << 30));
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(matches!(
            set_max_size(d.path(), "1G"),
            Err(FileError::UnknownKey { .. })
        ));
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let d = dir();
        std::fs::write(path(d.path()), vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(load(d.path()), Err(FileError::TooLarge { .. })));
    }
}
