//! Playing tracks: each track's groups in order, from the current one, never a frame older
//! than the latency budget; the start at a video keyframe with the sound from that moment;
//! what was seen (frames, ages, gaps) counted. The bytes go to a [`Mux`]: the MPEG-TS writer
//! of [`crate::ts`] (a relay's recordings), or the media crate's (`tiandi-media`: FFmpeg, for
//! players on a site). No codec here: objects are passed on as they arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::conference_wire::{Object, TrackInfo};
use crate::track::Track;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A codec or container library failed (FFmpeg, in the media crate).
    #[error("{what}: {source}")]
    Codec {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// Where a player's objects go: a container writer. `index` is the track's position in the
/// list the muxer was opened for; objects arrive in order per track, each track from the
/// chosen start on.
pub trait Mux: Send {
    fn write(&mut self, index: usize, o: &Object) -> Result<(), MediaError>;
    /// Ends the container; `written` objects were written in all.
    fn finish(self: Box<Self>, written: u64) -> Result<(), MediaError>;
}

/// Opens a muxer for the tracks played (called on the sink's thread).
pub type OpenMux = Box<dyn FnOnce(&[TrackInfo]) -> Result<Box<dyn Mux>, MediaError> + Send>;

/// Writes received tracks to a [`Mux`]: playback starts at a video keyframe with the sound
/// from that moment; objects not after the last one written of their track are skipped.
pub struct Sink {
    mux: Box<dyn Mux>,
    /// Per stream: last pts written (µs).
    last: Vec<i64>,
    /// The video stream, if any: playback starts at its first keyframe, audio with it.
    video: Option<usize>,
    start_us: Option<i64>,
    /// Objects held until the start is chosen.
    pending: Vec<(usize, Object)>,
    /// Per stream: the publisher's wall clock at media time 0 (0: unknown).
    clocks: Vec<i64>,
    pub stats: PlayStats,
    /// Per stream: wall time of the last write.
    last_wall: Vec<Option<Instant>>,
    /// The video's frame interval seen (µs; 0: not yet).
    interval_us: i64,
    live: Arc<Live>,
}

/// What a player saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlayStats {
    pub objects: u64,
    /// Groups skipped per track (dropped on the way, or given up on).
    pub skipped: Vec<u64>,
    /// Age of each frame when written (publisher's clock at its media time to now), ms.
    pub latency_ms: Vec<f64>,
    /// Per stream: the largest step in media time between consecutive frames (ms).
    pub max_pts_gap_ms: Vec<f64>,
    /// Per stream: the longest wall-clock wait between consecutive frames (ms): a stall.
    pub max_wall_gap_ms: Vec<f64>,
    /// Audio frames concealed (the last one repeated in place of a late one).
    pub concealed: u64,
    /// Video stalls: a wall-clock wait between consecutive frames of at least [`FREEZE`]
    /// and three frame intervals.
    pub freezes: u64,
}

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

    fn frame(&self, pts_us: i64, interval_us: i64, stall: Option<Duration>, age_ms: Option<f64>) {
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

/// The shortest stall counted as a freeze.
pub const FREEZE: Duration = Duration::from_millis(120);

impl PlayStats {
    pub fn latency_pct(&self, p: f64) -> f64 {
        let mut v = self.latency_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return -1.0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    /// One `key=value` line.
    pub fn summary(&self) -> String {
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "objects={} skipped={} concealed={} freezes={} latency_p50_ms={:.0} latency_p99_ms={:.0} latency_max_ms={:.0} max_pts_gap_ms={} max_wall_gap_ms={}",
            self.objects,
            self.skipped
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.concealed,
            self.freezes,
            self.latency_pct(0.5),
            self.latency_pct(0.99),
            self.latency_pct(1.0),
            list(&self.max_pts_gap_ms),
            list(&self.max_wall_gap_ms),
        )
    }
}

impl Sink {
    pub fn new(mux: Box<dyn Mux>, tracks: &[TrackInfo], live: Arc<Live>) -> Sink {
        Sink {
            mux,
            last: vec![i64::MIN; tracks.len()],
            video: tracks.iter().position(|t| t.kind == "video"),
            start_us: None,
            pending: Vec::new(),
            clocks: tracks.iter().map(|t| t.clock_us).collect(),
            stats: PlayStats {
                max_pts_gap_ms: vec![0.0; tracks.len()],
                max_wall_gap_ms: vec![0.0; tracks.len()],
                ..Default::default()
            },
            last_wall: vec![None; tracks.len()],
            interval_us: 0,
            live,
        }
    }

    /// Writes one object of stream `index`; objects not after the last one written are
    /// skipped (a late group tail). Playback starts at a video keyframe with sound from
    /// that moment on: until both have arrived, objects wait here (a few seconds at most),
    /// then the start is the first keyframe not before the first audio.
    pub fn write(&mut self, index: usize, o: &Object) -> Result<bool, MediaError> {
        if self.start_us.is_none() {
            self.pending.push((index, o.clone()));
            let Some(start) = self.choose_start() else {
                return Ok(false);
            };
            self.start_us = Some(start);
            let mut wrote = false;
            for (i, o) in std::mem::take(&mut self.pending) {
                if o.pts_us >= start {
                    wrote |= self.write_now(i, &o)?;
                }
            }
            return Ok(wrote);
        }
        if self.start_us.is_some_and(|s| o.pts_us < s) {
            return Ok(false);
        }
        self.write_now(index, o)
    }

    /// Where playback starts, once it can be decided.
    fn choose_start(&self) -> Option<i64> {
        let Some(v) = self.video else {
            return self.pending.first().map(|(_, o)| o.pts_us);
        };
        let keys = || {
            self.pending
                .iter()
                .filter(|(i, o)| *i == v && o.is_key())
                .map(|(_, o)| o.pts_us)
        };
        let audio_from = self
            .pending
            .iter()
            .filter(|(i, _)| *i != v)
            .map(|(_, o)| o.pts_us)
            .min();
        match audio_from {
            // One AAC frame of slack: the keyframe and the sound it starts with.
            Some(a) => keys().find(|k| *k >= a - 25_000),
            // No sound yet: wait for it a while, then start without it.
            None if self.last.len() == 1 || self.pending.len() > 500 => keys().next(),
            None => None,
        }
    }

    fn write_now(&mut self, index: usize, o: &Object) -> Result<bool, MediaError> {
        let Some(last) = self.last.get_mut(index) else {
            return Ok(false);
        };
        if o.pts_us <= *last {
            return Ok(false);
        }
        if *last != i64::MIN {
            if Some(index) == self.video {
                let step = o.pts_us - *last;
                if self.interval_us == 0 || step < self.interval_us {
                    self.interval_us = step;
                }
            }
            let gap = (o.pts_us - *last) as f64 / 1000.0;
            let m = &mut self.stats.max_pts_gap_ms[index];
            *m = m.max(gap);
        }
        *last = o.pts_us;
        let now = Instant::now();
        let mut stall = None;
        if let Some(prev) = self.last_wall[index].replace(now) {
            let w = now.duration_since(prev);
            let ms = w.as_secs_f64() * 1000.0;
            let m = &mut self.stats.max_wall_gap_ms[index];
            *m = m.max(ms);
            if Some(index) == self.video
                && w >= FREEZE
                && w.as_micros() as i64 >= 3 * self.interval_us.max(1)
            {
                self.stats.freezes += 1;
                stall = Some(w);
            }
        }
        let mut age = None;
        if self.clocks[index] != 0 {
            let a = (crate::now_us() - self.clocks[index] - o.pts_us) as f64 / 1000.0;
            self.stats.latency_ms.push(a);
            age = Some(a);
        }
        if Some(index) == self.video {
            self.live.frame(o.pts_us, self.interval_us, stall, age);
        }
        self.stats.objects += 1;
        self.mux.write(index, o)?;
        Ok(true)
    }

    pub fn finish(self) -> Result<PlayStats, MediaError> {
        self.mux.finish(self.stats.objects)?;
        Ok(self.stats)
    }
}

/// Plays `tracks` into an MPEG-TS file at `path` ([`crate::ts`]): what a relay records.
pub async fn record(
    tracks: Vec<Arc<Track>>,
    path: std::path::PathBuf,
    stop: tokio_util::sync::CancellationToken,
    budget: Budget,
) -> Result<PlayStats, MediaError> {
    let live = Arc::new(Live::default());
    let open: OpenMux = Box::new(move |infos: &[TrackInfo]| {
        Ok(Box::new(crate::ts::TsMux::create(&path, infos)?) as Box<dyn Mux>)
    });
    play_into(tracks, open, stop, budget, live).await
}

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

    /// Twice the mean spread of arrival ages (µs): how unevenly frames come.
    fn jitter_us(&self) -> i64 {
        2 * self.spread_us.load(Ordering::Relaxed).max(0)
    }

    pub fn allowance(&self) -> Duration {
        Duration::from_micros(self.allowance_us.load(Ordering::Relaxed).max(0) as u64)
    }

    /// A frame arrived `spread` later than the youngest (clamped to 500 ms: a frame held
    /// behind a repaired loss is not the path's jitter).
    fn arrived(&self, spread_us: i64) {
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

/// Plays `tracks` (received, or a local source's) into the muxer `open` makes for them (on
/// the sink's thread: a muxer may block on its file or socket) until they end or `stop`
/// fires: each track's groups in order, from the current one, frames as soon as they are
/// here. A frame later than `budget` allows holds the picture until it comes (then the ones
/// behind it follow at once: the picture catches up), a late audio frame is concealed; a
/// group is given up only when it was reset on the way, or a newer one has begun and its
/// next frame is a whole allowance overdue (counted: groups skipped per track). What it
/// shows is in `live` as it plays.
pub async fn play_into(
    tracks: Vec<Arc<Track>>,
    open: OpenMux,
    stop: tokio_util::sync::CancellationToken,
    budget: Budget,
    live: Arc<Live>,
) -> Result<PlayStats, MediaError> {
    let infos: Vec<TrackInfo> = tracks.iter().map(|t| t.info.clone()).collect();
    // Bounded: a sink that cannot keep up (a slow disk) holds the readers back, and the
    // relay then drops old groups for this client rather than queue them.
    // Each object with the wall time (µs) it is to be played at (0: at once): the sink waits
    // for it, a jitter buffer of the budget's cushion.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Object, i64)>(1024);
    let writer = std::thread::Builder::new()
        .name("media-sink".into())
        .spawn(move || -> Result<PlayStats, MediaError> {
            let mut sink = Sink::new(open(&infos)?, &infos, live);
            let mut due = Playout::default();
            // Objects arrive in their tracks' arrival order (a keyframe after the sound of
            // its moment); they are written in the order of their time to play.
            loop {
                while let Some((i, o)) = due.pop_due() {
                    sink.write(i, &o)?;
                }
                if due.closed && due.is_empty() {
                    break;
                }
                let got = match due.wait() {
                    None => rx
                        .recv()
                        .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                    Some(d) => rx.recv_timeout(d),
                };
                match got {
                    Ok((i, o, at)) => due.push(i, o, at),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => due.closed = true,
                }
            }
            sink.finish()
        })
        .map_err(|e| MediaError::Unsupported(format!("sink thread: {e}")))?;
    let mut readers = Vec::new();
    // The youngest age a frame arrived at (µs; all tracks): the link's delay plus any offset
    // between the publisher's clock and ours.
    let min_age = Arc::new(AtomicI64::new(i64::MAX));
    for (i, t) in tracks.into_iter().enumerate() {
        let (tx, stop, min_age, budget) =
            (tx.clone(), stop.clone(), min_age.clone(), budget.clone());
        readers.push(tokio::spawn(async move {
            let mut r = Reader {
                index: i,
                tx,
                min_age: min_age.clone(),
                budget: budget.clone(),
                last_at: 0,
                audio: t.info.kind == "audio",
                clock: t.info.clock_us,
                last: None,
                interval_us: 0,
                concealed_run: 0,
                counts: TrackCounts::default(),
            };
            r.run(&t, &stop).await;
            r.counts
        }));
    }
    drop(tx);
    let mut counts = Vec::new();
    for r in readers {
        counts.push(r.await.unwrap_or_default());
    }
    let mut stats = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| MediaError::Unsupported(format!("sink: {e}")))?
        .map_err(|_| MediaError::Unsupported("the sink thread panicked".into()))??;
    stats.skipped = counts.iter().map(|c| c.skipped).collect();
    stats.concealed = counts.iter().map(|c| c.concealed).sum();
    info!(objects = stats.objects, "Playback ended.");
    Ok(stats)
}

/// Objects waiting for their time to play, earliest first (at most [`PLAYOUT_MAX`]: beyond
/// that the earliest is played at once).
#[derive(Default)]
struct Playout {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u64, usize)>>,
    objects: std::collections::HashMap<u64, Object>,
    n: u64,
    /// The readers are gone: what is left is played at once.
    closed: bool,
}

/// Objects a player holds for their time to play (~10 s of video and sound).
pub const PLAYOUT_MAX: usize = 4096;

impl Playout {
    fn push(&mut self, index: usize, o: Object, at: i64) {
        self.n += 1;
        self.heap.push(std::cmp::Reverse((at, self.n, index)));
        self.objects.insert(self.n, o);
    }

    fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// How long until the earliest is due (None: nothing held).
    fn wait(&self) -> Option<Duration> {
        let std::cmp::Reverse((at, _, _)) = self.heap.peek()?;
        Some(Duration::from_micros(
            u64::try_from(at - crate::now_us()).unwrap_or(0),
        ))
    }

    fn pop_due(&mut self) -> Option<(usize, Object)> {
        let std::cmp::Reverse((at, _, _)) = *self.heap.peek()?;
        if !self.closed && self.heap.len() <= PLAYOUT_MAX && at > crate::now_us() {
            return None;
        }
        let std::cmp::Reverse((_, n, i)) = self.heap.pop()?;
        Some((i, self.objects.remove(&n)?))
    }
}

/// What one track's reader counted.
#[derive(Debug, Default, Clone, Copy)]
struct TrackCounts {
    skipped: u64,
    concealed: u64,
}

/// One track's reader: its groups in order into the sink's channel.
struct Reader {
    index: usize,
    tx: std::sync::mpsc::SyncSender<(usize, Object, i64)>,
    min_age: Arc<AtomicI64>,
    budget: Budget,
    /// When the last object passed on is to be played (µs; 0: at once).
    last_at: i64,
    audio: bool,
    /// The publisher's wall clock at media time 0 (µs; 0: unknown).
    clock: i64,
    /// The last frame passed on (a concealment repeats it).
    last: Option<Object>,
    /// The frame interval seen (µs; 0: not yet).
    interval_us: i64,
    concealed_run: u32,
    counts: TrackCounts,
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

    async fn run(&mut self, t: &Track, stop: &tokio_util::sync::CancellationToken) {
        let (min_age, budget) = (self.min_age.clone(), self.budget.clone());
        let kind = t.info.kind.as_str();
        let mut rx = t.subscribe();
        let mut last_seq = 0u64;
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
                let (wait, overdue) =
                    next_wait(conceal, newer_known, due, allowance, crate::now_us());
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
    fn objects_are_played_in_the_order_of_their_time() {
        let o = |pts: i64| Object {
            pts_us: pts,
            flags: 0,
            payload: bytes::Bytes::new(),
        };
        let now = crate::now_us();
        let mut p = Playout::default();
        // Sound for a moment arrives before the picture of that moment.
        p.push(1, o(2), now + 60_000);
        p.push(0, o(1), now + 20_000);
        p.push(1, o(3), now - 5_000);
        assert_eq!(
            p.pop_due().map(|(i, o)| (i, o.pts_us)),
            Some((1, 3)),
            "late: at once"
        );
        assert!(p.pop_due().is_none(), "the rest is not due yet");
        assert!(p.wait().unwrap() <= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(p.pop_due().map(|(i, _)| i), Some(0));
        assert!(p.pop_due().is_none());
        p.closed = true;
        assert_eq!(
            p.pop_due().map(|(i, _)| i),
            Some(1),
            "closed: what is left at once"
        );
        assert!(p.is_empty());
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
