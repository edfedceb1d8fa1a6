//! Chunk streams: each chunk arrives on a QUIC stream of its own and is routed to its
//! transfer's task; what arrived of a chunk cut off by a broken connection is kept in memory.

use std::time::Instant;

use tokio::sync::mpsc;

use super::{Inbox, PARTIAL_BUDGET, ROUTE_WAIT};
use crate::TransferError;
use crate::transfer_wire;

/// A chunk received in part: what arrived of it, kept in memory so that after a broken
/// connection only the rest is sent again (a cut otherwise costs every chunk that missed a
/// packet, whole).
pub(super) struct Partial {
    pub(super) data: Vec<u8>,
    pub(super) have: transfer_wire::Ranges,
    pub(super) touched: Instant,
}

pub(super) type ChunkTx = mpsc::Sender<(u32, bytes::Bytes)>;

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
    /// Reads one chunk stream and hands the chunk to its transfer's task. A chunk for no
    /// transfer in progress (a late duplicate) is dropped; the sender learns what is missing
    /// from acknowledgements and the next Have.
    ///
    /// The stream is read out of order, so that when the connection breaks, whatever of the
    /// chunk arrived is kept (see [`Partial`]); a piece stream adds to such a chunk.
    pub async fn accept_chunk(&self, mut recv: quinn::RecvStream) -> Result<(), TransferError> {
        let limit = (transfer_wire::PIECE_HEADER + crate::manifest::MAX_CHUNK as usize) as u64;
        let mut pieces: Vec<(u64, bytes::Bytes)> = Vec::new();
        let complete = loop {
            match recv.read_chunk(limit as usize, false).await {
                Ok(Some(c)) => {
                    if c.offset + c.bytes.len() as u64 > limit {
                        return Err(TransferError::Protocol(
                            "a chunk stream longer than any chunk".into(),
                        ));
                    }
                    pieces.push((c.offset, c.bytes));
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        pieces.sort_unstable_by_key(|(o, _)| *o);
        let contiguous = |from: u64, to: u64| -> Option<Vec<u8>> {
            let mut out = Vec::with_capacity((to - from) as usize);
            let mut at = from;
            for (o, b) in &pieces {
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
        };
        let Some(magic) = contiguous(0, 1) else {
            return Ok(()); // Nothing usable arrived.
        };
        let (hash, index, base, piece_offset) = if magic[0] == transfer_wire::PIECE_MAGIC {
            let Some(h) = contiguous(0, transfer_wire::PIECE_HEADER as u64) else {
                return Ok(());
            };
            let mut ch = [0u8; transfer_wire::CHUNK_HEADER];
            ch.copy_from_slice(&h[..transfer_wire::CHUNK_HEADER]);
            ch[0] = transfer_wire::CHUNK_MAGIC;
            let (hash, index) = transfer_wire::parse_chunk_header(&ch)?;
            let off = u32::from_be_bytes([h[37], h[38], h[39], h[40]]);
            (hash, index, transfer_wire::PIECE_HEADER as u64, Some(off))
        } else {
            let Some(h) = contiguous(0, transfer_wire::CHUNK_HEADER as u64) else {
                return Ok(());
            };
            let h: [u8; transfer_wire::CHUNK_HEADER] = h.try_into().expect("header length");
            let (hash, index) = transfer_wire::parse_chunk_header(&h)?;
            (hash, index, transfer_wire::CHUNK_HEADER as u64, None)
        };
        let id = hex::encode(hash);
        let data = if complete && piece_offset.is_none() {
            let end = pieces
                .iter()
                .map(|(o, b)| o + b.len() as u64)
                .max()
                .unwrap_or(base);
            match contiguous(base, end) {
                Some(d) => d,
                None => return Ok(()),
            }
        } else {
            // Part of a chunk: add it to what is held, and go on only once it is whole.
            match self.add_partial(&id, index, base, piece_offset.unwrap_or(0), &pieces) {
                Some(d) => d,
                None => return Ok(()),
            }
        };
        let deadline = Instant::now() + ROUTE_WAIT;
        loop {
            let added = self.route_added.notified();
            let tx = self
                .routes
                .lock()
                .expect("inbox lock poisoned")
                .get(&id)
                .cloned();
            if let Some(tx) = tx {
                // The task may have ended meanwhile: then the chunk is not needed here.
                let _ = tx.send((index, bytes::Bytes::from(data))).await;
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

    /// Adds what arrived of chunk `index` (stream `pieces`, data from stream offset `base`,
    /// at chunk offset `offset`) to what is held of it; the whole chunk once complete.
    fn add_partial(
        &self,
        id: &str,
        index: u32,
        base: u64,
        offset: u32,
        pieces: &[(u64, bytes::Bytes)],
    ) -> Option<Vec<u8>> {
        let (size, chunk_size) = *self.shapes.lock().expect("inbox lock poisoned").get(id)?;
        let start = u64::from(index) * u64::from(chunk_size);
        if start >= size {
            return None;
        }
        let len = (size - start).min(u64::from(chunk_size)) as u32;
        let mut partials = self.partials.lock().expect("inbox lock poisoned");
        let p = partials
            .entry((id.to_string(), index))
            .or_insert_with(|| Partial {
                data: vec![0; len as usize],
                have: transfer_wire::Ranges::default(),
                touched: Instant::now(),
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
            return partials.remove(&(id.to_string(), index)).map(|p| p.data);
        }
        // Within budget: the least recently touched go first.
        let mut total: usize = partials.values().map(|p| p.data.len()).sum();
        while total > PARTIAL_BUDGET {
            let Some(oldest) = partials
                .iter()
                .min_by_key(|(_, p)| p.touched)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(p) = partials.remove(&oldest) {
                total -= p.data.len();
            }
        }
        None
    }
}
