//! A group's repair, computed once for every subscriber: the group's object bytes cut into
//! blocks as they arrive, each block's repair symbols encoded once, for the worst loss any
//! subscriber may have ([`LOSS_CEIL`](super::LOSS_CEIL)); each subscriber sends the first
//! of them its own path needs ([`repairs_needed`]). A relay's cost of repair grows with its
//! tracks, not with its subscribers.
//!
//! A group stream is its 14-byte header (which names the subscriber's own track id) and then
//! the group's objects, the same bytes for everyone: blocks are placed after the header, so
//! their symbols serve every subscriber; each subscriber protects its header with a tiny
//! block of its own ([`header_repairs`]).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use super::{BLOCK_MAX_AGE, BLOCK_MAX_BYTES, LOSS_CEIL, Repair, SYMBOL, repairs_needed};
use crate::conference_wire::Object;

/// One block of a group's object bytes and its repair symbols.
#[derive(Debug)]
pub struct Block {
    /// Offset in the group's object bytes (the stream offset less the header).
    pub start: u64,
    pub len: u32,
    pub k: u16,
    /// Bytes of it a packet carries (its objects' mean size, at most a packet).
    pub per_packet: u16,
    /// The block ends the group.
    pub last: bool,
    /// Repair symbols, as many as the worst loss needs (`m` of the code).
    pub symbols: Vec<Bytes>,
}

impl Block {
    /// Repair symbols a path losing `loss` of its packets needs ([`repairs_needed`]), at most
    /// as many as were made.
    pub fn needed(&self, loss: f64, eps: f64) -> usize {
        repairs_needed(self.k.into(), SYMBOL, self.per_packet.into(), loss, eps)
            .min(self.symbols.len())
    }

    /// The first `m` repair datagrams of this block for stream `stream`, whose objects start
    /// at stream offset `base` (its header's length).
    pub fn repairs(&self, stream: u64, base: u64, m: usize) -> Vec<Repair> {
        self.symbols
            .iter()
            .take(m)
            .enumerate()
            .map(|(i, d)| Repair {
                stream,
                start: base + self.start,
                len: self.len,
                t: SYMBOL as u16,
                k: self.k,
                m: self.symbols.len() as u16,
                index: i as u16,
                last: self.last,
                data: d.clone(),
            })
            .collect()
    }
}

/// Reed–Solomon repair symbols of `data` cut into `t`-byte symbols (the last zero-padded).
pub fn encode(data: &[u8], t: usize, m: usize) -> Vec<Bytes> {
    if data.is_empty() || m == 0 {
        return Vec::new();
    }
    let k = data.len().div_ceil(t);
    let shards = data.chunks(t).map(|c| {
        let mut s = c.to_vec();
        s.resize(t, 0);
        s
    });
    match reed_solomon_simd::encode(k, m, shards) {
        Ok(rec) => rec.into_iter().map(Bytes::from).collect(),
        Err(e) => {
            debug!(error = %e, k, m, t, "No repair for a block.");
            Vec::new()
        }
    }
}

/// Two copies' worth of repair for a stream's header (one symbol of its length): a header
/// lost with its packet is rebuilt at once instead of a round trip and a half later.
pub fn header_repairs(stream: u64, header: &[u8]) -> Vec<Repair> {
    let t = header.len() + header.len() % 2;
    encode(header, t, 2)
        .into_iter()
        .enumerate()
        .map(|(i, d)| Repair {
            stream,
            start: 0,
            len: header.len() as u32,
            t: t as u16,
            k: 1,
            m: 2,
            index: i as u16,
            last: false,
            data: d,
        })
        .collect()
}

/// The odds of a block failing to rebuild a subscriber accepts, by track kind: a video
/// block that fails holds the picture for a retransmission; a lost audio frame is concealed.
pub fn odds(kind: &str) -> f64 {
    if kind == "audio" { 1e-2 } else { 1e-4 }
}

/// The cutting of one group's object bytes into blocks.
#[derive(Debug, Default)]
pub struct GroupBlocks {
    /// Objects taken into blocks so far.
    objects: usize,
    /// Bytes taken (the open block ends here).
    end: u64,
    open: Vec<u8>,
    /// When the open block took its first bytes.
    since: Option<Instant>,
    /// Objects that put bytes into the open block.
    open_objects: usize,
    blocks: Vec<Arc<Block>>,
}

impl GroupBlocks {
    /// Takes the group's objects not yet taken (`objects`: all of them so far; `ended`: the
    /// group is complete), closes the blocks that are due (full, old enough, or the group's
    /// last) and returns every block closed so far.
    pub fn advance(&mut self, objects: &[Object], ended: bool, eps: f64) -> Vec<Arc<Block>> {
        let now = Instant::now();
        for o in objects.iter().skip(self.objects) {
            self.since.get_or_insert(now);
            self.open_objects += 1;
            self.open.extend_from_slice(&o.header());
            self.open.extend_from_slice(&o.payload);
            while self.open.len() >= BLOCK_MAX_BYTES {
                let rest = self.open.split_off(BLOCK_MAX_BYTES);
                let full = std::mem::replace(&mut self.open, rest);
                self.close(full, false, eps);
                if !self.open.is_empty() {
                    self.since = Some(now);
                    self.open_objects = 1;
                }
            }
        }
        self.objects = objects.len();
        let old = self.since.is_some_and(|s| now >= s + BLOCK_MAX_AGE);
        if (old || ended) && !self.open.is_empty() {
            let data = std::mem::take(&mut self.open);
            self.close(data, ended, eps);
        }
        self.blocks.clone()
    }

    fn close(&mut self, data: Vec<u8>, last: bool, eps: f64) {
        let k = data.len().div_ceil(SYMBOL);
        let per_packet = data
            .len()
            .div_ceil(self.open_objects.max(1))
            .min(super::PACKET_BYTES);
        let m = repairs_needed(k, SYMBOL, per_packet, LOSS_CEIL, eps);
        let symbols = encode(&data, SYMBOL, m);
        let len = data.len() as u64;
        self.blocks.push(Arc::new(Block {
            start: self.end,
            len: len as u32,
            k: k as u16,
            per_packet: per_packet as u16,
            last,
            symbols,
        }));
        self.end += len;
        self.since = None;
        self.open_objects = 0;
    }

    /// When the open block is due to close.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|s| s + BLOCK_MAX_AGE)
    }

    /// Object bytes taken so far.
    pub fn taken(&self) -> u64 {
        self.end + self.open.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::Reassembly;

    fn obj(i: usize, n: usize) -> Object {
        Object {
            pts_us: i as i64 * 40_000,
            flags: u8::from(i == 0),
            payload: Bytes::from(
                (0..n)
                    .map(|j| ((i * 31 + j * 7) % 251) as u8)
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// The group's bytes as a subscriber's stream carries them after its header.
    fn stream(header: &[u8], objs: &[Object]) -> Vec<u8> {
        let mut v = header.to_vec();
        for o in objs {
            v.extend_from_slice(&o.header());
            v.extend_from_slice(&o.payload);
        }
        v
    }

    /// Blocks cut once serve two subscribers with different track ids and different losses:
    /// each rebuilds the packets it lost from the symbols it was sent.
    #[test]
    fn one_cut_serves_every_subscriber() {
        let objs: Vec<Object> = (0..30)
            .map(|i| obj(i, if i == 0 { 40_000 } else { 3_000 }))
            .collect();
        let mut cut = GroupBlocks::default();
        // Objects arrive in three batches; the group ends with the last.
        cut.advance(&objs[..10], false, 1e-4);
        cut.advance(&objs[..20], false, 1e-4);
        let blocks = cut.advance(&objs, true, 1e-4);
        assert!(blocks.last().unwrap().last, "the last block ends the group");
        let total: u64 = blocks.iter().map(|b| u64::from(b.len)).sum();
        assert_eq!(total, cut.taken());
        assert!(blocks.iter().all(|b| b.len as usize <= BLOCK_MAX_BYTES));
        for (id, loss, lose_every) in [(7u32, 0.01, 97usize), (9, 0.05, 23)] {
            let header = crate::conference_wire::GroupHeader {
                track: id,
                group: 3,
            }
            .encode();
            let data = stream(&header, &objs);
            let mut asm = Reassembly::default();
            // Packets of 1,200 bytes, one in every `lose_every` lost, the first one too
            // (the header: rebuilt from its own repairs).
            for (i, c) in data.chunks(1200).enumerate() {
                if i == 0 || i % lose_every == 5 {
                    continue;
                }
                asm.data((i * 1200) as u64, Bytes::copy_from_slice(c));
            }
            for r in header_repairs(5, &header) {
                asm.repair(r);
            }
            for b in &blocks {
                let m = b.needed(loss, odds("video"));
                assert!(m > 0 && m <= b.symbols.len());
                for r in b.repairs(5, header.len() as u64, m) {
                    asm.repair(r);
                }
            }
            let out: Vec<u8> = asm.ready().iter().flat_map(|b| b.iter().copied()).collect();
            assert_eq!(out.len(), data.len(), "subscriber {id}");
            assert!(out == data, "subscriber {id}: rebuilt bytes differ");
            assert!(asm.complete(), "the last block says where the stream ends");
        }
    }

    #[test]
    fn a_block_closes_when_old_enough_even_without_more_objects() {
        let objs = vec![obj(1, 500)];
        let mut cut = GroupBlocks::default();
        assert!(cut.advance(&objs, false, 1e-2).is_empty());
        assert!(cut.deadline().is_some());
        std::thread::sleep(BLOCK_MAX_AGE);
        let b = cut.advance(&objs, false, 1e-2);
        assert_eq!(b.len(), 1);
        assert!(!b[0].last);
        assert!(cut.deadline().is_none());
    }
}
