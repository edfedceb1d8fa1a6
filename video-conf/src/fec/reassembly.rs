//! The receiving side of one stream: segments in any order, repair symbols, holes rebuilt
//! from them, bytes handed on in order.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use rangemap::RangeSet;
use tracing::debug;

use super::Repair;

/// Blocks with repairs pending, per stream. A group is a few blocks; a peer sending repairs
/// for many more (blocks that never complete) loses the oldest, so a hostile or broken sender
/// cannot grow a receiver's memory (issue 15, finding 8).
pub const MAX_BLOCKS: usize = 64;

/// Repairs known for one block.
struct Block {
    len: u64,
    t: usize,
    k: usize,
    m: usize,
    symbols: BTreeMap<usize, Bytes>,
}

/// The receiving side of one stream: segments as they arrive (any order, overlaps allowed),
/// repair symbols, and the bytes ready in order.
#[derive(Default)]
pub struct Reassembly {
    have: RangeSet<u64>,
    /// Segments by offset (no overlaps).
    chunks: BTreeMap<u64, Bytes>,
    /// Offset up to which bytes were handed on.
    delivered: u64,
    blocks: HashMap<u64, Block>,
    /// Bytes rebuilt from repair symbols.
    pub repaired_bytes: u64,
    /// The stream's final size, once a repair datagram told it.
    final_size: Option<u64>,
}

impl Reassembly {
    /// A segment of the stream at `offset`.
    pub fn data(&mut self, offset: u64, b: Bytes) {
        let end = offset + b.len() as u64;
        if b.is_empty() {
            return;
        }
        let gaps: Vec<_> = self.have.gaps(&(offset..end)).collect();
        for g in gaps {
            let s = b.slice((g.start - offset) as usize..(g.end - offset) as usize);
            self.chunks.insert(g.start, s);
        }
        self.have.insert(offset..end);
    }

    /// A repair symbol; rebuilds its block's missing bytes if it now can.
    pub fn repair(&mut self, r: Repair) {
        if let Some(size) = r.final_size() {
            self.final_size = Some(size);
        }
        if r.k == 0 {
            return;
        }
        let end = r.start + u64::from(r.len);
        if self.have.gaps(&(r.start..end)).next().is_none() {
            self.blocks.remove(&r.start);
            return;
        }
        if !self.blocks.contains_key(&r.start)
            && self.blocks.len() >= MAX_BLOCKS
            && let Some(oldest) = self.blocks.keys().copied().min()
        {
            debug!(
                oldest,
                "Too many blocks awaiting repair: the oldest one's symbols dropped."
            );
            self.blocks.remove(&oldest);
        }
        let b = self.blocks.entry(r.start).or_insert_with(|| Block {
            len: u64::from(r.len),
            t: usize::from(r.t),
            k: usize::from(r.k),
            m: usize::from(r.m),
            symbols: BTreeMap::new(),
        });
        if b.len != u64::from(r.len) || b.t != usize::from(r.t) || b.k != usize::from(r.k) {
            return;
        }
        // A block never needs more repair symbols than it has originals.
        if b.symbols.len() >= b.k && !b.symbols.contains_key(&usize::from(r.index)) {
            return;
        }
        b.symbols.insert(usize::from(r.index), r.data);
        self.try_block(r.start);
    }

    /// After new data: blocks that may now be rebuilt.
    pub fn retry(&mut self) {
        let starts: Vec<u64> = self.blocks.keys().copied().collect();
        for s in starts {
            self.try_block(s);
        }
    }

    fn symbol_range(start: u64, b: &Block, i: usize) -> std::ops::Range<u64> {
        let s = start + (i * b.t) as u64;
        s..(s + b.t as u64).min(start + b.len)
    }

    fn read(&self, r: std::ops::Range<u64>, t: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(t);
        let first = self
            .chunks
            .range(..=r.start)
            .next_back()
            .map_or(r.start, |(k, _)| *k);
        for (&off, c) in self.chunks.range(first..r.end) {
            let cend = off + c.len() as u64;
            if cend <= r.start {
                continue;
            }
            let from = r.start.max(off);
            let to = r.end.min(cend);
            out.extend_from_slice(&c[(from - off) as usize..(to - off) as usize]);
        }
        out.resize(t, 0);
        out
    }

    fn try_block(&mut self, start: u64) {
        let Some(b) = self.blocks.get(&start) else {
            return;
        };
        let missing: Vec<usize> = (0..b.k)
            .filter(|&i| {
                self.have
                    .gaps(&Self::symbol_range(start, b, i))
                    .next()
                    .is_some()
            })
            .collect();
        if missing.is_empty() {
            self.blocks.remove(&start);
            return;
        }
        if missing.len() > b.symbols.len() {
            return;
        }
        let originals: Vec<(usize, Vec<u8>)> = (0..b.k)
            .filter(|i| !missing.contains(i))
            .map(|i| (i, self.read(Self::symbol_range(start, b, i), b.t)))
            .collect();
        let restored = reed_solomon_simd::decode(
            b.k,
            b.m,
            originals.iter().map(|(i, s)| (*i, s.as_slice())),
            b.symbols.iter().map(|(i, s)| (*i, s.as_ref())),
        );
        let b = self.blocks.remove(&start).expect("block present");
        match restored {
            Ok(map) => {
                for i in missing {
                    let Some(sym) = map.get(&i) else { continue };
                    let r = Self::symbol_range(start, &b, i);
                    let n = (r.end - r.start) as usize;
                    self.repaired_bytes += self.have.gaps(&r).map(|g| g.end - g.start).sum::<u64>();
                    self.data(r.start, Bytes::copy_from_slice(&sym[..n]));
                }
            }
            Err(e) => debug!(error = %e, "Repair failed; waiting for retransmission."),
        }
    }

    /// Bytes from the delivered offset up to the first hole.
    pub fn ready(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(c) = self.chunks.get(&self.delivered) {
            let c = c.clone();
            self.delivered += c.len() as u64;
            out.push(c);
        }
        // Keep what a block still being repaired may need; drop what is far behind.
        let keep_from = self
            .blocks
            .keys()
            .copied()
            .min()
            .unwrap_or(self.delivered)
            .min(self.delivered)
            .saturating_sub(4 << 20);
        while let Some((&off, c)) = self.chunks.first_key_value() {
            if off + c.len() as u64 > keep_from {
                break;
            }
            self.chunks.pop_first();
        }
        out
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Every byte of the stream has been handed on (its end known from a repair datagram).
    pub fn complete(&self) -> bool {
        self.final_size == Some(self.delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::{Params, protect, stream_bytes};

    /// Repairs for blocks that never complete (a hostile sender's) hold at most MAX_BLOCKS
    /// blocks.
    #[test]
    fn repairs_for_many_blocks_are_bounded() {
        let mut asm = Reassembly::default();
        // Seven repair symbols for eight originals, none of which arrives: never enough.
        for start in 0..10_000u64 {
            for index in 0..7u16 {
                asm.repair(Repair {
                    stream: 0,
                    start: start * 16_384,
                    len: 8 * 1024,
                    t: 1024,
                    k: 8,
                    m: 8,
                    index,
                    last: false,
                    data: Bytes::from(vec![0u8; 1024]),
                });
            }
        }
        assert_eq!(asm.blocks.len(), MAX_BLOCKS);
        assert!(asm.blocks.values().all(|b| b.symbols.len() <= b.k));
        assert!(
            asm.blocks.contains_key(&(9_999 * 16_384)),
            "the newest kept"
        );
    }

    /// Holes of lost packets are rebuilt from repair symbols before any retransmission, in
    /// any order of arrival; bytes come out in order, once.
    #[test]
    fn holes_are_rebuilt_from_repairs() {
        let p = Params { t: 1152, pct: 25 };
        let data = stream_bytes(40_000);
        let mut repairs = Vec::new();
        let blocks: Vec<_> = data.chunks(16_384).collect();
        for (i, c) in blocks.iter().enumerate() {
            repairs.extend(protect(8, (i * 16_384) as u64, c, p, i + 1 == blocks.len()));
        }
        assert!(repairs.len() >= 9, "{} repairs", repairs.len());
        // Packets of 1,200 bytes; lose one in every twelve (two per 16 KiB block at most).
        let mut asm = Reassembly::default();
        let mut lost = 0;
        for (i, c) in data.chunks(1200).enumerate().rev() {
            if i % 12 == 5 {
                lost += c.len();
                continue;
            }
            asm.data((i * 1200) as u64, Bytes::copy_from_slice(c));
            // A duplicate delivery changes nothing.
            asm.data((i * 1200) as u64, Bytes::copy_from_slice(c));
        }
        let before: usize = asm.ready().iter().map(Bytes::len).sum();
        assert_eq!(before, 6000, "only the bytes before the first hole");
        for r in repairs {
            asm.repair(r);
        }
        let mut out: Vec<u8> = Vec::new();
        out.extend(data[..before].iter());
        for b in asm.ready() {
            out.extend_from_slice(&b);
        }
        assert_eq!(out.len(), data.len());
        assert!(out == data, "rebuilt bytes differ");
        // The last block's repairs carry the final size: whole without the FIN.
        assert!(asm.complete());
        let end = Repair::end(8, 40_000);
        assert_eq!(
            Repair::decode(&end.encode()).unwrap().final_size(),
            Some(40_000)
        );
        assert_eq!(asm.repaired_bytes as usize, lost);
    }

    #[test]
    fn too_few_repairs_wait_for_retransmission() {
        let p = Params { t: 1152, pct: 25 };
        let data = stream_bytes(10_000);
        let repairs = protect(0, 0, &data, p, false);
        let mut asm = Reassembly::default();
        // Four packets of the block lost: more than its three repair symbols can rebuild.
        for (i, c) in data.chunks(1000).enumerate() {
            if (2..6).contains(&i) {
                continue;
            }
            asm.data((i * 1000) as u64, Bytes::copy_from_slice(c));
        }
        for r in repairs {
            asm.repair(r);
        }
        assert_eq!(asm.ready().iter().map(Bytes::len).sum::<usize>(), 2000);
        // The retransmissions arrive: everything flows.
        for i in 2..6 {
            asm.data(
                (i * 1000) as u64,
                Bytes::copy_from_slice(&data[i * 1000..(i + 1) * 1000]),
            );
        }
        assert_eq!(asm.ready().iter().map(Bytes::len).sum::<usize>(), 8000);
        assert_eq!(asm.delivered(), 10_000);
    }
}

/// Properties of a stream's reassembly: whatever the order, duplication and loss of its
/// segments, the bytes handed on are the stream's, in order, once; and a block that lost no
/// more symbols than it has repair symbols is rebuilt without any retransmission.
#[cfg(test)]
mod properties {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::fec::{BLOCK_MAX_BYTES, Params, protect, stream_bytes};

    /// A permutation of `v` drawn from `seed` (Fisher–Yates on a small LCG).
    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            v.swap(i, (seed >> 33) as usize % (i + 1));
        }
    }

    fn drain(asm: &mut Reassembly, out: &mut Vec<u8>) {
        for b in asm.ready() {
            out.extend_from_slice(&b);
        }
    }

    enum Event {
        Data(u64, Bytes),
        Repair(Repair),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn segments_in_any_order_come_out_in_order_once(
            len in 1usize..20_000,
            cuts in vec(any::<u16>(), 0..30),
            dups in vec((any::<u16>(), 1u16..3000), 0..10),
            seed in any::<u64>(),
        ) {
            let data = stream_bytes(len);
            let mut at: Vec<usize> = cuts.iter().map(|c| usize::from(*c) % len).collect();
            at.extend([0, len]);
            at.sort_unstable();
            at.dedup();
            let mut segs: Vec<(usize, usize)> = at.windows(2).map(|w| (w[0], w[1])).collect();
            // Duplicates and overlaps (retransmissions of what had arrived after all).
            for (start, n) in dups {
                let s = usize::from(start) % len;
                segs.push((s, (s + usize::from(n)).min(len)));
            }
            shuffle(&mut segs, seed);
            let mut asm = Reassembly::default();
            let mut out = Vec::new();
            for (s, e) in segs {
                asm.data(s as u64, Bytes::copy_from_slice(&data[s..e]));
                drain(&mut asm, &mut out);
            }
            prop_assert_eq!(out.len(), len);
            prop_assert!(out == data);
            prop_assert_eq!(asm.delivered(), len as u64);
            prop_assert_eq!(asm.repaired_bytes, 0);
        }

        #[test]
        fn lost_symbols_are_rebuilt_when_the_repairs_suffice(
            len in 1usize..60_000,
            t64 in 1usize..=22,
            losses in vec(any::<u16>(), 0..48),
            seed in any::<u64>(),
        ) {
            let p = Params { t: t64 * 64, pct: 25 };
            let data = stream_bytes(len);
            let mut events = Vec::new();
            let mut lost_ranges = Vec::new();
            let mut all_repairable = true;
            let mut picks = losses.iter().copied();
            let starts: Vec<usize> = (0..len).step_by(BLOCK_MAX_BYTES).collect();
            for &s in &starts {
                let e = (s + BLOCK_MAX_BYTES).min(len);
                let block = &data[s..e];
                let last = e == len;
                let k = block.len().div_ceil(p.t);
                let m = p.repairs(k);
                // Up to six symbols lost per block (three repair symbols at least), drawn from `losses`.
                let mut lost: Vec<usize> = picks
                    .by_ref()
                    .take(6)
                    .map(|x| usize::from(x) % (k + 2))
                    .filter(|&i| i < k)
                    .collect();
                lost.sort_unstable();
                lost.dedup();
                all_repairable &= lost.len() <= m;
                for i in 0..k {
                    let (a, b) = (s + i * p.t, (s + (i + 1) * p.t).min(e));
                    if lost.contains(&i) {
                        lost_ranges.push((a, b));
                    } else {
                        events.push(Event::Data(a as u64, Bytes::copy_from_slice(&data[a..b])));
                    }
                }
                for r in protect(3, s as u64, block, p, last) {
                    events.push(Event::Repair(r));
                }
            }
            shuffle(&mut events, seed);
            let mut asm = Reassembly::default();
            let mut out = Vec::new();
            for ev in events {
                match ev {
                    Event::Data(off, b) => {
                        asm.data(off, b);
                        asm.retry();
                    }
                    Event::Repair(r) => asm.repair(r),
                }
                drain(&mut asm, &mut out);
            }
            let lost: usize = lost_ranges.iter().map(|(a, b)| b - a).sum();
            if all_repairable {
                prop_assert_eq!(out.len(), len, "whole before any retransmission");
                prop_assert!(asm.complete(), "the end is known from the last block's repairs");
                prop_assert!(asm.repaired_bytes as usize >= lost);
            }
            prop_assert!(out.len() <= len);
            prop_assert!(out[..] == data[..out.len()], "never a wrong byte");
            // QUIC's retransmissions arrive: whatever was not rebuilt flows now.
            for (a, b) in lost_ranges {
                asm.data(a as u64, Bytes::copy_from_slice(&data[a..b]));
                asm.retry();
                drain(&mut asm, &mut out);
            }
            prop_assert_eq!(out.len(), len);
            prop_assert!(out == data);
            prop_assert!(asm.complete());
        }
    }
}
