//! Tracks as a relay (or a publishing client) holds them: the current group, appended to as
//! objects arrive, shared by every subscriber without copying (objects are `Bytes`).
//!
//! A late joiner takes the track's current group and starts from its first object (the
//! keyframe); it never needs an older group. Old groups are dropped as soon as a newer one
//! starts and no subscriber is still writing them.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::conference_wire::{Object, TrackInfo, TrackKey};

/// One group: appended by its producer, read by any number of subscribers.
#[derive(Debug)]
pub struct Group {
    pub seq: u64,
    /// When it began here (its header arrived, or its producer started it).
    started: std::time::Instant,
    objects: Mutex<Vec<Object>>,
    /// (objects so far, end)
    state: watch::Sender<(usize, End)>,
    /// Its repair blocks, cut once for every subscriber that wants repair.
    repair: Mutex<crate::fec::GroupBlocks>,
}

/// How far a group is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Open,
    /// All its objects are here.
    Complete,
    /// Cut short (its incoming stream was reset or broke): forward it as dropped, not as
    /// complete.
    Aborted,
}

/// What [`Group::next_from`] found.
#[derive(Debug)]
pub enum Fetch {
    Objects(Vec<Object>),
    End,
    Aborted,
}

impl Group {
    pub fn new(seq: u64) -> Arc<Group> {
        Arc::new(Group {
            seq,
            started: std::time::Instant::now(),
            objects: Mutex::new(Vec::new()),
            state: watch::channel((0, End::Open)).0,
            repair: Default::default(),
        })
    }

    /// Appends an object; ignored once the group has ended.
    pub fn push(&self, o: Object) {
        let mut v = self.objects.lock().expect("group lock poisoned");
        if self.state.borrow().1 != End::Open {
            return;
        }
        v.push(o);
        let n = v.len();
        drop(v);
        self.state.send_replace((n, End::Open));
    }

    /// No more objects (the publisher moved to the next group, or its stream ended).
    pub fn finish(&self) {
        self.end(End::Complete);
    }

    /// Cut short: readers forward it as dropped.
    pub fn abort(&self) {
        self.end(End::Aborted);
    }

    fn end(&self, how: End) {
        let n = self.objects.lock().expect("group lock poisoned").len();
        self.state.send_if_modified(|s| {
            if s.1 == End::Open {
                *s = (n, how);
                true
            } else {
                false
            }
        });
    }

    pub fn is_complete(&self) -> bool {
        self.state.borrow().1 == End::Complete
    }

    pub fn ended(&self) -> bool {
        self.state.borrow().1 != End::Open
    }

    pub fn len(&self) -> usize {
        self.state.borrow().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Objects from index `from` on, waiting for at least one unless the group has ended.
    pub async fn next_from(&self, from: usize) -> Fetch {
        let mut rx = self.state.subscribe();
        loop {
            let (n, end) = *rx.borrow_and_update();
            if end == End::Aborted {
                return Fetch::Aborted;
            }
            if n > from {
                let v = self.objects.lock().expect("group lock poisoned");
                return Fetch::Objects(v[from..].to_vec());
            }
            if end == End::Complete || rx.changed().await.is_err() {
                return Fetch::End;
            }
        }
    }

    /// How old its first object is: by the publisher's clock (`clock_us`, its wall clock at
    /// media time 0; 0: unknown) when that says older, else since the group began here (a
    /// relay that just joined a cascade receives an old group as new). A clock that runs
    /// ahead of ours makes a group look older, never younger than it began here.
    pub fn age(&self, clock_us: i64) -> std::time::Duration {
        let here = self.started.elapsed();
        let first = self
            .objects
            .lock()
            .expect("group lock poisoned")
            .first()
            .map(|o| o.pts_us);
        match first {
            Some(pts) if clock_us != 0 => {
                let us = (crate::now_us() - clock_us - pts).clamp(0, 60_000_000) as u64;
                here.max(std::time::Duration::from_micros(us))
            }
            _ => here,
        }
    }

    /// Its repair blocks closed so far ([`crate::fec::GroupBlocks`]: cut from its objects
    /// once, whoever asks first), with `eps` the odds of failure its kind accepts; and when
    /// the open block is due to close.
    pub fn repair_blocks(
        &self,
        eps: f64,
    ) -> (Vec<Arc<crate::fec::Block>>, Option<std::time::Instant>) {
        let objs = self.objects.lock().expect("group lock poisoned");
        let ended = self.state.borrow().1 == End::Complete;
        let mut r = self.repair.lock().expect("repair lock poisoned");
        let blocks = r.advance(&objs, ended, eps);
        (blocks, r.deadline())
    }

    /// Bytes of payload so far.
    pub fn payload_bytes(&self) -> usize {
        self.objects
            .lock()
            .expect("group lock poisoned")
            .iter()
            .map(|o| o.payload.len())
            .sum()
    }
}

/// Follows a track's current group ([`Track::subscribe`]).
pub type GroupWatch = watch::Receiver<Option<Arc<Group>>>;

/// Groups a track holds besides its current one, for readers that follow it in order (a
/// player, a copy): a group whose start was delayed behind a newer one's (its first packet
/// lost) is still played in its turn.
pub const RECENT_GROUPS: usize = 4;

/// A track: its description, its current group and the few before it.
#[derive(Debug)]
pub struct Track {
    pub info: TrackInfo,
    latest: watch::Sender<Option<Arc<Group>>>,
    /// The newest [`RECENT_GROUPS`] groups, by sequence.
    recent: Mutex<std::collections::BTreeMap<u64, Arc<Group>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Track {
    pub fn new(info: TrackInfo) -> Arc<Track> {
        Arc::new(Track {
            info,
            latest: watch::channel(None).0,
            recent: Default::default(),
            closed: Default::default(),
        })
    }

    /// Ended by [`Track::close`] (a track with no group yet is not closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn key(&self) -> TrackKey {
        self.info.key()
    }

    /// Starts a new group and makes it the current one. The previous group stays open for
    /// its producer to finish (a relay may still be receiving its tail).
    pub fn start_group(&self, seq: u64) -> Arc<Group> {
        let g = Group::new(seq);
        self.hold(&g);
        self.latest.send_replace(Some(g.clone()));
        g
    }

    fn hold(&self, g: &Arc<Group>) {
        let mut r = self.recent.lock().expect("recent lock poisoned");
        r.insert(g.seq, g.clone());
        while r.len() > RECENT_GROUPS {
            r.pop_first();
        }
    }

    /// A group older than the current one whose start arrived late: held for in-order
    /// readers (who are woken), if it is newer than the oldest held and not already there.
    /// The current group stays what it is.
    pub fn late_group(&self, seq: u64) -> Option<Arc<Group>> {
        {
            let r = self.recent.lock().expect("recent lock poisoned");
            let oldest = r.keys().next().copied()?;
            if seq <= oldest || r.contains_key(&seq) {
                return None;
            }
        }
        let g = Group::new(seq);
        self.hold(&g);
        self.latest.send_modify(|_| {});
        Some(g)
    }

    /// The groups held, oldest first.
    pub fn recent_groups(&self) -> Vec<Arc<Group>> {
        self.recent
            .lock()
            .expect("recent lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// The oldest group held that is newer than `seq`.
    pub fn group_after(&self, seq: u64) -> Option<Arc<Group>> {
        self.recent
            .lock()
            .expect("recent lock poisoned")
            .range(seq + 1..)
            .next()
            .map(|(_, g)| g.clone())
    }

    /// The current group, if any.
    pub fn current(&self) -> Option<Arc<Group>> {
        self.latest.borrow().clone()
    }

    /// Follows the track's groups: yields the current one at once, then each new one.
    pub fn subscribe(&self) -> GroupWatch {
        let mut rx = self.latest.subscribe();
        rx.mark_changed();
        rx
    }

    /// The publisher is gone: the current group ends and subscribers see `None`.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.recent.lock().expect("recent lock poisoned").clear();
        if let Some(old) = self.latest.send_replace(None) {
            old.finish();
        }
    }

    pub fn subscribers(&self) -> usize {
        self.latest.receiver_count()
    }
}

/// The group to read after group `last` (0: none yet) of `track`, in order: the next one
/// held (a missing one before it waited for `grace`), else the next to start; the current
/// one for a reader's first. `None` once the track has closed or `stop` fires.
pub async fn next_in_order(
    track: &Track,
    rx: &mut GroupWatch,
    last: u64,
    stop: &tokio_util::sync::CancellationToken,
    grace: std::time::Duration,
) -> Option<Arc<Group>> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if last != 0
            && let Some(g) = track.group_after(last)
        {
            // A group missing before it may still come (its start's packet was lost):
            // waited for until `grace` has passed.
            if g.seq > last + 1 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    r = rx.changed() => if r.is_err() { return Some(g) },
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            }
            rx.borrow_and_update();
            return Some(g);
        }
        let g = next_group(track, rx, stop).await?;
        if last == 0 || g.seq > last {
            // Another may have been held meanwhile, older than this one: that one first.
            if last != 0
                && let Some(h) = track.group_after(last)
                && h.seq < g.seq
            {
                return Some(h);
            }
            return Some(g);
        }
    }
}

/// The next group of `track` as `rx` follows it; `None` once the track has closed or `stop`
/// fires.
pub async fn next_group(
    track: &Track,
    rx: &mut GroupWatch,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<Arc<Group>> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = rx.changed() => if r.is_err() { return None },
        }
        match rx.borrow_and_update().clone() {
            Some(g) => return Some(g),
            None if track.is_closed() => return None,
            None => continue,
        }
    }
}

/// How [`copy_groups`] numbers the groups it copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    /// The source's sequence numbers; a group not newer than the target's current one is
    /// skipped (the same publisher's track, arriving again by another way).
    Same,
    /// Each group after the target's current one (another publisher's track spliced in),
    /// starting from the source's next group: the target never shows half a group.
    Next,
}

/// Copies every group of `from` into `to`, objects as they arrive and passed through `map`,
/// until `from` closes or `stop` fires (a group being copied then ends where it is). Each
/// group is copied by a task of its own: a group's tail may still be arriving when the next
/// begins.
pub async fn copy_groups(
    from: Arc<Track>,
    to: Arc<Track>,
    stop: tokio_util::sync::CancellationToken,
    numbering: Numbering,
    map: impl Fn(Object) -> Object + Clone + Send + 'static,
) {
    let mut rx = from.subscribe();
    if numbering == Numbering::Next {
        rx.borrow_and_update();
    }
    // Same numbering: every group `from` holds is copied once, in its place, a group whose
    // start arrived late too (sequences copied, the latest few).
    let mut copied = std::collections::BTreeSet::new();
    let mut todo: std::collections::VecDeque<Arc<Group>> = Default::default();
    loop {
        if todo.is_empty() {
            let Some(g) = next_group(&from, &mut rx, &stop).await else {
                break;
            };
            match numbering {
                Numbering::Same => {
                    let floor = copied.first().copied().unwrap_or(0);
                    todo.extend(
                        from.recent_groups()
                            .into_iter()
                            .filter(|h| !copied.contains(&h.seq) && h.seq > floor),
                    );
                }
                Numbering::Next => todo.push_back(g),
            }
            continue;
        }
        let Some(g) = todo.pop_front() else { continue };
        let current = to.current().map(|c| c.seq);
        let out = match numbering {
            Numbering::Same => {
                copied.insert(g.seq);
                while copied.len() > 2 * RECENT_GROUPS {
                    copied.pop_first();
                }
                if current.is_some_and(|c| c >= g.seq) {
                    let Some(out) = to.late_group(g.seq) else {
                        continue;
                    };
                    out
                } else {
                    to.start_group(g.seq)
                }
            }
            Numbering::Next => to.start_group(current.map_or(1, |c| c + 1)),
        };
        let (stop, map) = (stop.clone(), map.clone());
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let f = tokio::select! {
                    _ = stop.cancelled() => return out.finish(),
                    f = g.next_from(n) => f,
                };
                match f {
                    Fetch::Objects(objs) => {
                        n += objs.len();
                        for o in objs {
                            out.push(map(o));
                        }
                    }
                    Fetch::End => return out.finish(),
                    Fetch::Aborted => return out.abort(),
                }
            }
        });
    }
}

/// A player's track fed by each new session's received track in turn (after a reconnection):
/// the same groups, as they arrive, until `stop`.
pub async fn bridge(from: Arc<Track>, to: Arc<Track>, stop: tokio_util::sync::CancellationToken) {
    copy_groups(from, to, stop, Numbering::Same, |o| o).await;
}

/// [`bridge`] for a failover between a dual-homed site's paths: a group `to` holds already
/// (its start came over the other path) goes on from the object after the last one it holds
/// (the same rendition: [`crate::client::Session::subscribe_failover`]), instead of being
/// skipped; a group `to` has whole is skipped. When `stop` fires the groups being copied are
/// left open, for the next bridge to go on with.
pub async fn bridge_resuming(
    from: Arc<Track>,
    to: Arc<Track>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut rx = from.subscribe();
    let mut copied = std::collections::BTreeSet::new();
    let mut todo: std::collections::VecDeque<Arc<Group>> = Default::default();
    loop {
        if todo.is_empty() {
            if next_group(&from, &mut rx, &stop).await.is_none() {
                break;
            }
            let floor = copied.first().copied().unwrap_or(0);
            todo.extend(
                from.recent_groups()
                    .into_iter()
                    .filter(|h| !copied.contains(&h.seq) && h.seq > floor),
            );
            continue;
        }
        let Some(g) = todo.pop_front() else { continue };
        copied.insert(g.seq);
        while copied.len() > 2 * RECENT_GROUPS {
            copied.pop_first();
        }
        let held = to.recent_groups().into_iter().find(|h| h.seq == g.seq);
        let (out, skip) = match held {
            Some(h) if h.ended() => continue,
            Some(h) => {
                let n = h.len();
                (h, n)
            }
            None => {
                if to.current().is_some_and(|c| c.seq >= g.seq) {
                    let Some(out) = to.late_group(g.seq) else {
                        continue;
                    };
                    (out, 0)
                } else {
                    (to.start_group(g.seq), 0)
                }
            }
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = skip;
            loop {
                let f = tokio::select! {
                    // Left open: the bridge from the other path may go on with it.
                    _ = stop.cancelled() => return,
                    f = g.next_from(n) => f,
                };
                match f {
                    Fetch::Objects(objs) => {
                        n += objs.len();
                        for o in objs {
                            out.push(o);
                        }
                    }
                    Fetch::End => return out.finish(),
                    Fetch::Aborted => return out.abort(),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn obj(n: u8, key: bool) -> Object {
        Object {
            pts_us: i64::from(n) * 40_000,
            flags: if key {
                crate::conference_wire::flags::KEY
            } else {
                0
            },
            payload: Bytes::from(vec![n; 10]),
        }
    }

    #[tokio::test]
    async fn a_late_joiner_starts_at_the_current_groups_keyframe() {
        let t = Track::new(TrackInfo::default());
        let g1 = t.start_group(1);
        for i in 0..5 {
            g1.push(obj(i, i == 0));
        }
        g1.finish();
        let g2 = t.start_group(2);
        assert!(g1.is_complete());
        g2.push(obj(10, true));
        g2.push(obj(11, false));
        // Joins now: gets group 2 from its keyframe, nothing of group 1.
        let mut rx = t.subscribe();
        rx.changed().await.unwrap();
        let g = rx.borrow_and_update().clone().unwrap();
        assert_eq!(g.seq, 2);
        let Fetch::Objects(objs) = g.next_from(0).await else {
            panic!("objects expected")
        };
        assert!(objs[0].is_key());
        assert_eq!(objs.len(), 2);
        // And then the rest of it as it comes.
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.next_from(2).await })
        };
        g2.push(obj(12, false));
        let Fetch::Objects(more) = waiter.await.unwrap() else {
            panic!("objects expected")
        };
        assert_eq!(more[0].payload[0], 12);
        g2.finish();
        assert!(matches!(g.next_from(3).await, Fetch::End));
        // An aborted group reads as aborted, even where objects remain.
        let g3 = t.start_group(3);
        g3.push(obj(20, true));
        g3.abort();
        g3.finish();
        assert!(matches!(g3.next_from(0).await, Fetch::Aborted));
    }

    #[tokio::test]
    async fn subscribers_see_each_new_group_and_the_end() {
        let t = Track::new(TrackInfo::default());
        let mut rx = t.subscribe();
        t.start_group(1);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().seq, 1);
        t.start_group(2);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().seq, 2);
        t.close();
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().is_none());
    }

    #[tokio::test]
    async fn a_failover_bridge_goes_on_with_the_group_the_other_path_began() {
        let out = Track::new(TrackInfo::default());
        // Over the ground path: group 5, three frames, then the line is cut.
        let ground = Track::new(TrackInfo::default());
        let stop_ground = tokio_util::sync::CancellationToken::new();
        tokio::spawn(bridge_resuming(
            ground.clone(),
            out.clone(),
            stop_ground.clone(),
        ));
        let g = ground.start_group(5);
        for i in 0..3 {
            g.push(obj(i, i == 0));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stop_ground.cancel();
        let held = out.current().unwrap();
        assert_eq!(
            (held.seq, held.len(), held.ended()),
            (5, 3, false),
            "left open"
        );
        // Over the sky path: group 5 again from its keyframe, then group 6.
        let sky = Track::new(TrackInfo::default());
        let g = sky.start_group(5);
        tokio::spawn(bridge_resuming(
            sky.clone(),
            out.clone(),
            Default::default(),
        ));
        for i in 0..6 {
            g.push(obj(i, i == 0));
        }
        g.finish();
        let g6 = sky.start_group(6);
        g6.push(obj(10, true));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let five = out
            .recent_groups()
            .into_iter()
            .find(|h| h.seq == 5)
            .unwrap();
        assert!(five.is_complete());
        let Fetch::Objects(objs) = five.next_from(0).await else {
            panic!("objects")
        };
        let n: Vec<u8> = objs.iter().map(|o| o.payload[0]).collect();
        assert_eq!(n, vec![0, 1, 2, 3, 4, 5], "each frame once, in order");
        assert_eq!(out.current().unwrap().seq, 6);
    }
}
