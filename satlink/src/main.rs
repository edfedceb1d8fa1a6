//! `tiandi-satlink`: a controller namespace and N site namespaces, each site behind its own
//! emulated satellite link; cut, restore and re-shape links while it runs.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tiandi_satlink::{Shape, Spec, Topology, control};

#[derive(Parser)]
#[command(
    name = "tiandi-satlink",
    version,
    about = "Satellite-link emulator (user-space netem over TAP devices)"
)]
struct Cli {
    /// Namespace prefix of the topology (namespaces PREFIX-hub, PREFIX-ctl, PREFIX-s1..).
    #[arg(long, global = true, default_value = "tds")]
    prefix: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the topology and run the emulator until interrupted, then remove everything.
    Up {
        #[arg(long, default_value_t = 1)]
        sites: usize,
        /// First three octets of the /24: controller .1, site i at .(10+i).
        #[arg(long, default_value = "10.200.0")]
        net: String,
        /// Hub-to-site rate (Mbit/s, Ethernet frames; 0 = unlimited).
        #[arg(long, default_value_t = 20.0)]
        rate_mbit: f64,
        /// Site-to-hub rate (default: the same as --rate-mbit).
        #[arg(long)]
        up_rate_mbit: Option<f64>,
        /// One-way delay (ms).
        #[arg(long, default_value_t = 300.0)]
        delay_ms: f64,
        #[arg(long, default_value_t = 0.0)]
        jitter_ms: f64,
        /// Random loss each way (%).
        #[arg(long, default_value_t = 0.0)]
        loss_pct: f64,
        #[arg(long, default_value_t = 0.0)]
        reorder_pct: f64,
        #[arg(long, default_value_t = 0.0)]
        corrupt_pct: f64,
        /// Drop-tail queue in front of each direction's serialiser (kB).
        #[arg(long, default_value_t = 1000.0)]
        queue_kb: f64,
        /// Fixed seed: the same loss pattern on every run.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Outage: drop everything on SITE's link (s1, s2, ...).
    Cut { site: String },
    /// End SITE's outage.
    Restore { site: String },
    /// Change SITE's shaping live, e.g. `set s1 loss_pct=5 rate_mbit=2` (rain fade);
    /// prefix a key with up_ or down_ for one direction.
    Set {
        site: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Every link's shaping and counters (JSON).
    Status,
    /// Remove the namespaces of a topology left behind by a killed emulator.
    Down,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let prefix = cli.prefix;
    let request = match cli.cmd {
        Cmd::Up {
            sites,
            net,
            rate_mbit,
            up_rate_mbit,
            delay_ms,
            jitter_ms,
            loss_pct,
            reorder_pct,
            corrupt_pct,
            queue_kb,
            seed,
        } => {
            let octets: Vec<u8> = net
                .split('.')
                .map(|o| o.parse::<u8>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("--net {net:?}: expected three octets like 10.200.0"))?;
            let [a, b, c] = octets[..] else {
                bail!("--net {net:?}: expected three octets like 10.200.0");
            };
            let shape = |mbit: f64| Shape {
                rate_kbit: (mbit * 1000.0) as u64,
                delay_ms,
                jitter_ms,
                loss_pct,
                reorder_pct,
                corrupt_pct,
                queue_bytes: (queue_kb * 1000.0) as u64,
            };
            let spec = Spec {
                prefix: prefix.clone(),
                net: [a, b, c],
                sites: vec![(shape(up_rate_mbit.unwrap_or(rate_mbit)), shape(rate_mbit)); sites],
                seed,
            };
            let topo = Topology::up(&spec).context("building the topology")?;
            let links: Vec<_> = (1..=topo.sites()).map(|i| topo.link(i).clone()).collect();
            let cancel = tokio_util::sync::CancellationToken::new();
            let path = control::socket_path(&prefix);
            let server = tokio::spawn(control::serve(path.clone(), links, cancel.clone()));
            println!(
                "up: controller {} in {}; sites {}..{} in {}..{}; control {}",
                topo.ctl_addr(),
                topo.ctl_ns(),
                topo.site_addr(1),
                topo.site_addr(topo.sites()),
                topo.site_ns(1),
                topo.site_ns(topo.sites()),
                path.display()
            );
            wait_for_signal().await;
            cancel.cancel();
            let _ = server.await;
            topo.down();
            println!("down");
            return Ok(());
        }
        Cmd::Cut { site } => format!("cut {site}"),
        Cmd::Restore { site } => format!("restore {site}"),
        Cmd::Set { site, settings } => format!("set {site} {}", settings.join(" ")),
        Cmd::Status => "status".into(),
        Cmd::Down => {
            tiandi_satlink::topo::down_prefix(&prefix);
            return Ok(());
        }
    };
    let answer = control::request(&prefix, &request).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer["ok"] != true {
        bail!("{}", answer["error"].as_str().unwrap_or("request failed"));
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
