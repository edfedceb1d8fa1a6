//! SNMP polling of site devices (snmp2, v2c and v3 authPriv), by profile
//! ([`crate::profile`]). Every poll has a deadline; a device that times out or answers
//! nonsense comes back as a [`Device`] with a status and an error text, and never delays the
//! others (they are polled concurrently). A device that answers part of its profile reports
//! that part and names the rest ([`crate::profile::apply`]).

mod get;
mod table;

use std::time::{Duration, Instant};

use snmp2::{AsyncSession, Oid, Value};
use tiandi_proto::{Device, DeviceStatus, ObjectProblem, ProblemKind};

use crate::device::{DeviceConfig, SnmpVersion, security};
use crate::profile::{Answer, Profile, Raw, parse_oid};

pub use get::error_status_name;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("no answer: {0}")]
    NoAnswer(String),
    #[error("{0}")]
    BadAnswer(String),
    #[error("{0}")]
    Local(String),
}

impl PollError {
    fn status(&self) -> DeviceStatus {
        match self {
            PollError::Timeout(_) | PollError::NoAnswer(_) => DeviceStatus::Timeout,
            PollError::BadAnswer(_) => DeviceStatus::BadAnswer,
            PollError::Local(_) => DeviceStatus::Error,
        }
    }
}

fn oid(parts: &[u64]) -> Result<Oid<'static>, PollError> {
    Oid::from(parts).map_err(|e| PollError::Local(format!("bad OID {parts:?}: {e:?}")))
}

fn oid_parts(o: &Oid<'_>) -> Vec<u64> {
    o.iter().map(|i| i.collect()).unwrap_or_default()
}

fn snmp_err(e: snmp2::Error) -> PollError {
    match e {
        snmp2::Error::Send => PollError::Local("cannot send".into()),
        // A receive error on a connected UDP socket is an ICMP error: nothing listens there.
        snmp2::Error::Receive => PollError::NoAnswer("unreachable (ICMP error)".into()),
        other => PollError::BadAnswer(format!("{other:?}")),
    }
}

/// An SNMP value as the profile reads it, or the exception that came instead.
fn raw(v: &Value<'_>) -> Result<Raw, ProblemKind> {
    Ok(match v {
        Value::Integer(i) => Raw::Int(i128::from(*i), "INTEGER"),
        Value::Counter32(c) => Raw::Int(i128::from(*c), "Counter32"),
        Value::Unsigned32(c) => Raw::Int(i128::from(*c), "Gauge32"),
        Value::Timeticks(c) => Raw::Int(i128::from(*c), "TimeTicks"),
        Value::Counter64(c) => Raw::Int(i128::from(*c), "Counter64"),
        Value::OctetString(s) => Raw::Text(s.to_vec()),
        Value::ObjectIdentifier(o) => Raw::Oid(crate::profile::dotted(&oid_parts(o))),
        Value::NoSuchObject => return Err(ProblemKind::NoSuchObject),
        Value::NoSuchInstance => return Err(ProblemKind::NoSuchInstance),
        Value::EndOfMibView => return Err(ProblemKind::EndOfMibView),
        Value::IpAddress(a) => Raw::Other(format!("IpAddress {}", std::net::Ipv4Addr::from(*a))),
        Value::Null => Raw::Other("NULL".into()),
        other => {
            let d = format!("{other:?}");
            Raw::Other(d.chars().take(48).collect())
        }
    })
}

/// A profile made this device's: the OIDs and scales its `[devices.oids]` gives.
pub fn for_device(profile: &Profile, cfg: &DeviceConfig) -> Profile {
    let mut p = profile.clone();
    for o in &mut p.objects {
        if let Some(x) = cfg.oids.get(&o.name) {
            o.oid = Some(x.oid().to_string());
            if let Some(s) = x.scale() {
                o.scale = s;
            }
        }
    }
    p
}

/// A device, its profile and its (cached) session. A session that failed is rebuilt on the
/// next poll, so a late answer to an old request can never be taken for a new one.
pub struct Poller {
    cfg: DeviceConfig,
    profile: Profile,
    /// The profile's objects' OIDs, parsed once (None: not asked on this device).
    oids: Vec<Option<Vec<u64>>>,
    session: Option<AsyncSession>,
}

impl Poller {
    /// `profile` is the device's (see [`for_device`]).
    pub fn new(cfg: DeviceConfig, profile: Profile) -> Poller {
        let profile = for_device(&profile, &cfg);
        let oids = profile
            .objects
            .iter()
            .map(|o| o.oid.as_deref().and_then(|s| parse_oid(s).ok()))
            .collect();
        Poller {
            cfg,
            profile,
            oids,
            session: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Polls the device within its timeout; always returns a device entry.
    pub async fn poll(&mut self) -> Device {
        let timeout = self.cfg.timeout_ms;
        let mut dev = Device {
            name: self.cfg.name.clone(),
            profile: self.profile.kind.wire() as i32,
            profile_name: self.profile.name.clone(),
            ..Default::default()
        };
        // The table walk stops on its own a little before the deadline, with what it has.
        let deadline = Instant::now() + Duration::from_millis(timeout * 9 / 10);
        let result = tokio::time::timeout(
            Duration::from_millis(timeout),
            self.poll_inner(&mut dev, deadline),
        )
        .await
        .unwrap_or(Err(PollError::Timeout(timeout)));
        if let Err(e) = result {
            self.session = None;
            dev.status = e.status() as i32;
            dev.error = e.to_string();
            dev.interfaces.clear();
            dev.values.clear();
            dev.problems.clear();
            dev.alarms.clear();
            dev.ups = None;
            dev.modem = None;
            tracing::debug!(device = %self.cfg.name, error = %e, "Device poll failed.");
        }
        dev
    }

    async fn session(&mut self) -> Result<&mut AsyncSession, PollError> {
        if self.session.is_none() {
            let addr = self.cfg.snmp_addr();
            let req_id: i32 = rand::random::<u16>() as i32;
            let mut s = match self.cfg.version {
                SnmpVersion::V2c => {
                    AsyncSession::new_v2c(addr.as_str(), self.cfg.community.as_bytes(), req_id)
                        .await
                        .map_err(|e| PollError::Local(format!("{addr}: {e}")))?
                }
                SnmpVersion::V3 => {
                    let v3cfg = self
                        .cfg
                        .v3
                        .as_ref()
                        .ok_or_else(|| PollError::Local("SNMPv3 without credentials".into()))?;
                    let sec = security(v3cfg).map_err(PollError::Local)?;
                    AsyncSession::new_v3(addr.as_str(), req_id, sec)
                        .await
                        .map_err(|e| PollError::Local(format!("{addr}: {e}")))?
                }
            };
            if self.cfg.version == SnmpVersion::V3 {
                s.init()
                    .await
                    .map_err(|e| PollError::BadAnswer(format!("SNMPv3 engine discovery: {e:?}")))?;
            }
            self.session = Some(s);
        }
        self.session
            .as_mut()
            .ok_or_else(|| PollError::Local("no session".into()))
    }

    async fn poll_inner(&mut self, dev: &mut Device, deadline: Instant) -> Result<(), PollError> {
        let asked: Vec<(usize, Vec<u64>)> = self
            .oids
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.clone().map(|o| (i, o)))
            .collect();
        let walk = self.profile.interfaces;
        let max_rows = self
            .cfg
            .max_interfaces
            .unwrap_or(crate::profile::DEFAULT_MAX_INTERFACES);
        let mut answers = vec![Answer::NotAsked; self.profile.objects.len()];
        let s = self.session().await?;
        if !asked.is_empty() {
            let got = get::get_objects(
                s,
                &asked.iter().map(|(_, o)| o.as_slice()).collect::<Vec<_>>(),
            )
            .await?;
            for ((i, _), a) in asked.iter().zip(got) {
                answers[*i] = a;
            }
        }
        if walk {
            let t = table::walk_interfaces(s, max_rows, deadline).await?;
            if t.rows.is_empty() && asked.is_empty() {
                return Err(PollError::BadAnswer("no interfaces in ifTable".into()));
            }
            dev.interfaces = t.rows;
            if let Some(why) = t.truncated {
                dev.problems.push(ObjectProblem {
                    name: "interfaces".into(),
                    kind: ProblemKind::Truncated as i32,
                    detail: why,
                    ..Default::default()
                });
            }
        }
        let table_problems = std::mem::take(&mut dev.problems);
        crate::profile::apply(&self.profile, &answers, dev);
        dev.problems.extend(table_problems);
        if dev.status != DeviceStatus::Ok as i32 {
            tracing::debug!(device = %self.cfg.name, error = %dev.error, "Device answered, not well.");
        }
        Ok(())
    }
}

/// Polls every device concurrently; the slowest one costs at most its own timeout.
pub async fn poll_all(pollers: &mut [Poller]) -> Vec<Device> {
    futures_util::future::join_all(pollers.iter_mut().map(|p| p.poll())).await
}
