//! Downsampling: several consecutive reports of one site merged into one that covers their
//! whole sequence range and time span. The spool uses it to keep 30 days of history inside its
//! disk quota instead of dropping the oldest reports.
//!
//! Rules: gauges are averaged (CPU, load, memory, filesystem use, modem figures, UPS charge),
//! counters take the last value (bytes, errors, uptime), alarms are kept if any sample had them
//! (on battery), the worst sample wins where it matters for alarms (lowest Es/No, highest
//! filesystem use is kept as the maximum), and device status is the last one.
//!
//! A device's profile objects (`values`) are those of the newest report, their numbers over the
//! samples: averaged, except a number that never went down (a counter, an uptime), which keeps
//! its last value. Its problems and reachability are the newest report's; its alarms are the
//! newest report's and any other that held in an earlier sample. A figure the device did not
//! give (`missing`) is left out of averages, and is missing in the merged report only if no
//! sample gave it. The site's events are every sample's, in order (a flood of them folded into
//! one summary per device and name past [`MAX_MERGED_EVENTS`]).

use crate::{
    Device, DeviceEvent, Filesystem, Host, MODEM_RX_LEVEL, MODEM_TX_POWER, Report, UPS_CHARGE,
    UPS_RUNTIME,
};

/// The most events a merged report carries one by one; past it, events of one device and
/// name are folded into one (`count`), and then only the newest are kept.
pub const MAX_MERGED_EVENTS: usize = 128;

fn avg(sum: i128, n: i128) -> i128 {
    if n == 0 { 0 } else { sum / n }
}

/// The average of (value, weight) pairs; `None` for none.
fn weighted(v: &[(i128, i128)]) -> Option<i128> {
    let n: i128 = v.iter().map(|(_, w)| w).sum();
    (n > 0).then(|| avg(v.iter().map(|(x, w)| x * w).sum(), n))
}

/// Every event in order; past [`MAX_MERGED_EVENTS`], one per device, name and severity (the
/// first's time and detail, the counts summed), in order of their first, then the newest.
fn merge_events(all: impl Iterator<Item = DeviceEvent>) -> Vec<DeviceEvent> {
    let all: Vec<DeviceEvent> = all.collect();
    if all.len() <= MAX_MERGED_EVENTS {
        return all;
    }
    let mut folded: Vec<DeviceEvent> = Vec::new();
    for e in all {
        match folded
            .iter_mut()
            .find(|f| f.device == e.device && f.name == e.name && f.severity == e.severity)
        {
            Some(f) => f.count = f.count.max(1).saturating_add(e.count.max(1)),
            None => folded.push(e),
        }
    }
    let extra = folded.len().saturating_sub(MAX_MERGED_EVENTS);
    folded.drain(..extra);
    folded
}

/// Merges `reports` (ascending sequence order, at least one) into one report. `None` for a
/// group holding a province's [`crate::Federation`]: summaries and alarm events are not
/// figures to average, and folding many into one could outgrow a frame.
pub fn merge(reports: &[Report]) -> Option<Report> {
    if reports.len() > 1 && reports.iter().any(|r| r.federation.is_some()) {
        return None;
    }
    let first = reports.first()?;
    let last = reports.last()?;
    let samples: u32 = reports.iter().map(|r| r.samples.max(1)).sum();
    let end_ms = reports
        .iter()
        .map(|r| r.taken_ms + i64::from(r.span_ms))
        .max()
        .unwrap_or(last.taken_ms);
    let mut out = last.clone();
    out.seq = first.seq;
    out.seq_last = last.last_seq();
    out.taken_ms = first.taken_ms;
    out.span_ms = u32::try_from(end_ms - first.taken_ms).unwrap_or(u32::MAX);
    out.samples = samples;

    // Host gauges: weighted average over the samples each report stands for.
    let hosts: Vec<(&Host, i128)> = reports
        .iter()
        .filter_map(|r| r.host.as_ref().map(|h| (h, i128::from(r.samples.max(1)))))
        .collect();
    if let Some(h) = out.host.as_mut() {
        let n: i128 = hosts.iter().map(|(_, w)| w).sum();
        let wavg = |f: &dyn Fn(&Host) -> u64| -> u64 {
            avg(hosts.iter().map(|(h, w)| i128::from(f(h)) * w).sum(), n) as u64
        };
        h.cpu_permille = wavg(&|h| u64::from(h.cpu_permille)) as u32;
        h.load1_c = wavg(&|h| u64::from(h.load1_c)) as u32;
        h.load5_c = wavg(&|h| u64::from(h.load5_c)) as u32;
        h.load15_c = wavg(&|h| u64::from(h.load15_c)) as u32;
        h.mem_used_mib = wavg(&|h| h.mem_used_mib);
        for fs in &mut h.filesystems {
            fs.used_mib = hosts
                .iter()
                .flat_map(|(h, _)| h.filesystems.iter())
                .filter(|f: &&Filesystem| f.mount == fs.mount)
                .map(|f| f.used_mib)
                .max()
                .unwrap_or(fs.used_mib);
        }
    }

    for d in &mut out.devices {
        let same: Vec<(&Device, i128)> = reports
            .iter()
            .flat_map(|r| {
                r.devices
                    .iter()
                    .map(move |d| (d, i128::from(r.samples.max(1))))
            })
            .filter(|(x, _)| x.name == d.name)
            .collect();
        if let Some(ups) = d.ups.as_mut() {
            let ups_all: Vec<_> = same
                .iter()
                .filter_map(|(x, w)| x.ups.as_ref().map(|u| (u, *w)))
                .collect();
            ups.on_battery = ups_all.iter().any(|(u, _)| u.on_battery);
            let charges: Vec<_> = ups_all
                .iter()
                .filter(|(u, _)| u.missing & UPS_CHARGE == 0)
                .map(|(u, w)| (i128::from(u.charge_pct), *w))
                .collect();
            let runtimes: Vec<u32> = ups_all
                .iter()
                .filter(|(u, _)| u.missing & UPS_RUNTIME == 0)
                .map(|(u, _)| u.runtime_s)
                .collect();
            ups.missing &= !(UPS_CHARGE | UPS_RUNTIME);
            match weighted(&charges) {
                Some(c) => ups.charge_pct = c as u32,
                None => {
                    ups.charge_pct = 0;
                    ups.missing |= UPS_CHARGE;
                }
            }
            match runtimes.iter().min() {
                Some(r) => ups.runtime_s = *r,
                None => {
                    ups.runtime_s = 0;
                    ups.missing |= UPS_RUNTIME;
                }
            }
        }
        if let Some(m) = d.modem.as_mut() {
            let all: Vec<_> = same
                .iter()
                .filter_map(|(x, w)| x.modem.as_ref().map(|m| (m, *w)))
                .collect();
            m.esno_db_x10 = all.iter().map(|(m, _)| m.esno_db_x10).min().unwrap_or(0);
            for (bit, get, set) in [
                (
                    MODEM_RX_LEVEL,
                    (|m: &crate::Modem| m.rx_level_dbm_x10) as fn(&crate::Modem) -> i32,
                    (|m: &mut crate::Modem, v| m.rx_level_dbm_x10 = v)
                        as fn(&mut crate::Modem, i32),
                ),
                (
                    MODEM_TX_POWER,
                    |m: &crate::Modem| m.tx_power_dbm_x10,
                    |m: &mut crate::Modem, v| m.tx_power_dbm_x10 = v,
                ),
            ] {
                let known: Vec<_> = all
                    .iter()
                    .filter(|(m, _)| m.missing & bit == 0)
                    .map(|(m, w)| (i128::from(get(m)), *w))
                    .collect();
                match weighted(&known) {
                    Some(v) => {
                        set(m, v as i32);
                        m.missing &= !bit;
                    }
                    None => {
                        set(m, 0);
                        m.missing |= bit;
                    }
                }
            }
        }
        for v in d.values.iter_mut().filter(|v| v.has_num) {
            let nums: Vec<(f64, f64)> = same
                .iter()
                .flat_map(|(x, w)| {
                    x.values
                        .iter()
                        .filter(|o| o.name == v.name)
                        .filter_map(move |o| o.number().map(|n| (n, *w as f64)))
                })
                .filter(|(n, _)| n.is_finite())
                .collect();
            let never_down = nums.windows(2).all(|p| p[1].0 >= p[0].0);
            let n: f64 = nums.iter().map(|(_, w)| w).sum();
            if !never_down && n > 0.0 {
                let mean = nums.iter().map(|(x, w)| x * w).sum::<f64>() / n;
                // One decimal more than the device gave, no more (a short varint).
                let d = 10f64.powi((1 - v.exp).clamp(0, 6));
                v.set_number((mean * d).round() / d);
            }
        }
        let mut alarms = d.alarms.clone();
        for (x, _) in &same {
            for a in &x.alarms {
                if !alarms.iter().any(|b| b.name == a.name) {
                    alarms.push(a.clone());
                }
            }
        }
        d.alarms = alarms;
    }
    out.events = merge_events(reports.iter().flat_map(|r| r.events.iter().cloned()));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Modem, Ups};

    fn report(seq: u64, cpu: u32, esno: i32, on_battery: bool) -> Report {
        Report {
            seq,
            taken_ms: seq as i64 * 10_000,
            host: Some(Host {
                cpu_permille: cpu,
                ..Default::default()
            }),
            devices: vec![
                Device {
                    name: "modem".into(),
                    modem: Some(Modem {
                        esno_db_x10: esno,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "ups".into(),
                    ups: Some(Ups {
                        on_battery,
                        charge_pct: 100,
                        runtime_s: 600,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn merged_report_covers_range_and_keeps_alarms() {
        let rs = vec![
            report(10, 100, 80, false),
            report(11, 300, 20, true),
            report(12, 200, 90, false),
        ];
        let m = merge(&rs).unwrap();
        assert_eq!((m.seq, m.seq_last), (10, 12));
        assert_eq!(m.samples, 3);
        assert_eq!(m.taken_ms, 100_000);
        assert_eq!(m.span_ms, 20_000);
        assert_eq!(m.host.as_ref().unwrap().cpu_permille, 200);
        assert_eq!(m.devices[0].modem.as_ref().unwrap().esno_db_x10, 20);
        assert!(m.devices[1].ups.as_ref().unwrap().on_battery);
    }

    #[test]
    fn merging_merged_reports_weights_by_samples() {
        let a = merge(&[report(1, 100, 0, false), report(2, 100, 0, false)]).unwrap();
        let b = report(3, 400, 0, false);
        let m = merge(&[a, b]).unwrap();
        assert_eq!((m.seq, m.seq_last, m.samples), (1, 3, 3));
        assert_eq!(m.host.unwrap().cpu_permille, 200);
    }

    fn ups_report(
        seq: u64,
        charge: Option<u32>,
        load: f64,
        uptime: f64,
        alarm: Option<&str>,
    ) -> Report {
        let mut load_v = crate::ObjectValue {
            name: "output_load".into(),
            unit: "%".into(),
            ..Default::default()
        };
        load_v.set_number(load);
        let mut up = crate::ObjectValue {
            name: "uptime".into(),
            unit: "s".into(),
            ..Default::default()
        };
        up.set_number(uptime);
        Report {
            seq,
            taken_ms: seq as i64 * 10_000,
            devices: vec![Device {
                name: "ups".into(),
                ups: Some(Ups {
                    charge_pct: charge.unwrap_or(0),
                    runtime_s: 0,
                    missing: UPS_RUNTIME | if charge.is_none() { UPS_CHARGE } else { 0 },
                    ..Default::default()
                }),
                values: vec![
                    load_v,
                    up,
                    crate::ObjectValue {
                        name: "battery_status".into(),
                        text: if alarm.is_some() { "low" } else { "normal" }.into(),
                        ..Default::default()
                    },
                ],
                problems: vec![crate::ObjectProblem {
                    name: format!("minutes_remaining_{seq}"),
                    kind: crate::ProblemKind::NoSuchObject as i32,
                    ..Default::default()
                }],
                alarms: alarm
                    .map(|a| crate::DeviceAlarm {
                        name: a.into(),
                        severity: crate::Severity::Critical as i32,
                        detail: "battery_status = low".into(),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                reach: Some(crate::Probe {
                    target: "ups".into(),
                    ok: true,
                    rtt_us: seq as u32,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            events: vec![crate::DeviceEvent {
                device: "router".into(),
                name: "link-down".into(),
                severity: crate::Severity::Major as i32,
                at_ms: seq as i64,
                count: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_merge_keeps_the_newest_objects_averages_gauges_and_leaves_unknowns_out() {
        let m = merge(&[
            ups_report(1, Some(80), 40.0, 100.0, Some("battery-low")),
            ups_report(2, None, 50.0, 110.0, None),
            ups_report(3, Some(60), 45.0, 120.0, None),
        ])
        .unwrap();
        let d = &m.devices[0];
        let u = d.ups.as_ref().unwrap();
        assert_eq!(u.charge_pct, 70, "the two known charges, not the unknown 0");
        assert_eq!(u.missing, UPS_RUNTIME, "no sample knew the runtime");
        let v = |n: &str| d.values.iter().find(|v| v.name == n).unwrap();
        assert_eq!(v("output_load").number(), Some(45.0), "a gauge: averaged");
        assert_eq!(
            v("uptime").number(),
            Some(120.0),
            "never went down: the last"
        );
        assert_eq!(v("battery_status").text, "normal", "the newest text");
        assert_eq!(v("output_load").unit, "%");
        assert_eq!(d.problems.len(), 1);
        assert_eq!(
            d.problems[0].name, "minutes_remaining_3",
            "the newest problems"
        );
        assert_eq!(
            d.reach.as_ref().unwrap().rtt_us,
            3,
            "the newest reachability"
        );
        assert_eq!(
            d.alarms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["battery-low"],
            "an alarm of any sample is kept, like on-battery"
        );
        assert_eq!(m.events.len(), 3, "every sample's events");
        assert_eq!(m.events[2].at_ms, 3);
        // Merged again (a coarser level): still the same.
        let again = merge(&[m.clone(), ups_report(4, Some(40), 45.0, 130.0, None)]).unwrap();
        assert_eq!(
            again.devices[0].ups.as_ref().unwrap().charge_pct,
            62,
            "weighted by samples"
        );
        assert_eq!(again.events.len(), 4);
        assert_eq!(again.devices[0].alarms.len(), 1);
    }

    #[test]
    fn a_province_s_forwarded_reports_are_never_merged() {
        let mut a = report(1, 100, 120, false);
        let b = report(2, 200, 120, false);
        a.federation = Some(crate::Federation {
            alarms: vec![crate::AlarmChange {
                at_ms: 1,
                site_id: "sc-001".into(),
                alarm: "site-down".into(),
                state: "raised".into(),
                detail: String::new(),
            }],
            ..Default::default()
        });
        assert!(
            merge(&[a.clone(), b.clone()]).is_none(),
            "alarm events are not averaged away"
        );
        assert_eq!(
            merge(std::slice::from_ref(&a)).unwrap().federation,
            a.federation
        );
        assert!(merge(&[b.clone(), b]).is_some());
    }

    #[test]
    fn a_flood_of_events_is_folded_into_summaries() {
        let mut rs: Vec<Report> = (1..=200)
            .map(|s| ups_report(s, Some(90), 10.0, 1.0, None))
            .collect();
        rs[7].events[0].name = "link-up".into();
        rs[7].events[0].severity = crate::Severity::Info as i32;
        let m = merge(&rs).unwrap();
        assert_eq!(m.events.len(), 2, "{:?}", m.events);
        assert_eq!(
            (
                m.events[0].name.as_str(),
                m.events[0].count,
                m.events[0].at_ms
            ),
            ("link-down", 199, 1)
        );
        assert_eq!(
            (m.events[1].name.as_str(), m.events[1].count),
            ("link-up", 1)
        );
    }
}
