//! Per-site series, rendered from the live site table at scrape time, in groups an operator can
//! turn off.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::esc;
use crate::sites::Sites;

/// The site's satellite modem, in its latest report.
fn modem(s: &crate::sites::SiteState) -> Option<&tiandi_proto::Modem> {
    s.latest
        .as_ref()?
        .devices
        .iter()
        .find_map(|d| d.modem.as_ref())
}

/// The site's UPS, in its latest report.
fn ups(s: &crate::sites::SiteState) -> Option<&tiandi_proto::Ups> {
    s.latest
        .as_ref()?
        .devices
        .iter()
        .find_map(|d| d.ups.as_ref())
}

/// Groups of per-site series, each of which a controller can turn off (`[metrics]
/// site_series`): at 20,000 sites every series of a group is 20,000 series in Prometheus
/// (`dashboards/METRICS.md` counts them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteSeries {
    /// `tiandi_site_up`, `_status{status}`, `_info{agent_version}`, `_reports_total`.
    Status,
    /// CPU, memory, load, uptime, filesystems.
    Host,
    /// The QUIC link as the agent sees it: RTT, packets sent and lost, bytes, report age.
    Link,
    /// The satellite modem: Es/No, levels, ModCod, carrier rates.
    Modem,
    /// The UPS: on battery, charge, runtime.
    Ups,
    /// Each polled SNMP device: answering or not, how many of its profile's objects it did
    /// not answer properly, and whether its address answers the reachability check.
    Devices,
    /// Per interface (host NICs and device ports): bytes, errors, oper status.
    Interfaces,
    /// `tiandi_site_alarm{alarm}`, one per active alarm.
    Alarms,
    /// A dual-homed site's paths (issue 20): each path's state, RTT, loss and whether the
    /// controller holds a connection on it; which path each class of traffic uses. Sites with
    /// one path have none.
    Paths,
}

impl SiteSeries {
    pub const ALL: [SiteSeries; 9] = [
        SiteSeries::Status,
        SiteSeries::Host,
        SiteSeries::Link,
        SiteSeries::Modem,
        SiteSeries::Ups,
        SiteSeries::Devices,
        SiteSeries::Interfaces,
        SiteSeries::Alarms,
        SiteSeries::Paths,
    ];
}

/// Adds one series of a site: its extra labels (after `site` and `province`) and value.
type Emit<'a> = &'a mut dyn FnMut(&[(&str, &str)], f64);

/// One per-site metric family.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    group: SiteSeries,
    series: fn(&crate::sites::SiteState, i64, Emit),
}

const fn gauge(
    group: SiteSeries,
    name: &'static str,
    help: &'static str,
    series: fn(&crate::sites::SiteState, i64, Emit),
) -> Family {
    Family {
        name,
        kind: "gauge",
        help,
        group,
        series,
    }
}

const fn counter(
    group: SiteSeries,
    name: &'static str,
    help: &'static str,
    series: fn(&crate::sites::SiteState, i64, Emit),
) -> Family {
    Family {
        name,
        kind: "counter",
        help,
        group,
        series,
    }
}

fn host(s: &crate::sites::SiteState) -> Option<&tiandi_proto::Host> {
    s.latest.as_ref()?.host.as_ref()
}

fn link(s: &crate::sites::SiteState) -> Option<&tiandi_proto::LinkStats> {
    s.latest.as_ref()?.link.as_ref()
}

fn devices(s: &crate::sites::SiteState) -> &[tiandi_proto::Device] {
    s.latest.as_ref().map_or(&[], |r| r.devices.as_slice())
}

/// A dual-homed site's paths, as its latest `Paths` frame described them (none for a site
/// with one path).
fn paths(s: &crate::sites::SiteState) -> &[crate::paths::PathView] {
    s.paths.as_ref().map_or(&[], |p| p.paths.as_slice())
}

/// `tiandi_site_path_state`'s value of a path's state.
fn path_state(state: &str) -> f64 {
    match state {
        "up" => 2.0,
        "suspect" => 1.0,
        _ => 0.0,
    }
}

fn profile_name(p: i32) -> &'static str {
    match tiandi_proto::Profile::try_from(p).unwrap_or(tiandi_proto::Profile::Unknown) {
        tiandi_proto::Profile::Unknown => "unknown",
        tiandi_proto::Profile::IfMib => "if-mib",
        tiandi_proto::Profile::UpsMib => "ups-mib",
        tiandi_proto::Profile::VsatModem => "vsat-modem",
        tiandi_proto::Profile::Other => "other",
    }
}

use SiteSeries as G;

const SITE_FAMILIES: &[Family] = &[
    gauge(
        G::Status,
        "tiandi_site_up",
        "1 unless the site is down.",
        |s, _, e| {
            e(
                &[],
                if s.status == crate::sites::Status::Down {
                    0.0
                } else {
                    1.0
                },
            )
        },
    ),
    gauge(
        G::Status,
        "tiandi_site_status",
        "1 for the site's status (up, degraded, disk-full, rain-fade, on-battery, down).",
        |s, _, e| e(&[("status", s.status.as_str())], 1.0),
    ),
    gauge(
        G::Status,
        "tiandi_site_info",
        "1 for each site whose agent has connected, with the agent's version.",
        |s, _, e| {
            if let Some(v) = &s.agent_version {
                e(&[("agent_version", v)], 1.0)
            }
        },
    ),
    counter(
        G::Status,
        "tiandi_site_reports_total",
        "Reports received from the site since the controller started.",
        |s, _, e| e(&[], s.reports as f64),
    ),
    gauge(
        G::Link,
        "tiandi_site_connected",
        "1 while the agent's QUIC connection is open.",
        |s, _, e| e(&[], if s.connected { 1.0 } else { 0.0 }),
    ),
    gauge(
        G::Link,
        "tiandi_site_last_report_age_seconds",
        "Seconds since the controller last received a report from the site.",
        |s, now, e| {
            if let Some(t) = s.last_seen_ms {
                e(&[], (now - t).max(0) as f64 / 1000.0)
            }
        },
    ),
    gauge(
        G::Link,
        "tiandi_site_link_rtt_seconds",
        "QUIC round-trip time to the controller, as the agent measured it.",
        |s, _, e| {
            if let Some(l) = link(s) {
                e(&[], f64::from(l.rtt_ms) / 1000.0)
            }
        },
    ),
    counter(
        G::Link,
        "tiandi_site_link_packets_sent_total",
        "QUIC packets the agent sent on its current connection.",
        |s, _, e| {
            if let Some(l) = link(s) {
                e(&[], l.sent_packets as f64)
            }
        },
    ),
    counter(
        G::Link,
        "tiandi_site_link_packets_lost_total",
        "QUIC packets of the agent's current connection declared lost.",
        |s, _, e| {
            if let Some(l) = link(s) {
                e(&[], l.lost_packets as f64)
            }
        },
    ),
    counter(
        G::Link,
        "tiandi_site_link_transmit_bytes_total",
        "UDP bytes the agent sent on its current connection.",
        |s, _, e| {
            if let Some(l) = link(s) {
                e(&[], l.tx_bytes as f64)
            }
        },
    ),
    counter(
        G::Link,
        "tiandi_site_link_receive_bytes_total",
        "UDP bytes the agent received on its current connection.",
        |s, _, e| {
            if let Some(l) = link(s) {
                e(&[], l.rx_bytes as f64)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_cpu_ratio",
        "Host CPU use (0-1).",
        |s, _, e| {
            if let Some(h) = host(s) {
                e(&[], f64::from(h.cpu_permille) / 1000.0)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_load1",
        "Host load average over 1 minute.",
        |s, _, e| {
            if let Some(h) = host(s) {
                e(&[], f64::from(h.load1_c) / 100.0)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_memory_used_ratio",
        "Host memory use (0-1).",
        |s, _, e| {
            if let Some(h) = host(s).filter(|h| h.mem_total_mib > 0) {
                e(&[], h.mem_used_mib as f64 / h.mem_total_mib as f64)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_memory_total_bytes",
        "Host memory.",
        |s, _, e| {
            if let Some(h) = host(s) {
                e(&[], (h.mem_total_mib << 20) as f64)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_uptime_seconds",
        "Seconds since the host booted.",
        |s, _, e| {
            if let Some(h) = host(s) {
                e(&[], h.uptime_s as f64)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_disk_used_ratio_max",
        "Fullest filesystem's use (0-1).",
        |s, _, e| {
            if let Some(v) = host(s).and_then(|h| {
                h.filesystems
                    .iter()
                    .map(|f| f64::from(f.used_permille()) / 1000.0)
                    .reduce(f64::max)
            }) {
                e(&[], v)
            }
        },
    ),
    gauge(
        G::Host,
        "tiandi_site_filesystem_used_ratio",
        "Each filesystem's use (0-1).",
        |s, _, e| {
            for f in host(s).map_or(&[][..], |h| &h.filesystems) {
                e(
                    &[("mount", &f.mount)],
                    f64::from(f.used_permille()) / 1000.0,
                )
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_esno_db",
        "Satellite modem Es/No (dB).",
        |s, _, e| {
            if let Some(m) = modem(s) {
                e(&[], f64::from(m.esno_db_x10) / 10.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_rx_level_dbm",
        "Satellite modem receive level (dBm; none while the modem does not give it).",
        |s, _, e| {
            if let Some(m) = modem(s).filter(|m| m.missing & tiandi_proto::MODEM_RX_LEVEL == 0) {
                e(&[], f64::from(m.rx_level_dbm_x10) / 10.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_tx_power_dbm",
        "Satellite modem transmit power (dBm; none while the modem does not give it).",
        |s, _, e| {
            if let Some(m) = modem(s).filter(|m| m.missing & tiandi_proto::MODEM_TX_POWER == 0) {
                e(&[], f64::from(m.tx_power_dbm_x10) / 10.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_receive_rate_bytes_per_second",
        "The carrier's information rate toward the site (0: not known).",
        |s, _, e| {
            if let Some(m) = modem(s) {
                e(&[], f64::from(m.rx_rate_kbps) * 125.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_transmit_rate_bytes_per_second",
        "The carrier's information rate from the site (0: not known).",
        |s, _, e| {
            if let Some(m) = modem(s) {
                e(&[], f64::from(m.tx_rate_kbps) * 125.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_info",
        "1, with the modem's current modulation and coding (ModCod).",
        |s, _, e| {
            if let Some(m) = modem(s).filter(|m| !m.modcod.is_empty()) {
                e(&[("modcod", &m.modcod)], 1.0)
            }
        },
    ),
    gauge(
        G::Ups,
        "tiandi_site_ups_on_battery",
        "1 while the UPS runs on battery.",
        |s, _, e| {
            if let Some(u) = ups(s) {
                e(&[], if u.on_battery { 1.0 } else { 0.0 })
            }
        },
    ),
    gauge(
        G::Ups,
        "tiandi_site_ups_charge_ratio",
        "UPS battery charge (0-1; none while the UPS does not give it).",
        |s, _, e| {
            if let Some(u) = ups(s).filter(|u| u.missing & tiandi_proto::UPS_CHARGE == 0) {
                e(&[], f64::from(u.charge_pct) / 100.0)
            }
        },
    ),
    gauge(
        G::Ups,
        "tiandi_site_ups_runtime_seconds",
        "UPS runtime left on battery, as the UPS estimates it (none while it does not give it).",
        |s, _, e| {
            if let Some(u) = ups(s).filter(|u| u.missing & tiandi_proto::UPS_RUNTIME == 0) {
                e(&[], f64::from(u.runtime_s))
            }
        },
    ),
    gauge(
        G::Devices,
        "tiandi_site_device_up",
        "1 when the SNMP device answered the last poll usably, 0 otherwise.",
        |s, _, e| {
            for d in devices(s) {
                let ok = d.status == tiandi_proto::DeviceStatus::Ok as i32;
                e(
                    &[("device", &d.name), ("profile", profile_name(d.profile))],
                    if ok { 1.0 } else { 0.0 },
                )
            }
        },
    ),
    gauge(
        G::Devices,
        "tiandi_site_device_problems",
        "Objects of an SNMP device's profile it did not answer properly at the last poll (no \
         such object or instance, wrong type, out of range, error status, a table cut short).",
        |s, _, e| {
            for d in devices(s) {
                e(&[("device", &d.name)], d.problems.len() as f64)
            }
        },
    ),
    gauge(
        G::Devices,
        "tiandi_site_device_reachable",
        "1 when an SNMP device's address answered its reachability check (ICMP echo, TCP \
         connect) at the last poll, 0 when not; none for a device not checked.",
        |s, _, e| {
            for d in devices(s) {
                if let Some(p) = &d.reach {
                    e(&[("device", &d.name)], if p.ok { 1.0 } else { 0.0 })
                }
            }
        },
    ),
    counter(
        G::Interfaces,
        "tiandi_site_network_receive_bytes_total",
        "Bytes received by each of the host's network interfaces.",
        |s, _, e| {
            for i in host(s).map_or(&[][..], |h| &h.interfaces) {
                e(&[("interface", &i.name)], i.rx_bytes as f64)
            }
        },
    ),
    counter(
        G::Interfaces,
        "tiandi_site_network_transmit_bytes_total",
        "Bytes sent by each of the host's network interfaces.",
        |s, _, e| {
            for i in host(s).map_or(&[][..], |h| &h.interfaces) {
                e(&[("interface", &i.name)], i.tx_bytes as f64)
            }
        },
    ),
    counter(
        G::Interfaces,
        "tiandi_site_network_errors_total",
        "Receive and transmit errors of each of the host's network interfaces.",
        |s, _, e| {
            for i in host(s).map_or(&[][..], |h| &h.interfaces) {
                e(
                    &[("interface", &i.name)],
                    (i.rx_errors + i.tx_errors) as f64,
                )
            }
        },
    ),
    gauge(
        G::Interfaces,
        "tiandi_site_device_interface_up",
        "1 while an SNMP device's interface is operationally up (IF-MIB ifOperStatus).",
        |s, _, e| {
            for d in devices(s) {
                for i in &d.interfaces {
                    e(
                        &[("device", &d.name), ("interface", &i.name)],
                        if i.oper_up { 1.0 } else { 0.0 },
                    )
                }
            }
        },
    ),
    counter(
        G::Interfaces,
        "tiandi_site_device_interface_receive_bytes_total",
        "Bytes an SNMP device's interface received (IF-MIB octets).",
        |s, _, e| {
            for d in devices(s) {
                for i in &d.interfaces {
                    e(
                        &[("device", &d.name), ("interface", &i.name)],
                        i.in_octets as f64,
                    )
                }
            }
        },
    ),
    counter(
        G::Interfaces,
        "tiandi_site_device_interface_transmit_bytes_total",
        "Bytes an SNMP device's interface sent (IF-MIB octets).",
        |s, _, e| {
            for d in devices(s) {
                for i in &d.interfaces {
                    e(
                        &[("device", &d.name), ("interface", &i.name)],
                        i.out_octets as f64,
                    )
                }
            }
        },
    ),
    gauge(
        G::Alarms,
        "tiandi_site_alarm",
        "1 for each active alarm of a site.",
        |s, _, e| {
            for c in &s.active {
                e(&[("alarm", c.name())], 1.0)
            }
        },
    ),
    counter(
        G::Alarms,
        "tiandi_site_alarms_raised_total",
        "Times each alarm of a site was raised since the controller started (episodes).",
        |s, _, e| {
            // `site-down`, and `rain-fade` for a site with a modem, start at 0, so that
            // increase() counts a site's first episode too.
            use crate::sites::Condition;
            let mut seen: Vec<(Condition, u64)> = Vec::new();
            seen.push((Condition::Down, 0));
            if modem(s).is_some() {
                seen.push((Condition::RainFade, 0));
            }
            for (c, n) in &s.raised {
                match seen.iter_mut().find(|(x, _)| x == c) {
                    Some(e) => e.1 = *n,
                    None => seen.push((*c, *n)),
                }
            }
            for (c, n) in seen {
                e(&[("alarm", c.name())], n as f64)
            }
        },
    ),
    gauge(
        G::Paths,
        "tiandi_site_path_state",
        "Each path of a dual-homed site, as the site sees it: 2 up, 1 suspect, 0 down.",
        |s, _, e| {
            for p in paths(s) {
                e(
                    &[("path", &p.name), ("kind", &p.kind)],
                    path_state(&p.state),
                )
            }
        },
    ),
    gauge(
        G::Paths,
        "tiandi_site_path_rtt_seconds",
        "Round-trip time of each path of a dual-homed site, as the site measured it.",
        |s, _, e| {
            for p in paths(s) {
                e(&[("path", &p.name)], f64::from(p.rtt_ms) / 1000.0)
            }
        },
    ),
    gauge(
        G::Paths,
        "tiandi_site_path_loss_ratio",
        "Packet loss of each path of a dual-homed site (0-1), as the site measured it.",
        |s, _, e| {
            for p in paths(s) {
                e(&[("path", &p.name)], p.loss_pct / 100.0)
            }
        },
    ),
    gauge(
        G::Paths,
        "tiandi_site_path_connected",
        "1 while the controller holds a live connection of the dual-homed site on the path.",
        |s, _, e| {
            for p in paths(s) {
                e(&[("path", &p.name)], if p.connected { 1.0 } else { 0.0 })
            }
        },
    ),
    gauge(
        G::Paths,
        "tiandi_site_class_path",
        "1 for the path each class of a dual-homed site's traffic uses now (a class with no \
         usable path has none).",
        |s, _, e| {
            for (class, path) in s.paths.iter().flat_map(|p| &p.uses) {
                e(&[("class", class), ("path", path)], 1.0)
            }
        },
    ),
];

/// Sites rendered under one hold of the sites' read lock: ingest waits at most that long
/// (at 20,000 sites the whole exposition, ~130 MB, held it for about a second; issue 22).
const SITES_PER_LOCK: usize = 256;
/// Text handed on at a time by [`render_sites_chunked`].
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The per-site families into one string (tests, small fleets).
pub(super) fn render_sites(out: &mut String, sites: &Sites, groups: &[SiteSeries], now_ms: i64) {
    render_sites_chunked(sites, groups, now_ms, |chunk| {
        out.push_str(&chunk);
        true
    });
}

/// The per-site families, handed to `emit` in pieces of about [`CHUNK_BYTES`] (each family
/// whole and in site-ID order across pieces), taking the sites' read lock for
/// [`SITES_PER_LOCK`] sites at a time; stops when `emit` returns false (the client went).
/// A site that goes between the listing and its turn is left out.
pub fn render_sites_chunked(
    sites: &Sites,
    groups: &[SiteSeries],
    now_ms: i64,
    mut emit: impl FnMut(String) -> bool,
) {
    if groups.is_empty() {
        return;
    }
    let mut ids: Vec<String> = sites.with_all(|all| all.map(|s| s.site_id.clone()).collect());
    ids.sort_unstable();
    let mut out = String::with_capacity(CHUNK_BYTES + 4096);
    for f in SITE_FAMILIES.iter().filter(|f| groups.contains(&f.group)) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            f.name, f.help, f.name, f.kind
        );
        for batch in ids.chunks(SITES_PER_LOCK) {
            sites.with_each(batch, |s| {
                let (site, province) = (esc(&s.site_id), esc(&s.province));
                (f.series)(s, now_ms, &mut |extra, v| {
                    let _ = write!(out, "{}{{site=\"{site}\",province=\"{province}\"", f.name);
                    for (k, val) in extra {
                        let _ = write!(out, ",{k}=\"{}\"", esc(val));
                    }
                    let _ = writeln!(out, "}} {v}");
                });
            });
            if out.len() >= CHUNK_BYTES
                && !emit(std::mem::replace(
                    &mut out,
                    String::with_capacity(CHUNK_BYTES + 4096),
                ))
            {
                return;
            }
        }
    }
    if !out.is_empty() {
        emit(out);
    }
}
