//! An MPEG-TS writer for what the groups carry, in pure Rust: a relay records without FFmpeg.
//!
//! Objects are passed on as they arrived (no codec here): H.264 in Annex B with its parameter
//! sets in band (stream type 0x1B, an access unit delimiter put in front when the encoder left
//! it out, as FFmpeg's muxer does), AAC with its ADTS headers (stream type 0x0F). One program:
//! PAT and PMT at the start, before every keyframe and every half second; one PES per object,
//! with its PTS (no B-frames are sent, so the DTS equals it and is left out); the PCR on the
//! video stream (else the first), 0.7 s behind the PTS, as FFmpeg's default `max_delay`;
//! random-access indicators on keyframes; continuity counters per PID. Packets are interleaved
//! by time (a short queue per stream) so the PCR only grows. Timestamps start at 1.4 s, as
//! FFmpeg's muxer writes them, so a little audio before the first keyframe stays positive.
//!
//! Written by hand (~300 lines): the crates found (`mpeg2ts`, `xmpegts`, `mpeg-ts-core`) are a
//! packet codec (PES cutting, PCR and stuffing would still be ours), or young, or pull in
//! their own I/O stack. `ffprobe` and VLC read the result (tested by the media crate's
//! `recording` test and the controller's conference test).

use std::collections::VecDeque;
use std::io::Write;

use crate::conference_wire::{Object, TrackInfo};
use crate::play::{MediaError, Mux};

const PACKET: usize = 188;
const PMT_PID: u16 = 0x1000;
const FIRST_PID: u16 = 0x100;
/// 90 kHz ticks per µs, as a ratio.
const fn ticks(us: i64) -> i64 {
    us * 9 / 100
}
/// Where timestamps start (90 kHz): 1.4 s.
const OFFSET: i64 = 126_000;
/// PCR this far behind the PTS (90 kHz): 0.7 s.
const PCR_DELAY: i64 = 63_000;
/// Tables again after this much media time (90 kHz) without a keyframe.
const TABLES_EVERY: i64 = 45_000;
/// A stream's queue may span this much media time (µs) while another stream's is empty.
const INTERLEAVE_US: i64 = 1_000_000;

struct Stream {
    pid: u16,
    stream_id: u8,
    stream_type: u8,
    video: bool,
    cc: u8,
    queue: VecDeque<Object>,
}

/// Writes one program of H.264 and AAC tracks as MPEG-TS to `W`.
pub struct TsMux<W: Write> {
    out: W,
    what: String,
    streams: Vec<Stream>,
    pcr_index: usize,
    pat_cc: u8,
    pmt_cc: u8,
    /// Media time (µs) of the first object written: the file's time 0 (at [`OFFSET`]).
    base_us: Option<i64>,
    /// 90 kHz time of the last tables written.
    tables_at: Option<i64>,
    last_pcr: i64,
}

impl TsMux<std::io::BufWriter<std::fs::File>> {
    /// Creates the file at `path` for `tracks` (video `h264`, audio `aac`).
    pub fn create(path: &std::path::Path, tracks: &[TrackInfo]) -> Result<Self, MediaError> {
        let what = path.display().to_string();
        let file = std::fs::File::create(path).map_err(|source| MediaError::Io {
            what: format!("creating {what}"),
            source,
        })?;
        TsMux::new(
            std::io::BufWriter::with_capacity(64 * 1024, file),
            what,
            tracks,
        )
    }
}

impl<W: Write> TsMux<W> {
    /// A writer to `out` (named `what` in errors) for `tracks`.
    pub fn new(out: W, what: String, tracks: &[TrackInfo]) -> Result<Self, MediaError> {
        let mut streams = Vec::new();
        let (mut v, mut a) = (0u8, 0u8);
        for (i, t) in tracks.iter().enumerate() {
            let (stream_type, stream_id, video) = match (t.kind.as_str(), t.codec.as_str()) {
                ("video", "h264" | "") => {
                    v += 1;
                    (0x1B, 0xE0 + v - 1, true)
                }
                ("audio", "aac" | "") => {
                    a += 1;
                    (0x0F, 0xC0 + a - 1, false)
                }
                (kind, codec) => {
                    return Err(MediaError::Unsupported(format!(
                        "{what}: MPEG-TS recordings carry H.264 video and AAC audio, not {kind} {codec}"
                    )));
                }
            };
            streams.push(Stream {
                pid: FIRST_PID + i as u16,
                stream_id,
                stream_type,
                video,
                cc: 0,
                queue: VecDeque::new(),
            });
        }
        if streams.is_empty() || v > 16 || a > 32 {
            return Err(MediaError::Unsupported(format!(
                "{what}: {} tracks to record",
                streams.len()
            )));
        }
        let pcr_index = streams.iter().position(|s| s.video).unwrap_or(0);
        Ok(TsMux {
            out,
            what,
            streams,
            pcr_index,
            pat_cc: 0,
            pmt_cc: 0,
            base_us: None,
            tables_at: None,
            last_pcr: i64::MIN,
        })
    }

    /// The writer, once finished.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn io(&self, e: std::io::Error) -> MediaError {
        MediaError::Io {
            what: format!("writing {}", self.what),
            source: e,
        }
    }

    /// Writes queued objects in time order while every stream has one queued (or a stream's
    /// queue spans more than [`INTERLEAVE_US`]; or all of them, at the end).
    fn drain(&mut self, all: bool) -> Result<(), MediaError> {
        loop {
            let heads = self
                .streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.queue.front().map(|o| (i, o.pts_us)));
            let Some((i, pts)) = heads.min_by_key(|(_, p)| *p) else {
                return Ok(());
            };
            let ready = all
                || self.streams.iter().all(|s| !s.queue.is_empty())
                || self.streams.iter().any(|s| {
                    s.queue
                        .back()
                        .is_some_and(|b| b.pts_us - pts > INTERLEAVE_US)
                });
            if !ready {
                return Ok(());
            }
            let o = self.streams[i].queue.pop_front().expect("a head");
            self.write_pes(i, &o)?;
        }
    }

    fn write_pes(&mut self, index: usize, o: &Object) -> Result<(), MediaError> {
        let base = *self.base_us.get_or_insert(o.pts_us);
        let pts = (ticks(o.pts_us - base) + OFFSET).max(0);
        let video = self.streams[index].video;
        if self
            .tables_at
            .is_none_or(|t| (video && o.is_key()) || pts - t >= TABLES_EVERY)
        {
            self.write_tables()?;
            self.tables_at = Some(pts);
        }
        let pcr = (index == self.pcr_index).then(|| (pts - PCR_DELAY).max(self.last_pcr).max(0));
        if let Some(p) = pcr {
            self.last_pcr = p;
        }
        let s = &self.streams[index];
        // An access unit delimiter first, unless the encoder wrote one.
        let aud = video && !starts_with_aud(&o.payload);
        let body = o.payload.len() + if aud { 6 } else { 0 };
        let mut pes = Vec::with_capacity(14 + body);
        pes.extend_from_slice(&[0, 0, 1, s.stream_id]);
        // Video PES may leave their length open (0); audio ones say it.
        let len = if video {
            0
        } else {
            u16::try_from(8 + body).unwrap_or(0)
        };
        pes.extend_from_slice(&len.to_be_bytes());
        // '10', data alignment; PTS only; 5 header bytes.
        pes.extend_from_slice(&[0x84, 0x80, 5]);
        pes.extend_from_slice(&timestamp(0x2, pts));
        if aud {
            pes.extend_from_slice(&[0, 0, 0, 1, 0x09, 0xF0]);
        }
        pes.extend_from_slice(&o.payload);
        let (pid, key) = (s.pid, video && o.is_key());
        let mut cc = s.cc;
        let mut rest = &pes[..];
        let mut first = true;
        let mut pkt = [0xFFu8; PACKET];
        while !rest.is_empty() {
            // Adaptation field: PCR and random access on the first packet, stuffing on the last.
            let mut af: Vec<u8> = Vec::new();
            if first && (pcr.is_some() || key) {
                let mut flags = 0u8;
                if key {
                    flags |= 0x40;
                }
                af.push(flags);
                if let Some(p) = pcr {
                    af[0] |= 0x10;
                    af.extend_from_slice(&pcr_bytes(p));
                }
            }
            // 184 bytes after the header; an adaptation field costs its length byte too.
            let room = 184 - if af.is_empty() { 0 } else { af.len() + 1 };
            let take = rest.len().min(room);
            if take < room {
                let stuffing = room - take;
                if af.is_empty() {
                    // One byte: a length of 0; more: the flags byte, then 0xFF.
                    if stuffing >= 2 {
                        af.push(0);
                        af.resize(stuffing - 1, 0xFF);
                    }
                } else {
                    af.resize(af.len() + stuffing, 0xFF);
                }
            }
            let has_af = !af.is_empty() || take < room;
            pkt[0] = 0x47;
            pkt[1] = (if first { 0x40 } else { 0 }) | (pid >> 8) as u8;
            pkt[2] = pid as u8;
            pkt[3] = (if has_af { 0x30 } else { 0x10 }) | cc;
            let mut at = 4;
            if has_af {
                pkt[4] = af.len() as u8;
                pkt[5..5 + af.len()].copy_from_slice(&af);
                at = 5 + af.len();
            }
            pkt[at..at + take].copy_from_slice(&rest[..take]);
            debug_assert_eq!(at + take, PACKET);
            self.out.write_all(&pkt).map_err(|e| self.io(e))?;
            rest = &rest[take..];
            cc = (cc + 1) & 0xF;
            first = false;
        }
        self.streams[index].cc = cc;
        Ok(())
    }

    fn write_tables(&mut self) -> Result<(), MediaError> {
        // PAT: transport stream 1, program 1 at PMT_PID.
        let mut pat = vec![0x00, 0xB0, 13, 0x00, 0x01, 0xC1, 0x00, 0x00, 0x00, 0x01];
        pat.extend_from_slice(&(0xE000 | PMT_PID).to_be_bytes());
        let pcr_pid = self.streams[self.pcr_index].pid;
        let mut pmt = vec![0x02, 0xB0, 0, 0x00, 0x01, 0xC1, 0x00, 0x00];
        pmt.extend_from_slice(&(0xE000 | pcr_pid).to_be_bytes());
        pmt.extend_from_slice(&[0xF0, 0x00]);
        for s in &self.streams {
            pmt.push(s.stream_type);
            pmt.extend_from_slice(&(0xE000 | s.pid).to_be_bytes());
            pmt.extend_from_slice(&[0xF0, 0x00]);
        }
        pmt[2] = (pmt.len() - 3 + 4) as u8;
        let (pat_cc, pmt_cc) = (self.pat_cc, self.pmt_cc);
        self.write_section(0, pat_cc, &pat)?;
        self.write_section(PMT_PID, pmt_cc, &pmt)?;
        self.pat_cc = (pat_cc + 1) & 0xF;
        self.pmt_cc = (pmt_cc + 1) & 0xF;
        Ok(())
    }

    fn write_section(&mut self, pid: u16, cc: u8, section: &[u8]) -> Result<(), MediaError> {
        let mut pkt = [0xFFu8; PACKET];
        pkt[0] = 0x47;
        pkt[1] = 0x40 | (pid >> 8) as u8;
        pkt[2] = pid as u8;
        pkt[3] = 0x10 | cc;
        pkt[4] = 0; // pointer field
        pkt[5..5 + section.len()].copy_from_slice(section);
        let crc = crc32_mpeg(section);
        pkt[5 + section.len()..9 + section.len()].copy_from_slice(&crc.to_be_bytes());
        self.out.write_all(&pkt).map_err(|e| self.io(e))
    }

    /// Queues one object of track `index` (objects of a track in time order).
    pub fn push(&mut self, index: usize, o: &Object) -> Result<(), MediaError> {
        let Some(s) = self.streams.get_mut(index) else {
            return Err(MediaError::Unsupported(format!(
                "{}: no track {index}",
                self.what
            )));
        };
        s.queue.push_back(o.clone());
        self.drain(false)
    }

    /// Writes what is queued and flushes.
    pub fn end(&mut self) -> Result<(), MediaError> {
        self.drain(true)?;
        self.out.flush().map_err(|e| self.io(e))
    }
}

impl<W: Write + Send> Mux for TsMux<W> {
    fn write(&mut self, index: usize, o: &Object) -> Result<(), MediaError> {
        self.push(index, o)
    }

    fn finish(mut self: Box<Self>, _written: u64) -> Result<(), MediaError> {
        self.end()
    }
}

/// Whether an Annex B access unit starts with an access unit delimiter (NAL type 9).
fn starts_with_aud(p: &[u8]) -> bool {
    let nal = match p {
        [0, 0, 1, n, ..] => *n,
        [0, 0, 0, 1, n, ..] => *n,
        _ => return false,
    };
    nal & 0x1F == 9
}

/// A PES timestamp (33 bits, 90 kHz) with its 4-bit prefix (`0x2`: PTS alone).
fn timestamp(prefix: u8, t: i64) -> [u8; 5] {
    let t = (t as u64) & ((1 << 33) - 1);
    [
        (prefix << 4) | (((t >> 30) as u8 & 0x07) << 1) | 1,
        (t >> 22) as u8,
        (((t >> 15) as u8) << 1) | 1,
        (t >> 7) as u8,
        ((t as u8) << 1) | 1,
    ]
}

/// A PCR (27 MHz: a 90 kHz base, extension 0).
fn pcr_bytes(t: i64) -> [u8; 6] {
    let b = (t as u64) & ((1 << 33) - 1);
    [
        (b >> 25) as u8,
        (b >> 17) as u8,
        (b >> 9) as u8,
        (b >> 1) as u8,
        (((b & 1) as u8) << 7) | 0x7E,
        0,
    ]
}

/// CRC-32/MPEG-2 (polynomial 0x04C11DB7, not reflected, no final XOR) of a PSI section.
fn crc32_mpeg(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn info(kind: &str, codec: &str) -> TrackInfo {
        TrackInfo {
            kind: kind.into(),
            codec: codec.into(),
            ..Default::default()
        }
    }

    fn obj(pts_us: i64, key: bool, len: usize) -> Object {
        let mut p = vec![0, 0, 0, 1, if key { 0x65 } else { 0x41 }];
        p.resize(len, 0xAB);
        Object {
            pts_us,
            flags: if key {
                crate::conference_wire::flags::KEY
            } else {
                0
            },
            payload: Bytes::from(p),
        }
    }

    #[test]
    fn crc_of_a_known_pat() {
        // The PAT FFmpeg writes for one program at PMT PID 0x1000.
        let pat = [
            0x00, 0xB0, 0x0D, 0x00, 0x01, 0xC1, 0x00, 0x00, 0x00, 0x01, 0xF0, 0x00,
        ];
        assert_eq!(crc32_mpeg(&pat), 0x2AB1_04B2);
    }

    #[test]
    fn packets_are_whole_with_counters_in_step_and_payloads_intact() {
        let tracks = [info("video", "h264"), info("audio", "aac")];
        let mut m = TsMux::new(Vec::new(), "test".into(), &tracks).unwrap();
        let mut sent = Vec::new();
        for n in 0..50i64 {
            let v = obj(n * 40_000, n % 25 == 0, 100 + (n as usize * 37) % 3000);
            m.push(0, &v).unwrap();
            sent.push((0x100u16, v.payload.clone()));
            let a = Object {
                pts_us: n * 40_000 + 5_000,
                flags: 0,
                payload: Bytes::from(vec![0xFF, 0xF1, 1, 2, 3, n as u8]),
            };
            m.push(1, &a).unwrap();
            sent.push((0x101, a.payload.clone()));
        }
        m.end().unwrap();
        let out = m.into_inner();
        assert_eq!(out.len() % PACKET, 0);
        // Reassemble the PES of each PID and check the counters.
        let mut cc: std::collections::HashMap<u16, u8> = Default::default();
        let mut pes: std::collections::HashMap<u16, Vec<Vec<u8>>> = Default::default();
        let mut pcrs = Vec::new();
        for p in out.chunks(PACKET) {
            assert_eq!(p[0], 0x47);
            let pid = (u16::from(p[1] & 0x1F) << 8) | u16::from(p[2]);
            let c = p[3] & 0xF;
            if let Some(prev) = cc.insert(pid, c) {
                assert_eq!(c, (prev + 1) & 0xF, "counter of PID {pid:#x}");
            }
            let mut at = 4;
            if p[3] & 0x20 != 0 {
                if p[4] > 0 && p[5] & 0x10 != 0 {
                    let b = (u64::from(p[6]) << 25)
                        | (u64::from(p[7]) << 17)
                        | (u64::from(p[8]) << 9)
                        | (u64::from(p[9]) << 1)
                        | u64::from(p[10] >> 7);
                    pcrs.push(b);
                }
                at = 5 + usize::from(p[4]);
            }
            if pid < 0x100 || pid == PMT_PID {
                continue;
            }
            let list = pes.entry(pid).or_default();
            if p[1] & 0x40 != 0 {
                list.push(Vec::new());
            }
            list.last_mut().unwrap().extend_from_slice(&p[at..]);
        }
        assert!(pcrs.windows(2).all(|w| w[0] <= w[1]), "PCR only grows");
        assert_eq!(pcrs.len(), 50);
        let mut got = Vec::new();
        for (pid, list) in &pes {
            for p in list {
                assert_eq!(&p[..3], &[0, 0, 1]);
                let hlen = usize::from(p[8]);
                let mut body = &p[9 + hlen..];
                if *pid == 0x100 {
                    assert_eq!(&body[..6], &[0, 0, 0, 1, 9, 0xF0], "AUD");
                    body = &body[6..];
                } else {
                    let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
                    assert_eq!(len, p.len() - 6);
                }
                got.push((*pid, Bytes::copy_from_slice(body)));
            }
        }
        for s in &sent {
            assert!(got.contains(s), "payload of PID {:#x} intact", s.0);
        }
        assert_eq!(got.len(), sent.len());
    }

    #[test]
    fn timestamps_encode_as_the_standard_says() {
        // 1.4 s: 126000 ticks.
        let t = timestamp(0x2, 126_000);
        let back = (u64::from(t[0] >> 1 & 7) << 30)
            | (u64::from(t[1]) << 22)
            | (u64::from(t[2] >> 1) << 15)
            | (u64::from(t[3]) << 7)
            | u64::from(t[4] >> 1);
        assert_eq!(back, 126_000);
        assert_eq!(t[0] & 0xF1, 0x21);
    }

    #[test]
    fn other_codecs_are_refused() {
        let e = TsMux::new(Vec::new(), "x.ts".into(), &[info("video", "vp8")])
            .err()
            .unwrap();
        assert!(e.to_string().contains("H.264"), "{e}");
    }
}
