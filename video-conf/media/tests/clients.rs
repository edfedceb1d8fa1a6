//! Real clients: Debian's `ffmpeg` sends a test pattern with audio as MPEG-TS over UDP into a
//! publishing `tiandi-video join`; it crosses two cascaded relays (`tiandi-video relay`
//! processes) to two receiving clients, each writing MPEG-TS; `ffprobe` checks each.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::frame_times;
use tiandi_link::pki::{self, Ca};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tiandi-video");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A certificate for `id`: relays (`*-relay`) get the relay role the CA gives only them (a
/// cascade from a site certificate is refused), everyone else a site's.
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

fn relay(
    dir: &Path,
    ca: &Path,
    id: &str,
    cert: &(PathBuf, PathBuf),
    up: Option<(&str, &str)>,
) -> (Kill, String) {
    relay_at(dir, ca, id, cert, up, "127.0.0.1:0", &[])
}

fn relay_at(
    dir: &Path,
    ca: &Path,
    id: &str,
    cert: &(PathBuf, PathBuf),
    up: Option<(&str, &str)>,
    listen: &str,
    extra: &[&str],
) -> (Kill, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--listen", listen, "--name", id, "--log", "warn"])
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(&cert.0)
        .arg("--key")
        .arg(&cert.1)
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{id}.log")))
                .unwrap(),
        );
    if let Some((addr, name)) = up {
        cmd.args(["--upstream", addr, "--upstream-name", name]);
    }
    cmd.args(extra);
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (Kill(child), addr)
}

#[allow(clippy::too_many_arguments)]
fn join(
    dir: &Path,
    ca: &Path,
    me: &str,
    c: &(PathBuf, PathBuf),
    relay: &str,
    relay_name: &str,
    extra: &[&str],
) -> Kill {
    Kill(
        Command::new(BIN)
            .args([
                "join",
                "--relay",
                relay,
                "--relay-name",
                relay_name,
                "--room",
                "drill",
                "--log",
                "warn",
            ])
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(&c.0)
            .arg("--key")
            .arg(&c.1)
            .args(extra)
            .stdout(std::fs::File::create(dir.join(format!("{me}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{me}.log"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_streams",
            "-show_entries",
            "frame=pts_time,media_type,key_frame",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(
        errors.trim().is_empty(),
        "decoding {} reported: {errors}",
        path.display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A scratch directory, a CA, and its certificate written there.
fn lab() -> (tempfile::TempDir, Ca, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test CA").unwrap();
    let ca_p = dir.path().join("ca.pem");
    std::fs::write(&ca_p, ca.cert_pem()).unwrap();
    (dir, ca, ca_p)
}

#[test]
fn ffmpeg_through_two_cascaded_relays_to_two_players() {
    let (dir, ca, ca_p) = lab();
    let d = dir.path();
    let (top, top_addr) = relay(
        d,
        &ca_p,
        "ministry-relay",
        &creds(&ca, d, "ministry-relay"),
        None,
    );
    let (gd, gd_addr) = relay(
        d,
        &ca_p,
        "gd-relay",
        &creds(&ca, d, "gd-relay"),
        Some((&top_addr, "ministry-relay")),
    );
    let port = free_udp_port();
    let input = format!("udp://127.0.0.1:{port}");
    let publisher = join(
        d,
        &ca_p,
        "ministry",
        &creds(&ca, d, "ministry"),
        &top_addr,
        "ministry-relay",
        &["--publish", &input, "--duration", "16"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let encoder = Kill(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args([
                "-t",
                "15",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
                "-g",
                "50",
                "-b:v",
                "1500k",
            ])
            .args(["-c:a", "aac", "-b:a", "96k", "-f", "mpegts"])
            .arg(format!("{input}?pkt_size=1316"))
            .stderr(std::fs::File::create(d.join("ffmpeg.log")).unwrap())
            .spawn()
            .expect("ffmpeg runs"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let outs: Vec<PathBuf> = (1..=2).map(|i| d.join(format!("gd-00{i}.ts"))).collect();
    let players: Vec<Kill> = (1..=2)
        .map(|i| {
            let me = format!("gd-00{i}");
            let out = outs[i - 1].to_str().unwrap().to_string();
            join(
                d,
                &ca_p,
                &me,
                &creds(&ca, d, &me),
                &gd_addr,
                "gd-relay",
                &["--play", &out, "--from", "ministry", "--duration", "8"],
            )
        })
        .collect();
    for mut p in players {
        let st = p.0.wait().unwrap();
        assert!(
            st.success(),
            "player failed: {}",
            std::fs::read_to_string(d.join("gd-001.log")).unwrap_or_default()
        );
    }
    drop((encoder, publisher, gd, top));
    for out in &outs {
        let p = probe(out);
        let streams = p["streams"].as_array().unwrap();
        let v = streams
            .iter()
            .find(|s| s["codec_type"] == "video")
            .expect("video");
        let a = streams
            .iter()
            .find(|s| s["codec_type"] == "audio")
            .expect("audio");
        assert_eq!(v["codec_name"], "h264");
        assert_eq!(a["codec_name"], "aac");
        let (vt, at) = (frame_times(&p, "video"), frame_times(&p, "audio"));
        assert!(
            vt.len() >= 100,
            "{} video frames in {}",
            vt.len(),
            out.display()
        );
        assert!(at.len() >= 150, "{} audio frames", at.len());
        // Frames arrive without gaps: 25 per second, 40 ms apart.
        for w in vt.windows(2) {
            assert!(
                w[1] - w[0] < 0.045,
                "video gap {} → {} in {}",
                w[0],
                w[1],
                out.display()
            );
        }
        for w in at.windows(2) {
            assert!(w[1] - w[0] < 0.03, "audio gap {} → {}", w[0], w[1]);
        }
        // Picture and sound start together (from then on both keep the source's timestamps).
        assert!(
            (at[0] - vt[0]).abs() < 0.1,
            "audio starts at {}, video at {}",
            at[0],
            vt[0]
        );
    }
}

/// A relay restart (maintenance, a crash and its supervisor) in the middle of a conference:
/// the publishing site and the playing site both join again by themselves, the publisher's
/// source goes on, and the player plays on into the same Matroska file, which decodes.
#[test]
fn sites_join_again_after_the_relay_restarts_and_play_on_into_matroska() {
    let (dir, ca, ca_p) = lab();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let rc = creds(&ca, d, "ministry-relay");
    let (relay1, addr) = relay_at(d, &ca_p, "ministry-relay", &rc, None, &listen, &[]);
    let publisher = join(
        d,
        &ca_p,
        "ministry",
        &creds(&ca, d, "ministry"),
        &addr,
        "ministry-relay",
        &["--publish", "pattern", "--duration", "24"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = d.join("gd-001.mkv");
    let mut player = join(
        d,
        &ca_p,
        "gd-001",
        &creds(&ca, d, "gd-001"),
        &addr,
        "ministry-relay",
        &["--play", out.to_str().unwrap(), "--duration", "18"],
    );
    std::thread::sleep(Duration::from_secs(6));
    // A graceful stop (SIGTERM): the relay closes every session with SHUTDOWN.
    let st = Command::new("kill")
        .args(["-TERM", &relay1.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut relay1 = relay1;
    relay1.0.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let (_relay2, _) = relay_at(
        d,
        &ca_p,
        "ministry-relay",
        &rc,
        None,
        &listen,
        &["--metrics", &metrics],
    );
    std::thread::sleep(Duration::from_secs(6));
    // The restarted relay's metrics (Prometheus text, served by `--metrics`): both sites back.
    let m = Command::new("curl")
        .args(["-sf", &format!("http://{metrics}/metrics")])
        .output()
        .unwrap();
    let m = String::from_utf8_lossy(&m.stdout).to_string();
    assert!(
        m.contains("tiandi_video_room_participants{relay=\"ministry-relay\",room=\"drill\"} 2"),
        "{m}"
    );
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(value("tiandi_video_connections"), 2.0, "{m}");
    assert!(value("tiandi_video_groups_in_total") >= 4.0, "{m}");
    assert!(value("tiandi_video_objects_sent_total") >= 100.0, "{m}");
    let st = player.0.wait().unwrap();
    let said = std::fs::read_to_string(d.join("gd-001.out")).unwrap();
    let log = std::fs::read_to_string(d.join("gd-001.log")).unwrap_or_default();
    assert!(st.success(), "player failed: {said}{log}");
    assert!(
        said.contains("joined drill at ministry-relay again"),
        "{said}\n{log}"
    );
    assert!(said.contains("played objects="), "{said}");
    let pub_said = std::fs::read_to_string(d.join("ministry.out")).unwrap();
    assert!(
        pub_said.contains("joined drill at ministry-relay again"),
        "publisher: {pub_said}"
    );
    drop(publisher);
    assert!(
        !d.join("gd-001.mkv.part.ts").exists(),
        "the intermediate MPEG-TS is removed"
    );
    let p = probe(&out);
    assert!(
        p["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["codec_name"] == "h264")
    );
    let vt = frame_times(&p, "video");
    let at = frame_times(&p, "audio").len();
    assert!(vt.len() >= 150, "{} video frames", vt.len());
    assert!(at >= 300, "{at} audio frames");
    // Picture before the restart and well after it (the player ran ~6 s before, ~11 s after).
    let (first, last) = (vt[0], vt[vt.len() - 1]);
    let gap = vt.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    assert!(last - first >= 12.0, "frames span {first}..{last}");
    assert!(gap < 8.0, "the restart cost {gap} s of picture");
    eprintln!(
        "{} video frames over {:.1} s, longest gap {gap:.2} s",
        vt.len(),
        last - first
    );
}
