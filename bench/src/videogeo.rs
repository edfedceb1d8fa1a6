//! `video-geo`: a conference as a county on a GEO link sees it (issue 19). The real
//! `tiandi-video` binaries over the project's own link emulator: the test pattern published at
//! the ministry (its relay in the controller's namespace), a province relay cascading from it
//! behind a terrestrial line (20 Mbit/s, 10 ms each way, clean), and a county viewer joining the
//! province relay behind a GEO link (`--rate-kbit`, `--rtt-ms`, `--loss-pct` each way). The
//! viewer records what it shows; the bench reads the recording back with `ffprobe`.
//!
//! Figures:
//! - `frames_sent`: the frames the publisher sent over the recording's span (25 fps between
//!   the first and the last recorded frame); `frames_shown_pct`: the share of them recorded.
//! - `freezes`: gaps of 120 ms or more between consecutive recorded frames (two frames or more
//!   missing), plus the player's stalls: waits of 120 ms or more between frames it showed
//!   (counted apart, so a stall over missing frames counts twice: an upper bound);
//!   `longest_freeze_ms`: the longest still picture, the larger of the longest gap in the
//!   recording and the longest wall-clock wait between frames at the player.
//! - `age_p50_ms`, `age_p99_ms`: capture to display, by the publisher's clock carried in the
//!   test pattern (the player's figures).
//! - `audio_gap_max_ms`: the longest hole in the recorded sound (21 ms is one AAC frame: none).
//! - `repair_overhead_pct`: repair datagram bytes the province relay sent the county, against
//!   the media payload bytes it sent it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tiandi_link::pki::{self, Ca};
use tiandi_satlink::topo::in_netns;
use tiandi_satlink::{Shape, Spec, Topology};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Random loss on the GEO link, each way (%).
    #[arg(long, default_value_t = 1.0)]
    pub loss_pct: f64,
    /// Seconds the county watches.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// The GEO link's rate, each way (kbit/s).
    #[arg(long, default_value_t = 4000)]
    pub rate_kbit: u64,
    /// The GEO link's round trip (ms).
    #[arg(long, default_value_t = 600.0)]
    pub rtt_ms: f64,
    /// Keep the logs and the recording in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

const FPS: f64 = 25.0;
/// A gap between recorded frames this long or longer is a freeze (two frames or more missing).
const FREEZE_MS: f64 = 120.0;

pub(crate) struct Kill(pub(crate) Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn creds(ca: &Ca, dir: &Path, id: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (key, csr) = pki::site_key_and_csr(id)?;
    let ttl = Duration::from_secs(86_400);
    let cert = if id.ends_with("-relay") {
        ca.sign_relay(&csr, id, "GD", ttl)?
    } else {
        ca.sign_site(&csr, id, "GD", ttl)?
    }
    .cert_pem;
    let (c, k) = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
    std::fs::write(&c, cert)?;
    std::fs::write(&k, key)?;
    Ok((c, k))
}

/// `tiandi-video args…` as `me` in namespace `ns`, its output in `dir/me.out|log`. The province
/// relay logs each group it resets, with its path's state (why it was still unacknowledged).
pub(crate) fn video(
    bin: &Path,
    ns: &str,
    dir: &Path,
    me: &str,
    args: &[&str],
) -> anyhow::Result<Kill> {
    // Why groups are lost: the province relay logs each group it resets, the county's
    // player each group it gives up.
    let log = match me {
        "gd-relay" => "info,tiandi_video::forward=debug",
        "gd-county" => "info,tiandi_video::play=debug,tiandi_video::forward=debug",
        _ => "info",
    };
    let child = Topology::command(ns, bin)
        .args(args)
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join(format!("{me}.pem")))
        .arg("--key")
        .arg(dir.join(format!("{me}.key")))
        .args(["--profile", "geo", "--log", log])
        .stdout(std::fs::File::create(dir.join(format!("{me}.out")))?)
        .stderr(std::fs::File::create(dir.join(format!("{me}.log")))?)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Kill(child))
}

/// Recorded video and audio frames' presentation times (s).
pub(crate) fn recorded(path: &Path) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "frame=media_type,pts_time",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .context("ffprobe (apt-get install ffmpeg)")?;
    if !out.status.success() {
        bail!(
            "ffprobe {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (mut vid, mut aud) = (Vec::new(), Vec::new());
    for f in v["frames"].as_array().into_iter().flatten() {
        let Some(t) = f["pts_time"].as_str().and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        match f["media_type"].as_str() {
            Some("video") => vid.push(t),
            Some("audio") => aud.push(t),
            _ => {}
        }
    }
    vid.sort_by(f64::total_cmp);
    vid.dedup();
    aud.sort_by(f64::total_cmp);
    Ok((vid, aud))
}

/// `key=value` from the player's summary line (the first value of a list).
pub(crate) fn field(line: &str, key: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .with_context(|| format!("no {key} in the player's summary {line:?}"))
}

/// A counter of the province relay's metrics (summed over its series).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(0.0..=50.0).contains(&a.loss_pct) || a.duration < 10.0 || a.rtt_ms < 2.0 {
        bail!("--loss-pct 0..=50, --duration ≥ 10 s and --rtt-ms ≥ 2 are needed");
    }
    let bin = crate::ingest::release_binaries(&["tiandi-media"])?.remove(0);
    let geo = Shape {
        rate_kbit: a.rate_kbit,
        delay_ms: a.rtt_ms / 2.0,
        loss_pct: a.loss_pct,
        // A VSAT modem's buffer: 200 ms at the carrier's rate.
        queue_bytes: (a.rate_kbit * 1000 / 8 / 5).max(64_000),
        ..Shape::default()
    };
    let ground = Shape {
        rate_kbit: 20_000,
        delay_ms: 10.0,
        queue_bytes: 500_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: "tdvgeo".into(),
        net: [10, 207, 0],
        sites: vec![(ground.clone(), ground), (geo.clone(), geo)],
        seed: Some(19),
        second: Vec::new(),
        second_net: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let topo = Topology::up(&spec).context("emulated links (root and /dev/net/tun)")?;
    let tmp = tempfile::tempdir()?;
    let dir = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let ca = Ca::generate("video-geo CA")?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    for id in ["ministry-relay", "gd-relay", "ministry", "gd-county"] {
        creds(&ca, &dir, id)?;
    }
    let (ctl, prov, county) = (topo.ctl_ns(), topo.site_ns(1), topo.site_ns(2));
    let ministry = format!("{}:4500", topo.ctl_addr());
    let province = format!("{}:4500", topo.site_addr(1));
    let _ministry_relay = video(
        &bin,
        &ctl,
        &dir,
        "ministry-relay",
        &["relay", "--listen", &ministry, "--name", "ministry-relay"],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let _province_relay = video(
        &bin,
        &prov,
        &dir,
        "gd-relay",
        &[
            "relay",
            "--listen",
            &province,
            "--name",
            "gd-relay",
            "--upstream",
            &ministry,
            "--upstream-name",
            "ministry-relay",
            "--metrics",
            "127.0.0.1:9464",
        ],
    )?;
    let room = ["--room", "drill"];
    let publish_s = format!("{}", a.duration + 30.0);
    let mut args = vec![
        "join",
        "--relay",
        &ministry,
        "--relay-name",
        "ministry-relay",
    ];
    args.extend(room);
    args.extend(["--publish", "pattern", "--duration", &publish_s]);
    let _publisher = video(&bin, &ctl, &dir, "ministry", &args)?;
    std::thread::sleep(Duration::from_secs(3));
    let out = dir.join("gd-county.ts");
    let watch_s = format!("{}", a.duration);
    let out_s = out.to_string_lossy().to_string();
    let mut args = vec!["join", "--relay", &province, "--relay-name", "gd-relay"];
    args.extend(room);
    args.extend([
        "--play",
        &out_s,
        "--from",
        "ministry",
        "--duration",
        &watch_s,
    ]);
    eprintln!(
        "video-geo: the county watches for {} s over {} kbit/s, {} ms, {} % loss",
        a.duration, a.rate_kbit, a.rtt_ms, a.loss_pct
    );
    let mut viewer = video(&bin, &county, &dir, "gd-county", &args)?;
    let scrape = || {
        in_netns(&prov, || {
            crate::ingest::http()
                .get("http://127.0.0.1:9464/metrics")
                .call()
                .ok()?
                .into_body()
                .read_to_string()
                .ok()
        })
        .ok()
        .flatten()
    };
    // The province relay's roster while the county watches (its player reports every 5 s).
    let mut roster = String::new();
    let status = loop {
        if let Some(st) = viewer.0.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_secs(2));
        if let Some(m) = scrape().filter(|m| m.contains("participant_frames_shown_ratio{")) {
            roster = m;
        }
    };
    let summary = std::fs::read_to_string(dir.join("gd-county.out"))?
        .lines()
        .find(|l| l.starts_with("played "))
        .map(str::to_string);
    let Some(summary) = summary.filter(|_| status.success()) else {
        bail!(
            "the county's player failed ({status}): {}",
            std::fs::read_to_string(dir.join("gd-county.log")).unwrap_or_default()
        );
    };
    let metrics = scrape().context("the province relay's metrics")?;
    let geo_link = topo.link(2).status().down_counters;
    drop(topo);

    let (vid, aud) = recorded(&out)?;
    if vid.len() < 2 {
        bail!("the county recorded {} video frames", vid.len());
    }
    let span = vid[vid.len() - 1] - vid[0];
    let frames_sent = (span * FPS).round() as u64 + 1;
    let shown_pct = 100.0 * vid.len() as f64 / frames_sent as f64;
    let gaps: Vec<f64> = vid.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    let stalls = field(&summary, "freezes")? as usize;
    let freezes = gaps.iter().filter(|g| **g >= FREEZE_MS).count() + stalls;
    let wall_gap = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("max_wall_gap_ms="))
        .and_then(|v| v.split(',').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let longest = gaps.iter().copied().fold(wall_gap, f64::max);
    let audio_gap = aud
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max);
    let payload = counter(&metrics, "tiandi_video_payload_bytes_sent_total");
    let repair = counter(&metrics, "tiandi_video_repair_bytes_sent_total");
    eprintln!("video-geo: the county's player: {summary}");
    // Where lost groups went: reset by the province relay (a newer group replaced one still
    // unacknowledged), or skipped by the player (dropped on the way or given up on as late).
    eprintln!(
        "video-geo: groups reset by the province relay: {}; groups the player skipped (video, audio): {}",
        counter(&metrics, "tiandi_video_groups_dropped_total"),
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("skipped="))
            .unwrap_or("?")
    );
    eprintln!(
        "video-geo: the province relay's roster, the county's last report: shown {:.1} %, {} freezes, longest {:.0} ms, age p99 {:.0} ms",
        100.0 * counter(&roster, "tiandi_video_participant_frames_shown_ratio"),
        counter(&roster, "tiandi_video_participant_freezes_total"),
        1000.0 * counter(&roster, "tiandi_video_participant_longest_freeze_seconds"),
        1000.0 * counter(&roster, "tiandi_video_participant_frame_age_p99_seconds"),
    );
    eprintln!(
        "video-geo: the GEO link toward the county: {} frames in, {} lost at random, {} dropped by its full queue",
        geo_link.frames_in, geo_link.lost, geo_link.queue_drops
    );
    println!(
        "video-geo loss_pct={} frames_sent={frames_sent} frames_shown_pct={shown_pct:.2} freezes={freezes} \
         longest_freeze_ms={longest:.0} age_p50_ms={:.0} age_p99_ms={:.0} audio_gap_max_ms={audio_gap:.0} \
         repair_overhead_pct={:.1}",
        a.loss_pct,
        field(&summary, "latency_p50_ms")?,
        field(&summary, "latency_p99_ms")?,
        if payload > 0.0 {
            100.0 * repair / payload
        } else {
            0.0
        },
    );
    Ok(())
}
