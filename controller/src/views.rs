//! What the API's lists are made of, free of I/O so they can be tested alone: a site's row (the
//! figures an operator scans: status, link, host), the site table's filters and sort orders,
//! alarm severities, the overview's counts, and history downsampled into buckets.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Serialize;
use tiandi_proto::Report;

use crate::sites::{ConditionInfo, SiteState, Status};

/// How urgent an alarm is: what the NOC looks at first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Major,
    Minor,
}

impl Severity {
    /// A site that is down is critical; a site on battery or with a full disk will be down
    /// soon; rain fades pass by themselves.
    pub fn of(alarm: &str) -> Severity {
        match alarm {
            "site-down" => Severity::Critical,
            "on-battery" | "disk-full" => Severity::Major,
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

pub fn link_view(r: Option<&Report>) -> LinkView {
    let Some(r) = r else {
        return LinkView::default();
    };
    let modem = r.devices.iter().find_map(|d| d.modem.as_ref());
    LinkView {
        kind: Some(if modem.is_some() {
            LinkType::Satellite
        } else {
            LinkType::Terrestrial
        }),
        rtt_ms: r.link.as_ref().map(|l| l.rtt_ms),
        loss_pct: r.link.as_ref().and_then(|l| {
            (l.sent_packets > 0).then(|| 100.0 * l.lost_packets as f64 / l.sent_packets as f64)
        }),
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

/// What a site is sorted by: a number, or text; sites without the figure go last in either
/// order.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
enum Key {
    Num(f64),
    Text(String),
}

fn key(s: &SiteState, k: SortKey) -> Option<Key> {
    let r = s.latest.as_ref();
    let modem = || r.and_then(|r| r.devices.iter().find_map(|d| d.modem.as_ref()));
    let num = |v: Option<f64>| v.map(Key::Num);
    match k {
        SortKey::SiteId => Some(Key::Text(s.site_id.clone())),
        SortKey::Province => Some(Key::Text(s.province.clone())),
        // Worst first when descending: the status codes grow with severity.
        SortKey::Status => num(Some(s.status.code() as f64)),
        SortKey::LastSeen => num(s.last_seen_ms.map(|t| t as f64)),
        SortKey::Rtt => num(r.and_then(|r| r.link.as_ref()).map(|l| f64::from(l.rtt_ms))),
        SortKey::Loss => num(link_view(r).loss_pct),
        SortKey::EsNo => num(modem().map(|m| f64::from(m.esno_db_x10))),
        SortKey::ModCod => modem().map(|m| Key::Text(m.modcod.clone())),
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
}

impl Filter {
    pub fn matches(&self, s: &SiteState) -> bool {
        self.province.as_deref().is_none_or(|p| s.province == p)
            && self.status.is_none_or(|st| s.status == st)
            && self
                .link
                .is_none_or(|l| link_view(s.latest.as_ref()).kind == Some(l))
            && self.text.as_deref().is_none_or(|t| {
                s.site_id
                    .to_ascii_lowercase()
                    .contains(&t.to_ascii_lowercase())
            })
    }
}

/// Sorts the matching sites (ties broken by site ID, so pages do not overlap).
pub fn sort(sites: &mut [&SiteState], by: SortKey, descending: bool) {
    let mut keyed: Vec<(Option<Key>, usize)> = sites
        .iter()
        .enumerate()
        .map(|(i, s)| (key(s, by), i))
        .collect();
    keyed.sort_by(|(ka, ia), (kb, ib)| {
        let o = match (ka, kb) {
            (Some(a), Some(b)) => {
                let o = a.partial_cmp(b).unwrap_or(Ordering::Equal);
                if descending { o.reverse() } else { o }
            }
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        o.then_with(|| sites[*ia].site_id.cmp(&sites[*ib].site_id))
    });
    let order: Vec<&SiteState> = keyed.iter().map(|(_, i)| sites[*i]).collect();
    sites.copy_from_slice(&order);
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
            latest,
            active: Default::default(),
            external: Default::default(),
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
}
