//! QUIC transport profiles. Flow-control windows follow the bandwidth-delay product (4x, so a
//! loss hole on a long link does not stall the sender: see `quic-on-geo` notes), the initial RTT
//! follows the link, and the idle timeout is long enough for a GEO hop but short enough that a
//! dead link is noticed within a minute.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkProfile {
    /// Geostationary VSAT: ~600 ms RTT, a few to 20 Mbit/s.
    Geo,
    /// Low-earth-orbit: ~60 ms RTT, ~50 Mbit/s.
    Leo,
    /// Terrestrial WAN or LAN: ~30 ms RTT, ~100 Mbit/s.
    Terrestrial,
}

impl FromStr for LinkProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "geo" => Ok(LinkProfile::Geo),
            "leo" => Ok(LinkProfile::Leo),
            "terrestrial" => Ok(LinkProfile::Terrestrial),
            other => Err(format!(
                "unknown link profile {other:?} (expected geo, leo or terrestrial)"
            )),
        }
    }
}

impl LinkProfile {
    /// Round-trip time and rate the profile assumes.
    pub fn nominal(self) -> (Duration, u64) {
        match self {
            LinkProfile::Geo => (Duration::from_millis(600), 20_000_000),
            LinkProfile::Leo => (Duration::from_millis(60), 50_000_000),
            LinkProfile::Terrestrial => (Duration::from_millis(30), 100_000_000),
        }
    }

    /// How long one connection attempt may take: a handshake is ~1.5 RTT, more with loss.
    pub fn connect_timeout(self) -> Duration {
        Duration::from_secs(3) + self.nominal().0 * 4
    }

    pub fn transport(self) -> Arc<TransportConfig> {
        Arc::new(self.transport_config())
    }

    /// [`LinkProfile::transport`], unshared, for a caller that adds to it (a congestion
    /// controller for a known link rate, say).
    pub fn transport_config(self) -> TransportConfig {
        let (rtt, bits_per_s) = self.nominal();
        let bdp = (bits_per_s / 8) as f64 * rtt.as_secs_f64();
        let window = (4.0 * bdp).max(1_000_000.0) as u64;
        let mut t = TransportConfig::default();
        t.initial_rtt(rtt)
            .stream_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX))
            .receive_window(VarInt::from_u64(window * 2).unwrap_or(VarInt::MAX))
            .send_window(window * 2)
            .max_concurrent_bidi_streams(VarInt::from_u32(16))
            // Transfers send each chunk on a stream of its own: enough for a window of chunks.
            .max_concurrent_uni_streams(VarInt::from_u32(512))
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(60_000))));
        t
    }
}
