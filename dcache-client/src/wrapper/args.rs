//! Reading a compiler command line: can it be distributed, and if so, how to split it into
//! a local preprocessor run and a remote compile.
//!
//! The rules are those of distcc, which distcc and ccache users expect: only a `-c` or
//! `-S` compile of one C or C++ source is distributed; `-E`, `-M`/`-MM` alone, linking,
//! several inputs, stdin, `-march=native`, profiling and coverage, `-save-temps` and the
//! like run locally, unchanged. Dependency options (`-MD`, `-MMD`, `-MF`, `-MT`, `-MQ`,
//! `-MP`) go to the local preprocessor, which writes the dependency file exactly where the
//! compiler would.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a command runs locally instead of remotely. Shown with `DCACHE_LOG=debug`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalReason {
    /// No `-c` or `-S`: a link, or a preprocess-only run.
    NotACompile,
    /// `-E`, or `-M`/`-MM` without `-MD`/`-MMD`: output is preprocessor output.
    PreprocessOnly,
    /// Zero or several source files.
    InputCount(usize),
    /// The source is standard input.
    StdinInput,
    /// The output goes to standard output.
    StdoutOutput,
    /// The language is not C or C++ (or could not be told from the file name).
    Language(String),
    /// An option whose effect depends on this machine or writes extra local files.
    LocalOption(String),
    /// An argument is not valid UTF-8 and cannot be sent.
    NotUtf8,
    /// A response file could not be read.
    ResponseFile(String),
}

impl std::fmt::Display for LocalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotACompile => f.write_str("not a -c/-S compile"),
            Self::PreprocessOnly => f.write_str("preprocessing only"),
            Self::InputCount(n) => write!(f, "{n} source files"),
            Self::StdinInput => f.write_str("source on standard input"),
            Self::StdoutOutput => f.write_str("output to standard output"),
            Self::Language(l) => write!(f, "language {l:?} is not distributed"),
            Self::LocalOption(o) => write!(f, "option {o} must run locally"),
            Self::NotUtf8 => f.write_str("an argument is not UTF-8"),
            Self::ResponseFile(e) => write!(f, "response file: {e}"),
        }
    }
}

/// What a compile produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// `-c`: an object file.
    Object,
    /// `-S`: assembly.
    Assembly,
}

/// Source language, as the preprocessor and the remote compiler name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Language {
    /// C.
    C,
    /// C++.
    Cxx,
    /// Assembler the preprocessor runs over first (`.S`, `.sx`, `-x assembler-with-cpp`):
    /// cached like C, its preprocessed text assembled by the server. Plain `.s` is not
    /// preprocessed, so its `.include`s are never resolved here, and it runs locally.
    Asm,
}

impl Language {
    /// The `-x` name of this language's preprocessed form, sent to the server.
    pub fn preprocessed(self) -> &'static str {
        match self {
            Self::C => "cpp-output",
            Self::Cxx => "c++-cpp-output",
            Self::Asm => "assembler",
        }
    }

    /// The `-x` name of the source itself, as the local preprocessor is told it.
    pub fn source(self) -> &'static str {
        match self {
            Self::C => "c",
            Self::Cxx => "c++",
            Self::Asm => "assembler-with-cpp",
        }
    }

    fn from_x(x: &str) -> Option<Self> {
        match x {
            "c" => Some(Self::C),
            "c++" => Some(Self::Cxx),
            "assembler-with-cpp" => Some(Self::Asm),
            _ => None,
        }
    }

    fn from_path(p: &Path) -> Option<Self> {
        match p.extension()?.to_str()? {
            "c" => Some(Self::C),
            "cc" | "cp" | "cxx" | "cpp" | "CPP" | "c++" | "C" => Some(Self::Cxx),
            "S" | "sx" => Some(Self::Asm),
            _ => None,
        }
    }
}

/// A distributable compile, split in two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompilePlan {
    /// The compiler as invoked (`gcc`, `/usr/bin/g++`).
    pub compiler: OsString,
    /// The source file.
    pub input: PathBuf,
    /// Where the output goes.
    pub output: PathBuf,
    /// Object or assembly.
    pub mode: Mode,
    /// The source language.
    pub language: Language,
    /// Arguments for the local preprocessor run (without `-E` and the input, which the
    /// runner adds): every original option except the output and the mode, plus explicit
    /// dependency-file options where the original relied on defaults.
    pub preprocess_args: Vec<OsString>,
    /// Normalized arguments for the remote compile: only options that matter when
    /// compiling preprocessed input; no paths.
    pub compile_args: Vec<String>,
    /// Whether `-g` (or a variant) is on: the object then names the client's directory.
    pub debug: bool,
    /// The dependency file the preprocessor writes (`-MD`/`-MMD`), if any.
    pub dep_file: Option<PathBuf>,
}

/// The verdict on a command line. Exhaustive on purpose: a call is distributed or it is
/// not, and a caller must handle both (new reasons to stay local go in [`LocalReason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Distribute it.
    Remote(CompilePlan),
    /// Run the compiler locally, unchanged.
    Local(LocalReason),
}

/// Options that take a separate argument and only affect preprocessing.
const PREPROCESSOR_WITH_ARG: &[&str] = &[
    "-I",
    "-D",
    "-U",
    "-include",
    "-imacros",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-isysroot",
    "-imultilib",
];
/// Dependency options that take a separate argument (local preprocessor only).
const DEP_WITH_ARG: &[&str] = &["-MF", "-MT", "-MQ"];
/// Options with a separate argument that the compiler ignores when not linking.
const LINK_WITH_ARG: &[&str] = &["-L", "-l", "-Xlinker", "-T", "-u", "-z"];

/// Whether `a` is an option whose value is the next argument, so that argument is not
/// an input (for splitting a command with several sources: [`super::multi`]).
pub(crate) fn takes_separate_value(a: &str) -> bool {
    matches!(a, "-o" | "-x")
        || PREPROCESSOR_WITH_ARG.contains(&a)
        || DEP_WITH_ARG.contains(&a)
        || LINK_WITH_ARG.contains(&a)
}

/// Reads a compiler command line (`args` excludes the compiler itself).
pub fn plan(compiler: &OsString, args: &[OsString]) -> Plan {
    let mut strs = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str() {
            Some(s) => strs.push(s.to_owned()),
            None => return Plan::Local(LocalReason::NotUtf8),
        }
    }
    match plan_str(compiler, &strs) {
        Ok(p) => Plan::Remote(p),
        Err(reason) => Plan::Local(reason),
    }
}

fn local(option: &str) -> LocalReason {
    LocalReason::LocalOption(option.to_owned())
}

fn plan_str(compiler: &OsString, args: &[String]) -> Result<CompilePlan, LocalReason> {
    let mut mode = None;
    let mut output: Option<String> = None;
    let mut inputs: Vec<String> = Vec::new();
    let mut language: Option<Language> = None;
    let mut pre: Vec<OsString> = Vec::new();
    let mut remote: Vec<String> = Vec::new();
    let (mut dep_md, mut dep_m_only, mut has_mf, mut has_mt) = (false, false, false, false);
    let mut mf_path: Option<String> = None;
    let mut debug = false;

    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let following = args.get(i + 1).cloned();
        let next = || following.clone();
        i += 1;
        match a {
            "-c" => mode = Some(Mode::Object),
            "-S" => mode = Some(Mode::Assembly),
            "-E" => return Err(LocalReason::PreprocessOnly),
            "-o" => {
                output = Some(next().ok_or_else(|| local("-o"))?);
                i += 1;
            }
            "-x" => {
                let x = next().ok_or_else(|| local("-x"))?;
                i += 1;
                language = Some(Language::from_x(&x).ok_or(LocalReason::Language(x))?);
            }
            "-" => return Err(LocalReason::StdinInput),
            "-M" | "-MM" => dep_m_only = true,
            "-MD" | "-MMD" => {
                dep_md = true;
                pre.push(a.into());
            }
            "-MP" | "-MG" => pre.push(a.into()),
            _ if DEP_WITH_ARG.contains(&a) => {
                let v = next().ok_or_else(|| local(a))?;
                i += 1;
                has_mf |= a == "-MF";
                has_mt |= a != "-MF";
                if a == "-MF" {
                    mf_path = Some(v.clone());
                }
                pre.push(a.into());
                pre.push(v.into());
            }
            _ if PREPROCESSOR_WITH_ARG.contains(&a) => {
                let v = next().ok_or_else(|| local(a))?;
                i += 1;
                pre.push(a.into());
                pre.push(v.into());
            }
            _ if LINK_WITH_ARG.contains(&a) => {
                next().ok_or_else(|| local(a))?;
                i += 1;
            }
            // `-Wp,-D…`/`-Wp,-U…` (Fedora's _FORTIFY_SOURCE, _GLIBCXX_ASSERTIONS): macros for
            // the local preprocessor only; the compile of preprocessed text needs nothing.
            _ if is_preprocessor_macro_pass(a) => pre.push(a.into()),
            // The few assembler flags every distribution passes, harmless by construction
            // (the server allows exactly these): both runs see them, like any option.
            _ if REMOTE_ASSEMBLER_FLAGS.contains(&a) => {
                pre.push(a.into());
                remote.push(a.to_owned());
            }
            _ if is_local_only(a) => return Err(local(a)),
            _ if a.starts_with("-MF") || a.starts_with("-MT") || a.starts_with("-MQ") => {
                has_mf |= a.starts_with("-MF");
                has_mt |= !a.starts_with("-MF");
                if let Some(p) = a.strip_prefix("-MF") {
                    mf_path = Some(p.to_owned());
                }
                pre.push(a.into());
            }
            _ if a.starts_with("-o") => output = Some(a[2..].to_owned()),
            _ if a.starts_with("-x") => {
                let x = &a[2..];
                language = Some(Language::from_x(x).ok_or(LocalReason::Language(x.into()))?);
            }
            _ if is_preprocessor_joined(a) => pre.push(a.into()),
            _ if is_link_joined(a) => {}
            _ if a.starts_with('-') => {
                // Everything else affects compilation: both runs see it (the preprocessor
                // needs -std, -O and -f options for its predefined macros).
                debug |= is_debug(a);
                pre.push(a.into());
                remote.push(a.to_owned());
            }
            _ => inputs.push(a.to_owned()),
        }
    }
    let mode = match mode {
        Some(m) => m,
        None if dep_m_only => return Err(LocalReason::PreprocessOnly),
        None => return Err(LocalReason::NotACompile),
    };
    if dep_m_only && !dep_md {
        return Err(LocalReason::PreprocessOnly);
    }
    if inputs.len() != 1 {
        return Err(LocalReason::InputCount(inputs.len()));
    }
    let input = PathBuf::from(&inputs[0]);
    let language = match language.or_else(|| Language::from_path(&input)) {
        Some(l) => l,
        None => {
            let ext = input
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(LocalReason::Language(ext));
        }
    };
    if language == Language::Asm {
        // `-S` of an assembler source is only its preprocessing; and with `-g` the
        // assembler names its own directory in the debug info (no line marker carries
        // the client's, as cpp gives C), so the server's object would differ.
        if mode == Mode::Assembly {
            return Err(local("-S (of an assembler source)"));
        }
        if debug {
            return Err(local("-g (of an assembler source)"));
        }
    }
    let output = match output {
        Some(o) if o == "-" => return Err(LocalReason::StdoutOutput),
        Some(o) => PathBuf::from(o),
        // The compiler's default: the source's base name in the current directory.
        None => PathBuf::from(input.file_name().unwrap_or_default()).with_extension(match mode {
            Mode::Object => "o",
            Mode::Assembly => "s",
        }),
    };
    let mut dep_file = None;
    if dep_md {
        // Make the dependency file's name and target explicit: the preprocessor runs
        // without -o, so it cannot derive them from the output as the compiler would.
        if !has_mf {
            let d = output.with_extension("d");
            pre.push("-MF".into());
            pre.push(d.clone().into_os_string());
            mf_path = Some(d.to_string_lossy().into_owned());
        }
        dep_file = mf_path.map(PathBuf::from);
        if !has_mt {
            pre.push("-MQ".into());
            pre.push(output.clone().into_os_string());
        }
    }
    if matches!(mode, Mode::Assembly) {
        remote.push("-S".into());
    } else {
        remote.push("-c".into());
    }
    Ok(CompilePlan {
        compiler: compiler.clone(),
        input,
        output,
        mode,
        language,
        preprocess_args: pre,
        compile_args: remote,
        debug,
        dep_file,
    })
}

/// Assembler flags sent to the server as they are (exactly these; any other `-Wa,` runs
/// locally): `--noexecstack` marks the object's stack non-executable (Debian's and CMake's
/// hardening, zstd's build).
const REMOTE_ASSEMBLER_FLAGS: &[&str] = &["-Wa,--noexecstack"];

/// `-Wp,` carrying only `-D`/`-U` macro definitions (comma-separated, as gcc splits them).
fn is_preprocessor_macro_pass(a: &str) -> bool {
    a.strip_prefix("-Wp,").is_some_and(|rest| {
        rest.split(',')
            .all(|p| (p.starts_with("-D") || p.starts_with("-U")) && p.len() > 2)
    })
}

/// Options that must run locally: their result depends on this machine, they write files
/// beside the output, or they change which programs the compiler runs.
fn is_local_only(a: &str) -> bool {
    const EXACT: &[&str] = &[
        "-save-temps",
        "--coverage",
        "-ftest-coverage",
        "-fprofile-arcs",
        "-fbranch-probabilities",
        "-pipe-local",
        "-frepo",
        "-fsyntax-only",
        "-wrapper",
        "-specs",
        "-B",
        "-Xclang",
        "-Xassembler",
        "-Xpreprocessor",
        "-fplugin",
        "-aux-info",
        "-fdump-final-insns",
        "-gsplit-dwarf",
        "-fstack-usage",
        "-fcallgraph-info",
    ];
    const PREFIX: &[&str] = &[
        "-march=native",
        "-mtune=native",
        "-mcpu=native",
        "-save-temps=",
        "-fprofile-",
        "-fauto-profile",
        "-fcreate-profile",
        "-fuse-profile",
        "-fplugin=",
        "-fplugin-arg-",
        "-specs=",
        "-B",
        "-Wa,",
        "-Wp,",
        "-fdump-",
        "-fopt-info",
        // LTO objects compiled remotely carry the server's working directory in their IR
        // (seen with -frandom-seed fixed: they differ from the same text compiled here),
        // so they stay local until that is taken care of.
        "-flto",
        "@",
        "--sysroot",
        "-fcoverage-",
        "-fsanitize-coverage",
        "-fdiagnostics-format",
        "-fdiagnostics-sarif",
        "-fsave-optimization-record",
    ];
    EXACT.contains(&a) || PREFIX.iter().any(|p| a.starts_with(p))
}

fn is_preprocessor_joined(a: &str) -> bool {
    const PREFIX: &[&str] = &[
        "-I",
        "-D",
        "-U",
        "-isystem",
        "-iquote",
        "-idirafter",
        "-include",
        "-imacros",
        "-nostdinc",
        "-undef",
        "-H",
        "-C",
        "-CC",
        "-P",
        "-trigraphs",
        "-traditional-cpp",
    ];
    PREFIX.iter().any(|p| a.starts_with(p)) || a == "-MD" || a == "-MMD"
}

fn is_link_joined(a: &str) -> bool {
    a.starts_with("-L")
        || a.starts_with("-l")
        || a.starts_with("-Wl,")
        || matches!(
            a,
            "-static" | "-shared" | "-rdynamic" | "-pie" | "-no-pie" | "-s" | "-pthread-link"
        )
}

fn is_debug(a: &str) -> bool {
    a.starts_with("-g") && a != "-g0"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cmd: &str) -> Plan {
        let args: Vec<OsString> = cmd.split_whitespace().map(OsString::from).collect();
        plan(&OsString::from("gcc"), &args)
    }

    fn remote(cmd: &str) -> CompilePlan {
        match p(cmd) {
            Plan::Remote(c) => c,
            Plan::Local(r) => panic!("{cmd:?} ran locally: {r}"),
        }
    }

    #[test]
    fn a_plain_compile_is_distributed_with_paths_stripped() {
        let c = remote("-c src/foo.c -o obj/foo.o -O2 -Iinc -DX=1 -Wall -g");
        assert_eq!(c.input, PathBuf::from("src/foo.c"));
        assert_eq!(c.output, PathBuf::from("obj/foo.o"));
        assert_eq!(c.language, Language::C);
        assert_eq!(c.compile_args, ["-O2", "-Wall", "-g", "-c"]);
        assert!(c.debug);
        let pre: Vec<_> = c
            .preprocess_args
            .iter()
            .map(|a| a.to_str().unwrap())
            .collect();
        assert_eq!(pre, ["-O2", "-Iinc", "-DX=1", "-Wall", "-g"]);
    }

    #[test]
    fn default_output_is_the_base_name_in_the_current_directory() {
        assert_eq!(remote("-c a/b/x.cpp").output, PathBuf::from("x.o"));
        assert_eq!(remote("-S a/x.c").output, PathBuf::from("x.s"));
        assert_eq!(remote("-S a/x.c").compile_args, ["-S"]);
        assert_eq!(remote("-c a/b/x.cpp").language, Language::Cxx);
    }

    #[test]
    fn dependency_options_stay_local_and_get_explicit_names() {
        let c = remote("-c foo.c -o out/foo.o -MD");
        let pre: Vec<_> = c
            .preprocess_args
            .iter()
            .map(|a| a.to_str().unwrap())
            .collect();
        assert_eq!(pre, ["-MD", "-MF", "out/foo.d", "-MQ", "out/foo.o"]);
        assert_eq!(c.dep_file, Some(PathBuf::from("out/foo.d")));
        assert_eq!(c.compile_args, ["-c"]);
        let c = remote("-c foo.c -MMD -MF deps/x.d -MT tgt -MP");
        let pre: Vec<_> = c
            .preprocess_args
            .iter()
            .map(|a| a.to_str().unwrap())
            .collect();
        assert_eq!(pre, ["-MMD", "-MF", "deps/x.d", "-MT", "tgt", "-MP"]);
    }

    #[test]
    fn what_distcc_keeps_local_stays_local() {
        for cmd in [
            "foo.c -o foo",
            "-E foo.c",
            "-M foo.c",
            "-MM -c foo.c",
            "-c a.c b.c",
            "-c -",
            "-c foo.c -o -",
            "-c foo.c -march=native",
            "-c foo.c -fprofile-generate",
            "-c foo.c --coverage",
            "-c foo.c -save-temps",
            "-c foo.s",
            "-c foo.f90",
            "-c -x assembler foo.c",
            "-c foo.c -fplugin=x.so",
            "-c foo.c -specs=x",
            "-c foo.c -B/tmp",
            "-c foo.c -Wa,-adhln",
            "-c foo.c -Wa,--noexecstack,-adhln",
            "-c foo.c -Wp,-MD,foo.d",
            "-c foo.c -flto=auto",
            "-c foo.c -gsplit-dwarf",
        ] {
            assert!(matches!(p(cmd), Plan::Local(_)), "{cmd:?} was distributed");
        }
    }

    #[test]
    fn link_only_options_are_dropped_from_a_compile() {
        let c = remote("-c foo.c -lm -L/opt/lib -Wl,-O1 -pthread");
        assert_eq!(c.compile_args, ["-pthread", "-c"]);
    }

    #[test]
    fn explicit_language_wins_over_the_extension() {
        assert_eq!(remote("-x c++ -c foo.c").language, Language::Cxx);
        assert_eq!(remote("-xc -c foo.inc").language, Language::C);
    }

    #[test]
    fn distribution_and_build_system_flags_are_distributed() {
        // Debian 12's `dpkg-buildflags` CFLAGS and CPPFLAGS (hardening on), as a package
        // build passes them.
        let debian = "-g -O2 -ffile-prefix-map=/build/pkg-1.0=. -fstack-protector-strong \
                      -fstack-clash-protection -Wformat -Werror=format-security \
                      -fcf-protection -Wdate-time -D_FORTIFY_SOURCE=2";
        let c = remote(&format!("-c foo.c -o foo.o {debian}"));
        assert!(
            c.compile_args
                .contains(&"-ffile-prefix-map=/build/pkg-1.0=.".to_owned())
        );
        // Fedora's optimisation flags (less the -specs= files and -flto=auto, which run
        // locally).
        let fedora = "-O2 -fexceptions -g -grecord-gcc-switches \
                      -pipe -Wall -Werror=format-security \
                      -Wp,-U_FORTIFY_SOURCE,-D_FORTIFY_SOURCE=3 -Wp,-D_GLIBCXX_ASSERTIONS \
                      -fstack-protector-strong -m64 -march=x86-64 -mtune=generic \
                      -fasynchronous-unwind-tables -fstack-clash-protection -fcf-protection \
                      -mtls-dialect=gnu2 -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer";
        let c = remote(&format!("-c foo.c {fedora}"));
        // Macro passes go to the local preprocessor only.
        assert!(!c.compile_args.iter().any(|a| a.starts_with("-Wp,")));
        assert!(
            c.preprocess_args
                .iter()
                .any(|a| a == "-Wp,-U_FORTIFY_SOURCE,-D_FORTIFY_SOURCE=3")
        );
        // zstd's CMake build, and other shapes real builds use.
        for extra in [
            "-Wa,--noexecstack",
            "--param=ssp-buffer-size=4",
            "-fdebug-prefix-map=/src=.",
            "-fmacro-prefix-map=/src=.",
        ] {
            let c = remote(&format!("-c foo.c -O3 -DNDEBUG -fPIC {extra}"));
            assert!(c.compile_args.contains(&extra.to_owned()), "{extra}");
        }
    }
}
