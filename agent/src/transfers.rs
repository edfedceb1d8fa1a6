//! The agent's transfers: files the controller (or the province relay) sends land in
//! `data_dir/inbox`; files this site sends go through a persistent outbox toward the
//! controller; a site configured as a relay serves the sites below it.
//!
//! `tiandi-agent send FILE` does not open the agent's state (the running agent holds it): it
//! drops a request into `data_dir/outgoing/`, which the agent takes within a second, hashes,
//! and queues. The agent writes its outbox's state to `data_dir/outgoing/status.json` as it
//! changes, which `tiandi-agent transfers` prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tiandi_transfer::{Inbox, Job, JobState, JobStatus, Manifest, Outbox, Priority, Window};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// The node name of the controller as a transfer destination.
pub const CONTROLLER: &str = "controller";

/// What the uplink hands each controller session.
pub struct SiteTransfers {
    pub site_id: String,
    pub inbox: Arc<Inbox>,
    pub outbox: Arc<Outbox>,
    /// The live controller connection (None while down): relay reports go on it.
    pub upstream: watch::Sender<Option<quinn::Connection>>,
}

impl tiandi_uplink::SessionHook for SiteTransfers {
    /// Starts this site's side of transfers on a new controller connection; it all stops when
    /// `stop` fires.
    fn on_session(
        self: Arc<Self>,
        conn: &quinn::Connection,
        stop: CancellationToken,
        route: tiandi_uplink::Route,
    ) {
        tokio::spawn(
            tiandi_transfer::inbox::accept_loop(
                self.inbox.clone(),
                conn.clone(),
                None,
                stop.clone(),
            )
            .in_current_span(),
        );
        tokio::spawn(
            tiandi_transfer::outbox::drive_routed(
                self.outbox.clone(),
                conn.clone(),
                CONTROLLER.into(),
                self.site_id.clone(),
                stop.clone(),
                route.classes(),
            )
            .in_current_span(),
        );
        self.upstream.send_replace(Some(conn.clone()));
        let me = self;
        let conn = conn.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            me.upstream.send_if_modified(|c| {
                let same = c
                    .as_ref()
                    .is_some_and(|c| c.stable_id() == conn.stable_id());
                if same {
                    *c = None;
                }
                same
            });
        });
    }
}

/// A `tiandi-agent send` request, as dropped into `data_dir/outgoing/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendRequest {
    pub path: PathBuf,
    pub priority: Priority,
    #[serde(default, with = "tiandi_transfer::outbox::window::as_text")]
    pub window: Option<Window>,
    pub rate_limit_mbit: Option<f64>,
}

pub fn outgoing_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outgoing")
}

/// Checks a request and drops it where the running agent takes it. Returns the request's ID.
pub fn request_send(data_dir: &Path, req: &SendRequest) -> anyhow::Result<String> {
    check_request(req)?;
    let meta = std::fs::metadata(&req.path).with_context(|| format!("{}", req.path.display()))?;
    anyhow::ensure!(
        meta.is_file(),
        "{} is not a regular file",
        req.path.display()
    );
    let dir = outgoing_dir(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let id = format!(
        "a{}-{:04x}",
        tiandi_transfer::now_ms(),
        rand::random::<u16>()
    );
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(req)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let dest = dir.join(format!("{id}.request.json"));
    std::fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(id)
}

fn check_request(req: &SendRequest) -> anyhow::Result<()> {
    if let Some(r) = req.rate_limit_mbit {
        anyhow::ensure!(
            r > 0.0 && r.is_finite(),
            "rate limit {r} Mbit/s must be positive"
        );
    }
    Ok(())
}

/// Takes requests from `data_dir/outgoing/` into the outbox, and keeps `status.json` current,
/// until `stop`.
pub async fn intake_loop(
    data_dir: PathBuf,
    outbox: Arc<Outbox>,
    site_id: String,
    stop: CancellationToken,
) {
    let dir = outgoing_dir(&data_dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        warn!(dir = %dir.display(), error = %e, "Cannot create the outgoing directory: `send` requests will not be taken.");
    }
    let mut last_status = Vec::new();
    loop {
        if let Err(e) = take_requests(&dir, &outbox, &site_id).await {
            warn!(error = %e, "Reading send requests failed.");
        }
        match status_json(&outbox) {
            Ok(s) if s != last_status => {
                let tmp = dir.join(".status.json.tmp");
                if std::fs::write(&tmp, &s)
                    .and_then(|_| std::fs::rename(&tmp, dir.join("status.json")))
                    .is_ok()
                {
                    last_status = s;
                }
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "Outbox status unavailable."),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn take_requests(dir: &Path, outbox: &Outbox, site_id: &str) -> anyhow::Result<()> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".request.json"))
        .collect();
    names.sort();
    for p in names {
        let id = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".request.json"))
            .unwrap_or("request")
            .to_string();
        let result: anyhow::Result<Job> = async {
            let req: SendRequest = serde_json::from_slice(&std::fs::read(&p)?)
                .with_context(|| format!("{}: not a send request", p.display()))?;
            check_request(&req)?;
            let source = req
                .path
                .canonicalize()
                .with_context(|| format!("{}", req.path.display()))?;
            let s = source.clone();
            let manifest = tokio::task::spawn_blocking(move || Manifest::of_file(&s))
                .await
                .context("hashing task")??;
            let mut job = Job::new(&id, CONTROLLER, source, manifest);
            job.priority = req.priority;
            job.window = req.window;
            job.rate_limit_bps = req.rate_limit_mbit.map(|r| (r * 1e6) as u64);
            job.origin = site_id.to_string();
            Ok(job)
        }
        .await;
        match result {
            Ok(job) => {
                info!(transfer = %job.id, file = %job.source.display(), "Send request taken.");
                outbox.enqueue(job)?;
                std::fs::remove_file(&p)?;
            }
            Err(e) => {
                // A request that cannot be queued is kept, renamed, with the reason beside it.
                warn!(request = %p.display(), error = %format!("{e:#}"), "Send request refused.");
                let failed = dir.join(format!("{id}.failed.json"));
                std::fs::write(
                    &failed,
                    serde_json::to_vec(
                        &serde_json::json!({ "id": id, "error": format!("{e:#}") }),
                    )?,
                )?;
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

/// The outbox as JSON (what `status.json` holds).
pub fn status_json(outbox: &Outbox) -> anyhow::Result<Vec<u8>> {
    let jobs: Vec<JobStatus> = outbox.list()?.iter().map(Job::status).collect();
    Ok(serde_json::to_vec_pretty(
        &serde_json::json!({ "transfers": jobs }),
    )?)
}

/// The outbox as the running agent last wrote it (`status.json`); empty if it never did.
pub fn read_status(data_dir: &Path) -> anyhow::Result<Vec<JobStatus>> {
    let p = outgoing_dir(data_dir).join("status.json");
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    #[derive(Deserialize)]
    struct Status {
        transfers: Vec<JobStatus>,
    }
    let v: Status = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not the agent's transfer status", p.display()))?;
    Ok(v.transfers)
}

/// Why the agent refused request `id`, if it did.
pub fn read_refusal(data_dir: &Path, id: &str) -> Option<String> {
    let p = outgoing_dir(data_dir).join(format!("{id}.failed.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(v["error"].as_str().unwrap_or("unknown").to_string())
}

/// Where this site's files come from when its province has a relay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViaRelay {
    /// The relay's address, `host:port`.
    pub address: String,
    /// The relay's site ID (its certificate must name it).
    pub site: String,
}

/// Keeps a connection to the province relay and takes the files it forwards, until `stop`.
pub async fn from_relay(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    relay: ViaRelay,
    inbox: Arc<Inbox>,
    connect_timeout: Duration,
    stop: CancellationToken,
) {
    let span = info_span!("relay", relay = %relay.site);
    async move {
        let mut failures: u32 = 0;
        loop {
            let attempt = async {
                let addr = tokio::net::lookup_host(&relay.address)
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("resolves to no address"))?;
                let connecting = endpoint
                    .connect_with(
                        client.clone(),
                        addr,
                        &tiandi_link::tls::relay_server_name(&relay.site),
                    )
                    .map_err(std::io::Error::other)?;
                let conn = tokio::time::timeout(connect_timeout, connecting)
                    .await
                    .map_err(|_| std::io::Error::other("handshake timed out"))?
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(conn)
            };
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = attempt => c,
            };
            match conn {
                Ok(conn) => {
                    info!("Connected to the province relay.");
                    failures = 0;
                    let session = stop.child_token();
                    tokio::select! {
                        _ = tiandi_transfer::inbox::accept_loop(inbox.clone(), conn.clone(), None, session.clone()) => {}
                        _ = stop.cancelled() => {
                            conn.close(0u32.into(), b"agent stopping");
                            return;
                        }
                    }
                    session.cancel();
                    info!(reason = ?conn.close_reason(), "Link to the province relay lost.");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        warn!(error = %e, "Cannot reach the province relay; retrying.");
                    } else {
                        debug!(error = %e, "Relay reconnect failed.");
                    }
                }
            }
            let cap = Duration::from_secs(u64::from(failures.min(5)) * 6).max(Duration::from_secs(1));
            let d = cap.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(d) => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// Waits until the controller has verified transfer `id` (its node, from the receipt), it
/// failed or was refused (an error), or `within` passes (an error; it stays queued).
pub async fn wait_delivered(data_dir: &Path, id: &str, within: Duration) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(j) = read_status(data_dir)?.into_iter().find(|j| j.id == id) {
            match j.state {
                JobState::Delivered => {
                    return Ok(j.receipt.map(|r| r.node).unwrap_or_else(|| "?".into()));
                }
                JobState::Failed => {
                    anyhow::bail!("transfer {id} failed: {}", j.error.unwrap_or_default())
                }
                _ => {}
            }
        }
        if let Some(e) = read_refusal(data_dir, id) {
            anyhow::bail!("transfer {id} refused: {e}");
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "transfer {id} not delivered within {} s (it stays queued)",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tiandi-agent transfers`: one line per outgoing transfer.
pub fn table(jobs: &[JobStatus]) -> String {
    let mut out = format!(
        "{:<22} {:<14} {:<28} {:>12} {:>6} {:<10} note\n",
        "id", "to", "file", "bytes", "done%", "state"
    );
    for j in jobs {
        let note = match (&j.receipt, &j.error) {
            (Some(r), _) => format!("verified at {}", r.node),
            (None, e) => e.clone().unwrap_or_default(),
        };
        out += &format!(
            "{:<22} {:<14} {:<28} {:>12} {:>6.1} {:<10} {note}\n",
            j.id,
            j.dest,
            j.file,
            j.bytes,
            j.progress_pct,
            j.state.to_string()
        );
    }
    out
}

/// The site's backup runs take their repositories' leases from the controller, over the live
/// connection (none: the run holds its repository by the local lock only, and says so).
pub struct ControllerLeases {
    pub site_id: String,
    pub upstream: watch::Receiver<Option<quinn::Connection>>,
    pub rt: tokio::runtime::Handle,
}

impl ControllerLeases {
    fn ask(
        &self,
        l: tiandi_transfer::transfer_wire::Lease,
    ) -> Result<tiandi_transfer::transfer_wire::Lease, tiandi_transfer::lease::LeaseError> {
        let conn = self.upstream.borrow().clone().ok_or_else(|| {
            tiandi_transfer::lease::LeaseError::Unreachable(
                "no connection to the controller".into(),
            )
        })?;
        // Called from the scheduler's blocking threads, never from the runtime's own.
        self.rt.block_on(tiandi_transfer::lease::ask(
            &conn,
            l,
            std::time::Duration::from_secs(15),
        ))
    }
}

impl tiandi_backup::scheduler::Leases for ControllerLeases {
    fn take(
        &self,
        repo: &str,
        holder: &str,
        ttl_s: u32,
    ) -> Result<i64, tiandi_transfer::lease::LeaseError> {
        self.ask(tiandi_transfer::transfer_wire::Lease {
            key: format!("{}/{repo}", self.site_id),
            holder: holder.into(),
            ttl_s,
            ..Default::default()
        })
        .map(|l| l.expires_ms)
    }

    fn release(&self, repo: &str, holder: &str) {
        let _ = self.ask(tiandi_transfer::transfer_wire::Lease {
            key: format!("{}/{repo}", self.site_id),
            holder: holder.into(),
            release: true,
            ..Default::default()
        });
    }
}
