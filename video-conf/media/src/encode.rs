//! Encoders: H.264 with libx264 (both renditions keyframed at the same frames) and AAC, whose
//! frames travel with ADTS headers (what MPEG-TS carries as is).

use bytes::Bytes;
use ff::util::mathematics::rescale::Rescale;
use ffmpeg_next as ff;
use tiandi_video::conference_wire::{Object, flags};
use tracing::warn;

use crate::source::Feeder;
use crate::{MediaError, US, ffe};

pub(crate) fn x264(
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
pub(crate) fn aac(rate: u32, layout: ff::ChannelLayout) -> Result<ff::encoder::Audio, MediaError> {
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

pub(crate) fn drain_video(enc: &mut ff::encoder::Video, feed: &mut Feeder) {
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

/// Decoded audio → planar float → 1024-sample frames → AAC → ADTS objects.
pub(crate) struct AudioPath {
    pub(crate) enc: ff::encoder::Audio,
    pub(crate) rs: ff::software::resampling::Context,
    pub(crate) fifo: Vec<Vec<f32>>,
    pub(crate) layout: ff::ChannelLayout,
    pub(crate) rate: u32,
    /// Media time (µs) of the FIFO's first sample.
    pub(crate) next_pts: Option<i64>,
    pub(crate) feed: Feeder,
}

impl AudioPath {
    pub(crate) fn push(&mut self, frame: &ff::frame::Audio, pts_us: i64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
