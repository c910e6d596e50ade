//! Entry points for the cargo-fuzz targets of this crate (see `fuzz/` in the repository):
//! each target is a one-line call into a function here, so the logic is compiled, linted
//! and tested with the crate. Each panics only when an invariant of the crate is broken.

use bytes::BytesMut;

use crate::distcc::lzo;
use crate::distcc::wire::{RequestDecoder, RequestItem, RequestLimits};

/// Small limits, so the length checks are reached.
const LIMITS: RequestLimits = RequestLimits {
    max_args: 16,
    max_arg_len: 256,
    max_source: 64 * 1024,
};

/// Feeds `data` to a distcc request decoder in pieces whose sizes come from the first
/// byte, checking that no item breaks a limit and that a failed decoder stays failed.
pub fn distcc_request(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let split = usize::from(split % 32) + 1;
    let mut decoder = RequestDecoder::new(LIMITS);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(RequestItem::Argv(argv))) => {
                    assert!(!argv.is_empty() && argv.len() <= LIMITS.max_args as usize);
                    assert!(argv.iter().all(|a| a.len() <= LIMITS.max_arg_len as usize));
                }
                Ok(Some(RequestItem::Source(s))) => {
                    assert!(s.len() <= LIMITS.max_source as usize);
                    assert!(decoder.decode(&mut buf).is_err());
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    assert!(decoder.decode(&mut buf).is_err());
                    return;
                }
            }
        }
    }
}

/// Decompresses `data` as an LZO1X block under a limit taken from its first two bytes;
/// whatever comes out must be within the limit and survive a round trip through the
/// compressor. Then compresses `data` itself and checks the round trip.
pub fn lzo_block(data: &[u8]) {
    let limit = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        _ => 0,
    };
    if let Ok(out) = lzo::decompress(data.get(2..).unwrap_or(&[]), limit) {
        assert!(out.len() <= limit);
        let again = lzo::decompress(&lzo::compress(&out), out.len());
        assert_eq!(again.as_deref(), Ok(&out[..]));
    }
    let round = lzo::decompress(&lzo::compress(data), data.len());
    assert_eq!(round.as_deref(), Ok(data));
}

/// The seed corpora committed under `fuzz/corpus/`: real requests as the stock client
/// sends them (plain, LZO, pump mode's first bytes, truncated) for `distcc_request`, and
/// real blocks of this crate's compressor behind a limit for `lzo_block`.
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::distcc::wire::{Protocol, encode_request};
    let source = b"# 0 \"a.c\"\nint add(int a, int b) { return a + b; }\n".repeat(20);
    let argv = ["x86_64-linux-gnu-gcc", "-O2", "-c", "a.c", "-o", "a.o"];
    let mut seeds = Vec::new();
    let mut request = |name: &str, split: u8, bytes: &[u8]| {
        let mut data = vec![split];
        data.extend_from_slice(bytes);
        seeds.push(("distcc_request", name.to_owned(), data));
    };
    let plain = encode_request(Protocol::Plain, &argv, &source);
    request("plain", 31, &plain);
    request("plain-split", 4, &plain);
    request("lzo", 11, &encode_request(Protocol::Lzo, &argv, &source));
    request(
        "empty-source",
        0,
        &encode_request(Protocol::Plain, &["gcc", "-c", "e.c"], b""),
    );
    request(
        "pump",
        7,
        b"DIST00000003CDIR00000004/tmpARGC00000001ARGV00000003gcc",
    );
    request("truncated", 2, &plain[..plain.len() / 2]);
    for (name, data) in [
        ("text", &source[..]),
        ("run", &[0u8; 3000][..]),
        ("short", b"int x;"),
    ] {
        let block = crate::distcc::lzo::compress(data);
        let mut seed = (data.len() as u16).to_le_bytes().to_vec();
        seed.extend_from_slice(&block);
        seeds.push(("lzo_block", name.to_owned(), seed));
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distcc::wire::{Protocol, encode_request};

    fn corpus_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
    }

    /// Writes the seed corpora: `cargo test -p dcache-server --lib -- --ignored
    /// write_distcc_seed_corpus`.
    #[test]
    #[ignore]
    fn write_distcc_seed_corpus() {
        for (target, name, data) in seed_corpus() {
            let dir = corpus_dir().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
    }

    #[test]
    fn committed_distcc_seeds_match_the_generator_and_run_clean() {
        for (target, name, data) in seed_corpus() {
            let committed = std::fs::read(corpus_dir().join(target).join(&name))
                .unwrap_or_else(|e| panic!("{target}/{name}: {e} (regenerate the seeds)"));
            assert_eq!(
                committed, data,
                "{target}/{name} differs from the generator"
            );
            match target {
                "distcc_request" => distcc_request(&data),
                _ => lzo_block(&data),
            }
        }
    }

    #[test]
    fn the_fuzz_entry_points_run_on_real_requests_and_blocks() {
        let req = encode_request(Protocol::Lzo, &["gcc", "-c", "a.c"], b"int x;\n");
        for split in 0..40u8 {
            let mut input = vec![split];
            input.extend_from_slice(&req);
            distcc_request(&input);
        }
        lzo_block(b"\x10\x00\x16abcde\x11\x00\x00");
        lzo_block(&[]);
    }
}
