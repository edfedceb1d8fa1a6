//! The primary's replication log: every change of the replicated state, numbered, stamped and
//! hash-chained, kept in a ring bounded in bytes. A standby that falls further behind than the
//! ring reaches starts again from a snapshot (as a Redis replica does past its backlog).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::watch;

use super::wire::{self, Change, Item};

/// What the ring keeps at most (encoded items): at 2,000 sites reporting every 10 s (~1 KB a
/// report) about ten minutes of history.
pub const RING_BYTES: usize = 128 << 20;
/// What the ring keeps while no standby follows, nor has for [`FOLLOWER_GRACE_MS`]: a standby
/// that comes after that starts from a snapshot anyway (at 20,000 sites the full ring is a
/// minute of reports, and 128 MB of a controller's memory budget for no one; issue 22).
pub const IDLE_RING_BYTES: usize = 8 << 20;
/// How long after its last standby went the ring stays full size, for that standby's return
/// (a restart, a short link cut) to resume rather than take a snapshot.
pub const FOLLOWER_GRACE_MS: i64 = 10 * 60 * 1000;

pub struct Entry {
    pub seq: u64,
    pub hash: [u8; 32],
    pub at_ms: i64,
    pub item: Vec<u8>,
}

struct Inner {
    /// The sequence number the next record gets.
    next: u64,
    /// The chain hash of the last record (the genesis before the first).
    hash: [u8; 32],
    ring: VecDeque<Arc<Entry>>,
    bytes: usize,
}

pub struct Log {
    pub run: u64,
    inner: Mutex<Inner>,
    tip: watch::Sender<u64>,
    cap: usize,
    /// Standbys following now.
    following: AtomicUsize,
    /// When the last one stopped following (0: none ever did).
    unfollowed_ms: AtomicI64,
}

/// Records from a position the ring no longer holds.
#[derive(Debug)]
pub struct Gone;

impl Log {
    pub fn new(run: u64, cap: usize) -> Arc<Log> {
        Arc::new(Log {
            run,
            inner: Mutex::new(Inner {
                next: 1,
                hash: wire::genesis(run),
                ring: VecDeque::new(),
                bytes: 0,
            }),
            tip: watch::channel(0).0,
            cap,
            following: AtomicUsize::new(0),
            unfollowed_ms: AtomicI64::new(0),
        })
    }

    /// A standby starts following (`true`) or stops (`false`).
    pub fn set_following(&self, yes: bool) {
        if yes {
            self.following.fetch_add(1, Ordering::Relaxed);
        } else {
            self.following.fetch_sub(1, Ordering::Relaxed);
            self.unfollowed_ms.store(crate::now_ms(), Ordering::Relaxed);
        }
    }

    /// The ring's bound now: [`Log::new`]'s while a standby follows or may come back,
    /// else [`IDLE_RING_BYTES`] at most.
    fn cap_now(&self, now_ms: i64) -> usize {
        let gone = self.unfollowed_ms.load(Ordering::Relaxed);
        if self.following.load(Ordering::Relaxed) > 0
            || (gone > 0 && now_ms - gone < FOLLOWER_GRACE_MS)
        {
            self.cap
        } else {
            self.cap.min(IDLE_RING_BYTES)
        }
    }

    /// Appends a change; returns its sequence number.
    pub fn push(&self, change: Change) -> u64 {
        let item = Item {
            change: Some(change),
        }
        .encode_to_vec();
        let at_ms = crate::now_ms();
        let seq = {
            let mut g = self.inner.lock().expect("replication log poisoned");
            let seq = g.next;
            let hash = wire::chain(&g.hash, seq, &item);
            g.next += 1;
            g.hash = hash;
            g.bytes += item.len();
            g.ring.push_back(Arc::new(Entry {
                seq,
                hash,
                at_ms,
                item,
            }));
            // At most a few records go per push beyond the one that makes room: when the
            // bound drops (the last standby's grace ends), the ring shrinks over the next
            // pushes rather than in one long hold of the lock on the ingest path.
            let cap = self.cap_now(at_ms);
            let mut dropped = 0;
            while g.bytes > cap && g.ring.len() > 1 && dropped < 64 {
                let e = g.ring.pop_front().expect("ring not empty");
                g.bytes -= e.item.len();
                dropped += 1;
            }
            seq
        };
        self.tip.send_replace(seq);
        seq
    }

    /// The next sequence number and the chain hash before it: where a snapshot taken now
    /// continues.
    pub fn position(&self) -> (u64, [u8; 32]) {
        let g = self.inner.lock().expect("replication log poisoned");
        (g.next, g.hash)
    }

    /// The chain hash before `seq`, if the ring can still continue from there.
    pub fn hash_before(&self, seq: u64) -> Option<[u8; 32]> {
        let g = self.inner.lock().expect("replication log poisoned");
        if seq == g.next {
            return Some(g.hash);
        }
        if seq == 1 {
            return (g.ring.front().map(|e| e.seq) == Some(1)).then(|| wire::genesis(self.run));
        }
        let first = g.ring.front()?.seq;
        if seq <= first || seq > g.next {
            return None;
        }
        Some(g.ring[(seq - 1 - first) as usize].hash)
    }

    /// Up to `limit` records from `seq` on (none when `seq` is the next to come).
    pub fn from(&self, seq: u64, limit: usize) -> Result<Vec<Arc<Entry>>, Gone> {
        let g = self.inner.lock().expect("replication log poisoned");
        if seq >= g.next {
            return Ok(Vec::new());
        }
        let first = g.ring.front().map(|e| e.seq).ok_or(Gone)?;
        if seq < first {
            return Err(Gone);
        }
        Ok(g.ring
            .iter()
            .skip((seq - first) as usize)
            .take(limit)
            .cloned()
            .collect())
    }

    /// When record `seq` was logged, if the ring still holds it.
    pub fn at_ms(&self, seq: u64) -> Option<i64> {
        let g = self.inner.lock().expect("replication log poisoned");
        let first = g.ring.front()?.seq;
        g.ring
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
            .map(|e| e.at_ms)
    }

    /// The newest sequence number, changing as records are logged.
    pub fn tip(&self) -> watch::Receiver<u64> {
        self.tip.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::wire::FileRec;

    fn file(n: usize) -> Change {
        Change::File(FileRec {
            name: "admin.token".into(),
            data: vec![7; n],
            mode: 0o600,
            remove: false,
        })
    }

    #[test]
    fn records_chain_and_the_ring_forgets_the_oldest_past_its_bound() {
        let log = Log::new(42, 10_000);
        assert_eq!(log.hash_before(1), Some(wire::genesis(42)));
        for i in 1..=30 {
            assert_eq!(log.push(file(1000)), i);
        }
        // ~1 KB each, 10 KB kept: the first records are gone.
        assert!(matches!(log.from(1, 10), Err(Gone)));
        assert_eq!(log.hash_before(1), None);
        let kept = log.from(25, 100).unwrap();
        assert_eq!(kept.first().unwrap().seq, 25);
        assert_eq!(kept.last().unwrap().seq, 30);
        assert!(log.from(31, 10).unwrap().is_empty());
        // Each hash follows from the one before (the ring's oldest record has no predecessor
        // left to continue from: a follower there takes a snapshot).
        let first = log.from(22, 100).unwrap().first().unwrap().seq;
        assert_eq!(log.hash_before(first), None);
        let mut prev = log.hash_before(first + 1).unwrap();
        for e in log.from(first + 1, 100).unwrap() {
            assert_eq!(e.hash, wire::chain(&prev, e.seq, &e.item));
            prev = e.hash;
        }
        assert_eq!(log.position(), (31, prev));
        assert_eq!(log.hash_before(31), Some(prev));
        assert!(log.at_ms(30).is_some());
        assert!(log.at_ms(1).is_none());
        assert_eq!(*log.tip().borrow(), 30);
    }

    #[test]
    fn the_ring_stays_small_while_no_standby_follows_and_grows_while_one_does() {
        let log = Log::new(7, 32 << 20);
        let held = |log: &Log| log.inner.lock().unwrap().bytes;
        for _ in 0..12 {
            log.push(file(1 << 20));
        }
        assert!(held(&log) <= IDLE_RING_BYTES, "{}", held(&log));
        log.set_following(true);
        for _ in 0..12 {
            log.push(file(1 << 20));
        }
        assert!(held(&log) > IDLE_RING_BYTES + (3 << 20), "{}", held(&log));
        // Gone a moment ago: the ring stays full size for its return.
        log.set_following(false);
        log.push(file(1 << 20));
        assert!(held(&log) > IDLE_RING_BYTES + (3 << 20));
        assert_eq!(
            log.cap_now(crate::now_ms() + FOLLOWER_GRACE_MS + 1),
            IDLE_RING_BYTES
        );
    }
}
