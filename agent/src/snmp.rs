//! SNMP polling of site devices (snmp2, v2c and v3 authPriv), by profile. Every poll has a
//! deadline; a device that times out or answers nonsense comes back as a [`Device`] with a
//! status and an error text, and never delays the others (they are polled concurrently).

use std::time::Duration;

use snmp2::{AsyncSession, Oid, Value};
use tiandi_proto::{Device, DeviceInterface, DeviceStatus, Modem, Profile, Ups};

use crate::device::{DeviceConfig, DeviceProfile, ScaledOid, SnmpVersion, parse_oid, security};

/// At most this many rows are read from a table (interfaces).
const MAX_ROWS: usize = 128;

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

/// A device and its (cached) session. A session that failed is rebuilt on the next poll, so a
/// late answer to an old request can never be taken for a new one.
pub struct Poller {
    cfg: DeviceConfig,
    session: Option<AsyncSession>,
}

impl Poller {
    pub fn new(cfg: DeviceConfig) -> Poller {
        Poller { cfg, session: None }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Polls the device within its timeout; always returns a device entry.
    pub async fn poll(&mut self) -> Device {
        let timeout = self.cfg.timeout_ms;
        let profile = match self.cfg.profile {
            DeviceProfile::IfMib => Profile::IfMib,
            DeviceProfile::UpsMib => Profile::UpsMib,
            DeviceProfile::VsatModem => Profile::VsatModem,
        };
        let mut dev = Device {
            name: self.cfg.name.clone(),
            profile: profile as i32,
            ..Default::default()
        };
        let result =
            tokio::time::timeout(Duration::from_millis(timeout), self.poll_inner(&mut dev))
                .await
                .unwrap_or(Err(PollError::Timeout(timeout)));
        match result {
            Ok(()) => dev.status = DeviceStatus::Ok as i32,
            Err(e) => {
                self.session = None;
                dev.status = e.status() as i32;
                dev.error = e.to_string();
                dev.interfaces.clear();
                dev.ups = None;
                dev.modem = None;
                tracing::debug!(device = %self.cfg.name, error = %e, "Device poll failed.");
            }
        }
        dev
    }

    async fn session(&mut self) -> Result<&mut AsyncSession, PollError> {
        if self.session.is_none() {
            let addr = if self.cfg.address.contains(':') {
                self.cfg.address.clone()
            } else {
                format!("{}:161", self.cfg.address)
            };
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

    async fn poll_inner(&mut self, dev: &mut Device) -> Result<(), PollError> {
        match self.cfg.profile {
            DeviceProfile::UpsMib => {
                let s = self.session().await?;
                // upsOutputSource, upsEstimatedChargeRemaining, upsEstimatedMinutesRemaining,
                // upsSecondsOnBattery (RFC 1628).
                let vals = get_ints(
                    s,
                    &[
                        &[1, 3, 6, 1, 2, 1, 33, 1, 4, 1, 0],
                        &[1, 3, 6, 1, 2, 1, 33, 1, 2, 4, 0],
                        &[1, 3, 6, 1, 2, 1, 33, 1, 2, 3, 0],
                        &[1, 3, 6, 1, 2, 1, 33, 1, 2, 2, 0],
                    ],
                )
                .await?;
                let (source, charge, minutes, secs_on_battery) =
                    (vals[0], vals[1], vals[2], vals[3]);
                if !(1..=7).contains(&source) || !(0..=100).contains(&charge) || minutes < 0 {
                    return Err(PollError::BadAnswer(format!(
                        "UPS values out of range: source {source}, charge {charge}, minutes {minutes}"
                    )));
                }
                dev.ups = Some(Ups {
                    on_battery: source == 5 || secs_on_battery > 0,
                    charge_pct: charge as u32,
                    runtime_s: (minutes as u32).saturating_mul(60),
                });
            }
            DeviceProfile::VsatModem => {
                let oids = self
                    .cfg
                    .oids
                    .clone()
                    .ok_or_else(|| PollError::Local("vsat-modem without OIDs".into()))?;
                let s = self.session().await?;
                let scaled = |o: &ScaledOid| -> Result<(Vec<u64>, f64), PollError> {
                    Ok((parse_oid(&o.oid).map_err(PollError::Local)?, o.scale))
                };
                let mut list = vec![scaled(&oids.esno)?];
                for o in [&oids.rx_level, &oids.tx_power].into_iter().flatten() {
                    list.push(scaled(o)?);
                }
                let mut modem = Modem::default();
                let mut i = 0;
                let esno = get_number(s, &list[i].0).await? * list[i].1;
                modem.esno_db_x10 = to_x10(esno, "Es/No")?;
                if oids.rx_level.is_some() {
                    i += 1;
                    modem.rx_level_dbm_x10 = to_x10(
                        get_number(s, &list[i].0).await? * list[i].1,
                        "receive level",
                    )?;
                }
                if oids.tx_power.is_some() {
                    i += 1;
                    modem.tx_power_dbm_x10 = to_x10(
                        get_number(s, &list[i].0).await? * list[i].1,
                        "transmit power",
                    )?;
                }
                if let Some(m) = &oids.modcod {
                    let parts = parse_oid(m).map_err(PollError::Local)?;
                    modem.modcod = get_text(s, &parts).await?;
                }
                for (o, field, what) in [
                    (&oids.rx_rate, &mut modem.rx_rate_kbps, "receive rate"),
                    (&oids.tx_rate, &mut modem.tx_rate_kbps, "transmit rate"),
                ] {
                    if let Some(o) = o {
                        let (oid, scale) = scaled(o)?;
                        let kbps = get_number(s, &oid).await? * scale;
                        if !(kbps.is_finite() && (0.0..=1e8).contains(&kbps)) {
                            return Err(PollError::BadAnswer(format!(
                                "{what} {kbps} kbit/s is not a link rate"
                            )));
                        }
                        *field = kbps as u32;
                    }
                }
                dev.modem = Some(modem);
            }
            DeviceProfile::IfMib => {
                let s = self.session().await?;
                let names = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 2]).await?; // ifDescr
                if names.is_empty() {
                    return Err(PollError::BadAnswer("no interfaces in ifTable".into()));
                }
                let oper = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 8]).await?;
                let in_err = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 14]).await?;
                let out_err = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 20]).await?;
                let mut in_oct = walk(s, &[1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 6]).await?;
                let mut out_oct = walk(s, &[1, 3, 6, 1, 2, 1, 31, 1, 1, 1, 10]).await?;
                if in_oct.is_empty() {
                    // No ifXTable: fall back to the 32-bit counters.
                    in_oct = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 10]).await?;
                    out_oct = walk(s, &[1, 3, 6, 1, 2, 1, 2, 2, 1, 16]).await?;
                }
                let num = |rows: &[(u64, Val)], idx: u64| -> u64 {
                    rows.iter()
                        .find(|(i, _)| *i == idx)
                        .and_then(|(_, v)| v.as_u64())
                        .unwrap_or(0)
                };
                for (idx, name) in &names {
                    let Val::Text(name) = name else {
                        return Err(PollError::BadAnswer(format!(
                            "ifDescr.{idx} is not a string"
                        )));
                    };
                    dev.interfaces.push(DeviceInterface {
                        index: *idx as u32,
                        name: name.clone(),
                        oper_up: num(&oper, *idx) == 1,
                        in_octets: num(&in_oct, *idx),
                        out_octets: num(&out_oct, *idx),
                        in_errors: num(&in_err, *idx),
                        out_errors: num(&out_err, *idx),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(())
    }
}

fn to_x10(v: f64, what: &str) -> Result<i32, PollError> {
    if !v.is_finite() || v.abs() > 100_000.0 {
        return Err(PollError::BadAnswer(format!(
            "{what} value {v} is not plausible"
        )));
    }
    Ok((v * 10.0).round() as i32)
}

/// An owned SNMP value.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Int(i64),
    Text(String),
    Missing,
    Other(String),
}

impl Val {
    fn from(v: &Value<'_>) -> Val {
        match v {
            Value::Integer(i) => Val::Int(*i),
            Value::Counter32(c) | Value::Unsigned32(c) | Value::Timeticks(c) => {
                Val::Int(i64::from(*c))
            }
            Value::Counter64(c) => Val::Int(i64::try_from(*c).unwrap_or(i64::MAX)),
            Value::OctetString(s) => Val::Text(String::from_utf8_lossy(s).into_owned()),
            Value::NoSuchObject | Value::NoSuchInstance | Value::EndOfMibView | Value::Null => {
                Val::Missing
            }
            other => Val::Other(format!("{other:?}")),
        }
    }
    fn as_u64(&self) -> Option<u64> {
        match self {
            Val::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
}

fn snmp_err(e: snmp2::Error) -> PollError {
    match e {
        snmp2::Error::Send => PollError::Local("cannot send".into()),
        // A receive error on a connected UDP socket is an ICMP error: nothing listens there.
        snmp2::Error::Receive => PollError::NoAnswer("unreachable (ICMP error)".into()),
        other => PollError::BadAnswer(format!("{other:?}")),
    }
}

async fn get_vals(s: &mut AsyncSession, oids: &[&[u64]]) -> Result<Vec<Val>, PollError> {
    let owned: Vec<Oid<'static>> = oids.iter().map(|o| oid(o)).collect::<Result<_, _>>()?;
    let refs: Vec<&Oid<'_>> = owned.iter().collect();
    let pdu = s.get_many(&refs).await.map_err(snmp_err)?;
    if pdu.error_status != 0 {
        return Err(PollError::BadAnswer(format!(
            "SNMP error status {} at index {}",
            pdu.error_status, pdu.error_index
        )));
    }
    let mut out = Vec::with_capacity(oids.len());
    for (name, v) in pdu.varbinds {
        let _ = name;
        out.push(Val::from(&v));
    }
    if out.len() != oids.len() {
        return Err(PollError::BadAnswer(format!(
            "asked for {} values, got {}",
            oids.len(),
            out.len()
        )));
    }
    Ok(out)
}

async fn get_ints(s: &mut AsyncSession, oids: &[&[u64]]) -> Result<Vec<i64>, PollError> {
    let vals = get_vals(s, oids).await?;
    vals.iter()
        .zip(oids)
        .map(|(v, o)| match v {
            Val::Int(i) => Ok(*i),
            Val::Missing => Err(PollError::BadAnswer(format!("{} not found", dotted(o)))),
            other => Err(PollError::BadAnswer(format!(
                "{} should be an integer, got {other:?}",
                dotted(o)
            ))),
        })
        .collect()
}

/// A number: an integer, or a string holding a decimal number (some modems answer "9.2").
async fn get_number(s: &mut AsyncSession, o: &[u64]) -> Result<f64, PollError> {
    match get_vals(s, &[o]).await?.remove(0) {
        Val::Int(i) => Ok(i as f64),
        Val::Text(t) => t.trim().parse::<f64>().map_err(|_| {
            PollError::BadAnswer(format!("{} should be a number, got {t:?}", dotted(o)))
        }),
        Val::Missing => Err(PollError::BadAnswer(format!("{} not found", dotted(o)))),
        Val::Other(x) => Err(PollError::BadAnswer(format!(
            "{} should be a number, got {x}",
            dotted(o)
        ))),
    }
}

async fn get_text(s: &mut AsyncSession, o: &[u64]) -> Result<String, PollError> {
    match get_vals(s, &[o]).await?.remove(0) {
        Val::Int(i) => Ok(i.to_string()),
        Val::Text(t) => Ok(t.chars().take(64).collect()),
        Val::Missing => Err(PollError::BadAnswer(format!("{} not found", dotted(o)))),
        Val::Other(x) => Err(PollError::BadAnswer(format!(
            "{} should be a string, got {x}",
            dotted(o)
        ))),
    }
}

fn dotted(o: &[u64]) -> String {
    o.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// Walks a table column with GETBULK: (row index, value) until the column ends.
async fn walk(s: &mut AsyncSession, prefix: &[u64]) -> Result<Vec<(u64, Val)>, PollError> {
    let mut out = Vec::new();
    let mut cursor = prefix.to_vec();
    loop {
        let start = oid(&cursor)?;
        let pdu = s.getbulk(&[&start], 0, 16).await.map_err(snmp_err)?;
        if pdu.error_status != 0 {
            return Err(PollError::BadAnswer(format!(
                "SNMP error status {} walking {}",
                pdu.error_status,
                dotted(prefix)
            )));
        }
        let mut advanced = false;
        for (name, v) in pdu.varbinds {
            let parts = oid_parts(&name);
            if !parts.starts_with(prefix) || matches!(v, Value::EndOfMibView) {
                return Ok(out);
            }
            if parts <= cursor {
                return Err(PollError::BadAnswer(format!(
                    "agent returned OIDs out of order at {}",
                    dotted(&parts)
                )));
            }
            let index = parts.get(prefix.len()).copied().unwrap_or(0);
            out.push((index, Val::from(&v)));
            cursor = parts;
            advanced = true;
            if out.len() >= MAX_ROWS {
                return Ok(out);
            }
        }
        if !advanced {
            return Ok(out);
        }
    }
}

/// Polls every device concurrently; the slowest one costs at most its own timeout.
pub async fn poll_all(pollers: &mut [Poller]) -> Vec<Device> {
    futures_util::future::join_all(pollers.iter_mut().map(|p| p.poll())).await
}
