//! The files one compiler needs to run: what its sandbox may read and execute.
//!
//! Resolved once per compiler when the server starts, by asking the compiler itself where
//! its programs are (`-print-prog-name`) and the dynamic loader which libraries each of
//! them loads (`ldd`). Everything is a single file, never a whole directory such as
//! `/usr/lib`, so a compile cannot read the rest of the system.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Programs a compile may start besides the driver: gcc's compilers proper and the
/// assembler (clang runs itself, and `as` only with `-fno-integrated-as`).
const HELPERS: &[&str] = &["cc1", "cc1plus", "as"];

/// Files the dynamic loader reads besides the libraries themselves.
const LOADER_FILES: &[&str] = &["/etc/ld.so.cache"];

/// Every file `compiler` needs to compile preprocessed input to an object, with
/// `search_path` as its `PATH`: the driver, its helpers, their shared libraries and the
/// loader. Paths are canonical; missing helpers are left out (not every compiler has
/// every helper).
pub fn resolve(compiler: &Path, search_path: &str) -> Vec<PathBuf> {
    let mut programs = BTreeSet::new();
    if let Ok(p) = compiler.canonicalize() {
        programs.insert(p);
    }
    for helper in HELPERS {
        if let Some(p) = prog_name(compiler, helper, search_path) {
            programs.insert(p);
        }
        if let Some(p) = find_on_path(helper, search_path) {
            programs.insert(p);
        }
    }
    let mut files: BTreeSet<PathBuf> = programs.clone();
    for program in &programs {
        files.extend(shared_libraries(program));
    }
    files.extend(
        LOADER_FILES
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .map(Path::to_path_buf),
    );
    files.into_iter().collect()
}

/// `compiler -print-prog-name=NAME`, when it names an existing file.
fn prog_name(compiler: &Path, name: &str, search_path: &str) -> Option<PathBuf> {
    let out = Command::new(compiler)
        .arg(format!("-print-prog-name={name}"))
        .env_clear()
        .env("PATH", search_path)
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let p = Path::new(text.trim());
    if p.is_absolute() && p.is_file() {
        p.canonicalize().ok()
    } else {
        None
    }
}

/// The first `name` in `search_path` (directories separated by `:`), canonical: how the
/// server finds its compilers, never through its own `PATH`.
pub fn find_on_path(name: &str, search_path: &str) -> Option<PathBuf> {
    search_path
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// The shared libraries and loader `program` loads, from `ldd`: every absolute path in its
/// report. A static or unreadable program has none.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd")
        .arg(program)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/bin:/bin")
        .output()
    else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)".
        for word in line.split_whitespace() {
            if word.starts_with('/') {
                let p = Path::new(word);
                if let Ok(c) = p.canonicalize() {
                    libs.push(c);
                }
                // The loader is found by the name in the program's header, often a
                // symlink: the link itself must be reachable too.
                libs.push(p.to_path_buf());
            }
        }
    }
    libs
}
