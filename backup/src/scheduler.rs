//! Runs a node's backup jobs unattended: the jobs the controller pushed (kept in a file so a
//! restart, or a controller out of reach, changes nothing), each kind of run (backup, verify,
//! drill) when its schedule says and its window allows, one run per repository at a time,
//! each result handed to a sink (a site: a transfer to the controller; the controller: its
//! own store). The repositories the jobs write are shipped to their partners by the
//! [`Shipper`].
//!
//! One run per repository at a time, twice over: within the process (a run waits for the one
//! before it), and against any other process (a `tiandi-backup` an operator started by hand)
//! by an advisory `flock` on `<repos>/.<repo>.lock`, which the kernel drops when its holder
//! dies — a lock that can never be stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::backend::write_durable;
use crate::job::{self, JobKind, JobResult, JobSpec, Jobs, JobsError};
use crate::partner::{ShipConfig, ShipStatus, Shipper};
use crate::repo::Progress;

/// How often the scheduler looks at its jobs.
const PASS: Duration = Duration::from_secs(5);
/// The name a pushed jobs file arrives under in a site's inbox.
pub const PUSHED_NAME: &str = "tiandi-backup-jobs.json";

/// Hands a finished run's result on; an error is logged, and the result is kept as the job's
/// last either way.
pub type Sink = Box<dyn Fn(&JobResult) -> Result<(), String> + Send + Sync>;

/// A job as `status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobView {
    pub job: String,
    pub repo: String,
    pub to: String,
    pub schedule: String,
    /// Per kind scheduled: the last result and the next time.
    pub kinds: Vec<KindView>,
    /// A run of this job going on now: its kind, start, and progress.
    pub running: Option<Running>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KindView {
    pub kind: JobKind,
    pub last: Option<JobResult>,
    pub next_ms: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Running {
    pub kind: JobKind,
    pub started_ms: i64,
    pub files: u64,
    pub bytes: u64,
    pub total_bytes: u64,
    pub eta_s: Option<u64>,
}

/// What `status.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub site: String,
    pub written_ms: i64,
    pub jobs: Vec<JobView>,
    pub shipping: Vec<ShipStatus>,
}

/// Leases on repositories, held at the controller (`tiandi_transfer::lease`): a run takes one
/// before it writes, renews it every third of [`LEASE_TTL_S`] while it runs and gives it back
/// at the end; a run that dies leaves a lease that expires by itself.
pub trait Leases: Send + Sync {
    /// Takes or renews the lease on `repo` for `holder`: until when (Unix ms).
    fn take(&self, repo: &str, holder: &str, ttl_s: u32) -> Result<i64, LeaseError>;
    fn release(&self, repo: &str, holder: &str);
}

pub use tiandi_transfer::lease::LeaseError;

/// A run's lease lasts this long past its last renewal.
pub const LEASE_TTL_S: u32 = 120;

pub struct Scheduler {
    leases: std::sync::OnceLock<Arc<dyn Leases>>,
    site: String,
    repos_dir: PathBuf,
    scratch_dir: PathBuf,
    /// The last jobs accepted (this node's), as JSON.
    jobs_file: PathBuf,
    /// `r/<job>/<kind>` → the last run's start (ms, decimal); `l/<job>/<kind>` → its result.
    state: sled::Tree,
    jobs: Mutex<Vec<JobSpec>>,
    running: Mutex<BTreeMap<String, (String, Running)>>,
    shipper: Arc<Shipper>,
    /// Repositories shipped whatever the jobs (the node's own configuration).
    static_repos: Vec<ShipConfig>,
    sink: Sink,
}

impl Scheduler {
    /// `dir` holds `repos/`, `scratch/` and `jobs.json`. Loads the jobs last accepted.
    pub fn new(
        site: &str,
        dir: &Path,
        state: sled::Tree,
        shipper: Arc<Shipper>,
        sink: Sink,
    ) -> Result<Arc<Scheduler>, String> {
        for d in [dir.to_path_buf(), dir.join("repos"), dir.join("scratch")] {
            tiandi_link::secrets::private_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let static_repos = shipper.repos();
        let s = Scheduler {
            leases: std::sync::OnceLock::new(),
            site: site.to_string(),
            repos_dir: dir.join("repos"),
            scratch_dir: dir.join("scratch"),
            jobs_file: dir.join("jobs.json"),
            state,
            jobs: Mutex::new(Vec::new()),
            running: Mutex::new(BTreeMap::new()),
            shipper,
            static_repos,
            sink,
        };
        match std::fs::read_to_string(&s.jobs_file) {
            Ok(text) => match Jobs::parse(&text) {
                Ok(jobs) => {
                    s.accept(jobs, false)?;
                }
                Err(e) => {
                    warn!(file = %s.jobs_file.display(), error = %e, "The backup jobs kept here no longer read: no jobs until the controller pushes them again.")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", s.jobs_file.display())),
        }
        Ok(Arc::new(s))
    }

    /// Runs take leases from `leases` from now on (once; later calls are ignored). Without
    /// it (or when it does not answer) a run holds its repository by the local lock only.
    pub fn set_leases(&self, leases: Arc<dyn Leases>) {
        let _ = self.leases.set(leases);
    }

    /// Where job `repo`'s repository lives.
    pub fn repo_path(&self, repo: &str) -> PathBuf {
        self.repos_dir.join(repo)
    }

    /// The jobs this node runs now.
    pub fn jobs(&self) -> Vec<JobSpec> {
        self.jobs.lock().expect("jobs lock").clone()
    }

    /// Takes this node's jobs out of `jobs` (validated as a whole first), keeps them in
    /// `jobs.json`, and ships their repositories. Returns how many are this node's.
    pub fn set_jobs(&self, jobs: Jobs) -> Result<usize, JobsError> {
        jobs.validate()?;
        self.accept(jobs, true).map_err(JobsError::Invalid)
    }

    fn accept(&self, jobs: Jobs, persist: bool) -> Result<usize, String> {
        let mine: Vec<JobSpec> = jobs.for_site(&self.site).cloned().collect();
        let mut repos = self.static_repos.clone();
        for j in &mine {
            let c = ShipConfig {
                name: j.repo.clone(),
                path: self.repo_path(&j.repo),
                to: j.to.clone(),
            };
            if !repos.iter().any(|r| r.name == c.name && r.to == c.to) {
                repos.push(c);
            }
        }
        self.shipper.set_repos(repos).map_err(|e| e.to_string())?;
        if persist {
            let kept = Jobs::new(jobs.generated_ms, mine.clone());
            write_durable(&self.jobs_file, kept.to_json().as_bytes())
                .map_err(|e| format!("{}: {e}", self.jobs_file.display()))?;
        }
        let n = mine.len();
        *self.jobs.lock().expect("jobs lock") = mine;
        Ok(n)
    }

    /// Takes a jobs file that arrived (the controller's push): accepted, it replaces the
    /// jobs; refused, the jobs stay as they were and the file is kept beside as `.refused`
    /// with the reason logged. The file is gone from `path` either way.
    pub fn take_pushed(&self, path: &Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "Cannot read the pushed backup jobs.");
                return;
            }
        };
        match Jobs::parse(&text).and_then(|j| self.set_jobs(j)) {
            Ok(n) => {
                info!(jobs = n, "Backup jobs from the controller accepted.");
                let _ = std::fs::remove_file(path);
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "Backup jobs from the controller refused: the jobs stay as they were.");
                let _ = std::fs::rename(path, path.with_extension("json.refused"));
            }
        }
    }

    fn last_run(&self, job: &str, kind: JobKind) -> Option<i64> {
        let v = self.state.get(format!("r/{job}/{kind}")).ok()??;
        std::str::from_utf8(&v).ok()?.parse().ok()
    }

    fn last_result(&self, job: &str, kind: JobKind) -> Option<JobResult> {
        let v = self.state.get(format!("l/{job}/{kind}")).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Every job with its last results, next times and what runs now.
    pub fn status(&self, now_ms: i64) -> Status {
        let running = self.running.lock().expect("running lock").clone();
        let jobs = self
            .jobs()
            .iter()
            .map(|j| JobView {
                job: j.name.clone(),
                repo: j.repo.clone(),
                to: j.to.clone(),
                schedule: j.schedule.to_string(),
                kinds: [JobKind::Backup, JobKind::Verify, JobKind::Drill]
                    .into_iter()
                    .filter(|k| j.schedule_of(*k).is_some())
                    .map(|k| KindView {
                        kind: k,
                        last: self.last_result(&j.name, k),
                        next_ms: if job::due(j, k, self.last_run(&j.name, k), now_ms) {
                            Some(now_ms)
                        } else {
                            job::next_run(j, k, now_ms)
                        },
                    })
                    .collect(),
                running: running
                    .get(&j.repo)
                    .filter(|(name, _)| *name == j.name)
                    .map(|(_, r)| r.clone()),
            })
            .collect();
        Status {
            site: self.site.clone(),
            written_ms: now_ms,
            jobs,
            shipping: Vec::new(),
        }
    }

    /// Runs what is due until `cancel`: a pass every few seconds, each due run on a blocking
    /// thread of its own (one per repository). `pushed`: where the controller's jobs file
    /// arrives. `status_file`: rewritten every pass.
    pub async fn run(
        self: Arc<Self>,
        pushed: Option<PathBuf>,
        status_file: Option<PathBuf>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            if let Some(p) = &pushed {
                let (me, p) = (self.clone(), p.clone());
                let _ = tokio::task::spawn_blocking(move || me.take_pushed(&p)).await;
            }
            let now = tiandi_transfer::now_ms();
            for j in self.jobs() {
                for kind in [JobKind::Backup, JobKind::Verify, JobKind::Drill] {
                    if !job::due(&j, kind, self.last_run(&j.name, kind), now) || !in_window(&j, now)
                    {
                        continue;
                    }
                    let mut running = self.running.lock().expect("running lock");
                    if running.contains_key(&j.repo) {
                        continue;
                    }
                    running.insert(
                        j.repo.clone(),
                        (
                            j.name.clone(),
                            Running {
                                kind,
                                started_ms: now,
                                ..Running::default()
                            },
                        ),
                    );
                    drop(running);
                    let me = self.clone();
                    let span = info_span!("backup job", job = %j.name, %kind);
                    let spec = j.clone();
                    tokio::spawn(
                        async move {
                            let m = me.clone();
                            let r =
                                tokio::task::spawn_blocking(move || m.run_one(&spec, kind)).await;
                            if let Err(e) = r {
                                warn!(error = %e, "A backup run ended abnormally.");
                            }
                        }
                        .instrument(span),
                    );
                }
            }
            if let Some(f) = &status_file {
                let mut st = self.status(tiandi_transfer::now_ms());
                let me = self.clone();
                st.shipping = tokio::task::spawn_blocking(move || {
                    me.shipper
                        .repos()
                        .iter()
                        .filter_map(|r| me.shipper.status(r).ok())
                        .collect()
                })
                .await
                .unwrap_or_default();
                if let Ok(json) = serde_json::to_vec_pretty(&st)
                    && write_durable(f, &json).is_err()
                {
                    warn!(file = %f.display(), "Cannot write the backup status.");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PASS) => {}
            }
        }
    }

    /// The result of a run that could not start (its repository held by another).
    fn not_run(&self, spec: &JobSpec, kind: JobKind, started: i64, why: String) -> JobResult {
        JobResult {
            job: spec.name.clone(),
            kind,
            site: self.site.clone(),
            repo: spec.repo.clone(),
            started_ms: started,
            ok: false,
            error: Some(why),
            ..JobResult::default()
        }
    }

    /// One run, now, under the repository's lock; records and sinks its result.
    fn run_one(&self, spec: &JobSpec, kind: JobKind) -> JobResult {
        let started = tiandi_transfer::now_ms();
        // Recorded first: a run that crashes the process is not retried in a loop.
        let _ = self.state.insert(
            format!("r/{}/{kind}", spec.name),
            started.to_string().as_bytes(),
        );
        let result = match RepoLock::take(&self.repos_dir, &spec.repo) {
            Ok(_lock) => {
                let mut progress = |p: &Progress| {
                    if let Some((_, r)) = self
                        .running
                        .lock()
                        .expect("running lock")
                        .get_mut(&spec.repo)
                    {
                        r.files = p.files;
                        r.bytes = p.bytes;
                        r.total_bytes = p.total_bytes;
                        r.eta_s = p.eta_s();
                    }
                };
                let holder = format!("{}/{kind}/{started}", spec.name);
                let lease = self.leases.get().map(|l| {
                    let taken = l.take(&spec.repo, &holder, LEASE_TTL_S);
                    (l.clone(), taken)
                });
                match lease {
                    Some((_, Err(LeaseError::Held(why)))) => self.not_run(
                        spec,
                        kind,
                        started,
                        format!("repository {} is leased to another run: {why}", spec.repo),
                    ),
                    lease => {
                        let (renewer, said) = match &lease {
                            Some((l, Ok(until))) => (
                                Some(Renewer::start(l.clone(), &spec.repo, &holder)),
                                format!("held at the controller (until {until} ms, renewed)"),
                            ),
                            Some((_, Err(e))) => {
                                (None, format!("none ({e}): held by the local lock only"))
                            }
                            None => (None, "none: held by the local lock only".into()),
                        };
                        info!(repo = %spec.repo, lease = %said, "Backup job starting.");
                        let mut r = job::run(
                            spec,
                            kind,
                            &self.repos_dir,
                            &self.scratch_dir,
                            started,
                            &mut progress,
                        );
                        r.lease = Some(match renewer.map(Renewer::stop) {
                            Some(Some(lost)) => {
                                r.warnings
                                    .push(format!("the lease was lost during the run: {lost}"));
                                format!("lost during the run: {lost}")
                            }
                            _ => said,
                        });
                        r
                    }
                }
            }
            Err(why) => self.not_run(spec, kind, started, why),
        };
        if result.ok {
            info!(duration_ms = result.duration_ms, snapshot = ?result.snapshot, "Backup job done.");
        } else {
            warn!(error = ?result.error, "Backup job failed.");
        }
        let _ = self.state.insert(
            format!("l/{}/{kind}", spec.name),
            serde_json::to_vec(&result).expect("results serialise"),
        );
        let _ = self.state.flush();
        if let Err(e) = (self.sink)(&result) {
            warn!(error = %e, "The backup result could not be handed on.");
        }
        self.running
            .lock()
            .expect("running lock")
            .remove(&spec.repo);
        result
    }
}

/// Whether the job's window (if any) is open at `now_ms`; a window that does not parse was
/// refused when the jobs were validated, so it is read as closed (fail closed).
fn in_window(j: &JobSpec, now_ms: i64) -> bool {
    match &j.window {
        None => true,
        Some(w) => w
            .parse::<tiandi_transfer::Window>()
            .is_ok_and(|w| w.contains(now_ms)),
    }
}

/// An advisory lock on one repository, held by this process until dropped (or it dies).
pub struct RepoLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl RepoLock {
    /// Takes the lock on `<repos_dir>/.<repo>.lock` without waiting; Err says who holds it.
    pub fn take(repos_dir: &Path, repo: &str) -> Result<RepoLock, String> {
        let path = repos_dir.join(format!(".{repo}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(RepoLock { _lock: l }),
            Err((_, e)) => Err(format!(
                "repository {repo} is in use by another process (its lock {} is held: {e})",
                path.display()
            )),
        }
    }
}

/// What a result file's transfer name starts with: `backup-result~<job>~<kind>~<ms>.json`.
pub const RESULT_PREFIX: &str = "backup-result~";
/// Largest result file a partner reads.
pub const MAX_RESULT_FILE: u64 = 256 * 1024;
/// Result files kept on the sending node after they went (for an operator to look at).
const KEEP_RESULTS: Duration = Duration::from_secs(30 * 86_400);

/// A sink that sends each result to `dest` through `outbox` (a failure in the alarm class, a
/// success in the normal one), from a file in `dir`.
pub fn outbox_sink(outbox: Arc<tiandi_transfer::Outbox>, dest: &str, dir: &Path) -> Sink {
    let (dest, dir) = (dest.to_string(), dir.to_path_buf());
    Box::new(move |r: &JobResult| {
        tiandi_link::secrets::private_dir(&dir).map_err(|e| e.to_string())?;
        let name = format!("{RESULT_PREFIX}{}~{}~{}.json", r.job, r.kind, r.started_ms);
        let file = dir.join(&name);
        write_durable(&file, &serde_json::to_vec(r).expect("results serialise"))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let manifest = tiandi_transfer::Manifest::of_file(&file).map_err(|e| e.to_string())?;
        let id = format!(
            "br{}-{:08x}",
            tiandi_transfer::now_ms(),
            rand::random::<u32>()
        );
        let mut job = tiandi_transfer::Job::new(&id, &dest, file, manifest);
        job.priority = if r.ok {
            tiandi_transfer::Priority::Normal
        } else {
            tiandi_transfer::Priority::Alarm
        };
        outbox.enqueue(job).map_err(|e| e.to_string())?;
        // Old result files go: the controller has them.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > KEEP_RESULTS));
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    })
}

/// A result file that arrived (`incoming/<name>`), read and checked: its name, its size, its
/// JSON, and that it is `site`'s (a site reports only its own runs). The file is removed
/// when it was read, whatever it said.
pub fn take_result(path: &Path, site: &str) -> Result<JobResult, String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("a result file without a name")?;
    let parsed = name
        .strip_prefix(RESULT_PREFIX)
        .and_then(|r| r.strip_suffix(".json"))
        .and_then(|r| {
            let mut it = r.split('~');
            Some((it.next()?, it.next()?, it.next()?, it.next().is_none()))
        });
    let out = (|| {
        let Some((job, kind, ms, true)) = parsed else {
            return Err(format!("{name}: not a result file name"));
        };
        tiandi_link::names::validate_name("job", job).map_err(|e| e.to_string())?;
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if size > MAX_RESULT_FILE {
            return Err(format!("{name}: {size} bytes, at most {MAX_RESULT_FILE}"));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: JobResult = serde_json::from_slice(&bytes).map_err(|e| format!("{name}: {e}"))?;
        if r.job != job || r.kind.to_string() != kind || r.started_ms.to_string() != ms {
            return Err(format!("{name}: its name and its content disagree"));
        }
        if r.site != site {
            return Err(format!(
                "{name}: a result of site {:?} sent by {site}",
                r.site
            ));
        }
        tiandi_link::names::validate_name("repository", &r.repo).map_err(|e| e.to_string())?;
        Ok(r)
    })();
    let _ = std::fs::remove_file(path);
    out
}

/// Renews a run's lease every third of [`LEASE_TTL_S`] on a thread of its own; [`Renewer::stop`]
/// gives it back and says whether it was lost on the way (taken by another after renewals
/// failed for a whole lease).
struct Renewer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: std::thread::JoinHandle<Option<String>>,
}

impl Renewer {
    fn start(leases: Arc<dyn Leases>, repo: &str, holder: &str) -> Renewer {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (s, repo, holder) = (stop.clone(), repo.to_string(), holder.to_string());
        let thread = std::thread::spawn(move || {
            let every = Duration::from_secs(u64::from(LEASE_TTL_S / 3));
            let mut lost = None;
            loop {
                let (lock, cv) = &*s;
                let done = cv
                    .wait_timeout_while(lock.lock().expect("renewer lock"), every, |d| !*d)
                    .expect("renewer lock");
                if *done.0 {
                    break;
                }
                drop(done);
                match leases.take(&repo, &holder, LEASE_TTL_S) {
                    Ok(_) => {}
                    Err(LeaseError::Held(why)) => {
                        warn!(%repo, %why, "The run's lease was taken by another holder.");
                        lost = Some(why);
                    }
                    Err(e) => warn!(%repo, error = %e, "The run's lease could not be renewed."),
                }
            }
            leases.release(&repo, &holder);
            lost
        });
        Renewer { stop, thread }
    }

    fn stop(self) -> Option<String> {
        *self.stop.0.lock().expect("renewer lock") = true;
        self.stop.1.notify_all();
        self.thread.join().unwrap_or(None)
    }
}
