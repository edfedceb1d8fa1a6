//! Transfers through the real binaries over emulated satellite links (the project's emulator,
//! between network namespaces). Needs root and /dev/net/tun (CI runs as root).
//!
//! - Hop by hop: the ministry's controller sends a file to a province whose relay site stores
//!   it and forwards it to three county sites, each behind its own link; every copy is
//!   verified; the ministry's uplink carries the file once, not four times; the controller
//!   shows each county's receipt as the relay reports it; a county revoked at the controller is
//!   refused by the relay.
//! - A 60 s cut in the middle of a transfer over a link that loses and corrupts frames: no
//!   partial file is ever visible, the transfer resumes where it stopped, the file verifies.

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
        // The relay's committed rate: traffic to it is paced instead of overshooting the
        // link's queue (Cubic's slow start would add its retransmissions to the count).
        "[relays]\n\"GD\" = \"gd_relay.44\"\n[link_rates]\n\"gd_relay.44\" = 10.0\n",
    );

    let mut agents = Vec::new();
    let sites = ["gd_relay.44", "gd-001", "gd-002", "gd-003"];
    for (i, site) in sites.iter().enumerate() {
        let token = ctl.enroll(site, "GD", &[]);
        let extra = if i == 0 {
            format!("interval_s = 2\n[relay]\nlisten = \"{relay_addr}\"\n")
        } else {
            format!(
                "interval_s = 2\n[via_relay]\naddress = \"{relay_addr}\"\nsite = \"gd_relay.44\"\n"
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
        if j["dest"] == "gd_relay.44" {
            assert_eq!(j["relays_to"].as_array().map(|a| a.len()), Some(3), "{j}");
        } else {
            assert_eq!(j["via"], "gd_relay.44", "{j}");
        }
    }
    let table = String::from_utf8_lossy(&ctl.cli(&["transfers"]).stdout).to_string();
    assert!(
        table.contains("via gd_relay.44") && table.contains("relays to 3 site(s)"),
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
    assert!(ratio < 1.3, "the ministry sent {ratio:.2} × the file");
    assert!(
        relay_up as f64 > 3.0 * data.len() as f64,
        "the relay's link carried {relay_up} bytes toward the counties"
    );

    // The same file sent to the province again (a rollout staged twice): a new request, so
    // every site's new job ends delivered, the relay re-offering its copy to the counties
    // that still hold it; and the uplink carries no second copy.
    let before = tx_bytes(&topo.ctl_ns(), "eth0");
    let out = ctl.cli(&["send", src.to_str().unwrap(), "--to", "province:GD"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "every receipt of the second send",
        Duration::from_secs(60),
        || {
            let v = ctl.api("/api/transfers")?;
            let t = v["transfers"].as_array()?.clone();
            (t.len() == 8 && t.iter().all(|j| j["state"] == "delivered")).then_some(())
        },
    );
    let again = tx_bytes(&topo.ctl_ns(), "eth0") - before;
    println!("relay: the same file again: ministry_sent_bytes={again}");
    assert!(
        (again as f64) < 0.1 * data.len() as f64,
        "sending a file the province holds again cost the uplink {again} bytes"
    );

    // A county revoked at the controller is refused by the relay too (the relay asks).
    let out = ctl.cli(&["revoke", "--site", "gd-003"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agents[3].kill9();
    agents[3].start();
    wait_for(
        "the relay refusing the revoked county",
        Duration::from_secs(60),
        || {
            agents[0]
                .log()
                .contains("Refused a site below: its certificate is revoked")
                .then_some(())
        },
    );
    assert!(
        agents[0].log().matches("Site below connected").count() == 3,
        "the revoked county got through:\n{}",
        agents[0].log()
    );
    drop(agents);
    drop(ctl);
    topo.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_s_cut_on_a_lossy_corrupting_link_resumes_and_ends_verified() {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let shape = Shape {
        rate_kbit: 8_000,
        delay_ms: 100.0,
        loss_pct: 0.5,
        corrupt_pct: 0.5,
        queue_bytes: 300_000,
        ..Shape::default()
    };
    let mut spec = Spec::uniform("tdct", 1, shape);
    spec.net = [10, 203, 0];
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    // A committed rate: the transfer paces at it and does not back off on random loss.
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        Some((&topo.ctl_ns(), topo.ctl_addr().into())),
        "[link_rates]\n\"gx-001\" = 8.0\n",
    );
    let token = ctl.enroll("gx-001", "GX", &[]);
    let mut agent = AgentProc::enroll_in(
        Some(&topo.site_ns(1)),
        &tmp.path().join("gx-001"),
        ctl.quic,
        &token,
        "interval_s = 2",
    );
    agent.start();
    wait_for("the site connected", Duration::from_secs(60), || {
        (ctl.metric("tiandi_connections") >= 1.0).then_some(())
    });

    let size = 12_000_000usize;
    let src = tmp.path().join("ctl/dataset.bin");
    let data = pattern(size, 9);
    std::fs::write(&src, &data).unwrap();
    let out = ctl.cli(&["send", src.to_str().unwrap(), "--to", "site:gx-001"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = |ctl: &ControllerProc| -> Option<serde_json::Value> {
        ctl.api("/api/transfers")?["transfers"]
            .as_array()?
            .first()
            .cloned()
    };
    // Cut once a quarter is acknowledged.
    let acked_at_cut = wait_for("a quarter acknowledged", Duration::from_secs(120), || {
        let a = job(&ctl)?["acked_bytes"].as_u64()?;
        (a >= size as u64 / 4).then_some(a)
    });
    topo.link(1).cut();
    let inbox = tmp.path().join("gx-001/data/inbox");
    let dest = inbox.join("dataset.bin");
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !dest.exists(),
            "a partial file appeared at its destination name"
        );
    }
    topo.link(1).restore();
    let done = wait_for("delivered after the cut", Duration::from_secs(240), || {
        let j = job(&ctl)?;
        (j["state"] == "delivered").then_some(j)
    });
    assert_eq!(std::fs::read(&dest).unwrap(), data, "the file differs");
    let st = topo.link(1).status();
    let sent = done["sent_bytes"].as_u64().unwrap();
    println!(
        "cut: size={size} acked_at_cut={acked_at_cut} chunk_bytes_sent={sent} attempts={} corrupted_frames={} lost_frames={} cut_drops={}",
        done["attempts"],
        st.down_counters.corrupted + st.up_counters.corrupted,
        st.down_counters.lost + st.up_counters.lost,
        st.down_counters.cut_drops + st.up_counters.cut_drops
    );
    assert!(
        st.down_counters.corrupted > 0 && st.down_counters.cut_drops > 0,
        "{st:?}"
    );
    assert!(done["attempts"].as_u64().unwrap() >= 2, "{done}");
    // Acknowledged chunks were not sent again: what crossed the link toward the site beyond
    // the file is QUIC's framing, what the link lost or corrupted, and what was in the air at
    // the cut — not the quarter already acknowledged. (Chunk bytes handed to QUIC count more:
    // the send buffers the cut threw away.)
    let wire = st.down_counters.bytes_in as f64 / size as f64;
    println!("cut: link_bytes_toward_site_per_file_byte={wire:.3}");
    assert!(wire < 1.15, "{wire:.3} link bytes per file byte");
    // Nothing but the file is left in the inbox (no part file).
    let left: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, vec!["dataset.bin".to_string()]);
    drop(agent);
    drop(ctl);
    topo.down();
}

#[test]
fn the_lab_script_brings_up_a_controller_and_sites_behind_emulated_links() {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let bins = tiandi_tests::bin("tiandi-satlink")
        .parent()
        .unwrap()
        .to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab.sh");
    let out = std::process::Command::new(script)
        .args(["--sites", "3", "--relay", "--delay-ms", "100", "--check"])
        .args(["--prefix", "tdlab", "--dir"])
        .arg(tmp.path())
        .env("TIANDI_BIN", &bins)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("lab sites=3 connected=3"), "{said}");
    // It cleaned up after itself.
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ns.stdout).contains("tdlab-"));
}
