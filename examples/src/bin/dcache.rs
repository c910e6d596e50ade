//! `dcache COMPILER ARGS...`: the compiler wrapper. See `dcache --help`.
//!
//! A thin main: the wrapper is `dcache_client::wrapper` (with the `embedded` feature),
//! the statistics `dcache_client::stats`.

use std::ffi::OsString;
use std::process::ExitCode;

use dcache_client::{stats, wrapper};
use dcache_examples::util;

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first().and_then(|a| a.to_str()).map(str::to_owned);
    if first.as_deref() == Some("--version") {
        println!("dcache {}", env!("CARGO_PKG_VERSION"));
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
            for e in &config.host_errors {
                eprintln!("dcache: DCACHE_HOSTS: {e}; skipping it");
            }
            let json = args.get(1).is_some_and(|a| a == "--json");
            let report = runtime.block_on(stats::gather(&config));
            for (host, e) in &report.unreachable {
                eprintln!("dcache: {host}: {e}");
            }
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
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
            let compiler = args.remove(0);
            let code = runtime.block_on(wrapper::run(&config, compiler, args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
