//! `geo-transfer`: a Tiandi transfer over one emulated satellite link (tiandi-satlink between
//! network namespaces), against TCP with BBR and with Cubic carrying the same bytes, and a
//! Tiandi transfer with a link cut in the middle. Needs root.
//!
//! The hub (the controller's side) is the QUIC server and the sender, with Tiandi's fixed-rate
//! controller at the link's rate; the site is the client and the receiver (a real [`Inbox`]:
//! chunks checked, fsynced, acknowledged, the whole file checked and renamed into place), and
//! it reconnects when its connection dies, as an agent does. Tiandi's rate is file bytes over
//! the time from the hub starting the transfer on the site's (established) connection to the
//! receipt at the hub: the offer, the ramp, every chunk check, the final whole-file check and
//! the receipt's trip back included; in service the connection is the agent's, open long
//! before, so its handshake is not part of a transfer. `resent_after_cut_pct` is what the cut cost on the
//! wire: the UDP bytes the hub sent in the cut run beyond those of the clean run, over the
//! file's size (chunk bytes written to streams overcount: a stream buffers ahead of the link,
//! and what sat in the buffer at the cut never left the hub).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::RngCore;
use tiandi_link::LinkProfile;
use tiandi_link::congestion::FixedRateConfig;
use tiandi_link::pki::CONTROLLER_NAME;
use tiandi_satlink::Topology;
use tiandi_satlink::topo::in_netns;
use tiandi_transfer::send::Progress;
use tiandi_transfer::{Inbox, Manifest, SendOptions, SendOutcome, send_file};
use tokio_util::sync::CancellationToken;

use crate::geolink::{FRAME_OVERHEAD, QUIC_PAYLOAD, bench_tls, one_link, tcp};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 100.0)]
    pub size_mb: f64,
    #[arg(long, default_value_t = 20.0)]
    pub rate_mbit: f64,
    #[arg(long, default_value_t = 600.0)]
    pub rtt_ms: f64,
    #[arg(long, default_value_t = 1.0)]
    pub loss_pct: f64,
    /// How long the link is cut in the last run (s).
    #[arg(long, default_value_t = 60.0)]
    pub cut_s: f64,
    /// Longest a Tiandi transfer may run (s).
    #[arg(long, default_value = "600", value_parser = crate::harness::secs)]
    pub time_limit: Duration,
    /// Longest a TCP transfer may run (s); a slower one is counted up to then.
    #[arg(long, default_value = "120", value_parser = crate::harness::secs)]
    pub tcp_time_limit: Duration,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Warnings by default; RUST_LOG=tiandi_transfer=debug shows each attempt's Have.
    tiandi_link::init_logging("warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

struct Run {
    mbit: f64,
    sent_bytes: u64,
    /// UDP payload bytes the hub sent, every connection of the run included.
    wire_bytes: u64,
    reconnects: u32,
}

async fn run_async(a: Args) -> anyhow::Result<()> {
    let size = (a.size_mb * 1e6) as u64;
    let topo = one_link("tdgt", [10, 203, 0], 11, a.rate_mbit, a.rtt_ms, a.loss_pct)?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("dataset.bin");
    write_random(&src, size)?;
    let manifest = Manifest::of_file(&src)?;
    eprintln!(
        "link: {} Mbit/s, {} ms RTT, {} % loss each way; {} MB ({} chunks of {} KiB) hub to site",
        a.rate_mbit,
        a.rtt_ms,
        a.loss_pct,
        a.size_mb,
        manifest.chunk_count(),
        manifest.chunk_size / 1024
    );
    let quic_rate = (a.rate_mbit * 1e6 * QUIC_PAYLOAD / (QUIC_PAYLOAD + FRAME_OVERHEAD)) as u64;

    let clean = tiandi(
        &topo,
        &a,
        &src,
        &manifest,
        quic_rate,
        None,
        4440,
        work.path(),
    )
    .await?;
    eprintln!(
        "tiandi: {:.2} Mbit/s, {} chunk bytes sent for {} ({} reconnects)",
        clean.mbit, clean.sent_bytes, size, clean.reconnects
    );
    let (ctl, site, ip, limit) = (
        topo.ctl_ns(),
        topo.site_ns(1),
        topo.ctl_addr(),
        a.tcp_time_limit,
    );
    let bbr = tokio::task::spawn_blocking(move || tcp(&ctl, &site, ip.into(), size, "bbr", limit))
        .await??;
    eprintln!("tcp bbr: {bbr:.2} Mbit/s");
    let (ctl, site, ip, limit) = (
        topo.ctl_ns(),
        topo.site_ns(1),
        topo.ctl_addr(),
        a.tcp_time_limit,
    );
    let cubic =
        tokio::task::spawn_blocking(move || tcp(&ctl, &site, ip.into(), size, "cubic", limit))
            .await??;
    eprintln!("tcp cubic: {cubic:.2} Mbit/s");
    let cut = tiandi(
        &topo,
        &a,
        &src,
        &manifest,
        quic_rate,
        Some(Duration::from_secs_f64(a.cut_s)),
        4441,
        work.path(),
    )
    .await?;
    // What the cut cost on the wire: the hub's UDP bytes beyond those of the clean run (which
    // carries the same file through the same random loss).
    let resent_pct = cut.wire_bytes.saturating_sub(clean.wire_bytes) as f64 * 100.0 / size as f64;
    eprintln!(
        "tiandi with a {} s cut: {:.2} Mbit/s overall; {} UDP bytes sent against {} in the clean run ({resent_pct:.2} % of the file more); {} chunk bytes written to streams ({} reconnects)",
        a.cut_s, cut.mbit, cut.wire_bytes, clean.wire_bytes, cut.sent_bytes, cut.reconnects
    );
    topo.down();
    println!(
        "geo-transfer size_mb={} rate_mbit={} rtt_ms={} loss_pct={} tiandi_mbit={:.2} tcp_bbr_mbit={bbr:.2} tcp_cubic_mbit={cubic:.2} utilisation={:.3} resent_after_cut_pct={resent_pct:.2}",
        a.size_mb,
        a.rate_mbit,
        a.rtt_ms,
        a.loss_pct,
        clean.mbit,
        clean.mbit / a.rate_mbit
    );
    Ok(())
}

fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// One Tiandi transfer hub → site; with `cut`, the link is cut for that long once a third of
/// the file is acknowledged.
#[allow(clippy::too_many_arguments)]
async fn tiandi(
    topo: &Topology,
    a: &Args,
    src: &Path,
    manifest: &Manifest,
    rate_bps: u64,
    cut: Option<Duration>,
    port: u16,
    work: &Path,
) -> anyhow::Result<Run> {
    let (server_tls, client_tls) = bench_tls()?;
    let mut t = LinkProfile::Geo.transport_config();
    t.congestion_controller_factory(Arc::new(FixedRateConfig::new(rate_bps)));
    let server_addr = SocketAddr::new(topo.ctl_addr().into(), port);
    let ssock = in_netns(&topo.ctl_ns(), move || UdpSocket::bind(server_addr))??;
    let server = tiandi_link::server_endpoint_on(
        ssock,
        tiandi_link::server_config(server_tls, Arc::new(t))?,
        b"geo-transfer bench reset key",
    )?;
    let client_cfg = tiandi_link::client_config(client_tls, LinkProfile::Geo.transport())?;

    // The site: a receiver that reconnects whenever its connection dies.
    let inbox_dir: PathBuf = work.join(format!("inbox-{port}"));
    let db = sled::Config::new().temporary(true).open()?;
    let inbox = Inbox::new(&inbox_dir, db.open_tree("inbox")?, "bench-site", None)?;
    let stop = CancellationToken::new();
    let site_ns = topo.site_ns(1);
    let site = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let csock = in_netns(&site_ns, || UdpSocket::bind("0.0.0.0:0"))??;
            let client = tiandi_link::client_endpoint_on(csock)?;
            while !stop.is_cancelled() {
                let connecting =
                    client.connect_with(client_cfg.clone(), server_addr, CONTROLLER_NAME)?;
                let conn = match tokio::time::timeout(
                    LinkProfile::Geo.connect_timeout(),
                    connecting,
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    _ => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                // The agent's acceptor: control streams and chunk streams.
                tiandi_transfer::inbox::accept_loop(inbox.clone(), conn, None, stop.clone()).await;
            }
            client.close(0u32.into(), b"done");
            anyhow::Ok(())
        })
    };

    // The hub: accept the site's connection, send; after a transient failure, wait for the
    // site's next connection and send again (the receiver says what it already holds).
    let mut started: Option<Instant> = None;
    let progress = Arc::new(Progress::default());
    let opts = SendOptions {
        transfer_id: format!("bench-{port}"),
        origin: "controller".into(),
        fresh: true,
        ..SendOptions::default()
    };
    if let Some(cut) = cut {
        let (p, link, third) = (progress.clone(), topo.link(1).clone(), manifest.size / 3);
        tokio::spawn(async move {
            while p.acked_bytes.load(Ordering::Relaxed) < third {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!("  cutting the link for {cut:?}");
            link.cut();
            tokio::time::sleep(cut).await;
            link.restore();
            eprintln!("  link restored");
        });
    }
    // Steady-state rate: acknowledged bytes between 10 % and 90 % of the file.
    let steady = {
        let (p, size) = (progress.clone(), manifest.size);
        tokio::spawn(async move {
            let mut t10 = None;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let acked = p.acked_bytes.load(Ordering::Relaxed);
                if t10.is_none() && acked >= size / 10 {
                    t10 = Some((Instant::now(), acked));
                }
                if let Some((t, a)) = t10
                    && acked >= size / 10 * 9
                {
                    let mbit = (acked - a) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
                    eprintln!("  steady rate (10 % to 90 % acknowledged): {mbit:.2} Mbit/s");
                    return;
                }
            }
        })
    };
    let mut reconnects = 0;
    let mut wire_bytes = 0u64;
    let receipt = loop {
        if started.is_some_and(|s| s.elapsed() > a.time_limit) {
            bail!("the transfer did not finish within {:?}", a.time_limit);
        }
        let incoming = tokio::time::timeout(a.time_limit, server.accept())
            .await
            .context("no connection from the site")?
            .context("endpoint closed")?;
        let conn = match incoming.await {
            Ok(c) => c,
            Err(_) => continue,
        };
        // The clock starts when the hub starts the transfer on the site's connection: in
        // service that connection is the agent's, up long before (its handshake is no part
        // of a transfer).
        started.get_or_insert_with(Instant::now);
        let result = send_file(&conn, src, manifest, &opts, &progress, &|| false).await;
        let st = conn.stats();
        wire_bytes += st.udp_tx.bytes;
        eprintln!(
            "  connection {}: {} UDP bytes out, {} packets lost, {} chunk bytes written so far, {} acknowledged",
            reconnects + 1,
            st.udp_tx.bytes,
            st.path.lost_packets,
            progress.sent_bytes.load(Ordering::Relaxed),
            progress.acked_bytes.load(Ordering::Relaxed)
        );
        match result {
            Ok(SendOutcome::Delivered(r)) => break r,
            Ok(SendOutcome::Paused) => bail!("paused without a window"),
            Err(e) if e.is_transient() => {
                eprintln!("  sender: {e}; waiting for the site to reconnect");
                conn.close(0u32.into(), b"stalled");
                reconnects += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let secs = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(f64::NAN);
    steady.abort();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), site).await;
    server.close(0u32.into(), b"done");
    // Check what arrived, byte for byte.
    let got = tiandi_transfer::inbox::hash_file(&inbox_dir.join(&manifest.name))?;
    if got != manifest.file_hash || receipt.file_hash != manifest.id_hex() {
        bail!("the received file does not match");
    }
    Ok(Run {
        mbit: manifest.size as f64 * 8.0 / secs / 1e6,
        sent_bytes: progress.sent_bytes.load(Ordering::Relaxed),
        wire_bytes,
        reconnects,
    })
}
