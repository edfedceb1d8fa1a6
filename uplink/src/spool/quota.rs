//! The spool's quota: the files held against the disk quota (a rewrite into a fresh generation
//! when they grow past it) and the logical budget held by merging the oldest reports into
//! downsampled ones, never by dropping them silently.

use super::generation::{Owned, remove_any, write_atomically};
use super::*;

impl Spool {
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
    pub(super) fn rewrite(&mut self, need: u64, width: i64) -> Result<(), SpoolError> {
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
