//! Attacks: conference roles (issue 15, finding 5) and revocation reaching live sessions
//! (finding 6).
//!
//! Each test drives the real `tiandi-controller` and `tiandi-agent` binaries; the attacker is a
//! site with a certificate the controller really issued, speaking the real protocols (QUIC,
//! mutual TLS, the conference and report wires) from the test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiandi_tests::{AgentProc, ControllerProc, bin, free_udp, wait_for};
use tiandi_video::client::Session;
use tiandi_video::conference_wire::{Role, TrackInfo};
use tiandi_video::track::Track;

/// An enrolled site's identity files, as `tiandi-agent enroll` wrote them.
struct Creds {
    cert: String,
    key: String,
    ca: String,
}

fn creds(agent_dir: &Path) -> Creds {
    let idd = agent_dir.join("data/identity");
    let read = |f: &str| std::fs::read_to_string(idd.join(f)).unwrap();
    Creds {
        cert: read("site.crt"),
        key: read("site.key"),
        ca: read("ca.crt"),
    }
}

/// Enrolls `site` of `province` through the CLI and `tiandi-agent enroll`; not started.
fn enroll(ctl: &ControllerProc, dir: &Path, site: &str, province: &str, config: &str) -> AgentProc {
    ctl.new_site(&dir.join(site), site, province, config)
}

fn cli_ok(ctl: &ControllerProc, args: &[&str]) -> String {
    let out = ctl.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The controller's conference relay: (address, name).
fn conference_relay(ctl: &ControllerProc) -> (SocketAddr, String) {
    let list: serde_json::Value = serde_json::from_str(&cli_ok(ctl, &["conference", "list"]))
        .expect("conference list prints JSON");
    (
        list["relay"]["address"].as_str().unwrap().parse().unwrap(),
        list["relay"]["name"].as_str().unwrap().to_string(),
    )
}

async fn connect_relay(
    addr: SocketAddr,
    relay: &str,
    c: &Creds,
) -> Result<quinn::Connection, String> {
    let tls = tiandi_video::client_tls(&c.ca, &c.cert, &c.key).map_err(|e| e.to_string())?;
    let cfg = tiandi_link::client_config(
        tls,
        tiandi_video::transport(tiandi_link::LinkProfile::Terrestrial),
    )
    .map_err(|e| e.to_string())?;
    let ep = tiandi_link::client_endpoint(addr).map_err(|e| e.to_string())?;
    ep.connect_with(cfg, addr, &tiandi_link::tls::relay_server_name(relay))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
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

/// Whether `conn` is closed within `within`; its reason if so.
async fn closed_within(conn: &quinn::Connection, within: Duration) -> Option<String> {
    tokio::time::timeout(within, conn.closed())
        .await
        .ok()
        .map(|e| e.to_string())
}

/// A controller with a conference created, and three enrolled sites (the chair `ministry`,
/// `bj-001`, `bj-002`).
struct Conf {
    _tmp: tempfile::TempDir,
    ctl: ControllerProc,
    addr: SocketAddr,
    relay: String,
    sites: Vec<Creds>,
}

fn conference() -> Conf {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let sites = ["ministry", "bj-001", "bj-002"]
        .iter()
        .map(|s| creds(&enroll(&ctl, tmp.path(), s, "BJ", "").dir))
        .collect();
    let (addr, relay) = conference_relay(&ctl);
    cli_ok(&ctl, &["conference", "create", "drill"]);
    Conf {
        _tmp: tmp,
        ctl,
        addr,
        relay,
        sites,
    }
}

impl Conf {
    async fn join(&self, i: usize, role: Role, path: Vec<String>) -> Result<Arc<Session>, String> {
        let conn = connect_relay(self.addr, &self.relay, &self.sites[i]).await?;
        Session::join(conn, "drill", role, path, 0)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Finding 5: an ordinary enrolled site says `Hello` with role `relay` (which would let it
/// announce tracks of other sites and pass the floor). Refused, with the reason; the same site
/// joins as a site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_cannot_claim_the_relay_role() {
    let c = conference();
    let err = c
        .join(1, Role::Relay, vec!["bj-001".into()])
        .await
        .err()
        .expect("an ordinary site's certificate cannot take the relay role");
    assert!(err.contains("not issued for a relay"), "{err}");
    // As what it is, it may join.
    let s = c
        .join(1, Role::Site, vec![])
        .await
        .expect("joins as a site");
    assert!(s.conn.close_reason().is_none());
}

/// Finding 5: a site publishes only as itself: announcing a track of `bj-002` (as a site, or
/// after claiming the relay role) is refused, and no other participant is ever offered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_cannot_publish_as_another_site() {
    let c = conference();
    let viewer = c.join(0, Role::Site, vec![]).await.unwrap();

    // As a site, announcing another site's track: the connection is closed with the reason.
    let s = c.join(1, Role::Site, vec![]).await.unwrap();
    s.publish(video("bj-002")).await.unwrap();
    let reason = closed_within(&s.conn, Duration::from_secs(5))
        .await
        .expect("closed for publishing as another site");
    assert!(reason.contains("cannot publish as bj-002"), "{reason}");

    // Claiming the relay role to speak for others: refused before any Announce counts.
    if let Ok(r) = c.join(1, Role::Relay, vec!["bj-001".into()]).await {
        let mut t = video("bj-002").info.clone();
        t.via = vec!["bj-001".into()];
        let _ = r.publish(Track::new(t)).await;
        let _ = r.publish_via(video("bj-002"), Some("bj-001")).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The real bj-002 is still the only one who can publish bj-002's tracks; nobody was
    // offered a forged one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offered: Vec<String> = viewer
        .view()
        .borrow()
        .tracks
        .iter()
        .map(|t| t.publisher.clone())
        .collect();
    assert!(
        !offered.iter().any(|p| p == "bj-002"),
        "a forged bj-002 track was offered: {offered:?}"
    );
}

/// Finding 6: a site's report connection (the real protocol: Hello over its certificate) is
/// closed within 10 s of `tiandi-controller revoke`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_site_loses_its_report_connection_within_10s() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let c = creds(&enroll(&ctl, tmp.path(), "gd-001", "GD", "").dir);
    let tls = tiandi_link::tls::site_client_tls(&c.ca, &c.cert, &c.key).unwrap();
    let cfg =
        tiandi_link::client_config(tls, tiandi_link::LinkProfile::Terrestrial.transport()).unwrap();
    let ep = tiandi_link::client_endpoint(ctl.quic).unwrap();
    let conn = ep
        .connect_with(cfg, ctl.quic, tiandi_link::pki::CONTROLLER_NAME)
        .unwrap()
        .await
        .expect("an enrolled site connects");
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = tiandi_link::FrameWriter::new(send);
    let mut r = tiandi_link::FrameReader::new(recv);
    w.send(tiandi_proto::Body::Hello(tiandi_proto::Hello {
        site_id: "gd-001".into(),
        major: tiandi_proto::MAJOR,
        minor: tiandi_proto::MINOR,
        agent_version: "attack".into(),
        interval_ms: 10_000,
        epoch: 0,
        path: String::new(),
    }))
    .await
    .unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(10), r.recv())
        .await
        .expect("a Welcome in time")
        .unwrap();
    assert!(
        matches!(welcome, Some(tiandi_proto::Body::Welcome(_))),
        "{welcome:?}"
    );

    let started = Instant::now();
    cli_ok(&ctl, &["revoke", "--site", "gd-001"]);
    let reason = closed_within(&conn, Duration::from_secs(10))
        .await
        .expect("the revoked site's report connection is closed within 10 s");
    eprintln!(
        "closed {:?} after the revocation: {reason}",
        started.elapsed()
    );
    assert!(reason.to_lowercase().contains("revoked"), "{reason}");
}

/// Finding 6: a site in a conference on the controller's relay is dropped within 10 s of its
/// revocation; the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_site_is_dropped_from_a_conference_within_10s() {
    let c = conference();
    let chair = c.join(0, Role::Site, vec![]).await.unwrap();
    let s = c.join(2, Role::Site, vec![]).await.unwrap();
    s.publish(video("bj-002")).await.unwrap();
    let started = Instant::now();
    cli_ok(&c.ctl, &["revoke", "--site", "bj-002"]);
    let reason = closed_within(&s.conn, Duration::from_secs(10))
        .await
        .expect("the revoked site is dropped from the conference within 10 s");
    eprintln!(
        "dropped {:?} after the revocation: {reason}",
        started.elapsed()
    );
    // Its tracks go with it; the chair stays.
    wait_for("bj-002's track withdrawn", Duration::from_secs(5), || {
        (!chair
            .view()
            .borrow()
            .tracks
            .iter()
            .any(|t| t.publisher == "bj-002"))
        .then_some(())
    });
    assert!(chair.conn.close_reason().is_none(), "the chair stays");
    // And it cannot come back.
    assert!(c.join(2, Role::Site, vec![]).await.is_err());
}

/// A province relay site (`gd-relay`, an agent with `[relay]`) and the controller that names
/// it the relay of GD; the relay started and connected upstream.
struct FileRelay {
    tmp: tempfile::TempDir,
    ctl: ControllerProc,
    _relay: AgentProc,
    listen: SocketAddr,
}

fn file_relay(relay_config: &str) -> FileRelay {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        None,
        "[relays]\n\"GD\" = \"gd-relay\"\n",
    );
    let listen = free_udp();
    let mut relay = enroll(
        &ctl,
        tmp.path(),
        "gd-relay",
        "GD",
        &format!("interval_s = 2\n[relay]\nlisten = \"{listen}\"\n{relay_config}"),
    );
    relay.start();
    wait_for("the relay's uplink", Duration::from_secs(30), || {
        relay
            .log()
            .contains("Relaying for the sites of this province")
            .then_some(())
    });
    wait_for("the relay connected", Duration::from_secs(30), || {
        (ctl.metric("tiandi_connections") >= 1.0).then_some(())
    });
    FileRelay {
        tmp,
        ctl,
        _relay: relay,
        listen,
    }
}

impl FileRelay {
    /// A county of GD enrolled at the controller (its agent not started: the test speaks for
    /// it).
    fn county(&self, site: &str) -> Creds {
        creds(&enroll(&self.ctl, self.tmp.path(), site, "GD", "").dir)
    }

    /// Connects to the relay's listener as `c`, the way a county's agent does.
    async fn connect(&self, c: &Creds) -> quinn::Connection {
        let tls = tiandi_link::tls::site_client_tls(&c.ca, &c.cert, &c.key).unwrap();
        let cfg =
            tiandi_link::client_config(tls, tiandi_link::LinkProfile::Terrestrial.transport())
                .unwrap();
        let ep = tiandi_link::client_endpoint(self.listen).unwrap();
        ep.connect_with(
            cfg,
            self.listen,
            &tiandi_link::tls::relay_server_name("gd-relay"),
        )
        .unwrap()
        .await
        .expect("the TLS handshake with the relay (same CA, same province)")
    }
}

/// Finding 6: a county connected to its province's file relay is disconnected by the relay
/// within 10 s of its revocation at the controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_site_is_dropped_by_its_file_relay_within_10s() {
    let r = file_relay("");
    let county = r.county("gd-001");
    let conn = r.connect(&county).await;
    assert!(
        closed_within(&conn, Duration::from_secs(2)).await.is_none(),
        "an enrolled county is let in: {:?}",
        conn.close_reason()
    );
    let started = Instant::now();
    cli_ok(&r.ctl, &["revoke", "--site", "gd-001"]);
    let reason = closed_within(&conn, Duration::from_secs(10))
        .await
        .expect("the relay drops the revoked county within 10 s");
    eprintln!(
        "dropped {:?} after the revocation: {reason}",
        started.elapsed()
    );
    assert!(reason.contains("revoked"), "{reason}");
}

/// Finding 6: a relay cut off from the controller admits only sites the controller confirmed
/// within `[relay] confirmed_within_s` (here 10 s): a county confirmed just before the outage
/// gets back in; one never confirmed is refused; once the confirmation is older than that,
/// the connected county is dropped and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_cut_off_from_the_controller_admits_only_recently_confirmed_sites() {
    let mut r = file_relay("confirmed_within_s = 10\n");
    let known = r.county("gd-001");
    let stranger = r.county("gd-002");
    let conn = r.connect(&known).await;
    assert!(
        closed_within(&conn, Duration::from_secs(2)).await.is_none(),
        "confirmed by the controller: {:?}",
        conn.close_reason()
    );

    r.ctl.stop();
    let cut = Instant::now();
    // The controller closed every connection as it stopped: the relay's uplink is down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Confirmed seconds ago: let in again.
    let again = r.connect(&known).await;
    assert!(
        closed_within(&again, Duration::from_secs(2))
            .await
            .is_none(),
        "a county confirmed moments ago is admitted while the controller is away: {:?}",
        again.close_reason()
    );
    // Never confirmed: refused (fail closed).
    let s = r.connect(&stranger).await;
    let reason = closed_within(&s, Duration::from_secs(5))
        .await
        .expect("a county the controller never confirmed is refused while it is away");
    assert!(
        reason.contains("revoked") || reason.contains("confirmed"),
        "{reason}"
    );
    // Its confirmation ages past 10 s: dropped, and refused from then on.
    let reason = closed_within(&conn, Duration::from_secs(30))
        .await
        .expect("dropped once its last confirmation is older than confirmed_within_s");
    eprintln!("dropped {:?} after the cut: {reason}", cut.elapsed());
    assert!(
        cut.elapsed() >= Duration::from_secs(5),
        "not before its time"
    );
    let late = r.connect(&known).await;
    assert!(
        closed_within(&late, Duration::from_secs(5)).await.is_some(),
        "refused once its confirmation is too old"
    );
}

/// A standalone conference relay (`tiandi-video relay`, the real binary), killed when dropped;
/// its log printed if the test failed.
struct VideoRelay {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl VideoRelay {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for VideoRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tiandi-video relay log ---\n{}", self.log());
        }
    }
}

/// Finding 6, below the controller: a province's standalone conference relay (`tiandi-video
/// relay`, with a relay certificate the controller issued, cascading to the controller's
/// relay) has no registry of its own. A site joins the conference through it; `tiandi-controller
/// revoke` drops the site's session at the standalone relay within 10 s (the relay asks the
/// controller's relay about its participants every 3 s), and it cannot join there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_dropped_by_a_standalone_relay_below_the_controller() {
    let c = conference();
    // The province relay's certificate: enrolled with the relay role.
    let token = c.ctl.enroll("bj-relay", "BJ", &["--role", "relay"]);
    let dir = c._tmp.path().join("bj-relay");
    let _enrolled = AgentProc::enroll(&dir, c.ctl.quic, &token, "");
    let idd = dir.join("data/identity");
    let listen = free_udp();
    let log = dir.join("video-relay.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(bin("tiandi-video"))
        .args([
            "relay",
            "--listen",
            &listen.to_string(),
            "--name",
            "bj-relay",
        ])
        .arg("--ca")
        .arg(idd.join("ca.crt"))
        .arg("--cert")
        .arg(idd.join("site.crt"))
        .arg("--key")
        .arg(idd.join("site.key"))
        .args([
            "--upstream",
            &c.addr.to_string(),
            "--upstream-name",
            &c.relay,
            "--log",
            "info",
        ])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("tiandi-video runs");
    let relay = VideoRelay { child, log };
    wait_for("the standalone relay", Duration::from_secs(30), || {
        relay.log().contains("listening on").then_some(())
    });

    // bj-001 joins the conference through the standalone relay (asked about upstream, and
    // confirmed by the controller's registry).
    let s = Session::join(
        connect_relay(listen, "bj-relay", &c.sites[1])
            .await
            .unwrap(),
        "drill",
        Role::Site,
        vec![],
        0,
    )
    .await
    .expect("an enrolled site joins through the standalone relay");
    let other = Session::join(
        connect_relay(listen, "bj-relay", &c.sites[2])
            .await
            .unwrap(),
        "drill",
        Role::Site,
        vec![],
        0,
    )
    .await
    .expect("another site joins too");
    assert!(
        closed_within(&s.conn, Duration::from_secs(4))
            .await
            .is_none(),
        "kept while enrolled (past a re-check): {:?}",
        s.conn.close_reason()
    );

    let started = Instant::now();
    cli_ok(&c.ctl, &["revoke", "--site", "bj-001"]);
    let reason = closed_within(&s.conn, Duration::from_secs(10))
        .await
        .expect("the standalone relay drops the revoked site within 10 s");
    eprintln!(
        "dropped {:?} after the revocation: {reason}",
        started.elapsed()
    );
    assert!(reason.contains("revoked"), "{reason}");
    assert!(other.conn.close_reason().is_none(), "the others stay");
    // And it cannot join there again.
    let again = match connect_relay(listen, "bj-relay", &c.sites[1]).await {
        Err(e) => Err(e),
        Ok(conn) => Session::join(conn, "drill", Role::Site, vec![], 0)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let err = again.expect_err("a revoked site is refused by the standalone relay");
    assert!(err.contains("revoked"), "{err}");
}
