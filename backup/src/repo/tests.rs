use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};

use super::*;

const FAST: KdfParams = crate::crypto::TEST_KDF;

fn tree(root: &Path) {
    fs::create_dir_all(root.join("db/old")).unwrap();
    fs::write(root.join("notes.txt"), "drill at 10:00\n").unwrap();
    fs::write(root.join("empty"), "").unwrap();
    let mut big = vec![0u8; 9 << 20];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut big);
    fs::write(root.join("db/dump.sql"), &big).unwrap();
    fs::write(root.join("db/old/dump.sql"), &big).unwrap();
    fs::set_permissions(root.join("notes.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("db/dump.sql", root.join("latest")).unwrap();
    fs::hard_link(root.join("notes.txt"), root.join("db/notes-link.txt")).unwrap();
}

fn same(a: &Path, b: &Path) {
    for e in fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let (pa, pb) = (e.path(), b.join(e.file_name()));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.mode(), mb.mode(), "{}", pa.display());
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{}",
            pa.display()
        );
        assert_eq!(ma.nlink(), mb.nlink(), "{}", pa.display());
        if ma.is_dir() {
            same(&pa, &pb);
        } else if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
        } else {
            assert_eq!(
                fs::read(&pa).unwrap(),
                fs::read(&pb).unwrap(),
                "{}",
                pa.display()
            );
        }
    }
}

fn opts(now_ms: i64) -> BackupOptions {
    BackupOptions::new("gd-001", now_ms)
}

fn backup(repo: &mut Repo, src: &Path, now_ms: i64) -> BackupSummary {
    repo.backup(&[src.to_path_buf()], &opts(now_ms), &mut |_| {})
        .unwrap()
}

fn restore(repo: &Repo, id: &str, out: &Path) -> RestoreSummary {
    repo.restore(id, out, &RestoreOptions::default()).unwrap()
}

#[test]
fn back_up_restore_and_deduplicate() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("gd-office");
    tree(&src);
    let xattr_ok = xattr::set(src.join("notes.txt"), "user.tiandi.site", b"gd-001").is_ok();
    let dir = t.path().join("repo");
    let mut repo = Repo::init(&dir, "ministry", b"a long passphrase", FAST, 1).unwrap();
    let s1 = backup(&mut repo, &src, 1000);
    assert_eq!((s1.files, s1.dirs), (5, 3), "{s1:?}");
    assert!(s1.skipped.is_empty(), "{s1:?}");
    // The two copies of the dump are stored once.
    assert!(s1.new_bytes < s1.bytes * 6 / 10, "{s1:?}");
    let out = t.path().join("restored");
    let r = restore(
        &Repo::open(&dir, b"a long passphrase").unwrap(),
        &s1.snapshot,
        &out,
    );
    assert_eq!((r.files, r.symlinks, r.hardlinks), (4, 1, 1), "{r:?}");
    same(&src, &out.join("gd-office"));
    if xattr_ok {
        assert_eq!(
            xattr::get(out.join("gd-office/notes.txt"), "user.tiandi.site").unwrap(),
            Some(b"gd-001".to_vec())
        );
    }
    // Nothing changed: nothing is read or stored again.
    let s2 = backup(&mut repo, &src, 2000);
    assert_eq!((s2.new_chunks, s2.packs_written), (0, 0), "{s2:?}");
    assert_eq!(s2.parent.as_deref(), Some(s1.snapshot.as_str()));
    assert_eq!(s2.unchanged_files, 5, "{s2:?}");
    assert_eq!(repo.snapshots().unwrap().len(), 2);
    // Wrong passphrase, a second repository's passphrase: refused.
    assert!(matches!(
        Repo::open(&dir, b"wrong"),
        Err(BackupError::WrongKey)
    ));
    assert!(
        Repo::init(&dir, "x", b"p", FAST, 1).is_err(),
        "not an empty directory"
    );
    // The partner's check, without the key: all good, then one flipped byte found.
    let be = Local::new(&dir);
    let c = check_packs(&be).unwrap();
    assert!(c.packs >= 1 && c.damaged.is_empty(), "{c:?}");
    let (first, _) = be.list("packs").unwrap().remove(0);
    let mut bytes = be.read(&first).unwrap();
    bytes[100] ^= 1;
    fs::write(dir.join(&first), bytes).unwrap();
    let c = check_packs(&be).unwrap();
    assert_eq!(c.damaged.len(), 1, "{c:?}");
    assert!(c.damaged[0].contains("not its name"), "{c:?}");
}

#[test]
fn packs_a_crash_left_without_an_index_are_not_sent_again() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("data");
    tree(&src);
    let dir = t.path().join("repo");
    let mut repo = Repo::init(&dir, "ministry", b"pass phrase", FAST, 1).unwrap();
    backup(&mut repo, &src, 1);
    // The crash: packs on disk, their index and the snapshot lost.
    fs::remove_dir_all(dir.join("index")).unwrap();
    fs::remove_dir_all(dir.join("snapshots")).unwrap();
    let mut again = Repo::open(&dir, b"pass phrase").unwrap();
    let s = backup(&mut again, &src, 2);
    assert_eq!(s.new_chunks, 0, "{s:?}");
    let out = t.path().join("out");
    restore(&again, &s.snapshot, &out);
    same(&src, &out.join("data"));
}

#[test]
fn changed_files_are_read_again_and_browsing_shows_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("data");
    tree(&src);
    let dir = t.path().join("repo");
    let mut repo = Repo::init(&dir, "m", b"pass phrase", FAST, 1).unwrap();
    let s1 = backup(&mut repo, &src, 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(src.join("notes.txt"), "drill moved to 11:00\n").unwrap();
    fs::remove_file(src.join("empty")).unwrap();
    fs::write(src.join("db/new.sql"), "insert\n").unwrap();
    let s2 = backup(&mut repo, &src, 2);
    // notes.txt and its hard link (one inode) are read again; the dumps are not.
    assert_eq!(s2.unchanged_files, 2, "{s2:?}");
    let mut changes = Vec::new();
    repo.diff(&s1.snapshot, &s2.snapshot, &mut |c| changes.push(c))
        .unwrap();
    let got: Vec<(char, &str)> = changes.iter().map(|c| (c.what, c.path.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ('+', "data/db/new.sql"),
            ('M', "data/db/notes-link.txt"),
            ('-', "data/empty"),
            ('M', "data/notes.txt"),
        ]
    );
    let mut listed = Vec::new();
    repo.ls(&s2.snapshot, "data/db", &mut |e| listed.push(e.path))
        .unwrap();
    assert_eq!(listed[0], "data/db");
    assert!(
        listed.contains(&"data/db/old/dump.sql".to_string()),
        "{listed:?}"
    );
    let mut out = Vec::new();
    repo.dump("latest", "data/notes.txt", &mut out).unwrap();
    assert_eq!(out, b"drill moved to 11:00\n");
    assert!(repo.dump("latest", "data/db", &mut out).is_err());
    assert!(repo.ls("latest", "data/nothing", &mut |_| {}).is_err());
}

#[test]
fn a_restore_resumes_and_restores_one_path() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("data");
    tree(&src);
    let dir = t.path().join("repo");
    let mut repo = Repo::init(&dir, "m", b"pass phrase", FAST, 1).unwrap();
    let s = backup(&mut repo, &src, 1);
    let out = t.path().join("out");
    restore(&repo, &s.snapshot, &out);
    // An interrupted restore: one file half-written, one missing.
    let half = out.join("data/db/dump.sql");
    let f = fs::OpenOptions::new().write(true).open(&half).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    fs::remove_file(out.join("data/db/old/dump.sql")).unwrap();
    let r = restore(&repo, "latest", &out);
    assert_eq!(r.already_there, 2, "{r:?}");
    same(&src, &out.join("data"));
    // One directory only.
    let part = t.path().join("part");
    let r = repo
        .restore(
            &s.snapshot[..8],
            &part,
            &RestoreOptions {
                path: Some("data/db/old".into()),
                ..RestoreOptions::default()
            },
        )
        .unwrap();
    assert_eq!(r.files, 1, "{r:?}");
    same(&src.join("db/old"), &part.join("data/db/old"));
    assert!(!part.join("data/notes.txt").exists());
}

/// Writes a snapshot whose root tree is `nodes`, as a key holder could, and restores it.
fn restore_planted(repo: &mut Repo, nodes: Vec<Node>, out: &Path) -> BackupError {
    let json = serde_json::to_vec(&Tree { nodes }).unwrap();
    let id = repo.keys.chunk_id(&json);
    let mut w = crate::pack::PackWriter::new();
    w.add(id, &repo.keys.seal_chunk(&id, &json).unwrap());
    let (name, bytes, entries) = w.finish();
    repo.be
        .write(&pack_file(name.to_hex().as_str()), &bytes)
        .unwrap();
    repo.write_index(vec![(*name.as_bytes(), entries)]).unwrap();
    let snap = Snapshot {
        time_ms: 1,
        host: "h".into(),
        paths: vec![],
        tags: vec![],
        tree: hex::encode(id),
        parent: None,
        totals: Totals::default(),
    };
    let sid = repo.write_snapshot(&snap).unwrap();
    repo.restore(&sid, out, &RestoreOptions::default())
        .unwrap_err()
}

#[test]
fn a_snapshot_name_that_climbs_out_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut repo = Repo::init(&t.path().join("repo"), "m", b"pass phrase", FAST, 1).unwrap();
    for bad in ["..", "a/../../b", "", ".", "/etc"] {
        let err = restore_planted(
            &mut repo,
            vec![Node::new(bad, Kind::File)],
            &t.path().join("out"),
        );
        assert!(err.to_string().contains("plain relative"), "{bad}: {err}");
    }
    // A link and a directory of the same name: the second would go through the first.
    let outside = t.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let mut link = Node::new("a", Kind::Symlink);
    link.target = Some(outside.display().to_string());
    let err = restore_planted(
        &mut repo,
        vec![link, Node::new("a", Kind::Dir)],
        &t.path().join("out2"),
    );
    assert!(err.to_string().contains("sorted and unique"), "{err}");
    assert!(fs::read_dir(&outside).unwrap().next().is_none());
    // A link already in the target where the snapshot has a directory: replaced, not followed.
    let out3 = t.path().join("out3");
    fs::create_dir_all(&out3).unwrap();
    std::os::unix::fs::symlink(&outside, out3.join("r")).unwrap();
    let src = t.path().join("r");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("planted"), "x").unwrap();
    let s = backup(&mut repo, &src, 5);
    restore(&repo, &s.snapshot, &out3);
    assert!(out3.join("r").is_dir() && !out3.join("r").is_symlink());
    assert!(!outside.join("planted").exists());
    assert!(repo.snapshot("../config").is_err());
}

#[test]
fn prune_marks_then_sweeps_and_keeps_what_a_later_snapshot_uses() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let mut repo = Repo::init(&dir, "m", b"pass phrase", FAST, 1).unwrap();
    let mk = |name: &str, seed: u64| -> PathBuf {
        let p = t.path().join(name);
        fs::create_dir_all(&p).unwrap();
        let mut b = vec![0u8; 6 << 20];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut b);
        fs::write(p.join("f"), &b).unwrap();
        p
    };
    let (a, b) = (mk("a", 1), mk("b", 2));
    let sa = backup(&mut repo, &a, 1);
    let sb = backup(&mut repo, &b, 2);
    // A view of the repository opened before the prune (a backup that started earlier).
    let mut early = Repo::open(&dir, b"pass phrase").unwrap();
    repo.forget(&sa.snapshot).unwrap();
    let hour = 3600 * 1000;
    let p1 = repo.prune(&PruneOptions::new(10 * hour)).unwrap();
    assert!(p1.marked_packs >= 1 && p1.deleted_packs == 0, "{p1:?}");
    let bytes_before: u64 = repo.be.list("packs").unwrap().iter().map(|p| p.1).sum();
    // The early view backs up a's data again: it uses the marked blobs.
    let sa2 = backup(&mut early, &a, 3);
    assert_eq!(sa2.new_chunks, 0, "all of it is there, marked: {sa2:?}");
    // Within the grace period nothing is deleted.
    let p2 = repo.prune(&PruneOptions::new(11 * hour)).unwrap();
    assert_eq!(p2.deleted_packs, 0, "{p2:?}");
    assert!(p2.waiting_packs >= 1, "{p2:?}");
    // After it, the pack a's snapshot needs is kept; restores of both work.
    let p3 = repo.prune(&PruneOptions::new(40 * hour)).unwrap();
    assert!(p3.rescued_packs >= 1, "{p3:?}");
    for (id, src) in [(&sa2.snapshot, &a), (&sb.snapshot, &b)] {
        let out = t.path().join(format!("out-{id}"));
        restore(&repo, id, &out);
        same(src, &out.join(src.file_name().unwrap()));
    }
    // Forget a again: now its data goes, after a mark and a grace period.
    repo.forget(&sa2.snapshot).unwrap();
    let p4 = repo.prune(&PruneOptions::new(41 * hour)).unwrap();
    assert!(p4.marked_packs >= 1, "{p4:?}");
    let p5 = repo.prune(&PruneOptions::new(80 * hour)).unwrap();
    assert!(
        p5.deleted_packs >= 1 && p5.deleted_bytes > 5 << 20,
        "{p5:?}"
    );
    let bytes_after: u64 = repo.be.list("packs").unwrap().iter().map(|p| p.1).sum();
    assert!(
        bytes_after < bytes_before - (5 << 20),
        "{bytes_before} → {bytes_after}"
    );
    assert!(repo.be.list("pending").unwrap().is_empty());
    let reopened = Repo::open(&dir, b"pass phrase").unwrap();
    let out = t.path().join("out-b-again");
    restore(&reopened, &sb.snapshot, &out);
    same(&b, &out.join("b"));
    assert!(check_packs(&*reopened.be).unwrap().damaged.is_empty());
}

#[test]
fn keys_are_added_listed_and_removed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let repo = Repo::init(&dir, "ministry", b"first secret", FAST, 1).unwrap();
    repo.key_add("dr-centre", b"second secret", FAST, 2)
        .unwrap();
    assert!(repo.key_add("dr-centre", b"x", FAST, 3).is_err(), "exists");
    assert!(repo.key_add("../x", b"x", FAST, 3).is_err(), "name");
    let other = Repo::open(&dir, b"second secret").unwrap();
    let list = other.keys_list(b"second secret").unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|k| k.holder == "dr-centre" && k.current));
    assert!(
        other.key_remove("dr-centre", b"second secret").is_err(),
        "the key in use"
    );
    other.key_remove("ministry", b"second secret").unwrap();
    assert!(matches!(
        Repo::open(&dir, b"first secret"),
        Err(BackupError::WrongKey)
    ));
    assert!(
        other.key_remove("dr-centre", b"other").is_err(),
        "the last key"
    );
}

/// A directory whose pack writes number `fail` (counted from 0) fail, as on a full disk,
/// until it is `healed`.
struct FullDisk {
    inner: Local,
    fail: std::ops::Range<usize>,
    packs: std::sync::atomic::AtomicUsize,
    healed: std::sync::atomic::AtomicBool,
}

impl Backend for FullDisk {
    fn read(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        self.inner.read(name)
    }
    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackupError> {
        self.inner.read_range(name, offset, len)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let n = std::sync::atomic::Ordering::SeqCst;
        if name.starts_with("packs/")
            && self.fail.contains(&self.packs.fetch_add(1, n))
            && !self.healed.load(n)
        {
            // ENOSPC: "No space left on device (os error 28)".
            return Err(BackupError::Io(std::io::Error::from_raw_os_error(28)));
        }
        self.inner.write(name, bytes)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        self.inner.list(prefix)
    }
    fn remove(&self, name: &str) -> Result<(), BackupError> {
        self.inner.remove(name)
    }
    fn is_empty(&self) -> Result<bool, BackupError> {
        self.inner.is_empty()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_repository_write_error_stops_the_backup_with_its_message() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("data");
    fs::create_dir_all(&src).unwrap();
    // 40 MiB that do not compress: two full packs written by the workers, and a last one.
    for (i, name) in ["a.bin", "b.bin"].iter().enumerate() {
        let mut b = vec![0u8; 20 << 20];
        rand::rngs::StdRng::seed_from_u64(10 + i as u64).fill_bytes(&mut b);
        fs::write(src.join(name), &b).unwrap();
    }
    fs::write(src.join("small.txt"), "drill at 10:00\n").unwrap();
    let dir = t.path().join("repo");
    for (fail, repo_dir) in [(1..usize::MAX, dir.clone()), (1..2, t.path().join("repo2"))] {
        let full = Arc::new(FullDisk {
            inner: Local::new(&repo_dir),
            fail: fail.clone(),
            packs: Default::default(),
            healed: Default::default(),
        });
        let mut repo = Repo::init_on(full.clone(), "m", b"pass phrase", FAST, 1).unwrap();
        let err = repo
            .backup(std::slice::from_ref(&src), &opts(1), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("No space left on device"), "{fail:?}: {err}");
        assert!(
            err.contains("writing packs/"),
            "{fail:?}: names the file: {err}"
        );
        assert!(repo.snapshots().unwrap().is_empty(), "no snapshot");
        // The index names only packs that are there, whole.
        let reopened = Repo::open(&repo_dir, b"pass phrase").unwrap();
        for loc in reopened.index.blobs.values() {
            let name = hex::encode(reopened.index.packs[loc.pack as usize]);
            assert!(repo_dir.join(pack_file(&name)).is_file(), "{name}");
        }
        assert!(check_packs(&*reopened.be).unwrap().damaged.is_empty());
        drop(reopened);
        // The disk has room again: a backup completes on the same repository value, reusing
        // the pack written whole; the repository opens and restores it.
        full.healed.store(true, std::sync::atomic::Ordering::SeqCst);
        let s = backup(&mut repo, &src, 2);
        assert_eq!((s.files, s.skipped_count), (3, 0), "{s:?}");
        assert!(s.new_bytes < s.bytes, "the first pack is reused: {s:?}");
        let again = Repo::open(&repo_dir, b"pass phrase").unwrap();
        let out = t.path().join(format!("out-{}", s.snapshot));
        restore(&again, &s.snapshot, &out);
        same(&src, &out.join("data"));
        assert!(check_packs(&*again.be).unwrap().damaged.is_empty());
    }
}
