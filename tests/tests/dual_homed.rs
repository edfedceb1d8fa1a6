//! A dual-homed site (issue 20, 天地复合): the real controller and agent, the site behind two
//! emulated links of its own — a ground line and a satellite link (`tiandi-satlink`'s second
//! link) — each reaching the controller at its own address. Needs root and /dev/net/tun (CI
//! runs as root).
//!
//! The ground line is cut while a bulk file is on its way: reports move to the satellite at
//! once and none is lost, the controller shows the switch and raises `path-redundancy-lost`
//! (not `site-down`), the bulk file waits off the satellite (its default policy); the line
//! comes back: after the hold the reports return, the alarm clears, and the file completes on
//! the ground line from where it stopped.

use std::time::Duration;

use tiandi_satlink::{Shape, Spec, Topology};
use tiandi_tests::{AgentProc, ControllerProc, can_emulate_links, pattern, wait_for};

const SITE: &str = "gd-dual";

fn uses(ctl: &ControllerProc, class: &str) -> Option<String> {
    let v = ctl.api(&format!("/api/sites/{SITE}"))?;
    v["paths"]["uses"][class].as_str().map(str::to_string)
}

fn path_state(ctl: &ControllerProc, path: &str) -> Option<String> {
    let v = ctl.api(&format!("/api/sites/{SITE}"))?;
    v["paths"]["paths"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == path)
        .and_then(|p| p["state"].as_str().map(str::to_string))
}

fn conditions(ctl: &ControllerProc) -> Vec<String> {
    ctl.api(&format!("/api/sites/{SITE}"))
        .and_then(|v| {
            v["conditions"].as_array().map(|c| {
                c.iter()
                    .filter_map(|c| c["condition"].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn bulk_job(ctl: &ControllerProc) -> Option<serde_json::Value> {
    let v = ctl.api("/api/transfers")?;
    v["transfers"]
        .as_array()?
        .iter()
        .find(|j| j["dest"] == SITE)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_homed_site_fails_over_to_the_sky_and_back_losing_nothing() {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let ground = Shape {
        rate_kbit: 10_000,
        delay_ms: 10.0,
        queue_bytes: 250_000,
        ..Shape::default()
    };
    // A satellite link, shorter than GEO to keep the test short.
    let sky = Shape {
        rate_kbit: 2_000,
        delay_ms: 150.0,
        loss_pct: 0.5,
        queue_bytes: 100_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: "tddual".into(),
        net: [10, 210, 0],
        sites: vec![(ground.clone(), ground)],
        seed: Some(20),
        second: vec![(sky.clone(), sky)],
        second_net: None,
    };
    let topo = Topology::up(&spec).expect("topology up");
    let (ctl1, ctl2) = (topo.ctl_addr(), topo.ctl_addr2().unwrap());
    let (site1, site2) = (topo.site_addr(1), topo.site_addr2(1).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    // Listening on both of its addresses.
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        Some((&topo.ctl_ns(), std::net::Ipv4Addr::UNSPECIFIED.into())),
        "",
    );
    let token = ctl.enroll(SITE, "GD", &[]);
    let quic1: std::net::SocketAddr = format!("{ctl1}:4433").parse().unwrap();
    let mut agent = AgentProc::enroll_in(
        Some(&topo.site_ns(1)),
        &tmp.path().join("site"),
        quic1,
        &token,
        &format!(
            "interval_s = 1\n\
             [[paths]]\nname = \"ground\"\nbind = \"{site1}\"\nprofile = \"terrestrial\"\n\
             [[paths]]\nname = \"sky\"\nbind = \"{site2}\"\nprofile = \"geo\"\ncontroller = \"{ctl2}:4433\"\n"
        ),
    );
    agent.start();
    wait_for("both paths up", Duration::from_secs(60), || {
        (path_state(&ctl, "ground").as_deref() == Some("up")
            && path_state(&ctl, "sky").as_deref() == Some("up"))
        .then_some(())
    });
    assert_eq!(uses(&ctl, "reports").as_deref(), Some("ground"));
    assert_eq!(uses(&ctl, "bulk").as_deref(), Some("ground"));
    assert_eq!(uses(&ctl, "conference").as_deref(), Some("ground"));
    let v = ctl.api(&format!("/api/sites/{SITE}")).unwrap();
    assert!(
        v["paths"]["paths"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["connected"] == true),
        "the controller holds a connection on each path: {}",
        v["paths"]
    );

    // A bulk file (about 10 s on the ground line), cut a few seconds in.
    let src = tmp.path().join("bulk.bin");
    let data = pattern(12_000_000, 20);
    std::fs::write(&src, &data).unwrap();
    let out = ctl.cli(&[
        "send",
        src.to_str().unwrap(),
        "--to",
        &format!("site:{SITE}"),
        "--priority",
        "bulk",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the file part-way", Duration::from_secs(60), || {
        bulk_job(&ctl)
            .filter(|j| j["acked_bytes"].as_u64().unwrap_or(0) > 2_000_000)
            .map(drop)
    });
    let seq_before = ctl.api(&format!("/api/sites/{SITE}")).unwrap()["latest_seq"]
        .as_u64()
        .unwrap();
    topo.link(1).cut();
    let cut_at = std::time::Instant::now();
    wait_for("reports over the sky", Duration::from_secs(20), || {
        (uses(&ctl, "reports").as_deref() == Some("sky")).then_some(())
    });
    let moved_in = cut_at.elapsed();
    assert!(
        moved_in < Duration::from_secs(5),
        "reports moved after {moved_in:?}"
    );
    wait_for("redundancy lost", Duration::from_secs(20), || {
        conditions(&ctl)
            .contains(&"path-redundancy-lost".to_string())
            .then_some(())
    });
    assert!(
        !conditions(&ctl).contains(&"site-down".to_string()),
        "a site down to one path is not down"
    );
    assert_eq!(uses(&ctl, "bulk"), None, "bulk stays off the satellite");
    let acked_at_cut = bulk_job(&ctl).unwrap()["acked_bytes"].as_u64().unwrap();
    // Reports keep coming over the sky; the file waits.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v = ctl.api(&format!("/api/sites/{SITE}")).unwrap();
    assert!(
        v["latest_seq"].as_u64().unwrap() >= seq_before + 4,
        "reports during the cut: {} then {}",
        seq_before,
        v["latest_seq"]
    );
    let job = bulk_job(&ctl).unwrap();
    assert_ne!(job["state"], "delivered");
    assert!(
        job["acked_bytes"].as_u64().unwrap() <= acked_at_cut + 1_000_000,
        "the bulk file moved on while the ground line was cut: {acked_at_cut} then {}",
        job["acked_bytes"]
    );
    let switches = v["paths"]["switches"].as_array().unwrap();
    assert!(
        switches.iter().any(|s| s["class"] == "reports"
            && s["from"] == "ground"
            && s["to"] == "sky"
            && s["reason"] == "path down"),
        "{switches:?}"
    );

    // The line comes back: the hold, then everything returns to it.
    topo.link(1).restore();
    let restored = std::time::Instant::now();
    wait_for(
        "reports back on the ground",
        Duration::from_secs(40),
        || (uses(&ctl, "reports").as_deref() == Some("ground")).then_some(()),
    );
    let back_in = restored.elapsed();
    assert!(
        back_in >= Duration::from_secs(8) && back_in < Duration::from_secs(25),
        "switched back after {back_in:?} (hold 10 s)"
    );
    wait_for("the alarm cleared", Duration::from_secs(20), || {
        (!conditions(&ctl).contains(&"path-redundancy-lost".to_string())).then_some(())
    });
    let dest = tmp.path().join("site/data/inbox/bulk.bin");
    wait_for("the file", Duration::from_secs(90), || {
        dest.exists().then_some(())
    });
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let job = wait_for("the receipt", Duration::from_secs(30), || {
        bulk_job(&ctl).filter(|j| j["state"] == "delivered")
    });
    let resent = job["sent_bytes"].as_u64().unwrap() - data.len() as u64;
    assert!(resent <= 1_000_000, "{resent} bytes written again");

    // Nothing lost: every report the agent numbered is stored.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = ctl.api(&format!("/api/sites/{SITE}")).unwrap();
    assert_eq!(
        v["latest_seq"].as_u64(),
        v["reports"].as_u64(),
        "every report stored once: {v}"
    );
    let m = ctl.metrics();
    let switched: f64 = m
        .lines()
        .filter(|l| l.starts_with("tiandi_path_switches_total{class=\"reports\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(switched >= 2.0, "{m}");
    assert!(agent.log().contains("Class switched path."));
}
