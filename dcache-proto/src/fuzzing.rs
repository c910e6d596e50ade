//! Entry points for the cargo-fuzz targets (see `fuzz/` in the repository). Each target is
//! a one-line call into a function here, so the logic is compiled, linted and unit-tested
//! with the crate. Every function panics only when an invariant of the crate is broken.
//!
//! Each function that runs a connection reads the real clock once, to get an origin for
//! its virtual clock (see [`origin`]); nothing else here or in the crate reads a clock.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::testing::{Pair, ReferenceServer, reference_compile};
use crate::{
    AuthKey, CacheKey, ClientConfig, ClientConnection, ClientEvent, Connection, DecodeError,
    FEATURE_AUTH, Frame, FrameDecoder, FrameHeader, FrameType, HEADER_LEN, Hello, JobDesc, JobId,
    KeyHasher, Limits, MAX_OUTPUTS, ServerConfig, ServerConnection, ServerEvent, Strategy,
};

/// The payload limit the decoding targets use: small, so length checks are reached.
const MAX: u32 = 64 * 1024;

/// An origin for a virtual clock.
///
/// `Instant` has no public constructor, so the one way to get a value is to read the clock.
/// Only differences from the origin are ever used, so which instant it is does not change
/// what an input does: runs stay reproducible. This is read once per input and nowhere else.
fn origin() -> Instant {
    Instant::now()
}

/// What decoding a byte stream gave.
struct Decoded {
    /// Frames with the number of wire bytes each came from.
    frames: Vec<(Frame, usize)>,
    /// The error that stopped decoding, if one did.
    error: Option<DecodeError>,
    /// Bytes taken by the frames returned.
    consumed: usize,
    /// Bytes left in the buffer at the end.
    buffered: usize,
}

/// Decodes `chunks` as one stream fed piece by piece, checking the decoder's own promises
/// on the way: "need more" consumes nothing, and a failed decoder stays failed.
fn decode_chunks(max: u32, chunks: &[&[u8]]) -> Decoded {
    let mut dec = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut consumed = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let n = before - buf.len();
                    consumed += n;
                    frames.push((f, n));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "need-more consumed bytes");
                    break;
                }
                Err(e) => {
                    assert!(dec.is_failed(), "decoder not failed after {e:?}");
                    let left = buf.len();
                    buf.extend_from_slice(&[0x0B, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
                    assert!(
                        dec.decode(&mut buf).is_err(),
                        "failed decoder accepted input"
                    );
                    return Decoded {
                        frames,
                        error: Some(e),
                        consumed,
                        buffered: left,
                    };
                }
            }
        }
    }
    Decoded {
        frames,
        error: None,
        consumed,
        buffered: buf.len(),
    }
}

/// Decodes arbitrary bytes with a [`FrameDecoder`]: never panics; every decoded frame
/// re-encodes (with [`Frame::encode`] at the decoder's limit) to exactly the bytes it came
/// from; when decoding stops without an error, what is left really is an incomplete frame.
pub fn decode_frames(data: &[u8]) {
    let d = decode_chunks(MAX, &[data]);
    let mut at = 0;
    for (f, n) in &d.frames {
        let enc = f.encode(MAX).expect("a decoded frame must re-encode");
        assert_eq!(enc.len(), *n, "re-encoded length differs: {f:?}");
        assert_eq!(
            &data[at..at + enc.head.len()],
            &enc.head[..],
            "head differs"
        );
        assert_eq!(
            &data[at + enc.head.len()..at + n],
            &enc.tail[..],
            "tail differs"
        );
        at += n;
    }
    assert_eq!(at, d.consumed);
    if d.error.is_none() {
        assert_eq!(d.consumed + d.buffered, data.len());
        if let Some(head) = data[d.consumed..].first_chunk::<HEADER_LEN>() {
            let h = FrameHeader::parse(head, MAX).expect("a waiting header is valid");
            assert!(
                HEADER_LEN + h.len as usize > d.buffered,
                "a whole frame was left undecoded"
            );
        }
    }
}

/// The first byte says how many of the next bytes (up to 15) choose split points; the rest
/// is a stream. Decoding it split at those points gives the same frames, the same error (or
/// the same need-more state) and the same consumption as decoding it in one piece.
pub fn chunked_equals_oneshot(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(n % 16).min(rest.len());
    let (cut_bytes, stream) = rest.split_at(cuts);
    let mut points: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| usize::from(b) * stream.len() / 255)
        .collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut at = 0;
    for p in points {
        chunks.push(&stream[at..p]);
        at = p;
    }
    chunks.push(&stream[at..]);
    let whole = decode_chunks(MAX, &[stream]);
    let split = decode_chunks(MAX, &chunks);
    assert_eq!(whole.frames, split.frames, "frames differ");
    assert_eq!(whole.error, split.error, "errors differ");
    assert_eq!(whole.consumed, split.consumed, "consumption differs");
    if whole.error.is_none() {
        assert_eq!(whole.buffered, split.buffered, "need-more state differs");
    }
}

/// A valid HELLO as either side would send it.
fn hello_bytes() -> Bytes {
    crate::testing::hello()
        .to_bytes(Limits::BASELINE.max_frame_payload)
        .unwrap_or_default()
}

/// Frame types a client sends.
const CLIENT_TYPES: &[FrameType] = &[
    FrameType::HELLO,
    FrameType::JOB,
    FrameType::HASH,
    FrameType::SOURCE,
    FrameType::ABORT,
    FrameType::ERROR,
    FrameType::STATS_REQUEST,
    FrameType::AUTH,
];

/// Frame types a server sends.
const SERVER_TYPES: &[FrameType] = &[
    FrameType::HELLO,
    FrameType::MISS,
    FrameType::EARLY_RESULT,
    FrameType::RESULT,
    FrameType::DATA,
    FrameType::ABORT,
    FrameType::ERROR,
    FrameType::GOAWAY,
    FrameType::STATS,
];

/// Checks what a connection transmitted: whole valid frames, each within `peer_max`, of the
/// types its side sends, HELLO (or ERROR) first and nothing after an ERROR.
fn check_output(out: &[u8], types: &[FrameType], peer_max: u32) -> Vec<Frame> {
    let d = decode_chunks(Limits::MAX_FRAME_PAYLOAD, &[out]);
    assert!(d.error.is_none(), "connection sent invalid frames: {d:?}");
    assert_eq!(d.buffered, 0, "connection sent a partial frame");
    let count = d.frames.len();
    let mut frames = Vec::with_capacity(count);
    for (i, (f, n)) in d.frames.into_iter().enumerate() {
        let ty = f.frame_type();
        assert!(types.contains(&ty), "connection sent {ty}");
        assert!(
            n - HEADER_LEN <= peer_max as usize,
            "{ty} of {n} bytes over the peer's limit {peer_max}"
        );
        if i == 0 {
            assert!(
                matches!(ty, FrameType::HELLO | FrameType::ERROR),
                "{ty} first"
            );
        } else {
            assert!(ty != FrameType::HELLO, "second HELLO sent");
        }
        if ty == FrameType::ERROR {
            assert_eq!(i + 1, count, "frames sent after ERROR");
        }
        frames.push(f);
    }
    frames
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frames, error {:?}, {} consumed, {} buffered",
            self.frames.len(),
            self.error,
            self.consumed,
            self.buffered
        )
    }
}

/// Splits fuzz input into delivery sizes chosen by a selector.
fn chunk_size(selector: u8) -> usize {
    [1, 7, 97, 4096][usize::from(selector) & 3]
}

/// One job as the server's owner saw it.
struct SeenJob {
    desc: JobDesc,
    source: Vec<u8>,
    looked_up: bool,
    /// SourceDone came: no more source or lookup.
    ended: bool,
    /// JobCancelled came (possibly after SourceDone: a cancel after the final SOURCE):
    /// nothing more at all.
    cancelled: bool,
}

/// The server events seen so far, and the invariants between them.
#[derive(Default)]
struct ServerTrack {
    client: Option<Hello>,
    closed: bool,
    last_job: u32,
    jobs: HashMap<JobId, SeenJob>,
}

impl ServerTrack {
    fn open(&mut self, job: JobId, what: &str) -> &mut SeenJob {
        let j = self
            .jobs
            .get_mut(&job)
            .unwrap_or_else(|| panic!("{what} for {job}, never started"));
        assert!(
            !j.ended && !j.cancelled,
            "{what} for {job}, which had ended"
        );
        j
    }

    fn on(&mut self, ev: &ServerEvent) {
        assert!(!self.closed, "event after Closed: {ev:?}");
        match ev {
            ServerEvent::Connected { client, .. } => {
                assert!(
                    self.client.is_none() && self.jobs.is_empty(),
                    "late Connected"
                );
                self.client = Some(client.clone());
            }
            ServerEvent::JobStarted { job, desc } => {
                assert!(self.client.is_some(), "job before Connected");
                assert!(job.0 > self.last_job, "{job} not above {}", self.last_job);
                self.last_job = job.0;
                self.jobs.insert(
                    *job,
                    SeenJob {
                        desc: desc.clone(),
                        source: Vec::new(),
                        looked_up: false,
                        ended: false,
                        cancelled: false,
                    },
                );
            }
            ServerEvent::Lookup { job, .. } => {
                let j = self.open(*job, "Lookup");
                assert!(!j.looked_up && j.source.is_empty(), "late Lookup");
                j.looked_up = true;
            }
            ServerEvent::Source { job, data } => {
                assert!(!data.is_empty(), "empty Source event");
                self.open(*job, "Source").source.extend_from_slice(data);
            }
            ServerEvent::SourceDone { job, key, len } => {
                let j = self.open(*job, "SourceDone");
                let mut h = KeyHasher::new(&j.desc);
                h.update(&j.source);
                assert_eq!(
                    h.finalize(),
                    *key,
                    "verified key is not the delivered bytes'"
                );
                assert_eq!(*len, j.source.len() as u64, "SourceDone length");
                j.ended = true;
            }
            ServerEvent::JobCancelled { job, .. } => {
                let j = self
                    .jobs
                    .get_mut(job)
                    .unwrap_or_else(|| panic!("JobCancelled for {job}, never started"));
                assert!(!j.cancelled, "JobCancelled twice for {job}");
                j.cancelled = true;
                j.ended = true;
            }
            ServerEvent::SourceSkipped { job, bytes } => {
                assert!(*bytes > 0, "SourceSkipped of nothing");
                let j = self
                    .jobs
                    .get(job)
                    .unwrap_or_else(|| panic!("SourceSkipped for {job}, never started"));
                assert!(!j.cancelled, "SourceSkipped after JobCancelled for {job}");
            }
            ServerEvent::Closed { .. } => self.closed = true,
            ServerEvent::StatsRequested => {}
        }
    }
}

/// Hands everything a server has to the application and the output, until it is idle,
/// resuming paused input as its output drains.
fn drain_server(
    conn: &mut ServerConnection,
    app: &mut ReferenceServer,
    track: &mut ServerTrack,
    out: &mut Vec<u8>,
    t: Instant,
) {
    // The crate's run loop: input (paused input resumed), events, transmit, until idle.
    loop {
        let mut progress = false;
        if conn.has_paused_input() {
            conn.handle_input(t, &[]);
            progress = true;
        }
        while let Some(ev) = conn.poll_event() {
            track.on(&ev);
            app.handle(conn, ev);
            progress = true;
        }
        while let Some(b) = conn.poll_transmit(t) {
            out.extend_from_slice(&b);
            progress = true;
        }
        if !progress {
            return;
        }
    }
}

/// A fresh [`ServerConnection`] fed arbitrary client bytes, with the reference application
/// ([`ReferenceServer`]) reacting to its events and every output drained.
///
/// The first byte chooses: a valid client HELLO in front (when even), the delivery size,
/// small limits (output queue, source length), and the order of a final far timeout and
/// end of stream. Invariants: no panic; only valid server frames out, within the client's
/// limit, nothing after ERROR; no event after `Closed`; events in a consistent order per
/// job; every `SourceDone` key is the key of the bytes actually delivered as `Source`.
pub fn server_input(data: &[u8]) {
    server_run(data);
}

/// [`server_input`], returning the frames the server sent.
fn server_run(data: &[u8]) -> Vec<Frame> {
    let now = origin();
    let first = data.first().copied().unwrap_or(0);
    // Bit 6: the server requires a token. With an even first byte the harness then also
    // does the client's side of the authentication, so the bytes after it reach an open
    // connection; with an odd one the input must get through (or fail) on its own.
    let key = (first & 0x40 != 0).then(|| AuthKey::from_token(b"fuzz"));
    let server_nonce = [7u8; 32];
    let conn_config = ServerConfig {
        limits: Limits {
            max_frame_payload: MAX,
            max_source_len: if first & 0x10 != 0 { 4096 } else { 1 << 20 },
            max_jobs: 16,
        },
        chunk_size: 1024,
        max_queued_output: if first & 0x08 != 0 { 256 } else { 64 * 1024 },
        auth: key.clone(),
        ..ServerConfig::default()
    };
    let mut conn = ServerConnection::with_nonce(conn_config, now, server_nonce);
    let mut app = ReferenceServer::default();
    let mut input = Vec::new();
    if first % 2 == 0 {
        match &key {
            None => input.extend_from_slice(&hello_bytes()),
            Some(key) => {
                let client_nonce = [3u8; 32];
                let hello = Frame::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    limits: Limits::default(),
                    features: FEATURE_AUTH,
                    extensions: Bytes::copy_from_slice(&client_nonce),
                });
                let auth = Frame::Auth {
                    proof: *key.client_proof(&server_nonce, &client_nonce).as_bytes(),
                };
                for f in [hello, auth] {
                    input.extend_from_slice(&f.to_bytes(MAX).unwrap_or_default());
                }
            }
        }
    }
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let mut track = ServerTrack::default();
    let mut t = now;
    for chunk in input.chunks(chunk_size(first >> 1)) {
        t += Duration::from_millis(1);
        conn.handle_input(t, chunk);
        drain_server(&mut conn, &mut app, &mut track, &mut out, t);
        conn.handle_timeout(t);
        drain_server(&mut conn, &mut app, &mut track, &mut out, t);
    }
    let late = t + Duration::from_secs(3600);
    if first & 0x20 != 0 {
        conn.handle_eof(late);
        drain_server(&mut conn, &mut app, &mut track, &mut out, late);
    }
    if conn.poll_timeout().is_some_and(|d| d <= late) {
        conn.handle_timeout(late);
        drain_server(&mut conn, &mut app, &mut track, &mut out, late);
    }
    conn.handle_eof(late);
    drain_server(&mut conn, &mut app, &mut track, &mut out, late);
    if track.closed {
        assert!(
            conn.is_closed(),
            "Closed reported but the connection is not"
        );
    }
    let peer_max = track
        .client
        .as_ref()
        .map_or(Limits::BASELINE.max_frame_payload, |h| {
            h.limits.max_frame_payload
        });
    check_output(&out, SERVER_TYPES, peer_max)
}

/// The source every `client_input` job has.
const CLIENT_SOURCE: &[u8] = b"hello";

/// One job as the client's owner saw it.
struct ClientJob {
    desc: JobDesc,
    strategy: Strategy,
    missed: bool,
    ended: bool,
}

/// The open job an event names.
fn job_event<'a>(
    jobs: &'a mut HashMap<JobId, ClientJob>,
    job: &JobId,
    what: &str,
) -> &'a mut ClientJob {
    let j = jobs
        .get_mut(job)
        .unwrap_or_else(|| panic!("{what} for {job}, never started"));
    assert!(!j.ended, "{what} for {job} after its end");
    j
}

/// A [`ClientConnection`] with four jobs started (speculative, ask-first, send-all, lookup)
/// and a stats request, fed arbitrary server bytes.
///
/// The first byte chooses: a valid server HELLO in front (when even), the delivery size,
/// a tiny chunk size and a tiny result limit. Invariants: no panic; no event after
/// `Closed`; `Miss`, `Done`, `Failed` and `NotCached` only for started jobs, one end per
/// job, MISS and early results only for hashed jobs, `NotCached` only for the lookup; byte counts consistent with the 5-byte sources;
/// results within the limit; output is valid client frames, within the server's limit,
/// JOB as started, HASH only for hashed jobs before their source, source bytes exactly a
/// prefix of the job's, and no source for an ask-first job that got no MISS.
pub fn client_input(data: &[u8]) {
    client_run(data);
}

/// [`client_input`], returning the events the client reported.
fn client_run(data: &[u8]) -> Vec<ClientEvent> {
    let now = origin();
    let first = data.first().copied().unwrap_or(0);
    let max_result_len = if first & 0x10 != 0 { 64 } else { 1 << 20 };
    let mut conn = ClientConnection::new(
        ClientConfig {
            limits: Limits {
                max_frame_payload: MAX,
                ..Limits::default()
            },
            chunk_size: if first & 0x08 != 0 { 2 } else { 4096 },
            max_result_len,
            ..ClientConfig::default()
        },
        now,
    );
    let mut jobs: HashMap<JobId, ClientJob> = HashMap::new();
    for (i, strategy) in [
        Strategy::Speculative,
        Strategy::AskFirst,
        Strategy::SendAll,
        Strategy::Lookup,
    ]
    .into_iter()
    .enumerate()
    {
        let desc = JobDesc {
            compiler: "cc".into(),
            language: "cpp-output".into(),
            args: vec![format!("-O{i}")],
            source_len: (i != 1).then_some(CLIENT_SOURCE.len() as u64),
            identity: None,
        };
        let key = CacheKey::compute(&desc, CLIENT_SOURCE);
        let job = conn
            .start_job_with(now, desc.clone(), Some(key), strategy)
            .expect("a fresh connection takes jobs");
        // The first job's source comes in two pieces.
        if i == 0 {
            conn.push_source(job, Bytes::from_static(&CLIENT_SOURCE[..2]), false)
                .expect("job is open");
            conn.push_source(job, Bytes::from_static(&CLIENT_SOURCE[2..]), true)
                .expect("job is open");
        } else if strategy != Strategy::Lookup {
            conn.push_source(job, Bytes::from_static(CLIENT_SOURCE), true)
                .expect("job is open");
        }
        jobs.insert(
            job,
            ClientJob {
                desc,
                strategy,
                missed: false,
                ended: false,
            },
        );
    }
    conn.request_stats()
        .expect("a fresh connection takes requests");
    let mut stats_wanted = 1u32;
    let mut input = Vec::new();
    if first % 2 == 0 {
        input.extend_from_slice(&hello_bytes());
    }
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let mut closed = false;
    let mut server: Option<Hello> = None;
    let mut events = Vec::new();
    // The crate's run loop after an input: events, then transmit.
    let mut step = |conn: &mut ClientConnection, t: Instant, out: &mut Vec<u8>| {
        while let Some(ev) = conn.poll_event() {
            assert!(!closed, "event after Closed: {ev:?}");
            match &ev {
                ClientEvent::Connected { server: h, .. } => {
                    assert!(server.is_none(), "second Connected");
                    server = Some(h.clone());
                }
                ClientEvent::Miss { job } => {
                    let j = job_event(&mut jobs, job, "Miss");
                    assert!(j.strategy != Strategy::SendAll, "Miss for send-all");
                    assert!(!j.missed, "second Miss");
                    j.missed = true;
                }
                ClientEvent::Done { job, outcome } => {
                    let j = job_event(&mut jobs, job, "Done");
                    j.ended = true;
                    assert_eq!(outcome.strategy, j.strategy);
                    if outcome.origin.is_early() {
                        assert!(j.strategy != Strategy::SendAll && !j.missed, "bad early");
                    }
                    let len = CLIENT_SOURCE.len() as u64;
                    assert!(outcome.source_bytes_sent <= len);
                    assert_eq!(
                        outcome.source_bytes_sent + outcome.source_bytes_skipped,
                        len
                    );
                    let r = &outcome.result;
                    assert!(r.body_len() <= max_result_len, "result over the limit");
                    assert!(r.outputs.len() <= MAX_OUTPUTS);
                    for o in &r.outputs {
                        assert!(!o.name.is_empty() && !o.name.contains(['/', '\\', '\0']));
                        assert!(o.name != "." && o.name != "..");
                    }
                }
                ClientEvent::Failed { job, .. } => job_event(&mut jobs, job, "Failed").ended = true,
                ClientEvent::TimedOut { job, .. } => {
                    job_event(&mut jobs, job, "TimedOut").ended = true;
                }
                ClientEvent::NotCached { job } => {
                    let j = job_event(&mut jobs, job, "NotCached");
                    assert_eq!(
                        j.strategy,
                        Strategy::Lookup,
                        "NotCached for a job with source"
                    );
                    j.ended = true;
                }
                ClientEvent::Stats(_) => {
                    assert!(stats_wanted > 0, "unrequested Stats");
                    stats_wanted -= 1;
                }
                ClientEvent::GoAway => {}
                ClientEvent::Closed { .. } => closed = true,
            }
            events.push(ev);
        }
        while let Some(b) = conn.poll_transmit(t) {
            out.extend_from_slice(&b);
        }
    };
    let mut t = now;
    step(&mut conn, t, &mut out);
    for chunk in input.chunks(chunk_size(first >> 1)) {
        t += Duration::from_millis(1);
        conn.handle_input(t, chunk);
        step(&mut conn, t, &mut out);
        conn.handle_timeout(t);
        step(&mut conn, t, &mut out);
    }
    let late = t + Duration::from_secs(3600);
    conn.handle_timeout(late);
    step(&mut conn, late, &mut out);
    conn.handle_eof(late);
    step(&mut conn, late, &mut out);
    assert!(conn.is_closed(), "not closed after end of stream");

    let peer_max = server
        .as_ref()
        .map_or(Limits::BASELINE.max_frame_payload, |h| {
            h.limits.max_frame_payload
        });
    let mut announced = HashSet::new();
    let mut hashed = HashSet::new();
    let mut sent: HashMap<JobId, (Vec<u8>, bool)> = HashMap::new();
    for f in check_output(&out, CLIENT_TYPES, peer_max) {
        match f {
            Frame::Job { job, desc } => {
                assert_eq!(desc, jobs[&job].desc, "JOB differs from the job started");
                assert!(announced.insert(job), "second JOB for {job}");
            }
            Frame::Hash { job, .. } => {
                assert!(announced.contains(&job), "HASH before JOB");
                assert!(
                    jobs[&job].strategy != Strategy::SendAll,
                    "HASH for send-all"
                );
                assert!(!sent.contains_key(&job), "HASH after SOURCE");
                assert!(hashed.insert(job), "second HASH");
            }
            Frame::Source { job, data, fin, .. } => {
                assert!(announced.contains(&job), "SOURCE before JOB");
                let j = &jobs[&job];
                assert!(j.strategy != Strategy::Lookup, "source sent for a lookup");
                if j.strategy == Strategy::AskFirst {
                    assert!(j.missed, "ask-first source without a MISS");
                }
                let s = sent.entry(job).or_default();
                assert!(!s.1, "SOURCE after FIN");
                s.0.extend_from_slice(&data);
                s.1 = fin;
                assert!(CLIENT_SOURCE.starts_with(&s.0), "source bytes differ");
                assert!(!fin || s.0 == CLIENT_SOURCE, "FIN before the whole source");
            }
            _ => {}
        }
    }
    events
}

// Tamperers match the harness hook, which takes a Vec so they can change the length.
#[allow(clippy::ptr_arg)]
fn tamper_flip(b: &mut Vec<u8>) {
    let mid = b.len() / 2;
    if let Some(x) = b.get_mut(mid) {
        *x ^= 0x5A;
    }
}

#[allow(clippy::ptr_arg)]
fn tamper_flip_first(b: &mut Vec<u8>) {
    if let Some(x) = b.first_mut() {
        *x ^= 0x01;
    }
}

fn tamper_drop(b: &mut Vec<u8>) {
    b.truncate(b.len().saturating_sub(3));
}

fn tamper_dup(b: &mut Vec<u8>) {
    let copy = b.clone();
    b.extend_from_slice(&copy);
}

/// A source made from two op bytes: up to about 24 KiB, a pattern seeded by `c`, an
/// `#error` prefix (a failing compile) when `c % 8 == 0`. Equal bytes give equal sources,
/// so repeated jobs hit the cache.
fn op_source(b: u8, c: u8) -> Bytes {
    let len = usize::from(b) * 97 + usize::from(c % 7);
    let mut v: Vec<u8> = (0..len).map(|i| c.wrapping_add((i % 251) as u8)).collect();
    if c % 8 == 0 {
        let n = v.len().min(6);
        v[..n].copy_from_slice(&b"#error"[..n]);
    }
    Bytes::from(v)
}

/// Deliveries the final runs of `pair_ops` may take before the pair counts as stuck.
const PAIR_STEPS: usize = 200_000;

/// A [`Pair`] driven by operations read from `data`.
///
/// The first byte configures the pair: strategy (bits 0-1), small chunks (bit 2), a 5 ms
/// compile time (bit 3), latency (bits 4-5), bandwidth (bit 6) and the server's job limit
/// at the 16 baseline (bit 7). Then every 3 bytes `a b c` are one operation chosen by
/// `a % 10`: submit a job (0-2; source from `b c`, declared length when `a & 0x10`, a
/// wrong one when `a & 0x30 == 0x30`; a lookup of that source's key instead for 2 with
/// `a & 0x40`), cancel one (3), request stats (4), advance time (5),
/// run (6), choose a tamperer for client-to-server bytes (7), server GOAWAY (8), client
/// shutdown (9). At most 64 operations.
///
/// Invariants: no panic; the pair goes quiet within a bounded number of steps; every
/// `Done` carries exactly [`reference_compile`] of its job's description and source (a
/// HASH-less job whose bytes were altered in flight excepted: nothing can tell); no job
/// ends twice, no event for a job after it was cancelled, no client event after `Closed`;
/// the server's cache holds, under any submitted job's key, only that job's result; and
/// with nothing tampered or shut down, every job ends (a GOAWAY included) or the
/// connection closes.
pub fn pair_ops(data: &[u8]) {
    pair_run(data);
}

/// [`pair_ops`], returning the pair at the end.
fn pair_run(data: &[u8]) -> Option<Pair> {
    let (&first, ops) = data.split_first()?;
    let strategy = match first % 4 {
        1 => Strategy::AskFirst,
        2 => Strategy::SendAll,
        _ => Strategy::Speculative,
    };
    let small = first & 0x04 != 0;
    let latency = [0, 100, 1_000, 20_000][usize::from(first >> 4) & 3];
    let mut p = Pair::new(
        ClientConfig {
            strategy,
            chunk_size: if small { 512 } else { 4096 },
            ..ClientConfig::default()
        },
        ServerConfig {
            chunk_size: if small { 1024 } else { 64 * 1024 },
            limits: Limits {
                max_jobs: if first & 0x80 != 0 { 16 } else { 256 },
                ..Limits::default()
            },
            ..ServerConfig::default()
        },
        Duration::from_micros(latency),
        if first & 0x40 != 0 { 10_000_000 } else { 0 },
        u64::from(first),
        origin(),
    );
    if first & 0x08 != 0 {
        p.app.compile_time = Duration::from_millis(5);
    }
    let mut expect: HashMap<JobId, (JobDesc, Bytes)> = HashMap::new();
    let mut jobs = Vec::new();
    let mut cancelled_at: HashMap<JobId, usize> = HashMap::new();
    let mut lookups = HashSet::new();
    let mut tampered = false;
    let mut shut_down = false;
    for op in ops.chunks(3).take(64) {
        let [a, b, c] = [0, 1, 2].map(|i| op.get(i).copied().unwrap_or(0));
        match a % 10 {
            0..=2 => {
                let src = op_source(b, c);
                let len = src.len() as u64;
                let desc = JobDesc {
                    compiler: "cc".into(),
                    language: "cpp-output".into(),
                    args: vec![format!("-O{}", b % 3)],
                    source_len: if a & 0x30 == 0x30 {
                        Some(len + 1)
                    } else {
                        (a & 0x10 != 0).then_some(len)
                    },
                    identity: None,
                };
                // A lookup (by the key of this source, never sent) when `a` is 2 mod 10
                // with bit 6 set.
                let lookup = a % 10 == 2 && a & 0x40 != 0;
                let job = if lookup {
                    p.lookup(desc.clone(), &src)
                } else {
                    p.submit(desc.clone(), src.clone())
                };
                if let Some(job) = job {
                    expect.insert(job, (desc, src));
                    jobs.push(job);
                    if lookup {
                        lookups.insert(job);
                    }
                }
            }
            3 => {
                if let Some(&job) = jobs.get(usize::from(b) % jobs.len().max(1)) {
                    // Hand out what the client already reported, so the events recorded
                    // from here on are the ones that came after the cancel.
                    p.pump();
                    if p.client.cancel(job).is_ok() {
                        cancelled_at.entry(job).or_insert(p.client_events.len());
                    }
                }
            }
            4 => {
                let _ = p.client.request_stats();
            }
            5 => p.advance(if c % 4 == 0 {
                Duration::from_secs(u64::from(b))
            } else {
                Duration::from_millis(u64::from(b))
            }),
            6 => {
                p.run(10_000);
            }
            7 => {
                tampered |= b % 5 != 0;
                p.alter_c2s = match b % 5 {
                    0 => None,
                    1 => Some(tamper_flip),
                    2 => Some(tamper_drop),
                    3 => Some(tamper_dup),
                    _ => Some(tamper_flip_first),
                };
            }
            8 => p.server.goaway(),
            _ => {
                shut_down = true;
                p.client.shutdown();
            }
        }
    }
    p.alter_c2s = None;
    assert!(p.run(PAIR_STEPS), "pair did not go quiet");
    p.advance(Duration::from_secs(3600));
    assert!(p.run(PAIR_STEPS), "pair did not go quiet after the timers");

    let mut ended = HashSet::new();
    let mut closed = false;
    for (i, (_, ev)) in p.client_events.iter().enumerate() {
        assert!(!closed, "client event after Closed: {ev:?}");
        let job = match ev {
            ClientEvent::Done { job, .. }
            | ClientEvent::Failed { job, .. }
            | ClientEvent::Miss { job }
            | ClientEvent::NotCached { job }
            | ClientEvent::TimedOut { job, .. } => *job,
            ClientEvent::Closed { .. } => {
                closed = true;
                continue;
            }
            _ => continue,
        };
        assert!(expect.contains_key(&job), "event for a job never started");
        assert!(
            !ended.contains(&job),
            "event for {job} after its end: {ev:?}"
        );
        if let Some(&at) = cancelled_at.get(&job) {
            assert!(i < at, "event for {job} after it was cancelled: {ev:?}");
        }
        if let ClientEvent::Done { outcome, .. } = ev {
            ended.insert(job);
            let expected = if lookups.contains(&job) {
                Strategy::Lookup
            } else {
                strategy
            };
            assert_eq!(outcome.strategy, expected);
            // A HASH-less upload has no integrity check of its own: bytes altered on the
            // wire are compiled as received (the transport's integrity is all there is).
            // With HASH, the server verifies what it received, so a result is only ever
            // the one for the job's own source.
            if tampered && outcome.strategy == Strategy::SendAll {
                continue;
            }
            let (desc, src) = &expect[&job];
            // Compared without printing both objects: they can be megabytes.
            assert!(
                outcome.result == reference_compile(desc, src),
                "{job}: result for other bytes than the job's"
            );
        } else if let ClientEvent::Failed { .. } = ev {
            ended.insert(job);
        } else if let ClientEvent::NotCached { .. } = ev {
            assert!(lookups.contains(&job), "NotCached for {job}, not a lookup");
            ended.insert(job);
        } else if let ClientEvent::TimedOut { .. } = ev {
            // The reference server always answers: only bytes lost or altered on the way
            // can leave a job without progress.
            assert!(tampered, "{job} timed out on an honest link: {ev:?}");
            ended.insert(job);
        }
    }
    // Whatever went over the wire, a result stored under a submitted job's key is that
    // job's: the server stores only under the key of what it received.
    let by_key: HashMap<CacheKey, &(JobDesc, Bytes)> = expect
        .values()
        .map(|e| (CacheKey::compute(&e.0, &e.1), e))
        .collect();
    for (key, result) in &p.app.cache {
        if let Some((desc, src)) = by_key.get(key) {
            assert!(
                *result == reference_compile(desc, src),
                "cache poisoned under {}",
                key.to_hex()
            );
        }
    }
    // With nothing lost or altered and no shutdown, every job ends, GOAWAY or not: a JOB
    // that crossed GOAWAY is answered (ABORT `SHUTTING_DOWN`) or ended by GOAWAY's
    // `last_job` (PROTOCOL.md section 6).
    if !tampered && !shut_down && !closed {
        for job in &jobs {
            assert!(
                ended.contains(job) || cancelled_at.contains_key(job),
                "{job} never ended"
            );
        }
    }
    Some(p)
}

/// Compressed payloads (feature `ZSTD`), on their own and through a server that
/// negotiated the feature.
///
/// The first byte chooses the receiver's frame limit (small or large); the rest is the
/// payload of a final compressed SOURCE. Invariants: no panic; `decompress_payload`
/// returns exactly the declared number of bytes, never more than the limit; the same
/// payload sent to a server that negotiated `ZSTD` either ends the connection with
/// `PROTOCOL` or `FRAME_TOO_LARGE` (exactly when `decompress_payload` refuses it) or is
/// taken as the job's whole source, reported under the key of the inflated bytes; and any
/// plain data compresses and inflates back to itself.
pub fn compressed_frames(data: &[u8]) {
    let Some((&first, payload)) = data.split_first() else {
        return;
    };
    let limit = if first & 1 == 0 { MAX } else { 1 << 20 };
    let inflated = crate::decompress_payload(payload, limit);
    if let Ok(out) = &inflated {
        let declared = payload
            .first_chunk::<4>()
            .map_or(0, |p| u32::from_be_bytes(*p) as usize);
        assert_eq!(
            out.len(),
            declared,
            "inflated length is not the declared one"
        );
        assert!(out.len() <= limit as usize, "inflated past the limit");
    }
    if let Some(c) = crate::compress_payload(payload, 1) {
        let back = crate::decompress_payload(&c, u32::MAX).expect("own payload inflates");
        assert_eq!(&back[..], payload, "round trip changed the data");
    }

    let now = origin();
    let mut conn = ServerConnection::new(
        ServerConfig {
            limits: Limits {
                max_frame_payload: limit,
                ..Limits::default()
            },
            ..ServerConfig::default()
        },
        now,
    );
    let desc = JobDesc {
        compiler: "cc".into(),
        language: "cpp-output".into(),
        args: vec!["-c".into()],
        source_len: None,
        identity: None,
    };
    let mut input = Vec::new();
    for f in [
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 2,
            limits: Limits::default(),
            features: crate::FEATURE_ZSTD,
            extensions: Bytes::new(),
        }),
        Frame::Job {
            job: JobId(1),
            desc: desc.clone(),
        },
        Frame::Source {
            job: JobId(1),
            data: Bytes::copy_from_slice(payload),
            fin: true,
            zstd: true,
        },
    ] {
        match f.to_bytes(limit) {
            Ok(b) => input.extend_from_slice(&b),
            // A payload over the frame limit cannot be sent at all.
            Err(_) => return,
        }
    }
    conn.handle_input(now, &input);
    let mut key = None;
    let mut error = None;
    while let Some(e) = conn.poll_event() {
        match e {
            ServerEvent::SourceDone { key: k, .. } => key = Some(k),
            ServerEvent::Closed {
                error: Some(crate::ConnectionError::Protocol { code, .. }),
            } => error = Some(code),
            _ => {}
        }
    }
    match inflated {
        Ok(out) => {
            assert_eq!(error, None, "a valid payload failed the connection");
            assert_eq!(key, Some(CacheKey::compute(&desc, &out)), "wrong key");
        }
        Err(e) => {
            assert_eq!(key, None, "a refused payload reached the job");
            assert_eq!(error, Some(e.code()), "refused with another code");
        }
    }
}

/// Seed inputs: real frame sequences for each target (also written to `fuzz/corpus/` by
/// the ignored `write_seed_corpus` test).
#[cfg(test)]
mod seeds {
    use super::*;
    use crate::{ErrorCode, OutputMeta, ResultHead, ResultOrigin, Stat};

    fn enc(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&f.to_bytes(MAX).expect("seed frames encode"));
        }
        out
    }

    fn desc(arg: &str, len: Option<u64>) -> JobDesc {
        JobDesc {
            compiler: "cc".into(),
            language: "cpp-output".into(),
            args: vec![arg.into()],
            source_len: len,
            identity: None,
        }
    }

    fn src(job: u32, data: &'static [u8], fin: bool) -> Frame {
        Frame::Source {
            job: JobId(job),
            data: Bytes::from_static(data),
            fin,
            zstd: false,
        }
    }

    /// What clients send: HELLO (or not) and jobs of every strategy.
    pub(super) fn client_streams() -> Vec<Vec<u8>> {
        let d1 = desc("-O2", Some(6));
        // Job 2 names its compiler (protocol version 2), so both JOB flags are fuzzed.
        let d2 = JobDesc {
            identity: Some(crate::CompilerIdentity::new(
                "gcc 12",
                "x86_64-linux-gnu",
                [7; 32],
            )),
            ..desc("-O0", None)
        };
        let hello = Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            limits: Limits::default(),
            features: 0,
            extensions: Bytes::new(),
        });
        let job = |id, d: &JobDesc| Frame::Job {
            job: JobId(id),
            desc: d.clone(),
        };
        let hash = |id, d: &JobDesc, s: &[u8]| Frame::Hash {
            job: JobId(id),
            key: CacheKey::compute(d, s),
        };
        vec![
            // Speculative, source in two chunks, then the same job again (a hit).
            enc(&[
                hello.clone(),
                job(1, &d1),
                hash(1, &d1, b"int x;"),
                src(1, b"int ", false),
                src(1, b"x;", true),
                job(2, &d1),
                hash(2, &d1, b"int x;"),
                src(2, b"int x;", true),
            ]),
            // Without HELLO (the target adds one): send-all, stats, an ignorable frame.
            enc(&[
                job(1, &d2),
                src(1, b"#error", true),
                Frame::StatsRequest,
                Frame::Ignorable {
                    ty: FrameType(0x80),
                    flags: 3,
                    job: 0,
                    payload: Bytes::from_static(b"x"),
                },
            ]),
            // Ask-first, then a cancel, then a hash mismatch, then ERROR.
            enc(&[
                hello.clone(),
                job(1, &d1),
                hash(1, &d1, b"int x;"),
                job(2, &d2),
                Frame::Abort {
                    job: JobId(2),
                    code: ErrorCode::CANCELLED,
                    message: "cancelled".into(),
                },
                src(1, b"int y;", true),
                Frame::Error {
                    code: ErrorCode::PROTOCOL,
                    message: "bye".into(),
                },
            ]),
            // A declared length that is too short.
            enc(&[hello, job(1, &d1), src(1, b"int x; int y;", true)]),
        ]
    }

    /// What servers send to `client_input`'s jobs 1 (speculative), 2 (ask-first) and 3
    /// (send-all).
    pub(super) fn server_streams() -> Vec<Vec<u8>> {
        let hello = Frame::Hello(Hello {
            min_version: 1,
            max_version: 2,
            limits: Limits::default(),
            features: 0,
            extensions: Bytes::new(),
        });
        let head = ResultHead {
            exit_code: 0,
            stdout_len: 0,
            stderr_len: 2,
            outputs: vec![OutputMeta {
                name: ".o".into(),
                len: 3,
            }],
        };
        let result = |job, early| Frame::Result {
            job: JobId(job),
            origin: if early {
                ResultOrigin::Early
            } else {
                ResultOrigin::Compiled
            },
            head: head.clone(),
            body: Bytes::from_static(b"w\n"),
            fin: false,
        };
        let data = |job| Frame::Data {
            job: JobId(job),
            data: Bytes::from_static(b"obj"),
            fin: true,
            zstd: false,
        };
        vec![
            enc(&[
                hello.clone(),
                Frame::Miss { job: JobId(1) },
                result(2, true),
                data(2),
                Frame::Abort {
                    job: JobId(3),
                    code: ErrorCode::OVERLOADED,
                    message: "busy".into(),
                },
                Frame::Stats(vec![Stat {
                    name: "hits".into(),
                    value: 1,
                }]),
                result(1, false),
                data(1),
                Frame::GoAway { last_job: 3 },
            ]),
            enc(&[
                hello.clone(),
                Frame::Miss { job: JobId(2) },
                Frame::Miss { job: JobId(1) },
                result(3, false),
                result(2, false),
                data(3),
                data(2),
                Frame::Result {
                    job: JobId(1),
                    origin: ResultOrigin::Compiled,
                    head: ResultHead {
                        exit_code: 1,
                        ..ResultHead::default()
                    },
                    body: Bytes::new(),
                    fin: true,
                },
            ]),
            // No HELLO (the target adds one): an early result, then ERROR.
            enc(&[
                result(1, true),
                data(1),
                Frame::Error {
                    code: ErrorCode::SHUTTING_DOWN,
                    message: "bye".into(),
                },
            ]),
        ]
    }

    /// Operation sequences for `pair_ops` (see its documentation for the encoding).
    pub(super) fn pair_programs() -> Vec<Vec<u8>> {
        let mut many = vec![0x80];
        for i in 0..20 {
            many.extend_from_slice(&[20, i, i]);
        }
        many.extend_from_slice(&[6, 0, 0]);
        vec![
            // The same job twice: a miss, then a hit.
            vec![0x00, 0, 7, 1, 6, 0, 0, 0, 7, 1, 6, 0, 0],
            // Ask-first with a declared length, a cancel.
            vec![0x01, 20, 200, 3, 1, 9, 5, 3, 0, 0, 6, 0, 0],
            // Send-all, stats, time.
            vec![0x02, 0, 50, 2, 4, 0, 0, 5, 100, 1, 6, 0, 0],
            // Ask-first, small chunks, compile time, then a byte flipped in flight.
            vec![0x0D, 0, 90, 1, 6, 0, 0, 7, 1, 0, 0, 90, 1, 6, 0, 0],
            // A failing compile, GOAWAY, bandwidth.
            vec![0x44, 0, 10, 8, 6, 0, 0, 8, 0, 0, 0, 10, 8, 6, 0, 0],
            // Send-all, big jobs, a cancel mid-way.
            vec![0x9E, 0, 255, 3, 0, 255, 3, 5, 20, 1, 3, 1, 0, 6, 0, 0],
            // A wrong declared length, client shutdown, a long wait.
            vec![0x31, 50, 40, 2, 20, 40, 2, 6, 0, 0, 9, 0, 0, 5, 200, 0],
            // More jobs than the server's limit.
            many,
            // Regression: send-all with a byte flipped in flight.
            vec![0x06, 7, 1, 0, 0, 0x39, 0x39, 0, 0, 7, 6, 0, 0],
            // A lookup that misses, the compile, then a lookup that hits.
            vec![0x00, 72, 7, 1, 6, 0, 0, 0, 7, 1, 6, 0, 0, 72, 7, 1, 6, 0, 0],
        ]
    }

    /// Generic streams: nothing, one byte, garbage, a HELLO, every byte value.
    pub(super) fn generic() -> Vec<Vec<u8>> {
        vec![
            Vec::new(),
            vec![0],
            vec![1; 40],
            hello_bytes().to_vec(),
            (0..=255u8).collect(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::seeds::*;
    use super::*;

    fn all_streams() -> Vec<Vec<u8>> {
        let mut v = generic();
        v.extend(client_streams());
        v.extend(server_streams());
        v
    }

    #[test]
    fn decoding_targets_accept_seeds() {
        for s in all_streams() {
            decode_frames(&s);
            for cuts in [
                &[][..],
                &[3, 0, 128, 255][..],
                &[15, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15][..],
            ] {
                let mut input = cuts.to_vec();
                input.extend_from_slice(&s);
                chunked_equals_oneshot(&input);
            }
        }
    }

    #[test]
    fn connection_targets_run_on_seeds() {
        /// A target and a frame type to make garbage of.
        type Target = (fn(&[u8]), u8);
        let targets: [Target; 2] = [(server_input, 2), (client_input, 5)];
        for (target, garbage) in targets {
            for s in all_streams() {
                target(&s);
            }
            // Every configuration the first byte selects, on garbage after it.
            for first in 0..=255u8 {
                target(&[first, garbage, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
            }
        }
    }

    #[test]
    fn pair_ops_runs_on_seeds() {
        for s in pair_programs() {
            pair_ops(&s);
        }
        for s in generic() {
            pair_ops(&s);
        }
    }

    /// The seeds reach what they are meant to: results, hits, stats, misses.
    #[test]
    fn seeds_reach_deep_states() {
        let types =
            |frames: &[Frame]| -> Vec<FrameType> { frames.iter().map(Frame::frame_type).collect() };
        let out = types(&server_run(&client_streams()[0]));
        assert_eq!(
            out,
            [
                FrameType::HELLO,
                FrameType::MISS,
                FrameType::RESULT,
                FrameType::DATA,
                FrameType::EARLY_RESULT,
                FrameType::DATA,
                // The idle timeout at the end.
                FrameType::GOAWAY,
            ]
        );
        let out = types(&server_run(&client_streams()[1]));
        assert!(out.contains(&FrameType::RESULT) && out.contains(&FrameType::STATS));
        let out = types(&server_run(&client_streams()[2]));
        assert!(out.contains(&FrameType::ABORT), "{out:?}");
        let events = client_run(&server_streams()[0]);
        let done = |e: &&ClientEvent| matches!(e, ClientEvent::Done { .. });
        assert_eq!(events.iter().filter(done).count(), 2, "{events:?}");
        assert!(events.iter().any(|e| matches!(e, ClientEvent::Stats(_))));
        let events = client_run(&server_streams()[1]);
        assert_eq!(events.iter().filter(done).count(), 3, "{events:?}");
        let lookup = pair_run(pair_programs().last().expect("seeds")).expect("a program");
        let events: Vec<&ClientEvent> = lookup.client_events.iter().map(|(_, e)| e).collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ClientEvent::NotCached { .. })),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ClientEvent::Done { outcome, .. }
                if outcome.strategy == Strategy::Lookup && outcome.origin.is_early())),
            "{events:?}"
        );
        for prog in pair_programs() {
            let p = pair_run(&prog).expect("a program");
            assert!(
                p.client_events
                    .iter()
                    .any(|(_, e)| matches!(e, ClientEvent::Done { .. })),
                "{prog:?}: no result"
            );
        }
    }

    /// Every strategy, with and without tampering, on a few jobs.
    #[test]
    fn pair_ops_every_strategy() {
        for first in 0..=255u8 {
            pair_ops(&[
                first, 0, 20, 1, 1, 20, 1, 3, 1, 0, 4, 0, 0, 0, 20, 1, 6, 0, 0,
            ]);
        }
        for tamper in 1..5u8 {
            for first in [0u8, 1, 2, 0x0C] {
                pair_ops(&[first, 7, tamper, 0, 0, 90, 1, 0, 90, 1, 6, 0, 0]);
            }
        }
    }

    /// Found by `pair_ops`: send-all with a byte flipped in flight. Without HASH the
    /// altered source is compiled as received (inherent: nothing can tell), so the target
    /// exempts send-all results once bytes were altered. This input still reaches it.
    #[test]
    fn regression_send_all_with_tampering() {
        let p = pair_run(&[
            0x06, 0x07, 0x01, 0x00, 0x00, 0x39, 0x39, 0x00, 0x00, 0x07, 0x06, 0x00, 0x00,
        ])
        .expect("a program");
        let wrong = p.client_events.iter().any(|(_, e)| match e {
            ClientEvent::Done { job, outcome } => {
                let desc = JobDesc {
                    compiler: "cc".into(),
                    language: "cpp-output".into(),
                    // 0x39 % 3 and 0 % 3: both jobs are `-O0`.
                    args: vec!["-O0".into()],
                    source_len: None,
                    identity: None,
                };
                let src = if job.0 == 1 {
                    op_source(0x39, 0x39)
                } else {
                    op_source(0, 7)
                };
                outcome.result != reference_compile(&desc, &src)
            }
            _ => false,
        });
        assert!(wrong, "the altered send-all upload is no longer reached");
    }

    /// The same input with a hashed strategy: tampering must fail the job, never return
    /// a wrong result.
    #[test]
    fn regression_speculative_with_tampering() {
        for first in [0x04, 0x05] {
            pair_ops(&[
                first, 0x07, 0x01, 0x00, 0x00, 0x39, 0x39, 0x00, 0x00, 0x07, 0x06, 0x00, 0x00,
            ]);
        }
    }

    /// Found by CI's fuzz run: a client that aborts a job the server refused at JOB
    /// (declared source over the limit) made the server report `SourceSkipped` to an
    /// owner that never heard of the job. The first frame is an ignorable one whose type
    /// (0x90) selects the harness's valid HELLO and its 4 KiB source limit.
    #[test]
    fn regression_abort_of_a_job_refused_at_job() {
        let mut input = Vec::new();
        let frames = [
            Frame::Ignorable {
                ty: FrameType(0x90),
                flags: 0,
                job: 0,
                payload: Bytes::new(),
            },
            Frame::Job {
                job: JobId(1),
                desc: JobDesc {
                    compiler: "cc".into(),
                    language: "cpp-output".into(),
                    args: vec![],
                    source_len: Some(10_000),
                    identity: None,
                },
            },
            Frame::Abort {
                job: JobId(1),
                code: crate::ErrorCode::CANCELLED,
                message: "cancelled".into(),
            },
        ];
        for f in frames {
            input.extend_from_slice(&f.to_bytes(MAX).expect("frames encode"));
        }
        assert_eq!(input[0] & 0x11, 0x10, "selects HELLO and the small limit");
        let out = server_run(&input);
        assert!(
            out.iter().any(|f| matches!(
                f,
                Frame::Abort {
                    code: crate::ErrorCode::SOURCE_TOO_LARGE,
                    ..
                }
            )),
            "the job was refused: {out:?}"
        );
    }

    /// Found by `pair_ops` (input `44 00 0a 08 06 00 00 08 00 00 00 0a 08 06 00 00`): a JOB
    /// the client sent before it received GOAWAY never ends. The server, with no job open,
    /// closes as soon as it queues GOAWAY and ignores all later input, so it never answers
    /// the in-flight JOB with ABORT `SHUTTING_DOWN` as PROTOCOL.md section 6 requires; and
    /// the client ignores GOAWAY's `last_job`, so it keeps waiting for a job the server
    /// has said it did not accept. Over TCP the job only ends with the connection
    /// (`UnexpectedEof`, or a reset if the server closes with the JOB unread).
    #[test]
    fn regression_job_in_flight_at_goaway_ends() {
        let mut p = Pair::default_with_seed(1, origin());
        let desc = JobDesc {
            compiler: "cc".into(),
            language: "cpp-output".into(),
            args: vec![],
            source_len: None,
            identity: None,
        };
        let first = p
            .submit(desc.clone(), Bytes::from_static(b"int a;"))
            .unwrap();
        assert!(p.run(1000));
        assert!(matches!(p.job_end(first), Some(ClientEvent::Done { .. })));
        p.server.goaway();
        // Sent before the client can have read the GOAWAY.
        let second = p.submit(desc, Bytes::from_static(b"int b;")).unwrap();
        assert!(p.run(1000));
        p.advance(Duration::from_secs(3600));
        assert!(p.run(1000));
        let closed = p
            .client_events
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::Closed { .. }));
        assert!(
            p.job_end(second).is_some() || closed,
            "{second} neither ended nor lost with the connection: {:?}",
            p.client_events
        );
    }

    /// The same streams against a server that requires a token, with the harness doing
    /// the authentication: an ignorable frame of type 0xC0 first sets bit 6 and leaves
    /// bit 0 clear; the streams' own HELLO is dropped (the harness sent one).
    fn authed_client_streams() -> Vec<Vec<u8>> {
        client_streams()
            .into_iter()
            .filter_map(|s| {
                let mut buf = BytesMut::from(&s[..]);
                let mut dec = FrameDecoder::new(MAX);
                let Ok(Some(Frame::Hello(_))) = dec.decode(&mut buf) else {
                    return None;
                };
                let mut v = Frame::Ignorable {
                    ty: FrameType(0xC0),
                    flags: 0,
                    job: 0,
                    payload: Bytes::new(),
                }
                .to_bytes(MAX)
                .unwrap()
                .to_vec();
                v.extend_from_slice(&buf);
                Some(v)
            })
            .collect()
    }

    #[test]
    fn authenticated_seeds_reach_open_jobs() {
        let seeds = authed_client_streams();
        assert!(!seeds.is_empty());
        let mut answered = 0;
        for seed in &seeds {
            let frames = server_run(seed);
            assert!(
                !frames.iter().any(|f| matches!(
                    f,
                    Frame::Error { code, .. } if *code == crate::ErrorCode::UNAUTHORIZED
                )),
                "a seed did not get past AUTH: {frames:?}"
            );
            answered += usize::from(frames.iter().any(|f| matches!(f, Frame::Result { .. })));
        }
        assert!(answered > 0, "no authenticated seed got a result");
    }

    /// Every target's seed corpus as the generator makes it: (target, seeds), each seed
    /// stored as `seed-NN` under `fuzz/corpus/<target>/`.
    fn seed_corpus() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        let mut decoding = generic();
        decoding.extend(client_streams());
        decoding.extend(server_streams());
        let chunked: Vec<Vec<u8>> = decoding
            .iter()
            .map(|s| {
                let mut v = vec![3, 40, 128, 200];
                v.extend_from_slice(s);
                v
            })
            .collect();
        let mut server = generic();
        server.extend(client_streams());
        server.extend(authed_client_streams());
        let mut client = generic();
        client.extend(server_streams());
        vec![
            ("decode_frames", decoding),
            ("chunked_equals_oneshot", chunked),
            ("server_input", server),
            ("client_input", client),
            ("pair_ops", pair_programs()),
            ("compressed_frames", compressed_seeds()),
        ]
    }

    /// Compressed payloads: valid ones of several shapes, and the refused kinds.
    fn compressed_seeds() -> Vec<Vec<u8>> {
        let text = b"static int v = 42;\nextern void f(int);\n".repeat(200);
        let real = crate::compress_payload(&text, 1).expect("compress");
        let bomb = crate::compress_payload(&vec![0u8; 4 << 20], 1).expect("compress");
        let mut liar = bomb.to_vec();
        liar[..4].copy_from_slice(&1024u32.to_be_bytes());
        let rle = vec![
            0x00, 0x00, 0x00, 0x30, 0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x30, 0x83, 0x01, 0x00, 0x61,
        ];
        let mut trailing = rle.clone();
        trailing.push(0);
        let mut out = Vec::new();
        for (flag, p) in [
            (0u8, real.to_vec()),
            (1, real.to_vec()),
            (0, bomb.to_vec()),
            (1, bomb.to_vec()),
            (1, liar),
            (0, rle),
            (0, trailing),
            (0, vec![0, 0, 0, 0]),
            (0, b"plain bytes, not a zstd frame".to_vec()),
        ] {
            let mut v = vec![flag];
            v.extend_from_slice(&p);
            out.push(v);
        }
        out
    }

    #[test]
    fn compressed_seeds_hold_the_invariants() {
        for seed in compressed_seeds() {
            compressed_frames(&seed);
        }
    }

    fn corpus_root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
    }

    /// The committed seed corpora are exactly what the generator writes: a seed changed
    /// here and not regenerated (or a file edited by hand) fails, with the command that
    /// fixes it.
    #[test]
    fn committed_seed_corpus_matches_the_generator() {
        let root = corpus_root();
        for (target, seeds) in seed_corpus() {
            let dir = root.join(target);
            let mut committed: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| {
                    e.expect("a directory entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            committed.sort();
            let expected: Vec<String> = (0..seeds.len()).map(|i| format!("seed-{i:02}")).collect();
            let hint =
                "regenerate with `cargo test -p dcache-proto --lib -- --ignored write_seed_corpus`";
            assert_eq!(committed, expected, "{target}: seed files differ; {hint}");
            for (name, seed) in expected.iter().zip(&seeds) {
                let on_disk = std::fs::read(dir.join(name)).expect("a seed file");
                assert!(
                    on_disk == *seed,
                    "{target}/{name} differs from the generator; {hint}"
                );
            }
        }
    }

    /// Writes the seed corpora under `fuzz/corpus/`, replacing what is there: run by hand
    /// with `cargo test -p dcache-proto --lib -- --ignored write_seed_corpus`.
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand to regenerate"]
    fn write_seed_corpus() {
        let root = corpus_root();
        for (target, seeds) in seed_corpus() {
            let dir = root.join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("corpus directory");
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed written");
            }
        }
    }
}
