//! Receiving one transfer: what is already held, chunks checked and written into the part
//! file, made durable and acknowledged, the whole file checked and put in place.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::chunks::{Route, RoutedChunk};
use super::serve::{bad_name, refuse};
use super::{
    CHUNK_QUEUE, DISK_FULL_RETRY, InState, Inbox, InboxEvent, SYNC_CHUNKS, SYNC_INTERVAL, Served,
    free_bytes, hash_file,
};
use crate::manifest::Manifest;
use crate::transfer_wire::{
    self, Acked, Bitmap, Failed, Frame, Have, Offer, Reader, Receipt, Resend, Writer, codes, next,
    put,
};
use crate::{TransferError, now_ms};

impl Inbox {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive(
        &self,
        key: &str,
        offer: &Offer,
        manifest: Manifest,
        dir: &Path,
        r: &mut Reader,
        w: &mut Writer,
        cancel: &CancellationToken,
    ) -> Result<Served, TransferError> {
        let id = manifest.id_hex();
        // Both paths from the name, through the one join (the name passed the grammar with
        // the offer; a planted symlink at either is refused, not followed).
        let dest = tiandi_link::names::join(dir, "file name", &manifest.name).map_err(bad_name)?;
        let part = part_path(dir, &manifest.name, &id)?;
        let mut st = match self.get_key(key)? {
            Some(s) if s.manifest == manifest => InState { part, dest, ..s },
            _ => InState {
                part,
                dest,
                verified: Bitmap::new(manifest.chunk_count()),
                manifest: manifest.clone(),
                origin: offer.origin.clone(),
                transfer_id: offer.transfer_id.clone(),
                priority: offer.priority.clone(),
                forward_to: offer.forward_to.clone(),
                started_ms: now_ms(),
                touched_ms: 0,
                receipt: None,
            },
        };
        // Its sender is still there (even if it is only told the disk is full again).
        st.touched_ms = now_ms();
        // Already here and intact: answer with the receipt.
        if let Some(receipt) = st.receipt.clone() {
            if st.dest.exists() {
                // A repeated offer is a new request: on a relay, the sites it names (new ones
                // too) get the file again, each answering at once if it still holds it.
                if !offer.forward_to.is_empty() {
                    for f in &offer.forward_to {
                        if !st.forward_to.contains(f) {
                            st.forward_to.push(f.clone());
                        }
                    }
                    self.store_async(key, &st).await?;
                    self.emit(InboxEvent::Reoffered(Box::new(st.clone())));
                }
                // Stored before receipts named paths relative to the inbox: say it so now.
                let receipt = Receipt {
                    path: self.receipt_path(&st.dest),
                    ..receipt
                };
                put(w, Frame::Done(receipt)).await?;
                let _ = w.get_mut().finish();
                return Ok(Served::AlreadyHad);
            }
            // The file was removed since: receive it again.
            st.receipt = None;
            st.verified = Bitmap::new(manifest.chunk_count());
        }
        if !self.tree.contains_key(format!("m/{key}"))? {
            self.tree
                .insert(format!("m/{key}"), crate::manifest::encode(&manifest))?;
        }
        // A relay learns new destinations from a repeated offer.
        for f in &offer.forward_to {
            if !st.forward_to.contains(f) {
                st.forward_to.push(f.clone());
            }
        }
        let part = st.part.clone();
        let io = |e| TransferError::io(&part, e);
        // O_NOFOLLOW: a symlink planted at the part file's name after the check is refused too.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .truncate(false)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&st.part)
            .map_err(io)?;
        // A part file shorter than its verified chunks (lost by a crash before the state was
        // written? never: the state follows the fsync) — trust only what is really there.
        let on_disk = file.metadata().map_err(io)?.len();
        let mut trusted = Bitmap::new(manifest.chunk_count());
        for i in 0..manifest.chunk_count() {
            if st.verified.get(i) && manifest.offset(i) + manifest.chunk_len(i) as u64 <= on_disk {
                trusted.set(i);
            }
        }
        st.verified = trusted;
        // Room for what is missing?
        let missing: u64 = st
            .verified
            .missing()
            .map(|i| manifest.chunk_len(i) as u64)
            .sum();
        let free = free_bytes(&self.dir);
        if free < missing.saturating_add(self.reserve_bytes) {
            return self.disk_full(key, &st, w, missing, free).await;
        }
        self.disk_ok(key, &st);
        self.store_async(key, &st).await?;
        self.shapes
            .lock()
            .expect("inbox lock poisoned")
            .insert(key.to_string(), (manifest.size, manifest.chunk_size));
        // Chunk streams that overtook this offer wait for its shape.
        self.route_added.notify_waiters();
        let partial: Vec<transfer_wire::PartialChunk> = self
            .partials
            .lock()
            .expect("inbox lock poisoned")
            .iter()
            .filter(|((k, i), _)| k == key && !st.verified.get(*i))
            .map(|((_, i), p)| transfer_wire::PartialChunk {
                index: *i,
                ranges: p.have.to_wire(),
            })
            .collect();
        put(
            w,
            Frame::Have(Have {
                verified: st.verified.as_bytes().to_vec(),
                partial,
            }),
        )
        .await?;
        info!(transfer = %st.transfer_id, name = %manifest.name, have = st.verified.count(), of = manifest.chunk_count(), "Receiving.");

        // Chunks arrive on streams of their own (see `accept_chunk`); they are routed here.
        // Each chunk comes with its reservation of the memory budgets, released once written.
        let (tx, mut chunks) = mpsc::channel::<RoutedChunk>(CHUNK_QUEUE);
        let _route = Route::add(self, key, tx);
        let mut pending: Vec<u32> = Vec::new();
        let mut first_pending: Option<Instant> = None;
        while !st.verified.complete() {
            let deadline = first_pending.map(|t| t + SYNC_INTERVAL);
            let (index, data, _held) = tokio::select! {
                _ = cancel.cancelled() => {
                    self.commit(key, &file, &mut st, &mut pending, w, false).await?;
                    return Ok(Served::Interrupted);
                }
                _ = sleep_until(deadline) => {
                    self.commit(key, &file, &mut st, &mut pending, w, true).await?;
                    first_pending = None;
                    continue;
                }
                c = chunks.recv() => match c {
                    Some(c) => c,
                    None => {
                        self.commit(key, &file, &mut st, &mut pending, w, false).await?;
                        return Ok(Served::Interrupted);
                    }
                },
                f = next(r) => match f {
                    Ok(Some(other)) => {
                        self.commit(key, &file, &mut st, &mut pending, w, false).await?;
                        let msg = format!("unexpected {} from the sender", other.kind());
                        refuse(w, codes::PROTOCOL, &msg).await;
                        return Err(TransferError::Protocol(msg));
                    }
                    Ok(None) | Err(_) => {
                        // The sender stopped or the link broke: keep what arrived.
                        self.commit(key, &file, &mut st, &mut pending, w, false).await?;
                        return Ok(Served::Interrupted);
                    }
                },
            };
            if index >= manifest.chunk_count() {
                let msg = format!("chunk {index} of a {}-chunk file", manifest.chunk_count());
                refuse(w, codes::PROTOCOL, &msg).await;
                return Err(TransferError::Protocol(msg));
            }
            if st.verified.get(index) || pending.contains(&index) {
                continue;
            }
            if data.len() != manifest.chunk_len(index)
                || *blake3::hash(&data).as_bytes() != manifest.chunks[index as usize]
            {
                warn!(transfer = %st.transfer_id, chunk = index, "Chunk failed its check: asking again.");
                put(
                    w,
                    Frame::Resend(Resend {
                        chunk: index,
                        reason: "hash mismatch".into(),
                    }),
                )
                .await?;
                continue;
            }
            if let Err(e) = file.write_all_at(&data, manifest.offset(index)) {
                self.commit(key, &file, &mut st, &mut pending, w, false)
                    .await?;
                if e.raw_os_error() == Some(nix::libc::ENOSPC) {
                    let missing: u64 = st
                        .verified
                        .missing()
                        .map(|i| manifest.chunk_len(i) as u64)
                        .sum();
                    return self
                        .disk_full(key, &st, w, missing, free_bytes(&self.dir))
                        .await;
                }
                return Err(io(e));
            }
            pending.push(index);
            first_pending.get_or_insert_with(Instant::now);
            // The last chunk in: commit now, not at the next sync (it would hold up the receipt
            // for up to `SYNC_INTERVAL`).
            let all_in =
                st.verified.count() as usize + pending.len() >= manifest.chunk_count() as usize;
            if pending.len() >= SYNC_CHUNKS || all_in {
                self.commit(key, &file, &mut st, &mut pending, w, true)
                    .await?;
                first_pending = None;
            }
        }
        self.commit(key, &file, &mut st, &mut pending, w, true)
            .await?;
        // Every chunk verified and durable: check the whole file, then put it in place.
        let part = st.part.clone();
        let whole = tokio::task::spawn_blocking(move || hash_file(&part))
            .await
            .map_err(|e| TransferError::Stream(format!("hash task: {e}")))??;
        if whole != manifest.file_hash {
            // Cannot happen with verified chunks unless the part file was tampered with.
            let _ = std::fs::remove_file(&st.part);
            self.tree.remove(key.as_bytes())?;
            let msg = "the assembled file does not match its hash; starting over".to_string();
            refuse(w, codes::VERIFY, &msg).await;
            return Err(TransferError::Protocol(msg));
        }
        drop(file);
        std::fs::rename(&st.part, &st.dest).map_err(|e| TransferError::io(&st.dest, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TransferError::io(dir, e))?;
        let receipt = Receipt {
            file_hash: id.clone(),
            size: manifest.size,
            path: self.receipt_path(&st.dest),
            verified_ms: now_ms(),
            node: self.node.clone(),
        };
        st.receipt = Some(receipt.clone());
        self.store_async(key, &st).await?;
        info!(transfer = %st.transfer_id, path = %st.dest.display(), bytes = manifest.size, "File verified and in place.");
        put(w, Frame::Done(receipt)).await?;
        let _ = w.get_mut().finish();
        self.partials
            .lock()
            .expect("inbox lock poisoned")
            .retain(|(k, _), _| k != key);
        self.shapes.lock().expect("inbox lock poisoned").remove(key);
        self.emit(InboxEvent::Complete(Box::new(st)));
        Ok(Served::Complete)
    }

    /// Makes `pending` durable (fsync, then the bitmap), then acknowledges it if `ack`.
    async fn commit(
        &self,
        key: &str,
        file: &std::fs::File,
        st: &mut InState,
        pending: &mut Vec<u32>,
        w: &mut Writer,
        ack: bool,
    ) -> Result<(), TransferError> {
        if pending.is_empty() {
            return Ok(());
        }
        // fsync off the async workers: they also drive QUIC.
        let io = |e| TransferError::io(&st.part, e);
        let f = file.try_clone().map_err(io)?;
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| TransferError::Stream(format!("fsync task: {e}")))?
            .map_err(io)?;
        for i in pending.iter() {
            st.verified.set(*i);
        }
        st.touched_ms = now_ms();
        self.store_async(key, st).await?;
        let chunks = std::mem::take(pending);
        if ack {
            // The sender may be gone already; what is stored stays stored.
            let _ = put(w, Frame::Acked(Acked { chunks })).await;
        }
        Ok(())
    }

    async fn disk_full(
        &self,
        key: &str,
        st: &InState,
        w: &mut Writer,
        needed: u64,
        free: u64,
    ) -> Result<Served, TransferError> {
        let _ = self.store(key, st);
        let first = self
            .paused_full
            .lock()
            .expect("inbox lock poisoned")
            .insert(key.to_string());
        if first {
            warn!(transfer = %st.transfer_id, name = %st.manifest.name, needed, free, "Disk full: transfer paused until space is freed.");
            self.emit(InboxEvent::DiskFull {
                name: st.manifest.name.clone(),
                needed,
                free,
            });
        }
        let _ = put(
            w,
            Frame::Failed(Failed {
                code: codes::DISK_FULL,
                message: format!(
                    "disk full on {}: {needed} bytes needed, {free} free",
                    self.node
                ),
                retry_after_ms: DISK_FULL_RETRY.as_millis() as u64,
            }),
        )
        .await;
        let _ = w.get_mut().finish();
        Ok(Served::Paused)
    }

    fn disk_ok(&self, key: &str, st: &InState) {
        let was = self
            .paused_full
            .lock()
            .expect("inbox lock poisoned")
            .remove(key);
        if was {
            info!(transfer = %st.transfer_id, "Disk space is back: transfer resumes.");
            self.emit(InboxEvent::DiskOk {
                name: st.manifest.name.clone(),
            });
        }
    }
}

/// `dir/.<name>.<hash8>.part`: the name is checked as the destination's is (the part file's
/// own name starts with a dot, which no file name from outside may), and a symlink already
/// there is refused.
fn part_path(dir: &Path, name: &str, id_hex: &str) -> Result<std::path::PathBuf, TransferError> {
    tiandi_link::names::validate_file_name("file name", name).map_err(bad_name)?;
    let p = dir.join(format!(".{name}.{}.part", &id_hex[..8.min(id_hex.len())]));
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.file_type().is_symlink() => Err(TransferError::BadName(format!(
            "{}: is a symbolic link (Tiandi never makes one here); refusing to follow it",
            p.display()
        ))),
        _ => Ok(p),
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
