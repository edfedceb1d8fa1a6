//! Disaster recovery of the controller itself (issue 17): a standby follows the primary over
//! QUIC, the primary is killed mid-ingest, the standby is promoted, the agents (which carry
//! both addresses) come over without re-enrolling, nothing acknowledged is duplicated and only
//! what had not reached the standby is lost (its replication lag, measured, is the RPO); the
//! old primary, back, refuses to serve.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tiandi_tests::{ControllerProc, bin, wait_for};

const SITES: [&str; 3] = ["bj-001", "sh-001", "gd-001"];

#[test]
fn a_standby_follows_is_promoted_when_the_primary_dies_and_the_old_primary_stands_down() {
    let t = tempfile::tempdir().unwrap();
    // The primary also exports its state for its own backup (the first export at start).
    let mut primary = ControllerProc::start_with(
        &t.path().join("primary"),
        None,
        "[replica]\nexport_every_minutes = 60\n",
    );
    let token = primary.enroll("dr-standby", "BJ", &["--role", "standby"]);
    let standby =
        ControllerProc::start_standby(&t.path().join("standby"), primary.quic, &token, "");

    // Sites report every half second to the primary, the standby listed as their other address.
    let mut agents: Vec<_> = SITES
        .iter()
        .map(|s| {
            let mut a = primary.new_site(
                &t.path().join(s),
                s,
                &s[..2].to_uppercase(),
                &format!(
                    "interval_s = 0.5\nstandby_controllers = [\"{}\"]\n",
                    standby.quic
                ),
            );
            a.start();
            a
        })
        .collect();
    let exported = primary
        .data_dir()
        .join("state-export/controller-state.tdstate");
    wait_for(
        "the primary's periodic export",
        Duration::from_secs(30),
        || exported.exists().then_some(()),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the export holds the CA key");
    }
    // State other than reports: an operator account made at the primary.
    let out = primary.cli(&["user", "add", "duty-officer", "--role", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The standby has a complete copy and keeps up.
    let h = wait_for(
        "the standby's complete copy",
        Duration::from_secs(60),
        || {
            let h = standby.ops_json("/health")?;
            (h["complete"] == true && h["applied"].as_u64()? > 50).then_some(h)
        },
    );
    eprintln!("standby: {h}");
    let p = wait_for(
        "the primary sees its standby",
        Duration::from_secs(30),
        || {
            let r = primary.ops_json("/health/replica")?;
            (r["standbys"].as_array()?.len() == 1).then_some(r)
        },
    );
    assert_eq!(p["role"], "primary");
    assert_eq!(p["epoch"], 1);
    assert_eq!(p["standbys"][0]["name"], "dr-standby");
    assert!(
        primary
            .metrics()
            .contains("tiandi_replica_lag_seconds{standby=\"dr-standby\"}")
    );
    // Ingest goes on for a while.
    std::thread::sleep(Duration::from_secs(4));
    let lag_before = primary.ops_json("/health/replica").unwrap()["standbys"][0]["lag_ms"]
        .as_i64()
        .unwrap();

    // The primary dies mid-ingest (SIGKILL).
    let killed_ms = tiandi_link::clock::now_ms();
    primary.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let h = standby.ops_json("/health").unwrap();
    let rpo_ms = (killed_ms - h["last_applied_at_ms"].as_i64().unwrap()).max(0);
    eprintln!(
        "at the kill: standby applied {} (lag before {lag_before} ms; RPO {rpo_ms} ms)",
        h["applied"]
    );

    // Promotion: the same process serves as the controller, at epoch 2.
    let promoted_at = Instant::now();
    let out = standby.cli(&["promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "every site reports to the promoted standby",
        Duration::from_secs(120),
        || {
            let sites = standby.api("/api/sites")?;
            let sites = sites["sites"].as_array()?;
            SITES
                .iter()
                .all(|s| {
                    sites
                        .iter()
                        .any(|x| x["site_id"] == *s && x["connected"] == true)
                })
                .then_some(())
        },
    );
    let failover = promoted_at.elapsed();
    let r = standby.ops_json("/health/replica").unwrap();
    assert_eq!(r["epoch"], 2, "{r}");
    assert_eq!(r["role"], "primary");
    // Replicated state: the registry (the sites came back without re-enrolling), the account.
    let out = standby.cli(&["user", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("duty-officer"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_secs(3));

    // Nothing twice; lost only what had not reached the standby.
    let mut lost_total = 0;
    for s in SITES {
        let seqs = standby.history_seqs(s);
        let set: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            set.len(),
            seqs.len(),
            "{s}: a report stored twice: {seqs:?}"
        );
        let max = *set.iter().max().unwrap();
        let lost = (1..=max).filter(|q| !set.contains(q)).count();
        eprintln!("{s}: {} reports, up to {max}, {lost} lost", set.len());
        lost_total += lost;
        assert!(set.len() > 20, "{s}: {seqs:?}");
    }
    // At two reports a second per site, what the RPO window holds (and one commit more).
    let allowed = SITES.len() * ((rpo_ms as usize) / 500 + 2);
    eprintln!(
        "controller failover: rpo_ms={rpo_ms} lost_reports={lost_total} (at most {allowed}) duplicated=0 failover_s={:.1}",
        failover.as_secs_f64()
    );
    assert!(
        lost_total <= allowed,
        "lost {lost_total} > {allowed} in an RPO of {rpo_ms} ms"
    );

    // The old primary comes back knowing its peer: it refuses to serve.
    let original = std::fs::read_to_string(&primary.config).unwrap();
    let cfg = original.replace(
        "[replica]\n",
        &format!("[replica]\npeers = [\"{}\"]\n", standby.quic),
    );
    assert_ne!(cfg, original);
    std::fs::write(&primary.config, cfg).unwrap();
    let out = std::process::Command::new(bin("tiandi-controller"))
        .arg("--config")
        .arg(&primary.config)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the old primary must not serve: {err}"
    );
    assert!(err.contains("fencing epoch 2"), "{err}");

    // Without a standby: its state exported (offline here; a running controller exports every
    // `export_every_minutes`) and imported into an empty directory at the next epoch.
    let export = t.path().join("export");
    let out = primary.cli(&["state-export", "--out", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = t.path().join("fresh");
    let out = primary.cli(&[
        "--data-dir",
        fresh.to_str().unwrap(),
        "state-import",
        "--from",
        export.join("controller-state.tdstate").to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("fencing epoch 2"), "{said}");
    assert!(fresh.join("ca.key").exists() && fresh.join("admin.token").exists());

    // Without the peer in its config it starts, and the first site that has seen epoch 2 makes
    // it stand down; every site stays with the promoted controller.
    std::fs::write(&primary.config, original).unwrap();
    primary.start_again();
    // An agent restarted: it tries the old primary first (its `controller`), is refused.
    agents[0].stop();
    agents[0].start();
    wait_for(
        "the old primary stands down",
        Duration::from_secs(60),
        || {
            let r = primary.ops_json("/health/replica")?;
            (r["role"] == "stood-down").then_some(())
        },
    );
    wait_for(
        "the restarted site is back at the promoted controller",
        Duration::from_secs(90),
        || {
            let s = standby.api(&format!("/api/sites/{}", SITES[0]))?;
            (s["connected"] == true).then_some(())
        },
    );
    assert!(primary.metrics().contains("tiandi_controller_stood_down 1"));
    for a in &mut agents {
        a.stop();
    }
}
