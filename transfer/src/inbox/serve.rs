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

pub(super) async fn refuse(w: &mut Writer, code: u32, message: &str) {
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
