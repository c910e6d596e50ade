//! Entry points for the cargo-fuzz targets (see `fuzz/` in the repository). Each target is
//! a one-line call into a function here, so the logic is compiled, linted and tested with
//! the crate. Every function panics only when an invariant of the crate is broken.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::testing::{Pair, ReferenceServer, reference_compile};
use crate::{
    CacheKey, ClientConfig, ClientConnection, ClientEvent, DecodeError, Frame, FrameDecoder, Hello,
    JobDesc, JobId, KeyHasher, Limits, ServerConfig, ServerConnection, ServerEvent, Strategy,
};

/// The payload limit the decoding targets use: small, so length checks are reached.
const MAX: u32 = 64 * 1024;

/// An origin for the virtual clock. Only differences from it are used; reading the real
/// clock once per input is the one clock read in the crate, and only under `fuzzing`.
fn origin() -> Instant {
    Instant::now()
}

fn decode_all(chunks: &[&[u8]]) -> (Vec<Frame>, Option<DecodeError>, usize) {
    let mut dec = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut consumed = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    consumed += before - buf.len();
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e), consumed),
            }
        }
    }
    (frames, None, consumed)
}

/// Decodes arbitrary bytes; every decoded frame re-encodes to exactly the bytes it came
/// from.
pub fn decode_frames(data: &[u8]) {
    let (frames, _, consumed) = decode_all(&[data]);
    let mut at = 0;
    for f in &frames {
        let bytes = f.to_bytes(MAX).expect("a decoded frame must re-encode");
        assert_eq!(
            &data[at..at + bytes.len()],
            &bytes[..],
            "re-encoding differs"
        );
        at += bytes.len();
    }
    assert_eq!(at, consumed);
}

/// Decoding split at points chosen by the first bytes gives the same frames and the same
/// error as decoding in one piece.
pub fn chunked_equals_oneshot(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(n % 16).min(rest.len());
    let (cut_bytes, stream) = rest.split_at(cuts);
    let mut points: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| usize::from(b) * stream.len() / 256)
        .collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut at = 0;
    for p in points {
        chunks.push(&stream[at..p]);
        at = p;
    }
    chunks.push(&stream[at..]);
    let whole = decode_all(&[stream]);
    let split = decode_all(&chunks);
    assert_eq!(whole.0, split.0, "frames differ");
    assert_eq!(whole.1, split.1, "errors differ");
}

fn hello_bytes() -> Bytes {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        limits: Limits::default(),
        features: 0,
        extensions: Bytes::new(),
    })
    .to_bytes(Limits::BASELINE.max_frame_payload)
    .unwrap_or_default()
}

/// Checks that what a connection transmits is a valid frame stream.
fn check_output(out: &[u8]) {
    let (_, err, consumed) = decode_all(&[out]);
    assert!(err.is_none(), "connection sent invalid frames: {err:?}");
    assert_eq!(consumed, out.len(), "connection sent a partial frame");
}

/// A server fed arbitrary client bytes (after a valid HELLO when the first byte is even),
/// with the reference application answering. Invariants: no panic, only valid frames out,
/// nothing after Closed, and every verified key is the key of the bytes delivered.
pub fn server_input(data: &[u8]) {
    let now = origin();
    let mut conn = ServerConnection::new(
        ServerConfig {
            limits: Limits {
                max_frame_payload: MAX,
                ..Limits::default()
            },
            ..ServerConfig::default()
        },
        now,
    );
    let mut app = ReferenceServer::default();
    let mut input = Vec::new();
    if data.first().is_some_and(|b| b % 2 == 0) {
        input.extend_from_slice(&hello_bytes());
    }
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let mut descs: HashMap<JobId, (JobDesc, Vec<u8>)> = HashMap::new();
    let mut closed = false;
    for (i, chunk) in input.chunks(97).enumerate() {
        let t = now + Duration::from_millis(i as u64);
        conn.handle_input(t, chunk);
        conn.handle_timeout(t);
        while let Some(ev) = conn.poll_event() {
            assert!(!closed, "event after Closed: {ev:?}");
            match &ev {
                ServerEvent::JobStarted { job, desc } => {
                    descs.insert(*job, (desc.clone(), Vec::new()));
                }
                ServerEvent::Source { job, data } => {
                    if let Some((_, s)) = descs.get_mut(job) {
                        s.extend_from_slice(data);
                    }
                }
                ServerEvent::SourceDone { job, key, len } => {
                    let (d, s) = descs.get(job).expect("SourceDone for a started job");
                    let mut h = KeyHasher::new(d);
                    h.update(s);
                    assert_eq!(
                        h.finalize(),
                        *key,
                        "verified key is not the delivered bytes'"
                    );
                    assert_eq!(*len, s.len() as u64);
                }
                ServerEvent::Closed { .. } => closed = true,
                _ => {}
            }
            app.handle(&mut conn, ev);
        }
        while let Some(b) = conn.poll_transmit(t) {
            out.extend_from_slice(&b);
        }
    }
    check_output(&out);
}

/// A client with two jobs (speculative and ask-first) fed arbitrary server bytes (after a
/// valid HELLO when the first byte is even). Invariants: no panic, results only for
/// started jobs, output lengths consistent with what was declared.
pub fn client_input(data: &[u8]) {
    let now = origin();
    let mut conn = ClientConnection::new(
        ClientConfig {
            limits: Limits {
                max_frame_payload: MAX,
                ..Limits::default()
            },
            ..ClientConfig::default()
        },
        now,
    );
    let desc = JobDesc {
        compiler: "cc".into(),
        language: "cpp-output".into(),
        args: vec![],
        source_len: Some(5),
    };
    let key = CacheKey::compute(&desc, b"hello");
    let mut started = Vec::new();
    for strategy in [Strategy::Speculative, Strategy::AskFirst] {
        if let Ok(job) = conn.start_job_with(now, desc.clone(), Some(key), strategy) {
            let _ = conn.push_source(job, Bytes::from_static(b"hello"), true);
            started.push(job);
        }
    }
    let mut input = Vec::new();
    if data.first().is_some_and(|b| b % 2 == 0) {
        input.extend_from_slice(&hello_bytes());
    }
    input.extend_from_slice(data);
    let mut out = Vec::new();
    for (i, chunk) in input.chunks(61).enumerate() {
        let t = now + Duration::from_millis(i as u64);
        conn.handle_input(t, chunk);
        conn.handle_timeout(t);
        while let Some(b) = conn.poll_transmit(t) {
            out.extend_from_slice(&b);
        }
        while let Some(ev) = conn.poll_event() {
            if let ClientEvent::Done { job, outcome } = ev {
                assert!(started.contains(&job), "result for a job never started");
                assert!(outcome.source_bytes_sent <= 5);
                assert_eq!(outcome.source_bytes_sent + outcome.source_bytes_skipped, 5);
            }
        }
    }
    check_output(&out);
}

// Tamperers match the harness hook, which takes a Vec so they can change the length.
#[allow(clippy::ptr_arg)]
fn tamper_flip(b: &mut Vec<u8>) {
    let mid = b.len() / 2;
    if let Some(x) = b.get_mut(mid) {
        *x ^= 0x5A;
    }
}

fn tamper_drop(b: &mut Vec<u8>) {
    b.truncate(b.len().saturating_sub(3));
}

fn tamper_dup(b: &mut Vec<u8>) {
    let copy = b.clone();
    b.extend_from_slice(&copy);
}

/// A client/server pair driven by operations read from `data`: submit, cancel, stats,
/// advance time, run, tamper with bytes in flight, GOAWAY. Invariants: no panic, every
/// result a client receives is exactly the reference compile of that job's source (the
/// server never answers for other bytes), and the pair goes quiet in bounded steps.
pub fn pair_ops(data: &[u8]) {
    let Some((&first, ops)) = data.split_first() else {
        return;
    };
    let strategy = match first % 3 {
        0 => Strategy::Speculative,
        1 => Strategy::AskFirst,
        _ => Strategy::SendAll,
    };
    let mut p = Pair::new(
        ClientConfig {
            strategy,
            chunk_size: 4096,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
        Duration::from_micros(u64::from(first) * 37),
        if first & 0x80 != 0 { 10_000_000 } else { 0 },
        u64::from(first),
        origin(),
    );
    let mut expect: HashMap<JobId, (JobDesc, Bytes)> = HashMap::new();
    let mut jobs = Vec::new();
    let mut tampered = false;
    for op in ops.chunks(3).take(64) {
        let (a, b) = (
            op.first().copied().unwrap_or(0),
            op.get(1).copied().unwrap_or(0),
        );
        match a % 8 {
            0 | 1 => {
                let desc = JobDesc {
                    compiler: "cc".into(),
                    language: "cpp-output".into(),
                    args: vec![format!("-O{}", b % 3)],
                    source_len: (a & 0x10 != 0).then_some(u64::from(b) * 300),
                };
                let src = Bytes::from(vec![b; usize::from(b) * 300]);
                if let Some(job) = p.submit(desc.clone(), src.clone()) {
                    expect.insert(job, (desc, src));
                    jobs.push(job);
                }
            }
            2 => {
                if let Some(job) = jobs.get(usize::from(b) % jobs.len().max(1)) {
                    let _ = p.client.cancel(*job);
                }
            }
            3 => {
                let _ = p.client.request_stats();
            }
            4 => p.advance(Duration::from_millis(u64::from(b))),
            5 => {
                p.run(10_000);
            }
            6 => {
                tampered |= b % 4 != 0;
                p.alter_c2s = match b % 4 {
                    0 => None,
                    1 => Some(tamper_flip),
                    2 => Some(tamper_drop),
                    _ => Some(tamper_dup),
                };
            }
            _ => p.server.goaway(),
        }
    }
    p.alter_c2s = None;
    p.run(100_000);
    for (_, ev) in &p.client_events {
        if let ClientEvent::Done { job, outcome } = ev {
            // A HASH-less upload has no integrity check of its own: bytes altered on the
            // wire are compiled as received (the transport's integrity is all there is).
            // With HASH, the server verifies what it received, so a result is only ever
            // the one for the job's own source.
            if tampered && outcome.strategy == Strategy::SendAll {
                continue;
            }
            let (desc, src) = &expect[job];
            // Compared without printing both objects: they can be megabytes.
            assert!(
                outcome.result == reference_compile(desc, src),
                "{job}: result for other bytes than the job's"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<Vec<u8>> {
        let mut v = vec![Vec::new(), vec![0], vec![1; 40], hello_bytes().to_vec()];
        let desc = JobDesc {
            compiler: "cc".into(),
            language: "cpp-output".into(),
            args: vec!["-O2".into()],
            source_len: Some(3),
        };
        let mut s = hello_bytes().to_vec();
        for f in [
            Frame::Job {
                job: JobId(1),
                desc: desc.clone(),
            },
            Frame::Hash {
                job: JobId(1),
                key: CacheKey::compute(&desc, b"abc"),
            },
            Frame::Source {
                job: JobId(1),
                data: Bytes::from_static(b"abc"),
                fin: true,
            },
        ] {
            s.extend_from_slice(&f.to_bytes(MAX).unwrap());
        }
        v.push(s);
        v.push((0..=255u8).collect());
        v
    }

    /// Writes the seed corpora under `fuzz/corpus/`.
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand to regenerate"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut server_side = seeds();
        // A server's answers, for the client target.
        let mut answers = hello_bytes().to_vec();
        for f in [
            Frame::Miss { job: JobId(1) },
            Frame::Result {
                job: JobId(2),
                early: true,
                head: crate::ResultHead {
                    exit_code: 0,
                    stdout_len: 0,
                    stderr_len: 2,
                    outputs: vec![crate::OutputMeta {
                        name: ".o".into(),
                        len: 3,
                    }],
                },
                body: Bytes::from_static(b"w\n"),
                fin: false,
            },
            Frame::Data {
                job: JobId(2),
                data: Bytes::from_static(b"obj"),
                fin: true,
            },
            Frame::Abort {
                job: JobId(1),
                code: crate::ErrorCode::OVERLOADED,
                message: "busy".into(),
            },
            Frame::GoAway { last_job: 2 },
        ] {
            answers.extend_from_slice(&f.to_bytes(MAX).unwrap());
        }
        server_side.push(answers.clone());
        for target in [
            "decode_frames",
            "chunked_equals_oneshot",
            "server_input",
            "client_input",
        ] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in server_side.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
            }
        }
        let dir = root.join("pair_ops");
        std::fs::create_dir_all(&dir).unwrap();
        let ops: [&[u8]; 6] = [
            &[0, 0, 7, 0, 0, 7, 5, 0, 0],
            &[1, 0, 200, 0, 1, 9, 2, 0, 0, 5, 0, 0],
            &[2, 0, 50, 0, 3, 0, 0, 4, 100, 0, 5, 0, 0],
            &[0x81, 6, 1, 0, 0, 90, 0, 5, 0, 0],
            &[3, 0, 10, 0, 7, 0, 0, 0, 10, 0, 5, 0, 0],
            &[0x82, 0, 255, 0, 0, 255, 0, 4, 20, 0, 2, 1, 0],
        ];
        for (i, s) in ops.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }

    /// Found by `pair_ops`: send-all with a byte flipped in flight. Without HASH the
    /// altered source is compiled as received; the target no longer demands otherwise.
    #[test]
    fn regression_send_all_with_tampering() {
        pair_ops(&[
            0x05, 0x76, 0x39, 0x39, 0x39, 0x39, 0x39, 0x00, 0x00, 0x07, 0x05, 0x19, 0x00,
        ]);
    }

    /// The same input with a hashed strategy: tampering must fail the job, never return
    /// a wrong result.
    #[test]
    fn regression_speculative_with_tampering() {
        pair_ops(&[
            0x03, 0x76, 0x39, 0x39, 0x39, 0x39, 0x39, 0x00, 0x00, 0x07, 0x05, 0x19, 0x00,
        ]);
    }

    #[test]
    fn every_entry_point_runs_on_seeds() {
        for s in seeds() {
            decode_frames(&s);
            chunked_equals_oneshot(&s);
            server_input(&s);
            client_input(&s);
            pair_ops(&s);
        }
    }
}
