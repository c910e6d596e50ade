//! `gcc -c a.c b.c c.c` through dcache: one cached compile per source, with objects,
//! dependency files, diagnostics and exit status exactly as gcc gives them. Real gcc and
//! make; each test in its own temporary directories and DCACHE_DIR.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, stat};

/// Sources in `src/` (so objects land elsewhere than their sources, as gcc puts them in
/// the current directory), one with a warning and, if `broken`, one with an error.
fn project(broken: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let files = [
        (
            "a.c",
            "#include <stdio.h>\nint a(void) { return puts(\"a\"); }\n".to_owned(),
        ),
        (
            "b.c",
            "#warning b is old\nint b(int x) { return x * 2; }\n".to_owned(),
        ),
        (
            "c.c",
            if broken {
                "int c(void) { return undeclared; }\n".to_owned()
            } else {
                "#include <string.h>\nint c(const char *s) { return (int)strlen(s); }\n".to_owned()
            },
        ),
        (
            "d.cpp",
            "#include <vector>\nint d() { return (int)std::vector<int>(3).size(); }\n".to_owned(),
        ),
    ];
    for (name, text) in files {
        std::fs::write(src.join(name), text).unwrap();
    }
    std::fs::write(
        dir.path().join("Makefile"),
        "objs:\n\t$(CC) -O2 -MMD -c src/a.c src/b.c src/c.c src/d.cpp\n",
    )
    .unwrap();
    // Past the wrapper's freshness rule (with a wide margin), so the cold build records
    // every file and the warm one finds it, whatever the load (a file compiled just after
    // being written goes the preprocessor's way unrecorded, and a later depend-mode
    // compile of it uses another key).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dir
}

/// `make CC=cc` in `dir` after removing what the last build made.
fn make(dir: &Path, cc: &str, cache: &Path) -> Output {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "o" || x == "d") {
            std::fs::remove_file(p).unwrap();
        }
    }
    Command::new("make")
        .args(["-s", &format!("CC={cc}")])
        .current_dir(dir)
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        // The in-process server, whose counts this test pins: a daemon still starting may
        // or may not take the first compiles, and it redoes results with warnings locally
        // (b.c's), which counts one compile more.
        .env("DCACHE_DAEMON", "0")
        .output()
        .unwrap()
}

/// Every object and dependency file in `dir`, by name.
fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "o" || x == "d"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
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

#[test]
fn four_sources_in_one_command_are_four_cached_compiles_like_gcc() {
    let p = project(false);
    let cache = tempfile::tempdir().unwrap();
    let plain = make(p.path(), "gcc", cache.path());
    assert!(plain.status.success());
    let expected = outputs(p.path());
    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["a.d", "a.o", "b.d", "b.o", "c.d", "c.o", "d.d", "d.o"]
    );
    let cc = format!("{DCACHE} gcc");
    let cold = make(p.path(), &cc, cache.path());
    assert_eq!(cold.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&cold.stderr),
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(outputs(p.path()), expected, "outputs differ from gcc's");
    let json = stats(cache.path());
    assert_eq!((stat(&json, "misses"), stat(&json, "compiles")), (4, 4));
    // Warm: every source from the cache, the warning printed again.
    let warm = make(p.path(), &cc, cache.path());
    assert!(warm.status.success());
    assert_eq!(
        String::from_utf8_lossy(&warm.stderr),
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(outputs(p.path()), expected);
    let json = stats(cache.path());
    assert_eq!((stat(&json, "hits"), stat(&json, "compiles")), (4, 4));
}

#[test]
fn one_failing_source_fails_the_command_and_the_others_are_still_compiled() {
    let p = project(true);
    let cache = tempfile::tempdir().unwrap();
    let plain = make(p.path(), "gcc", cache.path());
    assert!(!plain.status.success());
    let expected = outputs(p.path());
    assert!(expected.iter().any(|(n, _)| n == "d.o") && !expected.iter().any(|(n, _)| n == "c.o"));
    let through = make(p.path(), &format!("{DCACHE} gcc"), cache.path());
    assert_eq!(through.status.code(), plain.status.code());
    assert_eq!(
        String::from_utf8_lossy(&through.stderr),
        String::from_utf8_lossy(&plain.stderr),
        "diagnostics differ from gcc's (order or text)"
    );
    assert_eq!(outputs(p.path()), expected);
}

#[test]
fn what_gcc_refuses_or_cannot_split_runs_as_gcc_runs_it() {
    let p = project(false);
    let cache = tempfile::tempdir().unwrap();
    // `gcc ARGS`, or `dcache gcc ARGS` when `through` is set.
    let run = |through: bool, args: &[&str]| {
        let mut cmd = Command::new(if through { DCACHE } else { "gcc" });
        if through {
            cmd.arg("gcc");
        }
        cmd.args(args)
            .current_dir(p.path())
            .env("DCACHE_DIR", cache.path())
            .env_remove("DCACHE_HOSTS")
            .output()
            .unwrap()
    };
    // -o with several sources: gcc's own refusal.
    let args = ["-c", "src/a.c", "src/b.c", "-o", "x.o"];
    let (plain, through) = (run(false, &args), run(true, &args));
    assert_eq!(through.status.code(), plain.status.code());
    assert!(!plain.status.success());
    assert_eq!(through.stderr, plain.stderr);
    // A shared dependency file: run as one command, and gcc's result (the last source
    // wins the file).
    let args = ["-c", "src/a.c", "src/b.c", "-MD", "-MF", "all.d"];
    let plain = run(false, &args);
    let plain_dep = std::fs::read(p.path().join("all.d")).unwrap();
    std::fs::remove_file(p.path().join("all.d")).unwrap();
    let through = run(true, &args);
    assert_eq!(through.status.code(), plain.status.code());
    assert_eq!(std::fs::read(p.path().join("all.d")).unwrap(), plain_dep);
    assert_eq!(
        stat(&stats(cache.path()), "compiles"),
        0,
        "nothing went through the cache"
    );
}
