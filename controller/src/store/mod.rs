//! Durable state: each site's history in segment files of our own ([`segments`]: append-only,
//! time-partitioned, indexed by site), and in sled the acknowledged sequence ranges per site
//! (storing a report whose numbers are all stored already is a no-op: exactly once), the alarm
//! log, and each site's device events (the traps and informs its devices sent, taken from its
//! reports as they are stored: an index of the history, so kept exactly once and made again
//! from the segments like the sequence states). A site's latest report is its newest sample.
//!
//! Durability: an acknowledgement is sent only after the report is durable. A stored report is
//! appended to the active segment's buffer; the committer (group commit) wakes when something
//! was stored, waits [`FLUSH_COALESCE`] for more, writes the buffer with one `write` and one
//! `fdatasync`, and publishes the epoch it made durable. Acknowledgements therefore leave
//! within a few milliseconds, in the same packet as QUIC's own ACK of the report. The segment
//! is the write-ahead log: the sequence states are written to sled when a segment is sealed
//! (and at shutdown), and at start the records of the active segment and of the last sealed
//! one are counted again (a no-op for those the states had) before anything is acknowledged.
//! sled itself is flushed every [`CHECKPOINT_EVERY`] when something (an alarm, a device event)
//! was written to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_proto::{Message, Report, SeqRange};
use tokio::sync::watch;

pub mod segments;

/// The tree of the sites' device events.
pub const DEVICE_EVENTS_TREE: &str = "device_events";

pub const FLUSH_COALESCE: Duration = Duration::from_millis(15);
/// How often sled is flushed when something was written to it.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// The history's directory in the data directory.
pub const HISTORY_DIR: &str = "history";
/// The write-ahead log of versions before the segments: read (and removed) at open.
pub const LEGACY_LOG: &str = "reports.wal";
/// The sled tree of the history before the segments (moved into them at open; a snapshot or an
/// export may still carry items under this name).
pub const HISTORY_TREE: &str = "history";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record in {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
    #[error(transparent)]
    Log(#[from] crate::wal::WalError),
    #[error(transparent)]
    History(#[from] segments::SegmentError),
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
    /// The segments, and the epoch the next commit makes durable (one lock, so that a report
    /// waits exactly for the commit that writes its record).
    history: Mutex<History>,
    /// Held through a commit (the committer's, a checkpoint's): one at a time.
    commit_lock: Mutex<()>,
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

struct History {
    segments: segments::Segments,
    epoch: u64,
}

/// A history entry's key as snapshots and exports carry it: site, NUL, sample time and
/// sequence number (big-endian).
pub fn history_key(site: &str, taken_ms: i64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + 17);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(&(taken_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The site, sample time and sequence number of a history key (see [`history_key`]).
fn parse_history_key(k: &[u8]) -> Option<(&str, i64, u64)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let site = std::str::from_utf8(&k[..nul]).ok()?;
    let rest = k.get(nul + 1..)?;
    if rest.len() != 16 {
        return None;
    }
    let taken = u64::from_be_bytes(rest[..8].try_into().ok()?) as i64;
    let seq = u64::from_be_bytes(rest[8..].try_into().ok()?);
    Some((site, taken, seq))
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
    /// Opens the trees in `db` and the history in `data_dir/history` (with the default
    /// segment limits), and counts again what the newest segments hold.
    pub fn open(db: &sled::Db, data_dir: &std::path::Path) -> Result<Arc<Store>, StoreError> {
        Self::open_with(db, data_dir, segments::Limits::default())
    }

    /// [`Store::open`] with the given segment limits. Also moves an older version's history
    /// (sled's `history` tree, the write-ahead log `reports.wal`) into the segments.
    pub fn open_with(
        db: &sled::Db,
        data_dir: &std::path::Path,
        limits: segments::Limits,
    ) -> Result<Arc<Store>, StoreError> {
        let (flushed, _) = watch::channel(0);
        let seqs = db.open_tree("seqs")?;
        // The newest segments' records: their sequence numbers are stored (the states in sled
        // may predate them) and their device events indexed.
        let mut cache: HashMap<String, SeqState> = HashMap::new();
        let mut with_events = Vec::new();
        let mut replay_error = None;
        let mut replayed = 0u64;
        let segments = segments::Segments::open(&data_dir.join(HISTORY_DIR), limits, &mut |r| {
            if replay_error.is_some() {
                return;
            }
            replayed += 1;
            if !cache.contains_key(&r.site) {
                let s = match seqs.get(r.site.as_bytes()) {
                    Ok(Some(v)) => match serde_json::from_slice(&v) {
                        Ok(s) => s,
                        Err(e) => {
                            replay_error = Some(corrupt("seqs", e));
                            return;
                        }
                    },
                    Ok(None) => SeqState::default(),
                    Err(e) => {
                        replay_error = Some(e.into());
                        return;
                    }
                };
                cache.insert(r.site.clone(), s);
            }
            let range = SeqRange {
                first: r.first,
                last: r.last,
            };
            cache.get_mut(&r.site).expect("inserted above").add(range);
            if r.has_events {
                with_events.push((r.site.clone(), r.report.clone()));
            }
        })?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        let seq_dirty = cache.keys().cloned().collect();
        let store = Arc::new(Store {
            history: Mutex::new(History { segments, epoch: 1 }),
            commit_lock: Mutex::new(()),
            seqs,
            seq_dirty: Mutex::new(seq_dirty),
            wake: Mutex::new(Wake::default()),
            wake_cv: std::sync::Condvar::new(),
            flushes: AtomicU64::new(0),
            alarms: db.open_tree("alarms")?,
            device_events: db.open_tree(DEVICE_EVENTS_TREE)?,
            db: db.clone(),
            seq_cache: Mutex::new(cache),
            last_checkpoint: Mutex::new(std::time::Instant::now()),
            unsaved: std::sync::atomic::AtomicBool::new(true),
            dirty: std::sync::atomic::AtomicBool::new(false),
            flushed,
            tap: std::sync::OnceLock::new(),
        });
        for (site, bytes) in &with_events {
            let report = Report::decode(bytes.as_slice()).map_err(|e| corrupt("history", e))?;
            store.index_events(site, &report)?;
        }
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                "Counted the newest history segments' reports again (those the stored sequence states did not hold yet)."
            );
        }
        store.migrate(data_dir)?;
        store.checkpoint()?;
        Ok(store)
    }

    /// Moves an older version's history into the segments: sled's `history` tree (its
    /// reports are counted in the sequence states already) and the reports of its write-ahead
    /// log (stored unless counted). Each step is repeatable: cut short, it is done again at the
    /// next start, and a report appended twice is read back once.
    fn migrate(&self, data_dir: &std::path::Path) -> Result<(), StoreError> {
        let tree = self.db.open_tree(HISTORY_TREE)?;
        if !tree.is_empty() {
            let mut moved = 0u64;
            for kv in tree.iter() {
                let (k, v) = kv?;
                self.restore_history(&k, &v)?;
                moved += 1;
                if moved.is_multiple_of(65_536) {
                    self.commit_history()?;
                }
            }
            self.commit_history()?;
            tree.clear()?;
            self.db.flush()?;
            tracing::info!(
                reports = moved,
                "Moved the history from sled into history segments."
            );
        }
        let log = data_dir.join(LEGACY_LOG);
        if log.exists() {
            let (_, records) = crate::wal::Wal::open(&log)?;
            let mut stored = 0;
            for r in &records {
                let report = Report::decode(r.report.as_slice()).map_err(|e| corrupt("log", e))?;
                if self.insert(&r.site, &report, None)? {
                    stored += 1;
                }
            }
            self.checkpoint()?;
            std::fs::remove_file(&log).map_err(|e| {
                StoreError::Log(crate::wal::WalError::Io {
                    path: log.clone(),
                    source: e,
                })
            })?;
            tracing::info!(
                records = records.len(),
                stored,
                "Stored what an older version's write-ahead log held, and removed it."
            );
        }
        Ok(())
    }

    /// Appends a history entry as a snapshot, an export or an older version's sled tree
    /// carries it (key: site, sample time, sequence number; value: the report), without
    /// counting it: the sequence states come with it.
    pub fn restore_history(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let (site, taken_ms, seq) = parse_history_key(key)
            .ok_or_else(|| corrupt("history", "a key that is not site, time and number"))?;
        tiandi_link::names::validate_name("site", site).map_err(|e| corrupt("history", e))?;
        let report = Report::decode(value).map_err(|e| corrupt("history", e))?;
        let range = report.range();
        self.history
            .lock()
            .expect("history lock poisoned")
            .segments
            .append(&segments::RecordRef {
                site,
                taken_ms,
                first: seq,
                last: range.last.max(seq),
                has_events: !report.events.is_empty(),
                report: value,
            })?;
        self.unsaved.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the whole history (a standby about to take a snapshot, which carries it).
    pub fn clear_history(&self) -> Result<(), StoreError> {
        let _commit = self.commit_lock.lock().expect("commit lock poisoned");
        let mut h = self.history.lock().expect("history lock poisoned");
        h.segments.clear()?;
        Ok(())
    }

    /// Writes what was appended to the history and syncs it (blocks).
    fn commit_history(&self) -> Result<(), StoreError> {
        let target = {
            let mut h = self.history.lock().expect("history lock poisoned");
            h.segments.write()?;
            h.segments.to_sync()
        };
        match target {
            Some(t) => self.sync(&t),
            None => Ok(()),
        }
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
        let epoch_wanted = epoch.is_some();
        {
            let mut cache = self.seq_cache.lock().expect("seq cache poisoned");
            let state = self.cached_seq_state(&mut cache, site)?;
            if state.covers(range) {
                drop(cache);
                if let Some(epoch) = epoch {
                    *epoch = self.history.lock().expect("history lock poisoned").epoch;
                }
                return Ok(false);
            }
            if state.too_sparse_with(range) {
                return Err(StoreError::TooManyGaps(site.to_string()));
            }
            // The append happens under the cache lock, so that two sessions of one site (an
            // old connection not yet closed, a new one) cannot both store a sequence number.
            let bytes = report.encode_to_vec();
            {
                let mut h = self.history.lock().expect("history lock poisoned");
                h.segments.append(&segments::RecordRef {
                    site,
                    taken_ms: report.taken_ms,
                    first: range.first,
                    last: range.last,
                    has_events: !report.events.is_empty(),
                    report: &bytes,
                })?;
                if let Some(epoch) = epoch {
                    *epoch = h.epoch;
                }
            }
            if epoch_wanted {
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

    /// Commits now: writes what was stored since the last commit to the active segment
    /// (one `write`, one `fdatasync`) and publishes the epoch made durable; seals the segment
    /// when it is due (after writing the sequence states), flushes sled every
    /// [`CHECKPOINT_EVERY`] when something was written to it. Does nothing when nothing was
    /// stored since the last commit. Blocks: call it from the committer thread or at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        let _commit = self.commit_lock.lock().expect("commit lock poisoned");
        if self.dirty.swap(false, Ordering::AcqRel) {
            let (target, epoch) = {
                let mut h = self.history.lock().expect("history lock poisoned");
                // Every report appended so far carries this epoch or an earlier one; a failed
                // write leaves them for the next commit, whose epoch covers theirs.
                let epoch = h.epoch;
                h.epoch += 1;
                h.segments.write()?;
                (h.segments.to_sync(), epoch)
            };
            if let Some(t) = target {
                self.sync(&t)?;
            }
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.unsaved.store(true, Ordering::Release);
            self.flushed.send_replace(epoch);
        }
        let seal = self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .seal_due();
        if seal {
            return self.checkpoint_locked();
        }
        let due = {
            let mut last = self.last_checkpoint.lock().expect("checkpoint lock");
            let due = last.elapsed() >= CHECKPOINT_EVERY;
            if due {
                *last = std::time::Instant::now();
            }
            due
        };
        if due
            && self.unsaved.swap(false, Ordering::AcqRel)
            && let Err(e) = self.db.flush()
        {
            self.unsaved.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    /// `fdatasync` of the written segment; recorded once done.
    fn sync(&self, t: &segments::SyncTarget) -> Result<(), StoreError> {
        t.file
            .sync_data()
            .map_err(|source| segments::SegmentError::Io {
                path: t.path.clone(),
                source,
            })?;
        self.history
            .lock()
            .expect("history lock poisoned")
            .segments
            .synced(t);
        Ok(())
    }

    /// Makes everything stored durable: writes and syncs the history, writes the changed
    /// sequence states, flushes sled; then seals the active segment if it is due. (The
    /// records of the segment sealed last and of the active one are counted again at open;
    /// sealing only after the states are written keeps every older record counted.)
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let _commit = self.commit_lock.lock().expect("commit lock poisoned");
        self.checkpoint_locked()
    }

    fn checkpoint_locked(&self) -> Result<(), StoreError> {
        *self.last_checkpoint.lock().expect("checkpoint lock") = std::time::Instant::now();
        self.commit_history()?;
        self.unsaved.store(false, Ordering::Release);
        let done = self
            .persist_seq_states()
            .and_then(|()| Ok(self.db.flush()?));
        if let Err(e) = done {
            self.unsaved.store(true, Ordering::Release);
            return Err(e);
        }
        let mut h = self.history.lock().expect("history lock poisoned");
        if h.segments.seal_due() {
            h.segments.seal()?;
        }
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

    /// Reports of `site` taken in `[from_ms, to_ms]`, oldest first, at most `limit`. The
    /// segments are read outside the store's lock (ingest goes on meanwhile).
    pub fn history(
        &self,
        site: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Report>, StoreError> {
        let plan = self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .plan(site, from_ms, to_ms);
        plan.read(site, from_ms, to_ms, limit)?
            .into_iter()
            .map(|r| Report::decode(r.report.as_slice()).map_err(|e| corrupt("history", e)))
            .collect()
    }

    /// Every stored history entry, all sites.
    pub fn history_entries(&self) -> u64 {
        self.history
            .lock()
            .expect("history lock poisoned")
            .segments
            .records()
    }

    pub fn history_len(&self, site: &str) -> Result<usize, StoreError> {
        Ok(self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .count(site)?)
    }

    /// A site's latest report: its newest sample.
    pub fn latest(&self, site: &str) -> Result<Option<Report>, StoreError> {
        let r = self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .latest(site)?;
        r.map(|r| Report::decode(r.report.as_slice()).map_err(|e| corrupt("history", e)))
            .transpose()
    }

    /// Removes the history segments sealed before `cutoff_ms` (whole segments: retention
    /// drops them by the time they were sealed, however wrong a site's clock); returns how
    /// many reports went.
    pub fn prune_history(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        Ok(self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .prune(cutoff_ms)?)
    }

    /// Writes what was appended to the active segment (not synced): a snapshot or an export
    /// about to read the segment files sees every report stored so far.
    pub fn write_history(&self) -> Result<(), StoreError> {
        Ok(self
            .history
            .lock()
            .expect("history lock poisoned")
            .segments
            .write()?)
    }

    /// Deletes `site`'s device events older than `cutoff_ms`; returns how many went. (Its
    /// history goes with whole segments: [`Store::prune_history`].)
    pub fn prune(&self, site: &str, cutoff_ms: i64) -> Result<usize, StoreError> {
        let start = history_key(site, 0, 0);
        let end = history_key(site, cutoff_ms, 0);
        let mut n = 0;
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
