//! Compression on the wire: the matrix of hit/miss × source size × bandwidth × round trip
//! with `DCACHE_COMPRESS=never`, `auto` and `always`, on real preprocessed C (the Lua
//! sources, `bench/wire-fixture.sh`) and results cut from a real object file.
//!
//! Each cell runs the real client and server state machines on simulated links under a
//! virtual clock (the [`Pair`] harness), like `sim --harness`. A virtual clock does not
//! see CPU time, so what zstd costs is measured for real on this machine (level 1, in the
//! protocol's 64 KiB chunks, the fastest of 15 passes: on a shared machine slower passes
//! measure the scheduler) and added to a compressing cell's time. Compression runs chunk
//! by chunk while the link carries the previous chunk, so in each direction the time
//! added is the part of the CPU time the transfer does not hide —
//! `max(0, max(compress, inflate) − wire time)` — plus one chunk's compress and inflate,
//! which cannot overlap. On a hit the upload is off the critical path (the answer comes
//! after a round trip whatever the client does meanwhile), so only the result's cost is
//! added.
//!
//! `auto` is the client's rule ([`CompressPolicy`]) with the cell's bandwidth as
//! `DCACHE_LINK_SPEED`, and for the loopback rows the rule by address (loopback
//! declines). Every cell starts on a connection whose handshake is done (a warm
//! connection, as the wrapper's are), so the three modes are compared on the same terms.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_client::compression::{CompressMode, CompressPolicy};
use dcache_proto::testing::Pair;
use dcache_proto::{ClientConfig, ClientEvent, JobDesc, ServerConfig, Strategy};
use dcache_transport::Address;

use crate::sim::COMPILE_TIME;

/// The real bytes a cell is made of.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// Preprocessed C source (cut to each cell's size from the front).
    pub source: Bytes,
    /// A real object file (the results' object is cut from it).
    pub object: Bytes,
}

/// What zstd costs on this machine, per byte, measured on the fixture.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// Seconds to compress one source byte at level 1 in 64 KiB chunks.
    pub compress_s_per_byte: f64,
    /// Seconds to inflate one source byte.
    pub inflate_s_per_byte: f64,
    /// Seconds to compress one object byte.
    pub compress_obj_s_per_byte: f64,
    /// Seconds to inflate one object byte.
    pub inflate_obj_s_per_byte: f64,
    /// Compressed over plain size of the source, in 64 KiB chunks.
    pub source_ratio: f64,
    /// Compressed over plain size of the object.
    pub object_ratio: f64,
}

/// The chunk the protocol compresses by.
const CHUNK: usize = 64 * 1024;

/// Seconds per byte to compress and to inflate `data` in [`CHUNK`]s (the fastest of 15
/// passes), and its compressed size over its size.
fn time_zstd(data: &[u8]) -> (f64, f64, f64) {
    let mut comp = f64::MAX;
    let mut infl = f64::MAX;
    let mut packed = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        packed = data
            .chunks(CHUNK)
            .filter_map(|c| dcache_proto::compress_payload(c, dcache_proto::DEFAULT_LEVEL))
            .collect::<Vec<_>>();
        comp = comp.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for p in &packed {
            let _ = dcache_proto::decompress_payload(p, CHUNK as u32);
        }
        infl = infl.min(t.elapsed().as_secs_f64());
    }
    let n = data.len().max(1) as f64;
    let packed_len: usize = packed.iter().map(Bytes::len).sum();
    (comp / n, infl / n, packed_len as f64 / n)
}

/// Measures [`Costs`] on the fixture (2 MiB of source, the whole object).
pub fn measure(fx: &Fixture) -> Costs {
    let (c, i, r) = time_zstd(&fx.source[..fx.source.len().min(2 << 20)]);
    let (co, io, ro) = time_zstd(&fx.object);
    Costs {
        compress_s_per_byte: c,
        inflate_s_per_byte: i,
        compress_obj_s_per_byte: co,
        inflate_obj_s_per_byte: io,
        source_ratio: r,
        object_ratio: ro,
    }
}

/// Time added by compressing `plain` bytes that took `wire_s` on the link: what the
/// transfer does not hide, plus one chunk.
fn critical_cpu(plain: u64, wire_s: f64, compress: f64, inflate: f64) -> f64 {
    if plain == 0 {
        return 0.0;
    }
    let cpu = plain as f64 * compress.max(inflate);
    let last = plain.min(CHUNK as u64) as f64 * (compress + inflate);
    (cpu - wire_s).max(0.0) + last
}

/// One measured cell.
#[derive(Clone, Debug)]
pub struct Cell {
    /// `never`, `auto` or `always`.
    pub mode: &'static str,
    /// Whether the connection compressed (auto's decision).
    pub compressed: bool,
    /// Round trip, ms.
    pub rtt_ms: f64,
    /// Bits per second; 0 for the loopback rows.
    pub bandwidth_bps: u64,
    /// Source length.
    pub source_bytes: u64,
    /// `hit` or `miss`.
    pub outcome: &'static str,
    /// Time to result, zstd CPU included.
    pub time_s: f64,
    /// The uncompressed physical limit.
    pub limit_s: f64,
    /// The limit recomputed with the bytes that actually crossed the link.
    pub limit_wire_s: f64,
    /// Bytes client to server and server to client.
    pub up_bytes: u64,
    /// Bytes server to client.
    pub down_bytes: u64,
}

/// The loopback rows' stand-in speed (bytes/s): memory-speed copies through the kernel.
const LOOPBACK_BYTES_PER_S: u64 = 4_000_000_000;

/// Runs one cell.
#[allow(clippy::too_many_arguments)]
fn run_cell(
    fx: &Fixture,
    costs: Costs,
    mode: CompressMode,
    rtt: Duration,
    bandwidth_bps: u64,
    source_len: usize,
    hit: bool,
    origin: Instant,
) -> Cell {
    let loopback = bandwidth_bps == 0;
    let bytes_per_s = if loopback {
        LOOPBACK_BYTES_PER_S
    } else {
        bandwidth_bps / 8
    };
    let policy = CompressPolicy {
        mode,
        link_speed: (!loopback).then_some(bandwidth_bps),
    };
    let addr: Address = if loopback {
        "tcp://127.0.0.1:3632"
    } else {
        "tcp://build.example:3632"
    }
    .parse()
    .expect("a valid address");
    let level = policy.level_for(&addr);
    let mut p = Pair::new(
        ClientConfig {
            strategy: Strategy::Speculative,
            compression: level,
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
    p.app.object_bytes = Some(fx.object.clone());
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into()],
        source_len: Some(source_len as u64),
        identity: None,
    };
    let src = fx.source.slice(..source_len.min(fx.source.len()));
    // A warm connection: the handshake is over before the clock starts.
    p.run(10_000);
    if hit {
        let job = p
            .client
            .start_job_with(p.now, desc.clone(), None, Strategy::SendAll)
            .expect("start warm-up job");
        p.client.push_source(job, src.clone(), true).expect("push");
        p.run_until_job_ends(job, 10_000_000);
        p.run(10_000_000);
    }
    let (up0, down0) = (p.c2s.bytes_sent, p.s2c.bytes_sent);
    let (plain0, _) = p.client.bulk_bytes_sent();
    let t0 = p.now;
    let job = p.submit(desc, src.clone()).expect("submit");
    let end = p.run_until_job_ends(job, 10_000_000);
    let outcome = match end {
        Some(ClientEvent::Done { outcome, .. }) => outcome,
        other => panic!("cell did not complete: {other:?}"),
    };
    let done_at = p
        .client_events
        .iter()
        .find_map(|(t, e)| matches!(e, ClientEvent::Done { job: j, .. } if *j == job).then_some(*t))
        .unwrap_or(p.now);
    let compressed = p.client.compression_negotiated();
    let (plain1, _) = p.client.bulk_bytes_sent();
    let result_bytes = outcome.result.body_len();
    let up = p.c2s.bytes_sent - up0;
    let down = p.s2c.bytes_sent - down0;
    let b = bytes_per_s as f64;
    let cpu = if compressed {
        let upload = if hit {
            0.0
        } else {
            critical_cpu(
                plain1 - plain0,
                up as f64 / b,
                costs.compress_s_per_byte,
                costs.inflate_s_per_byte,
            )
        };
        upload
            + critical_cpu(
                result_bytes,
                down as f64 / b,
                costs.compress_obj_s_per_byte,
                costs.inflate_obj_s_per_byte,
            )
    } else {
        0.0
    };
    let r = rtt.as_secs_f64();
    let (limit, limit_wire) = if hit {
        (r + result_bytes as f64 / b, r + down as f64 / b)
    } else {
        let c = COMPILE_TIME.as_secs_f64();
        (
            r + source_len as f64 / b + c + result_bytes as f64 / b,
            r + up as f64 / b + c + down as f64 / b,
        )
    };
    Cell {
        mode: match mode {
            CompressMode::Never => "never",
            CompressMode::Always => "always",
            _ => "auto",
        },
        compressed,
        rtt_ms: r * 1000.0,
        bandwidth_bps,
        source_bytes: source_len as u64,
        outcome: if hit { "hit" } else { "miss" },
        time_s: (done_at - t0).as_secs_f64() + cpu,
        limit_s: limit,
        limit_wire_s: limit_wire,
        up_bytes: up,
        down_bytes: down,
    }
}

/// The whole matrix: hit/miss × 10 KiB, 2 MiB × 100 Mbit/s, 1 Gbit/s, 10 Gbit/s (round
/// trips 0.2, 4, 40 ms) and loopback (0.02 ms) × never, auto, always.
pub fn run_matrix(fx: &Fixture, costs: Costs, origin: Instant) -> Vec<Cell> {
    let mut cells = Vec::new();
    for hit in [false, true] {
        for source_len in [10 * 1024, 2 * 1024 * 1024] {
            let mut links: Vec<(u64, u64)> = Vec::new();
            for bw in [100_000_000u64, 1_000_000_000, 10_000_000_000] {
                for rtt_us in [200u64, 4_000, 40_000] {
                    links.push((bw, rtt_us));
                }
            }
            links.push((0, 20));
            for (bw, rtt_us) in links {
                for mode in [
                    CompressMode::Never,
                    CompressMode::Auto,
                    CompressMode::Always,
                ] {
                    cells.push(run_cell(
                        fx,
                        costs,
                        mode,
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
    cells
}

/// The cells as a table: one line per link and case, the three modes side by side.
pub fn to_table(cells: &[Cell], costs: Costs) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "zstd level 1 here: source compress {:.2} ns/B, inflate {:.2} ns/B; object {:.2}, {:.2} ns/B; source {:.3} of its size, object {:.3}",
        costs.compress_s_per_byte * 1e9,
        costs.inflate_s_per_byte * 1e9,
        costs.compress_obj_s_per_byte * 1e9,
        costs.inflate_obj_s_per_byte * 1e9,
        costs.source_ratio,
        costs.object_ratio
    );
    let _ = writeln!(
        out,
        "{:<5} {:>7} {:>7} {:>8} {:>10} {:>10} {:>10} {:>5} {:>9} {:>10} {:>10} {:>8}",
        "case",
        "source",
        "rtt_ms",
        "link",
        "never_ms",
        "auto_ms",
        "always_ms",
        "auto?",
        "auto/nev",
        "limit_ms",
        "zlimit_ms",
        "up_KiB"
    );
    for row in cells.chunks(3) {
        let [never, auto, always] = row else { continue };
        let _ = writeln!(
            out,
            "{:<5} {:>7} {:>7} {:>8} {:>10.3} {:>10.3} {:>10.3} {:>5} {:>9.3} {:>10.3} {:>10.3} {:>8.0}",
            never.outcome,
            if never.source_bytes >= 1 << 20 {
                format!("{}MiB", never.source_bytes >> 20)
            } else {
                format!("{}KiB", never.source_bytes >> 10)
            },
            never.rtt_ms,
            match never.bandwidth_bps {
                0 => "loopback".to_owned(),
                b if b >= 1_000_000_000 => format!("{}Gbit", b / 1_000_000_000),
                b => format!("{}Mbit", b / 1_000_000),
            },
            never.time_s * 1e3,
            auto.time_s * 1e3,
            always.time_s * 1e3,
            if auto.compressed { "zstd" } else { "plain" },
            auto.time_s / never.time_s,
            never.limit_s * 1e3,
            always.limit_wire_s * 1e3,
            always.up_bytes as f64 / 1024.0,
        );
    }
    out
}
