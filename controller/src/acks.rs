//! Acknowledgements of alarms: who acknowledged an alarm, when, and why. An acknowledgement
//! belongs to one raising of one alarm on one site (site, alarm, the time it was raised), so a
//! later raising of the same alarm is unacknowledged again. Kept in sled tree `alarm_acks`;
//! pruned with the history.

use serde::{Deserialize, Serialize};

/// Longest comment kept.
pub const MAX_COMMENT_CHARS: usize = 500;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ack {
    pub by: String,
    pub at_ms: i64,
    pub comment: String,
}

pub struct Acks {
    tree: sled::Tree,
}

fn key(site: &str, alarm: &str, since_ms: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + alarm.len() + 10);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(alarm.as_bytes());
    k.push(0);
    k.extend_from_slice(&since_ms.to_be_bytes());
    k
}

/// A comment: 1 to [`MAX_COMMENT_CHARS`] characters, no control characters but newlines.
pub fn check_comment(c: &str) -> Result<(), String> {
    let n = c.trim().chars().count();
    if n == 0 {
        return Err("an acknowledgement needs a comment (what is being done about it)".into());
    }
    if n > MAX_COMMENT_CHARS {
        return Err(format!(
            "a comment has at most {MAX_COMMENT_CHARS} characters"
        ));
    }
    if c.chars().any(|ch| ch.is_control() && ch != '\n') {
        return Err("a comment may not hold control characters".into());
    }
    Ok(())
}

impl Acks {
    pub fn open(db: &sled::Db) -> sled::Result<Acks> {
        Ok(Acks {
            tree: db.open_tree("alarm_acks")?,
        })
    }

    pub fn get(&self, site: &str, alarm: &str, since_ms: i64) -> Option<Ack> {
        self.tree
            .get(key(site, alarm, since_ms))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
    }

    /// Records an acknowledgement (a second one replaces the first: the newest comment counts).
    pub fn put(&self, site: &str, alarm: &str, since_ms: i64, ack: &Ack) -> sled::Result<()> {
        self.tree.insert(
            key(site, alarm, since_ms),
            serde_json::to_vec(ack).expect("serialises"),
        )?;
        self.tree.flush()?;
        Ok(())
    }

    /// Drops acknowledgements of alarms raised before `cutoff_ms`.
    pub fn prune(&self, cutoff_ms: i64) -> sled::Result<usize> {
        let mut n = 0;
        for kv in self.tree.iter() {
            let (k, _) = kv?;
            if k.len() >= 8 {
                let t = i64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                if t < cutoff_ms {
                    self.tree.remove(k)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ack_per_raising() {
        let d = tempfile::tempdir().unwrap();
        let a = Acks::open(&sled::open(d.path()).unwrap()).unwrap();
        let ack = Ack {
            by: "ops".into(),
            at_ms: 5,
            comment: "crew sent".into(),
        };
        a.put("gd-001", "site-down", 100, &ack).unwrap();
        assert_eq!(a.get("gd-001", "site-down", 100), Some(ack));
        assert_eq!(a.get("gd-001", "site-down", 200), None);
        assert_eq!(a.get("gd-001", "on-battery", 100), None);
        assert_eq!(a.prune(150).unwrap(), 1);
        assert!(check_comment("  ").is_err());
        assert!(check_comment(&"x".repeat(501)).is_err());
        assert!(check_comment("a\u{7}").is_err());
        assert!(check_comment("工程师已出发\n预计两小时").is_ok());
    }
}
