//! The relay: rooms, participants, fan-out.
//!
//! Each participant (a site client or a downstream relay) holds one QUIC connection with
//! mutual TLS (site certificates from the controller's CA). Tracks a participant announces
//! land in its room; every subscriber of a track gets its groups through
//! [`forward::send_track`], so a track crosses each connection once whatever the number of
//! viewers behind it. Groups from a site without the floor stop at the first relay.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward::{self, SendStats};
use crate::io::{ControlReader, ControlWriter, IoError};
use crate::policy::{FloorState, RenditionChooser};
use crate::track::Track;
use crate::wire::Object;
use crate::wire::{
    self, Control, ErrorMsg, Floor, Role, TrackInfo, TrackKey, Tracks, Welcome, codes,
};

/// ALPN of the conference protocol.
pub const ALPN: &[u8] = b"tiandi-video/1";
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a group stream waits for its track's Announce (sent on the control stream, so
/// it may arrive after the group's first packets).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(5);
/// Control frames queued toward one participant. A participant that lets this many pile up
/// is not reading its control stream: it is disconnected (the queue never blocks the room).
const CONTROL_QUEUE: usize = 64;

/// Counters for the whole relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub groups_in: AtomicU64,
    /// Groups stopped at this relay because their publisher lacked the floor.
    pub groups_no_floor: AtomicU64,
    pub bad_streams: AtomicU64,
    pub send: Arc<SendStats>,
}

impl Relay {
    /// The relay's figures in the Prometheus text format (`tiandi_video_*`): what it carries,
    /// drops and refuses, and each room's participants and tracks.
    pub fn exposition(&self) -> String {
        use std::fmt::Write;
        let st = &self.stats;
        let send = &st.send;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{relay=\"{}\"}} {v}\n",
                label(&self.name)
            );
        };
        one(
            "tiandi_video_connections",
            "gauge",
            "Participant connections open.",
            g(&st.connections),
        );
        one(
            "tiandi_video_refused_total",
            "counter",
            "Participants refused (handshake, unknown room, looping path).",
            g(&st.refused),
        );
        one(
            "tiandi_video_groups_in_total",
            "counter",
            "Groups received from publishers.",
            g(&st.groups_in),
        );
        one(
            "tiandi_video_groups_no_floor_total",
            "counter",
            "Groups stopped: publisher without the floor.",
            g(&st.groups_no_floor),
        );
        one(
            "tiandi_video_bad_streams_total",
            "counter",
            "Malformed group streams closed.",
            g(&st.bad_streams),
        );
        one(
            "tiandi_video_groups_sent_total",
            "counter",
            "Groups delivered whole to subscribers.",
            g(&send.groups_sent),
        );
        one(
            "tiandi_video_groups_dropped_total",
            "counter",
            "Groups reset before delivery (a newer one replaced them).",
            g(&send.groups_dropped),
        );
        one(
            "tiandi_video_objects_sent_total",
            "counter",
            "Frames sent to subscribers.",
            g(&send.objects_sent),
        );
        one(
            "tiandi_video_payload_bytes_sent_total",
            "counter",
            "Media payload bytes sent to subscribers.",
            g(&send.bytes_sent),
        );
        one(
            "tiandi_video_repairs_sent_total",
            "counter",
            "Repair datagrams (FEC) sent.",
            g(&send.repairs_sent),
        );
        let rooms = self.rooms();
        one(
            "tiandi_video_rooms",
            "gauge",
            "Conferences open.",
            rooms.len() as u64,
        );
        let mut per_room = |name: &str, help: &str, f: &dyn Fn(&Room) -> usize| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
            for r in &rooms {
                let _ = writeln!(
                    out,
                    "{name}{{relay=\"{}\",room=\"{}\"}} {}",
                    label(&self.name),
                    label(&r.name),
                    f(r)
                );
            }
        };
        per_room(
            "tiandi_video_room_participants",
            "Participants in a conference.",
            &|r| r.roster().len(),
        );
        per_room(
            "tiandi_video_room_tracks",
            "Tracks published in a conference.",
            &|r| r.track_keys().len(),
        );
        out
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
    floor: watch::Sender<FloorState>,
    tracks: watch::Sender<BTreeMap<TrackKey, Arc<Track>>>,
    roster: Mutex<BTreeMap<String, Member>>,
    /// Its upstream session is running (a cascading relay's).
    cascading: std::sync::atomic::AtomicBool,
    /// The latest roll call (participants are asked when it changes).
    roll: watch::Sender<Option<wire::RollCall>>,
    /// Fires when the conference ends: every participant is disconnected.
    ended: CancellationToken,
    recording: tokio::sync::Mutex<Option<Recording>>,
}

/// A recording in progress: a player writing one site's tracks, or the speaker's, to a file.
struct Recording {
    path: std::path::PathBuf,
    publisher: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<crate::play::PlayStats, crate::play::MediaError>>,
    speakers: Arc<Mutex<Vec<Speaker>>>,
}

/// Who a recording shows from when.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Speaker {
    pub site: String,
    /// Seconds into the recording when this site became the one recorded.
    pub from_s: f64,
}

/// A finished recording.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordingDone {
    pub path: std::path::PathBuf,
    pub stats: crate::play::PlayStats,
    pub speakers: Vec<Speaker>,
}

/// A site's video (highest rendition) and audio in a room's track list.
fn speaker_tracks(
    tracks: &BTreeMap<TrackKey, Arc<Track>>,
    site: &str,
) -> (Option<Arc<Track>>, Option<Arc<Track>>) {
    let video = tracks
        .values()
        .filter(|t| t.info.publisher == site && t.info.kind == "video")
        .max_by_key(|t| t.info.bitrate_kbps)
        .cloned();
    let audio = tracks
        .values()
        .find(|t| t.info.publisher == site && t.info.kind == "audio")
        .cloned();
    (video, audio)
}

/// Feeds a recording's tracks from the speaker of the moment (or one fixed site).
struct Follow {
    tracks: watch::Receiver<BTreeMap<TrackKey, Arc<Track>>>,
    floor: watch::Receiver<FloorState>,
    fixed: Option<String>,
    video: Arc<Track>,
    audio: Option<Arc<Track>>,
    /// Capture time (µs, publisher clocks) of the recording's media time 0: its first frame.
    origin: Arc<std::sync::atomic::AtomicI64>,
    speakers: Arc<Mutex<Vec<Speaker>>>,
}

impl Follow {
    async fn run(mut self, stop: CancellationToken) {
        // Who is recorded, and the tracks followed.
        let mut current: Option<(String, Vec<Arc<Track>>)> = None;
        let mut segment = stop.child_token();
        let mut first = true;
        loop {
            let who = match &self.fixed {
                Some(s) => s.clone(),
                None => self.floor.borrow_and_update().speaker().to_string(),
            };
            let (v, a) = speaker_tracks(&self.tracks.borrow_and_update(), &who);
            let ptrs: Vec<Arc<Track>> = v.iter().chain(a.iter()).cloned().collect();
            let same = current.as_ref().is_some_and(|(w, t)| {
                *w == who
                    && t.len() == ptrs.len()
                    && t.iter().zip(&ptrs).all(|(x, y)| Arc::ptr_eq(x, y))
            });
            if !same {
                segment.cancel();
                segment = stop.child_token();
                if !ptrs.is_empty() {
                    info!(speaker = %who, "Recording follows.");
                    let from_s = self.elapsed_s();
                    self.speakers
                        .lock()
                        .expect("speakers lock poisoned")
                        .push(Speaker {
                            site: who.clone(),
                            from_s,
                        });
                }
                // The first speaker from its current group (the recording starts at once);
                // a later one from its next keyframe, so the file never shows half a picture.
                for (src, out) in [(v, Some(self.video.clone())), (a, self.audio.clone())] {
                    if let (Some(src), Some(out)) = (src, out) {
                        tokio::spawn(splice(
                            src,
                            out,
                            self.origin.clone(),
                            first,
                            segment.clone(),
                        ));
                    }
                }
                first = first && ptrs.is_empty();
                current = Some((who, ptrs));
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                r = self.floor.changed() => if r.is_err() { break },
                r = self.tracks.changed() => if r.is_err() { break },
            }
        }
        segment.cancel();
        self.video.close();
        if let Some(a) = &self.audio {
            a.close();
        }
    }

    fn elapsed_s(&self) -> f64 {
        let o = self.origin.load(Ordering::Relaxed);
        if o == i64::MIN {
            0.0
        } else {
            (crate::now_us() - o) as f64 / 1e6
        }
    }
}

/// Splices `from` into the recording's track `to` until `stop`: from the source's first group
/// (`first`) or its next keyframe, each object's time moved onto the recording's time line
/// (capture time minus `origin`, the recording's first frame).
async fn splice(
    from: Arc<Track>,
    to: Arc<Track>,
    origin: Arc<std::sync::atomic::AtomicI64>,
    first: bool,
    stop: CancellationToken,
) {
    // Without the publisher's clock, the segment starts where the recording is now.
    let clock = from.info.clock_us;
    let shift: Arc<std::sync::OnceLock<i64>> = Arc::default();
    let to_file_time = move |mut o: Object| {
        let capture = if clock != 0 {
            clock + o.pts_us
        } else {
            *shift.get_or_init(|| crate::now_us() - o.pts_us) + o.pts_us
        };
        let base = origin
            .compare_exchange(i64::MIN, capture, Ordering::Relaxed, Ordering::Relaxed)
            .unwrap_or_else(|b| b);
        o.pts_us = capture - base;
        o
    };
    let numbering = if first {
        crate::track::Numbering::Same
    } else {
        crate::track::Numbering::Next
    };
    crate::track::copy_groups(from, to, stop, numbering, to_file_time).await;
}

impl Room {
    fn new(name: &str, chair: &str) -> Arc<Room> {
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
            .send_replace(Some(wire::RollCall { id, deadline_ms }));
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

    /// Starts recording the conference to `path`, an MPEG-TS file (`.ts`: [`crate::ts`], no
    /// FFmpeg; the media crate's `tiandi-video remux` makes Matroska or MP4 of it), until
    /// [`Room::stop_recording`] or the end of the conference:
    /// `publisher`'s picture (its highest rendition) and sound, or with `None` whoever
    /// speaks — the floor holder, else the chair — switching at the new speaker's next
    /// keyframe. The file's time line is the capture time (the publishers' clocks), so
    /// picture and sound stay together across switches.
    pub async fn start_recording(
        &self,
        publisher: Option<&str>,
        path: &std::path::Path,
    ) -> Result<(), String> {
        let mut rec = self.recording.lock().await;
        if let Some(r) = rec.as_ref().filter(|r| !r.task.is_finished()) {
            return Err(format!(
                "already recording {} to {}",
                r.publisher,
                r.path.display()
            ));
        }
        if !path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ts"))
        {
            return Err(format!(
                "{}: a relay records MPEG-TS (.ts); `tiandi-video remux` makes .mkv or .mp4 of it",
                path.display()
            ));
        }
        let first = match publisher {
            Some(p) => p.to_string(),
            None => self.floor().speaker().to_string(),
        };
        let (video, audio) = speaker_tracks(&self.tracks.borrow(), &first);
        let video = video.ok_or_else(|| format!("{first} publishes no video in {}", self.name))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // What the player reads: one track per kind for the whole recording.
        let out_info = |t: &Track| TrackInfo {
            clock_us: 0,
            via: Vec::new(),
            ..t.info.clone()
        };
        let out_video = Track::new(out_info(&video));
        let out_audio = audio.as_ref().map(|a| Track::new(out_info(a)));
        let stop = self.ended.child_token();
        let speakers = Arc::new(Mutex::new(Vec::new()));
        let follow = Follow {
            tracks: self.tracks.subscribe(),
            floor: self.floor.subscribe(),
            fixed: publisher.map(str::to_string),
            video: out_video.clone(),
            audio: out_audio.clone(),
            origin: Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            speakers: speakers.clone(),
        };
        tokio::spawn(follow.run(stop.clone()));
        let list: Vec<Arc<Track>> = std::iter::once(out_video).chain(out_audio).collect();
        let task = tokio::spawn(crate::play::record(
            list,
            path.to_path_buf(),
            stop.clone(),
            Duration::from_secs(2),
        ));
        let who = publisher.unwrap_or("the floor").to_string();
        info!(room = %self.name, who, path = %path.display(), "Recording.");
        *rec = Some(Recording {
            path: path.to_path_buf(),
            publisher: who,
            stop,
            task,
            speakers,
        });
        Ok(())
    }

    /// Stops the recording; returns its file, what was written, and who was recorded from
    /// when (seconds into the file).
    pub async fn stop_recording(&self) -> Result<RecordingDone, String> {
        let r = self
            .recording
            .lock()
            .await
            .take()
            .ok_or_else(|| format!("{} is not being recorded", self.name))?;
        r.stop.cancel();
        let stats = r
            .task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        info!(room = %self.name, path = %r.path.display(), objects = stats.objects, "Recording stopped.");
        let speakers = r.speakers.lock().expect("speakers lock poisoned").clone();
        Ok(RecordingDone {
            path: r.path,
            stats,
            speakers,
        })
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

    fn add_track(&self, t: Arc<Track>) {
        let old = self
            .tracks
            .send_modify_ret(|m| m.insert(t.key(), t.clone()));
        if let Some(old) = old {
            old.close();
        }
    }

    fn remove_track(&self, t: &Arc<Track>) {
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

pub struct RelayOptions {
    /// This relay's name (its site ID).
    pub name: String,
    /// The site that chairs rooms created on first join.
    pub chair: String,
    /// The relay above this one, if it cascades.
    pub upstream: Option<Upstream>,
    /// Rooms come into being when a site first joins them (a standalone relay); otherwise
    /// only rooms created with [`Relay::create_room`] can be joined (conferences the
    /// controller runs).
    pub open_rooms: bool,
    /// Ask for repair datagrams ([`crate::fec`]) with the groups that participants and the
    /// upstream relay send here once the round trip is at least this long (ms; 0: never).
    pub fec_rtt_ms: u32,
}

/// Where a cascading relay takes its rooms from (a province relay's ministry relay).
#[derive(Clone)]
pub struct Upstream {
    pub endpoint: quinn::Endpoint,
    pub addr: std::net::SocketAddr,
    /// The upstream relay's site ID (the name its certificate carries).
    pub name: String,
    pub client: quinn::ClientConfig,
}

pub struct Relay {
    pub name: String,
    chair: String,
    upstream: Option<Upstream>,
    open_rooms: bool,
    fec_rtt_ms: u32,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    pub stats: RelayStats,
}

impl Relay {
    pub fn new(opts: RelayOptions) -> Arc<Relay> {
        Arc::new(Relay {
            name: opts.name,
            chair: opts.chair,
            upstream: opts.upstream,
            open_rooms: opts.open_rooms,
            fec_rtt_ms: opts.fec_rtt_ms,
            rooms: Mutex::new(HashMap::new()),
            stats: RelayStats::default(),
        })
    }

    /// Creates a room chaired by `chair`; an existing room of that name (not ended) is
    /// returned as is.
    pub fn create_room(&self, name: &str, chair: &str) -> Arc<Room> {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        if let Some(r) = rooms.get(name).filter(|r| !r.is_ended()) {
            return r.clone();
        }
        let r = Room::new(name, chair);
        rooms.insert(name.to_string(), r.clone());
        r
    }

    /// Ends a room: its participants are disconnected. Returns whether it existed.
    pub fn end_room(&self, name: &str) -> bool {
        match self.rooms.lock().expect("rooms lock poisoned").remove(name) {
            Some(r) => {
                r.ended.cancel();
                for t in r.tracks.borrow().values() {
                    t.close();
                }
                true
            }
            None => false,
        }
    }

    /// The room if it exists and has not ended.
    pub fn find_room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .get(name)
            .filter(|r| !r.is_ended())
            .cloned()
    }

    /// The room, created on first use.
    pub fn room(&self, name: &str) -> Arc<Room> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .entry(name.to_string())
            .or_insert_with(|| Room::new(name, &self.chair))
            .clone()
    }

    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Accepts participants until `cancel` fires.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, cancel: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let (relay, cancel) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => relay.participant(conn, cancel).await,
                    Err(e) => {
                        relay.stats.refused.fetch_add(1, Ordering::Relaxed);
                        info!(%remote, error = %e, "Conference handshake failed.");
                    }
                }
            });
        }
    }

    /// Starts the room's upstream session once (a cascading relay's): every track the
    /// upstream offers comes down once, whatever the number of viewers here; tracks published
    /// here go up once; the upstream's floor applies here.
    fn ensure_cascade(self: &Arc<Self>, room: &Arc<Room>, cancel: &CancellationToken) {
        let Some(up) = self.upstream.clone() else {
            return;
        };
        if room.cascading.swap(true, Ordering::AcqRel) {
            return;
        }
        let (relay, room, cancel) = (self.clone(), room.clone(), cancel.clone());
        let span = info_span!("upstream", relay = %up.name, room = %room.name);
        tokio::spawn(
            async move {
                let mut backoff = Duration::from_millis(500);
                while !cancel.is_cancelled() {
                    match relay.cascade_once(&up, &room, &cancel).await {
                        Ok(()) => backoff = Duration::from_millis(500),
                        Err(e) => warn!(error = %e, "Upstream session failed; retrying."),
                    }
                    let jitter = rand::random::<f64>() * backoff.as_secs_f64();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs_f64(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            .instrument(span),
        );
    }

    async fn cascade_once(
        self: &Arc<Self>,
        up: &Upstream,
        room: &Arc<Room>,
        cancel: &CancellationToken,
    ) -> Result<(), IoError> {
        let conn = up
            .endpoint
            .connect_with(
                up.client.clone(),
                up.addr,
                &tiandi_link::tls::relay_server_name(&up.name),
            )
            .map_err(|e| IoError::Stream(e.to_string()))?
            .await
            .map_err(|e| IoError::Stream(e.to_string()))?;
        let session = crate::client::Session::join_with(
            conn.clone(),
            &room.name,
            Role::Relay,
            vec![self.name.clone()],
            0,
            self.fec_rtt_ms,
        )
        .await?;
        info!("Upstream session up.");
        let mut view = session.view();
        view.mark_changed();
        let mut tracks = room.tracks.subscribe();
        tracks.mark_changed();
        let mut down: std::collections::HashSet<(String, String)> = Default::default();
        let mut up_keys: std::collections::HashSet<TrackKey> = Default::default();
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                e = conn.closed() => break Err(IoError::Stream(e.to_string())),
                r = view.changed() => {
                    if r.is_err() { break Err(IoError::Ended) }
                    let v = view.borrow_and_update().clone();
                    room.set_floor((!v.floor.is_empty()).then_some(v.floor.clone()));
                    for t in v.tracks {
                        // Tracks from here (or through here) never come back down.
                        if t.via.iter().any(|x| x == &self.name) {
                            continue;
                        }
                        let k = (t.publisher.clone(), t.kind.clone());
                        if down.insert(k.clone()) {
                            session.subscribe(&k.0, &k.1, "").await?;
                            let (session, room) = (session.clone(), room.clone());
                            tokio::spawn(async move {
                                let track = session.received(&k.0, &k.1).await;
                                debug!(track = %track.key(), "Upstream track here.");
                                room.add_track(track);
                            }.in_current_span());
                        }
                    }
                }
                r = tracks.changed() => {
                    if r.is_err() { break Err(IoError::Ended) }
                    let here: Vec<Arc<Track>> = tracks.borrow_and_update().values().cloned().collect();
                    for t in here {
                        // Up goes what was published here or below, once.
                        if t.info.via.iter().any(|x| x == &up.name) || !up_keys.insert(t.key()) {
                            continue;
                        }
                        session.publish_via(t, Some(&self.name)).await?;
                    }
                }
            }
        };
        // Tracks mirrored from upstream end with the session.
        for t in session.received_tracks() {
            room.remove_track(&t);
        }
        session.close();
        result
    }

    async fn participant(self: Arc<Self>, conn: quinn::Connection, cancel: CancellationToken) {
        let Some(id) = tiandi_link::peer_identity(&conn) else {
            conn.close(codes::FORBIDDEN.into(), b"a site certificate is required");
            return;
        };
        let span = info_span!("participant", site = %id.site_id, remote = %conn.remote_address());
        async move {
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.session(&conn, &id.site_id, cancel).await {
                warn!(error = %e, "Participant refused or failed.");
                conn.close(e.code().into(), e.to_string().as_bytes());
            }
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span)
        .await
    }

    async fn session(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        site: &str,
        cancel: CancellationToken,
    ) -> Result<(), IoError> {
        let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| IoError::Stream("no control stream in time".into()))?
            .map_err(|e| IoError::Stream(e.to_string()))?;
        let (mut writer, mut reader) = (ControlWriter(send), ControlReader(recv));
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.recv()).await {
            Err(_) => return Err(IoError::Stream("no Hello in time".into())),
            Ok(r) => match r? {
                Some(Control::Hello(h)) => h,
                Some(other) => {
                    return Err(IoError::Wire(wire::WireError::Malformed {
                        what: "control stream",
                        detail: format!("expected Hello, got {}", other.name()),
                    }));
                }
                None => return Err(IoError::Ended),
            },
        };
        let role = wire::check_hello(&hello)?;
        if hello.path.iter().any(|p| p == &self.name) {
            let msg = format!(
                "relay path {:?} already passes through {}: a cascade must not loop",
                hello.path, self.name
            );
            let _ = writer
                .send(&Control::Error(ErrorMsg {
                    code: codes::LOOP,
                    message: msg.clone(),
                }))
                .await;
            // Let the Error frame arrive before the close discards it (the close carries
            // the reason too).
            let _ = writer.0.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.0.stopped()).await;
            conn.close(codes::LOOP.into(), msg.as_bytes());
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let room = match self.find_room(&hello.room) {
            Some(r) => r,
            None if self.open_rooms => self.room(&hello.room),
            None => {
                let msg = format!("there is no conference {:?} here", hello.room);
                let _ = writer
                    .send(&Control::Error(ErrorMsg {
                        code: codes::NO_ROOM,
                        message: msg.clone(),
                    }))
                    .await;
                let _ = writer.0.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), writer.0.stopped()).await;
                conn.close(codes::NO_ROOM.into(), msg.as_bytes());
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        self.ensure_cascade(&room, &cancel);
        info!(room = %room.name, role = role.as_str(), "Participant joined.");
        writer
            .send(&Control::Welcome(Welcome {
                version: wire::VERSION,
                relay: self.name.clone(),
                you: site.to_string(),
                chair: room.floor().chair,
                fec_rtt_ms: self.fec_rtt_ms,
            }))
            .await?;
        room.roster.lock().expect("roster lock poisoned").insert(
            site.to_string(),
            Member {
                site: site.into(),
                role: role.as_str().into(),
                ..Default::default()
            },
        );

        let p = Arc::new(Participant {
            relay: self.clone(),
            conn: conn.clone(),
            site: site.to_string(),
            role,
            room: room.clone(),
            announced: Mutex::new(HashMap::new()),
            announces: watch::channel(0).0,
            out_ids: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            link_kbps: hello.link_kbps,
            fec: crate::fec::Wish::new(hello.fec_rtt_ms),
            inbox: (self.fec_rtt_ms > 0).then(|| crate::fec::Inbox::start(conn)),
        });
        let stop = cancel.child_token();
        let _stop = stop.clone().drop_guard();
        let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(CONTROL_QUEUE);
        tokio::spawn(
            p.clone()
                .write_control(writer, ctl_rx, stop.clone())
                .in_current_span(),
        );
        tokio::spawn(p.clone().accept_groups(stop.clone()).in_current_span());
        let result = tokio::select! {
            r = p.read_control(&mut reader, &ctl_tx, &stop) => r,
            _ = room.ended.cancelled() => {
                conn.close(codes::NO_ROOM.into(), b"the conference has ended");
                Ok(())
            }
        };
        p.leave();
        result
    }
}

struct Participant {
    relay: Arc<Relay>,
    conn: quinn::Connection,
    site: String,
    role: Role,
    room: Arc<Room>,
    /// Tracks it publishes, by its id for them.
    announced: Mutex<HashMap<u32, Arc<Track>>>,
    /// Bumped at each Announce.
    announces: watch::Sender<u64>,
    /// Our ids for the room's tracks on this connection.
    out_ids: Mutex<HashMap<TrackKey, u32>>,
    /// Its subscriptions: (publisher, kind) → stop.
    subs: Mutex<HashMap<(String, String), CancellationToken>>,
    link_kbps: u32,
    /// The participant's wish for repair datagrams ([`Hello::fec_rtt_ms`]).
    fec: Arc<crate::fec::Wish>,
    /// Repair datagrams for the groups it sends, if this relay asks for them.
    inbox: Option<Arc<crate::fec::Inbox>>,
}

impl Participant {
    /// Updates this participant's roster entry.
    fn member(&self, f: impl FnOnce(&mut Member)) {
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

    fn out_id(&self, key: &TrackKey) -> u32 {
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
    async fn write_control(
        self: Arc<Self>,
        mut w: ControlWriter,
        mut rx: mpsc::Receiver<Control>,
        stop: CancellationToken,
    ) {
        let mut tracks = self.room.tracks.subscribe();
        let mut floor = self.room.floor.subscribe();
        let mut roll = self.room.roll.subscribe();
        tracks.mark_changed();
        floor.mark_changed();
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

    async fn read_control(
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
                    // A site publishes as itself only; a relay speaks for the sites below.
                    if self.role == Role::Site && info.publisher != self.site {
                        return Err(IoError::Wire(wire::WireError::Malformed {
                            what: "Announce",
                            detail: format!(
                                "site {} cannot publish as {}",
                                self.site, info.publisher
                            ),
                        }));
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
                Control::Subscribe(s) => self.subscribe(s.publisher, s.kind, s.rendition),
                Control::Unsubscribe(u) => {
                    if let Some(stop) = self
                        .subs
                        .lock()
                        .expect("subs lock poisoned")
                        .remove(&(u.publisher, u.kind))
                    {
                        stop.cancel();
                    }
                }
                Control::Present(p) => self.member(|m| m.present.push(p.id)),
                Control::Health(h) => self.member(|m| {
                    m.health.insert(
                        format!("{}/{}", h.publisher, h.kind),
                        HealthView {
                            rendition: h.rendition,
                            kbps: h.kbps,
                            frames: h.frames,
                            groups_lost: h.groups_lost,
                            latency_ms: h.latency_ms,
                        },
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
    async fn accept_groups(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let recv = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.conn.accept_uni() => match r { Ok(r) => r, Err(_) => { stop.cancel(); return } },
            };
            let p = self.clone();
            tokio::spawn(
                async move {
                    let mut recv = crate::fec::GroupRecv::new(recv, p.inbox.as_ref());
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

    /// Sends one publisher's video (or audio) to this participant, in the rendition its link
    /// carries, until it unsubscribes or leaves.
    fn subscribe(self: &Arc<Self>, publisher: String, kind: String, rendition: String) {
        let stop = CancellationToken::new();
        if let Some(old) = self
            .subs
            .lock()
            .expect("subs lock poisoned")
            .insert((publisher.clone(), kind.clone()), stop.clone())
        {
            old.cancel();
        }
        let p = self.clone();
        tokio::spawn(
            async move {
                p.run_subscription(&publisher, &kind, &rendition, &stop)
                    .await
            }
            .in_current_span(),
        );
    }

    async fn run_subscription(
        &self,
        publisher: &str,
        kind: &str,
        fixed: &str,
        stop: &CancellationToken,
    ) {
        let mut tracks = self.room.tracks.subscribe();
        tracks.mark_changed();
        let mut chooser: Option<RenditionChooser> = None;
        let mut current: Option<(Arc<Track>, crate::track::GroupWatch)> = None;
        let flights = forward::in_flight();
        let mut dropped_seen = 0u64;
        let dropped = SendStats::child(&self.relay.stats.send);
        loop {
            // Renditions of this publisher's `kind` now in the room.
            let options: Vec<Arc<Track>> = self
                .room
                .tracks
                .borrow()
                .values()
                .filter(|t| t.info.publisher == publisher && t.info.kind == kind)
                .cloned()
                .collect();
            if chooser.is_none() && !options.is_empty() {
                chooser = Some(RenditionChooser::new(
                    options
                        .iter()
                        .map(|t| (t.info.rendition.clone(), t.info.bitrate_kbps))
                        .collect(),
                    self.link_kbps,
                    crate::now_ms(),
                ));
            }
            let want = if !fixed.is_empty() {
                fixed.to_string()
            } else {
                chooser
                    .as_ref()
                    .map(|c| c.current().to_string())
                    .unwrap_or_default()
            };
            let target = options.iter().find(|t| t.info.rendition == want).cloned();
            match (&current, target) {
                (Some((cur, _)), Some(t)) if Arc::ptr_eq(cur, &t) => {}
                (_, Some(t)) => {
                    // A switch (or the start): a late joiner takes the current group at once;
                    // a switch waits for the new rendition's next group (a group boundary).
                    let mut rx = t.subscribe();
                    if current.is_some() {
                        rx.borrow_and_update();
                        // What is still in flight of the old rendition is of no use now.
                        forward::cancel_all(&flights);
                    }
                    debug!(track = %t.key(), "Sending rendition.");
                    current = Some((t, rx));
                }
                (_, None) => current = None,
            }
            let next = async {
                match current.as_mut() {
                    Some((_, rx)) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.conn.closed() => break,
                r = tracks.changed() => { if r.is_err() { break } tracks.borrow_and_update(); continue; }
                ok = next => {
                    if !ok { current = None; continue; }
                }
            }
            let Some((t, rx)) = current.as_mut() else {
                continue;
            };
            // No group yet (or the track just closed: the room's list changes next).
            let Some(group) = rx.borrow_and_update().clone() else {
                continue;
            };
            let id = self.out_id(&t.key());
            forward::start_group(
                &self.conn,
                id,
                &t.info.kind,
                group,
                &dropped,
                &flights,
                &self.fec,
            );
            // What the link showed since the last group: drops, and its estimated rate.
            if let Some(c) = chooser.as_mut() {
                let d = dropped.dropped();
                let s = self.conn.stats();
                let rtt = s.path.rtt.as_secs_f64().max(1e-3);
                let est_kbps = s.path.cwnd as f64 * 8.0 / rtt / 1000.0;
                let before = c.current().to_string();
                let now = c.observe(d - dropped_seen, est_kbps, crate::now_ms());
                if now != before {
                    info!(publisher, kind, from = %before, to = %now, dropped = d - dropped_seen, est_kbps = est_kbps as u64, "Rendition change.");
                }
                dropped_seen = d;
            }
        }
        forward::cancel_all(&flights);
    }

    fn leave(&self) {
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
        self.room
            .roster
            .lock()
            .expect("roster lock poisoned")
            .remove(&self.site);
        info!("Participant left.");
    }
}

fn malformed(detail: &str) -> IoError {
    IoError::Wire(wire::WireError::Malformed {
        what: "control frame",
        detail: detail.to_string(),
    })
}
