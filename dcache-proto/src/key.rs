//! The cache key: blake3 over a canonical, domain-separated encoding of a job and its source.

use std::fmt;

use crate::job::JobDesc;

/// blake3 key-derivation context: separates dcache keys from every other use of blake3 and
/// names the encoding version, so a change of encoding can never collide with old keys.
const KEY_CONTEXT: &str = "dcache 2026-11 cache key v1";
/// Context of the key of a job that names its compiler's identity (protocol version 2):
/// another context, so such a key can never equal the key of a job without one.
const KEY_CONTEXT_IDENTITY: &str = "dcache 2026-12 cache key v2";

/// A 32-byte cache key, as carried in HASH.
///
/// Two jobs get the same key exactly when their compiler name, language, arguments,
/// compiler identity (when they carry one) and source bytes are the same. So results of
/// two different compilers invoked by one name never share a key; the server also binds
/// its own compiler identity on top before storing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Wraps raw key bytes (from the wire or a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Computes the key of a job whose whole source is at hand.
    pub fn compute(desc: &JobDesc, source: &[u8]) -> Self {
        let mut h = KeyHasher::new(desc);
        h.update(source);
        h.finalize()
    }

    /// Lower-case hex, for file names and logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Computes a [`CacheKey`] incrementally, chunk by chunk, as source arrives.
///
/// The encoding is: every description field as a u64 big-endian length followed by its
/// bytes (compiler, language, the argument count as a u64, then each argument), then the
/// source bytes, then the source length as a u64. A job with a compiler identity is hashed
/// under another context and adds its version, target and digest as three more fields
/// after the arguments. Length prefixes make the field boundaries unambiguous; the
/// trailing length does the same for the source without knowing it up front. The
/// declared `source_len` is not part of the key: the real length is.
#[derive(Clone, Debug)]
pub struct KeyHasher {
    hasher: blake3::Hasher,
    source_len: u64,
}

impl KeyHasher {
    /// Starts a key for this job description.
    pub fn new(desc: &JobDesc) -> Self {
        let context = match desc.identity {
            Some(_) => KEY_CONTEXT_IDENTITY,
            None => KEY_CONTEXT,
        };
        let mut hasher = blake3::Hasher::new_derive_key(context);
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(desc.compiler.as_bytes());
        field(desc.language.as_bytes());
        field(&(desc.args.len() as u64).to_be_bytes());
        for a in &desc.args {
            field(a.as_bytes());
        }
        if let Some(id) = &desc.identity {
            field(id.version.as_bytes());
            field(id.target.as_bytes());
            field(&id.digest);
        }
        Self {
            hasher,
            source_len: 0,
        }
    }

    /// Feeds the next source bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.source_len += chunk.len() as u64;
    }

    /// Source bytes fed so far.
    pub fn source_len(&self) -> u64 {
        self.source_len
    }

    /// The key of the description and all the source fed.
    pub fn finalize(&self) -> CacheKey {
        let mut h = self.hasher.clone();
        h.update(&self.source_len.to_be_bytes());
        CacheKey(*h.finalize().as_bytes())
    }
}
