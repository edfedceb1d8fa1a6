//! The site's side: [`Shipper`] sends a repository's new files stage by stage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_transfer::{Job, JobState, Manifest, Outbox, Priority};
use tracing::{info, warn};

use super::*;

/// The shipper's record of one file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    /// The transfer carrying it now (None: to be sent).
    job: Option<String>,
    delivered: bool,
    /// When the partner's receipt came (ms; 0 in records made before it was kept).
    #[serde(default)]
    delivered_ms: i64,
    failures: u32,
    error: Option<String>,
}

/// Where one repository's shipping stands.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShipStatus {
    pub repo: String,
    pub to: String,
    /// Files the partner holds (delivered and verified).
    pub delivered_files: u64,
    pub delivered_bytes: u64,
    /// Files waiting for their turn or on their way.
    pub pending_files: u64,
    pub pending_bytes: u64,
    /// Files removed locally whose removal the partner has not yet been told of.
    pub pending_deletions: u64,
    /// When the partner last confirmed a file (ms since the epoch; 0: never).
    pub last_delivered_ms: i64,
    /// Everything local is at the partner (and every deletion told).
    pub in_sync: bool,
    pub error: Option<String>,
}

/// Sends repositories' new files to their partners through an [`Outbox`].
pub struct Shipper {
    outbox: Arc<Outbox>,
    tree: sled::Tree,
    /// Deletion lists wait here until delivered.
    spool: PathBuf,
    repos: std::sync::Mutex<Vec<ShipConfig>>,
}

/// A transfer's ID (and a list's): `<prefix><ms>-<random>`.
fn list_id(prefix: &str) -> String {
    format!(
        "{prefix}{}-{:08x}",
        tiandi_transfer::now_ms(),
        rand::random::<u32>()
    )
}

fn check_repos(repos: &[ShipConfig]) -> Result<(), PartnerError> {
    let mut names = BTreeSet::new();
    for r in repos {
        r.validate().map_err(PartnerError::Bad)?;
        if !names.insert((&r.to, &r.name)) {
            return Err(PartnerError::Bad(format!(
                "repository name {:?} is shipped to {} twice",
                r.name, r.to
            )));
        }
    }
    Ok(())
}

impl Shipper {
    pub fn new(
        outbox: Arc<Outbox>,
        tree: sled::Tree,
        spool: &Path,
        repos: Vec<ShipConfig>,
    ) -> Result<Shipper, PartnerError> {
        check_repos(&repos)?;
        tiandi_link::secrets::private_dir(spool).map_err(|e| PartnerError::Bad(e.to_string()))?;
        Ok(Shipper {
            outbox,
            tree,
            spool: spool.to_path_buf(),
            repos: std::sync::Mutex::new(repos),
        })
    }

    /// The repositories shipped now.
    pub fn repos(&self) -> Vec<ShipConfig> {
        self.repos.lock().expect("shipper lock").clone()
    }

    /// Replaces the repositories shipped (the jobs changed). A repository no longer listed
    /// keeps its records: listed again, it resumes where it was.
    pub fn set_repos(&self, repos: Vec<ShipConfig>) -> Result<(), PartnerError> {
        check_repos(&repos)?;
        *self.repos.lock().expect("shipper lock") = repos;
        Ok(())
    }

    /// Ships every repository until `cancel`: a pass every `every`, and at once when a job of
    /// ours changes state. Writes each pass's statuses to `status_file` (JSON) if given.
    pub async fn run(
        self: Arc<Self>,
        every: Duration,
        status_file: Option<PathBuf>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let me = self.clone();
            let statuses = tokio::task::spawn_blocking(move || me.tick())
                .await
                .unwrap_or_default();
            if let Some(f) = &status_file
                && let Ok(json) = serde_json::to_vec_pretty(&statuses)
            {
                let tmp = f.with_extension("tmp");
                if std::fs::write(&tmp, json)
                    .and_then(|()| std::fs::rename(&tmp, f))
                    .is_err()
                {
                    warn!(file = %f.display(), "Cannot write the backup shipping status.");
                }
            }
            // In sync: look less often (a repository being written is seen within ten
            // passes' time; one being sent is looked at every pass).
            let idle = statuses.iter().all(|s| s.in_sync);
            // Sending: a job of ours that changes (one delivered lets the next stage go) wakes
            // the next pass early, instead of a round trip's worth of idle link per stage.
            let changed = statuses
                .iter()
                .find(|s| !s.in_sync)
                .map(|s| self.outbox.waker(&s.to));
            let change = async {
                match &changed {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(if idle { every * 10 } else { every }) => {}
                _ = change => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// One pass over every repository; a repository that fails is reported in its status and
    /// does not stop the others.
    pub fn tick(&self) -> Vec<ShipStatus> {
        self.repos()
            .iter()
            .map(|r| {
                self.ship(r).unwrap_or_else(|e| {
                    warn!(repo = %r.name, to = %r.to, error = %e, "Backup shipping failed.");
                    let mut s = self.status(r).unwrap_or_default();
                    s.repo.clone_from(&r.name);
                    s.to.clone_from(&r.to);
                    s.error = Some(e.to_string());
                    s.in_sync = false;
                    s
                })
            })
            .collect()
    }

    fn fkey(r: &ShipConfig, path: &str) -> Vec<u8> {
        format!("f/{}/{}/{path}", r.to, r.name).into_bytes()
    }

    fn entries(&self, r: &ShipConfig) -> Result<BTreeMap<String, Entry>, PartnerError> {
        let prefix = format!("f/{}/{}/", r.to, r.name);
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let path = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Ok(e) = serde_json::from_slice::<Entry>(&v) {
                out.insert(path, e);
            }
        }
        Ok(out)
    }

    fn lists(&self, r: &ShipConfig) -> Result<Vec<(Vec<u8>, ListEntry)>, PartnerError> {
        let prefix = format!("d/{}/{}/", r.to, r.name);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            if let Ok(e) = serde_json::from_slice::<ListEntry>(&v) {
                out.push((k.to_vec(), e));
            }
        }
        Ok(out)
    }

    fn put(&self, r: &ShipConfig, path: &str, e: &Entry) -> Result<(), PartnerError> {
        self.tree.insert(
            Self::fkey(r, path),
            serde_json::to_vec(e).expect("entries serialise"),
        )?;
        Ok(())
    }

    /// The job's state, or None if the outbox no longer has it.
    fn job_state(&self, r: &ShipConfig, id: &str) -> Result<Option<Job>, PartnerError> {
        Ok(self.outbox.get(&r.to, id)?)
    }

    /// One pass over one repository: settle finished jobs, then send the next stage.
    pub fn ship(&self, r: &ShipConfig) -> Result<ShipStatus, PartnerError> {
        let mut entries = self.entries(r)?;
        let mut lists_in_flight = 0usize;
        // Settle the files on their way.
        for (path, e) in entries.iter_mut() {
            let Some(id) = e.job.clone() else { continue };
            if e.delivered {
                continue;
            }
            match self.job_state(r, &id)? {
                Some(j) if j.state == JobState::Delivered => {
                    e.delivered = true;
                    e.delivered_ms = j.updated_ms;
                    e.failures = 0;
                    e.error = None;
                    self.put(r, path, e)?;
                }
                Some(j) if j.state == JobState::Failed => {
                    e.job = None;
                    e.failures += 1;
                    e.error = j.error.clone();
                    warn!(repo = %r.name, %path, failures = e.failures, error = ?j.error, "A backup file's transfer failed.");
                    self.put(r, path, e)?;
                }
                Some(_) => {}
                None => {
                    e.job = None;
                    self.put(r, path, e)?;
                }
            }
        }
        // Settle deletion lists: once delivered, the files are forgotten here.
        for (key, l) in self.lists(r)? {
            match self.job_state(r, &l.job)? {
                Some(j) if j.state == JobState::Delivered => {
                    for p in &l.paths {
                        self.tree.remove(Self::fkey(r, p))?;
                        entries.remove(p);
                    }
                    self.tree.remove(key)?;
                    let _ = std::fs::remove_file(&l.source);
                }
                Some(j) if j.state == JobState::Failed => {
                    // Sent again as a new list at the end of this pass.
                    self.tree.remove(key)?;
                    let _ = std::fs::remove_file(&l.source);
                }
                Some(_) => lists_in_flight += 1,
                None => {
                    self.tree.remove(key)?;
                    let _ = std::fs::remove_file(&l.source);
                }
            }
        }
        let local = walk(&r.path)?;
        if local.len() > MAX_FILES {
            return Err(PartnerError::Bad(format!(
                "{} holds {} files; the shipper tracks at most {MAX_FILES}",
                r.path.display(),
                local.len()
            )));
        }
        self.next_stage(r, &mut entries, &local, lists_in_flight)?;
        // The records as they are now (the pass changed them).
        let entries = self.entries(r)?;
        Ok(status_of(r, &entries, &local))
    }

    /// Sends the files of the lowest stage not yet wholly at the partner (a stage goes only
    /// when every file of the stages before it was delivered; files of the same stage go
    /// side by side); when everything is delivered, the deletions.
    fn next_stage(
        &self,
        r: &ShipConfig,
        entries: &mut BTreeMap<String, Entry>,
        local: &BTreeMap<String, (u64, i128)>,
        lists_in_flight: usize,
    ) -> Result<(), PartnerError> {
        // Files not (or not in this version) at the partner.
        let mut undelivered: Vec<(u8, &String, bool)> = Vec::new();
        for (path, &(size, mtime)) in local {
            let same = |e: &Entry| e.size == size && e.mtime_ns == mtime;
            match entries.get(path) {
                Some(e) if same(e) && e.delivered => {}
                Some(e) if same(e) && e.job.is_some() => {
                    undelivered.push((stage(path), path, false))
                }
                Some(e) if same(e) && e.failures >= MAX_FAILURES => {
                    undelivered.push((stage(path), path, false))
                }
                _ => undelivered.push((stage(path), path, true)),
            }
        }
        if !undelivered.iter().any(|u| u.0 == 1) {
            self.forget_awaits(r)?;
        }
        if let Some(first) = undelivered.iter().map(|u| u.0).min() {
            // Packs to send: an awaits list naming every pack not yet delivered goes first.
            // Packs all on their way (none failed) and that list delivered: the snapshots and
            // index files go right behind them, the partner holding them until the packs are
            // there (see `AwaitsList`).
            let mut sending = first;
            if first == 1 {
                let packs: Vec<&String> = undelivered
                    .iter()
                    .filter(|u| u.0 == 1)
                    .map(|u| u.1)
                    .collect();
                if undelivered.iter().any(|u| u.0 == 1 && u.2) {
                    self.send_awaits(r, &packs)?;
                } else if packs.iter().all(|p| entries[*p].failures == 0)
                    && self.awaits_delivered(r)?
                {
                    sending = 2;
                }
            }
            for (_, path, _) in undelivered
                .into_iter()
                .filter(|&(st, _, send)| st == sending && send)
            {
                let (size, mtime) = local[path];
                let mut e = entries.get(path).cloned().unwrap_or_default();
                if e.size != size || e.mtime_ns != mtime {
                    e.failures = 0;
                }
                let file = r.path.join(path);
                let mut manifest = match Manifest::of_file(&file) {
                    Ok(m) => m,
                    // Removed since the walk (a prune): the next pass sees it gone.
                    Err(err) if !file.exists() => {
                        info!(repo = %r.name, %path, error = %err, "Gone before it was sent.");
                        continue;
                    }
                    Err(err) => return Err(err.into()),
                };
                manifest.name = ship_name(&r.name, path);
                let id = list_id("bk");
                let mut job = Job::new(&id, &r.to, file, manifest);
                job.priority = Priority::Backup;
                self.outbox.enqueue(job)?;
                e.size = size;
                e.mtime_ns = mtime;
                e.job = Some(id);
                e.delivered = false;
                e.error = None;
                self.put(r, path, &e)?;
                entries.insert(path.clone(), e);
            }
            return Ok(());
        }
        if lists_in_flight > 0 {
            return Ok(());
        }
        // Nothing new: tell the partner what is gone.
        let gone: Vec<String> = entries
            .iter()
            .filter(|(p, e)| !local.contains_key(*p) && (e.delivered || e.job.is_none()))
            .map(|(p, _)| p.clone())
            .collect();
        for chunk in gone.chunks(MAX_LIST) {
            // A file that never reached the partner needs no deletion there.
            let (never, at_partner): (Vec<&String>, Vec<&String>) = chunk
                .iter()
                .partition(|p| !entries[*p].delivered && entries[*p].job.is_none());
            for p in never {
                self.tree.remove(Self::fkey(r, p))?;
            }
            if at_partner.is_empty() {
                continue;
            }
            let id = list_id("bk");
            let list = DeletionList {
                repo: r.name.clone(),
                paths: at_partner.iter().map(|p| p.to_string()).collect(),
                id: id.clone(),
            };
            let source = self.send_list(
                r,
                "deletions",
                &id,
                &serde_json::to_vec(&list).expect("lists serialise"),
            )?;
            let l = ListEntry {
                job: id.clone(),
                paths: list.paths,
                source,
            };
            self.tree.insert(
                format!("d/{}/{}/{id}", r.to, r.name).into_bytes(),
                serde_json::to_vec(&l).expect("lists serialise"),
            )?;
        }
        Ok(())
    }

    /// Keeps a list of the shipper's own (`deletions/<id>` or `awaits/<id>` at the partner)
    /// in the spool and queues it in the backup class; returns where it is kept until
    /// delivered.
    fn send_list(
        &self,
        r: &ShipConfig,
        kind: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<PathBuf, PartnerError> {
        let source = self.spool.join(format!("{id}.json"));
        write_durable(&source, bytes)?;
        let mut manifest = Manifest::of_file(&source)?;
        manifest.name = ship_name(&r.name, &format!("{kind}/{id}"));
        let mut job = Job::new(id, &r.to, source.clone(), manifest);
        job.priority = Priority::Backup;
        self.outbox.enqueue(job)?;
        Ok(source)
    }

    fn akey(r: &ShipConfig) -> Vec<u8> {
        format!("a/{}/{}", r.to, r.name).into_bytes()
    }

    /// Queues an awaits list naming `packs` (ahead of them: the outbox sends a class's jobs
    /// oldest first), replacing the one before.
    fn send_awaits(&self, r: &ShipConfig, packs: &[&String]) -> Result<(), PartnerError> {
        self.forget_awaits(r)?;
        let id = list_id("aw");
        let list = AwaitsList {
            repo: r.name.clone(),
            paths: packs.iter().take(MAX_LIST).map(|p| p.to_string()).collect(),
            id: id.clone(),
        };
        let source = self.send_list(
            r,
            "awaits",
            &id,
            &serde_json::to_vec(&list).expect("lists serialise"),
        )?;
        self.tree.insert(
            Self::akey(r),
            serde_json::to_vec(&AwaitsEntry { job: id, source }).expect("lists serialise"),
        )?;
        Ok(())
    }

    /// Whether the repository's awaits list reached the partner.
    fn awaits_delivered(&self, r: &ShipConfig) -> Result<bool, PartnerError> {
        let Some(v) = self.tree.get(Self::akey(r))? else {
            return Ok(false);
        };
        let Ok(a) = serde_json::from_slice::<AwaitsEntry>(&v) else {
            return Ok(false);
        };
        Ok(self
            .job_state(r, &a.job)?
            .is_some_and(|j| j.state == JobState::Delivered))
    }

    fn forget_awaits(&self, r: &ShipConfig) -> Result<(), PartnerError> {
        if let Some(v) = self.tree.remove(Self::akey(r))?
            && let Ok(a) = serde_json::from_slice::<AwaitsEntry>(&v)
        {
            let _ = std::fs::remove_file(&a.source);
        }
        Ok(())
    }

    /// Where `r` stands, from the shipper's records and the local repository.
    pub fn status(&self, r: &ShipConfig) -> Result<ShipStatus, PartnerError> {
        Ok(status_of(r, &self.entries(r)?, &walk(&r.path)?))
    }
}

fn status_of(
    r: &ShipConfig,
    entries: &BTreeMap<String, Entry>,
    local: &BTreeMap<String, (u64, i128)>,
) -> ShipStatus {
    let mut s = ShipStatus {
        repo: r.name.clone(),
        to: r.to.clone(),
        ..ShipStatus::default()
    };
    for (path, &(size, mtime)) in local {
        match entries.get(path) {
            Some(e) if e.delivered && e.size == size && e.mtime_ns == mtime => {
                s.delivered_files += 1;
                s.delivered_bytes += size;
            }
            Some(e) => {
                s.pending_files += 1;
                s.pending_bytes += size;
                if e.failures >= MAX_FAILURES && s.error.is_none() {
                    s.error = Some(format!(
                        "{path}: the partner refused it {} times: {}",
                        e.failures,
                        e.error.as_deref().unwrap_or("no reason given")
                    ));
                }
            }
            None => {
                s.pending_files += 1;
                s.pending_bytes += size;
            }
        }
    }
    s.pending_deletions = entries.keys().filter(|p| !local.contains_key(*p)).count() as u64;
    s.last_delivered_ms = entries.values().map(|e| e.delivered_ms).max().unwrap_or(0);
    s.in_sync = s.pending_files == 0 && s.pending_deletions == 0 && s.error.is_none();
    s
}

/// Every repository file under `dir`: path → (size, mtime in ns). Names starting with `.`
/// (files being written) are left out.
fn walk(dir: &Path) -> Result<BTreeMap<String, (u64, i128)>, PartnerError> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            // A repository not made yet (its job has not run) holds nothing to send.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&d)(e)),
        };
        for e in rd {
            let e = e.map_err(io(&d))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = match e.metadata() {
                Ok(md) => md,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io(&e.path())(err)),
            };
            if md.is_dir() {
                stack.push((e.path(), path));
            } else if md.is_file() && check_name(&path).is_ok() {
                let mtime = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
                out.insert(path, (md.len(), mtime));
            }
        }
    }
    Ok(out)
}
