//! A connection's repair datagrams, routed to the streams they protect (held a while when they
//! overtake their stream).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::{PENDING_MAX, Repair, STREAM_QUEUE};

/// Repair datagrams of one connection, routed to the streams they protect.
#[derive(Default)]
pub struct RepairRouter {
    state: Mutex<RouterState>,
    /// Stream bytes rebuilt from repair symbols before QUIC's retransmission got there.
    pub repaired_bytes: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct RouterState {
    routes: HashMap<u64, mpsc::Sender<Repair>>,
    /// Repairs that overtook their stream, by stream id.
    pending: BTreeMap<u64, Vec<Repair>>,
    pending_n: usize,
    /// Streams already read to their end (their late repairs are dropped), the latest few.
    done: std::collections::BTreeSet<u64>,
    bad: u64,
}

impl RepairRouter {
    /// Reads `conn`'s datagrams until it closes.
    pub fn start(conn: &quinn::Connection) -> Arc<RepairRouter> {
        let router = Arc::new(RepairRouter::default());
        let (i, conn) = (router.clone(), conn.clone());
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                i.route(&d);
            }
        });
        router
    }

    /// Malformed datagrams seen.
    pub fn bad(&self) -> u64 {
        self.state.lock().expect("repair router lock poisoned").bad
    }

    pub fn route(&self, d: &Bytes) {
        let mut st = self.state.lock().expect("repair router lock poisoned");
        let r = match Repair::decode(d) {
            Ok(r) => r,
            Err(e) => {
                st.bad += 1;
                debug!(error = %e, "Malformed repair datagram (dropped).");
                return;
            }
        };
        if let Some(tx) = st.routes.get(&r.stream) {
            let _ = tx.try_send(r);
            return;
        }
        if st.done.contains(&r.stream) {
            return;
        }
        st.pending_n += 1;
        st.pending.entry(r.stream).or_default().push(r);
        while st.pending_n > PENDING_MAX {
            let Some((_, v)) = st.pending.pop_first() else {
                break;
            };
            st.pending_n -= v.len();
        }
    }

    pub(super) fn register(&self, stream: u64) -> mpsc::Receiver<Repair> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut st = self.state.lock().expect("repair router lock poisoned");
        if let Some(v) = st.pending.remove(&stream) {
            st.pending_n -= v.len();
            for r in v {
                let _ = tx.try_send(r);
            }
        }
        st.routes.insert(stream, tx);
        rx
    }

    pub(super) fn unregister(&self, stream: u64) {
        let mut st = self.state.lock().expect("repair router lock poisoned");
        st.routes.remove(&stream);
        st.done.insert(stream);
        if st.done.len() > PENDING_MAX {
            st.done.pop_first();
        }
    }
}
