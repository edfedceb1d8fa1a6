//! Enrollment: a site trades a one-time token for a certificate. The agent generates its key
//! locally and sends only a CSR; it trusts the controller through the CA fingerprint inside the
//! token. One bidirectional stream, one JSON request, one JSON answer, on ALPN `tiandi-enroll/1`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{LinkError, LinkProfile, pki, tls};

/// Largest enrollment message either side reads.
pub const MAX_ENROLL_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    pub csr_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum EnrollResponse {
    Issued {
        site_id: String,
        province: String,
        cert_pem: String,
        ca_pem: String,
    },
    Refused {
        reason: String,
    },
}

/// What a successful enrollment leaves the agent with.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub site_id: String,
    pub province: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// The CA fingerprint a token pins (the third dot-separated part of `T1.<secret>.<fp>`). The
/// grammar is the controller's (`registry::parse_token`): a 32-hex-digit secret and a
/// 64-hex-digit SHA-256, nothing else, so a token the agent accepts is one the controller can
/// redeem, and nothing but hex ever reaches the TLS pin.
pub fn token_fingerprint(token: &str) -> Result<String, LinkError> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = token.trim().splitn(4, '.').collect();
    match parts.as_slice() {
        ["T1", secret, fp] if hex(secret, 32) && hex(fp, 64) => Ok(fp.to_ascii_lowercase()),
        _ => Err(LinkError::BadName(
            "malformed enrollment token (expected T1.<secret: 32 hex digits>.<CA fingerprint: \
             64 hex digits>)"
                .into(),
        )),
    }
}

/// Enrolls against the controller at `addr`. The private key is generated here and returned,
/// never sent.
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    timeout: Duration,
) -> Result<Enrolled, LinkError> {
    let fp = token_fingerprint(token)?;
    let (key_pem, csr_pem) = pki::site_key_and_csr("enrolling-site")?;
    let cfg = crate::client_config(
        tls::enroll_client_tls(&fp)?,
        LinkProfile::Terrestrial.transport(),
    )?;
    let work = async {
        let conn = endpoint
            .connect_with(cfg, addr, pki::CONTROLLER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = serde_json::to_vec(&EnrollRequest {
            token: token.trim().to_string(),
            csr_pem,
        })
        .map_err(|e| LinkError::Stream(e.to_string()))?;
        send.write_all(&req)
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        send.finish()
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        let answer = recv
            .read_to_end(MAX_ENROLL_MESSAGE)
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        conn.close(0u32.into(), b"enrolled");
        let resp: EnrollResponse = serde_json::from_slice(&answer)
            .map_err(|e| LinkError::Stream(format!("bad enrollment answer: {e}")))?;
        match resp {
            EnrollResponse::Issued {
                site_id,
                province,
                cert_pem,
                ca_pem,
            } => {
                // The answer must be signed by the pinned CA.
                let ca = pki::certs_from_pem(&ca_pem)?;
                if ca.first().map(|c| pki::fingerprint(c)) != Some(fp.clone()) {
                    return Err(LinkError::Pki(
                        "controller returned a CA that does not match the token".into(),
                    ));
                }
                Ok(Enrolled {
                    site_id,
                    province,
                    key_pem,
                    cert_pem,
                    ca_pem,
                })
            }
            EnrollResponse::Refused { reason } => Err(LinkError::Refused {
                code: tiandi_proto::codes::IDENTITY,
                reason,
            }),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LinkError::Stream(format!("enrollment timed out after {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent reads a token with the controller's grammar: only hex secrets and hex
    /// fingerprints pass, and the fingerprint comes out lowercase.
    #[test]
    fn tokens_follow_the_controllers_grammar() {
        let (secret, fp) = ("0f".repeat(16), "AB".repeat(32));
        assert_eq!(
            token_fingerprint(&format!(" T1.{secret}.{fp}\n")).unwrap(),
            "ab".repeat(32)
        );
        for bad in [
            format!("T1.{secret}.{}", "zz".repeat(32)),
            format!("T1.{}.{fp}", "x".repeat(32)),
            format!("T1.{secret}.{fp}.extra"),
            format!("T2.{secret}.{fp}"),
            format!("T1.{secret}{fp}"),
            format!("T1..{fp}"),
            format!("T1.{secret}.{}", "é".repeat(32)),
            String::new(),
        ] {
            assert!(token_fingerprint(&bad).is_err(), "{bad:?}");
        }
    }
}
