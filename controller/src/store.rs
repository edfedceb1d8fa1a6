//! Durable state in sled: each site's history (keyed by site, sample time and sequence number,
//! so storing a report twice writes the same key: exactly once by construction), the
//! acknowledged sequence ranges per site, and the alarm log. A site's latest report is the last
//! entry of its history.
//!
//! Durability: an acknowledgement is sent only after the write is flushed. One sled insert per
//! report; the flusher (group commit) wakes when something was written, waits
//! [`FLUSH_COALESCE`] for more, writes the changed sequence states, flushes, and publishes the
//! epoch it made durable. Acknowledgements therefore leave within a few milliseconds, in the
//! same packet as QUIC's own ACK of the report.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_proto::{Message, Report, SeqRange};
use tokio::sync::watch;

pub const FLUSH_COALESCE: Duration = Duration::from_millis(15);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record in {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
}

/// Which sequence numbers of a site are stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqState {
    /// Every sequence number up to this one is stored.
    pub acked_through: u64,
    /// Disjoint, sorted ranges above `acked_through + 1`.
    pub ranges: Vec<(u64, u64)>,
}

impl SeqState {
    /// Whether every number in `r` is already stored.
    pub fn covers(&self, r: SeqRange) -> bool {
        r.last <= self.acked_through
            || self
                .ranges
                .iter()
                .any(|&(a, b)| a <= r.first && r.last <= b)
    }

    pub fn add(&mut self, r: SeqRange) {
        let (mut first, mut last) = (r.first, r.last);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b + 1 < first || last + 1 < a {
                out.push((a, b));
            } else {
                first = first.min(a);
                last = last.max(b);
            }
        }
        out.push((first, last));
        out.sort_unstable();
        self.ranges = out;
        while let Some(&(a, b)) = self.ranges.first() {
            if a <= self.acked_through + 1 {
                self.acked_through = self.acked_through.max(b);
                self.ranges.remove(0);
            } else {
                break;
            }
        }
    }

    pub fn to_ranges(&self) -> Vec<SeqRange> {
        self.ranges
            .iter()
            .map(|&(first, last)| SeqRange { first, last })
            .collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AlarmEvent {
    pub at_ms: i64,
    pub site_id: String,
    pub province: String,
    pub alarm: String,
    /// `raised` or `cleared`.
    pub state: String,
    pub detail: String,
}

#[derive(Default)]
struct Wake {
    dirty: bool,
    stop: bool,
}

/// The committer thread; [`Committer::stop`] (or dropping it) makes the last flush and joins it.
pub struct Committer {
    store: Arc<Store>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.store
                .wake
                .lock()
                .expect("committer lock poisoned")
                .stop = true;
            self.store.wake_cv.notify_one();
            let _ = thread.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Store {
    db: sled::Db,
    history: sled::Tree,
    seqs: sled::Tree,
    /// Sites whose sequence state changed since the last flush.
    seq_dirty: Mutex<std::collections::HashSet<String>>,
    wake: Mutex<Wake>,
    wake_cv: std::sync::Condvar,
    flushes: AtomicU64,
    alarms: sled::Tree,
    seq_cache: Mutex<HashMap<String, SeqState>>,
    write_epoch: AtomicU64,
    /// Set by every write (and every duplicate awaiting its acknowledgement).
    dirty: std::sync::atomic::AtomicBool,
    flushed: watch::Sender<u64>,
}

fn history_key(site: &str, taken_ms: i64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + 17);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(&(taken_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn site_prefix(site: &str) -> Vec<u8> {
    let mut k = site.as_bytes().to_vec();
    k.push(0);
    k
}

fn corrupt(tree: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree,
        message: e.to_string(),
    }
}

impl Store {
    pub fn open(db: &sled::Db) -> Result<Arc<Store>, StoreError> {
        let (flushed, _) = watch::channel(0);
        Ok(Arc::new(Store {
            history: db.open_tree("history")?,
            seqs: db.open_tree("seqs")?,
            seq_dirty: Mutex::new(Default::default()),
            wake: Mutex::new(Wake::default()),
            wake_cv: std::sync::Condvar::new(),
            flushes: AtomicU64::new(0),
            alarms: db.open_tree("alarms")?,
            db: db.clone(),
            seq_cache: Mutex::new(HashMap::new()),
            write_epoch: AtomicU64::new(1),
            dirty: std::sync::atomic::AtomicBool::new(false),
            flushed,
        }))
    }

    pub fn seq_state(&self, site: &str) -> Result<SeqState, StoreError> {
        let mut cache = self.seq_cache.lock().expect("seq cache poisoned");
        Ok(self.cached_seq_state(&mut cache, site)?.clone())
    }

    /// The cached sequence state of `site`, loaded from disk on first use.
    fn cached_seq_state<'a>(
        &self,
        cache: &'a mut HashMap<String, SeqState>,
        site: &str,
    ) -> Result<&'a mut SeqState, StoreError> {
        if !cache.contains_key(site) {
            let s = match self.seqs.get(site.as_bytes())? {
                Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("seqs", e))?,
                None => SeqState::default(),
            };
            cache.insert(site.to_string(), s);
        }
        Ok(cache.get_mut(site).expect("inserted above"))
    }

    /// Stores a report unless every sequence number it covers is stored already. Returns
    /// whether it was new, and the write epoch to wait for before acknowledging.
    pub fn ingest(&self, site: &str, report: &Report) -> Result<(bool, u64), StoreError> {
        let range = report.range();
        {
            let mut cache = self.seq_cache.lock().expect("seq cache poisoned");
            let state = self.cached_seq_state(&mut cache, site)?;
            if state.covers(range) {
                drop(cache);
                // Acknowledged at the next flush like any other report.
                self.mark_dirty();
                return Ok((false, self.write_epoch.load(Ordering::Acquire)));
            }
            // The insert happens under the cache lock, so that two sessions of one site (an
            // old connection not yet closed, a new one) cannot both store a sequence number.
            self.history.insert(
                history_key(site, report.taken_ms, report.seq),
                report.encode_to_vec(),
            )?;
            state.add(range);
        }
        {
            let mut dirty = self.seq_dirty.lock().expect("seq dirty poisoned");
            if !dirty.contains(site) {
                dirty.insert(site.to_string());
            }
        }
        self.mark_dirty();
        Ok((true, self.write_epoch.load(Ordering::Acquire)))
    }

    fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
        let mut w = self.wake.lock().expect("committer lock poisoned");
        if !w.dirty {
            // Only the first write of a commit window wakes the committer.
            w.dirty = true;
            self.wake_cv.notify_one();
        }
    }

    /// Writes the sequence states changed since the last call.
    fn persist_seq_states(&self) -> Result<(), StoreError> {
        let sites: Vec<String> = self
            .seq_dirty
            .lock()
            .expect("seq dirty poisoned")
            .drain()
            .collect();
        if sites.is_empty() {
            return Ok(());
        }
        // Plain inserts, not a `sled::Batch`: each site's state is one key, so nothing needs
        // the batch's atomicity, and sled routes every later read and write of the database
        // through a global lock once any batch or transaction has been used.
        let states: Vec<(String, Vec<u8>)> = {
            let cache = self.seq_cache.lock().expect("seq cache poisoned");
            sites
                .into_iter()
                .filter_map(|site| {
                    let st = cache.get(&site)?;
                    Some(serde_json::to_vec(st).map(|v| (site, v)))
                })
                .collect::<Result<_, _>>()
                .map_err(|e| corrupt("seqs", e))?
        };
        for (site, v) in states {
            self.seqs.insert(site.as_bytes(), v)?;
        }
        Ok(())
    }

    pub fn subscribe_flushed(&self) -> watch::Receiver<u64> {
        self.flushed.subscribe()
    }

    /// Flushes now and publishes the epoch made durable. Does nothing when nothing was
    /// written since the last flush. Blocks: call it from the committer thread or at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let epoch = self.write_epoch.fetch_add(1, Ordering::AcqRel);
        // Sequence states first: an acknowledged report's state is durable with it.
        self.persist_seq_states()?;
        self.db.flush()?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flushed.send_replace(epoch);
        Ok(())
    }

    /// Group commits made so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Starts the committer: a thread of its own that waits for a write, lets
    /// [`FLUSH_COALESCE`] pass for more, and flushes (group commit). A plain thread rather than
    /// a task: the flush blocks, and a thread that sleeps on its own condition variable costs
    /// one wake-up per commit instead of a timer, a blocking-pool hand-off and a wake back.
    /// [`Committer::stop`] makes a last flush.
    pub fn start_committer(self: &Arc<Self>) -> std::io::Result<Committer> {
        let store = self.clone();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                loop {
                    let stopping = {
                        let mut w = store.wake.lock().expect("committer lock poisoned");
                        while !w.dirty && !w.stop {
                            w = store.wake_cv.wait(w).expect("committer lock poisoned");
                        }
                        w.dirty = false;
                        w.stop
                    };
                    if !stopping {
                        std::thread::sleep(FLUSH_COALESCE);
                    }
                    if let Err(error) = store.flush() {
                        tracing::error!(%error, "Flushing the store failed; acknowledgements are held back.");
                        // Keep what was written marked so the next round tries again.
                        store.dirty.store(true, Ordering::Release);
                        if !stopping {
                            std::thread::sleep(Duration::from_millis(500));
                            store.mark_dirty();
                        }
                    }
                    if stopping {
                        break;
                    }
                }
            })?;
        Ok(Committer {
            store: self.clone(),
            thread: Some(thread),
        })
    }

    /// Reports of `site` taken in `[from_ms, to_ms]`, oldest first, at most `limit`.
    pub fn history(
        &self,
        site: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Report>, StoreError> {
        let start = history_key(site, from_ms, 0);
        let end = history_key(site, to_ms, u64::MAX);
        let mut out = Vec::new();
        for kv in self.history.range(start..=end).take(limit) {
            let (_, v) = kv?;
            out.push(Report::decode(v.as_ref()).map_err(|e| corrupt("history", e))?);
        }
        Ok(out)
    }

    /// Every stored history entry, all sites (a full scan).
    pub fn history_entries(&self) -> u64 {
        self.history.len() as u64
    }

    pub fn history_len(&self, site: &str) -> usize {
        self.history.scan_prefix(site_prefix(site)).count()
    }

    /// A site's latest report: the last entry of its history.
    pub fn latest(&self, site: &str) -> Result<Option<Report>, StoreError> {
        match self.history.scan_prefix(site_prefix(site)).next_back() {
            Some(kv) => {
                let (_, v) = kv?;
                Ok(Some(
                    Report::decode(v.as_ref()).map_err(|e| corrupt("history", e))?,
                ))
            }
            None => Ok(None),
        }
    }

    /// Deletes `site`'s history older than `cutoff_ms`; returns how many reports went.
    pub fn prune(&self, site: &str, cutoff_ms: i64) -> Result<usize, StoreError> {
        let start = history_key(site, 0, 0);
        let end = history_key(site, cutoff_ms, 0);
        let mut n = 0;
        for kv in self.history.range(start..end) {
            let (k, _) = kv?;
            self.history.remove(k)?;
            n += 1;
        }
        Ok(n)
    }

    pub fn append_alarm(&self, ev: &AlarmEvent) -> Result<(), StoreError> {
        let id = self.db.generate_id()?;
        let mut k = (ev.at_ms.max(0) as u64).to_be_bytes().to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        self.alarms
            .insert(k, serde_json::to_vec(ev).map_err(|e| corrupt("alarms", e))?)?;
        Ok(())
    }

    /// Alarm events since `since_ms`, newest last, at most `limit` (the newest ones).
    pub fn alarms(&self, since_ms: i64, limit: usize) -> Result<Vec<AlarmEvent>, StoreError> {
        let start = (since_ms.max(0) as u64).to_be_bytes().to_vec();
        let mut out = Vec::new();
        for kv in self.alarms.range(start..).rev().take(limit) {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| corrupt("alarms", e))?);
        }
        out.reverse();
        Ok(out)
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u64, last: u64) -> SeqRange {
        SeqRange { first, last }
    }

    #[test]
    fn seq_state_tracks_current_first_then_backlog() {
        let mut s = SeqState::default();
        // Current state (seq 100) arrives first, then the backlog 1..=99 in order.
        s.add(r(100, 100));
        assert_eq!(s.acked_through, 0);
        assert!(s.covers(r(100, 100)));
        for i in 1..=99 {
            assert!(!s.covers(r(i, i)));
            s.add(r(i, i));
        }
        assert_eq!(s.acked_through, 100);
        assert!(s.ranges.is_empty());
        // A downsampled range.
        s.add(r(105, 110));
        s.add(r(101, 104));
        assert_eq!((s.acked_through, s.ranges.len()), (110, 0));
        assert!(s.covers(r(50, 60)));
        assert!(!s.covers(r(110, 111)));
    }

    #[test]
    fn ingest_is_exactly_once_and_history_is_ordered_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = Store::open(&db).unwrap();
        let rep = |seq: u64| Report {
            seq,
            taken_ms: 1_000 * seq as i64,
            ..Default::default()
        };
        assert!(store.ingest("a", &rep(3)).unwrap().0);
        assert!(store.ingest("a", &rep(1)).unwrap().0);
        assert!(!store.ingest("a", &rep(3)).unwrap().0);
        assert!(store.ingest("a", &rep(2)).unwrap().0);
        assert!(!store.ingest("a", &rep(1)).unwrap().0);
        let h: Vec<u64> = store
            .history("a", 0, i64::MAX, 100)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(h, vec![1, 2, 3]);
        assert_eq!(store.seq_state("a").unwrap().acked_through, 3);
        assert_eq!(store.latest("a").unwrap().unwrap().seq, 3);
        assert!(store.latest("b").unwrap().is_none());
        assert_eq!(store.prune("a", 2_000).unwrap(), 1);
        assert_eq!(store.history_len("a"), 2);
        assert_eq!(store.history_len("b"), 0);
    }
}
