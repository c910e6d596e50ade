//! dcache installed as a link named after a compiler, first on PATH (as ccache and distcc
//! users set it up): `make CC=gcc` goes through the cache, the real compiler is found
//! further on PATH, and a PATH that leads only back to dcache is a clear error. Real gcc
//! and make; each test has its own DCACHE_DIR, HOME and temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{DCACHE, stat};

/// A directory of links to dcache named `names`, and a PATH with it first.
struct Links {
    dir: tempfile::TempDir,
}

impl Links {
    fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            symlink(DCACHE, dir.path().join(n)).unwrap();
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// This directory, then `rest`.
    fn path_var(&self, rest: &[&Path]) -> std::ffi::OsString {
        let mut dirs: Vec<PathBuf> = vec![self.dir.path().to_owned()];
        dirs.extend(rest.iter().map(|p| p.to_path_buf()));
        std::env::join_paths(dirs).unwrap()
    }

    /// This directory first on the test's own PATH.
    fn path_first(&self) -> std::ffi::OsString {
        let system = std::env::var_os("PATH").unwrap();
        let rest: Vec<PathBuf> = std::env::split_paths(&system).collect();
        let rest: Vec<&Path> = rest.iter().map(PathBuf::as_path).collect();
        self.path_var(&rest)
    }
}

/// A small program: three sources and a link, built by `$(CC)`.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("a.c", "int a(int x) { return x * 3; }\n"),
        (
            "b.c",
            "#include <string.h>\nint b(const char *s) { return (int)strlen(s); }\n",
        ),
        (
            "main.c",
            "#include <stdio.h>\nint a(int); int b(const char *);\n\
             int main(void) { printf(\"%d\\n\", a(b(\"hello\"))); return 0; }\n",
        ),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(
        dir.path().join("Makefile"),
        "prog: a.o b.o main.o\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n\
         clean:\n\trm -f *.o prog\n",
    )
    .unwrap();
    // Older than the wrapper's freshness rule (a file changed just before a compile is
    // never recorded, and its status-change time cannot be set back), so every compile
    // of the cold build takes the same way, and the warm build finds what it recorded.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dir
}

/// `make CC=gcc` in `project` with `path` as PATH, the cache in `cache`, HOME in `home`.
fn make(project: &Path, path: &std::ffi::OsStr, cache: &Path, home: &Path) {
    let clean = Command::new("make")
        .args(["-s", "clean"])
        .current_dir(project)
        .status()
        .unwrap();
    assert!(clean.success());
    let out = Command::new("make")
        .args(["-s", "CC=gcc"])
        .current_dir(project)
        .env("PATH", path)
        .env("DCACHE_DIR", cache)
        .env("HOME", home)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("DCACHE_HOSTS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stats(cache: &Path) -> String {
    let out = Command::new(DCACHE)
        .args(["--stats", "--json"])
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn objects(dir: &Path) -> Vec<Vec<u8>> {
    ["a.o", "b.o", "main.o"]
        .iter()
        .map(|o| std::fs::read(dir.join(o)).unwrap())
        .collect()
}

#[test]
fn make_cc_gcc_through_a_link_caches_and_builds_what_gcc_builds() {
    let links = Links::new(&["gcc", "cc"]);
    let p = project();
    let (cache, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Plain gcc first, for the objects to compare with.
    let system = std::env::var_os("PATH").unwrap();
    make(p.path(), &system, cache.path(), home.path());
    let plain = objects(p.path());
    make(p.path(), &links.path_first(), cache.path(), home.path());
    assert_eq!(objects(p.path()), plain, "objects differ from plain gcc's");
    let json = stats(cache.path());
    // Three compiles went through the cache (the link step ran gcc locally).
    assert_eq!((stat(&json, "misses"), stat(&json, "compiles")), (3, 3));
    make(p.path(), &links.path_first(), cache.path(), home.path());
    let json = stats(cache.path());
    assert_eq!((stat(&json, "hits"), stat(&json, "compiles")), (3, 3));
    assert_eq!(objects(p.path()), plain);
    let run = Command::new(p.path().join("prog")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "15\n");
    assert!(
        !home.path().join(".cache").exists(),
        "something wrote under HOME instead of DCACHE_DIR"
    );
}

fn compile_with(program: &Path, path: &std::ffi::OsStr, dir: &Path, cache: &Path) -> Output {
    Command::new(program)
        .args(["-O2", "-c", "a.c", "-o", "a.o"])
        .current_dir(dir)
        .env("PATH", path)
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .output()
        .unwrap()
}

#[test]
fn a_path_that_leads_only_back_to_dcache_is_a_clear_error() {
    // The link, a second link to it in another directory, and a link loop: nothing
    // else named gcc on PATH.
    let links = Links::new(&["gcc"]);
    let other = tempfile::tempdir().unwrap();
    symlink(links.path().join("gcc"), other.path().join("gcc")).unwrap();
    let looped = tempfile::tempdir().unwrap();
    symlink(looped.path().join("gcc"), looped.path().join("gcc")).unwrap();
    let p = project();
    let cache = tempfile::tempdir().unwrap();
    let path = links.path_var(&[other.path(), looped.path()]);
    let out = compile_with(&links.path().join("gcc"), &path, p.path(), cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "dcache: gcc: no gcc on PATH other than dcache itself; skipped {} (dcache \
             itself), {} (dcache itself), {} (a link that does not resolve)\n",
            links.path().join("gcc").display(),
            other.path().join("gcc").display(),
            looped.path().join("gcc").display()
        )
    );
    assert!(!p.path().join("a.o").exists());
    // With the system directories after them, the same links find the real gcc.
    let system = std::env::var_os("PATH").unwrap();
    let mut dirs = vec![
        links.path().to_owned(),
        other.path().to_owned(),
        looped.path().to_owned(),
    ];
    dirs.extend(std::env::split_paths(&system));
    let path = std::env::join_paths(dirs).unwrap();
    let out = compile_with(&links.path().join("gcc"), &path, p.path(), cache.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(p.path().join("a.o").exists());
}

#[test]
fn a_versioned_name_and_dcache_gcc_with_the_link_on_path_both_reach_the_real_compiler() {
    let versioned = "x86_64-linux-gnu-gcc-12";
    let links = Links::new(&["gcc", versioned]);
    let p = project();
    let cache = tempfile::tempdir().unwrap();
    let path = links.path_first();
    if Command::new(versioned).arg("--version").output().is_ok() {
        let out = compile_with(&links.path().join(versioned), &path, p.path(), cache.path());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stat(&stats(cache.path()), "compiles"), 1);
    }
    // `dcache gcc` where the first gcc on PATH is the link: compiled once, through the
    // real gcc, not through dcache twice.
    std::fs::remove_file(p.path().join("a.o")).ok();
    let before = stat(&stats(cache.path()), "compiles");
    let out = Command::new(DCACHE)
        .args(["gcc", "-O2", "-c", "b.c"])
        .current_dir(p.path())
        .env("PATH", &path)
        .env("DCACHE_DIR", cache.path())
        .env_remove("DCACHE_HOSTS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = stats(cache.path());
    assert_eq!(stat(&json, "compiles"), before + 1);
    let plain = Command::new("gcc")
        .args(["-O2", "-c", "b.c", "-o", "plain.o"])
        .current_dir(p.path())
        .status()
        .unwrap();
    assert!(plain.success());
    assert_eq!(
        std::fs::read(p.path().join("b.o")).unwrap(),
        std::fs::read(p.path().join("plain.o")).unwrap()
    );
}

#[test]
fn a_compiler_script_that_calls_gcc_again_is_stopped_not_looped() {
    let links = Links::new(&["gcc"]);
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("gcc");
    std::fs::write(&script, "#!/bin/sh\nexec gcc \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let system = std::env::var_os("PATH").unwrap();
    let mut dirs = vec![links.path().to_owned(), scripts.path().to_owned()];
    dirs.extend(std::env::split_paths(&system));
    let path = std::env::join_paths(dirs).unwrap();
    let p = project();
    let cache = tempfile::tempdir().unwrap();
    let out = compile_with(&links.path().join("gcc"), &path, p.path(), cache.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dcache: gcc: 8 nested invocations through dcache"),
        "{err}"
    );
}
