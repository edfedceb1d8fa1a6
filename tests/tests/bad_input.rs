//! Bad input gets a clear error and the controller goes on serving every other site:
//! malformed and oversized frames, a wrong protocol version, messages out of order, a connection
//! without a certificate, and broken configuration files.

use std::process::Command;
use std::time::Duration;

use tiandi_controller::{Config, Controller};
use tiandi_link::LinkProfile;
use tiandi_proto::{Body, Hello, Report, codes};
use tiandi_tests::bin;
use tiandi_uplink as uplink;
use tiandi_uplink::spool::Spool;

struct Site {
    key: String,
    cert: String,
}

fn issue(ctl: &Controller, site: &str) -> Site {
    let (key, csr) = tiandi_link::pki::site_key_and_csr(site).unwrap();
    let issued = ctl.core.issue_direct(site, "HI", &csr).unwrap();
    Site {
        key,
        cert: issued.cert_pem,
    }
}

async fn connect(ctl: &Controller, site: Option<&Site>) -> quinn::Connection {
    let tls = match site {
        Some(s) => {
            tiandi_link::tls::site_client_tls(ctl.core.ca.cert_pem(), &s.cert, &s.key).unwrap()
        }
        None => {
            // No client certificate, but the site ALPN.
            let mut roots = rustls_roots(ctl);
            roots.alpn_protocols = vec![tiandi_link::tls::ALPN_SITE.to_vec()];
            roots
        }
    };
    let client = tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport()).unwrap();
    let ep = tiandi_link::client_endpoint(ctl.quic_addr).unwrap();
    ep.connect_with(client, ctl.quic_addr, "tiandi-controller")
        .unwrap()
        .await
        .unwrap()
}

fn rustls_roots(ctl: &Controller) -> quinn::rustls::ClientConfig {
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(ctl.core.ca.cert_der().clone()).unwrap();
    quinn::rustls::ClientConfig::builder_with_provider(tiandi_link::tls::provider())
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Sends `bytes` on a fresh report stream and returns the application close (code, reason).
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> (u64, String) {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    closed(conn).await
}

async fn closed(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            u64::from(c.error_code),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => panic!("the controller did not close the connection"),
    }
}

fn frame(body: Body) -> Vec<u8> {
    let b = tiandi_proto::encode(body);
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&b);
    v
}

fn hello(site: &str, major: u32) -> Vec<u8> {
    frame(Body::Hello(Hello {
        site_id: site.into(),
        major,
        minor: 0,
        agent_version: "test".into(),
        interval_ms: 1000,
        epoch: 0,
        path: String::new(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_the_offending_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: tmp.path().join("ctl"),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        profile: LinkProfile::Terrestrial,
        ..Default::default()
    };
    let ctl = Controller::start(cfg).await.unwrap();

    // A well-behaved site reporting every 100 ms through the real uplink.
    let good = issue(&ctl, "good-site");
    let db = sled::Config::new().temporary(true).open().unwrap();
    let spool = Spool::open(db.open_tree("s").unwrap(), b"", 1 << 24, 100, false).unwrap();
    let shared = uplink::Shared::new(spool);
    let cancel = tokio_util::sync::CancellationToken::new();
    let tls =
        tiandi_link::tls::site_client_tls(ctl.core.ca.cert_pem(), &good.cert, &good.key).unwrap();
    tokio::spawn(uplink::run(
        tiandi_link::client_endpoint(ctl.quic_addr).unwrap(),
        uplink::UplinkConfig {
            controller: ctl.quic_addr.to_string(),
            standby: Vec::new(),
            site_id: "good-site".into(),
            client: tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport()).unwrap(),
            interval_ms: 100,
            connect_timeout: LinkProfile::Terrestrial.connect_timeout(),
            on_session: None,
        },
        shared.clone(),
        cancel.clone(),
    ));
    let pusher = {
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                shared
                    .push(Report {
                        taken_ms: tiandi_transfer::now_ms(),
                        ..Default::default()
                    })
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let stored = || ctl.core.metrics.reports.get();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = stored();
    assert!(before > 0, "the good site reports");

    let bad = issue(&ctl, "bad-site");

    // Garbage where a frame should be.
    let c = connect(&ctl, Some(&bad)).await;
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    let (code, reason) = send_raw(&c, &garbage).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("malformed"), "{reason}");

    // A frame that claims to be 256 MB.
    let c = connect(&ctl, Some(&bad)).await;
    let (code, reason) = send_raw(&c, &(256u32 << 20).to_be_bytes()).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("exceeds"), "{reason}");

    // A protocol version from the future.
    let c = connect(&ctl, Some(&bad)).await;
    let (code, reason) = send_raw(&c, &hello("bad-site", 9)).await;
    assert_eq!(code, u64::from(codes::VERSION));
    assert!(reason.contains("9.0 is not supported"), "{reason}");

    // A report before Hello.
    let c = connect(&ctl, Some(&bad)).await;
    let (code, reason) = send_raw(&c, &frame(Body::Report(Report::default()))).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("expected Hello"), "{reason}");

    // A Hello, then a report with a name reference the connection never defined.
    let c = connect(&ctl, Some(&bad)).await;
    let mut bytes = hello("bad-site", 1);
    let mut r = Report {
        seq: 1,
        ..Default::default()
    };
    r.devices.push(tiandi_proto::Device {
        name_ref: 42,
        ..Default::default()
    });
    bytes.extend(frame(Body::Report(r)));
    let (code, reason) = send_raw(&c, &bytes).await;
    assert_eq!(code, u64::from(codes::PROTOCOL));
    assert!(reason.contains("name reference 42"), "{reason}");

    // No client certificate at all.
    let c = connect(&ctl, None).await;
    let (code, reason) = closed(&c).await;
    assert_eq!(code, u64::from(codes::IDENTITY));
    assert!(reason.contains("certificate is required"), "{reason}");

    // Nothing was stored for the bad site; the good one never stopped.
    assert!(ctl.core.sites.get("bad-site").unwrap().latest.is_none());
    assert!(ctl.core.metrics.protocol_errors.get() >= 5);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        stored() >= before + 4,
        "the good site kept reporting ({before} -> {})",
        stored()
    );
    assert!(shared.connected.load(std::sync::atomic::Ordering::Relaxed));
    cancel.cancel();
    let _ = pusher.await;
    ctl.shutdown().await;
}

/// Runs `binary --config path ARGS`, which must fail; its stderr.
fn refused(binary: &str, config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(bin(binary))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{binary} accepted {}",
        config.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn broken_config_files_name_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("agent.toml");
    std::fs::write(&a, "controller = \"x:1\"\ninterval_s = \"often\"\n").unwrap();
    let err = refused("tiandi-agent", &a, &["run"]);
    assert!(
        err.contains(&a.display().to_string()) && err.contains("interval_s"),
        "{err}"
    );

    let c = tmp.path().join("controller.toml");
    std::fs::write(&c, "[admission]\nhandshakes_per_s = -3\n").unwrap();
    let err = refused("tiandi-controller", &c, &["run"]);
    assert!(
        err.contains(&c.display().to_string()) && err.contains("admission.handshakes_per_s"),
        "{err}"
    );

    std::fs::write(&c, "quic_listen = [\n").unwrap();
    let err = refused("tiandi-controller", &c, &["run"]);
    assert!(err.contains(&c.display().to_string()), "{err}");

    let missing = tmp.path().join("nope.toml");
    let err = refused("tiandi-agent", &missing, &[]);
    assert!(err.contains("nope.toml"), "{err}");
}
