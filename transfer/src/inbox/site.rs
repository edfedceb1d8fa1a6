//! Site checks: a relay asks whether a site below it may connect; the owner's [`SiteCheck`]
//! answers.

use std::sync::Arc;

use super::serve::refuse;
use super::{Inbox, Served};
use crate::TransferError;
use crate::transfer_wire::{self, Acked, Frame, Writer, codes, put};

/// Answers a relay's question whether a site below may connect: (the relay's site ID, the
/// question); Err says why not.
pub type SiteCheck =
    Arc<dyn Fn(&str, &transfer_wire::CheckSite) -> Result<(), String> + Send + Sync>;

impl Inbox {
    /// Who answers relays' site checks (once; later calls are ignored).
    pub fn on_site_check(&self, check: SiteCheck) {
        let _ = self.site_check.set(check);
    }

    /// Answers a relay's site check on its own stream.
    pub(super) async fn check_site(
        &self,
        peer: Option<&str>,
        c: transfer_wire::CheckSite,
        w: &mut Writer,
    ) -> Result<Served, TransferError> {
        let (Some(peer), Some(check)) = (peer, self.site_check.get()) else {
            let msg = "this node answers no site checks";
            refuse(w, codes::PROTOCOL, msg).await;
            return Err(TransferError::Protocol(msg.into()));
        };
        match check(peer, &c) {
            Ok(()) => {
                put(w, Frame::Acked(Acked { chunks: Vec::new() })).await?;
                let _ = w.get_mut().finish();
            }
            Err(why) => refuse(w, codes::UNKNOWN_DESTINATION, &why).await,
        }
        Ok(Served::Complete)
    }
}
