//! The refusals the controller made before the review, kept tried (issue 15, "Done when"):
//! certificates it must turn away in the QUIC handshake, garbage on its UDP port, oversized
//! HTTP. In-process controller, real sockets, certificates made here with rcgen as an
//! attacker holding a site's key (or a stolen copy of a certificate) would make them.

use std::net::UdpSocket;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tiandi_controller::{Config, Controller};
use tiandi_link::LinkProfile;

async fn controller(dir: &std::path::Path) -> Controller {
    Controller::start(Config {
        data_dir: dir.to_path_buf(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        ops_listen: "127.0.0.1:0".parse().unwrap(),
        profile: LinkProfile::Terrestrial,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A site certificate for `cn` as Tiandi's CA would write it, with `edit` applied.
fn site_params(cn: &str, edit: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::StateOrProvinceName, "GD");
    dn.push(DnType::OrganizationName, "Tiandi site");
    dn.push(DnType::OrganizationalUnitName, "tiandi-site");
    p.distinguished_name = dn;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time_now();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(30);
    edit(&mut p);
    p
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Connects to the controller with `chain_pem` (leaf first) and `key_pem`. Ok if the
/// connection is still up 3 s after the handshake (the controller waits 30 s for a Hello);
/// Err with the reason it was refused or closed.
async fn try_handshake(ctl: &Controller, chain_pem: &str, key_pem: &str) -> Result<(), String> {
    let tls = tiandi_link::tls::site_client_tls(ctl.core.ca.cert_pem(), chain_pem, key_pem)
        .map_err(|e| format!("client TLS: {e}"))?;
    let client = tiandi_link::client_config(tls, LinkProfile::Terrestrial.transport()).unwrap();
    let ep = tiandi_link::client_endpoint(ctl.quic_addr).unwrap();
    let conn = match ep
        .connect_with(client, ctl.quic_addr, tiandi_link::pki::CONTROLLER_NAME)
        .unwrap()
        .await
    {
        Ok(c) => c,
        Err(e) => return Err(tiandi_link::LinkError::from(e).to_string()),
    };
    // TLS 1.3: the client may finish before the server's verdict on its certificate arrives.
    match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
        Ok(e) => Err(tiandi_link::LinkError::from(e).to_string()),
        Err(_) => {
            conn.close(0u32.into(), b"done");
            Ok(())
        }
    }
}

/// A fresh key with a certificate from `params` signed by `issuer`, followed in the chain by
/// `then` (PEM, may be empty), offered to the controller: why it was refused.
async fn refused(
    ctl: &Controller,
    what: &str,
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    then: &str,
) -> String {
    let kp = KeyPair::generate().unwrap();
    let cert = params.signed_by(&kp, issuer).unwrap();
    let chain = format!("{}{then}", cert.pem());
    try_handshake(ctl, &chain, &kp.serialize_pem())
        .await
        .expect_err(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_with_forged_stale_or_unregistered_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca.key")).unwrap()).unwrap();
    let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();

    // The control: a site enrolled through the registry is let in.
    let (key, csr) = tiandi_link::pki::site_key_and_csr("gd-001").unwrap();
    let issued = ctl
        .core
        .registry
        .issue(
            "gd-001",
            "GD",
            &csr,
            &ctl.core.ca,
            Duration::from_secs(3600),
        )
        .unwrap();
    try_handshake(&ctl, &issued.cert_pem, &key)
        .await
        .expect("an enrolled site is let in");

    // A certificate from another CA, for a name the controller knows.
    let other = tiandi_link::Ca::generate("elsewhere").unwrap();
    let (k2, csr2) = tiandi_link::pki::site_key_and_csr("gd-001").unwrap();
    let foreign = other
        .sign_site(&csr2, "gd-001", "GD", Duration::from_secs(3600))
        .unwrap();
    let why = try_handshake(&ctl, &foreign.cert_pem, &k2)
        .await
        .expect_err("foreign CA");
    assert!(why.contains("unknown certificate authority"), "{why}");

    // Signed by the controller's CA (its key stolen or misused) but never registered.
    let p = site_params("gd-777", |_| {});
    let why = refused(&ctl, "unregistered site", p, &ca, "").await;
    assert!(why.contains("access denied"), "{why}");

    // Signed by the CA for a registered site, but not the serial the registry holds.
    let p = site_params("gd-001", |_| {});
    let why = refused(&ctl, "unregistered serial", p, &ca, "").await;
    assert!(why.contains("certificate revoked"), "{why}");

    // Not valid yet (a clock set back cannot make it usable early).
    let p = site_params("gd-001", |p| {
        p.not_before = time_now() + time::Duration::days(1);
        p.not_after = time_now() + time::Duration::days(30);
    });
    let why = refused(&ctl, "not yet valid", p, &ca, "").await;
    assert!(why.contains("certificate expired"), "{why}");

    // An end-entity certificate used as a CA: gd-001's own certificate signs one for gd-002
    // (sent with gd-001's as the intermediate).
    let site_key = KeyPair::from_pem(&key).unwrap();
    let as_ca = Issuer::from_ca_cert_pem(&issued.cert_pem, site_key).unwrap();
    let p = site_params("gd-002", |_| {});
    let why = refused(&ctl, "end entity as CA", p, &as_ca, &issued.cert_pem).await;
    assert!(
        why.contains("certificate") || why.contains("authority"),
        "{why}"
    );

    // A forged CA flag does not help either: a self-made CA named like the real one.
    let mut fake_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Tiandi site CA");
    fake_params.distinguished_name = dn;
    fake_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let fake_ca = Issuer::new(fake_params, KeyPair::generate().unwrap());
    let p = site_params("gd-001", |_| {});
    let why = refused(&ctl, "look-alike CA", p, &fake_ca, "").await;
    assert!(why.contains("unknown certificate authority"), "{why}");

    // After all that, the enrolled site is still let in.
    try_handshake(&ctl, &issued.cert_pem, &key)
        .await
        .expect("still let in");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_and_oversized_http_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let (key, csr) = tiandi_link::pki::site_key_and_csr("gd-001").unwrap();
    let issued = ctl
        .core
        .registry
        .issue(
            "gd-001",
            "GD",
            &csr,
            &ctl.core.ca,
            Duration::from_secs(3600),
        )
        .unwrap();

    // Garbage on the QUIC port: random bytes, a truncated long header, a huge datagram.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..2000 {
        let len = [1usize, 20, 1200, 1500, 9000][i % 5];
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut d = bytes;
        if i % 7 == 0 {
            d[0] = 0xc0; // a long header, then nonsense
        }
        let _ = s.send_to(&d, ctl.quic_addr);
    }
    try_handshake(&ctl, &issued.cert_pem, &key)
        .await
        .expect("the controller still lets an enrolled site in");

    // Oversized HTTP: a head over 64 KiB, a body over the limit; both refused, the API lives.
    let read = std::fs::read_to_string(dir.path().join("read.token")).unwrap();
    let api = format!("http://{}", ctl.api_addr);
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let (head, body, after) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let addr = api.trim_start_matches("http://").to_string();
        let send = |req: Vec<u8>| -> String {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.write_all(&req);
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
            String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string()
        };
        let mut big_head = format!("GET /api/sites HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n", read.trim()).into_bytes();
        big_head.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "a".repeat(300 * 1024)).as_bytes());
        let head = send(big_head);
        let body = vec![b'{'; 3 * 1024 * 1024];
        let mut big_body = format!(
            "POST /api/admin/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            admin.trim(),
            body.len()
        )
        .into_bytes();
        big_body.extend_from_slice(&body);
        let body = send(big_body);
        let after = send(
            format!(
                "GET /api/sites HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                read.trim()
            )
            .into_bytes(),
        );
        (head, body, after)
    })
    .await
    .unwrap();
    assert!(
        head.is_empty() || head.contains(" 431") || head.contains(" 400"),
        "a 300 KiB head: {head:?}"
    );
    assert!(
        body.contains(" 413") || body.contains(" 400"),
        "a 3 MiB body: {body:?}"
    );
    assert!(after.contains(" 200"), "the API still answers: {after:?}");
    ctl.shutdown().await;
}
