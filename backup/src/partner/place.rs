//! The partner's side: [`place_all`] and [`Placement`] put arrived files into the copy,
//! deletions into its trash.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::*;

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
    let mut awaits: Vec<(String, PathBuf)> = Vec::new();
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
            Some((repo, path)) if path.starts_with("awaits/") => {
                awaits.push((repo, e.path()));
            }
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
    // Packs (and the configuration) first; then the repositories whose awaits lists name a
    // pack not here yet are held back (their snapshots, index files and deletions wait).
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut awaits_looked = false;
    for (st, repo, path, from) in arrived {
        if st >= 2 && !awaits_looked {
            awaits_looked = true;
            held = held_repos(backups, &awaits, &mut placed)?;
        }
        if held.contains(&repo) {
            continue;
        }
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
    if !awaits_looked && !awaits.is_empty() {
        // Nothing waits on them this pass: the lists satisfied (or too old) go.
        held_repos(backups, &awaits, &mut placed)?;
    }
    Ok(placed)
}

/// Reads the awaits lists that arrived: one whose files are all in its repository now is
/// done (removed); one older than [`AWAITS_HOLD`] is dropped with a warning; any other holds
/// its repository back. Returns the repositories held.
fn held_repos(
    backups: &Path,
    awaits: &[(String, PathBuf)],
    placed: &mut Placed,
) -> Result<BTreeSet<String>, PartnerError> {
    let mut held = BTreeSet::new();
    for (repo, file) in awaits {
        let list = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<AwaitsList>(&b).map_err(|e| e.to_string()))
            .and_then(|l| {
                if &l.repo != repo {
                    return Err(format!("a list for {:?} sent as {repo:?}", l.repo));
                }
                if l.paths.len() > MAX_LIST {
                    return Err(format!("{} paths (at most {MAX_LIST})", l.paths.len()));
                }
                for p in &l.paths {
                    check_name(p).map_err(|e| e.to_string())?;
                }
                Ok(l)
            });
        let l = match list {
            Ok(l) => l,
            Err(why) => {
                // It would hold nothing back: removed, said once.
                warn!(file = %file.display(), %why, "An awaits list was refused and removed.");
                placed.refused += 1;
                std::fs::remove_file(file).map_err(io(file))?;
                continue;
            }
        };
        let repo_dir = tiandi_link::names::join(backups, "repository", repo)
            .map_err(|e| PartnerError::Bad(e.to_string()))?;
        let missing = l
            .paths
            .iter()
            .filter(|p| !repo_dir.join(p).exists())
            .count();
        let age = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if missing == 0 {
            std::fs::remove_file(file).map_err(io(file))?;
        } else if age > AWAITS_HOLD {
            warn!(%repo, missing, "An awaits list still names files that never came: dropped.");
            std::fs::remove_file(file).map_err(io(file))?;
        } else {
            held.insert(repo.clone());
        }
    }
    Ok(held)
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
