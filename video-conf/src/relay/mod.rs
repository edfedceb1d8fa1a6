//! The relay: rooms, participants, fan-out.
//!
//! Each participant (a site client or a downstream relay) holds one QUIC connection with
//! mutual TLS (site certificates from the controller's CA). Tracks a participant announces
//! land in its room; every subscriber of a track gets its groups through
//! [`forward::send_track`](crate::forward::send_track), so a track crosses each connection
//! once whatever the number of viewers behind it. Groups from a site without the floor stop at
//! the first relay.
//!
//! Revocation: a relay re-checks every participant's certificate at admission and every
//! [`RECHECK`] (3 s) while it is connected, and disconnects one no longer accepted with
//! `REVOKED`. The controller's relay checks against the registry itself ([`Relay::set_cert_policy`],
//! plus [`Relay::evict_site`] at once when the controller revokes). A standalone relay
//! (`tiandi-video relay`) has no registry: if it cascades, it asks the relay above
//! ([`RelayOptions::upstream`]) on a connection of its own with its relay certificate, one
//! `CheckSites` for all its live participants every 3 s and one per admission, and the relay
//! above answers from its registry or asks its own upstream in turn (county → province →
//! ministry: the controller). Without an answer (upstream out of reach, or 5 s without a
//! reply) it fails closed: it admits and keeps only participants upstream confirmed within
//! [`RelayOptions::confirmed_within`] (default [`CONFIRMED_WITHIN`], 30 min); never confirmed or
//! last refused ones are refused. A top relay without a registry or an upstream trusts the CA
//! alone (its TLS handshake): it cannot know of revocations.
//!
//! This module holds the [`Relay`] itself (options, counters, its rooms, the accept loop);
//! the rest is one job per file: `rooms` (a conference's floor, roll call, roster and
//! tracks), `recording`, `cascade` (the upstream session), `session` (admitting a
//! participant), `participant` (its control stream and group streams), `subscription`
//! (sending it a track), `check` (revocation checks, asked of the relay above and answered
//! for the relays below) and `metrics` (the Prometheus exposition).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tiandi_link::SiteIdentity;
use tiandi_link::tls::CertPolicy;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::conference_wire;
use crate::forward::SendStats;

mod cascade;
mod check;
mod metrics;
mod participant;
mod recording;
mod rooms;
mod session;
mod subscription;

pub use check::{CHECK_TIMEOUT, CONFIRMED_WITHIN};
pub use recording::{RecordingDone, Speaker};
pub use rooms::{HealthView, Member, Room};

/// ALPN of the conference protocol.
pub const ALPN: &[u8] = b"tiandi-video/1";
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a group stream waits for its track's Announce (sent on the control stream, so
/// it may arrive after the group's first packets).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(5);
/// Control frames queued toward one participant. A participant that lets this many pile up
/// is not reading its control stream: it is disconnected (the queue never blocks the room).
const CONTROL_QUEUE: usize = 64;
/// How often every live participant's certificate is checked again against the relay's
/// [`CertPolicy`] (if it has one), or with the relay above (if it cascades): a revoked site
/// is dropped within this long (plus one round trip upstream) even if nobody calls
/// [`Relay::evict_site`] (issue 15, finding 6: within 10 s). With a policy a check is a map
/// lookup; upstream, one stream every 3 s carrying every live certificate (~100 bytes each
/// way per site).
pub const RECHECK: Duration = Duration::from_secs(3);

/// Counters for the whole relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub groups_in: AtomicU64,
    /// Groups stopped at this relay because their publisher lacked the floor.
    pub groups_no_floor: AtomicU64,
    pub bad_streams: AtomicU64,
    pub send: Arc<SendStats>,
}

pub struct RelayOptions {
    /// This relay's name (its site ID).
    pub name: String,
    /// The site that chairs rooms created on first join.
    pub chair: String,
    /// The relay above this one, if it cascades.
    pub upstream: Option<Upstream>,
    /// Rooms come into being when a site first joins them (a standalone relay); otherwise
    /// only rooms created with [`Relay::create_room`] can be joined (conferences the
    /// controller runs).
    pub open_rooms: bool,
    /// Ask for repair datagrams ([`crate::fec`]) with the groups that participants and the
    /// upstream relay send here once the round trip is at least this long (ms; 0: never).
    pub fec_rtt_ms: u32,
    /// With an upstream: when the relay above does not answer about a participant's
    /// certificate, admit and keep it only if it confirmed it within this long (fail closed);
    /// [`CONFIRMED_WITHIN`] by default. Unused without an upstream.
    pub confirmed_within: Duration,
}

/// Where a cascading relay takes its rooms from (a province relay's ministry relay).
#[derive(Clone)]
pub struct Upstream {
    pub endpoint: quinn::Endpoint,
    pub addr: std::net::SocketAddr,
    /// The upstream relay's site ID (the name its certificate carries).
    pub name: String,
    pub client: quinn::ClientConfig,
}

pub struct Relay {
    pub name: String,
    chair: String,
    upstream: Option<Upstream>,
    open_rooms: bool,
    fec_rtt_ms: u32,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    pub stats: RelayStats,
    /// Every admitted connection, by its QUIC stable id: what [`Relay::evict_site`] and the
    /// periodic re-check close.
    live: Mutex<HashMap<usize, Live>>,
    /// Who may stay connected (the controller's registry on the controller's relay).
    policy: OnceLock<Arc<dyn CertPolicy>>,
    /// Without a policy, with an upstream: who may stay connected, asked of the relay above.
    checker: Option<check::UpstreamCheck>,
}

/// A connection this relay admitted, and whose certificate it is.
struct Live {
    id: SiteIdentity,
    conn: quinn::Connection,
}

impl Relay {
    pub fn new(opts: RelayOptions) -> Arc<Relay> {
        let checker = opts
            .upstream
            .clone()
            .map(|up| check::UpstreamCheck::new(up, opts.confirmed_within));
        Arc::new(Relay {
            name: opts.name,
            chair: opts.chair,
            upstream: opts.upstream,
            open_rooms: opts.open_rooms,
            fec_rtt_ms: opts.fec_rtt_ms,
            rooms: Mutex::new(HashMap::new()),
            stats: RelayStats::default(),
            live: Mutex::new(HashMap::new()),
            policy: OnceLock::new(),
            checker,
        })
    }

    /// Checks every participant against `policy` at admission and every [`RECHECK`] while it
    /// is connected: one no longer accepted (revoked, superseded) is disconnected with code
    /// `REVOKED`. Set once (later calls are ignored); the controller gives its registry, the
    /// same policy its TLS handshake uses. A policy wins over asking upstream, and answers
    /// the relays below.
    pub fn set_cert_policy(&self, policy: Arc<dyn CertPolicy>) {
        let _ = self.policy.set(policy);
    }

    /// Disconnects every session of `site` (its certificate was revoked): code `REVOKED`; it
    /// leaves its rooms (its tracks end, the roster forgets it). Returns how many connections
    /// were closed. The controller calls it when it revokes a site.
    pub fn evict_site(&self, site: &str) -> usize {
        let conns: Vec<quinn::Connection> = self
            .live
            .lock()
            .expect("live lock poisoned")
            .values()
            .filter(|l| l.id.site_id == site)
            .map(|l| l.conn.clone())
            .collect();
        for c in &conns {
            c.close(
                conference_wire::codes::REVOKED.into(),
                b"certificate revoked: this site may no longer take part",
            );
        }
        if !conns.is_empty() {
            warn!(%site, sessions = conns.len(), "Revoked site disconnected from its conferences.");
        }
        conns.len()
    }

    /// Sites with a live connection here (each once).
    pub fn connected_sites(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .live
            .lock()
            .expect("live lock poisoned")
            .values()
            .map(|l| l.id.site_id.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Closes every live connection whose certificate is no longer accepted: by the policy,
    /// or by the relay above (fail closed without its answer). Returns how many.
    async fn recheck(&self) -> usize {
        if self.policy.get().is_none() && self.checker.is_none() {
            return 0;
        }
        let live: Vec<(SiteIdentity, quinn::Connection)> = self
            .live
            .lock()
            .expect("live lock poisoned")
            .values()
            .map(|l| (l.id.clone(), l.conn.clone()))
            .collect();
        // Each certificate once, however many connections it holds.
        let mut certs: Vec<conference_wire::SiteCert> =
            live.iter().map(|(id, _)| check::site_cert(id)).collect();
        certs.sort_by(|a, b| (&a.site, &a.serial).cmp(&(&b.site, &b.serial)));
        certs.dedup_by(|a, b| (&a.site, &a.serial) == (&b.site, &b.serial));
        let Some(verdicts) = self.verdicts(&certs).await else {
            return 0;
        };
        let refused: HashMap<(String, String), String> = certs
            .into_iter()
            .zip(verdicts)
            .filter_map(|(c, v)| v.err().map(|why| ((c.site, c.serial), why)))
            .collect();
        let mut closed = 0;
        for (id, c) in &live {
            let Some(why) = refused.get(&(id.site_id.clone(), id.serial.clone())) else {
                continue;
            };
            if c.close_reason().is_some() {
                continue;
            }
            warn!(why = %why, "Certificate no longer accepted: participant disconnected.");
            c.close(
                conference_wire::codes::REVOKED.into(),
                format!("certificate no longer accepted ({why})").as_bytes(),
            );
            closed += 1;
        }
        closed
    }

    /// Registers an admitted connection (what [`Relay::evict_site`] and the re-check close),
    /// after checking its certificate: with the policy, or with the relay above.
    async fn admit(&self, id: &SiteIdentity, conn: &quinn::Connection) -> Result<(), String> {
        if let Some(verdict) = self
            .verdicts(&[check::site_cert(id)])
            .await
            .and_then(|v| v.into_iter().next())
        {
            verdict.map_err(|why| format!("certificate not accepted ({why})"))?;
        }
        self.live.lock().expect("live lock poisoned").insert(
            conn.stable_id(),
            Live {
                id: id.clone(),
                conn: conn.clone(),
            },
        );
        Ok(())
    }

    fn forget(&self, conn: &quinn::Connection) {
        self.live
            .lock()
            .expect("live lock poisoned")
            .remove(&conn.stable_id());
    }

    /// Creates a room chaired by `chair`; an existing room of that name (not ended) is
    /// returned as is.
    pub fn create_room(&self, name: &str, chair: &str) -> Arc<Room> {
        let mut rooms = self.rooms.lock().expect("rooms lock poisoned");
        if let Some(r) = rooms.get(name).filter(|r| !r.is_ended()) {
            return r.clone();
        }
        let r = Room::new(name, chair);
        rooms.insert(name.to_string(), r.clone());
        r
    }

    /// Ends a room: its participants are disconnected. Returns whether it existed.
    pub fn end_room(&self, name: &str) -> bool {
        match self.rooms.lock().expect("rooms lock poisoned").remove(name) {
            Some(r) => {
                r.ended.cancel();
                for t in r.tracks.borrow().values() {
                    t.close();
                }
                true
            }
            None => false,
        }
    }

    /// The room if it exists and has not ended.
    pub fn find_room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .get(name)
            .filter(|r| !r.is_ended())
            .cloned()
    }

    /// The room, created on first use.
    pub fn room(&self, name: &str) -> Arc<Room> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .entry(name.to_string())
            .or_insert_with(|| Room::new(name, &self.chair))
            .clone()
    }

    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.rooms
            .lock()
            .expect("rooms lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Accepts participants until `cancel` fires.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, cancel: CancellationToken) {
        {
            let (relay, cancel) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(RECHECK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = every.tick() => { relay.recheck().await; }
                    }
                }
            });
        }
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let (relay, cancel) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => relay.participant(conn, cancel).await,
                    Err(e) => {
                        relay.stats.refused.fetch_add(1, Ordering::Relaxed);
                        info!(%remote, error = %e, "Conference handshake failed.");
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rooms::tests::track;
    use super::*;

    fn relay(open_rooms: bool) -> Arc<Relay> {
        Relay::new(RelayOptions {
            name: "ministry-relay".into(),
            chair: "ministry".into(),
            upstream: None,
            open_rooms,
            fec_rtt_ms: 0,
            confirmed_within: CONFIRMED_WITHIN,
        })
    }

    #[test]
    fn rooms_are_created_once_found_until_ended_and_ended_for_everyone() {
        let r = relay(false);
        assert!(r.find_room("drill").is_none());
        let a = r.create_room("drill", "gd-001");
        assert_eq!(a.floor().chair, "gd-001");
        let again = r.create_room("drill", "somebody-else");
        assert!(Arc::ptr_eq(&a, &again), "an open room is returned as is");
        assert!(Arc::ptr_eq(&r.find_room("drill").unwrap(), &a));

        let t = track("gd-001", "video", "high", 1500);
        a.add_track(t.clone());
        assert!(r.end_room("drill"));
        assert!(a.is_ended());
        assert!(t.is_closed(), "its tracks end with it");
        assert!(r.find_room("drill").is_none());
        assert!(!r.end_room("drill"), "gone already");

        let b = r.create_room("drill", "gd-002");
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(!b.is_ended());
        assert_eq!(b.floor().chair, "gd-002");
    }

    #[test]
    fn a_room_made_on_first_join_is_chaired_by_the_relays_chair() {
        let r = relay(true);
        let a = r.room("net-1");
        assert_eq!(a.floor().chair, "ministry");
        assert!(Arc::ptr_eq(&r.room("net-1"), &a));
        r.create_room("net-2", "gd-001");
        let mut names: Vec<String> = r.rooms().iter().map(|r| r.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["net-1", "net-2"]);
    }
}
