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
        // Names from the network pass the one grammar before they are looked up.
        let named = tiandi_link::names::validate_name("site", &c.site)
            .and_then(|()| {
                if c.province.is_empty() {
                    Ok(())
                } else {
                    tiandi_link::names::validate_name("province", &c.province)
                }
            })
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if !c.serial.is_empty()
                    && c.serial.len() <= 64
                    && c.serial.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    Ok(())
                } else {
                    Err(format!(
                        "certificate serial {:?} is not 1-64 hex digits",
                        c.serial
                    ))
                }
            });
        if let Err(why) = named {
            refuse(w, codes::BAD_NAME, &why).await;
            return Err(TransferError::Protocol(why));
        }
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
