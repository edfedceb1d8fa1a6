//! Enrollment, token reuse and expiry, revocation, a site claiming another site's ID, and an
//! expired certificate: all over real QUIC with mutual TLS.

use std::process::Command;
use std::time::Duration;

use tiandi_tests::{AgentProc, ControllerProc, bin, wait_for};

fn agent_enroll(dir: &std::path::Path, ctl: &ControllerProc, token: &str) -> std::process::Output {
    Command::new(bin("tiandi-agent"))
        .args([
            "enroll",
            "--controller",
            &ctl.quic.to_string(),
            "--token",
            token,
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn enrollment_tokens_revocation_and_identity_claims() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));

    // Enrollment: the key is generated on the site and stays there.
    let token = ctl.enroll("gd-001", "GD", &[]);
    let mut a = AgentProc::enroll(&tmp.path().join("a"), ctl.quic, &token, "interval_s = 0.5");
    let key = std::fs::read_to_string(tmp.path().join("a/data/identity/site.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert!(
        !ctl.log().contains(key.lines().nth(1).unwrap()),
        "the site key must never reach the controller"
    );
    a.start();
    wait_for("gd-001 reporting", Duration::from_secs(30), || {
        let s = ctl.api("/api/sites/gd-001")?;
        (s["connected"] == true && s["latest_seq"].as_u64()? >= 2).then_some(())
    });
    let site = ctl.api("/api/sites/gd-001").unwrap();
    assert_eq!(site["province"], "GD");

    // A token works once.
    let out = agent_enroll(&tmp.path().join("again"), &ctl, &token);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown or already used enrollment token"),
        "{err}"
    );

    // An expired token is refused.
    let expired = ctl.enroll("gd-009", "GD", &["--ttl-hours", "0"]);
    std::thread::sleep(Duration::from_millis(1100));
    let out = agent_enroll(&tmp.path().join("late"), &ctl, &expired);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"));

    // A token that pins another CA: the agent refuses to talk to this controller.
    let bogus = format!("T1.{}.{}", "ab".repeat(16), "cd".repeat(32));
    let out = agent_enroll(&tmp.path().join("bogus"), &ctl, &bogus);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("issuer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A site that claims another site's ID: b's certificate is for gd-002, its messages say gd-001.
    let mut b = ctl.new_site(&tmp.path().join("b"), "gd-002", "GD", "interval_s = 0.5");
    let info = tmp.path().join("b/data/identity/site.json");
    std::fs::write(&info, r#"{"site_id":"gd-001","province":"GD"}"#).unwrap();
    let before = ctl.api("/api/sites/gd-001").unwrap()["reports"]
        .as_u64()
        .unwrap();
    b.start();
    wait_for(
        "the impostor to be refused",
        Duration::from_secs(30),
        || b.log().contains("claims to be gd-001").then_some(()),
    );
    assert!(b.log().contains("an operator must act"), "{}", b.log());
    let gd002 = ctl.api("/api/sites/gd-002").unwrap();
    assert!(
        gd002["latest_seq"].is_null(),
        "nothing may be stored for the impostor"
    );
    // gd-001's own agent keeps reporting; the impostor added nothing under its name.
    let after = ctl.api("/api/sites/gd-001").unwrap()["reports"]
        .as_u64()
        .unwrap();
    assert!(after >= before);
    b.stop();

    // Revocation: the live connection is closed and the certificate refused from then on.
    let out = ctl.cli(&["revoke", "--site", "gd-001"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("connection was closed"));
    wait_for("gd-001 disconnected", Duration::from_secs(10), || {
        (ctl.api("/api/sites/gd-001")?["connected"] == false).then_some(())
    });
    a.stop();
    a.start();
    wait_for(
        "the revoked certificate refused in the handshake",
        Duration::from_secs(30),
        || a.log().contains("certificate revoked").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ctl.api("/api/sites/gd-001").unwrap()["connected"], false);
}

/// An expired certificate fails the handshake (in-process controller, real sockets).
#[tokio::test]
async fn expired_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiandi_controller::Config {
        data_dir: tmp.path().to_path_buf(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        profile: tiandi_link::LinkProfile::Terrestrial,
        ..Default::default()
    };
    let ctl = tiandi_controller::Controller::start(cfg).await.unwrap();
    let (key, csr) = tiandi_link::pki::site_key_and_csr("x").unwrap();
    let issued = ctl
        .core
        .registry
        .issue("old-site", "XZ", &csr, &ctl.core.ca, Duration::from_secs(1))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let tls =
        tiandi_link::tls::site_client_tls(ctl.core.ca.cert_pem(), &issued.cert_pem, &key).unwrap();
    let client =
        tiandi_link::client_config(tls, tiandi_link::LinkProfile::Terrestrial.transport()).unwrap();
    let ep = tiandi_link::client_endpoint(ctl.quic_addr).unwrap();
    let err = match ep
        .connect_with(client, ctl.quic_addr, "tiandi-controller")
        .unwrap()
        .await
    {
        Err(e) => e,
        Ok(conn) => conn.closed().await,
    };
    let text = tiandi_link::LinkError::from(err).to_string();
    assert!(text.contains("certificate expired"), "{text}");
    ctl.shutdown().await;
}
