//! Serving a connection: the accept loop, and each control stream's first frame (an offer,
//! a relay's report, a site check) handed to what deals with it.

use std::sync::Arc;

use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::{Inbox, Served};
use crate::TransferError;
use crate::transfer_wire::{self, Failed, Frame, Reader, Writer, codes, next, put};

impl Inbox {
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
        let mut r: Reader = FramedRead::new(recv, transfer_wire::codec());
        let mut w: Writer = FramedWrite::new(send, transfer_wire::codec());
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
            Some(Frame::CheckSite(c)) => return self.check_site(peer, c, &mut w).await,
            Some(Frame::Lease(l)) => return self.lease(peer, l, &mut w).await,
            Some(other) => {
                let msg = format!("expected Offer, got {}", other.kind());
                refuse(&mut w, codes::PROTOCOL, &msg).await;
                return Err(TransferError::Protocol(msg));
            }
            None => return Ok(Served::Interrupted),
        };
        // Every name in the offer passes the one grammar before it touches a key or a path;
        // a refused one is said to the sender, and only this stream ends.
        if let Err(e) = check_offer(&offer) {
            let code = match &e {
                TransferError::BadName(_) => codes::BAD_NAME,
                _ => codes::PROTOCOL,
            };
            refuse(&mut w, code, &e.to_string()).await;
            return Err(e);
        }
        // An identified peer's transfers are its own: keyed by it, in its own directory, with
        // it as their origin (whatever the offer says).
        if let Some(p) = peer {
            offer.origin = p.to_string();
        }
        let key = super::key(peer, &hex::encode(&offer.file_hash));
        // A resumed transfer's offer leaves the chunk hashes out (on a satellite link they are
        // not free: 32 bytes per chunk); they are in this inbox's state, if it has one (this
        // peer's own: another's transfer of the same file is not found).
        let known = if offer.is_short() {
            match self.get_key(&key)? {
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
                let code = match &e {
                    TransferError::Version(_) => codes::VERSION,
                    TransferError::BadName(_) => codes::BAD_NAME,
                    _ => codes::PROTOCOL,
                };
                refuse(&mut w, code, &e.to_string()).await;
                return Err(e);
            }
        };
        let dir = match peer {
            Some(p) => match self.peer_dir(p) {
                Ok(d) => d,
                Err(e) => {
                    let code = match &e {
                        TransferError::BadName(_) => codes::BAD_NAME,
                        _ => codes::STORAGE,
                    };
                    refuse(&mut w, code, &e.to_string()).await;
                    return Err(e);
                }
            },
            None => self.dir.clone(),
        };
        // Chunk streams of a first attempt may already be waiting for this offer (they carry
        // no length of their own): its shape now, before any wait for the lock or the disk.
        self.shapes
            .lock()
            .expect("inbox lock poisoned")
            .entry(key.clone())
            .or_insert((manifest.size, manifest.chunk_size));
        self.route_added.notify_waiters();
        // Take over from an older stream of the same transfer (a link cut leaves it hanging).
        let (token, lock) = {
            let mut active = self.active.lock().expect("inbox lock poisoned");
            let entry = active
                .entry(key.clone())
                .or_insert_with(|| (CancellationToken::new(), Default::default()));
            entry.0.cancel();
            entry.0 = CancellationToken::new();
            (entry.0.clone(), entry.1.clone())
        };
        let _guard = lock.lock().await;
        let result = self
            .receive(&key, &offer, manifest, &dir, &mut r, &mut w, &token)
            .await;
        if let Err(e) = &result {
            let code = match e {
                TransferError::Io { .. } | TransferError::Db(_) => Some(codes::STORAGE),
                TransferError::BadName(_) => Some(codes::BAD_NAME),
                _ => None,
            };
            if let Some(code) = code {
                refuse(&mut w, code, &e.to_string()).await;
            }
        }
        result
    }

    /// `dir/<peer>/`, made if missing: the peer's name passes the identifier grammar and the
    /// one join (no planted symlink followed).
    fn peer_dir(&self, peer: &str) -> Result<std::path::PathBuf, TransferError> {
        tiandi_link::names::validate_name("site", peer).map_err(bad_name)?;
        let d = tiandi_link::names::join(&self.dir, "site", peer).map_err(bad_name)?;
        std::fs::create_dir_all(&d).map_err(|e| TransferError::io(&d, e))?;
        // What is there now must be a directory of ours, not a link planted meanwhile.
        let m = std::fs::symlink_metadata(&d).map_err(|e| TransferError::io(&d, e))?;
        if !m.is_dir() {
            return Err(TransferError::BadName(format!(
                "{}: not a directory (refusing to write through it)",
                d.display()
            )));
        }
        Ok(d)
    }
}

/// A name refused by [`tiandi_link::names`], as this crate's error.
pub(super) fn bad_name(e: tiandi_link::LinkError) -> TransferError {
    match e {
        tiandi_link::LinkError::BadName(m) => TransferError::BadName(m),
        other => TransferError::BadName(other.to_string()),
    }
}

/// The names and labels of an offer from the network: the file name (one grammar), the sites
/// to forward to (identifiers), and bounded labels.
fn check_offer(o: &transfer_wire::Offer) -> Result<(), TransferError> {
    if o.file_hash.len() != 32 {
        return Err(TransferError::Protocol("file hash is not 32 bytes".into()));
    }
    tiandi_link::names::validate_file_name("file name", &o.name).map_err(bad_name)?;
    if o.forward_to.len() > super::MAX_FORWARD_TO {
        return Err(TransferError::Protocol(format!(
            "{} sites to forward to (at most {})",
            o.forward_to.len(),
            super::MAX_FORWARD_TO
        )));
    }
    for f in &o.forward_to {
        tiandi_link::names::validate_name("site to forward to", f).map_err(bad_name)?;
    }
    for (what, v) in [
        ("transfer ID", &o.transfer_id),
        ("priority", &o.priority),
        ("origin", &o.origin),
    ] {
        if v.len() > super::MAX_LABEL || v.chars().any(char::is_control) {
            return Err(TransferError::Protocol(format!(
                "{what} of {} bytes or with control characters",
                v.len()
            )));
        }
    }
    Ok(())
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
    accept_loop_raising(inbox, conn, peer, stop, None).await
}

/// [`accept_loop`] on a connection that lets its peer open few unidirectional streams until
/// a transfer starts (`tiandi_link::transport::IDLE_UNI_STREAMS`): at the first control
/// stream the peer opens, the limit goes up to `uni_streams` (its chunk streams wait at most
/// a round trip for the credit).
pub async fn accept_loop_raising(
    inbox: Arc<Inbox>,
    conn: quinn::Connection,
    peer: Option<String>,
    stop: CancellationToken,
    mut uni_streams: Option<u32>,
) {
    // Chunk bytes this connection may hold in memory (see `CONN_CHUNK_BUDGET`).
    let budget = Arc::new(tokio::sync::Semaphore::new(super::CONN_CHUNK_BUDGET));
    loop {
        let inbox = inbox.clone();
        let peer = peer.clone();
        let budget = budget.clone();
        tokio::select! {
            _ = stop.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    if let Some(n) = uni_streams.take() {
                        conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(n));
                    }
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
                            if let Err(e) = inbox.accept_chunk_from(recv, peer.as_deref(), &budget).await {
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

pub(crate) async fn refuse(w: &mut Writer, code: u32, message: &str) {
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
