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
    Device, DeviceInterface, DeviceStatus, Filesystem, Host, Interface, Modem, Profile, Report, Ups,
};
use tokio_util::sync::CancellationToken;

use tiandi_transfer::now_ms;
use tiandi_uplink::spool::Spool;
use tiandi_uplink::{self as uplink, Shared};

/// One simulated site's figures.
pub struct SimSite {
    rng: StdRng,
    boot_ms: i64,
    cpu: f64,
    mem_used: f64,
    mem_total: u64,
    fs_root: f64,
    fs_data: f64,
    rx: [u64; 2],
    tx: [u64; 2],
    router_in: [u64; 2],
    router_out: [u64; 2],
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
            router_in: [
                rng.random_range(0..1u64 << 36),
                rng.random_range(0..1u64 << 36),
            ],
            router_out: [
                rng.random_range(0..1u64 << 35),
                rng.random_range(0..1u64 << 35),
            ],
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
        Report {
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
                    interfaces: vec![
                        DeviceInterface {
                            index: 1,
                            name: "wan".into(),
                            oper_up: true,
                            in_octets: self.router_in[0],
                            out_octets: self.router_out[0],
                            ..Default::default()
                        },
                        DeviceInterface {
                            index: 2,
                            name: "lan".into(),
                            oper_up: true,
                            in_octets: self.router_in[1],
                            out_octets: self.router_out[1],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
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
    for (n, c) in creds.into_iter().enumerate() {
        if n > 0 && n % SITES_PER_SOCKET == 0 {
            endpoint = tiandi_link::client_endpoint(addr)?;
        }
        let tls = tiandi_link::tls::site_client_tls(&c.ca_pem, &c.cert_pem, &c.key_pem)?;
        let client = tiandi_link::client_config(tls, opts.profile.transport())?;
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
        tokio::spawn(uplink::run(
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
        let mut s = SimSite::new(7, 1_800_000_000_000, false);
        let a = s.sample(1_800_000_000_000, 10.0);
        let b = s.sample(1_800_000_010_000, 10.0);
        let (ha, hb) = (a.host.unwrap(), b.host.unwrap());
        assert!(hb.interfaces[0].rx_bytes > ha.interfaces[0].rx_bytes);
        assert!(hb.cpu_permille <= 1000 && hb.mem_used_mib <= hb.mem_total_mib);
        assert_eq!(b.devices.len(), 3);
        assert!(!s.link_down(1_800_000_020_000), "outages were disabled");
    }
}
