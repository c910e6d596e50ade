//! A build tool that embeds dcache: compiles a list of C files to objects through
//! [`dcache_client::Client`], against the servers given or an in-process one.
//!
//! ```text
//! cargo run -p dcache-examples --example build_list -- [--server ADDR]... [--cache DIR] FILE.c...
//! ```
//!
//! Each `FILE.c` becomes `FILE.o`, as `gcc -c FILE.c -o FILE.o` would make it: the
//! wrapper's planner reads that command line, the source is preprocessed here, its
//! preprocessed text sent, and the object written atomically. Without `--server` the jobs
//! go to the embedded back end (the server library in this process over `mem://`, with a
//! disk cache in `--cache`), so a second run of the same list is all cache hits. This is
//! the wrapper's flow without its fallbacks; a real tool would compile locally where
//! this one reports an error.

use std::error::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use dcache_client::wrapper::args::{Plan, plan};
use dcache_client::wrapper::local::{preprocess, write_atomically};
use dcache_client::wrapper::{Backend, Config, identity};
use dcache_proto::{CompilerIdentity, JobDesc};
use dcache_transport::Address;

/// What happened to one file.
#[derive(Debug)]
struct Built {
    object: PathBuf,
    cached: bool,
}

/// Compiles every file of `files` with `compiler` through `config`'s back end.
async fn build(
    config: &Config,
    compiler: &str,
    files: &[PathBuf],
) -> Result<Vec<Built>, Box<dyn Error>> {
    // Which compiler a server must run for these jobs: the one `compiler` names here.
    let identity = identity::of(config, compiler.as_ref())
        .ok_or_else(|| format!("cannot identify the compiler {compiler}"))?;
    let backend = Backend::start(config, compiler.as_ref()).await?;
    let mut built = Vec::new();
    let mut failure = None;
    for file in files {
        match build_one(backend.client(), compiler, &identity, file).await {
            Ok(b) => built.push(b),
            Err(e) => {
                failure = Some(format!("{}: {e}", file.display()));
                break;
            }
        }
    }
    // Always finished, so the embedded server's results are stored before we return.
    backend.finish(config).await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(built),
    }
}

async fn build_one(
    client: &dcache_client::Client,
    compiler: &str,
    identity: &CompilerIdentity,
    file: &Path,
) -> Result<Built, Box<dyn Error>> {
    let object = file.with_extension("o");
    let args: Vec<OsString> = vec!["-c".into(), file.into(), "-o".into(), object.clone().into()];
    let plan = match plan(&compiler.into(), &args) {
        Plan::Remote(p) => p,
        Plan::Local(reason) => return Err(format!("not distributable: {reason}").into()),
    };
    let pre = preprocess(&plan)?;
    let desc = JobDesc {
        compiler: compiler.to_owned(),
        language: plan.language.preprocessed().into(),
        args: plan.compile_args.clone(),
        source_len: Some(pre.source.len() as u64),
        identity: Some(identity.clone()),
    };
    let outcome = client.compile(desc, Bytes::from(pre.source)).await?;
    let result = &outcome.job.result;
    if result.exit_code != 0 {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned().into());
    }
    let obj = result
        .outputs
        .first()
        .ok_or("the server returned no object")?;
    write_atomically(&plan.output, &obj.data)?;
    Ok(Built {
        object: plan.output.clone(),
        cached: outcome.job.origin.is_cached(),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut hosts = Vec::new();
    let mut cache = std::env::temp_dir().join("dcache-build-list");
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--server" => hosts.push(
                args.next()
                    .ok_or("--server needs an address")?
                    .parse::<Address>()?,
            ),
            "--cache" => cache = args.next().ok_or("--cache needs a directory")?.into(),
            _ => files.push(PathBuf::from(a)),
        }
    }
    if files.is_empty() {
        return Err("usage: build_list [--server ADDR]... [--cache DIR] FILE.c...".into());
    }
    let mut config = Config::new(cache);
    config.hosts = hosts;
    for b in build(&config, "gcc", &files).await? {
        let how = if b.cached { "cached" } else { "compiled" };
        println!("{how:>8} {}", b.object.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_list_compiles_cold_then_comes_back_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|n| {
                let f = dir.path().join(format!("{n}.c"));
                std::fs::write(&f, format!("int {n}(int x) {{ return x * 3; }}\n")).unwrap();
                f
            })
            .collect();
        let config = Config::new(dir.path().join("cache"));
        let cold = build(&config, "gcc", &files).await.unwrap();
        assert!(cold.iter().all(|b| !b.cached), "{cold:?}");
        let first = std::fs::read(&cold[0].object).unwrap();
        assert_eq!(&first[..4], b"\x7fELF");
        std::fs::remove_file(&cold[0].object).unwrap();
        let warm = build(&config, "gcc", &files).await.unwrap();
        assert!(warm.iter().all(|b| b.cached), "{warm:?}");
        assert_eq!(std::fs::read(&warm[0].object).unwrap(), first);
        // A file that does not compile is reported, not written.
        let bad = dir.path().join("bad.c");
        std::fs::write(&bad, "int f( {\n").unwrap();
        assert!(build(&config, "gcc", &[bad]).await.is_err());
        assert!(!dir.path().join("bad.o").exists());
    }
}
