//! Agent configuration: TOML file + flags (flag > file > default). See
//! `config/agent.example.toml` for every key with comments.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tiandi_link::LinkProfile;

pub use crate::device::{DeviceConfig, OidOverride, ScaledOid, SnmpVersion, V3Config};
use crate::profile::Profiles;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The controller's QUIC address, `host:port`.
    pub controller: String,
    /// The controller's other addresses (its standby at the DR centre): tried in turn when
    /// `controller` fails three times in a row, or at once when it stands down. The site
    /// reports to whichever answers at the highest fencing epoch it has seen; no re-enrollment
    /// (a standby holds the same CA and registry).
    pub standby_controllers: Vec<String>,
    /// Key, certificate, CA and spool live here.
    pub data_dir: PathBuf,
    /// Seconds between reports.
    pub interval_s: f64,
    /// QUIC transport profile of the uplink (`geo`, `leo`, `terrestrial`).
    pub profile: LinkProfile,
    /// Committed rate of this site's link toward the controller (Mbit/s, Ethernet frames).
    /// Set: what the site sends (files, reports) is paced at it and does not back off on
    /// random loss (a reserved VSAT carrier). Unset: loss-based congestion control (Cubic).
    pub link_rate_mbit: Option<f64>,
    /// Disk quota of the spool (MB). At 10 s intervals it holds 30 days, downsampling the oldest.
    pub spool_quota_mb: u64,
    /// Log filter (`RUST_LOG` overrides).
    pub log: String,
    /// Filesystems to leave out of reports (mount points, exact match).
    pub ignore_mounts: Vec<String>,
    /// Interfaces to leave out of reports (exact names).
    pub ignore_interfaces: Vec<String>,
    /// SNMP devices at the site.
    pub devices: Vec<DeviceConfig>,
    /// A directory of device profiles (`*.toml`, the form of the built-in ones) beside the
    /// built-in and vendor profiles: a device the agent was not shipped with, without a new
    /// release. Unset: the built-ins only.
    pub profiles_dir: Option<PathBuf>,
    /// Listen for the devices' SNMP traps and informs (`[traps]`: `listen`, `per_minute`,
    /// `engine_id`). Unset: no listener; devices are only polled.
    pub traps: Option<crate::traps::TrapsConfig>,
    /// Reachability checks (`[reachability]`: `next_hop`, `timeout_ms`, `attempts`,
    /// `[[reachability.targets]]`): each device's echo (`ping`) and TCP ports, the default
    /// gateway, and more hosts, every round beside the SNMP poll.
    pub reachability: crate::reach::ReachConfig,
    /// This site relays transfers to the sites of its province (`[relay]`).
    pub relay: Option<RelayConfig>,
    /// Files for this site come through its province's relay (`[via_relay]`).
    pub via_relay: Option<crate::transfers::ViaRelay>,
    /// Local backup repositories this agent ships to its partner (`[[backup_repos]]`: `name`,
    /// `path`, `to` = `controller`), in the `backup` transfer class.
    pub backup_repos: Vec<tiandi_backup::partner::ShipConfig>,
    /// Days files of a partner's repository kept here (`data_dir/backups/controller/`) stay
    /// in its trash after the partner pruned them, before they are removed.
    pub backup_trash_days: u32,
    /// Modem Es/No (dB) below which the site is in a rain fade: backup transfers wait (they
    /// pause, and resume from where they were) until it is over. The controller's
    /// `thresholds.rain_fade_esno_db` says the same for its alarm.
    pub rain_fade_esno_db: f64,
    /// A dual-homed site's paths (`[[paths]]`: `name`, `bind`, `profile`, `controller`,
    /// `budget_kbps`, `probe_ms`, `window`): a connection to the controller over each, reports
    /// over the best one that is up, each transfer class over the path its policy gives it.
    /// Empty: one path, wherever the routing table sends `controller`.
    pub paths: Vec<tiandi_link::paths::PathSpec>,
    /// Which path each class uses (`[path_policy]`); the controller's `[path_policy]`, when it
    /// has one, replaces it.
    pub path_policy: tiandi_link::paths::Policy,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address the sites below connect to.
    pub listen: std::net::SocketAddr,
    /// While the controller cannot be reached, admit (and keep) only sites below that it
    /// confirmed within this many seconds; others are refused (fail closed). Default 1800.
    #[serde(default = "default_confirmed_within_s")]
    pub confirmed_within_s: u64,
}

fn default_confirmed_within_s() -> u64 {
    tiandi_transfer::hop::CONFIRMED_WITHIN.as_secs()
}

impl RelayConfig {
    /// [`RelayConfig::confirmed_within_s`] as a duration.
    pub fn confirmed_within(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.confirmed_within_s)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            controller: "127.0.0.1:4433".into(),
            standby_controllers: Vec::new(),
            data_dir: PathBuf::from("tiandi-data/agent"),
            interval_s: 10.0,
            profile: LinkProfile::Geo,
            link_rate_mbit: None,
            spool_quota_mb: 64,
            log: "info".into(),
            ignore_mounts: Vec::new(),
            ignore_interfaces: vec!["lo".into()],
            devices: Vec::new(),
            profiles_dir: None,
            traps: None,
            reachability: Default::default(),
            relay: None,
            via_relay: None,
            backup_repos: Vec::new(),
            backup_trash_days: 7,
            rain_fade_esno_db: 5.0,
            paths: Vec::new(),
            path_policy: Default::default(),
        }
    }
}

impl Config {
    /// The profiles this agent knows: the built-ins and `profiles_dir`'s.
    pub fn profiles(&self) -> Result<Profiles, String> {
        match &self.profiles_dir {
            None => Ok(Profiles::built_in()),
            Some(d) => Profiles::with_dir(d),
        }
    }

    /// The QUIC transport toward the controller: the profile, paced at the committed rate
    /// (`link_rate_mbit`, else what `rate` is set to — the modem's figure — once known; loss-
    /// based until then).
    pub fn uplink_transport(
        &self,
        rate: tiandi_link::congestion::RateSlot,
    ) -> std::sync::Arc<quinn::TransportConfig> {
        let mut t = self.profile.transport_config();
        // Uploads end faster on a lossy link (vendor/README.md: tail copies).
        t.tail_copies(true);
        self.delay_acks(&mut t);
        match self.link_rate_mbit {
            Some(mbit) => {
                t.congestion_controller_factory(std::sync::Arc::new(
                    tiandi_link::congestion::FixedRateConfig::new(
                        tiandi_link::congestion::udp_payload_bps(mbit * 1e6),
                    ),
                ));
            }
            None => {
                t.congestion_controller_factory(std::sync::Arc::new(
                    tiandi_link::congestion::SiteRateConfig::new(rate, self.profile.nominal().0),
                ));
            }
        }
        std::sync::Arc::new(t)
    }

    /// The QUIC transport over one of a dual-homed site's paths: its profile (else the
    /// site's), a keep-alive every probe interval (the path's health), and at most its budget
    /// (`budget_kbps`; a satellite path without one: `link_rate_mbit` if set).
    pub fn path_transport(
        &self,
        path: &tiandi_link::paths::PathSpec,
    ) -> std::sync::Arc<quinn::TransportConfig> {
        let profile = path.profile.unwrap_or(self.profile);
        let mut t = profile.transport_config();
        t.tail_copies(true);
        self.delay_acks(&mut t);
        t.keep_alive_interval(Some(path.probe()));
        let rate_bps = if path.budget_kbps > 0 {
            Some(tiandi_link::congestion::udp_payload_bps(
                f64::from(path.budget_kbps) * 1e3,
            ))
        } else if path.kind() == tiandi_link::paths::PathKind::Sky {
            self.link_rate_mbit
                .map(|m| tiandi_link::congestion::udp_payload_bps(m * 1e6))
        } else {
            None
        };
        if let Some(bps) = rate_bps {
            let mut c = tiandi_link::congestion::FixedRateConfig::new(bps);
            c.initial_rtt = profile.nominal().0;
            t.congestion_controller_factory(std::sync::Arc::new(c));
        }
        std::sync::Arc::new(t)
    }

    /// Acknowledges the controller's report acknowledgements with the next report
    /// ([`tiandi_link::transport::report_ack_delay`]).
    fn delay_acks(&self, t: &mut quinn::TransportConfig) {
        if let Some(d) = std::time::Duration::try_from_secs_f64(self.interval_s)
            .ok()
            .and_then(tiandi_link::transport::report_ack_delay)
        {
            t.max_ack_delay(d);
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Config, tiandi_link::config::ConfigError> {
        tiandi_link::config::load_toml(path)
    }

    /// Checks what serde cannot: cross-field rules, with the key named.
    pub fn validate(&self, file: &str) -> Result<(), String> {
        if !(0.05..=3600.0).contains(&self.interval_s) {
            return Err(format!(
                "{file}: key `interval_s`: {} is outside 0.05..3600 seconds",
                self.interval_s
            ));
        }
        if let Some(r) = self.link_rate_mbit
            && !(r > 0.0 && r.is_finite())
        {
            return Err(format!(
                "{file}: key `link_rate_mbit`: {r} must be a positive rate"
            ));
        }
        self.profile
            .validate()
            .map_err(|e| format!("{file}: key `profile`: {e}"))?;
        if self.spool_quota_mb < 4 {
            return Err(format!("{file}: key `spool_quota_mb`: at least 4 MB"));
        }
        if let Some(t) = &self.traps {
            t.validate(file)?;
        }
        self.reachability.validate(file)?;
        let profiles = self
            .profiles()
            .map_err(|e| format!("{file}: key `profiles_dir`: {e}"))?;
        for (i, d) in self.devices.iter().enumerate() {
            let key = format!("devices[{i}]");
            d.validate(file, &key, &profiles)?;
            if self.devices[..i].iter().any(|x| x.name == d.name) {
                return Err(format!("{file}: key `{key}.name`: {:?} twice", d.name));
            }
        }
        tiandi_link::paths::validate_paths(&self.paths)
            .map_err(|e| format!("{file}: key `{e}`"))?;
        for (i, p) in self.paths.iter().enumerate() {
            if let Some(c) = &p.controller
                && !c.contains(':')
            {
                return Err(format!(
                    "{file}: key `paths[{i}].controller`: {c:?} is not host:port"
                ));
            }
        }
        self.path_policy
            .validate()
            .map_err(|e| format!("{file}: key `{e}`"))?;
        for (i, r) in self.backup_repos.iter().enumerate() {
            r.validate()
                .map_err(|e| format!("{file}: key `backup_repos[{i}]`: {e}"))?;
            if r.to != "controller" {
                return Err(format!(
                    "{file}: key `backup_repos[{i}].to`: {:?}: an agent ships to `controller`",
                    r.to
                ));
            }
        }
        if let Some(v) = &self.via_relay {
            tiandi_link::pki::validate_name("relay site", &v.site)
                .map_err(|e| format!("{file}: key `via_relay.site`: {e}"))?;
            if !v.address.contains(':') {
                return Err(format!(
                    "{file}: key `via_relay.address`: {:?} is not host:port",
                    v.address
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../config/agent.example.toml");
        let c: Config = tiandi_link::config::parse_toml("agent.example.toml", text).unwrap();
        c.validate("agent.example.toml").unwrap();
        assert_eq!(c.devices.len(), 3);
        assert_eq!(c.interval_s, 10.0);
    }

    #[test]
    fn relay_sections_parse_and_check() {
        let c: Config = tiandi_link::config::parse_toml(
            "a.toml",
            "[relay]\nlisten = \"0.0.0.0:4434\"\n[via_relay]\naddress = \"10.0.0.5:4434\"\nsite = \"gd-relay\"\n",
        )
        .unwrap();
        c.validate("a.toml").unwrap();
        let relay = c.relay.unwrap();
        assert_eq!(relay.listen.port(), 4434);
        assert_eq!(relay.confirmed_within_s, 1800, "the default");
        let c: Config = tiandi_link::config::parse_toml(
            "a.toml",
            "[via_relay]\naddress = \"10.0.0.5\"\nsite = \"gd-relay\"\n",
        )
        .unwrap();
        assert!(
            c.validate("a.toml")
                .unwrap_err()
                .contains("via_relay.address")
        );
        let e =
            tiandi_link::config::parse_toml::<Config>("a.toml", "[relay]\nlisten = \"nowhere\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("relay.listen"), "{e}");
    }

    #[test]
    fn broken_configs_name_file_and_key() {
        let e = tiandi_link::config::parse_toml::<Config>(
            "/etc/tiandi/agent.toml",
            "[[devices]]\nname = \"m\"\nprofile = \"toaster\"\naddress = \"x\"\n",
        )
        .and_then(|c: Config| {
            c.validate("/etc/tiandi/agent.toml").map_err(|m| {
                tiandi_link::config::ConfigError::Syntax {
                    file: String::new(),
                    message: m,
                }
            })
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/tiandi/agent.toml") && e.contains("devices[0].profile"),
            "{e}"
        );
        let c: Config = tiandi_link::config::parse_toml(
            "a.toml",
            "[[devices]]\nname = \"m\"\nprofile = \"vsat-modem\"\naddress = \"x\"\n[devices.oids]\nesno = { oid = \"1.3.x\" }\n",
        )
        .unwrap();
        let e = c.validate("a.toml").unwrap_err();
        assert!(e.contains("devices[0].oids.esno"), "{e}");
    }
}
