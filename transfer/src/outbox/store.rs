//! The outbox's state store: jobs per destination and their files' manifests (sled), the
//! wakers its drivers wait on, relays' reports applied to the jobs they carry, and expiry.

use std::sync::Arc;

use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Job, JobState};
use crate::{Manifest, TransferError, now_ms};

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
    /// Told of every job written (queued, progress every second while sending, finished):
    /// the controller's live stream. Runs on the writer's thread, so it must be quick and
    /// must not write to the outbox.
    observer: std::sync::OnceLock<Observer>,
    /// Classes held back for now (a rain fade holds backups), with why: their drivers send
    /// nothing new, and a transfer of theirs under way pauses at its next chunk.
    held: std::sync::Mutex<std::collections::BTreeMap<crate::Priority, String>>,
}

/// What [`Outbox::observe`] keeps.
type Observer = Box<dyn Fn(&Job) + Send + Sync>;

/// A finished job (delivered or failed) stays listed this long after its last change; then
/// it goes, and its file's manifest once no job needs it. Longer than the inbox's
/// [`crate::inbox::KEEP_COMPLETE`]: a relay queues forwarding for every complete file it
/// holds without a forwarding job ([`crate::hop::forward_completed`]), so it must forget
/// the file before the jobs.
pub const KEEP_FINISHED: std::time::Duration = std::time::Duration::from_secs(45 * 86_400);

impl Outbox {
    pub fn new(tree: sled::Tree) -> Arc<Outbox> {
        Arc::new(Outbox {
            tree,
            wakers: Default::default(),
            disk_full: Default::default(),
            manifests: Default::default(),
            observer: Default::default(),
            held: Default::default(),
        })
    }

    /// Holds a class back (`Some(why)`) or lets it go again (`None`); returns whether that
    /// changed anything. Released, every destination's drivers look again at once.
    pub fn hold(&self, class: crate::Priority, why: Option<String>) -> bool {
        let changed = {
            let mut held = self.held.lock().expect("outbox lock poisoned");
            match why {
                Some(w) => held.insert(class, w.clone()).as_ref() != Some(&w),
                None => held.remove(&class).is_some(),
            }
        };
        if changed {
            let wakers: Vec<Arc<Notify>> = self
                .wakers
                .lock()
                .expect("outbox lock poisoned")
                .values()
                .cloned()
                .collect();
            for w in wakers {
                w.notify_waiters();
            }
        }
        changed
    }

    /// Why a class is held back now, if it is.
    pub fn held(&self, class: crate::Priority) -> Option<String> {
        self.held
            .lock()
            .expect("outbox lock poisoned")
            .get(&class)
            .cloned()
    }

    /// Calls `f` with every job written from now on. One observer per outbox: a second is
    /// refused (`false`).
    pub fn observe(&self, f: impl Fn(&Job) + Send + Sync + 'static) -> bool {
        self.observer.set(Box::new(f)).is_ok()
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
        if let Some(f) = self.observer.get() {
            f(job);
        }
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
        crate::flush_off_thread(&self.tree).await?;
        if let Some(f) = self.observer.get() {
            f(job);
        }
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
        items: &[crate::transfer_wire::ForwardStatus],
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
                let Ok(state) = item.state.parse::<JobState>() else {
                    continue;
                };
                job.state = state;
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
                    && item.pause_code == crate::transfer_wire::codes::DISK_FULL;
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

    /// Whether `dest` was offered this file before by another job (it may hold it already:
    /// a new job then waits for its answer before sending chunks, instead of sending a
    /// window of them speculatively).
    pub fn offered_before(&self, job: &Job) -> Result<bool, TransferError> {
        let hash = job.manifest.id_hex();
        Ok(self
            .scan(format!("j/{}/", job.dest).as_bytes())?
            .iter()
            .any(|j| j.id != job.id && j.attempts > 0 && j.manifest.id_hex() == hash))
    }

    /// Every job (manifests without chunk hashes), oldest first.
    pub fn list(&self) -> Result<Vec<Job>, TransferError> {
        self.scan(b"j/")
    }

    /// Whether `dest` has a job not yet finished (delivered or failed) that this node sends
    /// itself (a relay carries those with `via`).
    pub fn has_unfinished(&self, dest: &str) -> Result<bool, TransferError> {
        Ok(self
            .scan(format!("j/{dest}/").as_bytes())?
            .iter()
            .any(|j| j.dest == dest && j.via.is_none() && !j.finished()))
    }

    pub(super) fn scan(&self, prefix: &[u8]) -> Result<Vec<Job>, TransferError> {
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

    pub(super) fn note_disk_full(&self, job: &Job, why: Option<String>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Next;

    /// A one-chunk file of 10 bytes whose hashes are all `n`.
    fn small(n: u8) -> Manifest {
        Manifest {
            name: format!("f{n}"),
            size: 10,
            chunk_size: crate::manifest::MIN_CHUNK,
            file_hash: [n; 32],
            chunks: vec![[n; 32]],
        }
    }

    #[test]
    fn finished_jobs_go_after_a_while_and_their_manifests_once_unused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let (a, b) = (small(1), small(2));
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
        let item = |site: &str, state: &str, code: u32| crate::transfer_wire::ForwardStatus {
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
    fn the_observer_sees_every_write_and_only_one_observer_is_kept() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        assert!(ob.observe(move |j| s2.lock().unwrap().push((
            j.id.clone(),
            j.state,
            j.acked_bytes
        ))));
        assert!(!ob.observe(|_| {}), "a second observer is refused");
        let m = small(4);
        ob.enqueue(Job::new("t1", "s1", "/x".into(), m)).unwrap();
        let mut j = ob.get("s1", "t1").unwrap().unwrap();
        j.acked_bytes = 5;
        ob.put(&j).unwrap();
        j.state = JobState::Delivered;
        j.acked_bytes = 10;
        ob.put(&j).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("t1".to_string(), JobState::Queued, 0),
                ("t1".to_string(), JobState::Queued, 5),
                ("t1".to_string(), JobState::Delivered, 10),
            ]
        );
    }

    /// A send to every site while each driver saves its progress: many flushes at once, from
    /// async tasks and blocking threads. With sled's `flush_async` this hung the database
    /// (its pool both waited in the flushes and owed them the writes); it must finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_flushes_at_once_finish() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let m = small(5);
        let work = async {
            let mut tasks = Vec::new();
            for i in 0..64 {
                let (a, ma) = (ob.clone(), m.clone());
                tasks.push(tokio::spawn(async move {
                    let mut job = Job::new(&format!("t{i}"), &format!("s{i}"), "/x".into(), ma);
                    for n in 0..20 {
                        job.acked_bytes = n;
                        a.save(&job).await.unwrap();
                    }
                }));
                let (b, m) = (ob.clone(), m.clone());
                tasks.push(tokio::task::spawn_blocking(move || {
                    for n in 0..5 {
                        b.enqueue(Job::new(
                            &format!("b{i}-{n}"),
                            &format!("s{i}"),
                            "/x".into(),
                            m.clone(),
                        ))
                        .unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(120), work)
            .await
            .expect("the flushes finished");
        assert_eq!(ob.list().unwrap().len(), 64 + 64 * 5);
    }
}
