//! The primary's side: what changes goes into the log ([`Primary::start`] watches the
//! replicated trees and files, [`Primary::report`] is the store's tap), and each standby's
//! connection is served from it ([`Primary::serve`]): a snapshot when it cannot continue
//! where it stands, then the records in order, a heartbeat every second.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use serde::Serialize;
use tiandi_link::pki::CertRole;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::log::{Gone, Log, RING_BYTES};
use super::wire::{self, Change, FileRec, Item, Msg, ReportRec, TreeOp, WireError};

/// Records sent in one write.
const BATCH: usize = 512;
/// Snapshot items buffered between the reader of the trees and the stream.
const SNAPSHOT_QUEUE: usize = 256;
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller shows of a standby that follows it.
#[derive(Clone, Debug, Serialize)]
pub struct Follower {
    pub name: String,
    pub remote: String,
    pub since_ms: i64,
    /// The last record it applied.
    pub applied: u64,
    /// Records logged and not yet applied there.
    pub behind: u64,
    /// How long ago the oldest record it has not applied was logged (0: caught up): what a
    /// loss of this controller now would cost.
    pub lag_ms: i64,
    /// Taking a snapshot (its copy is not usable until done).
    pub snapshot: bool,
}

pub struct Primary {
    pub log: Arc<Log>,
    db: sled::Db,
    data_dir: PathBuf,
    config_toml: Vec<u8>,
    epoch: AtomicU64,
    /// Set (with the higher epoch and who told of it) when another controller took over.
    superseded: watch::Sender<Option<(u64, String)>>,
    followers: Mutex<BTreeMap<usize, Follower>>,
    stop: Arc<AtomicBool>,
    /// The store whose history a snapshot reads (weak: the store's tap holds this).
    store: std::sync::Weak<crate::store::Store>,
}

impl Primary {
    /// Starts watching the replicated trees (a thread each: sled's subscribers block the
    /// writer when more than 1,024 events wait, so they are drained off the async runtime)
    /// and the replicated files (every second).
    pub fn start(
        db: &sled::Db,
        store: &Arc<crate::store::Store>,
        data_dir: &Path,
        config_toml: String,
        epoch: u64,
    ) -> Result<Arc<Primary>, sled::Error> {
        let run = loop {
            let r: u64 = rand::random();
            if r != 0 {
                break r;
            }
        };
        let p = Arc::new(Primary {
            log: Log::new(run, RING_BYTES),
            db: db.clone(),
            data_dir: data_dir.to_path_buf(),
            config_toml: config_toml.into_bytes(),
            epoch: AtomicU64::new(epoch),
            superseded: watch::channel(None).0,
            followers: Mutex::new(BTreeMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            store: Arc::downgrade(store),
        });
        for name in super::TREES {
            let sub = db.open_tree(name)?.watch_prefix(vec![]);
            let (log, stop) = (p.log.clone(), p.stop.clone());
            let tree = name.to_string();
            std::thread::Builder::new()
                .name(format!("replica-{name}"))
                .spawn(move || watch_tree(sub, &tree, &log, &stop))
                .map_err(sled::Error::Io)?;
        }
        {
            let (log, stop, dir) = (p.log.clone(), p.stop.clone(), p.data_dir.clone());
            std::thread::Builder::new()
                .name("replica-files".into())
                .spawn(move || watch_files(&dir, &log, &stop))
                .map_err(sled::Error::Io)?;
        }
        info!(
            run = format!("{run:016x}"),
            epoch, "Replication log started."
        );
        Ok(p)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The store's tap: a report as stored.
    pub fn report(&self, site: &str, report: &[u8]) {
        self.log.push(Change::Report(ReportRec {
            site: site.to_string(),
            report: report.to_vec(),
        }));
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Another controller is at `epoch`: above this one's, this one stands down (returns true
    /// the first time).
    pub fn hear_epoch(&self, epoch: u64, from: &str) -> bool {
        if epoch <= self.epoch() || self.superseded.borrow().is_some() {
            return false;
        }
        tracing::error!(
            epoch,
            own = self.epoch(),
            from,
            "Another controller took over at a higher epoch: this one stands down (it closes \
             every site connection and accepts none; restart it as a standby)."
        );
        self.superseded
            .send_replace(Some((epoch, from.to_string())));
        true
    }

    /// Why this controller stands down, if it does.
    pub fn superseded(&self) -> Option<(u64, String)> {
        self.superseded.borrow().clone()
    }

    pub fn watch_superseded(&self) -> watch::Receiver<Option<(u64, String)>> {
        self.superseded.subscribe()
    }

    pub fn followers(&self) -> Vec<Follower> {
        let tip = *self.log.tip().borrow();
        self.followers
            .lock()
            .expect("followers lock poisoned")
            .values()
            .cloned()
            .map(|mut f| {
                f.behind = tip.saturating_sub(f.applied);
                f.lag_ms = if f.behind == 0 {
                    0
                } else {
                    self.log
                        .at_ms(f.applied + 1)
                        .map_or(i64::MAX, |t| (crate::now_ms() - t).max(0))
                };
                f
            })
            .collect()
    }

    /// Writes the replicated state to `out_dir` (see [`super::export`]), off the async threads.
    pub async fn export(&self, out_dir: &Path) -> anyhow::Result<super::export::Exported> {
        let (db, dir, config, epoch, out) = (
            self.db.clone(),
            self.data_dir.clone(),
            self.config_toml.clone(),
            self.epoch(),
            out_dir.to_path_buf(),
        );
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            // Every report stored so far into the segment files the export reads.
            if let Some(store) = store.upgrade() {
                store.write_history()?;
            }
            super::export::export(&db, &dir, config, epoch, &out)
        })
        .await?
    }

    /// What `/health/replica` shows: this controller's role and epoch, and its standbys.
    pub fn status(&self) -> serde_json::Value {
        let superseded = self.superseded();
        serde_json::json!({
            "role": if superseded.is_some() { "stood-down" } else { "primary" },
            "epoch": self.epoch(),
            "superseded_by": superseded.map(|(e, who)| serde_json::json!({"epoch": e, "heard_from": who})),
            "run": format!("{:016x}", self.log.run),
            "log_tip": *self.log.tip().borrow(),
            "standbys": self.followers(),
        })
    }

    /// Prometheus lines: the epoch, whether this controller stood down, its log's tip and
    /// each standby's lag.
    pub fn exposition(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tiandi_controller_epoch This controller's fencing epoch (a promoted standby's is above its old primary's).\n\
             # TYPE tiandi_controller_epoch gauge\ntiandi_controller_epoch {}",
            self.epoch()
        );
        let _ = writeln!(
            out,
            "# HELP tiandi_controller_stood_down 1 when another controller took over and this one serves no site.\n\
             # TYPE tiandi_controller_stood_down gauge\ntiandi_controller_stood_down {}",
            u8::from(self.superseded().is_some())
        );
        let _ = writeln!(
            out,
            "# HELP tiandi_replica_log_records_total Changes logged for standbys since this controller started.\n\
             # TYPE tiandi_replica_log_records_total counter\ntiandi_replica_log_records_total {}",
            *self.log.tip().borrow()
        );
        let followers = self.followers();
        let _ = writeln!(
            out,
            "# HELP tiandi_replica_standbys Standby controllers following this one now.\n\
             # TYPE tiandi_replica_standbys gauge\ntiandi_replica_standbys {}",
            followers.len()
        );
        if !followers.is_empty() {
            out.push_str(
                "# HELP tiandi_replica_lag_seconds How long ago the oldest change a standby has not applied was made (what losing this controller now would cost).\n\
                 # TYPE tiandi_replica_lag_seconds gauge\n",
            );
            for f in &followers {
                let _ = writeln!(
                    out,
                    "tiandi_replica_lag_seconds{{standby=\"{}\"}} {}",
                    f.name,
                    f.lag_ms as f64 / 1000.0
                );
            }
        }
        out
    }

    /// Serves one replication connection (ALPN `tiandi-replica/1`): a standby following the
    /// log, or a controller asking the epoch.
    pub async fn serve(
        self: Arc<Self>,
        conn: quinn::Connection,
        role: Option<CertRole>,
        name: String,
        cancel: CancellationToken,
    ) {
        let remote = conn.remote_address();
        let result = self.serve_inner(&conn, role, &name, cancel).await;
        match result {
            Ok(()) => conn.close(0u32.into(), b"done"),
            Err(e) => {
                warn!(%remote, standby = %name, error = %e, "Replication connection ended.");
                conn.close(1u32.into(), e.to_string().as_bytes());
            }
        }
    }

    async fn serve_inner(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        role: Option<CertRole>,
        name: &str,
        cancel: CancellationToken,
    ) -> Result<(), WireError> {
        let (mut send, mut recv) = tokio::time::timeout(FOLLOW_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| io("no stream in time"))?
            .map_err(io)?;
        let follow = match tokio::time::timeout(FOLLOW_TIMEOUT, wire::read(&mut recv))
            .await
            .map_err(|_| io("no Follow in time"))??
        {
            Some(Msg::Follow(f)) => f,
            Some(other) => return Err(io(format!("expected Follow, got {}", other.name()))),
            None => return Err(io("stream ended before Follow")),
        };
        let refuse = |reason: String| {
            Msg::Refused(wire::Refused {
                reason,
                epoch: self.epoch(),
            })
        };
        if follow.version != wire::VERSION {
            let why = format!(
                "replication version {} here, {} there",
                wire::VERSION,
                follow.version
            );
            wire::write(&mut send, refuse(why.clone())).await?;
            let _ = send.finish();
            return Err(io(why));
        }
        if follow.epoch > self.epoch() {
            self.hear_epoch(follow.epoch, &format!("{name} ({})", conn.remote_address()));
        }
        let (run, epoch) = (self.log.run, self.epoch());
        if follow.epoch_only {
            wire::write(
                &mut send,
                Msg::Start(wire::Start {
                    run,
                    epoch,
                    ..Default::default()
                }),
            )
            .await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return Ok(());
        }
        if role != Some(CertRole::Standby) {
            let why = "only a standby controller's certificate may follow the log".to_string();
            wire::write(&mut send, refuse(why.clone())).await?;
            let _ = send.finish();
            return Err(io(why));
        }
        if let Some((e, who)) = self.superseded() {
            let why = format!("this controller stands down: {who} is at epoch {e}");
            wire::write(&mut send, refuse(why.clone())).await?;
            let _ = send.finish();
            return Err(io(why));
        }
        let key = conn.stable_id();
        // One look at the ring: a record logged between two looks could push out the one
        // the standby continues from.
        let resumable = (follow.run == run)
            .then(|| self.log.hash_before(follow.next_seq))
            .flatten()
            .filter(|h| h.as_slice() == follow.hash.as_slice());
        let resume = resumable.is_some();
        let (mut next, hash) = match resumable {
            Some(h) => (follow.next_seq, h),
            None => self.log.position(),
        };
        self.followers
            .lock()
            .expect("followers lock poisoned")
            .insert(
                key,
                Follower {
                    name: name.to_string(),
                    remote: conn.remote_address().to_string(),
                    since_ms: crate::now_ms(),
                    applied: next.saturating_sub(1),
                    behind: 0,
                    lag_ms: 0,
                    snapshot: !resume,
                },
            );
        self.log.set_following(true);
        let _forget = Forget(self, key);
        info!(standby = %name, remote = %conn.remote_address(), resume, from = next, "A standby follows the log.");
        wire::write(
            &mut send,
            Msg::Start(wire::Start {
                run,
                epoch,
                snapshot: !resume,
                seq: next,
                hash: hash.to_vec(),
                primary: String::new(),
            }),
        )
        .await?;
        // What the standby applied, as it tells.
        let applied_reader = {
            let this = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = wire::read(&mut recv).await {
                    if let Msg::Applied(a) = m
                        && let Some(f) = this
                            .followers
                            .lock()
                            .expect("followers lock poisoned")
                            .get_mut(&key)
                    {
                        f.applied = a.seq;
                    }
                }
            })
        };
        let _abort = AbortOnDrop(applied_reader);
        if !resume {
            self.send_snapshot(&mut send).await?;
            if let Some(f) = self
                .followers
                .lock()
                .expect("followers lock poisoned")
                .get_mut(&key)
            {
                f.snapshot = false;
            }
        }
        let mut tip = self.log.tip();
        let mut last_beat = tokio::time::Instant::now();
        let mut buf = Vec::new();
        loop {
            let batch = self.log.from(next, BATCH).map_err(|Gone| {
                io(format!(
                    "the standby fell behind the log (record {next} is gone): it takes a \
                     snapshot when it reconnects"
                ))
            })?;
            let beat_due = last_beat.elapsed() >= Duration::from_secs(1);
            if batch.is_empty() || beat_due {
                if beat_due || batch.is_empty() {
                    // The heartbeat: the standby's measure of the tip and of a silent primary.
                    if beat_due {
                        wire::write(
                            &mut send,
                            Msg::Beat(wire::Beat {
                                tip: next - 1 + batch.len() as u64,
                                at_ms: crate::now_ms(),
                            }),
                        )
                        .await?;
                        last_beat = tokio::time::Instant::now();
                    }
                }
                if batch.is_empty() {
                    tokio::select! {
                        _ = tip.changed() => {}
                        _ = tokio::time::sleep_until(last_beat + Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => return Ok(()),
                        _ = conn.closed() => return Err(io("the standby went away")),
                    }
                    continue;
                }
            }
            buf.clear();
            for e in &batch {
                buf.extend_from_slice(&wire::encode(Msg::Rec(wire::Rec {
                    seq: e.seq,
                    hash: e.hash.to_vec(),
                    at_ms: e.at_ms,
                    item: e.item.clone(),
                })));
            }
            next = batch.last().expect("not empty").seq + 1;
            tokio::select! {
                r = send.write_all(&buf) => r.map_err(io)?,
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// Every replicated tree (and the report trees) key by key, the files and the
    /// configuration, then `SnapEnd` with their count and digest.
    async fn send_snapshot(&self, send: &mut quinn::SendStream) -> Result<(), WireError> {
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(SNAPSHOT_QUEUE);
        let (db, dir, config) = (
            self.db.clone(),
            self.data_dir.clone(),
            self.config_toml.clone(),
        );
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            // Every report stored before the snapshot's start is in the files it reads (later
            // ones may be too, and come again from the log: storing is idempotent).
            if let Some(store) = store.upgrade()
                && let Err(e) = store.write_history()
            {
                let _ = tx.blocking_send(Err(format!("writing the history: {e}")));
                return;
            }
            snapshot_items(&db, &dir, config, &mut |item| {
                tx.blocking_send(item).is_ok()
            })
        });
        let mut digest = blake3::Hasher::new();
        let mut items = 0u64;
        let mut buf = Vec::new();
        while let Some(item) = rx.recv().await {
            let item = item.map_err(io)?;
            digest.update(&item);
            items += 1;
            buf.extend_from_slice(&wire::encode(Msg::Item(item)));
            if buf.len() >= 256 << 10 {
                send.write_all(&buf).await.map_err(io)?;
                buf.clear();
            }
        }
        buf.extend_from_slice(&wire::encode(Msg::SnapEnd(wire::SnapEnd {
            items,
            digest: digest.finalize().as_bytes().to_vec(),
        })));
        send.write_all(&buf).await.map_err(io)?;
        info!(items, "Snapshot sent to the standby.");
        Ok(())
    }
}

/// The items of a snapshot of this controller's replicated state, in order, each to `sink`
/// (which returns false to stop); a read error goes to `sink` as `Err` and ends it.
pub fn snapshot_items(
    db: &sled::Db,
    dir: &Path,
    config_toml: Vec<u8>,
    sink: &mut dyn FnMut(Result<Vec<u8>, String>) -> bool,
) {
    let mut send = |change: Change| {
        sink(Ok(Item {
            change: Some(change),
        }
        .encode_to_vec()))
    };
    for name in super::TREES.iter().chain(super::REPORT_TREES) {
        if *name == crate::store::HISTORY_TREE {
            // The history's segments (and what an older version left in sled's tree, read
            // first) under the tree's name and keys: the format standbys and exports know.
            let mut stopped = false;
            let mut failed = None;
            let legacy = db.open_tree(name).map_err(|e| e.to_string()).and_then(|t| {
                for kv in t.iter() {
                    let (k, v) = kv.map_err(|e| e.to_string())?;
                    if !send(Change::Tree(TreeOp {
                        tree: name.to_string(),
                        key: k.to_vec(),
                        value: v.to_vec(),
                        remove: false,
                    })) {
                        stopped = true;
                        break;
                    }
                }
                Ok(())
            });
            if let Err(e) = legacy {
                sink(Err(format!("reading tree {name}: {e}")));
                return;
            }
            if stopped {
                return;
            }
            let listed = crate::store::segments::for_each_in(
                &dir.join(crate::store::HISTORY_DIR),
                &mut |r| {
                    let ok = send(Change::Tree(TreeOp {
                        tree: name.to_string(),
                        key: crate::store::history_key(&r.site, r.taken_ms, r.first),
                        value: r.report,
                        remove: false,
                    }));
                    stopped = !ok;
                    ok
                },
            );
            if let Err(e) = listed {
                failed = Some(e.to_string());
            }
            if let Some(e) = failed {
                sink(Err(format!("reading the history: {e}")));
                return;
            }
            if stopped {
                return;
            }
            continue;
        }
        let tree = match db.open_tree(name) {
            Ok(t) => t,
            Err(e) => {
                sink(Err(format!("opening tree {name}: {e}")));
                return;
            }
        };
        for kv in tree.iter() {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => {
                    sink(Err(format!("reading tree {name}: {e}")));
                    return;
                }
            };
            if !send(Change::Tree(TreeOp {
                tree: name.to_string(),
                key: k.to_vec(),
                value: v.to_vec(),
                remove: false,
            })) {
                return;
            }
        }
    }
    for (name, mode) in super::FILES {
        match std::fs::read(dir.join(name)) {
            Ok(data) => {
                if !send(Change::File(FileRec {
                    name: name.to_string(),
                    data,
                    mode: *mode,
                    remove: false,
                })) {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                sink(Err(format!("reading {name}: {e}")));
                return;
            }
        }
    }
    send(Change::File(FileRec {
        name: "primary.toml".into(),
        data: config_toml,
        mode: 0o600,
        remove: false,
    }));
}

fn watch_tree(mut sub: sled::Subscriber, tree: &str, log: &Log, stop: &AtomicBool) {
    loop {
        match sub.next_timeout(Duration::from_secs(1)) {
            Ok(sled::Event::Insert { key, value }) => {
                log.push(Change::Tree(TreeOp {
                    tree: tree.to_string(),
                    key: key.to_vec(),
                    value: value.to_vec(),
                    remove: false,
                }));
            }
            Ok(sled::Event::Remove { key }) => {
                log.push(Change::Tree(TreeOp {
                    tree: tree.to_string(),
                    key: key.to_vec(),
                    value: Vec::new(),
                    remove: true,
                }));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Logs a replicated file whenever its contents change (looked at every second; they are a
/// few hundred bytes each and change rarely: a token rotated, the CA renewed).
fn watch_files(dir: &Path, log: &Log, stop: &AtomicBool) {
    let mut seen: BTreeMap<&str, Option<blake3::Hash>> = super::FILES
        .iter()
        .map(|(n, _)| {
            (
                *n,
                std::fs::read(dir.join(n)).ok().map(|d| blake3::hash(&d)),
            )
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        for (name, mode) in super::FILES {
            let data = std::fs::read(dir.join(name)).ok();
            let h = data.as_deref().map(blake3::hash);
            if seen.get(name).copied().flatten() == h {
                continue;
            }
            seen.insert(name, h);
            log.push(Change::File(FileRec {
                name: name.to_string(),
                remove: data.is_none(),
                data: data.unwrap_or_default(),
                mode: *mode,
            }));
        }
    }
}

fn io(e: impl ToString) -> WireError {
    WireError::Io(std::io::Error::other(e.to_string()))
}

struct Forget<'a>(&'a Primary, usize);
impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0
            .followers
            .lock()
            .expect("followers lock poisoned")
            .remove(&self.1);
        self.0.log.set_following(false);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks the controller at `addr` its fencing epoch (no certificate needed): `None` when it
/// cannot be reached in `timeout`.
pub async fn ask_epoch(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    ca_pem: &str,
    own_epoch: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let cfg = tiandi_link::client_config(
        tiandi_link::tls::replica_client_tls(ca_pem, None).map_err(|e| e.to_string())?,
        tiandi_link::LinkProfile::Terrestrial.transport(),
    )
    .map_err(|e| e.to_string())?;
    let work = async {
        let conn = endpoint
            .connect_with(cfg, addr, tiandi_link::pki::CONTROLLER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        wire::write(
            &mut send,
            Msg::Follow(wire::Follow {
                version: wire::VERSION,
                epoch: own_epoch,
                epoch_only: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
        let answer = wire::read(&mut recv).await.map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"asked");
        match answer {
            Some(Msg::Start(s)) => Ok(s.epoch),
            Some(Msg::Refused(r)) => Ok(r.epoch),
            Some(other) => Err(format!("expected Start, got {}", other.name())),
            None => Err("no answer".into()),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// Before serving: asks each configured peer (`[replica] peers`) its epoch, and refuses to
/// start if one is above this controller's (it was replaced while it was away). A peer that
/// does not answer is noted and passed over: the agents' epochs fence this controller then.
pub async fn check_peers(core: &crate::Core, endpoint: &quinn::Endpoint) -> anyhow::Result<()> {
    let own = core.replica.epoch();
    let ca_pem = core.ca.cert_pem().to_string();
    for peer in &core.config.replica.peers {
        let addr = match tokio::net::lookup_host(peer.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => a,
            None => {
                warn!(%peer, "Replica peer does not resolve; not asked.");
                continue;
            }
        };
        match ask_epoch(endpoint, addr, &ca_pem, own, Duration::from_secs(5)).await {
            Ok(e) if e > own => anyhow::bail!(
                "[replica] peers: {peer} is at fencing epoch {e}, above this controller's {own}: \
                 it took over while this one was away. Not serving: start this one as its \
                 standby (`tiandi-controller standby --primary {peer}`)"
            ),
            Ok(e) => info!(%peer, epoch = e, own, "Replica peer is not ahead of this controller."),
            Err(error) => warn!(%peer, %error, "Replica peer did not answer; starting anyway."),
        }
    }
    Ok(())
}

/// When another controller is heard of at a higher epoch: every site connection is closed
/// (the sites go to their other addresses) and none is accepted from then on.
pub async fn stand_down(core: Arc<crate::Core>) {
    let mut rx = core.replica.watch_superseded();
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let Some((epoch, who)) = rx.borrow_and_update().clone() else {
            continue;
        };
        let reason =
            format!("this controller stands down: {who} knows of a controller at epoch {epoch}");
        let closed = core.disconnect_all(tiandi_proto::codes::SUPERSEDED, &reason);
        warn!(closed, epoch, %who, "Stood down: every site connection closed.");
    }
}

/// Exports the state every `[replica] export_every_minutes` (the first soon after start).
pub async fn export_loop(core: Arc<crate::Core>) {
    let minutes = core.config.replica.export_every_minutes;
    if minutes == 0 {
        return;
    }
    let dir = core
        .config
        .replica
        .export_dir
        .clone()
        .unwrap_or_else(|| core.config.data_dir.join("state-export"));
    let mut every = tokio::time::interval(Duration::from_secs(u64::from(minutes) * 60));
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let started = std::time::Instant::now();
        match core.replica.export(&dir).await {
            Ok(e) => info!(
                path = %e.path.display(),
                items = e.items,
                bytes = e.bytes,
                ms = started.elapsed().as_millis() as u64,
                "Exported the controller's state."
            ),
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "Exporting the controller's state failed.")
            }
        }
    }
}
