//! Playing tracks: each track's groups in order, from the current one, never a frame older
//! than the latency budget; the start at a video keyframe with the sound from that moment;
//! what was seen (frames, ages, gaps) counted. The bytes go to a [`Mux`]: the MPEG-TS writer
//! of [`crate::ts`] (a relay's recordings), or the media crate's (`tiandi-media`: FFmpeg, for
//! players on a site). No codec here: objects are passed on as they arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

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
}

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
            "objects={} skipped={} latency_p50_ms={:.0} latency_p99_ms={:.0} latency_max_ms={:.0} max_pts_gap_ms={} max_wall_gap_ms={}",
            self.objects,
            self.skipped
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.latency_pct(0.5),
            self.latency_pct(0.99),
            self.latency_pct(1.0),
            list(&self.max_pts_gap_ms),
            list(&self.max_wall_gap_ms),
        )
    }
}

impl Sink {
    pub fn new(mux: Box<dyn Mux>, tracks: &[TrackInfo]) -> Sink {
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
            let gap = (o.pts_us - *last) as f64 / 1000.0;
            let m = &mut self.stats.max_pts_gap_ms[index];
            *m = m.max(gap);
        }
        *last = o.pts_us;
        let now = Instant::now();
        if let Some(prev) = self.last_wall[index].replace(now) {
            let w = now.duration_since(prev).as_secs_f64() * 1000.0;
            let m = &mut self.stats.max_wall_gap_ms[index];
            *m = m.max(w);
        }
        if self.clocks[index] != 0 {
            self.stats
                .latency_ms
                .push((crate::now_us() - self.clocks[index] - o.pts_us) as f64 / 1000.0);
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
    latency: Duration,
) -> Result<PlayStats, MediaError> {
    let open: OpenMux = Box::new(move |infos: &[TrackInfo]| {
        Ok(Box::new(crate::ts::TsMux::create(&path, infos)?) as Box<dyn Mux>)
    });
    play_into(tracks, open, stop, latency).await
}

/// How long a player waits at least for the rest of a group once a newer one has begun
/// (longer, up to its target latency, when the publisher's clock is known).
pub const TAIL_GRACE: Duration = Duration::from_millis(300);

/// The oldest a frame may be when played (µs): the target latency; or, when the clocks are
/// so far apart that frames arrive older than that, the youngest age seen plus half of it.
pub fn age_budget(latency: Duration, min_age_us: i64) -> i64 {
    let l = latency.as_micros() as i64;
    if min_age_us == i64::MAX {
        l
    } else {
        l.max(min_age_us.saturating_add(l / 2))
    }
}

/// How long a player waits for a group's next frame: until it is `due_us` (the budget of
/// [`age_budget`]; past it, the rest of the group is given up: live beats complete, and
/// video skips to the next keyframe while sound goes on); at least [`TAIL_GRACE`] once a
/// newer group has begun (its stream may have overtaken this one's tail); without a clock,
/// that grace or, with no newer group, as long as it takes.
pub fn tail_wait(newer: bool, due_us: Option<i64>, now_us: i64) -> Duration {
    let until_due = due_us.map(|d| Duration::from_micros(u64::try_from(d - now_us).unwrap_or(0)));
    match (newer, until_due) {
        (false, None) => Duration::from_secs(3600),
        (false, Some(d)) => d,
        (true, None) => TAIL_GRACE,
        (true, Some(d)) => d.max(TAIL_GRACE),
    }
}

/// Plays `tracks` (received, or a local source's) into the muxer `open` makes for them (on the
/// sink's thread: a muxer may block on its file or socket) until they end or `stop` fires: each track's groups in order, from the current one. With the publisher's
/// clock known, no frame older than `latency` ([`age_budget`]) is played: a group whose next
/// frame is late, or arrives older than that, is given up, as is a dropped one (counted in
/// the result: groups skipped per track), and the track goes on at its next group.
pub async fn play_into(
    tracks: Vec<Arc<Track>>,
    open: OpenMux,
    stop: tokio_util::sync::CancellationToken,
    latency: Duration,
) -> Result<PlayStats, MediaError> {
    let infos: Vec<TrackInfo> = tracks.iter().map(|t| t.info.clone()).collect();
    // Bounded: a sink that cannot keep up (a slow disk) holds the readers back, and the
    // relay then drops old groups for this client rather than queue them.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Object)>(1024);
    let writer = std::thread::Builder::new()
        .name("media-sink".into())
        .spawn(move || -> Result<PlayStats, MediaError> {
            let mut sink = Sink::new(open(&infos)?, &infos);
            while let Ok((i, o)) = rx.recv() {
                sink.write(i, &o)?;
            }
            sink.finish()
        })
        .map_err(|e| MediaError::Unsupported(format!("sink thread: {e}")))?;
    let mut readers = Vec::new();
    // The youngest age a frame arrived at (µs; all tracks): the link's delay plus any offset
    // between the publisher's clock and ours.
    let min_age = Arc::new(AtomicI64::new(i64::MAX));
    for (i, t) in tracks.into_iter().enumerate() {
        let (tx, stop, min_age) = (tx.clone(), stop.clone(), min_age.clone());
        readers.push(tokio::spawn(async move {
            let mut rx = t.subscribe();
            let mut skipped = 0u64;
            let mut last_seq = 0u64;
            while let Some(g) = crate::track::next_group(&t, &mut rx, &stop).await {
                if last_seq != 0 && g.seq > last_seq + 1 {
                    skipped += g.seq - last_seq - 1;
                }
                last_seq = g.seq;
                let mut n = 0;
                // Media time of this group's last frame played.
                let mut last_pts: Option<i64> = None;
                loop {
                    // The next frame is due on screen when the last one played is as old as
                    // the budget allows (if the publisher's clock is known).
                    let due = (t.info.clock_us != 0)
                        .then_some(last_pts)
                        .flatten()
                        .map(|p| {
                            t.info.clock_us
                                + p
                                + age_budget(latency, min_age.load(Ordering::Relaxed))
                        });
                    let grace = tail_wait(rx.has_changed().unwrap_or(false), due, crate::now_us());
                    // A newer group arriving while this one waits ends the wait: look again
                    // with the tail's grace.
                    let mut newer = rx.clone();
                    let newer_known = rx.has_changed().unwrap_or(false);
                    let fetched = tokio::select! {
                        _ = stop.cancelled() => None,
                        _ = newer.changed(), if !newer_known => continue,
                        f = tokio::time::timeout(grace, g.next_from(n)) => match f {
                            Ok(f) => Some(f),
                            Err(_) => { skipped += 1; break }
                        },
                    };
                    match fetched {
                        Some(crate::track::Fetch::Objects(objs)) => {
                            n += objs.len();
                            if let Some(o) = objs.last() {
                                last_pts = Some(o.pts_us);
                                if t.info.clock_us != 0 {
                                    let age = crate::now_us() - t.info.clock_us - o.pts_us;
                                    min_age.fetch_min(age, Ordering::Relaxed);
                                }
                            }
                            // A frame already older than the budget is not shown, nor the
                            // rest of its group (it would not decode without it): a late
                            // joiner's first group, or a frame a repair came too late for.
                            let budget = age_budget(latency, min_age.load(Ordering::Relaxed));
                            let now = crate::now_us();
                            let late = |o: &Object| {
                                t.info.clock_us != 0 && now - t.info.clock_us - o.pts_us > budget
                            };
                            let too_late = objs.iter().position(late);
                            let objs = match too_late {
                                Some(k) => objs[..k].to_vec(),
                                None => objs,
                            };
                            for o in objs {
                                let tx = tx.clone();
                                if tokio::task::spawn_blocking(move || tx.send((i, o)))
                                    .await
                                    .map_or(true, |r| r.is_err())
                                {
                                    return skipped;
                                }
                            }
                            if too_late.is_some() {
                                skipped += 1;
                                break;
                            }
                        }
                        Some(crate::track::Fetch::Aborted) => {
                            skipped += 1;
                            break;
                        }
                        Some(crate::track::Fetch::End) => break,
                        None => return skipped,
                    }
                }
            }
            skipped
        }));
    }
    drop(tx);
    let mut skipped = Vec::new();
    for r in readers {
        skipped.push(r.await.unwrap_or(0));
    }
    let mut stats = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| MediaError::Unsupported(format!("sink: {e}")))?
        .map_err(|_| MediaError::Unsupported("the sink thread panicked".into()))??;
    stats.skipped = skipped;
    info!(objects = stats.objects, "Playback ended.");
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_later_than_the_budget_are_not_waited_for() {
        let l = Duration::from_millis(1000);
        // Clocks in step: the budget is the target latency.
        assert_eq!(age_budget(l, i64::MAX), 1_000_000);
        assert_eq!(age_budget(l, 300_000), 1_000_000);
        // The publisher's clock 5 s behind ours: judged from the youngest age seen.
        assert_eq!(age_budget(l, 5_300_000), 5_800_000);
        let now = 10_000_000;
        assert_eq!(
            tail_wait(false, Some(now + 700_000), now),
            Duration::from_millis(700)
        );
        assert_eq!(tail_wait(false, Some(now - 1), now), Duration::ZERO);
        assert_eq!(tail_wait(true, Some(now - 1), now), TAIL_GRACE);
        assert_eq!(tail_wait(true, None, now), TAIL_GRACE);
        assert_eq!(tail_wait(false, None, now), Duration::from_secs(3600));
    }
}
