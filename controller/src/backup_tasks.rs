//! The controller's backup work, started with it: partner copies placed as sites' files
//! arrive, its own repositories shipped, its own jobs run (each under a lease), sites' runs
//! granted their leases, and [`backup_loop`]: results taken in, jobs pushed, alarms raised.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::warn;

use crate::{Core, leases, now_ms, sites};

/// Starts the backup tasks; returns their handles.
pub fn start(core: &Arc<Core>, db: &sled::Db) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    {
        // Sites' runs take their repositories' leases here (the key was checked: their own).
        let leases = core.backups.leases.clone();
        core.inbox
            .on_lease(Arc::new(move |_site, l| leases.grant(l, now_ms())));
    }
    let mut tasks = vec![
        // Sites' backup repositories arrive in inbox/<site>/ and are kept in
        // data_dir/backups/<site>/<repo>/.
        tokio::spawn(
            tiandi_backup::partner::Placement {
                inbox: core.config.data_dir.join("inbox"),
                peer: None,
                backups: core.config.data_dir.join("backups"),
                hold: Duration::from_secs(u64::from(core.config.backup_trash_days) * 86_400),
            }
            .run(core.cancel.clone()),
        ),
    ];
    // The controller's own repositories (`backup_repos`, and the jobs it runs itself) go
    // to partner sites in the backup class; sites' jobs are pushed to them, their results
    // taken in, their alarms raised (`backup_loop`).
    let shipper = Arc::new(
        tiandi_backup::partner::Shipper::new(
            core.outbox.clone(),
            db.open_tree("backup-ship")?,
            &core.config.data_dir.join("backup-ship"),
            core.config.backup_repos.clone(),
        )
        .context("starting backup shipping (backup_repos)")?,
    );
    tasks.push(tokio::spawn(shipper.clone().run(
        Duration::from_secs(1),
        Some(core.config.data_dir.join("backup-ship").join("status.json")),
        core.cancel.clone(),
    )));
    let own_jobs = tiandi_backup::job::Jobs::new(now_ms(), core.backups.jobs().to_vec());
    if own_jobs
        .for_site(tiandi_backup::job::CONTROLLER)
        .next()
        .is_some()
    {
        let backups = core.backups.clone();
        let scheduler = tiandi_backup::scheduler::Scheduler::new(
            tiandi_backup::job::CONTROLLER,
            &core.config.data_dir.join("backup"),
            db.open_tree("backup-jobs")?,
            shipper,
            Box::new(move |r| backups.record(r).map_err(|e| e.to_string())),
        )
        .map_err(anyhow::Error::msg)
        .context("starting the backup scheduler")?;
        scheduler.set_leases(Arc::new(leases::Local(core.backups.leases.clone())));
        scheduler
            .set_jobs(own_jobs)
            .context("the controller's own backup jobs")?;
        tasks.push(tokio::spawn(scheduler.run(
            None,
            Some(core.config.data_dir.join("backup").join("status.json")),
            core.cancel.clone(),
        )));
    }
    tasks.push(tokio::spawn(backup_loop(core.clone())));
    Ok(tasks)
}

/// Backups: sites' results taken in every two seconds; every thirty, jobs pushed where they
/// changed, and each site's backup alarms raised or cleared.
async fn backup_loop(core: Arc<Core>) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    let mut raised: BTreeMap<String, BTreeSet<sites::Condition>> = BTreeMap::new();
    // The partner copies' checks read every pack: on a thread of their own, one at a time.
    let checking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        let c = core.clone();
        let took = tokio::task::spawn_blocking(move || c.backups.take_results().len())
            .await
            .unwrap_or(0);
        n += 1;
        if took == 0 && n % 15 != 1 {
            continue;
        }
        if !checking.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let (c, flag) = (core.clone(), checking.clone());
            tokio::task::spawn_blocking(move || {
                c.backups.partner_checks(now_ms());
                flag.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let c = core.clone();
        let conds = tokio::task::spawn_blocking(move || {
            if let Err(e) = c.backups.push(&c.outbox) {
                warn!(error = %e, "Pushing backup jobs failed.");
            }
            let sites = c.sites.clone();
            let statuses = c.backups.status(now_ms(), &|s| {
                sites
                    .with_site(s, |x| x.province.clone())
                    .unwrap_or_default()
            });
            c.metrics.set_backups(&statuses);
            c.backups.conditions(&statuses)
        })
        .await
        .unwrap_or_default();
        let t = now_ms();
        for (site, now) in &conds {
            let before = raised.remove(site).unwrap_or_default();
            for cond in [
                sites::Condition::BackupFailed,
                sites::Condition::BackupOverdue,
                sites::Condition::BackupCheckFailed,
                sites::Condition::BackupNearQuota,
            ] {
                let detail = now.get(&cond).cloned();
                if detail.is_none() && !before.contains(&cond) {
                    continue;
                }
                let ev = core.sites.set_external(site, cond, detail, t);
                core.record_alarms(ev);
            }
        }
        raised = conds
            .into_iter()
            .map(|(s, c)| (s, c.into_keys().collect()))
            .collect();
    }
}
