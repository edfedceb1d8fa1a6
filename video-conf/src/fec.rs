//! Forward error correction for group streams over long links.
//!
//! Over a geostationary hop a lost packet is repaired by QUIC after a round trip and a half
//! (~900 ms: the loss shows once later packets are acknowledged, then the copy travels again),
//! which alone breaks a one-second glass-to-glass budget. So the sender of a group stream also
//! sends Reed–Solomon repair symbols of the stream's bytes as QUIC datagrams, and the receiver
//! reads the stream *unordered* (quinn hands over each segment as it arrives, with its offset)
//! and rebuilds a hole from the symbols it has as soon as enough have arrived. The stream stays
//! reliable: QUIC still retransmits, the repair only gets there first. Nothing changes on a
//! link where no datagram arrives.
//!
//! A *block* is a run of the stream's bytes (a few frames, ≤ [`BLOCK_MAX_BYTES`] or
//! [`BLOCK_MAX_AGE`]), cut into `k` symbols of `t` bytes (the last one zero-padded), with `m`
//! repair symbols. A lost packet of the stream can touch up to three symbols (symbols are
//! about a packet long), so a block has at least three repair symbols (`k ≥ 3`), and
//! [`Params::pct`] per cent of `k` where that is more. Which receiver wants repairs, from what
//! round-trip time on, is its choice (`fec_rtt_ms` in `Hello` and `Welcome`).
//!
//! Repair datagram (big-endian): `[0xFE, version, flags, stream id u64, block start u32,
//! block len u32, t u16, k u16, m u16, index u16, symbol (t bytes)]`; flag 1: the block ends
//! the stream, so a receiver that rebuilt it knows the stream is whole without waiting for
//! a lost FIN's retransmission.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rangemap::RangeSet;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::wire::WireError;

pub const MAGIC: u8 = 0xFE;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 27;
/// Flag: this block ends the stream (its end is the stream's final size).
pub const FLAG_LAST: u8 = 1;
/// A block closes at this size…
pub const BLOCK_MAX_BYTES: usize = 16 * 1024;
/// …or once its first bytes are this old (a repair can come no sooner than its block ends).
pub const BLOCK_MAX_AGE: Duration = Duration::from_millis(50);
/// How long after its block's data a repair is sent (so that the two travel apart).
pub const REPAIR_DELAY: Duration = Duration::from_millis(5);
/// Repair datagrams per connection waiting for their stream to be accepted.
const PENDING_MAX: usize = 4096;
/// Repair symbols queued per stream for its reader (more are dropped: repair is best effort).
const STREAM_QUEUE: usize = 1024;

/// How much repair a sender adds.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Symbol size (even).
    pub t: usize,
    /// Repair symbols as a share of source symbols, per cent.
    pub pct: u32,
}

impl Params {
    /// Symbols as long as a datagram can carry (about a packet), rounded down to 64 bytes.
    pub fn for_datagram(max_datagram: usize) -> Option<Params> {
        let t = (max_datagram.checked_sub(HEADER_LEN)? / 64) * 64;
        (t >= 64).then_some(Params {
            t: t.min(1408),
            pct: 25,
        })
    }

    /// Repair symbols for `k` source symbols.
    pub fn repairs(&self, k: usize) -> usize {
        let floor = k.min(3);
        floor.max((k * self.pct as usize).div_ceil(100))
    }
}

/// One repair symbol of one block of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub stream: u64,
    pub start: u64,
    pub len: u32,
    pub t: u16,
    pub k: u16,
    pub m: u16,
    pub index: u16,
    /// The block ends the stream.
    pub last: bool,
    pub data: Bytes,
}

impl Repair {
    /// Not a repair: the stream's final size (its last block was sent without the flag).
    pub fn end(stream: u64, size: u64) -> Repair {
        Repair {
            stream,
            start: size,
            len: 0,
            t: 0,
            k: 0,
            m: 0,
            index: 0,
            last: true,
            data: Bytes::new(),
        }
    }

    /// The stream's final size, if this says so.
    pub fn final_size(&self) -> Option<u64> {
        self.last.then_some(self.start + u64::from(self.len))
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.data.len());
        b.put_u8(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(if self.last { FLAG_LAST } else { 0 });
        b.put_u64(self.stream);
        b.put_u32(self.start as u32);
        b.put_u32(self.len);
        b.put_u16(self.t);
        b.put_u16(self.k);
        b.put_u16(self.m);
        b.put_u16(self.index);
        b.put_slice(&self.data);
        b.freeze()
    }

    pub fn decode(d: &Bytes) -> Result<Repair, WireError> {
        let bad = |detail: String| WireError::Malformed {
            what: "repair datagram",
            detail,
        };
        if d.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than its header", d.len())));
        }
        if d[0] != MAGIC {
            return Err(bad(format!("magic {:#04x}, not {MAGIC:#04x}", d[0])));
        }
        if d[1] != VERSION {
            return Err(WireError::Version(u32::from(d[1])));
        }
        let u16_at = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        let r = Repair {
            stream: u64::from_be_bytes(d[3..11].try_into().expect("8 bytes")),
            start: u64::from(u32_at(11)),
            len: u32_at(15),
            t: u16_at(19),
            k: u16_at(21),
            m: u16_at(23),
            index: u16_at(25),
            last: d[2] & FLAG_LAST != 0,
            data: d.slice(HEADER_LEN..),
        };
        let (t, k, len) = (usize::from(r.t), usize::from(r.k), r.len as usize);
        if r.last && k == 0 && t == 0 && len == 0 && r.m == 0 && r.data.is_empty() {
            return Ok(r); // a final size alone
        }
        if t == 0 || t % 2 != 0 || r.data.len() != t {
            return Err(bad(format!(
                "symbol size {t} with {} bytes of symbol",
                r.data.len()
            )));
        }
        if k == 0 || len == 0 || len > k * t || len <= (k - 1) * t {
            return Err(bad(format!("{len} bytes in {k} symbols of {t}")));
        }
        if r.m == 0 || r.index >= r.m {
            return Err(bad(format!("repair symbol {} of {}", r.index, r.m)));
        }
        Ok(r)
    }
}

/// A peer's wish for repair datagrams ("from this round trip on"; 0: never, 1: always),
/// judged against the lowest round trip the connection has shown: queueing on a narrow,
/// saturated link inflates the smoothed RTT, and repair would only add to that load.
#[derive(Debug)]
pub struct Wish {
    rtt_ms: u32,
    min_rtt_us: std::sync::atomic::AtomicU64,
}

impl Wish {
    pub fn new(rtt_ms: u32) -> Arc<Wish> {
        Arc::new(Wish {
            rtt_ms,
            min_rtt_us: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// The lowest round trip `conn` has shown so far (sampled at each call).
    pub fn min_rtt(&self, conn: &quinn::Connection) -> Duration {
        let rtt = conn.rtt().as_micros() as u64;
        let min = self
            .min_rtt_us
            .fetch_min(rtt, std::sync::atomic::Ordering::Relaxed)
            .min(rtt);
        Duration::from_micros(min)
    }

    /// Repair for the next group sent on `conn`, if wanted now.
    pub fn params(&self, conn: &quinn::Connection) -> Option<Params> {
        let min = self.min_rtt(conn);
        let wanted = match self.rtt_ms {
            0 => false,
            1 => true,
            ms => min >= Duration::from_millis(ms.into()),
        };
        if !wanted {
            return None;
        }
        Params::for_datagram(conn.max_datagram_size()?)
    }
}

/// Repair symbols for the block `data` at stream offset `start`.
pub fn protect(stream: u64, start: u64, data: &[u8], p: Params, last: bool) -> Vec<Repair> {
    if data.is_empty() {
        return Vec::new();
    }
    let t = p.t;
    let k = data.len().div_ceil(t);
    let m = p.repairs(k);
    let shards = data.chunks(t).map(|c| {
        let mut s = c.to_vec();
        s.resize(t, 0);
        s
    });
    match reed_solomon_simd::encode(k, m, shards) {
        Ok(rec) => rec
            .into_iter()
            .enumerate()
            .map(|(i, d)| Repair {
                stream,
                start,
                len: data.len() as u32,
                t: t as u16,
                k: k as u16,
                m: m as u16,
                index: i as u16,
                last,
                data: Bytes::from(d),
            })
            .collect(),
        Err(e) => {
            debug!(error = %e, k, m, t, "No repair for a block.");
            Vec::new()
        }
    }
}

/// The sending side of one group stream: collects the bytes written and cuts them into blocks.
pub struct Encoder {
    stream: u64,
    params: Params,
    /// Stream offset of the block being collected.
    start: u64,
    block: Vec<u8>,
    since: Option<Instant>,
}

impl Encoder {
    pub fn new(stream: u64, params: Params) -> Encoder {
        Encoder {
            stream,
            params,
            start: 0,
            block: Vec::new(),
            since: None,
        }
    }

    /// Bytes just written to the stream.
    pub fn wrote(&mut self, b: &[u8]) {
        self.since.get_or_insert_with(Instant::now);
        self.block.extend_from_slice(b);
    }

    /// When the block being collected is due to close.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|s| s + BLOCK_MAX_AGE)
    }

    /// Closes the block if it is due (or, `last`, the stream ends with it): its repair
    /// symbols.
    pub fn flush(&mut self, last: bool) -> Vec<Repair> {
        let due = self.block.len() >= BLOCK_MAX_BYTES
            || self.since.is_some_and(|s| s.elapsed() >= BLOCK_MAX_AGE);
        if self.block.is_empty() {
            // The stream ends on a block already sent: say where it ends.
            return if last {
                vec![Repair::end(self.stream, self.start)]
            } else {
                Vec::new()
            };
        }
        if !(due || last) {
            return Vec::new();
        }
        let out = protect(self.stream, self.start, &self.block, self.params, last);
        self.start += self.block.len() as u64;
        self.block.clear();
        self.since = None;
        out
    }
}

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

/// Repair datagrams of one connection, routed to the streams they protect.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    /// Stream bytes rebuilt from repair symbols before QUIC's retransmission got there.
    pub repaired_bytes: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct InboxState {
    routes: HashMap<u64, mpsc::Sender<Repair>>,
    /// Repairs that overtook their stream, by stream id.
    pending: BTreeMap<u64, Vec<Repair>>,
    pending_n: usize,
    /// Streams already read to their end (their late repairs are dropped), the latest few.
    done: std::collections::BTreeSet<u64>,
    bad: u64,
}

impl Inbox {
    /// Reads `conn`'s datagrams until it closes.
    pub fn start(conn: &quinn::Connection) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::default());
        let (i, conn) = (inbox.clone(), conn.clone());
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                i.route(&d);
            }
        });
        inbox
    }

    /// Malformed datagrams seen.
    pub fn bad(&self) -> u64 {
        self.state.lock().expect("inbox lock poisoned").bad
    }

    pub fn route(&self, d: &Bytes) {
        let mut st = self.state.lock().expect("inbox lock poisoned");
        let r = match Repair::decode(d) {
            Ok(r) => r,
            Err(e) => {
                st.bad += 1;
                debug!(error = %e, "Malformed repair datagram (dropped).");
                return;
            }
        };
        if let Some(tx) = st.routes.get(&r.stream) {
            let _ = tx.try_send(r);
            return;
        }
        if st.done.contains(&r.stream) {
            return;
        }
        st.pending_n += 1;
        st.pending.entry(r.stream).or_default().push(r);
        while st.pending_n > PENDING_MAX {
            let Some((_, v)) = st.pending.pop_first() else {
                break;
            };
            st.pending_n -= v.len();
        }
    }

    fn register(&self, stream: u64) -> mpsc::Receiver<Repair> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut st = self.state.lock().expect("inbox lock poisoned");
        if let Some(v) = st.pending.remove(&stream) {
            st.pending_n -= v.len();
            for r in v {
                let _ = tx.try_send(r);
            }
        }
        st.routes.insert(stream, tx);
        rx
    }

    fn unregister(&self, stream: u64) {
        let mut st = self.state.lock().expect("inbox lock poisoned");
        st.routes.remove(&stream);
        st.done.insert(stream);
        if st.done.len() > PENDING_MAX {
            st.done.pop_first();
        }
    }
}

/// Why a read of a group stream stopped short.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly after this many bytes of the read.
    Finished(usize),
    Other(String),
}

/// A group stream being read: straight from quinn, or through a [`Reassembly`] fed by the
/// stream's unordered segments and the connection's repair datagrams.
pub enum GroupRecv {
    Plain(quinn::RecvStream),
    Repaired(Repaired),
}

pub struct Repaired {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
    stop: Option<oneshot::Sender<u32>>,
}

impl GroupRecv {
    /// Reads `recv`; with an inbox, through repair.
    pub fn new(recv: quinn::RecvStream, inbox: Option<&Arc<Inbox>>) -> GroupRecv {
        let Some(inbox) = inbox else {
            return GroupRecv::Plain(recv);
        };
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(pump(recv, inbox.clone(), tx, stop_rx));
        GroupRecv::Repaired(Repaired {
            rx,
            buf: Bytes::new(),
            stop: Some(stop_tx),
        })
    }

    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), ReadError> {
        match self {
            GroupRecv::Plain(r) => r.read_exact(out).await.map_err(|e| match e {
                quinn::ReadExactError::FinishedEarly(n) => ReadError::Finished(n),
                other => ReadError::Other(other.to_string()),
            }),
            GroupRecv::Repaired(r) => {
                let mut n = 0;
                while n < out.len() {
                    if r.buf.is_empty() {
                        match r.rx.recv().await {
                            Some(Ok(b)) => r.buf = b,
                            Some(Err(e)) => return Err(ReadError::Other(e)),
                            None => return Err(ReadError::Finished(n)),
                        }
                    }
                    let take = r.buf.len().min(out.len() - n);
                    out[n..n + take].copy_from_slice(&r.buf.split_to(take));
                    n += take;
                }
                Ok(())
            }
        }
    }

    /// Asks the sender to stop sending (with an application error code).
    pub fn stop(&mut self, code: u32) {
        match self {
            GroupRecv::Plain(r) => {
                let _ = r.stop(code.into());
            }
            GroupRecv::Repaired(r) => {
                if let Some(s) = r.stop.take() {
                    let _ = s.send(code);
                }
            }
        }
    }
}

/// Feeds one stream's segments and repairs through a [`Reassembly`] to its reader.
async fn pump(
    mut recv: quinn::RecvStream,
    inbox: Arc<Inbox>,
    tx: mpsc::Sender<Result<Bytes, String>>,
    mut stop: oneshot::Receiver<u32>,
) {
    let id = u64::from(recv.id());
    let mut repairs = inbox.register(id);
    let mut asm = Reassembly::default();
    let mut repairs_open = true;
    let mut stop_open = true;
    let mut tx = Some(tx);
    loop {
        let mut finished = false;
        tokio::select! {
            code = &mut stop, if stop_open => {
                stop_open = false;
                if let Ok(code) = code {
                    let _ = recv.stop(code.into());
                    break;
                }
            }
            c = recv.read_chunk(usize::MAX, false) => match c {
                Ok(Some(c)) => {
                    asm.data(c.offset, c.bytes);
                    asm.retry();
                }
                Ok(None) => finished = true,
                Err(e) => {
                    if let Some(tx) = &tx {
                        let _ = tx.send(Err(e.to_string())).await;
                    }
                    break;
                }
            },
            r = repairs.recv(), if repairs_open => match r {
                Some(r) => asm.repair(r),
                None => repairs_open = false,
            },
        }
        if let Some(t) = &tx {
            for b in asm.ready() {
                if t.send(Ok(b)).await.is_err() {
                    // The reader is gone without a word: it wants no more.
                    let _ = recv.stop(0u32.into());
                    inbox.unregister(id);
                    return;
                }
            }
            if asm.complete() {
                // Whole: the reader sees the end now, QUIC's FIN (and any retransmission
                // still on its way) is drained here.
                tx = None;
            }
        }
        if finished {
            break;
        }
    }
    if asm.repaired_bytes > 0 {
        inbox
            .repaired_bytes
            .fetch_add(asm.repaired_bytes, std::sync::atomic::Ordering::Relaxed);
        debug!(
            stream = id,
            bytes = asm.repaired_bytes,
            "Stream repaired ahead of retransmission."
        );
    }
    inbox.unregister(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn repair_datagrams_round_trip_and_bad_ones_are_named() {
        let p = Params::for_datagram(1200).unwrap();
        assert_eq!(p.t, 1152);
        let data = stream_bytes(5000);
        let rs = protect(4, 100, &data, p, false);
        assert_eq!(rs.len(), 3, "k=5: three repair symbols at least");
        let d = rs[1].encode();
        assert_eq!(Repair::decode(&d).unwrap(), rs[1]);
        let mut bad = d.to_vec();
        bad[0] = 0x47; // MPEG-TS sync byte
        assert!(
            Repair::decode(&Bytes::from(bad))
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut v2 = d.to_vec();
        v2[1] = 2;
        assert_eq!(
            Repair::decode(&Bytes::from(v2)).unwrap_err(),
            WireError::Version(2)
        );
        assert!(Repair::decode(&d.slice(..30)).is_err(), "truncated symbol");
        let mut k = d.to_vec();
        k[22] = 9; // nine symbols for 5,000 bytes of 1,152
        assert!(Repair::decode(&Bytes::from(k)).is_err());
    }

    /// Holes of lost packets are rebuilt from repair symbols before any retransmission, in
    /// any order of arrival; bytes come out in order, once.
    #[test]
    fn holes_are_rebuilt_from_repairs() {
        let p = Params { t: 1152, pct: 25 };
        let data = stream_bytes(40_000);
        let mut enc = Encoder::new(8, p);
        let mut repairs = Vec::new();
        for c in data.chunks(7000) {
            enc.wrote(c);
            repairs.extend(enc.flush(false));
        }
        repairs.extend(enc.flush(true));
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
