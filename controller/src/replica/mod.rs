//! Disaster recovery of the controller itself: a standby at the DR centre follows the primary
//! over QUIC and takes over when told to (`tiandi-controller standby --primary ADDR`, then
//! `tiandi-controller promote`).
//!
//! What is replicated: every report as the primary stored it (the standby stores it through
//! its own [`crate::store::Store`], so its sequence states and device events are exact), every key of the trees
//! in [`TREES`] (the registry and its tokens, operator accounts and their API tokens, console
//! sessions, the audit log, alarm acknowledgements, the alarm log, backup results), the files
//! in [`FILES`] (the CA and its key, the API tokens) and the primary's effective configuration
//! (kept as `replica/primary.toml`, for reference: the standby runs on its own). Not replicated:
//! transfer queues and received files (senders offer them again), backup copies kept for
//! partners (they are backups themselves), recordings.
//!
//! Fencing: each controller has an epoch (1 at first); a promoted standby takes the primary's
//! epoch + 1. Agents carry the highest epoch they have seen (in every Hello) and refuse a
//! controller below it; a controller that hears of a higher epoch — from an agent's Hello, from
//! a peer it asks at start (`[replica] peers`), or from a standby — stands down: it closes every
//! site connection and accepts none until restarted as a standby. See `wire` for the protocol,
//! `log` for the primary's log, `primary` and `standby` for the two sides.

pub mod export;
pub mod log;
pub mod primary;
pub mod standby;
pub mod wire;

/// Trees replicated key by key as they change.
pub const TREES: &[&str] = &[
    "sites",
    "tokens",
    "users",
    "user_tokens",
    "sessions",
    "audit",
    "alarm_acks",
    "alarms",
    "backup-results",
    "backup-meta",
    "backup-leases",
    // Tier two (`federation`): the ministry's national view, a province's forwarding cursor
    // and roster number.
    "national_sites",
    "national_meta",
    "national_alarms",
    "upstream",
];

/// Trees sent whole in a snapshot and kept by reports afterwards (the store's history, its
/// sequence states and the device events its reports carried).
pub const REPORT_TREES: &[&str] = &["history", "seqs", crate::store::DEVICE_EVENTS_TREE];

/// Files of the data directory replicated, with their modes.
pub const FILES: &[(&str, u32)] = &[
    ("ca.pem", 0o644),
    ("ca.key", 0o600),
    ("admin.token", 0o600),
    ("read.token", 0o600),
    ("metrics.token", 0o600),
];

/// Where the primary's configuration is kept at the standby.
pub const PRIMARY_CONFIG: &str = "replica/primary.toml";

/// This controller's own tree: its fencing epoch and, at a standby, where it stands.
pub const META_TREE: &str = "replica";
const EPOCH_KEY: &[u8] = b"epoch";

/// The fencing epoch stored in `db` (1 for a controller that never took over).
pub fn epoch(db: &sled::Db) -> Result<u64, sled::Error> {
    Ok(db
        .open_tree(META_TREE)?
        .get(EPOCH_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(1, u64::from_be_bytes))
}

pub fn set_epoch(db: &sled::Db, epoch: u64) -> Result<(), sled::Error> {
    db.open_tree(META_TREE)?
        .insert(EPOCH_KEY, &epoch.to_be_bytes())?;
    db.flush()?;
    Ok(())
}

/// Whether `name` is a replicated file (a name from the network is checked against this list
/// before it touches a path).
pub fn file_mode(name: &str) -> Option<u32> {
    FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, m)| *m)
        .or((name == "primary.toml").then_some(0o600))
}
