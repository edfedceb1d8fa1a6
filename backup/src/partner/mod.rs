//! A repository kept at a partner over Tiandi's transfer engine: the site backs up into a
//! local repository (fast local restores, and what the backup reads to deduplicate), and a
//! [`Shipper`] sends every new file of it to the partner as a transfer in the `backup`
//! priority class (below reports, alarms and operators' files; resumed after a cut from what
//! the partner holds, never re-sent whole); files the repository deletes (prune) follow as a
//! deletion list. At the partner, [`place_all`] moves each arrived file into a complete copy of
//! the repository (`backups/<peer>/<repo>/`) that `tiandi-backup check` verifies without the
//! key and `restore` restores from with it (the disaster-recovery case).
//!
//! Order at the partner is the repository's own (FORMAT.md "Writing"): `config` and `keys/`,
//! then `packs/`, then `index/`, `snapshots/` and `pending/`, then deletions — so the copy at
//! the partner is a valid repository at every moment, and a snapshot there never names a pack
//! that has not arrived. A stage is sent when everything before it was delivered and
//! verified, with one exception that saves a GEO link a round trip or two per backup: the
//! packs go behind an awaits list naming them, and once that list is delivered and every
//! pack is on its way, the snapshots and index files follow at once; the partner holds them
//! (`place_all`) until every listed pack is in the copy.
//!
//! Deletions are not carried out at the partner at once: the files go to
//! `backups/<peer>/.trash/<repo>/<ms>/` and are removed after a hold period
//! ([`purge_trash`]), so a site taken over by ransomware cannot destroy its partner's copy
//! by pruning (the same idea as restic's rest-server `--append-only`, with a time limit).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), PartnerError> {
    crate::backend::write_durable(path, bytes).map_err(io(path))
}

/// A list of the packs a repository's next snapshots and index files need, sent ahead of
/// those packs: the partner holds the snapshots (and later deletions) of that repository
/// while a listed file has not arrived, so the shipper can send them right behind the packs
/// instead of waiting a round trip or two for the last pack's receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct AwaitsList {
    repo: String,
    paths: Vec<String>,
    id: String,
}

/// The shipper's record of the awaits list sent with a repository's packs now on their way.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct AwaitsEntry {
    job: String,
    source: PathBuf,
}

/// An awaits list not satisfied after this long is dropped at the partner (a listed pack
/// removed at the site before it was sent), with a warning; the shipper's own order (a stage
/// after the one before it was delivered) still holds.
pub const AWAITS_HOLD: Duration = Duration::from_secs(3600);

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

mod place;
mod ship;

pub use place::{Placed, Placement, peer_dirs, place_all, purge_trash};
pub use ship::{ShipStatus, Shipper};

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
    fn snapshots_wait_at_the_partner_for_the_packs_an_awaits_list_names() {
        let t = tempfile::tempdir().unwrap();
        let (incoming, backups) = (t.path().join("in"), t.path().join("backups"));
        std::fs::create_dir_all(&incoming).unwrap();
        let arrive = |path: &str, bytes: &[u8]| {
            std::fs::write(incoming.join(ship_name("db", path)), bytes).unwrap();
        };
        let list = AwaitsList {
            repo: "db".into(),
            paths: vec!["packs/ab/p1".into(), "packs/cd/p2".into()],
            id: "aw1".into(),
        };
        arrive("awaits/aw1", &serde_json::to_vec(&list).unwrap());
        arrive("packs/ab/p1", b"pack one");
        arrive("snapshots/s1", b"snapshot");
        arrive("index/i1", b"index");
        let p = place_all(&incoming, &backups).unwrap();
        assert_eq!(p.files, 1, "only the pack: {p:?}");
        let copy = backups.join("db");
        assert!(copy.join("packs/ab/p1").exists());
        assert!(!copy.join("snapshots/s1").exists(), "held: p2 is not here");
        assert!(incoming.join(ship_name("db", "snapshots/s1")).exists());
        // The last pack comes: the list is done, the snapshot and the index follow.
        arrive("packs/cd/p2", b"pack two");
        let p = place_all(&incoming, &backups).unwrap();
        assert_eq!(p.files, 3, "{p:?}");
        assert!(copy.join("snapshots/s1").exists() && copy.join("index/i1").exists());
        assert!(!incoming.join(ship_name("db", "awaits/aw1")).exists());
        // A list naming a hostile path is refused, and holds nothing back.
        let bad = AwaitsList {
            repo: "db".into(),
            paths: vec!["../../etc/passwd".into()],
            id: "aw2".into(),
        };
        arrive("awaits/aw2", &serde_json::to_vec(&bad).unwrap());
        arrive("snapshots/s2", b"snapshot two");
        let p = place_all(&incoming, &backups).unwrap();
        assert_eq!((p.files, p.refused), (1, 1), "{p:?}");
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
