//! `tiandi-agent`: run the site agent, enroll a site, or simulate many sites.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tiandi_agent::{Config, transfers};
use tiandi_link::LinkProfile;
use tiandi_sim as sim;
use tiandi_uplink::identity;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: with thousands of QUIC connections, glibc's allocator
/// was a fifth of the controller's CPU per report (its slow path sorting freed chunks on the
/// packet-receive path).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tiandi-agent", version, about = "Tiandi site agent")]
struct Cli {
    /// Agent configuration file (TOML); see config/agent.example.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run {
        #[arg(long)]
        controller: Option<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Seconds between reports.
        #[arg(long)]
        interval: Option<f64>,
    },
    /// Enroll this site with a one-time token from `tiandi-controller enroll`.
    Enroll {
        #[arg(long)]
        controller: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Send a file to the controller: queued in this site's outbox, taken by the running agent
    /// within a second, resumed across link cuts and restarts.
    Send {
        file: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// alarm, normal or bulk.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// Only send within this daily window, `HH:MM-HH:MM` in UTC, or in local time with a
        /// UTC offset after it: `01:00-06:00+08:00` (Beijing).
        #[arg(long)]
        window: Option<String>,
        /// At most this many Mbit/s.
        #[arg(long)]
        rate_limit: Option<f64>,
        /// Wait until the controller has verified the file (or this many seconds pass).
        #[arg(long)]
        wait: Option<u64>,
    },
    /// This site's outgoing transfers, as the running agent last wrote them.
    Transfers {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run N simulated sites over real QUIC connections (load generator).
    Simulate {
        #[arg(long)]
        controller: String,
        /// File of `SITE_ID TOKEN` lines (from `tiandi-controller enroll --batch`).
        #[arg(long)]
        tokens: PathBuf,
        /// Identities and spools of the simulated sites.
        #[arg(long, default_value = "tiandi-data/sim")]
        data_dir: PathBuf,
        /// Use only the first N sites of the token file.
        #[arg(long)]
        sites: Option<usize>,
        /// Seconds between reports.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
        /// Let a few sites lose their link for minutes now and then.
        #[arg(long)]
        outages: bool,
        #[arg(long, default_value = "terrestrial")]
        profile: LinkProfile,
        /// Write totals (pushed, acknowledged, spooled, connected) here every second, as JSON.
        #[arg(long)]
        stats: Option<PathBuf>,
    },
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => {
            let c = Config::load(p)?;
            c.validate(&p.display().to_string())
                .map_err(anyhow::Error::msg)?;
            Ok(c)
        }
        None => Ok(Config::default()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = load_config(&cli.config)?;
    if matches!(cli.cmd, Some(Cmd::Simulate { .. })) {
        tiandi_link::init_logging(&format!("{},tiandi_uplink::session=warn", cfg.log));
    } else {
        tiandi_link::init_logging(&cfg.log);
    }
    match cli.cmd.unwrap_or(Cmd::Run {
        controller: None,
        data_dir: None,
        interval: None,
    }) {
        Cmd::Run {
            controller,
            data_dir,
            interval,
        } => {
            if let Some(c) = controller {
                cfg.controller = c;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(i) = interval {
                cfg.interval_s = i;
            }
            cfg.validate("command line").map_err(anyhow::Error::msg)?;
            tiandi_agent::run(cfg, tiandi_link::shutdown_token()).await
        }
        Cmd::Enroll {
            controller,
            token,
            data_dir,
            force,
        } => {
            let dir = data_dir.unwrap_or(cfg.data_dir);
            if identity::exists(&dir) && !force {
                bail!(
                    "{} already holds an identity (use --force to replace it)",
                    identity::dir(&dir).display()
                );
            }
            let info = tiandi_agent::enroll(&controller, &token, &dir).await?;
            println!(
                "enrolled site {} (province {}); identity in {}",
                info.site_id,
                info.province,
                identity::dir(&dir).display()
            );
            Ok(())
        }
        Cmd::Send {
            file,
            data_dir,
            priority,
            window,
            rate_limit,
            wait,
        } => {
            let dir = data_dir.unwrap_or(cfg.data_dir);
            let path = file
                .canonicalize()
                .with_context(|| format!("{}", file.display()))?;
            let id = transfers::request_send(
                &dir,
                &transfers::SendRequest {
                    path,
                    priority,
                    window,
                    rate_limit_mbit: rate_limit,
                },
            )?;
            println!(
                "queued transfer {id} of {} to the controller (the running agent takes it within a second)",
                file.display()
            );
            if let Some(secs) = wait {
                let deadline = std::time::Instant::now() + Duration::from_secs(secs);
                loop {
                    if let Some(j) = transfers::read_status(&dir)?
                        .into_iter()
                        .find(|j| j["id"] == id.as_str())
                    {
                        match j["state"].as_str() {
                            Some("delivered") => {
                                println!("delivered: verified at {}", j["receipt"]["node"]);
                                return Ok(());
                            }
                            Some("failed") => bail!("transfer {id} failed: {}", j["error"]),
                            _ => {}
                        }
                    }
                    if let Some(e) = transfers::read_refusal(&dir, &id) {
                        bail!("transfer {id} refused: {e}");
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("transfer {id} not delivered within {secs} s (it stays queued)");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Ok(())
        }
        Cmd::Transfers { data_dir, json } => {
            let dir = data_dir.unwrap_or(cfg.data_dir);
            let jobs = transfers::read_status(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            println!(
                "{:<22} {:<14} {:<28} {:>12} {:>6} {:<10} note",
                "id", "to", "file", "bytes", "done%", "state"
            );
            for j in jobs {
                let bytes = j["bytes"].as_u64().unwrap_or(0);
                let pct = if bytes == 0 {
                    100.0
                } else {
                    j["acked_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / bytes as f64
                };
                let note = if j["receipt"].is_object() {
                    format!(
                        "verified at {}",
                        j["receipt"]["node"].as_str().unwrap_or("?")
                    )
                } else {
                    j["error"].as_str().unwrap_or("").to_string()
                };
                println!(
                    "{:<22} {:<14} {:<28} {:>12} {:>6.1} {:<10} {note}",
                    j["id"].as_str().unwrap_or(""),
                    j["dest"].as_str().unwrap_or(""),
                    j["file"].as_str().unwrap_or(""),
                    bytes,
                    pct,
                    j["state"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Cmd::Simulate {
            controller,
            tokens,
            data_dir,
            sites,
            interval,
            outages,
            profile,
            stats,
        } => {
            simulate(
                controller, tokens, data_dir, sites, interval, outages, profile, stats,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn simulate(
    controller: String,
    tokens: PathBuf,
    data_dir: PathBuf,
    sites: Option<usize>,
    interval: f64,
    outages: bool,
    profile: LinkProfile,
    stats: Option<PathBuf>,
) -> anyhow::Result<()> {
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
                tiandi_agent::enroll(&controller, &token, &dir).await?;
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
        },
        &data_dir.join("spool"),
        stop.clone(),
        cancel.clone(),
    )
    .await?;
    let write_stats = |final_: bool| -> anyhow::Result<()> {
        let (mut pushed, mut spooled, mut connected, mut acked) = (0u64, 0u64, 0u64, 0u64);
        for (_, s) in &shareds {
            let sp = s.spool.lock().expect("spool lock poisoned");
            pushed += sp.next_seq() - 1;
            spooled += sp.len() as u64;
            connected += u64::from(s.connected.load(Ordering::Relaxed));
            acked += s.acked.load(Ordering::Relaxed);
        }
        let v = serde_json::json!({"sites": shareds.len(), "pushed": pushed, "acked": acked,
            "spooled": spooled, "connected": connected, "final": final_});
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
