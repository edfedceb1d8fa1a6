//! The replication protocol between a primary controller and its standby, on one
//! bidirectional QUIC stream (ALPN [`ALPN_REPLICA`], mutual TLS, the standby's certificate
//! carries the `standby` role). Frames are a 4-byte big-endian length and a prost message;
//! no I/O here except reading and writing one frame.
//!
//! ```text
//! standby → primary   Follow { version, run, next_seq, hash, epoch }
//! primary → standby   Start { run, epoch, snapshot, seq, hash }
//!                     [ Item … SnapEnd { items, digest } ]     (only when `snapshot`)
//!                     Rec { seq, hash, at_ms, item } …  Beat { tip, at_ms } every second
//! standby → primary   Applied { seq } (every few hundred ms while records arrive)
//! ```
//!
//! Every record carries the chain hash `h(seq) = BLAKE3(h(seq − 1) ‖ seq ‖ item)`: the standby
//! recomputes it, so a record lost, repeated, reordered or altered stops the stream instead of
//! being applied, and a standby that reconnects proves where it stands with one hash.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// ALPN of a standby's (or another controller's) replication connection.
pub const ALPN_REPLICA: &[u8] = b"tiandi-replica/1";
/// Version of this protocol; a peer with another one is refused with both named.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts (a report history value or a file is far smaller).
pub const MAX_FRAME: usize = 8 << 20;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Follow {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The primary run the standby follows (0: none yet, send a snapshot).
    #[prost(uint64, tag = "2")]
    pub run: u64,
    /// The first record it lacks.
    #[prost(uint64, tag = "3")]
    pub next_seq: u64,
    /// The chain hash of the record before `next_seq`.
    #[prost(bytes = "vec", tag = "4")]
    pub hash: Vec<u8>,
    /// The highest fencing epoch it knows of (a promoted controller's is above its old
    /// primary's: that one stands down).
    #[prost(uint64, tag = "5")]
    pub epoch: u64,
    /// Only asking the epoch (a controller checking, before it serves, that nobody took
    /// over): answered with a `Start` carrying the epoch, then the stream ends.
    #[prost(bool, tag = "6")]
    pub epoch_only: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Start {
    #[prost(uint64, tag = "1")]
    pub run: u64,
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// A snapshot follows (the standby's copy is replaced by it).
    #[prost(bool, tag = "3")]
    pub snapshot: bool,
    /// The first record that follows (after the snapshot, if any).
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    /// The chain hash before `seq`.
    #[prost(bytes = "vec", tag = "5")]
    pub hash: Vec<u8>,
    /// Who the primary is (its QUIC address as configured), for the standby's status.
    #[prost(string, tag = "6")]
    pub primary: String,
}

/// One change of the controller's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Item {
    #[prost(oneof = "Change", tags = "1, 2, 3")]
    pub change: Option<Change>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Change {
    /// A key of a replicated sled tree set (or removed).
    #[prost(message, tag = "1")]
    Tree(TreeOp),
    /// A report stored (applied through the standby's store, as the primary stored it).
    #[prost(message, tag = "2")]
    Report(ReportRec),
    /// A file of the data directory written (or removed).
    #[prost(message, tag = "3")]
    File(FileRec),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TreeOp {
    #[prost(string, tag = "1")]
    pub tree: String,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
    #[prost(bool, tag = "4")]
    pub remove: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReportRec {
    #[prost(string, tag = "1")]
    pub site: String,
    /// The report as stored (prost bytes of `tiandi_proto::Report`).
    #[prost(bytes = "vec", tag = "2")]
    pub report: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FileRec {
    /// A name from [`super::FILES`] (anything else is refused).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    /// Unix mode bits (0600 for secrets).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    #[prost(bool, tag = "4")]
    pub remove: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Rec {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    /// When the primary logged it (its clock, Unix ms).
    #[prost(int64, tag = "3")]
    pub at_ms: i64,
    /// The encoded [`Item`] (hashed as sent).
    #[prost(bytes = "vec", tag = "4")]
    pub item: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapEnd {
    #[prost(uint64, tag = "1")]
    pub items: u64,
    /// BLAKE3 over every snapshot item's encoding, in order.
    #[prost(bytes = "vec", tag = "2")]
    pub digest: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Beat {
    /// The newest record the primary has.
    #[prost(uint64, tag = "1")]
    pub tip: u64,
    #[prost(int64, tag = "2")]
    pub at_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Applied {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Refused {
    #[prost(string, tag = "1")]
    pub reason: String,
    /// The refusing side's epoch (a superseded primary learns it is one).
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(oneof = "Msg", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub msg: Option<Msg>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Msg {
    #[prost(message, tag = "1")]
    Follow(Follow),
    #[prost(message, tag = "2")]
    Start(Start),
    /// A snapshot item (the encoded [`Item`]).
    #[prost(bytes = "vec", tag = "3")]
    Item(Vec<u8>),
    #[prost(message, tag = "4")]
    SnapEnd(SnapEnd),
    #[prost(message, tag = "5")]
    Rec(Rec),
    #[prost(message, tag = "6")]
    Beat(Beat),
    #[prost(message, tag = "7")]
    Applied(Applied),
    #[prost(message, tag = "8")]
    Refused(Refused),
}

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Follow(_) => "Follow",
            Msg::Start(_) => "Start",
            Msg::Item(_) => "Item",
            Msg::SnapEnd(_) => "SnapEnd",
            Msg::Rec(_) => "Rec",
            Msg::Beat(_) => "Beat",
            Msg::Applied(_) => "Applied",
            Msg::Refused(_) => "Refused",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes (at most {MAX_FRAME})")]
    TooLong(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("empty frame")]
    Empty,
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("the chain breaks at record {seq}: {why}")]
    Chain { seq: u64, why: String },
}

/// The chain hash of record `seq` after `prev`.
pub fn chain(prev: &[u8; 32], seq: u64, item: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&seq.to_le_bytes());
    h.update(item);
    *h.finalize().as_bytes()
}

/// The chain hash before the first record of a run: derived from the run, so two runs'
/// chains never meet.
pub fn genesis(run: u64) -> [u8; 32] {
    *blake3::hash(&run.to_le_bytes()).as_bytes()
}

pub fn encode(msg: Msg) -> Vec<u8> {
    use prost::Message;
    let body = Frame { msg: Some(msg) }.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
    use prost::Message;
    Frame::decode(body)
        .map_err(|e| WireError::Decode(e.to_string()))?
        .msg
        .ok_or(WireError::Empty)
}

pub async fn write(w: &mut (impl AsyncWriteExt + Unpin), msg: Msg) -> Result<(), WireError> {
    w.write_all(&encode(msg)).await?;
    Ok(())
}

/// The next frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Option<Msg>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_the_chain_depends_on_everything() {
        let item = {
            use prost::Message;
            Item {
                change: Some(Change::Tree(TreeOp {
                    tree: "sites".into(),
                    key: b"bj-001".to_vec(),
                    value: b"x".to_vec(),
                    remove: false,
                })),
            }
            .encode_to_vec()
        };
        let g = genesis(7);
        let h = chain(&g, 1, &item);
        assert_ne!(h, chain(&g, 2, &item), "the sequence number");
        assert_ne!(h, chain(&genesis(8), 1, &item), "the run");
        assert_ne!(h, chain(&g, 1, b"other"), "the item");
        let msg = Msg::Rec(Rec {
            seq: 1,
            hash: h.to_vec(),
            at_ms: 5,
            item,
        });
        let bytes = encode(msg.clone());
        assert_eq!(decode(&bytes[4..]).unwrap(), msg);
        assert!(matches!(decode(&[0xff, 0xff]), Err(WireError::Decode(_))));
        assert!(matches!(decode(&[]), Err(WireError::Empty)));
    }

    #[tokio::test]
    async fn a_frame_longer_than_the_limit_is_refused_before_it_is_read() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut r = bytes.as_slice();
        assert!(matches!(read(&mut r).await, Err(WireError::TooLong(_))));
        let mut empty: &[u8] = &[];
        assert!(read(&mut empty).await.unwrap().is_none());
    }
}
