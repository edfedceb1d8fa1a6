//! Recording a room's groups to MPEG-TS: who is recorded (a fixed site or the speaker of the
//! moment), splicing their tracks onto one time line, and the finished file's speakers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Room;
use crate::conference_wire::{Object, TrackInfo, TrackKey};
use crate::policy::FloorState;
use crate::track::Track;

/// A recording in progress: a player writing one site's tracks, or the speaker's, to a file.
pub(super) struct Recording {
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
}
