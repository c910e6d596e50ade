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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distcc::wire::{Protocol, encode_request};

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
