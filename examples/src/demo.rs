//! `dcache --demo`: builds the bundled C program with the system compiler, then twice
//! through dcache on the embedded default (cold, then warm), runs it, and prints what
//! happened. The sources are compiled into the binary, so the demo runs anywhere.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dcache_client::stats::local as stats_file;

const FILES: [(&str, &str); 6] = [
    ("Makefile", include_str!("../demo/Makefile")),
    ("demo.h", include_str!("../demo/demo.h")),
    ("main.c", include_str!("../demo/main.c")),
    ("words.c", include_str!("../demo/words.c")),
    ("table.c", include_str!("../demo/table.c")),
    ("checksum.c", include_str!("../demo/checksum.c")),
];

struct Row {
    build: &'static str,
    time: Duration,
    hits: u64,
    misses: u64,
    early: u64,
    compiles: u64,
}

/// Runs the demo; returns the process exit code.
pub fn run() -> i32 {
    match run_inner() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dcache --demo: {e}");
            1
        }
    }
}

fn make(dir: &Path, cc: &str, cache: &Path) -> Result<Duration, String> {
    let clean = Command::new("make")
        .args(["-s", "clean"])
        .current_dir(dir)
        .status()
        .map_err(|e| format!("cannot run make: {e} (install make and gcc)"))?;
    if !clean.success() {
        return Err("make clean failed".into());
    }
    let t0 = Instant::now();
    let status = Command::new("make")
        .args(["-s", "-j4", &format!("CC={cc}")])
        .env("DCACHE_DIR", cache)
        .env_remove("DCACHE_HOSTS")
        .current_dir(dir)
        .status()
        .map_err(|e| format!("cannot run make: {e}"))?;
    if !status.success() {
        return Err(format!("build with CC={cc} failed"));
    }
    Ok(t0.elapsed())
}

fn run_inner() -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let src = work.path().join("wordfreq");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    for (name, text) in FILES {
        std::fs::write(src.join(name), text).map_err(|e| e.to_string())?;
    }
    println!("building a 4-file C program in {}", src.display());
    let mut rows = Vec::new();
    let plain = make(&src, "gcc", &cache)?;
    rows.push(Row {
        build: "plain gcc",
        time: plain,
        hits: 0,
        misses: 0,
        early: 0,
        compiles: 4,
    });
    let cc = format!("{} gcc", me.display());
    let mut before = [0u64; 4];
    for build in ["dcache (cold)", "dcache (warm)"] {
        let time = make(&src, &cc, &cache)?;
        let totals = stats_file::totals(&cache);
        let get = |n: &str| totals.iter().find(|(k, _)| *k == n).map_or(0, |(_, v)| *v);
        let now = [
            get("hits"),
            get("misses"),
            get("early_results"),
            get("compiles"),
        ];
        rows.push(Row {
            build,
            time,
            hits: now[0] - before[0],
            misses: now[1] - before[1],
            early: now[2] - before[2],
            compiles: now[3] - before[3],
        });
        before = now;
    }
    let out = Command::new(src.join("wordfreq"))
        .output()
        .map_err(|e| format!("cannot run the program: {e}"))?;
    println!(
        "\nthe program says:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "{:<15} {:>9} {:>6} {:>7} {:>7} {:>9}",
        "build", "time_ms", "hits", "misses", "early", "compiles"
    );
    for r in &rows {
        println!(
            "{:<15} {:>9.1} {:>6} {:>7} {:>7} {:>9}",
            r.build,
            r.time.as_secs_f64() * 1e3,
            r.hits,
            r.misses,
            r.early,
            r.compiles
        );
    }
    println!(
        "\nThe warm build compiled nothing: every object came from the cache. With\n\
         DCACHE_HOSTS set, the same happens against remote servers."
    );
    Ok(())
}
