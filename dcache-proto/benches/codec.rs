//! Codec and key micro-benchmarks: `cargo bench -p dcache-proto`.
//!
//! Throughput is reported per byte of payload, so the figures read as GB/s.
#![allow(missing_docs, clippy::unwrap_used)] // a benchmark harness, not library code

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use dcache_proto::{CacheKey, Frame, FrameDecoder, JobDesc, JobId, KeyHasher};

const MIB: usize = 1 << 20;

fn source_frames(c: &mut Criterion) {
    let data = Bytes::from(vec![0x5Au8; MIB]);
    let frame = Frame::Source {
        job: JobId(1),
        data: data.clone(),
        fin: false,
        zstd: false,
    };
    let mut g = c.benchmark_group("source_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("encode_zero_copy", |b| {
        b.iter(|| black_box(frame.encode(16 * MIB as u32).unwrap()))
    });
    let wire = frame.to_bytes(16 * MIB as u32).unwrap();
    g.bench_function("decode", |b| {
        let mut dec = FrameDecoder::new(16 * MIB as u32);
        b.iter(|| {
            // The copy into the receive buffer is what a socket read does; the decoder
            // itself then splits the payload off without copying.
            let mut buf = BytesMut::from(&wire[..]);
            black_box(dec.decode(&mut buf).unwrap())
        })
    });
    g.finish();
}

fn small_frames(c: &mut Criterion) {
    let frames: Vec<Frame> = (1..=1000).map(|i| Frame::Miss { job: JobId(i) }).collect();
    let mut wire = BytesMut::new();
    for f in &frames {
        wire.extend_from_slice(&f.to_bytes(MIB as u32).unwrap());
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("small_frames_x1000");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("encode", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(f.encode(MIB as u32).unwrap());
            }
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut dec = FrameDecoder::new(MIB as u32);
            let mut buf = BytesMut::from(&wire[..]);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                black_box(f);
            }
        })
    });
    g.finish();
}

fn key_hashing(c: &mut Criterion) {
    let desc = JobDesc {
        compiler: "gcc".into(),
        language: "cpp-output".into(),
        args: vec!["-O2".into(), "-g".into()],
        source_len: None,
        identity: None,
    };
    let source = vec![0xA5u8; 2 * MIB];
    let mut g = c.benchmark_group("cache_key_2MiB");
    g.throughput(Throughput::Bytes(source.len() as u64));
    g.bench_function("one_shot", |b| {
        b.iter(|| black_box(CacheKey::compute(&desc, &source)))
    });
    g.bench_function("64KiB_chunks", |b| {
        b.iter(|| {
            let mut h = KeyHasher::new(&desc);
            for chunk in source.chunks(64 * 1024) {
                h.update(chunk);
            }
            black_box(h.finalize())
        })
    });
    g.finish();
}

criterion_group!(benches, source_frames, small_frames, key_hashing);
criterion_main!(benches);
