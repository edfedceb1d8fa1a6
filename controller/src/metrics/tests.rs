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
    ] {
        assert!(!text.contains(family), "{family} is out");
    }
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
