//! `tiandi-agent simulate`: many simulated sites over real QUIC connections, enrolled with
//! tokens like real sites (a load generator for the controller). The sites themselves are
//! [`tiandi_sim`]'s; this file enrolls them and reports totals.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tiandi_link::LinkProfile;
use tiandi_sim as sim;
use tiandi_uplink::identity;
use tokio_util::sync::CancellationToken;

/// What `simulate` takes.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long)]
    pub controller: String,
    /// File of `SITE_ID TOKEN` lines (from `tiandi-controller enroll --batch`).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Identities and spools of the simulated sites.
    #[arg(long, default_value = "tiandi-data/sim")]
    pub data_dir: PathBuf,
    /// Use only the first N sites of the token file.
    #[arg(long)]
    pub sites: Option<usize>,
    /// Seconds between reports.
    #[arg(long, default_value_t = 10.0)]
    pub interval: f64,
    /// Let a few sites lose their link for minutes now and then.
    #[arg(long)]
    pub outages: bool,
    #[arg(long, default_value = "terrestrial")]
    pub profile: LinkProfile,
    /// Write totals (pushed, acknowledged, spooled, connected) here every second, as JSON.
    #[arg(long)]
    pub stats: Option<PathBuf>,
}

/// `tiandi-agent simulate`: enrolls the sites of a token file (those without an identity yet),
/// runs them until stopped, lets their spools drain, and prints the totals.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let SimulateArgs {
        controller,
        tokens,
        data_dir,
        sites,
        interval,
        outages,
        profile,
        stats,
    } = args;
    let text = std::fs::read_to_string(&tokens)
        .with_context(|| format!("reading {}", tokens.display()))?;
    let mut lines: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some(site), Some(token)) => lines.push((site.to_string(), token.to_string())),
            _ => bail!("{}:{}: expected `SITE_ID TOKEN`", tokens.display(), n + 1),
        }
    }
    if let Some(n) = sites {
        lines.truncate(n);
    }
    // Enroll the sites that have no identity yet, a few at a time.
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for (i, (site, token)) in lines.iter().enumerate() {
        let dir = data_dir.join("sites").join(site);
        let (controller, token, sem) = (controller.clone(), token.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            if !identity::exists(&dir) {
                let _p = sem.acquire().await;
                crate::enroll(&controller, &token, &dir).await?;
            }
            let id = identity::load(&dir)?;
            anyhow::Ok(sim::SimCreds {
                index: i as u64,
                site_id: id.info.site_id,
                province: id.info.province,
                key_pem: id.key_pem,
                cert_pem: id.cert_pem,
                ca_pem: id.ca_pem,
            })
        }));
    }
    let mut creds = Vec::new();
    for t in tasks {
        creds.push(t.await??);
    }
    tracing::info!(sites = creds.len(), "Simulated sites enrolled; starting.");
    let stop = tiandi_link::shutdown_token();
    let cancel = CancellationToken::new();
    let shareds = sim::start(
        creds,
        sim::SimOptions {
            controller,
            interval: Duration::from_secs_f64(interval),
            outages,
            profile,
            inboxes: None,
            backup_sites: Vec::new(),
        },
        &data_dir.join("spool"),
        stop.clone(),
        cancel.clone(),
    )
    .await?;
    let write_stats = |final_: bool| -> anyhow::Result<()> {
        let (mut pushed, mut spooled, mut connected, mut acked) = (0u64, 0u64, 0u64, 0u64);
        // At the end: the sites still holding reports (at most 50), to look for in the log.
        let mut unsent = Vec::new();
        for (id, s) in &shareds {
            let sp = s.spool.lock().expect("spool lock poisoned");
            pushed += sp.next_seq() - 1;
            spooled += sp.len() as u64;
            let up = s.connected.load(Ordering::Relaxed);
            connected += u64::from(up);
            acked += s.acked.load(Ordering::Relaxed);
            if final_ && !sp.is_empty() && unsent.len() < 50 {
                unsent.push(serde_json::json!({"site": id, "spooled": sp.len(), "connected": up}));
            }
        }
        let v = serde_json::json!({"sites": shareds.len(), "pushed": pushed, "acked": acked,
            "spooled": spooled, "connected": connected, "final": final_, "unsent": unsent});
        if let Some(p) = &stats {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, v.to_string())?;
            std::fs::rename(&tmp, p)?;
        }
        if final_ {
            println!("{v}");
        }
        Ok(())
    };
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => write_stats(false)?,
        }
    }
    // Stop taking reports, let the spools drain (at most 60 s), then close the connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let spooled: usize = shareds
            .iter()
            .map(|(_, s)| s.spool.lock().expect("spool lock poisoned").len())
            .sum();
        if spooled == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_stats(true)?;
    Ok(())
}
