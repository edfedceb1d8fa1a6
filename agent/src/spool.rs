//! The report spool (sled): every report is written here first and deleted only when the
//! controller acknowledges it, so an outage or a crash loses nothing.
//!
//! A disk quota bounds it: when the spool grows past it, the oldest reports are merged into
//! downsampled ones (1-minute buckets at first, coarser as needed), never dropped silently. At a
//! 10 s interval, 64 MB holds 30 days. Reports in flight are never merged.
//!
//! Several spools can share one sled tree under different key prefixes (the simulator runs
//! thousands of sites in one process).

use std::collections::BTreeSet;

use tiandi_proto::{Message, Report, SeqRange};

/// Per-entry overhead counted on top of key and value (sled's own bookkeeping, estimated).
const ENTRY_OVERHEAD: u64 = 48;
/// sled writes several times the live data to disk (log-structured pages, lazy segment
/// reclamation). The spool starts with a logical budget of quota / this, then adapts to the
/// amplification it measures (see [`Spool::check_disk`]).
const ASSUMED_AMPLIFICATION: u64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt spool entry {key}: {message}")]
    Corrupt { key: String, message: String },
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
    /// The database, to measure real disk use (None when many spools share one database).
    db: Option<sled::Db>,
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
    /// Opens the spool under `prefix` in `tree`. With `durable`, every new report is flushed to
    /// disk before `push` returns (a SIGKILL right after loses nothing). With `db`, the disk
    /// quota is held against the database's real size on disk.
    pub fn open(
        tree: sled::Tree,
        prefix: &[u8],
        disk_quota: u64,
        interval_ms: i64,
        durable: bool,
        db: Option<sled::Db>,
    ) -> Result<Spool, SpoolError> {
        let quota_bytes = if db.is_some() {
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
            db,
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
        let mut batch = sled::Batch::default();
        batch.insert(key.clone(), value.clone());
        batch.insert(self.meta_key(b"next"), &(seq + 1).to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.next_seq = seq + 1;
        self.bytes += (key.len() + value.len()) as u64 + ENTRY_OVERHEAD;
        self.count += 1;
        self.pushes_since_check += 1;
        if self.pushes_since_check >= 256 {
            self.pushes_since_check = 0;
            self.check_disk();
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

    /// Compares real disk use with the quota. Over 80 % of it, the logical budget shrinks in
    /// proportion (sled's file never shrinks, so the spool must stay ahead of it).
    pub fn check_disk(&mut self) {
        let Some(db) = &self.db else { return };
        let Ok(on_disk) = db.size_on_disk() else {
            return;
        };
        // Well under the quota: sled reclaims space lazily, so the file keeps growing for a
        // while after the budget shrinks (measured: ~20 % past this mark under load).
        let high = self.disk_quota / 10 * 7;
        if on_disk > high && self.bytes > 0 {
            let scaled = (self.bytes as f64 * high as f64 / on_disk as f64 * 0.9) as u64;
            let budget = scaled.min(self.quota_bytes).max(self.disk_quota / 64);
            if budget < self.quota_bytes {
                tracing::info!(
                    on_disk,
                    logical = self.bytes,
                    budget,
                    "Spool near its disk quota: tightening its budget."
                );
                self.quota_bytes = budget;
            }
        }
    }

    /// Downsamples the oldest reports until the spool fits 90 % of its quota.
    pub fn enforce_quota(&mut self) -> Result<(), SpoolError> {
        if self.bytes <= self.quota_bytes {
            return Ok(());
        }
        let target = self.quota_bytes / 10 * 9;
        let mut width = self.interval_ms * 6;
        let max_width = 30 * 86_400_000i64;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, quota: u64) -> Spool {
        let db = sled::open(dir).unwrap();
        Spool::open(
            db.open_tree("spool").unwrap(),
            b"",
            quota,
            10_000,
            false,
            None,
        )
        .unwrap()
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
}
