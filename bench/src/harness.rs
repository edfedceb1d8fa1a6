//! What the benches that run the real release binaries over one emulated link share: the
//! controller in the hub's namespace and one enrolled agent in the site's, both paced at the
//! site's committed rate (`[link_rates]` at the controller, `link_rate_mbit` at the agent, the
//! `geo` profile at both); the report events of the controller's `/api/stream`; small process,
//! file and polling helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tiandi_satlink::Topology;
use tiandi_satlink::topo::in_netns;

use crate::ingest::{DONE, RECORDING, cpu_s, http};

/// Child processes, killed (and reaped) when dropped.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET a JSON document from inside network namespace `ns`, within `limit`.
pub(crate) fn ns_get(ns: &str, url: String, token: String, limit: Duration) -> Option<Value> {
    in_netns(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(limit))
            .build()
            .into();
        agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .ok()?
            .body_mut()
            .read_json()
            .ok()
    })
    .ok()
    .flatten()
}

/// Runs a command to its end; its trimmed stdout, or its stderr as the error.
pub(crate) fn run_ok(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `f` every 200 ms until it holds, or fails after `timeout`.
pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Writes `bytes` of pseudo-random data (xorshift from `seed`: files with different seeds
/// share no chunk).
pub(crate) fn write_file(path: &Path, bytes: u64, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
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

/// Report events as (sample time at the site, arrival at the bench), Unix ms.
pub(crate) type Events = Arc<Mutex<Vec<(i64, i64)>>>;

/// Delays (ms) of the reports that arrived within [from, to] (Unix ms), sorted.
pub(crate) fn delays(events: &Mutex<Vec<(i64, i64)>>, from: i64, to: i64) -> Vec<i64> {
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

/// A scratch directory (deleted with the handle), or with `TIANDI_BENCH_KEEP` set one that
/// stays (named on stderr, no handle).
pub(crate) fn work_dir(prefix: &str) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    let work = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if std::env::var_os("TIANDI_BENCH_KEEP").is_some() {
        eprintln!("keeping {}", work.path().display());
        return Ok((None, work.keep()));
    }
    let path = work.path().to_path_buf();
    Ok((Some(work), path))
}

/// How [`OneSite::start`] sets up the controller and the agent.
pub(crate) struct SiteSetup<'a> {
    /// The controller's and the agent's release binaries ([`crate::ingest::binaries`]).
    pub bins: &'a (PathBuf, PathBuf),
    pub site: &'a str,
    pub province: &'a str,
    /// The site's committed rate, both ways (Mbit/s).
    pub rate_mbit: f64,
    /// The agent's report interval (s).
    pub interval_s: f64,
    /// The controller's API and ops ports on 127.0.0.1 in the hub's namespace.
    pub api_port: u16,
    pub ops_port: u16,
    /// More of the agent's configuration (TOML appended: a dual-homed site's `[[paths]]`);
    /// with it the controller listens on every address of its namespace and neither side is
    /// paced at `rate_mbit` (each path has its own congestion control).
    pub agent_toml: Option<String>,
}

/// The controller (hub namespace of link 1) and one enrolled, reporting agent (site 1's
/// namespace), each logging to a file of `dir`; both killed when dropped.
pub(crate) struct OneSite {
    pub ctl_ns: String,
    pub site_ns: String,
    pub site: String,
    pub api: SocketAddr,
    ctl_bin: PathBuf,
    agent_bin: PathBuf,
    ctl_cfg: PathBuf,
    agent_cfg: PathBuf,
    dir: PathBuf,
    follower: Arc<AtomicU8>,
    procs: Procs,
}

impl OneSite {
    /// Starts the controller, enrolls the site, starts its agent and waits until the site is
    /// connected (up to 60 s).
    pub(crate) fn start(topo: &Topology, dir: &Path, s: &SiteSetup) -> anyhow::Result<OneSite> {
        let (ctl_bin, agent_bin) = s.bins.clone();
        let (ctl_ns, site_ns) = (topo.ctl_ns(), topo.site_ns(1));
        let quic = format!("{}:4433", topo.ctl_addr());
        let listen = if s.agent_toml.is_some() {
            "0.0.0.0:4433".to_string()
        } else {
            quic.clone()
        };
        let rates = if s.agent_toml.is_some() {
            String::new()
        } else {
            format!("[link_rates]\n\"{}\" = {}\n", s.site, s.rate_mbit)
        };
        let api: SocketAddr = format!("127.0.0.1:{}", s.api_port).parse()?;
        let ops = format!("127.0.0.1:{}", s.ops_port);
        let site = s.site;
        let ctl_cfg = dir.join("controller.toml");
        std::fs::write(
            &ctl_cfg,
            format!(
                "data_dir = {:?}\nquic_listen = \"{listen}\"\napi_listen = \"{api}\"\nops_listen = \"{ops}\"\nprofile = \"geo\"\noutgoing_dirs = [{:?}]\n{rates}",
                dir.join("ctl"),
                dir,
            ),
        )?;
        let log = |name: &str| -> anyhow::Result<std::fs::File> {
            Ok(std::fs::File::create(dir.join(name))?)
        };
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
        let agent_cfg = dir.join("agent.toml");
        std::fs::write(
            &agent_cfg,
            format!(
                "controller = \"{quic}\"\ndata_dir = {:?}\nprofile = \"geo\"\ninterval_s = {}\n{}",
                dir.join("site"),
                s.interval_s,
                match &s.agent_toml {
                    Some(extra) => extra.clone(),
                    None => format!("link_rate_mbit = {}\n", s.rate_mbit),
                }
            ),
        )?;
        let mut one = OneSite {
            ctl_ns,
            site_ns,
            site: site.to_string(),
            api,
            ctl_bin,
            agent_bin,
            ctl_cfg,
            agent_cfg,
            dir: dir.to_path_buf(),
            follower: Arc::new(AtomicU8::new(RECORDING)),
            procs,
        };
        let mut enroll = one.controller();
        enroll.args(["enroll", "--site", site, "--province", s.province]);
        let token = run_ok(enroll, "enrolling the site")?;
        run_ok(
            one.agent(&["enroll", "--controller", &quic, "--token", &token]),
            "enrolling the agent",
        )?;
        one.procs.0.push(
            one.agent(&["run"])
                .stdout(Stdio::null())
                .stderr(log("agent.log")?)
                .spawn()?,
        );
        wait_until("the site to report", Duration::from_secs(60), || {
            one.api_get("/api/summary")
                .is_some_and(|v| v["connected"].as_u64() == Some(1))
        })?;
        Ok(one)
    }

    /// `tiandi-controller --config …` in the hub's namespace; arguments to follow.
    pub(crate) fn controller(&self) -> Command {
        let mut c = Topology::command(&self.ctl_ns, &self.ctl_bin);
        c.arg("--config").arg(&self.ctl_cfg);
        c
    }

    /// `tiandi-agent --config … ARGS` in the site's namespace.
    pub(crate) fn agent(&self, args: &[&str]) -> Command {
        let mut c = Topology::command(&self.site_ns, &self.agent_bin);
        c.arg("--config").arg(&self.agent_cfg).args(args);
        c
    }

    /// GET `path` of the controller's API; `None` if it did not answer within 10 s.
    pub(crate) fn api_get(&self, path: &str) -> Option<Value> {
        ns_get(
            &self.ctl_ns,
            format!("http://{}{path}", self.api),
            crate::ingest::token(&self.dir.join("ctl"), "read.token"),
            Duration::from_secs(10),
        )
    }

    /// CPU seconds used so far by the controller and by the agent.
    pub(crate) fn cpu_s(&self) -> (f64, f64) {
        let cpu = |i: usize| self.procs.0.get(i).map_or(0.0, |c| cpu_s(c.id()));
        (cpu(0), cpu(1))
    }

    /// Queues `file` for the site (`tiandi-controller send FILE --to site:ID --priority P`).
    pub(crate) fn send(&self, file: &Path, priority: &str) -> anyhow::Result<()> {
        let mut send = self.controller();
        send.arg("send").arg(file).args([
            "--to",
            &format!("site:{}", self.site),
            "--priority",
            priority,
        ]);
        run_ok(send, "queuing the file").map(drop)
    }

    /// A log file of this deployment (`controller.log`, `agent.log`).
    pub(crate) fn log(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Records every report event of `/api/stream` into `events` until this is dropped, on a
    /// thread of its own; follows the stream again whenever it ends (the bench's HTTP client
    /// gives up on any one response after 120 s).
    pub(crate) fn follow_reports(&self, events: Events) {
        let (ns, api, state) = (self.ctl_ns.clone(), self.api, self.follower.clone());
        let token = crate::ingest::token(&self.dir.join("ctl"), "read.token");
        std::thread::spawn(move || {
            while state.load(Ordering::Acquire) != DONE {
                let (events, state, token) = (events.clone(), state.clone(), token.clone());
                if in_netns(&ns, move || {
                    crate::ingest::follow_stream(api, &token, &events, &state)
                })
                .is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
}

impl Drop for OneSite {
    fn drop(&mut self) {
        self.follower.store(DONE, Ordering::Release);
    }
}

/// A clap value parser: seconds (a decimal number) as a duration.
pub fn secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?}: expected seconds, e.g. 120 or 0.5")),
    }
}
