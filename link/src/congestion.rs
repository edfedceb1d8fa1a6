//! A fixed-rate congestion controller for links whose rate is known and reserved: a VSAT
//! site's committed rate, from its configuration or its modem.
//!
//! Loss-based controllers (Cubic, NewReno) read every loss as congestion; on a GEO hop with
//! 1 % random loss they hold the window at a few tens of kB and move under 1 Mbit/s of a
//! 20 Mbit/s link. quinn's BBR overshoots instead (measured: `../shared/notes/quic-on-geo.md`).
//! This controller keeps the window at `rate × RTT`, with RTT the smoothed round trip capped
//! at [`RTT_CAP`] × the base RTT: a window is acknowledged one raw round trip after it is sent,
//! and quinn's smoothed RTT has the receiver's ACK delay taken out, so the connection sends
//! at most the configured rate on average (a window of `rate × min RTT` alone lost ~3 % to
//! ACK delay and jitter on an emulated GEO hop). A random loss shrinks nothing. The cap keeps a
//! rate set too high self-limiting: the queue it builds raises the smoothed RTT, but the window
//! grows by at most a tenth of a round trip's worth before it stops following.
//!
//! The base RTT is the lowest *smoothed* RTT seen, not the lowest sample: on a path that
//! reorders, a packet that overtakes others (netem-style, skipping the propagation delay)
//! gives one sample of half the round trip, and a window built on it would halve the rate for
//! the rest of the connection. One sample moves the smoothed RTT by an eighth of its error.
//!
//! Only safe where the rate really is reserved for the connection: it does not back off for
//! competing traffic. Sustained heavy loss (a fade deeper than the link budget, a cut) is
//! not congestion either; quinn's loss recovery and the idle timeout deal with it.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

/// The RTT used for the window is at most this multiple of the minimum RTT.
pub const RTT_CAP: f64 = 1.1;
/// Window when no RTT sample exists yet: `rate × initial_rtt`.
const DEFAULT_INITIAL_RTT: Duration = Duration::from_millis(600);
/// Floor of the window, in packets: enough for loss recovery to keep working at tiny rates.
const MIN_WINDOW_PACKETS: u64 = 4;

/// Configuration: the rate (bits per second of QUIC payload, i.e. UDP payload).
#[derive(Clone, Debug)]
pub struct FixedRateConfig {
    pub rate_bps: u64,
    /// RTT assumed before the first sample (sets the initial window).
    pub initial_rtt: Duration,
}

impl FixedRateConfig {
    pub fn new(rate_bps: u64) -> FixedRateConfig {
        FixedRateConfig {
            rate_bps,
            initial_rtt: DEFAULT_INITIAL_RTT,
        }
    }
}

impl ControllerFactory for FixedRateConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(FixedRate::new(self.rate_bps, self.initial_rtt, current_mtu))
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct FixedRate {
    bytes_per_s: f64,
    mtu: u16,
    /// The base RTT: the lowest smoothed RTT seen (see the module documentation).
    min_rtt: Option<Duration>,
    /// The RTT the window follows (smoothed, capped).
    rtt: Option<Duration>,
    initial_rtt: Duration,
    window: u64,
    /// Acknowledged packets so far (up to [`SETTLE_ACKS`]).
    acks: u32,
}

/// Acknowledged packets before the base RTT starts to follow the smoothed RTT's minimum.
const SETTLE_ACKS: u32 = 64;

impl FixedRate {
    pub fn new(rate_bps: u64, initial_rtt: Duration, mtu: u16) -> FixedRate {
        let mut c = FixedRate {
            bytes_per_s: rate_bps as f64 / 8.0,
            mtu,
            min_rtt: None,
            rtt: None,
            initial_rtt,
            window: 0,
            acks: 0,
        };
        c.window = c.compute_window();
        c
    }

    fn compute_window(&self) -> u64 {
        let rtt = self.rtt.or(self.min_rtt).unwrap_or(self.initial_rtt);
        let w = (self.bytes_per_s * rtt.as_secs_f64()) as u64;
        w.max(MIN_WINDOW_PACKETS * u64::from(self.mtu))
    }

    /// Takes a new minimum-RTT sample.
    pub fn on_min_rtt(&mut self, min_rtt: Duration) {
        if min_rtt.is_zero() {
            return;
        }
        self.min_rtt = Some(min_rtt);
        if let Some(r) = self.rtt {
            self.rtt = Some(r.min(min_rtt.mul_f64(RTT_CAP)).max(min_rtt));
        }
        self.window = self.compute_window();
    }

    /// Takes the smoothed RTT (ACK delay excluded): the window follows it up to the cap.
    pub fn on_rtt(&mut self, smoothed: Duration, min_rtt: Duration) {
        if min_rtt.is_zero() {
            return;
        }
        self.min_rtt = Some(min_rtt);
        self.rtt = Some(smoothed.clamp(min_rtt, min_rtt.mul_f64(RTT_CAP)));
        self.window = self.compute_window();
    }
}

impl Controller for FixedRate {
    fn on_ack(
        &mut self,
        _now: Instant,
        _sent: Instant,
        _bytes: u64,
        _app_limited: bool,
        rtt: &RttEstimator,
    ) {
        let smoothed = rtt.get();
        // The first samples set the smoothed RTT outright: one early packet among them would
        // be the base for good. Let it settle first.
        self.acks = self.acks.saturating_add(1);
        let base = match self.min_rtt {
            _ if self.acks < SETTLE_ACKS => smoothed,
            Some(b) => b.min(smoothed),
            None => smoothed,
        };
        self.on_rtt(smoothed, base);
        if self.acks < SETTLE_ACKS {
            self.min_rtt = None;
        }
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        _is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        // Random loss on a reserved link is not congestion: the window stays.
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.window = self.compute_window();
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        FixedRate::new((self.bytes_per_s * 8.0) as u64, self.initial_rtt, self.mtu).window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A link rate counted on Ethernet frames (how carriers and the emulator count) as UDP payload
/// (what QUIC's congestion controller counts): full-size datagrams, 1452 of 1494 bytes.
pub fn udp_payload_bps(ethernet_bps: f64) -> u64 {
    (ethernet_bps * 1452.0 / 1494.0) as u64
}

/// A connection's committed rate, set once the peer is known (bits per second of UDP payload;
/// 0: unknown). Shared between the controller and whoever learns the rate.
#[derive(Clone, Debug, Default)]
pub struct RateSlot(Arc<std::sync::atomic::AtomicU64>);

impl RateSlot {
    pub fn set(&self, bps: u64) {
        self.0.store(bps, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// For a server whose peers' rates are known only after the handshake (a controller learns
/// which site it talks to from its certificate): Cubic until the connection's [`RateSlot`] is
/// set, [`FixedRate`] at that rate from then on.
#[derive(Debug)]
pub struct SiteRateConfig {
    slot: RateSlot,
    initial_rtt: Duration,
}

impl SiteRateConfig {
    pub fn new(slot: RateSlot, initial_rtt: Duration) -> SiteRateConfig {
        SiteRateConfig { slot, initial_rtt }
    }
}

impl ControllerFactory for SiteRateConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(SiteRate {
            slot: self.slot.clone(),
            initial_rtt: self.initial_rtt,
            mtu: current_mtu,
            fixed: None,
            cubic: Arc::new(quinn::congestion::CubicConfig::default()).build(now, current_mtu),
        })
    }
}

/// See [`SiteRateConfig`].
pub struct SiteRate {
    slot: RateSlot,
    initial_rtt: Duration,
    mtu: u16,
    fixed: Option<(u64, FixedRate)>,
    cubic: Box<dyn Controller>,
}

impl SiteRate {
    /// The fixed-rate controller, (re)built when the slot's rate changes; None while unknown.
    fn fixed(&mut self) -> Option<&mut FixedRate> {
        let rate = self.slot.get();
        if rate == 0 {
            self.fixed = None;
            return None;
        }
        if self.fixed.as_ref().is_none_or(|(r, _)| *r != rate) {
            let mut f = FixedRate::new(rate, self.initial_rtt, self.mtu);
            if let Some((_, old)) = &self.fixed {
                f.min_rtt = old.min_rtt;
                f.rtt = old.rtt;
                f.acks = old.acks;
                f.window = f.compute_window();
            }
            self.fixed = Some((rate, f));
        }
        self.fixed.as_mut().map(|(_, f)| f)
    }
}

impl Controller for SiteRate {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
        if let Some(f) = self.fixed() {
            f.on_ack(now, sent, bytes, app_limited, rtt);
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest: Option<u64>,
    ) {
        self.cubic.on_end_acks(now, in_flight, app_limited, largest);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        persistent: bool,
        lost_bytes: u64,
    ) {
        // Cubic keeps learning, so falling back to it (a rate unset) starts from what it saw.
        self.cubic
            .on_congestion_event(now, sent, persistent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.cubic.on_mtu_update(new_mtu);
        if let Some((_, f)) = &mut self.fixed {
            f.on_mtu_update(new_mtu);
        }
    }

    fn window(&self) -> u64 {
        let rate = self.slot.get();
        match &self.fixed {
            Some((r, f)) if *r == rate => f.window(),
            // Set since the last event: the next one builds it; until then its first window.
            _ if rate > 0 => FixedRate::new(rate, self.initial_rtt, self.mtu).window(),
            _ => self.cubic.window(),
        }
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(SiteRate {
            slot: self.slot.clone(),
            initial_rtt: self.initial_rtt,
            mtu: self.mtu,
            fixed: self.fixed.clone(),
            cubic: self.cubic.clone_box(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_rate_times_min_rtt() {
        // 20 Mbit/s over 600 ms: 1.5 MB in flight.
        let mut c = FixedRate::new(20_000_000, Duration::from_millis(600), 1200);
        assert_eq!(c.window(), 1_500_000);
        c.on_min_rtt(Duration::from_millis(610));
        assert_eq!(c.window(), 1_525_000);
        // Loss leaves it alone.
        c.on_congestion_event(Instant::now(), Instant::now(), false, 100_000);
        c.on_congestion_event(Instant::now(), Instant::now(), true, 1_000_000);
        assert_eq!(c.window(), 1_525_000);
    }

    #[test]
    fn window_follows_the_smoothed_rtt_up_to_a_tenth_above_the_minimum() {
        let mut c = FixedRate::new(8_000_000, Duration::from_millis(600), 1200);
        c.on_rtt(Duration::from_millis(615), Duration::from_millis(600));
        assert_eq!(c.window(), 615_000);
        // A queue (a rate set above the link's) raises the smoothed RTT: capped.
        c.on_rtt(Duration::from_millis(2000), Duration::from_millis(600));
        assert_eq!(c.window(), 660_000);
        // Never below the minimum.
        c.on_rtt(Duration::from_millis(500), Duration::from_millis(600));
        assert_eq!(c.window(), 600_000);
    }

    #[test]
    fn site_rate_is_cubic_until_the_rate_is_known() {
        let slot = RateSlot::default();
        let mut c = Arc::new(SiteRateConfig::new(
            slot.clone(),
            Duration::from_millis(600),
        ))
        .build(Instant::now(), 1200);
        let cubic_window = c.window();
        // Cubic shrinks on loss while the rate is unknown.
        c.on_congestion_event(Instant::now(), Instant::now(), false, 12_000);
        assert!(c.window() < cubic_window);
        // The site is known: 8 Mbit/s over 600 ms, whatever was lost.
        slot.set(8_000_000);
        assert_eq!(c.window(), 600_000);
        c.on_congestion_event(Instant::now(), Instant::now(), false, 120_000);
        assert_eq!(c.window(), 600_000);
    }

    #[test]
    fn tiny_rates_keep_a_few_packets_in_flight() {
        let mut c = FixedRate::new(64_000, Duration::from_millis(600), 1200);
        assert_eq!(c.window(), 4 * 1200);
        c.on_mtu_update(1452);
        assert_eq!(c.window(), 4 * 1452);
        assert_eq!(c.initial_window(), 4 * 1452);
    }
}
