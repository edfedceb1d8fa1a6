//! Chunk streams: each chunk arrives on a QUIC stream of its own and is routed to its
//! transfer's task; what arrived of a chunk cut off by a broken connection is kept in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::debug;

use super::{
    BUDGET_WAIT, CHUNK_MIN_RATE, CHUNK_MIN_TIME, Inbox, PARTIAL_BUDGET, PEER_PARTIAL_BUDGET,
    ROUTE_WAIT,
};
use crate::TransferError;
use crate::transfer_wire::{self, codes};

/// A chunk received in part: what arrived of it, kept in memory so that after a broken
/// connection only the rest is sent again (a cut otherwise costs every chunk that missed a
/// packet, whole).
pub(super) struct Partial {
    pub(super) data: Vec<u8>,
    pub(super) have: transfer_wire::Ranges,
    pub(super) touched: Instant,
    /// The peer it came from ("" for the node above): each has a budget of its own.
    pub(super) owner: String,
}

/// A chunk's memory, reserved from its connection's budget and the inbox's before the chunk
/// is read, and given back when the chunk is written (or dropped).
pub(super) struct Held {
    _conn: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

/// A chunk on its way to its transfer's task: (index, bytes, its memory).
pub(super) type RoutedChunk = (u32, bytes::Bytes, Held);
pub(super) type ChunkTx = mpsc::Sender<RoutedChunk>;

/// A transfer's chunk route, removed when its task ends.
pub(super) struct Route<'a> {
    inbox: &'a Inbox,
    id: String,
    tx: ChunkTx,
}

impl<'a> Route<'a> {
    pub(super) fn add(inbox: &'a Inbox, id: &str, tx: ChunkTx) -> Route<'a> {
        inbox
            .routes
            .lock()
            .expect("inbox lock poisoned")
            .insert(id.to_string(), tx.clone());
        inbox.route_added.notify_waiters();
        Route {
            inbox,
            id: id.to_string(),
            tx,
        }
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let mut routes = self.inbox.routes.lock().expect("inbox lock poisoned");
        if routes
            .get(&self.id)
            .is_some_and(|t| t.same_channel(&self.tx))
        {
            routes.remove(&self.id);
        }
    }
}

impl Inbox {
    /// Reads one chunk stream from a connection with no peer identity (the node above) and its
    /// own budget; see [`Inbox::accept_chunk_from`].
    pub async fn accept_chunk(&self, recv: quinn::RecvStream) -> Result<(), TransferError> {
        let budget = Arc::new(Semaphore::new(super::CONN_CHUNK_BUDGET));
        self.accept_chunk_from(recv, None, &budget).await
    }

    /// Reads one chunk stream from `peer` and hands the chunk to that peer's transfer of it.
    ///
    /// The header (file hash, chunk index) is read first; the stream waits (unread) up to
    /// [`ROUTE_WAIT`] for the offer of that transfer *from this peer*, and is stopped with
    /// [`codes::UNKNOWN_TRANSFER`] if none comes (a chunk for another site's transfer is never
    /// read). Then the chunk's length is reserved from the connection's `budget` and the
    /// inbox's (see [`CONN_CHUNK_BUDGET`](super::CONN_CHUNK_BUDGET)); the stream is read only
    /// once it has its room, never past its chunk's end.
    ///
    /// The body is read out of order, so that when the connection breaks, whatever of the
    /// chunk arrived is kept (see [`Partial`]); a piece stream adds to such a chunk.
    pub async fn accept_chunk_from(
        &self,
        mut recv: quinn::RecvStream,
        peer: Option<&str>,
        budget: &Arc<Semaphore>,
    ) -> Result<(), TransferError> {
        // The header, in order (a few dozen bytes; nothing else is read before it is known).
        let mut magic = [0u8; 1];
        if !read_header(&mut recv, &mut magic).await {
            return Ok(());
        }
        let header_len = match magic[0] {
            transfer_wire::PIECE_MAGIC => transfer_wire::PIECE_HEADER,
            transfer_wire::CHUNK_MAGIC => transfer_wire::CHUNK_HEADER,
            other => {
                stop(&mut recv, codes::PROTOCOL);
                return Err(TransferError::Protocol(format!(
                    "a chunk stream starts with {other:#04x}"
                )));
            }
        };
        let mut h = [0u8; transfer_wire::PIECE_HEADER];
        h[0] = magic[0];
        if !read_header(&mut recv, &mut h[1..header_len]).await {
            return Ok(());
        }
        let mut ch = [0u8; transfer_wire::CHUNK_HEADER];
        ch.copy_from_slice(&h[..transfer_wire::CHUNK_HEADER]);
        ch[0] = transfer_wire::CHUNK_MAGIC;
        let (hash, index) = transfer_wire::parse_chunk_header(&ch)?;
        let piece_offset = (header_len == transfer_wire::PIECE_HEADER)
            .then(|| u32::from_be_bytes([h[37], h[38], h[39], h[40]]));
        let base = header_len as u64;
        let key = super::key(peer, &hex::encode(hash));

        // Its transfer's shape, from this peer's offer (chunks may overtake it).
        let Some((size, chunk_size)) = self.wait_shape(&key).await else {
            stop(&mut recv, codes::UNKNOWN_TRANSFER);
            return Ok(());
        };
        let start = u64::from(index) * u64::from(chunk_size);
        if start >= size {
            stop(&mut recv, codes::PROTOCOL);
            return Err(TransferError::Protocol(format!(
                "chunk {index} past the end of a {size}-byte file"
            )));
        }
        let len = (size - start).min(u64::from(chunk_size)) as u32;
        let from = piece_offset.unwrap_or(0);
        if from >= len {
            stop(&mut recv, codes::PROTOCOL);
            return Err(TransferError::Protocol(format!(
                "a piece from byte {from} of a {len}-byte chunk"
            )));
        }
        let need = len - from;
        let limit = base + u64::from(need);

        // Room for it, or wait unread (QUIC's flow control holds the sender back), or refuse.
        let held = match self.reserve(budget, need).await {
            Some(h) => h,
            None => {
                debug!(
                    chunk = index,
                    bytes = need,
                    "No memory for a chunk: stream refused."
                );
                stop(&mut recv, codes::BUSY);
                return Ok(());
            }
        };

        // Out of order from here (quinn allows an unordered read after ordered ones), never
        // beyond this chunk's end, within a time its length allows.
        let deadline = Instant::now()
            + CHUNK_MIN_TIME.max(Duration::from_secs(u64::from(need) / CHUNK_MIN_RATE));
        let mut pieces: Vec<(u64, bytes::Bytes)> = Vec::new();
        let complete = loop {
            match tokio::time::timeout_at(
                deadline.into(),
                recv.read_chunk((limit - base) as usize, false),
            )
            .await
            {
                Ok(Ok(Some(c))) => {
                    if c.offset + c.bytes.len() as u64 > limit {
                        stop(&mut recv, codes::PROTOCOL);
                        return Err(TransferError::Protocol(format!(
                            "a chunk stream longer than its chunk ({need} bytes)"
                        )));
                    }
                    self.chunk_bytes_in
                        .fetch_add(c.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    pieces.push((c.offset, c.bytes));
                }
                Ok(Ok(None)) => break true,
                Ok(Err(_)) => break false,
                Err(_) => {
                    // Too slow: keep what arrived, as a cut would.
                    stop(&mut recv, codes::BUSY);
                    break false;
                }
            }
        };
        pieces.sort_unstable_by_key(|(o, _)| *o);
        let data = if complete && piece_offset.is_none() {
            let end = pieces
                .iter()
                .map(|(o, b)| o + b.len() as u64)
                .max()
                .unwrap_or(base);
            match contiguous(&pieces, base, end) {
                Some(d) => d,
                None => return Ok(()),
            }
        } else {
            // Part of a chunk: add it to what is held, and go on only once it is whole.
            match self.add_partial(&key, peer, index, base, from, &pieces) {
                Some(d) => d,
                None => return Ok(()),
            }
        };
        drop(pieces);
        let deadline = Instant::now() + ROUTE_WAIT;
        loop {
            let added = self.route_added.notified();
            let tx = self
                .routes
                .lock()
                .expect("inbox lock poisoned")
                .get(&key)
                .cloned();
            if let Some(tx) = tx {
                // The task may have ended meanwhile: then the chunk is not needed here.
                let _ = tx.send((index, bytes::Bytes::from(data), held)).await;
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), added)
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }

    /// The (size, chunk size) of transfer `key` once its offer is taken (None after
    /// [`ROUTE_WAIT`]).
    async fn wait_shape(&self, key: &str) -> Option<(u64, u32)> {
        let deadline = Instant::now() + ROUTE_WAIT;
        loop {
            let added = self.route_added.notified();
            if let Some(s) = self.shapes.lock().expect("inbox lock poisoned").get(key) {
                return Some(*s);
            }
            if tokio::time::timeout_at(deadline.into(), added)
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// `bytes` of the connection's budget, then of the inbox's (always in this order), each
    /// waited for up to [`BUDGET_WAIT`].
    async fn reserve(&self, conn: &Arc<Semaphore>, bytes: u32) -> Option<Held> {
        let deadline = Instant::now() + BUDGET_WAIT;
        let c = tokio::time::timeout_at(deadline.into(), conn.clone().acquire_many_owned(bytes))
            .await
            .ok()?
            .ok()?;
        let all = tokio::time::timeout_at(
            deadline.into(),
            self.chunk_memory.clone().acquire_many_owned(bytes),
        )
        .await
        .ok()?
        .ok()?;
        Some(Held {
            _conn: c,
            _all: all,
        })
    }

    /// Adds what arrived of chunk `index` (stream `pieces`, data from stream offset `base`,
    /// at chunk offset `offset`) to what is held of it; the whole chunk once complete.
    fn add_partial(
        &self,
        key: &str,
        peer: Option<&str>,
        index: u32,
        base: u64,
        offset: u32,
        pieces: &[(u64, bytes::Bytes)],
    ) -> Option<Vec<u8>> {
        let (size, chunk_size) = *self.shapes.lock().expect("inbox lock poisoned").get(key)?;
        let start = u64::from(index) * u64::from(chunk_size);
        if start >= size {
            return None;
        }
        let len = (size - start).min(u64::from(chunk_size)) as u32;
        let owner = peer.unwrap_or_default();
        let mut partials = self.partials.lock().expect("inbox lock poisoned");
        let p = partials
            .entry((key.to_string(), index))
            .or_insert_with(|| Partial {
                data: vec![0; len as usize],
                have: transfer_wire::Ranges::default(),
                touched: Instant::now(),
                owner: owner.to_string(),
            });
        p.touched = Instant::now();
        for (o, b) in pieces {
            let end = o + b.len() as u64;
            if end <= base {
                continue;
            }
            let skip = base.saturating_sub(*o);
            let at = u64::from(offset) + (o + skip - base);
            let bytes = &b[skip as usize..];
            if at + bytes.len() as u64 > u64::from(len) {
                continue; // Not part of this chunk: ignored (the hash check has the last word).
            }
            p.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            p.have.add(at as u32, (at + bytes.len() as u64) as u32);
        }
        if p.have.covers(len) {
            return partials.remove(&(key.to_string(), index)).map(|p| p.data);
        }
        // Within budget, this peer's first, then everyone's: the least recently touched go
        // first.
        for (budget, only) in [(PEER_PARTIAL_BUDGET, Some(owner)), (PARTIAL_BUDGET, None)] {
            let counts = |p: &Partial| only.is_none_or(|o| p.owner == o);
            let mut total: usize = partials
                .values()
                .filter(|p| counts(p))
                .map(|p| p.data.len())
                .sum();
            while total > budget {
                let Some(oldest) = partials
                    .iter()
                    .filter(|(_, p)| counts(p))
                    .min_by_key(|(_, p)| p.touched)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some(p) = partials.remove(&oldest) {
                    total -= p.data.len();
                }
            }
        }
        None
    }
}

/// Reads exactly `buf` of a stream's header, in order; false if the stream ends or breaks
/// first, or it takes longer than [`CHUNK_MIN_TIME`].
async fn read_header(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> bool {
    matches!(
        tokio::time::timeout(CHUNK_MIN_TIME, recv.read_exact(buf)).await,
        Ok(Ok(()))
    )
}

fn stop(recv: &mut quinn::RecvStream, code: u32) {
    let _ = recv.stop(quinn::VarInt::from_u32(code));
}

/// The bytes [from, to) of a stream from its `pieces` (sorted by offset), if all arrived.
fn contiguous(pieces: &[(u64, bytes::Bytes)], from: u64, to: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity((to - from) as usize);
    let mut at = from;
    for (o, b) in pieces {
        let end = o + b.len() as u64;
        if end <= at {
            continue;
        }
        if *o > at {
            return None;
        }
        let take_to = end.min(to);
        out.extend_from_slice(&b[(at - o) as usize..(take_to - o) as usize]);
        at = take_to;
        if at >= to {
            break;
        }
    }
    (at >= to).then_some(out)
}
