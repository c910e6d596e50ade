//! The directories the preprocessor searches for headers, as the compiler itself reports
//! them (`COMPILER -E -v`), remembered on disk per command line.
//!
//! Direct mode needs them to notice a header appearing, disappearing or being renamed in
//! any searched directory (see [`super::lookups`]). Working the list out from the command
//! line would mean re-implementing the compiler's rules (`-iprefix`, sysroots, multilib
//! and multiarch directories, `CPATH`, dropped duplicates); asking the compiler is exact,
//! and costs one `-E -v` run on an empty input per distinct command line, cached in
//! `DCACHE_DIR/include-dirs`.
//!
//! The list includes the directories the compiler says it ignores because they do not
//! exist: a header created in one of them later would be found, so their contents (none
//! yet) are part of what a manifest records.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::args::Language;

/// Largest cached list file read back; a real one is a few hundred bytes.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Where the preprocessor looks for headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchDirs {
    /// Searched for `#include "..."` only, after the includer's own directory (`-iquote`).
    pub quote: Vec<PathBuf>,
    /// Searched for both forms (`-I`, `-isystem`, the system directories, `-idirafter`),
    /// in order.
    pub bracket: Vec<PathBuf>,
    /// Configured directories the compiler dropped from the path when asked (they did
    /// not exist, or duplicated another): it does not say where on the path they would
    /// be, so every lookup checks them.
    pub ignored: Vec<PathBuf>,
}

/// The options that do not change where headers are searched and must not reach an
/// `-E` run on an empty input: dependency output (it would write a `.d` file) and forced
/// includes (they would read files; they are looked up like `#include "..."`, which
/// [`super::lookups`] handles).
fn keep_for_probe(args: &[OsString]) -> Vec<OsString> {
    const WITH_ARG: &[&str] = &["-MF", "-MT", "-MQ", "-include", "-imacros"];
    const ALONE: &[&str] = &["-MD", "-MMD", "-MP", "-MG", "-M", "-MM", "-H"];
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if WITH_ARG.contains(&s.as_ref()) {
            skip = true;
        } else if ALONE.contains(&s.as_ref()) || WITH_ARG.iter().any(|p| s.starts_with(p)) {
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The search directories for a compile with `preprocess_args` (the plan's, without the
/// input) in `cwd`, from the cache in `cache_dir` or by asking `compiler`. `None` when
/// the compiler cannot tell (it failed, or printed no list): direct mode then records
/// nothing.
pub fn search_dirs(
    cache_dir: &Path,
    compiler: &OsString,
    language: Language,
    preprocess_args: &[OsString],
    cwd: &Path,
) -> Option<SearchDirs> {
    let args = keep_for_probe(preprocess_args);
    let lang = language.source();
    let file = cache_dir.join(hex(&cache_key(compiler, lang, &args, cwd)?));
    if let Some(dirs) = read_cached(&file) {
        return Some(dirs);
    }
    let out = super::local::compiler_command(compiler)
        .args(&args)
        .args(["-E", "-v", "-x", lang, "/dev/null", "-o", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dirs = parse(&out.stderr)?;
    // Best effort: a list that cannot be kept is asked for again next time.
    let _ = write_cached(&file, &dirs);
    Some(dirs)
}

/// What the list depends on: the compiler binary (path, size, modification time), the
/// language, the options, the working directory (relative `-I`) and the variables the
/// compiler reads search directories from.
fn cache_key(compiler: &OsString, lang: &str, args: &[OsString], cwd: &Path) -> Option<[u8; 32]> {
    let path = super::direct::resolve(compiler)?;
    let meta = std::fs::metadata(&path).ok()?;
    let mut h = blake3::Hasher::new_derive_key("dcache 2026-12 include search list v1");
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(path.as_os_str().as_encoded_bytes());
    field(&meta.len().to_be_bytes());
    field(&meta.mtime().to_be_bytes());
    field(&meta.mtime_nsec().to_be_bytes());
    field(&meta.ino().to_be_bytes());
    field(lang.as_bytes());
    field(&(args.len() as u64).to_be_bytes());
    for a in args {
        field(a.as_encoded_bytes());
    }
    field(cwd.as_os_str().as_encoded_bytes());
    for name in super::direct::ENV {
        match std::env::var_os(name) {
            Some(v) => {
                field(b"set");
                field(v.as_encoded_bytes());
            }
            None => field(b"unset"),
        }
    }
    Some(*h.finalize().as_bytes())
}

/// Reads the compiler's `-v` report: the `"..."` and `<...>` lists, and every directory
/// it says it ignores as nonexistent. `None` without both list headings and the end mark
/// (an unknown format: better no direct mode than a partial list).
pub fn parse(stderr: &[u8]) -> Option<SearchDirs> {
    let text = std::str::from_utf8(stderr).ok()?;
    #[derive(PartialEq)]
    enum At {
        Before,
        Quote,
        Bracket,
        Done,
    }
    let mut at = At::Before;
    let mut dirs = SearchDirs::default();
    let mut ignored = Vec::new();
    for line in text.lines() {
        // Dropped as nonexistent, or as a duplicate (gcc compares directories by inode,
        // which a symlink changed later can change): checked by every lookup.
        if let Some(rest) = line
            .strip_prefix("ignoring nonexistent directory \"")
            .or_else(|| line.strip_prefix("ignoring duplicate directory \""))
        {
            ignored.push(PathBuf::from(rest.strip_suffix('"')?));
            continue;
        }
        match line {
            "#include \"...\" search starts here:" if at == At::Before => at = At::Quote,
            "#include <...> search starts here:" if at == At::Quote => at = At::Bracket,
            "End of search list." if at == At::Bracket => at = At::Done,
            _ => {
                let Some(dir) = line.strip_prefix(' ') else {
                    continue;
                };
                // clang marks macOS framework directories; they are searched differently.
                let dir = dir.strip_suffix(" (framework directory)").unwrap_or(dir);
                match at {
                    At::Quote => dirs.quote.push(PathBuf::from(dir)),
                    At::Bracket => dirs.bracket.push(PathBuf::from(dir)),
                    At::Before | At::Done => {}
                }
            }
        }
    }
    if at != At::Done {
        return None;
    }
    dirs.ignored = ignored;
    Some(dirs)
}

/// The stored form: a digest line, then `q DIR`, `b DIR` and `i DIR` lines. The digest makes a
/// truncated or damaged file a miss: a list missing a directory would miss a shadowing
/// header.
fn encode(dirs: &SearchDirs) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    for (tag, list) in [
        ("q", &dirs.quote),
        ("b", &dirs.bracket),
        ("i", &dirs.ignored),
    ] {
        for d in list {
            let s = d.to_str()?;
            if s.contains('\n') {
                return None;
            }
            body.extend_from_slice(format!("{tag} {s}\n").as_bytes());
        }
    }
    let mut out = blake3::hash(&body).to_hex().as_bytes().to_vec();
    out.push(b'\n');
    out.extend_from_slice(&body);
    Some(out)
}

fn decode(bytes: &[u8]) -> Option<SearchDirs> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (digest, body) = text.split_once('\n')?;
    if blake3::hash(body.as_bytes()).to_hex().as_str() != digest {
        return None;
    }
    let mut dirs = SearchDirs::default();
    for line in body.lines() {
        match line.split_once(' ')? {
            ("q", d) => dirs.quote.push(PathBuf::from(d)),
            ("b", d) => dirs.bracket.push(PathBuf::from(d)),
            ("i", d) => dirs.ignored.push(PathBuf::from(d)),
            _ => return None,
        }
    }
    Some(dirs)
}

fn read_cached(file: &Path) -> Option<SearchDirs> {
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    decode(&std::fs::read(file).ok()?)
}

fn write_cached(file: &Path, dirs: &SearchDirs) -> std::io::Result<()> {
    let Some(bytes) = encode(dirs) else {
        return Ok(());
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(&bytes)?;
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

fn hex(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GCC_V: &str = "\
ignoring nonexistent directory \"/usr/local/include/x86_64-linux-gnu\"
ignoring nonexistent directory \"nonexist\"
ignoring duplicate directory \"/usr/include\"
#include \"...\" search starts here:
 q
#include <...> search starts here:
 ./inc/
 /usr/lib/gcc/x86_64-linux-gnu/12/include
 /usr/include
End of search list.
";

    #[test]
    fn the_report_gives_both_lists_and_the_ignored_directories() {
        let d = parse(GCC_V.as_bytes()).unwrap_or_default();
        assert_eq!(d.quote, vec![PathBuf::from("q")]);
        assert_eq!(
            d.bracket,
            [
                "./inc/",
                "/usr/lib/gcc/x86_64-linux-gnu/12/include",
                "/usr/include",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            d.ignored,
            [
                "/usr/local/include/x86_64-linux-gnu",
                "nonexist",
                "/usr/include"
            ]
            .map(PathBuf::from)
        );
        // Cut anywhere before the end mark: not a list.
        for cut in [0, GCC_V.len() / 2, GCC_V.len() - 3] {
            assert_eq!(parse(&GCC_V.as_bytes()[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn the_stored_form_reads_back_and_a_damaged_one_does_not() {
        let d = parse(GCC_V.as_bytes()).unwrap_or_default();
        let bytes = encode(&d).unwrap_or_default();
        assert_eq!(decode(&bytes), Some(d));
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&bytes[..bytes.len() - 5]), None);
    }

    #[test]
    fn dependency_and_forced_include_options_are_not_passed_to_the_probe() {
        let args: Vec<OsString> = [
            "-Iinc",
            "-MD",
            "-MF",
            "x.d",
            "-MQx.o",
            "-include",
            "f.h",
            "-O2",
            "-imacrosm.h",
        ]
        .map(OsString::from)
        .to_vec();
        assert_eq!(
            keep_for_probe(&args),
            ["-Iinc", "-O2"].map(OsString::from).to_vec()
        );
    }

    #[test]
    fn gcc_reports_its_directories_and_they_are_cached() {
        let cache = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cwd = std::env::current_dir().unwrap_or_default();
        let args = ["-Inonexistent-dir-for-test", "-MD"].map(OsString::from);
        let gcc = OsString::from("gcc");
        let d = search_dirs(cache.path(), &gcc, Language::C, &args, &cwd);
        let d = d.unwrap_or_default();
        assert!(d.bracket.contains(&PathBuf::from("/usr/include")), "{d:?}");
        assert!(
            d.ignored
                .contains(&PathBuf::from("nonexistent-dir-for-test")),
            "{d:?}"
        );
        let files = std::fs::read_dir(cache.path()).map_or(0, |r| r.count());
        assert_eq!(files, 1, "one cached list");
        assert_eq!(
            search_dirs(cache.path(), &gcc, Language::C, &args, &cwd),
            Some(d)
        );
        let cxx = search_dirs(cache.path(), &gcc, Language::Cxx, &args, &cwd).unwrap_or_default();
        assert!(
            cxx.bracket
                .iter()
                .any(|p| p.to_string_lossy().contains("c++")),
            "{cxx:?}"
        );
    }
}
