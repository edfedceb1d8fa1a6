//! Expiry: complete transfers' states are forgotten after [`KEEP_COMPLETE`], abandoned
//! transfers' part files deleted after [`KEEP_ABANDONED`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{InState, Inbox};
use crate::TransferError;

/// A complete transfer's state (its manifest and receipt: a sender offering the file again
/// is answered at once) is kept this long after the file was verified.
pub const KEEP_COMPLETE: Duration = Duration::from_secs(30 * 86_400);
/// A transfer left incomplete, neither offered again nor added to for this long, is
/// abandoned (its sender gave up or was removed): its part file is deleted and its state
/// forgotten. A sender coming back later starts it again from the beginning.
pub const KEEP_ABANDONED: Duration = Duration::from_secs(14 * 86_400);

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

impl Inbox {
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
        for (id, st) in self.list_keyed()? {
            if !due(&st) {
                continue;
            }
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
}
