//! A real net-snmp `snmpd` on a loopback port, serving a VSAT modem and an RFC 1628 UPS through
//! `pass` scripts, with a v2c community and a v3 authPriv user.

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

impl Snmpd {
    pub fn start(dir: &Path) -> Snmpd {
        let snmpd = ["/usr/sbin/snmpd", "/usr/bin/snmpd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("snmpd is not installed (apt-get install snmpd; .ci/run does this)");
        std::fs::create_dir_all(dir.join("persist")).unwrap();
        std::fs::write(dir.join("modem.sh"), MODEM).unwrap();
        std::fs::write(dir.join("ups.sh"), UPS).unwrap();
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
