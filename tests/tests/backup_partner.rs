//! Mutual backup through the real binaries: a province's agent ships its local repository to
//! the controller (the ministry), and the controller ships its own to the province, both in the
//! `backup` transfer class over their QUIC connection. At each partner the copy is a complete
//! repository: `tiandi-backup check` verifies it without the key, and a restore from it with
//! the key gives back the files (the disaster-recovery case). A prune at the origin reaches the
//! partner as a deletion list whose files go to the partner's trash, not away.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tiandi_tests::{ControllerProc, secret_file, wait_for};

fn backup(repo: &Path, pw: Option<&Path>, args: &[&str]) -> Output {
    tiandi_tests::backup_cli(repo, pw, args)
}

fn json(o: &Output) -> Value {
    tiandi_tests::ok_json(o)
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(
                    e.path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Waits until the partner's copy holds every file of the origin repository and no other.
fn wait_in_sync(origin: &Path, copy: &Path, what: &str) {
    wait_for(what, Duration::from_secs(120), || {
        let want = files(origin);
        (files(copy) == want).then_some(())
    });
}

#[test]
fn a_province_and_the_ministry_back_each_other_up_over_their_connection() {
    let t = tempfile::tempdir().unwrap();
    let pw = t.path().join("pw");
    secret_file(&pw, "province and ministry share nothing but this test\n");
    let site_repo = t.path().join("gd-repo");
    let ctl_repo = t.path().join("ministry-repo");
    let mut ctl = ControllerProc::start_with(
        &t.path().join("ctl"),
        None,
        &format!(
            "[[backup_repos]]\nname = \"ministry-db\"\npath = {:?}\nto = \"gd-prov\"\n",
            ctl_repo
        ),
    );
    let mut site = ctl.new_site(
        &t.path().join("gd"),
        "gd-prov",
        "gd",
        &format!("[[backup_repos]]\nname = \"gd-db\"\npath = {site_repo:?}\n"),
    );
    site.start();

    // The province backs up its dumps into its local repository; the agent ships it.
    let src = t.path().join("province-db");
    std::fs::create_dir_all(src.join("dumps")).unwrap();
    std::fs::write(src.join("dumps/a.sql"), tiandi_tests::noise(24 << 20, 3)).unwrap();
    std::fs::write(src.join("dumps/b.sql"), tiandi_tests::noise(6 << 20, 4)).unwrap();
    std::fs::write(src.join("README"), "dumped nightly by the pre-hook\n").unwrap();
    json(&backup(&site_repo, Some(&pw), &["init", "--holder", "gd"]));
    let s1 = json(&backup(
        &site_repo,
        Some(&pw),
        &["backup", src.to_str().unwrap()],
    ));
    let at_ministry = ctl.data_dir().join("backups/gd-prov/gd-db");
    wait_in_sync(
        &site_repo,
        &at_ministry,
        "the province's repository at the ministry",
    );

    // The ministry's copy is a repository: verified without the key, restored with it.
    let c = json(&backup(&at_ministry, None, &["check"]));
    assert!(c["packs"]["damaged"].as_array().unwrap().is_empty(), "{c}");
    let out = t.path().join("restored-at-ministry");
    json(&backup(
        &at_ministry,
        Some(&pw),
        &[
            "restore",
            s1["snapshot"].as_str().unwrap(),
            "--target",
            out.to_str().unwrap(),
        ],
    ));
    for f in ["dumps/a.sql", "dumps/b.sql", "README"] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join("province-db").join(f)).unwrap(),
            "{f}"
        );
    }
    // They went in the backup class, each verified by the ministry's receipt.
    let status: Value = serde_json::from_slice(
        &std::fs::read(site.dir.join("data/backup-ship/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status[0]["repo"], "gd-db");
    assert!(
        status[0]["delivered_files"].as_u64().unwrap() >= 5,
        "{status}"
    );
    let jobs = site.cli(&["transfers", "--json"]);
    let jobs: Value = serde_json::from_slice(&jobs.stdout).unwrap_or(Value::Null);
    if let Some(jobs) = jobs.as_array() {
        assert!(
            jobs.iter().all(|j| j["priority"] == "backup"),
            "only backup transfers left this site: {jobs:?}"
        );
    }

    // The other way: the ministry's repository to the province.
    let ministry_src = t.path().join("ministry-data");
    std::fs::create_dir_all(&ministry_src).unwrap();
    std::fs::write(
        ministry_src.join("registry.dump"),
        tiandi_tests::noise(5 << 20, 9),
    )
    .unwrap();
    json(&backup(
        &ctl_repo,
        Some(&pw),
        &["init", "--holder", "ministry"],
    ));
    json(&backup(
        &ctl_repo,
        Some(&pw),
        &["backup", ministry_src.to_str().unwrap()],
    ));
    let at_province = site.dir.join("data/backups/controller/ministry-db");
    wait_in_sync(
        &ctl_repo,
        &at_province,
        "the ministry's repository at the province",
    );
    let c = json(&backup(&at_province, None, &["check"]));
    assert!(c["packs"]["damaged"].as_array().unwrap().is_empty(), "{c}");

    // A second backup, then forget and prune at the province: the deletions reach the
    // ministry, whose copy stays a valid repository and keeps the removed files in its trash.
    std::fs::remove_file(src.join("dumps/a.sql")).unwrap();
    std::fs::write(src.join("dumps/c.sql"), tiandi_tests::noise(4 << 20, 5)).unwrap();
    let s2 = json(&backup(
        &site_repo,
        Some(&pw),
        &["backup", src.to_str().unwrap()],
    ));
    json(&backup(
        &site_repo,
        Some(&pw),
        &["forget", "--keep-last", "1"],
    ));
    // Mark, then (grace 0) sweep.
    json(&backup(
        &site_repo,
        Some(&pw),
        &["prune", "--grace-hours", "0"],
    ));
    json(&backup(
        &site_repo,
        Some(&pw),
        &["prune", "--grace-hours", "0"],
    ));
    let before: Vec<String> = files(&at_ministry);
    wait_in_sync(&site_repo, &at_ministry, "the prune at the ministry");
    let removed: Vec<&String> = before
        .iter()
        .filter(|f| !files(&site_repo).contains(f))
        .collect();
    assert!(
        removed.iter().any(|f| f.starts_with("packs/")),
        "the prune removed packs: {removed:?}"
    );
    let trash: PathBuf = ctl.data_dir().join("backups/gd-prov/.trash/gd-db");
    let trashed = files(&trash);
    for f in &removed {
        assert!(
            trashed.iter().any(|t| t.ends_with(f.as_str())),
            "{f} is in the ministry's trash: {trashed:?}"
        );
    }
    let c = json(&backup(&at_ministry, None, &["check"]));
    assert!(c["packs"]["damaged"].as_array().unwrap().is_empty(), "{c}");
    let snaps = json(&backup(&at_ministry, Some(&pw), &["snapshots"]));
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["id"], s2["snapshot"]);
    let out2 = t.path().join("restored-2");
    json(&backup(
        &at_ministry,
        Some(&pw),
        &["restore", "latest", "--target", out2.to_str().unwrap()],
    ));
    assert_eq!(
        std::fs::read(src.join("dumps/c.sql")).unwrap(),
        std::fs::read(out2.join("province-db/dumps/c.sql")).unwrap()
    );
    site.stop();
    ctl.stop();
}

/// Jobs configured at the controller: pushed to the site, run there on their schedule (a
/// pre-hook that dumps, backup, forget, verify with the key, restore drill), shipped to the
/// controller, the results back; `tiandi-controller backups`, `GET /api/backups`, the metrics
/// and the site's alarms tell the NOC; a job whose pre-hook fails raises `backup-failed`.
#[test]
fn jobs_set_at_the_controller_run_at_the_site_and_report_back() {
    let t = tempfile::tempdir().unwrap();
    let pw = t.path().join("gd-pw");
    secret_file(&pw, "the province's passphrase, never sent\n");
    let src = t.path().join("province-db");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("records.db"), tiandi_tests::noise(3 << 20, 21)).unwrap();
    let dump = src.join("dump.sql");
    let jobs = format!(
        r#"
[[backup_jobs]]
name = "gd-db-nightly"
site = "gd-prov"
repo = "gd-db"
paths = [{src:?}]
password_file = {pw:?}
schedule = "every 1m"
keep_last = 3
rpo_hours = 1
verify = "every 1m"
verify_read_pct = 100
drill = "every 1m"
drill_sample_pct = 100
pre_hook = ["/bin/sh", "-c", "echo 'dumped by the pre-hook' > {dump}"]

[[backup_jobs]]
name = "gd-files"
site = "gd-prov"
repo = "gd-files"
paths = [{src:?}]
password_file = {pw:?}
schedule = "daily 02:00+08:00"
pre_hook = ["/bin/false"]
"#,
        dump = dump.display()
    );
    // `degraded` is what a failed job makes a site; a full disk or a busy CPU on the test
    // machine would show instead, so the host thresholds are out of reach here.
    let jobs = format!(
        "{jobs}\n[thresholds]\ncpu_degraded_pct = 101.0\nmem_degraded_pct = 101.0\ndisk_full_pct = 101.0\n"
    );
    let mut ctl = ControllerProc::start_with(&t.path().join("ctl"), None, &jobs);
    let mut site = ctl.new_site(&t.path().join("gd"), "gd-prov", "gd", "");
    site.start();

    // The job runs (the first run of a new job is due at once), verify and drill follow, and
    // the controller sees the snapshot at the partner.
    let status = wait_for(
        "the job's backup, verify and drill",
        Duration::from_secs(150),
        || {
            let a = ctl.api("/api/backups")?;
            let j = a["jobs"]
                .as_array()?
                .iter()
                .find(|j| j["job"] == "gd-db-nightly")?
                .clone();
            (j["at_partner"] == true
                && j["last_verify"]["ok"] == true
                && j["last_drill"]["ok"] == true)
                .then_some(j)
        },
    );
    assert_eq!(status["last_backup"]["ok"], true, "{status}");
    // The run held its repository by a lease at the controller (renewed, then given back).
    assert!(
        site.log().contains("held at the controller"),
        "{}",
        site.log()
    );
    // The ministry checks its copy without the key on the job's verify schedule.
    wait_for(
        "the partner's check of its copy",
        Duration::from_secs(90),
        || {
            let a = ctl.api("/api/backups")?;
            a["jobs"]
                .as_array()?
                .iter()
                .any(|j| j["job"] == "gd-db-nightly" && j["partner_check"]["ok"] == true)
                .then_some(())
        },
    );
    assert_eq!(status["overdue"], false, "{status}");
    assert_eq!(status["province"], "gd");
    assert!(status["bytes"].as_u64().unwrap() >= 3 << 20, "{status}");
    assert!(
        status["partner_bytes"].as_u64().unwrap() > 1 << 20,
        "{status}"
    );
    // The pre-hook's dump is in the snapshot at the ministry, restored with the key there.
    let copy = ctl.data_dir().join("backups/gd-prov/gd-db");
    let out = t.path().join("restored");
    json(&backup(
        &copy,
        Some(&pw),
        &["restore", "latest", "--target", out.to_str().unwrap()],
    ));
    assert_eq!(
        std::fs::read_to_string(out.join("province-db/dump.sql")).unwrap(),
        "dumped by the pre-hook\n"
    );

    // The failing job: its result came back in the alarm class and raised the alarm.
    let failed = wait_for("the failed job's result", Duration::from_secs(60), || {
        let a = ctl.api("/api/backups")?;
        let j = a["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["job"] == "gd-files")?
            .clone();
        (j["last_backup"]["ok"] == false).then_some(j)
    });
    assert!(
        failed["last_backup"]["error"]
            .as_str()
            .unwrap()
            .contains("pre-hook"),
        "{failed}"
    );
    let site_state = wait_for("backup-failed on the site", Duration::from_secs(60), || {
        let s = ctl.api("/api/sites/gd-prov")?;
        s["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["condition"] == "backup-failed")
            .then_some(s)
    });
    assert_eq!(site_state["status"], "degraded", "{site_state}");
    let metrics = ctl.metrics();
    assert!(
        metrics.contains(
            r#"tiandi_backup_last_run_ok{backup_job="gd-files",kind="backup",site="gd-prov"} 0"#
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("tiandi_backup"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Both CLIs show it.
    let o = ctl.cli(&["backups"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        table.contains("gd-db-nightly") && table.contains("gd-files") && table.contains("FAILED"),
        "{table}"
    );
    let o = site.cli(&["backups"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("gd-db-nightly") && table.contains("in sync"),
        "{table}"
    );
    site.stop();
    ctl.stop();
}

/// A rain fade (the site's modem, a real `snmpd`, reports Es/No below the threshold) holds the
/// backup class back: nothing of the repository reaches the controller while it lasts, while
/// reports go on; when the Es/No recovers the repository is shipped.
#[test]
fn backups_wait_out_a_rain_fade() {
    let t = tempfile::tempdir().unwrap();
    let snmpd = tiandi_tests::snmpd::Snmpd::start(&t.path().join("snmpd"));
    let modem = t.path().join("snmpd/modem.sh");
    let set_esno = |x10: u32| {
        let s = std::fs::read_to_string(&modem).unwrap();
        let line = s
            .lines()
            .find(|l| l.contains(".1.1.0)"))
            .unwrap()
            .to_string();
        let new = format!("  .1.3.6.1.4.1.99999.1.1.0) printf '%s\\ninteger\\n{x10}\\n' \"$2\" ;;");
        std::fs::write(&modem, s.replace(&line, &new)).unwrap();
    };
    set_esno(31);
    let pw = t.path().join("pw");
    secret_file(&pw, "rain or shine\n");
    let repo = t.path().join("repo");
    let src = t.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.db"), tiandi_tests::noise(2 << 20, 8)).unwrap();
    json(&backup(&repo, Some(&pw), &["init"]));
    json(&backup(
        &repo,
        Some(&pw),
        &["backup", src.to_str().unwrap()],
    ));
    // A rain fade is shown for a site whose host is healthy: on a loaded test machine the
    // host is not, so the host thresholds are out of reach here.
    let ctl = ControllerProc::start_with(
        &t.path().join("ctl"),
        None,
        "[thresholds]\ncpu_degraded_pct = 101.0\nmem_degraded_pct = 101.0\ndisk_full_pct = 101.0\n",
    );
    let mut site = ctl.new_site(
        &t.path().join("site"),
        "hn-017",
        "HN",
        &format!(
            "interval_s = 1.0\n[[backup_repos]]\nname = \"hn-db\"\npath = {repo:?}\n\n\
             [[devices]]\nname = \"modem\"\nprofile = \"vsat-modem\"\naddress = \"{}\"\n\
             timeout_ms = 4000\n[devices.oids]\nesno = {{ oid = \"1.3.6.1.4.1.99999.1.1.0\", scale = 0.1 }}\n",
            snmpd.addr
        ),
    );
    site.start();
    // The controller sees the fade in the reports; the repository stays at the site.
    wait_for(
        "rain fade at the controller",
        Duration::from_secs(30),
        || {
            let s = ctl.api("/api/sites/hn-017")?;
            (s["status"] == "rain-fade").then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(8));
    let copy = ctl.data_dir().join("backups/hn-017/hn-db");
    assert!(
        files(&copy).is_empty(),
        "nothing is shipped in a rain fade: {:?}",
        files(&copy)
    );
    assert!(
        site.log().contains("Backups wait out the rain fade"),
        "{}",
        site.log()
    );
    // Clear sky: the repository follows.
    set_esno(92);
    wait_in_sync(&repo, &copy, "the repository after the fade");
    assert!(site.log().contains("The rain fade is over"));
    site.stop();
}
