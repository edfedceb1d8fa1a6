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
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthView {
    pub rendition: String,
    pub kbps: u32,
    pub frames: u64,
    pub groups_lost: u64,
    pub latency_ms: i32,
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
