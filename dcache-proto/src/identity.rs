//! A compiler's identity: what a client tells a server about the compiler it would run
//! itself, so the server runs only the same one and the cache key binds it.
//!
//! The identity is compared on what decides the output (the version the compiler reports,
//! its target, and a digest of the bytes of the programs that do the compiling), never on
//! the path or the name it was invoked by: `/usr/bin/gcc` and
//! `/usr/bin/x86_64-linux-gnu-gcc-12` are the same compiler, a script named `gcc` is not.
//! This crate only carries and hashes identities; finding the programs and reading them
//! is the caller's (`dcache_server::exec::identity` does it for both ends).

use std::fmt;

/// blake3 context of [`IdentityDigest`]: identity digests can never equal any other
/// blake3 value dcache computes.
const DIGEST_CONTEXT: &str = "dcache 2026-12 compiler identity digest v1";

/// Most bytes of [`CompilerIdentity::version`] or [`CompilerIdentity::target`]: both are
/// one line a compiler prints; a longer one is cut there, so a JOB stays small.
pub const MAX_IDENTITY_FIELD: usize = 256;

/// The identity of one compiler, as the client's compiler would compile: sent in JOB
/// (flag `IDENTITY`, protocol version 2) and bound into the cache key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CompilerIdentity {
    /// The first line of the compiler's `--version` output, run under its canonical path
    /// (`x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`). Named in the
    /// warning of a refused job, so a person sees which versions differed.
    pub version: String,
    /// What `-dumpmachine` prints (`x86_64-linux-gnu`): the target objects are built for.
    pub target: String,
    /// [`IdentityDigest`] over the driver and the programs it runs to compile (for gcc:
    /// `cc1`, `cc1plus`, `as`): two compilers with the same version line but other bytes
    /// (a wrapper script, a patched build) differ here.
    pub digest: [u8; 32],
}

impl CompilerIdentity {
    /// Builds an identity, cutting `version` and `target` to their first line and to
    /// [`MAX_IDENTITY_FIELD`] bytes (at a character boundary), as every JOB carries them.
    pub fn new(version: &str, target: &str, digest: [u8; 32]) -> Self {
        Self {
            version: one_line(version),
            target: one_line(target),
            digest,
        }
    }

    /// The digest in lower-case hex.
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Short form for people: the version line, the target, and the digest's first 12 hex
/// digits (enough to tell two builds of one version apart in a warning).
impl fmt::Display for CompilerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}, {}]",
            self.version,
            self.target,
            &self.digest_hex()[..12]
        )
    }
}

impl fmt::Debug for CompilerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CompilerIdentity({:?}, {:?}, {})",
            self.version,
            self.target,
            self.digest_hex()
        )
    }
}

fn one_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let mut end = line.len().min(MAX_IDENTITY_FIELD);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

/// Computes [`CompilerIdentity::digest`]: every program that takes part in a compile, in
/// a fixed order, each as its length and its own blake3 hash, so the boundaries between
/// files are unambiguous. Both ends use it, so the same files give the same digest on
/// every machine.
#[derive(Clone, Debug)]
pub struct IdentityDigest {
    hasher: blake3::Hasher,
}

impl Default for IdentityDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new_derive_key(DIGEST_CONTEXT),
        }
    }

    /// Adds one program: its role (`driver`, `cc1`, `as`, …, so a file cannot stand in for
    /// another) and its bytes.
    pub fn add_file(&mut self, role: &str, bytes: &[u8]) {
        self.add_file_digest(role, bytes.len() as u64, blake3::hash(bytes).as_bytes());
    }

    /// [`add_file`](Self::add_file) for a file hashed elsewhere (streamed, so a 35 MB
    /// `cc1` is never held whole): its length and its plain blake3 hash.
    pub fn add_file_digest(&mut self, role: &str, len: u64, hash: &[u8; 32]) {
        self.hasher.update(&(role.len() as u64).to_be_bytes());
        self.hasher.update(role.as_bytes());
        self.hasher.update(&len.to_be_bytes());
        self.hasher.update(hash);
    }

    /// The digest of the programs added.
    pub fn finish(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_one_bounded_line() {
        let long = "é".repeat(200);
        let id = CompilerIdentity::new("gcc 12\nsecond line", &long, [0; 32]);
        assert_eq!(id.version, "gcc 12");
        assert!(id.target.len() <= MAX_IDENTITY_FIELD);
        assert!(long.starts_with(&id.target));
    }

    #[test]
    fn digest_separates_roles_and_files() {
        let digest = |files: &[(&str, &[u8])]| {
            let mut d = IdentityDigest::new();
            for (role, bytes) in files {
                d.add_file(role, bytes);
            }
            d.finish()
        };
        let one = digest(&[("driver", b"ab"), ("cc1", b"c")]);
        assert_ne!(one, digest(&[("driver", b"a"), ("cc1", b"bc")]));
        assert_ne!(one, digest(&[("cc1", b"ab"), ("driver", b"c")]));
        assert_eq!(one, digest(&[("driver", b"ab"), ("cc1", b"c")]));
    }
}
