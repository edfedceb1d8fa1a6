//! The drivers: per destination and priority class, send the next job over the connection,
//! write its progress back every second, and record how it ended.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{CLASSES, Job, JobState, Next, Outbox};
use crate::send::{Progress, SendOptions, SendOutcome, send_file};
use crate::{TransferError, now_ms};

/// Sends `dest`'s queued transfers over `conn` until `cancel` fires or the connection breaks.
/// A driver per priority class, so an alarm transfer never waits behind a bulk one (its
/// stream has the higher priority on the shared connection); within a class one transfer
/// sends at a time, the next one's offer overlapping the last one's tail ([`LOOKAHEAD`]).
pub async fn drive(
    outbox: Arc<Outbox>,
    conn: quinn::Connection,
    dest: String,
    origin: String,
    cancel: CancellationToken,
) {
    drive_routed(outbox, conn, dest, origin, cancel, ClassRoute::all()).await
}

/// Which priority classes a connection carries now, and a signal when that may change: a
/// dual-homed site's transfers of each class follow the path chosen for that class.
#[derive(Clone)]
pub struct ClassRoute {
    carries: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
}

impl ClassRoute {
    /// Every class, always (a site with one path).
    pub fn all() -> ClassRoute {
        ClassRoute {
            carries: Arc::new(|_| true),
            changes: None,
        }
    }

    /// The classes `carries` says (called with a class's name, [`CLASSES`]), looked at again
    /// whenever `changes` changes.
    pub fn new(
        carries: impl Fn(&str) -> bool + Send + Sync + 'static,
        changes: tokio::sync::watch::Receiver<u64>,
    ) -> ClassRoute {
        ClassRoute {
            carries: Arc::new(carries),
            changes: Some(changes),
        }
    }

    async fn changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
        match changes {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// [`drive`], each class only while `route` gives it to this connection: a class taken away
/// stops its transfer in flight (it resumes on the connection that gets the class, from what
/// the receiver holds), a class given starts its driver.
pub async fn drive_routed(
    outbox: Arc<Outbox>,
    conn: quinn::Connection,
    dest: String,
    origin: String,
    cancel: CancellationToken,
    route: ClassRoute,
) {
    // Most connected sites have nothing queued: one small task waits for a site's first job
    // before its four class drivers start (~6 KB per connected site, 120 MB at 20,000 sites;
    // issue 22), and they stop again once the site has had nothing unfinished for a minute
    // or two (a job queued meanwhile wakes the waiter, which starts them again).
    let waker = outbox.waker(&dest);
    loop {
        loop {
            let changed = waker.notified();
            match outbox.has_unfinished(&dest) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "Outbox unreadable; starting the drivers.");
                    break;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = conn.closed() => return,
                _ = changed => {}
                _ = tokio::time::sleep(IDLE_RECHECK) => {}
            }
        }
        let drivers = cancel.child_token();
        let classes = spawn_classes(&outbox, &conn, &dest, &origin, &drivers, &route);
        let mut every = tokio::time::interval(DRIVERS_IDLE_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        let mut idle = 0;
        let ended = loop {
            tokio::select! {
                _ = cancel.cancelled() => break true,
                _ = conn.closed() => break true,
                _ = every.tick() => {
                    idle = if matches!(outbox.has_unfinished(&dest), Ok(false)) { idle + 1 } else { 0 };
                    if idle >= 2 {
                        break false;
                    }
                }
            }
        };
        drivers.cancel();
        for c in classes {
            let _ = c.await;
        }
        if ended {
            return;
        }
        debug!("Nothing left to send to this site: its class drivers stop until the next job.");
    }
}

/// Each class's driver on `conn`, while `route` gives the class to it.
fn spawn_classes(
    outbox: &Arc<Outbox>,
    conn: &quinn::Connection,
    dest: &str,
    origin: &str,
    cancel: &CancellationToken,
    route: &ClassRoute,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut classes = Vec::new();
    for class in CLASSES {
        let (outbox, conn, dest, origin, cancel, route) = (
            outbox.clone(),
            conn.clone(),
            dest.to_string(),
            origin.to_string(),
            cancel.clone(),
            route.clone(),
        );
        classes.push(tokio::spawn(async move {
            let mut changes = route.changes.clone();
            loop {
                if cancel.is_cancelled() || conn.close_reason().is_some() {
                    return;
                }
                if !(route.carries)(class) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = conn.closed() => return,
                        _ = ClassRoute::changed(&mut changes) => continue,
                    }
                }
                let run = cancel.child_token();
                let driving = drive_class(&outbox, &conn, &dest, &origin, class, &run);
                tokio::pin!(driving);
                loop {
                    tokio::select! {
                        _ = &mut driving => return,
                        _ = ClassRoute::changed(&mut changes) => {
                            if !(route.carries)(class) {
                                info!(class, "This class's transfers move to another path.");
                                run.cancel();
                                (&mut driving).await;
                                break;
                            }
                        }
                    }
                }
            }
        }));
    }
    classes
}

/// How often a site's running class drivers look whether it still has anything unfinished
/// (two looks in a row with nothing stop them).
const DRIVERS_IDLE_CHECK: Duration = Duration::from_secs(60);
/// An idle driver with nothing scheduled still looks again this often (a safety net: every
/// change to a job signals its destination's waker).
const IDLE_RECHECK: Duration = Duration::from_secs(600);
/// After a transfer broke off on a connection that is still up, the class tries again after
/// this long.
const RETRY_ON_LIVE_CONNECTION: Duration = Duration::from_secs(2);

/// Transfers of one class under way on one connection, at most. The next starts only once
/// every one before it has handed all its chunks to QUIC, so data still leaves in order; what
/// overlaps is the tail of one (its last acknowledgements, the receiver's whole-file check,
/// the receipt) with the offer and `Have` of the next, two round trips that would otherwise
/// leave a GEO link idle for each file: a backup's 16 MiB packs went out at 0.79 of a 20
/// Mbit/s, 600 ms link one after the other.
const LOOKAHEAD: usize = 2;
/// How often a driver with a transfer that has not handed all its chunks yet looks whether
/// it has (an atomic load).
const HANDED_POLL: Duration = Duration::from_millis(100);

struct Running {
    id: String,
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<Result<(), TransferError>>,
}

async fn drive_class(
    outbox: &Arc<Outbox>,
    conn: &quinn::Connection,
    dest: &str,
    origin: &str,
    class: &str,
    cancel: &CancellationToken,
) {
    let waker = outbox.waker(dest);
    // Signalled by each transfer as it ends (a permit is kept if nobody waits yet).
    let ended = Arc::new(tokio::sync::Notify::new());
    let mut running: Vec<Running> = Vec::new();
    loop {
        // Registered before the look, so a job queued during it wakes this driver.
        let changed = waker.notified();
        // Take in the transfers that ended.
        let mut broke = false;
        let mut k = 0;
        while k < running.len() {
            if !running[k].task.is_finished() {
                k += 1;
                continue;
            }
            let r = running.remove(k);
            if let Ok(Err(e)) = r.task.await
                && e.is_transient()
                && !matches!(e, TransferError::Paused { .. })
            {
                broke = true;
            }
        }
        if broke {
            if conn.close_reason().is_some() {
                finish(running).await;
                return;
            }
            if running.is_empty() {
                // The connection lives on (a stall across a link cut shorter than its idle
                // timeout, a reset stream): try again shortly, from what the receiver holds,
                // instead of leaving this class idle until the next connection.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = conn.closed() => return,
                    _ = tokio::time::sleep(RETRY_ON_LIVE_CONNECTION) => {}
                }
                continue;
            }
        }
        let room = running.len() < LOOKAHEAD
            && running
                .iter()
                .all(|r| r.progress.handed.load(Ordering::Relaxed));
        let mut wait = IDLE_RECHECK;
        if room && !broke {
            let ids: Vec<String> = running.iter().map(|r| r.id.clone()).collect();
            match outbox.next_for_except(dest, class, &ids) {
                Ok(Next::Send(job)) => {
                    let progress = Arc::new(Progress::default());
                    let (outbox, conn, origin, cancel, ended, p) = (
                        outbox.clone(),
                        conn.clone(),
                        origin.to_string(),
                        cancel.clone(),
                        ended.clone(),
                        progress.clone(),
                    );
                    let id = job.id.clone();
                    let task = tokio::spawn(
                        async move {
                            let mut job = *job;
                            let r = run_job(&outbox, &conn, &mut job, &origin, &cancel, p).await;
                            ended.notify_one();
                            r
                        }
                        .in_current_span(),
                    );
                    running.push(Running { id, progress, task });
                    continue;
                }
                Ok(Next::Wait(at)) => {
                    wait = at.map_or(IDLE_RECHECK, |t| {
                        Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0))
                            .min(IDLE_RECHECK)
                    });
                }
                Err(e) => {
                    warn!(error = %e, "Outbox unreadable.");
                    wait = Duration::from_secs(5);
                }
            }
        }
        if running
            .iter()
            .any(|r| !r.progress.handed.load(Ordering::Relaxed))
        {
            wait = wait.min(HANDED_POLL);
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                finish(running).await;
                return;
            }
            _ = conn.closed() => {
                finish(running).await;
                return;
            }
            _ = changed => {}
            _ = ended.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Waits for the transfers still under way (they end with the connection or the stop).
async fn finish(running: Vec<Running>) {
    for r in running {
        let _ = r.task.await;
    }
}

async fn run_job(
    outbox: &Arc<Outbox>,
    conn: &quinn::Connection,
    job: &mut Job,
    origin: &str,
    cancel: &CancellationToken,
    progress: Arc<Progress>,
) -> Result<(), TransferError> {
    progress
        .acked_bytes
        .store(job.acked_bytes, Ordering::Relaxed);
    let opts = SendOptions {
        priority: job.priority,
        rate_limit_bps: job.rate_limit_bps,
        origin: if job.origin.is_empty() {
            origin.to_string()
        } else {
            job.origin.clone()
        },
        transfer_id: job.id.clone(),
        forward_to: job.forward_to.clone(),
        fresh: job.attempts == 0 && !outbox.offered_before(job)?,
        ..SendOptions::default()
    };
    if job.manifest.chunks.is_empty() && job.manifest.size > 0 {
        job.manifest = outbox.manifest(&job.manifest.id_hex())?;
    }
    job.attempts += 1;
    job.state = JobState::Sending;
    job.error = None;
    job.pause_code = 0;
    job.updated_ms = now_ms();
    outbox.save(job).await?;
    let sent_before = job.sent_bytes;
    // Progress is written back every second while the transfer runs.
    let saver = {
        let (outbox, progress, mut snapshot) = (outbox.clone(), progress.clone(), job.clone());
        tokio::spawn(async move {
            let mut last = (std::time::Instant::now(), snapshot.acked_bytes);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if progress.accepted.load(Ordering::Relaxed) {
                    // The receiver took the offer: whatever paused it is over.
                    outbox.note_disk_full(&snapshot, None);
                }
                let acked = progress.acked_bytes.load(Ordering::Relaxed);
                let dt = last.0.elapsed().as_secs_f64().max(1e-3);
                let rate = ((acked.saturating_sub(last.1)) as f64 * 8.0 / dt) as u64;
                snapshot.rate_bps = (snapshot.rate_bps + rate) / 2;
                last = (std::time::Instant::now(), acked);
                snapshot.acked_bytes = acked;
                snapshot.sent_bytes = sent_before + progress.sent_bytes.load(Ordering::Relaxed);
                snapshot.updated_ms = now_ms();
                let _ = outbox.save(&snapshot).await;
            }
        })
    };
    let window = job.window;
    let (held_by, class) = (outbox.clone(), job.priority);
    let pause =
        move || window.is_some_and(|w| !w.contains(now_ms())) || held_by.held(class).is_some();
    let result = tokio::select! {
        r = send_file(conn, &job.source, &job.manifest, &opts, &progress, &pause) => r,
        _ = cancel.cancelled() => Err(TransferError::Stream("stopping".into())),
    };
    saver.abort();
    job.acked_bytes = progress.acked_bytes.load(Ordering::Relaxed);
    job.sent_bytes = sent_before + progress.sent_bytes.load(Ordering::Relaxed);
    job.updated_ms = now_ms();
    job.rate_bps = 0;
    let out = match result {
        Ok(SendOutcome::Delivered(receipt)) => {
            outbox.note_disk_full(job, None);
            info!(transfer = %job.id, dest = %job.dest, path = %receipt.path, "Delivered and verified.");
            job.acked_bytes = job.manifest.size;
            job.state = JobState::Delivered;
            job.receipt = Some(receipt);
            Ok(())
        }
        Ok(SendOutcome::Paused) => {
            job.state = JobState::Paused;
            job.error = Some(
                outbox
                    .held(job.priority)
                    .unwrap_or_else(|| "outside its time window".into()),
            );
            Ok(())
        }
        Err(TransferError::Paused {
            message,
            retry_after_ms,
            code,
        }) => {
            warn!(transfer = %job.id, %message, "Receiver asks to pause.");
            job.state = JobState::Paused;
            job.pause_code = code;
            if code == crate::transfer_wire::codes::DISK_FULL {
                outbox.note_disk_full(job, Some(format!("{}: {message}", job.manifest.name)));
            }
            job.retry_at_ms = now_ms() + retry_after_ms as i64;
            job.error = Some(message.clone());
            Err(TransferError::Paused {
                code,
                message,
                retry_after_ms,
            })
        }
        Err(e) if e.is_transient() => {
            job.state = JobState::Queued;
            job.error = Some(e.to_string());
            Err(e)
        }
        Err(e) => {
            warn!(transfer = %job.id, error = %e, "Transfer failed.");
            job.state = JobState::Failed;
            job.error = Some(e.to_string());
            Err(e)
        }
    };
    outbox.save(job).await?;
    out
}
