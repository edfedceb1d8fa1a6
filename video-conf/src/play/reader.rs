//! One track's reader: its groups in order into the sink's channel, late frames waited for,
//! late sound concealed.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tracing::debug;

use super::{Budget, CONCEAL_MAX, Overdue, next_wait};
use crate::conference_wire::Object;
use crate::track::Track;

/// What one track's reader counted.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TrackCounts {
    pub(super) skipped: u64,
    pub(super) concealed: u64,
}

/// One track's reader: its groups in order into the sink's channel.
pub(super) struct Reader {
    pub(super) index: usize,
    pub(super) tx: std::sync::mpsc::SyncSender<(usize, Object, i64)>,
    pub(super) min_age: Arc<AtomicI64>,
    pub(super) budget: Budget,
    /// When the last object passed on is to be played (µs; 0: at once).
    pub(super) last_at: i64,
    pub(super) audio: bool,
    /// The publisher's wall clock at media time 0 (µs; 0: unknown).
    pub(super) clock: i64,
    /// The last frame passed on (a concealment repeats it).
    pub(super) last: Option<Object>,
    /// The frame interval seen (µs; 0: not yet).
    pub(super) interval_us: i64,
    pub(super) concealed_run: u32,
    pub(super) counts: TrackCounts,
}

impl Reader {
    /// Passes `o` on, unless it is not after the last one by half a frame (a frame concealed
    /// in its place meanwhile, whose time may differ by a rounding). False once the sink is
    /// gone.
    async fn pass(&mut self, o: Object) -> bool {
        if let Some(l) = &self.last {
            if o.pts_us <= l.pts_us + self.interval_us / 2 {
                return true;
            }
            let step = o.pts_us - l.pts_us;
            if self.interval_us == 0 || step < self.interval_us {
                self.interval_us = step;
            }
        }
        self.last = Some(o.clone());
        // Played at its time: capture, the path's delay, the cushion (the sink waits).
        let min = self.min_age.load(Ordering::Relaxed);
        // Never before the track's previous one (the youngest age can fall meanwhile): a
        // track's frames are written in their order.
        let at = if self.clock != 0 && min != i64::MAX {
            (self.clock + o.pts_us + min + self.budget.cushion().as_micros() as i64)
                .max(self.last_at)
        } else {
            self.last_at
        };
        self.last_at = at;
        let (tx, i) = (self.tx.clone(), self.index);
        !tokio::task::spawn_blocking(move || tx.send((i, o, at)))
            .await
            .map_or(true, |r| r.is_err())
    }

    pub(super) async fn run(&mut self, t: &Track, stop: &tokio_util::sync::CancellationToken) {
        let (min_age, budget) = (self.min_age.clone(), self.budget.clone());
        let kind = t.info.kind.as_str();
        let mut rx = t.subscribe();
        let mut last_seq = 0u64;
        let mut epoch = budget.path_epoch();
        // A group missing in the sequence may still come (its first packet lost): waited for
        // as long as the cushion, so its frames can still be played on time.
        while let Some(g) =
            crate::track::next_in_order(t, &mut rx, last_seq, stop, budget.cushion()).await
        {
            if last_seq != 0 && g.seq > last_seq + 1 {
                self.counts.skipped += g.seq - last_seq - 1;
                debug!(
                    kind,
                    from = last_seq + 1,
                    to = g.seq - 1,
                    "Groups never seen: dropped on the way."
                );
            }
            last_seq = g.seq;
            let mut n = 0;
            loop {
                let min = min_age.load(Ordering::Relaxed);
                let allowance = budget.allowance().as_micros() as i64;
                let cushion = budget.cushion().as_micros() as i64;
                // The next frame is due when the one after the last played is as old as the
                // youngest arrival plus the allowance (video), or two frames after its time
                // to play (audio: then it is concealed).
                let due = match &self.last {
                    Some(l) if self.clock != 0 && min != i64::MAX && self.interval_us > 0 => {
                        let next = self.clock + l.pts_us + self.interval_us + min;
                        Some(if self.audio {
                            next + cushion.max(budget.jitter_us()) + 2 * self.interval_us
                        } else {
                            next + allowance
                        })
                    }
                    _ => None,
                };
                let newer_known = t.current().is_some_and(|c| c.seq > g.seq);
                rx.borrow_and_update();
                let conceal = self.audio && self.last.is_some() && self.concealed_run < CONCEAL_MAX;
                // The frames come over another path now (a dual-homed site's failover) and a
                // newer group has begun there: the rest of this one will not come (the relay
                // started the new path at a newer group): go on at once.
                let (wait, overdue) = if newer_known && budget.path_epoch() != epoch {
                    (std::time::Duration::ZERO, Overdue::GiveUp)
                } else {
                    next_wait(conceal, newer_known, due, allowance, crate::now_us())
                };
                // A newer group arriving while this one waits: look again.
                let mut newer = rx.clone();
                let fetched = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = newer.changed(), if !newer_known => continue,
                    f = tokio::time::timeout(wait, g.next_from(n)) => f,
                };
                let objs = match fetched {
                    Ok(crate::track::Fetch::Objects(objs)) => objs,
                    Ok(crate::track::Fetch::End) => break,
                    Ok(crate::track::Fetch::Aborted) => {
                        self.counts.skipped += 1;
                        debug!(
                            kind,
                            group = g.seq,
                            played = n,
                            "Group given up: reset on the way."
                        );
                        break;
                    }
                    Err(_) if overdue == Overdue::Conceal => {
                        let Some(l) = &self.last else { continue };
                        let o = Object {
                            pts_us: l.pts_us + self.interval_us,
                            ..l.clone()
                        };
                        self.concealed_run += 1;
                        self.counts.concealed += 1;
                        if !self.pass(o).await {
                            return;
                        }
                        continue;
                    }
                    Err(_) => {
                        self.counts.skipped += 1;
                        debug!(
                            kind,
                            group = g.seq,
                            played = n,
                            waited_ms = wait.as_millis() as u64,
                            "Group given up: its next frame is a whole allowance overdue and a newer group has begun."
                        );
                        break;
                    }
                };
                n += objs.len();
                self.concealed_run = 0;
                if budget.path_epoch() != epoch {
                    // Another path: its delay is learnt from the frames that come over it.
                    epoch = budget.path_epoch();
                    min_age.store(i64::MAX, Ordering::Relaxed);
                }
                if self.clock != 0 {
                    let now = crate::now_us();
                    for o in &objs {
                        let age = now - self.clock - o.pts_us;
                        let min = min_age.fetch_min(age, Ordering::Relaxed).min(age);
                        budget.arrived(age - min);
                    }
                }
                for o in objs {
                    if !self.pass(o).await {
                        return;
                    }
                }
            }
        }
    }
}
