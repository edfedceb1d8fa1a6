//! The receiving side: one [`Inbox`] per node, serving one stream per incoming transfer.
//!
//! State per transfer (sled, keyed by the file's hash): the manifest, the bitmap of chunks
//! verified *and* durable in the temporary file, and the receipt once complete. Chunks are
//! written with `pwrite` into `.<name>.<hash8>.part` in the destination directory; every
//! [`SYNC_CHUNKS`] chunks or [`SYNC_INTERVAL`] (and whenever the stream ends, cleanly or not)
//! the file is fsynced, the bitmap stored, and only then are those chunks acknowledged.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::manifest::Manifest;
use crate::wire::{
    self, Acked, Bitmap, Failed, Frame, Have, Offer, Reader, Receipt, Resend, Writer, codes, next,
    put,
};
use crate::{TransferError, now_ms};

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
/// A complete transfer's state (its manifest and receipt: a sender offering the file again
/// is answered at once) is kept this long after the file was verified.
pub const KEEP_COMPLETE: Duration = Duration::from_secs(30 * 86_400);
/// A transfer left incomplete, neither offered again nor added to for this long, is
/// abandoned (its sender gave up or was removed): its part file is deleted and its state
/// forgotten. A sender coming back later starts it again from the beginning.
pub const KEEP_ABANDONED: Duration = Duration::from_secs(14 * 86_400);

/// A chunk received in part: what arrived of it, kept in memory so that after a broken
/// connection only the rest is sent again (a cut otherwise costs every chunk that missed a
/// packet, whole).
struct Partial {
    data: Vec<u8>,
    have: wire::Ranges,
    touched: Instant,
}

type ChunkTx = mpsc::Sender<(u32, bytes::Bytes)>;

/// A transfer's chunk route, removed when its task ends.
struct Route<'a> {
    inbox: &'a Inbox,
    id: String,
    tx: ChunkTx,
}

impl<'a> Route<'a> {
    fn add(inbox: &'a Inbox, id: &str, tx: ChunkTx) -> Route<'a> {
        inbox
            .routes
            .lock()
            .expect("inbox lock poisoned")
            .insert(id.to_string(), tx.clone());
        inbox.route_added.notify_waiters();
        Route {
            inbox,
            id: id.to_string(),
            tx,
        }
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let mut routes = self.inbox.routes.lock().expect("inbox lock poisoned");
        if routes
            .get(&self.id)
            .is_some_and(|t| t.same_channel(&self.tx))
        {
            routes.remove(&self.id);
        }
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

/// What [`Inbox::expire`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Complete transfers forgotten (their files stay).
    pub complete: usize,
    /// Abandoned transfers whose part files were deleted.
    pub abandoned: usize,
    /// Bytes of part files deleted.
    pub bytes_freed: u64,
}

/// What the inbox tells its owner (alarms, relays).
#[derive(Clone, Debug)]
pub enum InboxEvent {
    /// A file is complete, verified and in place.
    Complete(Box<InState>),
    /// The disk cannot hold the rest of a transfer: paused until space is freed.
    DiskFull {
        name: String,
        needed: u64,
        free: u64,
    },
    /// Space is back for a transfer that was paused.
    DiskOk { name: String },
}

/// Takes a relay's report of its forwarded copies: (the relay's site ID, the items). An error
/// is sent back to the relay, which reports again later.
pub type ForwardSink =
    Arc<dyn Fn(&str, &[wire::ForwardStatus]) -> Result<(), String> + Send + Sync>;
/// Answers a relay's question whether a site below may connect: (the relay's site ID, the
/// question); Err says why not.
pub type SiteCheck = Arc<dyn Fn(&str, &wire::CheckSite) -> Result<(), String> + Send + Sync>;

pub struct Inbox {
    dir: PathBuf,
    /// Files from a known peer land in `dir/<peer>/` (the controller: sites may send files of
    /// the same name).
    per_peer_dirs: std::sync::atomic::AtomicBool,
    forward_sink: std::sync::OnceLock<ForwardSink>,
    site_check: std::sync::OnceLock<SiteCheck>,
    tree: sled::Tree,
    node: String,
    /// Space kept free on the destination's file system.
    pub reserve_bytes: u64,
    events: Option<mpsc::Sender<InboxEvent>>,
    /// One stream per transfer at a time: a new offer takes over from a stale stream.
    active: Mutex<HashMap<String, Active>>,
    paused_full: Mutex<std::collections::HashSet<String>>,
    /// Where each receiving transfer takes its chunks (by file hash).
    routes: Mutex<HashMap<String, ChunkTx>>,
    /// Chunks received in part, by (file hash, index), and each transfer's (size, chunk size).
    partials: Mutex<HashMap<(String, u32), Partial>>,
    shapes: Mutex<HashMap<String, (u64, u32)>>,
    route_added: tokio::sync::Notify,
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
            per_peer_dirs: Default::default(),
            forward_sink: Default::default(),
            site_check: Default::default(),
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
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files from an identified peer land in `dir/<peer>/`, and their origin is the peer
    /// (whatever the offer says).
    pub fn use_per_peer_dirs(&self) {
        self.per_peer_dirs
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Who answers relays' site checks (once; later calls are ignored).
    pub fn on_site_check(&self, check: SiteCheck) {
        let _ = self.site_check.set(check);
    }

    /// Where relays' reports of forwarded copies go (once; later calls are ignored).
    pub fn on_forwarded(&self, sink: ForwardSink) {
        let _ = self.forward_sink.set(sink);
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

    /// Every transfer this node holds or is receiving (manifests without chunk hashes).
    pub fn list(&self) -> Result<Vec<InState>, TransferError> {
        let mut v = Vec::new();
        for kv in self.tree.iter() {
            let (key, val) = kv?;
            if key.starts_with(b"m/") {
                continue;
            }
            if let Ok(s) = serde_json::from_slice::<InState>(&val) {
                v.push(s);
            }
        }
        Ok(v)
    }

    /// One transfer's state, with its whole manifest.
    pub fn get(&self, file_hash_hex: &str) -> Result<Option<InState>, TransferError> {
        let Some(mut st) = self
            .tree
            .get(file_hash_hex.as_bytes())?
            .and_then(|v| serde_json::from_slice::<InState>(&v).ok())
        else {
            return Ok(None);
        };
        match self.tree.get(format!("m/{file_hash_hex}"))? {
            Some(b) => st.manifest = crate::manifest::decode(&b)?,
            // State without its manifest (cannot happen: it is written first): start over.
            None => return Ok(None),
        }
        Ok(Some(st))
    }

    fn store(&self, s: &InState) -> Result<(), TransferError> {
        self.tree.insert(
            s.manifest.id_hex().as_bytes(),
            serde_json::to_vec(s).expect("state serialises"),
        )?;
        self.tree.flush()?;
        Ok(())
    }

    /// [`Inbox::store`] without blocking the async workers on the flush.
    async fn store_async(&self, s: &InState) -> Result<(), TransferError> {
        self.tree.insert(
            s.manifest.id_hex().as_bytes(),
            serde_json::to_vec(s).expect("state serialises"),
        )?;
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Serves one incoming transfer stream until the file is complete, the sender stops, or the
    /// stream breaks. Errors here are the stream's own; the caller logs them and goes on.
    ///
    /// `peer` is the sending node as the connection's certificate names it (None where the
    /// peer is the controller or a relay above).
    pub async fn serve(
        self: &Arc<Self>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: Option<&str>,
    ) -> Result<Served, TransferError> {
        let mut r: Reader = FramedRead::new(recv, wire::codec());
        let mut w: Writer = FramedWrite::new(send, wire::codec());
        let first = match next(&mut r).await {
            Ok(f) => f,
            Err(e) => {
                refuse(&mut w, codes::PROTOCOL, &e.to_string()).await;
                return Err(e);
            }
        };
        let mut offer = match first {
            Some(Frame::Offer(o)) => o,
            Some(Frame::Forwarded(f)) => return self.forwarded(peer, f, &mut w).await,
            Some(Frame::CheckSite(c)) => {
                let (Some(peer), Some(check)) = (peer, self.site_check.get()) else {
                    let msg = "this node answers no site checks";
                    refuse(&mut w, codes::PROTOCOL, msg).await;
                    return Err(TransferError::Protocol(msg.into()));
                };
                match check(peer, &c) {
                    Ok(()) => {
                        put(&mut w, Frame::Acked(Acked { chunks: Vec::new() })).await?;
                        let _ = w.get_mut().finish();
                    }
                    Err(why) => refuse(&mut w, codes::UNKNOWN_DESTINATION, &why).await,
                }
                return Ok(Served::Complete);
            }
            Some(other) => {
                let msg = format!("expected Offer, got {}", other.kind());
                refuse(&mut w, codes::PROTOCOL, &msg).await;
                return Err(TransferError::Protocol(msg));
            }
            None => return Ok(Served::Interrupted),
        };
        // A resumed transfer's offer leaves the chunk hashes out (on a satellite link they are
        // not free: 32 bytes per chunk); they are in this inbox's state, if it has one.
        let known = if offer.is_short() {
            match self.get(&hex::encode(&offer.file_hash))? {
                Some(st) if st.manifest.size == offer.size && st.manifest.name == offer.name => {
                    Some(st.manifest)
                }
                _ => {
                    refuse(
                        &mut w,
                        codes::NEED_MANIFEST,
                        "unknown transfer: offer the manifest",
                    )
                    .await;
                    return Ok(Served::Refused);
                }
            }
        } else {
            None
        };
        let manifest = match known.map(Ok).unwrap_or_else(|| offer.manifest()) {
            Ok(m) => m,
            Err(e) => {
                let code = if matches!(e, TransferError::Version(_)) {
                    codes::VERSION
                } else {
                    codes::PROTOCOL
                };
                refuse(&mut w, code, &e.to_string()).await;
                return Err(e);
            }
        };
        let id = manifest.id_hex();
        // Take over from an older stream of the same transfer (a link cut leaves it hanging).
        let (token, lock) = {
            let mut active = self.active.lock().expect("inbox lock poisoned");
            let entry = active
                .entry(id.clone())
                .or_insert_with(|| (CancellationToken::new(), Default::default()));
            entry.0.cancel();
            entry.0 = CancellationToken::new();
            (entry.0.clone(), entry.1.clone())
        };
        let _guard = lock.lock().await;
        let dir = match peer {
            Some(p)
                if self
                    .per_peer_dirs
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                offer.origin = p.to_string();
                let d = self.dir.join(p);
                std::fs::create_dir_all(&d).map_err(|e| TransferError::io(&d, e))?;
                d
            }
            _ => self.dir.clone(),
        };
        let result = self
            .receive(&offer, manifest, &dir, &mut r, &mut w, &token)
            .await;
        if let Err(e) = &result
            && matches!(e, TransferError::Io { .. } | TransferError::Db(_))
        {
            refuse(&mut w, codes::STORAGE, &e.to_string()).await;
        }
        result
    }

    /// A relay's report of its forwarded copies.
    async fn forwarded(
        &self,
        peer: Option<&str>,
        f: wire::Forwarded,
        w: &mut Writer,
    ) -> Result<Served, TransferError> {
        let (Some(peer), Some(sink)) = (peer, self.forward_sink.get()) else {
            let msg = "this node takes no relay reports";
            refuse(w, codes::PROTOCOL, msg).await;
            return Err(TransferError::Protocol(msg.into()));
        };
        // The sink writes (and flushes) state: off the async workers.
        let (sink, peer_owned, items) = (sink.clone(), peer.to_string(), f.items);
        let applied = tokio::task::spawn_blocking(move || sink(&peer_owned, &items))
            .await
            .unwrap_or_else(|e| Err(format!("relay report task: {e}")));
        match applied {
            Ok(()) => {
                put(w, Frame::Acked(Acked { chunks: Vec::new() })).await?;
                let _ = w.get_mut().finish();
                Ok(Served::Complete)
            }
            Err(e) => {
                refuse(w, codes::STORAGE, &e).await;
                Err(TransferError::Stream(e))
            }
        }
    }

    async fn receive(
        &self,
        offer: &Offer,
        manifest: Manifest,
        dir: &Path,
        r: &mut Reader,
        w: &mut Writer,
        cancel: &CancellationToken,
    ) -> Result<Served, TransferError> {
        let id = manifest.id_hex();
        let mut st = match self.get(&id)? {
            Some(s) if s.manifest == manifest => s,
            _ => InState {
                part: dir.join(format!(".{}.{}.part", manifest.name, &id[..8])),
                dest: dir.join(&manifest.name),
                verified: Bitmap::new(manifest.chunk_count()),
                manifest: manifest.clone(),
                origin: offer.origin.clone(),
                transfer_id: offer.transfer_id.clone(),
                priority: offer.priority.clone(),
                forward_to: offer.forward_to.clone(),
                started_ms: now_ms(),
                touched_ms: 0,
                receipt: None,
            },
        };
        // Its sender is still there (even if it is only told the disk is full again).
        st.touched_ms = now_ms();
        // Already here and intact: answer with the receipt.
        if let Some(receipt) = &st.receipt {
            if st.dest.exists() {
                put(w, Frame::Done(receipt.clone())).await?;
                let _ = w.get_mut().finish();
                return Ok(Served::AlreadyHad);
            }
            // The file was removed since: receive it again.
            st.receipt = None;
            st.verified = Bitmap::new(manifest.chunk_count());
        }
        if !self.tree.contains_key(format!("m/{id}"))? {
            self.tree
                .insert(format!("m/{id}"), crate::manifest::encode(&manifest))?;
        }
        // A relay learns new destinations from a repeated offer.
        for f in &offer.forward_to {
            if !st.forward_to.contains(f) {
                st.forward_to.push(f.clone());
            }
        }
        let part = st.part.clone();
        let io = |e| TransferError::io(&part, e);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .truncate(false)
            .open(&st.part)
            .map_err(io)?;
        // A part file shorter than its verified chunks (lost by a crash before the state was
        // written? never: the state follows the fsync) — trust only what is really there.
        let on_disk = file.metadata().map_err(io)?.len();
        let mut trusted = Bitmap::new(manifest.chunk_count());
        for i in 0..manifest.chunk_count() {
            if st.verified.get(i) && manifest.offset(i) + manifest.chunk_len(i) as u64 <= on_disk {
                trusted.set(i);
            }
        }
        st.verified = trusted;
        // Room for what is missing?
        let missing: u64 = st
            .verified
            .missing()
            .map(|i| manifest.chunk_len(i) as u64)
            .sum();
        let free = free_bytes(&self.dir);
        if free < missing.saturating_add(self.reserve_bytes) {
            return self.disk_full(&st, w, missing, free).await;
        }
        self.disk_ok(&st);
        self.store_async(&st).await?;
        self.shapes
            .lock()
            .expect("inbox lock poisoned")
            .insert(id.clone(), (manifest.size, manifest.chunk_size));
        let partial: Vec<wire::PartialChunk> = self
            .partials
            .lock()
            .expect("inbox lock poisoned")
            .iter()
            .filter(|((h, i), _)| *h == id && !st.verified.get(*i))
            .map(|((_, i), p)| wire::PartialChunk {
                index: *i,
                ranges: p.have.to_wire(),
            })
            .collect();
        put(
            w,
            Frame::Have(Have {
                verified: st.verified.as_bytes().to_vec(),
                partial,
            }),
        )
        .await?;
        info!(transfer = %st.transfer_id, name = %manifest.name, have = st.verified.count(), of = manifest.chunk_count(), "Receiving.");

        // Chunks arrive on streams of their own (see `accept_chunk`); they are routed here.
        let (tx, mut chunks) = mpsc::channel::<(u32, bytes::Bytes)>(CHUNK_QUEUE);
        let _route = Route::add(self, &id, tx);
        let mut pending: Vec<u32> = Vec::new();
        let mut first_pending: Option<Instant> = None;
        while !st.verified.complete() {
            let deadline = first_pending.map(|t| t + SYNC_INTERVAL);
            let (index, data) = tokio::select! {
                _ = cancel.cancelled() => {
                    self.commit(&file, &mut st, &mut pending, w, false).await?;
                    return Ok(Served::Interrupted);
                }
                _ = sleep_until(deadline) => {
                    self.commit(&file, &mut st, &mut pending, w, true).await?;
                    first_pending = None;
                    continue;
                }
                c = chunks.recv() => match c {
                    Some(c) => c,
                    None => {
                        self.commit(&file, &mut st, &mut pending, w, false).await?;
                        return Ok(Served::Interrupted);
                    }
                },
                f = next(r) => match f {
                    Ok(Some(other)) => {
                        self.commit(&file, &mut st, &mut pending, w, false).await?;
                        let msg = format!("unexpected {} from the sender", other.kind());
                        refuse(w, codes::PROTOCOL, &msg).await;
                        return Err(TransferError::Protocol(msg));
                    }
                    Ok(None) | Err(_) => {
                        // The sender stopped or the link broke: keep what arrived.
                        self.commit(&file, &mut st, &mut pending, w, false).await?;
                        return Ok(Served::Interrupted);
                    }
                },
            };
            if index >= manifest.chunk_count() {
                let msg = format!("chunk {index} of a {}-chunk file", manifest.chunk_count());
                refuse(w, codes::PROTOCOL, &msg).await;
                return Err(TransferError::Protocol(msg));
            }
            if st.verified.get(index) || pending.contains(&index) {
                continue;
            }
            if data.len() != manifest.chunk_len(index)
                || *blake3::hash(&data).as_bytes() != manifest.chunks[index as usize]
            {
                warn!(transfer = %st.transfer_id, chunk = index, "Chunk failed its check: asking again.");
                put(
                    w,
                    Frame::Resend(Resend {
                        chunk: index,
                        reason: "hash mismatch".into(),
                    }),
                )
                .await?;
                continue;
            }
            if let Err(e) = file.write_all_at(&data, manifest.offset(index)) {
                self.commit(&file, &mut st, &mut pending, w, false).await?;
                if e.raw_os_error() == Some(nix::libc::ENOSPC) {
                    let missing: u64 = st
                        .verified
                        .missing()
                        .map(|i| manifest.chunk_len(i) as u64)
                        .sum();
                    return self.disk_full(&st, w, missing, free_bytes(&self.dir)).await;
                }
                return Err(io(e));
            }
            pending.push(index);
            first_pending.get_or_insert_with(Instant::now);
            // The last chunk in: commit now, not at the next sync (it would hold up the receipt
            // for up to `SYNC_INTERVAL`).
            let all_in =
                st.verified.count() as usize + pending.len() >= manifest.chunk_count() as usize;
            if pending.len() >= SYNC_CHUNKS || all_in {
                self.commit(&file, &mut st, &mut pending, w, true).await?;
                first_pending = None;
            }
        }
        self.commit(&file, &mut st, &mut pending, w, true).await?;
        // Every chunk verified and durable: check the whole file, then put it in place.
        let part = st.part.clone();
        let whole = tokio::task::spawn_blocking(move || hash_file(&part))
            .await
            .map_err(|e| TransferError::Stream(format!("hash task: {e}")))??;
        if whole != manifest.file_hash {
            // Cannot happen with verified chunks unless the part file was tampered with.
            let _ = std::fs::remove_file(&st.part);
            self.tree.remove(id.as_bytes())?;
            let msg = "the assembled file does not match its hash; starting over".to_string();
            refuse(w, codes::VERIFY, &msg).await;
            return Err(TransferError::Protocol(msg));
        }
        drop(file);
        std::fs::rename(&st.part, &st.dest).map_err(|e| TransferError::io(&st.dest, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TransferError::io(dir, e))?;
        let receipt = Receipt {
            file_hash: id.clone(),
            size: manifest.size,
            path: st.dest.display().to_string(),
            verified_ms: now_ms(),
            node: self.node.clone(),
        };
        st.receipt = Some(receipt.clone());
        self.store_async(&st).await?;
        info!(transfer = %st.transfer_id, path = %st.dest.display(), bytes = manifest.size, "File verified and in place.");
        put(w, Frame::Done(receipt)).await?;
        let _ = w.get_mut().finish();
        self.partials
            .lock()
            .expect("inbox lock poisoned")
            .retain(|(h, _), _| *h != id);
        self.shapes.lock().expect("inbox lock poisoned").remove(&id);
        self.emit(InboxEvent::Complete(Box::new(st)));
        Ok(Served::Complete)
    }

    /// Makes `pending` durable (fsync, then the bitmap), then acknowledges it if `ack`.
    async fn commit(
        &self,
        file: &std::fs::File,
        st: &mut InState,
        pending: &mut Vec<u32>,
        w: &mut Writer,
        ack: bool,
    ) -> Result<(), TransferError> {
        if pending.is_empty() {
            return Ok(());
        }
        // fsync off the async workers: they also drive QUIC.
        let io = |e| TransferError::io(&st.part, e);
        let f = file.try_clone().map_err(io)?;
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| TransferError::Stream(format!("fsync task: {e}")))?
            .map_err(io)?;
        for i in pending.iter() {
            st.verified.set(*i);
        }
        st.touched_ms = now_ms();
        self.store_async(st).await?;
        let chunks = std::mem::take(pending);
        if ack {
            // The sender may be gone already; what is stored stays stored.
            let _ = put(w, Frame::Acked(Acked { chunks })).await;
        }
        Ok(())
    }

    async fn disk_full(
        &self,
        st: &InState,
        w: &mut Writer,
        needed: u64,
        free: u64,
    ) -> Result<Served, TransferError> {
        let _ = self.store(st);
        let first = self
            .paused_full
            .lock()
            .expect("inbox lock poisoned")
            .insert(st.manifest.id_hex());
        if first {
            warn!(transfer = %st.transfer_id, name = %st.manifest.name, needed, free, "Disk full: transfer paused until space is freed.");
            self.emit(InboxEvent::DiskFull {
                name: st.manifest.name.clone(),
                needed,
                free,
            });
        }
        let _ = put(
            w,
            Frame::Failed(Failed {
                code: codes::DISK_FULL,
                message: format!(
                    "disk full on {}: {needed} bytes needed, {free} free",
                    self.node
                ),
                retry_after_ms: DISK_FULL_RETRY.as_millis() as u64,
            }),
        )
        .await;
        let _ = w.get_mut().finish();
        Ok(Served::Paused)
    }

    fn disk_ok(&self, st: &InState) {
        let was = self
            .paused_full
            .lock()
            .expect("inbox lock poisoned")
            .remove(&st.manifest.id_hex());
        if was {
            info!(transfer = %st.transfer_id, "Disk space is back: transfer resumes.");
            self.emit(InboxEvent::DiskOk {
                name: st.manifest.name.clone(),
            });
        }
    }

    /// Forgets complete transfers verified more than `keep_complete` before `now_ms`, and
    /// deletes the part files of incomplete ones untouched for `keep_abandoned`. A transfer
    /// being received is left alone; one offered while it is being removed waits, then
    /// starts afresh.
    pub fn expire(
        &self,
        now_ms: i64,
        keep_complete: Duration,
        keep_abandoned: Duration,
    ) -> Result<Expired, TransferError> {
        let mut out = Expired::default();
        let age = |t: i64| Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64);
        let due = |st: &InState| match &st.receipt {
            Some(r) => age(r.verified_ms) > keep_complete,
            None => age(st.touched_ms.max(st.started_ms)) > keep_abandoned,
        };
        for st in self.list()? {
            if !due(&st) {
                continue;
            }
            let id = st.manifest.id_hex();
            // Hold the transfer's lock, as its stream does: skip it if one is running.
            let lock = self
                .active
                .lock()
                .expect("inbox lock poisoned")
                .entry(id.clone())
                .or_insert_with(|| (CancellationToken::new(), Default::default()))
                .1
                .clone();
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            // As it is now: a stream may have touched it since the list was read.
            let Some(st) = self
                .tree
                .get(id.as_bytes())?
                .and_then(|v| serde_json::from_slice::<InState>(&v).ok())
                .filter(|st| due(st))
            else {
                continue;
            };
            if st.receipt.is_none() {
                let len = std::fs::metadata(&st.part).map_or(0, |m| m.len());
                match std::fs::remove_file(&st.part) {
                    Ok(()) => out.bytes_freed += len,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        // Kept, state and all: tried again at the next pass.
                        warn!(path = %st.part.display(), error = %e, "Cannot delete an abandoned part file.");
                        continue;
                    }
                }
                self.paused_full
                    .lock()
                    .expect("inbox lock poisoned")
                    .remove(&id);
                info!(transfer = %st.transfer_id, name = %st.manifest.name, bytes = len, "Abandoned transfer: part file deleted.");
                out.abandoned += 1;
            } else {
                out.complete += 1;
            }
            self.tree.remove(id.as_bytes())?;
            self.tree.remove(format!("m/{id}"))?;
            self.shapes.lock().expect("inbox lock poisoned").remove(&id);
            self.partials
                .lock()
                .expect("inbox lock poisoned")
                .retain(|(h, _), _| *h != id);
        }
        if out != Expired::default() {
            self.tree.flush()?;
        }
        Ok(out)
    }

    /// Reads one chunk stream and hands the chunk to its transfer's task. A chunk for no
    /// transfer in progress (a late duplicate) is dropped; the sender learns what is missing
    /// from acknowledgements and the next Have.
    ///
    /// The stream is read out of order, so that when the connection breaks, whatever of the
    /// chunk arrived is kept (see [`Partial`]); a piece stream adds to such a chunk.
    pub async fn accept_chunk(&self, mut recv: quinn::RecvStream) -> Result<(), TransferError> {
        let limit = (wire::PIECE_HEADER + crate::manifest::MAX_CHUNK as usize) as u64;
        let mut pieces: Vec<(u64, bytes::Bytes)> = Vec::new();
        let complete = loop {
            match recv.read_chunk(limit as usize, false).await {
                Ok(Some(c)) => {
                    if c.offset + c.bytes.len() as u64 > limit {
                        return Err(TransferError::Protocol(
                            "a chunk stream longer than any chunk".into(),
                        ));
                    }
                    pieces.push((c.offset, c.bytes));
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        pieces.sort_unstable_by_key(|(o, _)| *o);
        let contiguous = |from: u64, to: u64| -> Option<Vec<u8>> {
            let mut out = Vec::with_capacity((to - from) as usize);
            let mut at = from;
            for (o, b) in &pieces {
                let end = o + b.len() as u64;
                if end <= at {
                    continue;
                }
                if *o > at {
                    return None;
                }
                let take_to = end.min(to);
                out.extend_from_slice(&b[(at - o) as usize..(take_to - o) as usize]);
                at = take_to;
                if at >= to {
                    break;
                }
            }
            (at >= to).then_some(out)
        };
        let Some(magic) = contiguous(0, 1) else {
            return Ok(()); // Nothing usable arrived.
        };
        let (hash, index, base, piece_offset) = if magic[0] == wire::PIECE_MAGIC {
            let Some(h) = contiguous(0, wire::PIECE_HEADER as u64) else {
                return Ok(());
            };
            let mut ch = [0u8; wire::CHUNK_HEADER];
            ch.copy_from_slice(&h[..wire::CHUNK_HEADER]);
            ch[0] = wire::CHUNK_MAGIC;
            let (hash, index) = wire::parse_chunk_header(&ch)?;
            let off = u32::from_be_bytes([h[37], h[38], h[39], h[40]]);
            (hash, index, wire::PIECE_HEADER as u64, Some(off))
        } else {
            let Some(h) = contiguous(0, wire::CHUNK_HEADER as u64) else {
                return Ok(());
            };
            let h: [u8; wire::CHUNK_HEADER] = h.try_into().expect("header length");
            let (hash, index) = wire::parse_chunk_header(&h)?;
            (hash, index, wire::CHUNK_HEADER as u64, None)
        };
        let id = hex::encode(hash);
        let data = if complete && piece_offset.is_none() {
            let end = pieces
                .iter()
                .map(|(o, b)| o + b.len() as u64)
                .max()
                .unwrap_or(base);
            match contiguous(base, end) {
                Some(d) => d,
                None => return Ok(()),
            }
        } else {
            // Part of a chunk: add it to what is held, and go on only once it is whole.
            match self.add_partial(&id, index, base, piece_offset.unwrap_or(0), &pieces) {
                Some(d) => d,
                None => return Ok(()),
            }
        };
        let deadline = Instant::now() + ROUTE_WAIT;
        loop {
            let added = self.route_added.notified();
            let tx = self
                .routes
                .lock()
                .expect("inbox lock poisoned")
                .get(&id)
                .cloned();
            if let Some(tx) = tx {
                // The task may have ended meanwhile: then the chunk is not needed here.
                let _ = tx.send((index, bytes::Bytes::from(data))).await;
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), added)
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }

    /// Adds what arrived of chunk `index` (stream `pieces`, data from stream offset `base`,
    /// at chunk offset `offset`) to what is held of it; the whole chunk once complete.
    fn add_partial(
        &self,
        id: &str,
        index: u32,
        base: u64,
        offset: u32,
        pieces: &[(u64, bytes::Bytes)],
    ) -> Option<Vec<u8>> {
        let (size, chunk_size) = *self.shapes.lock().expect("inbox lock poisoned").get(id)?;
        let start = u64::from(index) * u64::from(chunk_size);
        if start >= size {
            return None;
        }
        let len = (size - start).min(u64::from(chunk_size)) as u32;
        let mut partials = self.partials.lock().expect("inbox lock poisoned");
        let p = partials
            .entry((id.to_string(), index))
            .or_insert_with(|| Partial {
                data: vec![0; len as usize],
                have: wire::Ranges::default(),
                touched: Instant::now(),
            });
        p.touched = Instant::now();
        for (o, b) in pieces {
            let end = o + b.len() as u64;
            if end <= base {
                continue;
            }
            let skip = base.saturating_sub(*o);
            let at = u64::from(offset) + (o + skip - base);
            let bytes = &b[skip as usize..];
            if at + bytes.len() as u64 > u64::from(len) {
                continue; // Not part of this chunk: ignored (the hash check has the last word).
            }
            p.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            p.have.add(at as u32, (at + bytes.len() as u64) as u32);
        }
        if p.have.covers(len) {
            return partials.remove(&(id.to_string(), index)).map(|p| p.data);
        }
        // Within budget: the least recently touched go first.
        let mut total: usize = partials.values().map(|p| p.data.len()).sum();
        while total > PARTIAL_BUDGET {
            let Some(oldest) = partials
                .iter()
                .min_by_key(|(_, p)| p.touched)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(p) = partials.remove(&oldest) {
                total -= p.data.len();
            }
        }
        None
    }

    /// Transfers paused on a full disk.
    pub fn paused_on_full_disk(&self) -> usize {
        self.paused_full.lock().expect("inbox lock poisoned").len()
    }
}

/// Serves every transfer the peer opens on `conn` (a task per stream: control streams and
/// chunk streams) until `stop` fires or the connection ends. A failing stream is logged and
/// closes only itself.
///
/// `peer`: the sending node as the connection's certificate names it (the controller's side);
/// None where the peer is the controller or a relay.
pub async fn accept_loop(
    inbox: Arc<Inbox>,
    conn: quinn::Connection,
    peer: Option<String>,
    stop: CancellationToken,
) {
    loop {
        let inbox = inbox.clone();
        let peer = peer.clone();
        tokio::select! {
            _ = stop.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    tokio::spawn(
                        async move {
                            if let Err(e) = inbox.serve(send, recv, peer.as_deref()).await {
                                warn!(error = %e, "Incoming transfer failed.");
                            }
                        }
                        .in_current_span(),
                    );
                }
                Err(_) => return,
            },
            s = conn.accept_uni() => match s {
                Ok(recv) => {
                    tokio::spawn(
                        async move {
                            if let Err(e) = inbox.accept_chunk(recv).await {
                                debug!(error = %e, "Chunk stream dropped.");
                            }
                        }
                        .in_current_span(),
                    );
                }
                Err(_) => return,
            },
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn refuse(w: &mut Writer, code: u32, message: &str) {
    let _ = put(
        w,
        Frame::Failed(Failed {
            code,
            message: message.to_string(),
            retry_after_ms: 0,
        }),
    )
    .await;
    let _ = w.get_mut().finish();
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> Result<[u8; 32], TransferError> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| TransferError::io(path, e))?;
    h.update_reader(f).map_err(|e| TransferError::io(path, e))?;
    Ok(*h.finalize().as_bytes())
}
