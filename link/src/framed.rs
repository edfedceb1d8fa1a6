//! Length-prefixed protocol frames over a QUIC stream. A frame above the protocol's limit is
//! refused before its body is buffered.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tiandi_proto::{Body, MAX_FRAME};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::LinkError;

/// The codec of every report stream: a 4-byte big-endian length, then a body of at most
/// [`MAX_FRAME`] bytes (a longer length is refused before any of its body is buffered). Public
/// so that the fuzz targets (`fuzz/`) split bytes exactly as a live stream does.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// The buffers a framed stream starts with. tokio-util's default is 8 KiB each way: 16 KiB
/// per report stream, a third of what a connected site cost the controller at 20,000 sites
/// (heaptrack, issue 22). A report is 0.1–3 KB; a bigger frame grows its buffer as it needs.
const INITIAL_BUFFER: usize = 1024;

pub struct FrameWriter {
    inner: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
}

pub struct FrameReader {
    inner: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        Self {
            inner: FramedWrite::with_capacity(stream, codec(), INITIAL_BUFFER),
        }
    }
    pub async fn send(&mut self, body: Body) -> Result<(), LinkError> {
        self.send_raw(tiandi_proto::encode(body)).await
    }
    /// Sends an already-encoded frame body.
    pub async fn send_raw(&mut self, frame: Bytes) -> Result<(), LinkError> {
        self.inner
            .send(frame)
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))
    }
    /// Queues a frame without flushing (call [`flush`](Self::flush) after a batch).
    pub async fn feed(&mut self, body: Body) -> Result<(), LinkError> {
        self.inner
            .feed(tiandi_proto::encode(body))
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))
    }
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        SinkExt::<Bytes>::flush(&mut self.inner)
            .await
            .map_err(|e: std::io::Error| LinkError::Stream(e.to_string()))
    }
    pub fn stream_mut(&mut self) -> &mut quinn::SendStream {
        self.inner.get_mut()
    }
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            inner: FramedRead::with_capacity(stream, codec(), INITIAL_BUFFER),
        }
    }
    /// The next message, or `None` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Body>, LinkError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Ok(frame)) => Ok(Some(tiandi_proto::decode(&frame)?)),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(LinkError::Proto(tiandi_proto::ProtoError::Oversized(0)))
            }
            Some(Err(e)) => Err(LinkError::Stream(e.to_string())),
        }
    }
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        self.inner.get_mut()
    }
}
