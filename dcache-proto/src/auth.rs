//! Shared-token authentication: a challenge-response run inside the handshake, so the
//! token itself never crosses the wire and a recorded exchange cannot be replayed.
//!
//! Both ends derive an [`AuthKey`] from the token. The client's HELLO carries a fresh
//! client nonce; the server's HELLO carries a fresh server nonce and the server's proof
//! (a keyed BLAKE3 MAC over both nonces); the client checks that proof and answers with an
//! AUTH frame holding its own proof over both nonces, in the other order and under another
//! label. The server accepts no job before a valid AUTH. Each side proves it knows the key
//! to the other: a client with a token never sends source to a server that cannot prove
//! it has the token too.
//!
//! Nonces come in from the owner (this crate has no randomness of its own); they must be
//! unpredictable and never reused, which is what makes a captured proof worthless.

use std::fmt;

/// HELLO feature bit: the sender takes part in shared-token authentication, and the HELLO
/// extensions begin with its auth fields (see `docs/PROTOCOL.md` §5.1).
pub const FEATURE_AUTH: u64 = 1;

/// Length of a nonce and of a proof.
pub const AUTH_LEN: usize = 32;

/// A challenge nonce: 32 bytes from a cryptographic random source, fresh per connection.
pub type Nonce = [u8; AUTH_LEN];

/// The key both ends derive from the shared token.
///
/// Holding the derived key rather than the token means a token of any length or encoding
/// gives a full-strength MAC key; the derivation context keeps it from being reused as a
/// key anywhere else. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey([u8; 32]);

impl AuthKey {
    /// Derives the key from a token. Leading and trailing ASCII whitespace is ignored, so a
    /// token file with a trailing newline and `DCACHE_TOKEN` set to the same text agree.
    pub fn from_token(token: &[u8]) -> Self {
        Self(blake3::derive_key(
            "dcache 2026-11 shared token v1",
            token.trim_ascii(),
        ))
    }

    fn mac(&self, label: &[u8], first: &Nonce, second: &Nonce) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(first);
        h.update(second);
        h.finalize()
    }

    /// The server's proof: binds the client's challenge to the server's.
    pub(crate) fn server_proof(&self, client: &Nonce, server: &Nonce) -> blake3::Hash {
        self.mac(b"dcache auth v1 server", client, server)
    }

    /// The client's proof, under a different label so neither proof can stand for the
    /// other.
    pub(crate) fn client_proof(&self, server: &Nonce, client: &Nonce) -> blake3::Hash {
        self.mac(b"dcache auth v1 client", server, client)
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

/// Checks a received proof. `blake3::Hash` compares in constant time, so the comparison
/// leaks nothing about how many bytes matched.
pub(crate) fn proof_matches(expected: blake3::Hash, received: &[u8; AUTH_LEN]) -> bool {
    expected == blake3::Hash::from_bytes(*received)
}

/// Reads `n` nonce-sized fields from the front of HELLO extensions.
pub(crate) fn read_fields<const N: usize>(extensions: &[u8]) -> Option<[Nonce; N]> {
    let mut out = [[0u8; AUTH_LEN]; N];
    for (i, field) in out.iter_mut().enumerate() {
        *field = extensions
            .get(i * AUTH_LEN..(i + 1) * AUTH_LEN)?
            .try_into()
            .ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_around_the_token_does_not_matter() {
        assert_eq!(
            AuthKey::from_token(b"s3cret\n"),
            AuthKey::from_token(b"  s3cret")
        );
        assert_ne!(
            AuthKey::from_token(b"s3cret"),
            AuthKey::from_token(b"s3cres")
        );
    }

    #[test]
    fn proofs_depend_on_both_nonces_order_and_side() {
        let k = AuthKey::from_token(b"t");
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_ne!(k.server_proof(&a, &b), k.server_proof(&b, &a));
        assert_ne!(k.server_proof(&a, &b), k.client_proof(&a, &b));
        assert!(proof_matches(
            k.client_proof(&a, &b),
            k.client_proof(&a, &b).as_bytes()
        ));
        assert!(!proof_matches(
            AuthKey::from_token(b"u").client_proof(&a, &b),
            k.client_proof(&a, &b).as_bytes()
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", AuthKey::from_token(b"t")), "AuthKey(..)");
    }

    #[test]
    fn fields_are_read_from_the_front() {
        let mut ext = vec![7u8; 32];
        ext.extend([9u8; 32]);
        ext.push(0);
        assert_eq!(read_fields::<2>(&ext), Some([[7u8; 32], [9u8; 32]]));
        assert_eq!(read_fields::<2>(&ext[..40]), None);
    }
}
