//! `tiandi-backup`: the backup repository from the command line, for people and schedulers.
//!
//! Exit codes: 0 done; 1 failed (nothing was changed that a later run would trip over);
//! 3 done but some paths were left out (listed), or a check or drill found damage.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tiandi_backup::backend::{Backend, Local};
use tiandi_backup::crypto::KdfParams;
use tiandi_backup::policy;
use tiandi_backup::repo::{self, BackupOptions, Progress, PruneOptions, Repo, RestoreOptions};
use tiandi_backup::s3::{self, S3Backend, S3Config};

mod text;

#[derive(Parser)]
#[command(
    name = "tiandi-backup",
    version,
    about = "Deduplicated, encrypted backups that a partner can verify without the key"
)]
struct Cli {
    /// The repository: a directory, or an S3 bucket `s3:https://host[:port]/bucket[/prefix]`
    /// (plain http:// only to a loopback address). A directory named `s3:…` is `./s3:…`.
    #[arg(long, short = 'r', env = "TIANDI_BACKUP_REPO", global = true)]
    repo: Option<PathBuf>,
    /// For an S3 repository: a file (mode 0600) of TOML, `access_key_id = "…"` and
    /// `secret_access_key = "…"`.
    #[arg(long, env = "TIANDI_BACKUP_S3_CREDENTIALS_FILE", global = true)]
    s3_credentials_file: Option<PathBuf>,
    /// A file (mode 0600) holding the passphrase; its first line is used.
    #[arg(long, env = "TIANDI_BACKUP_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// Print results as JSON (one object) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a new repository (in an absent or empty directory) with a first key.
    Init {
        /// Who holds the first key.
        #[arg(long, default_value = "owner")]
        holder: String,
    },
    /// Back up files and directories into a new snapshot.
    Backup {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The host recorded in the snapshot (default: this machine's name).
        #[arg(long)]
        host: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Compare with this snapshot (default: the newest of this host and these paths).
        #[arg(long)]
        parent: Option<String>,
        /// Read every file, even those the parent snapshot has unchanged.
        #[arg(long)]
        force: bool,
        /// Compress-and-seal threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// List the snapshots.
    Snapshots,
    /// List what a snapshot holds (under a path of it).
    Ls {
        snapshot: String,
        #[arg(default_value = "")]
        path: String,
    },
    /// What changed between two snapshots: + added, - removed, M contents, T kind, U metadata.
    Diff { from: String, to: String },
    /// Write one file of a snapshot to standard output.
    Dump { snapshot: String, path: String },
    /// Restore a snapshot (ID, a unique start of one, or `latest`) into a directory; run
    /// again after an interruption, it writes only what is missing.
    Restore {
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
        /// Only this path of the snapshot (`name/inside/it`).
        #[arg(long)]
        path: Option<String>,
        /// Pack readers (default: cores + 1).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check every pack against its name and trailer (needs no passphrase); with
    /// --read-data-pct and the passphrase, also open every blob of that share of the packs.
    Check {
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        read_data_pct: u8,
    },
    /// A restore drill: restore (a sample of) a snapshot into a scratch directory, compare it
    /// with the snapshot, remove it; the result is the evidence.
    Drill {
        #[arg(default_value = "latest")]
        snapshot: String,
        /// A new directory for the restore (removed afterwards).
        #[arg(long)]
        scratch: PathBuf,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        sample_pct: u8,
    },
    /// Remove the snapshots a retention policy does not keep (their data stays until prune).
    Forget {
        #[command(flatten)]
        keep: KeepArgs,
        /// Hours east of UTC for the hourly/daily/… buckets (Beijing: 8).
        #[arg(long, default_value_t = 8, allow_hyphen_values = true)]
        tz_offset_hours: i64,
        /// Say what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give back the space of data no snapshot uses: mark now, delete what an earlier prune
    /// marked more than the grace period ago.
    Prune {
        #[arg(long, default_value_t = 24.0)]
        grace_hours: f64,
        /// Repack packs with less than this share of their bytes in use.
        #[arg(long, default_value_t = 0.5)]
        repack_below: f64,
        #[arg(long)]
        dry_run: bool,
    },
    /// The repository's keys: list, add, remove.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    List,
    /// Add a key for another holder, with its own passphrase file.
    Add {
        #[arg(long)]
        holder: String,
        #[arg(long)]
        new_password_file: PathBuf,
    },
    /// Remove a holder's key (not the one in use, not the last).
    Remove {
        #[arg(long)]
        holder: String,
    },
}

#[derive(clap::Args)]
struct KeepArgs {
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

fn read_secret(f: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let text = tiandi_link::secrets::read_private(f)?
        .with_context(|| format!("{}: no such file", f.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        bail!("{}: the passphrase is empty", f.display());
    }
    Ok(line.as_bytes().to_vec())
}

fn secret(cli: &Cli) -> anyhow::Result<Vec<u8>> {
    let Some(f) = &cli.password_file else {
        bail!(
            "no passphrase: give --password-file (or TIANDI_BACKUP_PASSWORD_FILE), a file of mode 0600"
        );
    };
    read_secret(f)
}

fn dir(cli: &Cli) -> anyhow::Result<&PathBuf> {
    cli.repo
        .as_ref()
        .context("no repository: give --repo (or TIANDI_BACKUP_REPO)")
}

/// Where the repository is: a directory, or an S3 bucket with the credentials file's keys.
fn backend(cli: &Cli) -> anyhow::Result<Arc<dyn Backend>> {
    let repo = dir(cli)?;
    let Some(location) = repo.to_str().filter(|r| r.starts_with("s3:")) else {
        return Ok(Arc::new(Local::new(repo)));
    };
    let Some(f) = &cli.s3_credentials_file else {
        bail!(
            "{location}: no S3 credentials: give --s3-credentials-file (or \
             TIANDI_BACKUP_S3_CREDENTIALS_FILE), a file of mode 0600"
        );
    };
    let text = tiandi_link::secrets::read_private(f)?
        .with_context(|| format!("{}: no such file", f.display()))?;
    let (id, secret) = s3::credentials_from_toml(&text, &f.display().to_string())?;
    Ok(Arc::new(S3Backend::new(&S3Config::from_location(
        location, &id, &secret,
    )?)?))
}

/// The repository, opened with the passphrase.
fn open(cli: &Cli) -> anyhow::Result<Repo> {
    let be = backend(cli)?;
    let what = be.describe();
    Repo::open_on(be, &secret(cli)?).with_context(|| format!("opening {what}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn print<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string(value).expect("results serialise")
        );
    } else {
        println!("{}", text());
    }
}

fn code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Init { holder } => {
            let be = backend(cli)?;
            let what = be.describe();
            Repo::init_on(be, holder, &secret(cli)?, KdfParams::default(), now_ms())
                .with_context(|| format!("making a repository in {what}"))?;
            print(
                cli.json,
                &serde_json::json!({ "repository": what, "holder": holder }),
                || format!("created repository {what} (key holder {holder})"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backup {
            paths,
            host,
            tags,
            parent,
            force,
            threads,
        } => {
            let mut r = open(cli)?;
            let host = match host {
                Some(h) => h.clone(),
                None => std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into()),
            };
            let mut o = BackupOptions::new(&host, now_ms());
            o.tags = tags.clone();
            o.parent = parent.clone();
            o.force = *force;
            if let Some(t) = threads {
                o.threads = (*t).max(1);
            }
            let tty = !cli.json && std::io::stderr().is_terminal();
            let mut report = |p: &Progress| {
                if tty {
                    eprint!("\r{}", text::progress(p));
                }
            };
            let s = r.backup(paths, &o, &mut report).context("backing up")?;
            if tty {
                eprintln!();
            }
            print(cli.json, &s, || text::backup(&s));
            Ok(code(s.skipped_count == 0))
        }
        Cmd::Snapshots => {
            let r = open(cli)?;
            let list: Vec<_> = r
                .snapshots()?
                .into_iter()
                .map(|(id, s)| {
                    serde_json::json!({
                        "id": id, "time_ms": s.time_ms, "host": s.host, "paths": s.paths,
                        "tags": s.tags, "parent": s.parent, "files": s.totals.files,
                        "bytes": s.totals.bytes, "new_bytes": s.totals.new_bytes,
                        "stored_bytes": s.totals.stored_bytes,
                    })
                })
                .collect();
            print(cli.json, &list, || text::snapshots(&list));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls { snapshot, path } => {
            let r = open(cli)?;
            let mut all = Vec::new();
            r.ls(snapshot, path, &mut |e| {
                if cli.json {
                    all.push(e);
                } else {
                    println!("{}", text::ls(&e));
                }
            })?;
            if cli.json {
                print(true, &all, String::new);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Diff { from, to } => {
            let r = open(cli)?;
            let mut all = Vec::new();
            r.diff(from, to, &mut |c| {
                if cli.json {
                    all.push(c);
                } else {
                    println!("{}  {}", c.what, c.path);
                }
            })?;
            if cli.json {
                print(true, &all, String::new);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dump { snapshot, path } => {
            let r = open(cli)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            r.dump(snapshot, path, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            snapshot,
            target,
            path,
            threads,
        } => {
            let r = open(cli)?;
            let mut o = RestoreOptions {
                path: path.clone(),
                ..RestoreOptions::default()
            };
            if let Some(t) = threads {
                o.threads = (*t).max(1);
            }
            let s = r
                .restore(snapshot, target, &o)
                .with_context(|| format!("restoring {snapshot} into {}", target.display()))?;
            print(cli.json, &s, || text::restore(&s, target));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { read_data_pct } => {
            let be = backend(cli)?;
            let s =
                repo::check_packs(&*be).with_context(|| format!("checking {}", be.describe()))?;
            let data = if *read_data_pct > 0 || cli.password_file.is_some() {
                Some(open(cli)?.check_data(*read_data_pct)?)
            } else {
                None
            };
            let ok = s.damaged.is_empty() && data.as_ref().is_none_or(|d| d.errors.is_empty());
            print(
                cli.json,
                &serde_json::json!({ "packs": s, "data": data }),
                || text::check(&s, data.as_ref()),
            );
            Ok(code(ok))
        }
        Cmd::Drill {
            snapshot,
            scratch,
            sample_pct,
        } => {
            let r = open(cli)?;
            let d = r.drill(snapshot, scratch, *sample_pct)?;
            print(cli.json, &d, || text::drill(&d));
            Ok(code(d.mismatches.is_empty()))
        }
        Cmd::Forget {
            keep,
            tz_offset_hours,
            dry_run,
        } => {
            let keep = policy::Keep {
                last: keep.keep_last,
                hourly: keep.keep_hourly,
                daily: keep.keep_daily,
                weekly: keep.keep_weekly,
                monthly: keep.keep_monthly,
                yearly: keep.keep_yearly,
            };
            if keep.is_empty() {
                bail!(
                    "no --keep-* given: forget keeps everything without a policy, so it would do nothing"
                );
            }
            if !(-12..=14).contains(tz_offset_hours) {
                bail!("--tz-offset-hours {tz_offset_hours}: a zone is between -12 and +14");
            }
            let r = open(cli)?;
            let all: Vec<(String, i64)> = r
                .snapshots()?
                .into_iter()
                .map(|(id, s)| (id, s.time_ms))
                .collect();
            let decisions = policy::apply(&all, &keep, tz_offset_hours * 3600);
            if !dry_run {
                for d in decisions.iter().filter(|d| d.reasons.is_empty()) {
                    r.forget(&d.id)
                        .with_context(|| format!("forgetting {}", d.id))?;
                }
            }
            print(cli.json, &decisions, || text::forget(&decisions, *dry_run));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prune {
            grace_hours,
            repack_below,
            dry_run,
        } => {
            if !(0.0..=24.0 * 365.0).contains(grace_hours) {
                bail!("--grace-hours {grace_hours}: between 0 and a year");
            }
            if !(0.0..=1.0).contains(repack_below) {
                bail!("--repack-below {repack_below}: a share between 0 and 1");
            }
            let mut r = open(cli)?;
            let mut o = PruneOptions::new(now_ms());
            o.grace_ms = (grace_hours * 3600e3) as i64;
            o.repack_below = *repack_below;
            o.dry_run = *dry_run;
            let s = r.prune(&o).context("pruning")?;
            print(cli.json, &s, || text::prune(&s));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Key { cmd } => {
            let r = open(cli)?;
            match cmd {
                KeyCmd::List => {
                    let l = r.keys_list(&secret(cli)?)?;
                    print(cli.json, &l, || {
                        l.iter()
                            .map(|k| {
                                format!(
                                    "{}{}  created {}",
                                    if k.current { "* " } else { "  " },
                                    k.holder,
                                    text::time(k.created_ms)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                KeyCmd::Add {
                    holder,
                    new_password_file,
                } => {
                    r.key_add(
                        holder,
                        &read_secret(new_password_file)?,
                        KdfParams::default(),
                        now_ms(),
                    )?;
                    print(cli.json, &serde_json::json!({ "added": holder }), || {
                        format!("added a key for {holder}")
                    });
                }
                KeyCmd::Remove { holder } => {
                    r.key_remove(holder, &secret(cli)?)?;
                    print(cli.json, &serde_json::json!({ "removed": holder }), || {
                        format!("removed {holder}'s key")
                    });
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tiandi-backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}
