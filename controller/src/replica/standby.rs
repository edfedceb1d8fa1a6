//! The standby's side: follows the primary's log into its own data directory (the same layout
//! a controller has, so that promotion is a controller starting on it), shows how far behind
//! it is (`/health` and `/metrics` on its ops listener, loopback only), and on `promote` stops
//! following, takes the next fencing epoch and returns so that the caller starts a controller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use prost::Message;
use serde::Serialize;
use tiandi_link::pki::CertRole;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::wire::{self, Change, Item, Msg, WireError};
use crate::Config;
use crate::store::Store;

/// Where the standby keeps its own certificate (`<data_dir>/standby/identity/`).
pub fn identity_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("standby")
}

/// How often the standby makes what it applied durable and tells the primary.
const APPLY_EVERY: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

const K_RUN: &[u8] = b"run";
const K_NEXT: &[u8] = b"next";
const K_HASH: &[u8] = b"hash";
const K_PRIMARY_EPOCH: &[u8] = b"primary-epoch";
/// Set once a snapshot is complete; cleared while one is being applied.
const K_COMPLETE: &[u8] = b"complete";
const K_LAST_AT: &[u8] = b"last-at-ms";

/// What `/health` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub role: &'static str,
    pub primary: String,
    pub connected: bool,
    /// The copy is complete (a snapshot was applied whole); promotion needs it.
    pub complete: bool,
    pub run: String,
    pub applied: u64,
    /// The newest record the primary said it has.
    pub primary_tip: u64,
    /// When the primary logged the last record applied here (its clock, Unix ms).
    pub last_applied_at_ms: i64,
    /// Now minus that, while records are outstanding; 0 when caught up.
    pub lag_ms: i64,
    pub primary_epoch: u64,
    pub snapshots: u64,
    pub last_error: String,
}

struct Shared {
    status: Mutex<Status>,
    promote: CancellationToken,
    applied: AtomicU64,
    tip: AtomicU64,
    last_at: AtomicI64,
    connected: AtomicBool,
}

/// Follows `primary` until promoted (then returns, the data directory closed) or cancelled
/// (an error). `token`: a one-time `--role standby` enrollment token, needed the first time.
pub async fn run(
    config: &Config,
    primary: &str,
    token: Option<&str>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    tiandi_link::secrets::private_dir(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))?;
    if !crate::http::plain_http_allowed(&config.ops_listen) {
        bail!(
            "ops_listen {}: a standby serves /health and /promote on loopback only",
            config.ops_listen
        );
    }
    let addr = tokio::net::lookup_host(primary)
        .await
        .with_context(|| format!("resolving the primary {primary}"))?
        .next()
        .with_context(|| format!("{primary} resolves to no address"))?;
    let endpoint =
        tiandi_link::client_endpoint(addr).context("opening the standby's QUIC endpoint")?;
    let ident_dir = identity_dir(dir);
    if !tiandi_uplink::identity::exists(&ident_dir) {
        let token = token.context(
            "this standby has no certificate yet: pass --token with a token from \
             `tiandi-controller enroll --site NAME --province CODE --role standby` on the primary",
        )?;
        let e = tiandi_link::enroll::enroll(&endpoint, addr, token, Duration::from_secs(30))
            .await
            .with_context(|| format!("enrolling the standby at {addr}"))?;
        let role = tiandi_link::pki::certs_from_pem(&e.cert_pem)?
            .first()
            .map(|c| tiandi_link::pki::role_from_der(c))
            .transpose()?
            .unwrap_or_default();
        if role != CertRole::Standby {
            bail!(
                "the token was minted for a {role}, not a standby: mint one with `tiandi-controller \
                 enroll --site NAME --province CODE --role standby`"
            );
        }
        tiandi_uplink::identity::save(&ident_dir, &e)?;
        info!(standby = %e.site_id, "Enrolled as a standby.");
    }
    let id = tiandi_uplink::identity::load(&ident_dir)?;
    let tls = tiandi_link::tls::replica_client_tls(&id.ca_pem, Some((&id.cert_pem, &id.key_pem)))?;
    // The standby is on the DR centre's own line, not a VSAT: the terrestrial profile.
    let client =
        tiandi_link::client_config(tls, tiandi_link::LinkProfile::Terrestrial.transport())?;

    let db_path = dir.join("db");
    let db = crate::open_db(&db_path)?;
    let store = Store::open(&db, dir)?;
    let meta = db.open_tree(super::META_TREE)?;
    let shared = Arc::new(Shared {
        status: Mutex::new(Status {
            role: "standby",
            primary: primary.to_string(),
            complete: meta.get(K_COMPLETE)?.is_some(),
            primary_epoch: get_u64(&meta, K_PRIMARY_EPOCH)?,
            ..Default::default()
        }),
        promote: CancellationToken::new(),
        applied: AtomicU64::new(get_u64(&meta, K_NEXT)?.saturating_sub(1)),
        tip: AtomicU64::new(0),
        last_at: AtomicI64::new(get_u64(&meta, K_LAST_AT)? as i64),
        connected: AtomicBool::new(false),
    });
    let http_stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("binding ops_listen {}", config.ops_listen))?;
    let ops_addr = listener.local_addr()?;
    let http = tokio::spawn(crate::http::serve(
        listener,
        router(shared.clone(), dir.clone()),
        None,
        http_stop.clone(),
    ));
    // The copy keeps the same history the primary does: older reports go hourly.
    let pruner = {
        let (db, store, stop, days) = (
            db.clone(),
            store.clone(),
            http_stop.clone(),
            config.history_days,
        );
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let (db, store) = (db.clone(), store.clone());
                let _ = tokio::task::spawn_blocking(move || prune_history(&db, &store, days)).await;
            }
        })
    };
    println!("tiandi-controller standby: following {primary}, health http://{ops_addr}/health");
    info!(%primary, ops = %ops_addr, "Standby following the primary.");

    let mut backoff = Duration::from_millis(500);
    let stop = CancellationToken::new();
    loop {
        let follow = follow_once(
            &endpoint,
            &client,
            addr,
            Copy {
                db: &db,
                store: &store,
                dir,
            },
            &shared,
            stop.clone(),
        );
        let result = tokio::select! {
            r = follow => r,
            _ = shared.promote.cancelled() => {
                stop.cancel();
                Ok(())
            }
            _ = cancel.cancelled() => {
                stop.cancel();
                http_stop.cancel();
                let _ = http.await;
                store.checkpoint()?;
                bail!("stopped before a promotion");
            }
        };
        shared.connected.store(false, Ordering::Relaxed);
        if shared.promote.is_cancelled() {
            break;
        }
        let err = match result {
            Ok(()) => "the primary ended the stream".to_string(),
            Err(e) => e.to_string(),
        };
        warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "Replication interrupted.");
        shared.status.lock().expect("status poisoned").last_error = err;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.promote.cancelled() => break,
            _ = cancel.cancelled() => bail!("stopped before a promotion"),
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
    // Promotion: what was applied is made durable, the epoch moves past the primary's.
    store.checkpoint()?;
    let epoch = get_u64(&meta, K_PRIMARY_EPOCH)?.max(super::epoch(&db)?) + 1;
    super::set_epoch(&db, epoch)?;
    let applied = shared.applied.load(Ordering::Relaxed);
    let last_at = shared.last_at.load(Ordering::Relaxed);
    info!(
        epoch,
        applied,
        last_applied_at_ms = last_at,
        "Promoted: this controller takes over at a new epoch."
    );
    println!(
        "tiandi-controller standby: promoted at epoch {epoch} (applied through record {applied}, \
         the primary's state as of {last_at} ms)"
    );
    http_stop.cancel();
    let _ = http.await;
    let _ = pruner.await;
    drop(store);
    drop(meta);
    db.flush()?;
    drop(db);
    endpoint.close(0u32.into(), b"promoted");
    Ok(())
}

/// The standby's copy: its sled database, the store over it, the data directory.
#[derive(Clone, Copy)]
pub(super) struct Copy<'a> {
    pub db: &'a sled::Db,
    pub store: &'a Store,
    pub dir: &'a Path,
}

async fn follow_once(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: SocketAddr,
    copy: Copy<'_>,
    shared: &Shared,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Copy { db, store, .. } = copy;
    let meta = db.open_tree(super::META_TREE)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(15),
        endpoint.connect_with(client.clone(), addr, tiandi_link::pki::CONTROLLER_NAME)?,
    )
    .await
    .map_err(|_| anyhow::anyhow!("no handshake with {addr} within 15 s"))??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let complete = meta.get(K_COMPLETE)?.is_some();
    let (run, next, hash) = if complete {
        (
            get_u64(&meta, K_RUN)?,
            get_u64(&meta, K_NEXT)?,
            meta.get(K_HASH)?.map(|h| h.to_vec()).unwrap_or_default(),
        )
    } else {
        (0, 0, Vec::new())
    };
    wire::write(
        &mut send,
        Msg::Follow(wire::Follow {
            version: wire::VERSION,
            run,
            next_seq: next,
            hash,
            epoch: get_u64(&meta, K_PRIMARY_EPOCH)?.max(super::epoch(db)?),
            epoch_only: false,
        }),
    )
    .await?;
    let start = match tokio::time::timeout(Duration::from_secs(60), wire::read(&mut recv))
        .await
        .map_err(|_| anyhow::anyhow!("no answer to Follow in 60 s"))??
    {
        Some(Msg::Start(s)) => s,
        Some(Msg::Refused(r)) => bail!("the primary refuses: {} (its epoch {})", r.reason, r.epoch),
        Some(other) => bail!("expected Start, got {}", other.name()),
        None => bail!("the primary closed the stream"),
    };
    shared.connected.store(true, Ordering::Relaxed);
    set_u64(&meta, K_PRIMARY_EPOCH, start.epoch)?;
    {
        let mut s = shared.status.lock().expect("status poisoned");
        s.connected = true;
        s.run = format!("{:016x}", start.run);
        s.primary_epoch = start.epoch;
        s.last_error.clear();
    }
    let mut prev: [u8; 32] = start
        .hash
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("Start carries a hash of {} bytes", start.hash.len()))?;
    if start.snapshot {
        info!(
            run = format!("{:016x}", start.run),
            from = start.seq,
            "Taking a snapshot from the primary."
        );
        meta.remove(K_COMPLETE)?;
        db.flush()?;
        shared.status.lock().expect("status poisoned").complete = false;
        for name in super::TREES.iter().chain(super::REPORT_TREES) {
            db.open_tree(name)?.clear()?;
        }
        store.clear_history()?;
        let mut digest = blake3::Hasher::new();
        let mut items = 0u64;
        loop {
            match wire::read(&mut recv).await? {
                Some(Msg::Item(bytes)) => {
                    digest.update(&bytes);
                    items += 1;
                    apply(copy, &bytes, true)?;
                }
                Some(Msg::SnapEnd(end)) => {
                    if end.items != items || end.digest != digest.finalize().as_bytes() {
                        bail!(
                            "the snapshot does not add up: {items} items here, {} sent, or the \
                             digests differ",
                            end.items
                        );
                    }
                    break;
                }
                Some(other) => bail!("expected a snapshot item, got {}", other.name()),
                None => bail!("the primary closed the stream during the snapshot"),
            }
        }
        store.forget_cached();
        set_u64(&meta, K_RUN, start.run)?;
        set_u64(&meta, K_NEXT, start.seq)?;
        meta.insert(K_HASH, prev.as_slice())?;
        meta.insert(K_COMPLETE, &[1])?;
        store.checkpoint()?;
        db.flush()?;
        shared
            .applied
            .store(start.seq.saturating_sub(1), Ordering::Relaxed);
        {
            let mut s = shared.status.lock().expect("status poisoned");
            s.complete = true;
            s.snapshots += 1;
        }
        info!(items, "Snapshot applied: the copy is complete.");
    } else if start.run != run || start.seq != next {
        bail!(
            "the primary resumes at {:016x}/{} where this standby stands at {run:016x}/{next}",
            start.run,
            start.seq
        );
    }
    let mut next = start.seq;
    let mut last_save = tokio::time::Instant::now();
    let mut unsaved = false;
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(Duration::from_secs(10), wire::read(&mut recv)) => f
                .map_err(|_| anyhow::anyhow!("nothing from the primary for 10 s"))??,
            _ = stop.cancelled() => None,
        };
        let done = frame.is_none();
        match frame {
            Some(Msg::Rec(r)) => {
                if r.seq != next {
                    return Err(WireError::Chain {
                        seq: r.seq,
                        why: format!("expected record {next}"),
                    }
                    .into());
                }
                let h = wire::chain(&prev, r.seq, &r.item);
                if h.as_slice() != r.hash.as_slice() {
                    return Err(WireError::Chain {
                        seq: r.seq,
                        why: "its hash does not follow from the one before".into(),
                    }
                    .into());
                }
                apply(copy, &r.item, false)
                    .with_context(|| format!("applying record {}", r.seq))?;
                prev = h;
                next += 1;
                unsaved = true;
                shared.last_at.store(r.at_ms, Ordering::Relaxed);
                shared.tip.fetch_max(r.seq, Ordering::Relaxed);
            }
            Some(Msg::Beat(b)) => {
                shared.tip.store(b.tip.max(next - 1), Ordering::Relaxed);
            }
            Some(other) => bail!("unexpected {} from the primary", other.name()),
            None => {}
        }
        if unsaved && (done || last_save.elapsed() >= APPLY_EVERY) {
            set_u64(&meta, K_NEXT, next)?;
            meta.insert(K_HASH, prev.as_slice())?;
            set_u64(
                &meta,
                K_LAST_AT,
                shared.last_at.load(Ordering::Relaxed) as u64,
            )?;
            store.checkpoint()?;
            db.flush()?;
            shared.applied.store(next - 1, Ordering::Relaxed);
            unsaved = false;
            last_save = tokio::time::Instant::now();
            let _ = send
                .write_all(&wire::encode(Msg::Applied(wire::Applied { seq: next - 1 })))
                .await;
        }
        if done {
            conn.close(0u32.into(), b"standby stops");
            return Ok(());
        }
    }
}

/// Applies one item to the standby's copy; names are checked against what may be replicated
/// before they touch a tree or a path.
pub(super) fn apply(copy: Copy<'_>, item: &[u8], snapshot: bool) -> anyhow::Result<()> {
    let Copy { db, store, dir } = copy;
    let item = Item::decode(item).context("undecodable item")?;
    match item.change.context("empty item")? {
        Change::Tree(op) => {
            let allowed = super::TREES.contains(&op.tree.as_str())
                || (snapshot && super::REPORT_TREES.contains(&op.tree.as_str()));
            if !allowed {
                bail!("tree {:?} is not replicated", op.tree);
            }
            if op.tree == crate::store::HISTORY_TREE {
                // The history lives in segments: appended (a snapshot carries no removals).
                if op.remove {
                    bail!("a history entry cannot be removed");
                }
                store.restore_history(&op.key, &op.value)?;
                return Ok(());
            }
            let tree = db.open_tree(&op.tree)?;
            if op.remove {
                tree.remove(&op.key)?;
            } else {
                tree.insert(&op.key, op.value)?;
            }
        }
        Change::Report(r) => {
            tiandi_link::names::validate_name("site", &r.site)?;
            let report =
                tiandi_proto::Report::decode(r.report.as_slice()).context("undecodable report")?;
            store.replicate(&r.site, &report)?;
        }
        Change::File(f) => {
            let mode = super::file_mode(&f.name)
                .with_context(|| format!("file {:?} is not replicated", f.name))?;
            let path = if f.name == "primary.toml" {
                dir.join(super::PRIMARY_CONFIG)
            } else {
                tiandi_link::names::join(dir, "replicated file", &f.name)?
            };
            if f.remove {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", path.display()));
                    }
                    _ => {}
                }
            } else {
                write_with_mode(&path, &f.data, mode)?;
            }
        }
    }
    Ok(())
}

fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("replica-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Removes reports older than `days` from the copy, for every site in its registry.
fn prune_history(db: &sled::Db, store: &Store, days: u32) {
    let cutoff = crate::now_ms() - i64::from(days) * 86_400_000;
    match store.prune_history(cutoff) {
        Ok(n) if n > 0 => info!(
            removed = n,
            "Pruned the copy's history segments beyond history_days."
        ),
        Ok(_) => {}
        Err(error) => warn!(%error, "Pruning the copy's history segments failed."),
    }
    let Ok(sites) = db.open_tree("sites") else {
        return;
    };
    let mut removed = 0;
    for site in sites.iter().keys().flatten() {
        let Ok(site) = std::str::from_utf8(&site) else {
            continue;
        };
        if tiandi_link::names::validate_name("site", site).is_err() {
            continue;
        }
        match store.prune(site, cutoff) {
            Ok(n) => removed += n,
            Err(error) => warn!(%error, %site, "Pruning the copy's device events failed."),
        }
    }
    if removed > 0 {
        info!(
            removed,
            "Pruned the copy's device events beyond history_days."
        );
    }
}

fn get_u64(t: &sled::Tree, k: &[u8]) -> anyhow::Result<u64> {
    Ok(t.get(k)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

fn set_u64(t: &sled::Tree, k: &[u8], v: u64) -> anyhow::Result<()> {
    t.insert(k, &v.to_be_bytes())?;
    Ok(())
}

fn status(shared: &Shared) -> Status {
    let mut s = shared.status.lock().expect("status poisoned").clone();
    s.connected = shared.connected.load(Ordering::Relaxed);
    s.applied = shared.applied.load(Ordering::Relaxed);
    s.primary_tip = shared.tip.load(Ordering::Relaxed).max(s.applied);
    s.last_applied_at_ms = shared.last_at.load(Ordering::Relaxed);
    s.lag_ms = if s.primary_tip > s.applied && s.last_applied_at_ms > 0 {
        (crate::now_ms() - s.last_applied_at_ms).max(0)
    } else {
        0
    };
    s
}

fn router(shared: Arc<Shared>, data_dir: PathBuf) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    let s1 = shared.clone();
    let s2 = shared.clone();
    let s3 = shared;
    axum::Router::new()
        .route(
            "/health",
            get(move || {
                let s = status(&s1);
                async move { axum::Json(s) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let s = status(&s2);
                async move {
                    format!(
                        "# HELP tiandi_standby_applied_record The last replication record applied.\n\
                         # TYPE tiandi_standby_applied_record gauge\n\
                         tiandi_standby_applied_record {}\n\
                         # HELP tiandi_standby_lag_seconds How far the copy is behind the primary (0: caught up).\n\
                         # TYPE tiandi_standby_lag_seconds gauge\n\
                         tiandi_standby_lag_seconds {}\n\
                         # HELP tiandi_standby_connected Whether the standby follows the primary now.\n\
                         # TYPE tiandi_standby_connected gauge\n\
                         tiandi_standby_connected {}\n\
                         # HELP tiandi_standby_complete Whether the copy is complete (promotion needs it).\n\
                         # TYPE tiandi_standby_complete gauge\n\
                         tiandi_standby_complete {}\n",
                        s.applied,
                        s.lag_ms as f64 / 1000.0,
                        u8::from(s.connected),
                        u8::from(s.complete)
                    )
                }
            }),
        )
        .route(
            "/promote",
            post(move |headers: HeaderMap| {
                let shared = s3.clone();
                let dir = data_dir.clone();
                async move {
                    let token = tiandi_link::secrets::read_private(&dir.join("admin.token"))
                        .ok()
                        .flatten()
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty());
                    let given = headers
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("");
                    let Some(token) = token else {
                        return (
                            StatusCode::CONFLICT,
                            "no complete copy of the primary yet (no admin token replicated): \
                             nothing to promote"
                                .to_string(),
                        );
                    };
                    if !tiandi_link::secrets::same_secret(&token, given) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            "the primary's admin token is required".to_string(),
                        );
                    }
                    if !shared.status.lock().expect("status poisoned").complete {
                        return (
                            StatusCode::CONFLICT,
                            "the copy is not complete (a snapshot is under way): promoting now \
                             would serve a partial state"
                                .to_string(),
                        );
                    }
                    shared.promote.cancel();
                    let s = status(&shared);
                    (
                        StatusCode::OK,
                        serde_json::json!({
                            "promoting": true,
                            "applied": s.applied,
                            "last_applied_at_ms": s.last_applied_at_ms,
                        })
                        .to_string(),
                    )
                }
            }),
        )
}
