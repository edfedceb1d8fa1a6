//! Reading a group stream: straight from quinn, or unordered through a [`Reassembly`] fed
//! with the connection's repair datagrams.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::{Reassembly, RepairRouter};

/// Why a read of a group stream stopped short.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly after this many bytes of the read.
    Finished(usize),
    Other(String),
}

/// A group stream being read: straight from quinn, or through a [`Reassembly`] fed by the
/// stream's unordered segments and the connection's repair datagrams.
pub enum GroupRecv {
    Plain(quinn::RecvStream),
    Repaired(Repaired),
}

pub struct Repaired {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
    stop: Option<oneshot::Sender<u32>>,
}

impl GroupRecv {
    /// Reads `recv`; with the connection's repair router, through repair.
    pub fn new(recv: quinn::RecvStream, router: Option<&Arc<RepairRouter>>) -> GroupRecv {
        let Some(router) = router else {
            return GroupRecv::Plain(recv);
        };
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(pump(recv, router.clone(), tx, stop_rx));
        GroupRecv::Repaired(Repaired {
            rx,
            buf: Bytes::new(),
            stop: Some(stop_tx),
        })
    }

    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), ReadError> {
        match self {
            GroupRecv::Plain(r) => r.read_exact(out).await.map_err(|e| match e {
                quinn::ReadExactError::FinishedEarly(n) => ReadError::Finished(n),
                other => ReadError::Other(other.to_string()),
            }),
            GroupRecv::Repaired(r) => {
                let mut n = 0;
                while n < out.len() {
                    if r.buf.is_empty() {
                        match r.rx.recv().await {
                            Some(Ok(b)) => r.buf = b,
                            Some(Err(e)) => return Err(ReadError::Other(e)),
                            None => return Err(ReadError::Finished(n)),
                        }
                    }
                    let take = r.buf.len().min(out.len() - n);
                    out[n..n + take].copy_from_slice(&r.buf.split_to(take));
                    n += take;
                }
                Ok(())
            }
        }
    }

    /// Asks the sender to stop sending (with an application error code).
    pub fn stop(&mut self, code: u32) {
        match self {
            GroupRecv::Plain(r) => {
                let _ = r.stop(code.into());
            }
            GroupRecv::Repaired(r) => {
                if let Some(s) = r.stop.take() {
                    let _ = s.send(code);
                }
            }
        }
    }
}

/// Feeds one stream's segments and repairs through a [`Reassembly`] to its reader.
async fn pump(
    mut recv: quinn::RecvStream,
    router: Arc<RepairRouter>,
    tx: mpsc::Sender<Result<Bytes, String>>,
    mut stop: oneshot::Receiver<u32>,
) {
    let id = u64::from(recv.id());
    let mut repairs = router.register(id);
    let mut asm = Reassembly::default();
    let mut repairs_open = true;
    let mut stop_open = true;
    let mut tx = Some(tx);
    loop {
        let mut finished = false;
        tokio::select! {
            code = &mut stop, if stop_open => {
                stop_open = false;
                if let Ok(code) = code {
                    let _ = recv.stop(code.into());
                    break;
                }
            }
            c = recv.read_chunk(usize::MAX, false) => match c {
                Ok(Some(c)) => {
                    asm.data(c.offset, c.bytes);
                    asm.retry();
                }
                Ok(None) => finished = true,
                Err(e) => {
                    if let Some(tx) = &tx {
                        let _ = tx.send(Err(e.to_string())).await;
                    }
                    break;
                }
            },
            r = repairs.recv(), if repairs_open => match r {
                Some(r) => asm.repair(r),
                None => repairs_open = false,
            },
        }
        if let Some(t) = &tx {
            for b in asm.ready() {
                if t.send(Ok(b)).await.is_err() {
                    // The reader is gone without a word: it wants no more.
                    let _ = recv.stop(0u32.into());
                    router.unregister(id);
                    return;
                }
            }
            if asm.complete() {
                // Whole: the reader sees the end now, QUIC's FIN (and any retransmission
                // still on its way) is drained here.
                tx = None;
            }
        }
        if finished {
            break;
        }
    }
    if asm.repaired_bytes > 0 {
        router
            .repaired_bytes
            .fetch_add(asm.repaired_bytes, std::sync::atomic::Ordering::Relaxed);
        debug!(
            stream = id,
            bytes = asm.repaired_bytes,
            "Stream repaired ahead of retransmission."
        );
    }
    router.unregister(id);
}
