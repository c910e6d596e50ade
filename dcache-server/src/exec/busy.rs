//! Starting a program that was written a moment ago.
//!
//! `exec` fails with `ETXTBSY` while any process holds the file open for writing. A
//! program can meet that without anyone writing to it any more: when one thread of a
//! process has just written an executable and closed it, another thread's child, forked
//! in between and not yet at its own `exec`, still holds a copy of the writing descriptor
//! for a few microseconds. A test suite writing stand-in compilers meets this, and so does
//! a server probing a compiler a package manager has just replaced. The condition clears
//! by itself, so a start that fails with it is tried again after a short wait, a bounded
//! number of times; any other failure is returned at once.

use std::io;
use std::time::Duration;

/// The waits between attempts: doubling from 1 ms, about a quarter of a second in all,
/// hundreds of times the window a forked child holds a descriptor.
const WAITS_MS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Whether `error` is the transient "text file busy".
fn is_busy(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::ExecutableFileBusy
}

/// Runs `start` until it does not fail with "text file busy", waiting between attempts
/// on this thread: for the blocking callers (the identity probe).
pub(super) fn retry_blocking<T>(mut start: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    for wait in WAITS_MS {
        match start() {
            Err(e) if is_busy(&e) => std::thread::sleep(Duration::from_millis(wait)),
            other => return other,
        }
    }
    start()
}

/// [`retry_blocking`] for a task on the runtime: waits without holding its thread.
pub(super) async fn retry_async<T>(mut start: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    for wait in WAITS_MS {
        match start() {
            Err(e) if is_busy(&e) => tokio::time::sleep(Duration::from_millis(wait)).await,
            other => return other,
        }
    }
    start()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> io::Error {
        io::Error::from_raw_os_error(nix::libc::ETXTBSY)
    }

    #[test]
    fn a_busy_start_is_tried_again_until_it_succeeds() {
        let mut calls = 0;
        let r = retry_blocking(|| {
            calls += 1;
            if calls < 3 { Err(busy()) } else { Ok(calls) }
        });
        assert_eq!(r.unwrap(), 3);
    }

    #[test]
    fn another_failure_is_returned_at_once() {
        let mut calls = 0;
        let r: io::Result<()> = retry_blocking(|| {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::NotFound))
        });
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_busy_for_good_is_given_up_on_after_a_bounded_number_of_attempts() {
        let mut calls = 0;
        let r: io::Result<()> = retry_async(|| {
            calls += 1;
            Err(busy())
        })
        .await;
        assert!(is_busy(&r.unwrap_err()));
        assert_eq!(calls, WAITS_MS.len() + 1);
    }
}
