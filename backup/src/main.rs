//! `tiandi-backup`: the backup repository from the command line, for people and schedulers.
//!
//! Exit codes: 0 done; 1 failed (nothing was changed that a later run would trip over);
//! 3 done but some paths were left out (listed), or a check found damaged packs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tiandi_backup::crypto::KdfParams;
use tiandi_backup::policy;
use tiandi_backup::repo::{self, Repo};

#[derive(Parser)]
#[command(
    name = "tiandi-backup",
    version,
    about = "Deduplicated, encrypted backups that a partner can verify without the key"
)]
struct Cli {
    /// The repository (a directory).
    #[arg(long, short = 'r', env = "TIANDI_BACKUP_REPO")]
    repo: PathBuf,
    /// A file (mode 0600) holding the passphrase; its first line is used.
    #[arg(long, env = "TIANDI_BACKUP_PASSWORD_FILE")]
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
    },
    /// List the snapshots.
    Snapshots,
    /// Restore a snapshot into a directory.
    Restore {
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// Check every pack against its name and trailer (needs no passphrase).
    Check,
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

fn secret(cli: &Cli) -> anyhow::Result<Vec<u8>> {
    let Some(f) = &cli.password_file else {
        bail!(
            "no passphrase: give --password-file (or TIANDI_BACKUP_PASSWORD_FILE), a file of mode 0600"
        );
    };
    let text = tiandi_link::secrets::read_private(f)?
        .with_context(|| format!("{}: no such file", f.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        bail!("{}: the passphrase is empty", f.display());
    }
    Ok(line.as_bytes().to_vec())
}

/// The repository, opened with the passphrase.
fn open(cli: &Cli) -> anyhow::Result<Repo> {
    Repo::open(&cli.repo, &secret(cli)?).with_context(|| format!("opening {}", cli.repo.display()))
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

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let dir = &cli.repo;
    match &cli.cmd {
        Cmd::Init { holder } => {
            Repo::init(dir, holder, &secret(cli)?, KdfParams::default(), now_ms())
                .with_context(|| format!("making a repository in {}", dir.display()))?;
            print(
                cli.json,
                &serde_json::json!({ "repository": dir, "holder": holder }),
                || format!("created repository {} (key holder {holder})", dir.display()),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backup { paths, host, tags } => {
            let mut r = open(cli)?;
            let host = match host {
                Some(h) => h.clone(),
                None => std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into()),
            };
            let s = r
                .backup(paths, &host, tags, now_ms())
                .context("backing up")?;
            print(cli.json, &s, || {
                let mut t = format!(
                    "snapshot {} saved: {} files, {} directories, {} bytes; new: {} chunks, {} bytes in {} packs",
                    s.snapshot,
                    s.files,
                    s.dirs,
                    s.bytes,
                    s.new_chunks,
                    s.new_bytes,
                    s.packs_written
                );
                for k in &s.skipped {
                    t.push_str(&format!("\nleft out: {k}"));
                }
                t
            });
            Ok(if s.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Snapshots => {
            let r = open(cli)?;
            let list: Vec<_> = r
                .snapshots()?
                .into_iter()
                .map(|(id, s)| {
                    serde_json::json!({
                        "id": id, "time_ms": s.time_ms, "host": s.host, "paths": s.paths,
                        "tags": s.tags, "nodes": s.nodes.len(),
                        "bytes": s.nodes.iter().map(|n| n.size).sum::<u64>(),
                    })
                })
                .collect();
            print(cli.json, &list, || {
                list.iter()
                    .map(|s| {
                        format!(
                            "{}  {}  {}  {}  {} bytes",
                            s["id"].as_str().unwrap_or_default(),
                            s["time_ms"],
                            s["host"].as_str().unwrap_or_default(),
                            s["paths"],
                            s["bytes"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore { snapshot, target } => {
            let r = open(cli)?;
            let s = r
                .restore(snapshot, target)
                .with_context(|| format!("restoring {snapshot} into {}", target.display()))?;
            print(cli.json, &s, || {
                format!(
                    "restored {} files, {} directories, {} links, {} bytes into {}",
                    s.files,
                    s.dirs,
                    s.symlinks,
                    s.bytes,
                    target.display()
                )
            });
            Ok(ExitCode::SUCCESS)
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
            print(cli.json, &decisions, || {
                decisions
                    .iter()
                    .map(|d| match d.reasons.is_empty() {
                        true if *dry_run => format!("{}  would go", d.id),
                        true => format!("{}  removed", d.id),
                        false => format!("{}  kept ({})", d.id, d.reasons.join(", ")),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check => {
            let s =
                repo::check_packs(dir).with_context(|| format!("checking {}", dir.display()))?;
            print(cli.json, &s, || {
                let mut t = format!(
                    "{} packs, {} blobs, {} bytes checked",
                    s.packs, s.blobs, s.bytes
                );
                for d in &s.damaged {
                    t.push_str(&format!("\ndamaged: {d}"));
                }
                t
            });
            Ok(if s.damaged.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
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
