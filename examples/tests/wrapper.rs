//! The `dcache` wrapper end to end, with real gcc, make and `dcache-server` processes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::Command;

use common::{DCACHE, Server, server, stat, stats_json};

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/demo");

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(DEMO).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    // Past the wrapper's freshness rule (with a wide margin), so the cold build records
    // every file and the warm one finds it, whatever the load (a file compiled just after
    // being written goes the preprocessor's way unrecorded, and a later depend-mode
    // compile of it uses another key).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dir
}

fn make(dir: &Path, envs: &[(&str, &str)], cc: &str) {
    let clean = Command::new("make")
        .args(["-s", "clean"])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(clean.success());
    // A DCACHE_DIR of its own unless the test gives one: never the user's cache, nor
    // host health recorded by another test.
    let own = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("make");
    cmd.args(["-s", "-j4", &format!("CC={cc}")])
        .current_dir(dir);
    cmd.env_remove("DCACHE_HOSTS").env("DCACHE_DIR", own.path());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn program_output(dir: &Path) -> String {
    let out = Command::new(dir.join("wordfreq")).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn dep_files(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "d"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn make_through_a_tcp_server_links_runs_and_rebuilds_from_cache() {
    let s = server();
    let dir = project();
    let cc = format!("{DCACHE} gcc");
    make(dir.path(), &[], "gcc");
    let expected = program_output(dir.path());
    let plain_deps = dep_files(dir.path());
    let env = [("DCACHE_HOSTS", s.addr.as_str())];
    make(dir.path(), &env, &cc);
    assert_eq!(program_output(dir.path()), expected);
    assert_eq!(
        dep_files(dir.path()),
        plain_deps,
        "-MMD files differ from gcc's"
    );
    let cold = stats_json(&env);
    assert_eq!(stat(&cold, "compiles"), 4, "{cold}");
    make(dir.path(), &env, &cc);
    assert_eq!(program_output(dir.path()), expected);
    let warm = stats_json(&env);
    assert_eq!(
        stat(&warm, "compiles"),
        4,
        "a clean rebuild compiled again: {warm}"
    );
    assert_eq!(stat(&warm, "hits"), 4, "{warm}");
    assert_eq!(stat(&warm, "early_results"), 4, "{warm}");
}

#[test]
fn the_embedded_default_is_a_local_compiler_cache() {
    let cache = tempfile::tempdir().unwrap();
    let dir = project();
    // Depend mode records a file only once it is past the freshness rule (it might have
    // changed between the compile and the recording); a fresh copy would compile twice.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cc = format!("{DCACHE} gcc");
    let env = [("DCACHE_DIR", cache.path().to_str().unwrap())];
    make(dir.path(), &env, &cc);
    let expected = program_output(dir.path());
    make(dir.path(), &env, &cc);
    assert_eq!(program_output(dir.path()), expected);
    let s = stats_json(&env);
    assert_eq!(stat(&s, "compiles"), 4, "{s}");
    assert_eq!(stat(&s, "hits"), 4, "{s}");
    let zero = Command::new(DCACHE)
        .arg("--zero-stats")
        .env("DCACHE_DIR", cache.path())
        .status()
        .unwrap();
    assert!(zero.success());
    assert_eq!(stat(&stats_json(&env), "hits"), 0);
}

#[test]
fn compile_errors_reproduce_gccs_output_and_status() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.c"),
        "int f(void) { return nope; }\nint g(void) { return 1 }\n",
    )
    .unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd
            .current_dir(dir.path())
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        (out.status.code(), out.stdout, out.stderr)
    };
    let plain = run(Command::new("gcc").args(["-c", "bad.c", "-o", "bad.o"]));
    let own = tempfile::tempdir().unwrap();
    let ours = run(Command::new(DCACHE)
        .args(["gcc", "-c", "bad.c", "-o", "bad.o"])
        .env("DCACHE_DIR", own.path())
        .env("DCACHE_HOSTS", &s.addr));
    assert_ne!(plain.0, Some(0));
    assert_eq!(ours.0, plain.0);
    assert_eq!(
        String::from_utf8_lossy(&ours.2),
        String::from_utf8_lossy(&plain.2)
    );
    assert_eq!(ours.1, plain.1);
}

#[test]
fn warnings_are_gccs_own_bytes_in_the_users_locale_remote_and_embedded() {
    let s = server();
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("warn.c"),
        "int f(void) {\n    int unused = 3;\n    return 0;\n}\n",
    )
    .unwrap();
    // Depend mode (the embedded cache) records only files past the freshness rule.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let run = |cmd: &mut Command| {
        let out = cmd
            .args(["-Wall", "-c", "warn.c", "-o", "warn.o"])
            .current_dir(dir.path())
            .env_remove("LC_ALL")
            .env("LANG", "C.UTF-8")
            .env("DCACHE_DIR", cache.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let plain = run(&mut Command::new("gcc"));
    // The caret line and the typographic quotes a UTF-8 locale gets.
    assert!(
        plain.contains("|         ^~~~~~") && plain.contains('\u{2018}'),
        "{plain}"
    );
    let remote = run(Command::new(DCACHE).arg("gcc").env("DCACHE_HOSTS", &s.addr));
    assert_eq!(remote, plain, "remote");
    for round in ["cold", "warm"] {
        let embedded = run(Command::new(DCACHE).arg("gcc").env_remove("DCACHE_HOSTS"));
        assert_eq!(embedded, plain, "embedded, {round}");
    }
    let env = [("DCACHE_DIR", cache.path().to_str().unwrap())];
    assert_eq!(
        stat(&stats_json(&env), "hits"),
        1,
        "the warm embedded build was a hit"
    );
}

#[test]
fn checkouts_in_different_places_share_entries_under_dcache_basedir() {
    let base = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let checkouts: Vec<std::path::PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let proj = base.path().join(n).join("proj");
            std::fs::create_dir_all(proj.join("inc")).unwrap();
            std::fs::write(
                proj.join("inc/h.h"),
                "static inline int twice(int x) { return 2 * x; }\n",
            )
            .unwrap();
            std::fs::write(
                proj.join("src.c"),
                "#include \"h.h\"\nint f(int x) { return twice(x) + 1; }\n",
            )
            .unwrap();
            proj
        })
        .collect();
    // Absolute include paths, as CMake writes them: the preprocessed text names them.
    let build = |proj: &Path, base_dir: Option<&Path>| {
        let inc = format!("-I{}", proj.join("inc").display());
        let mut cmd = Command::new(DCACHE);
        cmd.args(["gcc", &inc, "-O2", "-c", "src.c", "-o", "src.o"])
            .current_dir(proj)
            .env_remove("DCACHE_HOSTS")
            .env("DCACHE_DIR", cache.path());
        match base_dir {
            Some(b) => cmd.env("DCACHE_BASEDIR", b),
            None => cmd.env_remove("DCACHE_BASEDIR"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stderr.is_empty());
        let plain = Command::new("gcc")
            .args([&inc, "-O2", "-c", "src.c", "-o", "plain.o"])
            .current_dir(proj)
            .status()
            .unwrap();
        assert!(plain.success());
        assert_eq!(
            std::fs::read(proj.join("src.o")).unwrap(),
            std::fs::read(proj.join("plain.o")).unwrap(),
            "the object is the one gcc makes there"
        );
    };
    let env = [("DCACHE_DIR", cache.path().to_str().unwrap())];
    // Without a base directory, each checkout is a miss of its own.
    build(&checkouts[0], None);
    build(&checkouts[1], None);
    assert_eq!(stat(&stats_json(&env), "hits"), 0);
    // With one, the paths inside it no longer tell checkouts apart.
    build(&checkouts[0], Some(base.path()));
    build(&checkouts[2], Some(base.path()));
    let s = stats_json(&env);
    assert_eq!((stat(&s, "misses"), stat(&s, "hits")), (3, 1), "{s}");
}

#[test]
fn zero_stats_with_servers_counts_from_now_for_this_user_only() {
    let s = server();
    let mine = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("z.c"), "int z(void) { return 7; }\n").unwrap();
    let compile = || {
        let out = Command::new(DCACHE)
            .args(["gcc", "-c", "z.c", "-o", "z.o"])
            .env("DCACHE_HOSTS", &s.addr)
            // Straight to the server: the relay daemon has its own tests (daemon.rs).
            .env("DCACHE_DAEMON", "0")
            .env("DCACHE_DIR", dir.path().join(".dcache"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    let me = [
        ("DCACHE_HOSTS", s.addr.as_str()),
        ("DCACHE_DIR", mine.path().to_str().unwrap()),
    ];
    let them = [
        ("DCACHE_HOSTS", s.addr.as_str()),
        ("DCACHE_DIR", theirs.path().to_str().unwrap()),
    ];
    compile();
    assert_eq!(stat(&stats_json(&me), "compiles"), 1);
    let zero = Command::new(DCACHE)
        .arg("--zero-stats")
        .envs(me)
        .status()
        .unwrap();
    assert!(zero.success());
    let after = stats_json(&me);
    assert_eq!(
        (stat(&after, "compiles"), stat(&after, "hits")),
        (0, 0),
        "{after}"
    );
    compile();
    let after = stats_json(&me);
    assert_eq!(
        (stat(&after, "compiles"), stat(&after, "hits")),
        (0, 1),
        "{after}"
    );
    // Another user's view, and the server's own counters, are untouched.
    let other = stats_json(&them);
    assert_eq!(
        (stat(&other, "compiles"), stat(&other, "hits")),
        (1, 1),
        "{other}"
    );
}

#[test]
fn direct_mode_skips_the_preprocessor_only_while_every_file_is_unchanged() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir(p.join("inc")).unwrap();
    std::fs::write(p.join("inc/v.h"), "#define V 1\n").unwrap();
    std::fs::write(
        p.join("d.c"),
        "#include \"v.h\"\nint v(void) { return V; }\n",
    )
    .unwrap();
    std::fs::write(p.join("t.c"), "const char *t(void) { return __TIME__; }\n").unwrap();
    // Files changed just before a compile are not trusted to be what it read.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let run = |src: &str, extra: &[(&str, &str)]| {
        let obj = src.replace(".c", ".o");
        let mut cmd = Command::new(DCACHE);
        cmd.args(["gcc", "-Iinc", "-MD", "-c", src, "-o", &obj])
            .current_dir(p)
            .env_remove("DCACHE_HOSTS")
            .env("DCACHE_DIR", cache.path())
            .env("DCACHE_LOG", "debug");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).contains("direct hit")
    };
    let plain = |src: &str| {
        let out = Command::new("gcc")
            .args(["-Iinc", "-MD", "-c", src, "-o", "plain.o", "-MF", "plain.d"])
            .args(["-MQ", &src.replace(".c", ".o")])
            .current_dir(p)
            .status()
            .unwrap();
        assert!(out.success());
        (
            std::fs::read(p.join("plain.o")).unwrap(),
            std::fs::read(p.join("plain.d")).unwrap(),
        )
    };
    let ours = || {
        (
            std::fs::read(p.join("d.o")).unwrap(),
            std::fs::read(p.join("d.d")).unwrap(),
        )
    };
    assert!(!run("d.c", &[]), "cold: nothing recorded yet");
    std::fs::remove_file(p.join("d.d")).unwrap();
    assert!(run("d.c", &[]), "warm: the manifest names the key");
    assert_eq!(
        ours(),
        plain("d.c"),
        "object and dependency file as gcc makes them"
    );
    assert!(
        !run("d.c", &[("DCACHE_DIRECT", "0")]),
        "DCACHE_DIRECT=0 turns it off"
    );
    // A header changes: the manifest no longer matches, the new object is compiled.
    std::fs::write(p.join("inc/v.h"), "#define V 2\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(!run("d.c", &[]));
    assert_eq!(ours(), plain("d.c"), "the changed header was seen");
    assert!(run("d.c", &[]), "and recorded");
    // Back to the first contents: that entry is still in the manifest.
    std::fs::write(p.join("inc/v.h"), "#define V 1\n").unwrap();
    assert!(run("d.c", &[]));
    assert_eq!(ours(), plain("d.c"));
    // The manifest is the client's own file under DCACHE_DIR, one per direct key; a
    // damaged one is a miss (and is recorded again), never a wrong object.
    let manifests: Vec<_> = std::fs::read_dir(cache.path().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let good = std::fs::read(&manifests[0]).unwrap();
    std::fs::write(&manifests[0], &good[..good.len() / 2]).unwrap();
    // (v.h was just rewritten: let it age past the one second a recording distrusts.)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(!run("d.c", &[]), "a truncated manifest is a miss");
    assert_eq!(ours(), plain("d.c"));
    assert!(run("d.c", &[]), "recorded again");
    // A source using the clock never takes the direct path.
    assert!(!run("t.c", &[]));
    assert!(!run("t.c", &[]));
}

#[test]
fn the_embedded_server_runs_the_compiler_as_invoked_not_another_of_that_name() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    // A `gcc` of its own, outside PATH, that logs each run.
    let script = bin.path().join("gcc");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec /usr/bin/gcc \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.c"), "int k(void) { return 11; }\n").unwrap();
    // Past the freshness rule: a just-saved source takes the preprocessor way, not depend
    // mode's.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Through the embedded server (the preprocessor path, direct mode off), and in
    // depend mode, where the wrapper compiles the source itself.
    for direct in ["0", "1"] {
        let out = Command::new(DCACHE)
            .arg(&script)
            .args(["-c", "k.c", "-o", "k.o"])
            .current_dir(dir.path())
            .env_remove("DCACHE_HOSTS")
            .env("DCACHE_DIR", cache.path())
            .env("DCACHE_DIRECT", direct)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runs = std::fs::read_to_string(&log).unwrap();
    assert!(
        runs.lines().any(|l| l.contains("cpp-output")),
        "the compile itself ran the invoked gcc: {runs}"
    );
    assert!(
        runs.lines().any(|l| l.starts_with("-c k.c -o k.o")),
        "depend mode ran the invoked gcc on the source: {runs}"
    );
}

/// Runs `dcache COMPILER ARGS` with the embedded server on `cache`, in `dir`, with
/// direct-mode logging; returns whether direct mode answered.
fn direct_run(cache: &Path, dir: &Path, compiler: &Path, args: &[&str]) -> bool {
    let out = Command::new(DCACHE)
        .arg(compiler)
        .args(args)
        .current_dir(dir)
        .env_remove("DCACHE_HOSTS")
        .env("DCACHE_DIR", cache)
        .env("DCACHE_LOG", "debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).contains("direct hit")
}

#[test]
fn direct_mode_stays_off_where_file_hashes_cannot_tell() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("v.h"), "#define V 1\n").unwrap();
    std::fs::write(
        p.join("a.c"),
        "#include \"v.h\"\nint a(void) { return V; }\n",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let gcc = Path::new("gcc");
    let twice = |args: &[&str]| {
        direct_run(cache.path(), p, gcc, args) || direct_run(cache.path(), p, gcc, args)
    };
    // -P: no line markers, so no list of the files read.
    assert!(!twice(&["-P", "-c", "a.c", "-o", "a.o"]));
    // A clock macro on the command line.
    assert!(!twice(&["-DBUILD=__TIME__", "-c", "a.c", "-o", "a.o"]));
    // (__has_include is recorded with its lookups: tests/direct_mode.rs.)
    // The control: the plain compile does take the direct path the second time.
    assert!(!direct_run(
        cache.path(),
        p,
        gcc,
        &["-c", "a.c", "-o", "a.o"]
    ));
    assert!(direct_run(
        cache.path(),
        p,
        gcc,
        &["-c", "a.c", "-o", "a.o"]
    ));
}

#[test]
fn a_symlink_switched_during_a_compile_is_not_recorded() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for v in ["1", "2"] {
        std::fs::create_dir(p.join(format!("inc_v{v}"))).unwrap();
        std::fs::write(p.join(format!("inc_v{v}/v.h")), format!("#define V {v}\n")).unwrap();
    }
    std::os::unix::fs::symlink("inc_v1", p.join("inc")).unwrap();
    std::fs::write(
        p.join("r.c"),
        "#include \"inc/v.h\"\nint r(void) { return V; }\n",
    )
    .unwrap();
    // A gcc that, like a concurrent process, switches the link right after reading the
    // source: after preprocessing, or in depend mode after the compile.
    let bin = tempfile::tempdir().unwrap();
    let gcc = bin.path().join("gcc");
    std::fs::write(
        &gcc,
        format!(
            "#!/bin/sh\n/usr/bin/gcc \"$@\"; rc=$?\ncase \" $* \" in *\" -v \"*) ;; \
             *\" -E \"*|*\" -c \"*) [ -e '{swap}' ] && rm '{swap}' && ln -sfn inc_v2 '{link}';; \
             esac\nexit $rc\n",
            swap = p.join("swap").display(),
            link = p.join("inc").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&gcc, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(p.join("swap"), "").unwrap();
    let args = ["-c", "r.c", "-o", "r.o"];
    assert!(!direct_run(cache.path(), p, &gcc, &args));
    assert_eq!(
        std::fs::read_link(p.join("inc")).unwrap(),
        Path::new("inc_v2")
    );
    // Now inc -> inc_v2 (old files, fresh link): the first compile's entry must not have
    // been recorded, or this would be served the V=1 object.
    assert!(!direct_run(cache.path(), p, &gcc, &args));
    let plain = Command::new("gcc")
        .args(["-c", "r.c", "-o", "plain.o"])
        .current_dir(p)
        .status()
        .unwrap();
    assert!(plain.success());
    assert_eq!(
        std::fs::read(p.join("r.o")).unwrap(),
        std::fs::read(p.join("plain.o")).unwrap()
    );
}

#[test]
fn output_to_dev_null_works_and_leaves_the_device_alone() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("n.c"), "int n;\n").unwrap();
    for _ in 0..2 {
        direct_run(
            cache.path(),
            dir.path(),
            Path::new("gcc"),
            &["-MD", "-MF", "/dev/null", "-c", "n.c", "-o", "/dev/null"],
        );
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

#[test]
fn a_dead_server_falls_back_to_a_local_compile_unless_told_not_to() {
    let dead = common::dead_address();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.c"), "int ok(void) { return 1; }\n").unwrap();
    let out = Command::new(DCACHE)
        .args(["gcc", "-c", "ok.c", "-o", "ok.o"])
        .env("DCACHE_HOSTS", &dead)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.path().join(".dcache"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("ok.o").exists());
    let warning = String::from_utf8_lossy(&out.stderr);
    assert_eq!(warning.lines().count(), 1, "one warning line: {warning}");
    assert!(warning.contains("compiling locally"), "{warning}");

    std::fs::remove_file(dir.path().join("ok.o")).unwrap();
    let out = Command::new(DCACHE)
        .args(["gcc", "-c", "ok.c", "-o", "ok.o"])
        .env("DCACHE_HOSTS", &dead)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.path().join(".dcache"))
        .env("DCACHE_FALLBACK", "0")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.path().join("ok.o").exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DCACHE_FALLBACK=0"));
}

#[test]
fn two_hosts_split_keys_and_a_stopped_hosts_keys_move() {
    let a = server();
    let b = server();
    let hosts = format!("{} {}", a.addr, b.addr);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<String> = (0..16).map(|i| format!("f{i}.c")).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(
            dir.path().join(f),
            format!("int f{i}(int x) {{ return x + {i}; }}\n"),
        )
        .unwrap();
    }
    let compile_all = |hosts: &str| {
        for f in &files {
            let st = Command::new(DCACHE)
                .args(["gcc", "-c", f])
                .env("DCACHE_HOSTS", hosts)
                // Straight to the server: the relay daemon has its own tests (daemon.rs).
                .env("DCACHE_DAEMON", "0")
                .env("DCACHE_DIR", dir.path().join(".dcache"))
                .env("DCACHE_FALLBACK", "0")
                .current_dir(dir.path())
                .status()
                .unwrap();
            assert!(st.success());
        }
    };
    compile_all(&hosts);
    let on = |s: &Server| {
        stat(
            &stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]),
            "compiles",
        )
    };
    let (ca, cb) = (on(&a), on(&b));
    assert_eq!(ca + cb, 16);
    assert!(ca > 0 && cb > 0, "keys not split: {ca} / {cb}");
    // Same sources again: every job meets its own server's cache.
    compile_all(&hosts);
    assert_eq!((on(&a), on(&b)), (ca, cb), "a key moved between hosts");
    drop(a);
    // With A gone, its keys fall through to B (compiled there once), B's stay hits.
    compile_all(&hosts);
    assert_eq!(on(&b), cb + ca);
}

/// Debian 12's `dpkg-buildflags` CFLAGS + CPPFLAGS, and the assembler flag of zstd's
/// CMake build and Fedora's macro passes: what real package builds pass. Without `-g` (the
/// one documented difference: DWARF column numbers where macros expand, inherent to
/// compiling preprocessed text).
const DISTRO_FLAGS: &[&str] = &[
    "-O2",
    "-ffile-prefix-map=/build/pkg=.",
    "-fstack-protector-strong",
    "-fstack-clash-protection",
    "-Wformat",
    "-Werror=format-security",
    "-fcf-protection",
    "-Wdate-time",
    "-D_FORTIFY_SOURCE=2",
    "-Wa,--noexecstack",
    "--param=ssp-buffer-size=4",
    "-Wp,-D_GLIBCXX_ASSERTIONS",
];

/// Runs `program args… flags… -c SRC -o OUT` in `dir`; its stderr.
fn compile_with(
    dir: &Path,
    program: &str,
    args: &[&str],
    src: &str,
    out: &str,
    envs: &[(&str, &str)],
) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .args(["-c", src, "-o", out])
        .current_dir(dir)
        .env_remove("DCACHE_HOSTS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn distro_flags_are_cached_remotely_with_the_object_gcc_makes() {
    let s = server();
    let dir = project();
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("DCACHE_HOSTS", s.addr.as_str()),
        ("DCACHE_DIR", cache.path().to_str().unwrap()),
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        ("DCACHE_DAEMON", "0"),
    ];
    let same = |a: &str, b: &str| {
        std::fs::read(dir.path().join(a)).unwrap() == std::fs::read(dir.path().join(b)).unwrap()
    };
    let mut compiles = 0;
    for src in ["table.c", "words.c"] {
        // Distribution flags: the very object a direct gcc compile makes.
        compile_with(dir.path(), "gcc", DISTRO_FLAGS, src, "plain.o", &[]);
        let mut args = vec!["gcc"];
        args.extend(DISTRO_FLAGS);
        for round in ["cold", "warm"] {
            let warn = compile_with(dir.path(), DCACHE, &args, src, "via.o", &env);
            assert_eq!(warn, "", "{src} {round}: ran remotely without a word");
            assert!(
                same("plain.o", "via.o"),
                "{src} {round}: object differs from gcc's"
            );
        }
        compiles += 1;
    }
    let stats = stats_json(&env);
    assert_eq!(stat(&stats, "compiles"), compiles, "{stats}");
    assert_eq!(
        stat(&stats, "hits"),
        compiles,
        "every warm compile was a hit: {stats}"
    );
}
