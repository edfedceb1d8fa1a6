//! rustls configurations for QUIC: the controller's server side (client certificates checked
//! against the site CA *and* the controller's own registry: unknown, superseded or revoked
//! certificates fail the handshake), an enrolled agent's client side, and the enrollment client
//! that trusts only the CA pinned by its token.
//!
//! TLS session resumption is off on both sides: a resumed session would skip the client
//! certificate check, and with it revocation.

use std::fmt::Debug;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::LinkError;
use crate::pki::{self, SiteIdentity, certs_from_pem, key_from_pem};

/// ALPN of the report/control connection (client certificate required).
pub const ALPN_SITE: &[u8] = b"tiandi/1";
/// ALPN of the enrollment connection (no client certificate yet).
pub const ALPN_ENROLL: &[u8] = b"tiandi-enroll/1";
/// ALPN of a standby controller's replication connection (a `standby` certificate), and of a
/// controller asking another which fencing epoch it is at (no certificate needed for that).
pub const ALPN_REPLICA: &[u8] = b"tiandi-replica/1";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(e: impl std::fmt::Display) -> LinkError {
    LinkError::Tls(e.to_string())
}

/// Why the controller turns a CA-signed certificate away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The controller has no such site (or it was never enrolled through this controller).
    Unknown,
    /// The site was revoked.
    Revoked,
    /// The site re-enrolled since: only its newest certificate is accepted.
    Superseded,
}

/// The controller's registry, consulted during every handshake.
pub trait CertPolicy: Send + Sync + Debug {
    fn check(&self, id: &SiteIdentity) -> Result<(), Rejection>;
}

#[derive(Debug)]
struct PolicyVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<dyn CertPolicy>,
    /// A relay takes no enrollments: every peer must present a certificate.
    mandatory: bool,
}

impl ClientCertVerifier for PolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        // Enrollment connections (to the controller) come without a certificate; the
        // application refuses every other use of an unauthenticated connection.
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = pki::identity_from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match self.policy.check(&id) {
            Ok(()) => Ok(ok),
            Err(Rejection::Revoked) | Err(Rejection::Superseded) => {
                tracing::warn!(site = %id.site_id, serial = %id.serial, "Refused a revoked or superseded certificate.");
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            Err(Rejection::Unknown) => {
                tracing::warn!(site = %id.site_id, serial = %id.serial, "Refused a certificate of an unknown site.");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The controller's TLS: its chain, client certificates from `ca` checked by `policy`.
pub fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
    policy: Arc<dyn CertPolicy>,
) -> Result<rustls::ServerConfig, LinkError> {
    let mut cfg = server_with_policy(vec![ca.clone()], chain, key, policy, false)?;
    cfg.alpn_protocols = vec![
        ALPN_SITE.to_vec(),
        ALPN_ENROLL.to_vec(),
        ALPN_REPLICA.to_vec(),
    ];
    Ok(cfg)
}

/// A TLS 1.3 server presenting `chain`, taking client certificates from `cas` checked by
/// `policy` (required if `mandatory`); no tickets, no early data.
fn server_with_policy(
    cas: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    policy: Arc<dyn CertPolicy>,
    mandatory: bool,
) -> Result<rustls::ServerConfig, LinkError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c).map_err(tls)?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !mandatory {
        builder = builder.allow_unauthenticated();
    }
    let inner = builder.build().map_err(tls)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(PolicyVerifier {
            inner,
            policy,
            mandatory,
        }))
        .with_single_cert(chain, key)
        .map_err(tls)?;
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// Which sites a relay serves: those of its own province.
#[derive(Debug)]
pub struct SameProvince(pub String);

impl CertPolicy for SameProvince {
    fn check(&self, id: &SiteIdentity) -> Result<(), Rejection> {
        if id.province == self.0 {
            Ok(())
        } else {
            Err(Rejection::Unknown)
        }
    }
}

/// The TLS server name a relay's certificate carries (see [`pki::site_dns_name`]).
pub fn relay_server_name(site_id: &str) -> String {
    pki::site_dns_name(site_id)
}

/// A relay's server TLS (a site serving the sites below it): its own site certificate,
/// client certificates from the site CA, checked by `policy` (see [`SameProvince`]).
pub fn relay_server_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    policy: Arc<dyn CertPolicy>,
) -> Result<rustls::ServerConfig, LinkError> {
    let mut cfg = server_with_policy(
        certs_from_pem(ca_pem)?,
        certs_from_pem(cert_pem)?,
        key_from_pem(key_pem)?,
        policy,
        true,
    )?;
    cfg.alpn_protocols = vec![ALPN_SITE.to_vec()];
    Ok(cfg)
}

/// An enrolled site's TLS: trusts the controller's CA, presents the site certificate.
pub fn site_client_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, LinkError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c).map_err(tls)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN_SITE.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// A controller's replication client (ALPN [`ALPN_REPLICA`]): trusts the site CA; with
/// `identity` (a standby's certificate and key) it may follow the log, without it it may only
/// ask the epoch.
pub fn replica_client_tls(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, LinkError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c).map_err(tls)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certs_from_pem(cert)?, key_from_pem(key)?)
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_REPLICA.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// Trusts a server only if its chain contains the CA with this SHA-256 fingerprint and the
/// server certificate verifies against that CA. This is how a one-time token bootstraps trust.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    /// Handshake signatures are checked with the provider's algorithms, as WebPKI would.
    fn algs(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::fingerprint(c) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algs())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algs())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs().supported_schemes()
    }
}

/// The enrollment client's TLS: no client certificate, the CA pinned by fingerprint.
pub fn enroll_client_tls(ca_fingerprint: &str) -> Result<rustls::ClientConfig, LinkError> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: ca_fingerprint.to_ascii_lowercase(),
            provider,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The role of a connection's (verified) peer certificate ([`pki::CertRole`]); `None` without
/// a certificate or when it cannot be read (callers treat that as "not a relay").
pub fn peer_role(conn: &quinn::Connection) -> Option<pki::CertRole> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    pki::role_from_der(certs.first()?).ok()
}
