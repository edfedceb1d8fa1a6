//! The `backup` bench's satellite part: one incremental backup's new repository files shipped
//! to a partner over an emulated GEO link, through the same code an agent runs — the
//! [`Shipper`] (stages in the repository's order, `backup` transfer class) feeding an
//! [`Outbox`] whose driver sends on the site's QUIC connection, paced at the link's committed
//! rate with tail copies, as the agent's uplink is; at the partner an [`Inbox`] and
//! [`Placement`] put each verified file into its copy of the repository. Needs root
//! (namespaces).
//!
//! Two runs carry the same files: a clean one, and one whose link is cut for `cut` once a
//! third of the bytes arrived (the site reconnects as an agent does). Utilisation is the files'
//! bytes over the time from the shipper's start on an established connection to the last
//! file's receipt, the cut's duration taken out, against the link's rate (Ethernet frames, as
//! `geo-transfer` counts). Re-sent is what the partner's inbox read from chunk streams beyond
//! the files' bytes: bytes that crossed the link twice (the clean run's figure shows that
//! random loss alone costs none at this level; QUIC's own retransmissions are below it).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tiandi_backup::partner::{Placement, ShipConfig, Shipper};
use tiandi_link::LinkProfile;
use tiandi_link::congestion::FixedRateConfig;
use tiandi_link::pki::CONTROLLER_NAME;
use tiandi_satlink::Topology;
use tiandi_satlink::topo::in_netns;
use tiandi_transfer::{Inbox, JobState, Outbox};
use tokio_util::sync::CancellationToken;

use crate::geolink::{FRAME_OVERHEAD, QUIC_PAYLOAD, bench_tls, one_link};

pub struct Geo {
    pub rate_mbit: f64,
    pub rtt_ms: f64,
    pub loss_pct: f64,
    pub cut: Duration,
    pub time_limit: Duration,
}

pub struct GeoRun {
    pub secs: f64,
    pub utilisation: f64,
    pub resent_kb: f64,
    pub reconnects: u32,
}

/// Ships `stage` (a directory holding one incremental's new repository files) clean, then with
/// a cut; (clean, cut).
pub fn run(g: &Geo, stage: &Path, work: &Path) -> anyhow::Result<(GeoRun, GeoRun)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let topo = one_link("tdbk", [10, 204, 0], 17, g.rate_mbit, g.rtt_ms, g.loss_pct)?;
        let clean = ship(&topo, g, stage, work, None, 4450).await;
        let cut = match &clean {
            Ok(_) => ship(&topo, g, stage, work, Some(g.cut), 4451).await,
            Err(_) => Err(anyhow::anyhow!("not run")),
        };
        topo.down();
        Ok((clean?, cut?))
    })
}

async fn ship(
    topo: &Topology,
    g: &Geo,
    stage: &Path,
    work: &Path,
    cut: Option<Duration>,
    port: u16,
) -> anyhow::Result<GeoRun> {
    let files = list(stage)?;
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    let run_dir = work.join(format!("geo-{port}"));
    crate::backup::remove_dir(&run_dir)?;
    std::fs::create_dir_all(&run_dir)?;

    let (server_tls, client_tls) = bench_tls()?;
    let rate_bps = (g.rate_mbit * 1e6 * QUIC_PAYLOAD / (QUIC_PAYLOAD + FRAME_OVERHEAD)) as u64;
    let server_addr = SocketAddr::new(topo.ctl_addr().into(), port);
    let ssock = in_netns(&topo.ctl_ns(), move || UdpSocket::bind(server_addr))??;
    let server = tiandi_link::server_endpoint_on(
        ssock,
        tiandi_link::server_config(server_tls, LinkProfile::Geo.transport())?,
        b"backup geo bench reset key",
    )?;
    // The site's uplink as an agent with `link_rate_mbit` makes it.
    let mut t = LinkProfile::Geo.transport_config();
    t.tail_copies(true);
    t.congestion_controller_factory(Arc::new(FixedRateConfig::new(rate_bps)));
    let client_cfg = tiandi_link::client_config(client_tls, Arc::new(t))?;

    // The partner.
    let db = sled::Config::new().temporary(true).open()?;
    let inbox_dir = run_dir.join("partner-inbox");
    let inbox = Inbox::new(&inbox_dir, db.open_tree("inbox")?, "hub", None)?;
    let stop = CancellationToken::new();
    let hub = {
        let (inbox, stop) = (inbox.clone(), stop.clone());
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let Ok(conn) = incoming.await else { continue };
                let (inbox, stop) = (inbox.clone(), stop.clone());
                tokio::spawn(tiandi_transfer::inbox::accept_loop(
                    inbox,
                    conn,
                    Some("bench-site".into()),
                    stop,
                ));
            }
        })
    };
    let placement = Placement {
        inbox: inbox_dir.clone(),
        peer: None,
        backups: run_dir.join("partner-backups"),
        hold: Duration::from_secs(86_400),
    };

    // The site: the outbox, its driver on each connection, the shipper.
    let site_db = sled::Config::new().temporary(true).open()?;
    let outbox = Outbox::new(site_db.open_tree("outbox")?);
    let cfg = ShipConfig {
        name: "bench".into(),
        path: stage.to_path_buf(),
        to: "hub".into(),
    };
    let shipper = Arc::new(Shipper::new(
        outbox.clone(),
        site_db.open_tree("ship")?,
        &run_dir.join("ship-spool"),
        vec![cfg],
    )?);
    let wire = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reconnects = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (up_tx, mut up_rx) = tokio::sync::watch::channel(false);
    let site =
        {
            let (outbox, stop, site_ns, wire, reconnects) = (
                outbox.clone(),
                stop.clone(),
                topo.site_ns(1),
                wire.clone(),
                reconnects.clone(),
            );
            tokio::spawn(async move {
                let csock = in_netns(&site_ns, || UdpSocket::bind("0.0.0.0:0"))??;
                let client = tiandi_link::client_endpoint_on(csock)?;
                let mut first = true;
                while !stop.is_cancelled() {
                    let connecting =
                        client.connect_with(client_cfg.clone(), server_addr, CONTROLLER_NAME)?;
                    let conn =
                        match tokio::time::timeout(LinkProfile::Geo.connect_timeout(), connecting)
                            .await
                        {
                            Ok(Ok(c)) => c,
                            _ => {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        };
                    if !first {
                        reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    let _ = up_tx.send(true);
                    let session = CancellationToken::new();
                    let driver = tokio::spawn(tiandi_transfer::outbox::drive(
                        outbox.clone(),
                        conn.clone(),
                        "hub".into(),
                        "bench-site".into(),
                        session.clone(),
                    ));
                    // An agent's session ends when the connection does (idle timeout at a cut).
                    tokio::select! {
                        _ = conn.closed() => {}
                        _ = stop.cancelled() => {}
                    }
                    session.cancel();
                    let _ = driver.await;
                    wire.fetch_add(conn.stats().udp_tx.bytes, Ordering::Relaxed);
                    conn.close(0u32.into(), b"done");
                }
                client.close(0u32.into(), b"done");
                anyhow::Ok(())
            })
        };
    // The clock starts with the shipper, on an established connection.
    while !*up_rx.borrow_and_update() {
        up_rx.changed().await?;
    }
    let started = Instant::now();
    tokio::spawn(
        shipper
            .clone()
            .run(Duration::from_secs(1), None, stop.clone()),
    );
    if let Some(cut) = cut {
        let (inbox, link) = (inbox.clone(), topo.link(1).clone());
        tokio::spawn(async move {
            while inbox.chunk_bytes_in.load(Ordering::Relaxed) < total / 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("  cutting the link for {cut:?}");
            link.cut();
            tokio::time::sleep(cut).await;
            link.restore();
            eprintln!("  link restored");
        });
    }
    // Done when every file has a job and every job is delivered (the partner's receipt).
    let secs = loop {
        if started.elapsed() > g.time_limit {
            stop.cancel();
            bail!(
                "the incremental did not reach the partner within {:?}",
                g.time_limit
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The repository's files (the awaits list that goes ahead of the packs is not one).
        let jobs: Vec<_> = outbox
            .list()?
            .into_iter()
            .filter(|j| !j.manifest.name.contains("~awaits~"))
            .collect();
        let delivered = jobs
            .iter()
            .filter(|j| j.state == JobState::Delivered)
            .count();
        if let Some(j) = jobs.iter().find(|j| j.state == JobState::Failed) {
            bail!("{}: {:?}", j.manifest.name, j.error);
        }
        if delivered == files.len() && jobs.len() == files.len() {
            break started.elapsed().as_secs_f64();
        }
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), site).await;
    hub.abort();
    // The partner's copy is the incremental, file for file.
    placement.place();
    let copy = list(&run_dir.join("partner-backups/bench-site/bench"))?;
    if copy != files {
        bail!(
            "the partner's copy differs: {} files of {} arrived",
            copy.len(),
            files.len()
        );
    }
    // The awaits lists sent ahead of the packs are read once too: not "read twice".
    let awaits: u64 = outbox
        .list()?
        .iter()
        .filter(|j| j.manifest.name.contains("~awaits~"))
        .map(|j| j.manifest.size)
        .sum();
    let read = inbox
        .chunk_bytes_in
        .load(Ordering::Relaxed)
        .saturating_sub(awaits);
    let up_secs = secs - cut.map_or(0.0, |c| c.as_secs_f64());
    let r = GeoRun {
        secs,
        utilisation: total as f64 * 8.0 / up_secs / (g.rate_mbit * 1e6),
        resent_kb: read.saturating_sub(total) as f64 / 1000.0,
        reconnects: reconnects.load(Ordering::Relaxed),
    };
    eprintln!(
        "  {} files, {:.1} MB in {:.1} s{}: utilisation {:.3}, {} UDP bytes out, {:.0} kB read twice at the partner, {} reconnects",
        files.len(),
        total as f64 / 1e6,
        secs,
        cut.map_or(String::new(), |c| format!(" ({} s of it cut)", c.as_secs())),
        r.utilisation,
        wire.load(Ordering::Relaxed),
        r.resent_kb,
        r.reconnects
    );
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(r)
}

/// Every file under `dir`: (relative path, size), sorted.
pub fn list(dir: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| d.display().to_string()),
        };
        for e in rd {
            let e = e?;
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir)?.to_string_lossy().into_owned();
                out.push((rel, md.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}
