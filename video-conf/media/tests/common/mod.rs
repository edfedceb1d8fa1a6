//! Helpers shared by the test binaries that read `ffprobe`'s JSON.

/// The presentation times of the frames of one kind ("video", "audio") in `ffprobe -show_entries
/// frame=pts_time,media_type -of json` output.
pub fn frame_times(probe: &serde_json::Value, kind: &str) -> Vec<f64> {
    probe["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["media_type"] == kind)
        .filter_map(|f| f["pts_time"].as_str()?.parse().ok())
        .collect()
}
