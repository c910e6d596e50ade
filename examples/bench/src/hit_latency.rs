//! `dcache-bench hit-latency`: what one cache hit costs through the `dcache` wrapper over a
//! real, delayed TCP link.
//!
//! A real `dcache-server` (its own cache directory, optionally `--token-file`) runs behind
//! the link emulator ([`crate::link`]); each sample is a real `dcache gcc -c hit.c`
//! process, timed from spawn to exit. The limit a hit is held against is `R + O/B + L`: the
//! round trip, the bytes the server sent for the hit (the object and its framing, counted
//! by the emulator) at the link's rate, and the wrapper's own local work `L`, the median of
//! the same hit with no emulator in the way (loopback, round trip ≈ 0.05 ms).
//!
//! Round trips are counted by the emulator: one per connection (the modelled handshake)
//! plus one per turn (client → server flow followed by server → client flow), as deltas
//! around each process, read after its connections have closed.
//!
//! Without `--daemon`, `DCACHE_DAEMON=0` is set: each process connects to the server
//! itself, and every sample is a direct-mode hit of the same `hit.c`. With `--daemon`
//! the wrapper keeps its default, the relay daemon in front of the server, which would
//! serve a repeated `hit.c` from its own tier without crossing the link. So there each
//! sample compiles a source of its own, which a wrapper with `DCACHE_DAEMON=0` and the
//! same `DCACHE_DIR` compiled beforehand straight to the server (off the link): the server
//! has the result and the manifest has its key, the daemon has never seen it, and the
//! timed hit is a direct-mode lookup that the daemon passes up over its warm connection.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::link::{Link, LinkConfig, LinkStats};
use crate::link_check::p50_p99;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding the `dcache` and `dcache-server` binaries.
    pub bin_dir: PathBuf,
    /// Round trips to measure through the emulator.
    pub rtts: Vec<Duration>,
    /// The link's rate each way (bits per second), `None` for no cap.
    pub rate_bps: Option<u64>,
    /// Hits per cell at round trips up to 10 ms.
    pub samples: usize,
    /// Hits per cell at round trips above 10 ms.
    pub samples_slow: usize,
    /// Leave the wrapper's daemon on (its default in the daemon branch).
    pub daemon: bool,
}

impl Options {
    /// 0.2, 4 and 40 ms at 100 Mbit/s, 50 samples (20 at 40 ms), no daemon; binaries next
    /// to this executable.
    pub fn defaults() -> Result<Options, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let bin_dir = me.parent().ok_or("no directory")?.to_path_buf();
        Ok(Options {
            bin_dir,
            rtts: vec![
                Duration::from_micros(200),
                Duration::from_millis(4),
                Duration::from_millis(40),
            ],
            rate_bps: Some(100_000_000),
            samples: 50,
            samples_slow: 20,
            daemon: false,
        })
    }
}

/// A small C file with no headers: the hit measures dcache, not the preprocessor.
const HIT_SOURCE: &str = r#"
struct point { int x, y; };
static int dot(struct point a, struct point b) { return a.x * b.x + a.y * b.y; }
int norm2(struct point p) { return dot(p, p); }
unsigned checksum(const unsigned char *p, unsigned long n) {
    unsigned h = 2166136261u;
    for (unsigned long i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    return h;
}
int table[64] = { 1, 2, 3, 5, 8, 13, 21, 34, 55, 89 };
int lookup(int i) { return table[i & 63] + norm2((struct point){ i, i + 1 }); }
"#;

/// The dcache-server child, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl Server {
    fn start(bin: &Path, dir: &Path, token: Option<&Path>) -> Result<Server, String> {
        let port = free_port()?;
        let mut cmd = Command::new(bin.join("dcache-server"));
        cmd.arg("--listen")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--cache-dir")
            .arg(dir)
            .args(["--jobs", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.arg("--token-file").arg(t);
        }
        let mut child = cmd.spawn().map_err(|e| format!("dcache-server: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    return Err("dcache-server exited before listening".into());
                }
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }
}

/// One wrapper configuration: where it connects, its directory, its token.
struct Wrapper<'a> {
    opts: &'a Options,
    work: &'a Path,
    dir: PathBuf,
    host: SocketAddr,
    token: Option<&'a Path>,
}

impl Wrapper<'_> {
    fn command(&self) -> Command {
        let mut cmd = Command::new(self.opts.bin_dir.join("dcache"));
        cmd.current_dir(self.work)
            .env("DCACHE_DIR", &self.dir)
            .env("DCACHE_HOSTS", format!("tcp://{}", self.host))
            .env("DCACHE_FALLBACK", "0")
            .env_remove("DCACHE_TOKEN")
            .env_remove("DCACHE_TOKEN_FILE")
            .env_remove("DCACHE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !self.opts.daemon {
            cmd.env("DCACHE_DAEMON", "0");
        }
        if let Some(t) = self.token {
            cmd.env("DCACHE_TOKEN_FILE", t);
        }
        cmd
    }

    /// One compile of `source`, timed from spawn to exit.
    fn compile(&self, source: &str) -> Result<Duration, String> {
        self.compile_with(self.command(), source)
    }

    /// Compiles `source` as [`compile`](Self::compile) would, but with no daemon and
    /// straight to `server` (off the link): the server gets the result, this directory's
    /// manifest its key, and the daemon nothing.
    fn prime(&self, source: &str, server: SocketAddr) -> Result<(), String> {
        let mut cmd = self.command();
        cmd.env("DCACHE_HOSTS", format!("tcp://{server}"))
            .env("DCACHE_DAEMON", "0");
        self.compile_with(cmd, source).map(|_| ())
    }

    /// Until this directory's daemon has its socket: the first compiles of a cell start
    /// it without waiting for it.
    fn wait_for_daemon(&self) -> Result<(), String> {
        let has_socket = || {
            std::fs::read_dir(self.dir.join("daemon")).is_ok_and(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "sock"))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_socket() {
            if Instant::now() > deadline {
                return Err(format!("no daemon started in {}", self.dir.display()));
            }
            self.compile("hit.c")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        // Once more, so the daemon's connection to the server is open.
        self.compile("hit.c").map(|_| ())
    }

    fn compile_with(&self, mut cmd: Command, source: &str) -> Result<Duration, String> {
        let t = Instant::now();
        let out = cmd
            .args(["gcc", "-O2", "-c", source, "-o"])
            .arg(format!("{source}.o"))
            .output()
            .map_err(|e| format!("dcache: {e}"))?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!(
                "dcache gcc -c {source} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(took)
    }

    /// The wrapper's hit and miss counters (`dcache --show-stats --json`).
    fn counters(&self) -> Result<(u64, String), String> {
        let out = self
            .command()
            .args(["--show-stats", "--json"])
            .stdout(Stdio::piped())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let num = |name: &str| -> u64 {
            text.find(&format!("\"{name}\": "))
                .and_then(|i| {
                    text[i + name.len() + 4..]
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                })
                .unwrap_or(0)
        };
        Ok((num("hits"), text.into_owned()))
    }

    fn stop_daemon(&self) {
        if self.opts.daemon {
            let _ = self.command().arg("--stop-daemon").output();
        }
    }
}

/// One measured cell.
#[derive(Debug, Clone)]
pub struct Cell {
    /// A token was used.
    pub token: bool,
    /// The emulated round trip; `None` for the direct (no emulator) baseline.
    pub rtt: Option<Duration>,
    /// Hits timed.
    pub samples: usize,
    /// Median hit.
    pub p50: Duration,
    /// 99th percentile hit (the slowest of fewer than 100).
    pub p99: Duration,
    /// `R + O/B + L`.
    pub limit: Duration,
    /// Round trips per hit (median over the samples).
    pub rt_hit: u64,
    /// Round trips of one miss.
    pub rt_miss: u64,
    /// The miss's time.
    pub miss: Duration,
    /// Bytes from the server per hit (median).
    pub down_bytes: u64,
}

fn median_u64(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The link's counters once the compile that just ended has no connection left open; the
/// relay daemon keeps its one to the server (`daemon`), and is not waited for.
fn settle(link: Option<&Link>, daemon: bool) -> LinkStats {
    link.map(|l| l.settle_keeping(u64::from(daemon), Duration::from_secs(10)))
        .unwrap_or_default()
}

/// One cell being measured: its link (none for the direct baseline), its wrapper, and the
/// samples so far.
struct Run<'a> {
    link: Option<Link>,
    wrapper: Wrapper<'a>,
    tag: String,
    rtt: Option<Duration>,
    n: usize,
    hits_before: u64,
    miss: Duration,
    miss_stats: LinkStats,
    times: Vec<Duration>,
    rts: Vec<u64>,
    down: Vec<u64>,
    /// With the daemon: each sample's own source, primed on the server; else empty
    /// (every sample compiles `hit.c`).
    sources: Vec<String>,
}

impl<'a> Run<'a> {
    /// Sets a cell up: its link, a warm-up (the server has hit.c from the first cell on;
    /// this directory's direct-mode manifest is written by the first call), one miss.
    fn start(
        opts: &'a Options,
        work: &'a Path,
        server: &Server,
        token: Option<&'a Path>,
        rtt: Option<Duration>,
        n: usize,
    ) -> Result<Run<'a>, String> {
        let link = match rtt {
            Some(rtt) => Some(
                Link::start(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    server.addr,
                    LinkConfig {
                        rtt,
                        rate_bps: opts.rate_bps,
                    },
                )
                .map_err(|e| format!("link: {e}"))?,
            ),
            None => None,
        };
        let tag = format!(
            "{}-{}",
            if token.is_some() { "token" } else { "open" },
            rtt.map_or(0, |r| r.as_micros())
        );
        let wrapper = Wrapper {
            opts,
            work,
            dir: work.join(format!("client-{tag}")),
            host: link.as_ref().map_or(server.addr, Link::local_addr),
            token,
        };
        wrapper.compile("hit.c")?;
        wrapper.compile("hit.c")?;
        let sources = if opts.daemon {
            wrapper.wait_for_daemon()?;
            let names: Vec<String> = (0..n).map(|i| format!("hit-{tag}-{i}.c")).collect();
            for (i, name) in names.iter().enumerate() {
                let text = format!(
                    "{HIT_SOURCE}\nint sample_{}_{i}(void) {{ return {i}; }}\n",
                    tag.replace('-', "_")
                );
                std::fs::write(work.join(name), text).map_err(|e| e.to_string())?;
            }
            // Past the wrapper's freshness rule, so priming records each manifest entry.
            std::thread::sleep(Duration::from_millis(300));
            for name in &names {
                wrapper.prime(name, server.addr)?;
            }
            names
        } else {
            Vec::new()
        };
        let miss_src = format!("miss-{tag}.c");
        std::fs::write(
            work.join(&miss_src),
            format!(
                "{HIT_SOURCE}\nint miss_{}(void) {{ return 1; }}\n",
                tag.replace('-', "_")
            ),
        )
        .map_err(|e| e.to_string())?;
        let before = settle(link.as_ref(), opts.daemon);
        let miss = wrapper.compile(&miss_src)?;
        let miss_stats = settle(link.as_ref(), opts.daemon).since(&before);
        let (hits_before, _) = wrapper.counters()?;
        Ok(Run {
            link,
            wrapper,
            tag,
            rtt,
            n,
            hits_before,
            miss,
            miss_stats,
            times: Vec::with_capacity(n),
            rts: Vec::with_capacity(n),
            down: Vec::with_capacity(n),
            sources,
        })
    }

    /// One timed hit, with its round trips and bytes read after its connections closed.
    fn sample(&mut self) -> Result<(), String> {
        let source = self
            .sources
            .get(self.times.len())
            .map_or("hit.c", String::as_str);
        let before = settle(self.link.as_ref(), self.wrapper.opts.daemon);
        self.times.push(self.wrapper.compile(source)?);
        let d = settle(self.link.as_ref(), self.wrapper.opts.daemon).since(&before);
        self.rts.push(d.round_trips());
        self.down.push(d.bytes_down);
        Ok(())
    }

    /// Checks every sample was a hit; the cell's figures, `local` being the direct p50.
    fn finish(mut self, opts: &Options, local: Option<Duration>) -> Result<Cell, String> {
        let (hits_after, stats) = self.wrapper.counters()?;
        self.wrapper.stop_daemon();
        let n = self.n;
        if hits_after < self.hits_before + n as u64 {
            return Err(format!(
                "{}: {} of {n} compiles were hits; dcache --show-stats --json: {stats}",
                self.tag,
                hits_after.saturating_sub(self.hits_before)
            ));
        }
        let (p50, p99) = p50_p99(&mut self.times);
        let down_bytes = median_u64(&mut self.down);
        let limit = match (self.rtt, local) {
            (Some(rtt), Some(local)) => {
                let wire = LinkConfig {
                    rtt,
                    rate_bps: opts.rate_bps,
                };
                rtt + wire.serialization(down_bytes as usize) + local
            }
            _ => p50,
        };
        Ok(Cell {
            token: self.wrapper.token.is_some(),
            rtt: self.rtt,
            samples: n,
            p50,
            p99,
            limit,
            rt_hit: median_u64(&mut self.rts),
            rt_miss: self.miss_stats.round_trips(),
            miss: self.miss,
            down_bytes,
        })
    }
}

/// Runs every cell, with and without a token; returns the report. The cells of one
/// server are sampled in turn (one hit each, round and round), so a change in the
/// machine's load falls on all of them alike rather than on whichever ran then.
pub fn run(opts: &Options) -> Result<String, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let work = work.path();
    std::fs::write(work.join("hit.c"), HIT_SOURCE).map_err(|e| e.to_string())?;
    let token_file = work.join("token");
    std::fs::write(&token_file, "dcache-bench hit-latency token\n").map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    let mut cells = Vec::new();
    for token in [None, Some(token_file.as_path())] {
        let server = Server::start(
            &opts.bin_dir,
            &work.join(if token.is_some() {
                "srv-token"
            } else {
                "srv-open"
            }),
            token,
        )?;
        let mut runs = vec![Run::start(opts, work, &server, token, None, opts.samples)?];
        for &rtt in &opts.rtts {
            let n = if rtt > Duration::from_millis(10) {
                opts.samples_slow
            } else {
                opts.samples
            };
            runs.push(Run::start(opts, work, &server, token, Some(rtt), n)?);
        }
        let rounds = runs.iter().map(|r| r.n).max().unwrap_or(0);
        for i in 0..rounds {
            for r in runs.iter_mut().filter(|r| i < r.n) {
                r.sample()?;
            }
        }
        let mut runs = runs.into_iter();
        let direct = runs.next().ok_or("no direct cell")?.finish(opts, None)?;
        let local = direct.p50;
        cells.push(direct);
        for r in runs {
            cells.push(r.finish(opts, Some(local))?);
        }
    }
    Ok(report(opts, &cells))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(opts: &Options, cells: &[Cell]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hits through `dcache gcc -O2 -c hit.c` (daemon: {}), link rate {}; limit = R + O/B + L (L = the direct p50)",
        if opts.daemon {
            "the relay daemon; each sample a source of its own, primed on the server"
        } else {
            "DCACHE_DAEMON=0"
        },
        opts.rate_bps
            .map_or("none".into(), |r| format!("{} Mbit/s", r / 1_000_000))
    );
    let _ = writeln!(
        out,
        "{:<6} {:>7} {:>4} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8}",
        "token",
        "rtt_ms",
        "n",
        "p50_ms",
        "p99_ms",
        "limit_ms",
        "p50/lim",
        "rt_hit",
        "O_bytes",
        "rt_miss",
        "miss_ms"
    );
    for c in cells {
        let _ = writeln!(
            out,
            "{:<6} {:>7} {:>4} {:>8.2} {:>8.2} {:>9.2} {:>7.2} {:>7} {:>8} {:>8} {:>8.2}",
            if c.token { "yes" } else { "no" },
            c.rtt.map_or("direct".into(), |r| format!("{:.1}", ms(r))),
            c.samples,
            ms(c.p50),
            ms(c.p99),
            ms(c.limit),
            c.p50.as_secs_f64() / c.limit.as_secs_f64(),
            c.rt_hit,
            c.down_bytes,
            c.rt_miss,
            ms(c.miss)
        );
    }
    out
}
