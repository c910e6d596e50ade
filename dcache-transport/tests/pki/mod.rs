//! Certificates for tests, made at run time with rcgen: a CA, then server and client
//! certificates it signs (current, expired, or for another name), written as PEM files in
//! a temporary directory, the way an operator hands them to dcache.
//!
//! Shared by the TLS tests of several crates (`#[path]`-included), so no test carries a
//! certificate that could expire in the repository.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use dcache_transport::{TlsClient, TlsServer};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, date_time_ymd,
};

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From 2020 until 2100.
    Current,
    /// During 2020 only.
    Expired,
}

/// A CA and the directory its files go to.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    next: AtomicU32,
}

impl Pki {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self {
            dir,
            ca,
            ca_file,
            next: AtomicU32::new(0),
        }
    }

    /// The CA certificate's PEM file.
    pub fn ca(&self) -> PathBuf {
        self.ca_file.clone()
    }

    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> (PathBuf, PathBuf) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("dcache test {n}"));
        params.extended_key_usages = vec![usage];
        match validity {
            Validity::Current => {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2100, 1, 1);
            }
            Validity::Expired => {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2021, 1, 1);
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_file = self.dir.path().join(format!("cert{n}.pem"));
        let key_file = self.dir.path().join(format!("key{n}.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// A server certificate for `names` (host names or IP literals) and its key.
    pub fn server_files(&self, names: &[&str], validity: Validity) -> (PathBuf, PathBuf) {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A client certificate and its key.
    pub fn client_files(&self) -> (PathBuf, PathBuf) {
        self.issue(
            &["client.dcache.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Current,
        )
    }

    /// Server settings for a current certificate valid for 127.0.0.1 and localhost.
    pub fn server(&self) -> TlsServer {
        let (cert, key) = self.server_files(&["127.0.0.1", "localhost"], Validity::Current);
        TlsServer::new(&cert, &key, None).unwrap()
    }

    /// Client settings trusting this CA only, without a client certificate.
    pub fn client(&self) -> TlsClient {
        TlsClient::new(Some(&self.ca()), None).unwrap()
    }

    /// Client settings trusting `server_ca`, presenting a certificate of this CA.
    pub fn client_with_cert(&self, server_ca: &Pki) -> TlsClient {
        let (cert, key) = self.client_files();
        TlsClient::new(Some(&server_ca.ca()), Some((&cert, &key))).unwrap()
    }
}
