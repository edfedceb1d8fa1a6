//! Named metrics of a report, for history queries and exports. Names are stable:
//! `report.seq`, `host.cpu_pct`, `host.load1`, `host.mem_used_pct`, `host.uptime_s`, `fs.<mount>.used_pct`,
//! `if.<name>.rx_bytes`, `link.rtt_ms`, `modem.esno_db`, `ups.on_battery`,
//! `dev.<device>.if.<name>.in_octets`, `dev.<device>.<value>` (each numeric object of a
//! device's profile that fills no typed field: `dev.ups.battery_temperature`), …
//!
//! A figure the device did not give (`Ups.missing`, `Modem.missing`) has no series in that
//! report: a gap in the chart, not a zero.

use crate::{DeviceStatus, MODEM_RX_LEVEL, MODEM_TX_POWER, Report, UPS_CHARGE, UPS_RUNTIME};

/// The names `dev.<device>.…` takes for itself: an object of that name has no series (it
/// would shadow the device's own).
const RESERVED: [&str; 2] = ["ok", "if"];

/// Every metric of a report as (name, value).
pub fn series(r: &Report) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::with_capacity(48);
    let mut put = |k: String, v: f64| out.push((k, v));
    put("report.seq".into(), r.seq as f64);
    if let Some(h) = &r.host {
        put("host.cpu_pct".into(), f64::from(h.cpu_permille) / 10.0);
        put("host.load1".into(), f64::from(h.load1_c) / 100.0);
        put("host.load5".into(), f64::from(h.load5_c) / 100.0);
        put("host.load15".into(), f64::from(h.load15_c) / 100.0);
        put("host.mem_used_mib".into(), h.mem_used_mib as f64);
        if h.mem_total_mib > 0 {
            put(
                "host.mem_used_pct".into(),
                100.0 * h.mem_used_mib as f64 / h.mem_total_mib as f64,
            );
        }
        put("host.uptime_s".into(), h.uptime_s as f64);
        for fs in &h.filesystems {
            put(
                format!("fs.{}.used_pct", fs.mount),
                f64::from(fs.used_permille()) / 10.0,
            );
            put(format!("fs.{}.used_mib", fs.mount), fs.used_mib as f64);
        }
        for i in &h.interfaces {
            put(format!("if.{}.rx_bytes", i.name), i.rx_bytes as f64);
            put(format!("if.{}.tx_bytes", i.name), i.tx_bytes as f64);
            put(format!("if.{}.rx_errors", i.name), i.rx_errors as f64);
            put(format!("if.{}.tx_errors", i.name), i.tx_errors as f64);
        }
    }
    if let Some(l) = &r.link {
        put("link.rtt_ms".into(), f64::from(l.rtt_ms));
        put("link.lost_packets".into(), l.lost_packets as f64);
        put("link.cwnd_bytes".into(), l.cwnd_bytes as f64);
        put("link.tx_bytes".into(), l.tx_bytes as f64);
        put("link.rx_bytes".into(), l.rx_bytes as f64);
    }
    for d in &r.devices {
        put(
            format!("dev.{}.ok", d.name),
            if d.status == DeviceStatus::Ok as i32 {
                1.0
            } else {
                0.0
            },
        );
        if let Some(m) = &d.modem {
            put("modem.esno_db".into(), f64::from(m.esno_db_x10) / 10.0);
            if m.missing & MODEM_RX_LEVEL == 0 {
                put(
                    "modem.rx_level_dbm".into(),
                    f64::from(m.rx_level_dbm_x10) / 10.0,
                );
            }
            if m.missing & MODEM_TX_POWER == 0 {
                put(
                    "modem.tx_power_dbm".into(),
                    f64::from(m.tx_power_dbm_x10) / 10.0,
                );
            }
            if m.rx_rate_kbps > 0 {
                put("modem.rx_rate_kbps".into(), f64::from(m.rx_rate_kbps));
            }
            if m.tx_rate_kbps > 0 {
                put("modem.tx_rate_kbps".into(), f64::from(m.tx_rate_kbps));
            }
        }
        if let Some(u) = &d.ups {
            put(
                "ups.on_battery".into(),
                if u.on_battery { 1.0 } else { 0.0 },
            );
            if u.missing & UPS_CHARGE == 0 {
                put("ups.charge_pct".into(), f64::from(u.charge_pct));
            }
            if u.missing & UPS_RUNTIME == 0 {
                put("ups.runtime_s".into(), f64::from(u.runtime_s));
            }
        }
        for v in &d.values {
            if let Some(n) = v.number().filter(|n| n.is_finite())
                && !v.name.is_empty()
                && !RESERVED.contains(&v.name.as_str())
            {
                put(format!("dev.{}.{}", d.name, v.name), n);
            }
        }
        for i in &d.interfaces {
            let p = format!("dev.{}.if.{}", d.name, i.name);
            put(format!("{p}.up"), if i.oper_up { 1.0 } else { 0.0 });
            put(format!("{p}.in_octets"), i.in_octets as f64);
            put(format!("{p}.out_octets"), i.out_octets as f64);
            put(format!("{p}.in_errors"), i.in_errors as f64);
            put(format!("{p}.out_errors"), i.out_errors as f64);
        }
    }
    out
}

/// One metric of a report.
pub fn value(r: &Report, name: &str) -> Option<f64> {
    series(r)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, Modem, ObjectValue, Ups};

    fn num(name: &str, v: f64, unit: &str) -> ObjectValue {
        let mut o = ObjectValue {
            name: name.into(),
            unit: unit.into(),
            ..Default::default()
        };
        o.set_number(v);
        o
    }

    #[test]
    fn numeric_values_are_series_and_missing_figures_are_gaps() {
        let r = Report {
            seq: 7,
            devices: vec![
                Device {
                    name: "ups".into(),
                    status: DeviceStatus::Ok as i32,
                    ups: Some(Ups {
                        charge_pct: 0,
                        runtime_s: 1800,
                        missing: UPS_CHARGE,
                        ..Default::default()
                    }),
                    values: vec![
                        num("battery_temperature", 31.5, "°C"),
                        num("output_load", 42.0, "%"),
                        ObjectValue {
                            name: "battery_status".into(),
                            text: "normal".into(),
                            ..Default::default()
                        },
                        num("ok", 3.0, ""),
                    ],
                    ..Default::default()
                },
                Device {
                    name: "modem".into(),
                    status: DeviceStatus::Ok as i32,
                    modem: Some(Modem {
                        esno_db_x10: 95,
                        rx_level_dbm_x10: -450,
                        missing: MODEM_TX_POWER,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = series(&r);
        let names: Vec<&str> = s.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(value(&r, "dev.ups.battery_temperature"), Some(31.5));
        assert_eq!(value(&r, "dev.ups.output_load"), Some(42.0));
        assert_eq!(
            value(&r, "dev.ups.ok"),
            Some(1.0),
            "the device's own, not the object's"
        );
        assert_eq!(names.iter().filter(|n| **n == "dev.ups.ok").count(), 1);
        assert!(
            !names.contains(&"dev.ups.battery_status"),
            "text has no series"
        );
        assert!(
            !names.contains(&"ups.charge_pct"),
            "an unknown charge is no 0 %"
        );
        assert_eq!(value(&r, "ups.runtime_s"), Some(1800.0));
        assert_eq!(value(&r, "modem.rx_level_dbm"), Some(-45.0));
        assert!(!names.contains(&"modem.tx_power_dbm"));
        assert_eq!(value(&r, "modem.esno_db"), Some(9.5));
    }
}
