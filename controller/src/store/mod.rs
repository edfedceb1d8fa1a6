//! Durable state in sled: each site's history (keyed by site, sample time and sequence number,
//! so storing a report twice writes the same key: exactly once by construction), the
//! acknowledged sequence ranges per site, the alarm log, and each site's device events (the
//! traps and informs its devices sent, taken from its reports as they are stored: an index of
//! the history, so kept exactly once and made again from the write-ahead log like the reports
//! themselves). A site's latest report is the last entry of its history.
//!
//! Durability: an acknowledgement is sent only after the report is durable. One sled insert
//! and one record of the write-ahead log ([`crate::wal`]) per report; the committer (group
//! commit) wakes when something was written, waits [`FLUSH_COALESCE`] for more, appends the
//! records to the log with one `fdatasync`, and publishes the epoch it made durable.
//! Acknowledgements therefore leave within a few milliseconds, in the same packet as QUIC's
//! own ACK of the report. Every [`CHECKPOINT_EVERY`] (and at shutdown) the changed sequence
//! states are written, sled is flushed, and the log emptied; at start the log's records are
//! stored again (a no-op for those sled already had) before anything is acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_proto::{Message, Report, SeqRange};
use tokio::sync::watch;

/// The tree of the sites' device events.
pub const DEVICE_EVENTS_TREE: &str = "device_events";

pub const FLUSH_COALESCE: Duration = Duration::from_millis(15);
/// How often sled is flushed and the write-ahead log emptied (sooner if the log grows past
/// [`CHECKPOINT_BYTES`]).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
pub const CHECKPOINT_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record in {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
    #[error(transparent)]
    Log(#[from] crate::wal::WalError),
    /// A site whose stored sequence numbers would split into more than [`MAX_SEQ_RANGES`]
    /// pieces: no agent numbers its reports that way (its backlog arrives in order), a hostile
    /// one could grow the site's state without bound.
    #[error("site {0}: reports numbered with more than {MAX_SEQ_RANGES} gaps; refusing the report")]
    TooManyGaps(String),
}

/// Most disjoint ranges of stored sequence numbers a site may have above its contiguous
/// prefix (a real agent has a few: its newest report and the backlog still arriving).
pub const MAX_SEQ_RANGES: usize = 1024;

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

    /// Whether storing `r` would make more than [`MAX_SEQ_RANGES`] ranges.
    pub fn too_sparse_with(&self, r: SeqRange) -> bool {
        self.ranges.len() >= MAX_SEQ_RANGES
            && r.first > self.acked_through + 1
            && !self
                .ranges
                .iter()
                .any(|&(a, b)| !(b + 1 < r.first || r.last + 1 < a))
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

/// One thing a site's device said on its own (a trap or an inform its profile names), as it
/// is kept and listed: `link-down ×340` is one entry with `count` 340.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeviceEventEntry {
    pub device: String,
    /// The profile's name for it (`link-down`, `on-battery`).
    pub name: String,
    /// `info`, `warning`, `minor`, `major` or `critical`.
    pub severity: String,
    /// When the agent received it (site clock, Unix ms); the first of a summarised flood.
    pub at_ms: i64,
    /// How many like it arrived (more than 1: a flood the agent summarised).
    pub count: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// It came as an inform (acknowledged to the device), not a trap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inform: bool,
    /// The report that carried it.
    pub seq: u64,
}

/// The most device events kept per site (the oldest go first); older than the history's
/// retention, they go with it.
pub const DEVICE_EVENTS_PER_SITE: usize = 500;
/// The most events of one report that are kept (a merged report carries at most 128).
pub const DEVICE_EVENTS_PER_REPORT: usize = 256;

/// `s` without control characters, at most `max` characters.
fn clean(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

impl DeviceEventEntry {
    /// The entry of an event from a report (names and detail from the network: bounded, no
    /// control characters).
    pub fn from_wire(e: &tiandi_proto::DeviceEvent, seq: u64) -> DeviceEventEntry {
        DeviceEventEntry {
            device: clean(&e.device, 64),
            name: clean(&e.name, 64),
            severity: tiandi_proto::Severity::try_from(e.severity)
                .unwrap_or(tiandi_proto::Severity::Unknown)
                .as_str()
                .to_string(),
            at_ms: e.at_ms,
            count: e.count.max(1),
            detail: clean(&e.detail, 256),
            inform: e.inform,
            seq,
        }
    }

    /// How the console and logs name it: `link-down`, `link-down ×340`.
    pub fn title(&self) -> String {
        if self.count > 1 {
            format!("{} ×{}", self.name, self.count)
        } else {
            self.name.clone()
        }
    }
}

/// A device event's key: site, time, report, place in the report (the same event stored
/// again writes the same key).
fn event_key(site: &str, at_ms: i64, seq: u64, index: usize) -> Vec<u8> {
    let mut k = history_key(site, at_ms, seq);
    k.extend_from_slice(&(index as u32).to_be_bytes());
    k
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
    /// Each site's device events ([`DeviceEventEntry`]), by site and time.
    device_events: sled::Tree,
    seq_cache: Mutex<HashMap<String, SeqState>>,
    /// Records for the next commit, and the epoch they will be durable in (one lock, so that
    /// a report waits exactly for the commit that carries its record).
    pending: Mutex<Pending>,
    /// The write-ahead log (the committer's; replayed at open).
    wal: Mutex<crate::wal::Wal>,
    last_checkpoint: Mutex<std::time::Instant>,
    /// Something was written to sled since the last checkpoint.
    unsaved: std::sync::atomic::AtomicBool,
    /// Set by every write (and every duplicate awaiting its acknowledgement).
    dirty: std::sync::atomic::AtomicBool,
    flushed: watch::Sender<u64>,
    /// Told of every report stored from a site (not of those stored again from the log at
    /// open): the replication log ([`crate::replica`]).
    tap: std::sync::OnceLock<ReportTap>,
}

/// What [`Store::on_stored`] calls: the site and the report's bytes as stored.
pub type ReportTap = Box<dyn Fn(&str, &[u8]) + Send + Sync>;

struct Pending {
    records: Vec<u8>,
    epoch: u64,
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
    /// Opens the trees in `db` and the write-ahead log at `log`, stores again what the log
    /// holds, and checkpoints.
    pub fn open(db: &sled::Db, log: &std::path::Path) -> Result<Arc<Store>, StoreError> {
        let (flushed, _) = watch::channel(0);
        let (wal, records) = crate::wal::Wal::open(log)?;
        let store = Arc::new(Store {
            history: db.open_tree("history")?,
            seqs: db.open_tree("seqs")?,
            seq_dirty: Mutex::new(Default::default()),
            wake: Mutex::new(Wake::default()),
            wake_cv: std::sync::Condvar::new(),
            flushes: AtomicU64::new(0),
            alarms: db.open_tree("alarms")?,
            device_events: db.open_tree(DEVICE_EVENTS_TREE)?,
            db: db.clone(),
            seq_cache: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending {
                records: Vec::new(),
                epoch: 1,
            }),
            wal: Mutex::new(wal),
            last_checkpoint: Mutex::new(std::time::Instant::now()),
            unsaved: std::sync::atomic::AtomicBool::new(true),
            dirty: std::sync::atomic::AtomicBool::new(false),
            flushed,
            tap: std::sync::OnceLock::new(),
        });
        if !records.is_empty() {
            let mut stored = 0;
            for r in &records {
                let report = Report::decode(r.report.as_slice()).map_err(|e| corrupt("log", e))?;
                if store.insert(&r.site, &report, None)? {
                    stored += 1;
                }
            }
            tracing::info!(
                records = records.len(),
                stored,
                "Stored again what the write-ahead log held (the rest sled had already)."
            );
        }
        store.checkpoint()?;
        Ok(store)
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
    /// Calls `tap` with every report stored from now on (once; a second tap is refused).
    pub fn on_stored(&self, tap: ReportTap) -> bool {
        self.tap.set(tap).is_ok()
    }

    /// Stores a report a primary controller stored (a standby following its log): the same
    /// insert, no log record of its own (the standby checkpoints as it applies).
    pub fn replicate(&self, site: &str, report: &Report) -> Result<bool, StoreError> {
        let new = self.insert(site, report, None)?;
        if new {
            self.unsaved.store(true, Ordering::Release);
        }
        Ok(new)
    }

    /// Forgets the cached sequence states (a standby whose trees a snapshot replaced).
    pub fn forget_cached(&self) {
        self.seq_cache.lock().expect("seq cache poisoned").clear();
        self.seq_dirty.lock().expect("seq dirty poisoned").clear();
    }

    pub fn ingest(&self, site: &str, report: &Report) -> Result<(bool, u64), StoreError> {
        let mut epoch = 0;
        let new = self.insert(site, report, Some(&mut epoch))?;
        // A duplicate is acknowledged at the next commit like any other report.
        self.mark_dirty();
        Ok((new, epoch))
    }

    /// Inserts `report` unless stored already; with `epoch`, also queues its log record and
    /// sets the epoch that will carry it (or, for a duplicate, the next one).
    fn insert(
        &self,
        site: &str,
        report: &Report,
        epoch: Option<&mut u64>,
    ) -> Result<bool, StoreError> {
        let range = report.range();
        {
            let mut cache = self.seq_cache.lock().expect("seq cache poisoned");
            let state = self.cached_seq_state(&mut cache, site)?;
            if state.covers(range) {
                drop(cache);
                if let Some(epoch) = epoch {
                    *epoch = self.pending.lock().expect("pending lock poisoned").epoch;
                }
                return Ok(false);
            }
            if state.too_sparse_with(range) {
                return Err(StoreError::TooManyGaps(site.to_string()));
            }
            // The insert happens under the cache lock, so that two sessions of one site (an
            // old connection not yet closed, a new one) cannot both store a sequence number.
            // Into sled first, then into the log: a checkpoint that empties the log flushes
            // every insert made before it, so each record it drops is in sled already.
            let bytes = report.encode_to_vec();
            self.history.insert(
                history_key(site, report.taken_ms, report.seq),
                bytes.as_slice(),
            )?;
            if let Some(epoch) = epoch {
                let mut p = self.pending.lock().expect("pending lock poisoned");
                crate::wal::encode(&mut p.records, site, &bytes);
                *epoch = p.epoch;
                drop(p);
                // Under the cache lock: a site's reports reach the tap in the order stored.
                if let Some(tap) = self.tap.get() {
                    tap(site, &bytes);
                }
            }
            state.add(range);
            if !report.events.is_empty() {
                self.index_events(site, report)?;
            }
        }
        {
            let mut dirty = self.seq_dirty.lock().expect("seq dirty poisoned");
            if !dirty.contains(site) {
                dirty.insert(site.to_string());
            }
        }
        Ok(true)
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

    /// Commits now: appends what was stored since the last commit to the write-ahead log
    /// (one `fdatasync`) and publishes the epoch made durable; checkpoints when one is due.
    /// Does nothing when nothing was written since the last commit. Blocks: call it from the
    /// committer thread or at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let (records, epoch) = {
                let mut p = self.pending.lock().expect("pending lock poisoned");
                let epoch = p.epoch;
                p.epoch += 1;
                (std::mem::take(&mut p.records), epoch)
            };
            let committed = self.wal.lock().expect("log lock poisoned").commit(&records);
            if let Err(e) = committed {
                // Back in front of what came since: the next commit carries them (and its
                // epoch covers theirs).
                let mut p = self.pending.lock().expect("pending lock poisoned");
                let later = std::mem::replace(&mut p.records, records);
                p.records.extend_from_slice(&later);
                return Err(e.into());
            }
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.unsaved.store(true, Ordering::Release);
            self.flushed.send_replace(epoch);
        }
        let due = self
            .last_checkpoint
            .lock()
            .expect("checkpoint lock")
            .elapsed()
            >= CHECKPOINT_EVERY
            || self.wal.lock().expect("log lock poisoned").len() >= CHECKPOINT_BYTES;
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes the changed sequence states, flushes sled and empties the write-ahead log
    /// (whose records sled now holds durably).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        *self.last_checkpoint.lock().expect("checkpoint lock") = std::time::Instant::now();
        if !self.unsaved.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut wal = self.wal.lock().expect("log lock poisoned");
        // Sequence states first: an acknowledged report's state is durable with it.
        let done = self
            .persist_seq_states()
            .and_then(|()| Ok(self.db.flush()?))
            .and_then(|_| Ok(wal.reset()?));
        if done.is_err() {
            // The log keeps its records; the next checkpoint tries again.
            self.unsaved.store(true, Ordering::Release);
        }
        done
    }

    /// Group commits made so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Starts the committer: a thread of its own that waits for a write, lets
    /// [`FLUSH_COALESCE`] pass for more, and flushes (group commit). A plain thread rather than
    /// a task: the flush blocks, and a thread that sleeps on its own condition variable costs
    /// one wake-up per commit instead of a timer, a blocking-pool hand-off and a wake back.
    /// [`Committer::stop`] makes a last commit and a checkpoint.
    pub fn start_committer(self: &Arc<Self>) -> std::io::Result<Committer> {
        let store = self.clone();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                loop {
                    let (stopping, written) = {
                        let mut w = store.wake.lock().expect("committer lock poisoned");
                        while !w.dirty && !w.stop {
                            // Idle: wake anyway when a checkpoint may be due.
                            let (g, t) = store
                                .wake_cv
                                .wait_timeout(w, CHECKPOINT_EVERY)
                                .expect("committer lock poisoned");
                            w = g;
                            if t.timed_out() {
                                break;
                            }
                        }
                        (w.stop, std::mem::take(&mut w.dirty))
                    };
                    if written && !stopping {
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
                        if let Err(error) = store.checkpoint() {
                            tracing::error!(%error, "The last checkpoint failed; the write-ahead log keeps what it holds for the next start.");
                        }
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

    /// Deletes `site`'s history and device events older than `cutoff_ms`; returns how many
    /// went.
    pub fn prune(&self, site: &str, cutoff_ms: i64) -> Result<usize, StoreError> {
        let start = history_key(site, 0, 0);
        let end = history_key(site, cutoff_ms, 0);
        let mut n = 0;
        for kv in self.history.range(start.clone()..end.clone()) {
            let (k, _) = kv?;
            self.history.remove(k)?;
            n += 1;
        }
        for kv in self.device_events.range(start..end) {
            let (k, _) = kv?;
            self.device_events.remove(k)?;
            n += 1;
        }
        if n > 0 {
            self.unsaved.store(true, Ordering::Release);
        }
        Ok(n)
    }

    /// Keeps a stored report's device events, and at most [`DEVICE_EVENTS_PER_SITE`] of the
    /// site's.
    fn index_events(&self, site: &str, report: &Report) -> Result<(), StoreError> {
        for (i, e) in report
            .events
            .iter()
            .take(DEVICE_EVENTS_PER_REPORT)
            .enumerate()
        {
            let entry = DeviceEventEntry::from_wire(e, report.seq);
            self.device_events.insert(
                event_key(site, e.at_ms, report.seq, i),
                serde_json::to_vec(&entry).map_err(|e| corrupt("device_events", e))?,
            )?;
        }
        let keys: Vec<sled::IVec> = self
            .device_events
            .scan_prefix(site_prefix(site))
            .keys()
            .collect::<Result<_, _>>()?;
        for k in keys
            .iter()
            .take(keys.len().saturating_sub(DEVICE_EVENTS_PER_SITE))
        {
            self.device_events.remove(k)?;
        }
        Ok(())
    }

    /// A site's newest device events, newest first, at most `limit`.
    pub fn device_events(
        &self,
        site: &str,
        limit: usize,
    ) -> Result<Vec<DeviceEventEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .device_events
            .scan_prefix(site_prefix(site))
            .rev()
            .take(limit)
        {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| corrupt("device_events", e))?);
        }
        Ok(out)
    }

    pub fn append_alarm(&self, ev: &AlarmEvent) -> Result<(), StoreError> {
        let id = self.db.generate_id()?;
        let mut k = (ev.at_ms.max(0) as u64).to_be_bytes().to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        self.alarms
            .insert(k, serde_json::to_vec(ev).map_err(|e| corrupt("alarms", e))?)?;
        self.unsaved.store(true, Ordering::Release);
        Ok(())
    }

    /// One page of the alarm log, newest first: events at or after `since_ms` and strictly
    /// before the cursor `before` (from the previous page), that `keep` accepts; at most
    /// `limit` of them, looking at no more than `max_scan` entries. Returns the events and
    /// the cursor of the next page (`None`: nothing older is left).
    pub fn alarms_page(
        &self,
        since_ms: i64,
        before: Option<&[u8]>,
        limit: usize,
        max_scan: usize,
        keep: impl Fn(&AlarmEvent) -> bool,
    ) -> Result<(Vec<AlarmEvent>, Option<Vec<u8>>), StoreError> {
        let start = (since_ms.max(0) as u64).to_be_bytes().to_vec();
        let range = match before {
            Some(b) if b > start.as_slice() => self.alarms.range(start..b.to_vec()),
            Some(_) => return Ok((Vec::new(), None)),
            None => self.alarms.range(start..),
        };
        let mut out = Vec::new();
        let mut last_key = None;
        for (scanned, kv) in range.rev().enumerate() {
            let (k, v) = kv?;
            if out.len() >= limit || scanned >= max_scan {
                return Ok((out, last_key));
            }
            let ev: AlarmEvent = serde_json::from_slice(&v).map_err(|e| corrupt("alarms", e))?;
            if keep(&ev) {
                out.push(ev);
            }
            last_key = Some(k.to_vec());
        }
        Ok((out, None))
    }

    /// Alarm events logged after the one at `after` (a key this returned; `None`: from the
    /// start), oldest first, at most `limit`, each with its key (what a province controller
    /// forwards to the ministry's, from where it stopped).
    pub fn alarms_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, AlarmEvent)>, StoreError> {
        let range = match after {
            Some(k) => self.alarms.range((
                std::ops::Bound::Excluded(k.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => self.alarms.range::<Vec<u8>, _>(..),
        };
        let mut out = Vec::new();
        for kv in range.take(limit) {
            let (k, v) = kv?;
            out.push((
                k.to_vec(),
                serde_json::from_slice(&v).map_err(|e| corrupt("alarms", e))?,
            ));
        }
        Ok(out)
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
mod tests;
