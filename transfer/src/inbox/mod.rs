//! The receiving side: one [`Inbox`] per node, serving one stream per incoming transfer.
//!
//! State per transfer (sled, keyed by the sending peer and the file's hash: see [`key`]): the
//! manifest, the bitmap of chunks verified *and* durable in the temporary file, and the
//! receipt once complete. A peer identified by its certificate (a site sending to the
//! controller) has transfers of its own: offering the hash of another site's file starts a
//! new transfer of its own, and learns nothing of the other's (no Have of its chunks, no
//! receipt, no error that says it exists). Chunks are
//! written with `pwrite` into `.<name>.<hash8>.part` in the destination directory; every
//! [`SYNC_CHUNKS`] chunks or [`SYNC_INTERVAL`] (and whenever the stream ends, cleanly or not)
//! the file is fsynced, the bitmap stored, and only then are those chunks acknowledged.
//!
//! By job: `serve` (the accept loop, each stream's first frame), `receive` (one transfer into
//! its part file), `chunks` (chunk streams routed to their transfer), `forward` and `site`
//! (relays' reports and site checks), `expire` (old states and abandoned part files).

mod chunks;
mod expire;
mod forward;
mod receive;
mod serve;
mod site;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::TransferError;
use crate::manifest::Manifest;
use crate::transfer_wire::{Bitmap, Receipt};

use chunks::{ChunkTx, Partial};
pub use expire::{Expired, KEEP_ABANDONED, KEEP_COMPLETE};
pub use forward::ForwardSink;
pub(crate) use serve::refuse as refuse_on;
pub use serve::{accept_loop, accept_loop_raising};
pub use site::SiteCheck;

/// Acknowledge (after an fsync) at least every this many chunks…
pub const SYNC_CHUNKS: usize = 16;
/// …and at least this often while chunks arrive.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// A paused sender retries after this long when the disk is full.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(15);
/// Chunks waiting for their transfer's task. Full: the chunk streams' readers wait, and QUIC
/// flow control slows the sender (nothing is dropped).
const CHUNK_QUEUE: usize = 32;
/// How long a chunk stream waits for its transfer's Offer to be processed (they travel on
/// different streams and may overtake each other).
const ROUTE_WAIT: Duration = Duration::from_secs(10);
/// Memory for chunks received in part when a connection broke (the oldest go beyond it).
const PARTIAL_BUDGET: usize = 64 * 1024 * 1024;
/// …and for one peer's (its own oldest go first): one site cannot push out another's.
const PEER_PARTIAL_BUDGET: usize = 16 * 1024 * 1024;
/// Chunk bytes one connection may hold in memory (read from QUIC, not yet written to the
/// part file; a chunk stream reserves its chunk's length once its header names it). A stream
/// that finds no room waits unread, so QUIC's flow control holds its sender back; after
/// [`BUDGET_WAIT`] it is stopped with [`codes::BUSY`](crate::transfer_wire::codes::BUSY)
/// (the sender retries the transfer later, from the receiver's `Have`). A geostationary link
/// at 20 Mbit/s has ~1.5 MB in flight; this is twenty times that.
pub const CONN_CHUNK_BUDGET: usize = 32 * 1024 * 1024;
/// Chunk bytes all connections together may hold in memory (same policy when full).
pub const INBOX_CHUNK_BUDGET: usize = 256 * 1024 * 1024;
/// How long a chunk stream waits for room in the budgets before it is refused.
const BUDGET_WAIT: Duration = Duration::from_secs(20);
/// A chunk stream must deliver at least this many bytes per second of its chunk (and gets at
/// least [`CHUNK_MIN_TIME`]), or it is stopped and what arrived is kept as a partial chunk:
/// a peer that trickles cannot hold the budgets for good.
const CHUNK_MIN_RATE: u64 = 8 * 1024;
const CHUNK_MIN_TIME: Duration = Duration::from_secs(60);
/// Longest transfer ID, priority or origin in an offer, and most sites to forward to.
const MAX_LABEL: usize = 256;
const MAX_FORWARD_TO: usize = 4096;

/// The state key of the transfer of file `hash_hex` from `peer`: the bare hash for a node
/// above (the controller, a relay: what sites and relays receive), `s/<peer>/<hash>` for a
/// peer identified by its certificate (each site's uploads are its own).
pub(super) fn key(peer: Option<&str>, hash_hex: &str) -> String {
    match peer {
        None => hash_hex.to_string(),
        Some(p) => format!("s/{p}/{hash_hex}"),
    }
}

/// A transfer's state. Stored under its file hash without the chunk hashes, which are stored
/// once beside it under `m/<file hash>` ([`Inbox::get`] attaches them).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct InState {
    #[serde(with = "crate::manifest::head")]
    pub manifest: Manifest,
    pub verified: Bitmap,
    pub origin: String,
    pub transfer_id: String,
    pub priority: String,
    pub forward_to: Vec<String>,
    pub part: PathBuf,
    pub dest: PathBuf,
    pub started_ms: i64,
    /// When its sender last offered it or chunks last became durable (0 in states stored
    /// before it was kept).
    #[serde(default)]
    pub touched_ms: i64,
    pub receipt: Option<Receipt>,
}

/// What the inbox tells its owner (alarms, relays).
#[derive(Clone, Debug)]
pub enum InboxEvent {
    /// A file is complete, verified and in place.
    Complete(Box<InState>),
    /// A file already here was offered again (its `touched_ms` is the offer's time): on a
    /// relay, the sites below get it again.
    Reoffered(Box<InState>),
    /// The disk cannot hold the rest of a transfer: paused until space is freed.
    DiskFull {
        name: String,
        needed: u64,
        free: u64,
    },
    /// Space is back for a transfer that was paused.
    DiskOk { name: String },
}

pub struct Inbox {
    dir: PathBuf,
    forward_sink: std::sync::OnceLock<ForwardSink>,
    site_check: std::sync::OnceLock<SiteCheck>,
    pub(crate) lease: std::sync::OnceLock<crate::lease::LeaseHandler>,
    tree: sled::Tree,
    node: String,
    /// Space kept free on the destination's file system.
    pub reserve_bytes: u64,
    events: Option<mpsc::Sender<InboxEvent>>,
    /// One stream per transfer at a time: a new offer takes over from a stale stream. (All
    /// the maps below are by transfer [`key`].)
    active: Mutex<HashMap<String, Active>>,
    paused_full: Mutex<std::collections::HashSet<String>>,
    /// Where each receiving transfer takes its chunks.
    routes: Mutex<HashMap<String, ChunkTx>>,
    /// Chunks received in part, by (transfer key, index), and each transfer's (size, chunk
    /// size).
    partials: Mutex<HashMap<(String, u32), Partial>>,
    shapes: Mutex<HashMap<String, (u64, u32)>>,
    route_added: tokio::sync::Notify,
    /// Chunk bytes held in memory by every connection together ([`INBOX_CHUNK_BUDGET`]).
    chunk_memory: Arc<tokio::sync::Semaphore>,
    /// Chunk payload bytes read from chunk streams since start, every connection together (a
    /// byte that arrives twice counts twice: beyond the files' sizes, this is what cuts and
    /// retries cost the link).
    pub chunk_bytes_in: std::sync::atomic::AtomicU64,
}

/// How a served stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    Complete,
    AlreadyHad,
    Paused,
    Refused,
    Interrupted,
}

/// The live stream of one transfer: a token to stop it, and the lock its successor waits on.
type Active = (CancellationToken, Arc<tokio::sync::Mutex<()>>);

fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(u64::MAX)
}

impl Inbox {
    /// Files land in `dir`; state lives in `tree`; receipts name `node`.
    pub fn new(
        dir: &Path,
        tree: sled::Tree,
        node: &str,
        events: Option<mpsc::Sender<InboxEvent>>,
    ) -> Result<Arc<Inbox>, TransferError> {
        std::fs::create_dir_all(dir).map_err(|e| TransferError::io(dir, e))?;
        Ok(Arc::new(Inbox {
            dir: dir.to_path_buf(),
            forward_sink: Default::default(),
            site_check: Default::default(),
            lease: Default::default(),
            tree,
            node: node.to_string(),
            reserve_bytes: 0,
            events,
            active: Mutex::new(HashMap::new()),
            paused_full: Mutex::new(Default::default()),
            routes: Mutex::new(HashMap::new()),
            partials: Mutex::new(HashMap::new()),
            shapes: Mutex::new(HashMap::new()),
            route_added: tokio::sync::Notify::new(),
            chunk_memory: Arc::new(tokio::sync::Semaphore::new(INBOX_CHUNK_BUDGET)),
            chunk_bytes_in: Default::default(),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files from an identified peer land in `dir/<peer>/`, and their origin is the peer
    /// (whatever the offer says). Always so now (a peer's transfers are its own, its files
    /// too); kept for the callers that ask for it.
    pub fn use_per_peer_dirs(&self) {}

    /// Where a receipt says a file is: its path relative to the inbox (`<site>/<name>` at the
    /// controller, `<name>` at a site), never the node's own directories.
    pub(super) fn receipt_path(&self, dest: &Path) -> String {
        match dest.strip_prefix(&self.dir) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    fn emit(&self, e: InboxEvent) {
        if let Some(tx) = &self.events
            && tx.try_send(e).is_err()
        {
            warn!(
                "Inbox event queue full: an event was dropped (the state store keeps the truth)."
            );
        }
    }

    /// Every transfer this node holds or is receiving (manifests without chunk hashes), from
    /// every peer.
    pub fn list(&self) -> Result<Vec<InState>, TransferError> {
        Ok(self.list_keyed()?.into_iter().map(|(_, s)| s).collect())
    }

    /// [`Inbox::list`] with each state's key.
    pub(super) fn list_keyed(&self) -> Result<Vec<(String, InState)>, TransferError> {
        let mut v = Vec::new();
        for kv in self.tree.iter() {
            let (key, val) = kv?;
            if key.starts_with(b"m/") {
                continue;
            }
            if let Ok(s) = serde_json::from_slice::<InState>(&val) {
                v.push((String::from_utf8_lossy(&key).into_owned(), s));
            }
        }
        Ok(v)
    }

    /// One transfer's state, with its whole manifest: a transfer from the node above (the
    /// controller or a relay), as sites and relays receive them.
    pub fn get(&self, file_hash_hex: &str) -> Result<Option<InState>, TransferError> {
        self.get_from(None, file_hash_hex)
    }

    /// One transfer's state from `peer` (see [`Inbox::get`]; `Some(site)`: that site's
    /// upload, at the controller), with its whole manifest.
    pub fn get_from(
        &self,
        peer: Option<&str>,
        file_hash_hex: &str,
    ) -> Result<Option<InState>, TransferError> {
        self.get_key(&key(peer, file_hash_hex))
    }

    pub(super) fn get_key(&self, key: &str) -> Result<Option<InState>, TransferError> {
        let Some(mut st) = self
            .tree
            .get(key.as_bytes())?
            .and_then(|v| serde_json::from_slice::<InState>(&v).ok())
        else {
            return Ok(None);
        };
        match self.tree.get(format!("m/{key}"))? {
            Some(b) => st.manifest = crate::manifest::decode(&b)?,
            // State without its manifest (cannot happen: it is written first): start over.
            None => return Ok(None),
        }
        Ok(Some(st))
    }

    fn store(&self, key: &str, s: &InState) -> Result<(), TransferError> {
        self.tree.insert(
            key.as_bytes(),
            serde_json::to_vec(s).expect("state serialises"),
        )?;
        self.tree.flush()?;
        Ok(())
    }

    /// [`Inbox::store`] without blocking the async workers on the flush.
    async fn store_async(&self, key: &str, s: &InState) -> Result<(), TransferError> {
        self.tree.insert(
            key.as_bytes(),
            serde_json::to_vec(s).expect("state serialises"),
        )?;
        crate::flush_off_thread(&self.tree).await?;
        Ok(())
    }

    /// Transfers paused on a full disk.
    pub fn paused_on_full_disk(&self) -> usize {
        self.paused_full.lock().expect("inbox lock poisoned").len()
    }
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> Result<[u8; 32], TransferError> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| TransferError::io(path, e))?;
    h.update_reader(f).map_err(|e| TransferError::io(path, e))?;
    Ok(*h.finalize().as_bytes())
}
