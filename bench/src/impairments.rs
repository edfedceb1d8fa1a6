//! `impairments`: a Tiandi transfer under every impairment a real path has (issue 13), each
//! against its utilisation target, with the report stream running beside it and TCP BBR's
//! figure on the same link for comparison. Needs root.
//!
//! One emulated GEO link (`tiandi-satlink`: 20 Mbit/s each way, 300 ms each way, a 1 MB
//! drop-tail queue, a fixed seed) for the whole run. For each case, in order:
//!
//! 1. The case's settings are tried on the link (and taken off again): a setting the
//!    emulator does not know skips the case (`case=NAME skipped=true reason=…`).
//! 2. A fresh deployment on the clean link: the controller (release binary, hub's namespace,
//!    `profile = "geo"`, `[link_rates]` 20 Mbit/s for the site), a new site enrolled, its
//!    agent (site's namespace, `profile = "geo"`, `link_rate_mbit = 20`, a report every
//!    `--interval` s), new data directories; the bench follows `/api/stream` for report
//!    events. A deployment per case keeps the cases apart: no transfer, chunk, RTT estimate
//!    or congestion state of one case reaches the next, and a transfer that did not finish
//!    in its time limit needs no cancelling (the controller has no way to cancel a job): it
//!    goes with its controller.
//! 3. The case's impairment is set (`LinkHandle::set`; an `up_`/`down_` key sets one
//!    direction, up = site to hub), and `tiandi-controller send FILE --to site:SITE` queues a
//!    `--size-mb` file of pseudo-random bytes (a different file per case).
//! 4. The bench polls `/api/transfers` every second for the job (by file name) until its
//!    receipt (`receipt.verified_ms`, written by the site after the whole-file check), or
//!    the case's time limit (`--time-limit`).
//! 5. The deployment is stopped, and TCP BBR carries the same number of bytes hub → site over
//!    the same impairment (one connection, at most `--tcp-time-limit` s, counted from what
//!    arrived); then the link is made clean again.
//!
//! What each case prints (one line on stdout):
//! - `utilisation`: file bytes × 8 / (receipt's `verified_ms` − the instant just before
//!   `send` was run) / 20 Mbit/s: the whole transfer, hashing at the controller, offer and
//!   start-up included. A transfer still running at the time limit counts the bytes the site
//!   has acknowledged by then (`acked_bytes`) over the time limit, with `completed=false`.
//! - `target`, `met`: the target for the case, and whether the utilisation reached it
//!   (never met when not completed).
//! - `tcp_bbr_utilisation`: TCP BBR's goodput over the link rate, start-up included.
//! - `secs`: `send` to the receipt (or to the time limit; the API is polled once a second, each
//!   poll given up after 10 s).
//! - `stalls`: the larger of two counts: periods of 20 s or more in which the job's
//!   `acked_bytes` (from `/api/transfers`, saved by the controller every second) did not
//!   grow, counted once each, the start of the transfer included; and the lines of the
//!   controller's and the agent's logs saying a transfer stalled ("Transfer stalled" or "no
//!   progress"). After the transfer's own stall detector gives up, the job waits for the
//!   next connection, so a stall usually also ends the case at its time limit.
//! - `report_p99_ms`, `reports`, `report_gap_ms`: the delays of the report events that reached
//!   the bench while the transfer ran (the report's sample time at the site to the bench reading
//!   its event from `/api/stream`): their 99th percentile (with ~10 reports, their maximum), how
//!   many, and the longest time in that span without any (its two ends included). A report
//!   taken in such a gap waited at least the gap less one interval, so `report_p99_ms` is raised
//!   to that when it is longer: a report stream that stops, or a controller that stops
//!   publishing, counts. The budget is the interval plus the RTT (2,600 ms at the default
//!   interval).
//!
//! The last line: `impairments cases=N worst_utilisation=W worst_case=NAME stalls=S
//! report_p99_worst_ms=R targets_met=K` over the cases measured (skipped ones, and those that
//! failed with `case=NAME error=…`, are not counted): the lowest utilisation and its case, all
//! stalls, the highest `report_p99_ms` of any case, how many cases met their target. Stderr
//! has the progress and, per case, the link's counters (frames in, delivered, lost,
//! reordered, displaced, duplicated, … whatever the emulator counts) for the Tiandi transfer
//! and for TCP, the controller's and the agent's CPU time during the transfer, and how many
//! API polls went unanswered.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tiandi_satlink::{LinkHandle, LinkStatus, Topology};

use crate::harness::{Events, OneSite, SiteSetup, delays, work_dir, write_file};
use crate::ingest::{binaries, now_ms, percentile};

/// The link: 20 Mbit/s each way, 600 ms RTT.
const RATE_MBIT: f64 = 20.0;
const RTT_MS: f64 = 600.0;
/// Acknowledged bytes not growing this long count as a stall (the transfer's own detector
/// gives up after the same time).
const STALL: Duration = Duration::from_secs(20);
const SITE: &str = "imp-site";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Comma-separated case names (default: all, in order): clean, loss1, loss5,
    /// jitter50, asym20_2_loss1, displace1, displace5, netem_reorder1, dup1_corrupt01,
    /// combined.
    #[arg(long, value_delimiter = ',')]
    pub cases: Option<Vec<String>>,
    #[arg(long, default_value_t = 40.0)]
    pub size_mb: f64,
    /// The agent's report interval (s).
    #[arg(long = "interval", default_value_t = 2.0)]
    pub interval_s: f64,
    /// Longest a Tiandi transfer may run (s); a slower one is counted up to then.
    #[arg(long, default_value = "240", value_parser = crate::harness::secs)]
    pub time_limit: Duration,
    /// Longest the TCP BBR transfer may run (s); counted up to then.
    #[arg(long, default_value = "60", value_parser = crate::harness::secs)]
    pub tcp_time_limit: Duration,
}

struct Case {
    name: &'static str,
    settings: &'static [(&'static str, &'static str)],
    /// Utilisation of the whole transfer (start-up included) the issue asks for.
    target: f64,
}

/// Issue 13's matrix.
const CASES: &[Case] = &[
    Case {
        name: "clean",
        settings: &[],
        target: 0.90,
    },
    Case {
        name: "loss1",
        settings: &[("loss_pct", "1")],
        target: 0.90,
    },
    Case {
        name: "loss5",
        settings: &[("loss_pct", "5")],
        target: 0.85,
    },
    Case {
        name: "jitter50",
        settings: &[("jitter_ms", "50")],
        target: 0.85,
    },
    Case {
        name: "asym20_2_loss1",
        settings: &[("up_rate_mbit", "2"), ("loss_pct", "1")],
        target: 0.85,
    },
    Case {
        name: "displace1",
        settings: &[("displace_pct", "1"), ("displace_ms", "20")],
        target: 0.88,
    },
    Case {
        name: "displace5",
        settings: &[("displace_pct", "5"), ("displace_ms", "20")],
        target: 0.88,
    },
    Case {
        name: "netem_reorder1",
        settings: &[("reorder_pct", "1")],
        target: 0.50,
    },
    Case {
        name: "dup1_corrupt01",
        settings: &[("dup_pct", "1"), ("corrupt_pct", "0.1")],
        target: 0.85,
    },
    Case {
        name: "combined",
        settings: &[
            ("loss_pct", "5"),
            ("jitter_ms", "50"),
            ("displace_pct", "2"),
            ("displace_ms", "20"),
            ("up_rate_mbit", "2"),
        ],
        target: 0.75,
    },
];

fn owned(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn describe(settings: &[(&str, &str)]) -> String {
    if settings.is_empty() {
        return "none".into();
    }
    let s: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    s.join(" ")
}

/// Puts back every setting of both directions as it was at the start (`clean`): each field
/// of the emulator's `Shape` is also the name of its setting.
fn make_clean(link: &LinkHandle, clean: &LinkStatus) -> anyhow::Result<()> {
    let mut settings = Vec::new();
    for (dir, shape) in [("up", &clean.up), ("down", &clean.down)] {
        let v = serde_json::to_value(shape)?;
        for (k, v) in v.as_object().context("the link's shape")? {
            settings.push((format!("{dir}_{k}"), v.to_string()));
        }
    }
    link.set(&settings)
        .map_err(|e| anyhow::anyhow!("making the link clean: {e}"))?;
    let now = link.status();
    if now.up != clean.up || now.down != clean.down {
        bail!(
            "the link is not clean again: up {:?} down {:?} (was up {:?} down {:?})",
            now.up,
            now.down,
            clean.up,
            clean.down
        );
    }
    Ok(())
}

/// The link's counters gained between two statuses, both directions, every counter the
/// emulator has.
fn counters(before: &LinkStatus, after: &LinkStatus) -> String {
    let (b, a) = (
        serde_json::to_value(before).unwrap_or_default(),
        serde_json::to_value(after).unwrap_or_default(),
    );
    let mut out = Vec::new();
    for (dir, key) in [("hub->site", "down_counters"), ("site->hub", "up_counters")] {
        let Some(fields) = a[key].as_object() else {
            continue;
        };
        let gained: Vec<String> = fields
            .iter()
            .filter_map(|(k, v)| {
                let d = v.as_u64()?.saturating_sub(b[key][k].as_u64().unwrap_or(0));
                Some(format!("{k}={d}"))
            })
            .collect();
        out.push(format!("{dir}: {}", gained.join(" ")));
    }
    out.join("; ")
}

/// The longest time (ms) within [from, to] without a report event reaching the bench, the two
/// ends included.
fn report_gap(events: &Events, from: i64, to: i64) -> i64 {
    let mut at: Vec<i64> = events
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, arrived)| *arrived)
        .filter(|t| (from..=to).contains(t))
        .collect();
    at.sort_unstable();
    at.push(to);
    let mut last = from;
    let mut gap = 0;
    for t in at {
        gap = gap.max(t - last);
        last = t;
    }
    gap
}

/// Lines of a log saying a transfer stalled.
fn logged_stalls(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Transfer stalled") || l.contains("no progress"))
        .count()
}

struct Outcome {
    utilisation: f64,
    completed: bool,
    secs: f64,
    stalls: usize,
    report_p99_ms: i64,
    reports: usize,
    report_gap_ms: i64,
    tcp_utilisation: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cases: Vec<&Case> = match &a.cases {
        None => CASES.iter().collect(),
        Some(names) => {
            for n in names {
                if !CASES.iter().any(|c| c.name == n) {
                    let known: Vec<&str> = CASES.iter().map(|c| c.name).collect();
                    bail!("unknown case {n:?}; the cases: {}", known.join(","));
                }
            }
            CASES
                .iter()
                .filter(|c| names.iter().any(|n| n == c.name))
                .collect()
        }
    };
    let bins = binaries()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let topo = crate::geolink::one_link("tbim", [10, 196, 0], 13, RATE_MBIT, RTT_MS, 0.0)?;
    let link = topo.link(1);
    let clean = link.status();
    let (work, w) = work_dir("tiandi-bench-imp")?;
    let bytes = (a.size_mb * 1e6) as u64;
    let budget = (RTT_MS + a.interval_s * 1000.0) as i64;
    eprintln!(
        "link: {RATE_MBIT} Mbit/s, {RTT_MS} ms RTT; {bytes} bytes controller -> site per case; report every {} s (budget {budget} ms); limits {:?} (Tiandi), {:?} (TCP BBR)",
        a.interval_s, a.time_limit, a.tcp_time_limit
    );
    let mut done: Vec<(&Case, Outcome)> = Vec::new();
    let mut failed = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        // Every setting known to the emulator, before anything starts.
        let tried = link.set(&owned(case.settings));
        make_clean(link, &clean)?;
        if let Err(e) = tried {
            eprintln!("case {}: skipped: {e}", case.name);
            println!("case={} skipped=true reason={e:?}", case.name);
            continue;
        }
        let dir = w.join(case.name);
        std::fs::create_dir_all(&dir)?;
        let r = run_case(&topo, &bins, &dir, i as u16, case, &a, bytes);
        make_clean(link, &clean)?;
        if work.is_some() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let o = match r {
            Ok(o) => o,
            Err(e) => {
                eprintln!("case {}: failed: {e:#}", case.name);
                println!("case={} error={:?}", case.name, format!("{e:#}"));
                failed.push(case.name);
                continue;
            }
        };
        let met = o.completed && o.utilisation >= case.target;
        println!(
            "case={} utilisation={:.3} target={:.2} met={met} tcp_bbr_utilisation={:.2} secs={:.1} stalls={} report_p99_ms={} reports={} report_gap_ms={} completed={}",
            case.name,
            o.utilisation,
            case.target,
            o.tcp_utilisation,
            o.secs,
            o.stalls,
            o.report_p99_ms,
            o.reports,
            o.report_gap_ms,
            o.completed
        );
        done.push((case, o));
    }
    drop(topo);

    let worst = done
        .iter()
        .min_by(|x, y| x.1.utilisation.total_cmp(&y.1.utilisation));
    println!(
        "impairments cases={} worst_utilisation={:.3} worst_case={} stalls={} report_p99_worst_ms={} targets_met={}",
        done.len(),
        worst.map_or(0.0, |w| w.1.utilisation),
        worst.map_or("none", |w| w.0.name),
        done.iter().map(|(_, o)| o.stalls).sum::<usize>(),
        done.iter()
            .map(|(_, o)| o.report_p99_ms)
            .max()
            .unwrap_or(-1),
        done.iter()
            .filter(|(c, o)| o.completed && o.utilisation >= c.target)
            .count()
    );
    if !failed.is_empty() {
        bail!("cases that could not be measured: {}", failed.join(","));
    }
    Ok(())
}

/// One case: a fresh deployment, the impairment, the file, then TCP BBR on the same link.
fn run_case(
    topo: &Topology,
    bins: &(PathBuf, PathBuf),
    dir: &Path,
    i: u16,
    case: &Case,
    a: &Args,
    bytes: u64,
) -> anyhow::Result<Outcome> {
    let link = topo.link(1);
    let name = format!("imp-{}.bin", case.name);
    let file = dir.join(&name);
    write_file(&file, bytes, u64::from(i) + 1)?;
    eprintln!(
        "case {}: starting the controller and the site...",
        case.name
    );
    let one = OneSite::start(
        topo,
        dir,
        &SiteSetup {
            bins,
            site: SITE,
            province: "IM",
            rate_mbit: RATE_MBIT,
            interval_s: a.interval_s,
            // Ports of their own: the last case's sockets may linger.
            api_port: 18180 + i,
            ops_port: 19180 + i,
            agent_toml: None,
        },
    )
    .context("starting the controller and the site")?;
    let events: Events = Default::default();
    one.follow_reports(events.clone());
    std::thread::sleep(Duration::from_secs(1));

    link.set(&owned(case.settings))
        .map_err(|e| anyhow::anyhow!("setting the impairment: {e}"))?;
    let before = link.status();
    eprintln!(
        "case {}: {}; sending {bytes} bytes...",
        case.name,
        describe(case.settings)
    );
    let cpu0 = one.cpu_s();
    let t0 = now_ms();
    let started = Instant::now();
    one.send(&file, "normal")?;

    let (mut acked, mut grew, mut in_stall, mut api_stalls) = (0u64, Instant::now(), false, 0);
    let mut api_misses = 0;
    let mut verified_ms = None;
    let mut job = Value::Null;
    let mut shown = Instant::now();
    while started.elapsed() < a.time_limit {
        std::thread::sleep(Duration::from_secs(1));
        match one.api_get("/api/transfers") {
            Some(v) => {
                if let Some(j) = v["transfers"]
                    .as_array()
                    .and_then(|js| js.iter().find(|j| j["file"] == name.as_str()))
                {
                    job = j.clone();
                }
            }
            None => api_misses += 1,
        }
        if let Some(t) = job["receipt"]["verified_ms"].as_i64() {
            verified_ms = Some(t);
            break;
        }
        if job["state"] == "failed" {
            eprintln!("case {}: the transfer failed: {}", case.name, job["error"]);
            break;
        }
        let now_acked = job["acked_bytes"].as_u64().unwrap_or(0);
        if now_acked > acked {
            (acked, grew, in_stall) = (now_acked, Instant::now(), false);
        } else if !in_stall && grew.elapsed() >= STALL {
            api_stalls += 1;
            in_stall = true;
            eprintln!(
                "case {}: stall: {acked} bytes acknowledged, none more for {:?} (state {}, attempts {}, error {})",
                case.name, STALL, job["state"], job["attempts"], job["error"]
            );
        }
        if shown.elapsed() >= Duration::from_secs(15) {
            shown = Instant::now();
            eprintln!(
                "case {}: {:.0} s: {acked} of {bytes} bytes acknowledged, state {}, attempts {}",
                case.name,
                started.elapsed().as_secs_f64(),
                job["state"],
                job["attempts"]
            );
        }
    }
    let completed = verified_ms.is_some();
    let end = verified_ms.unwrap_or_else(now_ms);
    if completed {
        acked = bytes;
    } else {
        eprintln!(
            "case {}: not delivered in {:?}: {acked} of {bytes} bytes acknowledged (state {}, attempts {}, error {})",
            case.name, a.time_limit, job["state"], job["attempts"], job["error"]
        );
    }
    let secs = ((end - t0) as f64 / 1000.0).max(1e-3);
    let interval_ms = (a.interval_s * 1000.0) as i64;
    let utilisation = acked as f64 * 8.0 / secs / (RATE_MBIT * 1e6);
    let reports = delays(&events, t0, end);
    let gap = report_gap(&events, t0, end);
    let cpu1 = one.cpu_s();
    let after = link.status();
    let log_stalls =
        logged_stalls(&one.log("controller.log")) + logged_stalls(&one.log("agent.log"));
    drop(one);
    eprintln!(
        "case {}: Tiandi {:.2} Mbit/s in {secs:.1} s; stalls: {api_stalls} by acknowledged bytes, {log_stalls} in the logs; report delays {:?} ms, longest without a report {gap} ms; CPU s: controller {:.1}, agent {:.1}; API polls unanswered in 10 s: {api_misses}",
        case.name,
        utilisation * RATE_MBIT,
        reports,
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1
    );
    eprintln!(
        "case {}: link during Tiandi: {}",
        case.name,
        counters(&before, &after)
    );

    eprintln!(
        "case {}: TCP BBR, same bytes, same impairment...",
        case.name
    );
    let before = link.status();
    let tcp_mbit = crate::geolink::tcp(
        &topo.ctl_ns(),
        &topo.site_ns(1),
        topo.ctl_addr().into(),
        bytes,
        "bbr",
        a.tcp_time_limit,
    )
    .context("TCP BBR")?;
    eprintln!(
        "case {}: TCP BBR {tcp_mbit:.2} Mbit/s; link during TCP: {}",
        case.name,
        counters(&before, &link.status())
    );
    Ok(Outcome {
        utilisation,
        completed,
        secs,
        stalls: api_stalls.max(log_stalls),
        report_p99_ms: percentile(&reports, 0.99).max(gap - interval_ms),
        report_gap_ms: gap,
        reports: reports.len(),
        tcp_utilisation: tcp_mbit / RATE_MBIT,
    })
}
