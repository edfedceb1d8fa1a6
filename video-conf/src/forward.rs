//! Moving groups between a [`Track`] and a QUIC connection, both ways. The relay, the
//! publishing client and cascaded relays all use these two functions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::conference_wire::{GROUP_HEADER_LEN, GroupHeader, OBJECT_HEADER_LEN, codes};
use crate::fec::{self, GroupRecv};
use crate::io::{self, IoError};
use crate::policy;
use crate::track::{Fetch, Group, Track};

/// What one sender did (shared with whoever reports on it); counts go to the parent too
/// (a subscription's to its relay's).
#[derive(Debug, Default)]
pub struct SendStats {
    pub groups_sent: AtomicU64,
    /// Groups reset before they were delivered (a newer group replaced them).
    pub groups_dropped: AtomicU64,
    pub objects_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Repair datagrams sent ([`crate::fec`]), and their bytes.
    pub repairs_sent: AtomicU64,
    pub repair_bytes_sent: AtomicU64,
    pub parent: Option<Arc<SendStats>>,
}

impl SendStats {
    pub fn child(parent: &Arc<SendStats>) -> Arc<SendStats> {
        Arc::new(SendStats {
            parent: Some(parent.clone()),
            ..Default::default()
        })
    }

    pub fn dropped(&self) -> u64 {
        self.groups_dropped.load(Ordering::Relaxed)
    }

    fn each(&self, f: &dyn Fn(&SendStats)) {
        f(self);
        if let Some(p) = &self.parent {
            p.each(f);
        }
    }

    fn object(&self, bytes: usize) {
        self.each(&|s| {
            s.objects_sent.fetch_add(1, Ordering::Relaxed);
            s.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        });
    }

    fn repairs(&self, n: usize, bytes: usize) {
        self.each(&|s| {
            s.repairs_sent.fetch_add(n as u64, Ordering::Relaxed);
            s.repair_bytes_sent
                .fetch_add(bytes as u64, Ordering::Relaxed);
        });
    }

    fn group_sent(&self) {
        self.each(&|s| {
            s.groups_sent.fetch_add(1, Ordering::Relaxed);
        });
    }

    fn group_dropped(&self) {
        self.each(&|s| {
            s.groups_dropped.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Groups of one track on one connection not yet fully acknowledged: sequence → (its
/// writer's stop signal, whether all of it has been handed to QUIC); and when the newest
/// started.
#[derive(Default)]
pub struct Flights {
    groups: BTreeMap<u64, (CancellationToken, Arc<AtomicBool>)>,
    last_start: Option<std::time::Instant>,
}

type InFlight = Arc<Mutex<Flights>>;

/// Stops every group still in flight (a rendition switch, the end of a subscription).
pub fn cancel_all(flights: &InFlight) {
    let groups = std::mem::take(&mut flights.lock().expect("in-flight lock poisoned").groups);
    for (_, (stop, _)) in groups {
        stop.cancel();
    }
}

/// Sends a block's repair datagrams a moment after its data: queued at once they would share
/// a packet with the data they repair, and be lost with it.
fn send_repairs(conn: &quinn::Connection, stats: &SendStats, repairs: Vec<fec::Repair>) {
    send_repairs_after(conn, stats, repairs, std::time::Duration::ZERO);
}

/// The two repairs of a group stream's header go this far apart.
const HEADER_REPAIR_SPACING: std::time::Duration = std::time::Duration::from_millis(30);

fn send_repairs_after(
    conn: &quinn::Connection,
    stats: &SendStats,
    repairs: Vec<fec::Repair>,
    extra: std::time::Duration,
) {
    if repairs.is_empty() {
        return;
    }
    let datagrams: Vec<_> = repairs.iter().map(|r| r.encode()).collect();
    stats.repairs(datagrams.len(), datagrams.iter().map(|d| d.len()).sum());
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::time::sleep(fec::REPAIR_DELAY + extra).await;
        for d in datagrams {
            if let Err(e) = conn.send_datagram(d) {
                debug!(error = %e, "Repair datagram not sent.");
                return;
            }
        }
    });
}

/// A group reset by a newer one (or ended upstream), with the path's state: why a group was
/// still unacknowledged `written_ago` after its last byte was written (None: not all written).
fn log_reset(
    conn: &quinn::Connection,
    kind: &str,
    seq: u64,
    written_ago: Option<std::time::Duration>,
) {
    let p = conn.stats().path;
    debug!(
        kind,
        group = seq,
        written_ms_ago = written_ago.map(|d| d.as_millis() as u64),
        rtt_ms = p.rtt.as_millis() as u64,
        cwnd = p.cwnd,
        lost_packets = p.lost_packets,
        congestion_events = p.congestion_events,
        "Group reset: a newer one started, or it ended upstream."
    );
}

/// Sends `group` on a new unidirectional stream as track `id`, objects as they arrive, and
/// waits for the peer to have it all. Returns false if it was dropped or failed. With repair
/// wanted: the group's blocks ([`Group::repair_blocks`], shared by every subscriber), as many
/// symbols of each as this path's loss needs, once this stream has carried the block.
#[allow(clippy::too_many_arguments)]
async fn send_group(
    conn: &quinn::Connection,
    id: u32,
    kind: &str,
    group: Arc<Group>,
    stats: &SendStats,
    stop: CancellationToken,
    written: &AtomicBool,
    fec: &fec::Wish,
) -> bool {
    let mut s = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "Cannot open a group stream.");
            return false;
        }
    };
    let _ = s.set_priority(policy::group_priority(kind, group.seq));
    let repair = fec.wanted(conn);
    let sid: u64 = s.id().into();
    let eps = fec::odds(kind);
    let base = GROUP_HEADER_LEN as u64;
    // Blocks sent so far; object bytes written so far.
    let mut sent = 0usize;
    let mut carried = 0u64;
    // Sends the repairs of the blocks this stream has carried; returns when the group's open
    // block is due to close.
    let mut repairs_through = |carried: u64, ended: bool| {
        let (blocks, due) = group.repair_blocks(eps);
        let loss = fec.loss(conn);
        let mut out = Vec::new();
        while let Some(b) = blocks.get(sent)
            && b.start + u64::from(b.len) <= carried
        {
            out.extend(b.repairs(sid, base, b.needed(loss, eps)));
            sent += 1;
        }
        // The group ended on a block closed before: its end travels alone.
        if ended && !blocks.last().is_some_and(|b| b.last) {
            out.push(fec::Repair::end(sid, base + carried));
        }
        send_repairs(conn, stats, out);
        due
    };
    let write = async {
        let header = GroupHeader {
            track: id,
            group: group.seq,
        }
        .encode();
        // The header goes out with the first objects: a relay starts a group when the
        // header arrives from upstream, before its keyframe has, and a header written at
        // once would cost each subscriber a packet (and an acknowledgement) of its own.
        let mut header = Some(Bytes::copy_from_slice(&header));
        let mut next = 0;
        // With repair: the open block closes when it is old enough, objects or not.
        let mut due: Option<std::time::Instant> = None;
        loop {
            let fetched = match due {
                Some(d) => tokio::select! {
                    f = group.next_from(next) => Some(f),
                    _ = tokio::time::sleep_until(d.into()) => None,
                },
                None => Some(group.next_from(next).await),
            };
            match fetched {
                None => {}
                Some(Fetch::Objects(objs)) => {
                    let prefix = header.take();
                    if let (true, Some(h)) = (repair, &prefix) {
                        // Apart, so that one lost packet does not take both.
                        for (i, r) in fec::header_repairs(sid, h).into_iter().enumerate() {
                            send_repairs_after(
                                conn,
                                stats,
                                vec![r],
                                HEADER_REPAIR_SPACING * i as u32,
                            );
                        }
                    }
                    io::write_objects(&mut s, prefix, &objs).await?;
                    for o in &objs {
                        stats.object(o.payload.len());
                        carried += (OBJECT_HEADER_LEN + o.payload.len()) as u64;
                    }
                    next += objs.len();
                }
                Some(Fetch::End) => {
                    if let Some(h) = header.take() {
                        s.write_all(&h)
                            .await
                            .map_err(|e| IoError::Stream(e.to_string()))?;
                    }
                    if repair {
                        repairs_through(carried, true);
                    }
                    return Ok::<(), IoError>(());
                }
                // Dropped upstream: dropped here too, not passed on as complete.
                Some(Fetch::Aborted) => return Err(IoError::Ended),
            }
            if repair {
                due = repairs_through(carried, false);
            }
        }
    };
    let result = tokio::select! {
        r = write => r,
        _ = stop.cancelled() => Err(IoError::Ended),
    };
    match result {
        Ok(()) => {
            let _ = s.finish();
            written.store(true, Ordering::Release);
        }
        Err(IoError::Ended) => {
            let _ = s.reset(codes::SUPERSEDED.into());
            stats.group_dropped();
            log_reset(conn, kind, group.seq, None);
            return false;
        }
        Err(e) => {
            debug!(error = %e, group = group.seq, "Group stream failed.");
            return false;
        }
    }
    // Written: it stays "in flight" (and may still be dropped) until the peer has it all.
    let written_at = std::time::Instant::now();
    tokio::select! {
        r = s.stopped() => matches!(r, Ok(None)),
        _ = stop.cancelled() => {
            let _ = s.reset(codes::SUPERSEDED.into());
            stats.group_dropped();
            log_reset(conn, kind, group.seq, Some(written_at.elapsed()));
            false
        }
    }
}

/// Starts sending `group`, first dropping the older groups still in flight beyond
/// [`policy::MAX_GROUPS_IN_FLIGHT`].
pub fn start_group(
    conn: &quinn::Connection,
    id: u32,
    kind: &str,
    group: Arc<Group>,
    stats: &Arc<SendStats>,
    in_flight: &InFlight,
    fec: &Arc<fec::Wish>,
) {
    let seq = group.seq;
    let stop = CancellationToken::new();
    let written = Arc::new(AtomicBool::new(false));
    {
        let mut f = in_flight.lock().expect("in-flight lock poisoned");
        let now = std::time::Instant::now();
        let spacing = f.last_start.replace(now).map(|t| now - t);
        let extra = policy::extra_in_flight(fec.min_rtt(conn), spacing);
        let seqs: Vec<u64> = f.groups.keys().copied().collect();
        for old in policy::groups_to_drop(&seqs, seq, extra) {
            if let Some((stop, _)) = f.groups.remove(&old) {
                stop.cancel();
            }
        }
        f.groups.insert(seq, (stop.clone(), written.clone()));
    }
    let (conn, kind, stats, in_flight, fec) = (
        conn.clone(),
        kind.to_string(),
        stats.clone(),
        in_flight.clone(),
        fec.clone(),
    );
    tokio::spawn(async move {
        if send_group(&conn, id, &kind, group, &stats, stop, &written, &fec).await {
            stats.group_sent();
        }
        in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .groups
            .remove(&seq);
    });
}

/// A new in-flight set for one track on one connection.
pub fn in_flight() -> InFlight {
    Arc::default()
}

/// Sends `track` to `conn` as track `id`: its current group at once (a late joiner starts at
/// the latest keyframe), then every new group, until the track ends or `cancel` fires.
pub async fn send_track(
    conn: &quinn::Connection,
    track: &Track,
    id: u32,
    stats: &Arc<SendStats>,
    cancel: &CancellationToken,
    fec: &Arc<fec::Wish>,
) {
    let mut rx = track.subscribe();
    let flights = in_flight();
    loop {
        let group = tokio::select! {
            g = crate::track::next_group(track, &mut rx, cancel) => g,
            _ = conn.closed() => None,
        };
        let Some(group) = group else { break };
        start_group(conn, id, &track.info.kind, group, stats, &flights, fec);
    }
    cancel_all(&flights);
}

/// What one group stream brought.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    pub objects: u64,
    pub bytes: u64,
    /// Media time of its last object (µs).
    pub last_pts: i64,
}

/// Reads one incoming group stream into `track` (the caller found the track from the
/// header). A group older than the track's current one is refused (live beats complete)
/// unless it is one of the few recent ones the track holds ([`Track::late_group`]). A
/// stream reset or broken half-way leaves the group aborted (forwarded as dropped).
pub async fn receive_group(
    mut recv: GroupRecv,
    header: GroupHeader,
    track: &Track,
) -> Result<Received, IoError> {
    let group = if track.current().is_some_and(|g| g.seq >= header.group) {
        // Its start arrived after a newer group's (its first packet was lost): kept for
        // in-order readers if it is recent, else refused.
        match track.late_group(header.group) {
            Some(g) => {
                debug!(
                    group = header.group,
                    "A group's start came after a newer one's: held."
                );
                g
            }
            None => {
                debug!(
                    group = header.group,
                    "A group's start came after a newer one's: too old."
                );
                recv.stop(codes::SUPERSEDED);
                return Ok(Received::default());
            }
        }
    } else {
        track.start_group(header.group)
    };
    let mut n = Received::default();
    let out = loop {
        match io::read_object(&mut recv).await {
            Ok(Some(o)) => {
                n.objects += 1;
                n.bytes += o.payload.len() as u64;
                n.last_pts = o.pts_us;
                group.push(o);
            }
            Ok(None) => break Ok(n),
            Err(e) => {
                recv.stop(e.code());
                break Err(e);
            }
        }
    };
    match out {
        Ok(_) => group.finish(),
        Err(_) => group.abort(),
    }
    out
}
