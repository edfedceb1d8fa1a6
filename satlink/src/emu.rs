//! The emulator proper: frames read from one TAP device are scheduled by the [`model`] and
//! written to the other at their delivery instant. One task per direction, each owning its
//! delay line (a heap ordered by delivery time, then arrival).
//!
//! [`model`]: crate::model

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tun_rs::AsyncDevice;

use crate::model::{Counters, Direction, Fate, Shape};

/// Largest frame read from a TAP device (jumbo frames are not used).
const MAX_FRAME: usize = 65_536;
/// Bytes in flight on the delay line beyond which frames are dropped: only reachable with an
/// unlimited rate, where nothing else bounds it.
const MAX_IN_FLIGHT: usize = 256 << 20;

/// Both directions of one link, shared with whoever controls it.
pub struct Link {
    /// Site to hub.
    pub up: Direction,
    /// Hub to site.
    pub down: Direction,
}

/// What [`LinkHandle::status`] reports.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    pub cut: bool,
    pub up: Shape,
    pub down: Shape,
    pub up_counters: Counters,
    pub down_counters: Counters,
}

/// Control of a running link: cut, restore, change shaping (rain fade), read counters.
#[derive(Clone)]
pub struct LinkHandle(Arc<Mutex<Link>>);

impl LinkHandle {
    pub fn new(up: Shape, down: Shape, seed: Option<u64>) -> LinkHandle {
        LinkHandle(Arc::new(Mutex::new(Link {
            up: Direction::new(up, seed),
            down: Direction::new(down, seed.map(|s| s.wrapping_add(1))),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Link> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Outage: every frame is dropped, including those already on their way.
    pub fn cut(&self) {
        let mut l = self.lock();
        l.up.set_cut(true);
        l.down.set_cut(true);
    }

    pub fn restore(&self) {
        let mut l = self.lock();
        l.up.set_cut(false);
        l.down.set_cut(false);
    }

    /// Changes both directions' shaping with `key=value` settings ([`Shape::apply`]'s keys);
    /// any key prefixed with `up_` or `down_` (`up_rate_mbit`, `down_loss_pct`,
    /// `up_displace_pct`...) applies to that direction only. All or nothing; an error names
    /// the key as given, prefix included.
    pub fn set(&self, settings: &[(String, String)]) -> Result<(), String> {
        let mut l = self.lock();
        let (mut up, mut down) = (l.up.shape.clone(), l.down.shape.clone());
        for (k, v) in settings {
            let named = |e: String| format!("{k}: {e}");
            if let Some(rest) = k.strip_prefix("up_") {
                up.apply(&[(rest.to_string(), v.clone())]).map_err(named)?;
            } else if let Some(rest) = k.strip_prefix("down_") {
                down.apply(&[(rest.to_string(), v.clone())])
                    .map_err(named)?;
            } else {
                let one = [(k.clone(), v.clone())];
                up.apply(&one)?;
                down.apply(&one)?;
            }
        }
        l.up.shape = up;
        l.down.shape = down;
        Ok(())
    }

    pub fn status(&self) -> LinkStatus {
        let l = self.lock();
        LinkStatus {
            cut: l.up.cut,
            up: l.up.shape.clone(),
            down: l.down.shape.clone(),
            up_counters: l.up.counters,
            down_counters: l.down.counters,
        }
    }

    fn offer(&self, upward: bool, frame: &[u8], now: Instant) -> Fate {
        let mut l = self.lock();
        if upward {
            l.up.offer(frame, now)
        } else {
            l.down.offer(frame, now)
        }
    }

    fn is_cut(&self) -> bool {
        self.lock().up.cut
    }
}

/// Runs a link between two TAP devices until cancelled.
pub async fn run(site: AsyncDevice, hub: AsyncDevice, link: LinkHandle, cancel: CancellationToken) {
    let site = Arc::new(site);
    let hub = Arc::new(hub);
    let up = tokio::spawn(direction(
        site.clone(),
        hub.clone(),
        link.clone(),
        true,
        cancel.clone(),
    ));
    let down = tokio::spawn(direction(hub, site, link, false, cancel));
    let _ = tokio::join!(up, down);
}

struct InFlight {
    at: Instant,
    order: u64,
    frame: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

async fn direction(
    src: Arc<AsyncDevice>,
    dst: Arc<AsyncDevice>,
    link: LinkHandle,
    upward: bool,
    cancel: CancellationToken,
) {
    let mut line: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut in_flight = 0usize;
    let mut order = 0u64;
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let next = line.peek().map(|Reverse(f)| f.at);
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = src.recv(&mut buf) => {
                let n = match r {
                    Ok(n) => n,
                    Err(error) => {
                        // The device went away (torn down): nothing more to carry.
                        tracing::debug!(%error, upward, "TAP read failed; direction stops.");
                        return;
                    }
                };
                let frame = &buf[..n];
                let now = Instant::now();
                if let Fate::Deliver { at, flip, dup } = link.offer(upward, frame, now) {
                    if in_flight + n > MAX_IN_FLIGHT {
                        continue;
                    }
                    let mut frame = frame.to_vec();
                    if let Some((byte, bit)) = flip {
                        frame[byte] ^= 1 << bit;
                    }
                    // The copy carries the same bytes and is pushed after the original, so it
                    // follows it even at the same instant.
                    let copy = dup
                        .filter(|_| in_flight + 2 * n <= MAX_IN_FLIGHT)
                        .map(|at| (at, frame.clone()));
                    in_flight += n;
                    order += 1;
                    line.push(Reverse(InFlight { at, order, frame }));
                    if let Some((at, frame)) = copy {
                        in_flight += n;
                        order += 1;
                        line.push(Reverse(InFlight { at, order, frame }));
                    }
                }
            }
            _ = sleep_until(next), if next.is_some() => {}
        }
        let now = Instant::now();
        let cut = link.is_cut();
        while line.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Some(Reverse(f)) = line.pop() else { break };
            in_flight -= f.frame.len();
            if cut {
                continue;
            }
            // A full TAP queue or a device going down loses the frame, as on a real wire.
            let _ = dst.send(&f.frame).await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(link: &LinkHandle, settings: &[(&str, &str)]) -> Result<(), String> {
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        link.set(&settings)
    }

    #[test]
    fn set_takes_any_key_per_direction_and_names_bad_ones_in_full() {
        let link = LinkHandle::new(Shape::default(), Shape::default(), Some(1));
        set(
            &link,
            &[
                ("up_displace_pct", "2"),
                ("down_dup_pct", "1"),
                ("displace_ms", "5"),
                ("down_loss", "3"),
            ],
        )
        .expect("valid");
        let st = link.status();
        assert_eq!((st.up.displace_pct, st.down.displace_pct), (2.0, 0.0));
        assert_eq!((st.up.dup_pct, st.down.dup_pct), (0.0, 1.0));
        assert_eq!((st.up.displace_ms, st.down.displace_ms), (5.0, 5.0));
        assert_eq!((st.up.loss_pct, st.down.loss_pct), (0.0, 3.0));

        for (key, value) in [
            ("up_foo", "1"),
            ("down_bar", "1"),
            ("up_dup_pct", "101"),
            ("down_displace_ms", "x"),
        ] {
            let e = set(&link, &[("up_loss_pct", "9"), (key, value)]).unwrap_err();
            assert!(e.contains(key), "{key}={value}: {e}");
        }
        let st = link.status();
        assert_eq!(st.up.loss_pct, 0.0, "a failed set changes nothing");
        assert_eq!(st.down.dup_pct, 1.0);
    }
}
