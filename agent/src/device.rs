//! A device's configuration (`[[devices]]` in the agent's TOML): what to poll, with which SNMP
//! version and credentials, and the checks serde cannot make. Shared by the configuration
//! ([`crate::config`]) and the poller ([`crate::snmp`]); it depends on neither.

use serde::{Deserialize, Serialize};
use snmp2::v3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceProfile {
    /// Router interfaces (IF-MIB: ifHC*Octets, ifOperStatus, errors).
    IfMib,
    /// UPS (RFC 1628 UPS-MIB: on battery, charge, runtime left).
    UpsMib,
    /// Satellite modem: vendor OIDs given in `[devices.oids]`.
    VsatModem,
}

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
    pub profile: DeviceProfile,
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
    /// VSAT modem OIDs (numeric, vendor-specific).
    #[serde(default)]
    pub oids: Option<ModemOids>,
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

/// A modem figure: its OID and the factor that turns the raw value into the unit
/// (dB, dBm). Integer and decimal-string answers are both accepted.
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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModemOids {
    /// Es/No or SNR (dB).
    pub esno: ScaledOid,
    /// Receive level (dBm).
    #[serde(default)]
    pub rx_level: Option<ScaledOid>,
    /// Transmit power (dBm).
    #[serde(default)]
    pub tx_power: Option<ScaledOid>,
    /// Current ModCod (string or integer).
    #[serde(default)]
    pub modcod: Option<String>,
    /// Information rate toward the site (scaled to kbit/s): the controller paces at it.
    #[serde(default)]
    pub rx_rate: Option<ScaledOid>,
    /// Information rate from the site (scaled to kbit/s): the agent paces at it.
    #[serde(default)]
    pub tx_rate: Option<ScaledOid>,
}

impl DeviceConfig {
    /// Checks what serde cannot, naming the key (`devices[i]`) in `file`.
    pub fn validate(&self, file: &str, key: &str) -> Result<(), String> {
        if self.version == SnmpVersion::V3 && self.v3.is_none() {
            return Err(format!(
                "{file}: key `{key}.v3`: version = \"v3\" needs user and passwords"
            ));
        }
        if self.profile == DeviceProfile::VsatModem && self.oids.is_none() {
            return Err(format!(
                "{file}: key `{key}.oids`: a vsat-modem needs its OIDs (esno at least)"
            ));
        }
        if let Some(o) = &self.oids {
            for (k, oid) in [
                ("esno", Some(&o.esno.oid)),
                ("rx_level", o.rx_level.as_ref().map(|x| &x.oid)),
                ("tx_power", o.tx_power.as_ref().map(|x| &x.oid)),
                ("modcod", o.modcod.as_ref()),
                ("rx_rate", o.rx_rate.as_ref().map(|x| &x.oid)),
                ("tx_rate", o.tx_rate.as_ref().map(|x| &x.oid)),
            ] {
                if let Some(oid) = oid
                    && parse_oid(oid).is_err()
                {
                    return Err(format!(
                        "{file}: key `{key}.oids.{k}`: {oid:?} is not a numeric OID"
                    ));
                }
            }
        }
        if let Some(v3) = &self.v3 {
            security(v3).map_err(|e| format!("{file}: key `{key}.v3`: {e}"))?;
        }
        Ok(())
    }
}

pub fn parse_oid(s: &str) -> Result<Vec<u64>, String> {
    let s = s.trim().trim_start_matches('.');
    let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse::<u64>).collect();
    match parts {
        Ok(p) if p.len() >= 2 => Ok(p),
        _ => Err(format!("{s:?} is not a numeric OID")),
    }
}

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
