//! Frames: the typed form of everything that crosses the wire, and their payload encoding.
//!
//! Decoding checks every field and every count against the payload actually present, so a
//! hostile payload produces a [`FrameError`], never a panic and never an allocation larger
//! than the payload itself. Encoding enforces the same rules, so what we send is what we
//! would accept.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::error_code::ErrorCode;
use crate::fields::{Reader, check_str16, put_str16};
use crate::frame_type::{Flags, FrameType};
use crate::header::{FrameHeader, HEADER_LEN};
use crate::identity::{CompilerIdentity, MAX_IDENTITY_FIELD};
use crate::job::JobDesc;
use crate::key::CacheKey;

/// Magic bytes at the start of every HELLO payload, so a peer speaking something else is
/// recognised at once rather than misread.
pub const HELLO_MAGIC: [u8; 4] = *b"DCAC";
/// Most arguments a JOB may carry.
pub const MAX_ARGS: usize = 4096;
/// Most output files a result may carry.
pub const MAX_OUTPUTS: usize = 64;
/// Longest output file name.
pub const MAX_OUTPUT_NAME: usize = 255;
/// Most counters a STATS frame may carry.
pub const MAX_STATS: usize = 1024;

/// Where a result comes from. It decides the frame that carries the result (so a
/// combination the wire cannot express, such as "early but compiled", cannot be built) and
/// tells the client whether its job was a hit or a miss, early or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResultOrigin {
    /// Compiled for this job (or a compile that failed): RESULT.
    Compiled,
    /// Found in the cache by the key of the source received, after the upload (a job
    /// without HASH): RESULT with the CACHED flag.
    Cache,
    /// Found in the cache in answer to HASH: EARLY_RESULT, while the source may still be
    /// in flight.
    Early,
}

impl ResultOrigin {
    /// Whether the result came from the cache (a hit), early or not.
    pub fn is_cached(self) -> bool {
        self != Self::Compiled
    }

    /// Whether the result answered HASH before the upload finished (EARLY_RESULT).
    pub fn is_early(self) -> bool {
        self == Self::Early
    }
}

/// Identifies a job within one connection. The client allocates ids in increasing order
/// starting at 1; 0 names the connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u32);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// What a side accepts; each side announces its own in HELLO and the other must respect it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload this side accepts.
    pub max_frame_payload: u32,
    /// Largest source this side accepts for one job (meaningful from the server).
    pub max_source_len: u64,
    /// Most jobs this side keeps open on one connection at once (meaningful from the
    /// server; jobs beyond it wait on the client).
    pub max_jobs: u32,
}

impl Limits {
    /// What every peer accepts at least. A client uses these for frames it pipelines before
    /// the server's HELLO arrives, so pipelining never needs the handshake's round trip.
    pub const BASELINE: Self = Self {
        max_frame_payload: 64 * 1024,
        max_source_len: 64 * 1024 * 1024,
        max_jobs: 16,
    };

    /// Largest frame payload any side may announce: bounds what a decoder may buffer.
    pub const MAX_FRAME_PAYLOAD: u32 = 16 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_payload: 1024 * 1024,
            max_source_len: 256 * 1024 * 1024,
            max_jobs: 256,
        }
    }
}

/// The HELLO payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the sender speaks.
    pub min_version: u16,
    /// Highest protocol version the sender speaks.
    pub max_version: u16,
    /// What the sender accepts.
    pub limits: Limits,
    /// Feature bits; none are defined in version 1, and unknown bits are ignored.
    pub features: u64,
    /// Bytes after the version-1 fields. Later versions append fields here; a version-1
    /// receiver keeps them (for a faithful re-encoding) and otherwise ignores them.
    pub extensions: Bytes,
}

/// Describes one output in a result head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputMeta {
    /// The output's name (see [`crate::OutputFile::name`]).
    pub name: String,
    /// Its length in the body stream.
    pub len: u64,
}

/// The fixed part of a RESULT or EARLY_RESULT: everything but the body bytes.
///
/// The body is one stream, the concatenation of stdout, stderr and each output in order; it
/// starts in the RESULT frame and continues in DATA frames, so no size of output ever needs
/// one big frame.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ResultHead {
    /// The compiler's exit status.
    pub exit_code: i32,
    /// Length of stdout at the start of the body.
    pub stdout_len: u64,
    /// Length of stderr, after stdout.
    pub stderr_len: u64,
    /// The outputs, after stderr, in order.
    pub outputs: Vec<OutputMeta>,
}

impl ResultHead {
    /// Bytes of a RESULT payload's fixed fields: exit code (4), stdout length (8), stderr
    /// length (8), output count (2).
    pub const FIXED_LEN: usize = 22;
    /// Bytes of one output's entry besides its name: name length (2) and data length (8).
    pub const OUTPUT_FIXED_LEN: usize = 10;

    /// Total body length, or `None` if the declared lengths overflow (a hostile head).
    pub fn body_len(&self) -> Option<u64> {
        let mut total = self.stdout_len.checked_add(self.stderr_len)?;
        for o in &self.outputs {
            total = total.checked_add(o.len)?;
        }
        Some(total)
    }
}

/// One counter in a STATS frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The counter's name (`hits`, `misses`, ...).
    pub name: String,
    /// Its value.
    pub value: u64,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Opens the connection.
    Hello(Hello),
    /// Starts a job.
    Job {
        /// The job.
        job: JobId,
        /// What to compile.
        desc: JobDesc,
    },
    /// The job's cache key, before its first SOURCE chunk.
    Hash {
        /// The job.
        job: JobId,
        /// The key the client computed.
        key: CacheKey,
    },
    /// A chunk of source.
    Source {
        /// The job.
        job: JobId,
        /// The bytes, shared with the receive buffer (no copy).
        data: Bytes,
        /// Whether this is the last chunk.
        fin: bool,
        /// Whether `data` is a compressed payload (flag ZSTD: `u32 content_len ‖ zstd
        /// frame`). The state machines inflate it, bounded, before anything else sees
        /// the frame, so their events always carry plain source.
        zstd: bool,
    },
    /// The server does not have the result for the HASH it got.
    Miss {
        /// The job.
        job: JobId,
    },
    /// A result head with the start of its body.
    Result {
        /// The job.
        job: JobId,
        /// Where the result comes from: EARLY_RESULT for [`ResultOrigin::Early`], RESULT
        /// with the CACHED flag for [`ResultOrigin::Cache`], plain RESULT otherwise.
        origin: ResultOrigin,
        /// Exit status and body layout.
        head: ResultHead,
        /// The first body bytes.
        body: Bytes,
        /// Whether the body is complete in this frame.
        fin: bool,
    },
    /// More result body.
    Data {
        /// The job.
        job: JobId,
        /// The bytes.
        data: Bytes,
        /// Whether the body is complete.
        fin: bool,
        /// Whether `data` is a compressed payload (flag ZSTD), as for SOURCE.
        zstd: bool,
    },
    /// Ends the sender's direction of a job.
    Abort {
        /// The job.
        job: JobId,
        /// Why.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// A connection-level error; the sender closes after it.
    Error {
        /// Why.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// No new jobs on this connection; jobs up to `last_job` will still finish.
    GoAway {
        /// The highest job id the server accepted.
        last_job: u32,
    },
    /// Asks for the server's counters.
    StatsRequest,
    /// The server's counters.
    Stats(Vec<Stat>),
    /// The client's proof that it holds the shared token (see the `auth` module).
    Auth {
        /// Keyed BLAKE3 MAC over the server's and the client's nonces.
        proof: [u8; 32],
    },
    /// A frame in the ignorable range; kept whole so it can be logged or re-encoded.
    Ignorable {
        /// Its type byte (0x80 or above).
        ty: FrameType,
        /// Its flags.
        flags: u8,
        /// Its job id.
        job: u32,
        /// Its payload.
        payload: Bytes,
    },
}

/// An encoded frame in two parts, so large payloads go out without a copy: `head` is the
/// header plus fixed fields, `tail` the bulk bytes (source, result body), possibly empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedFrame {
    /// Header and fixed fields.
    pub head: Bytes,
    /// Bulk payload bytes, shared with the caller's buffer.
    pub tail: Bytes,
}

impl EncodedFrame {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether the frame is empty (never: a header is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame as one contiguous buffer (copies the tail).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.tail);
        out.freeze()
    }
}

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::HELLO,
            Self::Job { .. } => FrameType::JOB,
            Self::Hash { .. } => FrameType::HASH,
            Self::Source { .. } => FrameType::SOURCE,
            Self::Miss { .. } => FrameType::MISS,
            Self::Result {
                origin: ResultOrigin::Early,
                ..
            } => FrameType::EARLY_RESULT,
            Self::Result { .. } => FrameType::RESULT,
            Self::Data { .. } => FrameType::DATA,
            Self::Abort { .. } => FrameType::ABORT,
            Self::Error { .. } => FrameType::ERROR,
            Self::GoAway { .. } => FrameType::GOAWAY,
            Self::StatsRequest => FrameType::STATS_REQUEST,
            Self::Auth { .. } => FrameType::AUTH,
            Self::Stats(_) => FrameType::STATS,
            Self::Ignorable { ty, .. } => *ty,
        }
    }

    /// The job id in the header (0 for connection-level frames).
    pub fn job_id(&self) -> u32 {
        match self {
            Self::Job { job, .. }
            | Self::Hash { job, .. }
            | Self::Source { job, .. }
            | Self::Miss { job }
            | Self::Result { job, .. }
            | Self::Data { job, .. }
            | Self::Abort { job, .. } => job.0,
            Self::Ignorable { job, .. } => *job,
            _ => 0,
        }
    }

    /// Whether this frame carries nothing a state machine acts on (an empty non-final chunk
    /// or an ignorable frame). Peers get only so many of these in a row.
    pub fn is_empty_filler(&self) -> bool {
        match self {
            Self::Source { data, fin, .. } | Self::Data { data, fin, .. } => {
                data.is_empty() && !fin
            }
            Self::Ignorable { .. } => true,
            _ => false,
        }
    }

    /// Decodes a payload whose header was already validated.
    pub fn decode(header: &FrameHeader, payload: Bytes) -> Result<Self, FrameError> {
        let job = JobId(header.job);
        let fin = header.flags & Flags::FIN != 0;
        // Only SOURCE and DATA define the bit (the header check refuses it elsewhere).
        let zstd = header.flags & Flags::ZSTD != 0;
        let mut r = Reader::new(payload);
        let frame = match header.ty {
            FrameType::HELLO => {
                let magic = r.take(4, "HELLO magic")?;
                if magic[..] != HELLO_MAGIC {
                    return Err(FrameError::InvalidField {
                        field: "HELLO magic",
                        why: "not a dcache peer",
                    });
                }
                let min_version = r.u16("HELLO min_version")?;
                let max_version = r.u16("HELLO max_version")?;
                if min_version == 0 || min_version > max_version {
                    return Err(FrameError::InvalidField {
                        field: "HELLO versions",
                        why: "min must be at least 1 and at most max",
                    });
                }
                let limits = Limits {
                    max_frame_payload: r.u32("HELLO max_frame_payload")?,
                    max_source_len: r.u64("HELLO max_source_len")?,
                    max_jobs: r.u32("HELLO max_jobs")?,
                };
                let features = r.u64("HELLO features")?;
                return Ok(Self::Hello(Hello {
                    min_version,
                    max_version,
                    limits,
                    features,
                    extensions: r.rest(),
                }));
            }
            FrameType::JOB => {
                let compiler = r.str16("JOB compiler")?;
                let language = r.str16("JOB language")?;
                let argc = usize::from(r.u16("JOB argument count")?);
                if argc > MAX_ARGS {
                    return Err(FrameError::FieldTooLong("JOB arguments"));
                }
                // Each argument takes at least its 2-byte prefix, so a count larger than
                // the payload can hold is refused before allocating for it.
                if argc * 2 > r.remaining() {
                    return Err(FrameError::Truncated("JOB arguments"));
                }
                let mut args = Vec::with_capacity(argc);
                for _ in 0..argc {
                    args.push(r.str16("JOB argument")?);
                }
                let source_len = if header.flags & Flags::SOURCE_LEN != 0 {
                    Some(r.u64("JOB source length")?)
                } else {
                    None
                };
                let identity = if header.flags & Flags::IDENTITY != 0 {
                    let version = r.str16("JOB compiler version")?;
                    let target = r.str16("JOB compiler target")?;
                    let digest = r.bytes32("JOB compiler digest")?;
                    if version.len() > MAX_IDENTITY_FIELD || target.len() > MAX_IDENTITY_FIELD {
                        return Err(FrameError::FieldTooLong("JOB compiler identity"));
                    }
                    Some(CompilerIdentity {
                        version,
                        target,
                        digest,
                    })
                } else {
                    None
                };
                Self::Job {
                    job,
                    desc: JobDesc {
                        compiler,
                        language,
                        args,
                        source_len,
                        identity,
                    },
                }
            }
            FrameType::HASH => Self::Hash {
                job,
                key: CacheKey::from_bytes(r.bytes32("HASH key")?),
            },
            FrameType::SOURCE => Self::Source {
                job,
                data: r.rest(),
                fin,
                zstd,
            },
            FrameType::MISS => Self::Miss { job },
            FrameType::EARLY_RESULT | FrameType::RESULT => {
                let exit_code = r.i32("RESULT exit code")?;
                let stdout_len = r.u64("RESULT stdout length")?;
                let stderr_len = r.u64("RESULT stderr length")?;
                let count = usize::from(r.u16("RESULT output count")?);
                if count > MAX_OUTPUTS {
                    return Err(FrameError::FieldTooLong("RESULT outputs"));
                }
                let mut outputs = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str16("RESULT output name")?;
                    validate_output_name(&name)?;
                    let len = r.u64("RESULT output length")?;
                    outputs.push(OutputMeta { name, len });
                }
                let head = ResultHead {
                    exit_code,
                    stdout_len,
                    stderr_len,
                    outputs,
                };
                let body = r.rest();
                check_body(&head, body.len() as u64, fin)?;
                let origin = if header.ty == FrameType::EARLY_RESULT {
                    ResultOrigin::Early
                } else if header.flags & Flags::CACHED != 0 {
                    ResultOrigin::Cache
                } else {
                    ResultOrigin::Compiled
                };
                Self::Result {
                    job,
                    origin,
                    head,
                    body,
                    fin,
                }
            }
            FrameType::DATA => Self::Data {
                job,
                data: r.rest(),
                fin,
                zstd,
            },
            FrameType::ABORT => Self::Abort {
                job,
                code: ErrorCode(r.u16("ABORT code")?),
                message: r.str16("ABORT message")?,
            },
            FrameType::ERROR => Self::Error {
                code: ErrorCode(r.u16("ERROR code")?),
                message: r.str16("ERROR message")?,
            },
            FrameType::GOAWAY => Self::GoAway {
                last_job: r.u32("GOAWAY last job")?,
            },
            FrameType::STATS_REQUEST => Self::StatsRequest,
            FrameType::AUTH => Self::Auth {
                proof: r.bytes32("AUTH proof")?,
            },
            FrameType::STATS => {
                let count = usize::from(r.u16("STATS count")?);
                if count > MAX_STATS {
                    return Err(FrameError::FieldTooLong("STATS"));
                }
                if count * 10 > r.remaining() {
                    return Err(FrameError::Truncated("STATS entries"));
                }
                let mut stats = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str16("STATS name")?;
                    let value = r.u64("STATS value")?;
                    stats.push(Stat { name, value });
                }
                Self::Stats(stats)
            }
            ty if ty.is_ignorable() => Self::Ignorable {
                ty,
                flags: header.flags,
                job: header.job,
                payload: r.rest(),
            },
            ty => return Err(FrameError::UnknownType(ty.0)),
        };
        r.finish(header.ty.name())?;
        Ok(frame)
    }

    /// Encodes the frame, refusing payloads over `max_payload` (the peer's announced limit)
    /// and anything the decoder would refuse.
    pub fn encode(&self, max_payload: u32) -> Result<EncodedFrame, FrameError> {
        let mut head = BytesMut::with_capacity(64);
        head.put_bytes(0, HEADER_LEN);
        let mut flags = 0u8;
        let mut tail = Bytes::new();
        match self {
            Self::Hello(h) => {
                head.put_slice(&HELLO_MAGIC);
                head.put_u16(h.min_version);
                head.put_u16(h.max_version);
                head.put_u32(h.limits.max_frame_payload);
                head.put_u64(h.limits.max_source_len);
                head.put_u32(h.limits.max_jobs);
                head.put_u64(h.features);
                tail = h.extensions.clone();
            }
            Self::Job { desc, .. } => {
                check_str16(&desc.compiler, "JOB compiler")?;
                check_str16(&desc.language, "JOB language")?;
                if desc.args.len() > MAX_ARGS {
                    return Err(FrameError::FieldTooLong("JOB arguments"));
                }
                put_str16(&mut head, &desc.compiler);
                put_str16(&mut head, &desc.language);
                head.put_u16(desc.args.len() as u16);
                for a in &desc.args {
                    check_str16(a, "JOB argument")?;
                    put_str16(&mut head, a);
                }
                if let Some(len) = desc.source_len {
                    flags |= Flags::SOURCE_LEN;
                    head.put_u64(len);
                }
                if let Some(id) = &desc.identity {
                    if id.version.len() > MAX_IDENTITY_FIELD || id.target.len() > MAX_IDENTITY_FIELD
                    {
                        return Err(FrameError::FieldTooLong("JOB compiler identity"));
                    }
                    flags |= Flags::IDENTITY;
                    put_str16(&mut head, &id.version);
                    put_str16(&mut head, &id.target);
                    head.put_slice(&id.digest);
                }
            }
            Self::Hash { key, .. } => head.put_slice(key.as_bytes()),
            Self::Source {
                data, fin, zstd, ..
            }
            | Self::Data {
                data, fin, zstd, ..
            } => {
                if *fin {
                    flags |= Flags::FIN;
                }
                if *zstd {
                    flags |= Flags::ZSTD;
                }
                tail = data.clone();
            }
            Self::Miss { .. } | Self::StatsRequest => {}
            Self::Result {
                head: rh,
                body,
                fin,
                origin,
                ..
            } => {
                if rh.outputs.len() > MAX_OUTPUTS {
                    return Err(FrameError::FieldTooLong("RESULT outputs"));
                }
                check_body(rh, body.len() as u64, *fin)?;
                head.put_i32(rh.exit_code);
                head.put_u64(rh.stdout_len);
                head.put_u64(rh.stderr_len);
                head.put_u16(rh.outputs.len() as u16);
                for o in &rh.outputs {
                    validate_output_name(&o.name)?;
                    put_str16(&mut head, &o.name);
                    head.put_u64(o.len);
                }
                if *fin {
                    flags |= Flags::FIN;
                }
                if *origin == ResultOrigin::Cache {
                    flags |= Flags::CACHED;
                }
                tail = body.clone();
            }
            Self::Abort { code, message, .. } | Self::Error { code, message } => {
                check_str16(message, "message")?;
                head.put_u16(code.0);
                put_str16(&mut head, message);
            }
            Self::GoAway { last_job } => head.put_u32(*last_job),
            Self::Auth { proof } => head.put_slice(proof),
            Self::Stats(stats) => {
                if stats.len() > MAX_STATS {
                    return Err(FrameError::FieldTooLong("STATS"));
                }
                head.put_u16(stats.len() as u16);
                for s in stats {
                    check_str16(&s.name, "STATS name")?;
                    put_str16(&mut head, &s.name);
                    head.put_u64(s.value);
                }
            }
            Self::Ignorable {
                flags: f, payload, ..
            } => {
                flags = *f;
                tail = payload.clone();
            }
        }
        let payload_len = (head.len() - HEADER_LEN) as u64 + tail.len() as u64;
        let max = max_payload.min(Limits::MAX_FRAME_PAYLOAD);
        if payload_len > u64::from(max) {
            return Err(FrameError::TooLarge {
                len: payload_len,
                max,
            });
        }
        let header = FrameHeader {
            ty: self.frame_type(),
            flags,
            job: self.job_id(),
            // Fits: checked against a u32 limit just above.
            len: payload_len as u32,
        };
        header.validate(max)?;
        head[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(EncodedFrame {
            head: head.freeze(),
            tail,
        })
    }

    /// Encodes into one contiguous buffer (copies bulk bytes; for tests and tools).
    pub fn to_bytes(&self, max_payload: u32) -> Result<Bytes, FrameError> {
        Ok(self.encode(max_payload)?.to_bytes())
    }
}

/// An output name must be a plain label: the client decides where outputs land, so a name
/// must never be able to steer a path.
fn validate_output_name(name: &str) -> Result<(), FrameError> {
    let bad = |why| {
        Err(FrameError::InvalidField {
            field: "output name",
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_OUTPUT_NAME {
        return bad("must be 1 to 255 bytes");
    }
    if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return bad("must not be a path");
    }
    Ok(())
}

/// The inline body may not exceed the declared total, and a final frame must complete it.
fn check_body(head: &ResultHead, inline: u64, fin: bool) -> Result<(), FrameError> {
    let total = head.body_len().ok_or(FrameError::InvalidField {
        field: "RESULT lengths",
        why: "overflow",
    })?;
    if inline > total || (fin && inline != total) {
        return Err(FrameError::InvalidField {
            field: "RESULT body",
            why: "inline bytes disagree with the declared lengths",
        });
    }
    Ok(())
}
