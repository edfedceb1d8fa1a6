//! A device's configuration (`[[devices]]` in the agent's TOML): what to poll, with which SNMP
//! version and credentials, and the checks serde cannot make. Shared by the configuration
//! ([`crate::config`]) and the poller ([`crate::snmp`]); it depends on neither.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use snmp2::v3;

use crate::profile::Profiles;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnmpVersion {
    V2c,
    V3,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    /// Its profile (`ups-mib`, `if-mib`, `vsat-modem`, a vendor's, or one of `profiles_dir`).
    pub profile: String,
    /// `host:port` (port 161 if omitted).
    pub address: String,
    #[serde(default = "default_version")]
    pub version: SnmpVersion,
    #[serde(default = "default_community")]
    pub community: String,
    /// SNMPv3 (authPriv) credentials, required when `version = "v3"`.
    #[serde(default)]
    pub v3: Option<V3Config>,
    /// Per-poll timeout in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// OIDs (and scales) for the profile's objects by name, where the profile leaves them to
    /// the device (`vsat-modem`: `esno`, `rx_level`, `tx_power`, `modcod`, `rx_rate`,
    /// `tx_rate`) or where this device has them elsewhere.
    #[serde(default)]
    pub oids: BTreeMap<String, OidOverride>,
    /// The most interface rows read from its ifTable (default 256, at most 4096); a longer
    /// table is cut there and marked `truncated`.
    #[serde(default)]
    pub max_interfaces: Option<usize>,
    /// Traps and informs from this device are taken (from its address, with its community or
    /// its v3 user) when the agent listens for them (`[traps]`). Default yes.
    #[serde(default = "yes")]
    pub traps: bool,
    /// Check the device's reachability each round (`[reachability]`): an ICMP echo to its
    /// address (default yes) …
    #[serde(default = "yes")]
    pub ping: bool,
    /// … and a TCP connect to these ports (its web interface, say).
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
}

fn yes() -> bool {
    true
}

fn default_version() -> SnmpVersion {
    SnmpVersion::V2c
}
fn default_community() -> String {
    "public".into()
}
fn default_timeout() -> u64 {
    2000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V3Config {
    pub user: String,
    /// md5, sha1, sha224, sha256, sha384, sha512
    pub auth_protocol: String,
    pub auth_password: String,
    /// des, aes128 (= aes), aes192, aes256
    pub priv_protocol: String,
    pub priv_password: String,
}

/// An object's OID on this device: `"1.3.6…"`, or `{ oid = "1.3.6…", scale = 0.1 }`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OidOverride {
    Oid(String),
    Scaled(ScaledOid),
}

impl OidOverride {
    pub fn oid(&self) -> &str {
        match self {
            OidOverride::Oid(o) => o,
            OidOverride::Scaled(s) => &s.oid,
        }
    }
    pub fn scale(&self) -> Option<f64> {
        match self {
            OidOverride::Oid(_) => None,
            OidOverride::Scaled(s) => Some(s.scale),
        }
    }
}

/// An OID and the factor that turns the raw value into the profile's unit (dB, dBm).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaledOid {
    pub oid: String,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

impl DeviceConfig {
    /// Checks what serde cannot against the profiles the agent knows, naming the key
    /// (`devices[i]`) in `file`.
    pub fn validate(&self, file: &str, key: &str, profiles: &Profiles) -> Result<(), String> {
        tiandi_link::names::validate_name("device name", &self.name)
            .map_err(|e| format!("{file}: key `{key}.name`: {e}"))?;
        if self.version == SnmpVersion::V3 && self.v3.is_none() {
            return Err(format!(
                "{file}: key `{key}.v3`: version = \"v3\" needs user and passwords"
            ));
        }
        let Some(p) = profiles.get(&self.profile) else {
            return Err(format!(
                "{file}: key `{key}.profile`: no profile {:?} (known: {})",
                self.profile,
                profiles.names().collect::<Vec<_>>().join(", ")
            ));
        };
        for (k, o) in &self.oids {
            if p.object(k).is_none() {
                return Err(format!(
                    "{file}: key `{key}.oids.{k}`: profile {:?} has no object {k:?} (it has: {})",
                    p.name,
                    p.objects
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if parse_oid(o.oid()).is_err() {
                return Err(format!(
                    "{file}: key `{key}.oids.{k}`: {:?} is not a numeric OID",
                    o.oid()
                ));
            }
            if let Some(s) = o.scale()
                && !(s.is_finite() && s != 0.0)
            {
                return Err(format!(
                    "{file}: key `{key}.oids.{k}.scale`: {s} is not a usable factor"
                ));
            }
        }
        for o in &p.objects {
            if o.essential && o.oid.is_none() && !self.oids.contains_key(&o.name) {
                return Err(format!(
                    "{file}: key `{key}.oids.{}`: profile {:?} needs its OID for this device",
                    o.name, p.name
                ));
            }
        }
        if let Some(n) = self.max_interfaces
            && !(1..=crate::profile::MAX_INTERFACES).contains(&n)
        {
            return Err(format!(
                "{file}: key `{key}.max_interfaces`: 1 to {}",
                crate::profile::MAX_INTERFACES
            ));
        }
        if self.tcp_ports.len() > 8 || self.tcp_ports.contains(&0) {
            return Err(format!(
                "{file}: key `{key}.tcp_ports`: at most 8 ports, none 0"
            ));
        }
        if let Some(v3) = &self.v3 {
            security(v3).map_err(|e| format!("{file}: key `{key}.v3`: {e}"))?;
        }
        Ok(())
    }

    /// The device's address with the SNMP port (161 when not given).
    pub fn snmp_addr(&self) -> String {
        if self.address.contains(':') {
            self.address.clone()
        } else {
            format!("{}:161", self.address)
        }
    }

    /// Its host alone (for the reachability checks).
    pub fn host(&self) -> &str {
        match self.address.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.trim_start_matches('[').trim_end_matches(']')
            }
            _ => &self.address,
        }
    }
}

pub use crate::profile::parse_oid;

pub fn security(c: &V3Config) -> Result<v3::Security, String> {
    let auth = match c.auth_protocol.to_ascii_lowercase().as_str() {
        "md5" => v3::AuthProtocol::Md5,
        "sha" | "sha1" => v3::AuthProtocol::Sha1,
        "sha224" => v3::AuthProtocol::Sha224,
        "sha256" => v3::AuthProtocol::Sha256,
        "sha384" => v3::AuthProtocol::Sha384,
        "sha512" => v3::AuthProtocol::Sha512,
        other => return Err(format!("unknown auth_protocol {other:?}")),
    };
    let cipher = match c.priv_protocol.to_ascii_lowercase().as_str() {
        "des" => v3::Cipher::Des,
        "aes" | "aes128" => v3::Cipher::Aes128,
        "aes192" => v3::Cipher::Aes192,
        "aes256" => v3::Cipher::Aes256,
        other => return Err(format!("unknown priv_protocol {other:?}")),
    };
    if c.auth_password.len() < 8 || c.priv_password.len() < 8 {
        return Err("SNMPv3 passwords need at least 8 characters".into());
    }
    Ok(
        v3::Security::new(c.user.as_bytes(), c.auth_password.as_bytes())
            .with_auth_protocol(auth)
            .with_auth(v3::Auth::AuthPriv {
                cipher,
                privacy_password: c.priv_password.as_bytes().to_vec(),
            }),
    )
}
