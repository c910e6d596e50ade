//! `/metrics`: the service's counters in the Prometheus text exposition format
//! (OpenMetrics flavour, as `prometheus-client` writes it), read at scrape time.
//!
//! Names follow Prometheus conventions: a `dcache_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters, and labels whose values come from fixed
//! sets (front end, outcome, tier, error kind, limit), never from a peer.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::Service;
use crate::counters::{ErrorKind, Front, HistogramSnapshot, Outcome, SandboxLimit};

/// The whole exposition for `service` in the OpenMetrics text format, served on
/// `/metrics` to a scraper that asks for it (Prometheus does).
pub fn render(service: &Arc<Service>) -> String {
    let mut registry = Registry::with_prefix("dcache");
    registry.register_collector(Box::new(ServiceCollector(service.clone())));
    let mut out = String::with_capacity(16 << 10);
    // Writing into a String cannot fail, and every value encodes.
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// The same exposition in the classic Prometheus text format (0.0.4), served to a
/// scraper that does not ask for OpenMetrics (curl, older tools, `promtool check
/// metrics`). The two differ only in framing: in OpenMetrics a counter family is named
/// without its `_total` suffix and may carry `# UNIT`, and the text ends with `# EOF`;
/// the classic format names the family as its samples are named and has neither line.
pub fn render_classic(service: &Arc<Service>) -> String {
    to_classic(&render(service))
}

/// Rewrites an OpenMetrics text as prometheus-client writes it (HELP, TYPE, then
/// samples, per family) into the classic format.
fn to_classic(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Reads the service's counters on each scrape.
struct ServiceCollector(Arc<Service>);

impl fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceCollector")
    }
}

/// One metric family being written.
struct Family<'a> {
    encoder: prometheus_client::encoding::MetricEncoder<'a>,
    kind: MetricType,
}

impl Family<'_> {
    /// A sample with `labels`.
    fn sample(&mut self, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
        let enc = self.encoder.encode_family(labels)?;
        write_value(enc, self.kind, value)
    }
}

fn write_value(
    enc: prometheus_client::encoding::MetricEncoder<'_>,
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(enc),
        _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(enc),
    }
}

/// Starts a family (for labelled samples).
fn family<'a>(
    e: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
    kind: MetricType,
) -> Result<Family<'a>, fmt::Error> {
    let encoder = e.encode_descriptor(name, help, unit, kind)?;
    Ok(Family { encoder, kind })
}

/// A family of one unlabelled sample.
fn single(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    let enc = e.encode_descriptor(name, help, unit, kind)?;
    write_value(enc, kind, value)
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> fmt::Result {
    let mut enc = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    // prometheus-client wants per-bucket counts and accumulates them itself.
    let mut previous = 0;
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|(bound, cumulative)| {
            let own = cumulative.saturating_sub(previous);
            previous = *cumulative;
            // prometheus-client writes `+Inf` for f64::MAX.
            let bound = if bound.is_finite() { *bound } else { f64::MAX };
            (bound, own)
        })
        .collect();
    enc.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_seconds,
        h.count,
        &buckets,
        None,
    )
}

impl Collector for ServiceCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let service = &self.0;
        let c = service.counters();
        let bytes = Unit::Bytes;

        let mut f = family(
            &mut e,
            "jobs",
            "Jobs by front end and outcome (early answers are also hits; failed compiles are also misses)",
            None,
            Counter,
        )?;
        for front in Front::ALL {
            for outcome in Outcome::ALL {
                f.sample(
                    &[("front", front.label()), ("outcome", outcome.label())],
                    c.jobs.get(front, outcome),
                )?;
            }
        }
        histogram(
            &mut e,
            "hit_latency",
            "Time from a lookup's start to its hit being answered",
            &c.hit_latency.snapshot(),
        )?;
        histogram(
            &mut e,
            "compile_duration",
            "Time a compile took, from its start to its result",
            &c.compile_duration.snapshot(),
        )?;
        let counter = |e: &mut DescriptorEncoder<'_>, name: &str, help: &str, unit, v| {
            single(e, name, help, unit, Counter, v)
        };
        let relaxed =
            |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        counter(
            &mut e,
            "compiles",
            "Compiler runs",
            None,
            relaxed(&c.compiles),
        )?;
        counter(
            &mut e,
            "source_received",
            "Source bytes received",
            Some(&bytes),
            relaxed(&c.source_bytes_received),
        )?;
        counter(
            &mut e,
            "source_saved",
            "Declared source bytes clients did not send because the early reply came first",
            Some(&bytes),
            relaxed(&c.source_bytes_saved),
        )?;
        counter(
            &mut e,
            "single_flight_joins",
            "Jobs that waited for an identical compile in flight instead of compiling",
            None,
            relaxed(&c.single_flight_waits),
        )?;
        counter(
            &mut e,
            "slow_uploads_ended",
            "Jobs ended because their upload stalled while holding a compile slot",
            None,
            relaxed(&c.slow_uploads_ended),
        )?;
        counter(
            &mut e,
            "hash_mismatches",
            "Jobs whose HASH did not match the source received",
            None,
            relaxed(&c.hash_mismatches),
        )?;
        counter(
            &mut e,
            "store_write_failures",
            "Results that could not be stored (the result was still returned)",
            None,
            relaxed(&c.store_errors),
        )?;

        let slots = service.compile_slots();
        let gauge = |e: &mut DescriptorEncoder<'_>, name: &str, help: &str, unit, v: u64| {
            single(e, name, help, unit, Gauge, v)
        };
        gauge(
            &mut e,
            "compile_slots",
            "Compile slots in all",
            None,
            slots.total as u64,
        )?;
        gauge(
            &mut e,
            "compile_slots_busy",
            "Compile slots in use",
            None,
            slots.busy as u64,
        )?;
        gauge(
            &mut e,
            "compile_queue_depth",
            "Jobs whose source is complete, waiting for a compile slot",
            None,
            slots.queued as u64,
        )?;
        let (in_memory, on_disk) = service.waiting_source_bytes();
        let mut f = family(
            &mut e,
            "waiting_source",
            "Source bytes of jobs waiting for a compile slot, by where they are kept",
            Some(&bytes),
            Gauge,
        )?;
        f.sample(&[("place", "memory")], in_memory)?;
        f.sample(&[("place", "disk")], on_disk)?;

        let tiers = service.tier_stats();
        let per_tier = |e: &mut DescriptorEncoder<'_>,
                        name: &str,
                        help: &str,
                        unit: Option<&Unit>,
                        kind: MetricType,
                        get: &dyn Fn(&crate::store::TierStats) -> u64|
         -> fmt::Result {
            let mut f = family(e, name, help, unit, kind)?;
            for t in &tiers {
                f.sample(&[("tier", t.name)], get(t))?;
            }
            Ok(())
        };
        per_tier(
            &mut e,
            "store_entries",
            "Entries held, by tier (0 for a shared tier)",
            None,
            Gauge,
            &|t| t.entries,
        )?;
        per_tier(
            &mut e,
            "store",
            "Bytes held, by tier (0 for a shared tier)",
            Some(&bytes),
            Gauge,
            &|t| t.bytes,
        )?;
        per_tier(
            &mut e,
            "store_limit",
            "Size limit, by tier (0: none of its own)",
            Some(&bytes),
            Gauge,
            &|t| t.limit,
        )?;
        per_tier(
            &mut e,
            "store_evictions",
            "Entries evicted to stay under the limit, by tier",
            None,
            Counter,
            &|t| t.evictions,
        )?;
        let mut f = family(
            &mut e,
            "store_lookups",
            "Lookups that reached a tier, by tier and result",
            None,
            Counter,
        )?;
        for t in &tiers {
            f.sample(&[("tier", t.name), ("result", "hit")], t.hits)?;
            f.sample(&[("tier", t.name), ("result", "miss")], t.misses)?;
        }
        per_tier(
            &mut e,
            "store_errors",
            "Tier operations that failed (I/O, unreachable, too slow)",
            None,
            Counter,
            &|t| t.errors,
        )?;
        per_tier(
            &mut e,
            "store_refused",
            "Entries refused by verification and dropped, by tier",
            None,
            Counter,
            &|t| t.refused,
        )?;
        per_tier(
            &mut e,
            "store_read",
            "Bytes of verified entries read, by tier",
            Some(&bytes),
            Counter,
            &|t| t.bytes_read,
        )?;
        per_tier(
            &mut e,
            "store_written",
            "Bytes of entries written, by tier",
            Some(&bytes),
            Counter,
            &|t| t.bytes_written,
        )?;

        gauge(
            &mut e,
            "connections_open",
            "Connections being served (distcc requests each hold one in-process connection)",
            None,
            service.open_connections() as u64,
        )?;
        counter(
            &mut e,
            "connections_accepted",
            "Connections accepted",
            None,
            relaxed(&c.connections),
        )?;
        counter(
            &mut e,
            "connections_refused",
            "Connections refused at once (address, per-address cap, handshake pool)",
            None,
            relaxed(&c.connections_refused),
        )?;
        let mut f = family(
            &mut e,
            "connection_errors",
            "Connections ended by an error, by kind",
            None,
            Counter,
        )?;
        for kind in ErrorKind::ALL {
            f.sample(&[("code", kind.label())], c.connection_errors.get(kind))?;
        }
        let mut f = family(
            &mut e,
            "sandbox_refusals",
            "Compiles stopped by a sandbox limit, by limit",
            None,
            Counter,
        )?;
        for limit in SandboxLimit::ALL {
            f.sample(&[("limit", limit.label())], c.sandbox_limits.get(limit))?;
        }
        counter(
            &mut e,
            "distcc_connections",
            "Connections accepted from distcc clients",
            None,
            relaxed(&c.distcc_connections),
        )?;
        counter(
            &mut e,
            "distcc_errors",
            "distcc connections ended by a malformed, oversized, truncated or stalled request",
            None,
            relaxed(&c.distcc_errors),
        )?;
        counter(
            &mut e,
            "distcc_refused",
            "distcc requests closed unanswered so that the client compiles locally",
            None,
            relaxed(&c.distcc_refused),
        )?;

        let version = env!("CARGO_PKG_VERSION");
        let min = dcache_proto::VERSION_MIN.to_string();
        let max = dcache_proto::VERSION_MAX.to_string();
        let mut f = family(
            &mut e,
            "build_info",
            "Always 1: the server's version and the protocol versions it speaks",
            None,
            Gauge,
        )?;
        f.sample(
            &[
                ("version", version),
                ("protocol_min", min.as_str()),
                ("protocol_max", max.as_str()),
            ],
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_names_the_counter_family_as_its_samples_and_drops_openmetrics_lines() {
        let om = "# HELP dcache_jobs Jobs.\n# TYPE dcache_jobs counter\n\
                  dcache_jobs_total{a=\"b\"} 1\n\
                  # HELP dcache_x_seconds X.\n# TYPE dcache_x_seconds histogram\n\
                  # UNIT dcache_x_seconds seconds\ndcache_x_seconds_count 0\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP dcache_jobs_total Jobs.\n# TYPE dcache_jobs_total counter\n\
             dcache_jobs_total{a=\"b\"} 1\n\
             # HELP dcache_x_seconds X.\n# TYPE dcache_x_seconds histogram\n\
             dcache_x_seconds_count 0\n"
        );
    }
}
