//! `dcache COMPILER ARGS...`: the compiler wrapper. See `dcache --help`.
//!
//! A thin main: the wrapper is `dcache_client::wrapper` (with the `embedded` feature),
//! the statistics `dcache_client::stats`, the local cache's upkeep
//! `dcache_client::cache_admin`.

use std::ffi::OsString;
use std::process::ExitCode;

use dcache_client::{cache_admin, stats, wrapper};
use dcache_examples::{outln, outp, util};

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first().and_then(|a| a.to_str()).map(str::to_owned);
    if first.as_deref() == Some("--version") {
        outln!("dcache {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let config = match wrapper::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dcache: {e}");
            return ExitCode::from(2);
        }
    };
    util::init_logging(&config.log);
    if first.as_deref() == Some(wrapper::daemon::DAEMON_OPTION) {
        // The local daemon (hidden: started by the wrapper itself), before any runtime.
        return ExitCode::from(u8::try_from(wrapper::daemon::serve(&config)).unwrap_or(1));
    }
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
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if let Some(name) = wrapper::masquerade::invoked_as(&argv0) {
        // Invoked through a link named after a compiler: every argument is the
        // compiler's, and the compiler is the next one on PATH that is not dcache.
        let compiler = match wrapper::masquerade::resolve(&name) {
            Ok(c) => c.into_os_string(),
            Err(e) => return fail(&e),
        };
        if wrapper::masquerade::nested() {
            let code = wrapper::local::run_locally(&compiler, &args).unwrap_or(1);
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        return compile(&runtime, &config, compiler, args);
    }
    match first.as_deref() {
        None | Some("--help" | "-h") => {
            outp!("{}", wrapper::HELP);
            ExitCode::SUCCESS
        }
        Some("--stats") => {
            for e in &config.host_errors {
                eprintln!("dcache: DCACHE_HOSTS: {e}; skipping it");
            }
            let json = args.get(1).is_some_and(|a| a == "--json");
            let report = runtime.block_on(stats::gather(&config));
            for (host, e) in &report.unreachable {
                eprintln!("dcache: {host}: {e}");
            }
            if json {
                outln!("{}", report.to_json());
            } else {
                outp!("{}", report.to_text());
                outp!("{}", runtime.block_on(daemon_stats(&config)));
            }
            ExitCode::SUCCESS
        }
        Some("--stop-daemon") => {
            let (stopped, gone) =
                wrapper::daemon::stop_all(&config, std::time::Duration::from_secs(10));
            for d in &stopped {
                let pid = d.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
                outln!("dcache: stopping daemon {} (pid {pid})", d.fingerprint);
            }
            if stopped.is_empty() {
                outln!("dcache: no daemon running for {}", config.dir.display());
            }
            if gone {
                ExitCode::SUCCESS
            } else {
                eprintln!("dcache: a daemon is still finishing its jobs");
                ExitCode::FAILURE
            }
        }
        Some("--show-stats" | "-s") => {
            // The counters, then how full the local cache is.
            let json = args.get(1).is_some_and(|a| a == "--json");
            let report = runtime.block_on(stats::gather(&config));
            for (host, e) in &report.unreachable {
                eprintln!("dcache: {host}: {e}");
            }
            match cache_admin::report(&config) {
                Ok(cache) if json => util::out(&format!(
                    "{{\"counters\": {}, \"cache\": {}}}\n",
                    report.to_json(),
                    cache.to_json()
                )),
                Ok(cache) => util::out(&format!("{}{}", report.to_text(), cache.to_text())),
                Err(e) => return fail(&e),
            }
            ExitCode::SUCCESS
        }
        Some("--clear" | "-C") => {
            // The daemon's memory tier would go on serving what is cleared.
            wrapper::daemon::stop_all(&config, std::time::Duration::from_secs(10));
            match cache_admin::clear(&config) {
                Ok(c) => {
                    outln!(
                        "dcache: removed {} results and {} manifests",
                        c.entries,
                        c.manifests
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Some(opt @ ("--max-size" | "-M")) => match args.get(1).and_then(|a| a.to_str()) {
            Some(value) => match cache_admin::set_max_size(&config.dir, value) {
                Ok(limit) => {
                    outln!(
                        "dcache: max size {} set in {}",
                        cache_admin::format_size(limit),
                        wrapper::config_file::path(&config.dir).display()
                    );
                    if std::env::var_os("DCACHE_CACHE_SIZE").is_some_and(|v| !v.is_empty()) {
                        eprintln!("dcache: note: DCACHE_CACHE_SIZE is set and overrides it");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            },
            None => {
                eprintln!("dcache: {opt} needs a size (e.g. 10G, 512M)");
                ExitCode::from(2)
            }
        },
        Some("--show-config" | "-p") => {
            let settings = cache_admin::show_config(&config, |n| std::env::var(n).ok());
            util::out(&cache_admin::settings_text(&settings));
            ExitCode::SUCCESS
        }
        Some("--demo") => ExitCode::from(u8::try_from(dcache_examples::demo::run()).unwrap_or(1)),
        Some("--zero-stats") => match runtime.block_on(stats::zero(&config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if let stats::ZeroError::Unanswered(hosts) = &e {
                    for (host, why) in hosts {
                        eprintln!("dcache: {host}: {why}");
                    }
                }
                eprintln!("dcache: {e}");
                ExitCode::FAILURE
            }
        },
        // An option here is a mistyped or unknown dcache option, never a compiler name.
        Some(option) if option.starts_with('-') => {
            eprintln!("dcache: unknown option {option} (dcache --help lists them)");
            ExitCode::from(2)
        }
        Some(_) => {
            // `dcache gcc` where that gcc is a masquerading link: the one after it.
            let compiler = wrapper::masquerade::skip_self(args.remove(0));
            compile(&runtime, &config, compiler, args)
        }
    }
}

/// The running daemons' own counters since they started (already part of the local
/// cache's totals above, which every process adds to): for `dcache --stats`.
async fn daemon_stats(config: &wrapper::Config) -> String {
    let mut text = String::new();
    for d in wrapper::daemon::status(config) {
        let layout = wrapper::daemon::Layout {
            dir: config.dir.join("daemon"),
            fingerprint: d.fingerprint.clone(),
        };
        let addr = dcache_transport::Address::Unix(layout.socket());
        let pid = d.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        text.push_str(&format!("daemon {addr} (pid {pid}), since it started\n"));
        let client = dcache_client::Client::new(dcache_client::ClientOptions::new(vec![addr]));
        for (_, r) in client.stats().await {
            match r {
                Ok(stats) => {
                    for s in stats.into_iter().filter(|s| s.value != 0) {
                        text.push_str(&format!("  {:<26} {}\n", s.name, s.value));
                    }
                }
                Err(e) => text.push_str(&format!("  unreachable: {e}\n")),
            }
        }
    }
    text
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("dcache: {e}");
    ExitCode::FAILURE
}

/// One compiler command: split into one compile per source when it has several (each
/// run by this very program, in parallel), else the wrapper's flow.
fn compile(
    runtime: &tokio::runtime::Runtime,
    config: &wrapper::Config,
    compiler: OsString,
    args: Vec<OsString>,
) -> ExitCode {
    if let (Some(jobs), Ok(exe)) = (
        wrapper::multi::split(&compiler, &args),
        std::env::current_exe(),
    ) {
        let parallel = wrapper::multi::default_parallelism();
        if let Some(code) = wrapper::multi::run_split(&exe, &compiler, &jobs, parallel) {
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
    }
    let code = runtime.block_on(wrapper::run(config, compiler, args));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
