//! The backup repository in an S3 bucket on a real S3 server: `s3s-fs` (which scripts/test
//! installs) on 127.0.0.1 with its own key, serving a temporary directory. Through the library:
//! the backend's contract (whole files, ranges, sorted lists, absent removes, names that are not
//! repository files skipped), then a repository made, backed up, restored byte for byte and
//! checked; then the same from the command line; and the refusals (plain HTTP off loopback,
//! an empty secret, a wrong one, a credentials file others may read).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tiandi_backup::backend::Backend;
use tiandi_backup::crypto::KdfParams;
use tiandi_backup::repo::{self, BackupOptions, Repo, RestoreOptions};
use tiandi_backup::s3::{S3Backend, S3Config};

const BUCKET: &str = "tiandi-backup";

/// `s3s-fs` serving `root`, with bucket [`BUCKET`] (a directory of the root); killed on drop.
struct S3Server {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
    key: String,
    secret: String,
}

impl S3Server {
    fn start(dir: &Path) -> S3Server {
        let root = dir.join("s3-root");
        // s3s-fs keeps a bucket as a directory of its root: this is the bucket.
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let (key, secret) = (random_hex(10), random_hex(20));
        let addr = tiandi_tests::free_tcp();
        let log = std::fs::File::create(dir.join("s3s-fs.log")).unwrap();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--access-key", &key, "--secret-key", &secret])
            .arg(&root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start s3s-fs ({e}): scripts/test installs it (cargo install --locked \
                     --root /usr/local s3s-fs@0.14.1 --features binary)"
                )
            });
        let mut s = S3Server {
            child,
            addr,
            root,
            key,
            secret,
        };
        tiandi_tests::wait_for("s3s-fs to listen", Duration::from_secs(20), || {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "s3s-fs exited ({st}): {}",
                    std::fs::read_to_string(dir.join("s3s-fs.log")).unwrap_or_default()
                );
            }
            TcpStream::connect(addr).ok()
        });
        s
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint(),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            access_key_id: self.key.clone(),
            secret_access_key: self.secret.clone(),
            ..S3Config::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A tree with a 20 MiB file that neither deduplicates nor compresses (two packs at least).
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("province-db");
    std::fs::create_dir_all(src.join("dumps")).unwrap();
    std::fs::write(
        src.join("dumps/today.sql"),
        tiandi_tests::noise(20 << 20, 7),
    )
    .unwrap();
    std::fs::write(src.join("dumps/small.sql"), tiandi_tests::noise(3000, 8)).unwrap();
    std::fs::write(src.join("README"), "dumped nightly by the pre-hook\n").unwrap();
    src
}

const FILES: [&str; 3] = ["dumps/today.sql", "dumps/small.sql", "README"];

fn same_files(src: &Path, restored: &Path) {
    for f in FILES {
        assert!(
            std::fs::read(src.join(f)).unwrap() == std::fs::read(restored.join(f)).unwrap(),
            "{f} differs after the restore"
        );
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_repository_in_a_bucket_through_the_library() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(t.path());
    let be: Arc<dyn Backend> = Arc::new(S3Backend::new(&s3.config("site-a/db")).unwrap());
    assert_eq!(
        be.describe(),
        format!("s3:{}/{BUCKET}/site-a/db", s3.endpoint())
    );

    // The backend's contract, on the real server. Another prefix's objects are not ours.
    let b2 = S3Backend::new(&s3.config("site-b")).unwrap();
    b2.write("config", b"site b").unwrap();
    assert!(be.is_empty().unwrap(), "site-b's objects are not site-a's");
    assert!(!b2.is_empty().unwrap());
    be.write("scratch/ab/x", b"hello").unwrap();
    be.write("scratch/y", b"").unwrap();
    assert!(!be.is_empty().unwrap());
    assert_eq!(be.read("scratch/ab/x").unwrap(), b"hello");
    assert_eq!(be.read_range("scratch/ab/x", 1, 3).unwrap(), b"ell");
    let e = be.read_range("scratch/ab/x", 3, 5).unwrap_err().to_string();
    assert!(e.contains("scratch/ab/x"), "past the end: {e}");
    // An object that is not a repository file (a name starting with '.') is not listed.
    std::fs::write(
        s3.root.join(BUCKET).join("site-a/db/scratch/.partial"),
        b"x",
    )
    .unwrap();
    assert_eq!(
        be.list("scratch").unwrap(),
        vec![
            ("scratch/ab/x".to_string(), 5),
            ("scratch/y".to_string(), 0)
        ]
    );
    be.write("scratch/ab/x", b"replaced").unwrap();
    assert_eq!(be.read("scratch/ab/x").unwrap(), b"replaced");
    for _ in 0..2 {
        be.remove("scratch/ab/x").unwrap();
        be.remove("scratch/y").unwrap();
    }
    assert!(be.list("scratch").unwrap().is_empty());
    match be.read("scratch/ab/x") {
        Err(tiandi_backup::BackupError::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
            let m = e.to_string();
            assert!(m.contains(BUCKET) && m.contains(&s3.endpoint()), "{m}");
            assert!(m.contains("site-a/db/scratch/ab/x"), "{m}");
        }
        other => panic!("an absent object: {other:?}"),
    }
    std::fs::remove_file(s3.root.join(BUCKET).join("site-a/db/scratch/.partial")).unwrap();
    assert!(be.is_empty().unwrap());

    // A repository: made, backed up, restored, checked without and with the key.
    let fast = KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    let pass = b"correct horse battery staple";
    let src = source(t.path());
    let mut r = Repo::init_on(be.clone(), "owner", pass, fast, now_ms()).unwrap();
    let s = r
        .backup(
            std::slice::from_ref(&src),
            &BackupOptions::new("site-a", now_ms()),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!((s.files, s.skipped_count), (3, 0), "{s:?}");
    assert!(s.packs_written >= 2, "{s:?}");
    assert!(
        s3.root.join(BUCKET).join("site-a/db/config").is_file(),
        "objects are under the prefix"
    );
    assert!(
        Repo::init_on(be.clone(), "owner", pass, fast, now_ms()).is_err(),
        "a repository is made in an empty place only"
    );

    let r = Repo::open_on(be.clone(), pass).unwrap();
    assert_eq!(r.snapshots().unwrap().len(), 1);
    let out = t.path().join("out");
    let rs = r
        .restore("latest", &out, &RestoreOptions::default())
        .unwrap();
    assert_eq!(rs.files, 3, "{rs:?}");
    same_files(&src, &out.join("province-db"));

    let c = repo::check_packs(&*be).unwrap();
    assert!(c.packs >= 2 && c.damaged.is_empty(), "{c:?}");
    let d = r.check_data(100).unwrap();
    assert!(d.errors.is_empty(), "{d:?}");

    // A wrong secret: the server's refusal names the bucket and endpoint, never the secret.
    let mut wrong = s3.config("site-a/db");
    wrong.secret_access_key = "not-the-secret-0123456789".into();
    let e = S3Backend::new(&wrong)
        .unwrap()
        .read("config")
        .unwrap_err()
        .to_string();
    assert!(e.contains(BUCKET) && e.contains(&s3.endpoint()), "{e}");
    assert!(
        !e.contains("not-the-secret") && !e.contains(&s3.secret),
        "{e}"
    );

    // Refused before anything is sent: plain HTTP off loopback, an empty secret.
    let mut far = s3.config("x");
    far.endpoint = "http://192.0.2.10:9000".into();
    let e = S3Backend::new(&far).err().expect("refused").to_string();
    assert!(e.contains("loopback"), "{e}");
    let mut empty = s3.config("x");
    empty.secret_access_key.clear();
    let e = S3Backend::new(&empty).err().expect("refused").to_string();
    assert!(e.contains("empty"), "{e}");
}

fn secret_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn run(repo: &str, creds: &Path, pw: &Path, args: &[&str]) -> Output {
    Command::new(tiandi_tests::bin("tiandi-backup"))
        .args(["--json", "--repo", repo])
        .arg("--s3-credentials-file")
        .arg(creds)
        .arg("--password-file")
        .arg(pw)
        .args(args)
        .env_remove("TIANDI_BACKUP_REPO")
        .env_remove("TIANDI_BACKUP_PASSWORD_FILE")
        .env_remove("TIANDI_BACKUP_S3_CREDENTIALS_FILE")
        .output()
        .unwrap()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn failed(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_repository_in_a_bucket_from_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(t.path());
    let repo = format!("s3:{}/{BUCKET}/cli/repo", s3.endpoint());
    let creds = t.path().join("s3.toml");
    secret_file(
        &creds,
        &format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            s3.key, s3.secret
        ),
    );
    let pw = t.path().join("pw");
    secret_file(&pw, "correct horse battery staple\n");
    let src = source(t.path());

    let i = json(&run(&repo, &creds, &pw, &["init", "--holder", "ministry"]));
    assert_eq!(i["repository"], repo.as_str());
    let b = json(&run(
        &repo,
        &creds,
        &pw,
        &["backup", src.to_str().unwrap(), "--tag", "nightly"],
    ));
    assert_eq!(b["files"], 3, "{b}");
    assert!(b["packs_written"].as_u64().unwrap() >= 2, "{b}");
    let list = json(&run(&repo, &creds, &pw, &["snapshots"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], b["snapshot"]);
    assert_eq!(list[0]["tags"][0], "nightly");
    let out = t.path().join("out");
    let r = json(&run(
        &repo,
        &creds,
        &pw,
        &["restore", "latest", "--target", out.to_str().unwrap()],
    ));
    assert_eq!(r["files"], 3, "{r}");
    same_files(&src, &out.join("province-db"));
    let c = json(&run(
        &repo,
        &creds,
        &pw,
        &["check", "--read-data-pct", "100"],
    ));
    assert!(c["packs"]["packs"].as_u64().unwrap() >= 2, "{c}");
    assert!(c["packs"]["damaged"].as_array().unwrap().is_empty(), "{c}");
    assert!(c["data"]["errors"].as_array().unwrap().is_empty(), "{c}");
    assert!(
        s3.root.join(BUCKET).join("cli/repo/config").is_file(),
        "objects are under the prefix"
    );

    // Refusals: no credentials file, one others may read, plain HTTP off loopback, a wrong
    // secret (named by bucket and endpoint, the secret itself never printed).
    let o = Command::new(tiandi_tests::bin("tiandi-backup"))
        .args(["--repo", &repo, "--password-file"])
        .arg(&pw)
        .arg("snapshots")
        .env_remove("TIANDI_BACKUP_S3_CREDENTIALS_FILE")
        .output()
        .unwrap();
    assert!(failed(&o).contains("--s3-credentials-file"));
    let open = t.path().join("open.toml");
    std::fs::copy(&creds, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(failed(&run(&repo, &open, &pw, &["snapshots"])).contains("chmod 600"));
    let far = format!("s3:http://192.0.2.10:9000/{BUCKET}/cli/repo");
    assert!(failed(&run(&far, &creds, &pw, &["snapshots"])).contains("loopback"));
    let wrong = t.path().join("wrong.toml");
    secret_file(
        &wrong,
        &format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"not-the-secret-0123\"\n",
            s3.key
        ),
    );
    let e = failed(&run(&repo, &wrong, &pw, &["snapshots"]));
    assert!(e.contains(BUCKET) && e.contains(&s3.endpoint()), "{e}");
    assert!(!e.contains("not-the-secret"), "{e}");
}
