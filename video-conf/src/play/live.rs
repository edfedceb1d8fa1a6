//! What a player shows, read while it plays (the relay's roster).

use std::time::Duration;

/// What a player has shown so far, read while it plays: a session reports it to its relay,
/// whose roster shows each viewer's frames shown, freezes and age (the NOC sees a struggling
/// county during the call).
#[derive(Debug, Default)]
pub struct Live {
    state: std::sync::Mutex<LiveState>,
}

#[derive(Debug, Default)]
struct LiveState {
    now: Watched,
    first_pts: Option<i64>,
    /// The latest frames' ages (ms), at most [`LIVE_AGES`].
    ages: std::collections::VecDeque<f64>,
}

/// Frames whose age [`Watched::age_p99_ms`] is taken over (10 s of 25 fps video).
pub const LIVE_AGES: usize = 250;

/// A player's video so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Watched {
    /// Video frames shown, and the frames the publisher sent over the same span (by the
    /// frame interval).
    pub shown: u64,
    pub expected: u64,
    pub freezes: u64,
    pub longest_freeze_ms: u32,
    /// 99th percentile of the latest frames' age, capture to shown (ms; -1: unknown).
    pub age_p99_ms: i32,
}

impl Live {
    pub fn watched(&self) -> Watched {
        let s = self.state.lock().expect("live lock poisoned");
        let mut w = s.now;
        w.age_p99_ms = if s.ages.is_empty() {
            -1
        } else {
            let mut v: Vec<f64> = s.ages.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * 0.99).round() as usize] as i32
        };
        w
    }

    pub(super) fn frame(
        &self,
        pts_us: i64,
        interval_us: i64,
        stall: Option<Duration>,
        age_ms: Option<f64>,
    ) {
        let mut s = self.state.lock().expect("live lock poisoned");
        let first = *s.first_pts.get_or_insert(pts_us);
        s.now.shown += 1;
        if interval_us > 0 {
            s.now.expected = ((pts_us - first) / interval_us) as u64 + 1;
        }
        s.now.expected = s.now.expected.max(s.now.shown);
        if let Some(d) = stall {
            s.now.freezes += 1;
            s.now.longest_freeze_ms = s.now.longest_freeze_ms.max(d.as_millis() as u32);
        }
        if let Some(a) = age_ms {
            if s.ages.len() == LIVE_AGES {
                s.ages.pop_front();
            }
            s.ages.push_back(a);
        }
    }
}
