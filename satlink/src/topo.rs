//! A star network in namespaces: a hub namespace holding a bridge, a controller namespace on
//! the bridge through a plain veth pair (the ministry's terrestrial side), and one namespace
//! per site, each joined to the bridge through its own emulated link (two TAP devices with the
//! emulator between them). Site-to-site traffic crosses both sites' links, as through a VSAT
//! hub.
//!
//! Addresses: controller `NET.1`, site `i` (1-based) `NET.(10+i)`, all in `NET.0/24`.
//!
//! A dual-homed site (a terrestrial line and a satellite link, say) has a second link of its
//! own when [`Spec::second`] is given: a second bridge `br1` in the hub, `eth1` in the
//! controller at `SECOND.1` and `eth1` in site `i` at `SECOND.(10+i)`, all in `SECOND.0/24`
//! (by default `NET` with its third octet plus one), each site's `eth1` behind its own pair of
//! TAP devices and emulator task, shaped, cut and restored apart from the first link. No
//! routes are added: each interface has its own subnet, so a socket bound to a site's second
//! address talking to `SECOND.1` leaves by `eth1`.
//!
//! Everything is torn down by [`Topology::down`] or on drop, and a stale topology with the same
//! prefix (a crashed run) is removed before a new one is built. Needs root and `/dev/net/tun`.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::emu::{self, LinkHandle};
use crate::model::Shape;

#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("creating TAP device {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Namespace and device prefix (letters and digits, at most 6).
    pub prefix: String,
    /// First three octets of the /24.
    pub net: [u8; 3],
    /// One entry per site: (site to hub, hub to site) shaping.
    pub sites: Vec<(Shape, Shape)>,
    /// Fixed RNG seed for repeatable loss patterns.
    pub seed: Option<u64>,
    /// Each site's second link, (site to hub, hub to site) shaping like `sites`: empty for
    /// none, else one entry per site.
    pub second: Vec<(Shape, Shape)>,
    /// First three octets of the second links' /24; `None` is `net` with its third octet plus
    /// one. Unused without second links.
    pub second_net: Option<[u8; 3]>,
}

impl Spec {
    /// `n` sites behind identical links.
    pub fn uniform(prefix: &str, n: usize, shape: Shape) -> Spec {
        Spec {
            prefix: prefix.into(),
            net: [10, 200, 0],
            sites: vec![(shape.clone(), shape); n],
            seed: None,
            second: Vec::new(),
            second_net: None,
        }
    }

    /// Checks what [`Topology::up`] would build, without building anything.
    pub fn validate(&self) -> Result<(), TopoError> {
        let p = &self.prefix;
        if p.is_empty() || p.len() > 6 || !p.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(TopoError::Invalid(format!(
                "prefix {p:?}: 1 to 6 letters or digits"
            )));
        }
        if self.sites.is_empty() || self.sites.len() > 240 {
            return Err(TopoError::Invalid(format!(
                "{} sites: between 1 and 240",
                self.sites.len()
            )));
        }
        if !self.second.is_empty() && self.second.len() != self.sites.len() {
            return Err(TopoError::Invalid(format!(
                "{} second links for {} sites: give one per site, or none",
                self.second.len(),
                self.sites.len()
            )));
        }
        for (up, down) in self.sites.iter().chain(&self.second) {
            up.validate().map_err(TopoError::Invalid)?;
            down.validate().map_err(TopoError::Invalid)?;
        }
        self.second_net_resolved()?;
        Ok(())
    }

    /// The second links' /24, when there are second links.
    fn second_net_resolved(&self) -> Result<Option<[u8; 3]>, TopoError> {
        if self.second.is_empty() {
            return Ok(None);
        }
        let [a, b, c] = self.net;
        let second = match self.second_net {
            Some(n) => n,
            None => [
                a,
                b,
                c.checked_add(1).ok_or_else(|| {
                    TopoError::Invalid(format!(
                        "net {a}.{b}.{c}: the second links' default network {a}.{b}.{c}+1 \
                         does not exist; give second_net"
                    ))
                })?,
            ],
        };
        if second == self.net {
            return Err(TopoError::Invalid(format!(
                "second_net {a}.{b}.{c} is net itself: the second links need a /24 of their own"
            )));
        }
        Ok(Some(second))
    }
}

/// A built topology; the emulator runs on the tokio runtime that built it.
pub struct Topology {
    prefix: String,
    net: [u8; 3],
    second_net: Option<[u8; 3]>,
    links: Vec<LinkHandle>,
    /// Empty, or one per site.
    second_links: Vec<LinkHandle>,
    tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
    torn_down: bool,
    /// The emulator's own runtime (one thread): what the caller's runtime does (hashing,
    /// fsync, a busy benchmark) must not delay frames on the emulated links.
    runtime: Option<tokio::runtime::Runtime>,
}

fn run(args: &[&str]) -> Result<String, TopoError> {
    let command = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TopoError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TopoError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One interface on one of the hub's bridges.
struct Port {
    bridge: &'static str,
    /// The interface's name in the controller or site.
    dev: &'static str,
    mac: String,
    /// Address with prefix length.
    addr: String,
}

fn mac(last: u16) -> String {
    format!("02:5a:00:00:{:02x}:{:02x}", last >> 8, last & 0xff)
}

impl Topology {
    pub fn hub_ns(&self) -> String {
        format!("{}-hub", self.prefix)
    }
    pub fn ctl_ns(&self) -> String {
        format!("{}-ctl", self.prefix)
    }
    /// Namespace of site `i` (1-based).
    pub fn site_ns(&self, i: usize) -> String {
        format!("{}-s{i}", self.prefix)
    }
    pub fn ctl_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }
    pub fn site_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 10 + i as u8)
    }
    pub fn sites(&self) -> usize {
        self.links.len()
    }
    /// Control of site `i`'s link (1-based).
    pub fn link(&self, i: usize) -> &LinkHandle {
        &self.links[i - 1]
    }
    /// Whether the sites have second links.
    pub fn has_second(&self) -> bool {
        !self.second_links.is_empty()
    }
    /// Control of site `i`'s second link (1-based), if it has one.
    pub fn second_link(&self, i: usize) -> Option<&LinkHandle> {
        self.second_links.get(i.checked_sub(1)?)
    }
    /// The controller's address on the second links' network (`SECOND.1`).
    pub fn ctl_addr2(&self) -> Option<Ipv4Addr> {
        self.second_net.map(|n| Ipv4Addr::new(n[0], n[1], n[2], 1))
    }
    /// Site `i`'s address on its second link (`SECOND.(10+i)`).
    pub fn site_addr2(&self, i: usize) -> Option<Ipv4Addr> {
        self.second_net
            .map(|n| Ipv4Addr::new(n[0], n[1], n[2], 10 + i as u8))
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Builds the topology. Must be called within a tokio runtime, which then carries the
    /// emulator.
    pub fn up(spec: &Spec) -> Result<Topology, TopoError> {
        spec.validate()?;
        let p = &spec.prefix;
        down_prefix(p);
        let mut topo = Topology {
            prefix: p.clone(),
            net: spec.net,
            second_net: spec.second_net_resolved()?,
            links: Vec::new(),
            second_links: Vec::new(),
            tasks: Vec::new(),
            cancel: CancellationToken::new(),
            torn_down: false,
            runtime: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("satlink-{p}"))
                    .enable_all()
                    .build()
                    .map_err(|e| TopoError::Invalid(format!("emulator runtime: {e}")))?,
            ),
        };
        // From here on, a failure tears down what was built (on drop). Devices and tasks
        // belong to the emulator's runtime.
        let handle = topo.runtime.as_ref().map(|r| r.handle().clone());
        let _enter = handle.as_ref().map(|h| h.enter());
        topo.build(spec)?;
        Ok(topo)
    }

    fn build(&mut self, spec: &Spec) -> Result<(), TopoError> {
        let dotted = |n: [u8; 3]| format!("{}.{}.{}", n[0], n[1], n[2]);
        let net = dotted(spec.net);
        let second_net = self.second_net.map(dotted);
        let (hub, ctl) = (self.hub_ns(), self.ctl_ns());
        netns_add(&hub)?;
        netns_add(&ctl)?;
        self.ctl_port(
            &Port {
                bridge: "br0",
                dev: "eth0",
                mac: mac(1),
                addr: format!("{net}.1/24"),
            },
            "ctl",
        )?;
        if let Some(second_net) = &second_net {
            self.ctl_port(
                &Port {
                    bridge: "br1",
                    dev: "eth1",
                    mac: mac(0x100 + 1),
                    addr: format!("{second_net}.1/24"),
                },
                "ctlb",
            )?;
        }
        for (i, (up, down)) in spec.sites.iter().enumerate() {
            let i = i + 1;
            netns_add(&self.site_ns(i))?;
            let link = self.site_port(
                i,
                &Port {
                    bridge: "br0",
                    dev: "eth0",
                    mac: mac(10 + i as u16),
                    addr: format!("{net}.{}/24", 10 + i),
                },
                ('a', 'b'),
                LinkHandle::new(
                    up.clone(),
                    down.clone(),
                    spec.seed.map(|s| s.wrapping_add(2 * i as u64)),
                ),
            )?;
            self.links.push(link);
            if let (Some(second_net), Some((up, down))) = (&second_net, spec.second.get(i - 1)) {
                let link = self.site_port(
                    i,
                    &Port {
                        bridge: "br1",
                        dev: "eth1",
                        mac: mac(0x100 + 10 + i as u16),
                        addr: format!("{second_net}.{}/24", 10 + i),
                    },
                    ('c', 'd'),
                    // Seeds apart from every first link's (2i and 2i + 1, i <= 240).
                    LinkHandle::new(
                        up.clone(),
                        down.clone(),
                        spec.seed.map(|s| s.wrapping_add(2 * (256 + i) as u64)),
                    ),
                )?;
                self.second_links.push(link);
            }
        }
        Ok(())
    }

    /// Puts the controller on `port.bridge` (created here) through a veth pair: `hub_end` in
    /// the hub, `port.dev` in the controller.
    fn ctl_port(&self, port: &Port, hub_end: &str) -> Result<(), TopoError> {
        let (hub, ctl) = (self.hub_ns(), self.ctl_ns());
        let (bridge, dev) = (port.bridge, port.dev);
        run(&["ip", "-n", &hub, "link", "add", bridge, "type", "bridge"])?;
        run(&["ip", "-n", &hub, "link", "set", bridge, "up"])?;
        run(&[
            "ip", "-n", &hub, "link", "add", hub_end, "type", "veth", "peer", "name", dev, "netns",
            &ctl,
        ])?;
        run(&["ip", "-n", &ctl, "link", "set", dev, "address", &port.mac])?;
        run(&["ip", "-n", &ctl, "addr", "add", &port.addr, "dev", dev])?;
        run(&["ip", "-n", &ctl, "link", "set", dev, "up"])?;
        run(&[
            "ip", "-n", &hub, "link", "set", hub_end, "master", bridge, "up",
        ])?;
        Ok(())
    }

    /// Puts site `i` on `port.bridge` through an emulated link: TAP devices
    /// `{prefix}s{i}{site_end}` (renamed `dev` in the site) and `{prefix}s{i}{hub_end}` (on the
    /// bridge), with the emulator between them driven by `link`, which is returned.
    fn site_port(
        &mut self,
        i: usize,
        port: &Port,
        (site_end, hub_end): (char, char),
        link: LinkHandle,
    ) -> Result<LinkHandle, TopoError> {
        let (hub, ns) = (self.hub_ns(), self.site_ns(i));
        let dev = port.dev;
        // Created in this namespace, then moved: the open file descriptors keep working.
        let (site_tap, hub_tap) = (
            format!("{}s{i}{site_end}", self.prefix),
            format!("{}s{i}{hub_end}", self.prefix),
        );
        let site_dev = tap(&site_tap)?;
        let hub_dev = tap(&hub_tap)?;
        run(&["ip", "link", "set", &site_tap, "netns", &ns])?;
        run(&["ip", "link", "set", &hub_tap, "netns", &hub])?;
        run(&["ip", "-n", &ns, "link", "set", &site_tap, "name", dev])?;
        run(&["ip", "-n", &ns, "link", "set", dev, "address", &port.mac])?;
        run(&["ip", "-n", &ns, "addr", "add", &port.addr, "dev", dev])?;
        run(&["ip", "-n", &ns, "link", "set", dev, "up"])?;
        run(&[
            "ip",
            "-n",
            &hub,
            "link",
            "set",
            &hub_tap,
            "master",
            port.bridge,
            "up",
        ])?;
        self.tasks.push(tokio::spawn(emu::run(
            site_dev,
            hub_dev,
            link.clone(),
            self.cancel.clone(),
        )));
        Ok(link)
    }

    /// Stops the emulator and removes every namespace (killing what runs in them).
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.cancel.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        down_prefix(&self.prefix);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn netns_add(ns: &str) -> Result<(), TopoError> {
    run(&["ip", "netns", "add", ns])?;
    run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    // IPv6 off: no router solicitations or DAD chatter on the emulated links.
    let _ = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    Ok(())
}

fn tap(name: &str) -> Result<tun_rs::AsyncDevice, TopoError> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        .build_async()
        .map_err(|source| TopoError::Tap {
            name: name.into(),
            source,
        })
}

/// Removes every namespace of `prefix` (killing the processes inside) and stray TAP devices.
/// Safe to call when nothing exists.
pub fn down_prefix(prefix: &str) {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    let ours = |name: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|r| {
                r == "hub"
                    || r == "ctl"
                    || r.strip_prefix('s')
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
    };
    for ns in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| ours(n))
    {
        if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
            for pid in pids.split_whitespace() {
                let _ = run(&["kill", "-KILL", pid]);
            }
        }
        let _ = run(&["ip", "netns", "del", ns]);
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`, and returns its result.
/// Sockets created inside stay in that namespace wherever they are used afterwards, so a
/// test or benchmark can bind a socket in a site's namespace and drive it from its own
/// runtime.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| std::io::Error::other(format!("entering {path}: {e}")))?;
        Ok(f())
    })
    .join()
    .map_err(|_| std::io::Error::other("thread in the namespace panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_links_are_one_per_site_on_a_network_of_their_own() {
        let mut spec = Spec::uniform("tdx", 3, Shape::default());
        spec.net = [10, 9, 0];
        spec.validate().expect("no second links");
        // Without second links, second_net is not used.
        spec.second_net = Some(spec.net);
        spec.validate().expect("second_net unused");

        spec.second_net = None;
        spec.second = vec![(Shape::default(), Shape::default()); 2];
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains('2') && e.contains('3'), "{e}");
        spec.second.push((Shape::default(), Shape::default()));
        spec.validate().expect("one per site");
        assert_eq!(spec.second_net_resolved().unwrap(), Some([10, 9, 1]));

        spec.second_net = Some([10, 9, 0]);
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains("10.9.0") && e.contains("second_net"), "{e}");
        spec.second_net = Some([10, 8, 0]);
        spec.validate().expect("a /24 of its own");

        spec.net = [10, 9, 255];
        spec.second_net = None;
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains("10.9.255") && e.contains("second_net"), "{e}");

        spec.net = [10, 9, 0];
        spec.second[1].0.loss_pct = 200.0;
        let e = spec.validate().unwrap_err().to_string();
        assert!(e.contains("loss_pct"), "{e}");
    }
}
