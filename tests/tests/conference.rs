//! Conferences run by the controller: its relay, created, shown and ended with
//! `tiandi-controller conference`, floor and roll call from the CLI, enrolled sites only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiandi_tests::{AgentProc, ControllerProc};
use tiandi_video::client::Session;
use tiandi_video::conference_wire::{self, Object, Role, TrackInfo};
use tiandi_video::track::Track;

struct Site {
    cert: String,
    key: String,
    ca: String,
}

fn enroll(ctl: &ControllerProc, dir: &std::path::Path, id: &str) -> Site {
    let token = ctl.enroll(id, "BJ", &[]);
    let a = AgentProc::enroll(&dir.join(id), ctl.quic, &token, "");
    let idd = a.dir.join("data/identity");
    let read = |f: &str| std::fs::read_to_string(idd.join(f)).unwrap();
    Site {
        cert: read("site.crt"),
        key: read("site.key"),
        ca: read("ca.crt"),
    }
}

fn cli_json(ctl: &ControllerProc, args: &[&str]) -> serde_json::Value {
    let out = ctl.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn join(
    addr: std::net::SocketAddr,
    relay: &str,
    s: &Site,
    room: &str,
) -> Result<Arc<Session>, String> {
    let tls = tiandi_video::client_tls(&s.ca, &s.cert, &s.key).unwrap();
    let cfg = tiandi_link::client_config(
        tls,
        tiandi_video::transport(tiandi_link::LinkProfile::Terrestrial),
    )
    .unwrap();
    let ep = tiandi_link::client_endpoint(addr).unwrap();
    let conn = ep
        .connect_with(cfg, addr, &tiandi_link::tls::relay_server_name(relay))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Session::join(conn, room, Role::Site, vec![], 0)
        .await
        .map_err(|e| e.to_string())
}

fn video(publisher: &str) -> Arc<Track> {
    Track::new(TrackInfo {
        publisher: publisher.into(),
        kind: "video".into(),
        codec: "h264".into(),
        rendition: "high".into(),
        bitrate_kbps: 1500,
        ..Default::default()
    })
}

async fn groups(t: Arc<Track>, from: u64, n: u64) {
    for g in from..from + n {
        let group = t.start_group(g);
        for i in 0..5 {
            group.push(Object {
                pts_us: (g * 5 + i) as i64 * 40_000,
                flags: if i == 0 {
                    conference_wire::flags::KEY
                } else {
                    0
                },
                payload: Bytes::from(vec![1u8; 3000]),
            });
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        group.finish();
    }
}

/// A real test pattern (H.264 + AAC) published by `site` over its session.
async fn publish_pattern(s: &Arc<Session>, site: &str) -> tiandi_media::Source {
    let src = tiandi_media::open_source("pattern", tiandi_media::SourceOptions::new(site)).unwrap();
    for t in &src.tracks {
        s.publish(t.clone()).await.unwrap();
    }
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_runs_conferences_for_enrolled_sites() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(&tmp.path().join("ctl"));
    let chair = enroll(&ctl, tmp.path(), "ministry");
    let a = enroll(&ctl, tmp.path(), "bj-001");
    let b = enroll(&ctl, tmp.path(), "bj-002");

    let list = cli_json(&ctl, &["conference", "list"]);
    let addr: std::net::SocketAddr = list["relay"]["address"].as_str().unwrap().parse().unwrap();
    let relay = list["relay"]["name"].as_str().unwrap().to_string();

    // Only conferences the controller created can be joined.
    let err = join(addr, &relay, &a, "drill")
        .await
        .err()
        .expect("refused");
    assert!(err.contains("no conference"), "{err}");
    cli_json(&ctl, &["conference", "create", "drill"]);
    let c = join(addr, &relay, &chair, "drill").await.unwrap();
    let sa = join(addr, &relay, &a, "drill").await.unwrap();
    let sb = join(addr, &relay, &b, "drill").await.unwrap();

    // bj-001 publishes without the floor: bj-002 gets nothing until the chair grants it.
    let t = video("bj-001");
    sa.publish(t.clone()).await.unwrap();
    sb.subscribe("bj-001", "video", "").await.unwrap();
    groups(t.clone(), 1, 3).await;
    assert_eq!(sb.groups_in.load(std::sync::atomic::Ordering::Relaxed), 0);
    let shown = cli_json(&ctl, &["conference", "floor", "drill", "bj-001"]);
    assert_eq!(shown["floor"], "bj-001");
    let src = tokio::spawn(groups(t.clone(), 10, 4));
    let got = tokio::time::timeout(Duration::from_secs(10), sb.received("bj-001", "video"))
        .await
        .expect("bj-001 reaches bj-002 once it holds the floor");
    // The track appears as its first group's stream arrives; the group follows at once.
    let mut groups_rx = got.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        groups_rx.wait_for(|g| g.as_ref().is_some_and(|g| g.seq >= 10)),
    )
    .await
    .expect("a group from after the floor was granted")
    .unwrap();
    src.await.unwrap();

    // Roll call: every participant confirms; `show` has the answers and the roster.
    let rc = cli_json(
        &ctl,
        &["conference", "rollcall", "drill", "--seconds", "10"],
    );
    let id = rc["rollcall"].as_u64().unwrap();
    let mut present = Vec::new();
    for _ in 0..50 {
        let show = cli_json(&ctl, &["conference", "show", "drill"]);
        present = show["roster"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                m["present"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p.as_u64() == Some(id))
            })
            .map(|m| m["site"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        if present.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    present.sort();
    assert_eq!(present, ["bj-001", "bj-002", "ministry"]);

    // The relay's figures are on the controller's /metrics.
    let m = ctl.metrics();
    assert!(
        m.contains("tiandi_video_room_participants{relay=\"ministry-relay\",room=\"drill\"} 3"),
        "{m}"
    );
    assert!(ctl.metric("tiandi_video_connections") >= 3.0);
    assert!(
        ctl.metric("tiandi_video_refused_total") >= 1.0,
        "the early join was refused"
    );

    // Recording on the relay. Real test patterns (H.264 + AAC) from the chair and from
    // bj-002; the recording follows the speaker (the chair, then bj-002 once it holds the
    // floor); then one site alone. The relay writes MPEG-TS itself (no FFmpeg in the
    // controller); `tiandi-video remux` makes Matroska of the first and MP4 of the second;
    // ffprobe decodes every frame of each cleanly.
    let mut src = publish_pattern(&c, "ministry").await;
    let mut src_b = publish_pattern(&sb, "bj-002").await;
    cli_json(&ctl, &["conference", "floor", "drill"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (args, ext, container) in [
        (vec![], "mkv", "matroska"),
        (vec!["--format", "ts", "--site", "ministry"], "mp4", "mp4"),
    ] {
        let follows_floor = args.is_empty();
        let mut start = vec!["conference", "record", "drill"];
        start.extend(args);
        let rec = cli_json(&ctl, &start);
        assert!(rec["file"].as_str().is_some(), "{rec}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        if follows_floor {
            cli_json(&ctl, &["conference", "floor", "drill", "bj-002"]);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let done = cli_json(&ctl, &["conference", "record", "drill", "--stop"]);
        let ts = done["file"].as_str().unwrap().to_string();
        assert!(ts.ends_with(".ts"), "{ts}");
        let file = format!("{}.{ext}", ts.trim_end_matches(".ts"));
        let remux = std::process::Command::new(tiandi_tests::bin("tiandi-video"))
            .args(["remux", &ts, &file])
            .output()
            .unwrap();
        assert!(
            remux.status.success(),
            "remux {ts}: {}",
            String::from_utf8_lossy(&remux.stderr)
        );
        let speakers: Vec<&str> = done["speakers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["site"].as_str().unwrap())
            .collect();
        if follows_floor {
            assert_eq!(speakers, ["ministry", "bj-002"], "{done}");
            let at = done["speakers"][1]["from_s"].as_f64().unwrap();
            assert!((2.0..6.0).contains(&at), "switched at {at} s: {done}");
        } else {
            assert_eq!(speakers, ["ministry"], "the floor changes nothing: {done}");
        }
        let probe = std::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-count_frames",
                "-show_streams",
                "-show_format",
                "-of",
                "json",
                &file,
            ])
            .output()
            .unwrap();
        assert!(
            probe.status.success() && probe.stderr.is_empty(),
            "{file}: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        let p: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
        let format = p["format"]["format_name"].as_str().unwrap();
        assert!(format.contains(container), "{file}: {format}");
        let duration: f64 = p["format"]["duration"].as_str().unwrap().parse().unwrap();
        // ~7 s recorded; playback starts at a keyframe (one every 2 s) with its sound.
        assert!((3.5..10.0).contains(&duration), "{file}: {duration} s");
        let streams = p["streams"].as_array().unwrap();
        let v = streams
            .iter()
            .find(|s| s["codec_type"] == "video")
            .expect("video");
        assert_eq!(v["codec_name"], "h264");
        assert_eq!(v["height"], 720);
        let frames: u64 = v["nb_read_frames"].as_str().unwrap().parse().unwrap();
        assert!(frames >= 75, "{file}: {frames} frames recorded in ~7 s");
        let a = streams
            .iter()
            .find(|s| s["codec_name"] == "aac")
            .unwrap_or_else(|| panic!("{file}: no AAC stream"));
        let afr: u64 = a["nb_read_frames"].as_str().unwrap().parse().unwrap();
        // AAC frames are 1024 samples: ~47 a second at 48 kHz; at least 3 s of sound.
        assert!(afr >= 140, "{file}: {afr} audio frames in ~7 s");
        // The sound has no hole longer than one audio group (~0.5 s, where the speaker
        // changes).
        let out = std::process::Command::new("ffprobe")
            .args(["-v", "error", "-show_entries", "frame=pts_time,media_type"])
            .args(["-of", "json", &file])
            .output()
            .unwrap();
        let frames: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let at: Vec<f64> = frames["frames"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["media_type"] == "audio")
            .filter_map(|f| f["pts_time"].as_str()?.parse().ok())
            .collect();
        let gap = at.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
        eprintln!(
            "{file}: {} audio frames from {:.2} to {:.2} s, longest gap {gap:.2} s",
            at.len(),
            at[0],
            at[at.len() - 1]
        );
        assert!(gap < 0.6, "{file}: a {gap:.2} s hole in the sound");
    }
    src.stop().unwrap();
    src_b.stop().unwrap();

    // A revoked site is refused by the relay's handshake.
    let out = ctl.cli(&["revoke", "--site", "bj-002"]);
    assert!(out.status.success());
    assert!(join(addr, &relay, &b, "drill").await.is_err());

    // Ending the conference disconnects everyone.
    cli_json(&ctl, &["conference", "end", "drill"]);
    for s in [&c, &sa] {
        tokio::time::timeout(Duration::from_secs(5), s.conn.closed())
            .await
            .expect("disconnected at the end");
    }
    let list = cli_json(&ctl, &["conference", "list"]);
    assert!(list["conferences"].as_array().unwrap().is_empty());
}
