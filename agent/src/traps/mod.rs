//! SNMP traps and informs from the site's devices (`[traps]`): a UDP listener takes what its
//! configured devices send (v1, v2c and v3 traps; v2c and v3 informs, acknowledged), matches
//! it against the device's profile's `[[traps]]` rules, and hands what matters to the report
//! loop at once, which polls the devices and sends a report out of cycle (a critical one:
//! over every path of a dual-homed site). A flood is bounded and summarised
//! ([`flood::Flood`]); what comes from an address that is no configured device, fails its
//! community or its USM check, or matches no rule is counted ([`TrapStats`]) and logged at
//! most once a minute, never forwarded.

mod decode;
pub mod flood;

pub use decode::{DeviceAuth, LocalEngine, Notification, Outcome, V3Auth, decode};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiandi_proto::{DeviceEvent, Severity, TrapStats};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::device::{DeviceConfig, SnmpVersion, security};
use crate::profile::{Profile, TrapRule, dotted, parse_oid};

/// `[traps]` in the agent's config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrapsConfig {
    /// Where the devices send traps and informs: `0.0.0.0:162` (the package's service may
    /// bind port 162), or another port the devices are set to.
    pub listen: SocketAddr,
    /// Per device and event: this many a minute go on one by one, more are summarised.
    #[serde(default = "six")]
    pub per_minute: u32,
    /// This agent's SNMP engine ID (hex), which SNMPv3 informs are sent to. Default: one made
    /// from the site's ID (RFC 3411 text format).
    #[serde(default)]
    pub engine_id: Option<String>,
}

fn six() -> u32 {
    6
}

impl TrapsConfig {
    pub fn validate(&self, file: &str) -> Result<(), String> {
        if !(1..=600).contains(&self.per_minute) {
            return Err(format!("{file}: key `traps.per_minute`: 1 to 600"));
        }
        if let Some(e) = &self.engine_id {
            let b =
                hex(e).ok_or_else(|| format!("{file}: key `traps.engine_id`: {e:?} is not hex"))?;
            if !(5..=32).contains(&b.len()) {
                return Err(format!(
                    "{file}: key `traps.engine_id`: 5 to 32 bytes (RFC 3411)"
                ));
            }
        }
        Ok(())
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_start_matches("0x");
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The default engine ID: RFC 3411 format 4 (text) under net-snmp's enterprise number, with
/// the site's ID.
pub fn default_engine_id(site_id: &str) -> Vec<u8> {
    let mut id = vec![0x80, 0x00, 0x1f, 0x88, 0x04];
    id.extend(format!("tiandi:{site_id}").bytes().take(27));
    id
}

/// The listener's counters.
#[derive(Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub unknown_source: AtomicU64,
    pub rejected: AtomicU64,
    pub ignored: AtomicU64,
}

/// What the listener shares with the report loop.
pub struct Traps {
    flood: Mutex<flood::Flood>,
    pub counters: Counters,
    /// Signalled when an event is waiting.
    pub notify: Notify,
}

impl Traps {
    pub fn new(per_minute: u32) -> Arc<Traps> {
        Arc::new(Traps {
            flood: Mutex::new(flood::Flood::new(per_minute)),
            counters: Counters::default(),
            notify: Notify::new(),
        })
    }

    /// Everything for the next report.
    pub fn take(&self) -> Vec<DeviceEvent> {
        self.flood.lock().expect("flood lock poisoned").take()
    }

    pub fn stats(&self) -> TrapStats {
        let f = self.flood.lock().expect("flood lock poisoned");
        let c = &self.counters;
        TrapStats {
            received: c.received.load(Ordering::Relaxed),
            forwarded: f.forwarded,
            summarised: f.summarised,
            unknown_source: c.unknown_source.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
        }
    }

    fn offer(&self, ev: DeviceEvent) {
        let now = self.flood.lock().expect("flood lock poisoned").offer(ev);
        if now {
            self.notify.notify_one();
        }
    }
}

/// A trap rule, parsed once.
struct Rule {
    name: String,
    oid: Vec<u64>,
    varbind: Option<(Vec<u64>, String)>,
    severity: Severity,
}

impl Rule {
    fn of(r: &TrapRule) -> Option<Rule> {
        Some(Rule {
            name: r.name.clone(),
            oid: parse_oid(&r.oid).ok()?,
            varbind: match (&r.varbind, &r.equals) {
                (Some(v), Some(e)) => {
                    Some((parse_oid(v).ok()?, e.trim_start_matches('.').to_string()))
                }
                _ => None,
            },
            severity: Severity::parse(&r.severity).unwrap_or(Severity::Major),
        })
    }

    fn matches(&self, n: &Notification) -> bool {
        n.trap_oid == self.oid
            && self.varbind.as_ref().is_none_or(|(prefix, want)| {
                n.varbinds
                    .iter()
                    .any(|(o, v)| o.starts_with(prefix) && v.trim_start_matches('.') == want)
            })
    }
}

struct Source {
    name: String,
    auth: DeviceAuth,
    rules: Vec<Rule>,
}

/// Well-known varbinds, named in an event's detail.
fn varbind_name(o: &[u64]) -> Option<(&'static str, Option<u64>)> {
    const NAMES: [(&str, &[u64]); 6] = [
        ("ifIndex", &[1, 3, 6, 1, 2, 1, 2, 2, 1, 1]),
        ("ifDescr", &[1, 3, 6, 1, 2, 1, 2, 2, 1, 2]),
        ("ifAdminStatus", &[1, 3, 6, 1, 2, 1, 2, 2, 1, 7]),
        ("ifOperStatus", &[1, 3, 6, 1, 2, 1, 2, 2, 1, 8]),
        ("ifName", &[1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 1]),
        ("upsAlarmDescr", &[1, 3, 6, 1, 2, 1, 33, 1, 6, 2, 1, 2]),
    ];
    NAMES.iter().find_map(|(n, p)| {
        (o.len() == p.len() + 1 && o.starts_with(p)).then(|| (*n, o.last().copied()))
    })
}

/// An event's detail: its varbinds, short ("ifIndex 3, ifAdminStatus 1, ifOperStatus 2").
fn detail(n: &Notification) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (o, v) in &n.varbinds {
        let p = match varbind_name(o) {
            Some(("ifIndex", _)) => format!("ifIndex {v}"),
            Some((name, _)) => format!("{name} {v}"),
            None => format!("{} = {v}", dotted(o)),
        };
        parts.push(p);
    }
    let mut s = parts.join(", ");
    if s.len() > 120 {
        let cut = (0..=120)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Logs at most once a minute per kind of problem.
struct Quiet(HashMap<&'static str, Instant>);

impl Quiet {
    fn ok(&mut self, what: &'static str) -> bool {
        let now = Instant::now();
        match self.0.get(what) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                self.0.insert(what, now);
                true
            }
        }
    }
}

/// The listener: binds `cfg.listen` and runs until cancelled. `boots` is this engine's
/// restart count (kept by the caller, one more at every start).
pub async fn run(
    cfg: TrapsConfig,
    devices: Vec<(DeviceConfig, Profile)>,
    site_id: String,
    boots: i64,
    traps: Arc<Traps>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let engine = LocalEngine {
        id: match &cfg.engine_id {
            Some(e) => hex(e).context("traps.engine_id is not hex")?,
            None => default_engine_id(&site_id),
        },
        boots: boots.max(1),
        started: Instant::now(),
    };
    let mut by_addr: HashMap<IpAddr, Source> = HashMap::new();
    for (d, p) in devices.iter().filter(|(d, _)| d.traps) {
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(d.snmp_addr()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                warn!(device = %d.name, error = %e, "Cannot resolve the device's address: its traps will not be taken.");
                continue;
            }
        };
        for a in addrs {
            let v3 = match (&d.version, &d.v3) {
                (SnmpVersion::V3, Some(c)) => {
                    let base = security(c).map_err(anyhow::Error::msg)?;
                    Some(V3Auth::new(base, &engine).map_err(anyhow::Error::msg)?)
                }
                _ => None,
            };
            by_addr.insert(
                a.ip(),
                Source {
                    name: d.name.clone(),
                    auth: DeviceAuth {
                        community: d.community.as_bytes().to_vec(),
                        v3,
                    },
                    rules: p.traps.iter().filter_map(Rule::of).collect(),
                },
            );
        }
    }
    let sock = tokio::net::UdpSocket::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the trap listener to {}", cfg.listen))?;
    info!(listen = %cfg.listen, devices = by_addr.len(), "Listening for SNMP traps and informs.");
    let mut buf = vec![0u8; 65_535];
    let mut quiet = Quiet(HashMap::new());
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "Trap listener receive error.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let c = &traps.counters;
        let Some(src) = by_addr.get_mut(&from.ip()) else {
            c.unknown_source.fetch_add(1, Ordering::Relaxed);
            if quiet.ok("unknown") {
                info!(%from, "A trap from an address that is no configured device: ignored (counted; logged once a minute).");
            }
            continue;
        };
        let outcome = decode(&buf[..n], &mut src.auth, &engine);
        tracing::trace!(device = %src.name, %from, ?outcome, "Datagram on the trap port.");
        match outcome {
            Outcome::Rejected(why) => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
                if quiet.ok("rejected") {
                    warn!(device = %src.name, %from, %why, "A trap was refused (counted; logged once a minute).");
                }
            }
            Outcome::Reply(bytes) => {
                let _ = sock.send_to(&bytes, from).await;
            }
            Outcome::Note(note, reply) => {
                c.received.fetch_add(1, Ordering::Relaxed);
                if let Some(bytes) = reply {
                    let _ = sock.send_to(&bytes, from).await;
                }
                match src.rules.iter().find(|r| r.matches(&note)) {
                    None => {
                        c.ignored.fetch_add(1, Ordering::Relaxed);
                        debug!(device = %src.name, oid = %dotted(&note.trap_oid), "A trap no rule of the device's profile names: counted.");
                    }
                    Some(rule) => {
                        debug!(device = %src.name, event = %rule.name, "Trap.");
                        traps.offer(DeviceEvent {
                            device: src.name.clone(),
                            name: rule.name.clone(),
                            severity: rule.severity as i32,
                            at_ms: tiandi_link::clock::now_ms(),
                            count: 1,
                            detail: detail(&note),
                            inform: note.inform,
                            ..Default::default()
                        });
                    }
                }
            }
        }
    }
}

/// This engine's boots: one more than the last start's, kept in `data_dir/snmp-engine-boots`.
pub fn next_boots(data_dir: &std::path::Path) -> i64 {
    let path = data_dir.join("snmp-engine-boots");
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let next = (last + 1).clamp(1, i64::from(i32::MAX) - 1);
    if let Err(e) = std::fs::write(&path, format!("{next}\n")) {
        warn!(error = %e, path = %path.display(), "Cannot keep the SNMP engine's boots count.");
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_by_oid_and_varbind() {
        let all = crate::profile::Profiles::built_in();
        let rules: Vec<Rule> = all
            .get("ups-mib")
            .unwrap()
            .traps
            .iter()
            .filter_map(Rule::of)
            .collect();
        let low = Notification {
            inform: false,
            trap_oid: vec![1, 3, 6, 1, 2, 1, 33, 2, 3],
            varbinds: vec![
                (vec![1, 3, 6, 1, 2, 1, 33, 1, 6, 2, 1, 1, 4], "4".into()),
                (
                    vec![1, 3, 6, 1, 2, 1, 33, 1, 6, 2, 1, 2, 4],
                    "1.3.6.1.2.1.33.1.6.3.3".into(),
                ),
            ],
        };
        let first = rules.iter().find(|r| r.matches(&low)).unwrap();
        assert_eq!(first.name, "battery-low");
        let other = Notification {
            varbinds: vec![(
                vec![1, 3, 6, 1, 2, 1, 33, 1, 6, 2, 1, 2, 4],
                "1.3.6.1.2.1.33.1.6.3.8".into(),
            )],
            ..low
        };
        assert_eq!(
            rules.iter().find(|r| r.matches(&other)).unwrap().name,
            "ups-alarm"
        );
    }

    #[test]
    fn details_name_interface_varbinds_and_stay_short() {
        let n = Notification {
            inform: false,
            trap_oid: vec![1, 3, 6, 1, 6, 3, 1, 1, 5, 3],
            varbinds: vec![
                (vec![1, 3, 6, 1, 2, 1, 2, 2, 1, 1, 3], "3".into()),
                (vec![1, 3, 6, 1, 2, 1, 2, 2, 1, 7, 3], "1".into()),
                (vec![1, 3, 6, 1, 2, 1, 2, 2, 1, 8, 3], "2".into()),
            ],
        };
        assert_eq!(detail(&n), "ifIndex 3, ifAdminStatus 1, ifOperStatus 2");
        let long = Notification {
            varbinds: vec![(vec![1, 3, 6, 1, 4, 1, 9], "长".repeat(60))],
            ..n
        };
        assert!(detail(&long).len() <= 124);
    }

    #[test]
    fn engine_ids_follow_rfc_3411() {
        let id = default_engine_id("yn-kunming-004");
        assert_eq!(&id[..5], &[0x80, 0x00, 0x1f, 0x88, 0x04]);
        assert!(id.len() <= 32);
        let c = TrapsConfig {
            listen: "127.0.0.1:1162".parse().unwrap(),
            per_minute: 6,
            engine_id: Some("80001f88".into()),
        };
        assert!(
            c.validate("a.toml")
                .unwrap_err()
                .contains("traps.engine_id")
        );
    }
}
