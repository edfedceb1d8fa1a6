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
        // The first frame recorded sets the origin (compare_exchange's Ok holds the old
        // value, i64::MIN, not the origin just set).
        let base = origin
            .compare_exchange(i64::MIN, capture, Ordering::Relaxed, Ordering::Relaxed)
            .map_or_else(|b| b, |_| capture);
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
            crate::play::Budget::fixed(Duration::from_secs(2)),
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::conference_wire::flags;
    use crate::relay::rooms::tests::track;

    fn obj(n: i64, key: bool) -> Object {
        Object {
            pts_us: n * 40_000,
            flags: if key { flags::KEY } else { 0 },
            payload: Bytes::from(vec![n as u8; 100]),
        }
    }

    /// Lets every task run until it waits (time is paused: the sleep ends only once the
    /// runtime has nothing else to do).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[test]
    fn a_speaker_is_its_highest_video_and_its_sound() {
        let mut tracks = BTreeMap::new();
        for t in [
            track("gd-001", "video", "low", 300),
            track("gd-001", "video", "high", 1500),
            track("gd-001", "audio", "main", 64),
            track("gd-002", "video", "top", 4000),
        ] {
            tracks.insert(t.key(), t);
        }
        let (v, a) = speaker_tracks(&tracks, "gd-001");
        assert_eq!(v.unwrap().info.rendition, "high");
        assert_eq!(a.unwrap().info.rendition, "main");
        let (v, a) = speaker_tracks(&tracks, "gd-002");
        assert_eq!(v.unwrap().info.rendition, "top");
        assert!(a.is_none());
        let (v, a) = speaker_tracks(&tracks, "gd-003");
        assert!(v.is_none() && a.is_none());
    }

    /// The first speaker is recorded from its current group; when the floor passes, the new
    /// speaker from its next keyframe (its group under way would show half a picture), and
    /// the old speaker no more.
    #[tokio::test(start_paused = true)]
    async fn the_recording_follows_the_floor_at_group_boundaries() {
        let room = Room::new("drill", "ministry");
        let chair = track("ministry", "video", "high", 1500);
        let chair_audio = track("ministry", "audio", "main", 64);
        let site = track("gd-001", "video", "high", 1500);
        for t in [&chair, &chair_audio, &site] {
            room.add_track(t.clone());
        }
        let g7 = chair.start_group(7);
        g7.push(obj(0, true));

        let out_video = track("ministry", "video", "high", 1500);
        let out_audio = track("ministry", "audio", "main", 64);
        let speakers = Arc::new(Mutex::new(Vec::new()));
        let follow = Follow {
            tracks: room.tracks.subscribe(),
            floor: room.floor.subscribe(),
            fixed: None,
            video: out_video.clone(),
            audio: Some(out_audio.clone()),
            origin: Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            speakers: speakers.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow.run(stop.clone()));
        settle().await;
        let cur = out_video.current().expect("the chair's current group");
        assert_eq!((cur.seq, cur.len()), (7, 1));
        g7.push(obj(1, false));
        settle().await;
        assert_eq!(out_video.current().unwrap().len(), 2);

        // gd-001 takes the floor in the middle of its group 3.
        let g3 = site.start_group(3);
        g3.push(obj(0, true));
        room.set_floor(Some("gd-001".into()));
        settle().await;
        assert_eq!(out_video.current().unwrap().seq, 7, "nothing of group 3");
        // The chair's next group is not recorded any more.
        chair.start_group(8).push(obj(2, true));
        settle().await;
        assert_eq!(out_video.current().unwrap().seq, 7);
        // gd-001's next keyframe is, numbered after the recording's last group.
        let g4 = site.start_group(4);
        g4.push(obj(1, true));
        settle().await;
        let cur = out_video.current().unwrap();
        assert_eq!((cur.seq, cur.len()), (8, 1));

        let who: Vec<String> = speakers
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.site.clone())
            .collect();
        assert_eq!(who, ["ministry", "gd-001"]);
        assert_eq!(speakers.lock().unwrap()[0].from_s, 0.0);

        stop.cancel();
        task.await.unwrap();
        assert!(out_video.is_closed() && out_audio.is_closed());
    }

    #[tokio::test]
    async fn a_recording_needs_a_ts_file_and_a_picture() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::new("drill", "ministry");
        let e = room
            .start_recording(None, &dir.path().join("drill.mkv"))
            .await
            .unwrap_err();
        assert!(e.contains("MPEG-TS"), "{e}");
        let e = room
            .start_recording(None, &dir.path().join("drill.ts"))
            .await
            .unwrap_err();
        assert!(e.contains("ministry publishes no video"), "{e}");
        let e = room.stop_recording().await.unwrap_err();
        assert!(e.contains("not being recorded"), "{e}");
    }

    #[tokio::test]
    async fn a_room_records_its_speaker_to_mpeg_ts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec/drill.ts");
        let room = Room::new("drill", "ministry");
        let video = track("ministry", "video", "high", 1500);
        room.add_track(video.clone());
        room.start_recording(None, &path).await.unwrap();
        let e = room.start_recording(None, &path).await.unwrap_err();
        assert!(e.contains("already recording the floor"), "{e}");
        let g = video.start_group(1);
        for i in 0..3 {
            g.push(obj(i, i == 0));
        }
        g.finish();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = room.stop_recording().await.unwrap();
        assert_eq!(done.path, path);
        assert_eq!(done.speakers.len(), 1);
        assert_eq!(done.speakers[0].site, "ministry");
        assert_eq!(done.stats.objects, 3);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.is_empty() && bytes.len().is_multiple_of(188) && bytes[0] == 0x47);
    }
}
