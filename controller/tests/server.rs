//! The controller's QUIC side against a hand-driven site over real QUIC on loopback: the
//! session protocol (Hello, Welcome, reports, acknowledgements once durable), exactly-once
//! storage across a reconnect, and the refusals a wrong peer gets, each with its code.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tiandi_controller::{Config, Controller, Core};
use tiandi_link::pki::CONTROLLER_NAME;
use tiandi_link::{FrameReader, FrameWriter, LinkProfile};
use tiandi_proto::{Body, Hello, Report, codes};

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = common::config(dir);
    cfg.conference.enabled = false;
    cfg
}

/// A site's credentials, issued directly by the controller's CA.
struct Site {
    id: String,
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

fn site(core: &Core, id: &str) -> Site {
    let (key_pem, csr) = tiandi_link::pki::site_key_and_csr(id).unwrap();
    let issued = core.issue_direct(id, "GS", &csr).unwrap();
    Site {
        id: id.into(),
        key_pem,
        cert_pem: issued.cert_pem,
        ca_pem: core.ca.cert_pem().to_string(),
    }
}

async fn connect(s: &Site, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let tls = tiandi_link::tls::site_client_tls(&s.ca_pem, &s.cert_pem, &s.key_pem).unwrap();
    let cfg = tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport_config().into())
        .unwrap();
    let ep = tiandi_link::client_endpoint(addr).unwrap();
    let conn = ep
        .connect_with(cfg, addr, CONTROLLER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Opens the report stream and says Hello as `claim`, version `major`.
async fn hello(conn: &quinn::Connection, claim: &str, major: u32) -> (FrameWriter, FrameReader) {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    w.send(Body::Hello(Hello {
        site_id: claim.into(),
        major,
        minor: tiandi_proto::MINOR,
        agent_version: "test".into(),
        interval_ms: 10_000,
        epoch: 0,
        path: String::new(),
    }))
    .await
    .unwrap();
    (w, FrameReader::new(recv))
}

fn report(seq: u64) -> Body {
    Body::Report(Report {
        seq,
        taken_ms: tiandi_link::clock::now_ms() - 1000 + seq as i64,
        ..Default::default()
    })
}

async fn next(r: &mut FrameReader) -> Body {
    tokio::time::timeout(Duration::from_secs(10), r.recv())
        .await
        .expect("an answer within 10 s")
        .expect("a frame")
        .expect("the stream is open")
}

/// The application close code of a connection the controller closed.
async fn closed_with(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed within 10 s")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_stored_once_and_acknowledged_across_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let s = site(&ctl.core, "gs-001");

    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    let Body::Welcome(wel) = next(&mut r).await else {
        panic!("expected Welcome");
    };
    assert_eq!((wel.acked_through, wel.acked_ranges.len()), (0, 0));
    for seq in [1, 2, 3, 2] {
        w.send(report(seq)).await.unwrap();
    }
    let mut acked = Vec::new();
    for _ in 0..4 {
        let Body::Ack(a) = next(&mut r).await else {
            panic!("expected Ack");
        };
        acked.push((a.first, a.last));
    }
    assert_eq!(
        acked,
        vec![(1, 1), (2, 2), (3, 3), (2, 2)],
        "a duplicate is acknowledged too"
    );
    conn.close(0u32.into(), b"bye");

    // Reconnect: the Welcome says what is held, and a report sent again is not stored twice.
    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    let Body::Welcome(wel) = next(&mut r).await else {
        panic!("expected Welcome");
    };
    assert_eq!(wel.acked_through, 3);
    w.send(report(3)).await.unwrap();
    w.send(report(4)).await.unwrap();
    for want in [3, 4] {
        let Body::Ack(a) = next(&mut r).await else {
            panic!("expected Ack");
        };
        assert_eq!(a.first, want);
    }
    assert_eq!(
        ctl.core.metrics.reports.get(),
        4,
        "reports 1..=4, each once"
    );
    assert_eq!(ctl.core.metrics.duplicates.get(), 2);
    let st = ctl.core.store.seq_state("gs-001").unwrap();
    assert_eq!(st.acked_through, 4);
    assert!(ctl.core.sites.get("gs-001").unwrap().connected);

    // A second connection of the same site supersedes the first.
    let newer = connect(&s, ctl.quic_addr).await.unwrap();
    let (_w2, mut r2) = hello(&newer, &s.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r2).await, Body::Welcome(_)));
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::SHUTDOWN));
    assert!(reason.contains("superseded"), "{reason}");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_peer_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let a = site(&ctl.core, "gs-001");
    site(&ctl.core, "gs-002");

    // A site that claims to be another.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let _s = hello(&conn, "gs-002", tiandi_proto::MAJOR).await;
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::IDENTITY));
    assert!(
        reason.contains("gs-001") && reason.contains("gs-002"),
        "{reason}"
    );

    // A major version the controller does not speak.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let _s = hello(&conn, &a.id, tiandi_proto::MAJOR + 1).await;
    let (code, _) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::VERSION));

    // A report with no sequence number.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &a.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    w.send(report(0)).await.unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("sequence"), "{reason}");
    assert!(ctl.core.metrics.protocol_errors.get() >= 2);

    // A revoked site does not get past the handshake, and its live connection is closed.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let (_w, mut r) = hello(&conn, &a.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    ctl.core.registry.revoke("gs-001").unwrap();
    // The session watches the registry and may close the connection itself first.
    let _ = ctl.core.disconnect("gs-001", codes::REVOKED, "revoked");
    let (code, _) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::REVOKED));
    // rustls may finish the client side before the server's verdict arrives: then the
    // connection fails right after, with the same reason.
    let refused = match connect(&a, ctl.quic_addr).await {
        Err(e) => e,
        Ok(c) => tokio::time::timeout(Duration::from_secs(10), c.closed())
            .await
            .expect("closed within 10 s")
            .to_string(),
    };
    assert!(refused.contains("Revoked"), "{refused}");
    ctl.shutdown().await;
}

/// A minor-2 report: a partial UPS, an unreachable router, a modem that pings but does not
/// answer SNMP, a failed next hop, and two device events (one a summarised flood).
fn partial_report(seq: u64) -> Report {
    use tiandi_proto::{
        Device, DeviceAlarm, DeviceEvent, DeviceStatus, ObjectProblem, ObjectValue, Probe,
        ProbeKind, ProblemKind, Profile, Severity, UPS_RUNTIME, Ups,
    };
    let probe = |target: &str, ok: bool, rtt_us: u32, error: &str| Probe {
        target: target.into(),
        kind: ProbeKind::Icmp as i32,
        ok,
        rtt_us,
        error: error.into(),
        ..Default::default()
    };
    let mut load = ObjectValue {
        name: "output_load".into(),
        unit: "%".into(),
        ..Default::default()
    };
    load.set_number(112.0);
    let now = tiandi_link::clock::now_ms();
    Report {
        seq,
        taken_ms: now - 500,
        devices: vec![
            Device {
                name: "ups".into(),
                profile: Profile::UpsMib as i32,
                profile_name: "ups-mib".into(),
                status: DeviceStatus::Ok as i32,
                ups: Some(Ups {
                    on_battery: true,
                    charge_pct: 35,
                    missing: UPS_RUNTIME,
                    ..Default::default()
                }),
                values: vec![load],
                problems: vec![ObjectProblem {
                    name: "minutes_remaining".into(),
                    kind: ProblemKind::NoSuchObject as i32,
                    ..Default::default()
                }],
                alarms: vec![
                    DeviceAlarm {
                        name: "battery-low".into(),
                        severity: Severity::Critical as i32,
                        detail: "battery_status = low".into(),
                        ..Default::default()
                    },
                    DeviceAlarm {
                        name: "ups-overload".into(),
                        severity: Severity::Major as i32,
                        detail: "output_load = 112".into(),
                        ..Default::default()
                    },
                ],
                reach: Some(probe("ups", true, 800, "")),
                ..Default::default()
            },
            Device {
                name: "router".into(),
                profile: Profile::IfMib as i32,
                status: DeviceStatus::Timeout as i32,
                error: "no answer within 2000 ms".into(),
                reach: Some(probe("router", false, 0, "timeout")),
                ..Default::default()
            },
            Device {
                name: "camera".into(),
                profile: Profile::Other as i32,
                profile_name: "acme-camera".into(),
                status: DeviceStatus::Timeout as i32,
                error: "no answer within 2000 ms".into(),
                reach: Some(probe("camera", true, 400, "")),
                ..Default::default()
            },
        ],
        events: vec![
            DeviceEvent {
                device: "router".into(),
                name: "link-down".into(),
                severity: Severity::Major as i32,
                at_ms: now - 2000,
                count: 340,
                detail: "ifIndex 1".into(),
                ..Default::default()
            },
            DeviceEvent {
                device: "ups".into(),
                name: "on-battery".into(),
                severity: Severity::Critical as i32,
                at_ms: now - 1000,
                count: 1,
                inform: true,
                ..Default::default()
            },
        ],
        probes: vec![probe("next-hop", false, 0, "timeout")],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_events_and_partial_answers_reach_the_noc() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let s = site(&ctl.core, "gs-002");
    let mut live = ctl.core.events.subscribe();

    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    // The same report twice: its events count once.
    for _ in 0..2 {
        w.send(Body::Report(partial_report(1))).await.unwrap();
        assert!(matches!(next(&mut r).await, Body::Ack(_)));
    }

    // The live stream: each event as it came, the flood as one.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("an event within 5 s")
            .unwrap();
        let v = serde_json::to_value(&ev).unwrap();
        if v["type"] == "device-event" {
            seen.push(v);
        }
    }
    assert_eq!(seen[0]["site_id"], "gs-002");
    assert_eq!(seen[0]["province"], "GS");
    assert_eq!(
        (&seen[0]["device"], &seen[0]["name"], &seen[0]["count"]),
        (&"router".into(), &"link-down".into(), &340.into())
    );
    assert_eq!(seen[0]["severity"], "major");
    assert_eq!(
        (&seen[1]["name"], &seen[1]["inform"]),
        (&"on-battery".into(), &true.into())
    );

    // The site's answer: its events, newest first; its devices whole; its conditions.
    let api = format!("http://{}", ctl.api_addr);
    let read = std::fs::read_to_string(ctl.core.config.data_dir.join("read.token")).unwrap();
    let v: serde_json::Value = tokio::task::spawn_blocking(move || {
        ureq::get(format!("{api}/api/sites/gs-002"))
            .header("Authorization", &format!("Bearer {}", read.trim()))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    })
    .await
    .unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "once each: {v}");
    assert_eq!(events[0]["name"], "on-battery");
    assert_eq!(
        (&events[1]["name"], &events[1]["count"]),
        (&"link-down".into(), &340.into())
    );
    let ups = &v["latest"]["devices"][0];
    assert_eq!(ups["profile_name"], "ups-mib");
    assert_eq!(
        ups["values"][0],
        serde_json::json!({"name": "output_load", "value": 112.0, "unit": "%"})
    );
    assert_eq!(ups["problems"][0]["kind"], "no-such-object");
    assert_eq!(ups["reach"]["rtt_us"], 800);
    assert_eq!(v["status"], "on-battery", "{v}");
    let conds: std::collections::BTreeMap<String, String> = v["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["condition"].as_str().unwrap().to_string(),
                c["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        conds.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "battery-low",
            "degraded",
            "device-alarm",
            "device-unreachable",
            "on-battery"
        ],
        "{conds:?}"
    );
    assert_eq!(
        v["conditions"][0]["condition"], "battery-low",
        "the most urgent first"
    );
    assert_eq!(
        conds["on-battery"],
        "ups on battery, 35 % charge, runtime unknown"
    );
    assert_eq!(
        conds["device-unreachable"],
        "router unreachable (icmp: timeout); next-hop unreachable (icmp: timeout)"
    );
    assert_eq!(
        conds["degraded"],
        "camera answers ping (0.4 ms) but not SNMP: no answer within 2000 ms"
    );
    assert_eq!(
        conds["device-alarm"],
        "ups: ups-overload (output_load = 112)"
    );
    assert!(
        v["metrics"]
            .as_array()
            .unwrap()
            .contains(&"dev.ups.output_load".into())
    );

    let text = ctl.core.metrics.render(
        &ctl.core.sites,
        &tiandi_controller::metrics::SiteSeries::ALL,
        Default::default(),
        0,
        tiandi_link::clock::now_ms(),
    );
    for line in [
        r#"tiandi_device_events_total{severity="major"} 340"#,
        r#"tiandi_device_events_total{severity="critical"} 1"#,
        r#"tiandi_site_device_reachable{site="gs-002",province="GS",device="router"} 0"#,
        r#"tiandi_site_device_problems{site="gs-002",province="GS",device="ups"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line}");
    }
    ctl.shutdown().await;
}

/// Delta reports (minor 3): each restored against the connection's previous report (a
/// duplicate's too, which is decoded though not stored again); one with nothing before it on
/// its connection, or from an agent that said minor 2, closes the connection with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reports_are_restored_and_malformed_ones_refused() {
    use tiandi_proto::DeltaMode;
    use tiandi_proto::delta::DeltaEncoder;
    use tiandi_proto::names::NameEncoder;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let s = site(&ctl.core, "gs-003");

    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    let Body::Welcome(wel) = next(&mut r).await else {
        panic!("expected Welcome");
    };
    let (mut names, mut delta) = (NameEncoder::default(), DeltaEncoder::for_peer(wel.minor));
    let t0 = tiandi_link::clock::now_ms() - 60_000;
    let sent: Vec<Report> = (1..=3u64)
        .map(|seq| {
            let mut rep = partial_report(seq);
            rep.taken_ms = t0 + seq as i64 * 10_000;
            let ups = rep.devices[0].ups.as_mut().unwrap();
            ups.charge_pct -= seq as u32;
            ups.on_battery = seq != 2;
            rep.devices[0].values[0].set_number(112.0 + seq as f64 / 2.0);
            rep.devices[1].reach.as_mut().unwrap().ok = seq == 3;
            rep.events.truncate(usize::from(seq == 1));
            rep
        })
        .collect();
    for (i, rep) in [&sent[0], &sent[1], &sent[1], &sent[2]]
        .into_iter()
        .enumerate()
    {
        let mut wire = rep.clone();
        delta.encode(&mut wire);
        // The first whole, then by position (the same devices and checks each time).
        let mode = if i == 0 {
            DeltaMode::Whole
        } else {
            DeltaMode::ByPosition
        };
        assert_eq!(wire.delta, mode as i32, "report {i}");
        names.compress(&mut wire);
        w.send(Body::Report(wire)).await.unwrap();
        let Body::Ack(a) = next(&mut r).await else {
            panic!("expected Ack");
        };
        assert_eq!(a.first, rep.seq);
    }
    let stored = ctl.core.store.history("gs-003", 0, i64::MAX, 10).unwrap();
    assert_eq!(stored, sent);
    assert_eq!(ctl.core.metrics.duplicates.get(), 1);

    // A delta report first on a connection.
    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    let mut orphan = partial_report(4);
    orphan.delta = DeltaMode::ByKey as i32;
    w.send(Body::Report(orphan)).await.unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("no earlier report"), "{reason}");

    // A delta report from an agent of minor 2, after a whole one.
    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(Body::Hello(Hello {
        site_id: s.id.clone(),
        major: tiandi_proto::MAJOR,
        minor: 2,
        agent_version: "older".into(),
        interval_ms: 10_000,
        epoch: 0,
        path: String::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    w.send(Body::Report(partial_report(4))).await.unwrap();
    assert!(matches!(next(&mut r).await, Body::Ack(_)));
    let mut delta_from_old = partial_report(5);
    delta_from_old.delta = DeltaMode::ByPosition as i32;
    w.send(Body::Report(delta_from_old)).await.unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("predates"), "{reason}");
    assert_eq!(ctl.core.store.history_len("gs-003").unwrap(), 4);
    ctl.shutdown().await;
}
