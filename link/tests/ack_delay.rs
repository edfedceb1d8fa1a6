//! A site's delayed acknowledgements (`tiandi_link::transport::report_ack_delay`, quinn-proto's
//! `TransportConfig::max_ack_delay` in `vendor/`), over real QUIC on loopback: a site sends a
//! "report" every interval on one stream and the hub answers each at once, as the controller
//! acknowledges reports. With the delay the site's acknowledgement of each answer rides on its
//! next report, so a round costs one datagram each way; with QUIC's 25 ms it costs a third,
//! the site's acknowledgement alone. The hub declares nothing lost and sends no probes, and a
//! transfer toward the delaying site still runs at full speed (packets that come two at a time
//! are acknowledged at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiandi_link::LinkProfile;
use tiandi_link::pki::CONTROLLER_NAME;

mod common;

const INTERVAL: Duration = Duration::from_millis(300);
const ROUNDS: u64 = 8;

struct Pair {
    hub: quinn::Endpoint,
    site: quinn::Endpoint,
    hub_conn: quinn::Connection,
    site_conn: quinn::Connection,
}

async fn pair(site_ack_delay: Option<Duration>) -> Pair {
    let (server_tls, client_tls) = common::tls("ack delay test");
    let hub = tiandi_link::server_endpoint(
        "127.0.0.1:0".parse().expect("address"),
        server_tls,
        LinkProfile::Terrestrial.transport(),
        &[7; 32],
    )
    .expect("hub endpoint");
    let addr: SocketAddr = hub.local_addr().expect("hub address");
    let mut t = LinkProfile::Terrestrial.transport_config();
    if let Some(d) = site_ack_delay {
        t.max_ack_delay(d);
    }
    let site = tiandi_link::client_endpoint(addr).expect("site endpoint");
    let cfg = tiandi_link::client_config(client_tls, Arc::new(t)).expect("client config");
    let connecting = site
        .connect_with(cfg, addr, CONTROLLER_NAME)
        .expect("connect");
    let accepting = hub.clone();
    let accepted = tokio::spawn(async move {
        accepting
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("hub accepted the site")
    });
    let site_conn = connecting.await.expect("site connected");
    let hub_conn = accepted.await.expect("accept task");
    Pair {
        hub,
        site,
        hub_conn,
        site_conn,
    }
}

/// Closes the site's side and waits for its close to go out. The hub's connection drains for
/// three of its probe timeouts, which include the site's delay (36 s at 12 s): not waited for.
async fn close(p: Pair) {
    p.site_conn.close(0u32.into(), b"done");
    p.site.wait_idle().await;
    drop(p.hub_conn);
    p.hub.close(0u32.into(), b"done");
}

/// Datagrams each side sent during `ROUNDS` report rounds (the handshake's excluded), and the
/// hub's losses and probes.
#[derive(Debug)]
struct Rounds {
    site_datagrams: u64,
    hub_datagrams: u64,
    hub_lost: u64,
    hub_probes: u64,
}

async fn rounds(site_ack_delay: Option<Duration>) -> Rounds {
    let p = pair(site_ack_delay).await;
    let (mut tx, mut rx) = p.site_conn.open_bi().await.expect("report stream");
    tx.write_all(b"hello").await.expect("hello");
    let (mut htx, mut hrx) = p.hub_conn.accept_bi().await.expect("hub stream");
    let mut buf = [0u8; 5];
    hrx.read_exact(&mut buf).await.expect("hello read");
    htx.write_all(b"hi").await.expect("answer");
    let mut two = [0u8; 2];
    rx.read_exact(&mut two).await.expect("answer read");
    // Let the handshake's and the hello's acknowledgements settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let site0 = p.site_conn.stats().udp_tx.datagrams;
    let hub0 = p.hub_conn.stats();
    let hub = tokio::spawn(async move {
        let mut report = [0u8; 64];
        for _ in 0..ROUNDS {
            hrx.read_exact(&mut report).await.expect("report");
            htx.write_all(b"ok").await.expect("ack");
        }
        (htx, hrx)
    });
    for n in 0..ROUNDS {
        tx.write_all(&[n as u8; 64]).await.expect("report");
        rx.read_exact(&mut two).await.expect("ack");
        tokio::time::sleep(INTERVAL).await;
    }
    let _streams = hub.await.expect("hub task");
    let hub1 = p.hub_conn.stats();
    let r = Rounds {
        site_datagrams: p.site_conn.stats().udp_tx.datagrams - site0,
        hub_datagrams: hub1.udp_tx.datagrams - hub0.udp_tx.datagrams,
        hub_lost: hub1.path.lost_packets - hub0.path.lost_packets,
        hub_probes: hub1.frame_tx.ping - hub0.frame_tx.ping,
    };
    close(p).await;
    r
}

#[tokio::test]
async fn a_site_acknowledges_the_hubs_answers_with_its_next_report() {
    let delay = tiandi_link::transport::report_ack_delay(INTERVAL).expect("a delay");
    assert_eq!(delay, Duration::from_millis(375));
    let delayed = rounds(Some(delay)).await;
    let prompt = rounds(None).await;
    eprintln!("delayed {delayed:?}\nprompt {prompt:?}");
    // One datagram a round from the site (its report, carrying the acknowledgement of the
    // previous answer); at 25 ms, two (the report, then the acknowledgement alone).
    assert!(
        delayed.site_datagrams <= ROUNDS + 1,
        "the site sent acknowledgements of its own: {delayed:?}"
    );
    assert!(
        prompt.site_datagrams >= 2 * ROUNDS - 1,
        "the control did not show the acknowledgements: {prompt:?}"
    );
    // The hub answered each report with one datagram and had nothing to repair or probe.
    assert!(delayed.hub_datagrams <= ROUNDS + 1, "{delayed:?}");
    assert_eq!(delayed.hub_lost, 0, "{delayed:?}");
    assert_eq!(delayed.hub_probes, 0, "{delayed:?}");
}

#[tokio::test]
async fn a_transfer_toward_a_delaying_site_is_acknowledged_as_it_comes() {
    let size = 8 << 20;
    let mut took = Vec::new();
    for delay in [Some(Duration::from_secs(12)), None] {
        let p = pair(delay).await;
        let started = Instant::now();
        let hub = p.hub_conn.clone();
        let send = tokio::spawn(async move {
            let mut s = hub.open_uni().await.expect("stream");
            let chunk = vec![0x5a; 64 * 1024];
            for _ in 0..size / chunk.len() {
                s.write_all(&chunk).await.expect("write");
            }
            s.finish().expect("finish");
            s.stopped().await.ok();
        });
        let mut r = p.site_conn.accept_uni().await.expect("stream");
        let data = r.read_to_end(size + 1).await.expect("read");
        assert_eq!(data.len(), size);
        // The sender learns that the last bytes arrived (quinn's `stopped` resolves once the
        // stream's data is acknowledged): within the transfer's time, not after 12 s.
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("the last bytes were acknowledged promptly")
            .expect("sender");
        took.push(started.elapsed());
        assert_eq!(p.hub_conn.stats().path.lost_packets, 0);
        close(p).await;
    }
    eprintln!(
        "8 MB with a 12 s ack delay {:?}, with 25 ms {:?}",
        took[0], took[1]
    );
}
