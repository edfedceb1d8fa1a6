//! Playing tracks: each track's groups in order, from the current one, never a frame older
//! than the latency budget; the start at a video keyframe with the sound from that moment;
//! what was seen (frames, ages, gaps) counted. The bytes go to a [`Mux`]: the MPEG-TS writer
//! of [`crate::ts`] (a relay's recordings), or the media crate's (`tiandi-media`: FFmpeg, for
//! players on a site). No codec here: objects are passed on as they arrived.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use tracing::info;

use crate::conference_wire::{Object, TrackInfo};
use crate::track::Track;

mod budget;
mod live;
mod playout;
mod reader;

pub use budget::{
    ALLOWANCE_FLOOR, ALLOWANCE_START, Budget, CONCEAL_MAX, Overdue, REPAIR_CUSHION, TAIL_GRACE,
    next_wait, path_allowance,
};
pub use live::{LIVE_AGES, Live, Watched};
pub use playout::PLAYOUT_MAX;
use playout::Playout;
use reader::{Reader, TrackCounts};

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
