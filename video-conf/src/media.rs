//! Media in and out through FFmpeg (ffmpeg-next): a source becomes tracks (H.264 in two
//! renditions with keyframes at the same frames, AAC audio), and received tracks become
//! MPEG-TS for a decoder, a TV, VLC, or a file.
//!
//! FFmpeg calls block, so sources and sinks run on threads of their own; tracks and channels
//! connect them to the async side.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff::util::mathematics::rescale::Rescale;
use ffmpeg_next as ff;
use tracing::{info, warn};

use crate::track::{Group, Track};
use crate::wire::{Object, TrackInfo, flags};

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{what}: {source}")]
    Ffmpeg {
        what: String,
        #[source]
        source: ff::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

fn ffe(what: impl Into<String>) -> impl FnOnce(ff::Error) -> MediaError {
    let what = what.into();
    move |source| MediaError::Ffmpeg { what, source }
}

/// Microseconds: the media clock on the wire.
const US: ff::Rational = ff::Rational(1, 1_000_000);
/// Audio objects per audio group (AAC frames of 1024 samples: ~0.5 s at 48 kHz).
pub const AUDIO_GROUP: u64 = 24;

pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ff::init();
        ff::device::register_all();
        ff::util::log::set_level(ff::util::log::Level::Error);
    });
}

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

fn x264(
    w: u32,
    h: u32,
    kbps: u32,
    gop: u32,
    fps: ff::Rational,
) -> Result<ff::encoder::Video, MediaError> {
    let codec = ff::encoder::find_by_name("libx264")
        .ok_or_else(|| MediaError::Unsupported("FFmpeg here has no libx264".into()))?;
    let mut e = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(ffe("x264 context"))?;
    e.set_width(w);
    e.set_height(h);
    e.set_format(ff::format::Pixel::YUV420P);
    e.set_time_base(US);
    e.set_frame_rate(Some(fps));
    e.set_gop(gop);
    e.set_max_b_frames(0);
    e.set_bit_rate(kbps as usize * 1000);
    e.set_max_bit_rate(kbps as usize * 1000);
    let mut o = ff::Dictionary::new();
    o.set("preset", "veryfast");
    o.set("tune", "zerolatency");
    // Keyframes only every `gop` frames, in both renditions alike: groups line up, so a
    // subscriber can switch rendition at any group boundary.
    o.set(
        "x264-params",
        &format!("scenecut=0:keyint={gop}:min-keyint={gop}:vbv-bufsize={kbps}"),
    );
    e.open_as_with(codec, o).map_err(ffe("opening x264"))
}

/// An AAC encoder for `rate` and `layout`.
fn aac(rate: u32, layout: ff::ChannelLayout) -> Result<ff::encoder::Audio, MediaError> {
    let codec = ff::encoder::find(ff::codec::Id::AAC)
        .ok_or_else(|| MediaError::Unsupported("FFmpeg here has no AAC encoder".into()))?;
    let mut e = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .audio()
        .map_err(ffe("AAC context"))?;
    e.set_rate(rate as i32);
    e.set_channel_layout(layout);
    e.set_format(ff::format::Sample::F32(ff::format::sample::Type::Planar));
    e.set_bit_rate(96_000);
    e.set_time_base(ff::Rational(1, rate as i32));
    e.open_as(codec).map_err(ffe("opening the AAC encoder"))
}

/// ADTS header for one raw AAC-LC frame (what MPEG-TS carries).
pub fn adts(frame_len: usize, rate: u32, channels: u16) -> [u8; 7] {
    const RATES: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let sr = RATES.iter().position(|r| *r == rate).unwrap_or(3) as u8;
    let len = frame_len + 7;
    let ch = channels.min(7) as u8;
    [
        0xFF,
        0xF1,
        (1 << 6) | (sr << 2) | (ch >> 2),
        ((ch & 3) << 6) | ((len >> 11) as u8 & 3),
        (len >> 3) as u8,
        (((len & 7) as u8) << 5) | 0x1F,
        0xFC,
    ]
}

/// Appends objects to a track, starting groups at keyframes (video) or every
/// [`AUDIO_GROUP`] objects (audio).
struct Feeder {
    track: Arc<Track>,
    group: Option<Arc<Group>>,
    seq: u64,
    in_group: u64,
    video: bool,
}

impl Feeder {
    fn new(track: Arc<Track>, video: bool) -> Feeder {
        Feeder {
            track,
            group: None,
            seq: 0,
            in_group: 0,
            video,
        }
    }

    fn push(&mut self, o: Object) {
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

    fn end(&mut self) {
        if let Some(g) = self.group.take() {
            g.finish();
        }
        self.track.close();
    }
}

fn drain_video(enc: &mut ff::encoder::Video, feed: &mut Feeder) {
    let mut p = ff::Packet::empty();
    while enc.receive_packet(&mut p).is_ok() {
        let (Some(data), Some(pts)) = (p.data(), p.pts()) else {
            continue;
        };
        feed.push(Object {
            pts_us: pts,
            flags: if p.is_key() { flags::KEY } else { 0 },
            payload: Bytes::copy_from_slice(data),
        });
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
    let clock_us = crate::now_us() - first_us.unwrap_or(0);
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

/// Decoded audio → planar float → 1024-sample frames → AAC → ADTS objects.
struct AudioPath {
    enc: ff::encoder::Audio,
    rs: ff::software::resampling::Context,
    fifo: Vec<Vec<f32>>,
    layout: ff::ChannelLayout,
    rate: u32,
    /// Media time (µs) of the FIFO's first sample.
    next_pts: Option<i64>,
    feed: Feeder,
}

impl AudioPath {
    fn push(&mut self, frame: &ff::frame::Audio, pts_us: i64) {
        let mut conv = ff::frame::Audio::empty();
        if self.rs.run(frame, &mut conv).is_err() {
            warn!("Audio conversion failed; frame dropped.");
            return;
        }
        if self.next_pts.is_none() {
            self.next_pts = Some(pts_us);
        }
        for (ch, buf) in self.fifo.iter_mut().enumerate() {
            buf.extend_from_slice(&conv.plane::<f32>(ch)[..conv.samples()]);
        }
        let n = self.enc.frame_size().max(1) as usize;
        while self.fifo.first().is_some_and(|b| b.len() >= n) {
            let mut f = ff::frame::Audio::new(self.enc.format(), n, self.layout);
            for (ch, buf) in self.fifo.iter_mut().enumerate() {
                f.plane_mut::<f32>(ch)[..n].copy_from_slice(&buf[..n]);
                buf.drain(..n);
            }
            f.set_rate(self.rate);
            let pts = self.next_pts.unwrap_or(0);
            // The encoder's time base is 1/rate.
            f.set_pts(Some(pts.rescale(US, ff::Rational(1, self.rate as i32))));
            self.next_pts = Some(pts + (n as i64 * 1_000_000) / i64::from(self.rate));
            if self.enc.send_frame(&f).is_err() {
                continue;
            }
            let mut p = ff::Packet::empty();
            while self.enc.receive_packet(&mut p).is_ok() {
                let (Some(data), Some(pts)) = (p.data(), p.pts()) else {
                    continue;
                };
                let mut payload = Vec::with_capacity(data.len() + 7);
                payload.extend_from_slice(&adts(
                    data.len(),
                    self.rate,
                    self.layout.channels() as u16,
                ));
                payload.extend_from_slice(data);
                self.feed.push(Object {
                    pts_us: pts.rescale(ff::Rational(1, self.rate as i32), US),
                    flags: 0,
                    payload: Bytes::from(payload),
                });
            }
        }
    }
}

/// Writes received tracks as MPEG-TS, to `udp://host:port` or a `.ts` file; or to a Matroska
/// (`.mkv`) or MP4 (`.mp4`) file by way of an MPEG-TS file beside it (`FILE.part.ts`), remuxed
/// when the sink finishes. The intermediate is what a crash or a full disk leaves: a file any
/// player reads up to its last packet, where an unfinished MP4 is unreadable (its index is
/// written last).
pub struct Sink {
    octx: ff::format::context::Output,
    /// For a Matroska or MP4 file: the MPEG-TS being written, and the final file.
    remux_to: Option<(String, String)>,
    /// Per stream: time base, last pts written (µs).
    streams: Vec<(ff::Rational, i64)>,
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
    pub fn open(spec: &str, tracks: &[TrackInfo]) -> Result<Sink, MediaError> {
        init();
        // H.264 travels with its parameter sets in-band and AAC as ADTS, which is what MPEG-TS
        // carries as is. Matroska and MP4 want them as codec extradata (avcC,
        // AudioSpecificConfig): FFmpeg's demuxer extracts it when the TS is read back.
        let lower = spec.to_ascii_lowercase();
        let remux_to = if spec.starts_with("udp://") || lower.ends_with(".ts") {
            None
        } else if [".mkv", ".mp4", ".mov"].iter().any(|e| lower.ends_with(e)) {
            Some((format!("{spec}.part.ts"), spec.to_string()))
        } else {
            return Err(MediaError::Unsupported(format!(
                "{spec}: play to udp://HOST:PORT (MPEG-TS), or to a .ts, .mkv or .mp4 file"
            )));
        };
        let target = remux_to.as_ref().map_or(spec, |(part, _)| part.as_str());
        let mut octx =
            ff::format::output_as(&target, "mpegts").map_err(ffe(format!("opening {target}")))?;
        for t in tracks {
            match t.kind.as_str() {
                "video" => {
                    let codec = ff::encoder::find(ff::codec::Id::H264);
                    let mut c = ff::codec::context::Context::new_with_codec(
                        codec.ok_or_else(|| MediaError::Unsupported("no H.264 codec".into()))?,
                    )
                    .encoder()
                    .video()
                    .map_err(ffe("video stream"))?;
                    c.set_width(t.width.max(2));
                    c.set_height(t.height.max(2));
                    c.set_format(ff::format::Pixel::YUV420P);
                    c.set_time_base(US);
                    octx.add_stream_with(&c)
                        .map_err(ffe("adding the video stream"))?;
                }
                "audio" => {
                    let codec = ff::encoder::find(ff::codec::Id::AAC);
                    let mut c = ff::codec::context::Context::new_with_codec(
                        codec.ok_or_else(|| MediaError::Unsupported("no AAC codec".into()))?,
                    )
                    .encoder()
                    .audio()
                    .map_err(ffe("audio stream"))?;
                    c.set_rate(t.sample_rate.max(8000) as i32);
                    c.set_channel_layout(ff::ChannelLayout::default(t.channels.max(1) as i32));
                    c.set_format(ff::format::Sample::F32(ff::format::sample::Type::Planar));
                    c.set_time_base(ff::Rational(1, t.sample_rate.max(8000) as i32));
                    octx.add_stream_with(&c)
                        .map_err(ffe("adding the audio stream"))?;
                }
                other => {
                    return Err(MediaError::Unsupported(format!(
                        "cannot play a {other} track"
                    )));
                }
            }
        }
        octx.write_header()
            .map_err(ffe(format!("writing {spec}'s header")))?;
        let streams = (0..tracks.len())
            .map(|i| (octx.stream(i).map_or(US, |s| s.time_base()), i64::MIN))
            .collect();
        let video = tracks.iter().position(|t| t.kind == "video");
        Ok(Sink {
            octx,
            remux_to,
            streams,
            video,
            start_us: None,
            pending: Vec::new(),
            clocks: tracks.iter().map(|t| t.clock_us).collect(),
            stats: PlayStats {
                max_pts_gap_ms: vec![0.0; tracks.len()],
                max_wall_gap_ms: vec![0.0; tracks.len()],
                ..Default::default()
            },
            last_wall: vec![None; tracks.len()],
        })
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
            None if self.streams.len() == 1 || self.pending.len() > 500 => keys().next(),
            None => None,
        }
    }

    fn write_now(&mut self, index: usize, o: &Object) -> Result<bool, MediaError> {
        let Some((tb, last)) = self.streams.get_mut(index) else {
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
        let mut p = ff::Packet::copy(&o.payload);
        let ts = o.pts_us.rescale(US, *tb);
        p.set_pts(Some(ts));
        p.set_dts(Some(ts));
        p.set_stream(index);
        if o.is_key() {
            p.set_flags(ff::packet::Flags::KEY);
        }
        p.write_interleaved(&mut self.octx)
            .map_err(ffe("writing a packet"))?;
        Ok(true)
    }

    pub fn finish(mut self) -> Result<PlayStats, MediaError> {
        self.octx
            .write_trailer()
            .map_err(ffe("writing the trailer"))?;
        drop(self.octx);
        if let Some((part, dst)) = &self.remux_to {
            if self.stats.objects == 0 {
                let _ = std::fs::remove_file(part);
                return Err(MediaError::Unsupported(format!(
                    "{dst}: nothing was received, no file written"
                )));
            }
            // On failure the MPEG-TS stays where it is: nothing recorded is lost.
            remux(part, dst).map_err(|e| {
                MediaError::Unsupported(format!("{e} (the recording is kept in {part})"))
            })?;
            std::fs::remove_file(part)
                .map_err(|e| MediaError::Unsupported(format!("removing {part}: {e}")))?;
        }
        Ok(self.stats)
    }
}

/// Copies the audio and video of the media file `src` into `dst`, whose container follows its
/// extension (no re-encoding): what `ffmpeg -i SRC -c copy DST` does.
pub fn remux(src: &str, dst: &str) -> Result<(), MediaError> {
    init();
    let mut ictx = ff::format::input(&src).map_err(ffe(format!("reading {src}")))?;
    let mut octx = ff::format::output(&dst).map_err(ffe(format!("creating {dst}")))?;
    // Input stream index -> (output stream index, input time base).
    let mut map = vec![None; ictx.nb_streams() as usize];
    for ist in ictx.streams() {
        let medium = ist.parameters().medium();
        if medium != ff::media::Type::Audio && medium != ff::media::Type::Video {
            continue;
        }
        let mut ost = octx
            .add_stream(ff::encoder::find(ff::codec::Id::None))
            .map_err(ffe(format!("adding a stream to {dst}")))?;
        ost.set_parameters(ist.parameters());
        clear_codec_tag(&mut ost);
        map[ist.index()] = Some((ost.index(), ist.time_base()));
    }
    if map.iter().all(Option::is_none) {
        return Err(MediaError::Unsupported(format!(
            "{src} holds no audio or video"
        )));
    }
    octx.write_header()
        .map_err(ffe(format!("writing {dst}'s header")))?;
    for (ist, mut packet) in ictx.packets() {
        let Some((index, tb)) = map.get(ist.index()).copied().flatten() else {
            continue;
        };
        let out_tb = octx.stream(index).map_or(tb, |s| s.time_base());
        packet.rescale_ts(tb, out_tb);
        packet.set_position(-1);
        packet.set_stream(index);
        packet
            .write_interleaved(&mut octx)
            .map_err(ffe(format!("writing {dst}")))?;
    }
    octx.write_trailer()
        .map_err(ffe(format!("finishing {dst}")))?;
    Ok(())
}

/// MPEG-TS labels its streams with its own codec tags (0x1B for H.264); Matroska and MP4
/// refuse a foreign tag, and 0 lets the muxer choose its own. ffmpeg-next has no setter
/// for it (its remux example does the same).
#[allow(unsafe_code)]
fn clear_codec_tag(ost: &mut ff::format::stream::StreamMut) {
    // SAFETY: `ost` is a live stream of an output context we hold mutably; its
    // AVCodecParameters is allocated with the stream and `codec_tag` is a plain integer.
    unsafe {
        (*ost.parameters().as_mut_ptr()).codec_tag = 0;
    }
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

/// Plays `tracks` (received, or a local source's) into `spec` ([`Sink::open`]) until they end
/// or `stop` fires: each track's groups in order, from the current one. With the publisher's
/// clock known, no frame older than `latency` ([`age_budget`]) is played: a group whose next
/// frame is late, or arrives older than that, is given up, as is a dropped one (counted in
/// the result: groups skipped per track), and the track goes on at its next group.
pub async fn play(
    tracks: Vec<Arc<Track>>,
    spec: &str,
    stop: tokio_util::sync::CancellationToken,
    latency: Duration,
) -> Result<PlayStats, MediaError> {
    let infos: Vec<TrackInfo> = tracks.iter().map(|t| t.info.clone()).collect();
    let spec = spec.to_string();
    // Bounded: a sink that cannot keep up (a slow disk) holds the readers back, and the
    // relay then drops old groups for this client rather than queue them.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Object)>(1024);
    let writer = std::thread::Builder::new()
        .name("media-sink".into())
        .spawn(move || -> Result<PlayStats, MediaError> {
            let mut sink = Sink::open(&spec, &infos)?;
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

    #[test]
    fn adts_headers_are_well_formed() {
        let h = adts(371, 48000, 2);
        assert_eq!(h[0], 0xFF);
        assert_eq!(h[1] & 0xF6, 0xF0);
        // Frame length (13 bits) includes the header.
        let len = (usize::from(h[3] & 3) << 11) | (usize::from(h[4]) << 3) | usize::from(h[5] >> 5);
        assert_eq!(len, 378);
        assert_eq!((h[2] >> 2) & 0xF, 3, "48 kHz");
        assert_eq!(((h[2] & 1) << 2) | (h[3] >> 6), 2, "stereo");
    }
}
