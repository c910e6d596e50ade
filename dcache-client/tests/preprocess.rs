//! The wrapper's local preprocessor run against plain gcc: dependency files must match,
//! and compiling the preprocessed output must give the same object.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use dcache_client::wrapper::args::{Plan, plan};
use dcache_client::wrapper::local::preprocess;

fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("inc")).unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    std::fs::write(
        dir.join("inc/util.h"),
        "#define TWICE(x) ((x) * 2)\nint util(int);\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.c"),
        "#include \"util.h\"\n#include <stdio.h>\nint util(int x) { return TWICE(x); }\n",
    )
    .unwrap();
}

fn args(s: &str) -> Vec<OsString> {
    s.split_whitespace().map(OsString::from).collect()
}

fn in_dir(dir: &Path, f: impl FnOnce()) {
    // Tests in this file run one at a time (see the lock) because they change directory.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let old = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir).unwrap();
    f();
    std::env::set_current_dir(old).unwrap();
}

#[test]
fn dependency_files_equal_what_gcc_writes() {
    for flags in [
        "-c main.c -o out/main.o -Iinc -MD",
        "-c main.c -o out/main.o -Iinc -MMD -MP",
        "-c main.c -Iinc -MD -MF out/deps.d -MT custom",
        "-c main.c -Iinc -MMD",
    ] {
        let plain = tempfile::tempdir().unwrap();
        let ours = tempfile::tempdir().unwrap();
        project(plain.path());
        project(ours.path());
        let status = Command::new("gcc")
            .args(args(flags))
            .current_dir(plain.path())
            .status()
            .unwrap();
        assert!(status.success());
        in_dir(ours.path(), || {
            let Plan::Remote(p) = plan(&"gcc".into(), &args(flags)) else {
                panic!("{flags} not distributed");
            };
            preprocess(&p).unwrap();
        });
        let dep_of = |dir: &Path| {
            let mut found = Vec::new();
            for sub in [".", "out"] {
                for e in std::fs::read_dir(dir.join(sub)).unwrap() {
                    let e = e.unwrap();
                    if e.path().extension().is_some_and(|x| x == "d") {
                        found.push((
                            e.path().strip_prefix(dir).unwrap().to_owned(),
                            std::fs::read(e.path()).unwrap(),
                        ));
                    }
                }
            }
            found.sort();
            found
        };
        let want = dep_of(plain.path());
        assert!(!want.is_empty(), "{flags}: gcc wrote no .d");
        assert_eq!(dep_of(ours.path()), want, "{flags}");
    }
}

#[test]
fn compiling_the_preprocessed_source_gives_the_same_object() {
    for flags in [
        "-c main.c -o main.o -Iinc -O2",
        "-c main.c -o main.o -Iinc -O0 -Wall",
        "-c main.c -o main.o -Iinc -g -O1",
    ] {
        let debug = flags.contains("-g");
        let dir = tempfile::tempdir().unwrap();
        project(dir.path());
        assert!(
            Command::new("gcc")
                .args(args(flags))
                .current_dir(dir.path())
                .status()
                .unwrap()
                .success()
        );
        let direct = std::fs::read(dir.path().join("main.o")).unwrap();
        let mut pre = None;
        in_dir(dir.path(), || {
            let Plan::Remote(p) = plan(&"gcc".into(), &args(flags)) else {
                panic!("not distributed");
            };
            pre = Some((preprocess(&p).unwrap(), p.compile_args.clone()));
        });
        let (pre, compile_args) = pre.unwrap();
        // What the server does: compile the preprocessed bytes from stdin, elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        let mut child = Command::new("gcc")
            .args(&compile_args)
            .args(["-x", "cpp-output", "-", "-o", "remote.o"])
            .current_dir(elsewhere.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&pre.source).unwrap();
        assert!(child.wait().unwrap().success());
        let remote = std::fs::read(elsewhere.path().join("remote.o")).unwrap();
        if !debug {
            assert!(
                remote == direct,
                "{flags}: object differs from a local compile"
            );
            continue;
        }
        // With -g the line table's column numbers differ where macros were expanded before
        // the compile (the trade-off every preprocess-then-ship compiler makes), but the
        // debug info must name the client's directory and source, not the server's.
        let info = |obj: &Path| {
            let out = Command::new("readelf")
                .args(["--debug-dump=info"])
                .arg(obj)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let field = |name: &str| {
                text.lines()
                    .find(|l| l.contains(name))
                    .and_then(|l| l.rsplit(": ").next())
                    .map(str::to_owned)
            };
            (field("DW_AT_name"), field("DW_AT_comp_dir"))
        };
        let (name, comp_dir) = info(&elsewhere.path().join("remote.o"));
        assert_eq!(name.as_deref(), Some("main.c"));
        let client_dir = dir.path().canonicalize().unwrap();
        assert_eq!(comp_dir.map(std::path::PathBuf::from), Some(client_dir));
        assert_eq!(
            info(&dir.path().join("main.o")).0.as_deref(),
            Some("main.c")
        );
    }
}
