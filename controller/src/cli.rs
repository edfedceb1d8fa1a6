//! The `tiandi-controller` command line: its flags and subcommands, and the admin client the
//! subcommands use. An admin command goes to the running controller's API with the admin token;
//! with no controller running it runs the same dispatch ([`crate::admin`]) on the data directory
//! (sled admits one process at a time).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::admin::{
    Admin, AdminCall, AdminError, BackupsRequest, ConferenceRequest, EnrollBatchRequest,
    EnrollRequest, RevokeRequest, SendRequest, SiteRef, TransfersRequest, UserRequest,
};
use crate::registry::Registry;
use crate::{Config, Controller, demo};

#[derive(Parser)]
#[command(name = "tiandi-controller", version, about = "Tiandi controller")]
pub struct Cli {
    /// Controller configuration file (TOML); see config/controller.example.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `api_listen` (also where admin commands find the running controller).
    #[arg(long, global = true)]
    pub api_listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand)]
pub enum Cmd {
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
        /// The certificate's role: `site`, or `relay` for a conference relay that may cascade.
        #[arg(long, default_value = "site", conflicts_with = "batch")]
        role: tiandi_link::pki::CertRole,
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
        op: ConferenceRequest,
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
        #[command(flatten)]
        flags: tiandi_transfer::SendFlags,
    },
    /// Transfers and their state: per destination progress, rate, ETA and receipt.
    Transfers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Backup jobs: last run, age of the newest backup at the partner against the RPO, size,
    /// dedup, next run, verify and drill (works with the controller running or not).
    Backups {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Console and API accounts (works with the controller running or not). A password not
    /// given in a file is made here and printed once; it must be changed at the first login.
    User {
        #[command(subcommand)]
        op: UserCmd,
    },
    /// The audit log: every login, revocation, enrollment, send, acknowledgement and account
    /// change.
    Audit {
        #[command(subcommand)]
        op: AuditCmd,
    },
    /// Follow a primary controller as its standby (disaster recovery): its state is copied
    /// here as it changes, until `promote`; then this process runs as the controller. The
    /// first time, `--token` from `tiandi-controller enroll --role standby` on the primary.
    Standby {
        /// The primary's QUIC address (`host:port`).
        #[arg(long)]
        primary: String,
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        quic_listen: Option<SocketAddr>,
        #[arg(long)]
        ops_listen: Option<SocketAddr>,
    },
    /// Promote the standby running with this configuration: it stops following, takes the
    /// next fencing epoch and serves as the controller (agents that list it come over).
    Promote,
    /// Write the controller's state (what a standby copies: registry, accounts, audit log,
    /// history, the CA and tokens) to DIR/controller-state.tdstate, with the controller
    /// stopped (a running one exports every `[replica] export_every_minutes`).
    StateExport {
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild an empty data directory from an export: a controller started on it takes over
    /// (at the exporter's fencing epoch + 1) with the state as of the export.
    StateImport {
        #[arg(long)]
        from: PathBuf,
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

#[derive(Subcommand)]
pub enum UserCmd {
    /// Every account, its role and its API tokens.
    List,
    /// A new account: `--role admin|province|viewer|kiosk` (`province` with `--province CODE`).
    Add {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        province: Option<String>,
        /// Read the password from this file (mode 0600) instead of making one.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// A new password for an account (its sessions end).
    Passwd {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Change an account's role.
    Role {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        province: Option<String>,
    },
    /// Disable an account: its sessions and tokens stop working at once.
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Every entry, oldest first, as JSON lines (to standard output, or `--out FILE`, 0600).
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A password from a file an operator prepared: owner-only, one line.
fn password_from(file: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    let Some(f) = file else { return Ok(None) };
    let pw = tiandi_link::secrets::read_private(f)?
        .with_context(|| format!("{}: no such file", f.display()))?;
    Ok(Some(pw.trim_end_matches(['\n', '\r']).to_string()))
}

impl UserCmd {
    fn request(&self) -> anyhow::Result<UserRequest> {
        Ok(match self {
            UserCmd::List => UserRequest::List,
            UserCmd::Add {
                name,
                role,
                province,
                password_file,
            } => UserRequest::Add {
                name: name.clone(),
                role: role.clone(),
                province: province.clone(),
                password: password_from(password_file)?,
            },
            UserCmd::Passwd {
                name,
                password_file,
            } => UserRequest::Passwd {
                name: name.clone(),
                password: password_from(password_file)?,
            },
            UserCmd::Role {
                name,
                role,
                province,
            } => UserRequest::Role {
                name: name.clone(),
                role: role.clone(),
                province: province.clone(),
            },
            UserCmd::Disable { name } => UserRequest::Disable { name: name.clone() },
            UserCmd::Enable { name } => UserRequest::Enable { name: name.clone() },
        })
    }
}

impl Cli {
    /// The configuration file (checked), or the embedded defaults.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        match &self.config {
            Some(p) => {
                let c = Config::load(p)?;
                c.profile
                    .validate()
                    .map_err(|e| anyhow::anyhow!("{}: key `profile`: {e}", p.display()))?;
                Ok(c)
            }
            None => Ok(Config::default()),
        }
    }
}

/// Runs the command line's command.
pub async fn run(cli: Cli, mut cfg: Config) -> anyhow::Result<()> {
    let demo_mode = matches!(cli.cmd, Some(Cmd::Demo { .. }));
    if demo_mode && cli.data_dir.is_none() && cli.config.is_none() {
        cfg.data_dir = PathBuf::from("tiandi-data/demo");
        cfg.quic_listen = "127.0.0.1:4433".parse().expect("literal");
        // A fixed port, so the join commands the demo prints stay right across runs.
        cfg.conference.listen = Some("127.0.0.1:4500".parse().expect("literal"));
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
    let client = AdminClient { cfg: &cfg };
    match cli.cmd.unwrap_or(Cmd::Run {
        quic_listen: None,
        ops_listen: None,
    }) {
        Cmd::Run {
            quic_listen,
            ops_listen,
        } => {
            cfg.quic_listen = quic_listen.unwrap_or(cfg.quic_listen);
            cfg.ops_listen = ops_listen.unwrap_or(cfg.ops_listen);
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
        Cmd::Standby {
            primary,
            token,
            quic_listen,
            ops_listen,
        } => {
            cfg.quic_listen = quic_listen.unwrap_or(cfg.quic_listen);
            cfg.ops_listen = ops_listen.unwrap_or(cfg.ops_listen);
            let shutdown = tiandi_link::shutdown_token();
            crate::replica::standby::run(&cfg, &primary, token.as_deref(), shutdown.clone())
                .await?;
            let ctl = Controller::start(cfg).await?;
            println!(
                "tiandi-controller: promoted; agents quic://{} api http://{} metrics http://{}/metrics",
                ctl.quic_addr, ctl.api_addr, ctl.ops_addr
            );
            shutdown.cancelled().await;
            ctl.shutdown().await;
            std::process::exit(0)
        }
        Cmd::Promote => promote(&cfg),
        Cmd::StateExport { out } => {
            let db_path = cfg.data_dir.join("db");
            let db = sled::open(&db_path).with_context(|| {
                format!(
                    "opening {} (is the controller running? it exports by itself every \
                     [replica] export_every_minutes)",
                    db_path.display()
                )
            })?;
            let epoch = crate::replica::epoch(&db)?;
            let e = crate::replica::export::export(
                &db,
                &cfg.data_dir,
                toml::to_string(&cfg).unwrap_or_default().into_bytes(),
                epoch,
                &out,
            )?;
            println!(
                "exported {} items ({} bytes, epoch {}) to {}",
                e.items,
                e.bytes,
                e.epoch,
                e.path.display()
            );
            Ok(())
        }
        Cmd::StateImport { from } => {
            let i = crate::replica::export::import(&from, &cfg.data_dir)?;
            println!(
                "imported {} items into {}; a controller started on it serves at fencing epoch {}",
                i.items,
                cfg.data_dir.display(),
                i.epoch
            );
            Ok(())
        }
        Cmd::Demo { sites, interval } => {
            let every = Duration::from_secs_f64(interval);
            demo::run(cfg, sites, every, tiandi_link::shutdown_token()).await
        }
        Cmd::Enroll {
            site,
            province,
            ttl_hours,
            role,
            batch,
            prefix,
            out,
        } => enroll(
            &client,
            site.zip(province),
            role,
            ttl_hours,
            batch,
            &prefix,
            out,
        ),
        Cmd::Send { file, to, flags } => {
            let path = file
                .canonicalize()
                .with_context(|| format!("{}", file.display()))?;
            let a = client.call(&SendRequest {
                path: path.display().to_string(),
                to,
                priority: flags.priority,
                window: flags.window,
                rate_limit_mbit: flags.rate_limit,
            })?;
            println!(
                "queued {} ({} bytes, blake3 {}) for {} site(s) as transfer {}",
                a.file,
                a.bytes,
                a.blake3,
                a.destinations.len(),
                a.transfer
            );
            Ok(())
        }
        Cmd::Transfers { json } => {
            let a = client.call(&TransfersRequest {})?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print!("{}", crate::transfers::table(&a.transfers));
                if a.total_transfers > a.transfers.len() {
                    println!(
                        "(the newest {} of {} transfers; GET /api/transfers?limit=N for more)",
                        a.transfers.len(),
                        a.total_transfers
                    );
                }
            }
            Ok(())
        }
        Cmd::Backups { json } => {
            let a = client.call(&BackupsRequest {})?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print!(
                    "{}",
                    crate::backups::table(&a.jobs, tiandi_transfer::now_ms())
                );
            }
            Ok(())
        }
        Cmd::Conference { op } => {
            let a = client.call(&op)?;
            println!("{}", serde_json::to_string_pretty(&a)?);
            Ok(())
        }
        Cmd::User { op } => {
            let a = client.call(&op.request()?)?;
            if let Some(pw) = &a.password {
                println!(
                    "one-time password: {pw}\n(shown once; it must be changed at the first login)"
                );
            }
            if matches!(op, UserCmd::List) || a.password.is_none() {
                for u in &a.users {
                    println!(
                        "{:<24} {:<10} {:<6} {}{}",
                        u.name,
                        u.role,
                        u.province.as_deref().unwrap_or("-"),
                        if u.disabled { "disabled" } else { "enabled" },
                        if u.tokens.is_empty() {
                            String::new()
                        } else {
                            format!(", {} API token(s)", u.tokens.len())
                        }
                    );
                }
            }
            Ok(())
        }
        Cmd::Audit {
            op: AuditCmd::Export { out },
        } => audit_export(&client, out),
        Cmd::Revoke { site } => {
            let a = client.call(&RevokeRequest { site_id: site })?;
            let closed = if a.disconnected {
                " (its connection was closed)"
            } else {
                ""
            };
            println!("revoked site {}{closed}", a.revoked.site_id);
            Ok(())
        }
    }
}

/// `audit export`: from the running controller's API (page by page), else from the data
/// directory.
fn audit_export(client: &AdminClient<'_>, out: Option<PathBuf>) -> anyhow::Result<()> {
    let mut lines: Vec<u8> = Vec::new();
    let cfg = client.cfg;
    let token = tiandi_link::secrets::read_private(&cfg.data_dir.join("admin.token"))?;
    let mut online = false;
    if let Some(token) = token {
        let agent = http_agent(cfg)?;
        let mut before: Option<String> = None;
        let mut pages = Vec::new();
        loop {
            let mut url = format!("{}/api/admin/audit?limit=5000", api_base(cfg));
            if let Some(b) = &before {
                url += &format!("&before={b}");
            }
            let r = agent
                .get(&url)
                .header("Authorization", &format!("Bearer {}", token.trim()))
                .call();
            let mut resp = match r {
                Ok(r) => r,
                Err(ureq::Error::Io(_)) | Err(ureq::Error::ConnectionFailed) => break,
                Err(e) => return Err(e).with_context(|| format!("calling {url}")),
            };
            online = true;
            let v: serde_json::Value = resp.body_mut().read_json()?;
            if !resp.status().is_success() {
                bail!("{url}: {}", v["error"].as_str().unwrap_or("failed"));
            }
            pages.push(v["entries"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(n) => before = Some(n.to_string()),
                None => break,
            }
        }
        // Pages come newest first: write oldest first.
        for e in pages.into_iter().flatten().rev() {
            lines.extend(serde_json::to_vec(&e)?);
            lines.push(b'\n');
        }
    }
    if !online {
        let db = sled::open(cfg.data_dir.join("db")).with_context(|| {
            format!(
                "opening {} (the controller runs, but its API at {} did not answer)",
                cfg.data_dir.join("db").display(),
                cfg.api_listen
            )
        })?;
        crate::audit::Audit::open(&db)?.export(&mut lines)?;
    }
    match out {
        Some(path) => {
            tiandi_link::pki::write_private(&path, &String::from_utf8_lossy(&lines))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} audit entries to {}",
                lines.iter().filter(|b| **b == b'\n').count(),
                path.display()
            );
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&lines)?;
        }
    }
    Ok(())
}

/// `enroll`: one site's token (with what to run on the site), or a batch of them.
fn enroll(
    client: &AdminClient<'_>,
    one: Option<(String, String)>,
    role: tiandi_link::pki::CertRole,
    ttl_hours: Option<u32>,
    batch: Option<usize>,
    prefix: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let hours = ttl_hours.unwrap_or(client.cfg.token_hours);
    let Some(n) = batch else {
        let (site_id, province) = one.context("--site and --province, or --batch")?;
        let t = client.call(&EnrollRequest {
            site_id,
            province,
            ttl_hours: Some(hours),
            role,
        })?;
        println!("{}", t.token);
        eprintln!(
            "one-time token for {} {} (expires in {hours} h); on the site run:\n  tiandi-agent enroll --controller <ADDR:PORT> --token {}",
            t.role, t.site_id, t.token
        );
        return Ok(());
    };
    let sites = (0..n)
        .map(|i| SiteRef {
            site_id: format!("{prefix}{:05}", i + 1),
            province: demo::PROVINCES[i % demo::PROVINCES.len()].to_string(),
        })
        .collect();
    let a = client.call(&EnrollBatchRequest {
        sites,
        ttl_hours: Some(hours),
    })?;
    let lines: Vec<String> = a
        .tokens
        .iter()
        .map(|t| format!("{} {}", t.site_id, t.token))
        .collect();
    match out {
        Some(path) => {
            // One-time tokens are secrets: owner-only, like every key Tiandi writes.
            tiandi_link::pki::write_private(&path, &(lines.join("\n") + "\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {} tokens to {}", lines.len(), path.display());
        }
        None => println!("{}", lines.join("\n")),
    }
    Ok(())
}

/// Who the audit log names for a command run on the data directory itself: `cli:<login>`.
fn offline_user() -> String {
    let who = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    let who: String = who
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    format!("cli:{who}")
}

/// Where the CLI reaches the controller's API: plain HTTP on a loopback address; HTTPS
/// otherwise, to the host itself when the API listens on every address.
pub fn api_base(cfg: &Config) -> String {
    let a = cfg.api_listen;
    if crate::http::plain_http_allowed(&a) {
        return format!("http://{a}");
    }
    let ip = match a.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("https://{}", SocketAddr::new(ip, a.port()))
}

/// An HTTP client for the API: off loopback it trusts only the controller's CA
/// (`data_dir/ca.pem`) and the certificates of `api_tls_cert`, if set.
pub fn http_agent(cfg: &Config) -> anyhow::Result<ureq::Agent> {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)));
    if !crate::http::plain_http_allowed(&cfg.api_listen) {
        let mut roots = Vec::new();
        let mut files = vec![cfg.data_dir.join("ca.pem")];
        files.extend(cfg.api_tls_cert.clone());
        for f in files {
            let pem = std::fs::read_to_string(&f)
                .with_context(|| format!("reading {} (the API's TLS trust)", f.display()))?;
            for der in tiandi_link::pki::certs_from_pem(&pem)? {
                roots.push(ureq::tls::Certificate::from_der(der.as_ref()).to_owned());
            }
        }
        b = b.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
                .unversioned_rustls_crypto_provider(tiandi_link::tls::provider())
                .build(),
        );
    }
    Ok(b.build().into())
}

/// Sends admin requests: to the running controller's API if there is one, else through the
/// same dispatch on the data directory.
pub struct AdminClient<'a> {
    pub cfg: &'a Config,
}

impl AdminClient<'_> {
    pub fn call<R: AdminCall>(&self, req: &R) -> anyhow::Result<R::Answer> {
        let token_path = self.cfg.data_dir.join("admin.token");
        if let Some(token) = tiandi_link::secrets::read_private(&token_path)?
            && let Some(answer) = self.over_http(req, token.trim())?
        {
            return Ok(answer);
        }
        self.offline(req)
    }

    /// `None` when no controller listens at `api_listen`.
    fn over_http<R: AdminCall>(&self, req: &R, token: &str) -> anyhow::Result<Option<R::Answer>> {
        let url = format!("{}{}", api_base(self.cfg), R::PATH);
        let agent = http_agent(self.cfg)?;
        let auth = format!("Bearer {token}");
        let sent = if R::GET {
            agent.get(&url).header("Authorization", &auth).call()
        } else {
            agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(req)
        };
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Ok(None);
            }
            Err(ureq::Error::ConnectionFailed) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("calling {url}")),
        };
        let status = resp.status();
        if !status.is_success() {
            let v: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
            bail!(
                "{}: {}",
                R::PATH,
                v["error"].as_str().unwrap_or(status.as_str())
            );
        }
        let answer = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("reading the answer of {url}"))?;
        Ok(Some(answer))
    }

    /// No controller running: the same dispatch, on the data directory.
    fn offline<R: AdminCall>(&self, req: &R) -> anyhow::Result<R::Answer> {
        let cfg = self.cfg;
        let db_dir = cfg.data_dir.join("db");
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let ca = tiandi_link::Ca::load_or_create(&cfg.data_dir)?;
        let db = sled::open(&db_dir).with_context(|| {
            format!(
                "opening {} (the controller runs, but its API at {} did not answer)",
                db_dir.display(),
                cfg.api_listen
            )
        })?;
        let registry = Registry::open(&db, &ca)?;
        let outbox = tiandi_transfer::Outbox::new(db.open_tree("outbox")?);
        let users = crate::users::Users::open(&db)?;
        let backups = crate::backups::Backups::open(&db, cfg)?;
        let admin = Admin {
            registry: &registry,
            outbox: &outbox,
            config: cfg,
            users: &users,
            backups: &backups,
        };
        let result = req.dispatch(&admin);
        if let Some((action, target)) = req.audit() {
            // The command line on the controller's host, without the controller running.
            let e = crate::audit::entry(&offline_user(), "admin", &action, &target);
            let e = match &result {
                Ok(_) => e,
                Err(err) => e.with_outcome(&format!("failed: {err}")),
            };
            crate::audit::Audit::open(&db)?.record(e);
        }
        let answer = result.map_err(|e| match e {
            AdminError::NeedsController(m) => anyhow::anyhow!(m),
            other => anyhow::anyhow!("{}: {other}", R::PATH),
        })?;
        db.flush()?;
        Ok(answer)
    }
}

/// Asks the standby on `ops_listen` to take over (with the primary's admin token, which the
/// standby holds as a copy).
fn promote(cfg: &Config) -> anyhow::Result<()> {
    let token = tiandi_link::secrets::read_private(&cfg.data_dir.join("admin.token"))?
        .with_context(|| {
            format!(
                "{}: no admin token (has this standby copied its primary yet?)",
                cfg.data_dir.join("admin.token").display()
            )
        })?;
    let url = format!("http://{}/promote", cfg.ops_listen);
    let resp = ureq::post(&url)
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .config()
        .http_status_as_error(false)
        .build()
        .send_empty()
        .with_context(|| format!("asking the standby at {url} (is it running?)"))?;
    let status = resp.status();
    let body = resp.into_body().read_to_string().unwrap_or_default();
    if !status.is_success() {
        bail!("the standby refuses ({status}): {body}");
    }
    println!("{body}");
    Ok(())
}

#[cfg(test)]
mod manual {
    /// The package's manual page (`debian/tiandi-controller.1`) is this command line, rendered by
    /// clap_mangen; `TIANDI_BLESS=1 cargo test -p tiandi-controller manual_page` rewrites it.
    #[test]
    fn the_packaged_manual_page_is_the_command_line() {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_mangen::Man::new(super::Cli::command())
            .render(&mut out)
            .expect("render");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/debian/tiandi-controller.1");
        if std::env::var_os("TIANDI_BLESS").is_some() {
            std::fs::write(path, &out).expect("write the manual page");
        }
        assert!(
            std::fs::read(path).ok().as_deref() == Some(&out[..]),
            "debian/tiandi-controller.1 is not the command line: TIANDI_BLESS=1 cargo test -p \
             tiandi-controller manual_page"
        );
    }
}
