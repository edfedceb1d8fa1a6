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

    /// Changes both directions' shaping with `key=value` settings; `rate_*` settings given as
    /// `up_rate_kbit`/`down_rate_mbit` etc. apply to one direction only. All or nothing.
    pub fn set(&self, settings: &[(String, String)]) -> Result<(), String> {
        let mut l = self.lock();
        let (mut up, mut down) = (l.up.shape.clone(), l.down.shape.clone());
        for (k, v) in settings {
            let one = [(k.clone(), v.clone())];
            if let Some(rest) = k.strip_prefix("up_") {
                up.apply(&[(rest.to_string(), v.clone())])?;
            } else if let Some(rest) = k.strip_prefix("down_") {
                down.apply(&[(rest.to_string(), v.clone())])?;
            } else {
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
                if let Fate::Deliver { at, flip } = link.offer(upward, frame, now) {
                    if in_flight + n > MAX_IN_FLIGHT {
                        continue;
                    }
                    let mut frame = frame.to_vec();
                    if let Some((byte, bit)) = flip {
                        frame[byte] ^= 1 << bit;
                    }
                    in_flight += n;
                    order += 1;
                    line.push(Reverse(InFlight { at, order, frame }));
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
