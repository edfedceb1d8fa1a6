//! Tiandi's QUIC links, shared by the agent and the controller: the site CA and site identities
//! ([`pki`]), mutual-TLS configurations ([`tls`]), transport profiles for GEO/LEO/terrestrial
//! links ([`transport`]), and length-prefixed protocol frames over QUIC streams ([`framed`]).

pub mod clock;
pub mod config;
pub mod confirm;
pub mod congestion;
pub mod enroll;
pub mod framed;
pub mod names;
pub mod paths;
pub mod pki;
pub mod runtime;
pub mod secrets;
pub mod tls;
pub mod transport;
pub mod window;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use framed::{FrameReader, FrameWriter};
pub use pki::{Ca, SiteIdentity};
pub use transport::LinkProfile;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Pki(String),
    #[error("{0}")]
    BadName(String),
    #[error("{0}")]
    Secret(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {}", describe_close(.0))]
    Connection(#[from] quinn::ConnectionError),
    #[error("protocol: {0}")]
    Proto(#[from] tiandi_proto::ProtoError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("refused by peer (code {code}): {reason}")]
    Refused { code: u32, reason: String },
    /// The peer did not complete a handshake in time: down, unreachable, or (right after it
    /// said it was busy) too loaded to finish one.
    #[error("no handshake with {addr} within {after:?}")]
    HandshakeTimeout { addr: String, after: Duration },
    /// The handshake finished but the peer's first answer on the session (the controller's
    /// Welcome) did not come in time: loaded, or its packets lost and repaired late.
    #[error("no {what} within {after:?}")]
    AnswerTimeout { what: &'static str, after: Duration },
}

/// The longest a busy peer's `retry-after` is taken at its word.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);

impl LinkError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LinkError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    /// Whether trying again later can help (a refusal for identity or version cannot).
    /// The controller stands down or is behind this site's fencing epoch: another address
    /// of the controller is to be tried at once.
    pub fn is_superseded(&self) -> bool {
        match self {
            LinkError::Refused { code, .. } => *code == tiandi_proto::codes::SUPERSEDED,
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                c.error_code == tiandi_proto::codes::SUPERSEDED.into()
            }
            _ => false,
        }
    }

    pub fn is_permanent(&self) -> bool {
        match self {
            LinkError::Refused { code, .. } => matches!(
                *code,
                tiandi_proto::codes::IDENTITY
                    | tiandi_proto::codes::REVOKED
                    | tiandi_proto::codes::VERSION
            ),
            LinkError::Connection(quinn::ConnectionError::TransportError(_)) => false,
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
                // TLS alerts: certificate revoked (44), access denied (49), bad certificate (42),
                // certificate expired (45), unknown CA (48).
                let code = u64::from(c.error_code);
                matches!(code, 0x12a | 0x12c | 0x12d | 0x130 | 0x131)
            }
            LinkError::Pki(_) | LinkError::Tls(_) | LinkError::BadName(_) => true,
            _ => false,
        }
    }
}

impl LinkError {
    /// Whether the peer is up but turned this connection away for now: its admission queue
    /// was full (QUIC `CONNECTION_REFUSED` before the handshake), or it said it is overloaded.
    /// Coming back within seconds can help; a long backoff only leaves it idle later.
    /// No handshake in time (see [`LinkError::HandshakeTimeout`]), no first answer after it
    /// ([`LinkError::AnswerTimeout`]), the peer went silent during one (QUIC's idle
    /// timeout), or closed it before the handshake was confirmed without a reason QUIC can
    /// carry there (`APPLICATION_ERROR`: what an overloaded server's own handshake deadline
    /// sends when the client's last flight was lost).
    pub fn is_handshake_timeout(&self) -> bool {
        match self {
            LinkError::HandshakeTimeout { .. }
            | LinkError::AnswerTimeout { .. }
            | LinkError::Connection(quinn::ConnectionError::TimedOut) => true,
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
                c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
            }
            _ => false,
        }
    }

    pub fn is_busy(&self) -> bool {
        let overload = u64::from(tiandi_proto::codes::OVERLOAD);
        match self {
            LinkError::Refused { code, .. } => *code == tiandi_proto::codes::OVERLOAD,
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
                c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
            }
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                u64::from(c.error_code) == overload
            }
            _ => false,
        }
    }

    /// When a busy peer said to come back (`retry-after-ms=N` in its refusal), within
    /// [`RETRY_AFTER_MAX`]. Unauthenticated, as every refusal before a handshake is: a hint.
    pub fn retry_after(&self) -> Option<Duration> {
        let LinkError::Connection(quinn::ConnectionError::ConnectionClosed(c)) = self else {
            return None;
        };
        if c.error_code != quinn::TransportErrorCode::CONNECTION_REFUSED {
            return None;
        }
        let ms: u64 = std::str::from_utf8(&c.reason)
            .ok()?
            .strip_prefix("retry-after-ms=")?
            .parse()
            .ok()?;
        Some(Duration::from_millis(ms).min(RETRY_AFTER_MAX))
    }

    /// When to come back to a busy peer that said when ([`LinkError::retry_after`]): then,
    /// give or take a tenth (those told the same slot do not all arrive at once).
    pub fn retry_after_jittered(&self) -> Option<Duration> {
        self.retry_after()
            .map(|after| after.mul_f64(1.0 + 0.1 * rand::random::<f64>()))
    }

    /// Whether the TLS handshake failed (a crypto error, from either side: an unknown CA, a
    /// certificate that does not verify): not a lossy link, so retrying fast cannot help and
    /// retries back off exponentially.
    pub fn is_tls_failure(&self) -> bool {
        let crypto = |code: u64| (0x100..=0x1ff).contains(&code);
        match self {
            LinkError::Connection(quinn::ConnectionError::TransportError(t)) => {
                crypto(u64::from(t.code))
            }
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(c)) => {
                crypto(u64::from(c.error_code))
            }
            LinkError::Tls(_) => true,
            _ => false,
        }
    }
}

/// Human-readable reason for a closed connection, with TLS alerts named.
fn describe_close(e: &quinn::ConnectionError) -> String {
    if let quinn::ConnectionError::ConnectionClosed(c) = e {
        let code = u64::from(c.error_code);
        let alert = match code {
            0x12a => Some("bad certificate"),
            0x12c => Some("certificate revoked"),
            0x12d => Some("certificate expired"),
            0x130 => Some("unknown certificate authority"),
            0x131 => Some("access denied (certificate not accepted by the controller)"),
            0x174 => Some("certificate required"),
            _ => None,
        };
        if let Some(a) = alert {
            return format!("refused during handshake: {a} ({e})");
        }
    }
    e.to_string()
}

/// Reads the verified site identity of a connection's peer (server side).
pub fn peer_identity(conn: &quinn::Connection) -> Option<SiteIdentity> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    pki::identity_from_der(certs.first()?).ok()
}

/// The QUIC server configuration of the controller: TLS and transport.
pub fn server_config(
    tls: rustls::ServerConfig,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    // Address validation costs a round trip on a 600 ms link; admission control happens in
    // the controller instead.
    cfg.migration(true);
    Ok(cfg)
}

/// A server endpoint with the given TLS and transport.
///
/// `reset_secret` keys QUIC stateless resets: keep it across restarts, so that agents still
/// talking to the previous process learn at their next packet that their connection is gone
/// (instead of waiting for the idle timeout) and reconnect at once.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    transport: Arc<quinn::TransportConfig>,
    reset_secret: &[u8],
) -> Result<quinn::Endpoint, LinkError> {
    let cfg = server_config(tls, transport)?;
    let socket = std::net::UdpSocket::bind(addr).map_err(LinkError::Endpoint)?;
    tune_socket(&socket);
    server_endpoint_on(socket, cfg, reset_secret)
}

/// A server endpoint on a socket bound elsewhere (in another network namespace, say).
pub fn server_endpoint_on(
    socket: std::net::UdpSocket,
    cfg: quinn::ServerConfig,
    reset_secret: &[u8],
) -> Result<quinn::Endpoint, LinkError> {
    let mut ep = endpoint_config();
    ep.reset_key(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_secret,
    )))
    // After a restart every site's next packet draws a reset: let thousands through.
    .min_reset_interval(std::time::Duration::from_micros(200));
    quinn::Endpoint::new(ep, Some(cfg), socket, Arc::new(runtime::Runtime))
        .map_err(LinkError::Endpoint)
}

/// Connection IDs of 4 bytes instead of quinn's 8: every packet on a satellite link carries
/// one, and 2^32 is plenty for the connections one endpoint holds.
fn endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(4)));
    cfg
}

/// Socket buffers for bursts: one endpoint serves many connections (a relay sending a
/// keyframe to hundreds of subscribers, a controller answering thousands of sites after a
/// restart), and the kernel's default 208 KiB overflows, which QUIC then repairs as loss.
/// Best effort: the kernel caps the sizes at `net.core.{r,w}mem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn tune_socket(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(error) = s
        .set_recv_buffer_size(SOCKET_BUFFER)
        .and_then(|()| s.set_send_buffer_size(SOCKET_BUFFER))
    {
        tracing::debug!(%error, "Could not enlarge the UDP socket buffers.");
    }
}

/// A client configuration from TLS and transport.
pub fn client_config(
    tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, LinkError> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(LinkError::Endpoint)?;
    tune_socket(&socket);
    client_endpoint_on(socket)
}

/// A client endpoint on a socket bound elsewhere (in another network namespace, say).
pub fn client_endpoint_on(socket: std::net::UdpSocket) -> Result<quinn::Endpoint, LinkError> {
    quinn::Endpoint::new(endpoint_config(), None, socket, Arc::new(runtime::Runtime))
        .map_err(LinkError::Endpoint)
}

/// Initialises logging once for a binary: `RUST_LOG` wins over the configured filter; noisy
/// dependencies are kept at `warn`.
pub fn init_logging(filter: &str) {
    let env = std::env::var("RUST_LOG").ok();
    let spec = env
        .unwrap_or_else(|| format!("{filter},quinn=warn,quinn_proto=warn,rustls=warn,sled=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on SIGTERM or Ctrl-C (call inside the tokio runtime).
pub fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "No SIGTERM handler; only Ctrl-C stops this process.");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        c.cancel();
    });
    cancel
}
