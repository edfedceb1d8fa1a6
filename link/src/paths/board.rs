//! A dual-homed component's paths at run time: one connection per path (to the controller, or
//! to a conference relay), each made ready before it is needed (see the parent module for why
//! not one migrated connection). The [`Board`] holds every path's connection and health and the
//! selector's decision; a path's session asks it what goes over that path, and (the agent's
//! uplink) sends the controller a `Paths` frame when something changes, so that the controller
//! drives each transfer class on the path the site chose and shows the site's paths.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::policy_from_wire;
use super::{Class, Health, PathSpec, PathState, Policy, Sample, Selector, Switch};
use tiandi_proto::{ClassUse, PathPolicy, PathStatus, PathSwitch, Paths};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often health is sampled and the selector runs.
pub const TICK: Duration = Duration::from_millis(50);
/// Switch events kept for the `Paths` frames (each connection sends those it has not sent).
const SWITCHES_KEPT: usize = 16;
/// A path down this long has its connection closed and made anew: a connection whose probes
/// went unanswered for long has backed its retransmissions off to tens of seconds, and would
/// notice the line's return late.
pub const REDIAL_AFTER: Duration = Duration::from_secs(3);

struct Inner {
    selector: Selector,
    health: Vec<Health>,
    conns: Vec<Option<quinn::Connection>>,
    switches: VecDeque<(u64, Switch)>,
    next_switch: u64,
    /// Site clock of each path's state change (for `since_ms`).
    since_ms: Vec<i64>,
    states: Vec<PathState>,
}

/// Every path of one site: connections, health, and which path each class uses.
pub struct Board {
    inner: Mutex<Inner>,
    /// Bumped on every change of a path's state or of a class's path.
    version: watch::Sender<u64>,
    /// This run's random ID (in `Paths` frames, with the version).
    run: u64,
}

/// A path's part in a session: which path this connection runs over.
#[derive(Clone)]
pub struct PathCtx {
    pub index: usize,
    pub board: Arc<Board>,
}

impl PathCtx {
    pub fn name(&self) -> String {
        self.board.name(self.index)
    }
}

impl Board {
    pub fn new(paths: Vec<PathSpec>, policy: Policy) -> Arc<Board> {
        let now = Instant::now();
        let n = paths.len();
        Arc::new(Board {
            inner: Mutex::new(Inner {
                health: paths.iter().map(|p| Health::new(p.probe(), now)).collect(),
                selector: Selector::new(paths, policy),
                conns: vec![None; n],
                switches: VecDeque::new(),
                next_switch: 1,
                since_ms: vec![crate::clock::now_ms(); n],
                states: vec![PathState::Down; n],
            }),
            version: watch::channel(0).0,
            run: rand::random::<u64>().max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("paths board lock poisoned")
    }

    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn name(&self, i: usize) -> String {
        self.lock().selector.paths()[i].name.clone()
    }

    pub fn spec(&self, i: usize) -> PathSpec {
        self.lock().selector.paths()[i].clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A session on path `i` is up on `conn`.
    pub fn connected(&self, i: usize, conn: &quinn::Connection) {
        {
            let mut g = self.lock();
            g.conns[i] = Some(conn.clone());
            g.health[i].connected(Instant::now(), &Sample::of(conn));
        }
        self.tick();
    }

    /// The session on path `i` over `conn` ended.
    pub fn disconnected(&self, i: usize, conn: &quinn::Connection) {
        {
            let mut g = self.lock();
            if g.conns[i]
                .as_ref()
                .is_none_or(|c| c.stable_id() != conn.stable_id())
            {
                return;
            }
            g.conns[i] = None;
            g.health[i].disconnected(Instant::now());
        }
        self.tick();
    }

    pub fn state(&self, i: usize) -> PathState {
        self.lock().health[i].state
    }

    /// How long path `i` has been in its state.
    pub fn state_for(&self, i: usize) -> (PathState, Duration) {
        let g = self.lock();
        (g.health[i].state, g.health[i].since.elapsed())
    }

    /// Whether another path than `i` is up (then `i`'s failures are its own, not the
    /// controller's, and it may be redialled at once).
    pub fn other_up(&self, i: usize) -> bool {
        let g = self.lock();
        (0..g.health.len()).any(|j| j != i && g.health[j].state == PathState::Up)
    }

    /// The path `class` uses now.
    pub fn current(&self, class: Class) -> Option<usize> {
        self.lock().selector.current(class)
    }

    /// Whether reports go out over path `i`: it is the reports' path, or that path is not up
    /// (suspect: it may be dying) and `i` is the first other path that is.
    pub fn reports_here(&self, i: usize) -> bool {
        let g = self.lock();
        match g.selector.current(Class::Reports) {
            Some(r) if r == i => true,
            Some(r) if g.health[r].state == PathState::Up => false,
            _ => {
                g.health[i].state == PathState::Up
                    && (0..g.health.len()).find(|&j| g.health[j].state == PathState::Up) == Some(i)
            }
        }
    }

    /// Whether a critical report goes out over path `i` too.
    pub fn critical_here(&self, i: usize) -> bool {
        let g = self.lock();
        g.selector.critical_paths(&g.health).contains(&i)
    }

    /// A policy from the controller.
    pub fn set_policy(&self, wire: &PathPolicy) {
        let policy = policy_from_wire(wire);
        if let Err(e) = policy.validate() {
            warn!(error = %e, "The controller's path policy is invalid; keeping the current one.");
            return;
        }
        let changed = {
            let mut g = self.lock();
            let changed = g.selector.policy() != &policy;
            if changed {
                info!(?policy, "Path policy from the controller.");
                g.selector.set_policy(policy);
            }
            changed
        };
        if changed {
            self.tick();
        }
    }

    /// Samples every path's connection and decides; bumps the version on a change.
    pub fn tick(&self) {
        let changed = {
            let mut g = self.lock();
            let now = Instant::now();
            let unix_ms = crate::clock::now_ms();
            let mut changed = false;
            for i in 0..g.conns.len() {
                if let Some(c) = g.conns[i].clone() {
                    g.health[i].observe(now, &Sample::of(&c));
                }
                let state = g.health[i].state;
                if state != g.states[i] {
                    info!(path = %g.selector.paths()[i].name, from = g.states[i].as_str(), to = state.as_str(), silent_ms = g.health[i].silent(now).as_millis() as u64, "Path state changed.");
                    g.states[i] = state;
                    g.since_ms[i] = unix_ms;
                    changed = true;
                }
            }
            let Inner {
                selector, health, ..
            } = &mut *g;
            if selector.decide(now, unix_ms, health) {
                changed = true;
            }
            for s in selector.take_events() {
                info!(class = s.class.as_str(), from = s.from.as_deref().unwrap_or("-"), to = s.to.as_deref().unwrap_or("-"), reason = %s.reason, "Class switched path.");
                let id = g.next_switch;
                g.next_switch += 1;
                if g.switches.len() == SWITCHES_KEPT {
                    g.switches.pop_front();
                }
                g.switches.push_back((id, s));
            }
            changed
        };
        if changed {
            self.bump();
        }
    }

    /// The `Paths` frame for a connection that has sent the switches up to `sent_through`;
    /// returns it and the newest switch id in it.
    pub fn wire(&self, sent_through: u64) -> (Paths, u64) {
        let g = self.lock();
        let paths = g
            .selector
            .paths()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let h = &g.health[i];
                PathStatus {
                    name: p.name.clone(),
                    kind: match p.kind() {
                        super::PathKind::Ground => "ground".into(),
                        super::PathKind::Sky => "sky".into(),
                    },
                    state: h.state.as_str().into(),
                    rtt_ms: h.rtt.as_millis().min(u128::from(u32::MAX)) as u32,
                    loss_permille: (h.loss * 1000.0).round() as u32,
                    tx_kbps: (h.tx_bps * 8.0 / 1000.0).round() as u32,
                    rx_kbps: (h.rx_bps * 8.0 / 1000.0).round() as u32,
                    budget_kbps: p.budget_kbps,
                    since_ms: g.since_ms[i],
                }
            })
            .collect();
        let uses = Class::ALL
            .into_iter()
            .filter_map(|c| {
                g.selector.current(c).map(|i| ClassUse {
                    class: c.as_str().into(),
                    path: g.selector.paths()[i].name.clone(),
                })
            })
            .collect();
        let mut last = sent_through;
        let switches = g
            .switches
            .iter()
            .filter(|(id, _)| *id > sent_through)
            .map(|(id, s)| {
                last = last.max(*id);
                PathSwitch {
                    at_ms: s.at_ms,
                    class: s.class.as_str().into(),
                    from: s.from.clone().unwrap_or_default(),
                    to: s.to.clone().unwrap_or_default(),
                    reason: s.reason.clone(),
                }
            })
            .collect();
        (
            Paths {
                paths,
                uses,
                switches,
                run: self.run,
                version: *self.version.borrow(),
            },
            last,
        )
    }

    /// Samples and decides every [`TICK`] until cancelled; closes the connection of a path
    /// down for [`REDIAL_AFTER`] so that its session dials again.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.tick();
            let stale: Vec<quinn::Connection> = {
                let g = self.lock();
                (0..g.conns.len())
                    .filter(|&i| {
                        g.health[i].state == PathState::Down
                            && g.health[i].since.elapsed() >= REDIAL_AFTER
                    })
                    .filter_map(|i| g.conns[i].clone())
                    .collect()
            };
            for c in stale {
                c.close(0u32.into(), b"path down: dialling again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::policy_to_wire;
    use tiandi_proto::ClassRule;

    #[test]
    fn a_policy_survives_the_wire_and_unknown_classes_are_skipped() {
        let p: Policy = toml::from_str(
            "critical_on_all = false\n[classes]\nbulk = [\"ground\", \"sky@window\"]\n",
        )
        .unwrap();
        let mut w = policy_to_wire(&p);
        assert_eq!(policy_from_wire(&w), p);
        w.classes.push(ClassRule {
            class: "holograms".into(),
            paths: vec!["sky".into()],
        });
        assert_eq!(policy_from_wire(&w), p);
    }

    #[test]
    fn without_connections_no_path_carries_reports_and_the_wire_says_so() {
        let mut sky = PathSpec::named("sky");
        sky.profile = Some(crate::LinkProfile::Geo);
        let b = Board::new(vec![PathSpec::named("ground"), sky], Policy::default());
        b.tick();
        assert!(!b.reports_here(0) && !b.reports_here(1));
        let (w, last) = b.wire(0);
        assert_eq!(last, 0);
        assert_eq!(w.paths.len(), 2);
        assert_eq!(w.paths[1].kind, "sky");
        assert!(w.paths.iter().all(|p| p.state == "down"));
        assert!(w.uses.is_empty());
    }
}
