//! The site client's conference session: publishes local tracks, receives the tracks it
//! subscribes to, answers roll calls, reports how its tracks arrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::conference_wire::{
    self, Announce, Control, Hello, Present, Subscribe, TrackInfo, TrackKey, Welcome,
};
use crate::forward::{self, SendStats};
use crate::io::{ControlReader, ControlWriter, IoError};
use crate::track::Track;

/// Control frames queued toward the relay (the client's own requests: few).
const CONTROL_QUEUE: usize = 64;

/// What a client knows of the conference.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Tracks on offer, by the relay's id for them.
    pub tracks: Vec<TrackInfo>,
    pub floor: String,
    pub last_error: Option<String>,
}

/// A connected conference session.
pub struct Session {
    pub conn: quinn::Connection,
    pub welcome: Welcome,
    ctl: mpsc::Sender<Control>,
    view: watch::Receiver<View>,
    /// Tracks received from the relay, by key: each holds the groups as they arrive.
    received: Arc<Mutex<HashMap<TrackKey, Arc<Track>>>>,
    received_tx: watch::Sender<usize>,
    next_id: AtomicU64,
    pub sent: Arc<SendStats>,
    pub groups_in: Arc<AtomicU64>,
    pub bad_streams: Arc<AtomicU64>,
    /// Per (publisher, kind): what has arrived, for health reports.
    counts: Mutex<HashMap<(String, String), Counts>>,
    cancel: CancellationToken,
    /// Repair datagrams for the relay's group streams, if asked for.
    pub repair_router: Option<Arc<crate::fec::RepairRouter>>,
    /// The relay's wish for repair with the groups sent to it.
    fec_out: Arc<crate::fec::Wish>,
    /// A relay's session keeps each rendition in a track of its own (its viewers get the one
    /// their link carries); a site's, all in one per publisher and kind (what it plays).
    by_rendition: bool,
}

/// What arrived of one publisher's kind of track.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub objects: u64,
    pub bytes: u64,
    pub groups: u64,
    /// Groups never seen (gaps in the sequence) or cut short.
    pub groups_lost: u64,
    pub last_seq: u64,
    pub rendition: String,
    /// Age of the newest frame when it arrived (ms), if the publisher's clock is known.
    pub latency_ms: Option<i64>,
}

/// From this round trip on, a client asks for repair datagrams ([`crate::fec`]): a
/// retransmission then costs more than a frame's worth of delay budget.
pub const FEC_RTT_MS: u32 = 200;

impl Session {
    /// Joins `room` at the relay over `conn` (already connected with the video ALPN), asking
    /// for repair datagrams over long links ([`FEC_RTT_MS`]).
    pub async fn join(
        conn: quinn::Connection,
        room: &str,
        role: conference_wire::Role,
        path: Vec<String>,
        link_kbps: u32,
    ) -> Result<Arc<Session>, IoError> {
        Session::join_with(conn, room, role, path, link_kbps, FEC_RTT_MS).await
    }

    /// [`Session::join`], asking for repair datagrams from `fec_rtt_ms` of round trip on (0:
    /// never).
    pub async fn join_with(
        conn: quinn::Connection,
        room: &str,
        role: conference_wire::Role,
        path: Vec<String>,
        link_kbps: u32,
        fec_rtt_ms: u32,
    ) -> Result<Arc<Session>, IoError> {
        Session::join_path(conn, room, role, path, link_kbps, fec_rtt_ms, "", false).await
    }

    /// [`Session::join_with`] over one of a dual-homed site's paths (`site_path`), as a warm
    /// standby (`standby`: kept ready and probed, no roster change) or not.
    #[allow(clippy::too_many_arguments)]
    pub async fn join_path(
        conn: quinn::Connection,
        room: &str,
        role: conference_wire::Role,
        path: Vec<String>,
        link_kbps: u32,
        fec_rtt_ms: u32,
        site_path: &str,
        standby: bool,
    ) -> Result<Arc<Session>, IoError> {
        // Closed by the relay (it may refuse before reading the Hello): its reason says why.
        let closed = |e: IoError| match conn.close_reason() {
            Some(reason) => IoError::Stream(format!("the relay closed the connection: {reason}")),
            None => e,
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| closed(IoError::Stream(e.to_string())))?;
        let (mut w, mut r) = (ControlWriter(send), ControlReader(recv));
        w.send(&Control::Hello(Hello {
            version: conference_wire::VERSION,
            room: room.into(),
            role: role.as_str().into(),
            path,
            link_kbps,
            fec_rtt_ms,
            site_path: site_path.into(),
            standby,
        }))
        .await
        .map_err(closed)?;
        let welcome = match tokio::time::timeout(Duration::from_secs(20), r.recv()).await {
            Err(_) => return Err(IoError::Stream("no Welcome in time".into())),
            Ok(Err(e)) => return Err(closed(e)),
            Ok(Ok(m)) => match m {
                Some(Control::Welcome(w)) => w,
                Some(Control::Error(e)) => {
                    return Err(IoError::Stream(format!(
                        "relay refused: {} (code {})",
                        e.message, e.code
                    )));
                }
                Some(other) => {
                    return Err(IoError::Wire(conference_wire::WireError::Malformed {
                        what: "control stream",
                        detail: format!("expected Welcome, got {}", other.name()),
                    }));
                }
                None => return Err(IoError::Ended),
            },
        };
        let fec_wish = welcome.fec_rtt_ms;
        let (ctl, rx) = mpsc::channel(CONTROL_QUEUE);
        let (view_tx, view) = watch::channel(View::default());
        let cancel = CancellationToken::new();
        let s = Arc::new(Session {
            conn: conn.clone(),
            welcome,
            ctl,
            view,
            received: Arc::default(),
            received_tx: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            sent: Arc::default(),
            groups_in: Arc::default(),
            bad_streams: Arc::default(),
            counts: Mutex::default(),
            cancel: cancel.clone(),
            repair_router: (fec_rtt_ms > 0).then(|| crate::fec::RepairRouter::start(&conn)),
            fec_out: crate::fec::Wish::new(fec_wish),
            by_rendition: role == conference_wire::Role::Relay,
        });
        tokio::spawn(write_control(w, rx, cancel.clone()));
        tokio::spawn(s.clone().read_control(r, view_tx));
        tokio::spawn(s.clone().accept_groups());
        Ok(s)
    }

    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    async fn control(&self, c: Control) -> Result<(), IoError> {
        self.ctl
            .send(c)
            .await
            .map_err(|_| IoError::Stream("the session has ended".into()))
    }

    /// Announces `info` (its `id` is assigned here) and sends `track`'s groups to the relay
    /// until the track ends or the session does. Under congestion old groups are dropped.
    pub async fn publish(self: &Arc<Self>, track: Arc<Track>) -> Result<(), IoError> {
        self.publish_via(track, None).await
    }

    /// [`Session::publish`] by a relay for a track from below it: `relay` joins the track's
    /// path.
    pub async fn publish_via(
        self: &Arc<Self>,
        track: Arc<Track>,
        relay: Option<&str>,
    ) -> Result<(), IoError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u32;
        let mut info = track.info.clone();
        info.id = id;
        info.via.extend(relay.map(str::to_string));
        self.control(Control::Announce(Announce { track: Some(info) }))
            .await?;
        let (s, stats) = (self.clone(), self.sent.clone());
        tokio::spawn(async move {
            forward::send_track(&s.conn, &track, id, &stats, &s.cancel, &s.fec_out).await;
        });
        Ok(())
    }

    /// Asks for a publisher's `kind` ("video", "audio"); `rendition` empty lets the relay
    /// choose by this link.
    pub async fn subscribe(
        &self,
        publisher: &str,
        kind: &str,
        rendition: &str,
    ) -> Result<(), IoError> {
        self.control(Control::Subscribe(Subscribe {
            publisher: publisher.into(),
            kind: kind.into(),
            rendition: rendition.into(),
            ..Default::default()
        }))
        .await
    }

    /// [`Session::subscribe`] for a failover from another path: the current group at once,
    /// from its keyframe however old, starting with `start_rendition` (what the other path
    /// carried; empty: the relay's choice).
    pub async fn subscribe_failover(
        &self,
        publisher: &str,
        kind: &str,
        rendition: &str,
        start_rendition: &str,
    ) -> Result<(), IoError> {
        self.control(Control::Subscribe(Subscribe {
            publisher: publisher.into(),
            kind: kind.into(),
            rendition: rendition.into(),
            from_current: true,
            start_rendition: start_rendition.into(),
        }))
        .await
    }

    /// Stops a publisher's `kind` coming over this session (a dual-homed site moved its
    /// conference to another path).
    pub async fn unsubscribe(&self, publisher: &str, kind: &str) -> Result<(), IoError> {
        self.control(Control::Unsubscribe(conference_wire::Unsubscribe {
            publisher: publisher.into(),
            kind: kind.into(),
        }))
        .await
    }

    pub async fn present(&self, roll_call: u64) -> Result<(), IoError> {
        self.control(Control::Present(Present { id: roll_call }))
            .await
    }

    pub async fn health(&self, h: conference_wire::Health) -> Result<(), IoError> {
        self.control(Control::Health(h)).await
    }

    /// The received track for `publisher`'s `kind` (any rendition), waiting for it.
    pub async fn received(&self, publisher: &str, kind: &str) -> Arc<Track> {
        self.received_rendition(publisher, kind, None).await
    }

    /// The received track for `publisher`'s `kind` in `rendition` (a relay's session keeps
    /// each in its own; None: any), waiting for it.
    pub async fn received_rendition(
        &self,
        publisher: &str,
        kind: &str,
        rendition: Option<&str>,
    ) -> Arc<Track> {
        let mut rx = self.received_tx.subscribe();
        loop {
            if let Some(t) = self
                .received
                .lock()
                .expect("received lock poisoned")
                .iter()
                .find(|(k, _)| {
                    k.publisher == publisher
                        && k.kind == kind
                        && rendition.is_none_or(|r| k.rendition == r)
                })
                .map(|(_, t)| t.clone())
            {
                return t;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Every received track (a site's: one per publisher and kind, renditions landing in the
    /// same one, switching at group boundaries; a relay's: one per rendition).
    pub fn received_tracks(&self) -> Vec<Arc<Track>> {
        self.received
            .lock()
            .expect("received lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// What has arrived so far, per (publisher, kind).
    pub fn counts(&self) -> HashMap<(String, String), Counts> {
        self.counts.lock().expect("counts lock poisoned").clone()
    }

    /// Reports to the relay how each received track arrives, every `every`, until the session
    /// ends (the relay shows it in the room's roster); with what `played` shows of `(publisher,
    /// video)`, a player's frames shown, freezes and age.
    pub fn report_health(
        self: &Arc<Self>,
        every: Duration,
        played: Option<(String, Arc<crate::play::Live>)>,
    ) {
        self.report_health_until(every, played, self.cancel.clone());
    }

    /// [`Session::report_health`] until `until` fires too (a dual-homed site's conference
    /// moved to another path's session).
    pub fn report_health_until(
        self: &Arc<Self>,
        every: Duration,
        played: Option<(String, Arc<crate::play::Live>)>,
        until: CancellationToken,
    ) {
        let s = self.clone();
        tokio::spawn(async move {
            let mut last: HashMap<(String, String), u64> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = s.cancel.cancelled() => return,
                    _ = until.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for ((publisher, kind), c) in s.counts() {
                    let prev = last
                        .insert((publisher.clone(), kind.clone()), c.bytes)
                        .unwrap_or(0);
                    let kbps =
                        (c.bytes.saturating_sub(prev) * 8) as f64 / every.as_secs_f64() / 1000.0;
                    let w = played
                        .as_ref()
                        .filter(|(p, _)| *p == publisher && kind == "video")
                        .map(|(_, live)| live.watched())
                        .unwrap_or_default();
                    let h = conference_wire::Health {
                        publisher,
                        kind,
                        rendition: c.rendition,
                        kbps: kbps as u32,
                        frames: c.objects,
                        groups_lost: c.groups_lost,
                        latency_ms: c.latency_ms.unwrap_or(-1) as i32,
                        shown: w.shown,
                        expected: w.expected,
                        freezes: w.freezes,
                        longest_freeze_ms: w.longest_freeze_ms,
                        age_p99_ms: if w.shown > 0 { w.age_p99_ms } else { -1 },
                    };
                    if s.ctl.try_send(Control::Health(h)).is_err() {
                        return;
                    }
                }
            }
        });
    }

    pub fn close(&self) {
        self.cancel.cancel();
        self.conn
            .close(conference_wire::codes::SHUTDOWN.into(), b"leaving");
    }

    async fn read_control(self: Arc<Self>, mut r: ControlReader, view: watch::Sender<View>) {
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = r.recv() => m,
            };
            match msg {
                Ok(Some(Control::Tracks(t))) => view.send_modify(|v| v.tracks = t.tracks),
                Ok(Some(Control::Floor(f))) => view.send_modify(|v| v.floor = f.holder),
                Ok(Some(Control::RollCall(rc))) => {
                    let _ = self.ctl.try_send(Control::Present(Present { id: rc.id }));
                }
                Ok(Some(Control::Error(e))) => {
                    warn!(code = e.code, message = %e.message, "Relay reported an error.");
                    view.send_modify(|v| v.last_error = Some(e.message));
                }
                Ok(Some(other)) => debug!(frame = other.name(), "Ignored control frame."),
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "Control stream failed.");
                    return;
                }
            }
        }
    }

    /// The relay's group streams, into one local track per publisher and kind.
    async fn accept_groups(self: Arc<Self>) {
        loop {
            let recv = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.conn.accept_uni() => match r { Ok(r) => r, Err(_) => return },
            };
            let s = self.clone();
            tokio::spawn(async move {
                let mut recv = crate::fec::GroupRecv::new(recv, s.repair_router.as_ref());
                let header = match crate::io::read_group_header(&mut recv).await {
                    Ok(h) => h,
                    Err(e) => {
                        s.bad_streams.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "Bad group stream from the relay.");
                        recv.stop(e.code());
                        return;
                    }
                };
                // A group stream may overtake the Tracks frame that names its track.
                let info = {
                    let mut view = s.view.clone();
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        view.wait_for(|v| v.tracks.iter().any(|t| t.id == header.track)),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|v| v.tracks.iter().find(|t| t.id == header.track).cloned())
                };
                let Some(info) = info else {
                    s.bad_streams.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        track = header.track,
                        "Group for a track the relay never listed."
                    );
                    recv.stop(conference_wire::codes::PROTOCOL);
                    return;
                };
                let rendition = if s.by_rendition {
                    info.rendition.clone()
                } else {
                    String::new()
                };
                let key = TrackKey {
                    publisher: info.publisher.clone(),
                    kind: info.kind.clone(),
                    rendition: rendition.clone(),
                };
                let track = {
                    let mut m = s.received.lock().expect("received lock poisoned");
                    m.entry(key)
                        .or_insert_with(|| {
                            s.received_tx.send_modify(|n| *n += 1);
                            Track::new(TrackInfo {
                                rendition,
                                ..info.clone()
                            })
                        })
                        .clone()
                };
                s.groups_in.fetch_add(1, Ordering::Relaxed);
                let got = forward::receive_group(recv, header, &track).await;
                let mut counts = s.counts.lock().expect("counts lock poisoned");
                let c = counts
                    .entry((info.publisher.clone(), info.kind.clone()))
                    .or_default();
                if c.last_seq != 0 && header.group > c.last_seq + 1 {
                    c.groups_lost += header.group - c.last_seq - 1;
                }
                c.last_seq = c.last_seq.max(header.group);
                c.rendition = info.rendition.clone();
                match got {
                    Ok(r) => {
                        c.groups += 1;
                        c.objects += r.objects;
                        c.bytes += r.bytes;
                        if info.clock_us != 0 && r.objects > 0 {
                            c.latency_ms =
                                Some((crate::now_us() - info.clock_us - r.last_pts) / 1000);
                        }
                    }
                    Err(e) => {
                        c.groups_lost += 1;
                        if matches!(e, IoError::Wire(_)) {
                            s.bad_streams.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "Malformed group from the relay.");
                        }
                    }
                }
            });
        }
    }
}

async fn write_control(
    mut w: ControlWriter,
    mut rx: mpsc::Receiver<Control>,
    cancel: CancellationToken,
) {
    loop {
        let m = tokio::select! {
            _ = cancel.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        if w.send(&m).await.is_err() {
            return;
        }
    }
}
