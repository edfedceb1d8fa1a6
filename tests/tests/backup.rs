//! `tiandi-backup` as an operator and a scheduler use it: the real binary, a real directory
//! tree, exit codes and `--json` output; a wrong or world-readable passphrase file refused;
//! the partner's check without the key finds a damaged pack; a backup killed with SIGKILL
//! leaves a repository the next run completes without storing again what it had written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tiandi_tests::secret_file;

fn run(repo: &Path, pw: Option<&Path>, args: &[&str]) -> Output {
    tiandi_tests::backup_cli(repo, pw, args)
}

fn json(o: &Output) -> Value {
    tiandi_tests::ok_json(o)
}

/// Restores `snapshot` into `out` and compares `files` (relative to the backed-up
/// `province-db`) with the source; the restore's answer.
fn restore_same(
    repo: &Path,
    pw: &Path,
    snapshot: &Value,
    out: &Path,
    src: &Path,
    files: &[&str],
) -> Value {
    let r = json(&run(
        repo,
        Some(pw),
        &[
            "restore",
            snapshot.as_str().unwrap(),
            "--target",
            out.to_str().unwrap(),
        ],
    ));
    for f in files {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join("province-db").join(f)).unwrap(),
            "{f}"
        );
    }
    r
}

#[test]
fn back_up_restore_check_and_survive_a_kill() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("province-db");
    std::fs::create_dir_all(src.join("dumps")).unwrap();
    std::fs::write(
        src.join("dumps/today.sql"),
        tiandi_tests::noise(40 << 20, 11),
    )
    .unwrap();
    std::fs::write(src.join("README"), "dumped nightly by the pre-hook\n").unwrap();
    let repo = t.path().join("repo");
    let pw = t.path().join("pw");
    secret_file(&pw, "correct horse battery staple\n");

    // Refusals first: no passphrase, one others may read, a wrong one.
    let o = run(&repo, None, &["init"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--password-file"));
    let open = t.path().join("open-pw");
    std::fs::write(&open, "x\n").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&repo, Some(&open), &["init"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));

    json(&run(&repo, Some(&pw), &["init", "--holder", "ministry"]));
    let s1 = json(&run(
        &repo,
        Some(&pw),
        &["backup", src.to_str().unwrap(), "--tag", "nightly"],
    ));
    assert_eq!(s1["files"], 2);
    assert!(s1["new_bytes"].as_u64().unwrap() > 30 << 20, "{s1}");
    let wrong = t.path().join("wrong");
    secret_file(&wrong, "not it\n");
    let o = run(&repo, Some(&wrong), &["snapshots"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong passphrase"));

    // A second backup of the same data stores nothing new.
    let s2 = json(&run(&repo, Some(&pw), &["backup", src.to_str().unwrap()]));
    assert_eq!(
        (s2["new_chunks"].as_u64(), s2["packs_written"].as_u64()),
        (Some(0), Some(0))
    );
    let list = json(&run(&repo, Some(&pw), &["snapshots"]));
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["tags"][0], "nightly");

    // Restore the first and compare.
    let out = t.path().join("out");
    let r = restore_same(
        &repo,
        &pw,
        &s1["snapshot"],
        &out,
        &src,
        &["dumps/today.sql", "README"],
    );
    assert_eq!(r["files"], 2);

    // The partner's check needs no passphrase; a damaged pack is found (exit 3).
    let c = json(&run(&repo, None, &["check"]));
    assert!(c["packs"]["damaged"].as_array().unwrap().is_empty(), "{c}");
    assert!(c["packs"]["packs"].as_u64().unwrap() >= 2, "{c}");
    assert!(c["data"].is_null(), "no key, no data check: {c}");

    // SIGKILL in the middle of a backup of new data, then the same backup again: what the
    // killed run had written in packs is not stored again.
    std::fs::write(
        src.join("dumps/tomorrow.sql"),
        tiandi_tests::noise(96 << 20, 12),
    )
    .unwrap();
    let mut child = Command::new(tiandi_tests::bin("tiandi-backup"))
        .arg("--repo")
        .arg(&repo)
        .arg("--password-file")
        .arg(&pw)
        .args(["backup", src.to_str().unwrap()])
        .spawn()
        .unwrap();
    let packs = |repo: &Path| walk_count(&repo.join("packs"));
    let before = packs(&repo);
    tiandi_tests::wait_for(
        "the killed run to write a pack",
        Duration::from_secs(120),
        || (packs(&repo) >= before + 2).then_some(()),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let written = packs(&repo) - before;
    let s3 = json(&run(&repo, Some(&pw), &["backup", src.to_str().unwrap()]));
    let total_new = 96u64 << 20;
    assert!(
        s3["new_bytes"].as_u64().unwrap() < total_new - (written as u64 - 1) * (15 << 20),
        "{written} packs were written before the kill, yet the next run stored {s3}"
    );
    let out2 = t.path().join("out2");
    restore_same(
        &repo,
        &pw,
        &s3["snapshot"],
        &out2,
        &src,
        &["dumps/tomorrow.sql"],
    );
    assert!(
        json(&run(&repo, None, &["check"]))["packs"]["damaged"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Retention: keep the newest only; the others' snapshot files go, the kept one restores.
    let dry = json(&run(
        &repo,
        Some(&pw),
        &["forget", "--keep-last", "1", "--dry-run"],
    ));
    assert_eq!(dry.as_array().unwrap().len(), 3);
    assert_eq!(
        json(&run(&repo, Some(&pw), &["snapshots"]))
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let f = json(&run(&repo, Some(&pw), &["forget", "--keep-last", "1"]));
    assert_eq!(f[0]["id"], s3["snapshot"]);
    assert_eq!(f[0]["reasons"][0], "last");
    let left = json(&run(&repo, Some(&pw), &["snapshots"]));
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["id"], s3["snapshot"]);
    assert_eq!(
        run(&repo, Some(&pw), &["forget"]).status.code(),
        Some(1),
        "no policy: refused"
    );
    let out3 = t.path().join("out3");
    restore_same(
        &repo,
        &pw,
        &s3["snapshot"],
        &out3,
        &src,
        &["dumps/today.sql"],
    );

    // Now damage one pack.
    let victim = first_file(&repo.join("packs"));
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let o = run(&repo, None, &["check"]);
    assert_eq!(o.status.code(), Some(3));
    let c: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["packs"]["damaged"].as_array().unwrap().len(), 1, "{c}");
    // With the key, reading every pack: the damaged one is named again, by its blobs' check.
    let o = run(&repo, Some(&pw), &["check", "--read-data-pct", "100"]);
    assert_eq!(o.status.code(), Some(3));
    let c: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!c["data"]["errors"].as_array().unwrap().is_empty(), "{c}");
}

#[test]
fn browse_drill_prune_and_keys_from_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("province-db");
    std::fs::create_dir_all(src.join("dumps")).unwrap();
    std::fs::write(src.join("dumps/a.sql"), tiandi_tests::noise(9 << 20, 1)).unwrap();
    std::fs::write(src.join("dumps/b.sql"), tiandi_tests::noise(9 << 20, 2)).unwrap();
    std::fs::write(src.join("README"), "dumped nightly\n").unwrap();
    let repo = t.path().join("repo");
    let pw = t.path().join("pw");
    secret_file(&pw, "correct horse battery staple\n");
    json(&run(&repo, Some(&pw), &["init"]));
    let s1 = json(&run(&repo, Some(&pw), &["backup", src.to_str().unwrap()]));
    std::fs::remove_file(src.join("dumps/a.sql")).unwrap();
    std::fs::write(src.join("README"), "dumped nightly, then weekly\n").unwrap();
    let s2 = json(&run(&repo, Some(&pw), &["backup", src.to_str().unwrap()]));
    assert_eq!(
        s2["unchanged_files"], 1,
        "b.sql is taken from the parent: {s2}"
    );
    assert_eq!(s2["parent"], s1["snapshot"]);

    let ls = json(&run(
        &repo,
        Some(&pw),
        &["ls", "latest", "province-db/dumps"],
    ));
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["province-db/dumps", "province-db/dumps/b.sql"]);
    let d = json(&run(
        &repo,
        Some(&pw),
        &["diff", s1["snapshot"].as_str().unwrap(), "latest"],
    ));
    let d: Vec<String> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["what"].as_str().unwrap(),
                c["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(d, ["M province-db/README", "- province-db/dumps/a.sql"]);
    let dump = run(&repo, Some(&pw), &["dump", "latest", "province-db/README"]);
    assert!(dump.status.success());
    assert_eq!(dump.stdout, b"dumped nightly, then weekly\n");

    // A drill restores and compares, and leaves nothing behind.
    let scratch = t.path().join("drill");
    let dr = json(&run(
        &repo,
        Some(&pw),
        &["drill", "--scratch", scratch.to_str().unwrap()],
    ));
    assert_eq!(dr["files"], 2, "{dr}");
    assert!(dr["mismatches"].as_array().unwrap().is_empty(), "{dr}");
    assert!(!scratch.exists());

    // Forget the first snapshot, prune with no grace: a.sql's data goes at the second prune.
    let packs = || walk_count(&repo.join("packs"));
    json(&run(&repo, Some(&pw), &["forget", "--keep-last", "1"]));
    let p1 = json(&run(&repo, Some(&pw), &["prune", "--grace-hours", "0"]));
    assert!(p1["marked_bytes"].as_u64().unwrap() > 0, "{p1}");
    let before = packs();
    let p2 = json(&run(&repo, Some(&pw), &["prune", "--grace-hours", "0"]));
    assert!(p2["deleted_packs"].as_u64().unwrap() >= 1, "{p2}");
    assert!(packs() < before, "{p2}");
    let c = json(&run(&repo, Some(&pw), &["check", "--read-data-pct", "100"]));
    assert!(c["data"]["errors"].as_array().unwrap().is_empty(), "{c}");
    let out = t.path().join("out");
    restore_same(
        &repo,
        &pw,
        &Value::from("latest"),
        &out,
        &src,
        &["dumps/b.sql", "README"],
    );

    // A second key for the DR centre opens the repository; the last key cannot be removed.
    let dr_pw = t.path().join("dr-pw");
    secret_file(&dr_pw, "the DR centre's own passphrase\n");
    json(&run(
        &repo,
        Some(&pw),
        &[
            "key",
            "add",
            "--holder",
            "dr-centre",
            "--new-password-file",
            dr_pw.to_str().unwrap(),
        ],
    ));
    let keys = json(&run(&repo, Some(&dr_pw), &["key", "list"]));
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");
    json(&run(
        &repo,
        Some(&dr_pw),
        &["key", "remove", "--holder", "owner"],
    ));
    assert_eq!(run(&repo, Some(&pw), &["snapshots"]).status.code(), Some(1));
    assert_eq!(
        run(
            &repo,
            Some(&dr_pw),
            &["key", "remove", "--holder", "dr-centre"]
        )
        .status
        .code(),
        Some(1)
    );
}

fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        usize::from(!e.file_name().to_string_lossy().starts_with('.'))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn first_file(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    for p in v {
        if p.is_dir() {
            return first_file(&p);
        }
        if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            return p;
        }
    }
    panic!("no file under {}", dir.display())
}
