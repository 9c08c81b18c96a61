//! QUIC and TLS settings of the wire contract: TLS 1.3 only, the ring
//! provider, the ALPN, and client-side server authentication by SHA-256
//! certificate pin or by CA roots.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ALPN;

/// Errors building TLS/QUIC configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// rustls refused the configuration (bad key, no TLS 1.3 suite, ...)
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// the rustls configuration is unusable for QUIC
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// The process's crypto provider: always ring, passed explicitly so nothing
/// depends on the process-level default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-level rustls provider.  Idempotent: a second
/// call (or a provider installed elsewhere) is not an error.
pub fn install_default_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// SHA-256 fingerprint of a DER certificate: what clients pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// How a client authenticates the server.
#[derive(Debug, Clone)]
pub enum ServerAuth {
    /// Accept exactly the certificate with this SHA-256 fingerprint (the TLS
    /// handshake signature is still verified against it).
    Pinned([u8; 32]),
    /// Verify the chain against these roots and the server name (WebPKI).
    Roots(Arc<rustls::RootCertStore>),
}

/// A rustls server configuration for the protocol: TLS 1.3, our ALPN, no
/// client certificates.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<QuicServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))
}

/// A quinn client configuration for the protocol.
pub fn client_config(
    auth: &ServerAuth,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match auth {
        ServerAuth::Pinned(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: *fp,
                provider,
            }))
            .with_no_client_auth(),
        ServerAuth::Roots(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// Accepts exactly one certificate, by SHA-256 fingerprint, and still checks
/// the handshake signature so only the holder of its private key passes.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            &fp[..],
            &self.fingerprint[..],
        )) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
