//! The controller's QUIC side against a hand-driven site over real QUIC on loopback: the
//! session protocol (Hello, Welcome, reports, acknowledgements once durable), exactly-once
//! storage across a reconnect, and the refusals a wrong peer gets, each with its code.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tiandi_controller::{Config, Controller, Core};
use tiandi_link::pki::CONTROLLER_NAME;
use tiandi_link::{FrameReader, FrameWriter, LinkProfile};
use tiandi_proto::{Body, Hello, Report, codes};

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = common::config(dir);
    cfg.conference.enabled = false;
    cfg
}

/// A site's credentials, issued directly by the controller's CA.
struct Site {
    id: String,
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
}

fn site(core: &Core, id: &str) -> Site {
    let (key_pem, csr) = tiandi_link::pki::site_key_and_csr(id).unwrap();
    let issued = core.issue_direct(id, "GS", &csr).unwrap();
    Site {
        id: id.into(),
        key_pem,
        cert_pem: issued.cert_pem,
        ca_pem: core.ca.cert_pem().to_string(),
    }
}

async fn connect(s: &Site, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let tls = tiandi_link::tls::site_client_tls(&s.ca_pem, &s.cert_pem, &s.key_pem).unwrap();
    let cfg = tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport_config().into())
        .unwrap();
    let ep = tiandi_link::client_endpoint(addr).unwrap();
    let conn = ep
        .connect_with(cfg, addr, CONTROLLER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Opens the report stream and says Hello as `claim`, version `major`.
async fn hello(conn: &quinn::Connection, claim: &str, major: u32) -> (FrameWriter, FrameReader) {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    w.send(Body::Hello(Hello {
        site_id: claim.into(),
        major,
        minor: tiandi_proto::MINOR,
        agent_version: "test".into(),
        interval_ms: 10_000,
        epoch: 0,
        path: String::new(),
    }))
    .await
    .unwrap();
    (w, FrameReader::new(recv))
}

fn report(seq: u64) -> Body {
    Body::Report(Report {
        seq,
        taken_ms: tiandi_link::clock::now_ms() - 1000 + seq as i64,
        ..Default::default()
    })
}

async fn next(r: &mut FrameReader) -> Body {
    tokio::time::timeout(Duration::from_secs(10), r.recv())
        .await
        .expect("an answer within 10 s")
        .expect("a frame")
        .expect("the stream is open")
}

/// The application close code of a connection the controller closed.
async fn closed_with(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed within 10 s")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_stored_once_and_acknowledged_across_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let s = site(&ctl.core, "gs-001");

    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    let Body::Welcome(wel) = next(&mut r).await else {
        panic!("expected Welcome");
    };
    assert_eq!((wel.acked_through, wel.acked_ranges.len()), (0, 0));
    for seq in [1, 2, 3, 2] {
        w.send(report(seq)).await.unwrap();
    }
    let mut acked = Vec::new();
    for _ in 0..4 {
        let Body::Ack(a) = next(&mut r).await else {
            panic!("expected Ack");
        };
        acked.push((a.first, a.last));
    }
    assert_eq!(
        acked,
        vec![(1, 1), (2, 2), (3, 3), (2, 2)],
        "a duplicate is acknowledged too"
    );
    conn.close(0u32.into(), b"bye");

    // Reconnect: the Welcome says what is held, and a report sent again is not stored twice.
    let conn = connect(&s, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &s.id, tiandi_proto::MAJOR).await;
    let Body::Welcome(wel) = next(&mut r).await else {
        panic!("expected Welcome");
    };
    assert_eq!(wel.acked_through, 3);
    w.send(report(3)).await.unwrap();
    w.send(report(4)).await.unwrap();
    for want in [3, 4] {
        let Body::Ack(a) = next(&mut r).await else {
            panic!("expected Ack");
        };
        assert_eq!(a.first, want);
    }
    assert_eq!(
        ctl.core.metrics.reports.get(),
        4,
        "reports 1..=4, each once"
    );
    assert_eq!(ctl.core.metrics.duplicates.get(), 2);
    let st = ctl.core.store.seq_state("gs-001").unwrap();
    assert_eq!(st.acked_through, 4);
    assert!(ctl.core.sites.get("gs-001").unwrap().connected);

    // A second connection of the same site supersedes the first.
    let newer = connect(&s, ctl.quic_addr).await.unwrap();
    let (_w2, mut r2) = hello(&newer, &s.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r2).await, Body::Welcome(_)));
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::SHUTDOWN));
    assert!(reason.contains("superseded"), "{reason}");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_peer_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(config(dir.path())).await.unwrap();
    let a = site(&ctl.core, "gs-001");
    site(&ctl.core, "gs-002");

    // A site that claims to be another.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let _s = hello(&conn, "gs-002", tiandi_proto::MAJOR).await;
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::IDENTITY));
    assert!(
        reason.contains("gs-001") && reason.contains("gs-002"),
        "{reason}"
    );

    // A major version the controller does not speak.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let _s = hello(&conn, &a.id, tiandi_proto::MAJOR + 1).await;
    let (code, _) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::VERSION));

    // A report with no sequence number.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let (mut w, mut r) = hello(&conn, &a.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    w.send(report(0)).await.unwrap();
    let (code, reason) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("sequence"), "{reason}");
    assert!(ctl.core.metrics.protocol_errors.get() >= 2);

    // A revoked site does not get past the handshake, and its live connection is closed.
    let conn = connect(&a, ctl.quic_addr).await.unwrap();
    let (_w, mut r) = hello(&conn, &a.id, tiandi_proto::MAJOR).await;
    assert!(matches!(next(&mut r).await, Body::Welcome(_)));
    ctl.core.registry.revoke("gs-001").unwrap();
    // The session watches the registry and may close the connection itself first.
    let _ = ctl.core.disconnect("gs-001", codes::REVOKED, "revoked");
    let (code, _) = closed_with(&conn).await;
    assert_eq!(code, u64::from(codes::REVOKED));
    // rustls may finish the client side before the server's verdict arrives: then the
    // connection fails right after, with the same reason.
    let refused = match connect(&a, ctl.quic_addr).await {
        Err(e) => e,
        Ok(c) => tokio::time::timeout(Duration::from_secs(10), c.closed())
            .await
            .expect("closed within 10 s")
            .to_string(),
    };
    assert!(refused.contains("Revoked"), "{refused}");
    ctl.shutdown().await;
}
