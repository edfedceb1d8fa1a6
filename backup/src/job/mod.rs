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
    /// What the partner keeps for this repository at most (GB; unset: no quota). The
    /// controller raises `backup-near-quota` when the repository passes 90 % of it.
    #[serde(default)]
    pub quota_gb: Option<u32>,
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
        if let Some(q) = self.quota_gb
            && !(1..=1_000_000).contains(&q)
        {
            return Err(at("quota_gb", format!("{q}: between 1 and 1,000,000 GB")));
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
    /// How the run held its repository beyond the local lock: the lease at the controller
    /// (until when), or why it ran without one (the controller out of reach).
    pub lease: Option<String>,
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

mod hook;
mod run;
#[cfg(test)]
mod tests;

pub use hook::run_hook;
pub use run::run;
