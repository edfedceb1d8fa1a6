//! The controller's Prometheus metrics. Its own figures use the `prometheus` crate; the
//! per-site gauges (thousands of sites, labels `site` and `province`) are rendered straight from
//! the live site table at scrape time, in the text exposition format, so no per-site metric
//! objects live in memory between scrapes.

use std::fmt::Write;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use serde::{Deserialize, Serialize};
use tiandi_transfer::outbox::JobState;

use crate::sites::Sites;

pub const REPORTS: &str = "tiandi_reports_total";
pub const DUPLICATES: &str = "tiandi_reports_duplicate_total";

/// `tiandi_enrollments_total{result}` values.
pub const ENROLL_RESULTS: [&str; 2] = ["issued", "refused"];
/// `tiandi_connections_refused_total{reason}` values set up front (others may follow).
const REFUSED_REASONS: [&str; 2] = ["overload", "handshake"];

pub struct Metrics {
    pub registry: Registry,
    pub reports: IntCounter,
    pub duplicates: IntCounter,
    pub protocol_errors: IntCounter,
    pub connections: IntGauge,
    pub pending_admission: IntGauge,
    pub handshakes: IntCounter,
    pub refused: IntCounterVec,
    pub alarm_events: IntCounterVec,
    pub ingest_seconds: Histogram,
    pub report_delay_seconds: Histogram,
    pub enrollments: IntCounterVec,
    /// Backup jobs (labels `job`, `site`; `kind` for run results): set every 30 s.
    pub backup: [prometheus::GaugeVec; 8],
}

impl Metrics {
    /// Sets the backup gauges from the jobs' statuses (jobs no longer configured vanish).
    pub fn set_backups(&self, jobs: &[crate::backups::BackupStatus]) {
        for g in &self.backup {
            g.reset();
        }
        let [success, age, overdue, ok, repo, partner, quota, rpo] = &self.backup;
        for j in jobs {
            let l = [j.job.as_str(), j.site.as_str()];
            if let Some(t) = j.last_success_ms {
                success.with_label_values(&l).set(t as f64 / 1000.0);
            }
            if let Some(a) = j.age_s {
                age.with_label_values(&l).set(a as f64);
            }
            rpo.with_label_values(&l)
                .set(f64::from(j.rpo_hours) * 3600.0);
            overdue
                .with_label_values(&l)
                .set(if j.overdue { 1.0 } else { 0.0 });
            for (kind, r) in [
                ("backup", &j.last_backup),
                ("verify", &j.last_verify),
                ("drill", &j.last_drill),
            ] {
                if let Some(r) = r {
                    ok.with_label_values(&[j.job.as_str(), j.site.as_str(), kind])
                        .set(if r.ok { 1.0 } else { 0.0 });
                }
            }
            if j.last_success_ms.is_some() {
                repo.with_label_values(&l).set(j.repo_bytes as f64);
            }
            if let Some(pct) = j.quota_used_pct {
                quota.with_label_values(&l).set(pct / 100.0);
            }
            if let Some(b) = j.partner_bytes {
                partner.with_label_values(&l).set(b as f64);
            }
        }
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reports = IntCounter::new(REPORTS, "Reports stored (each once).").expect("metric");
        let duplicates = IntCounter::new(
            DUPLICATES,
            "Reports received again and acknowledged without storing.",
        )
        .expect("metric");
        let protocol_errors = IntCounter::new(
            "tiandi_protocol_errors_total",
            "Connections closed for malformed frames or messages.",
        )
        .expect("metric");
        let connections =
            IntGauge::new("tiandi_connections", "Agent connections open.").expect("metric");
        let pending_admission = IntGauge::new(
            "tiandi_connections_pending_admission",
            "Connections waiting for admission.",
        )
        .expect("metric");
        let handshakes = IntCounter::new("tiandi_handshakes_total", "QUIC handshakes completed.")
            .expect("metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "tiandi_connections_refused_total",
                "Connections refused, by reason.",
            ),
            &["reason"],
        )
        .expect("metric");
        let alarm_events = IntCounterVec::new(
            Opts::new("tiandi_alarm_events_total", "Alarm raises and clears."),
            &["alarm", "state"],
        )
        .expect("metric");
        let ingest_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tiandi_ingest_seconds",
                "Time to store one report (decode to stored, before flush).",
            )
            .buckets(vec![1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]),
        )
        .expect("metric");
        let report_delay_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tiandi_report_delay_seconds",
                "Sample time at the site to stored here, per report (backlog delivered after an \
                 outage counts with its whole age).",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
            ]),
        )
        .expect("metric");
        let enrollments = IntCounterVec::new(
            Opts::new(
                "tiandi_enrollments_total",
                "Enrollment attempts, by result.",
            ),
            &["result"],
        )
        .expect("metric");
        // Label values known in advance start at 0, so that rate() sees the first one.
        for r in ENROLL_RESULTS {
            enrollments.with_label_values(&[r]);
        }
        for r in REFUSED_REASONS {
            refused.with_label_values(&[r]);
        }
        let g = |name: &str, help: &str, labels: &[&str]| {
            prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("metric")
        };
        let backup = [
            g(
                "tiandi_backup_last_success_timestamp_seconds",
                "Start of the job's newest successful backup.",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_age_seconds",
                "Age of the job's newest good backup at its partner (the recovery point).",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_overdue",
                "1 when the job's newest good backup at its partner is older than its RPO.",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_last_run_ok",
                "1 when the job's last run of the kind succeeded, 0 when it failed.",
                &["backup_job", "site", "kind"],
            ),
            g(
                "tiandi_backup_repository_bytes",
                "Size of the job's repository at the site, after its last successful backup.",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_partner_bytes",
                "Size of the job's repository copy kept by this controller as its partner.",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_quota_used_ratio",
                "Share of the job's quota its repository takes (jobs with a quota_gb).",
                &["backup_job", "site"],
            ),
            g(
                "tiandi_backup_rpo_seconds",
                "The job's recovery point objective: the age its newest good backup may reach.",
                &["backup_job", "site"],
            ),
        ];
        for m in [
            Box::new(reports.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duplicates.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(connections.clone()),
            Box::new(pending_admission.clone()),
            Box::new(handshakes.clone()),
            Box::new(refused.clone()),
            Box::new(alarm_events.clone()),
            Box::new(ingest_seconds.clone()),
            Box::new(report_delay_seconds.clone()),
            Box::new(enrollments.clone()),
        ]
        .into_iter()
        .chain(
            backup
                .iter()
                .map(|g| Box::new(g.clone()) as Box<dyn prometheus::core::Collector>),
        )
        .chain([
            // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
            Box::new(prometheus::process_collector::ProcessCollector::for_self())
                as Box<dyn prometheus::core::Collector>,
            Box::new(build_info()),
        ]) {
            registry.register(m).expect("unique metric names");
        }
        Metrics {
            registry,
            reports,
            duplicates,
            protocol_errors,
            connections,
            pending_admission,
            handshakes,
            refused,
            alarm_events,
            ingest_seconds,
            report_delay_seconds,
            enrollments,
            backup,
        }
    }

    /// The whole exposition: the controller's own metrics, QUIC wire totals, per-site gauges.
    pub fn render(
        &self,
        sites: &Sites,
        groups: &[SiteSeries],
        wire: WireTotals,
        commits: u64,
        now_ms: i64,
    ) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut out = String::from_utf8(buf).unwrap_or_default();
        let _ = write!(
            out,
            "# HELP tiandi_quic_udp_bytes_total UDP payload bytes of agent connections.\n\
             # TYPE tiandi_quic_udp_bytes_total counter\n\
             tiandi_quic_udp_bytes_total{{direction=\"rx\"}} {}\n\
             tiandi_quic_udp_bytes_total{{direction=\"tx\"}} {}\n\
             # HELP tiandi_quic_udp_datagrams_total UDP datagrams of agent connections.\n\
             # TYPE tiandi_quic_udp_datagrams_total counter\n\
             tiandi_quic_udp_datagrams_total{{direction=\"rx\"}} {}\n\
             tiandi_quic_udp_datagrams_total{{direction=\"tx\"}} {}\n\
             # HELP tiandi_store_commits_total Group commits (flushes) of the store.\n\
             # TYPE tiandi_store_commits_total counter\n\
             tiandi_store_commits_total {}\n",
            wire.rx_bytes, wire.tx_bytes, wire.rx_datagrams, wire.tx_datagrams, commits
        );
        render_sites(&mut out, sites, groups, now_ms);
        out
    }
}

/// `tiandi_build_info{version}` 1: which release each controller runs.
fn build_info() -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(
        Opts::new(
            "tiandi_build_info",
            "1, with the version of the controller that serves these metrics.",
        ),
        &["version"],
    )
    .expect("metric");
    g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireTotals {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
}

impl WireTotals {
    pub fn add(&mut self, s: &quinn::ConnectionStats) {
        self.rx_bytes += s.udp_rx.bytes;
        self.tx_bytes += s.udp_tx.bytes;
        self.rx_datagrams += s.udp_rx.datagrams;
        self.tx_datagrams += s.udp_tx.datagrams;
    }
}

/// Escapes a label value for the text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
    /// Each polled SNMP device: answering or not.
    Devices,
    /// Per interface (host NICs and device ports): bytes, errors, oper status.
    Interfaces,
    /// `tiandi_site_alarm{alarm}`, one per active alarm.
    Alarms,
}

impl SiteSeries {
    pub const ALL: [SiteSeries; 8] = [
        SiteSeries::Status,
        SiteSeries::Host,
        SiteSeries::Link,
        SiteSeries::Modem,
        SiteSeries::Ups,
        SiteSeries::Devices,
        SiteSeries::Interfaces,
        SiteSeries::Alarms,
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

fn profile_name(p: i32) -> &'static str {
    match tiandi_proto::Profile::try_from(p).unwrap_or(tiandi_proto::Profile::Unknown) {
        tiandi_proto::Profile::Unknown => "unknown",
        tiandi_proto::Profile::IfMib => "if-mib",
        tiandi_proto::Profile::UpsMib => "ups-mib",
        tiandi_proto::Profile::VsatModem => "vsat-modem",
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
        "Satellite modem receive level (dBm).",
        |s, _, e| {
            if let Some(m) = modem(s) {
                e(&[], f64::from(m.rx_level_dbm_x10) / 10.0)
            }
        },
    ),
    gauge(
        G::Modem,
        "tiandi_site_modem_tx_power_dbm",
        "Satellite modem transmit power (dBm).",
        |s, _, e| {
            if let Some(m) = modem(s) {
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
        "UPS battery charge (0-1).",
        |s, _, e| {
            if let Some(u) = ups(s) {
                e(&[], f64::from(u.charge_pct) / 100.0)
            }
        },
    ),
    gauge(
        G::Ups,
        "tiandi_site_ups_runtime_seconds",
        "UPS runtime left on battery, as the UPS estimates it.",
        |s, _, e| {
            if let Some(u) = ups(s) {
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
];

fn render_sites(out: &mut String, sites: &Sites, groups: &[SiteSeries], now_ms: i64) {
    sites.with_all(|all| {
        let mut list: Vec<_> = all.collect();
        list.sort_by(|a, b| a.site_id.cmp(&b.site_id));
        for f in SITE_FAMILIES.iter().filter(|f| groups.contains(&f.group)) {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {}",
                f.name, f.help, f.name, f.kind
            );
            for s in &list {
                let (site, province) = (esc(&s.site_id), esc(&s.province));
                (f.series)(s, now_ms, &mut |extra, v| {
                    let _ = write!(out, "{}{{site=\"{site}\",province=\"{province}\"", f.name);
                    for (k, val) in extra {
                        let _ = write!(out, ",{k}=\"{}\"", esc(val));
                    }
                    let _ = writeln!(out, "}} {v}");
                });
            }
        }
    });
}

/// The transfer queue at this moment (`tiandi_transfers{state}`; per destination still to
/// go: bytes left and the recent rate, from which a dashboard gets the ETA).
pub fn render_transfers(out: &mut String, jobs: &[tiandi_transfer::outbox::JobStatus]) {
    use std::collections::BTreeMap;
    let mut by_state: BTreeMap<&str, u64> = ["queued", "sending", "paused", "delivered", "failed"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    let mut left: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for j in jobs {
        *by_state.entry(j.state.as_str()).or_default() += 1;
        if matches!(
            j.state,
            JobState::Queued | JobState::Sending | JobState::Paused
        ) {
            let e = left.entry(j.dest.as_str()).or_default();
            e.0 += j.bytes.saturating_sub(j.acked_bytes);
            e.1 += j.rate_bps / 8;
        }
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfers Transfers the controller holds, by state.\n\
         # TYPE tiandi_transfers gauge"
    );
    for (state, n) in &by_state {
        let _ = writeln!(out, "tiandi_transfers{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfer_remaining_bytes Bytes still to be acknowledged by each \
         destination with transfers under way.\n# TYPE tiandi_transfer_remaining_bytes gauge"
    );
    for (dest, (bytes, _)) in &left {
        let _ = writeln!(
            out,
            "tiandi_transfer_remaining_bytes{{dest=\"{}\"}} {bytes}",
            esc(dest)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfer_rate_bytes_per_second Recent rate of acknowledged bytes to each \
         destination with transfers under way.\n\
         # TYPE tiandi_transfer_rate_bytes_per_second gauge"
    );
    for (dest, (_, rate)) in &left {
        let _ = writeln!(
            out,
            "tiandi_transfer_rate_bytes_per_second{{dest=\"{}\"}} {rate}",
            esc(dest)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiandi_proto::{
        Device, DeviceStatus, Filesystem, Host, Interface, LinkStats, Modem, Report,
    };

    fn sites() -> Sites {
        let sites = Sites::new(crate::config::Thresholds::default());
        let report = Report {
            seq: 1,
            host: Some(Host {
                cpu_permille: 250,
                mem_used_mib: 512,
                mem_total_mib: 1024,
                filesystems: vec![Filesystem {
                    mount: "/var/\"lib\"".into(),
                    used_mib: 900,
                    total_mib: 1000,
                    ..Default::default()
                }],
                interfaces: vec![Interface {
                    name: "eth0".into(),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            link: Some(LinkStats {
                rtt_ms: 612,
                lost_packets: 3,
                sent_packets: 300,
                ..Default::default()
            }),
            devices: vec![Device {
                name: "modem".into(),
                profile: tiandi_proto::Profile::VsatModem as i32,
                status: DeviceStatus::Ok as i32,
                modem: Some(Modem {
                    esno_db_x10: 85,
                    modcod: "8PSK 2/3".into(),
                    rx_rate_kbps: 4000,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        sites.insert("xz-001", "XZ", Some(report), 1_000);
        sites.set_agent_version("xz-001", "0.1.0");
        sites.insert("xz-002", "XZ", None, 1_000);
        sites.set_agent_version("xz-002", "0.1.0\"} 1\nevil 2");
        sites
    }

    fn render(groups: &[SiteSeries]) -> String {
        Metrics::new().render(&sites(), groups, WireTotals::default(), 0, 2_000)
    }

    #[test]
    fn every_group_renders_its_families_with_site_and_province() {
        let text = render(&SiteSeries::ALL);
        for line in [
            r#"tiandi_site_up{site="xz-001",province="XZ"} 1"#,
            r#"tiandi_site_status{site="xz-001",province="XZ",status="up"} 1"#,
            r#"tiandi_site_info{site="xz-001",province="XZ",agent_version="0.1.0"} 1"#,
            r#"tiandi_site_link_rtt_seconds{site="xz-001",province="XZ"} 0.612"#,
            r#"tiandi_site_link_packets_lost_total{site="xz-001",province="XZ"} 3"#,
            r#"tiandi_site_filesystem_used_ratio{site="xz-001",province="XZ",mount="/var/\"lib\""} 0.9"#,
            r#"tiandi_site_modem_info{site="xz-001",province="XZ",modcod="8PSK 2/3"} 1"#,
            r#"tiandi_site_modem_receive_rate_bytes_per_second{site="xz-001",province="XZ"} 500000"#,
            r#"tiandi_site_device_up{site="xz-001",province="XZ",device="modem",profile="vsat-modem"} 1"#,
            r#"tiandi_site_alarms_raised_total{site="xz-001",province="XZ",alarm="rain-fade"} 0"#,
            r#"tiandi_site_alarms_raised_total{site="xz-002",province="XZ",alarm="site-down"} 0"#,
            r#"tiandi_site_network_receive_bytes_total{site="xz-001",province="XZ",interface="eth0"} 10"#,
            "# TYPE tiandi_site_link_packets_sent_total counter",
            "# TYPE tiandi_build_info gauge",
            "# TYPE process_resident_memory_bytes gauge",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
        // A version that is not a plain version never reaches a label as given.
        assert!(text.contains(r#"site="xz-002",province="XZ",agent_version="invalid"} 1"#));
        assert!(!text.contains("evil"));
        // A site without a report has only what does not need one.
        assert!(!text.contains(r#"tiandi_site_cpu_ratio{site="xz-002""#));
    }

    #[test]
    fn groups_turned_off_leave_their_families_out() {
        let text = render(&[SiteSeries::Status, SiteSeries::Alarms]);
        assert!(text.contains("tiandi_site_up{"));
        for family in [
            "tiandi_site_cpu_ratio",
            "tiandi_site_link_rtt_seconds",
            "tiandi_site_modem_esno_db",
            "tiandi_site_device_up",
            "tiandi_site_network_receive_bytes_total",
        ] {
            assert!(!text.contains(family), "{family} is out");
        }
    }

    #[test]
    fn the_transfer_queue_counts_every_state_and_what_is_left_per_destination() {
        let job = |dest: &str, state: JobState, bytes: u64, acked: u64, rate: u64| {
            serde_json::from_value::<tiandi_transfer::outbox::JobStatus>(serde_json::json!({
                "id": "t", "dest": dest, "file": "f", "bytes": bytes, "priority": "normal",
                "state": state.as_str(), "acked_bytes": acked, "progress_pct": 0.0,
                "rate_bps": rate, "eta_s": null, "sent_bytes": 0, "attempts": 0,
                "window": null, "rate_limit_bps": null, "error": null, "receipt": null,
                "via": null, "relays_to": [], "forwarded": false, "created_ms": 0,
                "updated_ms": 0
            }))
            .unwrap()
        };
        let mut out = String::new();
        render_transfers(
            &mut out,
            &[
                job("gd-001", JobState::Sending, 1000, 400, 8000),
                job("gd-001", JobState::Queued, 500, 0, 0),
                job("gd-002", JobState::Delivered, 500, 500, 0),
            ],
        );
        assert!(out.contains("tiandi_transfers{state=\"sending\"} 1"));
        assert!(out.contains("tiandi_transfers{state=\"failed\"} 0"));
        assert!(out.contains("tiandi_transfer_remaining_bytes{dest=\"gd-001\"} 1100"));
        assert!(out.contains("tiandi_transfer_rate_bytes_per_second{dest=\"gd-001\"} 1000"));
        assert!(!out.contains("dest=\"gd-002\""));
    }
}
