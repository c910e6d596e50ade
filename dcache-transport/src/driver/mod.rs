//! The async driver: one task per connection running a sans-IO state machine (any
//! [`dcache_proto::Connection`]) over any `AsyncRead + AsyncWrite`.
//!
//! It follows the run loop of `dcache-proto`'s crate documentation. Each turn:
//! 1. input: the last `select!` arm fed what it read (or the end of stream); input the
//!    machine paused while its output was backed up is resumed first thing;
//! 2. events: every event goes to the owner (the owner may wait: that is the read-side
//!    backpressure, since no more input is read meanwhile);
//! 3. transmit: bytes are taken from `poll_transmit` only when the previous write
//!    finished, so at most one write buffer is held and nothing is committed to the
//!    socket before it has room (an early result can still stop an upload that the socket
//!    has not taken); once nothing more is queued the stream is flushed, since a TLS
//!    stream may hold records a write accepted;
//! 4. wait for whichever comes first: a command, the socket accepting bytes, bytes to read
//!    (only while the machine `wants_input`), or the machine's timer.
//!
//! Every `await` in the select is cancel-safe (`read_buf`, `write`, `flush`, channel
//! receive, the pinned timer), so no byte is lost when another branch wins.

mod client;
mod server;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use dcache_proto::{Connection, ErrorCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use client::{ClientHandle, JobError, JobUpdate, OpenJob, spawn_client};
pub use server::{ServerCommand, ServerConnHandle, spawn_server_connection};

/// Read buffer size: one read takes at most this much from the socket.
const READ_CHUNK: usize = 64 * 1024;
/// Pieces are gathered into one write up to this size; one this large goes alone.
const COALESCE: usize = 16 * 1024;
/// Pieces below this size are small (small frames, frame heads); larger ones are payloads.
const SMALL_PIECE: usize = 1024;

/// A fresh authentication challenge from the operating system's random source. `None`
/// if that source fails; the connection is then made without a nonce, and a state machine
/// configured with a token refuses to authenticate rather than run with a guessable one.
fn fresh_nonce() -> Option<dcache_proto::Nonce> {
    let mut nonce = [0u8; dcache_proto::AUTH_LEN];
    getrandom::fill(&mut nonce).ok()?;
    Some(nonce)
}

/// The owner side of a driven connection: takes events, supplies commands.
pub(crate) trait Owner<M: Connection> {
    type Command;
    /// Handles one event; may wait (backpressure).
    async fn on_event(&mut self, machine: &mut M, event: M::Event);
    /// The next command; `None` when the owner has gone away for good.
    async fn next_command(&mut self) -> Option<Self::Command>;
    /// Applies a command to the machine.
    fn apply(&mut self, machine: &mut M, command: Self::Command, now: Instant);
    /// The owner went away (its command source ended).
    fn on_owner_gone(&mut self, machine: &mut M);
}

/// The clock the driver passes in: tokio's, so paused test time drives the state machines
/// too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs `machine` over `stream` until the connection is closed and flushed.
pub(crate) async fn drive<M, S, O>(mut machine: M, stream: S, mut owner: O)
where
    M: Connection,
    S: AsyncRead + AsyncWrite + Send,
    O: Owner<M>,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut pending = Bytes::new();
    let mut carry = None;
    let mut read_done = false;
    let mut owner_open = true;
    // Bytes a write accepted may still sit in the stream's own buffer (TLS keeps the
    // records it made until the socket takes them); they are flushed once nothing more is
    // queued, or the peer would wait for them forever.
    let mut unflushed = false;
    // One timer for the connection's life, moved only when the machine's deadline moves:
    // a client with jobs open always has one, and re-registering it on every turn would
    // cost a timer-wheel insertion per frame.
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<tokio::time::Instant> = None;
    loop {
        if machine.has_paused_input() {
            machine.handle_input(now(), &[]);
        }
        while let Some(event) = machine.poll_event() {
            owner.on_event(&mut machine, event).await;
        }
        if pending.is_empty() {
            pending = next_write(&mut machine, &mut carry);
        }
        if pending.is_empty() && machine.is_closed() {
            // Best effort: the peer may already be gone.
            let _ = writer.shutdown().await;
            // Deliver the Closed event raised by a final input, if any.
            while let Some(event) = machine.poll_event() {
                owner.on_event(&mut machine, event).await;
            }
            return;
        }
        let deadline = machine.poll_timeout().map(tokio::time::Instant::from_std);
        if deadline != armed {
            if let Some(d) = deadline {
                timer.as_mut().reset(d);
            }
            armed = deadline;
        }
        let can_read = !read_done && machine.wants_input();
        tokio::select! {
            biased;
            cmd = owner.next_command(), if owner_open => match cmd {
                Some(cmd) => owner.apply(&mut machine, cmd, now()),
                None => {
                    owner_open = false;
                    owner.on_owner_gone(&mut machine);
                }
            },
            res = write_or_flush(&mut writer, &pending), if !pending.is_empty() || unflushed => match res {
                Ok(Some(n)) if n > 0 => {
                    let _ = pending.split_to(n);
                    unflushed = true;
                }
                Ok(None) => unflushed = false,
                other => {
                    // The peer is gone: nothing more can be written, so nothing more is
                    // worth reading. End the machine and discard what it still queues.
                    let reason = match other {
                        Err(e) if explains_itself(&e) => format!("transport failed: {e}"),
                        _ => "transport failed".to_owned(),
                    };
                    pending = Bytes::new();
                    read_done = true;
                    machine.close(ErrorCode::INTERNAL, &reason);
                    drain_to_closed(&mut machine);
                }
            },
            res = reader.read_buf(&mut rbuf), if can_read => match res {
                Err(e) if explains_itself(&e) => {
                    // A TLS peer that refused us, or bytes that are not TLS: the reason is
                    // what the user needs, so the connection ends with it.
                    read_done = true;
                    machine.close(ErrorCode::INTERNAL, &format!("transport failed: {e}"));
                }
                Ok(0) | Err(_) => {
                    read_done = true;
                    machine.handle_eof(now());
                }
                Ok(_) => {
                    machine.handle_input(now(), &rbuf);
                    rbuf.clear();
                    if rbuf.capacity() < READ_CHUNK {
                        rbuf.reserve(READ_CHUNK);
                    }
                }
            },
            () = &mut timer, if armed.is_some() => {
                // Fired: re-armed next turn even if the deadline is unchanged.
                armed = None;
                machine.handle_timeout(now());
            },
            else => {
                // Nothing can happen any more: the peer stopped sending, the owner left,
                // nothing is left to write and no timer is armed.
                machine.close(ErrorCode::INTERNAL, "transport failed");
                drain_to_closed(&mut machine);
            }
        }
    }
}

/// Writes `pending`, or flushes the stream when nothing is pending (`None`): one branch
/// of the driver's select, since both need the writer. Cancel-safe, as `write` and
/// `flush` are.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pending: &[u8],
) -> std::io::Result<Option<usize>> {
    if pending.is_empty() {
        writer.flush().await.map(|()| None)
    } else {
        writer.write(pending).await.map(Some)
    }
}

/// Whether a read error says more than "the peer went away": a TLS stream reports a
/// certificate refusal as `PermissionDenied` and a broken or non-TLS byte stream as
/// `InvalidData`. Resets and the like mean only that the peer is gone, the same as the end
/// of the stream.
fn explains_itself(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidData
    )
}

/// Takes the next write: pieces gathered in order, or one piece of `COALESCE` bytes or
/// more alone.
///
/// A payload (a piece of `SMALL_PIECE` bytes or more) is never glued behind the small
/// pieces a write began with: it is kept in `carry` to begin the next write, so small
/// frames such as JOB and HASH leave in a packet of their own instead of waiting for a
/// full-size one to serialize. That is worth a packet's serialization time on every hit.
///
/// What follows a payload waits for it on the wire anyway, so it is gathered behind it:
/// further payloads until the write holds `COALESCE` bytes, small pieces (the next frame's
/// head among them) up to twice that. With many jobs in flight, results and uploads then
/// share writes, and a frame's head does not go in a write of its own, apart from its
/// payload: two writes per frame cost a third to half of the throughput at 256 hits in
/// flight on one connection.
fn next_write<M: Connection>(machine: &mut M, carry: &mut Option<Bytes>) -> Bytes {
    let now = now();
    let Some(first) = carry.take().or_else(|| machine.poll_transmit(now)) else {
        return Bytes::new();
    };
    if first.len() >= COALESCE {
        return first;
    }
    let began_small = first.len() < SMALL_PIECE;
    let mut buf = BytesMut::with_capacity(COALESCE);
    buf.extend_from_slice(&first);
    while let Some(next) = machine.poll_transmit(now) {
        let large = next.len() >= SMALL_PIECE;
        if large && (began_small || buf.len() >= COALESCE) {
            *carry = Some(next);
            break;
        }
        buf.extend_from_slice(&next);
        if buf.len() >= if began_small { COALESCE } else { 2 * COALESCE } {
            break;
        }
    }
    buf.freeze()
}

/// Writes are impossible: discard output until the machine reports closed.
fn drain_to_closed<M: Connection>(machine: &mut M) {
    let now = now();
    // Closed machines produce only what was queued before closing, so this ends; the
    // bound is a guard against a machine bug turning into a hang.
    for _ in 0..1_000_000 {
        if machine.poll_transmit(now).is_none() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Hands out scripted pieces; nothing else happens.
    struct Script(VecDeque<Bytes>);

    impl Connection for Script {
        type Event = ();
        fn handle_input(&mut self, _: Instant, _: &[u8]) {}
        fn handle_eof(&mut self, _: Instant) {}
        fn handle_timeout(&mut self, _: Instant) {}
        fn poll_transmit(&mut self, _: Instant) -> Option<Bytes> {
            self.0.pop_front()
        }
        fn poll_event(&mut self) -> Option<()> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn is_closed(&self) -> bool {
            self.0.is_empty()
        }
        fn wants_input(&self) -> bool {
            false
        }
        fn has_paused_input(&self) -> bool {
            false
        }
        fn close(&mut self, _: ErrorCode, _: &str) {}
    }

    /// The lengths of the writes the driver makes of `pieces`, checking that the bytes
    /// come out whole and in order.
    fn writes(pieces: &[usize]) -> Vec<usize> {
        let script: VecDeque<Bytes> = pieces
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect();
        let expected: Vec<u8> = script.iter().flat_map(|b| b.to_vec()).collect();
        let mut machine = Script(script);
        let mut carry = None;
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        loop {
            let w = next_write(&mut machine, &mut carry);
            if w.is_empty() {
                break;
            }
            lens.push(w.len());
            out.extend_from_slice(&w);
        }
        assert_eq!(out, expected);
        lens
    }

    #[test]
    fn small_frames_leave_before_a_payload() {
        // JOB, HASH, a DATA head, then the 10 KiB source.
        assert_eq!(writes(&[80, 40, 12, 10_240]), [132, 10_240]);
        // A result head, then its body.
        assert_eq!(writes(&[30, 2_560]), [30, 2_560]);
        // A piece of the gathering size or more always goes alone.
        assert_eq!(
            writes(&[12, 64 << 10, 12, 64 << 10]),
            [12, 64 << 10, 12, 64 << 10]
        );
    }

    #[test]
    fn frames_behind_a_payload_share_writes() {
        // Many results in flight: head, body, head, body... Only the first head goes
        // alone; then each write starts with a body and ends with the next frame's head.
        let pieces: Vec<usize> = (0..64).flat_map(|_| [12, 2_580]).collect();
        let lens = writes(&pieces);
        assert_eq!(lens[0], 12);
        assert!(lens[1..].iter().all(|&n| n >= SMALL_PIECE), "{lens:?}");
        assert!(lens.len() <= 64 / 6 + 2, "{} writes: {lens:?}", lens.len());
    }
}
