//! Serves enrollment connections (ALPN `tiandi-enroll/1`, no client certificate).

use std::sync::Arc;
use std::time::Duration;

use tiandi_link::enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_MESSAGE};
use tracing::{info, warn};

use crate::Core;

pub async fn serve(core: Arc<Core>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let work = async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let req = recv.read_to_end(MAX_ENROLL_MESSAGE).await;
        let answer = match req {
            Err(e) => EnrollResponse::Refused {
                reason: format!("bad enrollment request: {e}"),
            },
            Ok(bytes) => match serde_json::from_slice::<EnrollRequest>(&bytes) {
                Err(e) => EnrollResponse::Refused {
                    reason: format!("bad enrollment request: {e}"),
                },
                Ok(req) => {
                    let validity = Duration::from_secs(u64::from(core.config.cert_days) * 86400);
                    match core
                        .registry
                        .redeem(&req.token, &req.csr_pem, &core.ca, validity)
                    {
                        Ok(issued) => {
                            core.metrics
                                .enrollments
                                .with_label_values(&["issued"])
                                .inc();
                            core.sites.insert(
                                &issued.identity.site_id,
                                &issued.identity.province,
                                None,
                                crate::now_ms(),
                            );
                            info!(%remote, site = %issued.identity.site_id, province = %issued.identity.province, serial = %issued.identity.serial, "Site enrolled.");
                            EnrollResponse::Issued {
                                site_id: issued.identity.site_id,
                                province: issued.identity.province,
                                cert_pem: issued.cert_pem,
                                ca_pem: core.ca.cert_pem().to_string(),
                            }
                        }
                        Err(e) => {
                            core.metrics
                                .enrollments
                                .with_label_values(&["refused"])
                                .inc();
                            warn!(%remote, error = %e, "Enrollment refused.");
                            EnrollResponse::Refused {
                                reason: e.to_string(),
                            }
                        }
                    }
                }
            },
        };
        let bytes = serde_json::to_vec(&answer).ok()?;
        send.write_all(&bytes).await.ok()?;
        send.finish().ok()?;
        // Let the answer reach the agent, which closes the connection.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        Some(())
    };
    if tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .is_err()
    {
        conn.close(
            tiandi_proto::codes::PROTOCOL.into(),
            b"enrollment timed out",
        );
    }
}
