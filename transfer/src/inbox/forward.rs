//! Relays' reports of their forwarded copies (the hop-by-hop part): handed to the owner's
//! [`ForwardSink`], acknowledged once applied.

use std::sync::Arc;

use super::serve::refuse;
use super::{Inbox, Served};
use crate::TransferError;
use crate::transfer_wire::{self, Acked, Frame, Writer, codes, put};

/// Takes a relay's report of its forwarded copies: (the relay's site ID, the items). An error
/// is sent back to the relay, which reports again later.
pub type ForwardSink =
    Arc<dyn Fn(&str, &[transfer_wire::ForwardStatus]) -> Result<(), String> + Send + Sync>;

impl Inbox {
    /// Where relays' reports of forwarded copies go (once; later calls are ignored).
    pub fn on_forwarded(&self, sink: ForwardSink) {
        let _ = self.forward_sink.set(sink);
    }

    /// A relay's report of its forwarded copies.
    pub(super) async fn forwarded(
        &self,
        peer: Option<&str>,
        f: transfer_wire::Forwarded,
        w: &mut Writer,
    ) -> Result<Served, TransferError> {
        let (Some(peer), Some(sink)) = (peer, self.forward_sink.get()) else {
            let msg = "this node takes no relay reports";
            refuse(w, codes::PROTOCOL, msg).await;
            return Err(TransferError::Protocol(msg.into()));
        };
        // Names from the relay pass the grammar before they reach a key: an item naming a site
        // that is no identifier, or a hash that is no hash, is left out and said back (the
        // rest is applied; the relay reports again, and applying twice is harmless).
        let (items, refused): (Vec<_>, Vec<_>) = f.items.into_iter().partition(|i| {
            tiandi_link::names::validate_name("site", &i.site).is_ok()
                && i.file_hash.len() == 64
                && i.file_hash.bytes().all(|b| b.is_ascii_hexdigit())
        });
        // The sink writes (and flushes) state: off the async workers.
        let (sink, peer_owned) = (sink.clone(), peer.to_string());
        let applied = if items.is_empty() {
            Ok(())
        } else {
            tokio::task::spawn_blocking(move || sink(&peer_owned, &items))
                .await
                .unwrap_or_else(|e| Err(format!("relay report task: {e}")))
        };
        if let (Ok(()), Some(first)) = (&applied, refused.first()) {
            let why = match tiandi_link::names::validate_name("site", &first.site) {
                Err(e) => e.to_string(),
                Ok(()) => format!("file hash {:?} is not 64 hex digits", first.file_hash),
            };
            let msg = format!(
                "{} item(s) of the report refused (the others applied): {why}",
                refused.len()
            );
            refuse(w, codes::BAD_NAME, &msg).await;
            return Err(TransferError::BadName(msg));
        }
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
}
