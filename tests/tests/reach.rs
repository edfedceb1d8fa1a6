//! Reachability checks from the agent binary, in network namespaces of the test's own: the
//! site's LAN (`<p>d`) holds its gateway (10.214.0.1, with net-snmp's snmpd, SNMP over UDP
//! and TCP) and a modem (10.214.0.2: answers echoes, no SNMP agent); a router at 10.214.0.3
//! and a hub at 10.214.0.4 are not there at all. The agent and the controller run in `<p>a`,
//! whose default route goes through the gateway. What the controller shows: the router
//! unreachable, the modem answering ping but not SNMP, the next hop fine, a closed port
//! refused, the hub timing out.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tiandi_tests::snmpd::{ip, snmpd_program};
use tiandi_tests::{AgentProc, ControllerProc, can_emulate_links, command_in, wait_for};

const P: &str = "tdrch";

struct Lan {
    snmpd: Child,
}

impl Lan {
    fn start(dir: &std::path::Path) -> Lan {
        Lan::cleanup();
        let (a, d) = (format!("{P}a"), format!("{P}d"));
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &d]);
        ip(&[
            "-n", &a, "link", "add", "lan0", "type", "veth", "peer", "name", "sw0", "netns", &d,
        ]);
        for (ns, dev, addrs) in [
            (&a, "lan0", &["10.214.0.10/24"][..]),
            (&d, "sw0", &["10.214.0.1/24", "10.214.0.2/24"][..]),
        ] {
            for x in addrs {
                ip(&["-n", ns, "addr", "add", x, "dev", dev]);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &a, "route", "add", "default", "via", "10.214.0.1"]);
        std::fs::create_dir_all(dir.join("persist")).unwrap();
        std::fs::write(
            dir.join("snmpd.conf"),
            "agentAddress udp:10.214.0.1:161,tcp:10.214.0.1:1161\n\
             rocommunity public 10.214.0.0/24\n",
        )
        .unwrap();
        let child = command_in(Some(&d), snmpd_program())
            .args(["-f", "-Lo", "-C", "-c"])
            .arg(dir.join("snmpd.conf"))
            .arg("-p")
            .arg(dir.join("snmpd.pid"))
            .env("SNMP_PERSISTENT_DIR", dir.join("persist"))
            .env("MIBS", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("snmpd");
        Lan { snmpd: child }
    }

    fn cleanup() {
        for ns in [format!("{P}a"), format!("{P}d")] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.snmpd.kill();
        let _ = self.snmpd.wait();
        Lan::cleanup();
    }
}

fn probe<'a>(list: &'a Value, target: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|p| p["target"] == target))
        .unwrap_or_else(|| panic!("no check {target:?} in {list}"))
}

#[test]
fn the_controller_tells_an_unreachable_router_from_a_modem_without_snmp() {
    if !can_emulate_links() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _lan = Lan::start(&tmp.path().join("lan"));
    let ns = format!("{P}a");
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        Some((&ns, "10.214.0.10".parse().unwrap())),
        "",
    );
    let token = ctl.enroll("yn-reach", "YN", &[]);
    let conf = r#"interval_s = 2.0
[reachability]
timeout_ms = 400
attempts = 2
[[reachability.targets]]
name = "hub"
address = "10.214.0.4"
tcp_port = 443

[[devices]]
name = "gateway"
profile = "if-mib"
address = "10.214.0.1"
timeout_ms = 1000
tcp_ports = [1161, 1162]

[[devices]]
name = "modem"
profile = "vsat-modem"
address = "10.214.0.2"
timeout_ms = 500
[devices.oids]
esno = { oid = "1.3.6.1.4.1.99999.1.1.0", scale = 0.1 }
modcod = "1.3.6.1.4.1.99999.1.3.0"

[[devices]]
name = "router"
profile = "if-mib"
address = "10.214.0.3"
timeout_ms = 500
"#;
    let mut agent =
        AgentProc::enroll_in(Some(&ns), &tmp.path().join("agent"), ctl.quic, &token, conf);
    agent.start();
    let site = wait_for("a report with the checks", Duration::from_secs(60), || {
        let s = ctl.api("/api/sites/yn-reach")?;
        (s["latest"]["probes"].as_array()?.len() >= 3
            && s["latest"]["devices"].as_array()?.len() == 3)
            .then_some(s)
    });
    let latest = &site["latest"];
    eprintln!("{}", serde_json::to_string_pretty(latest).unwrap());
    let probes = &latest["probes"];
    // The next hop (the gateway, from the namespace's default route) answers an echo.
    let hop = probe(probes, "next-hop");
    assert_eq!(
        (hop["kind"].as_str(), hop["ok"].as_bool()),
        (Some("icmp"), Some(true))
    );
    assert!(hop["rtt_us"].as_u64().unwrap() > 0);
    // The gateway's SNMP-over-TCP port answers; the other port refuses at once.
    let device = |name: &str| {
        latest["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()
            .clone()
    };
    let gw = device("gateway");
    assert_eq!(gw["status"], "ok");
    assert_eq!(gw["reach"]["ok"], true);
    assert_eq!(gw["reach"]["kind"], "icmp");
    assert_eq!(probe(probes, "gateway:1161")["ok"], true);
    let closed = probe(probes, "gateway:1162");
    assert_eq!(
        (closed["ok"].as_bool(), closed["error"].as_str()),
        (Some(false), Some("refused"))
    );
    // The hub is not there: its connect times out.
    let hub = probe(probes, "hub");
    assert_eq!(
        (hub["kind"].as_str(), hub["ok"].as_bool()),
        (Some("tcp"), Some(false))
    );
    // The modem answers the echo but not SNMP; the router answers neither.
    let modem = device("modem");
    assert_eq!(modem["status"], "timeout");
    assert_eq!(modem["reach"]["ok"], true);
    let router = device("router");
    assert_eq!(router["status"], "timeout");
    assert_eq!(router["reach"]["ok"], false);

    // The controller's verdicts, with reasons an operator can act on.
    let site = wait_for("the site's conditions", Duration::from_secs(30), || {
        let s = ctl.api("/api/sites/yn-reach")?;
        let c = s["conditions"].as_array()?;
        (c.iter().any(|c| c["condition"] == "device-unreachable")
            && c.iter().any(|c| c["condition"] == "degraded"))
        .then_some(s)
    });
    let conds = site["conditions"].as_array().unwrap();
    let details = |name: &str| -> String {
        conds
            .iter()
            .filter(|c| c["condition"] == name)
            .map(|c| c["detail"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let unreachable = details("device-unreachable");
    assert!(
        unreachable.contains("router unreachable (icmp"),
        "{unreachable}"
    );
    assert!(
        unreachable.contains("hub unreachable (tcp"),
        "{unreachable}"
    );
    assert!(!unreachable.contains("modem"), "{unreachable}");
    let degraded = details("degraded");
    assert!(degraded.contains("modem answers ping"), "{degraded}");
    assert!(degraded.contains("but not SNMP"), "{degraded}");
    assert_eq!(site["status"], "degraded");
    // Prometheus sees the same.
    let metrics = ctl.metrics();
    let line = |dev: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("tiandi_site_device_reachable{")
                    && l.contains(&format!("device=\"{dev}\""))
            })
            .unwrap_or_else(|| panic!("no reachable series for {dev}"))
            .to_string()
    };
    assert!(line("router").ends_with(" 0"), "{}", line("router"));
    assert!(line("modem").ends_with(" 1"), "{}", line("modem"));
    agent.stop();
}
