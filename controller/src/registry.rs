//! The site registry: which sites exist, their current certificate, revocations, and one-time
//! enrollment tokens. Persisted in sled, mirrored in memory for the TLS handshake check.
//!
//! Token format: `T1.<secret, 32 hex>.<CA SHA-256, 64 hex>`. The controller stores only the
//! secret's SHA-256; the agent uses the fingerprint to trust the controller before it has a
//! certificate of its own.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_link::pki::{self, CertRole, unix_now, validate_name};
use tiandi_link::tls::{CertPolicy, Rejection};
use tiandi_link::{Ca, SiteIdentity};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("storage: {0}")]
    Db(#[from] sled::Error),
    #[error("{0}")]
    Link(#[from] tiandi_link::LinkError),
    #[error("unknown or already used enrollment token")]
    BadToken,
    #[error("enrollment token expired")]
    TokenExpired,
    #[error("malformed enrollment token (expected T1.<secret>.<fingerprint>)")]
    MalformedToken,
    #[error("site {0} is not registered")]
    UnknownSite(String),
    #[error("corrupt registry record: {0}")]
    Corrupt(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteRecord {
    pub site_id: String,
    pub province: String,
    /// Serial of the one certificate accepted for this site (hex); `None` before enrollment.
    pub serial: Option<String>,
    pub not_after: i64,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
    /// What its current certificate lets it do (a conference relay, or an ordinary site); the
    /// CA wrote it into the certificate from the token (records from before roles: a site).
    #[serde(default)]
    pub role: CertRole,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    site_id: String,
    province: String,
    expires_at: i64,
    /// The role the certificate will carry: the operator's decision, never the site's.
    #[serde(default)]
    role: CertRole,
}

/// A one-time enrollment token, as the API and the CLI show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Token {
    pub token: String,
    pub site_id: String,
    pub province: String,
    pub expires_at: i64,
    /// The role the site's certificate will carry.
    #[serde(default)]
    pub role: CertRole,
}

#[derive(Debug)]
pub struct Registry {
    sites: sled::Tree,
    tokens: sled::Tree,
    cache: RwLock<HashMap<String, SiteRecord>>,
    ca_fingerprint: String,
    /// Bumped whenever a certificate stops being accepted (revocation, re-enrollment): live
    /// sessions watch it and check their certificate again (issue 15, finding 6).
    changes: tokio::sync::watch::Sender<u64>,
}

fn hash(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

impl Registry {
    pub fn open(db: &sled::Db, ca: &Ca) -> Result<Arc<Registry>, RegistryError> {
        let sites = db.open_tree("sites")?;
        let tokens = db.open_tree("tokens")?;
        let mut cache = HashMap::new();
        for kv in sites.iter() {
            let (_, v) = kv?;
            let rec: SiteRecord =
                serde_json::from_slice(&v).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
            cache.insert(rec.site_id.clone(), rec);
        }
        Ok(Arc::new(Registry {
            sites,
            tokens,
            cache: RwLock::new(cache),
            ca_fingerprint: ca.fingerprint(),
            changes: tokio::sync::watch::channel(0).0,
        }))
    }

    /// Changes whenever a certificate may have stopped being accepted (a revocation, a
    /// re-enrollment that supersedes the old certificate): a live session checks its own
    /// certificate again ([`CertPolicy::check`]) and closes if it is no longer accepted.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn put(&self, rec: SiteRecord) -> Result<(), RegistryError> {
        let v = serde_json::to_vec(&rec).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        self.sites.insert(rec.site_id.as_bytes(), v)?;
        self.sites.flush()?;
        self.cache
            .write()
            .expect("registry lock poisoned")
            .insert(rec.site_id.clone(), rec);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Creates a one-time token for `site_id` in `province`, valid for `ttl`.
    pub fn create_token(
        &self,
        site_id: &str,
        province: &str,
        ttl: Duration,
    ) -> Result<Token, RegistryError> {
        self.create_token_as(site_id, province, ttl, CertRole::Site)
    }

    /// [`Registry::create_token`] for a certificate with `role` (`CertRole::Relay`: a
    /// conference relay that may cascade; only an operator mints such a token).
    pub fn create_token_as(
        &self,
        site_id: &str,
        province: &str,
        ttl: Duration,
        role: CertRole,
    ) -> Result<Token, RegistryError> {
        let t = self.create_token_unflushed(site_id, province, ttl, role)?;
        self.tokens.flush()?;
        Ok(t)
    }

    /// Creates many tokens with one flush (a batch of sites being rolled out).
    pub fn create_tokens(
        &self,
        sites: &[(String, String)],
        ttl: Duration,
    ) -> Result<Vec<Token>, RegistryError> {
        let tokens = sites
            .iter()
            .map(|(s, p)| self.create_token_unflushed(s, p, ttl, CertRole::Site))
            .collect::<Result<Vec<_>, _>>()?;
        self.tokens.flush()?;
        Ok(tokens)
    }

    fn create_token_unflushed(
        &self,
        site_id: &str,
        province: &str,
        ttl: Duration,
        role: CertRole,
    ) -> Result<Token, RegistryError> {
        validate_name("site ID", site_id)?;
        validate_name("province", province)?;
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let expires_at = unix_now() + ttl.as_secs() as i64;
        let rec = TokenRecord {
            site_id: site_id.into(),
            province: province.into(),
            expires_at,
            role,
        };
        let v = serde_json::to_vec(&rec).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        self.tokens.insert(hash(&secret), v)?;
        Ok(Token {
            token: format!("T1.{secret}.{}", self.ca_fingerprint),
            site_id: site_id.into(),
            province: province.into(),
            expires_at,
            role,
        })
    }

    /// Redeems a token (once) and signs the site's CSR.
    pub fn redeem(
        &self,
        token: &str,
        csr_pem: &str,
        ca: &Ca,
        cert_validity: Duration,
    ) -> Result<pki::Issued, RegistryError> {
        let secret = parse_token(token)?.0;
        // remove() makes the token single-use even when two agents race with it.
        let v = self
            .tokens
            .remove(hash(&secret))?
            .ok_or(RegistryError::BadToken)?;
        self.tokens.flush()?;
        let rec: TokenRecord =
            serde_json::from_slice(&v).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        if rec.expires_at < unix_now() {
            return Err(RegistryError::TokenExpired);
        }
        self.issue_as(
            &rec.site_id,
            &rec.province,
            csr_pem,
            ca,
            cert_validity,
            rec.role,
        )
    }

    /// Signs a CSR for a site without a token (the controller's own simulated sites).
    pub fn issue(
        &self,
        site_id: &str,
        province: &str,
        csr_pem: &str,
        ca: &Ca,
        cert_validity: Duration,
    ) -> Result<pki::Issued, RegistryError> {
        self.issue_as(
            site_id,
            province,
            csr_pem,
            ca,
            cert_validity,
            CertRole::Site,
        )
    }

    /// [`Registry::issue`] with a role (the CA writes it into the certificate; recorded here).
    pub fn issue_as(
        &self,
        site_id: &str,
        province: &str,
        csr_pem: &str,
        ca: &Ca,
        cert_validity: Duration,
        role: CertRole,
    ) -> Result<pki::Issued, RegistryError> {
        let issued = ca.sign_site_as(csr_pem, site_id, province, cert_validity, role)?;
        self.put(SiteRecord {
            site_id: site_id.into(),
            province: province.into(),
            serial: Some(issued.identity.serial.clone()),
            not_after: issued.identity.not_after,
            enrolled_at: unix_now(),
            revoked_at: None,
            role,
        })?;
        Ok(issued)
    }

    /// Revokes a site: its certificate is refused from now on (re-enrollment needs a new token).
    pub fn revoke(&self, site_id: &str) -> Result<SiteRecord, RegistryError> {
        let mut rec = self
            .get(site_id)
            .ok_or_else(|| RegistryError::UnknownSite(site_id.into()))?;
        rec.revoked_at = Some(unix_now());
        self.put(rec.clone())?;
        Ok(rec)
    }

    pub fn get(&self, site_id: &str) -> Option<SiteRecord> {
        self.cache
            .read()
            .expect("registry lock poisoned")
            .get(site_id)
            .cloned()
    }

    pub fn list(&self) -> Vec<SiteRecord> {
        let mut v: Vec<_> = self
            .cache
            .read()
            .expect("registry lock poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.site_id.cmp(&b.site_id));
        v
    }

    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }
}

/// Splits a token into (secret, CA fingerprint).
pub fn parse_token(token: &str) -> Result<(String, String), RegistryError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("T1"), Some(secret), Some(fp), None)
            if secret.len() == 32
                && fp.len() == 64
                && secret.bytes().all(|b| b.is_ascii_hexdigit())
                && fp.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok((secret.to_string(), fp.to_ascii_lowercase()))
        }
        _ => Err(RegistryError::MalformedToken),
    }
}

impl CertPolicy for Registry {
    fn check(&self, id: &SiteIdentity) -> Result<(), Rejection> {
        let cache = self.cache.read().expect("registry lock poisoned");
        let rec = cache.get(&id.site_id).ok_or(Rejection::Unknown)?;
        if rec.revoked_at.is_some() {
            return Err(Rejection::Revoked);
        }
        match &rec.serial {
            Some(s) if *s == id.serial => Ok(()),
            Some(_) => Err(Rejection::Superseded),
            None => Err(Rejection::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_single_use_and_revocation_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let ca = Ca::generate("t").unwrap();
        let reg = Registry::open(&db, &ca).unwrap();
        let t = reg
            .create_token("s1", "GD", Duration::from_secs(60))
            .unwrap();
        assert_eq!(parse_token(&t.token).unwrap().1, ca.fingerprint());
        let (_k, csr) = pki::site_key_and_csr("s1").unwrap();
        let issued = reg
            .redeem(&t.token, &csr, &ca, Duration::from_secs(3600))
            .unwrap();
        assert!(reg.check(&issued.identity).is_ok());
        assert!(matches!(
            reg.redeem(&t.token, &csr, &ca, Duration::from_secs(3600)),
            Err(RegistryError::BadToken)
        ));
        // A second enrollment supersedes the first certificate.
        let t2 = reg
            .create_token("s1", "GD", Duration::from_secs(60))
            .unwrap();
        let issued2 = reg
            .redeem(&t2.token, &csr, &ca, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(reg.check(&issued.identity), Err(Rejection::Superseded));
        assert!(reg.check(&issued2.identity).is_ok());
        reg.revoke("s1").unwrap();
        assert_eq!(reg.check(&issued2.identity), Err(Rejection::Revoked));
        drop(reg);
        let reg = Registry::open(&db, &ca).unwrap();
        assert_eq!(reg.check(&issued2.identity), Err(Rejection::Revoked));
    }

    #[test]
    fn a_relay_token_gives_a_relay_certificate_and_the_registry_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let ca = Ca::generate("t").unwrap();
        let reg = Registry::open(&db, &ca).unwrap();
        let mut changes = reg.watch_changes();
        changes.mark_unchanged();
        let t = reg
            .create_token_as("gd-relay", "GD", Duration::from_secs(60), CertRole::Relay)
            .unwrap();
        assert_eq!(t.role, CertRole::Relay);
        let (_k, csr) = pki::site_key_and_csr("gd-relay").unwrap();
        let issued = reg
            .redeem(&t.token, &csr, &ca, Duration::from_secs(3600))
            .unwrap();
        let der = pki::certs_from_pem(&issued.cert_pem).unwrap();
        assert_eq!(pki::role_from_der(&der[0]).unwrap(), CertRole::Relay);
        assert_eq!(reg.get("gd-relay").unwrap().role, CertRole::Relay);
        assert!(changes.has_changed().unwrap(), "enrollment is a change");
        changes.mark_unchanged();
        reg.revoke("gd-relay").unwrap();
        assert!(changes.has_changed().unwrap(), "revocation is a change");
        // An ordinary token gives an ordinary certificate.
        let t = reg
            .create_token("gd-001", "GD", Duration::from_secs(60))
            .unwrap();
        let issued = reg
            .redeem(&t.token, &csr, &ca, Duration::from_secs(3600))
            .unwrap();
        let der = pki::certs_from_pem(&issued.cert_pem).unwrap();
        assert_eq!(pki::role_from_der(&der[0]).unwrap(), CertRole::Site);
        assert_eq!(reg.get("gd-001").unwrap().role, CertRole::Site);
    }

    #[test]
    fn expired_and_malformed_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let ca = Ca::generate("t").unwrap();
        let reg = Registry::open(&db, &ca).unwrap();
        let t = reg.create_token("s2", "GD", Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let (_k, csr) = pki::site_key_and_csr("s2").unwrap();
        assert!(matches!(
            reg.redeem(&t.token, &csr, &ca, Duration::from_secs(3600)),
            Err(RegistryError::TokenExpired)
        ));
        assert!(matches!(
            reg.redeem("garbage", &csr, &ca, Duration::from_secs(3600)),
            Err(RegistryError::MalformedToken)
        ));
    }
}
