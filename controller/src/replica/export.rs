//! The controller's state as one file: what a standby's snapshot holds (see [`super`]),
//! written every `[replica] export_every_minutes` into `export_dir`, where a backup job of the
//! controller's (`site = "controller"`, `paths = [export_dir]`) takes it into an encrypted
//! repository at a partner; `tiandi-controller state-import --from FILE` reads it back into an
//! empty data directory: disaster recovery without a standby, at the age of the last export.
//!
//! Format: [`MAGIC`], then replication frames ([`super::wire`]): one `Start` (the exporter's
//! epoch), the snapshot's `Item`s, and `SnapEnd` with their count and BLAKE3 digest. The file
//! holds the CA's key: it is written 0600, and belongs in an encrypted repository only.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

use super::wire::{self, Msg};

pub const MAGIC: &[u8] = b"TIANDI-STATE/1\n";
pub const FILE_NAME: &str = "controller-state.tdstate";

#[derive(Debug, Serialize)]
pub struct Exported {
    pub path: PathBuf,
    pub items: u64,
    pub bytes: u64,
    pub epoch: u64,
}

/// Writes the state of `db` (and the replicated files of `data_dir`) to
/// `out_dir/controller-state.tdstate`, atomically (a temporary file, fsync, rename).
pub fn export(
    db: &sled::Db,
    data_dir: &Path,
    config_toml: Vec<u8>,
    epoch: u64,
    out_dir: &Path,
) -> anyhow::Result<Exported> {
    tiandi_link::secrets::private_dir(out_dir)
        .with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join(FILE_NAME);
    let tmp = out_dir.join(format!(".{FILE_NAME}.tmp"));
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?
    };
    let mut w = BufWriter::new(file);
    w.write_all(MAGIC)?;
    w.write_all(&wire::encode(Msg::Start(wire::Start {
        epoch,
        snapshot: true,
        ..Default::default()
    })))?;
    let mut digest = blake3::Hasher::new();
    let (mut items, mut failed) = (0u64, None);
    super::primary::snapshot_items(db, data_dir, config_toml, &mut |item| match item {
        Ok(bytes) => {
            digest.update(&bytes);
            items += 1;
            match w.write_all(&wire::encode(Msg::Item(bytes))) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e.to_string());
                    false
                }
            }
        }
        Err(e) => {
            failed = Some(e);
            false
        }
    });
    if let Some(e) = failed {
        let _ = std::fs::remove_file(&tmp);
        bail!("exporting the controller's state to {}: {e}", tmp.display());
    }
    w.write_all(&wire::encode(Msg::SnapEnd(wire::SnapEnd {
        items,
        digest: digest.finalize().as_bytes().to_vec(),
    })))?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    drop(file);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    std::fs::File::open(out_dir)?.sync_all()?;
    Ok(Exported {
        path,
        items,
        bytes,
        epoch,
    })
}

#[derive(Debug, Serialize)]
pub struct Imported {
    pub items: u64,
    /// The epoch the data directory now has: the exporter's + 1 (it takes over from it).
    pub epoch: u64,
}

/// Reads an export into `data_dir`, which must not hold a controller yet; the result is a
/// data directory a controller starts on, at the exporter's epoch + 1.
pub fn import(file: &Path, data_dir: &Path) -> anyhow::Result<Imported> {
    let db_path = data_dir.join("db");
    if db_path.exists() {
        bail!(
            "{} exists: import only into a data directory that holds no controller",
            db_path.display()
        );
    }
    tiandi_link::secrets::private_dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut r = BufReader::new(f);
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic)
        .with_context(|| format!("{}: too short", file.display()))?;
    if magic != MAGIC {
        bail!("{}: not a Tiandi controller state file", file.display());
    }
    let mut next = || -> anyhow::Result<Msg> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)
            .with_context(|| format!("{}: cut short", file.display()))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > wire::MAX_FRAME {
            bail!("{}: a frame of {len} bytes", file.display());
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .with_context(|| format!("{}: cut short", file.display()))?;
        Ok(wire::decode(&body)?)
    };
    let start = match next()? {
        Msg::Start(s) => s,
        other => bail!(
            "{}: starts with {}, not Start",
            file.display(),
            other.name()
        ),
    };
    let db = sled::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
    let store = crate::store::Store::open(&db, data_dir)?;
    let copy = super::standby::Copy {
        db: &db,
        store: &store,
        dir: data_dir,
    };
    let mut digest = blake3::Hasher::new();
    let mut items = 0u64;
    let result = (|| -> anyhow::Result<()> {
        loop {
            match next()? {
                Msg::Item(bytes) => {
                    digest.update(&bytes);
                    items += 1;
                    super::standby::apply(copy, &bytes, true)
                        .with_context(|| format!("item {items}"))?;
                }
                Msg::SnapEnd(end) => {
                    if end.items != items || end.digest != digest.finalize().as_bytes() {
                        bail!(
                            "{items} items read, {} written, or the digests differ",
                            end.items
                        );
                    }
                    return Ok(());
                }
                other => bail!("unexpected {}", other.name()),
            }
        }
    })();
    if let Err(e) = result {
        drop(store);
        drop(db);
        let _ = std::fs::remove_dir_all(&db_path);
        let _ = std::fs::remove_dir_all(data_dir.join(crate::store::HISTORY_DIR));
        return Err(e.context(format!("{}: not imported", file.display())));
    }
    let epoch = start.epoch.max(1) + 1;
    super::set_epoch(&db, epoch)?;
    store.checkpoint()?;
    db.flush()?;
    Ok(Imported { items, epoch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_rebuilds_the_state_in_an_empty_directory_and_a_damaged_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let db = sled::open(src.join("db")).unwrap();
        db.open_tree("sites")
            .unwrap()
            .insert("bj-001", "rec")
            .unwrap();
        db.open_tree("users")
            .unwrap()
            .insert("admin", "hash")
            .unwrap();
        let report = tiandi_proto::Report {
            seq: 1,
            taken_ms: 1_000,
            ..Default::default()
        };
        {
            // The history is in segments beside the database; its sequence states in sled.
            let store = crate::store::Store::open(&db, &src).unwrap();
            store.ingest("bj-001", &report).unwrap();
            store.checkpoint().unwrap();
        }
        // Not replicated: stays behind.
        db.open_tree("outbox").unwrap().insert("job", "x").unwrap();
        tiandi_link::pki::write_private(&src.join("ca.key"), "KEY").unwrap();
        std::fs::write(src.join("ca.pem"), "CERT").unwrap();
        let out = t.path().join("export");
        let e = export(&db, &src, b"log = \"info\"\n".to_vec(), 3, &out).unwrap();
        assert_eq!(
            e.items,
            4 + 2 + 1,
            "four keys (a site, a user, a report, its sequence state), two files, the configuration"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&e.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "it holds the CA key");

        let dst = t.path().join("dst");
        let i = import(&e.path, &dst).unwrap();
        assert_eq!((i.items, i.epoch), (7, 4));
        assert!(
            import(&e.path, &dst).is_err(),
            "not over a controller's data"
        );
        {
            let db = sled::open(dst.join("db")).unwrap();
            assert_eq!(
                db.open_tree("sites")
                    .unwrap()
                    .get("bj-001")
                    .unwrap()
                    .unwrap(),
                b"rec"
            );
            let store = crate::store::Store::open(&db, &dst).unwrap();
            let h = store.history("bj-001", 0, i64::MAX, 10).unwrap();
            assert_eq!(h, vec![report.clone()]);
            assert_eq!(store.seq_state("bj-001").unwrap().acked_through, 1);
            assert!(db.open_tree("outbox").unwrap().is_empty());
            assert_eq!(crate::replica::epoch(&db).unwrap(), 4);
        }
        assert_eq!(std::fs::read_to_string(dst.join("ca.key")).unwrap(), "KEY");
        let mode = std::fs::metadata(dst.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(dst.join("replica/primary.toml").exists());

        // One byte changed: the digest (or the frame) gives it away, nothing is left behind.
        let mut bytes = std::fs::read(&e.path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x40;
        let bad = t.path().join("bad.tdstate");
        std::fs::write(&bad, &bytes).unwrap();
        let dst2 = t.path().join("dst2");
        assert!(import(&bad, &dst2).is_err());
        assert!(!dst2.join("db").exists());
        bytes.truncate(n - 10);
        std::fs::write(&bad, &bytes).unwrap();
        let err = import(&bad, &dst2).unwrap_err().to_string();
        assert!(err.contains("not imported"), "{err}");
    }
}
