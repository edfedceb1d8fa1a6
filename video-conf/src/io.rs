//! Control frames and group streams over quinn streams.

use bytes::Bytes;

use crate::fec::{GroupRecv, ReadError};

use crate::conference_wire::{
    Control, GROUP_HEADER_LEN, GroupHeader, OBJECT_HEADER_LEN, Object, TrackInfo, WireError,
};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("the peer ended the stream")]
    Ended,
    /// Refused by policy ([`crate::conference_wire::codes`]: `FORBIDDEN`, `REVOKED`).
    #[error("{reason}")]
    Refused { code: u32, reason: String },
}

impl IoError {
    /// The code to close or stop with.
    pub fn code(&self) -> u32 {
        match self {
            IoError::Wire(w) => w.code(),
            IoError::Refused { code, .. } => *code,
            _ => crate::conference_wire::codes::PROTOCOL,
        }
    }
}

fn stream_err(e: impl ToString) -> IoError {
    IoError::Stream(e.to_string())
}

pub struct ControlWriter(pub quinn::SendStream);

impl ControlWriter {
    pub async fn send(&mut self, c: &Control) -> Result<(), IoError> {
        self.0.write_all(&c.encode()).await.map_err(stream_err)
    }

    /// A refusal the peer can read: an `Error` frame, the stream finished, and up to a second
    /// for the peer to take it before the caller closes the connection (a close discards what
    /// is still in flight; it carries the reason too). Best effort: a peer gone already is fine.
    pub async fn refuse(&mut self, code: u32, message: &str) {
        let _ = self
            .send(&Control::Error(crate::conference_wire::ErrorMsg {
                code,
                message: message.to_string(),
            }))
            .await;
        let _ = self.0.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.0.stopped()).await;
    }
}

pub struct ControlReader(pub quinn::RecvStream);

impl ControlReader {
    /// The next frame; `Ok(None)` when the peer finished the stream cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Control>, IoError> {
        let mut h = [0u8; 4];
        match self.0.read_exact(&mut h).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(stream_err(e)),
        }
        let len = Control::frame_len(h)?;
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).await.map_err(stream_err)?;
        Ok(Some(Control::decode(&body)?))
    }
}

/// Reads a group stream's header.
pub async fn read_group_header(r: &mut GroupRecv) -> Result<GroupHeader, IoError> {
    let mut h = [0u8; GROUP_HEADER_LEN];
    r.read_exact(&mut h).await.map_err(|e| match e {
        ReadError::Finished(_) => IoError::Wire(WireError::Malformed {
            what: "group stream",
            detail: "ended inside its header".into(),
        }),
        ReadError::Other(e) => IoError::Stream(e),
    })?;
    Ok(GroupHeader::decode(&h)?)
}

/// Reads the next object of a group stream; `Ok(None)` at its clean end.
pub async fn read_object(r: &mut GroupRecv) -> Result<Option<Object>, IoError> {
    let mut h = [0u8; OBJECT_HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(()) => {}
        Err(ReadError::Finished(0)) => return Ok(None),
        Err(ReadError::Finished(_)) => {
            return Err(IoError::Wire(WireError::Malformed {
                what: "object",
                detail: "stream ended inside an object header".into(),
            }));
        }
        Err(ReadError::Other(e)) => return Err(IoError::Stream(e)),
    }
    let (len, pts_us, flags) = Object::parse_header(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| match e {
        ReadError::Finished(_) => IoError::Wire(WireError::Malformed {
            what: "object",
            detail: format!("stream ended inside a {len}-byte payload"),
        }),
        ReadError::Other(e) => IoError::Stream(e),
    })?;
    Ok(Some(Object {
        pts_us,
        flags,
        payload: Bytes::from(payload),
    }))
}

/// Writes objects to a group stream, after `prefix` if given (the group header, so that a
/// new group's header and keyframe leave in the same packets): all in one write (one lock of
/// the connection, one wake-up of its driver: a relay does this for every subscriber), the
/// payloads shared, not copied.
pub async fn write_objects(
    w: &mut quinn::SendStream,
    prefix: Option<Bytes>,
    objects: &[Object],
) -> Result<(), IoError> {
    let mut chunks = Vec::with_capacity(1 + 2 * objects.len());
    chunks.extend(prefix);
    for o in objects {
        chunks.push(Bytes::copy_from_slice(&o.header()));
        chunks.push(o.payload.clone());
    }
    w.write_all_chunks(&mut chunks).await.map_err(stream_err)
}

/// A track as a connection knows it: the sender's id for it, and its description.
pub fn find_track(tracks: &[TrackInfo], id: u32) -> Option<&TrackInfo> {
    tracks.iter().find(|t| t.id == id)
}
