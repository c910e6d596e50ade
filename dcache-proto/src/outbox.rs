//! Outgoing bytes of a connection, in the order they must hit the wire.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::error_code::ErrorCode;
use crate::frame::{Frame, JobId, Limits};

/// Queued control frames plus, at most, the unsent tail of a bulk frame.
///
/// A bulk frame (SOURCE, RESULT, DATA) goes out as its head then its shared payload; once
/// the head has been handed out, the tail must follow before anything else, or the peer
/// would read the next frame as payload. Keeping the tail apart lets a connection drop its
/// queued control frames on a fatal error without tearing a frame in half.
#[derive(Debug)]
pub(crate) struct Outbox {
    tail: Option<Bytes>,
    frames: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The peer's frame payload limit, which control frames must fit.
    peer_max: u32,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            tail: None,
            frames: VecDeque::new(),
            queued_bytes: 0,
            peer_max: Limits::BASELINE.max_frame_payload,
        }
    }
}

impl Outbox {
    /// Control frames from now on are checked against the peer's announced limit.
    pub(crate) fn set_peer_max(&mut self, max: u32) {
        self.peer_max = max;
    }

    /// Queues a small control frame. Control frames built by this crate always fit the
    /// baseline limit (messages are truncated to fit), so an encoding failure is a bug; it
    /// degrades to an empty write rather than a panic.
    pub(crate) fn control(&mut self, frame: &Frame) {
        self.push(frame.to_bytes(self.peer_max).unwrap_or_default());
    }

    /// Queues ABORT for `job`.
    pub(crate) fn abort(&mut self, job: JobId, code: ErrorCode, message: &str) {
        self.control(&Frame::Abort {
            job,
            code,
            message: truncate_message(message),
        });
    }

    /// Queues a whole frame behind the others.
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// The next bytes to write, if any are queued.
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        if let Some(tail) = self.tail.take() {
            return Some(tail);
        }
        let frame = self.frames.pop_front()?;
        self.queued_bytes -= frame.len();
        Some(frame)
    }

    /// Records the payload that must follow the head just handed out.
    pub(crate) fn set_tail(&mut self, tail: Bytes) {
        debug_assert!(self.tail.is_none(), "a tail is already pending");
        if !tail.is_empty() {
            self.tail = Some(tail);
        }
    }

    /// Drops queued frames but keeps a pending tail, so the stream stays well-framed.
    pub(crate) fn clear_frames(&mut self) {
        self.frames.clear();
        self.queued_bytes = 0;
    }

    /// Whether nothing is waiting to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.tail.is_none() && self.frames.is_empty()
    }

    /// Bytes of whole frames waiting (tail excluded).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

/// A body to send in pieces: a list of shared buffers consumed front to back. Pieces never
/// span two buffers, so they are slices of the caller's memory, never copies.
#[derive(Debug, Default)]
pub(crate) struct Segments {
    parts: VecDeque<Bytes>,
    len: u64,
}

impl Segments {
    pub(crate) fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len() as u64;
            self.parts.push_back(part);
        }
    }

    /// Takes up to `max` bytes from the front.
    pub(crate) fn take(&mut self, max: usize) -> Bytes {
        let Some(front) = self.parts.front_mut() else {
            return Bytes::new();
        };
        let piece = if front.len() <= max {
            let whole = std::mem::take(front);
            self.parts.pop_front();
            whole
        } else {
            front.split_to(max)
        };
        self.len -= piece.len() as u64;
        piece
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not yet taken.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.parts.clear();
        self.len = 0;
    }
}

/// Error messages are for people; keep them short enough for any frame.
pub(crate) fn truncate_message(message: &str) -> String {
    const MAX: usize = 1024;
    if message.len() <= MAX {
        return message.to_owned();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}
