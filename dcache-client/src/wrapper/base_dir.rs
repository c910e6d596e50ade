//! Rewriting absolute paths in preprocessed source relative to the working directory, so
//! the same project checked out in two places produces the same text, hence the same key.
//!
//! The preprocessor records every file it enters in a line marker (`# 12 "/home/a/p/x.h" 2`).
//! With absolute include paths (`-I$PWD/include`, as CMake writes them) those markers
//! differ between checkouts even though, without `-g`, the object does not depend on them.
//! Under an opt-in base directory (`DCACHE_BASEDIR`, like ccache's `base_dir`), markers
//! naming files inside it are rewritten relative to the working directory.
//!
//! What changes: file names the compiler prints in diagnostics and writes into debug
//! information become relative. The wrapper therefore re-runs a rewritten compile locally
//! whenever it printed anything, and with `-g` keeps the marker that names the working
//! directory itself, so debug information still resolves to the client's files.

use std::path::{Component, Path, PathBuf};

/// Rewrites the line markers of `source` that name absolute paths inside `base`, relative
/// to `cwd`. Returns `None` when nothing needed rewriting (the common case: relative
/// include paths), so the caller keeps the original bytes.
///
/// Markers with escapes in their path (a backslash or a quote in a file name) are left
/// alone rather than decoded: correctness over sharing.
pub fn relativize_line_markers(source: &[u8], base: &Path, cwd: &Path) -> Option<Vec<u8>> {
    if !base.is_absolute() || !cwd.is_absolute() {
        return None;
    }
    let mut out = Vec::with_capacity(source.len());
    let mut changed = false;
    for line in source.split_inclusive(|&b| b == b'\n') {
        match rewrite_marker(line, base, cwd) {
            Some(new) => {
                out.extend_from_slice(&new);
                changed = true;
            }
            None => out.extend_from_slice(line),
        }
    }
    changed.then_some(out)
}

/// The rewritten marker, if `line` is a marker naming a file inside `base`.
fn rewrite_marker(line: &[u8], base: &Path, cwd: &Path) -> Option<Vec<u8>> {
    // `# <digits> "<path>"<rest>`: the form gcc and clang write.
    let rest = line.strip_prefix(b"# ")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let after_digits = rest[digits..].strip_prefix(b" \"")?;
    let end = after_digits.iter().position(|&b| b == b'"')?;
    let quoted = &after_digits[..end];
    if quoted.contains(&b'\\') || quoted.ends_with(b"//") {
        // An escaped name, or the working-directory marker `-g` adds (`"/cwd//"`): that
        // one must stay absolute for debug information to name the client's directory.
        return None;
    }
    let path = Path::new(std::str::from_utf8(quoted).ok()?);
    if !path.is_absolute() || !path.starts_with(base) {
        return None;
    }
    let relative = relative_to(cwd, path)?;
    let relative = relative.to_str()?;
    let mut new = Vec::with_capacity(line.len());
    new.extend_from_slice(b"# ");
    new.extend_from_slice(&rest[..digits]);
    new.extend_from_slice(b" \"");
    new.extend_from_slice(relative.as_bytes());
    new.extend_from_slice(&after_digits[end..]);
    Some(new)
}

/// `to` relative to the directory `from`, lexically (both absolute, no `..` in `from`).
fn relative_to(from: &Path, to: &Path) -> Option<PathBuf> {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    if from.iter().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(src: &str, base: &str, cwd: &str) -> Option<String> {
        relativize_line_markers(src.as_bytes(), Path::new(base), Path::new(cwd))
            .map(|v| String::from_utf8(v).unwrap_or_default())
    }

    #[test]
    fn markers_inside_the_base_become_relative_to_the_working_directory() {
        let src = "# 1 \"x.c\"\n# 1 \"/home/a/p/include/x.h\" 1\nint x;\n# 3 \"/usr/include/stdio.h\" 3 4\n";
        assert_eq!(
            rewrite(src, "/home/a", "/home/a/p/build").as_deref(),
            Some(
                "# 1 \"x.c\"\n# 1 \"../include/x.h\" 1\nint x;\n# 3 \"/usr/include/stdio.h\" 3 4\n"
            )
        );
    }

    #[test]
    fn two_checkouts_give_the_same_text() {
        let a = rewrite("# 1 \"/src/a/proj/inc/h.h\" 1\n", "/src", "/src/a/proj");
        let b = rewrite("# 1 \"/src/b/proj/inc/h.h\" 1\n", "/src", "/src/b/proj");
        assert_eq!(a, b);
        assert_eq!(a.as_deref(), Some("# 1 \"inc/h.h\" 1\n"));
    }

    #[test]
    fn nothing_outside_the_base_or_escaped_or_the_cwd_marker_is_touched() {
        for src in [
            "# 1 \"/usr/include/x.h\" 1\n",
            "# 1 \"/home/a/we\\\"ird.h\" 1\n",
            "# 1 \"/home/a/p//\"\n",
            "#pragma once\n",
            "# define X \"/home/a/x\"\n",
            "x = \"# 1 \\\"/home/a/x\\\"\";\n",
        ] {
            assert_eq!(rewrite(src, "/home/a", "/home/a/p"), None, "{src}");
        }
    }

    #[test]
    fn a_relative_base_or_cwd_disables_rewriting() {
        assert_eq!(rewrite("# 1 \"/a/x.h\"\n", "a", "/a"), None);
        assert_eq!(rewrite("# 1 \"/a/x.h\"\n", "/a", "a"), None);
    }

    #[test]
    fn the_working_directory_itself_is_dot() {
        assert_eq!(
            relative_to(Path::new("/a/b"), Path::new("/a/b")),
            Some(PathBuf::from("."))
        );
        assert_eq!(
            relative_to(Path::new("/a/b/c"), Path::new("/a/x/y.h")),
            Some(PathBuf::from("../../x/y.h"))
        );
    }
}
