//! The relay and clients over real QUIC on loopback, with synthetic media (the ffmpeg-based
//! tests start real encoders and players).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiandi_link::pki::{self, Ca};
use tiandi_video::conference_wire::{self, Object, Role, TrackInfo};
use tiandi_video::relay::{Relay, RelayOptions, Upstream};
use tiandi_video::track::{Fetch, Track};
use tiandi_video::{client::Session, client_tls, relay_tls};
use tokio_util::sync::CancellationToken;

struct Site {
    id: String,
    cert: String,
    key: String,
}

fn site(ca: &Ca, id: &str) -> Site {
    let (key, csr) = pki::site_key_and_csr(id).unwrap();
    let issued = ca
        .sign_site(&csr, id, "BJ", Duration::from_secs(3600))
        .unwrap();
    Site {
        id: id.into(),
        cert: issued.cert_pem,
        key,
    }
}

/// A relay's certificate: issued by the CA with the relay role (only those may cascade).
fn relay_cert(ca: &Ca, id: &str) -> Site {
    let (key, csr) = pki::site_key_and_csr(id).unwrap();
    let issued = ca
        .sign_relay(&csr, id, "BJ", Duration::from_secs(3600))
        .unwrap();
    Site {
        id: id.into(),
        cert: issued.cert_pem,
        key,
    }
}

struct Lab {
    ca: Arc<Ca>,
    relay: Arc<Relay>,
    addr: std::net::SocketAddr,
    name: String,
    /// The relay's endpoint: closing it stops the relay (every connection closed, new ones
    /// refused).
    endpoint: quinn::Endpoint,
    _cancel: tokio_util::sync::DropGuard,
}

fn transport() -> Arc<quinn::TransportConfig> {
    tiandi_link::LinkProfile::Terrestrial.transport()
}

async fn lab() -> Lab {
    relay_on(
        Arc::new(Ca::generate("test CA").unwrap()),
        "ministry-relay",
        None,
    )
    .await
}

/// A relay named `name` with certificates from `ca`, cascading from `upstream` if given.
async fn relay_on(ca: Arc<Ca>, name: &str, upstream: Option<&Lab>) -> Lab {
    relay_with(ca, name, upstream, true).await
}

async fn relay_with(ca: Arc<Ca>, name: &str, upstream: Option<&Lab>, open_rooms: bool) -> Lab {
    relay_fec(
        ca,
        name,
        upstream,
        open_rooms,
        tiandi_video::client::FEC_RTT_MS,
    )
    .await
}

async fn relay_fec(
    ca: Arc<Ca>,
    name: &str,
    upstream: Option<&Lab>,
    open_rooms: bool,
    fec_rtt_ms: u32,
) -> Lab {
    relay_full(
        ca,
        name,
        upstream,
        open_rooms,
        fec_rtt_ms,
        tiandi_video::relay::CONFIRMED_WITHIN,
    )
    .await
}

async fn relay_full(
    ca: Arc<Ca>,
    name: &str,
    upstream: Option<&Lab>,
    open_rooms: bool,
    fec_rtt_ms: u32,
    confirmed_within: Duration,
) -> Lab {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let r = relay_cert(&ca, name);
    let tls = relay_tls(ca.cert_pem(), &r.cert, &r.key).unwrap();
    let ep =
        tiandi_link::server_endpoint("127.0.0.1:0".parse().unwrap(), tls, transport(), &[7; 32])
            .unwrap();
    let addr = ep.local_addr().unwrap();
    let upstream = upstream.map(|u| Upstream {
        endpoint: tiandi_link::client_endpoint(u.addr).unwrap(),
        addr: u.addr,
        name: u.name.clone(),
        client: tiandi_link::client_config(
            client_tls(ca.cert_pem(), &r.cert, &r.key).unwrap(),
            transport(),
        )
        .unwrap(),
    });
    let relay = Relay::new(RelayOptions {
        name: r.id.clone(),
        chair: "ministry".into(),
        upstream,
        open_rooms,
        fec_rtt_ms,
        confirmed_within,
    });
    let cancel = CancellationToken::new();
    tokio::spawn(relay.clone().serve(ep.clone(), cancel.clone()));
    Lab {
        ca,
        relay,
        addr,
        name: r.id,
        endpoint: ep,
        _cancel: cancel.drop_guard(),
    }
}

impl Lab {
    async fn connect(&self, s: &Site) -> Result<quinn::Connection, String> {
        let tls = client_tls(self.ca.cert_pem(), &s.cert, &s.key).unwrap();
        let cfg = tiandi_link::client_config(tls, transport()).unwrap();
        let ep = tiandi_link::client_endpoint(self.addr).unwrap();
        let conn = ep
            .connect_with(
                cfg,
                self.addr,
                &tiandi_link::tls::relay_server_name(&self.name),
            )
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(conn)
    }

    async fn join(&self, id: &str) -> Arc<Session> {
        self.join_fec(id, tiandi_video::client::FEC_RTT_MS).await
    }

    async fn join_fec(&self, id: &str, fec_rtt_ms: u32) -> Arc<Session> {
        let s = site(&self.ca, id);
        let conn = self.connect(&s).await.unwrap();
        Session::join_with(conn, "drill", Role::Site, vec![], 0, fec_rtt_ms)
            .await
            .unwrap()
    }

    /// Joins with this certificate (the same one again: same serial); Err: why refused.
    async fn join_as(&self, s: &Site) -> Result<Arc<Session>, String> {
        let conn = self.connect(s).await?;
        Session::join(conn, "drill", Role::Site, vec![], 0)
            .await
            .map_err(|e| e.to_string())
    }
}

fn video(publisher: &str) -> Arc<Track> {
    Track::new(TrackInfo {
        publisher: publisher.into(),
        kind: "video".into(),
        codec: "h264".into(),
        rendition: "high".into(),
        bitrate_kbps: 1500,
        ..Default::default()
    })
}

fn frame(n: u64, key: bool) -> Object {
    Object {
        pts_us: n as i64 * 40_000,
        flags: if key { conference_wire::flags::KEY } else { 0 },
        payload: Bytes::from(vec![(n % 251) as u8; if key { 20_000 } else { 2_000 }]),
    }
}

/// Publishes `groups` groups of `per` frames, 40 ms apart.
async fn run_source(t: Arc<Track>, first_group: u64, groups: u64, per: u64) {
    for g in first_group..first_group + groups {
        let group = t.start_group(g);
        for i in 0..per {
            group.push(frame(g * per + i, i == 0));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        group.finish();
    }
}

async fn received(s: &Session, publisher: &str) -> Arc<Track> {
    tokio::time::timeout(Duration::from_secs(10), s.received(publisher, "video"))
        .await
        .unwrap_or_else(|_| panic!("nothing of {publisher}'s video arrived"))
}

/// Reads the received track's groups until `until` groups were seen or the time is up.
async fn collect(t: Arc<Track>, until: u64, secs: u64) -> Vec<(u64, usize, bool)> {
    let mut out = Vec::new();
    let mut rx = t.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while (out.len() as u64) < until {
        let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            break;
        }
        let Some(g) = rx.borrow_and_update().clone() else {
            if t.is_closed() {
                break;
            }
            continue;
        };
        // Read the group whole.
        let mut n = 0;
        let mut first_key = false;
        while let Ok(Fetch::Objects(o)) = tokio::time::timeout_at(deadline, g.next_from(n)).await {
            if n == 0 {
                first_key = o[0].is_key();
            }
            // Every byte as sent (see `frame`).
            for o in &o {
                let want = ((o.pts_us / 40_000) % 251) as u8;
                assert!(
                    o.payload.iter().all(|b| *b == want),
                    "object at {} µs arrived altered",
                    o.pts_us
                );
            }
            n += o.len();
        }
        out.push((g.seq, n, first_key));
    }
    out
}

/// The chair publishes `groups` groups of 10 frames to two viewers; each viewer's first four
/// groups (after the one it joined in) arrive whole, starting at their keyframes. Returns
/// the source, still publishing.
async fn publish_whole_groups(
    chair: &Arc<Session>,
    viewers: [&Arc<Session>; 2],
    groups: u64,
) -> tokio::task::JoinHandle<()> {
    let t = video("ministry");
    chair.publish(t.clone()).await.unwrap();
    for v in viewers {
        v.subscribe("ministry", "video", "").await.unwrap();
    }
    let src = tokio::spawn(run_source(t, 1, groups, 10));
    let (r0, r1) = tokio::join!(
        received(viewers[0], "ministry"),
        received(viewers[1], "ministry")
    );
    let (g0, g1) = tokio::join!(collect(r0, 4, 20), collect(r1, 4, 20));
    for got in [&g0, &g1] {
        assert!(got.len() >= 4, "{got:?}");
        for (_, n, key) in got.iter().skip(1) {
            assert_eq!(*n, 10, "whole groups: {got:?}");
            assert!(key);
        }
    }
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_fan_out_whole_and_a_late_joiner_starts_at_a_keyframe() {
    let lab = lab().await;
    let chair = lab.join("ministry").await;
    let a = lab.join("bj-001").await;
    let b = lab.join("bj-002").await;
    let src = publish_whole_groups(&chair, [&a, &b], 8).await;
    // A late joiner, mid-group: its first group is the current one, from its keyframe.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c = lab.join("bj-003").await;
    let joined = std::time::Instant::now();
    c.subscribe("ministry", "video", "").await.unwrap();
    let rc = received(&c, "ministry").await;
    let first = collect(rc, 1, 10).await;
    assert!(
        joined.elapsed() < Duration::from_millis(400 + 500),
        "started at once"
    );
    assert!(first[0].2, "starts with a keyframe: {first:?}");
    assert!(first[0].1 >= 1);
    // Each viewer's health reaches the room's roster.
    a.report_health(Duration::from_millis(200), None);
    src.await.unwrap();
    let room = lab.relay.room("drill");
    let roster = room.roster();
    assert_eq!(roster.len(), 4);
    let health = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = room
                .roster()
                .into_iter()
                .find(|m| m.site == "bj-001")
                .unwrap();
            if let Some(h) = m.health.get("ministry/video") {
                break h.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a health report in the roster");
    assert_eq!(health.rendition, "high");
    assert!(health.frames >= 30, "{health:?}");
    assert_eq!(health.groups_lost, 0);
}

/// With repair asked for on every link (as a satellite site's client and relay do from
/// 200 ms of round trip), groups still arrive whole and in order through the unordered,
/// repairing reader, and both the publisher and the relay send repair datagrams with them.
/// (The repair itself, over an emulated lossy GEO hop: `tests/tests/video_links.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_carry_repair_datagrams_when_asked_and_arrive_whole() {
    let lab = relay_fec(
        Arc::new(Ca::generate("test CA").unwrap()),
        "ministry-relay",
        None,
        true,
        1,
    )
    .await;
    let chair = lab.join_fec("ministry", 1).await;
    let viewer = lab.join_fec("gd-001", 1).await;
    let plain = lab.join_fec("gd-002", 0).await;
    let src = publish_whole_groups(&chair, [&viewer, &plain], 6).await;
    src.await.unwrap();
    let up = chair
        .sent
        .repairs_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let down = lab
        .relay
        .stats
        .send
        .repairs_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    // A 20 kB keyframe is 18 symbols of 1,152 bytes (or fewer, larger): 5 repairs at least.
    assert!(up >= 5 * 4, "publisher sent {up} repair datagrams");
    assert!(
        down >= 5 * 4,
        "relay sent {down} repair datagrams (to one viewer)"
    );
    assert!(viewer.repair_router.is_some() && plain.repair_router.is_none());
    // Nothing is lost on loopback, but repair datagrams go ahead of stream data in QUIC's
    // packets, so a block may be rebuilt before the last of its data arrives: `collect`
    // checks that every byte is as sent either way.
    let repaired = viewer
        .repair_router
        .as_ref()
        .unwrap()
        .repaired_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("repair: {up} datagrams up, {down} down, {repaired} bytes rebuilt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_without_the_floor_reaches_nobody_until_granted() {
    let lab = lab().await;
    let speaker = lab.join("bj-009").await;
    let viewer = lab.join("bj-010").await;
    let t = video("bj-009");
    speaker.publish(t.clone()).await.unwrap();
    viewer.subscribe("bj-009", "video", "").await.unwrap();
    run_source(t.clone(), 1, 3, 5).await;
    assert!(
        lab.relay
            .stats
            .groups_no_floor
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_eq!(
        viewer.groups_in.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    lab.relay.room("drill").set_floor(Some("bj-009".into()));
    let mut view = speaker.view();
    tokio::time::timeout(
        Duration::from_secs(5),
        view.wait_for(|v| v.floor == "bj-009"),
    )
    .await
    .unwrap()
    .unwrap();
    let src = tokio::spawn(run_source(t.clone(), 10, 3, 5));
    let got = collect(received(&viewer, "bj-009").await, 2, 10).await;
    assert!(got.len() >= 2 && got.iter().all(|g| g.0 >= 10), "{got:?}");
    src.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_publish_as_another() {
    let lab = lab().await;
    let s = lab.join("bj-020").await;
    s.publish(video("ministry")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.conn.closed())
        .await
        .expect("the relay closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_certificate_is_refused() {
    let lab = lab().await;
    let other = Ca::generate("someone else").unwrap();
    let s = site(&other, "bj-666");
    let err = lab.connect(&s).await;
    // The handshake fails, or the connection is closed at once.
    match err {
        Err(_) => {}
        Ok(conn) => {
            let r = Session::join(conn, "drill", Role::Site, vec![], 0).await;
            assert!(r.is_err());
        }
    }
    assert!(lab.relay.room("drill").roster().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_group_stream_closes_only_itself() {
    let lab = lab().await;
    let pubr = lab.join("bj-030").await;
    lab.relay.room("drill").set_floor(Some("bj-030".into()));
    let viewer = lab.join("bj-031").await;
    let t = video("bj-030");
    pubr.publish(t.clone()).await.unwrap();
    viewer.subscribe("bj-030", "video", "").await.unwrap();
    // Garbage on a stream of its own: raw MPEG-TS where a group header belongs.
    let mut s = pubr.conn.open_uni().await.unwrap();
    s.write_all(&[0x47; 188]).await.unwrap();
    s.finish().unwrap();
    // A group header with an object claiming 1 GiB.
    let mut s = pubr.conn.open_uni().await.unwrap();
    s.write_all(
        &conference_wire::GroupHeader {
            track: 1,
            group: 99,
        }
        .encode(),
    )
    .await
    .unwrap();
    s.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    s.write_all(&[0; 9]).await.unwrap();
    let _ = s.finish();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        lab.relay
            .stats
            .bad_streams
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // The session goes on: later groups arrive.
    let src = tokio::spawn(run_source(t.clone(), 100, 3, 5));
    let got = collect(received(&viewer, "bj-030").await, 2, 10).await;
    assert!(got.iter().any(|g| g.0 >= 100), "{got:?}");
    assert!(pubr.conn.close_reason().is_none());
    src.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_carries_each_stream_once_each_way() {
    use std::sync::atomic::Ordering::Relaxed;
    let ca = Arc::new(Ca::generate("test CA").unwrap());
    let top = relay_on(ca.clone(), "ministry-relay", None).await;
    let gd = relay_on(ca.clone(), "gd-relay", Some(&top)).await;
    let chair = top.join("ministry").await;
    let counties = [
        gd.join("gd-001").await,
        gd.join("gd-002").await,
        gd.join("gd-003").await,
    ];
    let t = video("ministry");
    chair.publish(t.clone()).await.unwrap();
    for c in &counties {
        c.subscribe("ministry", "video", "").await.unwrap();
    }
    let src = tokio::spawn(run_source(t.clone(), 1, 8, 10));
    for c in &counties {
        let got = collect(received(c, "ministry").await, 3, 20).await;
        assert!(got.len() >= 3, "{got:?}");
        assert!(got.iter().skip(1).all(|g| g.1 == 10 && g.2), "{got:?}");
    }
    src.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The ministry's relay sent each group once (to the province relay), not once per county.
    let top_groups = top.relay.stats.send.groups_sent.load(Relaxed);
    let gd_groups = gd.relay.stats.send.groups_sent.load(Relaxed);
    assert!(
        (7..=8).contains(&top_groups),
        "top relay sent {top_groups} groups"
    );
    assert!(gd_groups >= 3 * 7, "province relay sent {gd_groups} groups");

    // Up the cascade: a county given the floor reaches the ministry, once.
    top.relay.room("drill").set_floor(Some("gd-002".into()));
    let mut v = counties[1].view();
    tokio::time::timeout(Duration::from_secs(5), v.wait_for(|v| v.floor == "gd-002"))
        .await
        .unwrap()
        .unwrap();
    let speaker = video("gd-002");
    counties[1].publish(speaker.clone()).await.unwrap();
    chair.subscribe("gd-002", "video", "").await.unwrap();
    counties[0].subscribe("gd-002", "video", "").await.unwrap();
    let src = tokio::spawn(run_source(speaker.clone(), 1, 6, 10));
    let at_top = collect(received(&chair, "gd-002").await, 3, 20).await;
    assert!(at_top.len() >= 3, "{at_top:?}");
    let next_door = collect(received(&counties[0], "gd-002").await, 3, 20).await;
    assert!(next_door.len() >= 3, "{next_door:?}");
    src.await.unwrap();
    // A track never comes back down the way it went up.
    let keys = gd.relay.room("drill").track_keys();
    assert_eq!(
        keys.iter().filter(|k| k.publisher == "gd-002").count(),
        1,
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_a_path_through_itself() {
    let lab = lab().await;
    let s = relay_cert(&lab.ca, "gd-relay");
    let conn = lab.connect(&s).await.unwrap();
    let r = Session::join(conn, "drill", Role::Relay, vec![lab.name.clone()], 0).await;
    let err = r.err().expect("refused").to_string();
    assert!(err.contains("loop"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_relay_certificate_may_take_the_relay_role() {
    let lab = lab().await;
    // An ordinary site asking for the relay role: refused, with the reason.
    let s = site(&lab.ca, "gd-001");
    let conn = lab.connect(&s).await.unwrap();
    let err = Session::join(conn.clone(), "drill", Role::Relay, vec!["gd-001".into()], 0)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("not issued for a relay"), "{err}");
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed");
    assert!(
        reason.to_string().contains("not issued for a relay"),
        "{reason}"
    );
    // A relay certificate may, and announces tracks from below with itself last in `via`.
    let r = relay_cert(&lab.ca, "gd-relay");
    let conn = lab.connect(&r).await.unwrap();
    let relay = Session::join(
        conn.clone(),
        "drill",
        Role::Relay,
        vec!["gd-relay".into()],
        0,
    )
    .await
    .expect("a relay certificate may cascade");
    let below = video("gd-002");
    relay
        .publish_via(below.clone(), Some("gd-relay"))
        .await
        .unwrap();
    let viewer = lab.join("bj-001").await;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if viewer
                .view()
                .borrow()
                .tracks
                .iter()
                .any(|t| t.publisher == "gd-002")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay's track from below is offered");
    // Without itself last in the path: refused.
    relay.publish(video("gd-003")).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed");
    assert!(reason.to_string().contains("itself last"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_publishes_only_as_itself() {
    let lab = lab().await;
    let s = site(&lab.ca, "gd-001");
    let conn = lab.connect(&s).await.unwrap();
    let me = Session::join(conn.clone(), "drill", Role::Site, vec![], 0)
        .await
        .unwrap();
    me.publish(video("gd-009")).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed");
    assert!(
        reason.to_string().contains("cannot publish as gd-009"),
        "{reason}"
    );
    // Nor as itself through a relay it is not.
    let conn = lab.connect(&s).await.unwrap();
    let me = Session::join(conn.clone(), "drill", Role::Site, vec![], 0)
        .await
        .unwrap();
    let mut t = video("gd-001").info.clone();
    t.via = vec!["gd-relay".into()];
    me.publish(Track::new(t)).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed");
    assert!(reason.to_string().contains("directly"), "{reason}");
}

/// Revoked sites in a shared set: the relay's certificate policy.
#[derive(Debug, Default)]
struct Revoked(std::sync::Mutex<Vec<String>>);

impl tiandi_link::tls::CertPolicy for Revoked {
    fn check(&self, id: &tiandi_link::SiteIdentity) -> Result<(), tiandi_link::tls::Rejection> {
        if self.0.lock().unwrap().contains(&id.site_id) {
            Err(tiandi_link::tls::Rejection::Revoked)
        } else {
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sites_are_dropped_by_evict_and_by_the_periodic_check() {
    let lab = lab().await;
    let policy = Arc::new(Revoked::default());
    lab.relay.set_cert_policy(policy.clone());
    let a = lab.join("gd-001").await;
    let b = lab.join("gd-002").await;
    let c = lab.join("gd-003").await;
    assert_eq!(lab.relay.connected_sites(), ["gd-001", "gd-002", "gd-003"]);
    // Pushed: the controller calls evict_site when it revokes.
    assert_eq!(lab.relay.evict_site("gd-001"), 1);
    let reason = tokio::time::timeout(Duration::from_secs(2), a.conn.closed())
        .await
        .expect("evicted at once");
    assert!(reason.to_string().contains("revoked"), "{reason}");
    // Nobody told the relay: the periodic check finds it within RECHECK.
    policy.0.lock().unwrap().push("gd-002".into());
    let started = std::time::Instant::now();
    tokio::time::timeout(
        tiandi_video::relay::RECHECK + Duration::from_secs(2),
        b.conn.closed(),
    )
    .await
    .expect("dropped by the periodic check");
    eprintln!("dropped after {:?}", started.elapsed());
    // And it cannot come back.
    let s = site(&lab.ca, "gd-002");
    let conn = lab.connect(&s).await.unwrap();
    assert!(
        Session::join(conn, "drill", Role::Site, vec![], 0)
            .await
            .is_err()
    );
    assert!(c.conn.close_reason().is_none(), "the others stay");
    assert_eq!(lab.relay.connected_sites(), ["gd-003"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conferences_roll_call_and_end() {
    let lab = relay_with(
        Arc::new(Ca::generate("test CA").unwrap()),
        "ministry-relay",
        None,
        false,
    )
    .await;
    // No such conference: refused with a reason.
    let s = site(&lab.ca, "bj-040");
    let conn = lab.connect(&s).await.unwrap();
    let err = Session::join(conn, "drill", Role::Site, vec![], 0)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("no conference"), "{err}");

    let room = lab.relay.create_room("drill", "ministry");
    let a = lab.join("bj-041").await;
    let b = lab.join("bj-042").await;
    let id = room.roll_call(tiandi_video::now_ms() + 10_000);
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut got = room.answered(id);
            got.sort();
            if got.len() == 2 {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both sites answer the roll call");
    assert_eq!(answered, vec!["bj-041".to_string(), "bj-042".to_string()]);

    // Ending the conference disconnects everyone.
    assert!(lab.relay.end_room("drill"));
    for s in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(5), s.conn.closed())
            .await
            .expect("disconnected when the conference ends");
    }
    assert!(lab.relay.find_room("drill").is_none());
}

/// A cascade whose top relay has the registry (a policy that can revoke) and whose relays
/// below have none: `low` below `top`, `county` below `low`.
struct Guarded {
    top: Lab,
    low: Lab,
    county: Lab,
    revoked: Arc<Revoked>,
}

async fn guarded(confirmed_within: Duration) -> Guarded {
    let ca = Arc::new(Ca::generate("test CA").unwrap());
    let top = relay_on(ca.clone(), "ministry-relay", None).await;
    let revoked = Arc::new(Revoked::default());
    top.relay.set_cert_policy(revoked.clone());
    let fec = tiandi_video::client::FEC_RTT_MS;
    let low = relay_full(
        ca.clone(),
        "gd-relay",
        Some(&top),
        true,
        fec,
        confirmed_within,
    )
    .await;
    let county = relay_full(
        ca,
        "gd-county-relay",
        Some(&low),
        true,
        fec,
        confirmed_within,
    )
    .await;
    Guarded {
        top,
        low,
        county,
        revoked,
    }
}

/// The code and reason `conn` was closed with, within `within`.
async fn closed_with(conn: &quinn::Connection, within: Duration) -> (u32, String) {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner() as u32,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => panic!("still open after {within:?}"),
    }
}

/// Revocation reaches a standalone relay (no registry of its own) through the relay above:
/// a site revoked at the top is dropped by the relay below it within 10 s with `REVOKED`, and
/// by a relay two levels down (which asks the one above, which asks the top); a site revoked
/// before it joins is refused at admission; the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_revoked_above_is_dropped_by_the_relays_below_within_10s() {
    let g = guarded(tiandi_video::relay::CONFIRMED_WITHIN).await;
    let a = g.low.join("gd-001").await;
    let b = g.low.join("gd-002").await;
    let c = g.county.join("gd-003").await;
    let here = |lab: &Lab, s: &str| lab.relay.connected_sites().iter().any(|x| x == s);
    assert!(here(&g.low, "gd-001") && here(&g.low, "gd-002") && here(&g.county, "gd-003"));

    g.revoked.0.lock().unwrap().push("gd-001".into());
    g.revoked.0.lock().unwrap().push("gd-003".into());
    let started = std::time::Instant::now();
    let (code, reason) = closed_with(&a.conn, Duration::from_secs(10)).await;
    eprintln!("dropped one level down after {:?}", started.elapsed());
    assert_eq!(code, conference_wire::codes::REVOKED, "{reason}");
    assert!(reason.contains("revoked"), "{reason}");
    let (code, reason) = closed_with(&c.conn, Duration::from_secs(10)).await;
    eprintln!("dropped two levels down after {:?}", started.elapsed());
    assert_eq!(code, conference_wire::codes::REVOKED, "{reason}");
    assert!(reason.contains("revoked"), "{reason}");

    // Revoked before it ever joins: refused at admission, with the reason.
    g.revoked.0.lock().unwrap().push("gd-004".into());
    let err = g
        .low
        .join_as(&site(&g.low.ca, "gd-004"))
        .await
        .err()
        .expect("a site revoked above is refused below");
    assert!(err.contains("revoked"), "{err}");
    assert!(g.low.join_as(&site(&g.low.ca, "gd-001")).await.is_err());
    assert!(b.conn.close_reason().is_none(), "the others stay");
    assert!(!here(&g.low, "gd-001") && here(&g.low, "gd-002") && !here(&g.county, "gd-003"));
}

/// The relay above out of reach (stopped): a site it confirmed moments ago is admitted below
/// and kept until its confirmation is older than `confirmed_within` (here 3 s), then dropped
/// and refused; a site never confirmed is refused at once (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_above_keeps_only_recently_confirmed_sites() {
    let g = guarded(Duration::from_secs(3)).await;
    let known = site(&g.low.ca, "gd-001");
    let stranger = site(&g.low.ca, "gd-009");
    let a = g.low.join_as(&known).await.expect("confirmed above");
    // A second session: confirmed again just now.
    let a2 = g.low.join_as(&known).await.expect("confirmed above");

    g.top.endpoint.close(0u32.into(), b"stopped");
    let cut = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = g
        .low
        .join_as(&known)
        .await
        .expect("confirmed moments ago: admitted while the relay above is away");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), again.conn.closed())
            .await
            .is_err(),
        "and kept: {:?}",
        again.conn.close_reason()
    );
    let err = g
        .low
        .join_as(&stranger)
        .await
        .err()
        .expect("never confirmed: refused while the relay above is away");
    assert!(err.contains("never confirmed"), "{err}");

    // Confirmed more than 3 s ago: every session dropped at a re-check, and refused after.
    for s in [&a, &a2, &again] {
        let (code, reason) = closed_with(&s.conn, Duration::from_secs(15)).await;
        assert_eq!(code, conference_wire::codes::REVOKED, "{reason}");
        assert!(reason.contains("fail closed"), "{reason}");
    }
    eprintln!("dropped {:?} after the cut", cut.elapsed());
    assert!(
        cut.elapsed() >= Duration::from_secs(2),
        "not before its time"
    );
    let err = g.low.join_as(&known).await.err().expect("refused now");
    assert!(err.contains("fail closed"), "{err}");
}

/// Asks `conn`'s relay about `sites` on a stream of its own.
async fn check_sites(
    conn: &quinn::Connection,
    sites: Vec<conference_wire::SiteCert>,
) -> Result<Option<conference_wire::Control>, tiandi_video::io::IoError> {
    use tiandi_video::io::{ControlReader, ControlWriter};
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| tiandi_video::io::IoError::Stream(e.to_string()))?;
    let (mut w, mut r) = (ControlWriter(send), ControlReader(recv));
    w.send(&conference_wire::Control::CheckSites(
        conference_wire::CheckSites { sites },
    ))
    .await?;
    let _ = w.0.finish();
    tokio::time::timeout(Duration::from_secs(5), r.recv())
        .await
        .expect("an answer in time")
}

fn cert_of(id: &str) -> conference_wire::SiteCert {
    conference_wire::SiteCert {
        site: id.into(),
        province: "BJ".into(),
        serial: "00ff".into(),
    }
}

/// Only a relay certificate may ask about other sites' certificates: an ordinary site that
/// opens with `CheckSites` is refused with `FORBIDDEN`. A relay certificate gets one verdict
/// per certificate, in order, on as many streams of its connection as it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_relay_certificate_may_check_sites() {
    let lab = lab().await;
    let revoked = Arc::new(Revoked::default());
    revoked.0.lock().unwrap().push("gd-002".into());
    lab.relay.set_cert_policy(revoked);

    let s = site(&lab.ca, "gd-001");
    let conn = lab.connect(&s).await.unwrap();
    match check_sites(&conn, vec![cert_of("gd-002")]).await {
        Ok(Some(conference_wire::Control::Error(e))) => {
            assert_eq!(e.code, conference_wire::codes::FORBIDDEN, "{e:?}");
            assert!(e.message.contains("relay certificate"), "{e:?}");
        }
        other => assert!(other.is_err(), "{other:?}"),
    }
    let (code, reason) = closed_with(&conn, Duration::from_secs(5)).await;
    assert_eq!(code, conference_wire::codes::FORBIDDEN, "{reason}");

    let r = relay_cert(&lab.ca, "gd-relay");
    let conn = lab.connect(&r).await.unwrap();
    for _ in 0..2 {
        let answer = check_sites(
            &conn,
            vec![cert_of("gd-001"), cert_of("gd-002"), cert_of("../etc")],
        )
        .await
        .unwrap();
        let Some(conference_wire::Control::SitesChecked(a)) = answer else {
            panic!("{answer:?}");
        };
        let got: Vec<bool> = a.results.iter().map(|v| v.allowed).collect();
        assert_eq!(got, [true, false, false], "{a:?}");
        assert!(a.results[1].reason.contains("revoked"), "{a:?}");
    }
    assert!(conn.close_reason().is_none());
    // More than a frame may carry: malformed; that stream alone is answered with an error,
    // the connection goes on.
    let too_many = (0..=conference_wire::MAX_CHECK_SITES)
        .map(|i| cert_of(&format!("gd-{i}")))
        .collect();
    match check_sites(&conn, too_many).await {
        Ok(Some(conference_wire::Control::Error(e))) => {
            assert_eq!(e.code, conference_wire::codes::PROTOCOL, "{e:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.close_reason().is_none());
}
