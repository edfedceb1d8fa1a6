//! `geo-link`: the transport alone over one emulated satellite link (tiandi-satlink between
//! network namespaces): the same bytes, hub to site, by QUIC with Tiandi's fixed-rate
//! controller and GEO windows, by QUIC with quinn's Cubic and the same windows, and by TCP
//! with BBR and with Cubic. Goodput is counted at the receiver from the moment the sender
//! starts writing (start-up included) to the last byte; a transfer still running at the time
//! limit is counted up to then. Needs root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tiandi_link::congestion::FixedRateConfig;
use tiandi_link::pki::{CONTROLLER_NAME, Ca, site_key_and_csr};
use tiandi_link::tls::{CertPolicy, Rejection};
use tiandi_link::{LinkProfile, SiteIdentity};
use tiandi_satlink::topo::in_netns;
use tiandi_satlink::{Shape, Spec, Topology};

/// Ethernet + IPv4 + UDP bytes around a full-size QUIC packet (1452 bytes of UDP payload on a
/// 1500-byte MTU): the fixed-rate controller counts UDP payload, the link counts frames.
pub(crate) const FRAME_OVERHEAD: f64 = 14.0 + 20.0 + 8.0;
pub(crate) const QUIC_PAYLOAD: f64 = 1452.0;

#[derive(Debug)]
pub(crate) struct AnySite;
impl CertPolicy for AnySite {
    fn check(&self, _id: &SiteIdentity) -> Result<(), Rejection> {
        Ok(())
    }
}

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
    /// Longest any one transfer may run (s); a slower one is counted up to then.
    #[arg(long, default_value = "120", value_parser = crate::harness::secs)]
    pub time_limit: Duration,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: Args) -> anyhow::Result<()> {
    let bytes = (a.size_mb * 1e6) as u64;
    let topo = one_link("tdgl", [10, 202, 0], 7, a.rate_mbit, a.rtt_ms, a.loss_pct)?;
    let (ctl_ns, site_ns) = (topo.ctl_ns(), topo.site_ns(1));
    let ctl_ip = topo.ctl_addr();
    eprintln!(
        "link: {} Mbit/s, {} ms RTT, {} % loss each way; {} MB hub to site; limit {:?} each",
        a.rate_mbit, a.rtt_ms, a.loss_pct, a.size_mb, a.time_limit
    );

    let quic_rate = (a.rate_mbit * 1e6 * QUIC_PAYLOAD / (QUIC_PAYLOAD + FRAME_OVERHEAD)) as u64;
    let fixed = quic(
        &ctl_ns,
        &site_ns,
        ctl_ip.into(),
        bytes,
        Some(quic_rate),
        a.time_limit,
    )
    .await?;
    eprintln!("quic fixed-rate: {fixed:.2} Mbit/s");
    let cubic_q = quic(&ctl_ns, &site_ns, ctl_ip.into(), bytes, None, a.time_limit).await?;
    eprintln!("quic cubic: {cubic_q:.2} Mbit/s");
    let (ctl, site, limit) = (ctl_ns.clone(), site_ns.clone(), a.time_limit);
    let bbr =
        tokio::task::spawn_blocking(move || tcp(&ctl, &site, ctl_ip.into(), bytes, "bbr", limit))
            .await??;
    eprintln!("tcp bbr: {bbr:.2} Mbit/s");
    let (ctl, site, limit) = (ctl_ns.clone(), site_ns.clone(), a.time_limit);
    let cubic =
        tokio::task::spawn_blocking(move || tcp(&ctl, &site, ctl_ip.into(), bytes, "cubic", limit))
            .await??;
    eprintln!("tcp cubic: {cubic:.2} Mbit/s");
    let st = topo.link(1).status();
    eprintln!(
        "link counters hub->site: {} frames in, {} queue drops, {} lost",
        st.down_counters.frames_in, st.down_counters.queue_drops, st.down_counters.lost
    );
    topo.down();
    println!(
        "geo-link size_mb={} rate_mbit={} rtt_ms={} loss_pct={} quic_fixed_mbit={fixed:.2} quic_cubic_mbit={cubic_q:.2} tcp_bbr_mbit={bbr:.2} tcp_cubic_mbit={cubic:.2} utilisation={:.3}",
        a.size_mb,
        a.rate_mbit,
        a.rtt_ms,
        a.loss_pct,
        fixed / a.rate_mbit
    );
    Ok(())
}

/// One emulated link, hub to site: `rate_mbit` and half of `rtt_ms` each way, `loss_pct`
/// each way, a 1 MB drop-tail queue.
pub(crate) fn one_link(
    prefix: &str,
    net: [u8; 3],
    seed: u64,
    rate_mbit: f64,
    rtt_ms: f64,
    loss_pct: f64,
) -> anyhow::Result<Topology> {
    let shape = Shape {
        rate_kbit: (rate_mbit * 1000.0) as u64,
        delay_ms: rtt_ms / 2.0,
        loss_pct,
        queue_bytes: 1_000_000,
        ..Shape::default()
    };
    let mut spec = Spec::uniform(prefix, 1, shape);
    spec.net = net;
    spec.seed = Some(seed);
    Topology::up(&spec).context("building the emulated link (needs root)")
}

/// A throw-away CA, the hub's TLS and one site's: the benches' two ends of a link.
pub(crate) fn bench_tls() -> anyhow::Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let ca = Ca::generate("bench").context("CA")?;
    let (chain, key) = ca.issue_controller()?;
    let server_tls = tiandi_link::tls::server_tls(chain, key, ca.cert_der(), Arc::new(AnySite))?;
    let (site_key, csr) = site_key_and_csr("bench-site")?;
    let issued = ca.sign_site(&csr, "bench-site", "BJ", Duration::from_secs(3600))?;
    let client_tls = tiandi_link::tls::site_client_tls(ca.cert_pem(), &issued.cert_pem, &site_key)?;
    Ok((server_tls, client_tls))
}

/// QUIC over the link: the server (hub side) sends `bytes` on one stream; Mbit/s of goodput.
async fn quic(
    ctl_ns: &str,
    site_ns: &str,
    ctl_ip: std::net::IpAddr,
    bytes: u64,
    fixed_rate_bps: Option<u64>,
    limit: Duration,
) -> anyhow::Result<f64> {
    let (server_tls, client_tls) = bench_tls()?;
    let transport = |fixed: Option<u64>| {
        let mut t = LinkProfile::Geo.transport_config();
        if let Some(rate) = fixed {
            t.congestion_controller_factory(Arc::new(FixedRateConfig::new(rate)));
        }
        Arc::new(t)
    };
    // A port per run: the previous run's endpoint may still be draining on its own.
    let server_addr = SocketAddr::new(ctl_ip, if fixed_rate_bps.is_some() { 4433 } else { 4434 });
    let ssock = in_netns(ctl_ns, move || UdpSocket::bind(server_addr))??;
    let csock = in_netns(site_ns, || UdpSocket::bind("0.0.0.0:0"))??;
    let server = tiandi_link::server_endpoint_on(
        ssock,
        tiandi_link::server_config(server_tls, transport(fixed_rate_bps))?,
        b"geo-link bench reset key",
    )?;
    let client = tiandi_link::client_endpoint_on(csock)?;
    let client_cfg = tiandi_link::client_config(client_tls, transport(None))?;
    let sender = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .context("no connection")?
            .await
            .context("handshake")?;
        let mut s = conn.open_uni().await?;
        let started = Instant::now();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            // The receiver closes the connection at the time limit: stop there.
            if s.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = s.finish();
        // Keep the connection until the receiver has it all (or the bench gives up).
        let _ = tokio::time::timeout(limit, conn.closed()).await;
        anyhow::Ok(started)
    });
    let conn = client
        .connect_with(client_cfg, server_addr, CONTROLLER_NAME)?
        .await
        .context("connecting over the emulated link")?;
    let mut r = conn.accept_uni().await?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let first = Instant::now();
    let deadline = first + limit;
    let mut last = first;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match tokio::time::timeout(deadline - now, r.read(&mut buf)).await {
            Ok(Ok(Some(n))) => {
                got += n as u64;
                last = Instant::now();
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => bail!("QUIC receive failed: {e}"),
            Err(_) => break,
        }
    }
    conn.close(0u32.into(), b"done");
    let started = sender.await??;
    let secs = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-3);
    if got < bytes {
        eprintln!("  (time limit: {got} of {bytes} bytes)");
    }
    client.wait_idle().await;
    Ok(got as f64 * 8.0 / secs / 1e6)
}

/// TCP over the link with congestion control `cc` at the sender (hub side).
pub(crate) fn tcp(
    ctl_ns: &str,
    site_ns: &str,
    ctl_ip: std::net::IpAddr,
    bytes: u64,
    cc: &'static str,
    limit: Duration,
) -> anyhow::Result<f64> {
    let addr = SocketAddr::new(ctl_ip, if cc == "bbr" { 5201 } else { 5202 });
    let listener = in_netns(ctl_ns, move || TcpListener::bind(addr))??;
    let sender = std::thread::spawn(move || -> anyhow::Result<Instant> {
        let (s, _) = listener.accept()?;
        let sock = socket2::Socket::from(s);
        sock.set_tcp_congestion(cc.as_bytes())
            .with_context(|| format!("TCP congestion control {cc:?} unavailable"))?;
        let mut s: TcpStream = sock.into();
        s.set_write_timeout(Some(limit))?;
        let started = Instant::now();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 && started.elapsed() < limit {
            let n = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        Ok(started)
    });
    let mut s = in_netns(site_ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
    })??;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let first = Instant::now();
    let mut got = 0u64;
    let mut last = first;
    let mut buf = vec![0u8; 256 * 1024];
    while first.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got += n as u64;
                last = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => bail!("TCP receive failed: {e}"),
        }
    }
    drop(s);
    let started = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if got < bytes {
        eprintln!("  (time limit: {got} of {bytes} bytes)");
    }
    let secs = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-3);
    Ok(got as f64 * 8.0 / secs / 1e6)
}
