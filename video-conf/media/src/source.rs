//! Sources: a test pattern, a UDP/SRT/RTP stream, a V4L2 camera or a media file, demuxed and
//! decoded, scaled to two renditions and encoded ([`crate::encode`]), cut into groups
//! ([`Feeder`]: at keyframes for video, every [`AUDIO_GROUP`] frames for audio) on tracks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ff::util::mathematics::rescale::Rescale;
use ffmpeg_next as ff;
use tiandi_video::conference_wire::{Object, TrackInfo};
use tiandi_video::track::{Group, Track};
use tracing::info;

use crate::encode::{AudioPath, aac, drain_video, x264};
use crate::{MediaError, US, ffe, init};

/// Audio objects per audio group (AAC frames of 1024 samples: ~0.5 s at 48 kHz).
pub const AUDIO_GROUP: u64 = 24;

/// What to make of a source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub publisher: String,
    pub high_kbps: u32,
    pub low_kbps: u32,
    /// Frames per group (keyframe interval), both renditions.
    pub gop: u32,
    /// Height of the high rendition at most (the low one is 360 lines).
    pub max_height: u32,
}

impl SourceOptions {
    pub fn new(publisher: &str) -> SourceOptions {
        SourceOptions {
            publisher: publisher.into(),
            high_kbps: 1500,
            low_kbps: 300,
            gop: 50,
            max_height: 720,
        }
    }
}

/// A running source: its tracks, and a handle to stop it.
pub struct Source {
    pub tracks: Vec<Arc<Track>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), MediaError>>>,
}

impl Source {
    pub fn stop(&mut self) -> Result<(), MediaError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MediaError::Unsupported("the source thread panicked".into())),
            None => Ok(()),
        }
    }

    /// Whether the source has ended (end of file, stream gone).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens `spec`: `pattern` (a test pattern with a tone), `udp://…` (MPEG-TS from an encoder
/// or `ffmpeg`), `/dev/videoN` (V4L2), or a media file (played at its own pace).
pub fn open_source(spec: &str, opts: SourceOptions) -> Result<Source, MediaError> {
    init();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let stop = Arc::new(AtomicBool::new(false));
    let (spec2, stop2) = (spec.to_string(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("media-source".into())
        .spawn(move || run_source(&spec2, &opts, &stop2, tx))
        .map_err(|e| MediaError::Unsupported(format!("source thread: {e}")))?;
    match rx.recv() {
        Ok(tracks) => Ok(Source {
            tracks,
            stop,
            thread: Some(thread),
        }),
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(MediaError::Unsupported(format!(
                "source {spec} failed to open"
            ))),
        },
    }
}

fn open_input(spec: &str) -> Result<ff::format::context::Input, MediaError> {
    let device = |name: &str| {
        ff::device::input::video()
            .chain(ff::device::input::audio())
            .find(|f| f.name() == name)
            .ok_or_else(|| MediaError::Unsupported(format!("FFmpeg has no {name} input here")))
    };
    let ctx = if spec == "pattern" {
        let mut o = ff::Dictionary::new();
        o.set("graph", "testsrc2=size=1280x720:rate=25[out0];sine=frequency=440:sample_rate=48000:samples_per_frame=1024[out1]");
        ff::format::open_with("", &device("lavfi")?, o)
    } else if spec.starts_with("/dev/video") {
        ff::format::open_with(spec, &device("video4linux2,v4l2")?, ff::Dictionary::new())
    } else if spec.starts_with("udp://") || spec.starts_with("srt://") || spec.starts_with("rtp://") {
        let mut o = ff::Dictionary::new();
        o.set("overrun_nonfatal", "1");
        o.set("fifo_size", "100000");
        o.set("timeout", "10000000");
        return ff::format::input_with_dictionary(&spec, o).map_err(ffe(format!("opening {spec}")));
    } else {
        return ff::format::input(&spec).map_err(ffe(format!("opening {spec}")));
    }
    .map_err(ffe(format!("opening {spec}")))?;
    match ctx {
        ff::format::context::Context::Input(i) => Ok(i),
        _ => Err(MediaError::Unsupported(format!("{spec} is not an input"))),
    }
}

/// Appends objects to a track, starting groups at keyframes (video) or every
/// [`AUDIO_GROUP`] objects (audio).
pub(crate) struct Feeder {
    track: Arc<Track>,
    group: Option<Arc<Group>>,
    seq: u64,
    in_group: u64,
    video: bool,
}

impl Feeder {
    pub(crate) fn new(track: Arc<Track>, video: bool) -> Feeder {
        Feeder {
            track,
            group: None,
            seq: 0,
            in_group: 0,
            video,
        }
    }

    pub(crate) fn push(&mut self, o: Object) {
        let boundary = if self.video {
            o.is_key()
        } else {
            self.in_group >= AUDIO_GROUP
        };
        if self.group.is_none() && self.video && !o.is_key() {
            return; // a video group starts at a keyframe
        }
        if boundary || self.group.is_none() {
            if let Some(g) = self.group.take() {
                g.finish();
            }
            self.seq += 1;
            self.in_group = 0;
            self.group = Some(self.track.start_group(self.seq));
        }
        self.in_group += 1;
        if let Some(g) = &self.group {
            g.push(o);
        }
    }

    pub(crate) fn end(&mut self) {
        if let Some(g) = self.group.take() {
            g.finish();
        }
        self.track.close();
    }
}

fn run_source(
    spec: &str,
    opts: &SourceOptions,
    stop: &AtomicBool,
    ready: std::sync::mpsc::SyncSender<Vec<Arc<Track>>>,
) -> Result<(), MediaError> {
    let mut ictx = open_input(spec)?;
    let vstream = ictx
        .streams()
        .best(ff::media::Type::Video)
        .ok_or_else(|| MediaError::Unsupported(format!("{spec} has no video")))?;
    let (vi, vtb, fps) = (
        vstream.index(),
        vstream.time_base(),
        vstream.avg_frame_rate(),
    );
    let fps = if fps.numerator() > 0 {
        fps
    } else {
        ff::Rational(25, 1)
    };
    let mut vdec = ff::codec::context::Context::from_parameters(vstream.parameters())
        .map_err(ffe("video decoder"))?
        .decoder()
        .video()
        .map_err(ffe("video decoder"))?;
    let astream = ictx.streams().best(ff::media::Type::Audio);
    let (ai, atb) = astream
        .as_ref()
        .map_or((usize::MAX, US), |s| (s.index(), s.time_base()));
    let mut adec = match astream {
        Some(s) => Some(
            ff::codec::context::Context::from_parameters(s.parameters())
                .map_err(ffe("audio decoder"))?
                .decoder()
                .audio()
                .map_err(ffe("audio decoder"))?,
        ),
        None => None,
    };
    // Renditions: high at the source's size (at most max_height lines), low at 360 lines.
    let (sw, sh) = (vdec.width(), vdec.height());
    if sw == 0 || sh == 0 {
        return Err(MediaError::Unsupported(format!(
            "{spec}: video of unknown size"
        )));
    }
    let even = |x: u32| (x / 2 * 2).max(2);
    let hh = sh.min(opts.max_height);
    let (hw, hh) = (even(sw * hh / sh), even(hh));
    let (lw, lh) = (even(sw * 360 / sh), 360);
    let mut high = x264(hw, hh, opts.high_kbps, opts.gop, fps)?;
    let mut low = x264(lw, lh, opts.low_kbps, opts.gop, fps)?;
    let mut to_high = ff::software::scaling::Context::get(
        vdec.format(),
        sw,
        sh,
        ff::format::Pixel::YUV420P,
        hw,
        hh,
        ff::software::scaling::Flags::BILINEAR,
    )
    .map_err(ffe("scaler"))?;
    let mut to_low = ff::software::scaling::Context::get(
        vdec.format(),
        sw,
        sh,
        ff::format::Pixel::YUV420P,
        lw,
        lh,
        ff::software::scaling::Flags::BILINEAR,
    )
    .map_err(ffe("scaler"))?;
    let vinfo = |rendition: &str, kbps: u32, w: u32, h: u32| TrackInfo {
        publisher: opts.publisher.clone(),
        kind: "video".into(),
        codec: "h264".into(),
        rendition: rendition.into(),
        bitrate_kbps: kbps,
        width: w,
        height: h,
        ..Default::default()
    };
    // The media clock against the wall clock: read up to the first video packet (fed to the
    // decoder, not lost), so every track can say what wall time its media time 0 was (a
    // receiver then knows each frame's age: glass-to-glass, less capture and display).
    let started = Instant::now();
    let mut first_us: Option<i64> = None;
    for (stream, packet) in ictx.packets() {
        if stream.index() == vi
            && let Some(pts) = packet.pts()
        {
            first_us = Some(pts.rescale(vtb, US));
            let _ = vdec.send_packet(&packet);
            break;
        }
    }
    let clock_us = tiandi_video::now_us() - first_us.unwrap_or(0);
    let vinfo = |rendition: &str, kbps: u32, w: u32, h: u32| TrackInfo {
        clock_us,
        ..vinfo(rendition, kbps, w, h)
    };
    let th = Track::new(vinfo("high", opts.high_kbps, hw, hh));
    let tl = Track::new(vinfo("low", opts.low_kbps, lw, lh));
    let mut fh = Feeder::new(th.clone(), true);
    let mut fl = Feeder::new(tl.clone(), true);
    let mut tracks = vec![th, tl];
    let mut audio = match &adec {
        Some(d) => {
            let layout = if d.channel_layout().channels() > 0 {
                d.channel_layout()
            } else {
                ff::ChannelLayout::default(i32::from(d.channels()))
            };
            let enc = aac(d.rate(), layout)?;
            let rs = ff::software::resampling::Context::get(
                d.format(),
                layout,
                d.rate(),
                enc.format(),
                layout,
                d.rate(),
            )
            .map_err(ffe("resampler"))?;
            let t = Track::new(TrackInfo {
                publisher: opts.publisher.clone(),
                kind: "audio".into(),
                codec: "aac".into(),
                rendition: "main".into(),
                bitrate_kbps: 96,
                clock_us,
                sample_rate: d.rate(),
                channels: u32::from(layout.channels() as u16),
                ..Default::default()
            });
            tracks.push(t.clone());
            Some(AudioPath {
                enc,
                rs,
                fifo: vec![Vec::new(); layout.channels() as usize],
                layout,
                rate: d.rate(),
                next_pts: None,
                feed: Feeder::new(t, false),
            })
        }
        None => None,
    };
    let _ = ready.send(tracks);
    info!(source = spec, width = hw, height = hh, "Source open.");

    let mut vframe = ff::frame::Video::empty();
    let mut aframe = ff::frame::Audio::empty();
    for (stream, packet) in ictx.packets() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let idx = stream.index();
        if idx == vi {
            if vdec.send_packet(&packet).is_err() {
                continue; // a damaged packet: the decoder resyncs at the next keyframe
            }
            while vdec.receive_frame(&mut vframe).is_ok() {
                let Some(ts) = vframe.timestamp() else {
                    continue;
                };
                let us = ts.rescale(vtb, US);
                // Play files and generated patterns at their own pace (live sources already are).
                let first = *first_us.get_or_insert(us);
                let due = Duration::from_micros(u64::try_from(us - first).unwrap_or(0));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_secs(1)));
                }
                for (scaler, enc, feed) in [
                    (&mut to_high, &mut high, &mut fh),
                    (&mut to_low, &mut low, &mut fl),
                ] {
                    let mut out = ff::frame::Video::empty();
                    if scaler.run(&vframe, &mut out).is_err() {
                        continue;
                    }
                    out.set_pts(Some(us));
                    out.set_kind(ff::picture::Type::None);
                    if enc.send_frame(&out).is_ok() {
                        drain_video(enc, feed);
                    }
                }
            }
        } else if idx == ai {
            let (Some(dec), Some(a)) = (adec.as_mut(), audio.as_mut()) else {
                continue;
            };
            if dec.send_packet(&packet).is_err() {
                continue;
            }
            while dec.receive_frame(&mut aframe).is_ok() {
                let Some(ts) = aframe.timestamp() else {
                    continue;
                };
                a.push(&aframe, ts.rescale(atb, US));
            }
        }
    }
    for f in [&mut fh, &mut fl] {
        f.end();
    }
    if let Some(a) = audio.as_mut() {
        a.feed.end();
    }
    info!(source = spec, "Source ended.");
    Ok(())
}
