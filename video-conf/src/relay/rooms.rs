//! A conference room: its floor, roll call, roster of participants and published tracks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::recording::Recording;
use crate::conference_wire::{self, TrackKey};
use crate::policy::FloorState;
use crate::track::Track;

/// One participant as the room's roster shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Member {
    pub site: String,
    pub role: String,
    pub publishing: Vec<String>,
    /// Per subscribed track: what the participant says it receives.
    pub health: BTreeMap<String, HealthView>,
    /// Roll calls it answered.
    pub present: Vec<u64>,
    /// A dual-homed site's paths connected here (its standby's too), and the one its
    /// subscriptions run over now (empty for a site with one path).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthView {
    pub rendition: String,
    pub kbps: u32,
    pub frames: u64,
    pub groups_lost: u64,
    pub latency_ms: i32,
    /// What its player shows (video; absent when it does not play the track): frames shown
    /// of those sent (%), freezes, the longest (ms), the latest frames' age p99 (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shown_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freezes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_freeze_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_p99_ms: Option<i32>,
}

impl HealthView {
    pub fn from_report(h: conference_wire::Health) -> HealthView {
        let playing = h.shown > 0;
        HealthView {
            rendition: h.rendition,
            kbps: h.kbps,
            frames: h.frames,
            groups_lost: h.groups_lost,
            latency_ms: h.latency_ms,
            shown_pct: playing
                .then(|| (1000.0 * h.shown as f64 / h.expected.max(h.shown) as f64).round() / 10.0),
            freezes: playing.then_some(h.freezes),
            longest_freeze_ms: playing.then_some(h.longest_freeze_ms),
            age_p99_ms: playing.then_some(h.age_p99_ms),
        }
    }
}

pub struct Room {
    pub name: String,
    pub(super) floor: watch::Sender<FloorState>,
    pub(super) tracks: watch::Sender<BTreeMap<TrackKey, Arc<Track>>>,
    pub(super) roster: Mutex<BTreeMap<String, Member>>,
    /// Its upstream session is running (a cascading relay's).
    pub(super) cascading: std::sync::atomic::AtomicBool,
    /// The latest roll call (participants are asked when it changes).
    pub(super) roll: watch::Sender<Option<conference_wire::RollCall>>,
    /// Fires when the conference ends: every participant is disconnected.
    pub(super) ended: CancellationToken,
    pub(super) recording: tokio::sync::Mutex<Option<Recording>>,
}

impl Room {
    pub(super) fn new(name: &str, chair: &str) -> Arc<Room> {
        Arc::new(Room {
            name: name.into(),
            floor: watch::channel(FloorState {
                chair: chair.into(),
                holder: None,
            })
            .0,
            tracks: watch::channel(BTreeMap::new()).0,
            roster: Mutex::new(BTreeMap::new()),
            cascading: Default::default(),
            roll: watch::channel(None).0,
            ended: CancellationToken::new(),
            recording: tokio::sync::Mutex::new(None),
        })
    }

    pub fn floor(&self) -> FloorState {
        self.floor.borrow().clone()
    }

    /// Gives the floor to `holder` (None: back to the chair alone).
    pub fn set_floor(&self, holder: Option<String>) {
        self.floor.send_modify(|f| f.holder = holder);
    }

    /// Asks every participant to confirm presence by `deadline_ms` (Unix ms); returns the
    /// roll call's id. Answers land in each member's `present`.
    pub fn roll_call(&self, deadline_ms: i64) -> u64 {
        let id = self.roll.borrow().as_ref().map_or(1, |r| r.id + 1);
        self.roll
            .send_replace(Some(conference_wire::RollCall { id, deadline_ms }));
        id
    }

    /// The latest roll call: its id and deadline (Unix ms).
    pub fn current_roll_call(&self) -> Option<(u64, i64)> {
        self.roll.borrow().as_ref().map(|r| (r.id, r.deadline_ms))
    }

    /// Sites that answered roll call `id`.
    pub fn answered(&self, id: u64) -> Vec<String> {
        self.roster()
            .into_iter()
            .filter(|m| m.present.contains(&id))
            .map(|m| m.site)
            .collect()
    }

    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    pub fn track(&self, key: &TrackKey) -> Option<Arc<Track>> {
        self.tracks.borrow().get(key).cloned()
    }

    pub fn track_keys(&self) -> Vec<TrackKey> {
        self.tracks.borrow().keys().cloned().collect()
    }

    pub fn roster(&self) -> Vec<Member> {
        self.roster
            .lock()
            .expect("roster lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn add_track(&self, t: Arc<Track>) {
        let old = self
            .tracks
            .send_modify_ret(|m| m.insert(t.key(), t.clone()));
        if let Some(old) = old {
            old.close();
        }
    }

    pub(super) fn remove_track(&self, t: &Arc<Track>) {
        self.tracks.send_if_modified(|m| {
            if m.get(&t.key()).is_some_and(|x| Arc::ptr_eq(x, t)) {
                m.remove(&t.key());
                true
            } else {
                false
            }
        });
        t.close();
    }
}

trait SendModifyRet<T> {
    fn send_modify_ret<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

impl<T> SendModifyRet<T> for watch::Sender<T> {
    fn send_modify_ret<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut out = None;
        self.send_modify(|v| out = Some(f(v)));
        out.expect("send_modify runs its closure")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::conference_wire::TrackInfo;

    /// The roster shows what a viewer's player shows: frames shown of those sent, freezes,
    /// frame age; nothing of it for a track the participant does not play.
    #[test]
    fn a_viewers_report_shows_what_its_player_shows() {
        let report = |shown, expected| conference_wire::Health {
            publisher: "ministry".into(),
            kind: "video".into(),
            rendition: "high".into(),
            kbps: 1500,
            frames: 1400,
            groups_lost: 0,
            latency_ms: 380,
            shown,
            expected,
            freezes: 3,
            longest_freeze_ms: 240,
            age_p99_ms: 702,
        };
        let v = HealthView::from_report(report(1440, 1450));
        assert_eq!(v.shown_pct, Some(99.3));
        assert_eq!(
            (v.freezes, v.longest_freeze_ms, v.age_p99_ms),
            (Some(3), Some(240), Some(702))
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["shown_pct"], 99.3);
        // Not playing: the reception alone, no player figures.
        let v = HealthView::from_report(report(0, 0));
        assert_eq!(v.shown_pct, None);
        let json = serde_json::to_value(&v).unwrap();
        assert!(
            json.get("shown_pct").is_none() && json.get("freezes").is_none(),
            "{json}"
        );
        assert_eq!(json["latency_ms"], 380);
    }

    /// A track as a publisher announces it.
    pub(in crate::relay) fn track(
        publisher: &str,
        kind: &str,
        rendition: &str,
        kbps: u32,
    ) -> Arc<Track> {
        Track::new(TrackInfo {
            publisher: publisher.into(),
            kind: kind.into(),
            rendition: rendition.into(),
            bitrate_kbps: kbps,
            ..Default::default()
        })
    }

    fn join(room: &Room, site: &str) {
        room.roster.lock().unwrap().insert(
            site.into(),
            Member {
                site: site.into(),
                role: "site".into(),
                ..Default::default()
            },
        );
    }

    #[test]
    fn the_floor_goes_to_a_holder_and_back_to_the_chair() {
        let room = Room::new("drill", "ministry");
        let mut seen = room.floor.subscribe();
        assert_eq!(room.floor().chair, "ministry");
        assert_eq!(room.floor().holder, None);
        assert_eq!(room.floor().speaker(), "ministry");
        assert!(room.floor().may_publish("ministry"));
        assert!(!room.floor().may_publish("gd-001"));

        room.set_floor(Some("gd-001".into()));
        assert!(seen.has_changed().unwrap(), "participants are told");
        assert_eq!(seen.borrow_and_update().holder.as_deref(), Some("gd-001"));
        assert_eq!(room.floor().speaker(), "gd-001");
        assert!(room.floor().may_publish("gd-001"));
        assert!(room.floor().may_publish("ministry"), "the chair always may");
        assert!(!room.floor().may_publish("gd-002"));

        room.set_floor(None);
        assert!(seen.has_changed().unwrap());
        assert_eq!(room.floor().speaker(), "ministry");
        assert!(!room.floor().may_publish("gd-001"));
    }

    #[test]
    fn roll_calls_are_numbered_and_answers_are_per_call() {
        let room = Room::new("drill", "ministry");
        let mut asked = room.roll.subscribe();
        assert!(room.roll.borrow().is_none(), "no roll call yet");
        assert_eq!(room.roll_call(1_000), 1);
        assert!(asked.has_changed().unwrap());
        assert_eq!(
            asked.borrow_and_update().clone(),
            Some(conference_wire::RollCall {
                id: 1,
                deadline_ms: 1_000
            })
        );
        assert_eq!(room.roll_call(2_000), 2);
        assert_eq!(
            room.roll.borrow().as_ref().map(|r| r.deadline_ms),
            Some(2_000)
        );

        for site in ["gd-001", "gd-002", "gd-003"] {
            join(&room, site);
        }
        let answer = |site: &str, id: u64| {
            room.roster
                .lock()
                .unwrap()
                .get_mut(site)
                .unwrap()
                .present
                .push(id);
        };
        answer("gd-001", 1);
        answer("gd-001", 2);
        answer("gd-003", 2);
        assert_eq!(room.answered(1), vec!["gd-001".to_string()]);
        assert_eq!(
            room.answered(2),
            vec!["gd-001".to_string(), "gd-003".into()]
        );
        assert!(room.answered(3).is_empty());
        assert_eq!(room.roster().len(), 3);
    }

    #[test]
    fn a_track_announced_again_replaces_and_closes_the_old_one() {
        let room = Room::new("drill", "ministry");
        let mut list = room.tracks.subscribe();
        let first = track("gd-001", "video", "high", 1500);
        room.add_track(first.clone());
        assert!(list.has_changed().unwrap());
        list.borrow_and_update();
        assert_eq!(room.track_keys(), vec![first.key()]);
        assert!(Arc::ptr_eq(&room.track(&first.key()).unwrap(), &first));

        // The same key again (a reconnection): the new one is the room's, the old one ends.
        let second = track("gd-001", "video", "high", 1500);
        room.add_track(second.clone());
        assert!(first.is_closed());
        assert!(!second.is_closed());
        assert!(Arc::ptr_eq(&room.track(&first.key()).unwrap(), &second));
        list.borrow_and_update();

        // The old publisher leaving does not take the new track with it.
        room.remove_track(&first);
        assert!(!list.has_changed().unwrap(), "the list did not change");
        assert_eq!(room.track_keys().len(), 1);

        room.remove_track(&second);
        assert!(second.is_closed());
        assert!(room.track_keys().is_empty());
        assert!(list.has_changed().unwrap());
    }
}
