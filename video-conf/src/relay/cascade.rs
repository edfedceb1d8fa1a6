//! A cascading relay's upstream session per room: tracks from above come down once, tracks
//! published here go up once, and the upstream's floor applies here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Relay, Room, Upstream};
use crate::conference_wire::{Role, TrackKey};
use crate::io::IoError;
use crate::track::Track;

impl Relay {
    /// Starts the room's upstream session once (a cascading relay's): every track the
    /// upstream offers (each rendition) comes down once, whatever the number of viewers here;
    /// tracks published
    /// here go up once; the upstream's floor applies here.
    pub(super) fn ensure_cascade(self: &Arc<Self>, room: &Arc<Room>, cancel: &CancellationToken) {
        let Some(up) = self.upstream.clone() else {
            return;
        };
        if room.cascading.swap(true, Ordering::AcqRel) {
            return;
        }
        let (relay, room, cancel) = (self.clone(), room.clone(), cancel.clone());
        let span = info_span!("upstream", relay = %up.name, room = %room.name);
        tokio::spawn(
            async move {
                let mut backoff = Duration::from_millis(500);
                while !cancel.is_cancelled() {
                    match relay.cascade_once(&up, &room, &cancel).await {
                        Ok(()) => backoff = Duration::from_millis(500),
                        Err(e) => warn!(error = %e, "Upstream session failed; retrying."),
                    }
                    let jitter = rand::random::<f64>() * backoff.as_secs_f64();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs_f64(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            .instrument(span),
        );
    }

    async fn cascade_once(
        self: &Arc<Self>,
        up: &Upstream,
        room: &Arc<Room>,
        cancel: &CancellationToken,
    ) -> Result<(), IoError> {
        let conn = up
            .endpoint
            .connect_with(
                up.client.clone(),
                up.addr,
                &tiandi_link::tls::relay_server_name(&up.name),
            )
            .map_err(|e| IoError::Stream(e.to_string()))?
            .await
            .map_err(|e| IoError::Stream(e.to_string()))?;
        let session = crate::client::Session::join_with(
            conn.clone(),
            &room.name,
            Role::Relay,
            vec![self.name.clone()],
            0,
            self.fec_rtt_ms,
        )
        .await?;
        info!("Upstream session up.");
        let mut view = session.view();
        view.mark_changed();
        let mut tracks = room.tracks.subscribe();
        tracks.mark_changed();
        let mut down: std::collections::HashSet<(String, String, String)> = Default::default();
        let mut up_keys: std::collections::HashSet<TrackKey> = Default::default();
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                e = conn.closed() => break Err(IoError::Stream(e.to_string())),
                r = view.changed() => {
                    if r.is_err() { break Err(IoError::Ended) }
                    let v = view.borrow_and_update().clone();
                    room.set_floor((!v.floor.is_empty()).then_some(v.floor.clone()));
                    for t in v.tracks {
                        // Tracks from here (or through here) never come back down.
                        if t.via.iter().any(|x| x == &self.name) {
                            continue;
                        }
                        // Each rendition on its own: viewers here get the one their link
                        // carries (a county on a narrow line the low one).
                        let k = (t.publisher.clone(), t.kind.clone(), t.rendition.clone());
                        if down.insert(k.clone()) {
                            session.subscribe(&k.0, &k.1, &k.2).await?;
                            let (session, room) = (session.clone(), room.clone());
                            tokio::spawn(async move {
                                let track = session.received_rendition(&k.0, &k.1, Some(&k.2)).await;
                                debug!(track = %track.key(), "Upstream track here.");
                                room.add_track(track);
                            }.in_current_span());
                        }
                    }
                }
                r = tracks.changed() => {
                    if r.is_err() { break Err(IoError::Ended) }
                    let here: Vec<Arc<Track>> = tracks.borrow_and_update().values().cloned().collect();
                    for t in here {
                        // Up goes what was published here or below, once.
                        if t.info.via.iter().any(|x| x == &up.name) || !up_keys.insert(t.key()) {
                            continue;
                        }
                        session.publish_via(t, Some(&self.name)).await?;
                    }
                }
            }
        };
        // Tracks mirrored from upstream end with the session.
        for t in session.received_tracks() {
            room.remove_track(&t);
        }
        session.close();
        result
    }
}
