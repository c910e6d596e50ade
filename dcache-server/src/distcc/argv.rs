//! A distcc command line as a dcache job description.
//!
//! A stock client sends the command it was given, less the preprocessor options it
//! already applied (`gcc -O2 -c foo.c -o foo.o`). distccd compiles that command with the
//! input and output replaced by temporary files, taking the language from the input's
//! extension. Here the same line becomes the [`JobDesc`] a dcache client would send for
//! the same compile: the compiler mapped onto an allowed name ([`CompilerNames`]), the
//! language from the extension, the input and output dropped, `-c`/`-S` last. The result
//! is then checked by the executor with the same allow-list as every other job
//! (`exec::args`), and its cache key is the one a dcache client computes, so both kinds of
//! client share entries.

use dcache_proto::JobDesc;

use super::names::CompilerNames;

/// Maps a distcc argv (compiler first) onto a job description, or says why it cannot be
/// served (the client then compiles locally).
pub fn job_from_argv(argv: &[String], names: &CompilerNames) -> Result<JobDesc, String> {
    let (compiler, rest) = argv.split_first().ok_or("an empty command line")?;
    let compiler = names.map(compiler)?;
    let mut input: Option<&str> = None;
    let mut mode: Option<&'static str> = None;
    let mut args = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].as_str();
        i += 1;
        match a {
            "-c" | "-S" => {
                let m = if a == "-c" { "-c" } else { "-S" };
                if mode.is_some_and(|old| old != m) {
                    return Err("both -c and -S".into());
                }
                mode = Some(m);
            }
            // The output: the client names its own file, the server's is private.
            "-o" => {
                if i >= rest.len() {
                    return Err("-o without a file".into());
                }
                i += 1;
            }
            _ if a.starts_with("-o") => {}
            // Include search paths mean nothing to preprocessed input (the client strips
            // `-I` itself but passes `-iquote` on).
            "-iquote" => {
                if i >= rest.len() {
                    return Err("-iquote without a directory".into());
                }
                i += 1;
            }
            _ if a.starts_with("-iquote") => {}
            // The stock client appends `-target TRIPLE` to every clang command line; it is
            // clang's older spelling of `--target=TRIPLE`, which the allow-list checks.
            "-target" => {
                let triple = rest.get(i).ok_or("-target without a triple")?;
                i += 1;
                args.push(format!("--target={triple}"));
            }
            "-" => return Err("input from stdin".into()),
            // A second output file distcc cannot carry back: compile it locally.
            "-gsplit-dwarf" => return Err(
                "option \"-gsplit-dwarf\" refused: its .dwo file cannot travel back over distcc"
                    .into(),
            ),
            _ if a.starts_with("-x") => {
                return Err(format!(
                    "option {a:?} refused: the language comes from the input's extension"
                ));
            }
            _ if a.starts_with('-') => args.push(a.to_owned()),
            _ => {
                if input.replace(a).is_some() {
                    return Err("more than one input file".into());
                }
            }
        }
    }
    let input = input.ok_or("no input file")?;
    let language = language_of(input)?;
    let mode = mode.ok_or("neither -c nor -S: the server never links")?;
    args.push(mode.to_owned());
    Ok(JobDesc {
        compiler,
        language: language.into(),
        args,
        source_len: None,
        // Filled in by the front end from the server's own compiler of that name.
        identity: None,
    })
}

/// The preprocessed language of `input`, from its extension as distccd reads it: C and
/// C++ sources (and their preprocessed forms) only.
fn language_of(input: &str) -> Result<&'static str, String> {
    let ext = input
        .rsplit_once('.')
        .map(|(_, e)| e)
        .filter(|e| !e.contains('/'))
        .unwrap_or("");
    match ext {
        "c" | "i" => Ok("cpp-output"),
        "cc" | "cp" | "cxx" | "cpp" | "CPP" | "c++" | "C" | "ii" => Ok("c++-cpp-output"),
        _ => Err(format!(
            "input {input:?}: only C and C++ sources are compiled here"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> CompilerNames {
        // The real compilers of this machine: gcc and g++ are installed wherever the
        // tests run (.ci/run makes sure).
        CompilerNames::resolve(
            &["gcc".to_owned(), "g++".to_owned()],
            "/usr/local/bin:/usr/bin:/bin",
        )
    }

    fn map(argv: &[&str]) -> Result<JobDesc, String> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        job_from_argv(&argv, &names())
    }

    #[test]
    fn a_stock_command_line_becomes_the_job_a_dcache_client_sends() {
        let d = map(&["gcc", "-O2", "-c", "src/foo.c", "-o", "obj/foo.o", "-g"]).unwrap();
        assert_eq!(d.compiler, "gcc");
        assert_eq!(d.language, "cpp-output");
        assert_eq!(d.args, ["-O2", "-g", "-c"]);
        let d = map(&["/usr/bin/g++", "-c", "-std=c++17", "x.cpp", "-ox.o"]).unwrap();
        assert_eq!(
            (d.compiler.as_str(), d.language.as_str()),
            ("g++", "c++-cpp-output")
        );
        assert_eq!(d.args, ["-std=c++17", "-c"]);
        let d = map(&["g++", "-c", "x.cc", "-target", "x86_64-linux-gnu"]).unwrap();
        assert_eq!(d.args, ["--target=x86_64-linux-gnu", "-c"]);
        let d = map(&["gcc", "-S", "x.i", "-iquote", "inc"]).unwrap();
        assert_eq!(d.args, ["-S"]);
        for ext in ["cc", "cxx", "C", "ii", "c++"] {
            assert_eq!(
                map(&["g++", "-c", &format!("a.{ext}")]).unwrap().language,
                "c++-cpp-output"
            );
        }
    }

    #[test]
    fn what_cannot_be_served_is_refused_with_a_reason() {
        for bad in [
            &["gcc", "-c", "a.c", "b.c"][..],
            &["gcc", "a.c", "-o", "a"],
            &["gcc", "-c", "-S", "a.c"],
            &["gcc", "-c", "a.m"],
            &["gcc", "-c", "a.s"],
            &["gcc", "-c", "-x", "c", "a.txt"],
            &["gcc", "-c", "a.c", "-o"],
            &["gcc", "-c", "-"],
            &["gcc", "-c", "-gsplit-dwarf", "a.c"],
            &["/opt/gcc", "-c", "a.c"],
            &["sh", "-c", "a.c"],
            &["gcc", "-c"],
            &["gcc", "-c", "a.c", "-target"],
        ] {
            assert!(map(bad).is_err(), "{bad:?}");
        }
    }
}
