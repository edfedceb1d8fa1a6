//! The Tiandi controller: accepts agents over mutual-TLS QUIC ([`server`]), enrolls sites
//! ([`enroll`], [`registry`]), stores reports exactly once ([`store`]), keeps every site's live
//! status and raises alarms ([`sites`]), and serves the JSON API ([`api`]) and Prometheus
//! metrics ([`metrics`]); admin requests are typed once ([`admin`]) for the API and the CLI
//! ([`cli`]). [`Controller::start`] wires it together; `main.rs` only starts the CLI.

pub mod account;
pub mod acks;
pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup_tasks;
pub mod backups;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo;

pub mod enroll;
pub mod federation;
pub mod housekeeping;
pub mod http;
pub mod leases;
pub mod metrics;
pub mod paths;
pub mod registry;
pub mod replica;
pub mod server;
pub mod sessions;
pub mod sites;
pub mod store;
pub mod transfers;
pub mod users;
pub mod views;
pub mod wal;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tiandi_link::Ca;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use metrics::{Metrics, WireTotals};
use registry::Registry;
use sites::Sites;
use store::{AlarmEvent, Store};

pub use tiandi_link::clock::now_ms;

/// What the live stream (`/api/stream`) carries.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    Report {
        site_id: String,
        province: String,
        seq: u64,
        taken_ms: i64,
        visible_ms: i64,
    },
    Alarm(AlarmEvent),
    /// A site's status or connection changed.
    Site {
        site_id: String,
        province: String,
        status: sites::Status,
        connected: bool,
        at_ms: i64,
    },
    /// A transfer to a site was queued, moved (every second while sending) or finished.
    Transfer {
        id: String,
        /// The receiving site (or node).
        dest: String,
        /// The receiver's province; empty when the receiver is not a site (administrators
        /// only see those).
        province: String,
        state: tiandi_transfer::outbox::JobState,
        progress_pct: f64,
        acked_bytes: u64,
        rate_bps: u64,
        at_ms: i64,
    },
    /// A dual-homed site moved a class of traffic to another path (site clock).
    Path {
        site_id: String,
        province: String,
        class: String,
        from: Option<String>,
        to: Option<String>,
        reason: String,
        at_ms: i64,
    },
    /// A site's device said something on its own: a trap or an inform its profile names
    /// (`link-down`; a flood the agent summarised is one event with its `count`). Site clock.
    DeviceEvent {
        site_id: String,
        province: String,
        #[serde(flatten)]
        event: store::DeviceEventEntry,
    },
}

impl Event {
    /// The province of the site the event is about.
    pub fn province(&self) -> &str {
        match self {
            Event::Report { province, .. }
            | Event::Site { province, .. }
            | Event::Transfer { province, .. }
            | Event::Path { province, .. }
            | Event::DeviceEvent { province, .. } => province,
            Event::Alarm(a) => &a.province,
        }
    }
    /// Its name in `/api/stream?events=…`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Report { .. } => "report",
            Event::Alarm(_) => "alarm",
            Event::Site { .. } => "site",
            Event::Transfer { .. } => "transfer",
            Event::Path { .. } => "path",
            Event::DeviceEvent { .. } => "device-event",
        }
    }
}

/// Shared state of a running controller.
pub struct Core {
    pub config: Config,
    pub ca: Ca,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub sites: Arc<Sites>,
    pub metrics: Metrics,
    /// Live events. Full-buffer policy: a slow subscriber loses the oldest events (it is told
    /// how many) and never slows ingest down.
    pub events: broadcast::Sender<Event>,
    /// Every site's live connections, one per path ([`paths`]).
    pub links: paths::Links,
    closed_wire: Mutex<WireTotals>,
    pub cancel: CancellationToken,
    /// Bearer tokens of the HTTP listeners ([`auth`]).
    pub tokens: Arc<auth::Tokens>,
    /// Files queued for sites (store-and-forward transfers).
    pub outbox: Arc<tiandi_transfer::Outbox>,
    /// Files sent by sites land here (`data_dir/inbox`).
    pub inbox: Arc<tiandi_transfer::Inbox>,
    /// The conference relay and its address, if enabled.
    pub conference: Option<(Arc<tiandi_video::relay::Relay>, std::net::SocketAddr)>,
    /// Operator accounts, their sessions, failed-login counts, the audit log ([`users`],
    /// [`sessions`], [`audit`]) and alarm acknowledgements ([`acks`]).
    pub users: Arc<users::Users>,
    pub sessions: sessions::Sessions,
    pub throttle: sessions::Throttle,
    pub audit: Arc<audit::Audit>,
    pub acks: acks::Acks,
    /// Backup jobs, their results and the partner copies kept here ([`backups`]).
    pub backups: Arc<backups::Backups>,
    /// The replication log standbys follow, and this controller's fencing epoch ([`replica`]).
    pub replica: Arc<replica::primary::Primary>,
    /// The ministry's national view, when it lists province controllers (`[national]`,
    /// [`federation`]).
    pub national: Option<Arc<federation::National>>,
    /// When this controller started (Unix ms).
    pub started_ms: i64,
    /// The last sample of the stored-report counter (time, count) and the rate between the
    /// two samples before it, for [`Core::report_rate`].
    rate_sample: Mutex<(i64, u64, f64)>,
}

impl Core {
    /// Forgets a site's connection that ended; returns whether the site has no connection
    /// left (a superseded connection ending late must not mark a reconnected site offline).
    fn unregister_conn(&self, site: &str, conn: &quinn::Connection) -> bool {
        let none = self.links.unregister(site, conn);
        self.closed_wire
            .lock()
            .expect("wire lock poisoned")
            .add(&conn.stats());
        none
    }

    /// UDP totals of every agent connection, open and closed.
    pub fn wire_totals(&self) -> WireTotals {
        let mut t = *self.closed_wire.lock().expect("wire lock poisoned");
        for c in self.links.all() {
            t.add(&c.stats());
        }
        t
    }

    /// What admin requests use ([`admin::AdminCall::dispatch`]).
    pub fn admin(&self) -> admin::Admin<'_> {
        admin::Admin {
            registry: &self.registry,
            outbox: &self.outbox,
            config: &self.config,
            users: &self.users,
            backups: &self.backups,
        }
    }

    /// Whether the site has a live connection.
    pub fn is_connected(&self, site: &str) -> bool {
        self.links.is_connected(site)
    }

    /// Closes every site's live connection; returns how many.
    pub fn disconnect_all(&self, code: u32, reason: &str) -> usize {
        let all = self.links.drain();
        for c in &all {
            c.close(code.into(), reason.as_bytes());
        }
        all.len()
    }

    /// Closes the live connection of a site (after revocation).
    pub fn disconnect(&self, site: &str, code: u32, reason: &str) -> bool {
        let conns = self.links.remove(site);
        for c in &conns {
            c.close(code.into(), reason.as_bytes());
        }
        !conns.is_empty()
    }

    /// Reports stored per second, over the last few seconds (sampled when asked, at most
    /// every 2 s).
    pub fn report_rate(&self) -> f64 {
        let mut s = self.rate_sample.lock().expect("rate lock poisoned");
        let (now, n) = (now_ms(), self.metrics.reports.get());
        if now - s.0 >= 2000 {
            s.2 = (n.saturating_sub(s.1)) as f64 * 1000.0 / (now - s.0) as f64;
            s.0 = now;
            s.1 = n;
        }
        (s.2 * 10.0).round() / 10.0
    }

    /// Tells the live stream a site's status or connection changed.
    pub fn site_changed(&self, site_id: &str) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let ev = self.sites.with_site(site_id, |s| Event::Site {
            site_id: s.site_id.clone(),
            province: s.province.clone(),
            status: s.status,
            connected: s.connected,
            at_ms: now_ms(),
        });
        if let Some(ev) = ev {
            let _ = self.events.send(ev);
        }
    }

    pub fn record_alarms(&self, events: Vec<AlarmEvent>) {
        let mut changed: Vec<String> = Vec::new();
        for ev in events {
            if !changed.contains(&ev.site_id) {
                changed.push(ev.site_id.clone());
            }
            if ev.state == "raised" {
                warn!(site = %ev.site_id, alarm = %ev.alarm, detail = %ev.detail, "Alarm raised.");
            } else {
                info!(site = %ev.site_id, alarm = %ev.alarm, "Alarm cleared.");
            }
            self.metrics
                .alarm_events
                .with_label_values(&[ev.alarm.as_str(), ev.state.as_str()])
                .inc();
            if let Err(error) = self.store.append_alarm(&ev) {
                tracing::error!(%error, "Could not write the alarm log.");
            }
            let _ = self.events.send(Event::Alarm(ev));
        }
        for site in changed {
            self.site_changed(&site);
        }
    }

    /// The device events of a report just stored (the store kept them already): each is
    /// counted, logged and sent on the live stream.
    pub fn device_events(&self, site_id: &str, province: &str, report: &tiandi_proto::Report) {
        for e in report
            .events
            .iter()
            .take(store::DEVICE_EVENTS_PER_REPORT)
            .map(|e| store::DeviceEventEntry::from_wire(e, report.seq))
        {
            self.metrics
                .device_events
                .with_label_values(&[metrics::severity_label(&e.severity)])
                .inc_by(u64::from(e.count));
            info!(site = %site_id, device = %e.device, event = %e.title(), severity = %e.severity, detail = %e.detail, "Device event.");
            if self.events.receiver_count() > 0 {
                let _ = self.events.send(Event::DeviceEvent {
                    site_id: site_id.to_string(),
                    province: province.to_string(),
                    event: e,
                });
            }
        }
    }

    /// Enrolls a site directly (no token): used for the controller's own simulated sites.
    pub fn issue_direct(
        &self,
        site_id: &str,
        province: &str,
        csr_pem: &str,
    ) -> anyhow::Result<tiandi_link::pki::Issued> {
        let validity = Duration::from_secs(u64::from(self.config.cert_days) * 86400);
        let issued = self
            .registry
            .issue(site_id, province, csr_pem, &self.ca, validity)?;
        self.sites.insert(site_id, province, None, now_ms());
        Ok(issued)
    }
}

/// A running controller.
pub struct Controller {
    pub core: Arc<Core>,
    pub quic_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    committer: store::Committer,
    db: sled::Db,
}

impl Controller {
    pub async fn start(config: Config) -> anyhow::Result<Controller> {
        if tiandi_link::secrets::private_dir(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?
        {
            warn!(dir = %config.data_dir.display(), "The data directory was open to others; made it 0700.");
        }
        // The CA key signs every site: refuse one others may read (and say how to fix it).
        tiandi_link::secrets::read_private(&config.data_dir.join("ca.key"))?;
        let ca = Ca::load_or_create(&config.data_dir).context("loading the site CA")?;
        let db_path = config.data_dir.join("db");
        let db = open_db(&db_path)?;
        let registry = Registry::open(&db, &ca).context("opening the site registry")?;
        let store = Store::open(&db, &config.data_dir).with_context(|| {
            format!(
                "opening the store ({} and {})",
                db_path.display(),
                config.data_dir.join(store::HISTORY_DIR).display()
            )
        })?;
        let replica = replica::primary::Primary::start(
            &db,
            &store,
            &config.data_dir,
            toml::to_string(&config).unwrap_or_default(),
            replica::epoch(&db)?,
        )
        .context("starting the replication log")?;
        {
            let replica = replica.clone();
            store.on_stored(Box::new(move |site, bytes| replica.report(site, bytes)));
        }
        let sites = Arc::new(Sites::new(config.thresholds.clone()));
        let now = now_ms();
        for rec in registry.list() {
            let latest = store
                .latest(&rec.site_id)
                .with_context(|| format!("loading the latest report of {}", rec.site_id))?;
            sites.insert(&rec.site_id, &rec.province, latest, now);
        }
        let tokens = Arc::new(auth::Tokens::load(
            &config.data_dir,
            !http::plain_http_allowed(&config.ops_listen),
        )?);
        check_outgoing_dirs(&config)?;
        let outbox = tiandi_transfer::Outbox::new(db.open_tree("outbox")?);
        let inbox = tiandi_transfer::Inbox::new(
            &config.data_dir.join("inbox"),
            db.open_tree("inbox")?,
            "controller",
            None,
        )
        .context("opening the transfer inbox")?;
        // Files from sites land in inbox/<site>/; relays report their forwarded copies here.
        inbox.use_per_peer_dirs();
        {
            let outbox = outbox.clone();
            inbox.on_forwarded(Arc::new(move |relay, items| {
                outbox
                    .apply_forwarded(relay, items)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }));
        }
        {
            // A relay asks whether a site below may connect: only the province's relay may
            // ask, and only about a site of its province; the registry answers.
            let (registry, relays) = (registry.clone(), config.relays.clone());
            inbox.on_site_check(Arc::new(move |relay, c| {
                if relays.get(&c.province).map(String::as_str) != Some(relay) {
                    return Err(format!(
                        "{relay} is not the relay of province {}",
                        c.province
                    ));
                }
                let id = tiandi_link::SiteIdentity {
                    site_id: c.site.clone(),
                    province: c.province.clone(),
                    serial: c.serial.clone(),
                    not_after: 0,
                };
                tiandi_link::tls::CertPolicy::check(registry.as_ref(), &id)
                    .map_err(|r| format!("site {}: {r:?}", c.site))
            }));
        }
        let conference = if config.conference.enabled {
            Some(
                start_conference_relay(&config, &ca, registry.clone())
                    .context("starting the conference relay")?,
            )
        } else {
            None
        };
        let users = Arc::new(users::Users::open(&db).context("opening the user accounts")?);
        let first_admin = first_admin(&config, &users)?;
        let c = &config.console;
        let sessions = sessions::Sessions::open(
            &db,
            sessions::Lifetimes {
                idle_ms: i64::from(c.session_idle_minutes.max(1)) * 60_000,
                absolute_ms: i64::from(c.session_hours.max(1)) * 3_600_000,
                kiosk_absolute_ms: i64::from(c.kiosk_session_days.max(1)) * 86_400_000,
            },
        )
        .context("opening the console sessions")?;
        let audit = Arc::new(audit::Audit::open(&db).context("opening the audit log")?);
        let acks = acks::Acks::open(&db).context("opening the alarm acknowledgements")?;
        let backups =
            Arc::new(backups::Backups::open(&db, &config).context("opening the backup jobs")?);
        let (events, _) = broadcast::channel(16_384);
        {
            // Transfers on the live stream: each job write (queued, progress every second
            // while sending, finished) as an event, when anyone listens.
            let (events, sites) = (events.clone(), sites.clone());
            outbox.observe(move |job| {
                if events.receiver_count() == 0 {
                    return;
                }
                let status = job.status();
                let province = sites
                    .with_site(&job.dest, |s| s.province.clone())
                    .unwrap_or_default();
                let _ = events.send(Event::Transfer {
                    id: status.id,
                    dest: status.dest,
                    province,
                    state: status.state,
                    progress_pct: status.progress_pct,
                    acked_bytes: status.acked_bytes,
                    rate_bps: status.rate_bps,
                    at_ms: now_ms(),
                });
            });
        }
        let national = if config.national.provinces.is_empty() {
            None
        } else {
            for p in &config.national.provinces {
                tiandi_link::names::validate_name("site ID", p)
                    .with_context(|| format!("national.provinces: {p:?}"))?;
            }
            Some(Arc::new(
                federation::National::open(&db, config.national.clone())
                    .context("opening the national view")?,
            ))
        };
        let core = Arc::new(Core {
            national,
            ca,
            registry: registry.clone(),
            store: store.clone(),
            sites,
            metrics: Metrics::new(),
            events,
            links: paths::Links::default(),
            closed_wire: Mutex::new(WireTotals::default()),
            cancel: CancellationToken::new(),
            tokens,
            outbox,
            inbox,
            conference: conference.as_ref().map(|c| (c.0.clone(), c.1)),
            users,
            sessions,
            throttle: Default::default(),
            audit,
            acks,
            backups,
            replica,
            started_ms: now_ms(),
            rate_sample: Mutex::new((now_ms(), 0, 0.0)),
            config,
        });
        if let Some(how) = first_admin {
            core.audit
                .record(audit::entry("controller", "", "user.add", "admin").with_detail(&how));
        }
        if let Some((relay, _, endpoint)) = conference {
            relay.set_cert_policy(core.registry.clone());
            tokio::spawn(relay.serve(endpoint, core.cancel.clone()));
        }

        let (chain, key) = core.ca.issue_controller()?;
        let tls = tiandi_link::tls::server_tls(chain, key, core.ca.cert_der(), registry)?;
        let reset_secret = tiandi_link::secrets::load_or_create_token(
            &core.config.data_dir.join("quic-reset.key"),
            "QUIC stateless-reset key",
        )?;
        // Each connection gets its own transport (see `server::accept_loop`): its congestion
        // controller learns the site's committed rate once the site is known.
        let server_config = Arc::new(tiandi_link::server_config(
            tls,
            core.config.profile.transport(),
        )?);
        let endpoint = std::net::UdpSocket::bind(core.config.quic_listen)
            .map_err(tiandi_link::LinkError::Endpoint)
            .and_then(|socket| {
                tiandi_link::server_endpoint_on(
                    socket,
                    (*server_config).clone(),
                    reset_secret.as_bytes(),
                )
            })
            .with_context(|| format!("binding QUIC listener {}", core.config.quic_listen))?;
        let quic_addr = endpoint.local_addr()?;
        replica::primary::check_peers(&core, &endpoint).await?;

        let api_listener = tokio::net::TcpListener::bind(core.config.api_listen)
            .await
            .with_context(|| format!("binding API listener {}", core.config.api_listen))?;
        let ops_listener = tokio::net::TcpListener::bind(core.config.ops_listen)
            .await
            .with_context(|| format!("binding ops listener {}", core.config.ops_listen))?;
        let api_addr = api_listener.local_addr()?;
        let ops_addr = ops_listener.local_addr()?;

        let committer = store
            .start_committer()
            .context("starting the store's committer thread")?;
        let mut tasks = vec![
            tokio::spawn(server::supervise_accept(
                core.clone(),
                endpoint.clone(),
                server_config,
            )),
            tokio::spawn(housekeeping::tick_loop(core.clone())),
            tokio::spawn(replica::primary::stand_down(core.clone())),
            tokio::spawn(replica::primary::export_loop(core.clone())),
            tokio::spawn(housekeeping::prune_loop(core.clone())),
            // Sites' uploads leave a state each: old ones are forgotten, abandoned ones freed.
            tokio::spawn(tiandi_transfer::expire_loop(
                core.inbox.clone(),
                core.outbox.clone(),
                core.cancel.clone(),
            )),
        ];
        tasks.extend(backup_tasks::start(&core, &db)?);
        if let Some(up) = core.config.upstream.clone() {
            let (core, db) = (core.clone(), db.clone());
            tasks.push(tokio::spawn(async move {
                let cancel = core.cancel.clone();
                if let Err(error) = federation::forward(core, db, up, cancel).await {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "Forwarding to the ministry stopped."
                    );
                }
            }));
        }
        for (listener, addr, router) in [
            (api_listener, api_addr, api::router(core.clone())),
            (ops_listener, ops_addr, api::ops_router(core.clone())),
        ] {
            // Plain HTTP (bearer tokens in clear) only on the host itself.
            let tls = if http::plain_http_allowed(&addr) {
                None
            } else {
                Some(http::server_tls(&core.config, &core.ca).with_context(|| {
                    format!("the TLS certificate of the listener on {addr} (not loopback)")
                })?)
            };
            tasks.push(tokio::spawn(http::serve(
                listener,
                router,
                tls,
                core.cancel.clone(),
            )));
        }
        info!(%quic_addr, %api_addr, %ops_addr, sites = core.sites.len(), ca = %core.ca.fingerprint(), "Controller started.");
        if core
            .users
            .get(FIRST_ADMIN)
            .ok()
            .flatten()
            .is_some_and(|u| u.must_change)
        {
            let file = core.config.data_dir.join(FIRST_PASSWORD_FILE);
            if let Ok(Some(pw)) = tiandi_link::secrets::read_private(&file) {
                println!(
                    "Console: {}/ user `{FIRST_ADMIN}`, one-time password {} (also in {}; \
                     change it at the first login)",
                    cli::api_base(&core.config),
                    pw.trim(),
                    file.display()
                );
            }
        }
        Ok(Controller {
            core,
            quic_addr,
            api_addr,
            ops_addr,
            endpoint,
            tasks,
            committer,
            db,
        })
    }

    /// The conference relay's address, if it runs.
    pub fn conference_addr(&self) -> Option<std::net::SocketAddr> {
        self.core.conference.as_ref().map(|c| c.1)
    }

    /// Graceful shutdown: agents are told, the store is flushed, listeners stop.
    pub async fn shutdown(self) {
        let started = std::time::Instant::now();
        info!("Shutting down.");
        // No new handshakes from here on: one completed now would leave its agent waiting for
        // a Welcome from a process about to exit. Then close every connection.
        self.core.cancel.cancel();
        self.core.replica.stop();
        self.endpoint.set_server_config(None);
        self.endpoint.close(
            tiandi_proto::codes::SHUTDOWN.into(),
            b"controller shutting down",
        );
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        let tasks_ms = started.elapsed().as_millis() as u64;
        // Connections were closed above; draining them is a courtesy, not worth a slow restart
        // (agents that miss the close get a stateless reset from the next process).
        let idle = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle())
            .await
            .is_ok();
        // The committer's last flush makes every stored report durable; then the rest.
        let mut committer = self.committer;
        let db = self.db;
        let flushed = tokio::task::spawn_blocking(move || {
            committer.stop();
            db.flush()
        })
        .await;
        if !matches!(flushed, Ok(Ok(_))) {
            tracing::error!(?flushed, "Final flush failed.");
        }
        info!(
            tasks_ms,
            drained = idle,
            total_ms = started.elapsed().as_millis() as u64,
            "Stopped."
        );
    }
}

/// The controller's sled database (also a standby's copy of it): 64 MB of cache, flushed at
/// the store's checkpoints only (its write-ahead log covers the time between).
pub fn open_db(path: &std::path::Path) -> anyhow::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(64 * 1024 * 1024)
        .flush_every_ms(None)
        .open()
        .with_context(|| {
            format!(
                "opening {} (is another controller running with this data dir?)",
                path.display()
            )
        })
}

/// The first administrator's account name.
pub const FIRST_ADMIN: &str = "admin";
/// Where the first administrator's one-time password is kept until it is changed (0600).
pub const FIRST_PASSWORD_FILE: &str = "initial-admin-password";

/// With no account yet, makes the administrator `admin`: with the password of
/// `console.admin_password_file`, else a one-time password (printed at start, and in
/// `data_dir/initial-admin-password` until it is changed). Returns how, for the audit log.
fn first_admin(config: &Config, users: &users::Users) -> anyhow::Result<Option<String>> {
    if !users.is_empty() {
        return Ok(None);
    }
    let (pw, one_time, how) = match &config.console.admin_password_file {
        Some(f) => {
            let pw = tiandi_link::secrets::read_private(f)?.with_context(|| {
                format!("console.admin_password_file {}: no such file", f.display())
            })?;
            let pw = pw.trim_end_matches(['\n', '\r']).to_string();
            users::check_password(&pw)
                .map_err(|e| anyhow::anyhow!("console.admin_password_file {}: {e}", f.display()))?;
            (pw, false, format!("password from {}", f.display()))
        }
        None => (
            users::random_password(),
            true,
            "one-time password".to_string(),
        ),
    };
    if one_time {
        tiandi_link::pki::write_private(&config.data_dir.join(FIRST_PASSWORD_FILE), &pw)?;
    }
    users
        .add(FIRST_ADMIN, users::Role::Admin, &pw, one_time)
        .context("creating the first administrator")?;
    info!(user = FIRST_ADMIN, %how, "Created the first administrator.");
    Ok(Some(how))
}

/// `outgoing_dirs` may not open the data directory: one inside it must be
/// `data_dir/outgoing` (made here when it is the default).
fn check_outgoing_dirs(config: &Config) -> anyhow::Result<()> {
    let data = config
        .data_dir
        .canonicalize()
        .with_context(|| format!("{}", config.data_dir.display()))?;
    if config.outgoing_dirs.is_empty() {
        let d = config.data_dir.join("outgoing");
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    for d in &config.outgoing_dirs {
        let c = d.canonicalize().unwrap_or_else(|_| d.clone());
        if c.starts_with(&data) && c != data.join("outgoing") {
            anyhow::bail!(
                "outgoing_dirs: {} is inside the data directory {}, whose keys and tokens must \
                 never be sent; use {} or a directory outside it",
                d.display(),
                config.data_dir.display(),
                config.data_dir.join("outgoing").display()
            );
        }
    }
    Ok(())
}

/// The conference relay: a site certificate of its own from the CA (the name sites connect
/// to), the registry checking every participant's certificate, only created conferences.
fn start_conference_relay(
    config: &Config,
    ca: &Ca,
    registry: Arc<Registry>,
) -> anyhow::Result<(
    Arc<tiandi_video::relay::Relay>,
    std::net::SocketAddr,
    quinn::Endpoint,
)> {
    let c = &config.conference;
    let (key, csr) = tiandi_link::pki::site_key_and_csr(&c.name)?;
    let cert = ca
        .sign_relay(&csr, &c.name, "ministry", Duration::from_secs(365 * 86_400))?
        .cert_pem;
    let tls = tiandi_video::relay_tls_with(ca.cert_pem(), &cert, &key, registry)?;
    let listen = c
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::new(config.quic_listen.ip(), 0));
    let secret: [u8; 32] = rand::random();
    let endpoint = tiandi_link::server_endpoint(
        listen,
        tls,
        tiandi_video::transport(config.profile),
        &secret,
    )
    .with_context(|| format!("binding the conference relay at {listen} (conference.listen)"))?;
    let addr = endpoint.local_addr()?;
    let relay = tiandi_video::relay::Relay::new(tiandi_video::relay::RelayOptions {
        name: c.name.clone(),
        chair: c.chair.clone(),
        upstream: None,
        open_rooms: false,
        fec_rtt_ms: tiandi_video::client::FEC_RTT_MS,
        confirmed_within: tiandi_video::relay::CONFIRMED_WITHIN,
    });
    info!(%addr, name = %c.name, "Conference relay listening.");
    Ok((relay, addr, endpoint))
}
