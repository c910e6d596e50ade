//! The strategy simulation: every strategy on every link shape, against the physical limit.
//!
//! Each cell runs the real client and server state machines on simulated links under a
//! virtual clock, with a stand-in compiler whose output is a quarter of the source and
//! whose compile time is fixed, and measures the time from submitting the job to holding
//! the result.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::testing::Pair;
use dcache_proto::{ClientConfig, ClientEvent, JobDesc, ServerConfig, Strategy};

/// Compile time of the stand-in compiler.
pub const COMPILE_TIME: Duration = Duration::from_millis(50);

/// One measured cell.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The client strategy.
    pub strategy: Strategy,
    /// Round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// Link bandwidth in bits per second, each direction.
    pub bandwidth_bps: u64,
    /// Preprocessed source size.
    pub source_bytes: u64,
    /// `hit` or `miss`.
    pub outcome: &'static str,
    /// Measured time to result.
    pub time_s: f64,
    /// The physical limit for this cell.
    pub limit_s: f64,
    /// Source bytes uploaded that the server did not need (on a hit).
    pub wasted_bytes: u64,
    /// Result body bytes (stdout + stderr + object).
    pub result_bytes: u64,
}

impl Cell {
    /// Measured time over the limit.
    pub fn ratio(&self) -> f64 {
        self.time_s / self.limit_s
    }
}

fn source(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// Runs one cell.
pub fn run_cell(
    strategy: Strategy,
    rtt: Duration,
    bandwidth_bps: u64,
    source_len: usize,
    hit: bool,
    origin: Instant,
) -> Cell {
    let bytes_per_s = bandwidth_bps / 8;
    let mut p = Pair::new(
        ClientConfig {
            strategy,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
        rtt / 2,
        bytes_per_s,
        1,
        origin,
    );
    p.chop = false;
    p.app.compile_time = COMPILE_TIME;
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into()],
        source_len: Some(source_len as u64),
        identity: None,
    };
    let src = source(source_len);
    if hit {
        // Warm the cache with the same job (always with a HASH-less upload, so the cache
        // is warm whatever the strategy under test), then measure a second job.
        let job = p
            .client
            .start_job_with(p.now, desc.clone(), None, Strategy::SendAll)
            .expect("start warm-up job");
        p.client.push_source(job, src.clone(), true).expect("push");
        p.run_until_job_ends(job, 10_000_000);
        p.run(10_000_000);
    }
    let t0 = p.now;
    let job = p.submit(desc.clone(), src.clone()).expect("submit");
    let end = p.run_until_job_ends(job, 10_000_000);
    let outcome = match end {
        Some(ClientEvent::Done { outcome, .. }) => outcome,
        other => panic!("cell did not complete: {other:?}"),
    };
    let time = p
        .client_events
        .iter()
        .find_map(|(t, e)| matches!(e, ClientEvent::Done { job: j, .. } if *j == job).then_some(*t))
        .unwrap_or(p.now)
        - t0;
    let result_bytes = outcome.result.body_len();
    let b = bytes_per_s as f64;
    let r = rtt.as_secs_f64();
    let served_from_cache = hit && strategy != Strategy::SendAll;
    let limit = if hit {
        // The cheapest possible hit: one round trip, then the result's transfer.
        r + result_bytes as f64 / b
    } else {
        r + source_len as f64 / b + COMPILE_TIME.as_secs_f64() + result_bytes as f64 / b
    };
    Cell {
        strategy,
        rtt_ms: rtt.as_secs_f64() * 1000.0,
        bandwidth_bps,
        source_bytes: source_len as u64,
        outcome: if hit { "hit" } else { "miss" },
        time_s: time.as_secs_f64(),
        limit_s: limit,
        wasted_bytes: if served_from_cache || hit {
            outcome.source_bytes_sent
        } else {
            0
        },
        result_bytes,
    }
}

/// Every cell of the matrix: hit or miss × source size (10 KiB, 2 MiB) × bandwidth
/// (100 Mbit/s, 1 Gbit/s) × round trip (0.2, 4, 40 ms) × strategy, as tabled in
/// docs/BENCHMARKS.md ("Strategies against the physical limit").
pub fn run_matrix(origin: Instant) -> Vec<Cell> {
    let mut cells = Vec::new();
    for hit in [true, false] {
        for source_len in [10 * 1024, 2 * 1024 * 1024] {
            for bw in [100_000_000u64, 1_000_000_000] {
                for rtt_us in [200u64, 4_000, 40_000] {
                    for strategy in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll] {
                        cells.push(run_cell(
                            strategy,
                            Duration::from_micros(rtt_us),
                            bw,
                            source_len,
                            hit,
                            origin,
                        ));
                    }
                }
            }
        }
    }
    cells
}

/// The cells as a JSON array (the fields named in issue #6).
pub fn to_json(cells: &[Cell]) -> String {
    let mut out = String::from("[\n");
    for (i, c) in cells.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {{\"strategy\": \"{}\", \"rtt_ms\": {}, \"bandwidth_bps\": {}, \"source_bytes\": {}, \"outcome\": \"{}\", \"time_s\": {:.6}, \"limit_s\": {:.6}, \"ratio\": {:.4}, \"wasted_bytes\": {}}}{}",
            c.strategy.name(),
            c.rtt_ms,
            c.bandwidth_bps,
            c.source_bytes,
            c.outcome,
            c.time_s,
            c.limit_s,
            c.ratio(),
            c.wasted_bytes,
            if i + 1 == cells.len() { "" } else { "," }
        );
    }
    out.push_str("]\n");
    out
}

/// The cells as a table for people.
pub fn to_table(cells: &[Cell]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:>8} {:>7} {:>9} {:<12} {:>10} {:>10} {:>6} {:>10}",
        "case",
        "source",
        "rtt_ms",
        "bandwidth",
        "strategy",
        "time_ms",
        "limit_ms",
        "ratio",
        "wasted_B"
    );
    for c in cells {
        let _ = writeln!(
            out,
            "{:<5} {:>8} {:>7} {:>9} {:<12} {:>10.3} {:>10.3} {:>6.3} {:>10}",
            c.outcome,
            human(c.source_bytes),
            c.rtt_ms,
            if c.bandwidth_bps >= 1_000_000_000 {
                "1Gbit"
            } else {
                "100Mbit"
            },
            c.strategy.name(),
            c.time_s * 1e3,
            c.limit_s * 1e3,
            c.ratio(),
            c.wasted_bytes
        );
    }
    out
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{}MiB", n >> 20)
    } else {
        format!("{}KiB", n >> 10)
    }
}
