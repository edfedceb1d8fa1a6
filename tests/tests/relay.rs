//! Hop by hop: the ministry's controller sends a file to a province whose relay site stores it
//! and forwards it to three county sites. Every site sits behind its own emulated satellite
//! link (the project's emulator, between network namespaces); every copy is verified; the
//! ministry's uplink carries the file once, not four times; the controller shows each county's
//! receipt as the relay reports it. Needs root and /dev/net/tun (CI runs as root).

use std::time::Duration;

use tiandi_satlink::{Shape, Spec, Topology};
use tiandi_tests::{AgentProc, ControllerProc, can_emulate_links, pattern, tx_bytes, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_province_transfer_crosses_the_ministry_uplink_once_and_reaches_every_county() {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    // 10 Mbit/s each way, 300 ms round trip per site link.
    let shape = Shape {
        rate_kbit: 10_000,
        delay_ms: 75.0,
        queue_bytes: 400_000,
        ..Shape::default()
    };
    let mut spec = Spec::uniform("tdrl", 4, shape);
    spec.net = [10, 202, 0];
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    let relay_addr = format!("{}:4434", topo.site_addr(1));
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        Some((&topo.ctl_ns(), topo.ctl_addr().into())),
        "[relays]\n\"GD\" = \"gd-relay\"\n",
    );

    let mut agents = Vec::new();
    let sites = ["gd-relay", "gd-001", "gd-002", "gd-003"];
    for (i, site) in sites.iter().enumerate() {
        let token = ctl.enroll(site, "GD", &[]);
        let extra = if i == 0 {
            format!("interval_s = 2\n[relay]\nlisten = \"{relay_addr}\"\n")
        } else {
            format!(
                "interval_s = 2\n[via_relay]\naddress = \"{relay_addr}\"\nsite = \"gd-relay\"\n"
            )
        };
        let mut a = AgentProc::enroll_in(
            Some(&topo.site_ns(i + 1)),
            &tmp.path().join(site),
            ctl.quic,
            &token,
            &extra,
        );
        a.start();
        agents.push(a);
    }
    wait_for("four sites connected", Duration::from_secs(60), || {
        (ctl.metric("tiandi_connections") >= 4.0).then_some(())
    });
    wait_for(
        "counties connected to the relay",
        Duration::from_secs(60),
        || (agents[0].log().matches("Site below connected").count() >= 3).then_some(()),
    );

    let src = tmp.path().join("ctl/policy.bin");
    let data = pattern(4_000_000, 3);
    std::fs::write(&src, &data).unwrap();
    let before = tx_bytes(&topo.ctl_ns(), "eth0");
    let out = ctl.cli(&["send", src.to_str().unwrap(), "--to", "province:GD"]);
    assert!(
        out.status.success(),
        "send: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("for 4 site(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    for site in sites {
        let dest = tmp.path().join(site).join("data/inbox/policy.bin");
        wait_for(
            &format!("the file at {site}"),
            Duration::from_secs(180),
            || dest.exists().then_some(()),
        );
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            data,
            "{site} got a different file"
        );
    }
    // The controller learns each county's receipt from the relay.
    let jobs = wait_for(
        "every receipt at the controller",
        Duration::from_secs(60),
        || {
            let v = ctl.api("/api/transfers")?;
            let t = v["transfers"].as_array()?.clone();
            (t.len() == 4 && t.iter().all(|j| j["state"] == "delivered")).then_some(t)
        },
    );
    for j in &jobs {
        assert_eq!(j["receipt"]["node"], j["dest"], "{j}");
        assert_eq!(j["receipt"]["size"].as_u64(), Some(data.len() as u64));
        if j["dest"] == "gd-relay" {
            assert_eq!(j["relays_to"].as_array().map(|a| a.len()), Some(3), "{j}");
        } else {
            assert_eq!(j["via"], "gd-relay", "{j}");
        }
    }
    let table = String::from_utf8_lossy(&ctl.cli(&["transfers"]).stdout).to_string();
    assert!(
        table.contains("via gd-relay") && table.contains("relays to 3 site(s)"),
        "{table}"
    );

    // The ministry's uplink carried the file once (plus QUIC and report overhead), where
    // sending to each site would have carried it four times.
    let sent = tx_bytes(&topo.ctl_ns(), "eth0") - before;
    let ratio = sent as f64 / data.len() as f64;
    // The relay's own link carried three copies up toward the counties.
    let relay_up = topo.link(1).status().up_counters.bytes_in;
    println!(
        "relay: file_bytes={} ministry_sent_bytes={sent} ministry_copies={ratio:.2} relay_link_up_bytes={relay_up}",
        data.len()
    );
    assert!(ratio < 1.6, "the ministry sent {ratio:.2} × the file");
    assert!(
        relay_up as f64 > 3.0 * data.len() as f64,
        "the relay's link carried {relay_up} bytes toward the counties"
    );
    drop(agents);
    drop(ctl);
    topo.down();
}
