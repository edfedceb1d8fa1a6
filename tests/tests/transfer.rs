//! Store-and-forward transfers through the real binaries: `tiandi-controller send` queues a
//! file for a province; each site's agent receives it on its own connection, checks it and
//! puts it in place; `transfers` shows the receipts. Bad requests get clear errors.

use std::time::Duration;

use tiandi_tests::{AgentProc, ControllerProc, pattern, wait_for};

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
    let mut other = ctl.new_site(&tmp.path().join("gx-001"), "gx-001", "GX", "interval_s = 1");
    other.start();
    wait_for("three sites connected", Duration::from_secs(30), || {
        (ctl.metric("tiandi_connections") >= 3.0).then_some(())
    });

    let src = tmp.path().join("policy-2026-11.bin");
    let data = pattern(3_000_000, 0);
    std::fs::write(&src, &data).unwrap();
    let said = send(
        &ctl,
        &[
            src.to_str().unwrap(),
            "--to",
            "province:HB",
            "--priority",
            "bulk",
        ],
    );
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
            "unknown priority \"urgent\": alarm, normal, bulk or backup",
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
    // A window that is closed now: queued, not sent, until it opens.
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60)
        % 1440;
    let (a, b) = ((now_min + 120) % 1440, (now_min + 180) % 1440);
    let window = format!("{:02}:{:02}-{:02}:{:02}", a / 60, a % 60, b / 60, b % 60);
    let later = tmp.path().join("night-batch.bin");
    std::fs::write(&later, pattern(100_000, 5)).unwrap();
    send(
        &ctl,
        &[
            later.to_str().unwrap(),
            "--to",
            "site:hb-001",
            "--window",
            &window,
        ],
    );
    std::thread::sleep(Duration::from_secs(4));
    let v = ctl.api("/api/transfers").unwrap();
    let j = v["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["file"] == "night-batch.bin")
        .unwrap()
        .clone();
    assert_eq!(j["state"], "queued", "{j}");
    assert_eq!(j["window"], window.as_str());
    assert!(
        !tmp.path()
            .join("hb-001/data/inbox/night-batch.bin")
            .exists()
    );

    let out = ctl.cli(&["send", "/nonexistent/file", "--to", "all"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file"));
    for (_, mut a) in agents {
        a.stop();
    }
    other.stop();
}

/// `tiandi-controller send ARGS…`, which must succeed; what it printed.
fn send(ctl: &ControllerProc, args: &[&str]) -> String {
    let out = ctl.cli(&[&["send"], args].concat());
    assert!(
        out.status.success(),
        "send {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The transfer's row in `/api/transfers`.
fn job(ctl: &ControllerProc, dest: &str) -> Option<serde_json::Value> {
    let v = ctl.api("/api/transfers")?;
    v["transfers"]
        .as_array()?
        .iter()
        .find(|t| t["dest"] == dest)
        .cloned()
}

#[test]
fn sigkill_of_the_receiver_and_of_the_sender_resumes_without_starting_over() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agent = ctl.new_site(&tmp.path().join("js-001"), "js-001", "JS", "interval_s = 1");
    agent.start();
    wait_for("site connected", Duration::from_secs(30), || {
        (ctl.metric("tiandi_connections") >= 1.0).then_some(())
    });
    let size = 24_000_000usize;
    let src = tmp.path().join("update.img");
    let data = pattern(size, 7);
    std::fs::write(&src, &data).unwrap();
    // 24 Mbit/s: the transfer takes ~8 s, time enough to kill both ends on the way.
    send(
        &ctl,
        &[
            src.to_str().unwrap(),
            "--to",
            "site:js-001",
            "--rate-limit",
            "24",
        ],
    );
    let acked = |ctl: &ControllerProc| {
        job(ctl, "js-001")
            .and_then(|j| j["acked_bytes"].as_u64())
            .unwrap_or(0)
    };

    wait_for("a quarter acknowledged", Duration::from_secs(60), || {
        (acked(&ctl) >= size as u64 / 4).then_some(())
    });
    agent.kill9();
    let dest = tmp.path().join("js-001/data/inbox/update.img");
    assert!(!dest.exists(), "no partial file at the destination");
    agent.start();
    wait_for("half acknowledged", Duration::from_secs(60), || {
        (acked(&ctl) >= size as u64 / 2).then_some(())
    });
    ctl.kill9_and_restart();
    wait_for("file in place", Duration::from_secs(90), || {
        dest.exists().then_some(())
    });
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let j = wait_for("delivered", Duration::from_secs(30), || {
        job(&ctl, "js-001").filter(|j| j["state"] == "delivered")
    });
    assert!(j["attempts"].as_u64().unwrap() >= 3, "{j}");
    // Resumed, not restarted: what was acknowledged before each kill was not sent again. The
    // sender's count of chunk bytes written survives its own SIGKILL only as far as its last
    // progress save (every second), so allow what two windows of a 24 Mbit/s link hold.
    let sent = j["sent_bytes"].as_u64().unwrap();
    assert!(
        sent < size as u64 * 13 / 10,
        "sent {sent} bytes for a {size}-byte file: {j}"
    );
    ctl.stop();
    agent.stop();
}

#[test]
fn a_full_disk_pauses_the_transfer_until_space_is_freed() {
    if !nix_is_root() {
        panic!("this test needs root (CI runs it as root): it mounts a small tmpfs");
    }
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agent = ctl.new_site(&tmp.path().join("ah-001"), "ah-001", "AH", "interval_s = 1");
    // The site's inbox is a 16 MB file system, 10 MB of it taken.
    let inbox = tmp.path().join("ah-001/data/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&inbox)
        .status()
        .unwrap();
    assert!(mount.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(inbox.clone());
    let filler = inbox.join("old-backup.tar");
    std::fs::write(&filler, vec![1u8; 10 << 20]).unwrap();
    agent.start();
    wait_for("site connected", Duration::from_secs(30), || {
        (ctl.metric("tiandi_connections") >= 1.0).then_some(())
    });
    let src = tmp.path().join("census.db");
    let data = pattern(8 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    send(&ctl, &[src.to_str().unwrap(), "--to", "site:ah-001"]);
    let j = wait_for("paused on a full disk", Duration::from_secs(30), || {
        job(&ctl, "ah-001").filter(|j| j["state"] == "paused")
    });
    assert!(
        j["error"].as_str().unwrap().contains("disk full on ah-001"),
        "{j}"
    );
    assert!(!inbox.join("census.db").exists());
    // The NOC sees it as an alarm on the site.
    let active = |ctl: &ControllerProc| {
        ctl.api("/api/alarms?site=ah-001").map(|v| {
            v["active"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["alarm"] == "transfer-paused")
        })
    };
    wait_for("transfer-paused alarm", Duration::from_secs(30), || {
        active(&ctl).filter(|a| *a).map(|_| ())
    });
    // The site's technician frees space: the transfer resumes on its own.
    std::fs::remove_file(&filler).unwrap();
    let dest = inbox.join("census.db");
    wait_for("file in place", Duration::from_secs(60), || {
        dest.exists().then_some(())
    });
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    wait_for("delivered", Duration::from_secs(30), || {
        job(&ctl, "ah-001").filter(|j| j["state"] == "delivered")
    });
    wait_for("alarm cleared", Duration::from_secs(30), || {
        active(&ctl).filter(|a| !*a).map(|_| ())
    });
    let log = ctl.api("/api/alarms?site=ah-001").unwrap();
    let states: Vec<&str> = log["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["alarm"] == "transfer-paused")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["raised", "cleared"],
        "raised once, cleared once: {log}"
    );
    agent.stop();
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn a_site_sends_a_file_to_the_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let mut agent = ctl.new_site(&tmp.path().join("sc-001"), "sc-001", "SC", "interval_s = 1");
    agent.start();
    let src = tmp.path().join("sc-001/survey-2026.csv");
    let data = pattern(2_500_000, 11);
    std::fs::write(&src, &data).unwrap();
    // The agent takes the request, sends, and the controller verifies; --wait reports it.
    let out = agent.cli(&[
        "send",
        src.to_str().unwrap(),
        "--priority",
        "bulk",
        "--wait",
        "90",
    ]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}\n--- agent log ---\n{}\n--- controller log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&agent.log(), 60),
        ctl.log()
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("tiandi_") && l.contains(" at "))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        said.contains("delivered: verified at controller\n"),
        "{said}"
    );
    // Files from a site land under its own name at the controller: sites cannot overwrite
    // each other's files whatever they call them.
    let landed = ctl.dir.join("data/inbox/sc-001/survey-2026.csv");
    assert_eq!(std::fs::read(&landed).unwrap(), data);
    let v = ctl.api("/api/transfers").unwrap();
    let got = v["received"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == "survey-2026.csv")
        .cloned()
        .unwrap();
    assert_eq!(got["from"], "sc-001");
    assert_eq!(got["receipt"]["size"].as_u64(), Some(data.len() as u64));
    let table = String::from_utf8_lossy(&agent.cli(&["transfers"]).stdout).to_string();
    assert!(
        table.contains("survey-2026.csv") && table.contains("delivered"),
        "{table}"
    );

    // Clear errors, nothing queued.
    for (args, expect) in [
        (vec!["send", "/nonexistent/file"], "/nonexistent/file"),
        (
            vec!["send", src.to_str().unwrap(), "--priority", "urgent"],
            "unknown priority \"urgent\": alarm, normal, bulk or backup",
        ),
        (
            vec!["send", src.to_str().unwrap(), "--window", "9-5"],
            "not HH:MM",
        ),
    ] {
        let out = agent.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

/// The last `n` lines of a log.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("Report spooled"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
