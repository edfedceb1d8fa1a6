//! Sending one publisher's track to a participant: the rendition its link carries, switched
//! at group boundaries.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};

use super::participant::Participant;
use crate::forward::{self, SendStats};
use crate::policy::RenditionChooser;
use crate::track::Track;

impl Participant {
    /// Sends one publisher's video (or audio) to this participant, in the rendition its link
    /// carries, until it unsubscribes or leaves.
    pub(super) fn subscribe(self: &Arc<Self>, s: crate::conference_wire::Subscribe) {
        let crate::conference_wire::Subscribe {
            publisher,
            kind,
            rendition,
            from_current,
            start_rendition,
        } = s;
        let stop = CancellationToken::new();
        // A relay below takes each rendition on a subscription of its own.
        let which = if self.role == crate::conference_wire::Role::Relay {
            rendition.clone()
        } else {
            String::new()
        };
        if let Some(old) = self
            .subs
            .lock()
            .expect("subs lock poisoned")
            .insert((publisher.clone(), kind.clone(), which), stop.clone())
        {
            old.cancel();
        }
        if !self.site_path.is_empty() {
            // A dual-homed site's subscriptions run over this path now.
            let path = self.site_path.clone();
            self.member(|m| m.path = path);
        }
        let p = self.clone();
        tokio::spawn(
            async move {
                p.run_subscription(
                    &publisher,
                    &kind,
                    &rendition,
                    (from_current, &start_rendition),
                    &stop,
                )
                .await
            }
            .in_current_span(),
        );
    }

    async fn run_subscription(
        &self,
        publisher: &str,
        kind: &str,
        fixed: &str,
        (from_current, start_rendition): (bool, &str),
        stop: &CancellationToken,
    ) {
        let mut tracks = self.room.tracks.subscribe();
        tracks.mark_changed();
        let mut chooser: Option<RenditionChooser> = None;
        let mut current: Option<(Arc<Track>, crate::track::GroupWatch)> = None;
        let flights = forward::in_flight();
        let mut dropped_seen = 0u64;
        let dropped = SendStats::child(&self.relay.stats.send);
        loop {
            // Renditions of this publisher's `kind` now in the room.
            let options: Vec<Arc<Track>> = self
                .room
                .tracks
                .borrow()
                .values()
                .filter(|t| t.info.publisher == publisher && t.info.kind == kind)
                .cloned()
                .collect();
            let offered: Vec<(String, u32)> = options
                .iter()
                .map(|t| (t.info.rendition.clone(), t.info.bitrate_kbps))
                .collect();
            match chooser.as_mut() {
                // Renditions may come one by one (a cascade's), or go.
                Some(c) if !offered.is_empty() => c.offer(offered),
                Some(_) => {}
                None if !offered.is_empty() => {
                    let mut c = RenditionChooser::new(offered, self.link_kbps, crate::now_ms());
                    if !start_rendition.is_empty() {
                        // A failover: the rendition the viewer was receiving, so that the
                        // group it holds the start of goes on in kind.
                        c.start_at(start_rendition);
                    }
                    chooser = Some(c);
                }
                None => {}
            }
            let want = if !fixed.is_empty() {
                fixed.to_string()
            } else {
                chooser
                    .as_ref()
                    .map(|c| c.current().to_string())
                    .unwrap_or_default()
            };
            let target = options.iter().find(|t| t.info.rendition == want).cloned();
            match (&current, target) {
                (Some((cur, _)), Some(t)) if Arc::ptr_eq(cur, &t) => {}
                (_, Some(t)) => {
                    // A switch (or the start): a late joiner takes the current group at once;
                    // a switch waits for the new rendition's next group (a group boundary).
                    // The old rendition's group in flight goes on (the viewer plays it until
                    // that boundary: the renditions' keyframes are at the same frames), unless
                    // the link is queueing: then what is in flight is the backlog the switch
                    // is meant to clear, and is dropped.
                    let mut rx = t.subscribe();
                    if current.is_some() {
                        rx.borrow_and_update();
                        let base = self.fec.min_rtt(&self.conn);
                        if crate::policy::queueing(self.conn.rtt(), base) {
                            forward::cancel_all(&flights);
                        }
                    } else if let Some(g) = t.current() {
                        let (age, rtt) = (g.age(t.info.clock_us), self.fec.min_rtt(&self.conn));
                        if !from_current && !crate::policy::join_current(age, rtt) {
                            debug!(track = %t.key(), group = g.seq, age_ms = age.as_millis() as u64, "Starting at the next group: the current one is too old for this path.");
                            rx.borrow_and_update();
                        }
                    }
                    debug!(track = %t.key(), "Sending rendition.");
                    current = Some((t, rx));
                }
                (_, None) => current = None,
            }
            let next = async {
                match current.as_mut() {
                    Some((_, rx)) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.conn.closed() => break,
                r = tracks.changed() => { if r.is_err() { break } tracks.borrow_and_update(); continue; }
                ok = next => {
                    if !ok { current = None; continue; }
                }
            }
            let Some((t, rx)) = current.as_mut() else {
                continue;
            };
            // No group yet (or the track just closed: the room's list changes next).
            let Some(group) = rx.borrow_and_update().clone() else {
                continue;
            };
            let id = self.out_id(&t.key());
            forward::start_group(
                &self.conn,
                id,
                &t.info.kind,
                group,
                &dropped,
                &flights,
                &self.fec,
            );
            // What the link showed since the last group: drops, and its estimated rate.
            if let Some(c) = chooser.as_mut() {
                let d = dropped.dropped();
                let s = self.conn.stats();
                let rtt = s.path.rtt.as_secs_f64().max(1e-3);
                let est_kbps = s.path.cwnd as f64 * 8.0 / rtt / 1000.0;
                let before = c.current().to_string();
                let now = c.observe(d - dropped_seen, est_kbps, crate::now_ms());
                if now != before {
                    info!(publisher, kind, from = %before, to = %now, dropped = d - dropped_seen, est_kbps = est_kbps as u64, "Rendition change.");
                }
                dropped_seen = d;
            }
        }
        forward::cancel_all(&flights);
    }
}
