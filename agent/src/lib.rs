//! The Tiandi site agent: collects host health ([`collect`]) and SNMP device figures
//! ([`snmp`]), and hands each report to `tiandi-uplink`, which keeps it in a disk spool until
//! the controller acknowledges it and sends it over mutual-TLS QUIC; runs the site's file
//! transfers ([`transfers`]). `tiandi-agent simulate` runs `tiandi-sim`'s simulated sites.

pub mod cli;
pub mod collect;
pub mod config;
pub mod device;
pub mod profile;
pub mod reach;
pub mod simulate;
pub mod snmp;
pub mod transfers;
pub mod traps;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tiandi_proto::Report;
use tiandi_uplink::{self as uplink, identity, spool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

/// How long enrollment keeps coming back to a controller that says it is busy.
const ENROLL_BUSY_FOR: Duration = Duration::from_secs(600);

/// Reports held in memory while the spool cannot be written (a day at 10 s).
const MAX_UNSPOOLED: usize = 8640;

pub use tiandi_link::clock::now_ms;

/// Enrolls this site: generates its key, redeems the token, saves the identity.
pub async fn enroll(
    controller: &str,
    token: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<identity::SiteInfo> {
    let addr = tokio::net::lookup_host(controller)
        .await
        .with_context(|| format!("resolving {controller}"))?
        .next()
        .with_context(|| format!("{controller} resolves to no address"))?;
    let endpoint = tiandi_link::client_endpoint(addr)?;
    // A controller busy taking thousands of sites in turns this one away before the handshake
    // (the token is not spent): come back when it says, for up to ENROLL_BUSY_FOR.
    let started = std::time::Instant::now();
    let enrolled = loop {
        match tiandi_link::enroll::enroll(&endpoint, addr, token, Duration::from_secs(30)).await {
            Err(e) if e.is_busy() && started.elapsed() < ENROLL_BUSY_FOR => {
                let wait = e.retry_after_jittered().unwrap_or_else(|| {
                    Duration::from_secs(2).mul_f64(1.0 + 0.1 * rand::random::<f64>())
                });
                info!(
                    retry_in_ms = wait.as_millis() as u64,
                    "The controller is busy enrolling others; trying again."
                );
                tokio::time::sleep(wait).await;
            }
            r => break r.with_context(|| format!("enrolling with {controller}"))?,
        }
    };
    identity::save(data_dir, &enrolled)?;
    endpoint.wait_idle().await;
    Ok(identity::SiteInfo {
        site_id: enrolled.site_id,
        province: enrolled.province,
    })
}

/// One endpoint per path, bound to the path's interface or address, with the path's
/// transport.
async fn path_links(
    cfg: &Config,
    id: &identity::Identity,
) -> anyhow::Result<Vec<uplink::PathLink>> {
    let mut links = Vec::new();
    for (i, p) in cfg.paths.iter().enumerate() {
        let controller = p
            .controller
            .clone()
            .unwrap_or_else(|| cfg.controller.clone());
        let addr = tokio::net::lookup_host(&controller)
            .await
            .with_context(|| format!("paths[{i}] ({}): resolving {controller}", p.name))?
            .next()
            .with_context(|| {
                format!(
                    "paths[{i}] ({}): {controller} resolves to no address",
                    p.name
                )
            })?;
        let socket = tiandi_link::paths::bind_socket(p.bind.as_deref(), addr)
            .with_context(|| format!("paths[{i}] ({}): its socket", p.name))?;
        let endpoint = tiandi_link::client_endpoint_on(socket)?;
        let tls = tiandi_link::tls::site_client_tls(&id.ca_pem, &id.cert_pem, &id.key_pem)
            .context("loading the site identity")?;
        let client = tiandi_link::client_config(tls, cfg.path_transport(p))?;
        links.push(uplink::PathLink {
            endpoint,
            client,
            controller,
            connect_timeout: p.profile.unwrap_or(cfg.profile).connect_timeout(),
        });
    }
    Ok(links)
}

/// Runs the agent until `cancel` fires.
pub async fn run(cfg: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let id = identity::load(&cfg.data_dir)?;
    let tls = tiandi_link::tls::site_client_tls(&id.ca_pem, &id.cert_pem, &id.key_pem)
        .context("loading the site identity")?;
    // The rate toward the controller: the config's, else the modem's once it reports one.
    let uplink_rate = tiandi_link::congestion::RateSlot::default();
    let client = tiandi_link::client_config(tls, cfg.uplink_transport(uplink_rate.clone()))?;
    let spool_dir = cfg.data_dir.join("spool");
    let interval_ms = (cfg.interval_s * 1000.0) as i64;
    let spool = spool::Spool::open_dir(
        &spool_dir,
        cfg.spool_quota_mb * 1024 * 1024,
        interval_ms,
        true,
    )
    .with_context(|| {
        format!(
            "opening the spool {} (is another agent running?)",
            spool_dir.display()
        )
    })?;
    info!(site = %id.info.site_id, province = %id.info.province, spooled = spool.len(), next_seq = spool.next_seq(), controller = %cfg.controller, "Agent starting.");
    let shared = uplink::Shared::new(spool);
    let addr = tokio::net::lookup_host(&cfg.controller)
        .await
        .with_context(|| format!("resolving controller {}", cfg.controller))?
        .next()
        .with_context(|| format!("{} resolves to no address", cfg.controller))?;
    let endpoint = tiandi_link::client_endpoint(addr)?;
    // Files the controller (or the province relay) sends land in data_dir/inbox; their state
    // and the outbox of files this site sends live beside it.
    let transfers_db = sled::Config::new()
        .path(cfg.data_dir.join("transfers"))
        .cache_capacity(4 * 1024 * 1024)
        .open()
        .with_context(|| format!("opening {}", cfg.data_dir.join("transfers").display()))?;
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(256);
    let inbox = tiandi_transfer::Inbox::new(
        &cfg.data_dir.join("inbox"),
        transfers_db.open_tree("inbox")?,
        &id.info.site_id,
        cfg.relay.is_some().then_some(events_tx),
    )
    .context("opening the transfer inbox")?;
    let outbox = tiandi_transfer::Outbox::new(transfers_db.open_tree("outbox")?);
    if !cfg.devices.is_empty() {
        // Whether the link is in a rain fade is known after the first poll of the modem:
        // backups wait for it.
        outbox.hold(
            tiandi_transfer::Priority::Backup,
            Some("waiting for the first poll of the site's devices".into()),
        );
    }
    let site_transfers = Arc::new(transfers::SiteTransfers {
        site_id: id.info.site_id.clone(),
        inbox: inbox.clone(),
        outbox: outbox.clone(),
        upstream: tokio::sync::watch::channel(None).0,
    });
    let mut tasks = vec![
        // Repositories of partners (the controller's) that arrive in the inbox go into
        // data_dir/backups/controller/<repo>/.
        tokio::spawn(
            tiandi_backup::partner::Placement {
                inbox: cfg.data_dir.join("inbox"),
                peer: Some(transfers::CONTROLLER.into()),
                backups: cfg.data_dir.join("backups"),
                hold: Duration::from_secs(u64::from(cfg.backup_trash_days) * 86_400),
            }
            .run(cancel.clone()),
        ),
        tokio::spawn(transfers::intake_loop(
            cfg.data_dir.clone(),
            outbox.clone(),
            id.info.site_id.clone(),
            cancel.clone(),
        )),
        // Abandoned part files and old receipts do not pile up on a site's small disk.
        tokio::spawn(tiandi_transfer::expire_loop(
            inbox.clone(),
            outbox.clone(),
            cancel.clone(),
        )),
    ];
    // Backups: the jobs the controller pushes run here on their schedules, into local
    // repositories (data_dir/backup/repos/); those and `backup_repos` are shipped to the
    // controller in the backup class; each run's result goes to the controller.
    let shipper = Arc::new(
        tiandi_backup::partner::Shipper::new(
            outbox.clone(),
            transfers_db.open_tree("backup-ship")?,
            &cfg.data_dir.join("backup-ship"),
            cfg.backup_repos.clone(),
        )
        .context("starting backup shipping")?,
    );
    tasks.push(tokio::spawn(shipper.clone().run(
        Duration::from_secs(1),
        Some(cfg.data_dir.join("backup-ship").join("status.json")),
        cancel.clone(),
    )));
    let scheduler = tiandi_backup::scheduler::Scheduler::new(
        &id.info.site_id,
        &cfg.data_dir.join("backup"),
        transfers_db.open_tree("backup-jobs")?,
        shipper,
        tiandi_backup::scheduler::outbox_sink(
            outbox.clone(),
            transfers::CONTROLLER,
            &cfg.data_dir.join("backup").join("results"),
        ),
    )
    .map_err(anyhow::Error::msg)
    .context("starting the backup scheduler")?;
    scheduler.set_leases(Arc::new(transfers::ControllerLeases {
        site_id: id.info.site_id.clone(),
        upstream: site_transfers.upstream.subscribe(),
        rt: tokio::runtime::Handle::current(),
    }));
    tasks.push(tokio::spawn(
        scheduler.run(
            Some(
                cfg.data_dir
                    .join("inbox")
                    .join(tiandi_backup::scheduler::PUSHED_NAME),
            ),
            Some(cfg.data_dir.join("backup").join("status.json")),
            cancel.clone(),
        ),
    ));
    if let Some(relay) = &cfg.relay {
        let tls = tiandi_link::tls::relay_server_tls(
            &id.ca_pem,
            &id.cert_pem,
            &id.key_pem,
            Arc::new(tiandi_link::tls::SameProvince(id.info.province.clone())),
        )
        .context("the relay's TLS (re-enroll this site if its certificate predates relays)")?;
        let server = tiandi_link::server_config(tls, cfg.profile.transport())?;
        let socket = std::net::UdpSocket::bind(relay.listen)
            .with_context(|| format!("relay: binding {}", relay.listen))?;
        let relay_ep =
            tiandi_link::server_endpoint_on(socket, server, &rand::random::<[u8; 32]>())?;
        info!(listen = %relay.listen, province = %id.info.province, "Relaying for the sites of this province.");
        tasks.push(tokio::spawn(tiandi_transfer::hop::serve_downstream(
            relay_ep,
            outbox.clone(),
            id.info.site_id.clone(),
            |c| {
                tiandi_link::peer_identity(c).map(|i| tiandi_transfer::hop::Peer {
                    site: i.site_id,
                    serial: i.serial,
                    province: i.province,
                })
            },
            Arc::new(tiandi_transfer::hop::UpstreamCheck::with_max_age(
                site_transfers.upstream.subscribe(),
                relay.confirmed_within(),
            )),
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(tiandi_transfer::hop::forward_loop(
            inbox.clone(),
            outbox.clone(),
            id.info.site_id.clone(),
            events_rx,
            cancel.clone(),
        )));
        tasks.push(tokio::spawn(tiandi_transfer::hop::report_upstream(
            outbox.clone(),
            site_transfers.upstream.subscribe(),
            cancel.clone(),
        )));
    }
    if let Some(via) = &cfg.via_relay {
        tasks.push(tokio::spawn(transfers::from_relay(
            endpoint.clone(),
            client.clone(),
            via.clone(),
            inbox.clone(),
            cfg.profile.connect_timeout(),
            cancel.clone(),
        )));
    }
    let uplink_cfg = uplink::UplinkConfig {
        controller: cfg.controller.clone(),
        standby: cfg.standby_controllers.clone(),
        site_id: id.info.site_id.clone(),
        client,
        interval_ms: interval_ms as u32,
        connect_timeout: cfg.profile.connect_timeout(),
        on_session: Some(site_transfers),
    };
    let uplink = if cfg.paths.is_empty() {
        tokio::spawn(uplink::run(
            endpoint.clone(),
            uplink_cfg,
            shared.clone(),
            cancel.clone(),
        ))
    } else {
        let links = path_links(&cfg, &id).await?;
        let board = tiandi_link::paths::Board::new(cfg.paths.clone(), cfg.path_policy.clone());
        info!(paths = ?cfg.paths.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "Dual-homed: a connection to the controller over each path.");
        tokio::spawn(uplink::run_paths(
            links,
            uplink_cfg,
            board,
            shared.clone(),
            cancel.clone(),
        ))
    };

    let host = Arc::new(Mutex::new(
        collect::HostCollector::new(cfg.ignore_mounts.clone(), cfg.ignore_interfaces.clone())
            .map_err(anyhow::Error::msg)?,
    ));
    let profiles = cfg.profiles().map_err(anyhow::Error::msg)?;
    let mut pollers: Vec<snmp::Poller> = cfg
        .devices
        .iter()
        .map(|d| {
            let p = profiles
                .get(&d.profile)
                .with_context(|| format!("device {}: no profile {:?}", d.name, d.profile))?;
            Ok(snmp::Poller::new(d.clone(), p.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    // Traps and informs: a listener that wakes the loop below when a device speaks up.
    let traps = match &cfg.traps {
        None => None,
        Some(t) => {
            let traps = traps::Traps::new(t.per_minute);
            let devices = pollers
                .iter()
                .map(|p| (p.config().clone(), p.profile().clone()))
                .collect();
            let boots = traps::next_boots(&cfg.data_dir);
            let (t, traps2, cancel2, site) = (
                t.clone(),
                traps.clone(),
                cancel.clone(),
                id.info.site_id.clone(),
            );
            tasks.push(tokio::spawn(async move {
                if let Err(error) = traps::run(t, devices, site, boots, traps2, cancel2).await {
                    warn!(
                        error = format!("{error:#}"),
                        "The trap listener stopped: devices are only polled."
                    );
                }
            }));
            Some(traps)
        }
    };
    // Reachability: each device's echo and ports, the next hop, the configured targets.
    let prober = reach::Prober::new(cfg.reachability.clone());
    // An out-of-cycle report (a trap) no sooner than this after the last one.
    const TRAP_REPORT_GAP: Duration = Duration::from_secs(1);
    let mut last_report = std::time::Instant::now() - TRAP_REPORT_GAP;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unspooled: std::collections::VecDeque<Report> = std::collections::VecDeque::new();
    // The last rain fade seen (its reason), kept while the modem does not answer.
    let mut fade_seen: Option<String> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            _ = shared.sample_now.notified() => tick.reset(),
            _ = async { traps.as_ref().expect("guarded").notify.notified().await }, if traps.is_some() => {
                // A few more may follow (a UPS sends on-battery and an alarm together): take
                // them in the same report; and no more than one such report a second.
                let wait = TRAP_REPORT_GAP.saturating_sub(last_report.elapsed()).max(Duration::from_millis(150));
                tokio::time::sleep(wait).await;
                tick.reset();
            }
        }
        last_report = std::time::Instant::now();
        let taken_ms = now_ms();
        let h = host.clone();
        let host_sample =
            tokio::task::spawn_blocking(move || h.lock().expect("collector poisoned").sample());
        let (mut devices, reached) =
            tokio::join!(snmp::poll_all(&mut pollers), prober.round(&cfg.devices));
        for (d, r) in devices.iter_mut().zip(reached.devices) {
            d.reach = r;
        }
        let host_sample = host_sample.await.ok();
        if cfg.link_rate_mbit.is_none()
            && let Some(kbps) = devices
                .iter()
                .filter_map(|d| d.modem.as_ref())
                .map(|m| m.tx_rate_kbps)
                .find(|r| *r > 0)
        {
            uplink_rate.set(tiandi_link::congestion::udp_payload_bps(
                f64::from(kbps) * 1e3,
            ));
        }
        // A rain fade holds backups back (they pause and resume where they were); reports,
        // alarms and other files go on. A round in which no modem answered (a slow or busy
        // modem) changes nothing: the last verdict stands until one answers again.
        let modem_answered = devices
            .iter()
            .any(|d| d.status == tiandi_proto::DeviceStatus::Ok as i32 && d.modem.is_some());
        let device_failed = devices
            .iter()
            .any(|d| d.status != tiandi_proto::DeviceStatus::Ok as i32);
        let fade = if !modem_answered && device_failed && fade_seen.is_some() {
            fade_seen.clone()
        } else {
            devices
                .iter()
                .filter(|d| d.status == tiandi_proto::DeviceStatus::Ok as i32)
                .filter_map(|d| d.modem.as_ref().map(|m| (&d.name, m.esno_db_x10)))
                .find(|(_, e)| f64::from(*e) / 10.0 < cfg.rain_fade_esno_db)
                .map(|(n, e)| {
                    format!(
                        "rain fade: {n} Es/No {:.1} dB (below {:.1})",
                        f64::from(e) / 10.0,
                        cfg.rain_fade_esno_db
                    )
                })
        };
        if outbox.hold(tiandi_transfer::Priority::Backup, fade.clone()) {
            match &fade {
                Some(why) => warn!(%why, "Backups wait out the rain fade."),
                None if fade_seen.is_some() => {
                    info!("The rain fade is over: backups go on.")
                }
                None => {}
            }
        }
        fade_seen = fade;
        let report = Report {
            taken_ms,
            host: host_sample,
            devices,
            probes: reached.probes,
            events: traps.as_ref().map(|t| t.take()).unwrap_or_default(),
            traps: traps.as_ref().map(|t| t.stats()),
            ..Default::default()
        };
        if !report.events.is_empty() {
            info!(
                events = report.events.len(),
                "Device events go with this report."
            );
        }
        // A spool write can fail (disk full): keep the reports in memory, in order, and retry
        // at every tick. Bounded: beyond MAX_UNSPOOLED the two oldest held reports are merged
        // (downsampled) rather than dropped.
        unspooled.push_back(report);
        while let Some(r) = unspooled.pop_front() {
            let t = std::time::Instant::now();
            match shared.push(r.clone()) {
                Ok(seq) if t.elapsed() > Duration::from_millis(500) => {
                    warn!(
                        seq,
                        took_ms = t.elapsed().as_millis() as u64,
                        "Spooling a report was slow (disk busy?)."
                    );
                }
                Ok(seq) => tracing::debug!(seq, "Report spooled."),
                Err(error) => {
                    unspooled.push_front(r);
                    warn!(%error, held = unspooled.len(), "Could not spool reports (disk full?); holding them in memory and retrying.");
                    break;
                }
            }
        }
        if unspooled.len() > MAX_UNSPOOLED
            && let (Some(a), Some(b)) = (unspooled.pop_front(), unspooled.pop_front())
            && let Some(m) = tiandi_proto::merge(&[a, b])
        {
            unspooled.push_front(m);
        }
    }
    let _ = uplink.await;
    for t in tasks {
        let _ = t.await;
    }
    endpoint.wait_idle().await;
    if let Err(error) = shared.spool.lock().expect("spool lock poisoned").flush() {
        warn!(%error, "Final spool flush failed.");
    }
    info!("Agent stopped.");
    Ok(())
}
