//! The site's uplink against a scripted controller over real QUIC on loopback: the backlog
//! goes out oldest first and leaves the spool only when acknowledged, a cut connection loses
//! nothing, and a fresh site numbers its reports above what the controller already holds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiandi_link::tls::{CertPolicy, Rejection};
use tiandi_link::{Ca, FrameReader, FrameWriter, LinkProfile, SiteIdentity};
use tiandi_proto::{Ack, Body, Report, Welcome};
use tiandi_uplink::session::{self, Shared, UplinkConfig};
use tiandi_uplink::spool::Spool;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct AnySite;
impl CertPolicy for AnySite {
    fn check(&self, _: &SiteIdentity) -> Result<(), Rejection> {
        Ok(())
    }
}

/// What the scripted controller saw: every report's sequence number, per connection.
#[derive(Default)]
struct Seen {
    sessions: Vec<Vec<u64>>,
}

/// A controller that welcomes with `held` (acknowledged through), acknowledges every report,
/// and drops the first connection after `cut_after` reports (without acknowledging those).
async fn controller(
    ca: &Ca,
    held: u64,
    cut_after: Option<usize>,
    seen: Arc<Mutex<Seen>>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (chain, key) = ca.issue_controller().unwrap();
    let tls = tiandi_link::tls::server_tls(chain, key, ca.cert_der(), Arc::new(AnySite)).unwrap();
    let cfg = tiandi_link::server_config(tls, LinkProfile::Terrestrial.transport_config().into())
        .unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let ep = tiandi_link::server_endpoint_on(socket, cfg, b"uplink test reset key").unwrap();
    let task = tokio::spawn(async move {
        let mut acked_through = held;
        let mut connection = 0;
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            connection += 1;
            let Ok((send, recv)) = conn.accept_bi().await else {
                continue;
            };
            let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
            let Ok(Some(Body::Hello(_))) = r.recv().await else {
                continue;
            };
            w.send(Body::Welcome(Welcome {
                major: tiandi_proto::MAJOR,
                minor: tiandi_proto::MINOR,
                acked_through,
                acked_ranges: Vec::new(),
                server_time_ms: tiandi_link::clock::now_ms(),
                epoch: 1,
                path_policy: None,
            }))
            .await
            .unwrap();
            seen.lock().unwrap().sessions.push(Vec::new());
            let mut n = 0;
            while let Ok(Some(Body::Report(rep))) = r.recv().await {
                seen.lock()
                    .unwrap()
                    .sessions
                    .last_mut()
                    .unwrap()
                    .push(rep.seq);
                n += 1;
                if connection == 1 && cut_after == Some(n) {
                    conn.close(0u32.into(), b"cut");
                    break;
                }
                if rep.last_seq() == acked_through + 1 {
                    acked_through = rep.last_seq();
                }
                let ack = Ack {
                    first: rep.seq,
                    last: rep.last_seq(),
                };
                if w.send(Body::Ack(ack)).await.is_err() {
                    break;
                }
            }
        }
    });
    (addr, task)
}

/// A spool holding `n` reports taken while the link was down.
fn spool_with(dir: &std::path::Path, n: u64) -> Arc<Shared> {
    let spool = Spool::open_dir(dir, 64 << 20, 10_000, false).unwrap();
    let shared = Shared::new(spool);
    for i in 0..n {
        shared
            .push(Report {
                taken_ms: 1_000_000 + i as i64 * 10_000,
                ..Default::default()
            })
            .unwrap();
    }
    shared
}

fn uplink(ca: &Ca, addr: SocketAddr, shared: Arc<Shared>) -> CancellationToken {
    let (key, csr) = tiandi_link::pki::site_key_and_csr("nx-001").unwrap();
    let issued = ca
        .sign_site(&csr, "nx-001", "NX", Duration::from_secs(3600))
        .unwrap();
    let tls = tiandi_link::tls::site_client_tls(ca.cert_pem(), &issued.cert_pem, &key).unwrap();
    let client =
        tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport_config().into())
            .unwrap();
    let cfg = UplinkConfig {
        controller: addr.to_string(),
        standby: Vec::new(),
        site_id: "nx-001".into(),
        client,
        interval_ms: 10_000,
        connect_timeout: Duration::from_secs(5),
        on_session: None,
    };
    let cancel = CancellationToken::new();
    let ep = tiandi_link::client_endpoint(addr).unwrap();
    tokio::spawn(session::run(ep, cfg, shared, cancel.clone()));
    cancel
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spooled(shared: &Shared) -> usize {
    shared.spool.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_goes_out_oldest_first_and_leaves_only_when_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("uplink-test").unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (addr, server) = controller(&ca, 0, None, seen.clone()).await;
    let shared = spool_with(dir.path(), 100);
    let cancel = uplink(&ca, addr, shared.clone());
    until("the spool drains", || spooled(&shared) == 0).await;
    let sessions = seen.lock().unwrap().sessions.clone();
    assert_eq!(sessions.len(), 1);
    let got = &sessions[0];
    // The newest report may go first (the current state); the rest oldest first.
    let backlog: Vec<u64> = got.iter().copied().filter(|&s| s != 100).collect();
    assert_eq!(backlog, (1..100).collect::<Vec<_>>(), "in order, each once");
    assert_eq!(got.len(), 100);
    assert_eq!(shared.acked.load(std::sync::atomic::Ordering::Relaxed), 100);
    cancel.cancel();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("uplink-test").unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (addr, server) = controller(&ca, 0, Some(40), seen.clone()).await;
    let shared = spool_with(dir.path(), 200);
    let cancel = uplink(&ca, addr, shared.clone());
    until("the spool drains after the cut", || spooled(&shared) == 0).await;
    let sessions = seen.lock().unwrap().sessions.clone();
    assert!(
        sessions.len() >= 2,
        "reconnected: {} sessions",
        sessions.len()
    );
    assert_eq!(sessions[0].len(), 40);
    let all: BTreeSet<u64> = sessions.iter().flatten().copied().collect();
    assert_eq!(
        all,
        (1..=200).collect(),
        "every report reached the controller"
    );
    // What was not acknowledged before the cut went again after it.
    let unacked_at_cut = *sessions[0].last().unwrap();
    assert!(sessions[1..].iter().flatten().any(|&s| s == unacked_at_cut));
    cancel.cancel();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_site_numbers_its_reports_above_what_the_controller_holds() {
    // A reinstalled site: its spool is new, but the controller holds reports 1..=500 of it.
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("uplink-test").unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (addr, server) = controller(&ca, 500, None, seen.clone()).await;
    let shared = spool_with(dir.path(), 5);
    let cancel = uplink(&ca, addr, shared.clone());
    until("the spool drains", || spooled(&shared) == 0).await;
    let got: BTreeSet<u64> = seen.lock().unwrap().sessions[0].iter().copied().collect();
    assert_eq!(
        got,
        (501..=505).collect(),
        "renumbered, not taken for duplicates"
    );
    cancel.cancel();
    server.abort();
}
