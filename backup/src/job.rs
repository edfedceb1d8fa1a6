//! Unattended backup jobs: what the controller configures ([`JobSpec`], pushed to the sites as
//! one [`Jobs`] JSON file), one run of a job ([`run`]: a backup, a verify or a restore drill)
//! and what it reports back ([`JobResult`], JSON to the controller).
//!
//! Pure where it can be: parsing, validation and [`due`]/[`next_run`] take the time as an
//! argument; [`run`] takes it too (the snapshot's time, the prune's clock) and touches only the
//! repository under `repos_dir`, the scratch directory and the hooks it is told to start.
//!
//! A run never panics and always returns a result: a failure is `ok: false` with an error that
//! says which step failed and why. A post-hook runs whenever a pre-hook was tried, so a
//! database a pre-hook paused is resumed even when the backup failed.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Local};
use crate::crypto::KdfParams;
use crate::policy::{self, Keep};
use crate::repo::{self, BackupOptions, Progress, PruneOptions, Repo};
use crate::schedule::Schedule;

/// The version of the jobs file this program reads and writes.
pub const JOBS_VERSION: u32 = 1;
/// Most jobs in one file.
pub const MAX_JOBS: usize = 1024;
/// Largest jobs file: 1024 jobs of 64 paths of a few hundred bytes fit well inside.
pub const MAX_JOBS_FILE: usize = 16 << 20;
/// Most paths one job backs up.
pub const MAX_PATHS: usize = 64;
/// Bytes of a hook's output kept (the end of it: where the error usually is).
pub const HOOK_TAIL: usize = 2048;
/// Longest hook timeout: a day.
pub const MAX_HOOK_TIMEOUT_S: u64 = 86_400;
/// The site name of jobs the controller runs itself.
pub const CONTROLLER: &str = "controller";
/// Most arguments of a hook, and the longest one.
const MAX_HOOK_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
/// Most entries in a result's `notes`, and the longest one: a result is a small message.
const MAX_NOTES: usize = 20;
const MAX_NOTE_LEN: usize = 500;
/// A last run this far in the future means the clock was set back ([`due`]).
pub const CLOCK_STEP_MS: i64 = 5 * 60_000;
/// How long a hook has between SIGTERM and SIGKILL after its timeout.
const KILL_GRACE: Duration = Duration::from_secs(1);

fn default_to() -> String {
    CONTROLLER.to_string()
}
fn default_hook_timeout_s() -> u64 {
    600
}
fn default_rpo_hours() -> u32 {
    26
}
fn default_verify_read_pct() -> u8 {
    5
}
fn default_drill_sample_pct() -> u8 {
    10
}
fn default_prune_grace_hours() -> u32 {
    24
}

/// One backup job, as the controller configures it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// Who runs it: a site ID, or `controller`.
    pub site: String,
    /// The repository: directory `<repos_dir>/<repo>` on the site that runs the job.
    pub repo: String,
    /// Absolute paths to back up, 1 to 64, with different last components (a snapshot names
    /// its top-level entries by them).
    pub paths: Vec<PathBuf>,
    /// A file on the site (mode 0600) whose first line is the repository's passphrase.
    pub password_file: PathBuf,
    pub schedule: Schedule,
    // Retention as flat keys: `deny_unknown_fields` cannot check a flattened table, and a
    // misspelt `keep_dialy` silently keeping everything is what it must refuse.
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// Hours east of UTC for the retention's day, week, … buckets.
    #[serde(default)]
    pub tz_offset_hours: i64,
    /// Programs run before and after the backup: argv, the program by its absolute path, no
    /// shell.
    #[serde(default)]
    pub pre_hook: Option<Vec<String>>,
    #[serde(default)]
    pub post_hook: Option<Vec<String>>,
    #[serde(default = "default_hook_timeout_s")]
    pub hook_timeout_s: u64,
    /// The newest good backup may be this old before the controller raises an alarm.
    #[serde(default = "default_rpo_hours")]
    pub rpo_hours: u32,
    /// When to check the repository: every pack, and this share of them opened with the key.
    #[serde(default)]
    pub verify: Option<Schedule>,
    #[serde(default = "default_verify_read_pct")]
    pub verify_read_pct: u8,
    /// When to restore a sample of the newest snapshot into scratch space and compare it.
    #[serde(default)]
    pub drill: Option<Schedule>,
    #[serde(default = "default_drill_sample_pct")]
    pub drill_sample_pct: u8,
    /// How long a prune's marked packs wait before they are deleted.
    #[serde(default = "default_prune_grace_hours")]
    pub prune_grace_hours: u32,
    /// When the job may run, `HH:MM-HH:MM[+08:00]`; kept as text here.
    #[serde(default)]
    pub window: Option<String>,
    /// The partner the repository is shipped to.
    #[serde(default = "default_to")]
    pub to: String,
}

fn check_argv(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("is empty: give the program's absolute path and its arguments".into());
    };
    if argv.len() > MAX_HOOK_ARGS {
        return Err(format!("{} arguments: at most {MAX_HOOK_ARGS}", argv.len()));
    }
    if let Some(a) = argv
        .iter()
        .find(|a| a.len() > MAX_ARG_LEN || a.contains('\0'))
    {
        return Err(format!(
            "an argument of {} bytes or with a NUL: at most {MAX_ARG_LEN} bytes, no NUL",
            a.len()
        ));
    }
    // No shell and no PATH search: the controller names exactly what runs on the site.
    if !Path::new(program).is_absolute() {
        return Err(format!("{program:?}: give the program's absolute path"));
    }
    Ok(())
}

/// An absolute path with no `..` and no NUL.
fn check_abs(p: &Path) -> Result<(), String> {
    let s = p.to_str().ok_or("is not UTF-8")?;
    if !p.is_absolute() {
        return Err(format!("{s:?} is not an absolute path"));
    }
    if s.contains('\0') || p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{s:?} contains '..' or a NUL"));
    }
    Ok(())
}

impl JobSpec {
    /// Checks every key; the error names it: `backup_jobs[gd-db-nightly].paths: …`.
    pub fn validate(&self) -> Result<(), String> {
        use tiandi_link::names::validate_name;
        validate_name("job name", &self.name).map_err(|e| format!("backup_jobs[].name: {e}"))?;
        let at = |key: &str, why: String| format!("backup_jobs[{}].{key}: {why}", self.name);
        validate_name("site", &self.site).map_err(|e| at("site", e.to_string()))?;
        validate_name("repository", &self.repo).map_err(|e| at("repo", e.to_string()))?;
        validate_name("partner", &self.to).map_err(|e| at("to", e.to_string()))?;
        if self.paths.is_empty() || self.paths.len() > MAX_PATHS {
            return Err(at(
                "paths",
                format!("{} paths: give 1 to {MAX_PATHS}", self.paths.len()),
            ));
        }
        let mut names = HashSet::new();
        for p in &self.paths {
            check_abs(p).map_err(|e| at("paths", e))?;
            // What `Repo::backup` names the top-level entry: two the same would be refused
            // there, at 01:30 with nobody watching; refuse them here instead.
            let name = p.file_name().map_or("root".into(), |n| n.to_string_lossy());
            if !names.insert(name.to_string()) {
                return Err(at(
                    "paths",
                    format!("two paths end in {name:?}: give them to separate jobs"),
                ));
            }
        }
        check_abs(&self.password_file).map_err(|e| at("password_file", e))?;
        if !(-12..=14).contains(&self.tz_offset_hours) {
            return Err(at(
                "tz_offset_hours",
                format!("{}: a zone is between -12 and +14", self.tz_offset_hours),
            ));
        }
        for (key, hook) in [("pre_hook", &self.pre_hook), ("post_hook", &self.post_hook)] {
            if let Some(argv) = hook {
                check_argv(argv).map_err(|e| at(key, e))?;
            }
        }
        if !(1..=MAX_HOOK_TIMEOUT_S).contains(&self.hook_timeout_s) {
            return Err(at(
                "hook_timeout_s",
                format!(
                    "{}: between 1 and {MAX_HOOK_TIMEOUT_S} seconds",
                    self.hook_timeout_s
                ),
            ));
        }
        if !(1..=366 * 24).contains(&self.rpo_hours) {
            return Err(at(
                "rpo_hours",
                format!("{}: between 1 and {} hours", self.rpo_hours, 366 * 24),
            ));
        }
        if self.verify_read_pct > 100 {
            return Err(at(
                "verify_read_pct",
                format!("{}: a share between 0 and 100", self.verify_read_pct),
            ));
        }
        if !(1..=100).contains(&self.drill_sample_pct) {
            return Err(at(
                "drill_sample_pct",
                format!("{}: a share between 1 and 100", self.drill_sample_pct),
            ));
        }
        if self.prune_grace_hours > 365 * 24 {
            return Err(at(
                "prune_grace_hours",
                format!("{}: at most a year", self.prune_grace_hours),
            ));
        }
        if let Some(w) = &self.window
            && (w.is_empty() || w.len() > 64)
        {
            return Err(at(
                "window",
                format!("{} characters: write HH:MM-HH:MM", w.len()),
            ));
        }
        Ok(())
    }

    /// The retention policy.
    pub fn keep(&self) -> Keep {
        Keep {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }

    /// The tag the job's snapshots carry: retention and drills look at these only, so jobs
    /// sharing a repository never forget each other's snapshots.
    pub fn tag(&self) -> String {
        format!("job:{}", self.name)
    }

    /// The schedule of one kind of run (`None`: that kind is not configured).
    pub fn schedule_of(&self, kind: JobKind) -> Option<&Schedule> {
        match kind {
            JobKind::Backup => Some(&self.schedule),
            JobKind::Verify => self.verify.as_ref(),
            JobKind::Drill => self.drill.as_ref(),
        }
    }
}

/// The file the controller pushes to a site: every job (each site runs those of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jobs {
    pub version: u32,
    pub generated_ms: i64,
    pub jobs: Vec<JobSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobsError {
    #[error("backup jobs file of {0} bytes: at most {MAX_JOBS_FILE}")]
    TooLarge(usize),
    #[error("backup jobs file: {0}")]
    Parse(String),
    #[error("backup jobs file version {0}: this program reads version {JOBS_VERSION}")]
    Version(u32),
    #[error("backup_jobs: {0} jobs, at most {MAX_JOBS}")]
    TooMany(usize),
    #[error("backup_jobs[{0}]: two jobs have this name")]
    Duplicate(String),
    #[error("{0}")]
    Invalid(String),
}

impl Jobs {
    pub fn new(generated_ms: i64, jobs: Vec<JobSpec>) -> Jobs {
        Jobs {
            version: JOBS_VERSION,
            generated_ms,
            jobs,
        }
    }

    /// Reads and validates a jobs file.
    pub fn parse(text: &str) -> Result<Jobs, JobsError> {
        if text.len() > MAX_JOBS_FILE {
            return Err(JobsError::TooLarge(text.len()));
        }
        // The version first: a newer file's new keys would otherwise be reported as unknown
        // keys rather than as a newer version.
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe =
            serde_json::from_str(text).map_err(|e| JobsError::Parse(e.to_string()))?;
        if probe.version != JOBS_VERSION {
            return Err(JobsError::Version(probe.version));
        }
        let jobs: Jobs =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| JobsError::Parse(format!("{}: {}", e.path(), e.inner())))?;
        jobs.validate()?;
        Ok(jobs)
    }

    /// Refuses an unknown version, more than [`MAX_JOBS`] jobs, two of one name, a bad job.
    pub fn validate(&self) -> Result<(), JobsError> {
        if self.version != JOBS_VERSION {
            return Err(JobsError::Version(self.version));
        }
        if self.jobs.len() > MAX_JOBS {
            return Err(JobsError::TooMany(self.jobs.len()));
        }
        let mut names = HashSet::new();
        for j in &self.jobs {
            j.validate().map_err(JobsError::Invalid)?;
            if !names.insert(j.name.as_str()) {
                return Err(JobsError::Duplicate(j.name.clone()));
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("jobs serialise")
    }

    /// The jobs `site` runs.
    pub fn for_site<'a>(&'a self, site: &'a str) -> impl Iterator<Item = &'a JobSpec> + 'a {
        self.jobs.iter().filter(move |j| j.site == site)
    }
}

/// What a run does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Backup,
    Verify,
    Drill,
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobKind::Backup => "backup",
            JobKind::Verify => "verify",
            JobKind::Drill => "drill",
        })
    }
}

/// What one run did, for the controller. Unknown keys are tolerated when read (results are
/// reports, and a newer site may report more), unlike a configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobResult {
    pub job: String,
    pub kind: JobKind,
    pub site: String,
    pub repo: String,
    pub started_ms: i64,
    pub duration_ms: u64,
    pub ok: bool,
    /// Which step failed, and why.
    pub error: Option<String>,
    /// What went wrong without failing the run (paths left out, a stale drill directory).
    pub warnings: Vec<String>,
    /// Detail for the warnings and errors: paths left out, damage found, files that differ
    /// (the first 20).
    pub notes: Vec<String>,
    /// The snapshot made (backup) or restored (drill).
    pub snapshot: Option<String>,
    pub files: u64,
    /// What the paths hold.
    pub bytes: u64,
    /// Bytes of chunks the repository did not have.
    pub new_bytes: u64,
    /// What the new chunks and trees take in the repository.
    pub stored_bytes: u64,
    /// The repository directory's size after the run.
    pub repo_bytes: u64,
    /// This job's snapshots in the repository after the run (after forget).
    pub snapshots: u64,
    /// `bytes / stored_bytes` of this run (two decimals), when it stored anything.
    pub dedup_ratio: Option<f64>,
    /// Paths left out of the backup (unreadable, a socket, …): a warning, not a failure.
    pub skipped: u64,
    /// Snapshots forgotten by the retention policy.
    pub forgot: u64,
    /// Bytes of packs deleted by the prune (marked by an earlier one), and marked by this one.
    pub pruned_bytes: u64,
    pub prune_marked_bytes: u64,
    /// Damaged packs and blobs that failed to open (verify).
    pub verify_errors: u64,
    /// Files restored and compared, and those that differ (drill).
    pub drill_files: u64,
    pub drill_mismatches: u64,
    /// The end of a failed hook's output (stderr, or stdout when stderr was empty).
    pub pre_hook_output: Option<String>,
    pub post_hook_output: Option<String>,
}

impl JobResult {
    fn note(&mut self, what: impl Into<String>) {
        if self.notes.len() < MAX_NOTES {
            let mut s: String = what.into();
            if s.len() > MAX_NOTE_LEN {
                let mut cut = MAX_NOTE_LEN;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push('…');
            }
            self.notes.push(s);
        }
    }
}

/// The next time a kind of run is scheduled, strictly after `after_ms`.
pub fn next_run(spec: &JobSpec, kind: JobKind, after_ms: i64) -> Option<i64> {
    spec.schedule_of(kind)?.next_after(after_ms)
}

/// Whether a kind of run is due at `now_ms`, given when it last ran (started).
///
/// Never run: due now. A job with no run has no backup, so its recovery point is already
/// missed, and a new site gets its first backup, verify and drill (in that order) at once. A
/// run missed while the site was down is made once, not once per missed time. A last run
/// more than [`CLOCK_STEP_MS`] in the future means the clock was set back: the record cannot
/// be trusted, and waiting for the clock to catch up could stall the job for days, so it is
/// due now, as if it had never run; a smaller skew just waits for the next time.
pub fn due(spec: &JobSpec, kind: JobKind, last_run_ms: Option<i64>, now_ms: i64) -> bool {
    let Some(schedule) = spec.schedule_of(kind) else {
        return false;
    };
    match last_run_ms {
        None => true,
        Some(last) if last > now_ms.saturating_add(CLOCK_STEP_MS) => true,
        Some(last) => schedule
            .next_after(last.min(now_ms))
            .is_some_and(|t| t <= now_ms),
    }
}

/// What the last bytes of a stream were, read by a thread of its own.
struct Tail {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Receiver<()>,
}

impl Tail {
    fn start(r: Option<impl Read + Send + 'static>) -> Tail {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = channel();
        if let Some(mut r) = r {
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = r.read(&mut chunk) {
                    let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
                    b.extend_from_slice(&chunk[..n]);
                    // Bounded however much the hook writes.
                    if b.len() > 2 * HOOK_TAIL {
                        let cut = b.len() - HOOK_TAIL;
                        b.drain(..cut);
                    }
                }
                let _ = tx.send(());
            });
        }
        Tail { buf, done }
    }

    /// The last [`HOOK_TAIL`] bytes, as text. Waits a little for the end of the stream: a
    /// process the hook left behind may hold it open for ever, and then we take what there is.
    fn finish(self, wait: Duration) -> String {
        let _ = self.done.recv_timeout(wait);
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let tail = &b[b.len().saturating_sub(HOOK_TAIL)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }
}

/// A hook that failed: what happened, and the end of what it wrote.
#[derive(Debug)]
struct HookFailure {
    program: String,
    what: String,
    output: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.program, self.what)?;
        if !self.output.is_empty() {
            write!(f, ": {}", self.output)?;
        }
        Ok(())
    }
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => format!("ended: {s}"),
    }
}

/// Whether process `pid`, our child, has ended, without reaping it: while it is unreaped its
/// ID (and so its process group's) cannot be given to another process.
fn ended_unreaped(pid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive))
}

/// Runs a hook: `argv[0]` (an absolute path) with the rest as arguments, no shell, standard
/// input from /dev/null, in a process group of its own, with `env` added to the environment.
/// Past `timeout` the whole group gets SIGTERM and, a second later, SIGKILL.
///
/// The error says what happened: `/path timed out after 600 s`, `/path exited with status 3:
/// <the last 2 KiB of its stderr>`.
pub fn run_hook(argv: &[String], timeout: Duration, env: &[(&str, &str)]) -> Result<(), String> {
    hook(argv, timeout, env).map_err(|f| f.to_string())
}

fn hook(argv: &[String], timeout: Duration, env: &[(&str, &str)]) -> Result<(), HookFailure> {
    let program = argv
        .first()
        .map_or("(no program)", |p| p.as_str())
        .to_string();
    let fail = |what: String, output: String| HookFailure {
        program: program.clone(),
        what,
        output,
    };
    check_argv(argv).map_err(|e| fail(e, String::new()))?;
    let mut child = Command::new(&program)
        .args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}"), String::new()))?;
    let out = Tail::start(child.stdout.take());
    let err = Tail::start(child.stderr.take());
    let output = |out: Tail, err: Tail, wait| {
        let (o, e) = (out.finish(wait), err.finish(wait));
        if e.is_empty() { o } else { e }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let o = output(out, err, Duration::from_secs(1));
                return Err(fail(describe_status(status), o));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(nap.min(deadline.saturating_duration_since(Instant::now())));
                nap = (nap * 2).min(Duration::from_millis(100));
            }
            Ok(None) => break,
            Err(e) => {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = child.wait();
                return Err(fail(format!("could not be waited for: {e}"), String::new()));
            }
        }
    }
    // Timed out. The group's ID is the child's, which is not reaped yet: both stay ours.
    let _ = killpg(pid, Signal::SIGTERM);
    let grace = Instant::now() + KILL_GRACE;
    while !ended_unreaped(pid) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever is left of the group (the leader, or what it started) goes now.
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = child.wait();
    let o = output(out, err, Duration::from_millis(200));
    Err(fail(format!("timed out after {} s", timeout.as_secs()), o))
}

/// The passphrase: the first line of a file of mode 0600.
fn read_secret(f: &Path) -> Result<Vec<u8>, String> {
    let text = tiandi_link::secrets::read_private(f)
        .map_err(|e| format!("password_file: {e}"))?
        .ok_or_else(|| format!("password_file {}: no such file", f.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(format!(
            "password_file {}: the passphrase is empty",
            f.display()
        ));
    }
    Ok(line.as_bytes().to_vec())
}

/// Bytes of the files under `dir` (links not followed).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    // The layout is shallow (packs/ab/…); the depth bound only stops a pathological tree.
    let mut stack = vec![(dir.to_path_buf(), 0u32)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() && depth < 16 {
                stack.push((e.path(), depth + 1));
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

/// The message of a panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// `f`, with a panic turned into an error: a run always ends with a result, and a post-hook
/// always runs.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(format!("internal error: {}", panic_text(&*p))))
}

/// What a run needs besides the job.
struct Ctx<'a> {
    spec: &'a JobSpec,
    dir: PathBuf,
    scratch_dir: &'a Path,
    now_ms: i64,
    kdf: KdfParams,
}

impl Ctx<'_> {
    /// The repository, made if its directory is absent or empty (`init`: for a backup only).
    fn open(&self, init: bool) -> Result<Repo, String> {
        let secret = read_secret(&self.spec.password_file)?;
        let be: Arc<dyn Backend> = Arc::new(Local::new(&self.dir));
        let what = self.dir.display();
        let empty = be
            .is_empty()
            .map_err(|e| format!("repository {what}: {e}"))?;
        match (empty, init) {
            (true, true) => {
                // A key holder is letters, digits, - and _; a site ID may also have dots.
                let holder = self.spec.site.replace('.', "_");
                Repo::init_on(be, &holder, &secret, self.kdf, self.now_ms)
                    .map_err(|e| format!("making repository {what}: {e}"))
            }
            (true, false) => Err(format!(
                "no repository at {what}: no backup of this job has run yet"
            )),
            (false, _) => {
                Repo::open_on(be, &secret).map_err(|e| format!("opening repository {what}: {e}"))
            }
        }
    }

    /// This job's snapshots, oldest first: `(id, time_ms)`.
    fn mine(&self, repo: &Repo) -> Result<Vec<(String, i64)>, String> {
        let tag = self.spec.tag();
        Ok(repo
            .snapshots()
            .map_err(|e| format!("listing snapshots: {e}"))?
            .into_iter()
            .filter(|(_, s)| s.tags.contains(&tag))
            .map(|(id, s)| (id, s.time_ms))
            .collect())
    }

    fn backup(&self, r: &mut JobResult, progress: &mut dyn FnMut(&Progress)) -> Result<(), String> {
        let spec = self.spec;
        // After the pre-hook, which may be what writes them: a path that is not there (a
        // disk not mounted) fails the run, where the backup would skip it with a warning.
        for p in &spec.paths {
            if let Err(e) = fs::symlink_metadata(p) {
                return Err(format!("paths: {}: {e}", p.display()));
            }
        }
        let mut repo = self.open(true)?;
        let mut o = BackupOptions::new(&spec.site, self.now_ms);
        o.tags = vec![spec.tag()];
        let s = repo
            .backup(&spec.paths, &o, progress)
            .map_err(|e| format!("backing up: {e}"))?;
        r.snapshot = Some(s.snapshot.clone());
        r.files = s.files;
        r.bytes = s.bytes;
        r.new_bytes = s.new_bytes;
        r.stored_bytes = s.stored_bytes;
        // Two decimals: a report, and one that reads back as it was written.
        r.dedup_ratio = (s.stored_bytes > 0)
            .then(|| (s.bytes as f64 / s.stored_bytes as f64 * 100.0).round() / 100.0);
        r.skipped = s.skipped_count;
        if s.skipped_count > 0 {
            r.warnings
                .push(format!("{} paths left out of the backup", s.skipped_count));
            for p in &s.skipped {
                r.note(p.clone());
            }
        }
        let keep = spec.keep();
        if !keep.is_empty() {
            // Any rule keeps the newest snapshot, so the one just made always stays.
            let decisions = policy::apply(&self.mine(&repo)?, &keep, spec.tz_offset_hours * 3600);
            for d in decisions.iter().filter(|d| d.reasons.is_empty()) {
                repo.forget(&d.id)
                    .map_err(|e| format!("forgetting snapshot {}: {e}", d.id))?;
                r.forgot += 1;
            }
            // Every time, not only when this run forgot something: a prune deletes what an
            // earlier one marked once the grace period has passed.
            let mut po = PruneOptions::new(self.now_ms);
            po.grace_ms = i64::from(spec.prune_grace_hours) * 3_600_000;
            let p = repo.prune(&po).map_err(|e| format!("pruning: {e}"))?;
            r.pruned_bytes = p.deleted_bytes;
            r.prune_marked_bytes = p.marked_bytes;
        }
        r.snapshots = self.mine(&repo)?.len() as u64;
        Ok(())
    }

    fn verify(&self, r: &mut JobResult) -> Result<(), String> {
        let repo = self.open(false)?;
        r.snapshots = self.mine(&repo)?.len() as u64;
        let packs =
            repo::check_packs(&**repo.backend()).map_err(|e| format!("checking packs: {e}"))?;
        let data = repo
            .check_data(self.spec.verify_read_pct)
            .map_err(|e| format!("checking data: {e}"))?;
        r.verify_errors = (packs.damaged.len() + data.errors.len()) as u64;
        for e in packs.damaged.iter().chain(&data.errors) {
            r.note(e.clone());
        }
        if r.verify_errors > 0 {
            return Err(format!(
                "verify found {} problems in {} packs: {}",
                r.verify_errors,
                packs.packs,
                packs
                    .damaged
                    .iter()
                    .chain(&data.errors)
                    .next()
                    .map_or("", |s| s)
            ));
        }
        Ok(())
    }

    fn drill(&self, r: &mut JobResult) -> Result<(), String> {
        let spec = self.spec;
        let repo = self.open(false)?;
        let mine = self.mine(&repo)?;
        r.snapshots = mine.len() as u64;
        // This job's newest, not the repository's: jobs may share a repository.
        let Some((id, _)) = mine.last() else {
            return Err(format!("no snapshot of job {} to drill", spec.name));
        };
        r.snapshot = Some(id.clone());
        fs::create_dir_all(self.scratch_dir)
            .map_err(|e| format!("scratch directory {}: {e}", self.scratch_dir.display()))?;
        let target = tiandi_link::names::join(
            self.scratch_dir,
            "drill directory",
            &format!("{}.drill", spec.name),
        )
        .map_err(|e| e.to_string())?;
        if target.exists() {
            // Ours (the name is the job's): left by a drill that was killed.
            fs::remove_dir_all(&target)
                .map_err(|e| format!("removing the old drill {}: {e}", target.display()))?;
            r.warnings.push(format!(
                "removed {}, left by an earlier drill",
                target.display()
            ));
        }
        let d = repo.drill(id, &target, spec.drill_sample_pct);
        if target.exists() {
            let _ = fs::remove_dir_all(&target);
        }
        let d = d.map_err(|e| format!("drill of snapshot {id}: {e}"))?;
        r.files = d.files;
        r.bytes = d.bytes;
        r.drill_files = d.files;
        r.drill_mismatches = d.mismatches.len() as u64;
        for m in &d.mismatches {
            r.note(m.clone());
        }
        if let Some(first) = d.mismatches.first() {
            return Err(format!(
                "drill of snapshot {id}: {} of {} files differ: {first}",
                d.mismatches.len(),
                d.files
            ));
        }
        Ok(())
    }
}

/// Runs one job, now: a backup (pre-hook, backup, forget and prune, post-hook), a verify or
/// a drill. The repository is `<repos_dir>/<spec.repo>` (made by the first backup); a drill
/// restores into a directory of `scratch_dir` it removes afterwards. `now_ms` is the
/// snapshot's time and the prune's clock. Never panics: every failure is in the result.
pub fn run(
    spec: &JobSpec,
    kind: JobKind,
    repos_dir: &Path,
    scratch_dir: &Path,
    now_ms: i64,
    progress: &mut dyn FnMut(&Progress),
) -> JobResult {
    run_with(
        spec,
        kind,
        repos_dir,
        scratch_dir,
        now_ms,
        progress,
        KdfParams::default(),
    )
}

fn run_with(
    spec: &JobSpec,
    kind: JobKind,
    repos_dir: &Path,
    scratch_dir: &Path,
    now_ms: i64,
    progress: &mut dyn FnMut(&Progress),
    kdf: KdfParams,
) -> JobResult {
    let started = Instant::now();
    let mut r = JobResult {
        job: spec.name.clone(),
        kind,
        site: spec.site.clone(),
        repo: spec.repo.clone(),
        started_ms: now_ms,
        ..JobResult::default()
    };
    let outcome = guarded(|| {
        spec.validate()?;
        // `join` refuses a symlink planted where the repository should be.
        let dir = tiandi_link::names::join(repos_dir, "repository", &spec.repo)
            .map_err(|e| format!("repo: {e}"))?;
        let ctx = Ctx {
            spec,
            dir,
            scratch_dir,
            now_ms,
            kdf,
        };
        let done = match kind {
            JobKind::Backup => with_hooks(&ctx, &mut r, progress),
            JobKind::Verify => guarded(|| ctx.verify(&mut r)),
            JobKind::Drill => guarded(|| ctx.drill(&mut r)),
        };
        r.repo_bytes = dir_bytes(&ctx.dir);
        done
    });
    r.ok = outcome.is_ok();
    r.error = outcome.err();
    r.duration_ms = started.elapsed().as_millis() as u64;
    r
}

/// Pre-hook, backup, post-hook (with `TIANDI_BACKUP_STATUS=ok|failed`).
fn with_hooks(
    ctx: &Ctx,
    r: &mut JobResult,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(), String> {
    let spec = ctx.spec;
    let dir = ctx.dir.display().to_string();
    let timeout = Duration::from_secs(spec.hook_timeout_s);
    let env = [
        ("TIANDI_BACKUP_JOB", spec.name.as_str()),
        ("TIANDI_BACKUP_REPO", dir.as_str()),
    ];
    let pre = match &spec.pre_hook {
        Some(argv) => hook(argv, timeout, &env).map_err(|f| {
            r.pre_hook_output = Some(f.output.clone());
            format!("pre-hook {f}")
        }),
        None => Ok(()),
    };
    let main = pre.and_then(|()| guarded(|| ctx.backup(r, progress)));
    let Some(argv) = &spec.post_hook else {
        return main;
    };
    let status = if main.is_ok() { "ok" } else { "failed" };
    let mut env = env.to_vec();
    env.push(("TIANDI_BACKUP_STATUS", status));
    let post = hook(argv, timeout, &env).map_err(|f| {
        r.post_hook_output = Some(f.output.clone());
        format!("post-hook {f}")
    });
    match (main, post) {
        (Err(e), Err(p)) => Err(format!("{e}; then {p}")),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rand::{RngCore, SeedableRng};

    use super::*;
    use crate::crypto::TEST_KDF;

    const H: i64 = 3_600_000;
    /// 2026-03-14 12:00 UTC.
    const T0: i64 = 1_773_489_600_000;

    struct Site {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        src: PathBuf,
        repos: PathBuf,
        scratch: PathBuf,
    }

    fn site() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let src = root.join("data");
        fs::create_dir_all(src.join("db")).unwrap();
        let mut big = vec![0u8; 1 << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut big);
        fs::write(src.join("db/dump.sql"), &big).unwrap();
        fs::write(src.join("notes.txt"), "drill at 10:00\n").unwrap();
        let pw = root.join("pw");
        fs::write(&pw, "correct horse battery staple\n").unwrap();
        fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
        Site {
            repos: root.join("repos"),
            scratch: root.join("scratch"),
            src,
            root,
            _tmp: tmp,
        }
    }

    fn spec(s: &Site) -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "gd-db-nightly",
            "site": "gd-001",
            "repo": "gd-db",
            "paths": [s.src],
            "password_file": s.root.join("pw"),
            "schedule": "daily 01:30 +08:00",
            "verify": "weekly SUN 03:00 +08:00",
            "verify_read_pct": 100,
            "drill": "@monthly +08:00",
            "drill_sample_pct": 100,
        }))
        .unwrap()
    }

    fn go(spec: &JobSpec, kind: JobKind, s: &Site, now_ms: i64) -> JobResult {
        let r = run_with(
            spec,
            kind,
            &s.repos,
            &s.scratch,
            now_ms,
            &mut |_| {},
            TEST_KDF,
        );
        // Whatever happened, the result is one the controller can read back.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<JobResult>(&json).unwrap(), r);
        r
    }

    #[test]
    fn backups_dedup_and_retention_keeps_one() {
        let s = site();
        let mut j = spec(&s);
        j.keep_last = 1;
        j.prune_grace_hours = 0;
        let a = go(&j, JobKind::Backup, &s, T0);
        assert!(a.ok, "{a:?}");
        assert!(a.snapshot.is_some());
        assert_eq!((a.files, a.snapshots, a.forgot), (2, 1, 0));
        assert!(a.bytes > 1 << 20 && a.new_bytes >= 1 << 20, "{a:?}");
        assert!(
            a.repo_bytes >= a.stored_bytes && a.stored_bytes > 0,
            "{a:?}"
        );
        assert!(a.dedup_ratio.is_some());

        fs::write(s.src.join("notes.txt"), "drill at 11:00\n").unwrap();
        let b = go(&j, JobKind::Backup, &s, T0 + H);
        assert!(b.ok, "{b:?}");
        assert_ne!(b.snapshot, a.snapshot);
        assert_eq!(b.bytes, a.bytes);
        assert!(
            b.new_bytes < 64 << 10,
            "second backup stored {} new",
            b.new_bytes
        );
        assert!(b.dedup_ratio.unwrap() > 10.0, "{b:?}");
        // keep_last = 1: the first snapshot is forgotten, the new one stays.
        assert_eq!((b.forgot, b.snapshots), (1, 1));
        let repo = Repo::open(&s.repos.join("gd-db"), b"correct horse battery staple").unwrap();
        let left = repo.snapshots().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(Some(&left[0].0), b.snapshot.as_ref());
        assert_eq!(left[0].1.tags, ["job:gd-db-nightly"]);
        assert_eq!(left[0].1.host, "gd-001");
    }

    #[test]
    fn retention_leaves_other_jobs_snapshots_alone() {
        let s = site();
        let mut other = spec(&s);
        other.name = "gd-db-hourly".into();
        assert!(go(&other, JobKind::Backup, &s, T0).ok);
        let mut j = spec(&s);
        j.keep_last = 1;
        for i in 1..=3 {
            let r = go(&j, JobKind::Backup, &s, T0 + i * H);
            assert!(r.ok, "{r:?}");
            assert_eq!(r.snapshots, 1);
        }
        let repo = Repo::open(&s.repos.join("gd-db"), b"correct horse battery staple").unwrap();
        let tags: Vec<_> = repo
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|(_, s)| s.tags[0].clone())
            .collect();
        assert_eq!(tags, ["job:gd-db-hourly", "job:gd-db-nightly"]);
    }

    #[test]
    fn a_failing_pre_hook_stops_the_backup_and_the_post_hook_still_runs() {
        let s = site();
        let mut j = spec(&s);
        j.pre_hook = Some(vec!["/bin/false".into()]);
        let seen = s.root.join("post-hook-saw");
        j.post_hook = Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo \"$TIANDI_BACKUP_STATUS $TIANDI_BACKUP_JOB\" > \"$1\"".into(),
            "sh".into(),
            seen.display().to_string(),
        ]);
        let r = go(&j, JobKind::Backup, &s, T0);
        assert!(!r.ok);
        assert_eq!(r.snapshot, None);
        let e = r.error.unwrap();
        assert!(
            e.starts_with("pre-hook /bin/false exited with status 1"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&seen).unwrap(), "failed gd-db-nightly\n");
        // No backup: no repository was made.
        assert!(!s.repos.join("gd-db").exists());

        // A good pre-hook: the backup runs, the post-hook hears "ok".
        j.pre_hook = Some(vec!["/bin/true".into()]);
        let r = go(&j, JobKind::Backup, &s, T0);
        assert!(r.ok, "{r:?}");
        assert_eq!(fs::read_to_string(&seen).unwrap(), "ok gd-db-nightly\n");
    }

    #[test]
    fn a_failing_post_hook_fails_the_run_with_its_stderr() {
        let s = site();
        let mut j = spec(&s);
        j.post_hook = Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo resuming the database failed >&2; exit 3".into(),
        ]);
        let r = go(&j, JobKind::Backup, &s, T0);
        assert!(!r.ok);
        assert!(r.snapshot.is_some(), "the backup itself was made");
        assert_eq!(
            r.error.as_deref(),
            Some("post-hook /bin/sh exited with status 3: resuming the database failed")
        );
        assert_eq!(
            r.post_hook_output.as_deref(),
            Some("resuming the database failed")
        );
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_its_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let started = Instant::now();
        let e = run_hook(
            &["/bin/sleep".into(), "30".into()],
            Duration::from_secs(1),
            &[],
        )
        .unwrap_err();
        assert_eq!(e, "/bin/sleep timed out after 1 s");
        assert!(started.elapsed() < Duration::from_secs(10));

        // A child of the hook, which ignores SIGTERM, goes with it.
        let started = Instant::now();
        let e = run_hook(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "trap '' TERM; /bin/sleep 30 & echo $! > \"$1\"; echo waiting >&2; wait".into(),
                "sh".into(),
                pidfile.display().to_string(),
            ],
            Duration::from_secs(1),
            &[],
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(e, "/bin/sh timed out after 1 s: waiting");
        let pid = fs::read_to_string(&pidfile).unwrap();
        let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
        // Gone, or a zombie waiting for whoever reaps orphans here.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::read_to_string(&stat) {
                Err(_) => break,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z') =>
                {
                    break;
                }
                Ok(s) => {
                    assert!(Instant::now() < deadline, "the hook's child lives on: {s}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    #[test]
    fn hook_errors_say_what_happened() {
        let env = [("TIANDI_BACKUP_JOB", "j1")];
        let long = "yes | head -c 100000 >&2; echo \"job $TIANDI_BACKUP_JOB\" >&2; exit 4";
        let e = run_hook(
            &["/bin/sh".into(), "-c".into(), long.into()],
            Duration::from_secs(10),
            &env,
        )
        .unwrap_err();
        assert!(e.starts_with("/bin/sh exited with status 4: "), "{e}");
        assert!(e.ends_with("y\ny\njob j1"), "{e}");
        assert!(e.len() < HOOK_TAIL + 100, "{} bytes", e.len());
        let e = run_hook(&["sh".into()], Duration::from_secs(1), &[]).unwrap_err();
        assert!(e.contains("give the program's absolute path"), "{e}");
        let e = run_hook(&["/no/such/hook".into()], Duration::from_secs(1), &[]).unwrap_err();
        assert!(e.starts_with("/no/such/hook could not be started"), "{e}");
        let e = run_hook(
            &["/bin/sh".into(), "-c".into(), "kill -9 $$".into()],
            Duration::from_secs(5),
            &[],
        )
        .unwrap_err();
        assert_eq!(e, "/bin/sh was killed by signal 9");
        run_hook(&["/bin/true".into()], Duration::from_secs(5), &[]).unwrap();
    }

    #[test]
    fn verify_and_drill_on_a_good_repository() {
        let s = site();
        let j = spec(&s);
        // Nothing backed up yet: both fail, saying why.
        let v = go(&j, JobKind::Verify, &s, T0);
        assert!(!v.ok);
        assert!(v.error.unwrap().starts_with("no repository at"));
        assert!(go(&j, JobKind::Backup, &s, T0).ok);
        let v = go(&j, JobKind::Verify, &s, T0 + H);
        assert!(v.ok, "{v:?}");
        assert_eq!((v.verify_errors, v.snapshots), (0, 1));
        let d = go(&j, JobKind::Drill, &s, T0 + H);
        assert!(d.ok, "{d:?}");
        assert_eq!((d.drill_files, d.drill_mismatches), (2, 0));
        assert!(d.snapshot.is_some());
        // The drill's directory is gone; the scratch directory stays.
        assert_eq!(fs::read_dir(&s.scratch).unwrap().count(), 0);

        // A stale drill directory (a drill killed half-way) is cleared first.
        fs::create_dir_all(s.scratch.join("gd-db-nightly.drill/x")).unwrap();
        let d = go(&j, JobKind::Drill, &s, T0 + 2 * H);
        assert!(d.ok, "{d:?}");
        assert_eq!(d.warnings.len(), 1);

        // A damaged pack: verify fails and says which.
        let packs = s.repos.join("gd-db/packs");
        let sub = fs::read_dir(&packs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let pack = fs::read_dir(&sub).unwrap().next().unwrap().unwrap().path();
        let mut bytes = fs::read(&pack).unwrap();
        bytes[10] ^= 1;
        fs::write(&pack, bytes).unwrap();
        let v = go(&j, JobKind::Verify, &s, T0 + 3 * H);
        assert!(!v.ok);
        assert!(v.verify_errors > 0);
        assert!(v.error.unwrap().starts_with("verify found"));
    }

    #[test]
    fn a_socket_is_a_warning_and_a_missing_path_a_failure() {
        let s = site();
        let _sock = std::os::unix::net::UnixListener::bind(s.src.join("mysqld.sock")).unwrap();
        let j = spec(&s);
        let r = go(&j, JobKind::Backup, &s, T0);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.skipped, 1);
        assert_eq!(r.warnings, ["1 paths left out of the backup"]);
        assert!(r.notes[0].contains("mysqld.sock"), "{:?}", r.notes);

        let mut j = spec(&s);
        j.paths.push(PathBuf::from("/no/such/mount"));
        let r = go(&j, JobKind::Backup, &s, T0 + H);
        assert!(!r.ok);
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .starts_with("paths: /no/such/mount: "),
            "{r:?}"
        );
    }

    #[test]
    fn wrong_passphrase_and_loose_password_file_fail_closed() {
        let s = site();
        let j = spec(&s);
        assert!(go(&j, JobKind::Backup, &s, T0).ok);
        fs::set_permissions(s.root.join("pw"), fs::Permissions::from_mode(0o644)).unwrap();
        let r = go(&j, JobKind::Backup, &s, T0 + H);
        assert!(r.error.unwrap().contains("chmod 600"));
        fs::write(s.root.join("pw"), "not the passphrase\n").unwrap();
        fs::set_permissions(s.root.join("pw"), fs::Permissions::from_mode(0o600)).unwrap();
        let r = go(&j, JobKind::Backup, &s, T0 + H);
        assert!(r.error.unwrap().starts_with("opening repository"), "");
    }

    fn bad(f: impl FnOnce(&mut JobSpec)) -> String {
        let s = site();
        let mut j = spec(&s);
        f(&mut j);
        j.validate().unwrap_err()
    }

    #[test]
    fn validation_names_the_key() {
        let s = site();
        spec(&s).validate().unwrap();
        let p = "backup_jobs[gd-db-nightly]";
        let cases: Vec<(String, String)> = vec![
            (bad(|j| j.paths.clear()), format!("{p}.paths: 0 paths")),
            (
                bad(|j| j.paths = vec![PathBuf::from("data")]),
                format!("{p}.paths: \"data\" is not an absolute path"),
            ),
            (
                bad(|j| j.paths = vec!["/a/x".into(), "/b/x".into()]),
                format!("{p}.paths: two paths end in \"x\""),
            ),
            (
                bad(|j| j.paths = vec!["/a/../etc".into()]),
                format!("{p}.paths: \"/a/../etc\" contains '..'"),
            ),
            (
                bad(|j| j.paths = (0..65).map(|i| format!("/d{i}").into()).collect()),
                format!("{p}.paths: 65 paths: give 1 to 64"),
            ),
            (
                bad(|j| j.password_file = "pw".into()),
                format!("{p}.password_file: \"pw\" is not"),
            ),
            (
                bad(|j| j.repo = "../etc".into()),
                format!("{p}.repo: repository"),
            ),
            (bad(|j| j.site = "".into()), format!("{p}.site: site")),
            (bad(|j| j.to = "a/b".into()), format!("{p}.to: partner")),
            (
                bad(|j| j.pre_hook = Some(vec!["pg_dump".into()])),
                format!("{p}.pre_hook: \"pg_dump\": give the program's absolute path"),
            ),
            (
                bad(|j| j.post_hook = Some(vec![])),
                format!("{p}.post_hook: is empty"),
            ),
            (
                bad(|j| j.hook_timeout_s = 86_401),
                format!("{p}.hook_timeout_s: 86401: between 1 and 86400"),
            ),
            (
                bad(|j| j.tz_offset_hours = 15),
                format!("{p}.tz_offset_hours: 15"),
            ),
            (bad(|j| j.rpo_hours = 0), format!("{p}.rpo_hours: 0")),
            (
                bad(|j| j.verify_read_pct = 101),
                format!("{p}.verify_read_pct: 101"),
            ),
            (
                bad(|j| j.drill_sample_pct = 0),
                format!("{p}.drill_sample_pct: 0"),
            ),
            (
                bad(|j| j.prune_grace_hours = 9000),
                format!("{p}.prune_grace_hours: 9000"),
            ),
            (
                bad(|j| j.window = Some(String::new())),
                format!("{p}.window: 0"),
            ),
            (
                bad(|j| j.name = ".hidden".into()),
                "backup_jobs[].name: job name".into(),
            ),
        ];
        for (got, want) in cases {
            assert!(
                got.starts_with(&want),
                "{got:?} does not start with {want:?}"
            );
        }
    }

    fn file(jobs: serde_json::Value) -> String {
        serde_json::json!({ "version": 1, "generated_ms": T0, "jobs": jobs }).to_string()
    }

    #[test]
    fn jobs_file_parse_refuses_what_it_must() {
        let s = site();
        let j = serde_json::to_value(spec(&s)).unwrap();
        let jobs = Jobs::parse(&file(serde_json::json!([j]))).unwrap();
        assert_eq!(jobs.jobs.len(), 1);
        assert_eq!(jobs.for_site("gd-001").count(), 1);
        assert_eq!(jobs.for_site("gd-002").count(), 0);
        assert_eq!(Jobs::parse(&jobs.to_json()).unwrap(), jobs);
        // Defaults as documented.
        let only: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "n", "site": "controller", "repo": "r", "paths": ["/etc"],
            "password_file": "/etc/tiandi/backup.pw", "schedule": "@daily",
        }))
        .unwrap();
        assert_eq!(
            (only.hook_timeout_s, only.rpo_hours, only.verify_read_pct),
            (600, 26, 5)
        );
        assert_eq!((only.drill_sample_pct, only.prune_grace_hours), (10, 24));
        assert_eq!((only.to.as_str(), only.tz_offset_hours), ("controller", 0));
        assert!(only.keep().is_empty());

        assert_eq!(
            Jobs::parse(&file(serde_json::json!([j, j]))).unwrap_err(),
            JobsError::Duplicate("gd-db-nightly".into())
        );
        let v2 = r#"{"version": 2, "generated_ms": 0, "jobs": [], "new_key": 1}"#;
        assert_eq!(Jobs::parse(v2).unwrap_err(), JobsError::Version(2));
        assert_eq!(
            Jobs::parse(r#"{"version": 2}"#).unwrap_err().to_string(),
            "backup jobs file version 2: this program reads version 1"
        );
        let mut typo = j.clone();
        typo["keep_dialy"] = 7.into();
        let e = Jobs::parse(&file(serde_json::json!([typo]))).unwrap_err();
        assert!(
            e.to_string().contains("jobs[0]") && e.to_string().contains("keep_dialy"),
            "{e}"
        );
        let mut sched = j.clone();
        sched["schedule"] = "every 10s".into();
        let e = Jobs::parse(&file(serde_json::json!([sched]))).unwrap_err();
        assert!(
            e.to_string().contains("jobs[0].schedule")
                && e.to_string().contains("between 1 minute"),
            "{e}"
        );
        let mut rel = j.clone();
        rel["paths"] = serde_json::json!(["relative"]);
        let e = Jobs::parse(&file(serde_json::json!([rel]))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("backup_jobs[gd-db-nightly].paths: \"relative\""),
            "{e}"
        );
        let many: Vec<_> = (0..=MAX_JOBS)
            .map(|i| {
                let mut x = j.clone();
                x["name"] = format!("job-{i}").into();
                x
            })
            .collect();
        assert_eq!(
            Jobs::parse(&file(serde_json::json!(many))).unwrap_err(),
            JobsError::TooMany(MAX_JOBS + 1)
        );
    }

    #[test]
    fn due_and_next_run() {
        let s = site();
        let j = spec(&s); // daily 01:30 Beijing = 17:30 UTC
        let at = T0 + 5 * H + 30 * 60_000; // 2026-03-14 17:30 UTC
        assert_eq!(next_run(&j, JobKind::Backup, T0), Some(at));
        assert!(due(&j, JobKind::Backup, None, T0));
        assert!(!due(&j, JobKind::Backup, Some(at - 24 * H), at - 1));
        assert!(due(&j, JobKind::Backup, Some(at - 24 * H), at));
        assert!(!due(&j, JobKind::Backup, Some(at), at + 23 * H));
        // Down for three days: one run now, then on schedule.
        assert!(due(&j, JobKind::Backup, Some(at - 72 * H), at + H));
        // A last run days in the future (the clock was set back): due now, not stalled until
        // the clock catches up. A small skew waits for the next time.
        assert!(due(&j, JobKind::Backup, Some(at + 48 * H), at));
        assert!(!due(&j, JobKind::Backup, Some(at + 60_000), at));
        assert!(due(&j, JobKind::Backup, Some(at + 60_000), at + 24 * H));
        // Verify: Sunday 03:00 Beijing = Saturday 19:00 UTC.
        assert_eq!(next_run(&j, JobKind::Verify, T0), Some(T0 + 7 * H));
        let mut none = j.clone();
        none.drill = None;
        assert_eq!(next_run(&none, JobKind::Drill, T0), None);
        assert!(!due(&none, JobKind::Drill, None, T0));
        assert_eq!(JobKind::Drill.to_string(), "drill");
        assert_eq!(
            serde_json::to_string(&JobKind::Verify).unwrap(),
            "\"verify\""
        );
    }
}
