//! Downsampling: several consecutive reports of one site merged into one that covers their
//! whole sequence range and time span. The spool uses it to keep 30 days of history inside its
//! disk quota instead of dropping the oldest reports.
//!
//! Rules: gauges are averaged (CPU, load, memory, filesystem use, modem figures, UPS charge),
//! counters take the last value (bytes, errors, uptime), alarms are kept if any sample had them
//! (on battery), the worst sample wins where it matters for alarms (lowest Es/No, highest
//! filesystem use is kept as the maximum), and device status is the last one.

use crate::{Device, Filesystem, Host, Report};

fn avg(sum: i128, n: i128) -> i128 {
    if n == 0 { 0 } else { sum / n }
}

/// Merges `reports` (ascending sequence order, at least one) into one report.
pub fn merge(reports: &[Report]) -> Option<Report> {
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
            let n: i128 = ups_all.iter().map(|(_, w)| w).sum();
            ups.on_battery = ups_all.iter().any(|(u, _)| u.on_battery);
            ups.charge_pct = avg(
                ups_all
                    .iter()
                    .map(|(u, w)| i128::from(u.charge_pct) * w)
                    .sum(),
                n,
            ) as u32;
            ups.runtime_s = ups_all.iter().map(|(u, _)| u.runtime_s).min().unwrap_or(0);
        }
        if let Some(m) = d.modem.as_mut() {
            let all: Vec<_> = same
                .iter()
                .filter_map(|(x, w)| x.modem.as_ref().map(|m| (m, *w)))
                .collect();
            let n: i128 = all.iter().map(|(_, w)| w).sum();
            m.esno_db_x10 = all.iter().map(|(m, _)| m.esno_db_x10).min().unwrap_or(0);
            m.rx_level_dbm_x10 = avg(
                all.iter()
                    .map(|(m, w)| i128::from(m.rx_level_dbm_x10) * w)
                    .sum(),
                n,
            ) as i32;
            m.tx_power_dbm_x10 = avg(
                all.iter()
                    .map(|(m, w)| i128::from(m.tx_power_dbm_x10) * w)
                    .sum(),
                n,
            ) as i32;
        }
    }
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
}
