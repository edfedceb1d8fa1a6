//! The controller's HTTP listeners (the API, and the ops listener with `/metrics`): hyper
//! connections driven here rather than by `axum::serve`, for what a listener facing a hostile
//! network needs:
//! - TLS whenever the address is not loopback (plain HTTP, bearer tokens included, only on the
//!   host itself);
//! - a bound on connections at once ([`MAX_CONNECTIONS`]; beyond it a new one is closed at
//!   once), on the TLS handshake and on reading a request's head ([`HEAD_TIMEOUT`]), so slow
//!   clients cannot hold the listener;
//! - request heads bounded by [`MAX_HEAD_BYTES`] (bodies are bounded by the router).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest wait for a TLS handshake, and for a request's head once a connection is idle.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer for a request head: a head still incomplete once the buffer holds this
/// much is refused (431). The check follows a read, so a head up to twice this may be read
/// whole; never more (the attacks test sends 300 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Whether plain HTTP may be served on `addr`: loopback only.
pub fn plain_http_allowed(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serves `router` on `listener` until `cancel`, over TLS if `tls` is given.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    warn!(%error, "Accepting an HTTP connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "HTTP connection refused: {MAX_CONNECTIONS} already open.");
            continue;
        };
        let (router, tls, cancel) = (router.clone(), tls.clone(), cancel.clone());
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, peer, router, cancel).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(s, peer, router, cancel).await,
                        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed."),
                        Err(_) => debug!(%peer, "TLS handshake timed out."),
                    }
                }
            }
        });
    }
    // Connections see the same cancellation and finish their current request.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

async fn connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    router: Router,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Handlers and the audit log learn the client's address from `ConnectInfo`.
    let router = router.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                debug!(%error, "HTTP connection ended with an error.");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// The TLS configuration of a listener off loopback: the operator's certificate and key
/// (`api_tls_cert`, `api_tls_key`), else one from the site CA ([`issue_api_cert`]).
pub fn server_tls(
    config: &crate::Config,
    ca: &tiandi_link::Ca,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let (chain, key) = match (&config.api_tls_cert, &config.api_tls_key) {
        (Some(cert), Some(key)) => {
            let c = std::fs::read_to_string(cert)
                .with_context(|| format!("reading api_tls_cert {}", cert.display()))?;
            let k = tiandi_link::secrets::read_private(key)?
                .with_context(|| format!("api_tls_key {}: no such file", key.display()))?;
            (
                tiandi_link::pki::certs_from_pem(&c)
                    .with_context(|| format!("api_tls_cert {}", cert.display()))?,
                tiandi_link::pki::key_from_pem(&k)
                    .with_context(|| format!("api_tls_key {}", key.display()))?,
            )
        }
        (None, None) => issue_api_cert(config, ca)?,
        _ => anyhow::bail!("api_tls_cert and api_tls_key go together: set both or neither"),
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(tiandi_link::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the API's TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// A server certificate from the controller's CA for its HTTP listeners, valid two years,
/// made at each start: DNS names `tiandi-controller` and `localhost`, addresses 127.0.0.1 and
/// ::1 (the CLI connects there), the listeners' own addresses when specific, and every name
/// in `api_names`. Clients trust `data_dir/ca.pem`.
pub fn issue_api_cert(
    config: &crate::Config,
    ca: &tiandi_link::Ca,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use anyhow::Context;
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let key_path = config.data_dir.join("ca.key");
    let ca_key = tiandi_link::secrets::read_private(&key_path)?
        .with_context(|| format!("{}: no such file", key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).with_context(|| format!("{}", key_path.display()))?;
    let issuer = Issuer::from_ca_cert_der(ca.cert_der(), &ca_key)?;
    let mut params = CertificateParams::new(vec![
        tiandi_link::pki::CONTROLLER_NAME.to_string(),
        "localhost".to_string(),
    ])?;
    let mut ips: Vec<std::net::IpAddr> = vec![
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    for a in [config.api_listen, config.ops_listen] {
        if !a.ip().is_unspecified() && !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    params
        .subject_alt_names
        .extend(ips.into_iter().map(SanType::IpAddress));
    for n in &config.api_names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("api_names: {n:?} is not a DNS name"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params
        .distinguished_name
        .push(DnType::CommonName, tiandi_link::pki::CONTROLLER_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(730);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((
        vec![cert.der().clone(), ca.cert_der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}
