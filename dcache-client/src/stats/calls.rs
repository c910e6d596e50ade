//! What did not go through the cache, and why: the wrapper's `uncacheable` counters (like
//! ccache's "called for linking", "multiple source files", "unsupported compiler option"),
//! and the one warning per build when most of a build ran without the cache.
//!
//! Two files. A call through the cache, the common case, costs one append of its time to
//! `DIR/calls.cached` (a single small `O_APPEND` write, which the kernel keeps whole among
//! concurrent writers: about a microsecond, no lock). A call without the cache runs the
//! compiler locally anyway, so it can afford more: under a lock file (`DIR/calls.lock`,
//! created exclusively: the first to create it holds it) it reads `DIR/calls` (the counts
//! by reason and the current build's tally), takes in the times appended since the last
//! such update, and renames a new `DIR/calls` into place, so `make -j8`'s processes never
//! lose each other's counts or see half a file. A process that cannot take the lock within
//! [`LOCK_WAIT`] gives its update up (statistics never fail a compile), and a lock older
//! than [`STALE_LOCK`] (its holder was killed) is broken. `calls.cached` is started afresh
//! past [`ROTATE_AT`]; an append racing that rename by microseconds can be lost (one
//! count in about a hundred thousand, at most).
//!
//! A *build* is a run of calls with no pause longer than [`BUILD_GAP`] between two of
//! them: what one `make` (or one edit-and-rebuild session) does. The first call of a
//! build finds the previous tally stale and starts a new one; the warning is printed by
//! the one process that finds most of the build's compiles uncached and no warning given
//! yet, so each build says it once, whatever the number of processes.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::wrapper::args::LocalReason;

const FILE: &str = "calls";
const CACHED: &str = "calls.cached";
const LOCK: &str = "calls.lock";
/// `calls.cached` is taken in and started afresh past this size (about 90,000 calls).
pub const ROTATE_AT: u64 = 1 << 20;
const MAGIC: &str = "dcache-calls v1";
/// How long a process waits for the lock before giving its update up: far longer than
/// any holder keeps it (one small read and write), so only a lock held by a process
/// stopped mid-update costs this.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);
/// A lock this old was left by a process that died holding it.
pub const STALE_LOCK: Duration = Duration::from_secs(10);
/// A pause this long between two calls ends a build.
pub const BUILD_GAP: Duration = Duration::from_secs(60);
/// The fewest uncached compiles a build needs before it is warned about: one odd
/// compile is not a misconfiguration.
pub const WARN_AFTER: u64 = 5;
/// Distinct reasons kept; more are counted under [`OTHER`], so the file stays small
/// whatever options a build uses.
const MAX_REASONS: usize = 64;
/// Where reasons beyond [`MAX_REASONS`] are counted.
const OTHER: &str = "other reasons";
/// The most of an option kept in a reason.
const MAX_OPTION: usize = 48;
/// The most of a reason kept.
const MAX_LABEL: usize = 80;

/// Why a call ran without the cache, as a short stable label (the name `--stats` shows).
pub fn reason_label(reason: &LocalReason) -> String {
    match reason {
        LocalReason::NotACompile => "no -c or -S (linking)".into(),
        LocalReason::PreprocessOnly => "preprocessor output requested".into(),
        LocalReason::InputCount(0) => "no input file".into(),
        LocalReason::InputCount(_) => "multiple source files".into(),
        LocalReason::StdinInput => "source on standard input".into(),
        LocalReason::StdoutOutput => "output to standard output".into(),
        LocalReason::Language(_) => "unsupported language".into(),
        LocalReason::LocalOption(o) => format!("unsupported option {}", clean(o, MAX_OPTION)),
        LocalReason::NotUtf8 => "argument not UTF-8".into(),
        LocalReason::ResponseFile(_) => "unreadable response file".into(),
    }
}

/// A label for a local compile that was planned for the cache but failed before it
/// reached it: the preprocessor reported an error (the compile then reports it itself).
pub const PREPROCESSOR_ERROR: &str = "preprocessor error";

/// A label for an assembler source whose preprocessed text has `.include` or `.incbin`:
/// the assembler would read files no key covers, so it compiles locally.
pub const ASSEMBLER_READS_FILES: &str = "assembler .include or .incbin";

/// `s` made safe for one line of the file and a JSON key: printable ASCII without quotes
/// or backslashes (spaces allowed inside), at most `max` characters.
fn clean(s: &str, max: usize) -> String {
    s.trim()
        .chars()
        .take(max)
        .map(|c| {
            if (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The state in `DIR/calls`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// Unix seconds of the current build's last call.
    build_last: u64,
    /// Compiles of the current build that went through the cache.
    build_cached: u64,
    /// Compiles of the current build that did not (links excluded: they are not compiles).
    build_uncached: u64,
    /// Whether the current build has been warned about.
    build_warned: bool,
    /// Calls that went through the cache, since the last reset (those taken in from
    /// `calls.cached`).
    cacheable: u64,
    /// How much of `calls.cached` has been taken in.
    cached_offset: u64,
    /// Calls that did not, by reason, since the last reset.
    uncacheable: Vec<(String, u64)>,
    /// The current build's uncached compiles by reason (links left out), for its warning.
    build_reasons: Vec<(String, u64)>,
}

impl State {
    fn parse(text: &str) -> Self {
        let mut lines = text.lines();
        let mut s = Self::default();
        if lines.next() != Some(MAGIC) {
            return s;
        }
        let nums = |l: Option<&str>| -> Vec<u64> {
            l.unwrap_or("")
                .split(' ')
                .filter_map(|x| x.parse().ok())
                .collect()
        };
        if let [last, cached, uncached, warned] = nums(lines.next())[..] {
            (s.build_last, s.build_cached, s.build_uncached) = (last, cached, uncached);
            s.build_warned = warned != 0;
        }
        if let [n, offset] = nums(lines.next())[..] {
            (s.cacheable, s.cached_offset) = (n, offset);
        }
        for l in lines {
            // "N LABEL": a total; "b N LABEL": the current build's.
            let (list, l) = match l.strip_prefix("b ") {
                Some(rest) => (&mut s.build_reasons, rest),
                None => (&mut s.uncacheable, l),
            };
            if let Some((n, label)) = l.split_once(' ') {
                if let Ok(n) = n.parse() {
                    if list.len() < MAX_REASONS + 1 {
                        list.push((clean(label, MAX_LABEL), n));
                    }
                }
            }
        }
        s
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{MAGIC}\n{} {} {} {}\n{} {}\n",
            self.build_last,
            self.build_cached,
            self.build_uncached,
            u8::from(self.build_warned),
            self.cacheable,
            self.cached_offset
        );
        for (label, n) in &self.uncacheable {
            out.push_str(&format!("{n} {label}\n"));
        }
        for (label, n) in &self.build_reasons {
            out.push_str(&format!("b {n} {label}\n"));
        }
        out
    }

    /// Counts one call at `now` (unix seconds): `None` went through the cache, `Some`
    /// did not, for that reason (`compile`: whether it was a compile, not a link).
    fn count(&mut self, now: u64, uncached: Option<(&str, bool)>) {
        if now.saturating_sub(self.build_last) > BUILD_GAP.as_secs() {
            (self.build_cached, self.build_uncached, self.build_warned) = (0, 0, false);
            self.build_reasons.clear();
        }
        self.build_last = self.build_last.max(now);
        let Some((label, compile)) = uncached else {
            self.cacheable = self.cacheable.saturating_add(1);
            self.build_cached = self.build_cached.saturating_add(1);
            return;
        };
        if compile {
            self.build_uncached = self.build_uncached.saturating_add(1);
            bump(&mut self.build_reasons, label);
        }
        bump(&mut self.uncacheable, label);
    }

    /// Takes in the times of cached calls appended to `calls.cached` (`pending`: what
    /// follows the part already taken in), in order; returns the bytes taken (whole lines).
    fn absorb(&mut self, pending: &[u8]) -> u64 {
        let mut taken = 0;
        for line in pending.split_inclusive(|&b| b == b'\n') {
            if line.last() != Some(&b'\n') {
                break; // being written: next time
            }
            taken += line.len() as u64;
            let t = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.trim().parse().ok());
            if let Some(t) = t {
                self.count(t, None);
            }
        }
        taken
    }

    /// The warning this build owes, if this call makes it due: most of its compiles ran
    /// without the cache, enough of them to matter, and no process has said so yet.
    fn warning_due(&mut self) -> Option<String> {
        let due = !self.build_warned
            && self.build_uncached >= WARN_AFTER
            && self.build_uncached > self.build_cached;
        if !due {
            return None;
        }
        self.build_warned = true;
        let top = self
            .build_reasons
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(l, n)| format!(" ({n} of them: {l})"))
            .unwrap_or_default();
        Some(format!(
            "{} of {} compiles so far in this build ran without the cache{top}; \
             `dcache --stats` lists every reason",
            self.build_uncached,
            self.build_uncached + self.build_cached
        ))
    }
}

/// Adds one to `label`'s count in `list`, which holds at most [`MAX_REASONS`] labels and
/// [`OTHER`].
fn bump(list: &mut Vec<(String, u64)>, label: &str) {
    let label = if list.len() >= MAX_REASONS && !list.iter().any(|(l, _)| l == label) {
        OTHER
    } else {
        label
    };
    match list.iter_mut().find(|(l, _)| l == label) {
        Some((_, n)) => *n = n.saturating_add(1),
        None => list.push((label.to_owned(), 1)),
    }
}

/// Holds `DIR/calls.lock` while alive.
struct Lock<'a>(&'a Path);

impl<'a> Lock<'a> {
    fn take(path: &'a Path, wait: Duration) -> Option<Self> {
        let start = std::time::Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => return Some(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    // Broken at once and retried; the time bound below still holds if
                    // it cannot be removed, so this loop always ends.
                    if stale && std::fs::remove_file(path).is_ok() && start.elapsed() <= wait {
                        continue;
                    }
                }
                Err(_) => return None,
            }
            if start.elapsed() > wait {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Reads, changes and writes `DIR/calls` under the lock; `None` when it could not.
fn update<T>(dir: &Path, change: impl FnOnce(&mut State) -> T) -> Option<T> {
    update_waiting(dir, LOCK_WAIT, change)
}

/// [`update`], waiting up to `wait` for the lock.
fn update_waiting<T>(
    dir: &Path,
    wait: Duration,
    change: impl FnOnce(&mut State) -> T,
) -> Option<T> {
    std::fs::create_dir_all(dir).ok()?;
    let lock_path = dir.join(LOCK);
    let _lock = Lock::take(&lock_path, wait)?;
    let mut state = State::parse(&std::fs::read_to_string(dir.join(FILE)).unwrap_or_default());
    take_in_cached(dir, &mut state);
    let out = change(&mut state);
    let mut tmp = tempfile::Builder::new()
        .prefix(".calls-")
        .tempfile_in(dir)
        .ok()?;
    tmp.write_all(state.render().as_bytes()).ok()?;
    tmp.persist(dir.join(FILE)).ok()?;
    Some(out)
}

/// Takes the cached calls appended since the last update into `state` (under the lock),
/// starting `calls.cached` afresh once it passes [`ROTATE_AT`].
fn take_in_cached(dir: &Path, state: &mut State) {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(CACHED);
    let read_from = |file: &Path, offset: u64| -> Vec<u8> {
        let mut pending = Vec::new();
        if let Ok(mut f) = std::fs::File::open(file) {
            let len = f.metadata().map_or(0, |m| m.len());
            // Shorter than what was taken in: replaced behind our back; start over.
            let offset = if len < offset { 0 } else { offset };
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.take(ROTATE_AT * 2).read_to_end(&mut pending);
            }
        }
        pending
    };
    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
    if len < state.cached_offset {
        state.cached_offset = 0;
    }
    if len > ROTATE_AT {
        let old = dir.join(".calls.cached.old");
        if std::fs::rename(&path, &old).is_ok() {
            let pending = read_from(&old, state.cached_offset);
            state.absorb(&pending);
            let _ = std::fs::remove_file(&old);
            state.cached_offset = 0;
        }
        return;
    }
    let pending = read_from(&path, state.cached_offset);
    let taken = state.absorb(&pending);
    state.cached_offset += taken;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts a call that went through the cache: one append, no lock (see the module
/// documentation).
pub fn record_cacheable(dir: &Path) {
    let line = format!("{}\n", unix_now());
    let append = || -> std::io::Result<u64> {
        let mut f = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(CACHED))
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(CACHED))?
            }
            f => f?,
        };
        // One write: the kernel appends it whole.
        f.write_all(line.as_bytes())?;
        Ok(f.metadata()?.len())
    };
    // A build whose every call is cached (CMake runs its launcher for compiles only)
    // would otherwise grow the file without end: past the limit, take it in now.
    if append().is_ok_and(|len| len > ROTATE_AT) {
        update(dir, |_| ());
    }
}

/// Counts a call that ran without the cache, under `label` (see [`reason_label`]);
/// `compile`: it was meant to compile (not a link), so it counts against the build.
/// Returns the warning to print when this call makes most of the build uncached (once per
/// build, across processes).
pub fn record_uncacheable(dir: &Path, label: &str, compile: bool) -> Option<String> {
    let label = clean(label, MAX_LABEL);
    update(dir, |s| {
        s.count(unix_now(), Some((&label, compile)));
        s.warning_due()
    })
    .flatten()
}

/// The counters `--stats` shows: calls through the cache, calls without it, and those by
/// reason, most frequent first.
pub fn totals(dir: &Path) -> Vec<(String, u64)> {
    let s = State::parse(&std::fs::read_to_string(dir.join(FILE)).unwrap_or_default());
    // Cached calls not yet taken in: the lines past the offset.
    let pending = std::fs::read(dir.join(CACHED)).map_or(0, |b| {
        let from = usize::try_from(s.cached_offset).unwrap_or(usize::MAX);
        b.get(from..)
            .map_or(0, |rest| rest.iter().filter(|&&c| c == b'\n').count())
    }) as u64;
    let mut reasons = s.uncacheable.clone();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total = reasons
        .iter()
        .map(|(_, n)| n)
        .fold(0u64, |a, n| a.saturating_add(*n));
    let mut out = vec![
        (
            "cacheable_calls".to_owned(),
            s.cacheable.saturating_add(pending),
        ),
        ("uncacheable_calls".to_owned(), total),
    ];
    out.extend(
        reasons
            .into_iter()
            .map(|(l, n)| (format!("uncacheable: {l}"), n)),
    );
    out
}

/// Forgets the counts (`--zero-stats`); the current build's tally stays, so a reset in
/// the middle of a build does not make it warn twice.
pub fn reset(dir: &Path) -> std::io::Result<()> {
    if !dir.join(FILE).exists() && !dir.join(CACHED).exists() {
        return Ok(());
    }
    update(dir, |s| {
        s.cacheable = 0;
        s.uncacheable.clear();
    })
    .ok_or_else(|| std::io::Error::other("the statistics file is locked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_stable_and_safe() {
        assert_eq!(
            reason_label(&LocalReason::LocalOption("-march=native".into())),
            "unsupported option -march=native"
        );
        assert_eq!(
            reason_label(&LocalReason::InputCount(3)),
            "multiple source files"
        );
        assert_eq!(reason_label(&LocalReason::InputCount(0)), "no input file");
        let odd = reason_label(&LocalReason::LocalOption(format!(
            "-x\"\\\n{}",
            "y".repeat(99)
        )));
        assert!(
            odd.len() <= "unsupported option ".len() + MAX_OPTION,
            "{odd}"
        );
        assert!(!odd.contains(['"', '\\', '\n']), "{odd}");
    }

    #[test]
    fn counts_add_up_across_writers_and_survive_a_reset_of_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || {
                    // A wait no load can exhaust: this test is about never losing or
                    // tearing an update, not about the give-up time.
                    let wait = Duration::from_secs(120);
                    for _ in 0..20 {
                        if i % 2 == 0 {
                            record_cacheable(&d);
                        } else {
                            let done = update_waiting(&d, wait, |s| {
                                s.count(unix_now(), Some(("multiple source files", true)));
                            });
                            assert!(done.is_some());
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = totals(&d);
        assert_eq!(t[0], ("cacheable_calls".into(), 80), "{t:?}");
        assert_eq!(t[1], ("uncacheable_calls".into(), 80), "{t:?}");
        assert_eq!(t[2], ("uncacheable: multiple source files".into(), 80));
        assert!(!d.join(LOCK).exists(), "the lock is released");
        reset(&d).unwrap();
        assert_eq!(
            totals(&d)[..2],
            [
                ("cacheable_calls".into(), 0),
                ("uncacheable_calls".into(), 0)
            ]
        );
    }

    #[test]
    fn a_build_mostly_uncached_is_warned_about_once() {
        let mut s = State::default();
        let t0 = 1_000_000;
        for _ in 0..3 {
            s.count(t0, None);
        }
        let mut warnings = Vec::new();
        for i in 0..20 {
            s.count(t0 + i, Some(("unsupported option -flto=auto", true)));
            // Links are not compiles: they never tip a build.
            s.count(t0 + i, Some(("no -c or -S (linking)", false)));
            warnings.extend(s.warning_due());
        }
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "5 of 8 compiles so far in this build ran without the cache \
                 (5 of them: unsupported option -flto=auto)"
            ),
            "{}",
            warnings[0]
        );
        // The state survives the file, and a pause starts a new build that may warn again.
        let mut s = State::parse(&s.render());
        assert!(s.build_warned);
        s.count(t0 + 19 + BUILD_GAP.as_secs() + 1, Some(("x", true)));
        assert!(!s.build_warned);
        assert_eq!((s.build_cached, s.build_uncached), (0, 1));
        assert_eq!(
            s.build_reasons,
            vec![("x".to_owned(), 1)],
            "the old build's are gone"
        );
        assert_eq!(s.uncacheable.len(), 3, "the totals stay");
    }

    #[test]
    fn mostly_cached_builds_and_links_say_nothing() {
        let mut s = State::default();
        for i in 0..100 {
            s.count(i, None);
            s.count(i, Some(("no -c or -S (linking)", false)));
            if i % 3 == 0 {
                s.count(i, Some(("unsupported option -fprofile-generate", true)));
            }
            assert_eq!(s.warning_due(), None);
        }
    }

    #[test]
    fn reasons_are_bounded_and_junk_is_no_state() {
        let mut s = State::default();
        for i in 0..200 {
            s.count(1, Some((&format!("unsupported option -f{i}"), true)));
        }
        assert_eq!(s.uncacheable.len(), MAX_REASONS + 1);
        assert_eq!(s.uncacheable.last().unwrap(), &(OTHER.to_owned(), 200 - 64));
        assert_eq!(State::parse("junk\n1 2 3 4\n"), State::default());
    }

    #[test]
    fn cached_calls_are_taken_in_once_and_the_file_starts_afresh_when_large() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for _ in 0..3 {
            record_cacheable(d);
        }
        assert_eq!(
            totals(d)[0],
            ("cacheable_calls".into(), 3),
            "shown before taken in"
        );
        record_uncacheable(d, "x", true);
        record_uncacheable(d, "x", true);
        assert_eq!(totals(d)[0].1, 3, "taken in once, not twice");
        // The build's tally has them: 3 cached against 2 uncached so far.
        let s = State::parse(&std::fs::read_to_string(d.join(FILE)).unwrap());
        assert_eq!((s.build_cached, s.build_uncached), (3, 2));
        // Past ROTATE_AT the file is taken in whole and removed.
        let now = unix_now();
        let line = format!("{now}\n");
        let n = ROTATE_AT / line.len() as u64 + 1;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(CACHED))
            .unwrap();
        f.write_all(line.repeat(usize::try_from(n).unwrap()).as_bytes())
            .unwrap();
        drop(f);
        record_uncacheable(d, "x", true);
        assert!(!d.join(CACHED).exists());
        assert_eq!(totals(d)[0].1, 3 + n);
        record_cacheable(d);
        assert_eq!(
            totals(d)[0].1,
            4 + n,
            "a fresh file, counted from its start"
        );
        // Cached calls alone keep it bounded too.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(CACHED))
            .unwrap();
        f.write_all(line.repeat(usize::try_from(n).unwrap()).as_bytes())
            .unwrap();
        drop(f);
        record_cacheable(d);
        assert!(
            !d.join(CACHED).exists(),
            "taken in by the call that passed the limit"
        );
        assert_eq!(totals(d)[0].1, 5 + 2 * n);
        reset(d).unwrap();
        assert_eq!(totals(d)[0].1, 0);
    }

    #[test]
    fn a_stale_lock_is_broken_a_held_one_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK);
        std::fs::write(&lock, b"").unwrap();
        // Held (fresh): the update is given up after LOCK_WAIT, nothing counted.
        record_uncacheable(dir.path(), "x", true);
        assert_eq!(totals(dir.path())[1].1, 0);
        // Left by a dead process: broken, and the update happens.
        let old = SystemTime::now() - STALE_LOCK - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(old)
            .unwrap();
        record_uncacheable(dir.path(), "x", true);
        assert_eq!(totals(dir.path())[1].1, 1);
    }
}
