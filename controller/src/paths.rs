//! Dual-homed sites (issue 20): a site's connections, one per path (`ground`, `sky`), which
//! path each transfer class of the site uses (the site decides and says so in its `Paths`
//! frames), and what the controller shows of them: each path's state and figures, the class
//! uses, the latest switches, and whether the site is down to one path (redundancy lost).
//!
//! A site with one path (an empty path name in its Hello) has one connection, which carries
//! every class, as before paths existed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tiandi_link::congestion::RateSlot;
use tiandi_link::paths::{Class, MAX_PATHS};
use tiandi_proto::Paths;
use tiandi_transfer::outbox::ClassRoute;
use tokio::sync::watch;

/// Switches kept per site for the API and the console (newest last).
pub const SWITCHES_KEPT: usize = 20;
/// The longest switch reason accepted from a site.
const REASON_MAX: usize = 80;

/// One path of a site, as the site last described it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathView {
    pub name: String,
    /// `ground` or `sky`.
    pub kind: String,
    /// `up`, `suspect` or `down`, as the site sees it.
    pub state: String,
    pub rtt_ms: u32,
    pub loss_pct: f64,
    pub tx_kbps: u32,
    pub rx_kbps: u32,
    pub budget_kbps: u32,
    /// Site clock, Unix ms, of its last change of state.
    pub since_ms: i64,
    /// Whether the controller holds a live connection of the site on this path.
    pub connected: bool,
}

/// One switch of a class from a path to another.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SwitchView {
    pub at_ms: i64,
    pub class: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
}

/// A dual-homed site's paths, as the API and the console show them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SitePaths {
    pub paths: Vec<PathView>,
    /// Class → the path it uses now (a class with no usable path is absent).
    pub uses: BTreeMap<String, String>,
    /// The latest switches, oldest first.
    pub switches: VecDeque<SwitchView>,
    /// Controller clock of the last `Paths` frame.
    pub updated_ms: i64,
}

impl SitePaths {
    /// The redundancy-lost alarm's detail when the site has two paths or more and only one is
    /// up (none up is the site being down, another alarm).
    pub fn redundancy_lost(&self) -> Option<String> {
        if self.paths.len() < 2 {
            return None;
        }
        let up: Vec<&str> = self
            .paths
            .iter()
            .filter(|p| p.state == "up")
            .map(|p| p.name.as_str())
            .collect();
        if up.len() != 1 {
            return None;
        }
        let down: Vec<&str> = self
            .paths
            .iter()
            .filter(|p| p.state != "up")
            .map(|p| p.name.as_str())
            .collect();
        Some(format!("only {} is up ({} down)", up[0], down.join(", ")))
    }
}

/// A checked `Paths` frame: the paths, the class uses (class → path), the switches.
pub type Checked = (Vec<PathView>, BTreeMap<String, String>, Vec<SwitchView>);

/// A site's `Paths` frame, checked: every name passes the one validator, every list has a
/// bound, unknown classes and states are refused.
pub fn check(frame: &Paths) -> Result<Checked, String> {
    if frame.paths.len() > MAX_PATHS {
        return Err(format!("{} paths: at most {MAX_PATHS}", frame.paths.len()));
    }
    if frame.uses.len() > Class::ALL.len() || frame.switches.len() > 64 {
        return Err("too many class uses or switches".into());
    }
    let name = |what: &str, s: &str| {
        tiandi_link::names::validate_name(what, s)
            .map(|()| s.to_string())
            .map_err(|e| e.to_string())
    };
    let mut paths = Vec::with_capacity(frame.paths.len());
    for p in &frame.paths {
        let n = name("path name", &p.name)?;
        if paths.iter().any(|q: &PathView| q.name == n) {
            return Err(format!("path {n} listed twice"));
        }
        if !matches!(p.kind.as_str(), "ground" | "sky") {
            return Err(format!("path {n}: kind {:?} is not ground or sky", p.kind));
        }
        if !matches!(p.state.as_str(), "up" | "suspect" | "down") {
            return Err(format!(
                "path {n}: state {:?} is not up, suspect or down",
                p.state
            ));
        }
        paths.push(PathView {
            name: n,
            kind: p.kind.clone(),
            state: p.state.clone(),
            rtt_ms: p.rtt_ms,
            loss_pct: f64::from(p.loss_permille.min(1000)) / 10.0,
            tx_kbps: p.tx_kbps,
            rx_kbps: p.rx_kbps,
            budget_kbps: p.budget_kbps,
            since_ms: p.since_ms,
            connected: false,
        });
    }
    let known = |n: &str| paths.iter().any(|p| p.name == n);
    let mut uses = BTreeMap::new();
    for u in &frame.uses {
        let class = Class::parse(&u.class).ok_or_else(|| format!("unknown class {:?}", u.class))?;
        let p = name("path name", &u.path)?;
        if !known(&p) {
            return Err(format!(
                "class {} uses path {p}, which is not listed",
                class.as_str()
            ));
        }
        uses.insert(class.as_str().to_string(), p);
    }
    let mut switches = Vec::with_capacity(frame.switches.len());
    for s in &frame.switches {
        let class = Class::parse(&s.class).ok_or_else(|| format!("unknown class {:?}", s.class))?;
        let opt = |v: &str| -> Result<Option<String>, String> {
            if v.is_empty() {
                Ok(None)
            } else {
                name("path name", v).map(Some)
            }
        };
        let reason: String = s
            .reason
            .chars()
            .filter(|c| !c.is_control())
            .take(REASON_MAX)
            .collect();
        switches.push(SwitchView {
            at_ms: s.at_ms,
            class: class.as_str().into(),
            from: opt(&s.from)?,
            to: opt(&s.to)?,
            reason,
        });
    }
    Ok((paths, uses, switches))
}

/// Per site: its live connections by path, and the class uses its transfers follow.
struct SiteLinks {
    /// (path name, connection, its congestion controller's rate); "" for a site with one
    /// path.
    conns: Vec<(String, quinn::Connection, RateSlot)>,
    /// Class → path, as the site's latest `Paths` frame said (read by its drivers).
    uses: Arc<Mutex<BTreeMap<String, String>>>,
    /// Bumped when `uses` changes: the transfer drivers look again.
    changes: watch::Sender<u64>,
    /// (run, version) of the newest `Paths` frame applied.
    seen: (u64, u64),
}

impl Default for SiteLinks {
    fn default() -> Self {
        SiteLinks {
            conns: Vec::new(),
            uses: Arc::default(),
            changes: watch::channel(0).0,
            seen: (0, 0),
        }
    }
}

/// Every site's connections.
#[derive(Default)]
pub struct Links {
    sites: Mutex<HashMap<String, SiteLinks>>,
}

/// A site asked for more paths than [`MAX_PATHS`].
#[derive(Debug, PartialEq)]
pub struct TooManyPaths;

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SiteLinks>> {
        self.sites.lock().expect("links lock poisoned")
    }

    /// Registers a site's connection on `path`; returns the ones it replaces (the same
    /// path's older connection; every other one for a site with one path, `""`).
    pub fn register(
        &self,
        site: &str,
        path: &str,
        conn: &quinn::Connection,
        rate: &RateSlot,
    ) -> Result<Vec<quinn::Connection>, TooManyPaths> {
        let mut g = self.lock();
        let s = g.entry(site.to_string()).or_default();
        let mut old = Vec::new();
        s.conns.retain(|(p, c, _)| {
            // A one-path site replaces everything; a path replaces itself and a one-path
            // connection (the agent was reconfigured).
            let replaced = path.is_empty() || p == path || p.is_empty();
            if replaced {
                old.push(c.clone());
            }
            !replaced
        });
        if s.conns.len() >= MAX_PATHS {
            return Err(TooManyPaths);
        }
        s.conns.push((path.to_string(), conn.clone(), rate.clone()));
        Ok(old)
    }

    /// Forgets a connection that ended; returns whether the site has no connection left.
    pub fn unregister(&self, site: &str, conn: &quinn::Connection) -> bool {
        let mut g = self.lock();
        let Some(s) = g.get_mut(site) else {
            return true;
        };
        s.conns
            .retain(|(_, c, _)| c.stable_id() != conn.stable_id());
        let none = s.conns.is_empty();
        if none {
            g.remove(site);
        }
        none
    }

    pub fn is_connected(&self, site: &str) -> bool {
        self.lock().get(site).is_some_and(|s| !s.conns.is_empty())
    }

    /// The path names the site has live connections on.
    pub fn connected_paths(&self, site: &str) -> Vec<String> {
        self.lock()
            .get(site)
            .map(|s| s.conns.iter().map(|(p, _, _)| p.clone()).collect())
            .unwrap_or_default()
    }

    /// Every live connection.
    pub fn all(&self) -> Vec<quinn::Connection> {
        self.lock()
            .values()
            .flat_map(|s| s.conns.iter().map(|(_, c, _)| c.clone()))
            .collect()
    }

    /// Takes every connection out (to close them).
    pub fn drain(&self) -> Vec<quinn::Connection> {
        self.lock()
            .drain()
            .flat_map(|(_, s)| s.conns.into_iter().map(|(_, c, _)| c))
            .collect()
    }

    /// Takes a site's connections out (to close them).
    pub fn remove(&self, site: &str) -> Vec<quinn::Connection> {
        self.lock()
            .remove(site)
            .map(|s| s.conns.into_iter().map(|(_, c, _)| c).collect())
            .unwrap_or_default()
    }

    /// The transfer classes the site's connection on `path` carries: all of them for a
    /// one-path site; for a path, those the site's latest `Paths` frame gives it.
    pub fn route(&self, site: &str, path: &str) -> ClassRoute {
        if path.is_empty() {
            return ClassRoute::all();
        }
        let mut g = self.lock();
        let s = g.entry(site.to_string()).or_default();
        let uses = s.uses.clone();
        let path = path.to_string();
        ClassRoute::new(
            move |class| {
                uses.lock()
                    .expect("uses lock poisoned")
                    .get(class)
                    .is_some_and(|p| *p == path)
            },
            s.changes.subscribe(),
        )
    }

    /// Paces what goes to the site over each path at the budget the site gave it
    /// (`budget_kbps`, kbit/s; 0: none), below `configured_bps` (the site's `link_rates`) if
    /// that is lower: a path's budget is never exceeded, this way either.
    pub fn set_budgets(&self, site: &str, budgets: &[(String, u32)], configured_bps: Option<u64>) {
        let g = self.lock();
        let Some(s) = g.get(site) else {
            return;
        };
        for (path, conn_rate) in s.conns.iter().map(|(p, _, r)| (p, r)) {
            let Some((_, kbps)) = budgets.iter().find(|(p, k)| p == path && *k > 0) else {
                continue;
            };
            let bps = tiandi_link::congestion::udp_payload_bps(f64::from(*kbps) * 1e3);
            let bps = configured_bps.map_or(bps, |c| c.min(bps));
            if conn_rate.get() != bps {
                tracing::info!(path = %path, kbps, "Paced at the site's budget on this path.");
                conn_rate.set(bps);
            }
        }
    }

    /// Whether a `Paths` frame of (`run`, `version`) is not older than the newest applied
    /// (a frame over a long path can arrive after a newer one over a short path); records it.
    /// A frame without them (0, 0) is always taken.
    pub fn fresh(&self, site: &str, run: u64, version: u64) -> bool {
        let mut g = self.lock();
        let Some(s) = g.get_mut(site) else {
            return true;
        };
        if run != 0 && run == s.seen.0 && version < s.seen.1 {
            return false;
        }
        s.seen = (run, version);
        true
    }

    /// Sets the class uses a site announced; its drivers follow.
    pub fn set_uses(&self, site: &str, uses: &BTreeMap<String, String>) {
        let g = self.lock();
        let Some(s) = g.get(site) else {
            return;
        };
        let changed = {
            let mut u = s.uses.lock().expect("uses lock poisoned");
            let changed = *u != *uses;
            if changed {
                u.clone_from(uses);
            }
            changed
        };
        if changed {
            s.changes.send_modify(|v| *v += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiandi_proto::{ClassUse, PathStatus, PathSwitch};

    fn frame() -> Paths {
        let status = |name: &str, kind: &str, state: &str| PathStatus {
            name: name.into(),
            kind: kind.into(),
            state: state.into(),
            rtt_ms: 20,
            loss_permille: 5,
            ..Default::default()
        };
        Paths {
            paths: vec![
                status("ground", "ground", "down"),
                status("sky", "sky", "up"),
            ],
            uses: vec![ClassUse {
                class: "reports".into(),
                path: "sky".into(),
            }],
            switches: vec![PathSwitch {
                at_ms: 5,
                class: "reports".into(),
                from: "ground".into(),
                to: "sky".into(),
                reason: "path down\n".into(),
            }],
            run: 7,
            version: 3,
        }
    }

    #[test]
    fn a_frame_overtaken_by_a_newer_one_over_a_shorter_path_is_stale() {
        let links = Links::default();
        let _ = links.route("s", "ground");
        assert!(links.fresh("s", 7, 3));
        assert!(links.fresh("s", 7, 3), "a refresh of the same state");
        assert!(links.fresh("s", 7, 5));
        assert!(!links.fresh("s", 7, 4), "older, over the satellite");
        assert!(links.fresh("s", 9, 1), "the agent restarted");
        assert!(links.fresh("s", 0, 0), "without an order: taken");
    }

    #[test]
    fn a_paths_frame_is_checked_and_shows_lost_redundancy() {
        let (paths, uses, switches) = check(&frame()).unwrap();
        assert_eq!(paths[0].loss_pct, 0.5);
        assert_eq!(uses["reports"], "sky");
        assert_eq!(
            switches[0].reason, "path down",
            "control characters dropped"
        );
        let view = SitePaths {
            paths,
            uses,
            ..Default::default()
        };
        assert_eq!(
            view.redundancy_lost().as_deref(),
            Some("only sky is up (ground down)")
        );
        let mut both = view.clone();
        both.paths[0].state = "up".into();
        assert_eq!(both.redundancy_lost(), None);

        for (mutate, expect) in [
            (
                Box::new(|f: &mut Paths| f.paths[0].name = "..".into()) as Box<dyn Fn(&mut Paths)>,
                "path name",
            ),
            (
                Box::new(|f: &mut Paths| f.paths[1].name = "ground".into()),
                "twice",
            ),
            (
                Box::new(|f: &mut Paths| f.paths[0].state = "maybe".into()),
                "state",
            ),
            (
                Box::new(|f: &mut Paths| f.uses[0].class = "video".into()),
                "unknown class",
            ),
            (
                Box::new(|f: &mut Paths| f.uses[0].path = "moon".into()),
                "not listed",
            ),
            (
                Box::new(|f: &mut Paths| f.switches[0].to = "a/b".into()),
                "path name",
            ),
            (
                Box::new(|f: &mut Paths| f.paths = vec![f.paths[0].clone(); 5]),
                "at most",
            ),
        ] {
            let mut f = frame();
            mutate(&mut f);
            let e = check(&f).unwrap_err();
            assert!(e.contains(expect), "{e}");
        }
    }
}
