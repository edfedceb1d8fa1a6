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

use std::collections::BTreeSet;
use std::io::Write;
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

/// An owned spool's directory: `CURRENT` names the live generation `g<N>/`.
struct Owned {
    dir: PathBuf,
    generation: u64,
    db: sled::Db,
}

impl Owned {
    fn gen_dir(dir: &Path, generation: u64) -> PathBuf {
        dir.join(format!("g{generation}"))
    }

    fn open_db(path: &Path) -> Result<sled::Db, SpoolError> {
        // sled releases its file lock from a background thread after the last handle is
        // dropped: a spool reopened at once (a restarted uplink, a test) may find it still
        // held for a moment.
        let mut tries = 0;
        loop {
            let r = sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_BYTES)
                // Smaller segments lay a copy out tighter (measured: 1.7× the live bytes
                // against 2.2× with sled's default 512 KiB).
                .segment_size(SEGMENT_BYTES)
                .open();
            match r {
                Err(sled::Error::Io(e))
                    if tries < 50 && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                r => return Ok(r?),
            }
        }
    }

    /// Opens the current generation, removing any other one a crash left behind.
    fn open(dir: &Path) -> Result<Owned, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let current = dir.join("CURRENT");
        let generation = match std::fs::read_to_string(&current) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| SpoolError::Corrupt {
                    key: current.display().to_string(),
                    message: format!("not a generation number: {e}"),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomically(dir, "CURRENT", b"0\n")?;
                0
            }
            Err(e) => return Err(io_err(&current)(e)),
        };
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = name
                .strip_prefix('g')
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n != generation);
            if stale || name == "CURRENT.tmp" {
                tracing::info!(path = %entry.path().display(), "Removing a stale spool generation.");
                remove_any(&entry.path())?;
            }
        }
        let db = Self::open_db(&Self::gen_dir(dir, generation))?;
        Ok(Owned {
            dir: dir.to_path_buf(),
            generation,
            db,
        })
    }

    /// Bytes the spool's files take, every generation included.
    fn size_on_disk(&self) -> u64 {
        dir_size(&self.dir)
    }
}

fn remove_any(path: &Path) -> Result<(), SpoolError> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Writes `dir/name` through a temporary file, fsync and rename, then syncs the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// The bytes under `path` (files' lengths, recursively).
pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
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
    /// Sequence numbers sent on the current connection and not yet acknowledged.
    pub in_flight: BTreeSet<u64>,
    /// Reports merged by downsampling since start (for logs and tests).
    pub merged: u64,
    /// Reports dropped because even the coarsest downsampling could not fit the quota.
    pub dropped: u64,
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
            in_flight: BTreeSet::new(),
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
        self.in_flight.clear();
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

    /// The bytes the spool's files take (None for a spool in a shared database).
    pub fn size_on_disk(&self) -> Option<u64> {
        self.owned.as_ref().map(Owned::size_on_disk)
    }

    /// Holds the disk quota against the files: past [`COMPACT_AT_PERCENT`] of it, rewrites the
    /// live entries into a fresh generation. If even the fresh copy takes more than 25 % of the
    /// quota, the logical budget shrinks in proportion (the next downsampling then makes room).
    pub fn check_disk(&mut self) -> Result<(), SpoolError> {
        let Some(owned) = &self.owned else {
            return Ok(());
        };
        let high = self.disk_quota / 100 * COMPACT_AT_PERCENT;
        let on_disk = owned.size_on_disk();
        self.peak_on_disk = self.peak_on_disk.max(on_disk);
        if on_disk <= high {
            return Ok(());
        }
        self.compact()?;
        let after = self.size_on_disk().unwrap_or(0);
        tracing::info!(
            before = on_disk,
            after,
            logical = self.bytes,
            "Spool rewritten into a fresh generation to reclaim disk space."
        );
        // A fresh copy must leave room to grow before the next rewrite, and room for both
        // generations during it.
        let roomy = self.disk_quota / 100 * 25;
        if after > roomy && self.bytes > 0 {
            let scaled = (self.bytes as f64 * roomy as f64 / after as f64 * 0.8) as u64;
            let budget = scaled.min(self.quota_bytes).max(self.disk_quota / 64);
            if budget < self.quota_bytes {
                tracing::warn!(
                    on_disk = after,
                    logical = self.bytes,
                    budget,
                    "Spool still large after a rewrite: tightening its budget."
                );
                self.quota_bytes = budget;
            }
        }
        Ok(())
    }

    /// Copies every entry into generation N+1, makes it current, drops generation N.
    fn compact(&mut self) -> Result<(), SpoolError> {
        self.rewrite(0, 0)
    }

    /// Writes generation N+1 from generation N, merging the oldest reports into `width`-ms
    /// buckets until `need` bytes are saved (none when `need` is 0), then makes it current and
    /// drops generation N. Generation N is only read: sled grows its files by several times
    /// the bytes it rewrites in place, so an owned spool never downsamples in place.
    fn rewrite(&mut self, need: u64, width: i64) -> Result<(), SpoolError> {
        let Some(owned) = self.owned.take() else {
            return Ok(());
        };
        // Both generations exist until the switch: keep them together under 90 % of the quota,
        // estimating the copy from the copies measured so far; downsample more if need be.
        // Reading generation N makes sled consolidate pages, which it writes out again: its
        // files grew by up to 2.7× during a copy (measured), so it counts twice.
        let old = owned.size_on_disk();
        let room = (self.disk_quota as f64 * 0.9 - 2.0 * old as f64).max(0.0);
        let fits = (room / self.fresh_ratio) as u64;
        let mut need = need;
        let mut width = width;
        if self.bytes.saturating_sub(need) > fits {
            need = self.bytes - fits;
            self.quota_bytes = self.quota_bytes.min(fits).max(self.disk_quota / 64);
            tracing::warn!(
                on_disk = old,
                logical = self.bytes,
                budget = self.quota_bytes,
                "Spool files large for their contents: downsampling more to stay in the quota."
            );
        }
        if width == 0 {
            width = self.interval_ms * 6;
        }
        let next = owned.generation + 1;
        let next_dir = Owned::gen_dir(&owned.dir, next);
        let result = (|| {
            remove_any(&next_dir)?;
            let db = Owned::open_db(&next_dir)?;
            let tree = db.open_tree("spool")?;
            let mut out = Rewriter {
                tree: &tree,
                spool: self,
                group: Vec::new(),
                saved: 0,
                merged: 0,
                bytes: 0,
                count: 0,
            };
            let reports = self.report_prefix();
            // One insert per entry: sled lays out a fresh copy tighter than with big batches
            // (measured: 2.1× the live bytes against 3×).
            for kv in self.tree.iter() {
                let (k, v) = kv?;
                if !k.starts_with(&reports) {
                    tree.insert(k, v)?;
                    continue;
                }
                let seq = self.seq_of(&k);
                if out.saved >= need || self.in_flight.contains(&seq) {
                    out.close_group()?;
                    out.put_raw(&k, &v)?;
                    continue;
                }
                let r = self.decode(&k, &v)?;
                let same_bucket = out.group.first().is_some_and(|(f, _)| {
                    f.taken_ms.div_euclid(width) == r.taken_ms.div_euclid(width)
                });
                if !same_bucket {
                    out.close_group()?;
                }
                out.group
                    .push((r, (k.len() + v.len()) as u64 + ENTRY_OVERHEAD));
            }
            out.close_group()?;
            let (bytes, count, merged) = (out.bytes, out.count, out.merged);
            db.flush()?;
            write_atomically(&owned.dir, "CURRENT", format!("{next}\n").as_bytes())?;
            Ok::<_, SpoolError>((db, tree, bytes, count, merged))
        })();
        match result {
            Ok((db, tree, bytes, count, merged)) => {
                self.peak_on_disk = self.peak_on_disk.max(owned.size_on_disk());
                let fresh = dir_size(&next_dir);
                if bytes > 0 {
                    let observed = fresh as f64 / bytes as f64;
                    self.fresh_ratio = observed.max(self.fresh_ratio * 0.9).max(1.5);
                }
                let old_dir = Owned::gen_dir(&owned.dir, owned.generation);
                let dir = owned.dir.clone();
                self.tree = tree;
                drop(owned);
                self.owned = Some(Owned {
                    dir,
                    generation: next,
                    db,
                });
                self.bytes = bytes;
                self.count = count;
                self.merged += merged;
                self.compactions += 1;
                remove_any(&old_dir)
            }
            Err(e) => {
                // The old generation is still current and intact; the partial copy goes.
                let _ = remove_any(&next_dir);
                self.owned = Some(owned);
                Err(e)
            }
        }
    }

    /// Downsamples the oldest reports until the spool fits 90 % of its quota (80 % for an
    /// owned spool, which rewrites a whole generation to downsample).
    pub fn enforce_quota(&mut self) -> Result<(), SpoolError> {
        if self.bytes <= self.quota_bytes {
            return Ok(());
        }
        let target = if self.owned.is_some() {
            self.quota_bytes / 10 * 8
        } else {
            self.quota_bytes / 10 * 9
        };
        let mut width = self.interval_ms * 6;
        let max_width = 30 * 86_400_000i64;
        if self.owned.is_some() {
            // Downsample into a fresh generation, coarser each pass; what is still over after
            // the coarsest pass goes through the in-place loop below (which drops, loudly).
            while self.bytes > target {
                self.rewrite(self.bytes - target, width)?;
                if width >= max_width {
                    break;
                }
                width = (width * 4).min(max_width);
            }
            width = max_width;
        }
        while self.bytes > target {
            let n = (self.count / 4).max(64);
            let oldest = self.after(0, n)?;
            let mut groups: Vec<Vec<Report>> = Vec::new();
            for r in oldest {
                if self.in_flight.contains(&r.seq) {
                    groups.push(Vec::new());
                    continue;
                }
                let bucket = r.taken_ms.div_euclid(width);
                match groups.last_mut() {
                    Some(g)
                        if g.first()
                            .is_some_and(|f| f.taken_ms.div_euclid(width) == bucket) =>
                    {
                        g.push(r)
                    }
                    _ => groups.push(vec![r]),
                }
            }
            let mut merged_any = false;
            for g in groups.into_iter().filter(|g| g.len() >= 2) {
                let Some(m) = tiandi_proto::merge(&g) else {
                    continue;
                };
                for r in &g {
                    self.remove(r.seq)?;
                }
                self.put(&m)?;
                self.merged += g.len() as u64;
                merged_any = true;
            }
            if !merged_any {
                if width >= max_width {
                    // Nothing left to merge: drop the oldest report, loudly.
                    if let Some(r) = self.after(0, 1)?.pop() {
                        tracing::error!(
                            seq = r.seq,
                            "Spool quota exhausted even at the coarsest downsampling: dropping the oldest report."
                        );
                        self.remove(r.seq)?;
                        self.dropped += 1;
                    } else {
                        break;
                    }
                } else {
                    width = (width * 4).min(max_width);
                }
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), SpoolError> {
        self.tree.flush()?;
        Ok(())
    }
}

/// Generation N+1 being written by [`Spool::rewrite`], with the group of old reports that
/// will become one merged report.
struct Rewriter<'a> {
    tree: &'a sled::Tree,
    spool: &'a Spool,
    group: Vec<(Report, u64)>,
    saved: u64,
    merged: u64,
    bytes: u64,
    count: usize,
}

impl Rewriter<'_> {
    fn put_raw(&mut self, k: &[u8], v: &[u8]) -> Result<(), SpoolError> {
        self.tree.insert(k, v)?;
        self.bytes += (k.len() + v.len()) as u64 + ENTRY_OVERHEAD;
        self.count += 1;
        Ok(())
    }

    fn close_group(&mut self) -> Result<(), SpoolError> {
        let group = std::mem::take(&mut self.group);
        let merged = if group.len() >= 2 {
            let reports: Vec<Report> = group.iter().map(|(r, _)| r.clone()).collect();
            tiandi_proto::merge(&reports)
        } else {
            None
        };
        match merged {
            Some(m) => {
                let k = self.spool.key(m.seq);
                let v = m.encode_to_vec();
                let before: u64 = group.iter().map(|(_, n)| n).sum();
                self.put_raw(&k, &v)?;
                self.saved += before.saturating_sub((k.len() + v.len()) as u64 + ENTRY_OVERHEAD);
                self.merged += group.len() as u64;
            }
            None => {
                for (r, _) in group {
                    self.put_raw(&self.spool.key(r.seq), &r.encode_to_vec())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, quota: u64) -> Spool {
        Spool::open_dir(dir, quota, 10_000, false).unwrap()
    }

    fn rep(t: i64) -> Report {
        let mut r = tiandi_proto::Report {
            taken_ms: t,
            ..Default::default()
        };
        r.host = Some(tiandi_proto::Host {
            cpu_permille: 100,
            ..Default::default()
        });
        r
    }

    #[test]
    fn a_crash_between_the_report_and_its_counter_reuses_no_number() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("s").unwrap();
        {
            let mut s = Spool::open(tree.clone(), b"a\0", 1 << 20, 10_000, false).unwrap();
            for i in 0..3 {
                s.push(rep(i)).unwrap();
            }
            // As if the process died after storing report 3 but before its counter.
            tree.insert(s.meta_key(b"next"), &3u64.to_be_bytes())
                .unwrap();
        }
        let mut s = Spool::open(tree, b"a\0", 1 << 20, 10_000, false).unwrap();
        assert_eq!(s.next_seq(), 4);
        assert_eq!(s.push(rep(3)).unwrap(), 4);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn push_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), 1 << 20);
            for i in 0..10 {
                assert_eq!(s.push(rep(i)).unwrap(), i as u64 + 1);
            }
            // First contact: the controller knows nothing of this site yet.
            assert_eq!(s.apply_welcome(0, &[]).unwrap(), 0);
            assert_eq!(s.ack(3, 5).unwrap(), 3);
            assert_eq!(s.len(), 7);
            s.flush().unwrap();
        }
        let mut s = open(dir.path(), 1 << 20);
        assert_eq!(s.len(), 7);
        assert_eq!(s.next_seq(), 11);
        assert_eq!(s.newest().unwrap().unwrap().seq, 10);
        let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 6, 7, 8, 9, 10]);
        // The controller holds 1..=2 and 10.
        let dropped = s
            .apply_welcome(
                2,
                &[SeqRange {
                    first: 10,
                    last: 10,
                }],
            )
            .unwrap();
        assert_eq!(dropped, 3);
        let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![6, 7, 8, 9]);
    }

    #[test]
    fn fresh_spool_renumbers_above_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), 1 << 20);
        for i in 0..3 {
            s.push(rep(i)).unwrap();
        }
        // The controller already has 1..=500 from this site's previous installation.
        assert_eq!(s.apply_welcome(500, &[]).unwrap(), 0);
        let seqs: Vec<u64> = s.after(0, 100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![501, 502, 503]);
        assert_eq!(s.push(rep(4)).unwrap(), 504);
    }

    #[test]
    fn rewrite_keeps_everything_and_a_crash_mid_rewrite_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), 1 << 20);
            for i in 0..50 {
                s.push(rep(i * 10_000)).unwrap();
            }
            s.in_flight.insert(3);
            // Merge the oldest into 1-minute buckets until 2 kB are saved; seq 3 is in flight.
            s.rewrite(2_000, 60_000).unwrap();
            assert_eq!(s.compactions, 1);
            assert!(s.merged > 0);
            let all = s.after(0, 100).unwrap();
            let covered: u64 = all.iter().map(|r| r.last_seq() - r.seq + 1).sum();
            assert_eq!(covered, 50);
            assert!(all.iter().any(|r| r.seq == 3 && r.samples <= 1));
            assert_eq!(s.len(), all.len());
            s.flush().unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("CURRENT")).unwrap(),
            "1\n"
        );
        assert!(!dir.path().join("g0").exists());
        // A crash while writing generation 2, and one between the temporary and the rename.
        std::fs::create_dir(dir.path().join("g2")).unwrap();
        std::fs::write(dir.path().join("g2/db"), b"half a copy").unwrap();
        std::fs::write(dir.path().join("CURRENT.tmp"), b"2\n").unwrap();
        let mut s = open(dir.path(), 1 << 20);
        assert!(!dir.path().join("g2").exists());
        assert!(!dir.path().join("CURRENT.tmp").exists());
        let covered: u64 = s
            .after(0, 100)
            .unwrap()
            .iter()
            .map(|r| r.last_seq() - r.seq + 1)
            .sum();
        assert_eq!(covered, 50);
        assert_eq!(s.push(rep(600_000)).unwrap(), 51);
    }

    #[test]
    fn a_corrupt_current_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("CURRENT"), b"banana").unwrap();
        let err = Spool::open_dir(dir.path(), 1 << 20, 10_000, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("CURRENT"), "{err}");
    }
}
