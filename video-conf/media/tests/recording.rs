//! A relay's recording, written by the conference core's own MPEG-TS writer (no FFmpeg in the
//! relay), from real H.264 and AAC (the test pattern, encoded here): `ffprobe` reads a video
//! and an audio stream of the length recorded and decodes every frame cleanly; `tiandi-video
//! remux` makes Matroska of it.

use std::process::Command;
use std::time::Duration;

use tiandi_media::{self as media, SourceOptions};
use tokio_util::sync::CancellationToken;

mod common;

fn probe(path: &std::path::Path) -> (serde_json::Value, String) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
        ])
        .args(["-show_entries", "frame=pts_time,media_type", "-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_recording_is_mpeg_ts_that_ffprobe_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = media::open_source("pattern", SourceOptions::new("ministry")).unwrap();
    let (high, audio) = (src.tracks[0].clone(), src.tracks[2].clone());
    let stop = CancellationToken::new();
    let out = dir.path().join("drill.ts");
    // What `Room::start_recording` runs: the core's player into `tiandi_video::ts`.
    let rec = tokio::spawn(tiandi_video::play::record(
        vec![high, audio],
        out.clone(),
        stop.clone(),
        tiandi_video::play::Budget::fixed(Duration::from_secs(2)),
    ));
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.cancel();
    src.stop().unwrap();
    let stats = rec.await.unwrap().unwrap();
    assert!(stats.objects > 300, "{}", stats.summary());

    let (p, stderr) = probe(&out);
    assert!(stderr.is_empty(), "ffprobe complains: {stderr}");
    assert!(
        p["format"]["format_name"]
            .as_str()
            .unwrap()
            .contains("mpegts"),
        "{}",
        p["format"]
    );
    let duration: f64 = p["format"]["duration"].as_str().unwrap().parse().unwrap();
    // ~6 s recorded; playback starts at a keyframe (one every 2 s) with its sound.
    assert!((3.0..7.0).contains(&duration), "{duration} s");
    let streams = p["streams"].as_array().unwrap();
    let v = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    let a = streams.iter().find(|s| s["codec_type"] == "audio").unwrap();
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(v["height"], 720);
    assert_eq!(a["codec_name"], "aac");
    assert_eq!(a["sample_rate"], "48000");
    let vt = common::frame_times(&p, "video");
    let at = common::frame_times(&p, "audio");
    assert!(vt.len() >= 75, "{} video frames in ~6 s", vt.len());
    assert!(at.len() >= 140, "{} audio frames in ~6 s", at.len());
    // Picture without holes, 40 ms apart, and sound from the picture's start.
    for w in vt.windows(2) {
        assert!((w[1] - w[0] - 0.04).abs() < 0.005, "gap at {}", w[0]);
    }
    assert!(
        (at[0] - vt[0]).abs() < 0.1,
        "audio at {}, video at {}",
        at[0],
        vt[0]
    );

    // Matroska from it, through the media crate's remux (the `tiandi-video remux` command).
    let mkv = dir.path().join("drill.mkv");
    let st = Command::new(env!("CARGO_BIN_EXE_tiandi-video"))
        .arg("remux")
        .args([&out, &mkv])
        .status()
        .unwrap();
    assert!(st.success());
    let (m, stderr) = probe(&mkv);
    assert!(stderr.is_empty(), "ffprobe complains: {stderr}");
    assert!(
        m["format"]["format_name"]
            .as_str()
            .unwrap()
            .contains("matroska")
    );
    assert_eq!(common::frame_times(&m, "video").len(), vt.len());
}
