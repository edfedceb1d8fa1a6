//! A repository kept at a partner over Tiandi's transfer engine: the site backs up into a
//! local repository (fast local restores, and what the backup reads to deduplicate), and a
//! [`Shipper`] sends every new file of it to the partner as a transfer in the `backup`
//! priority class (below reports, alarms and operators' files; resumed after a cut from what
//! the partner holds, never re-sent whole); files the repository deletes (prune) follow as a
//! deletion list. At the partner, [`place_all`] moves each arrived file into a complete copy of
//! the repository (`backups/<peer>/<repo>/`) that `tiandi-backup check` verifies without the
//! key and `restore` restores from with it (the disaster-recovery case).
//!
//! Order at the partner is the repository's own (FORMAT.md "Writing"): a stage is sent only
//! when everything before it was delivered and verified — `config` and `keys/`, then
//! `packs/`, then `index/`, `snapshots/` and `pending/`, then deletions — so the copy at the
//! partner is a valid repository at every moment, and a snapshot there never names a pack
//! that has not arrived.
//!
//! Deletions are not carried out at the partner at once: the files go to
//! `backups/<peer>/.trash/<repo>/<ms>/` and are removed after a hold period
//! ([`purge_trash`]), so a site taken over by ransomware cannot destroy its partner's copy
//! by pruning (the same idea as restic's rest-server `--append-only`, with a time limit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiandi_transfer::{Job, JobState, Manifest, Outbox, Priority};
use tracing::{info, warn};

use crate::backend::check_name;

/// What a shipped file's transfer name starts with: `backup~<repo>~<path, '/' as '~'>`.
pub const PREFIX: &str = "backup~";
/// The stage of a deletion list (after every other).
const DELETIONS: u8 = 4;
/// A file whose transfer failed this many times in a row is left (and shown) until an
/// operator looks: the partner refuses it for a reason that retrying does not change.
const MAX_FAILURES: u32 = 5;
/// Most files one deletion list names (a larger prune sends several).
const MAX_LIST: usize = 50_000;
/// Files in one repository the shipper tracks, at most (a repository of 16 MiB packs holds
/// 16 TB at this count; beyond it the shipper refuses, and says so).
const MAX_FILES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum PartnerError {
    #[error("{0}")]
    Bad(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shipper state: {0}")]
    State(#[from] sled::Error),
    #[error("transfer: {0}")]
    Transfer(#[from] tiandi_transfer::TransferError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PartnerError + '_ {
    move |source| PartnerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The transfer name of repository file `path` of repository `repo`.
pub fn ship_name(repo: &str, path: &str) -> String {
    format!("{PREFIX}{repo}~{}", path.replace('/', "~"))
}

/// A shipped file's (repository, path), from its transfer name; None for any other file, or a
/// name that does not pass the validators (a repository name as a site name is checked, a path
/// as a repository file name).
pub fn parse_ship_name(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (repo, path) = rest.split_once('~')?;
    tiandi_link::names::validate_name("repository", repo).ok()?;
    let path = path.replace('~', "/");
    check_name(&path).ok()?;
    Some((repo.to_string(), path))
}

/// The order a repository's files reach the partner in. Index files go with the snapshots:
/// a snapshot must not arrive before the packs it names, but an index is only a shortcut (a
/// repository opened without one indexes its packs from their trailers), so waiting for the
/// index before the snapshots would cost a round trip or two per backup for nothing.
fn stage(path: &str) -> u8 {
    match path.split('/').next().unwrap_or_default() {
        "config" | "keys" => 0,
        "packs" => 1,
        _ => 2,
    }
}

/// One repository shipped to a partner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShipConfig {
    /// The repository's name at the partner (a site-name grammar: letters, digits, `.`, `_`,
    /// `-`).
    pub name: String,
    /// The local repository (a directory `tiandi-backup init` made).
    pub path: PathBuf,
    /// The partner: `controller` from a site; a site ID from the controller.
    #[serde(default = "default_partner")]
    pub to: String,
}

fn default_partner() -> String {
    "controller".into()
}

impl ShipConfig {
    pub fn validate(&self) -> Result<(), String> {
        tiandi_link::names::validate_name("repository name", &self.name)
            .map_err(|e| e.to_string())?;
        tiandi_link::names::validate_name("partner", &self.to).map_err(|e| e.to_string())?;
        if !self.path.is_absolute() {
            return Err(format!("{} is not an absolute path", self.path.display()));
        }
        Ok(())
    }
}

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

/// A deletion list on its way.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ListEntry {
    job: String,
    paths: Vec<String>,
    source: PathBuf,
}

/// A deletion list as the partner reads it.
#[derive(Debug, Serialize, Deserialize)]
struct DeletionList {
    repo: String,
    paths: Vec<String>,
    /// The list's own ID: two lists naming the same files are two files (a receiver that
    /// already holds a file of the same bytes from this peer would take the second as
    /// delivered without placing it).
    #[serde(default)]
    id: String,
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
        if let Some(first) = undelivered.iter().map(|u| u.0).min() {
            for (_, path, _) in undelivered
                .into_iter()
                .filter(|&(st, _, send)| st == first && send)
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
                let id = format!(
                    "bk{}-{:08x}",
                    tiandi_transfer::now_ms(),
                    rand::random::<u32>()
                );
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
            let id = format!(
                "bk{}-{:08x}",
                tiandi_transfer::now_ms(),
                rand::random::<u32>()
            );
            let list = DeletionList {
                repo: r.name.clone(),
                paths: at_partner.iter().map(|p| p.to_string()).collect(),
                id: id.clone(),
            };
            let source = self.spool.join(format!("{id}.json"));
            write_durable(
                &source,
                &serde_json::to_vec(&list).expect("lists serialise"),
            )?;
            let mut manifest = Manifest::of_file(&source)?;
            manifest.name = ship_name(&r.name, &format!("deletions/{id}"));
            let mut job = Job::new(&id, &r.to, source.clone(), manifest);
            job.priority = Priority::Backup;
            self.outbox.enqueue(job)?;
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

fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), PartnerError> {
    crate::backend::write_durable(path, bytes).map_err(io(path))
}

/// What one [`place_all`] pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Placed {
    pub files: u64,
    pub bytes: u64,
    /// Files moved to the trash by deletion lists.
    pub deleted: u64,
    /// Arrived files refused (bad names or lists), each left where it is with a warning.
    pub refused: u64,
}

/// At the partner: moves every shipped file that arrived in `incoming` (where one peer's
/// transfers land) into its repository under `backups` (that peer's directory), in the
/// repository's order, and carries out deletion lists by moving the named files into
/// `backups/.trash/<repo>/<ms>/`. Safe to run again after a crash: a file is moved by one
/// rename, and a list is removed only after its files were moved.
pub fn place_all(incoming: &Path, backups: &Path) -> Result<Placed, PartnerError> {
    let mut arrived: Vec<(u8, String, String, PathBuf)> = Vec::new();
    let mut placed = Placed::default();
    let rd = match std::fs::read_dir(incoming) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(placed),
        Err(e) => return Err(io(incoming)(e)),
    };
    for e in rd {
        let e = e.map_err(io(incoming))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(PREFIX) {
            continue;
        }
        if !e.file_type().map_err(io(&e.path()))?.is_file() {
            continue;
        }
        match parse_ship_name(&name) {
            Some((repo, path)) => {
                let st = if path.starts_with("deletions/") {
                    DELETIONS
                } else {
                    stage(&path)
                };
                arrived.push((st, repo, path, e.path()));
            }
            None => {
                warn!(file = %e.path().display(), "A backup file with a name no repository has: left where it is.");
                placed.refused += 1;
            }
        }
    }
    arrived.sort();
    for (st, repo, path, from) in arrived {
        let repo_dir = tiandi_link::names::join(backups, "repository", &repo)
            .map_err(|e| PartnerError::Bad(e.to_string()))?;
        if st == DELETIONS {
            match delete_listed(backups, &repo, &repo_dir, &from) {
                Ok(n) => placed.deleted += n,
                Err(e) => {
                    warn!(file = %from.display(), error = %e, "A deletion list was refused.");
                    placed.refused += 1;
                    continue;
                }
            }
            std::fs::remove_file(&from).map_err(io(&from))?;
            continue;
        }
        let to = repo_dir.join(&path);
        let dir = to.parent().expect("repository paths have a parent");
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let size = std::fs::metadata(&from).map_err(io(&from))?.len();
        std::fs::rename(&from, &to).map_err(io(&to))?;
        sync_dir(dir)?;
        placed.files += 1;
        placed.bytes += size;
    }
    Ok(placed)
}

fn sync_dir(dir: &Path) -> Result<(), PartnerError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Moves a list's files into the trash; the count moved.
fn delete_listed(
    backups: &Path,
    repo: &str,
    repo_dir: &Path,
    list: &Path,
) -> Result<u64, PartnerError> {
    let bytes = std::fs::read(list).map_err(io(list))?;
    let l: DeletionList = serde_json::from_slice(&bytes)
        .map_err(|e| PartnerError::Bad(format!("{}: {e}", list.display())))?;
    if l.repo != repo {
        return Err(PartnerError::Bad(format!(
            "{}: a list for repository {:?} sent as {repo:?}",
            list.display(),
            l.repo
        )));
    }
    if l.paths.len() > MAX_LIST {
        return Err(PartnerError::Bad(format!(
            "{}: {} paths (at most {MAX_LIST})",
            list.display(),
            l.paths.len()
        )));
    }
    for p in &l.paths {
        check_name(p).map_err(|e| PartnerError::Bad(e.to_string()))?;
    }
    let trash = backups
        .join(".trash")
        .join(repo)
        .join(tiandi_transfer::now_ms().to_string());
    let mut n = 0;
    for p in &l.paths {
        let from = repo_dir.join(p);
        let to = trash.join(p);
        let dir = to.parent().expect("repository paths have a parent");
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        match std::fs::rename(&from, &to) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&from)(e)),
        }
    }
    info!(%repo, files = n, trash = %trash.display(), "Files the repository deleted were moved to the trash.");
    Ok(n)
}

/// Removes trash (under each peer directory of `root`: `root/<peer>/.trash/<repo>/<ms>/`)
/// older than `hold`. Returns the batches removed.
pub fn purge_trash(root: &Path, hold: Duration) -> Result<u64, PartnerError> {
    let cutoff = tiandi_transfer::now_ms() - hold.as_millis() as i64;
    let mut n = 0;
    let peers = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(root)(e)),
    };
    for peer in peers {
        let trash = peer.map_err(io(root))?.path().join(".trash");
        let Ok(repos) = std::fs::read_dir(&trash) else {
            continue;
        };
        for repo in repos.flatten() {
            let Ok(batches) = std::fs::read_dir(repo.path()) else {
                continue;
            };
            for b in batches.flatten() {
                let old = b
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i64>().ok())
                    .is_some_and(|ms| ms < cutoff);
                if old {
                    std::fs::remove_dir_all(b.path()).map_err(io(&b.path()))?;
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

/// Where a node's peers' backups arrive and go.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The node's inbox directory.
    pub inbox: PathBuf,
    /// `None`: each peer's files land in `inbox/<peer>/` (the controller); `Some(peer)`: the
    /// inbox holds only that peer's files (a site, whose files come from the controller).
    pub peer: Option<String>,
    /// Repositories go to `backups/<peer>/<repo>/`.
    pub backups: PathBuf,
    /// Deleted files stay in the trash this long.
    pub hold: Duration,
}

/// The peers' directories of a node's inbox (`inbox/<site>/`, where each site's files land):
/// (site, directory), names through the one validator; nothing if the inbox is not there.
pub fn peer_dirs(inbox: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(inbox)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.to_string();
                    tiandi_link::names::validate_name("site", &n).ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How often arrived files are placed, and the trash looked at.
const PLACE_EVERY: Duration = Duration::from_secs(2);
const PURGE_EVERY: Duration = Duration::from_secs(3600);

impl Placement {
    /// One pass over every peer.
    pub fn place(&self) -> Placed {
        let mut total = Placed::default();
        let peers: Vec<(String, PathBuf)> = match &self.peer {
            Some(p) => vec![(p.clone(), self.inbox.clone())],
            None => peer_dirs(&self.inbox),
        };
        for (peer, incoming) in peers {
            let backups = self.backups.join(&peer);
            match place_all(&incoming, &backups) {
                Ok(p) => {
                    if p.files > 0 || p.deleted > 0 {
                        info!(%peer, files = p.files, bytes = p.bytes, deleted = p.deleted, "Backup files placed.");
                    }
                    total.files += p.files;
                    total.bytes += p.bytes;
                    total.deleted += p.deleted;
                    total.refused += p.refused;
                }
                Err(e) => warn!(%peer, error = %e, "Placing backup files failed; trying again."),
            }
        }
        total
    }

    /// Places arrived files every two seconds and purges old trash hourly, until `cancel`.
    pub async fn run(self, cancel: tokio_util::sync::CancellationToken) {
        let me = Arc::new(self);
        let mut last_purge: Option<std::time::Instant> = None;
        loop {
            let m = me.clone();
            let purge = last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY);
            if purge {
                last_purge = Some(std::time::Instant::now());
            }
            let _ = tokio::task::spawn_blocking(move || {
                m.place();
                if purge && let Err(e) = purge_trash(&m.backups, m.hold) {
                    warn!(error = %e, "Purging the backup trash failed.");
                }
            })
            .await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PLACE_EVERY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ship_names_round_trip_and_refuse_what_is_not_a_repository_file() {
        let n = ship_name("gd-db", "packs/ab/abcdef");
        assert_eq!(n, "backup~gd-db~packs~ab~abcdef");
        assert_eq!(
            parse_ship_name(&n),
            Some(("gd-db".into(), "packs/ab/abcdef".into()))
        );
        tiandi_link::names::validate_file_name("f", &n).unwrap();
        for bad in [
            "backup~..~config",
            "backup~db~..~config",
            "backup~db~~config",
            "backup~db",
            "backup~.x~config",
            "report.bin",
            "backup~db~packs~.tmp",
        ] {
            assert_eq!(parse_ship_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn stages_follow_the_write_order() {
        assert!(stage("config") < stage("packs/ab/x"));
        assert_eq!(stage("keys/a.json"), stage("config"));
        assert!(stage("packs/ab/x") < stage("index/y"));
        assert!(stage("packs/ab/x") < stage("snapshots/z"));
        assert_eq!(stage("index/y"), stage("snapshots/z"));
        assert_eq!(stage("pending/1-a"), stage("snapshots/z"));
        assert!(stage("snapshots/z") < DELETIONS);
    }
}
