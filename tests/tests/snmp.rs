//! SNMP against a real Debian snmpd (v2c and v3 authPriv), plus an unreachable device, a device
//! that answers garbage, and a modem that answers nonsense values. None of them holds the others
//! back; the agent binary reports all of them to the controller.

use std::time::{Duration, Instant};

use tiandi_agent::config::{
    DeviceConfig, DeviceProfile, ModemOids, ScaledOid, SnmpVersion, V3Config,
};
use tiandi_agent::snmp::{Poller, poll_all};
use tiandi_proto::DeviceStatus;
use tiandi_tests::snmpd::{self, Snmpd};
use tiandi_tests::{AgentProc, ControllerProc, free_udp, wait_for};

fn modem(name: &str, addr: &str, esno_oid: &str) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        profile: DeviceProfile::VsatModem,
        address: addr.into(),
        version: SnmpVersion::V2c,
        community: "public".into(),
        v3: None,
        timeout_ms: 1500,
        oids: Some(ModemOids {
            esno: ScaledOid {
                oid: esno_oid.into(),
                scale: 0.1,
            },
            rx_level: Some(ScaledOid {
                oid: "1.3.6.1.4.1.99999.1.2.0".into(),
                scale: 1.0,
            }),
            tx_power: Some(ScaledOid {
                oid: "1.3.6.1.4.1.99999.1.4.0".into(),
                scale: 0.1,
            }),
            modcod: Some("1.3.6.1.4.1.99999.1.3.0".into()),
            // The carrier rates: bit/s toward the site, kbit/s from it.
            rx_rate: Some(ScaledOid {
                oid: "1.3.6.1.4.1.99999.1.5.0".into(),
                scale: 0.001,
            }),
            tx_rate: Some(ScaledOid {
                oid: "1.3.6.1.4.1.99999.1.6.0".into(),
                scale: 1.0,
            }),
        }),
    }
}

fn ups_v3(addr: &str, auth: &str) -> DeviceConfig {
    DeviceConfig {
        name: "ups".into(),
        profile: DeviceProfile::UpsMib,
        address: addr.into(),
        version: SnmpVersion::V3,
        community: String::new(),
        v3: Some(V3Config {
            user: snmpd::V3_USER.into(),
            auth_protocol: "sha1".into(),
            auth_password: auth.into(),
            priv_protocol: "aes128".into(),
            priv_password: snmpd::V3_PRIV.into(),
        }),
        timeout_ms: 1500,
        oids: None,
    }
}

fn router(addr: &str) -> DeviceConfig {
    DeviceConfig {
        name: "router".into(),
        profile: DeviceProfile::IfMib,
        address: addr.into(),
        version: SnmpVersion::V2c,
        community: "public".into(),
        v3: None,
        timeout_ms: 1500,
        oids: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_real_snmpd_and_isolates_bad_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start(tmp.path());
    let addr = d.addr.to_string();
    let nobody = free_udp().to_string();
    let garbage = snmpd::garbage_device().to_string();
    let mut pollers: Vec<Poller> = vec![
        Poller::new(modem("modem", &addr, "1.3.6.1.4.1.99999.1.1.0")),
        Poller::new(ups_v3(&addr, snmpd::V3_AUTH)),
        Poller::new(router(&addr)),
        Poller::new(modem("silent", &nobody, "1.3.6.1.4.1.99999.1.1.0")),
        Poller::new(modem("junk", &garbage, "1.3.6.1.4.1.99999.1.1.0")),
        Poller::new(modem("confused", &addr, "1.3.6.1.4.1.99999.2.1.0")),
        Poller::new(ups_v3(&addr, "wrong-password")),
    ];
    let started = Instant::now();
    let devs = poll_all(&mut pollers).await;
    let took = started.elapsed();
    // Concurrent: the whole round costs about one timeout, not the sum of them.
    assert!(
        took < Duration::from_millis(2500),
        "poll round took {took:?}"
    );

    let by = |n: usize| &devs[n];
    let m = by(0);
    assert_eq!(m.status, DeviceStatus::Ok as i32, "{m:?}");
    let mm = m.modem.as_ref().unwrap();
    assert_eq!(
        (mm.esno_db_x10, mm.rx_level_dbm_x10, mm.tx_power_dbm_x10),
        (92, -452, -123)
    );
    assert_eq!(mm.modcod, "QPSK 3/4");
    assert_eq!((mm.rx_rate_kbps, mm.tx_rate_kbps), (8000, 2048));

    let u = by(1);
    assert_eq!(u.status, DeviceStatus::Ok as i32, "{u:?}");
    let uu = u.ups.as_ref().unwrap();
    assert!(uu.on_battery);
    assert_eq!((uu.charge_pct, uu.runtime_s), (76, 42 * 60));

    let r = by(2);
    assert_eq!(r.status, DeviceStatus::Ok as i32, "{r:?}");
    assert!(
        r.interfaces.iter().any(|i| i.name == "lo" && i.oper_up),
        "{:?}",
        r.interfaces
    );

    assert_eq!(by(3).status, DeviceStatus::Timeout as i32, "{:?}", by(3));
    assert!(by(3).error.contains("no answer"), "{}", by(3).error);
    assert_eq!(by(4).status, DeviceStatus::BadAnswer as i32, "{:?}", by(4));
    assert_eq!(by(5).status, DeviceStatus::BadAnswer as i32, "{:?}", by(5));
    assert!(
        by(5).error.contains("should be a number"),
        "{}",
        by(5).error
    );
    assert_ne!(
        by(6).status,
        DeviceStatus::Ok as i32,
        "a wrong v3 password must not pass"
    );

    // A second round reuses sessions and still works.
    let again = poll_all(&mut pollers[..3]).await;
    assert!(again.iter().all(|d| d.status == DeviceStatus::Ok as i32));
}

#[test]
fn agent_reports_devices_to_the_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start(&tmp.path().join("snmpd"));
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let token = ctl.enroll("yn-004", "YN", &[]);
    let devices = format!(
        r#"interval_s = 1.0
[[devices]]
name = "modem"
profile = "vsat-modem"
address = "{a}"
timeout_ms = 1000
[devices.oids]
esno = {{ oid = "1.3.6.1.4.1.99999.1.1.0", scale = 0.1 }}
modcod = "1.3.6.1.4.1.99999.1.3.0"

[[devices]]
name = "ups"
profile = "ups-mib"
address = "{a}"
version = "v3"
timeout_ms = 1000
[devices.v3]
user = "{u}"
auth_protocol = "sha1"
auth_password = "{ap}"
priv_protocol = "aes128"
priv_password = "{pp}"

[[devices]]
name = "router"
profile = "if-mib"
address = "{silent}"
timeout_ms = 500
"#,
        a = d.addr,
        u = snmpd::V3_USER,
        ap = snmpd::V3_AUTH,
        pp = snmpd::V3_PRIV,
        silent = free_udp()
    );
    let mut agent = AgentProc::enroll(&tmp.path().join("agent"), ctl.quic, &token, &devices);
    agent.start();
    let site = wait_for("a report with devices", Duration::from_secs(30), || {
        let s = ctl.api("/api/sites/yn-004")?;
        (s["latest"]["devices"].as_array()?.len() == 3).then_some(s)
    });
    let devs = site["latest"]["devices"].as_array().unwrap();
    assert_eq!(devs[0]["status"], "ok");
    assert_eq!(devs[0]["modem"]["esno_db_x10"], 92);
    assert_eq!(devs[1]["ups"]["on_battery"], true);
    assert_eq!(devs[2]["status"], "timeout");
    // On battery is the site's status; the silent router is a degraded condition too.
    let site = wait_for("on-battery status", Duration::from_secs(10), || {
        let s = ctl.api("/api/sites/yn-004")?;
        (s["status"] == "on-battery").then_some(s)
    });
    let conds: Vec<&str> = site["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["condition"].as_str().unwrap())
        .collect();
    assert!(
        conds.contains(&"on-battery") && conds.contains(&"degraded"),
        "{conds:?}"
    );
    let alarms = ctl.api("/api/alarms?site=yn-004").unwrap();
    assert!(
        alarms["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["alarm"] == "on-battery" && e["state"] == "raised")
    );
    // The host's own figures came along.
    assert!(site["latest"]["host"]["mem_total_mib"].as_u64().unwrap() > 0);
    agent.stop();
}
