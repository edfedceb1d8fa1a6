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

/// Stream bytes one lost packet can carry at most (a full packet's stream frame).
pub const PACKET_BYTES: usize = 1400;
/// Symbol size of a group's blocks: about a quarter of a packet. A lost packet erases the
/// symbols its bytes touch, `PACKET_BYTES / t + 1` at most, so repair per loss costs about
/// 1.25 packets' worth with quarter-packet symbols against 2 with packet-sized ones; smaller
/// still, each repair datagram's 27-byte header starts to cost more than that saves.
pub const SYMBOL: usize = 320;
/// The loss a path is assumed to have at least (a GEO path loses packets to rain and
/// interference before its counters show any), and at most (beyond it, repair is sized for
/// this and retransmission does the rest).
pub const LOSS_FLOOR: f64 = 0.005;
pub const LOSS_CEIL: f64 = 0.15;

/// `P(X > l)` for `X ~ Binomial(n, p)`.
fn tail(n: usize, p: f64, l: usize) -> f64 {
    let mut pmf = (1.0 - p).powi(n as i32);
    let mut cdf = pmf;
    for i in 0..l.min(n) {
        pmf *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p);
        cdf += pmf;
    }
    (1.0 - cdf).max(0.0)
}

/// Repair symbols for a block of `k` source symbols of `t` bytes, whose packets carry
/// `per_packet` bytes of it each (a video frame fills packets; each audio frame travels in
/// a packet of its own), over a path that loses a share `loss` of its packets, so that the
/// block fails to rebuild in at most one block in `1/eps` (it then waits for QUIC's
/// retransmission): enough symbols for the most packets lost among the block's data and
/// repair packets at those odds, each lost packet erasing up to `per_packet / t + 1`
/// symbols (never more than the block has).
pub fn repairs_needed(k: usize, t: usize, per_packet: usize, loss: f64, eps: f64) -> usize {
    if k == 0 || t == 0 {
        return 0;
    }
    let p = loss.clamp(LOSS_FLOOR, LOSS_CEIL);
    let per_packet = per_packet.clamp(1, PACKET_BYTES);
    let erase = (per_packet.div_ceil(t) + 1).min(k);
    let data_packets = (k * t).div_ceil(per_packet);
    let per_packet = (PACKET_BYTES / (t + super::HEADER_LEN + 3)).max(1);
    let mut m = erase;
    loop {
        let n = data_packets + m.div_ceil(per_packet);
        let l = (0..=n).find(|&l| tail(n, p, l) <= eps).unwrap_or(n);
        let want = (erase * l).max(1).min(k + erase);
        if want <= m {
            return m;
        }
        m = want;
    }
}

/// A peer's wish for repair datagrams ("from this round trip on"; 0: never, 1: always),
/// judged against the lowest round trip the connection has shown: queueing on a narrow,
/// saturated link inflates the smoothed RTT, and repair would only add to that load.
#[derive(Debug)]
pub struct Wish {
    rtt_ms: u32,
    min_rtt_us: std::sync::atomic::AtomicU64,
    loss: std::sync::Mutex<LossMeter>,
}

/// The share of packets a connection loses: its counters sampled every [`LossMeter::SPAN`]
/// packets sent, smoothed (losses found spurious, packets that were only reordered, do not
/// count).
#[derive(Debug, Default, Clone, Copy)]
pub struct LossMeter {
    sent: u64,
    lost: u64,
    /// Smoothed share; None until the first span.
    share: Option<f64>,
}

impl LossMeter {
    /// Packets per sample.
    pub const SPAN: u64 = 200;

    /// Takes the connection's counters (packets sent, lost, lost spuriously); returns the share
    /// lost now.
    pub fn sample(&mut self, sent: u64, lost: u64) -> f64 {
        let ds = sent.saturating_sub(self.sent);
        if ds >= Self::SPAN {
            let x = lost.saturating_sub(self.lost) as f64 / ds as f64;
            // Rises fast (a rain fade), falls slowly.
            self.share = Some(match self.share {
                None => x,
                Some(s) if x > s => s + (x - s) / 2.0,
                Some(s) => s + (x - s) / 8.0,
            });
            self.sent = sent;
            self.lost = lost;
        }
        self.share.unwrap_or(LOSS_FLOOR)
    }
}

impl Wish {
    pub fn new(rtt_ms: u32) -> Arc<Wish> {
        Arc::new(Wish {
            rtt_ms,
            min_rtt_us: std::sync::atomic::AtomicU64::new(u64::MAX),
            loss: Default::default(),
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

    /// Whether the peer wants repair on `conn` now (and its datagrams can carry a symbol).
    pub fn wanted(&self, conn: &quinn::Connection) -> bool {
        let min = self.min_rtt(conn);
        let wanted = match self.rtt_ms {
            0 => false,
            1 => true,
            ms => min >= Duration::from_millis(ms.into()),
        };
        wanted
            && conn
                .max_datagram_size()
                .is_some_and(|d| d >= SYMBOL + super::HEADER_LEN)
    }

    /// The share of packets `conn` loses now ([`LossMeter`]).
    pub fn loss(&self, conn: &quinn::Connection) -> f64 {
        let p = conn.stats().path;
        self.loss.lock().expect("loss lock poisoned").sample(
            p.sent_packets,
            p.lost_packets.saturating_sub(p.spurious_lost_packets),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_grows_with_loss_and_costs_less_on_longer_blocks() {
        // A quarter-second of 1.5 Mbit/s video: 147 symbols of 320 bytes.
        let k = 147;
        let at = |loss: f64| repairs_needed(k, SYMBOL, PACKET_BYTES, loss, 1e-4);
        assert!(
            at(0.01) < at(0.05) && at(0.05) < at(0.10),
            "{} {} {}",
            at(0.01),
            at(0.05),
            at(0.10)
        );
        // Within 30 % at 1 % loss, counting the datagrams' headers.
        let share = |m: usize, k: usize| (m * (SYMBOL + HEADER_LEN)) as f64 / (k * SYMBOL) as f64;
        assert!(share(at(0.01), k) <= 0.30, "{}", at(0.01));
        // A short block pays more per byte for the same odds.
        assert!(
            share(repairs_needed(10, SYMBOL, PACKET_BYTES, 0.01, 1e-4), 10) > share(at(0.01), k)
        );
        // A block of one symbol needs at most a few copies; never nothing.
        assert!((1..=4).contains(&repairs_needed(1, SYMBOL, 300, 0.01, 1e-2)));
        assert_eq!(repairs_needed(0, SYMBOL, 300, 0.01, 1e-2), 0);
        // Audio: ten frames of ~320 bytes, each in a packet of its own, each loss erasing
        // two or three symbols, not six.
        let audio = repairs_needed(10, SYMBOL, 320, 0.01, 1e-2);
        assert!(audio <= 4, "{audio}");
        // No loss seen is not no loss: the floor.
        assert_eq!(at(0.0), at(LOSS_FLOOR));
    }

    #[test]
    fn the_binomial_tail_is_right() {
        assert!((tail(10, 0.1, 0) - (1.0 - 0.9f64.powi(10))).abs() < 1e-12);
        assert!(tail(10, 0.1, 10) < 1e-12);
        // P(X > 1), X ~ B(3, 0.5) = 4/8.
        assert!((tail(3, 0.5, 1) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_loss_meter_rises_fast_and_falls_slowly() {
        let mut m = LossMeter::default();
        assert_eq!(m.sample(50, 0), LOSS_FLOOR, "nothing measured yet");
        assert!((m.sample(1000, 10) - 0.01).abs() < 1e-9);
        // A fade: 10 % lost over the next span.
        let up = m.sample(2000, 110);
        assert!(up > 0.05, "{up}");
        // Clean again: comes down an eighth of the way per span.
        let down = m.sample(3000, 110);
        assert!(down < up && down > 0.04, "{down}");
    }
}
