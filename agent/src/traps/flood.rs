//! What a flood of traps becomes (free of I/O): per device and event, the first
//! `per_minute` in a minute go on one by one; the rest are counted and go as one summarised
//! event (`count`) with the next report. Bounded in keys and in queued events; whatever does
//! not fit is still counted, never silently lost.

use std::collections::{HashMap, VecDeque};

use tiandi_proto::DeviceEvent;

/// The window a key's allowance is counted over.
pub const WINDOW_MS: i64 = 60_000;
/// Events waiting for the next report, at most.
pub const MAX_QUEUED: usize = 256;
/// (device, event) pairs followed at once, at most (devices × their profiles' trap rules).
pub const MAX_KEYS: usize = 1024;

#[derive(Default)]
struct Key {
    window_start: i64,
    sent: u32,
    /// Summarised since the last summary: (count, first at_ms, severity, last detail).
    held: Option<(u32, i64, i32, String)>,
}

pub struct Flood {
    per_minute: u32,
    keys: HashMap<(String, String), Key>,
    queue: VecDeque<DeviceEvent>,
    /// Events folded into summaries, ever.
    pub summarised: u64,
    /// Events passed on one by one, ever.
    pub forwarded: u64,
}

impl Flood {
    pub fn new(per_minute: u32) -> Flood {
        Flood {
            per_minute: per_minute.max(1),
            keys: HashMap::new(),
            queue: VecDeque::new(),
            summarised: 0,
            forwarded: 0,
        }
    }

    /// Takes one event (its `count` 1). Returns whether it is to go at once (true) or was
    /// folded into a summary.
    pub fn offer(&mut self, ev: DeviceEvent) -> bool {
        let now = ev.at_ms;
        if self.keys.len() >= MAX_KEYS
            && !self
                .keys
                .contains_key(&(ev.device.clone(), ev.name.clone()))
        {
            // Past the bound of keys: forget those whose window is over and hold nothing.
            self.keys
                .retain(|_, k| k.held.is_some() || now - k.window_start < WINDOW_MS);
        }
        let fits = self.keys.len() < MAX_KEYS;
        let key = (ev.device.clone(), ev.name.clone());
        let k = if fits {
            self.keys.entry(key).or_default()
        } else {
            // Still too many (more devices and rules than a site has): summarised under one
            // shared key, not lost.
            self.keys
                .entry(("traps".into(), "other".into()))
                .or_default()
        };
        if now - k.window_start >= WINDOW_MS {
            k.window_start = now;
            k.sent = 0;
        }
        if fits && k.sent < self.per_minute && self.queue.len() < MAX_QUEUED {
            k.sent += 1;
            self.forwarded += 1;
            self.queue.push_back(ev);
            return true;
        }
        self.summarised += 1;
        match k.held.as_mut() {
            Some((n, _, sev, detail)) => {
                *n = n.saturating_add(1);
                *sev = (*sev).max(ev.severity);
                *detail = ev.detail;
            }
            None => k.held = Some((1, ev.at_ms, ev.severity, ev.detail)),
        }
        false
    }

    /// Whether anything waits for a report.
    pub fn pending(&self) -> bool {
        !self.queue.is_empty() || self.keys.values().any(|k| k.held.is_some())
    }

    /// Everything for the next report: the events passed on one by one, oldest first, then one
    /// summary per (device, event) that had more than its allowance.
    pub fn take(&mut self) -> Vec<DeviceEvent> {
        let mut out: Vec<DeviceEvent> = self.queue.drain(..).collect();
        let mut summaries: Vec<DeviceEvent> = self
            .keys
            .iter_mut()
            .filter_map(|((device, name), k)| {
                let (count, at_ms, severity, detail) = k.held.take()?;
                Some(DeviceEvent {
                    device: device.clone(),
                    name: name.clone(),
                    severity,
                    at_ms,
                    count,
                    detail,
                    ..Default::default()
                })
            })
            .collect();
        summaries.sort_by_key(|e| e.at_ms);
        out.extend(summaries);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(device: &str, name: &str, at_ms: i64) -> DeviceEvent {
        DeviceEvent {
            device: device.into(),
            name: name.into(),
            severity: tiandi_proto::Severity::Major as i32,
            at_ms,
            count: 1,
            detail: format!("#{at_ms}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_flood_goes_as_its_first_few_and_one_summary() {
        let mut f = Flood::new(5);
        let mut now = 1_000_000;
        let mut at_once = 0;
        for _ in 0..1000 {
            now += 10;
            at_once += usize::from(f.offer(ev("router", "link-down", now)));
        }
        // Another device's trap in the middle of it goes at once.
        assert!(f.offer(ev("ups", "on-battery", now)));
        assert_eq!(at_once, 5);
        let out = f.take();
        assert_eq!(out.len(), 7, "{out:?}");
        assert!(
            out[..5]
                .iter()
                .all(|e| e.count == 1 && e.name == "link-down")
        );
        assert_eq!(out[5].name, "on-battery");
        let s = &out[6];
        assert_eq!((s.name.as_str(), s.count), ("link-down", 995));
        assert_eq!(s.detail, format!("#{now}"), "the last one's detail");
        assert_eq!((f.forwarded, f.summarised), (6, 995));
        assert!(!f.pending());
        // A minute later the allowance is back.
        assert!(f.offer(ev("router", "link-down", now + WINDOW_MS)));
    }

    #[test]
    fn keys_and_the_queue_are_bounded_and_nothing_goes_uncounted() {
        let mut f = Flood::new(1);
        for i in 0..(MAX_KEYS as i64 + 500) {
            f.offer(ev(&format!("d{i}"), "x", 1));
        }
        assert!(f.keys.len() <= MAX_KEYS + 1);
        let out = f.take();
        assert!(out.len() <= MAX_QUEUED + MAX_KEYS + 1);
        let total: u64 = out.iter().map(|e| u64::from(e.count)).sum();
        assert_eq!(total, MAX_KEYS as u64 + 500);
    }
}
