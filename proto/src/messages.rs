//! The protobuf messages (prost, no `.proto` compiler needed). Field numbers are the wire
//! contract: never reuse one, only add. Unknown fields are skipped by the decoder, which is
//! what lets an agent one minor version newer or older talk to the controller.
//!
//! Figures are fixed-point integers (varints) rather than floats: `*_x10` is tenths,
//! `*_c` hundredths, `*_permille` thousandths. That keeps a report near 200 bytes.
//!
//! Repeated strings (mount points, interface and device names, ModCods) travel once per
//! connection; afterwards a `*_ref` index replaces them (see [`crate::names`]).

use serde::Serialize;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6")]
    pub body: Option<Body>,
}

// A report is the message nearly every frame carries: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "1")]
    Hello(Hello),
    #[prost(message, tag = "2")]
    Welcome(Welcome),
    #[prost(message, tag = "3")]
    Report(Report),
    #[prost(message, tag = "4")]
    Ack(Ack),
    #[prost(message, tag = "5")]
    Refused(Refused),
    /// A dual-homed site's paths and which one each class uses (from minor 1; sent only to a
    /// controller whose Welcome says minor ≥ 1).
    #[prost(message, tag = "6")]
    Paths(Paths),
}

/// First message from the agent on its report stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The site the agent believes it is. The controller compares it with the certificate.
    #[prost(string, tag = "1")]
    pub site_id: String,
    #[prost(uint32, tag = "2")]
    pub major: u32,
    #[prost(uint32, tag = "3")]
    pub minor: u32,
    #[prost(string, tag = "4")]
    pub agent_version: String,
    #[prost(uint32, tag = "5")]
    pub interval_ms: u32,
    /// The highest controller fencing epoch this site has seen (0: none). A controller below
    /// it was superseded by a promoted standby and stands down when it hears this.
    #[prost(uint64, tag = "6")]
    pub epoch: u64,
    /// Which of the site's paths this connection runs over (`ground`, `sky`; empty: a site
    /// with one path). One connection per path at a time.
    #[prost(string, tag = "7")]
    pub path: String,
}

/// The controller's answer to [`Hello`]: what it already holds for this site, so the agent
/// can drop acknowledged reports from its spool before sending anything (nothing acknowledged
/// is ever resent, even after the agent was killed between storing an ack and applying it).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    #[prost(uint32, tag = "1")]
    pub major: u32,
    #[prost(uint32, tag = "2")]
    pub minor: u32,
    /// Every sequence number `<= acked_through` is stored.
    #[prost(uint64, tag = "3")]
    pub acked_through: u64,
    /// Stored ranges above `acked_through` (the current-state reports sent ahead of a backlog).
    #[prost(message, repeated, tag = "4")]
    pub acked_ranges: Vec<SeqRange>,
    #[prost(int64, tag = "5")]
    pub server_time_ms: i64,
    /// The controller's fencing epoch (1 until a standby is promoted; 0 from controllers that
    /// predate it, taken as 1). A site refuses a controller below the highest it has seen.
    #[prost(uint64, tag = "6")]
    pub epoch: u64,
    /// The path policy set centrally (absent: the site's own configuration decides).
    #[prost(message, optional, tag = "7")]
    pub path_policy: Option<PathPolicy>,
}

/// Which paths each class of traffic may use, in order of preference (`tiandi_link::paths`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PathPolicy {
    #[prost(message, repeated, tag = "1")]
    pub classes: Vec<ClassRule>,
    /// A critical report goes over every path that is up.
    #[prost(bool, tag = "2")]
    pub critical_on_all: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClassRule {
    /// `reports`, `alarm`, `conference`, `normal`, `bulk`, `backup`.
    #[prost(string, tag = "1")]
    pub class: String,
    /// Path names, a name with `@window` for "only within that path's window".
    #[prost(string, repeated, tag = "2")]
    pub paths: Vec<String>,
}

/// A dual-homed site's view of its paths, sent on every path's report stream when something
/// changes (and every 10 s while anything is not up).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Paths {
    #[prost(message, repeated, tag = "1")]
    pub paths: Vec<PathStatus>,
    /// The path each class uses now (a class with no usable path is absent).
    #[prost(message, repeated, tag = "2")]
    pub uses: Vec<ClassUse>,
    /// Switches since the last `Paths` this connection carried, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub switches: Vec<PathSwitch>,
    /// The agent run that sent it (random at its start) and the state's version in that run:
    /// frames travel over paths of different delays, and one that describes an older state
    /// than the last applied (a satellite path's, overtaken by the ground line's) is stale.
    #[prost(uint64, tag = "4")]
    pub run: u64,
    #[prost(uint64, tag = "5")]
    pub version: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PathStatus {
    #[prost(string, tag = "1")]
    pub name: String,
    /// `ground` or `sky`.
    #[prost(string, tag = "2")]
    pub kind: String,
    /// `up`, `suspect` or `down`.
    #[prost(string, tag = "3")]
    pub state: String,
    #[prost(uint32, tag = "4")]
    pub rtt_ms: u32,
    #[prost(uint32, tag = "5")]
    pub loss_permille: u32,
    #[prost(uint32, tag = "6")]
    pub tx_kbps: u32,
    #[prost(uint32, tag = "7")]
    pub rx_kbps: u32,
    /// The agent's budget on this path (kbit/s; 0: none).
    #[prost(uint32, tag = "8")]
    pub budget_kbps: u32,
    /// Since when (site clock, Unix ms) it is in this state.
    #[prost(int64, tag = "9")]
    pub since_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClassUse {
    #[prost(string, tag = "1")]
    pub class: String,
    #[prost(string, tag = "2")]
    pub path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PathSwitch {
    #[prost(int64, tag = "1")]
    pub at_ms: i64,
    #[prost(string, tag = "2")]
    pub class: String,
    /// Empty: none.
    #[prost(string, tag = "3")]
    pub from: String,
    #[prost(string, tag = "4")]
    pub to: String,
    #[prost(string, tag = "5")]
    pub reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize)]
pub struct SeqRange {
    #[prost(uint64, tag = "1")]
    pub first: u64,
    #[prost(uint64, tag = "2")]
    pub last: u64,
}

/// Acknowledges that the reports `first..=last` are durably stored.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(uint64, tag = "1")]
    pub first: u64,
    #[prost(uint64, tag = "2")]
    pub last: u64,
}

/// Sent before the controller closes a stream it will not serve.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refused {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// One health report of one site.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Report {
    /// Per-site sequence number, from 1, never reused.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// For a downsampled report: the last sequence number it covers (0 = only `seq`).
    #[prost(uint64, tag = "2")]
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub seq_last: u64,
    /// When the sample was taken (Unix milliseconds, site clock).
    #[prost(int64, tag = "3")]
    pub taken_ms: i64,
    /// For a downsampled report: the time it covers, from `taken_ms`.
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub span_ms: u32,
    /// For a downsampled report: how many samples were merged into it.
    #[prost(uint32, tag = "5")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub samples: u32,
    #[prost(message, optional, tag = "6")]
    pub host: Option<Host>,
    #[prost(message, optional, tag = "7")]
    pub link: Option<LinkStats>,
    #[prost(message, repeated, tag = "8")]
    pub devices: Vec<Device>,
    /// What the site's devices said on their own since the last report (SNMP traps and
    /// informs the device's profile names), oldest first; a flood is summarised (`count`).
    /// From minor 2.
    #[prost(message, repeated, tag = "9")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<DeviceEvent>,
    /// Reachability of the site's devices and next hop (ICMP echo, TCP connect). From minor 2.
    #[prost(message, repeated, tag = "10")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// The trap listener's counters since the agent started (absent: no listener). From
    /// minor 2.
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traps: Option<TrapStats>,
    /// On the wire only: whether this report's figures are differences from the previous
    /// report on the same connection, and how its entries match that report's ([`DeltaMode`],
    /// [`crate::delta`]; from minor 3). Always `Whole` in a stored report.
    #[prost(enumeration = "DeltaMode", tag = "12")]
    #[serde(skip)]
    pub delta: i32,
    /// From a province controller to the ministry's only (tier two, from minor 4): its sites'
    /// summaries that changed and its alarm events since its previous report.
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation: Option<Federation>,
}

/// What a province controller forwards to the ministry's in one report: the summaries of its
/// sites that changed, and its alarm events in the order it logged them. At its start it lists
/// every site once (a roster); the ministry then forgets the province's sites that roster did
/// not name. Bounded by [`Federation::MAX_SITES`] and [`Federation::MAX_ALARMS`] per report.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Federation {
    #[prost(message, repeated, tag = "1")]
    pub sites: Vec<SiteSummary>,
    #[prost(message, repeated, tag = "2")]
    pub alarms: Vec<AlarmChange>,
    /// The roster these summaries belong to: the province controller's start (Unix ms); it
    /// only grows.
    #[prost(uint64, tag = "3")]
    pub roster: u64,
    /// The last report of roster `roster`'s full listing: every site of the province has been
    /// named in it (or changed since).
    #[prost(bool, tag = "4")]
    pub roster_done: bool,
    /// How many sites the province holds now.
    #[prost(uint32, tag = "5")]
    pub total_sites: u32,
}

impl Federation {
    /// Most site summaries in one report (a summary is ~60-120 bytes; a frame 64 KiB).
    pub const MAX_SITES: usize = 300;
    /// Most alarm events in one report.
    pub const MAX_ALARMS: usize = 150;
}

/// One site as its province sees it: enough for a national view and national alarm counts.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct SiteSummary {
    #[prost(string, tag = "1")]
    pub site_id: String,
    /// `up`, `degraded`, `down`, `rain-fade`, `on-battery`, `disk-full`.
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(bool, tag = "3")]
    pub connected: bool,
    /// Province controller's clock, Unix ms, of the site's last report (0: never).
    #[prost(int64, tag = "4")]
    pub last_seen_ms: i64,
    /// Its active conditions (`site-down`, `rain-fade`, …).
    #[prost(string, repeated, tag = "5")]
    pub conditions: Vec<String>,
    /// Since when it has had this status (province clock, Unix ms).
    #[prost(int64, tag = "6")]
    pub status_since_ms: i64,
    /// The site left the province (revoked or removed): the ministry forgets it.
    #[prost(bool, tag = "7")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// An alarm raised or cleared at a province (its controller's clock).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct AlarmChange {
    #[prost(int64, tag = "1")]
    pub at_ms: i64,
    #[prost(string, tag = "2")]
    pub site_id: String,
    #[prost(string, tag = "3")]
    pub alarm: String,
    /// `raised` or `cleared`.
    #[prost(string, tag = "4")]
    pub state: String,
    #[prost(string, tag = "5")]
    pub detail: String,
}

/// How a report on the wire is encoded ([`Report::delta`], [`crate::delta`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum DeltaMode {
    /// Every figure as it is.
    Whole = 0,
    /// Figures as differences from the previous report's; entries of lists matched by key.
    ByKey = 1,
    /// As `ByKey`, but every list holds the previous report's keys in the same order: entries
    /// match by position, and their keys are left out.
    ByPosition = 2,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Report {
    /// The last sequence number this report covers.
    pub fn last_seq(&self) -> u64 {
        self.seq_last.max(self.seq)
    }
    pub fn range(&self) -> SeqRange {
        SeqRange {
            first: self.seq,
            last: self.last_seq(),
        }
    }
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Host {
    #[prost(uint32, tag = "1")]
    pub cpu_permille: u32,
    #[prost(uint32, tag = "2")]
    pub load1_c: u32,
    #[prost(uint32, tag = "3")]
    pub load5_c: u32,
    #[prost(uint32, tag = "4")]
    pub load15_c: u32,
    #[prost(uint64, tag = "5")]
    pub mem_used_mib: u64,
    #[prost(uint64, tag = "6")]
    pub mem_total_mib: u64,
    #[prost(uint64, tag = "7")]
    pub uptime_s: u64,
    #[prost(message, repeated, tag = "8")]
    pub filesystems: Vec<Filesystem>,
    #[prost(message, repeated, tag = "9")]
    pub interfaces: Vec<Interface>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Filesystem {
    #[prost(string, tag = "1")]
    pub mount: String,
    #[prost(uint32, tag = "4")]
    #[serde(skip)]
    pub mount_ref: u32,
    #[prost(uint64, tag = "2")]
    pub used_mib: u64,
    #[prost(uint64, tag = "3")]
    pub total_mib: u64,
}

impl Filesystem {
    /// Use in per mille (0 when the size is unknown).
    pub fn used_permille(&self) -> u32 {
        (self.used_mib.saturating_mul(1000))
            .checked_div(self.total_mib)
            .unwrap_or(0)
            .min(1000) as u32
    }
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Interface {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "6")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(uint64, tag = "2")]
    pub rx_bytes: u64,
    #[prost(uint64, tag = "3")]
    pub tx_bytes: u64,
    #[prost(uint64, tag = "4")]
    pub rx_errors: u64,
    #[prost(uint64, tag = "5")]
    pub tx_errors: u64,
}

/// The QUIC connection's own figures, as the agent sees them.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct LinkStats {
    #[prost(uint32, tag = "1")]
    pub rtt_ms: u32,
    #[prost(uint64, tag = "2")]
    pub lost_packets: u64,
    #[prost(uint64, tag = "3")]
    pub cwnd_bytes: u64,
    #[prost(uint64, tag = "4")]
    pub tx_bytes: u64,
    #[prost(uint64, tag = "5")]
    pub rx_bytes: u64,
    #[prost(uint64, tag = "6")]
    pub sent_packets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration, Serialize)]
#[repr(i32)]
pub enum Profile {
    Unknown = 0,
    IfMib = 1,
    UpsMib = 2,
    VsatModem = 3,
    /// An operator's profile whose kind is none of the above (its name is in
    /// `Device.profile_name`).
    Other = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration, Serialize)]
#[repr(i32)]
pub enum DeviceStatus {
    Unknown = 0,
    Ok = 1,
    /// No answer within the poll timeout.
    Timeout = 2,
    /// An answer that could not be used (wrong types, SNMP error, missing OIDs).
    BadAnswer = 3,
    /// Could not even send (address, credentials, local error).
    Error = 4,
}

/// One polled device (SNMP).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Device {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "8")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(enumeration = "Profile", tag = "2")]
    #[serde(serialize_with = "ser_profile")]
    pub profile: i32,
    #[prost(enumeration = "DeviceStatus", tag = "3")]
    #[serde(serialize_with = "ser_status")]
    pub status: i32,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[prost(message, repeated, tag = "5")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<DeviceInterface>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ups: Option<Ups>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modem: Option<Modem>,
    /// The profile's objects that fill none of the typed fields above (from minor 2).
    #[prost(message, repeated, tag = "9")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<ObjectValue>,
    /// Objects of the profile the device did not answer properly (from minor 2). A device with
    /// problems but every essential object is `ok`; one whose essential object is missing or
    /// wrong is `bad-answer`, and still carries every value it did answer.
    #[prost(message, repeated, tag = "10")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ObjectProblem>,
    /// The profile's alarms that hold now (from minor 2).
    #[prost(message, repeated, tag = "11")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alarms: Vec<DeviceAlarm>,
    /// The profile the device was polled with (`ups-mib`, an operator's `acme-ups`; from
    /// minor 2).
    #[prost(string, tag = "12")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub profile_name: String,
    #[prost(uint32, tag = "13")]
    #[serde(skip)]
    pub profile_name_ref: u32,
    /// How the device's address answered this round's reachability check (`null`: not
    /// checked).
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Probe>,
}

/// One object of a device's profile: a number (`num` × 10^`exp`, in `unit`) or a text (an
/// enumeration's label, a string).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ObjectValue {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub name_ref: u32,
    #[prost(sint64, tag = "3")]
    pub num: i64,
    #[prost(sint32, tag = "4")]
    pub exp: i32,
    #[prost(string, tag = "5")]
    pub text: String,
    #[prost(uint32, tag = "6")]
    pub text_ref: u32,
    #[prost(string, tag = "7")]
    pub unit: String,
    #[prost(uint32, tag = "8")]
    pub unit_ref: u32,
    /// Whether `num` carries the value (a text-only object has none).
    #[prost(bool, tag = "9")]
    pub has_num: bool,
}

impl ObjectValue {
    /// The number, if the object is one.
    pub fn number(&self) -> Option<f64> {
        self.has_num
            .then(|| self.num as f64 * 10f64.powi(self.exp.clamp(-18, 18)))
    }
    /// A number as a mantissa and a decimal exponent: the shortest of up to six decimals that
    /// holds it to a part in a billion (a varint of 1–3 bytes for most device figures).
    pub fn set_number(&mut self, v: f64) {
        self.has_num = true;
        if !v.is_finite() {
            (self.num, self.exp) = (0, 0);
            return;
        }
        for d in 0..=6 {
            let scaled = v * 10f64.powi(d);
            if scaled.abs() >= 9.0e15 {
                break;
            }
            let m = scaled.round();
            if (m - scaled).abs() <= 1e-9 * scaled.abs().max(1.0) || d == 6 {
                (self.num, self.exp) = (m as i64, -d);
                return;
            }
        }
        (self.num, self.exp) = (v.round().clamp(-9.0e15, 9.0e15) as i64, 0);
    }
}

impl Serialize for ObjectValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        if let Some(v) = self.number() {
            m.serialize_entry("value", &v)?;
        }
        if !self.text.is_empty() {
            m.serialize_entry("text", &self.text)?;
        }
        if !self.unit.is_empty() {
            m.serialize_entry("unit", &self.unit)?;
        }
        m.end()
    }
}

/// How an object of a profile was not answered properly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration, Serialize)]
#[repr(i32)]
pub enum ProblemKind {
    Unknown = 0,
    /// The device does not implement the object (`noSuchObject`).
    NoSuchObject = 1,
    /// The object exists, not this instance (`noSuchInstance`).
    NoSuchInstance = 2,
    /// The device's MIB view ended before the object (`endOfMibView`).
    EndOfMibView = 3,
    /// An answer of another type than the profile's (a string for an integer).
    WrongType = 4,
    /// A value outside the profile's range.
    OutOfRange = 5,
    /// The device answered the request with an error status (`noSuchName`, `genErr`).
    ErrorStatus = 6,
    /// A table cut short at its bound of rows or of time.
    Truncated = 7,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Unknown => "unknown",
            ProblemKind::NoSuchObject => "no-such-object",
            ProblemKind::NoSuchInstance => "no-such-instance",
            ProblemKind::EndOfMibView => "end-of-mib-view",
            ProblemKind::WrongType => "wrong-type",
            ProblemKind::OutOfRange => "out-of-range",
            ProblemKind::ErrorStatus => "error-status",
            ProblemKind::Truncated => "truncated",
        }
    }
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct ObjectProblem {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(enumeration = "ProblemKind", tag = "3")]
    #[serde(serialize_with = "ser_problem")]
    pub kind: i32,
    /// What came instead (`OCTET STRING "n/a"`, `150 above 100`); empty for a missing object.
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The object is one the profile calls essential.
    #[prost(bool, tag = "5")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub essential: bool,
}

fn ser_problem<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        ProblemKind::try_from(*v)
            .unwrap_or(ProblemKind::Unknown)
            .as_str(),
    )
}

/// How urgent an alarm or event of a device's profile is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, prost::Enumeration, Serialize)]
#[repr(i32)]
pub enum Severity {
    Unknown = 0,
    Info = 1,
    Warning = 2,
    Minor = 3,
    Major = 4,
    Critical = 5,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Unknown => "unknown",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }
    pub fn parse(s: &str) -> Option<Severity> {
        [
            Severity::Info,
            Severity::Warning,
            Severity::Minor,
            Severity::Major,
            Severity::Critical,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

fn ser_severity<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(Severity::try_from(*v).unwrap_or(Severity::Unknown).as_str())
}

/// An alarm of a device's profile that holds now (`battery-low`, `modem-fault`).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct DeviceAlarm {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(enumeration = "Severity", tag = "3")]
    #[serde(serialize_with = "ser_severity")]
    pub severity: i32,
    /// Why (`battery_status = low`).
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Something a device said on its own: a trap or an inform its profile names.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct DeviceEvent {
    #[prost(string, tag = "1")]
    pub device: String,
    #[prost(uint32, tag = "2")]
    #[serde(skip)]
    pub device_ref: u32,
    /// The profile's name for it (`on-battery`, `link-down`).
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(uint32, tag = "4")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(enumeration = "Severity", tag = "5")]
    #[serde(serialize_with = "ser_severity")]
    pub severity: i32,
    /// When the agent received it (Unix ms, site clock); the first of a summarised flood.
    #[prost(int64, tag = "6")]
    pub at_ms: i64,
    /// How many like it arrived (1 unless a flood was summarised).
    #[prost(uint32, tag = "7")]
    pub count: u32,
    /// The varbinds that say which (`ifIndex 3`), short.
    #[prost(string, tag = "8")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// It came as an inform (acknowledged to the device), not a trap.
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inform: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration, Serialize)]
#[repr(i32)]
pub enum ProbeKind {
    Unknown = 0,
    Icmp = 1,
    Tcp = 2,
}

fn ser_probe_kind<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        match ProbeKind::try_from(*v).unwrap_or(ProbeKind::Unknown) {
            ProbeKind::Unknown => "unknown",
            ProbeKind::Icmp => "icmp",
            ProbeKind::Tcp => "tcp",
        },
    )
}

/// One reachability check: an ICMP echo or a TCP connect.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Probe {
    /// The check's name (a device's, `next-hop`, or a configured one's).
    #[prost(string, tag = "1")]
    pub target: String,
    #[prost(uint32, tag = "2")]
    #[serde(skip)]
    pub target_ref: u32,
    #[prost(enumeration = "ProbeKind", tag = "3")]
    #[serde(serialize_with = "ser_probe_kind")]
    pub kind: i32,
    #[prost(bool, tag = "4")]
    pub ok: bool,
    /// Round trip (ICMP) or time to connect (TCP), microseconds; 0 when not `ok`.
    #[prost(uint32, tag = "5")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub rtt_us: u32,
    /// Why not (`timeout`, `refused`, `unreachable`).
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[prost(uint32, tag = "7")]
    #[serde(skip)]
    pub error_ref: u32,
}

/// The trap listener's counters (cumulative since the agent started).
#[derive(Clone, Copy, PartialEq, prost::Message, Serialize)]
pub struct TrapStats {
    /// Traps and informs from configured devices that parsed and authenticated.
    #[prost(uint64, tag = "1")]
    pub received: u64,
    /// Of those, sent on as events.
    #[prost(uint64, tag = "2")]
    pub forwarded: u64,
    /// Folded into a flood's summary instead of going one by one.
    #[prost(uint64, tag = "3")]
    pub summarised: u64,
    /// From an address that is no configured device: ignored.
    #[prost(uint64, tag = "4")]
    pub unknown_source: u64,
    /// Not SNMP, wrong community, failed authentication or decryption: ignored.
    #[prost(uint64, tag = "5")]
    pub rejected: u64,
    /// Traps of no interest to the device's profile: counted, not sent.
    #[prost(uint64, tag = "6")]
    pub ignored: u64,
}

fn ser_profile<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match Profile::try_from(*v).unwrap_or(Profile::Unknown) {
        Profile::Unknown => "unknown",
        Profile::IfMib => "if-mib",
        Profile::UpsMib => "ups-mib",
        Profile::VsatModem => "vsat-modem",
        Profile::Other => "other",
    })
}

impl DeviceStatus {
    /// Its name in JSON, logs and the console: `ok`, `timeout`, `bad-answer`, …
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Unknown => "unknown",
            DeviceStatus::Ok => "ok",
            DeviceStatus::Timeout => "timeout",
            DeviceStatus::BadAnswer => "bad-answer",
            DeviceStatus::Error => "error",
        }
    }
}

fn ser_status<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        DeviceStatus::try_from(*v)
            .unwrap_or(DeviceStatus::Unknown)
            .as_str(),
    )
}

#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct DeviceInterface {
    #[prost(uint32, tag = "1")]
    pub index: u32,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint32, tag = "8")]
    #[serde(skip)]
    pub name_ref: u32,
    #[prost(bool, tag = "3")]
    pub oper_up: bool,
    #[prost(uint64, tag = "4")]
    pub in_octets: u64,
    #[prost(uint64, tag = "5")]
    pub out_octets: u64,
    #[prost(uint64, tag = "6")]
    pub in_errors: u64,
    #[prost(uint64, tag = "7")]
    pub out_errors: u64,
    /// `ifAlias`: what the operator called the port ("uplink to Xian").
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub alias: String,
    #[prost(uint32, tag = "10")]
    #[serde(skip)]
    pub alias_ref: u32,
    /// `ifHighSpeed` (Mbit/s; 0 unknown).
    #[prost(uint32, tag = "11")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub speed_mbps: u32,
}

/// RFC 1628 UPS figures.
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Ups {
    #[prost(bool, tag = "1")]
    pub on_battery: bool,
    #[prost(uint32, tag = "2")]
    pub charge_pct: u32,
    #[prost(uint32, tag = "3")]
    pub runtime_s: u32,
    /// Figures the UPS did not give (`UPS_*` bits; from minor 2): a charge or runtime of 0 with
    /// its bit set is not known, not empty.
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub missing: u32,
}

/// [`Ups::missing`]: the charge is not known.
pub const UPS_CHARGE: u32 = 1;
/// [`Ups::missing`]: the runtime left is not known.
pub const UPS_RUNTIME: u32 = 2;

/// [`Modem::missing`]: the receive level is not known.
pub const MODEM_RX_LEVEL: u32 = 1;
/// [`Modem::missing`]: the transmit power is not known.
pub const MODEM_TX_POWER: u32 = 2;
/// [`Modem::missing`]: the ModCod is not known.
pub const MODEM_MODCOD: u32 = 4;

/// Satellite modem figures (vendor OIDs come from the agent's config).
#[derive(Clone, PartialEq, prost::Message, Serialize)]
pub struct Modem {
    #[prost(sint32, tag = "1")]
    pub esno_db_x10: i32,
    #[prost(sint32, tag = "2")]
    pub rx_level_dbm_x10: i32,
    #[prost(string, tag = "3")]
    pub modcod: String,
    #[prost(uint32, tag = "5")]
    #[serde(skip)]
    pub modcod_ref: u32,
    #[prost(sint32, tag = "4")]
    pub tx_power_dbm_x10: i32,
    /// The carrier's information rate toward the site (kbit/s; 0: not known). The controller
    /// paces transfers to the site at it unless its config sets a rate.
    #[prost(uint32, tag = "6")]
    pub rx_rate_kbps: u32,
    /// The carrier's information rate from the site (kbit/s; 0: not known). The agent paces
    /// what it sends at it unless its config sets a rate.
    #[prost(uint32, tag = "7")]
    pub tx_rate_kbps: u32,
    /// Figures the modem did not give (`MODEM_*` bits; from minor 2).
    #[prost(uint32, tag = "8")]
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub missing: u32,
}
