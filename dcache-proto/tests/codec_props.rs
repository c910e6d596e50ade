//! Property tests of the codec: every frame round-trips, splitting the stream anywhere
//! changes nothing, and arbitrary bytes never panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use bytes::{Bytes, BytesMut};
use dcache_proto::{
    CacheKey, CompilerIdentity, DecodeError, ErrorCode, Frame, FrameDecoder, FrameType, Hello,
    JobDesc, JobId, Limits, OutputMeta, ResultHead, ResultOrigin, Stat, compress_payload,
    decompress_payload,
};
use proptest::prelude::*;

const MAX: u32 = 1 << 20;

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn job_id() -> impl Strategy<Value = JobId> {
    (1u32..).prop_map(JobId)
}

fn output_name() -> impl Strategy<Value = String> {
    "[a-z.]{1,12}".prop_filter("not a path", |s| s != "." && s != "..")
}

fn result_frame() -> impl Strategy<Value = Frame> {
    (
        job_id(),
        (any::<bool>(), any::<bool>()),
        any::<i32>(),
        blob(64),
        blob(64),
        proptest::collection::vec((output_name(), blob(64)), 0..4),
        any::<prop::sample::Index>(),
    )
        .prop_map(
            |(job, (early, cached), exit_code, out, err, outputs, cut)| {
                let mut body = Vec::new();
                body.extend_from_slice(&out);
                body.extend_from_slice(&err);
                for (_, d) in &outputs {
                    body.extend_from_slice(d);
                }
                let inline = cut.index(body.len() + 1);
                Frame::Result {
                    job,
                    origin: match (early, cached) {
                        (true, _) => ResultOrigin::Early,
                        (false, true) => ResultOrigin::Cache,
                        (false, false) => ResultOrigin::Compiled,
                    },
                    head: ResultHead {
                        exit_code,
                        stdout_len: out.len() as u64,
                        stderr_len: err.len() as u64,
                        outputs: outputs
                            .iter()
                            .map(|(n, d)| OutputMeta {
                                name: n.clone(),
                                len: d.len() as u64,
                            })
                            .collect(),
                    },
                    body: Bytes::copy_from_slice(&body[..inline]),
                    fin: inline == body.len(),
                }
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            1u16..4,
            0u16..4,
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            blob(16)
        )
            .prop_map(|(min, extra, fp, sl, jobs, features, extensions)| {
                Frame::Hello(Hello {
                    min_version: min,
                    max_version: min + extra,
                    limits: Limits {
                        max_frame_payload: fp,
                        max_source_len: sl,
                        max_jobs: jobs,
                    },
                    features,
                    extensions,
                })
            }),
        (
            job_id(),
            text(20),
            text(10),
            proptest::collection::vec(text(12), 0..8),
            proptest::option::of(any::<u64>()),
            proptest::option::of((text(30), text(20), any::<[u8; 32]>())),
        )
            .prop_map(
                |(job, compiler, language, args, source_len, identity)| Frame::Job {
                    job,
                    desc: JobDesc {
                        compiler,
                        language,
                        args,
                        source_len,
                        identity: identity.map(|(version, target, digest)| CompilerIdentity {
                            version,
                            target,
                            digest,
                        }),
                    },
                }
            ),
        (job_id(), any::<[u8; 32]>()).prop_map(|(job, k)| Frame::Hash {
            job,
            key: CacheKey::from_bytes(k),
        }),
        (job_id(), blob(300), any::<bool>(), any::<bool>()).prop_map(|(job, data, fin, zstd)| {
            Frame::Source {
                job,
                data,
                fin,
                zstd,
            }
        }),
        job_id().prop_map(|job| Frame::Miss { job }),
        result_frame(),
        (job_id(), blob(300), any::<bool>(), any::<bool>()).prop_map(|(job, data, fin, zstd)| {
            Frame::Data {
                job,
                data,
                fin,
                zstd,
            }
        }),
        (job_id(), any::<u16>(), text(40)).prop_map(|(job, c, message)| Frame::Abort {
            job,
            code: ErrorCode(c),
            message,
        }),
        (any::<u16>(), text(40)).prop_map(|(c, message)| Frame::Error {
            code: ErrorCode(c),
            message,
        }),
        any::<u32>().prop_map(|last_job| Frame::GoAway { last_job }),
        Just(Frame::StatsRequest),
        proptest::collection::vec((text(16), any::<u64>()), 0..10).prop_map(|v| Frame::Stats(
            v.into_iter()
                .map(|(name, value)| Stat { name, value })
                .collect()
        )),
        (0x80u8..=0xFF, any::<u8>(), any::<u32>(), blob(100)).prop_map(
            |(ty, flags, job, payload)| Frame::Ignorable {
                ty: FrameType(ty),
                flags,
                job,
                payload,
            }
        ),
    ]
}

/// Decodes everything in `chunks`, fed one after another; returns the frames and the first
/// error, if any.
fn decode_chunks(chunks: &[&[u8]]) -> (Vec<Frame>, Option<DecodeError>) {
    let mut dec = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = f.to_bytes(MAX).unwrap();
        let (frames, err) = decode_chunks(&[&bytes]);
        prop_assert_eq!(err, None);
        prop_assert_eq!(frames, vec![f]);
    }

    #[test]
    fn split_anywhere_decodes_the_same(
        frames in proptest::collection::vec(frame(), 1..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes(MAX).unwrap());
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut at = 0;
        for p in points {
            chunks.push(&stream[at..p]);
            at = p;
        }
        chunks.push(&stream[at..]);
        let filler_runs = frames.iter().any(|f| f.is_empty_filler());
        let (got, err) = decode_chunks(&chunks);
        // Fewer than 64 frames in a row can be filler here, so no flood error.
        prop_assert!(err.is_none() || filler_runs);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_reencode_exactly(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        cut in any::<prop::sample::Index>(),
    ) {
        let split = cut.index(data.len() + 1);
        let (whole, whole_err) = decode_chunks(&[&data]);
        let (parts, parts_err) = decode_chunks(&[&data[..split], &data[split..]]);
        prop_assert_eq!(&whole, &parts);
        prop_assert_eq!(whole_err, parts_err);
        // Whatever decoded re-encodes to the bytes it came from.
        let mut at = 0;
        for f in &whole {
            let bytes = f.to_bytes(MAX).unwrap();
            prop_assert_eq!(&data[at..at + bytes.len()], &bytes[..]);
            at += bytes.len();
        }
    }

    #[test]
    fn mutated_valid_streams_never_panic(
        frames in proptest::collection::vec(frame(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes(MAX).unwrap());
        }
        for (at, x) in flips {
            let i = at.index(stream.len());
            stream[i] ^= x;
        }
        let _ = decode_chunks(&[&stream]);
    }
}

#[test]
fn a_failed_decoder_stays_failed() {
    let mut dec = FrameDecoder::new(MAX);
    let mut buf = BytesMut::from(&[0x7Fu8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(DecodeError::Frame(dcache_proto::FrameError::UnknownType(
            0x7F
        )))
    ));
    // Even a valid frame afterwards is refused.
    let mut good = BytesMut::from(&Frame::StatsRequest.to_bytes(MAX).unwrap()[..]);
    assert!(matches!(dec.decode(&mut good), Err(DecodeError::Failed(_))));
    assert!(dec.is_failed());
}

#[test]
fn the_length_limit_is_checked_before_the_body_arrives() {
    let mut dec = FrameDecoder::new(64 * 1024);
    // A SOURCE header claiming 1 GiB, with no body at all.
    let mut header = vec![0x04, 0, 0, 0, 0, 0, 0, 1];
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let mut buf = BytesMut::from(&header[..]);
    let err = dec.decode(&mut buf).unwrap_err();
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    assert!(
        buf.capacity() < 1 << 20,
        "nothing reserved for the claimed length"
    );
}

#[test]
fn a_partial_frame_reserves_in_modest_steps_and_consumes_nothing() {
    let mut dec = FrameDecoder::new(16 << 20);
    let mut header = vec![0x04, 0, 0, 0, 0, 0, 0, 1];
    header.extend_from_slice(&(16u32 << 20).to_be_bytes());
    let mut buf = BytesMut::from(&header[..]);
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert_eq!(buf.len(), 12, "need-more consumes nothing");
    assert!(buf.capacity() <= 12 + 64 * 1024 + 64);
}

#[test]
fn a_flood_of_empty_frames_is_cut_off() {
    let empty = Frame::Source {
        job: JobId(1),
        data: Bytes::new(),
        fin: false,
        zstd: false,
    }
    .to_bytes(MAX)
    .unwrap();
    let stream: Vec<u8> = empty
        .iter()
        .copied()
        .cycle()
        .take(empty.len() * 100)
        .collect();
    let (frames, err) = decode_chunks(&[&stream]);
    assert_eq!(frames.len(), dcache_proto::MAX_CONSECUTIVE_FILLER as usize);
    assert_eq!(err.unwrap().code(), ErrorCode::FLOOD);
}

#[test]
fn source_payloads_are_not_copied() {
    let data = Bytes::from(vec![7u8; 100_000]);
    let f = Frame::Source {
        job: JobId(3),
        data: data.clone(),
        fin: true,
        zstd: false,
    };
    let enc = f.encode(MAX).unwrap();
    assert_eq!(
        enc.tail.as_ptr(),
        data.as_ptr(),
        "encoder shares the payload"
    );
    let mut buf = BytesMut::from(&enc.to_bytes()[..]);
    let base = buf.as_ptr() as usize;
    let Some(Frame::Source { data: got, .. }) = FrameDecoder::new(MAX).decode(&mut buf).unwrap()
    else {
        panic!("not a SOURCE frame");
    };
    assert_eq!(
        got.as_ptr() as usize,
        base + 12,
        "decoder shares the receive buffer"
    );
}

/// Text with the repetition of real source, so compression has something to find.
fn source_like() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(&b"int "[..]),
            Just(&b"static "[..]),
            Just(&b"x"[..]),
            Just(&b" = 42;\n"[..]),
            Just(&b"(void)"[..]),
            Just(&b"\0\xff"[..]),
        ],
        0..2000,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever is compressed inflates back to itself, within a limit of its own length,
    /// and is refused under any smaller limit.
    #[test]
    fn compressed_payloads_round_trip_within_their_limit(
        data in prop_oneof![source_like(), proptest::collection::vec(any::<u8>(), 0..3000)],
        level in 1i32..4,
    ) {
        match compress_payload(&data, level) {
            None => prop_assert!(data.is_empty()),
            Some(c) => {
                let n = data.len() as u32;
                prop_assert_eq!(&decompress_payload(&c, n).unwrap()[..], &data[..]);
                let e = decompress_payload(&c, n - 1).unwrap_err();
                prop_assert_eq!(e.code(), ErrorCode::FRAME_TOO_LARGE);
            }
        }
    }

    /// Arbitrary or mutated compressed payloads never panic, and whatever inflates has
    /// exactly its declared length, within the limit.
    #[test]
    fn mutated_compressed_payloads_never_panic_or_exceed_the_limit(
        data in source_like(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        limit in 1u32..(1 << 16),
    ) {
        let Some(c) = compress_payload(&data, 1) else { return Ok(()); };
        let mut c = c.to_vec();
        for (i, x) in flips {
            let at = i.index(c.len());
            c[at] ^= x;
        }
        if let Ok(out) = decompress_payload(&c, limit) {
            let declared = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            prop_assert_eq!(out.len() as u32, declared);
            prop_assert!(declared <= limit);
        }
    }
}
