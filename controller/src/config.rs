//! Controller configuration: TOML file + flags (flag > file > default). See
//! `config/controller.example.toml` for every key with comments.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tiandi_link::LinkProfile;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the CA, the registry and the history live.
    pub data_dir: PathBuf,
    /// QUIC listener for agents (UDP).
    pub quic_listen: SocketAddr,
    /// JSON API. Plain HTTP on a loopback address; HTTPS on any other (see `api_tls_cert`).
    /// Every route needs a bearer token: `data_dir/read.token` to read, `admin.token` for
    /// `/api/admin/*`.
    pub api_listen: SocketAddr,
    /// Prometheus `/metrics` and `/health`, separate from the API. Off loopback: HTTPS, and
    /// `/metrics` needs `Authorization: Bearer <data_dir/metrics.token>`.
    pub ops_listen: SocketAddr,
    /// Certificate chain (PEM) the API and ops listeners present off loopback. Unset: one the
    /// controller's CA issues for the name `tiandi-controller` (clients trust `data_dir/ca.pem`
    /// and connect by that name).
    pub api_tls_cert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    pub api_tls_key: Option<PathBuf>,
    /// More names (DNS names or IP addresses) for the certificate the controller's CA makes
    /// for its listeners when `api_tls_cert` is unset: the names dashboards and Prometheus
    /// use to reach it.
    pub api_names: Vec<String>,
    /// Directories `send` may take files from (the controller reads nothing else for a
    /// transfer, and never its own data directory). Empty: `data_dir/outgoing`.
    pub outgoing_dirs: Vec<PathBuf>,
    /// Log filter (`RUST_LOG` overrides).
    pub log: String,
    /// Transport profile of agent connections (`geo`, `leo`, `terrestrial`).
    pub profile: LinkProfile,
    /// Days of history kept per site.
    pub history_days: u32,
    /// How long an enrolled site's certificate stays valid.
    pub cert_days: u32,
    /// How long an enrollment token can be redeemed.
    pub token_hours: u32,
    /// Threads of the async runtime (QUIC, sessions, API); 0 means one per core. One thread
    /// carries 20,000 sites: a second one mostly adds cross-thread wake-ups, which cost more
    /// than they save at this load, and only helps during handshake bursts.
    pub worker_threads: usize,
    pub admission: Admission,
    pub thresholds: Thresholds,
    /// Committed rates of site links toward the site (Mbit/s), by site ID. Traffic to such a
    /// site is paced at that rate and does not back off on random loss (a reserved VSAT
    /// carrier); sites not listed get loss-based congestion control.
    pub link_rates: std::collections::BTreeMap<String, f64>,
    /// Relay sites by province: transfers for the province's other sites go to the relay once
    /// and it forwards them (the sites name it in their `[via_relay]`).
    pub relays: std::collections::BTreeMap<String, String>,
    pub conference: Conference,
    pub console: Console,
    /// The controller's own backup repositories, shipped to partner sites in the `backup`
    /// transfer class (`[[backup_repos]]`: `name`, `path`, `to` = a site ID).
    pub backup_repos: Vec<tiandi_backup::partner::ShipConfig>,
    /// Days files that sites' repositories here (`data_dir/backups/<site>/`) pruned stay in
    /// the trash before they are removed: a site taken over cannot erase its backups here.
    pub backup_trash_days: u32,
    /// Backup jobs (`[[backup_jobs]]`): who backs up what, when, kept how long, to whom.
    /// Pushed to each site; `site = "controller"` jobs run here. See the example config.
    pub backup_jobs: Vec<tiandi_backup::job::JobSpec>,
    /// Disaster recovery of the controller itself (`[replica]`).
    pub replica: Replica,
    /// What `/metrics` exposes (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Which of a dual-homed site's paths each class of traffic uses (`[path_policy]`),
    /// pushed to every site in its Welcome; absent: each site's own configuration decides
    /// (by default reports, alarms, conferences and normal transfers take the first path
    /// that is up, bulk transfers and backups stay off satellite paths outside their window).
    pub path_policy: Option<tiandi_link::paths::Policy>,
    /// Tier two, a province's side (`[upstream]`): forward this controller's site summaries
    /// and alarm events to the ministry's controller. Absent: this controller is the top.
    pub upstream: Option<Upstream>,
    /// Tier two, the ministry's side (`[national]`): which sites are province controllers.
    pub national: National,
}

/// A province controller's link to the ministry's ([`crate::federation`]). It is a site of
/// the ministry's controller: enroll it once with `tiandi-agent enroll --controller MINISTRY
/// --token TOKEN --data-dir IDENTITY_DIR` (a token the ministry made for a site named after
/// the province, e.g. `province-sc`), then name that directory here.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The ministry controller's QUIC address (`host:port`).
    pub controller: String,
    /// Its standby's addresses, tried in turn when it fails.
    #[serde(default)]
    pub standby: Vec<String>,
    /// The enrolled identity (and the spool of what waits for the ministry, `spool/`).
    pub identity_dir: PathBuf,
    /// Seconds between forwarded reports (each carries what changed since the last).
    #[serde(default = "Upstream::default_interval_s")]
    pub interval_s: f64,
    /// Disk the spool may use while the ministry is out of reach (MB).
    #[serde(default = "Upstream::default_spool_quota_mb")]
    pub spool_quota_mb: u64,
}

impl Upstream {
    fn default_interval_s() -> f64 {
        10.0
    }
    fn default_spool_quota_mb() -> u64 {
        1024
    }
}

/// The ministry's controller: which of its sites are province controllers whose reports
/// carry their sites' summaries and alarms ([`crate::federation`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct National {
    /// Site IDs (as enrolled here) of the province controllers. A summary from any other
    /// site is refused (logged and counted, the rest of its report kept).
    pub provinces: Vec<String>,
    /// Most sites one province may list (beyond it new ones are refused, loudly).
    pub max_sites_per_province: usize,
    /// Alarm events kept in the national alarm log (oldest dropped first).
    pub alarm_log_entries: usize,
}

impl Default for National {
    fn default() -> Self {
        National {
            provinces: Vec::new(),
            max_sites_per_province: 50_000,
            alarm_log_entries: 100_000,
        }
    }
}

/// The Prometheus exposition on `ops_listen`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Groups of per-site series exposed: `status`, `host`, `link`, `modem`, `ups`,
    /// `devices`, `interfaces`, `alarms`, `paths` (all by default). Each is one or more series
    /// per site (`dashboards/METRICS.md` counts them); a large fleet may leave out
    /// `interfaces`.
    pub site_series: Vec<crate::metrics::SiteSeries>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            site_series: crate::metrics::SiteSeries::ALL.to_vec(),
        }
    }
}

/// A standby (`tiandi-controller standby --primary ADDR`) follows this controller over its
/// QUIC listener with nothing to configure here; these keys are for a controller that may
/// have been replaced while it was away.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replica {
    /// Other controllers (`host:port` of their QUIC listeners: the standby that may have been
    /// promoted). Before serving, this controller asks each its fencing epoch and refuses to
    /// start if one is above its own (it was replaced: start it as a standby instead).
    pub peers: Vec<String>,
    /// Minutes between exports of the controller's state (what a standby copies) to
    /// `export_dir/controller-state.tdstate` (0600; it holds the CA key): a backup job of the
    /// controller's takes it from there. 0: never.
    pub export_every_minutes: u32,
    /// Where the export is written; empty: `data_dir/state-export`.
    pub export_dir: Option<PathBuf>,
}

/// The web console (served on `api_listen`) and its accounts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Console {
    /// Minutes a console session may stay unused before it ends.
    pub session_idle_minutes: u32,
    /// Hours a console session lasts at most (a shift), however busy.
    pub session_hours: u32,
    /// Days the kiosk account's session (the NOC's wall screen) lasts at most.
    pub kiosk_session_days: u32,
    /// The first administrator's password, read from this file (mode 0600) at the first start
    /// instead of a one-time password printed on standard output.
    pub admin_password_file: Option<PathBuf>,
    /// Days the audit log is kept (0: for ever).
    pub audit_days: u32,
}

impl Default for Console {
    fn default() -> Self {
        Console {
            session_idle_minutes: 30,
            session_hours: 12,
            kiosk_session_days: 30,
            admin_password_file: None,
            audit_days: 1095,
        }
    }
}

/// The conference relay inside the controller.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conference {
    pub enabled: bool,
    /// UDP address of the relay; unset: the QUIC listener's address on a port the system
    /// picks (`tiandi-controller conference list` shows it).
    pub listen: Option<SocketAddr>,
    /// The relay's name: sites connect to it by this name (its certificate's).
    pub name: String,
    /// The site that chairs conferences unless `create` names another.
    pub chair: String,
    /// Container of recordings made on the relay (`conference record`): `ts` (MPEG-TS) only.
    pub recording_format: RecordingFormat,
}

/// Recording containers. The relay records MPEG-TS itself (no FFmpeg in the controller);
/// Matroska or MP4 are made from a recording with `tiandi-video remux FILE.ts FILE.mkv` (the
/// media crate), so `mkv` and `mp4` are refused here with that hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RecordingFormat {
    #[default]
    Ts,
}

impl<'de> Deserialize<'de> for RecordingFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "ts" => Ok(RecordingFormat::Ts),
            other => Err(serde::de::Error::custom(format!(
                "{other:?}: the relay records MPEG-TS only (\"ts\"); make Matroska or MP4 of a \
                 recording with `tiandi-video remux FILE.ts FILE.mkv`"
            ))),
        }
    }
}

impl RecordingFormat {
    pub fn extension(self) -> &'static str {
        match self {
            RecordingFormat::Ts => "ts",
        }
    }
}

impl Default for Conference {
    fn default() -> Self {
        Conference {
            enabled: true,
            listen: None,
            name: "ministry-relay".into(),
            chair: "ministry".into(),
            recording_format: RecordingFormat::default(),
        }
    }
}

impl Config {
    /// Where `send` may take files from.
    pub fn outgoing_dirs(&self) -> Vec<PathBuf> {
        if self.outgoing_dirs.is_empty() {
            vec![self.data_dir.join("outgoing")]
        } else {
            self.outgoing_dirs.clone()
        }
    }

    /// The committed rate toward `site` in bits per second of UDP payload, if configured.
    pub fn link_rate_bps(&self, site: &str) -> Option<u64> {
        self.link_rates
            .get(site)
            .filter(|r| r.is_finite() && **r > 0.0)
            .map(|mbit| tiandi_link::congestion::udp_payload_bps(mbit * 1e6))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// New connections admitted per second (a token bucket). After a restart, thousands of
    /// agents come back at once: those over the rate wait; beyond `max_pending` they are
    /// refused and retry later with jittered backoff.
    pub handshakes_per_s: u32,
    /// Burst of the token bucket.
    pub burst: u32,
    /// Connections waiting for admission before new ones are refused (refused agents retry
    /// with jittered backoff). About two seconds' worth at `handshakes_per_s`: longer waits
    /// only make agents give up on handshakes the controller then completes for nothing.
    pub max_pending: usize,
    /// Handshakes in progress at once.
    pub concurrent_handshakes: usize,
    /// Longest wait for admission (ms); a connection that would wait longer is refused at
    /// once (its agent backs off) rather than handshaking after the agent gave up.
    pub max_wait_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// A site is `down` after this many report intervals without a report.
    pub down_after_intervals: u32,
    /// Modem Es/No (dB) below which a site with a healthy host is in `rain-fade`.
    pub rain_fade_esno_db: f64,
    /// Any filesystem used at or above this percentage is `disk-full`.
    pub disk_full_pct: f64,
    /// CPU at or above this percentage makes a site `degraded`.
    pub cpu_degraded_pct: f64,
    /// Memory at or above this percentage makes a site `degraded`.
    pub mem_degraded_pct: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tiandi-data/controller"),
            quic_listen: "0.0.0.0:4433".parse().expect("literal"),
            api_listen: "127.0.0.1:8440".parse().expect("literal"),
            ops_listen: "127.0.0.1:9440".parse().expect("literal"),
            api_tls_cert: None,
            api_tls_key: None,
            api_names: Vec::new(),
            outgoing_dirs: Vec::new(),
            log: "info".into(),
            profile: LinkProfile::Geo,
            history_days: 30,
            cert_days: 365,
            token_hours: 72,
            worker_threads: 1,
            admission: Admission::default(),
            thresholds: Thresholds::default(),
            link_rates: Default::default(),
            relays: Default::default(),
            conference: Conference::default(),
            console: Console::default(),
            backup_repos: Vec::new(),
            backup_trash_days: 7,
            backup_jobs: Vec::new(),
            replica: Replica::default(),
            metrics: MetricsConfig::default(),
            path_policy: None,
            upstream: None,
            national: National::default(),
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            handshakes_per_s: 1000,
            burst: 200,
            max_pending: 2000,
            concurrent_handshakes: 64,
            max_wait_ms: 2000,
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            down_after_intervals: 3,
            rain_fade_esno_db: 5.0,
            disk_full_pct: 95.0,
            cpu_degraded_pct: 95.0,
            mem_degraded_pct: 95.0,
        }
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, tiandi_link::config::ConfigError> {
        tiandi_link::config::load_toml(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let text = include_str!("../../config/controller.example.toml");
        let c: Config = tiandi_link::config::parse_toml("controller.example.toml", text).unwrap();
        let d = Config::default();
        assert_eq!(c.quic_listen, d.quic_listen);
        assert_eq!(c.admission.handshakes_per_s, d.admission.handshakes_per_s);
        assert_eq!(
            c.thresholds.rain_fade_esno_db,
            d.thresholds.rain_fade_esno_db
        );
        assert!(c.link_rates.is_empty());
        let r: Config =
            tiandi_link::config::parse_toml("c.toml", "[link_rates]\n\"gd-001\" = 2.0\n").unwrap();
        assert_eq!(r.link_rate_bps("gd-001"), Some(1_943_775));
        assert_eq!(r.link_rate_bps("nowhere"), None);
    }

    #[test]
    fn the_commented_path_policy_of_the_example_parses_when_uncommented() {
        let text = include_str!("../../config/controller.example.toml");
        let c: Config = tiandi_link::config::parse_toml("controller.example.toml", text).unwrap();
        assert_eq!(
            c.path_policy, None,
            "commented out: each site's own decides"
        );
        let (_, section) = text.split_once("#[path_policy]").expect("the section");
        let uncommented: String = std::iter::once("[path_policy]")
            // `#key = …` is an example; `# text` is prose.
            .chain(
                section
                    .lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .filter(|l| !l.is_empty() && !l.starts_with(' ')),
            )
            .collect::<Vec<_>>()
            .join("\n");
        let c: Config = tiandi_link::config::parse_toml("c.toml", &uncommented).unwrap();
        let p = c.path_policy.expect("a policy");
        p.validate().unwrap();
        assert!(p.critical_on_all);
        assert_eq!(
            p.classes[&tiandi_link::paths::Class::Bulk],
            ["ground", "sky@window"]
        );
        assert_eq!(p.classes.len(), 3);
    }

    #[test]
    fn the_commented_upstream_of_the_example_parses_when_uncommented() {
        let text = include_str!("../../config/controller.example.toml");
        let (_, section) = text.split_once("#[upstream]").expect("the section");
        let keys: Vec<&str> = section
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.starts_with(' '))
            .collect();
        let c: Config =
            tiandi_link::config::parse_toml("c.toml", &format!("[upstream]\n{}", keys.join("\n")))
                .unwrap();
        let u = c.upstream.expect("an upstream");
        assert_eq!(u.controller, "ministry.example:4433");
        assert_eq!((u.interval_s, u.spool_quota_mb), (10.0, 1024));
        let d = Config::default();
        assert_eq!(
            d.national.max_sites_per_province,
            tiandi_link::config::parse_toml::<Config>("controller.example.toml", text)
                .unwrap()
                .national
                .max_sites_per_province
        );
    }

    #[test]
    fn broken_config_names_the_key() {
        let e = tiandi_link::config::parse_toml::<Config>(
            "/etc/tiandi/controller.toml",
            "[thresholds]\ndisk_full_pct = \"lots\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/tiandi/controller.toml") && e.contains("thresholds.disk_full_pct"),
            "{e}"
        );
    }
}
