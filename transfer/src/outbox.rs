//! The persistent outbox: transfers queued per destination (sled), and the driver that sends
//! a destination's transfers over its connection, highest priority first, within each
//! transfer's time window and rate limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::send::{Progress, SendOptions, SendOutcome, send_file};
use crate::{Manifest, Receipt, TransferError, now_ms};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Queued,
    Sending,
    /// Waiting: outside its window, or the receiver asked to pause (disk full).
    Paused,
    Delivered,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Sending => "sending",
            JobState::Paused => "paused",
            JobState::Delivered => "delivered",
            JobState::Failed => "failed",
        }
    }
}

/// A daily time window `HH:MM-HH:MM`, in UTC or, with an offset after it, in that zone's
/// local time (`22:00-06:00+08:00`: China Standard Time, which has no daylight saving); it
/// may wrap past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub start_min: u16,
    pub end_min: u16,
    /// Minutes east of UTC of the clock the window is written in (jobs stored before offsets
    /// existed have none: UTC).
    #[serde(default)]
    pub utc_offset_min: i16,
}

impl std::str::FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Window, String> {
        let parse = |t: &str| -> Result<u16, String> {
            let (h, m) = t
                .split_once(':')
                .ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
                m.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
            );
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let form =
            || format!("window {s:?} is not HH:MM-HH:MM (or HH:MM-HH:MM+HH:MM, with a UTC offset)");
        let (a, rest) = s.trim().split_once('-').ok_or_else(form)?;
        // The end time, then the offset if any: `06:00`, `06:00Z`, `06:00+08:00`, `06:00-05:00`.
        let (b, offset) = match rest.find(['+', '-', 'Z']) {
            None => (rest, 0),
            Some(i) => {
                let (b, o) = rest.split_at(i);
                let offset = match o {
                    "Z" => 0,
                    _ => {
                        let sign = if o.starts_with('-') { -1 } else { 1 };
                        let m = parse(&o[1..]).map_err(|_| {
                            format!("window {s:?}: offset {o:?} is not +HH:MM or -HH:MM")
                        })?;
                        if m > 14 * 60 {
                            return Err(format!("window {s:?}: offset {o:?} is beyond ±14:00"));
                        }
                        sign * m as i16
                    }
                };
                (b, offset)
            }
        };
        Ok(Window {
            start_min: parse(a.trim())?,
            end_min: parse(b.trim())?,
            utc_offset_min: offset,
        })
    }
}

impl Window {
    /// `ms` (Unix time) on the window's clock.
    fn local(&self, ms: i64) -> i64 {
        ms + i64::from(self.utc_offset_min) * 60_000
    }

    /// Whether `ms` (Unix time) falls in the window.
    pub fn contains(&self, ms: i64) -> bool {
        let m = (self.local(ms).div_euclid(60_000).rem_euclid(1440)) as u16;
        if self.start_min <= self.end_min {
            (self.start_min..self.end_min).contains(&m)
        } else {
            m >= self.start_min || m < self.end_min
        }
    }

    /// The first instant at or after `ms` inside the window (`None` for an empty window).
    pub fn next_open(&self, ms: i64) -> Option<i64> {
        if self.contains(ms) {
            return Some(ms);
        }
        if self.start_min == self.end_min {
            return None;
        }
        let local = self.local(ms);
        let day = local.div_euclid(86_400_000) * 86_400_000;
        let start = day + i64::from(self.start_min) * 60_000;
        let open = if start > local {
            start
        } else {
            start + 86_400_000
        };
        Some(open - (local - ms))
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: String,
    /// The receiving node (a site ID, or "controller").
    pub dest: String,
    pub source: PathBuf,
    /// Stored as its head; the chunk hashes are stored once per file ([`Outbox::manifest`])
    /// and attached when the job runs.
    #[serde(with = "crate::manifest::head")]
    pub manifest: Manifest,
    /// alarm, normal or bulk.
    pub priority: String,
    pub rate_limit_bps: Option<u64>,
    pub window: Option<Window>,
    pub forward_to: Vec<String>,
    pub origin: String,
    pub state: JobState,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub acked_bytes: u64,
    pub sent_bytes: u64,
    /// Recent rate of acknowledged bytes (bit/s) while sending.
    pub rate_bps: u64,
    pub attempts: u64,
    /// Not before this time (a paused receiver's retry-after).
    pub retry_at_ms: i64,
    pub receipt: Option<Receipt>,
    pub error: Option<String>,
    /// Why the receiver paused it (a [`crate::wire::codes`] value; 0: not paused by it).
    #[serde(default)]
    pub pause_code: u32,
    /// Delivered by this relay, not sent from here: the job only tracks what the relay
    /// reports ([`Outbox::apply_forwarded`]).
    #[serde(default)]
    pub via: Option<String>,
    /// A relay's copy toward a site below it: its progress is reported upstream.
    #[serde(default)]
    pub forwarded: bool,
}

impl Job {
    pub fn new(id: &str, dest: &str, source: PathBuf, manifest: Manifest) -> Job {
        let now = now_ms();
        Job {
            id: id.into(),
            dest: dest.into(),
            source,
            manifest,
            priority: "normal".into(),
            rate_limit_bps: None,
            window: None,
            forward_to: Vec::new(),
            origin: String::new(),
            state: JobState::Queued,
            created_ms: now,
            updated_ms: now,
            acked_bytes: 0,
            sent_bytes: 0,
            rate_bps: 0,
            attempts: 0,
            retry_at_ms: 0,
            receipt: None,
            error: None,
            pause_code: 0,
            via: None,
            forwarded: false,
        }
    }

    fn rank(&self) -> u8 {
        match self.priority.as_str() {
            "alarm" => 0,
            "bulk" => 2,
            _ => 1,
        }
    }

    /// The driver class that sends it: alarm, bulk, or normal (anything else).
    pub fn class(&self) -> &'static str {
        CLASSES[usize::from(self.rank())]
    }

    /// Seconds left at the recent rate.
    pub fn eta_s(&self) -> Option<u64> {
        (self.rate_bps > 0).then(|| {
            (self.manifest.size.saturating_sub(self.acked_bytes) * 8) / self.rate_bps.max(1)
        })
    }

    /// The job as the API, the CLIs and the agent's `status.json` show it.
    pub fn status(&self) -> serde_json::Value {
        let size = self.manifest.size;
        serde_json::json!({
            "id": self.id,
            "dest": self.dest,
            "file": self.manifest.name,
            "bytes": size,
            "priority": self.priority,
            "state": self.state,
            "acked_bytes": self.acked_bytes,
            "progress_pct": if size == 0 { 100.0 } else { self.acked_bytes as f64 * 100.0 / size as f64 },
            "rate_bps": self.rate_bps,
            "eta_s": self.eta_s(),
            "sent_bytes": self.sent_bytes,
            "attempts": self.attempts,
            "window": self.window.map(|w| format!("{:02}:{:02}-{:02}:{:02}", w.start_min / 60, w.start_min % 60, w.end_min / 60, w.end_min % 60)),
            "rate_limit_bps": self.rate_limit_bps,
            "error": self.error,
            "receipt": self.receipt,
            "via": self.via,
            "relays_to": self.forward_to,
            "forwarded": self.forwarded,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        })
    }

    pub fn finished(&self) -> bool {
        matches!(self.state, JobState::Delivered | JobState::Failed)
    }

    /// When it may next be sent, not before `now`: `None` if never from here (finished, sent
    /// by a relay, or an empty window).
    fn runnable_at(&self, now: i64) -> Option<i64> {
        if self.via.is_some() || self.finished() {
            return None;
        }
        let from = self.retry_at_ms.max(now);
        match self.window {
            Some(w) => w.next_open(from),
            None => Some(from),
        }
    }
}

/// The driver classes, in rank order: one transfer of each runs at a time per destination.
pub const CLASSES: [&str; 3] = ["alarm", "normal", "bulk"];

/// What a destination's class driver does next ([`Outbox::next_for`]).
#[derive(Debug)]
pub enum Next {
    Send(Box<Job>),
    /// Nothing to send now: wake at this time (a window opening, a retry due), or when a job
    /// for the destination changes ([`Outbox::waker`]).
    Wait(Option<i64>),
}

/// Layout of an outbox's tree: `j/<dest>/<id>` → a job (JSON, without chunk hashes),
/// `m/<file hash>` → the file's whole manifest ([`crate::manifest::encode`]), once per file.
pub struct Outbox {
    tree: sled::Tree,
    /// Per destination, signalled when one of its jobs is queued or changes. Drivers wait on
    /// their own destination's only: with thousands of connected sites, a shared signal (or a
    /// polling timer) woke every idle driver for each change.
    wakers: std::sync::Mutex<std::collections::HashMap<String, Arc<Notify>>>,
    /// Jobs paused because their receiver's disk is full: (destination, job) → why. Kept in
    /// memory so alarms need no scan of the outbox (a paused job re-enters it at its next
    /// attempt after a restart).
    disk_full: std::sync::Mutex<std::collections::BTreeMap<(String, String), String>>,
    /// Held while a manifest is stored for a new job or removed as unused ([`Outbox::expire`]):
    /// a job is never queued on a manifest being removed.
    manifests: std::sync::Mutex<()>,
}

/// A finished job (delivered or failed) stays listed this long after its last change; then
/// it goes, and its file's manifest once no job needs it. Longer than the inbox's
/// [`crate::inbox::KEEP_COMPLETE`]: a relay queues forwarding for every complete file it
/// holds without a forwarding job ([`crate::relay::forward_completed`]), so it must forget
/// the file before the jobs.
pub const KEEP_FINISHED: std::time::Duration = std::time::Duration::from_secs(45 * 86_400);

impl Outbox {
    pub fn new(tree: sled::Tree) -> Arc<Outbox> {
        Arc::new(Outbox {
            tree,
            wakers: Default::default(),
            disk_full: Default::default(),
            manifests: Default::default(),
        })
    }

    /// Removes jobs finished more than `keep` before `now_ms`, then the manifests no job
    /// needs. Returns how many jobs went.
    pub fn expire(&self, now_ms: i64, keep: std::time::Duration) -> Result<usize, TransferError> {
        let _m = self.manifests.lock().expect("outbox lock poisoned");
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let mut removed = 0;
        let mut needed = std::collections::HashSet::new();
        for job in self.list()? {
            if job.finished() && now_ms.saturating_sub(job.updated_ms) > keep_ms {
                self.tree.remove(Self::job_key(&job.dest, &job.id))?;
                removed += 1;
            } else {
                needed.insert(job.manifest.id_hex());
            }
        }
        let mut unused = Vec::new();
        for kv in self.tree.scan_prefix(b"m/") {
            let (key, _) = kv?;
            if !needed.contains(String::from_utf8_lossy(&key[2..]).as_ref()) {
                unused.push(key);
            }
        }
        for key in &unused {
            self.tree.remove(key)?;
        }
        if removed > 0 || !unused.is_empty() {
            self.tree.flush()?;
        }
        Ok(removed)
    }

    fn job_key(dest: &str, id: &str) -> Vec<u8> {
        format!("j/{dest}/{id}").into_bytes()
    }

    pub fn put(&self, job: &Job) -> Result<(), TransferError> {
        self.tree.insert(
            Self::job_key(&job.dest, &job.id),
            serde_json::to_vec(job).expect("job serialises"),
        )?;
        self.tree.flush()?;
        self.notify(&job.dest);
        Ok(())
    }

    /// The signal `dest`'s drivers wait on. Create its `notified()` future before looking for
    /// work ([`Outbox::next_for`]), so a job queued in between is not missed.
    pub fn waker(&self, dest: &str) -> Arc<Notify> {
        self.wakers
            .lock()
            .expect("outbox lock poisoned")
            .entry(dest.to_string())
            .or_default()
            .clone()
    }

    fn notify(&self, dest: &str) {
        let waker = self
            .wakers
            .lock()
            .expect("outbox lock poisoned")
            .get(dest)
            .cloned();
        if let Some(w) = waker {
            w.notify_waiters();
        }
    }

    /// The whole manifest (with chunk hashes) of the file with this hash.
    pub fn manifest(&self, file_hash_hex: &str) -> Result<Manifest, TransferError> {
        match self.tree.get(format!("m/{file_hash_hex}"))? {
            Some(b) => crate::manifest::decode(&b),
            None => Err(TransferError::Protocol(format!(
                "no manifest stored for {file_hash_hex}"
            ))),
        }
    }

    /// [`Outbox::put`] without blocking an async worker on the flush (the controller runs its
    /// sessions on one: a flush stuck behind a busy disk would hold up every site's reports).
    pub async fn save(&self, job: &Job) -> Result<(), TransferError> {
        self.tree.insert(
            Self::job_key(&job.dest, &job.id),
            serde_json::to_vec(job).expect("job serialises"),
        )?;
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Queues `job`, whose manifest must carry its chunk hashes (stored once per file).
    pub fn enqueue(&self, job: Job) -> Result<(), TransferError> {
        let _m = self.manifests.lock().expect("outbox lock poisoned");
        let mkey = format!("m/{}", job.manifest.id_hex());
        if !self.tree.contains_key(&mkey)? {
            job.manifest.validate()?;
            self.tree
                .insert(mkey, crate::manifest::encode(&job.manifest))?;
        }
        self.put(&job)?;
        info!(transfer = %job.id, dest = %job.dest, name = %job.manifest.name, bytes = job.manifest.size, priority = %job.priority, "Transfer queued.");
        Ok(())
    }

    /// A job (its manifest without chunk hashes).
    pub fn get(&self, dest: &str, id: &str) -> Result<Option<Job>, TransferError> {
        Ok(self
            .tree
            .get(Self::job_key(dest, id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Applies what relay `relay` reports of its copies toward the sites below it, to the jobs
    /// here that go through it (a relay reports only on its own jobs: others are ignored).
    /// Returns how many jobs changed.
    pub fn apply_forwarded(
        &self,
        relay: &str,
        items: &[crate::wire::ForwardStatus],
    ) -> Result<usize, TransferError> {
        let mut changed = 0;
        let jobs = self.list()?;
        for item in items {
            for mut job in jobs
                .iter()
                .filter(|j| {
                    j.via.as_deref() == Some(relay)
                        && j.dest == item.site
                        && j.manifest.id_hex() == item.file_hash
                        && !j.finished()
                })
                .cloned()
            {
                job.state = match item.state.as_str() {
                    "queued" => JobState::Queued,
                    "sending" => JobState::Sending,
                    "paused" => JobState::Paused,
                    "delivered" => JobState::Delivered,
                    "failed" => JobState::Failed,
                    _ => continue,
                };
                job.acked_bytes = item.acked_bytes.min(job.manifest.size);
                job.sent_bytes = item.sent_bytes;
                job.rate_bps = item.rate_bps;
                job.attempts = item.attempts;
                job.error = (!item.error.is_empty()).then(|| item.error.clone());
                job.receipt = item.receipt.clone();
                job.pause_code = item.pause_code;
                // A site below whose disk is full raises the same alarm here as one served
                // directly.
                let full = job.state == JobState::Paused
                    && item.pause_code == crate::wire::codes::DISK_FULL;
                self.note_disk_full(
                    &job,
                    full.then(|| format!("{}: {}", job.manifest.name, item.error)),
                );
                job.updated_ms = now_ms();
                self.put(&job)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Every job (manifests without chunk hashes), oldest first.
    pub fn list(&self) -> Result<Vec<Job>, TransferError> {
        self.scan(b"j/")
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Job>, TransferError> {
        let mut v: Vec<Job> = Vec::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (_, val) = kv?;
            match serde_json::from_slice(&val) {
                Ok(j) => v.push(j),
                Err(e) => warn!(error = %e, "Unreadable outbox entry skipped."),
            }
        }
        v.sort_by_key(|j| j.created_ms);
        Ok(v)
    }

    /// Destinations with a transfer paused on a full disk, each with one reason.
    pub fn paused_on_full_disk(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for ((dest, _), why) in self.disk_full.lock().expect("outbox lock poisoned").iter() {
            out.entry(dest.clone()).or_insert_with(|| why.clone());
        }
        out
    }

    fn note_disk_full(&self, job: &Job, why: Option<String>) {
        let mut m = self.disk_full.lock().expect("outbox lock poisoned");
        let key = (job.dest.clone(), job.id.clone());
        match why {
            Some(w) => {
                m.insert(key, w);
            }
            None => {
                m.remove(&key);
            }
        }
    }

    /// The next job of `class` (see [`CLASSES`]) to send to `dest` now: the oldest runnable
    /// one; or, if none is, when one will be.
    pub fn next_for(&self, dest: &str, class: &str) -> Result<Next, TransferError> {
        let now = now_ms();
        let mut wake: Option<i64> = None;
        let mut best: Option<Job> = None;
        for j in self.scan(format!("j/{dest}/").as_bytes())? {
            if j.dest != dest || j.class() != class {
                continue;
            }
            // `scan` returns jobs oldest first: the first runnable one is the one to send.
            match j.runnable_at(now) {
                Some(t) if t > now => wake = Some(wake.map_or(t, |w| w.min(t))),
                Some(_) if best.is_none() => best = Some(j),
                _ => {}
            }
        }
        Ok(match best {
            Some(j) => Next::Send(Box::new(j)),
            None => Next::Wait(wake),
        })
    }
}

/// Sends `dest`'s queued transfers over `conn` until `cancel` fires or the connection breaks.
/// One transfer per priority class at a time, so an alarm transfer never waits behind a bulk
/// one (its stream has the higher priority on the shared connection).
pub async fn drive(
    outbox: Arc<Outbox>,
    conn: quinn::Connection,
    dest: String,
    origin: String,
    cancel: CancellationToken,
) {
    let mut classes = Vec::new();
    for class in CLASSES {
        let (outbox, conn, dest, origin, cancel) = (
            outbox.clone(),
            conn.clone(),
            dest.clone(),
            origin.clone(),
            cancel.clone(),
        );
        classes.push(tokio::spawn(async move {
            drive_class(&outbox, &conn, &dest, &origin, class, &cancel).await
        }));
    }
    for c in classes {
        let _ = c.await;
    }
}

/// An idle driver with nothing scheduled still looks again this often (a safety net: every
/// change to a job signals its destination's waker).
const IDLE_RECHECK: Duration = Duration::from_secs(600);

async fn drive_class(
    outbox: &Arc<Outbox>,
    conn: &quinn::Connection,
    dest: &str,
    origin: &str,
    class: &str,
    cancel: &CancellationToken,
) {
    let waker = outbox.waker(dest);
    loop {
        // Registered before the look, so a job queued during it wakes this driver.
        let changed = waker.notified();
        let next = outbox.next_for(dest, class).unwrap_or_else(|e| {
            warn!(error = %e, "Outbox unreadable.");
            Next::Wait(Some(now_ms() + 5_000))
        });
        let mut job = match next {
            Next::Send(job) => *job,
            Next::Wait(at) => {
                let wait = at.map_or(IDLE_RECHECK, |t| {
                    Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0))
                        .min(IDLE_RECHECK)
                });
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = conn.closed() => return,
                    _ = changed => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        match run_job(outbox, conn, &mut job, origin, cancel).await {
            Ok(()) => {}
            Err(e) if e.is_transient() && !matches!(e, TransferError::Paused { .. }) => return,
            Err(_) => {}
        }
    }
}

async fn run_job(
    outbox: &Arc<Outbox>,
    conn: &quinn::Connection,
    job: &mut Job,
    origin: &str,
    cancel: &CancellationToken,
) -> Result<(), TransferError> {
    let progress = Arc::new(Progress::default());
    progress
        .acked_bytes
        .store(job.acked_bytes, Ordering::Relaxed);
    let opts = SendOptions {
        priority: job.priority.clone(),
        rate_limit_bps: job.rate_limit_bps,
        origin: if job.origin.is_empty() {
            origin.to_string()
        } else {
            job.origin.clone()
        },
        transfer_id: job.id.clone(),
        forward_to: job.forward_to.clone(),
        fresh: job.attempts == 0,
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
    let pause = move || window.is_some_and(|w| !w.contains(now_ms()));
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
            job.error = Some("outside its time window".into());
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
            if code == crate::wire::codes::DISK_FULL {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap_midnight() {
        let w: Window = "22:00-06:00".parse().unwrap();
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000 + 20_000 * 86_400_000;
        assert!(w.contains(at(23, 0)));
        assert!(w.contains(at(2, 30)));
        assert!(!w.contains(at(6, 0)));
        assert!(!w.contains(at(12, 0)));
        let d: Window = "09:30-17:00".parse().unwrap();
        assert!(d.contains(at(9, 30)) && !d.contains(at(17, 0)));
        // When a closed window next opens: later today, or tomorrow.
        assert_eq!(w.next_open(at(12, 0)), Some(at(22, 0)));
        assert_eq!(w.next_open(at(2, 0)), Some(at(2, 0)));
        assert_eq!(d.next_open(at(17, 0)), Some(at(9, 30) + 86_400_000));
        assert_eq!(d.next_open(at(8, 0)), Some(at(9, 30)));
        let never: Window = "10:00-10:00".parse().unwrap();
        assert_eq!(never.next_open(at(8, 0)), None);
        for bad in [
            "22-06",
            "25:00-01:00",
            "10:00",
            "aa:bb-cc:dd",
            "22:00-06:00+8",
            "22:00-06:00+15:00",
            "22:00-06:00+08:00x",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        // Written without an offset, or with Z: UTC, as before offsets existed.
        assert_eq!("22:00-06:00Z".parse::<Window>(), Ok(w));
        assert_eq!(w.utc_offset_min, 0);
    }

    #[test]
    fn a_window_with_an_offset_is_in_that_zones_local_time() {
        let at = |h: i64, m: i64| (h * 60 + m) * 60_000 + 20_000 * 86_400_000;
        // 01:00–06:00 in Beijing is 17:00–22:00 UTC the day before.
        let bj: Window = "01:00-06:00+08:00".parse().unwrap();
        assert_eq!(bj.utc_offset_min, 480);
        assert!(bj.contains(at(17, 0)) && bj.contains(at(21, 59)));
        assert!(!bj.contains(at(1, 0)) && !bj.contains(at(22, 0)));
        assert_eq!(bj.next_open(at(12, 0)), Some(at(17, 0)));
        assert_eq!(bj.next_open(at(22, 0)), Some(at(17, 0) + 86_400_000));
        // West of UTC, wrapping midnight locally: 22:00–02:00 at UTC−05:00 is 03:00–07:00 UTC.
        let ny: Window = "22:00-02:00-05:00".parse().unwrap();
        assert_eq!(ny.utc_offset_min, -300);
        assert!(ny.contains(at(3, 0)) && ny.contains(at(6, 59)));
        assert!(!ny.contains(at(7, 0)) && !ny.contains(at(2, 59)));
        assert_eq!(ny.next_open(at(8, 0)), Some(at(3, 0) + 86_400_000));
        // A job stored before offsets existed reads as UTC.
        let old: Window = serde_json::from_str(r#"{"start_min":60,"end_min":360}"#).unwrap();
        assert_eq!(old.utc_offset_min, 0);
    }

    #[test]
    fn finished_jobs_go_after_a_while_and_their_manifests_once_unused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let manifest = |n: u8| Manifest {
            name: format!("f{n}"),
            size: 10,
            chunk_size: crate::manifest::MIN_CHUNK,
            file_hash: [n; 32],
            chunks: vec![[n; 32]],
        };
        let (a, b) = (manifest(1), manifest(2));
        let day = 86_400_000;
        let now = now_ms();
        // File a: delivered 50 days ago to s1, still queued for s2. File b: only a job
        // delivered 50 days ago.
        for (id, dest, m, state, age_days) in [
            ("a-s1", "s1", &a, JobState::Delivered, 50),
            ("a-s2", "s2", &a, JobState::Queued, 50),
            ("b-s1", "s1", &b, JobState::Delivered, 50),
        ] {
            ob.enqueue(Job::new(id, dest, "/x".into(), m.clone()))
                .unwrap();
            let mut j = ob.get(dest, id).unwrap().unwrap();
            j.state = state;
            j.updated_ms = now - age_days * day;
            ob.put(&j).unwrap();
        }
        let keep = KEEP_FINISHED;
        assert_eq!(ob.expire(now, keep).unwrap(), 2);
        let left: Vec<String> = ob.list().unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(left, ["a-s2"]);
        // The queued job's manifest stays whole (chunk hashes and all); the other goes.
        assert_eq!(ob.manifest(&a.id_hex()).unwrap(), a);
        assert!(ob.manifest(&b.id_hex()).is_err());
        // Recently finished: kept; nothing more to do.
        let mut j = ob.get("s2", "a-s2").unwrap().unwrap();
        j.state = JobState::Failed;
        j.updated_ms = now - day;
        ob.put(&j).unwrap();
        assert_eq!(ob.expire(now, keep).unwrap(), 0);
        assert_eq!(ob.list().unwrap().len(), 1);
        // A file queued again after its manifest went is stored again.
        ob.enqueue(Job::new("b-s3", "s3", "/x".into(), b.clone()))
            .unwrap();
        assert_eq!(ob.manifest(&b.id_hex()).unwrap(), b);
    }

    #[test]
    fn a_relay_updates_only_the_jobs_that_go_through_it() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let m = Manifest {
            name: "f".into(),
            size: 10,
            chunk_size: crate::manifest::MIN_CHUNK,
            file_hash: [3; 32],
            chunks: vec![[0; 32]],
        };
        let mut via = Job::new("t-c1", "c1", "/x".into(), m.clone());
        via.via = Some("relay-a".into());
        let direct = Job::new("t-c2", "c2", "/x".into(), m.clone());
        ob.enqueue(via).unwrap();
        ob.enqueue(direct).unwrap();
        // The tracking job is never sent from here.
        assert!(matches!(
            ob.next_for("c1", "normal").unwrap(),
            Next::Wait(None)
        ));
        let item = |site: &str, state: &str, code: u32| crate::wire::ForwardStatus {
            file_hash: m.id_hex(),
            site: site.into(),
            state: state.into(),
            acked_bytes: 5,
            error: "disk full on c1".into(),
            pause_code: code,
            ..Default::default()
        };
        // Another relay, or a job not through it: nothing changes.
        assert_eq!(
            ob.apply_forwarded("relay-b", &[item("c1", "paused", 2)])
                .unwrap(),
            0
        );
        assert_eq!(
            ob.apply_forwarded("relay-a", &[item("c2", "delivered", 0)])
                .unwrap(),
            0
        );
        // Its own: state, progress, and the disk-full alarm, raised then cleared.
        assert_eq!(
            ob.apply_forwarded("relay-a", &[item("c1", "paused", 2)])
                .unwrap(),
            1
        );
        assert!(ob.paused_on_full_disk().contains_key("c1"));
        let j = ob.get("c1", "t-c1").unwrap().unwrap();
        assert_eq!((j.state, j.acked_bytes), (JobState::Paused, 5));
        assert_eq!(
            ob.apply_forwarded("relay-a", &[item("c1", "sending", 0)])
                .unwrap(),
            1
        );
        assert!(ob.paused_on_full_disk().is_empty());
    }

    #[test]
    fn next_job_is_highest_priority_then_oldest() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let m = Manifest {
            name: "f".into(),
            size: 1,
            chunk_size: crate::manifest::MIN_CHUNK,
            file_hash: [0; 32],
            chunks: vec![[0; 32]],
        };
        let mut a = Job::new("a", "s1", "/x".into(), m.clone());
        a.priority = "bulk".into();
        a.created_ms = 1;
        let mut b = Job::new("b", "s1", "/x".into(), m.clone());
        b.created_ms = 2;
        let mut c = Job::new("c", "s1", "/x".into(), m.clone());
        c.priority = "alarm".into();
        c.created_ms = 3;
        let mut d = Job::new("d", "s2", "/x".into(), m.clone());
        d.priority = "alarm".into();
        let mut e = Job::new("e", "s1", "/x".into(), m);
        e.priority = "alarm".into();
        e.state = JobState::Delivered;
        for j in [&a, &b, &c, &d, &e] {
            ob.enqueue((*j).clone()).unwrap();
        }
        let next = |class| match ob.next_for("s1", class).unwrap() {
            Next::Send(j) => Ok(j.id),
            Next::Wait(at) => Err(at),
        };
        // Each class has its own driver: an alarm job does not hold back the others.
        assert_eq!(next("alarm"), Ok("c".to_string()));
        assert_eq!(next("normal"), Ok("b".to_string()));
        assert_eq!(next("bulk"), Ok("a".to_string()));
        c.state = JobState::Failed;
        ob.put(&c).unwrap();
        assert_eq!(next("alarm"), Err(None));
        // A retry later: the driver is told when to look again.
        b.retry_at_ms = now_ms() + 60_000;
        ob.put(&b).unwrap();
        assert_eq!(next("normal"), Err(Some(b.retry_at_ms)));
        let mut f = Job::new("f", "s1", "/x".into(), b.manifest.clone());
        f.created_ms = 9;
        ob.enqueue(f).unwrap();
        assert_eq!(next("normal"), Ok("f".to_string()));
        assert!(matches!(
            ob.next_for("nowhere", "normal").unwrap(),
            Next::Wait(None)
        ));
    }
}
