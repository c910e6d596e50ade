//! Loading the shared token from the places an operator keeps it, with the rules that
//! keep a weak or exposed token from being accepted at all.
//!
//! The handshake proves possession of the token by challenge-response, so a party that
//! merely connects learns a MAC over nonces; that MAC is an offline guessing oracle for
//! a short token. Hence a minimum length, and (as ssh does for private keys) a token file
//! that group or others can read is refused rather than warned about.

use std::path::{Path, PathBuf};

use dcache_proto::AuthKey;

/// Fewest bytes a token may have (after surrounding whitespace is trimmed).
pub const MIN_TOKEN_LEN: usize = 16;

/// How to make a good token, for error messages and docs.
pub const TOKEN_HINT: &str =
    "generate one with: head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE";

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The token file is readable by group or others.
    #[error(
        "{path} is readable by other users (mode {mode:o}); chmod 600 it (a readable token \
         is anyone's)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token is too short to resist offline guessing.
    #[error("the token has {len} bytes, fewer than {MIN_TOKEN_LEN}; {TOKEN_HINT}")]
    TooShort {
        /// Its length after trimming.
        len: usize,
    },
}

/// The key for `token` (e.g. the value of `DCACHE_TOKEN`), if it is long enough.
pub fn token_key(token: &[u8]) -> Result<AuthKey, TokenError> {
    let len = token.trim_ascii().len();
    if len < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort { len });
    }
    Ok(AuthKey::from_token(token))
}

/// Reads the token in `path`: the file must be readable by its owner only and hold at
/// least [`MIN_TOKEN_LEN`] bytes.
pub fn read_token_file(path: &Path) -> Result<AuthKey, TokenError> {
    Ok(AuthKey::from_token(&read_secret_file(path)?))
}

/// Reads a shared secret under the token's rules (owner-only file, at least
/// [`MIN_TOKEN_LEN`] bytes after trimming) and returns it trimmed: for other secrets an
/// operator hands every server the same way, such as the shared cache tier's key.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, TokenError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let secret = std::fs::read(path).map_err(read_err)?;
    let trimmed = secret.trim_ascii();
    if trimmed.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort { len: trimmed.len() });
    }
    Ok(trimmed.to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    #[test]
    fn short_tokens_are_refused_with_the_way_to_make_one() {
        let e = token_key(b"hunter2\n").unwrap_err();
        assert!(matches!(e, TokenError::TooShort { len: 7 }));
        assert!(e.to_string().contains("/dev/urandom"));
        assert!(token_key(b"  0123456789abcdef  ").is_ok());
        let (_d, p) = file("hunter2\n", 0o600);
        assert!(matches!(
            read_token_file(&p),
            Err(TokenError::TooShort { .. })
        ));
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let (_d, p) = file("0123456789abcdef0123", mode);
            let e = read_token_file(&p).unwrap_err();
            assert!(matches!(e, TokenError::Exposed { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod 600"));
        }
        let (_d, p) = file("0123456789abcdef0123\n", 0o600);
        assert_eq!(
            read_token_file(&p).unwrap(),
            AuthKey::from_token(b"0123456789abcdef0123")
        );
        let (_d, p) = file("0123456789abcdef0123\n", 0o400);
        assert!(read_token_file(&p).is_ok());
    }
}
