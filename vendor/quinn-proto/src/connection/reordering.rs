//! Reordering-tolerant loss detection (a Tiandi patch; see `vendor/README.md` in Tiandi).
//!
//! RFC 9002 §6.1 declares a packet lost once a packet sent `kPacketThreshold` (3) packets
//! later was acknowledged, or once it was sent more than `kTimeThreshold` (9/8) × RTT before
//! one that was. On a path that reorders by more than three packets (a multi-carrier VSAT hub,
//! a bonded or load-balanced line) every overtaken packet becomes a spurious loss: its data is
//! sent twice and a loss-based congestion controller backs off for nothing. When a packet
//! overtakes the ones sent before it by a whole propagation delay, one early acknowledgement
//! declares hundreds of packets lost at once.
//!
//! Both thresholds may adapt (RFC 9002 §6.1.1, §6.1.2). This remembers the packets declared
//! lost recently; when one of them is acknowledged after all, the loss was spurious:
//! - declared by the packet threshold: the threshold rises above the reordering distance seen
//!   (how many later packets had been acknowledged), with an eighth of headroom, as Linux's
//!   `tp->reordering` does;
//! - declared by time: the time threshold widens by 1/8 RTT, at most once per round trip and up
//!   to 2 RTT, as RACK's reordering window does on a DSACK (RFC 8985 §6.2).
//!
//! A spurious loss also hands its stream frames back as acknowledged, so a retransmission still
//! queued is not sent. Once no spurious loss was seen for [`PERSIST_EPISODES`] loss episodes
//! and as many round trips, the thresholds return to their configured values (RACK's
//! `reo_wnd_persist`). Memory is bounded: at most [`MAX_REMEMBERED`] lost packets, each
//! forgotten after [`REMEMBER_RTTS`] round trips.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use super::StreamMetaVec;
use crate::{Duration, Instant};

/// Lost packets remembered at most (the oldest go first).
pub(super) const MAX_REMEMBERED: usize = 4096;
/// A lost packet is forgotten this many round trips after it was sent: an acknowledgement
/// later than that is no evidence of reordering worth adapting to.
pub(super) const REMEMBER_RTTS: u32 = 4;
/// Loss episodes (and round trips) without a spurious loss before the thresholds reset.
pub(super) const PERSIST_EPISODES: u32 = 16;
/// Highest packet threshold (beyond it, the time threshold decides alone).
const MAX_PACKET_THRESHOLD: u64 = 1 << 16;
/// Widest time threshold, in RTTs.
const MAX_TIME_THRESHOLD: f32 = 2.0;
/// How much the time threshold widens per spurious loss round.
const TIME_THRESHOLD_STEP: f32 = 1.0 / 8.0;

/// A packet declared lost.
#[derive(Debug)]
pub(super) struct Lost {
    pub(super) pn: u64,
    time_sent: Instant,
    /// Packets beyond it that had been acknowledged when it was declared lost.
    distance: u64,
    /// Declared by the packet threshold (else by time alone).
    by_packet: bool,
    /// Its stream frames: acknowledged after all if the loss was spurious.
    pub(super) stream_frames: StreamMetaVec,
}

/// The adaptive thresholds of one packet number space.
#[derive(Debug)]
pub(super) struct Reordering {
    base_packet_threshold: u64,
    base_time_threshold: f32,
    packet_threshold: u64,
    time_threshold: f32,
    lost: BTreeMap<u64, Lost>,
    last_time_widening: Option<Instant>,
    last_spurious: Option<Instant>,
    episodes_since_spurious: u32,
}

impl Reordering {
    pub(super) fn new(packet_threshold: u32, time_threshold: f32) -> Self {
        let base_packet_threshold = u64::from(packet_threshold).max(1);
        let base_time_threshold = if time_threshold.is_finite() && time_threshold >= 1.0 {
            time_threshold
        } else {
            9.0 / 8.0
        };
        Self {
            base_packet_threshold,
            base_time_threshold,
            packet_threshold: base_packet_threshold,
            time_threshold: base_time_threshold,
            lost: BTreeMap::new(),
            last_time_widening: None,
            last_spurious: None,
            episodes_since_spurious: 0,
        }
    }

    /// Packets acknowledged this many beyond an unacknowledged one make it lost.
    pub(super) fn packet_threshold(&self) -> u64 {
        self.packet_threshold
    }

    /// A packet sent this many RTTs before an acknowledged one is lost.
    pub(super) fn time_threshold(&self) -> f32 {
        self.time_threshold
    }

    /// Remembers packet `pn`, sent at `time_sent`, declared lost with `largest_acked` the
    /// largest acknowledged packet.
    pub(super) fn on_lost(
        &mut self,
        pn: u64,
        time_sent: Instant,
        largest_acked: u64,
        stream_frames: StreamMetaVec,
    ) {
        let distance = largest_acked.saturating_sub(pn);
        let by_packet = distance >= self.packet_threshold;
        while self.lost.len() >= MAX_REMEMBERED {
            self.lost.pop_first();
        }
        self.lost.insert(
            pn,
            Lost {
                pn,
                time_sent,
                distance,
                by_packet,
                stream_frames,
            },
        );
    }

    /// One round of loss detection declared packets lost: counts towards the reset, and forgets
    /// lost packets sent more than [`REMEMBER_RTTS`] round trips before `now`.
    pub(super) fn on_loss_episode(&mut self, now: Instant, rtt: Duration) {
        self.forget_older_than(now, rtt);
        self.episodes_since_spurious = self.episodes_since_spurious.saturating_add(1);
        let elevated = self.packet_threshold != self.base_packet_threshold
            || self.time_threshold != self.base_time_threshold;
        let quiet_long_enough = self
            .last_spurious
            .is_none_or(|t| now.saturating_duration_since(t) >= rtt * PERSIST_EPISODES);
        if elevated && self.episodes_since_spurious >= PERSIST_EPISODES && quiet_long_enough {
            self.packet_threshold = self.base_packet_threshold;
            self.time_threshold = self.base_time_threshold;
            self.last_time_widening = None;
        }
    }

    fn forget_older_than(&mut self, now: Instant, rtt: Duration) {
        let horizon = rtt * REMEMBER_RTTS;
        self.lost
            .retain(|_, l| now.saturating_duration_since(l.time_sent) < horizon);
    }

    /// Packets in `range` were acknowledged: those declared lost were not. Adapts the
    /// thresholds and returns them (their stream frames arrived).
    pub(super) fn on_acked(
        &mut self,
        range: RangeInclusive<u64>,
        now: Instant,
        rtt: Duration,
    ) -> Vec<Lost> {
        if self.lost.is_empty() || range.is_empty() {
            return Vec::new();
        }
        let pns: Vec<u64> = self.lost.range(range).map(|(&pn, _)| pn).collect();
        let mut found = Vec::with_capacity(pns.len());
        for pn in pns {
            let Some(l) = self.lost.remove(&pn) else {
                continue;
            };
            if l.by_packet {
                let wanted = l.distance + l.distance / 8 + 1;
                self.packet_threshold = self.packet_threshold.max(wanted.min(MAX_PACKET_THRESHOLD));
            } else if self
                .last_time_widening
                .is_none_or(|t| now.saturating_duration_since(t) >= rtt)
            {
                self.time_threshold =
                    (self.time_threshold + TIME_THRESHOLD_STEP).min(MAX_TIME_THRESHOLD);
                self.last_time_widening = Some(now);
            }
            found.push(l);
        }
        if !found.is_empty() {
            self.last_spurious = Some(now);
            self.episodes_since_spurious = 0;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(600);

    #[test]
    fn a_late_acknowledgement_of_a_packet_declared_lost_raises_the_packet_threshold() {
        let t0 = Instant::now();
        let mut r = Reordering::new(3, 9.0 / 8.0);
        // Packet 10 was overtaken by 40 others (their acknowledgements arrived first).
        r.on_lost(10, t0, 50, StreamMetaVec::new());
        r.on_loss_episode(t0, RTT);
        assert_eq!(r.packet_threshold(), 3, "nothing learned before the late ack");
        let spurious = r.on_acked(5..=12, t0 + RTT / 2, RTT);
        assert_eq!(spurious.len(), 1);
        assert_eq!(spurious[0].pn, 10);
        // The distance (40) plus an eighth, plus one.
        assert_eq!(r.packet_threshold(), 40 + 5 + 1);
        // Acknowledged once: not spurious twice.
        assert!(r.on_acked(10..=10, t0 + RTT, RTT).is_empty());
    }

    #[test]
    fn a_real_loss_teaches_nothing_and_is_forgotten_after_a_few_round_trips() {
        let t0 = Instant::now();
        let mut r = Reordering::new(3, 9.0 / 8.0);
        r.on_lost(7, t0, 20, StreamMetaVec::new());
        // Acknowledgements of other packets only.
        assert!(r.on_acked(8..=30, t0 + RTT, RTT).is_empty());
        r.on_loss_episode(t0 + RTT * (REMEMBER_RTTS + 1), RTT);
        assert!(r.lost.is_empty(), "remembered beyond {REMEMBER_RTTS} RTTs");
        assert_eq!(r.packet_threshold(), 3);
        assert_eq!(r.time_threshold(), 9.0 / 8.0);
    }

    #[test]
    fn a_loss_declared_by_time_widens_the_time_threshold_once_per_round_trip_up_to_two() {
        let t0 = Instant::now();
        let mut r = Reordering::new(3, 9.0 / 8.0);
        // Declared by time: fewer than the packet threshold acknowledged beyond it.
        r.on_lost(100, t0, 101, StreamMetaVec::new());
        r.on_lost(102, t0, 103, StreamMetaVec::new());
        let found = r.on_acked(100..=102, t0 + RTT, RTT);
        assert_eq!(found.len(), 2);
        // Two spurious losses in the same round trip widen it once.
        assert_eq!(r.time_threshold(), 9.0 / 8.0 + TIME_THRESHOLD_STEP);
        assert_eq!(r.packet_threshold(), 3);
        let mut now = t0 + RTT;
        for pn in 200..240 {
            now += RTT;
            r.on_lost(pn, now, pn + 1, StreamMetaVec::new());
            r.on_acked(pn..=pn, now, RTT);
        }
        assert_eq!(r.time_threshold(), MAX_TIME_THRESHOLD);
    }

    #[test]
    fn thresholds_return_after_quiet_episodes_and_the_memory_is_bounded() {
        let t0 = Instant::now();
        let mut r = Reordering::new(3, 9.0 / 8.0);
        r.on_lost(1, t0, 500, StreamMetaVec::new());
        r.on_acked(1..=1, t0, RTT);
        assert!(r.packet_threshold() > 500);
        // Loss episodes without a spurious loss, but not yet for long enough.
        let mut now = t0;
        for _ in 0..PERSIST_EPISODES {
            now += RTT / 4;
            r.on_loss_episode(now, RTT);
        }
        assert!(r.packet_threshold() > 500, "reset before 16 quiet RTTs");
        now = t0 + RTT * PERSIST_EPISODES;
        r.on_loss_episode(now, RTT);
        assert_eq!(r.packet_threshold(), 3);
        // At most MAX_REMEMBERED lost packets are remembered, the oldest dropped first.
        for pn in 0..(MAX_REMEMBERED as u64 + 10) {
            r.on_lost(pn, now, pn + 3, StreamMetaVec::new());
        }
        assert_eq!(r.lost.len(), MAX_REMEMBERED);
        assert_eq!(r.lost.keys().next(), Some(&10));
        // The packet threshold never exceeds its cap, whatever the distance.
        r.on_lost(u64::MAX / 2, now, u64::MAX, StreamMetaVec::new());
        r.on_acked(u64::MAX / 2..=u64::MAX / 2, now, RTT);
        assert_eq!(r.packet_threshold(), MAX_PACKET_THRESHOLD);
    }
}
