//! The audit log: every action an operator takes (logins and failed logins, revocations,
//! enrollments, sends, acknowledgements, conference control, account changes), who took it,
//! when, from where, on what, and how it ended. Append-only: nothing in the controller
//! rewrites or deletes an entry except the retention (`audit_days`); the administrator browses
//! it (`GET /api/admin/audit`) and exports it (`tiandi-controller audit export`, JSON lines).
//!
//! Stored in sled tree `audit`, keyed by time and a sequence number, so entries stay in order
//! and a page is a range scan.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::now_ms;

/// One entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// The account (or `admin.token`, `read.token`, `cli` for the command line on the host).
    pub user: String,
    pub role: String,
    /// The client's address, when it came over the network.
    pub addr: Option<String>,
    /// `login`, `login-failed`, `logout`, `revoke`, `enroll`, `send`, `alarm-ack`,
    /// `conference.<op>`, `user.<op>`, `token.create`, `token.revoke`, `password`.
    pub action: String,
    /// What it acted on (a site, `province:GD`, a user, a room).
    pub target: String,
    /// `ok`, or `refused: …` / `failed: …`.
    pub outcome: String,
    pub detail: String,
}

/// Longest `detail`/`target` kept (a comment or a path from outside is cut, not refused).
const MAX_FIELD: usize = 1000;

fn cut(mut s: String) -> String {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

pub struct Audit {
    tree: sled::Tree,
    seq: AtomicU64,
}

/// Most entries one page returns.
pub const MAX_PAGE: usize = 5000;

impl Audit {
    pub fn open(db: &sled::Db) -> sled::Result<Audit> {
        let tree = db.open_tree("audit")?;
        let seq = tree
            .last()?
            .map(|(k, _)| u64::from_be_bytes(k[8..16].try_into().unwrap_or([0; 8])) + 1)
            .unwrap_or(0);
        Ok(Audit {
            tree,
            seq: AtomicU64::new(seq),
        })
    }

    /// Appends an entry (flushed: an audit entry must survive a crash right after the action).
    pub fn record(&self, mut e: AuditEntry) {
        e.detail = cut(e.detail);
        e.target = cut(e.target);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&(e.at_ms.max(0) as u64).to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let v = serde_json::to_vec(&e).expect("an entry serialises");
        let done = self.tree.insert(key, v).and_then(|_| self.tree.flush());
        match done {
            Ok(_) => {
                tracing::info!(user = %e.user, action = %e.action, target = %e.target, outcome = %e.outcome, "Audit.")
            }
            Err(error) => tracing::error!(%error, ?e, "Could not write the audit log."),
        }
    }

    /// A page of entries, newest first, older than the cursor `before` (the `next` of the
    /// previous page), those `keep` accepts; scans at most `scan` entries.
    pub fn page(
        &self,
        before: Option<&[u8]>,
        limit: usize,
        scan: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> sled::Result<(Vec<AuditEntry>, Option<Vec<u8>>)> {
        let limit = limit.clamp(1, MAX_PAGE);
        let iter = match before {
            Some(b) => self.tree.range(..b.to_vec()),
            None => self.tree.range::<Vec<u8>, _>(..),
        };
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>>;
        for (i, kv) in iter.rev().enumerate() {
            let (k, v) = kv?;
            last = Some(k.to_vec());
            if let Ok(e) = serde_json::from_slice::<AuditEntry>(&v)
                && keep(&e)
            {
                out.push(e);
                if out.len() >= limit {
                    return Ok((out, last));
                }
            }
            if i + 1 >= scan {
                return Ok((out, last));
            }
        }
        Ok((out, None))
    }

    /// Every entry, oldest first, to `w` as JSON lines; returns how many.
    pub fn export(&self, w: &mut dyn std::io::Write) -> anyhow::Result<u64> {
        let mut n = 0;
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            w.write_all(&v)?;
            w.write_all(b"\n")?;
            n += 1;
        }
        Ok(n)
    }

    /// Drops entries older than `cutoff_ms` (the retention); returns how many.
    pub fn prune(&self, cutoff_ms: i64) -> sled::Result<usize> {
        let end = (cutoff_ms.max(0) as u64).to_be_bytes().to_vec();
        let mut n = 0;
        for kv in self.tree.range(..end) {
            let (k, _) = kv?;
            self.tree.remove(k)?;
            n += 1;
        }
        Ok(n)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

impl AuditEntry {
    pub fn with_detail(mut self, d: &str) -> Self {
        self.detail = d.into();
        self
    }
    pub fn with_outcome(mut self, o: &str) -> Self {
        self.outcome = o.into();
        self
    }
}

/// An entry of `action` by `user` now; fill in the rest with struct update syntax.
pub fn entry(user: &str, role: &str, action: &str, target: &str) -> AuditEntry {
    AuditEntry {
        at_ms: now_ms(),
        user: user.into(),
        role: role.into(),
        addr: None,
        action: action.into(),
        target: target.into(),
        outcome: "ok".into(),
        detail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_newest_first_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let a = Audit::open(&db).unwrap();
        for i in 0..25 {
            let mut e = entry(
                if i % 2 == 0 { "alice" } else { "bob" },
                "admin",
                "send",
                "all",
            );
            e.at_ms = 1000 + i;
            a.record(e);
        }
        let (p1, next) = a.page(None, 10, 1000, |_| true).unwrap();
        assert_eq!(p1.len(), 10);
        assert_eq!(p1[0].at_ms, 1024);
        let (p2, _) = a.page(next.as_deref(), 10, 1000, |_| true).unwrap();
        assert_eq!(p2[0].at_ms, 1014);
        let (bob, _) = a.page(None, 100, 1000, |e| e.user == "bob").unwrap();
        assert_eq!(bob.len(), 12);
        drop(a);
        let a = Audit::open(&db).unwrap();
        let mut e = entry("carol", "viewer", "login", "");
        e.at_ms = 1024;
        a.record(e);
        let (p, _) = a.page(None, 1, 1000, |_| true).unwrap();
        assert_eq!(
            p[0].user, "carol",
            "a reopened log appends after what it had"
        );
        assert_eq!(a.prune(1010).unwrap(), 10);
        let mut out = Vec::new();
        assert_eq!(a.export(&mut out).unwrap(), 16);
    }
}
