//! Tier two (ARCHITECTURE.md, "Past one controller"): a province controller forwards its
//! sites' summaries and its alarm events to the ministry's controller, which keeps them as the
//! national view.
//!
//! **Province side** ([`forward`], `[upstream]`): the province controller is a site of the
//! ministry's (enrolled once with `tiandi-agent enroll`). Every `interval_s` it pushes one
//! report into an uplink spool (`tiandi-uplink`, the engine an agent runs: on disk while the
//! ministry is out of reach, delivered and acknowledged in order, nothing lost) whose
//! [`Federation`] carries the summaries that changed since the last report (status,
//! connection, conditions: not the last-seen time, which changes with every report) and the
//! alarm events logged since, read from the alarm log from a persisted cursor. Its first
//! report after a start lists every site (a roster, in several reports for a large province);
//! the ministry then forgets the sites that roster did not name. A report goes every interval
//! even with nothing in it: it is what keeps the province "up" at the ministry.
//!
//! **Ministry side** ([`National`], `[national]`): reports of the sites named in
//! `national.provinces` have their federation applied as they are stored (a duplicate is not
//! stored, so applying is exactly once). The uplink sends the newest report first and the
//! backlog after it: a site's summary is replaced only by one from a later report (its
//! sequence number), alarm events are kept in the province's order (keyed by report sequence
//! and position), and a roster's end is acted on only once every report before it is stored.
//! Every name is validated; every list is bounded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tiandi_proto::{AlarmChange, Federation, Report, SiteSummary};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{National as NationalConfig, Upstream};
use crate::sites::{SiteState, Status};

/// Alarm events read from the log per forwarded round (the rest go in the next round).
const ALARMS_PER_ROUND: usize = 5_000;
/// Most conditions kept per summary, and the longest detail of an alarm event.
const MAX_CONDITIONS: usize = 16;
const MAX_DETAIL: usize = 256;

// ---------------------------------------------------------------------------------------------
// Province side.

/// The summary of one site that goes to the ministry.
fn summary_of(s: &SiteState) -> SiteSummary {
    SiteSummary {
        site_id: s.site_id.clone(),
        status: s.status.as_str().to_string(),
        connected: s.connected,
        last_seen_ms: s.last_seen_ms.unwrap_or(0),
        conditions: s
            .conditions
            .iter()
            .take(MAX_CONDITIONS)
            .map(|c| c.condition.name().to_string())
            .collect(),
        status_since_ms: s.status_since_ms,
        removed: false,
    }
}

/// Whether two summaries differ in what the ministry shows (the last-seen time moves with
/// every report and is sent only with a change).
fn differs(a: &SiteSummary, b: &SiteSummary) -> bool {
    a.status != b.status
        || a.connected != b.connected
        || a.conditions != b.conditions
        || a.status_since_ms != b.status_since_ms
        || a.removed != b.removed
}

/// What one forwarding round pushes: the reports (at least one), the new alarm cursor.
pub struct Round {
    pub reports: Vec<Report>,
    pub cursor: Option<Vec<u8>>,
}

/// The forwarder's memory between rounds: what the ministry was last sent (it starts empty,
/// so the first round is the roster), the roster's number and the alarm cursor.
pub struct Forwarding {
    sent: HashMap<String, SiteSummary>,
    roster: u64,
    roster_sent: bool,
    cursor: Option<Vec<u8>>,
}

impl Forwarding {
    pub fn new(roster: u64, cursor: Option<Vec<u8>>) -> Forwarding {
        Forwarding {
            sent: HashMap::new(),
            roster,
            roster_sent: false,
            cursor,
        }
    }

    /// The reports of one round, from the sites' current summaries and the alarm events
    /// logged after the cursor (I/O-free: the caller reads the table and the log).
    pub fn round(
        &self,
        now_ms: i64,
        current: Vec<SiteSummary>,
        alarms: Vec<(Vec<u8>, crate::store::AlarmEvent)>,
    ) -> Round {
        let total_sites = current.len() as u32;
        let mut seen = HashSet::with_capacity(current.len());
        let mut sites = Vec::new();
        for s in current {
            seen.insert(s.site_id.clone());
            if self.sent.get(&s.site_id).is_none_or(|p| differs(p, &s)) {
                sites.push(s);
            }
        }
        let mut gone: Vec<&String> = self.sent.keys().filter(|k| !seen.contains(*k)).collect();
        gone.sort();
        sites.extend(gone.into_iter().map(|id| SiteSummary {
            site_id: id.clone(),
            removed: true,
            ..Default::default()
        }));
        let cursor = alarms
            .last()
            .map(|(k, _)| k.clone())
            .or(self.cursor.clone());
        let alarms: Vec<AlarmChange> = alarms
            .into_iter()
            .map(|(_, a)| AlarmChange {
                at_ms: a.at_ms,
                site_id: a.site_id,
                alarm: a.alarm,
                state: a.state,
                detail: a.detail.chars().take(MAX_DETAIL).collect(),
            })
            .collect();
        let n = sites
            .len()
            .div_ceil(Federation::MAX_SITES)
            .max(alarms.len().div_ceil(Federation::MAX_ALARMS))
            .max(1);
        let mut sites = sites.into_iter();
        let mut alarms = alarms.into_iter();
        let reports = (0..n)
            .map(|i| Report {
                taken_ms: now_ms,
                federation: Some(Federation {
                    sites: sites.by_ref().take(Federation::MAX_SITES).collect(),
                    alarms: alarms.by_ref().take(Federation::MAX_ALARMS).collect(),
                    roster: self.roster,
                    roster_done: !self.roster_sent && i == n - 1,
                    total_sites,
                }),
                ..Default::default()
            })
            .collect();
        Round { reports, cursor }
    }

    /// The round's reports are in the spool: remember what they said.
    pub fn sent(&mut self, round: &Round) {
        for r in &round.reports {
            for s in r.federation.iter().flat_map(|f| &f.sites) {
                if s.removed {
                    self.sent.remove(&s.site_id);
                } else {
                    self.sent.insert(s.site_id.clone(), s.clone());
                }
            }
        }
        self.roster_sent = true;
        self.cursor = round.cursor.clone();
    }
}

const CURSOR_KEY: &[u8] = b"alarm_cursor";
const ROSTER_KEY: &[u8] = b"roster";

/// Forwards this province to the ministry until cancelled (`[upstream]`).
pub async fn forward(
    core: Arc<crate::Core>,
    db: sled::Db,
    cfg: Upstream,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let id = tiandi_uplink::identity::load(&cfg.identity_dir).with_context(|| {
        format!(
            "upstream.identity_dir {}: the province's identity at the ministry",
            cfg.identity_dir.display()
        )
    })?;
    let tls = tiandi_link::tls::site_client_tls(&id.ca_pem, &id.cert_pem, &id.key_pem)
        .context("loading the province's identity at the ministry")?;
    let profile = core.config.profile;
    let client = tiandi_link::client_config(tls, Arc::new(profile.transport_config()))?;
    let interval = Duration::from_secs_f64(cfg.interval_s.clamp(1.0, 3600.0));
    let spool_dir = cfg.identity_dir.join("spool");
    let spool = tiandi_uplink::spool::Spool::open_dir(
        &spool_dir,
        cfg.spool_quota_mb.max(1) * 1024 * 1024,
        interval.as_millis() as i64,
        true,
    )
    .with_context(|| format!("opening the upstream spool {}", spool_dir.display()))?;
    let shared = tiandi_uplink::Shared::new(spool);
    // The ministry's name may not resolve yet (its DNS down with it): keep trying.
    let addr = loop {
        match tokio::net::lookup_host(&cfg.controller)
            .await
            .map(|mut a| a.next())
        {
            Ok(Some(a)) => break a,
            r => {
                let why = r.map_or_else(|e| e.to_string(), |_| "no address".into());
                warn!(controller = %cfg.controller, error = %why, "upstream.controller does not resolve; trying again in 30 s.");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    };
    let endpoint = tiandi_link::client_endpoint(addr)?;
    info!(as_site = %id.info.site_id, ministry = %cfg.controller, "Forwarding this province's summaries and alarms to the ministry.");
    let uplink = tokio::spawn(tiandi_uplink::run(
        endpoint.clone(),
        tiandi_uplink::UplinkConfig {
            controller: cfg.controller.clone(),
            standby: cfg.standby.clone(),
            site_id: id.info.site_id.clone(),
            client,
            interval_ms: interval.as_millis() as u32,
            connect_timeout: profile.connect_timeout(),
            on_session: None,
        },
        shared.clone(),
        cancel.clone(),
    ));
    let tree = db.open_tree("upstream")?;
    let cursor = tree.get(CURSOR_KEY)?.map(|v| v.to_vec());
    // This start's roster: its time, but always above the last one (a clock stepped back
    // must not make the ministry ignore it).
    let last_roster = tree
        .get(ROSTER_KEY)?
        .and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)))
        .unwrap_or(0);
    let roster = (crate::now_ms().max(0) as u64).max(last_roster + 1);
    tree.insert(ROSTER_KEY, &roster.to_be_bytes())?;
    let mut fwd = Forwarding::new(roster, cursor);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let current: Vec<SiteSummary> = core.sites.with_all(|it| it.map(summary_of).collect());
        let alarms = match core
            .store
            .alarms_after(fwd.cursor.as_deref(), ALARMS_PER_ROUND)
        {
            Ok(a) => a,
            Err(error) => {
                warn!(%error, "Could not read the alarm log to forward it; trying again next round.");
                continue;
            }
        };
        let round = fwd.round(crate::now_ms(), current, alarms);
        let pushed = round
            .reports
            .iter()
            .try_for_each(|r| shared.push(r.clone()).map(|_| ()));
        if let Err(error) = pushed {
            // What went in goes again next round (the ministry takes it idempotently).
            warn!(%error, "Could not spool the round for the ministry (disk full?); trying again next round.");
            continue;
        }
        fwd.sent(&round);
        if let Some(c) = &fwd.cursor
            && let Err(error) = tree.insert(CURSOR_KEY, c.as_slice())
        {
            warn!(%error, "Could not save the forwarded-alarm cursor.");
        }
    }
    let _ = uplink.await;
    endpoint.close(0u32.into(), b"controller shutting down");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ministry side.

#[derive(Debug, thiserror::Error)]
pub enum NationalError {
    #[error(
        "site {0} is not a province controller here (national.provinces): its summaries are refused"
    )]
    NotAProvince(String),
    #[error("storage: {0}")]
    Db(#[from] sled::Error),
}

/// One forwarded site as the ministry keeps it (or a removed one's tombstone: `removed`).
#[derive(Clone, Debug, Serialize)]
pub struct NationalSite {
    #[serde(flatten)]
    pub summary: SiteSummary,
    /// The report (sequence number at the province's uplink) that last set it.
    #[serde(skip)]
    pub seq: u64,
    /// The roster of that report.
    #[serde(skip)]
    pub roster: u64,
}

/// One province as the ministry sees it.
#[derive(Default)]
struct Province {
    /// The province's name (its controller's certificate says it).
    province: String,
    roster: u64,
    /// A roster's end that arrived before all of the roster did: (roster, its report's seq).
    pending_roster: Option<(u64, u64)>,
    total_sites: u32,
    /// The newest report applied (what `total_sites` is from).
    last_seq: u64,
    last_report_ms: i64,
    /// Sites, and the tombstones of removed ones (kept until no older report can arrive).
    sites: BTreeMap<String, NationalSite>,
    tombstones: usize,
}

impl Province {
    fn meta(&self) -> Vec<u8> {
        let (pr, pa) = self.pending_roster.unwrap_or((0, 0));
        let mut v = Vec::with_capacity(44 + self.province.len());
        for x in [self.roster, pr, pa, self.last_seq] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(&self.total_sites.to_be_bytes());
        v.extend_from_slice(self.province.as_bytes());
        v
    }

    fn from_meta(v: &[u8]) -> Option<Province> {
        let u = |i: usize| {
            Some(u64::from_be_bytes(
                v.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let (roster, pr, pa, last_seq) = (u(0)?, u(1)?, u(2)?, u(3)?);
        Some(Province {
            roster,
            pending_roster: (pr > 0).then_some((pr, pa)),
            last_seq,
            total_sites: u32::from_be_bytes(v.get(32..36)?.try_into().ok()?),
            province: String::from_utf8_lossy(v.get(36..)?).into_owned(),
            ..Default::default()
        })
    }
}

/// A province's figures for the national view.
#[derive(Clone, Debug, Serialize)]
pub struct ProvinceView {
    /// The province controller's site ID here.
    pub from: String,
    pub province: String,
    /// Its link to the ministry is up and its last report is recent; otherwise its sites'
    /// figures are the last known and their status is shown as `unknown`.
    pub current: bool,
    pub last_report_ms: Option<i64>,
    pub total_sites: u32,
    pub known_sites: usize,
    pub connected: usize,
    /// Sites by status (`up`, `down`, `rain-fade`, …).
    pub by_status: BTreeMap<String, usize>,
    /// Sites with at least one active condition.
    pub alarmed: usize,
}

/// A forwarded alarm event as the national log keeps it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct NationalAlarm {
    pub from: String,
    pub province: String,
    pub at_ms: i64,
    pub site_id: String,
    pub alarm: String,
    pub state: String,
    pub detail: String,
}

/// The ministry's national view: every province's sites and its alarm log.
pub struct National {
    cfg: NationalConfig,
    provinces: RwLock<HashMap<String, Province>>,
    /// `from \0 site` → seq (8) ‖ roster (8) ‖ summary (protobuf).
    sites_tree: sled::Tree,
    /// `from` → [`Province::meta`].
    meta_tree: sled::Tree,
    /// `from \0 seq (8) ‖ index (4)` → JSON [`NationalAlarm`] (the same event applied twice
    /// is one entry).
    alarms_tree: sled::Tree,
    /// The log's keys by the provinces' event time: what is listed newest first and what is
    /// dropped oldest first past `alarm_log_entries`.
    alarm_index: std::sync::Mutex<std::collections::BTreeSet<(i64, Vec<u8>)>>,
}

/// A province is current while its controller's link is up and its last report is no older
/// than three of its intervals; otherwise what the ministry holds of it is the last known.
fn is_current(p: &Province, (connected, interval_ms): (bool, i64), now_ms: i64) -> bool {
    connected && now_ms - p.last_report_ms <= 3 * interval_ms.max(1000)
}

fn site_key(from: &str, site: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(from.len() + site.len() + 1);
    k.extend_from_slice(from.as_bytes());
    k.push(0);
    k.extend_from_slice(site.as_bytes());
    k
}

/// The province controller a national key belongs to (the part before its NUL).
fn key_from(k: &[u8]) -> &[u8] {
    k.split(|b| *b == 0).next().unwrap_or_default()
}

impl National {
    /// Opens the national view (loads what was forwarded before).
    pub fn open(db: &sled::Db, cfg: NationalConfig) -> Result<National, NationalError> {
        use prost::Message;
        let sites_tree = db.open_tree("national_sites")?;
        let meta_tree = db.open_tree("national_meta")?;
        let alarms_tree = db.open_tree("national_alarms")?;
        let mut provinces: HashMap<String, Province> = HashMap::new();
        for kv in meta_tree.iter() {
            let (k, v) = kv?;
            let from = String::from_utf8_lossy(&k).into_owned();
            match Province::from_meta(&v) {
                Some(p) => {
                    provinces.insert(from, p);
                }
                None => {
                    warn!(province = %from, "A stored national province record does not decode; skipped.")
                }
            }
        }
        for kv in sites_tree.iter() {
            let (k, v) = kv?;
            let from = String::from_utf8_lossy(key_from(&k)).into_owned();
            if v.len() < 16 {
                continue;
            }
            let Ok(summary) = SiteSummary::decode(&v[16..]) else {
                warn!(province = %from, "A stored national summary does not decode; skipped.");
                continue;
            };
            let p = provinces.entry(from).or_default();
            p.tombstones += usize::from(summary.removed);
            p.sites.insert(
                summary.site_id.clone(),
                NationalSite {
                    seq: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                    roster: u64::from_be_bytes(v[8..16].try_into().expect("8 bytes")),
                    summary,
                },
            );
        }
        let mut index = std::collections::BTreeSet::new();
        for kv in alarms_tree.iter() {
            let (k, v) = kv?;
            if let Ok(a) = serde_json::from_slice::<NationalAlarm>(&v) {
                index.insert((a.at_ms, k.to_vec()));
            }
        }
        Ok(National {
            cfg,
            provinces: RwLock::new(provinces),
            sites_tree,
            meta_tree,
            alarms_tree,
            alarm_index: std::sync::Mutex::new(index),
        })
    }

    /// Whether `site` is a province controller here.
    pub fn is_province(&self, site: &str) -> bool {
        self.cfg.provinces.iter().any(|p| p == site)
    }

    /// Applies a stored report's federation from province controller `from` (of province
    /// `province`, as its certificate says). `stored_through`: every report of `from` up to
    /// this sequence number is stored (the contiguous prefix). Returns how many summaries and
    /// alarm events were refused (bad names, over the bound). The caller applies one
    /// province's reports one at a time (its session).
    pub fn apply(
        &self,
        from: &str,
        province: &str,
        seq: u64,
        fed: Federation,
        stored_through: u64,
        now_ms: i64,
    ) -> Result<usize, NationalError> {
        use prost::Message;
        if !self.is_province(from) {
            return Err(NationalError::NotAProvince(from.to_string()));
        }
        let mut refused = 0;
        let mut batch = sled::Batch::default();
        let mut provinces = self.provinces.write().expect("national lock poisoned");
        let p = provinces.entry(from.to_string()).or_default();
        p.province = province.to_string();
        p.last_report_ms = now_ms;
        if fed.roster > p.roster {
            p.roster = fed.roster;
            p.pending_roster = None;
        }
        if seq > p.last_seq {
            p.last_seq = seq;
            p.total_sites = fed.total_sites;
        }
        for s in fed.sites {
            if tiandi_link::names::validate_name("site ID", &s.site_id).is_err()
                || (!s.removed && Status::parse(&s.status).is_none())
                || s.conditions.len() > MAX_CONDITIONS
                || s.conditions
                    .iter()
                    .any(|c| tiandi_link::names::validate_name("condition", c).is_err())
            {
                refused += 1;
                continue;
            }
            match p.sites.get(&s.site_id) {
                // A later report said otherwise already (its removal too: the tombstone).
                Some(old) if old.seq > seq => continue,
                None if !s.removed
                    && p.sites.len() - p.tombstones >= self.cfg.max_sites_per_province =>
                {
                    refused += 1;
                    continue;
                }
                _ => {}
            }
            let mut v = Vec::with_capacity(16 + s.encoded_len());
            v.extend_from_slice(&seq.to_be_bytes());
            v.extend_from_slice(&fed.roster.to_be_bytes());
            s.encode(&mut v).expect("a Vec grows");
            batch.insert(site_key(from, &s.site_id), v);
            let was_removed = p.sites.get(&s.site_id).is_some_and(|o| o.summary.removed);
            p.tombstones = p.tombstones + usize::from(s.removed) - usize::from(was_removed);
            p.sites.insert(
                s.site_id.clone(),
                NationalSite {
                    summary: s,
                    seq,
                    roster: fed.roster,
                },
            );
        }
        if fed.roster_done && fed.roster == p.roster {
            p.pending_roster = Some((fed.roster, seq));
        }
        // The roster's end acts once every report up to it is here: the sites the roster did
        // not name (and nothing since touched) left the province.
        if let Some((roster, at)) = p.pending_roster
            && stored_through >= at
        {
            let gone: Vec<String> = p
                .sites
                .iter()
                .filter(|(_, s)| s.roster < roster && !s.summary.removed)
                .map(|(k, _)| k.clone())
                .collect();
            if !gone.is_empty() {
                info!(province = %from, sites = gone.len(), "Sites the province no longer lists are forgotten.");
            }
            for g in gone {
                batch.remove(site_key(from, &g));
                p.sites.remove(&g);
            }
            p.pending_roster = None;
        }
        // Tombstones go once no report older than them can still arrive.
        if p.tombstones > 0 {
            let done: Vec<String> = p
                .sites
                .iter()
                .filter(|(_, s)| s.summary.removed && s.seq <= stored_through)
                .map(|(k, _)| k.clone())
                .collect();
            for d in done {
                batch.remove(site_key(from, &d));
                p.sites.remove(&d);
                p.tombstones -= 1;
            }
        }
        self.meta_tree.insert(from.as_bytes(), p.meta())?;
        // Under the lock: what is on disk follows the order memory was changed in.
        self.sites_tree.apply_batch(batch)?;
        drop(provinces);

        let mut alarms = Vec::new();
        for (i, a) in fed.alarms.into_iter().enumerate() {
            if tiandi_link::names::validate_name("site ID", &a.site_id).is_err()
                || tiandi_link::names::validate_name("alarm", &a.alarm).is_err()
                || !matches!(a.state.as_str(), "raised" | "cleared")
            {
                refused += 1;
                continue;
            }
            let mut k = site_key(from, "");
            k.extend_from_slice(&seq.to_be_bytes());
            k.extend_from_slice(&(i as u32).to_be_bytes());
            alarms.push((
                k,
                NationalAlarm {
                    from: from.to_string(),
                    province: province.to_string(),
                    at_ms: a.at_ms,
                    site_id: a.site_id,
                    alarm: a.alarm,
                    state: a.state,
                    detail: a.detail.chars().take(MAX_DETAIL).collect(),
                },
            ));
        }
        if !alarms.is_empty() {
            let mut index = self
                .alarm_index
                .lock()
                .expect("national alarm lock poisoned");
            for (k, ev) in alarms {
                let v = serde_json::to_vec(&ev).expect("plain data serializes");
                self.alarms_tree.insert(k.as_slice(), v)?;
                index.insert((ev.at_ms, k));
            }
            // Oldest (by the provinces' clocks) dropped first.
            while index.len() > self.cfg.alarm_log_entries.max(1) {
                if let Some((_, old)) = index.pop_first() {
                    self.alarms_tree.remove(old)?;
                }
            }
        }
        Ok(refused)
    }

    /// The provinces the caller may see, with their figures. `link(from)`: whether that
    /// province controller's link is up now, and its report interval (ms).
    pub fn provinces(
        &self,
        now_ms: i64,
        sees: impl Fn(&str) -> bool,
        link: impl Fn(&str) -> (bool, i64),
    ) -> Vec<ProvinceView> {
        let provinces = self.provinces.read().expect("national lock poisoned");
        let mut out: Vec<ProvinceView> = provinces
            .iter()
            .filter(|(from, p)| self.is_province(from) && sees(&p.province))
            .map(|(from, p)| {
                let mut by_status = BTreeMap::new();
                let (mut conn, mut alarmed) = (0, 0);
                for s in p.sites.values().filter(|s| !s.summary.removed) {
                    *by_status.entry(s.summary.status.clone()).or_insert(0) += 1;
                    conn += usize::from(s.summary.connected);
                    alarmed += usize::from(!s.summary.conditions.is_empty());
                }
                ProvinceView {
                    from: from.clone(),
                    province: p.province.clone(),
                    current: is_current(p, link(from), now_ms),
                    last_report_ms: (p.last_report_ms > 0).then_some(p.last_report_ms),
                    total_sites: p.total_sites,
                    known_sites: p.sites.len() - p.tombstones,
                    connected: conn,
                    by_status,
                    alarmed,
                }
            })
            .collect();
        out.sort_by(|a, b| a.province.cmp(&b.province).then(a.from.cmp(&b.from)));
        out
    }

    /// The forwarded sites of one province controller (`from`), in site order, after
    /// `after`, at most `limit`; those the caller may not see are not there. A province that
    /// is not current has its sites' status shown as `unknown`.
    pub fn sites(
        &self,
        from: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: i64,
        sees: impl Fn(&str) -> bool,
        link: (bool, i64),
    ) -> Option<Vec<NationalSite>> {
        if !self.is_province(from) {
            return None;
        }
        let provinces = self.provinces.read().expect("national lock poisoned");
        let p = provinces.get(from).filter(|p| sees(&p.province))?;
        let current = is_current(p, link, now_ms);
        let range = match after {
            Some(a) => p
                .sites
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => p.sites.range::<str, _>(..),
        };
        Some(
            range
                .filter(|(_, s)| !s.summary.removed)
                .take(limit)
                .map(|(_, s)| {
                    let mut s = s.clone();
                    if !current {
                        s.summary.status = "unknown".into();
                    }
                    s
                })
                .collect(),
        )
    }

    /// The national alarm log, newest first (by the provinces' clocks), at most `limit`, only
    /// the provinces the caller may see.
    pub fn alarms(&self, limit: usize, sees: impl Fn(&str) -> bool) -> Vec<NationalAlarm> {
        // Which province controllers the caller may see, then the keys, then the values: no
        // lock held while reading the log.
        let visible: HashSet<Vec<u8>> = self
            .provinces
            .read()
            .expect("national lock poisoned")
            .iter()
            .filter(|(from, p)| self.is_province(from) && sees(&p.province))
            .map(|(from, _)| from.as_bytes().to_vec())
            .collect();
        let keys: Vec<Vec<u8>> = self
            .alarm_index
            .lock()
            .expect("national alarm lock poisoned")
            .iter()
            .rev()
            .filter(|(_, k)| visible.contains(key_from(k)))
            .take(limit)
            .map(|(_, k)| k.clone())
            .collect();
        keys.iter()
            .filter_map(|k| self.alarms_tree.get(k).ok().flatten())
            .filter_map(|v| serde_json::from_slice::<NationalAlarm>(&v).ok())
            .collect()
    }
}

/// Stores a province's report's federation at the ministry; logs what is refused.
pub fn on_report(core: &crate::Core, site: &str, province: &str, seq: u64, fed: Federation) {
    // Said at most once a minute: a misconfigured or hostile site sends one every report.
    static LAST_WARNED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let say = |what: &dyn std::fmt::Display| {
        let now = crate::now_ms();
        let last = LAST_WARNED.load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= 60_000
            && LAST_WARNED
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            warn!(%site, "{what}");
        }
    };
    let Some(national) = &core.national else {
        say(
            &"A report carried national summaries, but this controller lists no province controllers ([national] provinces): refused (said once a minute).",
        );
        return;
    };
    let through = core
        .store
        .seq_state(site)
        .map(|s| s.acked_through)
        .unwrap_or(0);
    match national.apply(site, province, seq, fed, through, crate::now_ms()) {
        Ok(0) => {}
        Ok(n) => {
            warn!(%site, refused = n, "Summaries or alarm events from a province were refused (bad names, or over national.max_sites_per_province).")
        }
        Err(error @ NationalError::NotAProvince(_)) => say(&format!(
            "A report's national summaries were not applied: {error} (said once a minute)."
        )),
        Err(error) => warn!(%site, %error, "A report's national summaries were not applied."),
    }
}

#[cfg(test)]
mod tests;
