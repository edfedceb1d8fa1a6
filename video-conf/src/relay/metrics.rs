//! The relay's figures in the Prometheus text format (`tiandi_video_*`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Relay, Room};

impl Relay {
    /// The relay's figures in the Prometheus text format (`tiandi_video_*`): what it carries,
    /// drops and refuses, and each room's participants and tracks.
    pub fn exposition(&self) -> String {
        use std::fmt::Write;
        let st = &self.stats;
        let send = &st.send;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{relay=\"{}\"}} {v}\n",
                label(&self.name)
            );
        };
        one(
            "tiandi_video_connections",
            "gauge",
            "Participant connections open.",
            g(&st.connections),
        );
        one(
            "tiandi_video_refused_total",
            "counter",
            "Participants refused (handshake, unknown room, looping path).",
            g(&st.refused),
        );
        one(
            "tiandi_video_groups_in_total",
            "counter",
            "Groups received from publishers.",
            g(&st.groups_in),
        );
        one(
            "tiandi_video_groups_no_floor_total",
            "counter",
            "Groups stopped: publisher without the floor.",
            g(&st.groups_no_floor),
        );
        one(
            "tiandi_video_bad_streams_total",
            "counter",
            "Malformed group streams closed.",
            g(&st.bad_streams),
        );
        one(
            "tiandi_video_groups_sent_total",
            "counter",
            "Groups delivered whole to subscribers.",
            g(&send.groups_sent),
        );
        one(
            "tiandi_video_groups_dropped_total",
            "counter",
            "Groups reset before delivery (a newer one replaced them).",
            g(&send.groups_dropped),
        );
        one(
            "tiandi_video_objects_sent_total",
            "counter",
            "Frames sent to subscribers.",
            g(&send.objects_sent),
        );
        one(
            "tiandi_video_payload_bytes_sent_total",
            "counter",
            "Media payload bytes sent to subscribers.",
            g(&send.bytes_sent),
        );
        one(
            "tiandi_video_repairs_sent_total",
            "counter",
            "Repair datagrams (FEC) sent.",
            g(&send.repairs_sent),
        );
        one(
            "tiandi_video_repair_bytes_sent_total",
            "counter",
            "Bytes of repair datagrams (FEC) sent.",
            g(&send.repair_bytes_sent),
        );
        let rooms = self.rooms();
        one(
            "tiandi_video_rooms",
            "gauge",
            "Conferences open.",
            rooms.len() as u64,
        );
        let mut per_room = |name: &str, help: &str, f: &dyn Fn(&Room) -> usize| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
            for r in &rooms {
                let _ = writeln!(
                    out,
                    "{name}{{relay=\"{}\",room=\"{}\"}} {}",
                    label(&self.name),
                    label(&r.name),
                    f(r)
                );
            }
        };
        per_room(
            "tiandi_video_room_participants",
            "Participants in a conference.",
            &|r| r.roster().len(),
        );
        per_room(
            "tiandi_video_room_tracks",
            "Tracks published in a conference.",
            &|r| r.track_keys().len(),
        );
        let relay = label(&self.name);
        // Renditions on offer: tracks per kind and rendition (the low rendition a narrow
        // link gets shows here once a publisher offers it).
        let _ = write!(
            out,
            "# HELP tiandi_video_room_renditions Tracks of a conference by kind and rendition.
             # TYPE tiandi_video_room_renditions gauge
"
        );
        for r in &rooms {
            let mut n: std::collections::BTreeMap<(String, String), u64> = Default::default();
            for k in r.track_keys() {
                *n.entry((k.kind, k.rendition)).or_default() += 1;
            }
            for ((kind, rendition), c) in n {
                let _ = writeln!(
                    out,
                    "tiandi_video_room_renditions{{relay=\"{relay}\",room=\"{}\",kind=\"{}\",rendition=\"{}\"}} {c}",
                    label(&r.name),
                    label(&kind),
                    label(&rendition)
                );
            }
        }
        // What each participant says it receives (its reports, summed over its tracks), and
        // what its player shows of the video it plays.
        type Figure = fn(&super::rooms::HealthView) -> Option<f64>;
        #[derive(Clone, Copy)]
        enum Over {
            Sum,
            Max,
            Min,
        }
        let figures: [(&str, &str, &str, Figure, Over); 8] = [
            (
                "tiandi_video_participant_receive_rate_bytes_per_second",
                "gauge",
                "What a participant receives, as it reports (all its tracks).",
                |h| Some(f64::from(h.kbps) * 125.0),
                Over::Sum,
            ),
            (
                "tiandi_video_participant_frames_total",
                "counter",
                "Frames a participant has received (all its tracks), as it reports.",
                |h| Some(h.frames as f64),
                Over::Sum,
            ),
            (
                "tiandi_video_participant_groups_lost_total",
                "counter",
                "Groups a participant lost (all its tracks), as it reports.",
                |h| Some(h.groups_lost as f64),
                Over::Sum,
            ),
            (
                "tiandi_video_participant_latency_seconds",
                "gauge",
                "A participant's worst latency behind capture over its tracks, as it reports.",
                |h| Some(f64::from(h.latency_ms.max(0)) / 1000.0),
                Over::Max,
            ),
            (
                "tiandi_video_participant_frames_shown_ratio",
                "gauge",
                "The share of the video frames sent that a participant's player has shown (the worst of the videos it plays).",
                |h| h.shown_pct.map(|p| p / 100.0),
                Over::Min,
            ),
            (
                "tiandi_video_participant_freezes_total",
                "counter",
                "Stalls of 120 ms or more in the video a participant's player shows.",
                |h| h.freezes.map(|f| f as f64),
                Over::Sum,
            ),
            (
                "tiandi_video_participant_longest_freeze_seconds",
                "gauge",
                "The longest stall in the video a participant's player shows.",
                |h| h.longest_freeze_ms.map(|f| f64::from(f) / 1000.0),
                Over::Max,
            ),
            (
                "tiandi_video_participant_frame_age_p99_seconds",
                "gauge",
                "99th percentile of the latest frames' age when a participant's player showed them (capture to screen).",
                |h| {
                    h.age_p99_ms
                        .filter(|a| *a >= 0)
                        .map(|a| f64::from(a) / 1000.0)
                },
                Over::Max,
            ),
        ];
        for (name, kind, help, f, over) in figures {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for r in &rooms {
                for m in r.roster() {
                    let vals: Vec<f64> = m.health.values().filter_map(f).collect();
                    if vals.is_empty() {
                        continue;
                    }
                    let v = match over {
                        Over::Sum => vals.iter().sum(),
                        Over::Max => vals.iter().copied().fold(0.0, f64::max),
                        Over::Min => vals.iter().copied().fold(f64::INFINITY, f64::min),
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{relay=\"{relay}\",room=\"{}\",site=\"{}\"}} {v}",
                        label(&r.name),
                        label(&m.site)
                    );
                }
            }
        }
        out
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelayOptions;
    use crate::relay::rooms::Member;
    use crate::relay::rooms::tests::track;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("plain"), "plain");
        assert_eq!(label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn the_exposition_shows_counters_and_each_rooms_figures() {
        let r = Relay::new(RelayOptions {
            name: "ministry-relay".into(),
            chair: "ministry".into(),
            upstream: None,
            open_rooms: false,
            fec_rtt_ms: 0,
            confirmed_within: crate::relay::CONFIRMED_WITHIN,
        });
        r.stats.connections.fetch_add(2, Ordering::Relaxed);
        r.stats.refused.fetch_add(1, Ordering::Relaxed);
        r.stats.send.groups_sent.fetch_add(7, Ordering::Relaxed);
        let room = r.create_room("drill \"a\"", "ministry");
        room.roster
            .lock()
            .unwrap()
            .insert("gd-001".into(), Member::default());
        room.add_track(track("gd-001", "video", "high", 1500));
        room.add_track(track("gd-001", "audio", "main", 64));
        let m = r.exposition();
        for line in [
            "# TYPE tiandi_video_connections gauge",
            "tiandi_video_connections{relay=\"ministry-relay\"} 2",
            "# TYPE tiandi_video_refused_total counter",
            "tiandi_video_refused_total{relay=\"ministry-relay\"} 1",
            "tiandi_video_groups_sent_total{relay=\"ministry-relay\"} 7",
            "tiandi_video_groups_in_total{relay=\"ministry-relay\"} 0",
            "tiandi_video_rooms{relay=\"ministry-relay\"} 1",
            "tiandi_video_room_participants{relay=\"ministry-relay\",room=\"drill \\\"a\\\"\"} 1",
            "tiandi_video_room_tracks{relay=\"ministry-relay\",room=\"drill \\\"a\\\"\"} 2",
        ] {
            assert!(m.lines().any(|l| l == line), "no line {line:?} in\n{m}");
        }
    }
}
