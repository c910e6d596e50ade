//! The test vectors of docs/PROTOCOL.md, checked byte for byte: each vector's frame must
//! encode to exactly its hex, and its hex must decode to exactly that frame.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use bytes::{Bytes, BytesMut};
use dcache_proto::{
    CacheKey, CompilerIdentity, DecodeError, ErrorCode, FEATURE_ZSTD, Frame, FrameDecoder,
    FrameError, FrameType, Hello, JobDesc, JobId, Limits, OutputMeta, ResultHead, ResultOrigin,
    Stat, decompress_payload,
};

const SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"));
const MAX: u32 = 1 << 20;

fn sample_desc() -> JobDesc {
    JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-c".into()],
        source_len: Some(12),
        identity: None,
    }
}

/// The sample job as a version-2 client sends it: with its compiler's identity.
fn sample_desc_identified() -> JobDesc {
    JobDesc {
        identity: Some(CompilerIdentity::new(
            "gcc 12.2.0",
            "x86_64-linux-gnu",
            [0x11; 32],
        )),
        ..sample_desc()
    }
}

/// The frame each valid vector names.
fn frame(name: &str) -> Frame {
    match name {
        "hello" => Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            limits: Limits {
                max_frame_payload: 1 << 20,
                max_source_len: 256 << 20,
                max_jobs: 256,
            },
            features: 0,
            extensions: Bytes::new(),
        }),
        "job" => Frame::Job {
            job: JobId(1),
            desc: sample_desc(),
        },
        "hello-v2" => Frame::Hello(Hello {
            min_version: 2,
            max_version: 2,
            limits: Limits {
                max_frame_payload: 1 << 20,
                max_source_len: 256 << 20,
                max_jobs: 256,
            },
            features: 0,
            extensions: Bytes::new(),
        }),
        "job-identity" => Frame::Job {
            job: JobId(3),
            desc: sample_desc_identified(),
        },
        "hash-identity" => Frame::Hash {
            job: JobId(3),
            key: CacheKey::compute(&sample_desc_identified(), b"int x = 42;\n"),
        },
        "job-no-length" => Frame::Job {
            job: JobId(2),
            desc: JobDesc {
                source_len: None,
                ..sample_desc()
            },
        },
        "hash" => Frame::Hash {
            job: JobId(1),
            key: CacheKey::compute(&sample_desc(), b"int x = 42;\n"),
        },
        "source-final" => Frame::Source {
            job: JobId(1),
            data: Bytes::from_static(b"int x = 42;\n"),
            fin: true,
            zstd: false,
        },
        "source-more" => Frame::Source {
            job: JobId(1),
            data: Bytes::from_static(b"int"),
            fin: false,
            zstd: false,
        },
        "miss" => Frame::Miss { job: JobId(1) },
        "early-result" => Frame::Result {
            job: JobId(1),
            origin: ResultOrigin::Early,
            head: ResultHead {
                exit_code: 0,
                stdout_len: 0,
                stderr_len: 2,
                outputs: vec![OutputMeta {
                    name: ".o".into(),
                    len: 4,
                }],
            },
            body: Bytes::from_static(b"w\n\x7fELF"),
            fin: true,
        },
        "result-cached" => Frame::Result {
            job: JobId(2),
            origin: ResultOrigin::Cache,
            head: ResultHead {
                exit_code: 0,
                stdout_len: 0,
                stderr_len: 0,
                outputs: vec![OutputMeta {
                    name: ".o".into(),
                    len: 4,
                }],
            },
            body: Bytes::from_static(b"\x7fELF"),
            fin: true,
        },
        "result-partial" => Frame::Result {
            job: JobId(3),
            origin: ResultOrigin::Compiled,
            head: ResultHead {
                exit_code: 1,
                stdout_len: 0,
                stderr_len: 6,
                outputs: vec![],
            },
            body: Bytes::from_static(b"err"),
            fin: false,
        },
        "data-final" => Frame::Data {
            job: JobId(3),
            data: Bytes::from_static(b"or\n"),
            fin: true,
            zstd: false,
        },
        "abort" => Frame::Abort {
            job: JobId(1),
            code: ErrorCode::CANCELLED,
            message: "result received".into(),
        },
        "error" => Frame::Error {
            code: ErrorCode::VERSION_MISMATCH,
            message: "no common version".into(),
        },
        "goaway" => Frame::GoAway { last_job: 7 },
        "stats-request" => Frame::StatsRequest,
        "stats" => Frame::Stats(vec![
            Stat {
                name: "hits".into(),
                value: 3,
            },
            Stat {
                name: "misses".into(),
                value: 1,
            },
        ]),
        "auth" => Frame::Auth { proof: [0xA5; 32] },
        "ignorable" => Frame::Ignorable {
            ty: FrameType(0x80),
            flags: 0x05,
            job: 0,
            payload: Bytes::from_static(b"pad"),
        },
        "hello-zstd" => Frame::Hello(Hello {
            min_version: 2,
            max_version: 2,
            limits: Limits {
                max_frame_payload: 1 << 20,
                max_source_len: 256 << 20,
                max_jobs: 256,
            },
            features: FEATURE_ZSTD,
            extensions: Bytes::new(),
        }),
        "source-zstd" => Frame::Source {
            job: JobId(1),
            data: Bytes::from_static(RLE_PAYLOAD),
            fin: true,
            zstd: true,
        },
        "data-zstd" => Frame::Data {
            job: JobId(3),
            data: Bytes::from_static(DATA_ZSTD_PAYLOAD),
            fin: true,
            zstd: true,
        },
        other => panic!("PROTOCOL.md names an unknown vector {other:?}"),
    }
}

/// A compressed payload made by hand from RFC 8878: content length 48, then one zstd
/// frame (magic, descriptor 0x20 = single segment with a 1-byte content size, size 48)
/// holding one last RLE block (header 0x000183 little-endian) of the byte `a`.
const RLE_PAYLOAD: &[u8] = &[
    0x00, 0x00, 0x00, 0x30, 0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x30, 0x83, 0x01, 0x00, 0x61,
];

/// The `data-zstd` payload, as libzstd 1.5 compressed [`DATA_ZSTD_TEXT`] at level 1
/// (another compressor may produce other bytes for the same text; any valid frame will do).
const DATA_ZSTD_PAYLOAD: &[u8] = &[
    0x00, 0x00, 0x00, 0x30, 0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x30, 0x15, 0x01, 0x00, 0xd0, 0x69, 0x6e,
    0x74, 0x20, 0x78, 0x20, 0x3d, 0x20, 0x34, 0x32, 0x3b, 0x0a, 0x69, 0x6e, 0x74, 0x20, 0x79, 0x7a,
    0x77, 0x20, 0x3d, 0x20, 0x34, 0x32, 0x3b, 0x0a, 0x02, 0x00, 0xc0, 0x88, 0x37, 0xca, 0x12,
];

/// What the `data-zstd` vector inflates to.
const DATA_ZSTD_TEXT: &[u8] = b"int x = 42;\nint y = 42;\nint z = 42;\nint w = 42;\n";

/// What each valid compressed vector inflates to.
fn inflated(name: &str) -> Option<Vec<u8>> {
    match name {
        "source-zstd" => Some(vec![b'a'; 48]),
        "data-zstd" => Some(DATA_ZSTD_TEXT.to_vec()),
        _ => None,
    }
}

/// The error each invalid compressed vector gets from a receiver with a 64 KiB limit.
/// The frames decode (their headers are fine); inflating them fails.
fn zstd_error(name: &str) -> ErrorCode {
    match name {
        "bad-zstd-too-large" => ErrorCode::FRAME_TOO_LARGE,
        "bad-zstd-bomb" | "bad-zstd-trailing" => ErrorCode::PROTOCOL,
        other => panic!("PROTOCOL.md names an unknown compressed vector {other:?}"),
    }
}

/// The error each invalid vector must produce (with a 64 KiB payload limit).
fn error(name: &str) -> DecodeError {
    DecodeError::Frame(match name {
        "bad-reserved" => FrameError::ReservedBits,
        "bad-too-large" => FrameError::TooLarge {
            len: 0x0001_0001,
            max: 0x0001_0000,
        },
        "bad-unknown-type" => FrameError::UnknownType(0x42),
        "bad-flags" => FrameError::BadFlags {
            ty: FrameType::MISS,
            flags: 0x01,
        },
        "bad-job-on-connection-frame" => FrameError::BadJobId {
            ty: FrameType::GOAWAY,
            job: 5,
        },
        "bad-trailing" => FrameError::TrailingBytes("MISS"),
        "bad-order-unknown-type-and-reserved" => FrameError::UnknownType(0x42),
        "bad-order-too-large-and-reserved" => FrameError::TooLarge {
            len: 0x0001_0001,
            max: 0x0001_0000,
        },
        "bad-order-reserved-and-job" => FrameError::ReservedBits,
        "bad-job-identity-truncated" => FrameError::Truncated("JOB compiler version"),
        other => panic!("PROTOCOL.md names an unknown invalid vector {other:?}"),
    })
}

struct Vector {
    name: String,
    hex: Vec<u8>,
}

fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```vector" {
            continue;
        }
        let mut name = None;
        let mut hex = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            if let Some(n) = l.strip_prefix("name:") {
                name = Some(n.trim().to_owned());
            } else if let Some(h) = l.strip_prefix("hex:") {
                hex.push_str(h);
            } else if l.starts_with("     ") {
                hex.push_str(l);
            }
        }
        let bytes = hex
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect();
        out.push(Vector {
            name: name.expect("vector without a name"),
            hex: bytes,
        });
    }
    out
}

#[test]
fn every_vector_in_the_spec_holds() {
    let vs = vectors();
    assert_eq!(vs.len(), 37, "PROTOCOL.md should hold 37 vectors");
    for v in &vs {
        if v.name.starts_with("bad-zstd-") {
            let mut buf = BytesMut::from(&v.hex[..]);
            let frame = FrameDecoder::new(64 * 1024).decode(&mut buf).unwrap();
            let Some(Frame::Source {
                data, zstd: true, ..
            }) = frame
            else {
                panic!("{}: not a compressed SOURCE: {frame:?}", v.name);
            };
            let err = decompress_payload(&data, 64 * 1024).unwrap_err();
            assert_eq!(err.code(), zstd_error(&v.name), "{}: {err}", v.name);
            continue;
        }
        if v.name.starts_with("bad-") {
            let mut dec = FrameDecoder::new(64 * 1024);
            let mut buf = BytesMut::from(&v.hex[..]);
            assert_eq!(dec.decode(&mut buf), Err(error(&v.name)), "{}", v.name);
            continue;
        }
        let f = frame(&v.name);
        let encoded = f.to_bytes(MAX).unwrap();
        assert_eq!(hex(&encoded), hex(&v.hex), "{}: encoding differs", v.name);
        let mut buf = BytesMut::from(&v.hex[..]);
        let decoded = FrameDecoder::new(MAX).decode(&mut buf).unwrap();
        if let Some(want) = inflated(&v.name) {
            let (Some(Frame::Source { data, .. }) | Some(Frame::Data { data, .. })) = &decoded
            else {
                panic!("{}: not a bulk frame", v.name);
            };
            assert_eq!(decompress_payload(data, MAX).unwrap(), want, "{}", v.name);
        }
        assert_eq!(decoded, Some(f), "{}: decoding differs", v.name);
        assert!(buf.is_empty());
    }
}

#[test]
fn the_key_vector_holds() {
    let key = CacheKey::compute(&sample_desc(), b"int x = 42;\n");
    let line = SPEC
        .lines()
        .find_map(|l| l.strip_prefix("key of the sample job: "))
        .expect("PROTOCOL.md states the sample key");
    assert_eq!(key.to_hex(), line.trim());
    let key = CacheKey::compute(&sample_desc_identified(), b"int x = 42;\n");
    let line = SPEC
        .lines()
        .find_map(|l| l.strip_prefix("key of the sample job with its identity: "))
        .expect("PROTOCOL.md states the key of the identified sample");
    assert_eq!(key.to_hex(), line.trim());
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the vector blocks for PROTOCOL.md from the constructors above.
#[test]
#[ignore = "prints the vectors for the spec"]
fn print_vectors() {
    for name in [
        "hello",
        "hello-v2",
        "job",
        "job-identity",
        "job-no-length",
        "hash",
        "hash-identity",
        "source-final",
        "source-more",
        "miss",
        "early-result",
        "result-cached",
        "result-partial",
        "data-final",
        "abort",
        "error",
        "goaway",
        "stats-request",
        "stats",
        "auth",
        "ignorable",
        "hello-zstd",
        "source-zstd",
        "data-zstd",
    ] {
        let b = frame(name).to_bytes(MAX).unwrap();
        println!("```vector\nname: {name}\nhex: {}\n```", wrap(&hex(&b)));
    }
    println!(
        "key of the sample job: {}",
        CacheKey::compute(&sample_desc(), b"int x = 42;\n").to_hex()
    );
    println!(
        "key of the sample job with its identity: {}",
        CacheKey::compute(&sample_desc_identified(), b"int x = 42;\n").to_hex()
    );
}

fn wrap(h: &str) -> String {
    let bytes: Vec<&str> = h.split(' ').collect();
    bytes
        .chunks(16)
        .map(|c| c.join(" "))
        .collect::<Vec<_>>()
        .join("\n     ")
}

/// The identity's two strings are one line a compiler prints: longer ones are refused
/// when sent and when received, so a JOB stays small whatever a peer claims.
#[test]
fn an_identity_field_over_256_bytes_is_refused_both_ways() {
    let mut desc = sample_desc_identified();
    if let Some(id) = desc.identity.as_mut() {
        id.version = "v".repeat(257);
    }
    let frame = Frame::Job {
        job: JobId(1),
        desc,
    };
    assert_eq!(
        frame.to_bytes(MAX).unwrap_err(),
        FrameError::FieldTooLong("JOB compiler identity")
    );
    // The same frame written by hand: header, the sample's fields, then the identity.
    let mut payload = Vec::new();
    for s in ["gcc", "cpp-output"] {
        payload.extend_from_slice(&(s.len() as u16).to_be_bytes());
        payload.extend_from_slice(s.as_bytes());
    }
    payload.extend_from_slice(&0u16.to_be_bytes());
    for s in ["v".repeat(257), "x86_64-linux-gnu".to_owned()] {
        payload.extend_from_slice(&(s.len() as u16).to_be_bytes());
        payload.extend_from_slice(s.as_bytes());
    }
    payload.extend_from_slice(&[0x11; 32]);
    let mut wire = vec![0x02, 0x02, 0, 0, 0, 0, 0, 1];
    wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    wire.extend_from_slice(&payload);
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(
        FrameDecoder::new(MAX).decode(&mut buf),
        Err(DecodeError::Frame(FrameError::FieldTooLong(
            "JOB compiler identity"
        )))
    );
}
