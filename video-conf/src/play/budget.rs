//! How late a player lets a frame be: the cushion (a jitter buffer) and the allowance, and
//! what it does when a frame has not come.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How long a player waits at least for the rest of a group once a newer one has begun
/// (when the publisher's clock is unknown; with it, as long as [`Budget`] allows).
pub const TAIL_GRACE: Duration = Duration::from_millis(300);

/// The least allowance a path gets (a LAN: a frame's interval and the host's scheduling).
pub const ALLOWANCE_FLOOR: Duration = Duration::from_millis(150);
/// The allowance until a path's round trip is known.
pub const ALLOWANCE_START: Duration = Duration::from_millis(1000);
/// Audio frames in a row a player conceals (repeats the last one for) while the real ones
/// are late: ~200 ms of AAC. Longer, and the sound pauses instead of buzzing.
pub const CONCEAL_MAX: u32 = 10;

/// A path's allowance: a lost packet repaired by retransmission arrives ~1.5 round trips
/// after the original would have (the loss shows when later packets are acknowledged, then
/// the copy travels), plus the path's jitter. A GEO viewer (600 ms) gets ~1 s, a LAN viewer
/// the floor.
pub fn path_allowance(rtt: Duration, jitter: Duration) -> Duration {
    (rtt.mul_f64(1.5) + jitter).max(ALLOWANCE_FLOOR)
}

/// How late a player lets a frame be, measured from the youngest age frames arrive with
/// (that age is the path's delay plus any offset between the publisher's clock and ours):
///
/// - the *cushion*: frames are played at their capture time plus that age plus the cushion
///   (a jitter buffer), so that a frame held up by the path's jitter or by a loss that repair
///   datagrams rebuild (up to a block's time, [`crate::fec::BLOCK_MAX_AGE`]) is still on time:
///   the picture does not stutter. An audio frame not here a little after its time is
///   concealed (the last one repeated).
/// - the *allowance*: a video frame later than the cushion holds the picture until it comes
///   (then the frames behind it follow at once: the picture catches up), and is given up
///   with the rest of its group only when a newer group has begun and it is a whole
///   allowance past the allowance.
///
/// The allowance is fixed (`--latency-ms`, a relay's recording) or follows the path
/// ([`path_allowance`] of the session's round trip, [`Budget::follow`], and the jitter frames
/// arrive with); the cushion follows the jitter and whether repairs come, within the
/// allowance (0 until [`Budget::follow`] is called: a recording writes as frames come).
#[derive(Clone, Debug)]
pub struct Budget {
    follows: bool,
    allowance_us: Arc<AtomicI64>,
    cushion_us: Arc<AtomicI64>,
    /// Mean spread of arrival ages over the youngest (µs, EWMA 1/16).
    spread_us: Arc<AtomicI64>,
    /// Bumped when the frames start coming over another path ([`Budget::rebase`]).
    path_epoch: Arc<std::sync::atomic::AtomicU64>,
}

/// What the cushion adds for repair: a block's time and a little for the repair datagrams to
/// follow their data.
pub const REPAIR_CUSHION: Duration =
    Duration::from_millis(crate::fec::BLOCK_MAX_AGE.as_millis() as u64 + 40);

impl Budget {
    pub fn fixed(allowance: Duration) -> Budget {
        Budget {
            follows: false,
            allowance_us: Arc::new(AtomicI64::new(allowance.as_micros() as i64)),
            cushion_us: Arc::default(),
            spread_us: Arc::default(),
            path_epoch: Arc::default(),
        }
    }

    pub fn cushion(&self) -> Duration {
        Duration::from_micros(self.cushion_us.load(Ordering::Relaxed).max(0) as u64)
    }

    /// Follows the path: [`ALLOWANCE_START`] until [`Budget::follow`] is told a round trip.
    pub fn path() -> Budget {
        Budget {
            follows: true,
            ..Budget::fixed(ALLOWANCE_START)
        }
    }

    /// The session's round trip now, and whether repair datagrams come with its groups (its
    /// owner calls this every second or so). A fixed budget keeps its allowance.
    pub fn follow(&self, rtt: Duration, repairs: bool) {
        let jitter = Duration::from_micros(self.jitter_us() as u64);
        if self.follows {
            let a = path_allowance(rtt, jitter);
            self.allowance_us
                .store(a.as_micros() as i64, Ordering::Relaxed);
        }
        let c = (jitter
            + if repairs {
                REPAIR_CUSHION
            } else {
                Duration::ZERO
            })
        .min(self.allowance());
        self.cushion_us
            .store(c.as_micros() as i64, Ordering::Relaxed);
    }

    /// The frames come over another path now (a dual-homed site's failover or switch-back):
    /// the players learn its delay afresh, instead of taking every frame of a longer path as
    /// late against the shorter one's.
    pub fn rebase(&self) {
        self.path_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Budget::rebase`] was called.
    pub(super) fn path_epoch(&self) -> u64 {
        self.path_epoch.load(Ordering::Relaxed)
    }

    /// Twice the mean spread of arrival ages (µs): how unevenly frames come.
    pub(super) fn jitter_us(&self) -> i64 {
        2 * self.spread_us.load(Ordering::Relaxed).max(0)
    }

    pub fn allowance(&self) -> Duration {
        Duration::from_micros(self.allowance_us.load(Ordering::Relaxed).max(0) as u64)
    }

    /// A frame arrived `spread` later than the youngest (clamped to 500 ms: a frame held
    /// behind a repaired loss is not the path's jitter).
    pub(super) fn arrived(&self, spread_us: i64) {
        let x = spread_us.clamp(0, 500_000);
        let _ = self
            .spread_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m + (x - m) / 16)
            });
    }
}

/// What a player does when a track's next frame has not come by the time it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    /// Plays the last audio frame again in its place, and goes on waiting for the next.
    Conceal,
    /// Gives up the rest of the group and goes on at the next.
    GiveUp,
}

/// How long a player waits for a track's next frame, and what then. `due_us`: when it is
/// due (None: the publisher's clock or the frame interval unknown yet); `newer`: a newer
/// group has begun; `conceal`: an audio track that may conceal one more frame.
pub fn next_wait(
    conceal: bool,
    newer: bool,
    due_us: Option<i64>,
    allowance_us: i64,
    now_us: i64,
) -> (Duration, Overdue) {
    let until = |t: i64| Duration::from_micros(u64::try_from(t - now_us).unwrap_or(0));
    match due_us {
        None if newer => (TAIL_GRACE, Overdue::GiveUp),
        None => (Duration::from_secs(3600), Overdue::GiveUp),
        Some(d) if conceal => (until(d), Overdue::Conceal),
        // Nothing newer to show: waiting costs nothing, the picture holds.
        Some(_) if !newer => (Duration::from_secs(3600), Overdue::GiveUp),
        Some(d) => (until(d + allowance_us).max(TAIL_GRACE), Overdue::GiveUp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_frame_is_waited_for_and_a_group_given_up_only_behind_a_newer_one() {
        let ms = |m: i64| m * 1000;
        let now = 10_000_000;
        let a = ms(1000);
        // Clock or interval unknown: the tail's grace once a newer group has begun.
        assert_eq!(
            next_wait(false, true, None, a, now),
            (TAIL_GRACE, Overdue::GiveUp)
        );
        assert_eq!(
            next_wait(false, false, None, a, now).0,
            Duration::from_secs(3600)
        );
        // Video, nothing newer: the picture holds as long as it takes.
        assert_eq!(
            next_wait(false, false, Some(now - 1), a, now).0,
            Duration::from_secs(3600)
        );
        // A newer group: waited for until a whole allowance past due.
        assert_eq!(
            next_wait(false, true, Some(now + ms(200)), a, now),
            (Duration::from_millis(1200), Overdue::GiveUp)
        );
        assert_eq!(
            next_wait(false, true, Some(now - ms(5000)), a, now).0,
            TAIL_GRACE
        );
        // Audio: concealed once due, newer group or not.
        assert_eq!(
            next_wait(true, true, Some(now + ms(30)), a, now),
            (Duration::from_millis(30), Overdue::Conceal)
        );
        assert_eq!(
            next_wait(true, false, Some(now - 1), a, now),
            (Duration::ZERO, Overdue::Conceal)
        );
    }

    #[test]
    fn the_allowance_follows_the_path() {
        let ms = Duration::from_millis;
        assert_eq!(path_allowance(ms(600), ms(40)), ms(940));
        assert_eq!(path_allowance(ms(2), ms(1)), ALLOWANCE_FLOOR);
        let b = Budget::path();
        assert_eq!(b.allowance(), ALLOWANCE_START);
        assert_eq!(b.cushion(), Duration::ZERO);
        b.follow(ms(600), true);
        assert_eq!(b.allowance(), ms(900));
        assert_eq!(b.cushion(), REPAIR_CUSHION, "a block's time for its repair");
        // Frames arriving 160 ms later than the youngest, again and again: that is jitter.
        for _ in 0..200 {
            b.arrived(160_000);
        }
        b.follow(ms(600), false);
        assert!(
            b.allowance() > ms(1200) && b.allowance() <= ms(1220),
            "{:?}",
            b.allowance()
        );
        assert!(
            b.cushion() > ms(300) && b.cushion() <= ms(320),
            "{:?}",
            b.cushion()
        );
        // A LAN: the floor, and a cushion within it.
        let lan = Budget::path();
        for _ in 0..200 {
            lan.arrived(400_000);
        }
        lan.follow(ms(1), false);
        assert!(lan.cushion() <= lan.allowance());
        // A fixed budget keeps its allowance; its cushion follows.
        let f = Budget::fixed(ms(2000));
        f.follow(ms(10), true);
        assert_eq!(f.allowance(), ms(2000));
        assert_eq!(f.cushion(), REPAIR_CUSHION);
    }
}
