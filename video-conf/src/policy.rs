//! Decisions free of I/O: which groups a subscriber drops, which rendition it gets, who may
//! publish.

use std::time::Duration;

/// At most this many groups of one track in flight to one subscriber (not yet all
/// acknowledged): the newest, and the one before it finishing its tail. When another starts,
/// the oldest is reset, whatever QUIC still holds of it: a subscriber behind its link loses
/// whole old groups instead of falling further behind.
pub const MAX_GROUPS_IN_FLIGHT: usize = 2;

/// Groups allowed in flight beyond [`MAX_GROUPS_IN_FLIGHT`] on a long link: a group stays
/// unacknowledged for a round trip after its last byte, two when a loss is repaired, which
/// over a satellite hop is longer than a short group (audio: ~0.5 s) lasts. Judged on the
/// link's lowest round trip (queueing on a saturated link does not earn more) against the
/// time since the previous group started.
pub fn extra_in_flight(min_rtt: Duration, spacing: Option<Duration>) -> usize {
    match spacing {
        Some(s) if !s.is_zero() => (2.0 * min_rtt.as_secs_f64() / s.as_secs_f64()).floor() as usize,
        _ => 0,
    }
    .min(8)
}

/// Which groups to reset when group `new` starts. `in_flight` are the sequence numbers of
/// groups not yet fully acknowledged, any order; `extra`: from [`extra_in_flight`].
pub fn groups_to_drop(in_flight: &[u64], new: u64, extra: usize) -> Vec<u64> {
    let mut older: Vec<u64> = in_flight.iter().copied().filter(|g| *g < new).collect();
    older.sort_unstable();
    let keep = (MAX_GROUPS_IN_FLIGHT + extra).saturating_sub(1);
    let n = older.len().saturating_sub(keep);
    older.truncate(n);
    older
}

/// A path shorter than this takes a late joiner's current group whatever its age: the
/// rest of the group follows in a moment, and the picture is there at once.
pub const SHORT_PATH: Duration = Duration::from_millis(100);
/// On a longer path a late joiner starts with the current group only if it is at most this
/// old on arrival (its age plus half the round trip).
pub const JOIN_FRESH: Duration = Duration::from_millis(400);

/// Whether a new subscriber starts with the track's current group (from its keyframe,
/// `group_age` old) or waits for the next one. Over a long, narrow path an old group is a
/// burst of seconds of video the link queues and drops, and frames older than any player's
/// budget; the next keyframe is at most a group away.
pub fn join_current(group_age: Duration, min_rtt: Duration) -> bool {
    min_rtt < SHORT_PATH || group_age + min_rtt / 2 <= JOIN_FRESH
}

/// Whether a path is queueing (its round trip well above the lowest it has shown): a link
/// past its capacity, not one that merely loses packets.
pub fn queueing(rtt: Duration, min_rtt: Duration) -> bool {
    rtt > min_rtt * 3 / 2 + Duration::from_millis(20)
}

/// Stream priority of a group: audio above all video; newer groups above older ones.
pub fn group_priority(kind: &str, seq: u64) -> i32 {
    let base = if kind == "audio" { 1 << 24 } else { 0 };
    base + (seq % (1 << 20)) as i32
}

/// One subscriber's rendition choice for one publisher's video.
///
/// Starts from the link rate the site declared (or the top rendition); steps down when the
/// link shows it cannot carry the current one (groups dropped, or the measured rate below
/// it), and back up only after a long clean spell with room to spare. Changes take effect
/// at the next group boundary (the caller switches when a group of the new rendition
/// starts).
#[derive(Debug, Clone)]
pub struct RenditionChooser {
    /// (name, kbit/s), highest first.
    renditions: Vec<(String, u32)>,
    current: usize,
    clean_since_ms: i64,
    /// The clean spell a step up waits for: [`UPGRADE_AFTER_MS`], doubled by each step up
    /// the link could not carry (stepped down again within that spell), at most
    /// [`UPGRADE_AFTER_MAX_MS`]. The rate estimate cannot see the room a link has above what
    /// it carries now, so every step up is a probe, and a failed probe costs the viewer a
    /// group.
    upgrade_after_ms: i64,
    upgraded_at_ms: Option<i64>,
    /// The link rate the site declared (kbit/s; 0: unknown): never a rendition above it.
    declared_kbps: u32,
}

/// The longest wait between two attempts to step up.
pub const UPGRADE_AFTER_MAX_MS: i64 = 320_000;

/// A clean spell this long, with room for the higher rendition, before stepping up.
pub const UPGRADE_AFTER_MS: i64 = 60_000;
/// The measured rate must exceed a rendition's bitrate by this factor to choose it.
pub const HEADROOM: f64 = 1.3;

impl RenditionChooser {
    pub fn new(mut renditions: Vec<(String, u32)>, declared_kbps: u32, now_ms: i64) -> Self {
        renditions.sort_by_key(|r| std::cmp::Reverse(r.1));
        let current = if declared_kbps == 0 {
            0
        } else {
            renditions
                .iter()
                .position(|(_, k)| f64::from(*k) * HEADROOM <= f64::from(declared_kbps))
                .unwrap_or(renditions.len().saturating_sub(1))
        };
        RenditionChooser {
            renditions,
            current,
            clean_since_ms: now_ms,
            upgrade_after_ms: UPGRADE_AFTER_MS,
            upgraded_at_ms: None,
            declared_kbps,
        }
    }

    /// Starts at rendition `name` if it is on offer (and not above the declared rate): a
    /// viewer failing over from another path goes on with what it was receiving.
    pub fn start_at(&mut self, name: &str) {
        if let Some(i) = self.renditions.iter().position(|(n, k)| {
            n == name
                && (self.declared_kbps == 0
                    || f64::from(*k) * HEADROOM <= f64::from(self.declared_kbps))
        }) {
            self.current = i;
        }
    }

    /// The renditions on offer changed (a cascade brings them down one by one): the
    /// current one is kept if it is still there, else the nearest below its rate.
    pub fn offer(&mut self, mut renditions: Vec<(String, u32)>) {
        renditions.sort_by_key(|r| std::cmp::Reverse(r.1));
        if renditions == self.renditions {
            return;
        }
        let (name, rate) = self
            .renditions
            .get(self.current)
            .cloned()
            .unwrap_or_default();
        self.current = renditions
            .iter()
            .position(|r| r.0 == name)
            .or_else(|| renditions.iter().position(|r| r.1 <= rate))
            .unwrap_or(renditions.len().saturating_sub(1));
        self.renditions = renditions;
    }

    pub fn current(&self) -> &str {
        self.renditions
            .get(self.current)
            .map(|r| r.0.as_str())
            .unwrap_or("")
    }

    /// Takes what the link showed since the last call: groups dropped, and the rate the
    /// subscriber's connection is estimated to carry (kbit/s; 0: unknown). Returns the
    /// rendition to send from the next group on.
    pub fn observe(&mut self, dropped_groups: u64, est_kbps: f64, now_ms: i64) -> &str {
        let cur_rate = self.renditions.get(self.current).map_or(0, |r| r.1);
        let too_slow = est_kbps > 0.0 && est_kbps < f64::from(cur_rate);
        if (dropped_groups > 0 || too_slow) && self.current + 1 < self.renditions.len() {
            self.current += 1;
            // A step up the link could not carry: wait twice as long before the next.
            if self
                .upgraded_at_ms
                .is_some_and(|t| now_ms - t < self.upgrade_after_ms)
            {
                self.upgrade_after_ms = (self.upgrade_after_ms * 2).min(UPGRADE_AFTER_MAX_MS);
            }
            self.upgraded_at_ms = None;
            self.clean_since_ms = now_ms;
        } else if dropped_groups > 0 || too_slow {
            self.clean_since_ms = now_ms;
        } else if self.current > 0 && now_ms - self.clean_since_ms >= self.upgrade_after_ms {
            let up = f64::from(self.renditions[self.current - 1].1) * HEADROOM;
            let fits = self.declared_kbps == 0 || up <= f64::from(self.declared_kbps);
            if fits && est_kbps >= up {
                self.current -= 1;
                self.clean_since_ms = now_ms;
                self.upgraded_at_ms = Some(now_ms);
            }
        }
        self.current()
    }
}

/// Who may publish in a room: the chair always, another site only while it holds the floor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FloorState {
    pub chair: String,
    pub holder: Option<String>,
}

impl FloorState {
    pub fn may_publish(&self, site: &str) -> bool {
        site == self.chair || self.holder.as_deref() == Some(site)
    }

    /// Who speaks: the floor holder, else the chair.
    pub fn speaker(&self) -> &str {
        self.holder.as_deref().unwrap_or(&self.chair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_two_groups_stay_in_flight() {
        assert!(groups_to_drop(&[], 5, 0).is_empty());
        assert!(groups_to_drop(&[4], 5, 0).is_empty());
        assert_eq!(groups_to_drop(&[3, 4], 5, 0), vec![3]);
        assert_eq!(groups_to_drop(&[4, 1, 3, 2], 5, 0), vec![1, 2, 3]);
        // A group newer than the one starting (reordering) is never dropped for it.
        assert!(groups_to_drop(&[6], 5, 0).is_empty());
        // Over a satellite hop, half-second audio groups wait for acknowledgement longer.
        let ms = Duration::from_millis;
        let extra = extra_in_flight(ms(600), Some(ms(500)));
        assert_eq!(extra, 2);
        assert!(groups_to_drop(&[2, 3, 4], 5, extra).is_empty());
        assert_eq!(groups_to_drop(&[1, 2, 3, 4], 5, extra), vec![1]);
        // Two-second video groups, or a terrestrial link: as before.
        assert_eq!(extra_in_flight(ms(600), Some(ms(2000))), 0);
        assert_eq!(extra_in_flight(ms(40), Some(ms(500))), 0);
        assert_eq!(extra_in_flight(ms(600), None), 0);
    }

    #[test]
    fn a_late_joiner_over_a_long_path_waits_for_a_fresh_group() {
        let ms = Duration::from_millis;
        // A LAN: the current group, however old.
        assert!(join_current(ms(1900), ms(2)));
        // GEO: only a group that has just begun.
        assert!(join_current(ms(50), ms(600)));
        assert!(!join_current(ms(200), ms(600)));
        assert!(!join_current(ms(1900), ms(600)));
    }

    #[test]
    fn a_queueing_path_is_told_from_a_lossy_one() {
        let ms = Duration::from_millis;
        // A 512 kbit/s line with its queue full: 40 ms at best, 700 ms now.
        assert!(queueing(ms(700), ms(40)));
        // GEO losing packets, not queueing.
        assert!(!queueing(ms(640), ms(600)));
        assert!(!queueing(ms(45), ms(40)));
    }

    #[test]
    fn audio_outranks_video_and_newer_outranks_older() {
        assert!(group_priority("audio", 1) > group_priority("video", 1_000));
        assert!(group_priority("video", 8) > group_priority("video", 7));
    }

    fn chooser(declared: u32) -> RenditionChooser {
        RenditionChooser::new(
            vec![("low".into(), 300), ("high".into(), 1500)],
            declared,
            0,
        )
    }

    #[test]
    fn a_narrow_declared_link_starts_low() {
        assert_eq!(chooser(0).current(), "high");
        assert_eq!(chooser(512).current(), "low");
        // And stays there, whatever the estimate says.
        let mut c = chooser(512);
        assert_eq!(c.observe(0, 50_000.0, 60_000), "low");
        assert_eq!(chooser(4000).current(), "high");
        assert_eq!(chooser(100).current(), "low", "the lowest if nothing fits");
    }

    #[test]
    fn steps_down_on_drops_and_up_only_after_a_clean_spell() {
        const U: i64 = UPGRADE_AFTER_MS;
        let mut c = chooser(0);
        assert_eq!(c.observe(0, 5000.0, 1_000), "high");
        assert_eq!(c.observe(2, 0.0, 2_000), "low");
        // Plenty of rate, but not clean for long enough yet.
        assert_eq!(c.observe(0, 5000.0, 2_000 + U - 1), "low");
        assert_eq!(c.observe(0, 5000.0, 2_000 + U), "high");
        // A measured rate below the current rendition steps down too.
        assert_eq!(c.observe(0, 900.0, 3_000 + U), "low");
        // Clean, but without room for the high one: stays.
        assert_eq!(c.observe(0, 1600.0, 10 * U), "low");
    }

    #[test]
    fn a_step_up_the_link_cannot_carry_is_tried_again_later_and_later() {
        const U: i64 = UPGRADE_AFTER_MS;
        let mut c = chooser(0);
        assert_eq!(c.observe(1, 0.0, 0), "low");
        // A clean spell, and an estimate with room (it cannot see the room there really is).
        assert_eq!(c.observe(0, 5000.0, U), "high");
        assert_eq!(c.observe(1, 0.0, U + 2_000), "low", "the probe failed");
        // The next try after twice the spell.
        let t = U + 2_000;
        assert_eq!(c.observe(0, 5000.0, t + 2 * U - 1), "low");
        assert_eq!(c.observe(0, 5000.0, t + 2 * U), "high");
        let t = t + 2 * U + 1_000;
        assert_eq!(c.observe(1, 0.0, t), "low");
        assert_eq!(c.observe(0, 5000.0, t + 4 * U - 1), "low");
        assert_eq!(c.observe(0, 5000.0, t + 4 * U), "high");
        // A step up that holds longer than its wait is no failed probe.
        assert_eq!(c.observe(1, 0.0, t + 4 * U + 5 * U), "low");
        assert_eq!(c.upgrade_after_ms, (4 * U).min(UPGRADE_AFTER_MAX_MS));
    }

    #[test]
    fn renditions_that_come_later_are_chosen_from() {
        // Only the high one here yet (a cascade brings them one by one).
        let mut c = RenditionChooser::new(vec![("high".into(), 1500)], 0, 0);
        assert_eq!(c.observe(1, 0.0, 1_000), "high", "nothing lower to go to");
        c.offer(vec![("low".into(), 300), ("high".into(), 1500)]);
        assert_eq!(c.current(), "high", "kept while it is there");
        assert_eq!(c.observe(1, 0.0, 2_000), "low");
        // The current one goes away: the nearest below it.
        c.offer(vec![("high".into(), 1500)]);
        assert_eq!(c.current(), "high", "nothing below: the lowest there is");
        c.offer(vec![
            ("mid".into(), 800),
            ("high".into(), 1500),
            ("low".into(), 300),
        ]);
        assert_eq!(c.current(), "high");
        assert_eq!(c.observe(1, 0.0, 3_000), "mid");
        c.offer(vec![("high".into(), 1500), ("low".into(), 300)]);
        assert_eq!(c.current(), "low");
    }

    #[test]
    fn only_the_chair_and_the_floor_holder_publish() {
        let mut f = FloorState {
            chair: "ministry".into(),
            holder: None,
        };
        assert!(f.may_publish("ministry"));
        assert!(!f.may_publish("gd-001"));
        f.holder = Some("gd-001".into());
        assert!(f.may_publish("gd-001"));
        assert!(!f.may_publish("gd-002"));
    }
}

/// Properties of a subscriber's queue: whatever groups are in flight, only the oldest are
/// reset, never one newer than the group starting, and no more than the budget stays.
#[cfg(test)]
mod properties {
    use proptest::collection::hash_set;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn only_the_oldest_groups_are_dropped(
            in_flight in hash_set(0u64..64, 0..12),
            new in 0u64..70,
            extra in 0usize..9,
        ) {
            let listed: Vec<u64> = in_flight.iter().copied().collect();
            let dropped = groups_to_drop(&listed, new, extra);
            let mut older: Vec<u64> = listed.iter().copied().filter(|g| *g < new).collect();
            older.sort_unstable();
            prop_assert!(dropped.iter().all(|g| in_flight.contains(g) && *g < new));
            // The oldest ones, in order: every group dropped is older than every group kept.
            prop_assert_eq!(&older[..dropped.len()], &dropped[..]);
            let kept = older.len() - dropped.len();
            prop_assert_eq!(kept, older.len().min(MAX_GROUPS_IN_FLIGHT + extra - 1));
        }

        #[test]
        fn a_longer_round_trip_never_allows_fewer_groups(
            rtt_a in 0u64..2_000,
            rtt_b in 0u64..2_000,
            spacing in proptest::option::of(0u64..5_000),
        ) {
            let ms = Duration::from_millis;
            let (lo, hi) = (rtt_a.min(rtt_b), rtt_a.max(rtt_b));
            let s = spacing.map(ms);
            prop_assert!(extra_in_flight(ms(lo), s) <= extra_in_flight(ms(hi), s));
            prop_assert!(extra_in_flight(ms(hi), s) <= 8);
        }
    }
}
