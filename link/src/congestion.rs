//! A fixed-rate congestion controller for links whose rate is known and reserved: a VSAT
//! site's committed rate, from its configuration or its modem.
//!
//! Loss-based controllers (Cubic, NewReno) read every loss as congestion; on a GEO hop with
//! 1 % random loss they hold the window at a few tens of kB and move under 1 Mbit/s of a
//! 20 Mbit/s link. quinn's BBR overshoots instead (measured: `../shared/notes/quic-on-geo.md`).
//! This controller keeps the window at `rate × RTT`, with RTT the smoothed round trip capped
//! at [`RTT_CAP`] × the minimum: a window is acknowledged one raw round trip after it is sent,
//! and quinn's smoothed RTT has the receiver's ACK delay taken out, so the connection sends
//! at most the configured rate on average (a window of `rate × min RTT` alone lost ~3 % to
//! ACK delay and jitter on an emulated GEO hop). A random loss shrinks nothing. The cap keeps a
//! rate set too high self-limiting: the queue it builds raises the smoothed RTT, but the window
//! grows by at most a tenth of a round trip's worth before it stops following.
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
    min_rtt: Option<Duration>,
    /// The RTT the window follows (smoothed, capped).
    rtt: Option<Duration>,
    initial_rtt: Duration,
    window: u64,
}

impl FixedRate {
    pub fn new(rate_bps: u64, initial_rtt: Duration, mtu: u16) -> FixedRate {
        let mut c = FixedRate {
            bytes_per_s: rate_bps as f64 / 8.0,
            mtu,
            min_rtt: None,
            rtt: None,
            initial_rtt,
            window: 0,
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
        self.on_rtt(rtt.get(), rtt.min());
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
    fn tiny_rates_keep_a_few_packets_in_flight() {
        let mut c = FixedRate::new(64_000, Duration::from_millis(600), 1200);
        assert_eq!(c.window(), 4 * 1200);
        c.on_mtu_update(1452);
        assert_eq!(c.window(), 4 * 1452);
        assert_eq!(c.initial_window(), 4 * 1452);
    }
}
