//! Reachability checks, as blackbox_exporter makes them: an ICMP echo to each device (and to
//! the site's next hop, its default gateway), a TCP connect to the ports configured, each
//! round beside the SNMP poll. They tell a router that is down (no echo) from one whose SNMP
//! agent hung (it answers the echo), and a dead next hop from a dead device.
//!
//! ICMP goes over an unprivileged ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`) where the kernel
//! allows it (`net.ipv4.ping_group_range` holds the agent's group: Debian's systemd sets it
//! for every group), else a raw socket (root or `CAP_NET_RAW`). With neither, ICMP checks are
//! left out, said once at start, rather than reported as failed: no check is better than a
//! false "unreachable" alarm. Echo by `surge-ping`; the gateway from `/proc/net/route`.
//!
//! Bounded: at most [`MAX_TARGETS`] configured targets and 8 ports per device (the device
//! configuration's limit), every check in a round at once, each within its timeout.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiandi_proto::{Probe, ProbeKind};
use tracing::{debug, warn};

use crate::device::DeviceConfig;

/// The most `[[reachability.targets]]`.
pub const MAX_TARGETS: usize = 16;
/// The check of the site's default gateway is named so.
pub const NEXT_HOP: &str = "next-hop";

/// `[reachability]`: how the checks are made, and what is checked beside the devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReachConfig {
    /// Check the site's next hop (the default gateway of `/proc/net/route`) with an echo.
    pub next_hop: bool,
    /// How long one echo or connect may take (ms). Devices are on the site's LAN: a second
    /// is generous.
    pub timeout_ms: u64,
    /// Echoes (and connects that time out) tried before a check fails: one lost echo is not
    /// an unreachable device.
    pub attempts: u32,
    /// More hosts to check (the province hub, a DNS server): `name`, `address`, and
    /// `tcp_port` for a TCP connect instead of an echo.
    pub targets: Vec<TargetConfig>,
}

impl Default for ReachConfig {
    fn default() -> Self {
        ReachConfig {
            next_hop: true,
            timeout_ms: 1000,
            attempts: 3,
            targets: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// An IP address or a host name.
    pub address: String,
    /// Connect to this TCP port instead of sending an echo.
    #[serde(default)]
    pub tcp_port: Option<u16>,
}

impl ReachConfig {
    /// Checks what serde cannot, naming the key in `file`.
    pub fn validate(&self, file: &str) -> Result<(), String> {
        if !(50..=10_000).contains(&self.timeout_ms) {
            return Err(format!(
                "{file}: key `reachability.timeout_ms`: {} is outside 50..10000",
                self.timeout_ms
            ));
        }
        if !(1..=5).contains(&self.attempts) {
            return Err(format!(
                "{file}: key `reachability.attempts`: {} is outside 1..5",
                self.attempts
            ));
        }
        if self.targets.len() > MAX_TARGETS {
            return Err(format!(
                "{file}: key `reachability.targets`: {} targets, at most {MAX_TARGETS}",
                self.targets.len()
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            let key = format!("reachability.targets[{i}]");
            tiandi_link::names::validate_name("target name", &t.name)
                .map_err(|e| format!("{file}: key `{key}.name`: {e}"))?;
            if t.name == NEXT_HOP || self.targets[..i].iter().any(|x| x.name == t.name) {
                return Err(format!("{file}: key `{key}.name`: {:?} is taken", t.name));
            }
            if !valid_host(&t.address) {
                return Err(format!(
                    "{file}: key `{key}.address`: {:?} is not an IP address or a host name",
                    t.address
                ));
            }
            if t.tcp_port == Some(0) {
                return Err(format!("{file}: key `{key}.tcp_port`: 0 is no port"));
            }
        }
        Ok(())
    }
}

/// An IP address, or a DNS name (letters, digits, `-`, `.`; at most 253 characters).
fn valid_host(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
        || (!s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// The default gateway in `/proc/net/route`'s text (IPv4; the first default route with the
/// gateway flag).
pub fn default_gateway(route: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let flags = u16::from_str_radix(f[3], 16).ok()?;
        const RTF_UP: u16 = 0x1;
        const RTF_GATEWAY: u16 = 0x2;
        if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        // Network byte order, printed as a little-endian word.
        let g = u32::from_str_radix(f[2], 16).ok()?;
        Some(Ipv4Addr::from(g.swap_bytes()))
    })
}

/// A round's results: each device's own check (by its index), and the site's other checks
/// (next hop, targets, a device's further TCP ports as `<device>:<port>`).
#[derive(Debug, Default)]
pub struct Round {
    pub devices: Vec<Option<Probe>>,
    pub probes: Vec<Probe>,
}

/// Makes the checks; one per agent.
pub struct Prober {
    cfg: ReachConfig,
    icmp4: Option<surge_ping::Client>,
    icmp6: Option<surge_ping::Client>,
    route_file: std::path::PathBuf,
}

impl Prober {
    /// Opens the ICMP sockets (in a tokio runtime); without them, echoes are left out.
    pub fn new(cfg: ReachConfig) -> Prober {
        let open = |kind, what: &str| match surge_ping::Client::new(
            &surge_ping::Config::builder().kind(kind).build(),
        ) {
            Ok(c) => {
                debug!(socket = ?c.get_socket().get_type(), "{what} echo socket open.");
                Some(c)
            }
            Err(error) => {
                warn!(%error, "No {what} echo socket: neither an unprivileged ping socket \
                    (net.ipv4.ping_group_range must hold the agent's group) nor a raw one \
                    (CAP_NET_RAW). Devices are not pinged; TCP checks go on.");
                None
            }
        };
        Prober {
            icmp4: open(surge_ping::ICMP::V4, "ICMPv4"),
            icmp6: open(surge_ping::ICMP::V6, "ICMPv6"),
            cfg,
            route_file: "/proc/net/route".into(),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    /// An echo to `host` (`None`: no ICMP socket for its family).
    pub async fn icmp(&self, target: &str, host: &str) -> Option<Probe> {
        let ip = match resolve(host, self.timeout()).await {
            Ok(ip) => ip,
            Err(e) => return Some(failed(target, ProbeKind::Icmp, e)),
        };
        let client = match ip {
            IpAddr::V4(_) => self.icmp4.as_ref()?,
            IpAddr::V6(_) => self.icmp6.as_ref()?,
        };
        let mut pinger = client
            .pinger(ip, surge_ping::PingIdentifier(rand::random()))
            .await;
        pinger.timeout(self.timeout());
        let payload = [0u8; 16];
        let mut last = String::from("timeout");
        for seq in 0..self.cfg.attempts {
            match pinger
                .ping(surge_ping::PingSequence(seq as u16), &payload)
                .await
            {
                Ok((_, rtt)) => return Some(ok(target, ProbeKind::Icmp, rtt)),
                Err(surge_ping::SurgeError::Timeout { .. }) => last = "timeout".into(),
                Err(surge_ping::SurgeError::IOError(e)) => {
                    last = io_error(&e);
                    // The kernel has no route or the address is refused at once: retrying
                    // says nothing new.
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        Some(failed(target, ProbeKind::Icmp, last))
    }

    /// A TCP connect to `host:port`, closed at once.
    pub async fn tcp(&self, target: &str, host: &str, port: u16) -> Probe {
        let ip = match resolve(host, self.timeout()).await {
            Ok(ip) => ip,
            Err(e) => return failed(target, ProbeKind::Tcp, e),
        };
        let mut last = String::from("timeout");
        for _ in 0..self.cfg.attempts {
            let start = Instant::now();
            match tokio::time::timeout(self.timeout(), tokio::net::TcpStream::connect((ip, port)))
                .await
            {
                Ok(Ok(_)) => return ok(target, ProbeKind::Tcp, start.elapsed()),
                Ok(Err(e)) => {
                    // Refused or unreachable: the answer, not a lost packet.
                    last = io_error(&e);
                    break;
                }
                Err(_) => last = "timeout".into(),
            }
        }
        failed(target, ProbeKind::Tcp, last)
    }

    /// One round: every device's checks and the site's, at once.
    pub async fn round(&self, devices: &[DeviceConfig]) -> Round {
        use futures_util::future::join_all;
        let own = join_all(devices.iter().map(|d| async move {
            let echo = if d.ping {
                self.icmp(&d.name, d.host()).await
            } else {
                None
            };
            let mut ports = join_all(d.tcp_ports.iter().map(|p| async move {
                (*p, self.tcp(&format!("{}:{p}", d.name), d.host(), *p).await)
            }))
            .await;
            // The device's own check: its echo, else its first port (named as the device).
            let own = match echo {
                Some(e) => Some(e),
                None if !ports.is_empty() => {
                    let (_, mut p) = ports.remove(0);
                    p.target = d.name.clone();
                    Some(p)
                }
                None => None,
            };
            (own, ports.into_iter().map(|(_, p)| p).collect::<Vec<_>>())
        }));
        let hop = async {
            if !self.cfg.next_hop {
                return None;
            }
            let text = tokio::fs::read_to_string(&self.route_file).await.ok()?;
            match default_gateway(&text) {
                Some(gw) => self.icmp(NEXT_HOP, &gw.to_string()).await,
                None => {
                    debug!("No default route: no next-hop check.");
                    None
                }
            }
        };
        let targets = join_all(self.cfg.targets.iter().map(|t| async move {
            match t.tcp_port {
                Some(p) => Some(self.tcp(&t.name, &t.address, p).await),
                None => self.icmp(&t.name, &t.address).await,
            }
        }));
        let (own, hop, targets) = tokio::join!(own, hop, targets);
        let mut round = Round::default();
        round.probes.extend(hop);
        for (d, ports) in own {
            round.devices.push(d);
            round.probes.extend(ports);
        }
        round.probes.extend(targets.into_iter().flatten());
        round
    }
}

async fn resolve(host: &str, timeout: Duration) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await {
        Err(_) => Err("resolve: timeout".into()),
        Ok(Err(e)) => Err(format!("resolve: {e}")),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| "resolve: no address".into()),
    }
}

/// An I/O error as a check's short reason: `refused`, `unreachable`, else the error.
fn io_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "refused".into(),
        K::HostUnreachable | K::NetworkUnreachable => "unreachable".into(),
        K::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

fn ok(target: &str, kind: ProbeKind, rtt: Duration) -> Probe {
    Probe {
        target: target.to_string(),
        kind: kind as i32,
        ok: true,
        rtt_us: rtt.as_micros().clamp(1, u128::from(u32::MAX)) as u32,
        ..Default::default()
    }
}

fn failed(target: &str, kind: ProbeKind, error: impl Into<String>) -> Probe {
    let mut error: String = error.into();
    error.truncate(120);
    Probe {
        target: target.to_string(),
        kind: kind as i32,
        ok: false,
        error,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_comes_from_proc_net_route() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(route), Some(Ipv4Addr::new(192, 168, 0, 1)));
        // A default route without a gateway (a point-to-point link) or none at all.
        let p2p = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            ppp0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\n";
        assert_eq!(default_gateway(p2p), None);
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
        assert_eq!(default_gateway(""), None);
    }

    #[test]
    fn targets_are_checked_and_named() {
        let mut c = ReachConfig::default();
        assert!(c.validate("a.toml").is_ok());
        c.targets.push(TargetConfig {
            name: "hub".into(),
            address: "hub.example.net".into(),
            tcp_port: Some(443),
        });
        assert!(c.validate("a.toml").is_ok());
        c.targets.push(TargetConfig {
            name: "hub".into(),
            address: "10.0.0.1".into(),
            tcp_port: None,
        });
        let e = c.validate("a.toml").unwrap_err();
        assert!(e.contains("reachability.targets[1].name"), "{e}");
        c.targets[1].name = "dns".into();
        c.targets[1].address = "10.0.0.1; rm -rf".into();
        let e = c.validate("a.toml").unwrap_err();
        assert!(e.contains("reachability.targets[1].address"), "{e}");
        c.targets[1].address = "::1".into();
        c.timeout_ms = 0;
        let e = c.validate("a.toml").unwrap_err();
        assert!(e.contains("reachability.timeout_ms"), "{e}");
        c.timeout_ms = 1000;
        c.targets[1].name = NEXT_HOP.into();
        assert!(c.validate("a.toml").is_err());
    }

    #[tokio::test]
    async fn loopback_answers_an_echo_and_a_closed_port_refuses() {
        let p = Prober::new(ReachConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = p.tcp("web", "127.0.0.1", port).await;
        assert!(open.ok && open.rtt_us > 0, "{open:?}");
        assert_eq!(open.kind, ProbeKind::Tcp as i32);
        drop(listener);
        let closed = p.tcp("web", "127.0.0.1", port).await;
        assert!(!closed.ok);
        assert_eq!(closed.error, "refused");
        // An echo where the machine allows ICMP sockets (root, or ping_group_range).
        if let Some(echo) = p.icmp("lo", "127.0.0.1").await {
            assert!(echo.ok, "{echo:?}");
            assert_eq!(echo.kind, ProbeKind::Icmp as i32);
        }
        let bad = p.tcp("x", "no-such-host.invalid", 80).await;
        assert!(!bad.ok && bad.error.starts_with("resolve"), "{bad:?}");
    }
}
