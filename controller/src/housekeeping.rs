//! The controller's periodic chores: each site re-evaluated every second (a site goes `down`
//! by silence), disk-full transfer alarms, and history, acknowledgements and the audit log
//! pruned hourly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::{Core, now_ms, sites};

/// Re-evaluates every site each second (a site goes `down` by silence, not by a message).
pub async fn tick_loop(core: Arc<Core>) {
    let mut paused = BTreeSet::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        let events = core.sites.tick(now_ms());
        core.record_alarms(events);
        paused = transfer_alarms(&core, paused);
    }
}

/// Raises `transfer-paused` on the sites with a transfer paused because their disk is full,
/// and clears it where none is any more. Returns the sites now paused.
fn transfer_alarms(core: &Core, before: BTreeSet<String>) -> BTreeSet<String> {
    let now: BTreeMap<String, String> = core.outbox.paused_on_full_disk();
    let t = now_ms();
    for (site, detail) in &now {
        let ev = core.sites.set_external(
            site,
            sites::Condition::TransferPaused,
            Some(detail.clone()),
            t,
        );
        core.record_alarms(ev);
    }
    for site in before.iter().filter(|s| !now.contains_key(*s)) {
        let ev = core
            .sites
            .set_external(site, sites::Condition::TransferPaused, None, t);
        core.record_alarms(ev);
    }
    now.into_keys().collect()
}

/// Deletes history (whole segments sealed before the cutoff) and device events older than the
/// retention, hourly.
pub async fn prune_loop(core: Arc<Core>) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        let cutoff = now_ms() - i64::from(core.config.history_days) * 86_400_000;
        let store = core.store.clone();
        match tokio::task::spawn_blocking(move || store.prune_history(cutoff)).await {
            Ok(Ok(n)) if n > 0 => info!(removed = n, "Pruned history segments beyond retention."),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn!(%error, "Pruning history segments failed."),
            Err(error) => warn!(%error, "Pruning history segments failed."),
        }
        let mut removed = 0;
        for rec in core.registry.list() {
            match core.store.prune(&rec.site_id, cutoff) {
                Ok(n) => removed += n,
                Err(error) => warn!(%error, site = %rec.site_id, "Pruning device events failed."),
            }
            tokio::task::yield_now().await;
        }
        if removed > 0 {
            info!(removed, "Pruned device events beyond retention.");
        }
        if let Err(error) = core.acks.prune(cutoff) {
            warn!(%error, "Pruning alarm acknowledgements failed.");
        }
        let days = core.config.console.audit_days;
        if days > 0 {
            match core.audit.prune(now_ms() - i64::from(days) * 86_400_000) {
                Ok(n) if n > 0 => info!(removed = n, "Pruned the audit log beyond audit_days."),
                Ok(_) => {}
                Err(error) => warn!(%error, "Pruning the audit log failed."),
            }
        }
    }
}
