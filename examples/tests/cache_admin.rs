//! The local cache's upkeep end to end: `dcache --max-size`, `--show-stats`, `--clear`,
//! `--show-config`, the settings file, and the bounded statistics log, with real gcc and
//! make, each test in a DCACHE_DIR of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{DCACHE, stat};

/// `dcache ARGS` with `DCACHE_DIR=dir` and nothing else of dcache's in the environment.
fn dcache(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(DCACHE);
    cmd.args(args)
        .env("DCACHE_DIR", dir)
        .env_remove("DCACHE_HOSTS")
        .env_remove("DCACHE_CACHE_SIZE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A project of `n` distinct C files and a Makefile that compiles them all.
fn project(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut objects = Vec::new();
    for i in 0..n {
        std::fs::write(
            dir.path().join(format!("f{i}.c")),
            format!(
                "#include <stdio.h>\nint f{i}(int x) {{\n  static const char s[] = \"{:0200}\";\n  \
                 printf(\"%s %d\\n\", s, x * {i});\n  return x + {i};\n}}\n",
                i
            ),
        )
        .unwrap();
        objects.push(format!("f{i}.o"));
    }
    // A source changed just before the compile is never recorded (its next edit could keep
    // the same mtime), and depend mode has no preprocessed key to fall back on: age them.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(
        dir.path().join("Makefile"),
        format!(
            "all: {}\n%.o: %.c\n\t$(CC) -O2 -MMD -c $< -o $@\nclean:\n\trm -f *.o *.d\n",
            objects.join(" ")
        ),
    )
    .unwrap();
    dir
}

fn make(project: &Path, cache: &Path) {
    let clean = Command::new("make")
        .args(["-s", "clean"])
        .current_dir(project)
        .status()
        .unwrap();
    assert!(clean.success());
    let out = Command::new("make")
        .args(["-s", "-j2", &format!("CC={DCACHE} gcc")])
        .current_dir(project)
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .env_remove("DCACHE_CACHE_SIZE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dcache gcc -c f0.c` in `project`, with the cache in `cache`.
fn compile(project: &Path, cache: &Path) -> Output {
    Command::new(DCACHE)
        .args(["gcc", "-c", "f0.c"])
        .current_dir(project)
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .env_remove("DCACHE_CACHE_SIZE")
        .output()
        .unwrap()
}

/// What the real `du` says the directory takes, in bytes.
fn du(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(dir)
        .output()
        .unwrap();
    let text = ok(&out);
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_300k_limit_is_kept_on_disk_as_du_counts_it() {
    let cache = tempfile::tempdir().unwrap();
    let out = ok(&dcache(cache.path(), &["--max-size", "300K"], &[]));
    assert!(out.contains("300.0 KiB"), "{out}");
    // 150 objects of about 4 KiB, plus a manifest each: several times the limit.
    let p = project(150);
    make(p.path(), cache.path());
    let limit = 300 * 1024;
    let used = du(cache.path());
    assert!(
        used <= limit + limit * 3 / 100,
        "{used} bytes on disk for a {limit}-byte limit"
    );
    assert!(
        used >= limit / 2,
        "the cache kept only {used} of {limit} bytes"
    );
    let json = ok(&dcache(cache.path(), &["--show-stats", "--json"], &[]));
    assert_eq!(stat(&json, "max_size_bytes"), limit);
    assert_eq!(
        stat(&json, "size_bytes"),
        used,
        "--show-stats disagrees with du"
    );
    assert!(stat(&json, "entries") >= 10, "{json}");
    assert_eq!(stat(&json, "compiles"), 150);
    let text = ok(&dcache(cache.path(), &["-s"], &[]));
    assert!(
        text.contains("max size                   300.0 KiB"),
        "{text}"
    );
    // Lowering the limit shrinks the cache at once.
    ok(&dcache(cache.path(), &["-M", "150K"], &[]));
    let used = du(cache.path());
    assert!(
        used <= 150 * 1024,
        "{used} bytes on disk after --max-size 150K"
    );
}

#[test]
fn clear_empties_the_cache_and_the_next_build_compiles_again() {
    let cache = tempfile::tempdir().unwrap();
    let p = project(4);
    make(p.path(), cache.path());
    make(p.path(), cache.path());
    let json = ok(&dcache(cache.path(), &["--show-stats", "--json"], &[]));
    assert_eq!((stat(&json, "entries"), stat(&json, "compiles")), (4, 4));
    assert_eq!(stat(&json, "manifests"), 4);
    let out = ok(&dcache(cache.path(), &["--clear"], &[]));
    assert_eq!(out, "dcache: removed 4 results and 4 manifests\n");
    let json = ok(&dcache(cache.path(), &["--show-stats", "--json"], &[]));
    assert_eq!((stat(&json, "entries"), stat(&json, "manifests")), (0, 0));
    // Statistics survive a clear, as with ccache -C; the next build is a cold one.
    make(p.path(), cache.path());
    let json = ok(&dcache(cache.path(), &["--show-stats", "--json"], &[]));
    assert_eq!((stat(&json, "entries"), stat(&json, "compiles")), (4, 8));
}

#[test]
fn the_settings_file_is_honoured_overridden_and_its_mistakes_named() {
    let cache = tempfile::tempdir().unwrap();
    let file = cache.path().join("dcache.toml");
    ok(&dcache(cache.path(), &["-M", "2G"], &[]));
    let config = ok(&dcache(cache.path(), &["--show-config"], &[]));
    assert!(
        config.contains(&format!(
            "({}) max_size = 2.0 GiB (2147483648 bytes)\n",
            file.display()
        )),
        "{config}"
    );
    let config = ok(&dcache(
        cache.path(),
        &["-p"],
        &[("DCACHE_CACHE_SIZE", "1M")],
    ));
    assert!(
        config.contains("(environment (DCACHE_CACHE_SIZE)) max_size = 1.0 MiB (1048576 bytes)\n"),
        "{config}"
    );
    // A typo in the file stops every dcache process with the file, line and key named:
    // a silently ignored limit would let the cache grow to the default.
    std::fs::write(&file, "max_size = \"2G\"\nmax_sise = \"1G\"\n").unwrap();
    let p = project(1);
    let out = compile(p.path(), cache.path());
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "dcache: {}:2: unknown key \"max_sise\" (known keys: max_size)\n",
            file.display()
        )
    );
    assert!(!p.path().join("f0.o").exists());
    // --max-size refuses to rewrite a broken file.
    let out = dcache(cache.path(), &["-M", "1G"], &[]);
    assert!(!out.status.success());
}

#[test]
fn the_statistics_log_is_folded_and_keeps_its_counts() {
    let cache = tempfile::tempdir().unwrap();
    let log = cache.path().join("stats.log");
    // As an old, unbounded log would be after 20,000 compiles.
    let line = "1 0 0 1 100 0\n";
    std::fs::write(&log, line.repeat(20_000)).unwrap();
    let p = project(1);
    let out = compile(p.path(), cache.path());
    ok(&out);
    let len = std::fs::metadata(&log).unwrap().len();
    assert!(len < 100, "stats.log is {len} bytes after one more compile");
    let json = ok(&dcache(cache.path(), &["--stats", "--json"], &[]));
    assert_eq!(stat(&json, "hits"), 20_000);
    assert_eq!(stat(&json, "compiles"), 20_001);
    assert_eq!(stat(&json, "misses"), 1);
}
