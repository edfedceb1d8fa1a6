//! A star network in namespaces: a hub namespace holding a bridge, a controller namespace on
//! the bridge through a plain veth pair (the ministry's terrestrial side), and one namespace
//! per site, each joined to the bridge through its own emulated link (two TAP devices with the
//! emulator between them). Site-to-site traffic crosses both sites' links, as through a VSAT
//! hub.
//!
//! Addresses: controller `NET.1`, site `i` (1-based) `NET.(10+i)`, all in `NET.0/24`.
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
}

impl Spec {
    /// `n` sites behind identical links.
    pub fn uniform(prefix: &str, n: usize, shape: Shape) -> Spec {
        Spec {
            prefix: prefix.into(),
            net: [10, 200, 0],
            sites: vec![(shape.clone(), shape); n],
            seed: None,
        }
    }
}

/// A built topology; the emulator runs on the tokio runtime that built it.
pub struct Topology {
    prefix: String,
    net: [u8; 3],
    links: Vec<LinkHandle>,
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

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Builds the topology. Must be called within a tokio runtime, which then carries the
    /// emulator.
    pub fn up(spec: &Spec) -> Result<Topology, TopoError> {
        let p = &spec.prefix;
        if p.is_empty() || p.len() > 6 || !p.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(TopoError::Invalid(format!(
                "prefix {p:?}: 1 to 6 letters or digits"
            )));
        }
        if spec.sites.is_empty() || spec.sites.len() > 240 {
            return Err(TopoError::Invalid(format!(
                "{} sites: between 1 and 240",
                spec.sites.len()
            )));
        }
        for (up, down) in &spec.sites {
            up.validate().map_err(TopoError::Invalid)?;
            down.validate().map_err(TopoError::Invalid)?;
        }
        down_prefix(p);
        let mut topo = Topology {
            prefix: p.clone(),
            net: spec.net,
            links: Vec::new(),
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
        let net = format!("{}.{}.{}", spec.net[0], spec.net[1], spec.net[2]);
        let (hub, ctl) = (self.hub_ns(), self.ctl_ns());
        netns_add(&hub)?;
        netns_add(&ctl)?;
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        run(&[
            "ip", "-n", &hub, "link", "add", "ctl", "type", "veth", "peer", "name", "eth0",
            "netns", &ctl,
        ])?;
        run(&["ip", "-n", &ctl, "link", "set", "eth0", "address", &mac(1)])?;
        run(&[
            "ip",
            "-n",
            &ctl,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ctl, "link", "set", "eth0", "up"])?;
        run(&[
            "ip", "-n", &hub, "link", "set", "ctl", "master", "br0", "up",
        ])?;
        for (i, (up, down)) in spec.sites.iter().enumerate() {
            let i = i + 1;
            let ns = self.site_ns(i);
            netns_add(&ns)?;
            // Created in this namespace, then moved: the open file descriptors keep working.
            let (site_tap, hub_tap) = (
                format!("{}s{i}a", self.prefix),
                format!("{}s{i}b", self.prefix),
            );
            let site_dev = tap(&site_tap)?;
            let hub_dev = tap(&hub_tap)?;
            run(&["ip", "link", "set", &site_tap, "netns", &ns])?;
            run(&["ip", "link", "set", &hub_tap, "netns", &hub])?;
            run(&["ip", "-n", &ns, "link", "set", &site_tap, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "link",
                "set",
                "eth0",
                "address",
                &mac(10 + i as u16),
            ])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{net}.{}/24", 10 + i),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&[
                "ip", "-n", &hub, "link", "set", &hub_tap, "master", "br0", "up",
            ])?;
            let link = LinkHandle::new(
                up.clone(),
                down.clone(),
                spec.seed.map(|s| s.wrapping_add(2 * i as u64)),
            );
            self.tasks.push(tokio::spawn(emu::run(
                site_dev,
                hub_dev,
                link.clone(),
                self.cancel.clone(),
            )));
            self.links.push(link);
        }
        Ok(())
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
