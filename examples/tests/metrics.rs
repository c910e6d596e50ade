//! The metrics and health endpoint of a real `dcache-server` process (`--metrics`),
//! scraped over real sockets while the real `dcache` wrapper builds real C files with
//! gcc: the counters rise as jobs run and equal STATS once connections settle;
//! `promtool check metrics` accepts the exposition; `/readyz` follows the cache
//! directory and a shared tier on a real `redis-server`; stalled scrapers cost compiles
//! nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::redis::{Redis, eventually};
use common::{DCACHE, Server, server_on, stat, stats_json};

/// A server with `--metrics` on a free loopback port, and that port's address.
fn server_with_metrics(cache: &Path, extra: &[&str]) -> (Server, String) {
    let args = [&["--metrics", "tcp://127.0.0.1:0"], extra].concat();
    let s = server_on(cache, &args, &[]);
    let mut addr = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            addr = s
                .log()
                .split("metrics endpoint on http://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .map(str::to_owned);
            addr.is_some()
        }),
        "no metrics endpoint in the log:\n{}",
        s.log()
    );
    (s, addr.unwrap())
}

/// One HTTP/1.1 GET: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// [`get`], with what went wrong instead of a panic.
fn try_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The value of the sample `series` (name with its labels, exactly as written).
fn sample(metrics: &str, series: &str) -> u64 {
    let line = metrics
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
    let v = line.rsplit(' ').next().unwrap();
    v.parse::<u64>()
        .or_else(|_| v.parse::<f64>().map(|f| f as u64))
        .unwrap()
}

fn jobs(m: &str, outcome: &str) -> u64 {
    ["dcache", "distcc"]
        .iter()
        .map(|f| {
            sample(
                m,
                &format!("dcache_jobs_total{{front=\"{f}\",outcome=\"{outcome}\"}}"),
            )
        })
        .sum()
}

/// `dcache gcc -c NAME.c -o NAME.o` in `dir` against `addr`, never compiling locally.
fn compile(dir: &Path, name: &str, addr: &str) -> Output {
    Command::new(DCACHE)
        .args([
            "gcc",
            "-O2",
            "-c",
            &format!("{name}.c"),
            "-o",
            &format!("{name}.o"),
        ])
        .env("DCACHE_HOSTS", addr)
        // Straight to the server: the relay daemon has its own tests (daemon.rs).
        .env("DCACHE_DAEMON", "0")
        .env("DCACHE_DIR", dir.join(".dcache"))
        .env("DCACHE_FALLBACK", "0")
        .env_remove("DCACHE_TOKEN")
        .env_remove("DCACHE_TOKEN_FILE")
        .current_dir(dir)
        .output()
        .unwrap()
}

fn write_sources(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::write(
            dir.join(format!("f{i}.c")),
            format!("int f{i}(int x) {{ return x * {i} + {}; }}\n", i * 7),
        )
        .unwrap();
    }
}

/// Waits until the server serves no connection (the wrapper's have closed), so counters
/// no longer move.
fn settle(metrics: &str) -> String {
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            last = get(metrics, "/metrics").1;
            sample(&last, "dcache_connections_open") == 0
        }),
        "connections never closed:\n{last}"
    );
    last
}

#[test]
fn counters_rise_during_a_real_build_and_equal_stats_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, metrics) = server_with_metrics(&tmp.path().join("cache"), &["--jobs", "2"]);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    const N: usize = 6;
    write_sources(&src, N);
    std::fs::write(src.join("bad.c"), "int broken( { return; }\n").unwrap();

    // The build runs in a thread while this one scrapes.
    let (addr, dir) = (s.addr.clone(), src.clone());
    let build = std::thread::spawn(move || {
        for round in 0..2 {
            for i in 0..N {
                let o = compile(&dir, &format!("f{i}"), &addr);
                assert!(o.status.success(), "round {round} f{i}: {o:?}");
            }
        }
        let o = compile(&dir, "bad", &addr);
        assert!(!o.status.success(), "a syntax error compiles: {o:?}");
    });
    let mut scrapes = Vec::new();
    while !build.is_finished() {
        scrapes.push(get(&metrics, "/metrics").1);
        std::thread::sleep(Duration::from_millis(20));
    }
    build.join().unwrap();
    scrapes.push(settle(&metrics));
    // Monotonic while the build ran, and it did move.
    for series in ["hit", "miss", "early"] {
        let seen: Vec<u64> = scrapes.iter().map(|m| jobs(m, series)).collect();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{series}: {seen:?}");
    }
    let compiles: Vec<u64> = scrapes
        .iter()
        .map(|m| sample(m, "dcache_compiles_total"))
        .collect();
    assert!(compiles.windows(2).all(|w| w[0] <= w[1]), "{compiles:?}");
    let m = scrapes.last().unwrap();
    // The build's own figures: N misses then N hits (each hit early: speculative HASH),
    // one failed compile.
    assert_eq!(jobs(m, "hit"), N as u64, "{m}");
    assert_eq!(jobs(m, "early"), N as u64);
    assert_eq!(jobs(m, "miss"), N as u64 + 1);
    assert_eq!(jobs(m, "failed"), 1);
    assert_eq!(sample(m, "dcache_compiles_total"), N as u64 + 1);
    assert_eq!(sample(m, "dcache_hit_latency_seconds_count"), N as u64);
    assert_eq!(
        sample(m, "dcache_compile_duration_seconds_count"),
        N as u64 + 1
    );
    assert_eq!(
        sample(m, "dcache_hit_latency_seconds_bucket{le=\"+Inf\"}"),
        N as u64
    );
    assert_eq!(sample(m, "dcache_store_entries{tier=\"disk\"}"), N as u64);
    assert!(sample(m, "dcache_store_limit_bytes{tier=\"disk\"}") >= 1 << 30);
    assert_eq!(sample(m, "dcache_compile_slots"), 2);
    assert_eq!(sample(m, "dcache_compile_slots_busy"), 0);

    // STATS, read now, from the same counters (its own connection changes only the
    // connection figures).
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
    for (series, name) in [
        (jobs(m, "hit"), "hits"),
        (jobs(m, "miss"), "misses"),
        (jobs(m, "early"), "early_results"),
        (jobs(m, "failed"), "compile_failures"),
        (jobs(m, "refused"), "jobs_refused"),
        (sample(m, "dcache_compiles_total"), "compiles"),
        (
            sample(m, "dcache_source_received_bytes_total"),
            "source_bytes_received",
        ),
        (
            sample(m, "dcache_source_saved_bytes_total"),
            "source_bytes_saved",
        ),
        (
            sample(m, "dcache_single_flight_joins_total"),
            "single_flight_waits",
        ),
        (
            sample(m, "dcache_store_entries{tier=\"disk\"}"),
            "stored_entries",
        ),
        (
            sample(m, "dcache_store_bytes{tier=\"disk\"}"),
            "stored_bytes",
        ),
        (
            sample(m, "dcache_store_evictions_total{tier=\"disk\"}"),
            "evictions",
        ),
        (
            sample(m, "dcache_connections_accepted_total"),
            "connections",
        ),
    ] {
        // STATS counts its own connection as accepted.
        let expected = if name == "connections" {
            series + 1
        } else {
            series
        };
        assert_eq!(
            stat(&json, name),
            expected,
            "{name}: STATS {json}\nmetrics {m}"
        );
    }
    assert_eq!(
        stat(&json, "memory_hits"),
        sample(
            m,
            "dcache_store_lookups_total{tier=\"memory\",result=\"hit\"}"
        )
    );
    let sum_us = stat(&json, "hit_time_us");
    let sum_s: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("dcache_hit_latency_seconds_sum "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (sum_s * 1e6 - sum_us as f64).abs() < 2.0,
        "{sum_s} s vs {sum_us} us"
    );

    // promtool, the Prometheus project's own checker, accepts the exposition.
    let mut promtool = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(p) => p,
        Err(e) => panic!("promtool is installed (.ci/run installs the prometheus package): {e}"),
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{m}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    documented_queries_fit(m, tmp.path());
    let (status, health) = get(&metrics, "/healthz");
    assert_eq!((status, health.as_str()), (200, "alive\n"));
    assert_eq!(get(&metrics, "/nowhere").0, 404);
}

#[test]
fn readyz_turns_503_with_the_reason_when_the_cache_dir_is_gone_and_back_after() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let (_s, metrics) = server_with_metrics(&cache, &[]);
    let (status, body) = get(&metrics, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready\n"), "{body}");
    // A file where the directory was: no write succeeds, even as root (where chmod
    // would not stop one).
    let away = tmp.path().join("cache.away");
    std::fs::rename(&cache, &away).unwrap();
    std::fs::write(&cache, b"not a directory").unwrap();
    let (status, body) = get(&metrics, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready\n")
            && body.contains("disk cache")
            && body.contains("not writable"),
        "{body}"
    );
    // /healthz stays 200: alive, just not ready.
    assert_eq!(get(&metrics, "/healthz").0, 200);
    std::fs::remove_file(&cache).unwrap();
    std::fs::rename(&away, &cache).unwrap();
    let (status, body) = get(&metrics, "/readyz");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn readyz_follows_a_shared_tier_on_redis() {
    let tmp = tempfile::tempdir().unwrap();
    let key = common::private_file(tmp.path(), "fleet.key", "0123456789abcdef0123456789abcdef");
    let mut redis = Redis::start();
    let url = redis.url();
    let (_s, metrics) = server_with_metrics(
        &tmp.path().join("cache"),
        &["--shared", &url, "--shared-key-file", key.to_str().unwrap()],
    );
    let (status, body) = get(&metrics, "/readyz");
    assert_eq!(status, 200, "{body}");
    let m = get(&metrics, "/metrics").1;
    assert_eq!(sample(&m, "dcache_store_errors_total{tier=\"shared\"}"), 0);

    redis.stop();
    let mut last = (0, String::new());
    assert!(
        eventually(Duration::from_secs(30), || {
            last = get(&metrics, "/readyz");
            last.0 == 503
        }),
        "still ready with Redis stopped: {last:?}"
    );
    assert!(last.1.contains("shared tier"), "{}", last.1);

    redis.restart();
    assert!(
        eventually(Duration::from_secs(30), || {
            last = get(&metrics, "/readyz");
            last.0 == 200
        }),
        "not ready again after Redis came back: {last:?}"
    );
}

#[test]
fn stalled_and_flooding_scrapers_do_not_delay_compiles() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, metrics) = server_with_metrics(&tmp.path().join("cache"), &[]);
    // Every place of the endpoint (8) taken by a scraper that never finishes its
    // request, some trickling an endless header, and one that asks and never reads.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut c = TcpStream::connect(&metrics).unwrap();
        match i % 3 {
            0 => {}
            1 => c
                .write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: aaaa")
                .unwrap(),
            _ => c
                .write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                        .repeat(50)
                        .as_slice(),
                )
                .unwrap(),
        }
        held.push(c);
    }
    // The ninth is closed at once: the endpoint is full, nothing queues behind it.
    let mut ninth = TcpStream::connect(&metrics).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = ninth.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    assert!(
        matches!(ninth.read(&mut buf), Ok(0) | Err(_)),
        "a scraper past the cap was served"
    );

    // Compiles go on while the scrapers hold on: misses, then hits.
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_sources(&src, 3);
    for round in 0..2 {
        for i in 0..3 {
            let o = compile(&src, &format!("f{i}"), &s.addr);
            assert!(o.status.success(), "round {round}: {o:?}");
        }
    }
    let json = stats_json(&[("DCACHE_HOSTS", s.addr.as_str())]);
    assert_eq!(stat(&json, "hits"), 3, "{json}");
    // The trickling scrapers keep writing a header that never ends: past the header
    // deadline hyper drops them, and the endpoint serves again.
    for c in held.iter_mut().skip(1).step_by(3) {
        let _ = c.write_all(b"aaaa");
    }
    drop(held);
    assert!(
        eventually(Duration::from_secs(60), || {
            try_get(&metrics, "/healthz").is_ok_and(|(status, _)| status == 200)
        }),
        "the endpoint never came back"
    );
}

/// The dashboard queries in the README and docs/OPERATIONS.md, one per group of lines
/// between comments and blank lines in their `promql` blocks.
fn documented_queries() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut queries = Vec::new();
    for doc in ["README.md", "docs/OPERATIONS.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let mut in_block = false;
        let mut current = String::new();
        for line in text.lines() {
            let t = line.trim();
            if !in_block {
                in_block = t == "```promql";
                continue;
            }
            if t.starts_with("```") || t.is_empty() || t.starts_with('#') {
                if !current.is_empty() {
                    queries.push((doc.to_owned(), std::mem::take(&mut current)));
                }
                in_block = !t.starts_with("```");
                continue;
            }
            current.push_str(t);
            current.push(' ');
        }
    }
    queries
}

/// Every documented query parses (`promtool check rules`, with each as a recording rule),
/// names only series this server exports, and matches only label values that exist.
fn documented_queries_fit(metrics: &str, tmp: &Path) {
    let queries = documented_queries();
    assert!(queries.len() >= 4, "queries found: {queries:?}");
    let mut rules = String::from("groups:\n  - name: documented\n    rules:\n");
    for (i, (doc, q)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: documented:query{i}\n        expr: '{}'\n",
            q.trim()
        ));
        // Metric names: each is a series (or a histogram's part) in the scrape.
        for name in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("dcache_"))
        {
            assert!(
                metrics.lines().any(|l| l
                    .strip_prefix(name)
                    .is_some_and(|r| r.starts_with(['{', ' ']))),
                "{doc}: `{q}` names {name}, which /metrics does not export"
            );
        }
        // Label matchers `label="v"` and `label=~"a|b"`: each value is exported.
        for part in q.split(['{', ',']).skip(1) {
            let Some((label, rest)) = part.split_once('=') else {
                continue;
            };
            let label = label.trim();
            let Some(values) = rest.trim_start_matches('~').split('"').nth(1) else {
                continue;
            };
            for v in values.split('|') {
                let series = format!("{label}=\"{v}\"");
                assert!(
                    metrics.contains(&series),
                    "{doc}: `{q}` matches {series}, which no series has"
                );
            }
        }
    }
    let file = tmp.join("documented.rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
