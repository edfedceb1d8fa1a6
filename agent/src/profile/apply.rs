//! What a device answered, read through its profile (free of I/O): typed fields, other
//! values, problems by name, alarms, and the device's status.

use tiandi_proto::{
    Device, DeviceAlarm, DeviceStatus, Modem, ObjectProblem, ObjectValue, ProblemKind, Severity,
    Ups,
};

use super::{AlarmRule, ObjType, Object, Profile, Role};

/// An SNMP value as it came, before the profile reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum Raw {
    /// INTEGER, Counter32, Gauge32/Unsigned32, TimeTicks, Counter64.
    Int(i128, &'static str),
    Text(Vec<u8>),
    Oid(String),
    /// Any other type (IpAddress, Opaque, …), described.
    Other(String),
}

/// One object's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Value(Raw),
    Problem(ProblemKind, String),
    /// The object has no OID for this device (a generic profile's, not configured).
    NotAsked,
}

/// A value read through its object: a number and, for an enum or a text, its text.
#[derive(Clone, Debug, PartialEq)]
struct Read {
    num: Option<f64>,
    text: String,
}

fn shown(b: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(b)
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    s.trim().to_string()
}

fn describe(r: &Raw) -> String {
    match r {
        Raw::Int(i, t) => format!("{t} {i}"),
        Raw::Text(b) => format!("OCTET STRING {:?}", shown(b)),
        Raw::Oid(o) => format!("OBJECT IDENTIFIER {o}"),
        Raw::Other(x) => x.clone(),
    }
}

/// Reads one answer as its object says; an error is (kind, detail).
fn read(o: &Object, raw: &Raw) -> Result<Read, (ProblemKind, String)> {
    let wrong = |want: &str| {
        Err((
            ProblemKind::WrongType,
            format!("expected {want}, got {}", describe(raw)),
        ))
    };
    let mut out = match (o.typ, raw) {
        (ObjType::Text, Raw::Text(b)) => Read {
            num: None,
            text: shown(b),
        },
        (ObjType::Text, Raw::Int(i, _)) => Read {
            num: None,
            text: i.to_string(),
        },
        (ObjType::Text, Raw::Oid(s)) => Read {
            num: None,
            text: s.clone(),
        },
        (ObjType::Text, _) => return wrong("a text"),
        (ObjType::Number, Raw::Text(b)) => match shown(b).parse::<f64>() {
            Ok(v) if v.is_finite() => Read {
                num: Some(v),
                text: String::new(),
            },
            _ => return wrong("a number"),
        },
        (_, Raw::Int(i, _)) => Read {
            num: Some(*i as f64),
            text: String::new(),
        },
        (ObjType::Number, _) => return wrong("a number"),
        _ => return wrong("an integer"),
    };
    if let Some(v) = out.num.as_mut() {
        if o.typ == ObjType::Enum {
            let key = (*v as i64).to_string();
            match o.labels.get(&key) {
                Some(l) => out.text = l.clone(),
                None => {
                    return Err((
                        ProblemKind::OutOfRange,
                        format!("{key} is none of its values"),
                    ));
                }
            }
        } else {
            *v *= o.scale;
        }
        if let Some([lo, hi]) = o.range
            && !(lo..=hi).contains(v)
        {
            return Err((
                ProblemKind::OutOfRange,
                format!("{} outside [{lo}, {hi}]", round(*v)),
            ));
        }
    }
    Ok(out)
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn x10(v: f64) -> i32 {
    (v * 10.0)
        .round()
        .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
}

fn holds(rule: &AlarmRule, r: &Read) -> Option<String> {
    let name = &rule.object;
    if !rule.is.is_empty() {
        let hit = rule.is.iter().any(|v| {
            (!r.text.is_empty() && *v == r.text)
                || r.num
                    .is_some_and(|n| v.parse::<f64>().is_ok_and(|x| x == n))
        });
        return hit.then(|| {
            if r.text.is_empty() {
                format!("{name} = {}", round(r.num.unwrap_or(0.0)))
            } else {
                format!("{name} = {}", r.text)
            }
        });
    }
    let n = r.num?;
    if let Some(b) = rule.below
        && n < b
    {
        return Some(format!("{name} {} below {b}", round(n)));
    }
    if let Some(a) = rule.above
        && n > a
    {
        return Some(format!("{name} {} above {a}", round(n)));
    }
    None
}

/// Fills `dev` (its name and kind set) from one answer per profile object, in the profile's
/// order. Interfaces, when the profile walks them, are the caller's.
pub fn apply(profile: &Profile, answers: &[Answer], dev: &mut Device) {
    dev.profile = profile.kind.wire() as i32;
    dev.profile_name = profile.name.clone();
    let mut ups = Ups {
        missing: tiandi_proto::UPS_CHARGE | tiandi_proto::UPS_RUNTIME,
        ..Default::default()
    };
    let mut modem = Modem {
        missing: tiandi_proto::MODEM_RX_LEVEL
            | tiandi_proto::MODEM_TX_POWER
            | tiandi_proto::MODEM_MODCOD,
        ..Default::default()
    };
    let mut seconds_on_battery = 0.0;
    let mut reads: Vec<Option<Read>> = Vec::with_capacity(profile.objects.len());
    let mut essential_bad: Vec<String> = Vec::new();
    let mut asked = 0usize;
    for (o, a) in profile.objects.iter().zip(answers) {
        let r = match a {
            Answer::NotAsked => {
                if o.essential {
                    essential_bad.push(format!("{}: no OID configured", o.name));
                }
                reads.push(None);
                continue;
            }
            Answer::Value(raw) => read(o, raw),
            Answer::Problem(k, d) => Err((*k, d.clone())),
        };
        asked += 1;
        let r = match r {
            Ok(r) => r,
            Err((kind, detail)) => {
                if o.essential {
                    let d = if detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({detail})")
                    };
                    essential_bad.push(format!("{}: {}{d}", o.name, kind.as_str()));
                }
                dev.problems.push(ObjectProblem {
                    name: o.name.clone(),
                    kind: kind as i32,
                    detail,
                    essential: o.essential,
                    ..Default::default()
                });
                reads.push(None);
                continue;
            }
        };
        let n = r.num.unwrap_or(0.0);
        match o.role {
            Some(Role::UpsChargePct) => {
                ups.charge_pct = n.clamp(0.0, 100.0) as u32;
                ups.missing &= !tiandi_proto::UPS_CHARGE;
            }
            Some(Role::UpsMinutesRemaining) => {
                ups.runtime_s = (n * 60.0).clamp(0.0, f64::from(u32::MAX)) as u32;
                ups.missing &= !tiandi_proto::UPS_RUNTIME;
            }
            Some(Role::UpsRuntimeS) => {
                ups.runtime_s = n.clamp(0.0, f64::from(u32::MAX)) as u32;
                ups.missing &= !tiandi_proto::UPS_RUNTIME;
            }
            Some(Role::UpsSecondsOnBattery) => seconds_on_battery = n,
            Some(Role::ModemEsnoDb) => modem.esno_db_x10 = x10(n),
            Some(Role::ModemRxLevelDbm) => {
                modem.rx_level_dbm_x10 = x10(n);
                modem.missing &= !tiandi_proto::MODEM_RX_LEVEL;
            }
            Some(Role::ModemTxPowerDbm) => {
                modem.tx_power_dbm_x10 = x10(n);
                modem.missing &= !tiandi_proto::MODEM_TX_POWER;
            }
            Some(Role::ModemModcod) => {
                modem.modcod = if r.text.is_empty() {
                    round(n).to_string()
                } else {
                    r.text.clone()
                };
                modem.missing &= !tiandi_proto::MODEM_MODCOD;
            }
            Some(Role::ModemRxRateKbps) => {
                modem.rx_rate_kbps = n.clamp(0.0, f64::from(u32::MAX)) as u32
            }
            Some(Role::ModemTxRateKbps) => {
                modem.tx_rate_kbps = n.clamp(0.0, f64::from(u32::MAX)) as u32
            }
            None => {
                let mut v = ObjectValue {
                    name: o.name.clone(),
                    text: r.text.clone(),
                    unit: o.unit.clone(),
                    ..Default::default()
                };
                if let Some(n) = r.num {
                    v.set_number(n);
                }
                dev.values.push(v);
            }
        }
        reads.push(Some(r));
    }
    for rule in &profile.alarms {
        let Some(i) = profile.objects.iter().position(|o| o.name == rule.object) else {
            continue;
        };
        if let Some(Some(r)) = reads.get(i)
            && let Some(detail) = holds(rule, r)
        {
            dev.alarms.push(DeviceAlarm {
                name: rule.name.clone(),
                severity: Severity::parse(&rule.severity).unwrap_or(Severity::Major) as i32,
                detail,
                ..Default::default()
            });
        }
    }
    match profile.kind {
        super::Kind::Ups => {
            ups.on_battery =
                seconds_on_battery > 0.0 || dev.alarms.iter().any(|a| a.name == "on-battery");
            dev.ups = Some(ups);
        }
        super::Kind::Modem => dev.modem = Some(modem),
        _ => {}
    }
    let answered = asked - dev.problems.len();
    if !essential_bad.is_empty() {
        dev.status = DeviceStatus::BadAnswer as i32;
        dev.error = format!("essential {}", essential_bad.join("; "));
    } else if asked > 0 && answered == 0 && !profile.interfaces {
        dev.status = DeviceStatus::BadAnswer as i32;
        dev.error = format!("answered none of the profile's {asked} objects");
    } else {
        dev.status = DeviceStatus::Ok as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profiles;

    fn int(i: i128) -> Answer {
        Answer::Value(Raw::Int(i, "INTEGER"))
    }
    fn missing() -> Answer {
        Answer::Problem(ProblemKind::NoSuchObject, String::new())
    }

    fn ups(answers: &[Answer]) -> Device {
        let all = Profiles::built_in();
        let p = all.get("ups-mib").unwrap();
        let mut d = Device {
            name: "ups".into(),
            ..Default::default()
        };
        apply(p, answers, &mut d);
        d
    }

    /// The UPS of the issue: battery status, charge and output source, nothing else. It is
    /// `ok`, on battery, its charge known and its runtime not, the rest listed as missing.
    #[test]
    fn a_partial_ups_reports_what_it_has() {
        // output_source, battery_status, charge, minutes, seconds_on_battery, temp, load
        let d = ups(&[
            int(5),
            int(2),
            int(76),
            missing(),
            Answer::Problem(ProblemKind::NoSuchInstance, String::new()),
            missing(),
            missing(),
        ]);
        assert_eq!(d.status, DeviceStatus::Ok as i32, "{}", d.error);
        let u = d.ups.as_ref().unwrap();
        assert!(u.on_battery);
        assert_eq!(u.charge_pct, 76);
        assert_eq!(u.missing, tiandi_proto::UPS_RUNTIME);
        let names: Vec<_> = d.problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "minutes_remaining",
                "seconds_on_battery",
                "battery_temperature",
                "output_load"
            ]
        );
        assert_eq!(d.problems[1].kind, ProblemKind::NoSuchInstance as i32);
        let values: Vec<_> = d
            .values
            .iter()
            .map(|v| (v.name.as_str(), v.text.as_str(), v.number()))
            .collect();
        assert_eq!(
            values,
            [
                ("output_source", "battery", Some(5.0)),
                ("battery_status", "batteryNormal", Some(2.0))
            ]
        );
        assert_eq!(
            d.alarms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["on-battery"]
        );
    }

    #[test]
    fn an_essential_object_missing_or_wrong_makes_it_a_bad_answer_and_keeps_the_rest() {
        let d = ups(&[
            missing(),
            int(3),
            int(40),
            int(12),
            int(0),
            int(25),
            int(30),
        ]);
        assert_eq!(d.status, DeviceStatus::BadAnswer as i32);
        assert!(
            d.error.contains("output_source: no-such-object"),
            "{}",
            d.error
        );
        assert_eq!(d.ups.as_ref().unwrap().charge_pct, 40);
        assert_eq!(d.ups.as_ref().unwrap().runtime_s, 720);
        assert!(d.alarms.iter().any(|a| a.name == "battery-low"));
        let d = ups(&[
            Answer::Value(Raw::Text(b"online".to_vec())),
            int(2),
            int(150),
            int(12),
            int(0),
            int(25),
            int(130),
        ]);
        assert_eq!(d.status, DeviceStatus::BadAnswer as i32);
        assert!(d.error.contains("wrong-type"), "{}", d.error);
        assert!(
            d.problems
                .iter()
                .any(|p| p.name == "charge" && p.kind == ProblemKind::OutOfRange as i32),
            "{:?}",
            d.problems
        );
        assert!(d.alarms.iter().any(|a| a.name == "ups-overload"));
        // An enum value the MIB does not define is out of range, and named.
        let d = ups(&[int(9), int(2), int(50), int(1), int(0), int(20), int(5)]);
        assert!(d.error.contains("9 is none of its values"), "{}", d.error);
    }

    #[test]
    fn a_modem_reads_decimal_strings_and_scales() {
        let all = Profiles::built_in();
        let mut p = all.get("vsat-modem").unwrap().clone();
        p.objects[0].scale = 0.1;
        let mut d = Device::default();
        apply(
            &p,
            &[
                int(92),
                Answer::Value(Raw::Text(b"-45.2".to_vec())),
                Answer::NotAsked,
                Answer::Value(Raw::Text(b"QPSK 3/4".to_vec())),
                Answer::Value(Raw::Int(8_000_000, "Gauge32")),
                Answer::NotAsked,
            ],
            &mut d,
        );
        // Scales come from the device's config (see snmp::for_device).
        let m = d.modem.unwrap();
        assert_eq!(m.esno_db_x10, 92);
        assert_eq!(m.rx_level_dbm_x10, -452);
        assert_eq!(m.modcod, "QPSK 3/4");
        assert_eq!(m.missing, tiandi_proto::MODEM_TX_POWER);
        assert!(d.problems.is_empty());
        assert_eq!(d.status, DeviceStatus::Ok as i32);
    }

    #[test]
    fn a_device_that_answers_nothing_is_a_bad_answer() {
        let d = ups(&[
            Answer::Problem(ProblemKind::EndOfMibView, String::new()),
            missing(),
            missing(),
            missing(),
            missing(),
            missing(),
            missing(),
        ]);
        assert_eq!(d.status, DeviceStatus::BadAnswer as i32);
        assert_eq!(d.problems.len(), 7);
    }

    #[test]
    fn numbers_travel_as_short_mantissas() {
        let mut v = ObjectValue::default();
        for (x, m, e) in [
            (76.0, 76, 0),
            (9.2, 92, -1),
            (-45.25, -4525, -2),
            (0.001, 1, -3),
        ] {
            v.set_number(x);
            assert_eq!((v.num, v.exp), (m, e), "{x}");
            assert!((v.number().unwrap() - x).abs() < 1e-12);
        }
    }
}
