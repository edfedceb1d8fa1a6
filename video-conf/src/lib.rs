//! Tiandi video conferencing: tracks cut into groups at keyframes, one QUIC stream per group
//! (modelled on Media over QUIC), relays that keep the current group for late joiners, fan out
//! and cascade, subscribers that lose whole old groups rather than fall behind, renditions
//! chosen per link, and floor control.
//!
//! What this crate owns:
//! * the wire format ([`conference_wire`]: control frames, group and object headers) and its
//!   I/O ([`io`]);
//! * tracks and groups, and how they move ([`track`], [`forward`], [`policy`]);
//! * the relay ([`relay`]): rooms, the floor, roll call, the roster, the cascade to an
//!   upstream relay, and the recording of a room's group data as MPEG-TS ([`ts`], [`play`]);
//! * forward error correction of group streams ([`fec`]);
//! * the participant's side ([`client`]).
//!
//! Start reading at [`conference_wire`] (the protocol), then [`track`] and [`forward`] (how
//! groups move), [`relay`] and [`client`].
//!
//! What it must never do: link FFmpeg (no `ffmpeg-next`, no libav*), or decode, encode or
//! otherwise look inside media. Objects are carried as the publisher made them; encoding,
//! decoding, playing to a decoder and remuxing belong to the media crate (`video-conf/media`,
//! `tiandi-media`), which also holds the `tiandi-video` binary. This crate must never depend on
//! it.

pub mod client;
pub mod conference_wire;
pub mod fec;
pub mod forward;
pub mod io;
pub mod play;
pub mod policy;
pub mod relay;
pub mod track;
pub mod ts;

pub use tiandi_link::clock::now_us;

pub use tiandi_link::clock::now_ms;

/// The QUIC transport for conference connections: the profile's windows and RTT, with BBR
/// instead of Cubic. Cubic reads the random loss of a satellite link as congestion and
/// collapses its window (see `geo-link`: 0.7 Mbit/s of 20 at 1 % loss), which a live stream
/// cannot wait out; BBR paces at the delivery rate it measures.
/// [`transport`] over one of a dual-homed site's paths: a keep-alive every `probe` (the
/// path's health; `tiandi_link::paths`).
pub fn path_transport(
    profile: tiandi_link::LinkProfile,
    probe: std::time::Duration,
) -> std::sync::Arc<quinn::TransportConfig> {
    let mut t = transport_config(profile);
    t.keep_alive_interval(Some(probe));
    std::sync::Arc::new(t)
}

pub fn transport(profile: tiandi_link::LinkProfile) -> std::sync::Arc<quinn::TransportConfig> {
    std::sync::Arc::new(transport_config(profile))
}

fn transport_config(profile: tiandi_link::LinkProfile) -> quinn::TransportConfig {
    let mut t = profile.transport_config();
    t.congestion_controller_factory(std::sync::Arc::new(quinn::congestion::BbrConfig::default()));
    // A conference notices a dead relay or participant within seconds (a site then joins
    // again), where the health spine's links wait a minute.
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("10 s fits"),
    ));
    t
}

/// Relay TLS: the relay's own site certificate; any site of the CA may join (which rooms it
/// may speak in is the relay's business).
#[derive(Debug)]
pub struct AnySite;

impl tiandi_link::tls::CertPolicy for AnySite {
    fn check(&self, _id: &tiandi_link::SiteIdentity) -> Result<(), tiandi_link::tls::Rejection> {
        Ok(())
    }
}

/// The relay's server TLS (site certificate, mutual TLS, the conference ALPN).
pub fn relay_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls_config::ServerConfig, tiandi_link::LinkError> {
    relay_tls_with(ca_pem, cert_pem, key_pem, std::sync::Arc::new(AnySite))
}

/// [`relay_tls`] with a policy for the sites' certificates (the controller's registry:
/// revoked and superseded certificates are refused in the handshake).
pub fn relay_tls_with(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    policy: std::sync::Arc<dyn tiandi_link::tls::CertPolicy>,
) -> Result<rustls_config::ServerConfig, tiandi_link::LinkError> {
    let mut cfg = tiandi_link::tls::relay_server_tls(ca_pem, cert_pem, key_pem, policy)?;
    cfg.alpn_protocols = vec![relay::ALPN.to_vec()];
    Ok(cfg)
}

/// A site's client TLS toward a relay (the conference ALPN).
pub fn client_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls_config::ClientConfig, tiandi_link::LinkError> {
    let mut cfg = tiandi_link::tls::site_client_tls(ca_pem, cert_pem, key_pem)?;
    cfg.alpn_protocols = vec![relay::ALPN.to_vec()];
    Ok(cfg)
}

mod rustls_config {
    pub use rustls::{ClientConfig, ServerConfig};
}
