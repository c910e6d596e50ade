//! Which allow-listed compiler a distcc client's compiler name means.
//!
//! A stock client rarely sends the name the user typed: `distcc gcc` arrives as
//! `x86_64-linux-gnu-gcc` (the client qualifies `gcc` and `g++` with its target triple
//! when such a binary exists), `cc` as `gcc`, and build systems send versioned names
//! (`gcc-12`, `clang++-14`) or `/usr/bin/gcc`. distccd runs whatever the name finds on its
//! PATH, if the name is listed in its masquerade directory. This server runs only its
//! allow-listed names, so a client's name is mapped onto one of them when, and only when,
//! it names the same program here: the same binary on this server's compiler path, and the
//! allowed name is the client's name without a `TRIPLE-` prefix and a `-VERSION` suffix.
//! A name for a compiler this server lacks (`gcc-13` beside a gcc 12) maps to nothing and
//! the client compiles locally: an object is only ever served by the compiler asked for.

use std::path::PathBuf;

use crate::sandbox::toolchain::find_on_path;

/// The allow-listed compilers as this server finds them, for mapping client names.
#[derive(Clone, Debug)]
pub struct CompilerNames {
    /// Allowed name and the binary it resolves to, longest name first (so `clang++` is
    /// tried before `clang`, `c++` before `cc`).
    allowed: Vec<(String, PathBuf)>,
    /// Where names are looked up: the executor's compiler path.
    path: String,
}

impl CompilerNames {
    /// Resolves each allowed name on `path` (the executor's compiler path); names not
    /// installed are left out.
    pub fn resolve(allowed: &[String], path: &str) -> Self {
        let mut found: Vec<(String, PathBuf)> = allowed
            .iter()
            .filter(|n| is_plain_name(n))
            .filter_map(|n| find_on_path(n, path).map(|p| (n.clone(), p)))
            .collect();
        found.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Self {
            allowed: found,
            path: path.to_owned(),
        }
    }

    /// The allowed name that `requested` (argv\[0\] of a distcc request) means here, or why
    /// it means none.
    pub fn map(&self, requested: &str) -> Result<String, String> {
        // distccd's rule: `/usr/bin/` and `/bin/` are dropped, any other path refused.
        let name = ["/usr/bin/", "/bin/"]
            .iter()
            .find_map(|p| requested.strip_prefix(p))
            .unwrap_or(requested);
        if !is_plain_name(name) {
            return Err(format!(
                "compiler {requested:?} refused: a path or an odd name, not a compiler name"
            ));
        }
        if let Some((allowed, _)) = self.allowed.iter().find(|(a, _)| a == name) {
            return Ok(allowed.clone());
        }
        let stem = strip_version(name);
        let Some(binary) = find_on_path(name, &self.path) else {
            return Err(format!(
                "compiler {requested:?} is not installed on this server"
            ));
        };
        self.allowed
            .iter()
            .find(|(a, p)| {
                *p == binary
                    && (stem == a.as_str()
                        || stem
                            .strip_suffix(a.as_str())
                            .is_some_and(|triple| triple.len() > 1 && triple.ends_with('-')))
            })
            .map(|(a, _)| a.clone())
            .ok_or_else(|| {
                format!(
                    "compiler {requested:?} is not one this server allows (or not the same binary)"
                )
            })
    }
}

/// Letters, digits and `. _ + -`, not starting with `-` or `.`: a file name in a
/// directory, never a path.
fn is_plain_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && !n.starts_with(['-', '.'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// `gcc-12` → `gcc`, `clang++-14.0` → `clang++`; other names unchanged.
fn strip_version(n: &str) -> &str {
    match n.rsplit_once('-') {
        Some((stem, v))
            if !stem.is_empty()
                && !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && v.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            stem
        }
        _ => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A compiler path with two "compilers" (any executable will do: nothing is run)
    /// and the aliases a Debian system has for them.
    fn fixture() -> (tempfile::TempDir, CompilerNames) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path();
        for real in ["x86_64-linux-gnu-gcc-12", "x86_64-linux-gnu-g++-12"] {
            std::fs::write(bin.join(real), b"").unwrap();
        }
        for (alias, target) in [
            ("gcc", "x86_64-linux-gnu-gcc-12"),
            ("gcc-12", "x86_64-linux-gnu-gcc-12"),
            ("x86_64-linux-gnu-gcc", "x86_64-linux-gnu-gcc-12"),
            ("cc", "gcc"),
            ("g++", "x86_64-linux-gnu-g++-12"),
            ("x86_64-linux-gnu-g++", "x86_64-linux-gnu-g++-12"),
            ("other-gcc", "x86_64-linux-gnu-g++-12"),
        ] {
            symlink(target, bin.join(alias)).unwrap();
        }
        std::fs::write(bin.join("gcc-13"), b"").unwrap();
        let allowed = ["gcc", "g++", "cc", "c++"].map(String::from);
        let names = CompilerNames::resolve(&allowed, bin.to_str().unwrap());
        (dir, names)
    }

    #[test]
    fn client_spellings_map_onto_the_allowed_name_of_the_same_binary() {
        let (_dir, names) = fixture();
        for (requested, want) in [
            ("gcc", "gcc"),
            ("cc", "cc"),
            ("/usr/bin/gcc", "gcc"),
            ("/bin/g++", "g++"),
            ("x86_64-linux-gnu-gcc", "gcc"),
            ("x86_64-linux-gnu-gcc-12", "gcc"),
            ("gcc-12", "gcc"),
            ("x86_64-linux-gnu-g++-12", "g++"),
        ] {
            assert_eq!(names.map(requested).as_deref(), Ok(want), "{requested}");
        }
    }

    #[test]
    fn other_paths_other_binaries_and_missing_compilers_are_refused() {
        let (_dir, names) = fixture();
        for bad in [
            "/usr/local/bin/gcc",
            "../gcc",
            "/tmp/gcc",
            "gcc;sh",
            "-gcc",
            "",
            // Installed, but another binary than the allowed gcc: never mapped.
            "gcc-13",
            "other-gcc",
            // Not installed at all.
            "x86_64-linux-gnu-gcc-14",
            "clang",
        ] {
            assert!(names.map(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_are_stripped_only_when_they_are_versions() {
        assert_eq!(strip_version("gcc-12"), "gcc");
        assert_eq!(strip_version("clang++-14.0"), "clang++");
        assert_eq!(
            strip_version("x86_64-linux-gnu-gcc"),
            "x86_64-linux-gnu-gcc"
        );
        assert_eq!(strip_version("gcc-"), "gcc-");
    }
}
