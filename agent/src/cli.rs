//! The `tiandi-agent` command line: its flags and subcommands, each a call into the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tiandi_uplink::identity;

use crate::{Config, transfers};

#[derive(Parser)]
#[command(name = "tiandi-agent", version, about = "Tiandi site agent")]
pub struct Cli {
    /// Agent configuration file (TOML); see config/agent.example.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand)]
pub enum Cmd {
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
        #[command(flatten)]
        flags: tiandi_transfer::SendFlags,
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
    /// This site's backup jobs (pushed by the controller): last runs, next runs, shipping to
    /// the partner; as the running agent last wrote them.
    Backups {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The device profiles this agent knows (built in, vendors', `profiles_dir`'s), or one in
    /// full; with --dir, checks an operator's profile directory first (errors name the file
    /// and key).
    Profiles {
        /// One profile: its objects, alarms and traps.
        name: Option<String>,
        /// A profile directory to check and list (instead of the config's `profiles_dir`).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Poll the configured devices once, with their reachability checks, and show what each
    /// answered: for a technician at the site, before and after changing a device or profile.
    CheckDevices {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run N simulated sites over real QUIC connections (load generator).
    Simulate(crate::simulate::SimulateArgs),
}

/// The configuration file (checked), or the embedded defaults.
pub fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
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

/// Runs the command line's command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = load_config(&cli.config)?;
    if matches!(cli.cmd, Some(Cmd::Simulate(_))) {
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
            crate::run(cfg, tiandi_link::shutdown_token()).await
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
            let info = crate::enroll(&controller, &token, &dir).await?;
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
            flags,
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
                    priority: flags.priority,
                    window: flags.window,
                    rate_limit_mbit: flags.rate_limit,
                },
            )?;
            println!(
                "queued transfer {id} of {} to the controller (the running agent takes it within a second)",
                file.display()
            );
            if let Some(secs) = wait {
                let node = transfers::wait_delivered(&dir, &id, Duration::from_secs(secs)).await?;
                println!("delivered: verified at {node}");
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
            print!("{}", transfers::table(&jobs));
            Ok(())
        }
        Cmd::Backups { data_dir, json } => {
            let dir = data_dir.unwrap_or(cfg.data_dir);
            let file = dir.join("backup").join("status.json");
            let st: tiandi_backup::scheduler::Status = match std::fs::read(&file) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("reading {}", file.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tiandi_backup::scheduler::Status::default()
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            print!("{}", backups_table(&st, tiandi_transfer::now_ms()));
            Ok(())
        }
        Cmd::Profiles { name, dir, json } => {
            let profiles = match &dir {
                Some(d) => crate::profile::Profiles::with_dir(d).map_err(anyhow::Error::msg)?,
                None => cfg.profiles().map_err(anyhow::Error::msg)?,
            };
            match name {
                Some(n) => {
                    let p = profiles.get(&n).with_context(|| {
                        format!(
                            "no profile {n:?} (known: {})",
                            profiles.names().collect::<Vec<_>>().join(", ")
                        )
                    })?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(p)?);
                    } else {
                        print!("{}", crate::profile::describe(p));
                    }
                }
                None if json => {
                    let all: Vec<_> = profiles.iter().collect();
                    println!("{}", serde_json::to_string_pretty(&all)?);
                }
                None => print!("{}", crate::profile::table(&profiles)),
            }
            Ok(())
        }
        Cmd::CheckDevices { device, json } => {
            let profiles = cfg.profiles().map_err(anyhow::Error::msg)?;
            let devices: Vec<_> = cfg
                .devices
                .iter()
                .filter(|d| device.as_ref().is_none_or(|n| &d.name == n))
                .cloned()
                .collect();
            if devices.is_empty() {
                bail!(
                    "no device {} in the configuration (devices: {})",
                    device.as_deref().unwrap_or("at all"),
                    cfg.devices
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let mut pollers = devices
                .iter()
                .map(|d| {
                    let p = profiles.get(&d.profile).with_context(|| {
                        format!("device {}: no profile {:?}", d.name, d.profile)
                    })?;
                    Ok(crate::snmp::Poller::new(d.clone(), p.clone()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let prober = crate::reach::Prober::new(cfg.reachability.clone());
            let (mut answers, reached) =
                tokio::join!(crate::snmp::poll_all(&mut pollers), prober.round(&devices));
            for (d, r) in answers.iter_mut().zip(reached.devices) {
                d.reach = r;
            }
            if json {
                let v = serde_json::json!({ "devices": answers, "probes": reached.probes });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!(
                    "{}",
                    crate::profile::answers_text(&answers, &reached.probes)
                );
            }
            Ok(())
        }
        Cmd::Simulate(args) => crate::simulate::run(args).await,
    }
}

/// `tiandi-agent backups`: a line per job and kind, then a line per shipped repository.
fn backups_table(st: &tiandi_backup::scheduler::Status, now_ms: i64) -> String {
    use std::fmt::Write;
    let ago = |ms: i64| {
        let s = (now_ms - ms).max(0) / 1000;
        match s {
            0..120 => format!("{s} s ago"),
            120..7200 => format!("{} min ago", s / 60),
            _ => format!("{} h ago", s / 3600),
        }
    };
    let mut out = String::new();
    if st.jobs.is_empty() {
        out.push_str("no backup jobs (the controller configures them)\n");
    }
    for j in &st.jobs {
        for k in &j.kinds {
            let last = match &k.last {
                None => "never run".to_string(),
                Some(r) if r.ok => format!("ok {}", ago(r.started_ms)),
                Some(r) => format!(
                    "FAILED {}: {}",
                    ago(r.started_ms),
                    r.error.as_deref().unwrap_or("")
                ),
            };
            let next = match k.next_ms {
                Some(t) if t <= now_ms => "due".to_string(),
                Some(t) => format!("in {} min", (t - now_ms) / 60_000),
                None => "-".into(),
            };
            let _ = writeln!(out, "{:<24} {:<7} {last:<40} next {next}", j.job, k.kind);
        }
        if let Some(r) = &j.running {
            let _ = writeln!(
                out,
                "{:<24} {:<7} running: {} files, {:.1} of {:.1} MB{}",
                j.job,
                r.kind,
                r.files,
                r.bytes as f64 / 1e6,
                r.total_bytes as f64 / 1e6,
                r.eta_s.map(|s| format!(", {s} s left")).unwrap_or_default()
            );
        }
    }
    for s in &st.shipping {
        let _ = writeln!(
            out,
            "repository {:<14} to {:<12} {} ({} files, {:.1} MB waiting){}",
            s.repo,
            s.to,
            if s.in_sync { "in sync" } else { "sending" },
            s.pending_files,
            s.pending_bytes as f64 / 1e6,
            s.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod manual {
    /// The package's manual page (`debian/tiandi-agent.1`) is this command line, rendered by
    /// clap_mangen; `TIANDI_BLESS=1 cargo test -p tiandi-agent manual_page` rewrites it.
    #[test]
    fn the_packaged_manual_page_is_the_command_line() {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_mangen::Man::new(super::Cli::command())
            .render(&mut out)
            .expect("render");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/debian/tiandi-agent.1");
        if std::env::var_os("TIANDI_BLESS").is_some() {
            std::fs::write(path, &out).expect("write the manual page");
        }
        assert!(
            std::fs::read(path).ok().as_deref() == Some(&out[..]),
            "debian/tiandi-agent.1 is not the command line: TIANDI_BLESS=1 cargo test -p \
             tiandi-agent manual_page"
        );
    }
}
