//! Conferences over emulated links (root: network namespaces and the user-space link
//! emulator), with the real `tiandi-video` binaries and `ffprobe`: a GEO site (600 ms RTT, 1 %
//! loss), a site behind 512 kbit/s, and a terrestrial site watch the ministry's test pattern;
//! and through a cascade with loss at each hop (a GEO county at 5 %).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tiandi_link::pki::{self, Ca};
use tiandi_satlink::{Shape, Spec, Topology};
use tiandi_tests::{bin, can_emulate_links, command_in};

/// A site's certificate, or a relay's for an ID ending in `-relay` (a cascading relay joins
/// the one above in the relay role).
fn creds(ca: &Ca, dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    let (key, csr) = pki::site_key_and_csr(id).unwrap();
    let ttl = Duration::from_secs(3600);
    let cert = if id.ends_with("-relay") {
        ca.sign_relay(&csr, id, "GD", ttl)
    } else {
        ca.sign_site(&csr, id, "GD", ttl)
    }
    .unwrap()
    .cert_pem;
    let (c, k) = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn video(ns: &str, dir: &Path, me: &str, args: &[&str], c: &(PathBuf, PathBuf), ca: &Path) -> Kill {
    Kill(
        command_in(Some(ns), bin("tiandi-video"))
            .args(args)
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(&c.0)
            .arg("--key")
            .arg(&c.1)
            .args([
                "--profile",
                "geo",
                "--log",
                &std::env::var("TIANDI_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ])
            .stdout(std::fs::File::create(dir.join(format!("{me}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{me}.log"))).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits for the players to end, each successfully.
async fn wait_all(players: Vec<Kill>) {
    for mut p in players {
        let st = tokio::task::spawn_blocking(move || p.0.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(st.success());
    }
}

/// The `played …` summary `tiandi-video join` printed for `n`.
fn summary(d: &Path, n: &str) -> String {
    std::fs::read_to_string(d.join(format!("{n}.out")))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("played "))
        .unwrap_or_else(|| {
            panic!(
                "{n} printed no summary: {}",
                std::fs::read_to_string(d.join(format!("{n}.log"))).unwrap_or_default()
            )
        })
        .to_string()
}

/// (height, pts) of each video frame, and pts of each audio frame.
fn frames(path: &Path) -> (Vec<(u64, f64)>, Vec<f64>) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "frame=media_type,pts_time,height",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (mut vid, mut aud) = (Vec::new(), Vec::new());
    for f in v["frames"].as_array().unwrap() {
        let Some(t) = f["pts_time"].as_str().and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        match f["media_type"].as_str() {
            Some("video") => vid.push((f["height"].as_u64().unwrap_or(0), t)),
            Some("audio") => aud.push(t),
            _ => {}
        }
    }
    (vid, aud)
}

fn stat(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing in {line:?}"))
}

/// What the GEO site played (`tiandi-video join`'s summary and the recording read back).
struct GeoPlayed {
    /// The summary line.
    line: String,
    video_frames: usize,
    audio_frames: usize,
    /// Groups the player skipped per track (dropped on the way, or given up on as late):
    /// video, audio.
    skipped: Vec<u64>,
    /// The longest wall-clock wait between consecutive frames per track (ms): video, audio.
    max_wall_gap_ms: Vec<f64>,
}

/// The scenario of [`geo_under_a_second_narrow_link_gets_the_low_rendition_nobody_stalls`],
/// with every assertion of it: the ministry publishes the test pattern on a relay; a GEO site
/// (600 ms RTT, 1 % loss, 4 Mbit/s), a site behind 512 kbit/s and a terrestrial site watch it
/// for 30 s. `geo_displace_pct` of the GEO link's frames (both ways) are held back by 1–20 ms
/// (the emulator's bounded reordering; 0: none). Topologies running side by side need their
/// own `prefix` and `net`. Returns what the GEO site played.
async fn geo_narrow_terrestrial(prefix: &str, net: [u8; 3], geo_displace_pct: f64) -> GeoPlayed {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let geo = Shape {
        rate_kbit: 4_000,
        delay_ms: 300.0,
        loss_pct: 1.0,
        queue_bytes: 400_000,
        displace_pct: geo_displace_pct,
        displace_ms: 20.0,
        ..Shape::default()
    };
    let narrow_down = Shape {
        rate_kbit: 512,
        delay_ms: 20.0,
        queue_bytes: 48_000,
        ..Shape::default()
    };
    let lan = Shape {
        rate_kbit: 10_000,
        delay_ms: 20.0,
        queue_bytes: 200_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: prefix.into(),
        net,
        sites: vec![
            (geo.clone(), geo),
            (lan.clone(), narrow_down),
            (lan.clone(), lan),
        ],
        seed: Some(11),
        second: Vec::new(),
        second_net: None,
    };
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    // TIANDI_TEST_KEEP=1 keeps the logs and recordings.
    let d = &if std::env::var_os("TIANDI_TEST_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let ca = Ca::generate("test CA").unwrap();
    let ca_p = d.join("ca.pem");
    std::fs::write(&ca_p, ca.cert_pem()).unwrap();
    let relay_addr = format!("{}:4500", topo.ctl_addr());
    let ctl = topo.ctl_ns();
    let _relay = video(
        &ctl,
        d,
        "relay",
        &["relay", "--listen", &relay_addr, "--name", "ministry-relay"],
        &creds(&ca, d, "ministry-relay"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_millis(500));
    let join = |me: &str| -> Vec<String> {
        [
            "join",
            "--relay",
            &relay_addr,
            "--relay-name",
            "ministry-relay",
            "--room",
            "drill",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once(String::new()).filter(|_| me.is_empty()))
        .collect()
    };
    let mut pub_args = join("ministry");
    pub_args.extend(["--publish", "pattern", "--duration", "45"].map(String::from));
    let pub_args: Vec<&str> = pub_args.iter().map(String::as_str).collect();
    let _publisher = video(
        &ctl,
        d,
        "ministry",
        &pub_args,
        &creds(&ca, d, "ministry"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_secs(2));
    let names = ["gd-geo", "gd-narrow", "gd-lan"];
    let outs: Vec<PathBuf> = names.iter().map(|n| d.join(format!("{n}.ts"))).collect();
    let players: Vec<Kill> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut a = join(n);
            a.extend(
                [
                    "--play",
                    outs[i].to_str().unwrap(),
                    "--from",
                    "ministry",
                    "--duration",
                    "30",
                ]
                .map(String::from),
            );
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            video(&topo.site_ns(i + 1), d, n, &a, &creds(&ca, d, n), &ca_p)
        })
        .collect();
    wait_all(players).await;
    let line = |n: &str| summary(d, n);
    for n in names {
        eprintln!("{n}: {}", line(n));
    }

    // GEO, 1 % loss (issue 19's targets, with room for noise): at least 99 % of the frames
    // sent shown (counted in the recording), no hole or stall in the picture of half a
    // second, every frame within 1.2 s of capture at the 99th percentile (glass to glass, by
    // the publisher's clock carried with the test pattern: the path's delay, the player's
    // cushion for repairs), and the sound never stalls audibly.
    let g = line("gd-geo");
    let (gv, ga) = frames(&outs[0]);
    let gtimes: Vec<f64> = gv.iter().map(|f| f.1).collect();
    let (shown, gap, agap) = (
        shown_pct(&gtimes),
        longest_gap_ms(&gtimes),
        longest_gap_ms(&ga),
    );
    eprintln!("gd-geo: shown {shown:.2} %, longest gap {gap:.0} ms, sound gap {agap:.0} ms");
    assert!(
        gv.len() > 600 && ga.len() > 1200,
        "{} video, {} audio frames",
        gv.len(),
        ga.len()
    );
    assert!(shown >= 99.0, "{shown:.2} % of the frames shown: {g}");
    assert!(gap < 500.0, "a {gap:.0} ms hole in the picture: {g}");
    assert!(agap < 150.0, "a {agap:.0} ms hole in the sound: {g}");
    assert!(stat(&g, "latency_p50_ms") < 1000.0, "{g}");
    assert!(stat(&g, "latency_p99_ms") < 1200.0, "{g}");
    let stalls = |i: usize| {
        g.split("max_wall_gap_ms=")
            .nth(1)
            .and_then(|v| {
                v.split_whitespace()
                    .next()?
                    .split(',')
                    .nth(i)?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap()
    };
    assert!(
        stalls(0) < 500.0,
        "the picture stood still {} ms: {g}",
        stalls(0)
    );
    assert!(stalls(1) < 500.0, "the sound stalled {} ms: {g}", stalls(1));

    // The narrow site ends up on the low rendition, and from then on nothing stalls.
    let (nv, na) = frames(&outs[1]);
    let tail: Vec<&(u64, f64)> = nv
        .iter()
        .filter(|(_, t)| *t > nv.last().unwrap().1 - 10.0)
        .collect();
    assert!(
        !tail.is_empty() && tail.iter().all(|(h, _)| *h == 360),
        "narrow site heights: {:?}",
        tail.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    // At most one group lost in those 10 s (a keyframe burst overflowing the link's 48 KB
    // queue), and the sound goes on without a gap.
    let gaps: Vec<(f64, f64)> = tail
        .windows(2)
        .filter(|w| w[1].1 - w[0].1 > 0.045)
        .map(|w| (w[0].1, w[1].1))
        .collect();
    assert!(gaps.len() <= 1, "narrow site video gaps {gaps:?}");
    let atail: Vec<f64> = na
        .iter()
        .copied()
        .filter(|t| *t > na.last().unwrap() - 10.0)
        .collect();
    assert!(
        atail.len() > 400,
        "{} audio frames in the narrow site's last 10 s",
        atail.len()
    );
    for w in atail.windows(2) {
        assert!(
            w[1] - w[0] < 0.03,
            "narrow site audio gap {} → {}",
            w[0],
            w[1]
        );
    }

    // The terrestrial site keeps the high rendition without a gap.
    let (lv, _) = frames(&outs[2]);
    assert!(
        lv.iter().all(|(h, _)| *h == 720),
        "terrestrial site got low frames"
    );
    for w in lv.windows(2) {
        assert!(
            w[1].1 - w[0].1 < 0.045,
            "terrestrial video gap {} → {}",
            w[0].1,
            w[1].1
        );
    }
    drop(topo);
    let list = |key: &str| -> Vec<f64> {
        g.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing in {g:?}"))
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect()
    };
    GeoPlayed {
        skipped: list("skipped").into_iter().map(|v| v as u64).collect(),
        max_wall_gap_ms: list("max_wall_gap_ms"),
        video_frames: gv.len(),
        audio_frames: ga.len(),
        line: g,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_under_a_second_narrow_link_gets_the_low_rendition_nobody_stalls() {
    let geo = geo_narrow_terrestrial("tdvid", [10, 204, 0], 0.0).await;
    eprintln!(
        "gd-geo without reordering: video_frames={} audio_frames={} skipped={:?} max_wall_gap_ms={:?}",
        geo.video_frames, geo.audio_frames, geo.skipped, geo.max_wall_gap_ms
    );
}

/// Issue 13: at 1 % bounded reordering (frames held back 1–20 ms) on the GEO link, the GEO site
/// loses no more groups than without reordering, and nothing freezes for longer.
///
/// The name extends the test above so that nextest's override for it (`test(…)` matches by
/// substring) runs this one alone too: real encoders in real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_under_a_second_narrow_link_gets_the_low_rendition_nobody_stalls_with_1_pct_bounded_reordering()
 {
    // Every assertion of the test without reordering holds (inside the scenario), among them
    // the GEO site's own: at least 99 % of the frames shown, no hole or stall of half a second
    // in the picture, frame age p99 within 1.2 s, the sound without an audible gap.
    let geo = geo_narrow_terrestrial("tdvidr", [10, 205, 0], 1.0).await;
    eprintln!(
        "gd-geo with 1 % bounded reordering: video_frames={} audio_frames={} skipped={:?} max_wall_gap_ms={:?}",
        geo.video_frames, geo.audio_frames, geo.skipped, geo.max_wall_gap_ms
    );
    // And the player gave up at most one video group (issue 13's bound was 7 of the ~16 a
    // 30 s call carries, before issue 19; 99 % of the frames allows one).
    assert!(
        geo.skipped[0] <= 1,
        "{} video groups lost at 1 % bounded reordering: {}",
        geo.skipped[0],
        geo.line
    );
}

/// Frames shown of those sent (%), from a recording's video frame times at 25 fps: the frames
/// between the first and the last recorded against those the publisher sent over that span.
fn shown_pct(times: &[f64]) -> f64 {
    let (Some(first), Some(last)) = (times.first(), times.last()) else {
        return 0.0;
    };
    let sent = ((last - first) * 25.0).round() + 1.0;
    100.0 * times.len() as f64 / sent
}

/// The longest step between consecutive times (ms).
fn longest_gap_ms(times: &[f64]) -> f64 {
    times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max)
}

/// Issue 19: the picture holds through a cascade with loss at each hop. The ministry relay (the
/// controller's network) and the test pattern; a province relay cascading from it behind a
/// terrestrial line losing 1 % each way; a county behind a GEO link (4 Mbit/s, 600 ms) losing
/// 5 % each way, the worst case the issue names (at least 97 % of the frames, no freeze over a
/// second, frame age p99 within 1.5 s, the sound without an audible gap); and a county on a
/// narrow 512 kbit/s line losing 1 %, which says so (`--link-kbps`, as a site that knows its
/// line does) and gets the low rendition through the cascade and holds it. The frames are
/// counted from the recordings with `ffprobe`.
///
/// The name extends the GEO test's, so that nextest's override for it (the cores to itself: real
/// encoders in real time) covers this one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_under_a_second_narrow_link_gets_the_low_rendition_nobody_stalls_through_a_lossy_cascade()
 {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let province = Shape {
        rate_kbit: 20_000,
        delay_ms: 10.0,
        loss_pct: 1.0,
        queue_bytes: 500_000,
        ..Shape::default()
    };
    let geo = Shape {
        rate_kbit: 4_000,
        delay_ms: 300.0,
        loss_pct: 5.0,
        queue_bytes: 100_000,
        ..Shape::default()
    };
    let narrow_down = Shape {
        rate_kbit: 512,
        delay_ms: 20.0,
        loss_pct: 1.0,
        queue_bytes: 48_000,
        ..Shape::default()
    };
    let narrow_up = Shape {
        rate_kbit: 2_000,
        delay_ms: 20.0,
        loss_pct: 1.0,
        queue_bytes: 100_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: "tdvcas".into(),
        net: [10, 206, 0],
        sites: vec![
            (province.clone(), province),
            (geo.clone(), geo),
            (narrow_up, narrow_down),
        ],
        seed: Some(23),
        second: Vec::new(),
        second_net: None,
    };
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    // TIANDI_TEST_KEEP=1 keeps the logs and recordings.
    let d = &if std::env::var_os("TIANDI_TEST_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let ca = Ca::generate("test CA").unwrap();
    let ca_p = d.join("ca.pem");
    std::fs::write(&ca_p, ca.cert_pem()).unwrap();
    let ministry = format!("{}:4500", topo.ctl_addr());
    let gd = format!("{}:4500", topo.site_addr(1));
    let ctl = topo.ctl_ns();
    let _top = video(
        &ctl,
        d,
        "ministry-relay",
        &["relay", "--listen", &ministry, "--name", "ministry-relay"],
        &creds(&ca, d, "ministry-relay"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_millis(500));
    let _gd_relay = video(
        &topo.site_ns(1),
        d,
        "gd-relay",
        &[
            "relay",
            "--listen",
            &gd,
            "--name",
            "gd-relay",
            "--upstream",
            &ministry,
            "--upstream-name",
            "ministry-relay",
        ],
        &creds(&ca, d, "gd-relay"),
        &ca_p,
    );
    let _publisher = video(
        &ctl,
        d,
        "ministry",
        &[
            "join",
            "--relay",
            &ministry,
            "--relay-name",
            "ministry-relay",
            "--room",
            "drill",
            "--publish",
            "pattern",
            "--duration",
            "50",
        ],
        &creds(&ca, d, "ministry"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_secs(3));
    let names = ["gd-geo", "gd-narrow"];
    let outs: Vec<PathBuf> = names.iter().map(|n| d.join(format!("{n}.ts"))).collect();
    let players: Vec<Kill> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let out = outs[i].to_str().unwrap().to_string();
            let line = if *n == "gd-narrow" { "512" } else { "0" };
            video(
                &topo.site_ns(i + 2),
                d,
                n,
                &[
                    "join",
                    "--relay",
                    &gd,
                    "--relay-name",
                    "gd-relay",
                    "--room",
                    "drill",
                    "--play",
                    &out,
                    "--from",
                    "ministry",
                    "--duration",
                    "30",
                    "--link-kbps",
                    line,
                ],
                &creds(&ca, d, n),
                &ca_p,
            )
        })
        .collect();
    wait_all(players).await;
    let line = |n: &str| summary(d, n);
    let (g, n) = (line("gd-geo"), line("gd-narrow"));
    drop(topo);

    // The GEO county, 5 % loss below 1 % loss: the targets at 5 %, with room for noise.
    let (gv, ga) = frames(&outs[0]);
    let times: Vec<f64> = gv.iter().map(|f| f.1).collect();
    let (shown, gap, agap) = (
        shown_pct(&times),
        longest_gap_ms(&times),
        longest_gap_ms(&ga),
    );
    eprintln!(
        "gd-geo: {g}\ngd-geo: shown {shown:.2} %, longest gap {gap:.0} ms, sound gap {agap:.0} ms"
    );
    assert!(gv.len() > 600, "{} video frames: {g}", gv.len());
    assert!(shown >= 97.0, "{shown:.2} % of the frames shown: {g}");
    assert!(gap < 1000.0, "a {gap:.0} ms hole in the picture: {g}");
    let wall = g
        .split("max_wall_gap_ms=")
        .nth(1)
        .and_then(|v| v.split(',').next()?.parse::<f64>().ok())
        .unwrap();
    assert!(wall < 1000.0, "the picture stood still {wall:.0} ms: {g}");
    assert!(stat(&g, "latency_p99_ms") < 1500.0, "{g}");
    assert!(agap < 300.0, "a {agap:.0} ms hole in the sound: {g}");

    // The narrow county is on the low rendition and holds it: its last 10 s complete.
    let (nv, na) = frames(&outs[1]);
    let end = nv.last().map_or(0.0, |f| f.1);
    let tail: Vec<&(u64, f64)> = nv.iter().filter(|(_, t)| *t > end - 10.0).collect();
    eprintln!("gd-narrow: {n}");
    assert!(
        !tail.is_empty() && tail.iter().all(|(h, _)| *h == 360),
        "narrow site heights: {:?}",
        tail.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let tail_times: Vec<f64> = tail.iter().map(|f| f.1).collect();
    let tail_shown = shown_pct(&tail_times);
    assert!(
        tail_shown >= 97.0,
        "{tail_shown:.2} % of the low rendition's frames in the last 10 s: {n}"
    );
    let atail: Vec<f64> = na.iter().copied().filter(|t| *t > end - 10.0).collect();
    assert!(
        longest_gap_ms(&atail) < 300.0,
        "narrow site sound gap {:.0} ms",
        longest_gap_ms(&atail)
    );
}

/// Issue 20: a dual-homed county plays a conference over its ground line and keeps playing
/// through a cut of it: a session over each path (the satellite's a standby), the conference
/// moves to the satellite when the line fails (no freeze of 2.5 s or more, no group given up
/// for good) and back to the line after its hold once it returns; the relay's roster lists the
/// county once, with both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_homed_county_keeps_playing_through_a_cut_of_its_ground_line() {
    assert!(
        can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let ground = Shape {
        rate_kbit: 10_000,
        delay_ms: 10.0,
        queue_bytes: 250_000,
        ..Shape::default()
    };
    let sky = Shape {
        rate_kbit: 4_000,
        delay_ms: 300.0,
        loss_pct: 1.0,
        queue_bytes: 100_000,
        ..Shape::default()
    };
    let spec = Spec {
        prefix: "tdvdh".into(),
        net: [10, 211, 0],
        sites: vec![(ground.clone(), ground)],
        seed: Some(20),
        second: vec![(sky.clone(), sky)],
        second_net: None,
    };
    let topo = Topology::up(&spec).expect("topology up");
    let tmp = tempfile::tempdir().unwrap();
    let d = &if std::env::var_os("TIANDI_TEST_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let ca = Ca::generate("test CA").unwrap();
    let ca_p = d.join("ca.pem");
    std::fs::write(&ca_p, ca.cert_pem()).unwrap();
    let ctl = topo.ctl_ns();
    let relay1 = format!("{}:4500", topo.ctl_addr());
    let relay2 = format!("{}:4500", topo.ctl_addr2().unwrap());
    let _relay = video(
        &ctl,
        d,
        "ministry-relay",
        &[
            "relay",
            "--listen",
            "0.0.0.0:4500",
            "--name",
            "ministry-relay",
            "--metrics",
            "127.0.0.1:9466",
        ],
        &creds(&ca, d, "ministry-relay"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_millis(500));
    let _publisher = video(
        &ctl,
        d,
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
            "60",
        ],
        &creds(&ca, d, "ministry"),
        &ca_p,
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = d.join("gd-dual.ts");
    let ground_path = format!(
        "ground={},relay={relay1},profile=terrestrial",
        topo.site_addr(1)
    );
    let sky_path = format!(
        "sky={},relay={relay2},profile=geo",
        topo.site_addr2(1).unwrap()
    );
    let viewer = video(
        &topo.site_ns(1),
        d,
        "gd-dual",
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
            out.to_str().unwrap(),
            "--from",
            "ministry",
            "--duration",
            "40",
        ],
        &creds(&ca, d, "gd-dual"),
        &ca_p,
    );
    let said =
        |what: &str| std::fs::read_to_string(d.join("gd-dual.out")).is_ok_and(|s| s.contains(what));
    for _ in 0..100 {
        if said("playing ministry") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The relay's roster: the county once, both paths, playing over the ground line.
    let roster = tiandi_satlink::topo::in_netns(&ctl, || {
        Command::new("curl")
            .args(["-s", "http://127.0.0.1:9466/metrics"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    })
    .unwrap();
    let participants = roster
        .lines()
        .find(|l| l.starts_with("tiandi_video_room_participants{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(
        participants,
        Some(2),
        "the publisher and the county, once for its two sessions: {roster}"
    );
    topo.link(1).cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        said("conference moves from ground to sky"),
        "{}",
        std::fs::read_to_string(d.join("gd-dual.log")).unwrap_or_default()
    );
    topo.link(1).restore();
    wait_all(vec![viewer]).await;
    let s = summary(d, "gd-dual");
    assert!(said("conference moves from sky to ground"), "{s}");
    drop(topo);

    let (v, _a) = frames(&out);
    let times: Vec<f64> = v.iter().map(|f| f.1).collect();
    let (shown, gap) = (shown_pct(&times), longest_gap_ms(&times));
    let wall = s
        .split("max_wall_gap_ms=")
        .nth(1)
        .and_then(|v| v.split(',').next()?.parse::<f64>().ok())
        .unwrap();
    eprintln!(
        "gd-dual: {s}\ngd-dual: shown {shown:.2} %, longest gap {gap:.0} ms, longest wait {wall:.0} ms"
    );
    assert!(v.len() > 500, "{} video frames: {s}", v.len());
    assert!(gap < 2500.0, "a {gap:.0} ms hole in the picture: {s}");
    assert!(wall < 2500.0, "the picture stood still {wall:.0} ms: {s}");
    assert!(shown >= 90.0, "{shown:.2} % of the frames shown: {s}");
}
