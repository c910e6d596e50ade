//! `dcache-bench`: reproducible measurements of dcache.
//!
//! `dcache-bench sim [--json FILE]` runs every client strategy over simulated links under
//! a virtual clock — hit and miss, 10 KiB and 2 MiB sources, 100 Mbit/s and 1 Gbit/s, round
//! trips of 0.2, 4 and 40 ms (docs/BENCHMARKS.md, "Strategies against the physical limit")
//! — and prints the time to result beside the physical limit.
//!
//! `dcache-bench metrics-cost [ROUNDS]` compares loopback hits/s against a server with
//! the metrics endpoint (scraped every 100 ms) and one without, alternating.
//!
//! `dcache-bench tiers REDIS_URL` measures the hit latency of the memory, disk and Redis
//! tiers at three object sizes.

use std::process::ExitCode;
use std::time::Instant;

use dcache_bench::sim;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sim") => {
            let mut json = None;
            let mut svg_dir = None;
            let mut harness = false;
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                match flag.as_str() {
                    "--harness" => harness = true,
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
                return usage("serve-fake ADDR COMPILE_MS OUTPUT_DIVISOR");
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dcache-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let metrics = args.get(4).is_some_and(|a| a == "metrics");
            match rt.block_on(dcache_bench::loopback::serve_fake(addr, ms, div, metrics)) {
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

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "dcache-bench: {why}\nusage: dcache-bench sim [--harness] [--json FILE] [--svg DIR]\n       dcache-bench loopback [--json FILE]\n       dcache-bench metrics-cost [ROUNDS]\n       dcache-bench tiers REDIS_URL"
    );
    ExitCode::from(2)
}
