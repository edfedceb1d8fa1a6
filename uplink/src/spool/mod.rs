//! The report spool (sled): every report is written here first and deleted only when the
//! controller acknowledges it, so an outage or a crash loses nothing.
//!
//! A disk quota bounds it: when the spool grows past it, the oldest reports are merged into
//! downsampled ones (1-minute buckets at first, coarser as needed), never dropped silently. At a
//! 10 s interval, 64 MB holds 30 days. Reports in flight are never merged.
//!
//! Several spools can share one sled tree under different key prefixes (the simulator runs
//! thousands of sites in one process).
//!
//! An agent's own spool ([`Spool::open_dir`]) owns its directory, and holds the disk quota
//! against the files themselves: sled reclaims space lazily and, under a long stream of inserts
//! and deletes, its files grow far past the live data (measured: 74 MB on disk for 1 MB live).
//! So when the files pass [`COMPACT_AT_PERCENT`] of the quota, the spool copies its live entries
//! into a fresh sled database (a new *generation*, `g<N>/`) and switches to it with an atomic
//! rename of the `CURRENT` file. A crash at any point leaves either the old generation or the
//! complete new one current; the other is removed on the next open.

use std::path::{Path, PathBuf};

use tiandi_proto::{Message, Report, SeqRange};

/// Per-entry overhead counted on top of key and value (sled's own bookkeeping, estimated).
const ENTRY_OVERHEAD: u64 = 48;
/// sled writes several times the live data to disk: a fresh copy takes about 2× the live bytes
/// (measured), and lazy segment reclamation grows that until the next rewrite, while a rewrite
/// needs room for both generations. The logical
/// budget starts at quota / this and adapts to what the disk shows (see [`Spool::check_disk`]).
const ASSUMED_AMPLIFICATION: u64 = 16;
/// An owned spool rewrites itself into a fresh generation when its files pass this share of
/// the disk quota.
pub const COMPACT_AT_PERCENT: u64 = 40;
/// sled's segment size for an agent's spool.
const SEGMENT_BYTES: usize = 64 * 1024;
/// Pushes between two looks at the files' size.
const CHECK_EVERY: u32 = 64;
/// sled's page cache for an agent's spool.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

mod generation;
mod quota;
#[cfg(test)]
mod tests;

use generation::Owned;
pub use generation::dir_size;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt spool entry {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct Spool {
    tree: sled::Tree,
    prefix: Vec<u8>,
    next_seq: u64,
    confirmed: bool,
    /// The disk quota, and the logical budget derived from it.
    disk_quota: u64,
    quota_bytes: u64,
    bytes: u64,
    /// The spool's own directory, when it has one (None when many spools share one database).
    owned: Option<Owned>,
    /// Generations written by compaction since start.
    pub compactions: u64,
    /// Disk bytes per live byte of a fresh generation (measured at each rewrite).
    fresh_ratio: f64,
    /// The most the spool's files took at once, measured during each rewrite (when both
    /// generations exist) and at each disk check.
    pub peak_on_disk: u64,
    pushes_since_check: u32,
    count: usize,
    interval_ms: i64,
    durable: bool,
    /// Sequence numbers sent on a live connection and not yet acknowledged (a dual-homed
    /// site may have one in flight on two paths at once).
    pub in_flight: InFlight,
    /// Reports merged by downsampling since start (for logs and tests).
    pub merged: u64,
    /// Reports dropped because even the coarsest downsampling could not fit the quota.
    pub dropped: u64,
}

/// Reports in flight, counted per connection that carries them: a downsampling rewrite
/// leaves them alone until every connection has had its acknowledgement or ended.
#[derive(Debug, Default)]
pub struct InFlight(std::collections::BTreeMap<u64, u32>);

impl InFlight {
    /// One more connection carries `seq`.
    pub fn insert(&mut self, seq: u64) {
        *self.0.entry(seq).or_default() += 1;
    }
    /// A connection that carried `seq` ended without its acknowledgement.
    pub fn release(&mut self, seq: u64) {
        if let std::collections::btree_map::Entry::Occupied(mut e) = self.0.entry(seq) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
    /// `seq` is acknowledged: no connection carries it any more.
    pub fn remove(&mut self, seq: &u64) {
        self.0.remove(seq);
    }
    pub fn contains(&self, seq: &u64) -> bool {
        self.0.contains_key(seq)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Spool {
    /// Opens an agent's own spool in `dir` (created if missing), holding `disk_quota` against
    /// the files on disk. With `durable`, every new report is flushed to disk before `push`
    /// returns (a SIGKILL right after loses nothing).
    pub fn open_dir(
        dir: &Path,
        disk_quota: u64,
        interval_ms: i64,
        durable: bool,
    ) -> Result<Spool, SpoolError> {
        let owned = Owned::open(dir)?;
        let tree = owned.db.open_tree("spool")?;
        Self::open_inner(tree, b"", disk_quota, interval_ms, durable, Some(owned))
    }

    /// Opens the spool under `prefix` in a shared `tree`; `disk_quota` bounds its logical size.
    pub fn open(
        tree: sled::Tree,
        prefix: &[u8],
        disk_quota: u64,
        interval_ms: i64,
        durable: bool,
    ) -> Result<Spool, SpoolError> {
        Self::open_inner(tree, prefix, disk_quota, interval_ms, durable, None)
    }

    fn open_inner(
        tree: sled::Tree,
        prefix: &[u8],
        disk_quota: u64,
        interval_ms: i64,
        durable: bool,
        owned: Option<Owned>,
    ) -> Result<Spool, SpoolError> {
        let quota_bytes = if owned.is_some() {
            disk_quota / ASSUMED_AMPLIFICATION
        } else {
            disk_quota
        };
        let mut s = Spool {
            tree,
            prefix: prefix.to_vec(),
            next_seq: 1,
            confirmed: false,
            disk_quota,
            quota_bytes,
            owned,
            compactions: 0,
            fresh_ratio: 3.0,
            peak_on_disk: 0,
            pushes_since_check: 0,
            bytes: 0,
            count: 0,
            interval_ms: interval_ms.max(100),
            durable,
            in_flight: InFlight::default(),
            merged: 0,
            dropped: 0,
        };
        if let Some(v) = s.tree.get(s.meta_key(b"next"))? {
            s.next_seq = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])).max(1);
        }
        s.confirmed = s.tree.get(s.meta_key(b"confirmed"))?.is_some();
        for kv in s.tree.scan_prefix(s.report_prefix()) {
            let (k, v) = kv?;
            s.bytes += (k.len() + v.len()) as u64 + ENTRY_OVERHEAD;
            s.count += 1;
            let seq = s.seq_of(&k);
            let last = Report::decode(v.as_ref())
                .map(|r| r.last_seq())
                .unwrap_or(seq);
            s.next_seq = s.next_seq.max(last + 1);
        }
        Ok(s)
    }

    fn meta_key(&self, name: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'm');
        k.extend_from_slice(name);
        k
    }
    fn report_prefix(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'r');
        k
    }
    fn key(&self, seq: u64) -> Vec<u8> {
        let mut k = self.report_prefix();
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
    fn seq_of(&self, key: &[u8]) -> u64 {
        let n = self.prefix.len() + 1;
        key.get(n..n + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Adds a report, assigning its sequence number. Enforces the quota.
    pub fn push(&mut self, mut report: Report) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        report.seq = seq;
        report.seq_last = 0;
        let value = report.encode_to_vec();
        let key = self.key(seq);
        // Two plain inserts, not a `sled::Batch`: a batch seals sled's log buffer to stay atomic,
        // which costs a write, a `sync_file_range` and a wake of each of sled's seven I/O
        // threads per report (two-fifths of the simulator's CPU at 2,000 sites). Nothing needs
        // the atomicity: the report goes first, and opening takes the next sequence number
        // past the highest report found, so a crash between the two reuses no number.
        self.tree.insert(key.clone(), value.clone())?;
        self.tree
            .insert(self.meta_key(b"next"), &(seq + 1).to_be_bytes())?;
        self.next_seq = seq + 1;
        self.bytes += (key.len() + value.len()) as u64 + ENTRY_OVERHEAD;
        self.count += 1;
        self.pushes_since_check += 1;
        if self.pushes_since_check >= CHECK_EVERY {
            self.pushes_since_check = 0;
            if let Err(e) = self.check_disk() {
                // The report is safe in the current generation; try again later.
                tracing::warn!(error = %e, "Spool rewrite failed; keeping the current generation.");
            }
        }
        self.enforce_quota()?;
        if self.durable {
            self.tree.flush()?;
        }
        Ok(seq)
    }

    fn decode(&self, k: &[u8], v: &[u8]) -> Result<Report, SpoolError> {
        Report::decode(v).map_err(|e| SpoolError::Corrupt {
            key: format!("{:?}", self.seq_of(k)),
            message: e.to_string(),
        })
    }

    /// The newest report.
    pub fn newest(&self) -> Result<Option<Report>, SpoolError> {
        match self.tree.scan_prefix(self.report_prefix()).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(self.decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    /// Up to `n` reports with sequence numbers above `after`, oldest first.
    pub fn after(&self, after: u64, n: usize) -> Result<Vec<Report>, SpoolError> {
        let start = self.key(after.saturating_add(1));
        let end = self.key(u64::MAX);
        let mut out = Vec::with_capacity(n.min(256));
        for kv in self.tree.range(start..=end).take(n) {
            let (k, v) = kv?;
            out.push(self.decode(&k, &v)?);
        }
        Ok(out)
    }

    fn remove(&mut self, seq: u64) -> Result<bool, SpoolError> {
        let key = self.key(seq);
        if let Some(v) = self.tree.remove(&key)? {
            self.bytes = self
                .bytes
                .saturating_sub((key.len() + v.len()) as u64 + ENTRY_OVERHEAD);
            self.count -= 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The controller stored `first..=last`: forget it.
    pub fn ack(&mut self, first: u64, last: u64) -> Result<usize, SpoolError> {
        let mut n = 0;
        let keys: Vec<u64> = self
            .tree
            .range(self.key(first)..=self.key(last))
            .keys()
            .map(|k| k.map(|k| self.seq_of(&k)))
            .collect::<Result<_, _>>()?;
        for seq in keys {
            self.in_flight.remove(&seq);
            if self.remove(seq)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies what the controller says it holds: drops those reports. On the very first
    /// contact of a fresh spool (a reinstalled site), renumbers pending reports above what the
    /// controller already has, so they are not mistaken for old ones.
    pub fn apply_welcome(
        &mut self,
        acked_through: u64,
        ranges: &[SeqRange],
    ) -> Result<usize, SpoolError> {
        let known_max = ranges
            .iter()
            .map(|r| r.last)
            .max()
            .unwrap_or(0)
            .max(acked_through);
        if !self.confirmed {
            let lowest = self.after(0, 1)?.first().map(|r| r.seq);
            let floor = lowest.unwrap_or(self.next_seq);
            if known_max >= floor {
                self.renumber(known_max + 1 - floor)?;
            }
            self.tree.insert(self.meta_key(b"confirmed"), &[1])?;
            self.confirmed = true;
        }
        let covered = |r: &Report| {
            let (a, b) = (r.seq, r.last_seq());
            b <= acked_through || ranges.iter().any(|x| x.first <= a && b <= x.last)
        };
        let mut dropped = 0;
        let candidates = self.after(0, usize::MAX)?;
        for r in candidates {
            if r.seq > known_max {
                break;
            }
            if covered(&r) && self.remove(r.seq)? {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    fn renumber(&mut self, offset: u64) -> Result<(), SpoolError> {
        let all = self.after(0, usize::MAX)?;
        for r in all.iter().rev() {
            self.remove(r.seq)?;
            let mut moved = r.clone();
            moved.seq += offset;
            if moved.seq_last != 0 {
                moved.seq_last += offset;
            }
            self.put(&moved)?;
        }
        self.next_seq += offset;
        self.tree
            .insert(self.meta_key(b"next"), &self.next_seq.to_be_bytes())?;
        tracing::info!(offset, "Renumbered spooled reports above the controller's.");
        Ok(())
    }

    fn put(&mut self, r: &Report) -> Result<(), SpoolError> {
        let key = self.key(r.seq);
        let value = r.encode_to_vec();
        self.bytes += (key.len() + value.len()) as u64 + ENTRY_OVERHEAD;
        self.count += 1;
        self.tree.insert(key, value)?;
        Ok(())
    }

    /// The highest controller fencing epoch this site has seen (0: none yet).
    pub fn epoch(&self) -> Result<u64, SpoolError> {
        Ok(self
            .tree
            .get(self.meta_key(b"epoch"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// A controller at `epoch` answered: false if that is below the highest seen (a
    /// controller replaced by a promoted standby: not to be reported to); otherwise kept
    /// (durably: a restarted agent must not forget it).
    pub fn see_epoch(&mut self, epoch: u64) -> Result<bool, SpoolError> {
        let seen = self.epoch()?;
        if epoch < seen {
            return Ok(false);
        }
        if epoch > seen {
            self.tree
                .insert(self.meta_key(b"epoch"), &epoch.to_be_bytes())?;
            self.tree.flush()?;
        }
        Ok(true)
    }

    pub fn flush(&self) -> Result<(), SpoolError> {
        self.tree.flush()?;
        Ok(())
    }
}
