use std::os::unix::fs::PermissionsExt;

use rand::{RngCore, SeedableRng};

use super::hook::*;
use super::run::*;
use super::*;
use crate::crypto::TEST_KDF;

const H: i64 = 3_600_000;
/// 2026-03-14 12:00 UTC.
const T0: i64 = 1_773_489_600_000;

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    src: PathBuf,
    repos: PathBuf,
    scratch: PathBuf,
}

fn site() -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let src = root.join("data");
    fs::create_dir_all(src.join("db")).unwrap();
    let mut big = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut big);
    fs::write(src.join("db/dump.sql"), &big).unwrap();
    fs::write(src.join("notes.txt"), "drill at 10:00\n").unwrap();
    let pw = root.join("pw");
    fs::write(&pw, "correct horse battery staple\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    Site {
        repos: root.join("repos"),
        scratch: root.join("scratch"),
        src,
        root,
        _tmp: tmp,
    }
}

fn spec(s: &Site) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": "gd-db-nightly",
        "site": "gd-001",
        "repo": "gd-db",
        "paths": [s.src],
        "password_file": s.root.join("pw"),
        "schedule": "daily 01:30 +08:00",
        "verify": "weekly SUN 03:00 +08:00",
        "verify_read_pct": 100,
        "drill": "@monthly +08:00",
        "drill_sample_pct": 100,
    }))
    .unwrap()
}

fn go(spec: &JobSpec, kind: JobKind, s: &Site, now_ms: i64) -> JobResult {
    let r = run_with(
        spec,
        kind,
        &s.repos,
        &s.scratch,
        now_ms,
        &mut |_| {},
        TEST_KDF,
    );
    // Whatever happened, the result is one the controller can read back.
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<JobResult>(&json).unwrap(), r);
    r
}

#[test]
fn backups_dedup_and_retention_keeps_one() {
    let s = site();
    let mut j = spec(&s);
    j.keep_last = 1;
    j.prune_grace_hours = 0;
    let a = go(&j, JobKind::Backup, &s, T0);
    assert!(a.ok, "{a:?}");
    assert!(a.snapshot.is_some());
    assert_eq!((a.files, a.snapshots, a.forgot), (2, 1, 0));
    assert!(a.bytes > 1 << 20 && a.new_bytes >= 1 << 20, "{a:?}");
    assert!(
        a.repo_bytes >= a.stored_bytes && a.stored_bytes > 0,
        "{a:?}"
    );
    assert!(a.dedup_ratio.is_some());

    fs::write(s.src.join("notes.txt"), "drill at 11:00\n").unwrap();
    let b = go(&j, JobKind::Backup, &s, T0 + H);
    assert!(b.ok, "{b:?}");
    assert_ne!(b.snapshot, a.snapshot);
    assert_eq!(b.bytes, a.bytes);
    assert!(
        b.new_bytes < 64 << 10,
        "second backup stored {} new",
        b.new_bytes
    );
    assert!(b.dedup_ratio.unwrap() > 10.0, "{b:?}");
    // keep_last = 1: the first snapshot is forgotten, the new one stays.
    assert_eq!((b.forgot, b.snapshots), (1, 1));
    let repo = Repo::open(&s.repos.join("gd-db"), b"correct horse battery staple").unwrap();
    let left = repo.snapshots().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(Some(&left[0].0), b.snapshot.as_ref());
    assert_eq!(left[0].1.tags, ["job:gd-db-nightly"]);
    assert_eq!(left[0].1.host, "gd-001");
}

#[test]
fn retention_leaves_other_jobs_snapshots_alone() {
    let s = site();
    let mut other = spec(&s);
    other.name = "gd-db-hourly".into();
    assert!(go(&other, JobKind::Backup, &s, T0).ok);
    let mut j = spec(&s);
    j.keep_last = 1;
    for i in 1..=3 {
        let r = go(&j, JobKind::Backup, &s, T0 + i * H);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.snapshots, 1);
    }
    let repo = Repo::open(&s.repos.join("gd-db"), b"correct horse battery staple").unwrap();
    let tags: Vec<_> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|(_, s)| s.tags[0].clone())
        .collect();
    assert_eq!(tags, ["job:gd-db-hourly", "job:gd-db-nightly"]);
}

#[test]
fn a_failing_pre_hook_stops_the_backup_and_the_post_hook_still_runs() {
    let s = site();
    let mut j = spec(&s);
    j.pre_hook = Some(vec!["/bin/false".into()]);
    let seen = s.root.join("post-hook-saw");
    j.post_hook = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$TIANDI_BACKUP_STATUS $TIANDI_BACKUP_JOB\" > \"$1\"".into(),
        "sh".into(),
        seen.display().to_string(),
    ]);
    let r = go(&j, JobKind::Backup, &s, T0);
    assert!(!r.ok);
    assert_eq!(r.snapshot, None);
    let e = r.error.unwrap();
    assert!(
        e.starts_with("pre-hook /bin/false exited with status 1"),
        "{e}"
    );
    assert_eq!(fs::read_to_string(&seen).unwrap(), "failed gd-db-nightly\n");
    // No backup: no repository was made.
    assert!(!s.repos.join("gd-db").exists());

    // A good pre-hook: the backup runs, the post-hook hears "ok".
    j.pre_hook = Some(vec!["/bin/true".into()]);
    let r = go(&j, JobKind::Backup, &s, T0);
    assert!(r.ok, "{r:?}");
    assert_eq!(fs::read_to_string(&seen).unwrap(), "ok gd-db-nightly\n");
}

#[test]
fn a_failing_post_hook_fails_the_run_with_its_stderr() {
    let s = site();
    let mut j = spec(&s);
    j.post_hook = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo resuming the database failed >&2; exit 3".into(),
    ]);
    let r = go(&j, JobKind::Backup, &s, T0);
    assert!(!r.ok);
    assert!(r.snapshot.is_some(), "the backup itself was made");
    assert_eq!(
        r.error.as_deref(),
        Some("post-hook /bin/sh exited with status 3: resuming the database failed")
    );
    assert_eq!(
        r.post_hook_output.as_deref(),
        Some("resuming the database failed")
    );
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_group() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let started = Instant::now();
    let e = run_hook(
        &["/bin/sleep".into(), "30".into()],
        Duration::from_secs(1),
        &[],
    )
    .unwrap_err();
    assert_eq!(e, "/bin/sleep timed out after 1 s");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A child of the hook, which ignores SIGTERM, goes with it.
    let started = Instant::now();
    let e = run_hook(
        &[
            "/bin/sh".into(),
            "-c".into(),
            "trap '' TERM; /bin/sleep 30 & echo $! > \"$1\"; echo waiting >&2; wait".into(),
            "sh".into(),
            pidfile.display().to_string(),
        ],
        Duration::from_secs(1),
        &[],
    )
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(e, "/bin/sh timed out after 1 s: waiting");
    let pid = fs::read_to_string(&pidfile).unwrap();
    let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
    // Gone, or a zombie waiting for whoever reaps orphans here.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::read_to_string(&stat) {
            Err(_) => break,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                break;
            }
            Ok(s) => {
                assert!(Instant::now() < deadline, "the hook's child lives on: {s}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn hook_errors_say_what_happened() {
    let env = [("TIANDI_BACKUP_JOB", "j1")];
    let long = "yes | head -c 100000 >&2; echo \"job $TIANDI_BACKUP_JOB\" >&2; exit 4";
    let e = run_hook(
        &["/bin/sh".into(), "-c".into(), long.into()],
        Duration::from_secs(10),
        &env,
    )
    .unwrap_err();
    assert!(e.starts_with("/bin/sh exited with status 4: "), "{e}");
    assert!(e.ends_with("y\ny\njob j1"), "{e}");
    assert!(e.len() < HOOK_TAIL + 100, "{} bytes", e.len());
    let e = run_hook(&["sh".into()], Duration::from_secs(1), &[]).unwrap_err();
    assert!(e.contains("give the program's absolute path"), "{e}");
    let e = run_hook(&["/no/such/hook".into()], Duration::from_secs(1), &[]).unwrap_err();
    assert!(e.starts_with("/no/such/hook could not be started"), "{e}");
    let e = run_hook(
        &["/bin/sh".into(), "-c".into(), "kill -9 $$".into()],
        Duration::from_secs(5),
        &[],
    )
    .unwrap_err();
    assert_eq!(e, "/bin/sh was killed by signal 9");
    run_hook(&["/bin/true".into()], Duration::from_secs(5), &[]).unwrap();
}

#[test]
fn verify_and_drill_on_a_good_repository() {
    let s = site();
    let j = spec(&s);
    // Nothing backed up yet: both fail, saying why.
    let v = go(&j, JobKind::Verify, &s, T0);
    assert!(!v.ok);
    assert!(v.error.unwrap().starts_with("no repository at"));
    assert!(go(&j, JobKind::Backup, &s, T0).ok);
    let v = go(&j, JobKind::Verify, &s, T0 + H);
    assert!(v.ok, "{v:?}");
    assert_eq!((v.verify_errors, v.snapshots), (0, 1));
    let d = go(&j, JobKind::Drill, &s, T0 + H);
    assert!(d.ok, "{d:?}");
    assert_eq!((d.drill_files, d.drill_mismatches), (2, 0));
    assert!(d.snapshot.is_some());
    // The drill's directory is gone; the scratch directory stays.
    assert_eq!(fs::read_dir(&s.scratch).unwrap().count(), 0);

    // A stale drill directory (a drill killed half-way) is cleared first.
    fs::create_dir_all(s.scratch.join("gd-db-nightly.drill/x")).unwrap();
    let d = go(&j, JobKind::Drill, &s, T0 + 2 * H);
    assert!(d.ok, "{d:?}");
    assert_eq!(d.warnings.len(), 1);

    // A damaged pack: verify fails and says which.
    let packs = s.repos.join("gd-db/packs");
    let sub = fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pack = fs::read_dir(&sub).unwrap().next().unwrap().unwrap().path();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[10] ^= 1;
    fs::write(&pack, bytes).unwrap();
    let v = go(&j, JobKind::Verify, &s, T0 + 3 * H);
    assert!(!v.ok);
    assert!(v.verify_errors > 0);
    assert!(v.error.unwrap().starts_with("verify found"));
}

#[test]
fn a_socket_is_a_warning_and_a_missing_path_a_failure() {
    let s = site();
    let _sock = std::os::unix::net::UnixListener::bind(s.src.join("mysqld.sock")).unwrap();
    let j = spec(&s);
    let r = go(&j, JobKind::Backup, &s, T0);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.skipped, 1);
    assert_eq!(r.warnings, ["1 paths left out of the backup"]);
    assert!(r.notes[0].contains("mysqld.sock"), "{:?}", r.notes);

    let mut j = spec(&s);
    j.paths.push(PathBuf::from("/no/such/mount"));
    let r = go(&j, JobKind::Backup, &s, T0 + H);
    assert!(!r.ok);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .starts_with("paths: /no/such/mount: "),
        "{r:?}"
    );
}

#[test]
fn wrong_passphrase_and_loose_password_file_fail_closed() {
    let s = site();
    let j = spec(&s);
    assert!(go(&j, JobKind::Backup, &s, T0).ok);
    fs::set_permissions(s.root.join("pw"), fs::Permissions::from_mode(0o644)).unwrap();
    let r = go(&j, JobKind::Backup, &s, T0 + H);
    assert!(r.error.unwrap().contains("chmod 600"));
    fs::write(s.root.join("pw"), "not the passphrase\n").unwrap();
    fs::set_permissions(s.root.join("pw"), fs::Permissions::from_mode(0o600)).unwrap();
    let r = go(&j, JobKind::Backup, &s, T0 + H);
    assert!(r.error.unwrap().starts_with("opening repository"), "");
}

fn bad(f: impl FnOnce(&mut JobSpec)) -> String {
    let s = site();
    let mut j = spec(&s);
    f(&mut j);
    j.validate().unwrap_err()
}

#[test]
fn validation_names_the_key() {
    let s = site();
    spec(&s).validate().unwrap();
    let p = "backup_jobs[gd-db-nightly]";
    let cases: Vec<(String, String)> = vec![
        (bad(|j| j.paths.clear()), format!("{p}.paths: 0 paths")),
        (
            bad(|j| j.paths = vec![PathBuf::from("data")]),
            format!("{p}.paths: \"data\" is not an absolute path"),
        ),
        (
            bad(|j| j.paths = vec!["/a/x".into(), "/b/x".into()]),
            format!("{p}.paths: two paths end in \"x\""),
        ),
        (
            bad(|j| j.paths = vec!["/a/../etc".into()]),
            format!("{p}.paths: \"/a/../etc\" contains '..'"),
        ),
        (
            bad(|j| j.paths = (0..65).map(|i| format!("/d{i}").into()).collect()),
            format!("{p}.paths: 65 paths: give 1 to 64"),
        ),
        (
            bad(|j| j.password_file = "pw".into()),
            format!("{p}.password_file: \"pw\" is not"),
        ),
        (
            bad(|j| j.repo = "../etc".into()),
            format!("{p}.repo: repository"),
        ),
        (bad(|j| j.site = "".into()), format!("{p}.site: site")),
        (bad(|j| j.to = "a/b".into()), format!("{p}.to: partner")),
        (
            bad(|j| j.pre_hook = Some(vec!["pg_dump".into()])),
            format!("{p}.pre_hook: \"pg_dump\": give the program's absolute path"),
        ),
        (
            bad(|j| j.post_hook = Some(vec![])),
            format!("{p}.post_hook: is empty"),
        ),
        (
            bad(|j| j.hook_timeout_s = 86_401),
            format!("{p}.hook_timeout_s: 86401: between 1 and 86400"),
        ),
        (
            bad(|j| j.tz_offset_hours = 15),
            format!("{p}.tz_offset_hours: 15"),
        ),
        (bad(|j| j.rpo_hours = 0), format!("{p}.rpo_hours: 0")),
        (
            bad(|j| j.verify_read_pct = 101),
            format!("{p}.verify_read_pct: 101"),
        ),
        (
            bad(|j| j.drill_sample_pct = 0),
            format!("{p}.drill_sample_pct: 0"),
        ),
        (
            bad(|j| j.prune_grace_hours = 9000),
            format!("{p}.prune_grace_hours: 9000"),
        ),
        (
            bad(|j| j.window = Some(String::new())),
            format!("{p}.window: 0"),
        ),
        (
            bad(|j| j.name = ".hidden".into()),
            "backup_jobs[].name: job name".into(),
        ),
    ];
    for (got, want) in cases {
        assert!(
            got.starts_with(&want),
            "{got:?} does not start with {want:?}"
        );
    }
}

fn file(jobs: serde_json::Value) -> String {
    serde_json::json!({ "version": 1, "generated_ms": T0, "jobs": jobs }).to_string()
}

#[test]
fn jobs_file_parse_refuses_what_it_must() {
    let s = site();
    let j = serde_json::to_value(spec(&s)).unwrap();
    let jobs = Jobs::parse(&file(serde_json::json!([j]))).unwrap();
    assert_eq!(jobs.jobs.len(), 1);
    assert_eq!(jobs.for_site("gd-001").count(), 1);
    assert_eq!(jobs.for_site("gd-002").count(), 0);
    assert_eq!(Jobs::parse(&jobs.to_json()).unwrap(), jobs);
    // Defaults as documented.
    let only: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "n", "site": "controller", "repo": "r", "paths": ["/etc"],
        "password_file": "/etc/tiandi/backup.pw", "schedule": "@daily",
    }))
    .unwrap();
    assert_eq!(
        (only.hook_timeout_s, only.rpo_hours, only.verify_read_pct),
        (600, 26, 5)
    );
    assert_eq!((only.drill_sample_pct, only.prune_grace_hours), (10, 24));
    assert_eq!((only.to.as_str(), only.tz_offset_hours), ("controller", 0));
    assert!(only.keep().is_empty());

    assert_eq!(
        Jobs::parse(&file(serde_json::json!([j, j]))).unwrap_err(),
        JobsError::Duplicate("gd-db-nightly".into())
    );
    let v2 = r#"{"version": 2, "generated_ms": 0, "jobs": [], "new_key": 1}"#;
    assert_eq!(Jobs::parse(v2).unwrap_err(), JobsError::Version(2));
    assert_eq!(
        Jobs::parse(r#"{"version": 2}"#).unwrap_err().to_string(),
        "backup jobs file version 2: this program reads version 1"
    );
    let mut typo = j.clone();
    typo["keep_dialy"] = 7.into();
    let e = Jobs::parse(&file(serde_json::json!([typo]))).unwrap_err();
    assert!(
        e.to_string().contains("jobs[0]") && e.to_string().contains("keep_dialy"),
        "{e}"
    );
    let mut sched = j.clone();
    sched["schedule"] = "every 10s".into();
    let e = Jobs::parse(&file(serde_json::json!([sched]))).unwrap_err();
    assert!(
        e.to_string().contains("jobs[0].schedule") && e.to_string().contains("between 1 minute"),
        "{e}"
    );
    let mut rel = j.clone();
    rel["paths"] = serde_json::json!(["relative"]);
    let e = Jobs::parse(&file(serde_json::json!([rel]))).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("backup_jobs[gd-db-nightly].paths: \"relative\""),
        "{e}"
    );
    let many: Vec<_> = (0..=MAX_JOBS)
        .map(|i| {
            let mut x = j.clone();
            x["name"] = format!("job-{i}").into();
            x
        })
        .collect();
    assert_eq!(
        Jobs::parse(&file(serde_json::json!(many))).unwrap_err(),
        JobsError::TooMany(MAX_JOBS + 1)
    );
}

#[test]
fn due_and_next_run() {
    let s = site();
    let j = spec(&s); // daily 01:30 Beijing = 17:30 UTC
    let at = T0 + 5 * H + 30 * 60_000; // 2026-03-14 17:30 UTC
    assert_eq!(next_run(&j, JobKind::Backup, T0), Some(at));
    assert!(due(&j, JobKind::Backup, None, T0));
    assert!(!due(&j, JobKind::Backup, Some(at - 24 * H), at - 1));
    assert!(due(&j, JobKind::Backup, Some(at - 24 * H), at));
    assert!(!due(&j, JobKind::Backup, Some(at), at + 23 * H));
    // Down for three days: one run now, then on schedule.
    assert!(due(&j, JobKind::Backup, Some(at - 72 * H), at + H));
    // A last run days in the future (the clock was set back): due now, not stalled until
    // the clock catches up. A small skew waits for the next time.
    assert!(due(&j, JobKind::Backup, Some(at + 48 * H), at));
    assert!(!due(&j, JobKind::Backup, Some(at + 60_000), at));
    assert!(due(&j, JobKind::Backup, Some(at + 60_000), at + 24 * H));
    // Verify: Sunday 03:00 Beijing = Saturday 19:00 UTC.
    assert_eq!(next_run(&j, JobKind::Verify, T0), Some(T0 + 7 * H));
    let mut none = j.clone();
    none.drill = None;
    assert_eq!(next_run(&none, JobKind::Drill, T0), None);
    assert!(!due(&none, JobKind::Drill, None, T0));
    assert_eq!(JobKind::Drill.to_string(), "drill");
    assert_eq!(
        serde_json::to_string(&JobKind::Verify).unwrap(),
        "\"verify\""
    );
}
