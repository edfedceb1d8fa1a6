//! `hybrid-failover` (issue 20): a dual-homed site — a ground line (10 Mbit/s, 20 ms round
//! trip) and a GEO link (4 Mbit/s, 600 ms, 1 % loss each way), each its own emulated link
//! (`tiandi-satlink`'s second link) — plays a conference, reports every 2 s and receives a bulk
//! file; the ground line is cut at `--cut-at` s and restored at `--restore-at` s. The real
//! release binaries: the controller and a ministry relay (its own `tiandi-video relay`) in the
//! hub's namespace, the test pattern published there, the site's agent and viewer (`join
//! --path ground=… --path sky=…`) in the site's.
//!
//! Figures:
//! - `video_freeze_ms`: the longest still picture the viewer showed over the whole run (the
//!   larger of the longest gap in its recording and its player's longest wall-clock wait
//!   between frames): the cut's and the switch-back's.
//! - `reports_lost`: reports the agent numbered that the controller does not hold at the end.
//! - `report_gap_ms`: the longest time between two reports becoming visible at the controller,
//!   from 5 s before the cut to 15 s after the restore.
//! - `switch_back_s`: from the restore until both the reports and the conference are back on
//!   the ground line (the later of the two: the agent's switch, as the controller's API shows
//!   it, and the viewer's).
//! - `transfer_resumed`: the bulk file was part-way at the cut, stayed off the satellite link
//!   (bulk's default policy), and was completed on the ground line after the restore;
//!   `bytes_resent_kb`: what the sender wrote to streams beyond the file's size.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tiandi_link::pki::Ca;
use tiandi_satlink::{Shape, Spec, Topology};

use crate::harness::{Events, OneSite, SiteSetup, wait_until, work_dir, write_file};
use crate::videogeo::{creds, field, recorded, video};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// When the ground line is cut (s after the conference and the transfer started).
    #[arg(long, default_value_t = 20.0)]
    pub cut_at: f64,
    /// When it is restored (s).
    #[arg(long, default_value_t = 60.0)]
    pub restore_at: f64,
    /// How long the run lasts (s).
    #[arg(long, default_value_t = 90.0)]
    pub duration: f64,
    /// The bulk file's size (MB): part-way at the cut, done after the restore.
    #[arg(long, default_value_t = 32)]
    pub file_mb: u64,
    /// Keep the logs and the recording in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

const SITE: &str = "gd-county";

/// The job status of the bulk file at the controller.
fn job(one: &OneSite) -> Option<serde_json::Value> {
    let v = one.api_get("/api/transfers")?;
    let list = v["transfers"].as_array()?.clone();
    list.into_iter()
        .find(|j| j["dest"] == SITE && j["priority"] == "bulk")
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.cut_at > 5.0 && a.restore_at > a.cut_at && a.duration > a.restore_at + 15.0) {
        bail!("--cut-at > 5, --restore-at after it, --duration 15 s after that are needed");
    }
    let bins = crate::ingest::binaries()?;
    let media = crate::ingest::release_binaries(&["tiandi-media"])?.remove(0);
    // A leased line's router: 50 ms of buffer at its rate (2.5 × the line's bandwidth-delay
    // product; what is queued when the fibre is cut is lost with it).
    let ground = Shape {
        rate_kbit: 10_000,
        delay_ms: 10.0,
        queue_bytes: 62_500,
        ..Shape::default()
    };
    let sky = Shape {
        rate_kbit: 4_000,
        delay_ms: 300.0,
        loss_pct: 1.0,
        // A VSAT modem's buffer: 200 ms at the carrier's rate.
        queue_bytes: 100_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: "tdhyb".into(),
        net: [10, 208, 0],
        sites: vec![(ground.clone(), ground)],
        seed: Some(20),
        second: vec![(sky.clone(), sky)],
        second_net: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let topo = Topology::up(&spec).context("emulated links (root and /dev/net/tun)")?;
    let (ctl2, site1, site2) = (
        topo.ctl_addr2().context("the sky link")?,
        topo.site_addr(1),
        topo.site_addr2(1).context("the sky link")?,
    );
    let (_work, scratch) = work_dir("tiandi-bench-hybrid")?;
    let dir = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => scratch,
    };
    let agent_toml = format!(
        "[[paths]]\nname = \"ground\"\nbind = \"{site1}\"\nprofile = \"terrestrial\"\n\
         [[paths]]\nname = \"sky\"\nbind = \"{site2}\"\nprofile = \"geo\"\ncontroller = \"{ctl2}:4433\"\n"
    );
    let one = OneSite::start(
        &topo,
        &dir,
        &SiteSetup {
            bins: &bins,
            site: SITE,
            province: "GD",
            rate_mbit: 0.0,
            interval_s: 2.0,
            api_port: 18280,
            ops_port: 19280,
            agent_toml: Some(agent_toml),
        },
    )?;
    let events: Events = Default::default();
    one.follow_reports(events.clone());
    wait_until(
        "both paths up at the controller",
        Duration::from_secs(60),
        || {
            one.api_get(&format!("/api/sites/{SITE}")).is_some_and(|v| {
                v["paths"]["paths"]
                    .as_array()
                    .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["state"] == "up"))
            })
        },
    )?;

    // The conference: a ministry relay and the test pattern in the hub's namespace.
    let ca = Ca::generate("hybrid-failover CA")?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    for id in ["ministry-relay", "ministry", SITE] {
        creds(&ca, &dir, id)?;
    }
    let ctl = topo.ctl_ns();
    let relay1 = format!("{}:4500", topo.ctl_addr());
    let relay2 = format!("{ctl2}:4500");
    let _relay = video(
        &media,
        &ctl,
        &dir,
        "ministry-relay",
        &[
            "relay",
            "--listen",
            "0.0.0.0:4500",
            "--name",
            "ministry-relay",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let publish_s = format!("{}", a.duration + 30.0);
    let _publisher = video(
        &media,
        &ctl,
        &dir,
        "ministry",
        &[
            "join",
            "--relay",
            &relay1,
            "--relay-name",
            "ministry-relay",
            "--room",
            "drill",
            "--publish",
            "pattern",
            "--duration",
            &publish_s,
        ],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let out = dir.join("viewer.ts");
    let (out_s, watch_s) = (
        out.to_string_lossy().to_string(),
        format!("{}", a.duration + 5.0),
    );
    let ground_path = format!("ground={site1},relay={relay1},profile=terrestrial");
    let sky_path = format!("sky={site2},relay={relay2},profile=geo");
    let mut viewer = video(
        &media,
        &topo.site_ns(1),
        &dir,
        SITE,
        &[
            "join",
            "--relay",
            &relay1,
            "--relay-name",
            "ministry-relay",
            "--room",
            "drill",
            "--path",
            &ground_path,
            "--path",
            &sky_path,
            "--play",
            &out_s,
            "--from",
            "ministry",
            "--duration",
            &watch_s,
        ],
    )?;
    let viewer_out = dir.join(format!("{SITE}.out"));
    wait_until("the viewer to play", Duration::from_secs(30), || {
        std::fs::read_to_string(&viewer_out).is_ok_and(|s| s.contains("playing ministry"))
    })?;
    std::thread::sleep(Duration::from_secs(5));

    // t0: the bulk file is queued; the cut and the restore follow.
    let file = dir.join("bulk.bin");
    write_file(&file, a.file_mb << 20, 20)?;
    let t0 = Instant::now();
    let unix0 = tiandi_link::clock::now_ms();
    one.send(&file, "bulk")?;
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let ms = |s: f64| unix0 + (s * 1000.0) as i64;
    let (mut cut, mut restored) = (false, false);
    let mut at_cut: Option<serde_json::Value> = None;
    let mut at_restore: Option<serde_json::Value> = None;
    let sky_before = topo.second_link(1).context("sky")?.status().down_counters;
    let mut sky_outage_bytes = 0u64;
    let mut viewer_back: Option<f64> = None;
    let mut viewer_moved: Option<f64> = None;
    while t0.elapsed() < Duration::from_secs_f64(a.duration) {
        std::thread::sleep(Duration::from_millis(100));
        let now = t0.elapsed().as_secs_f64();
        if cut && at_cut.is_none() && Instant::now() >= at(a.cut_at + 3.0) {
            // The job's progress is written back every second: 3 s after the cut it holds
            // everything acknowledged before it (nothing is acknowledged over a cut line).
            at_cut = job(&one);
        }
        if !cut && Instant::now() >= at(a.cut_at) {
            topo.link(1).cut();
            cut = true;
            eprintln!("hybrid-failover: ground line cut at {now:.1} s");
        }
        if cut && !restored && Instant::now() >= at(a.restore_at) {
            at_restore = job(&one);
            topo.link(1).restore();
            restored = true;
            sky_outage_bytes = topo
                .second_link(1)
                .context("sky")?
                .status()
                .down_counters
                .bytes_in
                .saturating_sub(sky_before.bytes_in);
            eprintln!("hybrid-failover: ground line restored at {now:.1} s");
        }
        let text = std::fs::read_to_string(&viewer_out).unwrap_or_default();
        if cut && viewer_moved.is_none() && text.contains("conference moves from ground to sky") {
            viewer_moved = Some(now - a.cut_at);
        }
        if restored && viewer_back.is_none() && text.contains("conference moves from sky to ground")
        {
            viewer_back = Some(now - a.restore_at);
        }
    }
    let status = viewer.0.wait()?;
    let summary = std::fs::read_to_string(&viewer_out)?
        .lines()
        .find(|l| l.starts_with("played "))
        .map(str::to_string);
    let Some(summary) = summary.filter(|_| status.success()) else {
        bail!(
            "the viewer failed ({status}): {}",
            std::fs::read_to_string(dir.join(format!("{SITE}.log"))).unwrap_or_default()
        );
    };
    // Reports: the backlog drains; the controller holds every number the agent gave.
    std::thread::sleep(Duration::from_secs(5));
    let site = one
        .api_get(&format!("/api/sites/{SITE}"))
        .context("the site at the controller")?;
    let latest = site["latest_seq"].as_u64().unwrap_or(0);
    let stored = site["reports"].as_u64().unwrap_or(0);
    let reports_lost = latest.saturating_sub(stored);
    let arrivals: Vec<i64> = {
        let mut v: Vec<i64> = events
            .lock()
            .expect("events")
            .iter()
            .map(|(_, arrived)| *arrived)
            .filter(|t| (ms(a.cut_at - 5.0)..=ms(a.restore_at + 15.0)).contains(t))
            .collect();
        v.sort_unstable();
        v
    };
    let widest = arrivals.windows(2).max_by_key(|w| w[1] - w[0]);
    let report_gap = widest.map_or(i64::MAX, |w| w[1] - w[0]);
    if let Some(w) = widest {
        eprintln!(
            "hybrid-failover: the longest report gap: from {:.2} s to {:.2} s (cut at {}, restored at {})",
            (w[0] - unix0) as f64 / 1000.0,
            (w[1] - unix0) as f64 / 1000.0,
            a.cut_at,
            a.restore_at
        );
    }
    let around: Vec<(i64, i64)> = events
        .lock()
        .expect("events")
        .iter()
        .copied()
        .filter(|(_, arrived)| (ms(a.cut_at - 3.0)..=ms(a.cut_at + 4.0)).contains(arrived))
        .collect();
    eprintln!(
        "hybrid-failover: reports around the cut (taken/visible, s): {}",
        around
            .iter()
            .map(|(t, v)| format!(
                "{:.2}/{:.2}",
                (t - unix0) as f64 / 1000.0,
                (v - unix0) as f64 / 1000.0
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let switches = site["paths"]["switches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let reports_back = switches
        .iter()
        .filter(|s| s["class"] == "reports" && s["to"] == "ground")
        .filter_map(|s| s["at_ms"].as_i64())
        .find(|t| *t >= ms(a.restore_at))
        .map(|t| (t - ms(a.restore_at)) as f64 / 1000.0);
    let reports_away = switches
        .iter()
        .filter(|s| s["class"] == "reports" && s["to"] == "sky")
        .filter_map(|s| s["at_ms"].as_i64())
        .find(|t| *t >= ms(a.cut_at))
        .map(|t| (t - ms(a.cut_at)) as f64 / 1000.0);
    let switch_back = match (reports_back, viewer_back) {
        (Some(r), Some(v)) => r.max(v),
        _ => f64::NAN,
    };
    // The bulk file.
    let done = job(&one).context("the bulk job")?;
    let bytes = done["bytes"].as_u64().unwrap_or(0);
    let sent = done["sent_bytes"].as_u64().unwrap_or(0);
    let acked_at_cut = at_cut
        .as_ref()
        .and_then(|j| j["acked_bytes"].as_u64())
        .unwrap_or(0);
    let finished_after = done["updated_ms"].as_i64().unwrap_or(0) >= ms(a.restore_at);
    // It stayed off the satellite: it did not move while the line was cut, and no switch gave
    // the bulk class the sky path.
    let acked_at_restore = at_restore
        .as_ref()
        .and_then(|j| j["acked_bytes"].as_u64())
        .unwrap_or(u64::MAX);
    let bulk_on_sky = switches
        .iter()
        .any(|s| s["class"] == "bulk" && s["to"] == "sky");
    let resumed = done["state"] == "delivered"
        && acked_at_cut > 0
        && acked_at_cut < bytes
        && finished_after
        && acked_at_restore.saturating_sub(acked_at_cut) <= 256 * 1024
        && !bulk_on_sky;
    let resent_kb = sent.saturating_sub(bytes) / 1024;
    drop(topo);

    let (vid, _aud) = recorded(&out)?;
    if vid.len() < 2 {
        bail!("the viewer recorded {} video frames", vid.len());
    }
    let gaps: Vec<f64> = vid.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    let wall_gap = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("max_wall_gap_ms="))
        .and_then(|v| v.split(',').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let freeze = gaps.iter().copied().fold(wall_gap, f64::max);
    eprintln!("hybrid-failover: the viewer's player: {summary}");
    eprintln!(
        "hybrid-failover: the conference left the ground line {} s after the cut and came back {} s after the restore; \
         the reports left it {} s after the cut and came back {} s after the restore",
        viewer_moved.map_or("?".into(), |v| format!("{v:.1}")),
        viewer_back.map_or("?".into(), |v| format!("{v:.1}")),
        reports_away.map_or("?".into(), |v| format!("{v:.1}")),
        reports_back.map_or("?".into(), |v| format!("{v:.1}")),
    );
    eprintln!(
        "hybrid-failover: the bulk file: {} of {bytes} bytes acknowledged at the cut, {acked_at_restore} at the restore, {} at the end ({}), \
         {sent} bytes written to streams (bulk given the sky path: {bulk_on_sky}); {sky_outage_bytes} bytes went down the sky link during the outage (video, repair, reports)",
        acked_at_cut, done["acked_bytes"], done["state"],
    );
    eprintln!(
        "hybrid-failover: reports {stored} stored of {latest} numbered; {} frames recorded, longest gap {:.0} ms, longest wait {:.0} ms; skipped groups {}",
        vid.len(),
        gaps.iter().copied().fold(0.0, f64::max),
        wall_gap,
        field(&summary, "skipped").unwrap_or(f64::NAN),
    );
    println!(
        "hybrid-failover video_freeze_ms={freeze:.0} reports_lost={reports_lost} report_gap_ms={report_gap} \
         switch_back_s={switch_back:.1} transfer_resumed={} bytes_resent_kb={resent_kb}",
        if resumed { "yes" } else { "no" }
    );
    Ok(())
}
