//! The stock distcc client (Debian's `distcc`, which .ci/run installs) against a real
//! `dcache-server --listen-distcc` process over TCP, with real gcc and g++.
//!
//! Every test has its own server, cache, work directory and `DISTCC_DIR` (distcc keeps its
//! back-off state there: a host that failed once is skipped for 60 s). Back-off is never
//! disabled: distcc 3.4 can then loop for ever. Counters are read after the client has
//! exited, and the server counts each distcc job before it writes the reply (or closes the
//! connection, for a refusal), so they are settled by then.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{DCACHE, SERVER, stat, stats_json};

/// A server with a dcache and a distcc listener, killed when dropped.
struct Server {
    child: std::process::Child,
    /// `tcp://127.0.0.1:PORT` of the dcache listener (for stats and the wrapper).
    dcache: String,
    /// `127.0.0.1:PORT` of the distcc listener, as DISTCC_HOSTS names it.
    distcc: String,
    _cache: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        Self::start_on("tcp://127.0.0.1:0", extra)
    }

    /// With the dcache listener on `listen` (a Unix socket is allowed whatever --allow
    /// says, so its stats can be read when loopback TCP is refused).
    fn start_on(listen: &str, extra: &[&str]) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let mut child = Command::new(SERVER)
            .args(["--listen", listen])
            .args(["--listen-distcc", "tcp://127.0.0.1:0"])
            .args(["--cache-size", "1G", "--cache-dir"])
            .arg(cache.path())
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut dcache, mut distcc) = (None, None);
        while dcache.is_none() || distcc.is_none() {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            let addr = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap().to_owned())
            };
            if let Some(a) = addr("serving distcc clients on ") {
                distcc = Some(a.trim_start_matches("tcp://").to_owned());
            } else if let Some(a) = addr("listening on ") {
                dcache = Some(a);
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            dcache: dcache.unwrap(),
            distcc: distcc.unwrap(),
            _cache: cache,
        }
    }

    fn stats(&self) -> String {
        stats_json(&[("DCACHE_HOSTS", &self.dcache)])
    }
}

/// A work directory with its own DISTCC_DIR.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".distcc")).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path().join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `distcc ARGS` in this directory against `hosts`, verbose, its back-off state here.
    fn distcc(&self, hosts: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("distcc");
        cmd.args(args)
            .current_dir(self.path())
            .env("DISTCC_HOSTS", hosts)
            .env("DISTCC_DIR", self.path().join(".distcc"))
            .env("DISTCC_VERBOSE", "1")
            .env_remove("DISTCC_BACKOFF_PERIOD")
            .env_remove("DISTCC_FALLBACK")
            .env_remove("DISTCC_SKIP_LOCAL_RETRY");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// The compiler itself, here.
    fn local(&self, args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn log(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The client's own word that a compile ran on the server, and nowhere else.
fn assert_remote(out: &Output, file: &str, host: &str) {
    let log = log(out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("compile {file} on {host} completed ok")),
        "{log}"
    );
    assert!(!log.contains("running locally"), "{log}");
}

fn c_source(i: usize) -> String {
    format!(
        "#include <stdio.h>\n#include <string.h>\nstatic int table_{i}[] = {{ {i}, {}, {} }};\n\
         int f_{i}(const char *s) {{ return (int)strlen(s) * table_{i}[{} % 3]; }}\n\
         void p_{i}(void) {{ printf(\"%d\\n\", f_{i}(\"file {i}\")); }}\n",
        i * 3,
        i * 7,
        i
    )
}

#[test]
fn plain_and_lzo_compiles_equal_local_ones_and_repeat_as_hits() {
    let s = Server::start(&[]);
    let w = Work::new();
    for i in 0..3 {
        w.write(&format!("f{i}.c"), &c_source(i));
    }
    for i in 0..3 {
        let out = w.distcc(&s.distcc, &["gcc", "-O2", "-c", &format!("f{i}.c")], &[]);
        assert_remote(&out, &format!("f{i}.c"), &s.distcc);
        std::fs::rename(
            w.path().join(format!("f{i}.o")),
            w.path().join(format!("d{i}.o")),
        )
        .unwrap();
        w.local(&["gcc", "-O2", "-c", &format!("f{i}.c")]);
        assert_eq!(
            w.read(&format!("d{i}.o")),
            w.read(&format!("f{i}.o")),
            "f{i}.o"
        );
    }
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_jobs"), 3, "{json}");
    assert_eq!(stat(&json, "distcc_compiles"), 3, "{json}");
    assert_eq!(stat(&json, "compiles"), 3, "{json}");
    assert_eq!(stat(&json, "distcc_hits"), 0, "{json}");

    // The same compiles again: answered from the cache, the compiler not run.
    for i in 0..3 {
        let out = w.distcc(
            &s.distcc,
            &[
                "gcc",
                "-O2",
                "-c",
                &format!("f{i}.c"),
                "-o",
                &format!("again{i}.o"),
            ],
            &[],
        );
        assert_remote(&out, &format!("f{i}.c"), &s.distcc);
        assert_eq!(w.read(&format!("again{i}.o")), w.read(&format!("f{i}.o")));
    }
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_hits"), 3, "{json}");
    assert_eq!(stat(&json, "compiles"), 3, "{json}");

    // Protocol 2: the request and the reply as LZO blocks. A source compiled before is a
    // hit (the key is the source's, not the wire's); a new one is compiled and comes back
    // compressed by this server, decompressed by the stock client.
    let lzo = format!("{},lzo", s.distcc);
    let lw = Work::new();
    lw.write("f0.c", &c_source(0));
    lw.write("n.c", &c_source(40));
    for f in ["f0", "n"] {
        let out = lw.distcc(
            &lzo,
            &[
                "gcc",
                "-O2",
                "-c",
                &format!("{f}.c"),
                "-o",
                &format!("{f}.lzo.o"),
            ],
            &[],
        );
        assert_remote(&out, &format!("{f}.c"), &lzo);
        lw.local(&["gcc", "-O2", "-c", &format!("{f}.c")]);
        assert_eq!(
            lw.read(&format!("{f}.lzo.o")),
            lw.read(&format!("{f}.o")),
            "{f}"
        );
    }
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_hits"), 4, "{json}");
    assert_eq!(stat(&json, "distcc_compiles"), 4, "{json}");
    assert_eq!(stat(&json, "distcc_refused"), 0, "{json}");
    assert_eq!(stat(&json, "distcc_errors"), 0, "{json}");
}

#[test]
fn cxx_through_distcc_gxx_and_debug_info_names_the_client_directory() {
    let s = Server::start(&[]);
    let w = Work::new();
    w.write(
        "v.cpp",
        "#include <vector>\n#include <string>\n#include <algorithm>\n\
         int count(std::vector<std::string> v) { std::sort(v.begin(), v.end()); return v.size(); }\n",
    );
    let lzo = format!("{},lzo", s.distcc);
    let out = w.distcc(
        &lzo,
        &["g++", "-O2", "-std=c++17", "-c", "v.cpp", "-o", "remote.o"],
        &[],
    );
    assert_remote(&out, "v.cpp", &lzo);
    w.local(&["g++", "-O2", "-std=c++17", "-c", "v.cpp", "-o", "local.o"]);
    assert_eq!(w.read("remote.o"), w.read("local.o"));

    // clang too: the stock client appends `-target TRIPLE` to every clang command line.
    w.write("k.c", &c_source(5));
    let out = w.distcc(&s.distcc, &["clang", "-O2", "-c", "k.c", "-o", "k.o"], &[]);
    assert_remote(&out, "k.c", &s.distcc);
    assert!(w.read("k.o").starts_with(b"\x7fELF"));

    // -g: the object was compiled in the server's private directory, yet names the
    // client's, taken from the preprocessed text's line markers.
    w.write("g.c", &c_source(7));
    let out = w.distcc(&s.distcc, &["gcc", "-g", "-O1", "-c", "g.c"], &[]);
    assert_remote(&out, "g.c", &s.distcc);
    let dump = Command::new("readelf")
        .args(["--debug-dump=info", "g.o"])
        .current_dir(w.path())
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    let dir = w.path().to_str().unwrap();
    assert!(
        dump.lines()
            .any(|l| l.contains("DW_AT_comp_dir") && l.trim_end().ends_with(dir)),
        "{dump}"
    );
    assert!(
        !dump.contains("dcache-job-"),
        "the server's directory leaked: {dump}"
    );
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_compiles"), 3, "{json}");
}

#[test]
fn a_compile_error_returns_gccs_stderr_and_status() {
    let s = Server::start(&[]);
    let w = Work::new();
    w.write("bad.c", "int main(void) { return undeclared_thing; }\n");
    // distcc retries a failed remote compile locally unless told not to: with
    // DISTCC_SKIP_LOCAL_RETRY the user sees exactly what the server's gcc said.
    let out = w.distcc(
        &s.distcc,
        &["gcc", "-c", "bad.c"],
        &[("DISTCC_SKIP_LOCAL_RETRY", "1")],
    );
    let log = log(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("bad.c:1:"), "{log}");
    assert!(log.contains("'undeclared_thing' undeclared"), "{log}");
    assert!(!log.contains("running locally"), "{log}");
    assert!(!w.path().join("bad.o").exists());
    let json = s.stats();
    assert_eq!(stat(&json, "compile_failures"), 1, "{json}");
    assert_eq!(stat(&json, "distcc_compiles"), 1, "{json}");
    // A failure is never cached: the same compile runs again.
    let out = w.distcc(
        &s.distcc,
        &["gcc", "-c", "bad.c"],
        &[("DISTCC_SKIP_LOCAL_RETRY", "1")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stat(&s.stats(), "compile_failures"), 2);
}

#[test]
fn refused_options_compilers_and_addresses_make_distcc_compile_locally() {
    let s = Server::start(&[]);
    let mut refusals = 0;
    let cases: [(&[&str], &str); 2] = [
        // An option off the allow-list (it writes a second file beside the object).
        (&["gcc", "-fstack-usage", "-c", "a.c"], "a.o"),
        // A compiler named by a path other than /usr/bin or /bin.
        (&["PATH/mygcc", "-c", "a.c"], "a.o"),
    ];
    for (args, object) in cases {
        let w = Work::new();
        w.write("a.c", &c_source(1));
        std::os::unix::fs::symlink("/usr/bin/gcc", w.path().join("mygcc")).unwrap();
        let dir = w.path().to_str().unwrap().to_owned();
        let args: Vec<String> = args.iter().map(|a| a.replace("PATH", &dir)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.distcc(&s.distcc, &args, &[]);
        let log = log(&out);
        assert!(out.status.success(), "{log}");
        assert!(
            log.contains(&format!(
                "failed to distribute a.c to {}, running locally instead",
                s.distcc
            )),
            "{log}"
        );
        assert!(
            log.contains("compile a.c on localhost completed ok"),
            "{log}"
        );
        assert!(w.path().join(object).exists());
        refusals += 1;
        let json = s.stats();
        assert_eq!(stat(&json, "distcc_refused"), refusals, "{json}");
        assert_eq!(stat(&json, "compiles"), 0, "{json}");
    }

    // An address outside --allow: closed at once, the client compiles locally.
    let sock = tempfile::tempdir().unwrap();
    let listen = format!("unix://{}/s", sock.path().display());
    let only_other = Server::start_on(&listen, &["--allow", "127.0.0.2/32"]);
    let w = Work::new();
    w.write("a.c", &c_source(2));
    let out = w.distcc(&only_other.distcc, &["gcc", "-c", "a.c"], &[]);
    let log = log(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("running locally instead"), "{log}");
    assert!(w.path().join("a.o").exists());
    let json = only_other.stats();
    assert_eq!(stat(&json, "distcc_refused"), 1, "{json}");
    assert_eq!(stat(&json, "connections_refused"), 1, "{json}");
    assert_eq!(stat(&json, "distcc_connections"), 0, "{json}");
}

/// Sends `bytes` on a fresh connection to the distcc listener, then waits (within a wide
/// bound) for the server to close it; returns what it replied.
fn raw(addr: &str, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = c.write_all(bytes);
    if half_close {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    reply
}

#[test]
fn pump_mode_garbage_and_truncated_requests_cost_only_their_connection() {
    let s = Server::start(&[]);
    // What a pump-mode client sends first (protocol 3: the working directory, then the
    // command line and the headers). Closed at once, no reply: the client compiles this
    // file locally, as with a distccd that does not speak protocol 3.
    let pump =
        b"DIST00000003CDIR00000004/tmpARGC00000003ARGV00000003gccARGV00000002-cARGV00000003a.c";
    assert_eq!(raw(&s.distcc, pump, false), b"");
    // Garbage, a lying length, and a request cut short.
    assert_eq!(
        raw(&s.distcc, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false),
        b""
    );
    assert_eq!(raw(&s.distcc, b"DIST00000001ARGCffffffff", false), b"");
    assert_eq!(
        raw(
            &s.distcc,
            b"DIST00000001ARGC00000003ARGV00000003gccARGV00000002-cARGV00000003a.cDOTI00001000int",
            true
        ),
        b""
    );
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_refused"), 1, "{json}");
    assert_eq!(stat(&json, "distcc_errors"), 3, "{json}");
    // A hand-made request in the stock client's own bytes is served like any other.
    let mut req = Vec::new();
    let source = b"int answer(void) { return 42; }\n";
    for (t, v) in [("DIST", 1), ("ARGC", 4)] {
        req.extend_from_slice(format!("{t}{v:08x}").as_bytes());
    }
    for a in ["gcc", "-c", "x.c", "-O2"] {
        req.extend_from_slice(format!("ARGV{:08x}{a}", a.len()).as_bytes());
    }
    req.extend_from_slice(format!("DOTI{:08x}", source.len()).as_bytes());
    req.extend_from_slice(source);
    let reply = raw(&s.distcc, &req, false);
    assert!(
        reply.starts_with(b"DONE00000001STAT00000000SERR00000000SOUT00000000DOTO"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(&reply[60..64], b"\x7fELF");
    assert_eq!(stat(&s.stats(), "distcc_compiles"), 1);
}

#[test]
fn a_make_j4_project_through_distcc_equals_a_plain_build_and_rebuilds_from_the_cache() {
    const FILES: usize = 36;
    let s = Server::start(&["--jobs", "2"]);
    let make = |w: &Work, cc: &str| {
        let mut makefile = String::from("OBJS =");
        for i in 0..FILES {
            w.write(&format!("m{i}.c"), &c_source(i));
            makefile.push_str(&format!(" m{i}.o"));
        }
        makefile.push_str(&format!(
            "\nall: $(OBJS)\n%.o: %.c\n\t{cc} -O2 -Wall -c $< -o $@\nclean:\n\trm -f $(OBJS)\n"
        ));
        w.write("Makefile", &makefile);
    };
    let plain = Work::new();
    make(&plain, "gcc");
    let status = Command::new("make")
        .args(["-s", "-j4"])
        .current_dir(plain.path())
        .status()
        .unwrap();
    assert!(status.success());

    let w = Work::new();
    make(&w, "distcc gcc");
    // Four jobs at once to this host (the default for a remote host is fewer).
    let hosts = format!("{}/4", s.distcc);
    let build = |label: &str| {
        let out = Command::new("make")
            .args(["-j4"])
            .current_dir(w.path())
            .env("DISTCC_HOSTS", &hosts)
            .env("DISTCC_DIR", w.path().join(".distcc"))
            .env_remove("DISTCC_BACKOFF_PERIOD")
            .output()
            .unwrap();
        let log = log(&out);
        assert!(out.status.success(), "{label}: {log}");
        assert!(!log.contains("running locally"), "{label}: {log}");
    };
    build("cold");
    for i in 0..FILES {
        let o = format!("m{i}.o");
        assert_eq!(w.read(&o), plain.read(&o), "{o}");
    }
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_compiles"), FILES as u64, "{json}");
    assert_eq!(stat(&json, "distcc_hits"), 0, "{json}");

    let status = Command::new("make")
        .args(["-s", "clean"])
        .current_dir(w.path())
        .status()
        .unwrap();
    assert!(status.success());
    build("warm");
    for i in 0..FILES {
        let o = format!("m{i}.o");
        assert_eq!(w.read(&o), plain.read(&o), "{o}");
    }
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_hits"), FILES as u64, "{json}");
    assert_eq!(stat(&json, "compiles"), FILES as u64, "{json}");
}

#[test]
fn a_dcache_wrapper_compile_and_a_distcc_compile_share_one_entry() {
    let s = Server::start(&[]);
    let w = Work::new();
    w.write("shared.c", &c_source(11));
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(DCACHE)
        .args(["gcc", "-O2", "-c", "shared.c", "-o", "wrapper.o"])
        .current_dir(w.path())
        .env("DCACHE_HOSTS", &s.dcache)
        .env("DCACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", log(&out));
    let json = s.stats();
    assert_eq!(stat(&json, "compiles"), 1, "{json}");

    let out = w.distcc(
        &s.distcc,
        &["gcc", "-O2", "-c", "shared.c", "-o", "distcc.o"],
        &[],
    );
    assert_remote(&out, "shared.c", &s.distcc);
    assert_eq!(w.read("distcc.o"), w.read("wrapper.o"));
    let json = s.stats();
    assert_eq!(stat(&json, "distcc_hits"), 1, "{json}");
    assert_eq!(
        stat(&json, "compiles"),
        1,
        "the distcc job ran no compiler: {json}"
    );
}
