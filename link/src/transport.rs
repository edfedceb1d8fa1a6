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
    /// A link of known round-trip time and rate (`profile = { custom = { rtt_ms = 700,
    /// rate_kbit = 4000 } }` in TOML, `custom:700:4000` on a command line).
    Custom { rtt_ms: u32, rate_kbit: u64 },
}

impl FromStr for LinkProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "geo" => Ok(LinkProfile::Geo),
            "leo" => Ok(LinkProfile::Leo),
            "terrestrial" => Ok(LinkProfile::Terrestrial),
            other => {
                let bad = || {
                    format!(
                        "unknown link profile {other:?} (expected geo, leo, terrestrial or custom:RTT_MS:RATE_KBIT)"
                    )
                };
                let rest = other.strip_prefix("custom:").ok_or_else(bad)?;
                let (rtt, rate) = rest.split_once(':').ok_or_else(bad)?;
                let p = LinkProfile::Custom {
                    rtt_ms: rtt.parse().map_err(|_| bad())?,
                    rate_kbit: rate.parse().map_err(|_| bad())?,
                };
                p.validate()?;
                Ok(p)
            }
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
            LinkProfile::Custom { rtt_ms, rate_kbit } => (
                Duration::from_millis(u64::from(rtt_ms.clamp(1, 10_000))),
                rate_kbit.clamp(8, 100_000_000) * 1000,
            ),
        }
    }

    /// A custom profile's figures must describe a link (1 ms–10 s, 8 kbit/s–100 Gbit/s).
    pub fn validate(self) -> Result<(), String> {
        if let LinkProfile::Custom { rtt_ms, rate_kbit } = self
            && (!(1..=10_000).contains(&rtt_ms) || !(8..=100_000_000).contains(&rate_kbit))
        {
            return Err(format!(
                "custom link profile: rtt_ms {rtt_ms} (1..10000) or rate_kbit {rate_kbit} (8..100000000) out of range"
            ));
        }
        Ok(())
    }

    /// How long one connection attempt may take: a handshake is ~1.5 RTT, more with loss.
    pub fn connect_timeout(self) -> Duration {
        Duration::from_secs(3) + self.nominal().0 * 4
    }

    pub fn transport(self) -> Arc<TransportConfig> {
        Arc::new(self.transport_config())
    }

    /// The connection's flow-control window (bytes): four bandwidth-delay products, at
    /// least 1 MB.
    fn window(self) -> u64 {
        let (rtt, bits_per_s) = self.nominal();
        let bdp = (bits_per_s / 8) as f64 * rtt.as_secs_f64();
        (4.0 * bdp).max(1_000_000.0) as u64
    }

    /// Unidirectional streams a peer may open for transfers on this profile's connections
    /// ([`uni_streams`] of the connection window).
    pub fn uni_streams(self) -> u32 {
        uni_streams(self.window() * 2)
    }

    /// [`LinkProfile::transport`], unshared, for a caller that adds to it (a congestion
    /// controller for a known link rate, say).
    pub fn transport_config(self) -> TransportConfig {
        let (rtt, _) = self.nominal();
        let window = self.window();
        let mut t = TransportConfig::default();
        t.initial_rtt(rtt)
            .stream_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX))
            .receive_window(VarInt::from_u64(window * 2).unwrap_or(VarInt::MAX))
            .send_window(window * 2)
            .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
            .max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams()))
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(60_000))));
        t
    }
}

/// How long a site waits before acknowledging a lone packet from the controller, for a site
/// that reports every `interval`: long enough that the acknowledgement of the controller's
/// report acknowledgement rides on the next report (a quarter of the interval to spare), so
/// a report costs two datagrams instead of three (`vendor/README.md`, quinn-proto
/// `max_ack_delay`), in whole milliseconds. `None` (QUIC's 25 ms) when that would exceed
/// [`MAX_ACK_DELAY`]: the acknowledgement would go alone anyway, only later. The controller's loss probes for what it sends the site
/// wait that much longer; packets that come two at a time (a transfer) or out of order are
/// acknowledged at once, and a lost report acknowledgement is found when the next report's
/// acknowledgement covers a later one.
pub fn report_ack_delay(interval: Duration) -> Option<Duration> {
    let delay = Duration::from_millis((interval + interval / 4).as_millis() as u64);
    (delay > Duration::from_millis(25) && delay <= MAX_ACK_DELAY).then_some(delay)
}

/// The longest delay a site announces: the controller's probe timeout toward the site grows by
/// it, and three probe timeouts (a GEO path's ~1–2 s besides) must stay within the 60 s idle
/// timeout, or a silent site would be held connected past it. QUIC itself allows 16.4 s.
pub const MAX_ACK_DELAY: Duration = Duration::from_secs(13);

/// Bidirectional streams a peer may have open at once: a report stream, a control stream per
/// transfer class and direction, relay reports, conference control; each may buffer one
/// frame (≤ 2.1 MB, a manifest).
pub const MAX_BIDI_STREAMS: u32 = 16;
/// The smallest chunk a transfer sends (`tiandi_transfer::manifest::MIN_CHUNK`; this crate
/// is below it).
const MIN_CHUNK: u64 = 32 * 1024;
/// Unidirectional streams a peer may open before its first transfer on the connection: a
/// controller's site connections start with these and get [`LinkProfile::uni_streams`] when
/// the site opens a transfer (quinn keeps an entry per stream the peer may open: 128 of them
/// were ~7 KB of each connected site's memory; issue 22).
pub const IDLE_UNI_STREAMS: u32 = 4;
/// Bounds of [`uni_streams`].
pub const MIN_UNI_STREAMS: u32 = 128;
pub const MAX_UNI_STREAMS: u32 = 512;

/// Unidirectional streams a peer may have open at once. Transfers send each chunk on a stream
/// of its own, and a sender keeps at most its connection's flow-control window
/// (`connection_window` bytes) in flight: that many smallest chunks, within
/// [`MIN_UNI_STREAMS`]..=[`MAX_UNI_STREAMS`]. A GEO link (20 Mbit/s, 600 ms: ~1.5 MB in
/// flight, ~46 chunks) gets 366; what a stream may make the receiver hold in memory is the
/// transfer inbox's budget's business (`tiandi_transfer::inbox::CONN_CHUNK_BUDGET`), not
/// this limit's.
pub fn uni_streams(connection_window: u64) -> u32 {
    (connection_window / MIN_CHUNK).clamp(u64::from(MIN_UNI_STREAMS), u64::from(MAX_UNI_STREAMS))
        as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_ack_delay_covers_the_interval_up_to_16_s() {
        use super::*;
        let s = Duration::from_secs;
        assert_eq!(report_ack_delay(s(10)), Some(Duration::from_millis(12_500)));
        assert_eq!(report_ack_delay(s(2)), Some(Duration::from_millis(2_500)));
        assert_eq!(
            report_ack_delay(Duration::from_millis(50)),
            Some(Duration::from_millis(62))
        );
        assert_eq!(report_ack_delay(Duration::from_millis(10_400)), Some(s(13)));
        // Longer intervals: the acknowledgement would go alone anyway.
        assert_eq!(report_ack_delay(Duration::from_millis(10_500)), None);
        assert_eq!(report_ack_delay(s(13)), None);
        assert_eq!(report_ack_delay(s(3600)), None);
        assert_eq!(report_ack_delay(Duration::from_millis(10)), None);
    }

    #[test]
    fn stream_limits_cover_a_geo_window_and_stay_bounded() {
        use super::*;
        // GEO at 20 Mbit/s × 600 ms: 1.5 MB in flight is 46 chunks of 32 KiB; the limit
        // covers twice that, and never exceeds 512.
        let (rtt, bps) = LinkProfile::Geo.nominal();
        let bdp = (bps / 8) as f64 * rtt.as_secs_f64();
        let w = (4.0 * bdp) as u64 * 2;
        let n = uni_streams(w);
        assert!(u64::from(n) * MIN_CHUNK >= 2 * bdp as u64, "{n}");
        assert!(n <= MAX_UNI_STREAMS);
        assert_eq!(uni_streams(0), MIN_UNI_STREAMS);
        assert_eq!(uni_streams(u64::MAX), MAX_UNI_STREAMS);
    }

    use super::*;

    #[test]
    fn profiles_parse_from_flags_and_toml() {
        assert_eq!("geo".parse::<LinkProfile>(), Ok(LinkProfile::Geo));
        let c: LinkProfile = "custom:700:4000".parse().unwrap();
        assert_eq!(
            c,
            LinkProfile::Custom {
                rtt_ms: 700,
                rate_kbit: 4000
            }
        );
        assert_eq!(c.nominal(), (Duration::from_millis(700), 4_000_000));
        for bad in ["satellite", "custom:700", "custom:0:4000", "custom:700:x"] {
            assert!(bad.parse::<LinkProfile>().is_err(), "{bad}");
        }
        #[derive(serde::Deserialize)]
        struct C {
            profile: LinkProfile,
        }
        let t: C =
            toml::from_str("profile = { custom = { rtt_ms = 250, rate_kbit = 2000 } }").unwrap();
        assert_eq!(t.profile.nominal().0, Duration::from_millis(250));
        let g: C = toml::from_str("profile = \"leo\"").unwrap();
        assert_eq!(g.profile, LinkProfile::Leo);
    }
}
