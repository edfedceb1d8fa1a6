//! The conference protocol (modelled on Media over QUIC), free of I/O.
//!
//! One QUIC connection per participant (site client or downstream relay) to its relay:
//!
//! * the **control stream**, the first bidirectional stream the participant opens: frames of
//!   a 4-byte big-endian length, one kind byte and a protobuf body ([`Control`]);
//! * one **unidirectional stream per group**: a group is a track's media from one keyframe to
//!   the next (video) or a short run of frames (audio). The stream starts with a
//!   [`GroupHeader`] and carries [`Object`]s (one frame each) until it ends. A lost packet
//!   holds back one group, not the track; a receiver that falls behind has whole old groups
//!   reset under it instead of waiting for them.
//!
//! ```text
//! participant → relay: Hello, then Announce (tracks it publishes), Subscribe/Unsubscribe,
//!                      Present (roll call), Health (how its tracks arrive)
//! relay → participant: Welcome, Tracks (what it can subscribe to), Floor, RollCall, Error
//! ```
//!
//! A relay below asking whether its participants' certificates are still good (revocation,
//! [`crate::relay`]) opens a connection of its own with its relay certificate and, instead of
//! a control stream, one bidirectional stream per question:
//!
//! ```text
//! relay below → relay: CheckSites (at most MAX_CHECK_SITES certificates), stream finished
//! relay → relay below: SitesChecked (one verdict per certificate, in order), or Error
//!                      (FORBIDDEN: not a relay certificate; UNANSWERED: no authority reached)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The protocol's version: a relay refuses another major.
pub const VERSION: u32 = 1;
/// The largest control frame.
pub const MAX_CONTROL: usize = 256 * 1024;
/// The largest object (one encoded frame).
pub const MAX_OBJECT: usize = 4 * 1024 * 1024;
/// First byte of every group stream.
pub const GROUP_MAGIC: u8 = 0xD1;
/// Header bytes of a group stream: magic, version, track id, group sequence.
pub const GROUP_HEADER_LEN: usize = 1 + 1 + 4 + 8;
/// Header bytes of an object: length, timestamp, flags.
pub const OBJECT_HEADER_LEN: usize = 4 + 8 + 1;
/// The most certificates one [`CheckSites`] (and so one [`SitesChecked`]) may carry: a relay
/// asks about more in several. 1024 of the longest (64-byte names, 32-digit serial) are
/// ~170 KiB, within [`MAX_CONTROL`].
pub const MAX_CHECK_SITES: usize = 1024;

/// Stable error codes (control `Error` frames and QUIC close/reset codes).
pub mod codes {
    /// Malformed or unexpected frame.
    pub const PROTOCOL: u32 = 1;
    /// Another major version.
    pub const VERSION: u32 = 2;
    /// No such room, or the room has ended.
    pub const NO_ROOM: u32 = 3;
    /// Publishing without the floor.
    pub const NO_FLOOR: u32 = 4;
    /// A relay path that would loop.
    pub const LOOP: u32 = 5;
    /// A group stream reset because a newer group replaced it (live beats complete).
    pub const SUPERSEDED: u32 = 6;
    /// The relay or client is shutting down.
    pub const SHUTDOWN: u32 = 7;
    /// Not allowed for this participant's role (a site claiming the relay role, publishing as
    /// another site).
    pub const FORBIDDEN: u32 = 8;
    /// The participant's certificate was revoked or superseded, or could not be confirmed.
    pub const REVOKED: u32 = 9;
    /// A [`super::CheckSites`] this relay cannot answer: it has no registry, and the relay
    /// above it (which it asks in turn) did not answer in time.
    pub const UNANSWERED: u32 = 10;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown control frame kind {0}")]
    UnknownKind(u8),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
}

impl WireError {
    pub fn code(&self) -> u32 {
        match self {
            WireError::Version(_) => codes::VERSION,
            _ => codes::PROTOCOL,
        }
    }
}

fn malformed(what: &'static str, detail: impl ToString) -> WireError {
    WireError::Malformed {
        what,
        detail: detail.to_string(),
    }
}

/// What a participant is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A site client (publishes and/or plays).
    Site,
    /// A downstream relay: subscribes once for every site below it.
    Relay,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Relay => "relay",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "site" => Some(Role::Site),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub room: String,
    /// "site" or "relay".
    #[prost(string, tag = "3")]
    pub role: String,
    /// Relays this connection's subscriptions already pass through, nearest last (a relay
    /// refuses a path that contains itself: cascades cannot loop).
    #[prost(string, repeated, tag = "4")]
    pub path: Vec<String>,
    /// The link rate the participant knows it has (kbit/s, 0: unknown): the relay starts
    /// its rendition choice there instead of at the top.
    #[prost(uint32, tag = "5")]
    pub link_kbps: u32,
    /// Send repair datagrams with the groups sent to this participant once the round trip
    /// is at least this long (ms; 0: never, 1: always): [`crate::fec`].
    #[prost(uint32, tag = "6")]
    pub fec_rtt_ms: u32,
    /// Which of a dual-homed site's paths this connection runs over (empty: the site's only
    /// one).
    #[prost(string, tag = "7")]
    pub site_path: String,
    /// A warm standby: the site is here already over another path; this connection is kept
    /// ready (and probed) to take over, and does not change the roster.
    #[prost(bool, tag = "8")]
    pub standby: bool,
}

/// A track as the relay offers it.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct TrackInfo {
    /// This connection's id for the track (chosen by the side that sends its groups).
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// The publishing site.
    #[prost(string, tag = "2")]
    pub publisher: String,
    /// "video" or "audio".
    #[prost(string, tag = "3")]
    pub kind: String,
    /// "h264", "aac", ...
    #[prost(string, tag = "4")]
    pub codec: String,
    /// "high", "low" (video), "main" (audio).
    #[prost(string, tag = "5")]
    pub rendition: String,
    #[prost(uint32, tag = "6")]
    pub bitrate_kbps: u32,
    #[prost(uint32, tag = "7")]
    pub width: u32,
    #[prost(uint32, tag = "8")]
    pub height: u32,
    /// Codec parameters a decoder needs (H.264 SPS/PPS, AAC AudioSpecificConfig).
    #[prost(bytes = "vec", tag = "9")]
    pub extradata: Vec<u8>,
    /// Audio sample rate and channels (0 for video).
    #[prost(uint32, tag = "10")]
    pub sample_rate: u32,
    #[prost(uint32, tag = "11")]
    pub channels: u32,
    /// Relays the track has passed through, nearest last. A relay never takes a track whose
    /// path names it, and never sends a track back up to a relay it came from: cascades
    /// cannot loop.
    #[prost(string, repeated, tag = "12")]
    pub via: Vec<String>,
    /// The publisher's wall clock (µs since the Unix epoch) at media time 0: with synchronised
    /// clocks, a receiver knows each frame's age (0: unknown).
    #[prost(int64, tag = "13")]
    pub clock_us: i64,
}

impl TrackInfo {
    /// The track's name across connections: publisher, kind, rendition.
    pub fn key(&self) -> TrackKey {
        TrackKey {
            publisher: self.publisher.clone(),
            kind: self.kind.clone(),
            rendition: self.rendition.clone(),
        }
    }
}

/// A track's identity across connections and relays.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct TrackKey {
    pub publisher: String,
    pub kind: String,
    pub rendition: String,
}

impl std::fmt::Display for TrackKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.publisher, self.kind, self.rendition)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The relay's own name (a site ID).
    #[prost(string, tag = "2")]
    pub relay: String,
    /// The participant's identity as the relay sees it (from its certificate).
    #[prost(string, tag = "3")]
    pub you: String,
    #[prost(string, tag = "4")]
    pub chair: String,
    /// The relay's wish for the participant's groups, as [`Hello::fec_rtt_ms`].
    #[prost(uint32, tag = "5")]
    pub fec_rtt_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Announce {
    #[prost(message, optional, tag = "1")]
    pub track: Option<TrackInfo>,
}

/// Every track the participant may subscribe to (replaces the previous list).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tracks {
    #[prost(message, repeated, tag = "1")]
    pub tracks: Vec<TrackInfo>,
}

/// Subscribe to a publisher's kind of track; the relay picks the rendition (`rendition`
/// empty) or sends the one named.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Subscribe {
    #[prost(string, tag = "1")]
    pub publisher: String,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(string, tag = "3")]
    pub rendition: String,
    /// Start with the current group from its keyframe, however old (a failover: the viewer
    /// holds the start of that group and needs the rest at once).
    #[prost(bool, tag = "4")]
    pub from_current: bool,
    /// The rendition to start with (the one the viewer was receiving over its other path);
    /// the relay's choice follows the link from the next group on.
    #[prost(string, tag = "5")]
    pub start_rendition: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Unsubscribe {
    #[prost(string, tag = "1")]
    pub publisher: String,
    #[prost(string, tag = "2")]
    pub kind: String,
}

/// Who holds the floor (empty: nobody besides the chair).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Floor {
    #[prost(string, tag = "1")]
    pub holder: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RollCall {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub deadline_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Present {
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// How a participant receives one track (sent every few seconds).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Health {
    #[prost(string, tag = "1")]
    pub publisher: String,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(string, tag = "3")]
    pub rendition: String,
    #[prost(uint32, tag = "4")]
    pub kbps: u32,
    #[prost(uint64, tag = "5")]
    pub frames: u64,
    #[prost(uint64, tag = "6")]
    pub groups_lost: u64,
    /// Capture to arrival (ms), when clocks allow.
    #[prost(int32, tag = "7")]
    pub latency_ms: i32,
    /// What the participant's player shows of this video track (all 0: not playing it):
    /// frames shown, frames sent over the same span, freezes, the longest (ms), and the
    /// 99th percentile of the latest frames' age when shown (ms; -1: unknown).
    #[prost(uint64, tag = "8")]
    pub shown: u64,
    #[prost(uint64, tag = "9")]
    pub expected: u64,
    #[prost(uint64, tag = "10")]
    pub freezes: u64,
    #[prost(uint32, tag = "11")]
    pub longest_freeze_ms: u32,
    #[prost(int32, tag = "12")]
    pub age_p99_ms: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorMsg {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// A certificate as a relay saw it at the handshake: whose, and which one.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct SiteCert {
    #[prost(string, tag = "1")]
    pub site: String,
    #[prost(string, tag = "2")]
    pub province: String,
    /// The certificate's serial number (hex): only the registry's current one is accepted.
    #[prost(string, tag = "3")]
    pub serial: String,
}

/// A relay below asks whether these certificates may still take part (revoked? superseded?).
/// Only a relay certificate may ask; at most [`MAX_CHECK_SITES`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckSites {
    #[prost(message, repeated, tag = "1")]
    pub sites: Vec<SiteCert>,
}

/// The answer about one certificate of a [`CheckSites`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct SiteVerdict {
    #[prost(bool, tag = "1")]
    pub allowed: bool,
    /// Why (refused: "revoked", "superseded ..."; allowed: who said so).
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// The answer to a [`CheckSites`]: one verdict per certificate, in the same order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SitesChecked {
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<SiteVerdict>,
}

/// A control frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    Hello(Hello),
    Welcome(Welcome),
    Announce(Announce),
    Tracks(Tracks),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Floor(Floor),
    RollCall(RollCall),
    Present(Present),
    Health(Health),
    Error(ErrorMsg),
    CheckSites(CheckSites),
    SitesChecked(SitesChecked),
}

impl Control {
    fn kind(&self) -> u8 {
        match self {
            Control::Hello(_) => 1,
            Control::Welcome(_) => 2,
            Control::Announce(_) => 3,
            Control::Tracks(_) => 4,
            Control::Subscribe(_) => 5,
            Control::Unsubscribe(_) => 6,
            Control::Floor(_) => 7,
            Control::RollCall(_) => 8,
            Control::Present(_) => 9,
            Control::Health(_) => 10,
            Control::Error(_) => 11,
            Control::CheckSites(_) => 12,
            Control::SitesChecked(_) => 13,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Control::Hello(_) => "Hello",
            Control::Welcome(_) => "Welcome",
            Control::Announce(_) => "Announce",
            Control::Tracks(_) => "Tracks",
            Control::Subscribe(_) => "Subscribe",
            Control::Unsubscribe(_) => "Unsubscribe",
            Control::Floor(_) => "Floor",
            Control::RollCall(_) => "RollCall",
            Control::Present(_) => "Present",
            Control::Health(_) => "Health",
            Control::Error(_) => "Error",
            Control::CheckSites(_) => "CheckSites",
            Control::SitesChecked(_) => "SitesChecked",
        }
    }

    /// Length, kind, body.
    pub fn encode(&self) -> Bytes {
        let body = match self {
            Control::Hello(m) => m.encode_to_vec(),
            Control::Welcome(m) => m.encode_to_vec(),
            Control::Announce(m) => m.encode_to_vec(),
            Control::Tracks(m) => m.encode_to_vec(),
            Control::Subscribe(m) => m.encode_to_vec(),
            Control::Unsubscribe(m) => m.encode_to_vec(),
            Control::Floor(m) => m.encode_to_vec(),
            Control::RollCall(m) => m.encode_to_vec(),
            Control::Present(m) => m.encode_to_vec(),
            Control::Health(m) => m.encode_to_vec(),
            Control::Error(m) => m.encode_to_vec(),
            Control::CheckSites(m) => m.encode_to_vec(),
            Control::SitesChecked(m) => m.encode_to_vec(),
        };
        let mut b = BytesMut::with_capacity(5 + body.len());
        b.put_u32(body.len() as u32 + 1);
        b.put_u8(self.kind());
        b.put_slice(&body);
        b.freeze()
    }

    /// Decodes one frame's kind and body (the length already taken off).
    pub fn decode(frame: &[u8]) -> Result<Control, WireError> {
        let (&kind, body) = frame
            .split_first()
            .ok_or_else(|| malformed("control frame", "empty"))?;
        fn d<M: Message + Default>(b: &[u8]) -> Result<M, WireError> {
            M::decode(b).map_err(|e| malformed("control frame", e))
        }
        Ok(match kind {
            1 => Control::Hello(d(body)?),
            2 => Control::Welcome(d(body)?),
            3 => Control::Announce(d(body)?),
            4 => Control::Tracks(d(body)?),
            5 => Control::Subscribe(d(body)?),
            6 => Control::Unsubscribe(d(body)?),
            7 => Control::Floor(d(body)?),
            8 => Control::RollCall(d(body)?),
            9 => Control::Present(d(body)?),
            10 => Control::Health(d(body)?),
            11 => Control::Error(d(body)?),
            12 => {
                let m: CheckSites = d(body)?;
                bounded("CheckSites", m.sites.len())?;
                Control::CheckSites(m)
            }
            13 => {
                let m: SitesChecked = d(body)?;
                bounded("SitesChecked", m.results.len())?;
                Control::SitesChecked(m)
            }
            k => return Err(WireError::UnknownKind(k)),
        })
    }

    /// The length a frame header announces, checked against the limit.
    pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
        let len = u32::from_be_bytes(header) as usize;
        if len == 0 {
            return Err(malformed("control frame", "zero length"));
        }
        if len > MAX_CONTROL {
            return Err(WireError::TooLarge {
                what: "control frame",
                len,
                max: MAX_CONTROL,
            });
        }
        Ok(len)
    }
}

/// At most [`MAX_CHECK_SITES`] entries in a check or its answer.
fn bounded(what: &'static str, n: usize) -> Result<(), WireError> {
    if n > MAX_CHECK_SITES {
        return Err(malformed(
            what,
            format!("{n} certificates, at most {MAX_CHECK_SITES} in one frame"),
        ));
    }
    Ok(())
}

/// The start of a group stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    pub track: u32,
    pub group: u64,
}

impl GroupHeader {
    pub fn encode(&self) -> [u8; GROUP_HEADER_LEN] {
        let mut b = [0u8; GROUP_HEADER_LEN];
        b[0] = GROUP_MAGIC;
        b[1] = VERSION as u8;
        b[2..6].copy_from_slice(&self.track.to_be_bytes());
        b[6..14].copy_from_slice(&self.group.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; GROUP_HEADER_LEN]) -> Result<GroupHeader, WireError> {
        if b[0] != GROUP_MAGIC {
            return Err(malformed(
                "group stream",
                format!("starts with {:#04x}, not {GROUP_MAGIC:#04x}", b[0]),
            ));
        }
        if u32::from(b[1]) != VERSION {
            return Err(WireError::Version(u32::from(b[1])));
        }
        let mut r = &b[2..];
        Ok(GroupHeader {
            track: r.get_u32(),
            group: r.get_u64(),
        })
    }
}

/// Object flags.
pub mod flags {
    /// A video keyframe (the first object of every video group).
    pub const KEY: u8 = 1;
}

/// One frame of a track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Presentation time, microseconds on the publisher's media clock.
    pub pts_us: i64,
    pub flags: u8,
    pub payload: Bytes,
}

impl Object {
    pub fn is_key(&self) -> bool {
        self.flags & flags::KEY != 0
    }

    /// Header and payload, ready to write on a group stream.
    pub fn header(&self) -> [u8; OBJECT_HEADER_LEN] {
        let mut b = [0u8; OBJECT_HEADER_LEN];
        b[0..4].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        b[4..12].copy_from_slice(&self.pts_us.to_be_bytes());
        b[12] = self.flags;
        b
    }

    /// Parses an object header: (payload length, pts, flags).
    pub fn parse_header(b: &[u8; OBJECT_HEADER_LEN]) -> Result<(usize, i64, u8), WireError> {
        let mut r = &b[..];
        let len = r.get_u32() as usize;
        let pts = r.get_i64();
        let fl = r.get_u8();
        if len > MAX_OBJECT {
            return Err(WireError::TooLarge {
                what: "object",
                len,
                max: MAX_OBJECT,
            });
        }
        if fl & !flags::KEY != 0 {
            return Err(malformed("object", format!("unknown flags {fl:#04x}")));
        }
        Ok((len, pts, fl))
    }

    /// Encodes the object whole (header and payload).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(OBJECT_HEADER_LEN + self.payload.len());
        b.put_slice(&self.header());
        b.put_slice(&self.payload);
        b.freeze()
    }
}

/// Checks a Hello against this side's version.
pub fn check_hello(h: &Hello) -> Result<Role, WireError> {
    if h.version != VERSION {
        return Err(WireError::Version(h.version));
    }
    if !h.site_path.is_empty() && tiandi_link::names::validate_name("path", &h.site_path).is_err() {
        return Err(malformed("Hello", format!("path name {:?}", h.site_path)));
    }
    Role::parse(&h.role).ok_or_else(|| malformed("Hello", format!("unknown role {:?}", h.role)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_round_trip() {
        let frames = [
            Control::Hello(Hello {
                version: VERSION,
                room: "drill".into(),
                role: "relay".into(),
                path: vec!["ministry".into()],
                link_kbps: 512,
                fec_rtt_ms: 200,
                ..Default::default()
            }),
            Control::Tracks(Tracks {
                tracks: vec![TrackInfo {
                    id: 7,
                    publisher: "bj-001".into(),
                    kind: "video".into(),
                    codec: "h264".into(),
                    rendition: "low".into(),
                    bitrate_kbps: 300,
                    width: 640,
                    height: 360,
                    extradata: vec![0, 0, 0, 1, 0x67],
                    ..Default::default()
                }],
            }),
            Control::Floor(Floor {
                holder: "gd-003".into(),
            }),
            Control::Error(ErrorMsg {
                code: codes::NO_FLOOR,
                message: "no floor".into(),
            }),
        ];
        for f in frames {
            let bytes = f.encode();
            let len = Control::frame_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, bytes.len() - 4);
            assert_eq!(Control::decode(&bytes[4..]).unwrap(), f);
        }
    }

    fn cert(i: usize) -> SiteCert {
        SiteCert {
            site: format!("gd-{i:03}"),
            province: "GD".into(),
            serial: format!("{i:032x}"),
        }
    }

    #[test]
    fn site_checks_round_trip_in_order() {
        let frames = [
            Control::CheckSites(CheckSites {
                sites: vec![cert(1), cert(2), cert(3)],
            }),
            Control::SitesChecked(SitesChecked {
                results: vec![
                    SiteVerdict {
                        allowed: true,
                        reason: "registry".into(),
                    },
                    SiteVerdict {
                        allowed: false,
                        reason: "revoked".into(),
                    },
                    SiteVerdict::default(),
                ],
            }),
            Control::CheckSites(CheckSites { sites: vec![] }),
        ];
        for f in frames {
            let bytes = f.encode();
            let len = Control::frame_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, bytes.len() - 4);
            assert_eq!(Control::decode(&bytes[4..]).unwrap(), f);
        }
        assert_eq!(
            Control::decode(&Control::CheckSites(CheckSites::default()).encode()[4..])
                .unwrap()
                .name(),
            "CheckSites"
        );
    }

    #[test]
    fn a_check_of_more_than_1024_sites_is_malformed() {
        // The longest certificates allowed, as many as allowed: one frame, within the limit.
        let long = |i: usize| SiteCert {
            site: format!("{i:0>64}"),
            province: "P".repeat(64),
            serial: "f".repeat(32),
        };
        let full = Control::CheckSites(CheckSites {
            sites: (0..MAX_CHECK_SITES).map(long).collect(),
        });
        let bytes = full.encode();
        assert!(Control::frame_len(bytes[..4].try_into().unwrap()).is_ok());
        assert_eq!(Control::decode(&bytes[4..]).unwrap(), full);

        let over = Control::CheckSites(CheckSites {
            sites: (0..=MAX_CHECK_SITES).map(cert).collect(),
        });
        let err = Control::decode(&over.encode()[4..]).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Malformed {
                    what: "CheckSites",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), codes::PROTOCOL);
        let over = Control::SitesChecked(SitesChecked {
            results: vec![SiteVerdict::default(); MAX_CHECK_SITES + 1],
        });
        assert!(matches!(
            Control::decode(&over.encode()[4..]).unwrap_err(),
            WireError::Malformed {
                what: "SitesChecked",
                ..
            }
        ));
    }

    #[test]
    fn malformed_control_frames_are_named() {
        assert_eq!(
            Control::decode(&[42, 1, 2]).unwrap_err(),
            WireError::UnknownKind(42)
        );
        assert!(matches!(
            Control::decode(&[1, 0xff, 0xff, 0xff]).unwrap_err(),
            WireError::Malformed { .. }
        ));
        assert!(matches!(
            Control::frame_len((MAX_CONTROL as u32 + 1).to_be_bytes()).unwrap_err(),
            WireError::TooLarge { .. }
        ));
        assert!(Control::frame_len([0; 4]).is_err());
    }

    #[test]
    fn group_and_object_headers() {
        let h = GroupHeader {
            track: 3,
            group: 1 << 40,
        };
        assert_eq!(GroupHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = 0x47; // an MPEG-TS sync byte: somebody sent raw TS on a group stream
        assert!(
            GroupHeader::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("0x47")
        );
        let mut v2 = h.encode();
        v2[1] = 9;
        assert_eq!(GroupHeader::decode(&v2).unwrap_err(), WireError::Version(9));

        let o = Object {
            pts_us: -5,
            flags: flags::KEY,
            payload: Bytes::from_static(b"frame"),
        };
        let e = o.encode();
        let (len, pts, fl) =
            Object::parse_header(e[..OBJECT_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((len, pts, fl), (5, -5, flags::KEY));
        let mut huge = o.header();
        huge[0..4].copy_from_slice(&(MAX_OBJECT as u32 + 1).to_be_bytes());
        assert!(matches!(
            Object::parse_header(&huge).unwrap_err(),
            WireError::TooLarge { .. }
        ));
        let mut odd = o.header();
        odd[12] = 0x80;
        assert!(Object::parse_header(&odd).is_err());
    }

    #[test]
    fn hello_versions_and_roles() {
        let mut h = Hello {
            version: VERSION,
            room: "r".into(),
            role: "site".into(),
            ..Default::default()
        };
        assert_eq!(check_hello(&h).unwrap(), Role::Site);
        h.role = "mixer".into();
        assert!(check_hello(&h).is_err());
        h.role = "site".into();
        h.version = 2;
        assert_eq!(check_hello(&h).unwrap_err(), WireError::Version(2));
    }
}
