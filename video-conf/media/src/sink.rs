//! Players' output through FFmpeg's MPEG-TS muxer: to `udp://host:port` (a decoder, a TV, VLC)
//! or a `.ts` file; or to a Matroska (`.mkv`) or MP4 (`.mp4`) file by way of an MPEG-TS file
//! beside it (`FILE.part.ts`), remuxed when the sink finishes. The intermediate is what a crash
//! or a full disk leaves: a file any player reads up to its last packet, where an unfinished
//! MP4 is unreadable (its index is written last).
//!
//! What is written when (the start at a keyframe, late tails skipped) is decided by
//! [`tiandi_video::play::Sink`]; this is only the container.

use ff::util::mathematics::rescale::Rescale;
use ffmpeg_next as ff;
use tiandi_video::conference_wire::{Object, TrackInfo};
use tiandi_video::play::Mux;

use crate::{MediaError, US, ffe, init};

/// FFmpeg's MPEG-TS muxer, and what to remux its file into at the end.
pub struct FfmpegMux {
    octx: ff::format::context::Output,
    /// For a Matroska or MP4 file: the MPEG-TS being written, and the final file.
    remux_to: Option<(String, String)>,
    /// Per stream: time base.
    time_bases: Vec<ff::Rational>,
}

/// Opens `spec` for `tracks`: `udp://HOST:PORT` or a `.ts`, `.mkv`, `.mp4` (`.mov`) file.
pub fn open(spec: &str, tracks: &[TrackInfo]) -> Result<Box<dyn Mux>, MediaError> {
    Ok(Box::new(FfmpegMux::open(spec, tracks)?))
}

impl FfmpegMux {
    pub fn open(spec: &str, tracks: &[TrackInfo]) -> Result<FfmpegMux, MediaError> {
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
        let time_bases = (0..tracks.len())
            .map(|i| octx.stream(i).map_or(US, |s| s.time_base()))
            .collect();
        Ok(FfmpegMux {
            octx,
            remux_to,
            time_bases,
        })
    }
}

impl Mux for FfmpegMux {
    fn write(&mut self, index: usize, o: &Object) -> Result<(), MediaError> {
        let Some(tb) = self.time_bases.get(index).copied() else {
            return Ok(());
        };
        let mut p = ff::Packet::copy(&o.payload);
        let ts = o.pts_us.rescale(US, tb);
        p.set_pts(Some(ts));
        p.set_dts(Some(ts));
        p.set_stream(index);
        if o.is_key() {
            p.set_flags(ff::packet::Flags::KEY);
        }
        p.write_interleaved(&mut self.octx)
            .map_err(ffe("writing a packet"))
    }

    fn finish(mut self: Box<Self>, written: u64) -> Result<(), MediaError> {
        self.octx
            .write_trailer()
            .map_err(ffe("writing the trailer"))?;
        let FfmpegMux { octx, remux_to, .. } = *self;
        drop(octx);
        if let Some((part, dst)) = &remux_to {
            if written == 0 {
                let _ = std::fs::remove_file(part);
                return Err(MediaError::Unsupported(format!(
                    "{dst}: nothing was received, no file written"
                )));
            }
            // On failure the MPEG-TS stays where it is: nothing recorded is lost.
            crate::remux(part, dst).map_err(|e| {
                MediaError::Unsupported(format!("{e} (the recording is kept in {part})"))
            })?;
            std::fs::remove_file(part)
                .map_err(|e| MediaError::Unsupported(format!("removing {part}: {e}")))?;
        }
        Ok(())
    }
}
