//! SNMP against a real Debian snmpd (v2c and v3 authPriv), plus an unreachable device, a device
//! that answers garbage, and a modem that answers nonsense values. None of them holds the others
//! back; the agent binary reports all of them to the controller.

use std::time::{Duration, Instant};

use tiandi_agent::config::DeviceConfig;
use tiandi_agent::profile::Profiles;
use tiandi_agent::snmp::{Poller, poll_all};
use tiandi_proto::{Device, DeviceStatus, ProblemKind};
use tiandi_tests::snmpd::{self, Snmpd, Switch};
use tiandi_tests::{AgentProc, ControllerProc, free_udp, wait_for};

/// A device as its `[[devices]]` table in the agent's config says.
fn device(toml: &str) -> DeviceConfig {
    let c: DeviceConfig = tiandi_link::config::parse_toml("test.toml", toml).unwrap();
    c.validate("test.toml", "devices[0]", &Profiles::built_in())
        .unwrap();
    c
}

fn poller(cfg: DeviceConfig) -> Poller {
    poller_with(cfg, &Profiles::built_in())
}

fn poller_with(cfg: DeviceConfig, profiles: &Profiles) -> Poller {
    let p = profiles.get(&cfg.profile).unwrap().clone();
    Poller::new(cfg, p)
}

fn modem(name: &str, addr: &str, esno_oid: &str) -> DeviceConfig {
    device(&format!(
        r#"name = "{name}"
profile = "vsat-modem"
address = "{addr}"
timeout_ms = 1500
[oids]
esno = {{ oid = "{esno_oid}", scale = 0.1 }}
rx_level = "1.3.6.1.4.1.99999.1.2.0"
tx_power = {{ oid = "1.3.6.1.4.1.99999.1.4.0", scale = 0.1 }}
modcod = "1.3.6.1.4.1.99999.1.3.0"
# The carrier rates: bit/s toward the site, kbit/s from it.
rx_rate = {{ oid = "1.3.6.1.4.1.99999.1.5.0", scale = 0.001 }}
tx_rate = "1.3.6.1.4.1.99999.1.6.0"
"#
    ))
}

fn ups_v3(addr: &str, auth: &str) -> DeviceConfig {
    device(&format!(
        r#"name = "ups"
profile = "ups-mib"
address = "{addr}"
version = "v3"
timeout_ms = 1500
[v3]
user = "{}"
auth_protocol = "sha1"
auth_password = "{auth}"
priv_protocol = "aes128"
priv_password = "{}"
"#,
        snmpd::V3_USER,
        snmpd::V3_PRIV
    ))
}

fn router(addr: &str) -> DeviceConfig {
    device(&format!(
        "name = \"router\"\nprofile = \"if-mib\"\naddress = \"{addr}\"\ntimeout_ms = 1500\n"
    ))
}

fn problem<'a>(d: &'a Device, name: &str) -> Option<(&'a str, &'a str)> {
    d.problems.iter().find(|p| p.name == name).map(|p| {
        (
            ProblemKind::try_from(p.kind).unwrap().as_str(),
            p.detail.as_str(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_real_snmpd_and_isolates_bad_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start(tmp.path());
    let addr = d.addr.to_string();
    let nobody = free_udp().to_string();
    let garbage = snmpd::garbage_device().to_string();
    let mut pollers: Vec<Poller> = vec![
        poller(modem("modem", &addr, "1.3.6.1.4.1.99999.1.1.0")),
        poller(ups_v3(&addr, snmpd::V3_AUTH)),
        poller(router(&addr)),
        poller(modem("silent", &nobody, "1.3.6.1.4.1.99999.1.1.0")),
        poller(modem("junk", &garbage, "1.3.6.1.4.1.99999.1.1.0")),
        poller(modem("confused", &addr, "1.3.6.1.4.1.99999.2.1.0")),
        poller(ups_v3(&addr, "wrong-password")),
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
    // This UPS answers the four objects the agent always read, not the battery status,
    // temperature or load: those are named, and change nothing else.
    assert!(
        matches!(
            problem(u, "battery_status"),
            Some(("no-such-instance" | "no-such-object", _))
        ),
        "{:?}",
        u.problems
    );
    assert!(u.problems.iter().all(|p| !p.essential));
    assert!(u.alarms.iter().any(|a| a.name == "on-battery"));

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
        by(5).error.contains("esno: wrong-type")
            && by(5)
                .error
                .contains("expected a number, got OCTET STRING \"no signal??\""),
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

/// The UPS of the issue: a card that implements part of RFC 1628. It is reported `ok`, on
/// battery, with its charge; what it lacks is named (missing, wrong type, out of range), and
/// none of it is essential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ups_that_implements_part_of_rfc_1628_reports_what_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start_with(tmp.path(), snmpd::PARTIAL_UPS);
    let cfg = device(&format!(
        "name = \"ups\"\nprofile = \"ups-mib\"\naddress = \"{}\"\ntimeout_ms = 1500\n",
        d.addr
    ));
    let mut p = poller(cfg);
    let u = p.poll().await;
    assert_eq!(u.status, DeviceStatus::Ok as i32, "{u:?}");
    let ups = u.ups.as_ref().unwrap();
    assert!(ups.on_battery);
    assert_eq!(ups.charge_pct, 64);
    assert_eq!(ups.missing, tiandi_proto::UPS_RUNTIME, "runtime not known");
    let values: Vec<(&str, &str)> = u
        .values
        .iter()
        .map(|v| (v.name.as_str(), v.text.as_str()))
        .collect();
    assert_eq!(
        values,
        [
            ("output_source", "battery"),
            ("battery_status", "batteryNormal")
        ]
    );
    // net-snmp answers a GET its pass script has nothing for with noSuchInstance or
    // noSuchObject; each is named as it came.
    for name in ["minutes_remaining", "seconds_on_battery"] {
        assert!(
            matches!(
                problem(&u, name),
                Some(("no-such-instance" | "no-such-object", ""))
            ),
            "{name}: {:?}",
            u.problems
        );
    }
    let (kind, detail) = problem(&u, "battery_temperature").unwrap();
    assert_eq!(kind, "wrong-type");
    assert!(detail.contains("OCTET STRING \"n/a\""), "{detail}");
    let (kind, detail) = problem(&u, "output_load").unwrap();
    assert_eq!(kind, "out-of-range");
    assert!(detail.contains("250"), "{detail}");
    let alarms: Vec<&str> = u.alarms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        alarms,
        ["on-battery"],
        "an out-of-range load raises nothing"
    );
}

/// An operator's profile, from a file, without a new release: objects the device has, one it
/// has not (noSuchObject), an instance it has not (noSuchInstance); then the same profile with
/// the missing object essential: the device is a bad answer, and still carries its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_profile_file_polls_a_device_the_agent_was_not_shipped_with() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start(&tmp.path().join("snmpd"));
    let dir = tmp.path().join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    let profile = |essential: bool| {
        format!(
            r#"name = "county-router"
kind = "router"
[[objects]]
name = "uptime"
oid = "1.3.6.1.2.1.1.3.0"
type = "timeticks"
scale = 0.01
unit = "s"
[[objects]]
name = "sys_name"
oid = "1.3.6.1.2.1.1.5.0"
type = "text"
[[objects]]
name = "vendor_temp"
oid = "1.3.6.1.4.1.99998.1.1.0"
type = "gauge"
unit = "°C"
essential = {essential}
[[objects]]
name = "uptime_again"
oid = "1.3.6.1.2.1.1.3.1"
type = "timeticks"
[[alarms]]
name = "restarted"
object = "uptime"
below = 300
severity = "warning"
"#
        )
    };
    std::fs::write(dir.join("county-router.toml"), profile(false)).unwrap();
    let profiles = Profiles::with_dir(&dir).unwrap();
    let cfg = device(&format!(
        "name = \"r1\"\nprofile = \"if-mib\"\naddress = \"{}\"\ntimeout_ms = 1500\n",
        d.addr
    ));
    let cfg = DeviceConfig {
        profile: "county-router".into(),
        ..cfg
    };
    let r = poller_with(cfg.clone(), &profiles).poll().await;
    assert_eq!(r.status, DeviceStatus::Ok as i32, "{r:?}");
    assert_eq!(r.profile_name, "county-router");
    let names: Vec<&str> = r.values.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["uptime", "sys_name"]);
    assert!(!r.values[1].text.is_empty());
    assert_eq!(r.values[0].unit, "s");
    assert!(r.values[0].number().unwrap() > 0.0);
    assert_eq!(problem(&r, "vendor_temp"), Some(("no-such-object", "")));
    assert_eq!(problem(&r, "uptime_again"), Some(("no-such-instance", "")));
    // snmpd here started a moment ago: the profile's own alarm holds.
    assert_eq!(r.alarms.len(), 1, "{:?}", r.alarms);
    assert_eq!(r.alarms[0].name, "restarted");

    std::fs::write(dir.join("county-router.toml"), profile(true)).unwrap();
    let profiles = Profiles::with_dir(&dir).unwrap();
    let r = poller_with(cfg, &profiles).poll().await;
    assert_eq!(r.status, DeviceStatus::BadAnswer as i32);
    assert!(
        r.error.contains("essential vendor_temp: no-such-object"),
        "{}",
        r.error
    );
    assert_eq!(r.values.len(), 2, "what it answered is still there");

    // The same from the agent binary, as a technician at the site runs it: the directory is
    // checked and listed, the device polled once and shown.
    let conf = tmp.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "profiles_dir = {dir:?}\nreachability = {{ next_hop = false }}\n\
             [[devices]]\nname = \"r1\"\nprofile = \"county-router\"\naddress = \"{}\"\n\
             timeout_ms = 1500\n",
            d.addr
        ),
    )
    .unwrap();
    let agent = |args: &[&str]| {
        std::process::Command::new(tiandi_tests::bin("tiandi-agent"))
            .arg("--config")
            .arg(&conf)
            .args(args)
            .output()
            .unwrap()
    };
    let out = agent(&["profiles"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("county-router") && l.contains("4 (1)")),
        "{listing}"
    );
    let out = agent(&["check-devices", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r1 = &v["devices"][0];
    assert_eq!(r1["status"], "bad-answer", "{r1}");
    assert_eq!(r1["values"][0]["name"], "uptime");
    assert_eq!(r1["reach"]["ok"], true, "loopback answers an echo: {r1}");
    let out = agent(&["check-devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("problem: vendor_temp no-such-object — ESSENTIAL"),
        "{text}"
    );
    // A broken profile file: the error names the file and the key, and nothing is polled.
    std::fs::write(
        dir.join("broken.toml"),
        "name = \"broken\"\nkind = \"router\"\n[[objects]]\nname = \"x\"\noid = \"1.3.a\"\ntype = \"gauge\"\n",
    )
    .unwrap();
    let out = agent(&["profiles", "--dir", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("broken.toml: key `objects[0].oid`"), "{err}");
}

/// A 48-port switch's interface table through GETBULK, from net-snmp's own IF-MIB: every
/// port with its name, alias, oper status, speed and 64-bit counters; then bounded in rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_48_port_switch_is_walked_with_getbulk_and_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = Switch::start(tmp.path(), "tdsw48", 212);
    let cfg = device(&format!(
        "name = \"switch\"\nprofile = \"if-mib\"\naddress = \"{}\"\ntimeout_ms = 3000\n",
        sw.addr
    ));
    let mut p = poller(cfg.clone());
    let started = Instant::now();
    let d = p.poll().await;
    let took = started.elapsed();
    assert_eq!(d.status, DeviceStatus::Ok as i32, "{d:?}");
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let ports: Vec<_> = d
        .interfaces
        .iter()
        .filter(|i| i.name.starts_with("port"))
        .collect();
    assert_eq!(ports.len(), snmpd::SWITCH_PORTS, "{:?}", d.interfaces);
    assert!(d.interfaces.iter().any(|i| i.name == "mgmt" && i.oper_up));
    for i in 1..=snmpd::SWITCH_PORTS {
        let port = ports
            .iter()
            .find(|x| x.name == format!("port{i}"))
            .unwrap_or_else(|| panic!("port{i}"));
        assert_eq!(port.oper_up, i % 2 == 1, "port{i}: {port:?}");
        let alias = if i % 4 == 1 {
            format!("county office {i}")
        } else {
            String::new()
        };
        assert_eq!(port.alias, alias, "port{i}");
        if port.oper_up {
            assert_eq!(port.speed_mbps, 10_000, "veth says 10 Gbit/s: {port:?}");
        }
    }
    let port1 = ports.iter().find(|x| x.name == "port1").unwrap();
    assert!(port1.in_octets > 0 && port1.out_octets > 0, "{port1:?}");
    eprintln!(
        "48-port walk: {} interfaces in {took:?}",
        d.interfaces.len()
    );

    // A cable pulled: a poll sees the port down once snmpd's interface cache (a few
    // seconds) has it.
    sw.port_down(3);
    let pulled = Instant::now();
    loop {
        let d = p.poll().await;
        if !d
            .interfaces
            .iter()
            .find(|i| i.name == "port3")
            .unwrap()
            .oper_up
        {
            break;
        }
        assert!(pulled.elapsed() < Duration::from_secs(20), "port3 still up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Bounded: a device with more rows than max_interfaces is cut there, and says so.
    let small = DeviceConfig {
        max_interfaces: Some(20),
        ..cfg
    };
    let d = poller(small).poll().await;
    assert_eq!(d.status, DeviceStatus::Ok as i32);
    assert_eq!(d.interfaces.len(), 20);
    let (kind, detail) = problem(&d, "interfaces").unwrap();
    assert_eq!(kind, "truncated");
    assert!(detail.contains("20 rows"), "{detail}");
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
