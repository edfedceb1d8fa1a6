//! The FFmpeg media path against the real `ffprobe`: a source's renditions and audio, written
//! as MPEG-TS, decode, without gaps, in sync.

use std::process::Command;
use std::time::Duration;

use tiandi_media::{self as media, SourceOptions};
use tokio_util::sync::CancellationToken;

mod common;

pub fn probe(path: &std::path::Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_entries",
        ])
        .args(["frame=pts_time,media_type", "-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_pattern_becomes_two_aligned_renditions_and_audio() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = media::open_source("pattern", SourceOptions::new("ministry")).unwrap();
    assert_eq!(src.tracks.len(), 3);
    let (high, low, audio) = (
        src.tracks[0].clone(),
        src.tracks[1].clone(),
        src.tracks[2].clone(),
    );
    assert_eq!((high.info.width, high.info.height), (1280, 720));
    assert_eq!((low.info.width, low.info.height), (640, 360));
    let stop = CancellationToken::new();
    let out = dir.path().join("high.ts");
    let play = tokio::spawn({
        let (stop, out) = (stop.clone(), out.clone());
        async move {
            media::play(
                vec![high, audio],
                out.to_str().unwrap(),
                stop,
                media::Budget::fixed(Duration::from_secs(1)),
                Default::default(),
            )
            .await
        }
    });
    let out_low = dir.path().join("low.ts");
    let play_low = tokio::spawn({
        let (stop, out) = (stop.clone(), out_low.clone());
        async move {
            media::play(
                vec![low],
                out.to_str().unwrap(),
                stop,
                media::Budget::fixed(Duration::from_secs(1)),
                Default::default(),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    src.stop().unwrap();
    let stats = play.await.unwrap().unwrap();
    play_low.await.unwrap().unwrap();
    assert_eq!(stats.skipped, vec![0, 0]);
    // Frames are written within a few frame times of their capture.
    assert!(stats.latency_pct(0.5) < 200.0, "{}", stats.summary());

    let p = probe(&out);
    let streams = p["streams"].as_array().unwrap();
    let v = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    let a = streams.iter().find(|s| s["codec_type"] == "audio").unwrap();
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(a["codec_name"], "aac");
    let frames: u64 = v["nb_read_frames"].as_str().unwrap().parse().unwrap();
    assert!(frames >= 80, "{frames} frames in ~5 s at 25/s");
    // No gaps: consecutive video frames 40 ms apart.
    let times = |kind: &str| common::frame_times(&p, kind);
    let vt = times("video");
    for w in vt.windows(2) {
        assert!(
            (w[1] - w[0] - 0.04).abs() < 0.005,
            "gap between {} and {}",
            w[0],
            w[1]
        );
    }
    let at = times("audio");
    assert!(!at.is_empty());
    assert!(
        (at[0] - vt[0]).abs() < 0.1,
        "audio starts at {}, video at {}",
        at[0],
        vt[0]
    );
    let lp = probe(&out_low);
    assert_eq!(lp["streams"][0]["height"], 360);
}
