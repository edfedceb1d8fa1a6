//! Store-and-forward file transfer over QUIC.
//!
//! A file goes as a [`Manifest`] (BLAKE3 of every chunk and of the whole file) and then the
//! chunks the receiver lacks, on one QUIC stream per transfer ([`transfer_wire`]). The receiver
//! ([`Inbox`]) checks every chunk, writes it into a temporary file, acknowledges chunks only
//! once they are on disk (so an acknowledged chunk is never sent again, across link cuts,
//! restarts and reboots), checks the whole file, and renames it into place: no partial file
//! is ever visible at its destination. The sender ([`send::send_file`]) re-reads and re-checks
//! every chunk from the source, so a file that changes while it is sent fails clearly.
//!
//! Modules:
//! - [`transfer_wire`]: the file-transfer protocol (frames, chunk stream headers, bitmaps);
//!   not the conference protocol, which is the video crate's own.
//! - [`manifest`]: a file's chunking and hashes.
//! - [`send`]: the sending side of one transfer over one connection.
//! - [`inbox`]: the receiving side (serving streams, part files, expiry).
//! - [`priority`]: a transfer's priority class (`alarm`, `normal`, `bulk`).
//! - [`outbox`]: the persistent queue of jobs per destination and the drivers that send them,
//!   by priority class, within windows and rate limits.
//! - [`hop`]: the file relay that stores and forwards hop by hop to the sites below a node,
//!   and reports upstream (not the conference relay).
//! - [`flags`]: the command-line flags of a send, shared by the binaries.
//!
//! The crate owns file transfer end to end: what is on the wire, what is on disk (part files,
//! its sled trees) and when a file counts as delivered. It must never expose a file at its
//! destination before the whole file is verified, acknowledge a chunk before it is durable,
//! or send an acknowledged chunk again; it dials no connections and loads no certificates of
//! its own (callers hand it QUIC connections and endpoints), and keeps no site registry.

pub mod flags;
pub mod hop;
pub mod inbox;
pub mod lease;
pub mod manifest;
pub mod outbox;
pub mod priority;
pub mod send;
pub mod transfer_wire;

use std::path::{Path, PathBuf};

pub use flags::SendFlags;
pub use inbox::{Inbox, InboxEvent};
pub use manifest::Manifest;
pub use outbox::{Job, JobState, JobStatus, Outbox, Window};
pub use priority::Priority;
pub use send::{SendOptions, SendOutcome, send_file};
pub use transfer_wire::{Bitmap, Receipt};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A name from outside refused by the one grammar (`tiandi_link::names`): why, and the
    /// name, quoted.
    #[error("name refused: {0}")]
    BadName(String),
    #[error("file of {0} bytes is too big for one transfer")]
    TooBig(u64),
    #[error("{0}")]
    SourceChanged(String),
    #[error("transfer protocol: {0}")]
    Protocol(String),
    #[error("transfer protocol version {0} is not supported (this side speaks {v})", v = transfer_wire::VERSION)]
    Version(u32),
    #[error("state store: {0}")]
    Db(#[from] sled::Error),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("the receiver refused (code {code}): {message}")]
    Refused { code: u32, message: String },
    #[error("the receiver asks to pause {retry_after_ms} ms (code {code}): {message}")]
    Paused {
        code: u32,
        message: String,
        retry_after_ms: u64,
    },
    #[error("no progress for {0:?}: the link or the receiver is stuck")]
    Stalled(std::time::Duration),
}

/// Flushes `tree` on tokio's blocking pool, not on an async worker (a flush behind a busy
/// disk would hold up every task on it) and not with sled's own `flush_async`: that runs the
/// flush on sled's small thread pool, which also writes the log buffers the flush waits for,
/// so a few concurrent `flush_async` calls (a send to every site, each driver saving its
/// progress) took every thread of it and waited for ever.
pub(crate) async fn flush_off_thread(tree: &sled::Tree) -> Result<(), TransferError> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .map_err(|e| TransferError::Db(sled::Error::ReportableBug(format!("flush task: {e}"))))??;
    Ok(())
}

impl TransferError {
    pub fn io(path: &Path, source: std::io::Error) -> TransferError {
        TransferError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether trying again later may succeed (a cut link, a paused receiver).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransferError::Connection(_)
                | TransferError::Stream(_)
                | TransferError::Paused { .. }
                | TransferError::Stalled(_)
        )
    }
}

/// How often [`expire_loop`] looks.
pub const EXPIRE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Keeps a node's transfer state from growing without end: at start and every
/// [`EXPIRE_EVERY`] until `stop`, [`Inbox::expire`] (complete transfers after
/// [`inbox::KEEP_COMPLETE`], abandoned ones after [`inbox::KEEP_ABANDONED`]), then
/// [`Outbox::expire`] (finished jobs after [`outbox::KEEP_FINISHED`]).
pub async fn expire_loop(
    inbox: std::sync::Arc<Inbox>,
    outbox: std::sync::Arc<Outbox>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (i, o) = (inbox.clone(), outbox.clone());
        let r = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let e = i.expire(now, inbox::KEEP_COMPLETE, inbox::KEEP_ABANDONED)?;
            let jobs = o.expire(now, outbox::KEEP_FINISHED)?;
            Ok::<_, TransferError>((e, jobs))
        })
        .await;
        match r {
            Ok(Ok((e, jobs))) if e != inbox::Expired::default() || jobs > 0 => tracing::info!(
                complete = e.complete,
                abandoned = e.abandoned,
                bytes_freed = e.bytes_freed,
                finished_jobs = jobs,
                "Old transfer states removed."
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Could not remove old transfer states; retrying later.")
            }
            Err(e) => tracing::warn!(error = %e, "Transfer expiry task failed; retrying later."),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EXPIRE_EVERY) => {}
        }
    }
}

pub use tiandi_link::clock::now_ms;
