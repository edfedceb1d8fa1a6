//! Leases on backup repositories, granted by the controller (issue 17: no stale locks). A run
//! at a site (or here) takes the lease on `<site>/<repo>` before it writes and renews it while
//! it runs; another run of the same repository is refused while it is held; a holder that
//! dies stops renewing and its lease expires. Kept in sled (and so replicated to a standby):
//! a restarted controller still knows who holds what.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tiandi_transfer::transfer_wire::Lease;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub key: String,
    pub holder: String,
    pub since_ms: i64,
    pub expires_ms: i64,
}

/// Leases one site (or the controller) holds at once, at most.
pub const MAX_PER_SITE: usize = 64;

pub struct Leases {
    tree: sled::Tree,
    held: Mutex<HashMap<String, Held>>,
}

impl Leases {
    pub fn open(db: &sled::Db) -> Result<Leases, sled::Error> {
        let tree = db.open_tree("backup-leases")?;
        let mut held = HashMap::new();
        for kv in tree.iter() {
            let (_, v) = kv?;
            if let Ok(h) = serde_json::from_slice::<Held>(&v) {
                held.insert(h.key.clone(), h);
            }
        }
        Ok(Leases {
            tree,
            held: Mutex::new(held),
        })
    }

    /// Takes, renews or releases `l` for `peer` (already checked: the key is `<peer>/…`).
    pub fn grant(&self, l: &Lease, now_ms: i64) -> Result<Lease, String> {
        let mut held = self.held.lock().expect("leases lock poisoned");
        let current = held.get(&l.key).filter(|h| h.expires_ms > now_ms).cloned();
        if l.release {
            if current.as_ref().is_some_and(|h| h.holder == l.holder) || current.is_none() {
                held.remove(&l.key);
                let _ = self.tree.remove(l.key.as_bytes());
            }
            return Ok(Lease {
                expires_ms: 0,
                ..l.clone()
            });
        }
        if let Some(h) = &current
            && h.holder != l.holder
        {
            return Err(format!(
                "held by {} since {} until {} (Unix ms)",
                h.holder, h.since_ms, h.expires_ms
            ));
        }
        if current.is_none() {
            // Bounded: expired leases go, and a site holds at most MAX_PER_SITE at once.
            let expired: Vec<String> = held
                .values()
                .filter(|h| h.expires_ms <= now_ms)
                .map(|h| h.key.clone())
                .collect();
            for k in expired {
                held.remove(&k);
                let _ = self.tree.remove(k.as_bytes());
            }
            let site = l.key.split('/').next().unwrap_or_default();
            let mine = held
                .keys()
                .filter(|k| k.split('/').next() == Some(site))
                .count();
            if mine >= MAX_PER_SITE {
                return Err(format!(
                    "{site} holds {mine} leases already (at most {MAX_PER_SITE})"
                ));
            }
        }
        let ttl = i64::from(l.ttl_s.min(tiandi_transfer::lease::MAX_TTL_S));
        let h = Held {
            key: l.key.clone(),
            holder: l.holder.clone(),
            since_ms: current.map_or(now_ms, |c| c.since_ms),
            expires_ms: now_ms + ttl * 1000,
        };
        let _ = self.tree.insert(
            l.key.as_bytes(),
            serde_json::to_vec(&h).expect("a lease serialises"),
        );
        let expires_ms = h.expires_ms;
        held.insert(l.key.clone(), h);
        Ok(Lease {
            expires_ms,
            ..l.clone()
        })
    }

    /// The lease on `key` if held now.
    pub fn get(&self, key: &str, now_ms: i64) -> Option<Held> {
        self.held
            .lock()
            .expect("leases lock poisoned")
            .get(key)
            .filter(|h| h.expires_ms > now_ms)
            .cloned()
    }
}

/// The controller's own runs take their leases from the same table, as site `controller`.
pub struct Local(pub std::sync::Arc<Leases>);

impl tiandi_backup::scheduler::Leases for Local {
    fn take(
        &self,
        repo: &str,
        holder: &str,
        ttl_s: u32,
    ) -> Result<i64, tiandi_backup::scheduler::LeaseError> {
        self.0
            .grant(
                &Lease {
                    key: format!("controller/{repo}"),
                    holder: holder.into(),
                    ttl_s,
                    ..Default::default()
                },
                crate::now_ms(),
            )
            .map(|l| l.expires_ms)
            .map_err(tiandi_backup::scheduler::LeaseError::Held)
    }

    fn release(&self, repo: &str, holder: &str) {
        let _ = self.0.grant(
            &Lease {
                key: format!("controller/{repo}"),
                holder: holder.into(),
                release: true,
                ..Default::default()
            },
            crate::now_ms(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(key: &str, holder: &str, ttl_s: u32) -> Lease {
        Lease {
            key: key.into(),
            holder: holder.into(),
            ttl_s,
            ..Default::default()
        }
    }

    #[test]
    fn one_holder_at_a_time_renewed_released_and_expired_and_kept_across_a_restart() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let l = Leases::open(&db).unwrap();
        let t0 = 1_000_000;
        let a = l.grant(&ask("bj-001/db", "run-a", 120), t0).unwrap();
        assert_eq!(a.expires_ms, t0 + 120_000);
        let err = l
            .grant(&ask("bj-001/db", "run-b", 120), t0 + 1)
            .unwrap_err();
        assert!(err.contains("run-a"), "{err}");
        // Another repository is another lease.
        assert!(l.grant(&ask("bj-001/files", "run-b", 120), t0).is_ok());
        // Renewed by its holder; kept across a restart.
        assert_eq!(
            l.grant(&ask("bj-001/db", "run-a", 120), t0 + 60_000)
                .unwrap()
                .expires_ms,
            t0 + 180_000
        );
        let l = Leases::open(&db).unwrap();
        assert_eq!(l.get("bj-001/db", t0 + 61_000).unwrap().since_ms, t0);
        assert!(
            l.grant(&ask("bj-001/db", "run-b", 120), t0 + 61_000)
                .is_err()
        );
        // A holder that stops renewing: the lease expires, the next run takes it.
        assert!(
            l.grant(&ask("bj-001/db", "run-b", 120), t0 + 180_001)
                .is_ok()
        );
        // Released by its holder only.
        let mut rel = ask("bj-001/db", "run-a", 0);
        rel.release = true;
        l.grant(&rel, t0 + 180_002).unwrap();
        assert!(
            l.get("bj-001/db", t0 + 180_003).is_some(),
            "run-a cannot release run-b's"
        );
        rel.holder = "run-b".into();
        l.grant(&rel, t0 + 180_004).unwrap();
        assert!(l.get("bj-001/db", t0 + 180_005).is_none());
        // Bounded per site; expired ones do not count.
        let t1 = t0 + 1_000_000;
        for i in 0..MAX_PER_SITE {
            l.grant(&ask(&format!("sh-001/r{i}"), "x", 60), t1).unwrap();
        }
        let err = l.grant(&ask("sh-001/one-more", "x", 60), t1).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        assert!(
            l.grant(&ask("gd-001/db", "x", 60), t1).is_ok(),
            "another site's count"
        );
        assert!(
            l.grant(&ask("sh-001/one-more", "x", 60), t1 + 61_000)
                .is_ok()
        );
    }
}
