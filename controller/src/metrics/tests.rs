use super::*;
use tiandi_proto::{Device, DeviceStatus, Filesystem, Host, Interface, LinkStats, Modem, Report};
use tiandi_transfer::outbox::JobState;

fn sites() -> Sites {
    let sites = Sites::new(crate::config::Thresholds::default());
    let report = Report {
        seq: 1,
        host: Some(Host {
            cpu_permille: 250,
            mem_used_mib: 512,
            mem_total_mib: 1024,
            filesystems: vec![Filesystem {
                mount: "/var/\"lib\"".into(),
                used_mib: 900,
                total_mib: 1000,
                ..Default::default()
            }],
            interfaces: vec![Interface {
                name: "eth0".into(),
                rx_bytes: 10,
                tx_bytes: 20,
                ..Default::default()
            }],
            ..Default::default()
        }),
        link: Some(LinkStats {
            rtt_ms: 612,
            lost_packets: 3,
            sent_packets: 300,
            ..Default::default()
        }),
        devices: vec![Device {
            name: "modem".into(),
            profile: tiandi_proto::Profile::VsatModem as i32,
            status: DeviceStatus::Ok as i32,
            modem: Some(Modem {
                esno_db_x10: 85,
                modcod: "8PSK 2/3".into(),
                rx_rate_kbps: 4000,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    sites.insert("xz-001", "XZ", Some(report), 1_000);
    sites.set_agent_version("xz-001", "0.1.0");
    sites.insert("xz-002", "XZ", None, 1_000);
    sites.set_agent_version("xz-002", "0.1.0\"} 1\nevil 2");
    sites
}

fn render(groups: &[SiteSeries]) -> String {
    Metrics::new().render(&sites(), groups, WireTotals::default(), 0, 2_000)
}

#[test]
fn every_group_renders_its_families_with_site_and_province() {
    let text = render(&SiteSeries::ALL);
    for line in [
        r#"tiandi_site_up{site="xz-001",province="XZ"} 1"#,
        r#"tiandi_site_status{site="xz-001",province="XZ",status="up"} 1"#,
        r#"tiandi_site_info{site="xz-001",province="XZ",agent_version="0.1.0"} 1"#,
        r#"tiandi_site_link_rtt_seconds{site="xz-001",province="XZ"} 0.612"#,
        r#"tiandi_site_link_packets_lost_total{site="xz-001",province="XZ"} 3"#,
        r#"tiandi_site_filesystem_used_ratio{site="xz-001",province="XZ",mount="/var/\"lib\""} 0.9"#,
        r#"tiandi_site_modem_info{site="xz-001",province="XZ",modcod="8PSK 2/3"} 1"#,
        r#"tiandi_site_modem_receive_rate_bytes_per_second{site="xz-001",province="XZ"} 500000"#,
        r#"tiandi_site_device_up{site="xz-001",province="XZ",device="modem",profile="vsat-modem"} 1"#,
        r#"tiandi_site_alarms_raised_total{site="xz-001",province="XZ",alarm="rain-fade"} 0"#,
        r#"tiandi_site_alarms_raised_total{site="xz-002",province="XZ",alarm="site-down"} 0"#,
        r#"tiandi_site_network_receive_bytes_total{site="xz-001",province="XZ",interface="eth0"} 10"#,
        "# TYPE tiandi_site_link_packets_sent_total counter",
        "# TYPE tiandi_build_info gauge",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.contains(line), "missing {line}");
    }
    // A version that is not a plain version never reaches a label as given.
    assert!(text.contains(r#"site="xz-002",province="XZ",agent_version="invalid"} 1"#));
    assert!(!text.contains("evil"));
    // A site without a report has only what does not need one.
    assert!(!text.contains(r#"tiandi_site_cpu_ratio{site="xz-002""#));
}

#[test]
fn groups_turned_off_leave_their_families_out() {
    let text = render(&[SiteSeries::Status, SiteSeries::Alarms]);
    assert!(text.contains("tiandi_site_up{"));
    for family in [
        "tiandi_site_cpu_ratio",
        "tiandi_site_link_rtt_seconds",
        "tiandi_site_modem_esno_db",
        "tiandi_site_device_up",
        "tiandi_site_network_receive_bytes_total",
        "tiandi_site_path_state",
        "tiandi_site_class_path",
    ] {
        assert!(!text.contains(family), "{family} is out");
    }
}

#[test]
fn every_group_has_a_config_name_and_a_family() {
    // `[metrics] site_series` names each group; the example config lists them all.
    let names: Vec<String> = SiteSeries::ALL
        .iter()
        .map(|g| {
            serde_json::to_value(g)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "status",
            "host",
            "link",
            "modem",
            "ups",
            "devices",
            "interfaces",
            "alarms",
            "paths"
        ]
    );
    let example = include_str!("../../../config/controller.example.toml");
    let listed = example
        .lines()
        .find(|l| l.starts_with("site_series = "))
        .expect("site_series in the example config");
    for n in &names {
        assert!(
            listed.contains(&format!("\"{n}\"")),
            "{n} is not in {listed}"
        );
    }
    let text = render(&SiteSeries::ALL);
    for family in ["tiandi_site_path_state", "tiandi_site_class_path"] {
        assert!(text.contains(&format!("# TYPE {family} gauge")), "{family}");
    }
}

#[test]
fn a_dual_homed_site_shows_its_paths_and_a_single_homed_one_none() {
    use crate::paths::PathView;
    let sites = sites();
    let path = |name: &str, kind: &str, state: &str, rtt_ms: u32, loss_pct: f64| PathView {
        name: name.into(),
        kind: kind.into(),
        state: state.into(),
        rtt_ms,
        loss_pct,
        tx_kbps: 0,
        rx_kbps: 0,
        budget_kbps: 0,
        since_ms: 0,
        connected: false,
    };
    let uses = [("reports", "sky"), ("alarm", "sky"), ("bulk", "ground")]
        .into_iter()
        .map(|(c, p)| (c.to_string(), p.to_string()))
        .collect();
    let (_, alarms) = sites.set_paths(
        "xz-001",
        vec![
            path("ground", "ground", "down", 25, 0.0),
            path("sky", "sky", "up", 612, 1.5),
        ],
        uses,
        Vec::new(),
        1_500,
    );
    assert_eq!(alarms.len(), 1, "path-redundancy-lost raised");
    sites.set_path_connections("xz-001", &["sky".to_string()]);
    let text = Metrics::new().render(&sites, &SiteSeries::ALL, WireTotals::default(), 0, 2_000);
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tiandi_site_path_") || l.starts_with("tiandi_site_class_path"))
        .collect();
    assert_eq!(
        mine,
        [
            r#"tiandi_site_path_state{site="xz-001",province="XZ",path="ground",kind="ground"} 0"#,
            r#"tiandi_site_path_state{site="xz-001",province="XZ",path="sky",kind="sky"} 2"#,
            r#"tiandi_site_path_rtt_seconds{site="xz-001",province="XZ",path="ground"} 0.025"#,
            r#"tiandi_site_path_rtt_seconds{site="xz-001",province="XZ",path="sky"} 0.612"#,
            r#"tiandi_site_path_loss_ratio{site="xz-001",province="XZ",path="ground"} 0"#,
            r#"tiandi_site_path_loss_ratio{site="xz-001",province="XZ",path="sky"} 0.015"#,
            r#"tiandi_site_path_connected{site="xz-001",province="XZ",path="ground"} 0"#,
            r#"tiandi_site_path_connected{site="xz-001",province="XZ",path="sky"} 1"#,
            r#"tiandi_site_class_path{site="xz-001",province="XZ",class="alarm",path="sky"} 1"#,
            r#"tiandi_site_class_path{site="xz-001",province="XZ",class="bulk",path="ground"} 1"#,
            r#"tiandi_site_class_path{site="xz-001",province="XZ",class="reports",path="sky"} 1"#,
        ],
        "xz-002 has one path: no series"
    );
    assert!(text.contains(
        r#"tiandi_site_alarm{site="xz-001",province="XZ",alarm="path-redundancy-lost"} 1"#
    ));
}

#[test]
fn the_transfer_queue_counts_every_state_and_what_is_left_per_destination() {
    let job = |dest: &str, state: JobState, bytes: u64, acked: u64, rate: u64| {
        serde_json::from_value::<tiandi_transfer::outbox::JobStatus>(serde_json::json!({
            "id": "t", "dest": dest, "file": "f", "bytes": bytes, "priority": "normal",
            "state": state.as_str(), "acked_bytes": acked, "progress_pct": 0.0,
            "rate_bps": rate, "eta_s": null, "sent_bytes": 0, "attempts": 0,
            "window": null, "rate_limit_bps": null, "error": null, "receipt": null,
            "via": null, "relays_to": [], "forwarded": false, "created_ms": 0,
            "updated_ms": 0
        }))
        .unwrap()
    };
    let mut out = String::new();
    render_transfers(
        &mut out,
        &[
            job("gd-001", JobState::Sending, 1000, 400, 8000),
            job("gd-001", JobState::Queued, 500, 0, 0),
            job("gd-002", JobState::Delivered, 500, 500, 0),
        ],
    );
    assert!(out.contains("tiandi_transfers{state=\"sending\"} 1"));
    assert!(out.contains("tiandi_transfers{state=\"failed\"} 0"));
    assert!(out.contains("tiandi_transfer_remaining_bytes{dest=\"gd-001\"} 1100"));
    assert!(out.contains("tiandi_transfer_rate_bytes_per_second{dest=\"gd-001\"} 1000"));
    assert!(!out.contains("dest=\"gd-002\""));
}

#[test]
fn device_problems_and_reachability_and_unknown_ups_figures() {
    use tiandi_proto::{ObjectProblem, Probe, ProblemKind, Ups};
    let sites = Sites::new(crate::config::Thresholds::default());
    let report = Report {
        seq: 1,
        devices: vec![
            Device {
                name: "ups".into(),
                profile: tiandi_proto::Profile::UpsMib as i32,
                status: DeviceStatus::Ok as i32,
                ups: Some(Ups {
                    charge_pct: 0,
                    runtime_s: 600,
                    missing: tiandi_proto::UPS_CHARGE,
                    ..Default::default()
                }),
                problems: vec![
                    ObjectProblem {
                        name: "charge".into(),
                        kind: ProblemKind::NoSuchObject as i32,
                        ..Default::default()
                    },
                    ObjectProblem {
                        name: "battery_temperature".into(),
                        kind: ProblemKind::WrongType as i32,
                        ..Default::default()
                    },
                ],
                reach: Some(Probe {
                    ok: true,
                    rtt_us: 400,
                    ..Default::default()
                }),
                ..Default::default()
            },
            Device {
                name: "router".into(),
                profile: tiandi_proto::Profile::IfMib as i32,
                status: DeviceStatus::Timeout as i32,
                reach: Some(Probe {
                    ok: false,
                    error: "timeout".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Device {
                name: "switch".into(),
                status: DeviceStatus::Ok as i32,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    sites.insert("yn-005", "YN", None, 1_000);
    sites.on_report("yn-005", report, 1_000);
    let m = Metrics::new();
    m.device_events.with_label_values(&["major"]).inc_by(340);
    let text = m.render(&sites, &SiteSeries::ALL, WireTotals::default(), 0, 2_000);
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("tiandi_site_device_problems")
                || l.starts_with("tiandi_site_device_reachable")
                || l.starts_with("tiandi_site_ups_")
        })
        .collect();
    assert_eq!(
        mine,
        [
            r#"tiandi_site_ups_on_battery{site="yn-005",province="YN"} 0"#,
            r#"tiandi_site_ups_runtime_seconds{site="yn-005",province="YN"} 600"#,
            r#"tiandi_site_device_problems{site="yn-005",province="YN",device="ups"} 2"#,
            r#"tiandi_site_device_problems{site="yn-005",province="YN",device="router"} 0"#,
            r#"tiandi_site_device_problems{site="yn-005",province="YN",device="switch"} 0"#,
            r#"tiandi_site_device_reachable{site="yn-005",province="YN",device="ups"} 1"#,
            r#"tiandi_site_device_reachable{site="yn-005",province="YN",device="router"} 0"#,
        ],
        "an unknown charge is no 0 %; a device not checked has no reachability"
    );
    for line in [
        r#"tiandi_device_events_total{severity="major"} 340"#,
        r#"tiandi_device_events_total{severity="info"} 0"#,
        r#"tiandi_device_events_total{severity="critical"} 0"#,
        r#"tiandi_site_alarm{site="yn-005",province="YN",alarm="device-unreachable"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line}");
    }
    assert!(
        !text.contains("tiandi_device_events_total{site"),
        "no per-site label"
    );
}
