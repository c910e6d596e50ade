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
//!    has not taken);
//! 4. wait for whichever comes first: a command, the socket accepting bytes, bytes to read
//!    (only while the machine `wants_input`), or the machine's timer.
//!
//! Every `await` in the select is cancel-safe (`read_buf`, `write`, channel receive,
//! the pinned timer), so no byte is lost when another branch wins.

mod client;
mod server;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use dcache_proto::{Connection, ErrorCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use client::{ClientHandle, JobError, spawn_client};
pub use server::{ServerCommand, ServerConnHandle, spawn_server_connection};

/// Read buffer size: one read takes at most this much from the socket.
const READ_CHUNK: usize = 64 * 1024;
/// Small pieces are gathered into one write up to this size.
const COALESCE: usize = 16 * 1024;
/// Pieces below this size are gathered; larger ones (payloads) go in writes of their own.
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
            res = writer.write(&pending), if !pending.is_empty() => match res {
                Ok(n) if n > 0 => {
                    let _ = pending.split_to(n);
                }
                _ => {
                    // The peer is gone: nothing more can be written, so nothing more is
                    // worth reading. End the machine and discard what it still queues.
                    pending = Bytes::new();
                    read_done = true;
                    machine.close(ErrorCode::INTERNAL, "transport failed");
                    drain_to_closed(&mut machine);
                }
            },
            res = reader.read_buf(&mut rbuf), if can_read => match res {
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

/// Takes the next write: a piece left over from the previous call, one large piece, or
/// several small pieces gathered. A large piece (a source or result payload) is never
/// glued behind small ones: it is kept in `carry` for the next write, so small frames such
/// as JOB and HASH leave in a packet of their own instead of waiting for a full-size one
/// to serialize. That is worth a packet's serialization time on every hit.
fn next_write<M: Connection>(machine: &mut M, carry: &mut Option<Bytes>) -> Bytes {
    if let Some(piece) = carry.take() {
        return piece;
    }
    let now = now();
    let Some(first) = machine.poll_transmit(now) else {
        return Bytes::new();
    };
    if first.len() >= SMALL_PIECE {
        return first;
    }
    let mut buf = BytesMut::with_capacity(COALESCE);
    buf.extend_from_slice(&first);
    while buf.len() < COALESCE {
        match machine.poll_transmit(now) {
            Some(next) if next.len() < SMALL_PIECE => buf.extend_from_slice(&next),
            Some(next) => {
                *carry = Some(next);
                break;
            }
            None => break,
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
