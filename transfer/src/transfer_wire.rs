//! The transfer protocol on one QUIC bidirectional stream per transfer, opened by the sender.
//!
//! Every frame is a 4-byte big-endian length, one kind byte, and a protobuf body.
//!
//! Chunks do not travel on that stream: each goes on a unidirectional stream of its own,
//! `[CHUNK_MAGIC] [file hash: 32 bytes] [index: u32 BE] [bytes…]` to the end of the stream, so
//! a lost packet holds back one chunk, not everything behind it (on a cut, the data behind an
//! unrepaired loss would otherwise be thrown away with the connection).
//!
//! ```text
//! sender → receiver: Offer (then chunks on their own streams: only those the receiver lacks)
//! receiver → sender: Have (chunks already verified and durable), then any of
//!                    Acked (chunks now durable: never sent again), Resend (a chunk failed
//!                    its check), Done (the whole file verified and in place: the receipt),
//!                    Failed (a clear error; with retry_after_ms the sender pauses and retries)
//! ```
//!
//! A relay reports upstream how its forwarded copies fare on a stream of their own:
//!
//! ```text
//! relay → upstream: Forwarded (per destination below it: state, progress, receipt)
//! upstream → relay: Acked (empty: stored), or Failed
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::TransferError;
use crate::manifest::{Hash, MAX_CHUNK, MAX_CHUNKS, Manifest};

/// The transfer protocol's version (in Offer); a receiver refuses another major.
pub const VERSION: u32 = 1;
/// The largest frame: a manifest of MAX_CHUNKS hashes, or a chunk, plus headers.
pub const MAX_FRAME: usize = (MAX_CHUNKS as usize) * 32 + 64 * 1024;
const _: () = assert!(MAX_FRAME > MAX_CHUNK as usize);

/// Stable failure codes.
pub mod codes {
    /// Malformed or unexpected frame.
    pub const PROTOCOL: u32 = 1;
    /// The receiver's disk is full: paused, retry later.
    pub const DISK_FULL: u32 = 2;
    /// The destination is unknown or not allowed.
    pub const UNKNOWN_DESTINATION: u32 = 3;
    /// The whole file did not verify (the receiver starts over).
    pub const VERIFY: u32 = 4;
    /// The source file changed while it was being sent.
    pub const SOURCE_CHANGED: u32 = 5;
    /// A storage error on the receiver.
    pub const STORAGE: u32 = 6;
    /// Another version of the protocol.
    pub const VERSION: u32 = 7;
    /// A short offer for a transfer the receiver does not know: send the full one.
    pub const NEED_MANIFEST: u32 = 8;
    /// A name (file name, site to forward to) that does not pass the one grammar
    /// (`tiandi_link::names`): refused, nothing written.
    pub const BAD_NAME: u32 = 9;
    /// Chunk stream stopped (QUIC `STOP_SENDING` code): the receiver's memory for chunks is
    /// full (send the transfer again later, from its `Have`).
    pub const BUSY: u32 = 10;
    /// Chunk stream stopped: no transfer of this peer's is waiting for it.
    pub const UNKNOWN_TRANSFER: u32 = 11;
    /// A lease asked for is held by another holder until it expires.
    pub const LEASE_HELD: u32 = 12;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Offer {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(uint32, tag = "4")]
    pub chunk_size: u32,
    #[prost(bytes = "vec", tag = "5")]
    pub file_hash: Vec<u8>,
    /// The chunks' hashes, 32 bytes each, in order.
    #[prost(bytes = "vec", tag = "6")]
    pub chunk_hashes: Vec<u8>,
    /// alarm, normal, bulk or backup.
    #[prost(string, tag = "7")]
    pub priority: String,
    /// Who queued the transfer (a site ID, or "controller").
    #[prost(string, tag = "8")]
    pub origin: String,
    /// For a relay: the sites below it that must get the file too.
    #[prost(string, repeated, tag = "9")]
    pub forward_to: Vec<String>,
    /// The transfer's ID at its origin (for status and receipts).
    #[prost(string, tag = "10")]
    pub transfer_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Have {
    /// Bitmap of chunks verified and durable (bit i of byte i/8, LSB first).
    #[prost(bytes = "vec", tag = "1")]
    pub verified: Vec<u8>,
    /// Chunks the receiver got in part when a connection broke (held in its memory): the
    /// sender sends only the rest of each, as pieces.
    #[prost(message, repeated, tag = "2")]
    pub partial: Vec<PartialChunk>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PartialChunk {
    #[prost(uint32, tag = "1")]
    pub index: u32,
    /// Byte ranges held, as start, end pairs (end exclusive), sorted and disjoint.
    #[prost(uint32, repeated, tag = "2")]
    pub ranges: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Acked {
    #[prost(uint32, repeated, tag = "1")]
    pub chunks: Vec<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resend {
    #[prost(uint32, tag = "1")]
    pub chunk: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
}

#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize, prost::Message)]
pub struct Receipt {
    #[prost(string, tag = "1")]
    pub file_hash: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// Where the file now is on the receiver.
    #[prost(string, tag = "3")]
    pub path: String,
    #[prost(int64, tag = "4")]
    pub verified_ms: i64,
    /// The receiving node.
    #[prost(string, tag = "5")]
    pub node: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Failed {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
    /// 0: permanent. Otherwise the sender pauses this long and offers again.
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
}

/// How a relay's copy of a file toward one site below it is doing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardStatus {
    #[prost(string, tag = "1")]
    pub file_hash: String,
    /// The destination site below the relay.
    #[prost(string, tag = "2")]
    pub site: String,
    /// queued, sending, paused, delivered or failed.
    #[prost(string, tag = "3")]
    pub state: String,
    #[prost(uint64, tag = "4")]
    pub acked_bytes: u64,
    #[prost(uint64, tag = "5")]
    pub sent_bytes: u64,
    #[prost(uint64, tag = "6")]
    pub rate_bps: u64,
    #[prost(uint64, tag = "7")]
    pub attempts: u64,
    #[prost(string, tag = "8")]
    pub error: String,
    #[prost(message, optional, tag = "9")]
    pub receipt: Option<Receipt>,
    #[prost(int64, tag = "10")]
    pub updated_ms: i64,
    /// Why the site below paused it (a [`codes`] value; 0: not paused by it).
    #[prost(uint32, tag = "11")]
    pub pause_code: u32,
}

/// A relay asks upstream whether a site below may connect (its certificate may have been
/// revoked or superseded since it was issued). Answer: Acked (yes) or Failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckSite {
    #[prost(string, tag = "1")]
    pub site: String,
    #[prost(string, tag = "2")]
    pub serial: String,
    #[prost(string, tag = "3")]
    pub province: String,
}

/// A lease on a shared resource (a backup repository), asked of the controller: to take or
/// renew it (`ttl_s` > 0) or give it back (`release`). Answered with a `Lease` whose
/// `expires_ms` says until when it is held, or `Failed` (`LEASE_HELD`, saying by whom).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Lease {
    /// `<site>/<name>`: a site asks only for its own.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Who holds it (a run: `<job>/<kind>/<start ms>`).
    #[prost(string, tag = "2")]
    pub holder: String,
    #[prost(uint32, tag = "3")]
    pub ttl_s: u32,
    #[prost(bool, tag = "4")]
    pub release: bool,
    #[prost(int64, tag = "5")]
    pub expires_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Forwarded {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<ForwardStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Offer(Offer),
    Have(Have),
    Acked(Acked),
    Resend(Resend),
    Done(Receipt),
    Failed(Failed),
    Forwarded(Forwarded),
    CheckSite(CheckSite),
    Lease(Lease),
}

impl Frame {
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Offer(_) => "Offer",
            Frame::Have(_) => "Have",
            Frame::Acked(_) => "Acked",
            Frame::Resend(_) => "Resend",
            Frame::Done(_) => "Done",
            Frame::Failed(_) => "Failed",
            Frame::Forwarded(_) => "Forwarded",
            Frame::CheckSite(_) => "CheckSite",
            Frame::Lease(_) => "Lease",
        }
    }

    /// The frame's bytes without the length prefix (the codec adds it).
    pub fn encode(&self) -> Bytes {
        fn with_kind(kind: u8, m: &impl Message) -> Bytes {
            let mut b = BytesMut::with_capacity(1 + m.encoded_len());
            b.put_u8(kind);
            m.encode(&mut b).expect("BytesMut grows");
            b.freeze()
        }
        match self {
            Frame::Offer(m) => with_kind(1, m),
            Frame::Have(m) => with_kind(3, m),
            Frame::Acked(m) => with_kind(4, m),
            Frame::Resend(m) => with_kind(5, m),
            Frame::Done(m) => with_kind(6, m),
            Frame::Failed(m) => with_kind(7, m),
            Frame::Forwarded(m) => with_kind(8, m),
            Frame::CheckSite(m) => with_kind(9, m),
            Frame::Lease(m) => with_kind(10, m),
        }
    }

    pub fn decode(mut b: Bytes) -> Result<Frame, TransferError> {
        if b.is_empty() {
            return Err(TransferError::Protocol("empty frame".into()));
        }
        let kind = b.get_u8();
        let pe = |e: prost::DecodeError| TransferError::Protocol(format!("malformed frame: {e}"));
        Ok(match kind {
            1 => Frame::Offer(Offer::decode(b).map_err(pe)?),
            3 => Frame::Have(Have::decode(b).map_err(pe)?),
            4 => Frame::Acked(Acked::decode(b).map_err(pe)?),
            5 => Frame::Resend(Resend::decode(b).map_err(pe)?),
            6 => Frame::Done(Receipt::decode(b).map_err(pe)?),
            7 => Frame::Failed(Failed::decode(b).map_err(pe)?),
            8 => Frame::Forwarded(Forwarded::decode(b).map_err(pe)?),
            9 => Frame::CheckSite(CheckSite::decode(b).map_err(pe)?),
            10 => Frame::Lease(Lease::decode(b).map_err(pe)?),
            k => return Err(TransferError::Protocol(format!("unknown frame kind {k}"))),
        })
    }
}

impl Offer {
    pub fn new(m: &Manifest, transfer_id: &str, priority: &str, origin: &str) -> Offer {
        Offer {
            version: VERSION,
            name: m.name.clone(),
            size: m.size,
            chunk_size: m.chunk_size,
            file_hash: m.file_hash.to_vec(),
            chunk_hashes: m.chunks.concat(),
            priority: priority.into(),
            origin: origin.into(),
            forward_to: Vec::new(),
            transfer_id: transfer_id.into(),
        }
    }

    /// A resumed transfer's offer, without the chunk hashes.
    pub fn short(mut self) -> Offer {
        self.chunk_hashes = Vec::new();
        self
    }

    pub fn is_short(&self) -> bool {
        self.chunk_hashes.is_empty() && self.size > 0
    }

    /// The manifest it carries, checked.
    pub fn manifest(&self) -> Result<Manifest, TransferError> {
        if self.version != VERSION {
            return Err(TransferError::Version(self.version));
        }
        let hash = |b: &[u8]| -> Result<Hash, TransferError> {
            b.try_into()
                .map_err(|_| TransferError::Protocol("hash is not 32 bytes".into()))
        };
        if !self.chunk_hashes.len().is_multiple_of(32) {
            return Err(TransferError::Protocol(
                "chunk hashes not a multiple of 32 bytes".into(),
            ));
        }
        let m = Manifest {
            name: self.name.clone(),
            size: self.size,
            chunk_size: self.chunk_size,
            file_hash: hash(&self.file_hash)?,
            chunks: self
                .chunk_hashes
                .chunks(32)
                .map(hash)
                .collect::<Result<_, _>>()?,
        };
        m.validate()?;
        Ok(m)
    }
}

/// A bitmap of chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: u32,
    ones: u32,
}

impl Bitmap {
    pub fn new(len: u32) -> Bitmap {
        Bitmap {
            bits: vec![0; len.div_ceil(8) as usize],
            len,
            ones: 0,
        }
    }
    /// From the wire; bits past `len` are ignored.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Bitmap {
        let mut b = Bitmap::new(len);
        for i in 0..len {
            if bytes
                .get((i / 8) as usize)
                .is_some_and(|x| x & (1 << (i % 8)) != 0)
            {
                b.set(i);
            }
        }
        b
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    /// Sets bit `i`; true if it was not set.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
        self.ones += 1;
        true
    }
    pub fn count(&self) -> u32 {
        self.ones
    }
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn complete(&self) -> bool {
        self.ones == self.len
    }
    /// Unset bits in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| !self.get(*i))
    }
}

/// First byte of a chunk stream.
pub const CHUNK_MAGIC: u8 = 0xC7;
/// Bytes before a chunk's data on its stream.
pub const CHUNK_HEADER: usize = 1 + 32 + 4;
/// First byte of a piece stream: part of a chunk, from a byte offset (`[PIECE_MAGIC] [file
/// hash] [index: u32 BE] [offset: u32 BE] [bytes…]`), sent to complete a partial chunk.
pub const PIECE_MAGIC: u8 = 0xC8;
/// Bytes before a piece's data on its stream.
pub const PIECE_HEADER: usize = CHUNK_HEADER + 4;

/// The header of the piece of chunk `index` starting at `offset`.
pub fn piece_header(file_hash: &Hash, index: u32, offset: u32) -> [u8; PIECE_HEADER] {
    let mut h = [0u8; PIECE_HEADER];
    h[..CHUNK_HEADER].copy_from_slice(&chunk_header(file_hash, index));
    h[0] = PIECE_MAGIC;
    h[CHUNK_HEADER..].copy_from_slice(&offset.to_be_bytes());
    h
}

/// Most byte ranges one chunk's holdings may be sent as.
pub const MAX_WIRE_RANGES: usize = 4096;

/// Byte ranges (start, end exclusive), kept sorted and merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u32, u32)>);

impl Ranges {
    pub fn add(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        self.0.push((start, end));
        self.0.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(self.0.len());
        for (s, e) in self.0.drain(..) {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        self.0 = out;
    }
    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| u64::from(e - s)).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Whether [0, len) is held.
    pub fn covers(&self, len: u32) -> bool {
        len == 0 || self.0.first().is_some_and(|(s, e)| *s == 0 && *e >= len)
    }
    /// What [0, len) lacks.
    pub fn missing(&self, len: u32) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        for (s, e) in &self.0 {
            if *s > at {
                out.push((at, (*s).min(len)));
            }
            at = at.max(*e);
        }
        if at < len {
            out.push((at, len));
        }
        out.retain(|(s, e)| s < e);
        out
    }
    pub fn to_wire(&self) -> Vec<u32> {
        self.0.iter().flat_map(|(s, e)| [*s, *e]).collect()
    }
    /// From the wire, checked against the chunk's length (None: malformed).
    /// The wire carries them as `to_wire` writes them: sorted, disjoint, not touching, at most
    /// [`MAX_WIRE_RANGES`]; anything else is refused in one pass (re-sorting a hostile list
    /// range by range cost minutes of the runtime's CPU: found by the `transfer_frame` fuzz
    /// target's regression seed).
    pub fn from_wire(v: &[u32], len: u32) -> Option<Ranges> {
        if !v.len().is_multiple_of(2) || v.len() / 2 > MAX_WIRE_RANGES {
            return None;
        }
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len() / 2);
        for p in v.chunks(2) {
            if p[0] >= p[1] || p[1] > len || out.last().is_some_and(|l| p[0] <= l.1) {
                return None;
            }
            out.push((p[0], p[1]));
        }
        Some(Ranges(out))
    }
}

/// The header of chunk `index` of the file with hash `file_hash`.
pub fn chunk_header(file_hash: &Hash, index: u32) -> [u8; CHUNK_HEADER] {
    let mut h = [0u8; CHUNK_HEADER];
    h[0] = CHUNK_MAGIC;
    h[1..33].copy_from_slice(file_hash);
    h[33..].copy_from_slice(&index.to_be_bytes());
    h
}

/// Parses a chunk stream's header.
pub fn parse_chunk_header(h: &[u8; CHUNK_HEADER]) -> Result<(Hash, u32), TransferError> {
    if h[0] != CHUNK_MAGIC {
        return Err(TransferError::Protocol(format!(
            "a chunk stream starts with {:#04x}, expected {CHUNK_MAGIC:#04x}",
            h[0]
        )));
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&h[1..33]);
    let index = u32::from_be_bytes([h[33], h[34], h[35], h[36]]);
    Ok((hash, index))
}

/// Frames read from a transfer stream.
pub type Reader =
    tokio_util::codec::FramedRead<quinn::RecvStream, tokio_util::codec::LengthDelimitedCodec>;
/// Frames written to a transfer stream.
pub type Writer =
    tokio_util::codec::FramedWrite<quinn::SendStream, tokio_util::codec::LengthDelimitedCodec>;

/// Writes one frame.
pub async fn put(w: &mut Writer, f: Frame) -> Result<(), TransferError> {
    use futures_util::SinkExt;
    w.send(f.encode())
        .await
        .map_err(|e| TransferError::Stream(e.to_string()))
}

/// Reads the next frame; `None` when the peer finished the stream.
pub async fn next(r: &mut Reader) -> Result<Option<Frame>, TransferError> {
    use futures_util::StreamExt;
    match r.next().await {
        None => Ok(None),
        Some(Ok(b)) => Ok(Some(Frame::decode(b.freeze())?)),
        Some(Err(e)) => Err(TransferError::Stream(e.to_string())),
    }
}

/// The codec for transfer streams.
pub fn codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_garbage_is_an_error() {
        let frames = vec![
            Frame::Have(Have {
                verified: vec![1, 2, 3],
                partial: vec![PartialChunk {
                    index: 4,
                    ranges: vec![0, 100, 200, 300],
                }],
            }),
            Frame::Acked(Acked { chunks: vec![1, 2] }),
            Frame::Failed(Failed {
                code: codes::DISK_FULL,
                message: "full".into(),
                retry_after_ms: 5000,
            }),
            Frame::Forwarded(Forwarded {
                items: vec![ForwardStatus {
                    file_hash: "ab".into(),
                    site: "gd-002".into(),
                    state: "delivered".into(),
                    acked_bytes: 10,
                    receipt: Some(Receipt {
                        size: 10,
                        node: "gd-002".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            }),
        ];
        for f in frames {
            assert_eq!(Frame::decode(f.encode()).unwrap(), f);
        }
        assert!(Frame::decode(Bytes::new()).is_err());
        assert!(Frame::decode(Bytes::from_static(&[9, 1, 2])).is_err());
        assert!(Frame::decode(Bytes::from_static(&[2, 1])).is_err());
        let h = chunk_header(&[9; 32], 77);
        assert_eq!(parse_chunk_header(&h).unwrap(), ([9; 32], 77));
        let mut bad = h;
        bad[0] = 1;
        assert!(parse_chunk_header(&bad).is_err());
        assert!(Frame::decode(Bytes::from_static(&[1, 0xff, 0xff])).is_err());
    }

    #[test]
    fn ranges_merge_and_list_what_is_missing() {
        let mut r = Ranges::default();
        r.add(100, 200);
        r.add(0, 50);
        r.add(150, 300);
        r.add(50, 60);
        assert_eq!(r.0, vec![(0, 60), (100, 300)]);
        assert_eq!(r.len(), 260);
        assert_eq!(r.missing(400), vec![(60, 100), (300, 400)]);
        assert!(!r.covers(400));
        r.add(60, 400);
        assert!(r.covers(400) && r.missing(400).is_empty());
        assert_eq!(Ranges::from_wire(&r.to_wire(), 400), Some(r));
        assert_eq!(Ranges::from_wire(&[5, 3], 400), None);
        assert_eq!(Ranges::from_wire(&[0, 500], 400), None);
        assert_eq!(Ranges::from_wire(&[1], 400), None);
    }

    #[test]
    fn bitmap_counts_and_lists_missing() {
        let mut b = Bitmap::new(10);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(!b.set(10));
        b.set(9);
        let c = Bitmap::from_bytes(b.as_bytes(), 10);
        assert_eq!(c, b);
        assert_eq!(c.count(), 2);
        assert_eq!(c.missing().count(), 8);
        assert!(!c.complete());
    }

    #[test]
    fn ranges_from_the_wire_are_sorted_disjoint_and_bounded() {
        let r = Ranges::from_wire(&[0, 10, 20, 30], 100).unwrap();
        assert_eq!(Ranges::from_wire(&r.to_wire(), 100), Some(r));
        for bad in [
            &[20, 30, 0, 10][..],
            &[0, 10, 10, 20],
            &[0, 10, 5, 20],
            &[0, 200],
            &[5, 5],
            &[1],
        ] {
            assert_eq!(Ranges::from_wire(bad, 100), None, "{bad:?}");
        }
        let many: Vec<u32> = (0..=MAX_WIRE_RANGES as u32)
            .flat_map(|i| [3 * i, 3 * i + 1])
            .collect();
        assert_eq!(Ranges::from_wire(&many, u32::MAX), None);
        let t = std::time::Instant::now();
        let most = &many[..2 * MAX_WIRE_RANGES];
        assert!(Ranges::from_wire(most, u32::MAX).is_some());
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
    }
}
