//! Issue 13's impairment classes end to end: the real controller and agent over an emulated
//! GEO link (the project's emulator between network namespaces), one test per class. Needs
//! root and /dev/net/tun (CI runs as root).
//!
//! Each test: one site behind a 20 Mbit/s link each way, 300 ms each way (600 ms RTT), a 1 MB
//! drop-tail queue, plus the class's impairment from the first frame (enrollment and the
//! handshakes cross it too); the controller and the agent on the `geo` profile with the
//! site's committed rate configured on both sides (`[link_rates]`, `link_rate_mbit`), a report
//! every 2 s. An 8 MB file goes controller → site with `tiandi-controller send`. While it runs,
//! the test polls the controller's API every half second and asserts:
//!
//! 1. the transfer is delivered (the controller holds the site's receipt) and the file at the
//!    site is byte-identical, within a limit derived from the utilisation target for
//!    the class (see [`limit_for`]);
//! 2. reports keep arriving: the site's last report at the controller (`last_seen_ms` in
//!    `/api/sites/SITE`) is never more than [`REPORT_GAP`] old (interval 2 s + RTT 0.6 s, and
//!    a margin for a loaded machine);
//! 3. no stall: the job's acknowledged bytes (`acked_bytes` in `/api/transfers`, saved by the
//!    controller every second) grow at least every [`STALL`], the start included, and neither
//!    log says a transfer stalled.
//!
//! Every wait is bounded (the site's connection 60 s, the transfer its limit), so a test ends
//! in at most a few minutes; the topology, with every process in its namespaces, goes when the
//! test ends or panics (`Topology`'s drop). `TIANDI_TEST_KEEP=1` keeps the data directories and
//! logs. Each test prints one `impairments case=…` line with its figures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tiandi_satlink::{LinkStatus, Shape, Spec, Topology};
use tiandi_tests::{AgentProc, ControllerProc, can_emulate_links, pattern, wait_for};

/// The file: 8 MB.
const SIZE: usize = 8_000_000;
/// The link's rate each way (bit/s), and the committed rate configured for the site (Mbit/s).
const RATE_BPS: f64 = 20e6;
const RATE_MBIT: f64 = 20.0;
/// Acknowledged bytes not growing this long is a stall (the transfer's own stall detector
/// gives up on a connection after the same time; the benchmark counts stalls the same way).
const STALL: Duration = Duration::from_secs(20);
/// The longest a site's last report may be old while the transfer runs: the report interval
/// (2 s) plus the RTT (0.6 s) is the budget; the rest is a margin for a report taken while the
/// link's queue is full and for a loaded 2-core machine.
const REPORT_GAP: Duration = Duration::from_secs(10);
const SITE: &str = "imp-001";

/// The clean link: 20 Mbit/s, 300 ms each way, a 1 MB queue (the benchmark's link).
fn geo() -> Shape {
    Shape {
        rate_kbit: 20_000,
        delay_ms: 300.0,
        queue_bytes: 1_000_000,
        ..Shape::default()
    }
}

/// The time limit for a class whose whole-transfer utilisation target (issue 13's table,
/// start-up included) is `target`: twice the time the file takes at that utilisation, plus
/// 20 s. The factor and the 20 s cover what an 8 MB file does not amortise and a 40 MB one in
/// the benchmark does: the controller hashing the file, the offer and the site's answer (two
/// RTTs), the last acknowledgements and the receipt after the site's whole-file check — and
/// the debug binaries on a loaded 2-core CI machine, with another test beside them.
fn limit_for(target: f64) -> Duration {
    Duration::from_secs_f64(SIZE as f64 * 8.0 / (target * RATE_BPS) * 2.0 + 20.0)
}

use tiandi_link::clock::now_ms;

struct Case {
    /// Printed, and the file's name.
    name: &'static str,
    /// Namespace prefix and third octet of the /24: each test has its own, so that tests
    /// running side by side do not meet (the other emulated-link tests use 10.196–10.205).
    prefix: &'static str,
    net: u8,
    /// Site → hub and hub → site.
    up: Shape,
    down: Shape,
    limit: Duration,
}

/// The last `n` lines of a log.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lines of a log saying a transfer stalled (the transfer's own detector).
fn stall_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Transfer stalled") || l.contains("no progress"))
        .map(str::to_string)
        .collect()
}

/// Both directions' counters as the emulator keeps them.
fn counters(st: &LinkStatus) -> String {
    let v = serde_json::to_value(st).unwrap_or_default();
    format!(
        "hub->site {} site->hub {}",
        v["down_counters"], v["up_counters"]
    )
}

fn run(case: Case) {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let spec = Spec {
        prefix: case.prefix.into(),
        net: [10, case.net, 0],
        sites: vec![(case.up.clone(), case.down.clone())],
        // Repeatable impairment patterns.
        seed: Some(13),
        second: Vec::new(),
        second_net: None,
    };
    // Declared first, dropped last: the processes go before their namespaces.
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    let d: PathBuf = if std::env::var_os("TIANDI_TEST_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let ctl = ControllerProc::start_with_profile(
        &d.join("ctl"),
        Some((&topo.ctl_ns(), topo.ctl_addr().into())),
        "geo",
        &format!("[link_rates]\n\"{SITE}\" = {RATE_MBIT:.1}\n"),
    );
    let token = ctl.enroll(SITE, "IM", &[]);
    let mut agent = AgentProc::enroll_in(
        Some(&topo.site_ns(1)),
        &d.join(SITE),
        ctl.quic,
        &token,
        &format!("interval_s = 2\nlink_rate_mbit = {RATE_MBIT:.1}\n"),
    );
    agent.set_profile("geo");
    agent.start();
    wait_for("the site connected", Duration::from_secs(60), || {
        (ctl.metric("tiandi_connections") >= 1.0).then_some(())
    });
    let site = |ctl: &ControllerProc| ctl.api(&format!("/api/sites/{SITE}"));
    wait_for("the site's first reports", Duration::from_secs(60), || {
        (site(&ctl)?["reports"].as_u64()? >= 2).then_some(())
    });

    let name = format!("{}.bin", case.name);
    let src = d.join("ctl").join(&name);
    let data = pattern(SIZE, u32::from(case.net));
    std::fs::write(&src, &data).unwrap();
    let reports_before = site(&ctl).and_then(|s| s["reports"].as_u64()).unwrap_or(0);
    let link_before = topo.link(1).status();
    let started = Instant::now();
    let out = ctl.cli(&[
        "send",
        src.to_str().unwrap(),
        "--to",
        &format!("site:{SITE}"),
    ]);
    assert!(
        out.status.success(),
        "send: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything a failure report needs: the figures so far, the link's counters, the logs.
    let fail = |what: String, job: &Value| -> ! {
        panic!(
            "case {}: {what}\nafter {:.1} s (limit {:?}); job: {job}\nlink: {}\n--- controller log (last lines) ---\n{}\n--- agent log (last lines) ---\n{}",
            case.name,
            started.elapsed().as_secs_f64(),
            case.limit,
            counters(&topo.link(1).status()),
            tail(&ctl.log(), 60),
            tail(&agent.log(), 60)
        )
    };
    let mut job = Value::Null;
    let (mut acked, mut grew, mut longest_flat) = (0u64, Instant::now(), Duration::ZERO);
    let mut report_gap_ms = 0i64;
    let secs = loop {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(j) = ctl.api("/api/transfers").and_then(|v| {
            v["transfers"]
                .as_array()?
                .iter()
                .find(|j| j["file"] == name.as_str())
                .cloned()
        }) {
            job = j;
        }
        if let Some(seen) = site(&ctl).and_then(|s| s["last_seen_ms"].as_i64()) {
            let gap = now_ms() - seen;
            report_gap_ms = report_gap_ms.max(gap);
            if gap > REPORT_GAP.as_millis() as i64 {
                fail(
                    format!("no report from the site for {gap} ms (at most {REPORT_GAP:?})"),
                    &job,
                );
            }
        }
        if job["state"] == "delivered" {
            break started.elapsed().as_secs_f64();
        }
        if job["state"] == "failed" {
            fail("the transfer failed".into(), &job);
        }
        let now_acked = job["acked_bytes"].as_u64().unwrap_or(0);
        if now_acked > acked {
            (acked, grew) = (now_acked, Instant::now());
        }
        longest_flat = longest_flat.max(grew.elapsed());
        if grew.elapsed() >= STALL {
            fail(
                format!("stalled: {acked} of {SIZE} bytes acknowledged, none more for {STALL:?}"),
                &job,
            );
        }
        if started.elapsed() > case.limit {
            fail(
                format!("not delivered within its limit: {acked} of {SIZE} bytes acknowledged"),
                &job,
            );
        }
    };

    let dest = d.join(SITE).join("data/inbox").join(&name);
    assert!(dest.exists(), "delivered, but no {}", dest.display());
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "case {}: the file at the site differs",
        case.name
    );
    assert_eq!(job["receipt"]["size"].as_u64(), Some(SIZE as u64), "{job}");
    let (ctl_log, agent_log) = (ctl.log(), agent.log());
    let stalls: Vec<String> = stall_lines(&ctl_log)
        .into_iter()
        .chain(stall_lines(&agent_log))
        .collect();
    assert!(
        stalls.is_empty(),
        "case {}: a transfer stalled: {stalls:#?}",
        case.name
    );
    let reports = site(&ctl).and_then(|s| s["reports"].as_u64()).unwrap_or(0);
    let link = topo.link(1).status();
    println!(
        "impairments case={} secs={secs:.1} limit_s={:.1} utilisation={:.3} attempts={} longest_without_progress_s={:.1} report_gap_max_ms={report_gap_ms} reports_during={}",
        case.name,
        case.limit.as_secs_f64(),
        SIZE as f64 * 8.0 / secs / RATE_BPS,
        job["attempts"],
        longest_flat.as_secs_f64(),
        reports.saturating_sub(reports_before)
    );
    println!(
        "impairments case={} link before: {}\nimpairments case={} link after: {}",
        case.name,
        counters(&link_before),
        case.name,
        counters(&link)
    );
    drop(agent);
    drop(ctl);
    topo.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_5_pct_each_way_completes_verified_without_a_stall() {
    let shape = Shape {
        loss_pct: 5.0,
        ..geo()
    };
    run(Case {
        name: "loss5",
        prefix: "tdim1",
        net: 210,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.85),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_50_ms_completes_verified_without_a_stall() {
    let shape = Shape {
        jitter_ms: 50.0,
        ..geo()
    };
    run(Case {
        name: "jitter50",
        prefix: "tdim2",
        net: 211,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.85),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asymmetric_2_mbit_up_20_down_with_1_pct_loss_completes_verified_without_a_stall() {
    let down = Shape {
        loss_pct: 1.0,
        ..geo()
    };
    let up = Shape {
        rate_kbit: 2_000,
        ..down.clone()
    };
    run(Case {
        name: "asym20_2_loss1",
        prefix: "tdim3",
        net: 212,
        up,
        down,
        limit: limit_for(0.85),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_reordering_5_pct_within_20_ms_completes_verified_without_a_stall() {
    let shape = Shape {
        displace_pct: 5.0,
        displace_ms: 20.0,
        ..geo()
    };
    run(Case {
        name: "displace5",
        prefix: "tdim4",
        net: 213,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.88),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netem_like_reordering_1_pct_completes_verified_without_a_stall() {
    // 1 % of the frames skip the 300 ms hop and overtake everything queued before them.
    let shape = Shape {
        reorder_pct: 1.0,
        ..geo()
    };
    run(Case {
        name: "netem_reorder1",
        prefix: "tdim5",
        net: 214,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.50),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netem_like_reordering_10_pct_completes_without_a_stall() {
    // The case that made no progress at all before the fix. The issue sets it no utilisation
    // target: only completion (verified) and no stall are asserted, within a generous limit —
    // what a 0.05 utilisation would need by the same formula (148 s), far above anything a
    // working transfer takes and below nextest's 300 s termination.
    let shape = Shape {
        reorder_pct: 10.0,
        ..geo()
    };
    run(Case {
        name: "netem_reorder10",
        prefix: "tdim6",
        net: 215,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.05),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplication_1_pct_and_corruption_0_1_pct_complete_verified_without_a_stall() {
    let shape = Shape {
        dup_pct: 1.0,
        corrupt_pct: 0.1,
        ..geo()
    };
    run(Case {
        name: "dup1_corrupt01",
        prefix: "tdim7",
        net: 216,
        up: shape.clone(),
        down: shape,
        limit: limit_for(0.85),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_loss_jitter_reordering_asymmetry_complete_verified_without_a_stall() {
    // 5 % loss, 50 ms jitter, 2 % bounded reordering (≤ 20 ms) each way; 20 Mbit/s toward the
    // site, 2 Mbit/s back.
    let down = Shape {
        loss_pct: 5.0,
        jitter_ms: 50.0,
        displace_pct: 2.0,
        displace_ms: 20.0,
        ..geo()
    };
    let up = Shape {
        rate_kbit: 2_000,
        ..down.clone()
    };
    run(Case {
        name: "combined",
        prefix: "tdim8",
        net: 217,
        up,
        down,
        limit: limit_for(0.75),
    });
}
