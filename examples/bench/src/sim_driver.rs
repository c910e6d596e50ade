//! The strategy simulation through the real stack: `dcache-transport`'s client driver and
//! simulated link, and `dcache-server`'s `Service` with the stand-in compiler, on a paused
//! tokio clock.
//!
//! tokio's timer resolves whole milliseconds, so every duration is stretched a thousandfold
//! (latency ×1000, bandwidth ÷1000, compile time ×1000) and results are divided back: one
//! virtual millisecond is one microsecond of the scenario.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dcache_proto::{CacheKey, ClientConfig, JobDesc, Strategy};
use dcache_server::exec::FakeExecutor;
use dcache_server::store::MemoryStore;
use dcache_server::{Service, ServiceConfig};
use dcache_transport::sim::{LinkConfig, symmetric};
use dcache_transport::spawn_client;

use crate::sim::{COMPILE_TIME, Cell};

/// The time stretch.
const DILATION: u32 = 1000;

/// Runs one cell through the drivers and the service.
pub fn run_cell(
    strategy: Strategy,
    rtt: Duration,
    bandwidth_bps: u64,
    source_len: usize,
    hit: bool,
) -> Result<Cell, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let bytes_per_s = bandwidth_bps / 8;
        // The send buffer never limits throughput: at least the bandwidth-delay product.
        let bdp = (bytes_per_s as f64 * rtt.as_secs_f64()) as usize;
        // Delivered in TCP-sized segments, so the HASH at the front of a write is readable
        // as soon as its packet lands, as on a real link.
        let link = LinkConfig::new(rtt / 2 * DILATION, bytes_per_s / u64::from(DILATION))
            .with_buffer((bdp + 64 * 1024).max(256 * 1024))
            .with_segment(1460);
        let (client_end, server_end) = symmetric(link);
        let mut config = ServiceConfig::default();
        // Timeouts stretched with everything else.
        config.protocol.handshake_timeout *= DILATION;
        config.protocol.stall_timeout *= DILATION;
        config.protocol.idle_timeout *= DILATION;
        config.upload_check_interval *= DILATION;
        let service = Service::new(
            Arc::new(MemoryStore::new(1 << 30)),
            Arc::new(FakeExecutor::new(COMPILE_TIME * DILATION)),
            config,
        );
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = service.clone();
        tokio::spawn(async move {
            server
                .handle_connection(Box::new(server_end), stop_rx)
                .await
        });
        let client = spawn_client(
            client_end,
            ClientConfig {
                strategy,
                handshake_timeout: Duration::from_secs(10) * DILATION,
                ..ClientConfig::default()
            },
        );
        let desc = JobDesc {
            compiler: "gcc".into(),
            language: "cpp-output".into(),
            args: vec!["-O2".into(), "-c".into()],
            source_len: Some(source_len as u64),
            identity: None,
        };
        let src = Bytes::from(
            (0..source_len)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let key = CacheKey::compute(&desc, &src);
        if hit {
            // Warm the cache with a HASH-less upload of the same job.
            client
                .submit_with(desc.clone(), key, Strategy::SendAll, src.clone())
                .await
                .map_err(|e| e.to_string())?;
            // Let the store finish and the link drain before measuring.
            tokio::time::sleep(Duration::from_secs(5) * DILATION).await;
        }
        let t0 = tokio::time::Instant::now();
        let outcome = client
            .submit(desc, Some(key), src)
            .await
            .map_err(|e| e.to_string())?;
        let time = (tokio::time::Instant::now() - t0) / DILATION;
        let result_bytes = outcome.result.body_len();
        let b = bytes_per_s as f64;
        let r = rtt.as_secs_f64();
        let limit = if hit {
            r + result_bytes as f64 / b
        } else {
            r + source_len as f64 / b + COMPILE_TIME.as_secs_f64() + result_bytes as f64 / b
        };
        Ok(Cell {
            strategy,
            rtt_ms: r * 1000.0,
            bandwidth_bps,
            source_bytes: source_len as u64,
            outcome: if hit { "hit" } else { "miss" },
            time_s: time.as_secs_f64(),
            limit_s: limit,
            wasted_bytes: if hit { outcome.source_bytes_sent } else { 0 },
            result_bytes,
        })
    })
}

/// Every cell of the matrix, through the drivers.
pub fn run_matrix() -> Result<Vec<Cell>, String> {
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
                        )?);
                    }
                }
            }
        }
    }
    Ok(cells)
}
