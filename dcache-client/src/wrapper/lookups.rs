//! The header lookups a compile depended on, so direct mode can tell when one would now
//! find another file: a header created earlier on the search path (shadowing the one
//! recorded), removed, or renamed, and every `__has_include` answer.
//!
//! Why not directory modification times: creating, removing or renaming an entry does
//! change its directory's mtime (POSIX), so an unchanged mtime would prove no lookup in
//! it changed; but builds write their objects into the very directories they include
//! from (the source's own directory is searched first for `#include "..."`), so those
//! mtimes change with every compile and direct mode would never hit. Instead, each
//! lookup's candidates are recorded by path: for every header name a file read names,
//! the path it would have in every directory that lookup searched up to the one where it
//! was found, and whether a regular file, something else, or nothing is there. The
//! preprocessor's choice depends only on which of these candidates are files (the first
//! one is taken), and the chosen file's contents are hashed with the manifest, so if
//! every candidate is as recorded, every lookup finds what it found before. A missing subdirectory (`DIR/sys` for
//! `<sys/types.h>`) needs nothing special: the candidate `DIR/sys/types.h` is absent
//! either way, and creating it changes that.
//!
//! The names come from the text of the files read: every `#include`, `#include_next`
//! and `#import` directive and every `__has_include`/`__has_include_next` operand,
//! including those in branches not taken (more candidates than needed is only a little
//! slower). A computed `#include MACRO` that found a file is covered by deriving its
//! name from where the file was found; a computed `__has_include(MACRO)` that found
//! nothing cannot be known, so a file using one is not recorded, nor one with `#embed`
//! or `__has_embed` (a file read that no list names).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::include_dirs::SearchDirs;

/// What is at a candidate path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Probe {
    /// Nothing (or a path through something that is not a directory).
    Absent,
    /// A regular file (after following symlinks).
    File,
    /// Something else: a directory, a device, or a path that cannot be examined.
    Other,
}

impl Probe {
    /// What is at `path` now.
    pub fn at(path: &Path) -> Self {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Self::File,
            Ok(_) => Self::Other,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                Self::Absent
            }
            Err(_) => Self::Other,
        }
    }

    /// The stored byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Absent => 0,
            Self::File => 1,
            Self::Other => 2,
        }
    }

    /// From the stored byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Absent),
            1 => Some(Self::File),
            2 => Some(Self::Other),
            _ => None,
        }
    }
}

/// Examines candidate paths as [`Probe::at`] does, with fewer system calls: most
/// candidates lie in directories that do not exist (`bits/types/X.h` under each of the
/// system directories that has no `bits`), and a path whose parent does not resolve to a
/// directory is absent whatever its last component is, so each such parent is examined
/// once instead of every path under it. On Debian 12 a C file including `<signal.h>` and
/// `<unistd.h>` has about 520 candidates, 420 of them under 48 missing directories.
///
/// Path resolution goes component by component, so "the parent is absent or a regular
/// file" proves "absent" for every path below it, `..` components included. A parent that
/// cannot be examined (permissions) proves nothing; its paths are examined one by one.
#[derive(Debug, Default)]
pub struct Prober {
    /// Directories examined (by their bytes: hashing a `Path` parses its components),
    /// and whether nothing can be below them.
    empty_below: HashMap<OsString, bool>,
}

impl Prober {
    /// What is at `path` now.
    pub fn probe(&mut self, path: &Path) -> Probe {
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && self.nothing_below(dir) => Probe::Absent,
            _ => Probe::at(path),
        }
    }

    /// Whether no path below `dir` can resolve: walks up to the nearest directory
    /// already examined, then examines the ones below it from the top, so a missing
    /// directory answers for all its descendants and each directory costs at most one
    /// system call per prober.
    fn nothing_below(&mut self, dir: &Path) -> bool {
        let mut pending = Vec::new();
        let mut nothing = false;
        for a in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if let Some(&known) = self.empty_below.get(a.as_os_str()) {
                nothing = known;
                break;
            }
            pending.push(a);
        }
        for a in pending.into_iter().rev() {
            nothing = nothing || matches!(Probe::at(a), Probe::Absent | Probe::File);
            self.empty_below.insert(a.as_os_str().to_owned(), nothing);
        }
        nothing
    }
}

/// One header name a file looks up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name {
    /// `"..."` (searched from the includer's directory first) rather than `<...>`.
    pub quoted: bool,
    /// `#include_next` or `__has_include_next`: searched from the next directory on.
    pub next: bool,
    /// The name as written between the delimiters.
    pub name: String,
}

/// The header names in one file's text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Every literal name.
    pub names: Vec<Name>,
    /// Whether some `#include` names its header through a macro.
    pub computed_include: bool,
}

/// The header names `text` looks up, or `None` when its lookups cannot all be known: a
/// `__has_include` whose operand is not a literal name, `#embed`, `__has_embed`.
pub fn scan(text: &[u8]) -> Option<Names> {
    // Backslash-newlines join lines before directives are read.
    let joined;
    let text = if text.windows(2).any(|w| w == b"\\\n") {
        joined = splice(text);
        &joined[..]
    } else {
        text
    };
    if contains(text, b"__has_embed") {
        return None;
    }
    let mut out = Names::default();
    for line in text.split(|&b| b == b'\n') {
        let rest = skip_blank(line);
        let Some(rest) = rest.strip_prefix(b"#").or_else(|| rest.strip_prefix(b"%:")) else {
            continue;
        };
        let rest = skip_blank(rest);
        let word_len = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        let (word, operand) = rest.split_at(word_len);
        let next = match word {
            b"include" | b"import" => false,
            b"include_next" => true,
            b"embed" => return None,
            _ => continue,
        };
        match literal(skip_blank(operand)) {
            Some((quoted, name)) => out.names.push(Name { quoted, next, name }),
            None => out.computed_include = true,
        }
    }
    // __has_include may appear in any #if or #elif, or in a macro's body.
    let mut at = 0;
    while let Some(i) = find(&text[at..], b"__has_include") {
        let start = at + i;
        let mut end = start + b"__has_include".len();
        let next = text[end..].starts_with(b"_next");
        if next {
            end += b"_next".len();
        }
        // A longer identifier that merely starts with the word (`__has_include__`
        // is gcc's older spelling of the same operator, and handled the same way).
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let before_ok = start == 0 || !ident(text[start - 1]);
        let mut tail = &text[end..];
        if let Some(t) = tail.strip_prefix(b"__") {
            tail = t;
        } else if tail.first().is_some_and(|&b| ident(b)) {
            at = end;
            continue;
        }
        at = end;
        if !before_ok {
            continue;
        }
        let tail = skip_blank(tail);
        let Some(inner) = tail.strip_prefix(b"(") else {
            // `#ifdef __has_include`, `defined(__has_include)`: no lookup.
            continue;
        };
        let (quoted, name) = literal(skip_blank(inner))?;
        out.names.push(Name { quoted, next, name });
    }
    out.names.sort();
    out.names.dedup();
    Some(out)
}

/// `<name>` or `"name"` at the start of `s`.
fn literal(s: &[u8]) -> Option<(bool, String)> {
    let (close, quoted) = match s.first()? {
        b'<' => (b'>', false),
        b'"' => (b'"', true),
        _ => return None,
    };
    let body = &s[1..];
    let end = body.iter().position(|&b| b == close)?;
    let name = std::str::from_utf8(&body[..end]).ok()?;
    (!name.is_empty()).then(|| (quoted, name.to_owned()))
}

/// Skips spaces, tabs and `/* */` comments.
fn skip_blank(mut s: &[u8]) -> &[u8] {
    loop {
        let t = s.trim_ascii_start();
        if let Some(c) = t.strip_prefix(b"/*") {
            match find(c, b"*/") {
                Some(i) => s = &c[i + 2..],
                None => return &[],
            }
        } else {
            return t;
        }
    }
}

fn splice(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\' && text.get(i + 1) == Some(&b'\n') {
            i += 2;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The directories `#include "..."` searches from a file in `includer_dir`, in order.
fn quote_chain<'a>(
    dirs: &'a SearchDirs,
    includer_dir: &Path,
) -> impl Iterator<Item = PathBuf> + 'a {
    std::iter::once(includer_dir.to_path_buf())
        .chain(dirs.quote.iter().cloned())
        .chain(dirs.bracket.iter().cloned())
}

/// The candidates of looking `name` up along `chain` (in order): each one up to and
/// including the first regular file, which the preprocessor takes (the ones after it
/// cannot change the answer while those before it stay as recorded), or all of them
/// for `#include_next` (`all`), whose starting point this does not track; then `name`
/// in every directory that did not exist (their place on the path is not known).
fn lookup(
    chain: impl Iterator<Item = PathBuf>,
    ignored: &[PathBuf],
    name: &str,
    all: bool,
    out: &mut Vec<PathBuf>,
) {
    for dir in chain {
        let c = dir.join(name);
        let found = !all && Probe::at(&c) == Probe::File;
        out.push(c);
        if found {
            break;
        }
    }
    out.extend(ignored.iter().map(|d| d.join(name)));
}

/// The candidates of the lookups of `names`, found in the file at `path`: for each, the
/// path it has in each directory its form searches, in order, up to the first regular
/// file (all of them for `#include_next`), and in every dropped directory.
pub fn file_candidates(path: &Path, names: &Names, dirs: &SearchDirs) -> Vec<PathBuf> {
    let own_dir = path.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for n in &names.names {
        if Path::new(&n.name).is_absolute() {
            out.push(PathBuf::from(&n.name));
        } else if n.quoted || n.next {
            lookup(
                quote_chain(dirs, own_dir),
                &dirs.ignored,
                &n.name,
                n.next,
                &mut out,
            );
        } else {
            lookup(
                dirs.bracket.iter().cloned(),
                &dirs.ignored,
                &n.name,
                false,
                &mut out,
            );
        }
    }
    out
}

/// A file the compile read, with its text.
#[derive(Debug)]
pub struct Read<'a> {
    /// Its path, as the compiler named it.
    pub path: &'a Path,
    /// Its contents.
    pub text: &'a [u8],
}

/// Every candidate path of every lookup the compile of `main` may have made, given the
/// files it read (`main` among them), the search directories, and the names of forced
/// includes (`-include`, `-imacros`: looked up from the working directory first).
/// `None` when some lookup cannot be known (see [`scan`]).
pub fn candidates(
    main: &Path,
    read: &[Read<'_>],
    dirs: &SearchDirs,
    forced: &[String],
) -> Option<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    let mut all_dirs: BTreeSet<PathBuf> = dirs
        .quote
        .iter()
        .chain(&dirs.bracket)
        .chain(&dirs.ignored)
        .cloned()
        .collect();
    for f in forced {
        let mut c = Vec::new();
        lookup(
            quote_chain(dirs, Path::new("")),
            &dirs.ignored,
            f,
            false,
            &mut c,
        );
        out.extend(c);
    }
    let mut computed = false;
    for r in read {
        let names = scan(r.text)?;
        computed |= names.computed_include;
        all_dirs.insert(r.path.parent().unwrap_or(Path::new("")).to_path_buf());
        out.extend(file_candidates(r.path, &names, dirs));
    }
    if computed || !forced.is_empty() {
        // A file no literal name explains was found under a name only its path tells:
        // that name, looked up in every directory.
        for r in read {
            if r.path == main || out.contains(r.path) {
                continue;
            }
            let names: Vec<PathBuf> = all_dirs
                .iter()
                .filter_map(|d| r.path.strip_prefix(d).ok())
                .filter(|n| !n.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .collect();
            for n in names {
                out.extend(all_dirs.iter().map(|d| d.join(&n)));
            }
        }
    }
    Some(out)
}

/// What is at each candidate now, or `None` when one that exists (or a symlink on the
/// way to it) may have changed after the compile `started` (see
/// `direct::changed_at`), so is not to be trusted as what the
/// compile saw: a header created between the compile's lookups and this recording would
/// otherwise be recorded as if the compile had found it.
pub fn record(candidates: BTreeSet<PathBuf>, started: SystemTime) -> Option<Vec<(PathBuf, Probe)>> {
    let mut out = Vec::with_capacity(candidates.len());
    let mut prober = Prober::default();
    for path in candidates {
        let probe = prober.probe(&path);
        if probe != Probe::Absent && super::direct::changed_at(&path)? >= started {
            return None;
        }
        out.push((path, probe));
    }
    Some(out)
}

/// The files `-include` and `-imacros` name in `args` (separate or joined).
pub fn forced_includes(args: &[std::ffi::OsString]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        for opt in ["-include", "-imacros"] {
            if a == opt {
                if let Some(v) = it.next() {
                    out.push(v.into_owned());
                }
            } else if let Some(v) = a.strip_prefix(opt) {
                out.push(v.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prober_answers_as_probing_each_path_would() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("inc/bits")).unwrap();
        std::fs::write(d.join("inc/bits/types.h"), "").unwrap();
        std::fs::write(d.join("inc/plain.h"), "").unwrap();
        std::os::unix::fs::symlink(d.join("inc"), d.join("link")).unwrap();
        std::os::unix::fs::symlink(d.join("gone"), d.join("dangling")).unwrap();
        let paths = [
            "missing/bits/types/x.h",
            "missing/bits/y.h",
            "missing/z.h",
            "inc/bits/types.h",
            "inc/bits/other.h",
            "inc/plain.h/under.h",
            "inc/plain.h",
            "inc/bits/../plain.h",
            "missing/../inc/plain.h",
            "inc/bits",
            "link/bits/types.h",
            "link/missing/x.h",
            "dangling/x.h",
            "dangling",
        ];
        // In one order and the reverse, so which directory is examined first varies.
        for order in [paths.to_vec(), paths.iter().rev().copied().collect()] {
            let mut prober = Prober::default();
            for p in order {
                let path = d.join(p);
                assert_eq!(prober.probe(&path), Probe::at(&path), "{p}");
            }
        }
        let mut prober = Prober::default();
        assert_eq!(prober.probe(Path::new("relative-missing.h")), Probe::Absent);
    }

    fn names(text: &str) -> Option<Vec<(bool, bool, String)>> {
        scan(text.as_bytes()).map(|n| {
            n.names
                .into_iter()
                .map(|n| (n.quoted, n.next, n.name))
                .collect()
        })
    }

    #[test]
    fn directives_and_has_include_operands_are_found() {
        let text = "#include <stdio.h>\n  # /* c */ include \"a/b.h\"\n#include_next <limits.h>\n\
                    #if __has_include (<sys/x.h>) && __has_include_next(\"y.h\")\n#endif\n\
                    #ifdef __has_include\n#endif\n%:include <dig.h>\n#inc\\\nlude <spliced.h>\n\
                    int include; // #include <not_a_directive.h> is in a comment, still taken\n";
        let mut want = vec![
            (false, false, "dig.h".to_owned()),
            (false, false, "spliced.h".to_owned()),
            (false, false, "stdio.h".to_owned()),
            (false, false, "sys/x.h".to_owned()),
            (false, true, "limits.h".to_owned()),
            (true, false, "a/b.h".to_owned()),
            (true, true, "y.h".to_owned()),
        ];
        want.sort();
        assert_eq!(names(text), Some(want));
        let computed = scan(b"#include FT_FREETYPE_H\n").unwrap_or_default();
        assert!(computed.computed_include && computed.names.is_empty());
    }

    #[test]
    fn lookups_that_cannot_be_known_are_refused() {
        assert_eq!(names("#if __has_include(HEADER)\n#endif\n"), None);
        assert_eq!(names("#define H(x) __has_include(x)\n"), None);
        assert_eq!(names("#embed \"data.bin\"\n"), None);
        assert_eq!(names("#if __has_embed(\"d\")\n#endif\n"), None);
        // Not the operator: a longer identifier, and the word in prose.
        assert_eq!(names("int my__has_include(int);\n"), Some(vec![]));
        assert_eq!(
            names("/* __has_include argument (PR 80005) */\n"),
            Some(vec![])
        );
    }

    #[test]
    fn candidates_run_up_to_the_file_found_and_include_missing_directories() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = |n: &str| tmp.path().join(n);
        for dir in ["i1", "i2/sys", "i3/sys", "src"] {
            std::fs::create_dir_all(d(dir)).unwrap_or_default();
        }
        for f in ["i2/sys/t.h", "i3/sys/t.h", "i3/n.h"] {
            std::fs::write(d(f), "").unwrap_or_default();
        }
        let dirs = SearchDirs {
            quote: vec![d("q")],
            bracket: vec![d("i1"), d("i2"), d("i3")],
            ignored: vec![d("gone")],
        };
        let main_path = d("src/m.c");
        let main = b"#include \"h.h\"\n#include <sys/t.h>\n#include_next <n.h>\n".to_vec();
        let read = [Read {
            path: &main_path,
            text: &main,
        }];
        let c = candidates(&main_path, &read, &dirs, &[]).unwrap_or_default();
        let want: BTreeSet<PathBuf> = [
            // "h.h": found nowhere, so searched everywhere.
            "src/h.h",
            "q/h.h",
            "i1/h.h",
            "i2/h.h",
            "i3/h.h",
            "gone/h.h",
            // <sys/t.h>: found in i2, so i3 does not matter (i1/sys does not exist).
            "i1/sys/t.h",
            "i2/sys/t.h",
            "gone/sys/t.h",
            // #include_next: every directory.
            "src/n.h",
            "q/n.h",
            "i1/n.h",
            "i2/n.h",
            "i3/n.h",
            "gone/n.h",
        ]
        .map(d)
        .into();
        assert_eq!(c, want);
    }

    #[test]
    fn a_computed_include_is_covered_by_the_name_its_file_was_found_under() {
        let dirs = SearchDirs {
            quote: vec![],
            bracket: vec![PathBuf::from("/i1"), PathBuf::from("/i2")],
            ignored: vec![],
        };
        let main = b"#include HDR\n".to_vec();
        let read = [
            Read {
                path: Path::new("m.c"),
                text: &main,
            },
            Read {
                path: Path::new("/i2/ft/cfg.h"),
                text: b"",
            },
        ];
        let c = candidates(Path::new("m.c"), &read, &dirs, &[]).unwrap_or_default();
        assert!(c.contains(Path::new("/i1/ft/cfg.h")), "{c:?}");
        assert!(c.contains(Path::new("/i2/ft/cfg.h")), "{c:?}");
    }
}
