//! Admission under a connection storm: a controller that can take few handshakes at once
//! turns the rest away with a time to come back (`retry-after-ms` in QUIC's
//! `CONNECTION_REFUSED`), and the sites come back then, spread out, instead of retrying all at
//! once. Real QUIC over loopback: `tiandi-agent simulate` runs 40 sites, each enrolling with
//! its own token and connecting with its own certificate, against a controller admitting 10
//! handshakes a second, 2 at a time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tiandi_tests::{ControllerProc, bin, wait_for};

#[test]
fn a_busy_controller_tells_the_sites_it_turns_away_when_to_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let sites = 40;
    let ctl = ControllerProc::start_with(
        &tmp.path().join("ctl"),
        None,
        "[admission]\nhandshakes_per_s = 10\nburst = 1\nconcurrent_handshakes = 2\nmax_pending = 4\nmax_wait_ms = 300\n",
    );
    let tokens = tmp.path().join("tokens.txt");
    let out = ctl.cli(&[
        "enroll",
        "--batch",
        &sites.to_string(),
        "--out",
        tokens.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::File::create(tmp.path().join("sim.log")).unwrap();
    let start = Instant::now();
    let mut sim = Command::new(bin("tiandi-agent"))
        .args([
            "simulate",
            "--controller",
            &ctl.quic.to_string(),
            "--tokens",
        ])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(tmp.path().join("sim"))
        .args(["--interval", "1"])
        .env("RUST_LOG", "warn,tiandi_uplink::session=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let took = wait_for("every site connected", Duration::from_secs(90), || {
        let v = ctl.api("/api/summary")?;
        (v["connected"] == sites).then_some(start.elapsed())
    });
    let _ = sim.kill();
    let _ = sim.wait();
    let refused = ctl
        .metrics()
        .lines()
        .find(|l| l.starts_with("tiandi_connections_refused_total{reason=\"overload\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let sim_log = std::fs::read_to_string(tmp.path().join("sim.log")).unwrap();
    let told = sim_log.matches("retry-after-ms=").count();
    eprintln!(
        "{sites} sites enrolled and connected in {took:?}: {refused} refusals, {told} with a time to come back"
    );
    assert!(
        refused >= 10.0,
        "the storm was turned away in part: {refused}"
    );
    assert!(told > 0, "the sites were told when to come back");
    // Told when, a site is turned away about once or twice, not at every retry.
    assert!(
        refused <= 4.0 * sites as f64,
        "{refused} refusals for {sites} sites"
    );
    // 80 handshakes (enrollment, then the session) at 10 a second take ~8 s; allow for a
    // loaded machine.
    assert!(took < Duration::from_secs(60), "{took:?}");
}
