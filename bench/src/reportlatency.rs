//! `report-latency`: how much a bulk transfer at full link rate delays health reports that
//! share its connection. One site behind an emulated GEO link, the real release binaries (the
//! controller in the hub's namespace, the agent in the site's), both ends paced at the site's
//! committed rate. Three phases: idle, a bulk file controller → site, a bulk file site →
//! controller (`tiandi-agent send`). A report's delay is its sample time at the site to the
//! moment the bench receives its event from the controller's `/api/stream`; the added delay is
//! a bulk phase's worst against the idle median. The budget: one RTT plus the report
//! interval.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::harness::{Events, OneSite, SiteSetup, delays, wait_until, work_dir, write_file};
use crate::ingest::{binaries, now_ms, percentile};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 20.0)]
    pub rate_mbit: f64,
    #[arg(long, default_value_t = 600.0)]
    pub rtt_ms: f64,
    #[arg(long, default_value_t = 1.0)]
    pub loss_pct: f64,
    /// The agent's report interval (s).
    #[arg(long = "interval", default_value_t = 2.0)]
    pub interval_s: f64,
    /// Length of the idle phase, and of each bulk file at the link rate (s).
    #[arg(long, default_value_t = 40.0)]
    pub phase_s: f64,
}

const SITE: &str = "rl-site";

pub fn run(a: Args) -> anyhow::Result<()> {
    let bins = binaries()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let topo =
        crate::geolink::one_link("tbrl", [10, 198, 0], 11, a.rate_mbit, a.rtt_ms, a.loss_pct)?;
    let (_work, w) = work_dir("tiandi-bench-rl")?;
    let one = OneSite::start(
        &topo,
        &w,
        &SiteSetup {
            bins: &bins,
            site: SITE,
            province: "RL",
            rate_mbit: a.rate_mbit,
            interval_s: a.interval_s,
            api_port: 18080,
            ops_port: 19090,
            agent_toml: None,
        },
    )?;
    // Every report event, as (sample time, arrival time).
    let events: Events = Default::default();
    one.follow_reports(events.clone());
    let phase = Duration::from_secs_f64(a.phase_s);
    let bytes = (a.rate_mbit * 1e6 / 8.0 * a.phase_s) as u64;
    let limit = phase * 6 + Duration::from_secs(120);

    eprintln!("idle for {:?}...", phase);
    std::thread::sleep(Duration::from_secs(2));
    let idle_from = now_ms();
    std::thread::sleep(phase);
    let idle = delays(&events, idle_from, now_ms());

    // Bulk toward the site.
    let down_file = w.join("down.bin");
    write_file(&down_file, bytes, 0)?;
    eprintln!("bulk controller -> site, {bytes} bytes...");
    let down_from = now_ms();
    one.send(&down_file, "bulk")?;
    let mut down_to = 0;
    wait_until("the bulk file at the site", limit, || {
        one.api_get("/api/transfers")
            .and_then(|v| v["transfers"].as_array()?.first().cloned())
            .and_then(|j| j["receipt"]["verified_ms"].as_i64())
            .map(|t| down_to = t)
            .is_some()
    })?;
    let down = delays(&events, down_from, down_to);
    let down_mbit = bytes as f64 * 8.0 / ((down_to - down_from) as f64 / 1000.0) / 1e6;

    // Bulk from the site.
    let up_file = w.join("up.bin");
    write_file(&up_file, bytes, 0)?;
    eprintln!("bulk site -> controller, {bytes} bytes...");
    let up_from = now_ms();
    crate::harness::run_ok(
        one.agent(&[
            "send",
            up_file.to_str().context("path")?,
            "--priority",
            "bulk",
        ]),
        "tiandi-agent send",
    )?;
    let mut up_to = 0;
    wait_until("the bulk file at the controller", limit, || {
        one.api_get("/api/transfers")
            .and_then(|v| {
                v["received"]
                    .as_array()?
                    .iter()
                    .find(|r| r["file"] == "up.bin")?["receipt"]["verified_ms"]
                    .as_i64()
            })
            .map(|t| up_to = t)
            .is_some()
    })?;
    let up = delays(&events, up_from, up_to);
    let up_mbit = bytes as f64 * 8.0 / ((up_to - up_from) as f64 / 1000.0) / 1e6;
    drop(one);
    drop(topo);

    if idle.is_empty() || down.is_empty() || up.is_empty() {
        bail!(
            "too few reports to measure (idle {}, down {}, up {})",
            idle.len(),
            down.len(),
            up.len()
        );
    }
    let base = percentile(&idle, 0.5);
    let worst = down.last().copied().max(up.last().copied()).unwrap_or(0);
    let added = worst - base;
    let budget = (a.rtt_ms + a.interval_s * 1000.0) as i64;
    println!(
        "report-latency rate_mbit={} rtt_ms={} loss_pct={} interval_s={} reports={} idle_p50_ms={} idle_p99_ms={} down_bulk_mbit={:.2} down_p50_ms={} down_p99_ms={} down_max_ms={} up_bulk_mbit={:.2} up_p50_ms={} up_p99_ms={} up_max_ms={} worst_added_ms={added} budget_ms={budget} within_budget={}",
        a.rate_mbit,
        a.rtt_ms,
        a.loss_pct,
        a.interval_s,
        idle.len() + down.len() + up.len(),
        base,
        percentile(&idle, 0.99),
        down_mbit,
        percentile(&down, 0.5),
        percentile(&down, 0.99),
        down.last().copied().unwrap_or(0),
        up_mbit,
        percentile(&up, 0.5),
        percentile(&up, 0.99),
        up.last().copied().unwrap_or(0),
        added <= budget
    );
    Ok(())
}
