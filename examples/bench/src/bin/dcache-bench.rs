//! `dcache-bench`: reproducible measurements of dcache.
//!
//! `dcache-bench sim [--json FILE]` runs every client strategy over simulated links under
//! a virtual clock — hit and miss, 10 KiB and 2 MiB sources, 100 Mbit/s and 1 Gbit/s, round
//! trips of 0.2, 4 and 40 ms (docs/BENCHMARKS.md, "Strategies against the physical limit")
//! — and prints the time to result beside the physical limit.
//!
//! `dcache-bench sim --compress DIR` runs the compression matrix (never, auto, always) on
//! the real preprocessed source and object `bench/wire-fixture.sh DIR` made.
//! `dcache-bench metrics-cost [ROUNDS]` compares loopback hits/s against a server with
//! the metrics endpoint (scraped every 100 ms) and one without, alternating.
//!
//! `dcache-bench tiers REDIS_URL` measures the hit latency of the memory, disk and Redis
//! tiers at three object sizes.
//!
//! `dcache-bench link --listen ADDR --to ADDR --rtt 4ms [--rate 100mbit]` relays TCP
//! through an emulated link until killed; `dcache-bench link-check` measures the
//! emulator's resolution and accuracy; `dcache-bench hit-latency [--daemon] [--bin DIR]
//! [--samples N] [--rate R]` times cache hits through the `dcache` wrapper over it
//! (docs/BENCHMARKS.md, "The link emulator" and "Per-hit latency through the wrapper").

use std::process::ExitCode;
use std::time::Instant;

use dcache_bench::sim;

/// `sim --compress DIR`: the compression matrix on the fixture `bench/wire-fixture.sh`
/// wrote to DIR.
fn sim_compress(dir: &std::path::Path) -> ExitCode {
    let read = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(b) => Ok(bytes::Bytes::from(b)),
        Err(e) => {
            eprintln!(
                "dcache-bench sim --compress: {}: {e} (make it with bench/wire-fixture.sh {})",
                dir.join(name).display(),
                dir.display()
            );
            Err(ExitCode::FAILURE)
        }
    };
    let (source, object) = match (read("lua.i"), read("lua.o")) {
        (Ok(s), Ok(o)) => (s, o),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let fx = dcache_bench::sim_zstd::Fixture { source, object };
    let costs = dcache_bench::sim_zstd::measure(&fx);
    // The harness runs on a virtual clock; this one reading is its origin only.
    let cells = dcache_bench::sim_zstd::run_matrix(&fx, costs, Instant::now());
    print!("{}", dcache_bench::sim_zstd::to_table(&cells, costs));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sim") => {
            let mut json = None;
            let mut svg_dir = None;
            let mut harness = false;
            let mut compress = None;
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                match flag.as_str() {
                    "--harness" => harness = true,
                    "--compress" => {
                        let Some(v) = rest.next() else {
                            return usage("sim: --compress needs the fixture directory");
                        };
                        compress = Some(std::path::PathBuf::from(v));
                    }
                    "--json" | "--svg" => {
                        let Some(v) = rest.next() else {
                            return usage(&format!("sim: {flag} needs a value"));
                        };
                        if flag == "--json" {
                            json = Some(v.clone());
                        } else {
                            svg_dir = Some(std::path::PathBuf::from(v));
                        }
                    }
                    _ => return usage(&format!("sim: unexpected {flag}")),
                }
            }
            if let Some(dir) = compress {
                return sim_compress(&dir);
            }
            let cells = if harness {
                // The harness runs on a virtual clock; this one reading is its origin only.
                sim::run_matrix(Instant::now())
            } else {
                match dcache_bench::sim_driver::run_matrix() {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("dcache-bench sim: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            print!("{}", sim::to_table(&cells));
            if let Some(path) = json {
                if let Err(e) = std::fs::write(&path, sim::to_json(&cells)) {
                    eprintln!("dcache-bench: cannot write {path}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            if let Some(dir) = svg_dir {
                for outcome in ["hit", "miss"] {
                    for bw in [100_000_000u64, 1_000_000_000] {
                        let path = dir.join(format!("sim-{outcome}-{}mbit.svg", bw / 1_000_000));
                        let svg = dcache_bench::plot::figure(&cells, outcome, bw);
                        if let Err(e) = std::fs::write(&path, svg) {
                            eprintln!("dcache-bench: cannot write {}: {e}", path.display());
                            return ExitCode::FAILURE;
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some("loopback") => {
            let json = match (args.get(1).map(String::as_str), args.get(2)) {
                (Some("--json"), Some(f)) => Some(f.clone()),
                (None, _) => None,
                _ => return usage("loopback takes [--json FILE]"),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dcache-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(dcache_bench::loopback::run()) {
                Ok((text, js)) => {
                    print!("{text}");
                    if let Some(path) = json {
                        if let Err(e) = std::fs::write(&path, js) {
                            eprintln!("dcache-bench: cannot write {path}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcache-bench loopback: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("tiers") => {
            let Some(url) = args.get(1) else {
                return usage("tiers needs a Redis URL");
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dcache-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(dcache_bench::tiers::run(url)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcache-bench tiers: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("link") => link(&args[1..]),
        Some("link-check") => match dcache_bench::link_check::run() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dcache-bench link-check: {e}");
                ExitCode::FAILURE
            }
        },
        Some("hit-latency") => hit_latency(&args[1..]),
        Some("metrics-cost") => {
            let rounds = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(7);
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dcache-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(dcache_bench::loopback::metrics_cost(rounds)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dcache-bench metrics-cost: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        // Internal: the server child of `loopback`.
        Some("serve-fake") => {
            let (Some(addr), Some(ms), Some(div)) = (
                args.get(1),
                args.get(2).and_then(|m| m.parse().ok()),
                args.get(3).and_then(|d| d.parse().ok()),
            ) else {
                return usage(
                    "serve-fake ADDR COMPILE_MS OUTPUT_DIVISOR [metrics] [--tls CERT KEY]",
                );
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dcache-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let rest = &args[4.min(args.len())..];
            let metrics = rest.iter().any(|a| a == "metrics");
            let tls = match rest.iter().position(|a| a == "--tls") {
                Some(i) => match (rest.get(i + 1), rest.get(i + 2)) {
                    (Some(cert), Some(key)) => Some((cert.into(), key.into())),
                    _ => return usage("serve-fake: --tls takes CERT KEY"),
                },
                None => None,
            };
            match rt.block_on(dcache_bench::loopback::serve_fake(
                addr, ms, div, metrics, tls,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dcache-bench serve-fake: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage("expected a subcommand"),
    }
}

/// `dcache-bench link`: runs the emulator until killed.
fn link(args: &[String]) -> ExitCode {
    use dcache_bench::link::{Link, LinkConfig, parse_duration, parse_rate};
    let (mut listen, mut to, mut rtt, mut rate) = (None, None, None, Some(100_000_000));
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let Some(v) = rest.next() else {
            return usage(&format!("link: {flag} needs a value"));
        };
        let bad = |e: &dyn std::fmt::Display| usage(&format!("link: {flag}: {e}"));
        match flag.as_str() {
            "--listen" => match v.parse::<std::net::SocketAddr>() {
                Ok(a) => listen = Some(a),
                Err(e) => return bad(&e),
            },
            "--to" => match v.parse::<std::net::SocketAddr>() {
                Ok(a) => to = Some(a),
                Err(e) => return bad(&e),
            },
            "--rtt" => match parse_duration(v) {
                Ok(d) => rtt = Some(d),
                Err(e) => return bad(&e),
            },
            "--rate" => match parse_rate(v) {
                Ok(r) => rate = r,
                Err(e) => return bad(&e),
            },
            _ => return usage(&format!("link: unexpected {flag}")),
        }
    }
    let (Some(listen), Some(to), Some(rtt)) = (listen, to, rtt) else {
        return usage("link needs --listen, --to and --rtt");
    };
    match Link::start(
        listen,
        to,
        LinkConfig {
            rtt,
            rate_bps: rate,
        },
    ) {
        Ok(link) => {
            println!("listening on {} (to {to}, rtt {rtt:?})", link.local_addr());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("dcache-bench link: {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dcache-bench hit-latency`: hits through the wrapper over the emulator.
fn hit_latency(args: &[String]) -> ExitCode {
    use dcache_bench::hit_latency::{Options, run};
    let mut opts = match Options::defaults() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dcache-bench hit-latency: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        if flag == "--daemon" {
            opts.daemon = true;
            continue;
        }
        let Some(v) = rest.next() else {
            return usage(&format!("hit-latency: {flag} needs a value"));
        };
        match flag.as_str() {
            "--bin" => opts.bin_dir = v.into(),
            "--samples" => match v.parse::<usize>() {
                Ok(n) if n > 0 => {
                    opts.samples = n;
                    opts.samples_slow = n.div_ceil(2).max(1);
                }
                _ => return usage("hit-latency: --samples takes a positive number"),
            },
            "--rate" => match dcache_bench::link::parse_rate(v) {
                Ok(r) => opts.rate_bps = r,
                Err(e) => return usage(&format!("hit-latency: {e}")),
            },
            _ => return usage(&format!("hit-latency: unexpected {flag}")),
        }
    }
    match run(&opts) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dcache-bench hit-latency: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "dcache-bench: {why}
usage: dcache-bench sim [--harness] [--json FILE] [--svg DIR]
       dcache-bench sim --compress FIXTURE_DIR
       dcache-bench loopback [--json FILE]
       dcache-bench metrics-cost [ROUNDS]
       dcache-bench tiers REDIS_URL
       dcache-bench link --listen ADDR --to ADDR --rtt 4ms [--rate 100mbit|none]
       dcache-bench link-check
       dcache-bench hit-latency [--daemon] [--bin DIR] [--samples N] [--rate 100mbit]"
    );
    ExitCode::from(2)
}
