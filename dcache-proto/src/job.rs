//! What a compile job is and what it produces: the values that travel in JOB and RESULT
//! frames, shared by the client, the server and the cache.

use bytes::Bytes;

use crate::identity::CompilerIdentity;

/// A compile request as the server sees it: everything that decides the output except the
/// source bytes themselves.
///
/// Arguments are already normalized by the client: no input or output paths, no options that
/// only matter locally (dependency files, for instance). The server checks them again against
/// its own allow-list; this type carries them, it does not vouch for them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobDesc {
    /// Compiler name as the client invoked it (`gcc`, `clang++`); the server maps it to one
    /// of its allow-listed binaries, never to a path the client chose.
    pub compiler: String,
    /// Language of the source as given to the compiler with `-x` (`cpp-output`,
    /// `c++-cpp-output`, ...), so the server never guesses from a file name.
    pub language: String,
    /// Normalized compiler arguments, in order.
    pub args: Vec<String>,
    /// Total source length when the client knows it up front. Lets the server refuse an
    /// oversized job before reading it and lets both sides count the bytes an early
    /// result saved.
    pub source_len: Option<u64>,
    /// The identity of the compiler the client would run itself (protocol version 2, flag
    /// `IDENTITY`). A server runs only a compiler with this identity, whatever its name,
    /// and the cache key binds it. `None` (a version-1 client, or one that could not
    /// tell): dcache-server refuses the job, since it cannot know which compiler the
    /// client meant.
    pub identity: Option<CompilerIdentity>,
}

/// One file a compile produced (the object file, and any others such as `.su` or `.dwo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFile {
    /// Name relative to the job: an extension-like label (`.o`), never a path, so the
    /// client decides where it lands.
    pub name: String,
    /// The file's bytes.
    pub data: Bytes,
}

/// Everything the compiler produced for a job, as the client must reproduce it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobResult {
    /// The compiler's exit status (0 on success). A compiler killed by a signal is reported
    /// as `128 + signal`, the shell's convention.
    pub exit_code: i32,
    /// The compiler's standard output, byte for byte.
    pub stdout: Bytes,
    /// The compiler's standard error, byte for byte (warnings and errors).
    pub stderr: Bytes,
    /// The files it wrote.
    pub outputs: Vec<OutputFile>,
}

impl JobResult {
    /// Bytes this result occupies in the body stream of a RESULT frame (stdout, stderr and
    /// every output, concatenated).
    pub fn body_len(&self) -> u64 {
        let outputs: u64 = self.outputs.iter().map(|o| o.data.len() as u64).sum();
        self.stdout.len() as u64 + self.stderr.len() as u64 + outputs
    }
}
