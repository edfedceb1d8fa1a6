//! The code parameters shared by both ends: symbol size and repair share, and whether a
//! receiver wants repair at all (its [`Wish`], judged on the connection's round trip).

use std::sync::Arc;
use std::time::Duration;

use super::HEADER_LEN;

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
