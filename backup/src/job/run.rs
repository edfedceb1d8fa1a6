//! One run of a job: a backup with its hooks, retention and prune; a verify; a drill.

use super::hook::*;
use super::*;
use crate::backend::dir_bytes;

/// The passphrase: the first line of a file of mode 0600.
pub(super) fn read_secret(f: &Path) -> Result<Vec<u8>, String> {
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

/// The message of a panic.
pub(super) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// `f`, with a panic turned into an error: a run always ends with a result, and a post-hook
/// always runs.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(format!("internal error: {}", panic_text(&*p))))
}

/// What a run needs besides the job.
pub(super) struct Ctx<'a> {
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

pub(super) fn run_with(
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
pub(super) fn with_hooks(
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
