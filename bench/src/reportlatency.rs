//! `report-latency`: how much a bulk transfer at full link rate delays health reports that
//! share its connection. One site behind an emulated GEO link, the real release binaries (the
//! controller in the hub's namespace, the agent in the site's), both ends paced at the site's
//! committed rate. Three phases: idle, a bulk file controller → site, a bulk file site →
//! controller (`tiandi-agent send`). A report's delay is its sample time at the site to the
//! moment the bench receives its event from the controller's `/api/stream`; the added delay is
//! a bulk phase's worst against the idle median. The budget: one RTT plus the report
//! interval.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tiandi_satlink::Topology;
use tiandi_satlink::topo::in_netns;

use crate::ingest::{binaries, get, http, now_ms, percentile};

pub struct Args {
    pub rate_mbit: f64,
    pub rtt_ms: f64,
    pub loss_pct: f64,
    pub interval_s: f64,
    pub phase_s: f64,
}

const SITE: &str = "rl-site";

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ns_get(ns: &str, url: String) -> Option<Value> {
    in_netns(ns, move || get(&url)).ok().flatten()
}

fn run_ok(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn write_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = bytes;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Delays (ms) of the reports that arrived within [from, to] (Unix ms), sorted.
fn delays(events: &Mutex<Vec<(i64, i64)>>, from: i64, to: i64) -> Vec<i64> {
    let mut d: Vec<i64> = events
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, arrived)| (from..=to).contains(arrived))
        .map(|(taken, arrived)| arrived - taken)
        .collect();
    d.sort_unstable();
    d
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ctl_bin, agent_bin) = binaries()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let topo =
        crate::geolink::one_link("tbrl", [10, 198, 0], 11, a.rate_mbit, a.rtt_ms, a.loss_pct)?;
    let (ctl_ns, site_ns) = (topo.ctl_ns(), topo.site_ns(1));
    let work = tempfile::Builder::new()
        .prefix("tiandi-bench-rl")
        .tempdir()?;
    let w = work.path().to_path_buf();
    let w = w.as_path();
    if std::env::var_os("TIANDI_BENCH_KEEP").is_some() {
        eprintln!("keeping {}", w.display());
        let _ = work.keep();
    }
    let quic = format!("{}:4433", topo.ctl_addr());
    let (api, ops) = ("127.0.0.1:18080", "127.0.0.1:19090");
    let ctl_cfg = w.join("controller.toml");
    std::fs::write(
        &ctl_cfg,
        format!(
            "data_dir = {:?}\nquic_listen = \"{quic}\"\napi_listen = \"{api}\"\nops_listen = \"{ops}\"\nprofile = \"geo\"\n[link_rates]\n\"{SITE}\" = {}\n",
            w.join("ctl"),
            a.rate_mbit
        ),
    )?;
    let log =
        |name: &str| -> anyhow::Result<std::fs::File> { Ok(std::fs::File::create(w.join(name))?) };
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Topology::command(&ctl_ns, &ctl_bin)
            .arg("--config")
            .arg(&ctl_cfg)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log("controller.log")?)
            .spawn()?,
    );
    wait_until("the controller", Duration::from_secs(30), || {
        let url = format!("http://{ops}/health");
        in_netns(&ctl_ns, move || http().get(&url).call().is_ok()).unwrap_or(false)
    })?;
    let mut enroll = Topology::command(&ctl_ns, &ctl_bin);
    enroll
        .arg("--config")
        .arg(&ctl_cfg)
        .args(["enroll", "--site", SITE, "--province", "RL"]);
    let token = run_ok(enroll, "enrolling the site")?;
    let agent_cfg = w.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "controller = \"{quic}\"\ndata_dir = {:?}\nprofile = \"geo\"\ninterval_s = {}\nlink_rate_mbit = {}\n",
            w.join("site"),
            a.interval_s,
            a.rate_mbit
        ),
    )?;
    let agent = |args: &[&str]| {
        let mut c = Topology::command(&site_ns, &agent_bin);
        c.arg("--config").arg(&agent_cfg).args(args);
        c
    };
    run_ok(
        agent(&["enroll", "--controller", &quic, "--token", &token]),
        "enrolling the agent",
    )?;
    procs.0.push(
        agent(&["run"])
            .stdout(Stdio::null())
            .stderr(log("agent.log")?)
            .spawn()?,
    );
    let api_url = |p: &str| format!("http://{api}{p}");
    wait_until("the site to report", Duration::from_secs(60), || {
        ns_get(&ctl_ns, api_url("/api/summary")).is_some_and(|v| v["connected"].as_u64() == Some(1))
    })?;

    // Every report event, as (sample time, arrival time).
    let events: Arc<Mutex<Vec<(i64, i64)>>> = Default::default();
    {
        let (events, ns) = (events.clone(), ctl_ns.clone());
        let api: std::net::SocketAddr = api.parse()?;
        std::thread::spawn(move || {
            let state = std::sync::atomic::AtomicU8::new(crate::ingest::RECORDING);
            let _ = in_netns(&ns, move || {
                crate::ingest::follow_stream(api, &events, &state)
            });
        });
    }
    let phase = Duration::from_secs_f64(a.phase_s);
    let bytes = (a.rate_mbit * 1e6 / 8.0 * a.phase_s) as u64;
    let limit = phase * 6 + Duration::from_secs(120);

    eprintln!("idle for {:?}...", phase);
    std::thread::sleep(Duration::from_secs(2));
    let idle_from = now_ms();
    std::thread::sleep(phase);
    let idle = delays(&events, idle_from, now_ms());

    // Bulk toward the site.
    let down_file = w.join("down.bin");
    write_file(&down_file, bytes)?;
    eprintln!("bulk controller -> site, {bytes} bytes...");
    let mut send = Topology::command(&ctl_ns, &ctl_bin);
    send.arg("--config")
        .arg(&ctl_cfg)
        .arg("send")
        .arg(&down_file)
        .args(["--to", &format!("site:{SITE}"), "--priority", "bulk"]);
    let down_from = now_ms();
    run_ok(send, "queuing the bulk file")?;
    let mut down_to = 0;
    wait_until("the bulk file at the site", limit, || {
        ns_get(&ctl_ns, api_url("/api/transfers"))
            .and_then(|v| v["transfers"].as_array()?.first().cloned())
            .and_then(|j| j["receipt"]["verified_ms"].as_i64())
            .map(|t| down_to = t)
            .is_some()
    })?;
    let down = delays(&events, down_from, down_to);
    let down_mbit = bytes as f64 * 8.0 / ((down_to - down_from) as f64 / 1000.0) / 1e6;

    // Bulk from the site.
    let up_file: PathBuf = w.join("up.bin");
    write_file(&up_file, bytes)?;
    eprintln!("bulk site -> controller, {bytes} bytes...");
    let up_from = now_ms();
    run_ok(
        agent(&[
            "send",
            up_file.to_str().context("path")?,
            "--priority",
            "bulk",
        ]),
        "tiandi-agent send",
    )?;
    let mut up_to = 0;
    wait_until("the bulk file at the controller", limit, || {
        ns_get(&ctl_ns, api_url("/api/transfers"))
            .and_then(|v| {
                v["received"]
                    .as_array()?
                    .iter()
                    .find(|r| r["file"] == "up.bin")?["receipt"]["verified_ms"]
                    .as_i64()
            })
            .map(|t| up_to = t)
            .is_some()
    })?;
    let up = delays(&events, up_from, up_to);
    let up_mbit = bytes as f64 * 8.0 / ((up_to - up_from) as f64 / 1000.0) / 1e6;
    drop(procs);
    drop(topo);

    if idle.is_empty() || down.is_empty() || up.is_empty() {
        bail!(
            "too few reports to measure (idle {}, down {}, up {})",
            idle.len(),
            down.len(),
            up.len()
        );
    }
    let base = percentile(&idle, 0.5);
    let worst = down.last().copied().max(up.last().copied()).unwrap_or(0);
    let added = worst - base;
    let budget = (a.rtt_ms + a.interval_s * 1000.0) as i64;
    println!(
        "report-latency rate_mbit={} rtt_ms={} loss_pct={} interval_s={} reports={} idle_p50_ms={} idle_p99_ms={} down_bulk_mbit={:.2} down_p50_ms={} down_p99_ms={} down_max_ms={} up_bulk_mbit={:.2} up_p50_ms={} up_p99_ms={} up_max_ms={} worst_added_ms={added} budget_ms={budget} within_budget={}",
        a.rate_mbit,
        a.rtt_ms,
        a.loss_pct,
        a.interval_s,
        idle.len() + down.len() + up.len(),
        base,
        percentile(&idle, 0.99),
        down_mbit,
        percentile(&down, 0.5),
        percentile(&down, 0.99),
        down.last().copied().unwrap_or(0),
        up_mbit,
        percentile(&up, 0.5),
        percentile(&up, 0.99),
        up.last().copied().unwrap_or(0),
        added <= budget
    );
    Ok(())
}
