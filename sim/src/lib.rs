//! Simulated sites: realistic, changing figures (CPU and load wander, disks fill, counters grow,
//! some sites fade in rain, some lose mains power, a few lose their link for minutes), each site
//! with its own certificate and its own real QUIC connection. Used by the controller's demo and
//! by `tiandi-agent simulate`, the benchmark's load generator.
//!
//! Each simulated site runs the same report delivery as a real agent (`tiandi-uplink`: spool,
//! uplink session); this crate only makes up the figures, the outages and the report loop. It
//! must never depend on the agent (collection, config, transfers) or the controller.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiandi_link::LinkProfile;
use tiandi_proto::{
    Device, DeviceAlarm, DeviceEvent, DeviceInterface, DeviceStatus, Filesystem, Host, Interface,
    Modem, ObjectProblem, ObjectValue, Probe, ProbeKind, ProblemKind, Profile, Report, Severity,
    TrapStats, UPS_RUNTIME, Ups,
};
use tokio_util::sync::CancellationToken;

use tiandi_transfer::now_ms;
use tiandi_uplink::spool::Spool;
use tiandi_uplink::{self as uplink, Shared};

/// What a few simulated sites show beyond the common figures: what a site's devices answer
/// in part, say on their own, or do not answer at all. Only a few of the first
/// [`SHOWCASE_SITES`] have any (the demo's), so the load generator's report stays as small as
/// ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Showcase {
    None,
    /// A UPS that answers RFC 1628 in part (no runtime, a battery temperature of the wrong
    /// type): its mains fail for 4 minutes every 15, and its battery runs low in the last
    /// minute of each (`on-battery` and `battery-low` traps and alarms).
    PartialUps,
    /// A router whose WAN port goes down for 30 s every 5 minutes (`link-down`, `link-up`
    /// traps; every third time a flapping port, summarised as one `link-down ×340`), its
    /// ports named (`ifAlias`) and their speeds known.
    TrappingRouter,
    /// A router, the site's next hop, that answers neither SNMP nor ping.
    UnreachableRouter,
    /// A router that answers ping but not SNMP.
    SilentRouter,
}

/// The sites that may show something of [`Showcase`]: the first 200 (the demo's default).
pub const SHOWCASE_SITES: u64 = 200;

impl Showcase {
    /// Site `index`'s: 18 of the first 120 sites show one (none of 120 are dual-homed in the
    /// demo: those are `index % 10 == 3`).
    pub fn of(index: u64) -> Showcase {
        if index >= SHOWCASE_SITES {
            return Showcase::None;
        }
        match index % 40 {
            5 | 25 => Showcase::PartialUps,
            7 | 27 => Showcase::TrappingRouter,
            17 => Showcase::UnreachableRouter,
            37 => Showcase::SilentRouter,
            _ => Showcase::None,
        }
    }
}

/// A UPS's mains failure of the demo at `now_ms`: (on battery, battery low, charge %).
fn mains_cycle(index: u64, now_ms: i64) -> (bool, bool, f64) {
    let o = (now_ms / 1000 + 97 * index as i64).rem_euclid(900) as f64;
    if o < 240.0 {
        (true, o >= 180.0, 100.0 - o * 0.35)
    } else {
        (false, false, (16.0 + (o - 240.0) * 0.15).min(100.0))
    }
}

/// A router's WAN port in the demo at `now_ms`: (up, this outage is a flapping port).
fn wan_cycle(index: u64, now_ms: i64) -> (bool, bool) {
    let t = now_ms / 1000 + 61 * index as i64;
    (t.rem_euclid(300) >= 30, t.div_euclid(300) % 3 == 0)
}

fn icmp(target: &str, rtt_us: Option<u32>) -> Probe {
    Probe {
        target: target.into(),
        kind: ProbeKind::Icmp as i32,
        ok: rtt_us.is_some(),
        rtt_us: rtt_us.unwrap_or(0),
        error: if rtt_us.is_some() { "" } else { "timeout" }.into(),
        ..Default::default()
    }
}

fn number(name: &str, v: f64, unit: &str) -> ObjectValue {
    let mut o = ObjectValue {
        name: name.into(),
        unit: unit.into(),
        ..Default::default()
    };
    o.set_number(v);
    o
}

fn text(name: &str, v: &str) -> ObjectValue {
    ObjectValue {
        name: name.into(),
        text: v.into(),
        ..Default::default()
    }
}

/// One simulated site's figures.
pub struct SimSite {
    index: u64,
    showcase: Showcase,
    /// The showcase's state at the last sample (its traps come on changes).
    was_on_battery: Option<bool>,
    was_low: Option<bool>,
    wan_was_up: Option<bool>,
    traps: TrapStats,
    rng: StdRng,
    boot_ms: i64,
    cpu: f64,
    mem_used: f64,
    mem_total: u64,
    fs_root: f64,
    fs_data: f64,
    rx: [u64; 2],
    tx: [u64; 2],
    router_in: [u64; 4],
    router_out: [u64; 4],
    esno: f64,
    charge: f64,
    rain_until: i64,
    battery_until: i64,
    outage_until: i64,
    prone_rain: bool,
    prone_power: bool,
    prone_outage: bool,
    /// The site's disk is close to full (a few sites).
    full_disk: bool,
}

const MODCODS: [&str; 4] = ["QPSK 1/2", "QPSK 3/4", "8PSK 2/3", "16APSK 3/4"];

impl SimSite {
    pub fn new(index: u64, now_ms: i64, outages: bool) -> SimSite {
        let mut rng = StdRng::seed_from_u64(0x7469_616e_6469 ^ index.wrapping_mul(0x9e37_79b9));
        let prone_rain = rng.random_bool(0.12);
        let prone_power = rng.random_bool(0.06);
        SimSite {
            index,
            showcase: Showcase::of(index),
            was_on_battery: None,
            was_low: None,
            wan_was_up: None,
            traps: TrapStats::default(),
            boot_ms: now_ms - rng.random_range(3_600_000..90 * 86_400_000i64),
            cpu: rng.random_range(5.0..40.0),
            mem_used: rng.random_range(0.3..0.7),
            mem_total: [4096, 8192, 16384][rng.random_range(0..3)],
            fs_root: rng.random_range(0.2..0.7),
            fs_data: rng.random_range(0.1..0.8),
            rx: [
                rng.random_range(0..1u64 << 36),
                rng.random_range(0..1u64 << 30),
            ],
            tx: [
                rng.random_range(0..1u64 << 34),
                rng.random_range(0..1u64 << 30),
            ],
            router_in: std::array::from_fn(|_| rng.random_range(0..1u64 << 36)),
            router_out: std::array::from_fn(|_| rng.random_range(0..1u64 << 35)),
            esno: rng.random_range(8.0..12.0),
            charge: 100.0,
            rain_until: 0,
            battery_until: 0,
            outage_until: 0,
            prone_rain,
            prone_power,
            prone_outage: outages && rng.random_bool(0.03),
            full_disk: rng.random_bool(0.01),
            rng,
        }
    }

    /// Whether the site's link is down now (simulated outage); decides new outages.
    pub fn link_down(&mut self, now_ms: i64) -> bool {
        if self.prone_outage && now_ms >= self.outage_until && self.rng.random_bool(0.01) {
            self.outage_until = now_ms + self.rng.random_range(60_000..240_000);
        }
        now_ms < self.outage_until
    }

    pub fn sample(&mut self, now_ms: i64, dt_s: f64) -> Report {
        let r = &mut self.rng;
        self.cpu = (self.cpu + r.random_range(-4.0..4.0)).clamp(1.0, 92.0);
        self.mem_used = (self.mem_used + r.random_range(-0.01..0.01)).clamp(0.2, 0.9);
        let fill = if self.full_disk { 0.001 } else { 0.00001 };
        self.fs_root = (self.fs_root + r.random_range(-0.000_01..fill)).clamp(0.05, 0.985);
        self.fs_data = (self.fs_data + r.random_range(-0.000_01..0.000_02)).clamp(0.05, 0.94);
        for i in 0..2 {
            self.rx[i] += (r.random_range(20_000.0..400_000.0) * dt_s) as u64;
            self.tx[i] += (r.random_range(5_000.0..100_000.0) * dt_s) as u64;
        }
        for i in 0..4 {
            self.router_in[i] += (r.random_range(50_000.0..600_000.0) * dt_s) as u64;
            self.router_out[i] += (r.random_range(10_000.0..200_000.0) * dt_s) as u64;
        }
        // Rain fade episodes: Es/No drops below threshold for a few minutes.
        if self.prone_rain && now_ms >= self.rain_until && r.random_bool(0.02) {
            self.rain_until = now_ms + r.random_range(120_000..600_000);
        }
        let raining = now_ms < self.rain_until;
        let target = if raining {
            r.random_range(1.0..4.5)
        } else {
            r.random_range(8.5..11.5)
        };
        self.esno += (target - self.esno) * 0.5;
        // Mains failures: the UPS runs on battery and drains.
        if self.prone_power && now_ms >= self.battery_until && r.random_bool(0.01) {
            self.battery_until = now_ms + r.random_range(60_000..900_000);
        }
        let on_battery = now_ms < self.battery_until;
        self.charge = if on_battery {
            (self.charge - 0.3 * dt_s / 10.0).max(5.0)
        } else {
            (self.charge + 0.5 * dt_s / 10.0).min(100.0)
        };
        let modcod = if raining {
            MODCODS[0]
        } else {
            MODCODS[1 + (self.esno as usize % 3)]
        };
        let root_total = 60_000u64;
        let data_total = 400_000u64;
        let mut report = Report {
            taken_ms: now_ms,
            host: Some(Host {
                cpu_permille: (self.cpu * 10.0) as u32,
                load1_c: (self.cpu * 4.0) as u32,
                load5_c: (self.cpu * 3.6) as u32,
                load15_c: (self.cpu * 3.3) as u32,
                mem_used_mib: (self.mem_used * self.mem_total as f64) as u64,
                mem_total_mib: self.mem_total,
                uptime_s: ((now_ms - self.boot_ms) / 1000) as u64,
                filesystems: vec![
                    Filesystem {
                        mount: "/".into(),
                        used_mib: (self.fs_root * root_total as f64) as u64,
                        total_mib: root_total,
                        ..Default::default()
                    },
                    Filesystem {
                        mount: "/srv".into(),
                        used_mib: (self.fs_data * data_total as f64) as u64,
                        total_mib: data_total,
                        ..Default::default()
                    },
                ],
                interfaces: vec![
                    Interface {
                        name: "eth0".into(),
                        rx_bytes: self.rx[0],
                        tx_bytes: self.tx[0],
                        ..Default::default()
                    },
                    Interface {
                        name: "eth1".into(),
                        rx_bytes: self.rx[1],
                        tx_bytes: self.tx[1],
                        ..Default::default()
                    },
                ],
            }),
            link: None,
            devices: vec![
                Device {
                    name: "modem".into(),
                    profile: Profile::VsatModem as i32,
                    status: DeviceStatus::Ok as i32,
                    modem: Some(Modem {
                        esno_db_x10: (self.esno * 10.0) as i32,
                        rx_level_dbm_x10: (-600.0 + self.esno * 15.0) as i32,
                        modcod: modcod.into(),
                        tx_power_dbm_x10: if raining { -30 } else { -90 },
                        // A 2 Msym/s carrier: its information rate follows the ModCod.
                        rx_rate_kbps: if raining { 2_000 } else { 4_000 },
                        tx_rate_kbps: if raining { 512 } else { 1_024 },
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "ups".into(),
                    profile: Profile::UpsMib as i32,
                    status: DeviceStatus::Ok as i32,
                    ups: Some(Ups {
                        on_battery,
                        charge_pct: self.charge as u32,
                        runtime_s: (self.charge * 36.0) as u32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "router".into(),
                    profile: Profile::IfMib as i32,
                    status: DeviceStatus::Ok as i32,
                    // A 4-port router: the WAN port and three LAN ports.
                    interfaces: ["wan", "lan", "lan2", "lan3"]
                        .into_iter()
                        .enumerate()
                        .map(|(i, name)| DeviceInterface {
                            index: i as u32 + 1,
                            name: name.into(),
                            oper_up: true,
                            in_octets: self.router_in[i],
                            out_octets: self.router_out[i],
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        self.showcase(&mut report, now_ms);
        report
    }

    /// What this site shows of [`Showcase`], into its report.
    fn showcase(&mut self, report: &mut Report, now_ms: i64) {
        let jitter = self.rng.random_range(0..200);
        let Some(i) = report.devices.iter().position(|d| d.name == "router") else {
            return;
        };
        match self.showcase {
            Showcase::None => {}
            Showcase::PartialUps => {
                let (on_battery, low, charge) = mains_cycle(self.index, now_ms);
                if self.was_on_battery.is_some_and(|w| w != on_battery) && on_battery {
                    self.trap(
                        report,
                        now_ms,
                        "ups",
                        "on-battery",
                        Severity::Critical,
                        1,
                        "",
                    );
                }
                if self.was_low.is_some_and(|w| w != low) && low {
                    self.trap(
                        report,
                        now_ms,
                        "ups",
                        "battery-low",
                        Severity::Critical,
                        1,
                        "upsAlarmLowBattery",
                    );
                }
                (self.was_on_battery, self.was_low) = (Some(on_battery), Some(low));
                let Some(ups) = report.devices.iter_mut().find(|d| d.name == "ups") else {
                    return;
                };
                ups.profile_name = "ups-mib".into();
                ups.ups = Some(Ups {
                    on_battery,
                    charge_pct: charge as u32,
                    runtime_s: 0,
                    missing: UPS_RUNTIME,
                });
                ups.values = vec![
                    text("battery_status", if low { "low" } else { "normal" }),
                    number("output_load", 38.0 + f64::from(jitter % 7), "%"),
                ];
                ups.problems = vec![
                    ObjectProblem {
                        name: "minutes_remaining".into(),
                        kind: ProblemKind::NoSuchObject as i32,
                        ..Default::default()
                    },
                    ObjectProblem {
                        name: "battery_temperature".into(),
                        kind: ProblemKind::WrongType as i32,
                        detail: "OCTET STRING \"n/a\"".into(),
                        ..Default::default()
                    },
                ];
                ups.alarms = [
                    on_battery.then_some(("on-battery", "output_source = battery")),
                    low.then_some(("battery-low", "battery_status = low")),
                ]
                .into_iter()
                .flatten()
                .map(|(name, detail)| DeviceAlarm {
                    name: name.into(),
                    severity: Severity::Critical as i32,
                    detail: detail.into(),
                    ..Default::default()
                })
                .collect();
                ups.reach = Some(icmp("ups", Some(600 + jitter)));
            }
            Showcase::TrappingRouter => {
                let (up, flapping) = wan_cycle(self.index, now_ms);
                if let Some(was) = self.wan_was_up
                    && was != up
                {
                    if up {
                        self.trap(
                            report,
                            now_ms,
                            "router",
                            "link-up",
                            Severity::Info,
                            1,
                            "ifIndex 1 (wan)",
                        );
                    } else if flapping {
                        self.trap(
                            report,
                            now_ms,
                            "router",
                            "link-down",
                            Severity::Major,
                            340,
                            "ifIndex 1 (wan), flapping",
                        );
                    } else {
                        self.trap(
                            report,
                            now_ms,
                            "router",
                            "link-down",
                            Severity::Major,
                            1,
                            "ifIndex 1 (wan)",
                        );
                    }
                }
                self.wan_was_up = Some(up);
                let router = &mut report.devices[i];
                router.profile_name = "if-mib".into();
                for (port, (alias, speed)) in router
                    .interfaces
                    .iter_mut()
                    .zip([("uplink to the county network", 100), ("office LAN", 1000)])
                {
                    port.alias = alias.into();
                    port.speed_mbps = speed;
                }
                router.interfaces[0].oper_up = up;
                router.reach = Some(icmp("router", Some(300 + jitter)));
                report.traps = Some(self.traps);
            }
            Showcase::UnreachableRouter | Showcase::SilentRouter => {
                let pings = self.showcase == Showcase::SilentRouter;
                let router = &mut report.devices[i];
                router.status = DeviceStatus::Timeout as i32;
                router.error = "no answer within 2000 ms".into();
                router.interfaces.clear();
                router.reach = Some(icmp("router", pings.then_some(400 + jitter)));
                if !pings {
                    report.probes = vec![icmp("next-hop", None)];
                }
            }
        }
    }

    /// A trap of one of this site's devices, into the report (and the listener's counters).
    #[allow(clippy::too_many_arguments)]
    fn trap(
        &mut self,
        report: &mut Report,
        now_ms: i64,
        device: &str,
        name: &str,
        severity: Severity,
        count: u32,
        detail: &str,
    ) {
        self.traps.received += u64::from(count);
        self.traps.forwarded += 1;
        self.traps.summarised += u64::from(count - 1);
        report.events.push(DeviceEvent {
            device: device.into(),
            name: name.into(),
            severity: severity as i32,
            at_ms: now_ms,
            count,
            detail: detail.into(),
            ..Default::default()
        });
    }
}

/// Simulated sites sharing one UDP socket.
const SITES_PER_SOCKET: usize = 50;

/// A simulated site's credentials.
#[derive(Clone)]
pub struct SimCreds {
    pub index: u64,
    pub site_id: String,
    pub province: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

pub struct SimOptions {
    pub controller: String,
    pub interval: Duration,
    pub outages: bool,
    pub profile: LinkProfile,
    /// Sites take files sent to them into `<this>/<site ID>/inbox` (the demo); None: they take
    /// none (the load generator).
    pub inboxes: Option<PathBuf>,
    /// Of those, the sites that run the backup jobs the controller pushes them, as an agent
    /// does (the demo's mutual backup): repositories in `<inboxes>/<site ID>/backup/repos/`,
    /// shipped to the controller; the controller's repositories sent to them kept in
    /// `<inboxes>/<site ID>/backups/controller/`.
    pub backup_sites: Vec<String>,
}

/// A simulated site's side of transfers: it takes the files the controller sends, like an
/// agent's inbox, and (a backup site) sends what its outbox holds.
struct SimTransfers {
    site_id: String,
    inbox: Arc<tiandi_transfer::Inbox>,
    outbox: Option<Arc<tiandi_transfer::Outbox>>,
}

impl uplink::SessionHook for SimTransfers {
    fn on_session(
        self: Arc<Self>,
        conn: &quinn::Connection,
        stop: CancellationToken,
        route: uplink::Route,
    ) {
        tokio::spawn(tiandi_transfer::inbox::accept_loop(
            self.inbox.clone(),
            conn.clone(),
            None,
            stop.clone(),
        ));
        if let Some(outbox) = &self.outbox {
            tokio::spawn(tiandi_transfer::outbox::drive_routed(
                outbox.clone(),
                conn.clone(),
                "controller".into(),
                self.site_id.clone(),
                stop,
                route.classes(),
            ));
        }
    }
}

/// A backup site's outbox, shipper, scheduler and placement, running until `cancel`.
fn start_backups(
    db: &sled::Db,
    site_id: &str,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<tiandi_transfer::Outbox>> {
    use tiandi_backup::{partner, scheduler};
    let outbox = tiandi_transfer::Outbox::new(db.open_tree(format!("outbox/{site_id}"))?);
    let shipper = Arc::new(partner::Shipper::new(
        outbox.clone(),
        db.open_tree(format!("backup-ship/{site_id}"))?,
        &dir.join("backup-ship"),
        Vec::new(),
    )?);
    tokio::spawn(
        shipper
            .clone()
            .run(Duration::from_secs(1), None, cancel.clone()),
    );
    let sched = scheduler::Scheduler::new(
        site_id,
        &dir.join("backup"),
        db.open_tree(format!("backup-jobs/{site_id}"))?,
        shipper,
        scheduler::outbox_sink(
            outbox.clone(),
            "controller",
            &dir.join("backup").join("results"),
        ),
    )
    .map_err(anyhow::Error::msg)?;
    tokio::spawn(sched.run(
        Some(dir.join("inbox").join(scheduler::PUSHED_NAME)),
        Some(dir.join("backup").join("status.json")),
        cancel.clone(),
    ));
    tokio::spawn(
        partner::Placement {
            inbox: dir.join("inbox"),
            peer: Some("controller".into()),
            backups: dir.join("backups"),
            hold: Duration::from_secs(7 * 86_400),
        }
        .run(cancel.clone()),
    );
    Ok(outbox)
}

/// Starts every site; returns their shared states. Sites start spread over one interval.
/// `stop_reports` ends report generation; `cancel` ends the connections (cancel it after the
/// spools have drained to end without a backlog).
pub async fn start(
    creds: Vec<SimCreds>,
    opts: SimOptions,
    spool_dir: &Path,
    stop_reports: CancellationToken,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<(String, Arc<Shared>)>> {
    let db = sled::Config::new()
        .path(spool_dir)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(Some(1000))
        .open()
        .with_context(|| format!("opening simulator spool {}", spool_dir.display()))?;
    let tree = db.open_tree("spools")?;
    let addr = tokio::net::lookup_host(&opts.controller)
        .await
        .with_context(|| format!("resolving {}", opts.controller))?
        .next()
        .with_context(|| format!("{} resolves to no address", opts.controller))?;
    let interval_ms = opts.interval.as_millis() as i64;
    let mut out = Vec::with_capacity(creds.len());
    // Real sites each have their own socket; thousands of simulated sites on one socket would
    // overflow its receive buffer whenever the controller talks to all of them at once (a
    // restart's CONNECTION_CLOSE). One endpoint per SITES_PER_SOCKET sites.
    let mut endpoint = tiandi_link::client_endpoint(addr)?;
    // As a real site's: its report acknowledgements acknowledged with its next report.
    let transport = {
        let mut t = opts.profile.transport_config();
        if let Some(d) = tiandi_link::transport::report_ack_delay(opts.interval) {
            t.max_ack_delay(d);
        }
        Arc::new(t)
    };
    for (n, c) in creds.into_iter().enumerate() {
        if n > 0 && n % SITES_PER_SOCKET == 0 {
            endpoint = tiandi_link::client_endpoint(addr)?;
        }
        let tls = tiandi_link::tls::site_client_tls(&c.ca_pem, &c.cert_pem, &c.key_pem)?;
        let client = tiandi_link::client_config(tls, transport.clone())?;
        let mut prefix = c.site_id.as_bytes().to_vec();
        prefix.push(0);
        let spool = Spool::open(tree.clone(), &prefix, 64 * 1024 * 1024, interval_ms, false)?;
        let shared = Shared::new(spool);
        let on_session: Option<Arc<dyn uplink::SessionHook>> = match &opts.inboxes {
            Some(dir) => {
                let site_dir = dir.join(&c.site_id);
                let dir = site_dir.join("inbox");
                let inbox = tiandi_transfer::Inbox::new(
                    &dir,
                    db.open_tree(format!("inbox/{}", c.site_id))?,
                    &c.site_id,
                    None,
                )
                .with_context(|| format!("opening {}", dir.display()))?;
                let outbox = if opts.backup_sites.contains(&c.site_id) {
                    Some(
                        start_backups(&db, &c.site_id, &site_dir, &cancel)
                            .with_context(|| format!("{}: starting its backups", c.site_id))?,
                    )
                } else {
                    None
                };
                Some(Arc::new(SimTransfers {
                    site_id: c.site_id.clone(),
                    inbox,
                    outbox,
                }))
            }
            None => None,
        };
        let span = tracing::info_span!("site", site = %c.site_id);
        tokio::spawn(tracing::Instrument::instrument(
            uplink::run(
                endpoint.clone(),
                uplink::UplinkConfig {
                    controller: opts.controller.clone(),
                    standby: Vec::new(),
                    site_id: c.site_id.clone(),
                    client,
                    interval_ms: interval_ms as u32,
                    connect_timeout: opts.profile.connect_timeout(),
                    on_session,
                },
                shared.clone(),
                cancel.clone(),
            ),
            span,
        ));
        let (s, cancel2, outages) = (shared.clone(), stop_reports.clone(), opts.outages);
        let interval = opts.interval;
        let index = c.index;
        tokio::spawn(async move {
            let phase = interval.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = cancel2.cancelled() => return,
                _ = tokio::time::sleep(phase) => {}
            }
            let mut site = SimSite::new(index, now_ms(), outages);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel2.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = s.sample_now.notified() => tick.reset(),
                }
                let now = now_ms();
                s.offline.store(site.link_down(now), Ordering::Relaxed);
                let report = site.sample(now, interval.as_secs_f64());
                if let Err(error) = s.push(report) {
                    tracing::warn!(%error, "Simulated site could not spool a report.");
                }
            }
        });
        out.push((c.site_id, shared));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_figures_change_and_stay_plausible() {
        let mut s = SimSite::new(8, 1_800_000_000_000, false);
        let a = s.sample(1_800_000_000_000, 10.0);
        let b = s.sample(1_800_000_010_000, 10.0);
        let (ha, hb) = (a.host.unwrap(), b.host.unwrap());
        assert!(hb.interfaces[0].rx_bytes > ha.interfaces[0].rx_bytes);
        assert!(hb.cpu_permille <= 1000 && hb.mem_used_mib <= hb.mem_total_mib);
        assert_eq!(b.devices.len(), 3);
        assert!(!s.link_down(1_800_000_020_000), "outages were disabled");
        assert!(a.events.is_empty() && a.probes.is_empty() && a.traps.is_none());
        assert!(b.devices.iter().all(|d| d.values.is_empty()
            && d.problems.is_empty()
            && d.profile_name.is_empty()
            && d.reach.is_none()));
    }

    /// The devices of site `index`'s samples every 10 s over an hour.
    fn hour(index: u64) -> Vec<Report> {
        let t0 = 1_800_000_000_000;
        let mut s = SimSite::new(index, t0, false);
        (0..360).map(|i| s.sample(t0 + i * 10_000, 10.0)).collect()
    }

    #[test]
    fn a_few_sites_show_partial_answers_traps_and_unreachable_devices() {
        let kinds: Vec<Showcase> = (0..120).map(Showcase::of).collect();
        let count = |k| kinds.iter().filter(|x| **x == k).count();
        assert_eq!(count(Showcase::PartialUps), 6);
        assert_eq!(count(Showcase::TrappingRouter), 6);
        assert_eq!(count(Showcase::UnreachableRouter), 3);
        assert_eq!(count(Showcase::SilentRouter), 3);
        assert!((0..120).all(|i| i % 10 != 3 || Showcase::of(i) == Showcase::None));
        assert!((SHOWCASE_SITES..SHOWCASE_SITES + 400).all(|i| Showcase::of(i) == Showcase::None));

        // A partial UPS: runtime unknown, two problems, a low battery and its traps in the hour.
        let ups = hour(5);
        let u = |r: &Report| r.devices.iter().find(|d| d.name == "ups").unwrap().clone();
        assert!(ups.iter().all(|r| u(r).problems.len() == 2
            && u(r).ups.unwrap().missing == UPS_RUNTIME
            && u(r).status == DeviceStatus::Ok as i32));
        assert!(
            ups.iter()
                .any(|r| u(r).alarms.iter().any(|a| a.name == "battery-low"))
        );
        assert!(ups.iter().any(|r| u(r).alarms.is_empty()));
        let events: Vec<&str> = ups
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.name.as_str()))
            .collect();
        assert!(
            events.contains(&"on-battery") && events.contains(&"battery-low"),
            "{events:?}"
        );

        // A trapping router: link-down and link-up, once a flood; named ports.
        let router = hour(7);
        let events: Vec<(String, u32)> = router
            .iter()
            .flat_map(|r| r.events.iter().map(|e| (e.name.clone(), e.count)))
            .collect();
        assert!(events.contains(&("link-down".into(), 340)), "{events:?}");
        assert!(events.contains(&("link-down".into(), 1)), "{events:?}");
        assert!(events.contains(&("link-up".into(), 1)), "{events:?}");
        let ports = &router[0].devices[2].interfaces;
        assert_eq!(
            (ports[0].alias.as_str(), ports[0].speed_mbps),
            ("uplink to the county network", 100)
        );

        // Unreachable, and answering ping only.
        let r = &hour(17)[0];
        assert_eq!(r.devices[2].status, DeviceStatus::Timeout as i32);
        assert!(!r.devices[2].reach.as_ref().unwrap().ok);
        assert_eq!(r.probes[0].target, "next-hop");
        let r = &hour(37)[0];
        assert!(r.devices[2].reach.as_ref().unwrap().ok && r.probes.is_empty());
    }
}
