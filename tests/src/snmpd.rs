//! A real net-snmp `snmpd` on a loopback port, serving a VSAT modem and an RFC 1628 UPS through
//! `pass` scripts, with a v2c community and a v3 authPriv user; one serving a UPS that
//! implements only part of RFC 1628, as many cards do; and a 48-port switch: snmpd's own IF-MIB
//! in a network namespace of 48 ports (veth pairs, aliases, some up, some down).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const V3_USER: &str = "tiandiv3";
pub const V3_AUTH: &str = "authpass123";
pub const V3_PRIV: &str = "privpass123";

pub struct Snmpd {
    pub addr: SocketAddr,
    child: Child,
}

const MODEM: &str = r#"#!/bin/sh
# pass script: a VSAT modem (vendor subtree .1.3.6.1.4.1.99999). GET only.
[ "$1" = "-g" ] || exit 0
case "$2" in
  .1.3.6.1.4.1.99999.1.1.0) printf '%s\ninteger\n92\n' "$2" ;;
  .1.3.6.1.4.1.99999.1.2.0) printf '%s\nstring\n-45.2\n' "$2" ;;
  .1.3.6.1.4.1.99999.1.3.0) printf '%s\nstring\nQPSK 3/4\n' "$2" ;;
  .1.3.6.1.4.1.99999.1.4.0) printf '%s\ninteger\n-123\n' "$2" ;;
  .1.3.6.1.4.1.99999.1.5.0) printf '%s\ngauge\n8000000\n' "$2" ;;
  .1.3.6.1.4.1.99999.1.6.0) printf '%s\ngauge\n2048\n' "$2" ;;
  .1.3.6.1.4.1.99999.2.1.0) printf '%s\nstring\nno signal??\n' "$2" ;;
esac
"#;

const UPS: &str = r#"#!/bin/sh
# pass script: an RFC 1628 UPS running on battery. GET only.
[ "$1" = "-g" ] || exit 0
case "$2" in
  .1.3.6.1.2.1.33.1.4.1.0) printf '%s\ninteger\n5\n' "$2" ;;
  .1.3.6.1.2.1.33.1.2.4.0) printf '%s\ninteger\n76\n' "$2" ;;
  .1.3.6.1.2.1.33.1.2.3.0) printf '%s\ninteger\n42\n' "$2" ;;
  .1.3.6.1.2.1.33.1.2.2.0) printf '%s\ninteger\n310\n' "$2" ;;
esac
"#;

/// A UPS card that implements part of RFC 1628: battery status, charge and output source (on
/// battery); its battery temperature is a string (wrong type) and its output load 250 %
/// (out of range); it has no minutes remaining and no seconds on battery.
pub const PARTIAL_UPS: &str = r#"#!/bin/sh
[ "$1" = "-g" ] || exit 0
case "$2" in
  .1.3.6.1.2.1.33.1.2.1.0) printf '%s\ninteger\n2\n' "$2" ;;
  .1.3.6.1.2.1.33.1.2.4.0) printf '%s\ninteger\n64\n' "$2" ;;
  .1.3.6.1.2.1.33.1.4.1.0) printf '%s\ninteger\n5\n' "$2" ;;
  .1.3.6.1.2.1.33.1.2.7.0) printf '%s\nstring\nn/a\n' "$2" ;;
  .1.3.6.1.2.1.33.1.4.4.1.5.1) printf '%s\ninteger\n250\n' "$2" ;;
esac
"#;

impl Snmpd {
    pub fn start(dir: &Path) -> Snmpd {
        Snmpd::start_with(dir, UPS)
    }

    /// An snmpd whose UPS subtree is answered by `ups_script` (a `pass` script).
    pub fn start_with(dir: &Path, ups_script: &str) -> Snmpd {
        let snmpd = snmpd_program();
        std::fs::create_dir_all(dir.join("persist")).unwrap();
        std::fs::write(dir.join("modem.sh"), MODEM).unwrap();
        std::fs::write(dir.join("ups.sh"), ups_script).unwrap();
        let addr = crate::free_udp();
        let conf = format!(
            "agentAddress udp:{addr}\n\
             rocommunity public 127.0.0.1\n\
             createUser {V3_USER} SHA \"{V3_AUTH}\" AES \"{V3_PRIV}\"\n\
             rouser {V3_USER} priv\n\
             pass .1.3.6.1.4.1.99999 /bin/sh {}\n\
             pass .1.3.6.1.2.1.33 /bin/sh {}\n",
            dir.join("modem.sh").display(),
            dir.join("ups.sh").display()
        );
        std::fs::write(dir.join("snmpd.conf"), conf).unwrap();
        let child = Command::new(snmpd)
            .env("SNMP_PERSISTENT_DIR", dir.join("persist"))
            .env("MIBS", "")
            .args(["-f", "-Lf"])
            .arg(dir.join("snmpd.log"))
            .arg("-C")
            .arg("-c")
            .arg(dir.join("snmpd.conf"))
            .arg("-p")
            .arg(dir.join("snmpd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Snmpd { addr, child };
        // Ready when snmpget answers.
        crate::wait_for("snmpd to answer", Duration::from_secs(20), || {
            let out = Command::new("snmpget")
                .args(["-v2c", "-c", "public", "-t", "0.5", "-r", "0", "-On"])
                .arg(addr.to_string())
                .arg(".1.3.6.1.2.1.1.3.0")
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        s
    }
}

impl Drop for Snmpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP "device" that answers every request with bytes that are not SNMP.
pub fn garbage_device() -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(b"\x30\x82\xff\xffthis is not SNMP at all", from);
        }
    });
    addr
}

/// Where Debian's `snmpd` is.
pub fn snmpd_program() -> &'static str {
    ["/usr/sbin/snmpd", "/usr/bin/snmpd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("snmpd is not installed (apt-get install snmpd; .ci/run does this)")
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 48-port switch: a network namespace `<prefix>sw` holding ports `port1`..`port48` (veth
/// pairs whose other ends sit in `<prefix>pp`), a management port `mgmt` at `10.<net>.0.2/30`
/// (the host's end, `<prefix>m0`, at `10.<net>.0.1`), and net-snmp's `snmpd` inside, serving
/// its own IF-MIB of them. Odd ports are up (both ends), even ports down; every fourth has an
/// alias; port 1 carries a few pings so its counters move. Needs root.
pub struct Switch {
    pub addr: SocketAddr,
    pub prefix: String,
    child: Child,
}

pub const SWITCH_PORTS: usize = 48;

impl Switch {
    pub fn start(dir: &Path, prefix: &str, net: u8) -> Switch {
        let sw = format!("{prefix}sw");
        let pp = format!("{prefix}pp");
        Switch::cleanup(prefix);
        ip(&["netns", "add", &sw]);
        ip(&["netns", "add", &pp]);
        for i in 1..=SWITCH_PORTS {
            let p = format!("port{i}");
            let q = format!("q{i}");
            ip(&[
                "-n", &sw, "link", "add", &p, "type", "veth", "peer", "name", &q, "netns", &pp,
            ]);
            if i % 2 == 1 {
                ip(&["-n", &sw, "link", "set", &p, "up"]);
                ip(&["-n", &pp, "link", "set", &q, "up"]);
            }
        }
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &sw,
            "addr",
            "add",
            &format!("10.{net}.1.1/30"),
            "dev",
            "port1",
        ]);
        ip(&[
            "-n",
            &pp,
            "addr",
            "add",
            &format!("10.{net}.1.2/30"),
            "dev",
            "q1",
        ]);
        let m0 = format!("{prefix}m0");
        ip(&[
            "link", "add", &m0, "type", "veth", "peer", "name", "mgmt", "netns", &sw,
        ]);
        ip(&["addr", "add", &format!("10.{net}.0.1/30"), "dev", &m0]);
        ip(&["link", "set", &m0, "up"]);
        ip(&[
            "-n",
            &sw,
            "addr",
            "add",
            &format!("10.{net}.0.2/30"),
            "dev",
            "mgmt",
        ]);
        ip(&["-n", &sw, "link", "set", "mgmt", "up"]);
        let _ = Command::new("ip")
            .args(["netns", "exec", &sw, "ping", "-c", "3", "-i", "0.2", "-q"])
            .arg(format!("10.{net}.1.2"))
            .output();
        std::fs::create_dir_all(dir.join("persist")).unwrap();
        let addr: SocketAddr = format!("10.{net}.0.2:161").parse().unwrap();
        std::fs::write(
            dir.join("snmpd.conf"),
            format!(
                "agentAddress udp:{addr}\nrocommunity public 10.{net}.0.0/30\n\
                 rwcommunity private 10.{net}.0.0/30\n"
            ),
        )
        .unwrap();
        let snmpd = snmpd_program();
        let child = Command::new("ip")
            .args(["netns", "exec", &sw, snmpd])
            .env("SNMP_PERSISTENT_DIR", dir.join("persist"))
            .env("MIBS", "")
            .args(["-f", "-Lf"])
            .arg(dir.join("snmpd.log"))
            .arg("-C")
            .arg("-c")
            .arg(dir.join("snmpd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Switch {
            addr,
            prefix: prefix.to_string(),
            child,
        };
        crate::wait_for(
            "the switch's snmpd to answer",
            Duration::from_secs(20),
            || {
                let out = Command::new("snmpget")
                    .args(["-v2c", "-c", "public", "-t", "0.5", "-r", "0", "-On"])
                    .arg(addr.to_string())
                    .arg(".1.3.6.1.2.1.1.3.0")
                    .output()
                    .ok()?;
                out.status.success().then_some(())
            },
        );
        // Port descriptions as an operator sets them: ifAlias by SNMP SET (net-snmp keeps
        // its own, not the kernel's link alias).
        let names = s.if_indexes();
        for i in (1..=SWITCH_PORTS).filter(|i| i % 4 == 1) {
            let idx = names[&format!("port{i}")];
            let out = Command::new("snmpset")
                .args(["-v2c", "-c", "private", "-t", "1", "-r", "1", "-On"])
                .arg(addr.to_string())
                .arg(format!(".1.3.6.1.2.1.31.1.1.1.18.{idx}"))
                .args(["s", &format!("county office {i}")])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "snmpset ifAlias: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s
    }

    /// ifName → ifIndex, as snmpwalk reads them.
    fn if_indexes(&self) -> std::collections::HashMap<String, u64> {
        let out = Command::new("snmpwalk")
            .args(["-v2c", "-c", "public", "-On", "-Oq"])
            .arg(self.addr.to_string())
            .arg(".1.3.6.1.2.1.31.1.1.1.1")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (oid, name) = l.split_once(' ')?;
                let idx = oid.rsplit('.').next()?.parse().ok()?;
                Some((name.trim().trim_matches('"').to_string(), idx))
            })
            .collect()
    }

    /// Takes a port down (its far end), as a cable pulled out.
    pub fn port_down(&self, i: usize) {
        ip(&[
            "-n",
            &format!("{}pp", self.prefix),
            "link",
            "set",
            &format!("q{i}"),
            "down",
        ]);
    }

    fn cleanup(prefix: &str) {
        for ns in [format!("{prefix}sw"), format!("{prefix}pp")] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{prefix}m0")])
            .output();
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Switch::cleanup(&self.prefix);
    }
}
