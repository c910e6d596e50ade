//! What identifying a compiler costs, per way of doing it: one run of the compiler
//! (`-dumpmachine`, `-v`), hashing its programs, the whole probe dcache does, and the probe
//! remembered on disk (what a warm compile pays). Run with
//! `cargo run --release -p dcache-examples --example identity_cost [COMPILER...]`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dcache_server::exec::identity::{probe, probe_cached};

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn main() {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names = ["gcc", "gcc-11", "clang"].map(String::from).to_vec();
    }
    println!(
        "| compiler | one run (-dumpmachine) | -v | hash driver + cc1 + cc1plus | whole probe (cold) | remembered probe (warm) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for name in names {
        let Some(path) = PATH
            .split(':')
            .map(|d| Path::new(d).join(&name))
            .find(|p| p.is_file())
        else {
            continue;
        };
        let run = |arg: &str| {
            time(5, || {
                let _ = Command::new(&path)
                    .arg(arg)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            })
        };
        let dump = run("-dumpmachine");
        let verbose = run("-v");
        let files: Vec<PathBuf> = std::iter::once(path.clone())
            .chain(["cc1", "cc1plus"].iter().filter_map(|h| {
                let out = Command::new(&path)
                    .arg(format!("-print-prog-name={h}"))
                    .output()
                    .ok()?;
                let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                p.is_file().then_some(p)
            }))
            .collect();
        let bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let hash = time(5, || {
            for f in &files {
                let mut h = blake3::Hasher::new();
                if let Ok(mut file) = std::fs::File::open(f) {
                    let _ = std::io::copy(&mut file, &mut h);
                }
            }
        });
        let cold = time(3, || {
            let _ = probe(&path, PATH);
        });
        let dir = tempfile::tempdir().expect("a temporary directory");
        let _ = probe_cached(dir.path(), &path, PATH);
        let warm = time(200, || {
            let _ = probe_cached(dir.path(), &path, PATH);
        });
        println!(
            "| {name} | {} | {} | {} ({} MB) | {} | {} |",
            ms(dump),
            ms(verbose),
            ms(hash),
            bytes >> 20,
            ms(cold),
            ms(warm)
        );
    }
}

/// The median of `n` runs of `f`.
fn time(n: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[n / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}
