//! SNMP traps and informs from net-snmp's own `snmptrap` and `snmpinform` (v1, v2c, v3
//! authPriv) into the agent's listener: the ones the device's profile names become events at
//! once, informs are acknowledged (the sender's exit status says so), a flood is bounded and
//! summarised, and traps from an address that is no device, with a wrong community or a wrong
//! v3 password are counted and dropped. Then the agent binary: a trap makes a report out of
//! cycle that reaches the controller in about a second, though the interval is a minute.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiandi_agent::config::DeviceConfig;
use tiandi_agent::profile::Profiles;
use tiandi_agent::traps::{self, Traps, TrapsConfig};
use tiandi_proto::DeviceEvent;
use tiandi_tests::snmpd::{self, Snmpd};
use tiandi_tests::{AgentProc, ControllerProc, free_udp, wait_for};
use tokio_util::sync::CancellationToken;

const USER: &str = "trapuser";
const AUTH: &str = "trapauth123";
const PRIV: &str = "trappriv123";

fn device(toml: &str) -> DeviceConfig {
    let c: DeviceConfig = tiandi_link::config::parse_toml("test.toml", toml).unwrap();
    c.validate("test.toml", "devices[0]", &Profiles::built_in())
        .unwrap();
    c
}

/// snmptrap / snmpinform with these arguments; returns whether it exited 0.
fn net_snmp(program: &str, args: &[&str]) -> bool {
    let out = Command::new(program)
        .env("MIBS", "")
        .env("SNMPCONFPATH", "/nonexistent")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (apt-get install snmp)"));
    if !out.status.success() {
        eprintln!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

struct Listener {
    traps: Arc<Traps>,
    addr: String,
    cancel: CancellationToken,
}

impl Listener {
    async fn start(devices: Vec<DeviceConfig>, per_minute: u32) -> Listener {
        let profiles = Profiles::built_in();
        let listen = free_udp();
        let traps = Traps::new(per_minute);
        let cancel = CancellationToken::new();
        let devices = devices
            .into_iter()
            .map(|d| {
                let p = profiles.get(&d.profile).unwrap().clone();
                (d, p)
            })
            .collect();
        let cfg = TrapsConfig {
            listen,
            per_minute,
            engine_id: Some("80001f8804746573742d61".into()),
        };
        tokio::spawn(traps::run(
            cfg,
            devices,
            "test-site".into(),
            3,
            traps.clone(),
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        Listener {
            traps,
            addr: listen.to_string(),
            cancel,
        }
    }

    /// Events until `n` have come (or 10 s).
    async fn events(&self, n: usize) -> Vec<DeviceEvent> {
        let started = Instant::now();
        let mut all = Vec::new();
        while all.len() < n && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            all.extend(self.traps.take());
        }
        all
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn v2c_device(name: &str, profile: &str) -> DeviceConfig {
    device(&format!(
        "name = \"{name}\"\nprofile = \"{profile}\"\naddress = \"127.0.0.1:161\"\ncommunity = \"site-secret\"\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2c_traps_and_informs_from_net_snmp() {
    let l = Listener::start(vec![v2c_device("ups", "ups-mib")], 6).await;
    let a = l.addr.as_str();
    // upsTrapOnBattery (v2c): goes at once, critical.
    assert!(net_snmp(
        "snmptrap",
        &[
            "-v2c",
            "-c",
            "site-secret",
            a,
            "",
            "1.3.6.1.2.1.33.2.1",
            "1.3.6.1.2.1.33.1.2.2.0",
            "i",
            "12"
        ]
    ));
    // upsTrapAlarmEntryAdded with upsAlarmLowBattery, as an inform: acknowledged (snmpinform
    // exits 0 only on the agent's response), and named battery-low.
    assert!(
        net_snmp(
            "snmpinform",
            &[
                "-v2c",
                "-c",
                "site-secret",
                "-t",
                "2",
                "-r",
                "0",
                a,
                "",
                "1.3.6.1.2.1.33.2.3",
                "1.3.6.1.2.1.33.1.6.2.1.2.4",
                "o",
                "1.3.6.1.2.1.33.1.6.3.3"
            ]
        ),
        "the inform was not acknowledged"
    );
    // A v1 trap (enterprise upsTraps, specific 1) is not in the profile's v2 form: ignored and
    // counted; a v1 linkDown is not in a UPS's profile either.
    assert!(net_snmp(
        "snmptrap",
        &[
            "-v1",
            "-c",
            "site-secret",
            a,
            "1.3.6.1.2.1.33.2",
            "127.0.0.1",
            "2",
            "0",
            ""
        ]
    ));
    let ev = l.events(2).await;
    let names: Vec<(&str, bool)> = ev.iter().map(|e| (e.name.as_str(), e.inform)).collect();
    assert_eq!(
        names,
        [("on-battery", false), ("battery-low", true)],
        "{ev:?}"
    );
    assert_eq!(ev[0].severity, tiandi_proto::Severity::Critical as i32);
    assert_eq!(ev[0].device, "ups");
    assert!(
        ev[1]
            .detail
            .contains("upsAlarmDescr 1.3.6.1.2.1.33.1.6.3.3"),
        "{}",
        ev[1].detail
    );
    // A wrong community is refused; a trap from an address that is no device is ignored.
    assert!(net_snmp(
        "snmptrap",
        &["-v2c", "-c", "guess", a, "", "1.3.6.1.2.1.33.2.1"]
    ));
    assert!(net_snmp(
        "snmptrap",
        &[
            "-v2c",
            "-c",
            "site-secret",
            "--clientaddr=127.0.0.2",
            a,
            "",
            "1.3.6.1.2.1.33.2.1"
        ]
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(l.traps.take().is_empty());
    let s = l.traps.stats();
    assert_eq!(
        (
            s.received,
            s.forwarded,
            s.ignored,
            s.rejected,
            s.unknown_source
        ),
        (3, 2, 1, 1, 1),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_traps_and_informs_authenticate_and_decrypt() {
    let router = device(&format!(
        r#"name = "router"
profile = "if-mib"
address = "127.0.0.1"
version = "v3"
[v3]
user = "{USER}"
auth_protocol = "sha1"
auth_password = "{AUTH}"
priv_protocol = "aes128"
priv_password = "{PRIV}"
"#
    ));
    let l = Listener::start(vec![router], 6).await;
    let a = l.addr.as_str();
    let v3 = |extra: &[&str]| {
        let mut v = vec![
            "-v3", "-u", USER, "-l", "authPriv", "-a", "SHA", "-A", AUTH, "-x", "AES", "-X", PRIV,
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |program: &str, args: Vec<String>| {
        net_snmp(
            program,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    // A trap: the router's engine is authoritative (its engine ID, boots and time).
    assert!(run(
        "snmptrap",
        v3(&[
            "-e",
            "0x80001f88800102030405",
            a,
            "",
            "1.3.6.1.6.3.1.1.5.3",
            "1.3.6.1.2.1.2.2.1.1.3",
            "i",
            "3",
            "1.3.6.1.2.1.2.2.1.8.3",
            "i",
            "2"
        ])
    ));
    // An inform: this agent's engine is; snmpinform discovers it first (RFC 3414 §4).
    assert!(
        run(
            "snmpinform",
            v3(&[
                "-t",
                "2",
                "-r",
                "1",
                a,
                "",
                "1.3.6.1.6.3.1.1.5.4",
                "1.3.6.1.2.1.2.2.1.1.3",
                "i",
                "3"
            ])
        ),
        "the v3 inform was not acknowledged"
    );
    let ev = l.events(2).await;
    let names: Vec<&str> = ev.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["link-down", "link-up"], "{ev:?}");
    assert!(ev[0].detail.starts_with("ifIndex 3"), "{}", ev[0].detail);
    assert!(ev[1].inform);
    // A wrong password: refused, not an event.
    let mut bad = v3(&["-e", "0x80001f88800102030405", a, "", "1.3.6.1.6.3.1.1.5.3"]);
    bad[8] = "not-the-password".into();
    assert!(run("snmptrap", bad));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(l.traps.take().is_empty());
    assert!(l.traps.stats().rejected >= 1);
}

/// A port flapping: 200 linkDown traps in a few seconds. The first six go one by one, the rest
/// as one event with their count; nothing is lost from the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_bounded_and_summarised() {
    let l = Listener::start(vec![v2c_device("switch", "if-mib")], 6).await;
    let a = l.addr.clone();
    let sent = 200;
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..sent / 4 {
                    let idx = (k * 50 + i).to_string();
                    assert!(net_snmp(
                        "snmptrap",
                        &[
                            "-v2c",
                            "-c",
                            "site-secret",
                            &a,
                            "",
                            "1.3.6.1.6.3.1.1.5.3",
                            "1.3.6.1.2.1.2.2.1.1.1",
                            "i",
                            &idx
                        ]
                    ));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ev = l.traps.take();
    let one_by_one = ev.iter().filter(|e| e.count == 1).count();
    let summaries: Vec<_> = ev.iter().filter(|e| e.count > 1).collect();
    assert_eq!(one_by_one, 6, "{ev:?}");
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].name, "link-down");
    let total: u64 = ev.iter().map(|e| u64::from(e.count)).sum();
    assert_eq!(total, sent as u64);
    let s = l.traps.stats();
    assert_eq!((s.received, s.forwarded, s.summarised), (200, 6, 194));
}

/// The agent binary: a UPS's on-battery trap reaches the controller within a few seconds
/// though the report interval is a minute, with the UPS polled in the same report.
#[test]
fn a_trap_reaches_the_controller_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Snmpd::start(&tmp.path().join("snmpd"));
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let token = ctl.enroll("yn-trap", "YN", &[]);
    let listen = free_udp();
    let conf = format!(
        r#"interval_s = 60.0
[traps]
listen = "{listen}"
[[devices]]
name = "ups"
profile = "ups-mib"
address = "{a}"
community = "public"
timeout_ms = 1000
"#,
        a = d.addr
    );
    let mut agent = AgentProc::enroll(&tmp.path().join("agent"), ctl.quic, &token, &conf);
    agent.start();
    // The first report (at connection) is in.
    let first = wait_for("the first report", Duration::from_secs(30), || {
        ctl.api("/api/sites/yn-trap")?["latest"]["seq"].as_u64()
    });
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    assert!(net_snmp(
        "snmptrap",
        &[
            "-v2c",
            "-c",
            "public",
            &listen.to_string(),
            "",
            "1.3.6.1.2.1.33.2.1"
        ]
    ));
    let site = wait_for("the trap's report", Duration::from_secs(15), || {
        let s = ctl.api("/api/sites/yn-trap")?;
        (s["latest"]["seq"].as_u64()? > first
            && s["latest"]["events"]
                .as_array()
                .is_some_and(|e| !e.is_empty()))
        .then_some(s)
    });
    let took = sent.elapsed();
    let ev = &site["latest"]["events"][0];
    assert_eq!(ev["name"], "on-battery");
    assert_eq!(ev["device"], "ups");
    assert_eq!(ev["severity"], "critical");
    // Polled in the same report: the UPS (snmpd's pass script) is on battery.
    assert_eq!(site["latest"]["devices"][0]["ups"]["on_battery"], true);
    assert_eq!(site["latest"]["traps"]["forwarded"], 1);
    eprintln!("trap to controller: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let _ = snmpd::V3_USER;
    agent.stop();
}
