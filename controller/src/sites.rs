//! Live state of every site: its latest report, when it was last heard from, its status and
//! active conditions. Status evaluation is a pure function ([`evaluate`]); the table turns
//! changes of conditions into alarm events (raised / cleared), which go to the store's alarm log.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use serde::Serialize;
use tiandi_proto::{Device, DeviceStatus, Probe, ProbeKind, Report, UPS_CHARGE, UPS_RUNTIME};

use crate::config::Thresholds;
use crate::store::AlarmEvent;

/// What can be wrong with a site, most urgent first (the order [`status_of`] and every list
/// of a site's conditions follow). Serialised as its alarm name ([`Condition::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    Down,
    /// A UPS's battery is low (its profile's `battery-low` alarm): the site goes down soon.
    BatteryLow,
    OnBattery,
    RainFade,
    DiskFull,
    /// A device (or the site's next hop) answers neither SNMP nor its reachability check.
    DeviceUnreachable,
    /// Alarms of devices' profiles that hold now (`ups-overload`, `modem-fault`), one
    /// condition for all of a site's.
    DeviceAlarm,
    /// A transfer to the site is paused: its disk cannot hold the file.
    TransferPaused,
    /// The site's last backup run failed.
    BackupFailed,
    /// The site's newest backup at its partner is older than the job's RPO.
    BackupOverdue,
    /// A verify or a restore drill of the site's repository failed.
    BackupCheckFailed,
    /// A repository of the site's passed 90 % of its quota.
    BackupNearQuota,
    /// A dual-homed site is down to one path: one more cut and it is down.
    PathRedundancyLost,
    Degraded,
}

impl Condition {
    /// Every condition, most urgent first.
    pub const ALL: [Condition; 14] = [
        Condition::Down,
        Condition::BatteryLow,
        Condition::OnBattery,
        Condition::RainFade,
        Condition::DiskFull,
        Condition::DeviceUnreachable,
        Condition::DeviceAlarm,
        Condition::TransferPaused,
        Condition::BackupFailed,
        Condition::BackupOverdue,
        Condition::BackupCheckFailed,
        Condition::BackupNearQuota,
        Condition::PathRedundancyLost,
        Condition::Degraded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Down => "site-down",
            Condition::BatteryLow => "battery-low",
            Condition::OnBattery => "on-battery",
            Condition::RainFade => "rain-fade",
            Condition::DiskFull => "disk-full",
            Condition::DeviceUnreachable => "device-unreachable",
            Condition::DeviceAlarm => "device-alarm",
            Condition::TransferPaused => "transfer-paused",
            Condition::BackupFailed => "backup-failed",
            Condition::BackupOverdue => "backup-overdue",
            Condition::BackupCheckFailed => "backup-check-failed",
            Condition::BackupNearQuota => "backup-near-quota",
            Condition::PathRedundancyLost => "path-redundancy-lost",
            Condition::Degraded => "degraded",
        }
    }
}

impl Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Up,
    Degraded,
    Down,
    RainFade,
    OnBattery,
    DiskFull,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Degraded => "degraded",
            Status::Down => "down",
            Status::RainFade => "rain-fade",
            Status::OnBattery => "on-battery",
            Status::DiskFull => "disk-full",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Up,
            Status::Degraded,
            Status::Down,
            Status::RainFade,
            Status::OnBattery,
            Status::DiskFull,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
    /// Stable numeric code for the Prometheus gauge.
    pub fn code(self) -> i64 {
        match self {
            Status::Up => 0,
            Status::Degraded => 1,
            Status::DiskFull => 2,
            Status::RainFade => 3,
            Status::OnBattery => 4,
            Status::Down => 5,
        }
    }
}

/// The site's conditions, with a human-readable detail for each.
pub fn evaluate(
    report: Option<&Report>,
    silent_ms: i64,
    interval_ms: i64,
    th: &Thresholds,
) -> Vec<(Condition, String)> {
    let mut out = Vec::new();
    let limit = interval_ms.max(1000) * i64::from(th.down_after_intervals.max(1));
    if silent_ms > limit {
        out.push((
            Condition::Down,
            format!("no report for {} s", silent_ms / 1000),
        ));
    }
    let Some(r) = report else {
        return out;
    };
    let mut host_healthy = true;
    if let Some(h) = &r.host {
        let cpu = f64::from(h.cpu_permille) / 10.0;
        if cpu >= th.cpu_degraded_pct {
            host_healthy = false;
            out.push((Condition::Degraded, format!("CPU {cpu:.0} %")));
        }
        if h.mem_total_mib > 0 {
            let mem = 100.0 * h.mem_used_mib as f64 / h.mem_total_mib as f64;
            if mem >= th.mem_degraded_pct {
                host_healthy = false;
                out.push((Condition::Degraded, format!("memory {mem:.0} %")));
            }
        }
        for fs in &h.filesystems {
            let pct = f64::from(fs.used_permille()) / 10.0;
            if pct >= th.disk_full_pct {
                host_healthy = false;
                out.push((Condition::DiskFull, format!("{} {pct:.1} % used", fs.mount)));
            }
        }
    }
    let mut device_alarms = Vec::new();
    for d in &r.devices {
        let status = DeviceStatus::try_from(d.status).unwrap_or(DeviceStatus::Unknown);
        if status != DeviceStatus::Ok {
            out.push(device_not_ok(d, status));
        }
        if status == DeviceStatus::Ok
            && let Some(u) = &d.ups
            && u.on_battery
        {
            out.push((
                Condition::OnBattery,
                format!("{} on battery, {}", d.name, ups_left(u)),
            ));
        }
        // A device that answered in part (`bad-answer`) still says which alarms hold.
        for a in &d.alarms {
            let why = if a.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.detail)
            };
            match a.name.as_str() {
                "battery-low" => out.push((
                    Condition::BatteryLow,
                    match &d.ups {
                        Some(u) => format!("{} battery low{why}, {}", d.name, ups_left(u)),
                        None => format!("{} battery low{why}", d.name),
                    },
                )),
                // From `ups.on_battery`; an operator's profile without UPS figures says it
                // with its alarm alone.
                "on-battery" if d.ups.is_some() => {}
                "on-battery" => {
                    out.push((Condition::OnBattery, format!("{} on battery{why}", d.name)))
                }
                _ => device_alarms.push(format!("{}: {}{why}", d.name, a.name)),
            }
        }
    }
    if !device_alarms.is_empty() {
        out.push((Condition::DeviceAlarm, device_alarms.join("; ")));
    }
    for p in r.probes.iter().filter(|p| !p.ok) {
        out.push((
            Condition::DeviceUnreachable,
            format!("{} unreachable ({})", p.target, probe_failure(p)),
        ));
    }
    for d in &r.devices {
        if let Some(m) = &d.modem
            && d.status == DeviceStatus::Ok as i32
        {
            let esno = f64::from(m.esno_db_x10) / 10.0;
            if esno < th.rain_fade_esno_db && host_healthy {
                out.push((
                    Condition::RainFade,
                    format!(
                        "{} Es/No {esno:.1} dB (threshold {:.1})",
                        d.name, th.rain_fade_esno_db
                    ),
                ));
            }
        }
    }
    out
}

/// A device that did not answer its poll usably: unreachable when its reachability check
/// failed too, degraded otherwise (saying so when it answers the check but not SNMP).
fn device_not_ok(d: &Device, status: DeviceStatus) -> (Condition, String) {
    let silent = matches!(status, DeviceStatus::Timeout | DeviceStatus::Error);
    match &d.reach {
        Some(p) if !p.ok && silent => (
            Condition::DeviceUnreachable,
            format!("{} unreachable ({})", d.name, probe_failure(p)),
        ),
        Some(p) if p.ok && silent => (
            Condition::Degraded,
            format!(
                "{} answers {} ({}) but not SNMP: {}",
                d.name,
                match ProbeKind::try_from(p.kind) {
                    Ok(ProbeKind::Tcp) => "TCP connect",
                    _ => "ping",
                },
                rtt_text(p.rtt_us),
                if !d.error.is_empty() {
                    d.error.as_str()
                } else if status == DeviceStatus::Timeout {
                    "no answer"
                } else {
                    "error"
                }
            ),
        ),
        _ => {
            // A partial answer: the essential objects it lacks say why.
            let essential: Vec<String> = d
                .problems
                .iter()
                .filter(|p| p.essential)
                .map(|p| {
                    let kind = tiandi_proto::ProblemKind::try_from(p.kind)
                        .unwrap_or(tiandi_proto::ProblemKind::Unknown)
                        .as_str();
                    format!("{} {kind}", p.name)
                })
                .collect();
            let why = if !d.error.is_empty() {
                format!(": {}", d.error)
            } else if !essential.is_empty() {
                format!(": {}", essential.join(", "))
            } else {
                String::new()
            };
            (
                Condition::Degraded,
                format!("device {} {}{why}", d.name, status.as_str()),
            )
        }
    }
}

/// How a reachability check failed: `icmp: timeout`.
fn probe_failure(p: &Probe) -> String {
    let kind = match ProbeKind::try_from(p.kind) {
        Ok(ProbeKind::Icmp) => "icmp",
        Ok(ProbeKind::Tcp) => "tcp",
        _ => "check",
    };
    let error = if p.error.is_empty() {
        "no answer"
    } else {
        p.error.as_str()
    };
    format!("{kind}: {error}")
}

/// A round trip: `0.4 ms`, `612 ms`.
fn rtt_text(us: u32) -> String {
    if us < 10_000 {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    } else {
        format!("{} ms", us / 1000)
    }
}

/// A UPS's charge and runtime left, each "unknown" when the UPS did not give it (a 0 with its
/// `missing` bit is not an empty battery).
fn ups_left(u: &tiandi_proto::Ups) -> String {
    let charge = if u.missing & UPS_CHARGE != 0 {
        "charge unknown".to_string()
    } else {
        format!("{} % charge", u.charge_pct)
    };
    let runtime = if u.missing & UPS_RUNTIME != 0 {
        "runtime unknown".to_string()
    } else {
        format!("{} min left", u.runtime_s / 60)
    };
    format!("{charge}, {runtime}")
}

/// The one status shown for a site: the most urgent condition.
pub fn status_of(conds: &BTreeSet<Condition>) -> Status {
    // BTreeSet orders by the enum's declaration order, most urgent first.
    match conds.iter().next() {
        None => Status::Up,
        Some(Condition::Down) => Status::Down,
        Some(Condition::BatteryLow | Condition::OnBattery) => Status::OnBattery,
        Some(Condition::RainFade) => Status::RainFade,
        Some(Condition::DiskFull) => Status::DiskFull,
        Some(
            Condition::DeviceUnreachable
            | Condition::DeviceAlarm
            | Condition::TransferPaused
            | Condition::BackupFailed
            | Condition::BackupOverdue
            | Condition::BackupCheckFailed
            | Condition::BackupNearQuota
            | Condition::PathRedundancyLost
            | Condition::Degraded,
        ) => Status::Degraded,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SiteState {
    pub site_id: String,
    pub province: String,
    pub status: Status,
    pub conditions: Vec<ConditionInfo>,
    pub connected: bool,
    /// Controller clock, Unix ms, of the last report received (`null` if never).
    pub last_seen_ms: Option<i64>,
    /// Site clock, Unix ms, of the latest sample.
    pub latest_taken_ms: Option<i64>,
    pub latest_seq: Option<u64>,
    pub interval_ms: i64,
    pub reports: u64,
    pub status_since_ms: i64,
    /// The agent's version, as its latest Hello said (`null` until it connects; "invalid" for
    /// a version string that is not a plain version).
    pub agent_version: Option<String>,
    /// A dual-homed site's paths, class uses and latest switches (`null` for a site with one
    /// path).
    pub paths: Option<crate::paths::SitePaths>,
    #[serde(skip)]
    pub latest: Option<Report>,
    #[serde(skip)]
    pub active: BTreeSet<Condition>,
    /// Conditions set from outside the reports (a paused transfer), with their details.
    #[serde(skip)]
    pub external: std::collections::BTreeMap<Condition, String>,
    /// How often each alarm was raised since the controller started (rain-fade episodes).
    #[serde(skip)]
    pub raised: std::collections::BTreeMap<Condition, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConditionInfo {
    pub condition: Condition,
    pub detail: String,
    pub since_ms: i64,
}

/// The sites, and which are in each province (a province operator's lists, and any list
/// filtered by province, read ~1/31 of the sites instead of all of them).
#[derive(Default)]
struct Table {
    sites: HashMap<String, SiteState>,
    by_province: HashMap<String, BTreeSet<String>>,
}

pub struct Sites {
    map: RwLock<Table>,
    thresholds: Thresholds,
    default_interval_ms: i64,
}

impl Sites {
    pub fn new(thresholds: Thresholds) -> Sites {
        Sites {
            map: RwLock::new(Table::default()),
            thresholds,
            default_interval_ms: 10_000,
        }
    }

    /// Adds a known site (from the registry) with its last stored report. `now_ms` counts as
    /// its last contact, so a controller restart does not mark every site down at once.
    pub fn insert(&self, site_id: &str, province: &str, latest: Option<Report>, now_ms: i64) {
        let mut table = self.map.write().expect("sites lock poisoned");
        let Table { sites, by_province } = &mut *table;
        let e = sites
            .entry(site_id.to_string())
            .or_insert_with(|| SiteState {
                site_id: site_id.to_string(),
                province: province.to_string(),
                status: Status::Up,
                conditions: Vec::new(),
                connected: false,
                last_seen_ms: None,
                latest_taken_ms: None,
                latest_seq: None,
                interval_ms: self.default_interval_ms,
                reports: 0,
                status_since_ms: now_ms,
                agent_version: None,
                paths: None,
                latest: None,
                active: BTreeSet::new(),
                external: Default::default(),
                raised: Default::default(),
            });
        if e.province != province
            && let Some(ids) = by_province.get_mut(&e.province)
        {
            ids.remove(site_id);
        }
        by_province
            .entry(province.to_string())
            .or_default()
            .insert(site_id.to_string());
        e.province = province.to_string();
        if e.last_seen_ms.is_none() {
            e.last_seen_ms = Some(now_ms);
        }
        if let Some(r) = latest {
            e.latest_taken_ms = Some(r.taken_ms);
            e.latest_seq = Some(r.seq);
            e.latest = Some(r);
        }
    }

    pub fn set_connected(&self, site_id: &str, connected: bool, interval_ms: Option<i64>) {
        let mut map = self.map.write().expect("sites lock poisoned");
        if let Some(s) = map.sites.get_mut(site_id) {
            s.connected = connected;
            if let Some(i) = interval_ms {
                s.interval_ms = i.max(1000);
            }
        }
    }

    /// Records the version the site's agent announced (checked: at most 32 characters of
    /// `0-9A-Za-z.+-~_`; anything else is kept as "invalid", never as given).
    pub fn set_agent_version(&self, site_id: &str, version: &str) {
        let ok = !version.is_empty()
            && version.len() <= 32
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+-~_".contains(&b));
        let v = if ok { version } else { "invalid" };
        let mut map = self.map.write().expect("sites lock poisoned");
        if let Some(s) = map.sites.get_mut(site_id)
            && s.agent_version.as_deref() != Some(v)
        {
            s.agent_version = Some(v.to_string());
        }
    }

    /// Records a report and re-evaluates the site. Returns alarm events.
    pub fn on_report(&self, site_id: &str, report: Report, now_ms: i64) -> Vec<AlarmEvent> {
        let mut map = self.map.write().expect("sites lock poisoned");
        let Some(s) = map.sites.get_mut(site_id) else {
            return Vec::new();
        };
        s.last_seen_ms = Some(now_ms);
        s.reports += 1;
        if s.latest_taken_ms.is_none_or(|t| report.taken_ms >= t) {
            s.latest_taken_ms = Some(report.taken_ms);
            s.latest_seq = Some(report.seq);
            s.latest = Some(report);
        }
        self.reevaluate(s, now_ms)
    }

    /// A dual-homed site's `Paths` frame, checked: updates its paths and class uses, adds
    /// new switches (a switch the site sent over two paths is kept once), and raises or
    /// clears `path-redundancy-lost`. Returns the new switches and the alarm events.
    pub fn set_paths(
        &self,
        site_id: &str,
        paths: Vec<crate::paths::PathView>,
        uses: std::collections::BTreeMap<String, String>,
        switches: Vec<crate::paths::SwitchView>,
        now_ms: i64,
    ) -> (Vec<crate::paths::SwitchView>, Vec<AlarmEvent>) {
        let mut map = self.map.write().expect("sites lock poisoned");
        let Some(s) = map.sites.get_mut(site_id) else {
            return (Vec::new(), Vec::new());
        };
        let view = s.paths.get_or_insert_with(Default::default);
        view.paths = paths;
        view.uses = uses;
        view.updated_ms = now_ms;
        let mut fresh = Vec::new();
        for sw in switches {
            if view.switches.contains(&sw) {
                continue;
            }
            if view.switches.len() == crate::paths::SWITCHES_KEPT {
                view.switches.pop_front();
            }
            view.switches.push_back(sw.clone());
            fresh.push(sw);
        }
        let lost = view.redundancy_lost();
        let changed = match lost {
            Some(d) => {
                s.external
                    .insert(Condition::PathRedundancyLost, d.clone())
                    .as_ref()
                    != Some(&d)
            }
            None => s.external.remove(&Condition::PathRedundancyLost).is_some(),
        };
        let events = if changed {
            self.reevaluate(s, now_ms)
        } else {
            Vec::new()
        };
        (fresh, events)
    }

    /// Marks which of a dual-homed site's paths the controller holds a connection on.
    pub fn set_path_connections(&self, site_id: &str, connected: &[String]) {
        let mut map = self.map.write().expect("sites lock poisoned");
        if let Some(view) = map.sites.get_mut(site_id).and_then(|s| s.paths.as_mut()) {
            for p in &mut view.paths {
                p.connected = connected.contains(&p.name);
            }
        }
    }

    /// Sets (`Some(detail)`) or clears a condition that does not come from reports; returns
    /// alarm events.
    pub fn set_external(
        &self,
        site_id: &str,
        condition: Condition,
        detail: Option<String>,
        now_ms: i64,
    ) -> Vec<AlarmEvent> {
        let mut map = self.map.write().expect("sites lock poisoned");
        let Some(s) = map.sites.get_mut(site_id) else {
            return Vec::new();
        };
        let changed = match detail {
            Some(d) => s.external.insert(condition, d.clone()).as_ref() != Some(&d),
            None => s.external.remove(&condition).is_some(),
        };
        if !changed {
            return Vec::new();
        }
        self.reevaluate(s, now_ms)
    }

    /// Re-evaluates the sites whose silence matters now (for `down`); returns alarm events.
    ///
    /// Between reports only silence changes a site's conditions, so only the sites silent
    /// past their limit or already down (their detail, "no report for N s", moves) need it:
    /// they are found under the read lock and re-evaluated under the write lock. Re-evaluating
    /// every site under the write lock each second held ingest and every list behind it for
    /// tens of milliseconds at 20,000 sites.
    pub fn tick(&self, now_ms: i64) -> Vec<AlarmEvent> {
        let after = i64::from(self.thresholds.down_after_intervals.max(1));
        let due: Vec<String> = {
            let map = self.map.read().expect("sites lock poisoned");
            map.sites
                .values()
                .filter(|s| {
                    let silent = now_ms - s.last_seen_ms.unwrap_or(now_ms);
                    silent > s.interval_ms.max(1000) * after || s.active.contains(&Condition::Down)
                })
                .map(|s| s.site_id.clone())
                .collect()
        };
        if due.is_empty() {
            return Vec::new();
        }
        let mut map = self.map.write().expect("sites lock poisoned");
        let mut events = Vec::new();
        for id in &due {
            if let Some(s) = map.sites.get_mut(id) {
                events.extend(self.reevaluate(s, now_ms));
            }
        }
        events
    }

    fn reevaluate(&self, s: &mut SiteState, now_ms: i64) -> Vec<AlarmEvent> {
        let silent = now_ms - s.last_seen_ms.unwrap_or(now_ms);
        let mut found = evaluate(s.latest.as_ref(), silent, s.interval_ms, &self.thresholds);
        found.extend(s.external.iter().map(|(c, d)| (*c, d.clone())));
        let mut new: BTreeSet<Condition> = found.iter().map(|(c, _)| *c).collect();
        // A down site's last report says nothing about now: only `down` stays.
        if new.contains(&Condition::Down) {
            new = BTreeSet::from([Condition::Down]);
        }
        let mut events = Vec::new();
        let detail_of = |c: Condition| {
            found
                .iter()
                .filter(|(x, _)| *x == c)
                .map(|(_, d)| d.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        for c in new.difference(&s.active) {
            *s.raised.entry(*c).or_default() += 1;
            events.push(AlarmEvent {
                at_ms: now_ms,
                site_id: s.site_id.clone(),
                province: s.province.clone(),
                alarm: c.name().into(),
                state: "raised".into(),
                detail: detail_of(*c),
            });
        }
        for c in s.active.difference(&new) {
            events.push(AlarmEvent {
                at_ms: now_ms,
                site_id: s.site_id.clone(),
                province: s.province.clone(),
                alarm: c.name().into(),
                state: "cleared".into(),
                detail: String::new(),
            });
        }
        let old_since: HashMap<Condition, i64> = s
            .conditions
            .iter()
            .map(|c| (c.condition, c.since_ms))
            .collect();
        s.conditions = new
            .iter()
            .map(|c| ConditionInfo {
                condition: *c,
                detail: detail_of(*c),
                since_ms: old_since.get(c).copied().unwrap_or(now_ms),
            })
            .collect();
        let status = status_of(&new);
        if status != s.status {
            s.status = status;
            s.status_since_ms = now_ms;
        }
        s.active = new;
        events
    }

    pub fn get(&self, site_id: &str) -> Option<SiteState> {
        self.map
            .read()
            .expect("sites lock poisoned")
            .sites
            .get(site_id)
            .cloned()
    }

    /// Runs `f` on one site's state, without copying it.
    pub fn with_site<T>(&self, site_id: &str, f: impl FnOnce(&SiteState) -> T) -> Option<T> {
        self.map
            .read()
            .expect("sites lock poisoned")
            .sites
            .get(site_id)
            .map(f)
    }

    /// Every site's state; `f` runs under the read lock.
    pub fn with_all<T>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &SiteState>) -> T) -> T {
        let map = self.map.read().expect("sites lock poisoned");
        f(&mut map.sites.values())
    }

    /// Runs `f` on each of these sites that exists, in the order given, under one hold of
    /// the read lock.
    pub fn with_each(&self, ids: &[String], mut f: impl FnMut(&SiteState)) {
        let map = self.map.read().expect("sites lock poisoned");
        for s in ids.iter().filter_map(|id| map.sites.get(id)) {
            f(s);
        }
    }

    /// The sites of one province (in site-ID order); `f` runs under the read lock.
    pub fn with_province<T>(
        &self,
        province: &str,
        f: impl FnOnce(&mut dyn Iterator<Item = &SiteState>) -> T,
    ) -> T {
        let map = self.map.read().expect("sites lock poisoned");
        let ids = map.by_province.get(province);
        f(&mut ids.into_iter().flatten().filter_map(|id| map.sites.get(id)))
    }

    pub fn len(&self) -> usize {
        self.map.read().expect("sites lock poisoned").sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiandi_proto::{Device, Filesystem, Host, Modem, Ups};

    fn report(esno_x10: i32, on_battery: bool, fs_used: u64, cpu: u32) -> Report {
        Report {
            seq: 1,
            host: Some(Host {
                cpu_permille: cpu,
                mem_used_mib: 100,
                mem_total_mib: 1000,
                filesystems: vec![Filesystem {
                    mount: "/".into(),
                    used_mib: fs_used,
                    total_mib: 1000,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            devices: vec![
                Device {
                    name: "modem".into(),
                    status: DeviceStatus::Ok as i32,
                    modem: Some(Modem {
                        esno_db_x10: esno_x10,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "ups".into(),
                    status: DeviceStatus::Ok as i32,
                    ups: Some(Ups {
                        on_battery,
                        charge_pct: 80,
                        runtime_s: 1200,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn conds(r: &Report, silent: i64) -> Vec<Condition> {
        evaluate(Some(r), silent, 10_000, &Thresholds::default())
            .into_iter()
            .map(|(c, _)| c)
            .collect()
    }

    #[test]
    fn a_province_lists_its_own_sites_and_follows_a_move() {
        let sites = Sites::new(Thresholds::default());
        for (id, p) in [
            ("gd-2", "GD"),
            ("bj-1", "BJ"),
            ("gd-1", "GD"),
            ("x-1", "GD"),
        ] {
            sites.insert(id, p, None, 0);
        }
        let ids = |p: &str| {
            sites.with_province(p, |it| it.map(|s| s.site_id.clone()).collect::<Vec<_>>())
        };
        assert_eq!(ids("GD"), ["gd-1", "gd-2", "x-1"]);
        assert_eq!(ids("BJ"), ["bj-1"]);
        assert!(ids("XJ").is_empty());
        // Enrolled again in another province: listed there only.
        sites.insert("x-1", "BJ", None, 0);
        assert_eq!(ids("GD"), ["gd-1", "gd-2"]);
        assert_eq!(ids("BJ"), ["bj-1", "x-1"]);
        assert_eq!(sites.len(), 4);
    }

    #[test]
    fn conditions_follow_thresholds() {
        assert!(conds(&report(90, false, 500, 100), 0).is_empty());
        assert_eq!(
            conds(&report(30, false, 500, 100), 0),
            vec![Condition::RainFade]
        );
        // Low Es/No with an unhealthy host is not rain fade.
        assert_eq!(
            conds(&report(30, false, 980, 100), 0),
            vec![Condition::DiskFull]
        );
        assert_eq!(
            conds(&report(90, true, 500, 100), 0),
            vec![Condition::OnBattery]
        );
        assert_eq!(
            conds(&report(90, false, 500, 990), 0),
            vec![Condition::Degraded]
        );
        assert_eq!(
            conds(&report(90, false, 500, 100), 30_001),
            vec![Condition::Down]
        );
        assert!(conds(&report(90, false, 500, 100), 30_000).is_empty());
    }

    #[test]
    fn alarms_raise_and_clear_once() {
        let sites = Sites::new(Thresholds::default());
        sites.insert("s", "GD", None, 0);
        let ev = sites.on_report("s", report(30, false, 500, 100), 1_000);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].alarm.as_str(), ev[0].state.as_str()),
            ("rain-fade", "raised")
        );
        assert!(
            sites
                .on_report("s", report(20, false, 500, 100), 2_000)
                .is_empty()
        );
        assert_eq!(sites.get("s").unwrap().status, Status::RainFade);
        let ev = sites.tick(40_000);
        let names: Vec<_> = ev
            .iter()
            .map(|e| (e.alarm.as_str(), e.state.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("site-down", "raised"), ("rain-fade", "cleared")]
        );
        assert_eq!(sites.get("s").unwrap().status, Status::Down);
        let ev = sites.on_report("s", report(90, false, 500, 100), 41_000);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].alarm.as_str(), ev[0].state.as_str()),
            ("site-down", "cleared")
        );
        assert_eq!(sites.get("s").unwrap().status, Status::Up);
    }

    fn all(r: &Report) -> Vec<(Condition, String)> {
        evaluate(Some(r), 0, 10_000, &Thresholds::default())
    }

    fn alarm(name: &str, sev: tiandi_proto::Severity, detail: &str) -> tiandi_proto::DeviceAlarm {
        tiandi_proto::DeviceAlarm {
            name: name.into(),
            severity: sev as i32,
            detail: detail.into(),
            ..Default::default()
        }
    }

    fn probe(target: &str, ok: bool, rtt_us: u32, error: &str) -> Probe {
        Probe {
            target: target.into(),
            kind: ProbeKind::Icmp as i32,
            ok,
            rtt_us,
            error: error.into(),
            ..Default::default()
        }
    }

    fn device(name: &str, status: DeviceStatus) -> Device {
        Device {
            name: name.into(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_low_battery_is_on_battery_urgent_and_unknown_figures_are_not_zero() {
        use tiandi_proto::Severity as S;
        let mut r = report(90, true, 500, 100);
        let ups = &mut r.devices[1];
        ups.ups = Some(Ups {
            on_battery: true,
            missing: UPS_CHARGE | UPS_RUNTIME,
            ..Default::default()
        });
        ups.alarms = vec![
            alarm("on-battery", S::Critical, "output_source = battery"),
            alarm("battery-low", S::Critical, "battery_status = low"),
        ];
        let found = all(&r);
        assert_eq!(
            found,
            vec![
                (
                    Condition::OnBattery,
                    "ups on battery, charge unknown, runtime unknown".to_string()
                ),
                (
                    Condition::BatteryLow,
                    "ups battery low (battery_status = low), charge unknown, runtime unknown"
                        .to_string()
                ),
            ],
            "on-battery once, from the UPS figures"
        );
        let set: BTreeSet<Condition> = found.iter().map(|(c, _)| *c).collect();
        assert_eq!(set.first(), Some(&Condition::BatteryLow), "the more urgent");
        assert_eq!(status_of(&set), Status::OnBattery);
        // Known figures are said as they are.
        r.devices[1].ups = Some(Ups {
            on_battery: true,
            charge_pct: 18,
            runtime_s: 240,
            ..Default::default()
        });
        assert!(all(&r).iter().any(|(c, d)| *c == Condition::BatteryLow
            && d == "ups battery low (battery_status = low), 18 % charge, 4 min left"));
    }

    #[test]
    fn device_alarms_are_one_condition_listing_each() {
        use tiandi_proto::Severity as S;
        let mut r = report(90, false, 500, 100);
        r.devices[1].alarms = vec![alarm("ups-overload", S::Major, "output_load = 112")];
        r.devices[0].alarms = vec![alarm("modem-fault", S::Critical, "")];
        let found = all(&r);
        assert_eq!(
            found,
            vec![(
                Condition::DeviceAlarm,
                "modem: modem-fault; ups: ups-overload (output_load = 112)".to_string()
            )]
        );
        assert_eq!(
            status_of(&[Condition::DeviceAlarm].into()),
            Status::Degraded
        );
        // An operator's UPS profile without UPS figures: its on-battery alarm is the site's.
        let mut r = report(90, false, 500, 100);
        let mut other = device("acme", DeviceStatus::Ok);
        other.profile = tiandi_proto::Profile::Other as i32;
        other.alarms = vec![alarm("on-battery", S::Critical, "source = battery")];
        r.devices.push(other);
        assert_eq!(
            all(&r),
            vec![(
                Condition::OnBattery,
                "acme on battery (source = battery)".to_string()
            )]
        );
    }

    #[test]
    fn unreachable_devices_and_next_hops_and_a_device_that_pings_but_does_not_answer() {
        let mut r = report(90, false, 500, 100);
        let mut router = device("router", DeviceStatus::Timeout);
        router.error = "no answer within 2000 ms".into();
        router.reach = Some(probe("router", false, 0, "timeout"));
        r.devices.push(router);
        r.probes = vec![
            probe("next-hop", false, 0, "timeout"),
            probe("dns", true, 900, ""),
        ];
        assert_eq!(
            all(&r),
            vec![
                (
                    Condition::DeviceUnreachable,
                    "router unreachable (icmp: timeout)".to_string()
                ),
                (
                    Condition::DeviceUnreachable,
                    "next-hop unreachable (icmp: timeout)".to_string()
                ),
            ]
        );
        assert_eq!(
            status_of(&[Condition::DeviceUnreachable].into()),
            Status::Degraded
        );
        // It answers its ping: reachable, but SNMP is broken there (degraded, saying so).
        let mut r = report(90, false, 500, 100);
        r.devices[0].status = DeviceStatus::Timeout as i32;
        r.devices[0].modem = None;
        r.devices[0].error = "no answer within 2000 ms".into();
        r.devices[0].reach = Some(probe("modem", true, 400, ""));
        assert_eq!(
            all(&r),
            vec![(
                Condition::Degraded,
                "modem answers ping (0.4 ms) but not SNMP: no answer within 2000 ms".to_string()
            )]
        );
        // No reachability check: degraded, as before.
        r.devices[0].reach = None;
        assert_eq!(
            all(&r),
            vec![(
                Condition::Degraded,
                "device modem timeout: no answer within 2000 ms".to_string()
            )]
        );
    }

    #[test]
    fn problems_degrade_a_site_only_when_an_essential_object_is_missing() {
        use tiandi_proto::{ObjectProblem, ProblemKind, Severity as S};
        let problem = |name: &str, kind: ProblemKind, essential: bool| ObjectProblem {
            name: name.into(),
            kind: kind as i32,
            essential,
            ..Default::default()
        };
        let mut r = report(90, false, 500, 100);
        r.devices[1].problems = vec![
            problem("battery_temperature", ProblemKind::NoSuchObject, false),
            problem("minutes_remaining", ProblemKind::WrongType, false),
        ];
        assert!(all(&r).is_empty(), "an ok UPS with gaps is ok");
        // Its essential object missing: bad-answer, degraded; what it did say still counts.
        r.devices[1].status = DeviceStatus::BadAnswer as i32;
        r.devices[1]
            .problems
            .push(problem("output_source", ProblemKind::NoSuchObject, true));
        r.devices[1].alarms = vec![alarm("battery-low", S::Critical, "battery_status = low")];
        assert_eq!(
            all(&r),
            vec![
                (
                    Condition::Degraded,
                    "device ups bad-answer: output_source no-such-object".to_string()
                ),
                (
                    Condition::BatteryLow,
                    "ups battery low (battery_status = low), 80 % charge, 20 min left".to_string()
                ),
            ]
        );
    }

    #[test]
    fn conditions_are_ordered_named_and_serialised_by_name() {
        let mut sorted = Condition::ALL;
        sorted.sort();
        assert_eq!(sorted, Condition::ALL, "ALL is in urgency order");
        let names: BTreeSet<&str> = Condition::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Condition::ALL.len());
        assert_eq!(
            serde_json::to_value(Condition::Down).unwrap(),
            serde_json::json!("site-down")
        );
        assert_eq!(
            serde_json::to_value(Condition::DeviceUnreachable).unwrap(),
            serde_json::json!("device-unreachable")
        );
        assert_eq!(status_of(&Condition::ALL.into()), Status::Down);
        assert_eq!(
            status_of(&[Condition::BatteryLow, Condition::DiskFull].into()),
            Status::OnBattery
        );
    }
}
