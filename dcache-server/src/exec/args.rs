//! Which compiler arguments a client may send: every argument must match an exact entry
//! of the option tables (the crate-private `exec::options` module), with a value of the
//! shape that entry takes; anything else is refused with an error naming it.
//!
//! This is an allow-list by construction: a new gcc or clang option, or one that was
//! never thought about, is refused until someone adds it to a table. Nothing that names a
//! server path, loads code, runs another program, writes a file where the client chooses
//! or passes options through to an inner tool can be expressed in the tables' value
//! shapes (no value may start with `-`; only prefix maps may contain `/`). `-D` and `-U`
//! are accepted but not passed on: they do nothing to preprocessed input. Exactly one of
//! `-c` and `-S` is required, so a job can never link.

use super::options::{EXACT, F_OPTIONS, G_OPTIONS, M_OPTIONS, O_LEVELS, Value};

/// Most arguments a job may carry.
pub const MAX_ARGS: usize = 1000;
/// Longest single argument.
pub const MAX_ARG_LEN: usize = 4096;
/// Longest value of a word-shaped option.
const MAX_WORD: usize = 256;

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
    let compile = args.iter().any(|a| a == "-c");
    let assemble = args.iter().any(|a| a == "-S");
    if compile == assemble {
        return Err(
            "exactly one of -c (compile to an object) or -S (to assembly) is required: \
             the server never links"
                .into(),
        );
    }
    Ok(())
}

/// The arguments the compiler is given for a checked job: all but `-D`/`-U`, which mean
/// nothing to preprocessed input.
pub fn compiler_args(args: &[String]) -> impl Iterator<Item = &String> {
    args.iter().filter(|a| !is_macro(a))
}

fn is_macro(a: &str) -> bool {
    (a.starts_with("-D") || a.starts_with("-U")) && a.len() > 2
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
    let known = if EXACT.contains(&a) || is_macro(a) {
        true
    } else if let Some(level) = a.strip_prefix("-O") {
        O_LEVELS.contains(&level)
    } else if let Some(std) = a.strip_prefix("-std=") {
        is_word(std) && !std.contains(',')
    } else if let Some(rest) = a.strip_prefix("-g") {
        matches!(rest, "" | "0" | "1" | "2" | "3") || G_OPTIONS.contains(&rest)
    } else if let Some(rest) = a.strip_prefix("-W") {
        if rest.starts_with("l,") || rest.starts_with("a,") || rest.starts_with("p,") {
            return refuse("passes options to the linker, assembler or preprocessor");
        }
        is_warning(rest)
    } else if let Some(rest) = a.strip_prefix("-f") {
        in_table(F_OPTIONS, rest) || rest.strip_prefix("no-builtin-").is_some_and(is_word)
    } else if let Some(rest) = a.strip_prefix("-m") {
        if matches!(rest, "arch=native" | "tune=native" | "cpu=native") {
            return refuse("the server's CPU would decide; compile it locally");
        }
        in_table(M_OPTIONS, rest)
    } else if let Some(rest) = a.strip_prefix("--param=") {
        rest.split_once('=')
            .is_some_and(|(name, value)| is_name(name) && is_word(value))
    } else if let Some(triple) = a.strip_prefix("--target=") {
        is_word(triple)
    } else {
        false
    };
    if known {
        Ok(())
    } else {
        refuse("not on the server's allow-list of compile options")
    }
}

/// `NAME`, `NAME=VALUE`, `no-NAME` against a table: the name must be listed with the
/// shape of what follows it.
fn in_table(table: &[(&str, Value)], rest: &str) -> bool {
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    let listed = |n: &str, want: &dyn Fn(Value) -> bool| {
        table.iter().any(|&(t, shape)| t == n && want(shape))
    };
    match value {
        None => {
            listed(name, &|v| v == Value::None)
                || name
                    .strip_prefix("no-")
                    .is_some_and(|n| listed(n, &|v| v == Value::None))
        }
        // `-fno-sanitize=…` and the like: the negation takes the same value shape.
        Some(value) => [Some(name), name.strip_prefix("no-")]
            .into_iter()
            .flatten()
            .any(|n| listed(n, &|shape| value_fits(shape, value))),
    }
}

fn value_fits(shape: Value, value: &str) -> bool {
    match shape {
        Value::None => false,
        Value::Number => {
            !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit())
        }
        Value::Choice(words) => words.contains(&value),
        Value::Word => is_word(value),
        Value::Mapping => {
            value.contains('=')
                && !value.starts_with('-')
                && !value.chars().any(|c| c.is_control() || c.is_whitespace())
        }
    }
}

/// Letters, digits and `_ . , + : -`, not starting with `-`, at most [`MAX_WORD`] bytes.
fn is_word(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_WORD
        && !v.starts_with('-')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.,+:-".contains(&b))
}

/// An option or parameter name: lower-case letters, digits, `-`, `_`, `+`.
fn is_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_WORD
        && !v.starts_with('-')
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_+".contains(&b))
}

/// A warning option after `-W`: `[no-]NAME[=VALUE]` (including `error=NAME`). Warnings
/// only change what is reported; the pass-through forms (`-Wa,` `-Wl,` `-Wp,`) are the
/// only ones that reach another tool, and a comma can appear in no name.
fn is_warning(rest: &str) -> bool {
    if rest.is_empty() {
        return true; // -W, the old spelling of -Wextra.
    }
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    is_name(name) && value.is_none_or(|v| is_name(v) || is_word(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Result<(), String> {
        check(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// One option checked in an otherwise valid compile.
    fn one(a: &str) -> Result<(), String> {
        ok(&["-c", a])
    }

    #[test]
    fn realistic_compiles_are_accepted() {
        // Debian 12's dpkg-buildflags, CMake's release and debug defaults, Fedora's
        // optimisation flags, a kernel-style build: what real builds send.
        for a in [
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-W",
            "-Werror=format",
            "-Werror=format-security",
            "-Wformat",
            "-Wformat=2",
            "-Wno-error=deprecated-declarations",
            "-std=gnu11",
            "-std=c++20",
            "-std=iso9899:1999",
            "-fPIC",
            "-fno-omit-frame-pointer",
            "-march=x86-64-v2",
            "-mtune=generic",
            "-mno-red-zone",
            "-pthread",
            "-ggdb3",
            "-fstack-protector-strong",
            "-fstack-clash-protection",
            "-fcf-protection",
            "-fcf-protection=full",
            "-Os",
            "-fdiagnostics-color=always",
            "-DNDEBUG",
            "-UFOO",
            "--param=ssp-buffer-size=4",
            "-gsplit-dwarf",
            "-gdwarf-4",
            "-ffile-prefix-map=/build/pkg-1.0=.",
            "-fdebug-prefix-map=/home/me/src=/usr/src",
            "-Wno-unused-parameter",
            "-Wframe-larger-than=4096",
            "-pedantic",
            "-w",
            "-pipe",
            "-mavx2",
            "-O3",
            "-fvisibility=hidden",
            "-fvisibility-inlines-hidden",
            "-fexceptions",
            "-fasynchronous-unwind-tables",
            "-grecord-gcc-switches",
            "-mtls-dialect=gnu2",
            "-mno-omit-leaf-frame-pointer",
            "-fno-strict-aliasing",
            "-fno-builtin-memcpy",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-falign-functions=32:16",
            "-fmax-errors=1",
            "-fno-common",
            "-Wc++11-compat",
            "-ftrivial-auto-var-init=zero",
            "-fzero-call-used-regs=used-gpr",
            // Fedora's and CMake's IPO flags, Debian's hardening assembler flag.
            "-flto",
            "-flto=auto",
            "-ffat-lto-objects",
            "-fno-fat-lto-objects",
            "-Wa,--noexecstack",
        ] {
            one(a).unwrap_or_else(|e| panic!("{a}: {e}"));
        }
        ok(&["-S", "-O2"]).unwrap();
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
            "-mtune=native",
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
            // gcc re-parses the value as more options: the CVE-2004-2687 class.
            "-fcompare-debug=-wrapper /bin/sh,-c,touch /tmp/pwned",
            "-fcompare-debug",
            "-fcompare-debug-second",
            "-fdirectives-only",
            "-fpch-preprocess",
            "-fpreprocessed",
            "-fworking-directory",
            "-fcallgraph-info",
            "-fsyntax-only",
            "-fopt-info",
            "-fsave-optimization-record",
            "-fbranch-probabilities",
            "-frandom-seed=@/etc/shadow",
            "-fdiagnostics-format=json-file",
            "-fdebug-prefix-map=-B/tmp",
            // clang.
            "-mllvm",
            "-Xclang",
            "-foptimization-record-file=/tmp/x",
            "-fproc-stat-report=/tmp/x",
            "-fcrash-diagnostics-dir=/tmp",
            "-fprofile-instr-generate",
            "-fembed-bitcode",
            "-fmodules",
            "-serialize-diagnostics",
            "-gembed-source",
            "--save-temps",
            "-v",
            "-###",
            // Values shaped like paths or options where a word belongs.
            "-march=../../x",
            "-fsanitize=-fplugin=x",
            "-fvisibility=/etc",
            "-std=c11,-B/tmp",
            "-Wframe-larger-than=/x",
            "--param=max-inline=/etc",
            "-fmax-errors=1x",
            "-Wa,--noexecstack,-a=/tmp/x",
            "-Wa,-a=/tmp/x,--noexecstack",
        ] {
            let err = one(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn exactly_one_of_compile_or_assemble() {
        assert!(ok(&["-O2"]).unwrap_err().contains("exactly one"));
        assert!(ok(&["-c", "-S"]).unwrap_err().contains("exactly one"));
        ok(&["-c", "-c"]).unwrap();
    }

    #[test]
    fn macros_are_accepted_but_not_passed_on() {
        let args: Vec<String> = ["-c", "-DX=1", "-UY", "-O2"].map(String::from).into();
        check(&args).unwrap();
        let passed: Vec<&String> = compiler_args(&args).collect();
        assert_eq!(passed, ["-c", "-O2"]);
    }

    #[test]
    fn nul_newlines_and_huge_lists_are_refused() {
        assert!(one("-O2\n-o/etc/x").unwrap_err().contains("line break"));
        assert!(one("-DX\0").unwrap_err().contains("NUL"));
        let many = vec!["-O2"; MAX_ARGS + 1];
        assert!(ok(&many).unwrap_err().contains("exceed"));
        let long = format!("-D{}", "x".repeat(MAX_ARG_LEN));
        assert!(one(&long).unwrap_err().contains("exceeds"));
    }
}
