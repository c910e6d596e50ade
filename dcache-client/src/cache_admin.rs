//! Looking after the local cache, as `ccache -s/-C/-M/-p` do: how full it is
//! ([`report`]), emptying it ([`clear`]), a persistent size limit ([`set_max_size`]) and
//! where each setting comes from ([`show_config`]). Behind `dcache --show-stats`,
//! `--clear`, `--max-size` and `--show-config`.
//!
//! The size limit covers everything the wrapper keeps in `DCACHE_DIR`, counted as `du`
//! counts it (blocks, directories): [`Budget`] splits it between the results cache, the
//! direct-mode manifests and a small reserve for the rest (statistics, compiler
//! identities, the settings file, the directories themselves).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dcache_server::store::{DiskStore, StoreError};

use crate::wrapper::Config;
use crate::wrapper::config_file::{self, FileError};
use crate::wrapper::manifests::{ManifestLimits, ManifestStore};

/// How a size limit is shared out inside `DCACHE_DIR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// For the results cache (`DCACHE_DIR/cache`).
    pub results: u64,
    /// For direct-mode manifests (`DCACHE_DIR/manifests`): a tenth.
    pub manifests: u64,
}

/// Kept free for what is neither a result nor a manifest, measured on ext4 (4 KiB
/// blocks): the statistics log (at most three blocks), compiler identities (a block
/// each), the settings file, and five directories' own blocks: about 40 KiB.
pub const RESERVE: u64 = 48 * 1024;

impl Budget {
    /// The shares of a limit of `limit` bytes; they add up to no more than `limit`.
    pub fn for_limit(limit: u64) -> Self {
        let manifests = limit / 10;
        Self {
            results: limit.saturating_sub(manifests + RESERVE),
            manifests,
        }
    }

    /// The manifest store's limits under this budget.
    pub fn manifest_limits(&self, limit: u64) -> ManifestLimits {
        ManifestLimits {
            max_bytes: self.manifests,
            ..ManifestLimits::for_cache_size(limit)
        }
    }
}

/// Why a cache operation failed; the message names the file or directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The results cache could not be read, trimmed or cleared.
    #[error("{}: {source}", dir.display())]
    Store {
        /// The cache directory.
        dir: PathBuf,
        /// What the store reported.
        source: StoreError,
    },
    /// The settings file is wrong or cannot be written.
    #[error("{0}")]
    File(#[from] FileError),
    /// A directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// How full the local cache is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheReport {
    /// `DCACHE_DIR`.
    pub dir: PathBuf,
    /// Results held.
    pub entries: u64,
    /// Bytes the results cache takes on disk.
    pub results_bytes: u64,
    /// Manifest files held.
    pub manifests: u64,
    /// Bytes the manifests take on disk.
    pub manifest_bytes: u64,
    /// Bytes everything in `DCACHE_DIR` takes on disk (what `du` says).
    pub total_bytes: u64,
    /// The size limit in force.
    pub limit: u64,
}

impl CacheReport {
    /// For people: a line per figure, indented like `--stats`.
    pub fn to_text(&self) -> String {
        let pct = (self.total_bytes as f64 / self.limit.max(1) as f64) * 100.0;
        format!(
            "cache directory {}\n  {:<26} {}\n  {:<26} {}\n  {:<26} {} ({})\n  {:<26} {} \
             ({} files)\n  {:<26} {} ({:.0}% of the limit)\n  {:<26} {}\n",
            self.dir.display(),
            "entries",
            self.entries,
            "manifests",
            self.manifests,
            "results size",
            format_size(self.results_bytes),
            self.results_bytes,
            "manifests size",
            format_size(self.manifest_bytes),
            self.manifests,
            "size on disk",
            format_size(self.total_bytes),
            pct,
            "max size",
            format_size(self.limit),
        )
    }

    /// For scripts: one JSON object.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"entries\": {}, \"manifests\": {}, \"results_bytes\": {}, \
             \"manifest_bytes\": {}, \"size_bytes\": {}, \"max_size_bytes\": {}}}",
            self.entries,
            self.manifests,
            self.results_bytes,
            self.manifest_bytes,
            self.total_bytes,
            self.limit
        )
    }
}

/// How full the local cache in [`Config::dir`] is. Reads only: nothing is created.
pub fn report(config: &Config) -> Result<CacheReport, AdminError> {
    let cache = config.dir.join("cache");
    let usage = DiskStore::usage(&cache).map_err(|e| AdminError::Store {
        dir: cache.clone(),
        source: e.into(),
    })?;
    let manifests_dir = config.dir.join("manifests");
    let (manifests, manifest_bytes) = flat_dir_usage(&manifests_dir)?;
    Ok(CacheReport {
        dir: config.dir.clone(),
        entries: usage.entries,
        results_bytes: usage.bytes,
        manifests,
        manifest_bytes,
        total_bytes: du(&config.dir),
        limit: config.cache_size,
    })
}

/// What [`clear`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Results removed.
    pub entries: u64,
    /// Manifests removed.
    pub manifests: u64,
}

/// Empties the local cache: every result and every manifest. Statistics and settings
/// stay (as with `ccache -C`; `--zero-stats` resets the statistics).
pub fn clear(config: &Config) -> Result<Cleared, AdminError> {
    let cache = config.dir.join("cache");
    let entries = DiskStore::clear(&cache).map_err(|e| AdminError::Store {
        dir: cache,
        source: e.into(),
    })?;
    let manifests_dir = config.dir.join("manifests");
    let (before, _) = flat_dir_usage(&manifests_dir)?;
    // A sweep down to nothing removes every manifest (and only manifests).
    ManifestStore::new(
        manifests_dir.clone(),
        ManifestLimits {
            max_files: 0,
            max_bytes: 0,
        },
    )
    .sweep();
    let (after, _) = flat_dir_usage(&manifests_dir)?;
    Ok(Cleared {
        entries,
        manifests: before.saturating_sub(after),
    })
}

/// `dcache --max-size SIZE`: persists the limit in `DIR/dcache.toml` and shrinks the
/// cache to it now. Returns the limit in bytes. `DCACHE_CACHE_SIZE`, when set, still
/// overrides the file (as [`show_config`] says).
pub fn set_max_size(dir: &Path, value: &str) -> Result<u64, AdminError> {
    let limit = config_file::set_max_size(dir, value)?;
    trim(dir, limit)?;
    Ok(limit)
}

/// Shrinks the cache in `dir` to a limit of `limit` bytes.
pub fn trim(dir: &Path, limit: u64) -> Result<(), AdminError> {
    let budget = Budget::for_limit(limit);
    let cache = dir.join("cache");
    if cache.exists() {
        DiskStore::trim(&cache, budget.results)
            .map_err(|source| AdminError::Store { dir: cache, source })?;
    }
    ManifestStore::new(dir.join("manifests"), budget.manifest_limits(limit)).sweep();
    Ok(())
}

/// One setting as `--show-config` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Its name (the settings file's key, or the variable's without `DCACHE_`).
    pub name: &'static str,
    /// The value in force.
    pub value: String,
    /// Where it came from: `environment (DCACHE_…)`, the settings file's path, or
    /// `default`.
    pub origin: String,
}

/// Every setting in force and where it came from, as `ccache -p` shows them. `get`
/// reads a variable (`std::env::var` for the process).
pub fn show_config(config: &Config, get: impl Fn(&str) -> Option<String>) -> Vec<Setting> {
    let set = |var: &str| get(var).is_some_and(|v| !v.trim().is_empty());
    let origin = |var: &str| {
        if set(var) {
            format!("environment ({var})")
        } else {
            "default".to_owned()
        }
    };
    let file = config_file::path(&config.dir);
    let size_origin = if set("DCACHE_CACHE_SIZE") {
        "environment (DCACHE_CACHE_SIZE)".to_owned()
    } else if config_file::load(&config.dir).is_ok_and(|f| f.max_size.is_some()) {
        file.display().to_string()
    } else {
        "default".to_owned()
    };
    let hosts: Vec<String> = config.hosts.iter().map(ToString::to_string).collect();
    vec![
        Setting {
            name: "dir",
            value: config.dir.display().to_string(),
            origin: origin("DCACHE_DIR"),
        },
        Setting {
            name: "max_size",
            value: format!(
                "{} ({} bytes)",
                format_size(config.cache_size),
                config.cache_size
            ),
            origin: size_origin,
        },
        Setting {
            name: "hosts",
            value: if hosts.is_empty() {
                "(none: the embedded local cache)".to_owned()
            } else {
                hosts.join(" ")
            },
            origin: origin("DCACHE_HOSTS"),
        },
        Setting {
            name: "strategy",
            value: format!("{:?}", config.strategy).to_lowercase(),
            origin: origin("DCACHE_STRATEGY"),
        },
        Setting {
            name: "direct",
            value: config.direct.to_string(),
            origin: origin("DCACHE_DIRECT"),
        },
        Setting {
            name: "fallback",
            value: config.fallback.to_string(),
            origin: origin("DCACHE_FALLBACK"),
        },
        Setting {
            name: "basedir",
            value: config
                .base_dir
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |b| b.display().to_string()),
            origin: origin("DCACHE_BASEDIR"),
        },
        Setting {
            name: "timeout",
            value: config.timeout.map_or_else(
                || "(client default)".to_owned(),
                |t| format!("{}s", t.as_secs()),
            ),
            origin: origin("DCACHE_TIMEOUT"),
        },
        Setting {
            name: "token",
            value: if config.token.is_some() {
                "(set)"
            } else {
                "(none)"
            }
            .to_owned(),
            origin: if set("DCACHE_TOKEN") {
                origin("DCACHE_TOKEN")
            } else {
                origin("DCACHE_TOKEN_FILE")
            },
        },
    ]
}

/// [`show_config`]'s settings, a line each: `(origin) name = value`.
pub fn settings_text(settings: &[Setting]) -> String {
    settings
        .iter()
        .map(|s| format!("({}) {} = {}\n", s.origin, s.name, s.value))
        .collect()
}

/// A byte count for people, in binary units (`1.1 MiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Files directly in `dir` and what the directory and they take on disk. An absent
/// directory is empty.
fn flat_dir_usage(dir: &Path) -> Result<(u64, u64), AdminError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(source) => {
            return Err(AdminError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut files = 0;
    let mut bytes = std::fs::symlink_metadata(dir).map_or(0, |m| usage(&m));
    for e in entries.flatten() {
        if let Ok(m) = e.metadata() {
            if m.is_file() {
                files += 1;
            }
            bytes += usage(&m);
        }
    }
    Ok((files, bytes))
}

fn usage(m: &std::fs::Metadata) -> u64 {
    (m.blocks() * 512).max(m.len())
}

/// What `du` counts under `path`, links not followed; an unreadable part counts as
/// nothing. Depth is bounded (the cache is three levels deep) so a planted loop of
/// directories cannot run it away.
fn du(path: &Path) -> u64 {
    fn walk(path: &Path, depth: u32) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        let mut total = usage(&meta);
        if meta.is_dir() && depth < 8 {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    total += walk(&e.path(), depth + 1);
                }
            }
        }
        total
    }
    walk(path, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_add_up_to_the_limit_at_most() {
        for limit in [0, 1, 1000, 300 << 10, 5 << 30, u64::MAX] {
            let b = Budget::for_limit(limit);
            assert!(b.results.saturating_add(b.manifests) <= limit, "{limit}");
        }
        let b = Budget::for_limit(300 << 10);
        assert_eq!(b.manifests, 30 << 10);
        assert_eq!(b.results, (300 << 10) - (30 << 10) - RESERVE);
        assert_eq!(
            Budget::for_limit(1 << 30).results,
            (1 << 30) - (1 << 30) / 10 - RESERVE
        );
        assert_eq!(Budget::for_limit(5 << 30).manifests, (5 << 30) / 10);
        // Too small to hold anything but the reserve: no results are kept.
        assert_eq!(Budget::for_limit(800).results, 0);
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(300 << 10), "300.0 KiB");
        assert_eq!(format_size(1_153_024), "1.1 MiB");
        assert_eq!(format_size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn show_config_says_where_each_value_came_from() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path().to_string_lossy().into_owned();
        let get = |pairs: Vec<(&'static str, String)>| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())
        };
        let find = |s: &[Setting], n: &str| s.iter().find(|x| x.name == n).cloned();
        let env = get(vec![("DCACHE_DIR", d.clone())]);
        let c = Config::from_vars(&env).unwrap_or_else(|e| panic!("{e}"));
        let s = show_config(&c, &env);
        let size = find(&s, "max_size").unwrap_or_else(|| panic!("no max_size"));
        assert_eq!(
            (size.origin.as_str(), size.value.as_str()),
            ("default", "5.0 GiB (5368709120 bytes)")
        );
        assert_eq!(
            find(&s, "dir").map(|x| x.origin),
            Some("environment (DCACHE_DIR)".into())
        );
        config_file::set_max_size(dir.path(), "300K").unwrap_or_else(|e| panic!("{e}"));
        let c = Config::from_vars(&env).unwrap_or_else(|e| panic!("{e}"));
        let size = find(&show_config(&c, &env), "max_size").unwrap_or_else(|| panic!());
        assert_eq!(
            size.origin,
            config_file::path(dir.path()).display().to_string()
        );
        assert_eq!(size.value, "300.0 KiB (307200 bytes)");
        let env = get(vec![("DCACHE_DIR", d), ("DCACHE_CACHE_SIZE", "1M".into())]);
        let c = Config::from_vars(&env).unwrap_or_else(|e| panic!("{e}"));
        let text = settings_text(&show_config(&c, &env));
        assert!(
            text.contains("(environment (DCACHE_CACHE_SIZE)) max_size = 1.0 MiB (1048576 bytes)\n"),
            "{text}"
        );
    }
}
