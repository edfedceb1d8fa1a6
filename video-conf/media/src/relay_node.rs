//! `tiandi-video relay`: a standalone conference relay (at a province, say), optionally below
//! another (cascade), with its metrics on a TCP listener of its own. Its TLS handshake trusts
//! the CA; below another relay it also asks that one about every participant's certificate at
//! admission and every 3 s (revocation), failing closed after `--confirmed-within-s` without
//! an answer. A top relay (no `--upstream`) cannot learn of revocations: cascade it to the
//! controller's relay.

use anyhow::Context;
use tiandi_video::relay::{Relay, RelayOptions, Upstream};

use crate::cli::RelayArgs;

/// Serves the relay until SIGTERM or Ctrl-C, then closes every session.
pub async fn run(a: RelayArgs) -> anyhow::Result<()> {
    let pems = a.creds.read()?;
    let (ca_pem, cert_pem, key_pem) = (&pems.ca, &pems.cert, &pems.key);
    let tls = tiandi_video::relay_tls(ca_pem, cert_pem, key_pem).context("relay TLS")?;
    let upstream = match (a.upstream, a.upstream_name.clone()) {
        (Some(addr), Some(up_name)) => {
            let client = tiandi_link::client_config(
                tiandi_video::client_tls(ca_pem, cert_pem, key_pem).context("upstream TLS")?,
                tiandi_video::transport(a.profile),
            )?;
            Some(Upstream {
                endpoint: tiandi_link::client_endpoint(addr)?,
                addr,
                name: up_name,
                client,
            })
        }
        _ => None,
    };
    let secret: [u8; 32] = rand::random();
    let endpoint =
        tiandi_link::server_endpoint(a.listen, tls, tiandi_video::transport(a.profile), &secret)
            .with_context(|| format!("listening on {}", a.listen))?;
    if upstream.is_none() {
        tracing::warn!(
            "No --upstream: this relay trusts every certificate of the CA and cannot learn of revocations (cascade it to the controller's relay to have them checked)."
        );
    }
    let relay = Relay::new(RelayOptions {
        name: a.name.clone(),
        chair: a.chair.clone(),
        upstream,
        open_rooms: true,
        fec_rtt_ms: a.fec_rtt_ms,
        confirmed_within: std::time::Duration::from_secs(a.confirmed_within_s),
    });
    let cancel = tiandi_link::shutdown_token();
    tracing::info!(listen = %a.listen, relay = %a.name, "Relay running.");
    println!("relay {} listening on {}", a.name, endpoint.local_addr()?);
    if let Some(addr) = a.metrics {
        // Plain HTTP only on loopback: a Prometheus beside the relay scrapes it and sends the
        // series on over TLS (remote_write; dashboards/prometheus/province.yml).
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--metrics {addr}: the relay serves metrics over plain HTTP, so only on a loopback \
             address (127.0.0.1:PORT); scrape it with a Prometheus on the same host, which \
             forwards with remote_write over TLS (dashboards/prometheus/province.yml)"
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "Metrics at /metrics.");
        let r = relay.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let r = r.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        r.exposition(),
                    )
                }
            }),
        );
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await;
        });
    }
    relay.serve(endpoint.clone(), cancel).await;
    endpoint.close(
        tiandi_video::conference_wire::codes::SHUTDOWN.into(),
        b"relay stopping",
    );
    endpoint.wait_idle().await;
    Ok(())
}
