//! The sending side: a group stream's bytes cut into blocks, each block's repair symbols.

use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use super::{BLOCK_MAX_AGE, BLOCK_MAX_BYTES, Params, Repair};

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
