//! The distcc wire format, sans IO: a bounded decoder for the request a stock client
//! sends and an encoder for the reply it expects.
//!
//! Every item is a 4-letter token and 8 hex digits (a 32-bit value); a string or a bulk
//! body is a token whose value is its length, followed by that many bytes. A request is
//! `DIST` (the protocol version), `ARGC`, that many `ARGV`, then `DOTI` (the preprocessed
//! source, a raw LZO1X block in protocol 2). A reply is `DONE`, `STAT` (a wait status),
//! `SERR`, `SOUT` and `DOTO`. See docs/DISTCC.md.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use dcache_proto::JobResult;
use thiserror::Error;

use super::lzo;

/// Bytes in an item's header: the token and the hex value.
pub const HEADER_LEN: usize = 12;

/// The protocol a client asked for in `DIST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// Plain bodies.
    Plain,
    /// Bulk bodies as LZO1X blocks (`,lzo` in the client's host list).
    Lzo,
}

impl Protocol {
    /// The version number sent in `DIST` and answered in `DONE`.
    pub fn version(self) -> u32 {
        match self {
            Self::Plain => 1,
            Self::Lzo => 2,
        }
    }
}

/// What a decoder will accept, checked before anything is buffered or allocated.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Most `ARGV` items (the compiler, its options, the input and output names).
    pub max_args: u32,
    /// Longest single `ARGV`.
    pub max_arg_len: u32,
    /// Longest `DOTI` body on the wire, and longest source once decompressed.
    pub max_source: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_args: (crate::exec::args::MAX_ARGS + 8) as u32,
            max_arg_len: crate::exec::args::MAX_ARG_LEN as u32,
            max_source: 256 << 20,
        }
    }
}

/// Why a request was not understood. Each ends the connection: distcc has no way to
/// report a protocol error, and the stock client compiles locally when its connection
/// closes.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    /// A token other than the one the grammar expects at this point.
    #[error("expected {expected}, got {got:?}")]
    UnexpectedToken {
        /// The token expected.
        expected: &'static str,
        /// The four bytes received.
        got: [u8; 4],
    },
    /// The value is not 8 hex digits.
    #[error("the value after {token} is not 8 hex digits")]
    BadNumber {
        /// The token it followed.
        token: &'static str,
    },
    /// A protocol version this server does not speak (pump mode's 3 among them).
    #[error("distcc protocol version {0} is not served (only 1 and 2)")]
    Version(u32),
    /// A count or length over the decoder's limit.
    #[error("{what} of {got} exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// What the client claimed.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// An argument is not UTF-8.
    #[error("an argument is not UTF-8")]
    NotUtf8,
    /// The LZO body could not be decompressed within the source limit.
    #[error("DOTI body: {0}")]
    Lzo(#[from] lzo::LzoError),
    /// [`RequestDecoder::decode`] was called again after an error or the whole request.
    #[error("the request already ended")]
    Finished,
}

/// One step of a request, as the decoder completes it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestItem {
    /// `DIST`: the protocol, known before anything else is read. A caller that refuses
    /// the client's address or version can close here.
    Protocol(Protocol),
    /// `ARGC` and every `ARGV`: the command line, compiler first, as the client ran it.
    Argv(Vec<String>),
    /// `DOTI`: the preprocessed source, decompressed. The last item.
    Source(Bytes),
}

#[derive(Clone, Debug)]
enum State {
    Dist,
    Argc,
    Argv { left: u32, args: Vec<String> },
    Doti,
    Done,
}

/// Decodes one distcc request from bytes that may arrive split or merged anywhere.
///
/// [`decode`](Self::decode) returns `Ok(None)` when it needs more bytes, and consumes an
/// item's bytes from the buffer only once the item is whole. Lengths are checked against
/// [`RequestLimits`] when their header arrives, before any body is buffered; after an
/// error the decoder stays failed.
#[derive(Clone, Debug)]
pub struct RequestDecoder {
    limits: RequestLimits,
    state: State,
    protocol: Protocol,
}

impl RequestDecoder {
    /// A decoder for one request.
    pub fn new(limits: RequestLimits) -> Self {
        Self {
            limits,
            state: State::Dist,
            protocol: Protocol::Plain,
        }
    }

    /// The length of the `DOTI` body at the start of `buf`, once the command line has been
    /// decoded and the body's header is whole and within the limit: what a reader needs
    /// to reserve (and account for) before it buffers the body.
    pub fn source_len(&self, buf: &[u8]) -> Option<u32> {
        if !matches!(self.state, State::Doti) {
            return None;
        }
        peek(buf, "DOTI")
            .ok()
            .flatten()
            .filter(|&n| n <= self.limits.max_source)
    }

    /// The next item, `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RequestItem>, WireError> {
        let r = self.step(buf);
        if r.is_err() {
            self.state = State::Done;
        }
        r
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<RequestItem>, WireError> {
        loop {
            match &mut self.state {
                State::Done => return Err(WireError::Finished),
                State::Dist => {
                    let Some(v) = take_value(buf, "DIST")? else {
                        return Ok(None);
                    };
                    self.protocol = match v {
                        1 => Protocol::Plain,
                        2 => Protocol::Lzo,
                        v => return Err(WireError::Version(v)),
                    };
                    self.state = State::Argc;
                    return Ok(Some(RequestItem::Protocol(self.protocol)));
                }
                State::Argc => {
                    let Some(n) = take_value(buf, "ARGC")? else {
                        return Ok(None);
                    };
                    check("ARGC", n, self.limits.max_args)?;
                    if n == 0 {
                        return Err(WireError::TooLarge {
                            what: "ARGC (no compiler)",
                            got: 0,
                            limit: 0,
                        });
                    }
                    // Reserved by the count actually received, a few at a time.
                    let args = Vec::with_capacity(n.min(64) as usize);
                    self.state = State::Argv { left: n, args };
                }
                State::Argv { left, args } => {
                    let Some(body) = take_body(buf, "ARGV", self.limits.max_arg_len)? else {
                        return Ok(None);
                    };
                    let arg = String::from_utf8(body.to_vec()).map_err(|_| WireError::NotUtf8)?;
                    args.push(arg);
                    *left -= 1;
                    if *left == 0 {
                        let args = std::mem::take(args);
                        self.state = State::Doti;
                        return Ok(Some(RequestItem::Argv(args)));
                    }
                }
                State::Doti => {
                    let Some(body) = take_body(buf, "DOTI", self.limits.max_source)? else {
                        return Ok(None);
                    };
                    self.state = State::Done;
                    let source = match self.protocol {
                        Protocol::Lzo if !body.is_empty() => {
                            Bytes::from(lzo::decompress(&body, self.limits.max_source as usize)?)
                        }
                        _ => body,
                    };
                    return Ok(Some(RequestItem::Source(source)));
                }
            }
        }
    }
}

fn check(what: &'static str, got: u32, limit: u32) -> Result<(), WireError> {
    if got > limit {
        return Err(WireError::TooLarge {
            what,
            got: got.into(),
            limit: limit.into(),
        });
    }
    Ok(())
}

fn parse_hex(digits: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    for &d in digits {
        let n = (d as char).to_digit(16)?;
        v = (v << 4) | n;
    }
    Some(v)
}

/// Takes the header `token` and its value, if 12 bytes are there.
fn take_value(buf: &mut BytesMut, token: &'static str) -> Result<Option<u32>, WireError> {
    let Some(v) = peek(buf, token)? else {
        return Ok(None);
    };
    buf.advance(HEADER_LEN);
    Ok(Some(v))
}

/// Checks the header `token` and, once its body of at most `limit` bytes is whole, takes
/// both.
fn take_body(
    buf: &mut BytesMut,
    token: &'static str,
    limit: u32,
) -> Result<Option<Bytes>, WireError> {
    let Some(len) = peek(buf, token)? else {
        return Ok(None);
    };
    check(token, len, limit)?;
    let len = len as usize;
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

fn peek(buf: &[u8], token: &'static str) -> Result<Option<u32>, WireError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        // A wrong token is refused as soon as its four bytes are in.
        if let Some(got) = buf.get(..4) {
            if got != token.as_bytes() {
                return Err(unexpected(token, got));
            }
        }
        return Ok(None);
    };
    if &h[..4] != token.as_bytes() {
        return Err(unexpected(token, &h[..4]));
    }
    parse_hex(&h[4..])
        .map(Some)
        .ok_or(WireError::BadNumber { token })
}

fn unexpected(expected: &'static str, got: &[u8]) -> WireError {
    let mut g = [0u8; 4];
    g.copy_from_slice(&got[..4]);
    WireError::UnexpectedToken { expected, got: g }
}

/// Writes a header: `token` and `value` as 8 lower-case hex digits.
fn put_header(out: &mut BytesMut, token: &[u8; 4], value: u32) {
    out.put_slice(token);
    out.put_slice(format!("{value:08x}").as_bytes());
}

/// Writes a bulk body with its header, compressed in protocol 2 (an empty body is sent
/// as zero bytes in both, as distcc does).
fn put_bulk(out: &mut BytesMut, token: &[u8; 4], protocol: Protocol, data: &[u8]) {
    let compressed;
    let body = match protocol {
        Protocol::Lzo if !data.is_empty() => {
            compressed = lzo::compress(data);
            &compressed[..]
        }
        _ => data,
    };
    // Results are bounded far below 4 GiB by the executor's output limits; a larger one
    // could not be described to the client, so it is cut rather than mis-framed.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    put_header(out, token, len);
    out.put_slice(&body[..len as usize]);
}

/// The wait status distcc expects in `STAT`: the exit code shifted left by 8.
pub fn wait_status(exit_code: i32) -> u32 {
    ((exit_code as u32) & 0xFF) << 8
}

/// The whole reply to a request: `DONE`, `STAT`, `SERR`, `SOUT`, and `DOTO` with the
/// object (empty when the compile failed, as distccd sends it).
pub fn encode_reply(protocol: Protocol, result: &JobResult) -> BytesMut {
    let object: &[u8] = if result.exit_code == 0 {
        result
            .outputs
            .iter()
            .find(|o| o.name == ".o" || o.name == ".s")
            .map_or(&[][..], |o| &o.data[..])
    } else {
        &[]
    };
    let mut out = BytesMut::with_capacity(
        5 * HEADER_LEN + result.stderr.len() + result.stdout.len() + object.len(),
    );
    put_header(&mut out, b"DONE", protocol.version());
    put_header(&mut out, b"STAT", wait_status(result.exit_code));
    put_bulk(&mut out, b"SERR", protocol, &result.stderr);
    put_bulk(&mut out, b"SOUT", protocol, &result.stdout);
    put_bulk(&mut out, b"DOTO", protocol, object);
    out
}

/// Encodes a request as a stock client sends it: for tests, benchmarks and fuzz seeds.
pub fn encode_request(protocol: Protocol, argv: &[&str], source: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    put_header(&mut out, b"DIST", protocol.version());
    put_header(&mut out, b"ARGC", argv.len() as u32);
    for a in argv {
        put_header(&mut out, b"ARGV", a.len() as u32);
        out.put_slice(a.as_bytes());
    }
    put_bulk(&mut out, b"DOTI", protocol, source);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(
        bytes: &[u8],
        split: usize,
        limits: RequestLimits,
    ) -> Result<Vec<RequestItem>, WireError> {
        let mut d = RequestDecoder::new(limits);
        let mut buf = BytesMut::new();
        let mut items = Vec::new();
        for chunk in bytes.chunks(split.max(1)) {
            buf.extend_from_slice(chunk);
            while let Some(item) = d.decode(&mut buf)? {
                let last = matches!(item, RequestItem::Source(_));
                items.push(item);
                if last {
                    return Ok(items);
                }
            }
        }
        Ok(items)
    }

    const ARGV: &[&str] = &["x86_64-linux-gnu-gcc", "-O2", "-c", "foo.c", "-o", "foo.o"];

    #[test]
    fn a_stock_request_decodes_at_any_split_in_both_protocols() {
        let source = b"# 0 \"foo.c\"\nint x = 1;\n".repeat(50);
        for protocol in [Protocol::Plain, Protocol::Lzo] {
            let bytes = encode_request(protocol, ARGV, &source);
            for split in [1, 5, 12, 13, 100, bytes.len()] {
                let items = decode_all(&bytes, split, RequestLimits::default()).unwrap();
                assert_eq!(
                    items,
                    [
                        RequestItem::Protocol(protocol),
                        RequestItem::Argv(ARGV.iter().map(|s| s.to_string()).collect()),
                        RequestItem::Source(Bytes::from(source.clone())),
                    ]
                );
            }
        }
    }

    #[test]
    fn lengths_are_refused_at_their_header() {
        let limits = RequestLimits {
            max_args: 3,
            max_arg_len: 10,
            max_source: 100,
        };
        let mut d = RequestDecoder::new(limits);
        let mut buf = BytesMut::from(&b"DIST00000001ARGC00000004"[..]);
        assert!(matches!(
            d.decode(&mut buf),
            Ok(Some(RequestItem::Protocol(Protocol::Plain)))
        ));
        assert!(matches!(
            d.decode(&mut buf),
            Err(WireError::TooLarge { what: "ARGC", .. })
        ));
        assert_eq!(d.decode(&mut buf), Err(WireError::Finished));
        // A huge DOTI is refused with only its header in the buffer.
        let mut d = RequestDecoder::new(limits);
        let mut buf = BytesMut::from(&b"DIST00000001ARGC00000001ARGV00000003gccDOTIffffffff"[..]);
        d.decode(&mut buf).unwrap();
        d.decode(&mut buf).unwrap();
        assert!(matches!(
            d.decode(&mut buf),
            Err(WireError::TooLarge { what: "DOTI", .. })
        ));
        // An LZO body that inflates past the limit.
        let bomb = encode_request(Protocol::Lzo, &["gcc"], &[0u8; 1000]);
        assert!(matches!(
            decode_all(&bomb, 7, limits),
            Err(WireError::Lzo(lzo::LzoError::TooLarge { .. }))
        ));
    }

    #[test]
    fn garbage_and_pump_mode_are_errors() {
        let limits = RequestLimits::default();
        assert!(matches!(
            decode_all(b"GET / HTTP/1.1\r\n", 3, limits),
            Err(WireError::UnexpectedToken { .. })
        ));
        assert_eq!(
            decode_all(b"DIST00000003CDIR00000001/", 100, limits),
            Err(WireError::Version(3))
        );
        assert!(matches!(
            decode_all(b"DIST0000000gARGC", 100, limits),
            Err(WireError::BadNumber { token: "DIST" })
        ));
        assert_eq!(
            decode_all(b"DIST00000001ARGC00000001ARGV00000002\xff\xfe", 100, limits),
            Err(WireError::NotUtf8)
        );
    }

    #[test]
    fn replies_carry_the_wait_status_and_the_object_only_on_success() {
        let ok = JobResult {
            exit_code: 0,
            stderr: Bytes::from_static(b"warn\n"),
            outputs: vec![dcache_proto::OutputFile {
                name: ".o".into(),
                data: Bytes::from_static(b"\x7fELF"),
            }],
            ..JobResult::default()
        };
        assert_eq!(
            &encode_reply(Protocol::Plain, &ok)[..],
            b"DONE00000001STAT00000000SERR00000005warn\nSOUT00000000DOTO00000004\x7fELF"
        );
        let failed = JobResult { exit_code: 1, ..ok };
        let reply = encode_reply(Protocol::Plain, &failed);
        assert!(reply.starts_with(b"DONE00000001STAT00000100"));
        assert!(reply.ends_with(b"DOTO00000000"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                       split in 1usize..40) {
            let limits = RequestLimits { max_args: 4, max_arg_len: 64, max_source: 256 };
            let _ = decode_all(&bytes, split, limits);
        }
    }
}
