//! Store-and-forward transfers through the real binaries: `tiandi-controller send` queues a
//! file for a province; each site's agent receives it on its own connection, checks it and
//! puts it in place; `transfers` shows the receipts. Bad requests get clear errors.

use std::time::Duration;

use tiandi_tests::{AgentProc, ControllerProc, wait_for};

#[test]
fn a_file_sent_to_a_province_arrives_verified_at_each_site() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agents = Vec::new();
    for site in ["hb-001", "hb-002"] {
        let token = ctl.enroll(site, "HB", &[]);
        let mut a = AgentProc::enroll(&tmp.path().join(site), ctl.quic, &token, "interval_s = 1");
        a.start();
        agents.push((site, a));
    }
    // A site in another province must not get it.
    let token = ctl.enroll("gx-001", "GX", &[]);
    let mut other = AgentProc::enroll(
        &tmp.path().join("gx-001"),
        ctl.quic,
        &token,
        "interval_s = 1",
    );
    other.start();
    wait_for("three sites connected", Duration::from_secs(30), || {
        (ctl.metric("tiandi_connections") >= 3.0).then_some(())
    });

    let src = tmp.path().join("policy-2026-11.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let out = ctl.cli(&[
        "send",
        src.to_str().unwrap(),
        "--to",
        "province:HB",
        "--priority",
        "bulk",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("for 2 site(s)"), "{said}");

    for (site, _) in &agents {
        let dest = tmp.path().join(site).join("data/inbox/policy-2026-11.bin");
        wait_for(&format!("file at {site}"), Duration::from_secs(60), || {
            dest.exists().then_some(())
        });
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            data,
            "{site} got a different file"
        );
    }
    assert!(
        !tmp.path()
            .join("gx-001/data/inbox/policy-2026-11.bin")
            .exists()
    );
    let status = wait_for("receipts", Duration::from_secs(30), || {
        let v = ctl.api("/api/transfers")?;
        let t = v["transfers"].as_array()?.clone();
        (t.len() == 2 && t.iter().all(|j| j["state"] == "delivered")).then_some(t)
    });
    for t in &status {
        assert_eq!(t["receipt"]["size"].as_u64(), Some(data.len() as u64));
        assert_eq!(t["receipt"]["node"], t["dest"]);
        assert_eq!(t["priority"], "bulk");
    }
    let table = ctl.cli(&["transfers"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("delivered") && table.contains("verified at hb-001"),
        "{table}"
    );

    // Clear errors: unknown destination, a missing file, a bad window, a bad priority.
    for (args, expect) in [
        (vec!["--to", "site:nowhere"], "unknown destination"),
        (
            vec!["--to", "province:HB", "--window", "25:00-01:00"],
            "not a time of day",
        ),
        (
            vec!["--to", "province:HB", "--priority", "urgent"],
            "expected alarm, normal or bulk",
        ),
        (
            vec!["--to", "planet:mars"],
            "expected site:ID, province:CODE or all",
        ),
    ] {
        let mut all = vec!["send", src.to_str().unwrap()];
        all.extend(args);
        let out = ctl.cli(&all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{all:?}: {err}");
    }
    let out = ctl.cli(&["send", "/nonexistent/file", "--to", "all"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file"));
    for (_, mut a) in agents {
        a.stop();
    }
    other.stop();
}
