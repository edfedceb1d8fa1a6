//! Console sessions and login throttling.
//!
//! A session is 32 random bytes in an HttpOnly, Secure, SameSite=Strict cookie; the controller
//! keeps only the BLAKE3 hash of it (sled tree `sessions`, so a restart does not log the NOC
//! out, and a copy of the database gives no live session), with its user, its CSRF token, and
//! when it started and was last used. A session ends when idle for longer than the idle limit,
//! at its absolute limit, at logout, and when its user is disabled or its password changed.
//! Bounds: [`MAX_SESSIONS`] in all, [`MAX_PER_USER`] per user (the oldest go first).
//!
//! Logins are throttled per account and per client address ([`Throttle`]): after
//! [`FAILS_ALLOWED`] failures within [`FAIL_WINDOW_MS`], further attempts are refused until the
//! window has passed, without checking the password.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::now_ms;

pub const MAX_SESSIONS: usize = 10_000;
pub const MAX_PER_USER: usize = 20;
/// A session's last use is written back at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;

/// How long sessions live (from the `[console]` configuration).
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub idle_ms: i64,
    pub absolute_ms: i64,
    /// The kiosk's wall screen runs for weeks.
    pub kiosk_absolute_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    pub created_ms: i64,
    pub last_ms: i64,
    pub addr: Option<String>,
    pub kiosk: bool,
    /// The user's password-change time when the session began: a later change ends it.
    pub password_changed_ms: i64,
}

pub struct Sessions {
    tree: sled::Tree,
    live: Mutex<HashMap<[u8; 32], Session>>,
    pub lifetimes: Lifetimes,
}

fn key(cookie: &str) -> [u8; 32] {
    *blake3::hash(cookie.as_bytes()).as_bytes()
}

impl Sessions {
    /// Loads the sessions that have not expired.
    pub fn open(db: &sled::Db, lifetimes: Lifetimes) -> sled::Result<Sessions> {
        let tree = db.open_tree("sessions")?;
        let now = now_ms();
        let mut live = HashMap::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let s: Option<Session> = serde_json::from_slice(&v).ok();
            match (<[u8; 32]>::try_from(&k[..]), s) {
                (Ok(k), Some(s)) if !expired(&s, &lifetimes, now) => {
                    live.insert(k, s);
                }
                _ => {
                    tree.remove(k)?;
                }
            }
        }
        Ok(Sessions {
            tree,
            live: Mutex::new(live),
            lifetimes,
        })
    }

    /// Starts a session; returns the cookie value and the session.
    pub fn create(
        &self,
        user: &str,
        kiosk: bool,
        password_changed_ms: i64,
        addr: Option<String>,
    ) -> sled::Result<(String, Session)> {
        let cookie = hex::encode(rand::random::<[u8; 32]>());
        let now = now_ms();
        let s = Session {
            user: user.into(),
            csrf: hex::encode(rand::random::<[u8; 32]>()),
            created_ms: now,
            last_ms: now,
            addr,
            kiosk,
            password_changed_ms,
        };
        let mut dropped = Vec::new();
        {
            let mut live = self.live.lock().expect("sessions lock poisoned");
            let mut mine: Vec<([u8; 32], i64)> = live
                .iter()
                .filter(|(_, x)| x.user == user)
                .map(|(k, x)| (*k, x.last_ms))
                .collect();
            mine.sort_by_key(|(_, t)| *t);
            while mine.len() >= MAX_PER_USER {
                let (k, _) = mine.remove(0);
                live.remove(&k);
                dropped.push(k);
            }
            if live.len() >= MAX_SESSIONS {
                let now = now_ms();
                live.retain(|k, x| {
                    let keep = !expired(x, &self.lifetimes, now);
                    if !keep {
                        dropped.push(*k);
                    }
                    keep
                });
            }
            if live.len() >= MAX_SESSIONS
                && let Some(k) = live.iter().min_by_key(|(_, x)| x.last_ms).map(|(k, _)| *k)
            {
                live.remove(&k);
                dropped.push(k);
            }
            live.insert(key(&cookie), s.clone());
        }
        for k in dropped {
            self.tree.remove(k)?;
        }
        self.tree
            .insert(key(&cookie), serde_json::to_vec(&s).expect("serialises"))?;
        self.tree.flush()?;
        Ok((cookie, s))
    }

    /// The live session of a cookie (and marks it used); an expired one is ended here.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let k = key(cookie);
        let now = now_ms();
        let (s, write) = {
            let mut live = self.live.lock().expect("sessions lock poisoned");
            let s = live.get_mut(&k)?;
            if expired(s, &self.lifetimes, now) {
                live.remove(&k);
                drop(live);
                let _ = self.tree.remove(k);
                return None;
            }
            let write = now - s.last_ms > TOUCH_EVERY_MS;
            s.last_ms = now;
            (s.clone(), write)
        };
        if write {
            let _ = self
                .tree
                .insert(k, serde_json::to_vec(&s).expect("serialises"));
        }
        Some(s)
    }

    /// The live session of a cookie, without marking it used (an open event stream does not
    /// keep its session alive).
    pub fn peek(&self, cookie: &str) -> Option<Session> {
        let live = self.live.lock().expect("sessions lock poisoned");
        live.get(&key(cookie))
            .filter(|s| !expired(s, &self.lifetimes, now_ms()))
            .cloned()
    }

    pub fn end(&self, cookie: &str) {
        let k = key(cookie);
        self.live.lock().expect("sessions lock poisoned").remove(&k);
        let _ = self.tree.remove(k);
        let _ = self.tree.flush();
    }

    /// Ends every session of `user` (disabled, password changed, role changed).
    pub fn end_user(&self, user: &str) -> usize {
        let gone: Vec<[u8; 32]> = {
            let mut live = self.live.lock().expect("sessions lock poisoned");
            let gone: Vec<_> = live
                .iter()
                .filter(|(_, s)| s.user == user)
                .map(|(k, _)| *k)
                .collect();
            for k in &gone {
                live.remove(k);
            }
            gone
        };
        for k in &gone {
            let _ = self.tree.remove(k);
        }
        let _ = self.tree.flush();
        gone.len()
    }

    pub fn len(&self) -> usize {
        self.live.lock().expect("sessions lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn expired(s: &Session, l: &Lifetimes, now: i64) -> bool {
    let absolute = if s.kiosk {
        l.kiosk_absolute_ms
    } else {
        l.absolute_ms
    };
    now - s.last_ms > l.idle_ms || now - s.created_ms > absolute
}

/// Failed logins allowed per account, and per address, within the window.
pub const FAILS_ALLOWED: u32 = 5;
pub const ADDR_FAILS_ALLOWED: u32 = 20;
pub const FAIL_WINDOW_MS: i64 = 15 * 60_000;
/// Accounts and addresses remembered at most (the oldest are forgotten first).
pub const MAX_TRACKED: usize = 10_000;

#[derive(Clone, Copy)]
struct Fails {
    count: u32,
    first_ms: i64,
}

/// Failed-login counts per account and per address.
#[derive(Default)]
pub struct Throttle {
    by_user: Mutex<HashMap<String, Fails>>,
    by_addr: Mutex<HashMap<String, Fails>>,
}

fn blocked(map: &Mutex<HashMap<String, Fails>>, k: &str, allowed: u32, now: i64) -> Option<i64> {
    let m = map.lock().expect("throttle lock poisoned");
    let f = m.get(k)?;
    let until = f.first_ms + FAIL_WINDOW_MS;
    (f.count >= allowed && now < until).then_some(until - now)
}

fn note(map: &Mutex<HashMap<String, Fails>>, k: &str, now: i64) {
    let mut m = map.lock().expect("throttle lock poisoned");
    if m.len() >= MAX_TRACKED && !m.contains_key(k) {
        m.retain(|_, f| now - f.first_ms < FAIL_WINDOW_MS);
        if m.len() >= MAX_TRACKED
            && let Some(old) = m
                .iter()
                .min_by_key(|(_, f)| f.first_ms)
                .map(|(k, _)| k.clone())
        {
            m.remove(&old);
        }
    }
    let f = m.entry(k.to_string()).or_insert(Fails {
        count: 0,
        first_ms: now,
    });
    if now - f.first_ms >= FAIL_WINDOW_MS {
        *f = Fails {
            count: 0,
            first_ms: now,
        };
    }
    f.count += 1;
}

impl Throttle {
    /// `Some(ms to wait)` when the account or the address has failed too often.
    pub fn check(&self, user: &str, addr: &str) -> Option<i64> {
        let now = now_ms();
        let u = blocked(&self.by_user, user, FAILS_ALLOWED, now);
        let a = blocked(&self.by_addr, addr, ADDR_FAILS_ALLOWED, now);
        u.into_iter().chain(a).max()
    }

    pub fn failed(&self, user: &str, addr: &str) {
        let now = now_ms();
        note(&self.by_user, user, now);
        note(&self.by_addr, addr, now);
    }

    /// A good login clears the account's count (not the address's: one good password does not
    /// excuse guessing at others from there).
    pub fn succeeded(&self, user: &str) {
        self.by_user
            .lock()
            .expect("throttle lock poisoned")
            .remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Lifetimes = Lifetimes {
        idle_ms: 60_000,
        absolute_ms: 3_600_000,
        kiosk_absolute_ms: 86_400_000,
    };

    #[test]
    fn sessions_expire_persist_and_are_bounded_per_user() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let s = Sessions::open(&db, L).unwrap();
        let (c, sess) = s.create("alice", false, 0, None).unwrap();
        assert_eq!(s.get(&c).unwrap().csrf, sess.csrf);
        assert!(s.get("not a cookie").is_none());
        // The least recently used goes first (within one millisecond the order is arbitrary).
        s.live.lock().unwrap().get_mut(&key(&c)).unwrap().last_ms -= 10;
        let mut cookies = vec![c.clone()];
        for _ in 0..MAX_PER_USER {
            cookies.push(s.create("alice", false, 0, None).unwrap().0);
        }
        assert!(s.get(&cookies[0]).is_none(), "the oldest of too many went");
        assert!(s.get(cookies.last().unwrap()).is_some());
        drop(s);
        let s = Sessions::open(&db, L).unwrap();
        assert!(
            s.get(cookies.last().unwrap()).is_some(),
            "kept across a restart"
        );
        assert_eq!(s.end_user("alice"), MAX_PER_USER);
        assert!(s.get(cookies.last().unwrap()).is_none());
        // Expiry by age: a session created long ago is refused.
        let (c, _) = s.create("bob", false, 0, None).unwrap();
        s.live.lock().unwrap().get_mut(&key(&c)).unwrap().last_ms -= 61_000;
        assert!(s.get(&c).is_none());
    }

    #[test]
    fn throttle_per_account_and_address() {
        let t = Throttle::default();
        for _ in 0..FAILS_ALLOWED {
            assert!(t.check("alice", "10.0.0.1").is_none());
            t.failed("alice", "10.0.0.1");
        }
        assert!(
            t.check("alice", "10.0.0.2").is_some(),
            "the account is held"
        );
        assert!(t.check("bob", "10.0.0.1").is_none());
        for i in 0..ADDR_FAILS_ALLOWED {
            t.failed(&format!("u{i}"), "10.0.0.9");
        }
        assert!(
            t.check("carol", "10.0.0.9").is_some(),
            "the address is held"
        );
        t.succeeded("alice");
        assert!(t.check("alice", "10.0.0.2").is_none());
    }
}
