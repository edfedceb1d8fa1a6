//! Leases over a site's connection: a site asks the controller for a lease on one of its
//! resources (a backup repository, so that two runs never write it at once and no lock is
//! ever left stale: a lease nobody renews expires), on a stream of its own like a transfer.
//! The owner of the inbox answers ([`LeaseHandler`]); [`ask`] is the site's side.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::codec::{FramedRead, FramedWrite};

use crate::TransferError;
use crate::inbox::{Inbox, Served};
use crate::transfer_wire::{self, Frame, Lease, Writer, codes, put};

/// Answers a lease request: (the asking peer's site ID, the request) → the lease as held
/// now, or why not (held by another).
pub type LeaseHandler = Arc<dyn Fn(&str, &Lease) -> Result<Lease, String> + Send + Sync>;

/// Longest lease granted (a holder renews well before).
pub const MAX_TTL_S: u32 = 600;

/// What a lease request may name: `<site>/<name>`, the site being the asking peer, the name
/// passing the one grammar; a holder of printable ASCII, at most 128 bytes.
pub fn check(peer: &str, l: &Lease) -> Result<(), String> {
    let Some((site, name)) = l.key.split_once('/') else {
        return Err(format!("lease key {:?} is not <site>/<name>", l.key));
    };
    if site != peer {
        return Err(format!(
            "{peer} asked for a lease of {site}'s: a site leases only its own"
        ));
    }
    tiandi_link::names::validate_name("lease", name).map_err(|e| e.to_string())?;
    if l.holder.is_empty()
        || l.holder.len() > 128
        || !l.holder.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "lease holder {:?} is not 1-128 printable characters",
            l.holder
        ));
    }
    if !l.release && (l.ttl_s == 0 || l.ttl_s > MAX_TTL_S) {
        return Err(format!("lease of {} s: 1 to {MAX_TTL_S}", l.ttl_s));
    }
    Ok(())
}

impl Inbox {
    /// Who answers lease requests (once; later calls are ignored).
    pub fn on_lease(&self, handler: LeaseHandler) {
        let _ = self.lease.set(handler);
    }

    /// Answers a lease request on its own stream.
    pub(crate) async fn lease(
        &self,
        peer: Option<&str>,
        l: Lease,
        w: &mut Writer,
    ) -> Result<Served, TransferError> {
        let (Some(peer), Some(handler)) = (peer, self.lease.get()) else {
            let msg = "this node grants no leases";
            crate::inbox::refuse_on(w, codes::PROTOCOL, msg).await;
            return Err(TransferError::Protocol(msg.into()));
        };
        if let Err(why) = check(peer, &l) {
            crate::inbox::refuse_on(w, codes::BAD_NAME, &why).await;
            return Err(TransferError::Protocol(why));
        }
        match handler(peer, &l) {
            Ok(held) => {
                put(w, Frame::Lease(held)).await?;
                let _ = w.get_mut().finish();
            }
            Err(why) => crate::inbox::refuse_on(w, codes::LEASE_HELD, &why).await,
        }
        Ok(Served::Complete)
    }
}

/// Why a lease was not had.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Held by another holder (the answer says who, and until when).
    #[error("{0}")]
    Held(String),
    /// No answer (no connection, a timeout, a refusal of the request itself).
    #[error("no lease from the controller: {0}")]
    Unreachable(String),
}

/// Asks for (or renews, or releases) a lease over `conn`, within `timeout`.
pub async fn ask(
    conn: &quinn::Connection,
    l: Lease,
    timeout: Duration,
) -> Result<Lease, LeaseError> {
    let work = async {
        let (send, recv) = conn.open_bi().await?;
        let mut w = FramedWrite::new(send, transfer_wire::codec());
        let mut r = FramedRead::new(recv, transfer_wire::codec());
        put(&mut w, Frame::Lease(l)).await?;
        let _ = w.get_mut().finish();
        transfer_wire::next(&mut r).await
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(LeaseError::Unreachable(format!("no answer in {timeout:?}"))),
        Ok(Err(e)) => Err(LeaseError::Unreachable(e.to_string())),
        Ok(Ok(Some(Frame::Lease(held)))) => Ok(held),
        Ok(Ok(Some(Frame::Failed(f)))) if f.code == codes::LEASE_HELD => {
            Err(LeaseError::Held(f.message))
        }
        Ok(Ok(Some(Frame::Failed(f)))) => Err(LeaseError::Unreachable(format!(
            "refused: {} (code {})",
            f.message, f.code
        ))),
        Ok(Ok(Some(other))) => Err(LeaseError::Unreachable(format!(
            "expected Lease, got {}",
            other.kind()
        ))),
        Ok(Ok(None)) => Err(LeaseError::Unreachable("the stream ended".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, holder: &str, ttl_s: u32) -> Lease {
        Lease {
            key: key.into(),
            holder: holder.into(),
            ttl_s,
            ..Default::default()
        }
    }

    #[test]
    fn a_site_asks_only_for_its_own_well_named_leases() {
        assert!(check("bj-001", &lease("bj-001/db", "db/backup/1", 120)).is_ok());
        assert!(
            check("bj-001", &lease("sh-001/db", "x", 120))
                .unwrap_err()
                .contains("only its own")
        );
        assert!(check("bj-001", &lease("bj-001/..", "x", 120)).is_err());
        assert!(check("bj-001", &lease("bj-001", "x", 120)).is_err());
        assert!(check("bj-001", &lease("bj-001/db", "", 120)).is_err());
        assert!(check("bj-001", &lease("bj-001/db", "a b", 120)).is_err());
        assert!(check("bj-001", &lease("bj-001/db", "x", 0)).is_err());
        assert!(check("bj-001", &lease("bj-001/db", "x", MAX_TTL_S + 1)).is_err());
        let mut release = lease("bj-001/db", "x", 0);
        release.release = true;
        assert!(check("bj-001", &release).is_ok());
    }
}
