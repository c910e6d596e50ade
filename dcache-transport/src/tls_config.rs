//! TLS settings: certificates, keys and trusted CAs read from PEM files once, at start-up,
//! into rustls configurations that every connection then shares.
//!
//! Choices, and why:
//! - **ring** as the crypto provider, named explicitly (never the process default): it
//!   builds with nothing but a C compiler, where aws-lc-rs needs cmake and a long native
//!   build; and naming it means another crate enabling a second provider cannot make
//!   rustls refuse to pick one at run time.
//! - **TLS 1.3 only**: both ends are dcache (rustls), so there is no old peer to keep
//!   TLS 1.2 and its cipher-suite choices for.
//! - **System roots** come from the operating system's trust store (`rustls-native-certs`:
//!   `/etc/ssl/certs` on Debian), not a list compiled into the binary, so an administrator
//!   who adds a company CA to the system store, or removes a distrusted one, is obeyed.
//!   A private CA given explicitly ([`TlsClient::new`] with a CA file, `DCACHE_TLS_CA` in
//!   the wrapper) *replaces* the system roots: a build server named under a private CA
//!   should not also be accepted with a certificate from any of the public CAs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS settings could not be loaded. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A certificate, key or CA file cannot be read.
    #[error("cannot read the {what} file {path}: {source}")]
    Read {
        /// Which file: "certificate", "private key", "CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A certificate or CA file holds no PEM certificate.
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate could not be used as a trust anchor.
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The certificate and key do not make an identity (a key of another certificate, an
    /// algorithm the provider does not support).
    #[error("certificate {cert} with key {key}: {reason}")]
    BadIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The crypto provider cannot make a TLS 1.3 configuration (a build problem, not a
    /// configuration one).
    #[error("the TLS provider cannot serve TLS 1.3: {0}")]
    Provider(String),
    /// The system's trust store has no certificate at all.
    #[error(
        "no trusted CA certificates found in the system store ({reason}); install \
         ca-certificates or name the CA that signed the server's certificate explicitly"
    )]
    NoSystemRoots {
        /// What the loader reported.
        reason: String,
    },
}

/// The one crypto provider dcache uses (see the module documentation).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(what, path)?;
    // Unparsable sections are skipped like any non-certificate text in the file; a file
    // with no certificate at all is what gets reported.
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsConfigError::NoKey {
        path: path.to_path_buf(),
    })
}

fn ca_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA", path)? {
        roots.add(cert).map_err(|e| TlsConfigError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let reason = match found.errors.first() {
            Some(e) => e.to_string(),
            None => "the store is empty".into(),
        };
        return Err(TlsConfigError::NoSystemRoots { reason });
    }
    Ok(roots)
}

fn bad_identity(cert: &Path, key: &Path) -> impl Fn(rustls::Error) -> TlsConfigError {
    move |e| TlsConfigError::BadIdentity {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A client's TLS settings: which CAs it trusts for servers, and optionally the
/// certificate it proves itself with (for servers that demand one). Cheap to clone: the
/// configuration is shared.
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// Trusts the CAs in the PEM file `ca` (replacing the system roots), or the system
    /// roots when `ca` is `None`; presents the certificate chain and key in `identity`
    /// (PEM files: certificate, key) to servers that ask for one.
    pub fn new(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, TlsConfigError> {
        let roots = match ca {
            Some(path) => ca_roots(path)?,
            None => system_roots()?,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsConfigError::Provider(e.to_string()))?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates("certificate", cert)?, private_key(key)?)
                .map_err(bad_identity(cert, key))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The system roots and no client certificate: what a `tls://` address gets when
    /// nothing else is configured. Loaded once per process.
    pub(crate) fn system_default() -> Result<Self, String> {
        static DEFAULT: OnceLock<Result<TlsClient, String>> = OnceLock::new();
        DEFAULT
            .get_or_init(|| Self::new(None, None).map_err(|e| e.to_string()))
            .clone()
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field(
                "client_certificate",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

/// Two settings are equal when they are the same loaded configuration (clones of one
/// [`TlsClient`]); configurations are not compared field by field.
impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}
impl Eq for TlsClient {}

/// A server's TLS settings: its certificate and key, optionally the CA whose client
/// certificates it requires (mutual TLS), and how long a handshake may take. Cheap to
/// clone.
#[derive(Clone)]
pub struct TlsServer {
    pub(crate) config: Arc<rustls::ServerConfig>,
    pub(crate) handshake_timeout: Duration,
}

impl TlsServer {
    /// Serves the certificate chain in the PEM file `cert` with the private key in `key`.
    /// With `client_ca`, every client must present a certificate issued by a CA in that
    /// PEM file: a client without one completes no handshake and gets no service.
    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsConfigError> {
        let chain = certificates("certificate", cert)?;
        let private = private_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsConfigError::Provider(e.to_string()))?;
        let builder = match client_ca {
            Some(path) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca_roots(path)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsConfigError::BadCa {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, private)
            .map_err(bad_identity(cert, key))?;
        Ok(Self {
            config: Arc::new(config),
            handshake_timeout: Duration::from_secs(10),
        })
    }

    /// These settings with another limit on the TLS handshake (default 10 s). The limit
    /// is the stream's own: a peer that connects and never finishes its handshake holds
    /// a connection only this long, whatever the protocol above waits for.
    pub fn with_handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Two settings are equal when they are the same loaded configuration with the same
/// handshake limit.
impl PartialEq for TlsServer {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.handshake_timeout == other.handshake_timeout
    }
}
impl Eq for TlsServer {}
