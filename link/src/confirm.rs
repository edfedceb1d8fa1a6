//! What a relay remembers of the authority's answers about certificates below it, and what it
//! decides from them when the authority does not answer (fail closed). Shared by the file relay
//! (`tiandi_transfer::hop`, asking the controller) and the conference relay
//! (`tiandi_video::relay::check`, asking up its cascade). No I/O; the callers log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Certificates remembered at most (the oldest answer goes first beyond this).
pub const MAX_KNOWN: usize = 65_536;

/// The decision without an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offline {
    /// Confirmed this long ago, within the allowed age: allowed.
    Recent(Duration),
    /// Confirmed, but longer ago than allowed: refused (fail closed).
    TooOld(Duration),
    /// Last refused, for this reason: refused.
    Refused(String),
    /// Never answered about: refused (fail closed).
    Never,
}

impl Offline {
    pub fn allowed(&self) -> bool {
        matches!(self, Offline::Recent(_))
    }
}

/// A certificate: (site, serial).
type CertKey = (String, String);
/// The authority's last answer: allowed, why not, when.
type Answer = (bool, String, Instant);

/// The last answer about each certificate, keyed by (site, serial). Bounded ([`MAX_KNOWN`]).
#[derive(Debug)]
pub struct Confirmations {
    known: Mutex<HashMap<CertKey, Answer>>,
    max_age: Duration,
}

impl Confirmations {
    /// Without an answer, a certificate confirmed within `max_age` is allowed.
    pub fn new(max_age: Duration) -> Confirmations {
        Confirmations {
            known: Mutex::default(),
            max_age,
        }
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// The authority's answer now: `allowed`, and why not if not.
    pub fn remember(&self, site: &str, serial: &str, allowed: bool, reason: &str) {
        let key = (site.to_string(), serial.to_string());
        let mut known = self.known.lock().expect("confirmations lock poisoned");
        if known.len() >= MAX_KNOWN
            && !known.contains_key(&key)
            && let Some(oldest) = known
                .iter()
                .min_by_key(|(_, v)| v.2)
                .map(|(k, _)| k.clone())
        {
            known.remove(&oldest);
        }
        known.insert(key, (allowed, reason.to_string(), Instant::now()));
    }

    /// The decision when the authority does not answer about (site, serial).
    pub fn offline(&self, site: &str, serial: &str) -> Offline {
        let known = self.known.lock().expect("confirmations lock poisoned");
        match known.get(&(site.to_string(), serial.to_string())) {
            Some((true, _, at)) if at.elapsed() <= self.max_age => Offline::Recent(at.elapsed()),
            Some((true, _, at)) => Offline::TooOld(at.elapsed()),
            Some((false, reason, _)) => Offline::Refused(reason.clone()),
            None => Offline::Never,
        }
    }

    /// Certificates remembered.
    pub fn len(&self) -> usize {
        self.known
            .lock()
            .expect("confirmations lock poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_answer_only_recent_confirmations_pass() {
        let c = Confirmations::new(Duration::from_millis(200));
        assert_eq!(c.offline("gd-001", "aa"), Offline::Never);
        c.remember("gd-001", "aa", true, "");
        c.remember("gd-002", "bb", false, "revoked");
        assert!(c.offline("gd-001", "aa").allowed());
        assert_eq!(c.offline("gd-001", "other"), Offline::Never, "per serial");
        assert_eq!(
            c.offline("gd-002", "bb"),
            Offline::Refused("revoked".into())
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(matches!(c.offline("gd-001", "aa"), Offline::TooOld(_)));
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_oldest() {
        let c = Confirmations::new(Duration::from_secs(60));
        for i in 0..MAX_KNOWN + 10 {
            c.remember(&format!("s{i}"), "aa", true, "");
        }
        assert_eq!(c.len(), MAX_KNOWN);
        assert!(c.offline(&format!("s{}", MAX_KNOWN + 9), "aa").allowed());
    }
}
