//! Minimal SVG line charts for the simulation results: no plotting dependency, just the
//! few elements a log-log chart needs.

use std::fmt::Write as _;

use crate::sim::Cell;

const W: f64 = 360.0;
const H: f64 = 260.0;
const PAD_L: f64 = 56.0;
const PAD_B: f64 = 40.0;
const PAD_T: f64 = 28.0;
const PAD_R: f64 = 12.0;

const SERIES: [(&str, &str); 3] = [
    ("speculative", "#1f77b4"),
    ("ask-first", "#ff7f0e"),
    ("send-all", "#2ca02c"),
];

fn log_scale(v: f64, lo: f64, hi: f64, a: f64, b: f64) -> f64 {
    a + (v.ln() - lo.ln()) / (hi.ln() - lo.ln()) * (b - a)
}

/// One figure: the cells of `outcome` at `bandwidth_bps`, a panel per source size, time to
/// result against round trip for each strategy, and the physical limit dashed.
pub fn figure(cells: &[Cell], outcome: &str, bandwidth_bps: u64) -> String {
    let mut sizes: Vec<u64> = cells.iter().map(|c| c.source_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let width = W * sizes.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">"##,
        H + 24.0
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="8" y="16" font-size="13">{outcome}, {} Mbit/s: time to result vs round trip (log-log); dashed = physical limit</text>"##,
        bandwidth_bps / 1_000_000
    );
    for (p, &size) in sizes.iter().enumerate() {
        let sel: Vec<&Cell> = cells
            .iter()
            .filter(|c| {
                c.outcome == outcome && c.bandwidth_bps == bandwidth_bps && c.source_bytes == size
            })
            .collect();
        if sel.is_empty() {
            continue;
        }
        let x0 = W * p as f64;
        let (lo_y, hi_y) = sel.iter().fold((f64::MAX, 0.0f64), |(lo, hi), c| {
            (
                lo.min(c.time_s).min(c.limit_s),
                hi.max(c.time_s).max(c.limit_s),
            )
        });
        let (lo_y, hi_y) = (lo_y / 1.5, hi_y * 1.5);
        let (lo_x, hi_x) = (0.1, 80.0);
        let px = |ms: f64| log_scale(ms, lo_x, hi_x, x0 + PAD_L, x0 + W - PAD_R);
        let py = |s: f64| log_scale(s, lo_y, hi_y, H + 24.0 - PAD_B, 24.0 + PAD_T);
        let _ = writeln!(
            svg,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            x0 + PAD_L,
            24.0 + PAD_T,
            W - PAD_L - PAD_R,
            H - PAD_T - PAD_B
        );
        let label = if size >= 1 << 20 {
            format!("{} MiB source", size >> 20)
        } else {
            format!("{} KiB source", size >> 10)
        };
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{label}</text>"#,
            x0 + PAD_L,
            24.0 + PAD_T - 6.0
        );
        for ms in [0.2, 4.0, 40.0] {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{ms} ms</text>"##,
                px(ms),
                H + 24.0 - PAD_B + 14.0
            );
        }
        let mut t = lo_y;
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(t.log10().floor());
        while decade <= hi_y {
            for m in [1.0, 2.0, 5.0] {
                t = decade * m;
                if t >= lo_y && t <= hi_y {
                    ticks.push(t);
                }
            }
            decade *= 10.0;
        }
        for t in ticks {
            let label = if t < 1.0 {
                format!("{:.0} ms", t * 1e3)
            } else {
                format!("{t:.0} s")
            };
            let label = if t < 0.001 {
                format!("{:.1} ms", t * 1e3)
            } else {
                label
            };
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{:.1}" text-anchor="end">{label}</text><line x1="{}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
                x0 + PAD_L - 4.0,
                py(t) + 4.0,
                x0 + PAD_L,
                x0 + W - PAD_R,
                py(t),
                py(t)
            );
        }
        let mut line = |points: Vec<(f64, f64)>, color: &str, dash: &str| {
            let d: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"##,
                d.join(" ")
            );
        };
        let limit: Vec<(f64, f64)> = sel
            .iter()
            .filter(|c| c.strategy.name() == "speculative")
            .map(|c| (c.rtt_ms, c.limit_s))
            .collect();
        line(limit, "#000", "5,4");
        for (name, color) in SERIES {
            let pts = sel
                .iter()
                .filter(|c| c.strategy.name() == name)
                .map(|c| (c.rtt_ms, c.time_s))
                .collect();
            line(pts, color, "none");
        }
        for (i, (name, color)) in SERIES.iter().enumerate() {
            let y = 24.0 + PAD_T + 14.0 + 14.0 * i as f64;
            let _ = writeln!(
                svg,
                r##"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"##,
                x0 + PAD_L + 8.0,
                x0 + PAD_L + 26.0,
                x0 + PAD_L + 30.0,
                y + 4.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
