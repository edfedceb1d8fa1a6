//! The controller's Prometheus metrics. Its own figures use the `prometheus` crate; the
//! per-site gauges (thousands of sites, labels `site` and `province`) are rendered straight from
//! the live site table at scrape time, in the text exposition format, so no per-site metric
//! objects live in memory between scrapes (`sites`); the transfer queue likewise (`transfers`).

use std::fmt::Write;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::sites::Sites;

mod sites;
#[cfg(test)]
mod tests;
mod transfers;

pub use sites::SiteSeries;
use sites::render_sites;
pub use sites::render_sites_chunked;
pub use transfers::render_transfers;

pub const REPORTS: &str = "tiandi_reports_total";
pub const DUPLICATES: &str = "tiandi_reports_duplicate_total";

/// `tiandi_enrollments_total{result}` values.
pub const ENROLL_RESULTS: [&str; 2] = ["issued", "refused"];
/// `tiandi_device_events_total{severity}` values (each from 0).
pub const SEVERITIES: [&str; 5] = ["info", "warning", "minor", "major", "critical"];

/// A device event's severity as a label: one of [`SEVERITIES`], else `unknown`.
pub fn severity_label(s: &str) -> &'static str {
    SEVERITIES
        .iter()
        .find(|x| **x == s)
        .copied()
        .unwrap_or("unknown")
}

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
    /// Dual-homed sites' switches of a class to another path, by class.
    pub path_switches: IntCounterVec,
    /// Traps and informs of the sites' devices, by severity (a summarised flood counts whole).
    pub device_events: IntCounterVec,
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
        let path_switches = IntCounterVec::new(
            Opts::new(
                "tiandi_path_switches_total",
                "Dual-homed sites' switches of a traffic class to another path (failover, \
                 switch-back, a window), by class.",
            ),
            &["class"],
        )
        .expect("metric");
        for c in tiandi_link::paths::Class::ALL {
            path_switches.with_label_values(&[c.as_str()]);
        }
        let device_events = IntCounterVec::new(
            Opts::new(
                "tiandi_device_events_total",
                "Traps and informs the sites' devices sent (link-down, on-battery, …), by \
                 severity; a flood the agent summarised counts whole.",
            ),
            &["severity"],
        )
        .expect("metric");
        for s in SEVERITIES {
            device_events.with_label_values(&[s]);
        }
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
            Box::new(path_switches.clone()),
            Box::new(device_events.clone()),
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
            path_switches,
            device_events,
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
        let mut out = self.render_own(wire, commits);
        render_sites(&mut out, sites, groups, now_ms);
        out
    }

    /// The controller's own metrics and QUIC wire totals, without the per-site families
    /// (`/metrics` streams those after it: [`render_sites_chunked`]).
    pub fn render_own(&self, wire: WireTotals, commits: u64) -> String {
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
pub(super) fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
