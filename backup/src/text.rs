//! How `tiandi-backup` prints results for people (`--json` prints the structures themselves).

use std::path::Path;

use tiandi_backup::policy::Decision;
use tiandi_backup::repo::{
    BackupSummary, CheckSummary, DataCheck, DrillSummary, LsEntry, Progress, PruneSummary,
    RestoreSummary,
};

const MIB: f64 = 1024.0 * 1024.0;

/// A time in UTC, to the second.
pub fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB)
}

/// One progress line: done, rate, ETA once the scan has the total.
pub fn progress(p: &Progress) -> String {
    let rate = if p.elapsed_ms > 0 {
        p.bytes as f64 / MIB / (p.elapsed_ms as f64 / 1000.0)
    } else {
        0.0
    };
    let total = if p.total_bytes > 0 {
        format!(" of {} ({} files)", mib(p.total_bytes), p.total_files)
    } else {
        String::new()
    };
    let eta = p
        .eta_s()
        .map(|s| format!(", ETA {}:{:02}", s / 60, s % 60))
        .unwrap_or_default();
    format!(
        "{} files, {}{total} at {rate:.1} MiB/s, {} new{eta}    ",
        p.files,
        mib(p.bytes),
        mib(p.new_bytes)
    )
}

pub fn backup(s: &BackupSummary) -> String {
    let mut t = format!(
        "snapshot {} saved: {} files ({} unchanged), {} directories, {}; new {} stored as {} in {} packs, {:.1} s",
        s.snapshot,
        s.files,
        s.unchanged_files,
        s.dirs,
        mib(s.bytes),
        mib(s.new_bytes),
        mib(s.stored_bytes),
        s.packs_written,
        s.duration_ms as f64 / 1000.0
    );
    for k in &s.skipped {
        t.push_str(&format!("\nleft out: {k}"));
    }
    if s.skipped_count > s.skipped.len() as u64 {
        t.push_str(&format!(
            "\n… and {} more left out",
            s.skipped_count - s.skipped.len() as u64
        ));
    }
    t
}

pub fn snapshots(list: &[serde_json::Value]) -> String {
    list.iter()
        .map(|s| {
            format!(
                "{}  {}  {}  {}  {}",
                s["id"].as_str().unwrap_or_default(),
                time(s["time_ms"].as_i64().unwrap_or_default()),
                s["host"].as_str().unwrap_or_default(),
                s["paths"],
                mib(s["bytes"].as_u64().unwrap_or_default())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn ls(e: &LsEntry) -> String {
    let kind = match e.kind {
        tiandi_backup::repo::Kind::Dir => 'd',
        tiandi_backup::repo::Kind::File => '-',
        tiandi_backup::repo::Kind::Symlink => 'l',
    };
    let link = e
        .target
        .as_deref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{kind}{:04o} {:>5} {:>5} {:>12} {}  {}{link}",
        e.mode,
        e.uid,
        e.gid,
        e.size,
        time(e.mtime_s * 1000),
        e.path
    )
}

pub fn restore(s: &RestoreSummary, target: &Path) -> String {
    format!(
        "restored {} files ({} already there), {} directories, {} links, {} hard links, {} into {} in {:.1} s",
        s.files,
        s.already_there,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        mib(s.bytes),
        target.display(),
        s.duration_ms as f64 / 1000.0
    )
}

pub fn check(s: &CheckSummary, data: Option<&DataCheck>) -> String {
    let mut t = format!(
        "{} packs, {} blobs, {} checked against their names and trailers",
        s.packs,
        s.blobs,
        mib(s.bytes)
    );
    for d in &s.damaged {
        t.push_str(&format!("\ndamaged: {d}"));
    }
    if let Some(d) = data {
        t.push_str(&format!(
            "\n{} snapshots, {} trees, {} chunks named; {} packs read, {} blobs opened",
            d.snapshots, d.trees, d.chunks_named, d.packs_read, d.blobs_opened
        ));
        for e in &d.errors {
            t.push_str(&format!("\nerror: {e}"));
        }
    }
    t
}

pub fn drill(d: &DrillSummary) -> String {
    let mut t = format!(
        "drill of {} ({} % of files): {} files, {} restored in {:.1} s and compared in {:.1} s: {}",
        d.snapshot,
        d.sample_pct,
        d.files,
        mib(d.bytes),
        d.restore_ms as f64 / 1000.0,
        d.compare_ms as f64 / 1000.0,
        if d.mismatches.is_empty() {
            "all equal"
        } else {
            "MISMATCHES"
        }
    );
    for m in &d.mismatches {
        t.push_str(&format!("\nmismatch: {m}"));
    }
    t
}

pub fn forget(decisions: &[Decision], dry_run: bool) -> String {
    decisions
        .iter()
        .map(|d| match d.reasons.is_empty() {
            true if dry_run => format!("{}  would go", d.id),
            true => format!("{}  removed", d.id),
            false => format!("{}  kept ({})", d.id, d.reasons.join(", ")),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn prune(s: &PruneSummary) -> String {
    format!(
        "{} snapshots use {} blobs in {} packs; marked {} packs ({}, {} repacked); deleted {} packs ({}) marked earlier, kept {} a newer snapshot uses; {} packs wait for their grace period",
        s.snapshots,
        s.used_blobs,
        s.packs,
        s.marked_packs,
        mib(s.marked_bytes),
        s.repacked_packs,
        s.deleted_packs,
        mib(s.deleted_bytes),
        s.rescued_packs,
        s.waiting_packs
    )
}
