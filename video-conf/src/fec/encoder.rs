//! One block's repair symbols with given code parameters (tests, fuzzing and tools; a
//! relay's group streams use [`super::GroupBlocks`]).

use bytes::Bytes;
use tracing::debug;

use super::{Params, Repair};

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
