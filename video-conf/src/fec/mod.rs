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
//! A *block* is a run of a group's object bytes (≤ [`BLOCK_MAX_BYTES`], closed once
//! [`BLOCK_MAX_AGE`] old), cut into `k` symbols of [`SYMBOL`] bytes (a quarter packet; the
//! last one zero-padded). Blocks are cut and encoded once per group, for every subscriber
//! ([`GroupBlocks`]), with as many repair symbols as the worst loss needs; each subscriber
//! sends the first `m` of them that *its* path needs: [`repairs_needed`] for the loss its
//! connection shows ([`LossMeter`]) and the odds its track kind accepts ([`odds`]: a video
//! block that fails holds the picture for a retransmission, an audio frame is concealed). A
//! subscriber's 14-byte stream header, which names its own track id, has a tiny block of its
//! own ([`header_repairs`]). Which receiver wants repairs, from what round-trip time on, is
//! its choice (`fec_rtt_ms` in `Hello` and `Welcome`).
//!
//! Repair datagram (big-endian): `[0xFE, version, flags, stream id u64, block start u32,
//! block len u32, t u16, k u16, m u16, index u16, symbol (t bytes)]`; flag 1: the block ends
//! the stream, so a receiver that rebuilt it knows the stream is whole without waiting for
//! a lost FIN's retransmission.
//!
//! Here: the sizing ([`repairs_needed`], [`LossMeter`]), the receiver's [`Wish`] and datagram
//! format ([`Repair`]); the sender's side ([`GroupBlocks`], [`protect`] for one block with
//! fixed [`Params`]); the receiver's side, a
//! stream's [`Reassembly`] (where holes are rebuilt), the connection's [`RepairRouter`] (repair
//! datagrams to their streams) and the reader of a group stream ([`GroupRecv`]).

use std::time::Duration;

mod blocks;
mod datagram;
mod encoder;
mod params;
mod reassembly;
mod recv;
mod router;

pub use blocks::{Block, GroupBlocks, header_repairs, odds};
pub use datagram::Repair;
pub use encoder::protect;
pub use params::{
    LOSS_CEIL, LOSS_FLOOR, LossMeter, PACKET_BYTES, Params, SYMBOL, Wish, repairs_needed,
};
pub use reassembly::Reassembly;
pub use recv::{GroupRecv, ReadError, Repaired};
pub use router::RepairRouter;

pub const MAGIC: u8 = 0xFE;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 27;
/// Flag: this block ends the stream (its end is the stream's final size).
pub const FLAG_LAST: u8 = 1;
/// A block closes at this size…
pub const BLOCK_MAX_BYTES: usize = 64 * 1024;
/// …or once its first bytes are this old: a repair can come no sooner than its block ends,
/// so a loss early in a block holds the picture up to this long (within a 300 ms freeze);
/// longer blocks need less repair for the same odds (more packets share the symbols).
pub const BLOCK_MAX_AGE: Duration = Duration::from_millis(200);
/// How long after its block's data a repair is sent (so that the two travel apart).
pub const REPAIR_DELAY: Duration = Duration::from_millis(5);
/// Repair datagrams per connection waiting for their stream to be accepted.
const PENDING_MAX: usize = 4096;
/// Repair symbols queued per stream for its reader (more are dropped: repair is best effort).
const STREAM_QUEUE: usize = 1024;

/// Test bytes: a stream's `n` bytes, none of them alike in runs.
#[cfg(test)]
fn stream_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}
