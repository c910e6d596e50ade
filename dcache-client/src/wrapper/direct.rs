//! Direct mode: finding a compile's cache key without running the preprocessor, as
//! ccache's direct mode does.
//!
//! The preprocessor is the most expensive thing a warm build still runs. Its output is a
//! function of the command line, the working directory, a few environment variables, the
//! compiler, the source file and every file it includes. The first time a compile runs,
//! the wrapper records a *manifest entry* under a [`DirectKey`] of everything but the
//! included files: the list of files the preprocessor read (from its line markers) with a
//! hash of each, and the cache key the preprocessed source had. Next time, if every listed
//! file still hashes the same, the preprocessed source would be the same, so its cache key
//! is known without preprocessing, and the server is asked for that key directly.
//!
//! What keeps this safe:
//! - a source, header or command line that uses `__DATE__`, `__TIME__` or `__TIMESTAMP__`
//!   is never recorded (its output changes with the clock);
//! - every header lookup is recorded with the entry ([`super::lookups`]): the path each
//!   name would have in every directory searched for it, and whether a file is there, so
//!   a header created earlier on the search path (shadowing the recorded one), removed
//!   or renamed, and any `__has_include` answer changing, invalidates the entry;
//! - `-P` (no line markers, so no list of files) turns direct mode off;
//! - a file that may have changed after the compile started is not recorded (it might
//!   have changed between preprocessing and hashing): one whose modification or
//!   status-change time is within its timestamps' granularity of the start
//!   (`Stamp::margin`), a tenth of a second where the filesystem keeps nanoseconds;
//! - a symlink on the way to an included file that changed as recently blocks recording,
//!   like a changed file (a switched `inc -> inc_v2` link during the compile would
//!   otherwise pair the old text's key with the new files);
//! - names with escapes in the line markers are not recorded (they are not decoded);
//! - a stale entry only costs a lookup: the server is asked for a key, and a miss falls
//!   back to preprocessing as usual.
//!
//! Known limit: a directory renamed during the very compile that records an entry is not
//! detected.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dcache_proto::CacheKey;

use super::file_id::{self, FileId, LocalFilesystems};
use super::include_dirs::SearchDirs;
use super::lookups::{self, Probe, Prober};

/// Words that make a compile's output depend on something no file hash captures: the
/// clock (`__DATE__`, `__TIME__`, `__TIMESTAMP__`).
const UNRECORDABLE: [&[u8]; 3] = [b"__DATE__", b"__TIME__", b"__TIMESTAMP__"];

/// In command-line arguments, `__has_include` too: a lookup in a `-D` value is not
/// scanned for its header name (the files' texts are, see [`super::lookups`]).
const UNRECORDABLE_ARG: &[u8] = b"__has_include";

/// Environment variables that change what the preprocessor reads or writes, or what the
/// compiler prints.
pub(crate) const ENV: [&str; 19] = [
    // gcc names the working directory by $PWD when it is the same directory (-g).
    "PWD",
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "GCC_EXEC_PREFIX",
    "COMPILER_PATH",
    "SOURCE_DATE_EPOCH",
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    // How gcc lays out and colours diagnostics (an entry can replay them exactly).
    "COLUMNS",
    "GCC_COLORS",
    "GCC_URLS",
    "TERM_URLS",
];

/// The stored form's first bytes; version 2 added lookups and depend mode, version 3 the
/// replayed diagnostics (an older manifest reads as none, and is recorded again).
const MAGIC: &[u8; 4] = b"DCM4";

/// Most entries one manifest keeps (one per distinct set of header contents seen).
const MAX_ENTRIES: usize = 16;

/// How far a file's timestamp may lag the moment it changed, where the filesystem keeps
/// nanoseconds. The kernel stamps files from its coarse clock, which can trail the clock
/// a compile's start is read from by one scheduler tick (4 ms at the usual 250 Hz, 10 ms
/// at the slowest 100 Hz); a tenth of a second is ten times the worst. CMake's configure
/// step touches the status of every file it generates (`config.h`), so a build that
/// starts half a second after it must still be recorded.
const FINE_MARGIN: Duration = Duration::from_millis(100);

/// The same where timestamps are whole seconds (their nanoseconds are zero): a change up
/// to a second after the stamp shows the same stamp, and FAT's times are even seconds.
const WHOLE_SECOND_MARGIN: Duration = Duration::from_secs(2);

/// Whether `path` may have changed after `started`, so that no entry could be recorded
/// for a compile reading it. Depend mode asks this of the source first: a file just saved
/// then takes the preprocessor's way, which is cached by content, rather than a compile
/// that could not be recorded at all.
pub fn too_new_to_record(path: &Path, started: SystemTime) -> bool {
    changed_at(path).is_none_or(|changed| changed >= started)
}

/// The key of everything a compile's preprocessed source depends on, except the contents
/// of the files it includes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectKey(pub [u8; 32]);

/// What a direct key is computed from.
#[derive(Debug)]
pub struct Invocation<'a> {
    /// The compiler as invoked (`gcc`, `/usr/bin/gcc`); resolved on `PATH` here.
    pub compiler: &'a OsString,
    /// The whole command line after the compiler, as given.
    pub args: &'a [OsString],
    /// What the compile job will carry as its arguments (with any colour option added).
    pub compile_args: &'a [String],
    /// The working directory.
    pub cwd: &'a Path,
    /// The source file's contents.
    pub source: &'a [u8],
    /// `DCACHE_BASEDIR`, which changes the preprocessed text the key stands for.
    pub base_dir: Option<&'a Path>,
}

impl DirectKey {
    /// The key of `inv`, or `None` when direct mode must not be used: the compiler cannot
    /// be found, the source or the command line uses a clock macro (or the command line
    /// `__has_include`), `-P` leaves the preprocessor's output without line markers, or
    /// `-I-` changes how the includer's directory is searched.
    pub fn compute(inv: &Invocation<'_>) -> Option<Self> {
        if unrecordable(inv.source)
            || inv.args.iter().any(|a| {
                let b = a.as_encoded_bytes();
                a == "-P"
                    || a == "-I-"
                    || unrecordable(b)
                    || memchr::memmem::find(b, UNRECORDABLE_ARG).is_some()
            })
        {
            return None;
        }
        let compiler = resolve(inv.compiler)?;
        let meta = std::fs::metadata(&compiler).ok()?;
        let mut h = blake3::Hasher::new_derive_key("dcache 2026-11 direct-mode key v1");
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(compiler.as_os_str().as_encoded_bytes());
        field(&meta.len().to_be_bytes());
        field(&meta.mtime().to_be_bytes());
        field(&meta.mtime_nsec().to_be_bytes());
        field(&(inv.args.len() as u64).to_be_bytes());
        for a in inv.args {
            field(a.as_encoded_bytes());
        }
        field(&(inv.compile_args.len() as u64).to_be_bytes());
        for a in inv.compile_args {
            field(a.as_bytes());
        }
        field(inv.cwd.as_os_str().as_encoded_bytes());
        match inv.base_dir {
            Some(b) => {
                field(b"base");
                field(b.as_os_str().as_encoded_bytes());
            }
            None => field(b"no base"),
        }
        for name in ENV {
            match std::env::var_os(name) {
                Some(v) => {
                    field(b"set");
                    field(v.as_encoded_bytes());
                }
                None => field(b"unset"),
            }
        }
        field(blake3::hash(inv.source).as_bytes());
        Some(Self(*h.finalize().as_bytes()))
    }
}

/// The compiler's path: as given when it names one, else the first match on `PATH`.
pub(crate) fn resolve(compiler: &OsString) -> Option<PathBuf> {
    let given = Path::new(compiler);
    if given.components().count() > 1 {
        return given.canonicalize().ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(given))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

fn unrecordable(text: &[u8]) -> bool {
    UNRECORDABLE
        .iter()
        .any(|m| memchr::memmem::find(text, m).is_some())
}

/// The read size of [`hash_file`]: larger than almost every header, so one read takes a
/// whole file.
const HASH_BUFFER: usize = 1 << 18;

/// The digest of the file at `path` (as `blake3::hash` of its contents), read through
/// `buf`; `None` when it cannot be read.
///
/// Three system calls for a file that fits in `buf` (open, read, close), against five
/// for `std::fs::read` (which also asks the size and reads once more to see the end):
/// a warm hit hashes every header the compile read, about a hundred. A read returning
/// less than asked is taken as the end of the file, which is what Linux does for regular
/// files; were a read ever short before the end, the digest would differ from the
/// recorded one and the lookup would miss, never hit wrongly.
fn hash_file(path: &Path, buf: &mut [u8]) -> Option<[u8; 32]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    loop {
        let n = match file.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        hasher.update(&buf[..n]);
        if n < buf.len() {
            return Some(*hasher.finalize().as_bytes());
        }
    }
}

/// The latest moment `path`, or any symlink on the way to it, may last have changed:
/// its newest timestamp plus that timestamp's margin (`Stamp::margin`). A compile that
/// started after it read what is there now.
pub(crate) fn changed_at(path: &Path) -> Option<SystemTime> {
    changed_at_from(path, &std::fs::metadata(path).ok()?)
}

/// [`changed_at`], with `meta` the file's own metadata (`stat` of `path`) already in hand.
fn changed_at_from(path: &Path, meta: &std::fs::Metadata) -> Option<SystemTime> {
    let mut latest = Stamp::of(meta).latest_change()?;
    let mut prefix = PathBuf::new();
    for c in path.components() {
        prefix.push(c);
        if let Ok(m) = std::fs::symlink_metadata(&prefix) {
            if m.file_type().is_symlink() {
                latest = latest.max(Stamp::of(&m).latest_change()?);
            }
        }
    }
    Some(latest)
}

/// A file's modification and status-change times, as seconds and nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// How long after its stamp a change may really have happened: whole-second stamps
    /// (both nanosecond fields zero: ext3, FAT, some network filesystems) hide two
    /// seconds; nanosecond ones only the kernel's clock tick.
    fn margin(&self) -> Duration {
        if self.modified.1 == 0 && self.changed.1 == 0 {
            WHOLE_SECOND_MARGIN
        } else {
            FINE_MARGIN
        }
    }

    /// The later of the two times, to the nanosecond, plus the margin. The status-change
    /// time counts too: a copy that keeps the old modification time (`cp -p`, `rsync`,
    /// `tar`) still changes it.
    fn latest_change(&self) -> Option<SystemTime> {
        let at = |(secs, nanos): (i64, i64)| -> Option<SystemTime> {
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                u64::try_from(secs).ok()?,
                u32::try_from(nanos).ok()?,
            ))
        };
        at(self.modified)?
            .max(at(self.changed)?)
            .checked_add(self.margin())
    }
}

/// One way the included files were, and the key the result then had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The cache key of the result: of the preprocessed source, or for an entry recorded
    /// by depend mode ([`depend`](Self::depend)), of the files below.
    pub key: CacheKey,
    /// The dependency file the compile wrote (`-MD`), to write again on a hit.
    pub dep_file: Option<Vec<u8>>,
    /// Every file the preprocessor read, with the BLAKE3 hash of its contents.
    pub files: Vec<(PathBuf, [u8; 32])>,
    /// What each of [`files`](Self::files) was when it was hashed, by the same index (as
    /// long as `files`): a lookup that finds a file still so takes its recorded hash
    /// without reading it (see [`super::file_id`]). A file with `None` here (or, in an
    /// entry built by hand, none at all) is read and hashed.
    pub seen: Vec<Option<FileId>>,
    /// Every candidate path of every header lookup, and what was there (see
    /// [`super::lookups`]).
    pub probes: Vec<(PathBuf, Probe)>,
    /// Recorded by depend mode: the result was compiled here from the original source,
    /// and only the local cache can have it.
    pub depend: bool,
    /// What the compiler printed on stderr when this compile ran here, replayed on a
    /// direct hit instead of the result's own diagnostics. Recorded when those are not
    /// exact (a remote server quotes no source lines and names other paths), so a result
    /// with warnings is a hit with gcc's very bytes rather than a local compile every
    /// time. It is a function of what the direct key binds (command line, directory,
    /// locale and layout variables, compiler) and of the files and lookups above.
    pub stderr: Option<Vec<u8>>,
}

/// What an entry is recorded from, besides its key and dependency file.
#[derive(Debug)]
pub struct Sources<'a> {
    /// The source file as the compiler was given it.
    pub main: &'a Path,
    /// Every file the compile read (the source among them), as the compiler named them.
    pub files: Vec<PathBuf>,
    /// Where the preprocessor searched for headers.
    pub dirs: &'a SearchDirs,
    /// `-include` and `-imacros` names.
    pub forced: &'a [String],
    /// When the compile started.
    pub started: SystemTime,
}

impl Entry {
    /// The entry for a compile that just ran, from what it read (`src`), hashed now.
    /// `None` when it must not be recorded: no files, a file (or a symlink on its path,
    /// or an existing lookup candidate) that may have changed after `started` (see
    /// `changed_at`), a clock macro in a file, or a lookup that cannot be known (see
    /// [`lookups::scan`]).
    pub fn record(
        key: CacheKey,
        dep_file: Option<Vec<u8>>,
        src: Sources<'_>,
        depend: bool,
    ) -> Option<Self> {
        if src.files.is_empty() {
            return None;
        }
        let mut texts = Vec::with_capacity(src.files.len());
        let mut seen = Vec::with_capacity(src.files.len());
        for path in &src.files {
            // Read first, then checked with one `stat`: unchanged from the compile's
            // start until then, so the text is what the compile read and what `seen`
            // (from the same `stat`) describes.
            let text = std::fs::read(path).ok()?;
            let meta = std::fs::metadata(path).ok()?;
            if changed_at_from(path, &meta)? >= src.started {
                return None;
            }
            if unrecordable(&text) {
                return None;
            }
            texts.push(text);
            seen.push(FileId::of(&meta));
        }
        let read: Vec<lookups::Read<'_>> = src
            .files
            .iter()
            .zip(&texts)
            .map(|(path, text)| lookups::Read { path, text })
            .collect();
        let candidates = lookups::candidates(src.main, &read, src.dirs, src.forced)?;
        let probes = lookups::record(candidates, src.started)?;
        let files = src
            .files
            .iter()
            .zip(&texts)
            .map(|(p, t)| (p.clone(), *blake3::hash(t).as_bytes()))
            .collect();
        Some(Self {
            key,
            dep_file,
            files,
            seen,
            probes,
            depend,
            stderr: None,
        })
    }

    /// The key a depend-mode result is stored under: everything the direct key covers,
    /// and every file read with its hash and every lookup with its answer, so two
    /// compiles that read different files never share a result.
    pub fn depend_key(
        dk: &DirectKey,
        files: &[(PathBuf, [u8; 32])],
        probes: &[(PathBuf, Probe)],
    ) -> CacheKey {
        let mut h = blake3::Hasher::new_derive_key("dcache 2026-12 depend-mode result key v1");
        h.update(&dk.0);
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(&(files.len() as u64).to_be_bytes());
        for (p, hash) in files {
            field(p.as_os_str().as_encoded_bytes());
            field(hash);
        }
        field(&(probes.len() as u64).to_be_bytes());
        for (p, probe) in probes {
            field(p.as_os_str().as_encoded_bytes());
            field(&[probe.to_byte()]);
        }
        CacheKey::from_bytes(*h.finalize().as_bytes())
    }
}

/// The files a preprocessed source says it read, in first-seen order: the names in its
/// line markers (`# 12 "inc/x.h" 1`), less the compiler's pseudo-files (`<built-in>`) and
/// the working-directory marker `-g` adds (`"/cwd//"`). `None` if a name has escapes.
pub fn included_files(preprocessed: &[u8]) -> Option<Vec<PathBuf>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in preprocessed.split(|&b| b == b'\n') {
        let Some(rest) = line.strip_prefix(b"# ") else {
            continue;
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            continue;
        }
        let Some(quoted) = rest[digits..].strip_prefix(b" \"") else {
            continue;
        };
        let end = quoted.iter().position(|&b| b == b'"')?;
        let name = &quoted[..end];
        if name.contains(&b'\\') {
            return None;
        }
        if name.starts_with(b"<") || name.ends_with(b"//") {
            continue;
        }
        let path = PathBuf::from(std::str::from_utf8(name).ok()?);
        if seen.insert(path.clone()) {
            out.push(path);
        }
    }
    Some(out)
}

/// The entries recorded under one direct key, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
}

impl Manifest {
    /// The entries, newest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The newest entry whose files all still hash as recorded and whose lookups would
    /// all find what they found, reading each file not known to be unchanged (see
    /// [`super::file_id`]) and examining each path once;
    /// `local` says whether depend-mode entries can be served (only by the local cache).
    pub fn find_current(&self, local: bool) -> Option<&Entry> {
        // Keyed by the paths' bytes: hashing a `Path` parses its components.
        let mut hashes: HashMap<&OsStr, Option<[u8; 32]>> = HashMap::new();
        let mut probes: HashMap<&OsStr, Probe> = HashMap::new();
        let mut prober = Prober::default();
        let mut buf = vec![0; HASH_BUFFER];
        let mut filesystems = LocalFilesystems::default();
        self.entries.iter().find(|e| {
            (local || !e.depend)
                && e.probes.iter().all(|(path, want)| {
                    *probes
                        .entry(path.as_os_str())
                        .or_insert_with(|| prober.probe(path))
                        == *want
                })
                && e.files.iter().enumerate().all(|(i, (path, want))| {
                    if e.seen
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|id| id.matches(path, &mut filesystems))
                    {
                        return true;
                    }
                    let now = hashes
                        .entry(path.as_os_str())
                        .or_insert_with(|| hash_file(path, &mut buf));
                    *now == Some(*want)
                })
        })
    }

    /// Adds `entry` as the newest, replacing one with the same files, keeping at most
    /// sixteen.
    pub fn add(&mut self, entry: Entry) {
        self.entries
            .retain(|e| e.files != entry.files || e.probes != entry.probes);
        self.entries.insert(0, entry);
        self.entries.truncate(MAX_ENTRIES);
    }

    /// The stored form. Integrity is the store's job: [`ManifestStore`](super::manifests::ManifestStore)
    /// digest-checks every file before this is decoded.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_len(&mut out, self.entries.len());
        for e in &self.entries {
            out.extend_from_slice(e.key.as_bytes());
            match &e.dep_file {
                Some(d) => {
                    out.push(1);
                    put_bytes(&mut out, d);
                }
                None => out.push(0),
            }
            put_len(&mut out, e.files.len());
            for (i, (path, hash)) in e.files.iter().enumerate() {
                put_bytes(&mut out, path.as_os_str().as_encoded_bytes());
                out.extend_from_slice(hash);
                match e.seen.get(i).copied().flatten() {
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id.to_bytes());
                    }
                    None => out.push(0),
                }
            }
            put_len(&mut out, e.probes.len());
            for (path, probe) in &e.probes {
                put_bytes(&mut out, path.as_os_str().as_encoded_bytes());
                out.push(probe.to_byte());
            }
            out.push(u8::from(e.depend));
            match &e.stderr {
                Some(d) => {
                    out.push(1);
                    put_bytes(&mut out, d);
                }
                None => out.push(0),
            }
        }
        out
    }

    /// Reads the stored form; `None` for anything malformed (treated as no manifest).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Cursor(bytes.strip_prefix(MAGIC)?);
        let count = r.len()?;
        let mut entries = Vec::with_capacity(count.min(MAX_ENTRIES));
        for _ in 0..count {
            let key = CacheKey::from_bytes(r.array()?);
            let dep_file = match r.take(1)?[0] {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                _ => return None,
            };
            let n = r.len()?;
            let mut files = Vec::with_capacity(n.min(4096));
            let mut seen = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let name = std::str::from_utf8(r.bytes()?).ok()?;
                files.push((PathBuf::from(name), r.array()?));
                seen.push(match r.take(1)?[0] {
                    0 => None,
                    1 => Some(FileId::from_bytes(
                        r.take(file_id::ENCODED_LEN)?.try_into().ok()?,
                    )),
                    _ => return None,
                });
            }
            let n = r.len()?;
            let mut probes = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let name = std::str::from_utf8(r.bytes()?).ok()?;
                probes.push((PathBuf::from(name), Probe::from_byte(r.take(1)?[0])?));
            }
            let depend = match r.take(1)?[0] {
                0 => false,
                1 => true,
                _ => return None,
            };
            let stderr = match r.take(1)?[0] {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                _ => return None,
            };
            entries.push(Entry {
                key,
                dep_file,
                files,
                seen,
                probes,
                depend,
                stderr,
            });
        }
        r.0.is_empty().then_some(Self { entries })
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

/// A bounded reader: every read checks what is left.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?) as usize)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn array(&mut self) -> Option<[u8; 32]> {
        self.take(32)?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashes_as_its_contents_whatever_its_size_against_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = [0u8; 8];
        for len in [0, 1, 7, 8, 9, 16, 17, 100] {
            let text: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &text).unwrap();
            assert_eq!(
                hash_file(&path, &mut buf),
                Some(*blake3::hash(&text).as_bytes()),
                "{len} bytes"
            );
        }
        assert_eq!(hash_file(&dir.path().join("missing"), &mut buf), None);
        assert_eq!(hash_file(dir.path(), &mut buf), None, "a directory");
    }

    /// Records from preprocessed text as the wrapper does, with no search directories.
    fn record_pre(key: CacheKey, pre: &[u8], started: SystemTime) -> Option<Entry> {
        let files = included_files(pre)?;
        let main = files.first()?.clone();
        Entry::record(
            key,
            None,
            Sources {
                main: &main,
                files,
                dirs: &SearchDirs::default(),
                forced: &[],
                started,
            },
            false,
        )
    }

    #[test]
    fn line_markers_name_the_files_read() {
        let pre = b"# 0 \"x.c\"\n# 0 \"<built-in>\"\n# 0 \"<command-line>\"\n# 1 \"/w//\"\n# 1 \"x.c\"\n# 1 \"inc/h.h\" 1\nint h;\n# 2 \"x.c\" 2\n#pragma once\n";
        assert_eq!(
            included_files(pre),
            Some(vec![PathBuf::from("x.c"), PathBuf::from("inc/h.h")])
        );
        assert_eq!(included_files(b"# 1 \"we\\\"ird.h\" 1\n"), None);
    }

    #[test]
    fn clock_macros_and_dash_p_disable_direct_mode() {
        assert!(unrecordable(b"const char *d = __DATE__;"));
        assert!(unrecordable(b"__TIMESTAMP__"));
        assert!(!unrecordable(b"#if __has_include_next(<x.h>)"));
        assert!(!unrecordable(b"int date, time;"));
        let compiler = OsString::from("sh");
        let cwd = std::env::temp_dir();
        let key = |args: &[&str], base: Option<&Path>| {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            DirectKey::compute(&Invocation {
                compiler: &compiler,
                args: &args,
                compile_args: &[],
                cwd: &cwd,
                source: b"int x;",
                base_dir: base,
            })
        };
        assert!(key(&["-c", "x.c"], None).is_some());
        assert_eq!(key(&["-DBUILD=__TIME__", "-c", "x.c"], None), None);
        assert_eq!(key(&["-P", "-c", "x.c"], None), None);
        assert_eq!(key(&["-DH=__has_include(<x.h>)", "-c", "x.c"], None), None);
        assert_eq!(key(&["-I-", "-c", "x.c"], None), None);
        assert_ne!(
            key(&["-c", "x.c"], None),
            key(&["-c", "x.c"], Some(Path::new("/home")))
        );
    }

    #[test]
    fn a_fresh_symlink_on_the_way_counts_as_a_change() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(dir.path().join("v2")).unwrap_or_default();
        let file = dir.path().join("v2/h.h");
        std::fs::write(&file, "int h;").unwrap_or_default();
        // The file itself is an hour old...
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(old))
            .unwrap_or_default();
        // ...but the link to its directory was switched just now, by a compile that had
        // started (read before the link, so however slow this machine is).
        let linked = SystemTime::now();
        std::os::unix::fs::symlink(dir.path().join("v2"), dir.path().join("inc"))
            .unwrap_or_default();
        let h = dir.path().join("inc/h.h");
        // (Here the file's status-change time is new as well, since setting its mtime
        // changed it; the end-to-end test of the wrapper switches a link to old files.)
        assert!(changed_at(&h).is_some_and(|t| t >= linked));
        let pre = format!("# 1 \"{}\" 1\nint h;\n", h.display());
        let key = CacheKey::from_bytes([7; 32]);
        assert_eq!(record_pre(key, pre.as_bytes(), linked), None);
        let later = linked + Duration::from_secs(5);
        assert!(record_pre(key, pre.as_bytes(), later).is_some());
    }

    #[test]
    fn whole_second_timestamps_get_the_wider_margin() {
        let stamp = |m: (i64, i64), c: (i64, i64)| Stamp {
            modified: m,
            changed: c,
        };
        let whole = stamp((100, 0), (200, 0));
        assert_eq!(whole.margin(), WHOLE_SECOND_MARGIN);
        assert_eq!(
            whole.latest_change(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(202))
        );
        // One nanosecond field set: the filesystem keeps them (a copy may have set the
        // modification time to a whole second).
        let fine = stamp((300, 0), (200, 5));
        assert_eq!(fine.margin(), FINE_MARGIN);
        assert_eq!(
            fine.latest_change(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(300) + FINE_MARGIN)
        );
        // A time before 1970 is never trusted.
        assert_eq!(stamp((-1, 0), (5, 0)).latest_change(), None);
    }

    #[test]
    fn output_without_line_markers_is_not_recorded() {
        let later = SystemTime::now() + Duration::from_secs(5);
        let key = CacheKey::from_bytes([7; 32]);
        assert_eq!(record_pre(key, b"int f(void) { return 1; }\n", later), None);
    }

    #[test]
    fn a_manifest_round_trips_and_refuses_garbage() {
        let mut m = Manifest::default();
        for i in 0..20u8 {
            m.add(Entry {
                key: CacheKey::from_bytes([i; 32]),
                dep_file: (i % 2 == 0).then(|| b"x.o: x.c h.h\n".to_vec()),
                files: vec![(PathBuf::from(format!("h{i}.h")), [i; 32])],
                seen: vec![(i % 2 == 0).then(|| FileId::from_bytes(&[i; file_id::ENCODED_LEN]))],
                probes: vec![(PathBuf::from(format!("/i/h{i}.h")), Probe::Absent)],
                depend: i % 3 == 0,
                stderr: (i % 2 == 1).then(|| b"x.c:1:1: warning: w\n".to_vec()),
            });
        }
        assert_eq!(m.entries().len(), MAX_ENTRIES);
        assert_eq!(
            m.entries()[0].key,
            CacheKey::from_bytes([19; 32]),
            "newest first"
        );
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes), Some(m));
        for cut in [0, 3, 4, 10, bytes.len() - 1] {
            assert_eq!(Manifest::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Manifest::decode(&trailing), None);
        assert_eq!(Manifest::decode(b"DCM1\xff\xff\xff\xff"), None);
    }

    #[test]
    fn the_current_entry_is_the_one_whose_files_match() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = dir.path().join("h.h");
        std::fs::write(&h, "int v1;").unwrap_or_default();
        let hash = |s: &str| *blake3::hash(s.as_bytes()).as_bytes();
        let mut m = Manifest::default();
        m.add(Entry {
            key: CacheKey::from_bytes([1; 32]),
            dep_file: None,
            files: vec![(h.clone(), hash("int v1;"))],
            seen: vec![None],
            probes: vec![],
            depend: false,
            stderr: None,
        });
        m.add(Entry {
            key: CacheKey::from_bytes([2; 32]),
            dep_file: None,
            files: vec![(h.clone(), hash("int v2;"))],
            seen: vec![None],
            probes: vec![],
            depend: false,
            stderr: None,
        });
        assert_eq!(
            m.find_current(true).map(|e| e.key),
            Some(CacheKey::from_bytes([1; 32]))
        );
        std::fs::write(&h, "int v2;").unwrap_or_default();
        assert_eq!(
            m.find_current(true).map(|e| e.key),
            Some(CacheKey::from_bytes([2; 32]))
        );
        std::fs::write(&h, "int v3;").unwrap_or_default();
        assert_eq!(m.find_current(true), None);
        std::fs::remove_file(&h).unwrap_or_default();
        assert_eq!(
            m.find_current(true),
            None,
            "a vanished file matches nothing"
        );
    }

    #[test]
    fn a_file_still_as_recorded_is_not_read_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = dir.path().join("h.h");
        std::fs::write(&h, "int h;").unwrap_or_default();
        let pre = format!("# 1 \"{}\" 1\nint h;\n", h.display());
        let key = CacheKey::from_bytes([7; 32]);
        let later = SystemTime::now() + Duration::from_secs(5);
        let mut e = record_pre(key, pre.as_bytes(), later).expect("recorded");
        assert_eq!(e.seen.len(), 1);
        assert!(e.seen[0].is_some(), "a regular file");
        // Proof that the recorded identity stands in for the contents: with a wrong hash
        // the entry is still current while the file is as it was when recorded.
        e.files[0].1 = [0; 32];
        let mut m = Manifest::default();
        m.add(e.clone());
        let dev = std::fs::metadata(&h).map(|m| m.dev()).unwrap_or_default();
        if LocalFilesystems::default().holds(dev, &h) {
            assert_eq!(m.find_current(true).map(|e| e.key), Some(key));
        } else {
            assert_eq!(m.find_current(true), None, "not trusted on this filesystem");
        }
        // Once the file changes, the identity no longer matches and the (wrong) hash
        // decides: not current. The sleep lets the kernel's coarse clock move on.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&h, "int h;").unwrap_or_default();
        assert_eq!(
            m.find_current(true),
            None,
            "rewritten, even with the same bytes"
        );
        // And the stored form keeps the identity.
        let fresh = record_pre(
            key,
            pre.as_bytes(),
            SystemTime::now() + Duration::from_secs(5),
        )
        .expect("recorded");
        let mut m = Manifest::default();
        m.add(fresh);
        assert_eq!(Manifest::decode(&m.encode()), Some(m));
    }

    #[test]
    fn fresh_files_and_time_macros_are_not_recorded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = dir.path().join("h.h");
        // The compile "started" just before the write: the file may have changed under it
        // (read before, so however slow this machine is).
        let started = SystemTime::now();
        std::fs::write(&h, "int h;").unwrap_or_default();
        let pre = format!("# 1 \"{}\" 1\nint h;\n", h.display());
        let key = CacheKey::from_bytes([7; 32]);
        assert_eq!(record_pre(key, pre.as_bytes(), started), None);
        // A compile that started a margin after the write read it as it is (a build right
        // after CMake regenerated its headers). (File times come from the kernel's coarse
        // clock, never ahead of the one read here.)
        let written = SystemTime::now();
        let soon = written + FINE_MARGIN + Duration::from_millis(1);
        assert_eq!(
            record_pre(key, pre.as_bytes(), soon).map(|e| e.files.len()),
            Some(1)
        );
        // The same file for a compile that starts later is fine.
        let later = SystemTime::now() + Duration::from_secs(5);
        let e = record_pre(key, pre.as_bytes(), later);
        assert_eq!(e.map(|e| e.files.len()), Some(1));
        std::fs::write(&h, "const char *t = __TIME__;").unwrap_or_default();
        assert_eq!(record_pre(key, pre.as_bytes(), later), None);
    }

    #[test]
    fn an_entry_whose_lookups_would_now_find_another_file_is_not_current() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shadow = dir.path().join("first/h.h");
        let mut m = Manifest::default();
        m.add(Entry {
            key: CacheKey::from_bytes([1; 32]),
            dep_file: None,
            files: vec![],
            seen: vec![],
            probes: vec![(shadow.clone(), Probe::Absent)],
            depend: true,
            stderr: None,
        });
        assert!(m.find_current(true).is_some());
        assert!(
            m.find_current(false).is_none(),
            "a depend-mode entry only for the local cache"
        );
        std::fs::create_dir(dir.path().join("first")).unwrap_or_default();
        assert!(
            m.find_current(true).is_some(),
            "a directory alone finds nothing"
        );
        std::fs::write(&shadow, "int shadow;").unwrap_or_default();
        assert!(
            m.find_current(true).is_none(),
            "a shadowing header appeared"
        );
    }

    #[test]
    fn depend_keys_bind_every_file_and_lookup() {
        let dk = DirectKey([3; 32]);
        let f = vec![(PathBuf::from("a.h"), [1; 32])];
        let p = vec![(PathBuf::from("/i/a.h"), Probe::Absent)];
        let k = Entry::depend_key(&dk, &f, &p);
        assert_eq!(k, Entry::depend_key(&dk, &f, &p));
        assert_ne!(k, Entry::depend_key(&DirectKey([4; 32]), &f, &p));
        assert_ne!(
            k,
            Entry::depend_key(&dk, &[(PathBuf::from("a.h"), [2; 32])], &p)
        );
        assert_ne!(
            k,
            Entry::depend_key(&dk, &f, &[(PathBuf::from("/i/a.h"), Probe::File)])
        );
        assert_ne!(k, Entry::depend_key(&dk, &f, &[]));
    }
}
