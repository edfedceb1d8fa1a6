//! The controller's Prometheus metrics. Its own figures use the `prometheus` crate; the
//! per-site gauges (thousands of sites, labels `site` and `province`) are rendered straight from
//! the live site table at scrape time, in the text exposition format, so no per-site metric
//! objects live in memory between scrapes.

use std::fmt::Write;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::sites::Sites;

pub const REPORTS: &str = "tiandi_reports_total";
pub const DUPLICATES: &str = "tiandi_reports_duplicate_total";

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
    pub backup: [prometheus::GaugeVec; 7],
}

impl Metrics {
    /// Sets the backup gauges from the jobs' statuses (jobs no longer configured vanish).
    pub fn set_backups(&self, jobs: &[crate::backups::BackupStatus]) {
        for g in &self.backup {
            g.reset();
        }
        let [success, age, overdue, ok, repo, partner, quota] = &self.backup;
        for j in jobs {
            let l = [j.job.as_str(), j.site.as_str()];
            if let Some(t) = j.last_success_ms {
                success.with_label_values(&l).set(t as f64 / 1000.0);
            }
            if let Some(a) = j.age_s {
                age.with_label_values(&l).set(a as f64);
            }
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
        let g = |name: &str, help: &str, labels: &[&str]| {
            prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("metric")
        };
        let backup = [
            g(
                "tiandi_backup_last_success_timestamp_seconds",
                "Start of the job's newest successful backup.",
                &["job", "site"],
            ),
            g(
                "tiandi_backup_age_seconds",
                "Age of the job's newest good backup at its partner (the recovery point).",
                &["job", "site"],
            ),
            g(
                "tiandi_backup_overdue",
                "1 when the job's newest good backup at its partner is older than its RPO.",
                &["job", "site"],
            ),
            g(
                "tiandi_backup_last_run_ok",
                "1 when the job's last run of the kind succeeded, 0 when it failed.",
                &["job", "site", "kind"],
            ),
            g(
                "tiandi_backup_repository_bytes",
                "Size of the job's repository at the site, after its last successful backup.",
                &["job", "site"],
            ),
            g(
                "tiandi_backup_partner_bytes",
                "Size of the job's repository copy kept by this controller as its partner.",
                &["job", "site"],
            ),
            g(
                "tiandi_backup_quota_used_ratio",
                "Share of the job's quota its repository takes (jobs with a quota_gb).",
                &["job", "site"],
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
        ) {
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
    pub fn render(&self, sites: &Sites, wire: WireTotals, commits: u64, now_ms: i64) -> String {
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
        render_sites(&mut out, sites, now_ms);
        out
    }
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

type Gauge = (
    &'static str,
    &'static str,
    fn(&crate::sites::SiteState, i64) -> Option<f64>,
);

const SITE_GAUGES: &[Gauge] = &[
    ("tiandi_site_up", "1 unless the site is down.", |s, _| {
        Some(if s.status == crate::sites::Status::Down {
            0.0
        } else {
            1.0
        })
    }),
    (
        "tiandi_site_status_code",
        "Site status: 0 up, 1 degraded, 2 disk-full, 3 rain-fade, 4 on-battery, 5 down.",
        |s, _| Some(s.status.code() as f64),
    ),
    (
        "tiandi_site_connected",
        "1 while the agent's QUIC connection is open.",
        |s, _| Some(if s.connected { 1.0 } else { 0.0 }),
    ),
    (
        "tiandi_site_last_report_age_seconds",
        "Seconds since the controller last received a report from the site.",
        |s, now| s.last_seen_ms.map(|t| (now - t).max(0) as f64 / 1000.0),
    ),
    ("tiandi_site_cpu_ratio", "Host CPU use (0-1).", |s, _| {
        s.latest
            .as_ref()?
            .host
            .as_ref()
            .map(|h| f64::from(h.cpu_permille) / 1000.0)
    }),
    (
        "tiandi_site_memory_used_ratio",
        "Host memory use (0-1).",
        |s, _| {
            let h = s.latest.as_ref()?.host.as_ref()?;
            (h.mem_total_mib > 0).then(|| h.mem_used_mib as f64 / h.mem_total_mib as f64)
        },
    ),
    (
        "tiandi_site_disk_used_ratio_max",
        "Fullest filesystem's use (0-1).",
        |s, _| {
            let h = s.latest.as_ref()?.host.as_ref()?;
            h.filesystems
                .iter()
                .map(|f| f64::from(f.used_permille()) / 1000.0)
                .reduce(f64::max)
        },
    ),
    (
        "tiandi_site_link_rtt_seconds",
        "QUIC round-trip time to the controller.",
        |s, _| {
            s.latest
                .as_ref()?
                .link
                .as_ref()
                .map(|l| f64::from(l.rtt_ms) / 1000.0)
        },
    ),
    (
        "tiandi_site_modem_esno_db",
        "Satellite modem Es/No (dB).",
        |s, _| modem(s).map(|m| f64::from(m.esno_db_x10) / 10.0),
    ),
    (
        "tiandi_site_ups_on_battery",
        "1 while the UPS runs on battery.",
        |s, _| ups(s).map(|u| if u.on_battery { 1.0 } else { 0.0 }),
    ),
    (
        "tiandi_site_ups_charge_ratio",
        "UPS battery charge (0-1).",
        |s, _| ups(s).map(|u| f64::from(u.charge_pct) / 100.0),
    ),
];

fn render_sites(out: &mut String, sites: &Sites, now_ms: i64) {
    sites.with_all(|all| {
        let mut list: Vec<_> = all.collect();
        list.sort_by(|a, b| a.site_id.cmp(&b.site_id));
        for (name, help, f) in SITE_GAUGES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for s in &list {
                if let Some(v) = f(s, now_ms) {
                    let _ = writeln!(
                        out,
                        "{name}{{site=\"{}\",province=\"{}\"}} {v}",
                        esc(&s.site_id),
                        esc(&s.province)
                    );
                }
            }
        }
        let name = "tiandi_site_alarm";
        let _ = writeln!(
            out,
            "# HELP {name} 1 for each active alarm of a site.\n# TYPE {name} gauge"
        );
        for s in &list {
            for c in &s.active {
                let _ = writeln!(
                    out,
                    "{name}{{site=\"{}\",province=\"{}\",alarm=\"{}\"}} 1",
                    esc(&s.site_id),
                    esc(&s.province),
                    c.name()
                );
            }
        }
    });
}
