//! TLS material: the downstream server certificate (PEM or DER files, or a
//! self-signed one kept in the state directory) and the client TLS configs
//! spooky uses towards backends.
//!
//! rustls runs on the `ring` provider: it builds with only a C compiler (no
//! cmake, Go or NASM as aws-lc-sys may need), which keeps a fresh-machine
//! build to `cargo build`, and its AES-GCM/ChaCha20 assembly is as fast as
//! aws-lc's for the QUIC packet protection that dominates our crypto time.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// ALPN token of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// Errors building TLS configuration. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path}: no certificate found (expected PEM `BEGIN CERTIFICATE` blocks or one DER certificate)"
    )]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found (expected a PEM or DER PKCS#8, PKCS#1 or SEC1 key)")]
    NoKey { path: PathBuf },
    #[error("{path}: invalid PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("certificate and key do not form a usable TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: no CA certificate found")]
    NoCa { path: PathBuf },
    #[error("no system root certificates found; set `tls.ca` on the upstream")]
    NoSystemRoots,
    #[error("QUIC rejects this TLS config: {0}")]
    Quic(String),
    #[error("client CA cannot verify client certificates: {0}")]
    ClientVerifier(String),
}

/// The process-wide crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

/// Loads a certificate chain from a PEM file (one or more certificates) or a
/// DER file (exactly one certificate).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = if is_pem(&bytes) {
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: path.to_owned(),
                detail: e.to_string(),
            })?
    } else if bytes.is_empty() {
        Vec::new()
    } else {
        vec![CertificateDer::from(bytes)]
    };
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads a private key from a PEM or DER file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    if is_pem(&bytes) {
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoKey {
            path: path.to_owned(),
        })
    } else {
        PrivateKeyDer::try_from(bytes).map_err(|_| TlsError::NoKey {
            path: path.to_owned(),
        })
    }
}

/// Where the self-signed certificate lives inside the state directory.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("self-signed-cert.pem"),
        state_dir.join("self-signed-key.pem"),
    )
}

/// Returns the paths of a self-signed certificate for `localhost`,
/// generating it on first use. It is kept across restarts so that clients
/// that pinned it keep working.
pub fn ensure_self_signed(state_dir: &Path) -> Result<(PathBuf, PathBuf, bool), TlsError> {
    let (cert_path, key_path) = self_signed_paths(state_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path, false));
    }
    fs::create_dir_all(state_dir).map_err(|source| TlsError::Write {
        path: state_dir.to_owned(),
        source,
    })?;
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified = rcgen::generate_simple_self_signed(names)?;
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    fs::write(&cert_path, certified.cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.clone(),
        source,
    })?;
    Ok((cert_path, key_path, true))
}

/// Writes a file readable only by its owner (keys and secrets).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let result = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
    result.map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Builds the TCP listener's TLS config: TLS 1.2 and 1.3, ALPN `h2` then
/// `http/1.1`.
pub fn tcp_server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    server_config(
        cert,
        key,
        rustls::DEFAULT_VERSIONS,
        None,
        &[b"h2", b"http/1.1"],
    )
}

/// A server TLS config; with `client_ca`, clients must present a
/// certificate issued by it (mTLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tls)
}

/// Builds the QUIC server crypto config: TLS 1.3 only (QUIC requires it),
/// ALPN `h3`.
pub fn quic_server_config(
    cert: &Path,
    key: &Path,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    quic_server_config_with_client_auth(cert, key, None)
}

/// Resumption tickets the listener remembers (for 0-RTT, which rustls
/// accepts only with single-use, server-side session state).
const SESSION_CACHE: usize = 16 * 1024;

/// The downstream QUIC TLS config; `early_data` accepts 0-RTT from
/// resuming clients (the proxy then admits only safe methods early).
pub fn quic_listener_config(
    cert: &Path,
    key: &Path,
    early_data: bool,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let mut tls = server_config(cert, key, &[&rustls::version::TLS13], None, &[ALPN_H3])?;
    if early_data {
        // quinn accepts exactly 0 or u32::MAX here.
        tls.max_early_data_size = u32::MAX;
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    } else {
        tls.max_early_data_size = 0;
    }
    quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// [`quic_server_config`], requiring client certificates from `client_ca`
/// when given.
pub fn quic_server_config_with_client_auth(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let mut tls = server_config(cert, key, &[&rustls::version::TLS13], client_ca, &[ALPN_H3])?;
    tls.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// How spooky verifies a backend's certificate.
#[derive(Debug, Clone)]
pub enum Verification {
    /// Roots from the system store (`/etc/ssl/certs`).
    SystemRoots,
    /// Roots from a PEM/DER CA file.
    CaFile(PathBuf),
    /// No verification at all: for tests and demos only.
    InsecureSkipVerify,
}

/// Builds a client TLS config for QUIC towards backends (TLS 1.3, ALPN h3),
/// presenting `client_auth` (certificate chain, key) when given (mTLS).
pub fn quic_client_config(
    verification: &Verification,
    alpn: &[&[u8]],
    client_auth: Option<(&Path, &Path)>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let tls = client_config(verification, &[&rustls::version::TLS13], alpn, client_auth)?;
    quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

/// Builds a rustls client config with the given verification, ALPN and
/// optional client certificate (mTLS).
pub fn client_config(
    verification: &Verification,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
    client_auth: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder =
        rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match verification {
        Verification::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
        Verification::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCa { path: path.clone() });
            }
            builder.with_root_certificates(roots)
        }
        Verification::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
            builder.with_root_certificates(roots)
        }
    };
    let mut tls = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tls)
}

/// Parses a server name for SNI and certificate verification (a DNS name
/// or an IP address).
pub fn server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).ok()
}

/// Accepts any certificate. Only reachable through an explicit
/// `insecure_skip_verify: true`, which spooky logs as a warning.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_stable_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, fresh1) = ensure_self_signed(dir.path()).unwrap();
        let pem1 = fs::read(&c1).unwrap();
        let (c2, k2, fresh2) = ensure_self_signed(dir.path()).unwrap();
        assert!(fresh1 && !fresh2);
        assert_eq!((c1.clone(), k1.clone()), (c2, k2));
        assert_eq!(pem1, fs::read(&c1).unwrap());
        quic_server_config(&c1, &k1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&k1).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn loads_der_as_well_as_pem() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = ensure_self_signed(dir.path()).unwrap();
        let der_cert = dir.path().join("cert.der");
        let der_key = dir.path().join("key.der");
        fs::write(&der_cert, load_certs(&cert).unwrap()[0].as_ref()).unwrap();
        fs::write(&der_key, load_key(&key).unwrap().secret_der()).unwrap();
        quic_server_config(&der_cert, &der_key).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = load_certs(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no certificate"),
            "{err}"
        );
        let missing = load_key(&dir.path().join("nope.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.pem"), "{missing}");
    }
}
