//! Model-based test: random sequences of operations on a client/server pair, checked
//! against a reference model of what every job must end with.
//!
//! The model is deliberately simple: it knows what each job's result must be (the
//! reference compile of its description and source), which jobs were cancelled, and which
//! results were already in the server's cache when a job was submitted. The state machines
//! must agree with it whatever the strategy, link, interleaving and delivery splits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcache_proto::Connection;
use dcache_proto::testing::{Pair, reference_compile};
use dcache_proto::{ClientConfig, ClientEvent, JobDesc, JobId, ServerConfig, Strategy as Plan};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Submit job `desc` (one of 3) with source `src` (one of 4; source 3 fails to compile).
    Submit { desc: u8, src: u8 },
    /// Look job `desc` with source `src` up by its key, without sending the source.
    Lookup { desc: u8, src: u8 },
    /// Cancel the n-th submitted job (mod count).
    Cancel(usize),
    /// Let virtual time pass.
    Advance(u16),
    /// Run until quiet.
    Run,
    /// Ask for stats.
    Stats,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..4).prop_map(|(desc, src)| Op::Submit { desc, src }),
        2 => (0u8..3, 0u8..4).prop_map(|(desc, src)| Op::Lookup { desc, src }),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (0u16..50).prop_map(Op::Advance),
        2 => Just(Op::Run),
        1 => Just(Op::Stats),
    ]
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Plan> {
    prop_oneof![
        Just(Plan::Speculative),
        Just(Plan::AskFirst),
        Just(Plan::SendAll)
    ]
}

fn make_desc(n: u8) -> JobDesc {
    JobDesc {
        compiler: "cc".into(),
        language: "cpp-output".into(),
        args: vec![format!("-O{n}")],
        source_len: Some(0),
        identity: None,
    }
}

fn make_source(n: u8) -> Bytes {
    if n == 3 {
        return Bytes::from_static(b"#error model\n");
    }
    Bytes::from(vec![n; 20_000 * (n as usize + 1)])
}

struct Expect {
    desc: JobDesc,
    src: Bytes,
    cancelled: bool,
    cached_at_submit: bool,
    lookup: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pair_agrees_with_the_model(
        strat in strategy(),
        latency_ms in 0u64..20,
        bandwidth in prop_oneof![Just(0u64), Just(1_000_000u64), Just(100_000_000u64)],
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut p = Pair::new(
            ClientConfig { strategy: strat, ..ClientConfig::default() },
            ServerConfig::default(),
            Duration::from_millis(latency_ms),
            bandwidth,
            seed,
            Instant::now(),
        );
        let mut expect: BTreeMap<JobId, Expect> = BTreeMap::new();
        let mut order: Vec<JobId> = Vec::new();
        // What the model says the server has cached: successful (desc, source) pairs whose
        // Done event the client has seen.
        let mut cached: HashSet<(u8, u8)> = HashSet::new();
        let mut keys: BTreeMap<JobId, (u8, u8)> = BTreeMap::new();
        let mut seen = 0;
        let mut stats_asked = 0;
        for op in ops {
            match op {
                Op::Submit { desc, src } | Op::Lookup { desc, src } => {
                    let lookup = matches!(op, Op::Lookup { .. });
                    let mut d = make_desc(desc);
                    let s = make_source(src);
                    d.source_len = Some(s.len() as u64);
                    let job = if lookup {
                        p.lookup(d.clone(), &s)
                    } else {
                        p.submit(d.clone(), s.clone())
                    };
                    let job = job.expect("client accepts jobs");
                    expect.insert(job, Expect {
                        desc: d,
                        src: s,
                        cancelled: false,
                        cached_at_submit: cached.contains(&(desc, src)),
                        lookup,
                    });
                    keys.insert(job, (desc, src));
                    order.push(job);
                }
                Op::Cancel(n) => {
                    if !order.is_empty() {
                        let job = order[n % order.len()];
                        let ended = p.job_end(job).is_some();
                        if p.client.cancel(job).is_ok() {
                            prop_assert!(!ended, "cancel accepted for an ended job");
                            if let Some(e) = expect.get_mut(&job) {
                                e.cancelled = true;
                            }
                        }
                    }
                }
                Op::Advance(ms) => p.advance(Duration::from_millis(u64::from(ms))),
                Op::Run => { p.run(200_000); }
                Op::Stats => {
                    p.client.request_stats().unwrap();
                    stats_asked += 1;
                }
            }
            // Learn from new Done events what the server has cached now.
            for (_, e) in &p.client_events[seen..] {
                if let ClientEvent::Done { job, outcome } = e {
                    if outcome.result.exit_code == 0 {
                        cached.insert(keys[job]);
                    }
                }
            }
            seen = p.client_events.len();
        }
        prop_assert!(p.run(1_000_000), "pair did not go quiet");

        // Every job ended exactly as the model says.
        for (job, e) in &expect {
            let ends: Vec<_> = p.client_events.iter().filter(|(_, ev)| matches!(ev,
                ClientEvent::Done { job: j, .. } | ClientEvent::Failed { job: j, .. }
                | ClientEvent::NotCached { job: j } if j == job
            )).collect();
            prop_assert!(ends.len() <= 1, "{job} ended twice");
            match ends.first().map(|(_, ev)| ev) {
                None => prop_assert!(e.cancelled, "{job} never ended"),
                Some(ClientEvent::NotCached { .. }) => {
                    prop_assert!(e.lookup, "{job}: NotCached for a job that was not a lookup");
                    prop_assert!(!e.cached_at_submit, "{job} was cached but not found");
                }
                Some(ClientEvent::Done { outcome, .. }) if e.lookup => {
                    prop_assert_eq!(&outcome.result, &reference_compile(&e.desc, &e.src));
                    prop_assert!(outcome.origin.is_early(), "{job}: a lookup's result is early");
                    prop_assert_eq!(outcome.source_bytes_sent, 0);
                    prop_assert_eq!(outcome.key, Some(dcache_proto::CacheKey::compute(&e.desc, &e.src)));
                }
                Some(ClientEvent::Done { outcome, .. }) => {
                    prop_assert_eq!(&outcome.result, &reference_compile(&e.desc, &e.src));
                    prop_assert_eq!(outcome.key.is_some(), strat != Plan::SendAll);
                    if e.cached_at_submit && strat != Plan::SendAll && !e.cancelled {
                        prop_assert!(outcome.origin.is_early(), "{job} was cached but not answered early");
                    }
                    if strat == Plan::SendAll {
                        prop_assert!(!outcome.origin.is_early());
                        prop_assert_eq!(outcome.source_bytes_sent, e.src.len() as u64);
                    }
                    if strat == Plan::AskFirst && outcome.origin.is_early() {
                        prop_assert_eq!(outcome.source_bytes_sent, 0);
                    }
                    prop_assert_eq!(
                        outcome.source_bytes_sent + outcome.source_bytes_skipped,
                        e.src.len() as u64
                    );
                }
                Some(ClientEvent::Failed { code, .. }) => {
                    prop_assert!(false, "{job} failed with {code} though nothing was wrong");
                }
                Some(_) => unreachable!(),
            }
            if e.cancelled {
                prop_assert!(ends.is_empty() || p.job_end(*job).is_some());
            }
        }
        // Nothing is left open on either side, and the connection survived.
        prop_assert_eq!(p.client.jobs_open(), 0);
        prop_assert_eq!(p.server.jobs_open(), 0);
        prop_assert!(!p.client.is_closed());
        let stats = p.client_events.iter().filter(|(_, e)| matches!(e, ClientEvent::Stats(_))).count();
        prop_assert_eq!(stats, stats_asked);
        // The server compiled each distinct successful input at most as often as jobs
        // reached it without a hit, and never cached a failure.
        prop_assert!(p.app.cache.values().all(|r| r.exit_code == 0));
    }
}
