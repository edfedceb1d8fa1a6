//! `tiandi-controller`: run the controller, enroll or revoke sites, run the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tiandi_controller::{Config, Controller, demo, registry::Registry};

/// mimalloc rather than glibc's malloc: with thousands of QUIC connections, glibc's allocator
/// was a fifth of the controller's CPU per report (its slow path sorting freed chunks on the
/// packet-receive path).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tiandi-controller", version, about = "Tiandi controller")]
struct Cli {
    /// Controller configuration file (TOML); see config/controller.example.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Overrides `api_listen` (also where admin commands find the running controller).
    #[arg(long, global = true)]
    api_listen: Option<SocketAddr>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum ConferenceOp {
    /// Open a conference room (sites can join it from now on).
    Create {
        room: String,
        /// The chairing site (default: `conference.chair`).
        #[arg(long)]
        chair: Option<String>,
    },
    /// The relay's address and every conference.
    List,
    /// One conference: chair, floor, tracks, the roster with each site's reception.
    Show { room: String },
    /// End a conference: every participant is disconnected.
    End { room: String },
    /// Give the floor to a site (without SITE: take it back).
    Floor { room: String, site: Option<String> },
    /// Record the conference on the relay: whoever speaks (the floor holder, else the chair),
    /// or `--site` alone, to `data_dir/recordings/ROOM-WHO-TIME.ts` (MPEG-TS; `tiandi-video
    /// remux FILE.ts FILE.mkv` makes Matroska or MP4 of it); `--stop` ends it and lists who was
    /// recorded from when.
    Record {
        room: String,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        stop: bool,
        /// ts (the only format the relay records; `[conference] recording_format`).
        #[arg(long, value_parser = ["ts"])]
        format: Option<String>,
    },
    /// Ask every participant to confirm presence; `show` lists the answers.
    Rollcall {
        room: String,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller (the default).
    Run {
        #[arg(long)]
        quic_listen: Option<SocketAddr>,
        #[arg(long)]
        ops_listen: Option<SocketAddr>,
    },
    /// Print a one-time enrollment token for a site (or write a batch of them).
    Enroll {
        #[arg(long, required_unless_present = "batch")]
        site: Option<String>,
        #[arg(long, required_unless_present = "batch")]
        province: Option<String>,
        /// Token lifetime in hours (default: `token_hours`).
        #[arg(long)]
        ttl_hours: Option<u32>,
        /// Create N tokens for sites PREFIX0001.. spread over the 31 provinces.
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long, default_value = "sim-")]
        prefix: String,
        /// With --batch: write `SITE_ID TOKEN` lines here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Conferences on the controller's relay (`tiandi-video join --relay ADDR --relay-name
    /// NAME --room ROOM` to take part).
    Conference {
        #[command(subcommand)]
        op: ConferenceOp,
    },
    /// Revoke a site's certificate; its connection is closed at once.
    Revoke {
        #[arg(long)]
        site: String,
    },
    /// Queue a file for sites: resumable, verified, prioritised (see `transfers`).
    Send {
        file: PathBuf,
        /// site:ID, province:CODE or all.
        #[arg(long)]
        to: String,
        /// alarm, normal or bulk.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// Only send within this daily window, HH:MM-HH:MM in UTC (22:00-06:00), or in local
        /// time with a UTC offset after it (01:00-06:00+08:00: Beijing).
        #[arg(long)]
        window: Option<String>,
        /// At most this many Mbit/s for this transfer.
        #[arg(long)]
        rate_limit: Option<f64>,
    },
    /// Transfers and their state: per destination progress, rate, ETA and receipt.
    Transfers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The controller with simulated sites, on embedded defaults.
    Demo {
        #[arg(long, default_value_t = 200)]
        sites: usize,
        /// Seconds between reports.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = match &cli.config {
        Some(p) => {
            let c = Config::load(p)?;
            c.profile
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: key `profile`: {e}", p.display()))?;
            c
        }
        None => Config::default(),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads);
    }
    rt.enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli, cfg))
}

async fn run(cli: Cli, mut cfg: Config) -> anyhow::Result<()> {
    let demo_mode = matches!(cli.cmd, Some(Cmd::Demo { .. }));
    if demo_mode && cli.data_dir.is_none() && cli.config.is_none() {
        cfg.data_dir = PathBuf::from("tiandi-data/demo");
        cfg.quic_listen = "127.0.0.1:4433".parse().expect("literal");
    }
    if let Some(d) = cli.data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = cli.api_listen {
        cfg.api_listen = a;
    }
    if demo_mode {
        // Hundreds of simulated sites: keep their per-site connection logs out of the way.
        tiandi_link::init_logging(&format!("{},tiandi_uplink=warn,tiandi_sim=warn", cfg.log));
    } else {
        tiandi_link::init_logging(&cfg.log);
    }
    match cli.cmd.unwrap_or(Cmd::Run {
        quic_listen: None,
        ops_listen: None,
    }) {
        Cmd::Run {
            quic_listen,
            ops_listen,
        } => {
            if let Some(q) = quic_listen {
                cfg.quic_listen = q;
            }
            if let Some(o) = ops_listen {
                cfg.ops_listen = o;
            }
            let ctl = Controller::start(cfg).await?;
            println!(
                "tiandi-controller: agents quic://{} api http://{} metrics http://{}/metrics",
                ctl.quic_addr, ctl.api_addr, ctl.ops_addr
            );
            tiandi_link::shutdown_token().cancelled().await;
            ctl.shutdown().await;
            // Everything is flushed and closed: do not wait for idle pool threads to wind down.
            std::process::exit(0)
        }
        Cmd::Demo { sites, interval } => {
            demo::run(
                cfg,
                sites,
                Duration::from_secs_f64(interval),
                tiandi_link::shutdown_token(),
            )
            .await
        }
        Cmd::Enroll {
            site,
            province,
            ttl_hours,
            batch,
            prefix,
            out,
        } => {
            let hours = ttl_hours.unwrap_or(cfg.token_hours);
            let mut wanted: Vec<(String, String)> = Vec::new();
            if let Some(n) = batch {
                for i in 0..n {
                    let p = demo::PROVINCES[i % demo::PROVINCES.len()];
                    wanted.push((format!("{prefix}{:05}", i + 1), p.to_string()));
                }
            } else if let (Some(s), Some(p)) = (site, province) {
                wanted.push((s, p));
            }
            let mut lines = Vec::new();
            if batch.is_some() {
                let sites: Vec<Value> = wanted
                    .iter()
                    .map(|(s, p)| json!({"site_id": s, "province": p}))
                    .collect();
                let v = admin(
                    &cfg,
                    "enroll-batch",
                    json!({"sites": sites, "ttl_hours": hours}),
                )?;
                for t in v["tokens"].as_array().context("no tokens in the answer")? {
                    lines.push(format!(
                        "{} {}",
                        t["site_id"].as_str().unwrap_or_default(),
                        t["token"].as_str().unwrap_or_default()
                    ));
                }
            } else {
                for (s, p) in &wanted {
                    let v = admin(
                        &cfg,
                        "enroll",
                        json!({"site_id": s, "province": p, "ttl_hours": hours}),
                    )?;
                    let token = v["token"]
                        .as_str()
                        .context("no token in the answer")?
                        .to_string();
                    lines.push(format!("{s} {token}"));
                }
            }
            match (batch, out) {
                (Some(_), Some(path)) => {
                    std::fs::write(&path, lines.join("\n") + "\n")
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {} tokens to {}", lines.len(), path.display());
                }
                (Some(_), None) => println!("{}", lines.join("\n")),
                _ => {
                    let token = lines[0].split_once(' ').map(|x| x.1).unwrap_or_default();
                    println!("{token}");
                    eprintln!(
                        "one-time token for site {} (expires in {hours} h); on the site run:\n  tiandi-agent enroll --controller <ADDR:PORT> --token {token}",
                        wanted[0].0
                    );
                }
            }
            Ok(())
        }
        Cmd::Send {
            file,
            to,
            priority,
            window,
            rate_limit,
        } => {
            let path = file
                .canonicalize()
                .with_context(|| format!("{}", file.display()))?;
            let v = admin(
                &cfg,
                "send",
                json!({"path": path, "to": to, "priority": priority, "window": window, "rate_limit_mbit": rate_limit}),
            )?;
            println!(
                "queued {} ({} bytes, blake3 {}) for {} site(s) as transfer {}",
                v["file"].as_str().unwrap_or_default(),
                v["bytes"],
                v["blake3"].as_str().unwrap_or_default(),
                v["destinations"].as_array().map(|a| a.len()).unwrap_or(0),
                v["transfer"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        Cmd::Transfers { json: as_json } => {
            let v = admin(&cfg, "transfers", json!({}))?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<36} {:<14} {:<24} {:>6} {:<10} {:>9} {:>8}  receipt/error",
                "ID", "DEST", "FILE", "DONE%", "STATE", "RATE", "ETA"
            );
            for t in v["transfers"].as_array().cloned().unwrap_or_default() {
                let rate = t["rate_bps"].as_u64().unwrap_or(0) as f64 / 1e6;
                let eta = t["eta_s"]
                    .as_u64()
                    .map(|s| format!("{s}s"))
                    .unwrap_or("-".into());
                let tail = if t["receipt"].is_object() {
                    format!(
                        "verified at {} ({})",
                        t["receipt"]["node"].as_str().unwrap_or_default(),
                        t["receipt"]["path"].as_str().unwrap_or_default()
                    )
                } else {
                    t["error"].as_str().unwrap_or_default().to_string()
                };
                let tail = match (t["via"].as_str(), t["relays_to"].as_array()) {
                    (Some(r), _) => format!("via {r}; {tail}"),
                    (None, Some(b)) if !b.is_empty() => {
                        format!("relays to {} site(s); {tail}", b.len())
                    }
                    _ => tail,
                };
                println!(
                    "{:<36} {:<14} {:<24} {:>6.1} {:<10} {:>8.2}M {:>8}  {}",
                    t["id"].as_str().unwrap_or_default(),
                    t["dest"].as_str().unwrap_or_default(),
                    t["file"].as_str().unwrap_or_default(),
                    t["progress_pct"].as_f64().unwrap_or(0.0),
                    t["state"].as_str().unwrap_or_default(),
                    rate,
                    eta,
                    tail
                );
            }
            Ok(())
        }
        Cmd::Conference { op } => {
            let body = match &op {
                ConferenceOp::Create { room, chair } => {
                    json!({"op": "create", "room": room, "chair": chair})
                }
                ConferenceOp::List => json!({"op": "list", "room": ""}),
                ConferenceOp::Show { room } => json!({"op": "show", "room": room}),
                ConferenceOp::End { room } => json!({"op": "end", "room": room}),
                ConferenceOp::Floor { room, site } => {
                    json!({"op": "floor", "room": room, "site": site})
                }
                ConferenceOp::Rollcall { room, seconds } => {
                    json!({"op": "rollcall", "room": room, "seconds": seconds})
                }
                ConferenceOp::Record {
                    room,
                    site,
                    stop,
                    format,
                } => {
                    json!({"op": "record", "room": room, "site": site, "stop": stop, "format": format})
                }
            };
            let v = admin(&cfg, "conference", body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Revoke { site } => {
            let v = admin(&cfg, "revoke", json!({"site_id": site}))?;
            println!(
                "revoked site {site}{}",
                if v["disconnected"] == json!(true) {
                    " (its connection was closed)"
                } else {
                    ""
                }
            );
            Ok(())
        }
    }
}

/// An admin action: through the running controller's API if there is one, else on the data
/// dir directly (sled admits one process at a time).
fn admin(cfg: &Config, action: &str, body: Value) -> anyhow::Result<Value> {
    let token_path = cfg.data_dir.join("admin.token");
    if let Ok(token) = std::fs::read_to_string(&token_path) {
        let url = if action == "transfers" {
            format!("http://{}/api/transfers", cfg.api_listen)
        } else {
            format!("http://{}/api/admin/{action}", cfg.api_listen)
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let auth = format!("Bearer {}", token.trim());
        let sent = if action == "transfers" {
            agent.get(&url).header("Authorization", &auth).call()
        } else {
            agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(&body)
        };
        match sent {
            Ok(mut resp) => {
                let status = resp.status();
                let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!(
                        "{action}: {}",
                        v["error"].as_str().unwrap_or(status.as_str())
                    );
                }
                return Ok(v);
            }
            Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(ureq::Error::ConnectionFailed) => {}
            Err(e) => return Err(e).with_context(|| format!("calling {url}")),
        }
    }
    // No controller running: work on the data dir.
    std::fs::create_dir_all(&cfg.data_dir)?;
    let ca = tiandi_link::Ca::load_or_create(&cfg.data_dir)?;
    let db = sled::open(cfg.data_dir.join("db")).with_context(|| {
        format!(
            "opening {} (the controller runs, but its API at {} did not answer)",
            cfg.data_dir.join("db").display(),
            cfg.api_listen
        )
    })?;
    let reg = Registry::open(&db, &ca)?;
    let site = body["site_id"].as_str().unwrap_or_default();
    let v = match action {
        "enroll" => {
            let hours = body["ttl_hours"].as_u64().unwrap_or(72);
            let t = reg.create_token(
                site,
                body["province"].as_str().unwrap_or_default(),
                Duration::from_secs(hours * 3600),
            )?;
            json!({"token": t.token})
        }
        "enroll-batch" => {
            let hours = body["ttl_hours"].as_u64().unwrap_or(72);
            let list: Vec<(String, String)> = body["sites"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            (
                                x["site_id"].as_str().unwrap_or_default().to_string(),
                                x["province"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let tokens = reg.create_tokens(&list, Duration::from_secs(hours * 3600))?;
            json!({"tokens": tokens.iter().map(|t| json!({"site_id": t.site_id, "token": t.token})).collect::<Vec<_>>()})
        }
        "revoke" => json!({"revoked": reg.revoke(site)?, "disconnected": false}),
        "send" | "transfers" => {
            let outbox = tiandi_transfer::Outbox::new(db.open_tree("outbox")?);
            if action == "send" {
                let req: tiandi_controller::transfers::SendRequest =
                    serde_json::from_value(body.clone())?;
                tiandi_controller::transfers::queue(&reg, &outbox, &cfg.relays, &req)?
            } else {
                tiandi_controller::transfers::status(&outbox)?
            }
        }
        "conference" => bail!(
            "conferences live in the running controller: start it (its API at {} did not answer)",
            cfg.api_listen
        ),
        other => bail!("unknown admin action {other}"),
    };
    db.flush()?;
    Ok(v)
}
