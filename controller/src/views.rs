//! What the API's lists are made of, free of I/O so they can be tested alone: a site's row (the
//! figures an operator scans: status, link, host), the site table's filters and sort orders,
//! alarm severities, the overview's counts, and history downsampled into buckets.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Serialize;
use tiandi_proto::Report;

use crate::sites::{Condition, ConditionInfo, SiteState, Status};

/// How urgent an alarm is: what the NOC looks at first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Major,
    Minor,
}

impl Severity {
    /// A site that is down, or whose UPS battery is low, is critical (down or about to be);
    /// a site on battery or with a full disk will be down soon, one with a device that does
    /// not answer or in alarm, or whose backups fail, needs someone; rain fades pass by
    /// themselves. The console takes this table from the page (`BOOT.alarms`).
    pub fn of(alarm: &str) -> Severity {
        match alarm {
            "site-down" | "battery-low" => Severity::Critical,
            "on-battery" | "disk-full" | "device-unreachable" | "device-alarm"
            | "backup-failed" | "backup-overdue" => Severity::Major,
            _ => Severity::Minor,
        }
    }
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "critical" => Some(Severity::Critical),
            "major" => Some(Severity::Major),
            "minor" => Some(Severity::Minor),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
        }
    }
}

/// How a site reaches the controller: it has a satellite modem, or it does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkType {
    Satellite,
    Terrestrial,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LinkView {
    #[serde(rename = "type")]
    pub kind: Option<LinkType>,
    pub rtt_ms: Option<u32>,
    pub loss_pct: Option<f64>,
    pub esno_db: Option<f64>,
    pub modcod: Option<String>,
    pub rx_kbps: Option<u32>,
    pub tx_kbps: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HostView {
    pub cpu_pct: Option<f64>,
    pub mem_pct: Option<f64>,
    /// The fullest filesystem.
    pub disk_pct: Option<f64>,
}

/// The site's satellite modem, if it has one.
fn modem_of(r: &Report) -> Option<&tiandi_proto::Modem> {
    r.devices.iter().find_map(|d| d.modem.as_ref())
}

/// How the site reaches the controller (nothing known before its first report).
fn link_kind(r: Option<&Report>) -> Option<LinkType> {
    r.map(|r| match modem_of(r) {
        Some(_) => LinkType::Satellite,
        None => LinkType::Terrestrial,
    })
}

/// The share of packets its QUIC link lost.
fn loss_pct(r: Option<&Report>) -> Option<f64> {
    let l = r?.link.as_ref()?;
    (l.sent_packets > 0).then(|| 100.0 * l.lost_packets as f64 / l.sent_packets as f64)
}

pub fn link_view(r: Option<&Report>) -> LinkView {
    let Some(rep) = r else {
        return LinkView::default();
    };
    let modem = modem_of(rep);
    LinkView {
        kind: link_kind(r),
        rtt_ms: rep.link.as_ref().map(|l| l.rtt_ms),
        loss_pct: loss_pct(r),
        esno_db: modem.map(|m| f64::from(m.esno_db_x10) / 10.0),
        modcod: modem.map(|m| m.modcod.clone()).filter(|m| !m.is_empty()),
        rx_kbps: modem.map(|m| m.rx_rate_kbps),
        tx_kbps: modem.map(|m| m.tx_rate_kbps),
    }
}

pub fn host_view(r: Option<&Report>) -> HostView {
    let Some(h) = r.and_then(|r| r.host.as_ref()) else {
        return HostView::default();
    };
    HostView {
        cpu_pct: Some(f64::from(h.cpu_permille) / 10.0),
        mem_pct: (h.mem_total_mib > 0)
            .then(|| 100.0 * h.mem_used_mib as f64 / h.mem_total_mib as f64),
        disk_pct: h
            .filesystems
            .iter()
            .map(|f| f64::from(f.used_permille()) / 10.0)
            .max_by(f64::total_cmp),
    }
}

/// One path of a dual-homed site, in its row: its name and state (`up`, `suspect`, `down`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PathBrief<'a> {
    pub name: &'a str,
    pub state: &'a str,
}

/// One line of the site table.
#[derive(Clone, Debug, Serialize)]
pub struct SiteRow<'a> {
    pub site_id: &'a str,
    pub province: &'a str,
    pub status: Status,
    pub connected: bool,
    pub last_seen_ms: Option<i64>,
    pub status_since_ms: i64,
    pub interval_ms: i64,
    pub conditions: &'a [ConditionInfo],
    pub link: LinkView,
    pub host: HostView,
    /// A dual-homed site's paths (`null` for a site with one path); the whole view is in
    /// `GET /api/sites/{id}`.
    pub paths: Option<Vec<PathBrief<'a>>>,
    /// The site is down to one path (the `path-redundancy-lost` alarm is active).
    pub redundancy_lost: bool,
}

/// Whether the site's `path-redundancy-lost` alarm is active (not while it is down: then
/// `site-down` is its only alarm).
pub fn redundancy_lost(s: &SiteState) -> bool {
    s.active.contains(&Condition::PathRedundancyLost)
}

pub fn row(s: &SiteState) -> SiteRow<'_> {
    SiteRow {
        site_id: &s.site_id,
        province: &s.province,
        status: s.status,
        connected: s.connected,
        last_seen_ms: s.last_seen_ms,
        status_since_ms: s.status_since_ms,
        interval_ms: s.interval_ms,
        conditions: &s.conditions,
        link: link_view(s.latest.as_ref()),
        host: host_view(s.latest.as_ref()),
        paths: s.paths.as_ref().map(|p| {
            p.paths
                .iter()
                .map(|p| PathBrief {
                    name: &p.name,
                    state: &p.state,
                })
                .collect()
        }),
        redundancy_lost: redundancy_lost(s),
    }
}

/// The columns the site table sorts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    SiteId,
    Province,
    Status,
    LastSeen,
    Rtt,
    Loss,
    EsNo,
    ModCod,
    RxRate,
    TxRate,
    Cpu,
}

impl SortKey {
    pub const NAMES: &'static str =
        "site_id, province, status, last_seen, rtt, loss, esno, modcod, rx_rate, tx_rate, cpu";
    pub fn parse(s: &str) -> Option<SortKey> {
        Some(match s {
            "site_id" => SortKey::SiteId,
            "province" => SortKey::Province,
            "status" => SortKey::Status,
            "last_seen" => SortKey::LastSeen,
            "rtt" => SortKey::Rtt,
            "loss" => SortKey::Loss,
            "esno" => SortKey::EsNo,
            "modcod" => SortKey::ModCod,
            "rx_rate" => SortKey::RxRate,
            "tx_rate" => SortKey::TxRate,
            "cpu" => SortKey::Cpu,
            _ => return None,
        })
    }
}

/// What a site is sorted by: a number, or text (borrowed from the site: no allocation per
/// site); sites without the figure go last in either order.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
enum Key<'a> {
    Num(f64),
    Text(&'a str),
}

fn key(s: &SiteState, k: SortKey) -> Option<Key<'_>> {
    let r = s.latest.as_ref();
    let modem = || r.and_then(modem_of);
    let num = |v: Option<f64>| v.map(Key::Num);
    match k {
        SortKey::SiteId => Some(Key::Text(&s.site_id)),
        SortKey::Province => Some(Key::Text(&s.province)),
        // Worst first when descending: the status codes grow with severity.
        SortKey::Status => num(Some(s.status.code() as f64)),
        SortKey::LastSeen => num(s.last_seen_ms.map(|t| t as f64)),
        SortKey::Rtt => num(r.and_then(|r| r.link.as_ref()).map(|l| f64::from(l.rtt_ms))),
        SortKey::Loss => num(loss_pct(r)),
        SortKey::EsNo => num(modem().map(|m| f64::from(m.esno_db_x10))),
        SortKey::ModCod => modem().map(|m| Key::Text(&m.modcod)),
        SortKey::RxRate => num(modem().map(|m| f64::from(m.rx_rate_kbps))),
        SortKey::TxRate => num(modem().map(|m| f64::from(m.tx_rate_kbps))),
        SortKey::Cpu => num(r
            .and_then(|r| r.host.as_ref())
            .map(|h| f64::from(h.cpu_permille))),
    }
}

/// The site table's filters.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub province: Option<String>,
    pub status: Option<Status>,
    pub link: Option<LinkType>,
    /// Part of the site ID, any case.
    pub text: Option<String>,
    /// Only dual-homed sites down to one path (`redundancy=lost`).
    pub redundancy_lost: bool,
}

impl Filter {
    pub fn matches(&self, s: &SiteState) -> bool {
        self.province.as_deref().is_none_or(|p| s.province == p)
            && self.status.is_none_or(|st| s.status == st)
            && (!self.redundancy_lost || redundancy_lost(s))
            && self
                .link
                .is_none_or(|l| link_kind(s.latest.as_ref()) == Some(l))
            && self.text.as_deref().is_none_or(|t| {
                t.is_empty()
                    || s.site_id
                        .as_bytes()
                        .windows(t.len())
                        .any(|w| w.eq_ignore_ascii_case(t.as_bytes()))
            })
    }
}

/// Sorts the matching sites (ties broken by site ID, so pages do not overlap).
pub fn sort(sites: &mut Vec<&SiteState>, by: SortKey, descending: bool) {
    let n = sites.len();
    sort_first(sites, by, descending, n);
}

/// Puts the first `first` sites of the order in place and drops the rest: a page needs only
/// its own rows and those before it, so a page of 100 out of 20,000 costs a selection
/// (linear) and a sort of 100, not a sort of 20,000.
pub fn sort_first(sites: &mut Vec<&SiteState>, by: SortKey, descending: bool, first: usize) {
    let mut keyed: Vec<(Option<Key>, &SiteState)> =
        sites.iter().map(|s| (key(s, by), *s)).collect();
    let cmp = |(ka, a): &(Option<Key>, &SiteState), (kb, b): &(Option<Key>, &SiteState)| {
        let o = match (ka, kb) {
            (Some(x), Some(y)) => {
                let o = x.partial_cmp(y).unwrap_or(Ordering::Equal);
                if descending { o.reverse() } else { o }
            }
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        o.then_with(|| a.site_id.cmp(&b.site_id))
    };
    if first < keyed.len() {
        keyed.select_nth_unstable_by(first, cmp);
        keyed.truncate(first);
    }
    // Site IDs are unique: the order is total, an unstable sort is exact.
    keyed.sort_unstable_by(cmp);
    sites.clear();
    sites.extend(keyed.into_iter().map(|(_, s)| s));
}

/// Sites of one province by status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProvinceCount {
    pub code: String,
    pub total: u64,
    pub by_status: BTreeMap<&'static str, u64>,
    /// Its worst status (by [`Status::code`]).
    pub worst: Option<Status>,
}

/// Sites by status and by province.
pub fn count(
    sites: &mut dyn Iterator<Item = &SiteState>,
) -> (u64, u64, BTreeMap<&'static str, u64>, Vec<ProvinceCount>) {
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut provinces: BTreeMap<String, ProvinceCount> = BTreeMap::new();
    let (mut n, mut connected) = (0, 0);
    for s in sites {
        n += 1;
        connected += u64::from(s.connected);
        *by_status.entry(s.status.as_str()).or_default() += 1;
        let p = provinces
            .entry(s.province.clone())
            .or_insert_with(|| ProvinceCount {
                code: s.province.clone(),
                ..Default::default()
            });
        p.total += 1;
        *p.by_status.entry(s.status.as_str()).or_default() += 1;
        if p.worst.is_none_or(|w| s.status.code() > w.code()) {
            p.worst = Some(s.status);
        }
    }
    (n, connected, by_status, provinces.into_values().collect())
}

/// One bucket of a downsampled series: its start, the mean, the least and the most.
pub type Bucket = [f64; 4];

/// `points` (time, value), time ascending, into at most `buckets` buckets of equal width over
/// `[from, to]`; empty buckets are left out (a gap in the chart, not a zero).
pub fn downsample(points: &[(i64, f64)], from: i64, to: i64, buckets: usize) -> Vec<Bucket> {
    let buckets = buckets.max(1);
    let width = ((to - from).max(1) as f64 / buckets as f64).max(1.0);
    let mut out: Vec<Bucket> = Vec::new();
    let mut cur: Option<(usize, f64, f64, f64, u64)> = None;
    for &(t, v) in points {
        if t < from || t > to || !v.is_finite() {
            continue;
        }
        let b = (((t - from) as f64 / width) as usize).min(buckets - 1);
        match &mut cur {
            Some((cb, sum, lo, hi, n)) if *cb == b => {
                *sum += v;
                *lo = lo.min(v);
                *hi = hi.max(v);
                *n += 1;
            }
            _ => {
                if let Some((cb, sum, lo, hi, n)) = cur.take() {
                    out.push([from as f64 + cb as f64 * width, sum / n as f64, lo, hi]);
                }
                cur = Some((b, v, v, v, 1));
            }
        }
    }
    if let Some((cb, sum, lo, hi, n)) = cur {
        out.push([from as f64 + cb as f64 * width, sum / n as f64, lo, hi]);
    }
    for b in &mut out {
        b[0] = b[0].round();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiandi_proto::{Device, LinkStats, Modem};

    fn site(id: &str, province: &str, status: Status, rtt: Option<u32>, modem: bool) -> SiteState {
        let latest = rtt.map(|rtt| Report {
            link: Some(LinkStats {
                rtt_ms: rtt,
                sent_packets: 1000,
                lost_packets: 10,
                ..Default::default()
            }),
            devices: if modem {
                vec![Device {
                    name: "modem".into(),
                    modem: Some(Modem {
                        esno_db_x10: 85,
                        modcod: "8PSK 3/4".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        });
        SiteState {
            site_id: id.into(),
            province: province.into(),
            status,
            conditions: vec![],
            connected: true,
            last_seen_ms: None,
            latest_taken_ms: None,
            latest_seq: None,
            interval_ms: 10_000,
            reports: 0,
            status_since_ms: 0,
            agent_version: None,
            paths: None,
            latest,
            active: Default::default(),
            external: Default::default(),
            raised: Default::default(),
        }
    }

    #[test]
    fn filter_sort_and_count() {
        let all = [
            site("gd-002", "GD", Status::Up, Some(600), true),
            site("gd-001", "GD", Status::Down, None, false),
            site("bj-001", "BJ", Status::Up, Some(20), false),
            site("gd-003", "GD", Status::RainFade, Some(650), true),
        ];
        let f = Filter {
            province: Some("GD".into()),
            ..Default::default()
        };
        let mut m: Vec<&SiteState> = all.iter().filter(|s| f.matches(s)).collect();
        sort(&mut m, SortKey::Rtt, true);
        let ids: Vec<_> = m.iter().map(|s| s.site_id.as_str()).collect();
        assert_eq!(ids, ["gd-003", "gd-002", "gd-001"], "no figure goes last");
        sort(&mut m, SortKey::Rtt, false);
        assert_eq!(m[0].site_id, "gd-002");
        assert_eq!(m[2].site_id, "gd-001");
        sort(&mut m, SortKey::Status, true);
        assert_eq!(m[0].site_id, "gd-001", "down is the worst");
        let sat = Filter {
            link: Some(LinkType::Satellite),
            text: Some("GD-00".into()),
            ..Default::default()
        };
        assert_eq!(all.iter().filter(|s| sat.matches(s)).count(), 2);
        let r = row(&all[0]);
        assert_eq!(r.link.kind, Some(LinkType::Satellite));
        assert_eq!(r.link.esno_db, Some(8.5));
        assert_eq!(r.link.loss_pct, Some(1.0));
        let (n, _, by, provinces) = count(&mut all.iter());
        assert_eq!((n, by["up"]), (4, 2));
        let gd = provinces.iter().find(|p| p.code == "GD").unwrap();
        assert_eq!((gd.total, gd.worst), (3, Some(Status::Down)));
    }

    #[test]
    fn a_dual_homed_sites_row_has_its_paths_and_the_redundancy_filter_finds_it() {
        use crate::paths::{PathView, SitePaths};
        let path = |name: &str, state: &str| PathView {
            name: name.into(),
            kind: name.into(),
            state: state.into(),
            rtt_ms: 0,
            loss_pct: 0.0,
            tx_kbps: 0,
            rx_kbps: 0,
            budget_kbps: 0,
            since_ms: 0,
            connected: false,
        };
        let mut dual = site("gd-001", "GD", Status::Degraded, Some(30), false);
        dual.paths = Some(SitePaths {
            paths: vec![path("ground", "down"), path("sky", "up")],
            ..Default::default()
        });
        dual.active = [Condition::PathRedundancyLost].into();
        let mut both_up = site("gd-002", "GD", Status::Up, Some(30), false);
        both_up.paths = Some(SitePaths {
            paths: vec![path("ground", "up"), path("sky", "suspect")],
            ..Default::default()
        });
        let single = site("gd-003", "GD", Status::Up, Some(30), false);

        let r = row(&dual);
        assert_eq!(
            r.paths.as_deref(),
            Some(
                &[
                    PathBrief {
                        name: "ground",
                        state: "down"
                    },
                    PathBrief {
                        name: "sky",
                        state: "up"
                    }
                ][..]
            )
        );
        assert!(r.redundancy_lost);
        let json = serde_json::to_value(row(&both_up)).unwrap();
        assert_eq!(
            json["paths"],
            serde_json::json!([{"name": "ground", "state": "up"}, {"name": "sky", "state": "suspect"}])
        );
        assert_eq!(json["redundancy_lost"], false);
        let json = serde_json::to_value(row(&single)).unwrap();
        assert!(json["paths"].is_null() && json["redundancy_lost"] == false);

        let lost = Filter {
            redundancy_lost: true,
            ..Default::default()
        };
        let all = [dual, both_up, single];
        let ids: Vec<_> = all
            .iter()
            .filter(|s| lost.matches(s))
            .map(|s| s.site_id.as_str())
            .collect();
        assert_eq!(ids, ["gd-001"]);
        assert_eq!(
            all.iter().filter(|s| Filter::default().matches(s)).count(),
            3
        );
    }

    #[test]
    fn a_page_sorted_alone_is_the_same_page_of_the_whole_order() {
        let all: Vec<SiteState> = (0..300)
            .map(|i| {
                let rtt = (i % 7 != 0).then_some((i * 37 % 101) as u32);
                let st = [Status::Up, Status::Down, Status::RainFade][i % 3];
                site(
                    &format!("s-{:03}", (i * 53) % 300),
                    "GD",
                    st,
                    rtt,
                    i % 2 == 0,
                )
            })
            .collect();
        for by in [
            SortKey::SiteId,
            SortKey::Rtt,
            SortKey::Status,
            SortKey::EsNo,
            SortKey::ModCod,
        ] {
            for descending in [false, true] {
                let mut whole: Vec<&SiteState> = all.iter().collect();
                sort(&mut whole, by, descending);
                for first in [0, 1, 50, 299, 300, 400] {
                    let mut page: Vec<&SiteState> = all.iter().collect();
                    sort_first(&mut page, by, descending, first);
                    let ids =
                        |v: &[&SiteState]| v.iter().map(|s| s.site_id.clone()).collect::<Vec<_>>();
                    assert_eq!(
                        ids(&page),
                        ids(&whole[..first.min(300)]),
                        "{by:?} {descending} {first}"
                    );
                }
            }
        }
    }

    #[test]
    fn downsample_buckets() {
        let pts: Vec<(i64, f64)> = (0..100).map(|i| (i * 10, i as f64)).collect();
        let b = downsample(&pts, 0, 999, 10);
        assert_eq!(b.len(), 10);
        assert_eq!(b[0], [0.0, 4.5, 0.0, 9.0]);
        assert_eq!(b[9][3], 99.0);
        // A gap stays a gap.
        let gappy = [(0, 1.0), (950, 3.0)];
        assert_eq!(downsample(&gappy, 0, 999, 10).len(), 2);
        assert!(downsample(&[], 0, 10, 5).is_empty());
        assert_eq!(Severity::of("site-down"), Severity::Critical);
        assert_eq!(Severity::of("rain-fade"), Severity::Minor);
    }

    #[test]
    fn every_condition_has_a_severity_and_the_urgent_ones_come_first() {
        use crate::sites::Condition as C;
        let of = |c: C| Severity::of(c.name());
        assert_eq!(of(C::Down), Severity::Critical);
        assert_eq!(of(C::BatteryLow), Severity::Critical);
        for c in [
            C::OnBattery,
            C::DiskFull,
            C::DeviceUnreachable,
            C::DeviceAlarm,
            C::BackupFailed,
            C::BackupOverdue,
        ] {
            assert_eq!(of(c), Severity::Major, "{c:?}");
        }
        for c in [
            C::RainFade,
            C::PathRedundancyLost,
            C::Degraded,
            C::TransferPaused,
        ] {
            assert_eq!(of(c), Severity::Minor, "{c:?}");
        }
    }
}
