//! Queuing files for sites: `send FILE --to site:ID | province:CODE | all`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tiandi_transfer::{Job, JobStatus, Manifest, Outbox, Priority, Window};

use crate::registry::Registry;

#[derive(Debug, Deserialize, Serialize)]
pub struct SendRequest {
    /// The file, as the controller sees it.
    pub path: String,
    /// `site:ID`, `province:CODE` or `all`.
    pub to: String,
    /// alarm, normal, bulk or backup (a request naming another class is refused as it is read).
    #[serde(default)]
    pub priority: Priority,
    /// `HH:MM-HH:MM` in UTC, or local time with an offset: `01:00-06:00+08:00`.
    #[serde(default, with = "tiandi_transfer::outbox::window::as_text")]
    pub window: Option<Window>,
    #[serde(default)]
    pub rate_limit_mbit: Option<f64>,
}

/// What a send queued: one transfer group, one job per destination (and per relay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendAnswer {
    /// The group every job of this send belongs to.
    pub transfer: String,
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
    pub destinations: Vec<String>,
    /// Relay site → the sites it forwards the file to.
    pub via_relays: BTreeMap<String, Vec<String>>,
    pub jobs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Bad(String),
    #[error("unknown destination {0:?}: no enrolled, unrevoked site matches")]
    UnknownDestination(String),
    #[error("{0}")]
    Transfer(#[from] tiandi_transfer::TransferError),
}

/// The sites `to` names (enrolled and not revoked).
pub fn resolve(registry: &Registry, to: &str) -> Result<Vec<String>, SendError> {
    let live = registry
        .list()
        .into_iter()
        .filter(|r| r.revoked_at.is_none() && r.serial.is_some());
    let sites: Vec<String> = match to.split_once(':') {
        Some(("site", id)) => live
            .filter(|r| r.site_id == id)
            .map(|r| r.site_id)
            .collect(),
        Some(("province", code)) => live
            .filter(|r| r.province == code)
            .map(|r| r.site_id)
            .collect(),
        None if to == "all" => live.map(|r| r.site_id).collect(),
        _ => {
            return Err(SendError::Bad(format!(
                "destination {to:?}: expected site:ID, province:CODE or all"
            )));
        }
    };
    if sites.is_empty() {
        return Err(SendError::UnknownDestination(to.into()));
    }
    Ok(sites)
}

/// Checks the request, hashes the file once, and queues one transfer per destination site.
///
/// Sites of a province with a relay (`relays`: province → relay site) get the file through
/// it: one job carries it to the relay with the list of sites below (the ministry's uplink
/// carries it once per province), and one tracking job per site below follows what the
/// relay reports.
pub fn queue(
    registry: &Registry,
    outbox: &Outbox,
    relays: &BTreeMap<String, String>,
    req: &SendRequest,
) -> Result<SendAnswer, SendError> {
    let window = req.window;
    let rate = match req.rate_limit_mbit {
        Some(r) if !(r > 0.0 && r.is_finite()) => {
            return Err(SendError::Bad(format!(
                "rate limit {r} Mbit/s must be positive"
            )));
        }
        Some(r) => Some((r * 1e6) as u64),
        None => None,
    };
    let sites = resolve(registry, &req.to)?;
    let path = Path::new(&req.path);
    let source = path
        .canonicalize()
        .map_err(|e| SendError::Bad(format!("{}: {e}", path.display())))?;
    let manifest = Manifest::of_file(&source)?;
    let group = format!(
        "t{}-{:04x}",
        tiandi_transfer::now_ms(),
        rand::random::<u16>()
    );
    let records = registry.list();
    let live = |s: &str| {
        records
            .iter()
            .any(|r| r.site_id == s && r.revoked_at.is_none() && r.serial.is_some())
    };
    let province = |s: &str| {
        records
            .iter()
            .find(|r| r.site_id == s)
            .map(|r| r.province.clone())
            .unwrap_or_default()
    };
    // Which sites go through which relay.
    let mut below: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut direct: Vec<String> = Vec::new();
    for site in &sites {
        match relays.get(&province(site)) {
            Some(relay) if relay != site && live(relay) => {
                below.entry(relay.clone()).or_default().push(site.clone());
            }
            _ => direct.push(site.clone()),
        }
    }
    // A relay that is not a destination itself still gets the file (to store and forward).
    for relay in below.keys() {
        if !direct.contains(relay) {
            direct.push(relay.clone());
        }
    }
    let new_job = |dest: &str| {
        let mut job = Job::new(
            &format!("{group}-{dest}"),
            dest,
            source.clone(),
            manifest.clone(),
        );
        job.priority = req.priority;
        job.window = window;
        job.rate_limit_bps = rate;
        job.origin = "controller".into();
        job
    };
    let mut ids = Vec::new();
    for site in &direct {
        let mut job = new_job(site);
        job.forward_to = below.get(site).cloned().unwrap_or_default();
        ids.push(job.id.clone());
        outbox.enqueue(job)?;
    }
    for (relay, sites_below) in &below {
        for site in sites_below {
            let mut job = new_job(site);
            job.via = Some(relay.clone());
            ids.push(job.id.clone());
            outbox.enqueue(job)?;
        }
    }
    Ok(SendAnswer {
        transfer: group,
        file: manifest.name.clone(),
        bytes: manifest.size,
        blake3: manifest.id_hex(),
        destinations: sites,
        via_relays: below,
        jobs: ids,
    })
}

/// Status of every transfer, for the API and `tiandi-controller transfers`.
pub fn status(outbox: &Outbox) -> Result<Vec<JobStatus>, SendError> {
    Ok(outbox.list()?.iter().map(Job::status).collect())
}

/// A file a site sent to the controller (complete or arriving).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    /// The sending site.
    pub from: String,
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
    pub progress_pct: f64,
    /// Where it is (or will be) once verified.
    pub path: std::path::PathBuf,
    pub receipt: Option<tiandi_transfer::Receipt>,
    pub started_ms: i64,
}

/// Files sites sent to the controller, newest first, for the API.
pub fn received(inbox: &tiandi_transfer::Inbox) -> Result<Vec<Received>, SendError> {
    let mut files = inbox.list()?;
    files.sort_by_key(|f| std::cmp::Reverse(f.started_ms));
    Ok(files
        .into_iter()
        .map(|f| {
            let chunks = f.manifest.chunk_count();
            Received {
                from: f.origin,
                file: f.manifest.name.clone(),
                bytes: f.manifest.size,
                blake3: f.manifest.id_hex(),
                progress_pct: if chunks == 0 {
                    100.0
                } else {
                    f64::from(f.verified.count()) * 100.0 / f64::from(chunks)
                },
                path: f.dest,
                receipt: f.receipt,
                started_ms: f.started_ms,
            }
        })
        .collect())
}

/// The `transfers` table: one line per destination, with progress, rate, ETA and receipt.
pub fn table(jobs: &[JobStatus]) -> String {
    let mut out = format!(
        "{:<36} {:<14} {:<24} {:>6} {:<10} {:>9} {:>8}  receipt/error\n",
        "ID", "DEST", "FILE", "DONE%", "STATE", "RATE", "ETA"
    );
    for t in jobs {
        let rate = t.rate_bps as f64 / 1e6;
        let eta = t.eta_s.map(|s| format!("{s}s")).unwrap_or("-".into());
        let tail = match (&t.receipt, &t.error) {
            (Some(r), _) => format!("verified at {} ({})", r.node, r.path),
            (None, e) => e.clone().unwrap_or_default(),
        };
        let tail = match (&t.via, t.relays_to.len()) {
            (Some(r), _) => format!("via {r}; {tail}"),
            (None, n) if n > 0 => format!("relays to {n} site(s); {tail}"),
            _ => tail,
        };
        out += &format!(
            "{:<36} {:<14} {:<24} {:>6.1} {:<10} {:>8.2}M {:>8}  {}\n",
            t.id,
            t.dest,
            t.file,
            t.progress_pct,
            t.state.to_string(),
            rate,
            eta,
            tail
        );
    }
    out
}
