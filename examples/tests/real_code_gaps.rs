//! What real projects' builds showed the cache missing (docs/BENCHMARKS.md, real
//! projects): a result with warnings from a server was compiled again locally on every
//! warm build (bzip2's fortify warning), and `.S` assembler sources ran locally (zstd's
//! `huf_decompress_amd64.S`). End to end with real gcc, the `dcache` binary and a real
//! `dcache-server` process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{DCACHE, Server, server};

/// A project directory and its own cache directory.
struct Project {
    dir: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl Project {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let p = Self {
            dir: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        };
        for (name, text) in files {
            p.write(name, text);
        }
        age();
        p
    }

    fn write(&self, name: &str, text: &[u8]) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }

    /// `dcache gcc ARGS` through `server` (or the embedded cache), with `log` as
    /// DCACHE_LOG (none: the default level, so stderr is only what gcc would print).
    fn dcache(&self, server: Option<&Server>, log: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(DCACHE);
        cmd.arg("gcc")
            .args(args)
            .current_dir(self.dir.path())
            .env("DCACHE_DIR", self.cache.path())
            .env_remove("DCACHE_BASEDIR")
            .env_remove("DCACHE_LOG")
            .env_remove("COLUMNS");
        match server {
            Some(s) => cmd.env("DCACHE_HOSTS", &s.addr),
            None => cmd.env_remove("DCACHE_HOSTS"),
        };
        if let Some(l) = log {
            cmd.env("DCACHE_LOG", l);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Plain `gcc ARGS` with `-o plain.o` in place of the given output: its stderr and
    /// object.
    fn gcc(&self, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let mut args: Vec<&str> = args.to_vec();
        let o = args.iter().position(|a| *a == "-o").unwrap();
        args[o + 1] = "plain.o";
        let out = Command::new("gcc")
            .args(&args)
            .current_dir(self.dir.path())
            .env_remove("COLUMNS")
            .output()
            .unwrap();
        assert!(out.status.success());
        (out.stderr, self.read("plain.o"))
    }
}

fn age() {
    std::thread::sleep(Duration::from_millis(1100));
}

fn text(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

const WARNS: &[u8] = b"#include \"w.h\"\nint f(int a)\n{\n  int unused;\n  return a + W;\n}\n";
const WARN_ARGS: &[&str] = &["-Wall", "-O2", "-c", "w.c", "-o", "w.o"];

#[test]
fn a_servers_result_with_warnings_is_a_direct_hit_that_replays_gccs_exact_stderr() {
    let s = server();
    let p = Project::new(&[("w.c", WARNS), ("w.h", b"#define W 1\n")]);
    let (gcc_err, gcc_obj) = p.gcc(WARN_ARGS);
    assert!(
        text(&gcc_err).contains("unused variable") && text(&gcc_err).contains("int unused;"),
        "gcc warns and quotes the line: {}",
        text(&gcc_err)
    );

    // Cold: the server's diagnostics quote no source line, so it is compiled here for
    // gcc's exact text, which is recorded.
    let cold = p.dcache(Some(&s), None, WARN_ARGS);
    assert_eq!(text(&cold.stderr), text(&gcc_err), "cold");
    assert_eq!(p.read("w.o"), gcc_obj);

    // Warm: a direct hit, with no local compile, printing gcc's very bytes.
    let warm = p.dcache(Some(&s), Some("dcache_client=debug"), WARN_ARGS);
    let log = text(&warm.stderr);
    assert!(log.contains("direct hit"), "{log}");
    assert!(!log.contains("rerunning locally"), "{log}");
    let warm = p.dcache(Some(&s), None, WARN_ARGS);
    assert_eq!(warm.stderr, gcc_err, "warm: not gcc's stderr byte for byte");
    assert_eq!(p.read("w.o"), gcc_obj);

    // A header change that moves nothing in w.c but changes the result: not the old
    // entry; the new warning text and object are gcc's again, and then a hit.
    p.write(
        "w.h",
        b"#define W 2\nint g(void) { int other; return 0; }\n",
    );
    age();
    let (gcc_err, gcc_obj) = p.gcc(WARN_ARGS);
    assert!(text(&gcc_err).contains("other"), "{}", text(&gcc_err));
    for round in ["changed", "warm again"] {
        let out = p.dcache(Some(&s), None, WARN_ARGS);
        assert_eq!(text(&out.stderr), text(&gcc_err), "{round}");
        assert_eq!(p.read("w.o"), gcc_obj, "{round}");
    }
    let log = p.dcache(Some(&s), Some("dcache_client=debug"), WARN_ARGS);
    assert!(text(&log.stderr).contains("direct hit"));
}

const ASM: &[u8] = b"#include \"asm.h\"\n.text\n.globl f\nf:\n#ifdef __x86_64__\n  nop\n#endif\n  movl $VALUE, %eax\n  ret\n.section .note.GNU-stack,\"\",@progbits\n";
const ASM_ARGS: &[&str] = &["-Wa,--noexecstack", "-DX=1", "-c", "a.S", "-o", "a.o"];

#[test]
fn preprocessed_assembler_sources_are_cached_with_gccs_objects() {
    let s = server();
    for via in [Some(&s), None] {
        let p = Project::new(&[("a.S", ASM), ("asm.h", b"#define VALUE 7\n")]);
        let (_, gcc_obj) = p.gcc(ASM_ARGS);
        let cold = p.dcache(via, Some("dcache_client=debug"), ASM_ARGS);
        let log = text(&cold.stderr);
        assert!(!log.contains("running locally"), "{log}");
        assert!(log.contains("compiled from"), "{log}");
        assert_eq!(p.read("a.o"), gcc_obj, "cold, server: {}", via.is_some());
        let warm = p.dcache(via, Some("dcache_client=debug"), ASM_ARGS);
        assert!(
            text(&warm.stderr).contains("direct hit"),
            "{}",
            text(&warm.stderr)
        );
        assert_eq!(p.read("a.o"), gcc_obj, "warm, server: {}", via.is_some());

        // The included header changes: another object, gcc's.
        p.write("asm.h", b"#define VALUE 9\n");
        age();
        let (_, new_obj) = p.gcc(ASM_ARGS);
        assert_ne!(new_obj, gcc_obj);
        let changed = p.dcache(via, Some("dcache_client=debug"), ASM_ARGS);
        assert!(!text(&changed.stderr).contains("direct hit"));
        assert_eq!(p.read("a.o"), new_obj, "changed, server: {}", via.is_some());
    }
}

#[test]
fn assembler_that_reads_files_itself_or_has_debug_info_runs_locally() {
    let s = server();
    let incbin: &[u8] = b".section .rodata\n.globl blob\nblob:\n.INCBIN \"data.bin\"\n.section .note.GNU-stack,\"\",@progbits\n";
    let p = Project::new(&[
        ("b.S", incbin),
        ("data.bin", b"first"),
        ("a.S", ASM),
        ("asm.h", b"#define VALUE 7\n"),
    ]);
    let args = ["-c", "b.S", "-o", "b.o"];
    for via in [Some(&s), None] {
        for content in [&b"first"[..], b"second"] {
            p.write("data.bin", content);
            age();
            let out = p.dcache(via, Some("dcache_client=debug"), &args);
            let log = text(&out.stderr);
            assert!(log.contains("reads files itself"), "{log}");
            assert!(!log.contains("direct hit"), "{log}");
            assert_eq!(p.read("b.o"), p.gcc(&args).1);
            let o = p.read("b.o");
            assert!(o.windows(content.len()).any(|w| w == content));
        }
    }
    // With -g the assembler names its own directory: local, gcc's object.
    let args = ["-g", "-c", "a.S", "-o", "a.o"];
    let out = p.dcache(Some(&s), Some("dcache_client=debug"), &args);
    assert!(
        text(&out.stderr).contains("running locally"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(p.read("a.o"), p.gcc(&args).1);
}

#[test]
fn an_mmd_compile_whose_headers_compute_a_name_is_recorded_and_then_a_direct_hit() {
    // zstd's build: -MMD, and glibc's <limits.h> computes a header name, so the user's
    // list cannot be completed by following names; the compiler's own full list is used.
    let p = Project::new(&[
        ("m.c", b"#include \"m.h\"\nint m(void) { return LIMIT; }\n"),
        (
            "m.h",
            b"#define SYS <limits.h>\n#include SYS\n#define LIMIT INT_MAX\n",
        ),
    ]);
    let args = ["-g", "-O2", "-MMD", "-MP", "-c", "m.c", "-o", "m.o"];
    let (_, gcc_obj) = p.gcc(&args);
    let _ = std::fs::remove_file(p.dir.path().join("m.d"));
    let ok = Command::new("gcc")
        .args(args)
        .current_dir(p.dir.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let gcc_d = p.read("m.d");
    for round in ["cold", "warm"] {
        let _ = std::fs::remove_file(p.dir.path().join("m.d"));
        let out = p.dcache(None, Some("dcache_client=debug"), &args);
        let log = text(&out.stderr);
        match round {
            "cold" => assert!(log.contains("depend mode compiled and recorded"), "{log}"),
            _ => assert!(log.contains("direct hit"), "{log}"),
        }
        assert_eq!(p.read("m.o"), gcc_obj, "{round}");
        assert_eq!(text(&p.read("m.d")), text(&gcc_d), "{round}");
    }
    // The header changes: not the old object.
    p.write(
        "m.h",
        b"#define SYS <limits.h>\n#include SYS\n#define LIMIT INT_MIN\n",
    );
    age();
    let (_, new_obj) = p.gcc(&args);
    let out = p.dcache(None, Some("dcache_client=debug"), &args);
    assert!(!text(&out.stderr).contains("direct hit"));
    assert_eq!(p.read("m.o"), new_obj);
}
