//! Which compiler arguments a client may send: an allow-list of option shapes.
//!
//! Preprocessed input needs only code-generation, warning, language-standard and
//! debug-info options. Anything that names a server path, loads code, runs another
//! program or writes a file where the client chooses (`-o`, `-B`, `-specs=`, `-fplugin`,
//! `-wrapper`, `-Xlinker`, `@file`, `-include`, `-I` …) is refused with an error naming the
//! option. An unknown option is refused too: this is an allow-list, not a deny-list.

/// Most arguments a job may carry.
pub const MAX_ARGS: usize = 1000;
/// Longest single argument.
pub const MAX_ARG_LEN: usize = 4096;

/// `-f` options refused although `-f` is allowed: they load code, write files, or read
/// files named by the client.
const F_REFUSED: &[&str] = &[
    // Load code into the compiler.
    "-fplugin",
    "-fpass-plugin",
    // Read or write profiles, dumps, reports or traces at paths the client names (or
    // next to the output, where nobody collects them).
    "-fprofile",
    "-fauto-profile",
    "-fcreate-profile",
    "-fcs-profile",
    "-fmemory-profile",
    "-fbranch-probabilities",
    "-ftest-coverage",
    "-fcoverage",
    "-fdump",
    "-fopt-info",
    "-fstack-usage",
    "-fcallgraph-info",
    "-fsave-optimization-record",
    "-ftime-trace",
    "-fcrash-diagnostics",
    "-fdiagnostics-format=sarif-file",
    "-fdiagnostics-format=json-file",
    "-fdiagnostics-add-output",
    "-fdiagnostics-set-output",
    "-frandom-seed=@",
    // Read files on the server named by the client.
    "-fsanitize-coverage-allowlist",
    "-fsanitize-coverage-ignorelist",
    "-fsanitize-blacklist",
    "-fsanitize-ignorelist",
    "-fsanitize-system-ignorelist",
    "-fxray",
    "-fmodule",
    "-fprebuilt-module",
    "-fpch",
    // Hand options to other programs (offload compilers) or need the link step.
    "-foffload",
    "-flto",
    "-fworking-directory",
];

/// `-m` options refused: the server's CPU would decide.
const M_REFUSED: &[&str] = &["-march=native", "-mtune=native", "-mcpu=native"];

/// Checks every argument; the error names the first refused one.
pub fn check(args: &[String]) -> Result<(), String> {
    if args.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments exceed the limit of {MAX_ARGS}",
            args.len()
        ));
    }
    for a in args {
        check_one(a)?;
    }
    Ok(())
}

fn check_one(a: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("option {a:?} refused: {why}"));
    if a.len() > MAX_ARG_LEN {
        return Err(format!(
            "an argument of {} bytes exceeds the limit of {MAX_ARG_LEN}",
            a.len()
        ));
    }
    if a.contains(['\0', '\n', '\r']) {
        return Err(format!("argument {a:?} contains a NUL or line break"));
    }
    if a.starts_with("-o") {
        return refuse("the server chooses the output file");
    }
    if a.starts_with("-x") {
        return refuse("the server sets the language from the job description");
    }
    if !a.starts_with('-') {
        return refuse("the server takes no file names (the source comes from the client)");
    }
    const EXACT: &[&str] = &[
        "-c",
        "-S",
        "-w",
        "-pedantic",
        "-pedantic-errors",
        "-ansi",
        "-pipe",
        "-pthread",
        "-g",
        "-p",
        "-pg",
        "-v",
        "-Q",
        "-traditional",
    ];
    if EXACT.contains(&a) {
        return Ok(());
    }
    if let Some(rest) = a.strip_prefix("-W") {
        if rest.starts_with("l,") || rest.starts_with("a,") || rest.starts_with("p,") {
            return refuse("passes options to the linker, assembler or preprocessor");
        }
        return Ok(());
    }
    if a.starts_with("-f") {
        if F_REFUSED.iter().any(|p| a.starts_with(p)) {
            return refuse("loads code or reads or writes files named by the client");
        }
        return Ok(());
    }
    if a.starts_with("-m") {
        if M_REFUSED.contains(&a) {
            return refuse("the server's CPU would decide; compile it locally");
        }
        return Ok(());
    }
    if a.starts_with("-O") || a.starts_with("-std=") || a.starts_with("-g") {
        return Ok(());
    }
    if a.starts_with("--param=") {
        // Tuning knobs (`--param=ssp-buffer-size=4`); only the joined form, so the value
        // cannot be mistaken for another argument.
        return Ok(());
    }
    if a.starts_with("-D") || a.starts_with("-U") {
        // Meaningless on preprocessed input, and harmless.
        return Ok(());
    }
    refuse("not on the server's allow-list of compile options")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Result<(), String> {
        check(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn a_realistic_compile_is_accepted() {
        ok(&[
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror=format",
            "-std=gnu11",
            "-fPIC",
            "-fno-omit-frame-pointer",
            "-march=x86-64-v2",
            "-mno-red-zone",
            "-pthread",
            "-c",
            "-ggdb3",
            "-fstack-protector-strong",
            "-Os",
            "-fdiagnostics-color=always",
            "-DNDEBUG",
            "-UFOO",
            "--param=ssp-buffer-size=4",
            "-gsplit-dwarf",
            "-gdwarf-4",
            "-fno-lto",
            "-ffile-prefix-map=/home/me=.",
            "-Wno-unused-parameter",
            "-Wframe-larger-than=4096",
            "-pedantic",
            "-w",
            "-S",
            "-pipe",
            "-mavx2",
            "-O3",
            "-std=c++20",
        ])
        .unwrap();
    }

    #[test]
    fn dangerous_options_are_refused_by_name() {
        for bad in [
            "-o",
            "-B/tmp",
            "-specs=x",
            "-fplugin=/tmp/x.so",
            "-fplugin-arg-x-y",
            "-wrapper",
            "-Xlinker",
            "-Xassembler",
            "@file",
            "-include",
            "-I/etc",
            "-isystem",
            "-iquote",
            "-Wl,-rpath",
            "-Wa,-a=/tmp/x",
            "-Wp,-MD,/tmp/x",
            "-fprofile-generate",
            "-fdump-tree-all",
            "-march=native",
            "-L/x",
            "-lfoo",
            "--sysroot=/",
            "/etc/passwd",
            "-fstack-usage",
            "-Xpreprocessor",
            "-imacros",
            "-idirafter",
            "-fpass-plugin=/tmp/x.so",
            "-fmodules-cache-path=/etc",
            "-fmodule-map-file=/etc/x",
            "-foffload-options=-B/tmp",
            "-ftime-trace=/etc/x",
            "-fxray-attr-list=/etc/x",
            "-fprofile-use=/etc/x",
            "-fprofile-arcs",
            "-fdump-rtl-expand",
            "-fsanitize-ignorelist=/etc/x",
            "-o/tmp/x",
            "-x",
            "-xc",
            "--param",
            "-dumpbase",
            "-shared",
            "-E",
            "-M",
            "-MF",
            "-save-temps",
        ] {
            let err = ok(&[bad]).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn nul_newlines_and_huge_lists_are_refused() {
        assert!(ok(&["-O2\n-o/etc/x"]).unwrap_err().contains("line break"));
        assert!(ok(&["-DX\0"]).unwrap_err().contains("NUL"));
        let many = vec!["-O2"; MAX_ARGS + 1];
        assert!(ok(&many).unwrap_err().contains("exceed"));
        let long = format!("-D{}", "x".repeat(MAX_ARG_LEN));
        assert!(ok(&[&long]).unwrap_err().contains("exceeds"));
    }
}
