//! A site's paths (天地复合: a terrestrial line and a satellite link, say): what each one is,
//! how healthy it is now, and which one each class of traffic uses. Free of I/O: the agent's
//! uplink and the conference client feed [`Health`] their connections' counters every tick and
//! act on what [`Selector`] decides; [`bind_socket`] is the one place a path's socket is made.
//!
//! Each path holds a QUIC connection of its own, made ready before it is needed (a *warm
//! standby*), rather than one connection migrated between paths: quinn 0.11 migrates a
//! client's connection to a new local socket (`Endpoint::rebind`) but keeps one path at a time
//! and one server address, while a site's ground line and satellite link usually reach the
//! controller at different addresses; and a connection that has to discover a new path after
//! the old one died costs a round trip and a congestion restart at the worst moment anyway.
//! A standby connection costs one keep-alive per `probe_ms` (default 1 s on a satellite path:
//! ~50 bytes each way per second), and it is the probe that tells the path's health.
//!
//! Health: a path is `Up` while datagrams keep arriving on its connection (the keep-alive
//! guarantees one at least every `probe + RTT`), `Suspect` when nothing came for
//! `probe + max(150 ms, 2 RTT)` and `Down` after `probe + max(400 ms, 3 RTT + 200 ms)` or when
//! its connection is gone. Loss is the connection's lost over sent packets, per 200 sent,
//! rising fast and falling slowly.
//!
//! Selection, per class: the allowed paths in the policy's order (default: the configured
//! order, ground first); a class leaves its path when that path is `Down` (or its window
//! closes, or it loses ≥ [`DEGRADED_LOSS`] while another is clean), and comes back to a path
//! it prefers only after that path was `Up` for its hold time ([`HOLD_BASE`], doubled each
//! time the path fails again within [`FLAP_WINDOW`] of being taken back, up to [`HOLD_MAX`];
//! back to the base after [`HOLD_RESET`] without a failure), so a flapping line does not flap
//! the site.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod board;
pub use board::{Board, PathCtx};

use crate::LinkError;
use crate::transport::LinkProfile;
use crate::window::Window;

/// Paths a site may have (a ground line, a satellite link, a spare or two).
pub const MAX_PATHS: usize = 4;
/// Keep-alive (probe) interval on a ground path unless configured (~50 bytes each way per
/// probe: nothing on a terrestrial line; a busy path sends none, its traffic is the probe).
pub const PROBE_GROUND: Duration = Duration::from_millis(100);
/// Keep-alive (probe) interval on a satellite path unless configured: ~50 bytes each way per
/// second, cheap for a VSAT carrier's budget.
pub const PROBE_SKY: Duration = Duration::from_secs(1);
/// A path up this long again before a class it lost comes back to it.
pub const HOLD_BASE: Duration = Duration::from_secs(10);
/// The longest hold a flapping path earns.
pub const HOLD_MAX: Duration = Duration::from_secs(320);
/// A path that fails within this long of being taken back doubles its hold.
pub const FLAP_WINDOW: Duration = Duration::from_secs(120);
/// A path without a failure for this long is back to [`HOLD_BASE`].
pub const HOLD_RESET: Duration = Duration::from_secs(1800);
/// A path losing this fraction of its packets is left for one that loses under
/// [`CLEAN_LOSS`].
pub const DEGRADED_LOSS: f64 = 0.10;
pub const CLEAN_LOSS: f64 = 0.02;
/// Switch events a selector keeps for its caller to take (the oldest are dropped first).
pub const EVENTS_MAX: usize = 64;

/// A class of traffic with a path of its own choosing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Health reports (the report stream).
    Reports,
    /// Alarm-class transfers and critical reports.
    Alarm,
    /// A conference session.
    Conference,
    /// Normal-class transfers (an operator's file).
    Normal,
    /// Bulk transfers (packages, images).
    Bulk,
    /// Backup repositories shipped to their partner.
    Backup,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Reports,
        Class::Alarm,
        Class::Conference,
        Class::Normal,
        Class::Bulk,
        Class::Backup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Reports => "reports",
            Class::Alarm => "alarm",
            Class::Conference => "conference",
            Class::Normal => "normal",
            Class::Bulk => "bulk",
            Class::Backup => "backup",
        }
    }

    /// The class of a transfer priority's name (`alarm`, `normal`, `bulk`, `backup`).
    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Terrestrial or satellite: the default probe interval and which classes may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Ground,
    Sky,
}

/// One of a site's paths, as configured (`[[paths]]` in the agent's config, `--path` on
/// `tiandi-video join`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    /// What operators call it (`ground`, `sky`): an identifier.
    pub name: String,
    /// The local interface (`eth1`) or address (`10.1.2.3`) its traffic leaves from; none:
    /// wherever the routing table sends it.
    #[serde(default)]
    pub bind: Option<String>,
    /// Ground or sky; default: sky for the `geo` and `leo` profiles, ground otherwise.
    #[serde(default)]
    pub kind: Option<PathKind>,
    /// The link's transport profile; default: the component's own.
    #[serde(default)]
    pub profile: Option<LinkProfile>,
    /// The controller's address over this path, if not the component's default one.
    #[serde(default)]
    pub controller: Option<String>,
    /// The conference relay's address over this path, if not the default one.
    #[serde(default)]
    pub relay: Option<String>,
    /// What this component may send over the path (kbit/s of QUIC payload; 0: no limit).
    #[serde(default)]
    pub budget_kbps: u32,
    /// Keep-alive (probe) interval (ms); default 250 on ground, 1000 on sky.
    #[serde(default)]
    pub probe_ms: Option<u32>,
    /// When classes allowed here "within the window" may use it (`01:00-06:00+08:00`).
    #[serde(default, with = "crate::window::as_text")]
    pub window: Option<Window>,
}

impl PathSpec {
    /// A path of `name` with defaults (tests, command lines).
    pub fn named(name: &str) -> PathSpec {
        PathSpec {
            name: name.into(),
            bind: None,
            kind: None,
            profile: None,
            controller: None,
            relay: None,
            budget_kbps: 0,
            probe_ms: None,
            window: None,
        }
    }

    pub fn kind(&self) -> PathKind {
        self.kind.unwrap_or(match self.profile {
            Some(LinkProfile::Geo | LinkProfile::Leo) => PathKind::Sky,
            _ => PathKind::Ground,
        })
    }

    pub fn probe(&self) -> Duration {
        match self.probe_ms {
            Some(ms) => Duration::from_millis(u64::from(ms)),
            None if self.kind() == PathKind::Sky => PROBE_SKY,
            None => PROBE_GROUND,
        }
    }

    /// Checks one path (`what` names it in errors, e.g. `paths[1]`).
    pub fn validate(&self, what: &str) -> Result<(), LinkError> {
        crate::names::validate_name(&format!("{what}.name"), &self.name)?;
        if let Some(b) = &self.bind {
            Bind::parse(b).map_err(|e| LinkError::BadName(format!("{what}.bind: {e}")))?;
        }
        if let Some(p) = self.profile {
            p.validate()
                .map_err(|e| LinkError::BadName(format!("{what}.profile: {e}")))?;
        }
        if let Some(ms) = self.probe_ms
            && !(50..=60_000).contains(&ms)
        {
            return Err(LinkError::BadName(format!(
                "{what}.probe_ms {ms}: between 50 and 60000"
            )));
        }
        Ok(())
    }
}

/// A path on a command line: `NAME[=BIND][,KEY=VALUE...]` with keys `relay`, `controller`,
/// `profile`, `kind`, `budget_kbps`, `probe_ms`, `window` (`sky=10.1.1.11,relay=10.1.1.1:4443,
/// profile=geo`).
impl std::str::FromStr for PathSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<PathSpec, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or("");
        let (name, bind) = match head.split_once('=') {
            Some((n, b)) => (n, (!b.is_empty()).then(|| b.to_string())),
            None => (head, None),
        };
        let mut p = PathSpec::named(name);
        p.bind = bind;
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("path {s:?}: {kv:?} is not KEY=VALUE"))?;
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("path {s:?}: {k} {v:?} is not a number"))
            };
            match k {
                "relay" => p.relay = Some(v.into()),
                "controller" => p.controller = Some(v.into()),
                "profile" => p.profile = Some(v.parse()?),
                "kind" => {
                    p.kind = Some(match v {
                        "ground" => PathKind::Ground,
                        "sky" => PathKind::Sky,
                        _ => return Err(format!("path {s:?}: kind {v:?} is not ground or sky")),
                    })
                }
                "budget_kbps" => p.budget_kbps = num(v)?,
                "probe_ms" => p.probe_ms = Some(num(v)?),
                "window" => p.window = Some(v.parse()?),
                other => {
                    return Err(format!(
                        "path {s:?}: unknown key {other:?} (relay, controller, profile, kind, budget_kbps, probe_ms, window)"
                    ));
                }
            }
        }
        p.validate("path").map_err(|e| e.to_string())?;
        Ok(p)
    }
}

/// Checks a site's paths together: each valid, names distinct, at most [`MAX_PATHS`].
pub fn validate_paths(paths: &[PathSpec]) -> Result<(), LinkError> {
    if paths.len() > MAX_PATHS {
        return Err(LinkError::BadName(format!(
            "{} paths: at most {MAX_PATHS}",
            paths.len()
        )));
    }
    for (i, p) in paths.iter().enumerate() {
        p.validate(&format!("paths[{i}]"))?;
        if paths[..i].iter().any(|q| q.name == p.name) {
            return Err(LinkError::BadName(format!(
                "paths[{i}].name {:?} is used by an earlier path",
                p.name
            )));
        }
    }
    Ok(())
}

/// Where a path's socket is bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    /// A local interface (`SO_BINDTODEVICE`; since Linux 5.7 an unprivileged process may set
    /// it on a socket not yet bound to a device, so the agent needs no capability for it).
    Interface(String),
    Address(IpAddr),
}

impl Bind {
    pub fn parse(s: &str) -> Result<Bind, String> {
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(Bind::Address(a));
        }
        let ok = !s.is_empty()
            && s.len() < 16
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
        if ok {
            Ok(Bind::Interface(s.into()))
        } else {
            Err(format!(
                "{s:?} is neither an IP address nor an interface name (1-15 letters, digits, '.', '_', '-')"
            ))
        }
    }
}

/// A UDP socket for a path toward `server`, bound as the path says.
pub fn bind_socket(
    bind: Option<&str>,
    server: SocketAddr,
) -> Result<std::net::UdpSocket, LinkError> {
    let any: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let bind = bind
        .map(Bind::parse)
        .transpose()
        .map_err(LinkError::BadName)?;
    let domain = socket2::Domain::for_address(server);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(LinkError::Endpoint)?;
    let at = match &bind {
        Some(Bind::Address(a)) => SocketAddr::new(*a, 0),
        Some(Bind::Interface(dev)) => {
            s.bind_device(Some(dev.as_bytes())).map_err(|e| {
                LinkError::Endpoint(std::io::Error::new(
                    e.kind(),
                    format!("binding to interface {dev}: {e}"),
                ))
            })?;
            any
        }
        None => any,
    };
    s.bind(&at.into()).map_err(|e| {
        LinkError::Endpoint(std::io::Error::new(
            e.kind(),
            format!("binding to {at}: {e}"),
        ))
    })?;
    Ok(s.into())
}

/// A path's health as its connection shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathState {
    Down,
    Suspect,
    Up,
}

impl PathState {
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Down => "down",
            PathState::Suspect => "suspect",
            PathState::Up => "up",
        }
    }
}

/// A connection's counters at one moment (quinn's `ConnectionStats` and RTT).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rtt: Duration,
    pub lost_packets: u64,
    pub sent_packets: u64,
}

impl Sample {
    pub fn of(conn: &quinn::Connection) -> Sample {
        let s = conn.stats();
        Sample {
            rx_datagrams: s.udp_rx.datagrams,
            rx_bytes: s.udp_rx.bytes,
            tx_bytes: s.udp_tx.bytes,
            rtt: conn.rtt(),
            lost_packets: s.path.lost_packets,
            sent_packets: s.path.sent_packets,
        }
    }
}

/// Packets per loss measurement.
const LOSS_WINDOW: u64 = 200;

/// One path's health, from its connection's counters.
#[derive(Clone, Debug)]
pub struct Health {
    probe: Duration,
    pub state: PathState,
    /// Since when it is in this state.
    pub since: Instant,
    connected: bool,
    rx: u64,
    last_rx: Instant,
    pub rtt: Duration,
    /// The lowest smoothed RTT seen on the connection: the path's own delay, without the
    /// queue a transfer builds on it.
    pub min_rtt: Duration,
    /// Fraction of packets lost (smoothed).
    pub loss: f64,
    loss_base: (u64, u64),
    /// Bytes per second each way (smoothed).
    pub tx_bps: f64,
    pub rx_bps: f64,
    last: Option<(Instant, u64, u64)>,
}

impl Health {
    pub fn new(probe: Duration, now: Instant) -> Health {
        Health {
            probe,
            state: PathState::Down,
            since: now,
            connected: false,
            rx: 0,
            last_rx: now,
            rtt: Duration::ZERO,
            min_rtt: Duration::MAX,
            loss: 0.0,
            loss_base: (0, 0),
            tx_bps: 0.0,
            rx_bps: 0.0,
            last: None,
        }
    }

    fn base_rtt(&self) -> Duration {
        if self.min_rtt == Duration::MAX {
            self.rtt
        } else {
            self.min_rtt
        }
    }

    /// Silence after which the path is suspect: a probe interval and two of the path's own
    /// round trips (the smoothed one if a queue makes it longer; at least 100 ms).
    pub fn suspect_after(&self) -> Duration {
        self.probe
            + (self.base_rtt() * 2)
                .max(self.rtt)
                .max(Duration::from_millis(100))
    }

    /// Silence after which the path is down: a probe interval and three of its own round
    /// trips and 150 ms (1.5 smoothed ones if a queue makes that longer; at least 250 ms).
    /// Measured from the path's own delay, not the smoothed RTT a transfer's queue inflates:
    /// over a busy 20 ms line the cut is seen after ~0.35 s, not ~1.1 s.
    pub fn down_after(&self) -> Duration {
        self.probe
            + (self.base_rtt() * 3 + Duration::from_millis(150))
                .max(self.rtt.mul_f64(1.5))
                .max(Duration::from_millis(250))
    }

    /// A new connection on the path: up, counters from here.
    pub fn connected(&mut self, now: Instant, s: &Sample) {
        self.connected = true;
        self.rx = s.rx_datagrams;
        self.last_rx = now;
        self.rtt = s.rtt;
        self.min_rtt = if s.rtt.is_zero() {
            Duration::MAX
        } else {
            s.rtt
        };
        self.loss_base = (s.lost_packets, s.sent_packets);
        self.last = Some((now, s.tx_bytes, s.rx_bytes));
        self.set(PathState::Up, now);
    }

    /// The path's connection is gone.
    pub fn disconnected(&mut self, now: Instant) {
        self.connected = false;
        self.last = None;
        self.tx_bps = 0.0;
        self.rx_bps = 0.0;
        self.set(PathState::Down, now);
    }

    fn set(&mut self, state: PathState, now: Instant) {
        if state != self.state {
            self.state = state;
            self.since = now;
        }
    }

    /// Takes the connection's counters now; returns the state.
    pub fn observe(&mut self, now: Instant, s: &Sample) -> PathState {
        if !self.connected {
            return self.state;
        }
        if s.rx_datagrams != self.rx {
            self.rx = s.rx_datagrams;
            self.last_rx = now;
        }
        if !s.rtt.is_zero() {
            self.rtt = s.rtt;
            self.min_rtt = self.min_rtt.min(s.rtt);
        }
        let sent = s.sent_packets.saturating_sub(self.loss_base.1);
        if sent >= LOSS_WINDOW {
            let frac = s.lost_packets.saturating_sub(self.loss_base.0) as f64 / sent as f64;
            let w = if frac > self.loss { 0.5 } else { 0.1 };
            self.loss += w * (frac.min(1.0) - self.loss);
            self.loss_base = (s.lost_packets, s.sent_packets);
        }
        if let Some((t, tx, rx)) = self.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt >= 0.5 {
                let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / dt;
                self.tx_bps += 0.5 * (rate(s.tx_bytes, tx) - self.tx_bps);
                self.rx_bps += 0.5 * (rate(s.rx_bytes, rx) - self.rx_bps);
                self.last = Some((now, s.tx_bytes, s.rx_bytes));
            }
        }
        let silent = now.saturating_duration_since(self.last_rx);
        let state = if silent > self.down_after() {
            PathState::Down
        } else if silent > self.suspect_after() {
            PathState::Suspect
        } else {
            PathState::Up
        };
        self.set(state, now);
        state
    }

    /// How long nothing has arrived on the path.
    pub fn silent(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
    }
}

/// Which paths a class may use, in order of preference: a path's name, or a name with
/// `@window` (only while that path's window is open). Empty: every path, in configured order.
pub type ClassRule = Vec<String>;

/// The policy per class; set centrally by the controller (it travels in the `Welcome`), with
/// these defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Per class; a class not listed takes its default: every path for reports, alarms,
    /// conferences and normal transfers; ground paths (and sky paths within their window,
    /// if they have one) for bulk transfers and backups.
    #[serde(default)]
    pub classes: BTreeMap<Class, ClassRule>,
    /// A critical report goes over every path that is up, not only the reports' one.
    #[serde(default = "yes")]
    pub critical_on_all: bool,
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            classes: BTreeMap::new(),
            critical_on_all: true,
        }
    }
}

impl Policy {
    /// Checks the rules' grammar (names are checked against a site's paths when applied:
    /// a rule may name paths some sites do not have).
    pub fn validate(&self) -> Result<(), LinkError> {
        for (class, rule) in &self.classes {
            for p in rule {
                let name = p.strip_suffix("@window").unwrap_or(p);
                crate::names::validate_name(&format!("policy.{}", class.as_str()), name)?;
            }
            if rule.len() > MAX_PATHS * 2 {
                return Err(LinkError::BadName(format!(
                    "policy.{}: at most {} entries",
                    class.as_str(),
                    MAX_PATHS * 2
                )));
            }
        }
        Ok(())
    }

    /// The allowed paths of `class` among `paths`, in order: (index, only within its window).
    pub fn allowed(&self, class: Class, paths: &[PathSpec]) -> Vec<(usize, bool)> {
        match self.classes.get(&class) {
            Some(rule) if !rule.is_empty() => rule
                .iter()
                .filter_map(|entry| {
                    let (name, windowed) = match entry.strip_suffix("@window") {
                        Some(n) => (n, true),
                        None => (entry.as_str(), false),
                    };
                    paths
                        .iter()
                        .position(|p| p.name == name)
                        .map(|i| (i, windowed))
                })
                .collect(),
            _ => match class {
                Class::Bulk | Class::Backup => {
                    let ground = (0..paths.len())
                        .filter(|&i| paths[i].kind() == PathKind::Ground)
                        .map(|i| (i, false));
                    let sky = (0..paths.len())
                        .filter(|&i| paths[i].kind() == PathKind::Sky && paths[i].window.is_some())
                        .map(|i| (i, true));
                    ground.chain(sky).collect()
                }
                _ => (0..paths.len()).map(|i| (i, false)).collect(),
            },
        }
    }
}

/// One switch of a class from a path to another (or to none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Switch {
    pub at_ms: i64,
    pub class: Class,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
}

/// Per path, what the selector remembers between decisions.
#[derive(Clone, Debug)]
struct Memory {
    /// Down at least once since the selector started (a path that merely connected late is
    /// taken at once, without a hold).
    failed: bool,
    hold: Duration,
    /// When a class last came back to it (for flap detection).
    taken_back: Option<Instant>,
    last_failure: Option<Instant>,
    was: PathState,
}

/// Chooses each class's path from the paths' health, with hysteresis.
#[derive(Clone, Debug)]
pub struct Selector {
    paths: Vec<PathSpec>,
    policy: Policy,
    current: BTreeMap<Class, Option<usize>>,
    memory: Vec<Memory>,
    events: std::collections::VecDeque<Switch>,
}

impl Selector {
    pub fn new(paths: Vec<PathSpec>, policy: Policy) -> Selector {
        let memory = paths
            .iter()
            .map(|_| Memory {
                failed: false,
                hold: HOLD_BASE,
                taken_back: None,
                last_failure: None,
                was: PathState::Down,
            })
            .collect();
        Selector {
            current: Class::ALL.into_iter().map(|c| (c, None)).collect(),
            paths,
            policy,
            memory,
            events: Default::default(),
        }
    }

    pub fn paths(&self) -> &[PathSpec] {
        &self.paths
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A new policy (from the controller): decisions follow it from the next [`decide`].
    ///
    /// [`decide`]: Selector::decide
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The path a class uses now.
    pub fn current(&self, class: Class) -> Option<usize> {
        self.current.get(&class).copied().flatten()
    }

    /// The hold a path must be up for before a class comes back to it.
    pub fn hold(&self, path: usize) -> Duration {
        self.memory[path].hold
    }

    /// Switches since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Switch> {
        self.events.drain(..).collect()
    }

    /// Decides every class's path from the paths' health now (`health[i]` for `paths[i]`);
    /// `unix_ms` for windows and event times. Returns whether anything changed.
    pub fn decide(&mut self, now: Instant, unix_ms: i64, health: &[Health]) -> bool {
        assert_eq!(health.len(), self.paths.len(), "one health per path");
        // Failures and flaps first.
        for (i, h) in health.iter().enumerate() {
            let m = &mut self.memory[i];
            if h.state == PathState::Down && m.was != PathState::Down {
                if m.taken_back
                    .is_some_and(|t| now.duration_since(t) < FLAP_WINDOW)
                {
                    m.hold = (m.hold * 2).min(HOLD_MAX);
                }
                m.failed = true;
                m.last_failure = Some(now);
            }
            if m.last_failure
                .is_some_and(|t| now.duration_since(t) > HOLD_RESET)
            {
                m.hold = HOLD_BASE;
                m.last_failure = None;
            }
            m.was = h.state;
        }
        let mut changed = false;
        for class in Class::ALL {
            let allowed = self.policy.allowed(class, &self.paths);
            let open = |i: usize, windowed: bool| {
                !windowed || self.paths[i].window.is_some_and(|w| w.contains(unix_ms))
            };
            let usable: Vec<usize> = allowed
                .iter()
                .filter(|&&(i, w)| open(i, w))
                .map(|&(i, _)| i)
                .collect();
            let cur = self.current(class);
            let held = |i: usize| {
                let m = &self.memory[i];
                health[i].state == PathState::Up
                    && (!m.failed || now.duration_since(health[i].since) >= m.hold)
            };
            let clean = |i: usize| health[i].loss < CLEAN_LOSS;
            let (next, reason) = match cur {
                Some(c) if !usable.contains(&c) => (
                    usable
                        .iter()
                        .copied()
                        .find(|&i| health[i].state == PathState::Up),
                    "not allowed now (window closed or policy)",
                ),
                Some(c) if health[c].state == PathState::Down => (
                    usable
                        .iter()
                        .copied()
                        .find(|&i| health[i].state == PathState::Up)
                        .or_else(|| {
                            usable
                                .iter()
                                .copied()
                                .find(|&i| health[i].state == PathState::Suspect)
                        }),
                    "path down",
                ),
                Some(c) => {
                    let rank = usable.iter().position(|&i| i == c).unwrap_or(usize::MAX);
                    let better = usable[..rank.min(usable.len())]
                        .iter()
                        .copied()
                        .find(|&i| held(i) && clean(i));
                    let cleaner = (health[c].loss >= DEGRADED_LOSS)
                        .then(|| {
                            usable
                                .iter()
                                .copied()
                                .find(|&i| i != c && held(i) && clean(i))
                        })
                        .flatten();
                    match (better, cleaner) {
                        (Some(b), _) => (Some(b), "preferred path back"),
                        (None, Some(b)) => (Some(b), "path losing packets"),
                        (None, None) => (Some(c), ""),
                    }
                }
                None => (
                    usable
                        .iter()
                        .copied()
                        .find(|&i| health[i].state == PathState::Up),
                    "path up",
                ),
            };
            if next != cur {
                if let Some(n) = next
                    && reason == "preferred path back"
                    && self.memory[n].failed
                {
                    self.memory[n].taken_back = Some(now);
                }
                self.current.insert(class, next);
                changed = true;
                if self.events.len() == EVENTS_MAX {
                    self.events.pop_front();
                }
                self.events.push_back(Switch {
                    at_ms: unix_ms,
                    class,
                    from: cur.map(|i| self.paths[i].name.clone()),
                    to: next.map(|i| self.paths[i].name.clone()),
                    reason: if next.is_none() {
                        "no path usable".into()
                    } else {
                        reason.into()
                    },
                });
            }
        }
        changed
    }

    /// The paths a critical report goes over: every path up (the policy's `critical_on_all`),
    /// else the alarm class's.
    pub fn critical_paths(&self, health: &[Health]) -> Vec<usize> {
        if self.policy.critical_on_all {
            (0..self.paths.len())
                .filter(|&i| health[i].state == PathState::Up)
                .collect()
        } else {
            self.current(Class::Alarm).into_iter().collect()
        }
    }
}

/// The wire form of a policy.
pub fn policy_to_wire(p: &Policy) -> tiandi_proto::PathPolicy {
    tiandi_proto::PathPolicy {
        classes: p
            .classes
            .iter()
            .map(|(c, rule)| tiandi_proto::ClassRule {
                class: c.as_str().into(),
                paths: rule.clone(),
            })
            .collect(),
        critical_on_all: p.critical_on_all,
    }
}

/// A policy from its wire form; unknown classes are skipped (a newer controller's).
pub fn policy_from_wire(w: &tiandi_proto::PathPolicy) -> Policy {
    Policy {
        classes: w
            .classes
            .iter()
            .filter_map(|r| Class::parse(&r.class).map(|c| (c, r.paths.clone())))
            .collect(),
        critical_on_all: w.critical_on_all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<PathSpec> {
        let ground = PathSpec::named("ground");
        let mut sky = PathSpec::named("sky");
        sky.profile = Some(LinkProfile::Geo);
        vec![ground, sky]
    }

    fn healths(now: Instant, paths: &[PathSpec]) -> Vec<Health> {
        paths.iter().map(|p| Health::new(p.probe(), now)).collect()
    }

    fn sample(rx: u64, rtt_ms: u64) -> Sample {
        Sample {
            rx_datagrams: rx,
            rtt: Duration::from_millis(rtt_ms),
            ..Sample::default()
        }
    }

    #[test]
    fn silence_makes_a_path_suspect_then_down_in_proportion_to_its_probe_and_rtt() {
        let t0 = Instant::now();
        let mut ground = Health::new(PROBE_GROUND, t0);
        ground.connected(t0, &sample(1, 20));
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(ground.observe(ms(300), &sample(2, 20)), PathState::Up);
        // Nothing since 300 ms: suspect after 100 + 100, down after 100 + 250.
        assert_eq!(ground.observe(ms(450), &sample(2, 20)), PathState::Up);
        assert_eq!(ground.observe(ms(510), &sample(2, 20)), PathState::Suspect);
        assert_eq!(ground.observe(ms(660), &sample(2, 20)), PathState::Down);
        assert_eq!(ground.since, ms(660));
        // A transfer's queue inflates the smoothed RTT to 220 ms: the line's own 20 ms
        // still sets the limits, within 1.5 smoothed round trips.
        let mut busy = Health::new(PROBE_GROUND, t0);
        busy.connected(t0, &sample(1, 20));
        busy.observe(ms(100), &sample(2, 220));
        assert_eq!(busy.down_after(), Duration::from_millis(100 + 330));
        // It speaks again: up.
        assert_eq!(ground.observe(ms(1000), &sample(3, 20)), PathState::Up);

        // Over GEO (600 ms) with a 1 s probe: a probe and its answer are not a failure.
        let mut sky = Health::new(PROBE_SKY, t0);
        sky.connected(t0, &sample(1, 600));
        assert_eq!(sky.observe(ms(1700), &sample(1, 600)), PathState::Up);
        assert_eq!(sky.observe(ms(2300), &sample(1, 600)), PathState::Suspect);
        assert_eq!(sky.observe(ms(3000), &sample(1, 600)), PathState::Down);
        sky.disconnected(ms(3200));
        assert_eq!(
            sky.observe(ms(3300), &sample(9, 600)),
            PathState::Down,
            "no connection"
        );
    }

    #[test]
    fn loss_rises_fast_and_falls_slowly() {
        let t0 = Instant::now();
        let mut h = Health::new(PROBE_GROUND, t0);
        h.connected(t0, &Sample::default());
        let s = |lost, sent| Sample {
            rx_datagrams: sent,
            lost_packets: lost,
            sent_packets: sent,
            ..Sample::default()
        };
        h.observe(t0, &s(40, 200));
        assert!((h.loss - 0.1).abs() < 1e-9, "{}", h.loss);
        h.observe(t0, &s(40, 400));
        assert!((h.loss - 0.09).abs() < 1e-9, "{}", h.loss);
        h.observe(t0, &s(40, 450));
        assert!((h.loss - 0.09).abs() < 1e-9, "not a whole window yet");
    }

    #[test]
    fn classes_fail_over_at_once_and_come_back_after_the_hold() {
        let paths = two();
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut sel = Selector::new(paths.clone(), Policy::default());
        let mut h = healths(t0, &paths);
        // The sky connects first, the ground a moment later: a path that merely came late
        // is taken at once.
        h[1].connected(at(0.5), &sample(1, 600));
        assert!(sel.decide(at(0.5), 0, &h));
        assert_eq!(sel.current(Class::Reports), Some(1));
        assert_eq!(
            sel.current(Class::Bulk),
            None,
            "no sky for bulk without a window"
        );
        h[0].connected(at(0.6), &sample(1, 20));
        sel.decide(at(0.6), 0, &h);
        for c in Class::ALL {
            assert_eq!(sel.current(c), Some(0), "{c:?}");
        }
        sel.take_events();

        // The fibre is cut: everything but bulk and backup moves to the sky at once.
        h[0].observe(at(1.0), &sample(2, 20));
        h[0].observe(at(1.4), &sample(2, 20));
        assert_eq!(h[0].state, PathState::Down);
        assert!(sel.decide(at(1.4), 0, &h));
        assert_eq!(sel.current(Class::Reports), Some(1));
        assert_eq!(sel.current(Class::Conference), Some(1));
        assert_eq!(sel.current(Class::Bulk), None);
        let ev = sel.take_events();
        assert!(
            ev.iter().any(|e| e.class == Class::Conference
                && e.from.as_deref() == Some("ground")
                && e.to.as_deref() == Some("sky")
                && e.reason == "path down"),
            "{ev:?}"
        );

        // Restored at 60 s: the classes come back after the 10 s hold, not before.
        h[0].disconnected(at(5.0));
        h[0].connected(at(60.0), &sample(10, 20));
        sel.decide(at(60.0), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(1), "held");
        assert_eq!(
            sel.current(Class::Bulk),
            Some(0),
            "bulk had no path: takes it at once"
        );
        sel.decide(at(69.9), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(1));
        sel.decide(at(70.1), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(0));
        assert_eq!(sel.current(Class::Conference), Some(0));

        // It flaps within two minutes: the hold doubles, and doubles again.
        h[0].disconnected(at(80.0));
        sel.decide(at(80.0), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(1));
        assert_eq!(sel.hold(0), HOLD_BASE * 2);
        h[0].connected(at(81.0), &sample(20, 20));
        sel.decide(at(95.0), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(1), "20 s hold now");
        sel.decide(at(101.5), 0, &h);
        assert_eq!(sel.current(Class::Reports), Some(0));
        h[0].disconnected(at(110.0));
        sel.decide(at(110.0), 0, &h);
        assert_eq!(sel.hold(0), HOLD_BASE * 4);
        // Half an hour without a failure: back to the base.
        h[0].connected(at(111.0), &sample(30, 20));
        sel.decide(at(111.0 + 1801.0), 0, &h);
        assert_eq!(sel.hold(0), HOLD_BASE);
    }

    #[test]
    fn bulk_uses_the_sky_only_within_its_window_and_policy_overrides_defaults() {
        let mut paths = two();
        paths[1].window = Some("01:00-06:00".parse().unwrap());
        let t0 = Instant::now();
        let mut h = healths(t0, &paths);
        h[1].connected(t0, &sample(1, 600));
        let hour = |hh: i64| hh * 3_600_000 + 20_000 * 86_400_000;
        let mut sel = Selector::new(paths.clone(), Policy::default());
        sel.decide(t0, hour(12), &h);
        assert_eq!(sel.current(Class::Bulk), None, "outside the window");
        sel.decide(t0, hour(2), &h);
        assert_eq!(sel.current(Class::Bulk), Some(1));
        assert_eq!(sel.current(Class::Backup), Some(1));
        sel.decide(t0, hour(7), &h);
        assert_eq!(sel.current(Class::Bulk), None, "the window closed");
        let ev = sel.take_events();
        assert_eq!(ev.last().unwrap().reason, "no path usable");

        // A central policy: conferences on the sky first, backups never on it.
        let policy: Policy = toml::from_str(
            "[classes]\nconference = [\"sky\", \"ground\"]\nbackup = [\"ground\"]\n",
        )
        .unwrap();
        policy.validate().unwrap();
        assert!(policy.critical_on_all);
        h[0].connected(t0, &sample(1, 20));
        let mut sel = Selector::new(paths.clone(), policy);
        sel.decide(t0, hour(2), &h);
        assert_eq!(sel.current(Class::Conference), Some(1));
        assert_eq!(sel.current(Class::Backup), Some(0));
        assert_eq!(sel.current(Class::Bulk), Some(0));
        assert_eq!(sel.critical_paths(&h), vec![0, 1]);
        let bad: Policy = toml::from_str("[classes]\nbulk = [\"../x\"]\n").unwrap();
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Policy>("[classes]\nvideo = []\n").is_err());
    }

    #[test]
    fn a_lossy_path_is_left_for_a_clean_one() {
        let paths = two();
        let t0 = Instant::now();
        let mut h = healths(t0, &paths);
        h[0].connected(t0, &sample(1, 20));
        h[1].connected(t0, &sample(1, 600));
        let mut sel = Selector::new(paths, Policy::default());
        sel.decide(t0, 0, &h);
        assert_eq!(sel.current(Class::Conference), Some(0));
        h[0].loss = 0.2;
        sel.decide(t0 + Duration::from_secs(1), 0, &h);
        assert_eq!(sel.current(Class::Conference), Some(1));
        let ev = sel.take_events();
        assert!(
            ev.iter()
                .all(|e| e.reason == "path losing packets" || e.from.is_none())
        );
    }

    #[test]
    fn paths_are_checked_by_name_bind_and_count() {
        let mut p = two();
        validate_paths(&p).unwrap();
        p[1].name = "ground".into();
        assert!(
            validate_paths(&p)
                .unwrap_err()
                .to_string()
                .contains("paths[1].name")
        );
        p[1].name = "sky".into();
        p[1].bind = Some("eth1; rm".into());
        assert!(
            validate_paths(&p)
                .unwrap_err()
                .to_string()
                .contains("paths[1].bind")
        );
        p[1].bind = Some("10.0.0.2".into());
        validate_paths(&p).unwrap();
        assert_eq!(Bind::parse("eth1"), Ok(Bind::Interface("eth1".into())));
        assert!(validate_paths(&vec![PathSpec::named("a"); 5]).is_err());
        assert_eq!(p[1].kind(), PathKind::Sky);
        assert_eq!(p[1].probe(), PROBE_SKY);
        let t: PathSpec = toml::from_str(
            "name = \"sky\"\nbind = \"eth2\"\nprofile = \"geo\"\nbudget_kbps = 512\nwindow = \"01:00-06:00+08:00\"\n",
        )
        .unwrap();
        assert_eq!(t.window.unwrap().utc_offset_min, 480);
        assert!(toml::from_str::<PathSpec>("name = \"x\"\nbandwidth = 1\n").is_err());
    }

    #[test]
    fn a_path_from_a_command_line() {
        let p: PathSpec = "sky=10.1.1.11,relay=10.1.1.1:4443,profile=geo,probe_ms=500"
            .parse()
            .unwrap();
        assert_eq!(p.name, "sky");
        assert_eq!(p.bind.as_deref(), Some("10.1.1.11"));
        assert_eq!(p.relay.as_deref(), Some("10.1.1.1:4443"));
        assert_eq!(
            (p.kind(), p.probe()),
            (PathKind::Sky, Duration::from_millis(500))
        );
        let g: PathSpec = "ground".parse().unwrap();
        assert_eq!((g.bind.clone(), g.kind()), (None, PathKind::Ground));
        for bad in [
            "",
            "../x=1.2.3.4",
            "sky=1.2.3.4,rate=5",
            "sky,budget_kbps=x",
            "a,probe_ms=1",
        ] {
            assert!(bad.parse::<PathSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_socket_binds_to_an_address_of_the_path() {
        let server: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let s = bind_socket(Some("127.0.0.1"), server).unwrap();
        assert_eq!(
            s.local_addr().unwrap().ip(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(bind_socket(Some("no such;"), server).is_err());
    }
}
