//! Direct mode on real headers (`__has_include`, shadowing, removal, base directories)
//! and depend mode, end to end with real gcc and g++, the `dcache` binary and, for the
//! preprocessor path, a real `dcache-server` process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{DCACHE, Server, server, stat, stats_json};

/// How a compile reaches its result: depend mode (the embedded cache, the original
/// source compiled here) or the preprocessor path (a server).
#[derive(Clone, Copy)]
enum Via<'a> {
    Depend,
    Server(&'a Server),
}

impl std::fmt::Debug for Via<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Depend => f.write_str("depend mode"),
            Self::Server(s) => write!(f, "server {}", s.addr),
        }
    }
}

/// A project directory and its own cache directory.
struct Project {
    dir: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Project {
    fn new(files: &[(&str, &str)]) -> Self {
        let p = Self {
            dir: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        };
        for (name, text) in files {
            p.write(name, text);
        }
        // A file changed just before a compile is not trusted to be what it read.
        age();
        p
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// `dcache COMPILER ARGS`; whether direct mode answered.
    fn dcache(&self, via: Via<'_>, compiler: &str, args: &[&str]) -> bool {
        let mut cmd = Command::new(DCACHE);
        cmd.arg(compiler)
            .args(args)
            .current_dir(self.path())
            .env("DCACHE_DIR", self.cache.path())
            .env("DCACHE_LOG", "debug")
            .env_remove("DCACHE_BASEDIR");
        match via {
            Via::Depend => cmd.env_remove("DCACHE_HOSTS"),
            Via::Server(s) => cmd.env("DCACHE_HOSTS", &s.addr),
        };
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        match via {
            Via::Depend => assert!(
                err.contains("direct hit") || err.contains("depend mode compiled"),
                "neither a direct hit nor a depend-mode compile: {err}"
            ),
            Via::Server(_) => assert!(!err.contains("depend mode"), "{err}"),
        }
        err.contains("direct hit")
    }

    /// The same compile with plain `compiler`, writing `plain.o`; its bytes.
    fn plain(&self, compiler: &str, args: &[&str]) -> Vec<u8> {
        let mut args: Vec<&str> = args.to_vec();
        let o = args.iter().position(|a| *a == "-o").unwrap();
        args[o + 1] = "plain.o";
        let ok = Command::new(compiler)
            .args(&args)
            .current_dir(self.path())
            .status()
            .unwrap();
        assert!(ok.success());
        self.read("plain.o")
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path().join(name)).unwrap()
    }

    /// Compiles through dcache, checks the object is plain gcc's, returns whether it was
    /// a direct hit.
    fn compile_checked(&self, via: Via<'_>, compiler: &str, args: &[&str]) -> bool {
        let hit = self.dcache(via, compiler, args);
        let o = args.iter().position(|a| *a == "-o").unwrap();
        assert!(
            self.read(args[o + 1]) == self.plain(compiler, args),
            "{args:?} via {via:?} (direct hit: {hit}): not the object {compiler} makes"
        );
        hit
    }

    /// After a header changed and a compile saw it: waits past the freshness rule, then
    /// compiles until the new state is recorded. The compile right after the change was
    /// recorded only if it started a margin after the write (the wrapper's own rule,
    /// pinned down in its unit tests), which depends on how busy this machine is; so the
    /// first compile here may or may not be a direct hit, and the second must be.
    fn settle(&self, via: Via<'_>, compiler: &str, args: &[&str]) {
        age();
        self.compile_checked(via, compiler, args);
        assert!(
            self.compile_checked(via, compiler, args),
            "{args:?}: recorded once past the freshness rule"
        );
    }
}

fn age() {
    std::thread::sleep(Duration::from_millis(1100));
}

const HAS: &str =
    "#if __has_include(<cfg.h>)\n#include <cfg.h>\n#else\n#define V 0\n#endif\nint v = V;\n";

fn has_include_flips(via: Via<'_>, compiler: &str, src: &str) {
    let p = Project::new(&[(src, HAS)]);
    std::fs::create_dir(p.path().join("inc")).unwrap();
    age();
    let args = ["-Iinc", "-O2", "-c", src, "-o", "h.o"];
    assert!(!p.compile_checked(via, compiler, &args), "cold");
    assert!(
        p.compile_checked(via, compiler, &args),
        "warm: a direct hit"
    );
    // The header __has_include asked about appears: the recorded answer is stale.
    p.write("inc/cfg.h", "#define V 7\n");
    assert!(!p.compile_checked(via, compiler, &args), "cfg.h appeared");
    p.settle(via, compiler, &args);
    // And gone again: the first entry (no cfg.h) is current once more.
    std::fs::remove_file(p.path().join("inc/cfg.h")).unwrap();
    assert!(
        p.compile_checked(via, compiler, &args),
        "the no-cfg.h entry"
    );
}

#[test]
fn has_include_flipping_from_false_to_true_is_seen_in_c_and_cxx() {
    has_include_flips(Via::Depend, "gcc", "h.c");
    has_include_flips(Via::Depend, "g++", "h.cpp");
    let s = server();
    has_include_flips(Via::Server(&s), "gcc", "h.c");
    has_include_flips(Via::Server(&s), "g++", "h.cpp");
}

fn shadowing_and_removal(via: Via<'_>) {
    // <sub/v.h> is found in second/sub; first/ exists, first/sub does not yet.
    let p = Project::new(&[
        (
            "s.c",
            "#include <sub/v.h>\n#include \"q.h\"\nint v = V + Q;\n",
        ),
        ("second/sub/v.h", "#define V 2\n"),
        ("second/q.h", "#define Q 20\n"),
        ("first/README", "not a header\n"),
    ]);
    // zero/ does not exist at all: gcc drops it from the path, but it would be searched
    // first once created.
    let args = ["-Izero", "-Ifirst", "-Isecond", "-c", "s.c", "-o", "s.o"];
    assert!(!p.compile_checked(via, "gcc", &args));
    assert!(p.compile_checked(via, "gcc", &args));
    // A header earlier on the path, in a subdirectory that did not exist.
    p.write("first/sub/v.h", "#define V 1\n");
    assert!(
        !p.compile_checked(via, "gcc", &args),
        "shadowed by first/sub/v.h"
    );
    p.settle(via, "gcc", &args);
    // A quoted include shadowed from the source's own directory.
    p.write("q.h", "#define Q 10\n");
    assert!(!p.compile_checked(via, "gcc", &args), "shadowed by ./q.h");
    p.settle(via, "gcc", &args);
    // A header removed: the one further on is found again (a state not seen before).
    std::fs::remove_file(p.path().join("first/sub/v.h")).unwrap();
    assert!(
        !p.compile_checked(via, "gcc", &args),
        "first/sub/v.h removed"
    );
    assert!(p.compile_checked(via, "gcc", &args), "and recorded");
    // Renamed away: back to the very first state, whose entry answers.
    std::fs::rename(p.path().join("q.h"), p.path().join("q.h.old")).unwrap();
    assert!(
        p.compile_checked(via, "gcc", &args),
        "q.h renamed: the first entry"
    );
    std::fs::rename(p.path().join("q.h.old"), p.path().join("q.h")).unwrap();
    assert!(
        p.compile_checked(via, "gcc", &args),
        "and back: the last entry"
    );
    // Two directories that did not exist, created with a header in the innermost.
    p.write("zero/sub/v.h", "#define V 0\n");
    assert!(
        !p.compile_checked(via, "gcc", &args),
        "shadowed by zero/sub/v.h"
    );
}

#[test]
fn a_shadowing_header_added_earlier_on_the_path_or_one_removed_is_seen() {
    shadowing_and_removal(Via::Depend);
    let s = server();
    shadowing_and_removal(Via::Server(&s));
}

#[test]
fn two_checkouts_under_dcache_basedir_differing_in_one_header_never_share_an_object() {
    let base = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for (name, value) in [("a", 1), ("b", 2), ("c", 1)] {
        let proj = base.path().join(name);
        std::fs::create_dir_all(proj.join("inc")).unwrap();
        std::fs::write(proj.join("inc/v.h"), format!("#define V {value}\n")).unwrap();
        std::fs::write(
            proj.join("m.c"),
            "#include <stdio.h>\n#include \"v.h\"\nint main(void) { printf(\"%d\\n\", V); return 0; }\n",
        )
        .unwrap();
    }
    age();
    let env = [("DCACHE_DIR", cache.path().to_str().unwrap())];
    // Each checkout builds and runs its program twice (the second time from its
    // manifest); a checkout handed another's object would print the other's value.
    let run = |name: &str| -> String {
        let proj = base.path().join(name);
        let inc = format!("-I{}", proj.join("inc").display());
        let out = Command::new(DCACHE)
            .args(["gcc", &inc, "-c", "m.c", "-o", "m.o"])
            .current_dir(&proj)
            .env_remove("DCACHE_HOSTS")
            .env("DCACHE_DIR", cache.path())
            .env("DCACHE_BASEDIR", base.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let link = Command::new("gcc")
            .args(["m.o", "-o", "m"])
            .current_dir(&proj)
            .status()
            .unwrap();
        assert!(link.success());
        let printed = Command::new(proj.join("m")).output().unwrap();
        String::from_utf8(printed.stdout).unwrap()
    };
    for round in 0..2 {
        assert_eq!(run("a"), "1\n", "round {round}");
        assert_eq!(run("b"), "2\n", "round {round}");
        assert_eq!(run("c"), "1\n", "round {round}");
    }
    // a and c, identical, did share: one compile for both.
    let s = stats_json(&env);
    assert_eq!(stat(&s, "compiles"), 2, "{s}");
    // b's header changes to a's: now b shares a's object, and prints a's value.
    std::fs::write(base.path().join("b/inc/v.h"), "#define V 1\n").unwrap();
    assert_eq!(run("b"), "1\n");
    std::fs::write(base.path().join("b/inc/v.h"), "#define V 3\n").unwrap();
    assert_eq!(run("b"), "3\n");
}

/// Warm rebuilds of C and C++ using real system headers are direct hits, whichever way
/// the dependency file is asked for, with objects (`-g` included) and dependency files
/// byte-identical to gcc's own.
fn real_headers(via: Via<'_>) {
    let p = Project::new(&[
        (
            "u.c",
            "#include <unistd.h>\n#include <stdio.h>\nint main(void) { printf(\"%ld\\n\", (long)getpid()); return 0; }\n",
        ),
        (
            "x.cpp",
            "#include <string>\n#include <vector>\n#include <iostream>\nint main() { std::vector<std::string> v{\"a\"}; std::cout << v[0] << '\\n'; }\n",
        ),
    ]);
    for (compiler, src, obj) in [("gcc", "u.c", "u.o"), ("g++", "x.cpp", "x.o")] {
        for deps in [&[][..], &["-MD"][..], &["-MMD", "-MP"][..]] {
            let mut args = vec!["-g", "-O2"];
            args.extend(deps);
            args.extend(["-c", src, "-o", obj]);
            let d = obj.replace(".o", ".d");
            let mut plain_d = None;
            for round in ["cold", "warm"] {
                let _ = std::fs::remove_file(p.path().join(&d));
                let hit = p.compile_checked(via, compiler, &args);
                assert_eq!(hit, round == "warm", "{compiler} {deps:?} {round}");
                if !deps.is_empty() {
                    let ours = p.read(&d);
                    // gcc's own file for the same command (plain() wrote plain.d with
                    // the target plain.o; compare against one made for obj).
                    let expect = plain_d.get_or_insert_with(|| {
                        let _ = std::fs::remove_file(p.path().join(&d));
                        let ok = Command::new(compiler)
                            .args(&args)
                            .current_dir(p.path())
                            .status()
                            .unwrap();
                        assert!(ok.success());
                        p.read(&d)
                    });
                    assert_eq!(
                        String::from_utf8_lossy(&ours),
                        String::from_utf8_lossy(expect),
                        "{compiler} {deps:?} {round}: not gcc's dependency file"
                    );
                }
            }
        }
    }
}

#[test]
fn warm_rebuilds_of_real_c_and_cxx_headers_are_direct_hits_with_gccs_objects() {
    real_headers(Via::Depend);
}

#[test]
fn warm_rebuilds_of_real_headers_through_a_server_are_direct_hits() {
    let s = server();
    let p = Project::new(&[
        (
            "u.c",
            "#include <unistd.h>\n#include <stdio.h>\nint u(void) { return getpid() + EOF; }\n",
        ),
        (
            "x.cpp",
            "#include <string>\n#include <vector>\n#include <iostream>\nint x() { std::vector<std::string> v{\"a\"}; std::cout << v[0]; return 0; }\n",
        ),
    ]);
    for (compiler, src) in [("gcc", "u.c"), ("g++", "x.cpp")] {
        let args = ["-O2", "-c", src, "-o", "out.o"];
        assert!(!p.compile_checked(Via::Server(&s), compiler, &args));
        assert!(
            p.compile_checked(Via::Server(&s), compiler, &args),
            "{compiler}"
        );
    }
}

#[test]
fn depend_mode_counts_its_compiles_and_a_failed_compile_is_gccs_own() {
    let p = Project::new(&[
        ("ok.c", "int ok(void) { return 1; }\n"),
        ("bad.c", "int bad(void) { return nope; }\n"),
    ]);
    let env = [("DCACHE_DIR", p.cache.path().to_str().unwrap())];
    let args = ["-c", "ok.c", "-o", "ok.o"];
    assert!(!p.compile_checked(Via::Depend, "gcc", &args));
    assert!(p.compile_checked(Via::Depend, "gcc", &args));
    let s = stats_json(&env);
    assert_eq!((stat(&s, "compiles"), stat(&s, "hits")), (1, 1), "{s}");
    let ours = Command::new(DCACHE)
        .args(["gcc", "-c", "bad.c", "-o", "bad.o"])
        .current_dir(p.path())
        .env_remove("DCACHE_HOSTS")
        .env("DCACHE_DIR", p.cache.path())
        .output()
        .unwrap();
    let gcc = Command::new("gcc")
        .args(["-c", "bad.c", "-o", "bad.o"])
        .current_dir(p.path())
        .output()
        .unwrap();
    assert_eq!(ours.status.code(), gcc.status.code());
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&gcc.stderr)
    );
}

/// CMake's configure step rewrites every generated header it leaves unchanged in content
/// (`config.h`), so its status-change time is new when the build starts a moment later.
/// A build starting a few tenths of a second after that is recorded at once, both ways a
/// compile can go: snappy's own CMake build got half its warm compiles direct while the
/// rule was a whole second.
#[test]
fn a_header_regenerated_just_before_the_build_is_recorded_by_its_first_compile() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = server();
    for via in [Via::Depend, Via::Server(&s)] {
        let p = Project::new(&[
            ("build/config.h", "#define HAVE_THING 1\n"),
            ("c.c", "#include \"config.h\"\nint thing = HAVE_THING;\n"),
        ]);
        // What configure_file does to an unchanged output: its mode set again, which
        // changes its status-change time and not its modification time.
        let header = p.path().join("build/config.h");
        std::fs::set_permissions(&header, std::fs::Permissions::from_mode(0o644)).unwrap();
        let m = std::fs::metadata(&header).unwrap();
        let ctime = std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
        assert!(
            m.modified().unwrap() < ctime,
            "the status changed, not the text"
        );
        // Well past the kernel's clock tick, well inside the old one-second rule.
        std::thread::sleep(Duration::from_millis(300));
        let args = ["-Ibuild", "-O2", "-c", "c.c", "-o", "c.o"];
        assert!(!p.compile_checked(via, "gcc", &args), "{via:?}: cold");
        assert!(
            p.compile_checked(via, "gcc", &args),
            "{via:?}: the cold compile recorded an entry"
        );
    }
}

fn rewritten_in_place(via: Via<'_>) {
    let p = Project::new(&[
        ("r.c", "#include \"k.h\"\nint k = K;\n"),
        ("k.h", "#define K 1\n"),
    ]);
    let args = ["-O2", "-c", "r.c", "-o", "r.o"];
    assert!(!p.compile_checked(via, "gcc", &args), "cold");
    assert!(p.compile_checked(via, "gcc", &args), "warm");
    // Same size, same inode, other bytes: only the header's timestamps say it changed,
    // and a hit would be the old object (compile_checked compares with gcc's).
    let path = p.path().join("k.h");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"#define K 2\n").unwrap();
    drop(f);
    assert!(
        !p.compile_checked(via, "gcc", &args),
        "k.h rewritten in place"
    );
    p.settle(via, "gcc", &args);
    // Touched with its contents unchanged: read and hashed again, still the same entry.
    age();
    let now = std::time::SystemTime::now();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(now)
        .unwrap();
    assert!(
        p.compile_checked(via, "gcc", &args),
        "touched: the same bytes, a hit"
    );
}

#[test]
fn a_header_rewritten_in_place_with_the_same_size_is_seen() {
    rewritten_in_place(Via::Depend);
    let s = server();
    rewritten_in_place(Via::Server(&s));
}
