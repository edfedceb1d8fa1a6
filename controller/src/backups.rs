//! Backups as the ministry runs them: jobs configured here (`[[backup_jobs]]`: who backs up
//! what to whom, when, kept how long), pushed to each site as a file through the transfer
//! engine (a site keeps the last it accepted, so it runs its jobs while the controller is out
//! of reach); each run's result comes back the same way (a failure in the alarm class); the
//! sites' repositories arrive in `data_dir/backups/<site>/<repo>/` (the partner side,
//! `tiandi_backup::partner`). From those the controller says, per job: the last run and the
//! last success, whether that snapshot is here at the partner (the recovery point that
//! counts), its age against the job's RPO, sizes and dedup, the next run; and raises
//! `backup-failed`, `backup-overdue`, `backup-check-failed` and `backup-near-quota` on the
//! site.
//!
//! Jobs with `site = "controller"` run in the controller itself ([`Scheduler`]), into
//! `data_dir/backup/repos/`, shipped to the partner site they name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tiandi_backup::job::{self, JobKind, JobResult, JobSpec, Jobs};
use tiandi_transfer::{Job, Manifest, Outbox, Priority};
use tracing::{info, warn};

use crate::sites::Condition;

/// Results kept per job and kind (the newest).
const KEEP_RESULTS: usize = 100;
/// Result files taken from the inbox per pass, at most.
const MAX_TAKE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum BackupsError {
    #[error("{0}")]
    Config(String),
    #[error("backup store: {0}")]
    Db(#[from] sled::Error),
    #[error("{0}")]
    Io(String),
}

/// The last run of one kind, in short.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub started_ms: i64,
    pub duration_ms: u64,
    pub ok: bool,
    pub error: Option<String>,
    pub snapshot: Option<String>,
}

impl From<&JobResult> for RunSummary {
    fn from(r: &JobResult) -> RunSummary {
        RunSummary {
            started_ms: r.started_ms,
            duration_ms: r.duration_ms,
            ok: r.ok,
            error: r.error.clone(),
            snapshot: r.snapshot.clone(),
        }
    }
}

/// One job as `GET /api/backups` and `tiandi-controller backups` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStatus {
    pub job: String,
    /// The lease on the job's repository, while a run holds it.
    pub lease: Option<crate::leases::Held>,
    pub site: String,
    pub province: String,
    pub repo: String,
    pub to: String,
    pub schedule: String,
    pub rpo_hours: u32,
    pub last_backup: Option<RunSummary>,
    /// The newest successful backup's start.
    pub last_success_ms: Option<i64>,
    /// Its snapshot is in the partner's copy here (`None`: the partner is another node).
    pub at_partner: Option<bool>,
    /// Age of the newest good backup at the partner (or of the newest success, when the
    /// partner is not this node), in seconds.
    pub age_s: Option<i64>,
    pub overdue: bool,
    pub next_run_ms: Option<i64>,
    /// From the last successful backup: what the paths hold, what was new, what it stored,
    /// bytes ÷ stored, the repository's size at the site, its snapshots.
    pub bytes: u64,
    pub new_bytes: u64,
    pub stored_bytes: u64,
    pub dedup_ratio: Option<f64>,
    pub repo_bytes: u64,
    pub snapshots: u64,
    /// The partner's copy here: bytes and files.
    pub partner_bytes: Option<u64>,
    /// The job's quota (bytes) and the share of it the repository takes (the larger of its
    /// size at the site and the partner's copy here).
    pub quota_bytes: Option<u64>,
    pub quota_used_pct: Option<f64>,
    pub last_verify: Option<RunSummary>,
    pub last_drill: Option<RunSummary>,
    /// The check of the partner's copy here, without the key (every pack against its name
    /// and trailer), on the job's verify schedule.
    pub partner_check: Option<RunSummary>,
}

/// A repository past this share of its quota raises `backup-near-quota`.
pub const NEAR_QUOTA_PCT: f64 = 90.0;

pub struct Backups {
    /// `<job>/<kind>/<started_ms, 20 digits>` → result JSON.
    results: sled::Tree,
    /// `push/<site>` → BLAKE3 of the last jobs file queued; `seen/<job>` → when first
    /// configured (ms).
    meta: sled::Tree,
    data_dir: PathBuf,
    jobs: Vec<JobSpec>,
    /// Leases on the repositories the jobs write ([`crate::leases`]).
    pub leases: std::sync::Arc<crate::leases::Leases>,
}

impl Backups {
    /// Opens the store and checks `config.backup_jobs` (the error names the job and key).
    pub fn open(db: &sled::Db, config: &crate::Config) -> Result<Backups, BackupsError> {
        let jobs = Jobs::new(0, config.backup_jobs.clone());
        jobs.validate()
            .map_err(|e| BackupsError::Config(format!("configuration: {e}")))?;
        let b = Backups {
            results: db.open_tree("backup-results")?,
            meta: db.open_tree("backup-meta")?,
            data_dir: config.data_dir.clone(),
            jobs: jobs.jobs,
            leases: std::sync::Arc::new(crate::leases::Leases::open(db)?),
        };
        let now = tiandi_transfer::now_ms();
        for j in &b.jobs {
            let key = format!("seen/{}", j.name);
            if b.meta.get(&key)?.is_none() {
                b.meta.insert(key, now.to_string().as_bytes())?;
            }
        }
        Ok(b)
    }

    pub fn jobs(&self) -> &[JobSpec] {
        &self.jobs
    }

    /// Keeps a result (the newest [`KEEP_RESULTS`] per job and kind).
    pub fn record(&self, r: &JobResult) -> Result<(), BackupsError> {
        let prefix = format!("{}/{}/", r.job, r.kind);
        self.results.insert(
            format!("{prefix}{:020}", r.started_ms.max(0)),
            serde_json::to_vec(r).expect("results serialise"),
        )?;
        let keys: Vec<sled::IVec> = self
            .results
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        for k in keys.iter().take(keys.len().saturating_sub(KEEP_RESULTS)) {
            self.results.remove(k)?;
        }
        Ok(())
    }

    /// The newest results of a job and kind, newest first, at most `n`.
    pub fn results(&self, job: &str, kind: JobKind, n: usize) -> Vec<JobResult> {
        self.results
            .scan_prefix(format!("{job}/{kind}/").as_bytes())
            .values()
            .rev()
            .filter_map(|v| v.ok().and_then(|v| serde_json::from_slice(&v).ok()))
            .take(n)
            .collect()
    }

    /// Takes the result files sites sent (`inbox/<site>/backup-result~…`): each checked
    /// against the jobs configured for that site, kept, and removed from the inbox. Returns
    /// what was taken.
    pub fn take_results(&self) -> Vec<JobResult> {
        let inbox = self.data_dir.join("inbox");
        let mut out = Vec::new();
        for (name, dir) in tiandi_backup::partner::peer_dirs(&inbox) {
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten().take(MAX_TAKE) {
                let fname = f.file_name().to_string_lossy().into_owned();
                if !fname.starts_with(tiandi_backup::scheduler::RESULT_PREFIX) {
                    continue;
                }
                match tiandi_backup::scheduler::take_result(&f.path(), &name) {
                    Ok(r) => {
                        // A site reports only the jobs it was given.
                        if !self
                            .jobs
                            .iter()
                            .any(|j| j.name == r.job && j.site == name && j.repo == r.repo)
                        {
                            warn!(site = %name, job = %r.job, "A backup result for a job this site does not run: ignored.");
                            continue;
                        }
                        match self.record(&r) {
                            Ok(()) => out.push(r),
                            Err(e) => warn!(error = %e, "Cannot keep a backup result."),
                        }
                    }
                    Err(e) => warn!(site = %name, error = %e, "A backup result was refused."),
                }
            }
        }
        out
    }

    /// Queues each site's jobs file where it changed since the last push (or was never
    /// pushed): written to `data_dir/backup-push/<site>/<hash>.json`, sent as
    /// [`tiandi_backup::scheduler::PUSHED_NAME`] in the normal class.
    pub fn push(&self, outbox: &Outbox) -> Result<usize, BackupsError> {
        let mut sites: BTreeSet<String> = self
            .jobs
            .iter()
            .map(|j| j.site.clone())
            .filter(|s| s != job::CONTROLLER)
            .collect();
        // A site whose jobs were all removed is told so (a file with none).
        for k in self.meta.scan_prefix(b"push/").keys() {
            if let Ok(s) = std::str::from_utf8(&k?[5..]) {
                sites.insert(s.to_string());
            }
        }
        let mut queued = 0;
        let now = tiandi_transfer::now_ms();
        for site in &sites {
            let site = site.as_str();
            let mine: Vec<JobSpec> = self
                .jobs
                .iter()
                .filter(|j| j.site == site)
                .cloned()
                .collect();
            let body = Jobs::new(0, mine.clone()).to_json();
            let hash = blake3::hash(body.as_bytes()).to_hex().to_string();
            let key = format!("push/{site}");
            if self.meta.get(&key)?.as_deref() == Some(hash.as_bytes()) {
                continue;
            }
            let dir = self.data_dir.join("backup-push").join(site);
            tiandi_link::secrets::private_dir(&dir)
                .map_err(|e| BackupsError::Io(format!("{}: {e}", dir.display())))?;
            let file = dir.join(format!("{}.json", &hash[..16]));
            let text = Jobs::new(now, mine).to_json();
            std::fs::write(&file, text)
                .map_err(|e| BackupsError::Io(format!("{}: {e}", file.display())))?;
            let mut m = Manifest::of_file(&file)
                .map_err(|e| BackupsError::Io(format!("{}: {e}", file.display())))?;
            m.name = tiandi_backup::scheduler::PUSHED_NAME.to_string();
            let id = format!("bj{now}-{:08x}", rand::random::<u32>());
            let mut job = Job::new(&id, site, file, m);
            job.priority = Priority::Normal;
            outbox
                .enqueue(job)
                .map_err(|e| BackupsError::Io(e.to_string()))?;
            self.meta.insert(key, hash.as_bytes())?;
            info!(%site, "Backup jobs queued for the site.");
            queued += 1;
        }
        Ok(queued)
    }

    fn partner_check(&self, job: &str) -> Option<RunSummary> {
        let v = self.meta.get(format!("pcheck/{job}")).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Checks, without the key, the partner copies kept here whose job's verify schedule says
    /// so (every pack read and checked against its name and trailer); returns how many ran.
    /// Slow for a large copy: run it on a thread of its own.
    pub fn partner_checks(&self, now_ms: i64) -> usize {
        let mut n = 0;
        for j in &self.jobs {
            let Some(copy) = self.partner_copy(j) else {
                continue;
            };
            let last = self.partner_check(&j.name).map(|r| r.started_ms);
            if !job::due(j, JobKind::Verify, last, now_ms) || !copy.join("config").is_file() {
                continue;
            }
            let t = std::time::Instant::now();
            let be = tiandi_backup::backend::Local::new(&copy);
            let (ok, error) = match tiandi_backup::repo::check_packs(&be) {
                Ok(c) if c.damaged.is_empty() => (true, None),
                Ok(c) => (
                    false,
                    Some(format!(
                        "{} of {} packs damaged: {}",
                        c.damaged.len(),
                        c.packs,
                        c.damaged
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                ),
                Err(e) => (false, Some(e.to_string())),
            };
            if !ok {
                warn!(job = %j.name, error = ?error, "The partner copy kept here failed its check.");
            }
            let r = RunSummary {
                started_ms: now_ms,
                duration_ms: t.elapsed().as_millis() as u64,
                ok,
                error,
                snapshot: None,
            };
            let _ = self.meta.insert(
                format!("pcheck/{}", j.name),
                serde_json::to_vec(&r).expect("summaries serialise"),
            );
            n += 1;
        }
        n
    }

    /// Where a job's repository is kept here when this node is its partner.
    fn partner_copy(&self, j: &JobSpec) -> Option<PathBuf> {
        (j.to == job::CONTROLLER && j.site != job::CONTROLLER)
            .then(|| self.data_dir.join("backups").join(&j.site).join(&j.repo))
    }

    /// Every job's status at `now_ms`; `province_of` gives a site's province.
    pub fn status(&self, now_ms: i64, province_of: &dyn Fn(&str) -> String) -> Vec<BackupStatus> {
        self.jobs
            .iter()
            .map(|j| self.job_status(j, now_ms, province_of))
            .collect()
    }

    fn job_status(
        &self,
        j: &JobSpec,
        now_ms: i64,
        province_of: &dyn Fn(&str) -> String,
    ) -> BackupStatus {
        let backups = self.results(&j.name, JobKind::Backup, KEEP_RESULTS);
        let copy = self.partner_copy(j);
        let at = |r: &JobResult| -> Option<bool> {
            let dir = copy.as_ref()?;
            let id = r.snapshot.as_ref()?;
            Some(
                tiandi_link::names::validate_name("snapshot", id).is_ok()
                    && dir.join("snapshots").join(id).is_file(),
            )
        };
        let last_ok = backups.iter().find(|r| r.ok);
        // The recovery point that counts: the newest good backup that is at the partner.
        let recovery = backups
            .iter()
            .filter(|r| r.ok)
            .find(|r| at(r).unwrap_or(true));
        let seen: i64 = self
            .meta
            .get(format!("seen/{}", j.name))
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(now_ms);
        let age_ms = now_ms - recovery.map_or(seen, |r| r.started_ms);
        let last_run = backups.first().map(|r| r.started_ms);
        let next = if job::due(j, JobKind::Backup, last_run, now_ms) {
            Some(now_ms)
        } else {
            job::next_run(j, JobKind::Backup, now_ms)
        };
        let mut s = BackupStatus {
            lease: self.leases.get(&format!("{}/{}", j.site, j.repo), now_ms),
            job: j.name.clone(),
            site: j.site.clone(),
            province: province_of(&j.site),
            repo: j.repo.clone(),
            to: j.to.clone(),
            schedule: j.schedule.to_string(),
            rpo_hours: j.rpo_hours,
            last_backup: backups.first().map(RunSummary::from),
            last_success_ms: last_ok.map(|r| r.started_ms),
            at_partner: last_ok.and_then(at),
            age_s: recovery.map(|r| (now_ms - r.started_ms) / 1000),
            overdue: age_ms > i64::from(j.rpo_hours) * 3_600_000,
            next_run_ms: next,
            partner_bytes: copy.as_deref().map(tiandi_backup::backend::dir_bytes),
            quota_bytes: j.quota_gb.map(|g| u64::from(g) * 1_000_000_000),
            quota_used_pct: None,
            last_verify: self
                .results(&j.name, JobKind::Verify, 1)
                .first()
                .map(RunSummary::from),
            last_drill: self
                .results(&j.name, JobKind::Drill, 1)
                .first()
                .map(RunSummary::from),
            partner_check: self.partner_check(&j.name),
            ..BackupStatus::default()
        };
        if let Some(r) = last_ok {
            s.bytes = r.bytes;
            s.new_bytes = r.new_bytes;
            s.stored_bytes = r.stored_bytes;
            s.dedup_ratio = r.dedup_ratio;
            s.repo_bytes = r.repo_bytes;
            s.snapshots = r.snapshots;
        }
        if let Some(q) = s.quota_bytes.filter(|q| *q > 0) {
            let used = s.repo_bytes.max(s.partner_bytes.unwrap_or(0));
            s.quota_used_pct = Some((used as f64 * 1000.0 / q as f64).round() / 10.0);
        }
        s
    }

    /// The backup conditions each site has now (sites with jobs only; every such site is in
    /// the map, with no conditions when all is well).
    pub fn conditions(
        &self,
        statuses: &[BackupStatus],
    ) -> BTreeMap<String, BTreeMap<Condition, String>> {
        let mut out: BTreeMap<String, BTreeMap<Condition, String>> = BTreeMap::new();
        for s in statuses.iter().filter(|s| s.site != job::CONTROLLER) {
            let c = out.entry(s.site.clone()).or_default();
            if let Some(b) = &s.last_backup
                && !b.ok
            {
                c.insert(
                    Condition::BackupFailed,
                    format!(
                        "{}: {}",
                        s.job,
                        b.error.as_deref().unwrap_or("failed without a reason")
                    ),
                );
            }
            if s.overdue {
                c.insert(
                    Condition::BackupOverdue,
                    match s.age_s {
                        Some(a) => format!(
                            "{}: newest backup at the partner is {} h old (RPO {} h)",
                            s.job,
                            a / 3600,
                            s.rpo_hours
                        ),
                        None => format!(
                            "{}: no backup at the partner yet (RPO {} h)",
                            s.job, s.rpo_hours
                        ),
                    },
                );
            }
            if let (Some(pct), Some(q)) = (s.quota_used_pct, s.quota_bytes)
                && pct >= NEAR_QUOTA_PCT
            {
                c.insert(
                    Condition::BackupNearQuota,
                    format!(
                        "{}: the repository takes {pct:.1} % of its {:.1} GB quota",
                        s.job,
                        q as f64 / 1e9
                    ),
                );
            }
            for (what, r) in [
                ("verify", &s.last_verify),
                ("drill", &s.last_drill),
                ("the check of the partner's copy", &s.partner_check),
            ] {
                if let Some(r) = r
                    && !r.ok
                {
                    c.insert(
                        Condition::BackupCheckFailed,
                        format!(
                            "{}: {what} failed: {}",
                            s.job,
                            r.error.as_deref().unwrap_or("no reason given")
                        ),
                    );
                }
            }
        }
        out
    }
}

/// `tiandi-controller backups`: a line per job.
pub fn table(rows: &[BackupStatus], now_ms: i64) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<22} {:<12} {:<10} {:<20} {:>8} {:>10} {:>7} {:<12} {}\n",
        "JOB", "SITE", "TO", "LAST", "AGE", "SIZE MB", "DEDUP", "NEXT", "CHECKS"
    );
    for s in rows {
        let last = match &s.last_backup {
            None => "never".to_string(),
            Some(b) if b.ok => "ok".to_string(),
            Some(_) => "FAILED".to_string(),
        };
        let age = s
            .age_s
            .map_or("-".to_string(), |a| format!("{:.1} h", a as f64 / 3600.0));
        let next = match s.next_run_ms {
            Some(t) if t <= now_ms => "due".to_string(),
            Some(t) => format!("in {} min", (t - now_ms) / 60_000),
            None => "-".into(),
        };
        let checks = [
            ("verify", &s.last_verify),
            ("drill", &s.last_drill),
            ("partner check", &s.partner_check),
        ]
        .iter()
        .filter_map(|(w, r)| {
            r.as_ref()
                .map(|r| format!("{w} {}", if r.ok { "ok" } else { "FAILED" }))
        })
        .collect::<Vec<_>>()
        .join(", ");
        let _ = writeln!(
            out,
            "{:<22} {:<12} {:<10} {:<20} {:>8} {:>10.1} {:>7} {:<12} {}{}",
            s.job,
            s.site,
            s.to,
            format!(
                "{last}{}",
                if s.at_partner == Some(false) {
                    ", not at partner yet"
                } else {
                    ""
                }
            ),
            age,
            s.repo_bytes as f64 / 1e6,
            s.dedup_ratio.map_or("-".into(), |d| format!("{d:.1}x")),
            next,
            checks,
            if s.overdue { "  OVERDUE" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn job(name: &str, site: &str) -> JobSpec {
        toml::from_str(&format!(
            "name = \"{name}\"\nsite = \"{site}\"\nrepo = \"{name}\"\npaths = [\"/srv\"]\n\
             password_file = \"/etc/pw\"\nschedule = \"every 1h\"\n"
        ))
        .unwrap()
    }

    fn result_file(dir: &Path, r: &JobResult) {
        std::fs::create_dir_all(dir).unwrap();
        let name = format!(
            "{}{}~{}~{}.json",
            tiandi_backup::scheduler::RESULT_PREFIX,
            r.job,
            r.kind,
            r.started_ms
        );
        std::fs::write(dir.join(name), serde_json::to_vec(r).unwrap()).unwrap();
    }

    #[test]
    fn a_site_reports_only_its_own_jobs_and_failures_raise_alarms() {
        let t = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let config = crate::Config {
            data_dir: t.path().to_path_buf(),
            backup_jobs: vec![job("gd-db", "gd-prov"), job("hn-db", "hn-prov")],
            ..crate::Config::default()
        };
        let b = Backups::open(&db, &config).unwrap();
        let inbox = t.path().join("inbox");
        let ok = JobResult {
            job: "gd-db".into(),
            site: "gd-prov".into(),
            repo: "gd-db".into(),
            started_ms: 1_000,
            ok: true,
            ..JobResult::default()
        };
        result_file(&inbox.join("gd-prov"), &ok);
        // hn-prov claims a run of gd-prov's job, and one in gd-prov's name: both refused.
        result_file(
            &inbox.join("hn-prov"),
            &JobResult {
                started_ms: 2_000,
                ..ok.clone()
            },
        );
        result_file(
            &inbox.join("hn-prov"),
            &JobResult {
                site: "hn-prov".into(),
                started_ms: 3_000,
                ..ok.clone()
            },
        );
        // A name that is not a site's directory is not read at all.
        result_file(
            &inbox.join(".."),
            &JobResult {
                started_ms: 4_000,
                ..ok.clone()
            },
        );
        let took = b.take_results();
        assert_eq!(took.len(), 1, "{took:?}");
        assert_eq!(took[0].started_ms, 1_000);
        assert!(
            std::fs::read_dir(inbox.join("hn-prov"))
                .unwrap()
                .next()
                .is_none(),
            "refused results are removed, not kept"
        );
        // A failed run raises backup-failed on its site; a job never backed up at the partner
        // within its RPO is overdue.
        let failed = JobResult {
            started_ms: 5_000,
            ok: false,
            error: Some("pre-hook /usr/local/bin/dump exited with status 3".into()),
            ..ok.clone()
        };
        b.record(&failed).unwrap();
        let now = 5_000 + 27 * 3_600_000;
        let st = b.status(now, &|_| "GD".into());
        let c = b.conditions(&st);
        let gd = &c["gd-prov"];
        assert!(gd[&Condition::BackupFailed].contains("status 3"), "{gd:?}");
        assert!(gd.contains_key(&Condition::BackupOverdue), "{gd:?}");
        // The results kept are bounded.
        for i in 0..(KEEP_RESULTS as i64 + 20) {
            b.record(&JobResult {
                started_ms: 10_000 + i,
                ..ok.clone()
            })
            .unwrap();
        }
        assert_eq!(
            b.results("gd-db", JobKind::Backup, 1000).len(),
            KEEP_RESULTS
        );
    }

    #[test]
    fn a_repository_past_nine_tenths_of_its_quota_raises_backup_near_quota() {
        let t = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let mut quota = job("gd-db", "gd-prov");
        quota.quota_gb = Some(10);
        let config = crate::Config {
            data_dir: t.path().to_path_buf(),
            backup_jobs: vec![quota, job("hn-db", "hn-prov")],
            ..crate::Config::default()
        };
        let b = Backups::open(&db, &config).unwrap();
        let run = |job: &str, site: &str, repo_bytes: u64, at: i64| JobResult {
            job: job.into(),
            site: site.into(),
            repo: job.into(),
            started_ms: at,
            ok: true,
            repo_bytes,
            ..JobResult::default()
        };
        b.record(&run("gd-db", "gd-prov", 8_500_000_000, 1_000))
            .unwrap();
        b.record(&run("hn-db", "hn-prov", 50_000_000_000, 1_000))
            .unwrap();
        let st = b.status(2_000, &|_| "GD".into());
        assert_eq!(st[0].quota_used_pct, Some(85.0));
        assert!(st[1].quota_used_pct.is_none(), "no quota, no share");
        let c = b.conditions(&st);
        assert!(!c["gd-prov"].contains_key(&Condition::BackupNearQuota));
        b.record(&run("gd-db", "gd-prov", 9_100_000_000, 3_000))
            .unwrap();
        let st = b.status(4_000, &|_| "GD".into());
        let c = b.conditions(&st);
        assert!(
            c["gd-prov"][&Condition::BackupNearQuota].contains("91.0 % of its 10.0 GB"),
            "{c:?}"
        );
        assert!(!c["hn-prov"].contains_key(&Condition::BackupNearQuota));
    }
}
