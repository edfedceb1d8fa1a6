//! The site CA: one self-signed CA per controller, the controller's server certificate, and
//! site certificates signed from a CSR (the site's private key never leaves the site).
//!
//! A site certificate names the site in its subject: CN = site ID, ST = province code. The
//! controller reads identities only from verified certificates, never from messages.
//!
//! Roles: a certificate the controller issued for a conference relay carries, in its subject,
//! `OU = tiandi-relay` ([`RELAY_OU`]); every other site certificate carries `OU = tiandi-site`.
//! The CA writes the whole subject itself and takes nothing from the CSR but its public key, so
//! a site cannot ask for the relay role: the role comes from the enrollment token the operator
//! minted (`tiandi-controller enroll --role relay`), and the registry records it. A relay reads
//! the role of each peer with [`role_from_der`] (or `tls::peer_role`) before it lets it cascade.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::LinkError;

/// The certificates of a PEM text (a chain: leaf first).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LinkError::Pki(format!("bad certificate PEM: {e}")))
}

/// The private key of a PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, LinkError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| LinkError::Pki(format!("bad private key PEM: {e}")))
}

/// The TLS server name every controller certificate carries and every agent checks.
pub const CONTROLLER_NAME: &str = "tiandi-controller";

/// Who a verified certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SiteIdentity {
    pub site_id: String,
    pub province: String,
    /// Certificate serial number, hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// What a site certificate lets its holder do, as the CA wrote it (see the module doc).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// An ordinary site: it reports, receives files, joins conferences as itself.
    #[default]
    Site,
    /// A conference relay: may also join another relay with role `relay` (cascade) and
    /// announce tracks from the sites below it.
    Relay,
    /// A standby controller at the DR centre: may follow the controller's replication log
    /// (and nothing a site may do besides).
    Standby,
}

/// The subject OU of a relay's certificate.
pub const RELAY_OU: &str = "tiandi-relay";
/// The subject OU of a standby controller's certificate.
pub const STANDBY_OU: &str = "tiandi-standby";
/// The subject OU of an ordinary site's certificate.
pub const SITE_OU: &str = "tiandi-site";

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Site => "site",
            CertRole::Relay => "relay",
            CertRole::Standby => "standby",
        }
    }

    fn ou(self) -> &'static str {
        match self {
            CertRole::Site => SITE_OU,
            CertRole::Relay => RELAY_OU,
            CertRole::Standby => STANDBY_OU,
        }
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CertRole {
    type Err = LinkError;
    fn from_str(s: &str) -> Result<CertRole, LinkError> {
        match s {
            "site" => Ok(CertRole::Site),
            "relay" => Ok(CertRole::Relay),
            "standby" => Ok(CertRole::Standby),
            other => Err(LinkError::Pki(format!(
                "unknown role {other:?}: site, relay or standby"
            ))),
        }
    }
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub identity: SiteIdentity,
}

pub use crate::names::validate_name;

fn pki(e: rcgen::Error) -> LinkError {
    LinkError::Pki(e.to_string())
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&b)
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// SHA-256 of a DER certificate, hex: how an enrollment token pins the controller's CA.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Ca {
    /// A new CA, valid for 20 years.
    pub fn generate(name: &str) -> Result<Ca, LinkError> {
        let key = KeyPair::generate().map_err(pki)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Tiandi");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + Duration::from_secs(20 * 365 * 86400));
        let cert = params.self_signed(&key).map_err(pki)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, LinkError> {
        let key = KeyPair::from_pem(key_pem).map_err(pki)?;
        let cert_der = certs_from_pem(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| LinkError::Pki("CA file holds no certificate".into()))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
        })
    }

    /// Loads `ca.pem` + `ca.key` from `dir`, creating them on first use (key file mode 0600).
    pub fn load_or_create(dir: &Path) -> Result<Ca, LinkError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() {
            let cert =
                std::fs::read_to_string(&cert_path).map_err(|e| LinkError::io(&cert_path, e))?;
            let key =
                std::fs::read_to_string(&key_path).map_err(|e| LinkError::io(&key_path, e))?;
            return Ca::from_pem(&cert, &key);
        }
        std::fs::create_dir_all(dir).map_err(|e| LinkError::io(dir, e))?;
        let ca = Ca::generate("Tiandi site CA")?;
        write_private(&key_path, &ca.key.serialize_pem())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(|e| LinkError::io(&cert_path, e))?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, LinkError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(pki)
    }

    /// The controller's server certificate chain (leaf, CA) and key, freshly generated.
    pub fn issue_controller(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), LinkError> {
        let key = KeyPair::generate().map_err(pki)?;
        let mut params = CertificateParams::new(vec![CONTROLLER_NAME.to_string()]).map_err(pki)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CONTROLLER_NAME);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + Duration::from_secs(2 * 365 * 86400));
        let cert = params.signed_by(&key, &self.issuer()?).map_err(pki)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// Signs a site's CSR. The subject comes from the controller (the token's site and
    /// province), never from the CSR; only the CSR's public key is used.
    pub fn sign_site(
        &self,
        csr_pem: &str,
        site_id: &str,
        province: &str,
        validity: Duration,
    ) -> Result<Issued, LinkError> {
        self.sign_site_as(csr_pem, site_id, province, validity, CertRole::Site)
    }

    /// [`Ca::sign_site`] for a conference relay (role [`CertRole::Relay`]).
    pub fn sign_relay(
        &self,
        csr_pem: &str,
        site_id: &str,
        province: &str,
        validity: Duration,
    ) -> Result<Issued, LinkError> {
        self.sign_site_as(csr_pem, site_id, province, validity, CertRole::Relay)
    }

    /// [`Ca::sign_site`] with the role the controller decided (the CSR has no say in it).
    pub fn sign_site_as(
        &self,
        csr_pem: &str,
        site_id: &str,
        province: &str,
        validity: Duration,
        role: CertRole,
    ) -> Result<Issued, LinkError> {
        validate_name("site ID", site_id)?;
        validate_name("province", province)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| LinkError::Pki(format!("bad certificate request: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, site_id);
        dn.push(DnType::StateOrProvinceName, province);
        dn.push(DnType::OrganizationName, "Tiandi site");
        dn.push(DnType::OrganizationalUnitName, role.ou());
        params.distinguished_name = dn;
        // ServerAuth and the site ID as a DNS name: a site marked as a relay serves the sites
        // below it with the same identity (they connect by its site ID, so no other site can
        // stand in for it). Which site relays for a province is the controller's decision.
        params.subject_alt_names = vec![SanType::DnsName(
            site_dns_name(site_id)
                .try_into()
                .map_err(|e: rcgen::Error| LinkError::Pki(e.to_string()))?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(300));
        params.not_after = offset(now + validity);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(pki)?;
        let identity = identity_from_der(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            identity,
        })
    }
}

/// The DNS name a site's certificate carries (and a relay's clients check): the site ID's bytes
/// in hex, in labels of at most 63 characters, under `site.tiandi`. Hex, because DNS names are
/// case-insensitive and take no `_`, while site IDs are case-sensitive and may have one: the
/// mapping must be one-to-one, or one site could stand in for another.
pub fn site_dns_name(site_id: &str) -> String {
    let hex = hex::encode(site_id.as_bytes());
    let mut labels: Vec<&str> = Vec::new();
    let mut rest = hex.as_str();
    while !rest.is_empty() {
        let (a, b) = rest.split_at(rest.len().min(63));
        labels.push(a);
        rest = b;
    }
    labels.push("site.tiandi");
    labels.join(".")
}

/// A new key and CSR for a site. The key stays with the caller (the agent's data dir).
pub fn site_key_and_csr(site_id: &str) -> Result<(String, String), LinkError> {
    let key = KeyPair::generate().map_err(pki)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(pki)?;
    Ok((key.serialize_pem(), csr.pem().map_err(pki)?))
}

/// The role a (verified) certificate carries: [`CertRole::Relay`] (or `Standby`) only if its
/// subject has exactly one OU and it is [`RELAY_OU`] (or [`STANDBY_OU`]); anything else (no OU, certificates from before roles,
/// several OUs) is an ordinary site. Fails closed: when unsure, not a relay.
pub fn role_from_der(der: &[u8]) -> Result<CertRole, LinkError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| LinkError::Pki(format!("unparsable certificate: {e}")))?;
    let ous: Vec<&str> = cert
        .subject()
        .iter_organizational_unit()
        .map(|a| a.as_str().unwrap_or(""))
        .collect();
    Ok(match ous.as_slice() {
        [ou] if *ou == RELAY_OU => CertRole::Relay,
        [ou] if *ou == STANDBY_OU => CertRole::Standby,
        _ => CertRole::Site,
    })
}

/// Reads the site identity out of a (verified) certificate.
pub fn identity_from_der(der: &[u8]) -> Result<SiteIdentity, LinkError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| LinkError::Pki(format!("unparsable certificate: {e}")))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &AttributeTypeAndValue>| -> Option<String> {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let site_id = first(&mut subject.iter_common_name())
        .ok_or_else(|| LinkError::Pki("certificate has no site ID (CN)".into()))?;
    let province = first(&mut subject.iter_state_or_province()).unwrap_or_default();
    // The names a certificate carries become paths, keys and labels: they pass the same
    // grammar as every other name from outside, even under a trusted CA (issue 15, finding 1).
    crate::names::validate_name("certificate site ID (CN)", &site_id)
        .map_err(|e| LinkError::Pki(e.to_string()))?;
    if !province.is_empty() {
        crate::names::validate_name("certificate province (ST)", &province)
            .map_err(|e| LinkError::Pki(e.to_string()))?;
    }
    Ok(SiteIdentity {
        site_id,
        province,
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Writes a secret file readable only by its owner (0600), atomically: the contents go to a
/// new 0600 file beside it, synced, then renamed over `path`, so a full disk or a kill leaves
/// the old secret whole, and a file that was there with looser permissions is replaced, not
/// reused with its mode.
pub fn write_private(path: &Path, contents: &str) -> Result<(), LinkError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .ok_or_else(|| LinkError::Pki(format!("{} names no file", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let _ = std::fs::remove_file(&tmp);
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(contents.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(LinkError::io(path, e));
    }
    Ok(())
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_certificate_carries_identity_from_the_ca_not_the_csr() {
        let ca = Ca::generate("test").unwrap();
        let (_key, csr) = site_key_and_csr("someone-else").unwrap();
        let issued = ca
            .sign_site(&csr, "site-0042", "GD", Duration::from_secs(3600))
            .unwrap();
        assert_eq!(issued.identity.site_id, "site-0042");
        assert_eq!(issued.identity.province, "GD");
        assert_eq!(issued.identity.serial.len(), 32);
        assert!(issued.identity.not_after > unix_now());
    }

    #[test]
    fn the_relay_role_comes_from_the_ca_never_from_the_csr() {
        let ca = Ca::generate("test").unwrap();
        // A CSR that asks for the relay OU in its own subject gets an ordinary site.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "gd-001");
        dn.push(DnType::OrganizationalUnitName, RELAY_OU);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let site = ca
            .sign_site(&csr, "gd-001", "GD", Duration::from_secs(3600))
            .unwrap();
        let der = certs_from_pem(&site.cert_pem).unwrap();
        assert_eq!(role_from_der(&der[0]).unwrap(), CertRole::Site);
        let relay = ca
            .sign_relay(&csr, "gd-relay", "GD", Duration::from_secs(3600))
            .unwrap();
        let der = certs_from_pem(&relay.cert_pem).unwrap();
        assert_eq!(role_from_der(&der[0]).unwrap(), CertRole::Relay);
        assert_eq!(identity_from_der(&der[0]).unwrap().site_id, "gd-relay");
        assert_eq!("relay".parse::<CertRole>().unwrap(), CertRole::Relay);
        assert!("admin".parse::<CertRole>().is_err());
    }

    #[test]
    fn a_certificate_naming_a_path_is_no_identity() {
        for (cn, st) in [("..", "GD"), ("a/b", "GD"), ("gd-001", "../x"), ("", "GD")] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            dn.push(DnType::StateOrProvinceName, st);
            params.distinguished_name = dn;
            let cert = params.self_signed(&key).unwrap();
            let err = identity_from_der(cert.der()).unwrap_err().to_string();
            assert!(err.contains("certificate"), "{cn:?}/{st:?}: {err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_replaced_0600_and_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, "new secret").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o600,
            "a looser file already there is replaced, not reused"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
        assert!(write_private(&dir.path().join("no/such/dir/k"), "x").is_err());
    }

    #[test]
    fn site_dns_names_are_one_to_one_and_valid() {
        assert_eq!(
            site_dns_name("gd_relay.44"),
            "67645f72656c61792e3434.site.tiandi"
        );
        assert_ne!(site_dns_name("GD-1"), site_dns_name("gd-1"));
        let long = "x".repeat(64);
        let n = site_dns_name(&long);
        assert!(n.split('.').all(|l| !l.is_empty() && l.len() <= 63), "{n}");
        assert!(rustls::pki_types::ServerName::try_from(n).is_ok());
    }

    #[test]
    fn ca_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(dir.path()).unwrap();
        let b = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
