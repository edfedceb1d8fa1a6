use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub(crate) use tiandi_link::clock::now_ms;

/// The release binaries of `packages`, built (cargo is quick when they are current); their
/// paths, in the order given (each package's binary is named after it).
pub(crate) fn release_binaries(packages: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("bench binary has no directory")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building release binaries...");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked"]);
    // `cargo run` gives the bench its package's variables; a build script that watches one
    // (ring watches `CARGO_MANIFEST_DIR`) would otherwise rebuild at every run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || matches!(
                &*k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*k);
        }
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    let st = cmd.arg("--bins").status()?;
    // Each package's binary bears its name, but for the media crate's `tiandi-video`.
    let bin = |p: &str| -> String {
        match p {
            "tiandi-media" => "tiandi-video".into(),
            p => p.into(),
        }
    };
    let bins: Vec<PathBuf> = packages.iter().map(|p| dir.join(bin(p))).collect();
    if !st.success() || bins.iter().any(|b| !b.exists()) {
        bail!(
            "could not build the release binaries next to {}",
            exe.display()
        );
    }
    Ok(bins)
}

/// The controller's and the agent's release binaries.
/// `TIANDI_BENCH_CONTROLLER` names another controller binary (one built with
/// `--features system-alloc` for heaptrack, in a target directory of its own).
pub(crate) fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let b = release_binaries(&["tiandi-controller", "tiandi-agent"])?;
    let ctl =
        std::env::var_os("TIANDI_BENCH_CONTROLLER").map_or_else(|| b[0].clone(), PathBuf::from);
    Ok((ctl, b[1].clone()))
}

pub(crate) fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

pub(crate) fn get(url: &str) -> Option<Value> {
    http().get(url).call().ok()?.body_mut().read_json().ok()
}

/// GET with `Authorization: Bearer TOKEN` (every API route needs one).
pub(crate) fn get_as(url: &str, token: &str) -> Option<Value> {
    http()
        .get(url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .ok()?
        .body_mut()
        .read_json()
        .ok()
}

/// A token the controller made in its data directory (`read.token`, `admin.token`).
pub(crate) fn token(data_dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(data_dir.join(name))
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

fn metric(ops: SocketAddr, name: &str) -> f64 {
    let text = http()
        // The controller's own counters only: the per-site families are ~130 MB at 20,000
        // sites, and rendering them is a scrape's cost, not ingest's.
        .get(&format!("http://{ops}/metrics?sites=false"))
        .call()
        .ok()
        .and_then(|mut r| {
            r.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_string()
                .ok()
        })
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds (user + system) of a process.
pub(crate) fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime); `after` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A release controller process (`run` on a config).
pub(crate) struct Ctl {
    pub(crate) bin: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) ops: SocketAddr,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
}

impl Ctl {
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // `TIANDI_BENCH_WRAP='env LD_PRELOAD=…/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=…'`
        // runs the controller under a profiler: the words go before the binary (profiling, not
        // figures). The wrapper must exec the controller (`env` does; heaptrack's own script
        // does not), since its pid is the one signalled and measured.
        let wrap = std::env::var("TIANDI_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(prog) => {
                let mut c = Command::new(prog);
                c.args(words).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        self.child = Some(
            cmd.arg("--config")
                .arg(&self.config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
        let t = Instant::now();
        while get(&format!("http://{}/health", self.ops)).is_none()
            && http()
                .get(&format!("http://{}/health", self.ops))
                .call()
                .is_err()
        {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("controller did not come up; see {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

pub(crate) fn wait(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t.elapsed())
}

/// Collects report events (site sample time, bench receive time) from `/api/stream`.
/// Recording states of [`watch_stream`].
const WAITING: u8 = 0;
pub(crate) const RECORDING: u8 = 1;
pub(crate) const DONE: u8 = 2;

/// Follows `/api/stream` on a thread of its own (see [`follow_stream`]).
fn watch_stream(
    api: SocketAddr,
    token: String,
    sink: Arc<Mutex<Vec<(i64, i64)>>>,
    state: Arc<AtomicU8>,
) {
    std::thread::spawn(move || follow_stream(api, &token, &sink, &state));
}

/// Follows `/api/stream`, recording (sample time, arrival time) of report events while
/// `state` is [`RECORDING`]; returns once it is [`DONE`] or the stream ends.
pub(crate) fn follow_stream(
    api: SocketAddr,
    token: &str,
    sink: &Mutex<Vec<(i64, i64)>>,
    state: &AtomicU8,
) {
    let Ok(resp) = http()
        .get(&format!("http://{api}/api/stream"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
    else {
        return;
    };
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let now = now_ms();
        match state.load(Ordering::Acquire) {
            RECORDING => {}
            DONE => return,
            _ => continue,
        }
        if let Ok(v) = serde_json::from_str::<Value>(data)
            && v["type"] == "report"
            && let Some(t) = v["taken_ms"].as_i64()
        {
            sink.lock().expect("lock").push((t, now));
        }
    }
}

pub(crate) fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One `ingest` run's figures: what its summary line prints (see [`Figures`]'s `Display`).
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub sites: usize,
    /// Reports the sites produced.
    pub reports: u64,
    /// Reports produced but not stored.
    pub lost: u64,
    /// History entries beyond the distinct reports stored.
    pub dup: u64,
    /// Controller CPU time per stored report (steady state).
    pub cpu_us_per_report: f64,
    /// The controller's peak RSS, the larger of its two runs.
    pub rss_mb: f64,
    /// Report-to-API visibility, 99th percentile; -1 when no report event arrived.
    pub p99_visible_ms: i64,
    /// UDP payload plus IPv4/UDP headers, both directions, per stored report.
    pub wire_bytes_per_report: f64,
    /// From the controller's restart until every site is connected and current.
    pub reconnect_s: f64,
}

/// The summary line (`ingest sites=… reports=… …`), without its newline.
impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Figures {
            sites,
            reports,
            lost,
            dup,
            cpu_us_per_report,
            rss_mb,
            p99_visible_ms,
            wire_bytes_per_report,
            reconnect_s,
        } = self;
        write!(
            f,
            "ingest sites={sites} reports={reports} lost={lost} dup={dup} cpu_us_per_report={cpu_us_per_report:.1} rss_mb={rss_mb:.0} p99_visible_ms={p99_visible_ms} wire_bytes_per_report={wire_bytes_per_report:.0} reconnect_s={reconnect_s:.1}"
        )
    }
}

/// One run with `sites` sites; the caller prints its summary line.
pub fn run(sites: usize, interval: f64, duration: f64) -> anyhow::Result<Figures> {
    let (ctl_bin, agent_bin) = binaries()?;
    let mut tmp = tempfile::Builder::new().prefix("tiandi-bench-").tempdir()?;
    // `TIANDI_BENCH_KEEP=1` keeps the run's directory (logs, data) for a look afterwards.
    if std::env::var_os("TIANDI_BENCH_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let dir = tmp.path();
    let quic = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let (api, ops) = (free_tcp(), free_tcp());
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nquic_listen = \"{quic}\"\napi_listen = \"{api}\"\nops_listen = \"{ops}\"\nprofile = \"terrestrial\"\nlog = \"warn\"\n",
            dir.join("ctl")
        ),
    )?;
    let mut ctl = Ctl {
        bin: ctl_bin.clone(),
        config: config.clone(),
        ops,
        log: dir.join("controller.log"),
        child: None,
    };
    ctl.start()?;
    eprintln!("enrolling {sites} sites...");
    let tokens = dir.join("tokens.txt");
    let st = Command::new(&ctl_bin)
        .arg("--config")
        .arg(&config)
        .args(["enroll", "--batch", &sites.to_string(), "--out"])
        .arg(&tokens)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("token batch failed");
    }
    let stats = dir.join("sim.json");
    let sim_log = std::fs::File::create(dir.join("sim.log"))?;
    let sim = Command::new(&agent_bin)
        .args(["simulate", "--controller", &quic.to_string(), "--tokens"])
        .arg(&tokens)
        .arg("--data-dir")
        .arg(dir.join("sim"))
        .args(["--interval", &interval.to_string(), "--stats"])
        .arg(&stats)
        // `TIANDI_BENCH_SIM_LOG=info,tiandi_uplink=debug` (with TIANDI_BENCH_KEEP): why the
        // simulated sites' attempts failed, in sim.log.
        .env(
            "RUST_LOG",
            std::env::var("TIANDI_BENCH_SIM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(sim_log)
        .spawn()?;
    // The controller made its tokens at its first start (the enroll batch ran on its data dir).
    let read = token(&dir.join("ctl"), "read.token");
    let setup = wait("every site connected", Duration::from_secs(2400), || {
        get_as(&format!("http://{api}/api/summary"), &read).is_some_and(|v| {
            v["connected"].as_u64() == Some(sites as u64)
                && v["sites"].as_u64() == Some(sites as u64)
        })
    })?;
    eprintln!(
        "{sites} sites enrolled and connected in {:.1} s; warming up one interval",
        setup.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs_f64(interval * 1.5));

    // Steady state: the first half of the run. Its first half measures CPU and wire bytes with
    // no API client attached (a dashboard following the event stream is API work, not
    // ingest); its second half follows `/api/stream` to measure report-to-API visibility.
    let pid = ctl.pid();
    let wire = |ops| {
        metric(ops, "tiandi_quic_udp_bytes_total")
            + 28.0 * metric(ops, "tiandi_quic_udp_datagrams_total")
    };
    let (cpu0, rep0, wire0) = (cpu_s(pid), metric(ops, "tiandi_reports_total"), wire(ops));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(duration / 4.0));
    let (cpu1, rep1, wire1) = (cpu_s(pid), metric(ops, "tiandi_reports_total"), wire(ops));
    let steady_s = t0.elapsed().as_secs_f64();
    let reports = rep1 - rep0;
    let cpu_us = (cpu1 - cpu0) * 1e6 / reports.max(1.0);
    let wire_per = (wire1 - wire0) / reports.max(1.0);

    let events = Arc::new(Mutex::new(Vec::new()));
    let state = Arc::new(AtomicU8::new(WAITING));
    watch_stream(api, read.clone(), events.clone(), state.clone());
    std::thread::sleep(Duration::from_millis(500));
    state.store(RECORDING, Ordering::Release);
    std::thread::sleep(Duration::from_secs_f64(duration / 4.0));
    state.store(DONE, Ordering::Release);
    let mut lat: Vec<i64> = events
        .lock()
        .expect("lock")
        .iter()
        .map(|(t, r)| r - t)
        .collect();
    lat.sort_unstable();
    let p50 = percentile(&lat, 0.5);
    let p99 = percentile(&lat, 0.99);
    let mut rss = peak_rss_mb(pid);
    eprintln!(
        "steady {steady_s:.1} s: {reports} reports ({:.0}/s), cpu {cpu_us:.1} us/report, {wire_per:.0} B/report, visible p50 {p50} ms p99 {p99} ms ({} events)",
        reports / steady_s,
        lat.len()
    );

    // Restart half-way; every site must come back connected and current.
    let restart_at = now_ms();
    let t_restart = Instant::now();
    ctl.stop()?;
    ctl.start()?;
    let mut last_note = Instant::now();
    // Ten minutes, or more for a run too big for this machine to reconnect in that time (the
    // figure is what it is; the run still ends with its summary line).
    let reconnect = wait(
        "every site connected and current",
        Duration::from_secs((sites as u64 / 20).max(600)),
        || {
            get_as(
                &format!("http://{api}/api/summary?since={restart_at}"),
                &read,
            )
            .is_some_and(|v| {
                if last_note.elapsed() >= Duration::from_secs(5) {
                    last_note = Instant::now();
                    eprintln!(
                        "  {:.0} s after the restart: {} connected, {} current",
                        t_restart.elapsed().as_secs_f64(),
                        v["connected"],
                        v["fresh"]
                    );
                }
                v["connected"].as_u64() == Some(sites as u64)
                    && v["fresh"].as_u64() == Some(sites as u64)
            })
        },
    )
    .map(|_| t_restart.elapsed().as_secs_f64())?;
    eprintln!("all {sites} sites connected and current {reconnect:.1} s after the restart began");
    let rest = (duration / 2.0 - reconnect).max(1.0);
    std::thread::sleep(Duration::from_secs_f64(rest));

    // Drain and audit.
    Command::new("kill")
        .arg("-TERM")
        .arg(sim.id().to_string())
        .status()?;
    let out = sim.wait_with_output()?;
    let final_stats: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .or_else(|| {
            std::fs::read(&stats)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
        .context("no final statistics from the simulator")?;
    let pushed = final_stats["pushed"].as_u64().unwrap_or(0);
    let summary = get_as(
        &format!("http://{api}/api/summary?count_history=true"),
        &token(&dir.join("ctl"), "admin.token"),
    )
    .context("summary")?;
    let distinct = summary["stored_distinct"].as_u64().unwrap_or(0);
    let entries = summary["history_entries"].as_u64().unwrap_or(0);
    rss = rss.max(peak_rss_mb(ctl.pid()));
    ctl.stop()?;
    let lost = pushed.saturating_sub(distinct);
    let dup = entries.saturating_sub(distinct);
    eprintln!(
        "sites produced {pushed} reports; controller holds {distinct} distinct in {entries} history entries; simulator left {} spooled",
        final_stats["spooled"]
    );
    if final_stats["spooled"].as_u64().unwrap_or(0) > 0 {
        eprintln!("sites still holding reports: {}", final_stats["unsent"]);
    }
    Ok(Figures {
        sites,
        reports: pushed,
        lost,
        dup,
        cpu_us_per_report: cpu_us,
        rss_mb: rss,
        p99_visible_ms: p99,
        wire_bytes_per_report: wire_per,
        reconnect_s: reconnect,
    })
}

#[cfg(test)]
mod tests {
    use super::Figures;

    /// The summary line as `run` printed it before it returned its figures, byte for byte.
    #[test]
    fn summary_line_format() {
        let f = Figures {
            sites: 20000,
            reports: 447571,
            lost: 3,
            dup: 1,
            cpu_us_per_report: 126.44,
            rss_mb: 2438.6,
            p99_visible_ms: -1,
            wire_bytes_per_report: 403.6,
            reconnect_s: 87.94,
        };
        let (sites, pushed, lost, dup, cpu_us, rss, p99, wire_per, reconnect) = (
            20000, 447571u64, 3u64, 1u64, 126.44, 2438.6, -1i64, 403.6, 87.94,
        );
        assert_eq!(
            f.to_string(),
            format!(
                "ingest sites={sites} reports={pushed} lost={lost} dup={dup} cpu_us_per_report={cpu_us:.1} rss_mb={rss:.0} p99_visible_ms={p99} wire_bytes_per_report={wire_per:.0} reconnect_s={reconnect:.1}"
            )
        );
        assert_eq!(
            f.to_string(),
            "ingest sites=20000 reports=447571 lost=3 dup=1 cpu_us_per_report=126.4 rss_mb=2439 p99_visible_ms=-1 wire_bytes_per_report=404 reconnect_s=87.9"
        );
    }
}
