//! What the link tests share: a CA, the controller's certificate and a site's, and a policy
//! that accepts any site.

use std::sync::Arc;
use std::time::Duration;

use tiandi_link::SiteIdentity;
use tiandi_link::pki::{Ca, site_key_and_csr};
use tiandi_link::tls::{CertPolicy, Rejection};

#[derive(Debug)]
pub struct AnySite;
impl CertPolicy for AnySite {
    fn check(&self, _id: &SiteIdentity) -> Result<(), Rejection> {
        Ok(())
    }
}

/// The controller's TLS and site `test-site`'s (province BJ), from a new CA named `ca_name`.
pub fn tls(ca_name: &str) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let ca = Ca::generate(ca_name).expect("CA");
    let (chain, key) = ca.issue_controller().expect("controller certificate");
    let server =
        tiandi_link::tls::server_tls(chain, key, ca.cert_der(), Arc::new(AnySite)).expect("tls");
    let (site_key, csr) = site_key_and_csr("test-site").expect("site key");
    let issued = ca
        .sign_site(&csr, "test-site", "BJ", Duration::from_secs(3600))
        .expect("site certificate");
    let client = tiandi_link::tls::site_client_tls(ca.cert_pem(), &issued.cert_pem, &site_key)
        .expect("client tls");
    (server, client)
}
