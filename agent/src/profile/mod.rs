//! Device profiles: which SNMP objects a kind of device answers, how to read them (type, scale,
//! unit, range), which of them the device cannot do without (essential), the alarms they
//! raise and the traps that matter. The built-in `if-mib`, `ups-mib` and `vsat-modem` are
//! written in the same TOML form as an operator's (`profiles/*.toml` in this crate, embedded);
//! an operator adds a device without a new release by dropping a file in `profiles_dir`.
//!
//! What a poll answered becomes a [`tiandi_proto::Device`] in [`apply`], free of I/O: values
//! into the typed fields their `role` names (the controller's rain-fade and on-battery alarms
//! read those) or into `values`; every object not answered properly into `problems`, named;
//! the device `bad-answer` only when an essential object is among them.

mod apply;
mod load;
mod show;

pub use apply::{Answer, Raw, apply};
pub use load::{Profiles, load_dir, parse};
pub use show::{answers_text, describe, probe_text, table};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most objects one profile reads (a GET of them all fits a few PDUs).
pub const MAX_OBJECTS: usize = 64;
/// The most alarms and trap rules in one profile.
pub const MAX_RULES: usize = 64;
/// The most profiles an agent loads from its `profiles_dir`.
pub const MAX_PROFILES: usize = 256;
/// The default and the largest bound on a device's interface table (rows).
pub const DEFAULT_MAX_INTERFACES: usize = 256;
pub const MAX_INTERFACES: usize = 4096;

/// What kind of device a profile describes (the controller's view of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Ups,
    Modem,
    Router,
    Switch,
    Other,
}

impl Kind {
    pub fn wire(self) -> tiandi_proto::Profile {
        match self {
            Kind::Ups => tiandi_proto::Profile::UpsMib,
            Kind::Modem => tiandi_proto::Profile::VsatModem,
            Kind::Router | Kind::Switch => tiandi_proto::Profile::IfMib,
            Kind::Other => tiandi_proto::Profile::Other,
        }
    }
}

/// How an object's answer is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjType {
    /// INTEGER (any integer SNMP type is accepted: devices mix them up).
    Integer,
    /// Gauge32 / Unsigned32.
    Gauge,
    /// Counter32 / Counter64.
    Counter,
    /// TimeTicks (hundredths of a second).
    Timeticks,
    /// An INTEGER with named values (`labels`).
    Enum,
    /// An OCTET STRING shown as text.
    Text,
    /// An integer, or a string holding a decimal number (modems answer "9.2").
    Number,
}

/// Which typed report field an object fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    #[serde(rename = "ups.charge_pct")]
    UpsChargePct,
    /// Minutes of runtime left (the report carries seconds).
    #[serde(rename = "ups.minutes_remaining")]
    UpsMinutesRemaining,
    #[serde(rename = "ups.runtime_s")]
    UpsRuntimeS,
    /// Seconds on battery: above 0 means on battery, whatever the alarms say.
    #[serde(rename = "ups.seconds_on_battery")]
    UpsSecondsOnBattery,
    #[serde(rename = "modem.esno_db")]
    ModemEsnoDb,
    #[serde(rename = "modem.rx_level_dbm")]
    ModemRxLevelDbm,
    #[serde(rename = "modem.tx_power_dbm")]
    ModemTxPowerDbm,
    #[serde(rename = "modem.modcod")]
    ModemModcod,
    #[serde(rename = "modem.rx_rate_kbps")]
    ModemRxRateKbps,
    #[serde(rename = "modem.tx_rate_kbps")]
    ModemTxRateKbps,
}

/// One scalar object of a profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object {
    /// Its name in reports (`charge`, `esno`): 1–64 of `[a-z0-9_]`.
    pub name: String,
    /// Numeric OID of the instance (`…​.0` for a scalar). A profile may leave it out for a
    /// device's config to give (`[devices.oids]`): the generic `vsat-modem` does.
    #[serde(default)]
    pub oid: Option<String>,
    /// `MODULE::object` in the MIB it comes from: checked against the MIB's text.
    #[serde(default)]
    pub mib: Option<String>,
    #[serde(rename = "type")]
    pub typ: ObjType,
    /// Multiplies the raw value (0.1 for tenths of a dB).
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub unit: String,
    /// Accepted values after scaling, `[min, max]`; outside it the object is `out-of-range`.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// An enumeration's names: `{ "1" = "other", "5" = "battery" }`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The device is of no use without it: missing or wrong, the device is `bad-answer` (and
    /// the site degraded); any other object missing is only listed.
    #[serde(default)]
    pub essential: bool,
    #[serde(default)]
    pub role: Option<Role>,
}

fn one() -> f64 {
    1.0
}

/// An alarm that holds while an object's value says so.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmRule {
    /// `on-battery` (the controller's on-battery alarm), `battery-low` (its battery-low), any
    /// other name (its device-alarm): 1–64 of `[a-z0-9-]`.
    pub name: String,
    pub object: String,
    /// Holds when the value (a label, a text, a number) is one of these.
    #[serde(default)]
    pub is: Vec<String>,
    /// Holds when the number is below this.
    #[serde(default)]
    pub below: Option<f64>,
    /// Holds when the number is above this.
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default = "major")]
    pub severity: String,
}

fn major() -> String {
    "major".into()
}

/// A trap (or inform) that matters, by its `snmpTrapOID`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrapRule {
    /// The event's name in reports (`on-battery`, `link-down`).
    pub name: String,
    /// The notification's OID (`snmpTrapOID.0`'s value).
    pub oid: String,
    #[serde(default)]
    pub mib: Option<String>,
    /// Only when a varbind under this OID prefix …
    #[serde(default)]
    pub varbind: Option<String>,
    /// … holds this value (an OID, a number or a text).
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default = "major")]
    pub severity: String,
    /// Poll the device at once, so the report carries its state too (default yes).
    #[serde(default = "yes")]
    pub poll: bool,
}

fn yes() -> bool {
    true
}

/// A profile, as written in its file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// 1–64 of `[a-z0-9-]`; what `[[devices]] profile` names.
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub description: String,
    /// The MIB modules its objects come from (`UPS-MIB`).
    #[serde(default)]
    pub mibs: Vec<String>,
    #[serde(default)]
    pub objects: Vec<Object>,
    /// Walk IF-MIB's ifTable and ifXTable (names, aliases, 64-bit counters, oper status).
    #[serde(default)]
    pub interfaces: bool,
    #[serde(default)]
    pub alarms: Vec<AlarmRule>,
    #[serde(default)]
    pub traps: Vec<TrapRule>,
}

impl Profile {
    pub fn object(&self, name: &str) -> Option<&Object> {
        self.objects.iter().find(|o| o.name == name)
    }
}

/// Parses a numeric OID (`1.3.6.1…`, a leading dot allowed).
pub fn parse_oid(s: &str) -> Result<Vec<u64>, String> {
    let s = s.trim().trim_start_matches('.');
    let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse::<u64>).collect();
    match parts {
        Ok(p) if p.len() >= 2 && p.len() <= 128 && p[0] <= 2 => Ok(p),
        _ => Err(format!("{s:?} is not a numeric OID")),
    }
}

/// `1.3.6.1.2.1`
pub fn dotted(o: &[u64]) -> String {
    o.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}
