//! `backup`: the release `tiandi-backup` against restic (`/usr/bin/restic`, repository version 2,
//! compression `auto`) on the same data, each run a child process of its own.
//!
//! The corpus, kept in the work directory between runs (`corpus/`, made only when missing):
//! `src/`, the source trees of every crate the workspace depends on (`cargo vendor --locked
//! --versioned-dirs`), and `db/data.db`, `--db-mib` MiB of database-like 4 KiB pages (`StdRng`
//! seed 17: a header with the page number, rows of ids, integers, timestamps and words, a zeroed
//! tail of a tenth to two thirds of the page). Each run copies it to `data/` (version 1), then
//! edits it in place for each further version `v` (`StdRng` seed `1000 + v`): byte ranges
//! inserted and removed in 2 % of the source files, 1 % removed, 1 % new text files of sizes
//! like the others, 1 % of the database's pages rewritten.
//!
//! Both repositories start empty. Each version is read once (hashed, which also warms the page
//! cache for both tools), then backed up by each tool, Tiandi first on odd versions and restic
//! first on even ones. Each tool then restores its last snapshot into an empty directory, and
//! the bench compares it with `data/` (every path, kind, link target and file's BLAKE3).
//!
//! Measured per tool: wall-clock time of each run (spawn to exit), peak RSS (the child's VmHWM
//! polled every 20 ms), the repository's size (its files' bytes). Summary: `data_mb` (version 1,
//! MB), then Tiandi ÷ restic for the first backup, the mean incremental backup, the restore, the
//! repository after all versions, and the largest peak RSS of any run (`init` included).
//! `geo_utilisation` and `resent_after_cut_kb`: the last version's incremental (the files the
//! last Tiandi backup added to its repository) shipped to a partner over an emulated GEO link,
//! clean and with a cut (`backupgeo.rs`; root, for the namespaces; `--no-geo` leaves it out and
//! prints `na`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work directory: the cached corpus, the working copy, both repositories.
    #[arg(long, default_value = "target/bench-backup")]
    pub work: PathBuf,
    /// Size of the database-like file (MiB).
    #[arg(long, default_value_t = 1024)]
    pub db_mib: u64,
    /// Versions backed up: the corpus, then one edit after another.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..))]
    pub versions: u32,
    /// Leave out the satellite part (it needs root).
    #[arg(long)]
    pub no_geo: bool,
    /// Only the satellite part, on the incremental a full run left in `geo-stage/` (for
    /// working on the transfer engine; prints the satellite figures only).
    #[arg(long)]
    pub geo_only: bool,
    /// The emulated link of the satellite part: rate (Mbit/s), round trip (ms), loss each way
    /// (%), and how long it is cut in the second run (s).
    #[arg(long, default_value_t = 20.0)]
    pub geo_rate_mbit: f64,
    #[arg(long, default_value_t = 600.0)]
    pub geo_rtt_ms: f64,
    #[arg(long, default_value_t = 1.0)]
    pub geo_loss_pct: f64,
    #[arg(long, default_value_t = 60.0)]
    pub geo_cut_s: f64,
}

const PAGE: usize = 4096;
const MB: f64 = 1e6;
const RESTIC: &str = "/usr/bin/restic";
const PASSWORD: &str = "tiandi bench backup passphrase";
/// Words for the database's rows and the text of edits and new files.
const WORDS: &[&str] = &[
    "let", "mut", "fn", "self", "return", "match", "impl", "struct", "value", "buffer", "length",
    "offset", "error", "result", "config", "stream", "packet", "header", "index", "count",
    "beijing", "shanghai", "chengdu", "lhasa", "urumqi", "station", "modem", "antenna", "status",
    "online", "offline", "pending", "customer", "order", "invoice", "amount", "north", "south",
    "quantity",
];

/// One run of a tool: wall-clock seconds, peak RSS (MB), what it printed.
struct Run {
    secs: f64,
    rss_mb: f64,
    out: String,
}

/// A tool under test on its repository in the work directory, and its figures so far.
#[derive(Default)]
struct Tool {
    name: &'static str,
    exe: PathBuf,
    work: PathBuf,
    /// The seconds of each backup, version by version.
    backups: Vec<f64>,
    restore: f64,
    repo_bytes: u64,
    /// The largest peak RSS of any of its runs.
    rss_mb: f64,
    last_snapshot: String,
}

impl Tool {
    fn new(name: &'static str, exe: PathBuf, work: &Path) -> Tool {
        let work = work.to_path_buf();
        Tool {
            name,
            exe,
            work,
            ..Tool::default()
        }
    }

    fn repo(&self) -> PathBuf {
        self.work.join(format!("{}-repo", self.name))
    }

    /// Subcommand `sub` of the tool on its repository, printing JSON; its arguments to follow.
    fn cmd(&self, sub: &str) -> Command {
        let mut c = Command::new(&self.exe);
        if self.name == "tiandi" {
            c.arg("--repo").arg(self.repo()).arg("--password-file");
            c.arg(self.work.join("password"));
        } else {
            c.arg("-r").arg(self.repo()).arg("--cache-dir");
            c.arg(self.work.join("restic-cache"));
        }
        c.args(["--json", sub]).env("RESTIC_PASSWORD", PASSWORD);
        c
    }

    /// A new repository: restic's with format version 2 (compressed), as Tiandi's.
    fn init(&mut self) -> anyhow::Result<()> {
        let mut c = self.cmd("init");
        if self.name == "restic" {
            c.args(["--repository-version", "2"]);
        }
        self.run("init", c).map(drop)
    }

    /// Runs `c` to its end, as `what`; counts its peak RSS.
    fn run(&mut self, what: &str, c: Command) -> anyhow::Result<Run> {
        let r = timed(c, &format!("{}-{what}", self.name), &self.work.join("logs"))?;
        self.rss_mb = self.rss_mb.max(r.rss_mb);
        Ok(r)
    }

    /// Backs up `data` as version `v`.
    fn backup(&mut self, data: &Path, v: u32) -> anyhow::Result<()> {
        let mut c = self.cmd("backup");
        c.arg(data);
        let r = self.run(&format!("backup-{v}"), c)?;
        // Tiandi prints one object, restic one per status line and its summary last.
        self.last_snapshot = (r.out.lines().rev())
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|j| Some(j["snapshot"].as_str().or(j["snapshot_id"].as_str())?.into()))
            .with_context(|| format!("no snapshot in {}'s output: {}", self.name, r.out))?;
        eprintln!("  {} {}: {:.2} s", self.name, self.last_snapshot, r.secs);
        self.backups.push(r.secs);
        Ok(())
    }

    /// Fails unless the repository lists `n` snapshots.
    fn expect_snapshots(&mut self, n: usize) -> anyhow::Result<()> {
        let out = self.run("snapshots", self.cmd("snapshots"))?.out;
        let list: Value = serde_json::from_str(&out).context("snapshots: not JSON")?;
        if list.as_array().map(Vec::len) != Some(n) {
            bail!("{} lists {list}, not {n} snapshots", self.name);
        }
        Ok(())
    }

    /// Restores the last snapshot into an empty directory, checks it against `want` (what
    /// `data` holds), then removes it.
    fn restore(&mut self, data: &Path, want: &Tree) -> anyhow::Result<()> {
        let target = self.work.join(format!("restore-{}", self.name));
        let mut c = self.cmd("restore");
        c.arg(&self.last_snapshot).arg("--target").arg(&target);
        self.restore = self.run("restore", c)?.secs;
        compare(want, &tree(&restored_root(&target, data)?)?, self.name)?;
        remove_dir(&target)
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let bins = crate::ingest::release_binaries(&["tiandi-backup"])?;
    let tiandi = bins.first().context("no tiandi-backup binary")?.clone();
    if !Path::new(RESTIC).exists() {
        bail!("{RESTIC} not found: install restic (`apt-get install restic`)");
    }
    let work = a.work.clone();
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = work.canonicalize()?;
    if a.geo_only {
        let stage = work.join("geo-stage");
        if crate::backupgeo::list(&stage)?.is_empty() {
            bail!("{} is empty: run the whole bench once", stage.display());
        }
        let g = geo_run(&a, &work, &stage)?;
        println!(
            "backup geo_utilisation={:.3} resent_after_cut_kb={:.0}",
            g.utilisation, g.resent_kb
        );
        return Ok(());
    }
    let corpus = corpus(&work, a.db_mib)?;

    let fresh = [
        "data",
        "logs",
        "tiandi-repo",
        "restic-repo",
        "restic-cache",
        "geo-stage",
    ];
    let restores = ["restore-tiandi", "restore-restic"];
    for d in fresh.iter().chain(&restores) {
        remove_dir(&work.join(d))?;
    }
    fs::create_dir_all(work.join("logs"))?;
    let data = work.join("data");
    eprintln!("copying the corpus to {}...", data.display());
    copy_tree(&corpus, &data)?;
    let pw = work.join("password");
    fs::write(&pw, format!("{PASSWORD}\n")).context("writing the password file")?;
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600))?;

    let mut tools = [
        Tool::new("tiandi", tiandi, &work),
        Tool::new("restic", RESTIC.into(), &work),
    ];
    for t in &mut tools {
        t.init()?;
    }
    // Tiandi (0) and restic in turn: Tiandi first on odd versions.
    let turns = |v: u32| if v % 2 == 1 { [0, 1] } else { [1, 0] };
    let mut first_bytes = 0;
    let mut want = Tree::default();
    let mut before_last = Vec::new();
    for v in 1..=a.versions {
        if v > 1 {
            let [e, r, ad, p] = edit_version(&data, v)?;
            eprintln!(
                "version {v}: {e} files edited, {r} removed, {ad} added, {p} pages rewritten"
            );
        }
        want = tree(&data)?;
        if v == 1 {
            first_bytes = want.bytes;
        }
        if v == a.versions {
            before_last = crate::backupgeo::list(&tools[0].repo())?;
        }
        for i in turns(v) {
            tools[i].backup(&data, v)?;
        }
        let [t, r] = [0, 1].map(|i| tools[i].backups[v as usize - 1]);
        let (n, mb) = (want.files, want.bytes as f64 / MB);
        eprintln!("version {v}: {n} files, {mb:.1} MB; tiandi {t:.2} s, restic {r:.2} s");
    }
    for i in turns(a.versions + 1) {
        tools[i].expect_snapshots(a.versions as usize)?;
        tools[i].restore(&data, &want)?;
        tools[i].repo_bytes = tree(&tools[i].repo())?.bytes;
    }
    eprintln!("both restores equal the data");

    let [td, rs] = &tools;
    let incr = |t: &Tool| t.backups[1..].iter().sum::<f64>() / (t.backups.len() - 1) as f64;
    let mb = |b: u64| b as f64 / MB;
    let figures = [
        ("first backup (s)", td.backups[0], rs.backups[0]),
        ("incremental, mean (s)", incr(td), incr(rs)),
        ("restore (s)", td.restore, rs.restore),
        ("repository (MB)", mb(td.repo_bytes), mb(rs.repo_bytes)),
        ("peak RSS (MB)", td.rss_mb, rs.rss_mb),
    ];
    eprintln!("{:<24}{:>10}{:>10}", "", "tiandi", "restic");
    for (what, t, r) in figures {
        eprintln!("{what:<24}{t:>10.2}{r:>10.2}");
    }
    let [f, i, r, s, m] = figures.map(|(_, t, r)| format!("{:.3}", t / r));
    let (geo_u, geo_k) = if a.no_geo {
        ("na".to_string(), "na".to_string())
    } else {
        let g = geo_incremental(&a, &work, &tools[0].repo(), &before_last)?;
        (
            format!("{:.3}", g.utilisation),
            format!("{:.0}", g.resent_kb),
        )
    };
    println!(
        "backup data_mb={:.1} first_ratio={f} incr_ratio={i} restore_ratio={r} size_ratio={s} rss_ratio={m} geo_utilisation={geo_u} resent_after_cut_kb={geo_k}",
        first_bytes as f64 / MB
    );
    Ok(())
}

/// The last incremental's new repository files, hard-linked into `geo-stage/` in their places,
/// shipped over the emulated link; the run with the cut (the clean one is printed).
fn geo_incremental(
    a: &Args,
    work: &Path,
    repo: &Path,
    before: &[(String, u64)],
) -> anyhow::Result<crate::backupgeo::GeoRun> {
    let stage = work.join("geo-stage");
    remove_dir(&stage)?;
    let old: BTreeSet<&String> = before.iter().map(|(p, _)| p).collect();
    let mut n = (0, 0);
    for (p, size) in crate::backupgeo::list(repo)? {
        if old.contains(&p) {
            continue;
        }
        let to = stage.join(&p);
        fs::create_dir_all(to.parent().context("a repository path has a parent")?)?;
        fs::hard_link(repo.join(&p), &to).with_context(|| format!("linking {p}"))?;
        n = (n.0 + 1, n.1 + size);
    }
    eprintln!(
        "satellite part: the last incremental's {} new repository files, {:.1} MB, to a partner over {} Mbit/s, {} ms, {} % loss",
        n.0,
        n.1 as f64 / MB,
        a.geo_rate_mbit,
        a.geo_rtt_ms,
        a.geo_loss_pct
    );
    geo_run(a, work, &stage)
}

fn geo_run(a: &Args, work: &Path, stage: &Path) -> anyhow::Result<crate::backupgeo::GeoRun> {
    let g = crate::backupgeo::Geo {
        rate_mbit: a.geo_rate_mbit,
        rtt_ms: a.geo_rtt_ms,
        loss_pct: a.geo_loss_pct,
        cut: Duration::from_secs_f64(a.geo_cut_s),
        time_limit: Duration::from_secs(1800),
    };
    let (clean, cut) = crate::backupgeo::run(&g, stage, work)?;
    eprintln!(
        "satellite part: clean {:.1} s, utilisation {:.3}; with a {} s cut {:.1} s, utilisation {:.3} (cut excluded), {:.0} kB sent again",
        clean.secs, clean.utilisation, a.geo_cut_s, cut.secs, cut.utilisation, cut.resent_kb
    );
    Ok(cut)
}

pub(crate) fn remove_dir(d: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", d.display()))
        }
        _ => Ok(()),
    }
}

/// Runs `cmd` to its end, stdout and stderr to `logs/NAME.out` and `.err`; its wall-clock time
/// and peak RSS (VmHWM, polled every 20 ms once the child runs the program). Fails if it fails.
fn timed(mut cmd: Command, name: &str, logs: &Path) -> anyhow::Result<Run> {
    let log = |ext: &str| logs.join(format!("{name}.{ext}"));
    let exe = fs::canonicalize(cmd.get_program()).with_context(|| format!("{name}: no program"))?;
    cmd.stdin(Stdio::null());
    cmd.stdout(fs::File::create(log("out"))?);
    cmd.stderr(fs::File::create(log("err"))?);
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let (pid, stop) = (child.id(), Arc::new(AtomicBool::new(false)));
    let stopped = stop.clone();
    let sampler = std::thread::spawn(move || {
        // Until the exec, the child's /proc entry shows the bench's own memory.
        let (mut running, mut peak) = (false, 0.0f64);
        while !stopped.load(Ordering::Acquire) {
            running = running || fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe);
            if running {
                peak = peak.max(vm_hwm_mb(pid));
            }
            std::thread::sleep(Duration::from_millis(if running { 20 } else { 1 }));
        }
        peak
    });
    let status = child.wait();
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let rss_mb = sampler
        .join()
        .map_err(|_| anyhow!("{name}: the sampler panicked"))?;
    let status = status.with_context(|| format!("waiting for {name}"))?;
    if !status.success() {
        let err = fs::read_to_string(log("err")).unwrap_or_default();
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        bail!("{name} failed ({status}); its stderr ends:\n{tail}");
    }
    let out = fs::read_to_string(log("out")).with_context(|| format!("reading {name}'s output"))?;
    Ok(Run { secs, rss_mb, out })
}

/// A process's peak RSS so far (MB), 0 if it is gone.
fn vm_hwm_mb(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB"));
    kb.and_then(|kb| kb.trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0 / MB)
}

/// The corpus directory (`src/`, `db/data.db`), made where missing.
fn corpus(work: &Path, db_mib: u64) -> anyhow::Result<PathBuf> {
    let dir = work.join("corpus");
    let src = dir.join("src");
    if !src.exists() {
        vendor(&src)?;
    }
    let db = dir.join("db").join("data.db");
    if fs::metadata(&db).map(|m| m.len()).ok() != Some(db_mib << 20) {
        eprintln!("writing the {db_mib} MiB database file...");
        write_db(&db, db_mib)?;
    }
    let (t, db_mb) = (tree(&src)?, (db_mib << 20) as f64 / MB);
    let mb = t.bytes as f64 / MB;
    eprintln!(
        "corpus: {} vendored files, {mb:.1} MB; database {db_mb:.1} MB",
        t.files
    );
    Ok(dir)
}

/// `cargo vendor --locked --versioned-dirs` of the workspace into `src` (through `src.tmp`, so
/// an interrupted run leaves no half corpus).
fn vendor(src: &Path) -> anyhow::Result<()> {
    let tmp = src.with_extension("tmp");
    remove_dir(&tmp)?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    eprintln!("cargo vendor into {}...", src.display());
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // As in `release_binaries`: the variables `cargo run` gave the bench stay with it.
    let ours = ["PKG_", "MANIFEST_", "CRATE_", "BIN_", "PRIMARY_"];
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if ours.iter().any(|p| name.starts_with(&format!("CARGO_{p}"))) {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(root).stdin(Stdio::null());
    cmd.args(["vendor", "--locked", "--versioned-dirs"])
        .arg(&tmp);
    let out = cmd.output().context("running cargo vendor")?;
    if !out.status.success() {
        bail!("cargo vendor: {}", String::from_utf8_lossy(&out.stderr));
    }
    fs::rename(&tmp, src).with_context(|| format!("renaming {}", tmp.display()))
}

/// Writes `mib` MiB of database pages (`StdRng` seed 17) to `path` (through `path.tmp`).
fn write_db(path: &Path, mib: u64) -> anyhow::Result<()> {
    fs::create_dir_all(path.parent().context("database path")?)?;
    let tmp = path.with_extension("tmp");
    let mut rng = StdRng::seed_from_u64(17);
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
    for no in 0..(mib << 20) / PAGE as u64 {
        w.write_all(&db_page(&mut rng, no))?;
    }
    w.flush().context("writing the database")?;
    drop(w);
    fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

/// One page: magic, page number, a random LSN, row count and end of rows (24 bytes); rows (id,
/// a small integer, a timestamp, a few words after their length) up to a third to nine tenths
/// of the page, zeros after.
fn db_page(rng: &mut StdRng, no: u64) -> Vec<u8> {
    let used = rng.random_range(PAGE / 3..PAGE * 9 / 10);
    let mut p = Vec::with_capacity(PAGE);
    p.extend(*b"TDB1");
    p.extend(no.to_le_bytes());
    p.extend(rng.random::<u64>().to_le_bytes());
    p.extend([0; 4]);
    let mut rows: u16 = 0;
    // A row is at most 21 + 5 * 9 bytes (the longest word has 8).
    while p.len() + 80 < used {
        p.extend((no * 256 + u64::from(rows)).to_le_bytes());
        p.extend(rng.random_range(0u32..100_000).to_le_bytes());
        p.extend(
            rng.random_range(1_600_000_000u64..1_800_000_000)
                .to_le_bytes(),
        );
        let words: Vec<u8> = (0..rng.random_range(1..=5))
            .flat_map(|_| [word(rng), b" "].concat())
            .collect();
        p.push(words.len() as u8);
        p.extend(words);
        rows += 1;
    }
    let end = p.len() as u16;
    p[20..22].copy_from_slice(&rows.to_le_bytes());
    p[22..24].copy_from_slice(&end.to_le_bytes());
    p.resize(PAGE, 0);
    p
}

fn word(rng: &mut StdRng) -> &'static [u8] {
    WORDS[rng.random_range(0..WORDS.len())].as_bytes()
}

/// `len` bytes of source-like text: indented lines of words and numbers.
fn text(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    while out.len() < len {
        out.resize(out.len() + 4 * rng.random_range(0..4), b' ');
        for _ in 0..rng.random_range(2..10) {
            match rng.random_bool(0.2) {
                true => out.extend(rng.random_range(0..10_000u32).to_string().bytes()),
                false => out.extend(word(rng)),
            }
            out.push(b' ');
        }
        out.extend(b";\n");
    }
    out.truncate(len);
    out
}

/// Makes version `v` of `data` in place (`StdRng` seed 1000 + v); how many files were edited,
/// removed, added, and how many pages rewritten.
fn edit_version(data: &Path, v: u32) -> anyhow::Result<[usize; 4]> {
    let mut rng = StdRng::seed_from_u64(1000 + u64::from(v));
    let files: Vec<(PathBuf, u64)> = tree(&data.join("src"))?
        .sizes
        .into_iter()
        .map(|(p, s)| (data.join("src").join(p), s))
        .collect();
    let n = files.len();
    let share = |pct: usize| (n * pct / 100).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let (edit, rest) = order.split_at(share(2).min(n));
    let (remove, keep) = rest.split_at(share(1).min(rest.len()));
    for &i in edit {
        let path = &files[i].0;
        let mut b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for _ in 0..rng.random_range(1..=4) {
            if !b.is_empty() && rng.random_bool(0.5) {
                let at = rng.random_range(0..b.len());
                let cut = rng.random_range(1..=256.min(b.len() - at));
                b.drain(at..at + cut);
            } else {
                let at = rng.random_range(0..=b.len());
                let len = rng.random_range(1..=256);
                b.splice(at..at, text(&mut rng, len));
            }
        }
        fs::write(path, b).with_context(|| format!("editing {}", path.display()))?;
    }
    for path in remove.iter().map(|&i| &files[i].0) {
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let added = share(1);
    for k in 0..added {
        let (model, size) = &files[*keep.choose(&mut rng).context("no file left")?];
        let len = ((*size as f64 * rng.random_range(0.5..1.5)) as usize).max(16);
        let path = model.with_file_name(format!("bench_added_v{v}_{k}.rs"));
        let new = text(&mut rng, len);
        fs::write(&path, new).with_context(|| format!("adding {}", path.display()))?;
    }
    let db_path = data.join("db").join("data.db");
    let db = fs::OpenOptions::new()
        .write(true)
        .open(&db_path)
        .with_context(|| format!("opening {}", db_path.display()))?;
    let pages = db.metadata()?.len() as usize / PAGE;
    let rewrite = (pages / 100).max(1).min(pages);
    for no in rand::seq::index::sample(&mut rng, pages, rewrite) {
        db.write_all_at(&db_page(&mut rng, no as u64), (no * PAGE) as u64)
            .with_context(|| format!("rewriting page {no} of {}", db_path.display()))?;
    }
    Ok([edit.len(), remove.len(), added, rewrite])
}

/// Calls `f` on every entry under `root` (not following links), parents before children, in
/// name order.
fn walk(
    root: &Path,
    f: &mut dyn FnMut(&Path, fs::FileType) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut entries = fs::read_dir(root)
        .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
        .with_context(|| format!("listing {}", root.display()))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for e in entries {
        let (path, ft) = (e.path(), e.file_type()?);
        f(&path, ft)?;
        if ft.is_dir() {
            walk(&path, f)?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    walk(from, &mut |p, ft| {
        let dest = to.join(p.strip_prefix(from)?);
        if ft.is_dir() {
            fs::create_dir(&dest)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(p)?, &dest)?;
        } else {
            fs::copy(p, &dest).with_context(|| format!("copying {}", p.display()))?;
        }
        Ok(())
    })
}

#[derive(Debug, PartialEq)]
enum Entry {
    Dir,
    File(blake3::Hash),
    Link(PathBuf),
}

/// What a directory holds, by path relative to it.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
    sizes: BTreeMap<PathBuf, u64>,
    files: usize,
    bytes: u64,
}

/// Reads every file under `root` (hashing it, which also brings it into the page cache).
fn tree(root: &Path) -> anyhow::Result<Tree> {
    let mut t = Tree::default();
    walk(root, &mut |p, ft| {
        let rel = p.strip_prefix(root)?.to_path_buf();
        let e = if ft.is_dir() {
            Entry::Dir
        } else if ft.is_symlink() {
            Entry::Link(fs::read_link(p)?)
        } else {
            let mut h = blake3::Hasher::new();
            let mut f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let n = std::io::copy(&mut f, &mut h)
                .with_context(|| format!("reading {}", p.display()))?;
            t.files += 1;
            t.bytes += n;
            t.sizes.insert(rel.clone(), n);
            Entry::File(h.finalize())
        };
        t.entries.insert(rel, e);
        Ok(())
    })?;
    Ok(t)
}

/// Where a restore into `target` put `data`: restic recreates its absolute path under the
/// target, Tiandi its last component.
fn restored_root(target: &Path, data: &Path) -> anyhow::Result<PathBuf> {
    let by_path = target.join(data.strip_prefix("/")?);
    let by_name = target.join(data.file_name().context("data directory has no name")?);
    [by_path, by_name]
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| format!("no copy of the data in {}", target.display()))
}

/// Fails at the first path (in order) where `got` differs from `want`.
fn compare(want: &Tree, got: &Tree, tool: &str) -> anyhow::Result<()> {
    let paths: BTreeSet<&PathBuf> = want.entries.keys().chain(got.entries.keys()).collect();
    for p in paths {
        match (want.entries.get(p), got.entries.get(p)) {
            (Some(w), Some(g)) if w == g => {}
            (Some(_), None) => bail!("{tool}'s restore lacks {}", p.display()),
            (None, Some(_)) => bail!("{tool}'s restore has {} that the data has not", p.display()),
            (w, g) => bail!(
                "{tool}'s restore differs at {}: {g:?}, not {w:?}",
                p.display()
            ),
        }
    }
    Ok(())
}
