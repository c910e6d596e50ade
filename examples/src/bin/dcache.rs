//! `dcache COMPILER ARGS...`: the compiler wrapper. See `dcache --help`.

use std::ffi::OsString;
use std::process::ExitCode;

use dcache_client::stats::{baseline as stats_baseline, local as stats_file};
use dcache_client::wrapper;
use dcache_examples::util;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    util::init_logging(&std::env::var("DCACHE_LOG").unwrap_or_else(|_| "warn".into()));
    let config = match wrapper::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dcache: {e}");
            return ExitCode::from(2);
        }
    };
    let first = args.first().and_then(|a| a.to_str()).map(str::to_owned);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dcache: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match first.as_deref() {
        None | Some("--help" | "-h") => {
            print!("{}", wrapper::HELP);
            ExitCode::SUCCESS
        }
        Some("--stats") => {
            let json = args.get(1).is_some_and(|a| a == "--json");
            runtime.block_on(print_stats(&config, json))
        }
        Some("--demo") => ExitCode::from(u8::try_from(dcache_examples::demo::run()).unwrap_or(1)),
        Some("--zero-stats") if config.hosts.is_empty() => match stats_file::reset(&config.dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dcache: cannot reset statistics: {e}");
                ExitCode::FAILURE
            }
        },
        Some("--zero-stats") => runtime.block_on(zero_remote(&config)),
        Some(_) => {
            let compiler = args.remove(0);
            let code = runtime.block_on(wrapper::run(&config, compiler, args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

async fn print_stats(config: &wrapper::Config, json: bool) -> ExitCode {
    let sets: Vec<(String, Vec<(String, u64)>)> = if config.hosts.is_empty() {
        let totals = stats_file::totals(&config.dir)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        vec![(format!("local cache {}", config.dir.display()), totals)]
    } else {
        remote_stats(config)
            .await
            .into_iter()
            .map(|(host, stats)| {
                let since = stats_baseline::since_zero(&config.dir, &host, stats);
                (host, since)
            })
            .collect()
    };
    if json {
        // One object: the sum over hosts, plus each host's own counters.
        let mut total: Vec<(String, u64)> = Vec::new();
        for (_, stats) in &sets {
            for (k, v) in stats {
                match total.iter_mut().find(|(n, _)| n == k) {
                    Some((_, t)) => *t += v,
                    None => total.push((k.clone(), *v)),
                }
            }
        }
        let fields: Vec<String> = total.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        println!("{{{}}}", fields.join(", "));
    } else {
        for (name, stats) in &sets {
            println!("{name}");
            for (k, v) in stats {
                println!("  {k:<26} {v}");
            }
        }
    }
    ExitCode::SUCCESS
}

/// Each reachable server's counters; unreachable ones are reported on stderr.
async fn remote_stats(config: &wrapper::Config) -> Vec<(String, Vec<(String, u64)>)> {
    let client = dcache_client::Client::new(config.client_options());
    let mut sets = Vec::new();
    for (host, r) in client.stats().await {
        match r {
            Ok(stats) => sets.push((
                host.to_string(),
                stats.into_iter().map(|s| (s.name, s.value)).collect(),
            )),
            Err(e) => eprintln!("dcache: {host}: {e}"),
        }
    }
    sets
}

/// `--zero-stats` with servers: records their counters now as this client's zero (the
/// servers' own counters are shared by every client and stay as they are).
async fn zero_remote(config: &wrapper::Config) -> ExitCode {
    let sets = remote_stats(config).await;
    if sets.len() < config.hosts.len() {
        eprintln!("dcache: not every server answered; statistics not reset");
        return ExitCode::FAILURE;
    }
    match stats_baseline::save(&config.dir, &sets) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dcache: cannot reset statistics: {e}");
            ExitCode::FAILURE
        }
    }
}
