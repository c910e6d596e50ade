//! The connection core shared by [`ClientConnection`](crate::ClientConnection) and
//! [`ServerConnection`](crate::ServerConnection), and the [`Connection`] trait a driver
//! runs.
//!
//! Both ends have the same skeleton: bytes in through a frame decoder, frames out through
//! an [`Outbox`], events for the owner, a map of open jobs with a round-robin queue of the
//! jobs that have bulk data to send, and the same way of failing. That skeleton is written
//! once here; each end supplies only what differs (what a frame means, what a job sends)
//! through the crate-private [`Endpoint`] trait.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::compress::Codec;
use crate::decoder::FrameDecoder;
use crate::error::ConnectionError;
use crate::error_code::ErrorCode;
use crate::frame::{Frame, Limits};
use crate::header::HEADER_LEN;
use crate::outbox::{Outbox, truncate_message};

/// The longest any timeout of either end may be; longer settings are cut to it, so a
/// deadline never overflows the clock (adding a huge `Duration` to an `Instant` panics)
/// and nothing waits without bound.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What a driver needs from a connection state machine, whichever end it is.
///
/// The order in which a driver calls these is the run-loop contract in the crate
/// documentation; follow it and neither end can stall or reorder its output.
pub trait Connection {
    /// What the connection reports to its owner.
    type Event;

    /// Feeds bytes read from the transport. With no bytes, decodes input that waited while
    /// decoding was paused (see [`has_paused_input`](Self::has_paused_input)).
    fn handle_input(&mut self, now: Instant, data: &[u8]);

    /// The transport's read side ended.
    fn handle_eof(&mut self, now: Instant);

    /// A timer from [`poll_timeout`](Self::poll_timeout) fired (calling it early is
    /// harmless: nothing is due yet).
    fn handle_timeout(&mut self, now: Instant);

    /// The next bytes to write to the transport. Bulk frames are produced here, one per
    /// call and round-robin across jobs, so nothing is committed to the wire before the
    /// transport has room: a late answer can still stop data not yet handed out.
    fn poll_transmit(&mut self, now: Instant) -> Option<Bytes>;

    /// The next event for the owner.
    fn poll_event(&mut self) -> Option<Self::Event>;

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Whether the connection is over and everything queued has been handed out: the
    /// transport can be shut down.
    fn is_closed(&self) -> bool;

    /// Whether the driver should read more input now. False while decoding is paused
    /// (output for the peer is backed up) or a frame's worth of input already waits.
    fn wants_input(&self) -> bool;

    /// Whether input paused earlier may be decoded now: the driver then calls
    /// [`handle_input`](Self::handle_input) with no bytes.
    fn has_paused_input(&self) -> bool;

    /// Closes the connection now with an ERROR frame; open jobs are lost.
    fn close(&mut self, code: ErrorCode, reason: &str);
}

/// A job as the core sees it: whether it has bulk data to send, the next frame of it, and
/// whether both directions are finished.
pub(crate) trait CoreJob {
    /// Whether the job has a bulk frame to send now.
    fn has_data(&self) -> bool;
    /// The job's next bulk frame of at most `chunk` payload bytes, and whether it was the
    /// last. `None` when it has nothing to send after all.
    fn next_frame(&mut self, id: u32, chunk: usize) -> Option<(Frame, bool)>;
    /// Whether both directions of the job are over, so it can be forgotten.
    fn is_done(&self) -> bool;
    /// The flag saying the job is in the round-robin queue (so it is queued once).
    fn in_ready(&mut self) -> &mut bool;
    /// Whether this job's bulk frames may go out compressed (when the connection has
    /// negotiated zstd and this end compresses at all).
    fn compress(&self) -> bool {
        false
    }
}

/// The state both ends keep the same way.
#[derive(Debug)]
pub(crate) struct Core<J, E> {
    decoder: FrameDecoder,
    inbuf: BytesMut,
    /// Whether the input loop stopped on backed-up output with frames still buffered.
    input_paused: bool,
    pub(crate) outbox: Outbox,
    pub(crate) events: VecDeque<E>,
    /// The limits in force for what we send: the peer's, or the baseline before its HELLO.
    /// Set with [`set_peer`](Self::set_peer).
    pub(crate) peer: Limits,
    pub(crate) jobs: BTreeMap<u32, J>,
    ready: VecDeque<u32>,
    /// Our own announced frame payload limit: also the most a compressed frame may
    /// inflate to.
    own_max: u32,
    /// The zstd contexts, once both HELLOs announced the feature: only then are
    /// compressed frames accepted.
    zstd: Option<Codec>,
    /// Whether this end compresses what it sends (given `zstd`).
    compress_out: bool,
    /// Bulk payload bytes sent, as they went on the wire and before compression.
    pub(crate) bulk_wire_bytes: u64,
    pub(crate) bulk_plain_bytes: u64,
}

impl<J: CoreJob, E> Core<J, E> {
    pub(crate) fn new(max_frame_payload: u32) -> Self {
        Self {
            decoder: FrameDecoder::new(max_frame_payload),
            inbuf: BytesMut::new(),
            input_paused: false,
            outbox: Outbox::default(),
            events: VecDeque::new(),
            peer: Limits::BASELINE,
            jobs: BTreeMap::new(),
            ready: VecDeque::new(),
            own_max: max_frame_payload,
            zstd: None,
            compress_out: false,
            bulk_wire_bytes: 0,
            bulk_plain_bytes: 0,
        }
    }

    /// Both HELLOs announced `ZSTD`: accept compressed frames from now on, and compress
    /// our own bulk frames at `level` when `send` is set.
    pub(crate) fn enable_zstd(&mut self, level: i32, send: bool) {
        self.zstd = Some(Codec::new(level));
        self.compress_out = send;
    }

    /// Whether bulk frames we send now go out compressed (when that shrinks them).
    pub(crate) fn compresses(&self) -> bool {
        self.zstd.is_some() && self.compress_out
    }

    /// Inflates a compressed SOURCE or DATA frame, bounded by our own frame limit; any
    /// other frame passes as it is. A compressed frame on a connection that did not
    /// negotiate zstd is a protocol error.
    fn inflate(&mut self, frame: Frame) -> Result<Frame, ConnectionError> {
        let own_max = self.own_max;
        let mut inflate = |data: &Bytes| match self.zstd.as_mut() {
            Some(codec) => codec
                .decompress(data, own_max)
                .map_err(|e| protocol(e.code(), e.to_string())),
            None => Err(protocol(
                ErrorCode::PROTOCOL,
                "compressed frame on a connection that did not negotiate ZSTD".into(),
            )),
        };
        Ok(match frame {
            Frame::Source {
                job,
                data,
                fin,
                zstd: true,
            } => Frame::Source {
                job,
                data: inflate(&data)?,
                fin,
                zstd: false,
            },
            Frame::Data {
                job,
                data,
                fin,
                zstd: true,
            } => Frame::Data {
                job,
                data: inflate(&data)?,
                fin,
                zstd: false,
            },
            other => other,
        })
    }

    /// Compresses a bulk frame's payload when that makes it smaller.
    fn deflate(&mut self, frame: Frame) -> Frame {
        let Some(codec) = self.zstd.as_mut().filter(|_| self.compress_out) else {
            return frame;
        };
        match frame {
            Frame::Source {
                job,
                data,
                fin,
                zstd: false,
            } => match codec.compress_if_smaller(&data) {
                Some(c) => Frame::Source {
                    job,
                    data: c,
                    fin,
                    zstd: true,
                },
                None => Frame::Source {
                    job,
                    data,
                    fin,
                    zstd: false,
                },
            },
            Frame::Data {
                job,
                data,
                fin,
                zstd: false,
            } => match codec.compress_if_smaller(&data) {
                Some(c) => Frame::Data {
                    job,
                    data: c,
                    fin,
                    zstd: true,
                },
                None => Frame::Data {
                    job,
                    data,
                    fin,
                    zstd: false,
                },
            },
            other => other,
        }
    }

    /// Whether bytes of an unfinished frame (or paused frames) are buffered.
    pub(crate) fn has_buffered_input(&self) -> bool {
        !self.inbuf.is_empty()
    }

    /// Sets the limits the peer announced for what we send.
    pub(crate) fn set_peer(&mut self, limits: Limits) {
        self.peer = limits;
        self.outbox.set_peer_max(limits.max_frame_payload);
    }

    /// Puts `id` in the round-robin queue if it has data and is not queued already.
    pub(crate) fn mark_ready(&mut self, id: u32) {
        if let Some(job) = self.jobs.get_mut(&id) {
            if job.has_data() {
                let flag = job.in_ready();
                if !*flag {
                    *flag = true;
                    self.ready.push_back(id);
                }
            }
        }
    }

    /// Removes `id` if both its directions are over; says whether it did.
    pub(crate) fn forget_if_done(&mut self, id: u32) -> bool {
        if self.jobs.get(&id).is_some_and(CoreJob::is_done) {
            self.jobs.remove(&id);
            true
        } else {
            false
        }
    }

    /// Drops every job (the connection is over).
    pub(crate) fn clear_jobs(&mut self) {
        self.jobs.clear();
        self.ready.clear();
    }

    /// Fails the connection: queued control frames are dropped (a bulk frame already
    /// started is finished, so the stream stays well-framed), ERROR tells the peer why
    /// when `send` is set and the peer did not fail first, and every job is dropped.
    pub(crate) fn fail(&mut self, error: &ConnectionError, send: bool) {
        self.outbox.clear_frames();
        if send && !matches!(error, ConnectionError::PeerError { .. }) {
            let frame = Frame::Error {
                code: error.code(),
                message: truncate_message(&error.to_string()),
            };
            self.outbox.control(&frame);
        }
        self.clear_jobs();
    }

    /// Whether the driver should read more: not paused, and no frame's worth buffered.
    pub(crate) fn wants_input(&self, paused: bool, max_frame_payload: u32) -> bool {
        !paused && self.inbuf.len() <= max_frame_payload as usize + HEADER_LEN
    }

    /// Whether input paused earlier may be decoded now that `paused` no longer holds.
    pub(crate) fn has_paused_input(&self, paused: bool) -> bool {
        self.input_paused && !paused && !self.inbuf.is_empty()
    }
}

/// What an end supplies to the shared input loop and transmit path.
pub(crate) trait Endpoint {
    type Job: CoreJob;
    type Event;
    fn core(&mut self) -> &mut Core<Self::Job, Self::Event>;
    /// Whether the state machine is in its closed state (output may still be queued).
    fn is_over(&self) -> bool;
    /// Handles one decoded frame.
    fn on_frame(&mut self, now: Instant, frame: Frame) -> Result<(), ConnectionError>;
    /// Ends the connection; with `send` an ERROR frame tells the peer why.
    fn fail_with(&mut self, error: ConnectionError, send: bool);
    /// Whether decoding must wait (output for the peer is backed up).
    fn decoding_paused(&self) -> bool {
        false
    }
    /// Input progressed at `now`: a frame started or a whole frame arrived.
    fn on_progress(&mut self, _now: Instant) {}
    /// Largest bulk payload to put in one frame.
    fn chunk_size(&self) -> usize;
    /// `id` sent its last bulk frame: forget it if it is done.
    fn after_last_frame(&mut self, id: u32);
}

/// The input loop both ends share: buffer, decode frame by frame, hand each to the end,
/// stop on a failure, on the closed state, or when decoding is paused.
pub(crate) fn handle_input<E: Endpoint>(end: &mut E, now: Instant, data: &[u8]) {
    if end.is_over() {
        return;
    }
    if !end.core().has_buffered_input() && !data.is_empty() {
        // A frame starts: progress counts from its first byte.
        end.on_progress(now);
    }
    end.core().inbuf.extend_from_slice(data);
    loop {
        // Backed-up output pauses decoding; the bytes wait in the buffer.
        if end.decoding_paused() {
            end.core().input_paused = true;
            return;
        }
        let core = end.core();
        core.input_paused = false;
        match core.decoder.decode(&mut core.inbuf) {
            Ok(Some(frame)) => {
                // Progress is a whole frame, not a byte: a peer trickling one byte at a
                // time cannot pass for a live one.
                end.on_progress(now);
                let result = end
                    .core()
                    .inflate(frame)
                    .and_then(|frame| end.on_frame(now, frame));
                if let Err(e) = result {
                    end.fail_with(e, true);
                }
                if end.is_over() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                end.fail_with(protocol(e.code(), e.to_string()), true);
                return;
            }
        }
    }
}

/// The transmit path both ends share: queued frames first, then one bulk frame from the
/// next ready job.
pub(crate) fn poll_transmit<E: Endpoint>(end: &mut E) -> Option<Bytes> {
    if let Some(bytes) = end.core().outbox.pop() {
        return Some(bytes);
    }
    if end.is_over() {
        return None;
    }
    let chunk = end.chunk_size();
    loop {
        let core = end.core();
        let id = core.ready.pop_front()?;
        let Some(job) = core.jobs.get_mut(&id) else {
            continue;
        };
        *job.in_ready() = false;
        let compress = job.compress();
        let Some((frame, last)) = job.next_frame(id, chunk) else {
            continue;
        };
        let plain = bulk_len(&frame);
        let frame = if compress { core.deflate(frame) } else { frame };
        core.bulk_plain_bytes += plain;
        core.bulk_wire_bytes += bulk_len(&frame);
        let encoded = match frame.encode(core.peer.max_frame_payload) {
            Ok(e) => e,
            Err(e) => {
                // Unreachable: sizes are bounded by the peer's limit and heads were
                // validated when the job was started or its result queued.
                end.fail_with(internal(e.to_string()), true);
                return end.core().outbox.pop();
            }
        };
        if last {
            end.after_last_frame(id);
        } else {
            end.core().mark_ready(id);
        }
        end.core().outbox.set_tail(encoded.tail);
        return Some(encoded.head);
    }
}

/// Bytes of a bulk frame's payload that count as body or source (0 for other frames).
fn bulk_len(frame: &Frame) -> u64 {
    match frame {
        Frame::Source { data, .. } | Frame::Data { data, .. } => data.len() as u64,
        Frame::Result { body, .. } => body.len() as u64,
        _ => 0,
    }
}

pub(crate) fn unexpected(reason: String) -> ConnectionError {
    protocol(ErrorCode::UNEXPECTED_FRAME, reason)
}

pub(crate) fn protocol(code: ErrorCode, reason: String) -> ConnectionError {
    ConnectionError::Protocol { code, reason }
}

pub(crate) fn internal(reason: String) -> ConnectionError {
    protocol(ErrorCode::INTERNAL, reason)
}
