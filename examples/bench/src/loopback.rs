//! `dcache-bench loopback`: a real server process and real clients on this machine.
//!
//! The server runs in a child process (`dcache-bench serve-fake`) with the in-memory store
//! and the stand-in compiler, so the figures measure dcache rather than gcc, and the
//! server's peak memory can be read from `/proc` apart from the clients'.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::{CacheKey, ClientConfig, JobDesc};
use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::{
    Address, ClientHandle, TlsClient, TlsServer, TransportOptions, bind, connect, spawn_client,
};

/// Runs a server with the stand-in compiler on `addr` until killed; prints the bound
/// address on stdout first, then, with `metrics`, the address of its metrics endpoint.
/// `tls` (certificate and key PEM files) is what a `tls://` address serves.
pub async fn serve_fake(
    addr: &str,
    compile_ms: u64,
    output_divisor: usize,
    metrics: bool,
    tls: Option<(PathBuf, PathBuf)>,
) -> Result<(), String> {
    let addr: Address = addr.parse().map_err(|e| format!("{e}"))?;
    let service = Service::new(
        Arc::new(MemoryStore::new(16 << 30)),
        Arc::new(
            FakeExecutor::new(Duration::from_millis(compile_ms))
                .with_output_divisor(output_divisor),
        ),
        ServiceConfig {
            // Every benchmark client connects from 127.0.0.1, up to 1,000 at once.
            max_connections: 4096,
            max_connections_per_address: 4096,
            max_handshaking: 4096,
            ..ServiceConfig::default()
        },
    );
    let mut options = TransportOptions::default();
    if let Some((cert, key)) = tls {
        options.tls_server = Some(TlsServer::new(&cert, &key, None).map_err(|e| e.to_string())?);
    }
    let listener = bind(&addr, &options).await.map_err(|e| e.to_string())?;
    println!("listening on {}", listener.local_addr());
    if metrics {
        let ep = dcache_server::metrics::bind(
            &"tcp://127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
            &dcache_server::access::Cidr::loopback(),
        )
        .await
        .map_err(|e| e.to_string())?;
        println!("metrics on {}", ep.local_addr().map_err(|e| e.to_string())?);
        let readiness = dcache_server::metrics::Readiness {
            sandbox: dcache_server::metrics::SandboxState::Disabled,
        };
        tokio::spawn(dcache_server::metrics::serve(
            ep,
            service.clone(),
            readiness,
            dcache_server::metrics::MetricsConfig::default(),
            std::future::pending(),
        ));
    }
    service.serve(listener, std::future::pending()).await;
    Ok(())
}

/// A server child process, killed on drop.
struct Server {
    child: Child,
    addr: Address,
    /// What a client needs to reach it: the test CA for a `tls://` server.
    options: TransportOptions,
    /// The metrics endpoint, when started with one.
    metrics: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(addr: &str, compile_ms: u64, output_divisor: usize) -> Result<Self, String> {
        Self::start_with(addr, compile_ms, output_divisor, false, None)
    }

    fn start_with(
        addr: &str,
        compile_ms: u64,
        output_divisor: usize,
        metrics: bool,
        pki: Option<&BenchPki>,
    ) -> Result<Self, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = Command::new(me);
        command
            .args([
                "serve-fake",
                addr,
                &compile_ms.to_string(),
                &output_divisor.to_string(),
            ])
            .args(metrics.then_some("metrics"));
        let mut options = TransportOptions::default();
        if let Some(pki) = pki {
            command.arg("--tls").arg(&pki.cert).arg(&pki.key);
            options.tls_client =
                Some(TlsClient::new(Some(&pki.ca), None).map_err(|e| e.to_string())?);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("server said {line:?}"))?
            .parse()
            .map_err(|e| format!("{e}"))?;
        let metrics = if metrics {
            let mut line = String::new();
            stdout.read_line(&mut line).map_err(|e| e.to_string())?;
            Some(
                line.trim()
                    .strip_prefix("metrics on ")
                    .ok_or_else(|| format!("server said {line:?}"))?
                    .to_owned(),
            )
        } else {
            None
        };
        Ok(Self {
            child,
            addr,
            options,
            metrics,
        })
    }

    /// Peak resident memory (VmHWM) of the server process, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// A CA made for this run and a server certificate it signed for 127.0.0.1, as PEM files
/// in a directory that lives as long as this value: no certificate is kept in the
/// repository to expire.
struct BenchPki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl BenchPki {
    fn new() -> Result<Self, String> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let err = |e: rcgen::Error| e.to_string();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?)
            .map_err(err)?;
        let key = KeyPair::generate().map_err(err)?;
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .map_err(err)?
            .signed_by(&key, &ca)
            .map_err(err)?;
        let write = |name: &str, pem: String| -> Result<PathBuf, String> {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", ca.pem())?,
            cert: write("cert.pem", cert.pem())?,
            key: write("key.pem", key.serialize_pem())?,
            _dir: dir,
        })
    }
}

/// A client of `server` on a connection of its own.
async fn client(server: &Server) -> Result<ClientHandle, String> {
    let s = connect(&server.addr, &server.options)
        .await
        .map_err(|e| e.to_string())?;
    Ok(spawn_client(s, ClientConfig::default()))
}

fn job(n: usize, len: usize) -> (JobDesc, Bytes, CacheKey) {
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into(), format!("-DJOB={n}")],
        source_len: Some(len as u64),
        identity: None,
    };
    let src = Bytes::from(vec![(n % 251) as u8; len]);
    let key = CacheKey::compute(&desc, &src);
    (desc, src, key)
}

/// One measured hit cell.
#[derive(Debug, Clone)]
pub struct HitCell {
    /// `tcp`, `tls` or `unix`.
    pub transport: &'static str,
    /// Connections used.
    pub connections: usize,
    /// Jobs in flight in total.
    pub in_flight: usize,
    /// Hits per second.
    pub hits_per_s: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

async fn hit_cell(
    transport: &'static str,
    server: &Server,
    connections: usize,
    in_flight: usize,
    warmed: &Arc<Vec<(JobDesc, Bytes, CacheKey)>>,
    total: usize,
) -> Result<HitCell, String> {
    let mut handles = Vec::new();
    for _ in 0..connections {
        handles.push(client(server).await?);
    }
    let per_task = total / in_flight;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..in_flight {
        let h = handles[t % connections].clone();
        let warmed = warmed.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let (d, s, k) = &warmed[(t * 7919 + i) % warmed.len()];
                let start = Instant::now();
                let o = h.submit(d.clone(), Some(*k), s.clone()).await;
                if !matches!(&o, Ok(o) if o.origin.is_early()) {
                    return Err(format!("expected a hit, got {o:?}"));
                }
                lat.push(start.elapsed());
            }
            Ok(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.map_err(|e| e.to_string())??);
    }
    let elapsed = t0.elapsed();
    lat.sort_unstable();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Ok(HitCell {
        transport,
        connections,
        in_flight,
        hits_per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// Runs every loopback measurement; returns a report for people and one for machines.
pub async fn run() -> Result<(String, String), String> {
    let mut text = String::new();
    let mut json = String::from("{\n  \"hits\": [\n");
    let sock = tempfile::tempdir().map_err(|e| e.to_string())?;
    let unix = format!("unix://{}", sock.path().join("bench.sock").display());
    let _ = writeln!(
        text,
        "hits of 10 KiB jobs (cache warm), 4,000 per cell\n{:<5} {:>5} {:>9} {:>10} {:>8} {:>8}",
        "link", "conns", "in_flight", "hits/s", "p50_ms", "p99_ms"
    );
    let mut cells = Vec::new();
    let pki = BenchPki::new()?;
    for (name, spec, tls) in [
        ("tcp", "tcp://127.0.0.1:0", None),
        ("tls", "tls://127.0.0.1:0", Some(&pki)),
        ("unix", unix.as_str(), None),
    ] {
        let server = Server::start_with(spec, 0, 4, false, tls)?;
        let warm: Arc<Vec<_>> = Arc::new((0..256).map(|n| job(n, 10 * 1024)).collect());
        let c = client(&server).await?;
        for (d, s, k) in warm.iter() {
            c.submit(d.clone(), Some(*k), s.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        for (conns, in_flight) in [(1, 1), (1, 16), (1, 256), (16, 16), (16, 256)] {
            let cell = hit_cell(name, &server, conns, in_flight, &warm, 4000).await?;
            let _ = writeln!(
                text,
                "{:<5} {:>5} {:>9} {:>10.0} {:>8.3} {:>8.3}",
                cell.transport,
                cell.connections,
                cell.in_flight,
                cell.hits_per_s,
                cell.p50_ms,
                cell.p99_ms
            );
            cells.push(cell);
        }
        // Misses: unique 2 MiB sources, 4 in flight on one connection, instant compiles.
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let jobs = 32usize;
        for w in 0..4 {
            let c = c.clone();
            tasks.spawn(async move {
                for i in (w..jobs).step_by(4) {
                    let (d, s, k) = job(10_000 + i, 2 << 20);
                    c.submit(d, Some(k), s).await.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        let mb_s = (jobs * (2 << 20)) as f64 / t0.elapsed().as_secs_f64() / 1e6;
        let _ = writeln!(
            text,
            "{name}: miss upload throughput {mb_s:.0} MB/s (32 x 2 MiB, 4 in flight)"
        );
        let _ = write!(json, "");
        drop(server);
    }
    for (i, c) in cells.iter().enumerate() {
        let _ = writeln!(
            json,
            "    {{\"transport\": \"{}\", \"connections\": {}, \"in_flight\": {}, \"hits_per_s\": {:.0}, \"p50_ms\": {:.4}, \"p99_ms\": {:.4}}}{}",
            c.transport,
            c.connections,
            c.in_flight,
            c.hits_per_s,
            c.p50_ms,
            c.p99_ms,
            if i + 1 == cells.len() { "" } else { "," }
        );
    }
    json.push_str("  ],\n");

    // Memory: 1,000 clients, one connection each, upload a 2 MiB miss at once; compiles
    // take 20 ms on the server's core-count slots, so most uploads wait for a slot.
    // Objects of 2 KiB, so the cache itself stays small and the figure is the uploads'.
    let server = Server::start("tcp://127.0.0.1:0", 20, 1024)?;
    let idle = server.peak_rss();
    let mut handles = Vec::new();
    for _ in 0..1000 {
        handles.push(client(&server).await?);
    }
    let shared = Bytes::from(vec![7u8; 2 << 20]);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, h) in handles.into_iter().enumerate() {
        let src = shared.clone();
        tasks.spawn(async move {
            let desc = JobDesc {
                compiler: "gcc".into(),
                language: "cpp-output".into(),
                args: vec!["-c".into(), format!("-DCLIENT={i}")],
                source_len: Some(src.len() as u64),
                identity: None,
            };
            let key = CacheKey::compute(&desc, &src);
            h.submit(desc, Some(key), src).await.map(|_| ())
        });
    }
    let mut failed = 0;
    let mut first_failure = None;
    let mut peak = 0;
    while let Some(r) = tasks.join_next().await {
        if !matches!(r, Ok(Ok(()))) {
            failed += 1;
            first_failure.get_or_insert_with(|| format!("{r:?}"));
        }
        peak = peak.max(server.peak_rss());
    }
    peak = peak.max(server.peak_rss());
    let _ = writeln!(
        text,
        "1,000 clients x 2 MiB uploads at once: server peak RSS {:.0} MiB (idle {:.0} MiB), {} failed, {:.1} s",
        peak as f64 / (1 << 20) as f64,
        idle as f64 / (1 << 20) as f64,
        failed,
        t0.elapsed().as_secs_f64()
    );
    if let Some(why) = first_failure {
        let _ = writeln!(text, "first failure: {why}");
    }
    let _ = writeln!(
        json,
        "  \"memory\": {{\"clients\": 1000, \"source_bytes\": {}, \"server_peak_rss\": {peak}, \"server_idle_rss\": {idle}, \"failed\": {failed}}}\n}}",
        2 << 20
    );
    Ok((text, json))
}

/// Scrapes `addr`'s `/metrics` every `every` until `stop` turns true; returns how many
/// scrapes succeeded.
async fn scrape_until(
    addr: String,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut done = 0;
    let mut tick = tokio::time::interval(every);
    while !*stop.borrow() {
        tick.tick().await;
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut body = Vec::new();
        if s.read_to_end(&mut body).await.is_ok() && body.starts_with(b"HTTP/1.1 200") {
            done += 1;
        }
    }
    done
}

/// The cost of the metrics endpoint on the hot path: loopback hits per second over TCP
/// (one connection; 1, 16 and 256 in flight) against a server without `--metrics` and
/// one with it, scraped every 100 ms (150 times Prometheus' default rate), alternating
/// `rounds` times so both see the same machine; medians per cell.
pub async fn metrics_cost(rounds: usize) -> Result<String, String> {
    let cells = [1usize, 16, 256];
    // [without, with][cell] -> hits/s of each round
    let mut seen = vec![vec![Vec::new(); cells.len()]; 2];
    let mut p50 = vec![vec![Vec::new(); cells.len()]; 2];
    let mut scrapes = 0;
    let warm: Arc<Vec<_>> = Arc::new((0..256).map(|n| job(n, 10 * 1024)).collect());
    for _ in 0..rounds {
        for (side, with) in [false, true].into_iter().enumerate() {
            let server = Server::start_with("tcp://127.0.0.1:0", 0, 4, with, None)?;
            let c = client(&server).await?;
            for (d, s, k) in warm.iter() {
                c.submit(d.clone(), Some(*k), s.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let scraper = server
                .metrics
                .clone()
                .map(|m| tokio::spawn(scrape_until(m, Duration::from_millis(100), stop_rx)));
            for (i, in_flight) in cells.iter().enumerate() {
                let cell = hit_cell("tcp", &server, 1, *in_flight, &warm, 4000).await?;
                seen[side][i].push(cell.hits_per_s);
                p50[side][i].push(cell.p50_ms);
            }
            let _ = stop_tx.send(true);
            if let Some(s) = scraper {
                scrapes += s.await.map_err(|e| e.to_string())?;
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut text = format!(
        "loopback hits/s, TCP, 1 connection, 4,000 hits per cell, medians of {rounds} alternating rounds ({scrapes} scrapes served)\n\
         {:>9} {:>14} {:>14} {:>7} {:>12} {:>12}\n",
        "in_flight", "without", "with+scrape", "ratio", "p50_ms w/o", "p50_ms with"
    );
    for (i, in_flight) in cells.iter().enumerate() {
        let (a, b) = (median(&mut seen[0][i]), median(&mut seen[1][i]));
        let (pa, pb) = (median(&mut p50[0][i]), median(&mut p50[1][i]));
        text.push_str(&format!(
            "{in_flight:>9} {a:>14.0} {b:>14.0} {:>7.3} {pa:>12.3} {pb:>12.3}\n",
            b / a
        ));
    }
    Ok(text)
}
