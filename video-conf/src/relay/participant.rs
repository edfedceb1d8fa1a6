//! One participant's session: its control stream (announces, subscriptions, answers), the
//! group streams it publishes, and leaving.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::rooms::{HealthView, Member};
use super::{ANNOUNCE_WAIT, Relay, Room};
use crate::conference_wire::{
    self, Control, ErrorMsg, Floor, Role, TrackInfo, TrackKey, Tracks, codes,
};
use crate::forward;
use crate::io::{ControlReader, ControlWriter, IoError};
use crate::track::Track;

pub(super) struct Participant {
    pub(super) relay: Arc<Relay>,
    pub(super) conn: quinn::Connection,
    pub(super) site: String,
    pub(super) role: Role,
    pub(super) room: Arc<Room>,
    /// Tracks it publishes, by its id for them.
    pub(super) announced: Mutex<HashMap<u32, Arc<Track>>>,
    /// Bumped at each Announce.
    pub(super) announces: watch::Sender<u64>,
    /// Our ids for the room's tracks on this connection.
    pub(super) out_ids: Mutex<HashMap<TrackKey, u32>>,
    /// Its subscriptions: (publisher, kind, rendition) → stop. A site has one per publisher
    /// and kind (rendition empty: a new Subscribe replaces it); a cascading relay one per
    /// rendition, so that its own viewers can be given each.
    pub(super) subs: Mutex<HashMap<(String, String, String), CancellationToken>>,
    pub(super) link_kbps: u32,
    /// Which of a dual-homed site's paths this connection runs over (empty: its only one).
    pub(super) site_path: String,
    /// The participant's wish for repair datagrams ([`Hello::fec_rtt_ms`]).
    pub(super) fec: Arc<crate::fec::Wish>,
    /// Repair datagrams for the groups it sends, if this relay asks for them.
    pub(super) repair_router: Option<Arc<crate::fec::RepairRouter>>,
}

impl Participant {
    /// Updates this participant's roster entry.
    pub(super) fn member(&self, f: impl FnOnce(&mut Member)) {
        if let Some(m) = self
            .room
            .roster
            .lock()
            .expect("roster lock poisoned")
            .get_mut(&self.site)
        {
            f(m);
        }
    }

    pub(super) fn out_id(&self, key: &TrackKey) -> u32 {
        let mut ids = self.out_ids.lock().expect("ids lock poisoned");
        let n = ids.len() as u32 + 1;
        *ids.entry(key.clone()).or_insert(n)
    }

    fn track_list(&self) -> Tracks {
        let tracks = self.room.tracks.borrow().clone();
        Tracks {
            tracks: tracks
                .values()
                .map(|t| {
                    let mut info = TrackInfo {
                        id: self.out_id(&t.key()),
                        ..t.info.clone()
                    };
                    info.via.push(self.relay.name.clone());
                    info
                })
                .collect(),
        }
    }

    /// Sends queued control frames, and the room's track list and floor whenever they change.
    pub(super) async fn write_control(
        self: Arc<Self>,
        mut w: ControlWriter,
        mut rx: mpsc::Receiver<Control>,
        stop: CancellationToken,
    ) {
        let mut tracks = self.room.tracks.subscribe();
        let mut floor = self.room.floor.subscribe();
        let mut roll = self.room.roll.subscribe();
        // The current state at once: a roll call under way when this participant joined (or
        // made between its Welcome and this task's start) is put to it too.
        tracks.mark_changed();
        floor.mark_changed();
        roll.mark_changed();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
                r = tracks.changed() => {
                    if r.is_err() { return }
                    tracks.borrow_and_update();
                    Control::Tracks(self.track_list())
                }
                r = roll.changed() => {
                    if r.is_err() { return }
                    match roll.borrow_and_update().clone() {
                        Some(rc) => Control::RollCall(rc),
                        None => continue,
                    }
                }
                r = floor.changed() => {
                    if r.is_err() { return }
                    let f = floor.borrow_and_update().clone();
                    Control::Floor(Floor { holder: f.holder.unwrap_or_default() })
                }
            };
            if let Err(e) = w.send(&msg).await {
                debug!(error = %e, "Control stream closed.");
                stop.cancel();
                return;
            }
        }
    }

    pub(super) async fn read_control(
        self: &Arc<Self>,
        r: &mut ControlReader,
        tx: &mpsc::Sender<Control>,
        stop: &CancellationToken,
    ) -> Result<(), IoError> {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = r.recv() => m?,
            };
            let Some(msg) = msg else { return Ok(()) };
            match msg {
                Control::Announce(a) => {
                    let Some(info) = a.track else {
                        return Err(malformed("Announce without a track"));
                    };
                    // A site publishes as itself only, directly; a relay speaks for the sites
                    // below it, and names itself last in the track's path (issue 15, finding 5).
                    if let Err(why) = self.may_announce(&info) {
                        let _ = tx.try_send(Control::Error(ErrorMsg {
                            code: codes::FORBIDDEN,
                            message: why.clone(),
                        }));
                        // Let the Error frame go before the close.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        return Err(IoError::Refused {
                            code: codes::FORBIDDEN,
                            reason: why,
                        });
                    }
                    if info.via.iter().any(|v| v == &self.relay.name) {
                        warn!(track = %info.key(), via = ?info.via, "A track that already passed through this relay (a cascade loop) is ignored.");
                        continue;
                    }
                    let t = Track::new(info.clone());
                    self.announced
                        .lock()
                        .expect("announced lock poisoned")
                        .insert(info.id, t.clone());
                    self.member(|m| m.publishing.push(info.key().to_string()));
                    info!(track = %info.key(), "Track announced.");
                    self.room.add_track(t);
                    self.announces.send_modify(|n| *n += 1);
                }
                Control::Subscribe(s) => self.subscribe(s),
                Control::Unsubscribe(u) => {
                    self.subs
                        .lock()
                        .expect("subs lock poisoned")
                        .retain(|(p, k, _), stop| {
                            let gone = *p == u.publisher && *k == u.kind;
                            if gone {
                                stop.cancel();
                            }
                            !gone
                        });
                }
                Control::Present(p) => self.member(|m| m.present.push(p.id)),
                Control::Health(h) => self.member(|m| {
                    m.health.insert(
                        format!("{}/{}", h.publisher, h.kind),
                        HealthView::from_report(h),
                    );
                }),
                other => {
                    let msg = format!("unexpected {} from a participant", other.name());
                    let _ = tx.try_send(Control::Error(ErrorMsg {
                        code: codes::PROTOCOL,
                        message: msg.clone(),
                    }));
                    return Err(malformed(&msg));
                }
            }
        }
    }

    /// Whether this participant may announce `info`: a site only its own tracks, with no relay
    /// in their path; a relay (role checked against its certificate at admission) only tracks
    /// that came through it, itself last in `via`.
    fn may_announce(&self, info: &TrackInfo) -> Result<(), String> {
        match self.role {
            Role::Site if info.publisher != self.site => Err(format!(
                "site {} cannot publish as {}",
                self.site, info.publisher
            )),
            Role::Site if !info.via.is_empty() => Err(format!(
                "site {} announced a track through relays {:?}: a site publishes only its own \
                 tracks, directly",
                self.site, info.via
            )),
            Role::Relay if info.via.last() != Some(&self.site) => Err(format!(
                "relay {} announced {} with path {:?}: a relay announces only tracks from \
                 below it, itself last in their path",
                self.site,
                info.key(),
                info.via
            )),
            _ => Ok(()),
        }
    }

    /// The announced track with this id, waiting a little for its Announce.
    async fn announced_track(&self, id: u32) -> Option<Arc<Track>> {
        let mut rx = self.announces.subscribe();
        let wait = async {
            loop {
                if let Some(t) = self
                    .announced
                    .lock()
                    .expect("announced lock poisoned")
                    .get(&id)
                {
                    return t.clone();
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(ANNOUNCE_WAIT, wait).await.ok()
    }

    /// Takes the participant's group streams into its announced tracks.
    pub(super) async fn accept_groups(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let recv = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.conn.accept_uni() => match r { Ok(r) => r, Err(_) => { stop.cancel(); return } },
            };
            let p = self.clone();
            tokio::spawn(
                async move {
                    let mut recv = crate::fec::GroupRecv::new(recv, p.repair_router.as_ref());
                    let header = match crate::io::read_group_header(&mut recv).await {
                        Ok(h) => h,
                        Err(e) => {
                            p.relay.stats.bad_streams.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "Bad group stream (closed; the connection goes on).");
                            recv.stop(e.code());
                            return;
                        }
                    };
                    // A group stream may overtake its track's Announce on the control stream.
                    let track = p.announced_track(header.track).await;
                    let Some(track) = track else {
                        p.relay.stats.bad_streams.fetch_add(1, Ordering::Relaxed);
                        warn!(track = header.track, "Group for a track never announced (stream closed).");
                        recv.stop(codes::PROTOCOL);
                        return;
                    };
                    if p.role == Role::Site && !p.room.floor().may_publish(&p.site) {
                        p.relay.stats.groups_no_floor.fetch_add(1, Ordering::Relaxed);
                        recv.stop(codes::NO_FLOOR);
                        return;
                    }
                    p.relay.stats.groups_in.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = forward::receive_group(recv, header, &track).await {
                        if matches!(e, IoError::Wire(_)) {
                            p.relay.stats.bad_streams.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, track = %track.key(), "Malformed group (stream closed; the connection goes on).");
                        } else {
                            debug!(error = %e, "Group stream ended early.");
                        }
                    }
                }
                .in_current_span(),
            );
        }
    }

    pub(super) fn leave(&self) {
        for (_, s) in self.subs.lock().expect("subs lock poisoned").drain() {
            s.cancel();
        }
        for (_, t) in self
            .announced
            .lock()
            .expect("announced lock poisoned")
            .drain()
        {
            self.room.remove_track(&t);
        }
        {
            let mut roster = self.room.roster.lock().expect("roster lock poisoned");
            let gone = match roster.get_mut(&self.site) {
                Some(m) if !self.site_path.is_empty() => {
                    // A dual-homed site leaves when its last path does.
                    m.paths.retain(|p| *p != self.site_path);
                    if m.path == self.site_path {
                        m.path.clear();
                    }
                    m.paths.is_empty()
                }
                _ => true,
            };
            if gone {
                roster.remove(&self.site);
            }
        }
        info!(path = %self.site_path, "Participant left.");
    }
}

fn malformed(detail: &str) -> IoError {
    IoError::Wire(conference_wire::WireError::Malformed {
        what: "control frame",
        detail: detail.to_string(),
    })
}
