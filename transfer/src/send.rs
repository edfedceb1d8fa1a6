//! The sending side of one transfer over one QUIC connection.
//!
//! Opens a control stream (at the transfer's priority: reports and alarms go first on a shared
//! connection), offers the manifest, learns what the receiver already holds, and sends the
//! rest, each chunk on a stream of its own at the same priority, re-reading and re-checking
//! each from the source. Chunks go out paced by the
//! optional rate limit; a `pause` check between chunks honours time windows.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, warn};

use crate::manifest::Manifest;
use crate::transfer_wire::{self, Bitmap, Frame, Offer, Receipt, codes, next, put};
use crate::{Priority, TransferError};

/// Stream priorities on a shared connection (higher goes first). Reports use
/// [`PRIORITY_REPORTS`]; a transfer class owns a band below it ([`stream_priority`]), and
/// within its band each chunk stream ranks below the one opened before it.
pub const PRIORITY_REPORTS: i32 = 1_000_000_000;
/// Chunk streams one transfer ranks apart before its band wraps (a class band is wider).
const BAND: u32 = 100_000_000;

/// Stream priority of a transfer class (its control stream; its chunks rank below).
pub fn stream_priority(class: &str) -> i32 {
    match Priority::class_of(class) {
        Priority::Alarm => 500_000_000,
        Priority::Bulk => -500_000_000,
        Priority::Backup => -1_000_000_000,
        Priority::Normal => 0,
    }
}

/// Priority of the `n`th chunk stream of a transfer of class priority `class`: quinn shares a
/// connection round-robin among streams of equal priority, which would leave every buffered
/// chunk half-sent at once (and all of them lost at a link cut); ranking them sends one chunk
/// after the other, in order.
fn chunk_priority(class: i32, n: u32) -> i32 {
    class - 1 - (n % BAND) as i32
}

/// Congestion windows of chunk data handed to QUIC and not yet acknowledged, at most. With
/// 5/4, a 20 Mbit/s GEO link at 5 % loss each way ran at 0.65 of its rate: chunks waiting for
/// a retransmission (and the retransmission's own loss) held the sender back, not the link.
pub const AHEAD_CWNDS: f64 = 2.5;
/// On a short path one window in flight and a quarter more for the acknowledgements' way back
/// is all the sender needs: what it hands QUIC beyond that is what a cut (a dual-homed site's
/// ground line) throws away and sends again.
pub const AHEAD_CWNDS_CLEAN: f64 = 1.25;

/// How many congestion windows of chunk data to keep handed to QUIC: [`AHEAD_CWNDS_CLEAN`] on
/// a short path (under 100 ms: a retransmission costs the sender a few milliseconds of refill,
/// not a satellite round trip), else [`AHEAD_CWNDS`].
pub fn ahead_cwnds(stats: &quinn::ConnectionStats) -> f64 {
    if stats.path.rtt < Duration::from_millis(100) {
        AHEAD_CWNDS_CLEAN
    } else {
        AHEAD_CWNDS
    }
}

pub struct SendOptions {
    /// `alarm`, `normal`, `bulk` or `backup`.
    pub priority: Priority,
    /// At most this many bits per second of chunk payload.
    pub rate_limit_bps: Option<u64>,
    /// Give up on this connection when nothing comes back for this long with chunks unacknowledged.
    pub stall_timeout: Duration,
    pub origin: String,
    pub transfer_id: String,
    pub forward_to: Vec<String>,
    /// A file never offered to this receiver before: start sending before the receiver's
    /// Have arrives (saves one round trip; used only on a transfer's first attempt, and not
    /// when another job offered the receiver the same file, which it may hold already).
    pub fresh: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            priority: Priority::Normal,
            rate_limit_bps: None,
            stall_timeout: Duration::from_secs(20),
            origin: String::new(),
            transfer_id: String::new(),
            forward_to: Vec::new(),
            fresh: false,
        }
    }
}

/// Shared progress of a transfer (read by status displays while it runs).
#[derive(Default)]
pub struct Progress {
    /// Chunks acknowledged (durable at the receiver).
    pub acked_chunks: AtomicU64,
    pub acked_bytes: AtomicU64,
    /// Chunk payload bytes written to the connection, resends included.
    pub sent_bytes: AtomicU64,
    /// Attempts so far (connections this transfer was offered on).
    pub attempts: AtomicU64,
    /// The receiver accepted the current attempt's offer (it answered Have or acknowledged).
    pub accepted: std::sync::atomic::AtomicBool,
    /// Every chunk is handed to QUIC: what is left is waiting for acknowledgements and the
    /// receipt (a driver may start the next transfer now; see `outbox::drive`).
    pub handed: std::sync::atomic::AtomicBool,
    /// Signalled when `handed` becomes true.
    pub handed_now: tokio::sync::Notify,
}

#[derive(Debug)]
pub enum SendOutcome {
    /// The receiver verified the file and put it in place.
    Delivered(Receipt),
    /// The `pause` check asked to stop (a time window closed); resume later.
    Paused,
}

/// Sends `source` (described by `manifest`) over `conn`. Returns when the receiver confirmed
/// the whole file, or with an error; a transient error ([`TransferError::is_transient`]) means
/// "try again on a new connection later", and the receiver keeps every acknowledged chunk.
pub async fn send_file(
    conn: &quinn::Connection,
    source: &Path,
    manifest: &Manifest,
    opts: &SendOptions,
    progress: &Arc<Progress>,
    pause: &(dyn Fn() -> bool + Send + Sync),
) -> Result<SendOutcome, TransferError> {
    let priority = stream_priority(opts.priority.as_str());
    // A first attempt starts sending at once (the receiver is expected to hold nothing; if it
    // holds something, its Have arrives one RTT later and stops those chunks). A resumed one
    // offers without the chunk hashes (the receiver keeps them; over a satellite link they are
    // not free) and waits for the Have, so nothing the receiver holds goes out again.
    let first_attempt = progress.attempts.fetch_add(1, Ordering::Relaxed) == 0;
    let mut short = !first_attempt;
    let (mut w, mut r, have, partial) = loop {
        let (send, recv) = conn.open_bi().await?;
        let _ = send.set_priority(priority);
        let mut w = FramedWrite::new(send, transfer_wire::codec());
        let mut r = FramedRead::new(recv, transfer_wire::codec());
        let mut offer = Offer::new(
            manifest,
            &opts.transfer_id,
            opts.priority.as_str(),
            &opts.origin,
        );
        offer.forward_to = opts.forward_to.clone();
        put(
            &mut w,
            Frame::Offer(if short { offer.short() } else { offer }),
        )
        .await?;
        if first_attempt && opts.fresh {
            break (w, r, Bitmap::new(manifest.chunk_count()), Vec::new());
        }
        let first = tokio::time::timeout(opts.stall_timeout * 2, next(&mut r))
            .await
            .map_err(|_| TransferError::Stalled(opts.stall_timeout * 2))??;
        match first {
            Some(Frame::Have(h)) => {
                break (
                    w,
                    r,
                    Bitmap::from_bytes(&h.verified, manifest.chunk_count()),
                    h.partial,
                );
            }
            Some(Frame::Done(receipt)) => return Ok(SendOutcome::Delivered(receipt)),
            Some(Frame::Failed(f)) if f.code == codes::NEED_MANIFEST && short => {
                // The receiver lost its state: offer the whole manifest.
                short = false;
                continue;
            }
            Some(Frame::Failed(f)) => return Err(failed(f)),
            Some(other) => {
                return Err(TransferError::Protocol(format!(
                    "expected Have, got {}",
                    other.kind()
                )));
            }
            None => return Err(TransferError::Stream("receiver closed the stream".into())),
        }
    };
    progress
        .acked_chunks
        .store(u64::from(have.count()), Ordering::Relaxed);
    progress.acked_bytes.store(
        (0..manifest.chunk_count())
            .filter(|i| have.get(*i))
            .map(|i| manifest.chunk_len(i) as u64)
            .sum(),
        Ordering::Relaxed,
    );
    debug!(
        have = have.count(),
        of = manifest.chunk_count(),
        "Receiver's state."
    );

    // The receiving half: acknowledgements, resend requests, the receipt.
    let (tx, mut rx) = mpsc::channel::<Result<Option<Frame>, TransferError>>(64);
    let t0 = Instant::now();
    let heard = Arc::new(AtomicU64::new(0));
    let heard_w = heard.clone();
    let reader = tokio::spawn(async move {
        loop {
            let f = next(&mut r).await;
            heard_w.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
            let end = !matches!(f, Ok(Some(_)));
            // Backpressure: the reader waits for the sender to take each frame.
            if tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    let _abort_reader = AbortOnDrop(reader);

    let file = std::fs::File::open(source).map_err(|e| TransferError::io(source, e))?;
    let mut acked = have;
    let mut queue: std::collections::VecDeque<u32> = acked.missing().collect();
    let mut unacked: std::collections::HashSet<u32> = Default::default();
    let mut last_heard = Instant::now();
    let mut next_send = Instant::now();
    let mut chunks_opened: u32 = 0;
    let mut buf = vec![0u8; manifest.chunk_size as usize];
    // Chunk bytes handed to QUIC and not yet acknowledged by the peer's QUIC. Kept within a
    // few congestion windows ([`AHEAD_CWNDS`]): one is in flight, and on a lossy link as much
    // again waits for its retransmissions (a chunk's stream counts until its last packet is
    // acknowledged); more would only queue inside quinn, where it fills the connection's send
    // buffer (then every stream's writes block, the report stream's acknowledgements too).
    // What the receiver holds of chunks that were cut off: only the rest goes again.
    let mut partial: std::collections::HashMap<u32, transfer_wire::Ranges> = partial
        .into_iter()
        .filter(|p| p.index < manifest.chunk_count() && !acked.get(p.index))
        .filter_map(|p| {
            let r =
                transfer_wire::Ranges::from_wire(&p.ranges, manifest.chunk_len(p.index) as u32)?;
            Some((p.index, r))
        })
        .collect();
    let ahead = Arc::new(AtomicU64::new(0));
    let ahead_freed = Arc::new(tokio::sync::Notify::new());
    // Progress at debug level, once a second until every chunk is handed to QUIC.
    let mut shown = Some(Instant::now());
    loop {
        if shown.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
            shown = Some(Instant::now());
            let st = conn.stats();
            debug!(
                ms = t0.elapsed().as_millis() as u64,
                sent = progress.sent_bytes.load(Ordering::Relaxed),
                acked = progress.acked_bytes.load(Ordering::Relaxed),
                ahead = ahead.load(Ordering::Relaxed),
                queued = queue.len(),
                cwnd = st.path.cwnd,
                rtt_ms = st.path.rtt.as_millis() as u64,
                lost = st.path.lost_packets,
                sent_packets = st.path.sent_packets,
                "Sending."
            );
        }
        // Take whatever the receiver said, without waiting.
        while let Ok(f) = rx.try_recv() {
            last_heard = Instant::now();
            if let Some(done) = handle(f, manifest, &mut acked, &mut unacked, &mut queue, progress)?
            {
                return Ok(SendOutcome::Delivered(done));
            }
        }
        if let Some(i) = queue.pop_front() {
            if acked.get(i) {
                continue;
            }
            progress.handed.store(false, Ordering::Relaxed);
            if pause() {
                let _ = w.get_mut().finish();
                return Ok(SendOutcome::Paused);
            }
            if let Some(bps) = opts.rate_limit_bps {
                let now = Instant::now();
                if next_send > now {
                    tokio::time::sleep_until(next_send.into()).await;
                }
                let len_bits = manifest.chunk_len(i) as f64 * 8.0;
                next_send = next_send.max(now) + Duration::from_secs_f64(len_bits / bps as f64);
            }
            let len = manifest.chunk_len(i);
            let chunk = &mut buf[..len];
            file.read_exact_at(chunk, manifest.offset(i))
                .map_err(|e| TransferError::io(source, e))?;
            if *blake3::hash(chunk).as_bytes() != manifest.chunks[i as usize] {
                let msg = format!(
                    "{} changed while it was being sent (chunk {i} differs from when it was queued): queue it again",
                    source.display()
                );
                let _ = put(
                    &mut w,
                    Frame::Failed(transfer_wire::Failed {
                        code: codes::SOURCE_CHANGED,
                        message: msg.clone(),
                        retry_after_ms: 0,
                    }),
                )
                .await;
                let _ = w.get_mut().finish();
                return Err(TransferError::SourceChanged(msg));
            }
            // A chunk goes on a stream of its own (see `transfer_wire`). Opening one waits for the
            // receiver's stream credit, writing for flow control: a dead link shows up here.
            let stall_at =
                t0 + Duration::from_millis(heard.load(Ordering::Relaxed)) + opts.stall_timeout;
            // The whole chunk on one stream, or what the receiver lacks of it as pieces.
            let parts: Vec<(Vec<u8>, std::ops::Range<usize>)> = match partial.remove(&i) {
                Some(held) => held
                    .missing(len as u32)
                    .into_iter()
                    .map(|(s, e)| {
                        (
                            transfer_wire::piece_header(&manifest.file_hash, i, s).to_vec(),
                            s as usize..e as usize,
                        )
                    })
                    .collect(),
                None => vec![(
                    transfer_wire::chunk_header(&manifest.file_hash, i).to_vec(),
                    0..len,
                )],
            };
            let room = async {
                loop {
                    let st = conn.stats();
                    let limit = (st.path.cwnd as f64 * ahead_cwnds(&st)) as u64
                        + 2 * u64::from(manifest.chunk_size);
                    let freed = ahead_freed.notified();
                    if ahead.load(Ordering::Relaxed) < limit {
                        return;
                    }
                    tokio::select! {
                        _ = freed => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            };
            if tokio::time::timeout_at(stall_at.into(), room)
                .await
                .is_err()
            {
                warn!(
                    unacked = unacked.len(),
                    "Transfer stalled: giving up on this connection."
                );
                return Err(TransferError::Stalled(opts.stall_timeout));
            }
            let mut sent_now = 0u64;
            let write = async {
                for (header, range) in &parts {
                    let mut s = conn.open_uni().await?;
                    let _ = s.set_priority(chunk_priority(priority, chunks_opened));
                    s.write_all(header)
                        .await
                        .map_err(|e| TransferError::Stream(e.to_string()))?;
                    s.write_all(&chunk[range.clone()])
                        .await
                        .map_err(|e| TransferError::Stream(e.to_string()))?;
                    let _ = s.finish();
                    sent_now += range.len() as u64;
                    let bytes = (header.len() + range.len()) as u64;
                    ahead.fetch_add(bytes, Ordering::Relaxed);
                    let (acked_by_quic, ahead, freed) =
                        (s.stopped(), ahead.clone(), ahead_freed.clone());
                    tokio::spawn(async move {
                        // All of it acknowledged, or the connection gone: either way no longer
                        // waiting in this connection's buffers.
                        let _ = acked_by_quic.await;
                        ahead.fetch_sub(bytes, Ordering::Relaxed);
                        freed.notify_waiters();
                    });
                }
                Ok::<_, TransferError>(())
            };
            match tokio::time::timeout_at(stall_at.into(), write).await {
                Ok(r) => r?,
                Err(_) => {
                    warn!(
                        unacked = unacked.len(),
                        "Transfer stalled: giving up on this connection."
                    );
                    return Err(TransferError::Stalled(opts.stall_timeout));
                }
            }
            unacked.insert(i);
            chunks_opened = chunks_opened.wrapping_add(1);
            progress.sent_bytes.fetch_add(sent_now, Ordering::Relaxed);
            continue;
        }
        // Everything sent: wait for acknowledgements, resend requests, or the receipt.
        if !progress.handed.swap(true, Ordering::Relaxed) {
            progress.handed_now.notify_waiters();
        }
        if shown.take().is_some() {
            debug!(
                ms = t0.elapsed().as_millis() as u64,
                "Every chunk handed to QUIC."
            );
        }
        let wait = opts.stall_timeout.saturating_sub(last_heard.elapsed());
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(f)) => {
                last_heard = Instant::now();
                if let Some(done) =
                    handle(f, manifest, &mut acked, &mut unacked, &mut queue, progress)?
                {
                    return Ok(SendOutcome::Delivered(done));
                }
            }
            Ok(None) => return Err(TransferError::Stream("receiver went away".into())),
            Err(_) => {
                warn!(
                    unacked = unacked.len(),
                    "Transfer stalled: giving up on this connection."
                );
                return Err(TransferError::Stalled(opts.stall_timeout));
            }
        }
    }
}

fn handle(
    f: Result<Option<Frame>, TransferError>,
    manifest: &Manifest,
    acked: &mut Bitmap,
    unacked: &mut std::collections::HashSet<u32>,
    queue: &mut std::collections::VecDeque<u32>,
    progress: &Progress,
) -> Result<Option<Receipt>, TransferError> {
    match f? {
        Some(Frame::Acked(a)) => {
            mark_acked(a.chunks.into_iter(), manifest, acked, unacked, progress);
            Ok(None)
        }
        Some(Frame::Have(h)) => {
            // The answer to an optimistic start: skip what the receiver already holds.
            let have = Bitmap::from_bytes(&h.verified, manifest.chunk_count());
            let held = (0..manifest.chunk_count()).filter(|i| have.get(*i));
            mark_acked(held, manifest, acked, unacked, progress);
            Ok(None)
        }
        Some(Frame::Resend(r)) => {
            warn!(chunk = r.chunk, reason = %r.reason, "Receiver asks for a chunk again.");
            if r.chunk < manifest.chunk_count() {
                queue.push_front(r.chunk);
            }
            Ok(None)
        }
        Some(Frame::Done(receipt)) => {
            if receipt.file_hash != manifest.id_hex() {
                return Err(TransferError::Protocol("receipt for another file".into()));
            }
            Ok(Some(receipt))
        }
        Some(Frame::Failed(f)) => Err(failed(f)),
        Some(other) => Err(TransferError::Protocol(format!(
            "unexpected {} from the receiver",
            other.kind()
        ))),
        None => Err(TransferError::Stream("receiver ended the stream".into())),
    }
}

/// Records chunks the receiver holds durably.
fn mark_acked(
    chunks: impl Iterator<Item = u32>,
    manifest: &Manifest,
    acked: &mut Bitmap,
    unacked: &mut std::collections::HashSet<u32>,
    progress: &Progress,
) {
    progress.accepted.store(true, Ordering::Relaxed);
    for i in chunks {
        unacked.remove(&i);
        if acked.set(i) {
            progress.acked_chunks.fetch_add(1, Ordering::Relaxed);
            progress
                .acked_bytes
                .fetch_add(manifest.chunk_len(i) as u64, Ordering::Relaxed);
        }
    }
}

fn failed(f: transfer_wire::Failed) -> TransferError {
    if f.retry_after_ms > 0 {
        TransferError::Paused {
            code: f.code,
            message: f.message,
            retry_after_ms: f.retry_after_ms,
        }
    } else {
        TransferError::Refused {
            code: f.code,
            message: f.message,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
